//! Socket options: one function for both sides of a session, plus listener
//! and dialer construction (binding an egress source address).
//!
//! A failed option is logged and the connection goes on: a session without
//! keepalive is worse than one with it, but better than none. This module
//! sets options and builds listeners; it must not dial or accept.
//! `IP_BIND_ADDRESS_NO_PORT`, which neither rustix nor socket2 wraps, is
//! set through `crate::sys`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Keepalive;

/// Listen backlog: connection bursts (an NLB health-check sweep, a fleet
/// reconnecting after a deploy) must not see SYNs dropped. The kernel caps it
/// at `net.core.somaxconn`.
pub(crate) const LISTEN_BACKLOG: i32 = 4096;

/// Set TCP keepalive, TCP_USER_TIMEOUT and TCP_NODELAY on a session socket. `side` names it in
/// the warning ("client" or "target").
pub(crate) fn apply_session_opts(stream: &TcpStream, ka: &Keepalive, side: &'static str) {
    apply_opts(SockRef::from(stream), ka, side);
}

/// Set the session options on a listening socket: on Linux the sockets it
/// accepts inherit keepalive and TCP_NODELAY, which spares five `setsockopt`
/// calls per connection.
pub(crate) fn apply_listener_opts(listener: &TcpListener, ka: &Keepalive) {
    apply_opts(SockRef::from(listener), ka, "listener");
}

/// Whether accepted sockets inherit the listener's keepalive and nodelay.
pub(crate) const ACCEPTED_INHERIT_OPTS: bool = cfg!(target_os = "linux");

fn apply_opts(sock: SockRef<'_>, ka: &Keepalive, side: &'static str) {
    let params = TcpKeepalive::new().with_time(ka.time).with_interval(ka.interval).with_retries(ka.retries);
    if let Err(e) = sock.set_tcp_keepalive(&params) {
        tracing::warn!(side, error = %e, "could not set TCP keepalive; idle sessions may be cut by the NLB");
    }
    // Keepalive only probes idle sockets. A peer that vanishes while data is
    // in flight would otherwise hold the session for the kernel's ~15 minutes
    // of retransmissions; give up in the same time keepalive would.
    let user_timeout = ka.time + ka.interval * ka.retries;
    if let Err(e) = sock.set_tcp_user_timeout(Some(user_timeout)) {
        tracing::warn!(side, error = %e, "could not set TCP_USER_TIMEOUT");
    }
    if let Err(e) = sock.set_nodelay(true) {
        tracing::warn!(side, error = %e, "could not set TCP_NODELAY");
    }
}

/// Bind a listening socket on `addr:port` with SO_REUSEADDR (restart while old
/// connections sit in TIME_WAIT) and, for `::`, dual stack.
pub(crate) fn bind_listener(addr: IpAddr, port: u16) -> io::Result<TcpListener> {
    bind_listener_with(addr, port, None)
}

/// [`bind_listener`], with the session options set before `listen`, so even
/// the first connection accepted inherits them.
pub(crate) fn bind_listener_with(addr: IpAddr, port: u16, ka: Option<&Keepalive>) -> io::Result<TcpListener> {
    let sa = SocketAddr::new(addr, port);
    // Non-blocking from `socket(2)` on (SOCK_NONBLOCK): two `fcntl` calls
    // fewer per listener, which at 10,000 listeners is ~4% of startup.
    let socket = Socket::new(Domain::for_address(sa), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() && addr.is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&sa.into())?;
    if let Some(ka) = ka {
        apply_opts(SockRef::from(&socket), ka, "listener");
    }
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Bind a dialing socket to the egress source `addr` without taking a port:
/// with `IP_BIND_ADDRESS_NO_PORT` the kernel picks the port at `connect`,
/// per destination, so a source address serves as many sessions as plain
/// dials would (binding port 0 without it would reserve a port per socket
/// across all destinations, and run out near 28,000 sessions).
pub(crate) fn bind_source(socket: &tokio::net::TcpSocket, addr: IpAddr) -> io::Result<()> {
    if let Err(e) = crate::sys::set_bind_address_no_port(socket.as_fd()) {
        warn_once_no_port(&e);
    }
    socket.bind(SocketAddr::new(addr, 0))
}

/// Whether `addr` can be bound as an egress source on this host (it is one
/// of its addresses). Binds without a port and closes at once: no port is
/// taken and nothing is sent.
fn check_source(addr: IpAddr) -> io::Result<()> {
    let socket =
        Socket::new(Domain::for_address(SocketAddr::new(addr, 0)), Type::STREAM, Some(Protocol::TCP))?;
    let _ = crate::sys::set_bind_address_no_port(socket.as_fd());
    socket.bind(&SocketAddr::new(addr, 0).into())
}

/// An egress source address that cannot be bound on this host.
#[derive(Debug, thiserror::Error)]
#[error("cannot dial from source address {addr}: {source}{hint}")]
pub struct SourceBindError {
    addr: IpAddr,
    #[source]
    source: io::Error,
    hint: &'static str,
}

/// [`check_source`] for each of `addrs`: the first that fails, named.
pub(crate) fn check_sources(addrs: &[IpAddr]) -> Result<(), SourceBindError> {
    for &addr in addrs {
        if let Err(source) = check_source(addr) {
            let hint = if source.kind() == io::ErrorKind::AddrNotAvailable {
                " (it is not an address of this host: add it to an interface, e.g. a secondary private IP on the ENI, or remove it from source)"
            } else {
                ""
            };
            return Err(SourceBindError { addr, source, hint });
        }
    }
    Ok(())
}

/// A kernel without `IP_BIND_ADDRESS_NO_PORT` (before Linux 4.2) still
/// dials, with a port per bound socket; say so once, not per session.
fn warn_once_no_port(e: &io::Error) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(error = %e, "could not set IP_BIND_ADDRESS_NO_PORT; each dial from a source address holds a local port of its own");
    }
}

/// Reset a connection on close (SO_LINGER 0), to pass a reset on.
pub(crate) fn set_reset_on_close(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keepalive_and_nodelay_are_set_on_both_sides() {
        let listener = bind_listener("127.0.0.1".parse().unwrap(), 0).unwrap();
        let addr = listener.local_addr().unwrap();
        let dial = tokio::spawn(TcpStream::connect(addr));
        let (server, _) = listener.accept().await.unwrap();
        let client = dial.await.unwrap().unwrap();
        let ka = Keepalive {
            time: Duration::from_secs(37),
            interval: Duration::from_secs(11),
            retries: 5,
            idle_timeout_limit: Duration::from_secs(350),
        };
        for (s, side) in [(&server, "client"), (&client, "target")] {
            apply_session_opts(s, &ka, side);
            let r = SockRef::from(s);
            assert!(r.keepalive().unwrap());
            assert_eq!(r.keepalive_time().unwrap(), Duration::from_secs(37));
            assert_eq!(r.keepalive_interval().unwrap(), Duration::from_secs(11));
            assert_eq!(r.keepalive_retries().unwrap(), 5);
            assert!(r.nodelay().unwrap());
            assert_eq!(r.tcp_user_timeout().unwrap(), Some(Duration::from_secs(37 + 11 * 5)));
        }
    }

    #[tokio::test]
    async fn accepted_sockets_inherit_the_listener_options() {
        if !ACCEPTED_INHERIT_OPTS {
            return;
        }
        let ka = Keepalive {
            time: Duration::from_secs(41),
            interval: Duration::from_secs(13),
            retries: 6,
            idle_timeout_limit: Duration::from_secs(350),
        };
        let listener = bind_listener_with("127.0.0.1".parse().unwrap(), 0, Some(&ka)).unwrap();
        let addr = listener.local_addr().unwrap();
        let dial = tokio::spawn(TcpStream::connect(addr));
        let (server, _) = listener.accept().await.unwrap();
        dial.await.unwrap().unwrap();
        let r = SockRef::from(&server);
        assert!(r.keepalive().unwrap());
        assert_eq!(r.keepalive_time().unwrap(), Duration::from_secs(41));
        assert_eq!(r.keepalive_interval().unwrap(), Duration::from_secs(13));
        assert_eq!(r.keepalive_retries().unwrap(), 6);
        assert_eq!(r.tcp_user_timeout().unwrap(), Some(Duration::from_secs(41 + 13 * 6)));
        assert!(r.nodelay().unwrap());
    }

    #[test]
    fn only_addresses_of_this_host_pass_the_source_check() {
        assert!(check_sources(&["127.0.0.21".parse().unwrap(), "127.0.0.1".parse().unwrap()]).is_ok());
        // A documentation address (RFC 5737): binding it fails, nothing is sent.
        let e = check_sources(&["127.0.0.1".parse().unwrap(), "192.0.2.1".parse().unwrap()]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("cannot dial from source address 192.0.2.1: "), "{msg}");
        assert!(msg.contains("not an address of this host"), "{msg}");
    }

    #[tokio::test]
    async fn a_source_bound_socket_dials_from_it() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = l.local_addr().unwrap();
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        bind_source(&s, "127.0.0.22".parse().unwrap()).unwrap();
        // No port yet: the kernel picks it at connect.
        assert_eq!(s.local_addr().unwrap().port(), 0);
        let dial = tokio::spawn(s.connect(to));
        let (_server, peer) = l.accept().await.unwrap();
        dial.await.unwrap().unwrap();
        assert_eq!(peer.ip(), "127.0.0.22".parse::<IpAddr>().unwrap());
    }

    #[tokio::test]
    async fn listeners_are_non_blocking_from_creation() {
        // tokio needs it (a blocking accept would stall a worker); it is set at
        // socket(2) now, not by a later fcntl, so check the socket itself.
        let l = bind_listener("127.0.0.1".parse().unwrap(), 0).unwrap();
        assert!(SockRef::from(&l).nonblocking().unwrap());
    }

    #[tokio::test]
    async fn dual_stack_listener_accepts_ipv4() {
        let Ok(listener) = bind_listener("::".parse().unwrap(), 0) else {
            // Under CI this test must run: a skip would assert nothing.
            let ci = matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"));
            assert!(!ci, "IPv6 is not available on this host, and CI=true needs this test to run");
            eprintln!("skipped: IPv6 is not available on this host");
            return;
        };
        let port = listener.local_addr().unwrap().port();
        let dial = tokio::spawn(TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))));
        let (_s, peer) = listener.accept().await.unwrap();
        dial.await.unwrap().unwrap();
        assert_eq!(peer.ip().to_canonical(), "127.0.0.1".parse::<IpAddr>().unwrap());
    }
}
