//! Configuration: the validated, effective settings portgate runs with.
//!
//! Loading happens in two stages, so that nothing is bound or changed until a
//! file is known to be good:
//!
//! 1. [`raw`] mirrors the TOML with serde (`deny_unknown_fields`, spans kept
//!    for every value that validation may reject) and reads `include` files.
//! 2. [`validate`] turns the raw tree into a [`Config`], collecting *every*
//!    problem with its `FILE:LINE:COL` (or the routes involved) instead of
//!    stopping at the first. A key left out takes its value from
//!    [`defaults`], the one place defaults are written.
//!
//! This module owns the validated types and the canonical hash. It must not
//! bind sockets or touch global state: `check`, `routes`, `ssh-config` and a
//! SIGHUP reload all call [`load`] off to the side.

pub mod defaults;
pub mod raw;
pub mod render;
pub mod validate;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;

/// Default config path for `run`, `check`, `routes` and `ssh-config`.
pub const DEFAULT_PATH: &str = "/etc/portgate/portgate.toml";

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The main file this config was loaded from (not part of the hash).
    pub source: PathBuf,
    pub listen: Listen,
    pub proxy_protocol: ProxyProtocol,
    pub keepalive: Keepalive,
    pub timeouts: Timeouts,
    pub admin: Admin,
    pub log: Log,
    pub access: Access,
    /// Every route, sorted by `(port, via)`; the routing key is unique.
    pub routes: Vec<Arc<Route>>,
}

/// `[listen]`: where the listeners are bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listen {
    /// Listening address for every port; `::` binds dual stack.
    pub address: IpAddr,
    /// The NLB listener range, inclusive. When set, every port in it is bound.
    pub ports: Option<PortRange>,
}

/// An inclusive port range such as `8000-8049` (a single port is `8022`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
    pub fn iter(&self) -> impl Iterator<Item = u16> {
        self.first..=self.last
    }
    pub fn len(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }
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

/// `[proxy_protocol]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProxyProtocol {
    pub mode: ProxyMode,
    /// Socket peers allowed to send a PROXY header (the NLB's subnets).
    pub trusted: Vec<IpNet>,
    /// A peer that has not sent a complete header by then is dropped.
    #[serde(serialize_with = "ser_duration")]
    pub header_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    Off,
    Required,
}

/// `[keepalive]`: TCP keepalive on both sockets of every session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Keepalive {
    /// TCP_KEEPIDLE.
    #[serde(serialize_with = "ser_duration")]
    pub time: Duration,
    /// TCP_KEEPINTVL.
    #[serde(serialize_with = "ser_duration")]
    pub interval: Duration,
    /// TCP_KEEPCNT.
    pub retries: u32,
    /// The NLB listener's idle timeout; `time` is below it.
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout_limit: Duration,
}

/// `[timeouts]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Timeouts {
    #[serde(serialize_with = "ser_duration")]
    pub connect: Duration,
    /// `None` = off.
    #[serde(serialize_with = "ser_opt_duration")]
    pub idle: Option<Duration>,
    #[serde(serialize_with = "ser_duration")]
    pub shutdown_delay: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub drain: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub revoke_grace: Duration,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Admin {
    /// `None` = "off".
    pub listen: Option<SocketAddr>,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Log {
    pub format: LogFormat,
    /// A tracing filter directive such as `info` or `portgate=debug`.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `[access]`: defaults that routes inherit unless they set their own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Access {
    pub allow: Option<Vec<IpNet>>,
    pub endpoints: Vec<String>,
    pub max_connections: u32,
    /// Concurrent sessions one client address may hold; 0 = unlimited.
    pub max_per_source: u32,
}

/// One `[[route]]`, with `[access]` defaults already applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    pub name: String,
    pub port: u16,
    pub via: Option<String>,
    pub target: Target,
    pub tenant: String,
    /// Effective source allowlist (never empty).
    pub allow: Vec<IpNet>,
    /// Effective endpoint allowlist; empty = any endpoint (or none).
    pub endpoints: Vec<String>,
    /// 0 = unlimited.
    pub max_connections: u32,
    pub ssh_user: Option<String>,
}

/// Where a route forwards to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum Target {
    /// A literal address, dialed as is.
    Addr(SocketAddr),
    /// `host:port`, resolved at each connect.
    Name { host: String, port: u16 },
}

impl Target {
    pub fn port(&self) -> u16 {
        match self {
            Target::Addr(a) => a.port(),
            Target::Name { port, .. } => *port,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
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

/// A duration as a config would write it: `"350s"`, `"1500ms"`.
pub fn fmt_duration(d: Duration) -> String {
    let nanos = d.subsec_nanos();
    if nanos == 0 {
        format!("{}s", d.as_secs())
    } else if nanos % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else if nanos % 1_000 == 0 {
        format!("{}us", d.as_micros())
    } else {
        format!("{}ns", d.as_nanos())
    }
}

// Nanoseconds: every distinct duration hashes differently.
fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u128(d.as_nanos())
}

fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_nanos()),
        None => s.serialize_none(),
    }
}

/// One problem found in a config, already located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `FILE:LINE:COL` where known, else `FILE` (or empty for problems
    /// between routes, which name the routes in the message).
    pub location: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.location.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.location, self.message)
        }
    }
}

/// Every problem found while loading a config; displayed one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Load, include and validate the config at `path`. Binds nothing.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let tree = raw::read_tree(path)?;
    validate::validate(path, &tree)
}
