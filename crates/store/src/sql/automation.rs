//! Templates, workflows and schedules (one `definitions` table), events, and runs. A run and
//! the messages its steps made are written in one transaction, so a run is never recorded
//! without its messages nor messages queued without their run.

use sqlx::any::AnyRow;

use super::{SqlStore, Tx, audit, cell, closed_cell, insert_message, json, parse_state};
use crate::model::*;
use crate::{Result, StoreError, from_ms, ms};
use panel_domain::MessageState;
use panel_domain::run::{RunKind, RunStatus, Trigger};

fn definition_from_row(kind: DefinitionKind, r: &AnyRow) -> Result<DefinitionRow> {
    Ok(DefinitionRow {
        kind,
        name: cell(r, "definitions", "name")?,
        doc: json(&cell::<String>(r, "definitions", "doc")?)?,
        enabled: cell::<i64>(r, "definitions", "enabled")? != 0,
        trigger: cell(r, "definitions", "trigger")?,
        next_fire_at: cell::<Option<i64>>(r, "definitions", "next_fire_at")?.map(from_ms),
        last_fire_at: cell::<Option<i64>>(r, "definitions", "last_fire_at")?.map(from_ms),
        created_at: from_ms(cell(r, "definitions", "created_at")?),
        updated_at: from_ms(cell(r, "definitions", "updated_at")?),
        updated_by: cell(r, "definitions", "updated_by")?,
    })
}

impl SqlStore {
    pub async fn save_definition(&self, d: &NewDefinition, mode: SaveMode, by: &str, now: i64) -> Result<SaveOutcome> {
        let mut tx = self.write().await?;
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM definitions WHERE kind = $1 AND name = $2")
            .bind(d.kind.as_str())
            .bind(&d.name)
            .fetch_optional(&mut *tx)
            .await?;
        let outcome = match (mode, exists.is_some()) {
            (SaveMode::Create, true) => return Ok(SaveOutcome::Exists),
            (SaveMode::Update, false) => return Ok(SaveOutcome::Missing),
            (_, true) => SaveOutcome::Updated,
            (_, false) => SaveOutcome::Created,
        };
        let doc = serde_json::to_string(&d.doc).expect("JSON serializes");
        let next = d.next_fire_at.map(ms);
        sqlx::query(
            "INSERT INTO definitions (kind, name, doc, enabled, trigger, next_fire_at, created_at, updated_at, updated_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8)
             ON CONFLICT (kind, name) DO UPDATE SET doc = excluded.doc, enabled = excluded.enabled,
                 trigger = excluded.trigger, next_fire_at = excluded.next_fire_at,
                 updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        )
        .bind(d.kind.as_str())
        .bind(&d.name)
        .bind(doc)
        .bind(d.enabled as i64)
        .bind(&d.trigger)
        .bind(next)
        .bind(now)
        .bind(by)
        .execute(&mut *tx)
        .await?;
        definitions_changed(&mut tx).await?;
        let action =
            format!("{}.{}", d.kind.as_str(), if outcome == SaveOutcome::Created { "created" } else { "updated" });
        let detail = if d.enabled { "enabled" } else { "disabled" };
        audit(&mut tx, by, now, &[AuditEvent::new(&action, &d.name, detail)]).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    pub async fn definition(&self, kind: DefinitionKind, name: &str) -> Result<Option<DefinitionRow>> {
        sqlx::query("SELECT * FROM definitions WHERE kind = $1 AND name = $2")
            .bind(kind.as_str())
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| definition_from_row(kind, &r))
            .transpose()
    }

    pub async fn definitions(&self, kind: DefinitionKind) -> Result<Vec<DefinitionRow>> {
        sqlx::query("SELECT * FROM definitions WHERE kind = $1 ORDER BY name")
            .bind(kind.as_str())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| definition_from_row(kind, r))
            .collect()
    }

    pub async fn delete_definition(&self, kind: DefinitionKind, name: &str, by: &str, now: i64) -> Result<bool> {
        let mut tx = self.write().await?;
        let deleted = sqlx::query("DELETE FROM definitions WHERE kind = $1 AND name = $2")
            .bind(kind.as_str())
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if deleted {
            definitions_changed(&mut tx).await?;
            audit(&mut tx, by, now, &[AuditEvent::new(&format!("{}.deleted", kind.as_str()), name, "")]).await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    /// Enables or disables; a schedule being enabled gets `next_fire_at` (fires missed while it
    /// was disabled are not run).
    pub async fn set_enabled(
        &self,
        kind: DefinitionKind,
        name: &str,
        enabled: bool,
        next_fire_at: Option<i64>,
        by: &str,
        now: i64,
    ) -> Result<bool> {
        let mut tx = self.write().await?;
        let changed = sqlx::query(
            "UPDATE definitions SET enabled = $3, next_fire_at = $4, updated_at = $5, updated_by = $6
             WHERE kind = $1 AND name = $2",
        )
        .bind(kind.as_str())
        .bind(name)
        .bind(enabled as i64)
        .bind(next_fire_at)
        .bind(now)
        .bind(by)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if changed {
            definitions_changed(&mut tx).await?;
            let action = format!("{}.{}", kind.as_str(), if enabled { "enabled" } else { "disabled" });
            audit(&mut tx, by, now, &[AuditEvent::new(&action, name, "")]).await?;
        }
        tx.commit().await?;
        Ok(changed)
    }

    /// Every enabled workflow, by name.
    pub async fn enabled_workflows(&self) -> Result<Vec<DefinitionRow>> {
        sqlx::query("SELECT * FROM definitions WHERE kind = 'workflow' AND enabled = 1 ORDER BY name")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| definition_from_row(DefinitionKind::Workflow, r))
            .collect()
    }

    /// Enabled schedules whose next fire time has come.
    pub async fn due_schedules(&self, now: i64) -> Result<Vec<DefinitionRow>> {
        sqlx::query(
            "SELECT * FROM definitions WHERE kind = 'schedule' AND enabled = 1 AND next_fire_at <= $1 ORDER BY next_fire_at",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| definition_from_row(DefinitionKind::Schedule, r))
        .collect()
    }

    /// The earliest next fire time of any enabled schedule.
    pub async fn next_schedule_fire(&self) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar("SELECT MIN(next_fire_at) FROM definitions WHERE kind = 'schedule' AND enabled = 1")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Writes a run and its messages. With `advance`, only if the schedule still waits for
    /// `expected_next` and no run has the same fire key: `None` when another service fired it.
    pub async fn commit_run(&self, run: NewRun, advance: Option<&ScheduleAdvance>, now: i64) -> Result<Option<i64>> {
        let mut tx = self.write().await?;
        if let Some(a) = advance {
            // Read committed on PostgreSQL: a second service's UPDATE waits for the first to
            // commit, re-reads the row, and then matches nothing.
            let advanced = sqlx::query(
                "UPDATE definitions SET next_fire_at = $1, last_fire_at = $2
                 WHERE kind = 'schedule' AND name = $3 AND next_fire_at = $4",
            )
            .bind(a.new_next.map(ms))
            .bind(ms(a.fire_time))
            .bind(&a.name)
            .bind(ms(a.expected_next))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if advanced != 1 {
                return Ok(None);
            }
        }
        let Some(run_id) = write_run(&mut tx, run, now).await? else { return Ok(None) };
        tx.commit().await?;
        Ok(Some(run_id))
    }

    /// Stores an event and the runs `plan` makes for it (given the new event's id), in one
    /// transaction. A repeated idempotency key returns the first event and runs nothing.
    pub async fn record_event(
        &self,
        event_type: &str,
        object: &str,
        key: Option<&str>,
        now: i64,
        plan: &crate::EventPlan,
    ) -> Result<EventRecord> {
        let mut tx = self.write().await?;
        let record = insert_event(&mut tx, event_type, object, key, now, plan).await?;
        if record.created && record.runs.iter().any(|r| !r.messages.is_empty()) {
            super::wake_at_commit(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(record)
    }

    pub async fn run(&self, id: i64) -> Result<Option<RunRow>> {
        let Some(r) = sqlx::query("SELECT * FROM runs WHERE id = $1").bind(id).fetch_optional(&self.pool).await? else {
            return Ok(None);
        };
        let mut rows = with_messages(&mut *self.pool.acquire().await?, vec![r]).await?;
        Ok(rows.pop())
    }

    /// The newest `limit` runs of one schedule, workflow or dispatch name, newest first.
    pub async fn runs(&self, kind: &str, name: &str, limit: u32) -> Result<Vec<RunRow>> {
        let rows = sqlx::query("SELECT * FROM runs WHERE kind = $1 AND name = $2 ORDER BY id DESC LIMIT $3")
            .bind(kind)
            .bind(name)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        with_messages(&mut *self.pool.acquire().await?, rows).await
    }
}

/// Moves the definitions generation on, in the transaction that changes a definition: whoever
/// keeps definitions in memory sees the change with its next read of the generation.
async fn definitions_changed(tx: &mut Tx) -> Result<()> {
    sqlx::query("UPDATE generations SET value = value + 1 WHERE name = 'definitions'").execute(&mut **tx).await?;
    Ok(())
}

/// Most message ids one query of `with_messages` names: below both databases' limits on
/// parameters, however many runs (up to 1,000) of up to 50 steps are listed.
const MESSAGE_IDS_PER_QUERY: usize = 1000;

/// The runs with their messages: the ids their steps name, fetched together (a query per
/// `MESSAGE_IDS_PER_QUERY`). A run's steps have named their messages' ids since runs were first
/// stored; finding them by the messages' `run_id` took an index that every event's message
/// wrote to.
async fn with_messages(conn: &mut sqlx::AnyConnection, rows: Vec<AnyRow>) -> Result<Vec<RunRow>> {
    let mut runs = Vec::with_capacity(rows.len());
    for r in &rows {
        let steps: serde_json::Value = json(&cell::<String>(r, "runs", "steps")?)?;
        let ids: Vec<i64> = steps
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|step| step.get("message_id").and_then(serde_json::Value::as_i64))
            .collect();
        runs.push((steps, ids));
    }
    let wanted: Vec<i64> = runs.iter().flat_map(|(_, ids)| ids.iter().copied()).collect();
    let mut found: std::collections::HashMap<i64, RunMessage> = std::collections::HashMap::new();
    for chunk in wanted.chunks(MESSAGE_IDS_PER_QUERY) {
        // Only numbered placeholders are formatted into the statement.
        let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        let sql =
            format!("SELECT id, state, subject, last_error FROM messages WHERE id IN ({})", placeholders.join(", "));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for id in chunk {
            query = query.bind(*id);
        }
        for m in query.fetch_all(&mut *conn).await? {
            let id = cell(&m, "messages", "id")?;
            found.insert(
                id,
                RunMessage {
                    id,
                    state: parse_state(&m)?,
                    subject: cell(&m, "messages", "subject")?,
                    last_error: cell(&m, "messages", "last_error")?,
                },
            );
        }
    }
    let mut out = Vec::with_capacity(rows.len());
    for (r, (steps, ids)) in rows.iter().zip(runs) {
        let id: i64 = cell(r, "runs", "id")?;
        // In id order, as they were queued; a message retention deleted is no longer listed.
        let mut messages: Vec<RunMessage> = ids.iter().filter_map(|id| found.remove(id)).collect();
        messages.sort_by_key(|m| m.id);
        out.push(RunRow {
            id,
            kind: closed_cell(r, "runs", "kind", RunKind::parse)?,
            name: cell(r, "runs", "name")?,
            trigger: closed_cell(r, "runs", "trigger", Trigger::parse)?,
            fire_time: cell::<Option<i64>>(r, "runs", "fire_time")?.map(from_ms),
            event_id: cell(r, "runs", "event_id")?,
            started_at: from_ms(cell(r, "runs", "started_at")?),
            missed: cell(r, "runs", "missed")?,
            status: closed_cell(r, "runs", "status", RunStatus::parse)?,
            detail: cell(r, "runs", "detail")?,
            service: cell(r, "runs", "service")?,
            steps,
            messages,
        });
    }
    Ok(out)
}

/// Stores an event and the runs `plan` makes for it (given its id); with a key seen before,
/// nothing new: the earlier event and its runs.
pub(super) async fn insert_event(
    tx: &mut Tx,
    event_type: &str,
    object: &str,
    key: Option<&str>,
    now: i64,
    plan: &crate::EventPlan,
) -> Result<EventRecord> {
    let inserted: Option<i64> = sqlx::query_scalar(
        "INSERT INTO events (type, object, idempotency_key, received_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id",
    )
    .bind(event_type)
    .bind(object)
    .bind(key)
    .bind(now)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(event_id) = inserted else {
        let (id, received_at): (i64, i64) =
            sqlx::query_as("SELECT id, received_at FROM events WHERE idempotency_key = $1")
                .bind(key)
                .fetch_one(&mut **tx)
                .await?;
        return Ok(EventRecord { id, created: false, runs: event_runs(tx, id, received_at).await? });
    };
    for run in plan(event_id).iter() {
        let mut run = run.clone();
        run.event_id = Some(event_id);
        write_run(tx, run, now).await?.expect("event runs have no fire key");
    }
    Ok(EventRecord { id: event_id, created: true, runs: event_runs(tx, event_id, now).await? })
}

/// An event's runs, as its transaction sees them. They started when it was received (both
/// written in one transaction, at one time): runs_started finds the few runs of that
/// millisecond, and their event id tells the event's apart.
async fn event_runs(tx: &mut Tx, event_id: i64, received_at: i64) -> Result<Vec<RunRow>> {
    let rows = sqlx::query("SELECT * FROM runs WHERE started_at = $1 AND event_id = $2 ORDER BY id")
        .bind(received_at)
        .bind(event_id)
        .fetch_all(&mut **tx)
        .await?;
    with_messages(tx, rows).await
}

/// An event to store with others (no idempotency key), and what plans its runs.
pub(super) struct NewEvent<'a> {
    pub event_type: &'a str,
    /// As the JSON text stored.
    pub object: &'a str,
    pub now: i64,
    pub plan: &'a crate::EventPlan,
}

/// `insert_event` for many events at once (a group commit's), with the ids taken for them:
/// each event's plan makes its runs given its id, and the events, the runs (their steps
/// naming their messages' ids) and the messages are added to `inserts`, which the caller sends
/// together. Their records, in their order.
pub(super) async fn add_events(
    tx: &mut Tx,
    ids: &mut super::batch::Ids,
    inserts: &mut super::batch::Writes,
    events: &[NewEvent<'_>],
    event_ids: &[i64],
) -> Result<Vec<EventRecord>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let plans: Vec<std::sync::Arc<[NewRun]>> = events.iter().zip(event_ids).map(|(e, &id)| (e.plan)(id)).collect();
    // Each run with its event's index; its event id is that event's (`event_ids[i]`).
    let runs: Vec<(usize, &NewRun)> =
        plans.iter().enumerate().flat_map(|(i, plan)| plan.iter().map(move |run| (i, run))).collect();
    let count = runs.iter().map(|(_, run)| run.steps.iter().filter(|s| s.message.is_some()).count()).sum();
    let taken = ids.take(tx, &[("runs", runs.len()), ("messages", count)]).await?;
    let (run_ids, message_ids) = (&taken[0], &taken[1]);
    // Each run's steps name their messages' ids, known before either is written.
    let mut messages = Vec::with_capacity(count);
    let mut next_message = message_ids.iter().copied();
    let mut rows = Vec::with_capacity(runs.len());
    // Each run as written, for the answer: its messages queued, none of them sent yet.
    let mut written: Vec<(usize, RunRow)> = Vec::with_capacity(runs.len());
    for ((i, run), &run_id) in runs.iter().zip(run_ids) {
        let mut queued = Vec::new();
        let outcomes: Vec<serde_json::Value> = run
            .steps
            .iter()
            .map(|step| {
                let mut outcome = step.outcome.clone();
                if let Some((origin, message)) = &step.message {
                    let id = next_message.next().expect("an id for each message");
                    outcome["message_id"] = id.into();
                    queued.push(RunMessage {
                        id,
                        state: MessageState::Queued,
                        subject: message.subject.clone(),
                        last_error: None,
                    });
                    messages.push(super::queue::NewMessage {
                        origin: *origin,
                        message,
                        now: events[*i].now,
                        run: Some(run_id),
                    });
                }
                outcome
            })
            .collect();
        let steps = serde_json::to_string(&outcomes).expect("JSON serializes");
        let event_id = event_ids[*i];
        rows.push((run_id, *run, event_id, events[*i].now, steps));
        written.push((
            *i,
            RunRow {
                id: run_id,
                kind: run.kind,
                name: run.name.clone(),
                trigger: run.trigger,
                // As the database keeps it: to the millisecond.
                fire_time: run.fire_time.map(|t| from_ms(ms(t))),
                event_id: Some(event_id),
                started_at: from_ms(events[*i].now),
                missed: run.missed.into(),
                status: run.status,
                detail: run.detail.clone(),
                service: run.service.clone(),
                steps: serde_json::Value::Array(outcomes),
                messages: queued,
            },
        ));
    }
    let event_rows: Vec<(i64, &NewEvent<'_>)> = event_ids.iter().copied().zip(events).collect();
    inserts.rows(
        "events (id, type, object, idempotency_key, received_at)",
        "(?1, ?2, ?3, NULL, ?4)",
        4,
        &event_rows,
        |row, (id, e)| {
            row.bind(*id).bind(e.event_type).bind(e.object).bind(e.now);
        },
    );
    inserts.rows(
        "runs (id, kind, name, trigger, fire_key, fire_time, event_id, started_at, missed, status, detail, service, steps)",
        "(?1, ?2, ?3, ?4, NULL, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        12,
        &rows,
        |row, (id, run, event_id, now, steps)| {
            row.bind(*id)
                .bind(run.kind.as_str())
                .bind(run.name.as_str())
                .bind(run.trigger.as_str())
                .bind(run.fire_time.map(ms))
                .bind(Some(*event_id))
                .bind(*now)
                .bind(run.missed as i64)
                .bind(run.status.as_str())
                .bind(run.detail.as_deref())
                .bind(run.service.as_str())
                .bind(steps.as_str());
        },
    );
    super::queue::add_messages(inserts, &messages, message_ids);
    let mut records: Vec<EventRecord> =
        event_ids.iter().map(|&id| EventRecord { id, created: true, runs: Vec::new() }).collect();
    for (i, run) in written {
        records[i].runs.push(run);
    }
    Ok(records)
}

/// Writes the run, its steps' messages, and the outcomes with their message ids; `None` (nothing
/// written) when the fire key is taken, because another service ran this fire time.
async fn write_run(tx: &mut Tx, run: NewRun, now: i64) -> Result<Option<i64>> {
    let Some(run_id) = insert_run(tx, &run, now).await? else { return Ok(None) };
    let mut outcomes = Vec::with_capacity(run.steps.len());
    for step in run.steps {
        let mut outcome = step.outcome;
        if let Some((origin, message)) = &step.message {
            let id = insert_message(tx, *origin, message, now, None, Some(run_id)).await?.expect("no key, no conflict");
            outcome["message_id"] = id.into();
        }
        outcomes.push(outcome);
    }
    sqlx::query("UPDATE runs SET steps = $1 WHERE id = $2")
        .bind(serde_json::to_string(&outcomes).expect("JSON serializes"))
        .bind(run_id)
        .execute(&mut **tx)
        .await?;
    Ok(Some(run_id))
}

async fn insert_run(tx: &mut Tx, run: &NewRun, now: i64) -> Result<Option<i64>> {
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO runs (kind, name, trigger, fire_key, fire_time, event_id, started_at, missed, status, detail, service, steps)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, '[]')
         ON CONFLICT (fire_key) WHERE fire_key IS NOT NULL DO NOTHING RETURNING id",
    )
    .bind(run.kind.as_str())
    .bind(&run.name)
    .bind(run.trigger.as_str())
    .bind(&run.fire_key)
    .bind(run.fire_time.map(ms))
    .bind(run.event_id)
    .bind(now)
    .bind(run.missed as i64)
    .bind(run.status.as_str())
    .bind(&run.detail)
    .bind(&run.service)
    .fetch_optional(&mut **tx)
    .await
    .map_err(StoreError::from)?;
    Ok(id)
}
