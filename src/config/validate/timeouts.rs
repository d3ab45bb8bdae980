//! `[timeouts]`: how long to wait for a target, for a quiet session, and at
//! shutdown and after a reload.
//!
//! Owns the rule that `connect` is positive and `idle` and `max_session`
//! are positive or `"off"`. It must not start any timer; sessions, shutdown and reload read
//! what this returns.

use std::time::Duration;

use super::Ctx;
use crate::config::defaults::{
    DEFAULT_CONNECT, DEFAULT_DRAIN, DEFAULT_IDLE, DEFAULT_MAX_SESSION, DEFAULT_REVOKE_GRACE,
    DEFAULT_SHUTDOWN_DELAY,
};
use crate::config::raw::RawTimeouts;
use crate::config::Timeouts;

/// The validated `[timeouts]` section; a bad value falls back to its
/// default (a bad `idle` to off).
pub(super) fn check(cx: &mut Ctx, t: &RawTimeouts) -> Timeouts {
    let connect = cx.positive("timeouts.connect", &t.connect, DEFAULT_CONNECT);
    let idle = match &t.idle {
        Some(s) if s.get_ref().trim() == "off" => None,
        None => DEFAULT_IDLE,
        // A bad or zero value is reported by `positive` and comes back as
        // zero: off.
        v => Some(cx.positive("timeouts.idle", v, Duration::ZERO)).filter(|d| !d.is_zero()),
    };
    let shutdown_delay = cx.duration(0, "timeouts.shutdown_delay", &t.shutdown_delay, DEFAULT_SHUTDOWN_DELAY);
    let drain = cx.duration(0, "timeouts.drain", &t.drain, DEFAULT_DRAIN);
    let revoke_grace = cx.duration(0, "timeouts.revoke_grace", &t.revoke_grace, DEFAULT_REVOKE_GRACE);
    let max_session = match &t.max_session {
        None => DEFAULT_MAX_SESSION,
        Some(v) => cx.off_or_positive(0, "timeouts.max_session", v).unwrap_or(DEFAULT_MAX_SESSION),
    };
    Timeouts { connect, idle, shutdown_delay, drain, revoke_grace, max_session }
}
