//! Secrets never reach the logs. Its own test binary: tracing caches per-callsite
//! interest process-wide, so other tests running in parallel threads without a
//! subscriber could otherwise hide this test's events.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::json;
use shapesync_electric::ShapeStream;
use shapesync_testkit::{Fault, ServerOptions};
use support::*;

/// Collects everything the tracing subscriber writes.
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

#[tokio::test]
async fn secrets_and_url_passwords_never_reach_the_logs() {
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let server =
        server_with(ServerOptions { secret: Some("top-s3cret".into()), ..ServerOptions::default() }).await;
    items(&server).seed([json!({"id": "1"})]);
    let mut o = options(&server, "items");
    let mut url = o.url.clone();
    url.set_username("admin").unwrap();
    url.set_password(Some("pa55word")).unwrap();
    o.url = url;
    o.secret = Some("top-s3cret".into());
    let o = o.header("authorization", "Bearer t0ken").unwrap();
    let mut s = ShapeStream::new(o).unwrap();
    server.inject(Fault::InternalError);
    next_response(&mut s).await;
    let debug = format!("{s:?}");

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("shape request"), "requests are logged at debug: {logs}");
    assert!(logs.contains("HTTP 500"), "{logs}");
    for leak in ["top-s3cret", "pa55word", "t0ken"] {
        assert!(!logs.contains(leak), "{leak} leaked into the logs: {logs}");
        assert!(!debug.contains(leak), "{leak} leaked into Debug: {debug}");
    }
}
