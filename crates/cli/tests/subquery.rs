//! Shapes whose `where` has a subquery: when a dependency value leaves the subquery,
//! Electric sends one `move-out` event, no deletes; the rows that carried its tag must
//! leave every sink anyway, in the same atomic unit as the checkpoint, and come back
//! with the inserts of a `move-in`. Checked live (the stream's own tag index), after
//! restarts (a resumed stream refetches), across a 409, and across a SIGKILL between
//! receiving a move-out and committing it, on Redis (hash, json, table), SQLite and
//! Postgres.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use shapesync_testkit::{Column, Fault, ServerOptions, TableDef, TableHandle, TestServer};
use support::{REDIS, Target, run_once, spawn_run};

const DEADLINE: Duration = Duration::from_secs(30);
const WHERE: &str = "project_id IN (SELECT id FROM projects WHERE active)";

/// The shape's rows as a test keeps them: id → (title, project).
struct Model {
    rows: BTreeMap<u64, (String, u64)>,
    active: Vec<u64>,
}

impl Model {
    fn expected(&self) -> BTreeMap<u64, String> {
        self.rows
            .iter()
            .filter(|(_, (_, p))| self.active.contains(p))
            .map(|(id, (t, _))| (*id, t.clone()))
            .collect()
    }

    fn insert(&mut self, table: &TableHandle, id: u64, project: u64) {
        let title = format!("row {id}");
        table.insert(json!({"id": id.to_string(), "title": title, "project_id": project.to_string()}));
        self.rows.insert(id, (title, project));
    }

    fn move_out(&mut self, table: &TableHandle, project: u64) {
        table.move_out(WHERE, 0, &[&project.to_string()]);
        self.active.retain(|p| *p != project);
    }

    fn move_in(&mut self, table: &TableHandle, project: u64) {
        table.move_in(WHERE, 0, &[&project.to_string()]);
        self.active.push(project);
    }
}

async fn setup(name: &str) -> (TestServer, TableHandle, Model) {
    let server = TestServer::start(ServerOptions {
        chunk_bytes: 1024, // several snapshot chunks
        long_poll_timeout: Duration::from_millis(200),
        ..Default::default()
    })
    .await
    .unwrap();
    let table = server.create_table(
        TableDef::new(name)
            .column(Column::new("id", "int8").primary_key().not_null())
            .column(Column::new("title", "text"))
            .column(Column::new("project_id", "int8")),
    );
    let rows: BTreeMap<u64, (String, u64)> = (1..=60).map(|i| (i, (format!("row {i}"), i % 3))).collect();
    table.seed(
        rows.iter()
            .map(|(id, (t, p))| json!({"id": id.to_string(), "title": t, "project_id": p.to_string()})),
    );
    // Projects 1 and 2 are active; project 0's rows are not in the shape.
    table.register_subquery_where(WHERE, &["project_id"], &[&["1", "2"]]);
    (server, table, Model { rows, active: vec![1, 2] })
}

fn pipeline_file(dir: &Path, server: &TestServer, table: &str, store: &Target) -> String {
    let file = dir.join("subquery.yaml");
    std::fs::write(
        &file,
        format!(
            "lease: {{ttl_ms: 500, poll_ms: 100}}\npipelines:\n  {}:\n    source: {{type: electric, url: '{}', table: {table}, where: '{WHERE}'}}\n    sink: {}\n",
            store.pipeline,
            server.url(),
            store.sink_yaml()
        ),
    )
    .unwrap();
    file.to_str().unwrap().to_owned()
}

async fn converges(store: &mut Target, model: &Model, what: &str) {
    let expected = model.expected();
    let started = Instant::now();
    loop {
        let rows = store.rows();
        if rows == expected {
            return;
        }
        assert!(started.elapsed() < DEADLINE, "{what}: the sink holds {rows:?}, expected {expected:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn moves_out_and_back_in(mut store: Target) {
    let table_name = store.table.clone();
    let (server, table, mut model) = setup(&table_name).await;
    let dir = tempfile::tempdir().unwrap();
    let file = pipeline_file(dir.path(), &server, &table_name, &store);

    // Live: the stream saw every tag since the snapshot.
    let mut child = spawn_run(Path::new(&file), &dir.path().join("run.log"));
    converges(&mut store, &model, "initial sync").await;
    model.move_out(&table, 1);
    converges(&mut store, &model, "live move-out").await;
    model.move_in(&table, 1);
    converges(&mut store, &model, "live move-in").await;
    // A row inserted and moved out in one response.
    model.insert(&table, 100, 2);
    model.move_out(&table, 2);
    converges(&mut store, &model, "insert and move-out together").await;
    model.move_in(&table, 2);
    converges(&mut store, &model, "move-in again").await;
    child.kill().unwrap();
    child.wait().unwrap();

    // Restarted: the stream resumes without the earlier rows' tags and must refetch.
    model.move_out(&table, 1);
    run_once(Path::new(&file));
    assert_eq!(store.rows(), model.expected(), "move-out after a restart");

    // SIGKILL between receiving a move-out and committing it: the response carrying it
    // trickles in, and the process dies while reading it.
    model.move_out(&table, 2);
    server.clear_requests();
    server.inject(Fault::Trickle { bytes: 64, delay: Duration::from_millis(50) });
    let before = store.checkpoint();
    let mut child = spawn_run(Path::new(&file), &dir.path().join("killed.log"));
    server.wait_for_requests(1, DEADLINE).await.unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(store.checkpoint(), before, "killed before the move-out committed");
    run_once(Path::new(&file));
    assert_eq!(store.rows(), model.expected(), "after a SIGKILL mid move-out");

    // A move-out while resyncing after a 409: the new snapshot still has the rows, the
    // log after it removes them.
    model.move_in(&table, 1);
    model.move_in(&table, 2);
    run_once(Path::new(&file));
    assert_eq!(store.rows(), model.expected(), "both projects back");
    table.rotate();
    model.move_out(&table, 1);
    run_once(Path::new(&file));
    assert_eq!(store.rows(), model.expected(), "move-out during the resync after a 409");
    store.check_bookkeeping(model.expected().len());
    store.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_hash_rows_move_out_and_back_in() {
    moves_out_and_back_in(Target::redis_layout(REDIS, "sq_hash", "sq_hash_items", "sq_hash", "hash")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_json_rows_move_out_and_back_in() {
    moves_out_and_back_in(Target::redis_layout(REDIS, "sq_json", "sq_json_items", "sq_json", "json")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_table_rows_move_out_and_back_in() {
    moves_out_and_back_in(Target::redis_layout(REDIS, "sq_table", "sq_table_items", "sq_table", "table"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_rows_move_out_and_back_in() {
    let dir = tempfile::tempdir().unwrap();
    moves_out_and_back_in(Target::sqlite("sq_sqlite", "sq_sqlite_items", dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rows_move_out_and_back_in() {
    moves_out_and_back_in(Target::postgres("sq_pg", "sq_pg_items", "sq_pg").await).await;
}
