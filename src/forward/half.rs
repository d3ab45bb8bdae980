//! One direction of a session (client -> target, or target -> client) as an
//! explicit state: where it stands ([`Stage`]) and how it moves bytes right
//! now ([`Path`]).
//!
//! A direction starts [`Path::Copy`] (small interactive reads are cheapest
//! as read/write), switches to [`Path::Splice`] when a read fills the whole
//! buffer, and back when splices turn small. [`Path::CopyOnly`] never
//! splices: forced, refused by the kernel, out of descriptors for a pipe, or
//! not Linux. This module moves bytes for one direction; it must not know
//! about the other direction, timers or routes.

use std::io;
use std::net::Shutdown;
use std::task::{Context, Poll};

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

#[cfg(target_os = "linux")]
use super::pipe;
use super::pool::{give_buf, take_buf, Buf, BUF_SIZE};

/// Read/write rounds per poll before yielding, so a bulk session cannot
/// starve the other sessions on its worker.
const ROUNDS_PER_POLL: usize = 32;
/// A splice that moves less than this switches the direction back to
/// read/write.
#[cfg(target_os = "linux")]
const SPLICE_MIN: usize = 16 * 1024;

/// Where a direction stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Reading from the source and writing to the destination.
    Open,
    /// The source sent EOF; what is still held is flushed, then FIN is sent.
    Eof,
    /// FIN was passed on: this direction is finished and holds nothing.
    Shut,
}

/// One direction, stopped.
#[derive(Debug)]
pub(crate) struct FrozenHalf {
    pub(crate) stage: Stage,
    /// Bytes read from the source and not yet written (at most one buffer).
    pub(crate) pending: Vec<u8>,
    /// The splice pipe (read end, write end) and the bytes in it, when it
    /// holds any; written on after `pending`.
    pub(crate) pipe: Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd, u32)>,
    /// Bytes written to the destination so far.
    pub(crate) total: u64,
}

/// How a direction moves bytes right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Path {
    /// Through a user-space buffer; may switch to [`Path::Splice`].
    Copy,
    /// Through a pipe with splice(2); switches back to [`Path::Copy`] when
    /// the pieces are small.
    #[cfg(target_os = "linux")]
    Splice,
    /// Through a buffer, for good.
    CopyOnly,
}

/// A failure in one direction: reading its source or writing its destination.
pub(super) enum HalfErr {
    Read(io::Error),
    Write(io::Error),
}

/// One direction's state.
pub(super) struct Half {
    pub(super) stage: Stage,
    pub(super) path: Path,
    /// Held only while bytes are in it; unsent bytes are `buf[start..end]`
    /// (u32: a buffer is 64 KiB).
    buf: Option<Buf>,
    start: u32,
    end: u32,
    /// The pipe while bytes are in it (or a splice round is under way).
    #[cfg(target_os = "linux")]
    pipe: Option<pipe::Pipe>,
    /// Bytes in `pipe` not yet spliced out.
    #[cfg(target_os = "linux")]
    in_pipe: u32,
    /// Bytes written to the destination so far.
    pub(super) total: u64,
}

impl Half {
    pub(super) fn new(path: Path) -> Half {
        Half {
            stage: Stage::Open,
            path,
            buf: None,
            start: 0,
            end: 0,
            #[cfg(target_os = "linux")]
            pipe: None,
            #[cfg(target_os = "linux")]
            in_pipe: 0,
            total: 0,
        }
    }

    /// A direction whose first bytes (read with the PROXY header) are
    /// already here; they are written before anything else.
    pub(super) fn with_early(early: &[u8]) -> Half {
        let mut half = Half::new(Path::Copy);
        if !early.is_empty() {
            let mut buf = take_buf();
            // Early bytes are bounded by the header read buffer, far below BUF_SIZE.
            let n = early.len().min(buf.len());
            buf[..n].copy_from_slice(&early[..n]);
            half.buf = Some(buf);
            half.end = n as u32;
        }
        half
    }

    /// Stop this direction where it stands and take out what it holds:
    /// unsent buffered bytes, and the pipe with its unsent bytes. Afterwards
    /// it holds nothing (see `freeze.rs`).
    pub(super) fn freeze(&mut self) -> FrozenHalf {
        let pending = match self.buf.take() {
            Some(b) => {
                let bytes = b[self.start as usize..self.end as usize].to_vec();
                give_buf(b);
                bytes
            }
            None => Vec::new(),
        };
        (self.start, self.end) = (0, 0);
        #[cfg(target_os = "linux")]
        let pipe = match self.pipe.take() {
            Some(p) if self.in_pipe > 0 => Some((p.r, p.w, std::mem::take(&mut self.in_pipe))),
            Some(p) => {
                pipe::give(p);
                None
            }
            None => None,
        };
        #[cfg(not(target_os = "linux"))]
        let pipe = None;
        FrozenHalf { stage: self.stage, pending, pipe, total: self.total }
    }

    /// A direction that carries on from `f` (handed over, or handed back).
    pub(super) fn thaw(f: FrozenHalf) -> io::Result<Half> {
        let mut half = Half::new(Path::Copy);
        half.stage = f.stage;
        half.total = f.total;
        if f.pending.len() > BUF_SIZE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "more pending bytes than a buffer holds"));
        }
        if !f.pending.is_empty() {
            let mut buf = take_buf();
            buf[..f.pending.len()].copy_from_slice(&f.pending);
            half.buf = Some(buf);
            half.end = f.pending.len() as u32;
        }
        if let Some((r, w, n)) = f.pipe {
            #[cfg(target_os = "linux")]
            {
                half.pipe = Some(pipe::Pipe { r, w });
                half.in_pipe = n;
                half.path = Path::Splice;
            }
            #[cfg(not(target_os = "linux"))]
            {
                let _ = (r, w, n);
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "a splice pipe on a system without splice",
                ));
            }
        }
        Ok(half)
    }

    pub(super) fn done(&self) -> bool {
        self.stage == Stage::Shut
    }

    /// Neither a buffer nor a pipe is held (what an idle direction costs).
    #[cfg(test)]
    pub(super) fn holds_nothing(&self) -> bool {
        #[cfg(target_os = "linux")]
        if self.pipe.is_some() {
            return false;
        }
        self.buf.is_none()
    }

    fn release_if_empty(&mut self) {
        if self.start == self.end {
            if let Some(b) = self.buf.take() {
                give_buf(b);
            }
        }
        #[cfg(target_os = "linux")]
        if self.in_pipe == 0 {
            if let Some(p) = self.pipe.take() {
                pipe::give(p);
            }
        }
    }

    /// Give everything back (the session is over).
    pub(super) fn release_all(&mut self) {
        if let Some(b) = self.buf.take() {
            give_buf(b);
        }
        // A pipe with bytes still in it is closed, not pooled.
        #[cfg(target_os = "linux")]
        if let Some(p) = self.pipe.take() {
            if self.in_pipe == 0 {
                pipe::give(p);
            }
        }
    }

    /// Drive this direction as far as it goes without blocking. Returns
    /// whether any progress was made, or the error. `last`: the other
    /// direction is done, so this one's end is the session's: its FIN is
    /// left to the close that follows (the socket's receive side has
    /// reached EOF, so close sends FIN, not RST), one `shutdown` fewer per
    /// session.
    pub(super) fn poll(
        &mut self,
        last: bool,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        count: &dyn Fn(u64),
    ) -> Result<bool, HalfErr> {
        let mut progress = false;
        for _ in 0..ROUNDS_PER_POLL {
            if self.start < self.end {
                match dst.poll_write_ready(cx) {
                    Poll::Pending => return Ok(progress),
                    Poll::Ready(Err(e)) => return Err(HalfErr::Write(e)),
                    Poll::Ready(Ok(())) => {}
                }
                let Some(buf) = self.buf.as_ref() else { return Ok(progress) };
                match dst.try_write(&buf[self.start as usize..self.end as usize]) {
                    Ok(n) => {
                        self.start += n as u32;
                        self.total += n as u64;
                        count(n as u64);
                        progress = true;
                        if self.start == self.end {
                            self.start = 0;
                            self.end = 0;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(HalfErr::Write(e)),
                }
                continue;
            }
            #[cfg(target_os = "linux")]
            if self.path == Path::Splice || self.in_pipe > 0 {
                match self.splice_step(cx, src, dst, count) {
                    Step::Progress => {
                        progress = true;
                        continue;
                    }
                    Step::Retry => continue,
                    Step::Blocked => return Ok(progress),
                    Step::Fallback => self.path = Path::CopyOnly,
                    Step::Eof => {}
                    Step::Err(e) => return Err(e),
                }
            }
            match self.stage {
                Stage::Open => {}
                Stage::Eof => {
                    self.release_if_empty();
                    // ENOTCONN here means the peer is already gone; the other
                    // direction will report it.
                    if !last {
                        let _ = SockRef::from(dst).shutdown(Shutdown::Write);
                    }
                    self.stage = Stage::Shut;
                    return Ok(true);
                }
                Stage::Shut => return Ok(progress),
            }
            match src.poll_read_ready(cx) {
                Poll::Pending => {
                    self.release_if_empty();
                    return Ok(progress);
                }
                Poll::Ready(Err(e)) => return Err(HalfErr::Read(e)),
                Poll::Ready(Ok(())) => {}
            }
            let buf = self.buf.get_or_insert_with(take_buf);
            match read_clearing(src, &mut buf[..]) {
                Ok(0) => {
                    self.stage = Stage::Eof;
                    progress = true;
                }
                Ok(n) => {
                    self.start = 0;
                    self.end = n as u32;
                    progress = true;
                    // A full buffer: bulk data is flowing, splice the rest.
                    #[cfg(target_os = "linux")]
                    if n == buf.len() && self.path == Path::Copy {
                        self.path = Path::Splice;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(HalfErr::Read(e)),
            }
        }
        // Still work to do: yield to other sessions, then come back.
        cx.waker().wake_by_ref();
        Ok(progress)
    }

    /// One splice round: drain the pipe into `dst`, or fill it from `src`.
    /// Buffered early bytes are written first by the caller.
    #[cfg(target_os = "linux")]
    fn splice_step(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        count: &dyn Fn(u64),
    ) -> Step {
        let refused = |e: &io::Error| matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS));
        if self.in_pipe > 0 {
            match dst.poll_write_ready(cx) {
                Poll::Pending => return Step::Blocked,
                Poll::Ready(Err(e)) => return Step::Err(HalfErr::Write(e)),
                Poll::Ready(Ok(())) => {}
            }
            let Some(p) = self.pipe.as_ref() else { return Step::Blocked };
            let len = self.in_pipe as usize;
            return match dst.try_io(Interest::WRITABLE, || pipe::splice(&p.r, dst, len)) {
                Ok(n) => {
                    self.in_pipe -= n as u32;
                    self.total += n as u64;
                    count(n as u64);
                    Step::Progress
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Retry,
                Err(e) => Step::Err(HalfErr::Write(e)),
            };
        }
        if self.stage != Stage::Open {
            return Step::Eof;
        }
        match src.poll_read_ready(cx) {
            Poll::Pending => {
                self.release_if_empty();
                return Step::Blocked;
            }
            Poll::Ready(Err(e)) => return Step::Err(HalfErr::Read(e)),
            Poll::Ready(Ok(())) => {}
        }
        let p = match self.pipe.take() {
            Some(p) => p,
            None => match pipe::take() {
                Ok(p) => p,
                // Out of descriptors for a pipe: copy through a buffer instead.
                Err(_) => return Step::Fallback,
            },
        };
        let read = src.try_io(Interest::READABLE, || pipe::splice(src, &p.w, pipe::CHUNK));
        self.pipe = Some(p);
        match read {
            Ok(0) => {
                self.stage = Stage::Eof;
                self.release_if_empty();
                Step::Eof
            }
            Ok(n) => {
                self.in_pipe = n as u32;
                // Small pieces again (interactive traffic): read/write is cheaper.
                if n < SPLICE_MIN {
                    self.path = Path::Copy;
                }
                Step::Progress
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Retry,
            Err(e) if refused(&e) => {
                self.release_if_empty();
                Step::Fallback
            }
            Err(e) => Step::Err(HalfErr::Read(e)),
        }
    }
}

/// What one splice round did.
#[cfg(target_os = "linux")]
enum Step {
    /// Bytes moved; go round again.
    Progress,
    /// Readiness was stale (cleared); go round again to re-register.
    Retry,
    /// Waiting for readiness (a waker is registered).
    Blocked,
    /// The source reached EOF and the pipe is empty.
    Eof,
    /// splice is refused for these sockets: use the buffer path.
    Fallback,
    Err(HalfErr),
}

/// Read into `buf`. A short read means the socket had no more data, so the
/// readiness is cleared at once (as tokio's own `poll_read` does): the next
/// round waits for the next event instead of paying a read that fails with
/// `EAGAIN`.
fn read_clearing(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut short = None;
    let r = src.try_io(Interest::READABLE, || {
        let len = buf.len();
        let (n, _) = rustix::net::recv(src, &mut *buf, rustix::net::RecvFlags::empty())?;
        if n > 0 && n < len {
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match short {
        Some(n) => Ok(n),
        None => r,
    }
}
