//! Transient faults and refused responses are logged at warn. Its own test binary (as
//! redaction.rs): every test here installs a capturing subscriber, so tracing's
//! process-wide callsite interest stays consistent.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shapesync_core::Offset;
use shapesync_electric::{ShapeOptions, ShapeStream};
use support::scripted::{Reply, scripted};
use support::*;

const SCHEMA: &str = r#"{"id":{"type":"int8","pk_index":0,"not_null":true}}"#;
const H: &str = "1-1";
const UP_TO_DATE: &str = r#"[{"headers":{"control":"up-to-date"}}]"#;
const INSERT_UP_TO_DATE: &str = r#"[{"key":"k1","value":{"id":"1"},"headers":{"operation":"insert"}},
    {"headers":{"control":"up-to-date"}}]"#;

/// Collects everything the tracing subscriber writes at warn and above.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Captures this thread's warnings until the guard drops.
    fn start() -> (Captured, tracing::subscriber::DefaultGuard) {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        (captured, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

fn non_live(offset: &'static str, body: &str) -> Reply {
    Reply::new(200, &[("electric-handle", H), ("electric-offset", offset), ("electric-schema", SCHEMA)], body)
}

/// A live 200 whose headers arrive but whose body never completes.
fn stalled_live_body(content_type: &str) -> Reply {
    Reply {
        status: 200,
        headers: vec![
            ("content-type", content_type.into()),
            ("electric-handle", H.into()),
            ("electric-offset", "0_inf".into()),
            ("electric-cursor", "1".into()),
        ],
        frames: vec!["[".into()],
        hold: true,
        endless: None,
    }
}

fn live(offset: &'static str, body: &str) -> Reply {
    Reply::new(200, &[("electric-handle", H), ("electric-offset", offset), ("electric-cursor", "2")], body)
}

/// Follows a script of: snapshot, a live response whose body stalls, a live change.
async fn stalled_body_then_change(configure: impl FnOnce(&mut ShapeOptions), content_type: &str) -> String {
    let (captured, _guard) = Captured::start();
    let server = scripted(vec![
        non_live("0_inf", UP_TO_DATE),
        stalled_live_body(content_type),
        live("1_0", INSERT_UP_TO_DATE),
    ])
    .await;
    let mut o = fast_options(&server.url, "items");
    o.request_timeout = Duration::from_millis(300);
    configure(&mut o);
    let mut s = ShapeStream::new(o).unwrap();
    assert!(next_response(&mut s).await.up_to_date);
    let r = next_response(&mut s).await;
    assert_eq!(r.changes.len(), 1);
    assert_eq!(r.offset, Offset::new(1, 0));
    assert_eq!(server.script.param(2, "offset").as_deref(), Some("0_inf"), "same offset");
    captured.text()
}

#[tokio::test]
async fn a_body_over_max_response_bytes_is_a_warned_fault_naming_the_setting() {
    let (captured, _guard) = Captured::start();
    let mut endless = non_live("0_0", "[");
    endless.endless = Some(" ".repeat(16 * 1024));
    let mut declared = non_live("0_0", "[");
    declared.headers.push(("content-length", "2147483648".into()));
    declared.hold = true;
    let server = scripted(vec![endless, declared, non_live("0_inf", UP_TO_DATE)]).await;
    let mut o = fast_options(&server.url, "items");
    o.max_response_bytes = 256 * 1024;
    let mut s = ShapeStream::new(o).unwrap();
    assert!(next_response(&mut s).await.up_to_date);
    assert_eq!(server.script.request_count(), 3);
    let logs = captured.text();
    assert!(
        logs.contains(
            "shape request failed (the response body is larger than `max_response_bytes` (262144 bytes;"
        ),
        "{logs}"
    );
    assert!(
        logs.contains(
            "the response declares a 2147483648-byte body, more than `max_response_bytes` (262144 bytes;"
        ),
        "{logs}"
    );
    assert!(logs.contains("failures=2"), "the backoff counted both: {logs}");
}

#[tokio::test]
async fn a_live_body_not_downloaded_in_time_is_a_transient_fault() {
    let logs = stalled_body_then_change(|_| {}, "application/json").await;
    assert!(logs.contains("WARN"), "{logs}");
    assert!(logs.contains("shape request failed (timed out"), "{logs}");
    assert!(logs.contains("failures=1"), "the backoff counted it: {logs}");
}

#[tokio::test]
async fn a_body_not_downloaded_in_time_after_an_sse_request_is_a_transient_fault() {
    // A server answering `live_sse` with plain JSON: no reqwest timeout on that request.
    let logs = stalled_body_then_change(|o| o.live_sse = true, "application/json").await;
    assert!(logs.contains("the response body did not arrive within 300ms"), "{logs}");
    assert!(logs.contains("failures=1"), "the backoff counted it: {logs}");
}

#[tokio::test]
async fn a_foreign_handle_mid_shape_is_logged_at_warn() {
    let (captured, _guard) = Captured::start();
    let foreign = Reply::new(
        200,
        &[("electric-handle", "9-9"), ("electric-offset", "5_0"), ("electric-schema", SCHEMA)],
        UP_TO_DATE,
    );
    let server = scripted(vec![non_live("0_0", "[]"), foreign, non_live("0_inf", UP_TO_DATE)]).await;
    let mut s = ShapeStream::new(fast_options(&server.url, "items")).unwrap();
    next_response(&mut s).await;
    assert_eq!(next_response(&mut s).await.handle, H);
    let logs = captured.text();
    assert!(logs.contains("WARN"), "{logs}");
    assert!(logs.contains("another shape handle than requested"), "{logs}");
    assert!(logs.contains("received=\"9-9\""), "{logs}");
}
