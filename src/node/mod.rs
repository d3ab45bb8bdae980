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
//! `reload.rs` (SIGHUP) and `shutdown.rs` (SIGTERM). Neither calls the other,
//! and neither is called from below: listeners and sessions learn of a new
//! config or of the end of the drain through [`state::NodeState`] only.

pub(crate) mod registry;
mod reload;
mod shutdown;
pub(crate) mod state;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admin::AdminServer;
use crate::config::Config;
use crate::control::{ControlServer, NodeRequest};
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
        let state = NodeState::new(config, metrics);

        // Before any listener: two nodes must never share one socket.
        let control = match &control_path {
            Some(p) => Some(
                ControlServer::bind(p, Arc::clone(&state), requests)
                    .map_err(|e| StartError::Control(e.to_string()))?,
            ),
            None => None,
        };
        let mut listeners = ListenerSet::default();
        let bound = match listeners.bind_new(addr, &ports, &keepalive) {
            Ok(b) => b,
            Err(e) => return Err(close_control(control, e.into()).await),
        };
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
        Ok(Node { state, listeners, admin, control, config_path, log })
    }
}

/// A failed start leaves no socket file behind.
async fn close_control(control: Option<ControlServer>, e: StartError) -> StartError {
    if let Some(c) = control {
        c.close().await;
    }
    e
}

/// Serve `config` until a [`Signal::Terminate`] (or the end of `signals`),
/// then drain and return.
pub async fn run(
    config: Config,
    log: LogControl,
    mut signals: mpsc::Receiver<Signal>,
) -> Result<(), StartError> {
    let (request_tx, mut requests) = mpsc::channel(REQUEST_QUEUE);
    let mut node = Node::start(config, log, request_tx).await?;
    let state = Arc::clone(&node.state);
    systemd::notify_ready(&state.status_line());
    let background = CancellationToken::new();
    let status = Arc::clone(&state);
    systemd::spawn_watchdog(move || status.status_line(), background.clone());
    crate::metrics::spawn_upkeep(Arc::clone(&state.metrics), background.clone());

    loop {
        tokio::select! {
            sig = signals.recv() => match sig {
                Some(Signal::Reload) => {
                    node.reload().await;
                }
                Some(Signal::Terminate) | None => break,
            },
            // Disabled once no sender is left (control socket off).
            Some(req) = requests.recv() => match req {
                NodeRequest::Reload(reply) => {
                    let outcome = node.reload().await;
                    let _ = reply.send(outcome);
                }
            },
        }
    }
    // Control requests from now on are answered "shutting down" (their
    // replies are dropped); the socket itself serves through the drain.
    drop(requests);
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
