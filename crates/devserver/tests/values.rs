//! Values and schema fields arrive as Electric sends them for the same rows: Electric's
//! session settings (`lib/electric/postgres.ex`: ISO dates, UTC, ISO 8601 intervals,
//! shortest exact floats), `char(n)` padding kept (`shapes/querying.ex`), bit strings as
//! their digits, and `max_length` / `length` / `precision` / `scale` from the type
//! modifiers (`schema.ex`). Both from the snapshot and from the replication stream.

use std::time::Duration;

use serde_json::{Value as Json, json};
use shapesync_devserver::{DevServer, DevServerOptions};
use shapesync_testkit::ServerOptions;
use sqlx::{AssertSqlSafe, PgPool};

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// One row's values, as Electric's text for them.
fn expected(id: &str) -> Json {
    json!({
        "id": id,
        "at": "2026-01-02 01:04:05.678+00",
        "day": "2026-01-02",
        "span": "P1DT2H",
        "code": "ab   ",
        "bits": "101",
        "vbits": "11",
        "amount": "3.10",
        "ratio": "0.1",
        "doc": "{\"a\": [1, 2], \"b\": 1}",
        "nums": "{1,2}",
        "name": "x",
        "gone": null,
    })
}

const VALUES: &str = "'2026-01-02 03:04:05.678+02', '2026-01-02', '1 day 2 hours', 'ab', B'101', B'11', 3.1, 0.1, '{\"b\": 1, \"a\": [1, 2]}', '{1,2}', 'x', NULL";

fn values(body: &Json) -> Vec<Json> {
    body.as_array().unwrap().iter().filter(|m| m.get("value").is_some()).map(|m| m["value"].clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_and_schema_fields_are_electrics() {
    let pool = PgPool::connect(URL).await.expect("local Postgres, database `test`");
    let schema = format!("shapesync_dev_values_{}", std::process::id());
    let table = format!("{schema}.kinds");
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};
         CREATE TABLE {table} (id int8 PRIMARY KEY, at timestamptz, day date, span interval, code char(5),
           bits bit(3), vbits varbit(5), amount numeric(10,2), ratio float8, doc jsonb, nums int4[],
           name varchar(20), gone text);
         SET TimeZone = 'America/New_York'; SET DateStyle = 'SQL, MDY'; SET IntervalStyle = 'postgres';
         INSERT INTO {table} VALUES (1, {VALUES});"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let mut options = DevServerOptions::new(URL, vec![table.clone()]);
    options.server =
        ServerOptions { long_poll_timeout: Duration::from_millis(200), ..ServerOptions::default() };
    let server = DevServer::start(options).await.unwrap();
    let http = reqwest::Client::new();

    let snapshot =
        http.get(server.url()).query(&[("table", table.as_str()), ("offset", "-1")]).send().await.unwrap();
    let header = |name: &str| snapshot.headers()[name].to_str().unwrap().to_owned();
    let (handle, mut offset) = (header("electric-handle"), header("electric-offset"));
    let schema_header: Json = serde_json::from_str(&header("electric-schema")).unwrap();
    assert_eq!(schema_header["code"], json!({"type": "bpchar", "length": 5}));
    assert_eq!(schema_header["bits"], json!({"type": "bit", "length": 3}));
    assert_eq!(schema_header["vbits"], json!({"type": "varbit", "length": 5}));
    assert_eq!(schema_header["amount"], json!({"type": "numeric", "precision": 10, "scale": 2}));
    assert_eq!(schema_header["name"], json!({"type": "varchar", "max_length": 20}));
    assert_eq!(schema_header["nums"], json!({"type": "int4", "dims": 1}));
    assert_eq!(schema_header["at"], json!({"type": "timestamptz"}));
    let body: Json = snapshot.json().await.unwrap();
    assert_eq!(values(&body), [expected("1")], "snapshot values");

    // The same values through the replication stream (another session's settings again).
    sqlx::raw_sql(AssertSqlSafe(format!(
        "SET TimeZone = 'Asia/Tokyo'; SET IntervalStyle = 'sql_standard'; INSERT INTO {table} VALUES (2, {VALUES})"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let live = loop {
        let response = http
            .get(server.url())
            .query(&[("table", table.as_str()), ("offset", offset.as_str()), ("handle", handle.as_str())])
            .send()
            .await
            .unwrap();
        offset = response.headers()["electric-offset"].to_str().unwrap().to_owned();
        let found = values(&response.json::<Json>().await.unwrap());
        if !found.is_empty() {
            break found;
        }
        assert!(std::time::Instant::now() < deadline, "the live insert arrives");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(live, [expected("2")], "replicated values");
    server.stop().await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&pool).await.unwrap();
}

/// A transaction over two tables reaches both shapes at its commit LSN, with its xid in
/// `txids` (what a client waiting for its own write's transaction matches on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_over_two_tables_shares_its_lsn_and_xid() {
    let pool = PgPool::connect(URL).await.expect("local Postgres, database `test`");
    let schema = format!("shapesync_dev_twotables_{}", std::process::id());
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};
         CREATE TABLE {schema}.a (id int8 PRIMARY KEY); CREATE TABLE {schema}.b (id int8 PRIMARY KEY);"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let (a, b) = (format!("{schema}.a"), format!("{schema}.b"));
    let mut options = DevServerOptions::new(URL, vec![a.clone(), b.clone()]);
    options.server =
        ServerOptions { long_poll_timeout: Duration::from_millis(200), ..ServerOptions::default() };
    let server = DevServer::start(options).await.unwrap();
    let http = reqwest::Client::new();
    let mut positions = Vec::new();
    for table in [&a, &b] {
        let r = http
            .get(server.url())
            .query(&[("table", table.as_str()), ("offset", "-1")])
            .send()
            .await
            .unwrap();
        let h = |n: &str| r.headers()[n].to_str().unwrap().to_owned();
        positions.push((table.clone(), h("electric-handle"), h("electric-offset")));
    }
    let mut tx = pool.begin().await.unwrap();
    let xid: String =
        sqlx::query_scalar("SELECT pg_current_xact_id()::xid::text").fetch_one(&mut *tx).await.unwrap();
    // Interleaved: a, b, a — each table's part still holds its rows at offsets of their own.
    for (table, id) in [(&a, 1), (&b, 1), (&a, 2)] {
        sqlx::raw_sql(AssertSqlSafe(format!("INSERT INTO {table} VALUES ({id})")))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    let mut seen = Vec::new();
    for ((table, handle, mut offset), rows) in positions.into_iter().zip([2, 1]) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut changes = Vec::new();
        while changes.len() < rows {
            let r = http
                .get(server.url())
                .query(&[("table", table.as_str()), ("offset", offset.as_str()), ("handle", handle.as_str())])
                .send()
                .await
                .unwrap();
            offset = r.headers()["electric-offset"].to_str().unwrap().to_owned();
            let body: Json = r.json().await.unwrap();
            changes.extend(body.as_array().unwrap().iter().filter(|m| m.get("value").is_some()).cloned());
            assert!(std::time::Instant::now() < deadline, "the inserts into {table} arrive");
        }
        assert_eq!(changes.len(), rows, "{table}: {changes:?}");
        let mut positions: Vec<String> =
            changes.iter().map(|c| c["headers"]["op_position"].to_string()).collect();
        positions.dedup();
        assert_eq!(positions.len(), rows, "{table}: each change at an offset of its own: {changes:?}");
        for change in &changes {
            let headers = &change["headers"];
            assert_eq!(headers["txids"], json!([xid.parse::<u64>().unwrap()]), "{table}: {change}");
            seen.push(headers["lsn"].clone());
        }
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "every part carries the commit's LSN: {seen:?}");
    server.stop().await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&pool).await.unwrap();
}
