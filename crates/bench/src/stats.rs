//! Latency summaries the benchmarks print.

use std::time::Duration;

/// Latency summary.
pub struct Stats {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// Worst.
    pub max: Duration,
}

impl Stats {
    /// Summarizes latency samples.
    pub fn of(mut lat: Vec<Duration>) -> Stats {
        lat.sort();
        let at = |q: f64| {
            lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        Stats {
            count: lat.len(),
            p50: at(0.5),
            p99: at(0.99),
            p999: at(0.999),
            max: lat.last().copied().unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        write!(
            f,
            "n={} p50={:.3} ms p99={:.3} ms p99.9={:.3} ms max={:.3} ms",
            self.count,
            ms(self.p50),
            ms(self.p99),
            ms(self.p999),
            ms(self.max)
        )
    }
}
