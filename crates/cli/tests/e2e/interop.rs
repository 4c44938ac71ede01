//! Beyond Postfix: the same deliveries against a private Exim 4.96 (plain relay, opportunistic
//! and required STARTTLS with AUTH, implicit TLS), its real `452` past `recipients_max` and its
//! SIZE limit; OpenSMTPD 6.8 as a plain relay on IPv4 and IPv6; and every session ends cleanly
//! (both log a session that ended without QUIT).

use std::time::Duration;

use crate::common::*;
use panel_testlab::{EXIM_RECIPIENTS_MAX, EXIM_SIZE_LIMIT, EximLab, OpenSmtpdLab};

const WAIT: Duration = Duration::from_secs(20);

fn relay(env: &Env, lab: &EximLab, host: &str, port: u16, security: &str, auth: bool) {
    let ca = lab.ca_file.display().to_string();
    let mut args = vec!["--command-timeout", "5", "--retry-schedule", "1h"];
    if security != "none" {
        args.extend(["--ca-file", &ca, "--tls-server-name", "localhost"]);
    }
    let password = env.password_args(LAB_PASSWORD);
    if auth {
        args.extend(password.iter().map(String::as_str));
    } else {
        args.extend(["--auth", "none"]);
    }
    env.smtp_set_on(host, port, security, &args);
}

#[test]
fn exim_delivers_in_every_mode_and_every_session_ends_cleanly() {
    let Some(lab) = EximLab::start() else { return };
    let mut env = Env::new();
    env.spawn(&["worker"]);
    let mut matrix = Vec::new();
    for (host, port, security, auth) in [
        ("127.0.0.1", lab.plain_port, "none", false),
        ("::1", lab.plain_port, "none", false),
        ("127.0.0.1", lab.plain_port, "opportunistic", false),
        ("127.0.0.1", lab.submission_port, "starttls", true),
        ("127.0.0.1", lab.smtps_port, "tls", true),
    ] {
        relay(&env, &lab, host, port, security, auth);
        let check = env.panel(&["smtp", "check", "--json"]);
        assert_eq!(check.code, 0, "{security}: {}\n{}", check.stdout, lab.log());
        let m = env.ok(&["smtp", "test", "--wait", "20", "--json"]).json();
        assert_eq!(m["state"], "delivered", "{security}: {m:#}\n{}", lab.log());
        let id = m["message_id"].as_str().unwrap().trim_matches(['<', '>']).to_string();
        let mails = lab.wait_for_messages(&id, 1, WAIT);
        assert_eq!(mails.len(), 1, "{security}: {}", lab.log());
        assert!(mails[0].contains("From: Identity Panel <panel@example.org>"), "{}", mails[0]);
        let auth = if auth { " + AUTH PLAIN" } else { "" };
        matrix.push(format!("exim 4.96 | {host} port {port}, {security}{auth} | delivered"));
    }
    eprintln!("{}", matrix.join("\n"));
    // Pooled connections are retired with QUIT after idle_connection; `smtp test` ran in the
    // CLI, which ends its connection itself. Exim logs any session dropped without QUIT or
    // without a TLS close.
    let deadline = std::time::Instant::now() + WAIT;
    let opened = |log: &str| log.matches("(TCP/IP connection count").count();
    while lab.log().matches("closed by QUIT").count() < opened(&lab.log()) {
        assert!(std::time::Instant::now() < deadline, "sessions not ended with QUIT:\n{}", lab.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = lab.log();
    for bad in ["non-properly terminated", "unexpected disconnection", "lost while reading"] {
        assert!(!log.contains(bad), "{bad}:\n{log}");
    }
    assert!(log.matches("TLS error").count() == 0, "{log}");
}

#[test]
fn exims_recipient_limit_and_size_limit_are_real_replies_handled_per_recipient() {
    let Some(lab) = EximLab::start() else { return };
    let mut env = Env::new();
    relay(&env, &lab, "127.0.0.1", lab.plain_port, "none", false);
    env.spawn(&["worker"]);
    // One more recipient than Exim takes in a transaction: the last gets Exim's real 452 and
    // goes at once in a second transaction of the same attempt (RFC 5321 4.5.3.1.10).
    let mut args = vec!["send", "--subject", "limits", "--text", "x", "--json"];
    let to: Vec<String> = (0..=EXIM_RECIPIENTS_MAX).map(|i| format!("user{i}@example.org")).collect();
    for t in &to {
        args.extend(["--to", t]);
    }
    let id = id_of(&env.ok(&args));
    let m = env.wait_message(id, WAIT, |m| m["state"] == "delivered");
    assert_eq!(m["attempts"].as_array().unwrap().len(), 1, "no retry delay: {m:#}");
    let states: Vec<&str> = m["recipients"].as_array().unwrap().iter().map(|r| r["state"].as_str().unwrap()).collect();
    assert_eq!(states.iter().filter(|s| **s == "delivered").count(), EXIM_RECIPIENTS_MAX + 1, "{m:#}");
    let accepted = lab.log().matches("<= panel@example.org").count();
    assert_eq!(accepted, 2, "two transactions in Exim's log: {}", lab.log());
    // Bigger than Exim's SIZE: refused before MAIL, permanently, with the limit named.
    let big = env.write("big.txt", &"x".repeat(EXIM_SIZE_LIMIT as usize + 10_000));
    let id = id_of(&env.ok(&[
        "send",
        "--to",
        "a@example.org",
        "--subject",
        "big",
        "--text-file",
        big.to_str().unwrap(),
        "--json",
    ]));
    let m = env.wait_message(id, WAIT, |m| m["state"] == "failed");
    assert!(m["last_error"].as_str().unwrap().contains(&format!("at most {EXIM_SIZE_LIMIT}")), "{m:#}");
    assert!(!lab.log().contains("big"), "nothing was transferred: {}", lab.log());
}

#[test]
fn opensmtpd_relays_on_ipv4_and_ipv6_and_every_session_ends_with_quit() {
    let Some(lab) = OpenSmtpdLab::start() else { return };
    let mut env = Env::new();
    env.spawn(&["worker"]);
    for host in ["127.0.0.1", "::1"] {
        let port = lab.port.to_string();
        env.smtp_set_on(host, lab.port, "none", &[]);
        env.ok(&["smtp", "set", "--from", "Doe, John (Ops) <panel@example.org>"]);
        assert_eq!(env.panel(&["smtp", "check"]).code, 0, "{}", lab.log());
        let m = env.ok(&["smtp", "test", "--wait", "20", "--json"]).json();
        assert_eq!(m["state"], "delivered", "{host}: {m:#}\n{}", lab.log());
        let id = m["message_id"].as_str().unwrap().trim_matches(['<', '>']).to_string();
        let mails = lab.wait_for_messages(&id, 1, WAIT);
        assert_eq!(mails.len(), 1, "{host}: {}", lab.log());
        assert!(mails[0].contains("From: \"Doe, John (Ops)\" <panel@example.org>"), "{}", mails[0]);
        eprintln!("opensmtpd 6.8 | {host} port {port}, none | delivered");
    }
    // Every session OpenSMTPD saw ended with QUIT (the pool's after idle_connection).
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let log = lab.log();
        let (opened, quit) = (log.matches("smtp connected").count(), log.matches("disconnected reason=quit").count());
        if opened > 0 && quit == opened {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{quit} of {opened} sessions ended with QUIT:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
