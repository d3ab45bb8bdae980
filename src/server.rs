//! The running node: shared state, startup, and the signal loop.
//!
//! [`run`] takes a validated [`Config`] and a stream of [`Signal`]s; the
//! caller decides where signals come from (`main.rs` wires SIGHUP, SIGTERM
//! and SIGINT; tests can send their own). Startup binds every listener and
//! the admin port before telling systemd it is ready; any bind failure ends
//! startup with an error and nothing left listening.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::AdminServer;
use crate::config::Config;
use crate::listener::{BindError, ListenerSet, Starvation};
use crate::logging::LogControl;
use crate::metrics::Metrics;
use crate::routes::{RouteStates, RouteTable};
use crate::{reload, shutdown, systemd};

/// What the outside world asks of a running node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGHUP: re-read the config file.
    Reload,
    /// SIGTERM / SIGINT: drain and exit; a second one ends at once.
    Terminate,
}

/// One effective config with its route table; swapped whole on reload.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub table: RouteTable,
    pub hash: String,
}

impl Snapshot {
    pub fn new(config: Config, states: &RouteStates) -> Snapshot {
        let table = RouteTable::build(&config, states);
        let hash = config.hash();
        Snapshot { config: Arc::new(config), table, hash }
    }
}

/// State shared by the accept loops, sessions and the admin server.
pub struct Shared {
    /// The current config and routes; loaded once per connection, lock-free.
    pub snapshot: ArcSwap<Snapshot>,
    /// Bumped by every published snapshot (after it is stored), so a running
    /// session can tell that it must re-check its admission.
    generation: AtomicU64,
    /// Wakes every running session after a publish or [`Shared::close_sessions`].
    pub changed: Notify,
    pub metrics: Arc<Metrics>,
    pub states: RouteStates,
    /// Every session task; shutdown waits on it.
    pub sessions: TaskTracker,
    /// Set at the end of the drain: remaining sessions close. Sessions learn
    /// of it through `changed`, so an idle session waits on one thing only.
    closing: AtomicBool,
    /// Admitted sessions right now.
    active: AtomicUsize,
    /// `/readyz`: every listener bound and not shutting down.
    pub ready: AtomicBool,
    /// Accept starvation (descriptors or memory), logged once per episode.
    pub starvation: Starvation,
    per_source: SourceLimiter,
}

impl Shared {
    pub fn new(config: Config, metrics: Arc<Metrics>) -> Arc<Shared> {
        let states = RouteStates::new(Arc::clone(&metrics));
        let snap = Arc::new(Snapshot::new(config, &states));
        metrics.routes.set(snap.table.len() as f64);
        metrics.set_config_hash(&snap.hash);
        Arc::new(Shared {
            snapshot: ArcSwap::new(snap),
            generation: AtomicU64::new(0),
            changed: Notify::new(),
            metrics,
            states,
            sessions: TaskTracker::new(),
            closing: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            ready: AtomicBool::new(false),
            starvation: Starvation::default(),
            per_source: SourceLimiter::default(),
        })
    }

    /// Count an admitted session for as long as the guard lives.
    pub fn session_guard(self: &Arc<Self>) -> SessionGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        SessionGuard(Arc::clone(self))
    }

    /// Take one of `max` concurrent sessions for the client address `ip`
    /// (`[access] max_per_source`), released when the slot drops.
    pub fn try_acquire_source(self: &Arc<Self>, ip: IpAddr, max: u32) -> Option<SourceSlot> {
        let ip = ip.to_canonical();
        self.per_source.try_acquire(ip, max).then(|| SourceSlot { shared: Arc::clone(self), ip })
    }

    pub fn active_sessions(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Publish a new snapshot to new connections and running sessions.
    pub fn publish(&self, snap: Arc<Snapshot>) {
        self.metrics.routes.set(snap.table.len() as f64);
        self.metrics.set_config_hash(&snap.hash);
        self.snapshot.store(Arc::clone(&snap));
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// End of the drain: tell every running session to close.
    pub fn close_sessions(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// How many snapshots were published; read before the snapshot a session
    /// is admitted under.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Whether [`Shared::close_sessions`] was called.
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// The systemd `STATUS=` line.
    pub fn status_line(&self) -> String {
        let routes = self.snapshot.load().table.len();
        let sessions = self.active_sessions();
        format!(
            "serving {routes} route{}, {sessions} session{}",
            if routes == 1 { "" } else { "s" },
            if sessions == 1 { "" } else { "s" }
        )
    }
}

pub struct SessionGuard(Arc<Shared>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Concurrent sessions per client address (`[access] max_per_source`).
/// Only touched when the limit is set.
#[derive(Default)]
pub struct SourceLimiter {
    counts: Mutex<HashMap<IpAddr, u32>>,
}

impl SourceLimiter {
    /// Count one more session for `ip` unless it already has `max`.
    fn try_acquire(&self, ip: IpAddr, max: u32) -> bool {
        let mut m = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            if *n == 0 {
                m.remove(&ip);
            }
            return false;
        }
        *n += 1;
        true
    }

    fn release(&self, ip: IpAddr) {
        let mut m = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

/// One session counted against its client address.
pub struct SourceSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        self.shared.per_source.release(self.ip);
    }
}

/// A failure that stops the node from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot listen on admin address {addr}: {source}")]
    Admin { addr: std::net::SocketAddr, source: std::io::Error },
}

/// The node while it runs: everything reload and shutdown need.
pub struct Server {
    pub shared: Arc<Shared>,
    pub listeners: ListenerSet,
    pub admin: Option<AdminServer>,
    pub config_path: PathBuf,
    pub log: LogControl,
}

impl Server {
    /// Bind every listener and the admin port; start accepting.
    pub async fn start(config: Config, log: LogControl) -> Result<Server, StartError> {
        let metrics = Arc::new(Metrics::new());
        let config_path = config.source.clone();
        let addr = config.listen.address;
        let ports = config.listen_ports();
        let admin_addr = config.admin.listen;
        let keepalive = config.keepalive.clone();
        let shared = Shared::new(config, metrics);

        let mut listeners = ListenerSet::default();
        let bound = listeners.bind_new(addr, &ports, &keepalive)?;
        let admin = match admin_addr {
            Some(a) => Some(
                AdminServer::bind(a, Arc::clone(&shared))
                    .map_err(|source| StartError::Admin { addr: a, source })?,
            ),
            None => None,
        };
        listeners.commit(bound, &ports, &shared).await;
        shared.ready.store(true, Ordering::Release);
        let snap = shared.snapshot.load();
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            address = %addr,
            listeners = ports.len(),
            routes = snap.table.len(),
            admin = %admin_addr.map_or("off".to_string(), |a| a.to_string()),
            hash = %snap.hash,
            "portgate ready"
        );
        Ok(Server { shared, listeners, admin, config_path, log })
    }
}

/// Serve `config` until a [`Signal::Terminate`] (or the end of `signals`),
/// then drain and return.
pub async fn run(
    config: Config,
    log: LogControl,
    mut signals: mpsc::Receiver<Signal>,
) -> Result<(), StartError> {
    let mut server = Server::start(config, log).await?;
    let shared = Arc::clone(&server.shared);
    systemd::notify_ready(&shared.status_line());
    let background = CancellationToken::new();
    systemd::spawn_watchdog(Arc::clone(&shared), background.clone());
    crate::metrics::spawn_upkeep(Arc::clone(&shared.metrics), background.clone());

    while let Some(sig) = signals.recv().await {
        match sig {
            Signal::Reload => reload::reload(&mut server).await,
            Signal::Terminate => break,
        }
    }
    shutdown::shutdown(&mut server, &mut signals).await;
    background.cancel();
    if let Some(admin) = server.admin.take() {
        admin.close().await;
    }
    Ok(())
}
