//! The memory a shared ring lives in.

use core::ptr::NonNull;

/// Memory holding a shared ring: one page or 2^order virtually contiguous pages.
///
/// # Safety
/// Implementors promise that, for as long as the value lives (and it is not moved out of a
/// ring), [`as_ptr`](Self::as_ptr) returns the same pointer, valid for reads and writes of
/// [`len`](Self::len) bytes and aligned to at least 64 bytes; and that nothing in this process
/// holds a Rust reference (`&`/`&mut`) into that memory. The peer (another domain or process) may
/// write it at any time: the ring only ever touches it through atomics and volatile accesses.
pub unsafe trait RingMemory {
    /// Start of the shared ring (the `req_prod` field).
    fn as_ptr(&self) -> NonNull<u8>;
    /// Length in bytes: `PAGE_SIZE << order`.
    fn len(&self) -> usize;
    /// Whether the memory is empty (it never is for a valid ring).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A raw pointer and length declared to be ring memory, for callers that manage the mapping
/// themselves (a gntdev mapping, a page of a unikernel's own heap).
#[derive(Debug)]
pub struct RawRingMemory {
    ptr: NonNull<u8>,
    len: usize,
}

impl RawRingMemory {
    /// Declares `len` bytes at `ptr` to be ring memory.
    ///
    /// # Safety
    /// The memory must satisfy the contract of [`RingMemory`] for the whole life of the returned
    /// value and of every ring built on it.
    pub unsafe fn new(ptr: NonNull<u8>, len: usize) -> Self {
        Self { ptr, len }
    }
}

// SAFETY: the caller of `RawRingMemory::new` took on the contract of `RingMemory`.
unsafe impl RingMemory for RawRingMemory {
    fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

// SAFETY: the memory is only reached through atomics and volatile accesses, which are sound
// from any thread; the owner of the ring decides which thread uses it.
unsafe impl Send for RawRingMemory {}

// SAFETY: forwarding to a `RingMemory` through a shared reference keeps its contract.
unsafe impl<M: RingMemory + ?Sized> RingMemory for &M {
    fn as_ptr(&self) -> NonNull<u8> {
        (**self).as_ptr()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
}
