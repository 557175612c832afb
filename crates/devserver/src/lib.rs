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
//! also how the pipeline's must-refetch path gets exercised). Transactions that
//! committed before the snapshot are skipped by their commit LSN; one racing the
//! snapshot may be applied twice, which converges (inserts and updates write whole rows).

mod decode;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value as Json;
use shapesync_shape_server::{Column, ServerOptions, ShapeServer, TableDef, TableHandle};
use shapesync_sql_table::quote;
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection, Row};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::decode::{Line, RowChange};

pub use decode::DecodeError;

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
            server: ServerOptions::default(),
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
}

/// A served table: the shape server's handle, its key columns, and the keys it holds.
struct Served {
    handle: TableHandle,
    key_columns: Vec<String>,
    keys: HashSet<Vec<Option<String>>>,
}

impl Served {
    fn key(&self, columns: &[(String, Option<String>)]) -> Vec<Option<String>> {
        self.key_columns
            .iter()
            .map(|k| columns.iter().find(|(c, _)| c == k).and_then(|(_, v)| v.clone()))
            .collect()
    }
}

fn json(columns: &[(String, Option<String>)]) -> Json {
    Json::Object(
        columns.iter().map(|(c, v)| (c.clone(), v.clone().map_or(Json::Null, Json::String))).collect(),
    )
}

/// A running devserver; dropping it stops following the database.
pub struct DevServer {
    server: ShapeServer,
    slot: String,
    cancel: CancellationToken,
    tail: JoinHandle<Result<(), DevServerError>>,
}

impl DevServer {
    /// Creates the replication slot, loads every table, and starts serving.
    pub async fn start(options: DevServerOptions) -> Result<DevServer, DevServerError> {
        let mut slot_conn = PgConnection::connect(&options.database_url).await?;
        let slot = format!("shapesync_dev_{}_{}", std::process::id(), unique());
        sqlx::query("SELECT pg_create_logical_replication_slot($1, 'test_decoding', true)")
            .bind(&slot)
            .execute(&mut slot_conn)
            .await?;

        let server = ShapeServer::start_on(options.listen, options.server.clone()).await?;
        let mut conn = PgConnection::connect(&options.database_url).await?;
        let mut tx = conn.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ").execute(&mut *tx).await?;
        let snapshot_lsn: String =
            sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&mut *tx).await?;
        let snapshot_lsn = parse_lsn(&snapshot_lsn);
        let mut served = BTreeMap::new();
        for name in &options.tables {
            let (schema, table) = name.split_once('.').unwrap_or(("public", name));
            let columns = sqlx::query(
                "SELECT a.attname::text,
                        (CASE WHEN t.typcategory = 'A' THEN et.typname ELSE t.typname END)::text,
                        (CASE WHEN t.typcategory = 'A' THEN greatest(a.attndims, 1) ELSE 0 END)::int4,
                        a.attnotnull,
                        coalesce(array_position(i.indkey::int2[], a.attnum), -1)::int4
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
                return Err(DevServerError::NoSuchTable(name.clone()));
            }
            let mut columns: Vec<(String, String, i32, bool, i32)> =
                columns.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))).collect();
            // Key columns first, in key order: the shape server numbers the key by position.
            columns.sort_by_key(|c| if c.4 >= 0 { c.4 } else { i32::MAX });
            let mut def = TableDef::new(table).in_schema(schema);
            let mut key_columns = Vec::new();
            for (column, ty, dims, not_null, pk) in &columns {
                let mut c = Column::new(column.clone(), ty.clone()).dims(*dims as u32);
                if *pk >= 0 {
                    c = c.primary_key();
                    key_columns.push(column.clone());
                }
                if *not_null {
                    c = c.not_null();
                }
                def = def.column(c);
            }
            let select: Vec<String> =
                columns.iter().map(|c| format!("{0}::text AS {0}", quote(&c.0))).collect();
            let sql = format!(
                "SELECT row_to_json(t)::text FROM (SELECT {} FROM {}.{}) t",
                select.join(", "),
                quote(schema),
                quote(table)
            );
            let rows: Vec<String> = sqlx::query_scalar(AssertSqlSafe(sql)).fetch_all(&mut *tx).await?;
            let rows: Vec<Json> =
                rows.iter().map(|r| serde_json::from_str(r).expect("Postgres writes JSON")).collect();
            let handle = server.create_table(def);
            handle.refuse_unregistered_where();
            let mut served_table = Served { handle, key_columns, keys: HashSet::new() };
            for row in &rows {
                let pairs: Vec<(String, Option<String>)> = row
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().map(str::to_owned)))
                    .collect();
                served_table.keys.insert(served_table.key(&pairs));
            }
            served_table.handle.seed(rows);
            served.insert((schema.to_owned(), table.to_owned()), served_table);
        }
        tx.commit().await?;

        let cancel = CancellationToken::new();
        let tail = tokio::spawn(follow(
            slot_conn,
            slot.clone(),
            served,
            snapshot_lsn,
            options.poll_interval,
            cancel.clone(),
        ));
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
        (&mut self.tail).await.unwrap_or(Ok(()))
    }

    /// Waits until following the database fails (it never ends otherwise).
    pub async fn failed(&mut self) -> DevServerError {
        match (&mut self.tail).await {
            Ok(Err(e)) => e,
            _ => std::future::pending().await,
        }
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// `X/Y` (hex) → a number that orders like the LSN.
fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').unwrap_or(("0", "0"));
    (u64::from_str_radix(hi, 16).unwrap_or(0) << 32) | u64::from_str_radix(lo, 16).unwrap_or(0)
}

/// Reads committed changes from the slot and applies them, a transaction at a time.
async fn follow(
    mut conn: PgConnection,
    slot: String,
    mut served: BTreeMap<(String, String), Served>,
    snapshot_lsn: u64,
    poll: Duration,
    cancel: CancellationToken,
) -> Result<(), DevServerError> {
    let mut pending: Vec<(String, String, Option<RowChange>)> = Vec::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = tokio::time::sleep(poll) => {}
        }
        let rows = sqlx::query("SELECT lsn::text, data FROM pg_logical_slot_get_changes($1, NULL, NULL)")
            .bind(&slot)
            .fetch_all(&mut conn)
            .await?;
        for row in rows {
            let lsn: String = row.get(0);
            let data: String = row.get(1);
            match decode::parse_line(&data)? {
                Line::Begin => pending.clear(),
                Line::Change { schema, table, change } => pending.push((schema, table, Some(change))),
                Line::Truncate(tables) => pending.extend(tables.into_iter().map(|(s, t)| (s, t, None))),
                // Already in the snapshot when it committed before the snapshot began.
                Line::Commit if parse_lsn(&lsn) < snapshot_lsn => pending.clear(),
                Line::Commit => apply(&mut served, std::mem::take(&mut pending)),
            }
        }
    }
}

/// Applies one source transaction: one shape server transaction per table it touched.
fn apply(served: &mut BTreeMap<(String, String), Served>, changes: Vec<(String, String, Option<RowChange>)>) {
    let mut current: Option<((String, String), shapesync_shape_server::Transaction)> = None;
    let mut ops = 0;
    let flush = |current: &mut Option<((String, String), shapesync_shape_server::Transaction)>,
                 ops: &mut usize| {
        if let Some((_, tx)) = current.take()
            && *ops > 0
        {
            tx.commit();
        }
        *ops = 0;
    };
    for (schema, table, change) in changes {
        let id = (schema, table);
        let Some(t) = served.get_mut(&id) else { continue };
        if current.as_ref().is_some_and(|(c, _)| *c != id) {
            flush(&mut current, &mut ops);
        }
        let Some(change) = change else {
            flush(&mut current, &mut ops);
            t.handle.truncate();
            t.keys.clear();
            continue;
        };
        let mut tx = match current.take() {
            Some((_, tx)) => tx,
            None => t.handle.transaction(),
        };
        match change {
            RowChange::Insert(new) | RowChange::Update { old_key: None, new } => {
                let key = t.key(&new);
                tx = if t.keys.insert(key) { tx.insert(json(&new)) } else { tx.update(json(&new)) };
                ops += 1;
            }
            RowChange::Update { old_key: Some(old), new } => {
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
        current = Some((id, tx));
    }
    flush(&mut current, &mut ops);
}
