//! Histogram samples must not pile up in memory on a node nobody scrapes.
//!
//! The Prometheus exporter queues every recorded histogram sample until the
//! next render or upkeep. portgate runs upkeep on a timer; this test counts
//! live heap bytes with its own global allocator to show the queue is freed,
//! both by `Metrics::upkeep` and by the periodic task the server runs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use portgate::metrics::{spawn_upkeep, Metrics, UPKEEP_INTERVAL};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Record `n` samples into each of a route's two histograms.
fn record(m: &portgate::metrics::RouteMetrics, n: usize) {
    for _ in 0..n {
        m.connect_duration.record(0.0004);
        m.session_duration.record(42.0);
    }
}

/// Bytes a queue of 2 x 200,000 samples holds (16 bytes per sample), and
/// the bound for what may stay held once upkeep has run: the exporter frees
/// drained sample blocks through epoch-based reclamation, so a few recent
/// blocks can linger until later recordings advance the epoch.
const QUEUED_MIN: isize = 4 << 20;
const HELD_MAX: isize = 1 << 20;

#[test]
fn queued_histogram_samples_are_freed_without_a_scrape() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let metrics = Arc::new(Metrics::new());
    let route = metrics.route("r", "t");
    metrics.upkeep();

    // Without upkeep, every sample stays queued.
    let base = live();
    record(&route, 200_000);
    let queued = live() - base;
    assert!(queued > QUEUED_MIN, "400,000 queued samples should hold megabytes, held {queued} bytes");
    // Upkeep, with traffic going on (as on a live node).
    for _ in 0..20 {
        metrics.upkeep();
        record(&route, 1_000);
    }
    metrics.upkeep();
    let held = live() - base;
    assert!(held < HELD_MAX, "{held} bytes still held after upkeep ({queued} before)");

    // The periodic task the server runs does the same, with nobody scraping.
    let stop = tokio_util::sync::CancellationToken::new();
    rt.block_on(async {
        let task = spawn_upkeep(Arc::clone(&metrics), stop.clone());
        let base = live();
        record(&route, 200_000);
        assert!(live() - base > QUEUED_MIN);
        let deadline = Instant::now() + UPKEEP_INTERVAL * 2 + Duration::from_secs(5);
        while live() - base >= HELD_MAX {
            assert!(
                Instant::now() < deadline,
                "no upkeep within {UPKEEP_INTERVAL:?}: {} bytes still queued",
                live() - base
            );
            record(&route, 1_000);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.cancel();
        task.await.unwrap();
    });
}
