//! Starting as the successor of a running node (upgrade in place): take its
//! listening sockets and running sessions over the handover channel
//! instead of binding, and start serving only once it commits (the
//! protocol is described in `crate::upgrade`).
//!
//! Until `Commit` this process accepts nothing and forwards nothing, so the
//! node it succeeds can still kill it and carry on; after `Commit` it owns
//! everything. Ports its config adds are bound here, ports it drops are
//! closed, sessions whose route it no longer admits are revoked after
//! `revoke_grace` (as a reload would).

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Node, StartError};
use crate::admin::AdminServer;
use crate::config::{Config, Route, Target};
use crate::control::{ControlServer, NodeRequest};
use crate::forward::Frozen;
use crate::listener::ListenerSet;
use crate::logging::LogControl;
use crate::metrics::Metrics;
use crate::node::registry::Entry;
use crate::node::state::{NodeState, Snapshot};
use crate::session::{self, admission};
use crate::upgrade::channel::{Channel, ChannelError};
use crate::upgrade::wire::{self, ListenerKind, Message};
use crate::upgrade::{convert, TAKEOVER_LIMIT, VERSIONS_ENV};

/// What the predecessor handed over, before this process commits to it.
struct Inheritance {
    ports: BTreeMap<u16, std::net::TcpListener>,
    admin: Option<std::net::TcpListener>,
    control: Option<(std::os::unix::net::UnixListener, PathBuf)>,
    sessions: Vec<(wire::Session, convert::Received)>,
    next_id: u64,
    from_version: String,
}

fn upgrade_error(e: impl std::fmt::Display) -> StartError {
    StartError::Upgrade(e.to_string())
}

/// The handover versions this build reads (a test can claim others).
fn versions_read() -> Vec<u16> {
    match std::env::var(VERSIONS_ENV) {
        Ok(list) => list.split(',').filter_map(|v| v.trim().parse().ok()).collect(),
        Err(_) => vec![wire::VERSION],
    }
}

async fn receive(chan: &Channel, by: Instant) -> Result<Inheritance, StartError> {
    let hello = Message::Hello { reads: versions_read(), version: env!("CARGO_PKG_VERSION").to_owned() };
    chan.send(&hello, &[], by).await.map_err(upgrade_error)?;
    let mut got = Inheritance {
        ports: BTreeMap::new(),
        admin: None,
        control: None,
        sessions: Vec::new(),
        next_id: 0,
        from_version: String::new(),
    };
    loop {
        let (m, fds) = chan.recv(by).await.map_err(upgrade_error)?;
        match m {
            Message::Listeners(kinds) => {
                for (kind, fd) in kinds.into_iter().zip(fds) {
                    match kind {
                        ListenerKind::Port(p) => {
                            got.ports.insert(p, std::net::TcpListener::from(fd));
                        }
                        ListenerKind::Admin => got.admin = Some(std::net::TcpListener::from(fd)),
                        ListenerKind::Control(path) => {
                            got.control = Some((std::os::unix::net::UnixListener::from(fd), path.into()))
                        }
                    }
                }
            }
            Message::Session(s) => {
                let received = convert::from_wire(&s, fds)
                    .ok_or_else(|| upgrade_error("a session came without its descriptors"))?;
                got.sessions.push((*s, received));
            }
            Message::Done { sessions, next_id, version } => {
                if sessions as usize != got.sessions.len() {
                    return Err(upgrade_error(format!(
                        "the node said it sent {sessions} sessions, {} arrived",
                        got.sessions.len()
                    )));
                }
                got.next_id = next_id;
                got.from_version = version;
                return Ok(got);
            }
            Message::Fail(why) => return Err(upgrade_error(format!("the running node refused: {why}"))),
            other => return Err(upgrade_error(format!("unexpected handover message {other:?}"))),
        }
    }
}

/// Read back a target as `Display` wrote it (a handover carries targets
/// as text); `None` for anything else.
fn target_from_shown(s: &str) -> Option<Target> {
    if let Ok(a) = s.parse::<std::net::SocketAddr>() {
        return Some(Target::Addr(a));
    }
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse().ok().filter(|p| *p > 0)?;
    (!host.is_empty()).then(|| Target::Name { host: host.to_owned(), port })
}

/// What is left of a route that a carried-on session was admitted on and
/// the config serving now no longer has: its identity and target, no
/// rules, so every admission check refuses it and the session is revoked
/// after `revoke_grace`, as a reload that removes the route would.
fn remnant(s: &wire::Session, target: Target) -> Route {
    Route {
        name: s.route.as_str().into(),
        port: s.port,
        via: s.via.clone(),
        target,
        tenant: s.tenant.as_str().into(),
        allow: Default::default(),
        endpoints: Vec::new(),
        max_connections: 0,
        ssh_user: None,
        not_before: None,
        not_after: None,
        max_session: None,
        source: Vec::new(),
    }
}

/// The route a carried-on session keeps: the config's route of that name
/// when it still matches what the session was admitted on, else a copy
/// with the session's own port, via, tenant and target (the listing and
/// the revocation check judge what the session is), or a remnant when the
/// config has no such route (revoked after `revoke_grace`).
fn route_for(snap: &Snapshot, s: &wire::Session) -> Arc<Route> {
    let target = target_from_shown(&s.target);
    match snap.table.by_name(&s.route) {
        Some(e) => {
            let r = &e.route;
            if r.tenant == s.tenant
                && r.port == s.port
                && r.via == s.via
                && Some(&r.target) == target.as_ref()
            {
                return Arc::clone(r);
            }
            let mut own = (**r).clone();
            own.tenant = s.tenant.as_str().into();
            own.port = s.port;
            own.via = s.via.clone();
            if let Some(t) = target {
                own.target = t;
            }
            Arc::new(own)
        }
        None => {
            let t = target.unwrap_or(Target::Name { host: s.target.clone(), port: s.port });
            Arc::new(remnant(s, t))
        }
    }
}

impl Node {
    /// Take over from the node whose handover channel is `fd`.
    pub(super) async fn take_over(
        config: Config,
        log: LogControl,
        requests: mpsc::Sender<NodeRequest>,
        fd: OwnedFd,
    ) -> Result<Node, StartError> {
        let by = Instant::now() + TAKEOVER_LIMIT;
        let chan = Channel::new(fd).map_err(upgrade_error)?;
        let mut got = receive(&chan, by).await?;
        let chan = &chan;
        let fail = |why: String| async move {
            let _ = chan.send(&Message::Fail(why.clone()), &[], by).await;
            StartError::Upgrade(why)
        };

        let config_path = config.source.clone();
        let addr = config.listen.address;
        let ports = config.listen_ports();
        let keepalive = config.keepalive.clone();
        let admin_addr = config.admin.listen;
        let control_path = config.control.socket.clone();
        let state = NodeState::new(config, Arc::new(Metrics::new()));
        state.registry.continue_from(got.next_id);
        let mut listeners = ListenerSet::default();
        let bound = match listeners.bind_inherited(addr, &ports, &keepalive, &mut got.ports) {
            Ok(b) => b,
            Err(e) => return Err(fail(e.to_string()).await),
        };
        let snap = state.snapshot();
        let carried: Vec<(Arc<Entry>, Frozen)> = got
            .sessions
            .drain(..)
            .map(|(s, r)| {
                let route = route_for(&snap, &s);
                (Arc::new(Entry::carried_on(r.id, route, r.info, r.carried)), r.frozen)
            })
            .collect();
        drop(snap);

        chan.send(&Message::Adopted { sessions: carried.len() as u32 }, &[], by)
            .await
            .map_err(upgrade_error)?;
        match chan.recv(by).await {
            Ok((Message::Commit, _)) => {}
            Ok((other, _)) => return Err(upgrade_error(format!("expected Commit, got {other:?}"))),
            Err(ChannelError::Closed) => {
                return Err(upgrade_error("the running node gave up the upgrade and keeps serving"))
            }
            Err(e) => return Err(upgrade_error(e)),
        }

        // Committed: this process serves everything from here on.
        listeners.commit(bound, &ports, &keepalive, &state).await;
        // Ready before the admin socket is served: the balancer's health
        // checks queued on it during the handover, and any after, must see
        // 200, as they did from the old process (every listener is bound).
        state.set_ready(true);
        let admin = match (admin_addr, got.admin.take()) {
            (Some(a), Some(l)) if l.local_addr().is_ok_and(|l| l == a) => Some(
                AdminServer::inherit(l, Arc::clone(&state))
                    .map_err(|source| StartError::Admin { addr: a, source })?,
            ),
            (Some(a), _) => Some(
                AdminServer::bind(a, Arc::clone(&state))
                    .map_err(|source| StartError::Admin { addr: a, source })?,
            ),
            (None, _) => None,
        };
        let control = match (&control_path, got.control.take()) {
            (Some(p), Some((l, was))) if *p == was => Some(
                ControlServer::inherit(l, p, Arc::clone(&state), requests)
                    .map_err(|e| StartError::Control(e.to_string()))?,
            ),
            (Some(p), _) => Some(
                ControlServer::bind(p, Arc::clone(&state), requests)
                    .map_err(|e| StartError::Control(e.to_string()))?,
            ),
            (None, _) => None,
        };
        let sessions = carried.len();
        let snap = state.snapshot();
        let revoking =
            carried.iter().filter(|(e, _)| !admission::still_admits(&snap, &e.route, &e.info)).count();
        for (entry, frozen) in carried {
            session::carry_on(&state, entry, frozen);
        }
        if revoking > 0 {
            tokio::spawn(super::reload::revoke_after_grace(
                Arc::clone(&state),
                snap.config.timeouts.revoke_grace,
            ));
        }
        state.metrics.upgrades_success.increment(1);
        crate::sys::trim_heap();
        tracing::info!(
            from_version = %got.from_version,
            to_version = %env!("CARGO_PKG_VERSION"),
            sessions,
            revoking,
            listeners = listeners.len(),
            routes = snap.table.len(),
            hash = %snap.hash,
            "upgraded"
        );
        let exe = super::upgrade::installed_binary();
        let deadlines = super::deadlines::Deadlines::spawn(Arc::clone(&state));
        Ok(Node { state, listeners, admin, control, config_path, log, exe, deadlines })
    }
}
