//! The route table: `(port, via)` -> route, and per-route runtime state.
//!
//! A [`RouteTable`] is immutable once built; a reload builds a new one and
//! swaps it in (see `node/reload.rs`), so lookups on the accept path take no
//! lock. Per-route runtime state ([`RouteState`]: metric handles and the live
//! session count behind `max_connections`) survives reloads by route name.
//!
//! This module answers "which route?" only. Whether a client may use it is
//! `session/admission.rs`; it must not log or dial.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::config::policy::{self, Conn, Refused, RouteKeys};
use crate::config::{Config, Route};
use crate::metrics::{Metrics, RouteMetrics};

/// Runtime state of a route, kept across reloads while its name exists.
pub(crate) struct RouteState {
    pub(crate) metrics: Arc<RouteMetrics>,
    /// Sessions admitted on this route name and not yet ended.
    active: AtomicU32,
}

impl RouteState {
    /// Take a slot under `max` (0 = unlimited). The slot is released when the
    /// returned guard drops.
    pub(crate) fn try_acquire(self: &Arc<Self>, max: u32) -> Option<RouteSlot> {
        let mut cur = self.active.load(Ordering::Relaxed);
        loop {
            if max != 0 && cur >= max {
                return None;
            }
            match self.active.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        self.metrics.active.increment(1);
        Some(RouteSlot { state: Arc::clone(self) })
    }
}

/// One admitted session's hold on its route's counters.
pub(crate) struct RouteSlot {
    state: Arc<RouteState>,
}

impl RouteSlot {
    pub(crate) fn state(&self) -> &Arc<RouteState> {
        &self.state
    }
}

impl Drop for RouteSlot {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::AcqRel);
        self.state.metrics.active.decrement(1);
    }
}

/// A route together with its runtime state.
#[derive(Clone)]
pub(crate) struct RouteEntry {
    pub(crate) route: Arc<Route>,
    pub(crate) state: Arc<RouteState>,
}

impl AsRef<Route> for RouteEntry {
    fn as_ref(&self) -> &Route {
        &self.route
    }
}

/// Immutable `(port, via)` -> route map.
#[derive(Default, Clone)]
pub(crate) struct RouteTable {
    /// The routing key, with the one lookup rule that the `[[test]]`
    /// evaluator uses too (`config/policy.rs`).
    keys: RouteKeys<RouteEntry>,
    by_name: HashMap<String, RouteEntry>,
}

impl RouteTable {
    /// Build the table for `config`, reusing the runtime state of routes whose
    /// name already exists in `states` (and registering new ones).
    pub(crate) fn build(config: &Config, states: &RouteStates) -> RouteTable {
        let mut table = RouteTable::default();
        for route in &config.routes {
            let entry = RouteEntry { route: Arc::clone(route), state: states.get(route) };
            table.keys.insert(route.port, route.via.as_deref(), entry.clone());
            table.by_name.insert(route.name.clone(), entry);
        }
        table
    }

    /// Which route takes `conn`, and does it admit it at `now` (route,
    /// source, endpoint, window): [`policy::decide`] over this table.
    pub(crate) fn decide(
        &self,
        conn: &Conn<'_>,
        now: SystemTime,
    ) -> Result<&RouteEntry, Refused<'_, RouteEntry>> {
        policy::decide(&self.keys, conn, now)
    }

    pub(crate) fn by_name(&self, name: &str) -> Option<&RouteEntry> {
        self.by_name.get(name)
    }

    pub(crate) fn len(&self) -> usize {
        self.by_name.len()
    }
}

/// Route runtime states by name, kept across reloads.
#[derive(Default)]
pub(crate) struct RouteStates {
    inner: Mutex<HashMap<String, Arc<RouteState>>>,
    metrics: Option<Arc<Metrics>>,
}

impl RouteStates {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        RouteStates { inner: Mutex::default(), metrics: Some(metrics) }
    }

    /// The runtime state of `route`'s name (created, with its series, if new).
    pub(crate) fn state_of(&self, route: &Route) -> Arc<RouteState> {
        self.get(route)
    }

    fn get(&self, route: &Route) -> Arc<RouteState> {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(&route.name) {
            return Arc::clone(s);
        }
        let metrics = match &self.metrics {
            Some(m) => m.route(&route.name, &route.tenant),
            None => Metrics::new().route(&route.name, &route.tenant),
        };
        let state = Arc::new(RouteState { metrics, active: AtomicU32::new(0) });
        map.insert(route.name.clone(), Arc::clone(&state));
        state
    }

    /// Forget the state of routes that `config` no longer has. Sessions that
    /// still run on them keep their own `Arc` (and with it their series).
    pub(crate) fn retain(&self, config: &Config) {
        let names: std::collections::HashSet<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|name, _| names.contains(name.as_str()));
    }

    /// If a route's tenant label changed, its series' label follows.
    pub(crate) fn refresh_labels(&self, config: &Config) {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for route in &config.routes {
            if let Some(state) = map.get(&route.name) {
                if state.metrics.tenant() != route.tenant {
                    state.metrics.set_tenant(&route.tenant);
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) fn test_route(
    name: &str,
    port: u16,
    via: Option<&str>,
    allow: &[&str],
    endpoints: &[&str],
) -> Route {
    Route {
        name: name.into(),
        port,
        via: via.map(Into::into),
        target: crate::config::Target::Addr("127.0.0.1:22".parse().expect("a socket address")),
        tenant: name.into(),
        allow: allow.iter().map(|a| a.parse().expect("a CIDR")).collect(),
        endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
        max_connections: 0,
        ssh_user: None,
        not_before: None,
        not_after: None,
        max_session: None,
        source: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, port: u16, via: Option<&str>, allow: &[&str], endpoints: &[&str]) -> Route {
        test_route(name, port, via, allow, endpoints)
    }

    #[test]
    fn slots_respect_limit_and_release() {
        let states = RouteStates::default();
        let r = route("a", 1, None, &["0.0.0.0/0"], &[]);
        let s = states.get(&r);
        let a = s.try_acquire(2).unwrap();
        let _b = s.try_acquire(2).unwrap();
        assert!(s.try_acquire(2).is_none());
        drop(a);
        assert!(s.try_acquire(2).is_some());
        assert!(s.try_acquire(0).is_some(), "0 = unlimited");
        // The state is shared by name across builds.
        assert!(Arc::ptr_eq(&s, &states.get(&r)));
    }
}
