//! End-to-end tests: the `panel` binary against a real, private Postfix relay on loopback.
//! Each test starts its own lab and data directory, so they run in parallel without sharing state.

use std::time::Duration;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(30);

fn lab() -> Option<PostfixLab> {
    PostfixLab::start()
}

fn state(m: &serde_json::Value) -> &str {
    m["state"].as_str().unwrap()
}

#[test]
fn test_message_is_delivered_on_the_plain_port_with_from_and_to_as_configured() {
    let Some(lab) = lab() else { return };
    let mut env = Env::new();
    env.configure(&lab, lab.plain_port, "none", &[]);
    env.spawn(&["worker"]);
    let run = env.ok(&["smtp", "test", "--wait", "20", "--json"]);
    let m = run.json();
    assert_eq!(state(&m), "delivered", "{m:#}");
    assert_eq!(m["origin"], "test_message");
    assert_eq!(m["used_fallback_recipient"], true);
    let attempt = &m["attempts"][0];
    assert_eq!(attempt["code"], 250);
    assert_eq!(attempt["outcome"], "delivered");
    assert!(attempt["reply"].as_str().unwrap().contains("queued as"), "{attempt}");

    let message_id = m["message_id"].as_str().unwrap();
    let mails = lab.wait_for_messages(message_id, 1, WAIT);
    assert_eq!(mails.len(), 1, "exactly one copy in the Maildir");
    let mail = &mails[0];
    assert!(mail.contains("From: Identity Panel <panel@example.org>"), "{mail}");
    assert!(mail.contains("To: ops@example.org"), "{mail}");
    assert!(mail.contains("Subject: Panel test message"), "{mail}");
    assert!(mail.contains("Return-Path: <panel@example.org>"), "envelope sender: {mail}");
}

#[test]
fn starttls_with_password_auth_delivers() {
    let Some(lab) = lab() else { return };
    let mut env = Env::new();
    let pw = env.password_args(LAB_PASSWORD);
    let pw: Vec<&str> = pw.iter().map(String::as_str).collect();
    env.configure(&lab, lab.submission_port, "starttls", &pw);
    let check = env.panel(&["smtp", "check", "--json"]);
    assert_eq!(check.code, 0, "{}", check.stdout);
    let report = check.json();
    assert_eq!(report["tls"]["sha256"], lab.cert_sha256.as_str());
    assert_eq!(report["tls"]["issuer"], "CN=Panel Test CA");
    assert!(report["tls"]["protocol"].as_str().unwrap().starts_with("TLSv1."));
    let stages: Vec<&str> = report["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(stages, ["dns", "tcp", "greeting", "ehlo", "starttls", "tls", "ehlo", "auth", "mail", "rcpt", "quit"]);

    env.spawn(&["worker"]);
    let m = env.ok(&["smtp", "test", "--wait", "20", "--json"]).json();
    assert_eq!(state(&m), "delivered", "{m:#}");
    let mail = &lab.wait_for_messages(m["message_id"].as_str().unwrap(), 1, WAIT)[0];
    assert!(mail.contains("(Authenticated sender: panel)"), "{mail}");
}

#[test]
fn implicit_tls_with_password_auth_delivers() {
    let Some(lab) = lab() else { return };
    let mut env = Env::new();
    let pw = env.password_args(LAB_PASSWORD);
    let pw: Vec<&str> = pw.iter().map(String::as_str).collect();
    env.configure(&lab, lab.smtps_port, "tls", &pw);
    env.spawn(&["worker"]);
    let m = env.ok(&["smtp", "test", "--wait", "20", "--json"]).json();
    assert_eq!(state(&m), "delivered", "{m:#}");
    assert_eq!(lab.wait_for_messages(m["message_id"].as_str().unwrap(), 1, WAIT).len(), 1);
}

#[test]
fn untrusted_certificate_is_refused_and_a_pinned_one_accepted() {
    let Some(lab) = lab() else { return };
    let env = Env::new();
    env.configure(&lab, lab.plain_port, "starttls", &["--no-ca"]);
    let check = env.panel(&["smtp", "check"]);
    assert_eq!(check.code, 1);
    assert!(check.stdout.contains("unknown CA"), "{}", check.stdout);
    assert!(check.stdout.contains("--pin-sha256"), "the hint names the fix: {}", check.stdout);
    assert!(check.stdout.contains(&lab.cert_sha256), "the fingerprint to pin is shown: {}", check.stdout);

    env.ok(&["smtp", "set", "--pin-sha256", &lab.cert_sha256]);
    let check = env.panel(&["smtp", "check", "--json"]);
    assert_eq!(check.code, 0, "{}", check.stdout);
    assert_eq!(check.json()["tls"]["verification"], "pinned fingerprint matches");

    env.ok(&["smtp", "set", "--pin-sha256", &"00".repeat(32)]);
    let check = env.panel(&["smtp", "check"]);
    assert_eq!(check.code, 1);
    assert!(check.stdout.contains("does not match the pinned"), "{}", check.stdout);
}

#[test]
fn wrong_password_is_a_configuration_error_and_the_fix_resends_the_message() {
    let Some(lab) = lab() else { return };
    let mut env = Env::new();
    let pw = env.password_args("wrong-password");
    let pw: Vec<&str> = pw.iter().map(String::as_str).collect();
    env.configure(&lab, lab.submission_port, "starttls", &pw);
    env.spawn(&["worker"]);
    let run = env.panel(&["smtp", "test", "--wait", "20", "--json"]);
    assert_eq!(run.code, 1, "not delivered: exit 1");
    let m = run.json();
    assert_eq!(state(&m), "failed");
    assert_eq!(m["failure_class"], "configuration");
    let a = &m["attempts"][0];
    assert_eq!(a["outcome"], "configuration_error");
    assert_eq!(a["stage"], "auth");
    assert_eq!(a["code"], 535);
    assert!(a["hint"].as_str().unwrap().contains("username or password"));
    assert!(!run.stdout.contains("wrong-password") && !run.stderr.contains("wrong-password"), "no secret in output");
    assert!(!env.service_logs().contains("wrong-password"), "no secret in logs");

    // Fixing the password releases the held message without a manual retry.
    std::fs::write(env.path().join("relay-password"), LAB_PASSWORD).unwrap();
    env.ok(&["smtp", "set", "--username", LAB_USER]);
    let id = m["id"].as_i64().unwrap();
    let m = env.wait_message(id, WAIT, |m| state(m) == "delivered");
    assert_eq!(m["attempts"].as_array().unwrap().len(), 2);
}

#[test]
fn a_550_recipient_fails_at_once_and_the_others_are_delivered() {
    let Some(lab) = lab() else { return };
    let mut env = Env::new();
    env.configure(&lab, lab.plain_port, "none", &[]);
    env.spawn(&["worker"]);
    let run = env.panel(&[
        "send",
        "--to",
        "reject-nobody@example.org",
        "--to",
        "alice@example.org",
        "--subject",
        "mixed recipients",
        "--text",
        "hello",
        "--wait",
        "20",
        "--json",
    ]);
    assert_eq!(run.code, 1);
    let m = run.json();
    assert_eq!(state(&m), "partly_failed", "one delivered, one refused for good");
    assert_eq!(m["attempts"].as_array().unwrap().len(), 1, "no retry for a 5xx");
    assert_eq!(m["attempts"][0]["outcome"], "partially_delivered");
    let rcpts = m["recipients"].as_array().unwrap();
    assert_eq!(rcpts[0]["address"], "reject-nobody@example.org");
    assert_eq!(rcpts[0]["state"], "failed");
    assert!(rcpts[0]["reply"].as_str().unwrap().starts_with("550 5.1.1"), "{rcpts:?}");
    assert_eq!(rcpts[1]["state"], "delivered");
    let mails = lab.wait_for_messages(m["message_id"].as_str().unwrap(), 1, WAIT);
    assert_eq!(mails.len(), 1);
    assert!(mails[0].contains("Delivered-To: alice@example.org"), "{}", mails[0]);
    let shown = env.ok(&["messages", "show", &m["id"].to_string()]).stdout;
    assert!(shown.contains("reject-nobody@example.org") && shown.contains("550"), "{shown}");
}

/// The refusal is not hidden by what happens to another recipient: a 550 for one recipient and
/// a 451 for another that is then delivered ends `partly_failed` (it ended `delivered`), seen
/// the same way by the CLI's exit code, the API, the dashboard and /metrics; a retry resends
/// to the refused recipient only.
#[test]
fn a_refusal_stays_visible_when_another_recipient_is_delivered_on_a_retry() {
    let Some(lab) = lab() else { return };
    let mut env = Env::new();
    env.configure(&lab, lab.plain_port, "none", &["--retry-schedule", "1s"]);
    lab.defer("later@example.org");
    let port = env.serve();
    let id = id_of(&env.ok(&[
        "send",
        "--to",
        "alice@example.org",
        "--to",
        "reject-gone@example.org",
        "--to",
        "later@example.org",
        "--subject",
        "three recipients",
        "--text",
        "x",
        "--json",
    ]));
    let m = env.wait_message(id, WAIT, |m| m["attempts"].as_array().unwrap().len() >= 2);
    assert_eq!(state(&m), "retrying", "later@ waits for its retry: {m:#}");
    lab.undefer("later@example.org");
    let m = env.wait_message(id, WAIT, |m| state(m) != "retrying" && state(m) != "sending");
    assert_eq!(state(&m), "partly_failed", "{m:#}");
    let by_address = |m: &serde_json::Value, a: &str| {
        m["recipients"].as_array().unwrap().iter().find(|r| r["address"] == a).unwrap()["state"].clone()
    };
    assert_eq!(by_address(&m, "alice@example.org"), "delivered");
    assert_eq!(by_address(&m, "later@example.org"), "delivered");
    assert_eq!(by_address(&m, "reject-gone@example.org"), "failed");
    assert!(m["last_error"].as_str().unwrap().contains("reject-gone@example.org"), "{m:#}");
    // Each recipient names the attempt that decided it.
    let decided =
        |a: &str| m["recipients"].as_array().unwrap().iter().find(|r| r["address"] == a).unwrap()["decided_by"].clone();
    assert_eq!((decided("alice@example.org"), decided("reject-gone@example.org")), (1.into(), 1.into()));
    let attempts = m["attempts"].as_array().unwrap().len();
    assert!(attempts >= 2);
    assert_eq!(decided("later@example.org"), attempts, "delivered by the last retry");

    // The CLI: not delivered to everyone is exit 1, with the refused recipient and its reply.
    let shown = env.panel(&[
        "send",
        "--to",
        "reject-x@example.org",
        "--to",
        "bob@example.org",
        "--subject",
        "s",
        "--text",
        "x",
        "--wait",
        "20",
    ]);
    assert_eq!(shown.code, 1, "{}", shown.stdout);
    assert!(shown.stdout.contains("reject-x@example.org: 550 5.1.1"), "{}", shown.stdout);
    // The API and the message log's filter, the dashboard, /metrics.
    let (status, body) = http(port, "GET", "/api/v1/messages?state=partly_failed", "");
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed:#}");
    let (_, body) = http(port, "GET", "/api/v1/dashboard", "");
    let dashboard: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dashboard["last_hour"]["partly_failed"], 2, "{dashboard:#}");
    assert_eq!(dashboard["queue"]["partly_failed"], 2, "{dashboard:#}");
    let (_, metrics) = http(port, "GET", "/metrics", "");
    assert!(metrics.contains("panel_messages{state=\"partly_failed\"} 2"), "{metrics}");

    // Retry all failed takes it, and resends to the refused recipient only.
    let (status, body) = http(port, "POST", "/api/v1/messages/retry", r#"{"status": "failed"}"#);
    assert_eq!(status, 200, "{body}");
    let m = env.wait_message(id, WAIT, |m| m["attempts"].as_array().unwrap().len() > attempts);
    let last = m["attempts"].as_array().unwrap().last().unwrap().clone();
    let sent_to: Vec<&str> =
        last["recipients"].as_array().unwrap().iter().map(|r| r["address"].as_str().unwrap()).collect();
    assert_eq!(sent_to, ["reject-gone@example.org"], "{last:#}");
    let m = env.wait_message(id, WAIT, |m| state(m) == "partly_failed");
    let message_id = m["message_id"].as_str().unwrap();
    assert_eq!(lab.wait_for_messages(message_id, 2, WAIT).len(), 2);
    assert_eq!(lab.messages_with(message_id).len(), 2, "one copy for each delivered recipient, none again");
}

#[test]
fn a_451_is_retried_and_delivered_once_lifted() {
    let Some(lab) = lab() else { return };
    let mut env = Env::new();
    env.configure(&lab, lab.plain_port, "none", &["--retry-schedule", "1s"]);
    lab.defer("later@example.org");
    env.spawn(&["worker"]);
    let id = id_of(&env.ok(&["send", "--to", "later@example.org", "--subject", "deferred", "--text", "x", "--json"]));
    let m = env.wait_message(id, WAIT, |m| m["attempts"].as_array().unwrap().len() >= 2);
    assert_eq!(state(&m), "retrying");
    assert_eq!(m["attempts"][0]["code"], 451);
    assert_eq!(m["attempts"][0]["outcome"], "temporary_failure");
    lab.undefer("later@example.org");
    let m = env.wait_message(id, WAIT, |m| state(m) == "delivered");
    assert_eq!(lab.wait_for_messages(m["message_id"].as_str().unwrap(), 1, WAIT).len(), 1);
}

#[test]
fn wrong_security_mode_for_the_port_gives_the_fix() {
    let Some(lab) = lab() else { return };
    let env = Env::new();
    env.configure(&lab, lab.plain_port, "tls", &[]);
    let check = env.panel(&["smtp", "check", "--json"]);
    assert_eq!(check.code, 1);
    let f = &check.json()["failure"];
    assert_eq!(f["class"], "configuration");
    assert!(f["hint"].as_str().unwrap().contains("--security starttls"), "{f}");

    env.configure(&lab, lab.smtps_port, "starttls", &[]);
    env.ok(&["smtp", "set", "--command-timeout", "2"]);
    let check = env.panel(&["smtp", "check", "--json"]);
    assert_eq!(check.code, 1);
    let f = &check.json()["failure"];
    assert_eq!(f["stage"], "greeting");
    assert!(f["hint"].as_str().unwrap().contains("--security tls"), "{f}");
    // Not a relay that is slow to greet, retried for a day: the port answered a TLS handshake.
    assert_eq!(f["class"], "configuration", "{f}");
    assert!(f["detail"].as_str().unwrap().contains("answers a TLS handshake"), "{f}");
}

#[test]
fn relay_down_means_retrying_then_delivered_when_it_is_back() {
    let Some(lab) = lab() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut proxy = Proxy::new(lab.plain_port);
    let mut env = Env::new();
    env.configure(&lab, proxy.port, "none", &["--retry-schedule", "1s"]);
    env.spawn(&["worker"]);
    let run = env.panel(&["smtp", "test", "--wait", "20", "--json"]);
    assert_eq!(run.code, 1);
    let m = run.json();
    assert_eq!(state(&m), "retrying");
    assert_eq!(m["attempts"][0]["stage"], "tcp");
    assert!(m["attempts"][0]["detail"].as_str().unwrap().contains("connection refused"));
    rt.block_on(proxy.start());
    let m = env.wait_message(m["id"].as_i64().unwrap(), WAIT, |m| state(m) == "delivered");
    assert_eq!(lab.wait_for_messages(m["message_id"].as_str().unwrap(), 1, WAIT).len(), 1);
}

#[test]
fn kill_9_of_the_worker_mid_queue_loses_nothing() {
    let Some(lab) = lab() else { return };
    let mut env = Env::new();
    env.configure(&lab, lab.plain_port, "none", &[]);
    // Enough that the kill lands mid-queue even when Postfix's Maildir lags behind its 250s
    // on a loaded machine (the tests run six at a time).
    const N: usize = 150;
    let mut ids = Vec::new();
    for i in 0..N {
        ids.push(id_of(&env.ok(&[
            "send",
            "--to",
            "bulk@example.org",
            "--subject",
            &format!("bulk-kill9 {i}"),
            "--text",
            "x",
            "--json",
        ])));
    }
    // Kill as soon as the relay accepted a few, watching Panel's own record from this process
    // (a `panel messages list` per look is too slow on a loaded machine: the worker finished
    // the queue between two looks; the Maildir lags behind the relay's 250s).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = format!("sqlite://{}", env.path().join("panel.db").display());
    let store = rt.block_on(panel_store::Store::open(&url)).unwrap();
    let delivered = || rt.block_on(store.queue_stats(chrono::Utc::now())).unwrap().delivered as usize;
    // `start`, not `spawn`: waiting for the worker to register would let it drain the queue.
    let pid = env.start(&["worker", "--concurrency", "2"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while delivered() < 3 {
        assert!(std::time::Instant::now() < deadline, "worker delivered nothing: {}", env.service_logs());
        std::thread::sleep(Duration::from_millis(2));
    }
    env.kill_9(pid);
    let delivered_before = delivered();
    assert!(delivered_before < N, "the kill came too late to prove anything");
    env.spawn(&["worker"]);
    for id in &ids {
        env.wait_message(*id, WAIT, |m| state(m) == "delivered");
    }
    let mails = lab.wait_for_messages("bulk-kill9", N, WAIT);
    let mut subjects: Vec<String> =
        mails.iter().map(|m| m.lines().find(|l| l.starts_with("Subject:")).unwrap().to_string()).collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), N, "every message arrived");
    let interrupted: i64 = ids.iter().map(|id| env.message(*id)["interrupted"].as_i64().unwrap()).sum();
    let duplicates = mails.len() - N;
    assert!(
        duplicates as i64 <= interrupted,
        "duplicates ({duplicates}) only where a worker died mid-send ({interrupted})"
    );
}

#[test]
fn a_settings_change_reaches_the_running_service_at_once() {
    let Some(lab) = lab() else { return };
    let mut env = Env::new();
    env.configure(&lab, lab.plain_port, "none", &[]);
    let port = panel_testlab::free_port().to_string();
    env.spawn(&["serve", "--listen", &format!("127.0.0.1:{port}")]);
    let first = env.ok(&["smtp", "test", "--wait", "20", "--json"]).json();
    assert_eq!(state(&first), "delivered");
    env.ok(&["smtp", "set", "--fallback-recipient", "new-fallback@example.org"]);
    let second = env.ok(&["smtp", "test", "--wait", "20", "--json"]).json();
    assert_eq!(state(&second), "delivered");
    let mail = &lab.wait_for_messages(second["message_id"].as_str().unwrap(), 1, WAIT)[0];
    assert!(mail.contains("To: new-fallback@example.org"), "{mail}");
    assert!(second["attempts"][0]["settings_version"].as_i64() > first["attempts"][0]["settings_version"].as_i64());
}

#[test]
fn ip_allow_listing_relays_for_loopback_only_and_unauthenticated_submission_is_denied() {
    let Some(lab) = lab() else { return };
    // Another source address gets 554 from the plain port.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reply = rt.block_on(async {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let stream = socket.connect(format!("127.0.0.1:{}", lab.plain_port).parse().unwrap()).await.unwrap();
        let mut io = BufReader::new(stream);
        let mut line = String::new();
        let mut last = String::new();
        for cmd in ["", "EHLO foreign.example\r\n", "MAIL FROM:<a@example.org>\r\n", "RCPT TO:<b@example.org>\r\n"] {
            io.get_mut().write_all(cmd.as_bytes()).await.unwrap();
            loop {
                line.clear();
                io.read_line(&mut line).await.unwrap();
                if line.as_bytes().get(3) != Some(&b'-') {
                    break;
                }
            }
            last = line.clone();
        }
        last
    });
    assert!(reply.starts_with("554 5.7.1") && reply.contains("Relay access denied"), "{reply}");

    // Panel on the submission port without credentials: denied, with the allow-list hint.
    let env = Env::new();
    env.configure(&lab, lab.submission_port, "starttls", &[]);
    let check = env.panel(&["smtp", "check", "--json"]);
    assert_eq!(check.code, 1);
    let f = &check.json()["failure"];
    assert_eq!(f["stage"], "rcpt");
    assert_eq!(f["code"], 554);
    assert!(f["hint"].as_str().unwrap().contains("allow-listed"), "{f}");
}

#[test]
fn without_a_running_service_the_test_message_waits_and_says_so() {
    let Some(lab) = lab() else { return };
    let mut env = Env::new();
    env.configure(&lab, lab.plain_port, "none", &[]);
    let run = env.ok(&["smtp", "test"]);
    assert!(run.stdout.contains("No Panel Service or worker is running"), "{}", run.stdout);
    let id: i64 = run.stdout.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert_eq!(state(&env.message(id)), "queued");
    env.spawn(&["worker"]);
    env.wait_message(id, WAIT, |m| state(m) == "delivered");
}

#[test]
fn dot_lines_utf8_and_html_arrive_intact() {
    let Some(lab) = lab() else { return };
    let mut env = Env::new();
    env.configure(&lab, lab.plain_port, "none", &[]);
    env.spawn(&["worker"]);
    let text = env.write("body.txt", "line one\n.\n.leading dot\nend\n");
    let html = env.write("body.html", "<p>Grüße</p>");
    let m = env
        .ok(&[
            "send",
            "--to",
            "Jörg Müller <joerg@example.org>",
            "--bcc",
            "hidden@example.org",
            "--subject",
            "Passwort läuft ab",
            "--text-file",
            text.to_str().unwrap(),
            "--html-file",
            html.to_str().unwrap(),
            "--wait",
            "20",
            "--json",
        ])
        .json();
    assert_eq!(state(&m), "delivered");
    let mails = lab.wait_for_messages(m["message_id"].as_str().unwrap(), 2, WAIT);
    assert_eq!(mails.len(), 2, "To and Bcc each get a copy");
    let mail = &mails[0];
    assert!(mail.contains("\n.\n.leading dot\n") || mail.contains("multipart/alternative"), "{mail}");
    assert!(mail.contains("multipart/alternative"));
    assert!(mail.contains("Subject: =?utf-8?b?"), "{mail}");
    assert!(!mail.to_ascii_lowercase().contains("bcc:"), "Bcc never in headers");
}

#[test]
fn while_the_relay_is_down_the_worker_backs_off_instead_of_trying_every_message() {
    let Some(lab) = lab() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut proxy = Proxy::new(lab.plain_port);
    let mut env = Env::new();
    env.configure(&lab, proxy.port, "none", &["--retry-schedule", "1s"]);
    let ids: Vec<i64> = (0..15)
        .map(|i| {
            id_of(&env.ok(&[
                "send",
                "--to",
                "ops@example.org",
                "--subject",
                &format!("outage {i}"),
                "--text",
                "x",
                "--json",
            ]))
        })
        .collect();
    env.spawn(&["worker"]);
    // Until the worker has backed off three times (1 s, 2 s, 4 s): by then it probed about
    // three times, not once per queued message.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while env.service_logs().matches("relay unreachable; backing off").count() < 3 {
        assert!(std::time::Instant::now() < deadline, "no backoff: {}", env.service_logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let list = env.ok(&["messages", "list", "--json"]).json();
    let attempts: i64 = list.as_array().unwrap().iter().map(|m| m["attempt_count"].as_i64().unwrap()).sum();
    assert!((1..=5).contains(&attempts), "{attempts} attempts while the relay was down");

    rt.block_on(proxy.start());
    for id in ids {
        env.wait_message(id, Duration::from_secs(60), |m| state(m) == "delivered");
    }
}

#[test]
fn dead_letters_are_listed_and_retried_in_bulk_and_json_logs_show_each_attempt() {
    let Some(lab) = lab() else { return };
    let mut env = Env::new();
    env.configure(&lab, lab.plain_port, "none", &[]);
    env.spawn(&["worker", "--log-format", "json"]);
    let ids: Vec<i64> = (0..3)
        .map(|i| {
            let to = format!("reject-{i}@example.org");
            id_of(&env.ok(&["send", "--to", &to, "--subject", "dead letter", "--text", "x", "--json"]))
        })
        .collect();
    for id in &ids {
        env.wait_message(*id, WAIT, |m| state(m) == "failed");
    }
    let failed = env.ok(&["messages", "list", "--status", "failed", "--json"]).json();
    assert_eq!(failed.as_array().unwrap().len(), 3);

    let r = env.ok(&["messages", "retry", "--status", "failed", "--since", "2099-01-01T00:00:00Z"]);
    assert!(r.stdout.contains("0 failed message(s)"), "{}", r.stdout);
    let r = env.panel(&["messages", "retry", "--status", "delivered"]);
    assert_eq!(r.code, 2);
    let r = env.ok(&["messages", "retry", "--status", "failed", "--since", "1h"]);
    assert!(r.stdout.contains("3 failed message(s) queued again"), "{}", r.stdout);
    for id in &ids {
        // Still refused by the relay: failed again, after a second attempt.
        env.wait_message(*id, WAIT, |m| state(m) == "failed" && m["attempts"].as_array().unwrap().len() == 2);
    }

    // One JSON object per attempt, with the message id, relay, stage and code.
    let logs = env.service_logs();
    let attempts: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "attempt")
        .collect();
    assert_eq!(attempts.len(), 6, "{logs}");
    let first = &attempts[0];
    assert!(ids.contains(&first["message_id"].as_i64().unwrap()), "{first}");
    assert_eq!(first["relay"], format!("127.0.0.1:{}", lab.plain_port));
    assert_eq!(first["stage"], "rcpt");
    assert_eq!(first["code"], 550);
}

#[test]
fn metrics_count_attempts_and_show_the_queue_and_the_delivery_time() {
    let Some(lab) = lab() else { return };
    let mut env = Env::new();
    env.configure(&lab, lab.plain_port, "none", &[]);
    let port = env.serve();
    let (status, body) = http(port, "POST", "/api/v1/smtp/test", r#"{"wait": 20}"#);
    assert_eq!(status, 202, "{body}");
    let (status, body) = http(
        port,
        "POST",
        "/api/v1/messages",
        r#"{"to": ["reject-x@example.org"], "subject": "s", "text": "t", "wait": 20}"#,
    );
    assert_eq!(status, 202, "{body}");
    let (status, text) = http(port, "GET", "/metrics", "");
    assert_eq!(status, 200);
    for line in [
        "panel_steps_enqueued_total{origin=\"test_message\"} 1",
        "panel_steps_enqueued_total{origin=\"mail_tester\"} 1",
        "panel_steps_claimed_total{origin=\"test_message\"} 1",
        "panel_attempts_total{outcome=\"delivered\",class=\"none\",code=\"250\"} 1",
        "panel_attempts_total{outcome=\"permanent_failure\",class=\"permanent\",code=\"550\"} 1",
        "panel_steps_finished_total{origin=\"mail_tester\",state=\"failed\"} 1",
        "panel_steps_finished_total{origin=\"test_message\",state=\"delivered\"} 1",
        "panel_delivery_seconds_count 1",
        "panel_messages{state=\"delivered\"} 1",
        "panel_messages{state=\"failed\"} 1",
        "panel_queue_depth 0",
        "panel_lease_expiries_total 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
    }
}
