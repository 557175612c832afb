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
