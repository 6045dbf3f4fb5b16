//! The local platform's grants (`docs/local-platform.md`, "Grants").
//!
//! Each domain has one memfd: its v1 grant table ([`GrantEntryV1`](crate::GrantEntryV1)
//! entries) followed by its shareable 4 KiB frames (frame `n` at `table_bytes + n * 4096`).
//! The [`Broker`] (run by `xenpv local`, or in-process in tests) creates and destroys the
//! memfds, hands out free refs and frames, and passes memfds over `grant.sock` with SCM_RIGHTS.
//! [`LocalGrants`] is the client: a frontend shares pages by writing its own grant entries as a
//! guest does; a backend maps a grant by validating the entry and setting `GTF_reading` /
//! `GTF_writing` atomically, as Xen does, then `mmap`ing just that frame.
//!
//! Wire format of `grant.sock` (native endian, one request then one response at a time): a
//! 16-byte header `[i32 op_or_status, u32 a, u32 b, u32 n]` followed by `n` `u32`s; a response
//! may carry one memfd (SCM_RIGHTS) attached to its first byte. Status is 0 or a `GNTST_*` value.
//!
//! | op | request | response |
//! |---|---|---|
//! | 1 `HELLO` | – | `a` = own domid, `b` = entries, payload `[frames, generation]`, fd = own memfd |
//! | 2 `OPEN` | `a` = domid | `a` = entries, `b` = frames, payload `[generation]`, fd = its memfd |
//! | 3 `ALLOC` | `a` = count | payload `[ref, frame] * count` |
//! | 4 `FREE` | payload `[ref, frame] * n` | `a` = freed now, `b` = deferred (still in use) |
//! | 5 `CHECK` | `a` = domid | `a` = generation (a new one if the domain was re-created) |

mod broker;
mod client;

pub use broker::{Broker, BrokerConfig};
pub use client::{LocalGrants, LocalMapping, LocalShared};

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use crate::sys::{self, Region};
use crate::table::Table;
use crate::{Error, GrantStatus, Result, PAGE_SIZE};

pub(crate) const OP_HELLO: i32 = 1;
pub(crate) const OP_OPEN: i32 = 2;
pub(crate) const OP_ALLOC: i32 = 3;
pub(crate) const OP_FREE: i32 = 4;
pub(crate) const OP_CHECK: i32 = 5;

/// Largest payload (in u32s) either side accepts.
pub(crate) const MAX_PAYLOAD: u32 = 2 * crate::MAX_PAGES_PER_CALL as u32 + 16;

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

    /// File offset of `frame`, or `None` if the frame is not one of this domain's.
    pub(crate) fn frame_offset(&self, frame: u32) -> Option<u64> {
        (frame < self.frames)
            .then(|| Self::table_bytes(self.table.entries()) + u64::from(frame) * PAGE_SIZE as u64)
    }
}
