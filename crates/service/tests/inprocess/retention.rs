//! Retention by the service's clock: content after 7 days, messages after 90, audit kept.

use std::time::Duration;

use panel_domain::MessageState;
use panel_service::retention::RetentionPolicy;

use crate::harness::Harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_policy_removes_content_after_a_week_and_messages_after_ninety_days() {
    let h = Harness::start(Some(panel_service::WorkerConfig::default()), &[]).await;
    let id = h.send("reset link").await;
    h.wait_for(id, MessageState::Delivered, Duration::from_secs(10)).await;
    let policy = RetentionPolicy::default();
    assert_eq!(h.panel.apply_retention(&policy).await.unwrap().contents_removed, 0, "too young");

    h.clock.advance(chrono::Duration::days(7) + chrono::Duration::seconds(1));
    let r = h.panel.apply_retention(&policy).await.unwrap();
    assert_eq!((r.contents_removed, r.messages_deleted), (1, 0));
    let m = h.panel.message(id).await.unwrap();
    assert!(m.content_removed_at.is_some() && m.subject == "reset link" && !m.attempts.is_empty());
    assert_eq!(h.panel.message_content(id).await.unwrap().map(|c| c.text).as_deref(), Some(""));

    h.clock.advance(chrono::Duration::days(83));
    let r = h.panel.apply_retention(&policy).await.unwrap();
    assert_eq!((r.messages_deleted, r.audit_entries_deleted), (1, 0), "the audit log is kept by default");
    assert!(h.panel.message(id).await.is_err(), "gone");
    h.stop().await;
}
