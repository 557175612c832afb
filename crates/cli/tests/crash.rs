//! The mission's promise, end to end: kill `shapesync run` (SIGKILL) at arbitrary moments
//! — mid-snapshot, mid-resync, mid-live — while the shape changes and rotates under it;
//! after a final `run --once` the sink holds exactly the shape's rows. Run against Redis
//! against a SQLite file and against a second Postgres.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;
use shapesync_testkit::{Column, ServerOptions, TableDef, TestServer};

const REDIS: &str = "redis://127.0.0.1:6379";
const DEADLINE: Duration = Duration::from_secs(30);

fn keys(con: &mut redis::Connection, pattern: &str) -> Vec<String> {
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

fn spawn(file: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_shapesync"))
        .args(["run", file])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The sink under test, read back the way its readers would.
enum Store {
    Redis { con: redis::Connection, prefix: String },
    Sqlite { path: PathBuf },
    Postgres { pool: sqlx::PgPool, schema: String },
}

/// Runs a query future from the synchronous test body.
fn wait<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";

impl Store {
    /// The pipeline file's `sink:` mapping.
    fn sink_yaml(&self) -> String {
        match self {
            Store::Redis { prefix, .. } => {
                format!("{{type: redis, url: '{REDIS}', prefix: '{prefix}', part_size: 50}}")
            }
            Store::Sqlite { path } => format!("{{type: sqlite, path: '{}'}}", path.display()),
            Store::Postgres { schema, .. } => {
                format!("{{type: postgres, url: '{POSTGRES}', schema: {schema}}}")
            }
        }
    }

    /// The stored checkpoint JSON.
    fn checkpoint(&mut self) -> Option<String> {
        match self {
            Store::Redis { con, prefix } => {
                redis::cmd("GET").arg(format!("{prefix}shapesync:crash:checkpoint")).query(con).unwrap()
            }
            Store::Sqlite { path } => {
                if !path.exists() {
                    return None;
                }
                let conn = rusqlite::Connection::open(&*path).unwrap();
                conn.query_row(
                    "SELECT checkpoint FROM _shapesync_checkpoints WHERE pipeline = 'crash'",
                    [],
                    |r| r.get(0),
                )
                .ok()
            }
            Store::Postgres { pool, schema } => {
                let sql = format!(
                    "SELECT checkpoint FROM {schema}._shapesync_checkpoints WHERE pipeline = 'crash'"
                );
                wait(sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_optional(&*pool)).unwrap_or(None)
            }
        }
    }

    /// Every stored row: id → title.
    fn rows(&mut self) -> BTreeMap<u64, String> {
        match self {
            Store::Redis { con, prefix } => keys(con, &format!("{prefix}crash_items:*"))
                .into_iter()
                .map(|key| {
                    let row: BTreeMap<String, String> = redis::cmd("HGETALL").arg(&key).query(con).unwrap();
                    let id: u64 = row["id"].parse().unwrap();
                    assert_eq!(key, format!("{prefix}crash_items:{id}"), "the key matches the row");
                    (id, row.get("title").cloned().unwrap_or_default())
                })
                .collect(),
            Store::Sqlite { path } => {
                let conn = rusqlite::Connection::open(&*path).unwrap();
                let mut stmt = conn.prepare("SELECT id, title FROM crash_items").unwrap();
                stmt.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap()
            }
            Store::Postgres { pool, schema } => {
                let sql = format!("SELECT id, title FROM {schema}.crash_items");
                let rows: Vec<(i64, String)> =
                    wait(sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(&*pool)).unwrap_or_default();
                rows.into_iter().map(|(id, title)| (id as u64, title)).collect()
            }
        }
    }

    /// Sink-specific bookkeeping agrees with the rows.
    fn check_bookkeeping(&mut self, rows: usize) {
        if let Store::Redis { con, prefix } = self {
            let members: usize =
                redis::cmd("HLEN").arg(format!("{prefix}shapesync:crash:members")).query(con).unwrap();
            assert_eq!(members, rows, "membership matches the rows");
        }
    }

    fn cleanup(&mut self) {
        match self {
            Store::Redis { con, prefix } => {
                let all = keys(con, &format!("{prefix}*"));
                let _: () = redis::cmd("UNLINK").arg(&all).query(con).unwrap();
            }
            Store::Sqlite { .. } => {}
            Store::Postgres { pool, schema } => {
                let sql = format!("DROP SCHEMA {schema} CASCADE");
                wait(sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&*pool)).unwrap();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_arbitrary_moments_redis_converges_to_exactly_the_shapes_rows() {
    let prefix = format!("test:{}:crash:", std::process::id());
    let con = redis::Client::open(REDIS).unwrap().get_connection().unwrap();
    killed_at_arbitrary_moments(Store::Redis { con, prefix }, "redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_arbitrary_moments_sqlite_converges_to_exactly_the_shapes_rows() {
    let dir = tempfile::tempdir().unwrap();
    killed_at_arbitrary_moments(Store::Sqlite { path: dir.path().join("crash.db") }, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_arbitrary_moments_postgres_converges_to_exactly_the_shapes_rows() {
    let pool = sqlx::PgPool::connect(POSTGRES).await.expect("local Postgres, database `test`");
    let schema = format!("shapesync_crash_{}", std::process::id());
    let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&pool).await.unwrap();
    killed_at_arbitrary_moments(Store::Postgres { pool, schema }, "postgres").await;
}

async fn killed_at_arbitrary_moments(mut store: Store, name: &str) {
    let server = TestServer::start(ServerOptions {
        chunk_bytes: 16 * 1024, // many snapshot chunks, so kills land mid-snapshot
        long_poll_timeout: Duration::from_millis(200),
        ..Default::default()
    })
    .await
    .unwrap();
    let table = server.create_table(
        TableDef::new("crash_items")
            .column(Column::new("id", "int8").primary_key().not_null())
            .column(Column::new("title", "text")),
    );
    let mut expected: BTreeMap<u64, String> = (1..=20_000).map(|i| (i, format!("title {i}"))).collect();
    table.seed(expected.iter().map(|(i, t)| json!({"id": i.to_string(), "title": t})));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{name}.yaml"));
    std::fs::write(
        &file,
        format!(
            "lease: {{ttl_ms: 500, poll_ms: 100}}\npipelines:\n  crash:\n    source: {{type: electric, url: '{}', table: crash_items}}\n    sink: {}\n",
            server.url(),
            store.sink_yaml()
        ),
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let mut rng = rand::rng();
    for (round, next_id) in (0..6).zip(20_001u64..) {
        let before = store.checkpoint();
        let mut child = spawn(file);
        // Let this run commit something, then kill it at a random moment after.
        let started = Instant::now();
        loop {
            let now = store.checkpoint();
            if now.is_some() && now != before {
                break;
            }
            assert!(started.elapsed() < DEADLINE, "round {round}: no progress");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..80))).await;
        child.kill().unwrap();
        child.wait().unwrap();
        let at = store.checkpoint();
        let rows = store.rows().len();
        eprintln!(
            "round {round}: killed with {rows} rows stored, checkpoint {}",
            at.as_deref().map_or("none".into(), |c| c.chars().take(120).collect::<String>())
        );

        // The shape moves on while shapesync is down: updates, deletes, inserts,
        // and every other round a rotation (409 → resync with mark and sweep).
        let mut tx = table.transaction();
        for _ in 0..20 {
            let id = rng.random_range(1..next_id);
            if let Some(stored) = expected.get_mut(&id) {
                if rng.random_bool(0.5) {
                    tx = tx.delete(json!({"id": id.to_string()}));
                    expected.remove(&id);
                } else {
                    *stored = format!("title {id} round {round}");
                    tx = tx.update(json!({"id": id.to_string(), "title": stored.clone()}));
                }
            }
        }
        let title = format!("title {next_id}");
        tx = tx.insert(json!({"id": next_id.to_string(), "title": title}));
        expected.insert(next_id, title);
        tx.commit();
        if round % 2 == 1 {
            table.rotate();
        }
    }

    let out = Command::new(env!("CARGO_BIN_EXE_shapesync")).args(["run", "--once", file]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    assert_eq!(store.rows(), expected, "exactly the shape's rows, no more, no fewer");
    store.check_bookkeeping(expected.len());
    let cp = store.checkpoint().expect("a checkpoint");
    assert!(cp.contains("\"resyncing\":false"), "{cp}");
    store.cleanup();
}
