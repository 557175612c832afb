//! Pure per-change transforms between source and sink.

use crate::{Change, Schema};

/// A transform that cannot process a change, or the shape it is given.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransformError {
    /// A change the transform cannot process.
    #[error("transform failed on row {key}: {detail}")]
    Row {
        /// The row's key.
        key: String,
        /// What went wrong.
        detail: String,
    },
    /// The shape's columns do not fit the transform's settings (it names a column the
    /// shape lacks, or would remove a primary-key column).
    #[error("transform does not fit the shape: {0}; fix the transform's settings")]
    Schema(String),
}

/// A deterministic change-by-change transform.
///
/// It may drop a change, rewrite it, or emit several; it must not depend on
/// anything but its input, so replaying a batch yields the same output.
pub trait Transform: Send + Sync {
    /// Processes one change, pushing its results to `out`.
    fn apply(&self, change: Change, out: &mut Vec<Change>) -> Result<(), TransformError>;

    /// The columns of the rows this transform emits, given those of its input; `None`
    /// when it leaves them as they are. Sinks lay out their tables and keys by the
    /// result, so a transform that adds, removes or renames columns must say so here.
    fn schema(&self, _input: &Schema) -> Result<Option<Schema>, TransformError> {
        Ok(None)
    }
}
