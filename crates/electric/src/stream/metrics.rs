//! The counters a [`ShapeStream`] records when its options name a pipeline
//! ([`crate::ShapeOptions::metrics_pipeline`]).

use reqwest::StatusCode;

use super::ShapeStream;

impl ShapeStream {
    /// Reports what the tag index saw move as `shapesync_source_move_events_total{pipeline,
    /// event}` and `shapesync_source_rows_moved_out_total{pipeline}`, when a pipeline is named.
    pub(super) fn count_moves(&mut self) {
        let counts = self.tags.take_counts();
        let Some(pipeline) = &self.options.metrics_pipeline else { return };
        if counts.move_outs > 0 {
            metrics::counter!("shapesync_source_move_events_total", "pipeline" => pipeline.clone(), "event" => "move-out")
                .increment(counts.move_outs);
            metrics::counter!("shapesync_source_rows_moved_out_total", "pipeline" => pipeline.clone())
                .increment(counts.rows_moved_out);
        }
        if counts.move_ins > 0 {
            metrics::counter!("shapesync_source_move_events_total", "pipeline" => pipeline.clone(), "event" => "move-in")
                .increment(counts.move_ins);
        }
    }

    /// Counts one request outcome (`2xx`, `3xx`, `409`, `4xx`, `5xx`, `error`) as
    /// `shapesync_source_requests_total{pipeline, class}`, when a pipeline is named.
    pub(super) fn count_request(&self, class: &'static str) {
        if let Some(pipeline) = &self.options.metrics_pipeline {
            metrics::counter!("shapesync_source_requests_total", "pipeline" => pipeline.clone(), "class" => class)
                .increment(1);
        }
    }
}

/// The `class` label of a response status.
pub(super) fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "2xx",
        300..=399 => "3xx",
        409 => "409",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
