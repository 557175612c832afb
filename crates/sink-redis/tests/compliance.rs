//! The Redis sink passes the sink compliance suite, in every layout.

use std::collections::BTreeMap;
use std::sync::Arc;

use shapesync_core::{ShapeInfo, Sink, SinkContext, async_trait};
use shapesync_sink_redis::{Layout, RedisSink, RedisSinkConfig};
use shapesync_testkit::compliance::{SinkUnderTest, StoredRows, check_sink, columns_from_json};

const URL: &str = "redis://127.0.0.1:6379";

struct Redis {
    config: RedisSinkConfig,
    con: tokio::sync::Mutex<redis::aio::MultiplexedConnection>,
}

impl Redis {
    async fn new(layout: Layout) -> Self {
        let mut config = RedisSinkConfig::new(URL);
        config.layout = layout;
        config.prefix = format!("compliance:{}:{layout:?}:", std::process::id());
        let con = redis::Client::open(URL).unwrap().get_multiplexed_async_connection().await.unwrap();
        Redis { config, con: tokio::sync::Mutex::new(con) }
    }

    fn ctx() -> SinkContext {
        SinkContext {
            pipeline: "compliance".into(),
            shape: ShapeInfo { table: "items".into(), ..Default::default() },
        }
    }
}

/// Row JSON (json/table layouts) → column → text.
fn from_json(json: &str) -> BTreeMap<String, String> {
    columns_from_json(&serde_json::from_str(json).unwrap())
}

#[async_trait]
impl SinkUnderTest for Redis {
    async fn open(&self) -> Arc<dyn Sink> {
        Arc::new(RedisSink::connect(self.config.clone(), Self::ctx()).await.unwrap())
    }

    fn reads_atomically(&self) -> bool {
        false // KEYS, then one read per key
    }

    async fn rows(&self) -> StoredRows {
        let mut con = self.con.lock().await;
        let prefix = &self.config.prefix;
        let rows: Vec<BTreeMap<String, String>> = match self.config.layout {
            Layout::Table => {
                let fields: BTreeMap<String, String> =
                    redis::cmd("HGETALL").arg(format!("{prefix}items")).query_async(&mut *con).await.unwrap();
                fields.values().map(|j| from_json(j)).collect()
            }
            layout => {
                let keys: Vec<String> =
                    redis::cmd("KEYS").arg(format!("{prefix}items:*")).query_async(&mut *con).await.unwrap();
                let mut rows = Vec::new();
                for key in keys {
                    // A row deleted between KEYS and its read (the suite reads during
                    // applies) reads empty and is skipped.
                    rows.push(if layout == Layout::Hash {
                        redis::cmd("HGETALL").arg(&key).query_async(&mut *con).await.unwrap()
                    } else {
                        let json: Option<String> =
                            redis::cmd("GET").arg(&key).query_async(&mut *con).await.unwrap();
                        json.map(|j| from_json(&j)).unwrap_or_default()
                    });
                }
                rows
            }
        };
        rows.into_iter().filter_map(|r| Some((r.get("id")?.clone(), r))).collect()
    }

    async fn lose_state(&self) -> bool {
        // A Redis restarted without persistence: every key of the pipeline is gone.
        let mut con = self.con.lock().await;
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("{}*", self.config.prefix)).query_async(&mut *con).await.unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut *con).await.unwrap();
        }
        true
    }
}

#[tokio::test]
async fn redis_sink_passes_the_compliance_suite_in_every_layout() {
    for layout in [Layout::Hash, Layout::Json, Layout::Table] {
        check_sink(&Redis::new(layout).await).await;
    }
}
