//! Step 3 of a session: dial the route's target within `timeouts.connect`,
//! from the egress source address the client maps to, and name a failure's
//! kind for `portgate_upstream_connect_errors_total`.
//!
//! With a `source` list, each dial binds one of its addresses of the
//! target's family (the kernel still picks the port). Which one is a
//! rendezvous hash of the admitted client's IP (not its port) and the
//! endpoint id over each address, with fixed constants: the same client
//! appears as the same source on every node and after every restart,
//! different clients spread over the list, the list's order does not
//! matter, and adding or removing an address moves only the clients that
//! hashed to it.
//!
//! A `host:port` target is resolved at each connect, and every address it
//! resolves to is tried in turn under the one deadline. A lookup holds a
//! blocking thread for as long as the resolver takes (getaddrinfo cannot be
//! cancelled), so at most [`MAX_LOOKUPS`] run at once: a resolver that hangs
//! costs those threads and times out the sessions that wait, but it cannot
//! use up the runtime's blocking pool. This module dials; it must not count,
//! log or set session options (the caller does).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::addr::ConnInfo;
use crate::config::{Route, Target};
use crate::reason::ConnectErrorKind;
use crate::sockopt;

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
    #[error("source lists no {family} address to dial {addr} from")]
    NoSource { addr: SocketAddr, family: &'static str },
    #[error("cannot bind source address {addr}: {error}")]
    Source { addr: IpAddr, error: io::Error },
    #[error("{0}")]
    Io(io::Error),
}

impl DialError {
    /// The `kind` label of this failure.
    pub(crate) fn kind(&self) -> ConnectErrorKind {
        match self {
            DialError::Timeout | DialError::ResolveTimeout => ConnectErrorKind::Timeout,
            DialError::Resolve(_) | DialError::NoSource { .. } => ConnectErrorKind::Unreachable,
            DialError::Source { .. } => ConnectErrorKind::Other,
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

/// Dial `route`'s target for the connection `info`, from the source
/// address it maps to; a name is resolved at each connect.
pub(crate) async fn dial(route: &Route, info: &ConnInfo, timeout: Duration) -> Result<TcpStream, DialError> {
    let key = SourceKey { client: info.client.0.ip(), endpoint: info.endpoint.as_deref() };
    match &route.target {
        Target::Addr(a) => connect(*a, pick_source(&route.source, *a, key)?, timeout).await,
        Target::Name { host, port } => {
            let deadline = Instant::now() + timeout;
            let addrs = resolve(host, *port, deadline).await?;
            let mut last = DialError::Resolve(format!("{host} has no addresses"));
            for addr in addrs {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(DialError::Timeout);
                }
                // An address of a family the source list lacks is skipped.
                let source = match pick_source(&route.source, addr, key) {
                    Ok(s) => s,
                    Err(e) => {
                        last = e;
                        continue;
                    }
                };
                match connect(addr, source, left).await {
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

/// What the source choice is keyed on: the client's IP and the endpoint.
#[derive(Debug, Clone, Copy)]
struct SourceKey<'a> {
    client: IpAddr,
    endpoint: Option<&'a str>,
}

/// The source address to dial `target` from: `None` without a source list
/// (the kernel chooses); else the address of the target's family that
/// scores highest for `key`.
fn pick_source(
    sources: &[IpAddr],
    target: SocketAddr,
    key: SourceKey<'_>,
) -> Result<Option<IpAddr>, DialError> {
    if sources.is_empty() {
        return Ok(None);
    }
    let chosen =
        sources.iter().filter(|s| s.is_ipv4() == target.is_ipv4()).max_by_key(|s| score(key, **s)).copied();
    match chosen {
        Some(s) => Ok(Some(s)),
        None => {
            Err(DialError::NoSource { addr: target, family: if target.is_ipv4() { "IPv4" } else { "IPv6" } })
        }
    }
}

/// The rendezvous score of `source` for `key`: FNV-1a (64-bit) over the
/// client IP (IPv4 as IPv4-mapped, so both spellings agree), the endpoint
/// and the source, then the MurmurHash3 finalizer to spread FNV's low bits.
/// These constants are part of the behaviour: changing them moves every
/// operator to another source address.
fn score(key: SourceKey<'_>, source: IpAddr) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let octets = |ip: IpAddr| match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let mut h = OFFSET;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
    };
    feed(&octets(key.client));
    match key.endpoint {
        Some(ep) => {
            feed(&[1]);
            feed(ep.as_bytes());
        }
        None => feed(&[0]),
    }
    feed(&[0xff]);
    feed(&octets(source));
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Dial one address within `timeout`, from `source` when given.
async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<TcpStream, DialError> {
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
            .map_err(DialError::Io)?;
    if let Some(source) = source {
        sockopt::bind_source(&socket, source).map_err(|error| DialError::Source { addr: source, error })?;
    }
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(DialError::Io(e)),
        Err(_) => Err(DialError::Timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::session::addr::{ClientAddr, PeerAddr};

    fn info(client: &str, endpoint: Option<&str>) -> ConnInfo {
        let client: SocketAddr = client.parse().unwrap();
        ConnInfo {
            port: 1,
            peer: PeerAddr(client),
            client: ClientAddr(client),
            endpoint: endpoint.map(Into::into),
        }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[tokio::test]
    async fn a_refused_dial_is_kind_refused() {
        // A port nobody listens on: bind one, learn it, close it.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let mut route = crate::routes::test_route("a", 1, None, &["0.0.0.0/0"], &[]);
        route.target = Target::Addr(addr);
        let e = dial(&route, &info("127.0.0.1:5000", None), Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(e.kind(), ConnectErrorKind::Refused, "{e}");
    }

    #[test]
    fn the_source_is_stable_and_spread_and_of_the_targets_family() {
        let pool = ips(&["10.0.5.10", "10.0.5.11", "10.0.5.12", "2001:db8::10"]);
        let v4: SocketAddr = "172.31.31.84:22".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::84]:22".parse().unwrap();
        let pick = |client: &str, ep: Option<&str>, to| {
            pick_source(&pool, to, SourceKey { client: client.parse().unwrap(), endpoint: ep })
                .unwrap()
                .unwrap()
        };
        // The same client IP: the same address, whatever its port or spelling.
        let a = pick("172.31.25.9", Some("vpce-1"), v4);
        assert_eq!(pick("::ffff:172.31.25.9", Some("vpce-1"), v4), a);
        assert!(a.is_ipv4());
        assert_eq!(pick("172.31.25.9", None, v6), "2001:db8::10".parse::<IpAddr>().unwrap());
        // The list's order does not matter.
        let mut reversed = pool.clone();
        reversed.reverse();
        let key = SourceKey { client: "172.31.25.9".parse().unwrap(), endpoint: Some("vpce-1") };
        assert_eq!(pick_source(&reversed, v4, key).unwrap(), Some(a));
        // Clients spread over the whole list.
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..64 {
            seen.insert(pick(&format!("172.31.25.{i}"), None, v4));
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
        // Removing an address moves only the clients that had it.
        let fewer = ips(&["10.0.5.10", "10.0.5.11"]);
        for i in 0..64 {
            let key = SourceKey { client: format!("172.31.25.{i}").parse().unwrap(), endpoint: None };
            let before = pick_source(&pool, v4, key).unwrap().unwrap();
            if before != "10.0.5.12".parse::<IpAddr>().unwrap() {
                assert_eq!(pick_source(&fewer, v4, key).unwrap(), Some(before));
            }
        }
        // No address of the family: refused before any socket is made.
        let only_v4 = ips(&["10.0.5.10"]);
        let e = pick_source(&only_v4, v6, key).unwrap_err();
        assert_eq!(e.to_string(), "source lists no IPv6 address to dial [2001:db8::84]:22 from");
        assert_eq!(pick_source(&[], v6, key).unwrap(), None);
    }

    /// The hash is fixed: these values must never change (every node of a
    /// fleet, old and new, maps a client to the same source).
    #[test]
    fn the_score_is_fixed() {
        let key =
            SourceKey { client: "172.31.25.9".parse().unwrap(), endpoint: Some("vpce-0a1b2c3d4e5f67890") };
        let got = [score(key, "10.0.5.10".parse().unwrap()), score(key, "10.0.5.11".parse().unwrap())];
        assert_eq!(got, [0xf241_2450_cd9b_e39d, 0x8886_920b_de26_ad63]);
    }

    #[tokio::test]
    async fn a_dial_binds_the_chosen_source() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut route = crate::routes::test_route("a", 1, None, &["0.0.0.0/0"], &[]);
        route.target = Target::Addr(l.local_addr().unwrap());
        route.source = ips(&["127.0.0.21", "127.0.0.22", "127.0.0.23"]);
        let who = info("127.0.0.9:4000", None);
        let want = pick_source(
            &route.source,
            l.local_addr().unwrap(),
            SourceKey { client: who.client.0.ip(), endpoint: None },
        )
        .unwrap()
        .unwrap();
        let dialed =
            tokio::spawn(async move { dial(&route, &who, Duration::from_secs(5)).await.map(|_| ()) });
        let (_s, peer) = l.accept().await.unwrap();
        dialed.await.unwrap().unwrap();
        assert_eq!(peer.ip(), want);
    }
}
