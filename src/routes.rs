//! The route table: `(port, via)` -> route, and per-route runtime state.
//!
//! A [`RouteTable`] is immutable once built; a reload builds a new one and
//! swaps it in (see `node/reload.rs`), so lookups on the accept path take no
//! lock. Per-route runtime state ([`RouteState`]: metric handles and the live
//! session count behind `max_connections`) survives reloads by route name.
//!
//! This module answers "which route?" only. Whether a client may use it is
//! `session/admission.rs`; it must not log or dial.

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
    /// Positions in `keys.routes()`, sorted by route name: a name lookup
    /// is a binary search, with no copy of the names.
    by_name: Box<[u32]>,
}

impl RouteTable {
    /// Build the table for `config`, reusing the runtime state of routes whose
    /// name already exists in `states` (and registering new ones).
    pub(crate) fn build(config: &Config, states: &RouteStates) -> RouteTable {
        let entries: Vec<RouteEntry> = config
            .routes
            .iter()
            .zip(states.states_of(&config.routes))
            .map(|(route, state)| RouteEntry { route: Arc::clone(route), state })
            .collect();
        let keys = RouteKeys::new(entries);
        let routes = keys.routes();
        let n = u32::try_from(routes.len()).expect("fewer than 4 billion routes");
        let mut by_name: Vec<u32> = (0..n).collect();
        by_name.sort_unstable_by(|a, b| routes[*a as usize].route.name.cmp(&routes[*b as usize].route.name));
        RouteTable { keys, by_name: by_name.into_boxed_slice() }
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
        let routes = self.keys.routes();
        let i = self.by_name.binary_search_by(|i| routes[*i as usize].route.name.as_str().cmp(name)).ok()?;
        Some(&routes[self.by_name[i] as usize])
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.routes().len()
    }
}

/// Route runtime states by name, kept across reloads.
#[derive(Default)]
pub(crate) struct RouteStates {
    /// Sorted by name (each state's series carry it): a flat list, where a
    /// hash map would hold a copy of every name and room to grow.
    inner: Mutex<Vec<Arc<RouteState>>>,
    metrics: Option<Arc<Metrics>>,
}

/// Where `name` is in `list` (sorted by name), or where it would go.
fn find(list: &[Arc<RouteState>], name: &str) -> Result<usize, usize> {
    list.binary_search_by(|s| s.metrics.name().cmp(name))
}

impl RouteStates {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        RouteStates { inner: Mutex::default(), metrics: Some(metrics) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<RouteState>>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The runtime state of `route`'s name (created, with its series, if new).
    pub(crate) fn state_of(&self, route: &Route) -> Arc<RouteState> {
        let mut list = self.lock();
        match find(&list, &route.name) {
            Ok(i) => Arc::clone(&list[i]),
            Err(i) => {
                let state = self.create(route);
                list.insert(i, Arc::clone(&state));
                state
            }
        }
    }

    /// The runtime states of `routes` (names unique, as validation makes
    /// them), in their order; those not known yet are created. A known
    /// route whose tenant changed gets its series relabelled here, in the
    /// same lookup (a second pass by name cost 7% of a 50k-route reload).
    fn states_of(&self, routes: &[Arc<Route>]) -> Vec<Arc<RouteState>> {
        let mut list = self.lock();
        let mut added = Vec::new();
        let states = routes
            .iter()
            .map(|route| match find(&list, &route.name) {
                Ok(i) => {
                    let metrics = &list[i].metrics;
                    if !metrics.has_tenant(&route.tenant) {
                        metrics.set_tenant(&route.tenant);
                    }
                    Arc::clone(&list[i])
                }
                Err(_) => {
                    let state = self.create(route);
                    added.push(Arc::clone(&state));
                    state
                }
            })
            .collect();
        if !added.is_empty() {
            added.sort_unstable_by(|a, b| a.metrics.name().cmp(b.metrics.name()));
            list.reserve_exact(added.len());
            list.extend(added);
            // Two sorted runs: the stable sort merges them in one pass.
            list.sort_by(|a, b| a.metrics.name().cmp(b.metrics.name()));
        }
        states
    }

    fn create(&self, route: &Route) -> Arc<RouteState> {
        let metrics = match &self.metrics {
            Some(m) => m.route(&route.name, &route.tenant),
            None => Metrics::new().route(&route.name, &route.tenant),
        };
        Arc::new(RouteState { metrics, active: AtomicU32::new(0) })
    }

    /// Forget the state of routes that `config` no longer has. Sessions that
    /// still run on them keep their own `Arc` (and with it their series).
    pub(crate) fn retain(&self, config: &Config) {
        let mut names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
        names.sort_unstable();
        let mut list = self.lock();
        list.retain(|s| names.binary_search(&s.metrics.name()).is_ok());
        list.shrink_to_fit();
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
        let s = states.state_of(&r);
        let a = s.try_acquire(2).unwrap();
        let _b = s.try_acquire(2).unwrap();
        assert!(s.try_acquire(2).is_none());
        drop(a);
        assert!(s.try_acquire(2).is_some());
        assert!(s.try_acquire(0).is_some(), "0 = unlimited");
        // The state is shared by name across builds.
        assert!(Arc::ptr_eq(&s, &states.state_of(&r)));
    }

    #[test]
    fn tables_find_every_route_and_states_follow_names() {
        let states = RouteStates::default();
        let config = |routes: &[(&str, u16, Option<&str>)]| {
            let mut c = Config::with_defaults("x.toml".into());
            c.routes =
                routes.iter().map(|(n, p, v)| Arc::new(route(n, *p, *v, &["0.0.0.0/0"], &[]))).collect();
            c
        };
        let first = config(&[("b", 2, None), ("a", 1, None), ("c", 1, Some("vpce-1"))]);
        let t = RouteTable::build(&first, &states);
        assert_eq!(t.len(), 3);
        for name in ["a", "b", "c"] {
            assert_eq!(t.by_name(name).map(|e| e.route.name.as_str()), Some(name));
        }
        assert!(t.by_name("d").is_none());
        let conn = |port, endpoint| Conn { port, client: "10.0.0.1".parse().unwrap(), endpoint };
        let name = |t: &RouteTable, port, endpoint| {
            t.decide(&conn(port, endpoint), SystemTime::UNIX_EPOCH).ok().map(|e| e.route.name.clone())
        };
        assert_eq!(name(&t, 1, Some("vpce-1")).as_deref(), Some("c"));
        assert_eq!(name(&t, 1, Some("vpce-2")).as_deref(), Some("a"));
        assert_eq!(name(&t, 2, None).as_deref(), Some("b"));
        assert_eq!(name(&t, 3, None), None);

        let state = |t: &RouteTable, n| Arc::clone(&t.by_name(n).unwrap().state);
        let second = config(&[("a", 5, None), ("d", 1, None)]);
        let t2 = RouteTable::build(&second, &states);
        assert!(Arc::ptr_eq(&state(&t, "a"), &state(&t2, "a")), "same name, same state");
        states.retain(&second);
        let t3 = RouteTable::build(&first, &states);
        assert!(Arc::ptr_eq(&state(&t, "a"), &state(&t3, "a")));
        assert!(!Arc::ptr_eq(&state(&t, "b"), &state(&t3, "b")), "b was forgotten");
        assert!(Arc::ptr_eq(&state(&t2, "d"), &states.state_of(&route("d", 1, None, &[], &[]))));
    }

    #[test]
    fn a_new_tenant_relabels_the_routes_series_at_the_next_build() {
        let states = RouteStates::default();
        let config = |tenant: &str| {
            let mut c = Config::with_defaults("x.toml".into());
            let mut r = route("a", 1, None, &["0.0.0.0/0"], &[]);
            r.tenant = tenant.into();
            c.routes = vec![Arc::new(r)];
            c
        };
        let t1 = RouteTable::build(&config("blue"), &states);
        assert_eq!(&*t1.by_name("a").unwrap().state.metrics.tenant(), "blue");
        let t2 = RouteTable::build(&config("green"), &states);
        let s2 = &t2.by_name("a").unwrap().state;
        assert!(Arc::ptr_eq(&t1.by_name("a").unwrap().state, s2), "same name, same state");
        assert_eq!(&*s2.metrics.tenant(), "green");
    }
}
