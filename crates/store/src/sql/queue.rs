//! The queue: enqueue (one, many, once per idempotency key), claim under a lease with a claim
//! token, renew, record attempts in batches fenced by the token, retry.

use panel_domain::{FailureClass, MessageState, Origin, OutgoingMessage, Priority, RecipientState, Settlement};
use sqlx::any::AnyRow;

use super::*;
use crate::{Result, from_ms};

impl SqlStore {
    pub async fn enqueue(
        &self,
        origin: Origin,
        m: &OutgoingMessage,
        now: i64,
        key: Option<&str>,
        fence: Option<&crate::AccessFence>,
    ) -> Result<(i64, bool)> {
        let mut tx = self.write().await?;
        check_fences(&mut tx, fence.as_slice(), now).await?;
        let Some(id) = insert_message(&mut tx, origin, m, now, key, None).await? else {
            let (existing, content): (i64, String) =
                sqlx::query_as("SELECT id, content FROM messages WHERE idempotency_key = $1")
                    .bind(key)
                    .fetch_one(&mut *tx)
                    .await?;
            tx.commit().await?;
            // The same key means the same message: with other content it is a mistake to say,
            // never a new message silently dropped.
            let earlier: OutgoingMessage = super::json(&content)?;
            if !earlier.same_content(m) {
                return Err(crate::StoreError::Conflict(format!(
                    "the idempotency key '{}' was used for message {existing} with different content; \
                     use a new key for a new message",
                    key.unwrap_or_default()
                )));
            }
            return Ok((existing, false));
        };
        wake_at_commit(&mut tx).await?;
        tx.commit().await?;
        Ok((id, true))
    }

    /// What concurrent callers asked for (single messages, events, claims, records), in one
    /// transaction (group commit), each at its own time; the outcomes in their order. On
    /// PostgreSQL a group that needs no transaction runs without one on the committer's own
    /// connection (`commit_without_transaction`). Fewer outcomes than jobs: those after the
    /// last are to be written alone.
    pub async fn commit_group(&self, jobs: &[crate::GroupJob<'_>], held: &mut Held) -> Result<Vec<crate::GroupDone>> {
        let messages: Vec<NewMessage<'_>> = jobs
            .iter()
            .filter_map(|job| match job {
                crate::GroupJob::Message { origin, message, now, .. } => {
                    Some(NewMessage { origin: *origin, message, now: *now, run: None })
                }
                _ => None,
            })
            .collect();
        // The fences of the messages sent on kept token owners: each holds, or nothing is written.
        let mut fences: Vec<&crate::AccessFence> = Vec::new();
        for job in jobs {
            if let crate::GroupJob::Message { fence: Some(fence), .. } = job
                && !fences.contains(fence)
            {
                fences.push(fence);
            }
        }
        if self.dialect == Dialect::Postgres
            && let Some(done) = self.commit_without_transaction(jobs, &messages, &fences, held).await?
        {
            return Ok(done);
        }
        let events: Vec<super::automation::NewEvent<'_>> = jobs
            .iter()
            .filter_map(|job| match job {
                crate::GroupJob::Event { event_type, object, now, plan } => {
                    Some(super::automation::NewEvent { event_type, object, now: *now, plan })
                }
                _ => None,
            })
            .collect();
        let (mut tx, mut ids) = match messages.len() + events.len() {
            0 => (self.write().await?, super::batch::Ids::default()),
            _ => self.write_with_ids().await?,
        };
        if let Some(first) = messages.first() {
            check_fences(&mut tx, &fences, first.now).await?;
        }
        // The messages' and the events' rows go to the database together, after the events'
        // plans (which need the events' ids) made their runs.
        let mut inserts = super::batch::Writes::default();
        let taken = ids.take(&mut tx, &[("messages", messages.len()), ("events", events.len())]).await?;
        let (message_ids, event_ids) = (&taken[0], &taken[1]);
        add_messages(&mut inserts, &messages, message_ids);
        let records = super::automation::add_events(&mut tx, &mut ids, &mut inserts, &events, event_ids).await?;
        inserts.wake_only_if(|n| self.wake_others(n));
        // Inserts alone: their COMMIT goes with them (one round trip on SQLite).
        let inserts_only =
            jobs.iter().all(|job| matches!(job, crate::GroupJob::Message { .. } | crate::GroupJob::Event { .. }));
        let mut tx = if inserts_only {
            inserts.commit(tx).await?;
            None
        } else {
            inserts.execute(&mut tx).await?;
            Some(tx)
        };
        let (mut message_ids, mut records) = (message_ids.iter().copied(), records.into_iter());
        let mut done = Vec::with_capacity(jobs.len());
        for job in jobs {
            done.push(Some(match job {
                crate::GroupJob::Message { .. } => crate::GroupDone::Message {
                    id: message_ids.next().expect("one id for each message"),
                    handed_over: false,
                },
                crate::GroupJob::Event { .. } => {
                    crate::GroupDone::Event(records.next().expect("one record for each event"))
                }
                crate::GroupJob::Record { batch } => {
                    let tx = tx.as_mut().expect("open for records and claims");
                    // PostgreSQL (a group with sends to take from the budget): one statement, as
                    // outside a transaction, where the messages, recipients and attempts were
                    // three.
                    let one = match tx.dialect {
                        Dialect::Postgres => record_in_one_statement(tx, batch).await?,
                        Dialect::Sqlite => None,
                    };
                    crate::GroupDone::Recorded(match one {
                        Some(recorded) => recorded,
                        None => record_in(tx, batch).await?,
                    })
                }
                crate::GroupJob::Claim { .. } => {
                    let tx = tx.as_mut().expect("open for records and claims");
                    crate::GroupDone::Claimed(self.claim_in(tx, ClaimAsk::of(job).expect("a claim")).await?)
                }
                // Last, below: the budget's lock is held from then to the commit.
                crate::GroupJob::Reserve { .. } => {
                    done.push(None);
                    continue;
                }
            }));
        }
        // The group's sends take from their routes' budgets in turn, each seeing the ones
        // before it, after the group's other writes: the budgets stay locked only for them
        // and the commit.
        let sends: Vec<(usize, SendAsk<'_>)> = jobs
            .iter()
            .enumerate()
            .filter_map(|(i, job)| match *job {
                crate::GroupJob::Reserve { now, route, recipients, per_minute, per_day } => {
                    Some((i, SendAsk { now, route, recipients, per_minute, per_day }))
                }
                _ => None,
            })
            .collect();
        if !sends.is_empty() {
            let tx = tx.as_mut().expect("open for sends");
            lock_budgets(tx, sends.iter().map(|(_, ask)| ask.route)).await?;
            let now = sends[0].1.now;
            for (i, ask) in sends {
                done[i] = Some(crate::GroupDone::Reserved(reserve_in(tx, ask).await?));
            }
            self.trim_budget(tx, now).await?;
        }
        let done: Vec<crate::GroupDone> = done.into_iter().map(|d| d.expect("every job answered")).collect();
        if let Some(tx) = tx {
            tx.commit().await?;
        }
        Ok(done)
    }

    /// PostgreSQL: a group of messages alone, as one statement; or of the workers' records
    /// and claims, each one statement on its own, in the order submitted (a record before the
    /// claim that refills its slot). Each statement is atomic and durable on its own: no
    /// `BEGIN` and `COMMIT` round trips, and none of the pool's pings. `None` for any other
    /// group (events), or one too large for a round trip: it takes a transaction. A write that
    /// fails ends the group: the ones before it are done, the rest are written alone.
    async fn commit_without_transaction(
        &self,
        jobs: &[crate::GroupJob<'_>],
        messages: &[NewMessage<'_>],
        fences: &[&crate::AccessFence],
        held: &mut Held,
    ) -> Result<Option<Vec<crate::GroupDone>>> {
        use crate::GroupJob;
        if messages.len() == jobs.len() {
            let ids = match held.get(&self.writer).await {
                Ok(conn) => self.insert_in_one_statement(conn, messages, fences).await,
                Err(e) => Err(e),
            };
            // A fence that did not hold is an answer, not a fault of the connection.
            if ids.as_ref().is_err_and(|e| !matches!(e, crate::StoreError::Stale)) {
                held.failed();
            }
            return Ok(ids?.map(|(ids, handed_over)| {
                ids.into_iter().map(|id| crate::GroupDone::Message { id, handed_over }).collect()
            }));
        }
        if !jobs.iter().all(|job| matches!(job, GroupJob::Record { .. } | GroupJob::Claim { .. })) {
            return Ok(None);
        }
        let mut done = Vec::with_capacity(jobs.len());
        for job in jobs {
            let outcome = match job {
                GroupJob::Record { batch } => self.record_alone(held, batch).await.map(crate::GroupDone::Recorded),
                GroupJob::Claim { .. } => {
                    self.claim_alone(held, ClaimAsk::of(job).expect("a claim")).await.map(crate::GroupDone::Claimed)
                }
                GroupJob::Message { .. } | GroupJob::Event { .. } | GroupJob::Reserve { .. } => {
                    unreachable!("records and claims only")
                }
            };
            match outcome {
                Ok(outcome) => done.push(outcome),
                Err(e) => {
                    held.failed();
                    if done.is_empty() {
                        return Err(e);
                    }
                    break;
                }
            }
        }
        Ok(Some(done))
    }

    /// A group's record on its own (`commit_without_transaction`): one statement on the
    /// committer's connection, or a transaction when too large for one round trip.
    async fn record_alone(&self, held: &mut Held, batch: &[(ClaimRef, AttemptMeta, Settlement)]) -> Result<Vec<bool>> {
        match record_in_one_statement(held.get(&self.writer).await?, batch).await? {
            Some(recorded) => Ok(recorded),
            None => self.record_attempts(batch).await,
        }
    }

    /// A group's claim on its own: one statement on the committer's connection, or a
    /// transaction when it looks for expired leases first (at most every 100 ms).
    async fn claim_alone(&self, held: &mut Held, ask: ClaimAsk<'_>) -> Result<Vec<Claim>> {
        match self.expired_scan_due(ask.now) {
            true => self.claim(ask).await,
            false => self.claim_due(held.get(&self.writer).await?, ask).await,
        }
    }

    /// Many messages in one transaction: one commit (one fsync) for the whole batch. With
    /// whether they were handed over to this process's worker (`insert_in_one_statement`).
    pub async fn enqueue_many(&self, items: &[(Origin, OutgoingMessage)], now: i64) -> Result<(Vec<i64>, bool)> {
        let messages: Vec<NewMessage<'_>> =
            items.iter().map(|(origin, message)| NewMessage { origin: *origin, message, now, run: None }).collect();
        if self.dialect == Dialect::Postgres
            && let Some(inserted) =
                self.insert_in_one_statement(&mut *self.writer.acquire().await?, &messages, &[]).await?
        {
            return Ok(inserted);
        }
        let (mut tx, mut ids) = self.write_with_ids().await?;
        let ids = ids.take(&mut tx, &[("messages", messages.len())]).await?.remove(0);
        let mut inserts = super::batch::Writes::default();
        add_messages(&mut inserts, &messages, &ids);
        inserts.wake_only_if(|n| self.wake_others(n));
        inserts.commit(tx).await?;
        Ok((ids, false))
    }

    /// PostgreSQL: `messages` inserted by one statement outside a transaction, which takes
    /// their ids from the sequence itself: one round trip where `BEGIN`, the ids, the inserts
    /// and `COMMIT` were four (a busy service's enqueues wait for each other's). `None`, with
    /// nothing written, when they need more than one round trip. Their ids, in their order, and
    /// whether they were handed over to this process's worker (which was told, `handed_ready`).
    async fn insert_in_one_statement(
        &self,
        conn: &mut sqlx::AnyConnection,
        messages: &[NewMessage<'_>],
        fences: &[&crate::AccessFence],
    ) -> Result<Option<(Vec<i64>, bool)>> {
        if messages.is_empty() {
            return Ok(Some((Vec::new(), false)));
        }
        let numbers: Vec<i64> = (1..=messages.len() as i64).collect();
        let mut inserts = super::batch::Writes::default();
        // The fences first, the statement's `part0`, raising `Stale` when one does not hold; the
        // rows the statement returns read it, so it is run.
        if !fences.is_empty() {
            let now = messages[0].now;
            inserts.statement(&fences_sql(fences.len()), 4 * fences.len(), |row| bind_fences(row, fences, now));
        }
        // Room for them in this process's worker: inserted already claimed for it.
        let taker = self.hand_over(messages.len());
        let now = messages[0].now;
        let lease = taker.as_ref().map(|(owner, lease_ms)| (owner.as_str(), now + lease_ms));
        add_messages_with(&mut inserts, messages, &numbers, RowIds::Numbered, lease);
        // In the one part every other uses: a part nothing uses is not run.
        inserts.wake_only_if(|n| taker.is_none() && self.wake_others(n));
        let wake = match inserts.wakes() {
            true => format!(", (SELECT 1 FROM pg_notify('{WAKE_CHANNEL}', '{}')) AS woke", self.wake_origin),
            false => String::new(),
        };
        let with = format!(
            "new_ids AS (SELECT array_agg({} ORDER BY n) AS a{wake} FROM generate_series(1, {}) AS n)",
            super::batch::next_ids("messages"),
            messages.len()
        );
        // A claim reads the settings and secrets generations in its statement: so does this.
        let select = format!(
            "SELECT new_ids.a[i] AS id{}{} FROM new_ids, generate_subscripts(new_ids.a, 1) AS i ORDER BY i",
            match taker {
                Some(_) => format!(", {}", super::settings::GENERATION_COLUMNS),
                None => String::new(),
            },
            if fences.is_empty() { "" } else { ", (SELECT held FROM part0) AS fenced" }
        );
        let Some((sql, args)) = inserts.into_one_statement(&with, &select)? else {
            if taker.is_some() {
                self.add_room(u32::try_from(messages.len()).unwrap_or(u32::MAX));
            }
            return Ok(None);
        };
        // Committed once this returns: no error after it (a group that fails is written again).
        let rows = sqlx::query_with(sqlx::AssertSqlSafe(sql), args).fetch_all(&mut *conn).await.map_err(stale_or)?;
        let ids = rows.iter().map(|row| cell(row, "messages", "id")).collect::<Result<Vec<i64>>>()?;
        debug_assert_eq!(ids.len(), messages.len());
        let mut handed_over = false;
        if let Some(taker) = &taker {
            let seen = super::settings::generation_from_row(rows.first().expect("a row for each message"))?;
            let claims = messages.iter().zip(&ids).map(|(m, &id)| handed_claim(m, id, seen)).collect();
            handed_over = self.handed(taker, claims);
            if !handed_over {
                // The worker stopped while they were inserted: queued again at once, for any
                // worker, instead of waiting for their leases to run out. Committed already,
                // so a failure here leaves them to the leases.
                let release = format!(
                    "UPDATE messages SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL
                      WHERE id IN ({}) AND state = 'sending' AND claim_token = 1",
                    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
                );
                if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(release)).execute(&mut *conn).await {
                    tracing::warn!(error = %e, "messages inserted for a worker that stopped wait for their leases");
                }
            }
        }
        Ok(Some((ids, handed_over)))
    }

    pub async fn claim(&self, ask: ClaimAsk<'_>) -> Result<Vec<Claim>> {
        let mut tx = self.write().await?;
        let claims = self.claim_in(&mut tx, ask).await?;
        tx.commit().await?;
        Ok(claims)
    }

    /// Records each expired lease it can lock as an interrupted attempt and makes its message due
    /// again; how many it took. Several services may look at once: each takes the ones it locks.
    async fn take_expired(&self, tx: &mut Tx, now: i64) -> Result<usize> {
        let sql = format!(
            "SELECT id, lease_owner FROM messages{} WHERE state = 'sending' AND lease_expires_at < $1{}",
            self.dialect.use_index("messages_leased"),
            self.dialect.skip_locked()
        );
        let expired = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now).fetch_all(&mut **tx).await?;
        let mut count = 0;
        for row in &expired {
            let id: i64 = cell(row, "messages", "id")?;
            let previous: Option<String> = cell(row, "messages", "lease_owner")?;
            let taken = sqlx::query(
                "UPDATE messages SET state = 'retrying', interrupted = interrupted + 1, attempts = attempts + 1,
                        lease_owner = NULL, lease_expires_at = NULL, next_attempt_at = $2, updated_at = $2
                 WHERE id = $1 AND state = 'sending'",
            )
            .bind(id)
            .bind(now)
            .execute(&mut **tx)
            .await?;
            if taken.rows_affected() == 0 {
                continue;
            }
            count += 1;
            sqlx::query(
                "INSERT INTO attempts (message_id, started_at, finished_at, service_id, relay, settings_version,
                                       outcome, stage, detail, hint, recipients)
                 VALUES ($1, $2, $2, $3, '', 0, 'interrupted', 'unknown', $4, $5, '[]')",
            )
            .bind(id)
            .bind(now)
            .bind(previous.unwrap_or_default())
            .bind("the worker holding this message stopped before recording an outcome")
            .bind("the relay may already have accepted it; a duplicate delivery is possible")
            .execute(&mut **tx)
            .await?;
        }
        Ok(count)
    }

    /// Whether a claim at `now` looks for expired leases first. They are looked for at most
    /// every EXPIRED_SCAN_EVERY_MS (store time), busy or idle: a lease runs for a minute, so
    /// 100 ms more before it is taken changes nothing, while looking in every claim cost a
    /// statement per claim, and with several services most claims (woken together, one of
    /// them getting the mail) come back empty and looked each time. A clock that went back (a
    /// test's) looks at once.
    fn expired_scan_due(&self, now: i64) -> bool {
        let last = self.expired_scan.load(std::sync::atomic::Ordering::Relaxed);
        now.saturating_sub(last) >= EXPIRED_SCAN_EVERY_MS || now < last
    }

    /// `claim`, inside the caller's transaction.
    async fn claim_in(&self, tx: &mut Tx, ask: ClaimAsk<'_>) -> Result<Vec<Claim>> {
        if self.expired_scan_due(ask.now) {
            self.expired_scan.store(ask.now, std::sync::atomic::Ordering::Relaxed);
            self.take_expired(tx, ask.now).await?;
        }
        self.claim_due(tx, ask).await
    }

    /// The claim's one round trip (PostgreSQL: one statement; SQLite: three in one string): in a
    /// transaction or on its own.
    async fn claim_due(&self, conn: &mut sqlx::AnyConnection, ask: ClaimAsk<'_>) -> Result<Vec<Claim>> {
        // Urgent mail first, then bulk (priority, then due time). `bulk_first` turns the order
        // round for this claim: the worker asks so every few claims, so that bulk mail keeps a
        // share while urgent mail keeps coming. SKIP LOCKED (PostgreSQL): N services claiming
        // at once each get different steps, no waiting. The limit is a cast, not a bare
        // parameter: SQLite (3.51) plans a bare `LIMIT ?` by the value bound, so binding a new
        // one expired the statement and every claim was parsed and planned again (~4 % of a
        // busy service's CPU, perf on `panel serve`).
        let ClaimAsk { owner, now, lease_ms, limit, bulk_first } = ask;
        let order = if bulk_first { "priority DESC, next_attempt_at, id" } else { "priority, next_attempt_at, id" };
        let update = format!(
            "UPDATE messages SET state = 'sending', lease_owner = $1, lease_expires_at = $2,
                    claim_token = claim_token + 1, updated_at = $3
             WHERE id IN (SELECT id FROM messages{} WHERE state IN ('queued', 'retrying') AND next_attempt_at <= $3
                          ORDER BY {order} LIMIT CAST($4 AS INTEGER){})
             RETURNING id, origin, content, claim_token, attempts, window_start",
            self.dialect.use_index("messages_due"),
            self.dialect.skip_locked()
        );
        let bind = |sql: String| {
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind(owner).bind(now + lease_ms).bind(now).bind(i64::from(limit))
        };
        let (mut claims, recipients): (Vec<Claim>, Vec<ClaimedRecipient>) = match self.dialect {
            // One statement, one round trip: each claimed row with its recipients as a JSON
            // array (a row per message: its content is not repeated per recipient).
            Dialect::Postgres => {
                // The settings and secrets generations too: a worker's read of them after
                // each claim that took something was a round trip of its own.
                let sql = format!(
                    "WITH claimed AS ({update})
                         SELECT c.*, CAST((SELECT json_agg(json_build_array(r.position, r.address, r.state, r.reply)
                                                           ORDER BY r.position)
                                           FROM recipients r WHERE r.message_id = c.id) AS TEXT) AS recipients,
                                {}
                         FROM claimed c",
                    super::settings::GENERATION_COLUMNS
                );
                let rows = bind(sql).fetch_all(&mut *conn).await?;
                let mut recipients = Vec::new();
                for row in &rows {
                    let id: i64 = cell(row, "messages", "id")?;
                    let list: Option<String> = cell(row, "recipients", "recipients")?;
                    let list: Vec<(i64, String, String, Option<String>)> =
                        list.map(|l| json(&l)).transpose()?.unwrap_or_default();
                    recipients.extend(list.into_iter().map(|(p, a, s, r)| (id, p, a, s, r)));
                }
                let claims = rows
                    .iter()
                    .map(|row| claim_from_row(row, super::settings::generation_from_row(row)?))
                    .collect::<Result<_>>()?;
                (claims, recipients)
            }
            // SQLite has no UPDATE inside WITH: the claim, its messages' recipients and the
            // generations are three statements sent as one (each statement is a hop to
            // SQLite's thread and back, ~100 us on a busy two-core machine). Their rows come
            // back in that order, told apart by their first column. The recipients' statement
            // finds the claimed messages by owner and times; one claimed by an earlier claim of
            // the same owner at the same instant is not this claim's and is passed over.
            Dialect::Sqlite => {
                let sql = format!(
                    "{update};
                     SELECT message_id, position, address, state, reply FROM recipients
                      WHERE message_id IN (SELECT id FROM messages INDEXED BY messages_leased
                                            WHERE state = 'sending' AND lease_expires_at = $2
                                              AND lease_owner = $1 AND updated_at = $3)
                      ORDER BY message_id, position;
                     SELECT {}",
                    super::settings::GENERATION_COLUMNS
                );
                let rows = bind(sql).fetch_all(&mut *conn).await?;
                let mut recipients = Vec::new();
                let mut seen = None;
                let mut claimed = Vec::new();
                for row in &rows {
                    match row.columns().first().map(sqlx::Column::name).unwrap_or_default() {
                        "message_id" => recipients.push((
                            cell(row, "recipients", "message_id")?,
                            cell(row, "recipients", "position")?,
                            cell(row, "recipients", "address")?,
                            cell(row, "recipients", "state")?,
                            cell(row, "recipients", "reply")?,
                        )),
                        "settings_generation" => seen = Some(super::settings::generation_from_row(row)?),
                        _ => claimed.push(row),
                    }
                }
                let seen = seen.ok_or_else(|| crate::StoreError::Corrupt("the claim read no generations".into()))?;
                (claimed.into_iter().map(|row| claim_from_row(row, seen)).collect::<Result<_>>()?, recipients)
            }
        };
        for (id, position, address, state, reply) in recipients {
            let Some(c) = claims.iter_mut().find(|c| c.reference.id == id) else { continue };
            let state = RecipientState::parse(&state).ok_or_else(|| {
                crate::StoreError::Corrupt(format!("recipients.state: '{state}' is not one this build knows"))
            })?;
            match state {
                RecipientState::Pending => c.pending.push(PendingRecipient { position, address }),
                // Settled by an earlier attempt: counted, so the state follows every recipient.
                RecipientState::Delivered => c.earlier.delivered += 1,
                _ => {
                    c.earlier.failed += 1;
                    if c.earlier.refusal.is_none() {
                        c.earlier.refusal = Some(format!("{address}: {}", reply.unwrap_or_default()));
                    }
                }
            }
        }
        claims.sort_by_key(|c| c.reference.id);
        Ok(claims)
    }

    /// Takes the sends older than a day (the longest a limit looks back) out of the budget, at
    /// most every `BUDGET_TRIM_EVERY_MS`: housekeeping only, since a window is counted by the
    /// totals of the sends in it, whatever older ones are kept. Deleting them at every send was
    /// a statement more for each, under the budget's lock.
    async fn trim_budget(&self, tx: &mut Tx, now: i64) -> Result<()> {
        const DAY: i64 = 86_400_000;
        let last = self.budget_trimmed.load(std::sync::atomic::Ordering::Relaxed);
        if now.saturating_sub(last) < BUDGET_TRIM_EVERY_MS && now >= last {
            return Ok(());
        }
        self.budget_trimmed.store(now, std::sync::atomic::Ordering::Relaxed);
        sqlx::query("DELETE FROM send_log WHERE at <= $1").bind(now - DAY).execute(&mut **tx).await?;
        Ok(())
    }

    /// Takes a send from the sending limits' shared budget, in a transaction of its own:
    /// `None` when taken (and logged), else when the budget has room again.
    pub async fn reserve_send(&self, ask: SendAsk<'_>) -> Result<Option<i64>> {
        let mut tx = self.write().await?;
        lock_budgets(&mut tx, std::iter::once(ask.route)).await?;
        let until = reserve_in(&mut tx, ask).await?;
        self.trim_budget(&mut tx, ask.now).await?;
        tx.commit().await?;
        Ok(until)
    }

    /// Gives a claimed message back unsent, due at `until`, with why in its last error (the
    /// sending limit): no attempt is recorded. Fenced by the claim token.
    pub async fn defer_claim(&self, claim: &ClaimRef, until: i64, now: i64, note: &str) -> Result<bool> {
        let mut tx = self.write().await?;
        let done = sqlx::query(
            "UPDATE messages SET state = CASE WHEN attempts > 0 THEN 'retrying' ELSE 'queued' END,
                    lease_owner = NULL, lease_expires_at = NULL, next_attempt_at = $1, last_error = $2, updated_at = $3
             WHERE id = $4 AND claim_token = $5 AND state = 'sending'",
        )
        .bind(until)
        .bind(note)
        .bind(now)
        .bind(claim.id)
        .bind(claim.token)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn renew_lease(&self, claim: &ClaimRef, until: i64) -> Result<bool> {
        let mut tx = self.write().await?;
        let done = sqlx::query(
            "UPDATE messages SET lease_expires_at = $1 WHERE id = $2 AND claim_token = $3 AND state = 'sending'",
        )
        .bind(until)
        .bind(claim.id)
        .bind(claim.token)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records several attempts in one transaction (one commit, one fsync, for all of them).
    /// Each is fenced by its claim token on its own: a stale one is skipped, the others kept.
    /// On PostgreSQL one statement outside a transaction when it fits (`record_in_one_statement`).
    pub async fn record_attempts(&self, batch: &[(ClaimRef, AttemptMeta, Settlement)]) -> Result<Vec<bool>> {
        if self.dialect == Dialect::Postgres
            && let Some(recorded) = record_in_one_statement(&mut *self.writer.acquire().await?, batch).await?
        {
            return Ok(recorded);
        }
        let mut tx = self.write().await?;
        let recorded = record_in(&mut tx, batch).await?;
        tx.commit().await?;
        Ok(recorded)
    }

    pub async fn retry_message(&self, id: i64, now: i64) -> Result<RetryResult> {
        let mut tx = self.write().await?;
        let row: Option<(String, Option<i64>)> =
            sqlx::query_as("SELECT state, content_removed_at FROM messages WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((state, removed)) = row else { return Ok(RetryResult::NotFound) };
        let state = known_state(&state)?;
        if state == MessageState::Retrying {
            // Send now: due at once, same recipients and give-up window.
            sqlx::query("UPDATE messages SET next_attempt_at = $2 WHERE id = $1 AND state = 'retrying'")
                .bind(id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(RetryResult::Requeued);
        }
        if !state.is_refused() {
            return Ok(RetryResult::NotFailed { state });
        }
        if let Some(at) = removed {
            return Ok(RetryResult::ContentRemoved { at: crate::from_ms(at) });
        }
        sqlx::query("UPDATE recipients SET state = 'pending' WHERE message_id = $1 AND state = 'failed'")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE messages SET state = 'retrying', next_attempt_at = $2, updated_at = $2, window_start = $2,
                    failure_class = NULL WHERE id = $1",
        )
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(RetryResult::Requeued)
    }

    /// Makes every retrying message due now (send now), keeping recipients and windows.
    pub async fn send_retrying_now(&self, now: i64) -> Result<u64> {
        let mut tx = self.write().await?;
        let done =
            sqlx::query("UPDATE messages SET next_attempt_at = $1 WHERE state = 'retrying' AND next_attempt_at > $1")
                .bind(now)
                .execute(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// Cancels a message no worker holds: final, never sent again; who and why go into its
    /// last error and the audit log, in the same transaction.
    pub async fn cancel_message(&self, id: i64, by: &str, reason: &str, now: i64) -> Result<CancelResult> {
        let mut tx = self.write().await?;
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM messages WHERE id = $1").bind(id).fetch_optional(&mut *tx).await?;
        let Some(state) = state else { return Ok(CancelResult::NotFound) };
        let state = known_state(&state)?;
        if !state.is_cancellable() {
            return Ok(CancelResult::NotCancellable { state });
        }
        sqlx::query(
            "UPDATE messages SET state = 'cancelled', updated_at = $2, failure_class = NULL, last_error = $3
             WHERE id = $1",
        )
        .bind(id)
        .bind(now)
        .bind(format!("cancelled by {by}: {reason}"))
        .execute(&mut *tx)
        .await?;
        let event = AuditEvent::new("message.cancelled", &format!("message {id}"), format!("was {state}; {reason}"));
        audit(&mut tx, by, now, &[event]).await?;
        tx.commit().await?;
        Ok(CancelResult::Cancelled { was: state })
    }

    pub async fn retry_failed(&self, since: i64, now: i64) -> Result<u64> {
        let mut tx = self.write().await?;
        sqlx::query(
            "UPDATE recipients SET state = 'pending' WHERE state = 'failed'
             AND message_id IN (SELECT id FROM messages WHERE state IN ('failed', 'partly_failed') AND updated_at >= $1
                                AND content_removed_at IS NULL)",
        )
        .bind(since)
        .execute(&mut *tx)
        .await?;
        let done = sqlx::query(
            "UPDATE messages SET state = 'retrying', next_attempt_at = $2, updated_at = $2, window_start = $2,
                    failure_class = NULL WHERE state IN ('failed', 'partly_failed') AND updated_at >= $1
                    AND content_removed_at IS NULL",
        )
        .bind(since)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    pub async fn message_state(&self, id: i64) -> Result<Option<MessageState>> {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM messages WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        // A state this build does not know is an error, not "no such message".
        state.map(|s| known_state(&s)).transpose()
    }
}

fn claim_from_row(r: &AnyRow, seen: ConfigGeneration) -> Result<Claim> {
    Ok(Claim {
        reference: ClaimRef { id: cell(r, "messages", "id")?, token: cell(r, "messages", "claim_token")? },
        origin: parse_origin(r)?,
        message: json(&cell::<String>(r, "messages", "content")?)?,
        attempts: cell(r, "messages", "attempts")?,
        created_at: from_ms(cell(r, "messages", "window_start")?),
        pending: Vec::new(),
        earlier: Default::default(),
        seen,
    })
}

/// Inserts a message and its recipients; `None` when `key` is already taken (nothing written).
/// With a key, a concurrent insert of the same key waits for the other and then does nothing.
pub(super) async fn insert_message(
    tx: &mut Tx,
    origin: Origin,
    m: &OutgoingMessage,
    now: i64,
    key: Option<&str>,
    run_id: Option<i64>,
) -> Result<Option<i64>> {
    let inserted: Option<i64> = sqlx::query_scalar(
        "INSERT INTO messages (origin, state, content, from_addr, subject, message_id, used_fallback,
                               created_at, updated_at, next_attempt_at, window_start, idempotency_key, run_id,
                               priority)
         VALUES ($1, 'queued', $2, $3, $4, $5, $6, $7, $7, $7, $7, $8, $9, $10)
         ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id",
    )
    .bind(origin.as_str())
    .bind(serde_json::to_string(m).expect("message serializes"))
    .bind(m.from.to_string())
    .bind(&m.subject)
    .bind(&m.message_id)
    .bind(m.used_fallback_recipient)
    .bind(now)
    .bind(key)
    .bind(run_id)
    .bind(m.priority.unwrap_or(Priority::default_for(origin)).rank())
    .fetch_optional(&mut **tx)
    .await?;
    let Some(id) = inserted else { return Ok(None) };
    for (position, (kind, address)) in m.recipients().into_iter().enumerate() {
        sqlx::query(
            "INSERT INTO recipients (message_id, position, kind, address, state) VALUES ($1, $2, $3, $4, 'pending')",
        )
        .bind(id)
        .bind(position as i64)
        .bind(kind.as_str())
        .bind(address.as_str())
        .execute(&mut **tx)
        .await?;
    }
    Ok(Some(id))
}

/// A message to insert with others (no idempotency key), and the run that sent it.
pub(super) struct NewMessage<'a> {
    pub origin: Origin,
    pub message: &'a OutgoingMessage,
    pub now: i64,
    pub run: Option<i64>,
}

/// Adds `messages`, with the ids taken for them, and their recipients to `inserts`: a few
/// statements for them all, sent with whatever else the transaction inserts. Their commit
/// wakes every service's workers (`Writes::wake_on_commit`).
pub(super) fn add_messages(inserts: &mut super::batch::Writes, messages: &[NewMessage<'_>], ids: &[i64]) {
    add_messages_with(inserts, messages, ids, RowIds::Bound, None);
}

/// A message inserted already claimed (`SqlStore::hand_over`), as a claim of it would find it:
/// its first claim (token 1), every recipient pending.
fn handed_claim(m: &NewMessage<'_>, id: i64, seen: ConfigGeneration) -> Claim {
    let pending = m.message.recipients().into_iter().enumerate();
    Claim {
        reference: ClaimRef { id, token: 1 },
        origin: m.origin,
        message: m.message.clone(),
        attempts: 0,
        created_at: from_ms(m.now),
        pending: pending
            .map(|(position, (_, address))| PendingRecipient {
                position: position as i64,
                address: address.as_str().to_string(),
            })
            .collect(),
        earlier: Default::default(),
        seen,
    }
}

/// The check of `n` fences (migration 22), its values `?1` .. `?{4 n}` (`bind_fences`): true, or
/// it raises `FENCE_FAILED`.
fn fences_sql(n: usize) -> String {
    let checks = super::values_template(n, 4, "(panel_access_unchanged(?1, ?2, ?3, ?4))");
    format!("SELECT bool_and(held) AS held FROM (VALUES {checks}) AS f (held)")
}

/// The SQLSTATE `panel_access_unchanged` raises when a fence does not hold.
const FENCE_FAILED: &str = "PN001";

/// Binds each fence's four values, in `fences_sql`'s order.
fn bind_fences(row: &mut super::batch::Row<'_>, fences: &[&crate::AccessFence], now: i64) {
    for fence in fences {
        row.bind(fence.token_hash.clone()).bind(fence.role.clone()).bind(fence.settings_version).bind(now);
    }
}

/// `StoreError::Stale` for a fence that did not hold; any other error as it is.
fn stale_or(e: sqlx::Error) -> crate::StoreError {
    match &e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some(FENCE_FAILED) => crate::StoreError::Stale,
        _ => e.into(),
    }
}

/// Checks `fences` in `tx`, before its writes: `Stale` when one does not hold, and the caller
/// rolls back. On SQLite no token owner is kept, so none is ever given: one would fail closed.
async fn check_fences(tx: &mut Tx, fences: &[&crate::AccessFence], now: i64) -> Result<()> {
    if fences.is_empty() {
        return Ok(());
    }
    if tx.dialect == Dialect::Sqlite {
        return Err(crate::StoreError::Stale);
    }
    // One statement for all (not `WITH` parts: a part nothing reads is not run).
    let mut check = super::batch::Writes::default();
    check.statement(&fences_sql(fences.len()), 4 * fences.len(), |row| bind_fences(row, fences, now));
    check.execute(tx).await.map_err(|e| match e {
        crate::StoreError::Database(e) => stale_or(e),
        e => e,
    })
}

/// Where the rows `add_messages_with` writes get their ids.
#[derive(Clone, Copy)]
enum RowIds {
    /// Each row's id, taken before the statement, bound as its `?1`.
    Bound,
    /// PostgreSQL (`insert_in_one_statement`): the value bound as a row's `?1` is its number in
    /// `new_ids`, the part of the same statement that takes the ids from the sequence.
    Numbered,
}

/// `add_messages`, each message's id as `ids` says with `numbers`' value bound as its `?1`;
/// with `lease` (owner, expiry), already claimed for that owner (`SqlStore::hand_over`).
fn add_messages_with(
    inserts: &mut super::batch::Writes,
    messages: &[NewMessage<'_>],
    numbers: &[i64],
    ids: RowIds,
    lease: Option<(&str, i64)>,
) {
    debug_assert_eq!(messages.len(), numbers.len());
    if !messages.is_empty() {
        inserts.wake_on_commit(messages.len());
    }
    let rows: Vec<(i64, &NewMessage<'_>)> = numbers.iter().copied().zip(messages).collect();
    let (table, values, width) = match lease {
        None => (
            "messages (id, origin, state, content, from_addr, subject, message_id, used_fallback,
                       created_at, updated_at, next_attempt_at, window_start, priority, run_id)",
            "?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13",
            13,
        ),
        // As a claim leaves it: sending, leased, its first claim token.
        Some(_) => (
            "messages (id, origin, state, content, from_addr, subject, message_id, used_fallback,
                       created_at, updated_at, next_attempt_at, window_start, priority, run_id,
                       lease_owner, lease_expires_at, claim_token)",
            "?1, ?2, 'sending', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, 1",
            15,
        ),
    };
    add_rows(inserts, ids, table, values, width, &rows, |row, (number, m)| {
        row.bind(*number)
            .bind(m.origin.as_str())
            .bind(serde_json::to_string(m.message).expect("message serializes"))
            .bind(m.message.from.to_string())
            .bind(m.message.subject.as_str())
            .bind(m.message.message_id.as_str())
            .bind(m.message.used_fallback_recipient)
            // Each parameter once, in order: on SQLite they bind as anonymous ones (`batch.rs`).
            .bind(m.now)
            .bind(m.now)
            .bind(m.now)
            .bind(m.now)
            .bind(m.message.priority.unwrap_or(Priority::default_for(m.origin)).rank())
            .bind(m.run);
        if let Some((owner, expires)) = lease {
            row.bind(owner).bind(expires);
        }
    });
    let recipients: Vec<(i64, i64, &str, &str)> = rows
        .iter()
        .flat_map(|&(number, m)| {
            m.message
                .recipients()
                .into_iter()
                .enumerate()
                .map(move |(position, (kind, address))| (number, position as i64, kind.as_str(), address.as_str()))
        })
        .collect();
    add_rows(
        inserts,
        ids,
        "recipients (message_id, position, kind, address, state)",
        "?1, ?2, ?3, ?4, 'pending'",
        4,
        &recipients,
        |row, &(number, position, kind, address)| {
            row.bind(number).bind(position).bind(kind).bind(address);
        },
    );
}

/// The inserts of `add_messages_with` into `table`, a row's values as `values` lists them (`?1`
/// its id, `?k` its kth value bound): bound in place, or (`RowIds::Numbered`) read from the
/// rows joined to `new_ids`, whose `?1`th id is the row's.
fn add_rows<T>(
    inserts: &mut super::batch::Writes,
    ids: RowIds,
    table: &str,
    values: &str,
    width: usize,
    rows: &[T],
    bind: impl FnMut(&mut super::batch::Row<'_>, &T),
) {
    match ids {
        RowIds::Bound => inserts.rows(table, &format!("({values})"), width, rows, bind),
        RowIds::Numbered => {
            let mut select = String::from("SELECT ");
            let mut rest = values;
            while let Some(at) = rest.find('?') {
                select.push_str(&rest[..at]);
                let digits = rest[at + 1..].bytes().take_while(u8::is_ascii_digit).count();
                match &rest[at + 1..at + 1 + digits] {
                    "1" => select.push_str("new_ids.a[CAST(v.column1 AS INTEGER)]"),
                    k => select.push_str(&format!("v.column{k}")),
                }
                rest = &rest[at + 1 + digits..];
            }
            select.push_str(rest);
            select.push_str(" FROM new_ids");
            let row = format!("({})", (1..=width).map(|k| format!("?{k}")).collect::<Vec<_>>().join(", "));
            inserts.rows_joined(table, &select, &row, width, rows, bind);
        }
    }
}

/// Several services' sends take from one budget per route, so that two services never both
/// take its last slot: SQLite's writer holds the database's write lock for the whole
/// transaction (BEGIN IMMEDIATE); PostgreSQL takes a transaction-level advisory lock for each
/// route, held to the commit, all in one statement and in the routes' order (two groups never
/// wait for each other's). A table lock did the same for every route at once, and also waited
/// for autovacuum on the table, which a busy budget's inserts and deletes start often.
async fn lock_budgets<'a>(tx: &mut Tx, routes: impl Iterator<Item = &'a str>) -> Result<()> {
    if tx.dialect == Dialect::Sqlite {
        return Ok(());
    }
    let mut routes: Vec<&str> = routes.collect();
    routes.sort_unstable();
    routes.dedup();
    // Keyed (namespace, hash of the route): apart from the single-key locks of migrations.
    let locks: Vec<String> =
        (1..=routes.len()).map(|i| format!("pg_advisory_xact_lock({BUDGET_LOCKS}, hashtext(${i}))")).collect();
    let sql = format!("SELECT {}", locks.join(", "));
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for route in routes {
        query = query.bind(route);
    }
    query.execute(&mut **tx).await?;
    Ok(())
}

/// The advisory locks' namespace of the sending budgets (`lock_budgets`).
const BUDGET_LOCKS: i32 = 7215015;

/// What a send takes from its route's budget (`reserve_in`).
#[derive(Clone, Copy)]
pub(crate) struct SendAsk<'a> {
    pub now: i64,
    pub route: &'a str,
    pub recipients: i64,
    pub per_minute: Option<i64>,
    pub per_day: Option<i64>,
}

/// Takes a send from the sending limits' budget inside `tx`, which holds the route's budget
/// (`lock_budgets`): `None` when taken (and logged), else when the budget has room again
/// (nothing written then).
async fn reserve_in(tx: &mut Tx, ask: SendAsk<'_>) -> Result<Option<i64>> {
    const MINUTE: i64 = 60_000;
    const DAY: i64 = 86_400_000;
    let SendAsk { now, route, recipients, per_minute, per_day } = ask;
    // The route's newest send (its running totals: migration 0021), and the totals before the
    // first send of each window: what a window holds is the difference. One round trip of
    // index seeks, however many sends the day holds.
    let (newest_at, sends, sent, sends_before, sent_before): (Option<i64>, i64, i64, Option<i64>, Option<i64>) =
        sqlx::query_as(
            "SELECT (SELECT at FROM send_log WHERE route = $1 ORDER BY at DESC, sends_total DESC LIMIT 1),
                    COALESCE((SELECT sends_total FROM send_log WHERE route = $1
                               ORDER BY at DESC, sends_total DESC LIMIT 1), 0),
                    COALESCE((SELECT recipients_total FROM send_log WHERE route = $1
                               ORDER BY at DESC, sends_total DESC LIMIT 1), 0),
                    (SELECT sends_total - 1 FROM send_log WHERE route = $1 AND at > $2
                      ORDER BY at, sends_total LIMIT 1),
                    (SELECT recipients_total - recipients FROM send_log WHERE route = $1 AND at > $3
                      ORDER BY at, sends_total LIMIT 1)",
        )
        .bind(route)
        .bind(now - MINUTE)
        .bind(now - DAY)
        .fetch_one(&mut **tx)
        .await?;
    if let Some(limit) = per_minute {
        let recent = sends_before.map_or(0, |before| sends - before);
        if recent >= limit {
            // Room comes when the send `limit` places from the newest ages out of the minute.
            let frees: i64 = sqlx::query_scalar(
                "SELECT at FROM send_log WHERE route = $1 AND at > $2 AND sends_total = $3
                      ORDER BY at, sends_total LIMIT 1",
            )
            .bind(route)
            .bind(now - MINUTE)
            .bind(sends - limit + 1)
            .fetch_one(&mut **tx)
            .await?;
            return Ok(Some(frees + MINUTE));
        }
    }
    if let Some(limit) = per_day {
        let used = sent_before.map_or(0, |before| sent - before);
        // A message bigger than the whole budget goes once nothing else was sent for a day.
        let need = recipients.min(limit);
        if used + need > limit {
            // Room comes when the oldest sends up to the first whose total reaches this (the
            // newest does: need <= limit) have aged out of the day.
            let frees: i64 = sqlx::query_scalar(
                "SELECT at FROM send_log WHERE route = $1 AND at > $2 AND recipients_total >= $3
                  ORDER BY at, sends_total LIMIT 1",
            )
            .bind(route)
            .bind(now - DAY)
            .bind(sent + need - limit)
            .fetch_one(&mut **tx)
            .await?;
            return Ok(Some(frees + DAY));
        }
    }
    // Stamped no earlier than the newest send (a clock that went back): the route's sends stay
    // in the order taken, which their totals follow, and count in a window as long as the
    // newest.
    let at = newest_at.map_or(now, |newest| newest.max(now));
    sqlx::query(
        "INSERT INTO send_log (at, recipients, route, sends_total, recipients_total) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(at)
    .bind(recipients)
    .bind(route)
    .bind(sends + 1)
    .bind(sent + recipients)
    .execute(&mut **tx)
    .await?;
    Ok(None)
}

/// How often (store time, ms) a service takes the sends older than a day out of the budget.
const BUDGET_TRIM_EVERY_MS: i64 = 1_000;

/// What a claim asks for: up to `limit` due messages for `owner`, leased for `lease_ms` from
/// `now`, bulk mail before urgent when `bulk_first` (the share bulk mail keeps).
#[derive(Clone, Copy)]
pub(crate) struct ClaimAsk<'a> {
    pub owner: &'a str,
    pub now: i64,
    pub lease_ms: i64,
    pub limit: u32,
    pub bulk_first: bool,
}

impl<'a> ClaimAsk<'a> {
    /// A group's claim, with its limit counted now; `None` for any other job.
    fn of(job: &crate::GroupJob<'a>) -> Option<ClaimAsk<'a>> {
        match *job {
            crate::GroupJob::Claim { owner, now, lease_ms, limit, bulk_first } => {
                Some(ClaimAsk { owner, now, lease_ms, limit: limit(), bulk_first })
            }
            _ => None,
        }
    }
}

/// A claimed message's recipient: (message, position, address, state, reply).
type ClaimedRecipient = (i64, i64, String, String, Option<String>);

/// How often a service looks for expired leases (store time, ms).
const EXPIRED_SCAN_EVERY_MS: i64 = 100;

/// Attempts recorded in one statement, at most (15 parameters each).
const RECORD_CHUNK: usize = 64;

/// `record_attempts`, inside the caller's transaction: a few statements for the whole batch
/// (the messages, their recipients, the attempts), not four for each attempt. Each attempt is
/// fenced by its claim token on its own: a stale one changes nothing and is reported false.
async fn record_in(tx: &mut Tx, batch: &[(ClaimRef, AttemptMeta, Settlement)]) -> Result<Vec<bool>> {
    let mut recorded = Vec::with_capacity(batch.len());
    for chunk in batch.chunks(RECORD_CHUNK) {
        recorded.extend(record_chunk(tx, chunk).await?);
    }
    Ok(recorded)
}

/// A recipient's new state and the reply that gave it.
type Outcome<'a> = (&'a str, Option<&'a str>);

/// The new states of `attempts` messages, each only while its claim is still the current one:
/// an UPDATE returning `(id, claim_token)` of each message it recorded, its values `?1` ..
/// `?{8 * attempts}` as `bind_message_states` binds them.
fn update_messages(attempts: usize) -> String {
    let rows = values_template(
        attempts,
        8,
        "(CAST(?1 AS BIGINT), CAST(?2 AS BIGINT), CAST(?3 AS TEXT), CAST(?4 AS BIGINT), CAST(?5 AS BIGINT), \
          CAST(?6 AS TEXT), CAST(?7 AS TEXT), CAST(?8 AS BIGINT), 'sending')",
    );
    // VALUES columns are column1, column2, ... in both databases. The state a message must
    // still be in is a value of each row (column9), not a constant. With `state = 'sending'`
    // PostgreSQL's planner, whose statistics rarely catch a message while it is sending (or
    // has none yet), read every sending message by that condition through `messages_state` or
    // `messages_leased` (dead entries too, until a vacuum) and matched each against every row:
    // ~1.1 ms a statement, a fifth of a busy service's records, where finding each message by
    // its key took ~0.3 ms. A state that is a row's value leaves it the key alone.
    format!(
        "UPDATE messages SET state = v.column3, attempts = attempts + 1, updated_at = v.column4,
                next_attempt_at = COALESCE(v.column5, next_attempt_at), lease_owner = NULL, lease_expires_at = NULL,
                failure_class = v.column6, last_error = v.column7, interrupted = interrupted + v.column8
         FROM (VALUES {rows}) AS v
         WHERE messages.id = v.column1 AND messages.claim_token = v.column2 AND messages.state = v.column9
         RETURNING messages.id, messages.claim_token"
    )
}

fn bind_message_states(row: &mut super::batch::Row<'_>, batch: &[(ClaimRef, AttemptMeta, Settlement)]) {
    for (claim, meta, s) in batch {
        let finished = meta.finished_at.timestamp_millis();
        row.bind(claim.id)
            .bind(claim.token)
            .bind(s.state.as_str())
            .bind(finished)
            .bind(s.retry_after.map(|d| finished + d.as_millis() as i64))
            .bind(s.failure_class.map(FailureClass::as_str))
            .bind(&s.last_error)
            // An attempt with an unknown outcome counts like one a worker abandoned: a copy may exist.
            .bind(i64::from(s.outcome == panel_domain::AttemptOutcome::Interrupted));
    }
}

/// Each recipient of an attempt with what it settled, in the claim's order: (message, claim
/// token, position, outcome).
fn settled_recipients<'a>(
    batch: impl IntoIterator<Item = &'a (ClaimRef, AttemptMeta, Settlement)>,
) -> impl Iterator<Item = (&'a ClaimRef, i64, Outcome<'a>)> {
    batch.into_iter().flat_map(|(claim, meta, s)| {
        meta.recipients
            .iter()
            .zip(&s.recipients)
            .map(move |(p, r)| (claim, p.position, (r.state.as_str(), r.reply.as_deref())))
    })
}

/// An attempt's recipients as the message log shows them, each with its outcome.
fn report(meta: &AttemptMeta, s: &Settlement) -> String {
    let per_recipient: Vec<serde_json::Value> = meta
        .recipients
        .iter()
        .zip(&s.recipients)
        .map(|(p, r)| serde_json::json!({"address": p.address, "state": r.state, "stage": r.stage, "reply": r.reply}))
        .collect();
    serde_json::Value::Array(per_recipient).to_string()
}

/// The attempts table's columns a record writes, and its 15 values as `bind_attempt` binds them.
const ATTEMPT_COLUMNS: &str =
    "attempts (message_id, started_at, finished_at, service_id, relay, settings_version, outcome,
                   stage, code, enhanced_code, reply, detail, hint, recipients, route)";

fn bind_attempt(row: &mut super::batch::Row<'_>, (claim, meta, s): &(ClaimRef, AttemptMeta, Settlement), report: &str) {
    row.bind(claim.id)
        .bind(meta.started_at.timestamp_millis())
        .bind(meta.finished_at.timestamp_millis())
        .bind(meta.service_id.as_str())
        .bind(meta.relay.as_str())
        .bind(meta.settings_version)
        .bind(s.outcome.as_str())
        .bind(s.stage.as_str())
        .bind(s.reply.as_ref().map(|r| r.code as i64))
        .bind(s.reply.as_ref().and_then(|r| r.enhanced.as_deref()))
        .bind(s.reply.as_ref().map(|r| r.text.as_str()))
        .bind(s.detail.as_str())
        .bind(s.hint.as_deref())
        .bind(report)
        .bind(meta.route.as_deref());
}

/// `record_in` for one chunk, in the caller's transaction, in one round trip: the recipients
/// and the attempts of the messages still under the attempt's claim, then the messages
/// (which tells which attempts were current).
async fn record_chunk(tx: &mut Tx, batch: &[(ClaimRef, AttemptMeta, Settlement)]) -> Result<Vec<bool>> {
    let mut writes = super::batch::Writes::default();
    // The fence reads the messages before the last statement changes them.
    add_recipients_and_attempts(&mut writes, batch, ("messages AS f", " AND f.state = 'sending'"));
    writes.statement(&update_messages(batch.len()), 8 * batch.len(), |row| bind_message_states(row, batch));
    let mut ours = std::collections::HashSet::new();
    for row in writes.fetch_last(tx).await? {
        ours.insert((cell::<i64>(&row, "messages", "id")?, cell::<i64>(&row, "messages", "claim_token")?));
    }
    Ok(batch.iter().map(|(claim, _, _)| ours.contains(&(claim.id, claim.token))).collect())
}

/// Most recipients one statement of a record updates (5 parameters each).
const RECIPIENTS_PER_STATEMENT: usize = 2000;

/// A record's writes of its recipients' outcomes and of its attempts, each row only where its
/// message is under the attempt's claim: joined to `fence`, a relation `f` with the columns `id`
/// and `claim_token` of the messages still current, and its condition. Neither returns rows.
fn add_recipients_and_attempts(
    writes: &mut super::batch::Writes,
    batch: &[(ClaimRef, AttemptMeta, Settlement)],
    (fence, condition): (&str, &str),
) {
    let recipients: Vec<_> = settled_recipients(batch).collect();
    for part in recipients.chunks(RECIPIENTS_PER_STATEMENT) {
        let rows = values_template(
            part.len(),
            5,
            "(CAST(?1 AS BIGINT), CAST(?2 AS BIGINT), CAST(?3 AS BIGINT), CAST(?4 AS TEXT), CAST(?5 AS TEXT))",
        );
        let sql = format!(
            "UPDATE recipients SET state = u.column4, reply = COALESCE(u.column5, recipients.reply)
             FROM (VALUES {rows}) AS u JOIN {fence} ON f.id = u.column1 AND f.claim_token = u.column2{condition}
             WHERE recipients.message_id = u.column1 AND recipients.position = u.column3"
        );
        writes.statement(&sql, 5 * part.len(), |row| {
            for (claim, position, (state, reply)) in part {
                row.bind(claim.id).bind(claim.token).bind(*position).bind(*state).bind(*reply);
            }
        });
    }
    let reports: Vec<String> = batch.iter().map(|(_, meta, s)| report(meta, s)).collect();
    let rows = values_template(
        batch.len(),
        16,
        "(CAST(?1 AS BIGINT), CAST(?2 AS BIGINT), CAST(?3 AS BIGINT), CAST(?4 AS BIGINT), CAST(?5 AS TEXT), \
          CAST(?6 AS TEXT), CAST(?7 AS BIGINT), CAST(?8 AS TEXT), CAST(?9 AS TEXT), CAST(?10 AS BIGINT), \
          CAST(?11 AS TEXT), CAST(?12 AS TEXT), CAST(?13 AS TEXT), CAST(?14 AS TEXT), CAST(?15 AS TEXT), \
          CAST(?16 AS TEXT))",
    );
    let columns = (1..=15).map(|i| format!("a.column{}", i + 1)).collect::<Vec<_>>().join(", ");
    let sql = format!(
        "INSERT INTO {ATTEMPT_COLUMNS}
         SELECT {columns} FROM (VALUES {rows}) AS a JOIN {fence} ON f.id = a.column2 AND f.claim_token = a.column1{condition}"
    );
    writes.statement(&sql, 16 * batch.len(), |row| {
        for (attempt, report) in batch.iter().zip(&reports) {
            row.bind(attempt.0.token);
            bind_attempt(row, attempt, report);
        }
    });
}

/// PostgreSQL: `record_attempts` as one statement outside a transaction (or in a group's),
/// which writes the messages, their recipients and the attempts as parts of it (each recipient
/// and attempt fenced by its message's part, so a stale attempt writes nothing): one round
/// trip where `BEGIN`, the messages, the rest and `COMMIT` were four. Its statement text depends only on
/// how many attempts and recipients it has, so it is prepared once per shape. `None`, with
/// nothing written, when its parameters need more than one round trip.
pub(super) async fn record_in_one_statement(
    conn: &mut sqlx::AnyConnection,
    batch: &[(ClaimRef, AttemptMeta, Settlement)],
) -> Result<Option<Vec<bool>>> {
    if batch.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let mut writes = super::batch::Writes::default();
    // part0: the messages recorded, (id, claim_token); the other parts join it.
    writes.statement(&update_messages(batch.len()), 8 * batch.len(), |row| bind_message_states(row, batch));
    add_recipients_and_attempts(&mut writes, batch, ("part0 AS f", ""));
    let Some((sql, args)) = writes.into_one_statement("", "SELECT id, claim_token FROM part0")? else {
        return Ok(None);
    };
    let ours: std::collections::HashSet<(i64, i64)> =
        sqlx::query_as_with(sqlx::AssertSqlSafe(sql), args).fetch_all(conn).await?.into_iter().collect();
    Ok(Some(batch.iter().map(|(claim, _, _)| ours.contains(&(claim.id, claim.token))).collect()))
}

#[cfg(test)]
mod tests {
    use panel_domain::{Draft, EmailAddress, Mailbox, Origin, OutgoingMessage};

    use super::super::{Dialect, Held, SqlStore};
    use crate::{GroupDone, GroupJob};

    /// The sends of one group commit take from the budget in turn, each seeing the ones
    /// before it, and are committed with the group's other writes (here a message).
    async fn a_groups_sends_take_from_the_budget_in_turn(url: &str, dialect: Dialect) {
        let store = SqlStore::open(url, dialect).await.unwrap();
        let draft = Draft { to: vec!["a@corp.example".into()], subject: "Reset".into(), ..Default::default() };
        let from = Mailbox::parse("from", "panel@corp.example").unwrap();
        let fallback = EmailAddress::parse("fallback", "ops@corp.example").unwrap();
        let message = OutgoingMessage::prepare(&draft, &from, &fallback, chrono::Utc::now(), 1).unwrap();
        let now = 1_000_000;
        let send = |route| GroupJob::Reserve { now, route, recipients: 1, per_minute: Some(2), per_day: Some(100) };
        let jobs = [
            send("primary"),
            GroupJob::Message { origin: Origin::Dispatch, message: &message, now, fence: None },
            send("primary"),
            send("standby"),
            send("primary"),
        ];
        let done = store.commit_group(&jobs, &mut Held::default()).await.unwrap();
        let outcomes: Vec<Option<Option<i64>>> = done
            .iter()
            .map(|d| match d {
                GroupDone::Reserved(until) => Some(*until),
                _ => None,
            })
            .collect();
        // The third of the primary's sends finds its minute full: room when the first ages out.
        assert_eq!(outcomes, [Some(None), None, Some(None), Some(None), Some(Some(now + 60_000))]);
        let logged: Vec<(String, i64)> =
            sqlx::query_as("SELECT route, CAST(COUNT(*) AS BIGINT) FROM send_log GROUP BY route ORDER BY route")
                .fetch_all(&store.pool)
                .await
                .unwrap();
        assert_eq!(logged, [("primary".to_string(), 2), ("standby".to_string(), 1)]);
        let messages: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM messages").fetch_one(&store.pool).await.unwrap();
        assert_eq!(messages, 1);
    }

    /// Sends older than a day leave the budget's log, looked for at most every second.
    async fn sends_older_than_a_day_are_trimmed(url: &str, dialect: Dialect) {
        let store = SqlStore::open(url, dialect).await.unwrap();
        let (t, day) = (1_800_000_000_000_i64, 86_400_000);
        let send = |now| super::SendAsk { now, route: "primary", recipients: 1, per_minute: None, per_day: Some(100) };
        let logged = || async {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM send_log").fetch_one(&store.pool).await.unwrap();
            n
        };
        assert_eq!(store.reserve_send(send(t)).await.unwrap(), None);
        assert_eq!(store.reserve_send(send(t + 500)).await.unwrap(), None);
        assert_eq!(logged().await, 2);
        // A day after the first: it goes, the second (500 ms younger) stays.
        assert_eq!(store.reserve_send(send(t + day)).await.unwrap(), None);
        assert_eq!(logged().await, 2);
        // The second is a day old 500 ms later, but the last look was less than a second ago.
        assert_eq!(store.reserve_send(send(t + day + 600)).await.unwrap(), None);
        assert_eq!(logged().await, 3);
        assert_eq!(store.reserve_send(send(t + day + 1_000)).await.unwrap(), None);
        assert_eq!(logged().await, 3, "the second went, the fourth was logged");
    }

    on_both_databases! {
        sends_older_than_a_day_are_trimmed =>
            sends_older_than_a_day_are_trimmed_on_sqlite,
            sends_older_than_a_day_are_trimmed_on_postgres;
    }

    on_both_databases! {
        a_groups_sends_take_from_the_budget_in_turn =>
            a_groups_sends_take_from_the_budget_in_turn_on_sqlite,
            a_groups_sends_take_from_the_budget_in_turn_on_postgres;
    }

    /// PostgreSQL: a record finds each of its messages by its key, whatever the planner
    /// believes about how many are sending. Statistics taken by a vacuum rarely see a message
    /// while it sends, so they say none is; the plan is the generic one a connection keeps.
    #[tokio::test]
    async fn a_record_finds_each_message_by_its_key_on_postgres() {
        let Some(db) = panel_testlab::TestDatabase::create() else { return };
        let store = SqlStore::open(&db.url, Dialect::Postgres).await.unwrap();
        let mut conn = store.pool.acquire().await.unwrap();
        for sql in [
            "INSERT INTO messages (id, origin, state, content, from_addr, subject, message_id, used_fallback,
                                   created_at, updated_at, next_attempt_at, window_start, claim_token)
             SELECT g, 'api', 'delivered', '{}', 'panel@corp.example', 'Reset', 'm' || g, false, 1, 1, 1, 1, 1
               FROM generate_series(1, 20000) AS g",
            "ANALYZE messages",
            "SET plan_cache_mode = force_generic_plan",
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *conn).await.unwrap();
        }
        let attempts = 8;
        let sql = super::super::values_from(0, 1, 8 * attempts, &super::update_messages(attempts));
        sqlx::query(sqlx::AssertSqlSafe(format!("PREPARE record AS {sql}"))).execute(&mut *conn).await.unwrap();
        let values: Vec<&str> =
            (0..attempts).flat_map(|_| ["1", "1", "'delivered'", "1", "NULL", "NULL", "NULL", "0"]).collect();
        let explain = format!("EXPLAIN (COSTS OFF) EXECUTE record({})", values.join(", "));
        let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(explain)).fetch_all(&mut *conn).await.unwrap();
        let plan = plan.join("\n");
        // Each row's message looked up by its id (through the key or `messages_state`), never
        // every message of a state read and matched against the rows.
        assert!(plan.contains("id = \"*VALUES*\".column1)"), "not by its key: {plan}");
        assert!(!plan.contains("(state = 'sending'::text)"), "read by state: {plan}");
    }

    #[test]
    fn messages_are_inserted_with_anonymous_parameters_on_sqlite() {
        let draft = Draft {
            to: vec!["a@corp.example".into(), "b@corp.example".into()],
            subject: "Reset".into(),
            text: "Your link".into(),
            ..Default::default()
        };
        let from = Mailbox::parse("from", "panel@corp.example").unwrap();
        let fallback = EmailAddress::parse("fallback", "ops@corp.example").unwrap();
        let message = OutgoingMessage::prepare(&draft, &from, &fallback, chrono::Utc::now(), 1).unwrap();
        let new = |run| super::NewMessage { origin: Origin::Workflow, message: &message, now: 1, run };
        let messages = [new(None), new(Some(7)), new(None)];
        for lease in [None, Some(("worker", 60_000))] {
            let mut writes = super::super::batch::Writes::default();
            super::add_messages_with(&mut writes, &messages, &[1, 2, 3], super::RowIds::Bound, lease);
            let texts = writes.sqlite_texts();
            assert_eq!(texts.len(), 1);
            // Named ones bind in time quadratic in their number (`batch::anonymous`).
            assert!(!texts[0].contains('$'), "{}", texts[0]);
            assert_eq!(texts[0].matches('?').count(), writes.parameters(), "{}", texts[0]);
        }
    }
}
