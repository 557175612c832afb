//! Pure per-change transforms between source and sink.

use crate::Change;

/// A transform that cannot process a change.
#[derive(Debug, Clone, thiserror::Error)]
#[error("transform failed on row {key}: {detail}")]
pub struct TransformError {
    /// The row's key.
    pub key: String,
    /// What went wrong.
    pub detail: String,
}

/// A deterministic change-by-change transform.
///
/// It may drop a change, rewrite it, or emit several; it must not depend on
/// anything but its input, so replaying a batch yields the same output.
pub trait Transform: Send + Sync {
    /// Processes one change, pushing its results to `out`.
    fn apply(&self, change: Change, out: &mut Vec<Change>) -> Result<(), TransformError>;
}
