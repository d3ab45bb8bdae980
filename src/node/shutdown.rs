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
//!
//! A step of the node: it must not call reload, nor be called from below.

use std::time::Duration;

use tokio::sync::mpsc;

use super::{Node, Signal};
use crate::systemd;

/// After the force step, how long sessions get to write their log line.
const FORCE_GRACE: Duration = Duration::from_secs(2);

impl Node {
    /// Run the shutdown phases; returns when the node may exit.
    pub(super) async fn shutdown(&mut self, signals: &mut mpsc::Receiver<Signal>) {
        let state = std::sync::Arc::clone(&self.state);
        let timeouts = state.snapshot().config.timeouts.clone();

        // 1. unready
        state.set_ready(false);
        systemd::notify_stopping();
        tracing::info!(
            shutdown_delay = %crate::config::fmt_duration(timeouts.shutdown_delay),
            sessions = state.active_sessions(),
            "shutting down: readiness is off, listeners stay open for shutdown_delay"
        );
        let mut hurry = false;
        tokio::select! {
            _ = tokio::time::sleep(timeouts.shutdown_delay) => {}
            _ = second_signal(signals) => hurry = true,
        }

        // 2. close
        self.listeners.close_all().await;
        state.sessions.close();

        // 3. drain
        if !hurry && !state.sessions.is_empty() {
            tracing::info!(
                drain = %crate::config::fmt_duration(timeouts.drain),
                sessions = state.active_sessions(),
                "listeners closed; waiting for sessions to end"
            );
            tokio::select! {
                _ = state.sessions.wait() => {}
                _ = tokio::time::sleep(timeouts.drain) => {}
                _ = second_signal(signals) => {}
            }
        }

        // 4. force
        if !state.sessions.is_empty() {
            tracing::info!(sessions = state.active_sessions(), "closing the remaining sessions");
            state.close_sessions();
            let _ = tokio::time::timeout(FORCE_GRACE, state.sessions.wait()).await;
        }
        tracing::info!("portgate stopped");
    }
}

/// Resolves on the next terminate signal (reloads are ignored while stopping).
async fn second_signal(signals: &mut mpsc::Receiver<Signal>) {
    loop {
        match signals.recv().await {
            Some(Signal::Terminate) => return,
            Some(Signal::Reload) => {
                tracing::warn!("ignoring reload: shutting down");
            }
            Some(Signal::Upgrade) => {
                tracing::warn!("ignoring SIGUSR2 (upgrade): shutting down");
            }
            None => std::future::pending::<()>().await,
        }
    }
}
