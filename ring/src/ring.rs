//! The shared ring page and its front and back halves (`DEFINE_RING_TYPES`).
//!
//! Shared layout (`io/ring.h`): `req_prod`@0, `req_event`@4, `rsp_prod`@8, `rsp_event`@12,
//! `pvt`@16 (4 bytes), padding to 64, then the entries, each the size of the union of the request
//! and the response type.

use core::marker::PhantomData;
use core::mem::{align_of, size_of, MaybeUninit};
use core::ptr::NonNull;
use core::sync::atomic::AtomicU32;

use crate::error::{Error, Result};
use crate::memory::RingMemory;
use crate::pod::Pod;
use crate::protocol;

/// The page size of the ring protocol: always 4 KiB, whatever the OS page size.
pub const PAGE_SIZE: usize = 4096;
/// Bytes before the first entry.
pub const HEADER_SIZE: usize = 64;

const REQ_PROD: usize = 0;
const REQ_EVENT: usize = 4;
const RSP_PROD: usize = 8;
const RSP_EVENT: usize = 12;

/// The request and response types of one kind of ring (the arguments of `DEFINE_RING_TYPES`).
pub trait RingProtocol {
    /// What the frontend produces.
    type Req: Pod;
    /// What the backend produces.
    type Rsp: Pod;
    /// Size of one slot: the size of the C union of the two types.
    const ENTRY_SIZE: usize = entry_size::<Self::Req, Self::Rsp>();
}

const fn entry_size<A, B>() -> usize {
    let size = if size_of::<A>() > size_of::<B>() {
        size_of::<A>()
    } else {
        size_of::<B>()
    };
    let align = if align_of::<A>() > align_of::<B>() {
        align_of::<A>()
    } else {
        align_of::<B>()
    };
    size.div_ceil(align) * align
}

/// Entries in a ring of `P` occupying `len` bytes (`__CONST_RING_SIZE`): the largest power of two
/// that fits after the header; 0 if not even one fits.
pub const fn ring_entries<P: RingProtocol>(len: usize) -> u32 {
    if len <= HEADER_SIZE {
        return 0;
    }
    let fit = (len - HEADER_SIZE) / P::ENTRY_SIZE;
    if fit == 0 {
        0
    } else {
        let pow = 1usize << (usize::BITS - 1 - fit.leading_zeros());
        if pow > u32::MAX as usize / 2 {
            1 << 31
        } else {
            pow as u32
        }
    }
}

/// Validated view of ring memory: base pointer and entry count.
struct Shared<P: RingProtocol, M: RingMemory> {
    mem: M,
    base: NonNull<u8>,
    mask: u32,
    _p: PhantomData<P>,
}

impl<P: RingProtocol, M: RingMemory> Shared<P, M> {
    fn new(mem: M) -> Result<Self> {
        const {
            assert!(align_of::<P::Req>() <= HEADER_SIZE && align_of::<P::Rsp>() <= HEADER_SIZE);
        }
        let len = mem.len();
        let base = mem.as_ptr();
        let pages = len / PAGE_SIZE;
        if len % PAGE_SIZE != 0 || !pages.is_power_of_two() || len > (1 << 30) {
            return Err(Error::BadSize { len });
        }
        if (base.as_ptr() as usize) % HEADER_SIZE != 0 {
            return Err(Error::Misaligned {
                addr: base.as_ptr() as usize,
            });
        }
        let entries = ring_entries::<P>(len);
        if entries == 0 {
            return Err(Error::BadSize { len });
        }
        Ok(Self {
            mem,
            base,
            mask: entries - 1,
            _p: PhantomData,
        })
    }

    #[inline]
    fn size(&self) -> u32 {
        self.mask + 1
    }

    #[inline]
    fn index(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset <= RSP_EVENT);
        // SAFETY: `offset` is one of the four header fields, inside the memory (len >= 4096) and
        // 4-aligned (base is 64-aligned); the memory lives as long as `self` (RingMemory
        // contract) and is only ever accessed atomically or volatilely, never through a Rust
        // reference of another type.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(offset).cast::<u32>()) }
    }

    #[inline]
    fn slot(&self, idx: u32) -> *mut u8 {
        let slot = (idx & self.mask) as usize;
        // SAFETY: slot < entries and HEADER_SIZE + entries * ENTRY_SIZE <= len (ring_entries),
        // so the result stays inside the memory.
        unsafe { self.base.as_ptr().add(HEADER_SIZE + slot * P::ENTRY_SIZE) }
    }

    /// Asks the CPU to bring the cache lines of the entry of ring index `idx` (its first
    /// `size_of::<T>()` bytes) into this CPU's cache, without waiting for them: a hint, which
    /// changes nothing that any load or store sees.
    ///
    /// A consumer polling the producer index calls it at each poll for the entry it consumes
    /// next. When the producer publishes, its stores have taken both the index's line and the
    /// entry's lines away from this CPU: the poll's load of the index and this prefetch of the
    /// entry then miss together, and the entry is on its way while the index arrives, instead
    /// of being asked for only once the index says it is there (two cross-core transfers one
    /// after the other, ~80-100 ns each on our machines).
    #[inline(always)]
    fn prefetch<T>(&self, idx: u32) {
        #[cfg(target_arch = "x86_64")]
        {
            let start = self.slot(idx);
            let end = start.wrapping_add(size_of::<T>());
            // Back to the start of the slot's first line (`align_offset` goes forward).
            let mut line = start.wrapping_sub((64 - start.align_offset(64) % 64) % 64);
            while line < end {
                // SAFETY: a prefetch is a hint: it reads nothing into the program and cannot
                // fault, whatever the address; the lines are those of the slot anyway (see
                // `slot`).
                unsafe {
                    core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                        line.cast_const().cast::<i8>(),
                    )
                };
                line = line.wrapping_add(64);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = idx;
    }

    /// Copies the entry of ring index `idx` out as a `T`: every byte is read exactly once, with
    /// volatile loads of the widest word the slot's alignment and `T`'s size allow (see
    /// [`copy_word`]), into a local that is then returned. (A `read_volatile` of the whole struct
    /// would be split by the compiler into one volatile load per field, byte loads for `u8`
    /// fields: ~80 loads for a blkif request instead of 14.)
    #[inline(always)]
    fn read<T: Pod>(&self, idx: u32) -> T {
        const {
            assert!(size_of::<T>() <= P::ENTRY_SIZE);
        }
        let word = const { copy_word::<T>(slot_align::<P>()) };
        let src = self.slot(idx);
        let mut value = MaybeUninit::<T>::uninit();
        let dst = value.as_mut_ptr().cast::<u8>();
        // SAFETY: the slot is inside the memory (see `slot`) and holds ENTRY_SIZE >= size_of::<T>
        // bytes; it is aligned to `slot_align::<P>()` (base is 64-aligned, HEADER_SIZE is 64, and
        // every slot offset is a multiple of ENTRY_SIZE), hence to the word `copy_word` picks;
        // `dst` is a local of size_of::<T> bytes, written unaligned.
        unsafe { copy_entry::<T>(src, dst, word, Direction::FromShared) };
        // SAFETY: `copy_entry` wrote every byte of `value`, and `T: Pod` accepts any bytes, so
        // whatever the peer wrote is a valid T.
        unsafe { value.assume_init() }
    }

    /// Writes `value` whole into the entry of ring index `idx`: every byte is written exactly
    /// once, with volatile stores of the widest word possible (as in [`read`](Self::read)).
    #[inline(always)]
    fn write<T: Pod>(&self, idx: u32, value: T) {
        const {
            assert!(size_of::<T>() <= P::ENTRY_SIZE);
        }
        let word = const { copy_word::<T>(slot_align::<P>()) };
        let dst = self.slot(idx);
        let src = (&value as *const T).cast::<u8>();
        // SAFETY: as in `read`, with the roles swapped; `T: Pod` has no padding, so every byte
        // read from `value` (a local of size_of::<T> bytes) is initialised.
        unsafe { copy_entry::<T>(src, dst, word, Direction::ToShared) };
    }
}

/// The alignment every slot of `P` has: that of the entry size (capped at 64, the alignment of
/// the first slot).
const fn slot_align<P: RingProtocol>() -> usize {
    let low = P::ENTRY_SIZE & P::ENTRY_SIZE.wrapping_neg();
    if low > HEADER_SIZE {
        HEADER_SIZE
    } else {
        low
    }
}

/// The word size (8, 4, 2 or 1 bytes) used to copy a `T` to or from a slot aligned to
/// `slot_align`: the widest that divides both the size of `T` and the slot alignment, so that
/// every volatile access is aligned and the words cover the entry exactly.
const fn copy_word<T>(slot_align: usize) -> usize {
    let size = size_of::<T>();
    let mut word = 8;
    while word > 1 && (size % word != 0 || slot_align % word != 0) {
        word /= 2;
    }
    word
}

/// Which side of a copy is the shared slot (accessed volatilely).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    FromShared,
    ToShared,
}

/// Copies `size_of::<T>()` bytes from `src` to `dst` in `word`-byte units; the shared side
/// (`dst` when `ToShared`, `src` when `FromShared`) with volatile accesses, each byte exactly
/// once; the private side with plain unaligned accesses. `word` is a constant after inlining, so
/// the dispatch and the loop (`size / word` iterations) fold away.
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `size_of::<T>()` bytes; the shared side
/// must be aligned to `word`, which must divide `size_of::<T>()`; the private side must not be
/// shared memory; the two ranges must not overlap.
#[inline(always)]
unsafe fn copy_entry<T>(src: *const u8, dst: *mut u8, word: usize, dir: Direction) {
    // SAFETY: forwarded from the caller, for each word size.
    unsafe {
        match word {
            8 => copy_words::<u64>(src, dst, size_of::<T>() / 8, dir),
            4 => copy_words::<u32>(src, dst, size_of::<T>() / 4, dir),
            2 => copy_words::<u16>(src, dst, size_of::<T>() / 2, dir),
            _ => copy_words::<u8>(src, dst, size_of::<T>(), dir),
        }
    }
}

/// `n` words of type `W` (an integer) from `src` to `dst`, see [`copy_entry`].
///
/// # Safety
/// As for [`copy_entry`], with `n * size_of::<W>()` bytes and the shared side aligned to `W`.
#[inline(always)]
unsafe fn copy_words<W: Copy>(src: *const u8, dst: *mut u8, n: usize, dir: Direction) {
    let (src, dst) = (src.cast::<W>(), dst.cast::<W>());
    for i in 0..n {
        // SAFETY: word `i < n` lies inside both ranges (caller); the shared side is aligned to
        // W, the private side is accessed unaligned.
        unsafe {
            if dir == Direction::FromShared {
                dst.add(i)
                    .write_unaligned(core::ptr::read_volatile(src.add(i)));
            } else {
                core::ptr::write_volatile(dst.add(i), src.add(i).read_unaligned());
            }
        }
    }
}

/// The frontend's half of a ring: produces requests, consumes responses.
pub struct FrontRing<P: RingProtocol, M: RingMemory> {
    shared: Shared<P, M>,
    req_prod_pvt: u32,
    req_published: u32,
    rsp_cons: u32,
    rsp_snapshot: u32,
}

// SAFETY: the ring owns its memory handle `M` and touches the memory only through atomics and
// volatile accesses; moving it to another thread is sound when `M` itself may move.
unsafe impl<P: RingProtocol, M: RingMemory + Send> Send for FrontRing<P, M> {}

impl<P: RingProtocol, M: RingMemory> FrontRing<P, M> {
    /// `SHARED_RING_INIT` + `FRONT_RING_INIT`: zeroes the whole shared memory (header and
    /// entries), sets `req_event = rsp_event = 1` and starts both private indexes at 0.
    pub fn init(mem: M) -> Result<Self> {
        let shared = Shared::<P, M>::new(mem)?;
        let len = shared.mem.len();
        for off in (0..len).step_by(8) {
            // SAFETY: off + 8 <= len (len is a multiple of 4096), base is 64-aligned so the u64
            // is aligned; volatile because the peer may already map the page.
            unsafe { core::ptr::write_volatile(shared.base.as_ptr().add(off).cast::<u64>(), 0) };
        }
        shared
            .index(REQ_EVENT)
            .store(1, core::sync::atomic::Ordering::Relaxed);
        shared
            .index(RSP_EVENT)
            .store(1, core::sync::atomic::Ordering::Relaxed);
        core::sync::atomic::fence(core::sync::atomic::Ordering::Release);
        Ok(Self::with_indexes(shared, 0))
    }

    /// `FRONT_RING_ATTACH`: takes over a ring whose header is already set up, with both private
    /// indexes at `start` (the shared header is left as it is).
    pub fn attach(mem: M, start: u32) -> Result<Self> {
        Ok(Self::with_indexes(Shared::new(mem)?, start))
    }

    fn with_indexes(shared: Shared<P, M>, start: u32) -> Self {
        Self {
            shared,
            req_prod_pvt: start,
            req_published: start,
            rsp_cons: start,
            rsp_snapshot: start,
        }
    }

    /// Entries in the ring (`RING_SIZE`).
    #[inline]
    pub fn size(&self) -> u32 {
        self.shared.size()
    }

    /// The memory the ring lives in.
    pub fn memory(&self) -> &M {
        &self.shared.mem
    }

    /// Gives the memory back.
    pub fn into_memory(self) -> M {
        self.shared.mem
    }

    /// The private request producer index (`req_prod_pvt`).
    pub fn req_prod_pvt(&self) -> u32 {
        self.req_prod_pvt
    }

    /// The private response consumer index (`rsp_cons`).
    pub fn rsp_cons(&self) -> u32 {
        self.rsp_cons
    }

    /// Free request slots (`RING_FREE_REQUESTS`).
    #[inline]
    pub fn free_requests(&self) -> u32 {
        self.size() - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Whether no request slot is free (`RING_FULL`).
    #[inline]
    pub fn is_full(&self) -> bool {
        self.free_requests() == 0
    }

    /// Requests produced and not yet answered by a consumed response.
    pub fn in_flight(&self) -> u32 {
        self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Writes `req` (every byte) into the next free slot; it becomes visible to the backend at
    /// the next [`push_requests`](Self::push_requests). Returns its ring index.
    #[inline]
    pub fn produce(&mut self, req: P::Req) -> Result<u32> {
        if self.is_full() {
            return Err(Error::Full);
        }
        let idx = self.req_prod_pvt;
        self.shared.write(idx, req);
        self.req_prod_pvt = idx.wrapping_add(1);
        Ok(idx)
    }

    /// `RING_PUSH_REQUESTS`: publishes every request produced so far, without a notify check.
    pub fn push_requests_no_check(&mut self) {
        protocol::publish(self.shared.index(REQ_PROD), self.req_prod_pvt);
        self.req_published = self.req_prod_pvt;
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`: publishes every request produced so far and tells
    /// whether the backend must be notified (it asked to be, through `req_event`).
    #[must_use = "notify the backend when this returns true"]
    #[inline]
    pub fn push_requests(&mut self) -> bool {
        let (old, new) = (self.req_published, self.req_prod_pvt);
        if old == new {
            return false;
        }
        self.req_published = new;
        protocol::publish_and_check_notify(
            self.shared.index(REQ_PROD),
            self.shared.index(REQ_EVENT),
            old,
            new,
        )
    }

    /// Re-reads the shared `rsp_prod` and returns how many responses can be consumed.
    /// Responses beyond the requests published, or an index that moved backwards, are a
    /// protocol error.
    #[inline]
    pub fn unconsumed_responses(&mut self) -> Result<u32> {
        self.shared.prefetch::<P::Rsp>(self.rsp_cons);
        let rsp_prod = protocol::read_producer(self.shared.index(RSP_PROD));
        self.check_rsp_prod(rsp_prod)?;
        self.rsp_snapshot = rsp_prod;
        Ok(rsp_prod.wrapping_sub(self.rsp_cons))
    }

    #[inline]
    fn check_rsp_prod(&self, rsp_prod: u32) -> Result<()> {
        let outstanding = self.req_published.wrapping_sub(self.rsp_cons);
        let ready = rsp_prod.wrapping_sub(self.rsp_cons);
        if ready > outstanding {
            return Err(Error::ResponseOverflow {
                rsp_prod,
                rsp_cons: self.rsp_cons,
                req_prod: self.req_published,
            });
        }
        Ok(())
    }

    /// Copies the next response out of the ring (once, with a volatile read) and frees its slot,
    /// or returns `None` when the backend has published no more.
    #[inline]
    pub fn next_response(&mut self) -> Result<Option<P::Rsp>> {
        if self.rsp_cons == self.rsp_snapshot && self.unconsumed_responses()? == 0 {
            return Ok(None);
        }
        let rsp = self.shared.read::<P::Rsp>(self.rsp_cons);
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Ok(Some(rsp))
    }

    /// `RING_FINAL_CHECK_FOR_RESPONSES`: if no response is waiting, asks the backend to notify
    /// us at the next one (`rsp_event = rsp_cons + 1`) and checks once more. Returns whether
    /// responses are waiting; when `false`, it is safe to sleep until the next event.
    pub fn final_check_for_responses(&mut self) -> Result<bool> {
        if self.unconsumed_responses()? > 0 {
            return Ok(true);
        }
        let rsp_prod = protocol::arm_event(
            self.shared.index(RSP_PROD),
            self.shared.index(RSP_EVENT),
            self.rsp_cons,
        );
        self.check_rsp_prod(rsp_prod)?;
        self.rsp_snapshot = rsp_prod;
        Ok(rsp_prod != self.rsp_cons)
    }
}

/// The backend's half of a ring: consumes requests, produces responses.
pub struct BackRing<P: RingProtocol, M: RingMemory> {
    shared: Shared<P, M>,
    rsp_prod_pvt: u32,
    rsp_published: u32,
    req_cons: u32,
    req_snapshot: u32,
}

// SAFETY: as for `FrontRing`.
unsafe impl<P: RingProtocol, M: RingMemory + Send> Send for BackRing<P, M> {}

impl<P: RingProtocol, M: RingMemory> BackRing<P, M> {
    /// `BACK_RING_INIT`: attaches to a ring the frontend initialised, at index 0.
    pub fn new(mem: M) -> Result<Self> {
        Self::attach(mem, 0)
    }

    /// `BACK_RING_ATTACH`: attaches at index `start` (both private indexes), leaving the shared
    /// header untouched; for a backend that resumes a connected ring (after a restart, at the
    /// shared `rsp_prod`).
    pub fn attach(mem: M, start: u32) -> Result<Self> {
        let shared = Shared::new(mem)?;
        Ok(Self {
            shared,
            rsp_prod_pvt: start,
            rsp_published: start,
            req_cons: start,
            req_snapshot: start,
        })
    }

    /// Resumes a ring a previous backend instance served (a restart without the frontend
    /// noticing): responses continue at the shared `rsp_prod`, requests at `req_cons`, the
    /// consumer index that instance saved. The requests in between were consumed and never
    /// answered; the caller answers them first (from its own copies: their slots may hold
    /// responses that were written but never published). The shared header is left untouched.
    ///
    /// Fails with [`Error::RequestOverflow`] unless `rsp_prod ≤ req_cons ≤ req_prod` (modulo
    /// 2^32) within one ring's size: the saved index does not belong to this ring, or the
    /// frontend moved an index.
    pub fn resume(mem: M, req_cons: u32) -> Result<Self> {
        let mut ring = Self::attach(mem, 0)?;
        let rsp_prod = ring.shared_rsp_prod();
        ring.rsp_prod_pvt = rsp_prod;
        ring.rsp_published = rsp_prod;
        ring.req_cons = rsp_prod;
        ring.req_snapshot = rsp_prod;
        let req_prod = protocol::read_producer(ring.shared.index(REQ_PROD));
        let consumed = req_cons.wrapping_sub(rsp_prod);
        let produced = req_prod.wrapping_sub(rsp_prod);
        if consumed > ring.size() || produced > ring.size() || consumed > produced {
            return Err(Error::RequestOverflow {
                req_prod,
                req_cons,
                rsp_prod_pvt: rsp_prod,
                size: ring.size(),
            });
        }
        ring.req_cons = req_cons;
        ring.req_snapshot = req_cons;
        Ok(ring)
    }

    /// Reads the shared `rsp_prod` (what a restarted backend resumes from).
    pub fn shared_rsp_prod(&self) -> u32 {
        protocol::read_producer(self.shared.index(RSP_PROD))
    }

    /// Entries in the ring (`RING_SIZE`).
    #[inline]
    pub fn size(&self) -> u32 {
        self.shared.size()
    }

    /// The memory the ring lives in.
    pub fn memory(&self) -> &M {
        &self.shared.mem
    }

    /// Gives the memory back.
    pub fn into_memory(self) -> M {
        self.shared.mem
    }

    /// The private request consumer index (`req_cons`).
    pub fn req_cons(&self) -> u32 {
        self.req_cons
    }

    /// The private response producer index (`rsp_prod_pvt`).
    pub fn rsp_prod_pvt(&self) -> u32 {
        self.rsp_prod_pvt
    }

    /// Requests consumed and not yet answered.
    pub fn outstanding(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    /// Re-reads the shared `req_prod` and returns how many requests can be consumed
    /// (`RING_HAS_UNCONSUMED_REQUESTS`, never more than there is response space for). A
    /// `req_prod` more than a ring ahead of the responses, or behind what was consumed, is a
    /// protocol error (`RING_REQUEST_PROD_OVERFLOW`): stop serving this ring.
    #[inline]
    pub fn unconsumed_requests(&mut self) -> Result<u32> {
        self.shared.prefetch::<P::Req>(self.req_cons);
        let req_prod = protocol::read_producer(self.shared.index(REQ_PROD));
        let ready = self.check_req_prod(req_prod)?;
        self.req_snapshot = req_prod;
        Ok(ready)
    }

    #[inline]
    fn check_req_prod(&self, req_prod: u32) -> Result<u32> {
        let produced = req_prod.wrapping_sub(self.rsp_prod_pvt);
        let consumed = self.req_cons.wrapping_sub(self.rsp_prod_pvt);
        if produced > self.size() || produced < consumed {
            return Err(Error::RequestOverflow {
                req_prod,
                req_cons: self.req_cons,
                rsp_prod_pvt: self.rsp_prod_pvt,
                size: self.size(),
            });
        }
        Ok(produced - consumed)
    }

    /// Copies the next request out of the ring (once, with a volatile read), or returns `None`
    /// when the frontend has published no more.
    #[inline]
    pub fn next_request(&mut self) -> Result<Option<P::Req>> {
        if self.req_cons == self.req_snapshot && self.unconsumed_requests()? == 0 {
            return Ok(None);
        }
        let req = self.shared.read::<P::Req>(self.req_cons);
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(Some(req))
    }

    /// Writes `rsp` (every byte) into the slot of the oldest unanswered request; it becomes
    /// visible to the frontend at the next [`push_responses`](Self::push_responses). Returns its
    /// ring index.
    #[inline]
    pub fn produce(&mut self, rsp: P::Rsp) -> Result<u32> {
        if self.rsp_prod_pvt == self.req_cons {
            return Err(Error::NoOutstandingRequest);
        }
        let idx = self.rsp_prod_pvt;
        self.shared.write(idx, rsp);
        self.rsp_prod_pvt = idx.wrapping_add(1);
        Ok(idx)
    }

    /// `RING_PUSH_RESPONSES`: publishes every response produced so far, without a notify check.
    pub fn push_responses_no_check(&mut self) {
        protocol::publish(self.shared.index(RSP_PROD), self.rsp_prod_pvt);
        self.rsp_published = self.rsp_prod_pvt;
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`: publishes every response produced so far and
    /// tells whether the frontend must be notified (it asked to be, through `rsp_event`).
    #[must_use = "notify the frontend when this returns true"]
    #[inline]
    pub fn push_responses(&mut self) -> bool {
        let (old, new) = (self.rsp_published, self.rsp_prod_pvt);
        if old == new {
            return false;
        }
        self.rsp_published = new;
        protocol::publish_and_check_notify(
            self.shared.index(RSP_PROD),
            self.shared.index(RSP_EVENT),
            old,
            new,
        )
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`: if no request is waiting, asks the frontend to notify us
    /// at the next one (`req_event = req_cons + 1`) and checks once more. Returns whether
    /// requests are waiting; when `false`, it is safe to sleep until the next event.
    pub fn final_check_for_requests(&mut self) -> Result<bool> {
        if self.unconsumed_requests()? > 0 {
            return Ok(true);
        }
        let req_prod = protocol::arm_event(
            self.shared.index(REQ_PROD),
            self.shared.index(REQ_EVENT),
            self.req_cons,
        );
        let ready = self.check_req_prod(req_prod)?;
        self.req_snapshot = req_prod;
        Ok(ready > 0)
    }
}

#[cfg(all(test, feature = "test-utils"))]
mod tests {
    extern crate std;

    use core::fmt::Debug;
    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::blkif::{Blkif, BlkifX86_32};
    use crate::mock::pair;
    use crate::netif::{NetifCtrl, NetifRx, NetifTx};

    #[test]
    fn copy_words_are_as_wide_as_alignment_and_size_allow() {
        assert_eq!(slot_align::<Blkif>(), 16); // 112 = 16 * 7
        assert_eq!(
            copy_word::<crate::blkif::BlkifRequest>(slot_align::<Blkif>()),
            8
        );
        assert_eq!(
            copy_word::<crate::blkif::BlkifResponse>(slot_align::<Blkif>()),
            8
        );
        assert_eq!(slot_align::<BlkifX86_32>(), 4); // 108 = 4 * 27
        assert_eq!(
            copy_word::<crate::blkif::X86_32Request>(slot_align::<BlkifX86_32>()),
            4
        );
        assert_eq!(slot_align::<NetifTx>(), 4); // 12 = 4 * 3
        assert_eq!(
            copy_word::<crate::netif::NetifTxRequest>(slot_align::<NetifTx>()),
            4
        );
        assert_eq!(
            copy_word::<crate::netif::NetifTxResponse>(slot_align::<NetifTx>()),
            4
        );
        assert_eq!(slot_align::<NetifRx>(), 8);
        assert_eq!(copy_word::<[u8; 3]>(64), 1);
        assert_eq!(copy_word::<[u16; 3]>(64), 2);
        assert_eq!(copy_word::<u64>(4), 4);
    }

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        (0..len)
            .map(|i| {
                (seed as u8)
                    .wrapping_mul(31)
                    .wrapping_add(i as u8)
                    .wrapping_mul(7)
                    | 1
            })
            .collect()
    }

    /// Every entry written by either side lands byte for byte in its slot, touches nothing past
    /// its size, and reads back equal on the other side; over more than two laps of the ring.
    fn entries_round_trip_byte_for_byte<P: RingProtocol>(order: u32)
    where
        P::Req: PartialEq + Debug,
        P::Rsp: PartialEq + Debug,
    {
        const FILL: u8 = 0xEE;
        let (mut front, mut back) = pair::<P>(order).unwrap();
        let pages = front.memory().clone();
        let (req_len, rsp_len) = (size_of::<P::Req>(), size_of::<P::Rsp>());
        for i in 0..front.size() * 2 + 3 {
            let idx = front.req_prod_pvt();
            let off = pages.slot_offset::<P>(idx);
            let mut slot = vec![0; P::ENTRY_SIZE];

            let req_bytes = pattern(req_len, i);
            pages.write_bytes(off, &req_bytes);
            let req = pages.read_slot::<P, P::Req>(idx);
            pages.write_bytes(off, &vec![FILL; P::ENTRY_SIZE]);
            front.produce(req).unwrap();
            let _ = front.push_requests();
            pages.read_bytes(off, &mut slot);
            assert_eq!(slot[..req_len], req_bytes[..]);
            assert!(slot[req_len..].iter().all(|&b| b == FILL));
            assert_eq!(back.next_request().unwrap(), Some(req));

            let rsp_bytes = pattern(rsp_len, !i);
            pages.write_bytes(off, &rsp_bytes);
            let rsp = pages.read_slot::<P, P::Rsp>(idx);
            pages.write_bytes(off, &vec![FILL; P::ENTRY_SIZE]);
            back.produce(rsp).unwrap();
            let _ = back.push_responses();
            pages.read_bytes(off, &mut slot);
            assert_eq!(slot[..rsp_len], rsp_bytes[..]);
            assert!(slot[rsp_len..].iter().all(|&b| b == FILL));
            assert_eq!(front.next_response().unwrap(), Some(rsp));
        }
    }

    #[test]
    fn blkif_entries_round_trip() {
        entries_round_trip_byte_for_byte::<Blkif>(0);
        entries_round_trip_byte_for_byte::<Blkif>(3);
    }

    #[test]
    fn blkif_x86_32_entries_round_trip() {
        // 108-byte slots, 4-byte aligned, straddling the page boundary.
        entries_round_trip_byte_for_byte::<BlkifX86_32>(1);
    }

    #[test]
    fn netif_entries_round_trip() {
        entries_round_trip_byte_for_byte::<NetifTx>(0);
        entries_round_trip_byte_for_byte::<NetifRx>(0);
        entries_round_trip_byte_for_byte::<NetifCtrl>(0);
    }
}
