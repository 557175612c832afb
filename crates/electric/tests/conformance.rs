//! The client-side conformance cases of electric-protocol.md §14, against the testkit
//! server. Each test is named after its case number.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use shapesync_core::{LogPosition, Offset, Operation, ResumePoint, Schema, Value};
use shapesync_electric::{LogMode, Replica, ShapeError, ShapeEvent, ShapeStream, StartFrom};
use shapesync_testkit::{Column, ElectricHeader, Fault, ServerOptions, TableDef};
use support::*;

fn o(s: &str) -> Offset {
    s.parse().unwrap()
}

#[tokio::test]
async fn case01_catch_up_then_live_with_cursor() {
    let server = server().await;
    let items = items(&server);
    items.seed([json!({"id": "1", "title": "a", "n": "1"}), json!({"id": "2", "title": "b", "n": null})]);
    let mut s = stream(&server);

    let first = next_response(&mut s).await;
    assert_eq!(first.offset, o("0_0"));
    assert!(!first.up_to_date, "an offset=-1 response is never up to date");
    assert_eq!(first.changes.len(), 2, "snapshot-end is not a change");
    assert!(first.changes.iter().all(|c| c.op == Operation::Insert && c.position.is_none()));
    let handle = items.handle().unwrap();
    assert_eq!(first.handle, handle);

    let second = next_response(&mut s).await;
    assert!(second.up_to_date);
    assert_eq!(second.offset, o("0_inf"));
    assert!(second.changes.is_empty());

    // Two live polls: the server times out each after 200 ms with [up-to-date].
    next_response(&mut s).await;
    next_response(&mut s).await;
    let log = server.requests();
    assert_eq!(log[0].param("offset"), Some("-1"));
    assert_eq!(log[0].param("handle"), None);
    assert!(!log[0].is_live());
    assert_eq!(log[1].param("offset"), Some("0_0"));
    assert_eq!(log[1].param("handle"), Some(handle.as_str()));
    assert!(!log[1].is_live());
    assert!(log[2].is_live());
    assert_eq!(log[2].param("offset"), Some("0_inf"));
    assert!(log[3].is_live());
    let cursor = log[3].param("cursor").expect("the live re-poll echoes electric-cursor");
    assert!(cursor.parse::<u64>().is_ok(), "{cursor}");
}

#[tokio::test]
async fn case02_multi_chunk_snapshot_is_up_to_date_only_at_the_end() {
    let server = server_with(ServerOptions {
        chunk_bytes: 200,
        long_poll_timeout: Duration::from_millis(200),
        ..ServerOptions::default()
    })
    .await;
    let items = items(&server);
    items.seed((1..=12).map(|i| json!({"id": i.to_string(), "title": format!("row {i}"), "n": "0"})));
    let mut s = stream(&server);
    let responses = until_up_to_date(&mut s).await;
    let snapshot_chunks: Vec<Offset> =
        responses.iter().map(|r| r.offset).filter(|o| o.is_snapshot()).collect();
    assert!(snapshot_chunks.len() >= 3, "{snapshot_chunks:?}");
    assert_eq!(&snapshot_chunks[..3], &[o("0_0"), o("0_1"), o("0_2")]);
    let (last, before) = responses.split_last().unwrap();
    assert!(last.up_to_date);
    assert!(before.iter().all(|r| !r.up_to_date), "nothing may be committed as up to date early");
    let mut m = Materialized::default();
    m.apply_all(&responses);
    assert_eq!(m.rows.len(), 12);
}

#[tokio::test]
async fn case03_response_ending_mid_transaction_is_not_a_commit_point() {
    let server = server().await;
    let items = items(&server);
    let mut s = stream(&server);
    until_up_to_date(&mut s).await;
    items
        .transaction()
        .insert(json!({"id": "1"}))
        .insert(json!({"id": "2"}))
        .insert(json!({"id": "3"}))
        .commit();
    server.inject(Fault::EndMidTransaction);
    let cut = next_response(&mut s).await;
    assert!(!cut.up_to_date);
    assert!(!cut.changes.is_empty());
    assert!(cut.changes.iter().all(|c| !c.last_in_tx), "the transaction is not complete yet");
    let rest = until_up_to_date(&mut s).await;
    let all: Vec<_> = cut.changes.iter().chain(rest.iter().flat_map(|r| &r.changes)).collect();
    assert_eq!(all.len(), 3);
    assert!(all[2].last_in_tx, "the last op carries last: true");
    assert!(!all[0].last_in_tx && !all[1].last_in_tx);
    let log = server.requests();
    let after_cut = log.iter().position(|r| r.fault == Some(Fault::EndMidTransaction)).unwrap() + 1;
    assert!(!log[after_cut].is_live(), "after a cut response the client catches up non-live");
}

#[tokio::test]
async fn case04_live_timeout_repolls_with_the_new_cursor_and_same_offset() {
    let server = server().await;
    let items = items(&server);
    items.seed([json!({"id": "1", "title": "a"})]);
    let mut s = stream(&server);
    let caught_up = until_up_to_date(&mut s).await;
    let mut m = Materialized::default();
    m.apply_all(&caught_up);
    let before = m.clone();
    let skip = server.requests().len();
    for _ in 0..3 {
        let r = next_response(&mut s).await;
        assert!(r.up_to_date && r.changes.is_empty());
        assert_eq!(r.offset, o("0_inf"));
        m.apply(&r.changes);
    }
    assert_eq!(m, before);
    let log = server.wait_for_requests(skip + 3, STEP).await.unwrap();
    let live: Vec<_> = log[skip..].iter().collect();
    assert!(live.iter().all(|r| r.is_live() && r.param("offset") == Some("0_inf")));
    let cursors: Vec<u64> = live[1..].iter().map(|r| r.param("cursor").unwrap().parse().unwrap()).collect();
    assert!(cursors.windows(2).all(|w| w[0] < w[1]), "each poll echoes the newer cursor: {cursors:?}");
}

#[tokio::test]
async fn case05_live_update_is_merged_and_the_offset_advances() {
    let server = server().await;
    let items = items(&server);
    items.seed([json!({"id": "1", "title": "a", "n": "5"})]);
    let mut s = stream(&server);
    let mut m = Materialized::default();
    m.apply_all(&until_up_to_date(&mut s).await);
    let offset = items.update(json!({"id": "1", "title": "b"}));
    let r = next_response(&mut s).await;
    assert!(r.up_to_date);
    assert_eq!(r.offset, offset);
    let [c] = &r.changes[..] else { panic!("{:?}", r.changes) };
    assert_eq!(c.op, Operation::Update);
    assert_eq!(c.value.keys().collect::<Vec<_>>(), ["id", "title"], "pk + changed columns only");
    let Offset::At { tx, op: shapesync_core::OpPart::Num(op) } = offset else { panic!() };
    assert_eq!(c.position, Some(LogPosition { lsn: tx, op_position: op }));
    assert!(c.last_in_tx);
    m.apply(&r.changes);
    let row = &m.rows[&item_key(1)];
    assert_eq!(row["title"], Value::Text("b".into()));
    assert_eq!(row["n"], Value::Int(5), "merged, not replaced");
    assert_eq!(s.offset(), Some(offset));
}

#[tokio::test]
async fn case06_replica_full_old_values_and_full_row_deletes() {
    let server = server().await;
    let items = items(&server);
    items.seed([json!({"id": "1", "title": "a", "n": "5"})]);
    let mut opts = options(&server, "items");
    opts.replica = Replica::Full;
    let mut s = ShapeStream::new(opts).unwrap();
    until_up_to_date(&mut s).await;
    let log = server.requests();
    assert_eq!(log[0].param("replica"), Some("full"));

    items.update(json!({"id": "1", "title": "b"}));
    let r = next_response(&mut s).await;
    let c = &r.changes[0];
    assert_eq!(c.op, Operation::Update);
    assert_eq!(c.value.len(), 3, "full new row");
    let old = c.old_value.as_ref().expect("old_value under replica=full");
    assert_eq!(old.keys().collect::<Vec<_>>(), ["title"], "changed columns only");
    assert_eq!(old["title"], Value::Text("a".into()));

    items.delete(json!({"id": "1"}));
    let r = next_response(&mut s).await;
    let c = &r.changes[0];
    assert_eq!(c.op, Operation::Delete);
    assert_eq!(c.value["title"], Value::Text("b".into()), "a delete carries the full old row");
    assert_eq!(c.value["n"], Value::Int(5));
}

#[tokio::test]
async fn case07_primary_key_change_is_delete_then_insert() {
    let server = server().await;
    let items = items(&server);
    items.seed([json!({"id": "1", "title": "a"})]);
    let mut s = stream(&server);
    let mut m = Materialized::default();
    m.apply_all(&until_up_to_date(&mut s).await);
    items.transaction().change_key(json!({"id": "1"}), json!({"id": "2", "title": "a"})).commit();
    let r = next_response(&mut s).await;
    let [del, ins] = &r.changes[..] else { panic!("{:?}", r.changes) };
    assert_eq!((del.op, del.key.as_str()), (Operation::Delete, item_key(1).as_str()));
    assert_eq!((ins.op, ins.key.as_str()), (Operation::Insert, item_key(2).as_str()));
    let (a, b) = (del.position.unwrap(), ins.position.unwrap());
    assert_eq!(a.lsn, b.lsn);
    assert_eq!(a.op_position + 1, b.op_position, "the insert sits at X+1");
    assert!(ins.last_in_tx && !del.last_in_tx);
    m.apply(&r.changes);
    assert_eq!(m.rows.keys().collect::<Vec<_>>(), [&item_key(2)]);
}

#[tokio::test]
async fn case08_where_move_in_and_move_out() {
    let server = server().await;
    let items = items(&server);
    items.register_where("n > 5", |row| {
        row.get("n").and_then(|n| n.parse::<i64>().ok()).is_some_and(|n| n > 5)
    });
    items.seed([json!({"id": "1", "title": "a", "n": "1"}), json!({"id": "2", "title": "b", "n": "10"})]);
    let mut opts = options(&server, "items");
    opts.where_clause = Some("n > 5".into());
    let mut s = ShapeStream::new(opts).unwrap();
    let mut m = Materialized::default();
    m.apply_all(&until_up_to_date(&mut s).await);
    assert_eq!(m.rows.keys().collect::<Vec<_>>(), [&item_key(2)]);
    assert_eq!(server.requests()[0].param("where"), Some("n > 5"));

    items.update(json!({"id": "1", "n": "7"}));
    let r = next_response(&mut s).await;
    let c = &r.changes[0];
    assert_eq!(c.op, Operation::Insert, "move-in");
    assert_eq!(c.value["title"], Value::Text("a".into()), "full row");
    m.apply(&r.changes);

    items.update(json!({"id": "2", "n": "0"}));
    let r = next_response(&mut s).await;
    let c = &r.changes[0];
    assert_eq!(c.op, Operation::Delete, "move-out");
    assert_eq!(c.key, item_key(2));
    m.apply(&r.changes);
    assert_eq!(m.rows.keys().collect::<Vec<_>>(), [&item_key(1)]);
}

#[tokio::test]
async fn case09_409_with_new_handle_resyncs_from_start_with_a_cache_buster() {
    let server = server().await;
    let items = items(&server);
    items.seed([json!({"id": "1"})]);
    let mut s = stream(&server);
    until_up_to_date(&mut s).await;
    let old = items.handle().unwrap();
    let skip = server.requests().len();
    items.rotate();
    let new = items.handle().unwrap();
    assert_ne!(old, new);
    match next(&mut s).await {
        ShapeEvent::MustRefetch { new_handle } => assert_eq!(new_handle.as_deref(), Some(new.as_str())),
        other => panic!("expected must-refetch, got {other:?}"),
    }
    let rebuilt = until_up_to_date(&mut s).await;
    assert_eq!(rebuilt[0].handle, new);
    let mut m = Materialized::default();
    m.apply_all(&rebuilt);
    assert_eq!(m.rows.len(), 1);
    let log = requests_after(&server, skip);
    assert_eq!(log[0].status, Some(409));
    assert_eq!(log[1].param("offset"), Some("-1"));
    assert!(log[1].param("cache-buster").is_some_and(|b| !b.is_empty()));
    // Only the request right after the 409 busts caches (TS `client.ts` `#requestShape`):
    // the later ones are plain, so CDNs can serve and collapse them.
    assert!(log.len() > 2);
    assert!(log[2..].iter().all(|r| r.param("cache-buster").is_none()), "only the request after a 409");
}

#[tokio::test]
async fn case10_409_without_handle_never_reuses_a_url() {
    let server = server().await;
    items(&server).seed([json!({"id": "1"})]);
    let mut s = stream(&server);
    server.inject_times(Fault::MustRefetch { with_handle: false }, 3);
    for _ in 0..3 {
        match next(&mut s).await {
            ShapeEvent::MustRefetch { new_handle } => assert_eq!(new_handle, None),
            other => panic!("expected must-refetch, got {other:?}"),
        }
    }
    let r = next_response(&mut s).await;
    assert_eq!(r.changes.len(), 1);
    let log = server.requests();
    assert_eq!(log.len(), 4);
    let urls: HashSet<String> = log.iter().map(|r| format!("{:?}", r.query)).collect();
    assert_eq!(urls.len(), 4, "a repeated 409 never reuses a URL");
    let busters: HashSet<&str> = log[1..].iter().map(|r| r.param("cache-buster").unwrap()).collect();
    assert_eq!(busters.len(), 3, "a fresh cache-buster after each 409");
}

#[tokio::test]
async fn case11_resume_starts_non_live_with_a_fresh_schema_and_catches_up() {
    let server = server().await;
    let items = items(&server);
    items.seed([json!({"id": "1"})]);
    let mut a = stream(&server);
    until_up_to_date(&mut a).await;
    let point = a.resume_point().unwrap();
    assert_eq!(point.offset, o("0_inf"));
    items.insert(json!({"id": "2", "n": "42"}));

    let mut b = stream(&server);
    // A stored schema that is out of date: the first response must replace it.
    b.resume(Some(ResumePoint { schema: Schema::default(), ..point.clone() }));
    let skip = server.requests().len();
    let r = next_response(&mut b).await;
    let first = &requests_after(&server, skip)[0];
    assert!(!first.is_live(), "the first request after a resume is not live");
    assert_eq!(first.param("offset"), Some("0_inf"));
    assert_eq!(first.param("handle"), Some(point.handle.as_str()));
    assert!(r.schema.0.contains_key("id"), "fresh electric-schema in force");
    assert_eq!(r.changes[0].value["n"], Value::Int(42), "typed with the fresh schema");
    assert!(r.up_to_date);
    next_response(&mut b).await;
    assert!(requests_after(&server, skip)[1].is_live(), "then it goes live");
}

#[tokio::test]
async fn case12_resume_with_a_vanished_handle_refetches_everything() {
    let server = server().await;
    let items = items(&server);
    items.seed([json!({"id": "1"}), json!({"id": "2"})]);
    let mut a = stream(&server);
    until_up_to_date(&mut a).await;
    let point = a.resume_point().unwrap();
    items.rotate();

    let mut b = stream(&server);
    b.resume(Some(point.clone()));
    match next(&mut b).await {
        ShapeEvent::MustRefetch { new_handle } => assert_eq!(new_handle, items.handle()),
        other => panic!("expected must-refetch, got {other:?}"),
    }
    let mut m = Materialized::default();
    let rebuilt = until_up_to_date(&mut b).await;
    m.apply_all(&rebuilt);
    assert_eq!(m.rows.len(), 2, "a full resync");
    assert_ne!(rebuilt[0].handle, point.handle);
}

#[tokio::test]
async fn case13_replaying_the_last_batch_leaves_the_same_state() {
    let server = server().await;
    let items = items(&server);
    items.seed([json!({"id": "1", "title": "a"})]);
    let mut a = stream(&server);
    let mut m = Materialized::default();
    m.apply_all(&until_up_to_date(&mut a).await);
    let persisted = a.resume_point().unwrap();
    items
        .transaction()
        .insert(json!({"id": "2", "title": "x"}))
        .update(json!({"id": "1", "title": "b"}))
        .commit();
    let batch = next_response(&mut a).await;
    m.apply(&batch.changes);
    let after_apply = m.clone();

    // Crash before persisting: resume from the older point and apply again.
    let mut b = stream(&server);
    b.resume(Some(persisted));
    let replay = next_response(&mut b).await;
    assert_eq!(replay.changes, batch.changes, "the same batch is delivered again");
    m.apply(&replay.changes);
    assert_eq!(m, after_apply);
}

#[tokio::test]
async fn case14_offset_past_the_end_refetches() {
    let server = server().await;
    let items = items(&server);
    items.seed([json!({"id": "1"})]);
    let handle = items.handle().unwrap();
    let mut s = stream(&server);
    s.resume(Some(ResumePoint {
        handle: handle.clone(),
        offset: o("999999999_0"),
        schema: Schema::default(),
    }));
    match next(&mut s).await {
        ShapeEvent::MustRefetch { .. } => {}
        other => panic!("expected must-refetch, got {other:?}"),
    }
    let mut m = Materialized::default();
    m.apply_all(&until_up_to_date(&mut s).await);
    assert_eq!(m.rows.len(), 1);
    let log = server.requests();
    assert_eq!(log[0].status, Some(400));
    assert_eq!(log[1].param("offset"), Some("-1"));
    assert!(log[1].param("cache-buster").is_some());
}

async fn rejected(server: &shapesync_testkit::TestServer, mut s: ShapeStream) -> ShapeError {
    let before = server.requests().len();
    let err = try_next(&mut s).await.expect_err("a 4xx ends the stream");
    assert_eq!(server.requests().len(), before + 1, "no retry after {err}");
    err
}

#[tokio::test]
async fn case15_validation_errors_are_typed_and_not_retried() {
    let server =
        server_with(ServerOptions { secret: Some("right".into()), ..ServerOptions::default() }).await;
    items(&server);

    let mut o = options(&server, "no_such_table");
    o.secret = Some("right".into());
    match rejected(&server, ShapeStream::new(o).unwrap()).await {
        ShapeError::Rejected { status: 400, param, message, .. } => {
            assert_eq!(param.as_deref(), Some("table"));
            assert!(message.contains("does not exist"), "{message}");
        }
        other => panic!("{other:?}"),
    }

    let mut o = options(&server, "items");
    o.secret = Some("right".into());
    o.columns = Some(vec!["title".into()]);
    match rejected(&server, ShapeStream::new(o).unwrap()).await {
        ShapeError::Rejected { status: 400, param, .. } => assert_eq!(param.as_deref(), Some("columns")),
        other => panic!("{other:?}"),
    }

    let mut o = options(&server, "items");
    o.secret = Some("wrong-s3cret".into());
    o.auth_retries = 0; // 401s are retried `auth_retries` times (see credentials.rs)
    let e = rejected(&server, ShapeStream::new(o).unwrap()).await;
    match &e {
        ShapeError::Rejected { status: 401, param, .. } => assert_eq!(param.as_deref(), Some("secret")),
        other => panic!("{other:?}"),
    }
    assert!(!e.to_string().contains("wrong-s3cret"), "{e}");

    // Unknown route: 404.
    let mut o = options(&server, "items");
    o.url = o.url.join("/v1/nothing-here").unwrap();
    let before = server.requests().len();
    let e = try_next(&mut ShapeStream::new(o).unwrap()).await.unwrap_err();
    assert!(matches!(e, ShapeError::Rejected { status: 404, .. }), "{e:?}");
    assert_eq!(server.requests().len(), before, "the testkit logs /v1/shape only");

    // Offsets like `10`, a handle-less `5_0`, `live` with `-1` and `live_sse` without
    // `live` cannot be expressed through the typed API; the server-side 400s for them
    // take the same path as the ones above.
}

#[tokio::test]
async fn case16_503_retry_after_is_a_floor_and_5xx_retry_with_backoff_at_the_same_offset() {
    let server = server().await;
    let items = items(&server);
    items.seed([json!({"id": "1"})]);
    let mut s = stream(&server);
    next_response(&mut s).await;
    server.inject(Fault::ServiceUnavailable { retry_after: Some(1) });
    server.inject_times(Fault::InternalError, 6);
    let skip = server.requests().len();
    let r = next_response(&mut s).await;
    assert!(r.up_to_date);
    let log = requests_after(&server, skip);
    assert_eq!(log.len(), 8, "one 503, six 500s, then success");
    assert!(log.iter().all(|r| r.param("offset") == Some("0_0")), "retries keep the offset");
    assert_eq!(log[0].status, Some(503));
    assert!(
        log[1].received_at.duration_since(log[0].received_at) >= Duration::from_secs(1),
        "waited at least retry-after"
    );
    assert!(log[1..7].iter().all(|r| r.status == Some(500)));
    assert_eq!(log[7].status, Some(200));
}

#[tokio::test]
async fn case17_missing_headers_are_fatal_and_never_loop() {
    let server = server().await;
    let items = items(&server);
    items.seed([json!({"id": "1"})]);
    let cases = [
        (ElectricHeader::Handle, "electric-handle", false),
        (ElectricHeader::Offset, "electric-offset", false),
        (ElectricHeader::Schema, "electric-schema", false),
        (ElectricHeader::Cursor, "electric-cursor", true),
    ];
    for (fault, name, live) in cases {
        let mut s = stream(&server);
        if live {
            until_up_to_date(&mut s).await;
        }
        server.inject(Fault::MissingHeader(fault));
        let before = server.requests().len();
        match try_next(&mut s).await {
            Err(ShapeError::MissingHeader { header, status: 200 }) => assert_eq!(header, name),
            other => panic!("{name}: {other:?}"),
        }
        assert_eq!(server.requests().len(), before + 1, "{name}: no retry");
    }
}

#[tokio::test]
async fn case18_stale_cached_handle_retries_with_cache_busters_then_resets_once() {
    let server = server().await;
    let items = items(&server);
    items.seed([json!({"id": "1"})]);
    let mut s = stream(&server);
    until_up_to_date(&mut s).await;
    let handle = items.handle().unwrap();
    // The 409 expires the handle, but (like a cache) the server keeps serving it.
    server.inject(Fault::MustRefetch { with_handle: false });
    let skip = server.requests().len();
    assert!(matches!(next(&mut s).await, ShapeEvent::MustRefetch { new_handle: None }));
    assert!(
        matches!(next(&mut s).await, ShapeEvent::MustRefetch { new_handle: None }),
        "after 3 cache-buster retries the stream resets once"
    );
    let r = next_response(&mut s).await;
    assert_eq!(r.handle, handle, "after the reset the handle is accepted");
    let log = requests_after(&server, skip);
    let starts: Vec<_> = log.iter().filter(|r| r.param("offset") == Some("-1")).collect();
    assert_eq!(starts.len(), 5, "first try, 3 retries, then after the reset");
    let busters: HashSet<&str> = starts.iter().map(|r| r.param("cache-buster").unwrap()).collect();
    assert_eq!(busters.len(), 5, "each retry uses a new cache-buster");
    assert_eq!(starts[0].param("expired_handle"), Some(handle.as_str()));
}

#[tokio::test]
async fn case19_non_advancing_responses_reset_then_back_off_then_fail() {
    let server = server().await;
    items(&server).seed([json!({"id": "1"})]);
    // Every offset=-1 request gets 304 Not Modified: the stream never advances.
    #[cfg(feature = "rustls")]
    shapesync_electric::install_tls_provider();
    let etag =
        reqwest::get(format!("{}?table=items&offset=-1", server.url())).await.unwrap().headers()["etag"]
            .to_str()
            .unwrap()
            .to_owned();
    server.clear_requests();
    let o = options(&server, "items").header("if-none-match", &etag).unwrap();
    let mut s = ShapeStream::new(o).unwrap();
    let mut refetches = 0;
    let mut events = 0;
    let err = loop {
        events += 1;
        assert!(events < 500, "the fast-loop guard never gave up");
        match try_next(&mut s).await {
            Ok(ShapeEvent::MustRefetch { .. }) => refetches += 1,
            Ok(ShapeEvent::Response(r)) => assert!(r.changes.is_empty() && !r.up_to_date),
            Err(e) => break e,
        }
    };
    assert_eq!(refetches, 1, "only the first detection resets");
    assert!(matches!(err, ShapeError::Protocol(_)), "{err:?}");
    let log = server.requests();
    assert_eq!(log.len(), 25, "five detections of five requests each");
    assert!(log.iter().all(|r| r.status == Some(304)));
}

#[tokio::test]
async fn case20_offset_now_skips_existing_rows_then_goes_live() {
    let server = server().await;
    let items = items(&server);
    items.seed([json!({"id": "1"})]);
    let existing = items.insert(json!({"id": "2"}));
    let mut opts = options(&server, "items");
    opts.start = StartFrom::Now;
    opts.log = LogMode::ChangesOnly;
    let mut s = ShapeStream::new(opts).unwrap();
    let r = next_response(&mut s).await;
    assert!(r.up_to_date && r.changes.is_empty());
    assert_eq!(r.offset, existing);
    let inserted = items.insert(json!({"id": "3"}));
    let r = next_response(&mut s).await;
    assert_eq!(r.changes.len(), 1);
    assert_eq!(r.changes[0].key, item_key(3));
    assert_eq!(r.offset, inserted);
    let log = server.requests();
    assert_eq!(log[0].param("offset"), Some("now"));
    assert_eq!(log[0].param("log"), Some("changes_only"));
    assert!(!log[0].is_live());
    assert!(log[1].is_live());
    assert_eq!(log[1].param("offset"), Some(existing.to_string().as_str()));
}

#[tokio::test]
async fn case22_values_are_typed_through_the_schema() {
    let server = server().await;
    let t = server.create_table(
        TableDef::new("typed")
            .column(Column::new("id", "int8").primary_key())
            .column(Column::new("ok", "bool"))
            .column(Column::new("tags", "text").dims(1))
            .column(Column::new("doc", "jsonb"))
            .column(Column::new("amt", "numeric").schema_field("precision", 10).schema_field("scale", 2))
            .column(Column::new("req", "text").not_null()),
    );
    t.seed([json!({"id": "9007199254740993", "ok": "t", "tags": "{\"a,b\",NULL}",
                   "doc": "{\"n\": 1.50}", "amt": "12.30", "req": "x"})]);
    let mut s = ShapeStream::new(options(&server, "typed")).unwrap();
    let r = next_response(&mut s).await;
    let v = &r.changes[0].value;
    assert_eq!(v["id"], Value::Int(9_007_199_254_740_993));
    assert_eq!(v["ok"], Value::Bool(true));
    assert_eq!(v["tags"], Value::Array(vec![Value::Text("a,b".into()), Value::Null]));
    assert_eq!(v["doc"], Value::Json("{\"n\": 1.50}".into()));
    assert_eq!(v["amt"], Value::Numeric("12.30".into()));
    until_up_to_date(&mut s).await;

    t.insert(json!({"id": "2", "req": null}));
    let before = server.requests().len();
    match try_next(&mut s).await {
        Err(ShapeError::Protocol(m)) => assert!(m.contains("NOT NULL") && m.contains("req"), "{m}"),
        other => panic!("null in a not_null column must fail: {other:?}"),
    }
    assert_eq!(server.requests().len(), before + 1);
}

#[tokio::test]
async fn non_ascii_column_names_arrive_in_the_raw_utf8_schema_header() {
    // Electric's JSON encoder leaves non-ASCII unescaped, so the `electric-schema`
    // header carries raw UTF-8 bytes (as the testkit sends it).
    let server = server().await;
    let t = server.create_table(
        TableDef::new("intl")
            .column(Column::new("id", "int8").primary_key())
            .column(Column::new("ünï", "text"))
            .column(Column::new("größe", "int4")),
    );
    t.seed([json!({"id": "1", "ünï": "çà va", "größe": "7"})]);
    let mut s = ShapeStream::new(options(&server, "intl")).unwrap();
    let r = next_response(&mut s).await;
    let v = &r.changes[0].value;
    assert_eq!(v["ünï"], Value::Text("çà va".into()));
    assert_eq!(v["größe"], Value::Int(7), "typed through the schema, so the header was read");
    assert!(s.schema().unwrap().0.contains_key("ünï"));
    until_up_to_date(&mut s).await;
    t.insert(json!({"id": "2", "ünï": "zwei", "größe": "2"}));
    let r = next_response(&mut s).await;
    assert_eq!(r.changes[0].value["größe"], Value::Int(2));
}

#[tokio::test]
async fn case23_keys_are_opaque_strings() {
    let server = server().await;
    let t = server.create_table(TableDef::new("t").column(Column::new("id", "text").primary_key()));
    t.seed([json!({"id": "a/b"})]);
    let c = server.create_table(
        TableDef::new("pairs")
            .column(Column::new("a", "text").primary_key())
            .column(Column::new("b", "int4").primary_key()),
    );
    c.seed([json!({"a": "x", "b": "1"})]);
    let mut s = ShapeStream::new(options(&server, "t")).unwrap();
    assert_eq!(next_response(&mut s).await.changes[0].key, r#""public"."t"/"a//b""#);
    let mut s = ShapeStream::new(options(&server, "pairs")).unwrap();
    assert_eq!(next_response(&mut s).await.changes[0].key, r#""public"."pairs"/"x"/"1""#);
}

#[tokio::test]
async fn case24_control_messages_other_than_up_to_date_are_ignored() {
    let server = server().await;
    items(&server).seed([json!({"id": "1"})]);
    let mut s = stream(&server);
    // The snapshot response ends with snapshot-end (xmin/xmax/xip_list).
    let r = next_response(&mut s).await;
    assert_eq!(r.changes.len(), 1, "snapshot-end yields no change");
    assert!(!r.up_to_date);
    // Unknown controls and move-in/move-out events: tests/statuses.rs (the testkit
    // does not emit them).
}

#[tokio::test]
async fn case25_truncate_during_live_gives_409_and_an_empty_new_snapshot() {
    let server =
        server_with(ServerOptions { long_poll_timeout: Duration::from_secs(10), ..ServerOptions::default() })
            .await;
    let items = items(&server);
    items.seed([json!({"id": "1"})]);
    let mut s = stream(&server);
    until_up_to_date(&mut s).await;
    let old = items.handle().unwrap();
    let truncate = async {
        server.wait_for("a live request", STEP, |log| log.iter().any(|r| r.is_live())).await.unwrap();
        items.truncate();
    };
    let (event, ()) = tokio::join!(next(&mut s), truncate);
    assert!(matches!(event, ShapeEvent::MustRefetch { new_handle: None }), "{event:?}");
    let rebuilt = until_up_to_date(&mut s).await;
    assert!(rebuilt.iter().all(|r| r.changes.is_empty()), "the new snapshot is empty");
    assert_ne!(rebuilt[0].handle, old);
}

#[tokio::test]
async fn case27_not_modified_leaves_the_state_unchanged() {
    let server = server().await;
    let items = items(&server);
    items.seed([json!({"id": "1"})]);
    let mut a = stream(&server);
    until_up_to_date(&mut a).await;
    let point = a.resume_point().unwrap();
    let next_offset = items.insert(json!({"id": "2"}));
    let etag = format!("\"{}:{}:{}\"", point.handle, point.offset, next_offset);

    let o = options(&server, "items").header("If-None-Match", &etag).unwrap();
    let mut s = ShapeStream::new(o).unwrap();
    s.resume(Some(point.clone()));
    let r = next_response(&mut s).await;
    assert!(r.changes.is_empty() && !r.up_to_date);
    assert_eq!(r.offset, point.offset);
    assert_eq!(s.resume_point().unwrap(), point, "state unchanged");
    let last = server.requests().pop().unwrap();
    assert_eq!(last.status, Some(304));
    assert_eq!(last.if_none_match.as_deref(), Some(etag.as_str()));
}
