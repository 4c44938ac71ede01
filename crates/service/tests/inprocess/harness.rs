//! The service layer in process: `Panel` on a temporary SQLite with a clock the test moves, the
//! worker running in the test's runtime against the in-process recording SMTP sink. No `panel`
//! binary, no Postfix: these tests prove the service's own rules quickly and deterministically.

use std::sync::Arc;
use std::time::Duration;

use panel_domain::message::Draft;
use panel_domain::settings::patch::Channel;
use panel_domain::{MessageState, Origin, SettingsDoc};
use panel_service::clock::ManualClock;
use panel_service::views::MessageDetail;
use panel_service::wake::Waker;
use panel_service::{Panel, SecretsConfig, WorkerConfig};
use panel_testlab::RecordingSink;
use tokio::sync::watch;

/// A Panel with its own data directory, relay settings pointing at a recording sink, and a
/// worker in this runtime; stopped (and its messages finished) when dropped at the end.
pub struct Harness {
    pub panel: Panel,
    pub sink: RecordingSink,
    /// The Panel's clock: it stands still until the test advances it.
    pub clock: ManualClock,
    pub url: String,
    stop: watch::Sender<bool>,
    worker: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// With a worker running under `config` (`None`: no worker; the test drives the service).
    pub async fn start(config: Option<WorkerConfig>, settings: &[(&str, &str)]) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("panel.db").display());
        let secrets = SecretsConfig { authorities: Vec::new(), master_key_file: dir.path().join("master.key") };
        // On a whole second, so that "3.5 s later" passes the same fire times every run.
        let clock = ManualClock::at(chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 0));
        let panel = Panel::open(&url, secrets).await.unwrap().with_clock(Arc::new(clock.clone()));
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
        panel.update_settings(&patch, "test", Channel::Local).await.unwrap();
        let (stop, _) = watch::channel(false);
        let mut h = Harness { panel, sink, clock, url, stop, worker: None, _dir: dir };
        if let Some(config) = config {
            h.start_worker(config);
        }
        h
    }

    /// Starts the worker (for a test that prepares more settings first: a worker started
    /// before a save may claim its first message with the settings read just before it).
    pub fn start_worker(&mut self, config: WorkerConfig) {
        let stop = self.stop.subscribe();
        let worker = panel_service::run_worker(self.panel.clone(), "in-process".into(), config, Waker::default(), stop);
        self.worker = Some(tokio::spawn(worker));
    }

    /// A second Panel on the same database and clock: another service sharing the work.
    pub async fn another_service(&self) -> Panel {
        let secrets = SecretsConfig { authorities: Vec::new(), master_key_file: self._dir.path().join("master.key") };
        Panel::open(&self.url, secrets).await.unwrap().with_clock(Arc::new(self.clock.clone()))
    }

    /// A message to `to`, through the mail tester's path.
    pub async fn send_to(&self, subject: &str, to: &[&str]) -> i64 {
        let draft = Draft {
            to: to.iter().map(|a| a.to_string()).collect(),
            subject: subject.into(),
            text: "Hello.".into(),
            ..Default::default()
        };
        self.panel.enqueue_draft(Origin::MailTester, &draft, None).await.unwrap().0
    }

    pub async fn send(&self, subject: &str) -> i64 {
        let draft = Draft { subject: subject.into(), text: "Hello.".into(), ..Default::default() };
        self.panel.enqueue_draft(Origin::MailTester, &draft, None).await.unwrap().0
    }

    /// Waits (up to `limit`) until message `id` is in `state`.
    pub async fn wait_for(&self, id: i64, state: MessageState, limit: Duration) -> MessageDetail {
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

    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(w) = self.worker.take() {
            w.await.unwrap();
        }
    }
}
