//! Server-Sent Events (`live=true&live_sse=true`, spec §6.4): headers first, then each
//! message as `data: <json>\n\n`, `: keep-alive` comments after silence, closed after
//! `sse_timeout` or silently on rotation (the reconnect then gets the 409).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::fault::Fault;
use crate::server::{
    Shared, current_handle, header_value, invalid, must_refetch, next_cursor, wait_for_reply,
};
use crate::shape::{self, Eval, EvalFlags, RequestOffset, ShapeRequest};

/// Answers an SSE request: errors and 409s as plain JSON before any streaming.
pub(crate) async fn start(
    shared: &Arc<Shared>,
    req: ShapeRequest,
    flags: EvalFlags,
    fault: Option<Fault>,
) -> Response {
    let first = shape::evaluate(&mut shared.state(), &req, &flags);
    let first = match first {
        Eval::Reply(reply) => Some(reply),
        Eval::Conflict(handle) => return must_refetch(handle),
        Eval::Wait { out_of_bounds: false } => None,
        Eval::Wait { out_of_bounds: true } | Eval::OutOfBounds => {
            let flags = EvalFlags { live_expired: true, ..flags };
            match wait_for_reply(shared, &req, flags).await {
                Eval::Reply(reply) => Some(reply),
                Eval::Conflict(handle) => return must_refetch(handle),
                _ => return invalid("offset", "out of bounds for this shape"),
            }
        }
    };
    let Some(handle) = current_handle(shared, &req.def) else { return must_refetch(None) };
    let mut stream = SseStream {
        shared: shared.clone(),
        req: req.clone(),
        queued: VecDeque::new(),
        deadline: Instant::now() + shared.options.sse_timeout,
        last_sent: Instant::now(),
        chunk_bytes: flags.chunk_bytes,
    };
    if let Some(reply) = first {
        stream.enqueue(reply);
    }
    let body = futures::stream::unfold(stream, |mut s| async move {
        let frame = s.next_frame().await?;
        Some((Ok::<_, Infallible>(frame), s))
    });
    let mut r = Response::new(Body::from_stream(body));
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=59"));
    h.insert("electric-server", HeaderValue::from_static("shapesync-testkit"));
    h.insert("electric-handle", header_value(&handle));
    h.insert("electric-offset", header_value(&req.offset.to_string()));
    h.insert("electric-cursor", header_value(&next_cursor(req.cursor).to_string()));
    if let Some(Fault::MissingHeader(which)) = fault {
        h.remove(which.name());
    }
    r
}

struct SseStream {
    shared: Arc<Shared>,
    req: ShapeRequest,
    queued: VecDeque<Bytes>,
    deadline: Instant,
    last_sent: Instant,
    chunk_bytes: usize,
}

impl SseStream {
    /// Queues one `data:` frame per message of `reply` and moves the stream's offset on.
    fn enqueue(&mut self, reply: shape::Reply) {
        let body = reply.body.render();
        let messages: Vec<Box<RawValue>> = serde_json::from_slice(&body).unwrap_or_default();
        for m in messages {
            self.queued.push_back(Bytes::from(format!("data: {}\n\n", m.get())));
        }
        self.req.offset = RequestOffset::At(reply.offset);
    }

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
            let flags = EvalFlags {
                live_expired: false,
                out_of_bounds_expired: true,
                cut_mid_transaction: false,
                chunk_bytes: self.chunk_bytes,
            };
            let eval = shape::evaluate(&mut self.shared.state(), &self.req, &flags);
            match eval {
                Eval::Reply(reply) => self.enqueue(reply),
                Eval::Wait { .. } => {
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
                // Rotation, truncate or out of bounds: close silently; the reconnect gets the error.
                Eval::Conflict(_) | Eval::OutOfBounds => return None,
            }
        }
    }
}
