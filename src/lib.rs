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
//! The data path, in the order a connection meets it:
//! `listener` -> `session` (`header` -> `admission` -> `dial`) -> `forward`
//! -> `session/record` (counters and the log line).
//!
//! | module | owns |
//! | --- | --- |
//! | [`cli`] | the command line (clap): `run`, `check`, `routes`, `ssh-config`, `reload`, `sessions`, `close`, `upgrade`; `check`/`routes` output |
//! | [`config`] | loading, includes and validation of the TOML file; defaults; the config hash; `policy`: the admission decision the config makes (route, source, endpoint, window) and the `[[test]]` tables that assert it |
//! | `node` | the running node: startup and the event loop (signals, control requests); its steps `reload` and `shutdown` |
//! | `node::state` | the published snapshot and its protocol: generation, closing, readiness (a leaf) |
//! | `node::registry` | the running sessions: ids, live counts, close requests (a leaf) |
//! | `listener` | binding the port set, the accept loop, reconciling on reload |
//! | `session` | one connection: `header`, `admission`, `dial` (with its egress source), registration, forwarding, `record` |
//! | `forward` | two-way byte copy: one `half` per direction, splice `pipe`s, buffer `pool`s |
//! | `routes` | the `(port, via)` route table and per-route runtime state |
//! | `reason` | the label vocabulary: reject reasons, close reasons, connect error kinds |
//! | [`proxy_protocol`] | PROXY v1/v2 header parsing and encoding (pure, no I/O) |
//! | `sockopt` | keepalive, nodelay, user timeout; listener sockets; binding an egress source without a port |
//! | [`metrics`] | every Prometheus series and label |
//! | `http` | the HTTP/1.1 server (hyper) both HTTP surfaces share; the PROXY-header rewind |
//! | `admin` | the admin port's routes: `/metrics`, `/healthz`, `/readyz` |
//! | [`control`] | the control socket's routes (`/sessions`, `POST /reload`), its file, and the command-line client |
//! | [`logging`] | text/JSON logs through a bounded queue to a writer thread; `RUST_LOG` |
//! | `systemd` | sd_notify and the watchdog |
//! | [`sys`] | the system calls no crate wraps (the only `unsafe`) |
//! | [`upgrade`] | upgrade in place: the handover `wire` format, its `channel`, where frozen sessions are `handed` |
//! | [`ssh_config`] | rendering `ssh_config(5)` blocks |
//!
//! `main.rs` only parses arguments, calls into this crate and maps the result
//! to an exit code. Only what `main.rs`, the integration tests, the fuzz
//! targets and the benches need is public; everything else is `pub(crate)`.
//! System calls go through `rustix` and `socket2`; the few that neither
//! wraps (`IP_BIND_ADDRESS_NO_PORT`, glibc's `mallopt` and `malloc_trim`)
//! are in [`sys`], the one file holding `unsafe`.

mod admin;
pub mod cli;
pub mod config;
pub mod control;
mod forward;
mod http;
mod listener;
pub mod logging;
pub mod metrics;
mod node;
pub mod proxy_protocol;
mod reason;
mod routes;
mod session;
mod sockopt;
pub mod ssh_config;
pub mod sys;
mod systemd;
pub mod upgrade;

pub use node::{run, Signal, StartError};
