//! The v1 grant table entry (`grant_entry_v1`) and its flags, and the atomic operations a
//! granting guest and a mapping hypervisor perform on it.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::DomId;

/// `grant_entry_v1`: 8 bytes, 512 per page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct GrantEntryV1 {
    /// `GTF_*` flags.
    pub flags: u16,
    /// The domain allowed to use the grant.
    pub domid: u16,
    /// The granted frame.
    pub frame: u32,
}

const _: () = {
    assert!(size_of::<GrantEntryV1>() == 8);
    assert!(core::mem::offset_of!(GrantEntryV1, flags) == 0);
    assert!(core::mem::offset_of!(GrantEntryV1, domid) == 2);
    assert!(core::mem::offset_of!(GrantEntryV1, frame) == 4);
};

/// Refs 0..8 are reserved (0: console, 1: xenstore); allocators start here.
pub const FIRST_UNRESERVED_REF: u32 = 8;

/// `GTF_*` grant entry flags.
pub mod flags {
    /// Type: not granted.
    pub const GTF_INVALID: u16 = 0;
    /// Type: the domain may map or copy the frame.
    pub const GTF_PERMIT_ACCESS: u16 = 1;
    /// Type: the domain may transfer a frame to us.
    pub const GTF_ACCEPT_TRANSFER: u16 = 2;
    /// Type: transitive grant.
    pub const GTF_TRANSITIVE: u16 = 3;
    /// Mask of the type bits.
    pub const GTF_TYPE_MASK: u16 = 3;
    /// Read-only grant.
    pub const GTF_READONLY: u16 = 1 << 2;
    /// Set by the hypervisor while the grant is mapped or copied for reading.
    pub const GTF_READING: u16 = 1 << 3;
    /// Set by the hypervisor while the grant is mapped or copied for writing.
    pub const GTF_WRITING: u16 = 1 << 4;
    /// v2 sub-page grant.
    pub const GTF_SUB_PAGE: u16 = 1 << 8;
}
use flags::*;

/// Why pinning an entry (or a whole `PIN` request) failed. The number is the reason code of a
/// failed `PIN` reply on `grant.sock` (`grant::local`); the text goes into [`Error::Map`].
///
/// [`Error::Map`]: crate::Error::Map
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Why {
    /// `GNTST_general_error`: not `GTF_permit_access` (free, revoked, transfer, transitive,
    /// sub-page).
    NotGranted = 1,
    /// `GNTST_general_error`: granted to another domain.
    WrongDomid = 2,
    /// `GNTST_general_error`: a writable pin of a read-only grant.
    ReadOnly = 3,
    /// `GNTST_bad_gntref`.
    RefOutOfRange = 4,
    /// `GNTST_bad_page`.
    FrameOutOfRange = 5,
    /// `GNTST_bad_domain`.
    NoDomain = 6,
    /// A request the broker does not understand (bad mode, count or payload).
    Malformed = 7,
    /// `GNTST_no_space`: the connection holds too many pins.
    TooManyPins = 8,
}

impl Why {
    pub(crate) fn code(self) -> u32 {
        self as u32
    }

    /// The text of reason code `code` (anything unknown is a protocol problem).
    pub(crate) fn text(code: u32) -> &'static str {
        match code {
            1 => "the entry does not permit access (not granted, or revoked)",
            2 => "the entry is granted to another domain",
            3 => "writable access to a read-only grant",
            4 => "grant ref outside the granting domain's table",
            5 => "the entry names a frame outside the granting domain's memory",
            6 => "no such domain (destroyed, or never created)",
            7 => "the grant broker did not understand the request",
            8 => "too many grants pinned by this connection",
            _ => "the grant broker gave no reason",
        }
    }
}

/// A v1 grant table in memory shared with the granting domain: `entries` entries at `base`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Table {
    base: *mut u8,
    entries: u32,
}

// SAFETY: the table is only reached through atomics.
unsafe impl Send for Table {}
// SAFETY: as above.
unsafe impl Sync for Table {}

impl Table {
    /// # Safety
    /// `base` must be 8-aligned and valid for reads and writes of `entries * 8` bytes for as
    /// long as the value (and its copies) is used, and only reached through atomics.
    pub(crate) unsafe fn new(base: *mut u8, entries: u32) -> Self {
        Self { base, entries }
    }

    pub(crate) fn entries(&self) -> u32 {
        self.entries
    }

    /// The flags+domid word and the frame word of `gref`, or `None` when out of range.
    fn words(&self, gref: u32) -> Option<(&AtomicU32, &AtomicU32)> {
        if gref >= self.entries {
            return None;
        }
        let off = gref as usize * 8;
        // SAFETY: gref < entries, so both words are inside the table; 8-aligned base; the
        // memory is only used through atomics (shared with other processes, which is fine for
        // atomics).
        unsafe {
            Some((
                &*self.base.add(off).cast::<AtomicU32>(),
                &*self.base.add(off + 4).cast::<AtomicU32>(),
            ))
        }
    }

    /// Granter: fills a free entry (`domid`, `frame`, release fence, then `flags`).
    pub(crate) fn grant(&self, gref: u32, domid: DomId, frame: u32, readonly: bool) -> bool {
        let Some((head, fr)) = self.words(gref) else {
            return false;
        };
        fr.store(frame, Ordering::Relaxed);
        head.store(u32::from(domid) << 16, Ordering::Relaxed);
        let fl = GTF_PERMIT_ACCESS | if readonly { GTF_READONLY } else { 0 };
        head.store((u32::from(domid) << 16) | u32::from(fl), Ordering::Release);
        true
    }

    /// Granter: writes an entry raw (fault injection).
    pub(crate) fn write_raw(&self, gref: u32, e: GrantEntryV1) -> bool {
        let Some((head, fr)) = self.words(gref) else {
            return false;
        };
        fr.store(e.frame, Ordering::Relaxed);
        head.store(
            (u32::from(e.domid) << 16) | u32::from(e.flags),
            Ordering::Release,
        );
        true
    }

    /// Granter: ends access atomically unless the grant is in use (`GTF_reading`/`GTF_writing`).
    /// Returns whether the entry is now free.
    pub(crate) fn try_revoke(&self, gref: u32) -> bool {
        let Some((head, _)) = self.words(gref) else {
            return false;
        };
        let mut cur = head.load(Ordering::Acquire);
        loop {
            if cur as u16 & (GTF_READING | GTF_WRITING) != 0 {
                return false;
            }
            match head.compare_exchange(cur, cur & 0xffff_0000, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// The current flags of `gref`.
    pub(crate) fn flags(&self, gref: u32) -> Option<u16> {
        self.words(gref)
            .map(|(h, _)| h.load(Ordering::Acquire) as u16)
    }

    /// Mapper: validates the entry for `ldomid` and sets `GTF_reading` (and `GTF_writing` for a
    /// writable pin) atomically together with the domid check, as Xen's `_set_status_v1` does;
    /// then reads the frame. `Err` is the reason (`GNTST_general_error`, or `GNTST_bad_gntref`
    /// for a ref outside the table).
    pub(crate) fn pin(&self, gref: u32, ldomid: DomId, writable: bool) -> Result<u32, Why> {
        let Some((head, fr)) = self.words(gref) else {
            return Err(Why::RefOutOfRange);
        };
        let mut cur = head.load(Ordering::Acquire);
        loop {
            let fl = cur as u16;
            let dom = (cur >> 16) as u16;
            if fl & (GTF_TYPE_MASK | GTF_SUB_PAGE) != GTF_PERMIT_ACCESS {
                return Err(Why::NotGranted);
            }
            if dom != ldomid {
                return Err(Why::WrongDomid);
            }
            if writable && fl & GTF_READONLY != 0 {
                return Err(Why::ReadOnly);
            }
            let set = GTF_READING | if writable { GTF_WRITING } else { 0 };
            match head.compare_exchange(
                cur,
                cur | u32::from(set),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(fr.load(Ordering::Acquire)),
                Err(now) => cur = now,
            }
        }
    }

    /// Mapper: clears status bits when the last reader / writer lets go.
    pub(crate) fn clear(&self, gref: u32, bits: u16) {
        if let Some((head, _)) = self.words(gref) {
            head.fetch_and(!u32::from(bits), Ordering::AcqRel);
        }
    }
}
