//! `shapesync_errors_total` counts each failure under the component it came from.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use metrics::{Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use shapesync_core::{
    Change, Pipeline, PipelineError, ResumePoint, RunMode, Schema, Source, SourceError, SourceEvent,
    SourceResponse, Transform, TransformError, Value, async_trait,
};
use shapesync_sink_memory::MemorySink;
use tokio_util::sync::CancellationToken;

type Counts = Arc<Mutex<HashMap<(String, String), u64>>>;

/// Counts `shapesync_errors_total` by (pipeline, component).
struct ErrorCounts(Counts);

struct ErrorCounter {
    labels: (String, String),
    counts: Counts,
}

impl CounterFn for ErrorCounter {
    fn increment(&self, value: u64) {
        *self.counts.lock().unwrap().entry(self.labels.clone()).or_default() += value;
    }
    fn absolute(&self, value: u64) {
        self.counts.lock().unwrap().insert(self.labels.clone(), value);
    }
}

impl Recorder for ErrorCounts {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if key.name() != "shapesync_errors_total" {
            return Counter::noop();
        }
        let label = |name: &str| key.labels().find(|l| l.key() == name).map(|l| l.value().to_owned());
        let labels = (label("pipeline").unwrap_or_default(), label("component").unwrap_or_default());
        Counter::from_arc(Arc::new(ErrorCounter { labels, counts: Arc::clone(&self.0) }))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn counts() -> &'static Counts {
    static COUNTS: OnceLock<Counts> = OnceLock::new();
    COUNTS.get_or_init(|| {
        let counts = Counts::default();
        metrics::set_global_recorder(ErrorCounts(Arc::clone(&counts))).expect("the only recorder");
        counts
    })
}

fn errors(pipeline: &str, component: &str) -> u64 {
    counts().lock().unwrap().get(&(pipeline.to_owned(), component.to_owned())).copied().unwrap_or(0)
}

/// A source that yields the given events, then waits forever.
struct Events(Vec<Result<SourceEvent, SourceError>>);

#[async_trait]
impl Source for Events {
    fn definition_hash(&self) -> String {
        "h".into()
    }
    fn resume(&mut self, _: Option<ResumePoint>) {}
    async fn next(&mut self) -> Result<SourceEvent, SourceError> {
        if self.0.is_empty() { std::future::pending().await } else { self.0.remove(0) }
    }
}

/// A transform that fails on every change.
struct Refuses;

impl Transform for Refuses {
    fn apply(&self, change: Change, _: &mut Vec<Change>) -> Result<(), TransformError> {
        Err(TransformError::Row { key: change.key, detail: "refused".into() })
    }
}

async fn run(id: &str, events: Vec<Result<SourceEvent, SourceError>>, transforms: Vec<Box<dyn Transform>>) {
    counts();
    let err = Pipeline::new(id, Box::new(Events(events)), Arc::new(MemorySink::default()))
        .with_transforms(transforms)
        .run(RunMode::Follow, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, PipelineError::Source(_) | PipelineError::Transform(_)), "{err}");
}

#[tokio::test]
async fn a_source_error_is_counted_as_the_sources() {
    run("metrics-source", vec![Err(SourceError::rejected(400, "table: missing"))], Vec::new()).await;
    assert_eq!(errors("metrics-source", "source"), 1);
    assert_eq!(errors("metrics-source", "sink"), 0);
}

#[tokio::test]
async fn a_transform_error_is_counted_as_the_transforms() {
    let change = Change::insert("\"public\".\"t\"/\"1\"", [("id".to_owned(), Value::Int(1))].into());
    let response = SourceEvent::Response(SourceResponse {
        changes: vec![change],
        handle: "h1".into(),
        offset: "0_inf".parse().unwrap(),
        schema: Arc::new(Schema::default()),
        up_to_date: true,
    });
    run("metrics-transform", vec![Ok(response)], vec![Box::new(Refuses)]).await;
    assert_eq!(errors("metrics-transform", "transform"), 1);
    assert_eq!(errors("metrics-transform", "source"), 0);
}
