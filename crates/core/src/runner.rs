//! The pipeline runner: source → transforms → sink, committing only at
//! transaction-consistent points, with backpressure, sink retries, mark-and-sweep
//! resyncs and graceful shutdown.

use std::mem;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metrics::{counter, gauge, histogram};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::RetrySpec;
use crate::registry::PreparedPipeline;
use crate::{
    Batch, Change, Checkpoint, ResumePoint, Schema, Sink, SinkError, Source, SourceError, SourceEvent,
    Transform, TransformError,
};

/// How long an in-flight sink commit may run on after shutdown is requested before
/// it is abandoned. Abandoning loses nothing: the checkpoint is written last, so what
/// landed without it is re-read and re-applied idempotently on restart.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Whether a pipeline follows the shape forever or stops at the head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// Keep following live changes until shutdown.
    Follow,
    /// Sync to `up-to-date`, commit, and return (warm-ups, cron, tests).
    UntilUpToDate,
}

/// Why a pipeline stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The source failed in a way retrying cannot fix.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The sink failed permanently.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// A transform rejected a change.
    #[error(transparent)]
    Transform(#[from] TransformError),
    /// The source task ended unexpectedly.
    #[error("the source stopped unexpectedly; this is a bug, please report it")]
    SourceGone,
}

/// Live state of one pipeline, shared with health endpoints and progress displays.
#[derive(Debug, Default)]
pub struct PipelineStatus {
    up_to_date: AtomicBool,
    reached_up_to_date: AtomicBool,
    changes_committed: AtomicU64,
    failure: Mutex<Option<String>>,
}

impl PipelineStatus {
    /// The last commit was at the shape's head.
    pub fn is_up_to_date(&self) -> bool {
        self.up_to_date.load(Ordering::Relaxed)
    }
    /// The pipeline has been up to date at least once since start.
    pub fn has_reached_up_to_date(&self) -> bool {
        self.reached_up_to_date.load(Ordering::Relaxed)
    }
    /// Changes committed to the sink since start.
    pub fn changes_committed(&self) -> u64 {
        self.changes_committed.load(Ordering::Relaxed)
    }
    /// Why the pipeline stopped, if it failed.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().expect("status lock").clone()
    }
    fn set_failure(&self, message: String) {
        *self.failure.lock().expect("status lock") = Some(message);
    }
}

/// A runnable pipeline: one source, its transforms, one sink.
pub struct Pipeline {
    id: String,
    source: Box<dyn Source>,
    transforms: Vec<Box<dyn Transform>>,
    sink: Arc<dyn Sink>,
    buffer: usize,
    retry: RetrySpec,
    status: Arc<PipelineStatus>,
}

impl PreparedPipeline {
    /// Creates the source and connects the sink.
    pub async fn build(self) -> Result<Pipeline, PipelineError> {
        let source = self.source.build().await?;
        let sink = self.sink.build().await?;
        Ok(Pipeline::new(self.id, source, sink)
            .with_transforms(self.transforms)
            .with_buffer(self.buffer)
            .with_retry(self.retry))
    }
}

/// The position the runner has reached, committed or not.
struct Position {
    shape_hash: String,
    generation: u64,
    resyncing: bool,
    committed: Option<(String, crate::Offset)>,
}

impl Pipeline {
    /// A pipeline with no transforms and default settings.
    pub fn new(id: impl Into<String>, source: Box<dyn Source>, sink: Arc<dyn Sink>) -> Self {
        Pipeline {
            id: id.into(),
            source,
            transforms: Vec::new(),
            sink,
            buffer: crate::config::defaults::BUFFER,
            retry: RetrySpec::default(),
            status: Arc::default(),
        }
    }

    /// Sets the transforms, applied in order.
    pub fn with_transforms(mut self, transforms: Vec<Box<dyn Transform>>) -> Self {
        self.transforms = transforms;
        self
    }

    /// Sets how many source responses may wait for the sink (at least 1).
    pub fn with_buffer(mut self, buffer: usize) -> Self {
        self.buffer = buffer.max(1);
        self
    }

    /// Sets the sink retry backoff.
    pub fn with_retry(mut self, retry: RetrySpec) -> Self {
        self.retry = retry;
        self
    }

    /// The pipeline id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The live status, for health checks and progress.
    pub fn status(&self) -> Arc<PipelineStatus> {
        self.status.clone()
    }

    /// Runs until shutdown (or, in [`RunMode::UntilUpToDate`], until the sink holds
    /// the shape's head). Returns `Ok` on a clean stop; a failure is also recorded
    /// in [`PipelineStatus::failure`].
    pub async fn run(self, mode: RunMode, shutdown: CancellationToken) -> Result<(), PipelineError> {
        let status = self.status.clone();
        let id = self.id.clone();
        let result = self.run_inner(mode, shutdown).await;
        if let Err(e) = &result {
            counter!("shapesync_pipeline_failures_total", "pipeline" => id.clone()).increment(1);
            status.set_failure(e.to_string());
        }
        gauge!("shapesync_up_to_date", "pipeline" => id).set(0.0);
        result
    }

    async fn run_inner(self, mode: RunMode, shutdown: CancellationToken) -> Result<(), PipelineError> {
        let Pipeline { id, mut source, transforms, sink, buffer, retry, status } = self;
        let this = Committer { id, transforms, sink, retry, status };
        let Some(stored) = this.load_checkpoint(&shutdown).await? else { return Ok(()) };
        let shape_hash = source.definition_hash();
        // No checkpoint: a fresh sync, run as a resync so its first up-to-date sweeps rows a
        // crashed earlier attempt wrote ahead of its first checkpoint.
        let mut pos = Position {
            shape_hash: shape_hash.clone(),
            generation: next_generation(0),
            resyncing: true,
            committed: None,
        };
        match stored {
            Some(cp) if cp.shape_hash == shape_hash => {
                info!(pipeline = %this.id, handle = %cp.handle, offset = %cp.offset, "resuming from stored checkpoint");
                pos.generation = cp.generation;
                pos.resyncing = cp.resyncing;
                pos.committed = Some((cp.handle.clone(), cp.offset));
                source.resume(Some(ResumePoint { handle: cp.handle, offset: cp.offset, schema: cp.schema }));
            }
            Some(cp) => {
                info!(pipeline = %this.id, "shape definition changed since the stored checkpoint; resyncing (old rows stay until the new snapshot is complete)");
                pos.generation = next_generation(cp.generation);
                source.resume(None);
            }
            None => source.resume(None),
        }

        let (tx, mut rx) = mpsc::channel(buffer);
        let source_task = tokio::spawn(pump(source, tx));
        let _abort = AbortOnDrop(source_task);
        let mut pending: Vec<Change> = Vec::new();
        let labels = [("pipeline", this.id.clone())];

        loop {
            let event = tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    info!(pipeline = %this.id, uncommitted = pending.len(), "shutting down; uncommitted changes will be re-read on restart");
                    return Ok(());
                }
                event = rx.recv() => event,
            };
            let response = match event.ok_or(PipelineError::SourceGone)?? {
                SourceEvent::MustRefetch => {
                    warn!(pipeline = %this.id, "shape must be refetched; resyncing while serving the old rows");
                    counter!("shapesync_must_refetch_total", &labels).increment(1);
                    gauge!("shapesync_up_to_date", &labels).set(0.0);
                    this.status.up_to_date.store(false, Ordering::Relaxed);
                    pending.clear();
                    pos.generation = next_generation(pos.generation);
                    pos.resyncing = true;
                    pos.committed = None;
                    continue;
                }
                SourceEvent::Response(r) => r,
            };
            let received = response.changes.len() as u64;
            counter!("shapesync_changes_received_total", &labels).increment(received);
            let ends_transaction = response.changes.last().is_some_and(|c| c.last_in_tx);
            this.transform_into(response.changes, &mut pending)?;
            // The head of the shape, with a snapshot behind it: never at `-1`, whatever a
            // server says (a sweep there would empty the cache).
            let at_head = response.up_to_date && response.offset != crate::Offset::Start;
            let commit_point = at_head || response.offset.is_snapshot() || ends_transaction;
            if !commit_point {
                debug!(pipeline = %this.id, offset = %response.offset, carried = pending.len(), "response ends mid-transaction; carrying it into the next");
                continue;
            }
            let sweep = pos.resyncing && at_head;
            let unchanged =
                pos.committed.as_ref().is_some_and(|(h, o)| *h == response.handle && *o == response.offset);
            if !(pending.is_empty() && unchanged && !sweep) {
                let batch = Batch {
                    changes: mem::take(&mut pending),
                    checkpoint: Checkpoint {
                        shape_hash: pos.shape_hash.clone(),
                        handle: response.handle.clone(),
                        offset: response.offset,
                        schema: (*response.schema).clone(),
                        generation: pos.generation,
                        resyncing: pos.resyncing && !sweep,
                    },
                    sweep,
                    up_to_date: at_head,
                    row_schema: this.row_schema(&response.schema)?,
                };
                if !this.commit(&batch, &shutdown).await? {
                    return Ok(());
                }
                pos.resyncing = batch.checkpoint.resyncing;
                pos.committed = Some((response.handle, response.offset));
            }
            if at_head {
                this.status.up_to_date.store(true, Ordering::Relaxed);
                this.status.reached_up_to_date.store(true, Ordering::Relaxed);
                gauge!("shapesync_up_to_date", &labels).set(1.0);
                if mode == RunMode::UntilUpToDate {
                    return Ok(());
                }
            }
        }
    }
}

/// The commit side of a running pipeline.
struct Committer {
    id: String,
    transforms: Vec<Box<dyn Transform>>,
    sink: Arc<dyn Sink>,
    retry: RetrySpec,
    status: Arc<PipelineStatus>,
}

impl Committer {
    fn transform_into(&self, changes: Vec<Change>, out: &mut Vec<Change>) -> Result<(), TransformError> {
        let mut current = changes;
        for t in &self.transforms {
            let mut next = Vec::with_capacity(current.len());
            let given = current.len();
            for change in current {
                t.apply(change, &mut next)?;
            }
            if next.len() < given {
                let labels = [("pipeline", self.id.clone()), ("component", "transform".to_owned())];
                counter!("shapesync_changes_discarded_total", &labels).increment((given - next.len()) as u64);
            }
            current = next;
        }
        if out.is_empty() {
            *out = current; // the common case: no copy of a whole response
        } else {
            out.append(&mut current);
        }
        Ok(())
    }

    /// The columns of the transformed rows, when the transforms change the source's.
    fn row_schema(&self, source: &Schema) -> Result<Option<Arc<Schema>>, TransformError> {
        let mut changed: Option<Schema> = None;
        for t in &self.transforms {
            if let Some(next) = t.schema(changed.as_ref().unwrap_or(source))? {
                changed = Some(next);
            }
        }
        Ok(changed.map(Arc::new))
    }

    /// Reads the stored checkpoint, retrying while the sink is unavailable.
    /// `Ok(None)` means shutdown was requested first.
    async fn load_checkpoint(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Option<Checkpoint>>, PipelineError> {
        let mut attempt = 0;
        loop {
            match self.sink.checkpoint().await {
                Ok(cp) => return Ok(Some(cp)),
                Err(e) if e.is_transient() => {
                    warn!(pipeline = %self.id, error = %e, "cannot read the checkpoint yet");
                    if !self.backoff(attempt, shutdown).await {
                        return Ok(None);
                    }
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Applies a batch, retrying transient failures forever with backoff.
    /// Returns `Ok(false)` when shutdown stopped it before the batch committed.
    async fn commit(&self, batch: &Batch, shutdown: &CancellationToken) -> Result<bool, PipelineError> {
        let labels = [("pipeline", self.id.clone())];
        let mut attempt = 0;
        loop {
            let started = Instant::now();
            let outcome = tokio::select! {
                r = self.sink.apply(batch) => r,
                _ = async { shutdown.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
                    warn!(pipeline = %self.id, "abandoning a sink commit that outlived the shutdown grace period; its checkpoint was not stored, so it is re-applied on restart");
                    return Ok(false);
                }
            };
            match outcome {
                Ok(()) => {
                    histogram!("shapesync_sink_commit_duration_seconds", &labels).record(started.elapsed());
                    histogram!("shapesync_sink_batch_changes", &labels).record(batch.changes.len() as f64);
                    counter!("shapesync_changes_committed_total", &labels)
                        .increment(batch.changes.len() as u64);
                    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
                    gauge!("shapesync_last_commit_timestamp_seconds", &labels).set(now);
                    self.status.changes_committed.fetch_add(batch.changes.len() as u64, Ordering::Relaxed);
                    debug!(pipeline = %self.id, changes = batch.changes.len(), offset = %batch.checkpoint.offset, sweep = batch.sweep, "committed");
                    return Ok(true);
                }
                Err(e) if e.is_transient() => {
                    counter!("shapesync_errors_total", "pipeline" => self.id.clone(), "component" => "sink")
                        .increment(1);
                    warn!(pipeline = %self.id, error = %e, attempt, "sink commit failed; retrying the same batch");
                    if !self.backoff(attempt, shutdown).await {
                        return Ok(false);
                    }
                    attempt += 1;
                }
                Err(e) => {
                    counter!("shapesync_errors_total", "pipeline" => self.id.clone(), "component" => "sink")
                        .increment(1);
                    return Err(e.into());
                }
            }
        }
    }

    /// Sleeps a full-jitter backoff; false if shutdown came first.
    async fn backoff(&self, attempt: u32, shutdown: &CancellationToken) -> bool {
        let ceiling = self.retry.ceiling(attempt);
        let delay = rand::rng().random_range(Duration::ZERO..=ceiling);
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = shutdown.cancelled() => false,
        }
    }
}

/// The generation of a new resync: above `current`, and above any generation an
/// earlier attempt could have used, even one that crashed before storing it (rows may
/// land ahead of a checkpoint): the clock in µs, or `current + 1` if that is larger.
fn next_generation(current: u64) -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
    now.max(current + 1)
}

/// Feeds the source's events to the runner. It takes a channel slot *before* asking
/// the source for more, so at most `buffer` responses wait for the sink and none is
/// parsed only to sit in memory waiting for a slot.
async fn pump(mut source: Box<dyn Source>, tx: mpsc::Sender<Result<SourceEvent, SourceError>>) {
    loop {
        let Ok(slot) = tx.reserve().await else { return };
        let event = source.next().await;
        let failed = event.is_err();
        slot.send(event);
        if failed {
            return;
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
