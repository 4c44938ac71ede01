//! License keys and stored credentials, end to end: the `panel` binary, a real Postfix relay
//! with SASL on loopback, and searches for the secret wherever it could leak.

use std::time::Duration;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(30);

fn state(m: &serde_json::Value) -> &str {
    m["state"].as_str().unwrap()
}

#[test]
fn license_keys_are_verified_on_add_with_a_precise_reason() {
    let env = Env::new();
    let r = env.panel(&["license", "add", "panel-license-v1.e30.AA"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("no license authority is trusted"), "{}", r.stderr);

    env.trust_authority();
    let key = env.issue(&["--feature", "credential-storage", "--feature", "future-thing", "--domain", "example.org"]);

    // Tampered: one character of the payload changed.
    let mut parts: Vec<String> = key.split('.').map(String::from).collect();
    let flipped = if parts[1].ends_with('A') { 'B' } else { 'A' };
    parts[1].pop();
    parts[1].push(flipped);
    let r = env.panel(&["license", "add", &parts.join(".")]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("altered") || r.stderr.contains("malformed"), "{}", r.stderr);

    // Signed by an authority this installation does not trust.
    let other = Env::new();
    other.trust_authority();
    let foreign = other.issue(&["--feature", "credential-storage"]);
    let r = env.panel(&["license", "add", &foreign]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("unknown authority"), "{}", r.stderr);

    let r = env.panel(&["license", "add", "not-a-license"]);
    assert!(r.stderr.contains("malformed license key"), "{}", r.stderr);
    let expired = env.issue(&["--feature", "credential-storage", "--expires", "2020-01-31"]);
    let r = env.panel(&["license", "add", &expired]);
    assert!(r.stderr.contains("expired at 2020-02-01"), "{}", r.stderr);
    assert_eq!(env.ok(&["license", "list", "--json"]).json().as_array().unwrap().len(), 0, "nothing was stored");

    let file = env.write("license.txt", &format!("{key}\n"));
    env.ok(&["license", "add", "--file", file.to_str().unwrap()]);
    let list = env.ok(&["license", "list", "--json"]).json();
    let l = &list[0];
    assert_eq!(l["organization"], "Contoso");
    assert_eq!(l["domain"], "example.org");
    assert_eq!(l["features"], serde_json::json!(["credential-storage", "future-thing"]));
    assert_eq!(l["expires_at"], serde_json::Value::Null);
    // Bound to example.org, and no From address is configured yet.
    assert_eq!(l["valid"], false, "{l}");
    assert!(l["problem"].as_str().unwrap().contains("bound to the domain example.org"), "{l}");
    env.ok(&[
        "smtp",
        "set",
        "--host",
        "127.0.0.1",
        "--from",
        "panel@example.org",
        "--fallback-recipient",
        "ops@example.org",
    ]);
    assert_eq!(env.ok(&["license", "list", "--json"]).json()[0]["valid"], true);

    let id = l["id"].as_str().unwrap();
    env.ok(&["license", "remove", id]);
    let r = env.panel(&["license", "remove", id]);
    assert_eq!(r.code, 2);
    let audit = env.ok(&["audit", "list", "--json"]).json();
    let actions: Vec<&str> = audit.as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["license.removed", "settings.saved", "license.added"], "the settings save is audited too");
}

#[test]
fn a_license_that_expires_later_stops_granting_at_that_moment() {
    let env = Env::new();
    env.trust_authority();
    // Generous enough for a loaded CI machine to add the key and store before it expires.
    let expiry = chrono::Utc::now() + chrono::Duration::seconds(8);
    let key = env.issue(&["--feature", "credential-storage", "--expires", &expiry.to_rfc3339()]);
    env.ok(&["license", "add", &key]);
    let r = env.panel_stdin(&["credential", "set", "relay", "--username", "u", "--password-stdin"], "pw-1");
    assert_eq!(r.code, 0, "{}", r.stderr);
    let left = (expiry - chrono::Utc::now()).to_std().unwrap_or_default();
    std::thread::sleep(left + Duration::from_millis(300));
    let l = &env.ok(&["license", "list", "--json"]).json()[0];
    assert_eq!(l["valid"], false);
    assert!(l["problem"].as_str().unwrap().contains("expired"), "{l}");
    let r = env.panel_stdin(&["credential", "set", "relay", "--username", "u", "--password-stdin"], "pw-2");
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("credential-storage") && r.stderr.contains("expired"), "{}", r.stderr);
}

#[test]
fn without_the_license_feature_storing_fails_and_nothing_is_written() {
    let env = Env::new();
    let secret = "never-stored-7Qz";
    let r = env.panel_stdin(&["credential", "set", "relay", "--username", "u", "--password-stdin"], secret);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("'credential-storage'") && r.stderr.contains("panel license add"), "{}", r.stderr);

    // A valid key with other features does not grant it either.
    env.trust_authority();
    let key = env.issue(&["--feature", "reporting"]);
    env.ok(&["license", "add", &key]);
    let r = env.panel_stdin(&["credential", "set", "relay", "--username", "u", "--password-stdin"], secret);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("does not grant it (features: reporting)"), "{}", r.stderr);

    assert_eq!(env.ok(&["credential", "list", "--json"]).json(), serde_json::json!([]));
    let audit = env.ok(&["audit", "list", "--json"]).json();
    assert!(audit.as_array().unwrap().iter().all(|a| a["action"] != "credential.stored"), "{audit}");
    assert!(!files_contain(env.path(), secret), "the secret reached a file");
}

#[test]
fn stored_credential_delivers_on_starttls_and_implicit_tls_and_moving_the_relay_detaches_it() {
    let Some(lab) = PostfixLab::start() else { return };
    let mut env = Env::new();
    env.license();
    env.store_lab_credential("lab");
    env.configure(&lab, lab.submission_port, "starttls", &["--auth", "password", "--credential", "lab"]);
    let show = env.ok(&["smtp", "show", "--json"]).json();
    assert_eq!(show["effective"]["credential"], "lab");
    assert_eq!(show["effective"]["credential_status"], "attached");
    env.spawn(&["worker"]);
    let m = env.ok(&["smtp", "test", "--wait", "20", "--json"]).json();
    assert_eq!(state(&m), "delivered", "{m:#}");
    let mail = &lab.wait_for_messages(m["message_id"].as_str().unwrap(), 1, WAIT)[0];
    assert!(mail.contains("(Authenticated sender: panel)"), "{mail}");
    let creds = env.ok(&["credential", "list", "--json"]).json();
    assert_eq!(creds[0]["used_by"], serde_json::json!(["relay settings"]));
    assert!(creds[0]["first_used_at"].is_string(), "{creds}");

    // Moving to the implicit-TLS port detaches the credential until it is confirmed.
    let port = lab.smtps_port.to_string();
    let r = env.ok(&["smtp", "set", "--port", &port, "--security", "tls"]);
    assert!(
        r.stdout.contains("'lab' is detached") && r.stdout.contains("panel smtp set --credential lab"),
        "{}",
        r.stdout
    );
    let m = env.panel(&["smtp", "test", "--wait", "20", "--json"]).json();
    assert_eq!(state(&m), "failed", "{m:#}");
    assert_eq!(m["failure_class"], "configuration");
    assert!(m["last_error"].as_str().unwrap().contains("detached"), "{m:#}");
    let held = m["id"].as_i64().unwrap();

    // Confirming it re-queues the held message, which now goes out over implicit TLS.
    env.ok(&["smtp", "set", "--credential", "lab"]);
    let m = env.wait_message(held, WAIT, |m| state(m) == "delivered");
    assert_eq!(lab.wait_for_messages(m["message_id"].as_str().unwrap(), 1, WAIT).len(), 1);

    // A new host detaches it too: the password is never sent to a server it was not confirmed for.
    env.ok(&["smtp", "set", "--host", "localhost"]);
    assert_eq!(env.ok(&["smtp", "show", "--json"]).json()["effective"]["credential_status"], "detached");
    let r = env.panel(&["credential", "delete", "lab"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("used by the relay settings"), "{}", r.stderr);
    let audit = env.ok(&["audit", "list", "--json"]).json();
    let actions: Vec<&str> = audit.as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap()).collect();
    for expected in ["credential.stored", "credential.attached", "credential.first_used", "credential.detached"] {
        assert!(actions.contains(&expected), "{expected} missing from {actions:?}");
    }
}

#[test]
fn after_the_license_is_removed_sending_fails_as_a_configuration_error_until_one_is_added() {
    let Some(lab) = PostfixLab::start() else { return };
    let mut env = Env::new();
    let license = env.license();
    env.store_lab_credential("lab");
    env.configure(&lab, lab.submission_port, "starttls", &["--auth", "password", "--credential", "lab"]);
    env.spawn(&["worker"]);
    assert_eq!(state(&env.ok(&["smtp", "test", "--wait", "20", "--json"]).json()), "delivered");

    env.ok(&["license", "remove", &license]);
    let m = env.panel(&["smtp", "test", "--wait", "20", "--json"]).json();
    assert_eq!(state(&m), "failed", "{m:#}");
    assert_eq!(m["failure_class"], "configuration");
    let error = m["last_error"].as_str().unwrap();
    assert!(error.contains("'lab' cannot be used") && error.contains("credential-storage"), "{error}");
    let check = env.panel(&["smtp", "check", "--json"]);
    assert_eq!(check.code, 1);
    assert!(check.json()["failure"]["detail"].as_str().unwrap().contains("credential-storage"));

    // A new license re-queues the held message.
    let key = env.issue(&["--feature", "credential-storage"]);
    env.ok(&["license", "add", &key]);
    env.wait_message(m["id"].as_i64().unwrap(), WAIT, |m| state(m) == "delivered");
}

#[test]
fn secrets_never_appear_in_the_database_logs_or_any_answer() {
    let Some(lab) = PostfixLab::start() else { return };
    let mut env = Env::new();
    env.license();
    let api_secret = "api-only-Secret-9vK";
    let port = panel_testlab::free_port();
    env.spawn(&["serve", "--listen", &format!("127.0.0.1:{port}"), "--log-level", "trace"]);

    let (status, body) = http(
        port,
        "PUT",
        "/api/v1/credentials/spare",
        &format!(r#"{{"kind": "password", "username": "spare", "secret": "{api_secret}"}}"#),
    );
    assert_eq!(status, 201, "{body}");
    // A bad body is refused without echoing its values.
    let (status, body) = http(port, "PUT", "/api/v1/credentials/spare", &format!(r#"{{"secret": 1{api_secret}}}"#));
    assert_eq!(status, 400);
    assert!(!body.contains(api_secret), "{body}");

    env.store_lab_credential("lab");
    env.configure(&lab, lab.submission_port, "starttls", &["--auth", "password", "--credential", "lab"]);
    let m = env.ok(&["smtp", "test", "--wait", "20", "--json"]).json();
    assert_eq!(state(&m), "delivered", "{m:#}");
    let mut answers = vec![m.to_string()];
    for path in [
        "/api/v1/settings/smtp",
        "/api/v1/credentials",
        "/api/v1/licenses",
        "/api/v1/audit",
        "/api/v1/messages",
        &format!("/api/v1/messages/{}", m["id"]),
        "/api/v1/services",
    ] {
        let (status, body) = http(port, "GET", path, "");
        assert_eq!(status, 200, "{path}: {body}");
        answers.push(body);
    }
    answers.push(http(port, "POST", "/api/v1/smtp/check", "").1);
    for args in [
        &["credential", "list", "--json"][..],
        &["credential", "list"],
        &["smtp", "show", "--json"],
        &["smtp", "check", "--json"],
        &["audit", "list"],
        &["license", "list"],
    ] {
        let r = env.panel(args);
        answers.push(r.stdout + &r.stderr);
    }

    let logs = env.service_logs();
    // The SMTP conversation is logged at trace level, with the AUTH argument redacted.
    assert!(logs.contains("C: AUTH PLAIN ***"), "the AUTH exchange was logged, redacted: {logs}");
    for secret in [LAB_PASSWORD, api_secret] {
        for form in secret_forms(secret) {
            assert!(!logs.contains(&form), "service log contains a form of the secret: {form}");
            for a in &answers {
                assert!(!a.contains(&form), "an answer contains a form of the secret {form}: {a}");
            }
            assert!(!files_contain(env.path(), &form), "a file in the data directory holds {form}");
        }
    }
}

#[test]
fn master_key_rotation_while_the_service_runs_loses_no_message() {
    let Some(lab) = PostfixLab::start() else { return };
    let mut env = Env::new();
    env.license();
    env.store_lab_credential("lab");
    env.configure(&lab, lab.submission_port, "starttls", &["--auth", "password", "--credential", "lab"]);
    env.spawn(&["worker"]);
    let before = std::fs::read_to_string(env.path().join("master.key")).unwrap();

    let sender = {
        let dir = env.path().to_path_buf();
        std::thread::spawn(move || {
            (0..20)
                .map(|i| {
                    let out = std::process::Command::new(env!("CARGO_BIN_EXE_panel"))
                        .args([
                            "send",
                            "--to",
                            "ops@example.org",
                            "--subject",
                            &format!("rotation {i}"),
                            "--text",
                            "x",
                            "--json",
                        ])
                        .env("PANEL_DATA_DIR", &dir)
                        .output()
                        .unwrap();
                    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                    v["id"].as_i64().unwrap()
                })
                .collect::<Vec<_>>()
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let r = env.ok(&["credential", "rotate-master-key"]);
    assert!(r.stdout.contains("1 credential(s) re-wrapped"), "{}", r.stdout);
    let ids = sender.join().unwrap();
    for id in ids {
        env.wait_message(id, WAIT, |m| state(m) == "delivered");
    }
    // After the rotation the file holds only the new key, still private.
    let after = std::fs::read_to_string(env.path().join("master.key")).unwrap();
    let key_lines =
        |t: &str| t.lines().filter(|l| l.starts_with("panel-master-key-v1")).map(String::from).collect::<Vec<_>>();
    assert_eq!(key_lines(&after).len(), 1);
    assert_ne!(key_lines(&after), key_lines(&before));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(env.path().join("master.key")).unwrap().permissions().mode() & 0o777, 0o600);
    // And a message sent after the rotation authenticates with the re-wrapped credential.
    assert_eq!(state(&env.ok(&["smtp", "test", "--wait", "20", "--json"]).json()), "delivered");
    let audit = env.ok(&["audit", "list", "--json"]).json();
    assert_eq!(audit[0]["action"], "master_key.rotated");
}

#[test]
fn a_missing_or_wrong_master_key_stops_the_service_with_the_reason() {
    let env = Env::new();
    env.license();
    let r = env.panel_stdin(&["credential", "set", "relay", "--username", "u", "--password-stdin"], "pw");
    assert_eq!(r.code, 0, "{}", r.stderr);
    let key = env.path().join("master.key");
    let saved = env.path().join("master.key.saved");
    std::fs::rename(&key, &saved).unwrap();
    let r = env.panel(&["worker"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("does not exist") && r.stderr.contains("restore"), "{}", r.stderr);
    assert!(!key.exists(), "no new key is created while credentials exist");

    // Another installation's key file: refused, never garbage.
    let other = Env::new();
    other.license();
    other.panel_stdin(&["credential", "set", "x", "--username", "u", "--password-stdin"], "pw");
    std::fs::copy(other.path().join("master.key"), &key).unwrap();
    let r = env.panel(&["worker"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("is not in the master key file"), "{}", r.stderr);

    // A key file readable by others is refused with the fix.
    std::fs::rename(&saved, &key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = env.panel(&["worker"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("chmod 600"), "{}", r.stderr);
}

/// The secret and the base64 forms it takes on the wire (AUTH PLAIN, AUTH LOGIN) and in JSON.
fn secret_forms(secret: &str) -> Vec<String> {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut forms = vec![secret.to_string(), b64(secret), b64(&format!("\0{LAB_USER}\0{secret}"))];
    forms.push(b64(&format!("\0spare\0{secret}")));
    // The password at each offset within a longer base64 stream: the stable middle part.
    for prefix in ["", "a", "ab"] {
        let encoded = b64(&format!("{prefix}{secret}"));
        forms.push(encoded[4..encoded.len() - 4].to_string());
    }
    forms
}

fn files_contain(dir: &std::path::Path, needle: &str) -> bool {
    std::fs::read_dir(dir).unwrap().flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            return files_contain(&p, needle);
        }
        let bytes = std::fs::read(&p).unwrap_or_default();
        bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
    })
}
