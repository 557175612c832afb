//! What [`crate::SinkError`] and [`crate::SourceError`] share: the code a store or
//! server gave for a failure, and the underlying error kept as
//! [`std::error::Error::source`].

use std::fmt;
use std::sync::Arc;

/// The underlying error a [`crate::SinkError`] or [`crate::SourceError`] wraps.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The shared form of [`BoxError`] kept inside errors, so they stay `Clone`.
pub(crate) type SharedError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// The code a store or server gave for a failure, for callers that decide on more
/// than the error's kind (and for logs and metrics). Decide on these, never on the
/// text of a message.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// A Postgres SQLSTATE, such as `42P01` (undefined table).
    Sqlstate(String),
    /// A Redis error code: the first word of a server error reply (`WRONGTYPE`,
    /// `NOAUTH`, `OOM`, …) or the client's error kind.
    Redis(String),
    /// A SQLite extended result code, such as 2067 (`SQLITE_CONSTRAINT_UNIQUE`).
    Sqlite(i32),
    /// An HTTP status.
    Http(u16),
    /// A code of another store (a plugin's).
    Other(String),
}

/// The first error of type `T` in `err`'s chain, looking also inside the wrappers
/// whose `source()` skips the error they hold: an `io::Error` carrying another error
/// (`get_ref`) and a shared `Arc<dyn Error>`. For classifying an error by what caused
/// it — a TLS library's certificate error, say — instead of by its text.
pub fn find_cause<'e, T: std::error::Error + 'static>(
    err: &'e (dyn std::error::Error + 'static),
) -> Option<&'e T> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        next = if let Some(io) = e.downcast_ref::<std::io::Error>() {
            io.get_ref().map(|inner| inner as &(dyn std::error::Error + 'static))
        } else if let Some(shared) = e.downcast_ref::<SharedError>() {
            Some(&**shared as &(dyn std::error::Error + 'static))
        } else {
            e.source()
        };
    }
    None
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Sqlstate(code) => write!(f, "SQLSTATE {code}"),
            ErrorCode::Redis(code) => write!(f, "redis {code}"),
            ErrorCode::Sqlite(code) => write!(f, "sqlite code {code}"),
            ErrorCode::Http(status) => write!(f, "HTTP {status}"),
            ErrorCode::Other(code) => f.write_str(code),
        }
    }
}

/// The source an error hands out, if it keeps one.
pub(crate) fn source_of(source: &Option<SharedError>) -> Option<&(dyn std::error::Error + 'static)> {
    source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
}

/// The text to show a user for `e`: its message, then each source's (`outer: inner`,
/// as `{:#}` prints an `anyhow::Error`), stopping below a [`crate::SinkError`] or
/// [`crate::SourceError`] (bare or inside a [`crate::PipelineError`]): their messages
/// already say what their sources said, and the sources are kept for callers that
/// inspect them, not to be printed again.
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut current = e;
    while !describes_its_source(current) {
        let Some(next) = current.source() else { break };
        text.push_str(": ");
        text.push_str(&next.to_string());
        current = next;
    }
    text
}

/// Whether `e`'s message already holds what its source says.
fn describes_its_source(e: &(dyn std::error::Error + 'static)) -> bool {
    use crate::PipelineError;
    e.is::<crate::SinkError>()
        || e.is::<crate::SourceError>()
        || matches!(
            e.downcast_ref::<PipelineError>(),
            Some(PipelineError::Sink(_) | PipelineError::Source(_))
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PipelineError, SinkError};

    #[derive(Debug, thiserror::Error)]
    #[error("while syncing")]
    struct Outer(#[source] PipelineError);

    #[test]
    fn a_cause_is_found_inside_io_errors_and_shared_errors() {
        #[derive(Debug, thiserror::Error)]
        #[error("handshake")]
        struct Handshake;
        let io = std::io::Error::other(Handshake);
        let shared: SharedError = Arc::new(std::io::Error::other(io));
        let outer = Outer(PipelineError::Sink(
            SinkError::unavailable("x").with_source(Box::new(HoldsShared(shared))),
        ));
        assert!(find_cause::<Handshake>(&outer).is_some());
        assert!(find_cause::<std::fmt::Error>(&outer).is_none());
    }

    #[derive(Debug, thiserror::Error)]
    #[error("holds a shared error")]
    struct HoldsShared(#[source] SharedError);

    #[test]
    fn a_report_stops_below_an_error_that_describes_its_source() {
        let io = std::io::Error::other("connection reset");
        let sink = SinkError::unavailable(format!("cannot reach the store: {io}")).with_source(io);
        let shown = report(&Outer(PipelineError::Sink(sink)));
        assert_eq!(shown, "while syncing: sink unavailable: cannot reach the store: connection reset");

        // Other errors show their whole chain.
        #[derive(Debug, thiserror::Error)]
        #[error("cannot load")]
        struct Load(#[source] std::io::Error);
        assert_eq!(report(&Load(std::io::Error::other("denied"))), "cannot load: denied");
    }
}
