//! Retention on both backends: content goes first, then finished messages; nothing unfinished.

use std::time::Duration;

use crate::common::{Backend, message, meta, settled};
use chrono::Utc;
use panel_domain::Origin;
use panel_store::{AttemptMeta, RetainedTable, RetryResult};

async fn content_is_removed_then_finished_messages_deleted_and_queued_ones_kept(b: &Backend) {
    let s = &b.store;
    let now = Utc::now();
    let delivered = s.enqueue(Origin::MailTester, message("delivered"), now).await.unwrap();
    let failed = s.enqueue(Origin::MailTester, message("failed"), now).await.unwrap();
    let claims = s.claim("w", now, Duration::from_secs(60), 10, false).await.unwrap();
    let queued = s.enqueue(Origin::MailTester, message("queued"), now).await.unwrap();
    for c in &claims {
        let meta = AttemptMeta { started_at: now, finished_at: now, route: None, ..meta(c) };
        s.record_attempt(&c.reference, &meta, &settled(c.reference.id == delivered)).await.unwrap();
    }

    let later = now + chrono::Duration::days(8);
    assert_eq!(s.remove_content(later, later, 1).await.unwrap(), 1, "one batch of one");
    assert_eq!(s.remove_content(later, later, 100).await.unwrap(), 1);
    assert_eq!(s.remove_content(later, later, 100).await.unwrap(), 0, "done once");
    let m = s.message(delivered).await.unwrap().unwrap();
    assert!(m.content_removed_at.is_some());
    assert_eq!((m.subject.as_str(), m.to.len(), m.attempts.len()), ("delivered", 1, 1), "headers and attempts stay");
    let content = s.message_content(delivered).await.unwrap().unwrap();
    assert_eq!((content.text.as_str(), content.html.as_deref()), ("", None));
    assert!(s.message(queued).await.unwrap().unwrap().content_removed_at.is_none(), "unfinished is untouched");
    assert!(matches!(s.retry_message(failed, later).await.unwrap(), RetryResult::ContentRemoved { .. }));
    assert_eq!(s.retry_failed(now, later).await.unwrap(), 0, "nothing left to send again");

    assert_eq!(s.delete_finished(later, 100).await.unwrap(), 2);
    assert!(s.message(delivered).await.unwrap().is_none());
    assert!(s.message(queued).await.unwrap().is_some());
    s.put_admin("ann", "admin", "$argon2id$x", false, "test", now).await.unwrap();
    assert!(s.delete_older(RetainedTable::Audit, later, 100).await.unwrap() >= 1);
    assert_eq!(s.delete_older(RetainedTable::Runs, later, 100).await.unwrap(), 0);
    assert_eq!(s.delete_older(RetainedTable::Events, later, 100).await.unwrap(), 0);
}

contract!(content_is_removed_then_finished_messages_deleted_and_queued_ones_kept);
