//! The bounded queue between the threads that log and the one thread that
//! writes: pushing copies a formatted line in under a short lock and never
//! waits for the sink; the writer takes everything queued in one swap and
//! writes it with one `write(2)`.

use std::cell::Cell;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// Lines a runtime worker may queue before it wakes the writer without
/// waiting to park (the bound is also capped at half the queue).
const DEFERRED_LINES: usize = 128;

thread_local! {
    /// This thread is a runtime worker that calls [`LogQueue::on_park`]
    /// before it sleeps, so its pushes may leave the wake-up to then.
    static DEFERS: Cell<bool> = const { Cell::new(false) };
    /// A push on this thread left the writer asleep.
    static WAKE_PENDING: Cell<bool> = const { Cell::new(false) };
}

/// Lines waiting for the writer, as the bytes it will write: pushing copies
/// a line in, and the writer swaps the whole buffer out.
struct Inner {
    bytes: Vec<u8>,
    /// Lines in `bytes` (the bound is in lines).
    lines: usize,
    /// Lines dropped since the last `log lines dropped` warning was queued.
    pending_dropped: u64,
    /// The writer is writing a batch it took (for [`LogQueue::flush`]).
    writing: bool,
    /// The writer waits for a first line: a push must wake it.
    idle: bool,
    /// A wake-up is on its way to the idle writer: the pushes and parks
    /// until it runs need not send another (each is a futex call).
    woken: bool,
    /// Callers waiting in [`LogQueue::flush`]: the writer wakes them when
    /// the queue empties.
    flushers: usize,
}

/// A bounded queue of formatted lines and the thread that writes them.
pub(crate) struct LogQueue {
    inner: Mutex<Inner>,
    /// Wakes the writer (lines arrived, a flush) and flushers (emptied).
    cv: Condvar,
    /// `[log] queue_lines`; a reload may change it.
    pub(super) capacity: AtomicUsize,
    /// Mirrors "the queue holds `capacity` lines", for lock-free reads.
    pub(super) full: AtomicBool,
    pub(super) dropped_total: AtomicU64,
    /// Formats the `log lines dropped` warning line for `n` lost lines.
    dropped_warning: fn(u64) -> Vec<u8>,
}

impl LogQueue {
    pub(super) fn new(capacity: usize, dropped_warning: fn(u64) -> Vec<u8>) -> Arc<LogQueue> {
        Arc::new(LogQueue {
            inner: Mutex::new(Inner {
                bytes: Vec::new(),
                lines: 0,
                pending_dropped: 0,
                writing: false,
                idle: false,
                woken: false,
                flushers: 0,
            }),
            cv: Condvar::new(),
            capacity: AtomicUsize::new(capacity.max(1)),
            full: AtomicBool::new(false),
            dropped_total: AtomicU64::new(0),
            dropped_warning,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue one formatted line, or drop and count it. Never blocks on the
    /// sink: the lock is held only to copy the line in, and the writer is
    /// woken only when it waits for a first line (while it writes, lines
    /// gather into its next batch). On a runtime worker the wake-up waits
    /// until the worker runs out of work ([`LogQueue::on_park`]) or
    /// [`DEFERRED_LINES`] are queued: the lines of one burst of sessions go
    /// out in one write, and the writer thread does not preempt the worker
    /// for every line. A worker with nothing to do parks at once, so a
    /// lone line is not delayed.
    pub(super) fn push(&self, line: &[u8]) {
        let cap = self.capacity.load(Ordering::Relaxed);
        let mut q = self.lock();
        if q.lines >= cap {
            q.pending_dropped += 1;
            self.dropped_total.fetch_add(1, Ordering::Relaxed);
            self.full.store(true, Ordering::Relaxed);
            return;
        }
        if q.pending_dropped > 0 {
            let n = std::mem::take(&mut q.pending_dropped);
            q.bytes.extend_from_slice(&(self.dropped_warning)(n));
            q.lines += 1;
        }
        q.bytes.extend_from_slice(line);
        q.lines += 1;
        self.full.store(q.lines >= cap, Ordering::Relaxed);
        let mut wake = q.idle && !q.woken;
        if wake && DEFERS.get() && q.lines < DEFERRED_LINES.min(cap / 2) {
            WAKE_PENDING.set(true);
            wake = false;
        }
        q.woken |= wake;
        drop(q);
        if wake {
            self.cv.notify_all();
        }
    }

    /// Called by a runtime worker just before it parks: wake the writer
    /// for the lines this thread queued. The first call marks the thread
    /// as one whose pushes may defer the wake-up.
    pub(super) fn on_park(&self) {
        DEFERS.set(true);
        if WAKE_PENDING.replace(false) {
            self.wake();
        }
    }

    /// Wake the writer if it sleeps while lines wait.
    fn wake(&self) {
        let mut q = self.lock();
        let wake = q.idle && !q.woken && q.lines > 0;
        q.woken |= wake;
        drop(q);
        if wake {
            self.cv.notify_all();
        }
    }

    /// The writer thread: wait for a line, take all that is queued and
    /// write it with the lock released.
    pub(super) fn write_forever(&self, mut out: impl Write) {
        let mut batch = Vec::new();
        loop {
            {
                let mut q = self.lock();
                q.writing = false;
                batch.clear();
                while q.lines == 0 {
                    if q.flushers > 0 {
                        self.cv.notify_all();
                    }
                    q.idle = true;
                    q = self.cv.wait(q).unwrap_or_else(|e| e.into_inner());
                    q.idle = false;
                    q.woken = false;
                }
                // Swapped in the same lock as the take: a flush never sees
                // "empty and idle" while lines are in hand.
                std::mem::swap(&mut batch, &mut q.bytes);
                q.lines = 0;
                q.writing = true;
                self.full.store(false, Ordering::Relaxed);
            }
            // A sink that fails (closed stderr) cannot be told; keep draining
            // so the queue does not fill for nothing.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
        }
    }

    /// Wait until every queued line is written, at most until `deadline`.
    pub(super) fn flush(&self, deadline: Instant) {
        let mut q = self.lock();
        q.flushers += 1;
        if q.idle && q.lines > 0 {
            // Lines a worker queued without waking the writer.
            self.cv.notify_all();
        }
        while q.lines > 0 || q.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            q = self.cv.wait_timeout(q, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        q.flushers -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn json_warning(n: u64) -> Vec<u8> {
        format!("{{\"level\":\"WARN\",\"message\":\"log lines dropped\",\"dropped\":{n}}}\n").into_bytes()
    }

    /// A sink that blocks every write until the test opens it.
    /// Whether the sink is open, what it received, and in how many writes.
    type GateState = Mutex<(bool, Vec<u8>, usize)>;

    #[derive(Clone)]
    struct Gate(Arc<(GateState, Condvar)>);

    impl Gate {
        fn closed() -> Gate {
            Gate(Arc::new((Mutex::new((false, Vec::new(), 0)), Condvar::new())))
        }

        fn open(&self) {
            let (m, cv) = &*self.0;
            m.lock().unwrap().0 = true;
            cv.notify_all();
        }
    }

    impl Write for Gate {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let (m, cv) = &*self.0;
            let mut g = m.lock().unwrap();
            while !g.0 {
                g = cv.wait(g).unwrap();
            }
            g.1.extend_from_slice(b);
            g.2 += 1;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_sink_drops_counts_and_warns_before_the_next_line() {
        let q = LogQueue::new(4, json_warning);
        let gate = Gate::closed();
        let (wq, sink) = (Arc::clone(&q), gate.clone());
        std::thread::spawn(move || wq.write_forever(sink));
        // The writer takes line 0 and blocks on the sink; 4 more fill the
        // queue; the next 3 are dropped, and pushing never blocks.
        let start = Instant::now();
        q.push(b"line 0\n");
        while !q.lock().writing {
            std::thread::yield_now();
        }
        for i in 1..8 {
            q.push(format!("line {i}\n").as_bytes());
        }
        assert!(start.elapsed() < Duration::from_secs(1), "push waited for the sink");
        assert_eq!(q.dropped_total.load(Ordering::Relaxed), 3);
        assert!(q.full.load(Ordering::Relaxed), "a full queue is reported for audit = required");
        // The sink recovers.
        gate.open();
        q.flush(Instant::now() + Duration::from_secs(5));
        assert!(!q.full.load(Ordering::Relaxed));
        q.push(b"line 8\n");
        q.flush(Instant::now() + Duration::from_secs(5));
        let out = String::from_utf8(gate.0 .0.lock().unwrap().1.clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 7, "{out}");
        assert_eq!(&lines[..5], ["line 0", "line 1", "line 2", "line 3", "line 4"]);
        let warning: serde_json::Value = serde_json::from_str(lines[5]).unwrap();
        assert_eq!(warning["message"], "log lines dropped");
        assert_eq!(warning["level"], "WARN");
        assert_eq!(warning["dropped"], 3);
        assert_eq!(lines[6], "line 8");
    }

    #[test]
    fn lines_queued_while_the_sink_is_busy_go_out_in_one_write() {
        let q = LogQueue::new(100, json_warning);
        let gate = Gate::closed();
        let (wq, sink) = (Arc::clone(&q), gate.clone());
        std::thread::spawn(move || wq.write_forever(sink));
        q.push(b"line 0\n");
        while !q.lock().writing {
            std::thread::yield_now();
        }
        for i in 1..=60 {
            q.push(format!("line {i}\n").as_bytes());
        }
        gate.open();
        q.flush(Instant::now() + Duration::from_secs(5));
        let (_, out, writes) = gate.0 .0.lock().unwrap().clone();
        let expected: String = (0..=60).map(|i| format!("line {i}\n")).collect();
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        assert_eq!(writes, 2, "line 0, then the 60 that waited, in one write");
    }

    /// An open sink that records each write.
    fn counting_writer(q: &Arc<LogQueue>) -> Gate {
        let gate = Gate::closed();
        gate.open();
        let (wq, sink) = (Arc::clone(q), gate.clone());
        std::thread::spawn(move || wq.write_forever(sink));
        // Pushes below must find it waiting for a first line.
        while !q.lock().idle {
            std::thread::yield_now();
        }
        gate
    }

    fn wait_for_writes(gate: &Gate, n: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (_, out, writes) = gate.0 .0.lock().unwrap().clone();
            if writes >= n {
                return String::from_utf8(out).unwrap();
            }
            assert!(Instant::now() < deadline, "{writes} writes after 5 s, expected {n}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_worker_wakes_the_writer_when_it_parks_and_its_lines_go_out_in_one_write() {
        let q = LogQueue::new(1000, json_warning);
        let gate = counting_writer(&q);
        q.on_park(); // this thread now behaves as a runtime worker
        for i in 0..3 {
            q.push(format!("line {i}\n").as_bytes());
        }
        q.on_park();
        assert_eq!(wait_for_writes(&gate, 1), "line 0\nline 1\nline 2\n");
        assert_eq!(gate.0 .0.lock().unwrap().2, 1);
    }

    #[test]
    fn a_worker_that_never_parks_still_gets_its_lines_written() {
        let q = LogQueue::new(10_000, json_warning);
        let gate = counting_writer(&q);
        q.on_park();
        for i in 0..DEFERRED_LINES {
            q.push(format!("line {i}\n").as_bytes());
        }
        // No park: the bound wakes the writer.
        let out = wait_for_writes(&gate, 1);
        assert!(out.starts_with("line 0\n"), "{out}");
    }

    #[test]
    fn flush_writes_lines_a_worker_queued_without_waking_the_writer() {
        let q = LogQueue::new(1000, json_warning);
        let gate = counting_writer(&q);
        q.on_park();
        q.push(b"last words\n");
        q.flush(Instant::now() + Duration::from_secs(5));
        assert_eq!(String::from_utf8(gate.0 .0.lock().unwrap().1.clone()).unwrap(), "last words\n");
    }
}
