//! Row changes and the batches the runner hands to sinks.

use serde::{Deserialize, Serialize};

use crate::{Checkpoint, Row};

/// What a change does to its row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// Create or fully replace the row (applied as an upsert).
    Insert,
    /// Merge the given columns into the row.
    Update,
    /// Remove the row (absent is fine).
    Delete,
}

impl Operation {
    /// `insert`, `update` or `delete`.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
        }
    }
}

/// Where a replicated change sits in the Postgres log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogPosition {
    /// Commit LSN of the transaction.
    pub lsn: u64,
    /// Position of the operation inside the transaction.
    pub op_position: u64,
}

/// One row change, typed.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// Insert, update or delete.
    pub op: Operation,
    /// The row's identity: Electric's opaque key string.
    pub key: String,
    /// Column values (see [`Row`] for what an update carries).
    pub value: Row,
    /// Under `replica: full`, the previous values of the changed columns.
    pub old_value: Option<Row>,
    /// Log position, for replicated (not snapshot) changes.
    pub position: Option<LogPosition>,
    /// This is the last change of its transaction for this shape (`last: true`).
    pub last_in_tx: bool,
}

impl Change {
    /// A snapshot-style insert of a full row.
    pub fn insert(key: impl Into<String>, value: Row) -> Self {
        Change {
            op: Operation::Insert,
            key: key.into(),
            value,
            old_value: None,
            position: None,
            last_in_tx: false,
        }
    }

    /// An update carrying only the given columns.
    pub fn update(key: impl Into<String>, value: Row) -> Self {
        Change { op: Operation::Update, ..Change::insert(key, value) }
    }

    /// A delete; `value` holds at least the key columns.
    pub fn delete(key: impl Into<String>, value: Row) -> Self {
        Change { op: Operation::Delete, ..Change::insert(key, value) }
    }
}

/// Why a resync began: what a sweep completes (see [`Batch::resync_reason`]). A sink
/// that keeps someone else's cache reports it with its full invalidation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResyncReason {
    /// No checkpoint was stored: the pipeline's first sync, or the first after a reset.
    FirstSync,
    /// The server said the shape must be refetched (409, `must-refetch`).
    MustRefetch,
    /// The shape's definition changed since the stored checkpoint.
    DefinitionChanged,
    /// The sink lost what was written (its lease was gone or older).
    StateLost,
    /// A resync that a restart interrupted, resumed from its stored checkpoint.
    Resumed,
}

impl ResyncReason {
    /// Every reason, for metric labels.
    pub const ALL: &'static [ResyncReason] = &[
        ResyncReason::FirstSync,
        ResyncReason::MustRefetch,
        ResyncReason::DefinitionChanged,
        ResyncReason::StateLost,
        ResyncReason::Resumed,
    ];

    /// Its name in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ResyncReason::FirstSync => "first_sync",
            ResyncReason::MustRefetch => "must_refetch",
            ResyncReason::DefinitionChanged => "definition_changed",
            ResyncReason::StateLost => "state_lost",
            ResyncReason::Resumed => "resumed",
        }
    }
}

/// A unit of work for a sink: changes that end on a transaction-consistent point,
/// and the checkpoint that must be stored in the same atomic commit.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Changes in log order. May be empty (a checkpoint-only commit).
    pub changes: Vec<Change>,
    /// The stream position after these changes.
    pub checkpoint: Checkpoint,
    /// After applying the changes, delete every row not written since the current
    /// resync began (generation below `checkpoint.generation`), atomically with the
    /// checkpoint. Set on the first commit point after a resync's snapshot completes.
    pub sweep: bool,
    /// With `sweep`: why the resync it completes began. `None` otherwise.
    pub resync_reason: Option<ResyncReason>,
    /// The batch ends at `up-to-date`: the sink now matches the shape's head.
    pub up_to_date: bool,
    /// The columns of the rows in `changes` when the pipeline's transforms changed them;
    /// `None` when they are the source's (`checkpoint.schema`, which always stays the
    /// source's, since resuming the stream needs it). Read it through [`Batch::schema`].
    pub row_schema: Option<std::sync::Arc<crate::Schema>>,
    /// The lease the batch is written under: a sink that keeps leases writes nothing
    /// unless the stored lease still matches (see [`crate::lease`]). `None` for batches
    /// written outside a pipeline run (tests, tools), which are not fenced.
    pub fence: Option<crate::Fence>,
}

impl Batch {
    /// A batch whose rows have the source's columns.
    pub fn new(changes: Vec<Change>, checkpoint: Checkpoint, sweep: bool, up_to_date: bool) -> Self {
        Batch { changes, checkpoint, sweep, resync_reason: None, up_to_date, row_schema: None, fence: None }
    }

    /// A snapshot batch is not a transaction: every change is an insert without a log
    /// position, and the checkpoint offset is `-1`, `0_N` or `0_inf`. Each row appears
    /// once, so a sink may write it in parts or many rows per statement.
    pub fn is_snapshot(&self) -> bool {
        let offset = self.checkpoint.offset;
        (offset.is_snapshot() || offset == crate::Offset::SNAPSHOT_END)
            && self.changes.iter().all(|c| c.op == Operation::Insert && c.position.is_none())
    }

    /// The columns of the rows in `changes`: what a sink lays its table or keys out by.
    pub fn schema(&self) -> &crate::Schema {
        self.row_schema.as_deref().unwrap_or(&self.checkpoint.schema)
    }
}
