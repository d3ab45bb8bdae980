//! `[keepalive]`: TCP keepalive on both sockets of every session.
//!
//! Owns the kernel's limits on keepalive values (whole seconds, at most
//! 32767 s, at most 127 probes) and the rule that `time` stays below the
//! NLB's idle timeout. It must not set any socket option; `sockopt` applies
//! what this returns.

use std::time::Duration;

use toml::Spanned;

use super::Ctx;
use crate::config::defaults::{
    DEFAULT_IDLE_TIMEOUT_LIMIT, DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_RETRIES, DEFAULT_KEEPALIVE_TIME,
};
use crate::config::raw::RawKeepalive;
use crate::config::{fmt_duration, Keepalive};

/// Linux caps TCP_KEEPCNT at 127.
const MAX_KEEPALIVE_RETRIES: i64 = 127;
/// Linux caps TCP_KEEPIDLE and TCP_KEEPINTVL at 32767 s.
const MAX_KEEPALIVE_SECS: u64 = 32767;

/// The validated `[keepalive]` section; a bad value falls back to its
/// default.
pub(super) fn check(cx: &mut Ctx, ka: &RawKeepalive) -> Keepalive {
    let time = seconds(cx, "keepalive.time", &ka.time, DEFAULT_KEEPALIVE_TIME);
    let interval = seconds(cx, "keepalive.interval", &ka.interval, DEFAULT_KEEPALIVE_INTERVAL);
    let retries = match &ka.retries {
        None => DEFAULT_KEEPALIVE_RETRIES,
        Some(s) if (1..=MAX_KEEPALIVE_RETRIES).contains(s.get_ref()) => *s.get_ref() as u32,
        Some(s) => {
            cx.err(
                0,
                s.span(),
                format!("keepalive.retries = {}: expected 1 to {MAX_KEEPALIVE_RETRIES}", s.get_ref()),
            );
            DEFAULT_KEEPALIVE_RETRIES
        }
    };
    let limit =
        cx.positive("keepalive.idle_timeout_limit", &ka.idle_timeout_limit, DEFAULT_IDLE_TIMEOUT_LIMIT);
    if time >= limit {
        let span = ka.time.as_ref().or(ka.idle_timeout_limit.as_ref()).map(|s| s.span()).unwrap_or(0..0);
        cx.err(
            0,
            span,
            format!(
                "keepalive.time ({}) must be below keepalive.idle_timeout_limit ({}), or the NLB drops idle sessions before the first keepalive probe",
                fmt_duration(time),
                fmt_duration(limit)
            ),
        );
    }
    Keepalive { time, interval, retries, idle_timeout_limit: limit }
}

/// A keepalive duration: whole seconds (the kernel takes seconds), >= 1s.
fn seconds(cx: &mut Ctx, key: &str, v: &Option<Spanned<String>>, default: Duration) -> Duration {
    let d = cx.positive(key, v, default);
    if d.as_secs() > MAX_KEEPALIVE_SECS {
        if let Some(s) = v {
            cx.err(
                0,
                s.span(),
                format!("{key} = {:?}: Linux allows at most {MAX_KEEPALIVE_SECS}s", s.get_ref()),
            );
        }
        return default;
    }
    if d.subsec_nanos() != 0 || d < Duration::from_secs(1) {
        if let Some(s) = v {
            cx.err(
                0,
                s.span(),
                format!(
                    "{key} = {:?}: TCP keepalive works in whole seconds; use a value like \"15s\"",
                    s.get_ref()
                ),
            );
        }
        return default;
    }
    d
}
