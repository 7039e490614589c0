//! The store's own measurements: how long commits take and how many changes each carries.

use std::time::Duration;

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// What the store's writer thread measures. The metrics registry registers the same
/// histograms (they are handles onto shared values) and renders them with the rest.
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    pub(crate) commit_seconds: Histogram,
    pub(crate) batch_size: Histogram,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self {
            // 100 µs to about 3 s: an fsync on flash is milliseconds, a stalled disk seconds.
            commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            // 1 to 512, the writer's largest batch.
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
        }
    }
}

impl StoreMetrics {
    /// One committed transaction of `changes` changes that took `elapsed`.
    pub fn commit(&self, elapsed: Duration, changes: usize) {
        self.commit_seconds.observe(elapsed.as_secs_f64());
        self.batch_size.observe(changes as f64);
    }
}
