//! The devserver when tables change under it (database `test`, wal_level = logical):
//! tables without a primary key, `ALTER TABLE … ADD/DROP COLUMN`, `TRUNCATE`, a table
//! dropped while served, and losing its database connection. The client converges or
//! gets a clear error; nothing panics silently.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shapesync_core::{Pipeline, PipelineError, Row, RunMode, Value};
use shapesync_devserver::{DevServer, DevServerOptions};
use shapesync_electric::{ShapeOptions, ShapeStream};
use shapesync_sink_memory::{MemorySink, MemoryStore};
use shapesync_testkit::ServerOptions;
use sqlx::{AssertSqlSafe, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

async fn sql(pool: &PgPool, text: impl Into<String>) {
    sqlx::raw_sql(AssertSqlSafe(text.into())).execute(pool).await.unwrap();
}

/// A schema of the test's own, with `tables` created by `ddl`.
async fn schema(pool: &PgPool, name: &str, ddl: &str) -> String {
    let schema = format!("shapesync_dev_{name}_{}", std::process::id());
    sql(pool, format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; SET search_path TO {schema}; {ddl}")).await;
    schema
}

async fn devserver(table: &str) -> Result<DevServer, shapesync_devserver::DevServerError> {
    let mut options = DevServerOptions::new(URL, vec![table.to_owned()]);
    options.server =
        ServerOptions { long_poll_timeout: Duration::from_millis(200), ..ServerOptions::default() };
    DevServer::start(options).await
}

/// A pipeline following `table` into a memory store.
fn follow(
    server: &DevServer,
    table: &str,
) -> (MemoryStore, CancellationToken, JoinHandle<Result<(), PipelineError>>) {
    let store = MemoryStore::new();
    let source = ShapeStream::new(ShapeOptions::new(server.url().parse().unwrap(), table)).unwrap();
    let stop = CancellationToken::new();
    let pipeline = Pipeline::new("dev", Box::new(source), Arc::new(MemorySink::new(store.clone())));
    (store.clone(), stop.clone(), tokio::spawn(pipeline.run(RunMode::Follow, stop)))
}

/// The store's rows as sorted text maps, for comparing.
fn rows(store: &MemoryStore) -> Vec<Vec<(String, String)>> {
    let render = |row: &Row| -> Vec<(String, String)> {
        row.iter()
            .map(|(k, v)| (k.to_string(), v.render().map_or("NULL".into(), |t| t.into_owned())))
            .collect()
    };
    let mut all: Vec<_> = store.rows().values().map(render).collect();
    all.sort();
    all
}

async fn wait_rows(store: &MemoryStore, want: &[&[(&str, &str)]]) {
    let mut want: Vec<Vec<(String, String)>> =
        want.iter().map(|r| r.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()).collect();
    for row in &mut want {
        row.sort();
    }
    want.sort();
    let deadline = Instant::now() + Duration::from_secs(20);
    while rows(store) != want {
        assert!(Instant::now() < deadline, "store holds {:?}, want {want:?}", rows(store));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_a_primary_key_is_keyed_by_all_columns() {
    let pool = PgPool::connect(URL).await.expect("local Postgres, database `test`");
    let schema = schema(
        &pool,
        "nokey",
        "CREATE TABLE tags (name text, weight int4); INSERT INTO tags VALUES ('a', 1), ('b', 2);",
    )
    .await;
    let table = format!("{schema}.tags");
    // Without the old values of updates and deletes its rows cannot be followed: a clear error.
    let e = devserver(&table).await.err().expect("refused");
    assert!(e.to_string().contains(&format!("ALTER TABLE {table} REPLICA IDENTITY FULL")), "{e}");

    sql(&pool, format!("ALTER TABLE {table} REPLICA IDENTITY FULL")).await;
    let server = devserver(&table).await.unwrap();
    let (store, stop, task) = follow(&server, &table);
    wait_rows(&store, &[&[("name", "a"), ("weight", "1")], &[("name", "b"), ("weight", "2")]]).await;
    sql(&pool, format!("INSERT INTO {table} VALUES ('c', 3); UPDATE {table} SET weight = 20 WHERE name = 'b'; DELETE FROM {table} WHERE name = 'a'")).await;
    wait_rows(&store, &[&[("name", "b"), ("weight", "20")], &[("name", "c"), ("weight", "3")]]).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    server.stop().await.unwrap();
    sql(&pool, format!("DROP SCHEMA {schema} CASCADE")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_and_dropped_columns_and_truncates_converge() {
    let pool = PgPool::connect(URL).await.expect("local Postgres, database `test`");
    let schema = schema(
        &pool,
        "alter",
        "CREATE TABLE items (id int8 PRIMARY KEY, title text); INSERT INTO items VALUES (1, 'one');",
    )
    .await;
    let table = format!("{schema}.items");
    let server = devserver(&table).await.unwrap();
    let (store, stop, task) = follow(&server, &table);
    wait_rows(&store, &[&[("id", "1"), ("title", "one")]]).await;

    // A new column: the table is served as a new shape, and the client refetches it.
    sql(
        &pool,
        format!("ALTER TABLE {table} ADD COLUMN note text; INSERT INTO {table} VALUES (2, 'two', 'n2')"),
    )
    .await;
    wait_rows(
        &store,
        &[
            &[("id", "1"), ("note", "NULL"), ("title", "one")],
            &[("id", "2"), ("note", "n2"), ("title", "two")],
        ],
    )
    .await;
    // A dropped one.
    sql(&pool, format!("ALTER TABLE {table} DROP COLUMN title; UPDATE {table} SET note = 'n1' WHERE id = 1"))
        .await;
    wait_rows(&store, &[&[("id", "1"), ("note", "n1")], &[("id", "2"), ("note", "n2")]]).await;
    // TRUNCATE empties it; rows after it arrive.
    sql(&pool, format!("TRUNCATE {table}; INSERT INTO {table} VALUES (3, 'n3')")).await;
    wait_rows(&store, &[&[("id", "3"), ("note", "n3")]]).await;
    assert_eq!(
        store.get(&format!("\"{schema}\".\"items\"/\"3\"")).unwrap().get("note"),
        Some(&Value::Text("n3".into()))
    );

    stop.cancel();
    task.await.unwrap().unwrap();
    server.stop().await.unwrap();
    sql(&pool, format!("DROP SCHEMA {schema} CASCADE")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_table_gives_its_clients_a_clear_error() {
    let pool = PgPool::connect(URL).await.expect("local Postgres, database `test`");
    let schema =
        schema(&pool, "drop", "CREATE TABLE items (id int8 PRIMARY KEY); INSERT INTO items VALUES (1);")
            .await;
    let table = format!("{schema}.items");
    let server = devserver(&table).await.unwrap();
    let (store, _stop, task) = follow(&server, &table);
    wait_rows(&store, &[&[("id", "1")]]).await;
    sql(&pool, format!("DROP TABLE {table}")).await;
    let outcome =
        tokio::time::timeout(Duration::from_secs(20), task).await.expect("the pipeline stops").unwrap();
    let e = outcome.expect_err("a table that is gone stops the pipeline");
    assert!(e.to_string().contains("does not exist"), "{e}");
    server.stop().await.unwrap();
    sql(&pool, format!("DROP SCHEMA {schema} CASCADE")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_database_takes_the_server_out_of_service() {
    let pool = PgPool::connect(URL).await.expect("local Postgres, database `test`");
    let schema = schema(&pool, "lost", "CREATE TABLE items (id int8 PRIMARY KEY);").await;
    let table = format!("{schema}.items");
    let mut server = devserver(&table).await.unwrap();
    // The connection reading the slot goes away.
    sqlx::query("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1")
        .bind(server.slot_name())
        .execute(&pool)
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(20), server.failed())
        .await
        .expect("the failure is reported");
    assert!(e.to_string().contains("postgres"), "{e}");
    // Clients are told, instead of getting stale rows.
    let response = reqwest::get(format!("{}?table={table}&offset=-1", server.url())).await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.text().await.unwrap().contains("stopped following the database"));
    sql(&pool, format!("DROP SCHEMA {schema} CASCADE")).await;
}
