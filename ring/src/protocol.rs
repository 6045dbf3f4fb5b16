//! The index and notification protocol of `io/ring.h`, with its memory orderings.
//!
//! `ring.h` uses three barriers, always active because the peer runs on another CPU:
//!
//! | ring.h      | here                      | why |
//! |-------------|---------------------------|-----|
//! | `xen_wmb()` | `fence(Release)`          | entries are visible before the producer index that publishes them |
//! | `xen_rmb()` | `fence(Acquire)`          | entries are read only after the producer index that published them |
//! | `xen_mb()`  | `fence(SeqCst)`           | our index store is visible before we read the peer's event index (and the reverse on the other side): a store-buffering pattern that only a full fence orders |
//!
//! The shared indexes themselves are read and written with `Relaxed` atomic operations: the
//! fences carry the ordering, exactly as the C macros do with plain volatile accesses and
//! barriers. The functions are generic over [`SharedIndex`] so that the very same code can be
//! model-checked with loom (`tests/loom.rs`) and run on real shared memory.

use core::sync::atomic::{fence, AtomicU32, Ordering};

/// One 32-bit index in the shared ring header (`req_prod`, `req_event`, `rsp_prod`,
/// `rsp_event`), with the fences of the memory model it lives in.
pub trait SharedIndex {
    /// Reads the index (no ordering of its own).
    fn load(&self) -> u32;
    /// Writes the index (no ordering of its own).
    fn store(&self, value: u32);
    /// `xen_wmb()`: earlier writes are visible before later writes.
    fn write_barrier();
    /// `xen_rmb()`: earlier reads complete before later reads.
    fn read_barrier();
    /// `xen_mb()`: a full fence; earlier writes are visible before later reads.
    fn full_barrier();
}

impl SharedIndex for AtomicU32 {
    #[inline(always)]
    fn load(&self) -> u32 {
        AtomicU32::load(self, Ordering::Relaxed)
    }
    #[inline(always)]
    fn store(&self, value: u32) {
        AtomicU32::store(self, value, Ordering::Relaxed)
    }
    #[inline(always)]
    fn write_barrier() {
        fence(Ordering::Release)
    }
    #[inline(always)]
    fn read_barrier() {
        fence(Ordering::Acquire)
    }
    #[inline(always)]
    fn full_barrier() {
        fence(Ordering::SeqCst)
    }
}

/// The notify decision of `RING_PUSH_*_AND_CHECK_NOTIFY`: the peer asked to be notified when the
/// producer index passes `event`, and the index moved from `old` to `new`; notify if `event` lies
/// in `(old, new]`, in wrapping arithmetic.
#[inline(always)]
pub const fn notify_needed(old: u32, new: u32, event: u32) -> bool {
    new.wrapping_sub(event) < new.wrapping_sub(old)
}

/// `RING_PUSH_*`: makes the entries written so far visible, then publishes `new` as the producer
/// index.
#[inline(always)]
pub fn publish<I: SharedIndex>(prod: &I, new: u32) {
    I::write_barrier(); // entries before the index
    prod.store(new);
}

/// `RING_PUSH_*_AND_CHECK_NOTIFY`: publishes `new` (the previous published value being `old`)
/// and reports whether the peer must be notified, judged by its event index `event`.
#[inline(always)]
pub fn publish_and_check_notify<I: SharedIndex>(prod: &I, event: &I, old: u32, new: u32) -> bool {
    I::write_barrier(); // entries before the index
    prod.store(new);
    I::full_barrier(); // the index before we read the peer's event index
    notify_needed(old, new, event.load())
}

/// Reads the peer's producer index, ordered before the reads of the entries it publishes.
#[inline(always)]
pub fn read_producer<I: SharedIndex>(prod: &I) -> u32 {
    let value = prod.load();
    I::read_barrier(); // the index before the entries
    value
}

/// The arming half of `RING_FINAL_CHECK_FOR_*`: asks the peer to notify us when its producer
/// index passes `consumed`, then (after a full fence) reads the producer index again. The caller
/// has already found nothing to consume; if the returned index differs from `consumed`, work
/// arrived in the window and the caller must consume it instead of sleeping.
#[inline(always)]
pub fn arm_event<I: SharedIndex>(prod: &I, event: &I, consumed: u32) -> u32 {
    event.store(consumed.wrapping_add(1));
    I::full_barrier(); // our event index before we re-read the producer index
    read_producer(prod)
}
