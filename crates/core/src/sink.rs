//! The sink side of a pipeline: a store that applies batches atomically.

use async_trait::async_trait;

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
}

/// Everything a sink is told about where it runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SinkContext {
    /// The pipeline id; sinks namespace their rows and checkpoint by it.
    pub pipeline: String,
    /// The source's shape.
    pub shape: ShapeInfo,
}

/// A sink failure, classified so the runner knows whether to retry.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// The store is unreachable or timed out; the batch will be retried with backoff.
    #[error("sink unavailable: {0}; retrying the batch")]
    Unavailable(String),
    /// The store refused the data; retrying will not help.
    #[error("sink rejected the batch: {0}; fix the sink settings or the data, then restart")]
    Rejected(String),
    /// The stored checkpoint cannot be read.
    #[error("stored checkpoint is unreadable: {0}; run `shapesync reset` for this pipeline to resync it")]
    CorruptCheckpoint(String),
    /// Another instance holds the pipeline's lease: nothing was written, and this
    /// instance stands by.
    #[error("the pipeline's lease is no longer ours: {0}; standing by")]
    Fenced(String),
    /// The store no longer holds what this instance wrote (its lease is gone or older):
    /// nothing was written, and the pipeline resyncs.
    #[error("the sink lost its state: {0}; resyncing from a fresh snapshot")]
    StateLost(String),
}

impl SinkError {
    /// Retrying the same batch may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, SinkError::Unavailable(_))
    }

    /// The error for a fence check that did not let a unit proceed (`None` for one
    /// that did).
    pub fn from_verdict(verdict: Verdict) -> Option<SinkError> {
        match verdict {
            Verdict::Proceed | Verdict::AlreadyCommitted => None,
            Verdict::Fenced(m) => Some(SinkError::Fenced(m)),
            Verdict::Lost(m) => Some(SinkError::StateLost(m)),
        }
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
///   [`SinkError::Fenced`] or [`SinkError::StateLost`], or `Ok` without writing when the
///   batch was already committed; the unit stores `seq + 1` with the checkpoint.
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
    /// [`SinkError::Fenced`] when another instance took it over, [`SinkError::StateLost`]
    /// when the store no longer holds it (judged with `committing = false`).
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
}
