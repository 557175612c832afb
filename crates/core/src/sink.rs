//! The sink side of a pipeline: a store that applies batches atomically.

use async_trait::async_trait;

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
}

impl SinkError {
    /// Retrying the same batch may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, SinkError::Unavailable(_))
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
///   rows of older generations in the same atomic unit as its checkpoint.
#[async_trait]
pub trait Sink: Send + Sync {
    /// The stored checkpoint, if any.
    async fn checkpoint(&self) -> Result<Option<Checkpoint>, SinkError>;

    /// Applies a batch and stores its checkpoint atomically.
    async fn apply(&self, batch: &Batch) -> Result<(), SinkError>;

    /// Removes the pipeline's rows and checkpoint.
    async fn reset(&self) -> Result<(), SinkError>;
}
