//! The sink compliance suite: [`check_sink`] runs the `Sink` contract against any sink —
//! built-ins and plugins alike — in one call.
//!
//! It drives the sink with hand-built batches of a fixed shape (`items`: `id int8` primary
//! key, `title text`, `note text`) and checks, through a [`SinkUnderTest`] that reads the
//! store back:
//! - a fresh store has no checkpoint and no rows;
//! - a batch's rows and checkpoint are stored together, and read back by a new instance;
//! - replaying a committed batch changes nothing;
//! - an update carrying only some columns merges, keeping the others; NULL clears a column;
//! - a delete removes the row, and deleting an absent row is fine;
//! - a resync (new generation) keeps old rows until its sweep, which removes exactly the
//!   rows the new snapshot did not rewrite, with the checkpoint;
//! - `reset` removes rows and checkpoint.
//!
//! While the live transaction, the resync and its sweep are applied, a reader runs
//! alongside (as a cache's readers do) and checks at every read that the checkpoint is
//! never ahead of the rows it covers, that the transaction is seen whole or not at all,
//! and that rows present before and after the resync never go missing during it.
//!
//! For a sink that keeps leases ([`Sink::keeps_leases`]) it goes on with [`check_leases`]:
//! one owner at a time, standbys reported, every acquisition a higher epoch, a stale
//! owner's commit refused with nothing written, a repeated commit recognised, a store
//! that lost its lease (when [`SinkUnderTest::lose_state`] can make it) noticed, and
//! `reset` taking the lease from a running owner.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use shapesync_core::{
    Acquisition, Batch, Change, Checkpoint, Fence, LeaseRequest, LogPosition, Offset, Row, Schema, Sink,
    SinkErrorKind, Value, async_trait,
};

/// Rows as a reader of the store sees them: `id` → column → text (`Value::render`),
/// NULL columns absent.
pub type StoredRows = BTreeMap<String, BTreeMap<String, String>>;

/// A sink and a way to read its store back, for [`check_sink`].
#[async_trait]
pub trait SinkUnderTest: Send + Sync {
    /// A sink over the store under test. Called again, it must return a new instance over
    /// the same store (a restart).
    async fn open(&self) -> Arc<dyn Sink>;
    /// Every row in the store, keyed by its `id` column.
    async fn rows(&self) -> StoredRows;
    /// Empties the store behind the sink's back, as a restart without persistence or a
    /// dropped database would (everything the sink keeps, lease included). Returns false
    /// when the harness cannot; the suite then skips that check.
    async fn lose_state(&self) -> bool {
        false
    }
    /// [`SinkUnderTest::rows`] reads the whole store at one instant (one query, one
    /// lock). When it takes several commands (Redis `KEYS` then a read per key), a read
    /// racing an apply can mix two states, so the suite does not check that readers see
    /// a transaction whole (the other reader checks still hold).
    fn reads_atomically(&self) -> bool {
        true
    }
}

/// A row stored as a JSON object (as `Row` serializes) in the reader's form: NULL
/// columns absent, strings as they are, other values as their JSON text — which is
/// what `Value::render` gives for numbers, booleans and arrays.
pub fn columns_from_json(row: &serde_json::Value) -> BTreeMap<String, String> {
    row.as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| match v {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some((k.clone(), s.clone())),
            other => Some((k.clone(), other.to_string())),
        })
        .collect()
}

/// The schema of the suite's shape, as Electric would send it.
pub fn compliance_schema() -> Schema {
    serde_json::from_str(
        r#"{"id":{"type":"int8","pk_index":0,"not_null":true},"title":{"type":"text"},"note":{"type":"text"}}"#,
    )
    .expect("valid schema")
}

/// The Electric key of row `id` of the suite's shape.
pub fn compliance_key(id: i64) -> String {
    format!("\"public\".\"items\"/\"{id}\"")
}

fn row(id: i64, title: &str, note: Option<&str>) -> Row {
    [
        ("id", Value::Int(id)),
        ("title", Value::Text(title.into())),
        ("note", note.map_or(Value::Null, |n| Value::Text(n.into()))),
    ]
    .into()
}

fn checkpoint(offset: &str, generation: u64, resyncing: bool) -> Checkpoint {
    Checkpoint {
        shape_hash: "compliance".into(),
        handle: format!("handle-{generation}"),
        offset: offset.parse::<Offset>().expect("valid offset"),
        schema: compliance_schema(),
        generation,
        resyncing,
    }
}

fn live(mut change: Change, lsn: u64, op: u64, last: bool) -> Change {
    change.position = Some(LogPosition { lsn, op_position: op });
    change.last_in_tx = last;
    change
}

fn expect(rows: &[(i64, &str, Option<&str>)]) -> StoredRows {
    rows.iter()
        .map(|(id, title, note)| {
            let mut cols: BTreeMap<String, String> =
                [("id".to_owned(), id.to_string()), ("title".to_owned(), (*title).to_owned())].into();
            if let Some(n) = note {
                cols.insert("note".into(), (*n).to_owned());
            }
            (id.to_string(), cols)
        })
        .collect()
}

/// What a reader of the store may see while one batch is applied.
struct Watch<'a> {
    /// The rows before the batch; `None` when the batch need not be seen whole (a
    /// snapshot part or a sweep, which sinks may write in steps).
    before: Option<&'a StoredRows>,
    /// The rows after it.
    after: &'a StoredRows,
    /// The batch's checkpoint: once it is visible, the rows must be `after`.
    checkpoint: &'a Checkpoint,
    /// Rows (by id) that exist before and after and must never be missing in between.
    always: &'a [&'a str],
}

/// Applies `batch` while a reader reads the store over and over, checking each read
/// against `watch` (a sink whose apply never yields is read only before and after).
async fn apply_watched(
    target: &dyn SinkUnderTest,
    sink: &dyn Sink,
    batch: &Batch,
    watch: Watch<'_>,
    what: &str,
) {
    let done = AtomicBool::new(false);
    let apply = async {
        let result = sink.apply(batch).await;
        done.store(true, Ordering::SeqCst);
        result
    };
    let reader = async {
        while !done.load(Ordering::SeqCst) {
            // Checkpoint first, then rows: a store that shows the new checkpoint must
            // already show the rows it covers.
            let checkpoint = sink.checkpoint().await.expect("checkpoint while applying");
            let rows = target.rows().await;
            if checkpoint.as_ref() == Some(watch.checkpoint) {
                assert_eq!(
                    &rows, watch.after,
                    "{what}: the checkpoint was visible before the rows it covers"
                );
            }
            if let Some(before) = watch.before.filter(|_| target.reads_atomically()) {
                assert!(
                    rows == *before || rows == *watch.after,
                    "{what}: a reader saw half a transaction: {rows:?}"
                );
            }
            for id in watch.always {
                assert!(rows.contains_key(*id), "{what}: row {id} went missing while it still exists");
            }
            tokio::task::yield_now().await;
        }
    };
    let (result, ()) = futures::join!(apply, reader);
    result.unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// Runs the whole suite; panics with a message naming the broken rule.
pub async fn check_sink(target: &dyn SinkUnderTest) {
    let sink = target.open().await;
    assert_eq!(sink.checkpoint().await.expect("checkpoint"), None, "a fresh store has no checkpoint");
    assert!(target.rows().await.is_empty(), "a fresh store has no rows");

    // A snapshot chunk, then the end of the snapshot.
    let snapshot = Batch {
        changes: vec![
            Change::insert(compliance_key(1), row(1, "one", Some("n1"))),
            Change::insert(compliance_key(2), row(2, "two", None)),
            Change::insert(compliance_key(3), row(3, "three", Some("n3"))),
        ],
        checkpoint: checkpoint("0_0", 10, true),
        sweep: false,
        resync_reason: None,
        up_to_date: false,
        row_schema: None,
        fence: None,
    };
    sink.apply(&snapshot).await.expect("apply snapshot");
    let end = Batch::new(vec![], checkpoint("0_inf", 10, false), true, true);
    sink.apply(&end).await.expect("apply snapshot end");
    let synced = expect(&[(1, "one", Some("n1")), (2, "two", None), (3, "three", Some("n3"))]);
    assert_eq!(target.rows().await, synced, "snapshot rows are stored");
    assert_eq!(
        sink.checkpoint().await.expect("checkpoint"),
        Some(end.checkpoint.clone()),
        "checkpoint stored"
    );

    // A live transaction: partial update, NULLing update, delete, delete of an absent row, insert.
    let tx = Batch {
        changes: vec![
            live(
                Change::update(
                    compliance_key(1),
                    [("id", Value::Int(1)), ("title", Value::Text("uno".into()))].into(),
                ),
                20,
                0,
                false,
            ),
            live(
                Change::update(compliance_key(3), [("id", Value::Int(3)), ("note", Value::Null)].into()),
                20,
                2,
                false,
            ),
            live(Change::delete(compliance_key(2), [("id", Value::Int(2))].into()), 20, 4, false),
            live(Change::delete(compliance_key(9), [("id", Value::Int(9))].into()), 20, 6, false),
            live(Change::insert(compliance_key(4), row(4, "four", Some("n4"))), 20, 8, true),
        ],
        checkpoint: checkpoint("20_8", 10, false),
        sweep: false,
        resync_reason: None,
        up_to_date: true,
        row_schema: None,
        fence: None,
    };
    let after_tx = expect(&[(1, "uno", Some("n1")), (3, "three", None), (4, "four", Some("n4"))]);
    let watch =
        Watch { before: Some(&synced), after: &after_tx, checkpoint: &tx.checkpoint, always: &["1", "3"] };
    apply_watched(target, &*sink, &tx, watch, "apply live transaction").await;
    assert_eq!(target.rows().await, after_tx, "updates merge the given columns, deletes remove");

    // Replay: at-least-once delivery must not change anything.
    sink.apply(&tx).await.expect("replay live transaction");
    assert_eq!(target.rows().await, after_tx, "replaying a committed batch changes nothing");
    assert_eq!(sink.checkpoint().await.expect("checkpoint"), Some(tx.checkpoint.clone()));

    // Restart: a new instance reads what the old one committed.
    drop(sink);
    let sink = target.open().await;
    assert_eq!(
        sink.checkpoint().await.expect("checkpoint"),
        Some(tx.checkpoint.clone()),
        "checkpoint survives a restart"
    );

    // Resync: rows 1 and 4 come back (4 changed), row 3 vanished. Nothing goes before the sweep.
    let resync = Batch {
        changes: vec![
            Change::insert(compliance_key(1), row(1, "uno", Some("n1"))),
            Change::insert(compliance_key(4), row(4, "cuatro", None)),
        ],
        checkpoint: checkpoint("0_0", 11, true),
        sweep: false,
        resync_reason: None,
        up_to_date: false,
        row_schema: None,
        fence: None,
    };
    let during_resync = expect(&[(1, "uno", Some("n1")), (3, "three", None), (4, "cuatro", None)]);
    let watch = Watch {
        before: None,
        after: &during_resync,
        checkpoint: &resync.checkpoint,
        always: &["1", "3", "4"],
    };
    apply_watched(target, &*sink, &resync, watch, "apply resync chunk").await;
    assert!(target.rows().await.contains_key("3"), "old rows stay until the sweep");
    let sweep = Batch::new(vec![], checkpoint("0_inf", 11, false), true, true);
    let swept = expect(&[(1, "uno", Some("n1")), (4, "cuatro", None)]);
    let watch = Watch { before: None, after: &swept, checkpoint: &sweep.checkpoint, always: &["1", "4"] };
    apply_watched(target, &*sink, &sweep, watch, "apply sweep").await;
    assert_eq!(target.rows().await, swept, "the sweep removes exactly the vanished rows");
    assert_eq!(sink.checkpoint().await.expect("checkpoint"), Some(sweep.checkpoint.clone()));

    sink.reset().await.expect("reset");
    assert_eq!(sink.checkpoint().await.expect("checkpoint"), None, "reset removes the checkpoint");
    assert!(target.rows().await.is_empty(), "reset removes the rows");

    if sink.keeps_leases() {
        check_leases(target).await;
    }
}

fn ask(owner: &str, take: bool) -> LeaseRequest {
    LeaseRequest { owner: owner.into(), ttl_ms: 60_000, take }
}

async fn take(sink: &dyn Sink, owner: &str) -> Fence {
    match sink.acquire(&ask(owner, true)).await.expect("acquire") {
        Acquisition::Owned { fence, .. } => fence,
        Acquisition::NotOwned(lease) => panic!("`{owner}` could not take a free lease: {lease:?}"),
    }
}

fn fenced(batch: &Batch, fence: &Fence) -> Batch {
    Batch { fence: Some(fence.clone()), ..batch.clone() }
}

/// The lease rules, on a store the main suite left empty: see the module docs.
pub async fn check_leases(target: &dyn SinkUnderTest) {
    let sink = target.open().await;
    let other = target.open().await; // a second instance over the same store
    let a = take(&*sink, "instance-a").await;
    match other.acquire(&ask("instance-b", true)).await.expect("acquire") {
        Acquisition::NotOwned(lease) => {
            assert_eq!(lease.owner, "instance-a", "the holder is reported");
            assert!(lease.is_held(), "a lease just taken is held: {lease:?}");
        }
        owned => panic!("a second instance took a held lease: {owned:?}"),
    }
    let renewed = sink.renew(&a).await.expect("the holder renews");
    assert_eq!(renewed.standbys, vec!["instance-b".to_owned()], "the standby that asked is reported");

    // Commits under the lease; a repeated commit (its answer lost) changes nothing.
    let first = Batch::new(
        vec![Change::insert(compliance_key(1), row(1, "one", None))],
        checkpoint("0_inf", 20, false),
        false,
        true,
    );
    sink.apply(&fenced(&first, &a)).await.expect("a commit under the lease");
    sink.apply(&fenced(&first, &a)).await.expect("the same commit again is recognised as done");
    let a = Fence { seq: a.seq + 1, ..a };
    let second = Batch::new(
        vec![live(Change::insert(compliance_key(2), row(2, "two", None)), 30, 0, true)],
        checkpoint("30_0", 20, false),
        false,
        true,
    );
    sink.apply(&fenced(&second, &a)).await.expect("the next commit");
    let a = Fence { seq: a.seq + 1, ..a };
    let kept = expect(&[(1, "one", None), (2, "two", None)]);
    assert_eq!(target.rows().await, kept);

    // Hand-over: b takes the released lease with a higher epoch and the same count.
    sink.release(&a).await.expect("release");
    let b = take(&*other, "instance-b").await;
    assert!(b.epoch > a.epoch, "every acquisition raises the epoch ({} after {})", b.epoch, a.epoch);
    assert_eq!(b.seq, a.seq, "the commit count carries over");

    // The old owner is fenced: its commit writes nothing, and its renewal says so.
    let stale = Batch::new(
        vec![live(Change::delete(compliance_key(1), [("id", Value::Int(1))].into()), 40, 0, true)],
        checkpoint("40_0", 20, false),
        false,
        true,
    );
    let refused = sink.apply(&fenced(&stale, &a)).await;
    assert!(
        matches!(refused, Err(ref e) if e.kind() == SinkErrorKind::Fenced),
        "a stale owner's commit is refused: {refused:?}"
    );
    assert!(
        matches!(sink.renew(&a).await, Err(ref e) if e.kind() == SinkErrorKind::Fenced),
        "and so is its renewal"
    );
    assert_eq!(target.rows().await, kept, "a refused commit writes nothing");
    assert_eq!(other.checkpoint().await.expect("checkpoint"), Some(second.checkpoint.clone()));

    // A commit count the store does not hold means it lost or rolled back writes.
    let behind = Fence { seq: b.seq + 5, ..b.clone() };
    assert!(
        matches!(other.apply(&fenced(&stale, &behind)).await, Err(ref e) if e.kind() == SinkErrorKind::StateLost),
        "a store holding fewer commits than the owner made lost state"
    );
    assert_eq!(target.rows().await, kept);

    // `reset` takes the lease from a running owner: its next commit is refused.
    other.reset().await.expect("reset");
    assert!(
        matches!(other.apply(&fenced(&stale, &b)).await, Err(ref e) if e.kind() == SinkErrorKind::Fenced)
    );
    assert!(target.rows().await.is_empty());
    let lease = other.lease().await.expect("lease").expect("the lease record stays");
    assert!(!lease.is_held(), "reset leaves the lease free: {lease:?}");
    let c = take(&*sink, "instance-a").await;
    assert!(c.epoch > b.epoch + 1, "reset took the lease in between ({} after {})", c.epoch, b.epoch);

    // A store that lost everything is noticed, not written on.
    if target.lose_state().await {
        assert!(
            matches!(sink.renew(&c).await, Err(ref e) if e.kind() == SinkErrorKind::StateLost),
            "a renewal notices"
        );
        assert!(
            matches!(sink.apply(&fenced(&first, &c)).await, Err(ref e) if e.kind() == SinkErrorKind::StateLost),
            "a commit notices"
        );
        assert!(target.rows().await.is_empty(), "and writes nothing");
        assert_eq!(sink.checkpoint().await.expect("checkpoint"), None);
        take(&*sink, "instance-a").await;
    }
    sink.reset().await.expect("reset");
}
