//! The memory sink passes the sink compliance suite.

use std::sync::Arc;

use shapesync_core::{Sink, async_trait};
use shapesync_sink_memory::{MemorySink, MemoryStore};
use shapesync_testkit::compliance::{SinkUnderTest, StoredRows, check_sink};

struct Memory(MemoryStore);

#[async_trait]
impl SinkUnderTest for Memory {
    async fn open(&self) -> Arc<dyn Sink> {
        Arc::new(MemorySink::new(self.0.clone()))
    }

    async fn rows(&self) -> StoredRows {
        self.0.read(|rows| {
            rows.values()
                .map(|row| {
                    let cols = row
                        .iter()
                        .filter_map(|(c, v)| Some((c.to_owned(), v.render()?.into_owned())))
                        .collect();
                    (row["id"].to_string(), cols)
                })
                .collect()
        })
    }
}

#[tokio::test]
async fn memory_sink_passes_the_compliance_suite() {
    check_sink(&Memory(MemoryStore::new())).await;
}
