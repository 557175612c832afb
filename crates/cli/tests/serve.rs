//! A long-running `shapesync run`: metrics and health endpoints while it follows a shape,
//! and a clean exit 0 on SIGTERM with the sink consistent.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use shapesync_testkit::{Column, ServerOptions, TableDef, TestServer};

const DEADLINE: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn get(url: &str) -> Option<(u16, String)> {
    let resp = reqwest::get(url).await.ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_metrics_and_health_then_stops_cleanly_on_sigterm() {
    let server = TestServer::start(ServerOptions {
        long_poll_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await
    .unwrap();
    let table = server.create_table(
        TableDef::new("serve_items")
            .column(Column::new("id", "int8").primary_key())
            .column(Column::new("title", "text")),
    );
    table.seed((1..=50).map(|i| json!({"id": i.to_string(), "title": format!("t{i}")})));
    let port = free_port();
    let prefix = format!("test:{}:serve:", std::process::id());
    let file = std::env::temp_dir().join(format!("shapesync-serve-{}.yaml", std::process::id()));
    std::fs::write(
        &file,
        format!(
            "pipelines:\n  served:\n    source: {{type: electric, url: '{}', table: serve_items, replica: full}}\n    transforms: [{{type: filter, column: title, not_equals: t7}}]\n    sink: {{type: redis, url: 'redis://127.0.0.1:6379', prefix: '{prefix}'}}\nmetrics:\n  listen: 127.0.0.1:{port}\n",
            server.url()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_shapesync"))
        .args(["run", file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    let base = format!("http://127.0.0.1:{port}");

    assert_eq!(eventually("/healthz", async || get(&format!("{base}/healthz")).await).await.0, 200);
    let (_, ready) = eventually("/readyz 200", async || {
        get(&format!("{base}/readyz")).await.filter(|(code, _)| *code == 200)
    })
    .await;
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["pipelines"]["served"]["state"], "up to date");

    // A live change flows through while it runs.
    table.transaction().insert(json!({"id": "51", "title": "live"})).commit();
    let mut con = redis::Client::open("redis://127.0.0.1:6379").unwrap().get_connection().unwrap();
    let key = format!("{prefix}serve_items:51");
    eventually("the live row in Redis", async || {
        let title: Option<String> = redis::cmd("HGET").arg(&key).arg("title").query(&mut con).ok()?;
        title.filter(|t| t == "live")
    })
    .await;

    // The row is in Redis before the runner counts the commit: wait for the count.
    let (code, metrics) = eventually("the live commit counted", async || {
        get(&format!("{base}/metrics"))
            .await
            .filter(|(_, m)| m.contains("shapesync_changes_committed_total{pipeline=\"served\"} 50"))
    })
    .await;
    assert_eq!(code, 200);
    for name in [
        "shapesync_changes_committed_total{pipeline=\"served\"} 50",
        "shapesync_changes_discarded_total{pipeline=\"served\",component=\"transform\"} 1",
        "shapesync_up_to_date{pipeline=\"served\"} 1",
        "shapesync_sink_commit_duration_seconds_bucket{pipeline=\"served\"",
        "shapesync_source_requests_total{pipeline=\"served\",class=\"2xx\"}",
    ] {
        assert!(metrics.contains(name), "missing `{name}` in:\n{metrics}");
    }

    // Every family has HELP and TYPE; counters exist at 0 before their first event; batch
    // sizes have count buckets; the heartbeat and build info are there.
    for m in shapesync_core::telemetry::CATALOGUE {
        assert!(metrics.contains(&format!("# HELP {} ", m.name)), "no HELP for {}:\n{metrics}", m.name);
        assert!(metrics.contains(&format!("# TYPE {} ", m.name)), "no TYPE for {}:\n{metrics}", m.name);
    }
    for name in [
        "shapesync_errors_total{pipeline=\"served\",component=\"source\"} 0",
        "shapesync_pipeline_failures_total{pipeline=\"served\"} 0",
        "shapesync_must_refetch_total{pipeline=\"served\"} 0",
        "shapesync_source_requests_total{pipeline=\"served\",class=\"5xx\"} 0",
        "shapesync_sink_batch_changes_bucket{pipeline=\"served\",le=\"1000\"}",
        "shapesync_last_up_to_date_timestamp_seconds{pipeline=\"served\"}",
        "shapesync_last_source_response_timestamp_seconds{pipeline=\"served\"}",
        "shapesync_build_info{version=",
        "shapesync_sink_rows_total{pipeline=\"served\",op=\"insert\"}",
        "shapesync_sink_rows_total{pipeline=\"served\",op=\"delete\"} 0",
    ] {
        assert!(metrics.contains(name), "missing `{name}` in:\n{metrics}");
    }

    // The last-commit gauge is a Unix timestamp in seconds (Prometheus computes the age).
    let stamp: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("shapesync_last_commit_timestamp_seconds{pipeline=\"served\"} "))
        .expect("last commit gauge")
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((now - stamp).abs() < 3600.0, "timestamp {stamp} is not in seconds near {now}");

    // SIGTERM: exit 0, checkpoint and rows consistent.
    let status = Command::new("kill").args(["-TERM", &running.0.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = eventually("exit after SIGTERM", async || running.0.try_wait().unwrap()).await;
    assert_eq!(exit.code(), Some(0), "graceful shutdown exits 0");
    let cp: String =
        redis::cmd("GET").arg(format!("{prefix}shapesync:served:checkpoint")).query(&mut con).unwrap();
    assert!(cp.contains("\"resyncing\":false"), "{cp}");
    let rows: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}serve_items:*")).query(&mut con).unwrap();
    assert_eq!(rows.len(), 50, "row 7 is filtered out");
    let _: () = redis::cmd("DEL")
        .arg(&rows)
        .arg(format!("{prefix}shapesync:served:checkpoint"))
        .arg(format!("{prefix}shapesync:served:members"))
        .query(&mut con)
        .unwrap();
    let _ = std::fs::remove_file(file);
}

/// `/readyz`'s state of pipeline `id` and its JSON, when the endpoint answers.
async fn readiness(base: &str, id: &str) -> Option<(u16, serde_json::Value)> {
    let (code, body) = get(&format!("{base}/readyz")).await?;
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some((code, json["pipelines"][id].clone()))
}

/// The truth under faults: with the Electric source down, and separately with Redis
/// down, `/readyz` turns 503 once the fault outlasts the grace, naming the state (and the
/// sink's error), and turns 200 again after recovery; on a quiet table the heartbeat
/// gauge keeps moving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_a_dead_source_and_a_dead_sink_and_their_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = shapesync_reliability::OwnRedis::start(dir.path()).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let options =
        || ServerOptions { long_poll_timeout: Duration::from_millis(200), ..ServerOptions::default() };
    let def = || TableDef::new("ready_items").column(Column::new("id", "int8").primary_key().not_null());
    let server = TestServer::start_on(addr, options()).await.unwrap();
    server.create_table(def()).seed([json!({"id": "1"})]);
    let port = free_port();
    let file = dir.path().join("ready.yaml");
    std::fs::write(
        &file,
        format!(
            "lease: {{ttl_ms: 600, poll_ms: 100}}\npipelines:\n  ready:\n    source: {{type: electric, url: 'http://{addr}/v1/shape', table: ready_items}}\n    sink: {{type: redis, url: '{}', prefix: 'ready:'}}\nmetrics:\n  listen: 127.0.0.1:{port}\n  ready_grace_ms: 1000\n",
            redis.url()
        ),
    )
    .unwrap();
    let _running = Running(
        Command::new(env!("CARGO_BIN_EXE_shapesync"))
            .args(["run"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let state_is = |code: u16, state: &'static str| {
        let base = base.clone();
        async move {
            eventually(&format!("readyz {code} {state}"), async || {
                readiness(&base, "ready").await.filter(|(c, p)| *c == code && p["state"] == state)
            })
            .await
            .1
        }
    };
    state_is(200, "up to date").await;

    // Heartbeat: a quiet table still reaches the head every long-poll hold.
    let heartbeat = async || {
        let (_, metrics) = get(&format!("{base}/metrics")).await?;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("shapesync_last_up_to_date_timestamp_seconds{pipeline=\"ready\"} "))?
            .parse::<f64>()
            .ok()
    };
    let first = eventually("a heartbeat", heartbeat).await;
    eventually("the heartbeat moving on a quiet table", async || heartbeat().await.filter(|t| *t > first))
        .await;

    // The source goes away: after the grace, 503 "source silent"; back, and 200 again.
    server.shutdown().await;
    state_is(503, "source silent").await;
    let server = TestServer::start_on(addr, options()).await.unwrap();
    server.create_table(def()).seed([json!({"id": "1"})]);
    state_is(200, "up to date").await;

    // Redis goes away: 503 "sink retrying" with its error; back (empty), and 200 again.
    let _: Result<(), _> = redis::cmd("SHUTDOWN").arg("NOSAVE").query(&mut redis.con().unwrap());
    let down = state_is(503, "sink retrying").await;
    assert!(down["last_error"].as_str().is_some_and(|e| !e.is_empty()), "{down}");
    redis.restart().unwrap();
    state_is(200, "up to date").await;
    drop(server);
}

/// `shapesync status` against a running instance prints every pipeline's state, rows/s,
/// lag and last commit (from its `/status`), and says so when nothing runs there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_every_pipelines_state() {
    let server = TestServer::start(ServerOptions {
        long_poll_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await
    .unwrap();
    for table in ["status_a", "status_b"] {
        let t = server.create_table(TableDef::new(table).column(Column::new("id", "int8").primary_key()));
        t.seed((1..=5).map(|i| json!({"id": i.to_string()})));
    }
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("status.yaml");
    std::fs::write(
        &file,
        format!(
            "pipelines:\n  alpha: {{source: {{type: electric, url: '{0}', table: status_a}}, sink: {{type: memory}}}}\n  beta: {{source: {{type: electric, url: '{0}', table: status_b}}, sink: {{type: memory}}}}\nmetrics:\n  listen: 127.0.0.1:{port}\n",
            server.url()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_shapesync"))
        .args(["run", file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _running = Running(child);
    let base = format!("http://127.0.0.1:{port}");
    eventually("/readyz 200", async || get(&format!("{base}/readyz")).await.filter(|(code, _)| *code == 200))
        .await;

    let status = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_shapesync")).arg("status").args(args).output().unwrap()
    };
    let out = status(&[file.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("PIPELINE") && lines[0].contains("ROWS/S") && lines[0].contains("LAG"),
        "{stdout}"
    );
    for id in ["alpha", "beta"] {
        let line = lines.iter().find(|l| l.starts_with(id)).unwrap_or_else(|| panic!("{id} in {stdout}"));
        assert!(line.contains("up to date") && line.contains("yes") && line.contains("s ago"), "{line}");
    }
    let out = status(&["--url", &base, "--json"]);
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["pipelines"].as_array().unwrap().len(), 2);
    assert_eq!(body["pipelines"][0]["changes_committed"], 5);
    assert_eq!(body["pipelines"][0]["lag_secs"], 0.0);
    // Nothing listening: a clear error, exit 2.
    let out = status(&["--url", &format!("http://127.0.0.1:{}", free_port())]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is shapesync running there"));
}
