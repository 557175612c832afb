//! The mission's promise, end to end: kill `shapesync run` (SIGKILL) at arbitrary moments
//! — mid-snapshot, mid-resync, mid-live — while the shape changes and rotates under it;
//! after a final `run --once` the sink holds exactly the shape's rows. Run against Redis
//! against a SQLite file and against a second Postgres.

mod support;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::json;
use shapesync_testkit::{Column, ServerOptions, TableDef, TestServer};
use support::Target;

const DEADLINE: Duration = Duration::from_secs(30);

fn spawn(file: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_shapesync"))
        .args(["run", file])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_arbitrary_moments_redis_converges_to_exactly_the_shapes_rows() {
    killed_at_arbitrary_moments(Target::redis("crash", "crash_items", "crash"), "redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_arbitrary_moments_sqlite_converges_to_exactly_the_shapes_rows() {
    let dir = tempfile::tempdir().unwrap();
    killed_at_arbitrary_moments(Target::sqlite("crash", "crash_items", dir.path()), "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_arbitrary_moments_postgres_converges_to_exactly_the_shapes_rows() {
    killed_at_arbitrary_moments(Target::postgres("crash", "crash_items", "crash").await, "postgres").await;
}

async fn killed_at_arbitrary_moments(mut store: Target, name: &str) {
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
    // Randomised: the seed is printed, and SHAPESYNC_TEST_SEED replays a run.
    let seed =
        std::env::var("SHAPESYNC_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("{name}: seed {seed} (set SHAPESYNC_TEST_SEED={seed} to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
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

    support::run_once(std::path::Path::new(file));

    assert_eq!(store.rows(), expected, "exactly the shape's rows, no more, no fewer");
    store.check_bookkeeping(expected.len());
    let cp = store.checkpoint().expect("a checkpoint");
    assert!(cp.contains("\"resyncing\":false"), "{cp}");
    store.cleanup();
}
