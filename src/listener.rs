//! The listening sockets: bind the port set, accept, reconcile on reload.
//!
//! The accept loop only accepts: each connection is handed to its own session
//! task at once (the PROXY header is read there, under its own timeout), so a
//! slow client never delays the next accept. The loop survives every accept
//! error; when descriptors or memory run out it backs off (10 ms doubling to
//! 1 s), logs once for the whole process, and logs again when it recovers.
//!
//! Reconciling is split in two so a reload can fail cleanly: [`ListenerSet::bind_new`]
//! binds every port that is not yet listening (and fails as a whole), then
//! [`ListenerSet::commit`] starts accepting on them and closes the ports the
//! new config dropped. Ports in both configs keep their socket: no connection
//! is refused during a reload.
//!
//! This module accepts and hands off; it must not read from a connection,
//! look at routes or log per connection.

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Keepalive;
use crate::node::state::NodeState;
use crate::session;
use crate::sockopt;

/// First back-off after an accept failed for lack of descriptors or memory.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest back-off: short enough to resume promptly once descriptors free up.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A port that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} port {port}: {source}{hint}")]
pub struct BindError {
    addr: IpAddr,
    port: u16,
    #[source]
    source: io::Error,
    hint: &'static str,
}

impl BindError {
    fn new(addr: IpAddr, port: u16, source: io::Error) -> Self {
        let hint = match source.kind() {
            io::ErrorKind::AddrInUse => " (another process, or another portgate, already listens there)",
            io::ErrorKind::PermissionDenied => {
                " (ports below 1024 need CAP_NET_BIND_SERVICE; see systemd/portgate.service)"
            }
            io::ErrorKind::AddrNotAvailable => " (listen.address is not an address of this host)",
            _ => "",
        };
        BindError { addr, port, source, hint }
    }
}

struct Running {
    /// Kept to re-apply socket options when `[keepalive]` changes, and to
    /// hand the socket to a successor (upgrade in place).
    listener: Arc<TcpListener>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    fn start(
        port: u16,
        listener: Arc<TcpListener>,
        state: &Arc<NodeState>,
        starvation: &Arc<Starvation>,
    ) -> Running {
        let cancel = CancellationToken::new();
        let accept = AcceptLoop {
            listener: Arc::clone(&listener),
            port,
            state: Arc::clone(state),
            starvation: Arc::clone(starvation),
        };
        let task = tokio::spawn(accept.run(cancel.clone()));
        Running { listener, cancel, task }
    }
}

/// Sockets bound by [`ListenerSet::bind_new`], not yet accepting.
pub(crate) struct Bound(Vec<(u16, TcpListener)>);

/// The running listeners, by port.
#[derive(Default)]
pub(crate) struct ListenerSet {
    running: BTreeMap<u16, Running>,
    /// The keepalive options the running listeners carry (accepted sockets
    /// inherit them).
    keepalive: Option<Keepalive>,
    /// Shared by every accept loop: starvation is one episode per process.
    starvation: Arc<Starvation>,
    /// Accepting is paused ([`ListenerSet::pause`]).
    paused: bool,
}

impl ListenerSet {
    /// Bind every port of `ports` that is not listening yet. On any failure
    /// the ports bound so far are closed again and nothing changes.
    pub(crate) fn bind_new(&self, addr: IpAddr, ports: &[u16], ka: &Keepalive) -> Result<Bound, BindError> {
        let mut bound = Vec::new();
        for &port in ports {
            if self.running.contains_key(&port) {
                continue;
            }
            let l = sockopt::bind_listener_with(addr, port, Some(ka))
                .map_err(|e| BindError::new(addr, port, e))?;
            bound.push((port, l));
        }
        Ok(Bound(bound))
    }

    /// Start accepting on `bound`, and close every running port not in `ports`;
    /// returns once those sockets are closed (so when a reload reports
    /// success, a removed port is free again). Sessions accepted on them are
    /// not touched. If `ka` differs from the running listeners' `[keepalive]`,
    /// the kept listeners get the new options (sockets accepted from then on
    /// inherit them).
    pub(crate) async fn commit(
        &mut self,
        bound: Bound,
        ports: &[u16],
        ka: &Keepalive,
        state: &Arc<NodeState>,
    ) {
        if self.keepalive.as_ref().is_some_and(|old| old != ka) {
            for r in self.running.values() {
                sockopt::apply_listener_opts(&r.listener, ka);
            }
        }
        self.keepalive = Some(ka.clone());
        for (port, listener) in bound.0 {
            let r = Running::start(port, Arc::new(listener), state, &self.starvation);
            self.running.insert(port, r);
        }
        let keep: std::collections::HashSet<u16> = ports.iter().copied().collect();
        let gone: Vec<u16> = self.running.keys().copied().filter(|p| !keep.contains(p)).collect();
        let gone: Vec<Running> = gone.iter().filter_map(|p| self.running.remove(p)).collect();
        for r in &gone {
            r.cancel.cancel();
        }
        for r in gone {
            drop(r.listener);
            let _ = r.task.await;
        }
    }

    /// Stop accepting everywhere and wait until every socket is closed.
    pub(crate) async fn close_all(&mut self) {
        let running = std::mem::take(&mut self.running);
        for r in running.values() {
            r.cancel.cancel();
        }
        for (_, r) in running {
            let _ = r.task.await;
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.running.len()
    }

    /// Stop accepting everywhere but keep every socket open (connections
    /// wait in the kernel's queue): an upgrade in place freezes the node's
    /// sessions after this, and its successor accepts from the same sockets.
    pub(crate) async fn pause(&mut self) {
        self.paused = true;
        for r in self.running.values() {
            r.cancel.cancel();
        }
        for r in self.running.values_mut() {
            // A finished stand-in, so a later close or resume awaits nothing twice.
            let task = std::mem::replace(&mut r.task, tokio::spawn(async {}));
            let _ = task.await;
        }
    }

    /// Accept again after [`ListenerSet::pause`] (the upgrade failed); a
    /// no-op when not paused.
    pub(crate) fn resume(&mut self, state: &Arc<NodeState>) {
        if !std::mem::take(&mut self.paused) {
            return;
        }
        let running = std::mem::take(&mut self.running);
        for (port, r) in running {
            self.running.insert(port, Running::start(port, r.listener, state, &self.starvation));
        }
    }

    /// Every listening socket, by port, to hand to a successor.
    pub(crate) fn sockets(&self) -> Vec<(u16, std::os::fd::BorrowedFd<'_>)> {
        use std::os::fd::AsFd;
        self.running.iter().map(|(p, r)| (*p, r.listener.as_fd())).collect()
    }

    /// Like [`ListenerSet::bind_new`], but a port found in `inherited` (a
    /// predecessor's socket on the same address) is taken instead of bound.
    pub(crate) fn bind_inherited(
        &self,
        addr: IpAddr,
        ports: &[u16],
        ka: &Keepalive,
        inherited: &mut BTreeMap<u16, std::net::TcpListener>,
    ) -> Result<Bound, BindError> {
        let mut taken = Vec::new();
        let mut rest = Vec::new();
        for &port in ports {
            let same_addr = |l: &std::net::TcpListener| l.local_addr().is_ok_and(|a| a.ip() == addr);
            match inherited.remove(&port) {
                Some(l) if same_addr(&l) => {
                    let l = TcpListener::from_std(l).map_err(|e| BindError::new(addr, port, e))?;
                    sockopt::apply_listener_opts(&l, ka);
                    taken.push((port, l));
                }
                _ => rest.push(port),
            }
        }
        let mut bound = self.bind_new(addr, &rest, ka)?;
        bound.0.extend(taken);
        Ok(bound)
    }
}

/// Logs accept starvation (no descriptors or memory) once per episode for the
/// whole process, and at most once per [`STARVATION_LOG_EVERY`], so a node
/// hovering at its limit does not flood the journal.
#[derive(Default)]
struct Starvation {
    /// Set while accepts are failing.
    active: AtomicBool,
    /// Whether the current episode was logged (then its end is logged too).
    logged: AtomicBool,
    last_logged: Mutex<Option<Instant>>,
}

/// Quiet period between two starvation log lines.
const STARVATION_LOG_EVERY: Duration = Duration::from_secs(60);

impl Starvation {
    fn starved(&self, port: u16, e: &io::Error) {
        if self.active.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut last = self.last_logged.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < STARVATION_LOG_EVERY) {
            self.logged.store(false, Ordering::Release);
            return;
        }
        *last = Some(Instant::now());
        self.logged.store(true, Ordering::Release);
        tracing::error!(
            port,
            error = %e,
            "cannot accept connections: out of file descriptors or memory; pausing accepts and retrying \
             (raise LimitNOFILE or lower max_connections); logged at most once a minute"
        );
    }

    fn recovered(&self, port: u16) {
        if self.active.swap(false, Ordering::AcqRel) && self.logged.swap(false, Ordering::AcqRel) {
            tracing::info!(port, "accepting connections again");
        }
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// One port's accept loop and what it hands each connection.
struct AcceptLoop {
    listener: Arc<TcpListener>,
    port: u16,
    state: Arc<NodeState>,
    starvation: Arc<Starvation>,
}

impl AcceptLoop {
    async fn run(self, cancel: CancellationToken) {
        let AcceptLoop { listener, port, state, starvation } = self;
        let mut backoff: Option<Duration> = None;
        loop {
            let res = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                r = listener.accept() => r,
            };
            match res {
                Ok((stream, peer)) => {
                    if backoff.take().is_some() {
                        starvation.recovered(port);
                    }
                    state.sessions.spawn(session::run(stream, peer, port, Arc::clone(&state)));
                }
                Err(e) if is_resource_exhaustion(&e) => {
                    let d = backoff.map_or(BACKOFF_MIN, |d| (d * 2).min(BACKOFF_MAX));
                    backoff = Some(d);
                    starvation.starved(port, &e);
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(d) => {}
                    }
                }
                Err(e) => match e.kind() {
                    // The client gave up between SYN and accept: nothing to do.
                    io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::Interrupted => {}
                    _ => {
                        tracing::warn!(port, error = %e, "accept failed; retrying");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(BACKOFF_MIN) => {}
                        }
                    }
                },
            }
        }
    }
}
