//! One client connection, from accept to its log line.
//!
//! `PROXY header -> route lookup -> admission -> dial -> forward -> log`.
//! Everything that can wait (the header, the dial) runs here, inside the
//! session's own task and under its own timeout, never in the accept loop.
//! While forwarding, the session watches for reloads and re-checks its own
//! admission against the new route table; if the new config would refuse it,
//! it is closed after `revoke_grace`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::{ProxyMode, Route, Target};
use crate::forward::{ByteSink, End, Forward, Side};
use crate::metrics::ConnectErrorKind;
use crate::proxy_protocol::{self, Command};
use crate::routes::{admit, Reject, RouteEntry, RouteState};
use crate::server::{Shared, Snapshot};
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
pub async fn run(stream: TcpStream, peer: SocketAddr, port: u16, shared: Arc<Shared>) {
    let peer = PeerAddr(canonical(peer));
    let snap = shared.snapshot.load_full();
    let cfg = &snap.config;

    // 1. PROXY header.
    let (info, early) = match cfg.proxy_protocol.mode {
        ProxyMode::Off => {
            let info = ConnInfo { port, peer, client: ClientAddr(peer.0), endpoint: None };
            (info, Vec::new())
        }
        ProxyMode::Required => {
            let unheaded = ConnInfo { port, peer, client: ClientAddr(peer.0), endpoint: None };
            let trusted = cfg.proxy_protocol.trusted.iter().any(|n| n.contains(&peer.0.ip()));
            if !trusted {
                // Whatever it sends is refused; only a probe is spared the log line.
                let wait = cfg.proxy_protocol.header_timeout;
                if let Ok(true) = tokio::time::timeout(wait, closes_without_data(&stream)).await {
                    shared.metrics.health_checks.increment(1);
                    return;
                }
                let detail = "peer is not in proxy_protocol.trusted";
                return reject(&shared, &unheaded, None, Reject::ProxyHeader, detail);
            }
            match read_header(&stream, cfg.proxy_protocol.header_timeout).await {
                HeaderRead::Probe => {
                    shared.metrics.health_checks.increment(1);
                    return;
                }
                HeaderRead::Failed(detail) => {
                    return reject(&shared, &unheaded, None, Reject::ProxyHeader, &detail);
                }
                HeaderRead::Header(h, _) if h.command == Command::Local => {
                    shared.metrics.health_checks.increment(1);
                    return;
                }
                HeaderRead::Header(h, early) => {
                    let client = h.source.map(canonical).unwrap_or(peer.0);
                    let info = ConnInfo { port, peer, client: ClientAddr(client), endpoint: h.vpc_endpoint };
                    (info, early)
                }
            }
        }
    };

    // 2. Route lookup and admission, on the newest map.
    let updates = shared.updates.subscribe();
    let snap = shared.snapshot.load_full();
    let Some(entry) = snap.table.lookup(port, info.endpoint.as_deref()).cloned() else {
        return reject_or_probe(&shared, &stream, &snap, &info, early, None, Reject::NoRoute).await;
    };
    if let Err(reason) = admit(&entry.route, info.client.0.ip(), info.endpoint.as_deref()) {
        return reject_or_probe(&shared, &stream, &snap, &info, early, Some(&entry), reason).await;
    }
    let Some(route_slot) = entry.state.try_acquire(entry.route.max_connections) else {
        return reject_or_probe(&shared, &stream, &snap, &info, early, Some(&entry), Reject::Limit).await;
    };
    let max_per_source = snap.config.access.max_per_source;
    let source_slot = if max_per_source > 0 {
        match shared.per_source.try_acquire(info.client.0.ip(), max_per_source) {
            Some(s) => Some(s),
            None => {
                drop(route_slot);
                return reject_or_probe(&shared, &stream, &snap, &info, early, Some(&entry), Reject::Limit)
                    .await;
            }
        }
    } else {
        None
    };
    let _session = shared.session_guard();
    let state = Arc::clone(route_slot.state());
    state.metrics.accepted.increment(1);

    // 3. Dial.
    let started = Instant::now();
    let target = match dial(&entry.route.target, snap.config.timeouts.connect).await {
        Ok(t) => t,
        Err(e) => {
            let kind = classify(&e);
            state.metrics.connect_error(kind).increment(1);
            close_cleanly(&stream);
            let end =
                SessionEnd { route: &entry.route, info: &info, bytes: (0, 0), elapsed: started.elapsed() };
            end.log(CloseReason::Error, Some(&e), Some(kind.as_str()));
            return;
        }
    };
    state.metrics.connect_duration.record(started.elapsed().as_secs_f64());
    // The client socket inherited keepalive and nodelay from its listener.
    if !sockopt::ACCEPTED_INHERIT_OPTS {
        sockopt::apply_session_opts(&stream, &snap.config.keepalive, "client");
    }
    sockopt::apply_session_opts(&target, &snap.config.keepalive, "target");

    // 4. Forward until both sides close, or revocation / shutdown.
    let sink = StateSink(&state);
    let mut fwd = Forward::new(&stream, &target, early, snap.config.timeouts.idle, &sink);
    let (close, error) = forward_watching(&shared, &mut fwd, updates, &entry.route, &info).await;
    let (to_target, to_client) = fwd.bytes();
    drop(fwd);
    let elapsed = started.elapsed();
    state.metrics.session_duration.record(elapsed.as_secs_f64());
    drop(source_slot);
    drop(route_slot);

    let end = SessionEnd { route: &entry.route, info: &info, bytes: (to_target, to_client), elapsed };
    end.log(close, error.as_ref().map(|e| e as &dyn std::fmt::Display), None);
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
/// this session.
async fn forward_watching(
    shared: &Shared,
    fwd: &mut Forward<'_>,
    mut updates: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    route: &Route,
    info: &ConnInfo,
) -> (CloseReason, Option<io::Error>) {
    // The revocation timer exists only once a reload revokes the session, so
    // an idle session's future does not carry a timer.
    let mut revoke: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let mut updates_open = true;
    loop {
        let revoke_sleep = async {
            match revoke.as_mut() {
                Some(s) => s.as_mut().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            out = &mut *fwd => {
                return match out.end {
                    End::Closed { first: Side::Client } => (CloseReason::ClientClosed, None),
                    End::Closed { first: Side::Target } => (CloseReason::TargetClosed, None),
                    End::Reset { side: Side::Client } => (CloseReason::ClientClosed, None),
                    End::Reset { side: Side::Target } => (CloseReason::TargetClosed, None),
                    End::Error { error, .. } => (CloseReason::Error, Some(error)),
                    End::Idle => {
                        fwd.close_both();
                        (CloseReason::IdleTimeout, None)
                    }
                };
            }
            _ = shared.force_close.cancelled() => {
                fwd.close_both();
                return (CloseReason::Shutdown, None);
            }
            changed = updates.changed(), if updates_open => {
                if changed.is_err() {
                    updates_open = false;
                    continue;
                }
                let snap = updates.borrow_and_update().clone();
                if still_admitted(&snap, route, info.client.0.ip(), info.endpoint.as_deref()) {
                    revoke = None;
                } else if revoke.is_none() {
                    revoke = Some(Box::pin(tokio::time::sleep(snap.config.timeouts.revoke_grace)));
                }
            }
            _ = revoke_sleep => {
                fwd.close_both();
                return (CloseReason::Revoked, None);
            }
        }
    }
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
        // Every idle session holds one of these (plus the task header and two
        // I/O registrations); keep an eye on growth.
        let size = std::mem::size_of_val(&fut);
        eprintln!("session future: {size} bytes");
        assert!(size <= 1536, "the session future grew to {size} bytes");
    }
}
