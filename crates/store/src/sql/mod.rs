//! The SQL store, one implementation for both backends through sqlx's `Any` driver: the
//! queries are shared, and the few places where SQLite and PostgreSQL differ ask `Dialect`.
//!
//! SQLite: WAL, `synchronous = FULL` (a commit survives power loss), every write transaction
//! taken with `BEGIN IMMEDIATE` so concurrent processes queue on the write lock instead of
//! failing on a read-to-write upgrade. PostgreSQL: read-committed transactions, with row locks
//! (`FOR UPDATE`, `SKIP LOCKED`) where several services compete, and migrations serialized by an
//! advisory lock.

use std::time::Duration;

use panel_domain::{MessageState, Origin};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};

use crate::model::*;
use crate::{Result, StoreError};

/// Reads `column` of a row from `table`: a column that is missing, NULL where a value is
/// needed, or of another type is a store error naming both, never a panic (in the worker, a
/// panic would stop delivery for every message).
pub(crate) fn cell<'r, T>(row: &'r AnyRow, table: &'static str, column: &'static str) -> Result<T>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(column).map_err(|e| StoreError::Corrupt(format!("{table}.{column}: {e}")))
}

/// A column that holds one of a closed set (a state, a stage, an outcome), read through the
/// set's own parse: a value this build does not know is a store error naming the column.
pub(crate) fn closed_cell<T>(
    row: &AnyRow,
    table: &'static str,
    column: &'static str,
    parse: fn(&str) -> Option<T>,
) -> Result<T> {
    let text: String = cell(row, table, column)?;
    parse(&text).ok_or_else(|| StoreError::Corrupt(format!("{table}.{column}: '{text}' is not one this build knows")))
}

/// The same for a column that may be NULL.
pub(crate) fn optional_closed_cell<T>(
    row: &AnyRow,
    table: &'static str,
    column: &'static str,
    parse: fn(&str) -> Option<T>,
) -> Result<Option<T>> {
    let text: Option<String> = cell(row, table, column)?;
    text.map(|t| {
        parse(&t).ok_or_else(|| StoreError::Corrupt(format!("{table}.{column}: '{t}' is not one this build knows")))
    })
    .transpose()
}

/// Unit tests of the SQL itself (a migration, a group commit) on both databases: each
/// `async fn check(url, dialect)` becomes a test on a fresh SQLite file and one on a fresh
/// PostgreSQL database (skipped without a server), as `contract!` does for the store's API.
#[cfg(test)]
macro_rules! on_both_databases {
    ($($check:ident => $sqlite:ident, $postgres:ident;)*) => {$(
        #[tokio::test]
        async fn $sqlite() {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("panel.db").display());
            $check(&url, $crate::sql::Dialect::Sqlite).await;
        }

        #[tokio::test]
        async fn $postgres() {
            let Some(db) = panel_testlab::TestDatabase::create() else { return };
            $check(&db.url, $crate::sql::Dialect::Postgres).await;
        }
    )*};
}

mod accounts;
mod bounces;
mod retention;
pub use accounts::TOKEN_ID_CHARS;
pub(crate) use queue::{ClaimAsk, SendAsk};
pub use retention::RetainedTable;
mod automation;
mod batch;
mod log;
mod queue;
mod registry;
mod secrets;
mod settings;

use queue::insert_message;
use settings::requeue_configuration_failures;

const SQLITE_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/sqlite/0001_core.sql")),
    (2, include_str!("../../migrations/sqlite/0002_licenses_credentials_audit.sql")),
    (3, include_str!("../../migrations/sqlite/0003_metrics.sql")),
    (4, include_str!("../../migrations/sqlite/0004_idempotency.sql")),
    (5, include_str!("../../migrations/sqlite/0005_automation.sql")),
    (6, include_str!("../../migrations/sqlite/0006_admins.sql")),
    (7, include_str!("../../migrations/sqlite/0007_sign_in_attempts.sql")),
    (8, include_str!("../../migrations/sqlite/0008_retention.sql")),
    (9, include_str!("../../migrations/sqlite/0009_cancelled.sql")),
    (10, include_str!("../../migrations/sqlite/0010_check_requests.sql")),
    (11, include_str!("../../migrations/sqlite/0011_sign_in_known.sql")),
    (12, include_str!("../../migrations/sqlite/0012_service_config.sql")),
    (13, include_str!("../../migrations/sqlite/0013_priority.sql")),
    (14, include_str!("../../migrations/sqlite/0014_captured.sql")),
    (15, include_str!("../../migrations/sqlite/0015_send_log.sql")),
    (16, include_str!("../../migrations/sqlite/0016_routes.sql")),
    (17, include_str!("../../migrations/sqlite/0017_bounces.sql")),
    (18, include_str!("../../migrations/sqlite/0018_definitions_generation.sql")),
    (19, include_str!("../../migrations/sqlite/0019_run_lookups.sql")),
    (20, include_str!("../../migrations/sqlite/0020_partial_keys.sql")),
    (21, include_str!("../../migrations/sqlite/0021_budget_totals.sql")),
    (22, include_str!("../../migrations/sqlite/0022_access_unchanged.sql")),
];

const POSTGRES_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_core.sql")),
    (2, include_str!("../../migrations/postgres/0002_licenses_credentials_audit.sql")),
    (3, include_str!("../../migrations/postgres/0003_metrics.sql")),
    (4, include_str!("../../migrations/postgres/0004_idempotency.sql")),
    (5, include_str!("../../migrations/postgres/0005_automation.sql")),
    (6, include_str!("../../migrations/postgres/0006_admins.sql")),
    (7, include_str!("../../migrations/postgres/0007_sign_in_attempts.sql")),
    (8, include_str!("../../migrations/postgres/0008_retention.sql")),
    (9, include_str!("../../migrations/postgres/0009_cancelled.sql")),
    (10, include_str!("../../migrations/postgres/0010_check_requests.sql")),
    (11, include_str!("../../migrations/postgres/0011_sign_in_known.sql")),
    (12, include_str!("../../migrations/postgres/0012_service_config.sql")),
    (13, include_str!("../../migrations/postgres/0013_priority.sql")),
    (14, include_str!("../../migrations/postgres/0014_captured.sql")),
    (15, include_str!("../../migrations/postgres/0015_send_log.sql")),
    (16, include_str!("../../migrations/postgres/0016_routes.sql")),
    (17, include_str!("../../migrations/postgres/0017_bounces.sql")),
    (18, include_str!("../../migrations/postgres/0018_definitions_generation.sql")),
    (19, include_str!("../../migrations/postgres/0019_run_lookups.sql")),
    (20, include_str!("../../migrations/postgres/0020_partial_keys.sql")),
    (21, include_str!("../../migrations/postgres/0021_budget_totals.sql")),
    (22, include_str!("../../migrations/postgres/0022_access_unchanged.sql")),
];

/// The PostgreSQL notification channel that wakes idle workers on every service.
pub(super) const WAKE_CHANNEL: &str = "panel_wake";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    fn migrations(self) -> &'static [(i64, &'static str)] {
        match self {
            Dialect::Sqlite => SQLITE_MIGRATIONS,
            Dialect::Postgres => POSTGRES_MIGRATIONS,
        }
    }

    /// Appended to a SELECT whose rows the transaction is about to change, where another
    /// service may compete for them. SQLite's write lock already serializes writers.
    fn lock_rows(self) -> &'static str {
        match self {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE",
        }
    }

    fn skip_locked(self) -> &'static str {
        match self {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }

    /// SQLite has no statistics unless ANALYZE runs, and then prefers the state index and sorts
    /// every due row per claim; naming the partial index keeps a claim O(batch) at any depth.
    fn use_index(self, index: &'static str) -> String {
        match self {
            Dialect::Sqlite => format!(" INDEXED BY {index}"),
            Dialect::Postgres => String::new(),
        }
    }

    fn concat_addresses(self) -> &'static str {
        match self {
            Dialect::Sqlite => "group_concat(address, ',')",
            Dialect::Postgres => "string_agg(address, ',' ORDER BY position)",
        }
    }
}

#[derive(Clone)]
pub struct SqlStore {
    /// Reads (and the few single-statement writes outside a transaction).
    pool: AnyPool,
    /// Write transactions. SQLite: a connection of their own, so a writer whose turn came never
    /// waits for a pooled connection busy with reads (API requests' token and settings
    /// lookups); PostgreSQL: the same pool.
    writer: AnyPool,
    pub(crate) dialect: Dialect,
    url: String,
    /// SQLite: this process's writers take turns here, in arrival order, before `BEGIN
    /// IMMEDIATE`. Without it they meet at SQLite's write lock, whose busy handler sleeps the
    /// loser 1, 2, 5, 10... ms: under load (an enqueue commit, a claim and a record at once)
    /// those sleeps, not the fsyncs, were most of a message's time in the queue. Other
    /// processes (the CLI) still queue on the lock itself.
    turn: std::sync::Arc<tokio::sync::Mutex<WriterSlot>>,
    /// When (store time, ms) this process last looked for expired leases in a claim.
    expired_scan: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// When (store time, ms) this process last took the sends older than a day out of the
    /// sending limits' budget (`SqlStore::trim_budget`).
    budget_trimmed: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// Names this store in the wake-ups it sends (the NOTIFY's payload), so that its own
    /// subscription can tell them from other services' (`WakeSubscription::next`). Digits and
    /// dots only: written into statements as it is.
    wake_origin: std::sync::Arc<str>,
    /// How many messages this process's workers, waiting with free slots and nothing left to
    /// claim, can take at once (`Store::offer_room`): enqueues that fit wake no other service;
    /// on PostgreSQL they are inserted already claimed for the worker (`LocalRoom::taker`).
    local_room: std::sync::Arc<std::sync::Mutex<LocalRoom>>,
    /// Told at each hand-over (`SqlStore::handed`): the worker wakes for the claims handed to
    /// it, and knows the wake-up is for them alone (`Store::handed_ready`).
    handed_ready: std::sync::Arc<tokio::sync::Notify>,
}

/// This process's worker as the taker of the mail enqueued here (`Store::offer_room`).
#[derive(Default)]
pub(crate) struct LocalRoom {
    /// Slots free and waiting, with nothing left to claim.
    room: u32,
    /// PostgreSQL: the worker that takes mail inserted already claimed, and its lease (ms).
    taker: Option<(String, i64)>,
    /// Claims inserted for the taker and not yet taken (`Store::take_handed`).
    handed: Vec<crate::Claim>,
}

impl LocalRoom {
    /// Takes room for `messages`; false (nothing taken) when they do not fit.
    fn take(&mut self, messages: usize) -> bool {
        let messages = u32::try_from(messages).unwrap_or(u32::MAX);
        match self.room.checked_sub(messages) {
            Some(left) => {
                self.room = left;
                true
            }
            None => false,
        }
    }
}

/// A `wake_origin` no other store has: this process's id, a count of the stores it opened, and
/// the time.
fn new_wake_origin() -> std::sync::Arc<str> {
    static OPENED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let count = OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("{}.{count}.{nanos}", std::process::id()).into()
}

/// A write transaction; on SQLite it holds the process's write turn until it ends.
pub(crate) struct Tx {
    conn: TxConn,
    pub(crate) dialect: Dialect,
    /// The store's `wake_origin`, for the NOTIFY a transaction sends.
    pub(crate) wake_origin: std::sync::Arc<str>,
}

enum TxConn {
    /// PostgreSQL: sqlx's transaction on a pooled connection.
    Pooled(sqlx::Transaction<'static, sqlx::Any>),
    /// SQLite: the turn, with the writer's connection inside `BEGIN IMMEDIATE`.
    Turn(Turn),
}

impl Tx {
    pub(crate) async fn commit(self) -> std::result::Result<(), sqlx::Error> {
        match self.conn {
            TxConn::Pooled(tx) => tx.commit().await,
            TxConn::Turn(mut turn) => turn.end("COMMIT").await,
        }
    }

    pub(crate) async fn rollback(self) -> std::result::Result<(), sqlx::Error> {
        match self.conn {
            TxConn::Pooled(tx) => tx.rollback().await,
            TxConn::Turn(mut turn) => turn.end("ROLLBACK").await,
        }
    }

    /// SQLite: the transaction was ended by a `COMMIT` sent with its last statements
    /// (`Writes::commit`).
    pub(super) fn ended(mut self) {
        if let TxConn::Turn(turn) = &mut self.conn {
            turn.slot().open = false;
        }
    }
}

impl std::ops::Deref for Tx {
    type Target = sqlx::AnyConnection;
    fn deref(&self) -> &sqlx::AnyConnection {
        match &self.conn {
            TxConn::Pooled(tx) => tx,
            TxConn::Turn(turn) => {
                turn.0.as_ref().and_then(|slot| slot.conn.as_deref()).expect("a turn holds the writer")
            }
        }
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut sqlx::AnyConnection {
        match &mut self.conn {
            TxConn::Pooled(tx) => tx,
            TxConn::Turn(turn) => turn.slot().conn(),
        }
    }
}

/// SQLite: the writer's one connection, kept with this process's write turn. Taken from its
/// pool once and kept: sqlx returns a released connection to its pool from a task of its own,
/// and the next writer's acquire waited for that task, ~150 us of every write transaction
/// (with the BEGIN's and the COMMIT's round trips, most of a small group commit's time).
#[derive(Default)]
struct WriterSlot {
    conn: Option<sqlx::pool::PoolConnection<sqlx::Any>>,
    /// A transaction began on `conn` and has not ended (its `Tx` was dropped on an error or a
    /// cancelled caller, or its COMMIT failed): rolled back before anyone writes again.
    open: bool,
}

impl WriterSlot {
    fn conn(&mut self) -> &mut sqlx::AnyConnection {
        self.conn.as_deref_mut().expect("a turn holds the writer")
    }

    /// Rolls back a transaction left open. A connection whose state is then not known is
    /// closed; the next writer opens another.
    async fn end_open(&mut self) {
        if !self.open {
            return;
        }
        self.open = false;
        let Some(conn) = self.conn.as_deref_mut() else { return };
        match sqlx::raw_sql("ROLLBACK").execute(conn).await {
            Ok(_) => {}
            // SQLite ended it itself (a COMMIT that failed on a full disk rolls back).
            Err(sqlx::Error::Database(e)) if e.message().contains("no transaction is active") => {}
            Err(_) => {
                if let Some(conn) = self.conn.take() {
                    drop(conn.close().await);
                }
            }
        }
    }
}

impl Drop for WriterSlot {
    fn drop(&mut self) {
        // sqlx hands a dropped connection back to its pool from a task, which panics without a
        // runtime: a store dropped after its runtime (a test's, a tool's) lets it go instead.
        if tokio::runtime::Handle::try_current().is_err()
            && let Some(conn) = self.conn.take()
        {
            drop(conn.detach());
        }
    }
}

/// A transaction's hold on the turn. Dropped with its transaction still open, it rolls that
/// back before the next writer's turn: SQLite's write lock must not stay held, other
/// processes (the CLI) wait for it.
struct Turn(Option<tokio::sync::OwnedMutexGuard<WriterSlot>>);

impl Turn {
    fn slot(&mut self) -> &mut WriterSlot {
        self.0.as_mut().expect("held until dropped")
    }

    /// `COMMIT` or `ROLLBACK`. Failed, the transaction counts as open (rolled back on drop).
    async fn end(&mut self, sql: &'static str) -> std::result::Result<(), sqlx::Error> {
        let slot = self.slot();
        sqlx::query(sql).execute(slot.conn()).await?;
        slot.open = false;
        Ok(())
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let Some(mut slot) = self.0.take() else { return };
        if !slot.open {
            return;
        }
        // The guard goes with the rollback: the next writer's turn comes after it. Without a
        // runtime (shutting down) the next `write` rolls back first.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { slot.end_open().await });
        }
    }
}

/// Whether a connection coming back to the pool may be used again: only when it is outside any
/// transaction. A transaction whose COMMIT failed (SQLite's "database or disk is full" rolls the
/// transaction back itself, so the ROLLBACK sqlx sends on drop fails too) leaves sqlx counting
/// the connection as still inside it, and every later BEGIN on it would fail ("attempted to
/// call begin_with at non-zero transaction depth") long after space returned. Such a connection
/// is closed instead, and the pool opens a fresh one.
async fn outside_transaction(conn: &mut sqlx::AnyConnection) -> std::result::Result<bool, sqlx::Error> {
    use sqlx::Connection;
    if !conn.is_in_transaction() {
        return Ok(true);
    }
    // A dropped transaction's ROLLBACK is queued, not yet run: let the connection run it, then
    // look again. This round trip happens only after a failed transaction.
    if conn.ping().await.is_err() {
        return Ok(false);
    }
    Ok(!conn.is_in_transaction())
}

/// The rows of a multi-row `VALUES`: `rows` copies of `row`, whose `?1` .. `?width` become
/// the next free parameters (`$1`, `$2`, ...), numbered on from row to row.
#[cfg(test)]
pub(super) fn values(rows: usize, width: usize, row: &str) -> String {
    values_from(0, rows, width, row)
}

/// `values` for a statement whose parameters start after the first `taken`.
///
/// The template is split once into its text and its `?k`, and each row written out from
/// that: a group commit builds thousands of placeholders, and replacing each `?k` in a copy
/// per row (as this did) was ~3 % of a busy service's CPU, on the committer's path.
pub(super) fn values_from(taken: usize, rows: usize, width: usize, row: &str) -> String {
    numbered(taken, rows, width, row, '$')
}

/// `values` as a template again: the rows' parameters `?1` .. `?{rows * width}`, for a
/// statement whose values are bound as one (`Writes::statement`).
pub(super) fn values_template(rows: usize, width: usize, row: &str) -> String {
    numbered(0, rows, width, row, '?')
}

fn numbered(taken: usize, rows: usize, width: usize, row: &str, sigil: char) -> String {
    use std::fmt::Write as _;
    enum Part<'a> {
        Text(&'a str),
        Param(usize),
    }
    let mut parts = Vec::new();
    let mut rest = row;
    while let Some(at) = rest.find('?') {
        let digits = rest[at + 1..].bytes().take_while(u8::is_ascii_digit).count();
        match rest[at + 1..at + 1 + digits].parse::<usize>() {
            Ok(k) if (1..=width).contains(&k) => {
                parts.push(Part::Text(&rest[..at]));
                parts.push(Part::Param(k));
            }
            // Not one of ours: kept as written.
            _ => parts.push(Part::Text(&rest[..at + 1 + digits])),
        }
        rest = &rest[at + 1 + digits..];
    }
    parts.push(Part::Text(rest));
    let mut out = String::with_capacity(rows * (row.len() + width * 3 + 2));
    for i in 0..rows {
        if i > 0 {
            out.push_str(", ");
        }
        for part in &parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Param(k) => {
                    let _ = write!(out, "{sigil}{}", taken + i * width + k);
                }
            }
        }
    }
    out
}

/// A group committer's own connection (PostgreSQL), or the token reader's (both databases; on
/// SQLite one of the four readers), kept from one use to the next: a connection returned to sqlx's
/// pool is pinged on its way back (a round trip, not configurable), which every group paid. Like a
/// pooled one, it is pinged before use once idle for `POOL_IDLE_CHECK` (the server may have
/// restarted meanwhile), and after a statement on it failed it goes back to the pool (which closes
/// it if it is broken) for a fresh one.
#[derive(Default)]
pub struct Held {
    conn: Option<(sqlx::pool::PoolConnection<sqlx::Any>, std::time::Instant)>,
}

impl Held {
    /// The connection, from `pool` when there is none or it did not answer its ping.
    pub(crate) async fn get(&mut self, pool: &AnyPool) -> Result<&mut sqlx::AnyConnection> {
        use sqlx::Connection;
        if let Some((conn, used)) = &mut self.conn
            && used.elapsed() >= POOL_IDLE_CHECK
            && conn.ping().await.is_err()
        {
            self.conn = None;
        }
        if self.conn.is_none() {
            self.conn = Some((pool.acquire().await?, std::time::Instant::now()));
        }
        let (conn, used) = self.conn.as_mut().expect("taken above");
        *used = std::time::Instant::now();
        Ok(&mut **conn)
    }

    /// After a failed statement: the connection's state is not known, the next use takes another.
    pub(crate) fn failed(&mut self) {
        self.conn = None;
    }
}

/// How long a pooled PostgreSQL connection may sit idle and still be used without a ping.
pub const POOL_IDLE_CHECK: Duration = Duration::from_secs(1);

/// A pool of `max` connections to the SQLite database at `path`, each set up alike.
async fn sqlite_pool(path: &str, max: u32) -> Result<AnyPool> {
    let options: AnyConnectOptions = format!("sqlite://{path}?mode=rwc").parse()?;
    Ok(AnyPoolOptions::new()
        .max_connections(max)
        // A local file does not drop connections: no ping (a round trip) before each use.
        .test_before_acquire(false)
        .after_release(|conn, _| Box::pin(outside_transaction(conn)))
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute(
                    "PRAGMA busy_timeout = 15000; PRAGMA journal_mode = WAL; PRAGMA mmap_size = 268435456; PRAGMA cache_size = -16000; \
                     PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
                )
                .await
                .map(|_| ())
            })
        })
        .connect_with(options)
        .await?)
}

impl SqlStore {
    /// Opens `url` (`sqlite://PATH` or `postgres://...`) and applies pending migrations.
    pub async fn open(url: &str, dialect: Dialect) -> Result<SqlStore> {
        let store = SqlStore::connect(url, dialect).await?;
        store.migrate_to(i64::MAX).await?;
        Ok(store)
    }

    async fn connect(url: &str, dialect: Dialect) -> Result<SqlStore> {
        sqlx::any::install_default_drivers();
        let (pool, writer) = match dialect {
            Dialect::Sqlite => {
                let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
                // The writer's connection first: it creates the file and turns WAL on. Four
                // readers, one of them kept by the token reader while it runs (`Held`).
                let writer = sqlite_pool(path, 1).await?;
                (sqlite_pool(path, 4).await?, writer)
            }
            Dialect::Postgres => {
                let options: AnyConnectOptions = url.parse()?;
                let pool = AnyPoolOptions::new()
                    // Eight for reads and single writes, and the ones kept by the two group
                    // committers and the token reader.
                    .max_connections(11)
                    .acquire_timeout(Duration::from_secs(15))
                    // sqlx pings every connection as it comes back to the pool, so one idle for
                    // less than POOL_IDLE_CHECK answered a moment ago: pinging it again before
                    // each use was a round trip per query for nothing (with three busy services,
                    // the most frequent thing said to PostgreSQL). One idle for longer (the
                    // server may have restarted meanwhile) is pinged before use, as before.
                    .test_before_acquire(false)
                    .before_acquire(|conn, meta| {
                        Box::pin(async move {
                            if meta.idle_for >= POOL_IDLE_CHECK {
                                sqlx::Connection::ping(conn).await?;
                            }
                            Ok(true)
                        })
                    })
                    .after_release(|conn, _| Box::pin(outside_transaction(conn)))
                    .connect_with(options)
                    .await?;
                (pool.clone(), pool)
            }
        };
        let store = SqlStore {
            pool,
            writer,
            dialect,
            url: url.to_string(),
            turn: Default::default(),
            expired_scan: std::sync::Arc::new(std::sync::atomic::AtomicI64::new(i64::MIN)),
            budget_trimmed: std::sync::Arc::new(std::sync::atomic::AtomicI64::new(i64::MIN)),
            wake_origin: new_wake_origin(),
            local_room: Default::default(),
            handed_ready: Default::default(),
        };
        Ok(store)
    }

    async fn write(&self) -> Result<Tx> {
        Ok(self.write_reading("").await?.0)
    }

    /// `write` for a transaction that inserts rows with their ids chosen first (`batch::Ids`):
    /// on SQLite the ids are read with its `BEGIN`.
    async fn write_with_ids(&self) -> Result<(Tx, batch::Ids)> {
        match self.dialect {
            Dialect::Sqlite => {
                let (tx, rows) = self.write_reading(batch::Ids::next_sql()).await?;
                Ok((tx, batch::Ids::from_next(&rows)?))
            }
            Dialect::Postgres => Ok((self.write().await?, batch::Ids::default())),
        }
    }

    /// `write`, and the rows of `select` (no parameters) read in the transaction. SQLite sends
    /// the `BEGIN IMMEDIATE` and `select` together: one round trip.
    async fn write_reading(&self, select: &str) -> Result<(Tx, Vec<AnyRow>)> {
        let mut tx = match self.dialect {
            Dialect::Sqlite => {
                // The turn first, then the connection kept in it.
                let mut slot = self.turn.clone().lock_owned().await;
                slot.end_open().await;
                if slot.conn.is_none() {
                    slot.conn = Some(self.writer.acquire().await?);
                }
                // Open until it is known ended: a BEGIN that failed is rolled back for nothing.
                slot.open = true;
                let mut tx = Tx {
                    conn: TxConn::Turn(Turn(Some(slot))),
                    dialect: self.dialect,
                    wake_origin: self.wake_origin.clone(),
                };
                // A prepared statement, kept by sqlx like any other.
                let sql = match select {
                    "" => "BEGIN IMMEDIATE".to_string(),
                    select => format!("BEGIN IMMEDIATE; {select}"),
                };
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&mut *tx).await?;
                return Ok((tx, rows));
            }
            Dialect::Postgres => Tx {
                conn: TxConn::Pooled(self.writer.begin().await?),
                dialect: self.dialect,
                wake_origin: self.wake_origin.clone(),
            },
        };
        let rows = match select {
            "" => Vec::new(),
            select => sqlx::query(sqlx::AssertSqlSafe(select.to_string())).fetch_all(&mut *tx).await?,
        };
        Ok((tx, rows))
    }

    /// A read-only transaction whose reads all see the database as of one instant: a view built
    /// from several statements (a message with its recipients and attempts) never mixes one
    /// commit's rows with the rows before it. SQLite's WAL gives a transaction one snapshot;
    /// PostgreSQL's default gives each statement its own, hence REPEATABLE READ.
    pub(super) async fn snapshot(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        let mut tx = self.pool.begin().await?;
        if self.dialect == Dialect::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
        }
        Ok(tx)
    }

    /// Applies the pending migrations up to version `last` (a test stops at an older one).
    async fn migrate_to(&self, last: i64) -> Result<()> {
        let mut tx = self.write().await?;
        if self.dialect == Dialect::Postgres {
            // Several services may start at once: one migrates, the others wait and see it done.
            sqlx::query("SELECT pg_advisory_xact_lock(7215013)").execute(&mut *tx).await?;
        }
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        let current: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetch_one(&mut *tx).await?;
        for (version, sql) in self.dialect.migrations().iter().filter(|(v, _)| *v > current && *v <= last) {
            sqlx::raw_sql(*sql).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(version)
                .bind(chrono::Utc::now().timestamp_millis())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The newest migration applied, and the newest this build knows.
    pub async fn schema_version(&self) -> Result<(i64, i64)> {
        let current: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetch_one(&self.pool).await?;
        Ok((current, self.dialect.migrations().last().map_or(0, |m| m.0)))
    }

    /// Whether a commit inserting `messages` messages is to wake the other services: not when
    /// this process's workers have room for them (they are woken locally, and take them at
    /// once), which they then no longer have. With every service claiming at every enqueue,
    /// most of their claims came back empty, each a round trip and a wake-up of a process and
    /// its database connection; measured, that cost a third of the throughput of three
    /// services. When the workers are busy, or mail is left to claim, the others are woken.
    pub(super) fn wake_others(&self, messages: usize) -> bool {
        !self.local_room.lock().expect("not poisoned").take(messages)
    }

    /// `wake_others` for messages that can be inserted already claimed: the worker that takes
    /// them and its lease when they fit in its room (which they then take), else `None`.
    pub(super) fn hand_over(&self, messages: usize) -> Option<(String, i64)> {
        let mut local = self.local_room.lock().expect("not poisoned");
        let taker = local.taker.clone()?;
        local.take(messages).then_some(taker)
    }

    /// Claims inserted for `taker` (`hand_over`), for it to take; false (nothing kept) when
    /// that worker stopped meanwhile.
    pub(super) fn handed(&self, taker: &(String, i64), claims: Vec<crate::Claim>) -> bool {
        let mut local = self.local_room.lock().expect("not poisoned");
        if local.taker.as_ref() != Some(taker) {
            return false;
        }
        local.handed.extend(claims);
        self.handed_ready.notify_one();
        true
    }

    /// `Store::handed_ready`.
    pub async fn handed_ready(&self) {
        self.handed_ready.notified().await;
    }

    /// `Store::offer_room`: the claims handed over and not yet taken hold their slots.
    pub fn offer_room(&self, slots: u32) {
        let mut local = self.local_room.lock().expect("not poisoned");
        local.room = slots.saturating_sub(u32::try_from(local.handed.len()).unwrap_or(u32::MAX));
    }

    /// `Store::add_room`.
    pub fn add_room(&self, slots: u32) {
        let mut local = self.local_room.lock().expect("not poisoned");
        local.room = local.room.saturating_add(slots);
    }

    /// `Store::take_mail_as`. On SQLite a claim rides the same group commit as the records and
    /// the enqueues: nothing is handed over there.
    pub fn take_mail_as(&self, taker: Option<(String, i64)>) {
        let mut local = self.local_room.lock().expect("not poisoned");
        local.room = 0;
        local.taker = taker.filter(|_| self.dialect == Dialect::Postgres);
    }

    /// `Store::take_handed`.
    pub fn take_handed(&self) -> Vec<crate::Claim> {
        std::mem::take(&mut self.local_room.lock().expect("not poisoned").handed)
    }

    /// A dedicated connection listening for wake-ups (PostgreSQL only).
    /// With the store's `wake_origin`, which its own wake-ups carry.
    pub async fn listen_wakes(&self) -> Result<Option<(sqlx::postgres::PgListener, std::sync::Arc<str>)>> {
        if self.dialect != Dialect::Postgres {
            return Ok(None);
        }
        let mut listener = sqlx::postgres::PgListener::connect(&self.url).await?;
        listener.listen(WAKE_CHANNEL).await?;
        Ok(Some((listener, self.wake_origin.clone())))
    }

    /// Wakes idle workers of every service (PostgreSQL NOTIFY); SQLite services are woken locally.
    pub async fn notify_wake(&self) -> Result<()> {
        if self.dialect == Dialect::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(WAKE_CHANNEL)
                .bind(&*self.wake_origin)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }
}

/// `notify_wake` at the commit of `tx` (PostgreSQL delivers a NOTIFY when its transaction
/// commits): for the writes that insert messages one by one, so that every enqueue wakes the
/// services by its own commit, as the batched inserts do (`Writes::wake_on_commit`).
pub(super) async fn wake_at_commit(tx: &mut Tx) -> Result<()> {
    if tx.dialect == Dialect::Postgres {
        let origin = tx.wake_origin.clone();
        sqlx::query("SELECT pg_notify($1, $2)").bind(WAKE_CHANNEL).bind(&*origin).execute(&mut **tx).await?;
    }
    Ok(())
}

fn waiting(state: MessageState) -> bool {
    matches!(state, MessageState::Queued | MessageState::Retrying)
}

async fn audit(tx: &mut Tx, actor: &str, now: i64, events: &[AuditEvent]) -> Result<()> {
    for e in events {
        sqlx::query("INSERT INTO audit_log (at, actor, action, subject, detail) VALUES ($1, $2, $3, $4, $5)")
            .bind(now)
            .bind(actor)
            .bind(&e.action)
            .bind(&e.subject)
            .bind(&e.detail)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

fn parse_state(r: &AnyRow) -> Result<MessageState> {
    closed_cell(r, "messages", "state", MessageState::parse)
}

fn parse_origin(r: &AnyRow) -> Result<Origin> {
    closed_cell(r, "messages", "origin", Origin::parse)
}

/// `messages.priority`: its rank (0 urgent, 1 bulk), like every closed cell a `Corrupt` error
/// when it is neither.
fn parse_priority(r: &AnyRow) -> Result<panel_domain::Priority> {
    let rank: i64 =
        cell::<i16>(r, "messages", "priority").map(i64::from).or_else(|_| cell(r, "messages", "priority"))?;
    [panel_domain::Priority::Urgent, panel_domain::Priority::Bulk]
        .into_iter()
        .find(|p| p.rank() == rank)
        .ok_or_else(|| crate::StoreError::Corrupt(format!("messages.priority: {rank} is not 0 or 1")))
}

/// A `messages.state` read on its own (a scalar query): the same rule as `closed_cell`.
fn known_state(text: &str) -> Result<MessageState> {
    MessageState::parse(text)
        .ok_or_else(|| StoreError::Corrupt(format!("messages.state: '{text}' is not one this build knows")))
}

fn json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::{Dialect, SqlStore};
    use crate::{EventPlan, NewRun};
    use panel_domain::run::{RunKind, RunStatus, Trigger};

    /// Migration 20 (the keys' unique indexes made partial; SQLite makes events and runs anew)
    /// on a database with keyed and unkeyed rows whose newest event and run retention deleted:
    /// every key stays unique, rows without one are as many as wanted, and no id is handed out
    /// twice.
    async fn keys_and_ids_survive_the_partial_keys_migration(url: &str, dialect: Dialect) {
        let store = SqlStore::connect(url, dialect).await.unwrap();
        store.migrate_to(19).await.unwrap();
        let none: EventPlan = Box::new(|_| Vec::new().into());
        let run = |fire_key: Option<&str>| NewRun {
            kind: RunKind::Schedule,
            name: "nightly".into(),
            trigger: Trigger::Cron,
            fire_key: fire_key.map(str::to_string),
            fire_time: None,
            event_id: None,
            missed: 0,
            status: RunStatus::Queued,
            detail: None,
            service: "test".into(),
            steps: Vec::new(),
        };
        for key in [Some("k1"), None, Some("k3")] {
            assert!(store.record_event("user.created", "{}", key, 1, &none).await.unwrap().created);
        }
        for key in [Some("schedule:nightly@1"), None, Some("schedule:nightly@3")] {
            assert!(store.commit_run(run(key), None, 1).await.unwrap().is_some());
        }
        // Retention took the newest of each.
        sqlx::raw_sql("DELETE FROM events WHERE id = 3; DELETE FROM runs WHERE id = 3")
            .execute(&store.pool)
            .await
            .unwrap();
        store.migrate_to(i64::MAX).await.unwrap();

        let mut ids = vec![];
        for key in [Some("k3"), None, None] {
            let event = store.record_event("user.created", "{}", key, 2, &none).await.unwrap();
            assert!(event.created, "{key:?}");
            ids.push(event.id);
        }
        for key in [Some("schedule:nightly@3"), None, None] {
            ids.push(store.commit_run(run(key), None, 2).await.unwrap().expect("written"));
        }
        let again = store.record_event("user.created", "{}", Some("k1"), 2, &none).await.unwrap();
        assert_eq!((again.id, again.created), (1, false), "a key taken before the migration stays taken");
        assert_eq!(store.commit_run(run(Some("schedule:nightly@1")), None, 2).await.unwrap(), None);
        // Ids go on past the deleted 3.
        assert!(ids[..3].iter().all(|&id| id > 3) && ids[1] > ids[0] && ids[2] > ids[1], "events {ids:?}");
        assert!(ids[3..].iter().all(|&id| id > 3) && ids[4] > ids[3] && ids[5] > ids[4], "runs {ids:?}");
    }

    on_both_databases! {
        keys_and_ids_survive_the_partial_keys_migration =>
            keys_and_ids_survive_the_partial_keys_migration_on_sqlite,
            keys_and_ids_survive_the_partial_keys_migration_on_postgres;
    }

    /// Migration 21 (the budget's running totals) on sends logged before it, not in time order:
    /// the windows after it hold what they held before, each route its own.
    async fn sends_logged_before_the_totals_migration_still_count(url: &str, dialect: Dialect) {
        let store = SqlStore::connect(url, dialect).await.unwrap();
        store.migrate_to(20).await.unwrap();
        let t: i64 = 1_800_000_000_000;
        for (at, recipients, route) in [
            (t - 50_000, 2, "primary"),
            (t - 70_000, 1, "primary"),
            (t - 10_000, 3, "primary"),
            (t - 5_000, 4, "standby"),
        ] {
            sqlx::query("INSERT INTO send_log (at, recipients, route) VALUES ($1, $2, $3)")
                .bind(at)
                .bind(recipients)
                .bind(route)
                .execute(&store.pool)
                .await
                .unwrap();
        }
        store.migrate_to(i64::MAX).await.unwrap();
        let ask =
            |route, recipients, per_minute, per_day| super::SendAsk { now: t, route, recipients, per_minute, per_day };
        // Two of the primary's sends are in the last minute: room when the older ages out.
        assert_eq!(store.reserve_send(ask("primary", 1, Some(2), None)).await.unwrap(), Some(t - 50_000 + 60_000));
        // Six recipients in the day: two more fit once the oldest send (one recipient) ages out.
        assert_eq!(store.reserve_send(ask("primary", 2, None, Some(7))).await.unwrap(), Some(t - 70_000 + 86_400_000));
        assert_eq!(store.reserve_send(ask("primary", 1, None, Some(7))).await.unwrap(), None, "one more fits");
        assert_eq!(store.reserve_send(ask("standby", 1, None, Some(5))).await.unwrap(), None);
        assert!(store.reserve_send(ask("standby", 1, None, Some(5))).await.unwrap().is_some());
    }

    on_both_databases! {
        sends_logged_before_the_totals_migration_still_count =>
            sends_logged_before_the_totals_migration_still_count_on_sqlite,
            sends_logged_before_the_totals_migration_still_count_on_postgres;
    }

    #[test]
    fn values_number_the_parameters_on_from_row_to_row() {
        assert_eq!(super::values(2, 2, "(?1, 'x', ?2, ?1)"), "($1, 'x', $2, $1), ($3, 'x', $4, $3)");
        let wide = super::values(2, 10, "(?1, ?10)");
        assert_eq!(wide, "($1, $10), ($11, $20)");
        // A statement sent after others in one round trip numbers on after theirs.
        assert_eq!(super::values_from(7, 2, 2, "(?1, ?2)"), "($8, $9), ($10, $11)");
        // A `?` that is not one of the row's parameters stays as written.
        assert_eq!(super::values(1, 2, "(?1, '?', ?3, ?2?)"), "($1, '?', ?3, $2?)");
        // As a template of one statement's values, numbered on for `Writes::statement`.
        assert_eq!(super::values_template(2, 2, "(?1, ?2)"), "(?1, ?2), (?3, ?4)");
    }
}
