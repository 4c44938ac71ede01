//! Safety under faults: paused workers, SIGKILL of everything after an acknowledgement, and a
//! chaos run of three services on PostgreSQL with one killed every few seconds. The relay is a
//! recording sink that counts every copy of every Message-ID.

use std::time::{Duration, Instant};

use crate::common::*;
use chrono::Utc;
use panel_domain::message::Draft;
use panel_domain::{EmailAddress, Mailbox, Origin, OutgoingMessage};
use panel_testlab::RecordingSink;

fn configure_sink(env: &Env, sink: &RecordingSink) {
    env.relay_on(sink.port, &["--retry-schedule", "1s", "--command-timeout", "10"]);
}

fn bare_id(message: &serde_json::Value) -> String {
    message["message_id"].as_str().unwrap().trim_matches(['<', '>']).to_string()
}

#[test]
fn a_worker_paused_past_its_lease_sends_nothing_and_records_nothing() {
    let Some(mut env) = Env::postgres() else { return };
    let sink = RecordingSink::start();
    configure_sink(&env, &sink);
    sink.set_greeting_delay(Duration::from_secs(2));
    let first = env.spawn(&["worker"]);
    let first_id = env.wait_for_pid(first);
    let id = id_of(&env.ok(&["send", "--to", "a@example.org", "--subject", "paused", "--text", "x", "--json"]));
    let deadline = Instant::now() + Duration::from_secs(20);
    while sink.connections() == 0 {
        assert!(Instant::now() < deadline, "the worker never connected");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first worker holds the step and waits for the greeting: freeze it past its 3 s lease.
    env.signal(first, "STOP");
    sink.set_greeting_delay(Duration::ZERO);
    let second = env.start(&["worker"]);
    let second_id = env.wait_for_pid(second);
    let m = env.wait_message(id, Duration::from_secs(30), |m| m["state"] == "delivered");
    env.signal(first, "CONT");
    // The resumed worker finds its lease taken and says so; it sends and records nothing.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !env.service_logs().contains("lease lost before sending") {
        assert!(Instant::now() < deadline, "the resumed worker never noticed: {}", env.service_logs());
        std::thread::sleep(Duration::from_millis(50));
    }

    let m2 = env.message(id);
    let outcomes: Vec<&str> =
        m2["attempts"].as_array().unwrap().iter().map(|a| a["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["interrupted", "delivered"], "{m2:#}");
    assert_eq!(m2["attempts"][1]["service_id"], second_id.as_str());
    assert_eq!(m2["attempts"][0]["service_id"], first_id.as_str());
    assert_eq!(sink.copies(&bare_id(&m)), 1, "the resumed worker sent nothing more");
    assert_eq!(sink.total(), 1);
    assert!(env.service_logs().contains("lease lost before sending"), "{}", env.service_logs());
}

fn acknowledged_steps_survive(mut env: Env) {
    let sink = RecordingSink::start();
    configure_sink(&env, &sink);
    // Held at the greeting: nothing is delivered before the kill.
    sink.set_greeting_delay(Duration::from_secs(30));
    let port = panel_testlab::free_port();
    let listen = format!("127.0.0.1:{port}");
    let service = env.spawn(&["serve", "--listen", &listen]);
    let (status, body) =
        http(port, "POST", "/api/v1/messages", r#"{"to": ["api@example.org"], "subject": "acked", "text": "x"}"#);
    assert_eq!(status, 202, "{body}");
    let api_id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"].as_i64().unwrap();
    let cli_id = id_of(&env.ok(&["send", "--to", "cli@example.org", "--subject", "acked", "--text", "x", "--json"]));
    env.kill_9(service);

    sink.set_greeting_delay(Duration::ZERO);
    env.spawn(&["serve", "--listen", &listen]);
    for id in [api_id, cli_id] {
        let m = env.wait_message(id, Duration::from_secs(30), |m| m["state"] == "delivered");
        assert!(sink.copies(&bare_id(&m)) >= 1);
    }
}

#[test]
fn an_acknowledged_step_survives_sigkill_of_every_process_on_sqlite() {
    acknowledged_steps_survive(Env::new());
}

#[test]
fn an_acknowledged_step_survives_sigkill_of_every_process_on_postgres() {
    let Some(env) = Env::postgres() else { return };
    acknowledged_steps_survive(env);
}

#[test]
fn chaos_three_services_on_postgres_lose_nothing_while_workers_are_killed_throughout() {
    // Eight or more kills land during the run however fast the machine is (one per eighth
    // delivered), so a smaller run proves the same as a larger one.
    const MESSAGES: usize = 2500;
    let Some(mut env) = Env::postgres() else { return };
    let sink = RecordingSink::start();
    configure_sink(&env, &sink);
    let mut workers: Vec<u32> = (0..3).map(|_| env.start(&["worker"])).collect();
    for pid in &workers {
        env.wait_for_pid(*pid);
    }

    // Bulk enqueue straight into the store (the load generator), while the services work.
    let url = env.database.as_ref().unwrap().url.clone();
    let loader = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let store = panel_store::Store::open(&url).await.unwrap();
            let from = Mailbox::parse("from", "panel@example.org").unwrap();
            let fallback = EmailAddress::parse("f", "ops@example.org").unwrap();
            for i in 0..MESSAGES {
                let draft = Draft {
                    to: vec![format!("user{i}@example.org")],
                    subject: format!("chaos {i}"),
                    text: "x".repeat(700),
                    ..Default::default()
                };
                let m = OutgoingMessage::prepare(&draft, &from, &fallback, Utc::now(), i as u128 + 1).unwrap();
                store.enqueue(Origin::Dispatch, m, Utc::now()).await.unwrap();
            }
        });
    });

    let started = Instant::now();
    let mut kills = 0;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(panel_store::Store::open(&env.database.as_ref().unwrap().url)).unwrap();
    let delivered = || rt.block_on(store.queue_stats(Utc::now())).unwrap().delivered as usize;
    let mut at_last_kill = 0;
    loop {
        // Kill a worker each time another eighth of the messages was delivered (or 2 s passed):
        // the kills land all through the run, however fast this machine is.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut done = delivered();
        while done < at_last_kill + MESSAGES / 8 && done < MESSAGES && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            done = delivered();
        }
        if done >= MESSAGES {
            break;
        }
        at_last_kill = done;
        assert!(started.elapsed() < Duration::from_secs(600), "only {done} of {MESSAGES} delivered after 10 minutes");
        let victim = workers.remove(kills % workers.len());
        env.kill_9(victim);
        kills += 1;
        workers.push(env.start(&["worker"]));
    }
    loader.join().unwrap();
    let lost = MESSAGES - sink.distinct();
    let duplicates = sink.total() - sink.distinct();
    eprintln!(
        "chaos: {MESSAGES} messages, {kills} SIGKILLs, lost {lost}, duplicates {duplicates}, {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(lost, 0);
    // A copy comes only from a send the relay accepted whose record the kill cut off: a worker
    // holds at most one such send per slot (WorkerConfig's default concurrency, 4), because a
    // slot's next message is sent only once the record before it is committed. How many of
    // the four a kill catches grows with the worker's speed (~1 a kill here).
    assert!(duplicates <= kills * 4, "{duplicates} duplicates for {kills} kills");
    assert!(kills >= 5, "workers were killed all through the run: {kills}");
}

/// Fills the file system under `dir` until a write fails; returns the file to delete.
fn fill_disk(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 16 * 1024];
    while f.write_all(&chunk).and_then(|_| f.sync_data()).is_ok() {}
    path
}

#[test]
fn a_full_disk_refuses_new_mail_cleanly_and_the_service_recovers_when_space_returns() {
    let Some(mut env) = Env::on_tmpfs(8 * 1024) else { return };
    let sink = RecordingSink::start();
    configure_sink(&env, &sink);
    let port = env.serve();
    let send = |i: usize| {
        let body =
            format!(r#"{{"to": ["user{i}@example.org"], "subject": "disk {i}", "text": "{}"}}"#, "x".repeat(2000));
        http(port, "POST", "/api/v1/messages", &body)
    };
    let mut accepted = vec![];
    // Held at the relay's greeting, so that messages are queued when the disk fills.
    sink.set_greeting_delay(Duration::from_secs(3600));
    let filler = fill_disk(env.data_dir());
    let mut refusal = None;
    for i in 0..500 {
        match send(i) {
            (202, body) => {
                accepted.push(serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"].as_i64().unwrap())
            }
            other => {
                refusal = Some(other);
                break;
            }
        }
    }
    let (status, body) = refusal.expect("the disk never filled");
    assert_eq!(status, 503, "a full disk is 'try again later', not a bug: {body}");
    assert!(body.contains("full"), "{body}");
    let (status, body) = http(port, "GET", "/readyz", "");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cannot be written") && body.contains("full"), "{body}");
    let (_, metrics) = http(port, "GET", "/metrics", "");
    assert!(metrics.contains("panel_storage_writable 0"), "{metrics}");

    // Space returns: the service notices by itself, delivers what it acknowledged, takes new mail.
    std::fs::remove_file(filler).unwrap();
    sink.set_greeting_delay(Duration::ZERO);
    let deadline = Instant::now() + Duration::from_secs(30);
    while http(port, "GET", "/readyz", "").0 != 200 {
        assert!(Instant::now() < deadline, "not ready again: {}", env.service_logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = send(1000);
    assert_eq!(status, 202, "{body}");
    accepted.push(serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"].as_i64().unwrap());
    for id in &accepted {
        env.wait_message(*id, Duration::from_secs(30), |m| m["state"] == "delivered");
    }
    assert_eq!(sink.distinct(), accepted.len(), "every acknowledged message, once");
    let (_, metrics) = http(port, "GET", "/metrics", "");
    assert!(metrics.contains("panel_storage_writable 1"), "{metrics}");
}

#[test]
fn a_flood_of_slow_http_clients_leaves_health_the_api_and_delivery_working() {
    const SLOW_CLIENTS: usize = 1100;
    let mut env = Env::new();
    let config = std::fs::read_to_string(env.path().join("panel.toml")).unwrap();
    env.write("panel.toml", &format!("{config}[http]\nheader_timeout = \"2s\"\n"));
    let sink = RecordingSink::start();
    configure_sink(&env, &sink);
    let port = panel_testlab::free_port();
    // systemd's default for a service: 1,024 open files.
    env.nofile = Some(1024);
    env.spawn(&["serve", "--listen", &format!("127.0.0.1:{port}")]);
    assert_eq!(http(port, "GET", "/healthz", "").0, 200);
    // A kept-alive connection left idle is closed after the header timeout too.
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    std::io::Write::write_all(&mut idle, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let closed = std::io::Read::read_to_end(&mut idle, &mut answer);
    assert!(closed.is_ok(), "an idle keep-alive connection stayed open: {closed:?}");
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));

    // Slow clients from 29 addresses (under the per-address cap): each sends part of a request
    // line and stalls, and none lets go. Their ports are below the ephemeral range, so that the
    // other tests' free ports (bound on every address) do not collide with 1,100 of ours.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut flood = rt.block_on(async {
        use tokio::io::AsyncWriteExt;
        let mut flood = Vec::new();
        for i in 0..SLOW_CLIENTS {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("127.0.0.{}:{}", 2 + i % 29, 21_000 + i).parse().unwrap()).unwrap();
            let mut stream = socket.connect(format!("127.0.0.1:{port}").parse().unwrap()).await.unwrap();
            stream.write_all(b"GET /healthz HTT").await.unwrap();
            flood.push(stream);
        }
        flood
    });

    // While they hold on, health, the API and delivery work (`http` gives up after 10 s).
    assert_eq!(http(port, "GET", "/healthz", "").0, 200);
    let (status, body) =
        http(port, "POST", "/api/v1/messages", r#"{"to": ["a@example.org"], "subject": "flood", "text": "x"}"#);
    assert_eq!(status, 202, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"].as_i64().unwrap();
    env.wait_message(id, Duration::from_secs(30), |m| m["state"] == "delivered");
    // The slow clients were cut off by the header timeout, not served forever.
    let cut_off = rt.block_on(async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 512];
        let read = flood[0].read(&mut buf);
        matches!(tokio::time::timeout(Duration::from_secs(10), read).await, Ok(Ok(_) | Err(_)))
    });
    assert!(cut_off, "a client that never finished its headers is still connected");
    assert!(!env.service_logs().contains("Too many open files"), "{}", env.service_logs());
    drop(flood);
}
