//! An in-memory peer for tests and fuzzers (feature `test-utils`).
//!
//! [`SharedPages`] is zeroed, page-aligned heap memory that a [`FrontRing`] and a [`BackRing`]
//! can share, with raw accessors that let a test play a hostile peer (move an index anywhere,
//! write arbitrary bytes into a slot). [`MockFrontend`] and [`MockBackend`] drive one side of a
//! ring with a few calls, counting the notifications the protocol asks for.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::vec::Vec;

use crate::memory::RingMemory;
use crate::pod::Pod;
use crate::ring::{BackRing, FrontRing, RingProtocol, HEADER_SIZE, PAGE_SIZE};
use crate::Result;

struct HeapPages {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl Drop for HeapPages {
    fn drop(&mut self) {
        // SAFETY: allocated in `SharedPages::new` with this very layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

// SAFETY: the pages are plain heap memory, reached only through atomics and volatile accesses.
unsafe impl Send for HeapPages {}
// SAFETY: as above.
unsafe impl Sync for HeapPages {}

/// `2^order` zeroed, 4 KiB-aligned heap pages, shared by every clone.
#[derive(Clone)]
pub struct SharedPages(Arc<HeapPages>);

impl std::fmt::Debug for SharedPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedPages")
            .field("len", &self.0.layout.size())
            .finish()
    }
}

/// Offset of `req_prod` in the shared header.
pub const REQ_PROD: usize = 0;
/// Offset of `req_event` in the shared header.
pub const REQ_EVENT: usize = 4;
/// Offset of `rsp_prod` in the shared header.
pub const RSP_PROD: usize = 8;
/// Offset of `rsp_event` in the shared header.
pub const RSP_EVENT: usize = 12;

impl SharedPages {
    /// Allocates `2^order` zeroed pages.
    ///
    /// # Panics
    /// If `order > 10` or the allocation fails (test code only).
    pub fn new(order: u32) -> Self {
        assert!(order <= 10, "ring order {order} too large for a mock");
        let layout = Layout::from_size_align(PAGE_SIZE << order, PAGE_SIZE).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).expect("out of memory");
        Self(Arc::new(HeapPages { ptr, layout }))
    }

    fn atomic(&self, offset: usize) -> &AtomicU32 {
        assert!(
            offset % 4 == 0 && offset + 4 <= self.len(),
            "bad u32 offset {offset}"
        );
        // SAFETY: in bounds and 4-aligned (checked above; the base is page-aligned); the pages
        // live as long as `self` and are only accessed atomically or volatilely.
        unsafe { AtomicU32::from_ptr(self.0.ptr.as_ptr().add(offset).cast()) }
    }

    /// Reads the u32 at `offset` (a header index, or any 4-aligned word).
    pub fn read_u32(&self, offset: usize) -> u32 {
        self.atomic(offset).load(Ordering::SeqCst)
    }

    /// Writes the u32 at `offset`, as a peer would (no protocol checks at all).
    pub fn write_u32(&self, offset: usize, value: u32) {
        self.atomic(offset).store(value, Ordering::SeqCst)
    }

    /// Writes raw bytes at `offset`, as a peer would.
    ///
    /// # Panics
    /// If the range is outside the pages.
    pub fn write_bytes(&self, offset: usize, bytes: &[u8]) {
        assert!(offset
            .checked_add(bytes.len())
            .is_some_and(|end| end <= self.len()));
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: in bounds (checked above); byte accesses need no alignment.
            unsafe { std::ptr::write_volatile(self.0.ptr.as_ptr().add(offset + i), *b) };
        }
    }

    /// Reads raw bytes at `offset`.
    ///
    /// # Panics
    /// If the range is outside the pages.
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        assert!(offset
            .checked_add(out.len())
            .is_some_and(|end| end <= self.len()));
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: in bounds (checked above).
            *b = unsafe { std::ptr::read_volatile(self.0.ptr.as_ptr().add(offset + i)) };
        }
    }

    /// Byte offset of the slot of ring index `idx` in a ring of `P`.
    pub fn slot_offset<P: RingProtocol>(&self, idx: u32) -> usize {
        let entries = crate::ring::ring_entries::<P>(self.len());
        HEADER_SIZE + (idx & (entries - 1)) as usize * P::ENTRY_SIZE
    }

    /// Writes `value` into the slot of ring index `idx` of a ring of `P`, as a peer would.
    pub fn write_slot<P: RingProtocol, T: Pod>(&self, idx: u32, value: T) {
        assert!(std::mem::size_of::<T>() <= P::ENTRY_SIZE);
        // SAFETY: `T: Pod` has no padding, so all its bytes are initialised.
        let bytes = unsafe {
            std::slice::from_raw_parts((&value as *const T).cast::<u8>(), std::mem::size_of::<T>())
        };
        self.write_bytes(self.slot_offset::<P>(idx), bytes);
    }

    /// Reads the slot of ring index `idx` of a ring of `P` as a `T`.
    pub fn read_slot<P: RingProtocol, T: Pod>(&self, idx: u32) -> T {
        let mut value = crate::pod::zeroed::<T>();
        // SAFETY: `T: Pod` accepts any bytes; the slice covers exactly `value`.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                (&mut value as *mut T).cast::<u8>(),
                std::mem::size_of::<T>(),
            )
        };
        self.read_bytes(self.slot_offset::<P>(idx), bytes);
        value
    }
}

// SAFETY: the pages are page-aligned, `len` bytes long, never move, live as long as any clone,
// and are only accessed atomically or volatilely.
unsafe impl RingMemory for SharedPages {
    fn as_ptr(&self) -> NonNull<u8> {
        self.0.ptr
    }
    fn len(&self) -> usize {
        self.0.layout.size()
    }
}

/// A front and a back ring of `P` over the same `2^order` fresh pages.
pub fn pair<P: RingProtocol>(
    order: u32,
) -> Result<(FrontRing<P, SharedPages>, BackRing<P, SharedPages>)> {
    let pages = SharedPages::new(order);
    let front = FrontRing::init(pages.clone())?;
    let back = BackRing::new(pages)?;
    Ok((front, back))
}

/// A frontend that submits requests and collects responses.
pub struct MockFrontend<P: RingProtocol> {
    /// The ring.
    pub ring: FrontRing<P, SharedPages>,
    /// Notifications the protocol asked us to send to the backend.
    pub notifications: u64,
}

impl<P: RingProtocol> MockFrontend<P> {
    /// A frontend on fresh pages, and the pages to give to the backend.
    pub fn new(order: u32) -> Result<(Self, SharedPages)> {
        let pages = SharedPages::new(order);
        let ring = FrontRing::init(pages.clone())?;
        Ok((
            Self {
                ring,
                notifications: 0,
            },
            pages,
        ))
    }

    /// Produces every request, then publishes them once. Stops with `Error::Full` if the ring
    /// fills (what was produced is still published).
    pub fn submit(&mut self, reqs: impl IntoIterator<Item = P::Req>) -> Result<usize> {
        let mut n = 0;
        let mut result = Ok(());
        for req in reqs {
            if let Err(e) = self.ring.produce(req) {
                result = Err(e);
                break;
            }
            n += 1;
        }
        if self.ring.push_requests() {
            self.notifications += 1;
        }
        result.map(|()| n)
    }

    /// Consumes every published response.
    pub fn collect(&mut self) -> Result<Vec<P::Rsp>> {
        let mut out = Vec::new();
        while let Some(rsp) = self.ring.next_response()? {
            out.push(rsp);
        }
        Ok(out)
    }
}

/// A backend that answers requests with a closure.
pub struct MockBackend<P: RingProtocol> {
    /// The ring.
    pub ring: BackRing<P, SharedPages>,
    /// Notifications the protocol asked us to send to the frontend.
    pub notifications: u64,
}

impl<P: RingProtocol> MockBackend<P> {
    /// A backend attached to pages a frontend initialised.
    pub fn new(pages: SharedPages) -> Result<Self> {
        Ok(Self {
            ring: BackRing::new(pages)?,
            notifications: 0,
        })
    }

    /// Answers every published request with `answer`, publishes the responses once, and returns
    /// how many were answered.
    pub fn serve(&mut self, mut answer: impl FnMut(P::Req) -> P::Rsp) -> Result<usize> {
        let mut n = 0;
        while let Some(req) = self.ring.next_request()? {
            self.ring.produce(answer(req))?;
            n += 1;
        }
        if self.ring.push_responses() {
            self.notifications += 1;
        }
        Ok(n)
    }
}

/// Reproducible pseudo-random numbers (xorshift64*) for tests that play a hostile peer at
/// random: a failure names its seed, and the seed replays it.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// The environment variable that replaces a test's seed (hexadecimal), to explore others.
    pub const SEED_VAR: &'static str = "XENPV_ATTACK_SEED";

    /// Numbers from `seed` (any value; zero is made odd, as xorshift needs).
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// Numbers from the seed in [`SEED_VAR`](Self::SEED_VAR) if it is set and parses as
    /// hexadecimal (with or without `0x`), else from `seed`.
    pub fn from_env_or(seed: u64) -> Self {
        let env = std::env::var(Self::SEED_VAR)
            .ok()
            .and_then(|s| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok());
        Self::new(env.unwrap_or(seed))
    }

    /// The state the next number comes from (a seed that replays the rest).
    pub fn seed(&self) -> u64 {
        self.0
    }

    /// The next number.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (0 if `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next().checked_rem(n).unwrap_or(0)
    }

    /// True once in `n` times on average.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = std::vec![0; n];
        self.fill(&mut v);
        v
    }
}

#[cfg(test)]
mod rng_tests {
    use super::Rng;
    use std::vec::Vec;

    #[test]
    fn the_same_seed_gives_the_same_numbers_and_bounds_hold() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        let xs: Vec<u64> = (0..100).map(|_| a.next()).collect();
        assert_eq!(xs, (0..100).map(|_| b.next()).collect::<Vec<_>>());
        assert!(xs.windows(2).all(|w| w[0] != w[1]));
        let mut z = Rng::new(0);
        assert_ne!(z.next(), 0, "a zero seed must not stick at zero");
        assert!((0..1000).all(|_| a.below(7) < 7));
        assert_eq!(a.below(0), 0);
        let hits = (0..10_000).filter(|_| a.one_in(4)).count();
        assert!((2000..3000).contains(&hits), "{hits}");
        let (x, y) = (Rng::new(5).bytes(13), Rng::new(5).bytes(13));
        assert_eq!(x, y);
        assert_eq!(x[..8], Rng::new(5).next().to_le_bytes());
    }
}
