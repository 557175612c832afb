//! The devserver over the local Postgres (database `test`, wal_level = logical): a
//! pipeline following it sees the table's rows, then every committed change.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shapesync_core::{Pipeline, RunMode, Value};
use shapesync_devserver::{DevServer, DevServerOptions};
use shapesync_electric::{ShapeOptions, ShapeStream};
use shapesync_sink_memory::{MemorySink, MemoryStore};
use shapesync_testkit::ServerOptions;
use sqlx::{AssertSqlSafe, PgPool};
use tokio_util::sync::CancellationToken;

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

async fn sql(pool: &PgPool, text: String) {
    sqlx::raw_sql(AssertSqlSafe(text)).execute(pool).await.unwrap();
}

/// Waits until `store` holds rows whose `title`s, by key, are `want`.
async fn wait_for(store: &MemoryStore, want: &[(String, Option<&str>)]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let titles: Vec<(String, Option<String>)> = store
            .rows()
            .into_iter()
            .map(|(k, row)| {
                let title = match row.get("title") {
                    Some(Value::Text(t)) => Some(t.clone()),
                    _ => None,
                };
                (k, title)
            })
            .collect();
        let want: Vec<(String, Option<String>)> =
            want.iter().map(|(k, t)| (k.clone(), t.map(str::to_owned))).collect();
        if titles == want {
            return;
        }
        assert!(Instant::now() < deadline, "store holds {titles:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(10)).await; // poll interval
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_follows_a_real_postgres_table_through_the_devserver() {
    let pool = PgPool::connect(URL).await.expect("local Postgres on 5432, database `test`");
    let schema = format!("shapesync_dev_{}", std::process::id());
    sql(&pool, format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}")).await;
    sql(
        &pool,
        format!(
            "CREATE TABLE {schema}.items (id int8 PRIMARY KEY, title text, amount numeric, flag bool, tags text[]);
             INSERT INTO {schema}.items VALUES
               (9007199254740993, 'big', 12345678901234567890.5, true, '{{a,\"b c\"}}'),
               (2, 'two', NULL, false, NULL),
               (3, 'it''s three', 3.10, NULL, '{{}}')"
        ),
    )
    .await;

    let mut options = DevServerOptions::new(URL, vec![format!("{schema}.items")]);
    options.server =
        ServerOptions { long_poll_timeout: Duration::from_millis(200), ..ServerOptions::default() };
    let server = DevServer::start(options).await.unwrap();

    // It cannot evaluate SQL, so a `where` is refused, naming the parameter.
    let mut filtered = ShapeOptions::new(server.url().parse().unwrap(), format!("{schema}.items"));
    filtered.where_clause = Some("title = 'two'".into());
    let err = ShapeStream::new(filtered).unwrap().next_event().await.unwrap_err();
    assert!(err.to_string().contains("where"), "{err}");

    let store = MemoryStore::new();
    let source =
        ShapeStream::new(ShapeOptions::new(server.url().parse().unwrap(), format!("{schema}.items")))
            .unwrap();
    let stop = CancellationToken::new();
    let pipeline = Pipeline::new("dev", Box::new(source), Arc::new(MemorySink::new(store.clone())));
    let task = tokio::spawn(pipeline.run(RunMode::Follow, stop.clone()));
    let key = |id: &str| format!("\"{schema}\".\"items\"/\"{id}\"");
    wait_for(
        &store,
        &[(key("2"), Some("two")), (key("3"), Some("it's three")), (key("9007199254740993"), Some("big"))],
    )
    .await;
    let big = store.get(&key("9007199254740993")).unwrap();
    assert_eq!(big.get("id"), Some(&Value::Int(9_007_199_254_740_993)));
    assert_eq!(big.get("amount"), Some(&Value::Numeric("12345678901234567890.5".into())));
    assert_eq!(big.get("flag"), Some(&Value::Bool(true)));
    assert_eq!(
        big.get("tags"),
        Some(&Value::Array(vec![Value::Text("a".into()), Value::Text("b c".into())]))
    );

    // One transaction: an insert, an update, a delete, and a key change.
    sql(
        &pool,
        format!(
            "BEGIN;
             INSERT INTO {schema}.items (id, title) VALUES (4, 'four');
             UPDATE {schema}.items SET title = 'TWO', amount = 2.50 WHERE id = 2;
             DELETE FROM {schema}.items WHERE id = 9007199254740993;
             UPDATE {schema}.items SET id = 30 WHERE id = 3;
             COMMIT"
        ),
    )
    .await;
    wait_for(&store, &[(key("2"), Some("TWO")), (key("30"), Some("it's three")), (key("4"), Some("four"))])
        .await;
    assert_eq!(store.get(&key("2")).unwrap().get("amount"), Some(&Value::Numeric("2.50".into())));

    stop.cancel();
    task.await.unwrap().unwrap();
    let slot = server.slot_name().to_owned();
    server.stop().await.unwrap();
    // This server's slot only: other tests (or instances) may hold their own. Postgres
    // drops a temporary slot when its session has ended, a moment after the disconnect.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let slots: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1")
            .bind(&slot)
            .fetch_one(&pool)
            .await
            .unwrap();
        if slots == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the temporary slot goes with the server");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sql(&pool, format!("DROP SCHEMA {schema} CASCADE")).await;
}

/// Rows inserted by writers that run throughout the devserver's start-up each reach a
/// client exactly once: as a snapshot row or as one live insert, never both, never
/// neither (the snapshot and the replication slot meet exactly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_racing_the_start_reach_the_client_exactly_once() {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use shapesync_core::Operation;
    use shapesync_electric::ShapeEvent;

    let pool = PgPool::connect(URL).await.expect("local Postgres on 5432, database `test`");
    let schema = format!("shapesync_race_{}", std::process::id());
    sql(&pool, format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}")).await;
    sql(&pool, format!("CREATE TABLE {schema}.items (id int8 PRIMARY KEY, title text)")).await;
    let table = format!("{schema}.items");

    // Four writers, each inserting rows of its own in transactions of their own.
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(Mutex::new(Vec::<i64>::new()));
    let writers: Vec<_> = (0..4i64)
        .map(|w| {
            let (pool, stop, committed, table) =
                (pool.clone(), stop.clone(), committed.clone(), table.clone());
            tokio::spawn(async move {
                let mut id = w;
                while !stop.load(Ordering::SeqCst) {
                    let insert = format!("INSERT INTO {table} VALUES ({id}, 'row {id}')");
                    sqlx::raw_sql(AssertSqlSafe(insert)).execute(&pool).await.unwrap();
                    committed.lock().unwrap().push(id);
                    id += 4;
                }
            })
        })
        .collect();
    let count = || committed.lock().unwrap().len();
    while count() < 50 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut options = DevServerOptions::new(URL, vec![table.clone()]);
    options.server =
        ServerOptions { long_poll_timeout: Duration::from_millis(200), ..ServerOptions::default() };
    let server = DevServer::start(options).await.unwrap();
    let started_at = count();
    while count() < started_at + 200 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    let want: Vec<i64> = {
        let mut ids = committed.lock().unwrap().clone();
        ids.sort();
        ids
    };

    // Every change the client gets, by row.
    let mut stream =
        ShapeStream::new(ShapeOptions::new(server.url().parse().unwrap(), table.clone())).unwrap();
    let mut seen: BTreeMap<i64, Vec<Operation>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let event =
            tokio::time::timeout(Duration::from_secs(10), stream.next_event()).await.unwrap().unwrap();
        let ShapeEvent::Response(response) = event else { panic!("unexpected refetch") };
        for change in response.changes {
            let Some(Value::Int(id)) = change.value.get("id").cloned() else { panic!("no id: {change:?}") };
            seen.entry(id).or_default().push(change.op);
        }
        if response.up_to_date && seen.len() >= want.len() {
            break;
        }
        assert!(Instant::now() < deadline, "the client saw {} of {} rows", seen.len(), want.len());
    }
    let ids: Vec<i64> = seen.keys().copied().collect();
    assert_eq!(ids, want, "exactly the committed rows");
    let twice: Vec<_> = seen.iter().filter(|(_, ops)| ops.as_slice() != [Operation::Insert]).collect();
    assert!(twice.is_empty(), "rows not delivered as exactly one insert: {twice:?}");
    server.stop().await.unwrap();
    sql(&pool, format!("DROP SCHEMA {schema} CASCADE")).await;
}
