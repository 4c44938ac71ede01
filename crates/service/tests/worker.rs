//! The service layer in process: `Panel` on a temporary SQLite, the worker running in the
//! test's runtime against the in-process recording SMTP sink. No `panel` binary, no Postfix:
//! these tests prove the worker's own rules quickly and deterministically.

use std::time::Duration;

use panel_domain::message::Draft;
use panel_domain::{MessageState, Origin, SettingsDoc};
use panel_service::views::MessageDetail;
use panel_service::wake::Waker;
use panel_service::{Panel, SecretsConfig, WorkerConfig};
use panel_testlab::RecordingSink;
use tokio::sync::watch;

/// A Panel with its own data directory, relay settings pointing at a recording sink, and a
/// worker in this runtime; stopped (and its messages finished) when dropped at the end.
struct Harness {
    panel: Panel,
    sink: RecordingSink,
    stop: watch::Sender<bool>,
    worker: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(config: WorkerConfig, settings: &[(&str, &str)]) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("panel.db").display());
        let secrets = SecretsConfig { authorities: Vec::new(), master_key_file: dir.path().join("master.key") };
        let panel = Panel::open(&url, secrets).await.unwrap();
        let sink = RecordingSink::start();
        let port = sink.port.to_string();
        let mut given = vec![
            ("host", "127.0.0.1"),
            ("port", port.as_str()),
            ("security", "none"),
            ("from", "Panel <panel@example.org>"),
            ("fallback_recipient", "ops@example.org"),
        ];
        given.extend_from_slice(settings);
        let patch = SettingsDoc::from_texts(given).unwrap();
        panel.update_settings(&patch, "test").await.unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let worker = tokio::spawn(panel_service::run_worker(
            panel.clone(),
            "in-process".into(),
            config,
            Waker::default(),
            stop_rx,
        ));
        Harness { panel, sink, stop, worker: Some(worker), _dir: dir }
    }

    async fn send(&self, subject: &str) -> i64 {
        let draft = Draft { subject: subject.into(), text: "Hello.".into(), ..Default::default() };
        self.panel.enqueue_draft(Origin::MailTester, &draft, None).await.unwrap().0
    }

    /// Waits (up to `limit`) until message `id` is in `state`.
    async fn wait_for(&self, id: i64, state: MessageState, limit: Duration) -> MessageDetail {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let m = self.panel.message(id).await.unwrap();
            if m.state == state {
                return m;
            }
            assert!(tokio::time::Instant::now() < deadline, "message {id} not {state} within {limit:?}: {m:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(w) = self.worker.take() {
            w.await.unwrap();
        }
    }
}

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
        WorkerConfig { before_send: Some(panic_on_boom), ..fast() },
        &[("retry_schedule", "1s"), ("give_up_after", "1s")],
    )
    .await;
    let boom = h.send("boom").await;
    let fine = h.send("fine").await;
    // The worker survives the panic and delivers the other message.
    h.wait_for(fine, MessageState::Delivered, Duration::from_secs(10)).await;
    assert_eq!(h.sink.total(), 1);
    let m = h.wait_for(boom, MessageState::Failed, Duration::from_secs(10)).await;
    assert_eq!(m.failure_class.as_deref(), Some("internal"));
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
