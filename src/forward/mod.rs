//! Two-way byte forwarding between the client and target sockets.
//!
//! One future drives both directions, readiness-driven: it waits for a socket
//! to become readable, drains what the kernel has with non-blocking reads,
//! and writes it on. A half-close (FIN) is passed on as a half-close
//! (`shutdown(SHUT_WR)`), a reset as a reset (SO_LINGER 0, then close). The
//! session ends when both directions have seen EOF and delivered everything.
//!
//! Files: `half.rs` is one direction as an explicit state (stage and path);
//! `pipe.rs` is splice(2) through pooled pipes (Linux), `pool.rs` the
//! per-thread pools of buffers and pipes. On Linux bulk data moves with
//! splice, never copied through user space; the buffer copy is the portable
//! path and the fallback when splice is refused; early bytes (read with the
//! PROXY header) always go through it first.
//!
//! This module knows nothing about routes or logs: it reports byte counts
//! through [`ByteSink`] in batches (one call per write, never per byte) and
//! returns how it [`End`]ed; [`Forward::bytes`] says what moved.

mod freeze;
mod half;
#[cfg(target_os = "linux")]
mod pipe;
mod pool;

pub(crate) use freeze::Frozen;
pub(crate) use half::{FrozenHalf, Stage};

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use self::half::{Half, HalfErr, Path};
use crate::sockopt::set_reset_on_close;

/// Receives byte counts as they are forwarded. The forwarder owns its
/// sink, so a session can keep everything it holds in it.
pub(crate) trait ByteSink {
    fn to_target(&self, n: u64);
    fn to_client(&self, n: u64);
}

impl<T: ByteSink> ByteSink for &T {
    fn to_target(&self, n: u64) {
        (**self).to_target(n)
    }
    fn to_client(&self, n: u64) {
        (**self).to_client(n)
    }
}

/// Which socket of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Target,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Client => Side::Target,
            Side::Target => Side::Client,
        }
    }
}

/// How forwarding ended.
#[derive(Debug)]
pub(crate) enum End {
    /// Both directions finished; `first` sent its FIN first.
    Closed { first: Side },
    /// `side` reset the connection (or a write to it failed with a reset or
    /// broken pipe); the other side has been reset too.
    Reset { side: Side },
    /// Any other I/O error on `side`; the other side has been reset.
    Error {
        #[allow(dead_code)] // read by tests and Debug; the session logs the error
        side: Side,
        error: io::Error,
    },
    /// No byte moved either way for the idle timeout.
    Idle,
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

/// Forwarding state for one session. Poll it (it is a `Future`); whether it
/// ended or was stopped early (revocation, shutdown), [`Forward::bytes`]
/// tells what moved.
pub(crate) struct Forward<S: ByteSink> {
    client: TcpStream,
    target: TcpStream,
    c2t: Half,
    t2c: Half,
    first_fin: Option<Side>,
    /// Boxed: only sessions with `timeouts.idle` pay for the timer.
    idle: Option<Pin<Box<IdleTimer>>>,
    sink: S,
}

impl<S: ByteSink> Forward<S> {
    /// `early` holds client bytes read before the target was dialed (bytes
    /// after a PROXY header); they are sent first.
    pub(crate) fn new(
        client: TcpStream,
        target: TcpStream,
        early: Vec<u8>,
        idle: Option<Duration>,
        sink: S,
    ) -> Self {
        let c2t = Half::with_early(&early);
        let t2c = Half::new(Path::Copy);
        Forward { client, target, c2t, t2c, first_fin: None, idle: idle_timer(idle, Duration::ZERO), sink }
    }

    /// The sink (what the session keeps with its forwarding state).
    pub(crate) fn sink(&self) -> &S {
        &self.sink
    }

    /// Copy through user-space buffers only (no splice): the portable path,
    /// forced (for tests and comparison).
    #[cfg(test)]
    fn buffered(mut self) -> Self {
        self.c2t.path = Path::CopyOnly;
        self.t2c.path = Path::CopyOnly;
        self
    }

    /// (to_target, to_client) so far.
    pub(crate) fn bytes(&self) -> (u64, u64) {
        (self.c2t.total, self.t2c.total)
    }

    /// Close both sides with FIN (revocation, shutdown, idle timeout).
    pub(crate) fn close_both(&self) {
        let _ = SockRef::from(&self.client).shutdown(Shutdown::Write);
        let _ = SockRef::from(&self.target).shutdown(Shutdown::Write);
    }

    fn socket(&self, side: Side) -> &TcpStream {
        match side {
            Side::Client => &self.client,
            Side::Target => &self.target,
        }
    }

    /// The direction reading from `src` failed: reset both sides.
    fn fail(&mut self, src: Side, err: HalfErr) -> End {
        // A read error belongs to the source side, a write error to the other.
        let (side, e) = match err {
            HalfErr::Read(e) => (src, e),
            HalfErr::Write(e) => (src.other(), e),
        };
        // Pass the failure on as a reset to the side that did not fail.
        set_reset_on_close(self.socket(side.other()));
        set_reset_on_close(self.socket(side));
        match e.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted => {
                End::Reset { side }
            }
            _ => End::Error { side, error: e },
        }
    }
}

/// `timeouts.idle` as a timer, for a session already idle for `idle_for`.
fn idle_timer(limit: Option<Duration>, idle_for: Duration) -> Option<Pin<Box<IdleTimer>>> {
    limit.map(|limit| {
        let now = Instant::now();
        let last = now.checked_sub(idle_for).unwrap_or(now);
        Box::pin(IdleTimer { limit, last, sleep: tokio::time::sleep_until(last + limit) })
    })
}

impl<S: ByteSink + Unpin> Future for Forward<S> {
    type Output = End;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<End> {
        let this = self.get_mut();
        let sink = &this.sink;
        let mut progress = false;

        if !this.c2t.done() {
            let was_open = this.c2t.stage == Stage::Open;
            match this.c2t.poll(this.t2c.done(), cx, &this.client, &this.target, &|n| sink.to_target(n)) {
                Ok(p) => progress |= p,
                Err(e) => return Poll::Ready(this.fail(Side::Client, e)),
            }
            if was_open && this.c2t.stage != Stage::Open && this.first_fin.is_none() {
                this.first_fin = Some(Side::Client);
            }
        }
        if !this.t2c.done() {
            let was_open = this.t2c.stage == Stage::Open;
            match this.t2c.poll(this.c2t.done(), cx, &this.target, &this.client, &|n| sink.to_client(n)) {
                Ok(p) => progress |= p,
                Err(e) => return Poll::Ready(this.fail(Side::Target, e)),
            }
            if was_open && this.t2c.stage != Stage::Open && this.first_fin.is_none() {
                this.first_fin = Some(Side::Target);
            }
        }
        if this.c2t.done() && this.t2c.done() {
            let first = this.first_fin.unwrap_or(Side::Client);
            return Poll::Ready(End::Closed { first });
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
                    return Poll::Ready(End::Idle);
                }
                sleep.as_mut().reset(deadline);
            }
        }
        Poll::Pending
    }
}

impl<S: ByteSink> Drop for Forward<S> {
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

    /// How a forwarding run ended and what moved, as the tests check it.
    #[derive(Debug)]
    struct Outcome {
        end: End,
        bytes_to_target: u64,
        bytes_to_client: u64,
    }

    /// Forward to the end, then read the byte totals.
    async fn finish<S: ByteSink + Unpin>(mut f: Forward<S>) -> Outcome {
        let end = (&mut f).await;
        let (bytes_to_target, bytes_to_client) = f.bytes();
        Outcome { end, bytes_to_target, bytes_to_client }
    }

    /// Byte counts as a sink sees them (also used by `freeze.rs`'s tests).
    #[derive(Default)]
    pub(super) struct Counts(AtomicU64, AtomicU64);

    impl ByteSink for Counts {
        fn to_target(&self, n: u64) {
            self.0.fetch_add(n, Ordering::Relaxed);
        }
        fn to_client(&self, n: u64) {
            self.1.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// (outside end, proxy end) of one loopback connection.
    pub(super) async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    pub(super) fn pattern(n: usize, seed: u8) -> Vec<u8> {
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
            finish(f).await
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
                finish(if buffered { f.buffered() } else { f }).await
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
                let out = finish(if buffered { f.buffered() } else { f }).await;
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
        assert!(f.c2t.holds_nothing() && f.t2c.holds_nothing());
        assert_eq!(f.bytes(), (300_000, 0));
    }
}
