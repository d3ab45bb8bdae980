//! The calls no well-kept crate wraps, and the crate's only `unsafe`:
//! `IP_BIND_ADDRESS_NO_PORT` (rustix and socket2 lack it), glibc's
//! `mallopt` and `malloc_trim`, and `sched_setscheduler`.
//!
//! Each is one call with its arguments checked here; callers see safe
//! functions.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `setsockopt(IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)`: a bind before
/// connect picks only the address; the kernel picks the port at connect.
pub(crate) fn set_bind_address_no_port(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `fd` is a socket descriptor borrowed for the call; the option
    // value is a live c_int on the stack, and its exact size is passed, so
    // the kernel reads only that int.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Give the heap's free pages back to the kernel (every glibc arena). A
/// config load builds and drops a parse tree the size of the config, and a
/// reload drops the whole previous route table: at 50,000 routes that is
/// hundreds of MiB that glibc would otherwise keep mapped, so the node's RSS
/// would grow with every reload. Called after startup and after a reload,
/// never on the data path.
pub(crate) fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes a plain size (0: keep no padding) and only
    // walks glibc's own arenas under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One glibc malloc arena for the whole process, unless `MALLOC_ARENA_MAX`
/// says otherwise. glibc gives threads arenas of their own (up to 8 per
/// core); a reload parses the config on one thread and builds the route
/// table on another, so each reload's garbage landed in other arenas and a
/// 10,000-route node grew by a third over its first reloads, and stayed
/// there. The data path hardly allocates (buffers and pipes are pooled), and
/// what it does allocate is served from glibc's per-thread caches, so one
/// arena costs it nothing measurable. Call first thing in `main`, before any
/// thread exists.
pub fn limit_heap_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes two plain ints and only sets a glibc tunable;
    // no thread has allocated from another arena yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Put the calling thread under `SCHED_BATCH`: the same share of the CPU
/// as any other thread, but waking it does not preempt the thread that
/// runs; it gets the CPU when that thread sleeps or at the next tick. For
/// the log writer and the `/metrics` renderer: a runtime worker that wakes
/// one of them goes on serving sessions instead of being switched out for
/// it (before, with logging on, every park of a busy worker woke the writer
/// and two context switches followed, ~8% of the connection path's CPU).
/// Best effort: a kernel or sandbox that refuses it leaves the thread as
/// it was, which is only slower.
pub(crate) fn yield_on_wakeup() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `param` is a live struct on
        // the stack that the kernel only reads.
        unsafe {
            libc::sched_setscheduler(0, libc::SCHED_BATCH, &param);
        }
    }
}
