//! What a session leaves behind: the counters and the one log line for a
//! refusal, a failed dial or an ended session (SPEC.md "Logs", "Counting").
//!
//! Lines are built from what the session already holds; this module must
//! not read sockets or decide anything.

use std::time::Duration;

use super::addr::ConnInfo;
use crate::config::{Route, Target};
use crate::logging::Addr;
use crate::metrics::Metrics;
use crate::node::registry::{Entry, SessionId};
use crate::reason::{CloseReason, Reject};
use crate::routes::RouteEntry;

/// A target in a log line: a literal address is written by the logger's
/// own address formatter (the connection path's common case).
struct TargetField<'a>(&'a Target);

impl std::fmt::Display for TargetField<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Target::Addr(a) => Addr(*a).fmt(f),
            other => other.fmt(f),
        }
    }
}

/// Count and log one refused connection.
pub(super) fn rejected(
    metrics: &Metrics,
    info: &ConnInfo,
    entry: Option<&RouteEntry>,
    reason: Reject,
    detail: &str,
) {
    let route = entry.map(|e| e.route.name.as_str()).unwrap_or("");
    match entry.and_then(|e| e.state.metrics.rejected(reason)) {
        Some(c) => c.increment(1),
        None => metrics.rejected_unrouted(reason),
    }
    tracing::info!(
        port = info.port,
        route = %route,
        client = %Addr(info.client.0),
        peer = %Addr(info.peer.0),
        endpoint = %info.endpoint.as_deref().unwrap_or("-"),
        reason = %reason.as_str(),
        detail = %detail,
        "connection rejected"
    );
}

/// The `session opened` line: the target answered, and the session is
/// listed from now on.
pub(super) fn opened(e: &Entry) {
    tracing::info!(
        id = %e.id,
        route = %e.route.name,
        tenant = %e.route.tenant,
        port = e.info.port,
        client = %Addr(e.info.client.0),
        peer = %Addr(e.info.peer.0),
        endpoint = %e.info.endpoint.as_deref().unwrap_or("-"),
        target = %TargetField(&e.route.target),
        "session opened"
    );
}

/// What the session-end log line says.
pub(super) struct SessionEnd<'a> {
    pub(super) id: SessionId,
    pub(super) route: &'a Route,
    pub(super) info: &'a ConnInfo,
    /// (to_target, to_client)
    pub(super) bytes: (u64, u64),
    pub(super) elapsed: Duration,
}

impl SessionEnd<'_> {
    /// The one line per session end (the contract's fields, plus `error` and
    /// `error_kind` when there is one). The caller counts it in
    /// `portgate_sessions_closed_total`.
    pub(super) fn log(
        &self,
        close: CloseReason,
        error: Option<&dyn std::fmt::Display>,
        error_kind: Option<&str>,
    ) {
        tracing::info!(
            id = %self.id,
            route = %self.route.name,
            tenant = %self.route.tenant,
            port = self.info.port,
            client = %Addr(self.info.client.0),
            peer = %Addr(self.info.peer.0),
            endpoint = %self.info.endpoint.as_deref().unwrap_or("-"),
            target = %TargetField(&self.route.target),
            bytes_to_target = self.bytes.0,
            bytes_to_client = self.bytes.1,
            duration_ms = self.elapsed.as_millis() as u64,
            close = %close.as_str(),
            error = error.map(tracing::field::display),
            error_kind = error_kind.map(tracing::field::display),
            "session closed"
        );
    }
}
