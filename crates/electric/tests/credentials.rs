//! Credentials that expire: `headers_file` and `secret_file` are re-read before every
//! request, and a 401/403 is retried `auth_retries` times (re-reading them) before the
//! stream fails with the typed rejection.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use shapesync_electric::{ShapeError, ShapeStream};
use shapesync_testkit::ServerOptions;
use support::scripted::{Reply, scripted};
use support::*;

const SCHEMA: &str = r#"{"id":{"type":"int8","pk_index":0,"not_null":true}}"#;
const H: &str = "1-1";

/// Replaces `path` the way a Kubernetes secret mount or a careful sidecar does: a new
/// file renamed over the old one.
fn rotate(path: &Path, contents: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, contents).unwrap();
    std::fs::rename(&next, path).unwrap();
}

async fn secret_server() -> shapesync_testkit::TestServer {
    server_with(ServerOptions {
        secret: Some("right".into()),
        long_poll_timeout: Duration::from_millis(200),
        ..ServerOptions::default()
    })
    .await
}

#[tokio::test]
async fn a_rotated_secret_file_is_picked_up_after_a_401_without_a_restart() {
    let server = secret_server().await;
    items(&server).seed([json!({"id": "1"})]);
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "wrong\n").unwrap();
    let mut o = options(&server, "items");
    o.secret_file = Some(secret.clone());
    o.auth_retries = 100_000; // however long the test takes to rotate the file
    let mut s = ShapeStream::new(o).unwrap();
    let task = tokio::spawn(async move { next_response(&mut s).await });

    let unauthorized = |log: &[shapesync_testkit::RequestRecord]| log.iter().any(|r| r.status == Some(401));
    server.wait_for("a 401", STEP, unauthorized).await.unwrap();
    rotate(&secret, "right\n");

    let r = tokio::time::timeout(STEP, task).await.expect("the stream goes on").unwrap();
    assert_eq!(r.changes.len(), 1);
    let log = server.requests();
    assert_eq!(log.last().unwrap().status, Some(200));
    assert!(log.iter().all(|r| r.param("offset") == Some("-1")), "the same request, retried");
    assert!(log.iter().filter(|r| r.status == Some(401)).count() >= 1);
}

#[tokio::test]
async fn a_401_is_retried_auth_retries_times_then_fails_typed_without_the_secret() {
    let server = secret_server().await;
    items(&server);
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "wrong-s3cret").unwrap();
    let mut o = options(&server, "items");
    o.secret_file = Some(secret);
    o.auth_retries = 2;
    let e = try_next(&mut ShapeStream::new(o).unwrap()).await.unwrap_err();
    match &e {
        ShapeError::Rejected { status: 401, param, .. } => assert_eq!(param.as_deref(), Some("secret")),
        other => panic!("{other:?}"),
    }
    assert!(!e.to_string().contains("wrong-s3cret"), "{e}");
    assert_eq!(server.requests().len(), 3, "the first try and two retries");
}

#[tokio::test]
async fn an_unreadable_credential_file_fails_typed_after_the_retries_and_names_the_file() {
    let server = server().await;
    items(&server);
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(&server, "items");
    o.headers_file = Some(dir.path().join("missing-headers"));
    o.auth_retries = 1;
    match try_next(&mut ShapeStream::new(o).unwrap()).await {
        Err(ShapeError::InvalidOptions(m)) => assert!(m.contains("missing-headers"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(server.requests().is_empty(), "no request without its credentials");
}

#[tokio::test]
async fn the_headers_file_is_read_before_every_request_and_overrides_headers() {
    let non_live = |offset: &'static str, body: &str| {
        Reply::new(
            200,
            &[("electric-handle", H), ("electric-offset", offset), ("electric-schema", SCHEMA)],
            body,
        )
    };
    let server =
        scripted(vec![non_live("0_0", "[]"), non_live("0_inf", r#"[{"headers":{"control":"up-to-date"}}]"#)])
            .await;
    let dir = tempfile::tempdir().unwrap();
    let headers = dir.path().join("headers");
    std::fs::write(&headers, "# token\nAuthorization: Bearer one\nX-Extra: 1\n").unwrap();
    let mut o = fast_options(&server.url, "items").header("authorization", "Bearer static").unwrap();
    o = o.header("x-tenant", "acme").unwrap();
    o.headers_file = Some(headers.clone());
    let mut s = ShapeStream::new(o).unwrap();
    next_response(&mut s).await;
    rotate(&headers, "Authorization: Bearer two\n");
    assert!(next_response(&mut s).await.up_to_date);
    let script = &server.script;
    assert_eq!(script.header(0, "authorization").as_deref(), Some("Bearer one"), "the file wins");
    assert_eq!(script.header(0, "x-extra").as_deref(), Some("1"));
    assert_eq!(script.header(1, "authorization").as_deref(), Some("Bearer two"), "re-read");
    assert_eq!(script.header(1, "x-extra"), None, "a header dropped from the file is gone");
    assert_eq!(script.header(1, "x-tenant").as_deref(), Some("acme"), "`headers` still apply");
    assert!(!format!("{s:?}").contains("Bearer"), "values are never shown");
}

/// The auth proxy's current token and the 401s it has sent.
#[derive(Clone, Default)]
struct Gate {
    token: std::sync::Arc<std::sync::Mutex<String>>,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// An auth proxy in front of the testkit, as deployments put in front of Electric: it
/// forwards requests whose `authorization` is the current token and answers 401 to any
/// other.
async fn auth_proxy(upstream: String, gate: Gate) -> String {
    use axum::extract::{RawQuery, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};

    type Shared = (String, Gate, reqwest::Client);
    async fn forward(
        State((upstream, gate, client)): State<Shared>,
        RawQuery(q): RawQuery,
        headers: HeaderMap,
    ) -> Response {
        let expected = format!("Bearer {}", gate.token.lock().unwrap());
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
            gate.refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return (StatusCode::UNAUTHORIZED, r#"{"message":"token expired"}"#).into_response();
        }
        let reply = client.get(format!("{upstream}?{}", q.unwrap_or_default())).send().await.unwrap();
        let status = StatusCode::from_u16(reply.status().as_u16()).unwrap();
        let mut out = HeaderMap::new();
        for (name, value) in reply.headers() {
            if name.as_str().starts_with("electric-") || name == "content-type" {
                out.insert(name.clone(), value.clone());
            }
        }
        (status, out, reply.bytes().await.unwrap()).into_response()
    }
    let app = axum::Router::new().route("/v1/shape", axum::routing::get(forward)).with_state((
        upstream,
        gate,
        reqwest::Client::new(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/shape", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[tokio::test]
async fn a_token_rotated_in_the_headers_file_after_a_401_continues_the_stream_without_a_restart() {
    let server = server().await;
    let table = items(&server);
    table.seed([json!({"id": "1"})]);
    let gate = Gate::default();
    *gate.token.lock().unwrap() = "first".to_owned();
    let proxy = auth_proxy(server.url(), gate.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let headers = dir.path().join("headers");
    std::fs::write(&headers, "Authorization: Bearer first\n").unwrap();
    let mut o = fast_options(&proxy, "items");
    o.headers_file = Some(headers.clone());
    o.auth_retries = 100_000; // however long the test takes to rotate the file
    let mut s = ShapeStream::new(o).unwrap();
    assert!(until_up_to_date(&mut s).await.iter().any(|r| !r.changes.is_empty()));

    // The proxy's token expires while the stream is live; a sidecar writes the new one.
    *gate.token.lock().unwrap() = "second".to_owned();
    table.insert(json!({"id": "2"}));
    let task = tokio::spawn(async move {
        let mut got = Vec::new();
        while !got.iter().any(|c: &shapesync_core::Change| c.key == item_key(2)) {
            got.extend(next_response(&mut s).await.changes);
        }
        got
    });
    // Once the proxy has refused the old token, the new one lands in the file.
    let deadline = tokio::time::Instant::now() + STEP;
    while gate.refused.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the proxy never refused the expired token");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rotate(&headers, "Authorization: Bearer second\n");
    let got = tokio::time::timeout(STEP, task).await.expect("the stream goes on").unwrap();
    assert!(got.iter().any(|c| c.key == item_key(2)));
}
