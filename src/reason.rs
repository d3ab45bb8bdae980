//! The label vocabulary: why a connection was refused, why a session ended,
//! why a dial failed. These strings are contract (SPEC.md: metric labels and
//! log fields); they are spelled in this one file and nowhere else.
//!
//! This module owns names only. It must not count, log or decide anything.

use std::fmt;

/// Why a connection was refused, as the `reason` label and log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Reject {
    ProxyHeader,
    NoRoute,
    SourceNotAllowed,
    EndpointNotAllowed,
    /// Outside the route's `[not_before, not_after)` access window.
    OutsideWindow,
    Limit,
    /// `[log] audit = "required"` and the log queue is full.
    AuditUnavailable,
}

impl Reject {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reject::ProxyHeader => "proxy_header",
            Reject::NoRoute => "no_route",
            Reject::SourceNotAllowed => "source_not_allowed",
            Reject::EndpointNotAllowed => "endpoint_not_allowed",
            Reject::OutsideWindow => "outside_window",
            Reject::Limit => "limit",
            Reject::AuditUnavailable => "audit_unavailable",
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a session ended, as the `close` log field and label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    ClientClosed,
    TargetClosed,
    IdleTimeout,
    Revoked,
    Shutdown,
    Error,
    /// The route's access window ended (`not_after`).
    Expired,
    /// The session reached its `max_session`.
    MaxDuration,
    /// Closed through the control socket.
    Operator,
}

impl CloseReason {
    /// Every value, in declaration order (`ALL[r as usize] == r`).
    pub(crate) const ALL: [CloseReason; 9] = [
        CloseReason::ClientClosed,
        CloseReason::TargetClosed,
        CloseReason::IdleTimeout,
        CloseReason::Revoked,
        CloseReason::Shutdown,
        CloseReason::Error,
        CloseReason::Expired,
        CloseReason::MaxDuration,
        CloseReason::Operator,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::TargetClosed => "target_closed",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Revoked => "revoked",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Error => "error",
            CloseReason::Expired => "expired",
            CloseReason::MaxDuration => "max_duration",
            CloseReason::Operator => "operator",
        }
    }
}

/// Why a dial to a target failed, as the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnectErrorKind {
    Refused,
    Timeout,
    Unreachable,
    Other,
}

impl ConnectErrorKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ConnectErrorKind::Refused => "refused",
            ConnectErrorKind::Timeout => "timeout",
            ConnectErrorKind::Unreachable => "unreachable",
            ConnectErrorKind::Other => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_close_reasons_are_listed_in_order() {
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{}", r.as_str());
        }
    }
}
