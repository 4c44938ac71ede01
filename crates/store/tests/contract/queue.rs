//! Queue semantics on both backends: leases, fencing, interrupted claims, settings versions.

use std::time::Duration;

use crate::common::{Backend, message, message_to, meta, settled, settled_each};
use chrono::Utc;
use panel_domain::{Origin, SettingsDoc};
use panel_store::{AttemptMeta, RetryResult, Store, StoreError, WakeFrom};

fn delivered() -> panel_domain::Settlement {
    crate::common::settled(true)
}

async fn a_claimed_message_is_not_claimed_twice_while_leased(b: &Backend) {
    let s = &b.store;
    s.enqueue(Origin::MailTester, message("one"), Utc::now()).await.unwrap();
    let first = s.claim("w1", Utc::now(), Duration::from_secs(60), 10, false).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].pending.len(), 1);
    assert!(s.claim("w2", Utc::now(), Duration::from_secs(60), 10, false).await.unwrap().is_empty());
}

async fn an_expired_lease_is_fenced_out_and_recorded_as_interrupted(b: &Backend) {
    let s = &b.store;
    let t0 = Utc::now();
    let id = s.enqueue(Origin::MailTester, message("two"), t0).await.unwrap();
    let stale = s.claim("w1", t0, Duration::from_millis(1), 10, false).await.unwrap().remove(0);
    // Expired, and past the interval at which expired leases are looked for.
    let later = t0 + chrono::Duration::milliseconds(150);
    let fresh = s.claim("w2", later, Duration::from_secs(60), 10, false).await.unwrap().remove(0);
    assert_eq!(fresh.reference.id, id);
    assert!(fresh.reference.token > stale.reference.token);
    // The paused worker wakes up: its outcome is refused, the new owner's is kept.
    assert!(!s.record_attempt(&stale.reference, &meta(&stale), &delivered()).await.unwrap());
    assert!(!s.renew_lease(&stale.reference, later, Duration::from_secs(60)).await.unwrap());
    assert!(s.record_attempt(&fresh.reference, &meta(&fresh), &delivered()).await.unwrap());
    let m = s.message(id).await.unwrap().unwrap();
    assert_eq!(m.state.as_str(), "delivered");
    assert_eq!(m.interrupted, 1);
    let outcomes: Vec<_> = m.attempts.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, ["interrupted", "delivered"]);
}

/// Expired leases are looked for at most every 100 ms (store time), not in every claim, also
/// while due messages fill every claim.
async fn a_busy_claimer_takes_an_expired_lease_within_the_scan_interval(b: &Backend) {
    let s = &b.store;
    let t0 = Utc::now();
    let at = |ms: i64| t0 + chrono::Duration::milliseconds(ms);
    let stale = s.enqueue(Origin::MailTester, message("stale"), t0).await.unwrap();
    assert_eq!(s.claim("w1", t0, Duration::from_millis(10), 1, false).await.unwrap()[0].reference.id, stale);
    for i in 0..2 {
        s.enqueue(Origin::MailTester, message(&format!("due {i}")), t0).await.unwrap();
    }
    let interrupted = async || s.message(stale).await.unwrap().unwrap().interrupted;
    let second = s.claim("w2", at(50), Duration::from_secs(60), 1, false).await.unwrap();
    assert_ne!(second[0].reference.id, stale, "a due message fills the claim");
    assert_eq!(interrupted().await, 0, "50 ms after the last look: not looked for yet");
    let third = s.claim("w2", at(60), Duration::from_secs(60), 5, false).await.unwrap();
    assert_eq!(third.len(), 1, "the other due message: {third:?}");
    assert_eq!(interrupted().await, 0, "a claim due mail does not fill does not look before the interval either");
    let last = s.claim("w2", at(150), Duration::from_secs(60), 5, false).await.unwrap();
    assert_eq!(interrupted().await, 1, "150 ms: taken, recorded as interrupted and due again");
    assert!(last.iter().any(|c| c.reference.id == stale), "and claimed again in the same claim: {last:?}");
}

async fn settings_saves_are_versioned_and_conflicts_detected(b: &Backend) {
    let s = &b.store;
    assert_eq!(s.config_generation().await.unwrap().settings, 0);
    let doc = SettingsDoc { host: Some("relay.example.org".into()), ..Default::default() };
    assert_eq!(s.save_settings(0, &doc, "t", Utc::now(), &[]).await.unwrap(), 1);
    assert!(matches!(
        s.save_settings(0, &doc, "t", Utc::now(), &[]).await,
        Err(StoreError::SettingsConflict { current: 1 })
    ));
    assert_eq!(s.current_settings().await.unwrap().unwrap().doc, doc);
    let (with_generation, _) = s.settings_and_definitions().await.unwrap();
    assert_eq!(with_generation.map(|w| (w.version, w.doc)), Some((1, doc)), "the same settings in the one read");
}

async fn only_failed_messages_can_be_retried(b: &Backend) {
    let s = &b.store;
    let id = s.enqueue(Origin::MailTester, message("three"), Utc::now()).await.unwrap();
    assert!(matches!(s.retry_message(id, Utc::now()).await.unwrap(), RetryResult::NotFailed { .. }));
    assert_eq!(s.retry_message(999, Utc::now()).await.unwrap(), RetryResult::NotFound);
}

async fn an_enqueued_message_survives_reopening_the_database(b: &Backend) {
    let url = &b.url;
    let id = Store::open(url).await.unwrap().enqueue(Origin::MailTester, message("four"), Utc::now()).await.unwrap();
    let reopened = Store::open(url).await.unwrap();
    assert_eq!(reopened.message(id).await.unwrap().unwrap().subject, "four");
}

async fn concurrent_claimers_never_take_the_same_step(b: &Backend) {
    let s = &b.store;
    for i in 0..120 {
        s.enqueue(Origin::MailTester, message(&format!("m{i}")), Utc::now()).await.unwrap();
    }
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..4 {
        let s = s.clone();
        tasks.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let claims = s.claim(&format!("w{w}"), Utc::now(), Duration::from_secs(60), 7, false).await.unwrap();
                if claims.is_empty() {
                    return mine;
                }
                mine.extend(claims.iter().map(|c| c.reference.id));
            }
        });
    }
    let mut all: Vec<i64> = tasks.join_all().await.into_iter().flatten().collect();
    let claimed = all.len();
    all.sort();
    all.dedup();
    assert_eq!((claimed, all.len()), (120, 120), "every step claimed exactly once");
}

async fn concurrent_settings_saves_conflict_instead_of_overwriting(b: &Backend) {
    let doc = |h: &str| SettingsDoc { host: Some(h.into()), ..Default::default() };
    let (a, c) = (doc("a.example.org"), doc("b.example.org"));
    let (x, y) = tokio::join!(
        b.store.save_settings(0, &a, "t", Utc::now(), &[]),
        b.store.save_settings(0, &c, "t", Utc::now(), &[])
    );
    let results = [x, y];
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    assert!(results.iter().any(|r| matches!(r, Err(StoreError::SettingsConflict { .. }))), "{results:?}");
    assert_eq!(b.store.config_generation().await.unwrap().settings, 1);
}

async fn an_idempotency_key_enqueued_concurrently_creates_one_step(b: &Backend) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let s = b.store.clone();
        tasks.spawn(async move {
            // The same message from eight enqueuers at once (other content would be a conflict).
            s.enqueue_once(Origin::Schedule, &message("nightly report"), Utc::now(), "nightly@2026-11-26T02:00Z")
                .await
                .unwrap()
        });
    }
    let results = tasks.join_all().await;
    assert_eq!(results.iter().filter(|(_, created)| *created).count(), 1, "{results:?}");
    let id = results[0].0;
    assert!(results.iter().all(|(i, _)| *i == id), "{results:?}");
    assert_eq!(b.store.queue_stats(Utc::now()).await.unwrap().queued, 1);
    // Other keys, and no key, are independent.
    b.store.enqueue_once(Origin::Schedule, &message("other"), Utc::now(), "nightly@2026-11-27T02:00Z").await.unwrap();
    b.store.enqueue(Origin::Schedule, message("free"), Utc::now()).await.unwrap();
    assert_eq!(b.store.queue_stats(Utc::now()).await.unwrap().queued, 3);
    // The key again with other content: a conflict naming the message, nothing dropped silently.
    let other =
        b.store.enqueue_once(Origin::Schedule, &message("another"), Utc::now(), "nightly@2026-11-26T02:00Z").await;
    assert!(matches!(&other, Err(StoreError::Conflict(m)) if m.contains(&format!("message {id}"))), "{other:?}");
}

async fn a_batch_of_attempts_is_recorded_together_and_a_stale_one_is_skipped(b: &Backend) {
    let s = &b.store;
    let t0 = Utc::now();
    let a = s.enqueue(Origin::MailTester, message("a"), t0).await.unwrap();
    let c = s.enqueue(Origin::MailTester, message("c"), t0).await.unwrap();
    let claims = s.claim("w1", t0, Duration::from_millis(1), 10, false).await.unwrap();
    // Message c's lease expired and w2 took it (past the scan interval): w1's outcome for c is stale.
    let later = t0 + chrono::Duration::milliseconds(150);
    let retaken = s.claim("w2", later, Duration::from_secs(60), 10, false).await.unwrap();
    assert_eq!(retaken.len(), 2, "both leases expired");
    let fresh_a = retaken.iter().find(|x| x.reference.id == a).unwrap();
    let stale_c = claims.iter().find(|x| x.reference.id == c).unwrap();
    let results = s
        .record_attempts(vec![
            (fresh_a.reference, meta(fresh_a), delivered()),
            (stale_c.reference, meta(stale_c), delivered()),
        ])
        .await
        .unwrap();
    assert_eq!(results, [true, false]);
    assert_eq!(s.message_state(a).await.unwrap().unwrap().as_str(), "delivered");
    assert_eq!(s.message_state(c).await.unwrap().unwrap().as_str(), "sending", "still w2's");
}

async fn a_bulk_enqueue_stores_every_message_in_one_transaction(b: &Backend) {
    let s = &b.store;
    let items: Vec<_> = (0..50).map(|i| (Origin::Dispatch, message(&format!("bulk {i}")))).collect();
    let ids = s.enqueue_many(&items, Utc::now()).await.unwrap();
    assert_eq!(ids.len(), 50);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids in order: {ids:?}");
    assert_eq!(s.message(ids[7]).await.unwrap().unwrap().subject, "bulk 7");
    let claims = s.claim("w", Utc::now(), Duration::from_secs(60), 100, false).await.unwrap();
    assert_eq!(claims.len(), 50);
    assert!(claims.iter().all(|c| c.pending.len() == 1), "every message has its recipient");
}

/// A claim reads its messages' recipients in the statements that claim them (on SQLite found by
/// owner and time): a second claim by the same owner at the same instant gets its own message
/// and recipients, none of the first's.
async fn two_claims_of_one_owner_at_one_instant_each_get_their_own_messages_and_recipients(b: &Backend) {
    let s = &b.store;
    let now = Utc::now();
    let a = s.enqueue(Origin::MailTester, message_to("a", &["a1@example.org", "a2@example.org"]), now).await.unwrap();
    let b_ = s.enqueue(Origin::MailTester, message_to("b", &["b1@example.org"]), now).await.unwrap();
    let lease = Duration::from_secs(60);
    let first = s.claim("w", now, lease, 1, false).await.unwrap();
    let second = s.claim("w", now, lease, 1, false).await.unwrap();
    let addresses = |c: &panel_store::Claim| c.pending.iter().map(|p| p.address.clone()).collect::<Vec<_>>();
    assert_eq!((first.len(), second.len()), (1, 1), "{first:?} {second:?}");
    assert_eq!(
        (first[0].reference.id, addresses(&first[0])),
        (a, vec!["a1@example.org".into(), "a2@example.org".into()])
    );
    assert_eq!((second[0].reference.id, addresses(&second[0])), (b_, vec!["b1@example.org".to_string()]));
}

/// A write whose caller stops waiting (a cancelled request), wherever that happens, is written
/// whole or not at all, and leaves the database writable at once: by this store, and by
/// another process's (SQLite's write lock is not left held by the abandoned transaction).
async fn a_write_cancelled_at_any_point_is_all_or_nothing_and_leaves_the_database_writable(b: &Backend) {
    let s = &b.store;
    let other = Store::open(&b.url).await.unwrap();
    let items: Vec<_> = (0..200).map(|i| (Origin::Dispatch, message(&format!("cancelled {i}")))).collect();
    let (mut tries, mut cancelled, mut micros) = (0, 0, 0);
    // The first write is dropped after its first poll; each later one waits a little longer, until
    // a write was not cancelled. Not a zero timeout first: tokio's timer rounds a deadline up to
    // the next millisecond, in which a fast machine can finish the whole write.
    loop {
        tries += 1;
        let write = s.enqueue_many(&items, Utc::now());
        let outcome = if tries == 1 {
            tokio::select! { biased; done = write => Ok(done), () = std::future::ready(()) => Err(()) }
        } else {
            tokio::time::timeout(Duration::from_micros(micros), write).await.map_err(drop)
        };
        match outcome {
            Ok(done) => drop(done.unwrap()),
            Err(()) => cancelled += 1,
        }
        for (store, who) in [(&other, "another process"), (s, "this store")] {
            let one = [(Origin::Dispatch, message(who))];
            let write = tokio::time::timeout(Duration::from_secs(5), store.enqueue_many(&one, Utc::now())).await;
            assert!(matches!(write, Ok(Ok(_))), "{who} could not write after a cancel at {micros} us: {write:?}");
        }
        // Until both cases were seen: under load even the first write, dropped after one poll,
        // can finish in that poll (the next tries then cancel it sooner than it can finish).
        if (cancelled >= 1 && cancelled < tries) || micros > 5_000_000 {
            break;
        }
        micros = micros * 5 / 4 + 100;
    }
    assert!(cancelled >= 1 && cancelled < tries, "{cancelled} of {tries} cancelled: both cases were tried");
    // Whole or absent: a cancelled caller does not know which (on PostgreSQL a statement sent
    // runs to its end), but never a part.
    let bulk = s.queue_stats(Utc::now()).await.unwrap().queued - 2 * tries;
    assert_eq!(bulk % 200, 0, "all or nothing: {bulk} bulk messages are not a multiple of 200");
}

/// A group's ids are chosen before its rows are written: they follow every id the table ever
/// held, also a deleted one, whether the rows before came one by one or in a batch, and a row
/// inserted one by one afterwards follows them.
async fn ids_chosen_ahead_never_reuse_an_id_and_interleave_with_single_inserts(b: &Backend) {
    let s = &b.store;
    let now = Utc::now();
    let first = s.enqueue_once(Origin::MailTester, &message("first"), now, "k1").await.unwrap().0;
    let claims = s.claim("w", now, Duration::from_secs(60), 10, false).await.unwrap();
    assert!(s.record_attempts(vec![(claims[0].reference, meta(&claims[0]), delivered())]).await.unwrap()[0]);
    assert_eq!(s.delete_finished(now + chrono::Duration::days(1), 10).await.unwrap(), 1, "the highest id is gone");
    let batch =
        s.enqueue_many(&[(Origin::Dispatch, message("b1")), (Origin::Dispatch, message("b2"))], now).await.unwrap();
    assert!(batch[0] > first, "{batch:?} after the deleted {first}");
    let single = s.enqueue_once(Origin::MailTester, &message("single"), now, "k2").await.unwrap().0;
    let grouped = s.enqueue(Origin::MailTester, message("grouped"), now).await.unwrap();
    assert!(batch[1] < single && single < grouped, "{batch:?} {single} {grouped}");
    for (id, subject) in [(batch[0], "b1"), (batch[1], "b2"), (single, "single"), (grouped, "grouped")] {
        let m = s.message(id).await.unwrap().unwrap();
        assert_eq!((m.subject.as_str(), m.recipients.len()), (subject, 1), "{m:?}");
    }
}

/// A row the store cannot read is an error that names the table and the column, never a panic
/// (in the worker a panic would stop delivery); the other messages stay readable.
async fn a_corrupt_row_is_an_error_naming_its_table_and_column(b: &Backend) {
    let s = &b.store;
    let bad = s.enqueue(Origin::MailTester, message("corrupt"), Utc::now()).await.unwrap();
    let good = s.enqueue(Origin::MailTester, message("fine"), Utc::now()).await.unwrap();
    let pool = sqlx::AnyPool::connect(&b.url).await.unwrap();
    sqlx::query("UPDATE messages SET state = 'exploded' WHERE id = $1").bind(bad).execute(&pool).await.unwrap();
    let err = s.message(bad).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    assert!(err.to_string().contains("messages.state"), "{err}");
    assert_eq!(s.message(good).await.unwrap().unwrap().subject, "fine");
    if b.url.starts_with("sqlite") {
        // SQLite keeps bytes that are not UTF-8 in a text column: the read names the column.
        sqlx::query("UPDATE messages SET state = 'queued', last_error = x'ff00fe' WHERE id = $1")
            .bind(bad)
            .execute(&pool)
            .await
            .unwrap();
        let err = s.message(bad).await.unwrap_err().to_string();
        assert!(err.contains("messages.last_error"), "{err}");
    }
    pool.close().await;
}

async fn a_cancelled_message_is_final_never_claimed_and_its_cancel_audited(b: &Backend) {
    use panel_domain::MessageState;
    use panel_store::CancelResult;
    let s = &b.store;
    let (now, later) = (Utc::now(), Utc::now() + chrono::Duration::days(100));
    let a = s.enqueue(Origin::MailTester, message("cancel me"), now).await.unwrap();
    let sent = s.enqueue(Origin::MailTester, message("in hand"), now).await.unwrap();
    assert_eq!(
        s.cancel_message(a, "ann", "sent twice by a misfired workflow", now).await.unwrap(),
        CancelResult::Cancelled { was: MessageState::Queued }
    );
    let claims = s.claim("w1", now, Duration::from_secs(60), 10, false).await.unwrap();
    assert_eq!(claims.iter().map(|c| c.reference.id).collect::<Vec<_>>(), [sent], "a cancelled message is not claimed");
    assert_eq!(
        s.cancel_message(sent, "ann", "too late", now).await.unwrap(),
        CancelResult::NotCancellable { state: MessageState::Sending },
        "a worker holds it"
    );
    assert_eq!(
        s.cancel_message(a, "ann", "again", now).await.unwrap(),
        CancelResult::NotCancellable { state: MessageState::Cancelled }
    );
    assert_eq!(s.cancel_message(999, "ann", "none", now).await.unwrap(), CancelResult::NotFound);
    assert_eq!(s.retry_message(a, now).await.unwrap(), RetryResult::NotFailed { state: MessageState::Cancelled });

    let m = s.message(a).await.unwrap().unwrap();
    assert_eq!(m.state, MessageState::Cancelled);
    assert_eq!(m.last_error.as_deref(), Some("cancelled by ann: sent twice by a misfired workflow"));
    let audit = s.audit_log(10).await.unwrap();
    let entry = audit.iter().find(|e| e.action == "message.cancelled").expect("audited");
    assert_eq!((entry.actor.as_str(), entry.subject.as_str()), ("ann", format!("message {a}").as_str()));
    assert!(entry.detail.contains("was queued") && entry.detail.contains("misfired"), "{}", entry.detail);
    // Final like the others: retention takes it.
    assert_eq!(s.delete_finished(later, 100).await.unwrap(), 1);
    assert!(s.message(a).await.unwrap().is_none());
}

async fn a_check_request_is_taken_by_one_service_and_answered(b: &Backend) {
    let s = &b.store;
    let now = Utc::now();
    let old = s.request_check("cli:ann", now - chrono::Duration::minutes(5)).await.unwrap();
    let id = s.request_check("cli:ann", now).await.unwrap();
    let (first, second) = tokio::join!(s.claim_check("svc-a", now), s.claim_check("svc-b", now));
    let taken: Vec<i64> = [first.unwrap(), second.unwrap()].into_iter().flatten().collect();
    assert_eq!(taken, [id], "one service takes it; a request nobody took for minutes is abandoned");
    assert!(!s.withdraw_check(id).await.unwrap(), "taken: the CLI waits for the report");
    let (by, report) = s.check_request(id).await.unwrap().unwrap();
    assert!(by.is_some_and(|b| b.starts_with("svc-")) && report.is_none());
    s.finish_check(id, r#"{"Ok": {}}"#, now).await.unwrap();
    assert_eq!(s.check_request(id).await.unwrap().unwrap().1.as_deref(), Some(r#"{"Ok": {}}"#));
    assert!(s.withdraw_check(old).await.unwrap(), "an untaken request can be withdrawn");
    assert!(s.check_request(old).await.unwrap().is_none());
}

async fn urgent_mail_is_claimed_before_bulk_mail_which_keeps_its_share(b: &Backend) {
    let s = &b.store;
    let now = Utc::now();
    // Bulk queued first (a schedule's reminders), then one urgent message (a password reset).
    let bulk: Vec<i64> = s
        .enqueue_many(&[(Origin::Schedule, message("reminder 1")), (Origin::Schedule, message("reminder 2"))], now)
        .await
        .unwrap();
    let urgent = s.enqueue(Origin::MailTester, message("reset"), now).await.unwrap();
    let asked_bulk =
        panel_domain::OutgoingMessage { priority: Some(panel_domain::Priority::Bulk), ..message("api bulk") };
    let api_bulk = s.enqueue(Origin::MailTester, asked_bulk, now).await.unwrap();
    let first = s.claim("w", Utc::now(), Duration::from_secs(60), 1, false).await.unwrap();
    assert_eq!(first[0].reference.id, urgent, "the urgent one goes first, though queued last");
    let share = s.claim("w", Utc::now(), Duration::from_secs(60), 1, true).await.unwrap();
    assert_eq!(share[0].reference.id, bulk[0], "a bulk-first claim takes the oldest bulk message");
    let listed = s.list_messages(&panel_store::MessageFilter { limit: 10, ..Default::default() }).await.unwrap();
    let priority = |id: i64| listed.iter().find(|m| m.id == id).unwrap().priority;
    assert_eq!(priority(urgent), panel_domain::Priority::Urgent);
    assert_eq!(priority(bulk[1]), panel_domain::Priority::Bulk, "by origin");
    assert_eq!(priority(api_bulk), panel_domain::Priority::Bulk, "as the caller asked");
}

async fn concurrent_single_enqueues_share_commits_and_each_gets_its_own_message(b: &Backend) {
    let s = &b.store;
    // Two of them share a Message-ID (once the key rows of a group were matched back by): each
    // caller still gets its own row.
    let twin = message("m-twin");
    let tasks: Vec<_> = (0..42)
        .map(|i| {
            let s = s.clone();
            let m = if i < 40 { message(&format!("m{i}")) } else { twin.clone() };
            tokio::spawn(async move { s.enqueue(Origin::MailTester, m, Utc::now()).await })
        })
        .collect();
    let mut ids = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let id = t.await.unwrap().unwrap();
        let m = s.message(id).await.unwrap().expect("stored before the answer");
        let subject = if i < 40 { format!("m{i}") } else { "m-twin".into() };
        assert_eq!(m.subject, subject, "each caller gets the id of its own message");
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 42, "one message each");
    let claims = s.claim("w", Utc::now(), Duration::from_secs(60), 100, false).await.unwrap();
    assert_eq!(claims.len(), 42);
    assert!(claims.iter().all(|c| c.pending.len() == 1), "every message has its own recipient");
}

/// One batch of records with different outcomes: each message and recipient gets its own.
async fn a_batch_of_records_with_different_outcomes_gives_each_message_its_own(b: &Backend) {
    let s = &b.store;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(s.enqueue(Origin::MailTester, message(&format!("r{i}")), Utc::now()).await.unwrap());
    }
    let claims = s.claim("w", Utc::now(), Duration::from_secs(60), 10, false).await.unwrap();
    assert_eq!(claims.len(), 6);
    let batch: Vec<_> = claims.iter().map(|c| (c.reference, meta(c), settled(c.reference.id % 2 == 0))).collect();
    assert_eq!(s.record_attempts(batch).await.unwrap(), [true; 6]);
    for id in ids {
        let m = s.message(id).await.unwrap().unwrap();
        let (state, recipient) = if id % 2 == 0 { ("delivered", "delivered") } else { ("failed", "failed") };
        assert_eq!((m.id, m.state.as_str()), (id, state));
        assert_eq!(m.recipients[0].state.as_str(), recipient, "{m:?}");
        assert_eq!(m.attempts.len(), 1, "one attempt each");
        if id % 2 == 1 {
            assert!(m.recipients[0].reply.as_deref().unwrap_or_default().contains("5.1.1"), "{m:?}");
        }
    }
}

/// A route's sending budget is the installation's: two services (two pools) reserving at once
/// never take more than the limit, and the refused learn when there is room again.
async fn the_sending_budget_is_shared_and_never_overdrawn(b: &Backend) {
    let other = Store::open(&b.url).await.unwrap();
    let now = Utc::now();
    let tries = (0..40).map(|i| {
        let store = if i % 2 == 0 { b.store.clone() } else { other.clone() };
        tokio::spawn(async move { store.reserve_send(now, "primary", 1, Some(30), None).await.unwrap() })
    });
    let mut taken = 0;
    for t in tries {
        match t.await.unwrap() {
            None => taken += 1,
            Some(until) => assert_eq!(until.timestamp_millis(), now.timestamp_millis() + 60_000),
        }
    }
    assert_eq!(taken, 30);
    // A minute later the window is empty again.
    let later = now + chrono::Duration::seconds(61);
    assert!(b.store.reserve_send(later, "primary", 1, Some(30), None).await.unwrap().is_none());
    // Recipients per day: 8 of 10 used, so 3 more wait until the first send ages out.
    let day = later + chrono::Duration::days(2);
    assert!(b.store.reserve_send(day, "primary", 8, None, Some(10)).await.unwrap().is_none());
    let until = b.store.reserve_send(day + chrono::Duration::hours(1), "primary", 3, None, Some(10)).await.unwrap();
    assert_eq!(until.map(|u| u.timestamp_millis()), Some((day + chrono::Duration::days(1)).timestamp_millis()));
    assert!(b.store.reserve_send(day, "primary", 2, None, Some(10)).await.unwrap().is_none(), "2 more fit");
    // Each route has its own budget: the standby's is untouched by the primary's sends.
    assert!(b.store.reserve_send(day, "standby", 10, None, Some(10)).await.unwrap().is_none());
    assert!(b.store.reserve_send(day, "standby", 1, None, Some(10)).await.unwrap().is_some());
}

/// What the budget decides, computed the plain way (every send of the window counted), for
/// `the_budget_decides_as_counting_every_send_would`: `None` when the send fits, else when
/// there is room (ms).
fn budget_by_counting(
    log: &[(i64, i64)],
    now: i64,
    n: i64,
    per_minute: Option<i64>,
    per_day: Option<i64>,
) -> Option<i64> {
    let (minute, day) = (now - 60_000, now - 86_400_000);
    if let Some(limit) = per_minute {
        let recent: Vec<i64> = log.iter().filter(|(at, _)| *at > minute).map(|(at, _)| *at).collect();
        if recent.len() as i64 >= limit {
            return Some(recent[recent.len() - limit as usize] + 60_000);
        }
    }
    if let Some(limit) = per_day {
        let window: Vec<&(i64, i64)> = log.iter().filter(|(at, _)| *at > day).collect();
        let mut left: i64 = window.iter().map(|(_, k)| k).sum();
        let need = n.min(limit);
        if left + need > limit {
            for (at, k) in window {
                left -= k;
                if left + need <= limit {
                    return Some(at + 86_400_000);
                }
            }
        }
    }
    None
}

/// Over two simulated days of sends of one to five recipients, minutes apart or bunched in the
/// same millisecond, against a minute's and a day's limit: each answer (taken, or when there is
/// room) is the one counting every send of the window gives, as the budget's totals stand in
/// for that count.
async fn the_budget_decides_as_counting_every_send_would(b: &Backend) {
    let start = chrono::DateTime::parse_from_rfc3339("2026-12-01T00:00:00Z").unwrap().with_timezone(&Utc);
    let mut log: Vec<(i64, i64)> = Vec::new();
    let (mut t, mut seed) = (start.timestamp_millis(), 7u64);
    let (per_minute, per_day) = (4, 600);
    let (mut taken, mut by_minute, mut by_day) = (0, 0, 0);
    for i in 0..600 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let step = match (seed >> 33) % 6 {
            0..=2 => 0,
            3 => 7_000,
            4 => 45_000,
            _ => 20 * 60_000,
        };
        t += step;
        let n = 1 + ((seed >> 40) % 5) as i64;
        let now = chrono::DateTime::from_timestamp_millis(t).unwrap();
        let want = budget_by_counting(&log, t, n, Some(per_minute.into()), Some(per_day.into()));
        let got = b.store.reserve_send(now, "primary", n as usize, Some(per_minute), Some(per_day)).await.unwrap();
        assert_eq!(got.map(|u| u.timestamp_millis()), want, "send {i} of {n} at {t}");
        match want {
            None => {
                log.push((t, n));
                taken += 1;
            }
            Some(until) if until <= t + 60_000 => by_minute += 1,
            Some(_) => by_day += 1,
        }
    }
    // Each limit decided often: the minute's and the day's windows both moved along.
    assert!(taken > 100 && by_minute > 100 && by_day > 100, "{taken} taken, {by_minute} + {by_day} refused");
}

/// A clock that went back never widens the budget: a send stamped before the newest one is
/// counted as late as the newest, so the minute still holds both.
async fn a_clock_that_went_back_never_widens_the_budget(b: &Backend) {
    let t = chrono::DateTime::parse_from_rfc3339("2026-12-01T12:00:00Z").unwrap().with_timezone(&Utc);
    let back = t - chrono::Duration::seconds(30);
    assert!(b.store.reserve_send(t, "primary", 1, Some(2), None).await.unwrap().is_none());
    assert!(b.store.reserve_send(back, "primary", 1, Some(2), None).await.unwrap().is_none());
    // 45 s after the clock went back: the send taken then counts as of `t`, so the minute
    // holds two, and there is room once it ages out, a minute after `t`.
    let later = back + chrono::Duration::seconds(45);
    let until = b.store.reserve_send(later, "primary", 1, Some(2), None).await.unwrap();
    assert_eq!(until.map(|u| u.timestamp_millis()), Some((t + chrono::Duration::minutes(1)).timestamp_millis()));
}

/// The dashboard's route states read each route's latest attempt; the message log names the
/// route of every attempt.
async fn each_routes_latest_attempt_is_found_and_every_attempt_names_its_route(b: &Backend) {
    let s = &b.store;
    let down = crate::common::settled(false);
    let mut ids = Vec::new();
    for (route, settlement) in [("primary", &down), ("standby", &delivered()), ("primary", &delivered())] {
        let id = s.enqueue(Origin::MailTester, message(route), Utc::now()).await.unwrap();
        let claim = s.claim("w", Utc::now(), Duration::from_secs(60), 10, false).await.unwrap().remove(0);
        let meta = AttemptMeta { route: Some(route.into()), ..meta(&claim) };
        assert!(s.record_attempt(&claim.reference, &meta, settlement).await.unwrap());
        ids.push(id);
    }
    let names = ["primary", "standby", "unused"].map(String::from);
    let latest = s.route_attempts(&names).await.unwrap();
    let seen: Vec<_> = latest.iter().map(|a| a.as_ref().map(|a| (a.message_id, a.current))).collect();
    assert_eq!(seen, [Some((ids[2], false)), Some((ids[1], false)), None], "the latest per route, in order");
    let detail = s.message(ids[0]).await.unwrap().unwrap();
    assert_eq!(detail.attempts[0].route.as_deref(), Some("primary"));
    assert_eq!(s.last_relay_error().await.unwrap().unwrap().route.as_deref(), Some("primary"));
}

/// A report after the relay's 250: a delay notice marks its recipient delayed, a bounce then
/// bounced and the message with it; an unmatched one is kept and changes nothing. The signing
/// key is made once, whoever asks first.
async fn a_bounce_moves_its_recipient_and_message_and_an_unmatched_one_changes_nothing(b: &Backend) {
    use panel_domain::{MessageState, RecipientState};
    use panel_store::BounceRow;
    let s = &b.store;
    assert_eq!(s.bounce_key("first").await.unwrap(), "first");
    assert_eq!(s.bounce_key("second").await.unwrap(), "first", "made once");
    let id = s.enqueue(Origin::MailTester, message("reset"), Utc::now()).await.unwrap();
    let claim = s.claim("w", Utc::now(), Duration::from_secs(60), 10, false).await.unwrap().remove(0);
    assert!(s.record_attempt(&claim.reference, &meta(&claim), &delivered()).await.unwrap());
    let row = |kind: &str, moves_to| BounceRow {
        kind: kind.into(),
        recipient: Some("A@example.org".into()),
        status: Some("5.1.1".into()),
        diagnostic: Some("550 5.1.1 user unknown".into()),
        remote_mta: Some("mx.example.net".into()),
        envelope_to: "bounces+1-ab@b.example".into(),
        moves_to,
        ..BounceRow::default()
    };
    let state = s.record_bounce(Some(id), &[row("delayed", Some(RecipientState::Delayed))], Utc::now()).await.unwrap();
    assert_eq!(state, None, "a delay leaves the message delivered");
    let m = s.message(id).await.unwrap().unwrap();
    assert_eq!((m.state, m.recipients[0].state), (MessageState::Delivered, RecipientState::Delayed));
    let state = s.record_bounce(Some(id), &[row("failed", Some(RecipientState::Bounced))], Utc::now()).await.unwrap();
    assert_eq!(state, Some(MessageState::Bounced));
    let m = s.message(id).await.unwrap().unwrap();
    assert_eq!(m.recipients[0].state, RecipientState::Bounced);
    assert_eq!(m.recipients[0].reply.as_deref(), Some("550 5.1.1 user unknown (from mx.example.net)"));
    assert_eq!(s.message_bounces(id).await.unwrap().len(), 2);
    let forged = BounceRow { reason: Some("its token does not verify".into()), ..row("failed", None) };
    assert_eq!(s.record_bounce(None, &[forged], Utc::now()).await.unwrap(), None);
    let unmatched = s.bounces(true, 10).await.unwrap();
    assert_eq!((unmatched.len(), unmatched[0].message_id), (1, None));
    assert_eq!(s.bounces(false, 10).await.unwrap().len(), 3);
    assert_eq!(s.unmatched_bounces().await.unwrap(), 1);
    assert_eq!(s.queue_stats(Utc::now()).await.unwrap().bounced, 1);
}

/// Whatever inserts messages wakes every service sharing a PostgreSQL store by its own commit
/// (a NOTIFY that rides its last round trip; the caller sends none): a single enqueue, a bulk
/// one written in one statement, one with an idempotency key, and one too large for one round
/// trip, written in a transaction. Each wake-up says whether it came from the subscriber's own
/// store (whose workers were told at the commit). SQLite has no subscription: its services are
/// woken on their host.
async fn an_enqueue_wakes_the_other_services_by_its_own_commit(b: &Backend) {
    let other = Store::open(&b.url).await.unwrap();
    let Some(mut wakes) = other.subscribe_wakes().await.unwrap() else { return };
    let s = &b.store;
    let within = Duration::from_secs(10);
    s.enqueue(Origin::MailTester, message("one"), Utc::now()).await.unwrap();
    assert_eq!(
        tokio::time::timeout(within, wakes.next()).await.expect("woken by the single enqueue").unwrap(),
        WakeFrom::Another
    );
    s.enqueue_many(&[(Origin::Dispatch, message("two"))], Utc::now()).await.unwrap();
    assert_eq!(
        tokio::time::timeout(within, wakes.next()).await.expect("woken by the bulk enqueue").unwrap(),
        WakeFrom::Another
    );
    // Written alone (an idempotency key's path, and a failed group's, write by write).
    let (_, created) = s.enqueue_once(Origin::MailTester, &message("keyed"), Utc::now(), "key-1").await.unwrap();
    assert!(created);
    assert_eq!(
        tokio::time::timeout(within, wakes.next()).await.expect("woken by the keyed enqueue").unwrap(),
        WakeFrom::Another
    );
    // 700 messages of ten recipients: 35,000 parameters, more than one round trip carries.
    let to: Vec<String> = (0..10).map(|i| format!("r{i}@example.org")).collect();
    let wide = |i: usize| {
        let draft = panel_domain::message::Draft {
            to: to.clone(),
            subject: format!("wide {i}"),
            text: "x".into(),
            ..Default::default()
        };
        let from = panel_domain::Mailbox::parse("from", "p@example.org").unwrap();
        let fallback = panel_domain::EmailAddress::parse("f", "f@example.org").unwrap();
        panel_domain::OutgoingMessage::prepare(&draft, &from, &fallback, Utc::now(), 1_000_000 + i as u128).unwrap()
    };
    let items: Vec<_> = (0..700).map(|i| (Origin::Dispatch, wide(i))).collect();
    let ids = s.enqueue_many(&items, Utc::now()).await.unwrap();
    assert_eq!(ids.len(), 700);
    let last = s.message(ids[699]).await.unwrap().unwrap();
    assert_eq!((last.subject.as_str(), last.recipients.len()), ("wide 699", 10));
    assert_eq!(
        tokio::time::timeout(within, wakes.next()).await.expect("woken by the large bulk enqueue").unwrap(),
        WakeFrom::Another
    );
    let mut own = s.subscribe_wakes().await.unwrap().expect("PostgreSQL");
    s.enqueue(Origin::MailTester, message("mine"), Utc::now()).await.unwrap();
    assert_eq!(tokio::time::timeout(within, own.next()).await.expect("heard").unwrap(), WakeFrom::ThisStore);
    assert_eq!(tokio::time::timeout(within, wakes.next()).await.expect("heard").unwrap(), WakeFrom::Another);
}

/// PostgreSQL only (SQLite has no server to lose): connections the server closed while they
/// sat in the pool are not handed out once idle for `POOL_IDLE_CHECK` (those are pinged first;
/// one used within it was pinged as it came back): the first read and write after every
/// connection of the database was terminated succeed.
async fn connections_the_server_dropped_while_idle_are_replaced_before_use(b: &Backend) {
    if !b.url.starts_with("postgres") {
        return;
    }
    let s = &b.store;
    // Several connections in the pool (reads at once), idle, and the token reader's own.
    let now = Utc::now();
    s.put_admin("ann", "admin", "$argon2id$x", false, "test", now).await.unwrap();
    s.add_token(&"a".repeat(64), "token", "ann", "one", None, None, now).await.unwrap();
    assert!(s.token_owner(&"a".repeat(64), now).await.unwrap().is_some());
    let reads = tokio::join!(s.queue_stats(now), s.queue_stats(now), s.queue_stats(now), s.queue_stats(now));
    for r in [reads.0, reads.1, reads.2, reads.3] {
        r.unwrap();
    }
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&b.url).await.unwrap();
    let dropped: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(!dropped.is_empty(), "the store held connections");
    // The condition under test is the pool's idle time itself.
    tokio::time::sleep(panel_store::POOL_IDLE_CHECK + Duration::from_millis(200)).await;
    s.queue_stats(Utc::now()).await.expect("the first read after the server dropped its connections");
    let owner = s.token_owner(&"a".repeat(64), Utc::now()).await.expect("and the first token's");
    assert_eq!(owner.map(|o| o.admin), Some("ann".to_string()));
    s.enqueue(Origin::MailTester, message("after"), Utc::now()).await.expect("and the first write");
}

/// A record writes each recipient's own outcome, at the recipient's position, from the
/// recipients its claim read; a stale attempt in the same batch (its message claimed again
/// since) writes nothing: neither its recipients nor its attempt.
async fn a_record_gives_each_recipient_its_outcome_and_a_stale_attempt_writes_nothing(b: &Backend) {
    let s = &b.store;
    let t0 = Utc::now();
    let to = ["a@example.org", "b@example.org", "c@example.org"];
    let id = s.enqueue(Origin::MailTester, message_to("three", &to), t0).await.unwrap();
    let stale = s.claim("w1", t0, Duration::from_millis(1), 10, false).await.unwrap().remove(0);
    let later = t0 + chrono::Duration::milliseconds(150);
    let fresh = s.claim("w2", later, Duration::from_secs(60), 10, false).await.unwrap().remove(0);
    assert_eq!(fresh.pending.len(), 3);
    let states = |m: &panel_store::MessageDetail| {
        m.recipients.iter().map(|r| (r.address.clone(), r.state.as_str().to_string())).collect::<Vec<_>>()
    };
    // Alone, while the message is being sent again: nothing changes.
    let alone = s.record_attempts(vec![(stale.reference, meta(&stale), settled_each(&[false, false, false]))]);
    assert_eq!(alone.await.unwrap(), [false]);
    let pending = to.map(|a| (a.to_string(), "pending".to_string()));
    assert_eq!(states(&s.message(id).await.unwrap().unwrap()), pending, "the stale attempt wrote its recipients");
    let results = s
        .record_attempts(vec![
            (stale.reference, meta(&stale), settled_each(&[false, false, false])),
            (fresh.reference, meta(&fresh), settled_each(&[true, false, true])),
        ])
        .await
        .unwrap();
    assert_eq!(results, [false, true]);
    let m = s.message(id).await.unwrap().unwrap();
    let expected = |b: &str| {
        vec![
            (to[0].to_string(), "delivered".to_string()),
            (to[1].to_string(), b.to_string()),
            (to[2].to_string(), "delivered".to_string()),
        ]
    };
    assert_eq!(states(&m), expected("failed"));
    assert!(m.recipients[1].reply.as_deref().unwrap_or_default().contains("5.1.1"), "{m:?}");
    let outcomes: Vec<_> = m.attempts.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes.len(), 2, "the interrupted lease and the current attempt, not the stale one: {outcomes:?}");
    let report: Vec<_> = m.attempts[1].recipients.as_array().unwrap().iter().map(|r| r["address"].clone()).collect();
    assert_eq!(report, to.map(serde_json::Value::from), "the attempt names its recipients in order");
    // Retried: only the failed recipient is pending, and its outcome lands at its position.
    assert_eq!(s.retry_message(id, Utc::now()).await.unwrap(), RetryResult::Requeued);
    let again = s.claim("w3", Utc::now(), Duration::from_secs(60), 10, false).await.unwrap().remove(0);
    assert_eq!(again.pending.iter().map(|p| p.position).collect::<Vec<_>>(), [1]);
    assert!(s.record_attempt(&again.reference, &meta(&again), &settled(true)).await.unwrap());
    let m = s.message(id).await.unwrap().unwrap();
    assert_eq!(states(&m), expected("delivered"));
    assert_eq!(m.state.as_str(), "delivered");
}

/// A claim that takes messages reads, in its own statement, the settings version and the
/// secrets generation they are to be sent with (the worker's relay follows them).
async fn a_claim_reads_the_settings_and_secrets_generations_it_sends_with(b: &Backend) {
    let s = &b.store;
    let take = || async {
        s.enqueue(Origin::MailTester, message("x"), Utc::now()).await.unwrap();
        s.claim("w", Utc::now(), Duration::from_secs(60), 10, false).await.unwrap().remove(0).seen
    };
    assert_eq!(take().await, s.config_generation().await.unwrap());
    let doc = SettingsDoc { host: Some("relay.example.org".into()), ..Default::default() };
    s.save_settings(0, &doc, "t", Utc::now(), &[]).await.unwrap();
    let credential = panel_store::NewCredential {
        id: "cred_a".into(),
        name: "a".into(),
        kind: "password".into(),
        username: "u".into(),
        attributes: Default::default(),
        master_key_id: "mk_1".into(),
        wrapped_key: vec![1],
        ciphertext: vec![2],
    };
    let before = s.config_generation().await.unwrap();
    s.put_credential(&credential, "t", Utc::now()).await.unwrap();
    let after = s.config_generation().await.unwrap();
    assert_eq!((after.settings, after.secrets), (1, before.secrets + 1));
    assert_eq!(take().await, after);
}

/// Mail this process's workers have room for (waiting, with free slots and nothing left to
/// claim) wakes no other service: they take it, woken on their host. Mail that does not fit,
/// or once the room is used up, wakes the others as before.
async fn mail_the_local_workers_have_room_for_wakes_no_other_service(b: &Backend) {
    let other = Store::open(&b.url).await.unwrap();
    let Some(mut wakes) = other.subscribe_wakes().await.unwrap() else { return };
    let s = &b.store;
    let within = Duration::from_secs(10);
    s.offer_room(2);
    let three: Vec<_> = (0..3).map(|i| (Origin::Dispatch, message(&format!("bulk {i}")))).collect();
    s.enqueue_many(&three, Utc::now()).await.unwrap();
    assert_eq!(tokio::time::timeout(within, wakes.next()).await.expect("three do not fit").unwrap(), WakeFrom::Another);
    s.enqueue(Origin::MailTester, message("one"), Utc::now()).await.unwrap();
    s.enqueue(Origin::MailTester, message("two"), Utc::now()).await.unwrap();
    s.enqueue(Origin::MailTester, message("three"), Utc::now()).await.unwrap();
    assert_eq!(tokio::time::timeout(within, wakes.next()).await.expect("the room used up").unwrap(), WakeFrom::Another);
    // The two that fit sent nothing: every NOTIFY committed so far has arrived by now.
    let more = tokio::time::timeout(Duration::from_millis(300), wakes.next()).await;
    assert!(more.is_err(), "one wake-up for the three single enqueues, not three: {more:?}");
    s.offer_room(0);
    s.enqueue(Origin::MailTester, message("four"), Utc::now()).await.unwrap();
    assert_eq!(tokio::time::timeout(within, wakes.next()).await.expect("no room").unwrap(), WakeFrom::Another);
}

/// Whether the worker was told of mail handed over to it (`Store::handed_ready`) since it last
/// looked: a hand-over waiting for it is taken at once.
async fn told(s: &Store) -> bool {
    tokio::time::timeout(Duration::ZERO, s.handed_ready()).await.is_ok()
}

/// PostgreSQL: mail enqueued into the room of this process's worker (`take_mail_as`) is
/// inserted already claimed for it and handed over in memory, once, as a claim would have
/// found it: nobody else claims it, its attempt is recorded with the handed claim, and a
/// handed message whose worker died is taken back when its lease runs out. Mail that does not
/// fit, or once the worker stopped, is queued for any claimer. SQLite hands nothing over (its
/// claims ride the group commit): its messages are claimed as before.
async fn mail_enqueued_into_the_workers_room_is_handed_over_already_claimed(b: &Backend) {
    let s = &b.store;
    let lease = Duration::from_secs(60);
    s.take_mail_as(Some(("w", lease)));
    s.offer_room(2);
    let t0 = Utc::now();
    let one = message("one");
    let enqueued = s.enqueue_here(Origin::MailTester, one.clone(), t0).await.unwrap();
    let id = enqueued.id;
    // The hand-over tells the worker (it wakes for it, not for the enqueue), once.
    assert_eq!((enqueued.handed_over, told(s).await), (s.is_shared(), s.is_shared()));
    assert!(!told(s).await, "told once");
    let handed = s.take_handed();
    if !s.is_shared() {
        assert!(handed.is_empty(), "SQLite hands nothing over");
        assert_eq!(s.claim("w", t0, lease, 10, false).await.unwrap()[0].reference.id, id);
        return;
    }
    assert_eq!(handed.len(), 1, "{handed:?}");
    let h = &handed[0];
    assert_eq!((h.reference.id, h.attempts, h.origin), (id, 0, Origin::MailTester));
    assert_eq!(h.message, one);
    let addresses: Vec<&str> = h.pending.iter().map(|r| r.address.as_str()).collect();
    assert_eq!(addresses, ["a@example.org"]);
    assert_eq!(h.seen, s.config_generation().await.unwrap());
    assert!(s.take_handed().is_empty(), "handed over once");
    assert_eq!(s.message(id).await.unwrap().unwrap().state.as_str(), "sending");
    assert!(s.claim("other", t0, lease, 10, false).await.unwrap().is_empty(), "nobody else claims it");
    // Three do not fit the slot left: queued for any claimer, nothing handed over.
    let three: Vec<_> = (0..3).map(|i| (Origin::Dispatch, message(&format!("bulk {i}")))).collect();
    let (bulk, handed_over) = s.enqueue_many_here(&three, t0).await.unwrap();
    assert!(!handed_over && !told(s).await, "queued for a claim: the enqueue wakes the workers");
    assert!(s.take_handed().is_empty());
    let claimed: Vec<i64> =
        s.claim("other", t0, lease, 10, false).await.unwrap().iter().map(|c| c.reference.id).collect();
    assert_eq!(claimed, bulk);
    assert!(s.record_attempt(&h.reference, &meta(h), &delivered()).await.unwrap());
    assert_eq!(s.message(id).await.unwrap().unwrap().state.as_str(), "delivered");
    // The slot left takes one more; its worker dies: its lease runs out like a claim's.
    let two = s.enqueue(Origin::MailTester, message("two"), t0).await.unwrap();
    let lost = s.take_handed().remove(0);
    assert_eq!(lost.reference.id, two);
    let later = t0 + chrono::Duration::seconds(61);
    // (The bulk messages' leases ran out too.)
    let again = s.claim("other", later, lease, 10, false).await.unwrap().into_iter().find(|c| c.reference.id == two);
    let again = again.expect("taken back and claimed again");
    assert_eq!((again.reference.id, again.message.clone()), (two, lost.message.clone()));
    assert_eq!(again.pending.len(), lost.pending.len());
    assert!(again.reference.token > lost.reference.token);
    assert!(!s.record_attempt(&lost.reference, &meta(&lost), &delivered()).await.unwrap(), "fenced out");
    // A stopped worker takes nothing: room or not, mail is queued.
    s.take_mail_as(None);
    s.offer_room(4);
    let three = s.enqueue(Origin::MailTester, message("three"), t0).await.unwrap();
    assert!(s.take_handed().is_empty());
    assert_eq!(s.claim("other", t0, lease, 10, false).await.unwrap()[0].reference.id, three);
    // The worker stops while an enqueue into its room is under way: whichever comes first,
    // the message is handed over or queued for any claimer, never left leased to nobody.
    for delay in 0..40u64 {
        s.take_mail_as(Some(("w", lease)));
        s.offer_room(1);
        let stopper = s.clone();
        let stop = tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_micros(delay * 50));
            stopper.take_mail_as(None);
        });
        let id = s.enqueue(Origin::MailTester, message("racing"), t0).await.unwrap();
        stop.await.unwrap();
        let handed: Vec<i64> = s.take_handed().iter().map(|c| c.reference.id).collect();
        let claimed: Vec<i64> =
            s.claim("other", t0, lease, 10, false).await.unwrap().iter().map(|c| c.reference.id).collect();
        match handed.as_slice() {
            [] => assert_eq!(claimed, [id], "not handed over: queued (after {delay} x 50 us)"),
            _ => assert_eq!((handed, claimed), (vec![id], vec![]), "handed over once (after {delay} x 50 us)"),
        }
    }
}
/// A message is shown as of one instant: its state, recipients and attempts read together. Read
/// one by one, a record committed between the reads showed a message still `sending` beside
/// the attempt that delivered it (seen in CI by an e2e test).
async fn a_messages_state_and_attempts_are_read_at_one_instant(b: &Backend) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    let (current, done) = (Arc::new(AtomicI64::new(0)), Arc::new(AtomicBool::new(false)));
    let reader = {
        let (s, current, done) = (b.store.clone(), current.clone(), done.clone());
        tokio::spawn(async move {
            let mut reads = 0;
            while !done.load(Ordering::Relaxed) {
                let id = current.load(Ordering::Relaxed);
                let Some(m) = s.message(id).await.unwrap() else {
                    tokio::task::yield_now().await;
                    continue;
                };
                // One recipient, one attempt: an attempt listed is the one that delivered it.
                let outcomes: Vec<_> = m.attempts.iter().map(|a| a.outcome.as_str()).collect();
                assert!(
                    outcomes.is_empty() || m.state.as_str() == "delivered",
                    "message {id} read as {} with attempts {outcomes:?}",
                    m.state.as_str()
                );
                reads += 1;
            }
            reads
        })
    };
    let s = &b.store;
    for i in 0..150 {
        let id = s.enqueue(Origin::MailTester, message(&format!("m{i}")), Utc::now()).await.unwrap();
        current.store(id, Ordering::Relaxed);
        let claim = s.claim("w", Utc::now(), Duration::from_secs(60), 1, false).await.unwrap().remove(0);
        assert!(s.record_attempt(&claim.reference, &meta(&claim), &delivered()).await.unwrap());
    }
    done.store(true, Ordering::Relaxed);
    assert!(reader.await.unwrap() >= 150, "the reader read throughout");
}

contract!(
    a_messages_state_and_attempts_are_read_at_one_instant,
    mail_enqueued_into_the_workers_room_is_handed_over_already_claimed,
    two_claims_of_one_owner_at_one_instant_each_get_their_own_messages_and_recipients,
    a_write_cancelled_at_any_point_is_all_or_nothing_and_leaves_the_database_writable,
    mail_the_local_workers_have_room_for_wakes_no_other_service,
    a_record_gives_each_recipient_its_outcome_and_a_stale_attempt_writes_nothing,
    a_claim_reads_the_settings_and_secrets_generations_it_sends_with,
    connections_the_server_dropped_while_idle_are_replaced_before_use,
    an_enqueue_wakes_the_other_services_by_its_own_commit,
    a_bounce_moves_its_recipient_and_message_and_an_unmatched_one_changes_nothing,
    a_batch_of_records_with_different_outcomes_gives_each_message_its_own,
    each_routes_latest_attempt_is_found_and_every_attempt_names_its_route,
    the_sending_budget_is_shared_and_never_overdrawn,
    the_budget_decides_as_counting_every_send_would,
    a_clock_that_went_back_never_widens_the_budget,
    concurrent_single_enqueues_share_commits_and_each_gets_its_own_message,
    urgent_mail_is_claimed_before_bulk_mail_which_keeps_its_share,
    a_check_request_is_taken_by_one_service_and_answered,
    a_cancelled_message_is_final_never_claimed_and_its_cancel_audited,
    a_corrupt_row_is_an_error_naming_its_table_and_column,
    a_bulk_enqueue_stores_every_message_in_one_transaction,
    ids_chosen_ahead_never_reuse_an_id_and_interleave_with_single_inserts,
    a_batch_of_attempts_is_recorded_together_and_a_stale_one_is_skipped,
    an_idempotency_key_enqueued_concurrently_creates_one_step,
    concurrent_claimers_never_take_the_same_step,
    concurrent_settings_saves_conflict_instead_of_overwriting,
    a_claimed_message_is_not_claimed_twice_while_leased,
    an_expired_lease_is_fenced_out_and_recorded_as_interrupted,
    a_busy_claimer_takes_an_expired_lease_within_the_scan_interval,
    settings_saves_are_versioned_and_conflicts_detected,
    only_failed_messages_can_be_retried,
    an_enqueued_message_survives_reopening_the_database
);
