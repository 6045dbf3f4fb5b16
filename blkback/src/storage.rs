//! Storage engines: where a disk's bytes live. Data moves between storage and the guest's
//! mapped grant pages directly (`preadv`/`pwritev` on the mapping), with no intermediate buffer.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use xenpv_grant::VolatileSlice;

/// Why a storage engine failed to open.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file or device could not be opened.
    #[error("cannot open {path}: {source} (check the path in the disk spec and the daemon's permissions)")]
    Open {
        /// The path.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// The size could not be read.
    #[error("cannot read the size of {path}: {source}")]
    Size {
        /// The path.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// The size is not a whole number of sectors.
    #[error("{path} is {size} bytes, not a multiple of the {sector_size}-byte sector size")]
    Unaligned {
        /// The path.
        path: String,
        /// Its size.
        size: u64,
        /// The sector size.
        sector_size: u32,
    },
}

/// A disk's backing store.
pub trait Storage: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads `bufs.len()` buffers' worth of bytes at `offset` into the buffers, in order.
    fn read_into(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()>;
    /// Writes the buffers, in order, at `offset`.
    fn write_from(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Discards `len` bytes at `offset`: later reads return zeroes.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Whether [`discard`](Self::discard) is supported.
    fn can_discard(&self) -> bool;
}

/// A raw image file or a block device, served with positioned vectored I/O (psync).
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    size: u64,
    block_device: bool,
}

/// Options for [`FileStorage::open`].
#[derive(Debug, Clone, Copy, Default)]
pub struct FileOptions {
    /// Open read-only.
    pub read_only: bool,
    /// Bypass the page cache (`O_DIRECT`).
    pub direct: bool,
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKDISCARD: libc::c_ulong = 0x1277;

impl FileStorage {
    /// Opens `path`; its size must be a multiple of `sector_size`.
    pub fn open(path: &Path, opts: FileOptions, sector_size: u32) -> Result<Self, Error> {
        let name = path.display().to_string();
        let mut o = OpenOptions::new();
        o.read(true).write(!opts.read_only);
        if opts.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = o.open(path).map_err(|source| Error::Open {
            path: name.clone(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| Error::Size {
            path: name.clone(),
            source,
        })?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for it.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
            if r < 0 {
                return Err(Error::Size {
                    path: name,
                    source: io::Error::last_os_error(),
                });
            }
            size
        } else {
            meta.len()
        };
        if size % u64::from(sector_size) != 0 {
            return Err(Error::Unaligned {
                path: name,
                size,
                sector_size,
            });
        }
        Ok(Self {
            file,
            size,
            block_device,
        })
    }
}

/// Runs a positioned vectored transfer to completion (short transfers and `EINTR` retried).
fn transfer(fd: i32, offset: u64, bufs: &[VolatileSlice<'_>], write: bool) -> io::Result<()> {
    let mut iov: Vec<libc::iovec> = bufs
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.as_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let mut done = 0usize;
    let mut first = 0usize;
    while done < total {
        let pos = offset
            .checked_add(done as u64)
            .and_then(|p| i64::try_from(p).ok())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let count = (iov.len() - first).min(1024) as libc::c_int;
        // SAFETY: every iovec points into a `VolatileSlice`, valid for its length for the
        // lifetime of `bufs` (the caller's mapping outlives this call); the kernel reads or
        // writes only within them. `first < iov.len()` while bytes remain.
        let n = unsafe {
            if write {
                libc::pwritev(fd, iov.as_ptr().add(first), count, pos)
            } else {
                libc::preadv(fd, iov.as_ptr().add(first), count, pos)
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short transfer at the end of the backing file",
            ));
        }
        let mut n = n as usize;
        done += n;
        // Advance past the bytes transferred.
        while n > 0 && first < iov.len() {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: n < iov_len, so the advanced pointer stays inside the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n).cast() };
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

impl Storage for FileStorage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_into(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        if bufs.iter().any(|b| !b.is_writable()) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read into a read-only mapping",
            ));
        }
        transfer(self.file.as_raw_fd(), offset, bufs, false)
    }

    fn write_from(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        transfer(self.file.as_raw_fd(), offset, bufs, true)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let (off, l) = match (i64::try_from(offset), i64::try_from(len)) {
            (Ok(o), Ok(l)) => (o, l),
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        let r = if self.block_device {
            let range = [offset, len];
            // SAFETY: BLKDISCARD reads two u64 (start, length) from the pointer.
            unsafe { libc::ioctl(self.file.as_raw_fd(), BLKDISCARD, range.as_ptr()) }
        } else {
            // SAFETY: plain syscall on an owned fd.
            unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    l,
                )
            }
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn can_discard(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::ptr::NonNull;

    fn slice(buf: &mut [u8]) -> VolatileSlice<'_> {
        // SAFETY: `buf` is valid for its length while the slice is used (within this test).
        unsafe { VolatileSlice::new(NonNull::new(buf.as_mut_ptr()).unwrap(), buf.len(), true) }
    }

    #[test]
    fn vectored_read_write_flush_discard() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![0xAB; 64 * 1024]).unwrap();
        let s = FileStorage::open(f.path(), FileOptions::default(), 512).unwrap();
        assert_eq!(s.size(), 65536);
        let (mut a, mut b) = (vec![1u8; 4096], vec![2u8; 512]);
        s.write_from(4096, &[slice(&mut a), slice(&mut b)]).unwrap();
        s.flush().unwrap();
        let (mut c, mut d) = (vec![0u8; 512], vec![0u8; 4096]);
        s.read_into(4096, &[slice(&mut c), slice(&mut d)]).unwrap();
        assert!(c.iter().all(|&x| x == 1));
        assert!(d[..3584].iter().all(|&x| x == 1) && d[3584..].iter().all(|&x| x == 2));
        s.discard(8192, 8192).unwrap();
        let mut back = vec![0u8; 65536];
        f.as_file_mut().seek(SeekFrom::Start(0)).unwrap();
        f.as_file_mut().read_exact(&mut back).unwrap();
        assert!(back[8192..16384].iter().all(|&x| x == 0));
        assert!(back[16384..].iter().all(|&x| x == 0xAB));
        // Past the end: an error, never a partial success.
        let mut e = vec![0u8; 4096];
        assert!(s.read_into(65536 - 512, &[slice(&mut e)]).is_err());
    }

    #[test]
    fn open_errors_name_the_problem() {
        let e = FileStorage::open(
            Path::new("/nonexistent/disk.img"),
            FileOptions::default(),
            512,
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/disk.img"));
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0; 1000]).unwrap();
        let e = FileStorage::open(f.path(), FileOptions::default(), 512).unwrap_err();
        assert!(
            e.to_string()
                .contains("multiple of the 512-byte sector size"),
            "{e}"
        );
    }
}
