//! portgate: a TCP port-range forwarding proxy for private maintenance lines
//! (SSH, RDP, database consoles) behind AWS PrivateLink and a Network Load
//! Balancer.
//!
//! One fleet of identical nodes listens on the NLB's whole listener range,
//! maps each `(port, VPC endpoint)` to a tenant `IP:port`, admits only allowed
//! sources, keeps sessions alive under the NLB's idle timeout, reloads its map
//! on SIGHUP without dropping a session, and drains on SIGTERM.
//!
//! # Layout
//!
//! | module | owns |
//! | --- | --- |
//! | [`cli`] | the command line (clap): `run`, `check`, `routes`, `ssh-config` |
//! | [`config`] | loading, includes and validation of the TOML file; the config hash |
//! | [`routes`] | the `(port, via)` route table and admission checks |
//! | [`proxy_protocol`] | PROXY v1/v2 header parsing (pure, no I/O) |
//! | [`server`] | shared state, startup, the signal loop |
//! | [`listener`] | binding the port set, the accept loop, reconciling on reload |
//! | [`session`] | one connection: header, admission, dial, forward, log line |
//! | [`forward`] | two-way byte copy with half-close, reset and idle timeout |
//! | [`sockopt`] | keepalive, nodelay, listener and dialer sockets |
//! | [`reload`] | SIGHUP: validate, diff, swap |
//! | [`shutdown`] | SIGTERM: unready, delay, close, drain, force |
//! | [`metrics`] | every Prometheus series and label |
//! | [`admin`] | `/metrics`, `/healthz`, `/readyz` |
//! | [`logging`] | text/JSON logs, `RUST_LOG` |
//! | [`systemd`] | sd_notify and the watchdog |
//! | [`ssh_config`] | rendering `ssh_config(5)` blocks |
//!
//! `main.rs` only parses arguments, calls into this crate and maps the result
//! to an exit code.

pub mod admin;
pub mod cli;
pub mod config;
pub mod forward;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod proxy_protocol;
pub mod reload;
pub mod routes;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod sockopt;
pub mod ssh_config;
pub mod systemd;

pub use server::{run, Signal};
