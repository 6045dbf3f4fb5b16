//! Thin safe wrappers over the system calls both providers use.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use crate::{Error, Result, PAGE_SIZE};

/// An owned range of this process's address space, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain address space owned by this value; what lives in it is reached
// only through atomics and volatile accesses.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// Reserves `pages` pages of address space (no access, no memory behind it).
    pub(crate) fn reserve(pages: usize) -> Result<Self> {
        let len = pages.checked_mul(PAGE_SIZE).ok_or(Error::BadCount {
            what: "pages",
            count: pages,
            max: crate::MAX_PAGES_PER_CALL,
        })?;
        // SAFETY: an anonymous PROT_NONE mapping at an address of the kernel's choosing touches
        // no existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        Self::from_mmap(p, len, "reserving address space (mmap)")
    }

    /// Maps `len` bytes of `fd` at `offset` wherever the kernel likes (shared).
    pub(crate) fn map_fd(fd: RawFd, offset: u64, len: usize, writable: bool) -> Result<Self> {
        let off = libc::off_t::try_from(offset).map_err(|_| Error::Protocol("offset too big"))?;
        // SAFETY: a new shared mapping at an address of the kernel's choosing touches no
        // existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot(writable),
                libc::MAP_SHARED,
                fd,
                off,
            )
        };
        Self::from_mmap(p, len, "mmap")
    }

    fn from_mmap(p: *mut libc::c_void, len: usize, what: &'static str) -> Result<Self> {
        if p == libc::MAP_FAILED {
            return Err(Error::os(what));
        }
        Ok(Self {
            ptr: NonNull::new(p.cast()).ok_or(Error::Protocol("mmap returned NULL"))?,
            len,
        })
    }

    /// Maps page `page` of this region onto `fd` at `offset` (one page, `MAP_FIXED`).
    pub(crate) fn map_page(
        &self,
        page: usize,
        fd: RawFd,
        offset: u64,
        writable: bool,
    ) -> Result<()> {
        self.map_pages(page, 1, fd, offset, writable)
    }

    /// Maps `count` pages of this region from page `page` on onto `fd` from `offset` on (one
    /// `mmap`, `MAP_FIXED`).
    pub(crate) fn map_pages(
        &self,
        page: usize,
        count: usize,
        fd: RawFd,
        offset: u64,
        writable: bool,
    ) -> Result<()> {
        let bytes = count.saturating_mul(PAGE_SIZE);
        let at = page
            .checked_mul(PAGE_SIZE)
            .filter(|&o| count > 0 && o.checked_add(bytes).is_some_and(|e| e <= self.len))
            .ok_or(Error::OutOfBounds {
                offset: page.saturating_mul(PAGE_SIZE),
                len: bytes,
                size: self.len,
            })?;
        let off = libc::off_t::try_from(offset).map_err(|_| Error::Protocol("offset too big"))?;
        // SAFETY: the target pages lie inside address space this region owns (checked), so
        // MAP_FIXED replaces only our own reservation.
        let p = unsafe {
            libc::mmap(
                self.ptr.as_ptr().add(at).cast(),
                bytes,
                prot(writable),
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd,
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::os("mmap of a grant frame"));
        }
        Ok(())
    }

    pub(crate) fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by this value and nothing refers to it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn prot(writable: bool) -> libc::c_int {
    if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    }
}

/// Takes ownership of `r`, what a system call that creates a descriptor returned; `what`
/// names the call in the error when it failed (`r < 0`).
///
/// # Safety
/// `r` is such a call's return value: when not negative, a new descriptor nothing else owns.
unsafe fn new_fd(r: libc::c_long, what: &'static str) -> Result<OwnedFd> {
    let fd = RawFd::try_from(r).map_err(|_| Error::Protocol("descriptor out of range"))?;
    if fd < 0 {
        return Err(Error::os(what));
    }
    // SAFETY: the caller's contract: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates a memfd of `len` bytes (sparse).
pub(crate) fn memfd(name: &std::ffi::CStr, len: u64) -> Result<OwnedFd> {
    // SAFETY: memfd_create with a valid C string returns a new descriptor or -1.
    let fd = unsafe {
        new_fd(
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC).into(),
            "memfd_create",
        )?
    };
    let l = libc::off_t::try_from(len).map_err(|_| Error::Protocol("memfd too big"))?;
    // SAFETY: plain system call on our descriptor.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), l) } < 0 {
        return Err(Error::os("ftruncate of the grant memfd"));
    }
    Ok(fd)
}

/// Zeroes the page at `offset` of `fd`. With `punch` it is given back to the system (a hole,
/// which reads as zero); without, zeros are written over it, which keeps a huge page whole.
pub(crate) fn zero_page(fd: BorrowedFd<'_>, offset: u64, punch: bool) -> Result<()> {
    let off = libc::off_t::try_from(offset).map_err(|_| Error::Protocol("offset too big"))?;
    if punch {
        // SAFETY: plain system call on a descriptor we hold.
        let r = unsafe {
            libc::fallocate(
                fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                PAGE_SIZE as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
    }
    pwrite_all(fd, &[0u8; PAGE_SIZE], offset)
}

// The new mount API (Linux 5.2), from <linux/mount.h>.
const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;

/// A new tmpfs that allocates in 2 MiB pages (`huge=always`), mounted nowhere: it lives as
/// long as the returned descriptor (and the files opened in it). Needs `CAP_SYS_ADMIN`.
pub(crate) fn huge_tmpfs() -> Result<OwnedFd> {
    // SAFETY: fsopen with a valid C string and flags writes no memory of ours and returns a
    // new descriptor or -1.
    let fs = unsafe {
        new_fd(
            libc::syscall(libc::SYS_fsopen, c"tmpfs".as_ptr(), FSOPEN_CLOEXEC),
            "fsopen(tmpfs) for huge-page guest memory (it needs CAP_SYS_ADMIN)",
        )?
    };
    for (cmd, key, value, what) in [
        (
            FSCONFIG_SET_STRING,
            c"huge".as_ptr(),
            c"always".as_ptr(),
            "fsconfig(huge=always) of the guest-memory tmpfs",
        ),
        (
            FSCONFIG_CMD_CREATE,
            std::ptr::null(),
            std::ptr::null(),
            "fsconfig(create) of the guest-memory tmpfs",
        ),
    ] {
        // SAFETY: fsconfig on our fs context with valid C strings (or nulls, as CMD_CREATE
        // requires); nothing of ours is written.
        if unsafe { libc::syscall(libc::SYS_fsconfig, fs.as_raw_fd(), cmd, key, value, 0) } < 0 {
            return Err(Error::os(what));
        }
    }
    // SAFETY: fsmount of our created fs context returns a new descriptor or -1.
    unsafe {
        new_fd(
            libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, 0),
            "fsmount of the guest-memory tmpfs",
        )
    }
}

/// An unlinked file of `len` bytes in the file system whose root is `dir`, every byte of it
/// allocated now (on a `huge=always` tmpfs: in 2 MiB pages, which later 4 KiB maps keep whole).
pub(crate) fn tmpfile(dir: BorrowedFd<'_>, len: u64) -> Result<OwnedFd> {
    // SAFETY: openat with a valid C string returns a new descriptor or -1.
    let fd = unsafe {
        new_fd(
            libc::openat(
                dir.as_raw_fd(),
                c".".as_ptr(),
                libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
                0o600,
            )
            .into(),
            "O_TMPFILE in the guest-memory tmpfs",
        )?
    };
    let l = libc::off_t::try_from(len).map_err(|_| Error::Protocol("guest memory too big"))?;
    // SAFETY: plain system call on our descriptor.
    if unsafe { libc::fallocate(fd.as_raw_fd(), 0, 0, l) } < 0 {
        return Err(Error::os("fallocate of guest memory"));
    }
    Ok(fd)
}

/// `pread` of exactly `buf.len()` bytes.
pub(crate) fn pread_all(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let off = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| Error::Protocol("offset too big"))?;
        // SAFETY: buf[done..] is valid for writes of its length.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                off,
            )
        };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::os("pread of a grant frame"));
        }
        if n == 0 {
            return Err(Error::Protocol("grant memfd shorter than its table says"));
        }
        done += n as usize;
    }
    Ok(())
}

/// `pwrite` of all of `buf`.
pub(crate) fn pwrite_all(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let off = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| Error::Protocol("offset too big"))?;
        // SAFETY: buf[done..] is valid for reads of its length.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                buf[done..].as_ptr().cast(),
                buf.len() - done,
                off,
            )
        };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::os("pwrite of a grant frame"));
        }
        done += n as usize;
    }
    Ok(())
}

/// Sends `data` with an optional descriptor attached (SCM_RIGHTS).
pub(crate) fn send_with_fd(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> Result<()> {
    let mut cbuf = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `cbuf` (32 bytes >= space), so the first header and its
        // data fit.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd.as_raw_fd());
        }
    }
    // SAFETY: msg points at valid buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(Error::os("sending to the grant broker socket"));
    }
    let n = n as usize;
    if n < data.len() {
        write_all(sock, &data[n..])?;
    }
    Ok(())
}

fn write_all(sock: BorrowedFd<'_>, mut data: &[u8]) -> Result<()> {
    while !data.is_empty() {
        // SAFETY: data is valid for reads of its length.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::os("sending to the grant broker socket"));
        }
        data = &data[n as usize..];
    }
    Ok(())
}

/// Receives exactly `buf.len()` bytes, and a descriptor if one came with them. `Ok(false)` on a
/// clean end of stream before the first byte.
pub(crate) fn recv_with_fd(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fd: &mut Option<OwnedFd>,
) -> Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        let mut cbuf = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: buf[done..].as_mut_ptr().cast(),
            iov_len: buf.len() - done,
        };
        // SAFETY: msghdr is plain data; zero is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&cbuf);
        // SAFETY: msg points at valid buffers for the duration of the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::os("receiving from the grant broker socket"));
        }
        // SAFETY: the kernel filled msg_control with well-formed headers within msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c);
                    let nfds = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                    for i in 0..nfds {
                        let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        let owned = OwnedFd::from_raw_fd(raw);
                        if fd.is_none() {
                            *fd = Some(owned);
                        }
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if n == 0 {
            if done == 0 {
                return Ok(false);
            }
            return Err(Error::Protocol(
                "connection closed in the middle of a message",
            ));
        }
        done += n as usize;
    }
    Ok(true)
}
