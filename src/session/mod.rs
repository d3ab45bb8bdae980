//! One client connection, from accept to its log line.
//!
//! The steps, each in its own file, in the order a connection meets them:
//!
//! 1. [`header`]: the PROXY header (or probe detection), under its timeout;
//! 2. [`admission`]: route lookup, allowlists, limits;
//! 3. [`dial`]: the target connection;
//! 4. the session is registered (`crate::node::registry`, its `session
//!    opened` line), then forwards (`crate::forward`) until it ends or is
//!    asked to close through its registry entry;
//! 5. [`record`]: counters and the `session closed` line.
//!
//! Every step that can wait (the header, the dial) runs here, inside the
//! session's own task and under its own timeout, never in the accept loop.
//! A connection is judged by one snapshot, taken when its session starts
//! (header policy and admission agree). Later changes reach a running
//! session only as a close request on its entry: an operator's, a reload's
//! revocation after `revoke_grace` (the node walks the registry), the end
//! of the drain. A session that registers while one of those happens
//! catches up by itself ([`catch_up`]).
//!
//! No step calls back up: this module drives them, and learns of reloads and
//! shutdown only through [`NodeState`] and its registry.

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

use tokio::net::TcpStream;
use tokio::time::Instant;

use self::addr::{canonical, ConnInfo, PeerAddr};
use self::admission::{Admission, Refusal};
use self::header::Opening;
use self::record::SessionEnd;
use crate::forward::{ByteSink, End, Forward, Frozen, Side};
use crate::node::registry::{Ask, Entry, Registration};
use crate::node::state::{NodeState, SessionGuard, Snapshot, SourceSlot, Subscription};
use crate::reason::{CloseReason, Reject};
use crate::routes::RouteSlot;
use crate::sockopt;
use crate::upgrade::handed::Deposit;

/// Serve one accepted connection to its end.
///
/// Two phases with different lifetimes. Setup (header, admission, dial) is
/// short and holds timers, a header buffer and dial state; it runs as its
/// own boxed future, freed as soon as the target answers. Forwarding can
/// last hours, mostly idle: its state is all an idle session costs, so it is
/// kept small (two sockets, two directions, and one boxed record of who the
/// session is and what it holds, which is also the forwarder's byte sink).
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
        let Some(mut fwd) = setup.await else {
            return;
        };
        let ending = watch(&mut fwd).await;
        conclude(fwd, &state, ending);
    }
}

/// A session carried on from where it was frozen: handed over by a
/// predecessor process, or handed back after a failed upgrade.
// Not an `async fn`, which would keep its argument twice in the state.
#[allow(clippy::manual_async_fn)]
pub(crate) fn resume(mut fwd: SessionForward, state: Arc<NodeState>) -> impl Future<Output = ()> {
    async move {
        let ending = watch(&mut fwd).await;
        conclude(fwd, &state, ending);
    }
}

/// Carry a frozen session on in this process: handed over by a
/// predecessor, or handed back after a failed upgrade. A session that
/// cannot be thawed (out of descriptors) is closed and logged.
pub(crate) fn carry_on(state: &Arc<NodeState>, entry: Arc<Entry>, frozen: Frozen) {
    entry.cancel_handover();
    let idle = state.snapshot().config.timeouts.idle;
    let idle_for = entry.live().idle;
    let meta = Meta::carried_on(state, Arc::clone(&entry));
    match Forward::thaw(frozen, idle, idle_for, meta) {
        Ok(fwd) => {
            state.sessions.spawn(resume(fwd, Arc::clone(state)));
        }
        Err(e) => {
            state.states.state_of(&entry.route).metrics.closed(CloseReason::Error).increment(1);
            let end = SessionEnd {
                id: entry.id,
                route: &entry.route,
                info: &entry.info,
                bytes: (entry.live().to_target, entry.live().to_client),
                elapsed: entry.opened.elapsed(),
            };
            end.log(CloseReason::Error, Some(&format!("cannot carry the session on: {e}")), None);
        }
    }
}

/// A running session's forwarder; its sink holds who the session is.
pub(crate) type SessionForward = Forward<Box<Meta>>;

/// What the session holds until its end (limits, the active count) and who
/// it is; boxed, out of the forwarding state.
pub(crate) struct Meta {
    route_slot: RouteSlot,
    /// Held for their drop: the per-source count and the active count.
    _source_slot: Option<SourceSlot>,
    _session: SessionGuard,
    /// Who the session is (id, route, connection, live counts), kept in the
    /// node's registry from the dial's success until the session's log line.
    registration: Registration,
}

impl Meta {
    /// What a session carried on in this process holds: its registry entry,
    /// a slot on its route and its client (taken regardless of the limits:
    /// the session was admitted already), and the active count.
    pub(crate) fn carried_on(state: &Arc<NodeState>, entry: Arc<Entry>) -> Box<Meta> {
        let route_state = state.states.state_of(&entry.route);
        let route_slot = route_state.try_acquire(0).expect("a slot without a limit is always free");
        let source_slot = if state.snapshot().config.access.max_per_source > 0 {
            state.try_acquire_source(entry.info.client.0.ip(), u32::MAX)
        } else {
            None
        };
        let session = state.session_guard();
        let registration = state.registry.register_shared(entry);
        Box::new(Meta { route_slot, _source_slot: source_slot, _session: session, registration })
    }

    pub(crate) fn entry(&self) -> &Entry {
        self.registration.entry()
    }
}

/// Counts forwarded bytes into the route's series and the session's entry
/// (the live counts `GET /sessions` shows).
impl ByteSink for Box<Meta> {
    fn to_target(&self, n: u64) {
        self.route_slot.state().metrics.bytes_to_target.increment(n);
        self.registration.entry().moved_to_target(n);
    }
    fn to_client(&self, n: u64) {
        self.route_slot.state().metrics.bytes_to_client.increment(n);
        self.registration.entry().moved_to_client(n);
    }
}

/// How a session's forwarding stopped.
enum Ending {
    /// The session is over: why, and the I/O error if there was one.
    Closed(CloseReason, Option<io::Error>),
    /// The node asked for its state (upgrade in place).
    Handover,
}

/// Count, release and log a session that stopped; or, for a handover,
/// freeze it and give it to the node.
fn conclude(mut fwd: SessionForward, state: &Arc<NodeState>, ending: Ending) {
    let (close, error) = match ending {
        Ending::Closed(close, error) => (close, error),
        Ending::Handover => match fwd.freeze() {
            Ok(frozen) => {
                let entry = fwd.sink().registration.shared();
                // Deregisters it and releases its slots; the peers see
                // nothing (the frozen state holds duplicates of the sockets).
                drop(fwd);
                if let Err((entry, frozen)) = state.handover.deposit(entry, Deposit::Frozen(frozen)) {
                    // Nobody collects any more (the upgrade ended meanwhile).
                    carry_on(state, entry, frozen);
                }
                return;
            }
            Err(e) => {
                // Out of descriptors: tell the upgrade (it gives up and
                // hands everything back), and end this one session here.
                let _ = state.handover.deposit(fwd.sink().registration.shared(), Deposit::Failed(e.kind()));
                fwd.close_both();
                (
                    CloseReason::Error,
                    Some(io::Error::new(e.kind(), format!("cannot hand the session over: {e}"))),
                )
            }
        },
    };
    let bytes = fwd.bytes();
    let entry = fwd.sink().registration.shared();
    // A handover asked just as it ended is answered: nothing to hand over.
    if entry.finish() == Some(Ask::Handover) {
        let _ = state.handover.deposit(Arc::clone(&entry), Deposit::Ended);
    }
    let elapsed = entry.opened.elapsed();
    let metrics = &fwd.sink().route_slot.state().metrics;
    metrics.session_duration.record(elapsed.as_secs_f64());
    metrics.closed(close).increment(1);
    // Slots, the active count and the registry entry go before the line.
    drop(fwd);
    let end = SessionEnd { id: entry.id, route: &entry.route, info: &entry.info, bytes, elapsed };
    end.log(close, error.as_ref().map(|e| e as &dyn std::fmt::Display), None);
}

/// Header, admission and dial, all judged by one snapshot; the forwarder
/// of the opened session. `None` when the connection was refused, was a
/// probe, or the dial failed (each already counted and logged).
async fn setup(
    stream: TcpStream,
    peer: SocketAddr,
    port: u16,
    state: Arc<NodeState>,
) -> Option<SessionForward> {
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
    let id = state.registry.new_id();

    // 3. Dial.
    let started = Instant::now();
    let target = match dial::dial(&route, &info, snap.config.timeouts.connect).await {
        Ok(t) => t,
        Err(e) => {
            let kind = e.kind();
            metrics.connect_error(kind).increment(1);
            metrics.closed(CloseReason::Error).increment(1);
            close_cleanly(&stream);
            let elapsed = started.elapsed();
            let end = SessionEnd { id, route: &route, info: &info, bytes: (0, 0), elapsed };
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
    drop(snap);
    let registration = state.registry.register(Entry::new(id, route, info));
    record::opened(registration.entry());
    catch_up(&state, sub, registration.entry());
    let meta = Box::new(Meta { route_slot, _source_slot: source_slot, _session: session, registration });
    Some(Forward::new(stream, target, early, idle, meta))
}

/// A session that registers while the node moves on: if the drain ended,
/// a reload published since its admission no longer admits it, or its
/// route's window ended while it dialed, it is asked to close at once. Those ends and this check both go through the
/// registry's lock (the closer sets its flag, then walks the registry; the
/// session inserts itself, then reads the flag), so a session is either
/// walked over or sees the change here, never neither.
fn catch_up(state: &NodeState, admitted_under: Subscription, entry: &Entry) {
    if state.is_closing() {
        entry.request_close(CloseReason::Shutdown);
        return;
    }
    let snap = state.snapshot();
    if state.republished_since(admitted_under) && !admission::still_admits(&snap, &entry.route, &entry.info) {
        entry.request_close(CloseReason::Revoked);
    } else if let Some(reason) = crate::node::deadlines::due(&snap, entry, std::time::SystemTime::now()) {
        // The window ended while it dialed (the keeper's walk may have passed).
        entry.request_close(reason);
    }
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

/// Forward until the session ends by itself or is asked, through its
/// registry entry, to close (an operator, a revocation, the end of the
/// drain) or to hand its state over (upgrade in place). The request is the
/// only thing an idle session waits on beside its sockets.
async fn watch(fwd: &mut SessionForward) -> Ending {
    let mut registered = false;
    let woke = std::future::poll_fn(|cx| {
        if let Some(ask) = fwd.sink().entry().poll_ask(cx, !registered) {
            return Poll::Ready(Err(ask));
        }
        registered = true;
        Pin::new(&mut *fwd).poll(cx).map(Ok)
    })
    .await;
    let closed = |c| Ending::Closed(c, None);
    match woke {
        Err(Ask::Handover) => Ending::Handover,
        Err(Ask::Close(reason)) => {
            fwd.close_both();
            closed(reason)
        }
        Ok(End::Closed { first: Side::Client }) => closed(CloseReason::ClientClosed),
        Ok(End::Closed { first: Side::Target }) => closed(CloseReason::TargetClosed),
        Ok(End::Reset { side: Side::Client }) => closed(CloseReason::ClientClosed),
        Ok(End::Reset { side: Side::Target }) => closed(CloseReason::TargetClosed),
        Ok(End::Error { error, .. }) => Ending::Closed(CloseReason::Error, Some(error)),
        Ok(End::Idle) => {
            fwd.close_both();
            closed(CloseReason::IdleTimeout)
        }
    }
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
