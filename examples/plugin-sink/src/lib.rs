//! An example plugin: `type: json_file`, a sink that keeps the shape as one JSON file
//! (`{"checkpoint": …, "rows": {key: row}}`), replaced atomically on every commit by
//! writing a temporary file and renaming it over the old one — so data and checkpoint
//! always move together, as the `Sink` contract requires.
//!
//! A plugin is an ordinary crate: a config struct (`deny_unknown_fields`) implementing
//! [`SinkConfig`], a [`Sink`], and a `register` function; `src/main.rs` adds it to the
//! built-in registry and runs the stock command line.
//!
//! Its errors show how a plugin reports failures: the constructor of the error's kind
//! ([`SinkError::unavailable`] for what retrying may fix, [`SinkError::rejected`] and
//! [`SinkError::corrupt_checkpoint`] for what it cannot), the underlying error kept
//! with [`SinkError::with_source`], and the store's code with [`SinkError::with_code`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use shapesync_core::{
    Batch, Checkpoint, ConfigError, ErrorCode, Operation, Registry, Row, Sink, SinkConfig, SinkContext,
    SinkError, async_trait,
};
use tokio::sync::Mutex;

/// `type: json_file` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonFileSinkConfig {
    /// The file to keep the shape in.
    pub path: PathBuf,
}

#[async_trait]
impl SinkConfig for JsonFileSinkConfig {
    fn check(&self, _ctx: &SinkContext) -> Result<(), ConfigError> {
        if self.path.file_name().is_none() {
            return Err(ConfigError::new("path", "expected a file path"));
        }
        Ok(())
    }

    async fn build(self, _ctx: SinkContext) -> Result<Arc<dyn Sink>, SinkError> {
        let state = read(&self.path).await?;
        Ok(Arc::new(JsonFileSink { path: self.path, state: Mutex::new(state) }))
    }
}

/// Registers `type: json_file`.
pub fn register(registry: &mut Registry) {
    registry.sink::<JsonFileSinkConfig>("json_file");
}

/// What the file holds. Rows carry their generation so a resync can sweep.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    checkpoint: Option<Checkpoint>,
    rows: BTreeMap<String, serde_json::Value>,
    generations: BTreeMap<String, u64>,
}

/// The sink: the file's content in memory, written through on every batch.
pub struct JsonFileSink {
    path: PathBuf,
    state: Mutex<State>,
}

async fn read(path: &PathBuf) -> Result<State, SinkError> {
    match tokio::fs::read(path).await {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| SinkError::corrupt_checkpoint(format!("{}: {e}", path.display())).with_source(e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(io_error("cannot read", path, e)),
    }
}

/// A failed file operation: retried (the disk may be full, the directory briefly
/// unmounted), with the OS error number as the code and the error as the source.
fn io_error(what: &str, path: &std::path::Path, e: std::io::Error) -> SinkError {
    let error = SinkError::unavailable(format!("{what} {}: {e}", path.display()));
    let error = match e.raw_os_error() {
        Some(errno) => error.with_code(ErrorCode::Other(format!("errno {errno}"))),
        None => error,
    };
    error.with_source(e)
}

fn to_json(row: &Row) -> serde_json::Value {
    serde_json::to_value(row).expect("rows always serialize")
}

#[async_trait]
impl Sink for JsonFileSink {
    async fn checkpoint(&self) -> Result<Option<Checkpoint>, SinkError> {
        Ok(self.state.lock().await.checkpoint.clone())
    }

    async fn apply(&self, batch: &Batch) -> Result<(), SinkError> {
        let mut state = self.state.lock().await;
        // Work on a copy: if writing fails, memory still matches the file.
        let mut next = State {
            checkpoint: Some(batch.checkpoint.clone()),
            rows: state.rows.clone(),
            generations: state.generations.clone(),
        };
        let generation = batch.checkpoint.generation;
        for change in &batch.changes {
            match change.op {
                Operation::Insert => {
                    next.rows.insert(change.key.clone(), to_json(&change.value));
                }
                Operation::Update => {
                    let row = next.rows.entry(change.key.clone()).or_insert_with(|| serde_json::json!({}));
                    if let (Some(row), serde_json::Value::Object(cols)) =
                        (row.as_object_mut(), to_json(&change.value))
                    {
                        row.extend(cols);
                    }
                }
                Operation::Delete => {
                    next.rows.remove(&change.key);
                    next.generations.remove(&change.key);
                    continue;
                }
            }
            next.generations.insert(change.key.clone(), generation);
        }
        if batch.sweep {
            let gone: Vec<String> =
                next.generations.iter().filter(|(_, g)| **g < generation).map(|(k, _)| k.clone()).collect();
            for key in gone {
                next.rows.remove(&key);
                next.generations.remove(&key);
            }
        }
        let bytes = serde_json::to_vec_pretty(&next).map_err(|e| {
            SinkError::rejected(format!("cannot encode the rows as JSON: {e}")).with_source(e)
        })?;
        let tmp = self.path.with_extension("tmp");
        let io = |e: std::io::Error| io_error("cannot write", &self.path, e);
        tokio::fs::write(&tmp, &bytes).await.map_err(io)?;
        tokio::fs::File::open(&tmp).await.map_err(io)?.sync_all().await.map_err(io)?;
        tokio::fs::rename(&tmp, &self.path).await.map_err(io)?;
        *state = next;
        Ok(())
    }

    async fn reset(&self) -> Result<(), SinkError> {
        let mut state = self.state.lock().await;
        match tokio::fs::remove_file(&self.path).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("cannot remove", &self.path, e)),
        }
        *state = State::default();
        Ok(())
    }
}
