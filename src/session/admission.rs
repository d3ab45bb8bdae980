//! Step 2 of a session: which route takes the connection, and may it.
//!
//! Checks run in the contract's order (SPEC.md "Order of admission checks"):
//! route lookup (`no_route`), source (`source_not_allowed`), endpoint
//! (`endpoint_not_allowed`), then the limits (`limit`: the route's
//! `max_connections`, then `[access] max_per_source`), taken as slots that
//! are held for the session's life, and last, with `[log] audit =
//! "required"`, whether the session can be recorded (`audit_unavailable`).
//! The PROXY header was step 1.
//!
//! This module decides; it must not read sockets, count or log (the caller
//! records the outcome).

use std::net::IpAddr;
use std::sync::Arc;

use super::addr::ConnInfo;
use crate::config::{Audit, Route};
use crate::node::state::{NodeState, Snapshot, SourceSlot};
use crate::reason::Reject;
use crate::routes::{RouteEntry, RouteSlot};

/// A connection that passed admission: its route and the slots it holds.
pub(super) struct Admission {
    pub(super) route: Arc<Route>,
    pub(super) route_slot: RouteSlot,
    pub(super) source_slot: Option<SourceSlot>,
}

/// A refused connection: the reason, and the route when one was found.
pub(super) struct Refusal {
    pub(super) entry: Option<RouteEntry>,
    pub(super) reason: Reject,
}

/// Admit `info` under `snap`: route, rules, then limits.
pub(super) fn admit_connection(
    state: &NodeState,
    snap: &Snapshot,
    info: &ConnInfo,
) -> Result<Admission, Refusal> {
    let Some(entry) = snap.table.lookup(info.port, info.endpoint.as_deref()) else {
        return Err(Refusal { entry: None, reason: Reject::NoRoute });
    };
    let refuse = |reason| Refusal { entry: Some(entry.clone()), reason };
    admit(&entry.route, info.client.0.ip(), info.endpoint.as_deref()).map_err(refuse)?;
    let route_slot =
        entry.state.try_acquire(entry.route.max_connections).ok_or_else(|| refuse(Reject::Limit))?;
    let max_per_source = snap.config.access.max_per_source;
    let source_slot = if max_per_source > 0 {
        // On refusal the route slot drops here, before the caller logs.
        Some(
            state
                .try_acquire_source(info.client.0.ip(), max_per_source)
                .ok_or_else(|| refuse(Reject::Limit))?,
        )
    } else {
        None
    };
    if snap.config.log.audit == Audit::Required && crate::logging::audit_unavailable() {
        // The slots taken above drop here.
        return Err(refuse(Reject::AuditUnavailable));
    }
    Ok(Admission { route: Arc::clone(&entry.route), route_slot, source_slot })
}

/// The route's rules for a client: source, then endpoint. (Limits are taken
/// separately, as slots.)
pub(crate) fn admit(route: &Route, client: IpAddr, endpoint: Option<&str>) -> Result<(), Reject> {
    let client = client.to_canonical();
    if !route.allow.iter().any(|net| net.contains(&client)) {
        return Err(Reject::SourceNotAllowed);
    }
    if !route.endpoints.is_empty() {
        match endpoint {
            Some(ep) if route.endpoints.iter().any(|e| e == ep) => {}
            _ => return Err(Reject::EndpointNotAllowed),
        }
    }
    Ok(())
}

/// Would the config in `snap` still admit a running session? Identity is the
/// route's name; its `(port, via)` must be unchanged and the source and
/// endpoint must pass its new rules. Limits are not re-checked: lowering
/// `max_connections` does not revoke sessions.
pub(crate) fn still_admits(snap: &Snapshot, route: &Route, info: &ConnInfo) -> bool {
    match snap.table.by_name(&route.name) {
        None => false,
        Some(e) => {
            e.route.port == route.port
                && e.route.via == route.via
                && admit(&e.route, info.client.0.ip(), info.endpoint.as_deref()).is_ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::test_route as route;

    #[test]
    fn admit_checks_source_then_endpoint() {
        let r = route("a", 1, None, &["10.0.0.0/8"], &["vpce-1"]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(admit(&r, ip("10.1.2.3"), Some("vpce-1")), Ok(()));
        assert_eq!(admit(&r, ip("11.1.2.3"), Some("vpce-2")), Err(Reject::SourceNotAllowed));
        assert_eq!(admit(&r, ip("10.1.2.3"), Some("vpce-2")), Err(Reject::EndpointNotAllowed));
        assert_eq!(admit(&r, ip("10.1.2.3"), None), Err(Reject::EndpointNotAllowed));
        // A dual-stack listener shows IPv4 clients as IPv4-mapped IPv6.
        assert_eq!(admit(&r, ip("::ffff:10.1.2.3"), Some("vpce-1")), Ok(()));
        let v6 = route("b", 1, None, &["2001:db8::/32"], &[]);
        assert_eq!(admit(&v6, ip("2001:db8::1"), None), Ok(()));
        assert_eq!(admit(&v6, ip("10.1.2.3"), None), Err(Reject::SourceNotAllowed));
    }
}
