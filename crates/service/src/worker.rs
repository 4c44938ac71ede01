//! The worker: claims due messages under a lease, delivers them through the relay, records each
//! attempt. Settings are re-read whenever their version changes, so a change made anywhere
//! applies to the next message this worker sends.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use panel_domain::classify::ConnectionContext;
use panel_domain::credential::CREDENTIAL_STORAGE;
use panel_domain::delivery::{AttemptContext, fail_over, route_failed, settle};
use panel_domain::{Failure, RecipientResult, RelayBackoff, RelaySettings, SendReport, is_relay_unreachable};
use panel_relay::{Connection, Graph, Relay, Transcript};
use panel_store::{AttemptMeta, Claim, ConfigGeneration, Release, Store};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::credential_source::StoredCredentials;
use crate::licensing::Grant;
use crate::ops::Panel;
use crate::wake::Waker;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Messages delivered at once (each on its own relay connection).
    pub concurrency: usize,
    /// How long a claim is held before another worker may take it; renewed while sending.
    pub lease: Duration,
    /// Safety-net poll when no wake-up arrives.
    pub poll: Duration,
    /// An idle relay connection is closed after this long.
    pub idle_connection: Duration,
    /// A test hook, called with each message right before it is sent; tests make it panic to
    /// prove that a failing delivery is recorded. Always `None` outside tests.
    pub before_send: Option<fn(&panel_domain::OutgoingMessage)>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: 4,
            lease: Duration::from_secs(60),
            poll: Duration::from_secs(1),
            idle_connection: Duration::from_secs(15),
            before_send: None,
        }
    }
}

/// How often the worker's loop looks for changed files and relay checks a CLI asked for.
const LOOK_AROUND: Duration = Duration::from_millis(100);

/// One claim in this many takes bulk mail before urgent mail.
const BULK_SHARE: u64 = 4;

/// The routes prepared for the settings and secrets in force.
struct RelayState {
    generation: ConfigGeneration,
    /// The installation's settings (the primary route's): the recipient policy, the sending
    /// limits and the retry schedule every route shares.
    settings: Arc<RelaySettings>,
    /// The primary route first, then the standbys, in the order they are tried.
    routes: Vec<RouteState>,
    /// When the license that lets these settings use a stored credential runs out: the state
    /// (and its authenticated connections) is rebuilt then, so expiry is enforced at use.
    licensed_until: Option<DateTime<Utc>>,
    /// The trusted authorities it was judged by (`Panel::authorities_serial`): a reloaded
    /// config file rebuilds it.
    authorities: u64,
}

/// One route's transport.
struct RouteState {
    name: String,
    /// Its sending limits (a budget of its own, shared by every service).
    limits: panel_domain::SendLimits,
    /// Distinguishes rebuilds and routes: pooled connections belong to one route of one state.
    serial: u64,
    relay: Result<Relay, Failure>,
    /// With `transport = graph`: Microsoft Graph's sendMail instead of an SMTP session.
    graph: Option<Arc<Graph>>,
}

/// What this worker knows of a route's health: its backoff while it cannot be reached (or
/// refuses Panel), and whether the one probe a route in backoff may take is out.
#[derive(Default)]
struct RouteHealth {
    backoff: RelayBackoff,
    probe_out: bool,
}

/// Whether the worker may claim: every route is usable (`Open`), only probes can go
/// (`Probe`: one message at a time), or every route waits (`Wait`).
enum Gate {
    Open,
    Probe,
    Wait(Duration),
}

/// The gate for the routes' health: open while a route is healthy, probing while a route's
/// backoff has run out, else the shortest wait.
fn gate(health: &[RouteHealth], now: Instant) -> Gate {
    let free = |h: &&RouteHealth| h.backoff.wait(now).is_none();
    if health.is_empty() || health.iter().filter(free).any(|h| !h.backoff.probing()) {
        Gate::Open
    } else if health.iter().any(|h| free(&h)) {
        Gate::Probe
    } else {
        Gate::Wait(health.iter().filter_map(|h| h.backoff.wait(now)).min().unwrap_or_default())
    }
}

/// What woke the worker's loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// Mail enqueued (here, or another service's), the poll, a slot freed, routes back: all
    /// may have left mail to claim.
    Claimable,
    /// Mail handed over to it at its enqueue (`Store::handed_ready`), and nothing else.
    HandedOver,
}

/// What one pass of the loop does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Takes the mail handed over to it.
    Handed,
    /// Claims due mail, up to its free slots.
    Claim,
    /// Nothing: no claim is owed (woken only for mail it had taken already).
    Idle,
    /// Nothing: every slot is busy; it claims when one frees.
    Full,
}

/// Whether the worker owes a claim: at its start, after every wake-up but a hand-over's, and
/// while its last pass did not end drained (mail may be left); a claim pays it. The decisions
/// of `run_worker`'s passes, apart from their I/O. A hand-over alone owes none: whatever else
/// is due woke the worker too, or will (with a wake-up per enqueue, most of its claims found
/// nothing). An owed claim is never dropped: a pass without a free slot keeps it owed, and one
/// that took handed mail meanwhile claims next, before it waits (else that mail waited for
/// the poll).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Claiming {
    owed: bool,
}

impl Claiming {
    fn start() -> Claiming {
        Claiming { owed: true }
    }

    fn woken(&mut self, by: Wake) {
        self.owed |= by == Wake::Claimable;
    }

    /// This pass, given whether mail was handed over and how many slots are free.
    fn pass(&mut self, handed: bool, free: u32) -> Pass {
        if handed {
            Pass::Handed
        } else if free == 0 {
            Pass::Full
        } else if !self.owed {
            Pass::Idle
        } else {
            self.owed = false;
            Pass::Claim
        }
    }

    /// Whether the worker is drained after `pass` (it went through: `ok`; it took `took`, a
    /// claim having asked for `asked`): nothing is left to claim, so it waits with its free
    /// slots offered as room for mail enqueued here. A claim that came back full, or with no
    /// relay to send with, or handed mail given back (the settings became unusable) leave it
    /// undrained, as does handed mail taken while a claim is owed.
    fn drained(&mut self, pass: Pass, ok: bool, took: u32, asked: u32) -> bool {
        let drained = match pass {
            Pass::Handed => ok && took > 0 && !self.owed,
            Pass::Claim => ok && took < asked,
            Pass::Idle => true,
            Pass::Full => false,
        };
        self.owed |= !drained;
        drained
    }
}

/// The route an attempt takes: the first, in order, that is not backing off; a route whose
/// backoff ran out takes one probe at a time while the next one carries the rest. With every
/// route backing off, the one back soonest.
fn pick_route(health: &mut [RouteHealth], now: Instant) -> usize {
    for (i, h) in health.iter_mut().enumerate() {
        if h.backoff.wait(now).is_some() {
            continue;
        }
        if !h.backoff.probing() {
            return i;
        }
        if !h.probe_out {
            h.probe_out = true;
            return i;
        }
    }
    (0..health.len()).min_by_key(|&i| health[i].backoff.wait(now).unwrap_or_default()).unwrap_or(0)
}

impl RelayState {
    fn version(&self) -> i64 {
        self.generation.settings
    }
}

struct Shared {
    panel: Panel,
    store: Store,
    owner: String,
    config: WorkerConfig,
    relay: Mutex<Option<Arc<RelayState>>>,
    /// Idle connections, tagged with the serial of the route they were opened on.
    pool: Mutex<Vec<(u64, Instant, Connection)>>,
    serial: AtomicU64,
    /// Claims made, for the share of bulk mail (`BULK_SHARE`).
    claims: AtomicU64,
    /// Each route's health (in the routes' order); reset when the settings change.
    health: Mutex<Vec<RouteHealth>>,
    /// Attempts to record, written in batches by `record_in_batches`.
    recorder: mpsc::Sender<Record>,
    /// Set when this worker recorded a configuration error before MAIL FROM: the next attempt
    /// that gets further proves it fixed and releases what it held.
    held_seen: AtomicBool,
    /// When held messages were last looked for after a successful attempt; other services'
    /// holds are found this way, at most every `HELD_RECHECK`.
    held_checked: Mutex<Option<Instant>>,
    /// The files outside Panel the settings read (password file, keytab, CA file), as last seen.
    outside: Mutex<OutsideFiles>,
    /// Told when a delivery hands its slot back (`Slot::free`): the loop claims for it then.
    slot_freed: Notify,
    /// The worker waits with room offered (`Store::offer_room`: free slots, nothing left to
    /// claim): a slot that frees meanwhile is room for one more message enqueued here.
    drained: AtomicBool,
}

/// A delivery's share of `WorkerConfig::concurrency`, handed back as soon as its attempt is in
/// the group committer's queue, not once the record is committed: the claim that fills the
/// slot again then rides the same group commit as that record (or a later one, never an
/// earlier one), and a slot costs one commit per message instead of two in a row (record,
/// then claim). What that claim takes is sent after the record is committed, so a worker
/// killed at any moment still holds at most one unrecorded sent message per slot. Handed back
/// on drop too (a delivery that ended early or panicked).
struct Slot {
    permit: Mutex<Option<OwnedSemaphorePermit>>,
    shared: Arc<Shared>,
}

impl Slot {
    fn free(&self) {
        if self.permit.lock().expect("not poisoned").take().is_some() {
            self.shared.slot_freed.notify_one();
            if self.shared.drained.load(Ordering::Acquire) {
                self.shared.store.add_room(1);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.free();
    }
}

/// One attempt waiting to be recorded, and where to say whether it was (fenced: false).
struct Record {
    claim: panel_store::ClaimRef,
    meta: AttemptMeta,
    settlement: panel_domain::Settlement,
    reply: oneshot::Sender<Result<bool, String>>,
    /// Handed back once the record is in the committer's queue.
    slot: Arc<Slot>,
}

/// Group commit: whatever attempts finished while the previous batch was being written go
/// into the next transaction together, so a busy worker pays one commit (one fsync on SQLite)
/// for many messages, and an idle one records a lone attempt at once.
async fn record_in_batches(store: Store, mut queue: mpsc::Receiver<Record>) {
    const MAX_BATCH: usize = 128;
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let (items, rest): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|r| ((r.claim, r.meta, r.settlement), (r.reply, r.slot))).unzip();
        let (replies, slots): (Vec<_>, Vec<_>) = rest.into_iter().unzip();
        match store.record_attempts_then(items, || slots.iter().for_each(|s| s.free())).await {
            Ok(results) => {
                for (reply, ok) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(ok));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.to_string()));
                }
            }
        }
    }
}

/// Runs until `shutdown` turns true, then finishes the messages in hand.
pub async fn run_worker(
    panel: Panel,
    owner: String,
    config: WorkerConfig,
    waker: Waker,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(config.concurrency));
    let (recorder, queue) = mpsc::channel(1024);
    let recording = tokio::spawn(record_in_batches(panel.store.clone(), queue));
    let shared = Arc::new(Shared {
        store: panel.store.clone(),
        panel,
        owner,
        config,
        relay: Mutex::new(None),
        pool: Mutex::new(Vec::new()),
        serial: AtomicU64::new(0),
        claims: AtomicU64::new(0),
        health: Mutex::new(Vec::new()),
        recorder,
        held_seen: AtomicBool::new(false),
        held_checked: Mutex::new(None),
        outside: Mutex::new(OutsideFiles::default()),
        slot_freed: Notify::new(),
        drained: AtomicBool::new(false),
    });
    // However the worker ends (stopped, or a panic), the mail enqueued here is no longer its own.
    let _no_room = NoRoomAfter(shared.store.clone());
    shared.store.take_mail_as(Some((&shared.owner, shared.config.lease)));
    let mut tasks = JoinSet::new();
    let mut looked: Option<Instant> = None;
    // How many the last claim asked for (counted when it ran), and whether it came back with
    // fewer: then nothing else was due, and claiming again when a slot frees would come back
    // empty (with several services, most wake-ups already do). Until new mail wakes the
    // worker, or the poll interval passes (mail due by its time: a retry), it waits.
    let asked = Arc::new(AtomicU32::new(0));
    let mut claiming = Claiming::start();
    tracing::info!(worker = %shared.owner, "worker started");
    while !*shutdown.borrow() {
        while tasks.try_join_next().is_some() {}
        let gate = gate(&shared.health.lock().expect("not poisoned"), Instant::now());
        if let Gate::Wait(wait) = gate {
            // Every route is unreachable: leave them (and the queued messages) alone until then,
            // and the mail enqueued here meanwhile to the other services.
            shared.drained.store(false, Ordering::Release);
            shared.store.offer_room(0);
            claiming.woken(Wake::Claimable);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        let probing = matches!(gate, Gate::Probe);
        // While probing, one message at a time finds out whether a route is back.
        let free = if probing { u32::from(tasks.is_empty()) } else { slots.available_permits() as u32 };
        asked.store(0, Ordering::Relaxed);
        // Mail enqueued here into the room offered, inserted already claimed for this worker.
        let handed = shared.store.take_handed();
        let pass = claiming.pass(!handed.is_empty(), free);
        let claimed = if pass == Pass::Handed {
            with_relay(&shared, handed, shared.panel.now()).await
        } else if pass != Pass::Claim {
            Ok(None)
        } else {
            // Counted again when the claim runs: slots that free while it waits for its turn
            // are filled by the same claim.
            let asked = asked.clone();
            let limit: panel_store::ClaimLimit = match probing {
                true => Arc::new(move || {
                    asked.store(free, Ordering::Relaxed);
                    free
                }),
                false => {
                    let slots = slots.clone();
                    Arc::new(move || {
                        let free = slots.available_permits() as u32;
                        asked.store(free, Ordering::Relaxed);
                        free
                    })
                }
            };
            claim(&shared, limit).await
        };
        let took = match &claimed {
            Ok(Some((_, claims))) => claims.len() as u32,
            _ => 0,
        };
        let asked_for = asked.load(Ordering::Relaxed);
        if claimed.is_ok() && asked_for > 0 {
            shared.panel.metrics.claim(took > 0);
        }
        let drained = claiming.drained(pass, claimed.is_ok(), took, asked_for);
        match claimed {
            Ok(Some((state, claims))) => start_deliveries(&shared, &slots, &mut tasks, state, claims).await,
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "claiming failed; retrying"),
        }
        // Free slots and nothing left to claim: mail enqueued in this process that fits is this
        // worker's to take (it is woken locally), and its commit wakes no other service. Busy,
        // probing a route, or with mail left to claim, it offers none.
        let room = if drained && !probing { slots.available_permits() as u32 } else { 0 };
        shared.drained.store(room > 0, Ordering::Release);
        shared.store.offer_room(room);
        // More mail may be due (a full claim), or mail was handed over on a wake-up that owes
        // a claim: it claims now, without waiting.
        if took > 0 && !drained {
            continue;
        }
        let woken = tokio::select! {
            _ = waker.woken() => Wake::Claimable,
            _ = shared.store.handed_ready() => Wake::HandedOver,
            _ = tokio::time::sleep(shared.config.poll) => Wake::Claimable,
            _ = shutdown.changed() => Wake::Claimable,
            Some(_) = tasks.join_next(), if !tasks.is_empty() && !drained => Wake::Claimable,
            _ = shared.slot_freed.notified(), if !drained => Wake::Claimable,
        };
        claiming.woken(woken);
        prune_idle(&shared);
        // A busy worker passes here after every message: the files and the check requests
        // (a query) are looked at a few times a second, not each time.
        if looked.is_none_or(|at| at.elapsed() >= LOOK_AROUND) {
            looked = Some(Instant::now());
            notice_outside_fixes(&shared).await;
            answer_checks(&shared).await;
        }
    }
    // Handed over since the last pass: in hand too (else they would wait for their leases).
    shared.store.take_mail_as(None);
    let handed = shared.store.take_handed();
    if !handed.is_empty()
        && let Ok(Some((state, claims))) = with_relay(&shared, handed, shared.panel.now()).await
    {
        start_deliveries(&shared, &slots, &mut tasks, state, claims).await;
    }
    tracing::info!(in_flight = tasks.len(), "worker stopping; finishing messages in hand");
    while tasks.join_next().await.is_some() {}
    let idle: Vec<_> = shared.pool.lock().expect("not poisoned").drain(..).collect();
    for (_, _, conn) in idle {
        conn.quit(None).await;
    }
    drop(shared);
    let _ = recording.await;
}

/// Takes back the room a worker offered (`Store::offer_room`) when it ends.
struct NoRoomAfter(Store);

impl Drop for NoRoomAfter {
    fn drop(&mut self) {
        self.0.take_mail_as(None);
    }
}

/// A delivery for each of `claims`, each in a slot of its own (waiting for one to free).
async fn start_deliveries(
    shared: &Arc<Shared>,
    slots: &Arc<Semaphore>,
    tasks: &mut JoinSet<()>,
    state: Arc<RelayState>,
    claims: Vec<Claim>,
) {
    for c in claims {
        shared.panel.metrics.step_claimed(c.origin.as_str());
        let permit = slots.clone().acquire_owned().await.expect("semaphore open");
        let slot = Arc::new(Slot { permit: Mutex::new(Some(permit)), shared: shared.clone() });
        tasks.spawn(deliver_supervised(shared.clone(), state.clone(), c, slot));
    }
}

/// Claims due messages together with the relay they are to be sent with: the settings version
/// is checked once per claim, not once per message, as the claim's own statement read it (a
/// read of its own after each claim that took something was a round trip per claim).
async fn claim(
    shared: &Shared,
    limit: panel_store::ClaimLimit,
) -> panel_store::Result<Option<(Arc<RelayState>, Vec<Claim>)>> {
    // Before the first settings there is nothing to send with: messages wait, nothing is lost.
    if shared.relay.lock().expect("not poisoned").is_none() && current_relay(shared).await?.is_none() {
        return Ok(None);
    }
    // Every BULK_SHARE-th claim takes bulk mail first: urgent mail goes ahead, and bulk mail is
    // never starved by it.
    let bulk_first = shared.claims.fetch_add(1, Ordering::Relaxed) % BULK_SHARE == BULK_SHARE - 1;
    let now = shared.panel.now();
    let claims = shared.store.claim_up_to(&shared.owner, now, shared.config.lease, limit, bulk_first).await?;
    with_relay(shared, claims, now).await
}

/// The relay to send `claims` with, for the settings and secrets their claim saw; `None` when
/// there are none, or when the settings became unusable: then the claims are given back.
async fn with_relay(
    shared: &Shared,
    claims: Vec<Claim>,
    now: DateTime<Utc>,
) -> panel_store::Result<Option<(Arc<RelayState>, Vec<Claim>)>> {
    let Some(first) = claims.first() else { return Ok(None) };
    match relay_for(shared, first.seen).await {
        Ok(Some(state)) => Ok(Some((state, claims))),
        // The settings became unusable (or unreadable) since: the messages go back unsent, due
        // again at once, and wait as they would have before the claim.
        outcome => {
            // The next claim looks at the settings first again, and waits while they are unusable.
            *shared.relay.lock().expect("not poisoned") = None;
            for c in &claims {
                let note = "not sent: the relay settings could not be read or are invalid; waiting for them";
                if let Err(e) = shared.store.defer_claim(&c.reference, now, now, note).await {
                    tracing::warn!(message_id = c.reference.id, error = %e, "could not give the message back; its lease will expire");
                }
            }
            outcome.map(|_| None)
        }
    }
}

/// The relay for the settings and secrets in force, rebuilt when either changes.
async fn current_relay(shared: &Shared) -> panel_store::Result<Option<Arc<RelayState>>> {
    relay_for(shared, shared.store.config_generation().await?).await
}

/// `current_relay` for the settings and secrets `generation` (as a claim read them).
async fn relay_for(shared: &Shared, generation: ConfigGeneration) -> panel_store::Result<Option<Arc<RelayState>>> {
    if generation.settings == 0 {
        return Ok(None);
    }
    let authorities = shared.panel.authorities_serial();
    if let Some(state) = shared.relay.lock().expect("not poisoned").as_ref()
        && state.generation == generation
        && state.authorities == authorities
        && state.licensed_until.is_none_or(|until| shared.panel.now() < until)
    {
        return Ok(Some(state.clone()));
    }
    let Some(stored) = shared.store.current_settings().await? else { return Ok(None) };
    let settings = match RelaySettings::validate(&stored.doc) {
        Ok(s) => s,
        Err(errors) => {
            tracing::error!(version = stored.version, %errors, "stored relay settings are invalid; messages wait");
            return Ok(None);
        }
    };
    let licensed_until = match settings.routes().any(|(_, r)| r.auth.credential().is_some()) {
        false => None,
        true => match shared.panel.grant(CREDENTIAL_STORAGE).await {
            Ok(Grant::Yes { until }) => until,
            // Not licensed: connecting fails with the reason; check again in a minute.
            _ => Some(shared.panel.now() + chrono::Duration::minutes(1)),
        },
    };
    let routes: Vec<RouteState> = settings
        .routes()
        .map(|(name, route)| {
            let credentials = StoredCredentials::for_settings(&shared.panel, route, &shared.owner);
            let route = Arc::new(route.clone());
            let (relay, graph) = match route.graph {
                None => (Relay::new(route.clone(), credentials), None),
                Some(_) => match Graph::new(route.clone(), credentials) {
                    Ok(g) => (Relay::new(route.clone(), None), Some(Arc::new(g))),
                    Err(f) => (Err(f), None),
                },
            };
            if let Err(f) = &relay {
                tracing::error!(version = stored.version, route = name, error = %f, "route settings cannot be used");
            }
            let serial = shared.serial.fetch_add(1, Ordering::Relaxed) + 1;
            RouteState { name: name.to_string(), limits: route.limits, serial, relay, graph }
        })
        .collect();
    let generation = ConfigGeneration { settings: stored.version, ..generation };
    shared.outside.lock().expect("not poisoned").watch(&settings);
    let settings = Arc::new(settings);
    // New settings are new routes: the old ones' backoff says nothing about them.
    *shared.health.lock().expect("not poisoned") = routes.iter().map(|_| RouteHealth::default()).collect();
    let state = Arc::new(RelayState { generation, settings, routes, licensed_until, authorities });
    *shared.relay.lock().expect("not poisoned") = Some(state.clone());
    tracing::info!(version = stored.version, secrets = generation.secrets, "relay settings loaded");
    Ok(Some(state))
}

/// An idle connection of the route `serial`, if the pool has one.
fn take_connection(shared: &Shared, serial: u64) -> Option<Connection> {
    prune_idle(shared);
    let mut pool = shared.pool.lock().expect("not poisoned");
    let at = pool.iter().rposition(|(s, _, _)| *s == serial)?;
    Some(pool.remove(at).2)
}

fn prune_idle(shared: &Shared) {
    let serials: Vec<u64> = match shared.relay.lock().expect("not poisoned").as_ref() {
        Some(state) => state.routes.iter().map(|r| r.serial).collect(),
        None => Vec::new(),
    };
    let mut pool = shared.pool.lock().expect("not poisoned");
    retire(drop_stale(&mut pool, &serials, shared.config.idle_connection));
}

/// Takes out of the pool the connections idle too long or made for routes no longer in force.
fn drop_stale(pool: &mut Vec<(u64, Instant, Connection)>, serials: &[u64], idle: Duration) -> Vec<Connection> {
    let (keep, stale): (Vec<_>, Vec<_>) =
        pool.drain(..).partition(|(v, at, _)| serials.contains(v) && at.elapsed() < idle);
    *pool = keep;
    stale.into_iter().map(|(_, _, c)| c).collect()
}

/// Ends connections leaving the pool with QUIT and a clean (TLS) close, off the delivery path:
/// relays log a dropped session as an error, and some count them against the client.
fn retire(connections: Vec<Connection>) {
    if connections.is_empty() {
        return;
    }
    tokio::spawn(async move {
        for c in connections {
            c.quit(None).await;
        }
    });
}

/// What the record of an attempt needs from its claim, kept apart from the claim itself so that
/// an attempt whose delivery panicked can still be recorded.
#[derive(Clone)]
struct ClaimInfo {
    reference: panel_store::ClaimRef,
    origin: panel_domain::Origin,
    attempts: i64,
    created_at: DateTime<Utc>,
    /// The claim's pending recipients, which the attempt is for (its record writes them).
    recipients: Vec<panel_store::PendingRecipient>,
    earlier: panel_domain::Earlier,
}

impl ClaimInfo {
    fn of(claim: &Claim) -> ClaimInfo {
        ClaimInfo {
            reference: claim.reference,
            origin: claim.origin,
            attempts: claim.attempts,
            created_at: claim.created_at,
            recipients: claim.pending.clone(),
            earlier: claim.earlier.clone(),
        }
    }
}

/// Delivers `claim` in a task of its own. A panic in the delivery code is recorded as a failed
/// attempt of class `internal` with the panic's message, so the message follows its retry
/// schedule and fails in the end, instead of losing the attempt and coming back after every
/// lease forever.
async fn deliver_supervised(shared: Arc<Shared>, state: Arc<RelayState>, claim: Claim, slot: Arc<Slot>) {
    let info = ClaimInfo::of(&claim);
    let started = shared.panel.now();
    let inner = tokio::spawn({
        let (shared, state, slot) = (shared.clone(), state.clone(), slot.clone());
        async move { deliver(&shared, &state, claim, slot).await }
    });
    let Err(e) = inner.await else { return };
    if !e.is_panic() {
        return; // Cancelled at shutdown: the lease runs out and another worker takes it.
    }
    let why = crate::supervisor::panic_message(e.into_panic());
    tracing::error!(message_id = info.reference.id, panic = %why, "delivering the message panicked; recorded as an internal failure");
    let report = SendReport {
        recipients: vec![RecipientResult::NotTried; info.recipients.len()],
        failure: Some(Failure::new(
            panel_domain::Stage::Internal,
            panel_domain::FailureKind::Internal,
            format!("Panel failed while delivering: {why}"),
        )),
        data_reply: None,
    };
    let ctx = ConnectionContext { port: 0, security: panel_domain::Security::None };
    let via = Via { route: None, relay: String::new(), ctx };
    settle_and_record(&shared, &state, info, started, report, via, slot).await;
}

/// The route `index` took no attempt after all: its probe (if this was one) is free again.
fn free_probe(shared: &Shared, index: usize) {
    if let Some(h) = shared.health.lock().expect("not poisoned").get_mut(index) {
        h.probe_out = false;
    }
}

/// Where an attempt went: the route (its index in the state's routes; none when the
/// delivery panicked before it was known), the relay's address, and how it was connected.
struct Via {
    route: Option<usize>,
    relay: String,
    ctx: ConnectionContext,
}

/// Stops the lease renewal when the delivery ends, also when it ends by a panic.
struct Renewal(tokio::task::JoinHandle<()>);

impl Drop for Renewal {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn deliver(shared: &Arc<Shared>, state: &RelayState, claim: Claim, slot: Arc<Slot>) {
    let started = shared.panel.now();
    let id = claim.reference.id;
    let info = ClaimInfo::of(&claim);
    let lease = Arc::new(Lease {
        store: shared.store.clone(),
        clock: shared.panel.clock(),
        reference: claim.reference,
        length: shared.config.lease,
        renewed: Mutex::new(Instant::now()),
    });
    let renewal = Renewal(tokio::spawn(lease.clone().keep_renewed()));
    let recipients: Vec<String> = claim.pending.iter().map(|p| p.address.clone()).collect();
    // The recipient policy: what this attempt sends (redirected, or without the recipients
    // outside the allowed domains, which are refused for good and never sent to).
    let plan = state.settings.policy.plan(&claim.message, &recipients);
    let message = plan.message.as_ref().unwrap_or(&claim.message);
    let index = {
        let mut health = shared.health.lock().expect("not poisoned");
        // Health of newer settings' routes (a save during the claim): this claim's settings go
        // by their primary, as they would have before.
        match health.len() == state.routes.len() {
            true => pick_route(&mut health, Instant::now()),
            false => 0,
        }
    };
    let route = &state.routes[index];
    if route.limits.any()
        && !plan.envelope.is_empty()
        && !within_limits(shared, &claim, route, plan.envelope.len()).await
    {
        free_probe(shared, index);
        drop(renewal);
        return;
    }
    let (report, relay_addr, ctx) = match &route.relay {
        Err(f) => (
            SendReport {
                recipients: vec![RecipientResult::NotTried; recipients.len()],
                failure: Some(f.clone()),
                data_reply: None,
            },
            String::new(),
            ConnectionContext { port: 0, security: panel_domain::Security::None },
        ),
        Ok(relay) => {
            let ctx = ConnectionContext { port: relay.settings.port, security: relay.settings.security };
            if let Some(hook) = shared.config.before_send {
                hook(&claim.message);
            }
            let sent = match &route.graph {
                _ if plan.envelope.is_empty() => Some(None),
                Some(graph) => send_graph(graph, message, plan.envelope.len(), &lease).await.map(Some),
                None => {
                    let envelope = envelope(shared, &state.settings, id, message, &plan.envelope).await;
                    send(shared, route.serial, relay, message, &envelope, &lease).await.map(Some)
                }
            }
            .map(|sent| plan.report_for_pending(sent));
            let address = match &route.graph {
                // Nothing left Panel: the attempt names the policy, not a relay it never reached.
                _ if plan.envelope.is_empty() => "(not sent: recipient policy)".to_string(),
                Some(g) => g.address(),
                None => relay.address(),
            };
            let Some(report) = sent else {
                drop(renewal);
                free_probe(shared, index);
                tracing::warn!(
                    message_id = id,
                    "lease lost before sending (this worker was paused or cut off); another worker owns the message; nothing sent"
                );
                return;
            };
            (report, address, ctx)
        }
    };
    drop(renewal);
    let via = Via { route: Some(index), relay: relay_addr, ctx };
    settle_and_record(shared, state, info, started, report, via, slot).await;
}

/// The SMTP envelope of one attempt.
struct Envelope {
    /// MAIL FROM: the From address, or with a bounce domain the message's VERP address.
    from: String,
    to: Vec<String>,
    /// With a bounce domain: the ENVID a DSN carries back (the Message-ID).
    envid: Option<String>,
}

/// The envelope for message `id`: with a bounce domain its sender is `bounces+TOKEN@DOMAIN`
/// (the token signed, so a bounce to it is this message's and cannot be forged) and DSNs are
/// asked for; without one, the From address, as ever.
async fn envelope(
    shared: &Shared,
    settings: &RelaySettings,
    id: i64,
    message: &panel_domain::OutgoingMessage,
    to: &[String],
) -> Envelope {
    let plain = || Envelope { from: message.from.address.to_string(), to: to.to_vec(), envid: None };
    let Some(domain) = &settings.bounce_domain else { return plain() };
    match shared.panel.bounce_token(id).await {
        Ok(token) => Envelope {
            from: panel_domain::bounce::verp_address(&token, domain),
            to: to.to_vec(),
            envid: Some(message.message_id.clone()),
        },
        // Sent all the same, with the From address: a bounce then lands where it always did.
        Err(e) => {
            tracing::warn!(message_id = id, error = %e, "cannot sign the bounce address; sending with the From address");
            plain()
        }
    }
}

/// Takes this send from its route's sending budget (every service shares it). When there is no room, the message
/// goes back to the queue unsent (no attempt: the relay was never asked), due when the budget
/// has room, with why in its log; false then.
async fn within_limits(shared: &Shared, claim: &Claim, route: &RouteState, recipients: usize) -> bool {
    let (now, limits) = (shared.panel.now(), route.limits);
    let (per_minute, per_day) = (limits.messages_per_minute, limits.recipients_per_day);
    let until = match shared.store.reserve_send(now, &route.name, recipients, per_minute, per_day).await {
        Ok(None) => return true,
        Ok(Some(until)) => until,
        // The budget cannot be read: wait a little rather than risk going over it.
        Err(e) => {
            tracing::warn!(message_id = claim.reference.id, error = %e, "cannot read the sending limits' budget");
            now + chrono::Duration::seconds(5)
        }
    };
    let note = format!(
        "held by the sending limit of route {} ({}) until {}",
        route.name,
        limits.describe(),
        until.format("%Y-%m-%d %H:%M:%S UTC")
    );
    tracing::info!(message_id = claim.reference.id, route = %route.name, %until, "held by the sending limit");
    if let Err(e) = shared.store.defer_claim(&claim.reference, until, now, &note).await {
        tracing::warn!(message_id = claim.reference.id, error = %e, "could not hold the message; its lease will expire");
    }
    false
}

/// Settles an attempt (the pure rules of `settle`), logs and counts it, moves the relay-wide
/// backoff, and hands it to the group-committing recorder.
async fn settle_and_record(
    shared: &Shared,
    state: &RelayState,
    claim: ClaimInfo,
    started: DateTime<Utc>,
    report: SendReport,
    via: Via,
    slot: Arc<Slot>,
) {
    let id = claim.reference.id;
    let Via { route, relay: relay_addr, ctx } = via;
    let route_name = route.map(|i| state.routes[i].name.clone());
    let report_retry_after = report.failure.as_ref().and_then(|f| f.retry_after);
    let policy = state.settings.retry.clone();
    let attempts = claim.attempts as u32 + 1;
    let age = (shared.panel.now() - claim.created_at).to_std().unwrap_or_default();
    let settlement = settle(
        &report,
        AttemptContext {
            connection: ctx,
            policy: &policy,
            attempts,
            age,
            random: crate::random_u128() as u64,
            earlier: &claim.earlier,
        },
    );
    // What the attempt says about its route. Unreachable, refusing service or asking Panel to
    // slow down: the route backs off (and goes one message at a time when it is due again).
    // With several routes, a route that refuses Panel itself (a rejected password, a TLS or
    // configuration error) backs off too, and the message goes by the next route at once
    // instead of waiting for its retry time or a fix. Only an attempt that reached the relay
    // ends a backoff.
    let throttled = settlement.failure_class == Some(panel_domain::FailureClass::Transient)
        && settlement.reply.as_ref().is_some_and(panel_domain::is_throttling);
    let unreachable = is_relay_unreachable(settlement.stage, settlement.failure_class, settlement.reply.as_ref());
    let (delay, failed_over, outage_ended) = {
        let (mut delay, mut failed_over, mut outage_ended) = (None, None, false);
        // Settings replaced while the attempt ran come with routes of their own, whose health
        // starts afresh: this attempt says nothing about them.
        let mut health = shared.health.lock().expect("not poisoned");
        if let Some(i) = route.filter(|_| health.len() == state.routes.len()) {
            let now = Instant::now();
            health[i].probe_out = false;
            let several = health.len() > 1;
            if throttled || unreachable || (several && route_failed(&settlement)) {
                delay = Some(health[i].backoff.failed(now, report_retry_after));
                if several {
                    failed_over = (0..health.len()).find(|&j| j != i && health[j].backoff.wait(now).is_none());
                }
            } else if !matches!(settlement.stage, panel_domain::Stage::Config | panel_domain::Stage::Policy) {
                outage_ended = health[i].backoff.reached();
            }
        }
        (delay, failed_over, outage_ended)
    };
    let metrics = &shared.panel.metrics;
    let route_label = route_name.as_deref().unwrap_or_default();
    if let Some(delay) = delay {
        let why = if throttled {
            metrics.throttled();
            "the relay asked Panel to slow down; the route pauses, then resumes one message at a time"
        } else if unreachable {
            metrics.connection_error(settlement.stage.as_str());
            "relay unreachable; backing off before trying it again"
        } else {
            "the route refuses Panel (its settings, credential or TLS); backing off before trying it again"
        };
        tracing::warn!(
            route = route_label,
            relay = %relay_addr,
            stage = settlement.stage.as_str(),
            detail = %settlement.detail,
            backoff_secs = delay.as_secs(),
            "{why}"
        );
    }
    let settlement = match failed_over {
        Some(j) => {
            metrics.failover();
            tracing::warn!(
                message_id = id,
                route = route_label,
                next = %state.routes[j].name,
                "the message goes by the next route at once"
            );
            fail_over(settlement, &state.routes[j].name)
        }
        None => settlement,
    };
    if outage_ended {
        release_outage(shared).await;
    }
    let meta = AttemptMeta {
        started_at: started,
        finished_at: shared.panel.now(),
        service_id: shared.owner.clone(),
        relay: relay_addr.clone(),
        route: route_name.clone(),
        settings_version: state.version(),
        recipients: claim.recipients,
    };
    tracing::info!(
        message_id = id,
        route = route_label,
        relay = %relay_addr,
        outcome = %settlement.outcome,
        stage = settlement.stage.as_str(),
        code = settlement.reply.as_ref().map(|r| r.code),
        detail = %settlement.detail,
        state = %settlement.state,
        "attempt"
    );
    let class = settlement.failure_class.map(panel_domain::FailureClass::as_str);
    let code = settlement.reply.as_ref().map(|r| r.code);
    metrics.attempt(claim.origin.as_str(), settlement.outcome.as_str(), class, code, settlement.state.as_str());
    if settlement.state == panel_domain::MessageState::Delivered {
        metrics.delivered_after((shared.panel.now() - claim.created_at).num_microseconds().unwrap_or(0) as f64 / 1e6);
    }
    // A hold (a configuration error no other route could take over) waits for a fix.
    let held = settlement.outcome == panel_domain::AttemptOutcome::ConfigurationError
        && settlement.state == panel_domain::MessageState::Failed;
    if held && !settlement.stage.is_past_session() {
        shared.held_seen.store(true, Ordering::Relaxed);
    } else if settlement.stage.is_past_session() {
        release_proven(shared, state).await;
    }
    let (reply, recorded) = oneshot::channel();
    let record = Record { claim: claim.reference, meta, settlement, reply, slot };
    let result = match shared.recorder.send(record).await {
        Ok(()) => recorded.await.unwrap_or_else(|_| Err("the recorder stopped".into())),
        Err(_) => Err("the recorder stopped".into()),
    };
    match result {
        Ok(true) if held => release_if_superseded(shared, state).await,
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(
                message_id = id,
                "lease lost before the outcome was recorded; another worker owns this message"
            )
        }
        Err(e) => {
            tracing::error!(message_id = id, error = %e, "recording the attempt failed; the lease will expire and the message is retried")
        }
    }
}

/// How often a worker that holds nothing itself looks for messages another service held, after
/// its own attempts prove the session works.
const HELD_RECHECK: Duration = Duration::from_secs(30);

/// The relay answered after an outage: what the outage deferred is due now, not at each
/// message's own retry time, and this worker (no longer probing) drains it at full speed.
async fn release_outage(shared: &Shared) {
    match shared.store.release_outage(shared.panel.now()).await {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(messages = n, "relay reachable again; the messages the outage deferred are due now");
            shared.panel.wake_workers().await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not release the messages the outage deferred; they keep their retry times")
        }
    }
}

/// A configuration error found with settings that were replaced while the attempt ran: the
/// save released what was held before this hold was recorded, so this message would wait for
/// a fix that has already come. It goes again with the settings now in force.
async fn release_if_superseded(shared: &Shared, state: &RelayState) {
    match current_relay(shared).await {
        Ok(Some(now)) if now.generation.settings != state.generation.settings => {
            release_held(shared, &now, Release::All, "the settings changed while it was being sent").await
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not read the settings in force"),
    }
}

/// An attempt got past connection, TLS and AUTH: messages held by a configuration error at
/// those stages would get past them too, so they go again now (within their retry window).
async fn release_proven(shared: &Shared, state: &RelayState) {
    let seen = shared.held_seen.swap(false, Ordering::Relaxed);
    {
        let mut checked = shared.held_checked.lock().expect("not poisoned");
        if !seen && checked.is_some_and(|t| t.elapsed() < HELD_RECHECK) {
            return;
        }
        *checked = Some(Instant::now());
    }
    release_held(shared, state, Release::SessionFailures, "an attempt got past the stage that held them").await;
}

async fn release_held(shared: &Shared, state: &RelayState, scope: Release, why: &str) {
    match shared.store.release_held(&state.settings.doc, shared.panel.now(), scope).await {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(messages = n, why, "messages held by a configuration error are tried again");
            shared.panel.wake_workers().await;
        }
        Err(e) => tracing::warn!(error = %e, why, "could not release the held messages"),
    }
}

/// A password file, keytab or CA file the settings read changed since it was last seen (the
/// admin fixed it outside Panel): held messages get their next chance without a second step.
async fn notice_outside_fixes(shared: &Shared) {
    let Some(state) = shared.relay.lock().expect("not poisoned").clone() else { return };
    let changed = shared.outside.lock().expect("not poisoned").changed();
    if let Some(file) = changed {
        tracing::info!(file = %file.display(), "a file the relay settings read changed");
        release_held(shared, &state, Release::SessionFailures, "a file the relay settings read changed").await;
    }
}

/// Runs the relay checks a CLI asked the running services for, in this process: with the
/// environment, config file and trusted authorities delivery uses. Each in its own task (a
/// check can take as long as its timeouts); one service takes each request.
async fn answer_checks(shared: &Shared) {
    loop {
        match shared.store.claim_check(&shared.owner, shared.panel.now()).await {
            Ok(Some(id)) => {
                tracing::info!(request = id, "running the relay check a CLI asked for");
                let panel = shared.panel.clone();
                tokio::spawn(async move {
                    if let Err(e) = panel.answer_check(id).await {
                        tracing::warn!(request = id, error = %e, "could not store the check report");
                    }
                });
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "could not look for check requests");
                return;
            }
        }
    }
}

/// What identifies a file's content cheaply: a rewrite, a replacement (new inode) or a touch
/// all show. `None` while it cannot be read.
type Stamp = Option<(std::time::SystemTime, u64, u64)>;

#[derive(Default)]
struct OutsideFiles {
    files: Vec<(std::path::PathBuf, Stamp)>,
}

impl OutsideFiles {
    fn stamp(path: &std::path::Path) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some((m.modified().ok()?, m.len(), m.ino()))
    }

    /// Starts watching the files of `settings`, as they are now.
    fn watch(&mut self, settings: &RelaySettings) {
        self.files =
            settings.routes().flat_map(|(_, r)| r.outside_files()).map(|p| (p.to_path_buf(), Self::stamp(p))).collect();
    }

    /// The first file that changed since last seen and can be read now (a file being removed
    /// is no fix); remembers every new stamp.
    fn changed(&mut self) -> Option<std::path::PathBuf> {
        let mut first = None;
        for (path, seen) in &mut self.files {
            let now = Self::stamp(path);
            if now != *seen {
                *seen = now;
                if now.is_some() && first.is_none() {
                    first = Some(path.clone());
                }
            }
        }
        first
    }
}

/// The claim on one message, renewed in the background and confirmed right before anything is
/// sent: a worker paused past its lease (SIGSTOP, a long GC-like stall, a partition) finds the
/// step taken by another worker and sends nothing. The claim token fences its record as well.
struct Lease {
    store: Store,
    clock: Arc<dyn crate::clock::Clock>,
    reference: panel_store::ClaimRef,
    length: Duration,
    renewed: Mutex<Instant>,
}

impl Lease {
    async fn keep_renewed(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.length / 3).await;
            match self.store.renew_lease(&self.reference, self.clock.now(), self.length).await {
                Ok(true) => *self.renewed.lock().expect("not poisoned") = Instant::now(),
                Ok(false) => break,
                Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
            }
        }
    }

    /// True while the claim is certainly ours: renewed recently, or renewed now.
    async fn confirm(&self) -> bool {
        if self.renewed.lock().expect("not poisoned").elapsed() < self.length / 2 {
            return true;
        }
        match self.store.renew_lease(&self.reference, self.clock.now(), self.length).await {
            Ok(true) => {
                *self.renewed.lock().expect("not poisoned") = Instant::now();
                true
            }
            Ok(false) | Err(_) => false,
        }
    }
}

/// Sends on a pooled connection, or a new one. A pooled connection the relay has closed in the
/// meantime fails before any recipient is accepted; the message is then sent on a fresh one.
/// `None`: the lease was lost before sending, and nothing was sent.
async fn send(
    shared: &Shared,
    serial: u64,
    relay: &Relay,
    message: &panel_domain::OutgoingMessage,
    envelope: &Envelope,
    lease: &Lease,
) -> Option<SendReport> {
    let data = message.render();
    let (from, recipients, envid) = (envelope.from.as_str(), &envelope.to[..], envelope.envid.as_deref());
    if let Some(mut conn) = take_connection(shared, serial) {
        if !lease.confirm().await {
            give_back(shared, serial, conn);
            return None;
        }
        let report = conn.send(from, recipients, &data, envid).await;
        let stale = report.data_reply.is_none()
            && !conn.is_reusable()
            && report.recipients.iter().all(|r| *r == RecipientResult::NotTried);
        if !stale {
            give_back(shared, serial, conn);
            return Some(report);
        }
        retire(vec![conn]);
    }
    let mut transcript = Transcript::default();
    match relay.connect(&mut transcript).await {
        Err(f) => Some(SendReport {
            recipients: vec![RecipientResult::NotTried; recipients.len()],
            failure: Some(f),
            data_reply: None,
        }),
        Ok(mut conn) => {
            if !lease.confirm().await {
                conn.quit(None).await;
                return None;
            }
            let report = conn.send(from, recipients, &data, envid).await;
            give_back(shared, serial, conn);
            Some(report)
        }
    }
}

/// Sends through Microsoft Graph, the lease confirmed right before. `None`: the lease was
/// lost, and nothing was sent.
async fn send_graph(
    graph: &Graph,
    message: &panel_domain::OutgoingMessage,
    recipients: usize,
    lease: &Lease,
) -> Option<SendReport> {
    let mime = message.render_for_graph();
    if !lease.confirm().await {
        return None;
    }
    Some(graph.send(&mime, recipients).await)
}

fn give_back(shared: &Shared, serial: u64, conn: Connection) {
    if conn.is_reusable() {
        shared.pool.lock().expect("not poisoned").push((serial, Instant::now(), conn));
    } else {
        retire(vec![conn]);
    }
}

#[cfg(test)]
mod tests {
    use super::{Claiming, Pass, Wake};
    use Pass::{Claim, Full, Handed, Idle};
    use Wake::{Claimable, HandedOver};

    /// A pass: the wake-up before it (`None`: right after the last, without waiting), whether
    /// mail was handed over, the free slots, what it got (went through, took, a claim asked
    /// for), then what is expected: the pass, and whether it ended drained.
    type Step = (Option<Wake>, bool, u32, (bool, u32, u32), Pass, bool);

    /// Runs `steps` from the worker's start; each step's line in the message when it fails.
    fn scenario(steps: &[Step]) {
        let mut c = Claiming::start();
        for (i, &(wake, handed, free, (ok, took, asked), pass, drained)) in steps.iter().enumerate() {
            if let Some(wake) = wake {
                c.woken(wake);
            }
            assert_eq!(c.pass(handed, free), pass, "step {i}");
            assert_eq!(c.drained(pass, ok, took, asked), drained, "step {i}");
        }
    }

    /// A worker at its start claims; a claim that came back short leaves it drained, and a
    /// hand-over then costs no claim: it takes the mail, and a wake-up for mail it had taken
    /// already (a hand-over's second) does nothing at all, room still offered. Mail that was
    /// not handed over (no room, or another service's) is claimed.
    #[test]
    fn mail_handed_over_costs_no_claim() {
        scenario(&[
            (None, false, 16, (true, 0, 16), Claim, true),
            (Some(HandedOver), true, 16, (true, 2, 0), Handed, true),
            (Some(HandedOver), false, 14, (true, 0, 0), Idle, true),
            (Some(Claimable), false, 14, (true, 1, 14), Claim, true),
        ]);
    }

    /// Mail queued while every slot was busy owes a claim, and nothing drops it: not the
    /// passes without a free slot, not mail handed over meanwhile (the worker claims right
    /// after taking it, offering no room before), not a wake-up for a hand-over. Once, that
    /// mail waited for the poll.
    #[test]
    fn a_claim_owed_is_never_dropped() {
        scenario(&[
            (None, false, 16, (true, 3, 16), Claim, true),
            (Some(Claimable), false, 0, (true, 0, 0), Full, false),
            (Some(HandedOver), true, 0, (true, 2, 0), Handed, false),
            (None, false, 12, (true, 5, 12), Claim, true),
            // Handed mail taken on a wake-up for new mail: the claim comes next.
            (Some(Claimable), true, 7, (true, 1, 0), Handed, false),
            (Some(HandedOver), false, 6, (true, 0, 6), Claim, true),
        ]);
    }

    /// A claim that came back full leaves mail to claim: a hand-over's wake-up claims too.
    /// A claim that failed, or handed mail given back (the settings became unusable), leaves
    /// the worker undrained and owing a claim.
    #[test]
    fn a_full_or_failed_pass_keeps_the_claim_owed() {
        scenario(&[
            (None, false, 4, (true, 4, 4), Claim, false),
            (Some(HandedOver), false, 2, (false, 0, 2), Claim, false),
            (Some(HandedOver), true, 2, (true, 0, 0), Handed, false),
            (None, false, 2, (true, 0, 2), Claim, true),
        ]);
    }
}
