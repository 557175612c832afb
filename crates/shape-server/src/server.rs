//! The axum server, its options, the fault queue and the request log.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{RawQuery, State as AxumState};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use futures::StreamExt;
use rand::Rng;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::fault::Fault;
use crate::shape::{self, Eval, EvalFlags, MUST_REFETCH, Reply, RequestOffset, ShapeDef, ShapeRequest};
use crate::sse;
use crate::store::State;

/// Server settings. Defaults match Electric; tests usually shorten the timeouts and chunks.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Chunk threshold in bytes for snapshot and log chunks (`ELECTRIC_SHAPE_CHUNK_BYTES_THRESHOLD`).
    pub chunk_bytes: usize,
    /// How long a live request is held when there is nothing new (`ELECTRIC_LONG_POLL_TIMEOUT`).
    pub long_poll_timeout: Duration,
    /// How long a request whose offset is beyond the shape's log is held, like a live
    /// request, waiting for the log to reach it; then long-polls get the 400 out-of-bounds
    /// and SSE streams close silently. Electric holds for `long_poll_timeout / 2`
    /// (`api.ex` `do_serve_shape_log` `is_out_of_bounds` clause); the default, 10 s, is that
    /// for the default `long_poll_timeout`.
    pub out_of_bounds_wait: Duration,
    /// When set, every request must carry `secret=<this>` (or `api_secret`), else 401.
    pub secret: Option<String>,
    /// SSE (`live_sse=true`): a live stream at the head ends after this long, without a
    /// final message (Electric's `sse_timeout`, 60 s); also sets `cache-control: max-age`
    /// of SSE responses to this in seconds minus one.
    pub sse_timeout: Duration,
    /// SSE: a `: keep-alive` comment is sent after this much silence (Electric: 21 s).
    pub sse_keepalive: Duration,
    /// The most log entries a shape keeps before it is rotated to a new handle whose
    /// snapshot holds the current rows (its clients refetch); `None`: no bound. The
    /// devserver sets one, so a long-running one does not grow without bound.
    pub max_log_entries: Option<usize>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            chunk_bytes: 10 * 1024 * 1024,
            long_poll_timeout: Duration::from_secs(20),
            out_of_bounds_wait: Duration::from_secs(10),
            secret: None,
            sse_timeout: Duration::from_secs(60),
            sse_keepalive: Duration::from_secs(21),
            max_log_entries: None,
        }
    }
}

/// Errors of the shape server.
#[derive(Debug, thiserror::Error)]
pub enum ShapeServerError {
    /// The listen address could not be bound.
    #[error("could not listen on {addr}: {source}; choose a free address/port")]
    Bind {
        /// The address that failed.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A `wait_*` helper hit its deadline.
    #[error("timed out after {timeout:?} waiting for {what}; the client did not send the expected requests")]
    Timeout {
        /// The deadline used.
        timeout: Duration,
        /// What was awaited.
        what: String,
    },
}

/// One request the server received (only `/v1/shape`).
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// When the request arrived; compare these to check client backoff.
    pub received_at: Instant,
    /// HTTP method.
    pub method: String,
    /// Query parameters in order, percent-decoded; `secret`/`api_secret` values are redacted.
    pub query: Vec<(String, String)>,
    /// The request body (POST subset requests), if any.
    pub body: Option<String>,
    /// `If-None-Match` header, if sent.
    pub if_none_match: Option<String>,
    /// Response status; `None` while the request is still being answered (e.g. a long-poll).
    pub status: Option<u16>,
    /// The fault applied to this request, if any.
    pub fault: Option<Fault>,
}

impl RequestRecord {
    /// The first value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// True if the request was live (`live` present and not `false`).
    pub fn is_live(&self) -> bool {
        self.param("live").is_some_and(|v| v != "false")
    }
}

/// State shared by the server task and the table handles.
pub(crate) struct Shared {
    pub state: Mutex<State>,
    pub options: ServerOptions,
    pub cancel: CancellationToken,
    /// Bumped on every data change; wakes long-polls.
    pub changed: watch::Sender<u64>,
    faults: Mutex<VecDeque<Fault>>,
    requests: Mutex<Vec<RequestRecord>>,
    requests_changed: watch::Sender<u64>,
    empty_etag_counter: AtomicU64,
    /// Why the server cannot serve (see [`Availability`]); every request gets a 503 then.
    outage: Mutex<Option<String>>,
}

impl Shared {
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn record(&self, f: impl FnOnce(&mut Vec<RequestRecord>)) {
        f(&mut self.requests.lock().unwrap_or_else(|e| e.into_inner()));
        self.requests_changed.send_modify(|v| *v += 1);
    }
}

/// A running in-process Electric server on 127.0.0.1. Stops on drop or [`ShapeServer::shutdown`].
pub struct ShapeServer {
    pub(crate) shared: Arc<Shared>,
    addr: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ShapeServer {
    /// Starts a server on an ephemeral port of 127.0.0.1.
    pub async fn start(options: ServerOptions) -> Result<ShapeServer, ShapeServerError> {
        ShapeServer::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), options).await
    }

    /// Starts a server on `addr` (port 0 = ephemeral).
    pub async fn start_on(addr: SocketAddr, options: ServerOptions) -> Result<ShapeServer, ShapeServerError> {
        ShapeServer::start_out_of_service(addr, options, None).await
    }

    /// Starts a server on `addr` that answers every request with a 503 naming `why` until
    /// [`Availability::restore`] (`None`: in service at once): a server still loading
    /// its tables is starting, not missing them (Electric answers 503 while its stack
    /// starts, `plug/router.ex`), so clients retry instead of giving up on a 400.
    pub async fn start_out_of_service(
        addr: SocketAddr,
        options: ServerOptions,
        why: Option<String>,
    ) -> Result<ShapeServer, ShapeServerError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ShapeServerError::Bind { addr, source })?;
        let addr = listener.local_addr().map_err(|source| ShapeServerError::Bind { addr, source })?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new().with_max_log_entries(options.max_log_entries)),
            changed: watch::channel(0).0,
            faults: Mutex::default(),
            requests: Mutex::default(),
            requests_changed: watch::channel(0).0,
            options,
            cancel: CancellationToken::new(),
            empty_etag_counter: AtomicU64::new(0),
            outage: Mutex::new(why),
        });
        let app = Router::new()
            .route("/v1/shape", get(handle_get).post(handle_post).options(handle_options))
            .layer(axum::middleware::from_fn(cors))
            .with_state(shared.clone());
        let cancel = shared.cancel.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await;
        });
        Ok(ShapeServer { shared, addr, task: Some(task) })
    }

    /// `http://127.0.0.1:PORT/v1/shape`.
    pub fn url(&self) -> String {
        format!("http://{}/v1/shape", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The switch that takes the whole server out of service (see [`Availability`]).
    pub fn availability(&self) -> Availability {
        Availability { shared: self.shared.clone() }
    }

    /// Queues `fault` for the next request (faults are consumed first-in first-out, one per request).
    pub fn inject(&self, fault: Fault) {
        self.inject_times(fault, 1);
    }

    /// Queues `fault` for the next `times` requests.
    pub fn inject_times(&self, fault: Fault, times: usize) {
        let mut faults = self.shared.faults.lock().unwrap_or_else(|e| e.into_inner());
        faults.extend(std::iter::repeat_n(fault, times));
    }

    /// Faults not yet consumed.
    pub fn pending_faults(&self) -> usize {
        self.shared.faults.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.requests.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.shared.record(Vec::clear);
    }

    /// Waits until `condition` holds for the request log, returning the log at that point.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        condition: impl Fn(&[RequestRecord]) -> bool,
    ) -> Result<Vec<RequestRecord>, ShapeServerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut rx = self.shared.requests_changed.subscribe();
            let log = self.requests();
            if condition(&log) {
                return Ok(log);
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Err(ShapeServerError::Timeout { timeout, what: what.to_string() });
            }
        }
    }

    /// Waits until at least `n` requests have been received.
    pub async fn wait_for_requests(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<RequestRecord>, ShapeServerError> {
        self.wait_for(&format!("{n} requests"), timeout, |log| log.len() >= n).await
    }

    /// Stops accepting requests, ends pending long-polls and waits for the server task.
    pub async fn shutdown(mut self) {
        self.shared.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// Takes a [`ShapeServer`] out of service and back, from anywhere (cheap to clone): a
/// server whose data can no longer be trusted (the devserver lost its replication
/// stream) answers every request with a 503 naming why, instead of serving stale rows.
#[derive(Clone)]
pub struct Availability {
    shared: Arc<Shared>,
}

impl Availability {
    /// Answers every request from now on with a 503 whose message is `why`, and ends the
    /// pending long-polls.
    pub fn fail(&self, why: impl Into<String>) {
        *self.shared.outage.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.into());
        self.shared.notify();
    }

    /// Serves again.
    pub fn restore(&self) {
        *self.shared.outage.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.shared.notify();
    }

    /// Why the server is out of service, if it is.
    pub fn outage(&self) -> Option<String> {
        self.shared.outage.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for ShapeServer {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

/// The headers a browser may read from a response: Electric's own and `retry-after`
/// (`shapes/api/response.ex` `electric_headers`).
const EXPOSED_HEADERS: &str = "electric-cursor,electric-handle,electric-has-data,electric-offset,electric-schema,electric-up-to-date,electric-internal-known-error,retry-after";

/// CORS on every answer, as Electric's `plug/utils.ex` `CORSHeaderPlug` (which the router
/// plugs after `authenticate`, so a 401 goes without): the request's `Origin` (or `*`)
/// is allowed, Electric's headers exposed, the shape route's methods listed. Without
/// them the official client in a browser cannot read `electric-offset` and fails with
/// `MissingHeadersError`.
async fn cors(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let origin = request.headers().get(header::ORIGIN).cloned().unwrap_or(HeaderValue::from_static("*"));
    let mut response = next.run(request).await;
    if response.status() != StatusCode::UNAUTHORIZED {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSED_HEADERS));
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, HEAD, DELETE, OPTIONS"),
        );
    }
    response
}

/// A CORS preflight, as Electric's `shapes/api/options.ex`: 204, cached for a day, and of
/// the request headers asked for, the ones the shape API reads (`if-none-match`,
/// `traceparent`).
async fn handle_options(headers: HeaderMap) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let out = response.headers_mut();
    out.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("86400"));
    out.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    let asked =
        headers.get_all(header::ACCESS_CONTROL_REQUEST_HEADERS).iter().filter_map(|v| v.to_str().ok());
    let allowed: Vec<String> = asked
        .flat_map(|v| v.split(','))
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| matches!(h.as_str(), "if-none-match" | "traceparent"))
        .collect();
    if !allowed.is_empty() {
        out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, header_value(&allowed.join(",")));
    }
    response
}

async fn handle_get(
    AxumState(shared): AxumState<Arc<Shared>>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    handle_shape(shared, method, headers, query, None).await
}

/// POST = a subset snapshot whose fields come as a JSON body.
async fn handle_post(
    AxumState(shared): AxumState<Arc<Shared>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    handle_shape(shared, Method::POST, headers, query, Some(String::from_utf8_lossy(&body).into_owned()))
        .await
}

async fn handle_shape(
    shared: Arc<Shared>,
    method: Method,
    headers: HeaderMap,
    query: Option<String>,
    body: Option<String>,
) -> Response {
    let mut query: Vec<(String, String)> =
        url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()).into_owned().collect();
    if let Some(body) = &body {
        match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(body) {
            Ok(fields) => query.extend(fields.into_iter().map(|(k, v)| {
                let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                (format!("subset__{k}"), v)
            })),
            Err(_) => query.push(("subset__invalid_body".to_string(), "true".to_string())),
        }
    }
    let fault = shared.faults.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
    let if_none_match = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).map(str::to_string);
    let redacted = query
        .iter()
        .map(|(k, v)| {
            let secret = k == "secret" || k == "api_secret";
            (k.clone(), if secret { "<redacted>".to_string() } else { v.clone() })
        })
        .collect();
    let mut index = 0;
    shared.record(|log| {
        index = log.len();
        log.push(RequestRecord {
            received_at: Instant::now(),
            method: method.to_string(),
            query: redacted,
            body: body.clone(),
            if_none_match: if_none_match.clone(),
            status: None,
            fault: fault.clone(),
        });
    });
    let response = respond(&shared, &query, if_none_match.as_deref(), fault).await;
    let status = response.status().as_u16();
    shared.record(|log| {
        if let Some(r) = log.get_mut(index) {
            r.status = Some(status);
        }
    });
    response
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert("electric-server", HeaderValue::from_static("shapesync-testkit"));
    r
}

fn error_response(status: StatusCode, body: serde_json::Value) -> Response {
    let mut r = json_response(status, body.to_string());
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut().insert("surrogate-control", HeaderValue::from_static("no-store"));
    r
}

/// 400 `{"message":"Invalid request","errors":{field:[message]}}`; a `subset.x` field nests
/// as `{"subset":{"x":[message]}}` like Ecto's embedded errors.
pub(crate) fn invalid(field: &str, message: &str) -> Response {
    let errors = match field.split_once('.') {
        Some((outer, inner)) => serde_json::json!({outer: {inner: [message]}}),
        None => serde_json::json!({field: [message]}),
    };
    error_response(
        StatusCode::BAD_REQUEST,
        serde_json::json!({"message": "Invalid request", "errors": errors}),
    )
}

pub(crate) fn must_refetch(handle: Option<String>) -> Response {
    let mut r = json_response(StatusCode::CONFLICT, MUST_REFETCH.to_string());
    let cache = if handle.is_some() {
        "public, max-age=60, must-revalidate"
    } else {
        "public, max-age=1, must-revalidate"
    };
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if let Some(h) = handle {
        r.headers_mut().insert("electric-handle", header_value(&h));
    }
    r
}

pub(crate) fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// The current handle of `def`'s shape, if it has one.
pub(crate) fn current_handle(shared: &Shared, def: &ShapeDef) -> Option<String> {
    let state = shared.state();
    state.tables.get(&def.table)?.generation.as_ref().map(|g| def.handle(g.id))
}

async fn respond(
    shared: &Arc<Shared>,
    query: &[(String, String)],
    if_none_match: Option<&str>,
    fault: Option<Fault>,
) -> Response {
    if let Some(secret) = &shared.options.secret {
        let given = query.iter().find(|(k, _)| k == "secret" || k == "api_secret").map(|(_, v)| v);
        if given != Some(secret) {
            return error_response(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"message": "Unauthorized - Invalid API secret"}),
            );
        }
    }
    if let Some(why) = shared.outage.lock().unwrap_or_else(|e| e.into_inner()).clone() {
        let mut r = error_response(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"message": why}));
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return r;
    }
    match fault {
        Some(Fault::ServiceUnavailable { retry_after }) => {
            let mut r = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"message": "Service temporarily unavailable (injected fault)"}),
            );
            if let Some(s) = retry_after {
                r.headers_mut().insert(header::RETRY_AFTER, header_value(&s.to_string()));
            }
            return r;
        }
        Some(Fault::InternalError) => {
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"message": "Internal server error (injected fault)"}),
            );
        }
        _ => {}
    }
    let parsed = shape::parse_request(&shared.state(), query);
    let req = match parsed {
        Ok(req) => req,
        Err((field, message)) => return invalid(field, &message),
    };
    if let Some(Fault::MustRefetch { with_handle }) = fault {
        return must_refetch(if with_handle { current_handle(shared, &req.def) } else { None });
    }
    let flags = EvalFlags {
        live_expired: false,
        out_of_bounds_expired: false,
        cut_mid_transaction: fault == Some(Fault::EndMidTransaction),
        chunk_bytes: shared.options.chunk_bytes,
    };
    if req.sse {
        return sse::start(shared, req, flags, fault).await;
    }
    if let Some(subset) = &req.subset {
        return match shape::subset_snapshot(&mut shared.state(), &req, subset) {
            Ok(reply) => subset_response(reply),
            Err(handle) => must_refetch(handle),
        };
    }
    let mut reply = match wait_for_reply(shared, &req, flags).await {
        Eval::Reply(reply) => reply,
        Eval::Conflict(handle) => return must_refetch(handle),
        Eval::OutOfBounds => return invalid("offset", "out of bounds for this shape"),
        Eval::Wait { .. } => unreachable!("wait_for_reply only returns final answers"),
    };
    let body = std::mem::replace(&mut reply.body, shape::Body::Ready(Vec::new()));
    let body = match body {
        shape::Body::Ready(bytes) => bytes,
        generated => tokio::task::spawn_blocking(move || generated.render()).await.unwrap_or_default(),
    };
    let response = ok_response(shared, &req, reply, body, if_none_match);
    match fault {
        Some(f) if response.status() == StatusCode::OK => apply_body_fault(response, f).await,
        _ => response,
    }
}

/// Evaluates the request, waiting for data (live) or for the log to reach the offset.
pub(crate) async fn wait_for_reply(shared: &Shared, req: &ShapeRequest, mut flags: EvalFlags) -> Eval {
    let start = tokio::time::Instant::now();
    let live_deadline = start + shared.options.long_poll_timeout;
    let out_of_bounds_deadline = start + shared.options.out_of_bounds_wait;
    loop {
        let mut rx = shared.changed.subscribe();
        let eval = shape::evaluate(&mut shared.state(), req, &flags);
        let Eval::Wait { out_of_bounds } = eval else { return eval };
        let deadline = if out_of_bounds { out_of_bounds_deadline } else { live_deadline };
        tokio::select! {
            _ = rx.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = shared.cancel.cancelled() => {
                flags.live_expired = true;
                flags.out_of_bounds_expired = true;
            }
        }
        let now = tokio::time::Instant::now();
        flags.live_expired |= now >= live_deadline;
        flags.out_of_bounds_expired |= now >= out_of_bounds_deadline;
    }
}

/// Seconds since 2024-10-09T00:00Z rounded up to 20 s; strictly above the client's cursor.
pub(crate) fn next_cursor(client: Option<u64>) -> u64 {
    const EPOCH: u64 = 1_728_432_000;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(EPOCH);
    let interval = now.saturating_sub(EPOCH).div_ceil(20) * 20;
    match client {
        Some(c) if interval <= c => c + rand::rng().random_range(1..=3600),
        _ => interval,
    }
}

fn ok_response(
    shared: &Shared,
    req: &ShapeRequest,
    reply: Reply,
    body: Vec<u8>,
    if_none_match: Option<&str>,
) -> Response {
    let mut etag = format!("\"{}:{}:{}", reply.handle, req.offset, reply.offset);
    if !reply.has_data {
        let n = shared.empty_etag_counter.fetch_add(1, Ordering::Relaxed);
        etag.push_str(&format!(":{n}"));
    }
    etag.push('"');
    let cache = if req.offset == RequestOffset::Start {
        "public, max-age=604800, s-maxage=3600, stale-while-revalidate=2629746"
    } else if req.live {
        "public, max-age=5, stale-while-revalidate=5"
    } else {
        "public, max-age=60, stale-while-revalidate=300"
    };
    // Like Electric: a comma list of etags, compared without quotes.
    let not_modified = if_none_match.is_some_and(|list| {
        list.split(',').any(|tag| tag.trim().trim_matches('"') == etag.trim_matches('"'))
    });
    let mut r = if not_modified {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let mut r = Response::new(Body::from(body));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    };
    let h = r.headers_mut();
    h.insert("electric-server", HeaderValue::from_static("shapesync-testkit"));
    h.insert("electric-handle", header_value(&reply.handle));
    h.insert("electric-offset", header_value(&reply.offset.to_string()));
    h.insert(header::ETAG, header_value(&etag));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if not_modified {
        return r;
    }
    if req.live {
        h.insert("electric-cursor", header_value(&next_cursor(req.cursor).to_string()));
    } else {
        h.insert("electric-schema", header_value(&reply.schema));
    }
    if reply.up_to_date {
        h.insert("electric-up-to-date", HeaderValue::from_static(""));
    }
    h.insert("electric-has-data", HeaderValue::from_static(if reply.has_data { "true" } else { "false" }));
    r
}

fn subset_response(reply: shape::SubsetReply) -> Response {
    let mut r = json_response(StatusCode::OK, String::from_utf8(reply.body).unwrap_or_default());
    let h = r.headers_mut();
    h.insert("electric-snapshot", HeaderValue::from_static("true"));
    h.insert("electric-handle", header_value(&reply.handle));
    h.insert("electric-offset", header_value(&reply.offset.to_string()));
    h.insert("electric-schema", header_value(&reply.schema));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

async fn apply_body_fault(mut response: Response, fault: Fault) -> Response {
    match fault {
        Fault::MissingHeader(which) => {
            response.headers_mut().remove(which.name());
            response
        }
        Fault::MalformedJson => {
            *response.body_mut() = Body::from(r#"[{"key":"\"public\".\"broken"#);
            response
        }
        Fault::DropMidBody => {
            let body = body_bytes(&mut response).await;
            let half = body.slice(..body.len() / 2);
            // The pause lets hyper flush the headers and the first half before the abort.
            let parts = futures::stream::iter([Ok(half), Err(())]).then(|part| async move {
                match part {
                    Ok(bytes) => Ok(bytes),
                    Err(()) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Err(std::io::Error::other("connection dropped (injected fault)"))
                    }
                }
            });
            *response.body_mut() = Body::from_stream(parts);
            response
        }
        Fault::Trickle { bytes, delay } => {
            let body = body_bytes(&mut response).await;
            let step = bytes.max(1);
            let pieces: Vec<Bytes> =
                (0..body.len()).step_by(step).map(|i| body.slice(i..(i + step).min(body.len()))).collect();
            let stream =
                futures::stream::iter(pieces.into_iter().enumerate()).then(move |(i, piece)| async move {
                    if i > 0 {
                        tokio::time::sleep(delay).await;
                    }
                    Ok::<_, std::io::Error>(piece)
                });
            *response.body_mut() = Body::from_stream(stream);
            response
        }
        _ => response,
    }
}

async fn body_bytes(response: &mut Response) -> Bytes {
    let body = std::mem::replace(response.body_mut(), Body::empty());
    axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default()
}
