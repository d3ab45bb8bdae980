//! One client connection, from accept to its log line.
//!
//! The steps, each in its own file, in the order a connection meets them:
//!
//! 1. [`header`]: the PROXY header (or probe detection), under its timeout;
//! 2. [`admission`]: route lookup, allowlists, limits;
//! 3. [`dial`]: the target connection;
//! 4. forward (`crate::forward`), watched for reloads and the drain's end;
//! 5. [`record`]: counters and the one log line.
//!
//! Every step that can wait (the header, the dial) runs here, inside the
//! session's own task and under its own timeout, never in the accept loop.
//! A connection is judged by one snapshot, taken when its session starts
//! (header policy and admission agree); a reload published after that is
//! seen through the node state's subscription, and a session the new config
//! would refuse is closed after `revoke_grace`.
//!
//! No step calls back up: this module drives them, and learns of reloads and
//! shutdown only through [`NodeState`].

pub(crate) mod addr;
pub(crate) mod admission;
mod dial;
mod header;
mod record;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use self::addr::{canonical, ConnInfo, PeerAddr};
use self::admission::{Admission, Refusal};
use self::header::Opening;
use self::record::SessionEnd;
use crate::forward::{ByteSink, End, Forward, Side};
use crate::node::registry::{Entry, Registration};
use crate::node::state::{NodeState, Observed, SessionGuard, Snapshot, SourceSlot, Subscription};
use crate::reason::{CloseReason, Reject};
use crate::routes::{RouteSlot, RouteState};
use crate::sockopt;

/// Serve one accepted connection to its end.
///
/// Two phases with different lifetimes. Setup (header, admission, dial) is
/// short and holds timers, a header buffer and dial state; it runs as its
/// own boxed future, freed as soon as the target answers. Forwarding can
/// last hours, mostly idle: its state is all an idle session costs, so it is
/// kept small (two sockets, two directions, one boxed record of who and
/// what for the log line, and a waiter for reloads and shutdown).
pub(crate) fn run(
    stream: TcpStream,
    peer: SocketAddr,
    port: u16,
    state: Arc<NodeState>,
) -> impl Future<Output = ()> {
    // Not an `async fn`: its arguments would sit in the session's state for
    // its whole life. The async block holds only the boxed setup and `state`.
    let setup = Box::pin(setup(stream, peer, port, Arc::clone(&state)));
    async move {
        let Some(Admitted { client, target, early, idle, sub, meta }) = setup.await else {
            return;
        };
        let sink = StateSink(meta.route_slot.state());
        let mut fwd = Forward::new(client, target, early, idle, &sink);
        let (close, error) = forward_watching(&state, &mut fwd, sub, &meta).await;
        let bytes = fwd.bytes();
        drop(fwd);
        let elapsed = meta.started.elapsed();
        meta.route_slot.state().metrics.session_duration.record(elapsed.as_secs_f64());
        let Meta { route_slot, source_slot, session, registration, .. } = *meta;
        drop((source_slot, route_slot, session));
        let who = registration.entry();
        let end = SessionEnd { route: &who.route, info: &who.info, bytes, elapsed };
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
    /// The publish the session was admitted under.
    sub: Subscription,
    meta: Box<Meta>,
}

/// Who the session is and what it holds, read at its end (log line, limits)
/// and on reloads (revocation); boxed, out of the forwarding state.
struct Meta {
    started: Instant,
    route_slot: RouteSlot,
    source_slot: Option<SourceSlot>,
    session: SessionGuard,
    /// Who the session is (route and connection), kept in the node's
    /// registry from the dial's success until the session's log line.
    registration: Registration,
}

/// Header, admission and dial, all judged by one snapshot. `None` when the
/// connection was refused, was a probe, or the dial failed (each already
/// counted and logged).
async fn setup(stream: TcpStream, peer: SocketAddr, port: u16, state: Arc<NodeState>) -> Option<Admitted> {
    let (sub, snap) = state.admission_view();
    let pp = &snap.config.proxy_protocol;
    let peer = PeerAddr(canonical(peer));

    // 1. PROXY header.
    let (info, early) = match header::read(&stream, peer, port, pp).await {
        Opening::Client(info, early) => (info, early),
        Opening::Probe => {
            state.metrics.health_checks.increment(1);
            return None;
        }
        Opening::BadHeader(info, detail) => {
            record::rejected(&state.metrics, &info, None, Reject::ProxyHeader, &detail);
            return None;
        }
    };

    // 2. Admission.
    let Admission { route, route_slot, source_slot } = match admission::admit_connection(&state, &snap, &info)
    {
        Ok(a) => a,
        Err(refusal) => {
            refuse(&state, &stream, &snap, &info, &early, refusal).await;
            return None;
        }
    };
    let session = state.session_guard();
    let metrics = &route_slot.state().metrics;
    metrics.accepted.increment(1);

    // 3. Dial.
    let started = Instant::now();
    let target = match dial::dial(&route, &info, snap.config.timeouts.connect).await {
        Ok(t) => t,
        Err(e) => {
            let kind = e.kind();
            metrics.connect_error(kind).increment(1);
            close_cleanly(&stream);
            let end = SessionEnd { route: &route, info: &info, bytes: (0, 0), elapsed: started.elapsed() };
            end.log(CloseReason::Error, Some(&e), Some(kind.as_str()));
            return None;
        }
    };
    metrics.connect_duration.record(started.elapsed().as_secs_f64());
    // The client socket inherited keepalive and nodelay from its listener.
    if !sockopt::ACCEPTED_INHERIT_OPTS {
        sockopt::apply_session_opts(&stream, &snap.config.keepalive, "client");
    }
    sockopt::apply_session_opts(&target, &snap.config.keepalive, "target");

    // The snapshot is not kept: a session lasting hours must not pin the
    // config (and route table) it started under.
    let idle = snap.config.timeouts.idle;
    let registration = state.registry.register(Entry { route, info });
    let meta = Box::new(Meta { started, route_slot, source_slot, session, registration });
    Some(Admitted { client: stream, target, early, idle, sub, meta })
}

/// Refuse a connection, unless it turns out to be a probe (closes without
/// sending a byte), which only counts as a health check.
async fn refuse(
    state: &NodeState,
    stream: &TcpStream,
    snap: &Snapshot,
    info: &ConnInfo,
    early: &[u8],
    refusal: Refusal,
) {
    if header::is_probe(stream, &snap.config.proxy_protocol, early).await {
        state.metrics.health_checks.increment(1);
        return;
    }
    record::rejected(&state.metrics, info, refusal.entry.as_ref(), refusal.reason, "");
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

/// Counts forwarded bytes into the route's series.
struct StateSink<'a>(&'a RouteState);

impl ByteSink for StateSink<'_> {
    fn to_target(&self, n: u64) {
        self.0.metrics.bytes_to_target.increment(n);
    }
    fn to_client(&self, n: u64) {
        self.0.metrics.bytes_to_client.increment(n);
    }
}

/// Forward, while also watching for the end of the drain and for reloads
/// that revoke this session.
async fn forward_watching(
    state: &NodeState,
    fwd: &mut Forward<'_, StateSink<'_>>,
    mut sub: Subscription,
    meta: &Meta,
) -> (CloseReason, Option<io::Error>) {
    // The revocation timer exists only once a reload revokes the session, so
    // an idle session's future does not carry a timer.
    let mut revoke: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        let mut changed = std::pin::pin!(state.changes());
        match state.observe(changed.as_mut(), &mut sub) {
            Observed::Nothing => {}
            Observed::Closing => {
                fwd.close_both();
                return (CloseReason::Shutdown, None);
            }
            Observed::Republished(snap) => {
                let who = meta.registration.entry();
                if admission::still_admits(&snap, &who.route, &who.info) {
                    revoke = None;
                } else if revoke.is_none() {
                    revoke = Some(Box::pin(tokio::time::sleep(snap.config.timeouts.revoke_grace)));
                }
            }
        }
        let woke = std::future::poll_fn(|cx| {
            if let Poll::Ready(end) = Pin::new(&mut *fwd).poll(cx) {
                return Poll::Ready(Wake::Forwarded(end));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use crate::node::state::Snapshot;

    #[tokio::test]
    async fn session_future_stays_small() {
        let cfg = Config::with_defaults("x.toml".into());
        let shared = NodeState::new(cfg, Arc::new(Metrics::new()));
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
        let shared = NodeState::new(cfg, Arc::new(Metrics::new()));

        let mut user = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (s, peer) = front.accept().await.unwrap();
        let task = tokio::spawn(run(s, peer, port, Arc::clone(&shared)));
        let (mut backend, _) = backend_l.accept().await.unwrap();
        let mut b = [0u8; 1];
        user.write_all(b"x").await.unwrap();
        backend.read_exact(&mut b).await.unwrap();

        // A reload to an equivalent config: the session stays, and the old
        // snapshot is held by nobody but this test.
        let old = shared.snapshot();
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
