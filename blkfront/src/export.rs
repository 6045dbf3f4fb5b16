//! The disk as an NBD export: every NBD request becomes an asynchronous blkfront operation, so
//! that a client's queue depth reaches the ring (fio at iodepth 32 is not serialised).

use std::sync::Arc;

use xenpv_evtchn::EventChannel;
use xenpv_grant::{GrantShare, SharedPages};
use xenpv_nbd::{AsyncBlockExport, Command, Completion, Errno, ExportFlags, Request};

use crate::{BlkFront, DiskInfo, Error, Op};

/// An [`AsyncBlockExport`] over a [`BlkFront`]. It advertises FLUSH, FUA (a write or trim
/// with FUA is followed by a flush before it is answered), TRIM when the backend offers discard
/// (a trim discards the part of its range aligned to the backend's discard granularity: see
/// [`trim_range`]), not WRITE_ZEROES.
pub struct NbdExport<G: GrantShare, E> {
    dev: Arc<BlkFront<G, E>>,
}

impl<G: GrantShare, E> NbdExport<G, E> {
    /// Exports `dev`.
    pub fn new(dev: Arc<BlkFront<G, E>>) -> Self {
        Self { dev }
    }
}

impl<G, E> AsyncBlockExport for NbdExport<G, E>
where
    G: GrantShare + Send + Sync + 'static,
    G::Shared: SharedPages + Send + Sync + 'static,
    E: EventChannel + 'static,
{
    /// The disk's size now. The NBD server asks at each connection's handshake, so a
    /// connection made after an online resize sees the new size. NBD cannot tell a connected
    /// client that the size changed: a connection keeps the size it was given, and the server
    /// refuses its requests beyond that size even after the disk grew (reconnect to use the
    /// new space); after a shrink, its requests beyond the new end fail (`ENOSPC` for writes,
    /// as the NBD spec asks for writes past the end, `EINVAL` otherwise).
    fn size(&self) -> u64 {
        self.dev.size()
    }

    fn flags(&self) -> ExportFlags {
        let info = self.dev.info();
        ExportFlags {
            read_only: info.read_only,
            flush: true,
            fua: true,
            trim: info.discard && !info.read_only,
            write_zeroes: false,
            multi_conn: true,
            rotational: false,
        }
    }

    fn submit(&self, req: Request, done: Completion) {
        let offset = req.offset;
        let write = req.command == Command::Write;
        // FUA: the operation, then a flush, then the answer. The server lets the flag through
        // on writes and trims only (WRITE_ZEROES is not advertised).
        let mut fua = req.fua && matches!(req.command, Command::Write | Command::Trim);
        let op = match req.command {
            Command::Read => Op::Read {
                offset,
                len: req.length as usize,
            },
            Command::Write => Op::Write {
                offset,
                data: req.data,
            },
            Command::Flush => Op::Flush,
            Command::Trim => match trim_range(&self.dev.info(), offset, u64::from(req.length)) {
                Some((offset, len)) => Op::Discard { offset, len },
                // Nothing the backend can discard: TRIM is advisory, it succeeds (and a FUA
                // still flushes, so that what came before it is durable when it is answered).
                None if fua => {
                    fua = false;
                    Op::Flush
                }
                None => return done.ok(),
            },
            _ => return done.fail(Errno::EINVAL),
        };
        let dev = self.dev.clone();
        self.dev.submit(
            op,
            Box::new(move |r| match r {
                Ok(_) if fua => dev.submit(
                    Op::Flush,
                    Box::new(move |r| done.complete(r.map(|_| Vec::new()).map_err(|e| e.to_io()))),
                ),
                Ok(data) => done.complete(Ok(data)),
                Err(e) => {
                    tracing::debug!("NBD request failed: {e}");
                    done.complete(Err(match e {
                        // Past the end of a disk that shrank under the connection.
                        Error::OutOfRange { .. } if write => {
                            std::io::Error::from_raw_os_error(libc::ENOSPC)
                        }
                        e => e.to_io(),
                    }))
                }
            }),
        );
    }
}

/// The part of an NBD trim of `len` bytes at `offset` that the backend can discard: the
/// discard units (`discard-granularity`, at least the logical sector size) wholly inside the
/// range, the first starting `discard-alignment` bytes past a multiple of the unit, as in
/// Linux's block layer. `None` if no whole unit fits. NBD's TRIM is advisory (the contents
/// of a trimmed range are unspecified afterwards), so a range that is not aligned is trimmed
/// where it can be and succeeds, rather than failing as an unaligned discard would. The
/// granularity and alignment come from the backend: any values give a sector-aligned range
/// inside the request (a granularity that is not a multiple of the sector size falls back to
/// the sector size, an alignment that is not one is ignored).
pub fn trim_range(info: &DiskInfo, offset: u64, len: u64) -> Option<(u64, u64)> {
    let sector = u128::from(info.sector_size.max(512));
    let granularity = u128::from(info.discard_granularity);
    let unit = if granularity >= sector && granularity % sector == 0 {
        granularity
    } else {
        sector
    };
    // An alignment that is not a multiple of the sector size is ignored.
    let align = match u128::from(info.discard_alignment) % unit {
        a if a % sector == 0 => a,
        _ => 0,
    };
    // In u128, where nothing below overflows: every value is under 2^65.
    let (start, end) = (u128::from(offset), u128::from(offset) + u128::from(len));
    let first = start + (align + unit - start % unit) % unit;
    let last = end.checked_sub((end % unit + unit - align) % unit)?;
    if last <= first {
        return None;
    }
    Some((
        u64::try_from(first).ok()?,
        u64::try_from(last - first).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::trim_range;
    use crate::DiskInfo;

    fn disk(sector_size: u32, granularity: u64, alignment: u64) -> DiskInfo {
        DiskInfo {
            sectors: 1 << 20,
            sector_size,
            discard: true,
            discard_granularity: granularity,
            discard_alignment: alignment,
            ..DiskInfo::default()
        }
    }

    #[test]
    fn a_trim_keeps_the_whole_discard_units_inside_its_range() {
        let d = disk(512, 4096, 0);
        assert_eq!(trim_range(&d, 0, 1 << 20), Some((0, 1 << 20)));
        assert_eq!(trim_range(&d, 4096 + 512, 3 * 4096), Some((8192, 8192)));
        assert_eq!(trim_range(&d, 4095, 4098), Some((4096, 4096)));
        // No whole unit inside: nothing to discard.
        assert_eq!(trim_range(&d, 512, 4096), None);
        assert_eq!(trim_range(&d, 100, 50), None);
        assert_eq!(trim_range(&d, 8192, 0), None);
        // A unit that is not a multiple of the sector size (or none): the sector size.
        assert_eq!(trim_range(&disk(512, 0, 0), 100, 1000), Some((512, 512)));
        assert_eq!(trim_range(&disk(4096, 512, 0), 0, 6000), Some((0, 4096)));
        assert_eq!(trim_range(&disk(512, 3000, 0), 0, 3000), Some((0, 2560)));
        // Units starting `discard-alignment` bytes past their multiples.
        let d = disk(512, 4096, 1024);
        assert_eq!(trim_range(&d, 0, 16384), Some((1024, 12288)));
        assert_eq!(trim_range(&d, 1024, 4096), Some((1024, 4096)));
        assert_eq!(
            trim_range(&disk(512, 4096, 4096 + 512), 0, 8192),
            Some((512, 4096))
        );
        assert_eq!(trim_range(&disk(512, 4096, 100), 0, 8192), Some((0, 8192)));
    }

    #[test]
    fn hostile_discard_properties_never_take_a_trim_out_of_its_range() {
        for (g, a) in [
            (u64::MAX, u64::MAX),
            (u64::MAX - 511, 7),
            (1 << 63, 1 << 62),
            (4096, u64::MAX),
        ] {
            let d = disk(512, g, a);
            for (offset, len) in [(0, u64::MAX), (u64::MAX - 4095, 4095), (1 << 40, 1 << 20)] {
                if let Some((o, l)) = trim_range(&d, offset, len) {
                    assert!(o >= offset && l > 0, "{g} {a}: {o}+{l}");
                    assert!(u128::from(o) + u128::from(l) <= u128::from(offset) + u128::from(len));
                    assert_eq!((o % 512, l % 512), (0, 0), "{g} {a}: {o}+{l}");
                }
            }
        }
    }
}
