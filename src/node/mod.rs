//! The running node: startup, and the event loop over signals.
//!
//! [`run`] takes a validated [`Config`] and a stream of [`Signal`]s; the
//! caller decides where signals come from (`main.rs` wires SIGHUP, SIGTERM
//! and SIGINT; tests can send their own). The event loop also takes
//! [`NodeRequest`]s from the control socket, each with a oneshot reply; a
//! SIGHUP and a `POST /reload` run the same [`Node::reload`]. Startup checks
//! that every egress source address can be bound, claims the control socket
//! (so a second node on the same socket fails before binding anything), then
//! binds every listener and the admin port before telling systemd it is ready; any failure ends startup with an error and
//! nothing left listening.
//!
//! The node's steps live in files of their own and are methods of [`Node`]:
//! `reload.rs` (SIGHUP), `shutdown.rs` (SIGTERM), `upgrade.rs` (SIGUSR2:
//! hand everything to a new process) and `takeover.rs` (starting as that
//! new process). None calls another, and none is called from below:
//! listeners and sessions learn of a new config, the end of the drain or a
//! handover through [`state::NodeState`] and its registry only.

pub(crate) mod deadlines;
pub(crate) mod registry;
mod reload;
mod shutdown;
pub(crate) mod state;
mod takeover;
mod upgrade;

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admin::AdminServer;
use crate::config::Config;
use crate::control::{ControlServer, NodeRequest, UpgradeOutcome};
use crate::listener::{BindError, ListenerSet};
use crate::logging::LogControl;
use crate::metrics::Metrics;
use crate::node::state::NodeState;
use crate::sockopt::{self, SourceBindError};
use crate::systemd;

/// What the outside world asks of a running node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGHUP: re-read the config file.
    Reload,
    /// SIGTERM / SIGINT: drain and exit; a second one ends at once.
    Terminate,
    /// SIGUSR2: upgrade in place (hand everything to the binary installed
    /// where this one was started from).
    Upgrade,
}

/// A failure that stops the node from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot listen on admin address {addr}: {source}")]
    Admin { addr: std::net::SocketAddr, source: std::io::Error },
    /// The control socket could not be claimed (the message says why).
    #[error("{0}")]
    Control(String),
    /// Taking over from a running node failed; it keeps serving.
    #[error("upgrade: {0}")]
    Upgrade(String),
    /// An egress source address is not one of this host's.
    #[error(transparent)]
    Source(#[from] SourceBindError),
}

/// Queued control requests; each holds its client until answered.
const REQUEST_QUEUE: usize = 16;

/// The node while it runs: what its steps (reload, shutdown) work on.
struct Node {
    /// Shared with every listener, session and the admin server.
    state: Arc<NodeState>,
    /// The bound ports, reconciled by reload and closed by shutdown.
    listeners: ListenerSet,
    /// `None` when `[admin] listen = "off"`.
    admin: Option<AdminServer>,
    /// `None` when `[control] socket = "off"`; served until exit.
    control: Option<ControlServer>,
    /// The file a reload re-reads (the one the node was started with).
    config_path: PathBuf,
    /// Lets a reload change the log level and queue bound.
    log: LogControl,
    /// The binary an upgrade in place starts.
    exe: PathBuf,
    /// Closes sessions at their route's `not_after` and `max_session`.
    deadlines: deadlines::Deadlines,
}

impl Node {
    /// Claim the control socket, bind every listener and the admin port;
    /// start accepting.
    async fn start(
        config: Config,
        log: LogControl,
        requests: mpsc::Sender<NodeRequest>,
    ) -> Result<Node, StartError> {
        // Before anything is bound: a source this host does not have would
        // fail every dial of its routes.
        sockopt::check_sources(&config.source_addresses())?;
        let metrics = Arc::new(Metrics::new());
        let config_path = config.source.clone();
        let addr = config.listen.address;
        let ports = config.listen_ports();
        let admin_addr = config.admin.listen;
        let keepalive = config.keepalive.clone();
        let control_path = config.control.socket.clone();

        // Before any listener: two nodes must never share one socket.
        let claim = match &control_path {
            Some(p) => Some(ControlServer::claim(p).map_err(|e| StartError::Control(e.to_string()))?),
            None => None,
        };
        let mut listeners = ListenerSet::default();
        let bound = match listeners.bind_new(addr, &ports, &keepalive) {
            Ok(b) => b,
            Err(e) => {
                if let Some(c) = claim {
                    c.release();
                }
                return Err(e.into());
            }
        };
        // After the sockets, not before: the runtime's blocks for them are
        // cache-line aligned, which leaves small gaps in the heap, and the
        // routes' states and series are made now, into those gaps.
        let state = NodeState::new(config, metrics);
        let control = claim.map(|c| c.serve(Arc::clone(&state), requests));
        let admin = match admin_addr {
            Some(a) => match AdminServer::bind(a, Arc::clone(&state)) {
                Ok(s) => Some(s),
                Err(source) => {
                    return Err(close_control(control, StartError::Admin { addr: a, source }).await)
                }
            },
            None => None,
        };
        listeners.commit(bound, &ports, &keepalive, &state).await;
        state.set_ready(true);
        // The config's parse tree is freed by now: give its pages back.
        crate::sys::trim_heap();
        let snap = state.snapshot();
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            address = %addr,
            listeners = ports.len(),
            routes = snap.table.len(),
            admin = %admin_addr.map_or("off".to_string(), |a| a.to_string()),
            control = %control_path.as_ref().map_or("off".to_string(), |p| p.display().to_string()),
            hash = %snap.hash,
            "portgate ready"
        );
        let exe = upgrade::installed_binary();
        let deadlines = deadlines::Deadlines::spawn(Arc::clone(&state));
        Ok(Node { state, listeners, admin, control, config_path, log, exe, deadlines })
    }

    /// One upgrade in place, answered to `reply` when asked over the
    /// control socket. Signals that arrive meanwhile wait in `signals`;
    /// once it failed, a SIGUSR2 among them is dropped with a warning and
    /// the rest are queued in `pending`. `Some` when handed over.
    async fn upgrade_step(
        &mut self,
        signals: &mut mpsc::Receiver<Signal>,
        pending: &mut VecDeque<Signal>,
        reply: Option<tokio::sync::oneshot::Sender<UpgradeOutcome>>,
    ) -> Option<upgrade::Handoff> {
        let outcome = self.upgrade().await;
        let answer = match &outcome {
            Ok(h) => Ok((h.pid, h.sessions)),
            Err(why) => {
                self.state.metrics.upgrades_failure.increment(1);
                tracing::error!(error = %why, "upgrade failed");
                Err(why.clone())
            }
        };
        if let Some(r) = reply {
            let _ = r.send(answer);
        }
        match outcome {
            Ok(h) => Some(h),
            Err(_) => {
                while let Ok(sig) = signals.try_recv() {
                    match sig {
                        Signal::Upgrade => tracing::warn!("ignoring SIGUSR2 that came during the upgrade"),
                        other => pending.push_back(other),
                    }
                }
                None
            }
        }
    }
}

/// What the event loop handles next.
enum Event {
    Signal(Option<Signal>),
    Request(NodeRequest),
}

/// A failed start leaves no socket file behind.
async fn close_control(control: Option<ControlServer>, e: StartError) -> StartError {
    if let Some(c) = control {
        c.close().await;
    }
    e
}

/// Serve `config` until a [`Signal::Terminate`] (or the end of `signals`),
/// then drain and return; or, after a [`Signal::Upgrade`] that handed
/// everything to a new process, return at once. With `handover`, start as
/// the successor of the node on the other end of that channel.
pub async fn run(
    config: Config,
    log: LogControl,
    mut signals: mpsc::Receiver<Signal>,
    handover: Option<OwnedFd>,
) -> Result<(), StartError> {
    let (request_tx, mut requests) = mpsc::channel(REQUEST_QUEUE);
    let mut node = match handover {
        Some(fd) => Node::take_over(config, log, request_tx, fd).await?,
        None => Node::start(config, log, request_tx).await?,
    };
    let state = Arc::clone(&node.state);
    systemd::notify_ready(&state.status_line());
    let background = CancellationToken::new();
    let status = Arc::clone(&state);
    systemd::spawn_watchdog(move || status.status_line(), background.clone());

    let mut pending = VecDeque::new();
    let handed = loop {
        let event = match pending.pop_front() {
            Some(sig) => Event::Signal(Some(sig)),
            None => tokio::select! {
                sig = signals.recv() => Event::Signal(sig),
                // Disabled once no sender is left (control socket off).
                Some(req) = requests.recv() => Event::Request(req),
            },
        };
        match event {
            Event::Signal(Some(Signal::Reload)) => {
                node.reload().await;
            }
            Event::Signal(Some(Signal::Upgrade)) => {
                if let Some(h) = node.upgrade_step(&mut signals, &mut pending, None).await {
                    break Some(h);
                }
            }
            Event::Signal(Some(Signal::Terminate) | None) => break None,
            Event::Request(NodeRequest::Reload(reply)) => {
                let outcome = node.reload().await;
                let _ = reply.send(outcome);
            }
            Event::Request(NodeRequest::Upgrade(reply)) => {
                if let Some(h) = node.upgrade_step(&mut signals, &mut pending, Some(reply)).await {
                    break Some(h);
                }
            }
        }
    };
    // Control requests from now on are answered "shutting down" (their
    // replies are dropped); the socket itself serves through the drain.
    drop(requests);
    if let Some(h) = handed {
        // The successor holds its own copies of every socket: closing ours
        // here ends nothing. The control socket file is the successor's now.
        background.cancel();
        if let Some(admin) = node.admin.take() {
            admin.close().await;
        }
        if let Some(control) = node.control.take() {
            control.hand_off().await;
        }
        tracing::info!(pid = h.pid, sessions = h.sessions, "handed over to the new process; exiting");
        return Ok(());
    }
    node.shutdown(&mut signals).await;
    background.cancel();
    if let Some(admin) = node.admin.take() {
        admin.close().await;
    }
    if let Some(control) = node.control.take() {
        control.close().await;
    }
    Ok(())
}
