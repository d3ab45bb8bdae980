//! The running sessions the node can ask about: who, through which route,
//! from the instant the target answered to the session's end.
//!
//! Today it answers one question, how many running sessions a new config
//! revokes (`revoking` in `POST /reload`); listing and closing sessions by
//! id grow from here. An entry is small (the route's `Arc`, the client's IP
//! and the endpoint id), registered once per session and removed when its
//! [`Registration`] drops, so an idle session pays one map slot.
//!
//! A leaf like `state.rs`: it must not touch sockets, log, or decide
//! admission (callers pass the judgement in).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::Route;

/// What the node knows of one running session.
pub(crate) struct Entry {
    /// The route it was admitted on (its identity across reloads is the name).
    pub(crate) route: Arc<Route>,
    /// The admitted client address (what `allow` rules judge).
    pub(crate) client: IpAddr,
    /// The VPC endpoint it came through (what `endpoints` rules judge).
    pub(crate) endpoint: Option<String>,
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
        self.lock().insert(id, Arc::new(entry));
        Registration { registry: Arc::clone(self), id }
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
        let entry =
            |ip: &str| Entry { route: Arc::clone(&route), client: ip.parse().unwrap(), endpoint: None };
        let a = reg.register(entry("10.0.0.1"));
        let b = reg.register(entry("10.0.0.2"));
        assert_eq!(reg.count(|_| true), 2);
        assert_eq!(reg.count(|e| e.client == "10.0.0.2".parse::<IpAddr>().unwrap()), 1);
        drop(a);
        assert_eq!(reg.count(|_| true), 1);
        drop(b);
        assert_eq!(reg.count(|_| true), 0);
    }
}
