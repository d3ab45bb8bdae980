//! Step 2 of a session: which route takes the connection, and may it.
//!
//! Checks run in the contract's order (SPEC.md "Order of admission checks"):
//! route lookup (`no_route`), source (`source_not_allowed`), endpoint
//! (`endpoint_not_allowed`), the route's access window (`outside_window`),
//! then the limits (`limit`: the route's `max_connections`, then `[access]
//! max_per_source`), taken as slots that are held for the session's life,
//! and last, with `[log] audit = "required"`, whether the session can be
//! recorded (`audit_unavailable`). The PROXY header was step 1.
//!
//! Everything up to the window is the config's own decision, written once
//! in `config/policy.rs` and shared with the `[[test]]` evaluator; this
//! module adds what depends on the running node (limits, audit).
//!
//! This module decides; it must not read sockets, count or log (the caller
//! records the outcome).

use std::sync::Arc;
use std::time::SystemTime;

use super::addr::ConnInfo;
use crate::config::policy::{self, Conn};
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

/// Admit `info` under `snap` now: route, rules, window, then limits.
pub(super) fn admit_connection(
    state: &NodeState,
    snap: &Snapshot,
    info: &ConnInfo,
) -> Result<Admission, Refusal> {
    admit_at(state, snap, info, SystemTime::now())
}

/// [`admit_connection`] with the windows judged at `now`.
fn admit_at(
    state: &NodeState,
    snap: &Snapshot,
    info: &ConnInfo,
    now: SystemTime,
) -> Result<Admission, Refusal> {
    let entry = snap
        .table
        .decide(&conn(info), now)
        .map_err(|r| Refusal { entry: r.route.cloned(), reason: r.reason })?;
    let refuse = |reason| Refusal { entry: Some(entry.clone()), reason };
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

/// What the config's rules look at in a connection.
fn conn(info: &ConnInfo) -> Conn<'_> {
    Conn { port: info.port, client: info.client.0.ip(), endpoint: info.endpoint.as_deref() }
}

/// Would the config in `snap` still admit a running session now? Identity
/// is the route's name; its `(port, via)` must be unchanged and the source,
/// endpoint and window must pass its new rules. Limits are not re-checked:
/// lowering `max_connections` does not revoke sessions.
///
/// A reload that moves a window so that the session is outside it now
/// revokes the session (after `revoke_grace`), like any other admission
/// change.
pub(crate) fn still_admits(snap: &Snapshot, route: &Route, info: &ConnInfo) -> bool {
    match snap.table.by_name(&route.name) {
        None => false,
        Some(e) => {
            e.route.port == route.port
                && e.route.via == route.via
                && policy::admits(&e.route, info.client.0.ip(), info.endpoint.as_deref(), SystemTime::now())
                    .is_ok()
        }
    }
}

#[cfg(test)]
mod tests {
    //! Live admission and the `[[test]]` evaluator agree: for random configs
    //! and random connections and times, a `[[test]]` that expects what
    //! [`admit_at`] decided passes `config::load`, and one that expects
    //! anything else fails it, naming what happened.

    use std::net::{IpAddr, SocketAddr};
    use std::time::{Duration, SystemTime};

    use proptest::prelude::*;
    use proptest::sample::select;

    use super::*;
    use crate::metrics::Metrics;
    use crate::session::addr::{ClientAddr, PeerAddr};

    /// Windows and times on a 50-second grid, so that tests land on
    /// `not_before` and `not_after` exactly (half-open bounds).
    const T0: u64 = 1_796_115_600; // 2026-12-01T09:00:00Z
    const VIAS: [&str; 2] = ["vpce-a1", "vpce-b2"];
    const ALLOWS: [&str; 5] = ["10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16", "0.0.0.0/0", "2001:db8::/32"];
    const CLIENTS: [&str; 6] =
        ["10.1.2.3", "10.2.0.1", "192.168.1.1", "8.8.8.8", "2001:db8::5", "::ffff:10.1.2.3"];

    fn at(step: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + 50 * step)
    }

    fn rfc3339(step: u64) -> String {
        crate::config::units::fmt_rfc3339(at(step))
    }

    #[derive(Debug, Clone)]
    struct GenRoute {
        port: u16,
        via: Option<usize>,
        allow: Vec<usize>,
        endpoints: Vec<usize>,
        window: (Option<u64>, Option<u64>),
        max_connections: u32,
    }

    fn gen_route() -> impl Strategy<Value = GenRoute> {
        (
            8001u16..=8002,
            proptest::option::weighted(0.3, 0..VIAS.len()),
            proptest::collection::vec(0..ALLOWS.len(), 1..4),
            prop_oneof![3 => Just(Vec::new()), 1 => proptest::collection::vec(0..VIAS.len(), 1..3)],
            (proptest::option::of(0u64..10), proptest::option::of(1u64..10)),
            0u32..3,
        )
            .prop_map(|(port, via, allow, endpoints, (nb, len), max_connections)| GenRoute {
                port,
                via,
                allow,
                endpoints,
                // not_after after not_before when both are set.
                window: (nb, len.map(|l| nb.unwrap_or(0) + l)),
                max_connections,
            })
    }

    /// The config text: PROXY mode (for `via` and `endpoints`), routes with
    /// unique `(port, via)` keys.
    fn config_text(routes: &[GenRoute]) -> String {
        let mut out = String::from("[proxy_protocol]\nmode = \"required\"\ntrusted = [\"127.0.0.0/8\"]\n");
        let mut keys = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            if keys.contains(&(r.port, r.via)) {
                continue;
            }
            keys.push((r.port, r.via));
            let list = |idx: &[usize], from: &[&str]| {
                let items: Vec<String> = idx.iter().map(|&i| format!("{:?}", from[i])).collect();
                format!("[{}]", items.join(", "))
            };
            out.push_str(&format!(
                "[[route]]\nname = \"r{i}\"\nport = {}\ntarget = \"127.0.0.1:9\"\nallow = {}\nendpoints = {}\nmax_connections = {}\n",
                r.port,
                list(&r.allow, &ALLOWS),
                list(&r.endpoints, &VIAS),
                r.max_connections
            ));
            if let Some(v) = r.via {
                out.push_str(&format!("via = {:?}\n", VIAS[v]));
            }
            if let Some(nb) = r.window.0 {
                out.push_str(&format!("not_before = {:?}\n", rfc3339(nb)));
            }
            if let Some(na) = r.window.1 {
                out.push_str(&format!("not_after = {:?}\n", rfc3339(na)));
            }
        }
        out
    }

    fn load(dir: &std::path::Path, text: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        let path = dir.join("p.toml");
        std::fs::write(&path, text).unwrap();
        crate::config::load(&path)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn tests_and_live_admission_agree(
            routes in proptest::collection::vec(gen_route(), 0..8),
            port in prop_oneof![6 => 8001u16..=8002, 1 => Just(8003u16)],
            client in select(&CLIENTS[..]),
            endpoint in proptest::option::of(select(&["vpce-a1", "vpce-b2", "vpce-c3"][..])),
            step in 0u64..22,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let text = config_text(&routes);
            let cfg = load(dir.path(), &text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            let state = NodeState::new(cfg, Arc::new(Metrics::new()));
            let snap = state.snapshot();
            let client: IpAddr = client.parse().unwrap();
            let peer = SocketAddr::new(client, 40000);
            let info = ConnInfo {
                port,
                peer: PeerAddr(peer),
                client: ClientAddr(peer),
                endpoint: endpoint.map(str::to_owned),
            };
            let live = admit_at(&state, &snap, &info, at(step)).map(|a| a.route.name.clone()).map_err(|r| r.reason);

            let test = |expect: &str| {
                let endpoint = endpoint.map(|e| format!("endpoint = {e:?}\n")).unwrap_or_default();
                format!(
                    "{text}[[test]]\nport = {port}\nclient = \"{client}\"\n{endpoint}at = {:?}\n{expect}",
                    rfc3339(step)
                )
            };
            let (right, wrong) = match &live {
                Ok(name) => (
                    format!("expect = \"admit\"\nroute = {name:?}\n"),
                    "expect = \"reject\"\n".to_owned(),
                ),
                Err(reason) => (
                    format!("expect = \"reject\"\nreason = \"{reason}\"\n"),
                    "expect = \"admit\"\n".to_owned(),
                ),
            };
            let passed = load(dir.path(), &test(&right));
            prop_assert!(passed.is_ok(), "live said {live:?}, the test disagreed: {passed:?}\n{}", test(&right));
            let failed = load(dir.path(), &test(&wrong)).expect_err("a test expecting the opposite passed");
            let said = failed.to_string();
            let want = match &live {
                Ok(name) => format!("got admit by route {name:?}"),
                Err(reason) => format!("got reject: {reason}"),
            };
            prop_assert!(said.ends_with(&want), "{said} (live: {live:?})");
        }
    }
}
