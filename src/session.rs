//! One client connection, from accept to its log line.
//!
//! `PROXY header -> route lookup -> admission -> dial -> forward -> log`.
//! Everything that can wait (the header, the dial) runs here, inside the
//! session's own task and under its own timeout, never in the accept loop.
//! While forwarding, the session watches for reloads and re-checks its own
//! admission against the new route table; if the new config would refuse it,
//! it is closed after `revoke_grace`.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::{ProxyMode, Route, Target};
use crate::forward::{ByteSink, End, Forward, Side};
use crate::metrics::ConnectErrorKind;
use crate::proxy_protocol::{self, Command};
use crate::routes::{admit, Reject, RouteEntry, RouteSlot, RouteState};
use crate::server::{SessionGuard, Shared, Snapshot, SourceSlot};
use crate::sockopt::{self, DialError};

/// The socket peer: with an NLB in front, the NLB's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// The client as admitted: the PROXY header's source when a header was
/// accepted, else the socket peer. IPv4-mapped IPv6 is shown as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// What is known about a connection once its header (if any) is read.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub port: u16,
    pub peer: PeerAddr,
    pub client: ClientAddr,
    /// The VPC endpoint id from the AWS PROXY v2 TLV.
    pub endpoint: Option<String>,
}

/// Why a session ended, as the `close` log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    ClientClosed,
    TargetClosed,
    IdleTimeout,
    Revoked,
    Shutdown,
    Error,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::TargetClosed => "target_closed",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Revoked => "revoked",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Error => "error",
        }
    }
}

fn canonical(sa: SocketAddr) -> SocketAddr {
    SocketAddr::new(sa.ip().to_canonical(), sa.port())
}

/// Serve one accepted connection to its end.
///
/// Two phases with different lifetimes. Setup (header, admission, dial) is
/// short and holds timers, a header buffer and dial state; it runs as its
/// own boxed future, freed as soon as the target answers. Forwarding can
/// last hours, mostly idle: its state is all an idle session costs, so it is
/// kept small (two sockets, two directions, one boxed record of who and
/// what for the log line, and a waiter for reloads and shutdown).
pub fn run(stream: TcpStream, peer: SocketAddr, port: u16, shared: Arc<Shared>) -> impl Future<Output = ()> {
    // Not an `async fn`: its arguments would sit in the session's state for
    // its whole life. The async block holds only the boxed setup and `shared`.
    let setup = Box::pin(setup(stream, peer, port, Arc::clone(&shared)));
    async move {
        let Some(Admitted { client, target, early, idle, generation, meta }) = setup.await else {
            return;
        };
        let sink = StateSink(meta.route_slot.state());
        let mut fwd = Forward::new(client, target, early, idle, &sink);
        let (close, error) = forward_watching(&shared, &mut fwd, generation, &meta).await;
        let bytes = fwd.bytes();
        drop(fwd);
        let elapsed = meta.started.elapsed();
        meta.route_slot.state().metrics.session_duration.record(elapsed.as_secs_f64());
        let Meta { route, info, route_slot, source_slot, session, .. } = *meta;
        drop((source_slot, route_slot, session));
        let end = SessionEnd { route: &route, info: &info, bytes, elapsed };
        end.log(close, error.as_ref().map(|e| e as &dyn std::fmt::Display), None);
    }
}

/// A session past setup: what forwarding needs.
struct Admitted {
    client: TcpStream,
    target: TcpStream,
    /// Client bytes read after the PROXY header.
    early: Vec<u8>,
    idle: Option<Duration>,
    /// [`Shared::generation`] when the session was admitted.
    generation: u64,
    meta: Box<Meta>,
}

/// Who the session is and what it holds, read at its end (log line, limits)
/// and on reloads (revocation); boxed, out of the forwarding state.
struct Meta {
    route: Arc<Route>,
    info: ConnInfo,
    started: Instant,
    route_slot: RouteSlot,
    source_slot: Option<SourceSlot>,
    session: SessionGuard,
}

/// Header, route lookup, admission and dial. `None` when the connection was
/// refused, was a probe, or the dial failed (each already counted and logged).
async fn setup(stream: TcpStream, peer: SocketAddr, port: u16, shared: Arc<Shared>) -> Option<Admitted> {
    let shared = &shared;
    let peer = PeerAddr(canonical(peer));
    let (mode, header_timeout, trusted) = {
        let snap = shared.snapshot.load();
        let pp = &snap.config.proxy_protocol;
        (pp.mode, pp.header_timeout, pp.trusted.iter().any(|n| n.contains(&peer.0.ip())))
    };

    // 1. PROXY header.
    let unheaded = ConnInfo { port, peer, client: ClientAddr(peer.0), endpoint: None };
    let (info, early) = match mode {
        ProxyMode::Off => (unheaded, Vec::new()),
        ProxyMode::Required if !trusted => {
            // Whatever it sends is refused; only a probe is spared the log line.
            if let Ok(true) = tokio::time::timeout(header_timeout, closes_without_data(&stream)).await {
                shared.metrics.health_checks.increment(1);
                return None;
            }
            let detail = "peer is not in proxy_protocol.trusted";
            reject(shared, &unheaded, None, Reject::ProxyHeader, detail);
            return None;
        }
        ProxyMode::Required => match read_header(&stream, header_timeout).await {
            HeaderRead::Probe => {
                shared.metrics.health_checks.increment(1);
                return None;
            }
            HeaderRead::Failed(detail) => {
                reject(shared, &unheaded, None, Reject::ProxyHeader, &detail);
                return None;
            }
            HeaderRead::Header(h, _) if h.command == Command::Local => {
                shared.metrics.health_checks.increment(1);
                return None;
            }
            HeaderRead::Header(h, early) => {
                let client = h.source.map(canonical).unwrap_or(peer.0);
                let info = ConnInfo { port, peer, client: ClientAddr(client), endpoint: h.vpc_endpoint };
                (info, early)
            }
        },
    };

    // 2. Route lookup and admission, on the newest map. The generation is
    // read first: a reload from here on is re-checked while forwarding.
    let generation = shared.generation();
    let snap = shared.snapshot.load_full();
    let Some(entry) = snap.table.lookup(port, info.endpoint.as_deref()).cloned() else {
        reject_or_probe(shared, &stream, &snap, &info, early, None, Reject::NoRoute).await;
        return None;
    };
    if let Err(reason) = admit(&entry.route, info.client.0.ip(), info.endpoint.as_deref()) {
        reject_or_probe(shared, &stream, &snap, &info, early, Some(&entry), reason).await;
        return None;
    }
    let Some(route_slot) = entry.state.try_acquire(entry.route.max_connections) else {
        reject_or_probe(shared, &stream, &snap, &info, early, Some(&entry), Reject::Limit).await;
        return None;
    };
    let max_per_source = snap.config.access.max_per_source;
    let source_slot = if max_per_source > 0 {
        match shared.try_acquire_source(info.client.0.ip(), max_per_source) {
            Some(s) => Some(s),
            None => {
                drop(route_slot);
                reject_or_probe(shared, &stream, &snap, &info, early, Some(&entry), Reject::Limit).await;
                return None;
            }
        }
    } else {
        None
    };
    let session = shared.session_guard();
    route_slot.state().metrics.accepted.increment(1);

    // 3. Dial.
    let started = Instant::now();
    let target = match dial(&entry.route.target, snap.config.timeouts.connect).await {
        Ok(t) => t,
        Err(e) => {
            let kind = classify(&e);
            route_slot.state().metrics.connect_error(kind).increment(1);
            close_cleanly(&stream);
            let end =
                SessionEnd { route: &entry.route, info: &info, bytes: (0, 0), elapsed: started.elapsed() };
            end.log(CloseReason::Error, Some(&e), Some(kind.as_str()));
            return None;
        }
    };
    route_slot.state().metrics.connect_duration.record(started.elapsed().as_secs_f64());
    // The client socket inherited keepalive and nodelay from its listener.
    if !sockopt::ACCEPTED_INHERIT_OPTS {
        sockopt::apply_session_opts(&stream, &snap.config.keepalive, "client");
    }
    sockopt::apply_session_opts(&target, &snap.config.keepalive, "target");

    // The snapshot is not kept: a session lasting hours must not pin the
    // config (and route table) it started under.
    let idle = snap.config.timeouts.idle;
    let meta = Box::new(Meta { route: entry.route, info, started, route_slot, source_slot, session });
    Some(Admitted { client: stream, target, early, idle, generation, meta })
}

/// What the session-end log line says; filled in as the session runs.
struct SessionEnd<'a> {
    route: &'a Route,
    info: &'a ConnInfo,
    /// (to_target, to_client)
    bytes: (u64, u64),
    elapsed: Duration,
}

impl SessionEnd<'_> {
    /// The one line per session end (the contract's fields, plus `error` and
    /// `error_kind` when there is one).
    fn log(&self, close: CloseReason, error: Option<&dyn std::fmt::Display>, error_kind: Option<&str>) {
        tracing::info!(
            route = %self.route.name,
            tenant = %self.route.tenant,
            port = self.info.port,
            client = %self.info.client.0,
            peer = %self.info.peer.0,
            endpoint = %self.info.endpoint.as_deref().unwrap_or("-"),
            target = %self.route.target,
            bytes_to_target = self.bytes.0,
            bytes_to_client = self.bytes.1,
            duration_ms = self.elapsed.as_millis() as u64,
            close = %close.as_str(),
            error = error.map(tracing::field::display),
            error_kind = error_kind.map(tracing::field::display),
            "session closed"
        );
    }
}

struct StateSink<'a>(&'a RouteState);

impl ByteSink for StateSink<'_> {
    fn to_target(&self, n: u64) {
        self.0.metrics.bytes_to_target.increment(n);
    }
    fn to_client(&self, n: u64) {
        self.0.metrics.bytes_to_client.increment(n);
    }
}

/// Forward, while also watching for shutdown and for reloads that revoke
/// this session. `seen` is the generation the session was admitted under.
async fn forward_watching(
    shared: &Shared,
    fwd: &mut Forward<'_, StateSink<'_>>,
    mut seen: u64,
    meta: &Meta,
) -> (CloseReason, Option<io::Error>) {
    // The revocation timer exists only once a reload revokes the session, so
    // an idle session's future does not carry a timer.
    let mut revoke: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        // Register for the next change before looking at the state, so a
        // change between the two is not missed.
        let mut changed = std::pin::pin!(shared.changed.notified());
        changed.as_mut().enable();
        if shared.closing() {
            fwd.close_both();
            return (CloseReason::Shutdown, None);
        }
        let generation = shared.generation();
        if generation != seen {
            seen = generation;
            let snap = shared.snapshot.load();
            let info = &meta.info;
            if still_admitted(&snap, &meta.route, info.client.0.ip(), info.endpoint.as_deref()) {
                revoke = None;
            } else if revoke.is_none() {
                revoke = Some(Box::pin(tokio::time::sleep(snap.config.timeouts.revoke_grace)));
            }
        }
        let woke = std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = Pin::new(&mut *fwd).poll(cx) {
                return Poll::Ready(Wake::Forwarded(out.end));
            }
            if let Some(r) = revoke.as_mut() {
                if r.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Revoked);
                }
            }
            match changed.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Wake::Changed),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        return match woke {
            Wake::Changed => continue,
            Wake::Revoked => {
                fwd.close_both();
                (CloseReason::Revoked, None)
            }
            Wake::Forwarded(End::Closed { first: Side::Client }) => (CloseReason::ClientClosed, None),
            Wake::Forwarded(End::Closed { first: Side::Target }) => (CloseReason::TargetClosed, None),
            Wake::Forwarded(End::Reset { side: Side::Client }) => (CloseReason::ClientClosed, None),
            Wake::Forwarded(End::Reset { side: Side::Target }) => (CloseReason::TargetClosed, None),
            Wake::Forwarded(End::Error { error, .. }) => (CloseReason::Error, Some(error)),
            Wake::Forwarded(End::Idle) => {
                fwd.close_both();
                (CloseReason::IdleTimeout, None)
            }
        };
    }
}

/// What woke [`forward_watching`].
enum Wake {
    Forwarded(End),
    Revoked,
    Changed,
}

/// Would the config in `snap` still admit this session? Identity is the
/// route's name; its `(port, via)` must be unchanged and the source and
/// endpoint must pass its new rules. Limits are not re-checked: lowering
/// `max_connections` does not revoke sessions.
pub fn still_admitted(snap: &Snapshot, route: &Route, client: IpAddr, endpoint: Option<&str>) -> bool {
    match snap.table.by_name(&route.name) {
        None => false,
        Some(e) => {
            e.route.port == route.port
                && e.route.via == route.via
                && admit(&e.route, client, endpoint).is_ok()
        }
    }
}

enum HeaderRead {
    /// The connection closed (or reset) before sending a byte.
    Probe,
    Failed(String),
    /// The header, and the payload bytes read after it.
    Header(proxy_protocol::Header, Vec<u8>),
}

/// Read one PROXY header within `timeout`.
async fn read_header(stream: &TcpStream, timeout: Duration) -> HeaderRead {
    let mut buf = vec![0u8; proxy_protocol::MAX_HEADER_LEN];
    let mut len = 0usize;
    let deadline = Instant::now() + timeout;
    loop {
        let ready = tokio::time::timeout_at(deadline, stream.readable()).await;
        match ready {
            Err(_) => {
                return HeaderRead::Failed(format!(
                "no complete PROXY header within {} (proxy_protocol.header_timeout); {len} bytes received",
                crate::config::fmt_duration(timeout)
            ))
            }
            Ok(Err(e)) => return HeaderRead::Failed(format!("reading PROXY header: {e}")),
            Ok(Ok(())) => {}
        }
        match stream.try_read(&mut buf[len..]) {
            Ok(0) if len == 0 => return HeaderRead::Probe,
            Ok(0) => {
                return HeaderRead::Failed(format!(
                    "connection closed after {len} bytes of an incomplete PROXY header"
                ))
            }
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if len == 0 && e.kind() == io::ErrorKind::ConnectionReset => return HeaderRead::Probe,
            Err(e) => return HeaderRead::Failed(format!("reading PROXY header: {e}")),
        }
        match proxy_protocol::parse(&buf[..len]) {
            Ok(Some((h, used))) => {
                buf.truncate(len);
                buf.drain(..used);
                return HeaderRead::Header(h, buf);
            }
            Ok(None) if len == buf.len() => {
                return HeaderRead::Failed(format!(
                    "PROXY header longer than {} bytes",
                    proxy_protocol::MAX_HEADER_LEN
                ))
            }
            Ok(None) => continue,
            Err(e) => return HeaderRead::Failed(e.to_string()),
        }
    }
}

/// Refuse a connection, unless it turns out to be a probe (closes without
/// sending a byte), which only counts as a health check.
async fn reject_or_probe(
    shared: &Shared,
    stream: &TcpStream,
    snap: &Snapshot,
    info: &ConnInfo,
    early: Vec<u8>,
    entry: Option<&RouteEntry>,
    reason: Reject,
) {
    // With a PROXY header, bytes have been sent: not a probe. Without one,
    // wait (bounded) for the first byte or the close.
    if snap.config.proxy_protocol.mode == ProxyMode::Off && early.is_empty() {
        let wait = snap.config.proxy_protocol.header_timeout;
        if let Ok(true) = tokio::time::timeout(wait, closes_without_data(stream)).await {
            shared.metrics.health_checks.increment(1);
            return;
        }
    }
    reject(shared, info, entry, reason, "");
    close_cleanly(stream);
}

/// Close with FIN rather than a reset: read what the client already sent
/// (an SSH banner, say), then half-close. Bytes arriving later may still
/// draw a reset when the socket is dropped.
fn close_cleanly(stream: &TcpStream) {
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        match stream.try_read(&mut sink) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
    let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
}

/// Resolves to true if the peer closes (or resets) before sending data,
/// false once data arrives.
async fn closes_without_data(stream: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    loop {
        if stream.readable().await.is_err() {
            return true;
        }
        match stream.try_read(&mut b) {
            Ok(0) => return true,
            Ok(_) => return false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return true,
        }
    }
}

fn reject(shared: &Shared, info: &ConnInfo, entry: Option<&RouteEntry>, reason: Reject, detail: &str) {
    let route = entry.map(|e| e.route.name.as_str()).unwrap_or("");
    match entry.and_then(|e| e.state.metrics.rejected(reason)) {
        Some(c) => c.increment(1),
        None => shared.metrics.rejected_unrouted(reason),
    }
    tracing::info!(
        port = info.port,
        route = %route,
        client = %info.client.0,
        peer = %info.peer.0,
        endpoint = %info.endpoint.as_deref().unwrap_or("-"),
        reason = %reason.as_str(),
        detail = %detail,
        "connection rejected"
    );
}

/// Dial a route's target; a name is resolved at each connect.
async fn dial(target: &Target, timeout: Duration) -> Result<TcpStream, DialError> {
    match target {
        Target::Addr(a) => sockopt::connect(*a, timeout).await,
        Target::Name { host, port } => {
            let deadline = Instant::now() + timeout;
            let addrs = tokio::time::timeout_at(deadline, tokio::net::lookup_host((host.as_str(), *port)))
                .await
                .map_err(|_| DialError::Timeout)?
                .map_err(|e| DialError::Resolve(e.to_string()))?;
            let mut last = DialError::Resolve(format!("{host} has no addresses"));
            for addr in addrs {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(DialError::Timeout);
                }
                match sockopt::connect(addr, left).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
    }
}

fn classify(e: &DialError) -> ConnectErrorKind {
    match e {
        DialError::Timeout => ConnectErrorKind::Timeout,
        DialError::Resolve(_) => ConnectErrorKind::Unreachable,
        DialError::Io(e) => match e.kind() {
            io::ErrorKind::ConnectionRefused => ConnectErrorKind::Refused,
            io::ErrorKind::TimedOut => ConnectErrorKind::Timeout,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                ConnectErrorKind::Unreachable
            }
            _ => match e.raw_os_error() {
                Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) | Some(libc::EADDRNOTAVAIL) => {
                    ConnectErrorKind::Unreachable
                }
                _ => ConnectErrorKind::Other,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;

    #[tokio::test]
    async fn session_future_stays_small() {
        let cfg = Config::with_defaults("x.toml".into());
        let shared = Shared::new(cfg, Arc::new(Metrics::new()));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        let _c = TcpStream::connect(a).await.unwrap();
        let (s, peer) = l.accept().await.unwrap();
        let fut = run(s, peer, a.port(), shared);
        // Every idle session holds one of these inside tokio's task cell,
        // which is 128-byte aligned: with the task header and trailer
        // (~90 bytes), up to ~420 bytes keep the cell at 512 bytes. Setup
        // state is boxed and freed before forwarding, so it is not counted.
        let size = std::mem::size_of_val(&fut);
        eprintln!("session future: {size} bytes");
        assert!(size <= 416, "the session future grew to {size} bytes");
    }

    #[tokio::test]
    async fn a_running_session_does_not_pin_the_config_it_started_under() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let backend_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = backend_l.local_addr().unwrap();
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = front.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portgate.toml");
        let text = format!(
            "[access]\nallow = [\"127.0.0.0/8\"]\n[[route]]\nname = \"r\"\nport = {port}\ntarget = \"{target}\"\n"
        );
        std::fs::write(&path, text).unwrap();
        let cfg = crate::config::load(&path).unwrap();
        let shared = Shared::new(cfg, Arc::new(Metrics::new()));

        let mut user = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (s, peer) = front.accept().await.unwrap();
        let task = tokio::spawn(run(s, peer, port, Arc::clone(&shared)));
        let (mut backend, _) = backend_l.accept().await.unwrap();
        let mut b = [0u8; 1];
        user.write_all(b"x").await.unwrap();
        backend.read_exact(&mut b).await.unwrap();

        // A reload to an equivalent config: the session stays, and the old
        // snapshot is held by nobody but this test.
        let old = shared.snapshot.load_full();
        shared.publish(Arc::new(Snapshot::new((*old.config).clone(), &shared.states)));
        assert_eq!(Arc::strong_count(&old), 1, "a session still holds the replaced snapshot");
        backend.write_all(b"y").await.unwrap();
        user.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"y");
        assert_eq!(shared.active_sessions(), 1);

        drop(user);
        drop(backend);
        task.await.unwrap();
        assert_eq!(shared.active_sessions(), 0);
    }
}
