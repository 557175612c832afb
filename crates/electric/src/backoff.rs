//! Full-jitter exponential backoff with `retry-after` as a floor.

use std::time::{Duration, SystemTime};

use rand::Rng;

use crate::BackoffConfig;

/// Consecutive-failure state for one stream.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    config: BackoffConfig,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(config: BackoffConfig) -> Self {
        Backoff { config, failures: 0 }
    }

    /// The ceiling of the next wait: `base * 2^failures`, at most `cap`.
    pub(crate) fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.config.base.saturating_mul(factor).min(self.config.cap)
    }

    /// The wait before the next retry, `max(retry_after, rand(0, ceiling))`, and
    /// counts the failure.
    pub(crate) fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let jitter = Duration::from_secs_f64(rand::rng().random_range(0.0..=ceiling.as_secs_f64()));
        let floor = retry_after.map_or(Duration::ZERO, |r| r.min(self.config.retry_after_cap));
        jitter.max(floor)
    }

    /// A request succeeded: the next failure starts from `base` again. Ends a run of
    /// failures with one line saying the server answers again.
    pub(crate) fn reset(&mut self) {
        if self.failures > 0 {
            tracing::info!(failures = self.failures, "the shape server answers again");
        }
        self.failures = 0;
    }

    /// How many failures in a row so far.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }
}

/// Reads a `retry-after` value: delay seconds or an HTTP date (past dates give zero).
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(1e9)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(base_ms: u64, cap_ms: u64) -> BackoffConfig {
        BackoffConfig {
            base: Duration::from_millis(base_ms),
            cap: Duration::from_millis(cap_ms),
            retry_after_cap: Duration::from_secs(60),
        }
    }

    #[test]
    fn ceilings_double_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(cfg(1000, 32_000));
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            ceilings.push(b.ceiling().as_millis());
            let d = b.next_delay(None);
            assert!(d <= Duration::from_millis(*ceilings.last().unwrap() as u64));
        }
        assert_eq!(ceilings, [1000, 2000, 4000, 8000, 16000, 32000, 32000, 32000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_secs(1));
        for _ in 0..100 {
            b.next_delay(None);
        }
        assert_eq!(b.ceiling(), Duration::from_secs(32), "no overflow after many failures");
    }

    #[test]
    fn jitter_spreads_over_the_whole_range() {
        let mut b = Backoff::new(cfg(1000, 1000));
        let delays: Vec<Duration> = (0..200).map(|_| b.next_delay(None)).collect();
        assert!(delays.iter().any(|d| *d < Duration::from_millis(250)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(750)));
    }

    #[test]
    fn retry_after_is_a_capped_floor() {
        let mut b = Backoff::new(cfg(1, 2));
        assert!(b.next_delay(Some(Duration::from_secs(5))) >= Duration::from_secs(5));
        assert_eq!(b.next_delay(Some(Duration::from_secs(7200))), Duration::from_secs(60));
    }

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(parse_retry_after("5", now), Some(Duration::from_secs(5)));
        assert_eq!(parse_retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("1.5", now), Some(Duration::from_millis(1500)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now), Some(Duration::from_secs(10)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }
}
