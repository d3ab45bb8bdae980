//! SIGTERM / SIGINT: leave the load balancer's rotation, then drain.
//!
//! Phases, each one named step:
//! 1. **unready**: `/readyz` answers 503, systemd hears `STOPPING=1`;
//!    listeners still accept for `timeouts.shutdown_delay`, long enough for
//!    the NLB's health checks to mark the node unhealthy.
//! 2. **close**: every listener closes.
//! 3. **drain**: sessions get up to `timeouts.drain` to end by themselves.
//! 4. **force**: the rest are closed with FIN (`close=shutdown`).
//!
//! A second signal at any point skips to the force step.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::server::{Server, Signal};
use crate::systemd;

/// After the force step, how long sessions get to write their log line.
const FORCE_GRACE: Duration = Duration::from_secs(2);

/// Run the shutdown phases; returns when the node may exit.
pub async fn shutdown(server: &mut Server, signals: &mut mpsc::Receiver<Signal>) {
    let shared = std::sync::Arc::clone(&server.shared);
    let timeouts = shared.snapshot.load().config.timeouts.clone();

    // 1. unready
    shared.ready.store(false, Ordering::Release);
    systemd::notify_stopping();
    tracing::info!(
        shutdown_delay = %crate::config::fmt_duration(timeouts.shutdown_delay),
        sessions = shared.active_sessions(),
        "shutting down: readiness is off, listeners stay open for shutdown_delay"
    );
    let mut hurry = false;
    tokio::select! {
        _ = tokio::time::sleep(timeouts.shutdown_delay) => {}
        _ = second_signal(signals) => hurry = true,
    }

    // 2. close
    server.listeners.close_all().await;
    shared.sessions.close();

    // 3. drain
    if !hurry && !shared.sessions.is_empty() {
        tracing::info!(
            drain = %crate::config::fmt_duration(timeouts.drain),
            sessions = shared.active_sessions(),
            "listeners closed; waiting for sessions to end"
        );
        tokio::select! {
            _ = shared.sessions.wait() => {}
            _ = tokio::time::sleep(timeouts.drain) => {}
            _ = second_signal(signals) => {}
        }
    }

    // 4. force
    if !shared.sessions.is_empty() {
        tracing::info!(sessions = shared.active_sessions(), "closing the remaining sessions");
        shared.close_sessions();
        let _ = tokio::time::timeout(FORCE_GRACE, shared.sessions.wait()).await;
    }
    tracing::info!("portgate stopped");
}

/// Resolves on the next terminate signal (reloads are ignored while stopping).
async fn second_signal(signals: &mut mpsc::Receiver<Signal>) {
    loop {
        match signals.recv().await {
            Some(Signal::Terminate) => return,
            Some(Signal::Reload) => {
                tracing::warn!("ignoring reload: shutting down");
            }
            None => std::future::pending::<()>().await,
        }
    }
}
