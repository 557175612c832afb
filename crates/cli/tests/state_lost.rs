//! A Redis that loses what shapesync wrote — emptied by `FLUSHALL`, restarted without
//! persistence, restored from an older RDB file, or `shapesync reset` run against the
//! running instance — is noticed by the running instance (its lease is gone or older),
//! which resyncs on its own: the cache is exact again after one resync, and the event is
//! logged and counted. A Redis that may evict keys is refused at start.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use shapesync_testkit::{Column, ServerOptions, TableDef, TableHandle, TestServer};
use support::{OwnRedis, Target, free_port, spawn_run};

const DEADLINE: Duration = Duration::from_secs(30);

struct Shape {
    table: TableHandle,
    expected: BTreeMap<u64, String>,
    tx: u64,
}

impl Shape {
    fn change(&mut self) {
        self.tx += 1;
        let id = self.tx % 500 + 1;
        let title = format!("title {id} tx {}", self.tx);
        self.table.transaction().update(json!({"id": id.to_string(), "title": title})).commit();
        self.expected.insert(id, title);
    }
}

/// Lines of the JSON log holding `text`.
fn count(log: &Path, text: &str) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter(|l| l.contains(text)).count()
}

/// Waits until the sink holds exactly the shape's rows with a settled checkpoint, and
/// `resyncs` resyncs have completed.
async fn exact_after(target: &mut Target, shape: &Shape, log: &Path, resyncs: usize, what: &str) {
    let started = Instant::now();
    loop {
        let settled = target.checkpoint().is_some_and(|cp| cp.contains("\"resyncing\":false"));
        let done = count(log, "resync complete");
        if settled && done >= resyncs && target.rows() == shape.expected {
            assert_eq!(done, resyncs, "{what}: exactly one resync repaired it");
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{what}: the cache was not repaired ({} rows of {}, {done} resyncs):\n{}",
            target.rows().len(),
            shape.expected.len(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metric(port: u16, name: &str) -> f64 {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{pipeline=\"lost\"}}")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_data_is_noticed_and_resynced() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = OwnRedis::start(dir.path()).unwrap();
    let server = TestServer::start(ServerOptions {
        chunk_bytes: 16 * 1024,
        long_poll_timeout: Duration::from_millis(200),
        ..Default::default()
    })
    .await
    .unwrap();
    let table = server.create_table(
        TableDef::new("lost_items")
            .column(Column::new("id", "int8").primary_key().not_null())
            .column(Column::new("title", "text")),
    );
    let expected: BTreeMap<u64, String> = (1..=2_000).map(|i| (i, format!("title {i}"))).collect();
    table.seed(expected.iter().map(|(i, t)| json!({"id": i.to_string(), "title": t})));
    let mut shape = Shape { table, expected, tx: 0 };
    let mut target = Target::redis_at(&redis.url(), "lost", "lost_items", "lost");
    let metrics = free_port();
    let file = dir.path().join("lost.yaml");
    std::fs::write(
        &file,
        format!(
            "lease: {{ttl_ms: 600, poll_ms: 100}}\nmetrics: {{listen: '127.0.0.1:{metrics}'}}\npipelines:\n  lost:\n    source: {{type: electric, url: '{}', table: lost_items}}\n    sink: {}\n",
            server.url(),
            target.sink_yaml()
        ),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let mut child = spawn_run(&file, &log);
    exact_after(&mut target, &shape, &log, 1, "the first sync").await;

    // FLUSHALL: everything gone, lease included.
    let _: () = redis::cmd("FLUSHALL").query(&mut redis.con().unwrap()).unwrap();
    shape.change();
    exact_after(&mut target, &shape, &log, 2, "after FLUSHALL").await;

    // A restart without persistence: the same, with Redis away for a moment.
    redis.restart().unwrap();
    target.reconnect();
    shape.change();
    exact_after(&mut target, &shape, &log, 3, "after a restart without persistence").await;

    // A restore from an older RDB: old rows, an old checkpoint, an old lease.
    let _: () = redis::cmd("SAVE").query(&mut redis.con().unwrap()).unwrap();
    for _ in 0..20 {
        shape.change();
    }
    exact_after(&mut target, &shape, &log, 3, "changes after the save").await;
    redis.restart().unwrap();
    target.reconnect();
    std::fs::remove_file(dir.path().join("dump.rdb")).unwrap();
    exact_after(&mut target, &shape, &log, 4, "after a restore from an older RDB").await;

    // `reset` while the instance runs: it takes the lease, and the instance resyncs.
    let out = Command::new(env!("CARGO_BIN_EXE_shapesync"))
        .args(["reset", "--pipeline", "lost", "--yes"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    shape.change();
    exact_after(&mut target, &shape, &log, 5, "after reset --yes").await;

    assert_eq!(count(&log, "the sink no longer holds what this instance wrote"), 3, "each loss is logged");
    assert_eq!(metric(metrics, "shapesync_sink_state_lost_total").await, 3.0, "and counted");
    assert_eq!(
        metric(metrics, "shapesync_fenced_total").await,
        1.0,
        "reset fenced the running instance once"
    );

    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(child.wait().unwrap().success());
    target.check_bookkeeping(shape.expected.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_may_evict_keys_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let redis = OwnRedis::start(dir.path()).unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query(&mut redis.con().unwrap())
        .unwrap();
    let server = TestServer::start(ServerOptions::default()).await.unwrap();
    server.create_table(TableDef::new("items").column(Column::new("id", "int8").primary_key().not_null()));
    let file = dir.path().join("evict.yaml");
    std::fs::write(
        &file,
        format!(
            "pipelines:\n  evict:\n    source: {{type: electric, url: '{}', table: items}}\n    sink: {{type: redis, url: '{}'}}\n",
            server.url(),
            redis.url()
        ),
    )
    .unwrap();
    for args in [&["run", "--once"][..], &["validate", "--connect"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_shapesync")).args(args).arg(&file).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("maxmemory-policy allkeys-lru"), "{args:?} names the setting: {stderr}");
        assert!(stderr.contains("allow_eviction"), "{args:?} says how to run anyway: {stderr}");
    }
}
