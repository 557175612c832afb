//! Server-Sent Events (`live=true&live_sse=true`).

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::json;
use shapesync_shape_server::ServerOptions;

/// Opens an SSE request from `head`'s offset and handle.
async fn open_sse(url: &str, head: &Resp) -> reqwest::Response {
    open_sse_at(url, head.handle(), head.offset()).await
}

/// Opens an SSE request from `offset`.
async fn open_sse_at(url: &str, handle: &str, offset: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(url)
        .query(&[
            ("table", "items"),
            ("offset", offset),
            ("handle", handle),
            ("live", "true"),
            ("live_sse", "true"),
        ])
        .send()
        .await
        .unwrap()
}

/// Reads the whole stream, failing if the server does not close it within 10 s (the
/// servers of these tests use a 60 s `sse_timeout`, so only a deliberate close ends it).
async fn read_until_closed(r: reqwest::Response) -> Vec<String> {
    tokio::time::timeout(Duration::from_secs(10), read_frames(r, |_| false))
        .await
        .expect("the server closes the stream")
}

fn data_messages(frames: &[String]) -> Vec<serde_json::Value> {
    frames.iter().filter_map(|f| f.strip_prefix("data: ")).map(|d| serde_json::from_str(d).unwrap()).collect()
}

/// Reads SSE frames (separated by a blank line) until `stop` holds or the stream ends.
async fn read_frames(r: reqwest::Response, stop: impl Fn(&[String]) -> bool) -> Vec<String> {
    let mut stream = r.bytes_stream();
    let (mut text, mut frames) = (String::new(), Vec::new());
    while let Some(piece) = stream.next().await {
        text.push_str(std::str::from_utf8(&piece.unwrap()).unwrap());
        while let Some(end) = text.find("\n\n") {
            frames.push(text[..end].to_string());
            text.drain(..end + 2);
        }
        if stop(&frames) {
            break;
        }
    }
    frames
}

#[tokio::test]
async fn sse_sends_headers_first_then_one_data_frame_per_message_and_up_to_date() {
    let (server, items) =
        items_server(ServerOptions { sse_timeout: Duration::from_secs(30), ..fast_options() }, 1).await;
    let head = sync_to_head(&server, &[]).await.pop().unwrap();
    let r = open_sse(&server.url(), &head).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert_eq!(r.headers()["cache-control"], "public, max-age=29", "sse_timeout in seconds minus one");
    assert_eq!(r.headers()["electric-handle"], head.handle());
    assert!(r.headers().get("electric-cursor").is_some());
    let last =
        items.transaction().insert(json!({"id": "2"})).update(json!({"id": "1", "title": "x"})).commit();
    let frames = read_frames(r, |f| f.iter().any(|x| x.contains("up-to-date"))).await;
    let messages: Vec<serde_json::Value> =
        frames.iter().map(|f| serde_json::from_str(f.strip_prefix("data: ").unwrap()).unwrap()).collect();
    assert_eq!(messages.len(), 3);
    assert_eq!(messages[0]["headers"]["operation"], "insert");
    assert_eq!(messages[1]["headers"]["operation"], "update");
    let lsn = last.to_string().split('_').next().unwrap().to_string();
    assert_eq!(messages[2]["headers"], json!({"control": "up-to-date", "global_last_seen_lsn": lsn}));
}

#[tokio::test]
async fn sse_sends_keep_alives_in_silence_and_closes_at_the_timeout() {
    let options = ServerOptions {
        sse_keepalive: Duration::from_millis(30),
        sse_timeout: Duration::from_millis(300),
        ..fast_options()
    };
    let (server, _items) = items_server(options, 1).await;
    let head = sync_to_head(&server, &[]).await.pop().unwrap();
    let frames = read_frames(open_sse(&server.url(), &head).await, |_| false).await;
    assert!(!frames.is_empty());
    assert!(frames.iter().all(|f| f == ": keep-alive"), "{frames:?}");
}

#[tokio::test]
async fn sse_closes_on_rotation_and_the_reconnect_gets_409() {
    let (server, items) =
        items_server(ServerOptions { sse_timeout: Duration::from_secs(30), ..fast_options() }, 1).await;
    let head = sync_to_head(&server, &[]).await.pop().unwrap();
    let r = open_sse(&server.url(), &head).await;
    assert_eq!(r.status().as_u16(), 200);
    items.rotate();
    let frames = read_frames(r, |_| false).await;
    assert!(frames.iter().all(|f| f.starts_with(':')), "no data after rotation: {frames:?}");
    let again = open_sse(&server.url(), &head).await;
    assert_eq!(again.status().as_u16(), 409);
    assert_eq!(again.headers()["electric-handle"].to_str().unwrap(), items.handle().unwrap());
}

#[tokio::test]
async fn sse_with_a_backlog_answers_it_as_one_response_that_closes() {
    let (server, items) = items_server(fast_options(), 1).await;
    let head = sync_to_head(&server, &[]).await.pop().unwrap();
    items.insert(json!({"id": "2"}));
    let last = items.insert(json!({"id": "3"}));
    let r = open_sse(&server.url(), &head).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert_eq!(r.headers()["electric-offset"], last.to_string().as_str());
    assert!(r.headers().get("electric-up-to-date").is_some());
    let messages = data_messages(&read_until_closed(r).await);
    assert_eq!(messages.len(), 3, "{messages:?}");
    assert_eq!(messages[0]["key"], r#""public"."items"/"2""#);
    assert_eq!(messages[1]["key"], r#""public"."items"/"3""#);
    assert_eq!(messages[2]["headers"]["control"], "up-to-date");
}

#[tokio::test]
async fn sse_backlog_stops_at_the_chunk_end_without_up_to_date() {
    let (server, items) = items_server(ServerOptions { chunk_bytes: 700, ..fast_options() }, 1).await;
    let head = sync_to_head(&server, &[]).await.pop().unwrap();
    for i in 2..22 {
        items.insert(json!({"id": i.to_string(), "title": "some text to take up space"}));
    }
    let r = open_sse(&server.url(), &head).await;
    assert!(r.headers().get("electric-up-to-date").is_none());
    let end = r.headers()["electric-offset"].to_str().unwrap().to_string();
    let messages = data_messages(&read_until_closed(r).await);
    assert!(!messages.is_empty() && messages.len() < 20, "one chunk of the 20 inserts: {}", messages.len());
    assert!(messages.iter().all(|m| m.get("key").is_some()), "no up-to-date short of the head");
    let last = messages.last().unwrap();
    let last_offset =
        format!("{}_{}", last["headers"]["lsn"].as_str().unwrap(), last["headers"]["op_position"]);
    assert_eq!(last_offset, end);
}

#[tokio::test]
async fn sse_at_an_offset_beyond_the_log_is_200_and_closes_silently_after_the_wait() {
    let (server, items) = items_server(fast_options(), 1).await;
    let handle = items.handle().unwrap();
    let r = open_sse_at(&server.url(), &handle, "999999999_0").await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let frames = read_until_closed(r).await;
    assert!(frames.iter().all(|f| f.starts_with(':')), "no data: {frames:?}");
}
