//! One contract, two backends: every store test runs on SQLite and on PostgreSQL (a fresh
//! database each; skipped with a notice when no server runs, mandatory under PANEL_TEST_REAL=1).

#![allow(dead_code)]

use chrono::Utc;
use panel_domain::message::Draft;
use panel_domain::{EmailAddress, Mailbox, OutgoingMessage};
use panel_store::Store;
use panel_testlab::TestDatabase;

pub enum Guard {
    Sqlite(tempfile::TempDir),
    Postgres(TestDatabase),
}

pub struct Backend {
    pub url: String,
    pub store: Store,
    _guard: Guard,
}

pub async fn sqlite() -> Option<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("panel.db").display());
    Some(Backend { store: Store::open(&url).await.unwrap(), url, _guard: Guard::Sqlite(dir) })
}

pub async fn postgres() -> Option<Backend> {
    let db = TestDatabase::create()?;
    let url = db.url.clone();
    Some(Backend { store: Store::open(&url).await.unwrap(), url, _guard: Guard::Postgres(db) })
}

/// `contract!(a, b)` runs `async fn a(b: &Backend)` and `b` once per backend.
#[macro_export]
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(b) = $crate::common::sqlite().await else { return };
                super::$name(&b).await;
            })*
        }
        mod on_postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(b) = $crate::common::postgres().await else { return };
                super::$name(&b).await;
            })*
        }
    };
}

/// A valid one-recipient message with `subject`.
pub fn message(subject: &str) -> OutgoingMessage {
    message_to(subject, &["a@example.org"])
}

/// The same, to each of `to`.
pub fn message_to(subject: &str, to: &[&str]) -> OutgoingMessage {
    let to = to.iter().map(|a| a.to_string()).collect();
    let draft = Draft { to, subject: subject.into(), text: "x".into(), ..Default::default() };
    let from = Mailbox::parse("from", "p@example.org").unwrap();
    let fallback = EmailAddress::parse("f", "f@example.org").unwrap();
    // Each its own Message-ID, as in production (the store matches inserted rows by it).
    static RANDOM: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let random = RANDOM.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    OutgoingMessage::prepare(&draft, &from, &fallback, Utc::now(), u128::from(random)).unwrap()
}

/// An attempt's facts for `claim`: for its pending recipients, by the primary route.
pub fn meta(claim: &panel_store::Claim) -> panel_store::AttemptMeta {
    panel_store::AttemptMeta {
        started_at: chrono::Utc::now(),
        finished_at: chrono::Utc::now(),
        service_id: "t".into(),
        relay: "r:25".into(),
        route: Some("primary".into()),
        settings_version: 1,
        recipients: claim.pending.clone(),
    }
}

/// The settlement of one attempt at a one-recipient message: delivered, or refused with a 550.
pub fn settled(accepted: bool) -> panel_domain::Settlement {
    settled_each(&[accepted])
}

/// The same for a message with a recipient for each of `accepted`: each taken or refused.
pub fn settled_each(accepted: &[bool]) -> panel_domain::Settlement {
    use panel_domain::delivery::{AttemptContext, settle};
    use panel_domain::{
        ConnectionContext, Failure, RecipientResult, RetryPolicy, Security, SendReport, SmtpReply, Stage,
    };
    let recipient = |accepted: bool| match accepted {
        true => RecipientResult::Accepted,
        false => RecipientResult::Rejected(Failure::reply(
            Stage::Rcpt,
            SmtpReply::from_lines(550, &["550 5.1.1 no such user"]),
        )),
    };
    let report = SendReport {
        recipients: accepted.iter().map(|&a| recipient(a)).collect(),
        failure: None,
        data_reply: accepted.iter().any(|&a| a).then(|| SmtpReply::from_lines(250, &["250 2.0.0 Ok: queued as X"])),
    };
    let policy = RetryPolicy::default();
    let ctx = AttemptContext {
        connection: ConnectionContext { port: 25, security: Security::None },
        policy: &policy,
        attempts: 1,
        age: std::time::Duration::ZERO,
        random: 0,
        earlier: &Default::default(),
    };
    settle(&report, ctx)
}
