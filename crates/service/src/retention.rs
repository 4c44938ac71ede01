//! Retention: message content (text, HTML, attachments; often password-reset links) is removed
//! a while after a message's final state, keeping its headers, recipients and attempts; later
//! the message goes, with runs and events of the same age; the audit log is kept unless told.
//! The janitor works in small batches, each a short transaction of its own.

use std::time::Duration;

use panel_store::RetainedTable;
use tokio::sync::watch;

use crate::error::OpsError;
use crate::ops::Panel;

/// Rows per transaction: small enough that the write lock is held for milliseconds.
const BATCH: i64 = 200;
/// How often the janitor looks.
pub const JANITOR_EVERY: Duration = Duration::from_secs(600);

/// How long things are kept (`None`: for ever). `[retention]` in panel.toml.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// After a message's final state, its text, HTML and attachments.
    pub content: Option<Duration>,
    /// After a message's final state, the message itself; runs and events by their start.
    pub messages: Option<Duration>,
    pub audit: Option<Duration>,
}

impl Default for RetentionPolicy {
    fn default() -> RetentionPolicy {
        let days = |d: u64| Some(Duration::from_secs(d * 86_400));
        RetentionPolicy { content: days(7), messages: days(90), audit: None }
    }
}

/// What one pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetentionReport {
    pub contents_removed: u64,
    pub messages_deleted: u64,
    pub runs_deleted: u64,
    pub events_deleted: u64,
    pub audit_entries_deleted: u64,
    pub bounces_deleted: u64,
}

impl RetentionReport {
    fn is_empty(&self) -> bool {
        *self == RetentionReport::default()
    }
}

impl Panel {
    /// One pass of the janitor under `policy`, by this Panel's clock: batch after batch until
    /// nothing older is left.
    pub async fn apply_retention(&self, policy: &RetentionPolicy) -> Result<RetentionReport, OpsError> {
        let now = self.now();
        let before = |keep: Duration| now - chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
        let mut report = RetentionReport::default();
        if let Some(keep) = policy.content {
            report.contents_removed = drain(|| self.store.remove_content(before(keep), now, BATCH)).await?;
        }
        if let Some(keep) = policy.messages {
            report.messages_deleted = drain(|| self.store.delete_finished(before(keep), BATCH)).await?;
            report.runs_deleted = drain(|| self.store.delete_older(RetainedTable::Runs, before(keep), BATCH)).await?;
            report.events_deleted =
                drain(|| self.store.delete_older(RetainedTable::Events, before(keep), BATCH)).await?;
            report.bounces_deleted =
                drain(|| self.store.delete_older(RetainedTable::Bounces, before(keep), BATCH)).await?;
        }
        if let Some(keep) = policy.audit {
            report.audit_entries_deleted =
                drain(|| self.store.delete_older(RetainedTable::Audit, before(keep), BATCH)).await?;
        }
        Ok(report)
    }
}

/// Runs `batch` until it does less than a full batch; the total.
async fn drain<F, Fut>(mut batch: F) -> Result<u64, OpsError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = panel_store::Result<u64>>,
{
    let mut total = 0;
    loop {
        let n = batch().await?;
        total += n;
        if n < BATCH as u64 {
            return Ok(total);
        }
        // Let the worker's and the API's writes in between batches.
        tokio::task::yield_now().await;
    }
}

/// The janitor of a running service: a pass a minute after start, then every `JANITOR_EVERY`.
/// Several services sharing a database may all run it: every deletion is idempotent.
pub async fn run_janitor(panel: Panel, policy: RetentionPolicy, mut shutdown: watch::Receiver<bool>) {
    let mut wait = Duration::from_secs(60);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        wait = JANITOR_EVERY;
        match panel.apply_retention(&policy).await {
            Ok(r) if r.is_empty() => {}
            Ok(r) => tracing::info!(
                contents_removed = r.contents_removed,
                messages_deleted = r.messages_deleted,
                runs_deleted = r.runs_deleted,
                events_deleted = r.events_deleted,
                audit_entries_deleted = r.audit_entries_deleted,
                "retention applied"
            ),
            Err(e) => tracing::warn!(error = %e, "retention failed; tried again later"),
        }
    }
}
