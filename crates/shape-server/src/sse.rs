//! Server-Sent Events (`live=true&live_sse=true`, spec §6.4), following Electric's
//! `shapes/api.ex`:
//! - a request with a backlog gets the log from its offset up to the end of that chunk as
//!   ONE event-stream response that then closes, with `up-to-date` only if the chunk reaches
//!   the shape's head (`do_serve_shape_log`: only `live? && Enum.take(log, 1) == []` goes on
//!   to `handle_live_request`; `encode_log` SSE-encodes the finite stream);
//! - a request at the head streams: on each change of the shape the log from the last sent
//!   offset up to the end of its chunk, with `up-to-date` only when the chunk reaches the
//!   head (`stream_sse_events` / `next_sse_event` with `determine_log_chunk_offset` and
//!   `determine_up_to_date`), `: keep-alive` comments after `sse_keepalive` of silence, and
//!   the end after `sse_timeout` with no final message (`{:sse_timeout, ref}` → mode `:done`);
//! - rotation or truncate end the stream silently (`{ref, :shape_rotation}` → `:done`); the
//!   reconnect gets the 409;
//! - an offset beyond the shape's log is held like a live request and the stream closes
//!   silently after the out-of-bounds wait (`do_serve_shape_log` `is_out_of_bounds` guard,
//!   `{ref, :out_of_bounds_timeout}` → `:done`) — a `200 text/event-stream`, not a 400.
//!
//! Each change notification sends at most one chunk, as in Electric: a transaction larger
//! than a chunk streams its first chunk, and the rest follows with the next change or on
//! the reconnect after `sse_timeout`. One departure: Electric computes each streamed
//! chunk's end from the request's original `offset` parameter, so once a stream has passed
//! that chunk it sends nothing more until `sse_timeout`; this server uses the last offset
//! sent, so later changes keep streaming.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use serde_json::value::RawValue;
use shapesync_core::Offset;
use tokio::time::Instant;

use crate::fault::Fault;
use crate::server::{Shared, header_value, must_refetch, next_cursor};
use crate::shape::{self, Eval, EvalFlags, RequestOffset, ShapeRequest};

/// Answers an SSE request: 409s as plain JSON before any streaming, a backlog as one
/// finite event stream, otherwise a live event stream.
pub(crate) async fn start(
    shared: &Arc<Shared>,
    req: ShapeRequest,
    flags: EvalFlags,
    fault: Option<Fault>,
) -> Response {
    let first = shape::evaluate(&mut shared.state(), &req, &flags);
    let now = Instant::now();
    let out_of_bounds = match first {
        Eval::Conflict(handle) => return must_refetch(handle),
        Eval::Reply(reply) => {
            let frames = frames_of(reply.body.render());
            let body = futures::stream::iter(frames.into_iter().map(Ok::<_, Infallible>));
            let mut r = sse_response(shared, &req, Body::from_stream(body), &reply.handle, reply.offset);
            if reply.up_to_date {
                r.headers_mut().insert("electric-up-to-date", HeaderValue::from_static(""));
            }
            return finish(r, fault);
        }
        Eval::Wait { out_of_bounds } => out_of_bounds,
        Eval::OutOfBounds => true,
    };
    let Some((handle, latest)) = shape::latest_offset(&shared.state(), &req.def) else {
        return must_refetch(None);
    };
    let since = match req.offset {
        RequestOffset::At(o) => o,
        _ => latest,
    };
    let mut deadline = now + shared.options.sse_timeout;
    if out_of_bounds {
        deadline = deadline.min(now + shared.options.out_of_bounds_wait);
    }
    let stream = SseStream {
        shared: shared.clone(),
        req: req.clone(),
        since,
        seen_latest: None,
        queued: VecDeque::new(),
        deadline,
        last_sent: now,
        chunk_bytes: flags.chunk_bytes,
    };
    let body = futures::stream::unfold(stream, |mut s| async move {
        let frame = s.next_frame().await?;
        Some((Ok::<_, Infallible>(frame), s))
    });
    // The response offset is the chunk end Electric computed for the request: the head,
    // which for an out-of-bounds offset lies below it (`determine_log_chunk_offset`).
    let offset = if out_of_bounds { latest } else { since };
    let mut r = sse_response(shared, &req, Body::from_stream(body), &handle, offset);
    if !out_of_bounds {
        // `determine_up_to_date`: the request is at the head.
        r.headers_mut().insert("electric-up-to-date", HeaderValue::from_static(""));
    }
    finish(r, fault)
}

/// A `200 text/event-stream` with Electric's live headers; `cache-control` max-age is
/// `sse_timeout` in seconds minus one (`api/response.ex` `put_cache_headers`).
fn sse_response(shared: &Shared, req: &ShapeRequest, body: Body, handle: &str, offset: Offset) -> Response {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::OK;
    let max_age = shared.options.sse_timeout.as_secs().saturating_sub(1).max(1);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, header_value(&format!("public, max-age={max_age}")));
    h.insert("electric-server", HeaderValue::from_static("shapesync-testkit"));
    h.insert("electric-handle", header_value(handle));
    h.insert("electric-offset", header_value(&offset.to_string()));
    h.insert("electric-cursor", header_value(&next_cursor(req.cursor).to_string()));
    h.insert("electric-has-data", HeaderValue::from_static("true"));
    r
}

/// Applies the only fault SSE responses support.
fn finish(mut r: Response, fault: Option<Fault>) -> Response {
    if let Some(Fault::MissingHeader(which)) = fault {
        r.headers_mut().remove(which.name());
    }
    r
}

/// One `data:` frame per message of a JSON array body.
fn frames_of(body: Vec<u8>) -> Vec<Bytes> {
    let messages: Vec<Box<RawValue>> = serde_json::from_slice(&body).unwrap_or_default();
    messages.into_iter().map(|m| Bytes::from(format!("data: {}\n\n", m.get()))).collect()
}

struct SseStream {
    shared: Arc<Shared>,
    req: ShapeRequest,
    /// The offset after which the next events start.
    since: Offset,
    /// The shape's latest offset when last looked at; a change of it is Electric's
    /// `{ref, :new_changes, latest}` notification.
    seen_latest: Option<Offset>,
    queued: VecDeque<Bytes>,
    /// `sse_timeout`, or the out-of-bounds wait if sooner.
    deadline: Instant,
    last_sent: Instant,
    chunk_bytes: usize,
}

impl SseStream {
    /// The next frame, waiting for changes; `None` ends the stream.
    async fn next_frame(&mut self) -> Option<Bytes> {
        loop {
            if let Some(frame) = self.queued.pop_front() {
                self.last_sent = Instant::now();
                return Some(frame);
            }
            if Instant::now() >= self.deadline || self.shared.cancel.is_cancelled() {
                return None;
            }
            let mut rx = self.shared.changed.subscribe();
            if !self.on_change()? {
                let keepalive = self.last_sent + self.shared.options.sse_keepalive;
                tokio::select! {
                    _ = rx.changed() => {}
                    _ = tokio::time::sleep_until(keepalive) => {
                        self.queued.push_back(Bytes::from_static(b": keep-alive\n\n"));
                    }
                    _ = tokio::time::sleep_until(self.deadline) => return None,
                    _ = self.shared.cancel.cancelled() => return None,
                }
            }
        }
    }

    /// If the shape's log grew since last looked at, queues the log after `since` up to
    /// the end of its chunk (plus `up-to-date` at the head) and returns `Some(true)`.
    /// `None` = the shape was rotated or removed: end the stream.
    fn on_change(&mut self) -> Option<bool> {
        let mut state = self.shared.state();
        let (handle, latest) = shape::latest_offset(&state, &self.req.def)?;
        if self.req.handle.as_deref().is_some_and(|h| h != handle) {
            return None;
        }
        if self.seen_latest == Some(latest) {
            return Some(false);
        }
        self.seen_latest = Some(latest);
        let req = ShapeRequest { offset: RequestOffset::At(self.since), ..self.req.clone() };
        let flags = EvalFlags {
            live_expired: false,
            out_of_bounds_expired: false,
            cut_mid_transaction: false,
            chunk_bytes: self.chunk_bytes,
        };
        match shape::evaluate(&mut state, &req, &flags) {
            Eval::Reply(reply) => {
                self.since = reply.offset;
                self.queued.extend(frames_of(reply.body.render()));
                Some(true)
            }
            // Nothing new for this shape, or the offset is still beyond the log.
            Eval::Wait { .. } | Eval::OutOfBounds => Some(false),
            Eval::Conflict(_) => None,
        }
    }
}
