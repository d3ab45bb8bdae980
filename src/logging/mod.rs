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

mod line;
mod queue;

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

pub use line::Addr;
use queue::LogQueue;

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

/// For the runtime's `on_thread_park` hook: a worker about to sleep wakes
/// the writer for the lines it queued since it last did (see
/// `LogQueue::push`). Threads that never call it wake the writer at every
/// first line.
pub fn on_worker_park() {
    if let Some(q) = QUEUE.get() {
        q.on_park();
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
    let warning: fn(u64) -> Vec<u8> = match format {
        LogFormat::Json => |n| line::dropped_warning(LogFormat::Json, n),
        LogFormat::Text => |n| line::dropped_warning(LogFormat::Text, n),
    };
    let queue = LogQueue::new(queue_lines, warning);
    let writer_queue = Arc::clone(&queue);
    let spawned = std::thread::Builder::new().name("portgate-log".into()).spawn(move || {
        crate::sys::yield_on_wakeup();
        writer_queue.write_forever(std::io::stderr())
    });
    if spawned.is_err() {
        // No writer thread: nothing would ever drain the queue.
        return LogControl::none();
    }
    let (filter, handle) = reload::Layer::new(filter);
    let lines = line::LineLayer { queue: Arc::clone(&queue), format };
    match tracing_subscriber::registry().with(filter).with(lines).try_init() {
        Ok(()) => {
            let _ = QUEUE.set(Arc::clone(&queue));
            LogControl { handle: Some(handle), from_env, queue: Some(queue) }
        }
        Err(_) => LogControl::none(),
    }
}
