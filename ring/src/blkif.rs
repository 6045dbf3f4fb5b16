//! blkif: the block device protocol (`io/blkif.h`).
//!
//! The native layout ([`BlkifRequest`] …) is that of x86_64 and of `arm-abi`; the `x86_32-abi`
//! layout, seen by a 64-bit backend serving a 32-bit frontend, is a separate set of types
//! ([`X86_32Request`] …) with conversions to and from the native ones. Sectors are always
//! 512-byte units on the ring.

use crate::pod::{cast, widen, wire_layout};
use crate::ring::RingProtocol;
use crate::GrantRef;

/// The xenstore node (under the backend's directory) in which xenpv-blkback says how many
/// persistent grants it keeps mapped per queue, and xenpv-blkfront reads it to size its pool.
/// Our own, as `xenpv-session`: other backends do not write it, other frontends ignore it.
pub const BACKEND_CACHE_NODE: &str = "xenpv-max-persistent-grants";

/// Read `nr_segments` segments starting at `sector_number`.
pub const OP_READ: u8 = 0;
/// Write.
pub const OP_WRITE: u8 = 1;
/// Write, ordered after every earlier write and before every later one (`feature-barrier`).
pub const OP_WRITE_BARRIER: u8 = 2;
/// Flush the volatile cache, optionally with data (`feature-flush-cache`).
pub const OP_FLUSH_DISKCACHE: u8 = 3;
/// Reserved (device-specific packets on SLES); answer with an error.
pub const OP_RESERVED_1: u8 = 4;
/// Discard a range of sectors (`feature-discard`), in the [`BlkifRequestDiscard`] layout.
pub const OP_DISCARD: u8 = 5;
/// Segments in separate granted pages (`feature-max-indirect-segments`), in the
/// [`BlkifRequestIndirect`] layout.
pub const OP_INDIRECT: u8 = 6;

/// Success.
pub const RSP_OKAY: i16 = 0;
/// Failure (-EIO).
pub const RSP_ERROR: i16 = -1;
/// Operation not supported.
pub const RSP_EOPNOTSUPP: i16 = -2;

/// Segments in a direct request.
pub const MAX_SEGMENTS_PER_REQUEST: usize = 11;
/// Indirect pages in an indirect request.
pub const MAX_INDIRECT_PAGES_PER_REQUEST: usize = 8;
/// Segments one indirect page holds (4096 / 8).
pub const SEGMENTS_PER_INDIRECT_FRAME: usize = 512;
/// Segments in the largest indirect request (4096).
pub const MAX_INDIRECT_SEGMENTS: usize =
    MAX_INDIRECT_PAGES_PER_REQUEST * SEGMENTS_PER_INDIRECT_FRAME;
/// Sectors (512 bytes) in a 4 KiB frame: `first_sect`/`last_sect` lie in `0..SECTORS_PER_PAGE`.
pub const SECTORS_PER_PAGE: u8 = 8;
/// The sector unit of the ring, whatever `sector-size` says.
pub const SECTOR_SIZE: u64 = 512;

/// Discard flag: secure erase (`discard-secure`).
pub const DISCARD_SECURE: u8 = 1 << 0;

/// `info` bit: a CD-ROM.
pub const VDISK_CDROM: u32 = 0x1;
/// `info` bit: removable media.
pub const VDISK_REMOVABLE: u32 = 0x2;
/// `info` bit: read-only.
pub const VDISK_READONLY: u32 = 0x4;

/// The blkif operations, for matching on a request's `operation` byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// [`OP_READ`]
    Read,
    /// [`OP_WRITE`]
    Write,
    /// [`OP_WRITE_BARRIER`]
    WriteBarrier,
    /// [`OP_FLUSH_DISKCACHE`]
    FlushDiskcache,
    /// [`OP_RESERVED_1`]
    Reserved1,
    /// [`OP_DISCARD`]
    Discard,
    /// [`OP_INDIRECT`]
    Indirect,
}

impl Operation {
    /// The operation of a wire byte, `None` for an unknown one.
    pub const fn from_u8(op: u8) -> Option<Self> {
        Some(match op {
            OP_READ => Self::Read,
            OP_WRITE => Self::Write,
            OP_WRITE_BARRIER => Self::WriteBarrier,
            OP_FLUSH_DISKCACHE => Self::FlushDiskcache,
            OP_RESERVED_1 => Self::Reserved1,
            OP_DISCARD => Self::Discard,
            OP_INDIRECT => Self::Indirect,
            _ => return None,
        })
    }

    /// The wire byte.
    pub const fn to_u8(self) -> u8 {
        match self {
            Self::Read => OP_READ,
            Self::Write => OP_WRITE,
            Self::WriteBarrier => OP_WRITE_BARRIER,
            Self::FlushDiskcache => OP_FLUSH_DISKCACHE,
            Self::Reserved1 => OP_RESERVED_1,
            Self::Discard => OP_DISCARD,
            Self::Indirect => OP_INDIRECT,
        }
    }
}

/// `struct blkif_request_segment`: one page of a request. Also the entry of an indirect page.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlkifRequestSegment {
    /// Grant of the 4 KiB data frame.
    pub gref: GrantRef,
    /// First 512-byte sector in the frame (inclusive).
    pub first_sect: u8,
    /// Last 512-byte sector in the frame (inclusive).
    pub last_sect: u8,
    _pad: [u8; 2],
}
wire_layout!(BlkifRequestSegment, size 8, align 4, { gref @ 0, first_sect @ 4, last_sect @ 5, _pad @ 6 });

impl BlkifRequestSegment {
    /// A segment of sectors `first_sect..=last_sect` of the frame `gref`.
    #[inline]
    pub const fn new(gref: GrantRef, first_sect: u8, last_sect: u8) -> Self {
        Self {
            gref,
            first_sect,
            last_sect,
            _pad: [0; 2],
        }
    }
}

/// `struct blkif_request` (native): read, write, barrier and flush requests, and the ring slot
/// type that the discard and indirect layouts are read from.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlkifRequest {
    /// `OP_*`.
    pub operation: u8,
    /// Segments used in `seg` (at most 11; 0 for a pure flush or barrier).
    pub nr_segments: u8,
    /// The device (`blkif_vdev_t`).
    pub handle: u16,
    _pad0: [u8; 4],
    /// Private frontend value, echoed in the response.
    pub id: u64,
    /// Start sector (512-byte units).
    pub sector_number: u64,
    /// Segments.
    pub seg: [BlkifRequestSegment; MAX_SEGMENTS_PER_REQUEST],
}
wire_layout!(BlkifRequest, size 112, align 8, {
    operation @ 0, nr_segments @ 1, handle @ 2, _pad0 @ 4, id @ 8, sector_number @ 16, seg @ 24,
});

impl BlkifRequest {
    /// A request with the given header fields and no segments.
    #[inline]
    pub fn new(operation: u8, handle: u16, id: u64, sector_number: u64) -> Self {
        Self {
            operation,
            handle,
            id,
            sector_number,
            ..Self::default()
        }
    }

    /// This slot read as a discard request (meaningful when `operation == OP_DISCARD`).
    pub fn as_discard(&self) -> BlkifRequestDiscard {
        cast(self)
    }

    /// This slot read as an indirect request (meaningful when `operation == OP_INDIRECT`).
    pub fn as_indirect(&self) -> BlkifRequestIndirect {
        cast(self)
    }
}

/// `struct blkif_request_discard` (native).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlkifRequestDiscard {
    /// [`OP_DISCARD`].
    pub operation: u8,
    /// [`DISCARD_SECURE`] or 0.
    pub flag: u8,
    /// The device.
    pub handle: u16,
    _pad0: [u8; 4],
    /// Private frontend value, echoed in the response.
    pub id: u64,
    /// Start sector (512-byte units).
    pub sector_number: u64,
    /// Sectors to discard.
    pub nr_sectors: u64,
}
wire_layout!(BlkifRequestDiscard, size 32, align 8, {
    operation @ 0, flag @ 1, handle @ 2, _pad0 @ 4, id @ 8, sector_number @ 16, nr_sectors @ 24,
});

impl BlkifRequestDiscard {
    /// A discard of `nr_sectors` from `sector_number`.
    pub fn new(flag: u8, handle: u16, id: u64, sector_number: u64, nr_sectors: u64) -> Self {
        Self {
            operation: OP_DISCARD,
            flag,
            handle,
            id,
            sector_number,
            nr_sectors,
            _pad0: [0; 4],
        }
    }

    /// The ring slot holding this request (the rest zeroed).
    pub fn to_request(&self) -> BlkifRequest {
        widen(self)
    }
}

/// `struct blkif_request_indirect` (native).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlkifRequestIndirect {
    /// [`OP_INDIRECT`].
    pub operation: u8,
    /// [`OP_READ`] or [`OP_WRITE`].
    pub indirect_op: u8,
    /// Segments in the indirect pages.
    pub nr_segments: u16,
    _pad0: [u8; 4],
    /// Private frontend value, echoed in the response.
    pub id: u64,
    /// Start sector (512-byte units).
    pub sector_number: u64,
    /// The device.
    pub handle: u16,
    _pad1: [u8; 2],
    /// Grants of the pages holding the segments (512 per page).
    pub indirect_grefs: [GrantRef; MAX_INDIRECT_PAGES_PER_REQUEST],
    _pad2: [u8; 4],
}
wire_layout!(BlkifRequestIndirect, size 64, align 8, {
    operation @ 0, indirect_op @ 1, nr_segments @ 2, _pad0 @ 4, id @ 8, sector_number @ 16,
    handle @ 24, _pad1 @ 26, indirect_grefs @ 28, _pad2 @ 60,
});

impl BlkifRequestIndirect {
    /// An indirect request with no indirect pages filled in yet.
    pub fn new(
        indirect_op: u8,
        nr_segments: u16,
        handle: u16,
        id: u64,
        sector_number: u64,
    ) -> Self {
        Self {
            operation: OP_INDIRECT,
            indirect_op,
            nr_segments,
            handle,
            id,
            sector_number,
            ..Self::default()
        }
    }

    /// The ring slot holding this request (the rest zeroed).
    pub fn to_request(&self) -> BlkifRequest {
        widen(self)
    }

    /// Indirect pages needed for `nr_segments` segments.
    pub const fn pages_for(nr_segments: usize) -> usize {
        nr_segments.div_ceil(SEGMENTS_PER_INDIRECT_FRAME)
    }
}

/// `struct blkif_response` (native).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlkifResponse {
    /// The request's `id`.
    pub id: u64,
    /// The request's `operation`.
    pub operation: u8,
    _pad0: u8,
    /// `RSP_*`.
    pub status: i16,
    _pad1: [u8; 4],
}
wire_layout!(BlkifResponse, size 16, align 8, {
    id @ 0, operation @ 8, _pad0 @ 9, status @ 10, _pad1 @ 12,
});

impl BlkifResponse {
    /// A response; the padding is zero (XSA-216).
    #[inline]
    pub const fn new(id: u64, operation: u8, status: i16) -> Self {
        Self {
            id,
            operation,
            _pad0: 0,
            status,
            _pad1: [0; 4],
        }
    }
}

/// The native blkif ring (`DEFINE_RING_TYPES(blkif, …)`): 112-byte slots, 32 per page.
#[derive(Debug, Clone, Copy)]
pub enum Blkif {}
impl RingProtocol for Blkif {
    type Req = BlkifRequest;
    type Rsp = BlkifResponse;
}

/// `blkif_request` as a 32-bit x86 frontend lays it out (`x86_32-abi`): `id` at offset 4.
#[repr(C, packed(4))]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct X86_32Request {
    /// `OP_*`.
    pub operation: u8,
    /// Segments used in `seg`.
    pub nr_segments: u8,
    /// The device.
    pub handle: u16,
    /// Private frontend value, echoed in the response.
    pub id: u64,
    /// Start sector (512-byte units).
    pub sector_number: u64,
    /// Segments.
    pub seg: [BlkifRequestSegment; MAX_SEGMENTS_PER_REQUEST],
}
wire_layout!(X86_32Request, size 108, align 4, {
    operation @ 0, nr_segments @ 1, handle @ 2, id @ 4, sector_number @ 12, seg @ 20,
});

/// `blkif_request_discard` in the `x86_32-abi` layout.
#[repr(C, packed(4))]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct X86_32RequestDiscard {
    /// [`OP_DISCARD`].
    pub operation: u8,
    /// [`DISCARD_SECURE`] or 0.
    pub flag: u8,
    /// The device.
    pub handle: u16,
    /// Private frontend value.
    pub id: u64,
    /// Start sector.
    pub sector_number: u64,
    /// Sectors to discard.
    pub nr_sectors: u64,
}
wire_layout!(X86_32RequestDiscard, size 28, align 4, {
    operation @ 0, flag @ 1, handle @ 2, id @ 4, sector_number @ 12, nr_sectors @ 20,
});

/// `blkif_request_indirect` in the `x86_32-abi` layout (with the i386 tail `pad`).
#[repr(C, packed(4))]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct X86_32RequestIndirect {
    /// [`OP_INDIRECT`].
    pub operation: u8,
    /// [`OP_READ`] or [`OP_WRITE`].
    pub indirect_op: u8,
    /// Segments in the indirect pages.
    pub nr_segments: u16,
    /// Private frontend value.
    pub id: u64,
    /// Start sector.
    pub sector_number: u64,
    /// The device.
    pub handle: u16,
    _pad0: [u8; 2],
    /// Grants of the pages holding the segments.
    pub indirect_grefs: [GrantRef; MAX_INDIRECT_PAGES_PER_REQUEST],
    _pad1: [u8; 8],
}
wire_layout!(X86_32RequestIndirect, size 64, align 4, {
    operation @ 0, indirect_op @ 1, nr_segments @ 2, id @ 4, sector_number @ 12, handle @ 20,
    _pad0 @ 22, indirect_grefs @ 24, _pad1 @ 56,
});

/// `blkif_response` in the `x86_32-abi` layout (12 bytes).
#[repr(C, packed(4))]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct X86_32Response {
    /// The request's `id`.
    pub id: u64,
    /// The request's `operation`.
    pub operation: u8,
    _pad0: u8,
    /// `RSP_*`.
    pub status: i16,
}
wire_layout!(X86_32Response, size 12, align 4, { id @ 0, operation @ 8, _pad0 @ 9, status @ 10 });

/// The `x86_32-abi` blkif ring: 108-byte slots (which straddle page boundaries in multi-page
/// rings), 32 per page.
#[derive(Debug, Clone, Copy)]
pub enum BlkifX86_32 {}
impl RingProtocol for BlkifX86_32 {
    type Req = X86_32Request;
    type Rsp = X86_32Response;
}

impl X86_32Request {
    /// Translates the slot to the native layout, whatever its operation: read/write/flush/
    /// barrier fields, or the discard or indirect layout, field by field.
    pub fn to_native(&self) -> BlkifRequest {
        match self.operation {
            OP_DISCARD => {
                let d: X86_32RequestDiscard = cast(self);
                BlkifRequestDiscard::new(d.flag, d.handle, d.id, d.sector_number, d.nr_sectors)
                    .to_request()
            }
            OP_INDIRECT => {
                let i: X86_32RequestIndirect = cast(self);
                let mut n = BlkifRequestIndirect::new(
                    i.indirect_op,
                    i.nr_segments,
                    i.handle,
                    i.id,
                    i.sector_number,
                );
                n.indirect_grefs = i.indirect_grefs;
                n.to_request()
            }
            _ => BlkifRequest {
                operation: self.operation,
                nr_segments: self.nr_segments,
                handle: self.handle,
                _pad0: [0; 4],
                id: self.id,
                sector_number: self.sector_number,
                seg: self.seg,
            },
        }
    }

    /// Translates a native slot to this layout (what a 32-bit frontend writes).
    pub fn from_native(req: &BlkifRequest) -> Self {
        match req.operation {
            OP_DISCARD => {
                let d = req.as_discard();
                widen(&X86_32RequestDiscard {
                    operation: d.operation,
                    flag: d.flag,
                    handle: d.handle,
                    id: d.id,
                    sector_number: d.sector_number,
                    nr_sectors: d.nr_sectors,
                })
            }
            OP_INDIRECT => {
                let i = req.as_indirect();
                widen(&X86_32RequestIndirect {
                    operation: i.operation,
                    indirect_op: i.indirect_op,
                    nr_segments: i.nr_segments,
                    id: i.id,
                    sector_number: i.sector_number,
                    handle: i.handle,
                    _pad0: [0; 2],
                    indirect_grefs: i.indirect_grefs,
                    _pad1: [0; 8],
                })
            }
            _ => Self {
                operation: req.operation,
                nr_segments: req.nr_segments,
                handle: req.handle,
                id: req.id,
                sector_number: req.sector_number,
                seg: req.seg,
            },
        }
    }
}

impl From<BlkifResponse> for X86_32Response {
    fn from(r: BlkifResponse) -> Self {
        Self {
            id: r.id,
            operation: r.operation,
            _pad0: 0,
            status: r.status,
        }
    }
}

impl From<X86_32Response> for BlkifResponse {
    fn from(r: X86_32Response) -> Self {
        Self::new(r.id, r.operation, r.status)
    }
}

const _: () = {
    use crate::ring::{ring_entries, PAGE_SIZE};
    assert!(<Blkif as RingProtocol>::ENTRY_SIZE == 112);
    assert!(<BlkifX86_32 as RingProtocol>::ENTRY_SIZE == 108);
    assert!(ring_entries::<Blkif>(PAGE_SIZE) == 32);
    assert!(ring_entries::<Blkif>(PAGE_SIZE << 1) == 64);
    assert!(ring_entries::<Blkif>(PAGE_SIZE << 2) == 128);
    assert!(ring_entries::<Blkif>(PAGE_SIZE << 3) == 256);
    assert!(ring_entries::<Blkif>(PAGE_SIZE << 4) == 512);
    assert!(ring_entries::<BlkifX86_32>(PAGE_SIZE) == 32);
    assert!(ring_entries::<BlkifX86_32>(PAGE_SIZE << 4) == 512);
};
