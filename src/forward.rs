//! Two-way byte forwarding between the client and target sockets.
//!
//! One future drives both directions, readiness-driven: it waits for a socket
//! to become readable, drains what the kernel has with non-blocking reads,
//! and writes it on. A half-close (FIN) is passed on as a half-close
//! (`shutdown(SHUT_WR)`), a reset as a reset (SO_LINGER 0, then close). The
//! session ends when both directions have seen EOF and delivered everything.
//!
//! Buffers come from a small per-thread pool and go back whenever a direction
//! has nothing in flight, so an idle session holds no buffer at all.
//!
//! This module knows nothing about routes or logs: it reports byte counts
//! through [`ByteSink`] in batches (one call per write, never per byte) and
//! returns an [`Outcome`].

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::sockopt::set_reset_on_close;

/// Size of one forwarding buffer. Large enough that bulk copies run at a few
/// syscalls per 64 KiB; pooled, so idle sessions do not pay for it.
pub const BUF_SIZE: usize = 64 * 1024;
/// Buffers kept per worker thread for reuse (1 MiB per thread at most).
const POOL_MAX: usize = 16;
/// Read/write rounds per poll before yielding, so a bulk session cannot
/// starve the other sessions on its worker.
const ROUNDS_PER_POLL: usize = 32;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buf() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop()).unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

fn give_buf(buf: Box<[u8]>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(buf);
        }
    });
}

/// Receives byte counts as they are forwarded.
pub trait ByteSink {
    fn to_target(&self, n: u64);
    fn to_client(&self, n: u64);
}

/// Which socket of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Target,
}

/// How forwarding ended.
#[derive(Debug)]
pub enum End {
    /// Both directions finished; `first` sent its FIN first.
    Closed { first: Side },
    /// `side` reset the connection (or a write to it failed with a reset or
    /// broken pipe); the other side has been reset too.
    Reset { side: Side },
    /// Any other I/O error on `side`; the other side has been reset.
    Error { side: Side, error: io::Error },
    /// No byte moved either way for the idle timeout.
    Idle,
}

/// The result of forwarding: how it ended and what moved.
#[derive(Debug)]
pub struct Outcome {
    pub end: End,
    pub bytes_to_target: u64,
    pub bytes_to_client: u64,
}

#[derive(Default)]
struct Half {
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    read_eof: bool,
    write_shut: bool,
    total: u64,
}

impl Half {
    fn done(&self) -> bool {
        self.write_shut
    }

    fn release_if_empty(&mut self) {
        if self.start == self.end {
            if let Some(b) = self.buf.take() {
                give_buf(b);
            }
        }
    }
}

enum HalfErr {
    Read(io::Error),
    Write(io::Error),
}

/// Forwarding state for one session. Poll it (it is a `Future`); after it is
/// dropped early (revocation, shutdown), [`Forward::bytes`] still tells what
/// moved.
pub struct Forward<'a> {
    client: &'a TcpStream,
    target: &'a TcpStream,
    c2t: Half,
    t2c: Half,
    first_fin: Option<Side>,
    idle: Option<(Duration, Pin<Box<Sleep>>, Instant)>,
    sink: &'a (dyn ByteSink + Sync),
}

impl<'a> Forward<'a> {
    /// `early` holds client bytes read before the target was dialed (bytes
    /// after a PROXY header); they are sent first.
    pub fn new(
        client: &'a TcpStream,
        target: &'a TcpStream,
        early: Vec<u8>,
        idle: Option<Duration>,
        sink: &'a (dyn ByteSink + Sync),
    ) -> Self {
        let mut c2t = Half::default();
        if !early.is_empty() {
            let mut buf = take_buf();
            // Early bytes are bounded by the header read buffer, far below BUF_SIZE.
            let n = early.len().min(buf.len());
            buf[..n].copy_from_slice(&early[..n]);
            c2t.buf = Some(buf);
            c2t.end = n;
        }
        let idle = idle.map(|d| {
            let now = Instant::now();
            (d, Box::pin(tokio::time::sleep_until(now + d)), now)
        });
        Forward { client, target, c2t, t2c: Half::default(), first_fin: None, idle, sink }
    }

    /// (to_target, to_client) so far.
    pub fn bytes(&self) -> (u64, u64) {
        (self.c2t.total, self.t2c.total)
    }

    /// Close both sides with FIN (revocation, shutdown, idle timeout).
    pub fn close_both(&self) {
        let _ = SockRef::from(self.client).shutdown(Shutdown::Write);
        let _ = SockRef::from(self.target).shutdown(Shutdown::Write);
    }

    fn outcome(&self, end: End) -> Outcome {
        Outcome { end, bytes_to_target: self.c2t.total, bytes_to_client: self.t2c.total }
    }

    fn fail(&mut self, side_err: (Side, HalfErr)) -> Outcome {
        let (dir_src, err) = side_err;
        // A read error belongs to the source side, a write error to the other.
        let (side, e) = match err {
            HalfErr::Read(e) => (dir_src, e),
            HalfErr::Write(e) => (other(dir_src), e),
        };
        // Pass the failure on as a reset to the side that did not fail.
        match other(side) {
            Side::Client => set_reset_on_close(self.client),
            Side::Target => set_reset_on_close(self.target),
        }
        set_reset_on_close(match side {
            Side::Client => self.client,
            Side::Target => self.target,
        });
        let end = match e.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted => {
                End::Reset { side }
            }
            _ => End::Error { side, error: e },
        };
        self.outcome(end)
    }
}

fn other(s: Side) -> Side {
    match s {
        Side::Client => Side::Target,
        Side::Target => Side::Client,
    }
}

/// Drive one direction as far as it goes without blocking. Returns whether
/// any progress was made, or the error.
fn poll_half(
    cx: &mut Context<'_>,
    src: &TcpStream,
    dst: &TcpStream,
    half: &mut Half,
    count: &dyn Fn(u64),
) -> Result<bool, HalfErr> {
    let mut progress = false;
    for _ in 0..ROUNDS_PER_POLL {
        if half.start < half.end {
            match dst.poll_write_ready(cx) {
                Poll::Pending => return Ok(progress),
                Poll::Ready(Err(e)) => return Err(HalfErr::Write(e)),
                Poll::Ready(Ok(())) => {}
            }
            let Some(buf) = half.buf.as_ref() else { return Ok(progress) };
            match dst.try_write(&buf[half.start..half.end]) {
                Ok(n) => {
                    half.start += n;
                    half.total += n as u64;
                    count(n as u64);
                    progress = true;
                    if half.start == half.end {
                        half.start = 0;
                        half.end = 0;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(HalfErr::Write(e)),
            }
            continue;
        }
        if half.read_eof {
            if !half.write_shut {
                half.release_if_empty();
                // ENOTCONN here means the peer is already gone; the other
                // direction will report it.
                let _ = SockRef::from(dst).shutdown(Shutdown::Write);
                half.write_shut = true;
                progress = true;
            }
            return Ok(progress);
        }
        match src.poll_read_ready(cx) {
            Poll::Pending => {
                half.release_if_empty();
                return Ok(progress);
            }
            Poll::Ready(Err(e)) => return Err(HalfErr::Read(e)),
            Poll::Ready(Ok(())) => {}
        }
        let buf = half.buf.get_or_insert_with(take_buf);
        match src.try_read(buf) {
            Ok(0) => {
                half.read_eof = true;
                progress = true;
            }
            Ok(n) => {
                half.start = 0;
                half.end = n;
                progress = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(HalfErr::Read(e)),
        }
    }
    // Still work to do: yield to other sessions, then come back.
    cx.waker().wake_by_ref();
    Ok(progress)
}

impl Future for Forward<'_> {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = self.get_mut();
        let sink: &(dyn ByteSink + Sync) = this.sink;
        let mut progress = false;

        if !this.c2t.done() {
            let was_eof = this.c2t.read_eof;
            match poll_half(cx, this.client, this.target, &mut this.c2t, &|n| sink.to_target(n)) {
                Ok(p) => progress |= p,
                Err(e) => return Poll::Ready(this.fail((Side::Client, e))),
            }
            if !was_eof && this.c2t.read_eof && this.first_fin.is_none() {
                this.first_fin = Some(Side::Client);
            }
        }
        if !this.t2c.done() {
            let was_eof = this.t2c.read_eof;
            match poll_half(cx, this.target, this.client, &mut this.t2c, &|n| sink.to_client(n)) {
                Ok(p) => progress |= p,
                Err(e) => return Poll::Ready(this.fail((Side::Target, e))),
            }
            if !was_eof && this.t2c.read_eof && this.first_fin.is_none() {
                this.first_fin = Some(Side::Target);
            }
        }
        if this.c2t.done() && this.t2c.done() {
            let first = this.first_fin.unwrap_or(Side::Client);
            return Poll::Ready(this.outcome(End::Closed { first }));
        }

        if let Some((limit, sleep, last)) = &mut this.idle {
            if progress {
                *last = Instant::now();
            }
            // The timer is only re-armed when it fires, not on every read.
            while sleep.as_mut().poll(cx).is_ready() {
                let deadline = *last + *limit;
                if Instant::now() >= deadline {
                    return Poll::Ready(this.outcome(End::Idle));
                }
                sleep.as_mut().reset(deadline);
            }
        }
        Poll::Pending
    }
}

impl Drop for Forward<'_> {
    fn drop(&mut self) {
        for h in [&mut self.c2t, &mut self.t2c] {
            if let Some(b) = h.buf.take() {
                give_buf(b);
            }
        }
    }
}
