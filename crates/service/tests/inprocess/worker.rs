//! The worker in process: claims, delivery against the recording sink, recorded attempts.

use std::time::Duration;

use panel_domain::message::Draft;
use panel_domain::{FailureClass, MessageState, Origin};
use panel_service::WorkerConfig;

use crate::harness::Harness;

fn fast() -> WorkerConfig {
    WorkerConfig { poll: Duration::from_millis(50), ..WorkerConfig::default() }
}

fn panic_on_boom(m: &panel_domain::OutgoingMessage) {
    if m.subject == "boom" {
        panic!("the delivery code tripped over message 'boom'");
    }
}

#[tokio::test]
async fn a_delivery_that_panics_is_an_internal_failure_retried_on_its_schedule_then_failed() {
    let h = Harness::start(
        Some(WorkerConfig { before_send: Some(panic_on_boom), ..fast() }),
        &[("retry_schedule", "1s"), ("give_up_after", "1s")],
    )
    .await;
    let boom = h.send("boom").await;
    let fine = h.send("fine").await;
    // The worker survives the panic and delivers the other message.
    h.wait_for(fine, MessageState::Delivered, Duration::from_secs(10)).await;
    assert_eq!(h.sink.total(), 1);
    // The first attempt panicked and the message waits for its retry time: move the clock there.
    let first = h.wait_for(boom, MessageState::Retrying, Duration::from_secs(10)).await;
    assert_eq!(first.failure_class, Some(FailureClass::Internal));
    h.clock.advance(chrono::Duration::milliseconds(1200));
    let m = h.wait_for(boom, MessageState::Failed, Duration::from_secs(10)).await;
    assert_eq!(m.failure_class, Some(FailureClass::Internal));
    assert!(m.attempts.len() >= 2, "retried on the schedule before failing: {:#?}", m.attempts);
    for a in &m.attempts {
        assert_eq!((a.stage.as_str(), a.outcome.as_str()), ("internal", "temporary_failure"));
        assert!(a.detail.contains("tripped over message 'boom'"), "{}", a.detail);
        assert!(a.hint.as_deref().unwrap_or_default().contains("a bug, not the relay"));
    }
    assert!(m.last_error.unwrap().starts_with("gave up after"));
    assert_eq!(h.sink.total(), 1, "nothing of the panicking message reached the relay");
    h.stop().await;
}

#[tokio::test]
async fn connections_leaving_the_pool_end_with_quit() {
    let idle = WorkerConfig { idle_connection: Duration::from_millis(300), ..fast() };
    let h = Harness::start(Some(idle), &[]).await;
    let id = h.send("pooled").await;
    h.wait_for(id, MessageState::Delivered, Duration::from_secs(10)).await;
    assert_eq!(h.sink.connections(), 1);
    // Idle past its time, the pooled connection is retired with QUIT, not dropped.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while h.sink.quits() < 1 {
        assert!(std::time::Instant::now() < deadline, "the idle connection was never ended with QUIT");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A connection still pooled when the worker stops is ended with QUIT too.
    let id = h.send("second").await;
    h.wait_for(id, MessageState::Delivered, Duration::from_secs(10)).await;
    let sink = h.sink.clone();
    h.stop().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sink.quits() < sink.connections() {
        assert!(std::time::Instant::now() < deadline, "{} connections, {} QUITs", sink.connections(), sink.quits());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sink.connections(), 2);
}

#[tokio::test]
async fn the_relays_size_limit_is_declared_and_a_bigger_message_is_refused_before_it_is_sent() {
    let h = Harness::start(Some(fast()), &[]).await;
    h.sink.set_size_limit(Some(4000));
    let big = Draft { subject: "big".into(), text: "x".repeat(6000), ..Default::default() };
    let id = h.panel.enqueue_draft(Origin::MailTester, &big, None).await.unwrap().0;
    let m = h.wait_for(id, MessageState::Failed, Duration::from_secs(10)).await;
    let error = m.last_error.unwrap_or_default();
    assert!(error.contains("accepts at most 4000 (its SIZE)"), "{error}");
    assert_eq!(m.failure_class, Some(FailureClass::Permanent));
    assert!(h.sink.mail_commands().is_empty(), "nothing was transferred: {:?}", h.sink.mail_commands());
    let small = h.send("small").await;
    h.wait_for(small, MessageState::Delivered, Duration::from_secs(10)).await;
    let mail = h.sink.mail_commands().pop().unwrap();
    assert!(mail.contains(" SIZE="), "MAIL declares the size (RFC 1870): {mail}");
    h.stop().await;
}

#[tokio::test]
async fn a_utf8_address_is_not_sent_to_a_relay_without_smtputf8() {
    let h = Harness::start(Some(fast()), &[]).await;
    let id = h.send_to("grüße", &["jörg@example.org"]).await;
    let m = h.wait_for(id, MessageState::Failed, Duration::from_secs(10)).await;
    let error = m.last_error.unwrap_or_default();
    assert!(error.contains("does not offer SMTPUTF8") && error.contains("jörg@example.org"), "{error}");
    assert_eq!(h.sink.total(), 0);
    assert!(h.sink.mail_commands().is_empty());
    // ASCII addresses with a non-ASCII subject and body need nothing: all of it is encoded.
    let ok = h.send_to("grüße", &["joerg@example.org"]).await;
    h.wait_for(ok, MessageState::Delivered, Duration::from_secs(10)).await;
    assert!(!h.sink.mail_commands()[0].contains("SMTPUTF8"));
    h.stop().await;
}

#[tokio::test]
async fn a_slow_end_of_data_is_waited_for_and_no_reply_at_all_is_an_unknown_outcome() {
    // The case: content scanning answers the final dot after longer than the command
    // timeout. The end of DATA has its own, longer timeout: one attempt, one copy.
    let h = Harness::start(Some(fast()), &[("command_timeout", "1s"), ("data_timeout", "20s")]).await;
    h.sink.set_data_reply_delay(Duration::from_millis(2500));
    let id = h.send("scanned").await;
    let m = h.wait_for(id, MessageState::Delivered, Duration::from_secs(15)).await;
    assert_eq!((m.attempts.len(), h.sink.total()), (1, 1));
    h.stop().await;

    // No reply within data_timeout: recorded as interrupted (a copy may exist), then retried.
    let h = Harness::start(Some(fast()), &[("data_timeout", "1s"), ("retry_schedule", "5s")]).await;
    h.sink.set_data_reply_delay(Duration::from_secs(3));
    let id = h.send("unknown").await;
    let m = h.wait_for(id, MessageState::Retrying, Duration::from_secs(15)).await;
    assert_eq!(m.attempts[0].outcome, panel_domain::AttemptOutcome::Interrupted, "{m:#?}");
    assert_eq!(m.interrupted, 1);
    assert!(m.last_error.as_deref().unwrap_or_default().contains("may have accepted it"), "{m:#?}");
    h.sink.set_data_reply_delay(Duration::ZERO);
    h.clock.advance(chrono::Duration::seconds(6));
    let m = h.wait_for(id, MessageState::Delivered, Duration::from_secs(15)).await;
    assert_eq!(m.attempts.len(), 2);
    h.stop().await;
}

#[tokio::test]
async fn when_the_relay_answers_again_what_its_outage_deferred_goes_at_once() {
    // Retries ten minutes apart on the Panel's clock, which stands still in this test: a message
    // is sent again only if something makes it due.
    // No connection kept open across messages: each one meets the relay as it is then.
    let fresh = WorkerConfig { idle_connection: Duration::from_millis(1), ..fast() };
    let h = Harness::start(Some(fresh), &[("retry_schedule", "10m")]).await;
    // A recipient's own 4xx: that message waits for its retry time whatever the relay does.
    h.sink.script_rcpt("busy@example.org", &["451 4.2.1 mailbox busy, try later"]);
    let busy = h.send_to("own 4xx", &["busy@example.org"]).await;
    let busy_before = h.wait_for(busy, MessageState::Retrying, Duration::from_secs(10)).await;

    // The relay goes down (421 at the greeting): these wait for it, not for a recipient.
    h.sink.set_refusing(true);
    let mut deferred = Vec::new();
    for i in 0..3 {
        deferred.push(h.send(&format!("during the outage {i}")).await);
    }
    for id in &deferred {
        let m = h.wait_for(*id, MessageState::Retrying, Duration::from_secs(20)).await;
        assert_eq!((m.attempts[0].stage.as_str(), m.attempts[0].code), ("greeting", Some(421)), "{m:#?}");
    }

    // Back up: the next message (due now) is the probe that finds the relay answering, and the
    // three deferred ones follow at once, ten minutes before their retry time.
    h.sink.set_refusing(false);
    let probe = h.send("after the outage").await;
    h.wait_for(probe, MessageState::Delivered, Duration::from_secs(30)).await;
    for id in &deferred {
        let m = h.wait_for(*id, MessageState::Delivered, Duration::from_secs(10)).await;
        assert_eq!(m.attempts.len(), 2, "one try in the outage, one after it: {m:#?}");
    }
    let busy_after = h.panel.message(busy).await.unwrap();
    assert_eq!(busy_after.state, MessageState::Retrying, "its own 4xx keeps its retry time");
    assert_eq!(busy_after.attempts.len(), 1);
    assert_eq!(busy_after.next_attempt_at, busy_before.next_attempt_at);
    h.stop().await;
}

/// Set by the test once the fix is saved: the attempt under way waits for it.
static FIX_SAVED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn wait_for_the_fix(_: &panel_domain::OutgoingMessage) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !FIX_SAVED.load(std::sync::atomic::Ordering::SeqCst) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_found_with_settings_replaced_during_the_attempt_goes_again_with_the_new_ones() {
    // CI's case: the admin fixes the settings while an attempt with the old ones is under way.
    // The save releases what is held, but this attempt's hold is recorded after that: without
    // a second look the message waited for a fix that had already come.
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "a lab password").unwrap();
    let auth = [
        ("auth", "password"),
        ("username", "panel"),
        ("password_file", password.to_str().unwrap()),
        ("allow_plaintext_auth", "true"),
    ];
    let h = Harness::start(Some(WorkerConfig { before_send: Some(wait_for_the_fix), ..fast() }), &auth).await;
    let id = h.send("reset").await;
    // The attempt has claimed the message with the settings that name an account the relay
    // cannot take (it offers no AUTH); now the fix (no account) is saved.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while h.panel.queue().await.unwrap().sending == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never claimed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fix = panel_domain::SettingsDoc::from_texts([("auth", "none"), ("allow_plaintext_auth", "false")]).unwrap();
    h.panel.update_settings(&fix, "test", panel_domain::settings::patch::Channel::Local).await.unwrap();
    FIX_SAVED.store(true, std::sync::atomic::Ordering::SeqCst);
    let m = h.wait_for(id, MessageState::Delivered, Duration::from_secs(10)).await;
    assert_eq!(m.attempts.len(), 2, "{m:#?}");
    assert_eq!(m.attempts[0].outcome, panel_domain::AttemptOutcome::ConfigurationError, "{m:#?}");
    assert!(m.attempts[0].settings_version < m.attempts[1].settings_version, "{m:#?}");
    h.stop().await;
}

/// Sixty messages under a limit of thirty a minute, two services sending: thirty go, thirty
/// wait queued (unsent, with why and until when), and the rest go a minute later, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_sending_limit_waits_in_the_queue_unsent_and_goes_when_there_is_room() {
    let h = Harness::start(Some(fast()), &[("messages_per_minute", "30")]).await;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let second = tokio::spawn(panel_service::run_worker(
        h.another_service().await,
        "second".into(),
        fast(),
        panel_service::wake::Waker::default(),
        stop_rx,
    ));
    let mut ids = Vec::new();
    for i in 0..60 {
        ids.push(h.send(&format!("reminder {i}")).await);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let waiting = loop {
        let mut waiting = Vec::new();
        for id in &ids {
            let m = h.panel.message(*id).await.unwrap();
            if m.state == MessageState::Queued && m.last_error.is_some() {
                waiting.push(m);
            }
        }
        if h.sink.total() == 30 && waiting.len() == 30 {
            break waiting;
        }
        assert!(tokio::time::Instant::now() < deadline, "sent {}, waiting {}", h.sink.total(), waiting.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for m in &waiting {
        let note = m.last_error.as_deref().unwrap();
        assert!(note.starts_with("held by the sending limit of route primary (30 messages a minute) until "), "{note}");
        assert!(m.attempts.is_empty(), "the relay was never asked: {m:#?}");
    }
    assert_eq!(h.panel.queue().await.unwrap().limited, 30, "the dashboard's count");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.sink.total(), 30, "nothing more within the minute, from either service");
    // A minute later there is room: the rest go, each once.
    h.clock.advance(chrono::Duration::seconds(61));
    for id in &ids {
        h.wait_for(*id, MessageState::Delivered, Duration::from_secs(20)).await;
    }
    assert_eq!((h.sink.total(), h.sink.distinct()), (60, 60));
    let _ = stop.send(true);
    second.await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn a_relay_asking_to_slow_down_pauses_sending_then_it_resumes() {
    let h = Harness::start(Some(fast()), &[("retry_schedule", "10m")]).await;
    h.sink.script_rcpt("busy@example.org", &["451 4.7.500 Server busy. Please try again later"]);
    let busy = h.send_to("reset", &["busy@example.org"]).await;
    let m = h.wait_for(busy, MessageState::Retrying, Duration::from_secs(10)).await;
    assert!(m.last_error.as_deref().unwrap_or_default().contains("Server busy"), "{m:#?}");
    // Counted and paused (the pause is the relay backoff's, tested on its own); then the next
    // message goes, one at a time, and sending resumes.
    let metrics = h.panel.metrics_text().await.unwrap();
    assert!(metrics.contains("panel_relay_throttled_total 1"), "{metrics}");
    assert!(!metrics.contains("panel_relay_connection_errors_total{stage=\"rcpt\"}"), "not an outage: {metrics}");
    let next = h.send_to("welcome", &["ok@example.org"]).await;
    h.wait_for(next, MessageState::Delivered, Duration::from_secs(10)).await;
    // A message's own temporary refusal is not a request to slow down.
    h.sink.script_rcpt("full@example.org", &["452 4.2.2 Mailbox full"]);
    let full = h.send_to("notice", &["full@example.org"]).await;
    h.wait_for(full, MessageState::Retrying, Duration::from_secs(10)).await;
    assert!(h.panel.metrics_text().await.unwrap().contains("panel_relay_throttled_total 1"));
    h.stop().await;
}

/// The route each attempt of a message went by, in order.
fn routes_of(m: &panel_service::views::MessageDetail) -> Vec<&str> {
    m.attempts.iter().map(|a| a.route.as_deref().unwrap_or("-")).collect()
}

#[tokio::test]
async fn a_failing_route_hands_its_message_to_the_standby_at_once_and_traffic_returns_when_it_is_back() {
    use panel_domain::settings::patch::Channel;
    // Retries an hour apart on a clock that stands still: only failover sends a message again.
    let fresh = WorkerConfig { idle_connection: Duration::from_millis(1), ..fast() };
    let mut h = Harness::start(None, &[("retry_schedule", "1h")]).await;
    let standby = panel_testlab::RecordingSink::start();
    let port = standby.port.to_string();
    let route =
        panel_domain::SettingsDoc::from_texts([("host", "127.0.0.1"), ("port", port.as_str()), ("security", "none")])
            .unwrap();
    h.panel.update_route("standby", &route, "test", Channel::Local).await.unwrap();
    h.start_worker(fresh);

    // The primary refuses service (421 at the greeting): the message is delivered by the
    // standby right away, and its log names both routes.
    h.sink.set_refusing(true);
    let id = h.send("password reset").await;
    let m = h.wait_for(id, MessageState::Delivered, Duration::from_secs(15)).await;
    assert_eq!(routes_of(&m), ["primary", "standby"], "{m:#?}");
    assert_eq!((m.attempts[0].stage.as_str(), m.attempts[0].code), ("greeting", Some(421)));
    assert_eq!(standby.total(), 1);
    let d = h.panel.dashboard().await.unwrap();
    let states: Vec<_> = d.routes.iter().map(|r| (r.name.as_str(), r.state.as_str())).collect();
    assert_eq!(states, [("primary", "failing"), ("standby", "in use")]);
    assert!(d.banner.as_deref().unwrap_or_default().starts_with("Route primary is failing"), "{:?}", d.banner);
    assert!(h.panel.metrics_text().await.unwrap().contains("panel_route_failovers_total 1"));

    // A recipient's own refusal on the route in use is the recipient's answer: no other route.
    standby.script_rcpt("gone@example.org", &["550 5.1.1 user unknown"]);
    let gone = h.send_to("welcome", &["gone@example.org"]).await;
    let m = h.wait_for(gone, MessageState::Failed, Duration::from_secs(15)).await;
    assert_eq!(routes_of(&m), ["standby"], "{m:#?}");

    // The primary is back: once its backoff runs out, a message probes it and mail goes there.
    h.sink.set_refusing(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let id = h.send("after the outage").await;
        let m = h.wait_for(id, MessageState::Delivered, Duration::from_secs(15)).await;
        if routes_of(&m).last() == Some(&"primary") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "mail never returned to the primary: {m:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let d = h.panel.dashboard().await.unwrap();
    assert_eq!(d.routes[0].state, "in use", "{:?}", d.routes);
    h.stop().await;
}

/// The worker claims first and reads the settings only when a claim took something; settings
/// that turned unusable in between (a database written by a newer build, by hand) send the
/// claimed message back unsent, waiting for them, instead of sending it with the old ones.
#[tokio::test]
async fn a_message_claimed_when_the_settings_turned_unusable_goes_back_unsent_and_waits_for_them() {
    let h = Harness::start(Some(fast()), &[]).await;
    let first = h.send("first").await;
    h.wait_for(first, MessageState::Delivered, Duration::from_secs(10)).await;
    let store = panel_store::Store::open(&h.url).await.unwrap();
    let good = store.current_settings().await.unwrap().unwrap();
    let bad = panel_domain::SettingsDoc { host: Some("not a host name!".into()), ..good.doc.clone() };
    let now = h.panel.now();
    let version = store.save_settings(good.version, &bad, "test", now, &[]).await.unwrap();
    let second = store.enqueue(Origin::MailTester, h_message(&good.doc), now).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let waiting = loop {
        let m = store.message(second).await.unwrap().unwrap();
        if m.last_error.is_some() {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "never claimed: {m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(waiting.state, MessageState::Queued, "back in the queue");
    assert!(waiting.last_error.unwrap().contains("relay settings"));
    assert!(waiting.attempts.is_empty(), "no attempt: the relay was never asked");
    assert_eq!(h.sink.total(), 1, "only the first message reached the relay");
    // Fixed, the message goes with the settings now in force.
    store.save_settings(version, &good.doc, "test", now, &[]).await.unwrap();
    let m = h.wait_for(second, MessageState::Delivered, Duration::from_secs(10)).await;
    assert_eq!(m.attempts.len(), 1);
    assert_eq!(h.sink.total(), 2);
    h.stop().await;
}

fn h_message(doc: &panel_domain::SettingsDoc) -> panel_domain::OutgoingMessage {
    let settings = panel_domain::RelaySettings::validate(doc).unwrap();
    let draft = Draft { subject: "second".into(), text: "Hi.".into(), ..Default::default() };
    panel_domain::OutgoingMessage::prepare(&draft, &settings.from, &settings.fallback_recipient, chrono::Utc::now(), 7)
        .unwrap()
}

/// The store the hook below reads, and what it saw: (subject, messages recorded as delivered
/// at the moment that message was about to be sent).
static SLOT_STORE: std::sync::OnceLock<panel_store::Store> = std::sync::OnceLock::new();
static SLOT_SEEN: std::sync::Mutex<Vec<(String, i64)>> = std::sync::Mutex::new(Vec::new());

fn count_recorded(m: &panel_domain::OutgoingMessage) {
    let Some(store) = SLOT_STORE.get() else { return };
    let stats = tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(store.queue_stats(chrono::Utc::now()))
    });
    SLOT_SEEN.lock().unwrap().push((m.subject.clone(), stats.unwrap().delivered));
}

/// A slot is handed back for the next claim once its attempt is in the group committer's
/// queue, but what that claim takes is sent only after the record is committed: with one slot,
/// every message is sent after all the ones before it are recorded (so a worker killed at any
/// moment holds at most one unrecorded sent message per slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slots_next_message_is_sent_only_once_the_one_before_is_recorded() {
    let mut h = Harness::start(None, &[]).await;
    SLOT_STORE.set(panel_store::Store::open(&h.url).await.unwrap()).ok().unwrap();
    let drafts: Vec<Draft> =
        (0..6).map(|i| Draft { subject: format!("slot {i}"), text: "Hi.".into(), ..Default::default() }).collect();
    let ids = h.panel.enqueue_drafts(Origin::Dispatch, &drafts).await.unwrap();
    h.start_worker(WorkerConfig { concurrency: 1, before_send: Some(count_recorded), ..fast() });
    for id in &ids {
        h.wait_for(*id, MessageState::Delivered, Duration::from_secs(10)).await;
    }
    let seen = SLOT_SEEN.lock().unwrap().clone();
    let expected: Vec<(String, i64)> = (0..6).map(|i| (format!("slot {i}"), i)).collect();
    assert_eq!(seen, expected, "each sent once all before it were recorded");
    h.stop().await;
}
