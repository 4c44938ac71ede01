//! Queue semantics on the real SQLite backend: leases, fencing, interrupted claims, settings versions.

use std::time::Duration;

use chrono::Utc;
use panel_domain::delivery::{AttemptContext, settle};
use panel_domain::message::Draft;
use panel_domain::{
    ConnectionContext, EmailAddress, Mailbox, Origin, OutgoingMessage, RecipientResult, RetryPolicy, Security,
    SendReport, SettingsDoc, SmtpReply,
};
use panel_store::{AttemptMeta, RetryResult, Store, StoreError};

async fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}", dir.path().join("panel.db").display())).await.unwrap();
    (dir, store)
}

fn message(subject: &str) -> OutgoingMessage {
    let draft =
        Draft { to: vec!["a@example.org".into()], subject: subject.into(), text: "x".into(), ..Default::default() };
    let from = Mailbox::parse("from", "p@example.org").unwrap();
    let fallback = EmailAddress::parse("f", "f@example.org").unwrap();
    OutgoingMessage::prepare(&draft, &from, &fallback, Utc::now(), 1).unwrap()
}

fn delivered() -> panel_domain::Settlement {
    let report = SendReport {
        recipients: vec![RecipientResult::Accepted],
        failure: None,
        data_reply: Some(SmtpReply::from_lines(250, &["250 2.0.0 Ok: queued as X"])),
    };
    let policy = RetryPolicy::default();
    settle(
        &report,
        AttemptContext {
            connection: ConnectionContext { port: 25, security: Security::None },
            policy: &policy,
            attempts: 1,
            age: Duration::ZERO,
            random: 0,
        },
    )
}

fn meta() -> AttemptMeta {
    AttemptMeta {
        started_at: Utc::now(),
        finished_at: Utc::now(),
        service_id: "t".into(),
        relay: "r:25".into(),
        settings_version: 1,
    }
}

#[tokio::test]
async fn a_claimed_message_is_not_claimed_twice_while_leased() {
    let (_d, s) = store().await;
    s.enqueue(Origin::MailTester, &message("one"), Utc::now()).await.unwrap();
    let first = s.claim("w1", Utc::now(), Duration::from_secs(60), 10).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].pending.len(), 1);
    assert!(s.claim("w2", Utc::now(), Duration::from_secs(60), 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn an_expired_lease_is_fenced_out_and_recorded_as_interrupted() {
    let (_d, s) = store().await;
    let id = s.enqueue(Origin::MailTester, &message("two"), Utc::now()).await.unwrap();
    let stale = s.claim("w1", Utc::now(), Duration::from_millis(1), 10).await.unwrap().remove(0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let fresh = s.claim("w2", Utc::now(), Duration::from_secs(60), 10).await.unwrap().remove(0);
    assert_eq!(fresh.reference.id, id);
    assert!(fresh.reference.token > stale.reference.token);
    // The paused worker wakes up: its outcome is refused, the new owner's is kept.
    assert!(!s.record_attempt(&stale.reference, &meta(), &delivered()).await.unwrap());
    assert!(!s.renew_lease(&stale.reference, Utc::now(), Duration::from_secs(60)).await.unwrap());
    assert!(s.record_attempt(&fresh.reference, &meta(), &delivered()).await.unwrap());
    let m = s.message(id).await.unwrap().unwrap();
    assert_eq!(m.state.as_str(), "delivered");
    assert_eq!(m.interrupted, 1);
    let outcomes: Vec<_> = m.attempts.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, ["interrupted", "delivered"]);
}

#[tokio::test]
async fn settings_saves_are_versioned_and_conflicts_detected() {
    let (_d, s) = store().await;
    assert_eq!(s.config_generation().await.unwrap().settings, 0);
    let doc = SettingsDoc { host: Some("relay.example.org".into()), ..Default::default() };
    assert_eq!(s.save_settings(0, &doc, "t", Utc::now(), &[]).await.unwrap(), 1);
    assert!(matches!(
        s.save_settings(0, &doc, "t", Utc::now(), &[]).await,
        Err(StoreError::SettingsConflict { current: 1 })
    ));
    assert_eq!(s.current_settings().await.unwrap().unwrap().doc, doc);
}

#[tokio::test]
async fn only_failed_messages_can_be_retried() {
    let (_d, s) = store().await;
    let id = s.enqueue(Origin::MailTester, &message("three"), Utc::now()).await.unwrap();
    assert!(matches!(s.retry_message(id, Utc::now()).await.unwrap(), RetryResult::NotFailed { .. }));
    assert_eq!(s.retry_message(999, Utc::now()).await.unwrap(), RetryResult::NotFound);
}

#[tokio::test]
async fn an_enqueued_message_survives_reopening_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("panel.db").display());
    let id = Store::open(&url).await.unwrap().enqueue(Origin::MailTester, &message("four"), Utc::now()).await.unwrap();
    let reopened = Store::open(&url).await.unwrap();
    assert_eq!(reopened.message(id).await.unwrap().unwrap().subject, "four");
}
