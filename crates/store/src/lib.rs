//! The durable store behind one interface. `Store::open` picks the backend from the URL; every
//! caller (service, worker, CLI, API) uses the same methods, so they all see one truth.
//!
//! Timestamps are stored as Unix milliseconds (UTC), which every backend orders the same way.

mod model;
mod sql;

use std::time::Duration;

use chrono::{DateTime, Utc};
use panel_domain::{MessageState, Origin, OutgoingMessage, SettingsDoc, Settlement};

pub use model::*;
pub use sql::{POOL_IDLE_CHECK, RetainedTable, TOKEN_ID_CHARS};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("unsupported database URL '{0}': use sqlite://PATH or postgres://USER@HOST[:PORT]/DATABASE")]
    UnsupportedUrl(String),
    #[error("the relay settings were changed by someone else (now version {current}); reload and try again")]
    SettingsConflict { current: i64 },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the master key was rotated meanwhile (now {current}); try again")]
    MasterKeyChanged { current: String },
    /// A write fenced by an `AccessFence` whose token, role or settings changed: nothing was
    /// written. The caller reads the token again and answers by that.
    #[error("the token, its role or the relay settings changed while the request was on its way; send it again")]
    Stale,
}

impl StoreError {
    /// The database cannot be reached or written right now (I/O, a full disk, a full pool), as
    /// opposed to a query or a row that is wrong: trying again later may work.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Database(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed))
            || self.storage_fault().is_some()
    }

    /// Why the database cannot be written, when that is what went wrong: the disk is full, the
    /// file system failed or went read-only. `None` for every other error.
    pub fn storage_fault(&self) -> Option<String> {
        let StoreError::Database(e) = self else { return None };
        match e {
            sqlx::Error::Io(io) => Some(io.to_string()),
            sqlx::Error::Database(db) => {
                let code = db.code()?;
                let fault = if code.len() == 5 {
                    // PostgreSQL's SQLSTATE: 53 insufficient resources (53100 disk full), 58 system
                    // error (58030 I/O error).
                    code.starts_with("53") || code.starts_with("58")
                } else {
                    // SQLite's (extended) result code: its low byte is the primary code. 8
                    // READONLY, 10 IOERR, 13 FULL, 14 CANTOPEN.
                    matches!(code.parse::<i32>().map(|c| c & 0xff), Ok(8 | 10 | 13 | 14))
                };
                fault.then(|| db.message().to_string())
            }
            _ => None,
        }
    }
}

/// How long after its last failed write a store counts as not writable. Long enough that writes
/// which happen to succeed in between (SQLite reuses its WAL's space) do not flap readiness;
/// short enough that the service reports itself ready within seconds of space returning.
pub const STORAGE_FAULT_HOLD: Duration = Duration::from_secs(10);

/// Writes to the database are failing (as this process saw them): since when, the last time,
/// and the database's own words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageFault {
    pub since: DateTime<Utc>,
    pub last: DateTime<Utc>,
    pub reason: String,
}

#[derive(Default)]
struct Health {
    fault: std::sync::Mutex<Option<StorageFault>>,
}

impl Health {
    fn failed(&self, reason: String) {
        let now = Utc::now();
        let mut fault = self.fault.lock().unwrap_or_else(|p| p.into_inner());
        let since = fault.as_ref().map_or(now, |f| f.since);
        *fault = Some(StorageFault { since, last: now, reason });
    }

    fn current(&self) -> Option<StorageFault> {
        let mut fault = self.fault.lock().unwrap_or_else(|p| p.into_inner());
        let held = chrono::Duration::from_std(STORAGE_FAULT_HOLD).unwrap_or_default();
        if fault.as_ref().is_some_and(|f| f.last + held < Utc::now()) {
            *fault = None;
        }
        fault.clone()
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A handle to the store; cheap to clone (it wraps a connection pool).
#[derive(Clone)]
pub struct Store {
    backend: sql::SqlStore,
    health: std::sync::Arc<Health>,
    /// Group committers of concurrent writes, each started at the first write it takes (see
    /// `Store::lane`).
    committers: std::sync::Arc<[tokio::sync::OnceCell<tokio::sync::mpsc::Sender<Pending>>; 2]>,
    /// The reader that looks up concurrent requests' tokens together (see `Store::token_owner`),
    /// started at the first.
    token_reader: std::sync::Arc<tokio::sync::OnceCell<tokio::sync::mpsc::Sender<TokenLookup>>>,
    /// PostgreSQL: the owners of the tokens read last, and when (`Store::token_owner_kept`).
    kept_owners: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, (TokenOwner, std::time::Instant)>>>,
}

/// How long a service sends on the owner of a token it read (`Store::token_owner_kept`) without
/// reading the token again. Each write on it is fenced, so a revocation stops the next one at
/// once; this bounds how stale `last_used_at` (written by a read) can get.
pub const TOKEN_OWNER_KEPT: Duration = Duration::from_secs(60);

/// Most token owners kept: a service sees a handful of tokens; past this many (tokens created
/// faster than they age out) the oldest half is forgotten.
const TOKEN_OWNERS_KEPT_MAX: usize = 1024;

/// A token to look up in the next batched read, with its request's time, and its caller.
struct TokenLookup {
    hash: String,
    now: i64,
    reply: tokio::sync::oneshot::Sender<Result<Option<TokenOwner>>>,
}

/// Most tokens one batched read looks up.
const TOKEN_READ_MAX: usize = 64;

/// Looks up the tokens of the requests that arrived while the previous read was running in one
/// statement, on a connection of its own: a busy service's API requests each paid a round trip
/// and a pooled connection's ping for their token (PostgreSQL), or a hand-off to a pooled
/// connection's thread and back (SQLite: ~15 % of the CPU per message of `POST /api/v1/messages`,
/// all processes). Each request is answered after a read that began after it arrived, so it
/// sees every revocation (and settings change) saved before. A read that fails is tried again
/// one token at a time, so each caller gets its own outcome.
async fn read_tokens(backend: sql::SqlStore, mut rx: tokio::sync::mpsc::Receiver<TokenLookup>) {
    let mut held = sql::Held::default();
    while let Some(batch) = next_batch(&mut rx, TOKEN_READ_MAX).await {
        let lookups: Vec<(&str, i64)> = batch.iter().map(|l| (l.hash.as_str(), l.now)).collect();
        match backend.token_owners_held(&mut held, &lookups).await {
            Ok(owners) => {
                for (lookup, owner) in batch.into_iter().zip(owners) {
                    drop(lookup.reply.send(Ok(owner)));
                }
            }
            Err(_) => {
                for lookup in batch {
                    drop(lookup.reply.send(backend.token_owner(&lookup.hash, lookup.now).await));
                }
            }
        }
    }
}

/// What an event's workflows run: given the event's id (their templates may use it), the runs
/// to store with it. Called once per commit attempt, so a group that fails can be replayed.
/// Shared, not owned: runs planned before the event's id was known are handed out again as they
/// are (copying them, their messages' content included, was a cost in each event).
pub type EventPlan = Box<dyn Fn(i64) -> std::sync::Arc<[NewRun]> + Send + Sync>;

/// How many messages a claim takes, asked once its transaction has begun (`Store::claim_up_to`).
pub type ClaimLimit = std::sync::Arc<dyn Fn() -> u32 + Send + Sync>;

/// A message enqueued: its id, and whether it was inserted already claimed for this process's
/// worker and handed to it (`Store::take_mail_as`; PostgreSQL). Such a message is the worker's
/// at once, which the hand-over told (`Store::handed_ready`): no wake-up is owed to anyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    pub id: i64,
    pub handed_over: bool,
}

/// Attempts to record, each fenced by its claim.
pub type AttemptBatch = Vec<(ClaimRef, AttemptMeta, Settlement)>;

/// One caller's write in a group commit (an event's `object` as the JSON text stored).
pub enum GroupJob<'a> {
    Message { origin: Origin, message: &'a OutgoingMessage, now: i64, fence: Option<&'a AccessFence> },
    Event { event_type: &'a str, object: &'a str, now: i64, plan: &'a EventPlan },
    Record { batch: &'a [(ClaimRef, AttemptMeta, Settlement)] },
    Claim { owner: &'a str, now: i64, lease_ms: i64, limit: &'a (dyn Fn() -> u32 + Send + Sync), bulk_first: bool },
    Reserve { now: i64, route: &'a str, recipients: i64, per_minute: Option<i64>, per_day: Option<i64> },
}

/// Its outcome.
pub enum GroupDone {
    /// Its id, and whether it was handed over to this process's worker (`Store::take_mail_as`).
    Message {
        id: i64,
        handed_over: bool,
    },
    Event(EventRecord),
    Recorded(Vec<bool>),
    Claimed(Vec<Claim>),
    /// `None`: taken from the budget; else when it has room again.
    Reserved(Option<i64>),
}

/// A write waiting for the next group commit, and its caller.
enum Pending {
    Message {
        origin: Origin,
        // Boxed: a message is large, and most of the queue's traffic.
        message: Box<OutgoingMessage>,
        now: i64,
        fence: Option<AccessFence>,
        reply: tokio::sync::oneshot::Sender<Result<Enqueued>>,
    },
    Event {
        event_type: String,
        /// Serialized by the caller, not under the group's write lock.
        object: String,
        now: i64,
        plan: EventPlan,
        reply: tokio::sync::oneshot::Sender<Result<EventRecord>>,
    },
    Record {
        batch: AttemptBatch,
        reply: tokio::sync::oneshot::Sender<Result<Vec<bool>>>,
    },
    Claim {
        owner: String,
        now: i64,
        lease_ms: i64,
        limit: ClaimLimit,
        bulk_first: bool,
        reply: tokio::sync::oneshot::Sender<Result<Vec<Claim>>>,
    },
    Reserve {
        now: i64,
        route: String,
        recipients: i64,
        per_minute: Option<i64>,
        per_day: Option<i64>,
        reply: tokio::sync::oneshot::Sender<Result<Option<i64>>>,
    },
}

impl Pending {
    fn job(&self) -> GroupJob<'_> {
        match self {
            Pending::Message { origin, message, now, fence, .. } => {
                GroupJob::Message { origin: *origin, message, now: *now, fence: fence.as_ref() }
            }
            Pending::Event { event_type, object, now, plan, .. } => {
                GroupJob::Event { event_type, object, now: *now, plan }
            }
            Pending::Record { batch, .. } => GroupJob::Record { batch },
            Pending::Claim { owner, now, lease_ms, limit, bulk_first, .. } => {
                GroupJob::Claim { owner, now: *now, lease_ms: *lease_ms, limit: &**limit, bulk_first: *bulk_first }
            }
            Pending::Reserve { now, route, recipients, per_minute, per_day, .. } => GroupJob::Reserve {
                now: *now,
                route,
                recipients: *recipients,
                per_minute: *per_minute,
                per_day: *per_day,
            },
        }
    }

    /// Answers the caller with `done`, or with the outcome of committing its write alone.
    async fn answer(self, done: Option<GroupDone>, backend: &sql::SqlStore) {
        match (self, done) {
            (Pending::Message { reply, .. }, Some(GroupDone::Message { id, handed_over })) => {
                drop(reply.send(Ok(Enqueued { id, handed_over })))
            }
            (Pending::Event { reply, .. }, Some(GroupDone::Event(record))) => drop(reply.send(Ok(record))),
            (Pending::Record { reply, .. }, Some(GroupDone::Recorded(done))) => drop(reply.send(Ok(done))),
            (Pending::Claim { reply, .. }, Some(GroupDone::Claimed(claims))) => drop(reply.send(Ok(claims))),
            (Pending::Reserve { reply, .. }, Some(GroupDone::Reserved(until))) => drop(reply.send(Ok(until))),
            (Pending::Message { origin, message, now, fence, reply }, _) => {
                let enqueued = backend.enqueue(origin, &message, now, None, fence.as_ref()).await;
                drop(reply.send(enqueued.map(|(id, _)| Enqueued { id, handed_over: false })))
            }
            (Pending::Event { event_type, object, now, plan, reply }, _) => {
                drop(reply.send(backend.record_event(&event_type, &object, None, now, &plan).await))
            }
            (Pending::Record { batch, reply }, _) => drop(reply.send(backend.record_attempts(&batch).await)),
            (Pending::Claim { owner, now, lease_ms, limit, bulk_first, reply }, _) => {
                let ask = sql::ClaimAsk { owner: &owner, now, lease_ms, limit: limit(), bulk_first };
                drop(reply.send(backend.claim(ask).await))
            }
            (Pending::Reserve { now, route, recipients, per_minute, per_day, reply }, _) => {
                let ask = sql::SendAsk { now, route: &route, recipients, per_minute, per_day };
                drop(reply.send(backend.reserve_send(ask).await))
            }
        }
    }
}

/// The committer took a write and stopped without an answer (its runtime is shutting down):
/// whether it was committed is unknown to the caller, who is told the store is unavailable
/// rather than given a second copy.
fn committer_stopped() -> StoreError {
    StoreError::Database(sqlx::Error::PoolClosed)
}

/// The next item of `rx` and whatever else is already waiting, up to `most`: what arrived while
/// the previous batch was being written or read. `None` once every sender is gone.
async fn next_batch<T>(rx: &mut tokio::sync::mpsc::Receiver<T>, most: usize) -> Option<Vec<T>> {
    let mut batch = vec![rx.recv().await?];
    while batch.len() < most {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Most writes one group commit takes.
const GROUP_COMMIT_MAX: usize = 256;

/// Commits what concurrent callers wrote meanwhile (single messages, events, the workers'
/// records and claims; on PostgreSQL each committer takes its own kinds, see `Store::lane`) in
/// one transaction: one fsync for all, every caller answered after that commit. On SQLite,
/// where one writer at a time holds the lock, a busy service pays one BEGIN and one COMMIT per
/// turn instead of one for each kind of write; on PostgreSQL a group of messages alone is one
/// statement, and records and claims one each, without BEGIN and COMMIT, on a connection the
/// committer keeps. A group that fails is tried again one write a transaction, so each caller
/// gets its own outcome.
async fn group_commit(backend: sql::SqlStore, mut rx: tokio::sync::mpsc::Receiver<Pending>) {
    let mut held = sql::Held::default();
    while let Some(batch) = next_batch(&mut rx, GROUP_COMMIT_MAX).await {
        let jobs: Vec<GroupJob<'_>> = batch.iter().map(Pending::job).collect();
        let done = backend.commit_group(&jobs, &mut held).await.ok();
        drop(jobs);
        let mut done = done.map(Vec::into_iter);
        for p in batch {
            let outcome = done.as_mut().and_then(Iterator::next);
            p.answer(outcome, &backend).await;
        }
    }
}

impl Store {
    /// Opens (creating if needed) the database at `url` and applies pending migrations.
    pub async fn open(url: &str) -> Result<Store> {
        let dialect = if url.starts_with("sqlite:") {
            sql::Dialect::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            sql::Dialect::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl(redact_url(url)));
        };
        Ok(Store {
            backend: sql::SqlStore::open(url, dialect).await?,
            health: Default::default(),
            committers: Default::default(),
            token_reader: Default::default(),
            kept_owners: Default::default(),
        })
    }

    /// Writes to the database failed within `STORAGE_FAULT_HOLD`: not ready (`/readyz`).
    pub fn storage_fault(&self) -> Option<StorageFault> {
        self.health.current()
    }

    /// Every operation's result passes here, so a full disk is noticed wherever it shows.
    fn observe<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result
            && let Some(reason) = e.storage_fault()
        {
            self.health.failed(reason);
        }
        result
    }

    /// True on PostgreSQL: several services on several hosts may share this store.
    pub fn is_shared(&self) -> bool {
        self.backend.dialect == sql::Dialect::Postgres
    }

    /// (applied, known) schema versions: equal when the migrations are current.
    pub async fn schema_version(&self) -> Result<(i64, i64)> {
        self.observe(self.backend.schema_version().await)
    }

    /// Wake-ups from every service sharing this store: `None` on SQLite (one host; services
    /// there are woken directly). Each `next()` returns when some service enqueued work.
    pub async fn subscribe_wakes(&self) -> Result<Option<WakeSubscription>> {
        Ok(self
            .observe(self.backend.listen_wakes().await)?
            .map(|(listener, origin)| WakeSubscription { listener, origin }))
    }

    /// This process's workers wait with `slots` free and nothing left to claim (0: they are
    /// busy, stopped, or waiting for a route): messages enqueued here that fit are theirs, and
    /// their commit wakes no other service (PostgreSQL). Each enqueue that does takes its
    /// messages from the room; the workers offer it again each time they wait.
    pub fn offer_room(&self, slots: u32) {
        self.backend.offer_room(slots);
    }

    /// One more slot of room (`offer_room`): a slot that freed while the workers wait.
    pub fn add_room(&self, slots: u32) {
        self.backend.add_room(slots);
    }

    /// `owner`, this process's worker, takes the messages enqueued here that fit in its room
    /// (`offer_room`) as they are inserted (PostgreSQL): inserted already claimed, under a
    /// lease of `lease`, and handed over in memory (`take_handed`). Each such message costs the
    /// database no claim (a statement, an update of its row and a commit); a claim is still
    /// what finds everything else. `None`: from now on nothing is handed over, and no room is
    /// offered (the worker stops).
    pub fn take_mail_as(&self, taker: Option<(&str, Duration)>) {
        self.backend.take_mail_as(taker.map(|(owner, lease)| (owner.to_string(), lease.as_millis() as i64)));
    }

    /// The messages inserted already claimed for this process's worker (`take_mail_as`) since
    /// it last asked, in the order enqueued.
    pub fn take_handed(&self) -> Vec<Claim> {
        self.backend.take_handed()
    }

    /// Returns once messages were handed over to this process's worker (`take_handed`), at
    /// once when some were since the last call. The worker wakes here for them, and not for
    /// the enqueues that handed them over (`Enqueued::handed_over`): with those wake-ups
    /// (several per group commit, some after it had taken the messages already) most of its
    /// claims came back empty, each a statement on the connection that records its attempts.
    pub async fn handed_ready(&self) {
        self.backend.handed_ready().await;
    }

    /// Tells idle workers of every service that work is due (PostgreSQL NOTIFY; a no-op on
    /// SQLite, whose services are woken on this host directly).
    pub async fn notify_wake(&self) -> Result<()> {
        self.observe(self.backend.notify_wake().await)
    }

    pub async fn current_settings(&self) -> Result<Option<StoredSettings>> {
        self.observe(self.backend.current_settings().await)
    }

    /// The current settings and the definitions generation (moved on by every change to a
    /// template, workflow or schedule), in one read.
    pub async fn settings_and_definitions(&self) -> Result<(Option<StoredSettings>, i64)> {
        self.observe(self.backend.settings_and_definitions().await)
    }

    /// Saved settings versions, newest first, at most `limit`.
    pub async fn settings_versions(&self, limit: i64) -> Result<Vec<StoredSettings>> {
        self.observe(self.backend.settings_versions(limit).await)
    }

    pub async fn settings_version(&self, version: i64) -> Result<Option<StoredSettings>> {
        self.observe(self.backend.settings_version(version).await)
    }

    /// The settings version in force (0 before the first save) and the secrets generation.
    /// Cheap: checked before every claim.
    pub async fn config_generation(&self) -> Result<ConfigGeneration> {
        self.observe(self.backend.config_generation().await)
    }

    /// Saves a new version if the stored one is still `expected_version` (optimistic locking),
    /// writes `events` to the audit log, and releases messages held back by a configuration
    /// error so they are tried with the new settings.
    pub async fn save_settings(
        &self,
        expected_version: i64,
        doc: &SettingsDoc,
        by: &str,
        now: DateTime<Utc>,
        events: &[AuditEvent],
    ) -> Result<i64> {
        self.observe(self.backend.save_settings(expected_version, doc, by, ms(now), events).await)
    }

    /// Re-queues the messages held by a configuration error, without a new settings version.
    pub async fn release_held(&self, doc: &SettingsDoc, now: DateTime<Utc>, scope: Release) -> Result<u64> {
        self.observe(self.backend.release_held(doc, ms(now), scope).await)
    }

    /// Makes the messages deferred by a relay outage due now (the relay answered again).
    pub async fn release_outage(&self, now: DateTime<Utc>) -> Result<u64> {
        self.observe(self.backend.release_outage(ms(now)).await)
    }

    /// Adds a verified license key; false when a key with this id is already there.
    pub async fn add_license(
        &self,
        id: &str,
        key: &str,
        by: &str,
        now: DateTime<Utc>,
        event: &AuditEvent,
    ) -> Result<bool> {
        self.observe(self.backend.add_license(id, key, by, ms(now), event).await)
    }

    pub async fn licenses(&self) -> Result<Vec<LicenseRow>> {
        self.observe(self.backend.licenses().await)
    }

    pub async fn remove_license(&self, id: &str, by: &str, now: DateTime<Utc>) -> Result<bool> {
        self.observe(self.backend.remove_license(id, by, ms(now)).await)
    }

    pub async fn credential(&self, name: &str) -> Result<Option<CredentialRow>> {
        self.observe(self.backend.credential(name).await)
    }

    pub async fn credentials(&self) -> Result<Vec<CredentialRow>> {
        self.observe(self.backend.credentials().await)
    }

    /// Stores or replaces a sealed credential and audits it.
    pub async fn put_credential(&self, credential: &NewCredential, by: &str, now: DateTime<Utc>) -> Result<PutOutcome> {
        self.observe(self.backend.put_credential(credential, by, ms(now)).await)
    }

    pub async fn delete_credential(&self, name: &str, by: &str, now: DateTime<Utc>) -> Result<DeleteOutcome> {
        self.observe(self.backend.delete_credential(name, by, ms(now)).await)
    }

    /// Moves every credential to `new_master_key_id` in one transaction; `MasterKeyChanged` if
    /// a row is left under another key (stored concurrently), so the caller re-reads and retries.
    pub async fn rewrap_credentials(
        &self,
        updates: &[Rewrapped],
        new_master_key_id: &str,
        by: &str,
        now: DateTime<Utc>,
        event: &AuditEvent,
    ) -> Result<u64> {
        self.observe(self.backend.rewrap_credentials(updates, new_master_key_id, by, ms(now), event).await)
    }

    /// The master key id stored credentials are wrapped with; `None` before the first credential.
    pub async fn current_master_key_id(&self) -> Result<Option<String>> {
        self.observe(self.backend.current_master_key_id().await)
    }

    pub async fn adopt_master_key_id(&self, key_id: &str) -> Result<()> {
        self.observe(self.backend.adopt_master_key_id(key_id).await)
    }

    pub async fn mark_credential_used(
        &self,
        id: &str,
        by: &str,
        now: DateTime<Utc>,
        event: &AuditEvent,
    ) -> Result<bool> {
        self.observe(self.backend.mark_credential_used(id, by, ms(now), event).await)
    }

    /// The newest `limit` audit entries, newest first.
    pub async fn audit_log(&self, limit: u32) -> Result<Vec<AuditRow>> {
        self.observe(self.backend.audit_log(limit).await)
    }

    /// Creates an admin account, or replaces its role and password with `replace` (ending its
    /// sessions); false when it exists and `replace` is off.
    pub async fn put_admin(
        &self,
        name: &str,
        role: &str,
        password_hash: &str,
        replace: bool,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        self.forget_owners();
        self.observe(self.backend.put_admin(name, role, password_hash, replace, by, ms(now)).await)
    }

    /// The first account, only while there is none; false once any exists.
    pub async fn create_first_admin(
        &self,
        name: &str,
        role: &str,
        password_hash: &str,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        self.observe(self.backend.create_first_admin(name, role, password_hash, by, ms(now)).await)
    }

    pub async fn admin(&self, name: &str) -> Result<Option<AdminRow>> {
        self.observe(self.backend.admin(name).await)
    }

    /// Every account (without password hashes).
    pub async fn admins(&self) -> Result<Vec<AdminRow>> {
        self.observe(self.backend.admins().await)
    }

    pub async fn delete_admin(&self, name: &str, by: &str, now: DateTime<Utc>) -> Result<bool> {
        self.forget_owners();
        self.observe(self.backend.delete_admin(name, by, ms(now)).await)
    }

    /// Stores a session (`kind` "session", with its CSRF token and expiry) or an API token.
    #[allow(clippy::too_many_arguments)]
    pub async fn add_token(
        &self,
        token_hash: &str,
        kind: &str,
        admin: &str,
        label: &str,
        csrf: Option<&str>,
        expires_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        self.observe(self.backend.add_token(token_hash, kind, admin, label, csrf, expires_at.map(ms), ms(now)).await)
    }

    /// The owner of an unexpired session or token, as of a read that began after this call.
    /// Concurrent callers share one read (`read_tokens`).
    pub async fn token_owner(&self, token_hash: &str, now: DateTime<Utc>) -> Result<Option<TokenOwner>> {
        let reader = self
            .token_reader
            .get_or_init(|| async {
                let (tx, rx) = tokio::sync::mpsc::channel(TOKEN_READ_MAX * 4);
                tokio::spawn(read_tokens(self.backend.clone(), rx));
                tx
            })
            .await;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let lookup = TokenLookup { hash: token_hash.to_string(), now: ms(now), reply };
        let owner = match reader.send(lookup).await {
            Ok(()) => match answer.await {
                Ok(owner) => self.observe(owner),
                // The reader stopped before answering (its runtime is shutting down): a read
                // changes nothing, so it is made here instead.
                Err(_) => self.observe(self.backend.token_owner(token_hash, ms(now)).await),
            },
            // The reader's runtime is gone (a store carried into another runtime): read here.
            Err(_) => self.observe(self.backend.token_owner(token_hash, ms(now)).await),
        }?;
        if self.is_shared() {
            self.keep_owner(token_hash, owner.as_ref());
        }
        Ok(owner)
    }

    /// The owner of an unexpired session or token for a request whose one write carries the
    /// fence returned with it (`enqueue_fenced`). On PostgreSQL, the owner this service read
    /// at most `TOKEN_OWNER_KEPT` ago, with the fence: a busy service's every request read its
    /// token, a round trip (~10 % of the CPU per message, all processes). Else `token_owner`'s
    /// read, and no fence: on SQLite a read is a statement in this process, and saves nothing.
    pub async fn token_owner_kept(
        &self,
        token_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<(TokenOwner, Option<AccessFence>)>> {
        if self.is_shared() {
            let kept = self.kept_owners.lock().unwrap_or_else(|p| p.into_inner()).get(token_hash).cloned();
            if let Some((owner, read)) = kept
                && read.elapsed() < TOKEN_OWNER_KEPT
                && owner.expires_at.is_none_or(|end| end > now)
            {
                let fence = AccessFence {
                    token_hash: token_hash.to_string(),
                    role: owner.role.clone(),
                    settings_version: owner.settings_version,
                };
                return Ok(Some((owner, Some(fence))));
            }
        }
        Ok(self.token_owner(token_hash, now).await?.map(|owner| (owner, None)))
    }

    /// Keeps what a read of `token_hash` found (`token_owner_kept`), or forgets it.
    fn keep_owner(&self, token_hash: &str, owner: Option<&TokenOwner>) {
        let mut kept = self.kept_owners.lock().unwrap_or_else(|p| p.into_inner());
        let Some(owner) = owner else {
            kept.remove(token_hash);
            return;
        };
        if kept.len() >= TOKEN_OWNERS_KEPT_MAX && !kept.contains_key(token_hash) {
            let mut ages: Vec<std::time::Instant> = kept.values().map(|(_, read)| *read).collect();
            let (_, &mut median, _) = ages.select_nth_unstable(TOKEN_OWNERS_KEPT_MAX / 2);
            kept.retain(|_, (_, read)| *read > median);
        }
        kept.insert(token_hash.to_string(), (owner.clone(), std::time::Instant::now()));
    }

    /// Forgets every kept token owner: after this service changed an account or a token, its
    /// next requests read theirs (other services' fenced writes find the change themselves).
    fn forget_owners(&self) {
        self.kept_owners.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub async fn delete_token(&self, token_hash: &str) -> Result<()> {
        self.forget_owners();
        self.observe(self.backend.delete_token(token_hash).await)
    }

    /// Retention: strips the content of up to `limit` messages finished before `before`.
    pub async fn remove_content(&self, before: DateTime<Utc>, now: DateTime<Utc>, limit: i64) -> Result<u64> {
        self.observe(self.backend.remove_content(ms(before), ms(now), limit).await)
    }

    /// Retention: deletes up to `limit` messages finished before `before`, with their attempts.
    pub async fn delete_finished(&self, before: DateTime<Utc>, limit: i64) -> Result<u64> {
        self.observe(self.backend.delete_finished(ms(before), limit).await)
    }

    /// Retention: deletes up to `limit` rows of `table` older than `before`.
    pub async fn delete_older(&self, table: RetainedTable, before: DateTime<Utc>, limit: i64) -> Result<u64> {
        self.observe(self.backend.delete_older(table, ms(before), limit).await)
    }

    /// API tokens of `admin`, or of every account.
    pub async fn tokens(&self, admin: Option<&str>) -> Result<Vec<TokenRow>> {
        self.observe(self.backend.tokens(admin).await)
    }

    /// Revokes the API token with `id` (audited); `None` when there is none.
    pub async fn revoke_token(&self, id: &str, by: &str, now: DateTime<Utc>) -> Result<Option<TokenRow>> {
        self.forget_owners();
        self.observe(self.backend.revoke_token(id, by, ms(now)).await)
    }

    /// Counts a sign-in attempt under every key before the password is checked, unless one of
    /// them has its limit (the key's `i64`) of attempts since `since` (atomic across every service).
    pub async fn reserve_sign_in(
        &self,
        keys: &[(String, i64)],
        since: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<SignInReservation> {
        self.observe(self.backend.reserve_sign_in(keys, ms(since), ms(now)).await)
    }

    /// A sign-in succeeded: its reserved attempts and the failures under `forgiven` no longer
    /// count, and `known` (name, client) is remembered as an address of the account.
    pub async fn forgive_sign_in(
        &self,
        reserved: &[i64],
        forgiven: &[String],
        known: (&str, &str),
        now: DateTime<Utc>,
    ) -> Result<()> {
        self.observe(self.backend.forgive_sign_in(reserved, forgiven, known, ms(now)).await)
    }

    pub async fn is_known_client(&self, name: &str, client: &str) -> Result<bool> {
        self.observe(self.backend.is_known_client(name, client).await)
    }

    /// Removes counted sign-in failures under keys starting with any of `prefixes` (unlocking
    /// account `name`, audited as done by `by`).
    pub async fn clear_sign_in(&self, prefixes: &[String], name: &str, by: &str, now: DateTime<Utc>) -> Result<u64> {
        self.observe(self.backend.clear_sign_in(prefixes, name, by, ms(now)).await)
    }

    /// Attempts counted under `key` since `since`, with the oldest.
    pub async fn sign_in_count(&self, key: &str, since: DateTime<Utc>) -> Result<(i64, Option<DateTime<Utc>>)> {
        let (n, oldest) = self.observe(self.backend.sign_in_count(key, ms(since)).await)?;
        Ok((n, oldest.map(from_ms)))
    }

    /// Stores a template, workflow or schedule (audited).
    pub async fn save_definition(
        &self,
        definition: &NewDefinition,
        mode: SaveMode,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<SaveOutcome> {
        self.observe(self.backend.save_definition(definition, mode, by, ms(now)).await)
    }

    pub async fn definition(&self, kind: DefinitionKind, name: &str) -> Result<Option<DefinitionRow>> {
        self.observe(self.backend.definition(kind, name).await)
    }

    pub async fn definitions(&self, kind: DefinitionKind) -> Result<Vec<DefinitionRow>> {
        self.observe(self.backend.definitions(kind).await)
    }

    pub async fn delete_definition(
        &self,
        kind: DefinitionKind,
        name: &str,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        self.observe(self.backend.delete_definition(kind, name, by, ms(now)).await)
    }

    /// Enables or disables a workflow or schedule; false when there is none by that name.
    pub async fn set_enabled(
        &self,
        kind: DefinitionKind,
        name: &str,
        enabled: bool,
        next_fire_at: Option<DateTime<Utc>>,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        self.observe(self.backend.set_enabled(kind, name, enabled, next_fire_at.map(ms), by, ms(now)).await)
    }

    /// Every enabled workflow, by name.
    pub async fn enabled_workflows(&self) -> Result<Vec<DefinitionRow>> {
        self.observe(self.backend.enabled_workflows().await)
    }

    /// Enabled schedules whose next fire time is at or before `now`.
    pub async fn due_schedules(&self, now: DateTime<Utc>) -> Result<Vec<DefinitionRow>> {
        self.observe(self.backend.due_schedules(ms(now)).await)
    }

    /// When the next enabled schedule fires, if any does.
    pub async fn next_schedule_fire(&self) -> Result<Option<DateTime<Utc>>> {
        Ok(self.observe(self.backend.next_schedule_fire().await)?.map(from_ms))
    }

    /// Writes a run with its messages in one transaction. With `advance` (a clock-driven fire),
    /// only the first service to advance the schedule past that fire time writes: the others
    /// get `None`.
    pub async fn commit_run(
        &self,
        run: NewRun,
        advance: Option<&ScheduleAdvance>,
        now: DateTime<Utc>,
    ) -> Result<Option<i64>> {
        self.observe(self.backend.commit_run(run, advance, ms(now)).await)
    }

    /// Stores an event and the workflow runs `plan` makes for it (given the event id) in one
    /// transaction; a repeated idempotency key returns the first event and runs nothing.
    /// Without a key, group-committed with what concurrent callers write meanwhile. A commit
    /// that queued messages wakes every service's idle workers (PostgreSQL; on SQLite the
    /// caller does).
    pub async fn record_event(
        &self,
        event_type: &str,
        object: &serde_json::Value,
        idempotency_key: Option<&str>,
        now: DateTime<Utc>,
        plan: EventPlan,
    ) -> Result<EventRecord> {
        let now = ms(now);
        let object = serde_json::to_string(object).expect("JSON serializes");
        if idempotency_key.is_some() {
            return self.observe(self.backend.record_event(event_type, &object, idempotency_key, now, &plan).await);
        }
        let event_type = event_type.to_string();
        self.submit(|reply| Pending::Event { event_type, object, now, plan, reply }).await
    }

    pub async fn run(&self, id: i64) -> Result<Option<RunRow>> {
        self.observe(self.backend.run(id).await)
    }

    /// The newest runs of one schedule, workflow or dispatch name, newest first.
    pub async fn runs(&self, kind: &str, name: &str, limit: u32) -> Result<Vec<RunRow>> {
        self.observe(self.backend.runs(kind, name, limit).await)
    }

    /// Which group committer takes `pending`. SQLite has one writer at a time: one committer,
    /// so a busy service pays one BEGIN and one COMMIT a turn for every kind of write.
    /// PostgreSQL commits concurrent transactions side by side (one WAL flush can serve
    /// several): enqueues go in one committer and the workers' claims and records in another,
    /// so that neither waits for the other's round trips and fsync. A record and the claim that
    /// refills its slot stay in the same committer, in order (`submit_then`).
    fn lane(&self, pending: &Pending) -> usize {
        match pending {
            Pending::Message { .. } | Pending::Event { .. } if self.is_shared() => 1,
            _ => 0,
        }
    }

    /// The group committer of `lane`, started at the first write that uses it.
    async fn committer(&self, lane: usize) -> &tokio::sync::mpsc::Sender<Pending> {
        self.committers[lane]
            .get_or_init(|| async {
                let (tx, rx) = tokio::sync::mpsc::channel(GROUP_COMMIT_MAX * 4);
                tokio::spawn(group_commit(self.backend.clone(), rx));
                tx
            })
            .await
    }

    /// Enqueues one message, durably: it returns after the commit. Concurrent callers share a
    /// commit (group commit: many writes, one fsync), each still answered after its own. The
    /// commit wakes every service's idle workers (PostgreSQL; on SQLite the caller does).
    /// Takes the message (it travels to the committer; no copy of a body up to 10 MiB).
    pub async fn enqueue(&self, origin: Origin, message: OutgoingMessage, now: DateTime<Utc>) -> Result<i64> {
        Ok(self.enqueue_here(origin, message, now).await?.id)
    }

    /// `enqueue`, telling whether the message was handed over to this process's worker.
    pub async fn enqueue_here(&self, origin: Origin, message: OutgoingMessage, now: DateTime<Utc>) -> Result<Enqueued> {
        self.enqueue_fenced(origin, message, now, None).await
    }

    /// `enqueue_here` for a request answered from a kept token owner (`token_owner_kept`): with
    /// its `fence`, written only while the fence holds, in the statement that writes it (or the
    /// transaction); else nothing is written and the error is `StoreError::Stale`.
    pub async fn enqueue_fenced(
        &self,
        origin: Origin,
        message: OutgoingMessage,
        now: DateTime<Utc>,
        fence: Option<AccessFence>,
    ) -> Result<Enqueued> {
        let message = Box::new(message);
        self.submit(|reply| Pending::Message { origin, message, now: ms(now), fence, reply }).await
    }

    /// Hands a write to the group committer and waits for its outcome.
    async fn submit<T>(&self, pending: impl FnOnce(tokio::sync::oneshot::Sender<Result<T>>) -> Pending) -> Result<T> {
        self.submit_then(pending, || {}).await
    }

    /// `submit`, calling `queued` once the write is in the committer's queue: a write handed
    /// over after that is committed with it or after it, never before.
    async fn submit_then<T>(
        &self,
        pending: impl FnOnce(tokio::sync::oneshot::Sender<Result<T>>) -> Pending,
        queued: impl FnOnce(),
    ) -> Result<T> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let pending = pending(reply);
        let committer = self.committer(self.lane(&pending)).await;
        if let Err(tokio::sync::mpsc::error::SendError(pending)) = committer.send(pending).await {
            // The committer's runtime is gone (a store carried into another runtime), before it
            // took the write: commit it here, alone.
            pending.answer(None, &self.backend).await;
        }
        queued();
        self.observe(answer.await.unwrap_or_else(|_| Err(committer_stopped())))
    }

    /// Enqueues many messages in one transaction (one commit for all; all or none), which
    /// wakes every service's idle workers (PostgreSQL; on SQLite the caller does).
    pub async fn enqueue_many(&self, items: &[(Origin, OutgoingMessage)], now: DateTime<Utc>) -> Result<Vec<i64>> {
        Ok(self.enqueue_many_here(items, now).await?.0)
    }

    /// `enqueue_many`, telling whether the messages were handed over to this process's worker
    /// (all of them or none).
    pub async fn enqueue_many_here(
        &self,
        items: &[(Origin, OutgoingMessage)],
        now: DateTime<Utc>,
    ) -> Result<(Vec<i64>, bool)> {
        self.observe(self.backend.enqueue_many(items, ms(now)).await)
    }

    /// Enqueues once per `key`: the first call creates the step, any later or concurrent call
    /// (from any service) gets the same id back. Returns (id, created). A created step's commit
    /// wakes every service's idle workers (PostgreSQL; on SQLite the caller does).
    pub async fn enqueue_once(
        &self,
        origin: Origin,
        message: &OutgoingMessage,
        now: DateTime<Utc>,
        key: &str,
    ) -> Result<(i64, bool)> {
        self.observe(self.backend.enqueue(origin, message, ms(now), Some(key), None).await)
    }

    /// Takes up to `limit` due messages under a lease for `owner`, urgent ones first (bulk ones
    /// first when `bulk_first`, the share bulk mail keeps). Messages whose lease expired (their
    /// worker died) are first recorded as interrupted and become due again.
    pub async fn claim(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        lease: Duration,
        limit: u32,
        bulk_first: bool,
    ) -> Result<Vec<Claim>> {
        self.claim_up_to(owner, now, lease, std::sync::Arc::new(move || limit), bulk_first).await
    }

    /// `claim`, with as many as `limit` says once the write transaction has begun: a worker
    /// that waited for its turn to write (behind an enqueue or its own records) takes every
    /// slot that freed meanwhile in one commit, instead of one commit per slot. Group-committed
    /// with the service's other writes.
    pub async fn claim_up_to(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        lease: Duration,
        limit: ClaimLimit,
        bulk_first: bool,
    ) -> Result<Vec<Claim>> {
        let (owner, now, lease_ms) = (owner.to_string(), ms(now), lease.as_millis() as i64);
        self.submit(|reply| Pending::Claim { owner, now, lease_ms, limit, bulk_first, reply }).await
    }

    /// Takes one send of `recipients` by `route` from that route's sending limits' budget,
    /// which every service shares; `None` when taken, else when there is room again. Group-
    /// committed with the records, claims and other sends of the moment: each send taken in its
    /// own transaction was a commit (and an fsync) of its own for every message, which held
    /// the service with limits on to ~40 % of its speed without.
    pub async fn reserve_send(
        &self,
        now: DateTime<Utc>,
        route: &str,
        recipients: usize,
        per_minute: Option<u32>,
        per_day: Option<u32>,
    ) -> Result<Option<DateTime<Utc>>> {
        let (per_minute, per_day) = (per_minute.map(i64::from), per_day.map(i64::from));
        let (now, route, recipients) = (ms(now), route.to_string(), recipients as i64);
        let until =
            self.submit(|reply| Pending::Reserve { now, route, recipients, per_minute, per_day, reply }).await?;
        Ok(until.map(from_ms))
    }

    /// Gives a claimed message back unsent, due at `until`, with `note` as its last error.
    pub async fn defer_claim(
        &self,
        claim: &ClaimRef,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
        note: &str,
    ) -> Result<bool> {
        self.observe(self.backend.defer_claim(claim, ms(until), ms(now), note).await)
    }

    pub async fn renew_lease(&self, claim: &ClaimRef, now: DateTime<Utc>, lease: Duration) -> Result<bool> {
        self.observe(self.backend.renew_lease(claim, ms(now) + lease.as_millis() as i64).await)
    }

    /// Records one attempt and the message's new state, fenced by the claim token: false (and
    /// nothing written) when another worker has taken the message since.
    pub async fn record_attempt(
        &self,
        claim: &ClaimRef,
        attempt: &AttemptMeta,
        settlement: &Settlement,
    ) -> Result<bool> {
        Ok(self.record_attempts(vec![(*claim, attempt.clone(), settlement.clone())]).await?[0])
    }

    /// `record_attempt` for several attempts in one transaction: what a busy worker does to
    /// pay one commit (one fsync on SQLite) for many messages. One result per attempt.
    /// Group-committed with the service's other writes.
    pub async fn record_attempts(&self, batch: AttemptBatch) -> Result<Vec<bool>> {
        self.submit(|reply| Pending::Record { batch, reply }).await
    }

    /// `record_attempts`, calling `queued` once the batch is in the group committer's queue: a
    /// claim made after that is committed in the same transaction or a later one, so what it
    /// takes is sent only once these attempts are recorded.
    pub async fn record_attempts_then(&self, batch: AttemptBatch, queued: impl FnOnce()) -> Result<Vec<bool>> {
        self.submit_then(|reply| Pending::Record { batch, reply }, queued).await
    }

    pub async fn list_messages(&self, filter: &MessageFilter) -> Result<Vec<MessageSummary>> {
        self.observe(self.backend.list_messages(filter).await)
    }

    pub async fn message(&self, id: i64) -> Result<Option<MessageDetail>> {
        self.observe(self.backend.message(id).await)
    }

    /// Puts a failed message back in the queue, its failed recipients pending again.
    pub async fn retry_message(&self, id: i64, now: DateTime<Utc>) -> Result<RetryResult> {
        self.observe(self.backend.retry_message(id, ms(now)).await)
    }

    /// The dead-letter bulk retry: every failed message whose last change is at or after
    /// `since` goes back in the queue, its failed recipients pending again. Returns how many.
    /// Asks the running services to check the relay; returns the request id.
    pub async fn request_check(&self, by: &str, now: DateTime<Utc>) -> Result<i64> {
        self.observe(self.backend.request_check(by, ms(now)).await)
    }

    /// Takes an open check request for `service` (one service gets each).
    pub async fn claim_check(&self, service: &str, now: DateTime<Utc>) -> Result<Option<i64>> {
        self.observe(self.backend.claim_check(service, ms(now)).await)
    }

    pub async fn finish_check(&self, id: i64, report: &str, now: DateTime<Utc>) -> Result<()> {
        self.observe(self.backend.finish_check(id, report, ms(now)).await)
    }

    /// `(claimed_by, report)` of check request `id`.
    pub async fn check_request(&self, id: i64) -> Result<Option<(Option<String>, Option<String>)>> {
        self.observe(self.backend.check_request(id).await)
    }

    /// Withdraws check request `id` unless a service took it already; true when withdrawn.
    pub async fn withdraw_check(&self, id: i64) -> Result<bool> {
        self.observe(self.backend.withdraw_check(id).await)
    }

    pub async fn send_retrying_now(&self, now: DateTime<Utc>) -> Result<u64> {
        self.observe(self.backend.send_retrying_now(ms(now)).await)
    }

    pub async fn cancel_message(&self, id: i64, by: &str, reason: &str, now: DateTime<Utc>) -> Result<CancelResult> {
        self.observe(self.backend.cancel_message(id, by, reason, ms(now)).await)
    }

    pub async fn retry_failed(&self, since: DateTime<Utc>, now: DateTime<Utc>) -> Result<u64> {
        self.observe(self.backend.retry_failed(ms(since), ms(now)).await)
    }

    pub async fn heartbeat(&self, service: &ServiceInfo, now: DateTime<Utc>) -> Result<()> {
        self.observe(self.backend.heartbeat(service, ms(now)).await)
    }

    pub async fn deregister(&self, service_id: &str) -> Result<()> {
        self.observe(self.backend.deregister(service_id).await)
    }

    /// Services whose last heartbeat is newer than `fresh_after`; older rows are pruned.
    /// The services that heartbeat at or after `fresh_after` (a plain read).
    pub async fn services(&self, fresh_after: DateTime<Utc>) -> Result<Vec<ServiceRow>> {
        self.observe(self.backend.services(ms(fresh_after)).await)
    }

    /// Forgets the services whose last heartbeat is older than `before`.
    pub async fn prune_services(&self, before: DateTime<Utc>) -> Result<()> {
        self.observe(self.backend.prune_services(ms(before)).await)
    }

    /// The message content as queued (what every attempt sends).
    pub async fn message_content(&self, id: i64) -> Result<Option<OutgoingMessage>> {
        self.observe(self.backend.message_content(id).await)
    }

    /// Messages delivered, retrying and failed per hour since `since` (by last update).
    pub async fn hourly_counts(&self, since: DateTime<Utc>) -> Result<Vec<HourlyCount>> {
        self.observe(self.backend.hourly_counts(ms(since)).await)
    }

    /// The newest attempt that did not deliver, and whether one has delivered since.
    pub async fn last_relay_error(&self) -> Result<Option<RelayError>> {
        self.observe(self.backend.last_relay_error().await)
    }

    /// The key that signs VERP tokens: the stored one, or `fresh` stored now when there is none.
    pub async fn bounce_key(&self, fresh: &str) -> Result<String> {
        self.observe(self.backend.bounce_key(fresh).await)
    }

    /// A message a received report may be about.
    pub async fn bounce_target(&self, id: i64) -> Result<Option<BounceTarget>> {
        self.observe(self.backend.bounce_target(id).await)
    }

    /// Stores a received report's rows, moving a matched message's recipients and state on.
    pub async fn record_bounce(
        &self,
        message: Option<i64>,
        rows: &[BounceRow],
        now: DateTime<Utc>,
    ) -> Result<Option<MessageState>> {
        self.observe(self.backend.record_bounce(message, rows, ms(now)).await)
    }

    /// Received reports, newest first (only the unmatched with `unmatched`).
    pub async fn bounces(&self, unmatched: bool, limit: i64) -> Result<Vec<BounceRecord>> {
        self.observe(self.backend.bounces(unmatched, limit).await)
    }

    /// The reports about one message, oldest first.
    pub async fn message_bounces(&self, id: i64) -> Result<Vec<BounceRecord>> {
        self.observe(self.backend.message_bounces(id).await)
    }

    /// The message with this Message-ID header, if stored.
    pub async fn message_by_header_id(&self, message_id: &str) -> Result<Option<i64>> {
        self.observe(self.backend.message_by_header_id(message_id).await)
    }

    /// How far a bounce mailbox was read: its UIDVALIDITY and the last UID taken.
    pub async fn mailbox_mark(&self, mailbox: &str) -> Result<Option<(i64, i64)>> {
        self.observe(self.backend.mailbox_mark(mailbox).await)
    }

    pub async fn set_mailbox_mark(&self, mailbox: &str, validity: i64, last_uid: i64) -> Result<()> {
        self.observe(self.backend.set_mailbox_mark(mailbox, validity, last_uid).await)
    }

    /// How many received reports matched no message.
    pub async fn unmatched_bounces(&self) -> Result<i64> {
        self.observe(self.backend.unmatched_bounces().await)
    }

    /// The latest attempt of each named route, in the order given (`current`: it failed).
    pub async fn route_attempts(&self, names: &[String]) -> Result<Vec<Option<RelayError>>> {
        self.observe(self.backend.route_attempts(names).await)
    }

    pub async fn queue_stats(&self, now: DateTime<Utc>) -> Result<QueueStats> {
        self.observe(self.backend.queue_stats(ms(now)).await)
    }

    /// Attempts recorded as interrupted (a worker's lease expired), across all services.
    pub async fn interrupted_attempts(&self) -> Result<i64> {
        self.observe(self.backend.interrupted_attempts().await)
    }

    pub async fn message_state(&self, id: i64) -> Result<Option<MessageState>> {
        self.observe(self.backend.message_state(id).await)
    }
}

/// PostgreSQL LISTEN on the wake-up channel.
pub struct WakeSubscription {
    listener: sqlx::postgres::PgListener,
    /// What this store's own wake-ups carry.
    origin: std::sync::Arc<str>,
}

/// Who sent a wake-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeFrom {
    /// This store (this service): its own workers were told at the commit.
    ThisStore,
    /// Another service, or a CLI command.
    Another,
}

impl WakeSubscription {
    /// Waits for the next wake-up. After a lost connection sqlx reconnects on the next call;
    /// notifications sent meanwhile are lost, which the workers' slow poll covers.
    pub async fn next(&mut self) -> Result<WakeFrom> {
        let notification = self.listener.recv().await?;
        Ok(match notification.payload() == &*self.origin {
            true => WakeFrom::ThisStore,
            false => WakeFrom::Another,
        })
    }
}

pub(crate) fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn from_ms(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(v).unwrap_or_default()
}

/// Removes a password from a database URL before it is shown anywhere.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn redacts_passwords_in_urls() {
        assert_eq!(redact_url("postgres://panel:s3cret@db/panel"), "postgres://panel:***@db/panel");
        assert_eq!(redact_url("sqlite://./panel-data/panel.db"), "sqlite://./panel-data/panel.db");
    }
}
