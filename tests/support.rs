//! Helpers shared by the end-to-end tests.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use shapesync_testkit::{Column, ServerOptions, TableDef, TestServer};

/// A pipeline file in the temp dir, removed on drop.
pub struct PipelineFile(pub PathBuf);

impl PipelineFile {
    /// Writes `text` to a fresh file named after `name`.
    pub fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("shapesync-e2e-{}-{name}.yaml", std::process::id()));
        std::fs::write(&path, text).expect("write pipeline file");
        PipelineFile(path)
    }

    /// The path as a string argument.
    pub fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for PipelineFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the `shapesync` command line in-process with the built-in registry.
pub async fn shapesync(args: &[&str]) -> ExitCode {
    let argv = std::iter::once("shapesync").chain(args.iter().copied());
    shapesync_cli::run_args(argv, shapesync_cli::builtin_registry()).await
}

/// A testkit server with short timeouts and small chunks, so tests see many chunks.
pub async fn server() -> TestServer {
    TestServer::start(ServerOptions {
        chunk_bytes: 2048,
        long_poll_timeout: Duration::from_millis(200),
        ..ServerOptions::default()
    })
    .await
    .expect("start testkit server")
}

/// The `items` table used across tests: id int8, title text, amount numeric, tags text[].
pub fn items_def(name: &str) -> TableDef {
    TableDef::new(name)
        .column(Column::new("id", "int8").primary_key().not_null())
        .column(Column::new("title", "text"))
        .column(Column::new("amount", "numeric"))
        .column(Column::new("tags", "text").dims(1))
}

/// The Electric key of row `id` in `table`.
pub fn key(table: &str, id: u64) -> String {
    format!("\"public\".\"{table}\"/\"{id}\"")
}
