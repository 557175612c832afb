//! Every column type of the protocol (`electric-protocol.md` §8), as Electric writes it
//! (Postgres text output with `DateStyle=ISO, DMY`, `TimeZone=UTC`,
//! `IntervalStyle=iso_8601`, `extra_float_digits=1`, `bytea_output=hex`), through a whole
//! pipeline into each sink, read back exactly: the Postgres sink's typed columns give
//! back the very text the server sent; Redis and SQLite hold their documented renderings.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use shapesync_testkit::{Column, ServerOptions, TableDef, TestServer};
use support::{REDIS, Target};

/// (column, Postgres type, dims, the server's text for it).
const COLUMNS: &[(&str, &str, u32, Option<&str>)] = &[
    ("id", "int8", 0, Some("9007199254740993")),
    ("i2", "int2", 0, Some("-32768")),
    ("f4", "float4", 0, Some("1.5")),
    ("f8", "float8", 0, Some("0.1")),
    ("nan", "float8", 0, Some("NaN")),
    ("ninf", "float4", 0, Some("-Infinity")),
    ("num", "numeric", 0, Some("12345678901234567890.123456789")),
    ("flag", "bool", 0, Some("t")),
    ("txt", "text", 0, Some("it's \"quoted\" \\ back, {braces} / slash")),
    ("ch", "bpchar", 0, Some("ab   ")),
    ("doc", "jsonb", 0, Some(r#"{"n": 9007199254740993, "x": [1.10]}"#)),
    ("uid", "uuid", 0, Some("5f0c7d8e-3f6a-4a8b-9d7e-2b1c0a9f8e7d")),
    ("d", "date", 0, Some("2026-11-29")),
    ("ts", "timestamp", 0, Some("2026-11-29 10:00:00.123456")),
    ("tstz", "timestamptz", 0, Some("2026-11-29 10:00:00+00")),
    ("tm", "time", 0, Some("10:00:00")),
    ("iv", "interval", 0, Some("P1Y2M3DT4H5M6S")),
    ("bin", "bytea", 0, Some("\\x00ff")),
    ("boxes", "box", 1, Some("{(3,4),(1,2);(7,8),(5,6)}")),
    ("grid", "int4", 2, Some("{{1,2},{3,NULL}}")),
    ("tags", "text", 1, Some(r#"{"a \"b\"",NULL,"c,d"}"#)),
    ("mood", "mood", 0, Some("happy")),
    ("gone", "text", 0, None),
];

async fn run_into(store: &Target, name: &str) {
    let server = TestServer::start(ServerOptions {
        long_poll_timeout: Duration::from_millis(200),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut def = TableDef::new(name);
    for (column, ty, dims, _) in COLUMNS {
        let mut c = Column::new(*column, *ty).dims(*dims);
        if *column == "id" {
            c = c.primary_key().not_null();
        }
        def = def.column(c);
    }
    let table = server.create_table(def);
    let row: serde_json::Map<String, serde_json::Value> =
        COLUMNS.iter().map(|(c, _, _, v)| ((*c).to_owned(), json!(v))).collect();
    table.seed([serde_json::Value::Object(row)]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("types.yaml");
    std::fs::write(
        &file,
        format!(
            "pipelines:\n  {}:\n    source: {{type: electric, url: '{}', table: {name}}}\n    sink: {}\n",
            store.pipeline,
            server.url(),
            store.sink_yaml()
        ),
    )
    .unwrap();
    support::run_once(&file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_columns_give_back_the_servers_text_for_every_type() {
    let mut store = Target::postgres("types_pg", "types_pg", "types_pg").await;
    run_into(&store, "types_pg").await;
    let support::Store::Postgres { pool, schema } = &store.store else { unreachable!() };
    let mut conn = pool.acquire().await.unwrap();
    // Electric's output settings, so each type's output function (`concat` calls it; a
    // `::text` cast would print a bool as `true`) prints what the server printed.
    sqlx::raw_sql(
        "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, DMY'; SET IntervalStyle = 'iso_8601'; \
         SET extra_float_digits = 1; SET bytea_output = 'hex'",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    for (column, _, _, text) in COLUMNS {
        let sql = format!(
            "SELECT CASE WHEN \"{column}\" IS NULL THEN NULL ELSE concat(\"{column}\") END FROM {schema}.types_pg"
        );
        let got: Option<String> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&mut *conn).await.unwrap();
        assert_eq!(got.as_deref(), *text, "column {column}");
    }
    drop(conn);
    store.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_hash_fields_hold_the_documented_renderings_of_every_type() {
    let mut store = Target::redis_layout(REDIS, "types_redis", "types_redis", "types_redis", "hash");
    run_into(&store, "types_redis").await;
    let support::Store::Redis { con, prefix, .. } = &mut store.store else { unreachable!() };
    let fields: BTreeMap<String, String> =
        redis::cmd("HGETALL").arg(format!("{prefix}types_redis:9007199254740993")).query(con).unwrap();
    // `Value::render`: numbers in their shortest exact form, booleans `true`/`false`,
    // arrays as JSON, everything else the server's own text; NULL columns are absent.
    let rendered = |column: &str| -> Option<String> {
        let (_, _, _, text) = COLUMNS.iter().find(|(c, ..)| *c == column).unwrap();
        let text = (*text)?;
        Some(match column {
            "flag" => "true".into(),
            "boxes" => r#"["(3,4),(1,2)","(7,8),(5,6)"]"#.into(),
            "grid" => "[[1,2],[3,null]]".into(),
            "tags" => r#"["a \"b\"",null,"c,d"]"#.into(),
            _ => text.to_owned(),
        })
    };
    for (column, ..) in COLUMNS {
        assert_eq!(fields.get(*column).cloned(), rendered(column), "field {column}");
    }
    store.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_columns_hold_the_documented_values_of_every_type() {
    let dir = tempfile::tempdir().unwrap();
    let store = Target::sqlite("types_sqlite", "types_sqlite", dir.path());
    run_into(&store, "types_sqlite").await;
    let conn = rusqlite::Connection::open(dir.path().join("types_sqlite.db")).unwrap();
    for (column, _, _, text) in COLUMNS {
        let got: rusqlite::types::Value =
            conn.query_row(&format!("SELECT \"{column}\" FROM types_sqlite"), [], |r| r.get(0)).unwrap();
        use rusqlite::types::Value as Sql;
        let want = match (*column, text) {
            (_, None) => Sql::Null,
            ("id", _) => Sql::Integer(9_007_199_254_740_993),
            ("i2", _) => Sql::Integer(-32768),
            ("f4", _) => Sql::Real(1.5),
            ("f8", _) => Sql::Real(0.1),
            ("nan", _) => Sql::Text("NaN".into()),
            ("ninf", _) => Sql::Real(f64::NEG_INFINITY),
            ("flag", _) => Sql::Integer(1),
            ("boxes", _) => Sql::Text(r#"["(3,4),(1,2)","(7,8),(5,6)"]"#.into()),
            ("grid", _) => Sql::Text("[[1,2],[3,null]]".into()),
            ("tags", _) => Sql::Text(r#"["a \"b\"",null,"c,d"]"#.into()),
            (_, Some(t)) => Sql::Text((*t).into()),
        };
        assert_eq!(got, want, "column {column}");
    }
}
