//! The node's shared state: the published config snapshot, and the protocol
//! by which accept loops, sessions, the admin server and the node's own steps
//! see changes to it.
//!
//! One type, [`NodeState`], owns the whole publish/observe protocol, so its
//! ordering rules live in one place instead of in the order of calls spread
//! over several files:
//!
//! - [`NodeState::publish`] stores a snapshot, *then* bumps the generation.
//! - [`NodeState::admission_view`] reads the generation *before* the
//!   snapshot, so a connection admitted under snapshot N with generation
//!   N-1 (a publish raced it) is re-checked when it registers, never missed
//!   ([`NodeState::republished_since`]).
//! - [`NodeState::close_sessions`] sets `closing` *before* it walks the
//!   registry, and a registering session reads it *after* inserting itself.
//! - Readiness is written only through [`NodeState::set_ready`] and read
//!   only through [`NodeState::is_ready`], with one ordering.
//!
//! This is a leaf: it imports config, routes and metrics, and none of the
//! modules that use it (listener, session, admin, node steps). It must not
//! bind, accept, dial or log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::node::registry::Registry;
use crate::reason::CloseReason;
use crate::routes::{RouteStates, RouteTable};
use crate::upgrade::handed::Collector;

/// One effective config with its route table; swapped whole on reload.
pub(crate) struct Snapshot {
    /// The validated config; `Arc` so a reload can diff against it cheaply.
    pub(crate) config: Arc<Config>,
    /// Lookup structure built from `config.routes`, sharing their runtime state.
    pub(crate) table: RouteTable,
    /// `portgate_config_info`'s hash, computed once per snapshot.
    pub(crate) hash: String,
    /// When this snapshot was built (just before it is published): an
    /// access window that ended before it was ended already when this
    /// config came in.
    pub(crate) built: std::time::SystemTime,
}

impl Snapshot {
    pub(crate) fn new(config: Config, states: &RouteStates) -> Snapshot {
        let table = RouteTable::build(&config, states);
        let hash = config.hash();
        Snapshot { config: Arc::new(config), table, hash, built: std::time::SystemTime::now() }
    }
}

/// Which publish a connection was admitted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Subscription {
    seen: u64,
}

/// State shared by the accept loops, sessions, the admin server and the
/// node's steps (startup, reload, shutdown).
pub(crate) struct NodeState {
    /// The current config and routes; loaded once per connection, lock-free.
    snapshot: ArcSwap<Snapshot>,
    /// Bumped by every publish (after the store), so a session that was
    /// dialing meanwhile can tell that it must re-check its admission.
    generation: AtomicU64,
    /// Set at the end of the drain, before the registry is walked: a session
    /// that registers afterwards closes at once.
    closing: AtomicBool,
    /// `/readyz`: every listener bound and not shutting down.
    ready: AtomicBool,
    /// Admitted sessions right now (for `STATUS=` and the shutdown log).
    active: AtomicUsize,
    /// Process-wide metric handles; shared with everything that counts.
    pub(crate) metrics: Arc<Metrics>,
    /// Per-route runtime state by name, kept across reloads.
    pub(crate) states: RouteStates,
    /// Every session task; the drain waits on it.
    pub(crate) sessions: TaskTracker,
    /// Running sessions past their dial: who, on which route.
    pub(crate) registry: Arc<Registry>,
    /// `[access] max_per_source` counts, by client address.
    per_source: Arc<SourceLimiter>,
    /// Where sessions leave their frozen state during an upgrade in place.
    pub(crate) handover: Collector,
}

impl NodeState {
    pub(crate) fn new(config: Config, metrics: Arc<Metrics>) -> Arc<NodeState> {
        metrics.set_histograms(config.metrics.histograms);
        let states = RouteStates::new(Arc::clone(&metrics));
        let snap = Arc::new(Snapshot::new(config, &states));
        metrics.routes.set(snap.table.len() as i64);
        metrics.set_config_hash(&snap.hash);
        Arc::new(NodeState {
            snapshot: ArcSwap::new(snap),
            generation: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            metrics,
            states,
            sessions: TaskTracker::new(),
            registry: Arc::default(),
            per_source: Arc::default(),
            handover: Collector::default(),
        })
    }

    /// The current snapshot, for readers that do not subscribe to changes
    /// (the admin server, the node's own steps).
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The snapshot a new connection is judged by, and the subscription that
    /// makes any later publish visible to it (generation read first).
    pub(crate) fn admission_view(&self) -> (Subscription, Arc<Snapshot>) {
        let seen = self.generation.load(Ordering::SeqCst);
        (Subscription { seen }, self.snapshot.load_full())
    }

    /// Publish a new snapshot to new connections. (Running sessions are
    /// judged against it by the node, through the registry.)
    pub(crate) fn publish(&self, snap: Arc<Snapshot>) {
        self.metrics.routes.set(snap.table.len() as i64);
        self.metrics.set_config_hash(&snap.hash);
        self.snapshot.store(snap);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether a snapshot was published after `sub` was taken.
    pub(crate) fn republished_since(&self, sub: Subscription) -> bool {
        self.generation.load(Ordering::SeqCst) != sub.seen
    }

    /// End of the drain: ask every running session to close
    /// (`close=shutdown`), and any that registers later too.
    pub(crate) fn close_sessions(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.registry.close(|_| true, CloseReason::Shutdown);
    }

    /// Whether the drain has ended.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Count an admitted session for as long as the guard lives.
    pub(crate) fn session_guard(self: &Arc<Self>) -> SessionGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        SessionGuard(Arc::clone(self))
    }

    pub(crate) fn active_sessions(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Take one of `max` concurrent sessions for the client address `ip`
    /// (`[access] max_per_source`), released when the slot drops.
    pub(crate) fn try_acquire_source(&self, ip: IpAddr, max: u32) -> Option<SourceSlot> {
        let ip = ip.to_canonical();
        self.per_source.try_acquire(ip, max).then(|| SourceSlot { limiter: Arc::clone(&self.per_source), ip })
    }

    /// The systemd `STATUS=` line.
    pub(crate) fn status_line(&self) -> String {
        let routes = self.snapshot.load().table.len();
        let sessions = self.active_sessions();
        format!(
            "serving {routes} route{}, {sessions} session{}",
            if routes == 1 { "" } else { "s" },
            if sessions == 1 { "" } else { "s" }
        )
    }
}

/// One admitted session, counted in [`NodeState::active_sessions`].
pub(crate) struct SessionGuard(Arc<NodeState>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Concurrent sessions per client address (`[access] max_per_source`).
/// Only touched when the limit is set.
#[derive(Default)]
struct SourceLimiter {
    counts: Mutex<HashMap<IpAddr, u32>>,
}

impl SourceLimiter {
    /// Count one more session for `ip` unless it already has `max`.
    fn try_acquire(&self, ip: IpAddr, max: u32) -> bool {
        let mut m = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            if *n == 0 {
                m.remove(&ip);
            }
            return false;
        }
        *n += 1;
        true
    }

    fn release(&self, ip: IpAddr) {
        let mut m = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

/// One session counted against its client address.
pub(crate) struct SourceSlot {
    limiter: Arc<SourceLimiter>,
    ip: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        self.limiter.release(self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_after_admission_is_seen() {
        let state = NodeState::new(Config::with_defaults("x.toml".into()), Arc::new(Metrics::new()));
        let (sub, snap) = state.admission_view();
        assert!(!state.republished_since(sub));
        state.publish(Arc::new(Snapshot::new((*snap.config).clone(), &state.states)));
        assert!(state.republished_since(sub));
        let (sub, _) = state.admission_view();
        assert!(!state.republished_since(sub));
        assert!(!state.is_closing());
        state.close_sessions();
        assert!(state.is_closing());
    }

    #[test]
    fn per_source_slots_count_and_release() {
        let state = NodeState::new(Config::with_defaults("x.toml".into()), Arc::new(Metrics::new()));
        let ip: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let a = state.try_acquire_source(ip, 2).unwrap();
        let _b = state.try_acquire_source("10.0.0.1".parse().unwrap(), 2).unwrap();
        assert!(state.try_acquire_source(ip, 2).is_none(), "IPv4-mapped and IPv4 are one client");
        drop(a);
        assert!(state.try_acquire_source(ip, 2).is_some());
    }
}
