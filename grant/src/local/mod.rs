//! The local platform's grants (`docs/local-platform.md`, "Grants").
//!
//! Each domain has one memfd: its v1 grant table ([`GrantEntryV1`](crate::GrantEntryV1)
//! entries) followed by its shareable 4 KiB frames (frame `n` at `table_bytes + n * 4096`).
//! The [`Broker`] (run by `xenpv local`, or in-process in tests) creates and destroys the
//! memfds, hands out free refs and frames, passes memfds over `grant.sock` with SCM_RIGHTS, and
//! plays the hypervisor's part of a map: it validates an entry as Xen does, sets `GTF_reading` /
//! `GTF_writing` atomically and counts the pins per `(granting domain, gref)` across **every**
//! connection, so that the bits stay set while any process of any domain maps the grant and are
//! cleared when the last one unmaps, or dies (the broker unpins everything a connection held
//! when it closes, as gntdev unmaps when its process dies). [`LocalGrants`] is the client: a
//! frontend shares pages by writing its own grant entries as a guest does; a backend asks the
//! broker to pin (one round trip per `map` call) and then `mmap`s just those frames.
//!
//! Wire format of `grant.sock` (native endian, one request then one response at a time): a
//! 16-byte header `[i32 op_or_status, u32 a, u32 b, u32 n]` followed by `n` `u32`s (at most
//! `4 * MAX_COPY_OPS + 16`); a response may carry one memfd (SCM_RIGHTS) attached to its first
//! byte. Status is 0 or a `GNTST_*` value.
//!
//! | op | request | response |
//! |---|---|---|
//! | 1 `HELLO` | – | `a` = own domid, `b` = entries, payload `[frames, generation]`, fd = own memfd |
//! | 2 `OPEN` | `a` = domid | `a` = entries, `b` = frames, payload `[generation]`, fd = its memfd |
//! | 3 `ALLOC` | `a` = count | payload `[ref, frame] * count` |
//! | 4 `FREE` | payload `[ref, frame] * n` | `a` = freed now, `b` = deferred (still in use) |
//! | 5 `CHECK` | `a` = domid | `a` = generation (a new one if the domain was re-created) |
//! | 6 `PIN` | `a` = mode, payload `[target, ref] * n` | see below |
//! | 7 `UNPIN` | payload `[target, ref, generation] * n` | `a` = unpinned, `b` = not held (ignored) |
//!
//! `target` is the granting domid in bits 0..16 and `1 << 16` for a writable pin (bits 17..32
//! zero). `PIN` validates and pins for the connection's own domain, in order:
//! * mode 0 (**map**, `n <= MAX_PAGES_PER_CALL`): all or nothing. Success: status 0, payload
//!   `[offset_lo, offset_hi, generation] * n` (the frame's byte offset in that domain's memfd,
//!   and the generation of the memfd it is in, as `OPEN` reports it). Failure: status = the first
//!   failing entry's `GNTST_*`, `a` = its index, `b` = a reason code (`table::Why`); nothing of
//!   the request stays pinned.
//! * mode 1 (**copy**, `n <= MAX_COPY_OPS`): per entry. Status 0, payload
//!   `[status, offset_lo, offset_hi, generation] * n`; only the entries with status 0 are pinned.
//!
//! A request the broker cannot parse (bad mode, zero or too many entries, odd payload) is
//! answered `general_error` with `b` = 7. A connection may hold at most `MAX_PINS_PER_CONN` pins
//! (`no_space`, `b` = 8, beyond). `UNPIN` drops one pin per entry, only among those the
//! connection holds (matching target, ref, writability and generation); the broker clears
//! `GTF_writing` when the grant's last writable pin goes and `GTF_reading` when its last pin
//! goes, then retries deferred revokes at once.

mod broker;
mod client;

pub use broker::{Broker, BrokerConfig};
pub use client::{LocalGrants, LocalMapping, LocalShared};

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use crate::sys::{self, Region};
use crate::table::Table;
use crate::{DomId, Error, GrantStatus, Result, PAGE_SIZE};

pub(crate) const OP_HELLO: i32 = 1;
pub(crate) const OP_OPEN: i32 = 2;
pub(crate) const OP_ALLOC: i32 = 3;
pub(crate) const OP_FREE: i32 = 4;
pub(crate) const OP_CHECK: i32 = 5;
pub(crate) const OP_PIN: i32 = 6;
pub(crate) const OP_UNPIN: i32 = 7;

/// `PIN` mode: all or nothing, for a mapping.
pub(crate) const PIN_MAP: u32 = 0;
/// `PIN` mode: a status per entry, for a grant copy batch.
pub(crate) const PIN_COPY: u32 = 1;
/// The writable bit of a `PIN`/`UNPIN` target word.
pub(crate) const PIN_WRITABLE: u32 = 1 << 16;

/// Most pins one connection may hold at once (Xen bounds a domain's maptrack the same way).
pub(crate) const MAX_PINS_PER_CONN: u32 = 1 << 18;

/// Largest payload (in u32s) either side accepts: a copy-mode `PIN` reply.
pub(crate) const MAX_PAYLOAD: u32 = 4 * crate::MAX_COPY_OPS as u32 + 16;

/// A file of `len` bytes in 2 MiB pages, all allocated now, in a private `huge=always` tmpfs
/// mounted nowhere: the memory of a [`BrokerConfig::huge_pages`] guest. For a baseline whose
/// I/O buffers should be the same kind of memory as the guest's (`xenpv bench` hands it to fio
/// as `--mem=mmapshared:/proc/PID/fd/N`): a 1 MiB transfer over 2 MiB pages reaches a disk as
/// a few segments, over scattered 4 KiB pages as up to 256. Needs `CAP_SYS_ADMIN`.
pub fn huge_page_file(len: u64) -> Result<OwnedFd> {
    let dir = sys::huge_tmpfs()?;
    // The open file keeps its tmpfs alive once `dir` is closed.
    sys::tmpfile(dir.as_fd(), len)
}

/// The target word of a `PIN`/`UNPIN` entry.
pub(crate) fn pin_target(domid: DomId, writable: bool) -> u32 {
    u32::from(domid) | if writable { PIN_WRITABLE } else { 0 }
}

/// `(domid, writable)` of a target word, or `None` if reserved bits are set.
pub(crate) fn parse_target(w: u32) -> Option<(DomId, bool)> {
    (w >> 17 == 0).then_some((w as u16, w & PIN_WRITABLE != 0))
}

/// One message of the wire format.
#[derive(Debug, Default)]
pub(crate) struct Msg {
    pub(crate) code: i32,
    pub(crate) a: u32,
    pub(crate) b: u32,
    pub(crate) payload: Vec<u32>,
}

impl Msg {
    pub(crate) fn new(code: i32, a: u32, b: u32) -> Self {
        Self {
            code,
            a,
            b,
            payload: Vec::new(),
        }
    }

    pub(crate) fn send(
        &self,
        sock: &impl AsFd,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<()> {
        let n =
            u32::try_from(self.payload.len()).map_err(|_| Error::Protocol("payload too big"))?;
        let mut buf = Vec::with_capacity(16 + 4 * self.payload.len());
        buf.extend_from_slice(&self.code.to_ne_bytes());
        buf.extend_from_slice(&self.a.to_ne_bytes());
        buf.extend_from_slice(&self.b.to_ne_bytes());
        buf.extend_from_slice(&n.to_ne_bytes());
        for w in &self.payload {
            buf.extend_from_slice(&w.to_ne_bytes());
        }
        sys::send_with_fd(sock.as_fd(), &buf, fd)
    }

    /// `Ok(None)` on a clean end of stream.
    pub(crate) fn recv(sock: &impl AsFd) -> Result<Option<(Msg, Option<OwnedFd>)>> {
        let mut fd = None;
        let mut h = [0u8; 16];
        if !sys::recv_with_fd(sock.as_fd(), &mut h, &mut fd)? {
            return Ok(None);
        }
        let w = |i: usize| u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let n = w(12);
        if n > MAX_PAYLOAD {
            return Err(Error::Protocol("message payload above the limit"));
        }
        let mut p = vec![0u8; n as usize * 4];
        if n > 0 && !sys::recv_with_fd(sock.as_fd(), &mut p, &mut fd)? {
            return Err(Error::Protocol(
                "connection closed in the middle of a message",
            ));
        }
        let payload = p
            .chunks_exact(4)
            .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Some((
            Msg {
                code: w(0) as i32,
                a: w(4),
                b: w(8),
                payload,
            },
            fd,
        )))
    }

    pub(crate) fn status(&self) -> GrantStatus {
        GrantStatus::from_raw(i16::try_from(self.code).unwrap_or(-1))
    }
}

/// One domain's grant memfd, with its table mapped.
#[derive(Debug)]
pub(crate) struct DomainMem {
    pub(crate) fd: OwnedFd,
    _table_map: Region,
    pub(crate) table: Table,
    pub(crate) frames: u32,
    pub(crate) generation: u32,
}

impl DomainMem {
    pub(crate) fn table_bytes(entries: u32) -> u64 {
        // Rounded up to whole pages so that frames are page-aligned in the file.
        (u64::from(entries) * 8).div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64
    }

    /// Wraps `fd`, checking that it is as big as `entries` and `frames` say.
    pub(crate) fn open(fd: OwnedFd, entries: u32, frames: u32, generation: u32) -> Result<Self> {
        if entries == 0 || entries > 1 << 20 || frames > 1 << 24 {
            return Err(Error::Protocol("grant table geometry out of range"));
        }
        let tb = Self::table_bytes(entries);
        // SAFETY: fstat on a descriptor we own into a zeroed stat buffer.
        let size = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd.as_raw_fd(), &mut st) < 0 {
                return Err(Error::os("fstat of a grant memfd"));
            }
            st.st_size as u64
        };
        if size < tb + u64::from(frames) * PAGE_SIZE as u64 {
            return Err(Error::Protocol("grant memfd smaller than its geometry"));
        }
        let map = Region::map_fd(fd.as_raw_fd(), 0, tb as usize, true)?;
        // SAFETY: the mapping is page-aligned and `entries * 8 <= tb` bytes long, and lives in
        // `_table_map` as long as `table` (both in this struct); reached only through atomics.
        let table = unsafe { Table::new(map.ptr().as_ptr(), entries) };
        Ok(Self {
            fd,
            _table_map: map,
            table,
            frames,
            generation,
        })
    }

    /// Whether `off` is the file offset of one of this domain's frames (a `PIN` reply check).
    pub(crate) fn is_frame_offset(&self, off: u64) -> bool {
        let tb = Self::table_bytes(self.table.entries());
        off >= tb
            && (off - tb) % PAGE_SIZE as u64 == 0
            && (off - tb) / (PAGE_SIZE as u64) < u64::from(self.frames)
    }

    /// File offset of `frame`, or `None` if the frame is not one of this domain's.
    pub(crate) fn frame_offset(&self, frame: u32) -> Option<u64> {
        (frame < self.frames)
            .then(|| Self::table_bytes(self.table.entries()) + u64::from(frame) * PAGE_SIZE as u64)
    }
}
