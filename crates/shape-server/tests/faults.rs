//! Each injected fault, and the synthetic benchmark table.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::json;
use shapesync_shape_server::{ElectricHeader, Fault, ServerOptions, ShapeServer};

#[tokio::test]
async fn service_unavailable_is_503_with_retry_after_then_the_next_request_succeeds() {
    let (server, _items) = items_server(fast_options(), 1).await;
    server.inject(Fault::ServiceUnavailable { retry_after: Some(5) });
    let r = get(&server, &[("table", "items"), ("offset", "-1")]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("5"));
    assert_eq!(server.pending_faults(), 0);
    assert_eq!(get(&server, &[("table", "items"), ("offset", "-1")]).await.status, 200);
    assert_eq!(server.requests()[0].fault, Some(Fault::ServiceUnavailable { retry_after: Some(5) }));
}

#[tokio::test]
async fn internal_error_is_a_500_for_each_injected_time() {
    let (server, _items) = items_server(fast_options(), 1).await;
    server.inject_times(Fault::InternalError, 2);
    for _ in 0..2 {
        assert_eq!(get(&server, &[("table", "items"), ("offset", "-1")]).await.status, 500);
    }
    assert_eq!(get(&server, &[("table", "items"), ("offset", "-1")]).await.status, 200);
}

#[tokio::test]
async fn must_refetch_fault_is_a_409_with_or_without_the_handle() {
    let (server, items) = items_server(fast_options(), 1).await;
    server.inject(Fault::MustRefetch { with_handle: true });
    server.inject(Fault::MustRefetch { with_handle: false });
    let with = get(&server, &[("table", "items"), ("offset", "-1")]).await;
    assert_eq!(with.status, 409);
    assert_eq!(with.header("electric-handle"), items.handle().as_deref());
    let without = get(&server, &[("table", "items"), ("offset", "-1")]).await;
    assert_eq!(without.status, 409);
    assert_eq!(without.header("electric-handle"), None);
    assert_eq!(without.json(), json!([{"headers": {"control": "must-refetch"}}]));
}

#[tokio::test]
async fn drop_mid_body_sends_headers_then_aborts_the_body() {
    let (server, _items) = items_server(fast_options(), 20).await;
    server.inject(Fault::DropMidBody);
    let r = reqwest::Client::new()
        .get(server.url())
        .query(&[("table", "items"), ("offset", "-1")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["electric-offset"], "0_0");
    assert!(r.text().await.is_err(), "the body must fail to complete");
}

#[tokio::test]
async fn malformed_json_keeps_the_headers_but_breaks_the_body() {
    let (server, _items) = items_server(fast_options(), 1).await;
    server.inject(Fault::MalformedJson);
    let r = get(&server, &[("table", "items"), ("offset", "-1")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.offset(), "0_0");
    assert!(serde_json::from_str::<serde_json::Value>(&r.text).is_err());
}

#[tokio::test]
async fn missing_header_removes_exactly_that_header() {
    let (server, _items) = items_server(fast_options(), 1).await;
    for (which, name) in [
        (ElectricHeader::Handle, "electric-handle"),
        (ElectricHeader::Offset, "electric-offset"),
        (ElectricHeader::Schema, "electric-schema"),
    ] {
        server.inject(Fault::MissingHeader(which));
        let r = get(&server, &[("table", "items"), ("offset", "-1")]).await;
        assert_eq!(r.status, 200);
        assert!(r.header(name).is_none(), "{name} removed");
        for other in ["electric-handle", "electric-offset", "electric-schema"].iter().filter(|h| **h != name)
        {
            assert!(r.header(other).is_some(), "{other} kept when removing {name}");
        }
    }
    let head = sync_to_head(&server, &[]).await.pop().unwrap();
    server.inject(Fault::MissingHeader(ElectricHeader::Cursor));
    let params = [("table", "items"), ("offset", head.offset()), ("handle", head.handle()), ("live", "true")];
    let live = get(&server, &params).await;
    assert_eq!(live.status, 200);
    assert!(live.header("electric-cursor").is_none());
    assert!(live.header("electric-offset").is_some());
}

#[tokio::test]
async fn end_mid_transaction_cuts_before_the_last_op_and_the_next_request_completes_it() {
    let (server, items) = items_server(fast_options(), 0).await;
    let last = items
        .transaction()
        .insert(json!({"id": "1"}))
        .insert(json!({"id": "2"}))
        .insert(json!({"id": "3"}))
        .commit();
    let snapshot = get(&server, &[("table", "items"), ("offset", "-1")]).await;
    server.inject(Fault::EndMidTransaction);
    let cut = get(&server, &[("table", "items"), ("offset", "0_0"), ("handle", snapshot.handle())]).await;
    assert_eq!(cut.changes().len(), 2);
    assert!(cut.changes().iter().all(|c| c["headers"].get("last").is_none()));
    assert!(!cut.ends_up_to_date());
    assert!(cut.header("electric-up-to-date").is_none());
    let rest = get(&server, &[("table", "items"), ("offset", cut.offset()), ("handle", cut.handle())]).await;
    assert_eq!(rest.changes().len(), 1);
    assert_eq!(rest.changes()[0]["headers"]["last"], json!(true));
    assert_eq!(rest.offset(), last.to_string());
    assert!(rest.ends_up_to_date());
}

#[tokio::test]
async fn trickle_delivers_the_same_body_in_many_pieces() {
    let (server, _items) = items_server(fast_options(), 10).await;
    let normal = get(&server, &[("table", "items"), ("offset", "-1")]).await.text;
    server.inject(Fault::Trickle { bytes: 100, delay: Duration::from_millis(5) });
    let r = reqwest::Client::new()
        .get(server.url())
        .query(&[("table", "items"), ("offset", "-1")])
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    let (mut pieces, mut body) = (0, Vec::new());
    while let Some(piece) = stream.next().await {
        pieces += 1;
        body.extend_from_slice(&piece.unwrap());
    }
    assert_eq!(String::from_utf8(body).unwrap(), normal);
    assert!(pieces >= normal.len() / 100, "{pieces} pieces for {} bytes", normal.len());
}

#[tokio::test]
async fn synthetic_table_serves_a_100k_row_snapshot_in_chunks_whose_rows_add_up() {
    let server =
        ShapeServer::start(ServerOptions { chunk_bytes: 2 * 1024 * 1024, ..fast_options() }).await.unwrap();
    let items = server.create_synthetic_table("items", 100_000);
    let responses = sync_to_head(&server, &[]).await;
    let snapshot = &responses[..responses.len() - 1];
    assert!(snapshot.len() > 3, "about 17 MB of rows at 2 MiB per chunk");
    let mut next_id = 1u64;
    for r in snapshot {
        for change in r.changes() {
            assert_eq!(change["value"]["id"], json!(next_id.to_string()));
            next_id += 1;
        }
    }
    assert_eq!(next_id - 1, 100_000);
    assert_eq!(snapshot.last().unwrap().controls(), vec!["snapshot-end"]);
    let row = &snapshot[0].changes()[0];
    assert_eq!(row["value"]["tags"], "{alpha,\"b 1\",NULL}");
    assert_eq!(row["value"]["flag"], "f");
    let schema: serde_json::Value =
        serde_json::from_str(snapshot[0].header("electric-schema").unwrap()).unwrap();
    assert_eq!(schema["tags"], json!({"type": "text", "dims": 1}));

    let appended = items.append_generated();
    let head = responses.last().unwrap();
    let live = get(
        &server,
        &[("table", "items"), ("offset", head.offset()), ("handle", head.handle()), ("live", "")],
    )
    .await;
    assert_eq!(live.offset(), appended.to_string());
    assert_eq!(live.changes()[0]["value"]["id"], "100001");
}
