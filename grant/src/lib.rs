//! Xen grant tables for userspace split drivers.
//!
//! The platform seam of DESIGN.md §3 for grants, with two providers:
//!
//! * **front** ([`GrantShare`]): share dedicated, zeroed pages with a domain, read-only or
//!   writable ([`GrantShare::share`] returns the grant refs and a [`SharedPages`] handle), and
//!   revoke them atomically; a revoke of a page the peer still maps is **deferred** (the ref and
//!   the page are not reused until the peer lets go, XSA-396).
//! * **back** ([`GrantMap`]): map a list of `(domid, gref)` as one virtually contiguous mapping,
//!   unmapped on drop; batched grant copy ([`GrantMap::copy`]) with a [`GrantStatus`] per
//!   operation; and [`MapCache`], a bounded persistent-mapping cache.
//!
//! Providers: [`xen`] (`/dev/xen/gntalloc` and `/dev/xen/gntdev`) and [`local`] (the local
//! platform of `docs/local-platform.md`: a memfd per domain holding its v1 grant table and its
//! frames, handed out by a [`local::Broker`]).
//!
//! Foreign memory is reached only through [`VolatileSlice`]: no `&[u8]` or `&mut T` into memory
//! the peer can write is ever handed out. Every grant mapping and shared-page set also implements
//! [`xenpv_ring::RingMemory`], so a multi-page ring can sit directly in it.
#![deny(missing_docs)]

mod cache;
mod error;
pub mod local;
mod sys;
mod table;
mod volatile;
pub mod xen;

pub use cache::{max_map_count, CacheStats, MapBudget, MapCache, Mappings, INLINE_MAPPINGS};
pub use error::{Error, Result};
pub use table::{flags, GrantEntryV1, FIRST_UNRESERVED_REF};
pub use volatile::VolatileSlice;
pub use xenpv_ring::GrantRef;

/// A domain id (`domid_t`).
pub type DomId = u16;

/// The size of a grant (one x86 page).
pub const PAGE_SIZE: usize = 4096;

/// The most pages one [`GrantMap::map`] or [`GrantShare::share`] call accepts: the data pages
/// of the largest blkif request (4096 segments, described by 8 indirect pages of 512), which a
/// backend maps and a frontend without persistent grants shares in one call. Bigger requests
/// are a peer's attempt to exhaust us; what one connection holds in all is bounded apart.
pub const MAX_PAGES_PER_CALL: usize = 4096;

/// The most operations one [`GrantMap::copy`] call accepts.
pub const MAX_COPY_OPS: usize = 4096;

/// How a page is shared or mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// The peer may only read (`GTF_readonly` / `GNTMAP_readonly`).
    ReadOnly,
    /// The peer may read and write.
    Writable,
}

impl Access {
    /// Whether this is [`Access::Writable`].
    pub fn is_writable(self) -> bool {
        self == Access::Writable
    }
}

/// A grant operation's status (`GNTST_*`, Xen's `grant_table.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i16)]
pub enum GrantStatus {
    /// `GNTST_okay`: the operation succeeded.
    Okay = 0,
    /// `GNTST_general_error`: a bad grant entry (wrong type or domid, write to a read-only grant).
    GeneralError = -1,
    /// `GNTST_bad_domain`: no such domain.
    BadDomain = -2,
    /// `GNTST_bad_gntref`: the grant ref is outside the granting domain's table.
    BadGntref = -3,
    /// `GNTST_bad_handle`: no such mapping handle.
    BadHandle = -4,
    /// `GNTST_bad_virt_addr`: bad virtual address.
    BadVirtAddr = -5,
    /// `GNTST_bad_dev_addr`: bad device address.
    BadDevAddr = -6,
    /// `GNTST_no_device_space`: out of mapping space.
    NoDeviceSpace = -7,
    /// `GNTST_permission_denied`: not allowed.
    PermissionDenied = -8,
    /// `GNTST_bad_page`: the granted frame is not a valid page of the granting domain.
    BadPage = -9,
    /// `GNTST_bad_copy_arg`: a copy crosses a page boundary.
    BadCopyArg = -10,
    /// `GNTST_address_too_big`: the address does not fit.
    AddressTooBig = -11,
    /// `GNTST_eagain`: try again.
    Eagain = -12,
    /// `GNTST_no_space`: out of grant entries or frames.
    NoSpace = -13,
}

impl GrantStatus {
    /// The status for a raw `GNTST_*` value; unknown values become [`GrantStatus::GeneralError`].
    pub fn from_raw(v: i16) -> Self {
        use GrantStatus::*;
        match v {
            0 => Okay,
            -2 => BadDomain,
            -3 => BadGntref,
            -4 => BadHandle,
            -5 => BadVirtAddr,
            -6 => BadDevAddr,
            -7 => NoDeviceSpace,
            -8 => PermissionDenied,
            -9 => BadPage,
            -10 => BadCopyArg,
            -11 => AddressTooBig,
            -12 => Eagain,
            -13 => NoSpace,
            _ => GeneralError,
        }
    }

    /// The raw `GNTST_*` value.
    pub fn raw(self) -> i16 {
        self as i16
    }

    /// Whether this is [`GrantStatus::Okay`].
    pub fn is_ok(self) -> bool {
        self == GrantStatus::Okay
    }
}

impl core::fmt::Display for GrantStatus {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{self:?} (GNTST {})", self.raw())
    }
}

/// Memory reached through grants: a mapping of foreign grants or a set of shared pages.
///
/// Every implementor is also [`xenpv_ring::RingMemory`]: a ring can be built directly on it
/// (a ring needs [`Access::Writable`] memory, since both halves write the shared indexes).
pub trait GrantMemory: xenpv_ring::RingMemory + Send + Sync {
    /// The whole memory, as a volatile slice (writes fail on read-only memory).
    fn volatile(&self) -> VolatileSlice<'_>;
    /// Whether this process may write the memory.
    fn access(&self) -> Access;
    /// Number of pages.
    fn pages(&self) -> usize {
        self.volatile().len() / PAGE_SIZE
    }
}

/// The outcome of a revoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoke {
    /// Every grant was ended; its ref and page are free for reuse.
    Revoked,
    /// `in_use` grants are still mapped (or being copied) by the peer: they stay granted, and
    /// their refs and pages are not reused, until the peer lets go (XSA-396). The provider ends
    /// them then (the local broker retries on every request and in [`local::Broker::reap`]).
    Deferred {
        /// How many of the pages were still in use.
        in_use: usize,
    },
}

/// Front side: share dedicated, zeroed pages with another domain.
pub trait GrantShare {
    /// The shared pages: our view of them, and their grant refs.
    type Shared: SharedPages;

    /// Allocates `count` dedicated, zeroed pages and grants them to `domid` (XSA-403: nothing
    /// else ever lived in them). The pages are virtually contiguous in this process.
    fn share(&self, domid: DomId, count: usize, access: Access) -> Result<Self::Shared>;

    /// Ends access to every page, atomically per grant. A grant still in use by the peer is not
    /// revoked under its feet: its revoke is deferred and its page and ref are not reused until
    /// the peer unmaps it. Dropping [`SharedPages`] without calling this revokes the same way.
    fn revoke(&self, shared: Self::Shared) -> Result<Revoke>;
}

/// The pages of one [`GrantShare::share`] call.
pub trait SharedPages: GrantMemory {
    /// The grant refs, one per page, in page order.
    fn grefs(&self) -> &[GrantRef];
    /// The domain the pages are granted to.
    fn domid(&self) -> DomId;
}

/// Back side: map and copy another domain's grants.
pub trait GrantMap {
    /// One contiguous mapping of one or several grants, unmapped on drop.
    type Mapping: GrantMemory;

    /// Maps every `(domid, gref)` of `refs`, in order, as ONE virtually contiguous mapping.
    /// All or nothing: if one grant fails, those already mapped are unmapped again and the error
    /// ([`Error::Map`]) names the failing index and its [`GrantStatus`].
    fn map(&self, refs: &[(DomId, GrantRef)], access: Access) -> Result<Self::Mapping>;

    /// [`map`](Self::map) for grants all from one domain.
    fn map_domain(&self, domid: DomId, refs: &[GrantRef], access: Access) -> Result<Self::Mapping> {
        let list: Vec<(DomId, GrantRef)> = refs.iter().map(|&r| (domid, r)).collect();
        self.map(&list, access)
    }

    /// Performs a batch of grant copies. Each operation gets its own `status`; the call itself
    /// fails only if the batch could not be submitted at all (too many operations, the device
    /// failed). Nothing stays mapped afterwards.
    fn copy(&self, ops: &mut [CopyOp<'_>]) -> Result<()>;
}

/// A shared reference maps as the provider it points to (several queues of one backend share
/// one grant device).
impl<G: GrantMap + ?Sized> GrantMap for &G {
    type Mapping = G::Mapping;
    fn map(&self, refs: &[(DomId, GrantRef)], access: Access) -> Result<Self::Mapping> {
        (**self).map(refs, access)
    }
    fn copy(&self, ops: &mut [CopyOp<'_>]) -> Result<()> {
        (**self).copy(ops)
    }
}

/// An `Arc` maps as the provider it holds (a provider shared by the threads of a daemon).
impl<G: GrantMap + ?Sized> GrantMap for std::sync::Arc<G> {
    type Mapping = G::Mapping;
    fn map(&self, refs: &[(DomId, GrantRef)], access: Access) -> Result<Self::Mapping> {
        (**self).map(refs, access)
    }
    fn copy(&self, ops: &mut [CopyOp<'_>]) -> Result<()> {
        (**self).copy(ops)
    }
}

/// One side of a grant copy in the foreign domain: a byte range inside one granted page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForeignRange {
    /// The granting domain.
    pub domid: DomId,
    /// The grant ref.
    pub gref: GrantRef,
    /// Offset in the page; `offset + len` must not exceed [`PAGE_SIZE`].
    pub offset: u16,
}

/// The direction and buffers of a grant copy.
#[derive(Debug)]
pub enum CopyKind<'a> {
    /// Copy from the foreign page into `dst` (`dst.len()` bytes; a read-only grant suffices).
    FromForeign {
        /// Where to read in the foreign domain.
        src: ForeignRange,
        /// Local destination.
        dst: &'a mut [u8],
    },
    /// Copy `src` into the foreign page (needs a writable grant).
    ToForeign {
        /// Local source.
        src: &'a [u8],
        /// Where to write in the foreign domain.
        dst: ForeignRange,
    },
}

/// One grant-copy operation and its status.
#[derive(Debug)]
pub struct CopyOp<'a> {
    /// What to copy.
    pub kind: CopyKind<'a>,
    /// Set by [`GrantMap::copy`]: [`GrantStatus::Okay`] or why this operation failed.
    pub status: GrantStatus,
}

impl<'a> CopyOp<'a> {
    /// Reads `dst.len()` bytes at `offset` of grant `gref` of `domid` into `dst`.
    pub fn from_foreign(domid: DomId, gref: GrantRef, offset: u16, dst: &'a mut [u8]) -> Self {
        Self {
            kind: CopyKind::FromForeign {
                src: ForeignRange {
                    domid,
                    gref,
                    offset,
                },
                dst,
            },
            status: GrantStatus::GeneralError,
        }
    }

    /// Writes `src` at `offset` of grant `gref` of `domid`.
    pub fn to_foreign(src: &'a [u8], domid: DomId, gref: GrantRef, offset: u16) -> Self {
        Self {
            kind: CopyKind::ToForeign {
                src,
                dst: ForeignRange {
                    domid,
                    gref,
                    offset,
                },
            },
            status: GrantStatus::GeneralError,
        }
    }

    /// The foreign side and the length of this operation.
    pub fn foreign(&self) -> (ForeignRange, usize) {
        match &self.kind {
            CopyKind::FromForeign { src, dst } => (*src, dst.len()),
            CopyKind::ToForeign { src, dst } => (*dst, src.len()),
        }
    }
}

/// Checks the foreign range of a copy: `offset + len <= PAGE_SIZE` (else `GNTST_bad_copy_arg`).
pub(crate) fn check_copy_range(r: ForeignRange, len: usize) -> GrantStatus {
    match (r.offset as usize).checked_add(len) {
        Some(end) if end <= PAGE_SIZE => GrantStatus::Okay,
        _ => GrantStatus::BadCopyArg,
    }
}
