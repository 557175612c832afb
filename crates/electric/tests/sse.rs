//! SSE live mode (spec §6.4, case 21). Framing, reconnects and the fallback run against
//! a scripted SSE server; the last tests follow the testkit, whose SSE behaves like
//! Electric's `api.ex` (a backlog is one chunk and the connection closes).

mod support;

use serde_json::json;
use shapesync_core::{Offset, SourceResponse};
use shapesync_electric::ShapeStream;
use support::scripted::{Reply, Scripted, scripted};
use support::*;

const SCHEMA: &str = r#"{"id":{"type":"int8","pk_index":0,"not_null":true}}"#;
const HANDLE: &str = "1234-5678";

fn insert(id: u64, lsn: u64, op: u64, last: bool) -> String {
    let mut headers = json!({"operation": "insert", "relation": ["public", "items"],
                             "lsn": lsn.to_string(), "op_position": op});
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

fn sse(frames: Vec<String>, hold: bool) -> Reply {
    Reply {
        status: 200,
        headers: vec![
            ("content-type", "text/event-stream".into()),
            ("electric-handle", HANDLE.into()),
            ("electric-offset", "0_inf".into()),
            ("electric-cursor", "100".into()),
        ],
        frames,
        hold,
        endless: None,
    }
}

/// The snapshot and catch-up replies every script starts with.
fn catch_up() -> Vec<Reply> {
    let non_live = [("electric-handle", HANDLE), ("electric-schema", SCHEMA)];
    let snapshot = format!("[{},{{\"headers\":{{\"control\":\"snapshot-end\"}}}}]", insert(1, 0, 0, false));
    vec![
        Reply::new(200, &[non_live[0], non_live[1], ("electric-offset", "0_0")], &snapshot),
        Reply::new(
            200,
            &[non_live[0], non_live[1], ("electric-offset", "0_inf")],
            r#"[{"headers":{"control":"up-to-date"}}]"#,
        ),
    ]
}

async fn sse_stream(replies: Vec<Reply>) -> (Scripted, ShapeStream) {
    let server = scripted(replies).await;
    let mut options = fast_options(&server.url, "items");
    options.live_sse = true;
    let stream = ShapeStream::new(options).unwrap();
    (server, stream)
}

fn keys(r: &SourceResponse) -> Vec<String> {
    r.changes.iter().map(|c| c.key.clone()).collect()
}

#[tokio::test]
async fn case21_sse_buffers_to_up_to_date_and_deduplicates_after_a_reconnect() {
    let mut replies = catch_up();
    replies.push(sse(
        vec![
            data(&insert(2, 100, 0, false)),
            ": keep-alive\n\n".into(),
            data(&insert(3, 100, 2, true)),
            up_to_date(100),
            // A transaction cut off by the server closing the stream.
            data(&insert(4, 200, 0, false)),
        ],
        false,
    ));
    replies.push(sse(
        vec![
            data(&insert(3, 100, 2, true)), // re-sent after the reconnect
            data(&insert(4, 200, 0, false)),
            data(&insert(5, 200, 2, true)),
            up_to_date(200),
            up_to_date(350), // no changes for this shape up to LSN 350
        ],
        true,
    ));
    let (server, mut s) = sse_stream(replies).await;
    assert_eq!(keys(&next_response(&mut s).await), [item_key(1)]);
    assert!(next_response(&mut s).await.up_to_date);

    let r = next_response(&mut s).await;
    assert_eq!(keys(&r), [item_key(2), item_key(3)], "one batch per up-to-date");
    assert!(r.up_to_date);
    assert_eq!(r.offset, Offset::new(100, 2));
    assert!(r.changes[1].last_in_tx);

    // The connection closed mid-transaction: what arrived is handed on, not up to date,
    // and the next request resumes after it.
    let r = next_response(&mut s).await;
    assert_eq!(keys(&r), [item_key(4)]);
    assert!(!r.up_to_date);
    assert_eq!(r.offset, Offset::new(200, 0));

    let r = next_response(&mut s).await;
    assert_eq!(keys(&r), [item_key(5)], "the re-sent ops are dropped");
    assert!(r.up_to_date);
    assert_eq!(r.offset, Offset::new(200, 2));

    let r = next_response(&mut s).await;
    assert!(r.changes.is_empty() && r.up_to_date);
    assert_eq!(r.offset, Offset::new(350, 0), "resume point from global_last_seen_lsn");

    let script = &server.script;
    assert_eq!(script.param(2, "live_sse").as_deref(), Some("true"));
    assert_eq!(script.param(2, "offset").as_deref(), Some("0_inf"));
    assert_eq!(script.param(2, "handle").as_deref(), Some(HANDLE));
    assert_eq!(script.param(3, "offset").as_deref(), Some("200_0"), "reconnect after the last delivered op");
    assert_eq!(script.param(3, "cursor").as_deref(), Some("100"));
}

/// A live long-poll answer: `changes` then up-to-date, ending at `offset`.
fn long_poll(changes: &[String], offset: &str) -> Reply {
    let mut body: Vec<String> = changes.to_vec();
    body.push(r#"{"headers":{"control":"up-to-date"}}"#.into());
    Reply::new(
        200,
        &[("electric-handle", HANDLE), ("electric-offset", offset), ("electric-cursor", "5")],
        &format!("[{}]", body.join(",")),
    )
}

#[tokio::test]
async fn case21_three_short_sse_closes_fall_back_to_long_polling_then_sse_is_tried_again() {
    // A buffering proxy: each SSE response arrives whole (up-to-date included) and
    // closes at once.
    let mut replies = catch_up();
    for lsn in [100, 200, 300] {
        replies.push(sse(vec![data(&insert(lsn, lsn, 0, true)), up_to_date(lsn)], false));
    }
    for i in 0..20u64 {
        let lsn = 400 + i;
        replies.push(long_poll(&[insert(lsn, lsn, 0, true)], &format!("{lsn}_0")));
    }
    replies.push(sse(vec![data(&insert(500, 500, 0, true)), up_to_date(500)], true));
    let (server, mut s) = sse_stream(replies).await;
    until_up_to_date(&mut s).await;
    for lsn in [100, 200, 300] {
        let r = next_response(&mut s).await;
        assert_eq!(keys(&r), [item_key(lsn)]);
        assert_eq!(r.offset, Offset::new(lsn, 0));
    }
    for i in 0..20u64 {
        let r = next_response(&mut s).await;
        assert_eq!(keys(&r), [item_key(400 + i)]);
    }
    let r = next_response(&mut s).await;
    assert_eq!(keys(&r), [item_key(500)], "SSE again");
    let script = &server.script;
    for i in 2..5 {
        assert_eq!(script.param(i, "live_sse").as_deref(), Some("true"), "request {i}");
    }
    for i in 5..25 {
        assert_eq!(script.param(i, "live").as_deref(), Some("true"), "request {i}");
        assert_eq!(script.param(i, "live_sse"), None, "long-polling after three short closes: request {i}");
    }
    assert_eq!(
        script.param(25, "live_sse").as_deref(),
        Some("true"),
        "SSE is tried again after 20 long-polls"
    );
    assert_eq!(script.param(25, "offset").as_deref(), Some("419_0"));
}

#[tokio::test]
async fn an_sse_backlog_chunk_without_up_to_date_is_handed_on_and_the_next_request_starts_after_it() {
    // `api.ex` `do_serve_shape_log`: a live SSE request that finds data waiting gets one
    // chunk of it and the connection ends, here without up-to-date (more is waiting).
    let mut replies = catch_up();
    replies.push(sse(vec![data(&insert(2, 100, 0, false)), data(&insert(3, 100, 2, true))], false));
    replies.push(sse(vec![data(&insert(4, 200, 0, false))], false));
    replies.push(sse(vec![data(&insert(5, 200, 2, true)), up_to_date(200)], true));
    let (server, mut s) = sse_stream(replies).await;
    until_up_to_date(&mut s).await;
    let r = next_response(&mut s).await;
    assert_eq!(keys(&r), [item_key(2), item_key(3)]);
    assert!(!r.up_to_date);
    assert_eq!(r.offset, Offset::new(100, 2));
    let r = next_response(&mut s).await;
    assert_eq!(keys(&r), [item_key(4)]);
    assert!(!r.up_to_date);
    assert_eq!(r.offset, Offset::new(200, 0), "mid-transaction: resume after its last op");
    let r = next_response(&mut s).await;
    assert_eq!(keys(&r), [item_key(5)]);
    assert!(r.up_to_date);
    let script = &server.script;
    assert_eq!(script.param(3, "offset").as_deref(), Some("100_2"));
    assert_eq!(script.param(4, "offset").as_deref(), Some("200_0"));
    for i in 2..5 {
        assert_eq!(script.param(i, "live_sse").as_deref(), Some("true"), "request {i} stays on SSE");
    }
}

#[tokio::test]
async fn an_sse_connection_that_delivers_nothing_is_followed_by_a_long_poll_then_sse_again() {
    // `sse_timeout` ends a quiet stream without up-to-date; only keep-alives came.
    let mut replies = catch_up();
    replies.push(sse(vec![": keep-alive\n\n".into()], false));
    replies.push(long_poll(&[insert(2, 100, 0, true)], "100_0"));
    replies.push(sse(vec![data(&insert(3, 200, 0, true)), up_to_date(200)], true));
    let (server, mut s) = sse_stream(replies).await;
    until_up_to_date(&mut s).await;
    let r = next_response(&mut s).await;
    assert_eq!(keys(&r), [item_key(2)]);
    assert_eq!(r.offset, Offset::new(100, 0));
    let r = next_response(&mut s).await;
    assert_eq!(keys(&r), [item_key(3)]);
    let script = &server.script;
    assert_eq!(script.param(3, "live").as_deref(), Some("true"));
    assert_eq!(script.param(3, "live_sse"), None, "a plain long-poll after the empty SSE close");
    assert_eq!(script.param(3, "offset").as_deref(), Some("0_inf"));
    assert_eq!(script.param(4, "live_sse").as_deref(), Some("true"), "back to SSE after the long-poll");
    assert_eq!(script.param(4, "offset").as_deref(), Some("100_0"));
}

#[tokio::test]
async fn an_out_of_bounds_offset_over_sse_closes_silently_and_the_long_poll_after_it_resets() {
    // Over SSE an out-of-bounds offset is a 200 event stream that ends with nothing
    // (`api.ex` `do_serve_shape_log` + `next_sse_event` on `:out_of_bounds_timeout`);
    // a long-poll gets the real 400.
    let mut replies = catch_up();
    replies.push(sse(vec![], false));
    replies.push(Reply::new(
        400,
        &[("content-type", "application/json")],
        r#"{"message":"Invalid request","errors":{"offset":["out of bounds for this shape"]}}"#,
    ));
    replies.extend(catch_up());
    let (server, mut s) = sse_stream(replies).await;
    until_up_to_date(&mut s).await;
    assert!(matches!(next(&mut s).await, shapesync_electric::ShapeEvent::MustRefetch { .. }));
    assert_eq!(keys(&next_response(&mut s).await), [item_key(1)]);
    let script = &server.script;
    assert_eq!(script.param(2, "live_sse").as_deref(), Some("true"));
    assert_eq!(script.param(3, "live_sse"), None);
    assert_eq!(script.param(4, "offset").as_deref(), Some("-1"));
    assert!(script.param(4, "cache-buster").is_some(), "the request after a reset busts caches");
}

#[tokio::test]
async fn an_sse_event_over_max_response_bytes_is_a_fault_and_the_stream_reconnects() {
    // A line that never ends, and data lines of an event that never ends.
    let endless_events = [("data: ", "x".repeat(8 * 1024)), ("", "data: xxxxxxxxxxxxxxxx\n".repeat(512))];
    for (start, endless) in endless_events {
        let mut replies = catch_up();
        let mut never_ends = sse(vec![data(&insert(2, 100, 0, false)), start.into()], false);
        never_ends.endless = Some(endless);
        replies.push(never_ends);
        replies.push(sse(
            vec![data(&insert(2, 100, 0, false)), data(&insert(3, 100, 2, true)), up_to_date(100)],
            true,
        ));
        let server = scripted(replies).await;
        let mut options = fast_options(&server.url, "items");
        options.live_sse = true;
        options.max_response_bytes = 64 * 1024;
        let mut s = ShapeStream::new(options).unwrap();
        until_up_to_date(&mut s).await;

        let r = next_response(&mut s).await;
        assert_eq!(keys(&r), [item_key(2), item_key(3)], "the change before the endless event comes once");
        assert_eq!(r.offset, Offset::new(100, 2));
        let script = &server.script;
        assert_eq!(script.request_count(), 4, "one reconnect");
        assert_eq!(script.param(3, "live_sse").as_deref(), Some("true"));
        assert_eq!(script.param(3, "offset").as_deref(), Some("0_inf"), "reconnected at the same offset");
        let sent = script.endless_bytes_sent();
        assert!(sent < 32 * 1024 * 1024, "the client stopped reading at the cap: {sent} bytes sent");
    }
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

#[tokio::test]
async fn sse_changes_without_up_to_date_are_handed_on_before_they_pass_max_response_bytes() {
    // A server that streams changes and never says up-to-date: the client hands them on
    // in responses of about `max_response_bytes`, never holding more.
    let mut replies = catch_up();
    let mut endless = sse(vec![], false);
    endless.endless = Some(data(&insert(2, 100, 0, false)));
    replies.push(endless);
    let server = scripted(replies).await;
    let mut options = fast_options(&server.url, "items");
    options.live_sse = true;
    options.max_response_bytes = 16 * 1024;
    let mut s = ShapeStream::new(options).unwrap();
    until_up_to_date(&mut s).await;
    let r = next_response(&mut s).await;
    assert!(!r.up_to_date, "no up-to-date was sent");
    assert_eq!(r.offset, Offset::new(100, 0), "resumable after the last change handed on");
    let json = insert(2, 100, 0, false).len(); // what counts: the events' data
    assert!(r.changes.len() <= 16 * 1024 / json + 1, "{} changes held at once", r.changes.len());
    assert!(!r.changes.is_empty());
}

#[tokio::test]
async fn an_sse_connection_whose_changes_cannot_move_the_offset_is_followed_by_a_long_poll() {
    // Changes without `lsn`/`op_position` give no resume offset: reconnecting over SSE
    // at the same offset could go on forever, so a long-poll comes next.
    let mut replies = catch_up();
    let unpositioned = json!({"key": item_key(7), "value": {"id": "7"}, "headers": {"operation": "insert"}});
    replies.push(sse(vec![data(&unpositioned.to_string())], false));
    replies.push(long_poll(&[insert(8, 100, 0, true)], "100_0"));
    let (server, mut s) = sse_stream(replies).await;
    until_up_to_date(&mut s).await;
    let r = next_response(&mut s).await;
    assert_eq!(keys(&r), [item_key(7)]);
    assert!(!r.up_to_date);
    assert_eq!(r.offset, Offset::SNAPSHOT_END, "nothing to resume after");
    assert_eq!(keys(&next_response(&mut s).await), [item_key(8)]);
    assert_eq!(server.script.param(3, "live_sse"), None, "a long-poll, not SSE at the same offset");
}

/// Against the testkit's server-faithful SSE (a backlog is one chunk that closes, often
/// without up-to-date; streams end after `sse_timeout`), a live stream follows
/// transactions committed in bursts larger than a chunk and ends with exactly the rows,
/// without ever asking for the same offset over and over.
#[tokio::test]
async fn sse_against_the_testkit_converges_through_backlogs_larger_than_a_chunk() {
    let server = server_with(shapesync_testkit::ServerOptions {
        chunk_bytes: 512,
        long_poll_timeout: std::time::Duration::from_millis(200),
        out_of_bounds_wait: std::time::Duration::from_millis(200),
        sse_timeout: std::time::Duration::from_millis(700),
        ..Default::default()
    })
    .await;
    let table = items(&server);
    table.seed((1..=5).map(|i| json!({"id": i.to_string(), "title": format!("t{i}"), "n": "0"})));
    let mut o = options(&server, "items");
    o.live_sse = true;
    let mut stream = ShapeStream::new(o).unwrap();
    let mut rows = Materialized::default();
    rows.apply_all(&until_up_to_date(&mut stream).await);

    let mut expected: std::collections::BTreeMap<String, String> =
        (1..=5).map(|i| (item_key(i), format!("t{i}"))).collect();
    for burst in 0..4u64 {
        for i in 0..30u64 {
            let id = 100 + burst * 30 + i;
            let title = format!("burst {burst} row {i} with some padding to fill chunks");
            table.transaction().insert(json!({"id": id.to_string(), "title": title, "n": "1"})).commit();
            expected.insert(item_key(id), title);
        }
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let held: std::collections::BTreeMap<String, String> = rows
                .rows
                .iter()
                .map(|(k, r)| {
                    (k.clone(), r.get("title").and_then(|v| v.render()).unwrap_or_default().into_owned())
                })
                .collect();
            if held == expected {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "burst {burst}: never converged");
            rows.apply(&next_response(&mut stream).await.changes);
        }
    }
    let log = server.requests();
    let mut same_offset_run = 1;
    for pair in log.windows(2) {
        let same = pair[0].param("offset") == pair[1].param("offset")
            && pair[0].param("handle") == pair[1].param("handle");
        same_offset_run = if same { same_offset_run + 1 } else { 1 };
        assert!(same_offset_run <= 5, "six requests in a row at one offset: {log:?}");
    }
    assert!(log.iter().any(|r| r.param("live_sse") == Some("true")), "SSE was used");
}
