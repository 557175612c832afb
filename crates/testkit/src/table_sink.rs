//! The SQL-table sink suite: [`check_table_sink`] checks what every sink that mirrors a
//! shape as a SQL table promises beyond the `Sink` contract of
//! [`crate::compliance::check_sink`] — the SQLite and Postgres sinks pass it, and a MySQL
//! or DuckDB plugin can call it too. Through a [`TableSinkUnderTest`], which opens sinks
//! and runs SQL on a connection of its own, it checks that:
//! - replaying committed batches leaves the table and the checkpoint identical, and an
//!   update carrying some columns merges them (a new instance reads the checkpoint back);
//! - a batch that fails part-way leaves rows and checkpoint as they were;
//! - hostile table and column names stay identifiers;
//! - a resync sweeps exactly the vanished rows, while a reader polling all along always
//!   sees the kept ones;
//! - a column that joins the shape is added, and a changed primary key is refused with
//!   advice;
//! - pipelines share a store with tables and checkpoints of their own, and `reset`
//!   clears one pipeline's rows and checkpoint but keeps its table and the reader's
//!   index on it;
//! - an update that changes the key moves the row;
//! - a table of the same name that the sink did not create is refused, not written.
//!
//! Each check writes tables of its own, so all run against one store. The SQL the suite
//! runs is standard: double-quoted identifiers, `CAST(… AS TEXT)`, `CREATE INDEX`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use shapesync_core::{Batch, Change, ShapeInfo, Sink, SinkErrorKind, Value, async_trait};
use shapesync_sql_table::{CHECKPOINT_TABLE, GENERATION_COLUMN, quote};

use crate::fixtures::{batch, checkpoint, item, items_schema, live, row, schema};

/// A SQL-table sink and a connection of the harness's own to its database, for
/// [`check_table_sink`].
#[async_trait]
pub trait TableSinkUnderTest: Send + Sync {
    /// A new sink (another call: another instance, as after a restart) writing the shape
    /// of `shape.table` for `pipeline` into the store under test.
    async fn open(&self, pipeline: &str, shape: ShapeInfo) -> Arc<dyn Sink>;
    /// The sink's table named `table`, as SQL: quoted, qualified as the sink qualifies it.
    fn table(&self, table: &str) -> String;
    /// Runs a statement; the database's refusal as text.
    async fn execute(&self, sql: &str) -> Result<(), String>;
    /// Runs a query whose columns are all text (the suite casts them); each row's
    /// values, NULL as `None`.
    async fn query(&self, sql: &str) -> Vec<Vec<Option<String>>>;
}

/// Runs every check against `target`; panics with a message naming the broken rule.
pub async fn check_table_sink(target: Arc<dyn TableSinkUnderTest>) {
    replay_changes_nothing(&*target).await;
    a_failed_batch_writes_nothing(&*target).await;
    hostile_names_stay_identifiers(&*target).await;
    a_resync_sweeps_only_vanished_rows(&target).await;
    new_columns_are_added_and_a_new_key_refused(&*target).await;
    pipelines_share_a_store_and_reset_clears_one(&*target).await;
    a_key_change_moves_the_row(&*target).await;
    a_foreign_table_is_refused(&*target).await;
}

/// A sink of `pipeline` writing the shape of table `shape_table`.
async fn open(target: &dyn TableSinkUnderTest, shape_table: &str, pipeline: &str) -> Arc<dyn Sink> {
    target.open(pipeline, ShapeInfo { table: shape_table.into(), ..Default::default() }).await
}

/// Column `column` of every row of `table`, ordered by `id`.
async fn column(target: &dyn TableSinkUnderTest, table: &str, column: &str) -> Vec<Option<String>> {
    let sql = format!("SELECT CAST({} AS TEXT) FROM {} ORDER BY id", quote(column), target.table(table));
    target.query(&sql).await.into_iter().map(|mut r| r.remove(0)).collect()
}

/// Every row of an `items` table (the generation included), ordered by `id`.
async fn dump(target: &dyn TableSinkUnderTest, table: &str) -> Vec<Vec<Option<String>>> {
    let columns: Vec<String> = ["id", "name", "note", GENERATION_COLUMN]
        .iter()
        .map(|c| format!("CAST({} AS TEXT)", quote(c)))
        .collect();
    let sql = format!("SELECT {} FROM {} ORDER BY id", columns.join(", "), target.table(table));
    target.query(&sql).await
}

fn inserts(ids: impl Iterator<Item = i64>, name: &str) -> Vec<Change> {
    ids.map(|i| Change::insert(format!("k{i}"), item(i, name))).collect()
}

/// Panics unless `result` is a `Rejected` error whose message holds `words`.
fn assert_rejected<T: std::fmt::Debug>(
    result: Result<T, shapesync_core::SinkError>,
    words: &str,
    what: &str,
) {
    match result {
        Err(e) if e.kind() == SinkErrorKind::Rejected && e.message().contains(words) => {}
        other => panic!("{what}: expected a Rejected error saying `{words}`, got {other:?}"),
    }
}

async fn replay_changes_nothing(target: &dyn TableSinkUnderTest) {
    let sink = open(target, "replay", "replay").await;
    let snapshot = batch(inserts(1..=3, "a"), checkpoint(items_schema(), "0_inf", 1));
    let partial = |id: i64, column: &str, text: &str| {
        Change::update(format!("k{id}"), row(&[("id", Value::Int(id)), (column, Value::Text(text.into()))]))
    };
    let tx = batch(
        vec![
            live(partial(1, "note", "n"), 5, 0),
            live(Change::delete("k2", row(&[("id", Value::Int(2))])), 5, 2),
            live(Change::insert("k4", item(4, "d")), 5, 4),
            live(partial(4, "name", "d2"), 5, 6),
        ],
        checkpoint(items_schema(), "5_6", 1),
    );
    sink.apply(&snapshot).await.expect("snapshot");
    sink.apply(&tx).await.expect("transaction");
    let before = (dump(target, "replay").await, sink.checkpoint().await.expect("checkpoint"));
    sink.apply(&tx).await.expect("replayed transaction");
    let after = (dump(target, "replay").await, sink.checkpoint().await.expect("checkpoint"));
    assert_eq!(after, before, "replaying a committed batch changes nothing");
    let restarted = open(target, "replay", "replay").await;
    assert_eq!(restarted.checkpoint().await.expect("checkpoint"), before.1, "a restart reads it back");
    let names = column(target, "replay", "name").await;
    assert_eq!(names, [Some("a".into()), Some("a".into()), Some("d2".into())]);
    let notes = column(target, "replay", "note").await;
    assert_eq!(notes, [Some("n".into()), None, None], "a partial update merges");
}

async fn a_failed_batch_writes_nothing(target: &dyn TableSinkUnderTest) {
    let sink = open(target, "atomic", "atomic").await;
    let first = batch(inserts(1..=1, "a"), checkpoint(items_schema(), "0_inf", 1));
    sink.apply(&first).await.expect("first batch");
    let before = dump(target, "atomic").await;
    // The second change has no primary-key value: the sink refuses it after writing the
    // first change of the batch, so the transaction must roll back.
    let broken = batch(
        vec![
            live(Change::insert("k2", item(2, "b")), 9, 0),
            live(Change::update("k3", row(&[("name", Value::Text("x".into()))])), 9, 2),
        ],
        checkpoint(items_schema(), "9_2", 1),
    );
    assert_rejected(sink.apply(&broken).await, "`id`", "a change without its key");
    assert_eq!(dump(target, "atomic").await, before, "no row of the failed batch is visible");
    assert_eq!(sink.checkpoint().await.expect("checkpoint"), Some(first.checkpoint));
}

async fn hostile_names_stay_identifiers(target: &dyn TableSinkUnderTest) {
    let table = r#"it"ems; DROP TABLE x; --"#;
    let sink = open(target, table, "hostile").await;
    let key = "i\"d";
    let hostile = format!(r#"na me"); DELETE FROM "{CHECKPOINT_TABLE}"; --"#);
    let schema = schema(&format!(
        r#"{{{}:{{"type":"int8","pk_index":0}},{}:{{"type":"text"}}}}"#,
        serde_json::Value::from(key),
        serde_json::Value::from(hostile.as_str())
    ));
    let r = row(&[(key, Value::Int(1)), (&hostile, Value::Text("v".into()))]);
    let first = batch(vec![Change::insert("k", r.clone())], checkpoint(schema.clone(), "0_inf", 1));
    sink.apply(&first).await.expect("insert with hostile names");
    let update = batch(vec![live(Change::update("k", r), 3, 0)], checkpoint(schema.clone(), "3_0", 1));
    sink.apply(&update).await.expect("update with hostile names");
    let sql = format!("SELECT CAST({} AS TEXT) FROM {}", quote(&hostile), target.table(table));
    assert_eq!(target.query(&sql).await, [vec![Some("v".to_owned())]]);
    assert_eq!(sink.checkpoint().await.expect("checkpoint"), Some(update.checkpoint));
}

/// Polls the count of rows 1..=1500 of `table` until `stop`; returns the polls and
/// every count that was not 1500.
async fn count_kept_rows(
    target: Arc<dyn TableSinkUnderTest>,
    table: String,
    stop: Arc<AtomicBool>,
) -> (u64, Vec<String>) {
    let sql = format!("SELECT CAST(count(*) AS TEXT) FROM {table} WHERE id <= 1500");
    let (mut polls, mut bad) = (0u64, Vec::new());
    while !stop.load(Ordering::Relaxed) || polls == 0 {
        let count = target.query(&sql).await.remove(0).remove(0).unwrap_or_default();
        if count != "1500" {
            bad.push(count);
        }
        polls += 1;
        tokio::task::yield_now().await;
    }
    (polls, bad)
}

async fn a_resync_sweeps_only_vanished_rows(target: &Arc<dyn TableSinkUnderTest>) {
    let sink = open(&**target, "resync", "resync").await;
    sink.apply(&batch(inserts(1..=2_000, "old"), checkpoint(items_schema(), "0_inf", 1)))
        .await
        .expect("sync");
    // A reader polls while the resync runs: rows 1..=1500 exist before and after.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(count_kept_rows(target.clone(), target.table("resync"), stop.clone()));
    for part in 0..3i64 {
        let ids = (part * 500 + 1)..=(part * 500 + 500);
        let mut b = batch(inserts(ids, "new"), checkpoint(items_schema(), &format!("0_{part}"), 2));
        b.checkpoint.resyncing = true;
        b.up_to_date = false;
        sink.apply(&b).await.expect("resync part");
    }
    let end = Batch { sweep: true, ..batch(vec![], checkpoint(items_schema(), "0_inf", 2)) };
    sink.apply(&end).await.expect("sweep");
    stop.store(true, Ordering::Relaxed);
    let (polls, bad) = reader.await.expect("reader");
    assert!(bad.is_empty(), "a reader saw {bad:?} of 1500 kept rows");
    assert!(polls > 0);
    let names = column(&**target, "resync", "name").await;
    assert_eq!(names.len(), 1_500, "rows 1501..=2000 left the shape and are swept");
    assert!(names.iter().all(|n| n.as_deref() == Some("new")), "kept rows are the new ones");
    assert_eq!(sink.checkpoint().await.expect("checkpoint"), Some(end.checkpoint));
}

async fn new_columns_are_added_and_a_new_key_refused(target: &dyn TableSinkUnderTest) {
    let sink = open(target, "evolve", "evolve").await;
    sink.apply(&batch(inserts(1..=1, "a"), checkpoint(items_schema(), "0_inf", 1))).await.expect("first");
    let wider = schema(
        r#"{"id":{"type":"int8","pk_index":0},"name":{"type":"text"},"note":{"type":"text"},"score":{"type":"int4"}}"#,
    );
    let mut r = item(2, "b");
    r.insert("score", Value::Int(42));
    sink.apply(&batch(vec![Change::insert("k2", r)], checkpoint(wider, "0_inf", 2))).await.expect("wider");
    assert_eq!(column(target, "evolve", "score").await, [None, Some("42".into())], "a new column is added");

    let other_key = schema(r#"{"id":{"type":"int8"},"name":{"type":"text","pk_index":0}}"#);
    let restarted = open(target, "evolve", "evolve").await;
    let refused = restarted.apply(&batch(inserts(3..=3, "c"), checkpoint(other_key, "0_inf", 3))).await;
    assert_rejected(refused, "drop the table", "a changed primary key");
}

async fn pipelines_share_a_store_and_reset_clears_one(target: &dyn TableSinkUnderTest) {
    let a = open(target, "shared_a", "shared_a").await;
    let b = open(target, "public.shared_b", "shared_b").await;
    assert_eq!(a.checkpoint().await.expect("checkpoint"), None, "nothing stored yet");
    let ba = batch(inserts(1..=1, "a"), checkpoint(items_schema(), "0_inf", 1));
    let bb = batch(inserts(1..=1, "b"), checkpoint(items_schema(), "0_inf", 2));
    a.apply(&ba).await.expect("a");
    b.apply(&bb).await.expect("b");
    assert_eq!(a.checkpoint().await.expect("checkpoint"), Some(ba.checkpoint.clone()));
    assert_eq!(b.checkpoint().await.expect("checkpoint"), Some(bb.checkpoint.clone()));

    let index = format!("CREATE INDEX shared_a_by_name ON {} (name)", target.table("shared_a"));
    target.execute(&index).await.expect("a reader's index");
    a.reset().await.expect("reset");
    assert_eq!(a.checkpoint().await.expect("checkpoint"), None, "reset removes the checkpoint");
    assert!(dump(target, "shared_a").await.is_empty(), "reset removes the rows");
    assert_eq!(dump(target, "shared_b").await.len(), 1, "the other pipeline keeps its rows");
    assert_eq!(b.checkpoint().await.expect("checkpoint"), Some(bb.checkpoint));
    assert!(target.execute(&index).await.is_err(), "the reader's index survives reset");
    let sql = format!(
        "SELECT pipeline FROM {} WHERE pipeline IN ('shared_a', 'shared_b')",
        target.table(CHECKPOINT_TABLE)
    );
    assert_eq!(target.query(&sql).await, [vec![Some("shared_b".to_owned())]], "b's checkpoint row is left");
}

async fn a_key_change_moves_the_row(target: &dyn TableSinkUnderTest) {
    let sink = open(target, "moved", "moved").await;
    sink.apply(&batch(inserts(1..=1, "a"), checkpoint(items_schema(), "0_inf", 1))).await.expect("insert");
    let mut moved = live(Change::update("k9", item(9, "a")), 3, 0);
    moved.old_value = Some(row(&[("id", Value::Int(1))]));
    sink.apply(&batch(vec![moved], checkpoint(items_schema(), "3_0", 1))).await.expect("move");
    assert_eq!(column(target, "moved", "id").await, [Some("9".into())], "the row moved to its new key");
}

async fn a_foreign_table_is_refused(target: &dyn TableSinkUnderTest) {
    let create = format!("CREATE TABLE {} (id INTEGER PRIMARY KEY, name TEXT)", target.table("foreign"));
    target.execute(&create).await.expect("another program's table");
    let sink = open(target, "foreign", "foreign").await;
    let refused = sink.apply(&batch(inserts(1..=1, "a"), checkpoint(items_schema(), "0_inf", 1))).await;
    assert_rejected(refused, "another program owns it", "a table the sink did not create");
    assert!(column(target, "foreign", "id").await.is_empty(), "nothing written to it");
}
