//! The pipeline runner against the real memory sink, fed by a scripted source.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shapesync_core::{
    Batch, Change, Checkpoint, LogPosition, Offset, Pipeline, PipelineError, ResumePoint, Row, RunMode,
    Schema, Sink, SinkError, SinkErrorKind, Source, SourceError, SourceErrorKind, SourceEvent,
    SourceResponse, Value, async_trait,
};
use shapesync_sink_memory::{MemorySink, MemoryStore};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(10);

type Script = mpsc::UnboundedSender<Result<SourceEvent, SourceError>>;

/// A source that yields whatever the test sends, and records where it was told to resume.
struct ScriptedSource {
    events: mpsc::UnboundedReceiver<Result<SourceEvent, SourceError>>,
    resumed: Arc<Mutex<Vec<Option<ResumePoint>>>>,
    pulled: Arc<AtomicUsize>,
    hash: String,
}

#[async_trait]
impl Source for ScriptedSource {
    fn definition_hash(&self) -> String {
        self.hash.clone()
    }
    fn resume(&mut self, from: Option<ResumePoint>) {
        self.resumed.lock().unwrap().push(from);
    }
    async fn next(&mut self) -> Result<SourceEvent, SourceError> {
        match self.events.recv().await {
            Some(e) => {
                self.pulled.fetch_add(1, Ordering::SeqCst);
                e
            }
            None => std::future::pending().await,
        }
    }
}

struct Harness {
    script: Script,
    resumed: Arc<Mutex<Vec<Option<ResumePoint>>>>,
    pulled: Arc<AtomicUsize>,
    source: Option<ScriptedSource>,
}

fn harness(hash: &str) -> Harness {
    let (script, events) = mpsc::unbounded_channel();
    let resumed = Arc::default();
    let pulled = Arc::new(AtomicUsize::new(0));
    let source = ScriptedSource {
        events,
        resumed: Arc::clone(&resumed),
        pulled: Arc::clone(&pulled),
        hash: hash.into(),
    };
    Harness { script, resumed, pulled, source: Some(source) }
}

fn row(id: i64, title: &str) -> Row {
    [("id".to_owned(), Value::Int(id)), ("title".to_owned(), Value::Text(title.into()))].into()
}

fn key(id: i64) -> String {
    format!("\"public\".\"items\"/\"{id}\"")
}

fn ins(id: i64, title: &str) -> Change {
    Change::insert(key(id), row(id, title))
}

fn live(mut c: Change, lsn: u64, op: u64, last: bool) -> Change {
    c.position = Some(LogPosition { lsn, op_position: op });
    c.last_in_tx = last;
    c
}

fn response(
    handle: &str,
    offset: &str,
    changes: Vec<Change>,
    up_to_date: bool,
) -> Result<SourceEvent, SourceError> {
    Ok(SourceEvent::Response(SourceResponse {
        changes,
        handle: handle.into(),
        offset: offset.parse().unwrap(),
        schema: Arc::new(Schema::default()),
        up_to_date,
    }))
}

fn pipeline(h: &mut Harness, sink: Arc<dyn Sink>) -> Pipeline {
    Pipeline::new("test", Box::new(h.source.take().unwrap()), sink)
        .with_retry(shapesync_core::config::RetrySpec { initial_ms: 1, max_ms: 5 })
}

async fn next_commit(
    commits: &mut tokio::sync::broadcast::Receiver<Arc<shapesync_sink_memory::Commit>>,
) -> Arc<shapesync_sink_memory::Commit> {
    tokio::time::timeout(DEADLINE, commits.recv()).await.expect("commit within deadline").unwrap()
}

async fn wait_until(mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(DEADLINE, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("condition within deadline");
}

#[tokio::test]
async fn commits_only_at_transaction_boundaries() {
    let mut h = harness("h");
    let store = MemoryStore::new();
    let mut commits = store.subscribe();
    let p = pipeline(&mut h, Arc::new(MemorySink::new(store.clone())));
    let stop = CancellationToken::new();
    let task = tokio::spawn(p.run(RunMode::Follow, stop.clone()));

    h.script.send(response("H", "0_0", vec![ins(1, "a"), ins(2, "b")], false)).unwrap();
    let c = next_commit(&mut commits).await;
    assert_eq!(c.checkpoint.offset.to_string(), "0_0", "snapshot chunks commit one by one");
    h.script.send(response("H", "0_inf", vec![], true)).unwrap();
    assert!(next_commit(&mut commits).await.up_to_date);

    // A transaction split over two responses: the first ends mid-transaction.
    h.script
        .send(response(
            "H",
            "10_2",
            vec![live(ins(3, "c"), 10, 0, false), live(ins(4, "d"), 10, 2, false)],
            false,
        ))
        .unwrap();
    h.script.send(response("H", "10_4", vec![live(ins(5, "e"), 10, 4, true)], true)).unwrap();
    let c = next_commit(&mut commits).await;
    assert_eq!(c.checkpoint.offset.to_string(), "10_4", "the partial response was not committed on its own");
    assert_eq!(c.changes.len(), 3, "the whole transaction commits at once");
    assert_eq!(store.len(), 5);

    // A response ending on `last: true` commits even without up-to-date.
    h.script
        .send(response("H", "11_0", vec![live(Change::delete(key(1), row(1, "a")), 11, 0, true)], false))
        .unwrap();
    let c = next_commit(&mut commits).await;
    assert_eq!(c.checkpoint.offset.to_string(), "11_0");
    assert!(!c.up_to_date);
    assert_eq!(store.get(&key(1)), None);

    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_unfinished_transaction_is_never_committed_and_is_reread_after_restart() {
    let mut h = harness("h");
    let store = MemoryStore::new();
    let mut commits = store.subscribe();
    let p = pipeline(&mut h, Arc::new(MemorySink::new(store.clone())));
    let stop = CancellationToken::new();
    let task = tokio::spawn(p.run(RunMode::Follow, stop.clone()));
    h.script.send(response("H", "0_inf", vec![ins(1, "a")], true)).unwrap();
    next_commit(&mut commits).await;
    h.script.send(response("H", "20_2", vec![live(ins(2, "b"), 20, 0, false)], false)).unwrap();
    wait_until(|| h.pulled.load(Ordering::SeqCst) == 2).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(store.get(&key(2)), None, "half a transaction never reaches the sink");
    assert_eq!(store.checkpoint().unwrap().offset.to_string(), "0_inf");

    // Restart: resumes from the stored checkpoint.
    let mut h2 = harness("h");
    let p = pipeline(&mut h2, Arc::new(MemorySink::new(store.clone())));
    let task = tokio::spawn(p.run(RunMode::UntilUpToDate, CancellationToken::new()));
    h2.script.send(response("H", "20_2", vec![live(ins(2, "b"), 20, 0, true)], true)).unwrap();
    task.await.unwrap().unwrap();
    let resumed = h2.resumed.lock().unwrap()[0].clone().unwrap();
    assert_eq!((resumed.handle.as_str(), resumed.offset.to_string().as_str()), ("H", "0_inf"));
    assert_eq!(store.get(&key(2)), Some(row(2, "b")));
}

#[tokio::test]
async fn replaying_committed_batches_leaves_the_store_identical() {
    let store = MemoryStore::new();
    let events = || {
        vec![
            response("H", "0_0", vec![ins(1, "a"), ins(2, "b"), ins(3, "c")], false),
            response("H", "0_inf", vec![], true),
            response(
                "H",
                "30_4",
                vec![
                    live(
                        Change::update(key(1), [("title".to_owned(), Value::Text("a2".into()))].into()),
                        30,
                        0,
                        false,
                    ),
                    live(Change::delete(key(2), row(2, "")), 30, 2, false),
                    live(ins(4, "d"), 30, 4, true),
                ],
                true,
            ),
        ]
    };
    let sink = Arc::new(MemorySink::new(store.clone()));
    // Run until the live transaction is in, then stop.
    let run_until_live_tx_is_in = async |sink: Arc<MemorySink>| {
        let mut h = harness("h");
        for e in events() {
            h.script.send(e).unwrap();
        }
        let mut commits = store.subscribe();
        let stop = CancellationToken::new();
        let task = tokio::spawn(pipeline(&mut h, sink).run(RunMode::Follow, stop.clone()));
        while next_commit(&mut commits).await.checkpoint.offset.to_string() != "30_4" {}
        stop.cancel();
        task.await.unwrap().unwrap();
    };
    run_until_live_tx_is_in(sink.clone()).await;
    let first = store.rows();
    let first_cp = store.checkpoint();

    // At-least-once: a restart may see everything again. Nothing changes.
    run_until_live_tx_is_in(sink).await;
    assert_eq!(store.rows(), first);
    assert_eq!(store.get(&key(1)).unwrap()["title"], Value::Text("a2".into()));
    assert_eq!(store.checkpoint().map(|c| c.offset), first_cp.map(|c| c.offset));
}

#[tokio::test]
async fn must_refetch_marks_and_sweeps_without_ever_emptying_the_store() {
    let mut h = harness("h");
    let store = MemoryStore::new();
    let mut commits = store.subscribe();
    let p = pipeline(&mut h, Arc::new(MemorySink::new(store.clone())));
    let stop = CancellationToken::new();
    let task = tokio::spawn(p.run(RunMode::Follow, stop.clone()));
    h.script.send(response("H1", "0_0", vec![ins(1, "a"), ins(2, "b"), ins(3, "c")], false)).unwrap();
    h.script.send(response("H1", "0_inf", vec![], true)).unwrap();
    while !next_commit(&mut commits).await.up_to_date {}

    // A reader polls all the while: rows 1 and 3 exist before and after, so must never vanish.
    let done = CancellationToken::new();
    let reader = {
        let (store, done) = (store.clone(), done.clone());
        tokio::spawn(async move {
            let mut reads = 0u64;
            while !done.is_cancelled() {
                store.read(|rows| {
                    assert!(
                        rows.contains_key(&key(1)) && rows.contains_key(&key(3)),
                        "reader saw a missing row: {rows:?}"
                    );
                });
                reads += 1;
                tokio::task::yield_now().await;
            }
            reads
        })
    };

    let first_generation = store.checkpoint().unwrap().generation;
    h.script.send(Ok(SourceEvent::MustRefetch)).unwrap();
    h.script.send(response("H2", "0_0", vec![ins(1, "a")], false)).unwrap();
    let c = next_commit(&mut commits).await;
    assert!(c.checkpoint.resyncing && c.checkpoint.handle == "H2");
    assert!(c.checkpoint.generation > first_generation);
    assert!(store.get(&key(2)).is_some(), "old rows stay until the new snapshot completes");
    h.script.send(response("H2", "0_1", vec![ins(3, "c2")], false)).unwrap();
    next_commit(&mut commits).await;
    h.script.send(response("H2", "0_inf", vec![], true)).unwrap();
    let c = next_commit(&mut commits).await;
    assert_eq!(c.swept, vec![key(2)], "exactly the vanished row is swept, with the checkpoint");
    assert!(!c.checkpoint.resyncing);
    done.cancel();
    assert!(reader.await.unwrap() > 0);
    assert_eq!(store.rows().into_keys().collect::<Vec<_>>(), vec![key(1), key(3)]);
    assert_eq!(store.get(&key(3)).unwrap()["title"], Value::Text("c2".into()));
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_changed_shape_definition_resyncs_from_scratch() {
    let store = MemoryStore::new();
    let sink = Arc::new(MemorySink::new(store.clone()));
    let mut h = harness("old-hash");
    h.script.send(response("H", "0_inf", vec![ins(1, "a"), ins(2, "b")], true)).unwrap();
    pipeline(&mut h, sink.clone()).run(RunMode::UntilUpToDate, CancellationToken::new()).await.unwrap();

    let old_generation = store.checkpoint().unwrap().generation;

    let mut h = harness("new-hash");
    h.script.send(response("N", "0_inf", vec![ins(2, "b")], true)).unwrap();
    pipeline(&mut h, sink).run(RunMode::UntilUpToDate, CancellationToken::new()).await.unwrap();
    assert_eq!(h.resumed.lock().unwrap()[0], None, "never resumes another definition's offset");
    assert_eq!(store.rows().into_keys().collect::<Vec<_>>(), vec![key(2)]);
    let cp = store.checkpoint().unwrap();
    assert_eq!((cp.shape_hash.as_str(), cp.resyncing), ("new-hash", false));
    assert!(cp.generation > old_generation);
}

/// A memory sink that never finds its checkpoint: what a sink looks like after a first
/// sync crashed having written rows ahead of its first checkpoint.
struct ForgetfulSink(MemorySink);

#[async_trait]
impl Sink for ForgetfulSink {
    async fn checkpoint(&self) -> Result<Option<Checkpoint>, SinkError> {
        Ok(None)
    }
    async fn apply(&self, batch: &Batch) -> Result<(), SinkError> {
        self.0.apply(batch).await
    }
    async fn reset(&self) -> Result<(), SinkError> {
        self.0.reset().await
    }
}

#[tokio::test]
async fn a_fresh_sync_sweeps_rows_left_by_an_earlier_attempt_without_checkpoint() {
    let store = MemoryStore::new();
    let sink = Arc::new(ForgetfulSink(MemorySink::new(store.clone())));
    let mut h = harness("h");
    h.script.send(response("H1", "0_inf", vec![ins(1, "a"), ins(2, "b")], true)).unwrap();
    pipeline(&mut h, sink.clone()).run(RunMode::UntilUpToDate, CancellationToken::new()).await.unwrap();
    let first = store.checkpoint().unwrap().generation;

    let mut h = harness("h");
    h.script.send(response("H2", "0_inf", vec![ins(1, "a")], true)).unwrap();
    pipeline(&mut h, sink).run(RunMode::UntilUpToDate, CancellationToken::new()).await.unwrap();
    assert_ne!(store.checkpoint().unwrap().generation, first, "each fresh sync has its own generation");
    assert_eq!(store.rows().into_keys().collect::<Vec<_>>(), vec![key(1)], "the orphaned row was swept");
}

/// A memory sink that fails the first `failures` calls as if its store were down,
/// recording the stored checkpoint each time it fails.
struct FlakySink {
    inner: MemorySink,
    failures: AtomicUsize,
    seen_while_failing: Mutex<Vec<Option<Offset>>>,
}

#[async_trait]
impl Sink for FlakySink {
    async fn checkpoint(&self) -> Result<Option<Checkpoint>, SinkError> {
        self.inner.checkpoint().await
    }
    async fn apply(&self, batch: &Batch) -> Result<(), SinkError> {
        if self.failures.load(Ordering::SeqCst) > 0 {
            self.failures.fetch_sub(1, Ordering::SeqCst);
            self.seen_while_failing.lock().unwrap().push(self.inner.store().checkpoint().map(|c| c.offset));
            return Err(SinkError::unavailable("connection refused"));
        }
        self.inner.apply(batch).await
    }
    async fn reset(&self) -> Result<(), SinkError> {
        self.inner.reset().await
    }
}

#[tokio::test]
async fn a_failing_sink_that_recovers_loses_nothing() {
    let store = MemoryStore::new();
    let sink = Arc::new(FlakySink {
        inner: MemorySink::new(store.clone()),
        failures: AtomicUsize::new(0),
        seen_while_failing: Mutex::default(),
    });
    let mut h = harness("h");
    h.script.send(response("H", "0_inf", vec![ins(1, "a")], true)).unwrap();
    let mut commits = store.subscribe();
    let stop = CancellationToken::new();
    let task = tokio::spawn(pipeline(&mut h, sink.clone()).run(RunMode::Follow, stop.clone()));
    next_commit(&mut commits).await;

    sink.failures.store(5, Ordering::SeqCst);
    h.script
        .send(response(
            "H",
            "40_2",
            vec![live(ins(2, "b"), 40, 0, false), live(ins(3, "c"), 40, 2, true)],
            true,
        ))
        .unwrap();
    let c = next_commit(&mut commits).await;
    assert_eq!(c.checkpoint.offset.to_string(), "40_2");
    let seen = sink.seen_while_failing.lock().unwrap().clone();
    assert_eq!(seen.len(), 5, "retried until the sink came back");
    assert!(
        seen.iter().all(|o| o.map(|o| o.to_string()) == Some("0_inf".into())),
        "checkpoint never moved while failing: {seen:?}"
    );
    assert_eq!(store.len(), 3);
    stop.cancel();
    task.await.unwrap().unwrap();
}

struct BrokenSink;

#[async_trait]
impl Sink for BrokenSink {
    async fn checkpoint(&self) -> Result<Option<Checkpoint>, SinkError> {
        Ok(None)
    }
    async fn apply(&self, _: &Batch) -> Result<(), SinkError> {
        Err(SinkError::rejected("value too large"))
    }
    async fn reset(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_permanent_sink_error_stops_the_pipeline_with_a_clear_failure() {
    let mut h = harness("h");
    h.script.send(response("H", "0_inf", vec![ins(1, "a")], true)).unwrap();
    let p = pipeline(&mut h, Arc::new(BrokenSink));
    let status = p.status();
    let err = p.run(RunMode::Follow, CancellationToken::new()).await.unwrap_err();
    assert!(matches!(err, PipelineError::Sink(ref e) if e.kind() == SinkErrorKind::Rejected));
    assert!(status.failure().unwrap().contains("value too large"));
}

#[tokio::test]
async fn a_source_error_stops_the_pipeline() {
    let mut h = harness("h");
    h.script.send(Err(SourceError::rejected(400, "table: missing"))).unwrap();
    let err = pipeline(&mut h, Arc::new(MemorySink::default()))
        .run(RunMode::Follow, CancellationToken::new())
        .await;
    let Err(PipelineError::Source(e)) = err else { panic!("{err:?}") };
    assert_eq!((e.kind(), e.status()), (SourceErrorKind::Rejected, Some(400)));
}

/// A sink whose applies wait until the test opens the gate.
struct GatedSink {
    inner: MemorySink,
    gate: tokio::sync::Semaphore,
}

#[async_trait]
impl Sink for GatedSink {
    async fn checkpoint(&self) -> Result<Option<Checkpoint>, SinkError> {
        Ok(None)
    }
    async fn apply(&self, batch: &Batch) -> Result<(), SinkError> {
        self.gate.acquire().await.unwrap().forget();
        self.inner.apply(batch).await
    }
    async fn reset(&self) -> Result<(), SinkError> {
        Ok(())
    }
}

#[tokio::test]
async fn the_source_never_reads_further_ahead_than_the_buffer() {
    let mut h = harness("h");
    for i in 0..50 {
        h.script.send(response("H", &format!("0_{i}"), vec![ins(i, "x")], false)).unwrap();
    }
    let sink = Arc::new(GatedSink { inner: MemorySink::default(), gate: tokio::sync::Semaphore::new(0) });
    let stop = CancellationToken::new();
    let task = tokio::spawn(pipeline(&mut h, sink.clone()).with_buffer(2).run(RunMode::Follow, stop.clone()));
    // One response in the sink and two in the channel; nothing is pulled without a slot.
    let bound = 1 + 2;
    wait_until(|| h.pulled.load(Ordering::SeqCst) >= bound).await;
    for _ in 0..200 {
        tokio::task::yield_now().await;
    }
    assert_eq!(h.pulled.load(Ordering::SeqCst), bound, "source read past the budget");
    sink.gate.add_permits(5);
    wait_until(|| h.pulled.load(Ordering::SeqCst) == bound + 5).await;
    stop.cancel();
    sink.gate.add_permits(100);
    task.await.unwrap().unwrap();
}

/// A memory sink that "crashes" while writing resync rows: the rows of batches with
/// `resyncing` land, but the checkpoint stays the last one stored before the resync
/// (as with a multi-part Redis snapshot cut short before its last part).
struct CutShortSink {
    inner: MemorySink,
    kept: Mutex<Option<Checkpoint>>,
}

#[async_trait]
impl Sink for CutShortSink {
    async fn checkpoint(&self) -> Result<Option<Checkpoint>, SinkError> {
        self.inner.checkpoint().await
    }
    async fn apply(&self, batch: &Batch) -> Result<(), SinkError> {
        let kept = self.kept.lock().unwrap().clone();
        if let Some(old) = kept.filter(|_| batch.checkpoint.resyncing) {
            self.inner.apply(batch).await?;
            let restore = Batch::new(vec![], old, false, false);
            return self.inner.apply(&restore).await;
        }
        *self.kept.lock().unwrap() = Some(batch.checkpoint.clone());
        self.inner.apply(batch).await
    }
    async fn reset(&self) -> Result<(), SinkError> {
        self.inner.reset().await
    }
}

#[tokio::test]
async fn a_resync_cut_short_before_its_checkpoint_is_swept_by_the_next_one() {
    let store = MemoryStore::new();
    let sink = Arc::new(CutShortSink { inner: MemorySink::new(store.clone()), kept: Mutex::default() });
    let mut h = harness("h");
    h.script.send(response("H1", "0_inf", vec![ins(1, "a")], true)).unwrap();
    let mut commits = store.subscribe();
    let stop = CancellationToken::new();
    let task = tokio::spawn(pipeline(&mut h, sink.clone()).run(RunMode::Follow, stop.clone()));
    next_commit(&mut commits).await;
    // A refetch whose first snapshot chunk writes row 2, then the process dies.
    h.script.send(Ok(SourceEvent::MustRefetch)).unwrap();
    h.script.send(response("H2", "0_0", vec![ins(1, "a"), ins(2, "b")], false)).unwrap();
    while next_commit(&mut commits).await.checkpoint.handle != "H1" {}
    stop.cancel();
    task.await.unwrap().unwrap();
    assert!(store.get(&key(2)).is_some(), "the cut-short resync left row 2 behind");
    assert_eq!(store.checkpoint().unwrap().handle, "H1");

    // Restart: the stored checkpoint still names H1; the server has rotated again and
    // row 2 is gone. The new resync must not reuse the dead attempt's generation.
    *sink.kept.lock().unwrap() = None;
    let mut h = harness("h");
    h.script.send(Ok(SourceEvent::MustRefetch)).unwrap();
    h.script.send(response("H3", "0_inf", vec![ins(1, "a")], true)).unwrap();
    pipeline(&mut h, sink).run(RunMode::UntilUpToDate, CancellationToken::new()).await.unwrap();
    assert_eq!(store.rows().into_keys().collect::<Vec<_>>(), vec![key(1)], "row 2 was swept");
}

#[tokio::test]
async fn up_to_date_at_the_start_offset_never_sweeps() {
    let store = MemoryStore::new();
    let sink = Arc::new(MemorySink::new(store.clone()));
    let mut h = harness("h");
    h.script.send(response("H1", "0_inf", vec![ins(1, "a")], true)).unwrap();
    pipeline(&mut h, sink.clone()).run(RunMode::UntilUpToDate, CancellationToken::new()).await.unwrap();
    // A refetch answered by a misbehaving cache with an empty up-to-date at -1.
    let mut h = harness("other-definition");
    h.script.send(response("H2", "-1", vec![], true)).unwrap();
    h.script.send(response("H2", "0_inf", vec![ins(1, "a")], true)).unwrap();
    let mut commits = store.subscribe();
    let stop = CancellationToken::new();
    let task = tokio::spawn(pipeline(&mut h, sink).run(RunMode::Follow, stop.clone()));
    let mut seen = Vec::new();
    loop {
        let c = next_commit(&mut commits).await;
        seen.push((c.checkpoint.offset.to_string(), c.swept.len()));
        assert_eq!(store.len(), 1, "the cache never empties");
        if c.checkpoint.offset.to_string() == "0_inf" {
            break;
        }
    }
    stop.cancel();
    task.await.unwrap().unwrap();
    assert!(!store.checkpoint().unwrap().resyncing, "the sweep happened at 0_inf: {seen:?}");
}

/// Drops row 2 and upper-cases titles: a stand-in for a user transform.
struct Shout;

impl shapesync_core::Transform for Shout {
    fn apply(&self, mut change: Change, out: &mut Vec<Change>) -> Result<(), shapesync_core::TransformError> {
        if change.key == key(2) {
            return Ok(());
        }
        if let Some(Value::Text(t)) = change.value.get("title").cloned() {
            change.value.insert("title", Value::Text(t.to_uppercase()));
        }
        out.push(change);
        Ok(())
    }
}

#[tokio::test]
async fn transforms_run_in_order_between_source_and_sink() {
    let store = MemoryStore::new();
    let mut h = harness("h");
    h.script.send(response("H", "0_inf", vec![ins(1, "a"), ins(2, "b"), ins(3, "c")], true)).unwrap();
    pipeline(&mut h, Arc::new(MemorySink::new(store.clone())))
        .with_transforms(vec![Box::new(Shout)])
        .run(RunMode::UntilUpToDate, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(store.rows().into_keys().collect::<Vec<_>>(), vec![key(1), key(3)]);
    assert_eq!(store.get(&key(3)).unwrap()["title"], Value::Text("C".into()));
}

/// The memory sink behind a lease, kept as a shared store would keep it: the runner's
/// side of fencing, without processes or timing.
struct LeasedSink {
    inner: MemorySink,
    lease: Arc<Mutex<Option<shapesync_core::lease::StoredLease>>>,
    free: Arc<std::sync::atomic::AtomicBool>,
}

impl LeasedSink {
    fn new(store: MemoryStore) -> Self {
        LeasedSink { inner: MemorySink::new(store), lease: Arc::default(), free: Arc::new(true.into()) }
    }

    /// Another instance takes the lease over.
    fn take_over(&self) {
        let mut lease = self.lease.lock().unwrap();
        let stored = lease.as_mut().expect("a lease");
        stored.owner = "other".into();
        stored.epoch += 1;
        self.free.store(false, Ordering::SeqCst);
    }

    fn release_other(&self) {
        self.free.store(true, Ordering::SeqCst);
    }
}

#[async_trait]
impl Sink for LeasedSink {
    async fn checkpoint(&self) -> Result<Option<Checkpoint>, SinkError> {
        self.inner.checkpoint().await
    }
    async fn apply(&self, batch: &Batch) -> Result<(), SinkError> {
        let fence = batch.fence.as_ref().expect("the runner fences every batch");
        let mut lease = self.lease.lock().unwrap();
        let verdict = shapesync_core::lease::judge(lease.as_ref(), fence, true);
        if let Some(e) = SinkError::from_verdict(verdict.clone()) {
            return Err(e);
        }
        if verdict == shapesync_core::lease::Verdict::Proceed {
            run_ready(self.inner.apply(batch))?;
            lease.as_mut().unwrap().seq += 1;
        }
        Ok(())
    }
    async fn reset(&self) -> Result<(), SinkError> {
        self.inner.reset().await
    }
    fn keeps_leases(&self) -> bool {
        true
    }
    async fn acquire(
        &self,
        request: &shapesync_core::LeaseRequest,
    ) -> Result<shapesync_core::Acquisition, SinkError> {
        let mut lease = self.lease.lock().unwrap();
        let held =
            !self.free.load(Ordering::SeqCst) && lease.as_ref().is_some_and(|l| l.owner != request.owner);
        if !request.take || held {
            let owner = lease.as_ref().map(|l| l.owner.clone()).unwrap_or_default();
            let expires_in_ms = if held { 60_000 } else { 0 };
            return Ok(shapesync_core::Acquisition::NotOwned(shapesync_core::LeaseInfo {
                owner,
                expires_in_ms,
                ..Default::default()
            }));
        }
        let (epoch, seq) = lease.as_ref().map_or((1, 0), |l| (l.epoch + 1, l.seq));
        *lease = Some(shapesync_core::lease::StoredLease { owner: request.owner.clone(), epoch, seq });
        self.free.store(false, Ordering::SeqCst);
        let fence =
            shapesync_core::Fence { owner: request.owner.clone(), epoch, seq, ttl_ms: request.ttl_ms };
        Ok(shapesync_core::Acquisition::Owned { fence, generation_floor: 0 })
    }
    async fn renew(&self, fence: &shapesync_core::Fence) -> Result<shapesync_core::LeaseInfo, SinkError> {
        let lease = self.lease.lock().unwrap();
        if let Some(e) = SinkError::from_verdict(shapesync_core::lease::judge(lease.as_ref(), fence, false)) {
            return Err(e);
        }
        Ok(shapesync_core::LeaseInfo { owner: fence.owner.clone(), epoch: fence.epoch, ..Default::default() })
    }
}

/// Runs a future that never waits (the memory sink's `apply`) to completion, so the
/// lease lock is held across the whole commit, as a store's transaction would.
fn run_ready<F: std::future::Future>(future: F) -> F::Output {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => panic!("the memory sink never waits"),
    }
}

/// A running pipeline over a [`LeasedSink`].
struct Leased {
    store: MemoryStore,
    sink: Arc<LeasedSink>,
    status: Arc<shapesync_core::PipelineStatus>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), PipelineError>>,
}

/// Starts `h`'s pipeline over a leased memory store. A TTL long enough that no renewal
/// runs during the test: the commits meet the fence.
fn start_leased(h: &mut Harness) -> Leased {
    let store = MemoryStore::new();
    let sink = Arc::new(LeasedSink::new(store.clone()));
    let timing =
        shapesync_core::LeaseTiming { ttl: Duration::from_secs(600), poll: Duration::from_millis(5) };
    let fleet = Arc::new(shapesync_core::Fleet::new("me", 1, true, timing));
    let p = pipeline(h, sink.clone()).with_fleet(fleet);
    let status = p.status();
    let stop = CancellationToken::new();
    let task = tokio::spawn(p.run(RunMode::Follow, stop.clone()));
    Leased { store, sink, status, stop, task }
}

#[tokio::test]
async fn a_commit_refused_by_the_fence_writes_nothing_and_the_pipeline_stands_by_then_resumes() {
    let mut h = harness("h");
    let Leased { store, sink, status, stop, task } = start_leased(&mut h);
    h.script.send(response("H", "0_inf", vec![ins(1, "a")], true)).unwrap();
    wait_until(|| status.is_up_to_date()).await;
    assert!(status.is_owned());
    let before = store.checkpoint();

    sink.take_over();
    h.script.send(response("H", "10_0", vec![live(ins(2, "b"), 10, 0, true)], true)).unwrap();
    wait_until(|| !status.is_owned()).await;
    assert_eq!(status.holder().as_deref(), Some("other"), "it stands by for the new owner");
    assert_eq!(store.get(&key(2)), None, "the refused commit wrote nothing");
    assert_eq!(store.checkpoint(), before, "nor its checkpoint");
    assert!(status.failure().is_none(), "being fenced is not a failure");

    // The other instance lets go: this one takes the lease back and resumes from the store.
    sink.release_other();
    wait_until(|| h.resumed.lock().unwrap().len() == 2).await;
    let resumed = h.resumed.lock().unwrap()[1].clone().expect("resumes from the stored checkpoint");
    assert_eq!(resumed.offset.to_string(), "0_inf");
    h.script.send(response("H", "10_0", vec![live(ins(2, "b"), 10, 0, true)], true)).unwrap();
    wait_until(|| store.get(&key(2)).is_some()).await;
    assert!(status.is_owned());
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_sink_that_lost_its_state_is_resynced_from_a_fresh_snapshot() {
    let mut h = harness("h");
    let Leased { store, sink, status, stop, task } = start_leased(&mut h);
    h.script.send(response("H", "0_inf", vec![ins(1, "a"), ins(2, "b")], true)).unwrap();
    wait_until(|| status.is_up_to_date()).await;

    // The store goes back in time: an older copy, whose lease counts fewer commits.
    sink.lease.lock().unwrap().as_mut().unwrap().seq = 0;
    h.script.send(response("H", "10_0", vec![live(ins(3, "c"), 10, 0, true)], true)).unwrap();
    wait_until(|| h.resumed.lock().unwrap().len() == 2).await;
    assert_eq!(
        h.resumed.lock().unwrap()[1],
        None,
        "it resyncs from a fresh snapshot, not from the stored offset"
    );
    assert_eq!(store.get(&key(3)), None, "nothing was written on top of the lost state");
    let generation = store.checkpoint().unwrap().generation;
    h.script.send(response("H2", "0_inf", vec![ins(1, "a"), ins(3, "c")], true)).unwrap();
    wait_until(|| store.checkpoint().is_some_and(|cp| cp.handle == "H2" && !cp.resyncing)).await;
    assert!(store.checkpoint().unwrap().generation > generation);
    assert_eq!(
        store.rows().into_keys().collect::<Vec<_>>(),
        vec![key(1), key(3)],
        "swept to the new snapshot"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_transaction_that_never_ends_stops_the_pipeline_at_the_limit_instead_of_filling_memory() {
    let mut h = harness("h");
    let store = MemoryStore::new();
    let p = pipeline(&mut h, Arc::new(MemorySink::new(store.clone()))).with_max_transaction_changes(10);
    let task = tokio::spawn(p.run(RunMode::Follow, CancellationToken::new()));
    h.script.send(response("H", "0_inf", vec![ins(1, "a")], true)).unwrap();
    // Responses of one transaction that never reaches its last change.
    for (i, id) in (10..).step_by(4).take(4).enumerate() {
        let changes =
            (0..4).map(|op| live(ins(id + op, "x"), 50, (i * 4) as u64 + op as u64, false)).collect();
        h.script.send(response("H", &format!("50_{}", i * 4 + 3), changes, false)).unwrap();
    }
    let result = tokio::time::timeout(DEADLINE, task).await.expect("stops").unwrap();
    assert!(matches!(result, Err(PipelineError::TransactionTooLarge { max: 10 })), "{result:?}");
    assert_eq!(store.len(), 1, "nothing of the unfinished transaction was written");
}

/// A memory sink that records why each sweep's resync began.
struct SweepReasons {
    inner: MemorySink,
    reasons: Mutex<Vec<Option<shapesync_core::ResyncReason>>>,
}

#[async_trait]
impl Sink for SweepReasons {
    async fn checkpoint(&self) -> Result<Option<Checkpoint>, SinkError> {
        self.inner.checkpoint().await
    }
    async fn apply(&self, batch: &Batch) -> Result<(), SinkError> {
        if batch.sweep {
            self.reasons.lock().unwrap().push(batch.resync_reason);
        } else {
            assert_eq!(batch.resync_reason, None, "only a sweep carries a reason");
        }
        self.inner.apply(batch).await
    }
    async fn reset(&self) -> Result<(), SinkError> {
        self.inner.reset().await
    }
}

#[tokio::test]
async fn a_sweep_says_why_its_resync_began() {
    use shapesync_core::ResyncReason;
    let store = MemoryStore::new();
    let sink = Arc::new(SweepReasons { inner: MemorySink::new(store.clone()), reasons: Mutex::default() });
    let mut h = harness("h");
    let p = pipeline(&mut h, sink.clone());
    let stop = CancellationToken::new();
    let task = tokio::spawn(p.run(RunMode::Follow, stop.clone()));
    h.script.send(response("H1", "0_inf", vec![ins(1, "a")], true)).unwrap();
    wait_until(|| sink.reasons.lock().unwrap().len() == 1).await;
    h.script.send(Ok(SourceEvent::MustRefetch)).unwrap();
    h.script.send(response("H2", "0_inf", vec![ins(1, "a")], true)).unwrap();
    wait_until(|| sink.reasons.lock().unwrap().len() == 2).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(
        *sink.reasons.lock().unwrap(),
        [Some(ResyncReason::FirstSync), Some(ResyncReason::MustRefetch)]
    );
    // A definition change (a new hash over the stored checkpoint) is its own reason.
    let mut h = harness("new-hash");
    h.script.send(response("H3", "0_inf", vec![ins(1, "a")], true)).unwrap();
    pipeline(&mut h, sink.clone()).run(RunMode::UntilUpToDate, CancellationToken::new()).await.unwrap();
    assert_eq!(sink.reasons.lock().unwrap().last(), Some(&Some(ResyncReason::DefinitionChanged)));
}
