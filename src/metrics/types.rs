//! The three kinds of series, as plain atomics: no registry, no lock, no
//! allocation when counting. A route's series live in its `RouteMetrics`,
//! the node's in `Metrics`; `render.rs` writes them out.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn increment(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down; whole numbers are all portgate needs.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn increment(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn decrement(&self, n: i64) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram with fixed bucket bounds: one count per bucket (not
/// cumulative; rendering sums them), the sum and the count of samples.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Box<[AtomicU64]>,
    /// The sum's f64 bits.
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
            count: AtomicU64::new(0),
        }
    }

    /// Count one sample of `v` (seconds, for both of portgate's).
    pub fn record(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| Some((f64::from_bits(s) + v).to_bits()));
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Cumulative bucket counts, the sum and the count, read now.
    pub(super) fn read(&self) -> (Vec<u64>, f64, u64) {
        let mut acc = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Ordering::Relaxed);
                acc
            })
            .collect();
        (cumulative, f64::from_bits(self.sum.load(Ordering::Relaxed)), self.count.load(Ordering::Relaxed))
    }
}

/// Where a route records a histogram: its own, or the node's shared one
/// (`[metrics] histograms = "node"`); switched by a reload. A route's own
/// histogram is allocated at its first sample (until then it renders as
/// zeros), so the many routes of a large config that see no traffic cost
/// no buckets.
/// The slot's bounds are its type's, so a slot is one word.
#[derive(Debug)]
pub struct HistogramSlot<B> {
    current: ArcSwapOption<Histogram>,
    bounds: PhantomData<fn() -> B>,
}

/// The bucket bounds of a kind of histogram.
pub trait Buckets {
    const BOUNDS: &'static [f64];
}

impl<B: Buckets> HistogramSlot<B> {
    /// A slot for a route's own histogram (allocated on first use), or the
    /// node's shared one.
    pub(super) fn new(shared: Option<Arc<Histogram>>) -> HistogramSlot<B> {
        HistogramSlot { current: ArcSwapOption::new(shared), bounds: PhantomData }
    }

    pub fn record(&self, v: f64) {
        if let Some(h) = self.current.load().as_ref() {
            return h.record(v);
        }
        let own = Arc::new(Histogram::new(B::BOUNDS));
        // A racing first sample may have put one there meanwhile: use it.
        let prev = self.current.compare_and_swap(&None::<Arc<Histogram>>, Some(Arc::clone(&own)));
        match prev.as_ref() {
            Some(h) => h.record(v),
            None => own.record(v),
        }
    }

    /// What to render: the histogram, or `None` for one not used yet.
    pub(super) fn get(&self) -> Option<Arc<Histogram>> {
        self.current.load_full()
    }

    /// Point the slot at the node's shared histogram, or (`None`) back to
    /// an own one, allocated on first use.
    pub(super) fn set(&self, shared: Option<Arc<Histogram>>) {
        self.current.store(shared);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_into_cumulative_buckets() {
        static B: &[f64] = &[0.1, 1.0, 10.0];
        let h = Histogram::new(B);
        for v in [0.05, 0.1, 0.5, 5.0, 50.0] {
            h.record(v);
        }
        let (cum, sum, count) = h.read();
        assert_eq!(cum, vec![2, 3, 4]);
        assert_eq!(count, 5);
        assert!((sum - 55.65).abs() < 1e-9);
    }
}
