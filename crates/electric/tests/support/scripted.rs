//! A scripted HTTP server for responses the testkit does not produce (SSE streams,
//! 429s, 204s, proxy 403s, odd bodies, endless bodies): each request gets the next
//! queued reply.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::get;
use futures::StreamExt;

/// One scripted answer.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    /// Body pieces, sent in order.
    pub frames: Vec<String>,
    /// Keep the body open after the frames.
    pub hold: bool,
    /// After the frames, send this piece again and again, forever (an endless body).
    pub endless: Option<String>,
}

impl Reply {
    /// A complete response.
    pub fn new(status: u16, headers: &[(&'static str, &str)], body: &str) -> Self {
        Reply {
            status,
            headers: headers.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            frames: vec![body.to_owned()],
            hold: false,
            endless: None,
        }
    }
}

/// A request's arrival time, query and headers.
type Received = (Instant, Vec<(String, String)>, axum::http::HeaderMap);

#[derive(Default)]
pub struct Script {
    replies: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<Received>>,
    /// Bytes of endless bodies handed to the HTTP server so far.
    endless_bytes: Arc<AtomicU64>,
}

impl Script {
    /// Query parameter `name` of request `index`.
    pub fn param(&self, index: usize, name: &str) -> Option<String> {
        let log = self.requests.lock().unwrap();
        log[index].1.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    /// Header `name` of request `index`.
    pub fn header(&self, index: usize, name: &str) -> Option<String> {
        let log = self.requests.lock().unwrap();
        log[index].2.get(name).map(|v| v.to_str().unwrap().to_owned())
    }

    /// When request `index` arrived.
    pub fn received_at(&self, index: usize) -> Instant {
        self.requests.lock().unwrap()[index].0
    }

    /// Requests received so far.
    pub fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// Bytes of endless bodies produced so far: the server only produces more while
    /// the client reads (plus what socket buffers hold), so this bounds what it read.
    pub fn endless_bytes_sent(&self) -> u64 {
        self.endless_bytes.load(Ordering::Relaxed)
    }
}

async fn answer(
    State(script): State<Arc<Script>>,
    RawQuery(query): RawQuery,
    headers: axum::http::HeaderMap,
) -> Response {
    let query = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()).into_owned().collect();
    script.requests.lock().unwrap().push((Instant::now(), query, headers));
    let Some(reply) = script.replies.lock().unwrap().pop_front() else {
        let mut r = Response::new(Body::from("{\"message\":\"unscripted request\"}"));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return r;
    };
    let chunks = futures::stream::iter(reply.frames.into_iter().map(|f| Ok::<_, Infallible>(Bytes::from(f))));
    let body = if let Some(piece) = reply.endless {
        let piece = Bytes::from(piece);
        let sent = script.endless_bytes.clone();
        let endless = futures::stream::repeat_with(move || {
            sent.fetch_add(piece.len() as u64, Ordering::Relaxed);
            Ok(piece.clone())
        });
        Body::from_stream(chunks.chain(endless))
    } else if reply.hold {
        Body::from_stream(chunks.chain(futures::stream::pending()))
    } else {
        Body::from_stream(chunks)
    };
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(reply.status).unwrap();
    for (name, value) in reply.headers {
        r.headers_mut().insert(HeaderName::from_static(name), HeaderValue::from_str(&value).unwrap());
    }
    r
}

/// A running scripted server; stops on drop.
pub struct Scripted {
    pub script: Arc<Script>,
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `replies` in order at `/v1/shape`.
pub async fn scripted(replies: Vec<Reply>) -> Scripted {
    let script = Arc::new(Script { replies: Mutex::new(replies.into()), ..Script::default() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/v1/shape", get(answer)).with_state(script.clone());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Scripted { script, url: format!("http://{addr}/v1/shape"), task }
}
