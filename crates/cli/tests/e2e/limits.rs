//! Relay limits the relay enforces anyway: recipients per SMTP transaction.

use std::time::Duration;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(30);

fn send_to(port: u16, to: &[String]) -> i64 {
    let body = serde_json::json!({"to": to, "subject": "All hands", "text": "Hello."});
    let (status, answer) = http(port, "POST", "/api/v1/messages", &body.to_string());
    assert_eq!(status, 202, "{answer}");
    serde_json::from_str::<serde_json::Value>(&answer).unwrap()["id"].as_i64().unwrap()
}

#[test]
fn many_recipients_go_in_transactions_of_the_limit_and_a_452_sends_the_rest_at_once() {
    let mut env = Env::new();
    let sink = panel_testlab::RecordingSink::start();
    env.relay_on(sink.port, &[]);
    let port = env.serve();

    // 250 recipients, the default 100 per transaction: three transactions, each once.
    let everyone: Vec<String> = (0..250).map(|i| format!("user{i:03}@example.org")).collect();
    let id = send_to(port, &everyone);
    let m = env.wait_message(id, WAIT, |m| m["state"] == "delivered");
    assert_eq!(m["attempts"].as_array().unwrap().len(), 1, "one attempt: {m:#}");
    assert_eq!(sink.total(), 3, "three transactions");
    let mut rcpts = sink.rcpts();
    assert_eq!(rcpts.len(), 250, "every recipient once");
    rcpts.sort();
    rcpts.dedup();
    assert_eq!(rcpts.len(), 250);

    // A relay that takes 50 per transaction (452 4.5.3 after them): the rest go in the next
    // transaction of the same attempt, not after the retry delay.
    let crowd: Vec<String> = (0..120).map(|i| format!("crowd{i:03}@example.org")).collect();
    for address in &crowd[50..100] {
        sink.script_rcpt(address, &["452 4.5.3 Too many recipients"]);
    }
    let id = send_to(port, &crowd);
    let m = env.wait_message(id, WAIT, |m| m["state"] == "delivered");
    assert_eq!(m["attempts"].as_array().unwrap().len(), 1, "no retry delay: {m:#}");
    assert_eq!(sink.total(), 3 + 2, "100 tried (50 taken), then the 70 left");
    assert!(m["recipients"].as_array().unwrap().iter().all(|r| r["state"] == "delivered"), "{m:#}");

    // The limit is a setting: 40 per transaction makes 3 transactions of 100 recipients.
    env.ok(&["smtp", "set", "--recipients-per-transaction", "40"]);
    let id = send_to(port, &everyone[..100]);
    env.wait_message(id, WAIT, |m| m["state"] == "delivered");
    assert_eq!(sink.total(), 5 + 3);
    let r = env.panel(&["smtp", "set", "--recipients-per-transaction", "0"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("recipients_per_transaction") && r.stderr.contains("1-1000"), "{}", r.stderr);
}

#[test]
fn a_message_over_the_sending_limit_says_why_and_until_when_in_the_log_the_dashboard_and_metrics() {
    let mut env = Env::new();
    let sink = panel_testlab::RecordingSink::start();
    env.relay_on(sink.port, &["--messages-per-minute", "2"]);
    let port = env.serve();
    let ids: Vec<i64> = (0..3)
        .map(|i| {
            id_of(&env.ok(&["send", "--to", "a@example.org", "--subject", &format!("n{i}"), "--text", "x", "--json"]))
        })
        .collect();
    let deadline = std::time::Instant::now() + WAIT;
    let held = loop {
        let list = env.ok(&["messages", "list", "--json"]).json();
        let held: Vec<serde_json::Value> = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["last_error"].as_str().is_some_and(|e| e.starts_with("held by the sending limit")))
            .cloned()
            .collect();
        if held.len() == 1 && sink.total() == 2 {
            break held;
        }
        assert!(std::time::Instant::now() < deadline, "{list:#}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(held[0]["state"], "queued");
    assert!(ids.contains(&held[0]["id"].as_i64().unwrap()));
    let shown = env.ok(&["messages", "show", &held[0]["id"].to_string()]).stdout;
    assert!(shown.contains("held by the sending limit of route primary (2 messages a minute) until"), "{shown}");
    let dashboard: serde_json::Value = serde_json::from_str(&http(port, "GET", "/api/v1/dashboard", "").1).unwrap();
    assert_eq!(dashboard["queue"]["limited"], 1, "{dashboard}");
    assert!(http(port, "GET", "/metrics", "").1.contains("panel_messages_limited 1"));
}
