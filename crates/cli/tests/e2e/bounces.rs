//! After the relay's 250: a real Postfix relay accepts the message, a second, "remote" Postfix
//! behind it refuses a recipient, the relay bounces it to the bounce domain, which it routes to
//! Panel's bounce listener, and the message log says who refused it and what they said.

use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

use panel_testlab::{PostfixLab, REJECT_PREFIX, free_port};
use serde_json::Value;

use crate::common::*;

const DOMAIN: &str = "bounces.panel.test";
const WAIT: Duration = Duration::from_secs(30);

/// One SMTP transaction to `port`, the way a remote server's bounce arrives; the replies.
pub(crate) fn smtp_deliver(port: u16, rcpt: &str, body: &str) -> Vec<String> {
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut w = stream;
    let mut replies = Vec::new();
    let mut read = |replies: &mut Vec<String>| loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            replies.push(line.trim_end().to_string());
            break;
        }
    };
    read(&mut replies);
    for cmd in ["EHLO mx.example.net".to_string(), "MAIL FROM:<>".into(), format!("RCPT TO:<{rcpt}>")] {
        write!(w, "{cmd}\r\n").unwrap();
        read(&mut replies);
    }
    if replies.last().is_some_and(|r| r.starts_with("250")) {
        write!(w, "DATA\r\n").unwrap();
        read(&mut replies);
        let body = body.replace('\n', "\r\n").replace("\r\r\n", "\r\n");
        write!(w, "{body}\r\n.\r\n").unwrap();
        read(&mut replies);
    }
    write!(w, "QUIT\r\n").unwrap();
    replies
}

fn recipient<'a>(m: &'a Value, address: &str) -> &'a Value {
    m["recipients"].as_array().unwrap().iter().find(|r| r["address"] == address).unwrap()
}

/// The VERP address a copy of a message was sent with (its Return-Path at the remote side).
fn return_path(copy: &str) -> String {
    let line = copy.lines().find(|l| l.starts_with("Return-Path:")).expect("a Return-Path");
    line.trim_start_matches("Return-Path:").trim().trim_matches(['<', '>']).to_string()
}

#[test]
fn a_recipient_refused_behind_the_relay_shows_as_bounced_with_the_remote_reply_within_seconds() {
    let Some(remote) = PostfixLab::start() else { return };
    let Some(relay) = PostfixLab::start_relaying_to(remote.plain_port) else { return };
    let mut env = Env::new();
    let listen = free_port();
    // The relay hands bounces to the listener over TLS only (STARTTLS, the listener's own certificate).
    relay.route_domain(DOMAIN, listen, true);
    relay.accept_every_recipient();
    let certs = env.path().join("listener-tls");
    std::fs::create_dir_all(&certs).unwrap();
    panel_testlab::make_certificates(&certs);
    let (cert, key) = (certs.join("server.pem"), certs.join("server.key"));
    env.configure(&relay, relay.plain_port, "none", &["--bounce-domain", DOMAIN]);
    let port = env.serve_with(&[
        "--bounce-listen",
        &format!("127.0.0.1:{listen}"),
        "--bounce-tls-cert",
        cert.to_str().unwrap(),
        "--bounce-tls-key",
        key.to_str().unwrap(),
    ]);
    let check = env.ok(&["smtp", "check"]).stdout;
    assert!(check.contains(&format!("bounces+0-check@{DOMAIN}")), "the check tries the VERP sender: {check}");

    // Two recipients: the relay takes both; the remote server takes alice and refuses bob.
    let bob = format!("{REJECT_PREFIX}bob@example.net");
    let id = id_of(&env.ok(&[
        "send",
        "--to",
        "alice@example.net",
        "--to",
        &bob,
        "--subject",
        "Reset your password",
        "--text",
        "x",
        "--json",
    ]));
    // The bounce may come before this test looks: the relay's 250 is in the attempt either way.
    let delivered = env.wait_message(id, WAIT, |m| m["attempts"].as_array().is_some_and(|a| !a.is_empty()));
    assert_eq!(delivered["attempts"][0]["outcome"], "delivered", "{delivered:#}");
    let accepted_at = Instant::now();
    let deadline = Instant::now() + WAIT;
    while recipient(&env.message(id), &bob)["state"] != "bounced" {
        assert!(Instant::now() < deadline, "no bounce; the relay's log:\n{}\n{}", relay.log(), env.service_logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = env.message(id);
    let bounced_after = accepted_at.elapsed();
    assert_eq!(m["state"], "partly_failed", "alice has it, bob's server refused it: {m:#}");
    assert_eq!(recipient(&m, "alice@example.net")["state"], "delivered");
    let reply = recipient(&m, &bob)["reply"].as_str().unwrap();
    assert!(reply.contains("550 5.1.1") && reply.contains("from 127.0.0.1"), "{reply}");
    let b = &m["bounces"][0];
    assert_eq!(
        (b["kind"].as_str(), b["status"].as_str(), b["recipient"].as_str()),
        (Some("failed"), Some("5.1.1"), Some(bob.as_str()))
    );
    let at = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    eprintln!(
        "bounce: the relay's 250 -> the bounce in the message log: {} ms (seen by this test after {} ms)",
        (at(&b["received_at"]) - at(&delivered["attempts"][0]["finished_at"])).num_milliseconds(),
        bounced_after.as_millis()
    );
    assert!(
        relay.log().contains(&format!("TLS connection established to 127.0.0.1[127.0.0.1]:{listen}")),
        "{}",
        relay.log()
    );
    let shown = env.ok(&["messages", "show", &id.to_string()]).stdout;
    assert!(shown.contains("After the relay's 250:") && shown.contains("bounced by 127.0.0.1: 550 5.1.1"), "{shown}");

    // The copy alice got carries the signed VERP sender; the relay was asked for a DSN.
    let copy = remote.wait_for_messages("Reset your password", 1, WAIT).remove(0);
    let verp = return_path(&copy);
    assert!(verp.starts_with(&format!("bounces+{id}-")) && verp.ends_with(DOMAIN), "{verp}");

    // One recipient, refused: the message is bounced; the dashboard and /metrics count it.
    let carol = format!("{REJECT_PREFIX}carol@example.net");
    let id2 = id_of(&env.ok(&["send", "--to", &carol, "--subject", "Welcome", "--text", "x", "--json"]));
    env.wait_message(id2, WAIT, |m| m["state"] == "bounced");
    let (_, d) = http(port, "GET", "/api/v1/dashboard", "");
    let d: Value = serde_json::from_str(&d).unwrap();
    assert_eq!(d["last_day"]["bounced"], 1, "{d:#}");
    let metrics = http(port, "GET", "/metrics", "").1;
    assert!(metrics.contains("panel_bounces_total{kind=\"failed\"} 2"), "{metrics}");
    assert!(metrics.contains("panel_messages{state=\"bounced\"} 1"), "{metrics}");

    // An out-of-office reply to the same VERP address: kept with the message, not a bounce.
    let away = "From: Alice <alice@example.net>\nSubject: Automatic reply: Reset your password\nAuto-Submitted: auto-replied\n\nI am away until Monday.";
    let replies = smtp_deliver(listen, &verp, away);
    assert!(replies.last().unwrap().starts_with("250"), "{replies:?}");
    let m = env.message(id);
    assert_eq!(m["bounces"].as_array().unwrap().last().unwrap()["kind"], "auto_reply", "{m:#}");
    assert_eq!(recipient(&m, "alice@example.net")["state"], "delivered", "an auto-reply is not a bounce");

    // A forged bounce (a made-up token for this message) changes nothing and is kept unmatched.
    let forged = verp.replace(&verp[verp.find('-').unwrap() + 1..verp.find('@').unwrap()], "00000000000000000000");
    let dsn = "From: MAILER-DAEMON@evil.example\nSubject: Undelivered Mail Returned to Sender\nContent-Type: text/plain\n\n<alice@example.net>: 550 5.1.1 user unknown";
    assert!(smtp_deliver(listen, &forged, dsn).last().unwrap().starts_with("250"));
    assert_eq!(recipient(&env.message(id), "alice@example.net")["state"], "delivered", "a forgery marks nothing");
    let unmatched = env.ok(&["bounces", "list", "--unmatched", "--json"]).json();
    assert_eq!(unmatched.as_array().unwrap().len(), 1, "{unmatched:#}");
    assert!(unmatched[0]["reason"].as_str().unwrap().contains("does not verify"), "{unmatched:#}");
    assert!(unmatched[0]["message_id"].is_null());

    // The listener never relays: mail for any other domain is refused.
    let replies = smtp_deliver(listen, "someone@example.org", "Subject: relay me\n\nx");
    assert!(replies.last().unwrap().starts_with("550 5.7.1"), "{replies:?}");
}

#[test]
fn without_dsn_at_the_relay_the_verp_address_still_matches_a_non_standard_bounce() {
    let mut env = Env::new();
    let sink = panel_testlab::RecordingSink::start();
    let listen = free_port();
    env.relay_on(sink.port, &["--bounce-domain", DOMAIN]);
    // A workflow that tells the identity team which mail attribute went stale.
    let text = env.write("stale.txt", "{{ object.recipient }} bounced: {{ object.diagnostic }}\n");
    env.ok(&["template", "set", "stale", "--subject", "Stale mail attribute", "--text-file", text.to_str().unwrap()]);
    let def = serde_json::json!({"name": "stale-mail", "enabled": true, "trigger": "message.bounced",
        "steps": [{"kind": "email", "template": "stale", "to": ["idm@example.org"], "cc": [], "bcc": []}]});
    let file = env.write("stale.json", &def.to_string());
    env.ok(&["workflow", "create", "--file", file.to_str().unwrap()]);
    env.serve_with(&["--bounce-listen", &format!("127.0.0.1:{listen}")]);
    let id = id_of(&env.ok(&["send", "--to", "dave@example.net", "--subject", "Reset", "--text", "x", "--json"]));
    env.wait_message(id, WAIT, |m| m["state"] == "delivered");
    // The sink offers no DSN: MAIL FROM is the VERP address, without DSN parameters.
    let mail = sink.mail_commands().pop().unwrap();
    assert!(mail.starts_with(&format!("MAIL FROM:<bounces+{id}-")) && !mail.contains("RET="), "{mail}");
    let verp = mail.trim_start_matches("MAIL FROM:<").split('>').next().unwrap().to_string();

    // A qmail-style bounce, no DSN part: matched by its VERP address, the recipient named in it.
    let qmail = "From: MAILER-DAEMON@mx.example.net\nSubject: failure notice\n\nHi. This is the qmail-send program at mx.example.net.\n<dave@example.net>:\nSorry, no mailbox here by that name. (#5.1.1)";
    assert!(smtp_deliver(listen, &verp, qmail).last().unwrap().starts_with("250"));
    let m = env.wait_message(id, WAIT, |m| m["state"] == "bounced");
    assert!(recipient(&m, "dave@example.net")["reply"].as_str().unwrap().contains("#5.1.1"), "{m:#}");
    let runs = env.ok(&["workflow", "history", "stale-mail", "--json"]).json();
    let run_message = runs[0]["messages"][0]["id"].as_i64().expect("the workflow ran on the bounce");
    let told = env.wait_message(run_message, WAIT, |m| m["state"] == "delivered");
    assert_eq!(told["to"][0], "idm@example.org");
    assert!(sink.wait_for(2, WAIT).iter().any(|d| d.contains("dave@example.net bounced: Sorry, no mailbox")));
    // Without a bounce domain nothing changes on the wire.
    env.ok(&["smtp", "set", "--bounce-domain", ""]);
    let id = id_of(&env.ok(&["send", "--to", "erin@example.net", "--subject", "Plain", "--text", "x", "--json"]));
    env.wait_message(id, WAIT, |m| m["state"] == "delivered");
    assert_eq!(sink.mail_commands().pop().unwrap(), "MAIL FROM:<panel@example.org>");
}

/// Appends `[bounces]` for the Dovecot lab's mailbox to the Env's config file.
fn read_mailbox_of(env: &Env, lab: &panel_testlab::DovecotLab, url: &str) {
    let password = env.write("imap-password", panel_testlab::IMAP_PASSWORD);
    let config = env.path().join("panel.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[bounces]\nimap_url = \"{url}\"\nimap_password_file = \"{}\"\nimap_ca_file = \"{}\"\ninterval = \"5s\"\n",
        password.display(),
        lab.ca_file.display()
    ));
    std::fs::write(config, text).unwrap();
}

/// A DSN for `message_id`, as a relay writes it to the From mailbox, refusing `recipient`.
fn dsn_for(message_id: &str, recipient: &str) -> String {
    format!(
        "From: MAILER-DAEMON@relay.example.org\nTo: panel@example.org\nSubject: Undelivered Mail Returned to Sender\nMIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\n\n--B\nContent-Type: text/plain\n\nYour message could not be delivered.\n\n--B\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; relay.example.org\n\nFinal-Recipient: rfc822; {recipient}\nAction: failed\nStatus: 5.2.1\nRemote-MTA: dns; mx.example.net\nDiagnostic-Code: smtp; 550 5.2.1 mailbox disabled\n\n--B\nContent-Type: text/rfc822-headers\n\nFrom: Identity Panel <panel@example.org>\nMessage-ID: {message_id}\nSubject: Reset\n\n--B--\n"
    )
}

/// A DSN for `message_id` whose one recipient is `action` (failed, delayed).
fn dsn_with(message_id: &str, recipient: &str, action: &str) -> String {
    dsn_for(message_id, recipient).replace("Action: failed", &format!("Action: {action}"))
}

#[test]
fn bounces_in_the_from_mailbox_are_read_over_imap_matched_moved_and_the_rest_left_alone() {
    let Some(lab) = panel_testlab::DovecotLab::start() else { return };
    let mut env = Env::new();
    let sink = panel_testlab::RecordingSink::start();
    env.relay_on(sink.port, &[]);
    // This service started before the mailbox was configured: only the CLI reads it, so each
    // pass below is the test's own.
    env.serve();
    let id = id_of(&env.ok(&["send", "--to", "frank@example.net", "--subject", "Reset", "--text", "x", "--json"]));
    let m = env.wait_message(id, WAIT, |m| m["state"] == "delivered");
    let message_id = m["message_id"].as_str().unwrap().to_string();
    // STARTTLS (required) on the IMAP port; the folder is the INBOX.
    let starttls = format!("imap://{}@localhost:{}", panel_testlab::IMAP_USER.replace('@', "%40"), lab.imap_port);
    read_mailbox_of(&env, &lab, &starttls);

    // The mailbox holds its bounce, an out-of-office reply and a bounce of mail Panel never sent.
    lab.deliver(&dsn_for(&message_id, "frank@example.net"));
    lab.deliver("From: Grace <grace@example.net>\nTo: panel@example.org\nSubject: Automatic reply: Reset\nAuto-Submitted: auto-replied\n\nAway.\n");
    lab.deliver(&dsn_for("<not-ours@elsewhere.example>", "heidi@example.net"));
    let pass = env.ok(&["bounces", "fetch", "--json"]).json();
    assert_eq!(
        (pass["read"].as_i64(), pass["matched"].as_i64(), pass["left"].as_i64()),
        (Some(3), Some(1), Some(2)),
        "{pass}"
    );
    let m = env.message(id);
    assert_eq!(m["state"], "bounced", "{m:#}");
    assert!(recipient(&m, "frank@example.net")["reply"].as_str().unwrap().contains("550 5.2.1 mailbox disabled"));
    assert_eq!(m["bounces"][0]["remote_mta"], "mx.example.net");
    // What matched is moved away; the rest stays where it was, and is not read again.
    assert_eq!((lab.count("Panel/Bounces"), lab.count("")), (1, 2), "{}", lab.log());
    let again = env.ok(&["bounces", "fetch", "--json"]).json();
    assert_eq!(again["read"], 0, "{again}");
    let unmatched = env.ok(&["bounces", "list", "--unmatched", "--json"]).json();
    let reasons: Vec<&str> = unmatched.as_array().unwrap().iter().map(|b| b["reason"].as_str().unwrap()).collect();
    assert!(reasons.iter().any(|r| r.contains("no stored message has the Message-ID")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("returns no Message-ID")), "the auto-reply: {reasons:?}");

    // A service started with the mailbox configured reads it by itself (every 5 s here): a
    // delay notice makes the recipient delayed, the failure that follows bounced.
    env.serve();
    let id = id_of(&env.ok(&["send", "--to", "ivan@example.net", "--subject", "Reset", "--text", "x", "--json"]));
    let m = env.wait_message(id, WAIT, |m| m["state"] == "delivered");
    let ivan = m["message_id"].as_str().unwrap().to_string();
    lab.deliver(&dsn_with(&ivan, "ivan@example.net", "delayed"));
    let m = env.wait_message(id, WAIT, |m| recipient(m, "ivan@example.net")["state"] == "delayed");
    assert_eq!(m["state"], "delivered", "a delay is not a failure: {m:#}");
    lab.deliver(&dsn_with(&ivan, "ivan@example.net", "failed"));
    env.wait_message(id, WAIT, |m| m["state"] == "bounced");

    // Over IMAPS the same mailbox is read on from where it was left.
    let config = env.path().join("panel.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let imaps = format!("imaps://{}@localhost:{}", panel_testlab::IMAP_USER.replace('@', "%40"), lab.imaps_port);
    std::fs::write(&config, text.replace(&starttls, &imaps)).unwrap();
    assert_eq!(env.ok(&["bounces", "fetch", "--json"]).json()["read"], 0);
    // A wrong password is an error that names the mailbox and the server's words, not the password.
    env.write("imap-password", "Wr0ng-Pa55word-x7");
    let r = env.panel(&["bounces", "fetch"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("signing in as bounces@panel.test failed") && !r.stderr.contains("Wr0ng-Pa55word-x7"),
        "{}",
        r.stderr
    );
}

#[test]
fn the_mailbox_is_read_with_a_stored_microsoft_app_signing_in_by_xoauth2() {
    const SECRET: &str = "client-Secret-imap";
    let tokens = panel_testlab::TokenServer::microsoft("client-1", SECRET, Duration::from_secs(3600));
    tokens.introspect_as(panel_testlab::IMAP_USER);
    let Some(lab) = panel_testlab::DovecotLab::start_with_oauth(&tokens.introspection_url()) else { return };
    let mut env = Env::new();
    env.license();
    crate::oauth::store_microsoft(&env, SECRET);
    let sink = panel_testlab::RecordingSink::start();
    env.relay_on(sink.port, &[]);
    env.serve();
    let id = id_of(&env.ok(&["send", "--to", "judy@example.net", "--subject", "Reset", "--text", "x", "--json"]));
    let m = env.wait_message(id, WAIT, |m| m["state"] == "delivered");
    let config = env.path().join("panel.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[bounces]\nimap_url = \"imaps://{}@localhost:{}\"\nimap_credential = \"m365\"\nimap_token_endpoint = \"{}\"\nimap_ca_file = \"{}\"\n",
        panel_testlab::IMAP_USER.replace('@', "%40"),
        lab.imaps_port,
        tokens.url(),
        lab.ca_file.display()
    ));
    std::fs::write(&config, text).unwrap();
    lab.deliver(&dsn_for(m["message_id"].as_str().unwrap(), "judy@example.net"));
    let pass = env.ok(&["bounces", "fetch", "--json"]).json();
    assert_eq!(pass["matched"], 1, "{pass}\n{}", lab.log());
    assert_eq!(env.message(id)["state"], "bounced");
    assert_eq!(tokens.issued(), 1, "one token, for the mailbox");
    // The app's secret was rotated at the provider: no token, and the provider's words say why.
    tokens.set_client_secret("rotated-secret");
    let r = env.panel(&["bounces", "fetch"]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(r.stderr.contains("AADSTS7000215") && !r.stderr.contains(SECRET), "{}", r.stderr);
}
