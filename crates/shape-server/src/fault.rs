//! Faults a test can queue for the next requests.

use std::time::Duration;

/// A header [`Fault::MissingHeader`] removes from an otherwise correct 200.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElectricHeader {
    /// `electric-handle`
    Handle,
    /// `electric-offset`
    Offset,
    /// `electric-cursor` (only present on live responses)
    Cursor,
    /// `electric-schema` (only present on non-live responses)
    Schema,
}

impl ElectricHeader {
    pub(crate) fn name(self) -> &'static str {
        match self {
            ElectricHeader::Handle => "electric-handle",
            ElectricHeader::Offset => "electric-offset",
            ElectricHeader::Cursor => "electric-cursor",
            ElectricHeader::Schema => "electric-schema",
        }
    }
}

/// One injected failure; each queued fault is consumed by exactly one `/v1/shape` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 503 with `retry-after: <seconds>` (omitted when `None`), before any processing.
    ServiceUnavailable {
        /// Value of the `retry-after` header in seconds.
        retry_after: Option<u64>,
    },
    /// 500 with a JSON error body, before any processing.
    InternalError,
    /// 409 must-refetch before any processing, with the current handle of the requested
    /// shape (`with_handle: true`) or without `electric-handle`.
    MustRefetch {
        /// Whether the 409 carries the shape's current handle.
        with_handle: bool,
    },
    /// The real response's headers and the first half of its body, then the connection is aborted.
    DropMidBody,
    /// The real response's headers with a body that is not valid JSON.
    MalformedJson,
    /// The real response (if it is a 200) without this header.
    MissingHeader(ElectricHeader),
    /// The log chunk ends before the last op of the first multi-op transaction it contains
    /// (no up-to-date); the next request continues from there.
    EndMidTransaction,
    /// The real response, its body sent `bytes` at a time with `delay` between pieces.
    Trickle {
        /// Bytes per piece.
        bytes: usize,
        /// Pause before each piece after the first.
        delay: Duration,
    },
}
