//! Integration tests against real SQLite database files, each in its own temporary
//! directory.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use rusqlite::Connection;
use rusqlite::types::Value as Sql;
use shapesync_core::{Change, ErrorCode, ShapeInfo, Sink, SinkConfig, SinkContext, SinkErrorKind, Value};
use shapesync_sink_sqlite::{CHECKPOINT_TABLE, GENERATION_COLUMN, SqliteSink, SqliteSinkConfig};
use shapesync_testkit::fixtures::{batch, checkpoint, item, items_schema, live, row, schema};

fn sink_at(path: &Path, table: &str, pipeline: &str) -> SqliteSink {
    let ctx = SinkContext {
        pipeline: pipeline.into(),
        shape: ShapeInfo { table: table.into(), ..Default::default() },
    };
    SqliteSink::new(SqliteSinkConfig::new(path), ctx)
}

/// Every row of `table` with every column (the generation included), as SQLite holds
/// them, ordered by rowid-independent primary key text.
fn dump(path: &Path, table: &str) -> Vec<Vec<(String, Sql)>> {
    let conn = Connection::open(path).unwrap();
    let quoted = format!("\"{}\"", table.replace('"', "\"\""));
    let mut stmt = conn.prepare(&format!("SELECT * FROM {quoted} ORDER BY 1")).unwrap();
    let names: Vec<String> = stmt.column_names().into_iter().map(str::to_owned).collect();
    stmt.query_map([], |r| (0..names.len()).map(|i| Ok((names[i].clone(), r.get::<_, Sql>(i)?))).collect())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn column<'a>(row: &'a [(String, Sql)], name: &str) -> &'a Sql {
    &row.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no column {name}")).1
}

#[tokio::test]
async fn every_type_is_stored_exactly_with_the_declared_affinity() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("types.db");
    let sink = sink_at(&path, "public.things", "types");
    let schema = schema(
        r#"{"id":{"type":"int8","pk_index":0,"not_null":true},"flag":{"type":"bool"},"ratio":{"type":"float8"},
            "nan":{"type":"float8"},"inf":{"type":"float4"},"price":{"type":"numeric"},"doc":{"type":"jsonb"},
            "tags":{"type":"text","dims":1},"uid":{"type":"uuid"},"gone":{"type":"text"}}"#,
    );
    const BIG: i64 = 9_007_199_254_740_993;
    let values = row(&[
        ("id", Value::Int(BIG)),
        ("flag", Value::Bool(true)),
        ("ratio", Value::Float(0.1)),
        ("nan", Value::Float(f64::NAN)),
        ("inf", Value::Float(f64::NEG_INFINITY)),
        ("price", Value::Numeric("12345678901234567890.123456789".into())),
        ("doc", Value::Json(r#"{"n": 9007199254740993, "x": [1.10]}"#.into())),
        ("tags", Value::Array(vec![Value::Text("a".into()), Value::Null, Value::Text("c,d".into())])),
        ("uid", Value::Text("5f0c7d8e-3f6a-4a8b-9d7e-2b1c0a9f8e7d".into())),
        ("gone", Value::Null),
    ]);
    sink.apply(&batch(vec![Change::insert("k", values)], checkpoint(schema, "0_inf", 7))).await.unwrap();

    let rows = dump(&path, "things");
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(column(r, "id"), &Sql::Integer(BIG));
    assert_eq!(column(r, "flag"), &Sql::Integer(1));
    assert_eq!(column(r, "ratio"), &Sql::Real(0.1));
    assert_eq!(column(r, "nan"), &Sql::Text("NaN".into()));
    assert_eq!(column(r, "inf"), &Sql::Real(f64::NEG_INFINITY));
    assert_eq!(column(r, "price"), &Sql::Text("12345678901234567890.123456789".into()));
    assert_eq!(column(r, "doc"), &Sql::Text(r#"{"n": 9007199254740993, "x": [1.10]}"#.into()));
    assert_eq!(column(r, "tags"), &Sql::Text(r#"["a",null,"c,d"]"#.into()));
    assert_eq!(column(r, "uid"), &Sql::Text("5f0c7d8e-3f6a-4a8b-9d7e-2b1c0a9f8e7d".into()));
    assert_eq!(column(r, "gone"), &Sql::Null);
    assert_eq!(column(r, GENERATION_COLUMN), &Sql::Integer(7));

    let conn = Connection::open(&path).unwrap();
    let declared: Vec<(String, String)> = conn
        .prepare("SELECT name, type FROM pragma_table_info('things') ORDER BY cid")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let declared_of = |c: &str| declared.iter().find(|(n, _)| n == c).unwrap().1.clone();
    assert_eq!(declared_of("id"), "INTEGER");
    assert_eq!(declared_of("flag"), "INTEGER");
    assert_eq!(declared_of("ratio"), "REAL");
    assert_eq!(declared_of("price"), "TEXT", "numeric stays exact text");
    assert_eq!(declared_of("tags"), "TEXT");
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn replaying_committed_batches_leaves_the_table_and_checkpoint_identical() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replay.db");
    let sink = sink_at(&path, "items", "replay");
    let snapshot = batch(
        (1..=3).map(|i| Change::insert(format!("k{i}"), item(i, "a"))).collect(),
        checkpoint(items_schema(), "0_inf", 1),
    );
    let tx = batch(
        vec![
            live(
                Change::update("k1", row(&[("id", Value::Int(1)), ("note", Value::Text("n".into()))])),
                5,
                0,
            ),
            live(Change::delete("k2", row(&[("id", Value::Int(2))])), 5, 2),
            live(Change::insert("k4", item(4, "d")), 5, 4),
        ],
        checkpoint(items_schema(), "5_4", 1),
    );
    sink.apply(&snapshot).await.unwrap();
    sink.apply(&tx).await.unwrap();
    let before = (dump(&path, "items"), sink.checkpoint().await.unwrap());
    sink.apply(&tx).await.unwrap();
    assert_eq!((dump(&path, "items"), sink.checkpoint().await.unwrap()), before);
    // A new sink over the same file (a restart) sees the same checkpoint.
    assert_eq!(sink_at(&path, "items", "replay").checkpoint().await.unwrap(), before.1);
    let rows = before.0;
    assert_eq!(rows.len(), 3);
    assert_eq!(column(&rows[0], "name"), &Sql::Text("a".into()), "partial update keeps other columns");
    assert_eq!(column(&rows[0], "note"), &Sql::Text("n".into()));
}

#[tokio::test]
async fn a_batch_that_fails_part_way_leaves_rows_and_checkpoint_as_they_were() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("atomic.db");
    let sink = sink_at(&path, "items", "atomic");
    let first = batch(vec![Change::insert("k1", item(1, "a"))], checkpoint(items_schema(), "0_inf", 1));
    sink.apply(&first).await.unwrap();
    let before = dump(&path, "items");

    // The second change has no primary-key value: the sink refuses it after writing the
    // first change of the batch, so the transaction must roll back.
    let broken = batch(
        vec![
            live(Change::insert("k2", item(2, "b")), 9, 0),
            live(Change::update("k3", row(&[("name", Value::Text("x".into()))])), 9, 2),
        ],
        checkpoint(items_schema(), "9_2", 1),
    );
    let err = sink.apply(&broken).await.unwrap_err();
    assert!(
        matches!(&err, e if e.kind() == SinkErrorKind::Rejected && e.message().contains("`id`")),
        "{err}"
    );
    assert_eq!(dump(&path, "items"), before, "no row of the failed batch is visible");
    assert_eq!(sink.checkpoint().await.unwrap(), Some(first.checkpoint));
}

#[tokio::test]
async fn hostile_table_and_column_names_stay_identifiers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hostile.db");
    let table = r#"it"ems; DROP TABLE x; --"#;
    let sink = sink_at(&path, table, "hostile");
    let schema = schema(
        r#"{"i\"d":{"type":"int8","pk_index":0},"na me); DELETE FROM \"_shapesync_checkpoints\"; --":{"type":"text"}}"#,
    );
    let hostile_column = r#"na me); DELETE FROM "_shapesync_checkpoints"; --"#;
    let r = row(&[("i\"d", Value::Int(1)), (hostile_column, Value::Text("v".into()))]);
    sink.apply(&batch(vec![Change::insert("k", r.clone())], checkpoint(schema.clone(), "0_inf", 1)))
        .await
        .unwrap();
    sink.apply(&batch(vec![live(Change::update("k", r), 3, 0)], checkpoint(schema.clone(), "3_0", 1)))
        .await
        .unwrap();
    let rows = dump(&path, table);
    assert_eq!(column(&rows[0], hostile_column), &Sql::Text("v".into()));
    assert_eq!(sink.checkpoint().await.unwrap(), Some(checkpoint(schema, "3_0", 1)));
}

#[tokio::test]
async fn a_resync_sweeps_exactly_the_vanished_rows_while_readers_always_see_the_kept_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resync.db");
    let sink = sink_at(&path, "items", "resync");
    let initial = batch(
        (1..=2_000).map(|i| Change::insert(format!("k{i}"), item(i, "old"))).collect(),
        checkpoint(items_schema(), "0_inf", 1),
    );
    sink.apply(&initial).await.unwrap();

    // A reader in another connection polls while the resync runs: rows 1..=1500 exist
    // before and after, so it must always count all of them.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (path, stop) = (path.clone(), stop.clone());
        thread::spawn(move || {
            let conn = Connection::open(&path).unwrap();
            let (mut polls, mut bad) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) || polls == 0 {
                let n: i64 =
                    conn.query_row("SELECT count(*) FROM items WHERE id <= 1500", [], |r| r.get(0)).unwrap();
                if n != 1500 {
                    bad.push(n);
                }
                polls += 1;
            }
            (polls, bad)
        })
    };
    for chunk in 0..3i64 {
        let ids = (chunk * 500 + 1)..=(chunk * 500 + 500);
        let mut b = batch(
            ids.map(|i| Change::insert(format!("k{i}"), item(i, "new"))).collect(),
            checkpoint(items_schema(), &format!("0_{chunk}"), 2),
        );
        b.checkpoint.resyncing = true;
        b.up_to_date = false;
        sink.apply(&b).await.unwrap();
    }
    let mut end = batch(vec![], checkpoint(items_schema(), "0_inf", 2));
    end.sweep = true;
    sink.apply(&end).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let (polls, bad) = reader.join().unwrap();
    assert!(bad.is_empty(), "a reader saw {bad:?} of 1500 kept rows");
    assert!(polls > 0);

    let rows = dump(&path, "items");
    assert_eq!(rows.len(), 1_500, "rows 1501..=2000 left the shape and are swept");
    assert!(rows.iter().all(|r| column(r, "name") == &Sql::Text("new".into())));
    assert_eq!(sink.checkpoint().await.unwrap(), Some(end.checkpoint));
}

#[tokio::test]
async fn new_columns_are_added_and_a_changed_primary_key_is_refused_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evolve.db");
    let sink = sink_at(&path, "items", "evolve");
    sink.apply(&batch(vec![Change::insert("k1", item(1, "a"))], checkpoint(items_schema(), "0_inf", 1)))
        .await
        .unwrap();

    let wider = schema(
        r#"{"id":{"type":"int8","pk_index":0},"name":{"type":"text"},"note":{"type":"text"},"score":{"type":"int4"}}"#,
    );
    let mut r = item(2, "b");
    r.insert("score", Value::Int(42));
    sink.apply(&batch(vec![Change::insert("k2", r)], checkpoint(wider, "0_inf", 2))).await.unwrap();
    let rows = dump(&path, "items");
    assert_eq!(column(&rows[0], "score"), &Sql::Null);
    assert_eq!(column(&rows[1], "score"), &Sql::Integer(42));

    let other_key = schema(r#"{"id":{"type":"int8"},"name":{"type":"text","pk_index":0}}"#);
    let err = sink_at(&path, "items", "evolve")
        .apply(&batch(vec![Change::insert("k3", item(3, "c"))], checkpoint(other_key, "0_inf", 3)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, e if e.kind() == SinkErrorKind::Rejected && e.message().contains("drop the table")),
        "{err}"
    );
}

#[tokio::test]
async fn a_locked_database_is_unavailable_and_the_retry_succeeds_once_released() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locked.db");
    let ctx = SinkContext {
        pipeline: "locked".into(),
        shape: ShapeInfo { table: "items".into(), ..Default::default() },
    };
    let mut config = SqliteSinkConfig::new(&path);
    config.busy_timeout_ms = 20;
    let sink = SqliteSink::new(config, ctx);
    let b = batch(vec![Change::insert("k1", item(1, "a"))], checkpoint(items_schema(), "0_inf", 1));
    sink.apply(&b).await.unwrap();

    let holder = Connection::open(&path).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let next =
        batch(vec![live(Change::insert("k2", item(2, "b")), 4, 0)], checkpoint(items_schema(), "4_0", 1));
    let locked = sink.apply(&next).await.unwrap_err();
    assert_eq!(locked.kind(), SinkErrorKind::Unavailable, "{locked}");
    // SQLITE_BUSY (5), with the driver's error as the source.
    assert_eq!(locked.code(), Some(&ErrorCode::Sqlite(5)), "{locked:?}");
    assert!(std::error::Error::source(&locked).is_some_and(|s| s.is::<rusqlite::Error>()), "{locked:?}");
    holder.execute_batch("ROLLBACK").unwrap();
    sink.apply(&next).await.unwrap();
    assert_eq!(dump(&path, "items").len(), 2);
    assert_eq!(sink.checkpoint().await.unwrap(), Some(next.checkpoint));
}

#[tokio::test]
async fn pipelines_share_a_file_with_tables_and_checkpoints_of_their_own_and_reset_clears_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let a = sink_at(&path, "items", "a");
    let b = sink_at(&path, "public.other", "b");
    assert_eq!(a.checkpoint().await.unwrap(), None);
    assert!(!path.exists(), "reading a checkpoint creates nothing");

    let ba = batch(vec![Change::insert("k1", item(1, "a"))], checkpoint(items_schema(), "0_inf", 1));
    let bb = batch(vec![Change::insert("k1", item(1, "b"))], checkpoint(items_schema(), "0_inf", 2));
    a.apply(&ba).await.unwrap();
    b.apply(&bb).await.unwrap();
    assert_eq!(a.checkpoint().await.unwrap(), Some(ba.checkpoint.clone()));
    assert_eq!(b.checkpoint().await.unwrap(), Some(bb.checkpoint.clone()));

    // A user's index survives a reset.
    Connection::open(&path).unwrap().execute_batch("CREATE INDEX items_by_name ON items(name)").unwrap();
    a.reset().await.unwrap();
    assert_eq!(a.checkpoint().await.unwrap(), None);
    assert!(dump(&path, "items").is_empty());
    assert_eq!(dump(&path, "other").len(), 1, "the other pipeline keeps its rows");
    assert_eq!(b.checkpoint().await.unwrap(), Some(bb.checkpoint));
    let conn = Connection::open(&path).unwrap();
    let indexes: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema WHERE name = 'items_by_name'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(indexes, 1);
    let checkpoints: i64 =
        conn.query_row(&format!("SELECT count(*) FROM {CHECKPOINT_TABLE}"), [], |r| r.get(0)).unwrap();
    assert_eq!(checkpoints, 1);
}

#[tokio::test]
async fn an_update_that_changes_the_key_moves_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("move.db");
    let sink = sink_at(&path, "items", "move");
    sink.apply(&batch(vec![Change::insert("k1", item(1, "a"))], checkpoint(items_schema(), "0_inf", 1)))
        .await
        .unwrap();
    let mut moved = live(Change::update("k9", item(9, "a")), 3, 0);
    moved.old_value = Some(row(&[("id", Value::Int(1))]));
    sink.apply(&batch(vec![moved], checkpoint(items_schema(), "3_0", 1))).await.unwrap();
    let rows = dump(&path, "items");
    assert_eq!(rows.len(), 1);
    assert_eq!(column(&rows[0], "id"), &Sql::Integer(9));
}

#[tokio::test]
async fn unusable_files_and_settings_are_reported_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let missing_dir = dir.path().join("no/such/dir/cache.db");
    let sink = sink_at(&missing_dir, "items", "missing");
    let err = sink.checkpoint().await.unwrap_err();
    assert!(
        matches!(&err, e if e.kind() == SinkErrorKind::Rejected && e.message().contains("does not exist")),
        "{err}"
    );
    let err = sink
        .apply(&batch(vec![Change::insert("k1", item(1, "a"))], checkpoint(items_schema(), "0_inf", 1)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, e if e.kind() == SinkErrorKind::Rejected && e.message().contains("directory exists")),
        "{err}"
    );
    assert_eq!(err.code(), Some(&ErrorCode::Sqlite(14)), "SQLITE_CANTOPEN: {err:?}");

    let foreign = dir.path().join("foreign.db");
    Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
        .unwrap();
    let err = sink_at(&foreign, "items", "foreign")
        .apply(&batch(vec![Change::insert("k1", item(1, "a"))], checkpoint(items_schema(), "0_inf", 1)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, e if e.kind() == SinkErrorKind::Rejected && e.message().contains("another program owns it")),
        "{err}"
    );

    let ctx = SinkContext {
        pipeline: "p".into(),
        shape: ShapeInfo { table: "items".into(), ..Default::default() },
    };
    for (config, key) in [
        (SqliteSinkConfig::new(":memory:"), "path"),
        (SqliteSinkConfig { table: Some(CHECKPOINT_TABLE.into()), ..SqliteSinkConfig::new("x.db") }, "table"),
        (SqliteSinkConfig { busy_timeout_ms: 0, ..SqliteSinkConfig::new("x.db") }, "busy_timeout_ms"),
    ] {
        assert_eq!(config.check(&ctx).unwrap_err().key, key);
    }
}

#[tokio::test]
async fn reading_the_checkpoint_writes_nothing_to_an_existing_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    Connection::open(&path).unwrap().execute_batch("CREATE TABLE app_data (x INTEGER)").unwrap();
    let sink = sink_at(&path, "items", "reader");
    assert_eq!(sink.checkpoint().await.unwrap(), None);
    let tables: Vec<String> = Connection::open(&path)
        .unwrap()
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(tables, ["app_data"], "validate --connect and checkpoints only read");
    sink.reset().await.unwrap();
    assert_eq!(sink.checkpoint().await.unwrap(), None);
}
