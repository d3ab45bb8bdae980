//! The clock's closes: a route's access window ending (`not_after`,
//! `close=expired`) and a session reaching its route's `max_session`
//! (`close=max_duration`), for every session of the node, by one task.
//!
//! The task sleeps until the earliest deadline the config and the running
//! sessions give (never longer than [`LOOK_EVERY`], so a session opened
//! meanwhile or a step of the wall clock is noticed within that), walks the
//! registry once, and asks the sessions that are due to close. It judges by
//! the config serving *now*: a reload that moves `not_after` moves the close
//! (the reload pokes the task), and `max_session` counts from each
//! session's `session opened` instant. With no window and no
//! `max_session` in the config it sleeps until poked: no timer per session,
//! and an idle node is not woken at all.
//!
//! A session that registers after its route's window ended closes itself
//! (`session::catch_up`), so the walk and a late dial cannot miss each
//! other.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::node::registry::Entry;
use crate::node::state::{NodeState, Snapshot};
use crate::reason::CloseReason;

/// Longest sleep while any deadline is configured.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// The running deadline keeper.
pub(crate) struct Deadlines {
    poke: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Deadlines {
    /// Start keeping the deadlines of `state`'s config. Must run inside the runtime.
    pub(crate) fn spawn(state: Arc<NodeState>) -> Deadlines {
        let poke = Arc::new(Notify::new());
        let task = tokio::spawn(keep(state, Arc::clone(&poke)));
        Deadlines { poke, task }
    }

    /// A new config was published: look again now.
    pub(crate) fn poke(&self) {
        self.poke.notify_one();
    }
}

impl Drop for Deadlines {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn keep(state: Arc<NodeState>, poke: Arc<Notify>) {
    loop {
        match sweep(&state) {
            None => poke.notified().await,
            Some(next) => {
                tokio::select! {
                    _ = tokio::time::sleep(next.min(LOOK_EVERY)) => {}
                    _ = poke.notified() => {}
                }
            }
        }
    }
}

/// Why `e` must close now under `snap`, if it must. A window counts as
/// ending here only if it ended while `snap` served: a reload that moves
/// `not_after` into the past is an admission change, whose sessions are
/// revoked after `revoke_grace` by the reload (SPEC "Windows and reload").
pub(crate) fn due(snap: &Snapshot, e: &Entry, now: SystemTime) -> Option<CloseReason> {
    let route = &snap.table.by_name(&e.route.name)?.route;
    if route.not_after.is_some_and(|end| end <= now && end > snap.built) {
        return Some(CloseReason::Expired);
    }
    if route.max_session.is_some_and(|max| e.opened.elapsed() >= max) {
        return Some(CloseReason::MaxDuration);
    }
    None
}

/// Close what is due; how long until the next deadline (`None`: none is
/// configured).
fn sweep(state: &NodeState) -> Option<Duration> {
    let snap = state.snapshot();
    let routes = &snap.config.routes;
    if !routes.iter().any(|r| r.not_after.is_some() || r.max_session.is_some()) {
        return None;
    }
    let now = SystemTime::now();
    let mut next = LOOK_EVERY;
    for r in routes {
        if let Some(left) = r.not_after.and_then(|end| end.duration_since(now).ok()) {
            next = next.min(left);
        }
    }
    let mut closed = [0usize; 2];
    for e in state.registry.select(|_| true) {
        match due(&snap, &e, now) {
            Some(reason) => {
                if e.request_close(reason) {
                    closed[usize::from(reason == CloseReason::MaxDuration)] += 1;
                }
            }
            None => {
                let max = snap.table.by_name(&e.route.name).and_then(|r| r.route.max_session);
                if let Some(max) = max {
                    next = next.min(max.saturating_sub(e.opened.elapsed()));
                }
            }
        }
    }
    if closed[0] > 0 {
        tracing::info!(sessions = closed[0], "access window ended: closing the route's sessions");
    }
    if closed[1] > 0 {
        tracing::info!(sessions = closed[1], "max_session reached: closing sessions");
    }
    // A deadline that is due now wakes the next round at once.
    Some(next.max(Duration::from_millis(1)))
}
