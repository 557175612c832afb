//! [`ShapeStream`]: the request loop, its state machine and its loop guards.
//!
//! The stream's parts, each in its own module:
//! - this module: the public [`ShapeStream`], its state, and [`ShapeStream::next_event`]'s
//!   loop (wait, refresh credentials, send one request, hand its response on);
//! - [`long_poll`]: one plain HTTP response: reading the body, its headers, and turning a
//!   2xx/304 into an event;
//! - [`sse`]: the Server-Sent Events connection: framing, buffering up to `up-to-date`,
//!   closing, and the fallback to long-polling;
//! - [`guards`]: what keeps the stream from looping or hammering the server: backoff
//!   after faults, the fast-loop detector, stale handles, resets;
//! - [`credentials`]: the credential files re-read before every request, and 401/403s;
//! - [`rejection`]: error statuses, and the typed [`ShapeError::Rejected`] of a 4xx body;
//! - [`metrics`]: the counters a named pipeline records.

mod credentials;
mod guards;
mod long_poll;
mod metrics;
mod rejection;
mod sse;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Client, Response};
use shapesync_core::{
    LogPosition, Offset, ResumePoint, Schema, Source, SourceError, SourceEvent, SourceResponse,
};

use self::credentials::Credentials;
use self::guards::{Guards, describe_reqwest_error};
use self::sse::SseState;
use crate::request::{RequestState, redact_url, shape_url};
use crate::tags::TagTracker;
use crate::{ShapeError, ShapeOptions};

/// Response header names.
pub mod headers {
    /// The shape handle.
    pub const HANDLE: &str = "electric-handle";
    /// The end of the chunk served: the next request's `offset`.
    pub const OFFSET: &str = "electric-offset";
    /// The column types (non-live 200s only).
    pub const SCHEMA: &str = "electric-schema";
    /// The live cursor to echo (live responses only).
    pub const CURSOR: &str = "electric-cursor";
    /// Seconds or HTTP date to wait before retrying.
    pub const RETRY_AFTER: &str = "retry-after";
}

/// What a [`ShapeStream`] yields.
#[derive(Clone, Debug)]
pub enum ShapeEvent {
    /// One server response, typed: its changes in log order and the position after it.
    Response(SourceResponse),
    /// The server discarded the shape's lineage (409, offset out of bounds, or a
    /// loop guard fired). Drop everything you hold for this shape: the stream has
    /// reset to `offset=-1` and what it yields next rebuilds the shape.
    MustRefetch {
        /// The new handle, when the server named one.
        new_handle: Option<String>,
    },
}

/// A client for one shape: follows it from the snapshot (or a resume point) through
/// live long-polling, retrying transient faults forever and resetting on 409.
///
/// Call [`ShapeStream::next_event`] in a loop. Dropping the future between polls is
/// safe: state only changes once a response has been fully handled.
pub struct ShapeStream {
    options: ShapeOptions,
    client: Client,
    definition_hash: String,
    // Where the stream is in the shape's log.
    handle: Option<String>,
    /// `None` means `offset=now`.
    offset: Option<Offset>,
    cursor: Option<String>,
    schema: Option<Arc<Schema>>,
    /// The `electric-schema` text `schema` was parsed from (unchanged text: no re-parse).
    schema_text: Option<String>,
    live: bool,
    /// The highest log position delivered: SSE reconnects may re-send ops at or below it.
    last_position: Option<LogPosition>,
    /// Sent on the request after a reset or a stale response only.
    cache_buster: Option<String>,
    /// Backoff, loop and reset bookkeeping.
    guards: Guards,
    /// The live SSE connection and the short-close / fallback bookkeeping.
    sse: SseState,
    /// What the credential files held before the latest request, and 401/403s in a row.
    credentials: Credentials,
    /// Which rows carry which subquery tags, to turn move-outs into deletes.
    tags: TagTracker,
}

impl std::fmt::Debug for ShapeStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShapeStream")
            .field("url", &redact_url(&self.options.url))
            .field("table", &self.options.table)
            .field("handle", &self.handle)
            .field("offset", &self.offset)
            .field("live", &self.live)
            .finish_non_exhaustive()
    }
}

/// A request whose response headers arrived, and how it was made.
struct Answered {
    response: Response,
    /// It was a live request (long-poll or SSE).
    live: bool,
    /// It asked for SSE.
    sse: bool,
}

impl ShapeStream {
    /// A stream for `options`, starting at [`ShapeOptions::start`]; see
    /// [`ShapeStream::resume`] to continue from a stored position.
    ///
    /// Its HTTP client follows no redirect and sends no `Referer`: the shape URL
    /// carries the `secret` and the headers may carry credentials, so neither may go
    /// to a host a `location` names. A redirect ends the stream with
    /// [`ShapeError::Redirected`].
    pub fn new(options: ShapeOptions) -> Result<Self, ShapeError> {
        #[cfg(feature = "rustls")]
        crate::install_tls_provider();
        let client = Client::builder()
            .user_agent(concat!("shapesync-electric/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .referer(false)
            .connect_timeout(options.connect_timeout)
            .build()
            .map_err(|e| ShapeError::InvalidOptions(format!("cannot create the HTTP client: {e}")))?;
        Self::with_client(options, client)
    }

    /// As [`ShapeStream::new`], with your own `reqwest` client (proxies, TLS roots…).
    /// The request and idle timeouts from the options still apply; the connect
    /// timeout is the client's own.
    ///
    /// Build the client with `.redirect(reqwest::redirect::Policy::none())` and
    /// `.referer(false)`: reqwest's default follows redirects, and would send the
    /// shape URL (with its `secret`, in `Referer`) and your headers to whatever host
    /// a redirect names. With such a client, a redirect ends the stream with
    /// [`ShapeError::Redirected`].
    pub fn with_client(options: ShapeOptions, client: Client) -> Result<Self, ShapeError> {
        options.validate()?;
        Ok(ShapeStream {
            definition_hash: options.definition_hash(),
            offset: options.start_offset(),
            guards: Guards::new(options.backoff),
            options,
            client,
            handle: None,
            cursor: None,
            schema: None,
            schema_text: None,
            live: false,
            last_position: None,
            cache_buster: None,
            sse: SseState::default(),
            credentials: Credentials::default(),
            tags: TagTracker::new(true),
        })
    }

    /// Continues from a stored position (`None`: start afresh). The first request
    /// after a resume is non-live, so it brings a fresh schema and catches up.
    pub fn resume(&mut self, from: Option<ResumePoint>) {
        self.live = false;
        self.sse.connection = None;
        self.last_position = None;
        self.cursor = None;
        self.schema_text = None;
        // A resumed stream has not seen the tags of the rows synced before it, unless
        // the consumer only holds what it saw since (`log=changes_only`: a refetch there
        // brings no snapshot back, so the index stays best-effort).
        self.tags.reset(from.is_none() || self.options.log == crate::LogMode::ChangesOnly);
        match from {
            Some(point) => {
                self.handle = Some(point.handle);
                self.offset = Some(point.offset);
                self.schema = Some(Arc::new(point.schema));
            }
            None => {
                self.handle = None;
                self.offset = self.options.start_offset();
                self.schema = None;
            }
        }
    }

    /// The options this stream was made with.
    pub fn options(&self) -> &ShapeOptions {
        &self.options
    }

    /// The request headers, to change credentials between requests: after a
    /// [`ShapeError::Rejected`] (say a 401 from an auth proxy), update them and call
    /// [`ShapeStream::next_event`] again; the stream carries on at the same offset.
    pub fn headers_mut(&mut self) -> &mut reqwest::header::HeaderMap {
        &mut self.options.headers
    }

    /// Replaces the API `secret` (same use as [`ShapeStream::headers_mut`]).
    pub fn set_secret(&mut self, secret: Option<String>) {
        self.options.secret = secret;
    }

    /// The events as a [`futures::Stream`]; it ends after the first error.
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<ShapeEvent, ShapeError>> + Send {
        futures::stream::unfold(Some(self), |stream| async move {
            let mut stream = stream?;
            let item = stream.next_event().await;
            let keep = item.is_ok().then_some(stream);
            Some((item, keep))
        })
    }

    /// The current shape handle, once known.
    pub fn handle(&self) -> Option<&str> {
        self.handle.as_deref()
    }

    /// The offset the next request starts from (`None` before an `offset=now` request).
    pub fn offset(&self) -> Option<Offset> {
        self.offset
    }

    /// The schema in force, once known.
    pub fn schema(&self) -> Option<&Arc<Schema>> {
        self.schema.as_ref()
    }

    /// The stream has reached the head of the shape and long-polls for changes.
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// The position to store for a later [`ShapeStream::resume`], once there is one.
    pub fn resume_point(&self) -> Option<ResumePoint> {
        Some(ResumePoint {
            handle: self.handle.clone()?,
            offset: self.offset?,
            schema: self.schema.as_deref()?.clone(),
        })
    }

    /// The next event. Waits while the shape is up to date (long-polling), and
    /// retries 5xx, 429, timeouts and network faults forever with backoff.
    ///
    /// Each turn of the loop either reads the open SSE connection (module `sse`), or
    /// makes one request and handles its response (module `long_poll`); a turn that
    /// yields no event (a retried fault, a guard that asks for another request) loops.
    pub async fn next_event(&mut self) -> Result<ShapeEvent, ShapeError> {
        loop {
            if self.sse.connection.is_some() {
                if let Some(event) = self.read_sse().await? {
                    return Ok(event);
                }
                continue;
            }
            if let Some(delay) = self.guards.pending_delay.take() {
                tokio::time::sleep(delay).await;
            }
            if !self.refresh_credentials().await? {
                continue;
            }
            let Some(answered) = self.send_request().await else { continue };
            if let Some(event) = self.on_response(answered).await? {
                return Ok(event);
            }
        }
    }

    /// Sends the next request from the stream's position and waits for its response
    /// headers. `None`: no response (a fault, waited for; or a live request that
    /// timed out, to poll again at once).
    async fn send_request(&mut self) -> Option<Answered> {
        let live = self.live;
        let sse = live && self.options.live_sse && self.sse_allowed();
        let url = shape_url(
            &self.options,
            &RequestState {
                offset: self.offset,
                handle: self.handle.as_deref(),
                live,
                live_sse: sse,
                cursor: self.cursor.as_deref(),
                cache_buster: self.cache_buster.as_deref(),
                secret: self.credentials.file_secret.as_deref(),
                expired_handle: self
                    .guards
                    .expired_handle_to_send()
                    .filter(|_| self.offset == Some(Offset::Start)),
            },
        );
        tracing::debug!(url = %redact_url(&url), live, sse, "shape request");
        let timeout = self.options.request_timeout;
        let request = self.client.get(url).headers(self.credentials.request_headers(&self.options.headers));
        let sent = if live && !sse {
            // A long-poll: the server's hold plus the body, bounded as a whole.
            Some(request.timeout(timeout).send().await)
        } else {
            // An SSE stream outlives any whole-request timeout, and so may a large
            // non-live body on a slow link: bound the wait for headers here, then
            // the silences of the body (`read_sse`, `read_body`).
            tokio::time::timeout(timeout, request.send()).await.ok()
        };
        match sent {
            Some(Ok(response)) => Some(Answered { response, live, sse }),
            None if sse => {
                tracing::debug!("SSE request got no headers in time; long-polling once");
                self.sse.poll_next = true;
                None
            }
            None => {
                self.count_request("error");
                self.wait_after_fault(&format!("no response headers within {timeout:?}"), None).await;
                None
            }
            Some(Err(e)) if live && e.is_timeout() && !e.is_connect() => {
                // A live request outlived the server's hold (the TS "live watchdog"):
                // just poll again; the timeout itself paces these retries.
                tracing::debug!("live request timed out; polling again");
                None
            }
            Some(Err(e)) => {
                self.count_request("error");
                self.wait_after_fault(&describe_reqwest_error(&e), None).await;
                None
            }
        }
    }

    /// The request is past `offset=-1`/`now`: it continues a known shape.
    fn is_mid_shape(&self) -> bool {
        self.offset.is_some_and(|o| o != Offset::Start)
    }

    /// An empty response at the stream's position (nothing new, or a guard's pause).
    fn empty_response(&self, offset: Offset, up_to_date: bool) -> ShapeEvent {
        ShapeEvent::Response(SourceResponse {
            changes: Vec::new(),
            handle: self.handle.clone().unwrap_or_default(),
            offset,
            schema: self.schema.clone().unwrap_or_default(),
            up_to_date,
        })
    }
}

#[async_trait]
impl Source for ShapeStream {
    fn definition_hash(&self) -> String {
        self.definition_hash.clone()
    }

    fn resume(&mut self, from: Option<ResumePoint>) {
        ShapeStream::resume(self, from);
    }

    async fn next(&mut self) -> Result<SourceEvent, SourceError> {
        Ok(match self.next_event().await? {
            ShapeEvent::Response(r) => SourceEvent::Response(r),
            ShapeEvent::MustRefetch { .. } => SourceEvent::MustRefetch,
        })
    }

    /// One `offset=now` request (no rows) on a separate stream: the server answers, knows
    /// the table and accepts the parameters and secret. Transient faults are retried
    /// for 10 s (`PROBE_TIMEOUT`), then reported.
    async fn probe(&mut self) -> Result<Option<Schema>, SourceError> {
        let mut options = self.options.clone();
        options.start = crate::StartFrom::Now;
        options.metrics_pipeline = None;
        let mut probe = ShapeStream::with_client(options, self.client.clone())?;
        match tokio::time::timeout(PROBE_TIMEOUT, probe.next_event()).await {
            Ok(result) => {
                result.map_err(SourceError::from)?;
                Ok(probe.schema().map(|s| (**s).clone()))
            }
            Err(elapsed) => Err(SourceError::setup(format!(
                "the shape server did not answer within {PROBE_TIMEOUT:?} (see the log for the retried faults)"
            ))
            .with_source(elapsed)),
        }
    }
}

/// How long [`Source::probe`] keeps retrying an unreachable server.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
