//! Live changes over Server-Sent Events: the open connection, its framing, the
//! changes buffered up to `up-to-date`, how a connection ends, and the fallback to
//! long-polling when connections keep closing at once (a buffering proxy).

use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::Response;
use reqwest::header::HeaderMap;
use shapesync_core::{Change, Offset, SourceResponse};

use super::guards::describe_reqwest_error;
use super::long_poll::{header_str, header_text, max_response_bytes_setting};
use super::{ShapeEvent, ShapeStream, headers};
use crate::ShapeError;
use crate::message::{BodyError, Message, parse_message};
use crate::tags::{Mark, Resolution};

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

/// The stream's SSE state: the open connection, if any, and whether the next live
/// request may use SSE.
#[derive(Default)]
pub(super) struct SseState {
    /// The open connection, read by [`ShapeStream::read_sse`].
    pub(super) connection: Option<SseConnection>,
    /// Short closes in a row.
    short_closes: u32,
    /// The last SSE connection ended having delivered nothing: the next live request
    /// is a long-poll (which gets the real answer: data, or the out-of-bounds 400).
    pub(super) poll_next: bool,
    /// Long-polling instead of SSE since short closes piled up (a buffering proxy?).
    fallback: Option<SseFallback>,
}

/// Long-polling for a while after SSE connections kept closing at once.
#[derive(Debug, Clone, Copy)]
struct SseFallback {
    since: Instant,
    /// Good long-polls since.
    polls: u32,
}

/// An open SSE response and the messages read from it since the last `up-to-date`.
pub(super) struct SseConnection {
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

/// Whether a response is an SSE stream (`content-type: text/event-stream`).
pub(super) fn is_event_stream(map: &HeaderMap) -> bool {
    header_str(map, "content-type").is_some_and(|t| t.trim_start().starts_with("text/event-stream"))
}

/// What reading the connection for the next event's data came to.
enum SseRead {
    /// The data of one event.
    Data(Vec<u8>),
    /// The connection is gone; yield this (`None`: reconnect).
    Ended(Option<ShapeEvent>),
}

/// What one SSE message leads to.
enum SseStep {
    /// Read the next message.
    ReadOn,
    /// Yield this event (the connection may stay open).
    Yield(ShapeEvent),
    /// The connection is gone: reconnect.
    Reconnect,
}

impl ShapeStream {
    /// Keeps an SSE response open as the live connection (unless a cache served it).
    pub(super) fn open_sse(
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
        self.credentials.auth_failures = 0;
        self.cache_buster = None;
        if let Some(cursor) = header_text(header_map, headers::CURSOR)? {
            self.cursor = Some(cursor.to_owned());
        }
        self.sse.connection = Some(SseConnection::new(response));
        Ok(None)
    }

    /// Reads the open SSE connection up to the next `up-to-date`. `None` means the
    /// connection ended (or failed) and the caller should reconnect.
    pub(super) async fn read_sse(&mut self) -> Result<Option<ShapeEvent>, ShapeError> {
        loop {
            let data = match self.next_sse_data().await {
                SseRead::Data(data) => data,
                SseRead::Ended(event) => return Ok(event),
            };
            match self.on_sse_message(&data).await? {
                SseStep::ReadOn => {}
                SseStep::Yield(event) => return Ok(Some(event)),
                SseStep::Reconnect => return Ok(None),
            }
        }
    }

    /// The data of the next SSE event, reading the connection as needed (each silence
    /// bounded by the request timeout, the event by `max_response_bytes`).
    async fn next_sse_data(&mut self) -> SseRead {
        let idle = self.options.request_timeout;
        loop {
            let Some(conn) = self.sse.connection.as_mut() else { return SseRead::Ended(None) };
            if let Some(data) = conn.events.next_data() {
                return SseRead::Data(data);
            }
            let max_bytes = self.options.max_response_bytes;
            if conn.events.pending_bytes() as u64 > max_bytes {
                self.close_sse();
                let what = format!("an SSE event is larger than {}", max_response_bytes_setting(max_bytes));
                self.wait_after_fault(&what, None).await;
                return SseRead::Ended(None);
            }
            match tokio::time::timeout(idle, conn.response.chunk()).await {
                Ok(Ok(Some(bytes))) => conn.events.push(&bytes),
                Ok(Ok(None)) => {
                    tracing::debug!("SSE connection closed; reconnecting");
                    return SseRead::Ended(self.end_sse());
                }
                Ok(Err(e)) => {
                    let event = self.end_sse();
                    if event.is_none() {
                        self.wait_after_fault(&describe_reqwest_error(&e), None).await;
                    }
                    return SseRead::Ended(event);
                }
                Err(_) => {
                    tracing::warn!("SSE connection silent for {idle:?}; reconnecting");
                    return SseRead::Ended(self.end_sse());
                }
            }
        }
    }

    /// Handles one SSE event's data: a change or a move is buffered until
    /// `up-to-date` (or until `max_response_bytes` of them); `up-to-date` and
    /// `must-refetch` yield at once.
    async fn on_sse_message(&mut self, data: &[u8]) -> Result<SseStep, ShapeError> {
        let schema = self.schema.clone().unwrap_or_default();
        let (mut changes, marks, is_move) = match parse_message(data, &schema) {
            Ok(Message::Change(change, tags)) => {
                if change.position.is_some() && change.position <= self.last_position {
                    tracing::trace!("skipping an op already delivered before the SSE reconnect");
                    return Ok(SseStep::ReadOn);
                }
                (vec![change], tags.map(|t| vec![(0, Mark::Tags(t))]).unwrap_or_default(), false)
            }
            // A move event becomes deletes (a move-out) of rows held.
            Ok(Message::Move(event)) => (Vec::new(), vec![(0, Mark::Move(event))], true),
            Ok(Message::UpToDate(global_lsn)) => return Ok(SseStep::Yield(self.sse_flush(true, global_lsn))),
            Ok(Message::MustRefetch) => return Ok(SseStep::Yield(self.reset(None, true))),
            Ok(Message::Ignored) => return Ok(SseStep::ReadOn),
            Err(BodyError::Invalid(detail)) => {
                self.sse.connection = None;
                return Err(ShapeError::Protocol(detail));
            }
            Err(BodyError::Malformed(detail)) => {
                self.close_sse();
                self.guards.malformed_bodies += 1;
                if self.guards.malformed_bodies > self.options.malformed_body_retries {
                    return Err(ShapeError::Protocol(format!(
                        "{detail}, {} times in a row",
                        self.guards.malformed_bodies
                    )));
                }
                self.wait_after_fault(&detail, None).await;
                return Ok(SseStep::Reconnect);
            }
        };
        match self.tags.apply(&mut changes, marks, &schema) {
            Ok(Resolution::Resolved) if is_move => self.count_moves(),
            Ok(Resolution::Resolved) => {}
            Ok(Resolution::Unknown) => return Ok(SseStep::Yield(self.refetch_for_unknown_tags())),
            Err(detail) => return Err(ShapeError::Protocol(detail)),
        }
        let Some(conn) = self.sse.connection.as_mut() else { return Ok(SseStep::Reconnect) };
        conn.changes.append(&mut changes);
        // The bytes of changes count towards the cap (a move's deletes are not sent).
        if !is_move {
            conn.buffered_bytes += data.len() as u64;
            if conn.buffered_bytes > self.options.max_response_bytes {
                // A server that never says up-to-date must not fill memory: hand what
                // arrived on, as a long-poll response cut short would be.
                return Ok(SseStep::Yield(self.sse_flush(false, None)));
            }
        }
        Ok(SseStep::ReadOn)
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
        let conn = self.sse.connection.as_ref()?;
        let event = (!conn.changes.is_empty()).then(|| self.sse_flush(false, None));
        let conn = self.sse.connection.take()?;
        if !conn.progressed {
            tracing::debug!("the SSE connection ended having moved nothing on; long-polling once");
            self.sse.poll_next = true;
        }
        // A connection cut with changes pending is the server's backlog chunk, which
        // closes at once by design: no sign of a buffering proxy.
        self.note_sse_closed(conn.opened, event.is_some());
        event
    }

    /// An SSE `up-to-date` (or `max_response_bytes` of changes without one): yields the
    /// buffered changes with the resume offset max(last change's `<lsn>_<op>`,
    /// `<global_last_seen_lsn>_0`) (spec §6.4).
    pub(super) fn sse_flush(&mut self, up_to_date: bool, global_lsn: Option<u64>) -> ShapeEvent {
        let changes = self
            .sse
            .connection
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
        if let Some(conn) = self.sse.connection.as_mut() {
            // Progress: the offset moved, or the server confirmed the head.
            conn.progressed |= advanced || up_to_date;
        }
        self.guards.on_sse_flush();
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
        let Some(conn) = self.sse.connection.take() else { return };
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
            self.sse.short_closes = 0;
            return;
        }
        if exempt {
            return;
        }
        self.sse.short_closes += 1;
        if self.sse.short_closes >= SSE_SHORT_CLOSES {
            tracing::warn!(
                "SSE connections keep closing at once (a buffering proxy? nginx needs `X-Accel-Buffering: no`); long-polling for a while"
            );
            self.sse.fallback = Some(SseFallback { since: Instant::now(), polls: 0 });
            return;
        }
        let factor = 1u32 << self.sse.short_closes.min(16);
        let ceiling = SSE_BACKOFF_BASE.saturating_mul(factor).min(SSE_BACKOFF_CAP);
        let delay = Duration::from_secs_f64(rand::rng().random_range(0.0..=ceiling.as_secs_f64()));
        let pending = &mut self.guards.pending_delay;
        *pending = Some(pending.map_or(delay, |d| d.max(delay)));
    }

    /// Whether the next live request may use SSE (see [`ShapeStream::end_sse`] and
    /// [`ShapeStream::note_sse_closed`]).
    pub(super) fn sse_allowed(&mut self) -> bool {
        if self.sse.poll_next {
            return false;
        }
        if let Some(fallback) = self.sse.fallback {
            if fallback.since.elapsed() < SSE_FALLBACK_TIME && fallback.polls < SSE_FALLBACK_POLLS {
                return false;
            }
            tracing::info!("trying SSE again after long-polling for a while");
            self.sse.fallback = None;
            self.sse.short_closes = 0;
        }
        true
    }

    /// A live long-poll succeeded: SSE may follow again.
    pub(super) fn on_long_poll_success(&mut self) {
        self.sse.poll_next = false;
        if let Some(fallback) = self.sse.fallback.as_mut() {
            fallback.polls += 1;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
