//! [`ShapeStream`]: the request loop, its state machine and its loop guards.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use rand::Rng;
use reqwest::header::HeaderMap;
use reqwest::{Client, Response, StatusCode};
use shapesync_core::{
    Change, LogPosition, Offset, ResumePoint, Schema, Source, SourceError, SourceEvent, SourceResponse,
};

use crate::backoff::{Backoff, parse_retry_after};
use crate::message::{BodyError, Message, parse_body, parse_message};
use crate::request::{RequestState, read_headers_file, read_secret_file, redact_url, shape_url};
use crate::tags::{Mark, Resolution, TagTracker};
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

/// Retries with a fresh `cache-buster` when a response carries an expired handle.
const STALE_RETRIES: u32 = 3;
/// Non-advancing non-live responses within [`FAST_LOOP_WINDOW`] that count as a loop.
const FAST_LOOP_REQUESTS: usize = 5;
/// The window of the fast-loop detector.
const FAST_LOOP_WINDOW: Duration = Duration::from_millis(500);
/// Fast loops detected before the stream gives up.
const FAST_LOOP_LIMIT: u32 = 5;
/// An SSE connection closing sooner than this counts as a short close.
const SSE_SHORT_CLOSE: Duration = Duration::from_secs(1);
/// Consecutive short SSE closes before falling back to long-polling (TS:
/// `client.ts` `#maxShortSseConnections`).
const SSE_SHORT_CLOSES: u32 = 3;
/// Ceiling of the first jittered wait after a short SSE close; it doubles per short
/// close in a row (TS: `client.ts` `#sseBackoffBaseDelay`).
const SSE_BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Largest ceiling of that wait (TS: `#sseBackoffMaxDelay`).
const SSE_BACKOFF_CAP: Duration = Duration::from_secs(5);
/// After falling back to long-polling, SSE is tried again after this long…
const SSE_FALLBACK_TIME: Duration = Duration::from_secs(5 * 60);
/// …or after this many good long-polls, whichever comes first.
const SSE_FALLBACK_POLLS: u32 = 20;
/// Expired handles remembered.
const EXPIRED_HANDLES_KEPT: usize = 16;

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
    handle: Option<String>,
    /// `None` means `offset=now`.
    offset: Option<Offset>,
    cursor: Option<String>,
    schema: Option<Arc<Schema>>,
    schema_text: Option<String>,
    live: bool,
    cache_buster: Option<String>,
    expired_handles: VecDeque<String>,
    expired_to_send: Option<String>,
    stale_retries: u32,
    self_healed: bool,
    fast_loop: FastLoop,
    backoff: Backoff,
    malformed_bodies: u32,
    /// Resets since the last good response; from the second on, the stream backs off.
    resets_since_success: u32,
    pending_delay: Option<Duration>,
    /// The highest log position delivered: SSE reconnects may re-send ops at or below it.
    last_position: Option<LogPosition>,
    sse: Option<SseConnection>,
    sse_short_closes: u32,
    /// The last SSE connection ended having delivered nothing: the next live request
    /// is a long-poll (which gets the real answer: data, or the out-of-bounds 400).
    sse_poll_next: bool,
    /// Long-polling instead of SSE since short closes piled up (a buffering proxy?).
    sse_fallback: Option<SseFallback>,
    /// Headers read from `headers_file` before the latest request.
    file_headers: HeaderMap,
    /// The secret read from `secret_file` before the latest request.
    file_secret: Option<String>,
    /// 401/403 answers (or unreadable credential files) in a row.
    auth_failures: u32,
    /// Responses in a row whose `electric-schema` was `null` (the table is gone).
    schemaless: u32,
    /// Which rows carry which subquery tags, to turn move-outs into deletes.
    tags: TagTracker,
}

/// Long-polling for a while after SSE connections kept closing at once.
#[derive(Debug, Clone, Copy)]
struct SseFallback {
    since: Instant,
    /// Good long-polls since.
    polls: u32,
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
            backoff: Backoff::new(options.backoff),
            options,
            client,
            handle: None,
            cursor: None,
            schema: None,
            schema_text: None,
            live: false,
            cache_buster: None,
            expired_handles: VecDeque::new(),
            expired_to_send: None,
            stale_retries: 0,
            self_healed: false,
            fast_loop: FastLoop::default(),
            malformed_bodies: 0,
            resets_since_success: 0,
            pending_delay: None,
            last_position: None,
            sse: None,
            sse_short_closes: 0,
            sse_poll_next: false,
            sse_fallback: None,
            file_headers: HeaderMap::new(),
            file_secret: None,
            auth_failures: 0,
            schemaless: 0,
            tags: TagTracker::new(true),
        })
    }

    /// Continues from a stored position (`None`: start afresh). The first request
    /// after a resume is non-live, so it brings a fresh schema and catches up.
    pub fn resume(&mut self, from: Option<ResumePoint>) {
        self.live = false;
        self.sse = None;
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
    pub async fn next_event(&mut self) -> Result<ShapeEvent, ShapeError> {
        loop {
            if self.sse.is_some() {
                if let Some(event) = self.read_sse().await? {
                    return Ok(event);
                }
                continue;
            }
            if let Some(delay) = self.pending_delay.take() {
                tokio::time::sleep(delay).await;
            }
            if let Err(what) = self.refresh_credentials().await {
                self.auth_failures += 1;
                if self.auth_failures > self.options.auth_retries {
                    self.auth_failures = 0;
                    return Err(ShapeError::InvalidOptions(format!(
                        "{what}, {} times in a row; make the file readable with valid contents",
                        self.options.auth_retries + 1
                    )));
                }
                self.wait_after_fault(&what, None).await;
                continue;
            }
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
                    secret: self.file_secret.as_deref(),
                    expired_handle: self
                        .expired_to_send
                        .as_deref()
                        .filter(|_| self.offset == Some(Offset::Start)),
                },
            );
            tracing::debug!(url = %redact_url(&url), live, sse, "shape request");
            let timeout = self.options.request_timeout;
            let mut request_headers = self.options.headers.clone();
            // `headers_file` entries replace same-named `headers`.
            request_headers.extend(self.file_headers.clone());
            let request = self.client.get(url).headers(request_headers);
            let sent = if live && !sse {
                // A long-poll: the server's hold plus the body, bounded as a whole.
                Some(request.timeout(timeout).send().await)
            } else {
                // An SSE stream outlives any whole-request timeout, and so may a large
                // non-live body on a slow link: bound the wait for headers here, then
                // the silences of the body (`read_sse`, `read_body`).
                tokio::time::timeout(timeout, request.send()).await.ok()
            };
            let response = match sent {
                Some(Ok(r)) => r,
                None if sse => {
                    tracing::debug!("SSE request got no headers in time; long-polling once");
                    self.sse_poll_next = true;
                    continue;
                }
                None => {
                    self.count_request("error");
                    self.wait_after_fault(&format!("no response headers within {timeout:?}"), None).await;
                    continue;
                }
                Some(Err(e)) if live && e.is_timeout() && !e.is_connect() => {
                    // A live request outlived the server's hold (the TS "live watchdog"):
                    // just poll again; the timeout itself paces these retries.
                    tracing::debug!("live request timed out; polling again");
                    continue;
                }
                Some(Err(e)) => {
                    self.count_request("error");
                    self.wait_after_fault(&describe_reqwest_error(&e), None).await;
                    continue;
                }
            };
            let status = response.status();
            self.count_request(match status.as_u16() {
                200..=299 => "2xx",
                300..=399 => "3xx",
                409 => "409",
                400..=499 => "4xx",
                _ => "5xx",
            });
            tracing::debug!(status = status.as_u16(), "shape response");
            if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
                // The client follows none (see `new`): a redirect is a misconfigured `url`.
                return Err(ShapeError::Redirected { status: status.as_u16() });
            }
            let header_map = response.headers().clone();
            if sse && status.is_success() && is_event_stream(&header_map) {
                if let Some(event) = self.open_sse(response, &header_map)? {
                    return Ok(event);
                }
                continue;
            }
            // A live body must arrive within the request timeout; a non-live one may
            // take as long as it needs while bytes keep coming (`idle_timeout`). A
            // stalled body is a transport fault, and so is one over the cap (counted
            // decoded, after gzip).
            let max_bytes = self.options.max_response_bytes;
            let read = if live {
                match tokio::time::timeout(timeout, read_body(response, max_bytes, None)).await {
                    Ok(result) => result,
                    Err(_) => Err(BodyReadError::Late(timeout)),
                }
            } else {
                read_body(response, max_bytes, Some(self.options.idle_timeout)).await
            };
            let read = read.map_err(|e| match e {
                BodyReadError::Transport(e) => describe_reqwest_error(&e),
                BodyReadError::TooLarge { declared } => too_large(declared, max_bytes),
                BodyReadError::Stalled(idle) => format!("no bytes of the response body arrived for {idle:?}"),
                BodyReadError::Late(after) => format!("the response body did not arrive within {after:?}"),
            });
            let body = match read {
                Ok(body) => body,
                Err(what) => {
                    let retry_after = self.retry_after(&header_map);
                    self.wait_after_fault(&what, retry_after).await;
                    continue;
                }
            };
            if status.is_success() || status == StatusCode::NOT_MODIFIED {
                if let Some(event) = self.on_success(status, &header_map, &body, live).await? {
                    return Ok(event);
                }
                continue;
            }
            match status.as_u16() {
                401 | 403 if self.auth_failures < self.options.auth_retries => {
                    // Credentials may be rotating: retry, re-reading the credential files.
                    self.auth_failures += 1;
                    let retry_after = self.retry_after(&header_map);
                    let what = format!("HTTP {}: credentials refused", status.as_u16());
                    self.wait_after_fault(&what, retry_after).await;
                }
                401 | 403 => {
                    // A caller may fix the credentials and call again: a fresh budget.
                    self.auth_failures = 0;
                    return Err(self.rejection(status.as_u16(), &body));
                }
                409 => {
                    let new_handle = header_str(&header_map, headers::HANDLE).map(str::to_owned);
                    tracing::info!("shape must be refetched (HTTP 409)");
                    return Ok(self.reset(new_handle, true));
                }
                408 | 429 | 500..=599 => {
                    let retry_after = self.retry_after(&header_map);
                    self.wait_after_fault(&format!("HTTP {}", status.as_u16()), retry_after).await;
                }
                400..=499 => {
                    let rejection = self.rejection(status.as_u16(), &body);
                    if offset_out_of_bounds(&rejection) {
                        tracing::warn!("offset is out of bounds for this shape; refetching it");
                        return Ok(self.reset(None, false));
                    }
                    return Err(rejection);
                }
                other => {
                    return Err(ShapeError::protocol(format!("unexpected HTTP status {other}")));
                }
            }
        }
    }

    /// Handles a 2xx or 304. `None` means "request again" (a guard fired or a
    /// malformed body is being retried).
    async fn on_success(
        &mut self,
        status: StatusCode,
        header_map: &HeaderMap,
        body: &[u8],
        live: bool,
    ) -> Result<Option<ShapeEvent>, ShapeError> {
        let code = status.as_u16();
        if matches!(code, 204 | 304) {
            // Nothing new (a deprecated 204 live timeout, or a revalidated cache hit).
            self.backoff.reset();
            self.auth_failures = 0;
            self.cache_buster = None;
            let handle = match self.handle.clone() {
                Some(known) => known,
                None => header_text(header_map, headers::HANDLE)?.map(str::to_owned).ok_or_else(|| {
                    ShapeError::protocol(format!("HTTP {code} before the shape handle was known"))
                })?,
            };
            let offset = self.offset.unwrap_or(Offset::Start);
            // No body, so no snapshot: never up to date for an `offset=-1`/`now` request
            // (a resync that ends "up to date" with no rows would empty the cache).
            let up_to_date = self.is_mid_shape() && (live || code == 204);
            if !up_to_date && self.fast_loop.record(offset) {
                return self.on_fast_loop().map(Some);
            }
            self.live = up_to_date;
            return Ok(Some(ShapeEvent::Response(SourceResponse {
                changes: Vec::new(),
                handle,
                offset,
                schema: self.schema.clone().unwrap_or_default(),
                up_to_date,
            })));
        }
        let handle = header_text(header_map, headers::HANDLE)?
            .ok_or(ShapeError::MissingHeader { header: headers::HANDLE, status: code })?;
        let offset_text = header_text(header_map, headers::OFFSET)?
            .ok_or(ShapeError::MissingHeader { header: headers::OFFSET, status: code })?;
        let offset: Offset = offset_text
            .parse()
            .map_err(|e| ShapeError::protocol(format!("bad `{}` header: {e}", headers::OFFSET)))?;
        let cursor = header_text(header_map, headers::CURSOR)?;
        if live && cursor.is_none() {
            return Err(ShapeError::MissingHeader { header: headers::CURSOR, status: code });
        }
        let schema_text = header_text(header_map, headers::SCHEMA)?;
        if !live && schema_text.is_none() {
            return Err(ShapeError::MissingHeader { header: headers::SCHEMA, status: code });
        }

        if self.is_foreign_handle(handle) {
            return self.on_stale_response(handle.to_owned());
        }
        if schema_text.is_some_and(|text| text.trim() == "null") {
            return self.on_table_gone().map(Some);
        }

        let schema = match schema_text {
            Some(text) if self.schema_text.as_deref() != Some(text) || self.schema.is_none() => {
                let parsed: Schema = serde_json::from_str(text)
                    .map_err(|e| ShapeError::protocol(format!("bad `{}` header: {e}", headers::SCHEMA)))?;
                Arc::new(parsed)
            }
            _ => self.schema.clone().unwrap_or_default(),
        };

        let parsed = match parse_body(body, &schema) {
            Ok(p) => p,
            Err(BodyError::Invalid(detail)) => return Err(ShapeError::Protocol(detail)),
            Err(BodyError::Malformed(detail)) => {
                self.malformed_bodies += 1;
                if self.malformed_bodies > self.options.malformed_body_retries {
                    return Err(ShapeError::Protocol(format!(
                        "{detail}, {} times in a row",
                        self.malformed_bodies
                    )));
                }
                let retry_after = self.retry_after(header_map);
                self.wait_after_fault(&detail, retry_after).await;
                return Ok(None);
            }
        };
        if parsed.must_refetch {
            tracing::info!("shape must be refetched (must-refetch message)");
            return Ok(Some(self.reset(None, true)));
        }

        let mut changes = parsed.changes;
        match self.tags.apply(&mut changes, parsed.marks, &schema) {
            Ok(Resolution::Resolved) => self.count_moves(),
            Ok(Resolution::Unknown) => return Ok(Some(self.refetch_for_unknown_tags())),
            Err(detail) => return Err(ShapeError::Protocol(detail)),
        }

        // The response is good: commit it to the stream state.
        self.backoff.reset();
        self.malformed_bodies = 0;
        self.stale_retries = 0;
        self.resets_since_success = 0;
        self.auth_failures = 0;
        self.schemaless = 0;
        // A cache-buster is for the request after a reset or a stale response only
        // (TS: `client.ts` `#requestShape` passes it to that one request).
        self.cache_buster = None;
        if live {
            self.on_long_poll_success();
        }
        if parsed.up_to_date {
            self.self_healed = false;
            self.fast_loop.detections = 0;
        }
        let request_offset = self.offset;
        // A chunk ending at `-1` holds no snapshot: it cannot complete a (re)sync.
        let up_to_date = parsed.up_to_date && offset != Offset::Start;
        self.handle = Some(handle.to_owned());
        self.offset = Some(offset);
        if let Some(c) = cursor {
            self.cursor = Some(c.to_owned());
        }
        if let Some(text) = schema_text
            && self.schema_text.as_deref() != Some(text)
        {
            self.schema_text = Some(text.to_owned());
        }
        self.schema = Some(schema.clone());
        self.live = up_to_date;
        self.last_position = self.last_position.max(changes.iter().filter_map(|c| c.position).max());
        if !live && !up_to_date && request_offset == Some(offset) && self.fast_loop.record(offset) {
            return self.on_fast_loop().map(Some);
        }
        Ok(Some(ShapeEvent::Response(SourceResponse {
            changes,
            handle: handle.to_owned(),
            offset,
            schema,
            up_to_date,
        })))
    }

    /// The request is past `offset=-1`/`now`: it continues a known shape.
    fn is_mid_shape(&self) -> bool {
        self.offset.is_some_and(|o| o != Offset::Start)
    }

    /// Whether a response's handle cannot answer this request: one we saw expire (a
    /// stale cache), or, mid-shape, another than requested (offsets of two handles
    /// must never mix).
    fn is_foreign_handle(&self, handle: &str) -> bool {
        if self.expired_handles.iter().any(|h| h == handle) {
            tracing::warn!(handle, "response carries an expired handle (stale cache)");
            return true;
        }
        match self.handle.as_deref() {
            Some(requested) if self.is_mid_shape() && requested != handle => {
                tracing::warn!(
                    requested,
                    received = handle,
                    "response carries another shape handle than requested (a cache or proxy mixed them up)"
                );
                true
            }
            _ => false,
        }
    }

    /// A response carried a handle it should not (see [`Self::is_foreign_handle`]):
    /// retry with cache-busters, then reset once, then give up.
    fn on_stale_response(&mut self, handle: String) -> Result<Option<ShapeEvent>, ShapeError> {
        self.stale_retries += 1;
        if self.stale_retries <= STALE_RETRIES {
            tracing::warn!(attempt = self.stale_retries, "retrying with a cache-buster");
            self.cache_buster = Some(new_cache_buster());
            return Ok(None);
        }
        if !self.self_healed {
            tracing::warn!("caches keep serving the wrong shape handle; resetting the stream once");
            self.self_healed = true;
            self.stale_retries = 0;
            self.expired_handles.retain(|h| *h != handle);
            return Ok(Some(self.reset(None, false)));
        }
        Err(ShapeError::protocol(
            "caches keep serving an expired or foreign shape handle, even after a reset; purge the CDN/proxy cache in front of Electric",
        ))
    }

    /// `electric-schema: null`: the server found no table when it answered (dropped or
    /// renamed mid-request: `api.ex` `schema/1` gives nil for `:table_not_found`). The
    /// server drops shapes on a dropped table, so this is a must-refetch; the fresh
    /// request then gets the server's 400 for a missing table. A second `null` in a row
    /// (no good response between) ends the stream with [`ShapeError::TableGone`].
    fn on_table_gone(&mut self) -> Result<ShapeEvent, ShapeError> {
        self.schemaless += 1;
        if self.schemaless > 1 {
            self.schemaless = 0;
            return Err(ShapeError::TableGone { table: self.options.table.clone() });
        }
        tracing::warn!(table = %self.options.table, "the server has no schema for the table (dropped?); refetching the shape");
        Ok(self.reset(None, true))
    }

    fn on_fast_loop(&mut self) -> Result<ShapeEvent, ShapeError> {
        let n = self.fast_loop.detections;
        if n >= FAST_LOOP_LIMIT {
            return Err(ShapeError::protocol(format!(
                "the server returned the same offset {FAST_LOOP_REQUESTS} times within {} ms, {n} times over; a proxy may be caching responses wrongly",
                FAST_LOOP_WINDOW.as_millis()
            )));
        }
        if n == 1 {
            tracing::warn!("non-live requests are not advancing; resetting the stream");
            return Ok(self.reset(None, false));
        }
        let delay = self.backoff.next_delay(None);
        tracing::warn!(?delay, "non-live requests are still not advancing; backing off");
        self.pending_delay = Some(delay);
        self.live = false;
        let offset = self.offset.unwrap_or(Offset::Start);
        Ok(ShapeEvent::Response(SourceResponse {
            changes: Vec::new(),
            handle: self.handle.clone().unwrap_or_default(),
            offset,
            schema: self.schema.clone().unwrap_or_default(),
            up_to_date: false,
        }))
    }

    /// A move-out came for rows whose tags this stream never saw (it resumed from a
    /// stored position): which of them left is unknown, so the shape is read again from
    /// `offset=-1` under the same handle, and the consumer resyncs from that snapshot.
    fn refetch_for_unknown_tags(&mut self) -> ShapeEvent {
        tracing::info!(
            "a move-out arrived for rows synced before this stream resumed (their subquery tags are not known); refetching the shape so the rows that left are removed exactly"
        );
        let handle = self.handle.clone();
        self.reset(handle, false)
    }

    /// Back to `offset=-1`, with a fresh cache-buster so no cached response is reused.
    fn reset(&mut self, new_handle: Option<String>, expire_old: bool) -> ShapeEvent {
        if let Some(old) = self.handle.take()
            && expire_old
            && new_handle.as_ref() != Some(&old)
        {
            if self.expired_handles.len() >= EXPIRED_HANDLES_KEPT {
                self.expired_handles.pop_front();
            }
            self.expired_handles.push_back(old.clone());
            self.expired_to_send = Some(old);
        }
        self.handle = new_handle.clone();
        self.offset = Some(Offset::Start);
        self.live = false;
        self.sse = None;
        self.last_position = None;
        self.schema = None;
        self.schema_text = None;
        self.tags.reset(true);
        self.cache_buster = Some(new_cache_buster());
        self.fast_loop.times.clear();
        self.resets_since_success += 1;
        if self.resets_since_success > 1 {
            // Resets with no good response in between: don't hammer the server.
            self.pending_delay = Some(self.backoff.next_delay(None));
        }
        ShapeEvent::MustRefetch { new_handle }
    }

    /// Reports what the tag index saw move as `shapesync_source_move_events_total{pipeline,
    /// event}` and `shapesync_source_rows_moved_out_total{pipeline}`, when a pipeline is named.
    fn count_moves(&mut self) {
        let counts = self.tags.take_counts();
        let Some(pipeline) = &self.options.metrics_pipeline else { return };
        if counts.move_outs > 0 {
            metrics::counter!("shapesync_source_move_events_total", "pipeline" => pipeline.clone(), "event" => "move-out")
                .increment(counts.move_outs);
            metrics::counter!("shapesync_source_rows_moved_out_total", "pipeline" => pipeline.clone())
                .increment(counts.rows_moved_out);
        }
        if counts.move_ins > 0 {
            metrics::counter!("shapesync_source_move_events_total", "pipeline" => pipeline.clone(), "event" => "move-in")
                .increment(counts.move_ins);
        }
    }

    /// Counts one request outcome (`2xx`, `3xx`, `409`, `4xx`, `5xx`, `error`) as
    /// `shapesync_source_requests_total{pipeline, class}`, when a pipeline is named.
    fn count_request(&self, class: &'static str) {
        if let Some(pipeline) = &self.options.metrics_pipeline {
            metrics::counter!("shapesync_source_requests_total", "pipeline" => pipeline.clone(), "class" => class)
                .increment(1);
        }
    }

    /// Keeps an SSE response open as the live connection (unless a cache served it).
    fn open_sse(
        &mut self,
        response: Response,
        header_map: &HeaderMap,
    ) -> Result<Option<ShapeEvent>, ShapeError> {
        let status = response.status().as_u16();
        let handle = header_text(header_map, headers::HANDLE)?
            .ok_or(ShapeError::MissingHeader { header: headers::HANDLE, status })?;
        if self.is_foreign_handle(handle) {
            return self.on_stale_response(handle.to_owned());
        }
        self.handle = Some(handle.to_owned());
        self.auth_failures = 0;
        self.cache_buster = None;
        if let Some(cursor) = header_text(header_map, headers::CURSOR)? {
            self.cursor = Some(cursor.to_owned());
        }
        self.sse = Some(SseConnection::new(response));
        Ok(None)
    }

    /// Reads the open SSE connection up to the next `up-to-date`. `None` means the
    /// connection ended (or failed) and the caller should reconnect.
    async fn read_sse(&mut self) -> Result<Option<ShapeEvent>, ShapeError> {
        let idle = self.options.request_timeout;
        loop {
            let Some(conn) = self.sse.as_mut() else { return Ok(None) };
            let Some(data) = conn.events.next_data() else {
                let max_bytes = self.options.max_response_bytes;
                if conn.events.pending_bytes() as u64 > max_bytes {
                    self.close_sse();
                    let what =
                        format!("an SSE event is larger than {}", max_response_bytes_setting(max_bytes));
                    self.wait_after_fault(&what, None).await;
                    return Ok(None);
                }
                match tokio::time::timeout(idle, conn.response.chunk()).await {
                    Ok(Ok(Some(bytes))) => conn.events.push(&bytes),
                    Ok(Ok(None)) => {
                        tracing::debug!("SSE connection closed; reconnecting");
                        return Ok(self.end_sse());
                    }
                    Ok(Err(e)) => {
                        let event = self.end_sse();
                        if event.is_none() {
                            self.wait_after_fault(&describe_reqwest_error(&e), None).await;
                        }
                        return Ok(event);
                    }
                    Err(_) => {
                        tracing::warn!("SSE connection silent for {idle:?}; reconnecting");
                        return Ok(self.end_sse());
                    }
                }
                continue;
            };
            let schema = self.schema.clone().unwrap_or_default();
            match parse_message(&data, &schema) {
                Ok(Message::Change(change, tags)) => {
                    if change.position.is_some() && change.position <= self.last_position {
                        tracing::trace!("skipping an op already delivered before the SSE reconnect");
                        continue;
                    }
                    let marks = tags.map(|t| vec![(0, Mark::Tags(t))]).unwrap_or_default();
                    let mut changes = vec![change];
                    match self.tags.apply(&mut changes, marks, &schema) {
                        Ok(Resolution::Resolved) => {}
                        Ok(Resolution::Unknown) => return Ok(Some(self.refetch_for_unknown_tags())),
                        Err(detail) => return Err(ShapeError::Protocol(detail)),
                    }
                    let Some(conn) = self.sse.as_mut() else { return Ok(None) };
                    conn.changes.append(&mut changes);
                    conn.buffered_bytes += data.len() as u64;
                    if conn.buffered_bytes > self.options.max_response_bytes {
                        // A server that never says up-to-date must not fill memory: hand
                        // what arrived on, as a long-poll response cut short would be.
                        return Ok(Some(self.sse_flush(false, None)));
                    }
                }
                Ok(Message::UpToDate(global_lsn)) => return Ok(Some(self.sse_flush(true, global_lsn))),
                Ok(Message::MustRefetch) => return Ok(Some(self.reset(None, true))),
                Ok(Message::Move(event)) => {
                    let mut deletes = Vec::new();
                    match self.tags.apply(&mut deletes, vec![(0, Mark::Move(event))], &schema) {
                        Ok(Resolution::Resolved) => self.count_moves(),
                        Ok(Resolution::Unknown) => return Ok(Some(self.refetch_for_unknown_tags())),
                        Err(detail) => return Err(ShapeError::Protocol(detail)),
                    }
                    let Some(conn) = self.sse.as_mut() else { return Ok(None) };
                    conn.changes.append(&mut deletes);
                }
                Ok(Message::Ignored) => {}
                Err(BodyError::Invalid(detail)) => {
                    self.sse = None;
                    return Err(ShapeError::Protocol(detail));
                }
                Err(BodyError::Malformed(detail)) => {
                    self.close_sse();
                    self.malformed_bodies += 1;
                    if self.malformed_bodies > self.options.malformed_body_retries {
                        return Err(ShapeError::Protocol(format!(
                            "{detail}, {} times in a row",
                            self.malformed_bodies
                        )));
                    }
                    self.wait_after_fault(&detail, None).await;
                    return Ok(None);
                }
            }
        }
    }

    /// The SSE connection ended: closed, failed or silent for the request timeout.
    ///
    /// The server ends a live SSE request that finds a backlog after serving it as one
    /// chunk, often without `up-to-date` (`api.ex` `do_serve_shape_log`), and any SSE
    /// stream after `sse_timeout`, mid-transaction or not (`stream_sse_events`,
    /// `next_sse_event`). So the changes read since the last `up-to-date` are handed
    /// on as a response that is not up to date, resuming after the last of them.
    ///
    /// A connection that moved nothing on makes the next request a plain long-poll:
    /// over SSE an out-of-bounds offset gets a `200 text/event-stream` that closes
    /// silently (`do_serve_shape_log` for `is_out_of_bounds`, then `next_sse_event` on
    /// `:out_of_bounds_timeout`), while a long-poll gets the real 400 (or data). SSE
    /// resumes after a good long-poll, so no path reconnects at one offset forever.
    fn end_sse(&mut self) -> Option<ShapeEvent> {
        let conn = self.sse.as_ref()?;
        let event = (!conn.changes.is_empty()).then(|| self.sse_flush(false, None));
        let conn = self.sse.take()?;
        if !conn.progressed {
            tracing::debug!("the SSE connection ended having moved nothing on; long-polling once");
            self.sse_poll_next = true;
        }
        // A connection cut with changes pending is the server's backlog chunk, which
        // closes at once by design: no sign of a buffering proxy.
        self.note_sse_closed(conn.opened, event.is_some());
        event
    }

    /// An SSE `up-to-date` (or `max_response_bytes` of changes without one): yields the
    /// buffered changes with the resume offset max(last change's `<lsn>_<op>`,
    /// `<global_last_seen_lsn>_0`) (spec §6.4).
    fn sse_flush(&mut self, up_to_date: bool, global_lsn: Option<u64>) -> ShapeEvent {
        let changes = self
            .sse
            .as_mut()
            .map(|c| {
                c.buffered_bytes = 0;
                std::mem::take(&mut c.changes)
            })
            .unwrap_or_default();
        let last = changes.iter().filter_map(|c| c.position).max();
        let mut offset = self.offset.unwrap_or(Offset::Start);
        if let Some(p) = last {
            offset = offset.max(Offset::new(p.lsn, p.op_position));
        }
        if let Some(lsn) = global_lsn {
            offset = offset.max(Offset::new(lsn, 0));
        }
        self.last_position = self.last_position.max(last);
        let advanced = self.offset != Some(offset);
        self.offset = Some(offset);
        if let Some(conn) = self.sse.as_mut() {
            // Progress: the offset moved, or the server confirmed the head.
            conn.progressed |= advanced || up_to_date;
        }
        self.malformed_bodies = 0;
        self.backoff.reset();
        self.resets_since_success = 0;
        self.self_healed = false;
        ShapeEvent::Response(SourceResponse {
            changes,
            handle: self.handle.clone().unwrap_or_default(),
            offset,
            schema: self.schema.clone().unwrap_or_default(),
            up_to_date,
        })
    }

    /// Drops the SSE connection and what it buffered (the next request re-reads it).
    fn close_sse(&mut self) {
        let Some(conn) = self.sse.take() else { return };
        self.note_sse_closed(conn.opened, false);
    }

    /// Counts short SSE connections (TS: `shape-stream-state.ts`
    /// `handleSseConnectionClosed`): each one in a row waits a jittered, doubling delay
    /// before the next request (TS: `client.ts` `#sseBackoffBaseDelay`); three in a
    /// row fall back to long-polling, until [`SSE_FALLBACK_TIME`] has passed or
    /// [`SSE_FALLBACK_POLLS`] long-polls have succeeded. `exempt`: a short connection
    /// that is no sign of a buffering proxy.
    fn note_sse_closed(&mut self, opened: Instant, exempt: bool) {
        if opened.elapsed() >= SSE_SHORT_CLOSE {
            self.sse_short_closes = 0;
            return;
        }
        if exempt {
            return;
        }
        self.sse_short_closes += 1;
        if self.sse_short_closes >= SSE_SHORT_CLOSES {
            tracing::warn!(
                "SSE connections keep closing at once (a buffering proxy? nginx needs `X-Accel-Buffering: no`); long-polling for a while"
            );
            self.sse_fallback = Some(SseFallback { since: Instant::now(), polls: 0 });
            return;
        }
        let factor = 1u32 << self.sse_short_closes.min(16);
        let ceiling = SSE_BACKOFF_BASE.saturating_mul(factor).min(SSE_BACKOFF_CAP);
        let delay = Duration::from_secs_f64(rand::rng().random_range(0.0..=ceiling.as_secs_f64()));
        self.pending_delay = Some(self.pending_delay.map_or(delay, |d| d.max(delay)));
    }

    /// Whether the next live request may use SSE (see [`ShapeStream::end_sse`] and
    /// [`ShapeStream::note_sse_closed`]).
    fn sse_allowed(&mut self) -> bool {
        if self.sse_poll_next {
            return false;
        }
        if let Some(fallback) = self.sse_fallback {
            if fallback.since.elapsed() < SSE_FALLBACK_TIME && fallback.polls < SSE_FALLBACK_POLLS {
                return false;
            }
            tracing::info!("trying SSE again after long-polling for a while");
            self.sse_fallback = None;
            self.sse_short_closes = 0;
        }
        true
    }

    /// A live long-poll succeeded: SSE may follow again.
    fn on_long_poll_success(&mut self) {
        self.sse_poll_next = false;
        if let Some(fallback) = self.sse_fallback.as_mut() {
            fallback.polls += 1;
        }
    }

    /// Re-reads `headers_file` and `secret_file`, when set, before a request.
    async fn refresh_credentials(&mut self) -> Result<(), String> {
        if let Some(path) = &self.options.headers_file {
            self.file_headers = read_headers_file(path).await?;
        }
        if let Some(path) = &self.options.secret_file {
            self.file_secret = Some(read_secret_file(path).await?);
        }
        Ok(())
    }

    fn retry_after(&self, header_map: &HeaderMap) -> Option<Duration> {
        header_str(header_map, headers::RETRY_AFTER).and_then(|v| parse_retry_after(v, SystemTime::now()))
    }

    async fn wait_after_fault(&mut self, what: &str, retry_after: Option<Duration>) {
        let delay = self.backoff.next_delay(retry_after);
        tracing::warn!(
            failures = self.backoff.failures(),
            delay_ms = delay.as_millis() as u64,
            "shape request failed ({what}); retrying at the same offset"
        );
        tokio::time::sleep(delay).await;
    }

    /// A typed rejection from a 4xx body, naming the parameter the server blamed.
    fn rejection(&self, status: u16, body: &[u8]) -> ShapeError {
        #[derive(serde::Deserialize)]
        struct ErrorBody {
            message: Option<String>,
            errors: Option<BTreeMap<String, serde_json::Value>>,
        }
        let hide = |mut s: String| {
            for secret in [self.options.secret.as_deref(), self.file_secret.as_deref()].into_iter().flatten()
            {
                if !secret.is_empty() {
                    s = s.replace(secret, "***");
                }
            }
            s
        };
        let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
        let errors: BTreeMap<String, Vec<String>> = parsed
            .as_ref()
            .and_then(|b| b.errors.as_ref())
            .map(|errs| {
                errs.iter()
                    .map(|(k, v)| {
                        let msgs = match v {
                            serde_json::Value::Array(items) => items.iter().map(json_text).collect(),
                            other => vec![json_text(other)],
                        };
                        (k.clone(), msgs.into_iter().map(hide).collect())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let param = errors.keys().next().cloned().or_else(|| (status == 401).then(|| "secret".to_owned()));
        let message = if errors.len() == 1 {
            errors.values().flatten().cloned().collect::<Vec<_>>().join(", ")
        } else if !errors.is_empty() {
            errors.iter().map(|(k, v)| format!("{k}: {}", v.join(", "))).collect::<Vec<_>>().join("; ")
        } else if let Some(m) = parsed.and_then(|b| b.message) {
            m
        } else {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("").to_owned()
            } else {
                text.chars().take(300).collect()
            }
        };
        ShapeError::Rejected { status, param, message: hide(message), errors }
    }
}

fn json_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A protocol header's value as text; `Ok(None)` when it is absent. Read as UTF-8 from
/// the raw bytes: Electric's JSON encoder leaves non-ASCII (say a column named `ünï`
/// in `electric-schema`) unescaped, which `HeaderValue::to_str` would refuse.
fn header_text<'a>(map: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, ShapeError> {
    let Some(value) = map.get(name) else { return Ok(None) };
    std::str::from_utf8(value.as_bytes())
        .map(Some)
        .map_err(|_| ShapeError::protocol(format!("the `{name}` header is not valid UTF-8")))
}

/// An optional header's value as text; `None` when it is absent or not UTF-8.
fn header_str<'a>(map: &'a HeaderMap, name: &'static str) -> Option<&'a str> {
    header_text(map, name).ok().flatten()
}

fn new_cache_buster() -> String {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis();
    format!("{now}-{:016x}", rand::rng().random::<u64>())
}

/// A rejection that means the request's offset is out of bounds for the shape.
///
/// Electric answers 400 with `errors` naming `offset` in two cases only
/// (packages/sync-service, electric-sql/electric@dc07a1e):
/// - `Api.Params.cast_offset/1` (lib/electric/shapes/api/params.ex) when
///   `LogOffset.from_string/1` cannot parse the offset; the other parameter checks
///   (`validate_handle_with_offset/1`, `validate_live_with_offset/1`) put their errors
///   on `handle` and `live`, and the subset's own `offset` is nested under `subset`;
/// - `Api` (lib/electric/shapes/api.ex) with `@offset_out_of_bounds`
///   (`%{offset: ["out of bounds for this shape"]}`) once an out-of-bounds request's
///   wait for the log to reach it times out (`:out_of_bounds_timeout`).
///
/// The stream builds every offset it sends from a parsed [`Offset`], so the first
/// case cannot happen: a 400 naming `offset` is the second, whatever its words.
fn offset_out_of_bounds(rejection: &ShapeError) -> bool {
    matches!(rejection, ShapeError::Rejected { status: 400, errors, .. } if errors.contains_key("offset"))
}

/// Describes a transport failure without the URL (which may hold secrets).
fn describe_reqwest_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_body() || e.is_decode() {
        "the response body was cut off"
    } else {
        "network error"
    };
    let mut detail = kind.to_owned();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    detail
}

/// Why a response body was not read whole.
#[derive(Debug)]
enum BodyReadError {
    /// The connection failed or was cut off.
    Transport(reqwest::Error),
    /// The body is larger than the cap: by its `content-length` (`declared`), or by
    /// the bytes that arrived.
    TooLarge {
        /// The `content-length`, when that is what gave it away.
        declared: Option<u64>,
    },
    /// No bytes arrived for this long (`idle_timeout`).
    Stalled(Duration),
    /// A live body was not whole within this long (`request_timeout`).
    Late(Duration),
}

/// Reads a response body of at most `max_bytes` (decoded: reqwest undoes gzip and then
/// reports no `content-length`): one whose `content-length` is larger is refused
/// before any of it is read, and reading stops (dropping the connection) as soon as
/// more than `max_bytes` have arrived. With `idle`, a silence that long is an error.
async fn read_body(
    mut response: Response,
    max_bytes: u64,
    idle: Option<Duration>,
) -> Result<Vec<u8>, BodyReadError> {
    let declared = response.content_length();
    if declared.is_some_and(|length| length > max_bytes) {
        return Err(BodyReadError::TooLarge { declared });
    }
    // Never more than `max_bytes`, so a lying `content-length` costs no more than that.
    let mut body = Vec::with_capacity(declared.unwrap_or(0).min(max_bytes) as usize);
    loop {
        let next = match idle {
            Some(idle) => tokio::time::timeout(idle, response.chunk())
                .await
                .map_err(|_| BodyReadError::Stalled(idle))?,
            None => response.chunk().await,
        };
        let Some(chunk) = next.map_err(BodyReadError::Transport)? else { break };
        if (body.len() + chunk.len()) as u64 > max_bytes {
            return Err(BodyReadError::TooLarge { declared: None });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The fault of a body over the cap, naming the setting that raises it.
fn too_large(declared: Option<u64>, max_bytes: u64) -> String {
    match declared {
        Some(length) => format!(
            "the response declares a {length}-byte body, more than {}",
            max_response_bytes_setting(max_bytes)
        ),
        None => format!("the response body is larger than {}", max_response_bytes_setting(max_bytes)),
    }
}

/// The cap, named so that the user can find the setting: "`max_response_bytes`
/// (67108864 bytes; raise it if …)".
fn max_response_bytes_setting(max_bytes: u64) -> String {
    format!(
        "`max_response_bytes` ({max_bytes} bytes; raise it if the shape has rows or transactions that large)"
    )
}

fn is_event_stream(map: &HeaderMap) -> bool {
    header_str(map, "content-type").is_some_and(|t| t.trim_start().starts_with("text/event-stream"))
}

/// An open SSE response and the messages read from it since the last `up-to-date`.
struct SseConnection {
    response: Response,
    opened: Instant,
    events: SseFramer,
    /// Changes waiting for `up-to-date`.
    changes: Vec<Change>,
    /// The size of their SSE data, which `max_response_bytes` bounds.
    buffered_bytes: u64,
    /// It moved the offset on or said up-to-date.
    progressed: bool,
}

impl SseConnection {
    fn new(response: Response) -> Self {
        SseConnection {
            response,
            opened: Instant::now(),
            events: SseFramer::default(),
            changes: Vec::new(),
            buffered_bytes: 0,
            progressed: false,
        }
    }
}

/// Splits an SSE byte stream into the data of its events.
#[derive(Default)]
struct SseFramer {
    /// Bytes received; `pos` is where the unread part starts.
    buffer: Vec<u8>,
    pos: usize,
    /// `buffer[pos..scanned]` holds no line end: a long line is scanned once, not once
    /// per chunk that extends it.
    scanned: usize,
    /// `data:` lines of the event being read.
    data: Vec<u8>,
    has_data: bool,
}

impl SseFramer {
    fn push(&mut self, bytes: &[u8]) {
        self.buffer.drain(..self.pos);
        // A `scanned` below `pos` is stale (lines were read past it): nothing to keep.
        self.scanned = self.scanned.saturating_sub(self.pos);
        self.pos = 0;
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes held for the event being read (its data lines and the unfinished line),
    /// once [`SseFramer::next_data`] has returned `None`.
    fn pending_bytes(&self) -> usize {
        self.buffer.len() - self.pos + self.data.len()
    }

    /// The data of the next complete event, if the buffer holds one. Comments
    /// (`: keep-alive`) and fields other than `data` are skipped.
    fn next_data(&mut self) -> Option<Vec<u8>> {
        loop {
            let from = self.scanned.max(self.pos);
            let Some(newline) = self.buffer[from..].iter().position(|&b| b == b'\n') else {
                self.scanned = self.buffer.len();
                return None;
            };
            let end = from + newline;
            let line = &self.buffer[self.pos..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line).to_vec();
            self.pos = end + 1;
            if line.is_empty() {
                if self.has_data {
                    self.has_data = false;
                    return Some(std::mem::take(&mut self.data));
                }
                continue;
            }
            if line[0] == b':' {
                continue;
            }
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(i) => (&line[..i], line[i + 1..].strip_prefix(b" ").unwrap_or(&line[i + 1..])),
                None => (&line[..], &[][..]),
            };
            if field == b"data" {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
        }
    }
}

/// Counts non-advancing non-live responses per offset.
#[derive(Debug, Default)]
struct FastLoop {
    offset: Option<Offset>,
    times: VecDeque<Instant>,
    detections: u32,
}

impl FastLoop {
    /// Records one non-advancing response at `offset`; true when it completes a loop.
    fn record(&mut self, offset: Offset) -> bool {
        let now = Instant::now();
        if self.offset != Some(offset) {
            self.offset = Some(offset);
            self.times.clear();
        }
        self.times.push_back(now);
        while self.times.front().is_some_and(|t| now.duration_since(*t) > FAST_LOOP_WINDOW) {
            self.times.pop_front();
        }
        if self.times.len() >= FAST_LOOP_REQUESTS {
            self.times.clear();
            self.detections += 1;
            return true;
        }
        false
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
    async fn probe(&mut self) -> Result<(), SourceError> {
        let mut options = self.options.clone();
        options.start = crate::StartFrom::Now;
        options.metrics_pipeline = None;
        let mut probe = ShapeStream::with_client(options, self.client.clone())?;
        match tokio::time::timeout(PROBE_TIMEOUT, probe.next_event()).await {
            Ok(result) => result.map(drop).map_err(SourceError::from),
            Err(elapsed) => Err(SourceError::setup(format!(
                "the shape server did not answer within {PROBE_TIMEOUT:?} (see the log for the retried faults)"
            ))
            .with_source(elapsed)),
        }
    }
}

/// How long [`Source::probe`] keeps retrying an unreachable server.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_400_naming_offset_is_out_of_bounds_whatever_its_words() {
        let rejected = |status: u16, param: &str, words: &str| ShapeError::Rejected {
            status,
            param: Some(param.to_owned()),
            message: words.to_owned(),
            errors: [(param.to_owned(), vec![words.to_owned()])].into(),
        };
        assert!(offset_out_of_bounds(&rejected(400, "offset", "out of bounds for this shape")));
        assert!(offset_out_of_bounds(&rejected(400, "offset", "beyond the end of the log")));
        assert!(!offset_out_of_bounds(&rejected(400, "handle", "can't be blank when offset != -1")));
        assert!(!offset_out_of_bounds(&rejected(404, "offset", "out of bounds for this shape")));
        assert!(!offset_out_of_bounds(&ShapeError::protocol("offset out of bounds")));
    }

    #[test]
    fn fast_loop_needs_five_hits_at_one_offset() {
        let mut f = FastLoop::default();
        let o = Offset::new(1, 0);
        assert!(!(0..4).any(|_| f.record(o)));
        assert!(!f.record(Offset::new(2, 0)), "another offset starts over");
        assert!(!(0..3).any(|_| f.record(Offset::new(2, 0))));
        assert!(f.record(Offset::new(2, 0)));
        assert_eq!(f.detections, 1);
    }

    #[test]
    fn sse_framing_skips_comments_and_joins_data_lines() {
        let mut c = SseFramer::default();
        c.push(b": keep-alive\n\ndata: {\"a\":\r\ndata: 1}\r\n\nevent: x\nid: 3\ndata:2\n");
        assert_eq!(c.next_data().unwrap(), b"{\"a\":\n1}");
        assert_eq!(c.next_data(), None, "the second event is not complete yet");
        c.push(b"\n");
        assert_eq!(c.next_data().unwrap(), b"2");
        assert_eq!(c.next_data(), None);
    }

    #[test]
    fn headers_are_read_as_utf8_and_invalid_bytes_are_a_protocol_error() {
        let mut map = HeaderMap::new();
        let schema = r#"{"ünï":{"type":"text"}}"#;
        map.insert(headers::SCHEMA, reqwest::header::HeaderValue::from_bytes(schema.as_bytes()).unwrap());
        assert!(map[headers::SCHEMA].to_str().is_err(), "to_str refuses non-ASCII");
        assert_eq!(header_text(&map, headers::SCHEMA), Ok(Some(schema)));
        assert_eq!(header_text(&map, headers::HANDLE), Ok(None));
        map.insert(headers::HANDLE, reqwest::header::HeaderValue::from_bytes(b"h-\xff").unwrap());
        match header_text(&map, headers::HANDLE) {
            Err(ShapeError::Protocol(m)) => {
                assert!(m.contains("`electric-handle` header is not valid UTF-8"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(header_str(&map, headers::HANDLE), None);
    }

    #[test]
    fn sse_framing_finds_a_line_split_over_many_pushes_and_counts_what_it_holds() {
        let mut c = SseFramer::default();
        c.push(b"data: {\"a\":1}\n\ndata: ");
        assert_eq!(c.next_data().unwrap(), b"{\"a\":1}");
        assert_eq!(c.next_data(), None);
        assert_eq!(c.pending_bytes(), 6, "the unfinished line");
        for _ in 0..1000 {
            c.push(b"xx");
            assert_eq!(c.next_data(), None);
        }
        assert_eq!(c.pending_bytes(), 2006);
        c.push(b"\ndata: y\n");
        assert_eq!(c.next_data(), None);
        assert_eq!(c.pending_bytes(), 2000 + 1 + 1, "the event's two data lines, joined");
        c.push(b"\n");
        let data = c.next_data().unwrap();
        assert_eq!(data.len(), 2002);
        assert!(data.starts_with(b"xx") && data.ends_with(b"x\ny"));
        c.push(b"data: z\n\n");
        assert_eq!(c.next_data().unwrap(), b"z", "a push right after an event");
        assert_eq!(c.next_data(), None);
        assert_eq!(c.pending_bytes(), 0);
    }

    #[test]
    fn cache_busters_are_unique() {
        let a: std::collections::HashSet<String> = (0..1000).map(|_| new_cache_buster()).collect();
        assert_eq!(a.len(), 1000);
    }
}
