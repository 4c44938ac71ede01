//! The recipient policy of a test installation: allowed domains (refused at enqueue, and never
//! sent to when queued before), redirect (one copy to one address, the original recipients
//! named), and a notice wherever an admin looks.

use std::time::Duration;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn allowed_domains_refuse_at_enqueue_and_never_send_what_was_queued_before() {
    let mut env = Env::new();
    let sink = panel_testlab::RecordingSink::start();
    env.relay_on(sink.port, &[]);
    // Queued before the policy, with no service running: one inside, one outside the domains.
    let before = id_of(&env.ok(&[
        "send",
        "--to",
        "ann@example.org",
        "--cc",
        "bob@corp.example",
        "--subject",
        "reset",
        "--text",
        "x",
        "--json",
    ]));

    // A list that leaves out the Fallback recipient is refused, and nothing is stored.
    let r = env.panel(&["smtp", "set", "--allowed-domains", "test.example"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("allowed_domains") && r.stderr.contains("ops@example.org"), "{}", r.stderr);
    assert_eq!(env.ok(&["smtp", "show", "--json"]).json()["version"], 1);
    env.ok(&["smtp", "set", "--allowed-domains", "example.org"]);
    let shown = env.ok(&["smtp", "show"]).stdout;
    assert!(shown.contains("Note: Recipient policy: mail goes only to example.org"), "{shown}");

    // At enqueue: refused, the field named, nothing stored, from the CLI and the API.
    let r =
        env.panel(&["send", "--to", "ann@example.org", "--to", "eve@corp.example", "--subject", "s", "--text", "x"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("to[1]") && r.stderr.contains("eve@corp.example is outside the allowed domains"));
    let port = env.serve();
    let (status, body) =
        http(port, "POST", "/api/v1/messages", r#"{"to": ["eve@corp.example"], "subject": "s", "text": "x"}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("\"field\":\"to[0]\""), "{body}");
    assert_eq!(env.ok(&["messages", "list", "--json"]).json().as_array().unwrap().len(), 1, "only the earlier one");

    // What was queued before: sent to the allowed recipient only; the other refused for good.
    let m = env.wait_message(before, WAIT, |m| m["state"] == "partly_failed");
    assert_eq!(sink.rcpts(), ["ann@example.org"], "nothing reached corp.example");
    let bob = m["recipients"].as_array().unwrap().iter().find(|r| r["address"] == "bob@corp.example").unwrap();
    assert_eq!(bob["state"], "failed", "{m:#}");
    let attempt = &m["attempts"][0];
    assert!(attempt["recipients"].to_string().contains("outside the allowed domains"), "{attempt:#}");
    let metrics = http(port, "GET", "/metrics", "").1;
    assert!(metrics.contains("panel_recipient_policy{mode=\"deliver\",restricted=\"true\"} 1"), "{metrics}");
}

#[test]
fn redirect_sends_one_copy_to_one_address_naming_the_original_recipients() {
    let mut env = Env::new();
    let sink = panel_testlab::RecordingSink::start();
    env.relay_on(sink.port, &["--recipient-policy", "redirect", "--redirect-to", "qa@example.org"]);
    let port = env.serve();
    let id = id_of(&env.ok(&[
        "send",
        "--to",
        "ann@corp.example",
        "--cc",
        "bob@corp.example",
        "--bcc",
        "eve@corp.example",
        "--subject",
        "reset",
        "--text",
        "Your link",
        "--json",
    ]));
    let m = env.wait_message(id, WAIT, |m| m["state"] == "delivered");
    assert_eq!(sink.rcpts(), ["qa@example.org"], "one copy, to the redirect address only");
    let sent = sink.wait_for(1, WAIT).remove(0).replace("\r\n ", " ");
    let original = "To: ann@corp.example; Cc: bob@corp.example; Bcc: eve@corp.example";
    assert!(sent.contains(&format!("X-Panel-Original-Recipients: {original}")), "{sent}");
    let parsed = mail_parser::MessageParser::default().parse(sent.as_bytes()).expect("parses");
    let text = parsed.body_text(0).expect("a text part");
    assert!(text.starts_with("[Redirected by Panel's recipient policy. Originally for To: ann@corp.example"), "{text}");
    assert!(text.contains("Your link"), "{text}");
    assert!(sent.lines().any(|l| l == "To: qa@example.org") && !sent.lines().any(|l| l.starts_with("Cc:")));
    // The log keeps whom it was for; every recipient is settled by the one copy.
    assert_eq!(m["to"][0], "ann@corp.example");
    assert!(m["recipients"].as_array().unwrap().iter().all(|r| r["state"] == "delivered"), "{m:#}");

    // Nobody forgets it: smtp show, the dashboard (API and every page) and /metrics say so.
    let notice = "every message is redirected to qa@example.org";
    assert!(env.ok(&["smtp", "show"]).stdout.contains(notice));
    let dashboard: serde_json::Value = serde_json::from_str(&http(port, "GET", "/api/v1/dashboard", "").1).unwrap();
    assert!(dashboard["policy"].as_str().unwrap().contains(notice), "{dashboard}");
    assert!(
        http(port, "GET", "/metrics", "")
            .1
            .contains("panel_recipient_policy{mode=\"redirect\",restricted=\"false\"} 1")
    );
    crate::web_ui::account(&env, "ann", "viewer");
    let (cookie, _) = crate::web_ui::session(port, "ann", ADMIN_PASSWORD).expect("signed in");
    for page in ["/", "/messages", "/settings", "/audit"] {
        let (status, _, html) = http_with(port, "GET", page, &format!("Cookie: {cookie}\r\n"), "");
        assert_eq!(status, 200, "{page}");
        assert!(html.contains("id=\"policy-notice\"") && html.contains(notice), "{page}: no banner");
    }

    // Back to delivering: the redirect address goes with a notice.
    let back = env.ok(&["smtp", "set", "--recipient-policy", "deliver"]).stdout;
    assert!(back.contains("redirect_to"), "{back}");
    assert!(!env.ok(&["smtp", "show"]).stdout.contains("Recipient policy"));
}

#[test]
fn capture_sends_nothing_and_keeps_each_message_to_read_and_download() {
    let mut env = Env::new();
    let sink = panel_testlab::RecordingSink::start();
    env.relay_on(sink.port, &["--recipient-policy", "capture"]);
    let port = env.serve();
    let html = env.write("body.html", "<p>Your link</p>");
    let id = id_of(&env.ok(&[
        "send",
        "--to",
        "ann@corp.example",
        "--subject",
        "reset",
        "--text",
        "Your link",
        "--html-file",
        html.to_str().unwrap(),
        "--json",
    ]));
    let m = env.wait_message(id, WAIT, |m| m["state"] == "captured");
    assert_eq!(m["recipients"][0]["state"], "captured", "{m:#}");
    assert_eq!(
        (m["attempts"][0]["outcome"].as_str(), m["attempts"][0]["stage"].as_str()),
        (Some("captured"), Some("policy"))
    );
    assert!(m["last_error"].is_null(), "{m:#}");
    // Nothing reached the relay: not even a connection for it.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!((sink.total(), sink.rcpts().len()), (0, 0));

    // The .eml, from the CLI and the API, is the message as it would have gone.
    let eml = env.ok(&["messages", "eml", &id.to_string()]).stdout;
    let parsed = mail_parser::MessageParser::default().parse(eml.as_bytes()).expect("parses");
    assert_eq!(parsed.subject(), Some("reset"));
    assert_eq!(parsed.body_text(0).as_deref(), Some("Your link"));
    let (status, head, body) = http_with(port, "GET", &format!("/api/v1/messages/{id}/eml"), &bearer(port), "");
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("content-type: message/rfc822"), "{head}");
    assert!(head.contains(&format!("panel-message-{id}.eml")), "{head}");
    // The same message (each rendering draws its own MIME boundary).
    let message_id = |raw: &str| raw.lines().find(|l| l.starts_with("Message-ID:")).map(String::from);
    assert_eq!(message_id(&body), message_id(&eml));
    assert!(body.contains("<p>Your link</p>"), "{body}");

    // Listed as captured, counted as captured, and the check says nothing goes out.
    let listed = env.ok(&["messages", "list", "--status", "captured", "--json"]).json();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let dashboard: serde_json::Value = serde_json::from_str(&http(port, "GET", "/api/v1/dashboard", "").1).unwrap();
    assert_eq!(dashboard["last_hour"]["captured"], 1, "{dashboard}");
    assert!(http(port, "GET", "/metrics", "").1.contains("panel_messages{state=\"captured\"} 1"));
    let check = env.ok(&["smtp", "check"]).stdout;
    assert!(check.contains("Note: Recipient policy: capture. Nothing is sent"), "{check}");
    // Its page offers the download, and says it was never sent.
    crate::web_ui::account(&env, "vic", "viewer");
    let (cookie, _) = crate::web_ui::session(port, "vic", ADMIN_PASSWORD).expect("signed in");
    let (_, _, page) = http_with(port, "GET", &format!("/messages/{id}"), &format!("Cookie: {cookie}\r\n"), "");
    assert!(page.contains(&format!("href=\"/api/v1/messages/{id}/eml\"")), "{page}");
    assert!(page.contains("captured by the recipient policy, never sent"), "{page}");
}
