//! Configuration: the validated, effective settings portgate runs with.
//!
//! Loading happens in two stages, so that nothing is bound or changed until a
//! file is known to be good, and a third that only moves memory:
//!
//! 1. [`raw`] mirrors the TOML with serde (`deny_unknown_fields`, spans kept
//!    for every value that validation may reject) and reads `include` files.
//! 2. [`validate`] turns the raw tree into a [`Config`], collecting *every*
//!    problem with its `FILE:LINE:COL` (or the routes involved) instead of
//!    stopping at the first. A key left out takes its value from
//!    [`defaults`], the one place defaults are written.
//! 3. Once the raw tree is dropped, [`pack`] lays the routes out afresh,
//!    so a large config does not keep the tree's freed pages resident.
//!
//! [`render`] writes a [`Config`] back out as the TOML that loads to it.
//!
//! This module owns the validated types and the canonical hash. It must not
//! bind sockets or touch global state (beyond giving free heap pages back):
//! `check`, `routes`, `ssh-config` and a SIGHUP reload all call [`load`] off
//! to the side.

pub(crate) mod defaults;
mod metrics;
mod pack;
pub(crate) mod policy;
mod problem;
pub(crate) mod raw;
pub mod render;
mod route;
mod shared;
pub mod units;
pub(crate) mod validate;

pub use metrics::{Histograms, MetricsSettings};
pub use policy::{Expect, PolicyTest};
pub use problem::{ConfigError, Problem};
pub use route::{Route, Target};
pub use shared::Shared;
pub use units::fmt_duration;
use units::{ser_duration, ser_opt_duration};

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use serde::Serialize;

/// Default config path for `run`, `check`, `routes` and `ssh-config`.
pub const DEFAULT_PATH: &str = "/etc/portgate/portgate.toml";

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The main file this config was loaded from: a SIGHUP reload reads it
    /// again, and output names it. Not part of the hash, so the same config
    /// at another path is the same config.
    pub source: PathBuf,
    /// Which ports are bound, on which address.
    pub listen: Listen,
    /// Whether connections must start with a PROXY header, and from whom.
    pub proxy_protocol: ProxyProtocol,
    /// Keeps idle sessions alive through the NLB and finds dead peers.
    pub keepalive: Keepalive,
    /// Bounds on dialing, idleness, shutdown and revocation after a reload.
    pub timeouts: Timeouts,
    /// Where the metrics and health endpoints listen.
    pub admin: Admin,
    /// How log lines look and how many there are.
    pub log: Log,
    /// Where the local control socket (`POST /reload`, `portgate reload`)
    /// listens, if anywhere.
    pub control: Control,
    /// The `[access]` section as written. Routes already carry the values
    /// they inherit from it; only `max_per_source` is read from here.
    pub access: Access,
    /// The `[upstream]` section as written. Routes already carry the
    /// source list they inherit from it.
    pub upstream: Upstream,
    /// `[metrics]`: per-route or node-wide histograms.
    pub metrics: MetricsSettings,
    /// Every route, sorted by `(port, via)`; the routing key is unique.
    /// `Arc` so the route table and the sessions of a route share one copy
    /// that outlives a reload.
    pub routes: Vec<Arc<Route>>,
    /// Every `[[test]]`, in file order (main file first). [`load`] has run
    /// them all and refused the config if one failed; they are kept for
    /// `check`'s count and for [`render`]. Not part of the hash: they
    /// change what is checked, not what is served.
    pub tests: Vec<PolicyTest>,
}

/// `[listen]`: where the listeners are bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listen {
    /// Listening address for every port; `::` binds dual stack.
    pub address: IpAddr,
    /// The NLB listener range, inclusive. When set, every port in it is
    /// bound, so a route added or removed inside it is a map change only and
    /// a health check on any port of the range succeeds; routes must lie
    /// inside it. `None`: exactly the ports that routes name are bound.
    pub ports: Option<PortRange>,
}

/// An inclusive port range such as `8000-8049` (a single port is `8022`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortRange {
    /// The lowest port of the range, included.
    pub first: u16,
    /// The highest port of the range, included; never below `first`.
    pub last: u16,
}

impl PortRange {
    /// Whether `port` lies in the range, ends included.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
    /// Every port of the range, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = u16> {
        self.first..=self.last
    }
    /// How many ports the range holds (at least one).
    pub fn len(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }
    /// Never: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// `[proxy_protocol]`: behind an NLB the socket peer is the NLB; the PROXY
/// header carries the real client address and the VPC endpoint id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProxyProtocol {
    /// Whether every connection must begin with a PROXY header.
    pub mode: ProxyMode,
    /// Socket peers allowed to send a PROXY header (the NLB's subnets), so
    /// no one else can claim a client address or an endpoint; a connection
    /// from any other peer is refused in `required` mode.
    pub trusted: Vec<IpNet>,
    /// A peer that has not sent a complete header by then is dropped, so a
    /// silent peer cannot hold a connection. Also bounds the wait that tells
    /// a health-check probe from a refused client.
    #[serde(serialize_with = "ser_duration")]
    pub header_timeout: Duration,
}

/// `proxy_protocol.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    /// No header is read: the socket peer is the client, and there is no
    /// endpoint id (so no route may use `via` or `endpoints`).
    Off,
    /// Every connection must begin with a PROXY v1 or v2 header from a
    /// `trusted` peer, or it is refused.
    Required,
}

/// `[keepalive]`: TCP keepalive on both sockets of every session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Keepalive {
    /// TCP_KEEPIDLE: idle time before the first probe; below
    /// `idle_timeout_limit` so the NLB never sees an idle session for long
    /// enough to drop it.
    #[serde(serialize_with = "ser_duration")]
    pub time: Duration,
    /// TCP_KEEPINTVL: time between unanswered probes.
    #[serde(serialize_with = "ser_duration")]
    pub interval: Duration,
    /// TCP_KEEPCNT: unanswered probes before the peer is declared dead.
    /// `time + interval * retries` is also the TCP_USER_TIMEOUT, so unacked
    /// data gives up as soon as keepalive would.
    pub retries: u32,
    /// The NLB listener's idle timeout; `time` is below it, and `ssh-config`
    /// keeps `ServerAliveInterval` below it.
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout_limit: Duration,
}

/// `[timeouts]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Timeouts {
    /// Longest wait for a target to accept, so a dead target closes the
    /// client promptly instead of after the kernel's SYN retries.
    #[serde(serialize_with = "ser_duration")]
    pub connect: Duration,
    /// A session with no bytes either way for this long is closed, to free
    /// the slot and sockets of a session nobody uses. `None` = off.
    #[serde(serialize_with = "ser_opt_duration")]
    pub idle: Option<Duration>,
    /// After SIGTERM, readiness fails but listeners still accept for this
    /// long, so the NLB's health checks take the node out of rotation before
    /// any connection is refused.
    #[serde(serialize_with = "ser_duration")]
    pub shutdown_delay: Duration,
    /// After the listeners close, sessions get this long to end by
    /// themselves before they are closed.
    #[serde(serialize_with = "ser_duration")]
    pub drain: Duration,
    /// After a reload, a session the new config would refuse is closed after
    /// this long, so its user can finish instead of being cut off at once.
    #[serde(serialize_with = "ser_duration")]
    pub revoke_grace: Duration,
    /// The longest a session may last, for routes that do not set their own
    /// (`None` = "off"). Routes carry the effective value; this is the
    /// default as written. Not hashed when off, so adding the key changed no
    /// existing hash.
    #[serde(serialize_with = "ser_opt_duration", skip_serializing_if = "Option::is_none")]
    pub max_session: Option<Duration>,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Admin {
    /// Where `/metrics`, `/healthz` and `/readyz` are served, for Prometheus
    /// and health checks; never a port a route listener takes. `None` =
    /// "off".
    pub listen: Option<SocketAddr>,
}

/// `[control]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    /// The Unix socket the control verbs are served on (HTTP/1.1, mode
    /// 0600), already resolved against the config file's directory; `None`
    /// = "off". A reload cannot change it (it needs a restart). Not part of
    /// [`Config::hash`]: like `source`, it is a local file path, and its
    /// default depends on the environment (`RUNTIME_DIRECTORY`), so two
    /// nodes running the same file must not hash differently because of it.
    pub socket: Option<PathBuf>,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Log {
    /// How each line is written; a reload cannot change it (the logger is
    /// set up once at start).
    pub format: LogFormat,
    /// A tracing filter directive such as `info` or `portgate=debug`;
    /// a reload applies it, unless `RUST_LOG` set the level at start.
    pub level: String,
    /// How many lines may wait for the log writer; beyond it lines are
    /// dropped and counted, so a stalled sink never stalls the node. Not
    /// hashed at its default, so adding the key changed no existing hash.
    #[serde(skip_serializing_if = "is_default_queue_lines")]
    pub queue_lines: usize,
    /// Whether admission stops while lines cannot be recorded. Not hashed
    /// at its default (see `queue_lines`).
    #[serde(skip_serializing_if = "is_default_audit")]
    pub audit: Audit,
}

fn is_default_queue_lines(n: &usize) -> bool {
    *n == defaults::DEFAULT_LOG_QUEUE_LINES
}

fn is_default_audit(a: &Audit) -> bool {
    *a == defaults::DEFAULT_LOG_AUDIT
}

/// `log.audit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Audit {
    /// Keep admitting while lines are dropped (they are counted).
    BestEffort,
    /// Refuse new connections (`audit_unavailable`) while the queue is full,
    /// so no session goes unrecorded; running sessions are untouched.
    Required,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Plain lines, for a human reading the journal.
    Text,
    /// One JSON object per line, for a log pipeline.
    Json,
}

/// `[access]`: defaults that routes inherit unless they set their own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Access {
    /// Source CIDRs for routes without their own `allow`. `None` means no
    /// default: then every route must set `allow`, or the config is refused
    /// (fail closed).
    pub allow: Option<Vec<IpNet>>,
    /// VPC endpoint ids for routes without their own `endpoints`; empty =
    /// any endpoint (or none).
    pub endpoints: Vec<String>,
    /// Concurrent sessions per route for routes without their own limit;
    /// 0 = unlimited.
    pub max_connections: u32,
    /// Concurrent sessions one client address may hold across all routes,
    /// so one client cannot take every slot; 0 = unlimited.
    pub max_per_source: u32,
}

/// `[upstream]`: how targets are dialed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upstream {
    /// Local addresses to dial targets from, for routes without their own
    /// `source`; empty = let the kernel choose (the node's primary address).
    /// Never empty when written: `source = []` is refused.
    pub source: Vec<IpAddr>,
}

impl Config {
    /// The ports to listen on: the whole `listen.ports` range when set, else
    /// exactly the ports that routes name. Sorted, unique.
    pub fn listen_ports(&self) -> Vec<u16> {
        match self.listen.ports {
            Some(range) => range.iter().collect(),
            None => {
                let mut ports: Vec<u16> = self.routes.iter().map(|r| r.port).collect();
                ports.dedup();
                ports
            }
        }
    }

    /// Every distinct egress source address of every route, for the start
    /// and reload check that each can be bound on this host.
    pub fn source_addresses(&self) -> Vec<IpAddr> {
        let mut all: Vec<IpAddr> = self.routes.iter().flat_map(|r| r.source.iter().copied()).collect();
        all.extend(self.upstream.source.iter().copied());
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Distinct tenant labels, sorted.
    pub fn tenants(&self) -> Vec<&str> {
        let mut t: Vec<&str> = self.routes.iter().map(|r| r.tenant.as_str()).collect();
        t.sort_unstable();
        t.dedup();
        t
    }

    /// sha256 (hex) over a canonical form of the effective config: includes
    /// resolved, defaults filled, routes sorted by port then via, durations in
    /// nanoseconds. Comments, whitespace, key order, the spelling of a
    /// duration and file paths do not change it.
    pub fn hash(&self) -> String {
        use sha2::{Digest, Sha256};
        #[derive(Serialize)]
        struct Canonical<'a> {
            listen: &'a Listen,
            proxy_protocol: &'a ProxyProtocol,
            keepalive: &'a Keepalive,
            timeouts: &'a Timeouts,
            admin: &'a Admin,
            log: &'a Log,
            max_per_source: u32,
            routes: Vec<&'a Route>,
        }
        // `source` and `control.socket` are left out: local paths, the
        // latter with an environment-dependent default (see `Control`).
        let mut routes: Vec<&Route> = self.routes.iter().map(|r| r.as_ref()).collect();
        routes.sort_by(|a, b| (a.port, &a.via).cmp(&(b.port, &b.via)));
        let canonical = Canonical {
            listen: &self.listen,
            proxy_protocol: &self.proxy_protocol,
            keepalive: &self.keepalive,
            timeouts: &self.timeouts,
            admin: &self.admin,
            log: &self.log,
            // Route-level settings already carry the inherited [access] values.
            max_per_source: self.access.max_per_source,
            routes,
        };
        // Serializing plain structs of strings and numbers cannot fail.
        let bytes = serde_json::to_vec(&canonical).unwrap_or_default();
        let digest = Sha256::digest(&bytes);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Load, include and validate the config at `path`, and run its
/// `[[test]]` tables (those without `at` are judged at the current time).
/// Binds nothing.
///
/// This is the one validation path: `check`, `run` and a reload all call
/// it, so they accept and refuse exactly the same files with the same
/// messages.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let tree = raw::read_tree(path)?;
    let mut config = validate::validate(path, &tree, SystemTime::now())?;
    drop(tree);
    // The tree is gone: lay the routes out again, away from its holes.
    config.routes = pack::relocate(std::mem::take(&mut config.routes));
    Ok(config)
}
