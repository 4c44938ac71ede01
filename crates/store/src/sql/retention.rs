//! Retention: what the janitor removes, in small batches, each its own short transaction, so
//! that the write lock is never held for long while services deliver.

use panel_domain::OutgoingMessage;

use super::{SqlStore, json};
use crate::Result;

/// The final states: only finished messages lose content or go.
const FINISHED: &str = "state IN ('delivered', 'partly_failed', 'failed', 'cancelled', 'captured', 'bounced')";

impl SqlStore {
    /// Removes the text, HTML and attachments of up to `limit` messages finished before
    /// `before`, keeping their headers, recipients and attempts. Returns how many.
    pub async fn remove_content(&self, before: i64, now: i64, limit: i64) -> Result<u64> {
        let mut tx = self.write().await?;
        let sql = format!(
            "SELECT id, content FROM messages{} WHERE {FINISHED} AND updated_at < $1 AND content_removed_at IS NULL
             ORDER BY updated_at LIMIT $2{}",
            self.dialect.use_index("messages_finished"),
            self.dialect.skip_locked()
        );
        let rows: Vec<(i64, String)> =
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(before).bind(limit).fetch_all(&mut *tx).await?;
        for (id, content) in &rows {
            let mut message: OutgoingMessage = json(content)?;
            message.text = String::new();
            message.html = None;
            message.attachments = Vec::new();
            sqlx::query("UPDATE messages SET content = $1, content_removed_at = $2 WHERE id = $3")
                .bind(serde_json::to_string(&message).expect("message serializes"))
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(rows.len() as u64)
    }

    /// Deletes up to `limit` messages finished before `before`, with their recipients and
    /// attempts (the foreign keys cascade; SQLite's are on for every connection). One statement.
    pub async fn delete_finished(&self, before: i64, limit: i64) -> Result<u64> {
        let mut tx = self.write().await?;
        let sql = format!(
            "DELETE FROM messages WHERE id IN (SELECT id FROM messages{} WHERE {FINISHED} AND updated_at < $1
             ORDER BY updated_at LIMIT $2{})",
            self.dialect.use_index("messages_finished"),
            self.dialect.skip_locked()
        );
        let done = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(before).bind(limit).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// Deletes up to `limit` rows of `table` (runs, events, audit_log) whose `column` time is
    /// before `before`. Returns how many.
    pub async fn delete_older(&self, table: RetainedTable, before: i64, limit: i64) -> Result<u64> {
        let (table, column) = match table {
            RetainedTable::Runs => ("runs", "started_at"),
            RetainedTable::Events => ("events", "received_at"),
            RetainedTable::Audit => ("audit_log", "at"),
            RetainedTable::Bounces => ("bounces", "received_at"),
        };
        let mut tx = self.write().await?;
        let sql = format!(
            "DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE {column} < $1 ORDER BY {column} LIMIT $2)"
        );
        let done = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(before).bind(limit).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }
}

/// The tables besides messages that retention trims by age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainedTable {
    Runs,
    Events,
    Audit,
    /// Received reports (those of a deleted message go with it; this takes the unmatched).
    Bounces,
}
