//! The plugin sink runs a real pipeline through the stock command line.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;
use shapesync_testkit::{Column, ServerOptions, TableDef, TestServer};

async fn shapesync(args: &[&str]) -> ExitCode {
    let mut registry = shapesync_cli::builtin_registry();
    shapesync_example_plugin_sink::register(&mut registry);
    shapesync_cli::run_args(std::iter::once("shapesync").chain(args.iter().copied()), registry).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_sink_syncs_resumes_and_resyncs() {
    let server = TestServer::start(ServerOptions {
        long_poll_timeout: Duration::from_millis(200),
        ..Default::default()
    })
    .await
    .unwrap();
    let table = server.create_table(
        TableDef::new("notes")
            .column(Column::new("id", "int8").primary_key())
            .column(Column::new("body", "text")),
    );
    table.seed((1..=5).map(|i| json!({"id": i.to_string(), "body": format!("note {i}")})));
    let dir = std::env::temp_dir().join(format!("shapesync-plugin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("notes.json");
    let file = dir.join("pipeline.yaml");
    std::fs::write(
        &file,
        format!(
            "pipelines:\n  notes:\n    source: {{type: electric, url: '{}', table: notes}}\n    sink: {{type: json_file, path: '{}'}}\n",
            server.url(),
            out.display()
        ),
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let read = || -> serde_json::Value { serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap() };

    assert_eq!(shapesync(&["validate", file]).await, ExitCode::SUCCESS);
    assert_eq!(shapesync(&["run", "--once", file]).await, ExitCode::SUCCESS);
    assert_eq!(read()["rows"].as_object().unwrap().len(), 5);

    // Resume: a change and a delete arrive on the next run.
    table.transaction().update(json!({"id": "2", "body": "edited"})).delete(json!({"id": "5"})).commit();
    assert_eq!(shapesync(&["run", "--once", file]).await, ExitCode::SUCCESS);
    let state = read();
    assert_eq!(state["rows"]["\"public\".\"notes\"/\"2\""]["body"], "edited");
    assert_eq!(state["rows"].as_object().unwrap().len(), 4);

    // Rotation: the resync sweeps a row deleted while the shape was being rebuilt.
    table.transaction().delete(json!({"id": "4"})).commit();
    table.rotate();
    assert_eq!(shapesync(&["run", "--once", file]).await, ExitCode::SUCCESS);
    let state = read();
    assert_eq!(state["rows"].as_object().unwrap().len(), 3);
    assert_eq!(state["checkpoint"]["resyncing"], false);
    assert_eq!(state["checkpoint"]["handle"].as_str(), table.handle().as_deref());

    assert_eq!(shapesync(&["reset", file, "--pipeline", "notes", "--yes"]).await, ExitCode::SUCCESS);
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The plugin passes the same compliance suite as the built-in sinks.
struct JsonFile(std::path::PathBuf);

#[shapesync_core::async_trait]
impl shapesync_testkit::compliance::SinkUnderTest for JsonFile {
    async fn open(&self) -> std::sync::Arc<dyn shapesync_core::Sink> {
        let config = shapesync_example_plugin_sink::JsonFileSinkConfig { path: self.0.clone() };
        shapesync_core::SinkConfig::build(config, shapesync_core::SinkContext::default()).await.unwrap()
    }

    async fn rows(&self) -> shapesync_testkit::compliance::StoredRows {
        let Ok(bytes) = std::fs::read(&self.0) else { return Default::default() };
        let state: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let rows = state["rows"].as_object().cloned().unwrap_or_default();
        rows.values()
            .map(|row| {
                let cols = shapesync_testkit::compliance::columns_from_json(row);
                (cols["id"].clone(), cols)
            })
            .collect()
    }
}

#[tokio::test]
async fn the_plugin_passes_the_sink_compliance_suite() {
    let path = std::env::temp_dir().join(format!("shapesync-plugin-compliance-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&path);
    shapesync_testkit::compliance::check_sink(&JsonFile(path)).await;
}

#[tokio::test]
async fn the_plugins_errors_carry_their_kind_code_and_source() {
    use shapesync_core::{ErrorCode, SinkConfig, SinkContext, SinkErrorKind};
    let dir = std::env::temp_dir().join(format!("shapesync-plugin-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // A file that is not the plugin's JSON: its checkpoint is unreadable.
    let corrupt = dir.join("corrupt.json");
    std::fs::write(&corrupt, b"not json").unwrap();
    let config = shapesync_example_plugin_sink::JsonFileSinkConfig { path: corrupt };
    let err = config.build(SinkContext::default()).await.err().expect("an unreadable file is refused");
    assert_eq!(err.kind(), SinkErrorKind::CorruptCheckpoint, "{err}");
    assert!(std::error::Error::source(&err).is_some_and(|s| s.is::<serde_json::Error>()), "{err:?}");

    // A path whose directory is gone: writing fails with the OS's error, retried.
    let gone = dir.join("gone");
    std::fs::create_dir_all(&gone).unwrap();
    let config = shapesync_example_plugin_sink::JsonFileSinkConfig { path: gone.join("rows.json") };
    let sink = config.build(SinkContext::default()).await.unwrap();
    std::fs::remove_dir_all(&gone).unwrap();
    let checkpoint = shapesync_core::Checkpoint {
        shape_hash: "h".into(),
        handle: "h1".into(),
        offset: shapesync_core::Offset::Start,
        schema: shapesync_core::Schema::default(),
        generation: 1,
        resyncing: false,
    };
    let batch = shapesync_core::Batch::new(Vec::new(), checkpoint, false, true);
    let err = sink.apply(&batch).await.unwrap_err();
    assert_eq!(err.kind(), SinkErrorKind::Unavailable, "{err}");
    assert!(err.is_transient());
    assert!(matches!(err.code(), Some(ErrorCode::Other(c)) if c.starts_with("errno ")), "{err:?}");
    assert!(std::error::Error::source(&err).is_some_and(|s| s.is::<std::io::Error>()), "{err:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
