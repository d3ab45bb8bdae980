//! Counting must not allocate: a node nobody scrapes for days records
//! millions of samples, and none of them may stay in memory. Every series is
//! a fixed set of atomics; this test counts live heap bytes with its own
//! global allocator while recording into every kind of series.
//!
//! Only the test's own thread is counted: the test harness allocates on its
//! main thread while the test runs (its bookkeeping of the running test),
//! and counting that made the test fail about one run in six. Recording
//! happens on the calling thread (the metrics have no thread of their own),
//! so nothing the test is about goes uncounted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, Ordering};

use portgate::metrics::Metrics;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    // Const-initialised and without a destructor, so reading it never
    // allocates (which the allocator itself could not survive).
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

fn counted() -> bool {
    COUNTED.try_with(Cell::get).unwrap_or(false)
}

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() && counted() {
            LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) };
        if counted() {
            LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

#[test]
fn recording_a_million_samples_holds_no_memory() {
    COUNTED.with(|c| c.set(true));
    let metrics = Metrics::new();
    let route = metrics.route("r", "t");
    // A route's histogram gets its buckets at its first sample, and the
    // first load on a thread sets up arc-swap's per-thread bookkeeping:
    // both once, before counting.
    route.session_duration.record(0.0);
    route.connect_duration.record(0.0);
    let base = live();
    for i in 0..1_000_000u64 {
        route.connect_duration.record(0.0004);
        route.session_duration.record(42.0);
        route.accepted.increment(1);
        route.bytes_to_target.increment(i);
        route.active.increment(1);
        route.active.decrement(1);
    }
    let held = live() - base;
    assert_eq!(held, 0, "recording held {held} bytes");
    let text = metrics.render();
    assert!(text.contains("portgate_upstream_connect_duration_seconds_count{route=\"r\"} 1000001"), "{text}");
    assert!(text.contains("portgate_session_duration_seconds_count{route=\"r\"} 1000001"));
    assert!(text.contains("portgate_connections_accepted_total{route=\"r\",tenant=\"t\"} 1000000"));
}
