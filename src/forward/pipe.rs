//! splice(2) through a pipe (Linux): socket -> pipe -> socket without
//! copying through user space, with a per-thread pool of empty pipes.
//!
//! Safe calls only (rustix). This module moves bytes between descriptors;
//! it must not decide when to splice (that is `half.rs`).

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::pipe::{PipeFlags, SpliceFlags};

use super::pool::Pool;

/// Pipe capacity asked for (F_SETPIPE_SZ); the kernel may keep its default.
const PIPE_SIZE: usize = 256 * 1024;
/// Bytes asked of one splice call.
pub(super) const CHUNK: usize = PIPE_SIZE;

/// A pipe: read end and write end.
pub(super) struct Pipe {
    pub(super) r: OwnedFd,
    pub(super) w: OwnedFd,
}

thread_local! {
    static PIPES: Pool<Pipe> = const { Pool::new() };
}

/// An empty pipe from this thread's pool, or a new one.
pub(super) fn take() -> io::Result<Pipe> {
    if let Some(p) = PIPES.with(Pool::take) {
        return Ok(p);
    }
    let (r, w) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
    // A larger pipe means fewer splice calls per MB; failure is harmless.
    let _ = rustix::pipe::fcntl_setpipe_size(&w, PIPE_SIZE);
    Ok(Pipe { r, w })
}

/// Give back a pipe that holds no data.
pub(super) fn give(p: Pipe) {
    PIPES.with(|pool| pool.give(p));
}

/// One non-blocking splice(2); `Ok(0)` is EOF when reading a socket.
pub(super) fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    Ok(rustix::pipe::splice(from, None, to, None, len, SpliceFlags::MOVE | SpliceFlags::NONBLOCK)?)
}
