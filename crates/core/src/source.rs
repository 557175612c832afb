//! The source side of a pipeline: a stream of server responses.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::{BoxError, ErrorCode, SharedError, source_of};
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

/// Why a source failed: the decision a caller makes on a [`SourceError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceErrorKind {
    /// The server refused the request (a 4xx other than 409; its status is the
    /// error's [`ErrorCode::Http`] code).
    Rejected,
    /// The server's response does not follow the protocol.
    Protocol,
    /// The source could not be set up.
    Setup,
}

/// A source failure that retrying cannot fix. Transient faults (5xx, network) never
/// surface here: sources retry them internally, forever, keeping their offset.
///
/// It carries its [`SourceErrorKind`], a message (the detail: which parameter and
/// why, as the server said it, secrets removed), the server's code when it gave one
/// ([`ErrorCode::Http`] for a refused request) and the underlying error as
/// [`std::error::Error::source`]. The message is shown on its own (reporters do not
/// repeat the source chain below it).
#[derive(Debug, Clone)]
pub struct SourceError {
    kind: SourceErrorKind,
    detail: String,
    code: Option<ErrorCode>,
    source: Option<SharedError>,
}

impl SourceError {
    /// An error of `kind` with `detail`.
    pub fn new(kind: SourceErrorKind, detail: impl Into<String>) -> Self {
        SourceError { kind, detail: detail.into(), code: None, source: None }
    }

    /// The server refused the request with HTTP `status` ([`SourceErrorKind::Rejected`],
    /// code [`ErrorCode::Http`]).
    pub fn rejected(status: u16, detail: impl Into<String>) -> Self {
        SourceError::new(SourceErrorKind::Rejected, detail).with_code(ErrorCode::Http(status))
    }

    /// The server broke the protocol ([`SourceErrorKind::Protocol`]).
    pub fn protocol(detail: impl Into<String>) -> Self {
        SourceError::new(SourceErrorKind::Protocol, detail)
    }

    /// The source could not be set up ([`SourceErrorKind::Setup`]).
    pub fn setup(detail: impl Into<String>) -> Self {
        SourceError::new(SourceErrorKind::Setup, detail)
    }

    /// Records the server's code for this failure.
    pub fn with_code(mut self, code: ErrorCode) -> Self {
        self.code = Some(code);
        self
    }

    /// Keeps the underlying error, handed out by [`std::error::Error::source`].
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(Arc::from(source.into()));
        self
    }

    /// Why the source failed.
    pub fn kind(&self) -> SourceErrorKind {
        self.kind
    }

    /// The server's code, if it gave one.
    pub fn code(&self) -> Option<&ErrorCode> {
        self.code.as_ref()
    }

    /// The HTTP status of a refused request, if the code is one.
    pub fn status(&self) -> Option<u16> {
        match self.code {
            Some(ErrorCode::Http(status)) => Some(status),
            _ => None,
        }
    }

    /// The detail, without the words of its kind (see [`std::fmt::Display`] for the
    /// whole sentence).
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let detail = &self.detail;
        match self.kind {
            SourceErrorKind::Rejected => {
                f.write_str("the shape server rejected the request")?;
                if let Some(code) = &self.code {
                    write!(f, " ({code})")?;
                }
                write!(f, ": {detail}; fix the pipeline's source settings")
            }
            SourceErrorKind::Protocol => write!(
                f,
                "the shape server broke the protocol: {detail}; check that `url` points at an Electric /v1/shape endpoint"
            ),
            SourceErrorKind::Setup => write!(f, "cannot start the source: {detail}"),
        }
    }
}

impl std::error::Error for SourceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        source_of(&self.source)
    }
}

/// A stream of responses for one shape.
///
/// # Errors
/// A source retries transient faults itself and fails only with what retrying cannot
/// fix: [`SourceError::rejected`] (the server refused the request; its HTTP status is
/// the error's code), [`SourceError::protocol`] or [`SourceError::setup`], adding the
/// underlying error with [`SourceError::with_source`]. The runner stops the pipeline
/// on any of them and counts it in `shapesync_errors_total{component="source"}`.
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
    /// shape (for `shapesync validate --connect`), and returns the shape's columns when
    /// the server said them, so the pipeline's transforms and sink can be checked against
    /// them before anything is written. Does not move the stream.
    async fn probe(&mut self) -> Result<Option<Schema>, SourceError> {
        Ok(None)
    }
}
