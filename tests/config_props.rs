//! Property tests of config loading (the fuzz targets in `fuzz/` explore the
//! same ground for longer; these run in the normal suite, in a few seconds).
//!
//! - Arbitrary bytes, and mutations of the shipped configs, never make
//!   `portgate::config::load` panic, and every error it returns displays.
//! - A generated valid config (random routes, addresses, CIDRs, `via` and
//!   endpoints in `required` mode, durations in many spellings, TOML strings
//!   in both quote styles) loads, with the effective values the generator
//!   expects; `render::to_toml` of it loads back to an equal `Config` with the
//!   same `hash()`.
//!
//! The PROXY header round trip lives with its parser, in
//! `src/proxy_protocol.rs`.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use portgate::config::render::to_toml;
use portgate::config::{load, Config, LogFormat, ProxyMode, Target};
use proptest::prelude::*;
use proptest::sample::select;

/// A scratch directory holding the files that the shipped configs include
/// (`conf.d/db.toml`, `inc/listen.toml`), so that mutated `include` lines
/// still find something.
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    std::fs::create_dir_all(dir.path().join("conf.d")).unwrap();
    std::fs::create_dir_all(dir.path().join("inc")).unwrap();
    std::fs::copy(fixtures.join("valid/conf.d/db.toml"), dir.path().join("conf.d/db.toml")).unwrap();
    std::fs::copy(fixtures.join("invalid/inc/listen.toml"), dir.path().join("inc/listen.toml")).unwrap();
    dir
}

fn load_bytes(path: &Path, bytes: &[u8]) -> Result<Config, portgate::config::ConfigError> {
    std::fs::write(path, bytes).unwrap();
    load(path)
}

/// The shipped configs, valid and invalid: starting points for mutation.
fn seeds() -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<PathBuf> = vec![root.join("config/portgate.example.toml")];
    for kind in ["valid", "invalid"] {
        for entry in std::fs::read_dir(root.join("tests/fixtures").join(kind)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                files.push(path);
            }
        }
    }
    files.sort();
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// Snippets a mutation may insert: keys, section headers, value shapes and
/// TOML punctuation.
const TOKENS: &[&str] = &[
    "[listen]",
    "[proxy_protocol]",
    "[keepalive]",
    "[timeouts]",
    "[access]",
    "[[route]]",
    "\nname = \"x\"\n",
    "\nport = 8022\n",
    "\ntarget = \"10.0.0.1:22\"\n",
    "\nvia = \"vpce-1\"\n",
    "\nallow = [\"0.0.0.0/0\"]\n",
    "\nmode = \"required\"\n",
    "\ninclude = [\"inc/*.toml\"]\n",
    "\"5m\"",
    "\"0s\"",
    "\"1ns\"",
    "\"off\"",
    "-1",
    "99999999999",
    "1e9",
    "true",
    "[",
    "]",
    "{",
    "}",
    "\"",
    "'",
    "'''",
    "=",
    ",",
    ".",
    "\n",
    "\\u0000",
    "::",
    "/",
    "é",
];

#[derive(Debug, Clone)]
enum Mutation {
    Insert(prop::sample::Index, &'static str),
    Delete(prop::sample::Index, usize),
    Replace(prop::sample::Index, u8),
}

fn mutate(mut text: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = text.len();
        match m {
            Mutation::Insert(at, token) => {
                let at = at.index(len + 1);
                text.splice(at..at, token.bytes());
            }
            Mutation::Delete(at, n) if len > 0 => {
                let at = at.index(len);
                text.drain(at..(at + n).min(len));
            }
            Mutation::Replace(at, byte) if len > 0 => {
                let at = at.index(len);
                text[at] = *byte;
            }
            _ => {}
        }
    }
    text
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), select(TOKENS)).prop_map(|(i, t)| Mutation::Insert(i, t)),
        (any::<prop::sample::Index>(), 1usize..40).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Replace(i, b)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let dir = scratch();
        if let Err(e) = load_bytes(&dir.path().join("portgate.toml"), &bytes) {
            prop_assert!(!e.problems.is_empty());
            let _ = e.to_string();
        }
    }

    #[test]
    fn mutated_configs_never_panic(
        seed in select(seeds()),
        mutations in prop::collection::vec(arb_mutation(), 1..6),
    ) {
        let dir = scratch();
        let bytes = mutate(seed, &mutations);
        match load_bytes(&dir.path().join("portgate.toml"), &bytes) {
            Err(e) => {
                prop_assert!(!e.problems.is_empty());
                let _ = e.to_string();
            }
            // Whatever a mutation left valid must round-trip too.
            Ok(cfg) => check_round_trip(dir.path(), &cfg)?,
        }
    }
}

/// `to_toml(cfg)` loads back to `cfg` (apart from `source`) with the same hash.
fn check_round_trip(dir: &Path, cfg: &Config) -> Result<(), TestCaseError> {
    let text = to_toml(cfg);
    let rendered_dir = dir.join("rendered");
    std::fs::create_dir_all(&rendered_dir).unwrap();
    let path = rendered_dir.join("portgate.toml");
    let mut back = match load_bytes(&path, text.as_bytes()) {
        Ok(c) => c,
        Err(e) => {
            return Err(TestCaseError::fail(format!("rendered config does not load:\n{e}\n---\n{text}")))
        }
    };
    prop_assert_eq!(&back.source, &path);
    back.source = cfg.source.clone();
    prop_assert_eq!(&back, cfg, "rendered:\n{}", text);
    prop_assert_eq!(back.hash(), cfg.hash());
    Ok(())
}

// ---------------------------------------------------------------------------
// Generated valid configs
// ---------------------------------------------------------------------------

/// A value as the generator wrote it, and what it means.
#[derive(Debug, Clone)]
struct Spelled<T> {
    text: String,
    value: T,
}

/// A TOML string literal for `s`: a literal string ('...') where it can be
/// one, else a basic string with escapes.
fn toml_str(s: &str, literal: bool) -> String {
    if literal && !s.contains(['\'', '\n', '\r']) && !s.chars().any(|c| c.is_control() && c != '\t') {
        return format!("'{s}'");
    }
    common::toml_string(s)
}

/// A duration of whole `h m s` and optionally `ms us` parts, written with
/// random unit names and separators (`"1h 5sec"`, `"90seconds"`,
/// `" 1500usec"`).
fn arb_duration(min: Duration, sub_second: bool) -> impl Strategy<Value = Spelled<Duration>> {
    let parts = (0u64..3, 0u64..90, 0u64..400, 0u64..2000, 0u64..2000);
    let units = (
        select(vec!["h", "hr", "hours"]),
        select(vec!["m", "min", "minutes"]),
        select(vec!["s", "sec", "seconds"]),
        select(vec!["ms", "msec"]),
        select(vec!["us", "usec"]),
    );
    (parts, units, select(vec!["", " "]), select(vec!["", " ", "  "]), any::<bool>()).prop_map(
        move |((h, m, s, ms, us), (hu, mu, su, msu, usu), sep, pad, trailing_pad)| {
            let (ms, us) = if sub_second { (ms, us) } else { (0, 0) };
            let mut value = Duration::from_secs(h * 3600 + m * 60 + s)
                + Duration::from_millis(ms)
                + Duration::from_micros(us);
            let mut s = s;
            if value < min {
                s += min.as_secs().max(1);
                value += Duration::from_secs(min.as_secs().max(1));
            }
            let mut pieces = Vec::new();
            for (n, unit) in [(h, hu), (m, mu), (s, su), (ms, msu), (us, usu)] {
                if n > 0 {
                    pieces.push(format!("{n}{unit}"));
                }
            }
            if pieces.is_empty() {
                pieces.push(format!("0{su}"));
            }
            let text = format!("{pad}{}{}", pieces.join(sep), if trailing_pad { pad } else { "" });
            Spelled { text, value }
        },
    )
}

fn arb_v4() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![any::<[u8; 4]>().prop_map(Ipv4Addr::from), Just(Ipv4Addr::new(10, 0, 0, 1))]
}

fn arb_v6() -> impl Strategy<Value = Ipv6Addr> {
    prop_oneof![
        any::<[u8; 16]>().prop_map(Ipv6Addr::from),
        // Short forms: "2001:db8::84", "::1", "::ffff:10.0.0.1".
        (any::<u16>(), any::<u16>()).prop_map(|(a, b)| Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, a, b)),
        Just(Ipv6Addr::LOCALHOST),
        arb_v4().prop_map(|v4| v4.to_ipv6_mapped()),
    ]
}

/// A network, written as a CIDR or (for a host network) sometimes as a bare
/// address, with optional surrounding spaces.
fn arb_cidr() -> impl Strategy<Value = Spelled<IpNet>> {
    let net = prop_oneof![
        (arb_v4(), 0u8..=32).prop_map(|(a, p)| IpNet::new(IpAddr::V4(a), p).unwrap().trunc()),
        (arb_v6(), 0u8..=128).prop_map(|(a, p)| IpNet::new(IpAddr::V6(a), p).unwrap().trunc()),
    ];
    (net, any::<bool>(), select(vec!["", " "])).prop_map(|(net, bare, pad)| {
        let host = net.prefix_len() == net.max_prefix_len();
        let text =
            if host && bare { format!("{pad}{}{pad}", net.addr()) } else { format!("{pad}{net}{pad}") };
        Spelled { text, value: net }
    })
}

fn cidr_list(list: &[Spelled<IpNet>], literal: bool) -> String {
    let items: Vec<String> = list.iter().map(|c| c.text.clone()).collect();
    str_list(&items, literal)
}

fn str_list(list: &[String], literal: bool) -> String {
    let items: Vec<String> = list.iter().map(|e| toml_str(e, literal)).collect();
    format!("[{}]", items.join(", "))
}

fn arb_vpce() -> impl Strategy<Value = String> {
    "vpce-[0-9a-z]{1,17}"
}

fn arb_target() -> impl Strategy<Value = Spelled<Target>> {
    let port = 1u16..=65535;
    prop_oneof![
        (arb_v4(), port.clone()).prop_map(|(a, p)| {
            let addr = SocketAddr::from((a, p));
            Spelled { text: addr.to_string(), value: Target::Addr(addr) }
        }),
        (arb_v6(), port.clone()).prop_map(|(a, p)| {
            let addr = SocketAddr::from((a, p));
            Spelled { text: addr.to_string(), value: Target::Addr(addr) }
        }),
        ("[a-z][a-z0-9-]{0,10}(\\.[a-z0-9]{1,8}){0,2}", port).prop_map(|(host, p)| Spelled {
            text: format!("{host}:{p}"),
            value: Target::Name { host, port: p },
        }),
    ]
}

#[derive(Debug, Clone)]
struct RouteModel {
    name: String,
    port_offset: u16,
    port: u16,
    via: Option<String>,
    target: Spelled<Target>,
    tenant: Option<String>,
    allow: Option<Vec<Spelled<IpNet>>>,
    endpoints: Option<Vec<String>>,
    max_connections: Option<u32>,
    ssh_user: Option<String>,
    literal_strings: bool,
}

fn arb_route() -> impl Strategy<Value = RouteModel> {
    (
        "[A-Za-z0-9_.-]{1,20}",
        any::<u16>(),
        proptest::option::of(arb_vpce()),
        arb_target(),
        proptest::option::of("\\PC{0,12}".prop_filter("tenant must not be blank", |t| !t.trim().is_empty())),
        proptest::option::of(prop::collection::vec(arb_cidr(), 1..4)),
        proptest::option::of(prop::collection::vec(arb_vpce(), 0..3)),
        proptest::option::of(prop_oneof![Just(0u32), 1u32..100, Just(u32::MAX)]),
        proptest::option::of("[a-z_][a-z0-9_.\\\\-]{0,10}"),
        any::<bool>(),
    )
        .prop_map(
            |(
                name,
                port_offset,
                via,
                target,
                tenant,
                allow,
                endpoints,
                max_connections,
                ssh_user,
                literal,
            )| {
                RouteModel {
                    name,
                    port_offset,
                    port: 0,
                    via,
                    target,
                    tenant,
                    allow,
                    endpoints,
                    max_connections,
                    ssh_user,
                    literal_strings: literal,
                }
            },
        )
}

#[derive(Debug, Clone)]
struct Model {
    address: Option<IpAddr>,
    /// The listener range and whether to write a one-port range as a number.
    ports: Option<(u16, u16, bool)>,
    required: bool,
    trusted: Option<Vec<Spelled<IpNet>>>,
    header_timeout: Option<Spelled<Duration>>,
    ka_time: Option<Spelled<Duration>>,
    ka_interval: Option<Spelled<Duration>>,
    retries: Option<u32>,
    limit: Option<Spelled<Duration>>,
    connect: Option<Spelled<Duration>>,
    /// `Some(None)` is `idle = "off"`.
    idle: Option<Option<Spelled<Duration>>>,
    shutdown_delay: Option<Spelled<Duration>>,
    drain: Option<Spelled<Duration>>,
    revoke_grace: Option<Spelled<Duration>>,
    /// `Some(None)` is `listen = "off"`.
    admin: Option<Option<SocketAddr>>,
    json: Option<bool>,
    level: Option<String>,
    access_allow: Option<Vec<Spelled<IpNet>>>,
    access_endpoints: Option<Vec<String>>,
    access_max: Option<u32>,
    max_per_source: Option<u32>,
    routes: Vec<RouteModel>,
}

fn arb_model() -> impl Strategy<Value = Model> {
    let listen = (
        proptest::option::of(prop_oneof![
            arb_v4().prop_map(IpAddr::V4),
            arb_v6().prop_map(IpAddr::V6),
            Just(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        ]),
        proptest::option::of((1u16..=65535, 0u16..100, any::<bool>())),
    );
    let proxy = (
        any::<bool>(),
        proptest::option::of(prop::collection::vec(arb_cidr(), 0..3)),
        proptest::option::of(arb_duration(Duration::from_millis(1), true)),
    );
    let keepalive = (
        proptest::option::of(arb_duration(Duration::from_secs(1), false)),
        proptest::option::of(arb_duration(Duration::from_secs(1), false)),
        proptest::option::of(1u32..=127),
        proptest::option::of(arb_duration(Duration::from_secs(1), false)),
    );
    let timeouts = (
        proptest::option::of(arb_duration(Duration::from_millis(1), true)),
        proptest::option::of(proptest::option::of(arb_duration(Duration::from_millis(1), true))),
        proptest::option::of(arb_duration(Duration::ZERO, true)),
        proptest::option::of(arb_duration(Duration::ZERO, true)),
        proptest::option::of(arb_duration(Duration::ZERO, true)),
    );
    let admin_log = (
        proptest::option::of(proptest::option::of(prop_oneof![
            (arb_v4(), any::<u16>()).prop_map(|(a, p)| SocketAddr::from((a, p))),
            (arb_v6(), any::<u16>()).prop_map(|(a, p)| SocketAddr::from((a, p))),
        ])),
        proptest::option::of(any::<bool>()),
        proptest::option::of(select(vec![
            "info",
            "debug",
            "warn",
            "error",
            "trace",
            "off",
            "portgate=debug,info",
        ])),
    );
    let access = (
        proptest::option::of(prop::collection::vec(arb_cidr(), 1..4)),
        proptest::option::of(prop::collection::vec(arb_vpce(), 0..3)),
        proptest::option::of(prop_oneof![Just(0u32), 1u32..100, Just(u32::MAX)]),
        proptest::option::of(prop_oneof![Just(0u32), 1u32..100, Just(u32::MAX)]),
    );
    let routes = prop::collection::vec(arb_route(), 0..8);
    (listen, proxy, keepalive, timeouts, admin_log, access, routes).prop_map(
        |(
            (address, ports),
            (required, trusted, header_timeout),
            (ka_time, ka_interval, retries, limit),
            (connect, idle, shutdown_delay, drain, revoke_grace),
            (admin, json, level),
            (access_allow, access_endpoints, access_max, max_per_source),
            routes,
        )| {
            let ports = ports.map(|(first, span, as_number)| {
                let last = first.saturating_add(span);
                (first, last, as_number && first == last)
            });
            let mut m = Model {
                address,
                ports,
                required,
                trusted,
                header_timeout,
                ka_time,
                ka_interval,
                retries,
                limit,
                connect,
                idle,
                shutdown_delay,
                drain,
                revoke_grace,
                admin,
                json,
                level: level.map(str::to_owned),
                access_allow,
                access_endpoints,
                access_max,
                max_per_source,
                routes,
            };
            m.make_valid();
            m
        },
    )
}

impl Model {
    /// Adjust the random draw so that it satisfies every rule of `check`.
    fn make_valid(&mut self) {
        let effective_time = self.ka_time.as_ref().map_or(60, |d| d.value.as_secs());
        let effective_limit = self.limit.as_ref().map_or(350, |d| d.value.as_secs());
        if effective_time >= effective_limit {
            let secs = effective_time + 1 + effective_limit % 7;
            self.limit = Some(Spelled { text: format!("{secs}s"), value: Duration::from_secs(secs) });
        }
        if self.required {
            if self.trusted.as_ref().is_none_or(|t| t.is_empty()) {
                let net: IpNet = "10.0.0.0/16".parse().unwrap();
                self.trusted = Some(vec![Spelled { text: net.to_string(), value: net }]);
            }
        } else {
            self.access_endpoints = self.access_endpoints.take().map(|_| Vec::new());
        }

        let mut names = std::collections::HashSet::new();
        let mut keys = std::collections::HashSet::new();
        let ports = self.ports;
        let required = self.required;
        let access_allow = self.access_allow.is_some();
        self.routes.retain_mut(|r| {
            r.port = match ports {
                Some((first, last, _)) => first + r.port_offset % (last - first + 1),
                None => r.port_offset.max(1),
            };
            if !required {
                r.via = None;
                r.endpoints = r.endpoints.take().map(|_| Vec::new());
            }
            if r.allow.is_none() && !access_allow {
                let net: IpNet = "0.0.0.0/0".parse().unwrap();
                r.allow = Some(vec![Spelled { text: net.to_string(), value: net }]);
            }
            names.insert(r.name.clone()) && keys.insert((r.port, r.via.clone()))
        });
        // The admin port may not be one of the listener ports: turn admin off
        // when the generator made them clash.
        let admin_port = match self.admin {
            Some(Some(a)) => Some(a.port()),
            Some(None) => None,
            None => Some(14090),
        };
        if let Some(p) = admin_port.filter(|&p| p != 0) {
            let in_range = ports.is_some_and(|(first, last, _)| (first..=last).contains(&p));
            if in_range || self.routes.iter().any(|r| r.port == p) {
                self.admin = Some(None);
            }
        }
    }

    fn text(&self) -> String {
        let mut t = String::from("# generated by tests/config_props.rs\n");
        let line = |t: &mut String, key: &str, value: String| t.push_str(&format!("{key} = {value}\n"));
        let dur = |d: &Option<Spelled<Duration>>| d.as_ref().map(|d| toml_str(&d.text, false));

        // A dotted key at the top, before any table header, is [admin] too.
        if self.admin == Some(None) {
            t.push_str("admin.listen = \"off\"\n\n");
        }
        t.push_str("[listen]\n");
        if let Some(a) = self.address {
            line(&mut t, "address", toml_str(&a.to_string(), true));
        }
        if let Some((first, last, as_number)) = self.ports {
            let v = if as_number {
                first.to_string()
            } else if first == last {
                toml_str(&first.to_string(), false)
            } else {
                toml_str(&format!("{first}-{last}"), false)
            };
            line(&mut t, "ports", v);
        }

        t.push_str("\n[proxy_protocol]\n");
        line(&mut t, "mode", toml_str(if self.required { "required" } else { "off" }, false));
        if let Some(list) = &self.trusted {
            line(&mut t, "trusted", cidr_list(list, false));
        }
        if let Some(v) = dur(&self.header_timeout) {
            line(&mut t, "header_timeout", v);
        }

        t.push_str("\n[keepalive]\n");
        for (key, d) in
            [("time", &self.ka_time), ("interval", &self.ka_interval), ("idle_timeout_limit", &self.limit)]
        {
            if let Some(v) = dur(d) {
                line(&mut t, key, v);
            }
        }
        if let Some(r) = self.retries {
            line(&mut t, "retries", r.to_string());
        }

        t.push_str("\n[timeouts]\n");
        for (key, d) in [
            ("connect", &self.connect),
            ("shutdown_delay", &self.shutdown_delay),
            ("drain", &self.drain),
            ("revoke_grace", &self.revoke_grace),
        ] {
            if let Some(v) = dur(d) {
                line(&mut t, key, v);
            }
        }
        match &self.idle {
            None => {}
            Some(None) => line(&mut t, "idle", toml_str("off", true)),
            Some(d) => line(&mut t, "idle", dur(d).unwrap()),
        }

        if let Some(Some(a)) = self.admin {
            t.push_str(&format!("\n[admin]\nlisten = {}\n", toml_str(&a.to_string(), false)));
        }

        t.push_str("\n[log]\n");
        if let Some(json) = self.json {
            line(&mut t, "format", toml_str(if json { "json" } else { "text" }, false));
        }
        if let Some(level) = &self.level {
            line(&mut t, "level", toml_str(level, true));
        }

        t.push_str("\n[access]\n");
        if let Some(list) = &self.access_allow {
            line(&mut t, "allow", cidr_list(list, true));
        }
        if let Some(list) = &self.access_endpoints {
            line(&mut t, "endpoints", str_list(list, false));
        }
        if let Some(n) = self.access_max {
            line(&mut t, "max_connections", n.to_string());
        }
        if let Some(n) = self.max_per_source {
            line(&mut t, "max_per_source", n.to_string());
        }

        for r in &self.routes {
            let lit = r.literal_strings;
            t.push_str("\n[[route]]\n");
            line(&mut t, "name", toml_str(&r.name, lit));
            line(&mut t, "port", r.port.to_string());
            line(&mut t, "target", toml_str(&r.target.text, lit));
            if let Some(v) = &r.via {
                line(&mut t, "via", toml_str(v, lit));
            }
            if let Some(v) = &r.tenant {
                line(&mut t, "tenant", toml_str(v, lit));
            }
            if let Some(list) = &r.allow {
                line(&mut t, "allow", cidr_list(list, lit));
            }
            if let Some(list) = &r.endpoints {
                line(&mut t, "endpoints", str_list(list, lit));
            }
            if let Some(n) = r.max_connections {
                line(&mut t, "max_connections", n.to_string());
            }
            if let Some(u) = &r.ssh_user {
                line(&mut t, "ssh_user", toml_str(u, lit));
            }
        }
        t
    }

    /// Compare the loaded config with what the model means.
    fn check(&self, cfg: &Config) -> Result<(), TestCaseError> {
        let d = |s: &Option<Spelled<Duration>>, default: u64| {
            s.as_ref().map_or(Duration::from_secs(default), |s| s.value)
        };
        let nets = |l: &[Spelled<IpNet>]| l.iter().map(|c| c.value).collect::<Vec<_>>();

        prop_assert_eq!(cfg.listen.address, self.address.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)));
        prop_assert_eq!(cfg.listen.ports.map(|p| (p.first, p.last)), self.ports.map(|(f, l, _)| (f, l)));
        let mode = if self.required { ProxyMode::Required } else { ProxyMode::Off };
        prop_assert_eq!(cfg.proxy_protocol.mode, mode);
        prop_assert_eq!(&cfg.proxy_protocol.trusted, &self.trusted.as_deref().map(nets).unwrap_or_default());
        prop_assert_eq!(cfg.proxy_protocol.header_timeout, d(&self.header_timeout, 5));
        prop_assert_eq!(cfg.keepalive.time, d(&self.ka_time, 60));
        prop_assert_eq!(cfg.keepalive.interval, d(&self.ka_interval, 15));
        prop_assert_eq!(cfg.keepalive.retries, self.retries.unwrap_or(4));
        prop_assert_eq!(cfg.keepalive.idle_timeout_limit, d(&self.limit, 350));
        prop_assert_eq!(cfg.timeouts.connect, d(&self.connect, 5));
        prop_assert_eq!(cfg.timeouts.idle, self.idle.clone().flatten().map(|s| s.value));
        prop_assert_eq!(cfg.timeouts.shutdown_delay, d(&self.shutdown_delay, 0));
        prop_assert_eq!(cfg.timeouts.drain, d(&self.drain, 30));
        prop_assert_eq!(cfg.timeouts.revoke_grace, d(&self.revoke_grace, 30));
        prop_assert_eq!(
            cfg.admin.listen,
            self.admin.unwrap_or(Some(SocketAddr::from(([127, 0, 0, 1], 14090))))
        );
        let format = if self.json == Some(true) { LogFormat::Json } else { LogFormat::Text };
        prop_assert_eq!(cfg.log.format, format);
        prop_assert_eq!(cfg.log.level.as_str(), self.level.as_deref().unwrap_or("info"));
        let access_allow = self.access_allow.as_deref().map(nets);
        prop_assert_eq!(&cfg.access.allow, &access_allow);
        let access_endpoints = self.access_endpoints.clone().unwrap_or_default();
        prop_assert_eq!(&cfg.access.endpoints, &access_endpoints);
        prop_assert_eq!(cfg.access.max_connections, self.access_max.unwrap_or(0));
        prop_assert_eq!(cfg.access.max_per_source, self.max_per_source.unwrap_or(0));

        prop_assert_eq!(cfg.routes.len(), self.routes.len());
        for w in cfg.routes.windows(2) {
            prop_assert!((w[0].port, &w[0].via) < (w[1].port, &w[1].via), "routes not sorted");
        }
        for m in &self.routes {
            let r = cfg.routes.iter().find(|r| r.name == m.name);
            let Some(r) = r else { return Err(TestCaseError::fail(format!("route {:?} missing", m.name))) };
            prop_assert_eq!(r.port, m.port);
            prop_assert_eq!(&r.via, &m.via);
            prop_assert_eq!(&r.target, &m.target.value);
            prop_assert_eq!(&r.tenant, m.tenant.as_ref().unwrap_or(&m.name));
            let allow = m.allow.as_deref().map(nets).or_else(|| access_allow.clone()).unwrap();
            prop_assert_eq!(&r.allow, &allow);
            prop_assert_eq!(&r.endpoints, m.endpoints.as_ref().unwrap_or(&access_endpoints));
            prop_assert_eq!(r.max_connections, m.max_connections.or(self.access_max).unwrap_or(0));
            prop_assert_eq!(&r.ssh_user, &m.ssh_user);
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn generated_configs_load_and_round_trip(model in arb_model()) {
        let dir = tempfile::tempdir().unwrap();
        let text = model.text();
        let cfg = match load_bytes(&dir.path().join("portgate.toml"), text.as_bytes()) {
            Ok(c) => c,
            Err(e) => return Err(TestCaseError::fail(format!("generated config rejected:\n{e}\n---\n{text}"))),
        };
        model.check(&cfg)?;
        check_round_trip(dir.path(), &cfg)?;
    }
}

// ---------------------------------------------------------------------------
// Include files that are not regular files
// ---------------------------------------------------------------------------

/// An `include` naming a FIFO (or a device, or a file on a hung mount) must
/// be a located problem, not a `check` that never returns or a SIGHUP reload
/// that wedges the signal loop. Found while fuzzing the loader: today
/// `raw::read_tree` opens and reads the path as is, and opening a FIFO blocks
/// until a writer appears.
#[test]
fn include_of_a_fifo_is_a_problem_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("routes.toml");
    let status = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let main = dir.path().join("portgate.toml");
    std::fs::write(&main, "include = [\"routes.toml\"]\n[access]\nallow = [\"10.0.0.0/8\"]\n").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // A thread left blocked in open(2) ends with the test process.
    std::thread::spawn(move || {
        let _ = tx.send(load(&main).map_err(|e| e.to_string()));
    });
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Err(e)) => assert!(e.contains("routes.toml"), "{e}"),
        Ok(Ok(_)) => panic!("a FIFO include was accepted"),
        Err(_) => panic!("load() still blocked on the FIFO include after 5 s"),
    }
}
