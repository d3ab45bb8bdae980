//! Prometheus metrics: every name and label set portgate exports.
//!
//! Handles are resolved once (per route, at startup or reload) and then
//! updated with plain atomic operations, so the per-connection and per-read
//! paths never format a label or take a lock. Every series that can be known
//! in advance is registered up front, so alerts and `rate()` never meet a
//! missing series.
//!
//! The recorder is owned by [`Metrics`], not installed globally: several
//! servers can live in one process (tests) without sharing counters.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::reason::{CloseReason, ConnectErrorKind, Reject};

/// How often queued histogram samples are folded into their buckets, scraped
/// or not (the exporter's own HTTP server uses the same period).
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Run [`Metrics::upkeep`] every [`UPKEEP_INTERVAL`] until `stop`.
pub fn spawn_upkeep(metrics: Arc<Metrics>, stop: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => metrics.upkeep(),
            }
        }
    })
}

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
const CONNECT_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Maintenance sessions: a probe-like second up to a working day.
const SESSION_BUCKETS: &[f64] =
    &[0.1, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0];

/// The process-wide metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    pub health_checks: Counter,
    pub reloads_success: Counter,
    pub reloads_failure: Counter,
    /// `portgate_upgrades_total`: successes are counted by the new process,
    /// failures by the old one.
    pub upgrades_success: Counter,
    pub upgrades_failure: Counter,
    pub last_reload_success: Gauge,
    pub routes: Gauge,
    build_info: Gauge,
    rejected_proxy_header: Counter,
    rejected_no_route: Counter,
    /// The current config hash; rendered by hand so that the old hash's
    /// series disappears when the config changes (fleet drift queries
    /// would otherwise count stale hashes).
    config_hash: Mutex<String>,
}

/// The series of one route, resolved once.
pub struct RouteMetrics {
    /// The tenant label these series were registered with.
    pub tenant: String,
    pub accepted: Counter,
    pub active: Gauge,
    pub bytes_to_target: Counter,
    pub bytes_to_client: Counter,
    pub connect_duration: Histogram,
    pub session_duration: Histogram,
    /// `portgate_sessions_closed_total`, by `CloseReason as usize`.
    closed: [Counter; CloseReason::ALL.len()],
    rejected_source: Counter,
    rejected_endpoint: Counter,
    rejected_window: Counter,
    rejected_limit: Counter,
    rejected_audit: Counter,
    connect_refused: Counter,
    connect_timeout: Counter,
    connect_unreachable: Counter,
    connect_other: Counter,
}

impl RouteMetrics {
    pub(crate) fn rejected(&self, reason: Reject) -> Option<&Counter> {
        match reason {
            Reject::SourceNotAllowed => Some(&self.rejected_source),
            Reject::EndpointNotAllowed => Some(&self.rejected_endpoint),
            Reject::OutsideWindow => Some(&self.rejected_window),
            Reject::Limit => Some(&self.rejected_limit),
            Reject::AuditUnavailable => Some(&self.rejected_audit),
            Reject::ProxyHeader | Reject::NoRoute => None,
        }
    }

    /// The `portgate_sessions_closed_total` series for `close`.
    pub(crate) fn closed(&self, close: CloseReason) -> &Counter {
        &self.closed[close as usize]
    }

    pub(crate) fn connect_error(&self, kind: ConnectErrorKind) -> &Counter {
        match kind {
            ConnectErrorKind::Refused => &self.connect_refused,
            ConnectErrorKind::Timeout => &self.connect_timeout,
            ConnectErrorKind::Unreachable => &self.connect_unreachable,
            ConnectErrorKind::Other => &self.connect_other,
        }
    }
}

static METADATA: Metadata<'static> = Metadata::new("portgate", metrics::Level::INFO, Some("portgate"));

impl Metrics {
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new();
        // Matcher::Full never fails on a non-empty bucket list.
        let builder = builder
            .set_buckets_for_metric(Matcher::Full(UPSTREAM_CONNECT_DURATION.into()), CONNECT_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(SESSION_DURATION.into()), SESSION_BUCKETS))
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        describe(&recorder);

        let counter = |name: &'static str, labels: Vec<Label>| {
            recorder.register_counter(&Key::from_parts(name, labels), &METADATA)
        };
        let gauge = |name: &'static str, labels: Vec<Label>| {
            recorder.register_gauge(&Key::from_parts(name, labels), &METADATA)
        };
        let reject = |reason: &'static str| {
            counter(CONNECTIONS_REJECTED, vec![Label::new("route", ""), Label::new("reason", reason)])
        };
        let m = Metrics {
            health_checks: counter(HEALTH_CHECKS, vec![]),
            reloads_success: counter(CONFIG_RELOADS, vec![Label::new("result", "success")]),
            reloads_failure: counter(CONFIG_RELOADS, vec![Label::new("result", "failure")]),
            upgrades_success: counter(UPGRADES, vec![Label::new("result", "success")]),
            upgrades_failure: counter(UPGRADES, vec![Label::new("result", "failure")]),
            last_reload_success: gauge(CONFIG_LAST_RELOAD_SUCCESS, vec![]),
            routes: gauge(ROUTES, vec![]),
            rejected_proxy_header: reject(Reject::ProxyHeader.as_str()),
            rejected_no_route: reject(Reject::NoRoute.as_str()),
            config_hash: Mutex::new(String::new()),
            build_info: gauge(BUILD_INFO, vec![Label::new("version", env!("CARGO_PKG_VERSION"))]),
            recorder,
            handle,
        };
        m.build_info.set(1.0);
        // Startup loaded a config successfully, or we would not be here.
        m.last_reload_success.set(1.0);
        m
    }

    /// Register every series of one route (at 0).
    pub fn route(&self, route: &str, tenant: &str) -> RouteMetrics {
        let r = || Label::new("route", route.to_owned());
        let rt = || vec![r(), Label::new("tenant", tenant.to_owned())];
        let c = |name: &'static str, labels: Vec<Label>| {
            self.recorder.register_counter(&Key::from_parts(name, labels), &METADATA)
        };
        let reason =
            |reason: Reject| c(CONNECTIONS_REJECTED, vec![r(), Label::new("reason", reason.as_str())]);
        let kind =
            |kind: ConnectErrorKind| c(UPSTREAM_CONNECT_ERRORS, vec![r(), Label::new("kind", kind.as_str())]);
        let h = |name: &'static str| {
            self.recorder.register_histogram(&Key::from_parts(name, vec![r()]), &METADATA)
        };
        RouteMetrics {
            tenant: tenant.to_owned(),
            accepted: c(CONNECTIONS_ACCEPTED, rt()),
            active: self.recorder.register_gauge(&Key::from_parts(CONNECTIONS_ACTIVE, rt()), &METADATA),
            bytes_to_target: c(BYTES, vec![r(), Label::new("direction", "to_target")]),
            bytes_to_client: c(BYTES, vec![r(), Label::new("direction", "to_client")]),
            connect_duration: h(UPSTREAM_CONNECT_DURATION),
            session_duration: h(SESSION_DURATION),
            closed: CloseReason::ALL
                .map(|close| c(SESSIONS_CLOSED, vec![r(), Label::new("close", close.as_str())])),
            rejected_source: reason(Reject::SourceNotAllowed),
            rejected_endpoint: reason(Reject::EndpointNotAllowed),
            rejected_window: reason(Reject::OutsideWindow),
            rejected_limit: reason(Reject::Limit),
            rejected_audit: reason(Reject::AuditUnavailable),
            connect_refused: kind(ConnectErrorKind::Refused),
            connect_timeout: kind(ConnectErrorKind::Timeout),
            connect_unreachable: kind(ConnectErrorKind::Unreachable),
            connect_other: kind(ConnectErrorKind::Other),
        }
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

    /// Fold the histogram samples recorded since the last call into their
    /// buckets. The exporter queues every `record` until this runs (or a
    /// scrape renders), so a node nobody scrapes would otherwise keep every
    /// session's samples forever; [`spawn_upkeep`] calls it periodically.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = self.handle.render();
        let hash = self.config_hash.lock().unwrap_or_else(|e| e.into_inner()).clone();
        out.push_str(&format!(
            "# HELP {CONFIG_INFO} The effective config's sha256; differs between nodes that drifted.\n\
             # TYPE {CONFIG_INFO} gauge\n{CONFIG_INFO}{{hash=\"{hash}\"}} 1\n\n"
        ));
        // Kept by the log writer, which starts before any Metrics exists.
        let dropped = crate::logging::lines_dropped();
        out.push_str(&format!(
            "# HELP {LOG_LINES_DROPPED} Log lines dropped because the log sink could not keep up.\n\
             # TYPE {LOG_LINES_DROPPED} counter\n{LOG_LINES_DROPPED} {dropped}\n\n"
        ));
        if let Some((open, max)) = fd_usage() {
            out.push_str(&format!(
                "# HELP {OPEN_FDS} Open file descriptors of the portgate process.\n\
                 # TYPE {OPEN_FDS} gauge\n{OPEN_FDS} {open}\n\n\
                 # HELP {MAX_FDS} The process's descriptor limit (RLIMIT_NOFILE soft).\n\
                 # TYPE {MAX_FDS} gauge\n{MAX_FDS} {max}\n\n"
            ));
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn describe(rec: &PrometheusRecorder) {
    let d = |name: &'static str, unit: Option<Unit>, text: &'static str| {
        rec.describe_counter(name.into(), unit, SharedString::const_str(text));
    };
    // describe_* only stores the HELP text; the kind comes from registration.
    d(
        CONNECTIONS_ACCEPTED,
        None,
        "Connections that passed admission (PROXY header, route, source, endpoint, limits).",
    );
    d(
        CONNECTIONS_REJECTED,
        None,
        "Connections refused before dialing, by reason; route is empty when unknown.",
    );
    d(CONNECTIONS_ACTIVE, None, "Sessions currently admitted on a route.");
    d(UPSTREAM_CONNECT_ERRORS, None, "Failed dials to a route's target, by kind.");
    d(
        UPSTREAM_CONNECT_DURATION,
        Some(Unit::Seconds),
        "Time to establish the target connection (successful dials).",
    );
    d(SESSION_DURATION, Some(Unit::Seconds), "Length of sessions that reached their target.");
    d(BYTES, Some(Unit::Bytes), "Payload bytes forwarded, by direction (PROXY headers excluded).");
    d(SESSIONS_CLOSED, None, "Sessions ended (failed dials included), by close reason.");
    d(
        HEALTH_CHECKS,
        None,
        "Load-balancer health checks: PROXY LOCAL headers and connections closed without a byte.",
    );
    d(CONFIG_RELOADS, None, "Config reloads by result.");
    d(UPGRADES, None, "Upgrades in place by result (success counted by the new process).");
    d(CONFIG_LAST_RELOAD_SUCCESS, None, "1 if the last config load or reload succeeded, else 0.");
    d(ROUTES, None, "Routes in the effective config.");
    d(BUILD_INFO, None, "Always 1; the version label says which build runs.");
}

/// (open descriptors, soft limit) of this process, on Linux.
fn fd_usage() -> Option<(usize, u64)> {
    let open = std::fs::read_dir("/proc/self/fd").ok()?.count();
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    Some((open, limit.current.unwrap_or(u64::MAX)))
}
