//! The sink side of a pipeline: a store that applies batches atomically.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::{BoxError, ErrorCode, SharedError, source_of};
use crate::lease::{Acquisition, Fence, LeaseInfo, LeaseRequest, Verdict};
use crate::{Batch, Checkpoint};

/// What a sink may know about the shape it stores, for validation and key layout.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShapeInfo {
    /// `table` or `schema.table`, as configured.
    pub table: String,
    /// The selected columns, when the source narrows them.
    pub columns: Option<Vec<String>>,
    /// Updates and deletes carry full rows (`replica: full`).
    pub full_rows: bool,
    /// The source sends no snapshot of the rows that exist (`log: changes_only`, or a
    /// fresh start at `offset: now`), only changes: a sink that mirrors the shape
    /// cannot be built from it, one that invalidates a cache can.
    pub changes_only: bool,
}

/// Everything a sink is told about where it runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SinkContext {
    /// The pipeline id; sinks namespace their rows and checkpoint by it.
    pub pipeline: String,
    /// The source's shape.
    pub shape: ShapeInfo,
}

/// What the runner does about a [`SinkError`]: the decision a caller makes on an
/// error, never on its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SinkErrorKind {
    /// The store is unreachable, timed out or is briefly unable to serve (a
    /// transient fault): the batch will be retried with backoff.
    Unavailable,
    /// The store refused the data or the settings; retrying will not help.
    Rejected,
    /// The stored checkpoint cannot be read.
    CorruptCheckpoint,
    /// Another instance holds the pipeline's lease: nothing was written, and this
    /// instance stands by.
    Fenced,
    /// The store no longer holds what this instance wrote (its lease is gone or older):
    /// nothing was written, and the pipeline resyncs.
    StateLost,
}

impl SinkErrorKind {
    /// Retrying the same batch may succeed.
    pub fn is_transient(self) -> bool {
        self == SinkErrorKind::Unavailable
    }
}

/// A sink failure: its [`SinkErrorKind`] (what the runner does about it), a message
/// for the user, the store's code when it gave one, and the underlying error as
/// [`std::error::Error::source`].
///
/// Build one with the constructor of its kind, then add what the store said:
///
/// ```
/// use shapesync_core::{ErrorCode, SinkError, SinkErrorKind};
///
/// let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
/// let e = SinkError::unavailable(format!("cannot reach the store: {io}"))
///     .with_code(ErrorCode::Other("ECONNREFUSED".into()))
///     .with_source(io);
/// assert_eq!(e.kind(), SinkErrorKind::Unavailable);
/// assert!(e.is_transient());
/// assert!(std::error::Error::source(&e).is_some());
/// ```
///
/// The message is shown on its own (reporters do not repeat the source chain below
/// it), so it should carry the store's words and say what to do next; it must hold
/// no secret (a URL with a password).
#[derive(Debug, Clone)]
pub struct SinkError {
    kind: SinkErrorKind,
    message: String,
    code: Option<ErrorCode>,
    source: Option<SharedError>,
}

impl SinkError {
    /// An error of `kind` with `message`.
    pub fn new(kind: SinkErrorKind, message: impl Into<String>) -> Self {
        SinkError { kind, message: message.into(), code: None, source: None }
    }

    /// The store is unreachable or timed out ([`SinkErrorKind::Unavailable`]).
    pub fn unavailable(message: impl Into<String>) -> Self {
        SinkError::new(SinkErrorKind::Unavailable, message)
    }

    /// The store refused the data or the settings ([`SinkErrorKind::Rejected`]).
    pub fn rejected(message: impl Into<String>) -> Self {
        SinkError::new(SinkErrorKind::Rejected, message)
    }

    /// The stored checkpoint cannot be read ([`SinkErrorKind::CorruptCheckpoint`]).
    pub fn corrupt_checkpoint(message: impl Into<String>) -> Self {
        SinkError::new(SinkErrorKind::CorruptCheckpoint, message)
    }

    /// Another instance holds the lease ([`SinkErrorKind::Fenced`]).
    pub fn fenced(message: impl Into<String>) -> Self {
        SinkError::new(SinkErrorKind::Fenced, message)
    }

    /// The store lost what this instance wrote ([`SinkErrorKind::StateLost`]).
    pub fn state_lost(message: impl Into<String>) -> Self {
        SinkError::new(SinkErrorKind::StateLost, message)
    }

    /// Records the store's code for this failure.
    pub fn with_code(mut self, code: ErrorCode) -> Self {
        self.code = Some(code);
        self
    }

    /// Keeps the underlying error, handed out by [`std::error::Error::source`].
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(Arc::from(source.into()));
        self
    }

    /// The same error with another message (the kind, code and source stay).
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// What the runner does about this error.
    pub fn kind(&self) -> SinkErrorKind {
        self.kind
    }

    /// The store's code, if it gave one.
    pub fn code(&self) -> Option<&ErrorCode> {
        self.code.as_ref()
    }

    /// The message, without the words of its kind (see [`std::fmt::Display`] for
    /// the whole sentence).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Retrying the same batch may succeed.
    pub fn is_transient(&self) -> bool {
        self.kind.is_transient()
    }

    /// The error for a fence check that did not let a unit proceed (`None` for one
    /// that did).
    pub fn from_verdict(verdict: Verdict) -> Option<SinkError> {
        match verdict {
            Verdict::Proceed | Verdict::AlreadyCommitted => None,
            Verdict::Fenced(m) => Some(SinkError::fenced(m)),
            Verdict::Lost(m) => Some(SinkError::state_lost(m)),
        }
    }
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.message;
        match self.kind {
            // Whether it is retried is the caller's to say (the runner retries, `validate`
            // reports): the message says only what happened.
            SinkErrorKind::Unavailable => write!(f, "sink unavailable: {m}"),
            SinkErrorKind::Rejected => write!(f, "sink refused: {m}; fix the sink settings or the data"),
            SinkErrorKind::CorruptCheckpoint => write!(
                f,
                "stored checkpoint is unreadable: {m}; run `shapesync reset` for this pipeline to resync it"
            ),
            SinkErrorKind::Fenced => write!(f, "the pipeline's lease is no longer ours: {m}; standing by"),
            SinkErrorKind::StateLost => {
                write!(f, "the sink lost its state: {m}; resyncing from a fresh snapshot")
            }
        }
    }
}

impl std::error::Error for SinkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        source_of(&self.source)
    }
}

/// A store kept in sync with a shape.
///
/// Contract (checked by the testkit's compliance suite):
/// - [`Sink::apply`] writes the batch's changes **and** its checkpoint in one atomic
///   unit, as seen by readers of the store and across crashes;
/// - applying a batch twice leaves the store byte-identical (insert = upsert,
///   update = merge of the given columns, delete of an absent row is fine);
/// - rows written carry `batch.checkpoint.generation`; a batch with `sweep` deletes
///   rows of older generations in the same atomic unit as its checkpoint;
/// - a sink that keeps leases (see [`crate::lease`]) checks `batch.fence` inside that
///   unit with [`crate::lease::judge`] and writes nothing unless it proceeds: it returns
///   the error [`SinkError::from_verdict`] gives ([`SinkErrorKind::Fenced`] or
///   [`SinkErrorKind::StateLost`]), or `Ok` without writing when the batch was already
///   committed; the unit stores `seq + 1` with the checkpoint.
///
/// # Errors
/// Every method fails with a [`SinkError`] whose [`SinkErrorKind`] tells the runner
/// what to do; the runner decides on the kind alone, never on the message:
/// - [`SinkError::unavailable`] for a fault retrying may fix (the store is unreachable,
///   timed out, overloaded, restarting): the runner retries the same call with backoff;
/// - [`SinkError::rejected`] for what retrying cannot fix (bad settings, data the store
///   refuses, credentials refused): the pipeline stops with the message;
/// - [`SinkError::corrupt_checkpoint`] when the stored checkpoint cannot be read;
/// - [`SinkError::fenced`] and [`SinkError::state_lost`], through
///   [`SinkError::from_verdict`], for a fence check that failed.
///
/// Add the store's code with [`SinkError::with_code`] (an [`ErrorCode`]: a SQLSTATE,
/// a Redis or SQLite code) and the underlying error with [`SinkError::with_source`],
/// so callers can inspect them; classify the store's failures by their structure
/// (error types, codes), never by searching their text:
///
/// ```
/// # use shapesync_core::{ErrorCode, SinkError};
/// fn classify(e: std::io::Error) -> SinkError {
///     use std::io::ErrorKind::*;
///     let error = match e.kind() {
///         ConnectionRefused | TimedOut | Interrupted => {
///             SinkError::unavailable(format!("cannot reach the store: {e}"))
///         }
///         _ => SinkError::rejected(format!("the store refused the write: {e}; check its path")),
///     };
///     let error = match e.raw_os_error() {
///         Some(errno) => error.with_code(ErrorCode::Other(format!("errno {errno}"))),
///         None => error,
///     };
///     error.with_source(e)
/// }
/// ```
///
/// A message is shown alone: include the store's words in it, say what to do next,
/// and leave secrets (passwords, URLs holding them) out.
///
/// # Leases
/// The lease methods have defaults for a store only one process can write (the memory
/// sink; a plugin that writes a file of its own): every request owns the lease and no
/// fence is checked. A sink over a store several instances can reach (a database, a
/// server) implements all four, keeping the lease beside the checkpoint, so that two
/// instances running the same pipeline files never interleave their writes; the
/// testkit's compliance suite checks them when [`Sink::keeps_leases`] says so.
#[async_trait]
pub trait Sink: Send + Sync {
    /// The stored checkpoint, if any.
    async fn checkpoint(&self) -> Result<Option<Checkpoint>, SinkError>;

    /// Applies a batch and stores its checkpoint atomically.
    async fn apply(&self, batch: &Batch) -> Result<(), SinkError>;

    /// Removes the pipeline's rows and checkpoint. A sink that keeps leases first takes
    /// the lease from any running owner (which is fenced, and resyncs once it takes the
    /// lease back), so a reset is never overwritten by a running instance.
    async fn reset(&self) -> Result<(), SinkError>;

    /// Whether this sink stores leases and checks fences (see the trait docs).
    fn keeps_leases(&self) -> bool {
        false
    }

    /// Takes the pipeline's lease for `request.owner` if `request.take` and it is free
    /// (expired, released, never taken — each acquisition raises the epoch), else records
    /// the asker as a standby and reports who holds it.
    async fn acquire(&self, request: &LeaseRequest) -> Result<Acquisition, SinkError> {
        Ok(Acquisition::Owned {
            fence: Fence { owner: request.owner.clone(), epoch: 1, seq: 0, ttl_ms: request.ttl_ms },
            generation_floor: 0,
        })
    }

    /// Extends the lease `fence` holds by its TTL, and reports it (with its standbys).
    /// [`SinkErrorKind::Fenced`] when another instance took it over,
    /// [`SinkErrorKind::StateLost`] when the store no longer holds it (judged with `committing = false`).
    async fn renew(&self, fence: &Fence) -> Result<LeaseInfo, SinkError> {
        Ok(LeaseInfo {
            owner: fence.owner.clone(),
            epoch: fence.epoch,
            expires_in_ms: i64::try_from(fence.ttl_ms).unwrap_or(i64::MAX),
            standbys: Vec::new(),
        })
    }

    /// Gives the lease up (an orderly shutdown, a hand-over), so a standby takes it at
    /// once instead of after its TTL. Does nothing if the lease is no longer ours.
    async fn release(&self, _fence: &Fence) -> Result<(), SinkError> {
        Ok(())
    }

    /// The stored lease, for operators (`shapesync checkpoints`); reads only.
    async fn lease(&self) -> Result<Option<LeaseInfo>, SinkError> {
        Ok(None)
    }

    /// What the first batch with rows of `schema` would refuse — key templates over the
    /// wrong columns, a table that cannot hold the rows, a schema or file that cannot be
    /// written — checked without writing anything (`shapesync validate --connect`).
    async fn check_rows(&self, _schema: &crate::Schema) -> Result<(), SinkError> {
        Ok(())
    }
}
