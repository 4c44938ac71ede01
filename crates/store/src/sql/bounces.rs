//! Reports received after the relay's 250 (bounces, delay notices, auto-replies): stored with
//! the message they are about, or unmatched; a bounce moves its recipient and the message on.

use panel_domain::{MessageState, RecipientState};
use sqlx::any::AnyRow;

use super::{SqlStore, cell, closed_cell};
use crate::model::{BounceRecord, BounceRow, BounceTarget};
use crate::{Result, from_ms};

impl SqlStore {
    /// The key that signs VERP tokens, made on first use; every service reads the same one.
    pub async fn bounce_key(&self, fresh: &str) -> Result<String> {
        let mut tx = self.write().await?;
        sqlx::query("INSERT INTO bounce_key (id, key) VALUES (1, $1) ON CONFLICT (id) DO NOTHING")
            .bind(fresh)
            .execute(&mut *tx)
            .await?;
        let key: String = sqlx::query_scalar("SELECT key FROM bounce_key WHERE id = 1").fetch_one(&mut *tx).await?;
        tx.commit().await?;
        Ok(key)
    }

    /// A message a report may be about: its state and recipients.
    pub async fn bounce_target(&self, id: i64) -> Result<Option<BounceTarget>> {
        let Some(state) =
            sqlx::query("SELECT state FROM messages WHERE id = $1").bind(id).fetch_optional(&self.pool).await?
        else {
            return Ok(None);
        };
        let state = closed_cell(&state, "messages", "state", MessageState::parse)?;
        let rows = sqlx::query("SELECT address, state FROM recipients WHERE message_id = $1 ORDER BY position")
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        let recipients = rows
            .iter()
            .map(|r| {
                Ok((cell(r, "recipients", "address")?, closed_cell(r, "recipients", "state", RecipientState::parse)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(BounceTarget { id, state, recipients }))
    }

    /// Stores the rows of one received report in one transaction. For a matched message, a
    /// failed report moves its recipient from delivered (or delayed) to bounced, a delay notice
    /// from delivered to delayed; then a message every recipient of which bounced or failed is
    /// bounced, one with some bounced and others delivered partly failed. Returns the message's
    /// state after it, when it changed.
    pub async fn record_bounce(
        &self,
        message: Option<i64>,
        rows: &[BounceRow],
        now: i64,
    ) -> Result<Option<MessageState>> {
        let mut tx = self.write().await?;
        for r in rows {
            sqlx::query(
                "INSERT INTO bounces (received_at, message_id, kind, recipient, status, diagnostic, remote_mta,
                                      reporting_mta, envelope_to, subject, reason, report)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(now)
            .bind(message)
            .bind(&r.kind)
            .bind(&r.recipient)
            .bind(&r.status)
            .bind(&r.diagnostic)
            .bind(&r.remote_mta)
            .bind(&r.reporting_mta)
            .bind(&r.envelope_to)
            .bind(&r.subject)
            .bind(&r.reason)
            .bind(&r.report)
            .execute(&mut *tx)
            .await?;
            let (Some(id), Some(recipient), Some(to)) = (message, &r.recipient, r.moves_to) else { continue };
            let from: &[&str] = match to {
                RecipientState::Delayed => &["delivered"],
                _ => &["delivered", "delayed"],
            };
            let reply = match (&r.remote_mta, &r.diagnostic) {
                (Some(mta), Some(d)) => format!("{d} (from {mta})"),
                (None, Some(d)) => d.clone(),
                (_, None) => r.status.clone().unwrap_or_default(),
            };
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE recipients SET state = $1, reply = $2 WHERE message_id = $3 AND LOWER(address) = $4
                 AND state IN ({})",
                from.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ")
            )))
            .bind(to.as_str())
            .bind(reply)
            .bind(id)
            .bind(recipient.to_ascii_lowercase())
            .execute(&mut *tx)
            .await?;
        }
        let mut changed = None;
        if let Some(id) = message {
            let states: Vec<String> = sqlx::query_scalar("SELECT state FROM recipients WHERE message_id = $1")
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
            let bounced = states.iter().filter(|s| *s == "bounced").count();
            let refused = states.iter().filter(|s| *s == "bounced" || *s == "failed").count();
            let next = match bounced {
                0 => None,
                _ if refused == states.len() => Some(MessageState::Bounced),
                _ => Some(MessageState::PartlyFailed),
            };
            if let Some(next) = next {
                // Only a message the relay took: one still being sent or retried keeps its state.
                let done = sqlx::query(
                    "UPDATE messages SET state = $1, updated_at = $2 WHERE id = $3
                     AND state IN ('delivered', 'partly_failed', 'bounced') AND state <> $1",
                )
                .bind(next.as_str())
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() == 1 {
                    changed = Some(next);
                }
            }
        }
        tx.commit().await?;
        Ok(changed)
    }

    /// Received reports, newest first: all, or only those matched to no message.
    pub async fn bounces(&self, unmatched: bool, limit: i64) -> Result<Vec<BounceRecord>> {
        let sql = match unmatched {
            true => "SELECT * FROM bounces WHERE message_id IS NULL ORDER BY received_at DESC, id DESC LIMIT $1",
            false => "SELECT * FROM bounces ORDER BY received_at DESC, id DESC LIMIT $1",
        };
        let rows = sqlx::query(sql).bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(bounce_record).collect()
    }

    /// The reports about one message, oldest first.
    pub async fn message_bounces(&self, id: i64) -> Result<Vec<BounceRecord>> {
        let rows = sqlx::query("SELECT * FROM bounces WHERE message_id = $1 ORDER BY id")
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(bounce_record).collect()
    }

    /// The message with this Message-ID header (`<...>`), if stored.
    pub async fn message_by_header_id(&self, message_id: &str) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar("SELECT id FROM messages WHERE message_id = $1 ORDER BY id DESC LIMIT 1")
            .bind(message_id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// How far `mailbox` was read: its UIDVALIDITY and the last UID taken.
    pub async fn mailbox_mark(&self, mailbox: &str) -> Result<Option<(i64, i64)>> {
        Ok(sqlx::query_as("SELECT validity, last_uid FROM mailbox_marks WHERE mailbox = $1")
            .bind(mailbox)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn set_mailbox_mark(&self, mailbox: &str, validity: i64, last_uid: i64) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO mailbox_marks (mailbox, validity, last_uid) VALUES ($1, $2, $3)
             ON CONFLICT (mailbox) DO UPDATE SET validity = excluded.validity, last_uid = excluded.last_uid",
        )
        .bind(mailbox)
        .bind(validity)
        .bind(last_uid)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// How many received reports matched no message (for `/metrics`).
    pub async fn unmatched_bounces(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM bounces WHERE message_id IS NULL").fetch_one(&self.pool).await?)
    }
}

fn bounce_record(r: &AnyRow) -> Result<BounceRecord> {
    Ok(BounceRecord {
        id: cell(r, "bounces", "id")?,
        received_at: from_ms(cell(r, "bounces", "received_at")?),
        message_id: cell(r, "bounces", "message_id")?,
        kind: cell(r, "bounces", "kind")?,
        recipient: cell(r, "bounces", "recipient")?,
        status: cell(r, "bounces", "status")?,
        diagnostic: cell(r, "bounces", "diagnostic")?,
        remote_mta: cell(r, "bounces", "remote_mta")?,
        reporting_mta: cell(r, "bounces", "reporting_mta")?,
        envelope_to: cell(r, "bounces", "envelope_to")?,
        subject: cell(r, "bounces", "subject")?,
        reason: cell(r, "bounces", "reason")?,
    })
}
