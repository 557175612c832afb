//! Responses the testkit cannot produce, from a scripted server: 429 with an HTTP-date
//! `retry-after`, a deprecated 204, a proxy's 403, an empty body, unknown control and
//! event messages, a `must-refetch` inside a 200.

mod support;

use std::time::{Duration, SystemTime};

use shapesync_core::Offset;
use shapesync_electric::{ShapeError, ShapeEvent, ShapeStream};
use support::scripted::{Reply, Scripted, scripted};
use support::*;

const SCHEMA: &str = r#"{"id":{"type":"int8","pk_index":0,"not_null":true}}"#;
const H: &str = "1-1";

fn non_live(offset: &'static str, body: &str) -> Reply {
    Reply::new(200, &[("electric-handle", H), ("electric-offset", offset), ("electric-schema", SCHEMA)], body)
}

async fn start(replies: Vec<Reply>) -> (Scripted, ShapeStream) {
    let server = scripted(replies).await;
    let stream = ShapeStream::new(fast_options(&server.url, "items")).unwrap();
    (server, stream)
}

#[tokio::test]
async fn a_429_with_an_http_date_retry_after_waits_until_that_date() {
    let at = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(2));
    let (server, mut s) =
        start(vec![Reply::new(429, &[("retry-after", &at)], ""), non_live("0_0", "[]")]).await;
    let r = next_response(&mut s).await;
    assert_eq!(r.offset, Offset::new(0, 0));
    let waited = server.script.received_at(1).duration_since(server.script.received_at(0));
    // HTTP dates have whole seconds: "now + 2 s" is at least 1 s away.
    assert!(waited >= Duration::from_secs(1), "waited {waited:?}");
    assert_eq!(server.script.param(1, "offset").as_deref(), Some("-1"));
}

#[tokio::test]
async fn an_empty_body_is_no_messages() {
    let (_server, mut s) = start(vec![non_live("0_0", "")]).await;
    let r = next_response(&mut s).await;
    assert!(r.changes.is_empty());
    assert_eq!(r.offset, Offset::new(0, 0));
    assert_eq!(r.handle, H);
}

#[tokio::test]
async fn a_proxy_403_is_a_typed_error_with_its_message_after_auth_retries() {
    let retries = shapesync_electric::defaults::AUTH_RETRIES as usize;
    let (server, mut s) =
        start((0..=retries).map(|_| Reply::new(403, &[], "Forbidden by policy")).collect()).await;
    match try_next(&mut s).await {
        Err(ShapeError::Rejected { status: 403, param: None, message, .. }) => {
            assert_eq!(message, "Forbidden by policy")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(server.script.request_count(), retries + 1, "retried `auth_retries` times, then failed");
}

#[tokio::test]
async fn a_deprecated_204_is_an_up_to_date_response_at_the_same_offset() {
    let (server, mut s) =
        start(vec![non_live("0_inf", r#"[{"headers":{"control":"up-to-date"}}]"#), Reply::new(204, &[], "")])
            .await;
    assert!(next_response(&mut s).await.up_to_date);
    let r = next_response(&mut s).await;
    assert!(r.up_to_date && r.changes.is_empty());
    assert_eq!(r.offset, Offset::SNAPSHOT_END);
    assert_eq!(server.script.param(1, "live").as_deref(), Some("true"));
}

#[tokio::test]
async fn case24_unknown_control_and_event_messages_are_ignored() {
    let body = r#"[
        {"key":"k1","value":{"id":"1"},"headers":{"operation":"insert"}},
        {"headers":{"event":"move-in","patterns":[{"pos":0,"value":"abc"}],"txids":[1]}},
        {"headers":{"event":"move-out","patterns":[{"pos":0,"value":"abc"}]}},
        {"headers":{"control":"snapshot-end","xmin":"1","xmax":"2","xip_list":[]}},
        {"headers":{"control":"something-new"},"extra":{"nested":[1,2]}},
        {"headers":{"control":"up-to-date"}}]"#;
    let (_server, mut s) = start(vec![non_live("0_inf", body)]).await;
    let r = next_response(&mut s).await;
    assert_eq!(r.changes.len(), 1);
    assert_eq!(r.changes[0].key, "k1");
    assert!(r.up_to_date);
}

#[tokio::test]
async fn a_must_refetch_message_in_a_200_body_resets_the_stream() {
    let (server, mut s) =
        start(vec![non_live("0_0", r#"[{"headers":{"control":"must-refetch"}}]"#), non_live("0_0", "[]")])
            .await;
    assert!(matches!(next(&mut s).await, ShapeEvent::MustRefetch { .. }));
    next_response(&mut s).await;
    assert_eq!(server.script.param(1, "offset").as_deref(), Some("-1"));
    assert!(server.script.param(1, "cache-buster").is_some());
}

#[tokio::test]
async fn after_a_rejection_new_credentials_continue_at_the_same_offset() {
    let server = scripted(vec![
        non_live("0_0", r#"[{"key":"k1","value":{"id":"1"},"headers":{"operation":"insert"}}]"#),
        Reply::new(401, &[], r#"{"message":"token expired"}"#),
        non_live("0_inf", r#"[{"headers":{"control":"up-to-date"}}]"#),
    ])
    .await;
    let mut options = fast_options(&server.url, "items");
    options.auth_retries = 0;
    let mut s = ShapeStream::new(options).unwrap();
    next_response(&mut s).await;
    let e = try_next(&mut s).await.unwrap_err();
    assert!(matches!(e, ShapeError::Rejected { status: 401, .. }), "{e:?}");
    s.headers_mut().insert("authorization", "Bearer fresh".parse().unwrap());
    assert!(next_response(&mut s).await.up_to_date);
    let script = &server.script;
    assert_eq!(script.param(1, "offset").as_deref(), Some("0_0"));
    assert_eq!(script.param(2, "offset").as_deref(), Some("0_0"), "retried at the same offset");
    assert_eq!(script.param(2, "handle").as_deref(), Some(H));
}

#[tokio::test]
async fn the_futures_stream_adapter_yields_events_and_ends_after_an_error() {
    use futures::StreamExt;
    let (_server, s) = start(vec![non_live("0_0", "[]"), Reply::new(404, &[], "")]).await;
    let events: Vec<_> = s.into_stream().collect().await;
    assert_eq!(events.len(), 2);
    assert!(matches!(events[0], Ok(ShapeEvent::Response(_))));
    assert!(matches!(events[1], Err(ShapeError::Rejected { status: 404, .. })));
}

const FOREIGN: &str = "9-9";

fn foreign(offset: &'static str, body: &str) -> Reply {
    Reply::new(
        200,
        &[("electric-handle", FOREIGN), ("electric-offset", offset), ("electric-schema", SCHEMA)],
        body,
    )
}

const INSERT_K1: &str = r#"[{"key":"k1","value":{"id":"1"},"headers":{"operation":"insert"}}]"#;
const INSERT_K2_UP_TO_DATE: &str = r#"[{"key":"k2","value":{"id":"2"},"headers":{"operation":"insert"}},
    {"headers":{"control":"up-to-date"}}]"#;
const UP_TO_DATE: &str = r#"[{"headers":{"control":"up-to-date"}}]"#;

#[tokio::test]
async fn a_200_with_another_handle_mid_shape_is_retried_with_a_cache_buster() {
    let (server, mut s) = start(vec![
        non_live("0_0", INSERT_K1),
        foreign("5_0", INSERT_K2_UP_TO_DATE),
        non_live("0_inf", UP_TO_DATE),
    ])
    .await;
    assert_eq!(next_response(&mut s).await.changes.len(), 1);
    let r = next_response(&mut s).await;
    assert_eq!(r.handle, H, "the foreign handle was not adopted");
    assert!(r.changes.is_empty(), "the foreign response's changes were dropped: {:?}", r.changes);
    assert_eq!(r.offset, Offset::SNAPSHOT_END);
    assert!(r.up_to_date);
    let script = &server.script;
    assert_eq!(script.param(2, "offset").as_deref(), Some("0_0"), "retried at the same offset");
    assert_eq!(script.param(2, "handle").as_deref(), Some(H));
    assert!(script.param(2, "cache-buster").is_some());
}

#[tokio::test]
async fn a_handle_mismatch_that_persists_resets_the_stream() {
    let mut replies = vec![non_live("0_0", INSERT_K1)];
    replies.extend((0..4).map(|_| foreign("5_0", INSERT_K2_UP_TO_DATE)));
    replies.push(foreign("0_inf", UP_TO_DATE));
    let (server, mut s) = start(replies).await;
    next_response(&mut s).await;
    assert!(matches!(next(&mut s).await, ShapeEvent::MustRefetch { new_handle: None }));
    let r = next_response(&mut s).await;
    assert_eq!(r.handle, FOREIGN, "after the reset any handle may start the shape");
    assert!(r.up_to_date);
    let script = &server.script;
    assert_eq!(script.request_count(), 6);
    assert_eq!(script.param(5, "offset").as_deref(), Some("-1"));
    assert_eq!(script.param(5, "handle"), None);
}

#[tokio::test]
async fn a_204_to_an_offset_minus_one_request_is_never_up_to_date() {
    let (server, mut s) =
        start(vec![Reply::new(204, &[("electric-handle", H)], ""), non_live("0_inf", UP_TO_DATE)]).await;
    let r = next_response(&mut s).await;
    assert!(!r.up_to_date, "an empty answer to offset=-1 cannot complete a sync");
    assert_eq!(r.offset, Offset::Start);
    assert!(r.changes.is_empty());
    assert!(!s.is_live());
    assert!(next_response(&mut s).await.up_to_date);
    assert_eq!(server.script.param(1, "offset").as_deref(), Some("-1"));
    assert_eq!(server.script.param(1, "live"), None, "still not live");
}

#[tokio::test]
async fn a_200_ending_at_offset_minus_one_is_never_up_to_date() {
    let (_server, mut s) = start(vec![non_live("-1", UP_TO_DATE), non_live("0_inf", UP_TO_DATE)]).await;
    let r = next_response(&mut s).await;
    assert!(!r.up_to_date);
    assert_eq!(r.offset, Offset::Start);
    assert!(!s.is_live());
    assert!(next_response(&mut s).await.up_to_date);
}

#[tokio::test]
async fn a_null_schema_mid_shape_is_a_must_refetch() {
    // `api.ex` `schema/1` gives nil (`electric-schema: null`) when the table is gone
    // mid-request; the fresh request then gets the server's 400 for a missing table.
    let (server, mut s) = start(vec![
        non_live("0_0", r#"[{"key":"k1","value":{"id":"1"},"headers":{"operation":"insert"}}]"#),
        Reply::new(200, &[("electric-handle", H), ("electric-offset", "0_1"), ("electric-schema", "null")], "[]"),
        Reply::new(
            400,
            &[],
            r#"{"message":"Invalid request","errors":{"table":["Table \"public\".\"items\" does not exist"]}}"#,
        ),
    ])
    .await;
    next_response(&mut s).await;
    assert!(matches!(next(&mut s).await, ShapeEvent::MustRefetch { .. }));
    match try_next(&mut s).await {
        Err(ShapeError::Rejected { status: 400, param, .. }) => assert_eq!(param.as_deref(), Some("table")),
        other => panic!("{other:?}"),
    }
    assert_eq!(server.script.param(2, "offset").as_deref(), Some("-1"));
}

#[tokio::test]
async fn a_null_schema_twice_in_a_row_is_a_typed_table_gone_error() {
    let null_schema = || {
        Reply::new(
            200,
            &[("electric-handle", H), ("electric-offset", "0_0"), ("electric-schema", "null")],
            "[]",
        )
    };
    let (server, mut s) = start(vec![null_schema(), null_schema()]).await;
    assert!(matches!(next(&mut s).await, ShapeEvent::MustRefetch { .. }));
    match try_next(&mut s).await {
        Err(e @ ShapeError::TableGone { .. }) => {
            let text = e.to_string();
            assert!(text.contains("`items`") && text.contains("recreate it or change `table`"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(server.script.request_count(), 2);
}
