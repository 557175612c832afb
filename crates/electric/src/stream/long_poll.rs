//! One plain (non-SSE) HTTP response: its status, its body read within bounds, its
//! protocol headers, and a 2xx/304 turned into a [`ShapeEvent`] and committed to the
//! stream's position.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Response, StatusCode};
use shapesync_core::{Change, Offset, Schema, SourceResponse};

use super::guards::describe_reqwest_error;
use super::metrics::status_class;
use super::sse::is_event_stream;
use super::{Answered, ShapeEvent, ShapeStream, headers};
use crate::ShapeError;
use crate::message::{BodyError, ParsedBody, parse_body};
use crate::tags::Resolution;

/// The protocol headers of a 2xx response with a body.
struct ShapeHeaders<'a> {
    handle: &'a str,
    /// The end of the chunk: the next request's offset.
    offset: Offset,
    cursor: Option<&'a str>,
    schema_text: Option<&'a str>,
}

impl<'a> ShapeHeaders<'a> {
    /// Reads them, in the order the checks have always run: a live response needs a
    /// cursor, a non-live one a schema.
    fn read(header_map: &'a HeaderMap, status: u16, live: bool) -> Result<Self, ShapeError> {
        let handle = header_text(header_map, headers::HANDLE)?
            .ok_or(ShapeError::MissingHeader { header: headers::HANDLE, status })?;
        let offset_text = header_text(header_map, headers::OFFSET)?
            .ok_or(ShapeError::MissingHeader { header: headers::OFFSET, status })?;
        let offset: Offset = offset_text
            .parse()
            .map_err(|e| ShapeError::protocol(format!("bad `{}` header: {e}", headers::OFFSET)))?;
        let cursor = header_text(header_map, headers::CURSOR)?;
        if live && cursor.is_none() {
            return Err(ShapeError::MissingHeader { header: headers::CURSOR, status });
        }
        let schema_text = header_text(header_map, headers::SCHEMA)?;
        if !live && schema_text.is_none() {
            return Err(ShapeError::MissingHeader { header: headers::SCHEMA, status });
        }
        Ok(ShapeHeaders { handle, offset, cursor, schema_text })
    }
}

impl ShapeStream {
    /// Handles the response to one request. `None` means "request again" (a fault was
    /// waited out, a guard fired, or an SSE connection was opened to be read).
    pub(super) async fn on_response(&mut self, answered: Answered) -> Result<Option<ShapeEvent>, ShapeError> {
        let Answered { response, live, sse } = answered;
        let status = response.status();
        self.count_request(status_class(status));
        tracing::debug!(status = status.as_u16(), "shape response");
        if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
            // The client follows none (see `new`): a redirect is a misconfigured `url`.
            return Err(ShapeError::Redirected { status: status.as_u16() });
        }
        let header_map = response.headers().clone();
        if sse && status.is_success() && is_event_stream(&header_map) {
            return self.open_sse(response, &header_map);
        }
        let body = match self.read_response_body(response, live).await {
            Ok(body) => body,
            Err(what) => {
                let retry_after = self.retry_after(&header_map);
                self.wait_after_fault(&what, retry_after).await;
                return Ok(None);
            }
        };
        if status.is_success() || status == StatusCode::NOT_MODIFIED {
            return self.on_success(status, &header_map, &body, live).await;
        }
        self.on_error_status(status, &header_map, &body).await
    }

    /// Reads a plain response's body. A live body must arrive within the request
    /// timeout; a non-live one may take as long as it needs while bytes keep coming
    /// (`idle_timeout`). A stalled body is a transport fault, and so is one over the
    /// cap (counted decoded, after gzip): the error describes it for the log.
    async fn read_response_body(&self, response: Response, live: bool) -> Result<Vec<u8>, String> {
        let max_bytes = self.options.max_response_bytes;
        let timeout = self.options.request_timeout;
        let read = if live {
            match tokio::time::timeout(timeout, read_body(response, max_bytes, None)).await {
                Ok(result) => result,
                Err(_) => Err(BodyReadError::Late(timeout)),
            }
        } else {
            read_body(response, max_bytes, Some(self.options.idle_timeout)).await
        };
        read.map_err(|e| match e {
            BodyReadError::Transport(e) => describe_reqwest_error(&e),
            BodyReadError::TooLarge { declared } => too_large(declared, max_bytes),
            BodyReadError::Stalled(idle) => format!("no bytes of the response body arrived for {idle:?}"),
            BodyReadError::Late(after) => format!("the response body did not arrive within {after:?}"),
        })
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
            return self.on_nothing_new(code, header_map, live).map(Some);
        }
        let shape_headers = ShapeHeaders::read(header_map, code, live)?;
        if self.is_foreign_handle(shape_headers.handle) {
            return self.on_stale_response(shape_headers.handle.to_owned());
        }
        if shape_headers.schema_text.is_some_and(|text| text.trim() == "null") {
            return self.on_table_gone().map(Some);
        }
        let schema = self.response_schema(shape_headers.schema_text)?;
        let Some(parsed) = self.parse_response_body(body, &schema, header_map).await? else {
            return Ok(None);
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
        self.accept_response(shape_headers, schema, changes, parsed.up_to_date, live)
    }

    /// A 204 (a deprecated live timeout) or a 304 (a revalidated cache hit): nothing
    /// new, at the stream's offset.
    fn on_nothing_new(
        &mut self,
        code: u16,
        header_map: &HeaderMap,
        live: bool,
    ) -> Result<ShapeEvent, ShapeError> {
        self.guards.backoff.reset();
        self.credentials.auth_failures = 0;
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
        if !up_to_date && let Some(event) = self.check_fast_loop(offset) {
            return event;
        }
        self.live = up_to_date;
        Ok(ShapeEvent::Response(SourceResponse {
            changes: Vec::new(),
            handle,
            offset,
            schema: self.schema.clone().unwrap_or_default(),
            up_to_date,
        }))
    }

    /// The schema a response's rows are typed by: its `electric-schema` when that
    /// changed (parsed), else the one in force.
    fn response_schema(&self, schema_text: Option<&str>) -> Result<Arc<Schema>, ShapeError> {
        Ok(match schema_text {
            Some(text) if self.schema_text.as_deref() != Some(text) || self.schema.is_none() => {
                let parsed: Schema = serde_json::from_str(text)
                    .map_err(|e| ShapeError::protocol(format!("bad `{}` header: {e}", headers::SCHEMA)))?;
                Arc::new(parsed)
            }
            _ => self.schema.clone().unwrap_or_default(),
        })
    }

    /// Parses a response body. A malformed one (not JSON: a proxy's page?) is waited
    /// out and retried (`None`) up to `malformed_body_retries` times in a row; an
    /// invalid one (JSON that breaks the protocol) ends the stream.
    async fn parse_response_body(
        &mut self,
        body: &[u8],
        schema: &Schema,
        header_map: &HeaderMap,
    ) -> Result<Option<ParsedBody>, ShapeError> {
        match parse_body(body, schema) {
            Ok(parsed) => Ok(Some(parsed)),
            Err(BodyError::Invalid(detail)) => Err(ShapeError::Protocol(detail)),
            Err(BodyError::Malformed(detail)) => {
                self.guards.malformed_bodies += 1;
                if self.guards.malformed_bodies > self.options.malformed_body_retries {
                    return Err(ShapeError::Protocol(format!(
                        "{detail}, {} times in a row",
                        self.guards.malformed_bodies
                    )));
                }
                let retry_after = self.retry_after(header_map);
                self.wait_after_fault(&detail, retry_after).await;
                Ok(None)
            }
        }
    }

    /// The response is good: commits it to the stream's position and yields it (or,
    /// when non-live requests stopped advancing, the fast-loop guard's event).
    fn accept_response(
        &mut self,
        shape_headers: ShapeHeaders<'_>,
        schema: Arc<Schema>,
        changes: Vec<Change>,
        reached_head: bool,
        live: bool,
    ) -> Result<Option<ShapeEvent>, ShapeError> {
        let ShapeHeaders { handle, offset, cursor, schema_text } = shape_headers;
        self.guards.on_accepted_response(reached_head);
        self.credentials.auth_failures = 0;
        // A cache-buster is for the request after a reset or a stale response only
        // (TS: `client.ts` `#requestShape` passes it to that one request).
        self.cache_buster = None;
        if live {
            self.on_long_poll_success();
        }
        let request_offset = self.offset;
        // A chunk ending at `-1` holds no snapshot: it cannot complete a (re)sync.
        let up_to_date = reached_head && offset != Offset::Start;
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
        if !live
            && !up_to_date
            && request_offset == Some(offset)
            && let Some(event) = self.check_fast_loop(offset)
        {
            return event.map(Some);
        }
        Ok(Some(ShapeEvent::Response(SourceResponse {
            changes,
            handle: handle.to_owned(),
            offset,
            schema,
            up_to_date,
        })))
    }
}

/// A protocol header's value as text; `Ok(None)` when it is absent. Read as UTF-8 from
/// the raw bytes: Electric's JSON encoder leaves non-ASCII (say a column named `ünï`
/// in `electric-schema`) unescaped, which `HeaderValue::to_str` would refuse.
pub(super) fn header_text<'a>(map: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, ShapeError> {
    let Some(value) = map.get(name) else { return Ok(None) };
    std::str::from_utf8(value.as_bytes())
        .map(Some)
        .map_err(|_| ShapeError::protocol(format!("the `{name}` header is not valid UTF-8")))
}

/// An optional header's value as text; `None` when it is absent or not UTF-8.
pub(super) fn header_str<'a>(map: &'a HeaderMap, name: &'static str) -> Option<&'a str> {
    header_text(map, name).ok().flatten()
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
pub(super) fn max_response_bytes_setting(max_bytes: u64) -> String {
    format!(
        "`max_response_bytes` ({max_bytes} bytes; raise it if the shape has rows or transactions that large)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
