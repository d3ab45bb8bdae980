//! Raw tree -> validated [`Config`]: every rule, every problem located.
//!
//! Validation never stops at the first problem: each bad value is reported
//! with its `FILE:LINE:COL` and what would be valid, and problems between
//! routes name the routes. Only a config with no problem at all is returned.
//!
//! [`validate`] calls one function per section of the file, in file order,
//! so problems come out in that order; each section lives in its own file
//! (`listen.rs`, `proxy_protocol.rs`, `keepalive.rs`, `timeouts.rs`,
//! `admin.rs`, `log.rs`, `control.rs`, `access.rs`, `routes.rs`). This file holds the
//! value checks every section shares (`Ctx`). Values a key falls back to
//! come from [`defaults`](super::defaults), never from here.
//!
//! Nothing here reads files (that is [`raw`](super::raw)) or touches the
//! running node: validation is a pure function of the tree.

mod access;
mod admin;
mod control;
mod keepalive;
mod listen;
mod log;
mod metrics;
mod proxy_protocol;
mod routes;
mod tests_section;
mod timeouts;
mod upstream;

use std::net::IpAddr;
use std::ops::Range;
use std::path::Path;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use toml::Spanned;

use super::raw::{SpannedList, Tree};
use super::{Config, ConfigError, Problem};

/// Longest duration accepted anywhere: far beyond any sensible setting, and
/// small enough that adding it to the current time can never overflow.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// What a duration looks like, for every duration message.
const DURATION_HINT: &str = "expected a number with a unit, like \"500ms\", \"60s\" or \"5m\"";

/// What an instant looks like, for every time message.
const TIME_HINT: &str =
    "expected an RFC 3339 time with its offset, like \"2026-12-01T09:00:00Z\" or \"2026-12-01T18:00:00+09:00\"";

/// The state of one validation run, handed to every section: the tree (for
/// locating a span) and the problems found so far, in the order found.
struct Ctx<'a> {
    /// The files being validated, so a span becomes `FILE:LINE:COL`.
    tree: &'a Tree,
    /// Every problem so far; include problems first, then in section order.
    problems: Vec<Problem>,
}

impl Ctx<'_> {
    /// Report a problem at `span` of file `file` (0 = the main file).
    fn err(&mut self, file: usize, span: Range<usize>, msg: impl Into<String>) {
        let p = self.tree.problem(file, span, msg);
        self.problems.push(p);
    }

    /// A duration, or `default` when the key is missing or bad (reported).
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

    /// A whole number from 0 to `max`; `None` when missing or bad (reported).
    fn count(&mut self, file: usize, key: &str, v: &Option<Spanned<i64>>, max: i64) -> Option<u32> {
        let s = v.as_ref()?;
        let n = *s.get_ref();
        if n < 0 || n > max {
            self.err(file, s.span(), format!("{key} = {n}: expected a whole number from 0 to {max}"));
            return None;
        }
        u32::try_from(n).ok()
    }

    /// `"off"` (`Some(None)`) or a positive duration (`Some(Some(d))`);
    /// `None` when the value is bad (reported).
    fn off_or_positive(&mut self, file: usize, key: &str, v: &Spanned<String>) -> Option<Option<Duration>> {
        if v.get_ref().trim() == "off" {
            return Some(None);
        }
        let before = self.problems.len();
        let d = self.duration(file, key, &Some(v.clone()), Duration::ZERO);
        if self.problems.len() != before {
            return None;
        }
        if d.is_zero() {
            self.err(file, v.span(), format!("{key} must be greater than 0, or \"off\""));
            return None;
        }
        Some(Some(d))
    }

    /// An RFC 3339 instant; `None` when bad (reported).
    fn instant(&mut self, file: usize, key: &str, v: &Spanned<String>) -> Option<SystemTime> {
        match crate::config::units::parse_rfc3339(v.get_ref().trim()) {
            Ok(t) => Some(t),
            Err(why) => {
                self.err(
                    file,
                    v.span(),
                    format!("{key} {:?} is not valid ({why}); {TIME_HINT}", v.get_ref()),
                );
                None
            }
        }
    }

    /// An egress source list: IP addresses of this host (checked at `run`
    /// and reload; here only their form), not empty, none twice. Each bad
    /// entry is reported; `None` when the list is empty.
    fn sources(&mut self, file: usize, key: &str, list: &SpannedList) -> Option<Vec<IpAddr>> {
        if list.get_ref().is_empty() {
            self.err(
                file,
                list.span(),
                format!("{key} = [] lists no address; list local addresses to dial from, or remove the key to let the kernel choose"),
            );
            return None;
        }
        let mut out: Vec<IpAddr> = Vec::new();
        for item in list.get_ref() {
            let s = item.get_ref().trim();
            match s.parse::<IpAddr>() {
                Ok(ip) if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]) => {
                    self.err(
                        file,
                        item.span(),
                        format!("{key}: {s:?} is not a unicast address; list addresses of this host, like \"10.0.5.10\""),
                    );
                }
                Ok(ip) if out.contains(&ip.to_canonical()) => {
                    self.err(file, item.span(), format!("{key}: {s:?} is listed twice"));
                }
                Ok(ip) => out.push(ip.to_canonical()),
                Err(_) => self.err(
                    file,
                    item.span(),
                    format!("{key}: {s:?} is not an IP address; list addresses of this host, like \"10.0.5.10\" or \"2001:db8::10\" (no port, no prefix length)"),
                ),
            }
        }
        Some(out)
    }

    /// The valid networks of a CIDR list; each bad entry is reported.
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

    /// The valid VPC endpoint ids of a list; each bad entry is reported.
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

/// A VPC endpoint id as AWS writes it: `vpce-` and up to 32 lowercase
/// letters or digits.
fn is_vpce(s: &str) -> bool {
    s.strip_prefix("vpce-").is_some_and(|rest| {
        !rest.is_empty()
            && rest.len() <= 32
            && rest.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

/// Validate the tree, collecting every problem; then, if there is none, run
/// the `[[test]]` tables (windows judged at a test's `at`, else at `now`).
pub fn validate(path: &Path, tree: &Tree, now: SystemTime) -> Result<Config, ConfigError> {
    let mut cx = Ctx { tree, problems: tree.problems.clone() };
    let raw = &tree.main;

    // One call per section, in file order: problems come out in this order,
    // and a later section reads only what an earlier one has decided.
    let listen = listen::check(&mut cx, &raw.listen);
    let proxy_protocol = proxy_protocol::check(&mut cx, &raw.proxy_protocol);
    let keepalive = keepalive::check(&mut cx, &raw.keepalive);
    let timeouts = timeouts::check(&mut cx, &raw.timeouts);
    let admin = admin::check(&mut cx, &raw.admin);
    let log = log::check(&mut cx, &raw.log);
    let control = control::check(&mut cx, path, &raw.control);
    let access = access::check(&mut cx, &raw.access, proxy_protocol.mode);
    let upstream = upstream::check(&mut cx, &raw.upstream);
    let metrics = metrics::check(&mut cx, &raw.metrics);
    let inherited = routes::Inherited {
        ports: listen.ports,
        mode: proxy_protocol.mode,
        access: &access,
        max_session: timeouts.max_session,
        source: &upstream.source,
    };
    let routes = routes::check(&mut cx, &tree.routes, &inherited);
    // It needs the ports the routes listen on.
    admin::check_port_clash(&mut cx, &raw.admin, &admin, &listen, &routes);
    let tests = tests_section::check(&mut cx, &tree.tests);

    // Tests judge the routes; with a problem anywhere, some routes were left
    // out, and their verdicts would only add noise.
    if cx.problems.is_empty() {
        tests_section::run(&mut cx, &tests, &routes, now);
    }
    if !cx.problems.is_empty() {
        return Err(ConfigError { problems: cx.problems });
    }
    Ok(Config {
        source: path.to_path_buf(),
        listen,
        proxy_protocol,
        keepalive,
        timeouts,
        admin,
        log,
        control,
        access,
        upstream,
        metrics,
        routes,
        tests: tests.into_iter().map(|t| t.test).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load, Target};

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
        assert_eq!(c.control, d.control);
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

    /// Locations without the temporary directory.
    fn short(p: &[String]) -> Vec<&str> {
        p.iter().map(|l| l.find("p.toml:").map_or(l.as_str(), |i| &l[i..])).collect()
    }

    /// Keys added after v1 are not hashed when unused: the shipped
    /// fixtures hash as they did before windows, tests and sources.
    /// (`minimal.toml` leaves `[admin] listen` unset, so its hash moved once,
    /// with the admin port's default: 9090 to 14090, see the README.)
    #[test]
    fn hashes_of_configs_without_the_new_keys_are_unchanged() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid");
        let hash = |f: &str| load(&dir.join(f)).unwrap().hash();
        assert_eq!(hash("full.toml"), "36d0ed031b0293a3ef06900650662152cfff4a96c17a1624da6eb93b6f12cb17");
        assert_eq!(hash("minimal.toml"), "16fe0c36a543cf1b5a246bd16b503a4343f93774224fbe2a8b12d8425a8d034a");
    }

    #[test]
    fn tests_do_not_change_the_hash_but_windows_and_sources_do() {
        let a = load_str(MINIMAL).unwrap();
        let test = "[[test]]\nport = 8022\nclient = \"10.9.9.9\"\nexpect = \"admit\"\nroute = \"a\"\n";
        let with_test = load_str(&format!("{MINIMAL}{test}")).unwrap();
        assert_eq!(with_test.tests.len(), 1);
        assert_eq!(with_test.hash(), a.hash());
        for extra in
            ["not_after = \"2099-01-01T00:00:00Z\"\n", "max_session = \"8h\"\n", "source = [\"10.0.5.10\"]\n"]
        {
            let c = load_str(&format!("{MINIMAL}{extra}")).unwrap();
            assert_ne!(c.hash(), a.hash(), "{extra}");
        }
        // One instant, two offsets: one hash.
        let z = load_str(&format!("{MINIMAL}not_after = \"2099-01-01T00:00:00Z\"\n")).unwrap();
        let jst = load_str(&format!("{MINIMAL}not_after = \"2099-01-01T09:00:00+09:00\"\n")).unwrap();
        assert_eq!(z.hash(), jst.hash());
        assert_eq!(z.routes[0].not_after, jst.routes[0].not_after);
    }

    #[test]
    fn max_session_is_inherited_and_may_be_cancelled() {
        let c = load_str(&format!(
            "[timeouts]\nmax_session = \"8h\"\n{MINIMAL}[[route]]\nname = \"b\"\nport = 8023\ntarget = \"10.0.0.1:22\"\nmax_session = \"off\"\n\
             [[route]]\nname = \"c\"\nport = 8024\ntarget = \"10.0.0.1:22\"\nmax_session = \"90m\"\n"
        ))
        .unwrap();
        let h = Duration::from_secs(3600);
        assert_eq!(c.timeouts.max_session, Some(8 * h));
        let by = |n: &str| c.routes.iter().find(|r| r.name == n).unwrap().max_session;
        assert_eq!((by("a"), by("b"), by("c")), (Some(8 * h), None, Some(h + h / 2)));
    }

    #[test]
    fn windows_sessions_and_sources_are_validated_where_written() {
        let p = problems(
            "[timeouts]\nmax_session = \"0s\"\n\
             [upstream]\nsource = [\"10.0.5.10\", \"10.0.5.10\", \"0.0.0.0\", \"10.0.5.0/24\"]\n\
             [access]\nallow = [\"10.0.0.0/8\"]\n\
             [[route]]\nname = \"a\"\nport = 1\ntarget = \"10.0.0.1:22\"\n\
             not_before = \"2026-12-01T09:00:00\"\nnot_after = \"2026-12-01 25:00:00Z\"\nmax_session = \"8 fortnights\"\n\
             [[route]]\nname = \"b\"\nport = 2\ntarget = \"10.0.0.1:22\"\n\
             not_before = \"2026-12-01T18:00:00+09:00\"\nnot_after = \"2026-12-01T09:00:00Z\"\nsource = []\n\
             [[route]]\nname = \"c\"\nport = 3\ntarget = \"[2001:db8::1]:22\"\nsource = [\"10.0.5.11\"]\n\
             [upstream]\n",
        );
        // The doubled [upstream] is a TOML error: only that one is reported.
        assert_eq!(p.len(), 1, "{p:?}");
        let p = problems(
            "[timeouts]\nmax_session = \"0s\"\n\
             [upstream]\nsource = [\"10.0.5.10\", \"10.0.5.10\", \"0.0.0.0\", \"10.0.5.0/24\"]\n\
             [access]\nallow = [\"10.0.0.0/8\"]\n\
             [[route]]\nname = \"a\"\nport = 1\ntarget = \"10.0.0.1:22\"\n\
             not_before = \"2026-12-01T09:00:00\"\nnot_after = \"2026-12-01 25:00:00Z\"\nmax_session = \"8 fortnights\"\n\
             [[route]]\nname = \"b\"\nport = 2\ntarget = \"10.0.0.1:22\"\n\
             not_before = \"2026-12-01T18:00:00+09:00\"\nnot_after = \"2026-12-01T09:00:00Z\"\nsource = []\n\
             [[route]]\nname = \"c\"\nport = 3\ntarget = \"[2001:db8::1]:22\"\nsource = [\"10.0.5.11\"]\n\
             [[route]]\nname = \"d\"\nport = 4\ntarget = \"[2001:db8::1]:22\"\n",
        );
        let expected = [
            "p.toml:2:15: timeouts.max_session must be greater than 0, or \"off\"",
            "p.toml:4:24: upstream.source: \"10.0.5.10\" is listed twice",
            "p.toml:4:37: upstream.source: \"0.0.0.0\" is not a unicast address; list addresses of this host, like \"10.0.5.10\"",
            "p.toml:4:48: upstream.source: \"10.0.5.0/24\" is not an IP address; list addresses of this host, like \"10.0.5.10\" or \"2001:db8::10\" (no port, no prefix length)",
            "p.toml:11:14: route \"a\": not_before \"2026-12-01T09:00:00\" is not valid (the 'offset hour' component could not be parsed); expected an RFC 3339 time with its offset, like \"2026-12-01T09:00:00Z\" or \"2026-12-01T18:00:00+09:00\"",
            "p.toml:12:13: route \"a\": not_after \"2026-12-01 25:00:00Z\" is not valid (hour was not in range); expected an RFC 3339 time with its offset, like \"2026-12-01T09:00:00Z\" or \"2026-12-01T18:00:00+09:00\"",
            "p.toml:13:15: max_session: invalid duration \"8 fortnights\": expected a number with a unit, like \"500ms\", \"60s\" or \"5m\"",
            "p.toml:19:13: route \"b\": not_after (2026-12-01T09:00:00Z) must be later than not_before (2026-12-01T09:00:00Z): the window [not_before, not_after) would admit no one",
            "p.toml:20:10: route \"b\": source = [] lists no address; list local addresses to dial from, or remove the key to let the kernel choose",
            "p.toml:25:10: route \"c\": target [2001:db8::1]:22 is IPv6, but its source lists no IPv6 address to dial it from; add one",
            "p.toml:29:10: route \"d\": target [2001:db8::1]:22 is IPv6, but upstream.source lists no IPv6 address to dial it from; add one",
        ];
        assert_eq!(short(&p), expected, "{}", p.join("\n"));
    }

    #[test]
    fn test_tables_are_validated_then_run_at_their_header() {
        let p = problems(&format!(
            "{MINIMAL}[[test]]\nport = 0\nclient = \"10.0.0.1:22\"\nendpoint = \"x\"\nat = \"soon\"\nexpect = \"maybe\"\n\
             [[test]]\nexpect = \"reject\"\nroute = \"a\"\nreason = \"limit\"\n\
             [[test]]\nport = 8022\nclient = \"10.0.0.1\"\nexpect = \"admit\"\nreason = \"no_route\"\n\
             [[test]]\nport = 8022\nclient = \"10.0.0.1\"\nbogus = 1\n"
        ));
        // An unknown key is a TOML error of its own.
        assert_eq!(short(&p), ["p.toml:25:1: unknown field `bogus`, expected one of `port`, `client`, `endpoint`, `at`, `expect`, `route`, `reason`"]);
        let p = problems(&format!(
            "{MINIMAL}[[test]]\nport = 0\nclient = \"10.0.0.1:22\"\nendpoint = \"x\"\nat = \"soon\"\nexpect = \"maybe\"\n\
             [[test]]\nexpect = \"reject\"\nroute = \"a\"\nreason = \"limit\"\n\
             [[test]]\nport = 8022\nclient = \"10.0.0.1\"\nexpect = \"admit\"\nreason = \"no_route\"\n"
        ));
        let expected = [
            "p.toml:8:8: test: port 0 is not from 1 to 65535",
            "p.toml:9:10: test: client \"10.0.0.1:22\" is not an IP address; write one like \"172.31.25.9\" or \"2001:db8::9\" (no port)",
            "p.toml:10:12: test: endpoint \"x\" is not a VPC endpoint id like \"vpce-0a1b2c3d4e5f67890\"",
            "p.toml:11:6: test: at \"soon\" is not valid (the 'year' component could not be parsed); expected an RFC 3339 time with its offset, like \"2026-12-01T09:00:00Z\" or \"2026-12-01T18:00:00+09:00\"",
            "p.toml:12:10: test: expect \"maybe\": expected \"admit\" or \"reject\"",
            "p.toml:13:1: test has no port; add port = 8022",
            "p.toml:13:1: test has no client; add client = \"172.31.25.9\" (the client address, as a PROXY header gives it)",
            "p.toml:15:9: test: route goes with expect = \"admit\"; for a refusal name the reason with reason = \"...\"",
            "p.toml:16:10: test: reason \"limit\" cannot be tested (tests leave the PROXY header, limits and audit aside); expected one of \"no_route\", \"source_not_allowed\", \"endpoint_not_allowed\", \"outside_window\"",
            "p.toml:21:10: test: reason goes with expect = \"reject\"; an admitted connection has none (name the route with route = \"...\")",
        ];
        assert_eq!(short(&p), expected, "{}", p.join("\n"));
        // Valid tables, run: each failure at its [[test]] header line.
        let p = problems(&format!(
            "{MINIMAL}not_before = \"2030-01-01T00:00:00+09:00\"\n\
             [[test]]\nport = 8022\nclient = \"10.0.0.1\"\nat = \"2030-01-01T00:00:00+09:00\"\nexpect = \"admit\"\nroute = \"a\"\n\
             [[test]]\nport = 8022\nclient = \"10.0.0.1\"\nat = \"2029-12-31T14:59:59Z\"\nexpect = \"admit\"\nroute = \"a\"\n\
             [[test]]\nport = 8022\nclient = \"11.0.0.1\"\nexpect = \"admit\"\n"
        ));
        let expected = [
            "p.toml:14:1: test expects admit by route \"a\", got reject: outside_window",
            "p.toml:20:1: test expects admit, got reject: source_not_allowed",
        ];
        assert_eq!(short(&p), expected, "{}", p.join("\n"));
    }
}
