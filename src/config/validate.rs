//! Raw tree -> validated [`Config`]: every rule, every problem located.
//!
//! Validation never stops at the first problem: each bad value is reported
//! with its `FILE:LINE:COL` and what would be valid, and problems between
//! routes name the routes. Only a config with no problem at all is returned.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

use super::defaults::{
    DEFAULT_ADDRESS, DEFAULT_ADMIN_LISTEN, DEFAULT_CONNECT, DEFAULT_DRAIN, DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDLE, DEFAULT_IDLE_TIMEOUT_LIMIT, DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_RETRIES,
    DEFAULT_KEEPALIVE_TIME, DEFAULT_LOG_FORMAT, DEFAULT_LOG_LEVEL, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PER_SOURCE, DEFAULT_PROXY_MODE, DEFAULT_REVOKE_GRACE, DEFAULT_SHUTDOWN_DELAY,
};
use super::raw::{PortsValue, RawRoute, SpannedList, Tree};
use super::{
    Access, Admin, Config, ConfigError, Keepalive, Listen, Log, LogFormat, PortRange, Problem, ProxyMode,
    ProxyProtocol, Route, Target, Timeouts,
};

/// Linux caps TCP_KEEPCNT at 127.
const MAX_KEEPALIVE_RETRIES: i64 = 127;
/// Route names appear in metric labels and ssh aliases: keep them short.
const MAX_NAME_LEN: usize = 64;

/// Longest duration accepted anywhere: far beyond any sensible setting, and
/// small enough that adding it to the current time can never overflow.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Linux caps TCP_KEEPIDLE and TCP_KEEPINTVL at 32767 s.
const MAX_KEEPALIVE_SECS: u64 = 32767;

const DURATION_HINT: &str = "expected a number with a unit, like \"500ms\", \"60s\" or \"5m\"";

struct Ctx<'a> {
    tree: &'a Tree,
    problems: Vec<Problem>,
}

impl Ctx<'_> {
    fn err(&mut self, file: usize, span: Range<usize>, msg: impl Into<String>) {
        let p = self.tree.problem(file, span, msg);
        self.problems.push(p);
    }

    fn duration(
        &mut self,
        file: usize,
        key: &str,
        v: &Option<Spanned<String>>,
        default: Duration,
    ) -> Duration {
        match v {
            None => default,
            Some(s) => match humantime::parse_duration(s.get_ref().trim()) {
                Ok(d) if d > MAX_DURATION => {
                    self.err(
                        file,
                        s.span(),
                        format!("{key} = {:?} is longer than a year; use a shorter duration", s.get_ref()),
                    );
                    default
                }
                Ok(d) => d,
                Err(_) => {
                    self.err(
                        file,
                        s.span(),
                        format!("{key}: invalid duration {:?}: {DURATION_HINT}", s.get_ref()),
                    );
                    default
                }
            },
        }
    }

    /// A duration that must be positive.
    fn positive(&mut self, key: &str, v: &Option<Spanned<String>>, default: Duration) -> Duration {
        let d = self.duration(0, key, v, default);
        if d.is_zero() {
            if let Some(s) = v {
                self.err(0, s.span(), format!("{key} must be greater than 0"));
            }
            return default;
        }
        d
    }

    /// A keepalive duration: whole seconds (the kernel takes seconds), >= 1s.
    fn seconds(&mut self, key: &str, v: &Option<Spanned<String>>, default: Duration) -> Duration {
        let d = self.positive(key, v, default);
        if d.as_secs() > MAX_KEEPALIVE_SECS {
            if let Some(s) = v {
                self.err(
                    0,
                    s.span(),
                    format!("{key} = {:?}: Linux allows at most {MAX_KEEPALIVE_SECS}s", s.get_ref()),
                );
            }
            return default;
        }
        if d.subsec_nanos() != 0 || d < Duration::from_secs(1) {
            if let Some(s) = v {
                self.err(
                    0,
                    s.span(),
                    format!(
                        "{key} = {:?}: TCP keepalive works in whole seconds; use a value like \"15s\"",
                        s.get_ref()
                    ),
                );
            }
            return default;
        }
        d
    }

    fn count(&mut self, file: usize, key: &str, v: &Option<Spanned<i64>>, max: i64) -> Option<u32> {
        let s = v.as_ref()?;
        let n = *s.get_ref();
        if n < 0 || n > max {
            self.err(file, s.span(), format!("{key} = {n}: expected a whole number from 0 to {max}"));
            return None;
        }
        u32::try_from(n).ok()
    }

    fn cidrs(&mut self, file: usize, key: &str, list: &SpannedList) -> Vec<IpNet> {
        let mut out = Vec::new();
        for item in list.get_ref() {
            let s = item.get_ref().trim();
            let parsed = s.parse::<IpNet>().or_else(|_| s.parse::<IpAddr>().map(IpNet::from));
            match parsed {
                Ok(net) if net != net.trunc() => self.err(
                    file,
                    item.span(),
                    format!(
                        "{key}: {s:?} has host bits set; did you mean \"{}\"? (write a single address as {}/{})",
                        net.trunc(),
                        net.addr(),
                        if net.addr().is_ipv4() { 32 } else { 128 }
                    ),
                ),
                Ok(net) => out.push(net),
                Err(_) => self.err(
                    file,
                    item.span(),
                    format!(
                        "{key}: invalid CIDR {s:?}: expected an IPv4 or IPv6 network like \"10.0.0.0/16\" or \"2001:db8::/32\""
                    ),
                ),
            }
        }
        out
    }

    fn endpoint_ids(&mut self, file: usize, key: &str, list: &SpannedList) -> Vec<String> {
        let mut out = Vec::new();
        for item in list.get_ref() {
            if is_vpce(item.get_ref()) {
                out.push(item.get_ref().clone());
            } else {
                self.err(
                    file,
                    item.span(),
                    format!(
                        "{key}: {:?} is not a VPC endpoint id like \"vpce-0a1b2c3d4e5f67890\"",
                        item.get_ref()
                    ),
                );
            }
        }
        out
    }
}

fn is_vpce(s: &str) -> bool {
    s.strip_prefix("vpce-").is_some_and(|rest| {
        !rest.is_empty()
            && rest.len() <= 32
            && rest.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn parse_ports(v: &PortsValue) -> Result<PortRange, String> {
    let port = |s: &str| -> Result<u16, String> {
        match s.trim().parse::<u32>() {
            Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
            _ => Err(format!("{:?} is not a port from 1 to 65535", s.trim())),
        }
    };
    let range = match v {
        PortsValue::Number(n) => {
            let p = port(&n.to_string())?;
            PortRange { first: p, last: p }
        }
        PortsValue::Text(t) => match t.split_once('-') {
            Some((a, b)) => PortRange { first: port(a)?, last: port(b)? },
            None => {
                let p = port(t)?;
                PortRange { first: p, last: p }
            }
        },
    };
    if range.first > range.last {
        return Err(format!("range {}-{} runs backwards; write it low-high", range.first, range.last));
    }
    Ok(range)
}

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

/// Validate the tree, collecting every problem.
pub fn validate(path: &Path, tree: &Tree) -> Result<Config, ConfigError> {
    let mut cx = Ctx { tree, problems: tree.problems.clone() };
    let raw = &tree.main;

    // [listen]
    let address = match &raw.listen.address {
        None => DEFAULT_ADDRESS,
        Some(s) => s.get_ref().trim().parse::<IpAddr>().unwrap_or_else(|_| {
            cx.err(0, s.span(), format!("listen.address {:?} is not an IP address; use \"0.0.0.0\", \"::\" or an address of this host", s.get_ref()));
            DEFAULT_ADDRESS
        }),
    };
    let ports = raw.listen.ports.as_ref().and_then(|p| match parse_ports(p.get_ref()) {
        Ok(r) => Some(r),
        Err(e) => {
            cx.err(0, p.span(), format!("listen.ports: {e}; expected a range like \"8000-8049\""));
            None
        }
    });

    // [proxy_protocol]
    let pp = &raw.proxy_protocol;
    let mode = match &pp.mode {
        None => DEFAULT_PROXY_MODE,
        Some(s) => match s.get_ref().as_str() {
            "off" => ProxyMode::Off,
            "required" => ProxyMode::Required,
            other => {
                cx.err(
                    0,
                    s.span(),
                    format!("proxy_protocol.mode {other:?}: expected \"off\" or \"required\""),
                );
                DEFAULT_PROXY_MODE
            }
        },
    };
    let trusted = pp.trusted.as_ref().map(|l| cx.cidrs(0, "proxy_protocol.trusted", l)).unwrap_or_default();
    let mode_span = pp.mode.as_ref().map(|m| m.span());
    if mode == ProxyMode::Required && pp.trusted.as_ref().is_none_or(|l| l.get_ref().is_empty()) {
        cx.err(
            0,
            mode_span.clone().unwrap_or(0..0),
            "proxy_protocol.mode = \"required\" needs proxy_protocol.trusted: the NLB subnets allowed to send a header, like [\"10.0.0.0/16\"]",
        );
    }
    let header_timeout =
        cx.positive("proxy_protocol.header_timeout", &pp.header_timeout, DEFAULT_HEADER_TIMEOUT);

    // [keepalive]
    let ka = &raw.keepalive;
    let time = cx.seconds("keepalive.time", &ka.time, DEFAULT_KEEPALIVE_TIME);
    let interval = cx.seconds("keepalive.interval", &ka.interval, DEFAULT_KEEPALIVE_INTERVAL);
    let retries = match &ka.retries {
        None => DEFAULT_KEEPALIVE_RETRIES,
        Some(s) if (1..=MAX_KEEPALIVE_RETRIES).contains(s.get_ref()) => *s.get_ref() as u32,
        Some(s) => {
            cx.err(
                0,
                s.span(),
                format!("keepalive.retries = {}: expected 1 to {MAX_KEEPALIVE_RETRIES}", s.get_ref()),
            );
            DEFAULT_KEEPALIVE_RETRIES
        }
    };
    let limit =
        cx.positive("keepalive.idle_timeout_limit", &ka.idle_timeout_limit, DEFAULT_IDLE_TIMEOUT_LIMIT);
    if time >= limit {
        let span = ka.time.as_ref().or(ka.idle_timeout_limit.as_ref()).map(|s| s.span()).unwrap_or(0..0);
        cx.err(
            0,
            span,
            format!(
                "keepalive.time ({}) must be below keepalive.idle_timeout_limit ({}), or the NLB drops idle sessions before the first keepalive probe",
                super::fmt_duration(time),
                super::fmt_duration(limit)
            ),
        );
    }

    // [timeouts]
    let t = &raw.timeouts;
    let connect = cx.positive("timeouts.connect", &t.connect, DEFAULT_CONNECT);
    let idle = match &t.idle {
        Some(s) if s.get_ref().trim() == "off" => None,
        None => DEFAULT_IDLE,
        // A zero (refused by `positive`) falls back to off.
        v => Some(cx.positive("timeouts.idle", v, Duration::ZERO)).filter(|d| !d.is_zero()),
    };
    let shutdown_delay = cx.duration(0, "timeouts.shutdown_delay", &t.shutdown_delay, DEFAULT_SHUTDOWN_DELAY);
    let drain = cx.duration(0, "timeouts.drain", &t.drain, DEFAULT_DRAIN);
    let revoke_grace = cx.duration(0, "timeouts.revoke_grace", &t.revoke_grace, DEFAULT_REVOKE_GRACE);

    // [admin]
    let admin = match &raw.admin.listen {
        None => Some(DEFAULT_ADMIN_LISTEN),
        Some(s) if s.get_ref().trim() == "off" => None,
        Some(s) => match s.get_ref().trim().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                cx.err(
                    0,
                    s.span(),
                    format!(
                        "admin.listen {:?}: expected IP:port like \"127.0.0.1:9090\", or \"off\"",
                        s.get_ref()
                    ),
                );
                None
            }
        },
    };

    // [log]
    let format = match &raw.log.format {
        None => DEFAULT_LOG_FORMAT,
        Some(s) => match s.get_ref().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                cx.err(0, s.span(), format!("log.format {other:?}: expected \"text\" or \"json\""));
                DEFAULT_LOG_FORMAT
            }
        },
    };
    let level = match &raw.log.level {
        None => DEFAULT_LOG_LEVEL.to_owned(),
        Some(s) if s.get_ref().trim().is_empty() => {
            cx.err(0, s.span(), "log.level is empty; use error, warn, info, debug or trace");
            DEFAULT_LOG_LEVEL.to_owned()
        }
        Some(s) => s.get_ref().trim().to_owned(),
    };

    // [access]
    let acc = &raw.access;
    let access_allow = acc.allow.as_ref().map(|l| {
        if l.get_ref().is_empty() {
            cx.err(0, l.span(), "access.allow = [] would admit no one; list source CIDRs, or remove the key so routes must set their own");
        }
        cx.cidrs(0, "access.allow", l)
    });
    let access_endpoints =
        acc.endpoints.as_ref().map(|l| cx.endpoint_ids(0, "access.endpoints", l)).unwrap_or_default();
    if !access_endpoints.is_empty() && mode != ProxyMode::Required {
        let span = acc.endpoints.as_ref().map(|l| l.span()).unwrap_or(0..0);
        cx.err(0, span, "access.endpoints needs proxy_protocol.mode = \"required\": the endpoint id comes from the PROXY v2 header");
    }
    let access_max = cx
        .count(0, "access.max_connections", &acc.max_connections, u32::MAX as i64)
        .unwrap_or(DEFAULT_MAX_CONNECTIONS);
    let max_per_source = cx
        .count(0, "access.max_per_source", &acc.max_per_source, u32::MAX as i64)
        .unwrap_or(DEFAULT_MAX_PER_SOURCE);

    // [[route]]
    let mut routes: Vec<Arc<Route>> = Vec::new();
    let mut by_name: HashMap<String, Arc<Route>> = HashMap::new();
    let mut by_key: HashMap<(u16, Option<String>), Arc<Route>> = HashMap::new();
    for (file, spanned) in &tree.routes {
        let file = *file;
        let table_span = spanned.span();
        let r: &RawRoute = spanned.get_ref();
        let before = cx.problems.len();

        let name = match &r.name {
            None => {
                cx.err(
                    file,
                    table_span.clone(),
                    "route has no name; add name = \"...\" ([A-Za-z0-9_.-], unique)",
                );
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
        };
        let who = if name.is_empty() { "route".to_owned() } else { format!("route {name:?}") };
        let port = match &r.port {
            None => {
                cx.err(
                    file,
                    table_span.clone(),
                    format!("{who} has no port; add port = 8022 (the listener port)"),
                );
                0
            }
            Some(p) => {
                let n = *p.get_ref();
                if !(1..=65535).contains(&n) {
                    cx.err(file, p.span(), format!("{who}: port {n} is not from 1 to 65535"));
                    0
                } else {
                    let n = n as u16;
                    if let Some(range) = ports {
                        if !range.contains(n) {
                            cx.err(file, p.span(), format!("{who}: port {n} is outside listen.ports {range}; routes must lie inside the NLB listener range"));
                        }
                    }
                    n
                }
            }
        };
        let target = match &r.target {
            None => {
                cx.err(file, table_span.clone(), format!("{who} has no target; add target = \"IP:port\""));
                None
            }
            Some(t) => match parse_target(t.get_ref().trim()) {
                Ok(t) => Some(t),
                Err(e) => {
                    cx.err(file, t.span(), e);
                    None
                }
            },
        };
        let via = r.via.as_ref().and_then(|v| {
            if mode != ProxyMode::Required {
                cx.err(file, v.span(), format!("{who}: via needs proxy_protocol.mode = \"required\": the endpoint id comes from the PROXY v2 header"));
            }
            if is_vpce(v.get_ref()) {
                Some(v.get_ref().clone())
            } else {
                cx.err(file, v.span(), format!("{who}: via {:?} is not a VPC endpoint id like \"vpce-0a1b2c3d4e5f67890\"", v.get_ref()));
                None
            }
        });
        let allow = match &r.allow {
            Some(l) => {
                if l.get_ref().is_empty() {
                    cx.err(
                        file,
                        l.span(),
                        format!("{who}: allow = [] would admit no one; remove the route instead"),
                    );
                }
                Some(cx.cidrs(file, "allow", l))
            }
            None => access_allow.clone(),
        };
        if allow.is_none() {
            cx.err(
                file,
                table_span.clone(),
                format!(
                    "{who} (port {port}) has no allow rule; fail closed: set allow = [...] on the route or in [access]; to open it to everyone write allow = [\"0.0.0.0/0\", \"::/0\"]"
                ),
            );
        }
        let endpoints = match &r.endpoints {
            Some(l) => {
                let e = cx.endpoint_ids(file, "endpoints", l);
                if !e.is_empty() && mode != ProxyMode::Required {
                    cx.err(file, l.span(), format!("{who}: endpoints needs proxy_protocol.mode = \"required\": the endpoint id comes from the PROXY v2 header"));
                }
                e
            }
            None => access_endpoints.clone(),
        };
        let max_connections = match &r.max_connections {
            Some(_) => cx.count(file, "max_connections", &r.max_connections, u32::MAX as i64).unwrap_or(0),
            None => access_max,
        };
        let tenant = match &r.tenant {
            Some(t) if t.get_ref().trim().is_empty() => {
                cx.err(
                    file,
                    t.span(),
                    format!("{who}: tenant is empty; remove it to default to the route name"),
                );
                name.clone()
            }
            Some(t) => t.get_ref().clone(),
            None => name.clone(),
        };
        let ssh_user = match &r.ssh_user {
            Some(u)
                if u.get_ref().is_empty()
                    || u.get_ref().contains(char::is_whitespace)
                    || u.get_ref().contains('"') =>
            {
                cx.err(
                    file,
                    u.span(),
                    format!(
                        "{who}: ssh_user {:?} must be a non-empty user name without spaces or quotes",
                        u.get_ref()
                    ),
                );
                None
            }
            Some(u) => Some(u.get_ref().clone()),
            None => None,
        };
        if cx.problems.len() != before || name.is_empty() || port == 0 {
            continue;
        }
        let (Some(target), Some(allow)) = (target, allow) else { continue };
        let route =
            Arc::new(Route { name, port, via, target, tenant, allow, endpoints, max_connections, ssh_user });

        if let Some(first) = by_name.get(&route.name) {
            cx.problems.push(Problem {
                location: String::new(),
                message: format!(
                    "route {:?} (port {}) and route {:?} (port {}): duplicate name {:?}; route names must be unique",
                    first.name, first.port, route.name, route.port, route.name
                ),
            });
            continue;
        }
        let key = (route.port, route.via.clone());
        if let Some(first) = by_key.get(&key) {
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
            continue;
        }
        by_name.insert(route.name.clone(), Arc::clone(&route));
        by_key.insert(key, Arc::clone(&route));
        routes.push(route);
    }

    if let Some(a) = admin {
        let span = raw.admin.listen.as_ref().map(|s| s.span()).unwrap_or(0..0);
        let overlaps = a.ip() == address || a.ip().is_unspecified() || address.is_unspecified();
        let taken = match ports {
            Some(r) => r.contains(a.port()),
            None => routes.iter().any(|r| r.port == a.port()),
        };
        if overlaps && taken && a.port() != 0 {
            let default = if raw.admin.listen.is_none() { " (the default)" } else { "" };
            cx.err(
                0,
                span,
                format!(
                    "admin.listen {a}{default} uses port {} that portgate also listens on for routes; set [admin] listen to a port outside them",
                    a.port()
                ),
            );
        }
    }

    if !cx.problems.is_empty() {
        return Err(ConfigError { problems: cx.problems });
    }
    routes.sort_by(|a, b| (a.port, &a.via).cmp(&(b.port, &b.via)));
    Ok(Config {
        source: path.to_path_buf(),
        listen: Listen { address, ports },
        proxy_protocol: ProxyProtocol { mode, trusted, header_timeout },
        keepalive: Keepalive { time, interval, retries, idle_timeout_limit: limit },
        timeouts: Timeouts { connect, idle, shutdown_delay, drain, revoke_grace },
        admin: Admin { listen: admin },
        log: Log { format, level },
        access: Access {
            allow: access_allow,
            endpoints: access_endpoints,
            max_connections: access_max,
            max_per_source,
        },
        routes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load;

    fn load_str(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.toml");
        std::fs::write(&p, text).unwrap();
        load(&p)
    }

    fn problems(text: &str) -> Vec<String> {
        match load_str(text) {
            Ok(_) => panic!("expected problems"),
            Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
        }
    }

    const MINIMAL: &str = "[access]\nallow = [\"10.0.0.0/8\"]\n[[route]]\nname = \"a\"\nport = 8022\ntarget = \"10.0.0.1:22\"\n";

    #[test]
    fn defaults_are_filled() {
        let c = load_str(MINIMAL).unwrap();
        let d = Config::with_defaults(c.source.clone());
        assert_eq!(c.listen, d.listen);
        assert_eq!(c.proxy_protocol, d.proxy_protocol);
        assert_eq!(c.keepalive, d.keepalive);
        assert_eq!(c.timeouts, d.timeouts);
        assert_eq!(c.admin, d.admin);
        assert_eq!(c.log, d.log);
        assert_eq!(c.routes[0].tenant, "a");
        assert_eq!(c.routes[0].allow, vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
    }

    #[test]
    fn hash_ignores_form_and_path_but_not_meaning() {
        let a = load_str(MINIMAL).unwrap().hash();
        let reordered = "# comment\n[[route]]\ntarget = \"10.0.0.1:22\"\nport = 8022\nname = \"a\"\n\n[access]\nallow = [ \"10.0.0.0/8\" ]\n[keepalive]\ntime = \"1m\"\n";
        assert_eq!(load_str(reordered).unwrap().hash(), a);
        let retargeted = MINIMAL.replace("10.0.0.1:22", "10.0.0.2:22");
        assert_ne!(load_str(&retargeted).unwrap().hash(), a);
        let timeout = format!("{MINIMAL}[timeouts]\nconnect = \"4s\"\n");
        assert_ne!(load_str(&timeout).unwrap().hash(), a);
    }

    #[test]
    fn routes_are_sorted_and_inherit_access() {
        let c = load_str(
            "[proxy_protocol]\nmode = \"required\"\ntrusted = [\"10.0.0.0/16\"]\n[access]\nallow = [\"10.0.0.0/8\"]\nendpoints = [\"vpce-1\"]\nmax_connections = 3\n\
             [[route]]\nname = \"b\"\nport = 9\ntarget = \"10.0.0.1:22\"\nvia = \"vpce-2\"\n\
             [[route]]\nname = \"a\"\nport = 9\ntarget = \"10.0.0.1:22\"\nmax_connections = 1\n\
             [[route]]\nname = \"c\"\nport = 1\ntarget = \"db.internal:5432\"\nendpoints = [\"vpce-9\"]\n",
        )
        .unwrap();
        let names: Vec<&str> = c.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["c", "a", "b"]);
        assert_eq!(c.routes[1].max_connections, 1);
        assert_eq!(c.routes[2].max_connections, 3);
        assert_eq!(c.routes[2].endpoints, ["vpce-1"]);
        assert_eq!(c.routes[0].endpoints, ["vpce-9"]);
        assert_eq!(c.routes[0].target, Target::Name { host: "db.internal".into(), port: 5432 });
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let p = problems(
            "[listen]\nports = \"8000-8049\"\n[timeouts]\nconnect = \"5x\"\n[[route]]\nname = \"bad name\"\nport = 9000\ntarget = \"10.0.0.1\"\nallow = [\"10.0.0.1/16\"]\n",
        );
        let text = p.join("\n");
        assert!(text.contains("p.toml:4:11: timeouts.connect: invalid duration \"5x\""), "{text}");
        assert!(text.contains("p.toml:6:8: route name \"bad name\""), "{text}");
        assert!(
            text.contains("p.toml:7:8: route \"bad name\": port 9000 is outside listen.ports 8000-8049"),
            "{text}"
        );
        assert!(text.contains("p.toml:8:10: target \"10.0.0.1\" has no port"), "{text}");
        assert!(
            text.contains(
                "p.toml:9:10: allow: \"10.0.0.1/16\" has host bits set; did you mean \"10.0.0.0/16\""
            ),
            "{text}"
        );
        assert_eq!(p.len(), 5, "{text}");
    }

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

    #[test]
    fn ports_forms() {
        assert_eq!(
            parse_ports(&PortsValue::Text("8000-8049".into())),
            Ok(PortRange { first: 8000, last: 8049 })
        );
        assert_eq!(parse_ports(&PortsValue::Number(8022)), Ok(PortRange { first: 8022, last: 8022 }));
        assert!(parse_ports(&PortsValue::Text("8049-8000".into())).is_err());
        assert!(parse_ports(&PortsValue::Text("0-10".into())).is_err());
        assert!(parse_ports(&PortsValue::Number(70000)).is_err());
    }

    #[test]
    fn absurd_durations_and_admin_port_clashes_are_refused() {
        let p = problems(&format!(
            "{MINIMAL}[timeouts]\nrevoke_grace = \"1000000000y\"\n[keepalive]\ninterval = \"40000s\"\n"
        ));
        let text = p.join("\n");
        assert!(text.contains("timeouts.revoke_grace = \"1000000000y\" is longer than a year"), "{text}");
        assert!(text.contains("keepalive.interval = \"40000s\": Linux allows at most 32767s"), "{text}");
        let p = problems(&format!("{MINIMAL}[admin]\nlisten = \"0.0.0.0:8022\"\n"));
        assert!(p[0].contains("uses port 8022"), "{p:?}");
    }

    /// One bad value in every section, in file order: the problems come out
    /// in section order, per-route problems before the problems between
    /// routes, and the admin port clash (which needs the routes) last.
    #[test]
    fn problems_come_in_section_order() {
        let p = problems(
            "[listen]\naddress = \"nope\"\nports = \"9-1\"\n\
             [proxy_protocol]\nmode = \"sometimes\"\ntrusted = [\"10.0.0.1/8\"]\nheader_timeout = \"0s\"\n\
             [keepalive]\ntime = \"400s\"\ninterval = \"1500ms\"\nretries = 0\nidle_timeout_limit = \"x\"\n\
             [timeouts]\nconnect = \"0s\"\nidle = \"0s\"\nshutdown_delay = \"x\"\ndrain = \"2y\"\nrevoke_grace = \"y\"\n\
             [admin]\nlisten = \"0.0.0.0:8022\"\n\
             [log]\nformat = \"xml\"\nlevel = \" \"\n\
             [access]\nallow = []\nendpoints = [\"vpce-1\", \"x\"]\nmax_connections = -1\nmax_per_source = 5000000000\n\
             [[route]]\nport = 0\n\
             [[route]]\nname = \"bad name\"\nport = 70000\ntarget = \"x\"\nvia = \"nope\"\nallow = []\nendpoints = [\"vpce-2\"]\n\
             max_connections = -2\ntenant = \" \"\nssh_user = \"a b\"\n\
             [[route]]\nname = \"a\"\nport = 8022\ntarget = \"10.0.0.1:22\"\nallow = [\"10.0.0.0/8\"]\n\
             [[route]]\nname = \"a\"\nport = 8023\ntarget = \"10.0.0.1:22\"\nallow = [\"10.0.0.0/8\"]\n\
             [[route]]\nname = \"b\"\nport = 8022\ntarget = \"10.0.0.1:22\"\nallow = [\"10.0.0.0/8\"]\n",
        );
        // Locations without the temporary directory.
        let p: Vec<&str> = p.iter().map(|l| l.find("p.toml:").map_or(l.as_str(), |i| &l[i..])).collect();
        let expected = [
            "p.toml:2:11: listen.address \"nope\" is not an IP address; use \"0.0.0.0\", \"::\" or an address of this host",
            "p.toml:3:9: listen.ports: range 9-1 runs backwards; write it low-high; expected a range like \"8000-8049\"",
            "p.toml:5:8: proxy_protocol.mode \"sometimes\": expected \"off\" or \"required\"",
            "p.toml:6:12: proxy_protocol.trusted: \"10.0.0.1/8\" has host bits set; did you mean \"10.0.0.0/8\"? (write a single address as 10.0.0.1/32)",
            "p.toml:7:18: proxy_protocol.header_timeout must be greater than 0",
            "p.toml:10:12: keepalive.interval = \"1500ms\": TCP keepalive works in whole seconds; use a value like \"15s\"",
            "p.toml:11:11: keepalive.retries = 0: expected 1 to 127",
            "p.toml:12:22: keepalive.idle_timeout_limit: invalid duration \"x\": expected a number with a unit, like \"500ms\", \"60s\" or \"5m\"",
            "p.toml:9:8: keepalive.time (400s) must be below keepalive.idle_timeout_limit (350s), or the NLB drops idle sessions before the first keepalive probe",
            "p.toml:14:11: timeouts.connect must be greater than 0",
            "p.toml:15:8: timeouts.idle must be greater than 0",
            "p.toml:16:18: timeouts.shutdown_delay: invalid duration \"x\": expected a number with a unit, like \"500ms\", \"60s\" or \"5m\"",
            "p.toml:17:9: timeouts.drain = \"2y\" is longer than a year; use a shorter duration",
            "p.toml:18:16: timeouts.revoke_grace: invalid duration \"y\": expected a number with a unit, like \"500ms\", \"60s\" or \"5m\"",
            "p.toml:22:10: log.format \"xml\": expected \"text\" or \"json\"",
            "p.toml:23:9: log.level is empty; use error, warn, info, debug or trace",
            "p.toml:25:9: access.allow = [] would admit no one; list source CIDRs, or remove the key so routes must set their own",
            "p.toml:26:24: access.endpoints: \"x\" is not a VPC endpoint id like \"vpce-0a1b2c3d4e5f67890\"",
            "p.toml:26:13: access.endpoints needs proxy_protocol.mode = \"required\": the endpoint id comes from the PROXY v2 header",
            "p.toml:27:19: access.max_connections = -1: expected a whole number from 0 to 4294967295",
            "p.toml:28:18: access.max_per_source = 5000000000: expected a whole number from 0 to 4294967295",
            "p.toml:29:1: route has no name; add name = \"...\" ([A-Za-z0-9_.-], unique)",
            "p.toml:30:8: route: port 0 is not from 1 to 65535",
            "p.toml:29:1: route has no target; add target = \"IP:port\"",
            "p.toml:32:8: route name \"bad name\": use 1 to 64 of A-Z a-z 0-9 _ . -",
            "p.toml:33:8: route \"bad name\": port 70000 is not from 1 to 65535",
            "p.toml:34:10: target \"x\" has no port; expected IPv4:port, [IPv6]:port or host:port, like \"172.31.31.84:22\"",
            "p.toml:35:7: route \"bad name\": via needs proxy_protocol.mode = \"required\": the endpoint id comes from the PROXY v2 header",
            "p.toml:35:7: route \"bad name\": via \"nope\" is not a VPC endpoint id like \"vpce-0a1b2c3d4e5f67890\"",
            "p.toml:36:9: route \"bad name\": allow = [] would admit no one; remove the route instead",
            "p.toml:37:13: route \"bad name\": endpoints needs proxy_protocol.mode = \"required\": the endpoint id comes from the PROXY v2 header",
            "p.toml:38:19: max_connections = -2: expected a whole number from 0 to 4294967295",
            "p.toml:39:10: route \"bad name\": tenant is empty; remove it to default to the route name",
            "p.toml:40:12: route \"bad name\": ssh_user \"a b\" must be a non-empty user name without spaces or quotes",
            "route \"a\" (port 8022) and route \"a\" (port 8023): duplicate name \"a\"; route names must be unique",
            "route \"a\" (port 8022) and route \"b\" (port 8022): both route port 8022 (no via); at most one route per (port, via)",
            "p.toml:20:10: admin.listen 0.0.0.0:8022 uses port 8022 that portgate also listens on for routes; set [admin] listen to a port outside them",
        ];
        assert_eq!(p, expected, "{}", p.join("\n"));
    }
}
