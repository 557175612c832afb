//! Shared helpers for the conformance tests: a fast test server, stream options with a
//! small backoff, and an in-memory materialiser.

#![allow(dead_code)]

pub mod scripted;

use std::collections::BTreeMap;
use std::time::Duration;

use shapesync_core::{Change, Operation, Row, SourceResponse};
use shapesync_electric::{BackoffConfig, ShapeError, ShapeEvent, ShapeOptions, ShapeStream};
use shapesync_testkit::{Column, RequestRecord, ServerOptions, TableDef, TableHandle, TestServer};

/// How long any single step may take before the test fails (never a timing assertion).
pub const STEP: Duration = Duration::from_secs(20);

/// A server holding live requests for 200 ms.
pub async fn server() -> TestServer {
    server_with(ServerOptions {
        long_poll_timeout: Duration::from_millis(200),
        out_of_bounds_wait: Duration::from_millis(200),
        ..ServerOptions::default()
    })
    .await
}

/// A server with custom options.
pub async fn server_with(options: ServerOptions) -> TestServer {
    TestServer::start(options).await.expect("test server starts")
}

/// `items(id int8 pk, title text, n int4)`.
pub fn items(server: &TestServer) -> TableHandle {
    server.create_table(
        TableDef::new("items")
            .column(Column::new("id", "int8").primary_key())
            .column(Column::new("title", "text"))
            .column(Column::new("n", "int4")),
    )
}

/// Options for `table` on `server` with a millisecond backoff.
pub fn options(server: &TestServer, table: &str) -> ShapeOptions {
    fast_options(&server.url(), table)
}

/// Options for `table` at `url` with a millisecond backoff and a 5 s request timeout.
pub fn fast_options(url: &str, table: &str) -> ShapeOptions {
    let mut o = ShapeOptions::new(url.parse().unwrap(), table);
    o.backoff = BackoffConfig {
        base: Duration::from_millis(5),
        cap: Duration::from_millis(20),
        retry_after_cap: Duration::from_secs(30),
    };
    o.request_timeout = Duration::from_secs(5);
    o
}

/// A stream over `items`.
pub fn stream(server: &TestServer) -> ShapeStream {
    ShapeStream::new(options(server, "items")).unwrap()
}

/// The next event, failing the test on an error or after [`STEP`].
pub async fn next(stream: &mut ShapeStream) -> ShapeEvent {
    try_next(stream).await.expect("stream event")
}

/// The next event or error, failing the test after [`STEP`].
pub async fn try_next(stream: &mut ShapeStream) -> Result<ShapeEvent, ShapeError> {
    tokio::time::timeout(STEP, stream.next_event()).await.expect("the stream answers in time")
}

/// The next event, which must be a response.
pub async fn next_response(stream: &mut ShapeStream) -> SourceResponse {
    match next(stream).await {
        ShapeEvent::Response(r) => r,
        other => panic!("expected a response, got {other:?}"),
    }
}

/// Reads responses until one is up to date; returns them all.
pub async fn until_up_to_date(stream: &mut ShapeStream) -> Vec<SourceResponse> {
    let mut out = Vec::new();
    loop {
        let r = next_response(stream).await;
        let done = r.up_to_date;
        out.push(r);
        if done {
            return out;
        }
    }
}

/// Requests sent after the first `skip`.
pub fn requests_after(server: &TestServer, skip: usize) -> Vec<RequestRecord> {
    server.requests().into_iter().skip(skip).collect()
}

/// An in-memory copy of a shape, applying changes the way sinks do.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Materialized {
    pub rows: BTreeMap<String, Row>,
}

impl Materialized {
    pub fn apply(&mut self, changes: &[Change]) {
        for c in changes {
            match c.op {
                Operation::Insert => {
                    self.rows.insert(c.key.clone(), c.value.clone());
                }
                Operation::Update => {
                    self.rows.entry(c.key.clone()).or_default().extend(c.value.clone());
                }
                Operation::Delete => {
                    self.rows.remove(&c.key);
                }
            }
        }
    }

    pub fn apply_all(&mut self, responses: &[SourceResponse]) {
        for r in responses {
            self.apply(&r.changes);
        }
    }
}

/// `"public"."items"/"<id>"`.
pub fn item_key(id: u64) -> String {
    format!("\"public\".\"items\"/\"{id}\"")
}
