//! The 2 a.m. story: a configuration error holds the mail, the admin fixes the cause wherever it
//! lies, and the held mail goes without a second command. The `panel` binary against a private
//! Postfix with SASL; the Maildir checked.

use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn send(env: &Env, to: &str, subject: &str) -> i64 {
    id_of(&env.ok(&["send", "--to", to, "--subject", subject, "--text", "Your reset link.", "--json"]))
}

fn held_at_auth(env: &Env, id: i64) -> Value {
    let m = env.wait_message(id, WAIT, |m| m["state"] == "failed");
    assert_eq!(m["failure_class"], "configuration", "{m:#}");
    let last = m["attempts"].as_array().unwrap().last().unwrap().clone();
    assert_eq!((last["stage"].as_str(), last["code"].as_i64()), (Some("auth"), Some(535)), "{m:#}");
    m
}

fn dashboard(port: u16) -> Value {
    let (status, body) = http(port, "GET", "/api/v1/dashboard", "");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn a_fixed_password_file_sends_the_held_mail_within_seconds() {
    let Some(lab) = PostfixLab::start() else { return };
    let mut env = Env::new();
    let pw = env.password_args("wrong-password");
    let pw: Vec<&str> = pw.iter().map(String::as_str).collect();
    env.configure(&lab, lab.submission_port, "starttls", &pw);
    let port = env.serve();

    let ids: Vec<i64> = (0..3).map(|i| send(&env, &format!("user{i}@example.org"), &format!("Reset {i}"))).collect();
    for id in &ids {
        held_at_auth(&env, *id);
    }
    let d = dashboard(port);
    assert_eq!(d["queue"]["held"], 3, "{d:#}");
    assert!(d["banner"].as_str().unwrap().contains("configuration error"), "{d:#}");

    // The fix lies outside Panel (the documented password file): no Panel command follows it.
    std::fs::write(env.path().join("relay-password"), LAB_PASSWORD).unwrap();
    let fixed = Instant::now();
    for id in &ids {
        let m = env.wait_message(*id, WAIT, |m| m["state"] == "delivered");
        assert_eq!(m["attempts"].as_array().unwrap().len(), 2, "{m:#}");
    }
    eprintln!("held mail delivered {:?} after the password file was fixed", fixed.elapsed());
    for i in 0..3 {
        lab.wait_for_messages(&format!("Subject: Reset {i}"), 1, WAIT);
    }
    let d = dashboard(port);
    assert_eq!(d["queue"]["held"], 0, "{d:#}");
    assert!(d["banner"].is_null(), "nothing is held any more: {d:#}");
    assert!(env.service_logs().contains("a file the relay settings read changed"));
}

#[test]
fn a_fix_on_the_relays_side_is_proven_by_a_passing_check_or_the_next_delivery() {
    let Some(lab) = PostfixLab::start() else { return };
    let mut env = Env::new();
    // The relay's admin has locked the account: Panel's password is right, the relay says 535.
    lab.set_password("locked-by-the-relay-admin");
    let pw = env.password_args(LAB_PASSWORD);
    let pw: Vec<&str> = pw.iter().map(String::as_str).collect();
    env.configure(&lab, lab.submission_port, "starttls", &pw);
    let worker = env.spawn(&["worker"]);
    let first: Vec<i64> = (0..2).map(|i| send(&env, "ann@example.org", &format!("Locked {i}"))).collect();
    for id in &first {
        held_at_auth(&env, *id);
    }

    // Unlocked on the relay: nothing in Panel changed, and a passing check proves the fix.
    lab.set_password(LAB_PASSWORD);
    let check = env.panel(&["smtp", "check"]);
    assert_eq!(check.code, 0, "{}{}", check.stdout, check.stderr);
    assert!(
        check.stdout.contains("2 message(s) held by a configuration error are sent again now."),
        "{}",
        check.stdout
    );
    for id in &first {
        env.wait_message(*id, WAIT, |m| m["state"] == "delivered");
    }

    // Locked and unlocked again: this time the next message that gets through proves it. (A
    // new worker, so that no connection authenticated before the lock is still open.)
    lab.set_password("locked-again");
    env.kill_9(worker);
    env.spawn(&["worker"]);
    let held = send(&env, "bo@example.org", "Locked again");
    held_at_auth(&env, held);
    lab.set_password(LAB_PASSWORD);
    let next = send(&env, "cy@example.org", "After the unlock");
    env.wait_message(next, WAIT, |m| m["state"] == "delivered");
    let m = env.wait_message(held, WAIT, |m| m["state"] == "delivered");
    assert_eq!(m["attempts"].as_array().unwrap().len(), 2, "{m:#}");
    lab.wait_for_messages("Subject: Locked again", 1, WAIT);
}

#[test]
fn a_retrying_message_is_sent_now_on_request_and_another_is_cancelled_with_who_and_why() {
    let Some(lab) = PostfixLab::start() else { return };
    let mut env = Env::new();
    // Retries an hour apart: anything delivered within the test was sent on request.
    env.configure(&lab, lab.plain_port, "none", &["--retry-schedule", "1h"]);
    // No pooled connection outlives a message: the lab's smtpd reads its deferrals at start.
    let config = std::fs::read_to_string(env.path().join("panel.toml")).unwrap();
    env.write("panel.toml", &config.replace("idle_connection = \"1s\"", "idle_connection = \"1ms\""));
    env.spawn(&["worker"]);
    let retrying = |id: i64| env.wait_message(id, WAIT, |m| m["state"] == "retrying");

    // One message, sent now once the recipient's server takes mail again.
    lab.defer("slow@example.org");
    let slow = send(&env, "slow@example.org", "Send me now");
    retrying(slow);
    lab.undefer("slow@example.org");
    let out = env.ok(&["messages", "retry", &slow.to_string()]);
    assert!(out.stdout.contains("to be sent now"), "{}", out.stdout);
    let m = env.wait_message(slow, WAIT, |m| m["state"] == "delivered");
    assert_eq!(m["attempts"].as_array().unwrap().len(), 2);

    // Every retrying message at once.
    lab.defer("later@example.org");
    let both: Vec<i64> = (0..2).map(|i| send(&env, "later@example.org", &format!("Bulk now {i}"))).collect();
    for id in &both {
        retrying(*id);
    }
    lab.undefer("later@example.org");
    let out = env.ok(&["messages", "retry", "--status", "retrying"]);
    assert!(out.stdout.contains("2 retrying message(s) are sent now."), "{}", out.stdout);
    for id in &both {
        env.wait_message(*id, WAIT, |m| m["state"] == "delivered");
    }

    // One that must not go at all: cancelled, final, with who and why.
    lab.defer("gone@example.org");
    let gone = send(&env, "gone@example.org", "Never send me");
    retrying(gone);
    let no_reason = env.panel(&["messages", "cancel", &gone.to_string(), "--reason", " "]);
    assert_eq!(no_reason.code, 2, "{}", no_reason.stderr);
    assert!(no_reason.stderr.contains("reason"), "{}", no_reason.stderr);
    assert_eq!(env.message(gone)["state"], "retrying", "a refused cancel changes nothing");
    let out = env.ok(&["messages", "cancel", &gone.to_string(), "--reason", "the account was deleted"]);
    assert!(out.stdout.contains("cancelled (it was retrying)"), "{}", out.stdout);
    let m = env.message(gone);
    assert_eq!(m["state"], "cancelled");
    let why = m["last_error"].as_str().unwrap();
    assert!(why.starts_with("cancelled by cli") && why.ends_with(": the account was deleted"), "{why}");
    let again = env.panel(&["messages", "retry", &gone.to_string()]);
    assert_eq!(again.code, 1, "{}{}", again.stdout, again.stderr);
    assert!(again.stderr.contains("is cancelled"), "{}", again.stderr);
    let audit = env.ok(&["audit", "list", "--json"]).json();
    assert!(audit.as_array().unwrap().iter().any(|e| e["action"] == "message.cancelled"), "{audit:#}");
    let shown = env.ok(&["messages", "show", &gone.to_string()]);
    assert!(shown.stdout.contains("cancelled"), "{}", shown.stdout);
    assert!(lab.messages_with("Never send me").is_empty());
}

#[test]
fn cancelling_and_sending_now_over_the_api_need_the_operator_role() {
    let mut env = Env::new();
    env.relay_on(panel_testlab::free_port(), &["--retry-schedule", "1h"]);
    let port = env.serve();
    let id = send(&env, "ann@example.org", "Over the API");
    env.wait_message(id, WAIT, |m| m["state"] == "retrying");
    let viewer = env.api_token("watcher", "viewer");
    let body = r#"{"reason": "not needed"}"#;
    let auth = format!("Authorization: Bearer {viewer}\r\n");
    let (status, _, _) = http_with(port, "POST", &format!("/api/v1/messages/{id}/cancel"), &auth, body);
    assert_eq!(status, 403);
    let (status, answer) = http(port, "POST", &format!("/api/v1/messages/{id}/cancel"), r#"{"reason": ""}"#);
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = http(port, "POST", "/api/v1/messages/retry", r#"{"status": "retrying"}"#);
    assert_eq!((status, answer.as_str()), (200, r#"{"requeued":1}"#));
    // Sent at once (to a closed port again), not in an hour; cancelled once it waits again.
    env.wait_message(id, WAIT, |m| m["state"] == "retrying" && m["attempts"].as_array().unwrap().len() == 2);
    let (status, answer) = http(port, "POST", &format!("/api/v1/messages/{id}/cancel"), body);
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = http(port, "POST", &format!("/api/v1/messages/{id}/cancel"), body);
    assert_eq!(status, 409, "{answer}");
    assert!(answer.contains("is cancelled"), "{answer}");
}

#[test]
fn a_failure_inside_panel_is_never_worded_as_the_relays_reply() {
    let Some(lab) = PostfixLab::start() else { return };
    let mut env = Env::new();
    // The variable is set nowhere: Panel fails at AUTH without the relay saying anything.
    let pw = ["--auth", "password", "--username", LAB_USER, "--password-env", "PANEL_TEST_UNSET_RELAY_PW"];
    env.configure(&lab, lab.submission_port, "starttls", &pw);
    let port = env.serve();
    let run = env.panel(&["smtp", "test", "--wait", "20"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("Panel itself, not the relay: environment variable PANEL_TEST_UNSET_RELAY_PW"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("said"), "no relay said anything: {}", run.stdout);
    let shown = env.ok(&["messages", "show", "1"]);
    assert!(shown.stdout.contains("Panel's own failure (not the relay's) at CONFIG"), "{}", shown.stdout);
    let d = dashboard(port);
    assert!(d["banner"].as_str().unwrap().contains("Panel's own configuration, not by the relay"), "{d:#}");
}

#[test]
fn smtp_check_runs_in_the_running_service_and_says_where_it_ran() {
    let Some(lab) = PostfixLab::start() else { return };
    let mut env = Env::new();
    let pw = ["--auth", "password", "--username", LAB_USER, "--password-env", "PANEL_TEST_RELAY_PW"];
    // With no service running, the CLI checks by itself and says so.
    env.configure(&lab, lab.submission_port, "starttls", &pw);
    let alone = env.panel(&["smtp", "check"]);
    assert!(alone.stdout.contains("from this CLI process (no Panel Service or worker is running)"), "{}", alone.stdout);

    // The service was started without the variable; the admin's shell has it.
    let worker = env.spawn(&["worker"]);
    let service = env.wait_for_pid(worker);
    env.vars.push(("PANEL_TEST_RELAY_PW".into(), LAB_PASSWORD.into()));
    let local = env.panel(&["smtp", "check", "--local"]);
    assert_eq!(local.code, 0, "the CLI's own environment passes: {}", local.stdout);
    assert!(local.stdout.contains("from this CLI process (--local)"), "{}", local.stdout);

    let remote = env.panel(&["smtp", "check"]);
    assert_eq!(remote.code, 1, "where delivery runs it fails: {}{}", remote.stdout, remote.stderr);
    assert!(remote.stdout.contains(&format!("from service {service}")), "{}", remote.stdout);
    assert!(
        remote.stdout.contains("PANEL_TEST_RELAY_PW (the relay password) is not set in this process"),
        "{}",
        remote.stdout
    );
    let json = env.panel(&["smtp", "check", "--json"]).json();
    assert_eq!(json["ran_in"], format!("service {service}"), "{json:#}");
    assert!(env.service_logs().contains("running the relay check a CLI asked for"));
}

/// Polls `panel services list --json` until the first service satisfies `pred`; returns it.
/// The CLI reads `cli.toml`, so that it runs while the service's file is being broken.
fn wait_service(env: &Env, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    let config = env.path().join("cli.toml");
    loop {
        let list = env.ok(&["--config", config.to_str().unwrap(), "services", "list", "--json"]).json();
        if let Some(s) = list.as_array().and_then(|l| l.first()).filter(|s| pred(s)) {
            return s.clone();
        }
        assert!(Instant::now() < deadline, "{what}; services: {list:#}\nlogs:\n{}", env.service_logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_changed_config_file_is_noticed_authorities_apply_at_once_and_the_rest_asks_for_a_restart() {
    let mut env = Env::new();
    env.relay_on(panel_testlab::free_port(), &[]);
    let untrusting = std::fs::read_to_string(env.path().join("panel.toml")).unwrap();
    env.write("cli.toml", &untrusting);
    // The key is added by a CLI that trusts its authority; the service starts without it.
    env.license();
    let trusting = std::fs::read_to_string(env.path().join("panel.toml")).unwrap();
    env.write("panel.toml", &untrusting);
    let port = env.serve();
    let service = wait_service(&env, "the service registers", |_| true);
    assert!(service["config_file"].as_str().unwrap().ends_with("panel.toml"), "{service:#}");
    assert_eq!(service["authorities"], serde_json::json!([]), "{service:#}");
    let (_, body) = http(port, "GET", "/api/v1/licenses", "");
    let licenses: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(licenses[0]["verified"], false, "{licenses:#}");
    assert!(licenses[0]["problem"].as_str().unwrap().starts_with("not verified by this service"), "{licenses:#}");
    assert_eq!(licenses[0]["expires_at"], Value::Null);

    // The authority is added to the file: the running service trusts it within seconds.
    env.write("panel.toml", &trusting);
    let service = wait_service(&env, "the authority is loaded", |s| s["authorities"].as_array().unwrap().len() == 1);
    assert_eq!(service["config_note"], Value::Null, "{service:#}");
    let (_, body) = http(port, "GET", "/api/v1/licenses", "");
    let licenses: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((licenses[0]["verified"].as_bool(), licenses[0]["valid"].as_bool()), (Some(true), Some(true)));
    assert!(env.service_logs().contains("license authorities reloaded"), "{}", env.service_logs());

    // A change that needs a restart is named where the admin looks, until it is undone.
    env.write("panel.toml", &trusting.replace("lease = \"3s\"", "lease = \"5s\""));
    let service = wait_service(&env, "a restart is asked for", |s| !s["config_note"].is_null());
    let note = service["config_note"].as_str().unwrap();
    assert!(note.starts_with("restart needed: [worker] changed in"), "{note}");
    assert!(env.ok(&["services", "list"]).stdout.contains("restart needed: [worker]"));
    let (_, body) = http(port, "GET", "/api/v1/dashboard", "");
    assert!(body.contains("restart needed: [worker]"), "{body}");
    let check = env.panel(&["smtp", "check", "--json"]);
    let ran_in = check.json()["ran_in"].as_str().unwrap().to_string();
    assert!(ran_in.starts_with("service ") && ran_in.contains("restart needed: [worker]"), "{ran_in}");

    // A file that does not parse changes nothing and says so; SIGHUP re-reads it at once.
    env.write("panel.toml", "[worker\n");
    let service = wait_service(&env, "a broken file is reported", |s| {
        s["config_note"].as_str().is_some_and(|n| n.contains("still running with the file as it was loaded"))
    });
    assert_eq!(service["authorities"].as_array().unwrap().len(), 1, "the loaded trust stays");
    env.write("panel.toml", &trusting);
    env.signal(service["pid"].as_u64().unwrap() as u32, "HUP");
    wait_service(&env, "the fixed file is read again", |s| s["config_note"].is_null());
    assert!(env.service_logs().contains("SIGHUP: re-reading the config file"), "{}", env.service_logs());

    // The service's threads are its runtime's, made at start: a change waits for a restart too.
    env.write("panel.toml", &format!("threads = 3\n{trusting}"));
    let service = wait_service(&env, "a threads change asks for a restart", |s| !s["config_note"].is_null());
    let note = service["config_note"].as_str().unwrap();
    assert!(note.starts_with("restart needed: threads changed in"), "{note}");
}
