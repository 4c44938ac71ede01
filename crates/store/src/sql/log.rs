//! The message log as the admin reads it: the list with its filter, one message with every
//! recipient and attempt, and the counts the dashboard and /metrics show.

use panel_domain::OutgoingMessage;
use panel_domain::{AttemptOutcome, FailureClass, RecipientKind, RecipientState, Stage};

use super::*;
use crate::{Result, from_ms};

impl SqlStore {
    pub async fn list_messages(&self, f: &MessageFilter) -> Result<Vec<MessageSummary>> {
        let sql = format!(
            "SELECT m.*, (SELECT {} FROM recipients r WHERE r.message_id = m.id) AS rcpts
             FROM messages m WHERE ($1 IS NULL OR state = $1) AND ($2 IS NULL OR origin = $2)
               AND ($4 IS NULL OR EXISTS (SELECT 1 FROM recipients r2 WHERE r2.message_id = m.id AND lower(r2.address) LIKE $4))
               AND ($5 IS NULL OR m.created_at >= $5)
             ORDER BY id DESC LIMIT $3",
            self.dialect.concat_addresses()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(f.state.map(|s| s.as_str()))
            .bind(f.origin.map(|o| o.as_str()))
            .bind(if f.limit == 0 { 100 } else { f.limit as i64 })
            .bind(f.recipient.as_ref().map(|r| format!("%{}%", r.trim().to_lowercase().replace(['%', '_'], ""))))
            .bind(f.since.map(crate::ms))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let state = parse_state(r)?;
                Ok(MessageSummary {
                    id: cell(r, "messages", "id")?,
                    state,
                    origin: parse_origin(r)?,
                    priority: parse_priority(r)?,
                    from: cell(r, "messages", "from_addr")?,
                    to: cell::<Option<String>>(r, "messages", "rcpts")?
                        .map(|s| s.split(',').map(String::from).collect())
                        .unwrap_or_default(),
                    subject: cell(r, "messages", "subject")?,
                    created_at: from_ms(cell(r, "messages", "created_at")?),
                    updated_at: from_ms(cell(r, "messages", "updated_at")?),
                    attempt_count: cell(r, "messages", "attempts")?,
                    next_attempt_at: if waiting(state) {
                        Some(from_ms(cell(r, "messages", "next_attempt_at")?))
                    } else {
                        None
                    },
                    failure_class: optional_closed_cell(r, "messages", "failure_class", FailureClass::parse)?,
                    last_error: cell(r, "messages", "last_error")?,
                })
            })
            .collect()
    }

    /// The message as queued: text, HTML and attachments (what was sent).
    pub async fn message_content(&self, id: i64) -> Result<Option<OutgoingMessage>> {
        let content: Option<String> = sqlx::query_scalar("SELECT content FROM messages WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        content.map(|c| json(&c)).transpose()
    }

    pub async fn hourly_counts(&self, since: i64) -> Result<Vec<HourlyCount>> {
        let rows = sqlx::query(
            "SELECT (updated_at / 3600000) AS hour, state, COUNT(*) AS n FROM messages
             WHERE updated_at >= $1 AND state IN ('delivered', 'retrying', 'partly_failed', 'failed', 'captured', 'bounced')
             GROUP BY (updated_at / 3600000), state ORDER BY 1",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(HourlyCount {
                    hour: from_ms(cell::<i64>(r, "messages", "hour")? * 3_600_000),
                    state: parse_state(r)?,
                    count: cell(r, "messages", "n")?,
                })
            })
            .collect()
    }

    pub async fn last_relay_error(&self) -> Result<Option<RelayError>> {
        let Some(a) = sqlx::query(
            "SELECT * FROM attempts WHERE outcome NOT IN ('delivered', 'interrupted') ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let id: i64 = cell(&a, "attempts", "id")?;
        let delivered_since: Option<i64> =
            sqlx::query_scalar("SELECT id FROM attempts WHERE id > $1 AND outcome = 'delivered' LIMIT 1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        relay_error(&a, delivered_since.is_none()).map(Some)
    }

    /// The latest attempt of each named route (`None` for a route not used yet), in the order
    /// given; `current` says whether it failed.
    pub async fn route_attempts(&self, names: &[String]) -> Result<Vec<Option<RelayError>>> {
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let row = sqlx::query("SELECT * FROM attempts WHERE route = $1 ORDER BY id DESC LIMIT 1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
            out.push(match row {
                None => None,
                Some(a) => {
                    let failed = cell::<String>(&a, "attempts", "outcome")? != "delivered";
                    Some(relay_error(&a, failed)?)
                }
            });
        }
        Ok(out)
    }

    /// A message as of one instant: its state, recipients and attempts read in one snapshot.
    pub async fn message(&self, id: i64) -> Result<Option<MessageDetail>> {
        let mut tx = self.snapshot().await?;
        let Some(r) = sqlx::query("SELECT * FROM messages WHERE id = $1").bind(id).fetch_optional(&mut *tx).await?
        else {
            return Ok(None);
        };
        let content: OutgoingMessage = json(&cell::<String>(&r, "messages", "content")?)?;
        let names = |list: &[panel_domain::Mailbox]| list.iter().map(|m| m.to_string()).collect::<Vec<_>>();
        let recipients =
            sqlx::query("SELECT kind, address, state, reply FROM recipients WHERE message_id = $1 ORDER BY position")
                .bind(id)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .map(|r| {
                    Ok(RecipientRow {
                        kind: closed_cell(&r, "recipients", "kind", RecipientKind::parse)?,
                        address: cell(&r, "recipients", "address")?,
                        state: closed_cell(&r, "recipients", "state", RecipientState::parse)?,
                        reply: cell(&r, "recipients", "reply")?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
        let attempts = sqlx::query("SELECT * FROM attempts WHERE message_id = $1 ORDER BY id")
            .bind(id)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .map(|a| {
                Ok(AttemptRow {
                    at: from_ms(cell(&a, "attempts", "started_at")?),
                    finished_at: from_ms(cell(&a, "attempts", "finished_at")?),
                    outcome: closed_cell(&a, "attempts", "outcome", AttemptOutcome::parse)?,
                    stage: closed_cell(&a, "attempts", "stage", Stage::parse)?,
                    code: cell(&a, "attempts", "code")?,
                    enhanced_code: cell(&a, "attempts", "enhanced_code")?,
                    reply: cell(&a, "attempts", "reply")?,
                    detail: cell(&a, "attempts", "detail")?,
                    hint: cell(&a, "attempts", "hint")?,
                    relay: cell(&a, "attempts", "relay")?,
                    route: cell(&a, "attempts", "route")?,
                    service_id: cell(&a, "attempts", "service_id")?,
                    settings_version: cell(&a, "attempts", "settings_version")?,
                    recipients: json(&cell::<String>(&a, "attempts", "recipients")?)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        tx.commit().await?;
        let state = parse_state(&r)?;
        Ok(Some(MessageDetail {
            id,
            state,
            origin: parse_origin(&r)?,
            priority: parse_priority(&r)?,
            from: content.from.to_string(),
            to: names(&content.to),
            cc: names(&content.cc),
            bcc: names(&content.bcc),
            reply_to: content.reply_to.as_ref().map(|m| m.to_string()),
            subject: content.subject.clone(),
            message_id: content.message_id.clone(),
            used_fallback_recipient: content.used_fallback_recipient,
            created_at: from_ms(cell(&r, "messages", "created_at")?),
            updated_at: from_ms(cell(&r, "messages", "updated_at")?),
            next_attempt_at: if waiting(state) {
                Some(from_ms(cell(&r, "messages", "next_attempt_at")?))
            } else {
                None
            },
            failure_class: optional_closed_cell(&r, "messages", "failure_class", FailureClass::parse)?,
            last_error: cell(&r, "messages", "last_error")?,
            interrupted: cell(&r, "messages", "interrupted")?,
            content_removed_at: cell::<Option<i64>>(&r, "messages", "content_removed_at")?.map(from_ms),
            recipients,
            attempts,
        }))
    }

    pub async fn queue_stats(&self, now: i64) -> Result<QueueStats> {
        let mut stats = QueueStats::default();
        for (state, n) in sqlx::query_as::<_, (String, i64)>("SELECT state, COUNT(*) FROM messages GROUP BY state")
            .fetch_all(&self.pool)
            .await?
        {
            match state.as_str() {
                "queued" => stats.queued = n,
                "retrying" => stats.retrying = n,
                "sending" => stats.sending = n,
                "delivered" => stats.delivered = n,
                "failed" => stats.failed = n,
                "partly_failed" => stats.partly_failed = n,
                "captured" => stats.captured = n,
                "bounced" => stats.bounced = n,
                _ => {}
            }
        }
        let oldest: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(next_attempt_at) FROM messages WHERE state IN ('queued', 'retrying') AND next_attempt_at <= $1",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        stats.oldest_due_age_secs = oldest.map(|t| (now - t) / 1000);
        stats.limited = sqlx::query_scalar(
            "SELECT COUNT(*) FROM messages WHERE state IN ('queued', 'retrying') AND last_error LIKE 'held by the sending limit%'",
        )
        .fetch_one(&self.pool)
        .await?;
        stats.held = sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE state = 'failed' AND failure_class = $1")
            .bind(panel_domain::FailureClass::Configuration.as_str())
            .fetch_one(&self.pool)
            .await?;
        Ok(stats)
    }

    pub async fn interrupted_attempts(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM attempts WHERE outcome = 'interrupted'")
            .fetch_one(&self.pool)
            .await?)
    }
}

fn relay_error(a: &AnyRow, current: bool) -> Result<RelayError> {
    Ok(RelayError {
        message_id: cell(a, "attempts", "message_id")?,
        at: from_ms(cell(a, "attempts", "finished_at")?),
        relay: cell(a, "attempts", "relay")?,
        route: cell(a, "attempts", "route")?,
        outcome: closed_cell(a, "attempts", "outcome", AttemptOutcome::parse)?,
        stage: closed_cell(a, "attempts", "stage", Stage::parse)?,
        code: cell(a, "attempts", "code")?,
        reply: cell(a, "attempts", "reply")?,
        detail: cell(a, "attempts", "detail")?,
        hint: cell(a, "attempts", "hint")?,
        current,
    })
}
