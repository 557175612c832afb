//! Transport faults, request parameters, secrets in logs, and the `Source` / config
//! integration, against the testkit server.

mod support;

use std::time::Duration;

use serde_json::json;
use shapesync_core::registry::SourceConfig;
use shapesync_core::{Source, SourceError, SourceErrorKind, SourceEvent};
use shapesync_electric::{ElectricSourceConfig, LogMode, Replica, ShapeError, ShapeStream};
use shapesync_testkit::{Column, Fault, ServerOptions, TableDef};
use support::*;

#[tokio::test]
async fn a_body_dropped_mid_stream_is_retried_at_the_same_offset() {
    let server = server().await;
    items(&server).seed((1..=20).map(|i| json!({"id": i.to_string(), "title": "x".repeat(50)})));
    let mut s = stream(&server);
    server.inject(Fault::DropMidBody);
    let r = next_response(&mut s).await;
    assert_eq!(r.changes.len(), 20, "the full snapshot after the retry");
    let log = server.requests();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].fault, Some(Fault::DropMidBody));
    assert!(log.iter().all(|r| r.param("offset") == Some("-1")));
}

#[tokio::test]
async fn malformed_json_is_retried_then_becomes_a_protocol_error() {
    let server = server().await;
    items(&server).seed([json!({"id": "1"})]);
    let mut s = stream(&server);
    server.inject(Fault::MalformedJson);
    assert_eq!(next_response(&mut s).await.changes.len(), 1, "one bad body is retried");
    assert_eq!(server.requests().len(), 2);

    let mut s = stream(&server);
    let retries = s.options().malformed_body_retries as usize;
    server.inject_times(Fault::MalformedJson, retries + 1);
    let before = server.requests().len();
    match try_next(&mut s).await {
        Err(ShapeError::Protocol(m)) => assert!(m.contains("not valid JSON"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(server.requests().len(), before + retries + 1, "bounded: no endless loop");
}

#[tokio::test]
async fn a_stalled_non_live_body_is_retried_after_the_idle_timeout() {
    let server = server().await;
    items(&server).seed((1..=10).map(|i| json!({"id": i.to_string(), "title": "some text"})));
    let mut o = options(&server, "items");
    o.request_timeout = Duration::from_secs(120);
    o.idle_timeout = Duration::from_millis(300);
    let mut s = ShapeStream::new(o).unwrap();
    // The first 50 bytes, then silence far beyond the test's step.
    server.inject(Fault::Trickle { bytes: 50, delay: Duration::from_secs(600) });
    let r = next_response(&mut s).await;
    assert_eq!(r.changes.len(), 10);
    let log = server.requests();
    assert_eq!(log.len(), 2, "the stalled request was given up and retried");
    assert_eq!(log[1].param("offset"), Some("-1"));
}

#[tokio::test]
async fn a_slow_but_steady_non_live_body_outlasting_the_request_timeout_completes() {
    let server = server().await;
    let title = "t".repeat(100);
    items(&server).seed((1..=20).map(|i| json!({"id": i.to_string(), "title": title})));
    let mut o = options(&server, "items");
    // The body (over 3000 bytes, 100 every 50 ms) takes over 1.5 s: longer than the
    // request timeout, while no gap comes near the idle timeout.
    o.request_timeout = Duration::from_secs(1);
    o.idle_timeout = Duration::from_millis(500);
    let mut s = ShapeStream::new(o).unwrap();
    server.inject(Fault::Trickle { bytes: 100, delay: Duration::from_millis(50) });
    let r = next_response(&mut s).await;
    assert_eq!(r.changes.len(), 20);
    let log = server.requests();
    assert_eq!(log.len(), 1, "one request, downloaded whole: {log:?}");
    assert_eq!(log[0].fault, Some(Fault::Trickle { bytes: 100, delay: Duration::from_millis(50) }));
}

#[tokio::test]
async fn a_live_request_outliving_the_timeout_is_simply_repeated() {
    let server =
        server_with(ServerOptions { long_poll_timeout: Duration::from_secs(30), ..ServerOptions::default() })
            .await;
    let items = items(&server);
    let mut o = options(&server, "items");
    o.request_timeout = Duration::from_millis(300);
    let mut s = ShapeStream::new(o).unwrap();
    until_up_to_date(&mut s).await;
    let insert = async {
        let live = |log: &[shapesync_testkit::RequestRecord]| log.iter().filter(|r| r.is_live()).count();
        server.wait_for("two live requests", STEP, |log| live(log) >= 2).await.unwrap();
        items.insert(json!({"id": "1"}))
    };
    let (r, offset) = tokio::join!(next_response(&mut s), insert);
    assert_eq!(r.offset, offset);
    assert_eq!(r.changes.len(), 1);
    let log = server.requests();
    let live: Vec<_> = log.iter().filter(|r| r.is_live()).collect();
    assert!(live.iter().all(|r| r.param("offset") == Some("0_inf")), "same offset on every re-poll");
}

#[tokio::test]
async fn a_slow_but_complete_body_within_the_timeout_is_accepted() {
    let server = server().await;
    items(&server).seed([json!({"id": "1"})]);
    let mut s = stream(&server);
    server.inject(Fault::Trickle { bytes: 16, delay: Duration::from_millis(5) });
    assert_eq!(next_response(&mut s).await.changes.len(), 1);
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn every_shape_parameter_reaches_the_server() {
    let server =
        server_with(ServerOptions { secret: Some("s3cret".into()), ..ServerOptions::default() }).await;
    let t = server.create_table(
        TableDef::new("checks")
            .column(Column::new("id", "int4").primary_key())
            .column(Column::new("Status-Check", "text"))
            .column(Column::new("kind", "text")),
    );
    t.register_where("kind = $1", |_| true);
    t.seed([json!({"id": "1", "Status-Check": "ok", "kind": "a"})]);
    let mut o = options(&server, "public.checks");
    o.url = format!("{}?tenant=acme", server.url()).parse().unwrap();
    o.where_clause = Some("kind = $1".into());
    o.params.insert(1, "a".into());
    o.columns = Some(vec!["id".into(), "Status-Check".into()]);
    o.replica = Replica::Full;
    o.log = LogMode::Full;
    o.secret = Some("s3cret".into());
    let mut s = ShapeStream::new(o).unwrap();
    let r = next_response(&mut s).await;
    assert_eq!(r.changes[0].value.keys().collect::<Vec<_>>(), ["Status-Check", "id"]);
    let req = &server.requests()[0];
    assert_eq!(req.param("tenant"), Some("acme"), "the URL's own parameters are kept");
    assert_eq!(req.param("table"), Some("public.checks"));
    assert_eq!(req.param("where"), Some("kind = $1"));
    assert_eq!(req.param("params[1]"), Some("a"));
    assert_eq!(req.param("columns"), Some("id,\"Status-Check\""));
    assert_eq!(req.param("replica"), Some("full"));
    assert!(req.param("secret").is_some());
    assert_eq!(req.status, Some(200));
}

async fn next(source: &mut Box<dyn Source>) -> Result<SourceEvent, SourceError> {
    tokio::time::timeout(STEP, source.next()).await.expect("source answers in time")
}

#[tokio::test]
async fn the_pipeline_source_yields_responses_and_must_refetch() {
    let server = server().await;
    let items = items(&server);
    items.seed([json!({"id": "1"})]);
    let config: ElectricSourceConfig = serde_json::from_value(json!({
        "url": server.url(),
        "table": "items",
        "replica": "full",
        "timeout_secs": 5
    }))
    .unwrap();
    config.check().unwrap();
    assert!(config.shape().full_rows);
    let expected_hash = config.to_options().unwrap().definition_hash();
    let mut source: Box<dyn Source> = config.build(shapesync_core::SourceContext::default()).await.unwrap();
    assert_eq!(source.definition_hash(), expected_hash);
    source.resume(None);
    let mut up_to_date = false;
    while !up_to_date {
        match next(&mut source).await.unwrap() {
            SourceEvent::Response(r) => up_to_date = r.up_to_date,
            SourceEvent::MustRefetch => panic!("unexpected must-refetch"),
        }
    }
    items.rotate();
    assert!(matches!(next(&mut source).await.unwrap(), SourceEvent::MustRefetch));

    let bad: ElectricSourceConfig =
        serde_json::from_value(json!({"url": server.url(), "table": "missing"})).unwrap();
    let mut source = bad.build(shapesync_core::SourceContext::default()).await.unwrap();
    match next(&mut source).await {
        Err(e) if e.kind() == SourceErrorKind::Rejected && e.status() == Some(400) => {
            assert!(e.detail().starts_with("table:"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}
