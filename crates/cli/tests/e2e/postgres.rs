//! Several Panel Services on one PostgreSQL database, end to end against the Postfix lab.

use std::time::Duration;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn two_services_share_the_queue_and_deliver_every_message_exactly_once() {
    let Some(lab) = PostfixLab::start() else { return };
    let Some(mut env) = Env::postgres() else { return };
    env.configure(&lab, lab.plain_port, "none", &[]);
    env.spawn(&["worker"]);
    env.spawn(&["worker", "--concurrency", "2"]);
    let services = env.ok(&["services", "list", "--json"]).json();
    assert_eq!(services.as_array().unwrap().len(), 2);

    let mut ids = Vec::new();
    for i in 0..40 {
        let r =
            env.ok(&["send", "--to", "shared@example.org", "--subject", &format!("pg {i}"), "--text", "x", "--json"]);
        ids.push(id_of(&r));
    }
    let mut workers = std::collections::HashSet::new();
    let mut message_ids = Vec::new();
    for id in ids {
        let m = env.wait_message(id, WAIT, |m| m["state"] == "delivered");
        assert_eq!(m["attempts"].as_array().unwrap().len(), 1, "one attempt: {m:#}");
        workers.insert(m["attempts"][0]["service_id"].as_str().unwrap().to_string());
        message_ids.push(m["message_id"].as_str().unwrap().to_string());
    }
    assert_eq!(workers.len(), 2, "both services took work: {workers:?}");
    for mid in &message_ids {
        assert_eq!(lab.wait_for_messages(mid, 1, WAIT).len(), 1, "exactly one copy of {mid}");
    }
}

#[test]
fn a_test_message_on_postgres_is_delivered_and_the_schema_is_reported_current() {
    let Some(lab) = PostfixLab::start() else { return };
    let Some(mut env) = Env::postgres() else { return };
    let r = env.ok(&["migrate"]);
    assert!(r.stdout.contains("migrations are current") && r.stdout.contains("postgres://"), "{}", r.stdout);
    env.configure(&lab, lab.plain_port, "none", &[]);
    let port = env.serve();
    // PostgreSQL's work runs in its own processes: a thread per core here (SQLite takes one less).
    let cores = std::thread::available_parallelism().unwrap().get();
    let threads = format!("runtime threads: {cores} (one per core)");
    assert!(env.service_logs().contains(&threads), "{threads}: {}", env.service_logs());
    let (status, body) = http(port, "GET", "/readyz", "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"schema_version\""), "{body}");
    // Enqueued through the API of one process, woken by NOTIFY, delivered by its worker.
    let (status, body) = http(port, "POST", "/api/v1/smtp/test", r#"{"wait": 20}"#);
    assert_eq!(status, 202, "{body}");
    assert!(body.contains("\"state\":\"delivered\""), "{body}");
}

#[test]
fn the_same_idempotency_key_from_several_services_at_once_creates_one_step() {
    let Some(mut env) = Env::postgres() else { return };
    let sink = panel_testlab::RecordingSink::start();
    env.relay_on(sink.port, &[]);
    let ports: Vec<u16> = (0..2).map(|_| panel_testlab::free_port()).collect();
    for p in &ports {
        env.spawn(&["serve", "--listen", &format!("127.0.0.1:{p}")]);
    }
    let body = r#"{"to": ["report@example.org"], "subject": "nightly report", "text": "x", "idempotency_key": "nightly-report@2026-11-26T02:00Z"}"#;
    let answers: Vec<(u16, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..10)
            .map(|i| {
                let port = ports[i % 2];
                scope.spawn(move || http(port, "POST", "/api/v1/messages", body))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ids: std::collections::HashSet<i64> = answers
        .iter()
        .map(|(_, b)| serde_json::from_str::<serde_json::Value>(b).unwrap()["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    assert_eq!(answers.iter().filter(|(s, _)| *s == 202).count(), 1, "one creation: {answers:?}");
    assert!(answers.iter().all(|(s, _)| *s == 202 || *s == 200), "{answers:?}");
    let id = *ids.iter().next().unwrap();
    let m = env.wait_message(id, WAIT, |m| m["state"] == "delivered");
    let list = env.ok(&["messages", "list", "--json"]).json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(sink.copies(m["message_id"].as_str().unwrap().trim_matches(['<', '>'])), 1);
    // The CLI says so too.
    let r = env.ok(&[
        "send",
        "--to",
        "report@example.org",
        "--subject",
        "nightly report",
        "--text",
        "x",
        "--idempotency-key",
        "nightly-report@2026-11-26T02:00Z",
    ]);
    assert!(r.stdout.contains(&format!("Message {id} already exists")), "{}", r.stdout);
}

/// With the poll at a minute, mail moves only by wake-ups: a service's own enqueue wakes its
/// workers at once (its own NOTIFY, heard back, is not a second wake-up), another service's
/// after the hand-off. A service whose only slot is busy leaves its mail to the other, which
/// takes it; mail sent from the CLI (another process) is taken too.
#[test]
fn services_on_postgres_take_their_own_mail_at_once_and_what_another_leaves_after_the_hand_off() {
    let Some(mut env) = Env::postgres() else { return };
    env.write("panel.toml", "[worker]\nlease = \"30s\"\npoll = \"60s\"\nidle_connection = \"1s\"\n");
    let sink = panel_testlab::RecordingSink::start();
    // Each message holds its slot for a while: the serve's one slot is busy with the first.
    sink.set_data_reply_delay(Duration::from_millis(1500));
    env.relay_on(sink.port, &[]);
    let port = env.serve_with(&["--concurrency", "1"]);
    let worker = env.spawn(&["worker", "--concurrency", "4"]);
    let worker_id = env.wait_for_pid(worker);
    let serve_id = env
        .ok(&["services", "list", "--json"])
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] != worker_id.as_str())
        .expect("the serve")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut ids = Vec::new();
    for i in 0..3 {
        let body = format!(r#"{{"to": ["a@example.org"], "subject": "api {i}", "text": "x"}}"#);
        let (status, body) = http(port, "POST", "/api/v1/messages", &body);
        assert_eq!(status, 202, "{body}");
        ids.push(serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"].as_i64().unwrap());
    }
    ids.push(id_of(&env.ok(&["send", "--to", "a@example.org", "--subject", "cli", "--text", "x", "--json"])));
    let by = |id: i64| {
        let m = env.wait_message(id, Duration::from_secs(20), |m| m["state"] == "delivered");
        m["attempts"][0]["service_id"].as_str().unwrap().to_string()
    };
    let services: Vec<String> = ids.into_iter().map(by).collect();
    assert_eq!(services[0], serve_id, "the serve's own mail, taken at once: {services:?}");
    assert!(services[1..3].contains(&worker_id), "the other service took what the busy one left: {services:?}");
}

/// Mail enqueued into the room of the serve's own worker is inserted already claimed for it,
/// and the hand-over itself wakes the worker: it claims nothing for that mail. Before, every
/// enqueue of a group commit woke it again, often after it had taken the group already, and
/// most of its claims found nothing (354 of 395 in a benchmark run of 3,000 messages; here 10
/// to 37 of 200), each a statement on the connection that records its attempts. With few
/// slots, most mail finds no room and is queued for a claim: none is left for the poll.
#[test]
fn mail_handed_over_at_its_enqueue_costs_the_worker_no_claim() {
    // Room for all: nothing is queued for a claim because every slot was busy.
    let Some((sent, metrics)) = send_200_at_once(64) else { return };
    // The worker's first claim, at its start, finds nothing; a claim racing an enqueue may too.
    let none = metric(&metrics, "panel_claims_total{found=\"none\"} ");
    assert!(none <= 3, "{none} claims found nothing for {sent} messages handed over\n{metrics}");
    // Four slots: handed over while there is room, queued and claimed while they are busy.
    let Some((_, metrics)) = send_200_at_once(4) else { return };
    assert!(metric(&metrics, "panel_claims_total{found=\"some\"} ") > 0, "{metrics}");
}

/// A service sends one message on the owner of a token it read within the last minute, without
/// reading the token again (on PostgreSQL a round trip for every message), and writes it only
/// while the token, its role and the relay settings are as that read found them. Changed by
/// another process (the CLI) while the owner is kept: new settings are taken at once (the next
/// message goes out with them), and a revoked token is refused at once (401), nothing written.
#[test]
fn a_kept_token_owner_sends_only_while_its_access_is_unchanged() {
    let Some(mut env) = Env::postgres() else { return };
    let sink = panel_testlab::RecordingSink::start();
    env.relay_on(sink.port, &[]);
    let port = env.serve();
    let token = env.api_token("hr", "operator");
    let auth = format!("Authorization: Bearer {token}\r\n");
    let send = |subject: &str| {
        let body = format!(r#"{{"to": ["a@example.org"], "subject": "{subject}", "text": "x"}}"#);
        let (status, _, body) = http_with(port, "POST", "/api/v1/messages", &auth, &body);
        (status, body)
    };
    let counted = |name: &str| metric(&http(port, "GET", "/metrics", "").1, name);
    let mut ids = Vec::new();
    for i in 0..3 {
        let (status, body) = send(&format!("kept {i}"));
        assert_eq!(status, 202, "{body}");
        ids.push(serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"].as_i64().unwrap());
    }
    assert_eq!(counted("panel_token_checks_total{owner=\"kept\"} "), 2, "read once, then kept");

    // New settings saved by another process: the kept owner's write finds them changed, and
    // the message is sent with them.
    env.ok(&["smtp", "set", "--from", "Changed <changed@example.org>"]);
    let (status, body) = send("after the settings");
    assert_eq!(status, 202, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"].as_i64().unwrap();
    let m = env.wait_message(id, WAIT, |m| m["state"] == "delivered");
    assert!(m["from"].as_str().unwrap().contains("changed@example.org"), "{m:#}");
    assert_eq!(counted("panel_access_changes_total "), 1);

    // The token revoked by another process: refused at the next message, nothing written.
    let listed = env.ok(&["admin", "token", "list", "--json"]).json();
    let hr = listed.as_array().unwrap().iter().find(|t| t["admin"] == "hr").expect("hr's token");
    env.ok(&["admin", "token", "revoke", hr["id"].as_str().unwrap()]);
    let (status, body) = send("after the revocation");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("revoked"), "{body}");
    assert_eq!(counted("panel_access_changes_total "), 2);
    let (_, log) = http(port, "GET", "/api/v1/messages?limit=50", "");
    let log: serde_json::Value = serde_json::from_str(&log).unwrap();
    assert_eq!(log.as_array().unwrap().len(), 4, "the 3 and the one after the settings: {log:#}");
    for id in ids {
        env.wait_message(id, WAIT, |m| m["state"] == "delivered");
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(name)).map_or(0, |n| n.trim().parse().unwrap())
}

/// 200 messages from eight clients at once (enqueues share group commits, and wake-ups)
/// through `panel serve` with `concurrency` slots on PostgreSQL; once all are delivered, well
/// before the poll (a minute: mail left unclaimed would wait for it), how many, and `/metrics`.
fn send_200_at_once(concurrency: u32) -> Option<(u64, String)> {
    let mut env = Env::postgres()?;
    env.write("panel.toml", "[worker]\npoll = \"60s\"\n");
    let sink = panel_testlab::RecordingSink::start();
    env.relay_on(sink.port, &[]);
    let port = env.serve_with(&["--concurrency", &concurrency.to_string()]);
    let sent: u64 = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..8)
            .map(|c| {
                scope.spawn(move || {
                    for i in 0..25 {
                        let body = format!(r#"{{"to": ["a@example.org"], "subject": "c{c} m{i}", "text": "x"}}"#);
                        let (status, body) = http(port, "POST", "/api/v1/messages", &body);
                        assert_eq!(status, 202, "{body}");
                    }
                    25
                })
            })
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).sum()
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, text) = http(port, "GET", "/metrics", "");
        if metric(&text, "panel_messages{state=\"delivered\"} ") == sent {
            return Some((sent, text));
        }
        assert!(std::time::Instant::now() < deadline, "not all {sent} delivered before the poll:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
