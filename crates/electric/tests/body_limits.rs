//! `max_response_bytes`: a response body that declares or sends more than the cap, or
//! never ends, is a transient server fault — refused or cut off at the cap, then
//! retried at the same offset — so the server cannot make the client's memory grow
//! without bound. A body up to the cap is accepted.

mod support;

use std::time::Duration;

use shapesync_core::Offset;
use shapesync_electric::{ShapeOptions, ShapeStream};
use support::scripted::{Reply, scripted};
use support::*;

const SCHEMA: &str = r#"{"id":{"type":"int8","pk_index":0,"not_null":true},"title":{"type":"text"}}"#;
const H: &str = "1-1";
const CAP: u64 = 1024 * 1024;

fn non_live_headers(offset: &str) -> Vec<(&'static str, String)> {
    vec![
        ("electric-handle", H.into()),
        ("electric-offset", offset.into()),
        ("electric-schema", SCHEMA.into()),
    ]
}

/// A snapshot chunk ending at `0_0` holding one row whose title is `title`.
fn snapshot_body(title: &str) -> String {
    format!(
        r#"[{{"key":"\"public\".\"items\"/\"1\"","value":{{"id":"1","title":"{title}"}},"headers":{{"operation":"insert"}}}}]"#
    )
}

fn snapshot(body: &str) -> Reply {
    Reply {
        status: 200,
        headers: non_live_headers("0_0"),
        frames: vec![body.into()],
        hold: false,
        endless: None,
    }
}

/// Options with `max_response_bytes = cap` and a request timeout far beyond the
/// test's [`STEP`]: only the cap, never the timeout, can end these bodies in time.
fn capped(url: &str, cap: u64) -> ShapeOptions {
    let mut o = fast_options(url, "items");
    o.max_response_bytes = cap;
    o.request_timeout = Duration::from_secs(120);
    o
}

#[tokio::test]
async fn an_endless_body_is_cut_off_at_the_cap_and_retried_at_the_same_offset() {
    let endless = Reply {
        status: 200,
        headers: non_live_headers("0_0"),
        frames: vec!["[".into()],
        hold: false,
        // JSON whitespace: the body stays a valid prefix however much of it is read.
        endless: Some(" ".repeat(64 * 1024)),
    };
    let good = snapshot_body("after the endless body");
    let server = scripted(vec![endless, snapshot(&good)]).await;
    let mut s = ShapeStream::new(capped(&server.url, CAP)).unwrap();

    let r = next_response(&mut s).await;
    assert_eq!(r.changes.len(), 1, "the response after the endless one is delivered");
    assert_eq!(r.offset, Offset::new(0, 0));
    let script = &server.script;
    assert_eq!(script.request_count(), 2, "the endless body was given up and the request retried");
    assert_eq!(script.param(0, "offset").as_deref(), Some("-1"));
    assert_eq!(script.param(1, "offset").as_deref(), Some("-1"), "retried at the same offset");
    let sent = script.endless_bytes_sent();
    // What the client read is at most this; the rest sat in socket buffers.
    assert!(sent < CAP + 32 * 1024 * 1024, "the client stopped reading at the cap: {sent} bytes sent");
}

#[tokio::test]
async fn a_huge_declared_content_length_is_refused_before_the_body_is_read() {
    let mut headers = non_live_headers("0_0");
    headers.push(("content-length", "2147483648".into()));
    // Headers promising 2 GiB, then a body that never comes: only refusing at the
    // headers (not reading, nor waiting for the request timeout) answers in time.
    let lying = Reply { status: 200, headers, frames: vec!["[".into()], hold: true, endless: None };
    let good = snapshot_body("after the lying one");
    let server = scripted(vec![lying, snapshot(&good)]).await;
    let mut s = ShapeStream::new(capped(&server.url, CAP)).unwrap();

    let r = next_response(&mut s).await;
    assert_eq!(r.changes.len(), 1);
    let script = &server.script;
    assert_eq!(script.request_count(), 2, "refused and retried");
    assert_eq!(script.param(1, "offset").as_deref(), Some("-1"), "retried at the same offset");
}

#[tokio::test]
async fn a_body_up_to_the_cap_is_accepted_and_one_byte_more_is_retried() {
    let body = snapshot_body(&"x".repeat(100_000));
    let cap = body.len() as u64;

    // Exactly the cap, chunked (no content-length) in three pieces.
    let thirds = body.len() / 3;
    let chunked = Reply {
        status: 200,
        headers: non_live_headers("0_0"),
        frames: vec![body[..thirds].into(), body[thirds..2 * thirds].into(), body[2 * thirds..].into()],
        hold: false,
        endless: None,
    };
    let server = scripted(vec![chunked]).await;
    let mut s = ShapeStream::new(capped(&server.url, cap)).unwrap();
    assert_eq!(next_response(&mut s).await.changes.len(), 1);
    assert_eq!(server.script.request_count(), 1, "accepted at once");

    // Exactly the cap, with its content-length.
    let mut headers = non_live_headers("0_0");
    headers.push(("content-length", body.len().to_string()));
    let declared = Reply { status: 200, headers, frames: vec![body.clone()], hold: false, endless: None };
    let server = scripted(vec![declared]).await;
    let mut s = ShapeStream::new(capped(&server.url, cap)).unwrap();
    assert_eq!(next_response(&mut s).await.changes.len(), 1);
    assert_eq!(server.script.request_count(), 1, "accepted at once");

    // One byte over (trailing JSON whitespace), chunked: cut off, then the retry gets
    // a body within the cap.
    let over = format!("{body} ");
    let server = scripted(vec![snapshot(&over), snapshot(&body)]).await;
    let mut s = ShapeStream::new(capped(&server.url, cap)).unwrap();
    assert_eq!(next_response(&mut s).await.changes.len(), 1);
    assert_eq!(server.script.request_count(), 2, "the body one byte over the cap was retried");
}
