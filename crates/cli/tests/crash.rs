//! The mission's promise, end to end: kill `shapesync run` (SIGKILL) at arbitrary moments
//! — mid-snapshot, mid-resync, mid-live — while the shape changes and rotates under it;
//! after a final `run --once` Redis holds exactly the shape's rows.

use std::collections::BTreeMap;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_arbitrary_moments_it_converges_to_exactly_the_shapes_rows() {
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

    let prefix = format!("test:{}:crash:", std::process::id());
    let dir = std::env::temp_dir().join(format!("shapesync-crash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pipeline.yaml");
    std::fs::write(
        &file,
        format!(
            "pipelines:\n  crash:\n    source: {{type: electric, url: '{}', table: crash_items}}\n    sink: {{type: redis, url: '{REDIS}', prefix: '{prefix}', part_size: 50}}\n",
            server.url()
        ),
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let mut con = redis::Client::open(REDIS).unwrap().get_connection().unwrap();
    let mut rng = rand::rng();
    for (round, next_id) in (0..6).zip(20_001u64..) {
        let checkpoint_key = format!("{prefix}shapesync:crash:checkpoint");
        let before: Option<String> = redis::cmd("GET").arg(&checkpoint_key).query(&mut con).unwrap();
        let mut child = spawn(file);
        // Let this run commit something, then kill it at a random moment after.
        let started = Instant::now();
        loop {
            let now: Option<String> = redis::cmd("GET").arg(&checkpoint_key).query(&mut con).unwrap();
            if now.is_some() && now != before {
                break;
            }
            assert!(started.elapsed() < DEADLINE, "round {round}: no progress");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..80))).await;
        child.kill().unwrap();
        child.wait().unwrap();
        let at: Option<String> =
            redis::cmd("GET").arg(format!("{prefix}shapesync:crash:checkpoint")).query(&mut con).unwrap();
        let rows = keys(&mut con, &format!("{prefix}crash_items:*")).len();
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

    let stored = keys(&mut con, &format!("{prefix}crash_items:*"));
    let mut want: Vec<String> = expected.keys().map(|id| format!("{prefix}crash_items:{id}")).collect();
    want.sort();
    assert_eq!(stored.len(), want.len(), "exactly the shape's rows, no more, no fewer");
    assert_eq!(stored, want);
    for (id, title) in &expected {
        let row: BTreeMap<String, String> =
            redis::cmd("HGETALL").arg(format!("{prefix}crash_items:{id}")).query(&mut con).unwrap();
        assert_eq!(row.get("title"), Some(title), "row {id}");
        assert_eq!(row.get("id"), Some(&id.to_string()), "row {id}");
    }
    let members: usize =
        redis::cmd("HLEN").arg(format!("{prefix}shapesync:crash:members")).query(&mut con).unwrap();
    assert_eq!(members, expected.len(), "membership matches the rows");
    let cp: String =
        redis::cmd("GET").arg(format!("{prefix}shapesync:crash:checkpoint")).query(&mut con).unwrap();
    assert!(cp.contains("\"resyncing\":false"), "{cp}");

    let mut all = keys(&mut con, &format!("{prefix}*"));
    all.sort();
    let _: () = redis::cmd("UNLINK").arg(&all).query(&mut con).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
