//! Validation of blkif requests (pv-protocols.md §1.6): each request is copied out of the ring
//! once (by the ring crate), translated from the frontend's ABI, and checked here against the
//! device; the result is either an I/O plan with every offset and length proven in range, or a
//! response status.

use smallvec::SmallVec;
use xenpv_grant::INLINE_MAPPINGS;
use xenpv_ring::blkif::{
    BlkifRequest, BlkifRequestSegment, DISCARD_SECURE, MAX_INDIRECT_PAGES_PER_REQUEST,
    MAX_SEGMENTS_PER_REQUEST, OP_DISCARD, OP_FLUSH_DISKCACHE, OP_INDIRECT, OP_READ, OP_WRITE,
    OP_WRITE_BARRIER, RSP_EOPNOTSUPP, RSP_ERROR, SECTORS_PER_PAGE, SECTOR_SIZE,
    SEGMENTS_PER_INDIRECT_FRAME,
};
use xenpv_ring::GrantRef;

/// A transfer's segments: inline up to [`INLINE_MAPPINGS`] (a 16 KiB request), on the heap
/// beyond, so that validating a small request allocates nothing.
pub type Segments = SmallVec<[Segment; INLINE_MAPPINGS]>;

/// What the device offers, against which requests are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Size in 512-byte sectors (the `sectors` node).
    pub sectors: u64,
    /// Logical block size in bytes (`sector-size`): a power of two ≥ 512.
    pub sector_size: u32,
    /// Writes, flushes with data, barriers and discards are refused.
    pub read_only: bool,
    /// `feature-flush-cache` was advertised.
    pub flush: bool,
    /// `feature-barrier` was advertised.
    pub barrier: bool,
    /// `feature-discard` was advertised.
    pub discard: bool,
    /// `discard-secure` was advertised.
    pub discard_secure: bool,
    /// `discard-granularity` in bytes (a multiple of `sector_size`; 0 means `sector_size`).
    pub discard_granularity: u32,
    /// `feature-max-indirect-segments` (0: indirect requests are not offered).
    pub max_indirect_segments: u32,
}

/// One data segment: a sector range of one granted 4 KiB frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// The grant of the frame.
    pub gref: GrantRef,
    /// Byte offset in the frame.
    pub offset: u16,
    /// Length in bytes (a multiple of 512, at most 4096 − offset).
    pub len: u16,
}

/// Direction of a data transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Storage → guest.
    Read,
    /// Guest → storage.
    Write,
}

/// What to do for a request whose header is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Transfer `segments` at byte `offset` of the disk. With `flush_before`, flush the disk
    /// first (a flush-cache request carrying data); with `barrier`, order it after every earlier
    /// write and flush it before answering.
    Transfer {
        /// Read or write.
        dir: Direction,
        /// Byte offset on the disk.
        offset: u64,
        /// The segments, in order; their lengths sum to the transfer length.
        segments: Segments,
        /// Flush before writing (`OP_FLUSH_DISKCACHE` with data).
        flush_before: bool,
        /// Barrier semantics (`OP_WRITE_BARRIER`).
        barrier: bool,
    },
    /// Segments live in indirect pages: map `pages`, then call [`indirect_segments`] on their
    /// contents to get the [`Plan::Transfer`].
    Indirect {
        /// Read or write.
        dir: Direction,
        /// Byte offset on the disk.
        offset: u64,
        /// Segments in the indirect pages.
        nr_segments: u16,
        /// Grants of the indirect pages (`ceil(nr_segments / 512)` of them).
        pages: Vec<GrantRef>,
    },
    /// Flush the disk cache (no data); with `barrier`, a barrier without data.
    Flush {
        /// `OP_WRITE_BARRIER` with no segments.
        barrier: bool,
    },
    /// Discard `len` bytes at byte `offset`.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Secure erase requested (and offered).
        secure: bool,
    },
}

/// Why a request was refused; each maps to a response status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// An operation we do not know or did not offer: `BLKIF_RSP_EOPNOTSUPP`.
    #[error("operation {0} not supported")]
    Unsupported(u8),
    /// A malformed request: `BLKIF_RSP_ERROR`.
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// A write to a read-only device: `BLKIF_RSP_ERROR`.
    #[error("write to a read-only device")]
    ReadOnly,
    /// Outside the disk: `BLKIF_RSP_ERROR`.
    #[error("access beyond the end of the disk")]
    OutOfRange,
}

impl Refusal {
    /// The response status for this refusal.
    pub fn status(self) -> i16 {
        match self {
            Refusal::Unsupported(_) => RSP_EOPNOTSUPP,
            _ => RSP_ERROR,
        }
    }
}

/// Checks one segment and returns it in bytes.
fn segment(s: &BlkifRequestSegment, limits: &Limits) -> Result<Segment, Refusal> {
    // Copy the fields once (the request is already a private copy, but keep each field read
    // once so that the checks and the use agree by construction).
    let (first, last) = (s.first_sect, s.last_sect);
    if first > last || last >= SECTORS_PER_PAGE {
        return Err(Refusal::Invalid("segment sectors out of the 4 KiB frame"));
    }
    let offset = u16::from(first) * 512;
    let len = (u16::from(last) - u16::from(first) + 1) * 512;
    let ss = limits.sector_size;
    if ss > 512 && (u32::from(offset) % ss != 0 || u32::from(len) % ss != 0) {
        return Err(Refusal::Invalid("segment not aligned to sector-size"));
    }
    Ok(Segment {
        gref: s.gref,
        offset,
        len,
    })
}

/// The byte range of a transfer of `bytes` at `sector`, if it lies inside the disk and is
/// aligned to the logical block size.
fn range(sector: u64, bytes: u64, limits: &Limits) -> Result<u64, Refusal> {
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(Refusal::OutOfRange)?;
    let disk = limits
        .sectors
        .checked_mul(SECTOR_SIZE)
        .ok_or(Refusal::OutOfRange)?;
    let end = offset.checked_add(bytes).ok_or(Refusal::OutOfRange)?;
    if end > disk {
        return Err(Refusal::OutOfRange);
    }
    if limits.sector_size > 512 && offset % u64::from(limits.sector_size) != 0 {
        return Err(Refusal::Invalid("sector_number not aligned to sector-size"));
    }
    Ok(offset)
}

fn transfer(
    dir: Direction,
    sector: u64,
    segs: &[BlkifRequestSegment],
    limits: &Limits,
    flush_before: bool,
    barrier: bool,
) -> Result<Plan, Refusal> {
    let mut segments = Segments::with_capacity(segs.len());
    let mut bytes: u64 = 0;
    for s in segs {
        let seg = segment(s, limits)?;
        bytes += u64::from(seg.len); // at most 4096 segments × 4096 bytes: no overflow
        segments.push(seg);
    }
    let offset = range(sector, bytes, limits)?;
    Ok(Plan::Transfer {
        dir,
        offset,
        segments,
        flush_before,
        barrier,
    })
}

/// Validates a (native-layout) request against the device: the plan to carry out, or why it is
/// refused (whose [`Refusal::status`] goes into the response, with the request's `id`).
pub fn validate(req: &BlkifRequest, limits: &Limits) -> Result<Plan, Refusal> {
    let op = req.operation;
    match op {
        OP_READ | OP_WRITE | OP_WRITE_BARRIER | OP_FLUSH_DISKCACHE => {
            let n = usize::from(req.nr_segments);
            if n > MAX_SEGMENTS_PER_REQUEST {
                return Err(Refusal::Invalid("more than 11 segments"));
            }
            let writes = op != OP_READ;
            if op == OP_WRITE_BARRIER && !limits.barrier
                || op == OP_FLUSH_DISKCACHE && !limits.flush
            {
                return Err(Refusal::Unsupported(op));
            }
            // A flush or a barrier without data writes nothing: served on a read-only device
            // too (both are offered there), as ordering points.
            if writes && limits.read_only && n > 0 {
                return Err(Refusal::ReadOnly);
            }
            if n == 0 {
                return match op {
                    OP_FLUSH_DISKCACHE => Ok(Plan::Flush { barrier: false }),
                    OP_WRITE_BARRIER => Ok(Plan::Flush { barrier: true }),
                    _ => Err(Refusal::Invalid("read or write without segments")),
                };
            }
            let dir = if writes {
                Direction::Write
            } else {
                Direction::Read
            };
            transfer(
                dir,
                req.sector_number,
                &req.seg[..n],
                limits,
                op == OP_FLUSH_DISKCACHE,
                op == OP_WRITE_BARRIER,
            )
        }
        OP_DISCARD => {
            if !limits.discard {
                return Err(Refusal::Unsupported(op));
            }
            if limits.read_only {
                return Err(Refusal::ReadOnly);
            }
            let d = req.as_discard();
            let secure = d.flag & DISCARD_SECURE != 0;
            if secure && !limits.discard_secure {
                return Err(Refusal::Unsupported(op));
            }
            let len = d
                .nr_sectors
                .checked_mul(SECTOR_SIZE)
                .ok_or(Refusal::OutOfRange)?;
            let offset = range(d.sector_number, len, limits)?;
            let gran = u64::from(if limits.discard_granularity == 0 {
                limits.sector_size
            } else {
                limits.discard_granularity
            });
            if offset % gran != 0 || len % gran != 0 {
                return Err(Refusal::Invalid(
                    "discard not aligned to discard-granularity",
                ));
            }
            Ok(Plan::Discard {
                offset,
                len,
                secure,
            })
        }
        OP_INDIRECT => {
            if limits.max_indirect_segments == 0 {
                return Err(Refusal::Unsupported(op));
            }
            let r = req.as_indirect();
            let dir = match r.indirect_op {
                OP_READ => Direction::Read,
                OP_WRITE if limits.read_only => return Err(Refusal::ReadOnly),
                OP_WRITE => Direction::Write,
                _ => return Err(Refusal::Invalid("indirect_op is neither read nor write")),
            };
            let n = r.nr_segments;
            if n == 0 || u32::from(n) > limits.max_indirect_segments {
                return Err(Refusal::Invalid("indirect segment count out of range"));
            }
            let pages = usize::from(n).div_ceil(SEGMENTS_PER_INDIRECT_FRAME);
            if pages > MAX_INDIRECT_PAGES_PER_REQUEST {
                return Err(Refusal::Invalid("too many indirect pages"));
            }
            // The range is checked again with the real segment lengths; this early check only
            // rejects a start sector outside the disk.
            let offset = range(r.sector_number, 0, limits)?;
            let grefs = r.indirect_grefs;
            Ok(Plan::Indirect {
                dir,
                offset,
                nr_segments: n,
                pages: grefs[..pages].to_vec(),
            })
        }
        _ => Err(Refusal::Unsupported(op)),
    }
}

/// Completes an indirect request: `segments` are the first `nr_segments` entries copied out of
/// its indirect pages (once). Every segment is checked and the whole range must lie inside the
/// disk.
pub fn indirect_segments(
    dir: Direction,
    offset: u64,
    segments: &[BlkifRequestSegment],
    limits: &Limits,
) -> Result<Plan, Refusal> {
    if segments.is_empty() || segments.len() > limits.max_indirect_segments as usize {
        return Err(Refusal::Invalid("indirect segment count out of range"));
    }
    transfer(dir, offset / SECTOR_SIZE, segments, limits, false, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use xenpv_ring::blkif::{BlkifRequestDiscard, BlkifRequestIndirect, OP_RESERVED_1};

    const L: Limits = Limits {
        sectors: 2048,
        sector_size: 512,
        read_only: false,
        flush: true,
        barrier: true,
        discard: true,
        discard_secure: false,
        discard_granularity: 4096,
        max_indirect_segments: 256,
    };

    fn rw(op: u8, sector: u64, segs: &[(u32, u8, u8)]) -> BlkifRequest {
        let mut r = BlkifRequest::new(op, 0, 7, sector);
        r.nr_segments = segs.len() as u8;
        for (i, &(g, f, l)) in segs.iter().enumerate() {
            r.seg[i] = BlkifRequestSegment::new(g, f, l);
        }
        r
    }

    #[test]
    fn valid_requests_become_plans() {
        let p = validate(&rw(OP_READ, 8, &[(1, 0, 7), (2, 1, 3)]), &L).unwrap();
        assert_eq!(
            p,
            Plan::Transfer {
                dir: Direction::Read,
                offset: 4096,
                segments: smallvec::smallvec![
                    Segment {
                        gref: 1,
                        offset: 0,
                        len: 4096
                    },
                    Segment {
                        gref: 2,
                        offset: 512,
                        len: 1536
                    }
                ],
                flush_before: false,
                barrier: false
            }
        );
        assert_eq!(
            validate(&rw(OP_FLUSH_DISKCACHE, 0, &[]), &L),
            Ok(Plan::Flush { barrier: false })
        );
        assert_eq!(
            validate(&rw(OP_WRITE_BARRIER, 0, &[]), &L),
            Ok(Plan::Flush { barrier: true })
        );
        // The last sector of the disk.
        assert!(validate(&rw(OP_WRITE, 2047, &[(1, 7, 7)]), &L).is_ok());
        let d = BlkifRequestDiscard::new(0, 0, 9, 8, 16).to_request();
        assert_eq!(
            validate(&d, &L),
            Ok(Plan::Discard {
                offset: 4096,
                len: 8192,
                secure: false
            })
        );
        let i = BlkifRequestIndirect::new(OP_WRITE, 600, 0, 3, 16).to_request();
        match validate(&i, &L) {
            Err(Refusal::Invalid(_)) => {}
            other => panic!("600 > 256 segments must be refused: {other:?}"),
        }
        let mut i = BlkifRequestIndirect::new(OP_WRITE, 200, 0, 3, 16);
        i.indirect_grefs = [5, 6, 7, 8, 9, 10, 11, 12];
        assert_eq!(
            validate(&i.to_request(), &L),
            Ok(Plan::Indirect {
                dir: Direction::Write,
                offset: 8192,
                nr_segments: 200,
                pages: vec![5]
            })
        );
    }

    #[test]
    fn hostile_requests_are_refused() {
        let cases: Vec<(BlkifRequest, Refusal)> = vec![
            (
                rw(OP_READ, 0, &[]),
                Refusal::Invalid("read or write without segments"),
            ),
            (
                rw(OP_READ, 0, &[(1, 3, 2)]),
                Refusal::Invalid("segment sectors out of the 4 KiB frame"),
            ),
            (
                rw(OP_READ, 0, &[(1, 0, 8)]),
                Refusal::Invalid("segment sectors out of the 4 KiB frame"),
            ),
            (rw(OP_READ, 2047, &[(1, 0, 1)]), Refusal::OutOfRange),
            (
                rw(OP_READ, u64::MAX / 512, &[(1, 0, 0)]),
                Refusal::OutOfRange,
            ),
            (rw(OP_READ, u64::MAX, &[(1, 0, 0)]), Refusal::OutOfRange),
            (
                rw(OP_RESERVED_1, 0, &[]),
                Refusal::Unsupported(OP_RESERVED_1),
            ),
            (rw(200, 0, &[]), Refusal::Unsupported(200)),
            (
                BlkifRequestDiscard::new(0, 0, 1, 2040, 16).to_request(),
                Refusal::OutOfRange,
            ),
            (
                BlkifRequestDiscard::new(0, 0, 1, 0, u64::MAX).to_request(),
                Refusal::OutOfRange,
            ),
            (
                BlkifRequestDiscard::new(0, 0, 1, 1, 8).to_request(),
                Refusal::Invalid("discard not aligned to discard-granularity"),
            ),
            (
                BlkifRequestDiscard::new(DISCARD_SECURE, 0, 1, 0, 8).to_request(),
                Refusal::Unsupported(OP_DISCARD),
            ),
            (
                BlkifRequestIndirect::new(7, 1, 0, 1, 0).to_request(),
                Refusal::Invalid("indirect_op is neither read nor write"),
            ),
            (
                BlkifRequestIndirect::new(OP_READ, 0, 0, 1, 0).to_request(),
                Refusal::Invalid("indirect segment count out of range"),
            ),
            (
                BlkifRequestIndirect::new(OP_READ, 1, 0, 1, 4096).to_request(),
                Refusal::OutOfRange,
            ),
        ];
        for (req, want) in cases {
            assert_eq!(validate(&req, &L), Err(want), "{req:?}");
        }
        let mut too_many = rw(OP_READ, 0, &[(1, 0, 7)]);
        too_many.nr_segments = 12;
        assert_eq!(
            validate(&too_many, &L),
            Err(Refusal::Invalid("more than 11 segments"))
        );
        too_many.nr_segments = 255;
        assert_eq!(
            validate(&too_many, &L),
            Err(Refusal::Invalid("more than 11 segments"))
        );
    }

    #[test]
    fn read_only_and_unoffered_features() {
        let ro = Limits {
            read_only: true,
            ..L
        };
        assert_eq!(
            validate(&rw(OP_WRITE, 0, &[(1, 0, 7)]), &ro),
            Err(Refusal::ReadOnly)
        );
        assert_eq!(
            validate(&rw(OP_FLUSH_DISKCACHE, 0, &[(1, 0, 7)]), &ro),
            Err(Refusal::ReadOnly)
        );
        assert_eq!(
            validate(&rw(OP_FLUSH_DISKCACHE, 0, &[]), &ro),
            Ok(Plan::Flush { barrier: false })
        );
        // A barrier is offered on a read-only device too: without data it is served.
        assert_eq!(
            validate(&rw(OP_WRITE_BARRIER, 0, &[]), &ro),
            Ok(Plan::Flush { barrier: true })
        );
        assert_eq!(
            validate(&rw(OP_WRITE_BARRIER, 0, &[(1, 0, 7)]), &ro),
            Err(Refusal::ReadOnly)
        );
        assert_eq!(
            validate(&BlkifRequestDiscard::new(0, 0, 1, 0, 8).to_request(), &ro),
            Err(Refusal::ReadOnly)
        );
        assert!(validate(&rw(OP_READ, 0, &[(1, 0, 7)]), &ro).is_ok());
        let bare = Limits {
            flush: false,
            barrier: false,
            discard: false,
            max_indirect_segments: 0,
            ..L
        };
        for req in [
            rw(OP_FLUSH_DISKCACHE, 0, &[]),
            rw(OP_WRITE_BARRIER, 0, &[]),
            BlkifRequestDiscard::new(0, 0, 1, 0, 8).to_request(),
            BlkifRequestIndirect::new(OP_READ, 1, 0, 1, 0).to_request(),
        ] {
            assert!(
                matches!(validate(&req, &bare), Err(Refusal::Unsupported(_))),
                "{req:?}"
            );
        }
        assert_eq!(Refusal::Unsupported(4).status(), RSP_EOPNOTSUPP);
        assert_eq!(Refusal::OutOfRange.status(), RSP_ERROR);
    }

    #[test]
    fn large_sector_size_alignment() {
        let big = Limits {
            sector_size: 4096,
            discard_granularity: 0,
            ..L
        };
        assert!(validate(&rw(OP_READ, 8, &[(1, 0, 7)]), &big).is_ok());
        assert!(validate(&rw(OP_READ, 8, &[(1, 1, 7)]), &big).is_err());
        assert!(validate(&rw(OP_READ, 9, &[(1, 0, 7)]), &big).is_err());
    }

    #[test]
    fn indirect_segments_are_checked() {
        let segs: Vec<_> = (0..200)
            .map(|i| BlkifRequestSegment::new(i, 0, 7))
            .collect();
        match indirect_segments(Direction::Write, 8192, &segs, &L).unwrap() {
            Plan::Transfer {
                segments, offset, ..
            } => {
                assert_eq!(offset, 8192);
                assert_eq!(segments.len(), 200);
            }
            p => panic!("{p:?}"),
        }
        let mut bad = segs.clone();
        bad[150].last_sect = 9;
        assert!(indirect_segments(Direction::Write, 8192, &bad, &L).is_err());
        let past_end: Vec<_> = (0..256)
            .map(|i| BlkifRequestSegment::new(i, 0, 7))
            .collect();
        assert_eq!(
            indirect_segments(Direction::Read, 0, &past_end, &L).err(),
            None
        );
        assert_eq!(
            indirect_segments(Direction::Read, 4096, &past_end, &L),
            Err(Refusal::OutOfRange)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_requests_never_escape_the_disk(bytes in prop::collection::vec(any::<u8>(), 112), sectors in 1u64..1 << 40) {
            let raw: [u8; 112] = bytes.try_into().unwrap();
            let req: BlkifRequest = xenpv_ring::cast(&raw);
            let limits = Limits { sectors, ..L };
            if let Ok(plan) = validate(&req, &limits) {
                match plan {
                    Plan::Transfer { offset, segments, .. } => {
                        let len: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
                        prop_assert!(offset + len <= sectors * 512);
                        for s in segments {
                            prop_assert!(u32::from(s.offset) + u32::from(s.len) <= 4096);
                        }
                    }
                    Plan::Discard { offset, len, .. } => prop_assert!(offset + len <= sectors * 512),
                    Plan::Indirect { pages, nr_segments, .. } => {
                        prop_assert!(!pages.is_empty() && pages.len() <= 8);
                        prop_assert!(u32::from(nr_segments) <= L.max_indirect_segments);
                    }
                    Plan::Flush { .. } => {}
                }
            }
        }
    }
}
