//! Whole pipelines through the `shapesync` command line: testkit server → Electric
//! client → runner → sink.

use std::process::ExitCode;

use serde_json::json;
use shapesync_core::{Row, Value};
use shapesync_e2e::{PipelineFile, items_def, key, server, shapesync};
use shapesync_testkit::Fault;

fn memory_pipeline(id: &str, url: &str, table: &str) -> String {
    format!(
        "pipelines:\n  {id}:\n    source:\n      type: electric\n      url: {url}\n      table: {table}\n    sink:\n      type: memory\n"
    )
}

/// Expected row values as the memory sink holds them.
fn expected(id: u64, title: &str, amount: &str) -> Row {
    [
        ("id".to_owned(), Value::Int(id as i64)),
        ("title".to_owned(), Value::Text(title.into())),
        ("amount".to_owned(), Value::Numeric(amount.into())),
        ("tags".to_owned(), Value::Array(vec![Value::Text("a,b".into()), Value::Null])),
    ]
    .into()
}

fn seed_rows(n: u64) -> Vec<serde_json::Value> {
    (1..=n).map(|i| json!({"id": i.to_string(), "title": format!("row {i}"), "amount": format!("{i}.50"), "tags": "{\"a,b\",NULL}"})).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_reproduces_the_servers_rows_exactly() {
    let server = server().await;
    let items = server.create_table(items_def("e2e_exact"));
    items.seed(seed_rows(200));
    items.transaction().update(json!({"id": "3", "title": "three"})).delete(json!({"id": "4"})).commit();
    items
        .transaction()
        .insert(json!({"id": "9007199254740993", "title": "big", "amount": "0.10", "tags": "{\"a,b\",NULL}"}))
        .commit();

    let file = PipelineFile::new("exact", &memory_pipeline("e2e_exact", &server.url(), "e2e_exact"));
    assert_eq!(shapesync(&["run", "--once", &file.arg()]).await, ExitCode::SUCCESS);

    let store = shapesync_sink_memory::store("e2e_exact");
    assert!(store.is_up_to_date());
    assert_eq!(store.len(), 200, "200 seeded - 1 deleted + 1 inserted");
    assert_eq!(store.get(&key("e2e_exact", 1)).unwrap(), expected(1, "row 1", "1.50"));
    assert_eq!(store.get(&key("e2e_exact", 3)).unwrap(), expected(3, "three", "3.50"), "update merged");
    assert!(store.get(&key("e2e_exact", 4)).is_none(), "delete applied");
    assert_eq!(
        store.get(&key("e2e_exact", 9_007_199_254_740_993)).unwrap()["id"],
        Value::Int(9_007_199_254_740_993),
        "int8 keeps full precision end to end"
    );
    let cp = store.checkpoint().unwrap();
    assert_eq!(Some(cp.handle), items.handle());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_reproduces_the_rows_after_injected_faults() {
    let server = server().await;
    let items = server.create_table(items_def("e2e_faults"));
    items.seed(seed_rows(150));
    items
        .transaction()
        .update(json!({"id": "7", "title": "seven"}))
        .insert(json!({"id": "151", "title": "row 151", "amount": "151.50", "tags": "{\"a,b\",NULL}"}))
        .commit();
    server.inject(Fault::InternalError);
    server.inject(Fault::DropMidBody);
    server.inject(Fault::ServiceUnavailable { retry_after: Some(1) });
    server.inject(Fault::Trickle { bytes: 512, delay: std::time::Duration::from_millis(5) });
    server.inject(Fault::MustRefetch { with_handle: true });

    let file = PipelineFile::new("faults", &memory_pipeline("e2e_faults", &server.url(), "e2e_faults"));
    assert_eq!(shapesync(&["run", "--once", &file.arg()]).await, ExitCode::SUCCESS);
    assert_eq!(server.pending_faults(), 0, "every fault was served");

    let store = shapesync_sink_memory::store("e2e_faults");
    assert_eq!(store.len(), 151);
    for i in 1..=151u64 {
        let title = if i == 7 { "seven".to_owned() } else { format!("row {i}") };
        assert_eq!(
            store.get(&key("e2e_faults", i)).unwrap(),
            expected(i, &title, &format!("{i}.50")),
            "row {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_pipeline_does_not_stop_the_others() {
    let server = server().await;
    let items = server.create_table(items_def("e2e_iso"));
    items.seed(seed_rows(10));
    let text = format!(
        "{}{}",
        memory_pipeline("e2e_iso_good", &server.url(), "e2e_iso"),
        memory_pipeline("e2e_iso_bad", &server.url(), "no_such_table").replace("pipelines:\n", "")
    );
    let file = PipelineFile::new("iso", &text);
    assert_eq!(
        shapesync(&["run", "--once", &file.arg()]).await,
        ExitCode::FAILURE,
        "a failed pipeline fails the run"
    );
    assert_eq!(
        shapesync_sink_memory::store("e2e_iso_good").len(),
        10,
        "the healthy pipeline finished its sync"
    );
    assert!(shapesync_sink_memory::store("e2e_iso_bad").is_empty());
}

/// A sink type whose `build` always fails, as one whose store refuses the connection.
#[derive(serde::Deserialize)]
struct UnbuildableSink {}

#[shapesync_core::async_trait]
impl shapesync_core::SinkConfig for UnbuildableSink {
    async fn build(
        self,
        _ctx: shapesync_core::SinkContext,
    ) -> Result<std::sync::Arc<dyn shapesync_core::Sink>, shapesync_core::SinkError> {
        Err(shapesync_core::SinkError::rejected("the store refused the connection"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_that_cannot_start_does_not_stop_the_others() {
    let server = server().await;
    let items = server.create_table(items_def("e2e_nostart"));
    items.seed(seed_rows(10));
    let bad = format!(
        "  e2e_nostart_bad:\n    source:\n      type: electric\n      url: {}\n      table: e2e_nostart\n    sink:\n      type: unbuildable\n",
        server.url()
    );
    let text = format!("{}{bad}", memory_pipeline("e2e_nostart_good", &server.url(), "e2e_nostart"));
    let run = |text: String| async move {
        let file = PipelineFile::new("nostart", &text);
        let mut registry = shapesync_cli::builtin_registry();
        registry.sink::<UnbuildableSink>("unbuildable");
        shapesync_cli::run_args(["shapesync", "run", "--once", &file.arg()], registry).await
    };
    assert_eq!(run(text.clone()).await, ExitCode::FAILURE, "a pipeline that cannot start fails the run");
    assert_eq!(shapesync_sink_memory::store("e2e_nostart_good").len(), 10, "the healthy pipeline synced");
    assert_eq!(run(format!("fail_fast: true\n{text}")).await, ExitCode::FAILURE);
}
