//! The running sessions: who, through which route, how much moved, and the
//! one way to stop one.
//!
//! A session is registered when its target answers (its `session opened`
//! line) and removed when its [`Registration`] drops, right after its
//! `session closed` line. Everything that ends sessions from outside goes
//! through here: an operator's `DELETE /sessions` (`close=operator`), a
//! reload's revocation after `revoke_grace` (`close=revoked`) and the end of
//! the drain (`close=shutdown`). Each asks the sessions it selects to close
//! by setting the entry's close request and waking that one session; no
//! session is woken for another's close, and an idle session waits on
//! nothing but its sockets and its entry.
//!
//! The entry is also the one place a running session keeps who it is (its
//! route and connection) and its live byte counts, so `GET /sessions`
//! answers from the first second of a session, not at its end.
//!
//! A leaf like `state.rs`: it must not touch sockets, log, or decide
//! admission (callers pass the judgement in).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::config::Route;
use crate::reason::CloseReason;
use crate::session::addr::ConnInfo;

/// A session id: unique for the node's life, shown as 16 lowercase hex
/// digits (SPEC: 8 to 32 characters of `[0-9A-Za-z_-]`, starting with a
/// letter or digit).
///
/// Ids count up from a random start chosen when the node starts, so ids of
/// one node's life are never reused and sort by age, while a restarted
/// node does not repeat the ids of its last life in the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SessionId(u64);

impl SessionId {
    /// The number behind the id (what a handover carries).
    pub(crate) fn number(self) -> u64 {
        self.0
    }

    /// Parse what [`fmt::Display`] wrote; `None` for anything else.
    pub(crate) fn parse(s: &str) -> Option<SessionId> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return None;
        }
        u64::from_str_radix(s, 16).ok().map(SessionId)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// What the node knows of one running session.
pub(crate) struct Entry {
    pub(crate) id: SessionId,
    /// The route it was admitted on (its identity across reloads is the name).
    pub(crate) route: Arc<Route>,
    /// Port, peer, admitted client and endpoint (what the rules judge).
    pub(crate) info: ConnInfo,
    /// When the target answered (the `session opened` instant).
    pub(crate) opened: Instant,
    /// The same instant on the wall clock, for `started` in the listing.
    opened_wall: SystemTime,
    to_target: AtomicU64,
    to_client: AtomicU64,
    /// Milliseconds after `opened` when a byte last moved either way.
    last_ms: AtomicU64,
    close: CloseRequest,
}

/// How one session is asked to stop: what for, and the waker of the
/// session's task (registered by the session, woken by the asker).
#[derive(Default)]
struct CloseRequest {
    /// 0: not asked; [`HANDOVER`]; else `1 + CloseReason as u8` of the
    /// first request.
    reason: AtomicU8,
    waker: Mutex<Option<Waker>>,
}

/// The request code of a handover (upgrade in place).
const HANDOVER: u8 = u8::MAX;
/// The session ended by itself: no request is taken any more.
const FINISHED: u8 = u8::MAX - 1;

/// What a session is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ask {
    /// Close both sides with FIN, for this reason.
    Close(CloseReason),
    /// Stop forwarding and hand the state to the node (upgrade in place).
    Handover,
}

/// A running session's clock and counters, as handed to a successor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Carried {
    pub(crate) started_unix_ms: u64,
    /// Milliseconds since `session opened`.
    pub(crate) age_ms: u64,
    /// Milliseconds since a byte last moved.
    pub(crate) idle_ms: u64,
    pub(crate) to_target: u64,
    pub(crate) to_client: u64,
}

/// What [`Entry::live`] reads: the counters a listing shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Live {
    pub(crate) to_target: u64,
    pub(crate) to_client: u64,
    pub(crate) duration: Duration,
    pub(crate) idle: Duration,
}

impl Entry {
    /// A session whose target answered just now.
    pub(crate) fn new(id: SessionId, route: Arc<Route>, info: ConnInfo) -> Entry {
        Entry {
            id,
            route,
            info,
            opened: Instant::now(),
            opened_wall: SystemTime::now(),
            to_target: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            last_ms: AtomicU64::new(0),
            close: CloseRequest::default(),
        }
    }

    /// A session carried on from a predecessor process: the same id, start,
    /// byte counts and idle time (see `crate::upgrade`).
    pub(crate) fn carried_on(id: SessionId, route: Arc<Route>, info: ConnInfo, was: Carried) -> Entry {
        let now = Instant::now();
        let opened = now.checked_sub(Duration::from_millis(was.age_ms)).unwrap_or(now);
        let last_ms = was.age_ms.saturating_sub(was.idle_ms);
        Entry {
            id,
            route,
            info,
            opened,
            opened_wall: UNIX_EPOCH + Duration::from_millis(was.started_unix_ms),
            to_target: AtomicU64::new(was.to_target),
            to_client: AtomicU64::new(was.to_client),
            last_ms: AtomicU64::new(last_ms),
            close: CloseRequest::default(),
        }
    }

    /// What a successor needs to carry this session on.
    pub(crate) fn carried(&self) -> Carried {
        let live = self.live();
        Carried {
            started_unix_ms: self.started_unix_ms(),
            age_ms: live.duration.as_millis() as u64,
            idle_ms: live.idle.as_millis() as u64,
            to_target: live.to_target,
            to_client: live.to_client,
        }
    }

    /// `started` as Unix milliseconds.
    pub(crate) fn started_unix_ms(&self) -> u64 {
        self.opened_wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }

    /// Count `n` bytes forwarded to the target (called once per write).
    pub(crate) fn moved_to_target(&self, n: u64) {
        self.to_target.fetch_add(n, Ordering::Relaxed);
        self.touch();
    }

    /// Count `n` bytes forwarded to the client (called once per write).
    pub(crate) fn moved_to_client(&self, n: u64) {
        self.to_client.fetch_add(n, Ordering::Relaxed);
        self.touch();
    }

    fn touch(&self) {
        self.last_ms.store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Byte counts, age and idle time, now.
    pub(crate) fn live(&self) -> Live {
        let duration = self.opened.elapsed();
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Live {
            to_target: self.to_target.load(Ordering::Relaxed),
            to_client: self.to_client.load(Ordering::Relaxed),
            duration,
            idle: duration.saturating_sub(last),
        }
    }

    /// Ask the session to close for `reason`, and wake it. The first
    /// request wins; `false` if the session was already asked.
    pub(crate) fn request_close(&self, reason: CloseReason) -> bool {
        self.request(1 + reason as u8)
    }

    /// Ask the session to stop and hand its state to the node; `false` if
    /// it was already asked something.
    pub(crate) fn request_handover(&self) -> bool {
        self.request(HANDOVER)
    }

    /// Forget a handover request (the upgrade failed and the session
    /// carries on here); a close request stays.
    pub(crate) fn cancel_handover(&self) {
        let _ = self.close.reason.compare_exchange(HANDOVER, 0, Ordering::SeqCst, Ordering::SeqCst);
    }

    fn request(&self, code: u8) -> bool {
        if self.close.reason.compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            return false;
        }
        // The session registers its waker under this lock before it reads
        // `reason`, so either it sees the request or its waker is here.
        let waker = self.close.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    /// For the session's own task: the request, if any. With `register`,
    /// first leave the task's waker for the asker (once per task poll loop
    /// is enough: a task's waker does not change).
    pub(crate) fn poll_ask(&self, cx: &mut Context<'_>, register: bool) -> Option<Ask> {
        if register {
            let mut slot = self.close.waker.lock().unwrap_or_else(|e| e.into_inner());
            match slot.as_mut() {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *slot = Some(cx.waker().clone()),
            }
        }
        self.asked()
    }

    /// For the session's own task, ending by itself: from now on requests
    /// are refused (`request_*` return `false`). Returns what it was asked
    /// before, if anything: a handover asked just now must be answered.
    pub(crate) fn finish(&self) -> Option<Ask> {
        match self.close.reason.compare_exchange(0, FINISHED, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => None,
            Err(_) => self.asked(),
        }
    }

    /// What the session was asked, if anything.
    pub(crate) fn asked(&self) -> Option<Ask> {
        match self.close.reason.load(Ordering::SeqCst) {
            0 | FINISHED => None,
            HANDOVER => Some(Ask::Handover),
            code => CloseReason::ALL.get(usize::from(code - 1)).copied().map(Ask::Close),
        }
    }
}

/// Every running session, by id.
pub(crate) struct Registry {
    /// The next id's number.
    next: AtomicU64,
    entries: Mutex<HashMap<SessionId, Arc<Entry>>>,
}

impl Default for Registry {
    fn default() -> Self {
        // A random start: std's RandomState is seeded from the OS.
        let start = RandomState::new().hash_one(std::process::id());
        // Keep clear of the wrap, so ids of one life only ever count up.
        Registry { next: AtomicU64::new(start >> 1), entries: Mutex::default() }
    }
}

/// A session's place in the registry; dropping it removes the entry.
pub(crate) struct Registration {
    registry: Arc<Registry>,
    entry: Arc<Entry>,
}

impl Registration {
    /// The session's entry.
    pub(crate) fn entry(&self) -> &Entry {
        &self.entry
    }

    /// The entry, to keep past the registration.
    pub(crate) fn shared(&self) -> Arc<Entry> {
        Arc::clone(&self.entry)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.entry.id);
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<SessionId, Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new id, for a connection that passed admission (its failed-dial
    /// line carries it too, so ids are taken before the dial).
    pub(crate) fn new_id(&self) -> SessionId {
        SessionId(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// Register a running session until the returned value drops.
    pub(crate) fn register(self: &Arc<Self>, entry: Entry) -> Registration {
        self.register_shared(Arc::new(entry))
    }

    /// Register an entry again (a handover that failed hands it back).
    pub(crate) fn register_shared(self: &Arc<Self>, entry: Arc<Entry>) -> Registration {
        self.lock().insert(entry.id, Arc::clone(&entry));
        Registration { registry: Arc::clone(self), entry }
    }

    /// The number the next id will have (handed to a successor).
    pub(crate) fn next_number(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    /// Go on numbering where a predecessor stopped (before any id of this
    /// process is given), so no id of the node's life is given twice.
    pub(crate) fn continue_from(&self, next: u64) {
        self.next.store(next, Ordering::Relaxed);
    }

    /// An id handed over by a predecessor.
    pub(crate) fn id_from(number: u64) -> SessionId {
        SessionId(number)
    }

    /// The sessions that satisfy `pred`, oldest first (judged outside the
    /// lock, so sessions can start and end meanwhile).
    pub(crate) fn select(&self, pred: impl Fn(&Entry) -> bool) -> Vec<Arc<Entry>> {
        let all: Vec<Arc<Entry>> = self.lock().values().cloned().collect();
        let mut chosen: Vec<Arc<Entry>> = all.into_iter().filter(|e| pred(e)).collect();
        chosen.sort_by_key(|e| e.id);
        chosen
    }

    /// One session by id.
    pub(crate) fn get(&self, id: SessionId) -> Option<Arc<Entry>> {
        self.lock().get(&id).cloned()
    }

    /// How many running sessions satisfy `pred` (judged outside the lock).
    pub(crate) fn count(&self, pred: impl Fn(&Entry) -> bool) -> usize {
        let all: Vec<Arc<Entry>> = self.lock().values().cloned().collect();
        all.iter().filter(|e| pred(e)).count()
    }

    /// Ask every session that satisfies `pred` to close for `reason`;
    /// returns those selected (including any already asked to close).
    pub(crate) fn close(&self, pred: impl Fn(&Entry) -> bool, reason: CloseReason) -> Vec<Arc<Entry>> {
        let chosen = self.select(pred);
        for e in &chosen {
            e.request_close(reason);
        }
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(reg: &Registry, route: &Arc<Route>, peer: &str) -> Entry {
        let peer = crate::session::addr::PeerAddr(peer.parse().unwrap());
        Entry::new(reg.new_id(), Arc::clone(route), ConnInfo::unheaded(1, peer))
    }

    #[test]
    fn entries_live_as_long_as_their_registration() {
        let reg = Arc::new(Registry::default());
        let route = Arc::new(crate::routes::test_route("a", 1, None, &["0.0.0.0/0"], &[]));
        let a = reg.register(entry(&reg, &route, "10.0.0.1:1"));
        let b = reg.register(entry(&reg, &route, "10.0.0.2:2"));
        assert_eq!(reg.count(|_| true), 2);
        assert_eq!(reg.count(|e| e.info.client.0.port() == 2), 1);
        assert_eq!(reg.get(a.entry().id).map(|e| e.id), Some(a.entry().id));
        let ids: Vec<SessionId> = reg.select(|_| true).iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![a.entry().id, b.entry().id], "oldest first");
        drop(a);
        assert_eq!(reg.count(|_| true), 1);
        drop(b);
        assert_eq!(reg.count(|_| true), 0);
    }

    #[test]
    fn ids_are_unique_and_render_as_the_contract_says() {
        let reg = Registry::default();
        let ids: std::collections::HashSet<String> = (0..10_000).map(|_| reg.new_id().to_string()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(100) {
            assert_eq!(id.len(), 16);
            assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
            assert_eq!(SessionId::parse(id).map(|p| p.to_string()).as_deref(), Some(id.as_str()));
        }
        for bad in
            ["", "xyz", "00000000000000000", "000000000000000G", "-000000000000000", "ABCDEF0000000000"]
        {
            assert_eq!(SessionId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_close_request_wakes_its_session_once_and_first_reason_wins() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let reg = Arc::new(Registry::default());
        let route = Arc::new(crate::routes::test_route("a", 1, None, &["0.0.0.0/0"], &[]));
        let r = reg.register(entry(&reg, &route, "10.0.0.1:1"));
        let count = Arc::new(Count(Default::default()));
        let waker = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&waker);
        assert_eq!(r.entry().poll_ask(&mut cx, true), None);
        let closed = reg.close(|e| e.route.name == "a", CloseReason::Operator);
        assert_eq!(closed.len(), 1);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(!r.entry().request_close(CloseReason::Shutdown));
        assert_eq!(r.entry().poll_ask(&mut cx, false), Some(Ask::Close(CloseReason::Operator)));
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn live_counts_add_up() {
        let reg = Registry::default();
        let route = Arc::new(crate::routes::test_route("a", 1, None, &["0.0.0.0/0"], &[]));
        let e = entry(&reg, &route, "10.0.0.1:1");
        e.moved_to_target(10);
        e.moved_to_target(5);
        e.moved_to_client(7);
        let live = e.live();
        assert_eq!((live.to_target, live.to_client), (15, 7));
        assert!(live.idle <= live.duration);
    }
}
