//! SSE live mode (spec §6.4, case 21). The testkit answers `live_sse` as a long-poll,
//! so the SSE framing, reconnect and fallback cases run against a small scripted SSE
//! server defined here; the last test checks the long-poll answer from the testkit.

mod support;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::get;
use serde_json::json;
use shapesync_core::Offset;
use shapesync_electric::{ShapeOptions, ShapeStream};
use support::*;

const SCHEMA: &str = r#"{"id":{"type":"int8","pk_index":0,"not_null":true}}"#;
const HANDLE: &str = "1234-5678";

/// One scripted answer.
enum Reply {
    /// A JSON response with these Electric headers.
    Json { offset: &'static str, cursor: Option<&'static str>, body: String },
    /// An SSE stream of these frames; `hold` keeps it open afterwards.
    Sse { frames: Vec<String>, hold: bool },
}

#[derive(Default)]
struct Script {
    replies: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<Vec<(String, String)>>>,
}

impl Script {
    fn param(&self, request: usize, name: &str) -> Option<String> {
        let log = self.requests.lock().unwrap();
        log[request].iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }
}

async fn shape(State(script): State<Arc<Script>>, RawQuery(query): RawQuery) -> Response {
    let query = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()).into_owned().collect();
    script.requests.lock().unwrap().push(query);
    let reply = script.replies.lock().unwrap().pop_front();
    let mut response = match reply {
        None => {
            let mut r = Response::new(Body::from("{\"message\":\"unscripted\"}"));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            return r;
        }
        Some(Reply::Json { offset, cursor, body }) => {
            let mut r = Response::new(Body::from(body.clone()));
            let h = r.headers_mut();
            h.insert("content-type", HeaderValue::from_static("application/json"));
            h.insert("electric-offset", HeaderValue::from_static(offset));
            match cursor {
                Some(c) => h.insert("electric-cursor", HeaderValue::from_static(c)),
                None => h.insert("electric-schema", HeaderValue::from_static(SCHEMA)),
            };
            r
        }
        Some(Reply::Sse { frames, hold }) => {
            let chunks =
                futures::stream::iter(frames.into_iter().map(|f| Ok::<_, Infallible>(Bytes::from(f))));
            let body = if hold {
                Body::from_stream(futures::StreamExt::chain(chunks, futures::stream::pending()))
            } else {
                Body::from_stream(chunks)
            };
            let mut r = Response::new(body);
            let h = r.headers_mut();
            h.insert("content-type", HeaderValue::from_static("text/event-stream"));
            h.insert("electric-offset", HeaderValue::from_static("0_inf"));
            h.insert("electric-cursor", HeaderValue::from_static("100"));
            r
        }
    };
    response.headers_mut().insert("electric-handle", HeaderValue::from_static(HANDLE));
    response
}

async fn scripted(replies: Vec<Reply>) -> (Arc<Script>, ShapeStream, tokio::task::JoinHandle<()>) {
    let script = Arc::new(Script { replies: Mutex::new(replies.into()), ..Script::default() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/v1/shape", get(shape)).with_state(script.clone());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    let mut options = ShapeOptions::new(format!("http://{addr}/v1/shape").parse().unwrap(), "items");
    options.live_sse = true;
    options.backoff.base = Duration::from_millis(5);
    options.backoff.cap = Duration::from_millis(20);
    options.request_timeout = Duration::from_secs(5);
    (script, ShapeStream::new(options).unwrap(), task)
}

fn insert(id: u64, lsn: u64, op: u64, last: bool) -> String {
    let mut headers = json!({"operation": "insert", "relation": ["public", "items"], "lsn": lsn.to_string(), "op_position": op});
    if last {
        headers["last"] = json!(true);
    }
    json!({"key": item_key(id), "value": {"id": id.to_string()}, "headers": headers}).to_string()
}

fn data(message: &str) -> String {
    format!("data: {message}\n\n")
}

fn up_to_date(lsn: u64) -> String {
    data(&json!({"headers": {"control": "up-to-date", "global_last_seen_lsn": lsn.to_string()}}).to_string())
}

/// The snapshot and catch-up replies every script starts with.
fn catch_up() -> Vec<Reply> {
    vec![
        Reply::Json {
            offset: "0_0",
            cursor: None,
            body: format!("[{},{{\"headers\":{{\"control\":\"snapshot-end\"}}}}]", insert(1, 0, 0, false)),
        },
        Reply::Json {
            offset: "0_inf",
            cursor: None,
            body: r#"[{"headers":{"control":"up-to-date"}}]"#.into(),
        },
    ]
}

fn keys(r: &shapesync_core::SourceResponse) -> Vec<String> {
    r.changes.iter().map(|c| c.key.clone()).collect()
}

#[tokio::test]
async fn case21_sse_buffers_to_up_to_date_and_deduplicates_after_a_reconnect() {
    let mut replies = catch_up();
    replies.push(Reply::Sse {
        frames: vec![
            data(&insert(2, 100, 0, false)),
            ": keep-alive\n\n".into(),
            data(&insert(3, 100, 2, true)),
            up_to_date(100),
            // A transaction cut off by the server closing the stream.
            data(&insert(4, 200, 0, false)),
        ],
        hold: false,
    });
    replies.push(Reply::Sse {
        frames: vec![
            data(&insert(3, 100, 2, true)), // re-sent after the reconnect
            data(&insert(4, 200, 0, false)),
            data(&insert(5, 200, 2, true)),
            up_to_date(200),
            up_to_date(350), // no changes for this shape up to LSN 350
        ],
        hold: true,
    });
    let (script, mut s, server) = scripted(replies).await;
    assert_eq!(keys(&next_response(&mut s).await), [item_key(1)]);
    assert!(next_response(&mut s).await.up_to_date);

    let r = next_response(&mut s).await;
    assert_eq!(keys(&r), [item_key(2), item_key(3)], "one batch per up-to-date");
    assert!(r.up_to_date);
    assert_eq!(r.offset, Offset::new(100, 2));
    assert!(r.changes[1].last_in_tx);

    let r = next_response(&mut s).await;
    assert_eq!(
        keys(&r),
        [item_key(4), item_key(5)],
        "the re-sent op is dropped, the cut transaction is whole"
    );
    assert_eq!(r.offset, Offset::new(200, 2));

    let r = next_response(&mut s).await;
    assert!(r.changes.is_empty() && r.up_to_date);
    assert_eq!(r.offset, Offset::new(350, 0), "resume point from global_last_seen_lsn");

    assert_eq!(script.param(2, "live_sse").as_deref(), Some("true"));
    assert_eq!(script.param(2, "offset").as_deref(), Some("0_inf"));
    assert_eq!(script.param(2, "handle").as_deref(), Some(HANDLE));
    assert_eq!(script.param(3, "offset").as_deref(), Some("100_2"), "reconnect from the last delivered op");
    assert_eq!(script.param(3, "cursor").as_deref(), Some("100"));
    server.abort();
}

#[tokio::test]
async fn case21_three_short_sse_closes_fall_back_to_long_polling() {
    let mut replies = catch_up();
    for _ in 0..3 {
        replies.push(Reply::Sse { frames: vec![], hold: false });
    }
    replies.push(Reply::Json {
        offset: "300_0",
        cursor: Some("5"),
        body: format!("[{},{{\"headers\":{{\"control\":\"up-to-date\"}}}}]", insert(9, 300, 0, true)),
    });
    let (script, mut s, server) = scripted(replies).await;
    until_up_to_date(&mut s).await;
    let r = next_response(&mut s).await;
    assert_eq!(keys(&r), [item_key(9)]);
    assert_eq!(r.offset, Offset::new(300, 0));
    for i in 2..5 {
        assert_eq!(script.param(i, "live_sse").as_deref(), Some("true"), "request {i}");
    }
    assert_eq!(script.param(5, "live").as_deref(), Some("true"));
    assert_eq!(script.param(5, "live_sse"), None, "long-polling after three short closes");
    server.abort();
}

#[tokio::test]
async fn sse_requests_answered_as_long_polls_still_work() {
    let server = server().await;
    let items = items(&server);
    let mut o = options(&server, "items");
    o.live_sse = true;
    let mut s = ShapeStream::new(o).unwrap();
    until_up_to_date(&mut s).await;
    let offset = items.insert(json!({"id": "1"}));
    let r = next_response(&mut s).await;
    assert_eq!(r.offset, offset);
    assert_eq!(r.changes.len(), 1);
    let live = server.requests().into_iter().find(|r| r.is_live()).unwrap();
    assert_eq!(live.param("live_sse"), Some("true"));
}
