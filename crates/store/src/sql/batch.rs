//! Rows that point at each other (a recipient at its message, a message at its run, a run's
//! steps at its messages) written with their ids chosen first: nothing is read back and matched
//! to its caller, and a group's inserts travel to the database together, one round trip for
//! several tables (SQLite runs the statements of one string in turn; PostgreSQL runs them as
//! the data-modifying `WITH` parts of one statement). In a group commit the round trips, each a
//! hand-off to the database and back, not the rows, were most of the time the write lock was
//! held.

use std::collections::HashMap;

use sqlx::Arguments;
use sqlx::Row as _;
use sqlx::any::{AnyArguments, AnyRow};

use super::{Dialect, Tx, values_from};
use crate::{Result, StoreError};

/// The tables whose ids are chosen here, each with an `id` key from a sequence.
pub(super) const ID_TABLES: [&str; 3] = ["messages", "events", "runs"];

/// PostgreSQL: the next id of `table` (one per row of the statement), from its key's sequence
/// named as PostgreSQL named it when the migration created the table (`{table}_id_seq`, for an
/// identity column as for a `BIGSERIAL`; a test holds the migrated database to it). Asking
/// `pg_get_serial_sequence` instead looked the sequence up in the catalogs once per id, for
/// every message inserted: ~2 % of the database's work per message. A name given as text is
/// looked up once, when the statement is prepared.
pub(super) fn next_ids(table: &str) -> String {
    format!("nextval('{table}_id_seq')")
}

/// Ids for the rows a write transaction is about to insert.
#[derive(Default)]
pub(super) struct Ids {
    /// SQLite: each table's next id. The transaction holds the database's write lock from
    /// `BEGIN IMMEDIATE` to its end, so nobody else inserts meanwhile: the ids are read once and
    /// counted on here, and inserting them moves `sqlite_sequence` on as a default id would.
    next: Option<HashMap<&'static str, i64>>,
}

impl Ids {
    /// SQLite: reads each table's next id (`from_next`), with the transaction's `BEGIN` when
    /// it is known to insert (`SqlStore::write_with_ids`).
    pub(super) fn next_sql() -> &'static str {
        static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        SQL.get_or_init(|| {
            // AUTOINCREMENT never reuses an id: past the highest the sequence has seen and the
            // highest the table holds.
            ID_TABLES
                .iter()
                .map(|t| {
                    format!(
                        "SELECT '{t}', MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = '{t}'), 0), \
                         COALESCE((SELECT MAX(id) FROM {t}), 0)) + 1"
                    )
                })
                .collect::<Vec<_>>()
                .join(" UNION ALL ")
        })
    }

    /// The ids after the rows of `next_sql`.
    pub(super) fn from_next(rows: &[AnyRow]) -> Result<Ids> {
        let mut next = HashMap::new();
        for row in rows {
            let (table, id): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
            if let Some(&t) = ID_TABLES.iter().find(|&&t| t == table) {
                next.insert(t, id);
            }
        }
        match ID_TABLES.iter().find(|t| !next.contains_key(*t)) {
            Some(t) => Err(StoreError::Corrupt(format!("no next id of table {t}"))),
            None => Ok(Ids { next: Some(next) }),
        }
    }

    /// `n` new ids of each table asked for, in the order asked.
    pub(super) async fn take(&mut self, tx: &mut Tx, wanted: &[(&'static str, usize)]) -> Result<Vec<Vec<i64>>> {
        debug_assert!(wanted.iter().all(|(table, _)| ID_TABLES.contains(table)));
        if wanted.iter().all(|&(_, n)| n == 0) {
            // A group of claims and records only: no round trip.
            return Ok(vec![Vec::new(); wanted.len()]);
        }
        match tx.dialect {
            Dialect::Sqlite => {
                if self.next.is_none() {
                    let rows = sqlx::query(sqlx::AssertSqlSafe(Ids::next_sql())).fetch_all(&mut **tx).await?;
                    *self = Ids::from_next(&rows)?;
                }
                let next = self.next.as_mut().expect("read above");
                Ok(wanted
                    .iter()
                    .map(|&(table, n)| {
                        let first = next[table];
                        next.insert(table, first + n as i64);
                        (first..first + n as i64).collect()
                    })
                    .collect())
            }
            Dialect::Postgres => {
                // The sequences hand out each id once, whatever other services take meanwhile.
                let mut out = vec![Vec::new(); wanted.len()];
                let parts: Vec<String> = wanted
                    .iter()
                    .enumerate()
                    .map(|(i, (table, _))| {
                        format!(
                            "SELECT CAST({i} AS BIGINT), {} FROM generate_series(1, CAST(${} AS BIGINT))",
                            next_ids(table),
                            i + 1
                        )
                    })
                    .collect();
                let mut query = sqlx::query_as::<_, (i64, i64)>(sqlx::AssertSqlSafe(parts.join(" UNION ALL ")));
                for &(_, n) in wanted {
                    query = query.bind(n as i64);
                }
                for (i, id) in query.fetch_all(&mut **tx).await? {
                    out[i as usize].push(id);
                }
                if out.iter().zip(wanted).any(|(ids, &(_, n))| ids.len() != n) {
                    return Err(StoreError::Corrupt("a sequence gave fewer ids than asked for".into()));
                }
                Ok(out)
            }
        }
    }
}

/// Most parameters one round trip carries: below SQLite's 32,766 in a statement and
/// PostgreSQL's 65,535.
const MOST_PARAMETERS: usize = 30_000;

/// Statements sent together, in the order added (a row's parents before it); past
/// `MOST_PARAMETERS` they go in more round trips, still in that order.
#[derive(Default)]
pub(super) struct Writes {
    trips: Vec<Trip>,
    /// A value the driver could not encode (none of the types bound here can fail).
    error: Option<sqlx::error::BoxDynError>,
    /// Wake every service's workers at commit (`wake_on_commit`).
    wake: bool,
    /// How many messages the writes insert (`wake_on_commit`).
    messages: usize,
}

#[derive(Default)]
struct Trip {
    statements: Vec<String>,
    args: AnyArguments,
}

/// The values of one row, bound in the order of its `?1` .. `?width`.
pub(super) struct Row<'a> {
    args: &'a mut AnyArguments,
    error: &'a mut Option<sqlx::error::BoxDynError>,
}

impl Row<'_> {
    pub(super) fn bind<'q, T: sqlx::Encode<'q, sqlx::Any> + sqlx::Type<sqlx::Any>>(&mut self, value: T) -> &mut Self {
        if let Err(e) = self.args.add(value) {
            self.error.get_or_insert(e);
        }
        self
    }
}

impl Writes {
    /// `INSERT INTO {into} VALUES` with a row for each item: `row` names its values `?1` ..
    /// `?width` (as `values` does) and `bind` binds an item's, in that order.
    pub(super) fn rows<T>(
        &mut self,
        into: &str,
        row: &str,
        width: usize,
        items: &[T],
        bind: impl FnMut(&mut Row<'_>, &T),
    ) {
        self.inserts(|rows| format!("INSERT INTO {into} VALUES {rows}"), row, width, items, bind);
    }

    /// `rows`, each row's values read as `v.column1` .. `v.column{width}` by `select` (`SELECT
    /// .. FROM` another part of the statement), joined to `(VALUES ..) AS v`, and its result
    /// inserted. A value `rows` would compute for each row with a subquery (an id taken by an
    /// earlier part) is a join here: PostgreSQL sets a subquery up for each row it appears in,
    /// which was most of the work of starting such an insert.
    pub(super) fn rows_joined<T>(
        &mut self,
        into: &str,
        select: &str,
        row: &str,
        width: usize,
        items: &[T],
        bind: impl FnMut(&mut Row<'_>, &T),
    ) {
        self.inserts(|rows| format!("INSERT INTO {into} {select}, (VALUES {rows}) AS v"), row, width, items, bind);
    }

    /// The inserts of `items`, as many rows to a statement as the parameters allow: `statement`
    /// writes one around its rows.
    fn inserts<T>(
        &mut self,
        statement: impl Fn(String) -> String,
        row: &str,
        width: usize,
        items: &[T],
        mut bind: impl FnMut(&mut Row<'_>, &T),
    ) {
        for chunk in items.chunks(MOST_PARAMETERS / width) {
            let trip = room_for(&mut self.trips, chunk.len() * width);
            trip.statements.push(statement(values_from(trip.args.len(), chunk.len(), width, row)));
            for item in chunk {
                bind(&mut Row { args: &mut trip.args, error: &mut self.error }, item);
            }
        }
    }

    /// One statement (no rows come back) whose values are `?1` .. `?width`, bound by `bind`.
    pub(super) fn statement(&mut self, sql: &str, width: usize, bind: impl FnOnce(&mut Row<'_>)) {
        let trip = room_for(&mut self.trips, width);
        let sql = values_from(trip.args.len(), 1, width, sql);
        trip.statements.push(sql);
        bind(&mut Row { args: &mut trip.args, error: &mut self.error });
    }

    /// Wakes the idle workers of every service sharing a PostgreSQL database once the
    /// transaction commits (for `messages` more messages): a NOTIFY in the last round trip,
    /// which PostgreSQL delivers at the commit (once, however many ask in one transaction;
    /// never if it rolls back). A separate NOTIFY after each commit was a round trip of its own,
    /// with a pooled connection's pings, for every enqueue. SQLite's services are woken locally.
    pub(super) fn wake_on_commit(&mut self, messages: usize) {
        self.wake = true;
        self.messages += messages;
    }

    /// Keeps the NOTIFY only if `others` (given how many messages) says the other services are
    /// needed for them (`SqlStore::wake_others`); else this process's workers, woken locally,
    /// take them.
    pub(super) fn wake_only_if(&mut self, others: impl FnOnce(usize) -> bool) {
        self.wake = self.wake && others(self.messages);
    }

    /// Whether the commit is to wake the services (`wake_on_commit`, `wake_only_if`).
    pub(super) fn wakes(&self) -> bool {
        self.wake
    }

    /// PostgreSQL: the statements as one, after `with` (more `WITH` parts, or none) and ending
    /// in `select`, or `None` when their parameters need more than one round trip. The
    /// statements are its parts `part0`, `part1`... in the order added; a part may use the
    /// ones before it and `with`'s. Run outside a transaction, the statement is one on its own:
    /// atomic, and durable at its end, without the round trips of `BEGIN` and `COMMIT`. The
    /// wake-up (`wakes`) is the caller's to place: a `WITH` part that no other part uses and
    /// that modifies nothing is never run.
    pub(super) fn into_one_statement(mut self, with: &str, select: &str) -> Result<Option<(String, AnyArguments)>> {
        if let Some(e) = self.error {
            return Err(sqlx::Error::Encode(e).into());
        }
        if self.trips.len() != 1 {
            return Ok(None);
        }
        let trip = self.trips.pop().expect("one trip");
        let mut parts: Vec<String> =
            trip.statements.iter().enumerate().map(|(i, s)| format!("part{i} AS ({s})")).collect();
        if !with.is_empty() {
            parts.insert(0, with.to_string());
        }
        Ok(Some((format!("WITH {} {select}", parts.join(", ")), trip.args)))
    }

    /// Sends the writes and commits `tx`. SQLite: the `COMMIT` goes with the last round trip.
    pub(super) async fn commit(mut self, mut tx: Tx) -> Result<()> {
        match self.trips.last_mut() {
            Some(last) if tx.dialect == Dialect::Sqlite && self.error.is_none() => {
                last.statements.push("COMMIT".into());
                self.execute(&mut tx).await?;
                tx.ended();
            }
            _ => {
                self.execute(&mut tx).await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Runs the statements, in as few round trips as their parameters allow.
    pub(super) async fn execute(self, tx: &mut Tx) -> Result<()> {
        self.run(tx, false).await.map(drop)
    }

    /// `execute`, and the rows its last statement returns.
    pub(super) async fn fetch_last(self, tx: &mut Tx) -> Result<Vec<AnyRow>> {
        self.run(tx, true).await
    }

    /// How many parameters the writes bind.
    #[cfg(test)]
    pub(super) fn parameters(&self) -> usize {
        self.trips.iter().map(|t| t.args.len()).sum()
    }

    /// The statements of each round trip as SQLite is sent them.
    #[cfg(test)]
    pub(super) fn sqlite_texts(&self) -> Vec<String> {
        self.trips.iter().map(|t| anonymous(t.statements.join(";\n"), t.args.len())).collect()
    }

    async fn run(self, tx: &mut Tx, fetch: bool) -> Result<Vec<AnyRow>> {
        debug_assert!(!(fetch && self.wake), "the wake-up would be the last statement");
        if let Some(e) = self.error {
            return Err(sqlx::Error::Encode(e).into());
        }
        let trips = self.trips.len();
        let mut rows = Vec::new();
        for (i, mut trip) in self.trips.into_iter().enumerate() {
            let last = i + 1 == trips;
            if self.wake && tx.dialect == Dialect::Postgres && last {
                trip.statements.push(format!("SELECT pg_notify('{}', '{}')", super::WAKE_CHANNEL, tx.wake_origin));
            }
            let sql = match tx.dialect {
                Dialect::Sqlite => anonymous(trip.statements.join(";\n"), trip.args.len()),
                Dialect::Postgres => {
                    // Every part sees the database as the statement began, and a foreign key
                    // is checked once the whole statement has run: a recipient may point at a
                    // message a part before it inserts.
                    let (last, parts) = trip.statements.split_last().expect("a trip has a statement");
                    let parts: Vec<String> =
                        parts.iter().enumerate().map(|(i, s)| format!("part{i} AS ({s})")).collect();
                    if parts.is_empty() { last.clone() } else { format!("WITH {} {last}", parts.join(", ")) }
                }
            };
            let query = sqlx::query_with(sqlx::AssertSqlSafe(sql), trip.args);
            if fetch && last {
                rows = query.fetch_all(&mut **tx).await?;
            } else {
                query.execute(&mut **tx).await?;
            }
        }
        Ok(rows)
    }
}

/// SQLite: `sql` with its parameters `$1` .. `$count` written as anonymous `?`, when they
/// appear in that order, each once (as `Writes` numbers them); else `sql` as it is. The driver
/// binds each parameter by asking SQLite for its name, which SQLite finds by walking the list
/// of every name in the statement: a statement of n named parameters took n²/2 steps to bind
/// (a group's inserts have hundreds), a few percent of the writer's time while it holds the
/// database's write lock. Anonymous parameters have no names to walk.
fn anonymous(sql: String, count: usize) -> String {
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let (mut next, mut quoted, mut copied, mut i) = (1, false, 0, 0);
    while i < bytes.len() {
        match bytes[i] {
            // A `$` in a string literal is text, not a parameter.
            b'\'' => quoted = !quoted,
            b'$' if !quoted => {
                let digits = bytes[i + 1..].iter().take_while(|b| b.is_ascii_digit()).count();
                if digits > 0 {
                    if sql[i + 1..i + 1 + digits].parse::<usize>() != Ok(next) {
                        return sql;
                    }
                    out.push_str(&sql[copied..i]);
                    out.push('?');
                    next += 1;
                    i += 1 + digits;
                    copied = i;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    if next != count + 1 {
        return sql;
    }
    out.push_str(&sql[copied..]);
    out
}

/// The round trip the next `parameters` go in: the last, or a new one when they would not fit.
fn room_for(trips: &mut Vec<Trip>, parameters: usize) -> &mut Trip {
    let fits = trips.last().is_some_and(|t| t.args.len() + parameters <= MOST_PARAMETERS);
    if !fits {
        trips.push(Trip::default());
    }
    trips.last_mut().expect("pushed above")
}

#[cfg(test)]
mod tests {
    use super::{ID_TABLES, anonymous, next_ids};
    use crate::sql::{Dialect, SqlStore};

    /// The name `next_ids` gives is the sequence of each table's key in a migrated database:
    /// an id it takes is the one the key's own sequence reports as its latest.
    #[tokio::test]
    async fn ids_are_taken_from_each_tables_own_sequence() {
        let Some(db) = panel_testlab::TestDatabase::create() else { return };
        let store = SqlStore::open(&db.url, Dialect::Postgres).await.unwrap();
        let mut conn = store.pool.acquire().await.unwrap();
        for table in ID_TABLES {
            let sql = format!("SELECT {}, currval(pg_get_serial_sequence('{table}', 'id'))", next_ids(table));
            let (taken, latest): (i64, i64) =
                sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_one(&mut *conn).await.unwrap();
            assert_eq!(taken, latest, "{table}");
        }
    }

    #[test]
    fn parameters_in_order_each_once_become_anonymous() {
        let sql = "INSERT INTO t VALUES ($1, $2, 'x'), ($3, $4, 'x');\nINSERT INTO u VALUES ($5)".to_string();
        assert_eq!(anonymous(sql, 5), "INSERT INTO t VALUES (?, ?, 'x'), (?, ?, 'x');\nINSERT INTO u VALUES (?)");
    }

    #[test]
    fn a_statement_that_names_a_parameter_twice_or_out_of_order_keeps_its_names() {
        for sql in ["VALUES ($1, $2, $2)", "VALUES ($2, $1)", "VALUES ($1, $3)", "VALUES ($1)"] {
            assert_eq!(anonymous(sql.to_string(), 2), sql, "{sql}");
        }
    }

    #[test]
    fn a_dollar_in_a_string_literal_is_text() {
        let sql = "SELECT '$1 costs $2', $1, json_extract(x, '$.a')".to_string();
        assert_eq!(anonymous(sql, 1), "SELECT '$1 costs $2', ?, json_extract(x, '$.a')");
    }
}
