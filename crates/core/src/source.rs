//! The source side of a pipeline: a stream of server responses.

use std::sync::Arc;

use async_trait::async_trait;

use crate::{Change, Offset, Schema};

/// Where a source should pick up a shape it has already partly delivered.
#[derive(Clone, Debug, PartialEq)]
pub struct ResumePoint {
    /// The shape handle the offset belongs to.
    pub handle: String,
    /// The last offset whose changes were committed.
    pub offset: Offset,
    /// The schema stored with that offset.
    pub schema: Schema,
}

/// One server response, typed, with the stream position after it.
#[derive(Clone, Debug)]
pub struct SourceResponse {
    /// Changes in log order.
    pub changes: Vec<Change>,
    /// The shape handle these changes belong to.
    pub handle: String,
    /// The `electric-offset` of this response.
    pub offset: Offset,
    /// The schema in force.
    pub schema: Arc<Schema>,
    /// The response ended with `up-to-date`: a transaction-consistent point at the
    /// head of the shape.
    pub up_to_date: bool,
}

/// What a source yields.
#[derive(Clone, Debug)]
pub enum SourceEvent {
    /// A response with changes (possibly none).
    Response(SourceResponse),
    /// The server discarded the shape's lineage (HTTP 409, offset out of bounds):
    /// the source has already reset itself to the start of a new snapshot, and
    /// everything it yields next rebuilds the shape from scratch.
    MustRefetch,
}

/// A source failure that retrying cannot fix. Transient faults (5xx, network) never
/// surface here: sources retry them internally, forever, keeping their offset.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// The server refused the request (4xx other than 409).
    #[error(
        "the shape server rejected the request (HTTP {status}): {detail}; fix the pipeline's source settings"
    )]
    Rejected {
        /// HTTP status.
        status: u16,
        /// Which parameter and why, as the server said it (secrets removed).
        detail: String,
    },
    /// The server's response does not follow the protocol.
    #[error(
        "the shape server broke the protocol: {detail}; check that `url` points at an Electric /v1/shape endpoint"
    )]
    Protocol {
        /// What was wrong.
        detail: String,
    },
    /// The source could not be set up.
    #[error("cannot start the source: {detail}")]
    Setup {
        /// What went wrong.
        detail: String,
    },
}

/// A stream of responses for one shape.
#[async_trait]
pub trait Source: Send {
    /// Stable hash of the shape definition; stored in checkpoints so a changed
    /// definition forces a resync instead of mixing two shapes' offsets.
    fn definition_hash(&self) -> String;

    /// Sets where the next request starts: `None` for the beginning of a new
    /// snapshot. Called before the first [`Source::next`].
    fn resume(&mut self, from: Option<ResumePoint>);

    /// The next event. Waits (long-polls) while the shape is up to date.
    async fn next(&mut self) -> Result<SourceEvent, SourceError>;

    /// Checks, as cheaply as the source can, that its server answers and accepts the
    /// shape (for `shapesync validate --connect`). Does not move the stream.
    async fn probe(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
}
