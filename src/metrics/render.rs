//! The Prometheus text exposition (format 0.0.4), written by hand: family
//! by family (every sample of a family together, after its `HELP` and
//! `TYPE`), each route's labels escaped once per scrape (a name never needs
//! it: validation keeps names plain, so it is borrowed as is). At 50,000
//! routes that is about a million lines, so nothing here allocates per
//! line.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;

use super::{
    fd_usage, Counter, Counts, Histogram, Metrics, RouteMetrics, BUILD_INFO, BYTES, CONFIG_INFO,
    CONFIG_LAST_RELOAD_SUCCESS, CONFIG_RELOADS, CONNECTIONS_ACCEPTED, CONNECTIONS_ACTIVE,
    CONNECTIONS_REJECTED, CONNECT_BUCKETS, CONNECT_ERROR_KINDS, HEALTH_CHECKS, LOG_LINES_DROPPED, MAX_FDS,
    OPEN_FDS, ROUTES, ROUTE_REJECTS, SESSIONS_CLOSED, SESSION_BUCKETS, SESSION_DURATION, UPGRADES,
    UPSTREAM_CONNECT_DURATION, UPSTREAM_CONNECT_ERRORS,
};
use crate::config::Histograms;
use crate::reason::{CloseReason, Reject};

/// A label value as the format wants it: `\`, `"` and newlines escaped.
pub(super) fn escape(s: &str) -> Cow<'_, str> {
    if !s.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 2);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
}

/// `name{route="R",key="value"} n`
fn sample(out: &mut String, name: &str, route: &str, key: &str, value: &str, n: impl std::fmt::Display) {
    let _ = writeln!(out, "{name}{{route=\"{route}\",{key}=\"{value}\"}} {n}");
}

/// A histogram's series; `None` is one not used yet (every bucket at 0).
fn histogram(out: &mut String, name: &str, route: &str, bounds: &[f64], h: Option<&Histogram>) {
    let (cumulative, sum, count) = match h {
        Some(h) => h.read(),
        None => (vec![0; bounds.len()], 0.0, 0),
    };
    for (bound, n) in bounds.iter().zip(&cumulative) {
        let _ = writeln!(out, "{name}_bucket{{route=\"{route}\",le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{route=\"{route}\",le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum{{route=\"{route}\"}} {sum}");
    let _ = writeln!(out, "{name}_count{{route=\"{route}\"}} {count}");
}

pub(super) fn render(m: &Metrics) -> String {
    let routes = m.live_routes();
    let mut out = String::with_capacity(4096 + routes.len() * 2048);
    node_families(m, &mut out);
    route_families(m, &routes, &mut out);
    out
}

fn node_families(m: &Metrics, out: &mut String) {
    head(out, BUILD_INFO, "gauge", "Always 1; the version label says which build runs.");
    let _ = writeln!(out, "{BUILD_INFO}{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    let hash = m.config_hash.lock().unwrap_or_else(|e| e.into_inner()).clone();
    head(out, CONFIG_INFO, "gauge", "The effective config's sha256; differs between nodes that drifted.");
    let _ = writeln!(out, "{CONFIG_INFO}{{hash=\"{hash}\"}} 1");
    head(out, CONFIG_RELOADS, "counter", "Config reloads by result.");
    let _ = writeln!(out, "{CONFIG_RELOADS}{{result=\"success\"}} {}", m.reloads_success.get());
    let _ = writeln!(out, "{CONFIG_RELOADS}{{result=\"failure\"}} {}", m.reloads_failure.get());
    head(out, CONFIG_LAST_RELOAD_SUCCESS, "gauge", "1 if the last config load or reload succeeded, else 0.");
    let _ = writeln!(out, "{CONFIG_LAST_RELOAD_SUCCESS} {}", m.last_reload_success.get());
    head(out, ROUTES, "gauge", "Routes in the effective config.");
    let _ = writeln!(out, "{ROUTES} {}", m.routes.get());
    head(
        out,
        HEALTH_CHECKS,
        "counter",
        "Load-balancer health checks: PROXY LOCAL headers and connections closed without a byte.",
    );
    let _ = writeln!(out, "{HEALTH_CHECKS} {}", m.health_checks.get());
    head(out, UPGRADES, "counter", "Upgrades in place by result (success counted by the new process).");
    let _ = writeln!(out, "{UPGRADES}{{result=\"success\"}} {}", m.upgrades_success.get());
    let _ = writeln!(out, "{UPGRADES}{{result=\"failure\"}} {}", m.upgrades_failure.get());
    // Kept by the log writer, which starts before any Metrics exists.
    head(out, LOG_LINES_DROPPED, "counter", "Log lines dropped because the log sink could not keep up.");
    let _ = writeln!(out, "{LOG_LINES_DROPPED} {}", crate::logging::lines_dropped());
    if let Some((open, max)) = fd_usage() {
        head(out, OPEN_FDS, "gauge", "Open file descriptors of the portgate process.");
        let _ = writeln!(out, "{OPEN_FDS} {open}");
        head(out, MAX_FDS, "gauge", "The process's descriptor limit (RLIMIT_NOFILE soft).");
        let _ = writeln!(out, "{MAX_FDS} {max}");
    }
}

fn route_families(m: &Metrics, routes: &[Arc<RouteMetrics>], out: &mut String) {
    // Route names are plain by validation; escaped all the same.
    let names: Vec<Cow<'_, str>> = routes.iter().map(|r| escape(&r.name)).collect();
    let tenants: Vec<String> = routes.iter().map(|r| escape(&r.tenant()).into_owned()).collect();
    head(
        out,
        CONNECTIONS_ACCEPTED,
        "counter",
        "Connections that passed admission (PROXY header, route, source, endpoint, window, limits).",
    );
    for ((r, name), t) in routes.iter().zip(&names).zip(&tenants) {
        sample(out, CONNECTIONS_ACCEPTED, name, "tenant", t, r.accepted.get());
    }
    head(out, CONNECTIONS_ACTIVE, "gauge", "Sessions currently admitted on a route.");
    for ((r, name), t) in routes.iter().zip(&names).zip(&tenants) {
        sample(out, CONNECTIONS_ACTIVE, name, "tenant", t, r.active.get());
    }
    head(
        out,
        CONNECTIONS_REJECTED,
        "counter",
        "Connections refused before dialing, by reason; route is empty when unknown.",
    );
    sample(
        out,
        CONNECTIONS_REJECTED,
        "",
        "reason",
        Reject::ProxyHeader.as_str(),
        m.rejected_proxy_header.get(),
    );
    sample(out, CONNECTIONS_REJECTED, "", "reason", Reject::NoRoute.as_str(), m.rejected_no_route.get());
    let counts: Vec<Option<&Counts>> = routes.iter().map(|r| r.counts.get().map(|c| &**c)).collect();
    let get = |c: Option<&Counts>, f: fn(&Counts) -> &[Counter], i: usize| c.map_or(0, |c| f(c)[i].get());
    for (name, c) in names.iter().zip(&counts) {
        for (i, reason) in ROUTE_REJECTS.iter().enumerate() {
            sample(out, CONNECTIONS_REJECTED, name, "reason", reason.as_str(), get(*c, |c| &c.rejected, i));
        }
    }
    head(out, UPSTREAM_CONNECT_ERRORS, "counter", "Failed dials to a route's target, by kind.");
    for (name, c) in names.iter().zip(&counts) {
        for (i, kind) in CONNECT_ERROR_KINDS.iter().enumerate() {
            sample(
                out,
                UPSTREAM_CONNECT_ERRORS,
                name,
                "kind",
                kind.as_str(),
                get(*c, |c| &c.connect_errors, i),
            );
        }
    }
    head(out, BYTES, "counter", "Payload bytes forwarded, by direction (PROXY headers excluded).");
    for (r, name) in routes.iter().zip(&names) {
        sample(out, BYTES, name, "direction", "to_target", r.bytes_to_target.get());
        sample(out, BYTES, name, "direction", "to_client", r.bytes_to_client.get());
    }
    head(out, SESSIONS_CLOSED, "counter", "Sessions ended (failed dials included), by close reason.");
    for (name, c) in names.iter().zip(&counts) {
        for (i, close) in CloseReason::ALL.iter().enumerate() {
            sample(out, SESSIONS_CLOSED, name, "close", close.as_str(), get(*c, |c| &c.closed, i));
        }
    }
    let per_node = *m.histograms.lock().unwrap_or_else(|e| e.into_inner()) == Histograms::Node;
    head(
        out,
        UPSTREAM_CONNECT_DURATION,
        "histogram",
        "Time to establish the target connection (successful dials).",
    );
    if per_node {
        histogram(out, UPSTREAM_CONNECT_DURATION, "", CONNECT_BUCKETS, Some(&m.node_connect));
    } else {
        for (r, name) in routes.iter().zip(&names) {
            let h = r.connect_duration.get();
            histogram(out, UPSTREAM_CONNECT_DURATION, name, CONNECT_BUCKETS, h.as_deref());
        }
    }
    head(out, SESSION_DURATION, "histogram", "Length of sessions that reached their target.");
    if per_node {
        histogram(out, SESSION_DURATION, "", SESSION_BUCKETS, Some(&m.node_session));
    } else {
        for (r, name) in routes.iter().zip(&names) {
            let h = r.session_duration.get();
            histogram(out, SESSION_DURATION, name, SESSION_BUCKETS, h.as_deref());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_series_is_there_at_zero_and_labels_are_escaped() {
        let m = Metrics::new();
        let r = m.route("a", "ten\"ant");
        r.accepted.increment(3);
        r.connect_duration.record(0.0003);
        let text = m.render();
        assert!(
            text.contains("portgate_connections_accepted_total{route=\"a\",tenant=\"ten\\\"ant\"} 3"),
            "{text}"
        );
        assert!(text.contains("portgate_sessions_closed_total{route=\"a\",close=\"operator\"} 0"));
        assert!(
            text.contains("portgate_upstream_connect_duration_seconds_bucket{route=\"a\",le=\"0.0005\"} 1")
        );
        assert!(text.contains("portgate_upstream_connect_duration_seconds_bucket{route=\"a\",le=\"+Inf\"} 1"));
        assert!(text.contains("portgate_connections_rejected_total{route=\"\",reason=\"no_route\"} 0"));
        // Reason counts exist at 0 before the first one, and count after it.
        assert!(text.contains("portgate_upstream_connect_errors_total{route=\"a\",kind=\"refused\"} 0"));
        r.connect_error(crate::reason::ConnectErrorKind::Refused).increment(2);
        r.rejected(Reject::Limit).unwrap().increment(1);
        let text = m.render();
        assert!(text.contains("portgate_upstream_connect_errors_total{route=\"a\",kind=\"refused\"} 2"));
        assert!(text.contains("portgate_connections_rejected_total{route=\"a\",reason=\"limit\"} 1"));
        assert!(text.contains("portgate_sessions_closed_total{route=\"a\",close=\"operator\"} 0"));
        // Each family once, its samples together.
        for family in ["portgate_bytes_total", "portgate_sessions_closed_total"] {
            assert_eq!(text.matches(&format!("# TYPE {family} ")).count(), 1);
        }
        drop(r);
        assert!(!m.render().contains("route=\"a\""), "a route's series outlived it");
    }

    #[test]
    fn node_histograms_are_one_series_and_the_count_matches() {
        let m = Metrics::new();
        let routes: Vec<_> = (0..10).map(|i| m.route(&format!("r{i}"), "t")).collect();
        m.set_histograms(Histograms::Node);
        routes[3].session_duration.record(2.0);
        let text = m.render();
        assert!(text.contains("portgate_session_duration_seconds_count{route=\"\"} 1"), "{text}");
        assert!(!text.contains("portgate_session_duration_seconds_count{route=\"r3\"}"));
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(samples, super::super::series_count(10, Histograms::Node));
        m.set_histograms(Histograms::Route);
        let samples = m.render().lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(samples, super::super::series_count(10, Histograms::Route));
    }
}
