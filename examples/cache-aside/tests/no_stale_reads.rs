//! The example under load, against a real Postgres (through the devserver) and Redis:
//! writers change projects (their version, sometimes their org), readers read them
//! through the service's HTTP API, and shapesync — a process of its own, in
//! `mode: invalidate` and then `mode: refresh` — keeps the cache honest. Mid-run
//! shapesync is SIGKILLed and restarted, and the devserver is restarted (a new shape
//! handle, so a 409 and a full invalidation) after changes it never streamed.
//!
//! A change counts as committed once shapesync's notice for it arrived (the sink
//! publishes it in the same unit as the invalidation and the checkpoint), or, for the
//! changes made while the devserver was down, once the full invalidation's notice did.
//! The test fails on any read that *started* after a change was committed and returned
//! an older version (or an org list that disagrees with the committed org), and on any
//! change whose commit never comes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::Rng;
use shapesync_devserver::{DevServer, DevServerOptions};
use shapesync_example_cache_aside::{App, Project, Settings};

const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";
const REDIS: &str = "redis://127.0.0.1:6379";
const ROWS: i64 = 40;
const ORGS: i64 = 4;
const WRITERS: i64 = 8;
const CHANGES: u64 = 1_000;
/// How long a committed change may take to be confirmed before the test fails.
const CONFIRM_WITHIN: Duration = Duration::from_secs(60);

/// What the test knows of each row, shared by writers and readers.
struct Rows {
    /// The last version shapesync committed the invalidation of.
    confirmed: Vec<AtomicI64>,
    /// The org of that version.
    confirmed_org: Vec<AtomicI64>,
    /// A write of the row is not confirmed yet.
    in_flight: Vec<AtomicBool>,
    /// Notices for `project:{id}` received.
    notices: Vec<AtomicU64>,
    /// Full-invalidation notices received.
    flushes: AtomicU64,
    /// Changes written.
    written: AtomicU64,
    /// Stale reads seen, and a description of the first few.
    stale: AtomicU64,
    stale_examples: std::sync::Mutex<Vec<String>>,
    reads: AtomicU64,
}

impl Rows {
    fn new() -> Arc<Rows> {
        let per_row = |v: i64| (0..ROWS).map(|_| AtomicI64::new(v)).collect();
        Arc::new(Rows {
            confirmed: per_row(0),
            confirmed_org: (0..ROWS).map(|id| AtomicI64::new(id % ORGS)).collect(),
            in_flight: (0..ROWS).map(|_| AtomicBool::new(false)).collect(),
            notices: (0..ROWS).map(|_| AtomicU64::new(0)).collect(),
            flushes: AtomicU64::new(0),
            written: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            stale_examples: std::sync::Mutex::new(Vec::new()),
            reads: AtomicU64::new(0),
        })
    }

    fn stale(&self, what: String) {
        self.stale.fetch_add(1, Ordering::SeqCst);
        let mut examples = self.stale_examples.lock().unwrap();
        if examples.len() < 10 {
            examples.push(what);
        }
    }
}

/// Waits for `done` with a deadline, failing with `what`.
async fn until(what: &str, within: Duration, done: impl FnMut() -> bool) {
    if !wait(within, done).await {
        panic!("timed out waiting for {what}");
    }
}

/// Waits for `done` with a deadline, failing with `what` and the end of shapesync's log.
async fn until_logged(what: &str, within: Duration, log: &Path, done: impl FnMut() -> bool) {
    if !wait(within, done).await {
        panic!("timed out waiting for {what}; shapesync's log:\n{}", log_tail(log));
    }
}

/// Whether `done` came true within `within`.
async fn wait(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// A shapesync process, SIGKILLed when dropped (a failing test leaves none behind).
struct Shapesync(Child);

impl Shapesync {
    fn spawn(file: &Path, log: &Path) -> Shapesync {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cache-aside-shapesync"))
            .args(["run"])
            .arg(file)
            .env("SHAPESYNC_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Shapesync(child)
    }

    /// SIGKILL, and wait for it to be gone.
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Shapesync {
    fn drop(&mut self) {
        self.kill();
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

async fn start_devserver(table: &str, listen: SocketAddr) -> DevServer {
    let mut options = DevServerOptions::new(POSTGRES, vec![table.to_owned()]);
    options.listen = listen;
    options.server.long_poll_timeout = Duration::from_millis(500);
    DevServer::start(options).await.expect("the devserver starts (Postgres needs wal_level = logical)")
}

/// Subscribes to the sink's notices and counts them per row (and full invalidations).
async fn follow_notices(channel: String, prefix: String, rows: Arc<Rows>) -> tokio::task::JoinHandle<()> {
    let mut pubsub = redis::Client::open(REDIS).unwrap().get_async_pubsub().await.unwrap();
    pubsub.subscribe(&channel).await.unwrap();
    tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while let Some(message) = messages.next().await {
            let body: serde_json::Value =
                serde_json::from_str(&message.get_payload::<String>().unwrap()).unwrap();
            if body["op"] == "invalidate_all" {
                rows.flushes.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            let key = body["key"].as_str().unwrap_or_default();
            if let Some(id) =
                key.strip_prefix(&format!("{prefix}project:")).and_then(|id| id.parse::<usize>().ok())
            {
                rows.notices[id].fetch_add(1, Ordering::SeqCst);
            }
        }
    })
}

/// Updates row `id` to `version` (and `org`) in its own transaction.
async fn write(pg: &sqlx::PgPool, table: &str, id: i64, version: i64, org: i64) {
    let sql = format!("UPDATE {table} SET version = $2, org_id = $3, name = $4 WHERE id = $1");
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(version)
        .bind(org)
        .bind(format!("project {id} v{version}"))
        .execute(pg)
        .await
        .unwrap();
}

/// One writer: rows `id ≡ n (mod WRITERS)`, each change waited for until shapesync
/// committed it, while `paused` is not set; until `CHANGES` were written in all.
async fn writer(
    n: i64,
    pg: sqlx::PgPool,
    table: String,
    rows: Arc<Rows>,
    paused: Arc<AtomicBool>,
    idle: Arc<AtomicU64>,
) {
    let mine: Vec<i64> = (0..ROWS).filter(|id| id % WRITERS == n).collect();
    let mut parked = false;
    while rows.written.load(Ordering::SeqCst) < CHANGES {
        if paused.load(Ordering::SeqCst) {
            if !parked {
                idle.fetch_add(1, Ordering::SeqCst);
                parked = true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        if parked {
            idle.fetch_sub(1, Ordering::SeqCst);
            parked = false;
        }
        let (id, org) = {
            let mut rng = rand::rng();
            (mine[rng.random_range(0..mine.len())], rng.random_range(0..ORGS))
        };
        let i = id as usize;
        let version = rows.confirmed[i].load(Ordering::SeqCst) + 1;
        let before = rows.notices[i].load(Ordering::SeqCst);
        rows.in_flight[i].store(true, Ordering::SeqCst);
        write(&pg, &table, id, version, org).await;
        rows.written.fetch_add(1, Ordering::SeqCst);
        until(&format!("shapesync to commit version {version} of project {id}"), CONFIRM_WITHIN, || {
            rows.notices[i].load(Ordering::SeqCst) > before
        })
        .await;
        rows.confirmed_org[i].store(org, Ordering::SeqCst);
        rows.confirmed[i].store(version, Ordering::SeqCst);
        rows.in_flight[i].store(false, Ordering::SeqCst);
    }
    if !parked {
        idle.fetch_add(1, Ordering::SeqCst);
    }
}

/// One reader of projects: every read that began after a version was committed must
/// return at least that version.
async fn project_reader(base: String, rows: Arc<Rows>, stop: Arc<AtomicBool>) {
    let http = reqwest::Client::new();
    while !stop.load(Ordering::SeqCst) {
        let id = rand::rng().random_range(0..ROWS);
        let committed = rows.confirmed[id as usize].load(Ordering::SeqCst);
        let body = http.get(format!("{base}/projects/{id}")).send().await.unwrap().text().await.unwrap();
        let project: Project =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("project {id}: {e}: {body}"));
        rows.reads.fetch_add(1, Ordering::Relaxed);
        if project.version < committed {
            rows.stale(format!(
                "project {id}: read version {} after version {committed} was committed",
                project.version
            ));
        }
    }
}

/// One reader of org lists: a project whose last write was committed (and none is in
/// flight, before or after the read) is listed by exactly its committed org.
async fn org_reader(base: String, rows: Arc<Rows>, stop: Arc<AtomicBool>) {
    let http = reqwest::Client::new();
    while !stop.load(Ordering::SeqCst) {
        let org = rand::rng().random_range(0..ORGS);
        let settled = |rows: &Rows| -> Vec<Option<(i64, i64)>> {
            (0..ROWS as usize)
                .map(|i| {
                    (!rows.in_flight[i].load(Ordering::SeqCst)).then(|| {
                        (
                            rows.confirmed[i].load(Ordering::SeqCst),
                            rows.confirmed_org[i].load(Ordering::SeqCst),
                        )
                    })
                })
                .collect()
        };
        let before = settled(&rows);
        let listed: Vec<i64> =
            http.get(format!("{base}/orgs/{org}/projects")).send().await.unwrap().json().await.unwrap();
        let after = settled(&rows);
        rows.reads.fetch_add(1, Ordering::Relaxed);
        for id in 0..ROWS as usize {
            if let (Some((version, committed_org)), true) = (before[id], before[id] == after[id]) {
                let in_list = listed.contains(&(id as i64));
                if in_list != (committed_org == org) {
                    rows.stale(format!(
                        "org {org} list {listed:?}: project {id} (version {version}, committed org {committed_org}) {}",
                        if in_list { "listed" } else { "missing" }
                    ));
                }
            }
        }
    }
}

/// The pipeline file for `mode`.
fn pipeline(dev_url: &str, table: &str, prefix: &str, mode: &str) -> String {
    let own = match mode {
        "refresh" => "layout: json, key: 'project:{id}', keys: ['org:{org_id}:projects']",
        _ => "keys: ['project:{id}', 'org:{org_id}:projects']",
    };
    format!(
        "pipelines:\n  cache:\n    source: {{type: electric, url: '{dev_url}', table: {table}, log: changes_only, replica: full}}\n    sink: {{type: redis, url: '{REDIS}', prefix: '{prefix}', mode: {mode}, {own}, notify: '{prefix}notices'}}\nlease: {{ttl_ms: 1000, poll_ms: 100}}\n"
    )
}

/// The scenarios run one at a time: each runs processes and a devserver of its own,
/// and on two cores two at once would mostly measure each other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn scenario(mode: &str) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let started = Instant::now();
    let pg = sqlx::PgPool::connect(POSTGRES).await.expect("local Postgres, database `test`");
    let table = format!("cache_aside_{mode}_{}", std::process::id());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int8 PRIMARY KEY, name text NOT NULL, org_id int8 NOT NULL, version int8 NOT NULL);
         INSERT INTO {table} SELECT i, 'project ' || i, i % {ORGS}, 0 FROM generate_series(0, {}) i;",
        ROWS - 1
    )))
    .execute(&pg)
    .await
    .unwrap();
    let prefix = format!("test:{}:cache-aside-{mode}:", std::process::id());
    let rows = Rows::new();

    let mut dev = Some(start_devserver(&table, SocketAddr::from(([127, 0, 0, 1], 0))).await);
    let dev_url = dev.as_ref().unwrap().url();
    let listen: SocketAddr =
        dev_url.trim_start_matches("http://").split('/').next().unwrap().parse().unwrap();
    let notices = follow_notices(format!("{prefix}notices"), prefix.clone(), rows.clone()).await;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, pipeline(&dev_url, &table, &prefix, mode)).unwrap();
    let log: PathBuf = dir.path().join("shapesync.log");
    let mut shapesync = Shapesync::spawn(&file, &log);
    // The first sync has no checkpoint: it invalidates everything, then follows changes.
    until_logged("shapesync's first sync (a full invalidation)", Duration::from_secs(60), &log, || {
        rows.flushes.load(Ordering::SeqCst) >= 1
    })
    .await;

    // The service, on a port of its own.
    let redis = redis::aio::ConnectionManager::new(redis::Client::open(REDIS).unwrap()).await.unwrap();
    let mut settings = Settings::new(&table);
    settings.prefix = prefix.clone();
    settings.fill_delay = Duration::from_millis(8); // widens the stale-fill race
    let app = App::new(pg.clone(), redis, settings);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, app.clone().router()).into_future());

    let stop = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(false));
    let idle = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..6 {
        readers.push(tokio::spawn(project_reader(base.clone(), rows.clone(), stop.clone())));
    }
    for _ in 0..2 {
        readers.push(tokio::spawn(org_reader(base.clone(), rows.clone(), stop.clone())));
    }
    let writers: Vec<_> = (0..WRITERS)
        .map(|n| {
            tokio::spawn(writer(n, pg.clone(), table.clone(), rows.clone(), paused.clone(), idle.clone()))
        })
        .collect();
    let written = |at: u64| {
        let rows = rows.clone();
        move || rows.written.load(Ordering::SeqCst) >= at
    };

    // SIGKILL shapesync mid-stream, and start it again: it resumes from its checkpoint
    // (after the dead instance's lease expires) and commits what it had not.
    until("the first third of the changes", Duration::from_secs(120), written(CHANGES / 3)).await;
    shapesync.kill();
    shapesync = Shapesync::spawn(&file, &log);

    // Restart the devserver after changes it never streamed: its new handle makes shapesync
    // refetch (a 409), and only a full invalidation can cover those changes.
    until("two thirds of the changes", Duration::from_secs(120), written(2 * CHANGES / 3)).await;
    paused.store(true, Ordering::SeqCst);
    until("the writers to pause", CONFIRM_WITHIN, || idle.load(Ordering::SeqCst) == WRITERS as u64).await;
    dev.take().unwrap().stop().await.unwrap();
    let flushes = rows.flushes.load(Ordering::SeqCst);
    let mut gap = Vec::new();
    for id in 0..ROWS {
        let i = id as usize;
        let version = rows.confirmed[i].load(Ordering::SeqCst) + 1;
        let org = (rows.confirmed_org[i].load(Ordering::SeqCst) + 1) % ORGS;
        rows.in_flight[i].store(true, Ordering::SeqCst);
        write(&pg, &table, id, version, org).await;
        gap.push((i, version, org));
    }
    rows.written.fetch_add(gap.len() as u64, Ordering::SeqCst);
    dev = Some(start_devserver(&table, listen).await);
    until_logged("the full invalidation after the 409", CONFIRM_WITHIN, &log, || {
        rows.flushes.load(Ordering::SeqCst) > flushes
    })
    .await;
    for (i, version, org) in gap {
        rows.confirmed_org[i].store(org, Ordering::SeqCst);
        rows.confirmed[i].store(version, Ordering::SeqCst);
        rows.in_flight[i].store(false, Ordering::SeqCst);
    }
    paused.store(false, Ordering::SeqCst);

    for w in writers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.await.unwrap();
    }
    shapesync.kill();
    notices.abort();
    drop(dev);

    let stale = rows.stale.load(Ordering::SeqCst);
    let (hits, misses, refused) = (
        app.stats.hits.load(Ordering::Relaxed),
        app.stats.misses.load(Ordering::Relaxed),
        app.stats.refused_fills.load(Ordering::Relaxed),
    );
    eprintln!(
        "mode {mode}: {} changes, {} reads ({hits} hits, {misses} misses, {refused} fills refused), {stale} stale, {:.1} s",
        rows.written.load(Ordering::SeqCst),
        rows.reads.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        stale,
        0,
        "stale reads after commit: {:?}\nshapesync's log:\n{}",
        rows.stale_examples.lock().unwrap(),
        log_tail(&log)
    );
    assert!(rows.written.load(Ordering::SeqCst) >= CHANGES);
    assert!(hits > 0 && misses > 0, "the cache served reads and missed some");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE {table}"))).execute(&pg).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_read_after_a_commit_is_stale_in_invalidate_mode() {
    scenario("invalidate").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_read_after_a_commit_is_stale_in_refresh_mode() {
    scenario("refresh").await;
}

/// The shipped pipeline files validate.
#[test]
fn the_shipped_pipeline_files_validate() {
    for file in ["pipeline.yaml", "pipeline-refresh.yaml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let out = Command::new(env!("CARGO_BIN_EXE_cache-aside-shapesync"))
            .arg("validate")
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
    }
}
