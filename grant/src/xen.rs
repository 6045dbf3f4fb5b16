//! The Xen provider: `/dev/xen/gntalloc` (front: [`XenGntalloc`]) and `/dev/xen/gntdev` (back:
//! [`XenGntdev`]), Linux's userspace grant devices.
//!
//! The ioctl structures are transcribed from Linux's `include/uapi/xen/gntdev.h` and
//! `gntalloc.h` (dual-licensed GPL-2.0 WITH Linux-syscall-note OR MIT); their layouts are
//! asserted at compile time here and compared with the C headers by `tests/abi.rs`.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use crate::{
    check_copy_range, Access, CopyKind, CopyOp, DomId, Error, GrantMap, GrantMemory, GrantRef,
    GrantShare, GrantStatus, Result, Revoke, SharedPages, VolatileSlice, MAX_COPY_OPS,
    MAX_PAGES_PER_CALL, PAGE_SIZE,
};

/// The gntdev device.
pub const GNTDEV_PATH: &str = "/dev/xen/gntdev";
/// The gntalloc device.
pub const GNTALLOC_PATH: &str = "/dev/xen/gntalloc";

/// The raw ioctl interface (structs and numbers), public for the ABI probe.
pub mod abi {
    /// `_IOC(_IOC_NONE, 'G', nr, size)`.
    pub const fn ioc_none(nr: u32, size: usize) -> u32 {
        ((size as u32) << 16) | ((b'G' as u32) << 8) | nr
    }

    /// `struct ioctl_gntdev_grant_ref`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct GntdevGrantRef {
        /// `domid`.
        pub domid: u32,
        /// `ref`.
        pub gref: u32,
    }
    /// `struct ioctl_gntdev_map_grant_ref` with its one-element `refs` array.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct GntdevMapGrantRef {
        /// `count`.
        pub count: u32,
        /// `pad`.
        pub pad: u32,
        /// `index` (out).
        pub index: u64,
        /// `refs[1]`.
        pub refs: [GntdevGrantRef; 1],
    }
    /// `struct ioctl_gntdev_unmap_grant_ref`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct GntdevUnmapGrantRef {
        /// `index`.
        pub index: u64,
        /// `count`.
        pub count: u32,
        /// `pad`.
        pub pad: u32,
    }
    /// `struct ioctl_gntdev_set_max_grants`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct GntdevSetMaxGrants {
        /// `count`.
        pub count: u32,
    }
    /// `struct ioctl_gntdev_unmap_notify` (and the identical `ioctl_gntalloc_unmap_notify`).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct UnmapNotify {
        /// `index`: file offset of the byte to clear.
        pub index: u64,
        /// `action`: `UNMAP_NOTIFY_*`.
        pub action: u32,
        /// `event_channel_port`.
        pub event_channel_port: u32,
    }
    /// The `foreign` member of the copy segment union.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct GntdevCopyForeign {
        /// `ref`.
        pub gref: u32,
        /// `offset`.
        pub offset: u16,
        /// `domid`.
        pub domid: u16,
    }
    /// The `source` / `dest` union of a copy segment.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub union GntdevCopyPtr {
        /// `virt`: a local buffer.
        pub virt: *mut core::ffi::c_void,
        /// `foreign`: a granted page.
        pub foreign: GntdevCopyForeign,
    }
    /// `struct gntdev_grant_copy_segment`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct GntdevGrantCopySegment {
        /// `source`.
        pub source: GntdevCopyPtr,
        /// `dest`.
        pub dest: GntdevCopyPtr,
        /// `len`.
        pub len: u16,
        /// `flags`: `GNTCOPY_*`.
        pub flags: u16,
        /// `status` (out): `GNTST_*`.
        pub status: i16,
    }
    /// `struct ioctl_gntdev_grant_copy`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct GntdevGrantCopy {
        /// `count`.
        pub count: core::ffi::c_uint,
        /// `segments`.
        pub segments: *mut GntdevGrantCopySegment,
    }
    /// `struct ioctl_gntalloc_alloc_gref` with its one-element `gref_ids` array.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct GntallocAllocGref {
        /// `domid`.
        pub domid: u16,
        /// `flags`: `GNTALLOC_FLAG_WRITABLE`.
        pub flags: u16,
        /// `count`.
        pub count: u32,
        /// `index` (out).
        pub index: u64,
        /// `gref_ids[1]` (out).
        pub gref_ids: [u32; 1],
    }
    /// `struct ioctl_gntalloc_dealloc_gref`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct GntallocDeallocGref {
        /// `index`.
        pub index: u64,
        /// `count`.
        pub count: u32,
    }

    /// `IOCTL_GNTDEV_MAP_GRANT_REF`.
    pub const IOCTL_GNTDEV_MAP_GRANT_REF: u32 = ioc_none(0, size_of::<GntdevMapGrantRef>());
    /// `IOCTL_GNTDEV_UNMAP_GRANT_REF`.
    pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: u32 = ioc_none(1, size_of::<GntdevUnmapGrantRef>());
    /// `IOCTL_GNTDEV_SET_MAX_GRANTS`.
    pub const IOCTL_GNTDEV_SET_MAX_GRANTS: u32 = ioc_none(3, size_of::<GntdevSetMaxGrants>());
    /// `IOCTL_GNTDEV_SET_UNMAP_NOTIFY`.
    pub const IOCTL_GNTDEV_SET_UNMAP_NOTIFY: u32 = ioc_none(7, size_of::<UnmapNotify>());
    /// `IOCTL_GNTDEV_GRANT_COPY`.
    pub const IOCTL_GNTDEV_GRANT_COPY: u32 = ioc_none(8, size_of::<GntdevGrantCopy>());
    /// `IOCTL_GNTALLOC_ALLOC_GREF`.
    pub const IOCTL_GNTALLOC_ALLOC_GREF: u32 = ioc_none(5, size_of::<GntallocAllocGref>());
    /// `IOCTL_GNTALLOC_DEALLOC_GREF`.
    pub const IOCTL_GNTALLOC_DEALLOC_GREF: u32 = ioc_none(6, size_of::<GntallocDeallocGref>());
    /// `IOCTL_GNTALLOC_SET_UNMAP_NOTIFY`.
    pub const IOCTL_GNTALLOC_SET_UNMAP_NOTIFY: u32 = ioc_none(7, size_of::<UnmapNotify>());

    /// `UNMAP_NOTIFY_CLEAR_BYTE`.
    pub const UNMAP_NOTIFY_CLEAR_BYTE: u32 = 1;
    /// `UNMAP_NOTIFY_SEND_EVENT`.
    pub const UNMAP_NOTIFY_SEND_EVENT: u32 = 2;
    /// `GNTALLOC_FLAG_WRITABLE`.
    pub const GNTALLOC_FLAG_WRITABLE: u16 = 1;
    /// `GNTCOPY_source_gref`.
    pub const GNTCOPY_SOURCE_GREF: u16 = 1;
    /// `GNTCOPY_dest_gref`.
    pub const GNTCOPY_DEST_GREF: u16 = 2;

    #[cfg(target_pointer_width = "64")]
    const _: () = {
        use core::mem::offset_of;
        assert!(size_of::<GntdevGrantRef>() == 8);
        assert!(size_of::<GntdevMapGrantRef>() == 24);
        assert!(offset_of!(GntdevMapGrantRef, index) == 8);
        assert!(offset_of!(GntdevMapGrantRef, refs) == 16);
        assert!(size_of::<GntdevUnmapGrantRef>() == 16);
        assert!(size_of::<UnmapNotify>() == 16);
        assert!(offset_of!(UnmapNotify, action) == 8);
        assert!(size_of::<GntdevGrantCopySegment>() == 24);
        assert!(offset_of!(GntdevGrantCopySegment, dest) == 8);
        assert!(offset_of!(GntdevGrantCopySegment, len) == 16);
        assert!(offset_of!(GntdevGrantCopySegment, flags) == 18);
        assert!(offset_of!(GntdevGrantCopySegment, status) == 20);
        assert!(size_of::<GntdevGrantCopy>() == 16);
        assert!(size_of::<GntallocAllocGref>() == 24);
        assert!(offset_of!(GntallocAllocGref, index) == 8);
        assert!(offset_of!(GntallocAllocGref, gref_ids) == 16);
        assert!(size_of::<GntallocDeallocGref>() == 16);
        assert!(IOCTL_GNTDEV_MAP_GRANT_REF == 0x0018_4700);
        assert!(IOCTL_GNTDEV_GRANT_COPY == 0x0010_4708);
        assert!(IOCTL_GNTALLOC_ALLOC_GREF == 0x0018_4705);
    };
}
use abi::*;

fn open_dev(path: &'static str) -> Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| Error::Protocol("device path"))?;
    // SAFETY: plain system call with a valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => Error::NotXen { path },
            _ => Error::Os {
                what: "opening a Xen grant device (run as root, and load the xen-gntdev / \
                       xen-gntalloc modules)",
                source: e,
            },
        });
    }
    // SAFETY: fd is a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// # Safety
/// `arg` must point at the structure (and trailing array) that `req` expects.
unsafe fn ioctl<T>(fd: &OwnedFd, req: u32, arg: *mut T, what: &'static str) -> Result<()> {
    // SAFETY: per the caller's contract.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as libc::c_ulong, arg) };
    if r < 0 {
        return Err(Error::os(what));
    }
    Ok(())
}

/// A `u64`-aligned buffer holding a header struct followed by a `u32` array.
fn var_buf(header: usize, elems: usize, elem: usize) -> Vec<u64> {
    vec![0u64; (header + elems * elem).div_ceil(8)]
}

fn check_pages(n: usize) -> Result<()> {
    if n == 0 || n > MAX_PAGES_PER_CALL {
        return Err(Error::BadCount {
            what: "pages",
            count: n,
            max: MAX_PAGES_PER_CALL,
        });
    }
    Ok(())
}

fn notify(
    dev: &OwnedFd,
    req: u32,
    index: u64,
    len: usize,
    offset: usize,
    clear_byte: bool,
    port: Option<u32>,
) -> Result<()> {
    if offset >= len {
        return Err(Error::OutOfBounds {
            offset,
            len: 1,
            size: len,
        });
    }
    let mut n = UnmapNotify {
        index: index + offset as u64,
        action: if clear_byte {
            UNMAP_NOTIFY_CLEAR_BYTE
        } else {
            0
        } | if port.is_some() {
            UNMAP_NOTIFY_SEND_EVENT
        } else {
            0
        },
        event_channel_port: port.unwrap_or(0),
    };
    // SAFETY: `n` is the UnmapNotify both SET_UNMAP_NOTIFY ioctls take.
    unsafe { ioctl(dev, req, &mut n, "SET_UNMAP_NOTIFY") }
}

/// The back side on Xen: `/dev/xen/gntdev`.
#[derive(Debug, Clone)]
pub struct XenGntdev {
    dev: Arc<OwnedFd>,
}

impl XenGntdev {
    /// Opens `/dev/xen/gntdev`; off Xen the error says to use the local platform.
    pub fn open() -> Result<Self> {
        let dev = open_dev(GNTDEV_PATH)?;
        let mut max = GntdevSetMaxGrants {
            count: MAX_PAGES_PER_CALL as u32,
        };
        // Legacy: pvops kernels answer ENOTTY, which is fine (as in libxengnttab).
        // SAFETY: `max` is the struct SET_MAX_GRANTS takes.
        let _ = unsafe {
            ioctl(
                &dev,
                IOCTL_GNTDEV_SET_MAX_GRANTS,
                &mut max,
                "SET_MAX_GRANTS",
            )
        };
        Ok(Self { dev: Arc::new(dev) })
    }
}

/// A gntdev mapping; unmapped (munmap, then `UNMAP_GRANT_REF`) on drop.
#[derive(Debug)]
pub struct XenMapping {
    ptr: NonNull<u8>,
    len: usize,
    index: u64,
    access: Access,
    dev: Arc<OwnedFd>,
}

// SAFETY: the mapping is plain shared memory reached only through volatile accesses and atomics.
unsafe impl Send for XenMapping {}
// SAFETY: as above.
unsafe impl Sync for XenMapping {}

impl XenMapping {
    /// `SET_UNMAP_NOTIFY`: when this mapping goes (or the process dies), clear the byte at
    /// `offset` and/or notify event channel `port`.
    pub fn set_unmap_notify(
        &self,
        offset: usize,
        clear_byte: bool,
        port: Option<u32>,
    ) -> Result<()> {
        let r = IOCTL_GNTDEV_SET_UNMAP_NOTIFY;
        notify(&self.dev, r, self.index, self.len, offset, clear_byte, port)
    }
}

impl Drop for XenMapping {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by `map` and nothing refers to it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        let mut u = GntdevUnmapGrantRef {
            index: self.index,
            count: (self.len / PAGE_SIZE) as u32,
            pad: 0,
        };
        // SAFETY: `u` is the struct UNMAP_GRANT_REF takes.
        let _ = unsafe {
            ioctl(
                &self.dev,
                IOCTL_GNTDEV_UNMAP_GRANT_REF,
                &mut u,
                "UNMAP_GRANT_REF",
            )
        };
    }
}

// SAFETY: mapped for `len` bytes until drop, page-aligned, reached only through volatile
// accesses and atomics.
unsafe impl xenpv_ring::RingMemory for XenMapping {
    fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl GrantMemory for XenMapping {
    fn volatile(&self) -> VolatileSlice<'_> {
        // SAFETY: mapped (writable if Writable) while `self` lives; no references into it.
        unsafe { VolatileSlice::new(self.ptr, self.len, self.access.is_writable()) }
    }
    fn access(&self) -> Access {
        self.access
    }
}

impl GrantMap for XenGntdev {
    type Mapping = XenMapping;

    fn map(&self, refs: &[(DomId, GrantRef)], access: Access) -> Result<XenMapping> {
        check_pages(refs.len())?;
        let n = refs.len();
        let mut buf = var_buf(16, n, size_of::<GntdevGrantRef>());
        let hdr = buf.as_mut_ptr().cast::<GntdevMapGrantRef>();
        // SAFETY: `buf` is 8-aligned and holds the 16-byte header plus `n` refs.
        unsafe {
            (*hdr).count = n as u32;
            let arr = core::ptr::addr_of_mut!((*hdr).refs).cast::<GntdevGrantRef>();
            for (i, &(domid, gref)) in refs.iter().enumerate() {
                arr.add(i).write(GntdevGrantRef {
                    domid: u32::from(domid),
                    gref,
                });
            }
            ioctl(&self.dev, IOCTL_GNTDEV_MAP_GRANT_REF, hdr, "MAP_GRANT_REF")?;
        }
        // SAFETY: the ioctl filled in `index`.
        let index = unsafe { (*hdr).index };
        let len = n * PAGE_SIZE;
        let prot = if access.is_writable() {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a new shared mapping of the device at the offset it gave us.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                self.dev.as_raw_fd(),
                index as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED || p.is_null() {
            let mut u = GntdevUnmapGrantRef {
                index,
                count: n as u32,
                pad: 0,
            };
            // SAFETY: `u` is the struct UNMAP_GRANT_REF takes.
            let _ = unsafe { ioctl(&self.dev, IOCTL_GNTDEV_UNMAP_GRANT_REF, &mut u, "UNMAP") };
            let (domid, gref) = refs[0];
            return Err(Error::Map {
                index: 0,
                domid,
                gref,
                status: GrantStatus::GeneralError,
                reason: "gntdev refused the mapping (a bad ref, domid or read-only grant in the \
                         list; the kernel does not say which)",
            });
        }
        Ok(XenMapping {
            ptr: NonNull::new(p.cast()).ok_or(Error::Protocol("mmap returned NULL"))?,
            len,
            index,
            access,
            dev: self.dev.clone(),
        })
    }

    fn copy(&self, ops: &mut [CopyOp<'_>]) -> Result<()> {
        if ops.len() > MAX_COPY_OPS {
            return Err(Error::BadCount {
                what: "grant copy operations",
                count: ops.len(),
                max: MAX_COPY_OPS,
            });
        }
        let mut segs = Vec::with_capacity(ops.len());
        let mut which = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter_mut().enumerate() {
            let (r, len) = op.foreign();
            op.status = if len == 0 {
                GrantStatus::Okay
            } else {
                check_copy_range(r, len)
            };
            if len == 0 || !op.status.is_ok() {
                continue;
            }
            let foreign = GntdevCopyPtr {
                foreign: GntdevCopyForeign {
                    gref: r.gref,
                    offset: r.offset,
                    domid: r.domid,
                },
            };
            let (source, dest, flags) = match &mut op.kind {
                CopyKind::FromForeign { dst, .. } => (
                    foreign,
                    GntdevCopyPtr {
                        virt: dst.as_mut_ptr().cast(),
                    },
                    GNTCOPY_SOURCE_GREF,
                ),
                CopyKind::ToForeign { src, .. } => (
                    GntdevCopyPtr {
                        virt: src.as_ptr() as *mut core::ffi::c_void,
                    },
                    foreign,
                    GNTCOPY_DEST_GREF,
                ),
            };
            segs.push(GntdevGrantCopySegment {
                source,
                dest,
                len: len as u16, // len <= PAGE_SIZE, checked above
                flags,
                status: 0,
            });
            which.push(i);
        }
        if segs.is_empty() {
            return Ok(());
        }
        let mut c = GntdevGrantCopy {
            count: segs.len() as core::ffi::c_uint,
            segments: segs.as_mut_ptr(),
        };
        // SAFETY: `c` points at `segs`, whose local buffers borrow from `ops` (alive and not
        // otherwise used during the call).
        unsafe { ioctl(&self.dev, IOCTL_GNTDEV_GRANT_COPY, &mut c, "GRANT_COPY")? };
        for (s, &i) in segs.iter().zip(&which) {
            ops[i].status = GrantStatus::from_raw(s.status);
        }
        Ok(())
    }
}

/// The front side on Xen: `/dev/xen/gntalloc`.
#[derive(Debug, Clone)]
pub struct XenGntalloc {
    dev: Arc<OwnedFd>,
}

impl XenGntalloc {
    /// Opens `/dev/xen/gntalloc`; off Xen the error says to use the local platform.
    pub fn open() -> Result<Self> {
        Ok(Self {
            dev: Arc::new(open_dev(GNTALLOC_PATH)?),
        })
    }

    /// gntalloc's `limit`: how many grants all of its users together may hold at once (1024
    /// by default; [`Error::GntallocLimit`] past it). `None` if the kernel does not say.
    pub fn limit() -> Option<u64> {
        parse_limit(&std::fs::read_to_string(GNTALLOC_LIMIT_PATH).ok()?)
    }
}

/// Where Linux shows gntalloc's `limit` module parameter.
pub const GNTALLOC_LIMIT_PATH: &str = "/sys/module/xen_gntalloc/parameters/limit";

/// The value of a module parameter file: a number and a newline.
fn parse_limit(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// Pages shared through gntalloc; dropping them revokes (the kernel defers the release of a
/// grant the peer still maps, XSA-396).
#[derive(Debug)]
pub struct XenShared {
    ptr: NonNull<u8>,
    len: usize,
    index: u64,
    grefs: Vec<GrantRef>,
    domid: DomId,
    dev: Arc<OwnedFd>,
}

// SAFETY: plain shared memory reached only through volatile accesses and atomics.
unsafe impl Send for XenShared {}
// SAFETY: as above.
unsafe impl Sync for XenShared {}

impl XenShared {
    /// `SET_UNMAP_NOTIFY`: when these pages go (or the process dies), clear the byte at
    /// `offset` and/or notify event channel `port`.
    pub fn set_unmap_notify(
        &self,
        offset: usize,
        clear_byte: bool,
        port: Option<u32>,
    ) -> Result<()> {
        let r = IOCTL_GNTALLOC_SET_UNMAP_NOTIFY;
        notify(&self.dev, r, self.index, self.len, offset, clear_byte, port)
    }
}

impl Drop for XenShared {
    fn drop(&mut self) {
        // SAFETY: mapped by `share`; nothing refers to it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        let mut d = GntallocDeallocGref {
            index: self.index,
            count: self.grefs.len() as u32,
        };
        // SAFETY: `d` is the struct DEALLOC_GREF takes.
        let _ = unsafe {
            ioctl(
                &self.dev,
                IOCTL_GNTALLOC_DEALLOC_GREF,
                &mut d,
                "DEALLOC_GREF",
            )
        };
    }
}

// SAFETY: mapped read-write for `len` bytes until drop, page-aligned, reached only through
// volatile accesses and atomics.
unsafe impl xenpv_ring::RingMemory for XenShared {
    fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl GrantMemory for XenShared {
    fn volatile(&self) -> VolatileSlice<'_> {
        // SAFETY: mapped read-write while `self` lives; no references into it.
        unsafe { VolatileSlice::new(self.ptr, self.len, true) }
    }
    fn access(&self) -> Access {
        Access::Writable
    }
}

impl SharedPages for XenShared {
    fn grefs(&self) -> &[GrantRef] {
        &self.grefs
    }
    fn domid(&self) -> DomId {
        self.domid
    }
}

impl GrantShare for XenGntalloc {
    type Shared = XenShared;

    fn share(&self, domid: DomId, count: usize, access: Access) -> Result<XenShared> {
        check_pages(count)?;
        let mut buf = var_buf(16, count, 4);
        let hdr = buf.as_mut_ptr().cast::<GntallocAllocGref>();
        // SAFETY: `buf` is 8-aligned and holds the 16-byte header plus `count` refs.
        unsafe {
            (*hdr).domid = domid;
            (*hdr).flags = if access.is_writable() {
                GNTALLOC_FLAG_WRITABLE
            } else {
                0
            };
            (*hdr).count = count as u32;
            ioctl(&self.dev, IOCTL_GNTALLOC_ALLOC_GREF, hdr, "ALLOC_GREF").map_err(
                |e| match e {
                    Error::Os { ref source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                        Error::GntallocLimit { count }
                    }
                    e => e,
                },
            )?;
        }
        // SAFETY: the ioctl filled in `index` and `count` refs after the header.
        let (index, grefs) = unsafe {
            let arr = core::ptr::addr_of!((*hdr).gref_ids).cast::<u32>();
            (
                (*hdr).index,
                (0..count).map(|i| *arr.add(i)).collect::<Vec<_>>(),
            )
        };
        let len = count * PAGE_SIZE;
        // SAFETY: a new shared mapping of the device at the offset it gave us.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.dev.as_raw_fd(),
                index as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED || p.is_null() {
            let e = Error::os("mmap of gntalloc pages");
            let mut d = GntallocDeallocGref {
                index,
                count: count as u32,
            };
            // SAFETY: `d` is the struct DEALLOC_GREF takes.
            let _ = unsafe { ioctl(&self.dev, IOCTL_GNTALLOC_DEALLOC_GREF, &mut d, "DEALLOC") };
            return Err(e);
        }
        // gntalloc hands out zeroed pages of its own (XSA-403).
        Ok(XenShared {
            ptr: NonNull::new(p.cast()).ok_or(Error::Protocol("mmap returned NULL"))?,
            len,
            index,
            grefs,
            domid,
            dev: self.dev.clone(),
        })
    }

    fn revoke(&self, shared: XenShared) -> Result<Revoke> {
        // DEALLOC_GREF: the kernel ends each grant with an atomic revoke and defers the release
        // of a page the peer still maps; it does not tell us which, so this reports Revoked.
        drop(shared);
        Ok(Revoke::Revoked)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_limit;

    #[test]
    fn a_module_parameter_is_a_number_and_a_newline() {
        assert_eq!(parse_limit("1024\n"), Some(1024));
        assert_eq!(parse_limit(" 65536 "), Some(65536));
        assert_eq!(parse_limit(""), None);
        assert_eq!(parse_limit("-1\n"), None);
    }
}
