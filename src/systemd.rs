//! sd_notify: readiness, reload and stop notifications, watchdog, status.
//!
//! Every call is a no-op when `NOTIFY_SOCKET` is not set, so portgate runs
//! the same under systemd, in a terminal and in tests.
//!
//! This module speaks the notify protocol only; what the status says and
//! when to send it is the node's business.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// How often `STATUS=` is refreshed when no watchdog is configured.
const STATUS_EVERY: Duration = Duration::from_secs(10);

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// `READY=1` with a status line: after startup and after every reload.
pub(crate) fn notify_ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1` with `MONOTONIC_USEC`, as `Type=notify-reload` expects.
pub(crate) fn notify_reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `MAINPID=`: an upgrade in place hands the unit to its successor.
pub(crate) fn notify_mainpid(pid: u32) {
    send(&[NotifyState::MainPid(pid)]);
}

pub(crate) fn notify_stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

/// `WATCHDOG_USEC`, if the watchdog is meant for this process: like
/// sd_watchdog_enabled(3), `WATCHDOG_PID` may be absent, or must be our pid.
fn watchdog_usec() -> Option<u64> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok().filter(|&u| u > 0)?;
    match std::env::var("WATCHDOG_PID") {
        Ok(pid) if pid.parse::<u32>().ok() != Some(std::process::id()) => None,
        _ => Some(usec),
    }
}

/// Ping the watchdog at half of `WATCHDOG_USEC`, and refresh `STATUS=`.
/// The pings come from a task on the runtime, so a stalled runtime stops
/// them and systemd restarts the node.
pub(crate) fn spawn_watchdog(status: impl Fn() -> String + Send + 'static, stop: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let watchdog_usec = watchdog_usec();
    let watchdog = watchdog_usec.is_some();
    let period = match watchdog_usec {
        Some(usec) => Duration::from_micros(usec / 2).max(Duration::from_millis(10)),
        None => STATUS_EVERY,
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let status = status();
            if watchdog {
                send(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
            } else {
                send(&[NotifyState::Status(&status)]);
            }
        }
    });
}
