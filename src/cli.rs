//! The command line: `run`, `check`, `routes`, `ssh-config`, and the
//! control socket's `reload`, `sessions`, `close`.
//!
//! Parsing only; the commands' work lives in the library. Text rendered for
//! `check` and `routes` is built here from a validated config.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::SystemTime;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, units, Config, ProxyMode, Route};

/// TCP port-range forwarding proxy for private maintenance lines behind
/// AWS PrivateLink and a Network Load Balancer.
#[derive(Debug, Parser)]
#[command(name = "portgate", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Config file.
    #[arg(short, long, value_name = "PATH", default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve: bind the listeners and forward until SIGTERM.
    Run(ConfigArg),
    /// Validate the config and print a summary; exit 0 if valid, 1 if not.
    Check(ConfigArg),
    /// Print the effective route table.
    Routes(ConfigArg),
    /// Print an ssh_config(5) block per SSH route.
    SshConfig(SshConfigArgs),
    /// Ask the running node to reload its config (over the control socket);
    /// exit 0 once the new config serves, 1 with every problem on stderr.
    Reload(ReloadArgs),
    /// List the node's running sessions (over the control socket).
    Sessions(SessionsArgs),
    /// Close running sessions by id or by filter (over the control socket);
    /// prints what it closed.
    Close(CloseArgs),
    /// Upgrade the running node in place: the binary now installed where it
    /// was started from takes over every listener and session; exit 0 once
    /// it serves, 1 (the old process keeps serving) otherwise.
    Upgrade(ReloadArgs),
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub control: ControlArgs,
}

/// How the command line finds the control socket.
#[derive(Debug, Args)]
pub struct ControlArgs {
    /// Config file whose `[control] socket` names the socket (only that key
    /// is read).
    #[command(flatten)]
    pub config: ConfigArg,
    /// The control socket; wins over the config.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// Which sessions `sessions` and `close` select; all given must match.
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Only sessions of this route (by name).
    #[arg(long, value_name = "NAME")]
    pub route: Option<String>,
    /// Only sessions of this tenant.
    #[arg(long, value_name = "TENANT")]
    pub tenant: Option<String>,
    /// Only sessions from this client: an IP (any port) or IP:port.
    #[arg(long, value_name = "IP")]
    pub client: Option<String>,
}

#[derive(Debug, Args)]
pub struct SessionsArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Print the node's JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).multiple(true).args(["id", "route", "tenant", "client"])))]
pub struct CloseArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// The session id (from `portgate sessions` or the `session opened` line).
    #[arg(value_name = "ID", conflicts_with_all = ["route", "tenant", "client"])]
    pub id: Option<String>,
    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(Debug, Args)]
pub struct SshConfigArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Host name operators connect to (the NLB or VPC endpoint DNS name).
    #[arg(long)]
    pub host: String,
    /// User for routes that set no `ssh_user`.
    #[arg(long)]
    pub user: Option<String>,
    /// IdentityFile to put in every block.
    #[arg(long, value_name = "FILE")]
    pub identity_file: Option<String>,
    /// Write to FILE (atomically: a temporary file renamed into place)
    /// instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// The summary `check` prints for a valid config.
pub fn check_summary(cfg: &Config) -> String {
    let mut s = String::new();
    let routed: std::collections::BTreeSet<u16> = cfg.routes.iter().map(|r| r.port).collect();
    let _ = writeln!(s, "{}: OK", cfg.source.display());
    let _ = writeln!(
        s,
        "  routes:    {} on {} port{}, {} tenant{}",
        cfg.routes.len(),
        routed.len(),
        if routed.len() == 1 { "" } else { "s" },
        cfg.tenants().len(),
        if cfg.tenants().len() == 1 { "" } else { "s" },
    );
    let listening = cfg.listen_ports();
    let _ = match cfg.listen.ports {
        Some(r) => writeln!(s, "  listen:    {} ports {} ({} bound)", cfg.listen.address, r, listening.len()),
        None => writeln!(s, "  listen:    {} on {} routed port(s)", cfg.listen.address, listening.len()),
    };
    let _ = match cfg.proxy_protocol.mode {
        ProxyMode::Off => writeln!(s, "  proxy:     off"),
        ProxyMode::Required => writeln!(
            s,
            "  proxy:     required from {}",
            cfg.proxy_protocol.trusted.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
        ),
    };
    let _ = writeln!(
        s,
        "  keepalive: {} + {} x {} (NLB idle timeout {})",
        config::fmt_duration(cfg.keepalive.time),
        config::fmt_duration(cfg.keepalive.interval),
        cfg.keepalive.retries,
        config::fmt_duration(cfg.keepalive.idle_timeout_limit)
    );
    let _ = writeln!(s, "  admin:     {}", cfg.admin.listen.map_or("off".to_string(), |a| a.to_string()));
    let series = crate::metrics::series_count(cfg.routes.len(), cfg.metrics.histograms);
    let _ = writeln!(
        s,
        "  metrics:   {series} series ({} histograms)",
        match cfg.metrics.histograms {
            crate::config::Histograms::Route => "per-route",
            crate::config::Histograms::Node => "node-wide",
        }
    );
    let n = cfg.tests.len();
    let _ = writeln!(s, "  tests:     {n} test{} passed", if n == 1 { "" } else { "s" });
    let _ = writeln!(s, "  hash:      {}", cfg.hash());
    s
}

/// Findings in a valid config that `check` prints as `warning: ...` lines:
/// a route whose access window has already ended at `now` (a stale grant:
/// it refuses everyone, and should be removed).
pub fn check_warnings(cfg: &Config, now: SystemTime) -> Vec<String> {
    let mut w: Vec<String> = crate::config::policy::ended_windows(cfg, now)
        .into_iter()
        .map(|r| {
            let ended = r.not_after.map(units::fmt_rfc3339).unwrap_or_default();
            format!(
                "warning: route {:?} (port {}): access window ended at {ended} (not_after); it refuses every connection, remove the route or move not_after",
                r.name, r.port
            )
        })
        .collect();
    w.extend(series_warning(cfg));
    w
}

/// A route's access window for `routes`: `FROM..UNTIL`, an open end left
/// empty; `-` without one.
fn window(r: &Route) -> String {
    let end = |t: Option<SystemTime>| t.map(units::fmt_rfc3339).unwrap_or_default();
    match (r.not_before, r.not_after) {
        (None, None) => "-".into(),
        (nb, na) => format!("{}..{}", end(nb), end(na)),
    }
}

/// Above this many series a scrape gets heavy for any Prometheus.
pub const SERIES_WARN: usize = 100_000;

/// The warning for a config whose metrics would be heavy to scrape.
fn series_warning(cfg: &Config) -> Option<String> {
    let series = crate::metrics::series_count(cfg.routes.len(), cfg.metrics.histograms);
    if series <= SERIES_WARN {
        return None;
    }
    Some(if cfg.metrics.histograms == crate::config::Histograms::Route {
        format!(
            "warning: {series} metric series, above {SERIES_WARN}: most are the two per-route histograms; \
             set [metrics] histograms = \"node\" to export {} instead",
            crate::metrics::series_count(cfg.routes.len(), crate::config::Histograms::Node)
        )
    } else {
        format!("warning: {series} metric series, above {SERIES_WARN} (per-route counters and gauges)")
    })
}

/// The table `routes` prints.
pub fn routes_table(cfg: &Config) -> String {
    let headers = [
        "PORT",
        "VIA",
        "NAME",
        "TENANT",
        "TARGET",
        "ALLOW",
        "ENDPOINTS",
        "MAX",
        "WINDOW",
        "MAX_SESSION",
        "SOURCE",
    ];
    let rows: Vec<[String; 11]> = cfg
        .routes
        .iter()
        .map(|r| {
            [
                r.port.to_string(),
                r.via.clone().unwrap_or_else(|| "-".into()),
                r.name.to_string(),
                r.tenant.to_string(),
                r.target.to_string(),
                r.allow.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(","),
                if r.endpoints.is_empty() { "*".into() } else { r.endpoints.join(",") },
                if r.max_connections == 0 { "-".into() } else { r.max_connections.to_string() },
                window(r),
                r.max_session.map_or_else(|| "-".into(), |d| humantime::format_duration(d).to_string()),
                if r.source.is_empty() {
                    "-".into()
                } else {
                    r.source.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",")
                },
            ]
        })
        .collect();
    let mut widths = headers.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut out, &headers);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&mut out, &cells);
    }
    out
}
