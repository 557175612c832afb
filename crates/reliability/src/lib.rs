//! shapesync's reliability suite: everything that can go wrong, at once, while a reader
//! checks every promise.
//!
//! One pipeline file syncs one shape into Redis, a SQLite file and Postgres, run by two
//! `shapesync run` instances sharing it through leases. A writer changes the shape all
//! the time; each transaction rewrites a whole *group* of rows (same `ver` in each), so a
//! reader can tell a transaction seen half-applied. Round after round the suite SIGKILLs an
//! instance (and starts a new one), and now and then rotates the shape (409), injects a
//! protocol fault (503, 500, a body cut mid-way, malformed JSON, a response ending
//! mid-transaction, a trickle), restarts Redis empty, or terminates the Postgres sink's
//! connections. A reader looks at all three sinks the whole time:
//! - **missing:** once a sink has held every stable row, it never lacks one (except
//!   right after the suite wiped that sink itself: a Redis restarted empty);
//! - **torn:** whenever a sink's checkpoint is not mid-resync, every group's rows carry one
//!   `ver` — no transaction is seen half-applied.
//!
//! At the end the writer stops and every sink must hold exactly the shape's rows.
//! [`run`] returns the figures; `shapesync-reliability --kills 100 --seed S` prints them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use shapesync_shape_server::{Column, Fault, ServerOptions, ShapeServer, TableDef, TableHandle};

/// Rows `1..=STABLE` are never deleted, in groups of [`GROUP`] that every transaction
/// touching them rewrites whole.
const STABLE: u64 = 2_000;
/// Rows per group.
const GROUP: u64 = 5;
/// Rows above this id are inserted and deleted (churn).
const CHURN_START: u64 = 1_000_000;
const TABLE: &str = "rel_items";
const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `shapesync` binary.
    pub shapesync: PathBuf,
    /// Rounds, each ending with a SIGKILL of an instance.
    pub kills: u32,
    /// The random seed; the same seed replays the same choices (timing aside).
    pub seed: u64,
    /// `shapesync run` instances sharing the pipelines.
    pub instances: usize,
    /// How long the sinks may take to converge at the end.
    pub deadline: Duration,
}

/// What happened, and what the reader and the final comparison found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The seed of the run.
    pub seed: u64,
    /// Instances SIGKILLed.
    pub kills: u32,
    /// Shape rotations (HTTP 409).
    pub rotations: u32,
    /// Protocol faults injected.
    pub protocol_faults: u32,
    /// Redis restarts without persistence (the sink comes back empty).
    pub redis_wipes: u32,
    /// Times the Postgres sink's connections were terminated.
    pub postgres_terminations: u32,
    /// Transactions the writer committed.
    pub transactions: u64,
    /// Looks the reader took at the three sinks.
    pub looks: u64,
    /// Looks that found a stable row missing (must be 0).
    pub missing_reads: u64,
    /// Looks that found a transaction half-applied (must be 0).
    pub torn_reads: u64,
    /// Rows compared at the end (over the three sinks).
    pub rows_compared: u64,
    /// Rows that differ from the shape at the end (must be 0).
    pub divergent_rows: u64,
    /// How long the run took.
    pub duration: Duration,
    /// The first violations seen, for the report.
    pub violations: Vec<String>,
}

impl Report {
    /// Every promise held.
    pub fn passed(&self) -> bool {
        self.missing_reads == 0 && self.torn_reads == 0 && self.divergent_rows == 0
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "seed                   {}", self.seed)?;
        writeln!(f, "kills (SIGKILL)        {}", self.kills)?;
        writeln!(f, "409 rotations          {}", self.rotations)?;
        writeln!(f, "protocol faults        {}", self.protocol_faults)?;
        writeln!(f, "redis restarted empty  {}", self.redis_wipes)?;
        writeln!(f, "postgres terminations  {}", self.postgres_terminations)?;
        writeln!(f, "transactions written   {}", self.transactions)?;
        writeln!(f, "reader looks           {}", self.looks)?;
        writeln!(f, "missing-row reads      {}", self.missing_reads)?;
        writeln!(f, "torn reads             {}", self.torn_reads)?;
        writeln!(f, "rows compared          {}", self.rows_compared)?;
        writeln!(f, "divergent rows         {}", self.divergent_rows)?;
        writeln!(f, "duration               {:.1?}", self.duration)?;
        for v in &self.violations {
            writeln!(f, "violation: {v}")?;
        }
        Ok(())
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").map_or(0, |l| l.local_addr().map_or(0, |a| a.port()))
}

/// A Redis server of one's own (so it may be flushed, restarted and restored without
/// touching anyone else's keys), keeping its RDB file in `dir`.
pub struct OwnRedis {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl OwnRedis {
    /// Starts `redis-server` without persistence and waits until it answers.
    pub fn start(dir: &Path) -> anyhow::Result<OwnRedis> {
        let port = free_port();
        let child = Self::spawn(port, dir)?;
        let me = OwnRedis { port, dir: dir.into(), child };
        me.wait_up()?;
        Ok(me)
    }

    fn spawn(port: u16, dir: &Path) -> anyhow::Result<Child> {
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server (is it on PATH?)")
    }

    fn wait_up(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        while self.con().is_err() {
            if started.elapsed() > Duration::from_secs(10) {
                bail!("redis-server on port {} did not start", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A new connection.
    pub fn con(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection()
    }

    /// Stops the server without saving; it starts again from the RDB file in its
    /// directory, if there is one (empty otherwise).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if let Ok(mut con) = self.con() {
            let _ = redis::cmd("SHUTDOWN").arg("NOSAVE").query::<()>(&mut con);
        }
        self.child.wait()?;
        self.child = Self::spawn(self.port, &self.dir)?;
        self.wait_up()
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shape, and what it holds: id → (grp, ver, title).
struct Shape {
    table: TableHandle,
    rows: BTreeMap<u64, (i64, i64, String)>,
    next_churn: u64,
    tx: i64,
}

impl Shape {
    fn seed(table: TableHandle) -> Shape {
        let rows: BTreeMap<u64, (i64, i64, String)> =
            (1..=STABLE).map(|id| (id, (((id - 1) / GROUP) as i64, 0, format!("row {id}")))).collect();
        table.seed(rows.iter().map(|(id, row)| Self::json(*id, row)));
        Shape { table, rows, next_churn: CHURN_START, tx: 0 }
    }

    fn json(id: u64, (grp, ver, title): &(i64, i64, String)) -> serde_json::Value {
        json!({"id": id.to_string(), "grp": grp.to_string(), "ver": ver.to_string(), "title": title})
    }

    /// One transaction: a whole group rewritten with a new `ver`, a churn row inserted,
    /// and one deleted.
    fn change(&mut self, rng: &mut StdRng) {
        self.tx += 1;
        let grp = rng.random_range(0..STABLE / GROUP);
        let mut tx = self.table.transaction();
        for id in grp * GROUP + 1..=grp * GROUP + GROUP {
            let row = (grp as i64, self.tx, format!("row {id} tx {}", self.tx));
            tx = tx.update(Self::json(id, &row));
            self.rows.insert(id, row);
        }
        let row = (-1, self.tx, format!("churn {}", self.next_churn));
        tx = tx.insert(Self::json(self.next_churn, &row));
        self.rows.insert(self.next_churn, row);
        self.next_churn += 1;
        let churn: Vec<u64> = self.rows.range(CHURN_START..).map(|(id, _)| *id).collect();
        if churn.len() > 20 {
            let id = churn[rng.random_range(0..churn.len())];
            tx = tx.delete(json!({"id": id.to_string()}));
            self.rows.remove(&id);
        }
        tx.commit();
    }
}

/// One sink as its readers see it.
enum Sink {
    Redis { url: String, prefix: String },
    Sqlite { path: PathBuf },
    Postgres { pool: sqlx::PgPool, schema: String },
}

/// What one look at a sink found.
struct Look {
    missing: u64,
    torn: u64,
    /// A checkpoint exists and is not mid-resync.
    settled: bool,
}

/// Reads the stable rows' `ver` of each group and the checkpoint in one atomic script.
const REDIS_LOOK: &str = r"
local cp = redis.call('GET', ARGV[1])
local n, g = tonumber(ARGV[3]), tonumber(ARGV[4])
local missing, torn, first, broken = 0, 0, nil, false
for id = 1, n do
  local v = redis.call('HGET', ARGV[2] .. id, 'ver')
  if not v then missing = missing + 1 end
  if (id - 1) % g == 0 then
    if broken then torn = torn + 1 end
    first, broken = v, false
  elseif v and first and v ~= first then
    broken = true
  end
end
if broken then torn = torn + 1 end
return {missing, torn, cp or ''}
";

fn settled(checkpoint: Option<&str>) -> bool {
    checkpoint.is_some_and(|cp| !cp.is_empty() && cp.contains("\"resyncing\":false"))
}

impl Sink {
    fn name(&self) -> &'static str {
        match self {
            Sink::Redis { .. } => "redis",
            Sink::Sqlite { .. } => "sqlite",
            Sink::Postgres { .. } => "postgres",
        }
    }

    fn yaml(&self) -> String {
        match self {
            Sink::Redis { url, prefix } => {
                format!("{{type: redis, url: '{url}', prefix: '{prefix}', part_size: 100}}")
            }
            Sink::Sqlite { path } => format!("{{type: sqlite, path: '{}'}}", path.display()),
            Sink::Postgres { schema, .. } => {
                format!("{{type: postgres, url: '{POSTGRES}', schema: {schema}}}")
            }
        }
    }

    async fn look(&self) -> anyhow::Result<Look> {
        let pipeline = self.name();
        let sql = format!(
            "SELECT (SELECT checkpoint FROM _shapesync_checkpoints WHERE pipeline = '{pipeline}'),
                    (SELECT count(*) FROM {TABLE} WHERE id <= {STABLE}),
                    (SELECT count(*) FROM (SELECT grp FROM {TABLE} WHERE id <= {STABLE} GROUP BY grp HAVING min(ver) <> max(ver)) t)"
        );
        match self {
            Sink::Redis { url, prefix } => {
                let mut con = redis::Client::open(url.as_str())?.get_multiplexed_async_connection().await?;
                let (missing, torn, cp): (u64, u64, String) = redis::Script::new(REDIS_LOOK)
                    .arg(format!("{prefix}shapesync:redis:checkpoint"))
                    .arg(format!("{prefix}{TABLE}:"))
                    .arg(STABLE)
                    .arg(GROUP)
                    .invoke_async(&mut con)
                    .await?;
                Ok(Look { missing, torn, settled: settled(Some(&cp)) })
            }
            Sink::Sqlite { path } => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    let conn = rusqlite::Connection::open_with_flags(
                        &path,
                        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                    )?;
                    conn.busy_timeout(Duration::from_secs(10))?;
                    let (cp, present, torn): (Option<String>, i64, i64) =
                        conn.query_row(&sql, [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                    Ok(Look {
                        missing: STABLE - present as u64,
                        torn: torn as u64,
                        settled: settled(cp.as_deref()),
                    })
                })
                .await?
            }
            Sink::Postgres { pool, schema } => {
                let sql = sql.replace("_shapesync_checkpoints", &format!("{schema}._shapesync_checkpoints"));
                let sql = sql.replace(&format!("FROM {TABLE}"), &format!("FROM {schema}.{TABLE}"));
                let (cp, present, torn): (Option<String>, i64, i64) =
                    sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_one(pool).await?;
                Ok(Look {
                    missing: STABLE - present as u64,
                    torn: torn as u64,
                    settled: settled(cp.as_deref()),
                })
            }
        }
    }

    /// Every row: id → (grp, ver, title).
    async fn rows(&self) -> anyhow::Result<BTreeMap<u64, (i64, i64, String)>> {
        match self {
            Sink::Redis { url, prefix } => {
                let mut con = redis::Client::open(url.as_str())?.get_multiplexed_async_connection().await?;
                let mut rows = BTreeMap::new();
                let mut cursor = 0u64;
                loop {
                    let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(format!("{prefix}{TABLE}:*"))
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut con)
                        .await?;
                    for key in keys {
                        let row: BTreeMap<String, String> =
                            redis::cmd("HGETALL").arg(&key).query_async(&mut con).await?;
                        let (Some(id), Some(grp), Some(ver)) =
                            (row.get("id"), row.get("grp"), row.get("ver"))
                        else {
                            continue; // deleted between SCAN and HGETALL
                        };
                        let title = row.get("title").cloned().unwrap_or_default();
                        rows.insert(id.parse()?, (grp.parse()?, ver.parse()?, title));
                    }
                    if next == 0 {
                        return Ok(rows);
                    }
                    cursor = next;
                }
            }
            Sink::Sqlite { path } => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    let conn = rusqlite::Connection::open_with_flags(
                        &path,
                        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                    )?;
                    let mut stmt = conn.prepare(&format!("SELECT id, grp, ver, title FROM {TABLE}"))?;
                    let rows = stmt
                        .query_map([], |r| {
                            Ok((r.get::<_, i64>(0)? as u64, (r.get(1)?, r.get(2)?, r.get(3)?)))
                        })?
                        .collect::<Result<_, _>>()?;
                    Ok(rows)
                })
                .await?
            }
            Sink::Postgres { pool, schema } => {
                let sql = format!("SELECT id, grp, ver, title FROM {schema}.{TABLE}");
                let rows: Vec<(i64, i64, i64, String)> =
                    sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await?;
                Ok(rows.into_iter().map(|(id, grp, ver, title)| (id as u64, (grp, ver, title))).collect())
            }
        }
    }
}

/// Rows of `have` that differ from `want`, both ways.
fn divergent(want: &BTreeMap<u64, (i64, i64, String)>, have: &BTreeMap<u64, (i64, i64, String)>) -> u64 {
    let wrong = want.iter().filter(|(id, row)| have.get(id) != Some(row)).count();
    let extra = have.keys().filter(|id| !want.contains_key(id)).count();
    (wrong + extra) as u64
}

/// The reader's tallies.
#[derive(Default)]
struct Tally {
    looks: u64,
    missing: u64,
    torn: u64,
    violations: Vec<String>,
}

/// Looks at every sink until `stop`; `wipes[i]` counts deliberate wipes of sink `i`.
async fn watch(sinks: Arc<Vec<Sink>>, wipes: Arc<Vec<AtomicU64>>, stop: Arc<AtomicBool>) -> Tally {
    let mut tally = Tally::default();
    let mut synced = vec![false; sinks.len()];
    let mut seen_wipes = vec![0; sinks.len()];
    while !stop.load(Ordering::Relaxed) {
        tally.looks += 1;
        for (i, sink) in sinks.iter().enumerate() {
            let wiped = wipes[i].load(Ordering::SeqCst);
            if wiped != seen_wipes[i] {
                synced[i] = false; // wiped on purpose: its rows are gone until it resyncs
                seen_wipes[i] = wiped;
            }
            let Ok(look) = sink.look().await else { continue }; // a sink restarting, a table not yet made
            if wipes[i].load(Ordering::SeqCst) != wiped {
                continue; // wiped while looking
            }
            if synced[i] && look.missing > 0 {
                tally.missing += 1;
                if tally.violations.len() < 10 {
                    tally.violations.push(format!(
                        "{}: {} stable rows missing at look {}",
                        sink.name(),
                        look.missing,
                        tally.looks
                    ));
                }
            }
            if look.settled && look.torn > 0 {
                tally.torn += 1;
                if tally.violations.len() < 10 {
                    tally.violations.push(format!(
                        "{}: {} groups half-applied at look {}",
                        sink.name(),
                        look.torn,
                        tally.looks
                    ));
                }
            }
            synced[i] |= look.settled && look.missing == 0;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tally
}

/// The `shapesync run` instances, with their logs.
struct Instances {
    shapesync: PathBuf,
    file: PathBuf,
    dir: PathBuf,
    children: Vec<(Child, PathBuf)>,
    started: usize,
}

impl Instances {
    fn spawn(&mut self) -> anyhow::Result<()> {
        self.started += 1;
        let log = self.dir.join(format!("instance-{}.log", self.started));
        let child = Command::new(&self.shapesync)
            .args(["--log-format", "json", "run"])
            .arg(&self.file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot start {}", self.shapesync.display()))?;
        self.children.push((child, log));
        Ok(())
    }

    /// Tails of every instance's log, for a failure report.
    fn tails(&self) -> String {
        let mut out = String::new();
        for (child, log) in &self.children {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            out += &format!(
                "--- instance {}:\n{}\n",
                child.id(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        out
    }
}

impl Drop for Instances {
    fn drop(&mut self) {
        for (child, _) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the suite.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut report = Report { seed: options.seed, ..Report::default() };
    let dir = tempfile::tempdir()?;
    let mut redis = OwnRedis::start(dir.path())?;
    let server = ShapeServer::start(ServerOptions {
        chunk_bytes: 32 * 1024,
        long_poll_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await?;
    let table = server.create_table(
        TableDef::new(TABLE)
            .column(Column::new("id", "int8").primary_key().not_null())
            .column(Column::new("grp", "int8").not_null())
            .column(Column::new("ver", "int8").not_null())
            .column(Column::new("title", "text")),
    );
    let shape = Arc::new(Mutex::new(Shape::seed(table.clone())));

    let pool = sqlx::PgPool::connect(POSTGRES).await.context("the local Postgres (database `test`)")?;
    let schema = format!("shapesync_reliability_{}", std::process::id());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
    )))
    .execute(&pool)
    .await?;
    let sinks = Arc::new(vec![
        Sink::Redis { url: redis.url(), prefix: "rel:".into() },
        Sink::Sqlite { path: dir.path().join("cache.db") },
        Sink::Postgres { pool: pool.clone(), schema: schema.clone() },
    ]);
    let mut yaml = "lease: {ttl_ms: 1000, poll_ms: 100}\npipelines:\n".to_owned();
    for sink in sinks.iter() {
        yaml += &format!(
            "  {}:\n    source: {{type: electric, url: '{}', table: {TABLE}}}\n    sink: {}\n",
            sink.name(),
            server.url(),
            sink.yaml()
        );
    }
    let file = dir.path().join("reliability.yaml");
    std::fs::write(&file, yaml)?;
    let mut instances = Instances {
        shapesync: options.shapesync.clone(),
        file,
        dir: dir.path().into(),
        children: Vec::new(),
        started: 0,
    };
    for _ in 0..options.instances.max(1) {
        instances.spawn()?;
    }

    // The writer and the reader run throughout.
    let stop_writer = Arc::new(AtomicBool::new(false));
    let writer = {
        let (shape, stop, seed) = (shape.clone(), stop_writer.clone(), rng.random::<u64>());
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            while !stop.load(Ordering::Relaxed) {
                shape.lock().unwrap_or_else(|e| e.into_inner()).change(&mut rng);
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    let wipes: Arc<Vec<AtomicU64>> = Arc::new((0..sinks.len()).map(|_| AtomicU64::new(0)).collect());
    let stop_reader = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(watch(sinks.clone(), wipes.clone(), stop_reader.clone()));

    for _ in 0..options.kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1200))).await;
        let roll: f64 = rng.random();
        if roll < 0.12 {
            table.rotate();
            report.rotations += 1;
        } else if roll < 0.45 {
            let fault = match rng.random_range(0..6) {
                0 => Fault::ServiceUnavailable { retry_after: Some(1) },
                1 => Fault::InternalError,
                2 => Fault::DropMidBody,
                3 => Fault::MalformedJson,
                4 => Fault::EndMidTransaction,
                _ => Fault::Trickle { bytes: 512, delay: Duration::from_millis(2) },
            };
            server.inject(fault);
            report.protocol_faults += 1;
        } else if roll < 0.55 {
            wipes[0].fetch_add(1, Ordering::SeqCst);
            redis.restart()?;
            wipes[0].fetch_add(1, Ordering::SeqCst);
            report.redis_wipes += 1;
        } else if roll < 0.70 {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE application_name = 'shapesync' AND datname = current_database() AND pid <> pg_backend_pid()",
            )
            .execute(&pool)
            .await?;
            report.postgres_terminations += 1;
        }
        let victim = rng.random_range(0..instances.children.len());
        let (mut child, _) = instances.children.remove(victim);
        child.kill()?;
        child.wait()?;
        report.kills += 1;
        instances.spawn()?;
    }

    // Everything stops changing; every sink must end exactly at the shape.
    stop_writer.store(true, Ordering::Relaxed);
    writer.await?;
    let want = shape.lock().unwrap_or_else(|e| e.into_inner()).rows.clone();
    report.transactions = shape.lock().unwrap_or_else(|e| e.into_inner()).tx as u64;
    let deadline = Instant::now() + options.deadline;
    let mut last = Vec::new();
    loop {
        last.clear();
        for sink in sinks.iter() {
            let have = sink.rows().await.unwrap_or_default();
            last.push((sink.name(), divergent(&want, &have)));
        }
        if last.iter().all(|(_, n)| *n == 0) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_reader.store(true, Ordering::Relaxed);
    let tally = reader.await?;
    report.looks = tally.looks;
    report.missing_reads = tally.missing;
    report.torn_reads = tally.torn;
    report.violations = tally.violations;
    report.rows_compared = want.len() as u64 * sinks.len() as u64;
    report.divergent_rows = last.iter().map(|(_, n)| n).sum();
    for (name, n) in &last {
        if *n > 0 {
            report.violations.push(format!("{name}: {n} rows differ from the shape at the end"));
        }
    }
    if !report.passed() {
        report.violations.push(instances.tails());
    }
    for (child, _) in &instances.children {
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    }
    for (child, _) in &mut instances.children {
        let _ = child.wait();
    }
    instances.children.clear();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&pool).await?;
    report.duration = started.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reader_sees_a_missing_row_and_a_half_applied_group() {
        let dir = tempfile::tempdir().unwrap();
        let redis = OwnRedis::start(dir.path()).unwrap();
        let sink = Sink::Redis { url: redis.url(), prefix: "t:".into() };
        let mut con = redis.con().unwrap();
        let _: () = redis::cmd("SET")
            .arg("t:shapesync:redis:checkpoint")
            .arg(r#"{"resyncing":false}"#)
            .query(&mut con)
            .unwrap();
        for id in 1..=STABLE {
            let _: () =
                redis::cmd("HSET").arg(format!("t:{TABLE}:{id}")).arg("ver").arg(1).query(&mut con).unwrap();
        }
        let look = sink.look().await.unwrap();
        assert_eq!((look.missing, look.torn, look.settled), (0, 0, true));
        let _: () = redis::cmd("HSET").arg(format!("t:{TABLE}:7")).arg("ver").arg(2).query(&mut con).unwrap();
        let _: () = redis::cmd("DEL").arg(format!("t:{TABLE}:12")).query(&mut con).unwrap();
        let look = sink.look().await.unwrap();
        assert_eq!((look.missing, look.torn), (1, 1), "row 12 missing, group of row 7 torn");

        let want: BTreeMap<u64, (i64, i64, String)> =
            [(1, (0, 1, "a".into())), (2, (0, 1, "b".into()))].into();
        let mut have = want.clone();
        assert_eq!(divergent(&want, &have), 0);
        have.insert(3, (0, 1, "extra".into()));
        have.insert(1, (0, 2, "a".into()));
        assert_eq!(divergent(&want, &have), 2, "a wrong row and an extra one");
    }
}
