//! Latency percentiles for the benches and the examples, all computed one way: an HdrHistogram of
//! nanoseconds with 3 significant digits (every reported value is within 0.1% of a recorded one).
//!
//! The examples include this file with `#[path]`, so it depends on nothing but `hdrhistogram`.
// Each program that includes this file uses part of it.
#![allow(dead_code)]

use std::time::Duration;

use hdrhistogram::Histogram;

/// Longest latency kept exactly; a longer one is recorded as this. A call that takes a minute in
/// these programs is a hang, which they report by other means.
const MAX_RECORDED: Duration = Duration::from_secs(60);

/// Significant decimal digits kept per value.
const SIGNIFICANT_DIGITS: u8 = 3;

/// The latencies of one kind of call.
pub struct Latencies {
    nanos: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    /// An empty record.
    pub fn new() -> Self {
        let highest = u64::try_from(MAX_RECORDED.as_nanos()).unwrap_or(u64::MAX);
        // Bounds 1 ns ..= 60 s with 3 digits are valid constants (low >= 1, high >= 2 * low,
        // digits <= 5), so this cannot fail.
        let nanos = Histogram::new_with_bounds(1, highest, SIGNIFICANT_DIGITS)
            .expect("constant histogram bounds are valid");
        Latencies { nanos }
    }

    /// Records one call that took `latency` (at most [`MAX_RECORDED`]; zero counts as 1 ns).
    pub fn record(&mut self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.saturating_record(nanos.max(1));
    }

    /// Adds every call recorded in `other`.
    pub fn merge(&mut self, other: &Latencies) {
        // Both sides have the same bounds, so adding cannot fail.
        self.nanos
            .add(&other.nanos)
            .expect("histograms with equal bounds add");
    }

    /// How many calls were recorded.
    pub fn len(&self) -> u64 {
        self.nanos.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.nanos.is_empty()
    }

    /// The latency that a fraction `quantile` (0..=1) of the calls did not exceed; zero when
    /// nothing was recorded.
    pub fn quantile(&self, quantile: f64) -> Duration {
        if self.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.nanos.value_at_quantile(quantile))
    }

    /// The slowest call; zero when nothing was recorded.
    pub fn max(&self) -> Duration {
        if self.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.nanos.max())
    }
}
