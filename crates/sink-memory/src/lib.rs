//! The memory sink: the shape's rows in an in-process map, kept fresh by a
//! pipeline — an auto-invalidated cache for a Rust service.
//!
//! [`MemoryStore`] is the reader's handle: look rows up by key, iterate, ask whether
//! the data is up to date, and subscribe to every commit. [`MemorySink`] is the
//! [`Sink`] a pipeline writes through. Every commit (rows, sweep, checkpoint) happens
//! under one write lock, so readers only ever see whole transactions.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use serde::Deserialize;
use shapesync_core::registry::Registry;
use shapesync_core::{
    Batch, Change, Checkpoint, Operation, Row, Sink, SinkConfig, SinkContext, SinkError, async_trait,
};
use tokio::sync::{broadcast, watch};

/// Commits a slow subscriber may fall behind before it sees `Lagged`.
const SUBSCRIBER_BUFFER: usize = 1024;

/// One committed batch, as subscribers receive it.
#[derive(Debug, Clone)]
pub struct Commit {
    /// The changes applied, in order.
    pub changes: Vec<Change>,
    /// Keys removed by a resync's sweep (rows that left the shape).
    pub swept: Vec<String>,
    /// The checkpoint stored with them.
    pub checkpoint: Checkpoint,
    /// The store is at the shape's head after this commit.
    pub up_to_date: bool,
}

#[derive(Default)]
struct State {
    rows: BTreeMap<String, Row>,
    generations: HashMap<String, u64>,
    checkpoint: Option<Checkpoint>,
}

struct Inner {
    state: RwLock<State>,
    commits: broadcast::Sender<Arc<Commit>>,
    up_to_date: watch::Sender<bool>,
}

/// A reader's handle on a memory sink's rows. Cheap to clone.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("rows", &self.len())
            .field("up_to_date", &self.is_up_to_date())
            .finish()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore {
            inner: Arc::new(Inner {
                state: RwLock::default(),
                commits: broadcast::channel(SUBSCRIBER_BUFFER).0,
                up_to_date: watch::channel(false).0,
            }),
        }
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.inner.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The row stored under an Electric row key.
    pub fn get(&self, key: &str) -> Option<Row> {
        self.read_state().rows.get(key).cloned()
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.read_state().rows.len()
    }

    /// No rows at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `f` over a consistent view of all rows (by key), without copying them.
    pub fn read<R>(&self, f: impl FnOnce(&BTreeMap<String, Row>) -> R) -> R {
        f(&self.read_state().rows)
    }

    /// A copy of all rows, ordered by key.
    pub fn rows(&self) -> BTreeMap<String, Row> {
        self.read_state().rows.clone()
    }

    /// The stored checkpoint.
    pub fn checkpoint(&self) -> Option<Checkpoint> {
        self.read_state().checkpoint.clone()
    }

    /// The last commit brought the store to the shape's head.
    pub fn is_up_to_date(&self) -> bool {
        *self.inner.up_to_date.borrow()
    }

    /// Waits until the store is up to date.
    pub async fn wait_up_to_date(&self) {
        let mut rx = self.inner.up_to_date.subscribe();
        // The sender lives in `self`, so this cannot fail while we hold it.
        let _ = rx.wait_for(|up| *up).await;
    }

    /// Every commit from now on, in order.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Commit>> {
        self.inner.commits.subscribe()
    }

    fn apply(&self, batch: &Batch) {
        let generation = batch.checkpoint.generation;
        let mut swept = Vec::new();
        {
            let mut state = self.inner.state.write().unwrap_or_else(|e| e.into_inner());
            let State { rows, generations, checkpoint } = &mut *state;
            for change in &batch.changes {
                match change.op {
                    Operation::Insert => {
                        rows.insert(change.key.clone(), change.value.clone());
                    }
                    Operation::Update => {
                        let row = rows.entry(change.key.clone()).or_default();
                        row.merge(&change.value);
                    }
                    Operation::Delete => {
                        rows.remove(&change.key);
                        generations.remove(&change.key);
                        continue;
                    }
                }
                generations.insert(change.key.clone(), generation);
            }
            if batch.sweep {
                generations.retain(|key, g| {
                    let keep = *g >= generation;
                    if !keep {
                        rows.remove(key);
                        swept.push(key.clone());
                    }
                    keep
                });
                swept.sort();
            }
            *checkpoint = Some(batch.checkpoint.clone());
        }
        self.inner.up_to_date.send_replace(batch.up_to_date);
        if self.inner.commits.receiver_count() == 0 {
            return; // nobody listens: do not copy the batch
        }
        let _ = self.inner.commits.send(Arc::new(Commit {
            changes: batch.changes.clone(),
            swept,
            checkpoint: batch.checkpoint.clone(),
            up_to_date: batch.up_to_date,
        }));
    }

    fn clear(&self) {
        *self.inner.state.write().unwrap_or_else(|e| e.into_inner()) = State::default();
        self.inner.up_to_date.send_replace(false);
    }
}

/// The [`Sink`] that writes into a [`MemoryStore`].
#[derive(Clone, Debug, Default)]
pub struct MemorySink {
    store: MemoryStore,
}

impl MemorySink {
    /// A sink writing into `store`.
    pub fn new(store: MemoryStore) -> Self {
        MemorySink { store }
    }

    /// The store this sink writes.
    pub fn store(&self) -> MemoryStore {
        self.store.clone()
    }
}

#[async_trait]
impl Sink for MemorySink {
    async fn checkpoint(&self) -> Result<Option<Checkpoint>, SinkError> {
        Ok(self.store.checkpoint())
    }

    async fn apply(&self, batch: &Batch) -> Result<(), SinkError> {
        self.store.apply(batch);
        Ok(())
    }

    async fn reset(&self) -> Result<(), SinkError> {
        self.store.clear();
        Ok(())
    }
}

/// `type: memory` — no settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySinkConfig {}

#[async_trait]
impl SinkConfig for MemorySinkConfig {
    async fn build(self, ctx: SinkContext) -> Result<Arc<dyn Sink>, SinkError> {
        Ok(Arc::new(MemorySink::new(store(&ctx.pipeline))))
    }
}

/// The process-wide store of the pipeline `id`, as used by `type: memory` sinks
/// built from pipeline files: application code reads a YAML-defined pipeline's
/// rows through this.
pub fn store(id: &str) -> MemoryStore {
    static STORES: OnceLock<Mutex<HashMap<String, MemoryStore>>> = OnceLock::new();
    let mut stores = STORES.get_or_init(Mutex::default).lock().unwrap_or_else(|e| e.into_inner());
    stores.entry(id.to_owned()).or_default().clone()
}

/// Registers `type: memory`.
pub fn register(registry: &mut Registry) {
    registry.sink::<MemorySinkConfig>("memory");
}

#[cfg(test)]
mod tests {
    use super::*;
    use shapesync_core::{Offset, Schema, Value};

    fn row(id: i64, title: &str) -> Row {
        [("id".to_owned(), Value::Int(id)), ("title".to_owned(), Value::Text(title.into()))].into()
    }

    fn batch(changes: Vec<Change>, generation: u64, sweep: bool) -> Batch {
        Batch {
            changes,
            checkpoint: Checkpoint {
                shape_hash: "h".into(),
                handle: "H".into(),
                offset: Offset::new(1, 0),
                schema: Schema::default(),
                generation,
                resyncing: false,
            },
            sweep,
            resync_reason: None,
            up_to_date: true,
            row_schema: None,
            fence: None,
        }
    }

    #[tokio::test]
    async fn applies_insert_merge_delete_and_notifies() {
        let sink = MemorySink::default();
        let store = sink.store();
        let mut commits = store.subscribe();
        let update = Change::update("k1", [("title".to_owned(), Value::Text("new".into()))].into());
        sink.apply(&batch(
            vec![Change::insert("k1", row(1, "a")), Change::insert("k2", row(2, "b"))],
            1,
            false,
        ))
        .await
        .unwrap();
        sink.apply(&batch(vec![update, Change::delete("k2", row(2, "b"))], 1, false)).await.unwrap();
        assert_eq!(store.get("k1"), Some(row(1, "new")), "update merges, keeping id");
        assert_eq!(store.get("k2"), None);
        assert!(store.is_up_to_date());
        assert_eq!(commits.recv().await.unwrap().changes.len(), 2);
        assert_eq!(commits.recv().await.unwrap().changes[0].op, Operation::Update);
    }

    #[tokio::test]
    async fn sweep_removes_only_older_generations() {
        let sink = MemorySink::default();
        sink.apply(&batch(
            vec![Change::insert("a", row(1, "a")), Change::insert("b", row(2, "b"))],
            1,
            false,
        ))
        .await
        .unwrap();
        sink.apply(&batch(vec![Change::insert("a", row(1, "a2"))], 2, false)).await.unwrap();
        assert_eq!(sink.store().len(), 2, "no row disappears before the sweep");
        let mut commits = sink.store().subscribe();
        sink.apply(&batch(vec![], 2, true)).await.unwrap();
        assert_eq!(sink.store().rows().keys().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(commits.recv().await.unwrap().swept, vec!["b".to_owned()]);
    }

    #[tokio::test]
    async fn reset_clears_rows_and_checkpoint() {
        let sink = MemorySink::default();
        sink.apply(&batch(vec![Change::insert("a", row(1, "a"))], 1, false)).await.unwrap();
        sink.reset().await.unwrap();
        assert!(sink.store().is_empty());
        assert!(sink.checkpoint().await.unwrap().is_none());
    }

    #[test]
    fn named_stores_are_shared() {
        store("named-test").apply(&batch(vec![Change::insert("a", row(1, "a"))], 1, false));
        assert_eq!(store("named-test").len(), 1);
        assert!(store("other-named-test").is_empty());
    }
}
