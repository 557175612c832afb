//! What keeps a [`ShapeStream`] from looping or hammering the server: backoff after
//! transient faults, the fast-loop detector, stale (expired or foreign) handles, the
//! table-gone check, and resets to `offset=-1` with their own backoff.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use reqwest::header::HeaderMap;
use shapesync_core::Offset;

use super::long_poll::header_str;
use super::{ShapeEvent, ShapeStream, headers};
use crate::backoff::{Backoff, parse_retry_after};
use crate::{BackoffConfig, ShapeError};

/// Retries with a fresh `cache-buster` when a response carries an expired handle.
const STALE_RETRIES: u32 = 3;
/// Non-advancing non-live responses within [`FAST_LOOP_WINDOW`] that count as a loop.
const FAST_LOOP_REQUESTS: usize = 5;
/// The window of the fast-loop detector.
const FAST_LOOP_WINDOW: Duration = Duration::from_millis(500);
/// Fast loops detected before the stream gives up.
const FAST_LOOP_LIMIT: u32 = 5;
/// Expired handles remembered.
const EXPIRED_HANDLES_KEPT: usize = 16;

/// The stream's backoff, loop and reset bookkeeping.
#[derive(Debug)]
pub(super) struct Guards {
    /// Full-jitter backoff after transient faults (and repeated resets).
    pub(super) backoff: Backoff,
    /// A wait owed before the next request (a reset in a row, a fast loop, a short
    /// SSE close).
    pub(super) pending_delay: Option<Duration>,
    /// Non-advancing non-live responses per offset.
    pub(super) fast_loop: FastLoop,
    /// Handles caches must not serve us, and the retries spent on them.
    stale: StaleHandles,
    /// Malformed bodies (or SSE events) in a row.
    pub(super) malformed_bodies: u32,
    /// Resets since the last good response; from the second on, the stream backs off.
    pub(super) resets_since_success: u32,
    /// Responses in a row whose `electric-schema` was `null` (the table is gone).
    schemaless: u32,
}

/// Expired handles and the stale-response retries.
#[derive(Debug, Default)]
struct StaleHandles {
    /// Handles we saw expire (409, `must-refetch`), newest last.
    expired: VecDeque<String>,
    /// The last one, sent as `expired_handle` on `offset=-1` requests.
    to_send: Option<String>,
    /// Stale responses in a row, each retried with a cache-buster.
    retries: u32,
    /// The stream reset once for stale responses and has not been up to date since.
    self_healed: bool,
}

impl Guards {
    pub(super) fn new(backoff: BackoffConfig) -> Self {
        Guards {
            backoff: Backoff::new(backoff),
            pending_delay: None,
            fast_loop: FastLoop::default(),
            stale: StaleHandles::default(),
            malformed_bodies: 0,
            resets_since_success: 0,
            schemaless: 0,
        }
    }

    /// The handle to send as `expired_handle`, if any.
    pub(super) fn expired_handle_to_send(&self) -> Option<&str> {
        self.stale.to_send.as_deref()
    }

    /// A long-poll response was accepted: every fault count starts over.
    pub(super) fn on_accepted_response(&mut self, up_to_date: bool) {
        self.backoff.reset();
        self.malformed_bodies = 0;
        self.stale.retries = 0;
        self.resets_since_success = 0;
        self.schemaless = 0;
        if up_to_date {
            self.stale.self_healed = false;
            self.fast_loop.detections = 0;
        }
    }

    /// An SSE batch was handed on (see [`ShapeStream::sse_flush`]).
    pub(super) fn on_sse_flush(&mut self) {
        self.malformed_bodies = 0;
        self.backoff.reset();
        self.resets_since_success = 0;
        self.stale.self_healed = false;
    }
}

impl ShapeStream {
    /// Whether a response's handle cannot answer this request: one we saw expire (a
    /// stale cache), or, mid-shape, another than requested (offsets of two handles
    /// must never mix).
    pub(super) fn is_foreign_handle(&self, handle: &str) -> bool {
        if self.guards.stale.expired.iter().any(|h| h == handle) {
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
    pub(super) fn on_stale_response(&mut self, handle: String) -> Result<Option<ShapeEvent>, ShapeError> {
        let stale = &mut self.guards.stale;
        stale.retries += 1;
        if stale.retries <= STALE_RETRIES {
            tracing::warn!(attempt = stale.retries, "retrying with a cache-buster");
            self.cache_buster = Some(new_cache_buster());
            return Ok(None);
        }
        if !stale.self_healed {
            tracing::warn!("caches keep serving the wrong shape handle; resetting the stream once");
            stale.self_healed = true;
            stale.retries = 0;
            stale.expired.retain(|h| *h != handle);
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
    pub(super) fn on_table_gone(&mut self) -> Result<ShapeEvent, ShapeError> {
        self.guards.schemaless += 1;
        if self.guards.schemaless > 1 {
            self.guards.schemaless = 0;
            return Err(ShapeError::TableGone { table: self.options.table.clone() });
        }
        tracing::warn!(table = %self.options.table, "the server has no schema for the table (dropped?); refetching the shape");
        Ok(self.reset(None, true))
    }

    /// Records a non-advancing response at `offset`; when that completes a fast loop,
    /// the event to yield instead of the response (see [`Self::on_fast_loop`]).
    pub(super) fn check_fast_loop(&mut self, offset: Offset) -> Option<Result<ShapeEvent, ShapeError>> {
        self.guards.fast_loop.record(offset).then(|| self.on_fast_loop())
    }

    /// Non-live requests keep returning the same offset: the first time reset the
    /// stream, then back off, and after [`FAST_LOOP_LIMIT`] give up.
    fn on_fast_loop(&mut self) -> Result<ShapeEvent, ShapeError> {
        let n = self.guards.fast_loop.detections;
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
        let delay = self.guards.backoff.next_delay(None);
        tracing::warn!(?delay, "non-live requests are still not advancing; backing off");
        self.guards.pending_delay = Some(delay);
        self.live = false;
        Ok(self.empty_response(self.offset.unwrap_or(Offset::Start), false))
    }

    /// A move-out came for rows whose tags this stream never saw (it resumed from a
    /// stored position): which of them left is unknown, so the shape is read again from
    /// `offset=-1` under the same handle, and the consumer resyncs from that snapshot.
    pub(super) fn refetch_for_unknown_tags(&mut self) -> ShapeEvent {
        tracing::info!(
            "a move-out arrived for rows synced before this stream resumed (their subquery tags are not known); refetching the shape so the rows that left are removed exactly"
        );
        let handle = self.handle.clone();
        self.reset(handle, false)
    }

    /// Back to `offset=-1`, with a fresh cache-buster so no cached response is reused.
    /// `expire_old`: the old handle is remembered as expired (a 409, `must-refetch`).
    pub(super) fn reset(&mut self, new_handle: Option<String>, expire_old: bool) -> ShapeEvent {
        if let Some(old) = self.handle.take()
            && expire_old
            && new_handle.as_ref() != Some(&old)
        {
            let stale = &mut self.guards.stale;
            if stale.expired.len() >= EXPIRED_HANDLES_KEPT {
                stale.expired.pop_front();
            }
            stale.expired.push_back(old.clone());
            stale.to_send = Some(old);
        }
        self.handle = new_handle.clone();
        self.offset = Some(Offset::Start);
        self.live = false;
        self.sse.connection = None;
        self.last_position = None;
        self.schema = None;
        self.schema_text = None;
        self.tags.reset(true);
        self.cache_buster = Some(new_cache_buster());
        self.guards.fast_loop.times.clear();
        self.guards.resets_since_success += 1;
        if self.guards.resets_since_success > 1 {
            // Resets with no good response in between: don't hammer the server.
            self.guards.pending_delay = Some(self.guards.backoff.next_delay(None));
        }
        ShapeEvent::MustRefetch { new_handle }
    }

    /// The server's `retry-after`, when it sent one.
    pub(super) fn retry_after(&self, header_map: &HeaderMap) -> Option<Duration> {
        header_str(header_map, headers::RETRY_AFTER).and_then(|v| parse_retry_after(v, SystemTime::now()))
    }

    /// Waits out a transient fault (`what`, for the log) with backoff, at least
    /// `retry_after`; the next request is at the same offset.
    pub(super) async fn wait_after_fault(&mut self, what: &str, retry_after: Option<Duration>) {
        let delay = self.guards.backoff.next_delay(retry_after);
        tracing::warn!(
            failures = self.guards.backoff.failures(),
            delay_ms = delay.as_millis() as u64,
            "shape request failed ({what}); retrying at the same offset"
        );
        tokio::time::sleep(delay).await;
    }
}

/// A unique `cache-buster` value: the time in ms and 64 random bits.
pub(super) fn new_cache_buster() -> String {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis();
    format!("{now}-{:016x}", rand::rng().random::<u64>())
}

/// Describes a transport failure without the URL (which may hold secrets).
pub(super) fn describe_reqwest_error(e: &reqwest::Error) -> String {
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

/// Counts non-advancing non-live responses per offset.
#[derive(Debug, Default)]
pub(super) struct FastLoop {
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn cache_busters_are_unique() {
        let a: std::collections::HashSet<String> = (0..1000).map(|_| new_cache_buster()).collect();
        assert_eq!(a.len(), 1000);
    }
}
