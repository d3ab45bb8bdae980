//! `[log]`: the line format, the filter level, the queue and audit mode.
//!
//! The level is parsed here with the same filter syntax the logger uses, so
//! `check`, `run` and a reload refuse the same levels with the same located
//! message. It must not install or change the logger.

use super::Ctx;
use crate::config::defaults::{
    DEFAULT_LOG_AUDIT, DEFAULT_LOG_FORMAT, DEFAULT_LOG_LEVEL, DEFAULT_LOG_QUEUE_LINES,
};
use crate::config::raw::RawLog;
use crate::config::{Audit, Log, LogFormat};

/// Bounds of `log.queue_lines`: below 64 a single burst of rejections would
/// drop lines; above a million the queue alone could hold ~400 MiB.
const QUEUE_LINES_MIN: i64 = 64;
const QUEUE_LINES_MAX: i64 = 1_000_000;

/// The validated `[log]` section; a bad value falls back to its default.
pub(super) fn check(cx: &mut Ctx, raw: &RawLog) -> Log {
    let format = match &raw.format {
        None => DEFAULT_LOG_FORMAT,
        Some(s) => match s.get_ref().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                cx.err(0, s.span(), format!("log.format {other:?}: expected \"text\" or \"json\""));
                DEFAULT_LOG_FORMAT
            }
        },
    };
    let level = match &raw.level {
        None => DEFAULT_LOG_LEVEL.to_owned(),
        Some(s) if s.get_ref().trim().is_empty() => {
            cx.err(0, s.span(), "log.level is empty; use error, warn, info, debug or trace");
            DEFAULT_LOG_LEVEL.to_owned()
        }
        Some(s) => {
            let level = s.get_ref().trim();
            match tracing_subscriber::EnvFilter::try_new(level) {
                Ok(_) => level.to_owned(),
                Err(e) => {
                    cx.err(
                        0,
                        s.span(),
                        format!(
                            "log.level {level:?} is not a valid filter ({e}); \
                             use one of error, warn, info, debug, trace"
                        ),
                    );
                    DEFAULT_LOG_LEVEL.to_owned()
                }
            }
        }
    };
    let queue_lines = match &raw.queue_lines {
        None => DEFAULT_LOG_QUEUE_LINES,
        Some(s) => {
            let n = *s.get_ref();
            if (QUEUE_LINES_MIN..=QUEUE_LINES_MAX).contains(&n) {
                n as usize
            } else {
                cx.err(
                    0,
                    s.span(),
                    format!("log.queue_lines = {n}: expected a whole number from {QUEUE_LINES_MIN} to {QUEUE_LINES_MAX}"),
                );
                DEFAULT_LOG_QUEUE_LINES
            }
        }
    };
    let audit = match &raw.audit {
        None => DEFAULT_LOG_AUDIT,
        Some(s) => match s.get_ref().as_str() {
            "best_effort" => Audit::BestEffort,
            "required" => Audit::Required,
            other => {
                cx.err(0, s.span(), format!("log.audit {other:?}: expected \"best_effort\" or \"required\""));
                DEFAULT_LOG_AUDIT
            }
        },
    };
    Log { format, level, queue_lines, audit }
}
