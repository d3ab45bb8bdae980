//! Step 1 of a session: the PROXY header, read under its own timeout, and
//! probe detection (a connection that closes without sending a byte).
//!
//! The policy (mode, trusted peers, timeout) comes from the caller's
//! snapshot, the same one admission then uses. This module reads bytes and
//! says what they were; it must not count, log, or look at routes.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::addr::{canonical, ClientAddr, ConnInfo, PeerAddr};
use crate::config::{fmt_duration, ProxyMode, ProxyProtocol};
use crate::proxy_protocol::{self, Command};

/// What the first bytes of a connection turned out to be.
pub(super) enum Opening {
    /// A connection to serve: who it is, and client bytes read after the
    /// PROXY header (to be sent to the target first).
    Client(ConnInfo, Vec<u8>),
    /// A load-balancer health check: a `LOCAL` header, or a close before
    /// any byte. Counted as a health check, never as a rejection.
    Probe,
    /// A `proxy_header` rejection, with the log line's `detail`.
    BadHeader(ConnInfo, String),
}

/// Read what `[proxy_protocol]` asks of a new connection from `peer`.
pub(super) async fn read(stream: &TcpStream, peer: PeerAddr, port: u16, pp: &ProxyProtocol) -> Opening {
    let unheaded = ConnInfo::unheaded(port, peer);
    match pp.mode {
        ProxyMode::Off => Opening::Client(unheaded, Vec::new()),
        ProxyMode::Required if !pp.trusted.iter().any(|n| n.contains(&peer.0.ip())) => {
            // Whatever it sends is refused; only a probe is spared the log line.
            if let Ok(true) = tokio::time::timeout(pp.header_timeout, closes_without_data(stream)).await {
                return Opening::Probe;
            }
            Opening::BadHeader(unheaded, "peer is not in proxy_protocol.trusted".into())
        }
        ProxyMode::Required => match read_header(stream, pp.header_timeout).await {
            HeaderRead::Probe => Opening::Probe,
            HeaderRead::Failed(detail) => Opening::BadHeader(unheaded, detail),
            HeaderRead::Header(h, _) if h.command == Command::Local => Opening::Probe,
            HeaderRead::Header(h, early) => {
                let client = h.source.map(canonical).unwrap_or(peer.0);
                let info = ConnInfo { port, peer, client: ClientAddr(client), endpoint: h.vpc_endpoint };
                Opening::Client(info, early)
            }
        },
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
                fmt_duration(timeout)
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

/// Whether a connection that is about to be refused is really a probe: with
/// PROXY off and no byte seen yet, wait (up to `header_timeout`) for its first byte or
/// its close. With a header, bytes have been sent: not a probe.
pub(super) async fn is_probe(stream: &TcpStream, pp: &ProxyProtocol, early: &[u8]) -> bool {
    if pp.mode != ProxyMode::Off || !early.is_empty() {
        return false;
    }
    matches!(tokio::time::timeout(pp.header_timeout, closes_without_data(stream)).await, Ok(true))
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
