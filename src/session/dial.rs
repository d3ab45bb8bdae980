//! Step 3 of a session: dial the route's target within `timeouts.connect`,
//! and name a failure's kind for `portgate_upstream_connect_errors_total`.
//!
//! A `host:port` target is resolved at each connect, and every address it
//! resolves to is tried in turn under the one deadline. A lookup holds a
//! blocking thread for as long as the resolver takes (getaddrinfo cannot be
//! cancelled), so at most [`MAX_LOOKUPS`] run at once: a resolver that hangs
//! costs those threads and times out the sessions that wait, but it cannot
//! use up the runtime's blocking pool. This module dials; it must not count,
//! log or set session options (the caller does).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::Target;
use crate::reason::ConnectErrorKind;

/// Name lookups in flight at most (each one blocking thread).
const MAX_LOOKUPS: usize = 64;
static LOOKUPS: Semaphore = Semaphore::const_new(MAX_LOOKUPS);

/// A failed dial.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    #[error("connect timed out")]
    Timeout,
    #[error("name lookup failed: {0}")]
    Resolve(String),
    #[error("name lookup timed out (the resolver did not answer within timeouts.connect)")]
    ResolveTimeout,
    #[error("{0}")]
    Io(io::Error),
}

impl DialError {
    /// The `kind` label of this failure.
    pub(crate) fn kind(&self) -> ConnectErrorKind {
        match self {
            DialError::Timeout | DialError::ResolveTimeout => ConnectErrorKind::Timeout,
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
}

/// Dial a route's target; a name is resolved at each connect.
pub(crate) async fn dial(target: &Target, timeout: Duration) -> Result<TcpStream, DialError> {
    match target {
        Target::Addr(a) => connect(*a, timeout).await,
        Target::Name { host, port } => {
            let deadline = Instant::now() + timeout;
            let addrs = resolve(host, *port, deadline).await?;
            let mut last = DialError::Resolve(format!("{host} has no addresses"));
            for addr in addrs {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(DialError::Timeout);
                }
                match connect(addr, left).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = e,
                }
            }
            Err(last)
        }
    }
}

/// Resolve `host:port` by the system resolver by `deadline`, within the
/// bound on concurrent lookups.
async fn resolve(host: &str, port: u16, deadline: Instant) -> Result<Vec<SocketAddr>, DialError> {
    let permit = tokio::time::timeout_at(deadline, LOOKUPS.acquire())
        .await
        .map_err(|_| DialError::ResolveTimeout)?
        .map_err(|_| DialError::Resolve("the resolver is shut down".into()))?;
    let name = (host.to_owned(), port);
    // The permit lives as long as the blocking call, not as long as our wait.
    let lookup = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        std::net::ToSocketAddrs::to_socket_addrs(&(name.0.as_str(), name.1)).map(Iterator::collect)
    });
    match tokio::time::timeout_at(deadline, lookup).await {
        Err(_) => Err(DialError::ResolveTimeout),
        Ok(Err(e)) => Err(DialError::Resolve(format!("lookup task failed: {e}"))),
        Ok(Ok(Err(e))) => Err(DialError::Resolve(e.to_string())),
        Ok(Ok(Ok(addrs))) => Ok(addrs),
    }
}

/// Dial one address within `timeout`.
async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, DialError> {
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
            .map_err(DialError::Io)?;
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(DialError::Io(e)),
        Err(_) => Err(DialError::Timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_dial_is_kind_refused() {
        // A port nobody listens on: bind one, learn it, close it.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = dial(&Target::Addr(addr), Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(e.kind(), ConnectErrorKind::Refused, "{e}");
    }
}
