//! The SQLite sink passes the sink compliance suite against a real database file.

use std::path::PathBuf;
use std::sync::Arc;

use rusqlite::types::ValueRef;
use shapesync_core::{ShapeInfo, Sink, SinkConfig, SinkContext, Value};
use shapesync_sink_sqlite::{GENERATION_COLUMN, SqliteSinkConfig};
use shapesync_testkit::compliance::{SinkUnderTest, StoredRows, check_sink};

struct SqliteUnderTest {
    path: PathBuf,
}

#[shapesync_core::async_trait]
impl SinkUnderTest for SqliteUnderTest {
    async fn open(&self) -> Arc<dyn Sink> {
        let ctx = SinkContext {
            pipeline: "compliance".into(),
            shape: ShapeInfo { table: "public.items".into(), ..Default::default() },
        };
        SqliteSinkConfig::new(&self.path).build(ctx).await.expect("sqlite sink")
    }

    async fn rows(&self) -> StoredRows {
        if !self.path.exists() {
            return StoredRows::new();
        }
        let conn = rusqlite::Connection::open(&self.path).unwrap();
        let exists: bool = conn
            .query_row("SELECT count(*) > 0 FROM sqlite_schema WHERE name = 'items'", [], |r| r.get(0))
            .unwrap();
        if !exists {
            return StoredRows::new();
        }
        let mut stmt = conn.prepare("SELECT * FROM items").unwrap();
        let names: Vec<String> = stmt.column_names().into_iter().map(str::to_owned).collect();
        let mut rows = stmt.query([]).unwrap();
        let mut stored = StoredRows::new();
        while let Some(row) = rows.next().unwrap() {
            let mut columns = std::collections::BTreeMap::new();
            for (i, name) in names.iter().enumerate().filter(|(_, n)| *n != GENERATION_COLUMN) {
                let text = match row.get_ref(i).unwrap() {
                    ValueRef::Null => continue,
                    ValueRef::Integer(n) => n.to_string(),
                    ValueRef::Real(f) => Value::Float(f).render().unwrap().into_owned(),
                    ValueRef::Text(t) => String::from_utf8(t.to_vec()).unwrap(),
                    ValueRef::Blob(_) => panic!("the sink never writes blobs"),
                };
                columns.insert(name.clone(), text);
            }
            stored.insert(columns["id"].clone(), columns);
        }
        stored
    }

    async fn lose_state(&self) -> bool {
        // A database replaced by an empty one: every table is gone.
        let conn = rusqlite::Connection::open(&self.path).unwrap();
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_schema WHERE type = 'table'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for table in tables {
            conn.execute_batch(&format!("DROP TABLE \"{}\"", table.replace('"', "\"\""))).unwrap();
        }
        true
    }
}

#[tokio::test]
async fn sqlite_sink_passes_the_compliance_suite() {
    let dir = tempfile::tempdir().unwrap();
    check_sink(&SqliteUnderTest { path: dir.path().join("cache.db") }).await;
}
