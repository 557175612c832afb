//! The compliance suite checks what it claims: a small correct sink passes it, and the
//! same sink with one classic ordering bug fails it, naming the broken rule.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shapesync_core::{Batch, Checkpoint, Operation, Row, Sink, SinkError, async_trait};
use shapesync_testkit::compliance::{SinkUnderTest, StoredRows, check_sink};

#[derive(Clone, Copy, PartialEq)]
enum Bug {
    None,
    /// Stores the checkpoint, then the rows it covers.
    CheckpointFirst,
    /// Starts a resync by deleting every row, then writes the new snapshot.
    DeleteBeforeRewrite,
}

#[derive(Default)]
struct Store {
    checkpoint: Option<Checkpoint>,
    /// Electric key → (row, generation that wrote it).
    rows: BTreeMap<String, (Row, u64)>,
}

struct ToySink {
    store: Arc<Mutex<Store>>,
    bug: Bug,
}

/// Where a buggy write leaves its window open, as a slow store would.
async fn window() {
    tokio::time::sleep(Duration::from_millis(30)).await;
}

#[async_trait]
impl Sink for ToySink {
    async fn checkpoint(&self) -> Result<Option<Checkpoint>, SinkError> {
        Ok(self.store.lock().unwrap().checkpoint.clone())
    }

    async fn apply(&self, batch: &Batch) -> Result<(), SinkError> {
        let generation = batch.checkpoint.generation;
        if self.bug == Bug::CheckpointFirst && !batch.changes.is_empty() {
            self.store.lock().unwrap().checkpoint = Some(batch.checkpoint.clone());
            window().await;
        }
        let starts_resync = self.store.lock().unwrap().rows.values().all(|(_, g)| *g < generation);
        if self.bug == Bug::DeleteBeforeRewrite && starts_resync && !batch.changes.is_empty() {
            self.store.lock().unwrap().rows.clear();
            window().await;
        }
        let mut store = self.store.lock().unwrap();
        for change in &batch.changes {
            match change.op {
                Operation::Insert => {
                    store.rows.insert(change.key.clone(), (change.value.clone(), generation));
                }
                Operation::Update => {
                    let entry =
                        store.rows.entry(change.key.clone()).or_insert_with(|| (Row::new(), generation));
                    entry.0.merge(&change.value);
                    entry.1 = generation;
                }
                Operation::Delete => {
                    store.rows.remove(&change.key);
                }
            }
        }
        if batch.sweep {
            store.rows.retain(|_, (_, g)| *g >= generation);
        }
        store.checkpoint = Some(batch.checkpoint.clone());
        Ok(())
    }

    async fn reset(&self) -> Result<(), SinkError> {
        *self.store.lock().unwrap() = Store::default();
        Ok(())
    }
}

struct Toy {
    store: Arc<Mutex<Store>>,
    bug: Bug,
}

#[async_trait]
impl SinkUnderTest for Toy {
    async fn open(&self) -> Arc<dyn Sink> {
        Arc::new(ToySink { store: self.store.clone(), bug: self.bug })
    }

    async fn rows(&self) -> StoredRows {
        let store = self.store.lock().unwrap();
        store
            .rows
            .values()
            .map(|(row, _)| {
                let cols =
                    row.iter().filter_map(|(c, v)| Some((c.to_owned(), v.render()?.into_owned()))).collect();
                (row["id"].to_string(), cols)
            })
            .collect()
    }
}

fn toy(bug: Bug) -> Toy {
    Toy { store: Arc::default(), bug }
}

#[tokio::test]
async fn a_correct_sink_passes() {
    check_sink(&toy(Bug::None)).await;
}

#[tokio::test]
#[should_panic(expected = "the checkpoint was visible before the rows it covers")]
async fn a_sink_that_stores_the_checkpoint_before_the_rows_fails() {
    check_sink(&toy(Bug::CheckpointFirst)).await;
}

#[tokio::test]
#[should_panic(expected = "went missing while it still exists")]
async fn a_sink_that_deletes_before_rewriting_during_a_resync_fails() {
    check_sink(&toy(Bug::DeleteBeforeRewrite)).await;
}
