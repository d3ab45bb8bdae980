//! Per-thread pools of forwarding buffers and splice pipes.
//!
//! A direction takes a buffer or a pipe only while bytes are in flight and
//! gives it back as soon as it has none, so an idle session holds neither,
//! and a busy worker reuses the same few instead of allocating per read.
//! This module keeps spare resources; it must not do I/O.

use std::cell::RefCell;

/// Buffers, and pipes, kept per worker thread for reuse: 1 MiB of buffers
/// and 32 descriptors of pipes per worker at most.
const POOL_MAX: usize = 16;

/// Size of one forwarding buffer. Large enough that bulk copies run at a few
/// syscalls per 64 KiB; pooled, so idle sessions do not pay for it.
pub(super) const BUF_SIZE: usize = 64 * 1024;

/// One forwarding buffer; a thin pointer (the length is in the type).
pub(super) type Buf = Box<[u8; BUF_SIZE]>;

/// Spare items of one kind, for one thread.
pub(super) struct Pool<T> {
    items: RefCell<Vec<T>>,
}

impl<T> Pool<T> {
    pub(super) const fn new() -> Self {
        Pool { items: RefCell::new(Vec::new()) }
    }

    /// A spare item, if there is one.
    pub(super) fn take(&self) -> Option<T> {
        self.items.borrow_mut().pop()
    }

    /// Keep `item` for reuse, unless the pool is full (then it is dropped).
    pub(super) fn give(&self, item: T) {
        let mut items = self.items.borrow_mut();
        if items.len() < POOL_MAX {
            items.push(item);
        }
    }
}

thread_local! {
    static BUFS: Pool<Buf> = const { Pool::new() };
}

/// A buffer from this thread's pool, or a new one.
pub(super) fn take_buf() -> Buf {
    BUFS.with(Pool::take).unwrap_or_else(|| {
        // Allocated zeroed on the heap (no 64 KiB array on the stack).
        match vec![0u8; BUF_SIZE].into_boxed_slice().try_into() {
            Ok(buf) => buf,
            Err(_) => unreachable!("a vec of BUF_SIZE bytes converts to [u8; BUF_SIZE]"),
        }
    })
}

pub(super) fn give_buf(buf: Buf) {
    BUFS.with(|p| p.give(buf));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_keeps_at_most_pool_max() {
        let pool = Pool::new();
        for i in 0..POOL_MAX + 5 {
            pool.give(i);
        }
        let mut n = 0;
        while pool.take().is_some() {
            n += 1;
        }
        assert_eq!(n, POOL_MAX);
    }
}
