//! The running sessions the node can ask about: who, through which route,
//! from the instant the target answered to the session's end.
//!
//! Today it answers one question, how many running sessions a new config
//! revokes (`revoking` in `POST /reload`); listing and closing sessions by
//! id grow from here. The entry is the one place a running session keeps
//! who it is (its route and connection): the session reads it back for its
//! revocation checks and its log line. It is registered once per session
//! and removed when its [`Registration`] drops, so an idle session pays one
//! map slot beyond what it held anyway.
//!
//! A leaf like `state.rs`: it must not touch sockets, log, or decide
//! admission (callers pass the judgement in).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::Route;
use crate::session::addr::ConnInfo;

/// What the node knows of one running session.
pub(crate) struct Entry {
    /// The route it was admitted on (its identity across reloads is the name).
    pub(crate) route: Arc<Route>,
    /// Port, peer, admitted client and endpoint (what the rules judge).
    pub(crate) info: ConnInfo,
}

/// Every running session, by a number unique for the node's life.
#[derive(Default)]
pub(crate) struct Registry {
    next: AtomicU64,
    entries: Mutex<HashMap<u64, Arc<Entry>>>,
}

/// A session's place in the registry; dropping it removes the entry.
pub(crate) struct Registration {
    registry: Arc<Registry>,
    id: u64,
    entry: Arc<Entry>,
}

impl Registration {
    /// The session's entry.
    pub(crate) fn entry(&self) -> &Entry {
        &self.entry
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register a running session until the returned value drops.
    pub(crate) fn register(self: &Arc<Self>, entry: Entry) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(entry);
        self.lock().insert(id, Arc::clone(&entry));
        Registration { registry: Arc::clone(self), id, entry }
    }

    /// How many running sessions satisfy `pred` (judged outside the lock,
    /// so sessions can start and end meanwhile).
    pub(crate) fn count(&self, pred: impl Fn(&Entry) -> bool) -> usize {
        let entries: Vec<Arc<Entry>> = self.lock().values().cloned().collect();
        entries.iter().filter(|e| pred(e)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_live_as_long_as_their_registration() {
        let reg = Arc::new(Registry::default());
        let route = Arc::new(crate::routes::test_route("a", 1, None, &["0.0.0.0/0"], &[]));
        let entry = |peer: &str| {
            let peer = crate::session::addr::PeerAddr(peer.parse().unwrap());
            Entry { route: Arc::clone(&route), info: ConnInfo::unheaded(1, peer) }
        };
        let a = reg.register(entry("10.0.0.1:1"));
        let b = reg.register(entry("10.0.0.2:2"));
        assert_eq!(reg.count(|_| true), 2);
        assert_eq!(reg.count(|e| e.info.client.0.port() == 2), 1);
        drop(a);
        assert_eq!(reg.count(|_| true), 1);
        drop(b);
        assert_eq!(reg.count(|_| true), 0);
    }
}
