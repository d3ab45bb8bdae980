//! `[[route]]`: each route on its own, then the rules between routes.
//!
//! Owns the route syntax (names, ports, targets, `via`), the inheritance of
//! `[access]`, `[timeouts] max_session` and `[upstream] source` values,
//! fail-closed admission (a route needs an allow rule), the access window,
//! and uniqueness of names and routing keys. It must not build the routing
//! table the listeners use (that is `routes.rs` at the crate root) nor
//! resolve a target name: a `host:port` target is resolved at each connect.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use toml::Spanned;

use super::{is_vpce, Ctx};
use crate::config::raw::{RawRoute, SpannedList};
use crate::config::{Access, PortRange, Problem, ProxyMode, Route, Shared, Target};

/// Route names appear in metric labels and ssh aliases: keep them short.
const MAX_NAME_LEN: usize = 64;

/// What the sections before `[[route]]` decided that a route inherits or is
/// checked against.
pub(super) struct Inherited<'a> {
    /// `listen.ports`: when set, every route port must lie inside it.
    pub(super) ports: Option<PortRange>,
    /// `proxy_protocol.mode`: `via` and `endpoints` need `required`, since the
    /// endpoint id comes from the PROXY v2 header.
    pub(super) mode: ProxyMode,
    /// `[access]`: the `allow`, `endpoints` and `max_connections` of a route
    /// that does not set its own.
    pub(super) access: &'a Access,
    /// `[timeouts] max_session`, for a route without its own.
    pub(super) max_session: Option<Duration>,
    /// `[upstream] source`, for a route without its own.
    pub(super) source: &'a [IpAddr],
}

/// Every route of the main file and the includes (`(file index, table)`),
/// validated, sorted by `(port, via)`. A route with a problem is left out.
pub(super) fn check(
    cx: &mut Ctx,
    raw: &[(usize, Spanned<RawRoute>)],
    inherited: &Inherited,
) -> Vec<Arc<Route>> {
    let mut accepted = Accepted::default();
    for (file, table) in raw {
        if let Some(route) = route(cx, *file, table, inherited) {
            accepted.add(cx, route);
        }
    }
    let mut routes = accepted.routes;
    routes.sort_by(|a, b| (a.port, &a.via).cmp(&(b.port, &b.via)));
    routes
}

/// Where one route's problems are reported and how messages name it.
struct At {
    /// Index of the file the route is in (0 = the main file).
    file: usize,
    /// The whole `[[route]]` table: the location of a missing key.
    table: Range<usize>,
    /// `route "name"`, or just `route` when it has no name.
    who: String,
}

/// One route on its own, every problem reported in key order; `None` when
/// it has any problem, so the checks between routes see only good routes.
fn route(cx: &mut Ctx, file: usize, table: &Spanned<RawRoute>, inherited: &Inherited) -> Option<Route> {
    let r = table.get_ref();
    let before = cx.problems.len();

    let name = check_name(cx, file, table.span(), &r.name);
    let who = if name.is_empty() { "route".to_owned() } else { format!("route {name:?}") };
    let at = At { file, table: table.span(), who };
    let port = check_port(cx, &at, &r.port, inherited.ports);
    let target = check_target(cx, &at, &r.target);
    let via = check_via(cx, &at, &r.via, inherited.mode);
    let allow = check_allow(cx, &at, &r.allow, port, inherited.access);
    let endpoints = check_endpoints(cx, &at, &r.endpoints, inherited);
    let max_connections = match &r.max_connections {
        Some(_) => cx.count(file, "max_connections", &r.max_connections, u32::MAX as i64).unwrap_or(0),
        None => inherited.access.max_connections,
    };
    let tenant = check_tenant(cx, &at, &r.tenant, &name);
    let ssh_user = check_ssh_user(cx, &at, &r.ssh_user);
    let (not_before, not_after) = check_window(cx, &at, r);
    let max_session = match &r.max_session {
        None => inherited.max_session,
        Some(v) => cx.off_or_positive(file, "max_session", v).unwrap_or(None),
    };
    let source = check_source(cx, &at, r, target.as_ref(), inherited.source);

    if cx.problems.len() != before || name.is_empty() || port == 0 {
        return None;
    }
    let (Some(target), Some(allow)) = (target, allow) else { return None };
    Some(Route {
        name: name.into(),
        port,
        via,
        target,
        tenant: tenant.into(),
        allow: allow.into(),
        endpoints,
        max_connections,
        ssh_user,
        not_before,
        not_after,
        max_session,
        source,
    })
}

/// `not_before` and `not_after`: RFC 3339 with offset, and a window that
/// is not empty. One that has already ended is valid (`check` warns).
fn check_window(cx: &mut Ctx, at: &At, r: &RawRoute) -> (Option<SystemTime>, Option<SystemTime>) {
    let who = &at.who;
    let time = |cx: &mut Ctx, key: &str, v: &Option<Spanned<String>>| {
        v.as_ref().and_then(|v| cx.instant(at.file, &format!("{who}: {key}"), v))
    };
    let not_before = time(cx, "not_before", &r.not_before);
    let not_after = time(cx, "not_after", &r.not_after);
    if let (Some(nb), Some(na), Some(raw)) = (not_before, not_after, &r.not_after) {
        if na <= nb {
            cx.err(
                at.file,
                raw.span(),
                format!(
                    "{who}: not_after ({}) must be later than not_before ({}): the window [not_before, not_after) would admit no one",
                    crate::config::units::fmt_rfc3339(na),
                    crate::config::units::fmt_rfc3339(nb)
                ),
            );
        }
    }
    (not_before, not_after)
}

/// `source`, else `[upstream] source`; an IP-literal target needs an
/// address of its own family in the list (a name is resolved at each
/// connect, so its family is checked then).
fn check_source(
    cx: &mut Ctx,
    at: &At,
    r: &RawRoute,
    target: Option<&Target>,
    inherited: &[IpAddr],
) -> Vec<IpAddr> {
    let source = match &r.source {
        Some(l) => cx.sources(at.file, &format!("{}: source", at.who), l).unwrap_or_default(),
        None => inherited.to_vec(),
    };
    if let (Some(v4), false) = (target.and_then(Target::is_ipv4), source.is_empty()) {
        if !source.iter().any(|a| a.is_ipv4() == v4) {
            let family = if v4 { "IPv4" } else { "IPv6" };
            let (span, whose) = match (&r.source, &r.target) {
                (Some(l), _) => (l.span(), "its source"),
                (None, Some(t)) => (t.span(), "upstream.source"),
                (None, None) => (at.table.clone(), "upstream.source"),
            };
            let target = target.map(ToString::to_string).unwrap_or_default();
            cx.err(
                at.file,
                span,
                format!("{}: target {target} is {family}, but {whose} lists no {family} address to dial it from; add one", at.who),
            );
        }
    }
    source
}

/// `name`: required, `[A-Za-z0-9_.-]`, at most [`MAX_NAME_LEN`]; empty when missing.
fn check_name(cx: &mut Ctx, file: usize, table: Range<usize>, raw: &Option<Spanned<String>>) -> String {
    match raw {
        None => {
            cx.err(file, table, "route has no name; add name = \"...\" ([A-Za-z0-9_.-], unique)");
            String::new()
        }
        Some(n) if !valid_name(n.get_ref()) => {
            cx.err(
                file,
                n.span(),
                format!("route name {:?}: use 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 _ . -", n.get_ref()),
            );
            n.get_ref().clone()
        }
        Some(n) => n.get_ref().clone(),
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// `port`: required, 1 to 65535, inside `listen.ports` when that is set; 0
/// when missing or out of range.
fn check_port(cx: &mut Ctx, at: &At, raw: &Option<Spanned<i64>>, ports: Option<PortRange>) -> u16 {
    let who = &at.who;
    let Some(p) = raw else {
        cx.err(at.file, at.table.clone(), format!("{who} has no port; add port = 8022 (the listener port)"));
        return 0;
    };
    let n = *p.get_ref();
    if !(1..=65535).contains(&n) {
        cx.err(at.file, p.span(), format!("{who}: port {n} is not from 1 to 65535"));
        return 0;
    }
    let n = n as u16;
    if let Some(range) = ports {
        if !range.contains(n) {
            cx.err(at.file, p.span(), format!("{who}: port {n} is outside listen.ports {range}; routes must lie inside the NLB listener range"));
        }
    }
    n
}

/// `target`: required; see [`parse_target`].
fn check_target(cx: &mut Ctx, at: &At, raw: &Option<Spanned<String>>) -> Option<Target> {
    match raw {
        None => {
            cx.err(at.file, at.table.clone(), format!("{} has no target; add target = \"IP:port\"", at.who));
            None
        }
        Some(t) => match parse_target(t.get_ref().trim()) {
            Ok(t) => Some(t),
            Err(e) => {
                cx.err(at.file, t.span(), e);
                None
            }
        },
    }
}

/// A target as written: `IPv4:port`, `[IPv6]:port` or `host:port`; `Err`
/// is the whole message.
fn parse_target(s: &str) -> Result<Target, String> {
    let hint = "expected IPv4:port, [IPv6]:port or host:port, like \"172.31.31.84:22\"";
    if let Ok(a) = s.parse::<SocketAddr>() {
        if a.port() == 0 {
            return Err(format!("target {s:?} has port 0; {hint}"));
        }
        return Ok(Target::Addr(a));
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("target {s:?} has no port; {hint}"));
    };
    if host.contains(':') {
        return Err(format!("target {s:?}: an IPv6 target needs brackets, like \"[2001:db8::1]:22\""));
    }
    let port = match port.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => p as u16,
        _ => return Err(format!("target {s:?}: port {port:?} is not from 1 to 65535")),
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && !host.starts_with(['-', '.']);
    if !host_ok || host.parse::<IpAddr>().is_ok() {
        return Err(format!("target {s:?}: invalid host; {hint}"));
    }
    Ok(Target::Name { host: host.to_owned(), port })
}

/// `via`: a VPC endpoint id, only in PROXY mode.
fn check_via(cx: &mut Ctx, at: &At, raw: &Option<Spanned<String>>, mode: ProxyMode) -> Option<String> {
    let who = &at.who;
    let v = raw.as_ref()?;
    if mode != ProxyMode::Required {
        cx.err(at.file, v.span(), format!("{who}: via needs proxy_protocol.mode = \"required\": the endpoint id comes from the PROXY v2 header"));
    }
    if is_vpce(v.get_ref()) {
        Some(v.get_ref().clone())
    } else {
        cx.err(
            at.file,
            v.span(),
            format!("{who}: via {:?} is not a VPC endpoint id like \"vpce-0a1b2c3d4e5f67890\"", v.get_ref()),
        );
        None
    }
}

/// `allow`, else `[access].allow`; fail closed: `None` (reported) when
/// neither is set.
fn check_allow(
    cx: &mut Ctx,
    at: &At,
    raw: &Option<SpannedList>,
    port: u16,
    access: &Access,
) -> Option<Vec<IpNet>> {
    let who = &at.who;
    let allow = match raw {
        Some(l) => {
            if l.get_ref().is_empty() {
                cx.err(
                    at.file,
                    l.span(),
                    format!("{who}: allow = [] would admit no one; remove the route instead"),
                );
            }
            Some(cx.cidrs(at.file, "allow", l))
        }
        None => access.allow.clone(),
    };
    if allow.is_none() {
        cx.err(
            at.file,
            at.table.clone(),
            format!(
                "{who} (port {port}) has no allow rule; fail closed: set allow = [...] on the route or in [access]; to open it to everyone write allow = [\"0.0.0.0/0\", \"::/0\"]"
            ),
        );
    }
    allow
}

/// `endpoints`, else `[access].endpoints`; a non-empty list needs PROXY mode.
fn check_endpoints(cx: &mut Ctx, at: &At, raw: &Option<SpannedList>, inherited: &Inherited) -> Vec<String> {
    let Some(l) = raw else { return inherited.access.endpoints.clone() };
    let e = cx.endpoint_ids(at.file, "endpoints", l);
    if !e.is_empty() && inherited.mode != ProxyMode::Required {
        cx.err(at.file, l.span(), format!("{}: endpoints needs proxy_protocol.mode = \"required\": the endpoint id comes from the PROXY v2 header", at.who));
    }
    e
}

/// `tenant`: not empty; the route name when missing.
fn check_tenant(cx: &mut Ctx, at: &At, raw: &Option<Spanned<String>>, name: &str) -> String {
    match raw {
        Some(t) if t.get_ref().trim().is_empty() => {
            cx.err(
                at.file,
                t.span(),
                format!("{}: tenant is empty; remove it to default to the route name", at.who),
            );
            name.to_owned()
        }
        Some(t) => t.get_ref().clone(),
        None => name.to_owned(),
    }
}

/// `ssh_user`: a name `ssh-config` can write unquoted.
fn check_ssh_user(cx: &mut Ctx, at: &At, raw: &Option<Spanned<String>>) -> Option<String> {
    let u = raw.as_ref()?;
    let user = u.get_ref();
    if user.is_empty() || user.contains(char::is_whitespace) || user.contains('"') {
        cx.err(
            at.file,
            u.span(),
            format!("{}: ssh_user {user:?} must be a non-empty user name without spaces or quotes", at.who),
        );
        return None;
    }
    Some(user.clone())
}

/// The routes accepted so far, indexed for the checks between routes.
#[derive(Default)]
struct Accepted {
    /// In the order found: main file first, then each include.
    routes: Vec<Arc<Route>>,
    /// Names are unique: a name is a route's identity across reloads, its
    /// metric label and its ssh alias.
    by_name: HashMap<Shared<str>, Arc<Route>>,
    /// The routing key `(port, via)` is unique, or a connection would have
    /// two routes.
    by_key: HashMap<(u16, Option<String>), Arc<Route>>,
}

impl Accepted {
    /// Accept `route` unless its name or its routing key is taken; the
    /// problem names both routes.
    fn add(&mut self, cx: &mut Ctx, route: Route) {
        let route = Arc::new(route);
        if let Some(first) = self.by_name.get(&route.name) {
            cx.problems.push(Problem {
                location: String::new(),
                message: format!(
                    "route {:?} (port {}) and route {:?} (port {}): duplicate name {:?}; route names must be unique",
                    first.name, first.port, route.name, route.port, route.name
                ),
            });
            return;
        }
        let key = (route.port, route.via.clone());
        if let Some(first) = self.by_key.get(&key) {
            let via = match &route.via {
                Some(v) => format!("via {v}"),
                None => "no via".to_owned(),
            };
            cx.problems.push(Problem {
                location: String::new(),
                message: format!(
                    "route {:?} (port {}) and route {:?} (port {}): both route port {} ({via}); at most one route per (port, via)",
                    first.name, first.port, route.name, route.port, route.port
                ),
            });
            return;
        }
        self.by_name.insert(route.name.clone(), Arc::clone(&route));
        self.by_key.insert(key, Arc::clone(&route));
        self.routes.push(route);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_forms() {
        assert!(matches!(parse_target("10.0.0.1:22"), Ok(Target::Addr(_))));
        assert!(matches!(parse_target("[2001:db8::1]:22"), Ok(Target::Addr(_))));
        assert!(matches!(parse_target("host-1.internal:22"), Ok(Target::Name { .. })));
        assert!(parse_target("2001:db8::1:22").unwrap_err().contains("brackets"));
        assert!(parse_target("10.0.0.1:0").is_err());
        assert!(parse_target("10.0.0.1:70000").is_err());
        assert!(parse_target("bad host:22").is_err());
        assert!(parse_target(":22").is_err());
    }
}
