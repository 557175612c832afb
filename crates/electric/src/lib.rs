//! A client for [Electric](https://electric-sql.com)'s HTTP Shape API.
//!
//! [`ShapeStream`] follows one shape: the initial snapshot (or a stored resume
//! point), then live long-polling. Every server response comes out as one
//! [`shapesync_core::SourceResponse`] whose changes are typed through the
//! `electric-schema` header. Transient faults (5xx, 429, timeouts, dropped
//! connections) are retried forever with full-jitter backoff at the same offset;
//! a 409 (or an out-of-bounds offset) yields [`ShapeEvent::MustRefetch`] and the
//! stream restarts the shape with a unique `cache-buster`; a 401/403 is retried
//! [`ShapeOptions::auth_retries`] times, re-reading the credential files; other 4xx
//! and protocol violations end the stream with a typed [`ShapeError`].
//!
//! Live changes come by long-polling, or over Server-Sent Events with
//! [`ShapeOptions::live_sse`].
//!
//! The stream implements [`shapesync_core::Source`], and [`ElectricSourceConfig`]
//! is the `type: electric` pipeline source.

mod backoff;
mod config;
mod error;
mod message;
mod options;
mod request;
mod stream;
mod tags;

pub use config::ElectricSourceConfig;
pub use error::ShapeError;
pub use options::{
    BackoffConfig, LogMode, ParamValue, Replica, ShapeOptions, StartFrom, defaults, quote_identifier,
};
pub use request::redact_url;
pub use stream::{ShapeEvent, ShapeStream, headers};

/// Installs `ring` as the process-wide rustls crypto provider, unless one is installed
/// already. [`ShapeStream::new`] calls it; with the `rustls` feature, call it before
/// building any other `reqwest` client in the process (reqwest panics without one).
#[cfg(feature = "rustls")]
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
