//! The default of every setting a config may leave out, in one place.
//!
//! SPEC.md gives these values. Validation falls back to them for a missing
//! key, and [`Config::with_defaults`] is built from them, so a config file
//! that sets nothing and `with_defaults` can never disagree.
//!
//! This module owns values only. It must not hold validation limits (those
//! are rules, kept with the checks in [`validate`](super::validate)) and must
//! not parse or check anything.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use super::{
    Access, Admin, Audit, Config, Control, Keepalive, Listen, Log, LogFormat, ProxyMode, ProxyProtocol,
    Timeouts, Upstream,
};

/// `listen.address`: every IPv4 address of the host, so the NLB can reach it
/// on whichever interface it uses.
pub const DEFAULT_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
/// `proxy_protocol.mode`: off, so a plain TCP client works without an NLB.
pub const DEFAULT_PROXY_MODE: ProxyMode = ProxyMode::Off;
/// `proxy_protocol.header_timeout`: a healthy NLB sends the header at once;
/// 5 s bounds how long a silent peer holds a connection.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// `keepalive.time` (TCP_KEEPIDLE): well below the NLB's 350 s idle timeout.
pub const DEFAULT_KEEPALIVE_TIME: Duration = Duration::from_secs(60);
/// `keepalive.interval` (TCP_KEEPINTVL): a lost probe is retried soon.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// `keepalive.retries` (TCP_KEEPCNT): a dead peer is given up after a minute
/// of unanswered probes (4 × 15 s).
pub const DEFAULT_KEEPALIVE_RETRIES: u32 = 4;
/// `keepalive.idle_timeout_limit`: the NLB's default TCP idle timeout.
pub const DEFAULT_IDLE_TIMEOUT_LIMIT: Duration = Duration::from_secs(350);
/// `timeouts.connect`: a target in the same VPC answers in milliseconds; 5 s
/// still rides out a lost SYN or two.
pub const DEFAULT_CONNECT: Duration = Duration::from_secs(5);
/// `timeouts.idle`: off, so a quiet but live session (an idle SSH shell) is
/// not cut; keepalive finds the dead ones.
pub const DEFAULT_IDLE: Option<Duration> = None;
/// `timeouts.shutdown_delay`: none; a node behind an NLB sets it long enough
/// for the health checks to mark it unhealthy.
pub const DEFAULT_SHUTDOWN_DELAY: Duration = Duration::ZERO;
/// `timeouts.drain`: room for short sessions to end by themselves.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);
/// `timeouts.revoke_grace`: a session a reload no longer admits gets as long
/// to finish as one that a shutdown drains.
pub const DEFAULT_REVOKE_GRACE: Duration = Duration::from_secs(30);
/// `timeouts.max_session`: off; a route's access window, keepalive and the
/// operator bound a session, not a clock, unless a config asks for one.
pub const DEFAULT_MAX_SESSION: Option<Duration> = None;
/// `admin.listen`: loopback only, so metrics are not exposed by default. Port
/// 14090: not 9090, the Prometheus server's own default (a node that runs a
/// Prometheus too would collide), and outside the 9100-9999 exporter range,
/// which the Prometheus project's "default port allocations" list has handed
/// out in full (README, "Admin port").
pub const DEFAULT_ADMIN_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 14090));
/// `log.format`: text, for a human reading the journal.
pub const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Text;
/// `log.level`: one line per session end and per rejection, no debug noise.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// `log.queue_lines`: a reload revoking thousands of sessions writes one line
/// each in a burst; 8192 lines (about 3 MiB at ~400 bytes a line) absorb it
/// while a healthy sink catches up.
pub const DEFAULT_LOG_QUEUE_LINES: usize = 8192;
/// `log.audit`: keep admitting when the log sink stalls (lines are dropped
/// and counted); `required` is the opt-in for a complete audit trail.
pub const DEFAULT_LOG_AUDIT: Audit = Audit::BestEffort;
/// The file name of the default control socket, in `$RUNTIME_DIRECTORY`.
pub const CONTROL_SOCKET_NAME: &str = "control.sock";
/// Where `portgate reload` looks last, when neither `--socket`, the config
/// nor `RUNTIME_DIRECTORY` names a socket: the shipped unit's
/// `RuntimeDirectory=portgate`.
pub const FALLBACK_CONTROL_SOCKET: &str = "/run/portgate/control.sock";

/// `control.socket`: `$RUNTIME_DIRECTORY/control.sock` when systemd set
/// `RUNTIME_DIRECTORY` (the first directory when it lists several), else
/// off, so a node started by hand opens no socket it was not asked for.
pub fn default_control_socket() -> Option<PathBuf> {
    let dirs = std::env::var_os("RUNTIME_DIRECTORY")?;
    let first =
        dirs.to_str().map_or(PathBuf::from(&dirs), |s| PathBuf::from(s.split(':').next().unwrap_or(s)));
    if first.as_os_str().is_empty() {
        return None;
    }
    Some(first.join(CONTROL_SOCKET_NAME))
}

/// `access.max_connections`: 0 = unlimited, the limit is opt-in.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 0;
/// `access.max_per_source`: 0 = unlimited, the limit is opt-in.
pub const DEFAULT_MAX_PER_SOURCE: u32 = 0;

impl Config {
    /// A config with every default and no routes (for tests and benches;
    /// a config without routes is valid, it just refuses everything).
    pub fn with_defaults(source: PathBuf) -> Config {
        Config {
            source,
            listen: Listen { address: DEFAULT_ADDRESS, ports: None },
            proxy_protocol: ProxyProtocol {
                mode: DEFAULT_PROXY_MODE,
                trusted: Vec::new(),
                header_timeout: DEFAULT_HEADER_TIMEOUT,
            },
            keepalive: Keepalive {
                time: DEFAULT_KEEPALIVE_TIME,
                interval: DEFAULT_KEEPALIVE_INTERVAL,
                retries: DEFAULT_KEEPALIVE_RETRIES,
                idle_timeout_limit: DEFAULT_IDLE_TIMEOUT_LIMIT,
            },
            timeouts: Timeouts {
                connect: DEFAULT_CONNECT,
                idle: DEFAULT_IDLE,
                shutdown_delay: DEFAULT_SHUTDOWN_DELAY,
                drain: DEFAULT_DRAIN,
                revoke_grace: DEFAULT_REVOKE_GRACE,
                max_session: DEFAULT_MAX_SESSION,
            },
            admin: Admin { listen: Some(DEFAULT_ADMIN_LISTEN) },
            log: Log {
                format: DEFAULT_LOG_FORMAT,
                level: DEFAULT_LOG_LEVEL.to_owned(),
                queue_lines: DEFAULT_LOG_QUEUE_LINES,
                audit: DEFAULT_LOG_AUDIT,
            },
            control: Control { socket: default_control_socket() },
            access: Access {
                allow: None,
                endpoints: Vec::new(),
                max_connections: DEFAULT_MAX_CONNECTIONS,
                max_per_source: DEFAULT_MAX_PER_SOURCE,
            },
            upstream: Upstream::default(),
            metrics: crate::config::MetricsSettings::default(),
            routes: Vec::new(),
            tests: Vec::new(),
        }
    }
}
