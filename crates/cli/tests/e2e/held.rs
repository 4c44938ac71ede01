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
