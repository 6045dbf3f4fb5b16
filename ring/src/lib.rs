//! Xen `io/ring.h` shared rings and the blkif / netif wire types.
//!
//! This crate is `no_std`, allocates nothing and knows no platform: it works on any memory that
//! holds a shared ring (a granted page mapped through gntdev, a page shared through gntalloc, a
//! memfd page of the local platform, or a heap page in tests), given through [`RingMemory`].
//!
//! * [`FrontRing`] and [`BackRing`] are the two private halves of a ring (`*_front_ring_t` /
//!   `*_back_ring_t`); the shared header and the entries live in the peer-visible memory.
//! * Entries are copied out exactly once with a volatile read and written whole with a volatile
//!   write; no reference into shared memory is ever handed out. Wire types implement [`Pod`]:
//!   they have no padding, so every byte a producer writes is initialised.
//! * A peer that moves an index impossibly makes the ring return [`Error`], never panic, loop
//!   forever or access out of bounds.
//! * [`protocol`] holds the index/notification protocol of `ring.h` (push-and-check-notify, final
//!   check) with the memory orderings it requires, generic over the index type so that it can be
//!   model-checked with loom.
//!
//! Wire types: [`blkif`] (native x86_64 and the x86_32 ABI) and [`netif`] (tx, rx, extra info,
//! control ring). The `test-utils` feature adds [`mock`], an in-memory peer.
#![no_std]
#![deny(missing_docs)]

#[cfg(feature = "std")]
extern crate std;

pub mod blkif;
mod error;
mod memory;
pub mod netif;
mod pod;
pub mod protocol;
mod ring;

#[cfg(feature = "test-utils")]
pub mod mock;

pub use error::{Error, Result};
pub use memory::{RawRingMemory, RingMemory};
pub use pod::{cast, zeroed, Pod};
pub use ring::{ring_entries, BackRing, FrontRing, RingProtocol, HEADER_SIZE, PAGE_SIZE};

/// A ring index (`RING_IDX`): free-running, wrapping at 2^32.
pub type RingIdx = u32;
/// A grant reference (`grant_ref_t`).
pub type GrantRef = u32;
