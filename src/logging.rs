//! Logging: `text` or `json` lines on stderr, level from the config unless
//! `RUST_LOG` is set.
//!
//! JSON lines carry `timestamp`, `level`, `message` and the event's fields at
//! the top level. The logging framework's own target (module path) is never
//! printed, so a `target` field is always the session's target address.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::LogFormat;

/// Changes the level of a running logger (on reload).
pub struct LogControl {
    handle: Option<reload::Handle<EnvFilter, Registry>>,
    from_env: bool,
}

impl LogControl {
    /// A control that does nothing (no logger installed, e.g. in tests).
    pub fn none() -> LogControl {
        LogControl { handle: None, from_env: false }
    }

    /// Apply `level` unless `RUST_LOG` governs the level.
    pub fn set_level(&self, level: &str) {
        if self.from_env {
            return;
        }
        if let Some(h) = &self.handle {
            match EnvFilter::try_new(level) {
                Ok(f) => {
                    let _ = h.reload(f);
                }
                Err(e) => tracing::warn!(level, error = %e, "invalid log.level; keeping the current one"),
            }
        }
    }
}

/// Parse a level directive the way [`init`] will (for `check`).
pub fn check_level(level: &str) -> Result<(), String> {
    EnvFilter::try_new(level).map(|_| ()).map_err(|e| e.to_string())
}

/// Install the global logger. Call once, before anything logs.
pub fn init(format: LogFormat, level: &str) -> LogControl {
    let env = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty());
    let from_env = env.is_some();
    let filter = env
        .and_then(|s| EnvFilter::try_new(s).ok())
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
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
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .with_ansi(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    match result {
        Ok(()) => LogControl { handle: Some(handle), from_env },
        Err(_) => LogControl::none(),
    }
}
