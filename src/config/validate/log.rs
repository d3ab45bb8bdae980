//! `[log]`: the log line format and the filter level.
//!
//! Owns only the shape of the values: `format` is text or json, `level` is
//! not empty. It must not parse the level as a tracing filter; `check`
//! (the CLI) and the logging setup do that, so a reload can keep the old
//! level when the new one does not parse.

use super::Ctx;
use crate::config::defaults::{DEFAULT_LOG_FORMAT, DEFAULT_LOG_LEVEL};
use crate::config::raw::RawLog;
use crate::config::{Log, LogFormat};

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
        Some(s) => s.get_ref().trim().to_owned(),
    };
    Log { format, level }
}
