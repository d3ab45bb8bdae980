//! Between a running session (its registry entry and frozen forwarder) and
//! its handover message with the descriptors that travel alongside.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::wire::{self, Direction, FirstFin};
use crate::forward::{Frozen, FrozenHalf, Side, Stage};
use crate::node::registry::{Carried, Entry, Registry, SessionId};
use crate::session::addr::{ClientAddr, ConnInfo, PeerAddr};

/// The message for one frozen session, and its descriptors in order:
/// client, target, then (read, write) of each direction's pipe that holds
/// bytes.
pub(crate) fn to_wire<'a>(entry: &Entry, frozen: &'a Frozen) -> (wire::Session, Vec<BorrowedFd<'a>>) {
    let c = entry.carried();
    let mut fds = vec![frozen.client.as_fd(), frozen.target.as_fd()];
    let mut direction = |h: &'a FrozenHalf| {
        let in_pipe = match &h.pipe {
            Some((r, w, n)) => {
                fds.push(r.as_fd());
                fds.push(w.as_fd());
                *n
            }
            None => 0,
        };
        let stage = match h.stage {
            Stage::Open => wire::Stage::Open,
            Stage::Eof => wire::Stage::Eof,
            Stage::Shut => wire::Stage::Shut,
        };
        Direction { stage, pending: h.pending.clone(), in_pipe }
    };
    let c2t = direction(&frozen.c2t);
    let t2c = direction(&frozen.t2c);
    let s = wire::Session {
        id: entry.id.number(),
        route: entry.route.name.to_string(),
        tenant: entry.route.tenant.to_string(),
        port: entry.info.port,
        via: entry.route.via.clone(),
        target: entry.route.target.to_string(),
        peer: entry.info.peer.0,
        client: entry.info.client.0,
        endpoint: entry.info.endpoint.clone(),
        started_unix_ms: c.started_unix_ms,
        age_ms: c.age_ms,
        idle_ms: c.idle_ms,
        to_target: frozen.c2t.total.max(c.to_target),
        to_client: frozen.t2c.total.max(c.to_client),
        first_fin: match frozen.first_fin {
            None => FirstFin::None,
            Some(Side::Client) => FirstFin::Client,
            Some(Side::Target) => FirstFin::Target,
        },
        c2t,
        t2c,
    };
    (s, fds)
}

/// A received session, before its route is chosen.
pub(crate) struct Received {
    pub(crate) id: SessionId,
    pub(crate) info: ConnInfo,
    pub(crate) carried: Carried,
    pub(crate) frozen: Frozen,
}

/// Rebuild a session from its message and descriptors; `None` if the
/// descriptors are not the ones the message names.
pub(crate) fn from_wire(s: &wire::Session, fds: Vec<OwnedFd>) -> Option<Received> {
    if fds.len() != s.fd_count() {
        return None;
    }
    let mut fds = fds.into_iter();
    let client = fds.next()?;
    let target = fds.next()?;
    let mut half = |d: &Direction, total: u64| {
        let pipe = if d.in_pipe > 0 {
            match (fds.next(), fds.next()) {
                (Some(r), Some(w)) => Some((r, w, d.in_pipe)),
                _ => None,
            }
        } else {
            None
        };
        let stage = match d.stage {
            wire::Stage::Open => Stage::Open,
            wire::Stage::Eof => Stage::Eof,
            wire::Stage::Shut => Stage::Shut,
        };
        FrozenHalf { stage, pending: d.pending.clone(), pipe, total }
    };
    let c2t = half(&s.c2t, s.to_target);
    let t2c = half(&s.t2c, s.to_client);
    let first_fin = match s.first_fin {
        FirstFin::None => None,
        FirstFin::Client => Some(Side::Client),
        FirstFin::Target => Some(Side::Target),
    };
    Some(Received {
        id: Registry::id_from(s.id),
        info: ConnInfo {
            port: s.port,
            peer: PeerAddr(s.peer),
            client: ClientAddr(s.client),
            endpoint: s.endpoint.clone(),
        },
        carried: Carried {
            started_unix_ms: s.started_unix_ms,
            age_ms: s.age_ms,
            idle_ms: s.idle_ms,
            to_target: s.to_target,
            to_client: s.to_client,
        },
        frozen: Frozen { client, target, c2t, t2c, first_fin },
    })
}
