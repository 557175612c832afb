//! An Electric-protocol server over a real Postgres, for trying shapesync and for tests
//! where Electric itself cannot run.
//!
//! [`DevServer`] serves whole tables (a `where` is refused; `columns` works) of a Postgres
//! database through `shapesync-shape-server`'s protocol engine (offsets, chunking, long-poll,
//! 409s): it loads each table's schema and rows, then follows every committed change through a
//! temporary logical replication slot with the built-in `test_decoding` plugin (so the
//! database needs `wal_level = logical`, and nothing else installed). The slot lives as
//! long as the server; stopping the server drops it.
//!
//! Not Electric: one process, rows kept in memory, no `where`, no persistence across
//! restarts (a restarted devserver is a new shape handle, so clients resync — which is
//! also how the pipeline's must-refetch path gets exercised).
//!
//! Tables that change under it: a table without a primary key is keyed by all its
//! columns, as Electric keys it, and needs `REPLICA IDENTITY FULL` (refused at start
//! otherwise, saying so); a change whose columns differ from the served ones (`ALTER
//! TABLE … ADD/DROP COLUMN`) reloads the table as a new shape, so clients refetch it
//! (a column added without any row changing after it shows once a row changes);
//! `TRUNCATE` empties it; a dropped table stops being served (its clients get 409, then
//! the 400 of a table that does not exist). If following the database fails, or its task
//! panics, every request gets a 503 naming why, [`DevServer::failed`] returns it, and it
//! is logged: the server never serves stale rows silently.
//!
//! The snapshot and the slot meet exactly: the slot is created first (it decodes every
//! transaction that commits after its consistent point, and creating it waits for the
//! transactions running then), the rows are read in one REPEATABLE READ transaction that
//! records its snapshot (`pg_current_snapshot()`), and a decoded transaction is skipped
//! exactly when that snapshot sees it (its xid below `xmin`, or below `xmax` and not in
//! progress) — the visibility rule Postgres itself applies, so no transaction is lost
//! and none is applied twice, whatever commits while the devserver starts. (A commit
//! LSN compared with `pg_current_wal_lsn()` would skip a transaction that committed
//! after the snapshot was taken but before the LSN was read.)

mod decode;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value as Json;
use shapesync_shape_server::{Column, ServerOptions, ShapeServer, TableDef, TableHandle, Tables};
use shapesync_sql_table::quote;
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection, Row};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::decode::{Columns, Line, RowChange};

pub use decode::DecodeError;

/// The most changes a served shape keeps in memory by default: past it, the shape is
/// rotated (a new handle over the current rows; clients refetch), so a long-running
/// devserver holds its tables' rows and a bounded log.
pub const DEFAULT_MAX_LOG_ENTRIES: usize = 100_000;

/// Settings of a [`DevServer`].
#[derive(Clone, Debug)]
pub struct DevServerOptions {
    /// The database to serve (`postgres://…`), with `wal_level = logical`.
    pub database_url: String,
    /// Tables to serve, as `table` (schema `public`) or `schema.table`.
    pub tables: Vec<String>,
    /// Where to listen.
    pub listen: SocketAddr,
    /// How often to read new changes from the replication slot.
    pub poll_interval: Duration,
    /// The protocol engine's settings (chunk size, long-poll timeout, …).
    pub server: ServerOptions,
}

impl DevServerOptions {
    /// Serves `tables` of `database_url` on a free loopback port.
    pub fn new(database_url: impl Into<String>, tables: Vec<String>) -> Self {
        DevServerOptions {
            database_url: database_url.into(),
            tables,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            poll_interval: Duration::from_millis(20),
            server: ServerOptions {
                max_log_entries: Some(DEFAULT_MAX_LOG_ENTRIES),
                ..ServerOptions::default()
            },
        }
    }
}

/// Why the devserver cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DevServerError {
    /// The database refused something (connecting, the slot, a query).
    #[error("postgres: {0}; check the database URL, that wal_level = logical, and that the tables exist")]
    Postgres(#[from] sqlx::Error),
    /// A table to serve does not exist or has no columns.
    #[error("table `{0}` not found; give it as `table` (schema public) or `schema.table`")]
    NoSuchTable(String),
    /// The HTTP side could not start.
    #[error(transparent)]
    Server(#[from] shapesync_shape_server::ShapeServerError),
    /// The replication stream held a line the devserver cannot read.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Postgres described its snapshot in a way the devserver cannot read.
    #[error("cannot read the snapshot `{0}` Postgres gave; the devserver needs PostgreSQL 13 or newer")]
    Snapshot(String),
    /// The replication stream gave a transaction without its id (test_decoding's
    /// `include-xids` off), so it cannot be matched with the snapshot.
    #[error("a decoded transaction carries no xid; the devserver needs test_decoding's `include-xids`")]
    NoXid,
    /// A table without a primary key whose updates and deletes do not carry the old row.
    #[error(
        "table `{0}` has no primary key, so its rows are keyed by all their columns (as Electric does), which needs the old values of every update and delete: run `ALTER TABLE {0} REPLICA IDENTITY FULL` (or add a primary key)"
    )]
    NoReplicaIdentity(String),
    /// The task following the database panicked (a bug: please report it).
    #[error("the task following the database panicked: {0}; this is a bug, please report it")]
    Panicked(String),
}

/// A served table: the shape server's handle, its columns and key columns, the keys it
/// holds, and the snapshot its rows were read under.
struct Served {
    /// `schema.table`, as given.
    name: String,
    handle: TableHandle,
    columns: HashSet<String>,
    key_columns: Vec<String>,
    keys: HashSet<Vec<Option<String>>>,
    /// The snapshot the rows were read under: a decoded transaction it sees is in them.
    snapshot: Snapshot,
}

impl Served {
    fn key(&self, columns: &[(String, Option<String>)]) -> Vec<Option<String>> {
        self.key_columns
            .iter()
            .map(|k| columns.iter().find(|(c, _)| c == k).and_then(|(_, v)| v.clone()))
            .collect()
    }

    /// Whether `change` has columns the served schema lacks, or (a new row, an updated
    /// one with its unchanged TOASTed columns) lacks some it has: the table was altered
    /// (`ADD` / `DROP COLUMN`).
    fn altered_by(&self, change: &RowChange) -> bool {
        let unknown = |columns: &Columns| columns.iter().any(|(c, _)| !self.columns.contains(c));
        match change {
            RowChange::Insert(new) => unknown(new) || new.len() != self.columns.len(),
            RowChange::Update { old_key, new, unchanged } => {
                unknown(new)
                    || old_key.as_ref().is_some_and(unknown)
                    || unchanged.iter().any(|c| !self.columns.contains(c))
                    || new.len() + unchanged.len() != self.columns.len()
            }
            RowChange::Delete(old) => old.as_ref().is_some_and(unknown),
        }
    }
}

fn json(columns: &[(String, Option<String>)]) -> Json {
    Json::Object(
        columns.iter().map(|(c, v)| (c.clone(), v.clone().map_or(Json::Null, Json::String))).collect(),
    )
}

/// Sets the session settings Electric's own connections use (`lib/electric/postgres.ex`),
/// on which the text of dates, times, intervals and floats depends: values read here
/// and decoded from the slot then come out as Electric sends them.
async fn electric_session(conn: &mut PgConnection) -> Result<(), DevServerError> {
    sqlx::raw_sql(
        "SET DateStyle = 'ISO, DMY'; SET TimeZone = 'UTC'; SET extra_float_digits = 1; SET IntervalStyle = 'iso_8601'",
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// The schema fields Electric derives from a column's type modifier (`schema.ex`
/// `add_modifier`): `max_length`, `length`, `precision`, `scale`, `fields`, or the raw
/// `type_mod` of a type it does not know.
fn modifier_fields(ty: &str, typmod: i32) -> Vec<(&'static str, Json)> {
    const TIME_TYPES: &[&str] = &["date", "time", "timetz", "timestamp", "timestamptz"];
    match ty {
        "varchar" | "text" if typmod > 0 => vec![("max_length", (typmod - 4).into())],
        "bpchar" if typmod > 0 => vec![("length", (typmod - 4).into())],
        "bit" | "varbit" => vec![("length", typmod.into())],
        "interval" if typmod > -1 => {
            let (range, precision) = ((typmod >> 16) as i16, typmod as i16);
            let mut out = Vec::new();
            const MASKS: [(&str, i32); 6] = [
                ("YEAR", 1 << 2),
                ("MONTH", 1 << 1),
                ("DAY", 1 << 3),
                ("HOUR", 1 << 10),
                ("MINUTE", 1 << 11),
                ("SECOND", 1 << 12),
            ];
            if range != 0x7fff {
                let units: Vec<&str> =
                    MASKS.iter().filter(|(_, m)| i32::from(range) & m > 0).map(|(u, _)| *u).collect();
                let fields = match units.as_slice() {
                    [one] => (*one).to_owned(),
                    [first, .., last] => format!("{first} TO {last}"),
                    [] => String::new(),
                };
                out.push(("fields", fields.into()));
            }
            if precision != -1 {
                out.push(("precision", precision.into()));
            }
            out
        }
        t if typmod > 0 && TIME_TYPES.contains(&t) => vec![("precision", typmod.into())],
        "numeric" if typmod > -1 => {
            let packed = typmod - 4;
            vec![("precision", ((packed >> 16) as i16).into()), ("scale", (packed as i16).into())]
        }
        _ if typmod > -1 => vec![("type_mod", typmod.into())],
        _ => Vec::new(),
    }
}

/// Reads table `name`'s schema and rows in a REPEATABLE READ transaction of its own, and
/// serves them as a new shape (a table served before is replaced: its clients refetch).
async fn load(conn: &mut PgConnection, tables: &Tables, name: &str) -> Result<Served, DevServerError> {
    let (schema, table) = name.split_once('.').unwrap_or(("public", name));
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ").execute(&mut *tx).await?;
    // The first statement takes the transaction's snapshot; it says which transactions
    // the rows below include.
    let snapshot: String =
        sqlx::query_scalar("SELECT pg_current_snapshot()::text").fetch_one(&mut *tx).await?;
    let snapshot = Snapshot::parse(&snapshot).ok_or(DevServerError::Snapshot(snapshot))?;
    let columns = sqlx::query(
        "SELECT a.attname::text,
                (CASE WHEN t.typcategory = 'A' THEN et.typname ELSE t.typname END)::text,
                (CASE WHEN t.typcategory = 'A' THEN greatest(a.attndims, 1) ELSE 0 END)::int4,
                a.attnotnull,
                coalesce(array_position(i.indkey::int2[], a.attnum), -1)::int4,
                c.relreplident::text,
                a.atttypmod
         FROM pg_attribute a
         JOIN pg_class c ON c.oid = a.attrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace
         JOIN pg_type t ON t.oid = a.atttypid
         LEFT JOIN pg_type et ON et.oid = t.typelem
         LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
         WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum",
    )
    .bind(schema)
    .bind(table)
    .fetch_all(&mut *tx)
    .await?;
    if columns.is_empty() {
        return Err(DevServerError::NoSuchTable(name.to_owned()));
    }
    let identity_full = columns.first().is_some_and(|r| r.get::<String, _>(5) == "f");
    let mut columns: Vec<(String, String, i32, bool, i32, i32)> =
        columns.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(6))).collect();
    // Key columns first, in key order: the shape server numbers the key by position.
    columns.sort_by_key(|c| if c.4 >= 0 { c.4 } else { i32::MAX });
    let mut def = TableDef::new(table).in_schema(schema);
    let mut key_columns = Vec::new();
    for (column, ty, dims, not_null, pk, typmod) in &columns {
        let mut c = Column::new(column.clone(), ty.clone()).dims(*dims as u32);
        for (field, value) in modifier_fields(ty, *typmod) {
            c = c.schema_field(field, value);
        }
        if *pk >= 0 {
            c = c.primary_key();
            key_columns.push(column.clone());
        }
        if *not_null {
            c = c.not_null();
        }
        def = def.column(c);
    }
    if key_columns.is_empty() {
        // Keyed by every column, as the shape server (and Electric) key such rows.
        if !identity_full {
            return Err(DevServerError::NoReplicaIdentity(name.to_owned()));
        }
        key_columns = columns.iter().map(|c| c.0.clone()).collect();
    }
    // Each value's text as Electric reads it (`shapes/querying.ex`): `::text`, but
    // `concat` for a `char(n)`, whose cast to text would strip its padding.
    let select: Vec<String> = columns
        .iter()
        .map(|c| match (c.1.as_str(), c.2) {
            ("bpchar", 0) => {
                format!("CASE WHEN {0} IS NULL THEN NULL ELSE concat({0}, '') END AS {0}", quote(&c.0))
            }
            _ => format!("{0}::text AS {0}", quote(&c.0)),
        })
        .collect();
    let sql = format!(
        "SELECT row_to_json(t)::text FROM (SELECT {} FROM {}.{}) t",
        select.join(", "),
        quote(schema),
        quote(table)
    );
    let rows: Vec<String> = sqlx::query_scalar(AssertSqlSafe(sql)).fetch_all(&mut *tx).await?;
    tx.commit().await?;
    let rows: Vec<Json> =
        rows.iter().map(|r| serde_json::from_str(r).expect("Postgres writes JSON")).collect();
    let mut served = Served {
        name: name.to_owned(),
        handle: tables.create_seeded_table(def, rows.iter().cloned()),
        columns: columns.iter().map(|c| c.0.clone()).collect(),
        key_columns,
        keys: HashSet::new(),
        snapshot,
    };
    served.handle.refuse_unregistered_where();
    for row in &rows {
        let pairs: Vec<(String, Option<String>)> = row
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.as_str().map(str::to_owned)))
            .collect();
        served.keys.insert(served.key(&pairs));
    }
    Ok(served)
}

/// A running devserver; dropping it stops following the database.
pub struct DevServer {
    server: ShapeServer,
    slot: String,
    cancel: CancellationToken,
    /// Follows the database; when that fails (or panics) it takes the server out of
    /// service and returns why.
    tail: JoinHandle<Result<(), DevServerError>>,
}

impl DevServer {
    /// Creates the replication slot, loads every table, and starts serving.
    pub async fn start(options: DevServerOptions) -> Result<DevServer, DevServerError> {
        let mut slot_conn = PgConnection::connect(&options.database_url).await?;
        let slot = format!("shapesync_dev_{}_{}", std::process::id(), unique());
        // First the slot: it decodes every transaction that commits after its consistent
        // point; the rows are read after, each table under a snapshot that says which
        // decoded transactions it already holds.
        sqlx::query("SELECT pg_create_logical_replication_slot($1, 'test_decoding', true)")
            .bind(&slot)
            .execute(&mut slot_conn)
            .await?;
        electric_session(&mut slot_conn).await?;
        // Listening at once (the address is taken, and reported, before the tables load),
        // but answering 503 until they are: a client arriving early retries.
        let starting = Some("the devserver is starting: loading its tables".to_owned());
        let server =
            ShapeServer::start_out_of_service(options.listen, options.server.clone(), starting).await?;
        let mut conn = PgConnection::connect(&options.database_url).await?;
        electric_session(&mut conn).await?;
        let mut served = BTreeMap::new();
        for name in &options.tables {
            let table = load(&mut conn, &server.tables(), name).await?;
            let (schema, table_name) = name.split_once('.').unwrap_or(("public", name));
            served.insert((schema.to_owned(), table_name.to_owned()), table);
        }
        let cancel = CancellationToken::new();
        let follower = Follower { conn, tables: server.tables(), served, poll: options.poll_interval };
        let inner = tokio::spawn(follower.run(slot_conn, slot.clone(), cancel.clone()));
        let availability = server.availability();
        availability.restore();
        let tail = tokio::spawn(async move {
            let result = match inner.await {
                Ok(result) => result,
                Err(e) => Err(DevServerError::Panicked(panic_message(e))),
            };
            if let Err(e) = &result {
                tracing::error!(error = %e, "the devserver stopped following the database; every request now gets a 503");
                availability.fail(format!("the devserver stopped following the database: {e}; restart it"));
            }
            result
        });
        Ok(DevServer { server, slot, cancel, tail })
    }

    /// The temporary replication slot it reads (`shapesync_dev_<pid>_<n>`); it goes
    /// with the server.
    pub fn slot_name(&self) -> &str {
        &self.slot
    }

    /// The shape endpoint, e.g. `http://127.0.0.1:3000/v1/shape`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Stops following the database (the slot goes with its connection) and reports
    /// whether following failed.
    pub async fn stop(mut self) -> Result<(), DevServerError> {
        self.cancel.cancel();
        (&mut self.tail).await.unwrap_or_else(|e| Err(DevServerError::Panicked(panic_message(e))))
    }

    /// Waits until following the database fails (or its task panics); it never ends
    /// otherwise. The server answers every request with a 503 from then on.
    pub async fn failed(&mut self) -> DevServerError {
        match (&mut self.tail).await {
            Ok(Err(e)) => e,
            Err(e) => DevServerError::Panicked(panic_message(e)),
            Ok(Ok(())) => std::future::pending().await,
        }
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// What a panicked task said.
fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic without a message".to_owned()),
        Err(e) => e.to_string(),
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A transaction snapshot as `pg_current_snapshot()` prints it, `xmin:xmax:xip,…` (64-bit
/// xids): which transactions the rows read under it include.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Snapshot {
    xmin: u64,
    xmax: u64,
    in_progress: HashSet<u64>,
}

impl Snapshot {
    fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.trim().split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let in_progress = match parts.next()? {
            "" => HashSet::new(),
            list => list.split(',').map(|x| x.parse().ok()).collect::<Option<_>>()?,
        };
        Some(Snapshot { xmin, xmax, in_progress })
    }

    /// The 64-bit xid of a decoded transaction's 32-bit one: the one nearest `xmax`
    /// (decoded transactions are recent), as Postgres widens xids.
    fn widen(&self, xid: u32) -> u64 {
        let epoch = self.xmax >> 32;
        let candidate = (epoch << 32) | u64::from(xid);
        let half = 1u64 << 31;
        if candidate > self.xmax.saturating_add(half) && epoch > 0 {
            candidate - (1 << 32)
        } else if candidate.saturating_add(half) < self.xmax {
            candidate + (1 << 32)
        } else {
            candidate
        }
    }

    /// Whether the rows read under this snapshot include transaction `xid`'s effects
    /// (Postgres' `pg_visible_in_snapshot`; the transaction committed, since it was
    /// decoded).
    fn sees(&self, xid: u32) -> bool {
        let xid = self.widen(xid);
        xid < self.xmin || (xid < self.xmax && !self.in_progress.contains(&xid))
    }
}

/// A served table's schema and name.
type TableId = (String, String);

/// Polls between checks that the served tables still exist.
const POLLS_PER_EXISTENCE_CHECK: u32 = 25;

/// Follows the slot: reads committed changes and applies them, a transaction at a time.
struct Follower {
    /// For reloading a table whose columns changed, and checking tables still exist.
    conn: PgConnection,
    tables: Tables,
    served: BTreeMap<TableId, Served>,
    poll: Duration,
}

impl Follower {
    async fn run(
        mut self,
        mut slot_conn: PgConnection,
        slot: String,
        cancel: CancellationToken,
    ) -> Result<(), DevServerError> {
        let mut pending: Vec<(String, String, Option<RowChange>)> = Vec::new();
        let mut xid = None;
        let mut polls = 0u32;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = tokio::time::sleep(self.poll) => {}
            }
            let rows = sqlx::query("SELECT lsn::text, data FROM pg_logical_slot_get_changes($1, NULL, NULL)")
                .bind(&slot)
                .fetch_all(&mut slot_conn)
                .await?;
            for row in rows {
                let (lsn, data): (String, String) = (row.get(0), row.get(1));
                match decode::parse_line(&data)? {
                    Line::Begin(id) => {
                        pending.clear();
                        xid = Some(id.ok_or(DevServerError::NoXid)?);
                    }
                    Line::Change { schema, table, change } => pending.push((schema, table, Some(change))),
                    Line::Truncate(tables) => pending.extend(tables.into_iter().map(|(s, t)| (s, t, None))),
                    Line::Commit => {
                        let xid = xid.take().ok_or(DevServerError::NoXid)?;
                        self.apply(xid, parse_lsn(&lsn), std::mem::take(&mut pending)).await?;
                    }
                }
            }
            polls += 1;
            if polls.is_multiple_of(POLLS_PER_EXISTENCE_CHECK) {
                self.forget_dropped_tables().await?;
            }
        }
    }

    /// Stops serving tables that no longer exist (`DROP TABLE` is not decoded): their
    /// clients get 409, then the 400 of a table that does not exist.
    async fn forget_dropped_tables(&mut self) -> Result<(), DevServerError> {
        let mut gone = Vec::new();
        for (id, table) in &self.served {
            let exists: Option<String> =
                sqlx::query_scalar("SELECT to_regclass(format('%I.%I', $1::text, $2::text))::text")
                    .bind(&id.0)
                    .bind(&id.1)
                    .fetch_one(&mut self.conn)
                    .await?;
            if exists.is_none() {
                tracing::warn!(table = %table.name, "the table was dropped; it is no longer served");
                table.handle.remove();
                gone.push(id.clone());
            }
        }
        for id in gone {
            self.served.remove(&id);
        }
        Ok(())
    }

    /// Applies source transaction `xid`, committed at `lsn`, to each table it touched
    /// (one shape server transaction per table, each at the commit's LSN and with its xid
    /// in `txids`, as Electric gives them), but to tables whose rows were read under a
    /// snapshot that already holds it. A change whose columns the served schema does not
    /// have (the table was altered) reloads that table as a new shape instead.
    async fn apply(
        &mut self,
        xid: u32,
        lsn: u64,
        changes: Vec<(String, String, Option<RowChange>)>,
    ) -> Result<(), DevServerError> {
        // Each table's changes in order, as one part (however they interleave): every part
        // carries the commit's LSN, so a table must get one, or two would share offsets.
        let mut by_table: Vec<(TableId, Vec<Option<RowChange>>)> = Vec::new();
        for (schema, table, change) in changes {
            let id = (schema, table);
            match by_table.iter_mut().find(|(t, _)| *t == id) {
                Some((_, list)) => list.push(change),
                None => by_table.push((id, vec![change])),
            }
        }
        for (id, changes) in by_table {
            let Some(t) = self.served.get_mut(&id) else { continue };
            if t.snapshot.sees(xid) {
                continue;
            }
            if changes.iter().flatten().any(|c| t.altered_by(c)) {
                tracing::info!(table = %t.name, "the table's columns changed; serving it as a new shape (clients refetch)");
                let name = t.name.clone();
                let reloaded = load(&mut self.conn, &self.tables, &name).await?;
                self.served.insert(id, reloaded); // its snapshot holds this transaction
                continue;
            }
            apply_to(t, changes, lsn, xid);
        }
        Ok(())
    }
}

/// `X/Y` (hex) → the number Electric's offsets carry for that LSN.
fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').unwrap_or(("0", "0"));
    (u64::from_str_radix(hi, 16).unwrap_or(0) << 32) | u64::from_str_radix(lo, 16).unwrap_or(0)
}

/// Applies one transaction's changes of table `t` as one shape server transaction at
/// `lsn` with txid `xid` (after a `TRUNCATE` inside it, the rest as another at the next
/// LSN the server picks).
fn apply_to(t: &mut Served, changes: Vec<Option<RowChange>>, lsn: u64, xid: u32) {
    let mut tx = t.handle.transaction().lsn(lsn).txid(u64::from(xid));
    let mut ops = 0;
    for change in changes {
        let Some(change) = change else {
            if ops > 0 {
                tx.commit();
            }
            t.handle.truncate();
            t.keys.clear();
            tx = t.handle.transaction().txid(u64::from(xid));
            ops = 0;
            continue;
        };
        match change {
            RowChange::Insert(new) | RowChange::Update { old_key: None, new, .. } => {
                let key = t.key(&new);
                tx = if t.keys.insert(key) { tx.insert(json(&new)) } else { tx.update(json(&new)) };
                ops += 1;
            }
            RowChange::Update { old_key: Some(old), new, .. } => {
                let (old_key, new_key) = (t.key(&old), t.key(&new));
                if old_key != new_key && t.keys.remove(&old_key) {
                    tx = tx.delete(json(&old));
                    ops += 1;
                }
                tx = if t.keys.insert(new_key) { tx.insert(json(&new)) } else { tx.update(json(&new)) };
                ops += 1;
            }
            RowChange::Delete(Some(old)) => {
                if t.keys.remove(&t.key(&old)) {
                    tx = tx.delete(json(&old));
                    ops += 1;
                }
            }
            RowChange::Delete(None) => {}
        }
    }
    if ops > 0 {
        tx.commit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_sees_what_committed_before_it_and_nothing_in_progress() {
        let s = Snapshot::parse("100:105:101,103").unwrap();
        assert!(s.sees(99) && s.sees(100 - 1));
        assert!(s.sees(102) && s.sees(104), "committed before the snapshot");
        assert!(!s.sees(101) && !s.sees(103), "in progress when it was taken");
        assert!(!s.sees(105) && !s.sees(200), "started after it");
        assert_eq!(Snapshot::parse("7:7:").unwrap().in_progress.len(), 0);
        assert!(Snapshot::parse("x").is_none());
        // Xids are widened to the epoch nearest xmax.
        let wrapped = Snapshot::parse(&format!("{0}:{0}:", (1u64 << 32) + 10)).unwrap();
        assert!(wrapped.sees(u32::MAX - 5), "an xid just before the epoch turned");
        assert!(!wrapped.sees(11));
    }
}
