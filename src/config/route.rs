//! One validated `[[route]]` and where it forwards to.
//!
//! This module owns the route types only; validation builds them
//! ([`validate`](super::validate)), the route table looks them up.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use serde::Serialize;

use super::units::{self, ser_opt_duration};
use super::Shared;

/// One `[[route]]`, with `[access]`, `[timeouts]` and `[upstream]` defaults
/// already applied.
///
/// The keys added after v1 (`not_before`, `not_after`, `max_session`,
/// `source`) are left out of the hash when not set, so configs that do not
/// use them kept their hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    /// Unique; the route's identity across a reload (its sessions and
    /// counters carry over by name), its metric and log label, and its ssh
    /// alias.
    pub name: Shared<str>,
    /// The listener port connections for this route arrive on.
    pub port: u16,
    /// With `via`, only connections through this VPC endpoint take the
    /// route, so one port can serve several endpoints; such a route wins
    /// over the port's route without `via`.
    pub via: Option<String>,
    /// Where admitted connections are forwarded.
    pub target: Target,
    /// Metric and log label grouping routes of one customer; the name when
    /// not set.
    pub tenant: Shared<str>,
    /// Effective source allowlist (never empty): a client outside it is
    /// refused before the target is dialed.
    pub allow: Shared<[IpNet]>,
    /// Effective endpoint allowlist; empty = any endpoint (or none).
    pub endpoints: Vec<String>,
    /// Concurrent sessions on this route, to protect the target; 0 =
    /// unlimited.
    pub max_connections: u32,
    /// Marks the route as SSH for `ssh-config`, and is the `User` it writes.
    pub ssh_user: Option<String>,
    /// The access window opens here (included): before it, connections are
    /// refused with `outside_window`. `None` = open since forever.
    #[serde(serialize_with = "units::ser_opt_time", skip_serializing_if = "Option::is_none")]
    pub not_before: Option<SystemTime>,
    /// The access window closes here (excluded): from this instant on,
    /// connections are refused with `outside_window`, and running sessions
    /// are closed (`close=expired`). Later than `not_before`.
    #[serde(serialize_with = "units::ser_opt_time", skip_serializing_if = "Option::is_none")]
    pub not_after: Option<SystemTime>,
    /// Effective longest session (`close=max_duration`): the route's own
    /// `max_session`, else `[timeouts] max_session`; `None` = no bound.
    #[serde(serialize_with = "ser_opt_duration", skip_serializing_if = "Option::is_none")]
    pub max_session: Option<Duration>,
    /// Effective egress source addresses (the route's own, else `[upstream]
    /// source`): a dial binds the one a stable hash of the client and
    /// endpoint picks among those of the target's family, so a tenant's
    /// sshd or fail2ban sees each operator as one address of its own.
    /// Empty = the kernel chooses.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source: Vec<IpAddr>,
}

/// Where a route forwards to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum Target {
    /// A literal address, dialed as is.
    Addr(SocketAddr),
    /// `host:port`, resolved at each connect, so a target whose address
    /// changes needs no reload.
    Name {
        /// A DNS name (never an IP literal).
        host: String,
        /// The target port, 1 to 65535.
        port: u16,
    },
}

impl Target {
    /// For an IP-literal target, whether it is IPv4; `None` for a name
    /// (its family is known only once it is resolved).
    pub fn is_ipv4(&self) -> Option<bool> {
        match self {
            Target::Addr(a) => Some(a.is_ipv4()),
            Target::Name { .. } => None,
        }
    }

    /// The port dialed, whichever form the target has.
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
