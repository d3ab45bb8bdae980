//! Prometheus metrics: every name and label set portgate exports.
//!
//! Every series is a plain atomic in a struct resolved once (the node's in
//! [`Metrics`], each route's in a [`RouteMetrics`] its runtime state
//! holds), so the per-connection and per-read paths never format a label,
//! look anything up or take a lock. Every series that can be known in
//! advance exists from the start at 0, so alerts and `rate()` never meet a
//! missing series. `render.rs` writes the text exposition at scrape time,
//! family by family; `types.rs` holds the counter, gauge and histogram.
//!
//! A route's series exist while its runtime state does (while the config
//! has the route, or a session still runs on it). With `[metrics]
//! histograms = "node"`, the two per-route histograms become one series
//! each with `route=""` (SPEC "Metrics at scale"); counters and gauges stay
//! per route.
//!
//! [`Metrics`] is owned, not global: several nodes can live in one process
//! (tests) without sharing counters.

mod render;
mod types;

use std::sync::{Arc, Mutex, OnceLock, Weak};

pub use types::{Buckets, Counter, Gauge, Histogram, HistogramSlot};

use crate::config::{Histograms, Shared};
use crate::reason::{CloseReason, ConnectErrorKind, Reject};

pub const CONNECTIONS_ACCEPTED: &str = "portgate_connections_accepted_total";
pub const CONNECTIONS_REJECTED: &str = "portgate_connections_rejected_total";
pub const CONNECTIONS_ACTIVE: &str = "portgate_connections_active";
pub const UPSTREAM_CONNECT_ERRORS: &str = "portgate_upstream_connect_errors_total";
pub const UPSTREAM_CONNECT_DURATION: &str = "portgate_upstream_connect_duration_seconds";
pub const SESSION_DURATION: &str = "portgate_session_duration_seconds";
pub const BYTES: &str = "portgate_bytes_total";
pub const SESSIONS_CLOSED: &str = "portgate_sessions_closed_total";
pub const HEALTH_CHECKS: &str = "portgate_health_checks_total";
pub const CONFIG_RELOADS: &str = "portgate_config_reloads_total";
pub const CONFIG_LAST_RELOAD_SUCCESS: &str = "portgate_config_last_reload_success";
pub const CONFIG_INFO: &str = "portgate_config_info";
pub const ROUTES: &str = "portgate_routes";
pub const BUILD_INFO: &str = "portgate_build_info";
/// Not in the contract's table, but what an operator needs to alert before
/// the descriptor limit bites.
pub const OPEN_FDS: &str = "portgate_process_open_fds";
pub const MAX_FDS: &str = "portgate_process_max_fds";
pub const LOG_LINES_DROPPED: &str = "portgate_log_lines_dropped_total";
pub const UPGRADES: &str = "portgate_upgrades_total";

/// Dialing a target on a private network: sub-millisecond when healthy,
/// up to the connect timeout when not.
pub(crate) const CONNECT_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Maintenance sessions: a probe-like second up to a working day.
pub(crate) const SESSION_BUCKETS: &[f64] =
    &[0.1, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0];

/// `portgate_upstream_connect_duration_seconds`' buckets.
#[derive(Debug)]
pub struct ConnectBuckets;
impl Buckets for ConnectBuckets {
    const BOUNDS: &'static [f64] = CONNECT_BUCKETS;
}

/// `portgate_session_duration_seconds`' buckets.
#[derive(Debug)]
pub struct SessionBuckets;
impl Buckets for SessionBuckets {
    const BOUNDS: &'static [f64] = SESSION_BUCKETS;
}

/// Rejection reasons counted per route (the others have no route).
const ROUTE_REJECTS: [Reject; 5] = [
    Reject::SourceNotAllowed,
    Reject::EndpointNotAllowed,
    Reject::OutsideWindow,
    Reject::Limit,
    Reject::AuditUnavailable,
];
const CONNECT_ERROR_KINDS: [ConnectErrorKind; 4] = [
    ConnectErrorKind::Refused,
    ConnectErrorKind::Timeout,
    ConnectErrorKind::Unreachable,
    ConnectErrorKind::Other,
];

/// The process-wide metrics.
pub struct Metrics {
    pub health_checks: Counter,
    pub reloads_success: Counter,
    pub reloads_failure: Counter,
    /// `portgate_upgrades_total`: successes are counted by the new process,
    /// failures by the old one.
    pub upgrades_success: Counter,
    pub upgrades_failure: Counter,
    pub last_reload_success: Gauge,
    pub routes: Gauge,
    rejected_proxy_header: Counter,
    rejected_no_route: Counter,
    /// The current config hash (`portgate_config_info`): only the current
    /// one is rendered, so fleet drift queries never count a stale hash.
    config_hash: Mutex<String>,
    /// Every route's series, for rendering; pruned as routes go.
    route_list: Mutex<RouteList>,
    histograms: Mutex<Histograms>,
    /// The shared histograms of `histograms = "node"`.
    node_connect: Arc<Histogram>,
    node_session: Arc<Histogram>,
}

/// The routes' series, weakly held; dead entries are dropped when the list
/// has doubled since the last pruning (amortised O(1) per route).
#[derive(Default)]
struct RouteList {
    list: Vec<Weak<RouteMetrics>>,
    prune_at: usize,
}

impl RouteList {
    fn push(&mut self, m: &Arc<RouteMetrics>) {
        if self.list.len() >= self.prune_at.max(64) {
            self.list.retain(|w| w.strong_count() > 0);
            self.prune_at = self.list.len() * 2;
        }
        self.list.push(Arc::downgrade(m));
    }
}

/// The series of one route, resolved once.
pub struct RouteMetrics {
    /// The route's name (escaped when rendered). A copy of its own, not
    /// the config's: these series outlive the config they were made from,
    /// and would otherwise keep its memory resident.
    name: Shared<str>,
    /// The tenant label of `accepted` and `active` (as written; escaped
    /// when rendered), a copy of its own, or `name` when they are equal;
    /// a reload may change it.
    tenant: Mutex<Shared<str>>,
    pub accepted: Counter,
    pub active: Gauge,
    pub bytes_to_target: Counter,
    pub bytes_to_client: Counter,
    pub connect_duration: HistogramSlot<ConnectBuckets>,
    pub session_duration: HistogramSlot<SessionBuckets>,
    /// The closed, rejected and connect error counts, allocated at the
    /// first of them (until then they render as zeros): most routes of a
    /// large config never count one.
    counts: OnceLock<Box<Counts>>,
}

/// A route's counters by reason or kind.
#[derive(Default)]
struct Counts {
    /// `portgate_sessions_closed_total`, by `CloseReason as usize`.
    closed: [Counter; CloseReason::ALL.len()],
    /// By the position of the reason in `ROUTE_REJECTS`.
    rejected: [Counter; ROUTE_REJECTS.len()],
    /// By the position of the kind in `CONNECT_ERROR_KINDS`.
    connect_errors: [Counter; CONNECT_ERROR_KINDS.len()],
}

impl RouteMetrics {
    fn counts(&self) -> &Counts {
        self.counts.get_or_init(Box::default)
    }

    pub(crate) fn rejected(&self, reason: Reject) -> Option<&Counter> {
        ROUTE_REJECTS.iter().position(|r| *r == reason).map(|i| &self.counts().rejected[i])
    }

    /// The `portgate_sessions_closed_total` series for `close`.
    pub(crate) fn closed(&self, close: CloseReason) -> &Counter {
        &self.counts().closed[close as usize]
    }

    pub(crate) fn connect_error(&self, kind: ConnectErrorKind) -> &Counter {
        let i = CONNECT_ERROR_KINDS.iter().position(|k| *k == kind).unwrap_or(CONNECT_ERROR_KINDS.len() - 1);
        &self.counts().connect_errors[i]
    }

    /// The route name these series carry.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The tenant label these series carry now.
    pub(crate) fn tenant(&self) -> Shared<str> {
        self.tenant.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether these series carry the tenant label `tenant`.
    pub(crate) fn has_tenant(&self, tenant: &str) -> bool {
        **self.tenant.lock().unwrap_or_else(|e| e.into_inner()) == *tenant
    }

    /// A reload gave the route another tenant: its labelled series follow.
    pub(crate) fn set_tenant(&self, tenant: &str) {
        *self.tenant.lock().unwrap_or_else(|e| e.into_inner()) = label(&self.name, tenant);
    }
}

/// A tenant label: the name itself when it is the name (the default), else
/// a copy.
fn label(name: &Shared<str>, tenant: &str) -> Shared<str> {
    if **name == *tenant {
        name.clone()
    } else {
        tenant.into()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Metrics {
            health_checks: Counter::default(),
            reloads_success: Counter::default(),
            reloads_failure: Counter::default(),
            upgrades_success: Counter::default(),
            upgrades_failure: Counter::default(),
            last_reload_success: Gauge::default(),
            routes: Gauge::default(),
            rejected_proxy_header: Counter::default(),
            rejected_no_route: Counter::default(),
            config_hash: Mutex::new(String::new()),
            route_list: Mutex::default(),
            histograms: Mutex::new(Histograms::Route),
            node_connect: Arc::new(Histogram::new(CONNECT_BUCKETS)),
            node_session: Arc::new(Histogram::new(SESSION_BUCKETS)),
        };
        // Startup loaded a config successfully, or we would not be here.
        m.last_reload_success.set(1);
        m
    }

    /// The shared histograms for `mode`; `None` means each route's own.
    fn histograms_for(&self, mode: Histograms) -> (Option<Arc<Histogram>>, Option<Arc<Histogram>>) {
        match mode {
            Histograms::Route => (None, None),
            Histograms::Node => (Some(Arc::clone(&self.node_connect)), Some(Arc::clone(&self.node_session))),
        }
    }

    /// Every series of one route, at 0, rendered from now on while the
    /// returned value lives.
    pub fn route(&self, route: &str, tenant: &str) -> Arc<RouteMetrics> {
        let mode = *self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        let (connect, session) = self.histograms_for(mode);
        let name: Shared<str> = route.into();
        let m = Arc::new(RouteMetrics {
            tenant: Mutex::new(label(&name, tenant)),
            name,
            accepted: Counter::default(),
            active: Gauge::default(),
            bytes_to_target: Counter::default(),
            bytes_to_client: Counter::default(),
            connect_duration: HistogramSlot::new(connect),
            session_duration: HistogramSlot::new(session),
            counts: OnceLock::new(),
        });
        self.route_list.lock().unwrap_or_else(|e| e.into_inner()).push(&m);
        m
    }

    /// `[metrics] histograms`: per route, or one series for the node. Routes
    /// record into the new place from now on.
    pub(crate) fn set_histograms(&self, mode: Histograms) {
        let mut current = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        if *current == mode {
            return;
        }
        *current = mode;
        drop(current);
        for r in self.live_routes() {
            let (connect, session) = self.histograms_for(mode);
            r.connect_duration.set(connect);
            r.session_duration.set(session);
        }
    }

    fn live_routes(&self) -> Vec<Arc<RouteMetrics>> {
        let mut routes = self.route_list.lock().unwrap_or_else(|e| e.into_inner());
        routes.list.retain(|w| w.strong_count() > 0);
        routes.prune_at = routes.list.len() * 2;
        routes.list.iter().filter_map(Weak::upgrade).collect()
    }

    /// Count a rejection that has no route (`proxy_header`, `no_route`).
    pub(crate) fn rejected_unrouted(&self, reason: Reject) {
        match reason {
            Reject::ProxyHeader => self.rejected_proxy_header.increment(1),
            _ => self.rejected_no_route.increment(1),
        }
    }

    pub fn set_config_hash(&self, hash: &str) {
        let mut h = self.config_hash.lock().unwrap_or_else(|e| e.into_inner());
        *h = hash.to_owned();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        render::render(self)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// How many series a node with `routes` routes exports, for `check`.
pub fn series_count(routes: usize, mode: Histograms) -> usize {
    // Per route: accepted, active, 2 bytes, 9 closed, 5 rejected, 4 errors.
    let per_route = 4 + CloseReason::ALL.len() + ROUTE_REJECTS.len() + CONNECT_ERROR_KINDS.len();
    // A histogram is its buckets, +Inf, _sum and _count.
    let histograms = CONNECT_BUCKETS.len() + 3 + SESSION_BUCKETS.len() + 3;
    // Node: health, 2 reloads, 2 upgrades, last reload, routes, build, config,
    // 2 unrouted rejections, log lines dropped, 2 descriptor gauges.
    let node = 14;
    match mode {
        Histograms::Route => node + routes * (per_route + histograms),
        Histograms::Node => node + histograms + routes * per_route,
    }
}

/// (open descriptors, soft limit) of this process, on Linux.
fn fd_usage() -> Option<(usize, u64)> {
    let open = std::fs::read_dir("/proc/self/fd").ok()?.count();
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    Some((open, limit.current.unwrap_or(u64::MAX)))
}
