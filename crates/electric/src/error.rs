//! The errors a shape stream can end with. Transient faults never appear here: the
//! stream retries them itself, forever.

use std::collections::BTreeMap;

use shapesync_core::{ErrorCode, SourceError};

/// A failure that retrying the same request cannot fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ShapeError {
    /// The options are unusable (checked before any request).
    #[error("invalid shape options: {0}; fix them and create the stream again")]
    InvalidOptions(String),
    /// The server refused the request (400, 401, 403, 404, or another 4xx).
    #[error(
        "the shape server rejected the request (HTTP {status}){}: {message}; fix the shape options",
        param.as_deref().map(|p| format!(" because of `{p}`")).unwrap_or_default()
    )]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The offending parameter, when the server named one (or `secret` for 401).
        param: Option<String>,
        /// The server's explanation (secrets removed); when the server blamed several
        /// parameters, each is named in it.
        message: String,
        /// Every `errors` entry of the body: parameter → messages.
        errors: BTreeMap<String, Vec<String>>,
    },
    /// A 2xx response lacked a header the protocol requires.
    #[error(
        "the shape server's HTTP {status} response has no `{header}` header; check that the url points at an Electric /v1/shape endpoint and that proxies pass Electric's headers through"
    )]
    MissingHeader {
        /// The missing header.
        header: &'static str,
        /// The response status.
        status: u16,
    },
    /// The server answered with a redirect (a 3xx other than 304). Redirects are never
    /// followed: the shape URL carries the `secret`, and the request headers may carry
    /// credentials, so neither may reach the host a `location` names.
    #[error(
        "the shape server answered HTTP {status}, a redirect, which is not followed so that the secret and headers never reach another host; set `url` to the final endpoint (the response's `location` header names it)"
    )]
    Redirected {
        /// The response status.
        status: u16,
    },
    /// The server answered twice in a row, even for a fresh `offset=-1` request, with
    /// `electric-schema: null`: it no longer finds the table (dropped or renamed).
    #[error(
        "the shape server no longer finds table `{table}` (it answers with `electric-schema: null`): the table was dropped or renamed; recreate it or change `table`, then start the pipeline again"
    )]
    TableGone {
        /// The `table` option.
        table: String,
    },
    /// The server's response breaks the protocol in another way.
    #[error(
        "the shape server broke the protocol: {0}; check that the url points at an Electric /v1/shape endpoint"
    )]
    Protocol(String),
}

impl ShapeError {
    /// A protocol error with a message.
    pub(crate) fn protocol(detail: impl Into<String>) -> Self {
        ShapeError::Protocol(detail.into())
    }
}

impl From<ShapeError> for SourceError {
    fn from(e: ShapeError) -> Self {
        let shape_error = e.clone();
        let source_error = match e {
            ShapeError::InvalidOptions(detail) => SourceError::setup(detail),
            ShapeError::Rejected { status, param, message, errors } => SourceError::rejected(
                status,
                match param {
                    Some(p) if errors.len() <= 1 => format!("{p}: {message}"),
                    _ => message,
                },
            ),
            e @ ShapeError::TableGone { .. } => SourceError::setup(e.to_string()),
            e @ ShapeError::MissingHeader { status, .. } => {
                SourceError::protocol(e.to_string()).with_code(ErrorCode::Http(status))
            }
            e @ ShapeError::Redirected { status } => {
                SourceError::protocol(e.to_string()).with_code(ErrorCode::Http(status))
            }
            ShapeError::Protocol(detail) => SourceError::protocol(detail),
        };
        source_error.with_source(shape_error)
    }
}
