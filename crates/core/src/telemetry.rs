//! The catalogue of shapesync's metrics: every name, its type, unit and help text, in one
//! place. [`describe`] gives the installed recorder the help text (Prometheus `# HELP`);
//! [`register_pipeline`] creates a pipeline's counters at 0, so an alert rule sees
//! `rate(…)` of a counter from start-up instead of needing `absent()` for one that has
//! not happened yet.

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};

/// What a metric is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution (Prometheus histogram).
    Histogram,
}

/// One metric of the catalogue.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    /// Its name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// The label values a counter is created with at 0 (besides `pipeline`): a label
    /// name and its values; empty for counters with `pipeline` only.
    pub zero_labels: (&'static str, &'static [&'static str]),
    /// Its unit, when it has one.
    pub unit: Option<Unit>,
    /// Its help text.
    pub help: &'static str,
}

const fn counter(name: &'static str, help: &'static str) -> Metric {
    Metric { name, kind: Kind::Counter, zero_labels: ("", &[]), unit: None, help }
}

const fn counter_by(
    name: &'static str,
    label: &'static str,
    values: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric { name, kind: Kind::Counter, zero_labels: (label, values), unit: None, help }
}

const fn gauge_of(name: &'static str, unit: Option<Unit>, help: &'static str) -> Metric {
    Metric { name, kind: Kind::Gauge, zero_labels: ("", &[]), unit, help }
}

const fn histogram_of(name: &'static str, unit: Option<Unit>, help: &'static str) -> Metric {
    Metric { name, kind: Kind::Histogram, zero_labels: ("", &[]), unit, help }
}

/// Request outcome classes of `shapesync_source_requests_total`.
pub const REQUEST_CLASSES: &[&str] = &["2xx", "3xx", "409", "4xx", "5xx", "error"];

/// Why a resync began ([`crate::ResyncReason::as_str`]): the `reason` label.
pub const RESYNC_REASONS: &[&str] =
    &["first_sync", "must_refetch", "definition_changed", "state_lost", "resumed"];

/// Every metric shapesync exports.
pub const CATALOGUE: &[Metric] = &[
    counter("shapesync_changes_received_total", "Changes received from the source."),
    counter("shapesync_changes_committed_total", "Changes committed to the sink."),
    counter_by(
        "shapesync_sink_rows_total",
        "op",
        &["insert", "update", "delete"],
        "Rows committed to the sink by operation (a move-out's rows are deletes).",
    ),
    counter_by(
        "shapesync_changes_discarded_total",
        "component",
        &["transform"],
        "Changes a transform dropped (filter).",
    ),
    counter_by(
        "shapesync_errors_total",
        "component",
        &["source", "sink", "transform"],
        "Errors by the component that raised them; transient ones are retried.",
    ),
    counter("shapesync_pipeline_failures_total", "Times the pipeline stopped with an error."),
    counter(
        "shapesync_must_refetch_total",
        "Shape refetches (409, must-refetch, unknown move-out tags): each starts a resync.",
    ),
    counter("shapesync_fenced_total", "Times another instance took the pipeline's lease from this one."),
    counter(
        "shapesync_sink_state_lost_total",
        "Times the sink was found to have lost what was written (a resync follows).",
    ),
    counter("shapesync_lease_acquired_total", "Times this instance took the pipeline's lease."),
    counter(
        "shapesync_lease_handovers_total",
        "Times this instance handed the pipeline over to spread the load.",
    ),
    counter_by(
        "shapesync_source_requests_total",
        "class",
        REQUEST_CLASSES,
        "Requests to the shape server by outcome (2xx, 3xx, 409, 4xx, 5xx, error: no answer).",
    ),
    counter_by(
        "shapesync_source_move_events_total",
        "event",
        &["move-in", "move-out"],
        "Move events of subquery shapes.",
    ),
    counter("shapesync_source_rows_moved_out_total", "Rows a move-out removed (each became a delete)."),
    counter(
        "shapesync_sink_keys_invalidated_total",
        "Cache keys the sink removed for committed changes (Redis `mode: invalidate` and `mode: refresh`).",
    ),
    counter(
        "shapesync_sink_keys_refreshed_total",
        "Cached keys the sink rewrote in place because they existed (Redis `mode: refresh`).",
    ),
    counter_by(
        "shapesync_sink_full_invalidations_total",
        "reason",
        RESYNC_REASONS,
        "Times continuity with the shape was lost and the sink invalidated every key its templates can name, by why the resync began.",
    ),
    gauge_of("shapesync_up_to_date", None, "1 while the pipeline is at the head of its shape."),
    gauge_of("shapesync_pipeline_owned", None, "1 while this instance holds the pipeline's lease."),
    gauge_of(
        "shapesync_last_commit_timestamp_seconds",
        Some(Unit::Seconds),
        "Unix time of the last commit to the sink.",
    ),
    gauge_of(
        "shapesync_last_source_response_timestamp_seconds",
        Some(Unit::Seconds),
        "Unix time of the last good response from the shape server; a live shape answers at least every long-poll hold (20 s), so this keeps moving on a quiet table.",
    ),
    gauge_of(
        "shapesync_last_up_to_date_timestamp_seconds",
        Some(Unit::Seconds),
        "Unix time the pipeline was last at the head of its shape: the heartbeat to alert on (time() minus it).",
    ),
    histogram_of("shapesync_sink_commit_duration_seconds", Some(Unit::Seconds), "Time one sink commit took."),
    histogram_of("shapesync_sink_batch_changes", Some(Unit::Count), "Changes per sink commit."),
    gauge_of("shapesync_build_info", None, "1, labelled with the shapesync version."),
];

/// Buckets of [`Unit::Count`] histograms (batch sizes): 1 to a million.
pub const COUNT_BUCKETS: &[f64] = &[1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0, 1_000_000.0];

/// Buckets of [`Unit::Seconds`] histograms.
pub const SECONDS_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Gives the installed recorder every metric's help text and unit, and sets
/// `shapesync_build_info{version}`. Call once, after installing the recorder.
pub fn describe(version: &'static str) {
    for m in CATALOGUE {
        match (m.kind, m.unit) {
            (Kind::Counter, Some(unit)) => describe_counter!(m.name, unit, m.help),
            (Kind::Counter, None) => describe_counter!(m.name, m.help),
            (Kind::Gauge, Some(unit)) => describe_gauge!(m.name, unit, m.help),
            (Kind::Gauge, None) => describe_gauge!(m.name, m.help),
            (Kind::Histogram, Some(unit)) => describe_histogram!(m.name, unit, m.help),
            (Kind::Histogram, None) => describe_histogram!(m.name, m.help),
        }
    }
    gauge!("shapesync_build_info", "version" => version).set(1.0);
}

/// Creates `pipeline`'s counters (with each of their label values) at 0.
pub fn register_pipeline(pipeline: &str) {
    for m in CATALOGUE.iter().filter(|m| m.kind == Kind::Counter) {
        let (label, values) = m.zero_labels;
        if values.is_empty() {
            counter!(m.name, "pipeline" => pipeline.to_owned()).increment(0);
        }
        for value in values {
            counter!(m.name, "pipeline" => pipeline.to_owned(), label => *value).increment(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resync_reasons_are_the_labels_of_full_invalidations() {
        let names: Vec<&str> = crate::ResyncReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names, RESYNC_REASONS);
    }
}
