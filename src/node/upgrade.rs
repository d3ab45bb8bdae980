//! SIGUSR2 and `POST /upgrade`, the running node's side: start the binary
//! installed where this one was started from, hand it every socket and
//! session, and step aside (the protocol is described in `crate::upgrade`).
//!
//! Everything before `Commit` can be taken back: on any failure the
//! successor is killed, the frozen sessions carry on here, the listeners
//! accept again, and the node serves as if nothing happened.
//!
//! A step of the node: it must not call reload or shutdown.

use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use tokio::time::Instant;

use super::Node;
use crate::session;
use crate::systemd;
use crate::upgrade::channel::{self, Channel, MAX_FDS};
use crate::upgrade::handed::{Deposit, Handed};
use crate::upgrade::wire::{self, ListenerKind, Message};
use crate::upgrade::{convert, HANDOVER_ENV, SETUP_WAIT, TAKEOVER_LIMIT};

/// A successful handover.
pub(crate) struct Handoff {
    pub(crate) pid: u32,
    pub(crate) sessions: usize,
}

/// The binary an upgrade starts: the path this process was started by
/// (`argv[0]`, made absolute against the working directory at startup),
/// so a new file installed there, or a symlink moved to a new release, is
/// what runs; `current_exe()` when `argv[0]` is a bare name.
pub(crate) fn installed_binary() -> PathBuf {
    let argv0 = std::env::args_os().next().map(PathBuf::from);
    match argv0 {
        Some(p) if p.components().count() > 1 => {
            let p: PathBuf = p.components().filter(|c| !matches!(c, std::path::Component::CurDir)).collect();
            match std::env::current_dir() {
                Ok(cwd) => cwd.join(p),
                Err(_) => p,
            }
        }
        _ => std::env::current_exe().unwrap_or_else(|_| PathBuf::from("portgate")),
    }
}

impl Node {
    /// Hand everything to a new process; `Err` (the node still serves
    /// everything) says why not.
    pub(super) async fn upgrade(&mut self) -> Result<Handoff, String> {
        let by = Instant::now() + TAKEOVER_LIMIT;
        let (ours, theirs) =
            channel::pair().map_err(|e| format!("cannot create the handover channel: {e}"))?;
        let child = Command::new(&self.exe)
            .arg("run")
            .arg("-c")
            .arg(&self.config_path)
            .stdin(Stdio::from(theirs))
            .env(HANDOVER_ENV, "1")
            // The successor is the main process once it takes over.
            .env_remove("WATCHDOG_PID")
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.exe.display()))?;
        tracing::info!(binary = %self.exe.display(), pid = child.id(), "upgrade: started the new process");
        let chan = match Channel::new(ours) {
            Ok(c) => c,
            Err(e) => return Err(stop(child, format!("handover channel: {e}")).await),
        };
        let mut handed = Vec::new();
        let outcome = self.hand_over(&chan, &child, by, &mut handed).await;
        let state = Arc::clone(&self.state);
        state.handover.close();
        match outcome {
            Ok(sessions) => Ok(Handoff { pid: child.id(), sessions }),
            Err(why) => {
                let why = stop(child, why).await;
                // Everything carries on here.
                for h in handed {
                    if let Deposit::Frozen(frozen) = h.frozen {
                        session::carry_on(&state, h.entry, frozen);
                    }
                }
                self.listeners.resume(&state);
                Err(why)
            }
        }
    }

    /// The exchange up to `Commit`; the sessions taken from their tasks are
    /// left in `handed` (for the caller to give back on failure).
    async fn hand_over(
        &mut self,
        chan: &Channel,
        child: &Child,
        by: Instant,
        handed: &mut Vec<Handed>,
    ) -> Result<usize, String> {
        let said = |e: channel::ChannelError| e.to_string();
        let (theirs, _) = chan.recv(by).await.map_err(said)?;
        let Message::Hello { reads, version } = theirs else {
            return Err("the new process did not start the handover".into());
        };
        if !reads.contains(&wire::VERSION) {
            let why = format!(
                "the new binary (version {version}) reads handover versions {reads:?}, this one writes version {}; \
                 its sessions stay here",
                wire::VERSION
            );
            let _ = chan.send(&Message::Fail(why.clone()), &[], by).await;
            return Err(why);
        }

        // The listening sockets, in messages of at most MAX_FDS.
        let mut sockets: Vec<(ListenerKind, BorrowedFd<'_>)> =
            self.listeners.sockets().into_iter().map(|(p, fd)| (ListenerKind::Port(p), fd)).collect();
        if let Some(a) = &self.admin {
            sockets.push((ListenerKind::Admin, a.socket()));
        }
        if let Some(c) = &self.control {
            let (fd, path) = c.socket();
            sockets.push((ListenerKind::Control(path.display().to_string()), fd));
        }
        for batch in sockets.chunks(MAX_FDS) {
            let kinds = batch.iter().map(|(k, _)| k.clone()).collect();
            let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|(_, fd)| *fd).collect();
            chan.send(&Message::Listeners(kinds), &fds, by).await.map_err(said)?;
        }
        drop(sockets);

        // Stop accepting; connections still in setup reach their target.
        self.listeners.pause().await;
        let state = Arc::clone(&self.state);
        let setup_by = Instant::now() + SETUP_WAIT;
        while state.sessions.len() > state.registry.count(|_| true) && Instant::now() < setup_by {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }

        // Freeze every running session.
        let mut deposits = state.handover.open();
        let asked = state.registry.select(|_| true).iter().filter(|e| e.request_handover()).count();
        while handed.len() < asked {
            match tokio::time::timeout_at(by, deposits.recv()).await {
                Ok(Some(h)) => {
                    let failed = match &h.frozen {
                        Deposit::Failed(kind) => Some(*kind),
                        _ => None,
                    };
                    handed.push(h);
                    if let Some(kind) = failed {
                        return Err(format!("a session could not be frozen: {}", std::io::Error::from(kind)));
                    }
                }
                Ok(None) => return Err("the session collector closed".into()),
                Err(_) => return Err(format!("only {} of {asked} sessions stopped in time", handed.len())),
            }
        }
        let mut sessions = 0;
        for h in handed.iter() {
            let Deposit::Frozen(frozen) = &h.frozen else { continue };
            let (msg, fds) = convert::to_wire(&h.entry, frozen);
            chan.send(&Message::Session(Box::new(msg)), &fds, by).await.map_err(said)?;
            sessions += 1;
        }
        let done = Message::Done {
            sessions: sessions as u32,
            next_id: state.registry.next_number(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        chan.send(&done, &[], by).await.map_err(said)?;
        match chan.recv(by).await.map_err(said)? {
            (Message::Adopted { sessions: n }, _) if n as usize == sessions => {}
            (Message::Fail(why), _) => return Err(format!("the new process gave up: {why}")),
            (other, _) => return Err(format!("unexpected answer from the new process: {other:?}")),
        }
        systemd::notify_mainpid(child.id());
        if let Err(e) = chan.send(&Message::Commit, &[], by).await {
            systemd::notify_mainpid(std::process::id());
            return Err(said(e));
        }
        Ok(sessions)
    }
}

/// Kill a successor that has not taken over and reap it; `why`, with how
/// it ended if it ended by itself (its channel may close a moment before
/// its exit status is there, so it gets that moment).
async fn stop(mut child: Child, why: String) -> String {
    let mut exited = None;
    for _ in 0..20 {
        exited = child.try_wait().ok().flatten();
        if exited.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let _ = child.kill();
    let reaped = tokio::task::spawn_blocking(move || child.wait()).await;
    match exited {
        Some(status) => format!("{why} (the new process exited: {status}; its log lines say why)"),
        None => {
            let _ = reaped;
            why
        }
    }
}
