//! The pipeline runner: source → transforms → sink, committing only at
//! transaction-consistent points, with backpressure, sink retries, mark-and-sweep
//! resyncs, leases (one writer per pipeline) and graceful shutdown.

use std::mem;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metrics::{counter, gauge, histogram};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::config::RetrySpec;
use crate::registry::PreparedPipeline;
use crate::{
    Acquisition, Batch, Change, Checkpoint, Fence, Fleet, LeaseRequest, LeaseTiming, ResumePoint,
    ResyncReason, Schema, Sink, SinkError, SinkErrorKind, Source, SourceError, SourceEvent, Transform,
    TransformError,
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
    /// A transaction did not end within the configured number of changes.
    #[error(
        "a transaction went on past {max} changes without ending; if your transactions are that large, raise the pipeline's `max_transaction_changes`, otherwise check the server behind the source's `url`"
    )]
    TransactionTooLarge {
        /// The limit.
        max: usize,
    },
    /// `run --once` found another instance running the pipeline.
    #[error(
        "instance `{owner}` is running this pipeline and keeps renewing its lease; `run --once` does not take over a running pipeline: that instance keeps the sink in sync, or stop it first"
    )]
    Busy {
        /// The instance holding the lease.
        owner: String,
    },
}

/// Live state of one pipeline, shared with health endpoints and progress displays.
#[derive(Debug, Default)]
pub struct PipelineStatus {
    up_to_date: AtomicBool,
    reached_up_to_date: AtomicBool,
    owned: AtomicBool,
    placed: AtomicBool,
    changes_committed: AtomicU64,
    failure: Mutex<Option<String>>,
    holder: Mutex<Option<String>>,
    /// When the source last delivered a response (any: a live shape answers at least
    /// every long-poll hold, so silence means the server is not answering).
    last_response: Mutex<Option<Instant>>,
    /// Since when the sink has been failing (commits, lease), with the last error.
    sink_failing: Mutex<Option<(Instant, String)>>,
    /// When the last batch committed.
    last_commit: Mutex<Option<Instant>>,
    /// When the pipeline was last at its shape's head.
    last_up_to_date: Mutex<Option<Instant>>,
}

/// What a pipeline is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PipelineState {
    /// Stopped with an error.
    Failed,
    /// Has not asked for its lease yet.
    Starting,
    /// Another instance holds its lease.
    Standby,
    /// The sink has been failing for longer than the grace.
    SinkRetrying,
    /// The source has not answered for longer than the grace.
    SourceSilent,
    /// Has not reached its shape's head yet.
    InitialSync,
    /// At its shape's head.
    UpToDate,
    /// Was at the head, and is behind it now (a resync).
    CatchingUp,
}

impl PipelineState {
    /// How `/readyz` names it.
    pub fn as_str(self) -> &'static str {
        match self {
            PipelineState::Failed => "failed",
            PipelineState::Starting => "starting",
            PipelineState::Standby => "standby",
            PipelineState::SinkRetrying => "sink retrying",
            PipelineState::SourceSilent => "source silent",
            PipelineState::InitialSync => "initial sync",
            PipelineState::UpToDate => "up to date",
            PipelineState::CatchingUp => "catching up",
        }
    }

    /// Whether an instance with the pipeline in this state is ready: it serves its
    /// shape (or leaves it to the instance that does).
    pub fn is_ready(self) -> bool {
        matches!(self, PipelineState::Standby | PipelineState::UpToDate | PipelineState::CatchingUp)
    }
}

/// What a pipeline is doing, as `/readyz` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// Its state; faults shorter than the grace do not change it.
    pub state: PipelineState,
    /// How long the current fault (silent source, failing sink) has lasted.
    pub for_secs: Option<u64>,
    /// The last error, if a fault is current or the pipeline failed.
    pub last_error: Option<String>,
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
    /// This instance holds the pipeline's lease (it writes the sink); otherwise it
    /// stands by.
    pub fn is_owned(&self) -> bool {
        self.owned.load(Ordering::Relaxed)
    }
    /// The lease has been asked for at least once: [`PipelineStatus::is_owned`] says
    /// something (before that the pipeline is starting).
    pub fn is_placed(&self) -> bool {
        self.placed.load(Ordering::Relaxed)
    }
    /// While standing by: the instance that holds the lease, if any does.
    pub fn holder(&self) -> Option<String> {
        self.holder.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// Changes committed to the sink since start.
    pub fn changes_committed(&self) -> u64 {
        self.changes_committed.load(Ordering::Relaxed)
    }
    /// How long ago the last batch committed (`None`: none yet).
    pub fn since_last_commit(&self) -> Option<Duration> {
        self.last_commit.lock().unwrap_or_else(|e| e.into_inner()).map(|at| at.elapsed())
    }
    /// How far behind its shape's head the pipeline is, as time: zero while it is up to
    /// date, else how long ago it last was (`None`: never yet).
    pub fn lag(&self) -> Option<Duration> {
        if self.is_up_to_date() {
            return Some(Duration::ZERO);
        }
        self.last_up_to_date.lock().unwrap_or_else(|e| e.into_inner()).map(|at| at.elapsed())
    }
    /// Why the pipeline stopped, if it failed.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn set_failure(&self, message: String) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
    }
    fn source_answered(&self) {
        *self.last_response.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }
    fn sink_failed(&self, error: &SinkError) {
        let mut failing = self.sink_failing.lock().unwrap_or_else(|e| e.into_inner());
        let since = failing.as_ref().map_or_else(Instant::now, |(at, _)| *at);
        *failing = Some((since, error.to_string()));
    }
    fn sink_answered(&self) {
        *self.sink_failing.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The pipeline's state now; faults shorter than `grace` leave it ready (a source
    /// retry or a sink blip is not an outage).
    pub fn health(&self, grace: Duration) -> Health {
        let failure = self.failure();
        let owned = self.is_owned();
        let sink = self.sink_failing.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let silent_for = self.last_response.lock().unwrap_or_else(|e| e.into_inner()).map(|at| at.elapsed());
        let (state, fault) = if failure.is_some() {
            (PipelineState::Failed, None)
        } else if !self.is_placed() {
            (PipelineState::Starting, None)
        } else if !owned {
            (PipelineState::Standby, None)
        } else if let Some((since, error)) = sink.filter(|(since, _)| since.elapsed() >= grace) {
            (PipelineState::SinkRetrying, Some((since.elapsed(), Some(error))))
        } else if let Some(silent) = silent_for.filter(|d| *d >= grace) {
            (PipelineState::SourceSilent, Some((silent, None)))
        } else if !self.has_reached_up_to_date() {
            (PipelineState::InitialSync, None)
        } else if self.is_up_to_date() {
            (PipelineState::UpToDate, None)
        } else {
            (PipelineState::CatchingUp, None)
        };
        Health {
            state,
            for_secs: fault.as_ref().map(|(d, _)| d.as_secs()),
            last_error: failure.or_else(|| fault.and_then(|(_, e)| e)),
        }
    }
    fn set_owned(&self, pipeline: &str, owned: bool, holder: Option<String>) {
        if owned && !self.is_owned() {
            self.source_answered(); // a new session: the source's silence counts from now
        }
        self.owned.store(owned, Ordering::Relaxed);
        self.placed.store(true, Ordering::Relaxed);
        *self.holder.lock().unwrap_or_else(|e| e.into_inner()) = holder;
        gauge!("shapesync_pipeline_owned", "pipeline" => pipeline.to_owned()).set(if owned {
            1.0
        } else {
            0.0
        });
        if !owned {
            self.set_up_to_date(pipeline, false);
        }
    }
    fn set_up_to_date(&self, pipeline: &str, up: bool) {
        let was = self.up_to_date.swap(up, Ordering::Relaxed);
        if up || was {
            // Up to date now, or until now: the lag counts from here.
            *self.last_up_to_date.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
        if up {
            self.reached_up_to_date.store(true, Ordering::Relaxed);
        }
        gauge!("shapesync_up_to_date", "pipeline" => pipeline.to_owned()).set(if up { 1.0 } else { 0.0 });
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
    fleet: Option<Arc<Fleet>>,
    max_transaction_changes: usize,
}

impl PreparedPipeline {
    /// Creates the source and connects the sink.
    pub async fn build(self) -> Result<Pipeline, PipelineError> {
        let source = self.source.build().await?;
        let sink = self.sink.build().await?;
        Ok(Pipeline::new(self.id, source, sink)
            .with_transforms(self.transforms)
            .with_buffer(self.buffer)
            .with_retry(self.retry)
            .with_max_transaction_changes(self.max_transaction_changes))
    }
}

/// The position the runner has reached, committed or not.
struct Position {
    shape_hash: String,
    generation: u64,
    /// No earlier writer used a generation above this one (see [`Acquisition::Owned`]).
    generation_floor: u64,
    resyncing: bool,
    /// Why the current resync began (meaningful while `resyncing`).
    reason: ResyncReason,
    committed: Option<(String, crate::Offset)>,
}

impl Position {
    /// Starts a new resync: a generation above every one used before.
    fn start_resync(&mut self, reason: ResyncReason) {
        self.generation = next_generation(self.generation.max(self.generation_floor));
        self.resyncing = true;
        self.reason = reason;
        self.committed = None;
    }
}

/// How one period of owning the lease ended.
enum Session {
    /// Shutdown, or the lease's renewer stopped it (see [`LeaseEnd`]).
    Stopped,
    /// [`RunMode::UntilUpToDate`] reached the head.
    Done,
    /// A commit was refused: another instance holds the lease.
    Fenced(String),
    /// A commit found the store no longer holds what we wrote.
    Lost(String),
}

/// Why the lease renewer stopped.
enum LeaseEnd {
    /// The session ended first.
    Kept,
    /// Another instance took the lease.
    Fenced(String),
    /// The store lost the lease.
    Lost(String),
    /// This instance owns more than its share: hand the pipeline over.
    HandOver,
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
            fleet: None,
            max_transaction_changes: crate::config::defaults::MAX_TRANSACTION_CHANGES,
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

    /// Sets the most changes of one unfinished transaction held in memory (at least 1);
    /// a transaction that goes on past it stops the pipeline.
    pub fn with_max_transaction_changes(mut self, max: usize) -> Self {
        self.max_transaction_changes = max.max(1);
        self
    }

    /// Runs as one of `fleet`'s pipelines: its instance id and lease timing, and its
    /// share of the pipelines when instances spread them. Default: an instance of its
    /// own with the default timing.
    pub fn with_fleet(mut self, fleet: Arc<Fleet>) -> Self {
        self.fleet = Some(fleet);
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
    ///
    /// The pipeline writes only while it holds its lease: until then it stands by,
    /// asking every `poll`; when the lease is lost to another instance it stands by
    /// again; when the store turns out to have lost what was written, it takes the
    /// lease again and resyncs.
    pub async fn run(self, mode: RunMode, shutdown: CancellationToken) -> Result<(), PipelineError> {
        let status = self.status.clone();
        let id = self.id.clone();
        // Every line logged for this pipeline — runner, source, sink, their tasks — carries
        // its id through this span.
        let span = tracing::info_span!("pipeline", pipeline = %id);
        let result = self.run_inner(mode, shutdown).instrument(span).await;
        if let Err(e) = &result {
            counter!("shapesync_pipeline_failures_total", "pipeline" => id.clone()).increment(1);
            status.set_failure(e.to_string());
        }
        status.set_owned(&id, false, None);
        result
    }

    async fn run_inner(self, mode: RunMode, shutdown: CancellationToken) -> Result<(), PipelineError> {
        let Pipeline {
            id,
            mut source,
            transforms,
            sink,
            buffer,
            retry,
            status,
            fleet,
            max_transaction_changes,
        } = self;
        let fleet = fleet.unwrap_or_else(|| {
            Arc::new(Fleet::new(crate::lease::instance_id(), 1, false, LeaseTiming::default()))
        });
        let this =
            Arc::new(Committer { id, transforms, sink, retry, status, fleet, max_transaction_changes });
        let labels = [("pipeline", this.id.clone())];
        crate::telemetry::register_pipeline(&this.id);
        let mut resync = false;
        loop {
            let Some((fence, generation_floor)) = this.stand_by(mode, &shutdown).await? else {
                return Ok(());
            };
            let seq = Arc::new(AtomicU64::new(fence.seq));
            let owned = shutdown.child_token();
            let renewer =
                tokio::spawn(this.clone().renew(fence.clone(), seq.clone(), owned.clone()).in_current_span());
            let (back, session) =
                this.sync(source, buffer, mode, &fence, &seq, generation_floor, resync, &owned).await;
            source = back;
            owned.cancel();
            let lease_end = renewer.await.unwrap_or(LeaseEnd::Kept);
            resync = false;
            let mut current = fence.clone();
            current.seq = seq.load(Ordering::Relaxed);
            let session = match session {
                Ok(s) => s,
                Err(e) => {
                    this.release(&current).await;
                    return Err(e);
                }
            };
            match (session, lease_end) {
                (Session::Fenced(why), _) | (_, LeaseEnd::Fenced(why)) => {
                    warn!(pipeline = %this.id, reason = %why, "lost the pipeline's lease to another instance; standing by");
                    counter!("shapesync_fenced_total", &labels).increment(1);
                    this.fleet.released(&this.id);
                    this.status.set_owned(&this.id, false, None);
                }
                (Session::Lost(why), _) | (_, LeaseEnd::Lost(why)) => {
                    warn!(pipeline = %this.id, reason = %why, "the sink no longer holds what this instance wrote; taking the lease again and resyncing from a fresh snapshot");
                    counter!("shapesync_sink_state_lost_total", &labels).increment(1);
                    this.fleet.released(&this.id);
                    this.status.set_owned(&this.id, false, None);
                    resync = true;
                }
                (Session::Done, _) => {
                    this.release(&current).await;
                    return Ok(());
                }
                (Session::Stopped, LeaseEnd::HandOver) if !shutdown.is_cancelled() => {
                    info!(pipeline = %this.id, "handing the pipeline over: this instance owns more than its share");
                    counter!("shapesync_lease_handovers_total", &labels).increment(1);
                    this.release(&current).await;
                    this.status.set_owned(&this.id, false, None);
                }
                (Session::Stopped, _) => {
                    this.release(&current).await;
                    return Ok(());
                }
            }
        }
    }
}

/// The side of a running pipeline that owns its lease and commits to its sink.
struct Committer {
    id: String,
    transforms: Vec<Box<dyn Transform>>,
    sink: Arc<dyn Sink>,
    retry: RetrySpec,
    status: Arc<PipelineStatus>,
    fleet: Arc<Fleet>,
    max_transaction_changes: usize,
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

    /// Counts a failed transform in `shapesync_errors_total{component="transform"}`.
    fn count_transform_error(&self) {
        counter!("shapesync_errors_total", "pipeline" => self.id.clone(), "component" => "transform")
            .increment(1);
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

    /// Stands by until this instance holds the pipeline's lease; `None` on shutdown.
    /// Returns the fence and the generation floor (see [`Acquisition::Owned`]).
    async fn stand_by(
        &self,
        mode: RunMode,
        shutdown: &CancellationToken,
    ) -> Result<Option<(Fence, u64)>, PipelineError> {
        let timing = self.fleet.timing().clone();
        let mut failures = 0;
        let mut unreachable = FaultLog::new(self.retry.ceiling(u32::MAX));
        let mut told: Option<String> = None;
        let mut busy_since: Option<Instant> = None;
        loop {
            let request = LeaseRequest {
                owner: self.fleet.instance().to_owned(),
                ttl_ms: u64::try_from(timing.ttl.as_millis()).unwrap_or(u64::MAX),
                take: mode == RunMode::UntilUpToDate || self.fleet.may_take(&self.id),
            };
            let acquired = self.sink.acquire(&request).await;
            match &acquired {
                Ok(_) => {
                    self.status.sink_answered();
                    unreachable.recovered(&self.id, "the sink answers");
                }
                Err(e) if e.is_transient() => self.status.sink_failed(e),
                Err(_) => {}
            }
            match acquired {
                Ok(Acquisition::Owned { fence, generation_floor }) => {
                    if self.sink.keeps_leases() {
                        info!(pipeline = %self.id, instance = %fence.owner, epoch = fence.epoch, "took the pipeline's lease; this instance writes it now");
                    }
                    counter!("shapesync_lease_acquired_total", "pipeline" => self.id.clone()).increment(1);
                    self.fleet.observe_owned(&self.id, &[]);
                    self.status.set_owned(&self.id, true, None);
                    return Ok(Some((fence, generation_floor)));
                }
                Ok(Acquisition::NotOwned(lease)) => {
                    failures = 0;
                    self.fleet.observe(&self.id, &lease);
                    let holder = lease.is_held().then(|| lease.owner.clone());
                    if holder != told {
                        match &holder {
                            Some(owner) => {
                                info!(pipeline = %self.id, %owner, expires_in_ms = lease.expires_in_ms, "standing by: another instance holds the pipeline's lease")
                            }
                            None => {
                                info!(pipeline = %self.id, "standing by: the lease is free, left to an instance with fewer pipelines")
                            }
                        }
                        told.clone_from(&holder);
                    }
                    self.status.set_owned(&self.id, false, holder.clone());
                    if let (RunMode::UntilUpToDate, Some(owner)) = (mode, holder) {
                        // A dead owner's lease expires within a TTL; a live one keeps renewing.
                        let since = *busy_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > timing.ttl + timing.poll * 2 {
                            return Err(PipelineError::Busy { owner });
                        }
                    }
                }
                Err(e) if e.is_transient() => {
                    counter!("shapesync_errors_total", "pipeline" => self.id.clone(), "component" => "sink")
                        .increment(1);
                    if unreachable.record() {
                        warn!(pipeline = %self.id, error = %e, failures = unreachable.failures, lasted_s = unreachable.lasted().as_secs(), "cannot reach the sink to take the pipeline's lease; retrying with backoff (start the store, or fix the sink's url)");
                    } else {
                        debug!(pipeline = %self.id, error = %e, "cannot reach the sink yet");
                    }
                    if !self.backoff(failures, shutdown).await {
                        return Ok(None);
                    }
                    failures += 1;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            tokio::select! {
                _ = tokio::time::sleep(timing.poll) => {}
                _ = shutdown.cancelled() => return Ok(None),
            }
        }
    }

    /// Renews the lease three times per TTL until `owned` is cancelled; cancels it
    /// itself when the lease is lost or should be handed over.
    async fn renew(self: Arc<Self>, fence: Fence, seq: Arc<AtomicU64>, owned: CancellationToken) -> LeaseEnd {
        let every = self.fleet.timing().renew_every();
        let mut unreachable = FaultLog::new(self.retry.ceiling(u32::MAX));
        let end = loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = owned.cancelled() => return LeaseEnd::Kept,
            }
            let current = Fence { seq: seq.load(Ordering::Relaxed), ..fence.clone() };
            match self.sink.renew(&current).await {
                Ok(lease) => {
                    self.status.sink_answered();
                    unreachable.recovered(&self.id, "the sink renews the lease");
                    self.fleet.observe_owned(&self.id, &lease.standbys);
                    if self.fleet.should_hand_over(&self.id) {
                        break LeaseEnd::HandOver;
                    }
                }
                Err(e) if e.kind() == SinkErrorKind::Fenced => {
                    break LeaseEnd::Fenced(e.message().to_owned());
                }
                Err(e) if e.kind() == SinkErrorKind::StateLost => {
                    break LeaseEnd::Lost(e.message().to_owned());
                }
                Err(e) => {
                    // Writes stay safe meanwhile: every commit checks the fence itself.
                    self.status.sink_failed(&e);
                    if unreachable.record() {
                        warn!(pipeline = %self.id, error = %e, failures = unreachable.failures, "cannot renew the pipeline's lease; trying again");
                    } else {
                        debug!(pipeline = %self.id, error = %e, "cannot renew the pipeline's lease yet");
                    }
                }
            }
        };
        owned.cancel();
        end
    }

    /// Gives the lease up, so a standby takes over at once; failures only cost the
    /// standby a TTL.
    async fn release(&self, fence: &Fence) {
        if let Err(e) = self.sink.release(fence).await {
            warn!(pipeline = %self.id, error = %e, "cannot release the pipeline's lease; another instance takes it over when it expires");
        } else if self.sink.keeps_leases() {
            info!(pipeline = %self.id, "released the pipeline's lease");
        }
        self.fleet.released(&self.id);
    }

    /// Syncs while this instance holds the lease: reads the stored checkpoint, streams
    /// from it (or from a fresh snapshot) and commits, until the session ends. Gives the
    /// source back, whatever happened.
    #[allow(clippy::too_many_arguments)] // one session's inputs, each used once
    async fn sync(
        &self,
        mut source: Box<dyn Source>,
        buffer: usize,
        mode: RunMode,
        fence: &Fence,
        seq: &AtomicU64,
        generation_floor: u64,
        resync: bool,
        owned: &CancellationToken,
    ) -> (Box<dyn Source>, Result<Session, PipelineError>) {
        let stored = match self.load_checkpoint(owned).await {
            Ok(Some(stored)) => stored,
            Ok(None) => return (source, Ok(Session::Stopped)),
            Err(e) => return (source, Err(e)),
        };
        let shape_hash = source.definition_hash();
        // No checkpoint: a fresh sync, run as a resync so its first up-to-date sweeps rows a
        // crashed earlier attempt wrote ahead of its first checkpoint.
        let mut pos = Position {
            shape_hash: shape_hash.clone(),
            generation: 0,
            generation_floor,
            resyncing: true,
            reason: ResyncReason::FirstSync,
            committed: None,
        };
        match stored {
            Some(cp) if cp.shape_hash == shape_hash && !resync => {
                info!(pipeline = %self.id, handle = %cp.handle, offset = %cp.offset, "resuming from stored checkpoint");
                pos.generation = cp.generation;
                pos.resyncing = cp.resyncing;
                pos.reason = ResyncReason::Resumed;
                pos.committed = Some((cp.handle.clone(), cp.offset));
                source.resume(Some(ResumePoint { handle: cp.handle, offset: cp.offset, schema: cp.schema }));
            }
            Some(cp) => {
                if resync {
                    info!(pipeline = %self.id, "resyncing from a fresh snapshot (old rows stay until it is complete)");
                } else {
                    info!(pipeline = %self.id, "shape definition changed since the stored checkpoint; resyncing (old rows stay until the new snapshot is complete)");
                }
                pos.generation = cp.generation;
                pos.start_resync(if resync {
                    ResyncReason::StateLost
                } else {
                    ResyncReason::DefinitionChanged
                });
                source.resume(None);
            }
            None => {
                pos.start_resync(if resync { ResyncReason::StateLost } else { ResyncReason::FirstSync });
                source.resume(None);
            }
        }
        let stop = CancellationToken::new();
        let (tx, rx) = mpsc::channel(buffer);
        let pump = tokio::spawn(pump(source, tx, stop.clone()).in_current_span());
        let session = self.stream(rx, mode, &mut pos, fence, seq, owned).await;
        stop.cancel();
        match pump.await {
            Ok(source) => (source, session),
            Err(_) => panic!("the source task of pipeline `{}` panicked", self.id),
        }
    }

    /// The body of a session: responses in, batches out, until it ends.
    async fn stream(
        &self,
        mut rx: mpsc::Receiver<Result<SourceEvent, SourceError>>,
        mode: RunMode,
        pos: &mut Position,
        fence: &Fence,
        seq: &AtomicU64,
        owned: &CancellationToken,
    ) -> Result<Session, PipelineError> {
        let mut pending: Vec<Change> = Vec::new();
        let labels = [("pipeline", self.id.clone())];
        loop {
            let event = tokio::select! {
                biased;
                _ = owned.cancelled() => {
                    info!(pipeline = %self.id, uncommitted = pending.len(), "stopping; uncommitted changes will be re-read");
                    return Ok(Session::Stopped);
                }
                event = rx.recv() => event,
            };
            let event = event.ok_or(PipelineError::SourceGone)?.inspect_err(|_| {
                counter!("shapesync_errors_total", "pipeline" => self.id.clone(), "component" => "source")
                    .increment(1);
            })?;
            let response = match event {
                SourceEvent::MustRefetch => {
                    warn!(pipeline = %self.id, "shape must be refetched; resyncing while serving the old rows");
                    counter!("shapesync_must_refetch_total", &labels).increment(1);
                    self.status.set_up_to_date(&self.id, false);
                    pending.clear();
                    pos.start_resync(ResyncReason::MustRefetch);
                    continue;
                }
                SourceEvent::Response(r) => r,
            };
            self.status.source_answered();
            let received = response.changes.len() as u64;
            counter!("shapesync_changes_received_total", &labels).increment(received);
            gauge!("shapesync_last_source_response_timestamp_seconds", &labels).set(unix_now());
            let ends_transaction = response.changes.last().is_some_and(|c| c.last_in_tx);
            self.transform_into(response.changes, &mut pending)
                .inspect_err(|_| self.count_transform_error())?;
            // The head of the shape, with a snapshot behind it: never at `-1`, whatever a
            // server says (a sweep there would empty the cache).
            let at_head = response.up_to_date && response.offset != crate::Offset::Start;
            let commit_point = at_head || response.offset.is_snapshot() || ends_transaction;
            if !commit_point {
                if pending.len() > self.max_transaction_changes {
                    return Err(PipelineError::TransactionTooLarge { max: self.max_transaction_changes });
                }
                debug!(pipeline = %self.id, offset = %response.offset, carried = pending.len(), "response ends mid-transaction; carrying it into the next");
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
                    resync_reason: sweep.then_some(pos.reason),
                    up_to_date: at_head,
                    row_schema: self
                        .row_schema(&response.schema)
                        .inspect_err(|_| self.count_transform_error())?,
                    fence: Some(Fence { seq: seq.load(Ordering::Relaxed), ..fence.clone() }),
                };
                match self.commit(&batch, owned).await {
                    Ok(true) => {}
                    Ok(false) => return Ok(Session::Stopped),
                    Err(PipelineError::Sink(e)) if e.kind() == SinkErrorKind::Fenced => {
                        return Ok(Session::Fenced(e.message().to_owned()));
                    }
                    Err(PipelineError::Sink(e)) if e.kind() == SinkErrorKind::StateLost => {
                        return Ok(Session::Lost(e.message().to_owned()));
                    }
                    Err(e) => return Err(e),
                }
                seq.fetch_add(1, Ordering::Relaxed);
                if sweep {
                    info!(pipeline = %self.id, generation = pos.generation, "resync complete: rows that left the shape are swept");
                }
                pos.resyncing = batch.checkpoint.resyncing;
                pos.committed = Some((response.handle, response.offset));
            }
            if at_head {
                self.status.set_up_to_date(&self.id, true);
                gauge!("shapesync_last_up_to_date_timestamp_seconds", &labels).set(unix_now());
                if mode == RunMode::UntilUpToDate {
                    return Ok(Session::Done);
                }
            }
        }
    }

    /// Reads the stored checkpoint, retrying while the sink is unavailable.
    /// `Ok(None)` means the session was stopped first.
    async fn load_checkpoint(
        &self,
        stop: &CancellationToken,
    ) -> Result<Option<Option<Checkpoint>>, PipelineError> {
        let mut attempt = 0;
        let mut unreachable = FaultLog::new(self.retry.ceiling(u32::MAX));
        loop {
            match self.sink.checkpoint().await {
                Ok(cp) => {
                    self.status.sink_answered();
                    unreachable.recovered(&self.id, "the sink answers");
                    return Ok(Some(cp));
                }
                Err(e) if e.is_transient() => {
                    self.status.sink_failed(&e);
                    if unreachable.record() {
                        warn!(pipeline = %self.id, error = %e, failures = unreachable.failures, lasted_s = unreachable.lasted().as_secs(), "cannot read the checkpoint yet; retrying with backoff");
                    } else {
                        debug!(pipeline = %self.id, error = %e, "cannot read the checkpoint yet");
                    }
                    if !self.backoff(attempt, stop).await {
                        return Ok(None);
                    }
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Applies a batch, retrying transient failures forever with backoff.
    /// Returns `Ok(false)` when the session was stopped before the batch committed.
    async fn commit(&self, batch: &Batch, stop: &CancellationToken) -> Result<bool, PipelineError> {
        let labels = [("pipeline", self.id.clone())];
        let mut attempt = 0;
        let mut failing = FaultLog::new(self.retry.ceiling(u32::MAX));
        loop {
            let started = Instant::now();
            let outcome = tokio::select! {
                r = self.sink.apply(batch) => r,
                _ = async { stop.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
                    warn!(pipeline = %self.id, "abandoning a sink commit that outlived the shutdown grace period; its checkpoint was not stored, so it is re-applied on restart");
                    return Ok(false);
                }
            };
            match outcome {
                Ok(()) => {
                    self.status.sink_answered();
                    failing.recovered(&self.id, "the sink commits");
                    self.count_rows(batch);
                    histogram!("shapesync_sink_commit_duration_seconds", &labels).record(started.elapsed());
                    histogram!("shapesync_sink_batch_changes", &labels).record(batch.changes.len() as f64);
                    counter!("shapesync_changes_committed_total", &labels)
                        .increment(batch.changes.len() as u64);
                    gauge!("shapesync_last_commit_timestamp_seconds", &labels).set(unix_now());
                    self.status.changes_committed.fetch_add(batch.changes.len() as u64, Ordering::Relaxed);
                    *self.status.last_commit.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                    debug!(pipeline = %self.id, changes = batch.changes.len(), offset = %batch.checkpoint.offset, sweep = batch.sweep, "committed");
                    return Ok(true);
                }
                Err(e) if e.is_transient() => {
                    self.status.sink_failed(&e);
                    counter!("shapesync_errors_total", "pipeline" => self.id.clone(), "component" => "sink")
                        .increment(1);
                    if failing.record() {
                        warn!(pipeline = %self.id, error = %e, failures = failing.failures, lasted_s = failing.lasted().as_secs(), "sink commit failed; retrying the same batch with backoff");
                    } else {
                        debug!(pipeline = %self.id, error = %e, attempt, "sink commit failed again");
                    }
                    if !self.backoff(attempt, stop).await {
                        return Ok(false);
                    }
                    attempt += 1;
                }
                Err(e) if matches!(e.kind(), SinkErrorKind::Fenced | SinkErrorKind::StateLost) => {
                    return Err(e.into());
                }
                Err(e) => {
                    counter!("shapesync_errors_total", "pipeline" => self.id.clone(), "component" => "sink")
                        .increment(1);
                    return Err(e.into());
                }
            }
        }
    }

    /// Counts a committed batch's rows by operation (`shapesync_sink_rows_total{op}`).
    fn count_rows(&self, batch: &Batch) {
        let (mut inserts, mut updates, mut deletes) = (0u64, 0u64, 0u64);
        for change in &batch.changes {
            match change.op {
                crate::Operation::Insert => inserts += 1,
                crate::Operation::Update => updates += 1,
                crate::Operation::Delete => deletes += 1,
            }
        }
        for (op, n) in [("insert", inserts), ("update", updates), ("delete", deletes)] {
            if n > 0 {
                counter!("shapesync_sink_rows_total", "pipeline" => self.id.clone(), "op" => op).increment(n);
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

/// Reports a fault that repeats while it is retried without flooding the log: the first
/// occurrence at warn with the whole error (the sink's message names the store and its
/// address), then at most one warn line per `every` saying it persists and how often it
/// failed meanwhile; the rest at debug.
struct FaultLog {
    every: Duration,
    first: Option<Instant>,
    last_warned: Option<Instant>,
    failures: u64,
}

impl FaultLog {
    fn new(every: Duration) -> Self {
        FaultLog { every, first: None, last_warned: None, failures: 0 }
    }

    /// Records one failure; `true` when it should be logged at warn.
    fn record(&mut self) -> bool {
        let now = Instant::now();
        self.failures += 1;
        self.first.get_or_insert(now);
        let due = self.last_warned.is_none_or(|at| now.duration_since(at) >= self.every);
        if due {
            self.last_warned = Some(now);
        }
        due
    }

    /// How long the fault has lasted.
    fn lasted(&self) -> Duration {
        self.first.map_or(Duration::ZERO, |at| at.elapsed())
    }

    /// The operation succeeded: if it had been failing, says so once and starts over.
    fn recovered(&mut self, pipeline: &str, what: &str) {
        if self.failures > 0 {
            info!(%pipeline, failures = self.failures, lasted_s = self.lasted().as_secs(), "{what} again");
        }
        self.failures = 0;
        self.first = None;
        self.last_warned = None;
    }
}

/// Now, as Unix seconds (for `_timestamp_seconds` gauges).
fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The generation of a new resync: above `current`, and above any generation an
/// earlier attempt could have used, even one that crashed before storing it (rows may
/// land ahead of a checkpoint): the clock in µs, or `current + 1` if that is larger.
fn next_generation(current: u64) -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
    now.max(current + 1)
}

/// Feeds the source's events to the runner until `stop`, then gives the source back.
/// It takes a channel slot *before* asking the source for more, so at most `buffer`
/// responses wait for the sink and none is parsed only to sit in memory waiting for a
/// slot. Dropping a request in flight is safe: the source is resumed before reuse.
async fn pump(
    mut source: Box<dyn Source>,
    tx: mpsc::Sender<Result<SourceEvent, SourceError>>,
    stop: CancellationToken,
) -> Box<dyn Source> {
    loop {
        let slot = tokio::select! {
            slot = tx.reserve() => match slot {
                Ok(slot) => slot,
                Err(_) => return source,
            },
            _ = stop.cancelled() => return source,
        };
        let event = tokio::select! {
            event = source.next() => event,
            _ = stop.cancelled() => return source,
        };
        let failed = event.is_err();
        slot.send(event);
        if failed {
            stop.cancelled().await;
            return source;
        }
    }
}
