//! The CLI and API contract without a relay: exit codes, bad input, health endpoints.

use crate::common::*;

fn configured() -> Env {
    let env = Env::new();
    env.ok(&[
        "smtp",
        "set",
        "--host",
        "relay.example.org",
        "--from",
        "panel@example.org",
        "--fallback-recipient",
        "ops@example.org",
    ]);
    env
}

#[test]
fn bad_settings_exit_2_name_every_field_and_change_nothing() {
    let env = configured();
    let r = env.panel(&["smtp", "set", "--port", "0", "--from", "not-an-address", "--security", "ssl"]);
    assert_eq!(r.code, 2);
    for field in ["port:", "from:", "security:"] {
        assert!(r.stderr.contains(field), "{field} missing: {}", r.stderr);
    }
    let shown = env.ok(&["smtp", "show", "--json"]).json();
    assert_eq!(shown["version"], 1, "nothing stored");
    assert_eq!(shown["effective"]["port"], 587, "derived from the default starttls mode");
}

#[test]
fn header_injection_is_refused_when_enqueued() {
    let env = configured();
    let r = env.panel(&["send", "--to", "a@example.org", "--subject", "hi\r\nBcc: victim@example.org", "--text", "x"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("subject") && r.stderr.contains("single line"), "{}", r.stderr);
    let r = env.panel(&["send", "--to", "a@example.org\nBcc: v@example.org", "--subject", "hi", "--text", "x"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("to[0]"), "{}", r.stderr);
    assert_eq!(env.ok(&["messages", "list", "--json"]).json().as_array().unwrap().len(), 0);
}

#[test]
fn commands_before_configuration_say_what_to_do() {
    let env = Env::new();
    let r = env.panel(&["smtp", "test"]);
    // Nothing to send through yet: the operation fails (1), as the API's 409 says; not bad input.
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("panel smtp set --host"), "{}", r.stderr);
    let r = env.panel(&["messages", "list", "--status", "lost"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("queued, sending, retrying, delivered, partly_failed, failed"), "{}", r.stderr);
}

#[test]
fn the_service_answers_health_and_validates_api_input() {
    let mut env = configured();
    let port = env.serve();
    assert_eq!(http(port, "GET", "/healthz", "").0, 200);
    assert_eq!(http(port, "GET", "/readyz", "").0, 200);
    let (status, body) = http(port, "PUT", "/api/v1/settings/smtp", r#"{"port": 70000}"#);
    assert_eq!(status, 400);
    assert!(body.contains("\"field\":\"port\""), "{body}");
    // A body that is not an object is refused, and stores nothing (an array once made a version).
    for not_an_object in ["[null,null]", "\"relay\"", "42", "null"] {
        let (status, body) = http(port, "PUT", "/api/v1/settings/smtp", not_an_object);
        assert_eq!(status, 400, "{not_an_object}: {body}");
        assert!(body.contains("must be a JSON object"), "{body}");
        let (status, _) = http(port, "POST", "/api/v1/messages", not_an_object);
        assert_eq!(status, 400, "{not_an_object}");
    }
    assert_eq!(env.ok(&["smtp", "show", "--json"]).json()["version"], 1, "nothing stored");
    let (status, body) = http(port, "POST", "/api/v1/smtp/test", "{}");
    assert_eq!(status, 202, "{body}");
    assert!(body.contains("\"service_running\":true"), "{body}");
    let (status, body) = http(port, "POST", "/api/v1/messages/retry", r#"{"status": "queued"}"#);
    assert_eq!(status, 400, "{body}");
    let (status, body) =
        http(port, "POST", "/api/v1/messages/retry", r#"{"status": "failed", "since": "1 fortnight"}"#);
    assert_eq!(status, 400);
    assert!(body.contains("\"field\":\"since\""), "{body}");
    let (status, body) = http(port, "POST", "/api/v1/messages/retry", r#"{"status": "failed", "since": "2h"}"#);
    assert_eq!((status, body.as_str()), (200, r#"{"requeued":0}"#));
    let bulk = r#"{"messages": [{"to": ["a@example.org"], "subject": "1", "text": "x"},
                                 {"to": ["not an address"], "subject": "2", "text": "x"}]}"#;
    let (status, body) = http(port, "POST", "/api/v1/messages/bulk", bulk);
    assert_eq!(status, 400);
    assert!(body.contains("\"field\":\"messages[1].to[0]\""), "{body}");
    let before = env.ok(&["messages", "list", "--json"]).json().as_array().unwrap().len();
    let bulk = r#"{"messages": [{"to": ["a@example.org"], "subject": "1", "text": "x"},
                                 {"to": ["b@example.org"], "subject": "2", "text": "x"}]}"#;
    let (status, body) = http(port, "POST", "/api/v1/messages/bulk", bulk);
    assert_eq!(status, 202, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["ids"].as_array().unwrap().len(), 2);
    assert_eq!(env.ok(&["messages", "list", "--json"]).json().as_array().unwrap().len(), before + 2, "all or none");
    assert_eq!(http(port, "POST", "/api/v1/messages/bulk", r#"{"messages": []}"#).0, 400);
    let services = env.ok(&["services", "list", "--json"]).json();
    assert_eq!(services[0]["kind"], "serve");
    assert_eq!(services[0]["listen"], format!("127.0.0.1:{port}"));
}

#[test]
fn the_api_cannot_point_the_relay_password_at_a_local_file_or_variable() {
    let mut env = configured();
    let port = env.serve();
    for body in [
        r#"{"auth": "password", "username": "x", "password_file": "/etc/passwd", "host": "evil.example.net"}"#,
        r#"{"auth": "password", "username": "x", "password_env": "HOME"}"#,
    ] {
        let (status, answer) = http(port, "PUT", "/api/v1/settings/smtp", body);
        assert_eq!(status, 400, "{answer}");
        assert!(answer.contains("set only on the service's machine"), "{answer}");
    }
    assert_eq!(env.ok(&["smtp", "show", "--json"]).json()["version"], 1, "nothing stored");
    // Set where it may be, the password source stays; the API may not move the relay under it.
    env.ok(&["smtp", "set", "--auth", "password", "--username", "x", "--password-env", "RELAY_PW"]);
    let (status, answer) = http(port, "PUT", "/api/v1/settings/smtp", r#"{"host": "evil.example.net"}"#);
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains(r#""field":"host""#), "{answer}");
    let shown = env.ok(&["smtp", "show", "--json"]).json();
    assert_eq!((shown["version"].as_i64(), shown["effective"]["host"].as_str()), (Some(2), Some("relay.example.org")));
}

#[test]
fn bad_http_limits_in_the_config_file_stop_serve_with_the_key_named() {
    let env = configured();
    let config = std::fs::read_to_string(env.path().join("panel.toml")).unwrap();
    for (section, key) in
        [("max_connections = 0", "http.max_connections"), ("header_timeout = \"0s\"", "http.header_timeout")]
    {
        env.write("panel.toml", &format!("{config}[http]\n{section}\n"));
        let r = env.panel(&["serve", "--listen", "127.0.0.1:0"]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains(key), "{}", r.stderr);
    }
}

#[test]
fn services_run_on_the_threads_asked_for_and_refuse_a_count_out_of_range() {
    let mut env = configured();
    let config = std::fs::read_to_string(env.path().join("panel.toml")).unwrap();
    // Out of range, from the file and from the flag: refused before anything starts.
    env.write("panel.toml", &format!("threads = 0\n{config}"));
    let r = env.panel(&["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("threads 0 is out of range; use 1-1024"), "{}", r.stderr);
    env.write("panel.toml", &config);
    let r = env.panel(&["worker", "--threads", "1025"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("threads 1025 is out of range"), "{}", r.stderr);
    assert_eq!(env.ok(&["services", "list", "--json"]).json(), serde_json::json!([]), "nothing started");

    // Unset: one per core less one for SQLite's writer (at least one), said at start; set: as
    // many as asked, and the service serves.
    let cores = std::thread::available_parallelism().unwrap().get();
    env.serve();
    let default = format!("runtime threads: {} ({cores} cores, less one for SQLite's writer)", (cores - 1).max(1));
    assert!(env.service_logs().contains(&default), "{default}: {}", env.service_logs());
    env.write("panel.toml", &format!("threads = 3\n{config}"));
    let port = env.serve_with(&["--threads", "1"]);
    let logs = env.service_logs();
    assert!(logs.contains("runtime threads: 1 (as configured)"), "the flag over the file: {logs}");
    assert_eq!(http(port, "GET", "/readyz", "").0, 200);
    assert_eq!(http(port, "GET", "/api/v1/queue", "").0, 200);
    env.spawn(&["worker"]);
    assert!(env.service_logs().contains("runtime threads: 3 (as configured)"), "{}", env.service_logs());
}

#[test]
fn api_tokens_are_listed_revoked_at_once_and_ended_by_a_new_password() {
    let mut env = configured();
    let port = env.serve();
    let bearer = |t: &str| format!("Authorization: Bearer {t}\r\n");
    let hr = env.ok(&["admin", "token", "create", "tester", "--label", "hr-sync"]).stdout.trim().to_string();
    let ci = env.ok(&["admin", "token", "tester", "--label", "ci"]).stdout.trim().to_string();
    assert_eq!(http_with(port, "GET", "/api/v1/queue", &bearer(&hr), "").0, 200);

    let listed = env.ok(&["admin", "token", "list", "--json"]).json();
    let id_of_label = |label: &str| {
        let t = listed.as_array().unwrap().iter().find(|t| t["label"] == label).unwrap();
        t["id"].as_str().unwrap().to_string()
    };
    let hr_id = id_of_label("hr-sync");
    assert_ne!(id_of_label("ci"), hr_id);
    assert_eq!(hr_id.len(), 12);
    assert!(!listed.to_string().contains(&hr), "a list never shows a token");
    assert!(listed.as_array().unwrap().iter().any(|t| t["label"] == "hr-sync" && !t["last_used_at"].is_null()));

    // Revoked through the API: the next request with it fails.
    let (status, body) = http(port, "DELETE", &format!("/api/v1/tokens/{hr_id}"), "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(http_with(port, "GET", "/api/v1/queue", &bearer(&hr), "").0, 401);
    assert_eq!(http(port, "DELETE", &format!("/api/v1/tokens/{hr_id}"), "").0, 404, "gone");
    assert_eq!(http(port, "DELETE", "/api/v1/tokens/not-an-id", "").0, 400);
    let r = env.panel(&["admin", "token", "revoke", &hr_id]);
    assert_eq!(r.code, 2, "{}", r.stderr);

    // A new password ends every token of the account.
    assert_eq!(http_with(port, "GET", "/api/v1/queue", &bearer(&ci), "").0, 200);
    let r = env.panel_stdin(&["admin", "set-password", "tester", "--password-stdin"], "another-long-password-2");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(http_with(port, "GET", "/api/v1/queue", &bearer(&ci), "").0, 401);
    assert!(env.ok(&["admin", "token", "list"]).stdout.contains("No API tokens"));
    let audit = env.ok(&["audit", "list"]).stdout;
    assert!(audit.contains("token.revoked") && audit.contains(&format!("token {hr_id} (hr-sync)")), "{audit}");
    assert!(audit.contains("sessions and API tokens ended"), "{audit}");
}

#[test]
fn the_data_directory_and_database_are_readable_by_panels_user_only() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    // A new data directory is made private, and so is everything in it.
    let env = configured();
    assert_eq!(mode(env.path()), 0o700);
    for f in ["panel.db", "panel.db-wal", "panel.db-shm"] {
        let path = env.path().join(f);
        if path.exists() {
            assert_eq!(mode(&path), 0o600, "{f}");
        }
    }
    assert!(env.path().join("panel.db").exists());
    // One left open by an older install (or StateDirectory=) is tightened at start, and said so.
    std::fs::set_permissions(env.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(env.path().join("panel.db"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = env.panel(&["smtp", "show"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("was mode 755, now 700"), "{}", r.stderr);
    assert_eq!((mode(env.path()), mode(&env.path().join("panel.db"))), (0o700, 0o600));
}

#[test]
fn a_sign_in_name_cannot_forge_a_log_line() {
    let mut env = configured();
    let port = env.serve();
    let forged = "2026-12-03T00:00:00.000000Z  INFO panel: admin root signed in";
    let body = format!("name=mallory%0A{}&password=x&next=%2F", forged.replace(' ', "+"));
    assert_eq!(http_with(port, "POST", "/login", "", &body).0, 401);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !env.service_logs().contains("sign-in failed") {
        assert!(std::time::Instant::now() < deadline, "{}", env.service_logs());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let logs = env.service_logs();
    assert!(!logs.lines().any(|l| l.starts_with(forged)), "a forged line: {logs}");
    assert!(logs.contains(r"mallory\n2026-12-03"), "the newline is escaped: {logs}");
}

#[test]
fn one_message_size_limit_everywhere_answered_with_413() {
    let mut env = configured();
    let port = env.serve();
    let message =
        |mib: usize| format!(r#"{{"to": ["a@example.org"], "subject": "big", "text": "{}"}}"#, "x".repeat(mib << 20));
    // 3 MiB is within the documented 10 MiB (the old 2 MB body limit refused it).
    let (status, body) = http(port, "POST", "/api/v1/messages", &message(3));
    assert_eq!(status, 202, "{body}");
    let (status, body) = http(port, "POST", "/api/v1/messages", &message(11));
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("at most 10 MiB"), "{body}");
    let bulk = format!(r#"{{"messages": [{}, {}]}}"#, message(1), message(11));
    let (status, body) = http(port, "POST", "/api/v1/messages/bulk", &bulk);
    assert_eq!((status, body.contains("messages[1]")), (413, true), "{body}");
    // A body announced far over the limit is refused at once, not waited for.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    std::io::Write::write_all(
        &mut s,
        b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{",
    )
    .unwrap();
    let mut answer = [0u8; 12];
    std::io::Read::read_exact(&mut s, &mut answer).expect("an answer, not a wait");
    assert_eq!(&answer, b"HTTP/1.1 413");
    // The CLI applies the same limit, as bad input.
    let big = env.write("big.txt", &"x".repeat(11 << 20));
    let r = env.panel(&["send", "--to", "a@example.org", "--subject", "big", "--text-file", big.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("at most 10 MiB"), "{}", r.stderr);
}

#[test]
fn bad_retention_in_the_config_file_stops_the_service_with_the_key_named() {
    let env = configured();
    let config = std::fs::read_to_string(env.path().join("panel.toml")).unwrap();
    for (line, key) in [("content = \"1h\"", "retention.content"), ("messages = \"soon\"", "retention.messages")] {
        env.write("panel.toml", &format!("{config}[retention]\n{line}\n"));
        let r = env.panel(&["worker"]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains(key), "{}", r.stderr);
    }
}

#[test]
fn every_route_answers_only_statuses_its_openapi_entry_documents() {
    let mut env = configured();
    let port = env.serve();
    let (status, doc) = http(port, "GET", "/api/openapi.json", "");
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let numbered = op["parameters"].as_array().unwrap().iter().any(|p| p["schema"]["type"] == "integer");
            let concrete = path
                .replace("{id}", if numbered { "999999" } else { "0123456789ab" })
                .replace("{version}", "999999")
                .replace("{name}", "nope");
            if numbered {
                // A number that is not one is bad input, answered in JSON like every error.
                let (status, answer) = http(
                    port,
                    &method.to_ascii_uppercase(),
                    &path.replace("{id}", "x1").replace("{version}", "x1"),
                    "{}",
                );
                assert_eq!(status, 400, "{method} {path} with a non-number: {answer}");
                let parsed: serde_json::Value = serde_json::from_str(&answer).unwrap();
                assert_eq!(parsed["fields"][0]["field"], "path", "{answer}");
            }
            let bodies: &[&str] =
                if matches!(method.as_str(), "post" | "put") { &["{}", "[1]", "not json"] } else { &[""] };
            for body in bodies {
                let (status, answer) = http(port, &method.to_ascii_uppercase(), &concrete, body);
                let documented = op["responses"].as_object().unwrap();
                let ok = documented.contains_key(&status.to_string())
                    || ((200..300).contains(&status) && documented.contains_key("2XX"));
                assert!(ok, "{method} {concrete} with {body:?} answered {status}, not documented: {answer}");
                if status >= 400 {
                    let parsed: serde_json::Value = serde_json::from_str(&answer).unwrap_or_else(|e| {
                        panic!("{method} {concrete}: an error body that is not JSON ({e}): {answer}")
                    });
                    assert!(parsed["error"].is_string(), "{method} {concrete}: no error text: {answer}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 60, "{checked}");
}

#[test]
fn output_into_a_closed_pipe_ends_quietly_and_logs_to_a_file_have_no_colour_codes() {
    let mut env = configured();
    for _ in 0..3 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_panel"))
            .args(["smtp", "show"])
            .env("PANEL_DATA_DIR", env.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader is gone before anything is written
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{stderr}");
    }
    env.serve();
    let logs = env.service_logs();
    assert!(logs.contains("Panel Service running"), "{logs}");
    assert!(!logs.contains('\u{1b}'), "no ANSI codes in a log file: {logs:?}");
}

#[test]
fn check_connection_checks_unsaved_settings_without_storing_them() {
    let mut env = Env::new();
    let sink = panel_testlab::RecordingSink::start();
    env.relay_on(sink.port, &[]);
    let port = env.serve();
    let check = |body: &str| {
        let (status, answer) = http(port, "POST", "/api/v1/smtp/check", body);
        assert_eq!(status, 200, "{answer}");
        serde_json::from_str::<serde_json::Value>(&answer).unwrap()
    };
    let saved = check("");
    assert_eq!((saved["ok"].as_bool(), saved["draft"].as_bool()), (Some(true), Some(false)), "{saved:#}");
    // The issue's case: a port typed into the form, not saved, is what gets checked.
    let closed = panel_testlab::free_port();
    let draft = check(&format!(r#"{{"port": {closed}}}"#));
    assert_eq!((draft["ok"].as_bool(), draft["draft"].as_bool()), (Some(false), Some(true)), "{draft:#}");
    assert_eq!(draft["failure"]["stage"], "tcp", "{draft:#}");
    assert_eq!(env.ok(&["smtp", "show", "--json"]).json()["version"], 1, "nothing stored");
    // An operator checks what is saved; a draft can point Panel anywhere, as a save can.
    let operator = env.api_token("olga", "operator");
    let bearer = format!("Authorization: Bearer {operator}\r\n");
    assert_eq!(http_with(port, "POST", "/api/v1/smtp/check", &bearer, "").0, 200);
    assert_eq!(http_with(port, "POST", "/api/v1/smtp/check", &bearer, r#"{"port": 25}"#).0, 403);
}

#[test]
fn a_reused_idempotency_key_with_other_content_is_a_conflict_not_a_dropped_message() {
    let mut env = configured();
    let port = env.serve();
    let body = |subject: &str| {
        format!(r#"{{"to": ["a@example.org"], "subject": "{subject}", "text": "x", "idempotency_key": "k-1"}}"#)
    };
    let (status, first) = http(port, "POST", "/api/v1/messages", &body("reset"));
    assert_eq!(status, 202, "{first}");
    let id = serde_json::from_str::<serde_json::Value>(&first).unwrap()["id"].as_i64().unwrap();
    let (status, again) = http(port, "POST", "/api/v1/messages", &body("reset"));
    assert_eq!(status, 200, "the same message again: {again}");
    let (status, other) = http(port, "POST", "/api/v1/messages", &body("another reset"));
    assert_eq!(status, 409, "{other}");
    assert!(other.contains(&format!("message {id} with different content")), "{other}");
    let r =
        env.panel(&["send", "--to", "a@example.org", "--subject", "third", "--text", "x", "--idempotency-key", "k-1"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("different content"), "{}", r.stderr);
    let r = env.ok(&["send", "--to", "a@example.org", "--subject", "reset", "--text", "x", "--idempotency-key", "k-1"]);
    assert!(r.stdout.contains("already exists") && r.stdout.lines().count() == 1, "one answer, not two: {}", r.stdout);
    assert_eq!(env.ok(&["messages", "list", "--json"]).json().as_array().unwrap().len(), 1);
}

#[test]
fn a_save_that_changes_nothing_stores_no_version_and_every_change_is_audited_with_its_fields() {
    let env = configured();
    let r = env.ok(&["smtp", "set", "--port", "2525"]);
    assert!(!r.stdout.contains("nothing changed"), "{}", r.stdout);
    let r = env.ok(&["smtp", "set", "--port", "2525"]);
    assert!(r.stdout.contains("nothing changed; version 2 stays in force"), "{}{}", r.stdout, r.stderr);
    assert_eq!(env.ok(&["smtp", "show", "--json"]).json()["version"], 2);
    let audit = env.ok(&["audit", "list"]).stdout;
    assert!(audit.contains("settings.saved") && audit.contains("port: (default) -> 2525"), "{audit}");
    assert!(audit.contains("host: (default) -> relay.example.org"), "the first save too: {audit}");
}

#[test]
fn messages_list_finds_a_recipients_mail_since_a_time() {
    let env = configured();
    for to in ["alice@example.org", "bob@example.org"] {
        env.ok(&["send", "--to", to, "--subject", "reset", "--text", "x"]);
    }
    let found = env.ok(&["messages", "list", "--recipient", "alice", "--since", "1h", "--json"]).json();
    let found = found.as_array().unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["to"][0], "alice@example.org");
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    assert!(env.ok(&["messages", "list", "--since", &later, "--json"]).json().as_array().unwrap().is_empty());
    let r = env.panel(&["messages", "list", "--since", "a while"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("since"), "{}", r.stderr);
}

#[test]
fn a_read_in_a_directory_without_panel_data_says_so_instead_of_creating_an_empty_database() {
    let env = Env::new();
    let elsewhere = env.path().join("not-here");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_panel"))
            .args(args)
            .env("PANEL_DATA_DIR", &elsewhere)
            .env_remove("PANEL_CONFIG")
            .env_remove("PANEL_DATABASE_URL")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (code, stderr) = run(&["messages", "list"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no Panel data directory") && stderr.contains("not-here"), "{stderr}");
    assert!(!elsewhere.exists(), "nothing was created");
    let (code, stderr) = run(&[
        "smtp",
        "set",
        "--host",
        "relay.example.org",
        "--from",
        "p@example.org",
        "--fallback-recipient",
        "o@example.org",
    ]);
    assert_eq!(code, Some(0), "setting Panel up creates it: {stderr}");
    assert!(elsewhere.join("panel.db").exists());
}

#[test]
fn a_command_on_a_database_no_service_uses_says_which_one_and_names_an_unread_panel_toml() {
    let mut env = configured();
    let cwd = env.path().join("somewhere");
    std::fs::create_dir(&cwd).unwrap();
    std::fs::write(cwd.join("panel.toml"), "listen = \"127.0.0.1:9999\"\n").unwrap();
    let (data, config) = (env.data_dir().to_path_buf(), env.path().join("panel.toml"));
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_panel"))
            .args(args)
            .current_dir(&cwd)
            .env("PANEL_DATA_DIR", &data)
            .env("PANEL_CONFIG", &config)
            .env_remove("PANEL_DATABASE_URL")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let stderr = run(&["messages", "list"]);
    let db = format!("sqlite://{}", data.join("panel.db").display());
    assert!(stderr.contains(&format!("no Panel Service or worker runs on the database {db}")), "{stderr}");
    assert!(stderr.contains("./panel.toml is not read") && stderr.contains("--config panel.toml"), "{stderr}");
    // Read from where it is named, it is not mentioned; with a service running, neither is the database.
    env.spawn(&["worker"]);
    let stderr = run(&["--config", "panel.toml", "messages", "list"]);
    assert!(!stderr.contains("panel.toml is not read") && !stderr.contains("no Panel Service"), "{stderr}");
}

#[test]
fn every_settings_version_is_listed_with_its_changes_and_any_one_can_be_restored() {
    let mut env = configured();
    env.ok(&["smtp", "set", "--port", "2525"]);
    env.ok(&["smtp", "set", "--host", "relay2.example.org"]);
    let history = env.ok(&["smtp", "history", "--json"]).json();
    let versions = history["versions"].as_array().unwrap();
    assert_eq!(versions.iter().map(|v| v["version"].as_i64().unwrap()).collect::<Vec<_>>(), [3, 2, 1]);
    assert_eq!(versions[0]["in_force"], true);
    assert_eq!(versions[1]["in_force"], false);
    assert_eq!(versions[0]["changes"], serde_json::json!(["host: relay.example.org -> relay2.example.org"]));
    assert_eq!(versions[1]["changes"], serde_json::json!(["port: (default) -> 2525"]));
    assert_eq!(versions[0]["saved_by"], versions[2]["saved_by"]);
    let text = env.ok(&["smtp", "history", "--limit", "2"]).stdout;
    assert!(text.contains("Version 3 saved") && text.contains("(in force)") && !text.contains("Version 1"), "{text}");

    let r = env.ok(&["smtp", "restore", "1"]);
    assert!(r.stdout.contains("saved as version 4"), "{}", r.stdout);
    let shown = env.ok(&["smtp", "show", "--json"]).json();
    assert_eq!(
        (shown["version"].as_i64(), &shown["effective"]["host"]),
        (Some(4), &serde_json::json!("relay.example.org"))
    );
    assert_eq!(shown["effective"]["port"], 587);
    let newest = &env.ok(&["smtp", "history", "--json"]).json()["versions"][0];
    assert_eq!(
        newest["changes"],
        serde_json::json!(["host: relay2.example.org -> relay.example.org", "port: 2525 -> (default)"])
    );
    let audit = env.ok(&["audit", "list"]).stdout;
    assert!(audit.contains("settings.restored") && audit.contains("version 1 restored"), "{audit}");

    // A version that does not exist: bad input, nothing stored.
    let r = env.panel(&["smtp", "restore", "99"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("relay settings version '99' not found"), "{}", r.stderr);
    assert_eq!(env.ok(&["smtp", "show", "--json"]).json()["version"], 4);

    // Over the API: a viewer reads the history, only an admin restores.
    let port = env.serve();
    let viewer = env.api_token("watcher", "viewer");
    let operator = env.api_token("oper", "operator");
    let bearer = |t: &str| format!("Authorization: Bearer {t}\r\n");
    let (status, _, body) = http_with(port, "GET", "/api/v1/settings/smtp/versions?limit=2", &bearer(&viewer), "");
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed["versions"].as_array().unwrap().len(), 2);
    let restore = "/api/v1/settings/smtp/versions/2/restore";
    assert_eq!(http_with(port, "POST", restore, &bearer(&operator), "").0, 403);
    let (status, body) = http(port, "POST", restore, "");
    assert_eq!(status, 200, "{body}");
    let saved: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((saved["version"].as_i64(), &saved["effective"]["port"]), (Some(5), &serde_json::json!(2525)));
    assert_eq!(http(port, "POST", "/api/v1/settings/smtp/versions/77/restore", "").0, 404);
}

#[test]
fn urgent_mail_overtakes_queued_bulk_mail_and_bulk_keeps_a_share() {
    let mut env = Env::new();
    let sink = panel_testlab::RecordingSink::start();
    // A slow relay: 100 ms for each message, one at a time.
    sink.set_data_reply_delay(std::time::Duration::from_millis(100));
    env.relay_on(sink.port, &[]);
    for i in 0..20 {
        env.ok(&[
            "send",
            "--to",
            "all@example.org",
            "--subject",
            &format!("bulk {i}"),
            "--text",
            "x",
            "--priority",
            "bulk",
        ]);
    }
    for i in 0..6 {
        env.ok(&["send", "--to", "ann@example.org", "--subject", &format!("reset {i}"), "--text", "x"]);
    }
    let listed = env.ok(&["messages", "list", "--limit", "1", "--json"]).json();
    assert_eq!(listed[0]["priority"], "urgent", "{listed:#}");
    env.spawn(&["worker", "--concurrency", "1"]);
    let order: Vec<String> = sink
        .wait_for(26, std::time::Duration::from_secs(30))
        .iter()
        .map(|m| m.lines().find_map(|l| l.strip_prefix("Subject: ")).unwrap_or_default().to_string())
        .collect();
    let first_bulk = order.iter().position(|s| s.starts_with("bulk")).unwrap();
    let last_reset = order.iter().rposition(|s| s.starts_with("reset")).unwrap();
    assert!(last_reset < 10, "the urgent mail went ahead of 20 queued bulk messages: {order:?}");
    assert!(first_bulk < last_reset, "bulk mail kept a share while urgent mail was waiting: {order:?}");
    let bad = env.panel(&["send", "--to", "a@example.org", "--subject", "s", "--text", "x", "--priority", "soon"]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("urgent or bulk"), "{}", bad.stderr);
}

#[test]
fn completions_complete_commands_in_bash_and_help_lists_them_in_the_order_a_new_user_meets_them() {
    let env = Env::new();
    let script = env.path().join("panel.bash");
    std::fs::write(&script, env.ok(&["completions", "bash"]).stdout).unwrap();
    // Bash itself runs the script and completes `panel sm` and `panel smtp ch`.
    let complete = |words: &str, index: usize| {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                // As bash calls it: the command, the word being completed, the word before it.
                "source {}; COMP_WORDS=({words}); COMP_CWORD={index}; \
                 _panel panel \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
                 echo \"${{COMPREPLY[@]}}\"",
                script.display()
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert_eq!(complete("panel sm", 1), "smtp");
    assert!(complete("panel smtp ch", 2).split(' ').any(|w| w == "check"));
    assert!(env.ok(&["completions", "zsh"]).stdout.starts_with("#compdef panel"));
    assert!(env.ok(&["completions", "fish"]).stdout.contains("complete -c panel"));
    let bad = env.panel(&["completions", "tcsh"]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("possible values: bash"), "{}", bad.stderr);

    // Start the service, make an admin, set up the relay, send, read the log.
    let help = env.ok(&["--help"]).stdout;
    let at = |command: &str| help.find(&format!("\n  {command} ")).unwrap_or_else(|| panic!("{command}: {help}"));
    let journey = ["serve", "admin", "smtp", "send", "messages", "template", "workflow", "services", "license"];
    assert!(journey.windows(2).all(|w| at(w[0]) < at(w[1])), "{help}");
    // The manual page, for packages, is made from the same definitions.
    let man = env.ok(&["man"]).stdout;
    assert!(man.contains(".TH panel 1") && man.contains("smtp"), "{man}");
}

#[test]
fn waiting_shows_progress_on_a_terminal_and_nothing_in_a_script() {
    let mut env = Env::new();
    let sink = panel_testlab::RecordingSink::start();
    // A slow relay: the wait lasts long enough to be shown.
    sink.set_greeting_delay(std::time::Duration::from_millis(1500));
    env.relay_on(sink.port, &[]);
    env.spawn(&["worker"]);
    // On a terminal (util-linux `script` gives the command one): the state, rewritten in place.
    let command = format!("{} smtp test --wait 20", env!("CARGO_BIN_EXE_panel"));
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("PANEL_DATA_DIR", env.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("\r\x1b[2K") && shown.contains("Test message 1: sending"), "{shown:?}");
    assert!(shown.contains("Delivered"), "{shown:?}");
    // In a script: the outcome only.
    let r = env.ok(&["smtp", "test", "--wait", "20"]);
    assert!(!r.stderr.contains('\r') && !r.stdout.contains('\r'), "{:?} {:?}", r.stdout, r.stderr);
    assert!(r.stdout.contains("Delivered"), "{}", r.stdout);
}
