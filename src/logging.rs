//! Logging: `text` or `json` lines, level from the config unless `RUST_LOG`
//! is set, written to stderr by a thread of their own through a bounded
//! queue, so a stalled sink (journald, a full disk behind a shipper, a
//! `| tee` that blocks) never stops the node.
//!
//! The runtime's threads only format a line and push it onto the queue
//! ([`LogQueue`]). When the queue holds `[log] queue_lines` lines, new lines
//! are dropped and counted (`portgate_log_lines_dropped_total`); the first
//! line queued after drops is preceded by a `log lines dropped` warning with
//! field `dropped` (the count since the last such warning), so the gap shows
//! where it was. `[log] audit = "required"` asks admission to refuse while
//! the queue is full ([`audit_unavailable`]).
//!
//! JSON lines carry `timestamp`, `level`, `message` and the event's fields at
//! the top level. The logging framework's own target (module path) is never
//! printed, so a `target` field is always the session's target address.
//!
//! This module owns the logger and its writer thread; it must not block the
//! caller of a log macro, and it must not import the node or sessions.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::LogFormat;

/// The process's queue, once [`init`] installed the logger.
static QUEUE: OnceLock<Arc<LogQueue>> = OnceLock::new();

/// Lines dropped since start (all queues; there is one per process).
pub fn lines_dropped() -> u64 {
    QUEUE.get().map_or(0, |q| q.dropped_total.load(Ordering::Relaxed))
}

/// True while lines cannot be recorded: the queue is full. Admission under
/// `[log] audit = "required"` refuses then.
pub fn audit_unavailable() -> bool {
    QUEUE.get().is_some_and(|q| q.full.load(Ordering::Relaxed))
}

/// One item waiting for the writer.
enum Item {
    Line(Vec<u8>),
    /// `dropped` lines were lost just before the next item.
    Dropped(u64),
}

struct Inner {
    items: VecDeque<Item>,
    /// Lines dropped since the last `log lines dropped` warning was queued.
    pending_dropped: u64,
    /// The writer is writing an item it took (for [`LogQueue::flush`]).
    writing: bool,
}

/// A bounded queue of formatted lines and the thread that writes them.
pub(crate) struct LogQueue {
    inner: Mutex<Inner>,
    /// Wakes the writer (items arrived) and flushers (the queue emptied).
    cv: Condvar,
    /// `[log] queue_lines`; a reload may change it.
    capacity: AtomicUsize,
    /// Mirrors "the queue holds `capacity` lines", for lock-free reads.
    full: AtomicBool,
    dropped_total: AtomicU64,
    format: LogFormat,
}

impl LogQueue {
    fn new(format: LogFormat, capacity: usize) -> Arc<LogQueue> {
        Arc::new(LogQueue {
            inner: Mutex::new(Inner { items: VecDeque::new(), pending_dropped: 0, writing: false }),
            cv: Condvar::new(),
            capacity: AtomicUsize::new(capacity.max(1)),
            full: AtomicBool::new(false),
            dropped_total: AtomicU64::new(0),
            format,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue one formatted line, or drop and count it. Never blocks on the
    /// sink: the lock is held only to push.
    fn push(&self, line: Vec<u8>) {
        let cap = self.capacity.load(Ordering::Relaxed);
        let mut q = self.lock();
        if q.items.len() >= cap {
            q.pending_dropped += 1;
            self.dropped_total.fetch_add(1, Ordering::Relaxed);
            self.full.store(true, Ordering::Relaxed);
            return;
        }
        if q.pending_dropped > 0 {
            let n = std::mem::take(&mut q.pending_dropped);
            q.items.push_back(Item::Dropped(n));
        }
        q.items.push_back(Item::Line(line));
        self.full.store(q.items.len() >= cap, Ordering::Relaxed);
        drop(q);
        self.cv.notify_all();
    }

    /// The writer thread: take an item, write it with the lock released.
    fn write_forever(&self, mut out: impl Write) {
        loop {
            let item = {
                let mut q = self.lock();
                q.writing = false;
                loop {
                    if let Some(item) = q.items.pop_front() {
                        // Marked in the same lock as the pop: a flush never
                        // sees "empty and idle" while a line is in hand.
                        q.writing = true;
                        let cap = self.capacity.load(Ordering::Relaxed);
                        self.full.store(q.items.len() >= cap, Ordering::Relaxed);
                        break item;
                    }
                    self.cv.notify_all();
                    q = self.cv.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            let bytes = match item {
                Item::Line(line) => line,
                Item::Dropped(n) => dropped_warning(self.format, n),
            };
            // A sink that fails (closed stderr) cannot be told; keep draining
            // so the queue does not fill for nothing.
            let _ = out.write_all(&bytes).and_then(|()| out.flush());
        }
    }

    /// Wait until every queued line is written, at most until `deadline`.
    fn flush(&self, deadline: Instant) {
        let mut q = self.lock();
        while !q.items.is_empty() || q.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            q = self.cv.wait_timeout(q, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// The `log lines dropped` warning, formatted like the logger's own lines.
fn dropped_warning(format: LogFormat, dropped: u64) -> Vec<u8> {
    let ts = humantime::format_rfc3339_micros(SystemTime::now());
    match format {
        LogFormat::Json => format!(
            "{{\"timestamp\":\"{ts}\",\"level\":\"WARN\",\"message\":\"log lines dropped\",\"dropped\":{dropped}}}\n"
        ),
        LogFormat::Text => format!("{ts}  WARN log lines dropped dropped={dropped}\n"),
    }
    .into_bytes()
}

/// Hands the formatter a buffer per event; the line is queued when the
/// buffer drops (tracing writes one event per writer).
#[derive(Clone)]
struct QueueWriter(Arc<LogQueue>);

/// One event's line being formatted.
struct LineBuf {
    queue: Arc<LogQueue>,
    buf: Vec<u8>,
}

impl Write for LineBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineBuf {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.queue.push(std::mem::take(&mut self.buf));
        }
    }
}

impl<'a> MakeWriter<'a> for QueueWriter {
    type Writer = LineBuf;
    fn make_writer(&'a self) -> LineBuf {
        LineBuf { queue: Arc::clone(&self.0), buf: Vec::with_capacity(256) }
    }
}

/// Changes a running logger (on reload) and flushes it (at exit).
#[derive(Clone)]
pub struct LogControl {
    handle: Option<reload::Handle<EnvFilter, Registry>>,
    from_env: bool,
    queue: Option<Arc<LogQueue>>,
}

impl LogControl {
    /// A control that does nothing (no logger installed, e.g. in tests).
    pub fn none() -> LogControl {
        LogControl { handle: None, from_env: false, queue: None }
    }

    /// Apply a reloaded `[log]` section: the level (unless `RUST_LOG`
    /// governs it; the config validated it) and the queue bound.
    pub fn apply(&self, level: &str, queue_lines: usize) {
        if let Some(q) = &self.queue {
            q.capacity.store(queue_lines.max(1), Ordering::Relaxed);
        }
        if self.from_env {
            return;
        }
        if let (Some(h), Ok(f)) = (&self.handle, EnvFilter::try_new(level)) {
            let _ = h.reload(f);
        }
    }

    /// Give the writer up to `timeout` to write what is queued (at exit;
    /// a stalled sink loses the rest rather than holding the exit).
    pub fn flush(&self, timeout: Duration) {
        if let Some(q) = &self.queue {
            q.flush(Instant::now() + timeout);
        }
    }
}

/// Install the global logger and start its writer thread. Call once,
/// before anything logs.
pub fn init(format: LogFormat, level: &str, queue_lines: usize) -> LogControl {
    let env = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty());
    let from_env = env.is_some();
    let filter = env
        .and_then(|s| EnvFilter::try_new(s).ok())
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new(crate::config::defaults::DEFAULT_LOG_LEVEL));
    let queue = LogQueue::new(format, queue_lines);
    let writer_queue = Arc::clone(&queue);
    let spawned = std::thread::Builder::new()
        .name("portgate-log".into())
        .spawn(move || writer_queue.write_forever(std::io::stderr()));
    if spawned.is_err() {
        // No writer thread: nothing would ever drain the queue.
        return LogControl::none();
    }
    let writer = QueueWriter(Arc::clone(&queue));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_target(false)
                    .with_writer(writer),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_target(false).with_ansi(false).with_writer(writer))
            .try_init(),
    };
    match result {
        Ok(()) => {
            let _ = QUEUE.set(Arc::clone(&queue));
            LogControl { handle: Some(handle), from_env, queue: Some(queue) }
        }
        Err(_) => LogControl::none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that blocks every write until the test opens it.
    /// Whether the sink is open, and what it received.
    type GateState = Mutex<(bool, Vec<u8>)>;

    #[derive(Clone)]
    struct Gate(Arc<(GateState, Condvar)>);

    impl Write for Gate {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let (m, cv) = &*self.0;
            let mut g = m.lock().unwrap();
            while !g.0 {
                g = cv.wait(g).unwrap();
            }
            g.1.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_sink_drops_counts_and_warns_before_the_next_line() {
        let q = LogQueue::new(LogFormat::Json, 4);
        let gate = Gate(Arc::new((Mutex::new((false, Vec::new())), Condvar::new())));
        let (wq, sink) = (Arc::clone(&q), gate.clone());
        std::thread::spawn(move || wq.write_forever(sink));
        // The writer takes line 0 and blocks on the sink; 4 more fill the
        // queue; the next 3 are dropped, and pushing never blocks.
        let start = Instant::now();
        q.push(b"line 0\n".to_vec());
        while !q.lock().writing {
            std::thread::yield_now();
        }
        for i in 1..8 {
            q.push(format!("line {i}\n").into_bytes());
        }
        assert!(start.elapsed() < Duration::from_secs(1), "push waited for the sink");
        assert_eq!(q.dropped_total.load(Ordering::Relaxed), 3);
        assert!(q.full.load(Ordering::Relaxed), "a full queue is reported for audit = required");
        // The sink recovers.
        {
            let (m, cv) = &*gate.0;
            m.lock().unwrap().0 = true;
            cv.notify_all();
        }
        q.flush(Instant::now() + Duration::from_secs(5));
        assert!(!q.full.load(Ordering::Relaxed));
        q.push(b"line 8\n".to_vec());
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
}
