//! Two-way byte forwarding between the client and target sockets.
//!
//! One future drives both directions, readiness-driven: it waits for a socket
//! to become readable, drains what the kernel has with non-blocking reads,
//! and writes it on. A half-close (FIN) is passed on as a half-close
//! (`shutdown(SHUT_WR)`), a reset as a reset (SO_LINGER 0, then close). The
//! session ends when both directions have seen EOF and delivered everything.
//!
//! On Linux, bulk data moves with splice(2) through a pipe (socket -> pipe ->
//! socket), never copied through user space. Pipes and buffers come from small
//! per-thread pools and go back whenever a direction has nothing in flight, so
//! an idle session holds neither. The buffer copy is the portable path, and the
//! fallback when splice is refused (e.g. `EINVAL` for a socket type the kernel
//! cannot splice); early bytes (read with the PROXY header) always go through
//! it first.
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
/// A splice that moves less than this switches the direction back to
/// read/write.
#[cfg(target_os = "linux")]
const SPLICE_MIN: usize = 16 * 1024;

thread_local! {
    static POOL: RefCell<Vec<Buf>> = const { RefCell::new(Vec::new()) };
}

#[cfg(target_os = "linux")]
mod pipe {
    //! splice(2) through a pipe, with a per-thread pool of empty pipes.
    use std::cell::RefCell;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

    /// Pipe capacity asked for (F_SETPIPE_SZ); the kernel may keep its default.
    const PIPE_SIZE: libc::c_int = 256 * 1024;
    /// Bytes asked of one splice call.
    pub const CHUNK: usize = PIPE_SIZE as usize;
    /// Pipes kept per worker thread (two descriptors each).
    const POOL_MAX: usize = 16;

    /// An empty pipe while it sits in the pool.
    pub struct Pipe {
        pub r: OwnedFd,
        pub w: OwnedFd,
    }

    thread_local! {
        static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    }

    pub fn take() -> io::Result<Pipe> {
        if let Some(p) = PIPES.with(|p| p.borrow_mut().pop()) {
            return Ok(p);
        }
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: fds is a valid array of two ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 just returned these two descriptors to us.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe means fewer splice calls per MB; failure is harmless.
        // SAFETY: plain fcntl on a descriptor we own.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(Pipe { r, w })
    }

    /// Give back a pipe that holds no data.
    pub fn give(p: Pipe) {
        PIPES.with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < POOL_MAX {
                pool.push(p);
            }
        });
    }

    /// One non-blocking splice(2); `Ok(0)` is EOF when reading a socket.
    pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        // SAFETY: null offsets (sockets and pipes have none); descriptors are valid
        // for the duration of the call.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// One forwarding buffer; a thin pointer (the length is in the type).
type Buf = Box<[u8; BUF_SIZE]>;

fn take_buf() -> Buf {
    POOL.with(|p| p.borrow_mut().pop()).unwrap_or_else(|| {
        // Allocated zeroed on the heap (no 64 KiB array on the stack).
        match vec![0u8; BUF_SIZE].into_boxed_slice().try_into() {
            Ok(buf) => buf,
            Err(_) => unreachable!("a vec of BUF_SIZE bytes converts to [u8; BUF_SIZE]"),
        }
    })
}

fn give_buf(buf: Buf) {
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
    buf: Option<Buf>,
    /// Unsent bytes are `buf[start..end]` (u32: a buffer is 64 KiB).
    start: u32,
    end: u32,
    /// The pipe while bytes are in it (or a splice round is under way).
    #[cfg(target_os = "linux")]
    pipe: Option<pipe::Pipe>,
    /// Bytes in `pipe` not yet spliced out.
    #[cfg(target_os = "linux")]
    in_pipe: u32,
    /// This direction copies through a buffer right now. It starts so (small
    /// interactive reads are cheapest as read/write) and switches to splice
    /// when a read fills the whole buffer, back when splices turn small.
    buffered: bool,
    /// Never splice (forced, refused by the kernel, or not Linux).
    no_splice: bool,
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
        #[cfg(target_os = "linux")]
        if self.in_pipe == 0 {
            if let Some(p) = self.pipe.take() {
                pipe::give(p);
            }
        }
    }

    fn release_all(&mut self) {
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
}

pin_project_lite::pin_project! {
    /// `timeouts.idle`: fires once no byte moved either way for `limit`.
    struct IdleTimer {
        limit: Duration,
        // When a byte last moved.
        last: Instant,
        #[pin]
        sleep: Sleep,
    }
}

enum HalfErr {
    Read(io::Error),
    Write(io::Error),
}

/// Forwarding state for one session. Poll it (it is a `Future`); after it is
/// dropped early (revocation, shutdown), [`Forward::bytes`] still tells what
/// moved.
pub struct Forward<'a, S: ByteSink> {
    client: TcpStream,
    target: TcpStream,
    c2t: Half,
    t2c: Half,
    first_fin: Option<Side>,
    /// Boxed: only sessions with `timeouts.idle` pay for the timer.
    idle: Option<Pin<Box<IdleTimer>>>,
    sink: &'a S,
}

impl<'a, S: ByteSink> Forward<'a, S> {
    /// `early` holds client bytes read before the target was dialed (bytes
    /// after a PROXY header); they are sent first.
    pub fn new(
        client: TcpStream,
        target: TcpStream,
        early: Vec<u8>,
        idle: Option<Duration>,
        sink: &'a S,
    ) -> Self {
        let mut c2t = Half { buffered: true, ..Half::default() };
        if !early.is_empty() {
            let mut buf = take_buf();
            // Early bytes are bounded by the header read buffer, far below BUF_SIZE.
            let n = early.len().min(buf.len());
            buf[..n].copy_from_slice(&early[..n]);
            c2t.buf = Some(buf);
            c2t.end = n as u32;
        }
        let idle = idle.map(|limit| {
            let last = Instant::now();
            Box::pin(IdleTimer { limit, last, sleep: tokio::time::sleep_until(last + limit) })
        });
        let t2c = Half { buffered: true, ..Half::default() };
        Forward { client, target, c2t, t2c, first_fin: None, idle, sink }
    }

    /// Copy through user-space buffers only (no splice): the portable path,
    /// forced (for tests and comparison).
    pub fn buffered(mut self) -> Self {
        self.c2t.no_splice = true;
        self.t2c.no_splice = true;
        self
    }

    /// (to_target, to_client) so far.
    pub fn bytes(&self) -> (u64, u64) {
        (self.c2t.total, self.t2c.total)
    }

    /// Close both sides with FIN (revocation, shutdown, idle timeout).
    pub fn close_both(&self) {
        let _ = SockRef::from(&self.client).shutdown(Shutdown::Write);
        let _ = SockRef::from(&self.target).shutdown(Shutdown::Write);
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
            Side::Client => set_reset_on_close(&self.client),
            Side::Target => set_reset_on_close(&self.target),
        }
        set_reset_on_close(match side {
            Side::Client => &self.client,
            Side::Target => &self.target,
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
            match dst.try_write(&buf[half.start as usize..half.end as usize]) {
                Ok(n) => {
                    half.start += n as u32;
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
        #[cfg(target_os = "linux")]
        if !half.buffered || half.in_pipe > 0 {
            match splice_step(cx, src, dst, half, count) {
                Step::Progress => {
                    progress = true;
                    continue;
                }
                Step::Retry => continue,
                Step::Blocked => return Ok(progress),
                Step::Fallback => {
                    half.buffered = true;
                    half.no_splice = true;
                }
                Step::Eof => {}
                Step::Err(e) => return Err(e),
            }
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
        match read_clearing(src, &mut buf[..]) {
            Ok(0) => {
                half.read_eof = true;
                progress = true;
            }
            Ok(n) => {
                half.start = 0;
                half.end = n as u32;
                progress = true;
                // A full buffer: bulk data is flowing, splice the rest.
                if n == buf.len() && !half.no_splice && cfg!(target_os = "linux") {
                    half.buffered = false;
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

/// Read into `buf`. A short read means the socket had no more data, so the
/// readiness is cleared at once (as tokio's own `poll_read` does): the next
/// round waits for the next event instead of paying a read that fails with
/// `EAGAIN`.
fn read_clearing(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut short = None;
    let fd = src.as_raw_fd();
    let r = src.try_io(tokio::io::Interest::READABLE, || {
        // SAFETY: buf is valid for buf.len() bytes; fd is open while src lives.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n > 0 && n < buf.len() {
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

/// One splice round of a direction: drain the pipe into `dst`, or fill it
/// from `src`. Buffered early bytes are written first by the caller.
#[cfg(target_os = "linux")]
fn splice_step(
    cx: &mut Context<'_>,
    src: &TcpStream,
    dst: &TcpStream,
    half: &mut Half,
    count: &dyn Fn(u64),
) -> Step {
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;

    let refused = |e: &io::Error| matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS));
    if half.in_pipe > 0 {
        match dst.poll_write_ready(cx) {
            Poll::Pending => return Step::Blocked,
            Poll::Ready(Err(e)) => return Step::Err(HalfErr::Write(e)),
            Poll::Ready(Ok(())) => {}
        }
        let Some(p) = half.pipe.as_ref() else { return Step::Blocked };
        let (from, len) = (p.r.as_raw_fd(), half.in_pipe as usize);
        return match dst.try_io(Interest::WRITABLE, || pipe::splice(from, dst.as_raw_fd(), len)) {
            Ok(n) => {
                half.in_pipe -= n as u32;
                half.total += n as u64;
                count(n as u64);
                Step::Progress
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Retry,
            Err(e) => Step::Err(HalfErr::Write(e)),
        };
    }
    if half.read_eof {
        return Step::Eof;
    }
    match src.poll_read_ready(cx) {
        Poll::Pending => {
            half.release_if_empty();
            return Step::Blocked;
        }
        Poll::Ready(Err(e)) => return Step::Err(HalfErr::Read(e)),
        Poll::Ready(Ok(())) => {}
    }
    if half.pipe.is_none() {
        match pipe::take() {
            Ok(p) => half.pipe = Some(p),
            // Out of descriptors for a pipe: copy through a buffer instead.
            Err(_) => return Step::Fallback,
        }
    }
    let to = half.pipe.as_ref().map(|p| p.w.as_raw_fd()).unwrap_or(-1);
    match src.try_io(Interest::READABLE, || pipe::splice(src.as_raw_fd(), to, pipe::CHUNK)) {
        Ok(0) => {
            half.read_eof = true;
            half.release_if_empty();
            Step::Eof
        }
        Ok(n) => {
            half.in_pipe = n as u32;
            // Small pieces again (interactive traffic): read/write is cheaper.
            if n < SPLICE_MIN {
                half.buffered = true;
            }
            Step::Progress
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Retry,
        Err(e) if refused(&e) => {
            half.release_if_empty();
            Step::Fallback
        }
        Err(e) => Step::Err(HalfErr::Read(e)),
    }
}

impl<S: ByteSink> Future for Forward<'_, S> {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = self.get_mut();
        let sink = this.sink;
        let mut progress = false;

        if !this.c2t.done() {
            let was_eof = this.c2t.read_eof;
            match poll_half(cx, &this.client, &this.target, &mut this.c2t, &|n| sink.to_target(n)) {
                Ok(p) => progress |= p,
                Err(e) => return Poll::Ready(this.fail((Side::Client, e))),
            }
            if !was_eof && this.c2t.read_eof && this.first_fin.is_none() {
                this.first_fin = Some(Side::Client);
            }
        }
        if !this.t2c.done() {
            let was_eof = this.t2c.read_eof;
            match poll_half(cx, &this.target, &this.client, &mut this.t2c, &|n| sink.to_client(n)) {
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

        if let Some(idle) = &mut this.idle {
            let t = idle.as_mut().project();
            if progress {
                *t.last = Instant::now();
            }
            // The timer is only re-armed when it fires, not on every read.
            let mut sleep = t.sleep;
            while sleep.as_mut().poll(cx).is_ready() {
                let deadline = *t.last + *t.limit;
                if Instant::now() >= deadline {
                    return Poll::Ready(this.outcome(End::Idle));
                }
                sleep.as_mut().reset(deadline);
            }
        }
        Poll::Pending
    }
}

impl<S: ByteSink> Drop for Forward<'_, S> {
    fn drop(&mut self) {
        self.c2t.release_all();
        self.t2c.release_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    #[derive(Default)]
    struct Counts(AtomicU64, AtomicU64);

    impl ByteSink for Counts {
        fn to_target(&self, n: u64) {
            self.0.fetch_add(n, Ordering::Relaxed);
        }
        fn to_client(&self, n: u64) {
            self.1.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// (outside end, proxy end) of one loopback connection.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// Client sends `up` bytes and half-closes; the target reads them all,
    /// answers `down` bytes and closes. Checks bytes, order and counts.
    async fn half_close_transfer(buffered: bool, early: Vec<u8>, up: usize, down: usize) {
        let (mut user, client) = pair().await;
        let (target, mut backend) = pair().await;
        let counts: &'static Counts = Box::leak(Box::default());
        let up_data = pattern(up, 1);
        let down_data = pattern(down, 7);
        let early_len = early.len();
        let fwd = tokio::spawn(async move {
            let mut f = Forward::new(client, target, early, None, counts);
            if buffered {
                f = f.buffered();
            }
            f.await
        });
        let sent = up_data.clone();
        let writer = tokio::spawn(async move {
            user.write_all(&sent).await.unwrap();
            user.shutdown().await.unwrap(); // half-close
            let mut got = Vec::new();
            user.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut got_up = Vec::new();
        backend.read_to_end(&mut got_up).await.unwrap(); // EOF arrives as EOF
        assert_eq!(got_up.len(), early_len + up);
        assert_eq!(&got_up[early_len..], &up_data[..], "client-to-target bytes differ");
        // The half-closed client still receives.
        backend.write_all(&down_data).await.unwrap();
        drop(backend);
        let got_down = writer.await.unwrap();
        assert_eq!(got_down, down_data, "target-to-client bytes differ");
        let out = fwd.await.unwrap();
        assert!(matches!(out.end, End::Closed { first: Side::Client }), "{:?}", out.end);
        assert_eq!(out.bytes_to_target, (early_len + up) as u64);
        assert_eq!(out.bytes_to_client, down as u64);
        assert_eq!(counts.0.load(Ordering::Relaxed), (early_len + up) as u64);
        assert_eq!(counts.1.load(Ordering::Relaxed), down as u64);
    }

    #[tokio::test]
    async fn splice_passes_half_close_and_counts_bytes() {
        half_close_transfer(false, Vec::new(), 8 << 20, 3 << 20).await;
    }

    #[tokio::test]
    async fn splice_sends_early_bytes_first() {
        half_close_transfer(false, b"early bytes after a PROXY header".to_vec(), 1 << 20, 17).await;
    }

    #[tokio::test]
    async fn buffer_copy_passes_half_close_and_counts_bytes() {
        half_close_transfer(true, b"early".to_vec(), 8 << 20, 3 << 20).await;
    }

    #[tokio::test]
    async fn small_messages_round_trip() {
        for buffered in [false, true] {
            let (mut user, client) = pair().await;
            let (target, mut backend) = pair().await;
            let counts: &'static Counts = Box::leak(Box::default());
            let fwd = tokio::spawn(async move {
                let f = Forward::new(client, target, Vec::new(), None, counts);
                if buffered {
                    f.buffered().await
                } else {
                    f.await
                }
            });
            for i in 0..200u32 {
                let msg = [i as u8; 64];
                user.write_all(&msg).await.unwrap();
                let mut b = [0u8; 64];
                backend.read_exact(&mut b).await.unwrap();
                backend.write_all(&b).await.unwrap();
                user.read_exact(&mut b).await.unwrap();
                assert_eq!(b, msg);
            }
            drop(user);
            drop(backend);
            let out = fwd.await.unwrap();
            assert_eq!((out.bytes_to_target, out.bytes_to_client), (200 * 64, 200 * 64));
        }
    }

    #[tokio::test]
    async fn reset_is_passed_on_as_reset() {
        for buffered in [false, true] {
            let (mut user, client) = pair().await;
            let (target, backend) = pair().await;
            let counts: &'static Counts = Box::leak(Box::default());
            let fwd = tokio::spawn(async move {
                let f = Forward::new(client, target, Vec::new(), None, counts);
                let out = if buffered { f.buffered().await } else { f.await };
                out
            });
            user.write_all(b"hello").await.unwrap();
            // The target resets.
            crate::sockopt::set_reset_on_close(&backend);
            drop(backend);
            let out = fwd.await.unwrap();
            assert!(matches!(out.end, End::Reset { side: Side::Target }), "{:?}", out.end);
            let mut b = [0u8; 16];
            let r = user.read(&mut b).await;
            let e = r.expect_err("the client must see a reset, not EOF");
            assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        }
    }

    #[tokio::test]
    async fn idle_session_holds_no_pipe_or_buffer() {
        let (mut user, client) = pair().await;
        let (target, mut backend) = pair().await;
        let counts: &'static Counts = Box::leak(Box::default());
        let mut f = Box::pin(Forward::new(client, target, Vec::new(), None, counts));
        user.write_all(&pattern(300_000, 3)).await.unwrap();
        let mut got = vec![0u8; 300_000];
        let read = backend.read_exact(&mut got);
        tokio::select! {
            _ = &mut f => panic!("forwarding ended"),
            r = read => { r.unwrap(); }
        }
        // Let the forwarder see the source drained.
        let _ = tokio::time::timeout(Duration::from_millis(50), &mut f).await;
        assert!(f.c2t.buf.is_none() && f.t2c.buf.is_none());
        #[cfg(target_os = "linux")]
        assert!(f.c2t.pipe.is_none() && f.t2c.pipe.is_none());
        assert_eq!(f.bytes(), (300_000, 0));
    }
}
