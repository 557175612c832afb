//! Compressed responses: the client asks for gzip, decodes it, and `max_response_bytes`
//! bounds the decoded size (a small compressed body can expand enormously).

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use flate2::Compression;
use flate2::write::GzEncoder;
use shapesync_core::Offset;
use shapesync_electric::ShapeStream;
use support::*;

const SCHEMA: &str = r#"{"id":{"type":"int8","pk_index":0,"not_null":true}}"#;

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::best());
    e.write_all(body).unwrap();
    e.finish().unwrap()
}

/// Serves the bodies in order, gzipped, and records each request's `accept-encoding`.
#[derive(Default)]
struct Gz {
    bodies: Mutex<Vec<Vec<u8>>>,
    accept_encoding: Mutex<Vec<Option<String>>>,
    compressed_sizes: Mutex<Vec<usize>>,
}

async fn answer(State(gz): State<Arc<Gz>>, headers: HeaderMap) -> Response {
    let accept = headers.get("accept-encoding").map(|v| v.to_str().unwrap().to_owned());
    gz.accept_encoding.lock().unwrap().push(accept);
    let body = gz.bodies.lock().unwrap().remove(0);
    let compressed = gzip(&body);
    gz.compressed_sizes.lock().unwrap().push(compressed.len());
    let mut r = compressed.into_response();
    let h = r.headers_mut();
    h.insert("content-encoding", HeaderValue::from_static("gzip"));
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h.insert("electric-handle", HeaderValue::from_static("1-1"));
    h.insert("electric-offset", HeaderValue::from_static("0_0"));
    h.insert("electric-schema", HeaderValue::from_static(SCHEMA));
    r
}

async fn gz_server(bodies: Vec<Vec<u8>>) -> (Arc<Gz>, String, tokio::task::JoinHandle<()>) {
    let gz = Arc::new(Gz { bodies: Mutex::new(bodies), ..Gz::default() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/shape", listener.local_addr().unwrap());
    let app = Router::new().route("/v1/shape", get(answer)).with_state(gz.clone());
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (gz, url, task)
}

const ROW: &str = r#"[{"key":"k1","value":{"id":"1"},"headers":{"operation":"insert"}}]"#;

#[tokio::test]
async fn gzip_is_requested_and_decoded() {
    let (gz, url, task) = gz_server(vec![ROW.as_bytes().to_vec()]).await;
    let mut s = ShapeStream::new(fast_options(&url, "items")).unwrap();
    let r = next_response(&mut s).await;
    assert_eq!(r.changes.len(), 1);
    assert_eq!(r.changes[0].key, "k1");
    assert_eq!(r.offset, Offset::new(0, 0));
    let accept = gz.accept_encoding.lock().unwrap()[0].clone().unwrap_or_default();
    assert!(accept.split(',').any(|e| e.trim() == "gzip"), "accept-encoding: {accept}");
    task.abort();
}

#[tokio::test]
async fn max_response_bytes_bounds_the_decoded_size_of_a_gzip_body() {
    const CAP: u64 = 64 * 1024;
    // 4 MiB of JSON whitespace: valid JSON, tiny once compressed.
    let mut bomb = b"[".to_vec();
    bomb.extend(std::iter::repeat_n(b' ', 4 * 1024 * 1024));
    bomb.extend(b"]");
    let (gz, url, task) = gz_server(vec![bomb, ROW.as_bytes().to_vec()]).await;
    let mut o = fast_options(&url, "items");
    o.max_response_bytes = CAP;
    let mut s = ShapeStream::new(o).unwrap();
    let r = next_response(&mut s).await;
    assert_eq!(r.changes.len(), 1, "the expanding body was cut off and the request retried");
    let sizes = gz.compressed_sizes.lock().unwrap().clone();
    assert_eq!(sizes.len(), 2);
    assert!((sizes[0] as u64) < CAP, "the compressed bomb ({} bytes) is under the cap", sizes[0]);
    task.abort();
}
