//! What the process-level tests share: the sink under test read back the way its
//! readers (and an operator) would, and `shapesync` child processes.

#![allow(dead_code)] // each test file uses its own part

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub const REDIS: &str = "redis://127.0.0.1:6379";
pub const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Runs a query future from a synchronous test body (multi-threaded runtime).
pub fn wait<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

/// `shapesync run <file>` in the background, its log (JSON lines) written to `log`.
pub fn spawn_run(file: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_shapesync"))
        .args(["--log-format", "json", "run"])
        .arg(file)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// `shapesync run --once <file>`, which must succeed (its stderr shows otherwise).
pub fn run_once(file: &Path) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_shapesync")).args(["run", "--once"]).arg(file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[allow(unused_imports)] // each test file uses its own part
pub use shapesync_reliability::{OwnRedis, free_port};

/// Every key matching `pattern`, sorted.
pub fn keys(con: &mut redis::Connection, pattern: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query(con)
            .unwrap();
        out.extend(batch);
        if next == 0 {
            out.sort();
            return out;
        }
        cursor = next;
    }
}

/// The lease as the store holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub owner: String,
    pub epoch: u64,
    pub held: bool,
}

impl Lease {
    /// The pid in an instance id `<host>-<pid>-<random>`.
    pub fn owner_pid(&self) -> Option<u32> {
        self.owner.rsplit('-').nth(1)?.parse().ok()
    }
}

/// A sink a pipeline `pipeline` writes rows of table `table` (columns `id int8`,
/// `title text`) into.
pub enum Store {
    /// `layout` is the sink's `layout:` (`hash`, `json` or `table`).
    Redis {
        url: String,
        con: redis::Connection,
        prefix: String,
        layout: &'static str,
    },
    Sqlite {
        path: PathBuf,
    },
    Postgres {
        pool: sqlx::PgPool,
        schema: String,
    },
}

/// A store plus the names the test's pipeline uses.
pub struct Target {
    pub store: Store,
    pub pipeline: String,
    pub table: String,
}

impl Target {
    pub fn redis(pipeline: &str, table: &str, test: &str) -> Target {
        Target::redis_at(REDIS, pipeline, table, test)
    }

    pub fn redis_at(url: &str, pipeline: &str, table: &str, test: &str) -> Target {
        Target::redis_layout(url, pipeline, table, test, "hash")
    }

    /// A Redis target with the given row layout (`hash`, `json` or `table`).
    pub fn redis_layout(url: &str, pipeline: &str, table: &str, test: &str, layout: &'static str) -> Target {
        let prefix = format!("test:{}:{test}:", std::process::id());
        let con = redis::Client::open(url).unwrap().get_connection().unwrap();
        let store = Store::Redis { url: url.into(), con, prefix, layout };
        Target { store, pipeline: pipeline.into(), table: table.into() }
    }

    pub fn sqlite(pipeline: &str, table: &str, dir: &Path) -> Target {
        let store = Store::Sqlite { path: dir.join(format!("{pipeline}.db")) };
        Target { store, pipeline: pipeline.into(), table: table.into() }
    }

    pub async fn postgres(pipeline: &str, table: &str, test: &str) -> Target {
        let pool = sqlx::PgPool::connect(POSTGRES).await.expect("local Postgres, database `test`");
        let schema = format!("shapesync_{test}_{}", std::process::id());
        let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&pool).await.unwrap();
        Target { store: Store::Postgres { pool, schema }, pipeline: pipeline.into(), table: table.into() }
    }

    /// Another view of the same store, on its own connection (for a concurrent reader).
    pub fn reader(&self) -> Target {
        let store = match &self.store {
            Store::Redis { url, prefix, layout, .. } => {
                let con = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
                Store::Redis { url: url.clone(), con, prefix: prefix.clone(), layout }
            }
            Store::Sqlite { path } => Store::Sqlite { path: path.clone() },
            Store::Postgres { pool, schema } => {
                Store::Postgres { pool: pool.clone(), schema: schema.clone() }
            }
        };
        Target { store, pipeline: self.pipeline.clone(), table: self.table.clone() }
    }

    /// Opens the store's connection again (after a server restart).
    pub fn reconnect(&mut self) {
        *self = self.reader();
    }

    /// The pipeline file's `sink:` mapping.
    pub fn sink_yaml(&self) -> String {
        match &self.store {
            Store::Redis { url, prefix, layout, .. } => {
                format!("{{type: redis, url: '{url}', prefix: '{prefix}', part_size: 50, layout: {layout}}}")
            }
            Store::Sqlite { path } => format!("{{type: sqlite, path: '{}'}}", path.display()),
            Store::Postgres { schema, .. } => {
                format!("{{type: postgres, url: '{POSTGRES}', schema: {schema}}}")
            }
        }
    }

    /// The stored checkpoint JSON.
    pub fn checkpoint(&mut self) -> Option<String> {
        let pipeline = &self.pipeline;
        match &mut self.store {
            Store::Redis { con, prefix, .. } => {
                redis::cmd("GET").arg(format!("{prefix}shapesync:{pipeline}:checkpoint")).query(con).unwrap()
            }
            Store::Sqlite { path } => {
                let conn = sqlite(path)?;
                conn.query_row(
                    "SELECT checkpoint FROM _shapesync_checkpoints WHERE pipeline = ?1",
                    [pipeline],
                    |r| r.get(0),
                )
                .ok()
            }
            Store::Postgres { pool, schema } => {
                let sql =
                    format!("SELECT checkpoint FROM {schema}._shapesync_checkpoints WHERE pipeline = $1");
                wait(
                    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                        .bind(pipeline.as_str())
                        .fetch_optional(&*pool),
                )
                .unwrap_or(None)
            }
        }
    }

    /// The pipeline's lease.
    pub fn lease(&mut self) -> Option<Lease> {
        let pipeline = &self.pipeline;
        match &mut self.store {
            Store::Redis { con, prefix, .. } => {
                let key = format!("{prefix}shapesync:{pipeline}:lease");
                let (owner, epoch, expires): (Option<String>, Option<u64>, Option<u64>) = redis::cmd("HMGET")
                    .arg(&key)
                    .arg("owner")
                    .arg("epoch")
                    .arg("expires")
                    .query(con)
                    .unwrap();
                let (secs, micros): (u64, u64) = redis::cmd("TIME").query(con).unwrap();
                let now = secs * 1000 + micros / 1000;
                Some(Lease { owner: owner?, epoch: epoch?, held: expires? > now })
            }
            Store::Sqlite { path } => {
                let conn = sqlite(path)?;
                let now =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
                        as i64;
                conn.query_row(
                    "SELECT owner, epoch, expires_at_ms FROM _shapesync_leases WHERE pipeline = ?1",
                    [pipeline],
                    |r| {
                        Ok(Lease {
                            owner: r.get(0)?,
                            epoch: r.get::<_, i64>(1)? as u64,
                            held: r.get::<_, i64>(2)? > now,
                        })
                    },
                )
                .ok()
            }
            Store::Postgres { pool, schema } => {
                let sql = format!(
                    "SELECT owner, epoch, expires_at_ms > (extract(epoch from clock_timestamp()) * 1000)::int8
                     FROM {schema}._shapesync_leases WHERE pipeline = $1 AND owner <> ''"
                );
                let row: Option<(String, i64, bool)> = wait(
                    sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(pipeline.as_str()).fetch_optional(&*pool),
                )
                .unwrap_or(None);
                row.map(|(owner, epoch, held)| Lease { owner, epoch: epoch as u64, held })
            }
        }
    }

    /// Every stored row: id → title.
    pub fn rows(&mut self) -> BTreeMap<u64, String> {
        let table = &self.table;
        match &mut self.store {
            Store::Redis { con, prefix, layout: "json", .. } => keys(con, &format!("{prefix}{table}:*"))
                .into_iter()
                .filter_map(|key| {
                    let json: Option<String> = redis::cmd("GET").arg(&key).query(con).unwrap();
                    let row: serde_json::Value = serde_json::from_str(&json?).unwrap();
                    let id = row["id"].as_u64().unwrap();
                    assert_eq!(key, format!("{prefix}{table}:{id}"), "the key matches the row");
                    Some((id, row["title"].as_str().unwrap_or_default().to_owned()))
                })
                .collect(),
            Store::Redis { con, prefix, layout: "table", .. } => {
                let fields: BTreeMap<String, String> =
                    redis::cmd("HGETALL").arg(format!("{prefix}{table}")).query(con).unwrap();
                fields
                    .into_iter()
                    .map(|(field, json)| {
                        let row: serde_json::Value = serde_json::from_str(&json).unwrap();
                        let id = row["id"].as_u64().unwrap();
                        assert_eq!(field, id.to_string(), "the field matches the row");
                        (id, row["title"].as_str().unwrap_or_default().to_owned())
                    })
                    .collect()
            }
            Store::Redis { con, prefix, .. } => keys(con, &format!("{prefix}{table}:*"))
                .into_iter()
                .filter_map(|key| {
                    let row: BTreeMap<String, String> = redis::cmd("HGETALL").arg(&key).query(con).unwrap();
                    // A row deleted between SCAN and HGETALL reads as empty.
                    let id: u64 = row.get("id")?.parse().unwrap();
                    assert_eq!(key, format!("{prefix}{table}:{id}"), "the key matches the row");
                    Some((id, row.get("title").cloned().unwrap_or_default()))
                })
                .collect(),
            Store::Sqlite { path } => {
                let Some(conn) = sqlite(path) else { return BTreeMap::new() };
                let Ok(mut stmt) = conn.prepare(&format!("SELECT id, title FROM {table}")) else {
                    return BTreeMap::new();
                };
                stmt.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap()
            }
            Store::Postgres { pool, schema } => {
                let sql = format!("SELECT id, title FROM {schema}.{table}");
                let rows: Vec<(i64, String)> =
                    wait(sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(&*pool)).unwrap_or_default();
                rows.into_iter().map(|(id, title)| (id as u64, title)).collect()
            }
        }
    }

    /// How many of the rows with ids `1..=n` the store holds, read at one instant (one
    /// command, one query), as a reader of the cache would see it.
    pub fn present(&mut self, n: u64) -> u64 {
        let table = &self.table;
        match &mut self.store {
            Store::Redis { con, prefix, .. } => {
                let mut exists = redis::cmd("EXISTS");
                for id in 1..=n {
                    exists.arg(format!("{prefix}{table}:{id}"));
                }
                exists.query(con).unwrap()
            }
            Store::Sqlite { path } => sqlite(path)
                .and_then(|conn| {
                    conn.query_row(&format!("SELECT count(*) FROM {table} WHERE id <= ?1"), [n as i64], |r| {
                        r.get::<_, i64>(0)
                    })
                    .ok()
                })
                .map_or(0, |c| c as u64),
            Store::Postgres { pool, schema } => {
                let sql = format!("SELECT count(*) FROM {schema}.{table} WHERE id <= $1");
                match wait(
                    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql)).bind(n as i64).fetch_one(&*pool),
                ) {
                    Ok(count) => count as u64,
                    Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P01") => 0, // not yet created
                    Err(e) => panic!("cannot read the table: {e}"),
                }
            }
        }
    }

    /// Sink-specific bookkeeping agrees with the rows.
    pub fn check_bookkeeping(&mut self, rows: usize) {
        let pipeline = &self.pipeline;
        if let Store::Redis { con, prefix, .. } = &mut self.store {
            let members: usize =
                redis::cmd("HLEN").arg(format!("{prefix}shapesync:{pipeline}:members")).query(con).unwrap();
            assert_eq!(members, rows, "membership matches the rows");
        }
    }

    pub fn cleanup(&mut self) {
        match &mut self.store {
            Store::Redis { con, prefix, .. } => {
                let all = keys(con, &format!("{prefix}*"));
                if !all.is_empty() {
                    let _: () = redis::cmd("UNLINK").arg(&all).query(con).unwrap();
                }
            }
            Store::Sqlite { .. } => {}
            Store::Postgres { pool, schema } => {
                let sql = format!("DROP SCHEMA {schema} CASCADE");
                wait(sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&*pool)).unwrap();
            }
        }
    }
}

/// A read-only connection to a SQLite file that may not exist yet.
fn sqlite(path: &Path) -> Option<rusqlite::Connection> {
    if !path.exists() {
        return None;
    }
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    conn.busy_timeout(std::time::Duration::from_secs(5)).ok()?;
    Some(conn)
}

/// A checkpoint's place in the pipeline's history: generation, then (within one
/// handle) offset. It never moves backwards.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub generation: u64,
    pub handle: String,
    pub offset: shapesync_core::Offset,
}

impl Progress {
    pub fn of(checkpoint_json: &str) -> Progress {
        let cp = shapesync_core::Checkpoint::from_json(checkpoint_json).expect("a readable checkpoint");
        Progress { generation: cp.generation, handle: cp.handle, offset: cp.offset }
    }

    /// Panics if `next` is behind `self`.
    pub fn assert_not_behind(&self, next: &Progress) {
        assert!(
            next.generation >= self.generation,
            "the checkpoint went back a generation: {self:?} -> {next:?}"
        );
        if next.generation == self.generation && next.handle == self.handle {
            assert!(next.offset >= self.offset, "the checkpoint went back: {self:?} -> {next:?}");
        }
    }
}
