//! Built-in transforms end to end: a pipeline file with `filter`, `drop` and `rename`
//! between the testkit server and a SQLite file, run with `run --once`.

use std::process::ExitCode;

use serde_json::json;
use shapesync_e2e::{PipelineFile, server, shapesync};
use shapesync_testkit::{Column, TableDef};

fn rows(db: &std::path::Path) -> Vec<(i64, String, i64)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn.prepare("SELECT id, display_name, active FROM users ORDER BY id").unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().collect::<Result<_, _>>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_drop_and_rename_shape_what_a_sqlite_table_receives() {
    let server = server().await;
    let users = server.create_table(
        TableDef::new("users")
            .column(Column::new("id", "int8").primary_key().not_null())
            .column(Column::new("name", "text"))
            .column(Column::new("email", "text"))
            .column(Column::new("active", "bool")),
    );
    users.seed([
        json!({"id": "1", "name": "ann", "email": "ann@example.com", "active": "t"}),
        json!({"id": "2", "name": "bob", "email": "bob@example.com", "active": "f"}),
        json!({"id": "3", "name": "cy", "email": "cy@example.com", "active": "t"}),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let pipeline = |replica: &str| {
        format!(
            "pipelines:
  users:
    source: {{type: electric, url: '{}', table: users, replica: {replica}}}
    transforms:
      - {{type: filter, column: active, equals: true}}
      - {{type: drop, columns: [email]}}
      - {{type: rename, columns: {{name: display_name}}}}
    sink: {{type: sqlite, path: '{}'}}
",
            server.url(),
            db.display()
        )
    };

    // The filter reads whole rows: without `replica: full` the file is refused, saying so.
    let partial = PipelineFile::new("transforms-default", &pipeline("default"));
    assert_eq!(shapesync(&["validate", &partial.arg()]).await, ExitCode::from(2));
    let mut config = shapesync_core::Config::default();
    config.merge(&partial.0, &pipeline("default"), &|_| None).unwrap();
    let errors = shapesync_cli::builtin_registry().prepare(&config).err().expect("refused");
    assert_eq!(errors[0].key, "pipelines.users.transforms.0", "{}", errors[0]);
    assert!(errors[0].to_string().contains("replica: full"), "{}", errors[0]);

    let file = PipelineFile::new("transforms-full", &pipeline("full"));
    assert_eq!(shapesync(&["run", "--once", &file.arg()]).await, ExitCode::SUCCESS);
    assert_eq!(rows(&db), vec![(1, "ann".into(), 1), (3, "cy".into(), 1)]);
    let conn = rusqlite::Connection::open(&db).unwrap();
    let columns: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('users') ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(columns, ["_shapesync_generation", "active", "display_name", "id"], "email never arrives");

    // Ann is deactivated (her update becomes a delete), Bob activated (his whole row arrives).
    users
        .transaction()
        .update(json!({"id": "1", "active": "f"}))
        .update(json!({"id": "2", "active": "t"}))
        .commit();
    assert_eq!(shapesync(&["run", "--once", &file.arg()]).await, ExitCode::SUCCESS);
    assert_eq!(rows(&db), vec![(2, "bob".into(), 1), (3, "cy".into(), 1)]);
}
