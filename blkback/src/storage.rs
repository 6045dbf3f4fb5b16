//! Storage engines: where a disk's bytes live.
//!
//! * [`FileStorage`] (engine `psync`): a raw file or block device served with `preadv`/`pwritev`
//!   straight into the guest's mapped grant pages, one call at a time.
//! * [`IoUringStorage`] (engine `io_uring`): the same file semantics, but a whole batch of
//!   requests is in flight at once, `readv`/`writev` SQEs pointing into the mapped pages.
//! * [`NbdStorage`]: an NBD export, requests pipelined on the connection; data moves between
//!   the socket and the guest's pages with `readv`/`writev` on them, no buffer in between.
//!
//! [`open_storage`] picks the engine from a backend's `params` node and [`StorageOptions`].
//! Batches go through [`Storage::submit`]: the ops of one batch may run concurrently and in any
//! order, so a caller puts into one batch only ops that do not conflict ([`Op::conflicts`]).
//! An engine that can keep ops in flight across calls (io_uring on a file that is not in
//! memory) also offers a [`Pipeline`] per queue ([`Storage::pipeline`]): ops are started one by
//! one and their completions reaped as they come, so the device never waits for a batch.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use xenpv_grant::{VolatileSlice, INLINE_MAPPINGS};

mod nbd;
mod uring;

/// The single-op methods of [`Storage`] for an engine whose real path is
/// [`submit`](Storage::submit) (io_uring, NBD): each runs a batch of one.
macro_rules! single_ops_via_submit {
    () => {
        fn read_into(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
            $crate::storage::only(self.submit(&[Op::Read {
                offset,
                bufs: bufs.into(),
            }]))
        }

        fn write_from(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
            $crate::storage::only(self.submit(&[Op::Write {
                offset,
                bufs: bufs.into(),
            }]))
        }

        fn flush(&self) -> io::Result<()> {
            $crate::storage::only(self.submit(&[Op::Flush]))
        }

        fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
            $crate::storage::only(self.submit(&[Op::Discard { offset, len }]))
        }
    };
}
pub(crate) use single_ops_via_submit;

/// The result of a batch of one op.
pub(crate) fn only(mut results: Vec<io::Result<()>>) -> io::Result<()> {
    results
        .pop()
        .unwrap_or_else(|| Err(io::Error::other("a batch of one op returned no result")))
}

pub use self::nbd::NbdStorage;
pub use self::uring::{IoUringStorage, UringPipeline};

/// A completed op of a [`Pipeline`]: the tag it was started with, and its result.
pub type Completion = (u64, io::Result<()>);

/// Ops in flight across calls, for one queue thread: [`start`](Pipeline::start) one op at a
/// time, collect completions with [`reap`](Pipeline::reap) (non-blocking) or
/// [`wait`](Pipeline::wait). The ops in flight together may run in any order: the caller keeps
/// conflicting ops ([`Op::conflicts`]) apart. Dropping a pipeline waits for every op in flight.
pub trait Pipeline: Send {
    /// Ops that may be in flight at once (a caller starts no more).
    fn capacity(&self) -> usize;
    /// Ops started whose completion has not been returned yet.
    fn in_flight(&self) -> usize;
    /// Starts `op`, tagged `tag`. Its completion comes later from `reap` or `wait` (also for an
    /// op refused at once or run synchronously). The kernel may see it only at the next
    /// [`submit`](Pipeline::submit) or `wait`.
    ///
    /// # Safety
    /// The memory behind `op`'s buffers must stay mapped, and must not be used for anything
    /// else, until the completion tagged `tag` has been returned by `reap` or `wait`, or the
    /// pipeline has been dropped.
    unsafe fn start(&mut self, tag: u64, op: &Op<'_>);
    /// Hands the started ops to the kernel without waiting.
    fn submit(&mut self);
    /// Whether a completion is available now (for polling: reads memory, no system call).
    fn ready(&mut self) -> bool;
    /// Appends the completions available now to `out`, without blocking; returns how many.
    fn reap(&mut self, out: &mut Vec<Completion>) -> usize;
    /// Submits, then blocks until at least one completion is available (appended to `out`) or,
    /// with `wake`, until that fd is readable. Returns whether `wake` became readable. Returns
    /// at once if nothing is in flight and there is no `wake`.
    fn wait(&mut self, wake: Option<BorrowedFd<'_>>, out: &mut Vec<Completion>) -> bool;
    /// Submits, then blocks until a completion is available or `d` has passed, whichever comes
    /// first; the completions are left for [`reap`](Pipeline::reap). For hybrid polling's sleep
    /// through a long wait: a completion that comes early wakes the thread. The default sleeps
    /// for `d`.
    fn doze(&mut self, d: std::time::Duration) {
        self.submit();
        xenpv_evtchn::precise_sleep(d);
    }
}

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
    /// An io_uring instance could not be created.
    #[error("cannot set up io_uring: {0} (the kernel is too old, io_uring is disabled by sysctl kernel.io_uring_disabled, or a seccomp filter refuses it; use the psync engine)")]
    IoUring(#[source] io::Error),
    /// The NBD export could not be reached or used.
    #[error("NBD storage {uri}: {source}")]
    Nbd {
        /// The URI from `params`.
        uri: String,
        /// The cause.
        source: xenpv_nbd::client::Error,
    },
    /// The `params` node names something no engine serves.
    #[error("unsupported disk params {params:?}: {why}")]
    Params {
        /// The node's value.
        params: String,
        /// What is wrong and what would work.
        why: String,
    },
    /// An unknown engine name.
    #[error("unknown storage engine {0:?}: use psync or io_uring")]
    Engine(String),
}

/// The buffers of a read or write, in order: inline up to a 16 KiB request's
/// ([`INLINE_MAPPINGS`]), so that the op of a small request allocates nothing.
pub type Bufs<'a> = smallvec::SmallVec<[VolatileSlice<'a>; INLINE_MAPPINGS]>;

/// One operation of a batch given to [`Storage::submit`].
#[derive(Debug)]
pub enum Op<'a> {
    /// Read `bufs`' total length at `offset` into the buffers, in order.
    Read {
        /// Byte offset on the disk.
        offset: u64,
        /// Destination (writable) buffers, usually the guest's mapped pages.
        bufs: Bufs<'a>,
    },
    /// Write the buffers, in order, at `offset`.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// Source buffers.
        bufs: Bufs<'a>,
    },
    /// Make every write completed before the batch durable.
    Flush,
    /// Discard `len` bytes at `offset`: later reads return zeroes.
    Discard {
        /// Byte offset on the disk.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

impl Op<'_> {
    /// The byte range the op touches (`None` for a flush).
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            Op::Read { offset, bufs } | Op::Write { offset, bufs } => {
                let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
                Some((*offset, offset.saturating_add(len)))
            }
            Op::Discard { offset, len } => Some((*offset, offset.saturating_add(*len))),
            Op::Flush => None,
        }
    }

    /// Whether the two ops must not be in flight together: a flush conflicts with everything;
    /// two ops on overlapping ranges conflict unless both are reads.
    pub fn conflicts(&self, other: &Op<'_>) -> bool {
        match (self.range(), other.range()) {
            (Some((a0, a1)), Some((b0, b1))) => {
                let both_read = matches!(self, Op::Read { .. }) && matches!(other, Op::Read { .. });
                !both_read && a0 < b1 && b0 < a1
            }
            _ => true,
        }
    }
}

/// A disk's backing store. Instances are per device and shared by its queues' threads.
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
    /// Whether the store refuses writes (opened read-only, or a read-only NBD export).
    fn read_only(&self) -> bool {
        false
    }
    /// The engine's name, for logs (`psync`, `io_uring`, `nbd`).
    fn engine(&self) -> &'static str {
        "psync"
    }
    /// The logical block size (`sector-size`): the smallest unit the store can address.
    fn logical_sector_size(&self) -> u32 {
        512
    }
    /// The physical block size (`physical-sector-size`): a multiple of the logical one.
    fn physical_sector_size(&self) -> u32 {
        self.logical_sector_size()
    }
    /// Re-reads the size of the backing store (online resize) and returns it, grown or
    /// shrunk: a shrink is announced to the frontend as Linux's blkback and QEMU's xen-block
    /// announce it (the data past the new end is gone either way; announcing it lets the
    /// guest see so, instead of failing reads past the end of the file and letting writes
    /// there extend it again).
    fn refresh_size(&self) -> io::Result<u64> {
        Ok(self.size())
    }
    /// Runs a batch: the ops may be in flight together and complete in any order (the caller
    /// keeps conflicting ops in separate batches). Returns one result per op, in the order of
    /// `ops`; when this returns, no op is in flight any more (the buffers may be unmapped).
    ///
    /// The default runs the ops one by one with the single-op methods.
    fn submit(&self, ops: &[Op<'_>]) -> Vec<io::Result<()>> {
        ops.iter().map(|op| self.run(op)).collect()
    }

    /// Runs one op to completion: [`submit`](Self::submit) of a batch of one, without its
    /// allocations where the engine can. For the serial engines ([`serial`](Self::serial)),
    /// which the caller drives op by op.
    fn run(&self, op: &Op<'_>) -> io::Result<()> {
        match op {
            Op::Read { offset, bufs } => self.read_into(*offset, bufs),
            Op::Write { offset, bufs } => self.write_from(*offset, bufs),
            Op::Flush => self.flush(),
            Op::Discard { offset, len } => self.discard(*offset, *len),
        }
    }

    /// A [`Pipeline`] for one queue thread, if this engine can keep ops in flight across
    /// calls; `None` (the default) means the caller uses [`submit`](Self::submit).
    fn pipeline(&self) -> Option<Box<dyn Pipeline>> {
        None
    }

    /// Whether [`submit`](Self::submit) does a batch's ops one after another, inline (a memory
    /// copy, or one system call at a time), rather than keeping them in flight together: a
    /// caller then answers in smaller chunks, publishing early responses while it serves the
    /// rest. `false` by default.
    fn serial(&self) -> bool {
        false
    }
}

/// `offset..offset + len` must lie inside a disk of `size` bytes.
pub(crate) fn check_range(size: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{len} bytes at offset {offset} reach beyond the end of the {size}-byte disk"),
        )),
    }
}

pub(crate) fn total_len(bufs: &[VolatileSlice<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

pub(crate) fn read_only_mapping() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "read into a read-only mapping",
    )
}

/// Which engine serves a raw file or block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// One `preadv`/`pwritev` at a time ([`FileStorage`]); fastest at QD1 on tmpfs.
    Psync,
    /// Batches in flight together through io_uring ([`IoUringStorage`]); the default, for
    /// depth on real disks. Falls back to psync if io_uring cannot be set up.
    #[default]
    IoUring,
}

impl std::str::FromStr for Engine {
    type Err = Error;
    fn from_str(s: &str) -> Result<Engine, Error> {
        match s.trim() {
            "psync" | "sync" => Ok(Engine::Psync),
            "io_uring" | "io-uring" | "uring" => Ok(Engine::IoUring),
            other => Err(Error::Engine(other.to_string())),
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Engine::Psync => "psync",
            Engine::IoUring => "io_uring",
        })
    }
}

/// How [`open_storage`] opens a disk.
#[derive(Debug, Clone, Copy)]
pub struct StorageOptions {
    /// Engine for files and block devices (NBD URIs always use [`NbdStorage`]).
    pub engine: Engine,
    /// Open read-only.
    pub read_only: bool,
    /// Bypass the page cache (`O_DIRECT`; files and block devices only).
    pub direct: bool,
    /// The size must be a multiple of this.
    pub sector_size: u32,
}

impl Default for StorageOptions {
    fn default() -> Self {
        Self {
            engine: Engine::default(),
            read_only: false,
            direct: false,
            sector_size: 512,
        }
    }
}

/// Prefixes of `params` that still mean "a raw file or block device" (xl/xend disk specs).
const RAW_PREFIXES: &[&str] = &["tap2:", "tap:", "aio:", "raw:", "file:", "phy:"];
/// Image formats we do not decode: refused with a hint instead of served as raw bytes.
const FORMAT_PREFIXES: &[&str] = &["qcow:", "qcow2:", "vhd:", "vhdx:", "vmdk:", "qed:"];

/// The NBD URI `params` names, if it names one: `nbd://…`, `nbd+unix://…`, or the older
/// `nbd:unix:/path[:exportname=NAME]` / `nbd:host:port[:exportname=NAME]` forms.
pub fn nbd_uri(params: &str) -> Option<Result<xenpv_nbd::uri::Uri, Error>> {
    let p = params.trim();
    if p.starts_with("nbd://") || p.starts_with("nbd+unix://") {
        return Some(xenpv_nbd::uri::Uri::parse(p).map_err(|e| Error::Nbd {
            uri: p.to_string(),
            source: e.into(),
        }));
    }
    let rest = p.strip_prefix("nbd:")?;
    let (addr, export) = match rest.split_once(":exportname=") {
        Some((a, e)) => (a, e.to_string()),
        None => (rest, String::new()),
    };
    let bad = |why: &str| Error::Params {
        params: p.to_string(),
        why: format!("{why} (use nbd+unix:///export?socket=/path or nbd://host:port/export)"),
    };
    let address = if let Some(path) = addr.strip_prefix("unix:") {
        if path.is_empty() {
            return Some(Err(bad("no socket path after nbd:unix:")));
        }
        xenpv_nbd::uri::Address::Unix(path.into())
    } else {
        let Some((host, port)) = addr.rsplit_once(':') else {
            return Some(Err(bad("expected nbd:host:port")));
        };
        let Ok(port) = port.parse() else {
            return Some(Err(bad("bad port")));
        };
        if host.is_empty() {
            return Some(Err(bad("no host")));
        }
        xenpv_nbd::uri::Address::Tcp {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
        }
    };
    Some(Ok(xenpv_nbd::uri::Uri { address, export }))
}

/// Opens the disk a backend's `params` node names: an NBD export for NBD URIs
/// ([`nbd_uri`]), otherwise a raw file or block device (prefixes such as `aio:`, `raw:`,
/// `file:`, `phy:`, `tap:aio:` are stripped) served by `opts.engine`. If io_uring cannot be
/// set up (old kernel, sysctl, seccomp), logs a warning and serves with psync.
pub fn open_storage(params: &str, opts: &StorageOptions) -> Result<Arc<dyn Storage>, Error> {
    let p = params.trim();
    if let Some(uri) = nbd_uri(p) {
        let uri = uri?;
        return Ok(Arc::new(NbdStorage::connect(
            p,
            &uri,
            opts.read_only,
            opts.sector_size,
        )?));
    }
    let mut path = p;
    'strip: loop {
        for pre in RAW_PREFIXES {
            if let Some(r) = path.strip_prefix(pre) {
                path = r;
                continue 'strip;
            }
        }
        break;
    }
    if let Some(f) = FORMAT_PREFIXES.iter().find(|f| path.starts_with(*f)) {
        return Err(Error::Params {
            params: p.to_string(),
            why: format!(
                "the {} image format is not decoded here; export it with qemu-nbd and use an nbd+unix:// URI, or convert it to raw",
                f.trim_end_matches(':')
            ),
        });
    }
    if path.is_empty() {
        return Err(Error::Params {
            params: p.to_string(),
            why: "no path".into(),
        });
    }
    let file = FileStorage::open(
        Path::new(path),
        FileOptions {
            read_only: opts.read_only,
            direct: opts.direct,
        },
        opts.sector_size,
    )?;
    match opts.engine {
        Engine::Psync => Ok(Arc::new(file)),
        Engine::IoUring => match IoUringStorage::new(file) {
            Ok(s) => Ok(Arc::new(s)),
            Err((file, e)) => {
                tracing::warn!("{path}: {e}; serving it with the psync engine instead");
                Ok(Arc::new(file))
            }
        },
    }
}

/// A raw image file or a block device, served with positioned vectored I/O (psync).
#[derive(Debug)]
pub struct FileStorage {
    pub(crate) file: File,
    size: std::sync::atomic::AtomicU64,
    sector_size: u32,
    pub(crate) block_device: bool,
    /// The file lives in memory (tmpfs, ramfs): its I/O is a memory copy that never waits
    /// for a device.
    pub(crate) memory_backed: bool,
    read_only: bool,
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
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKPBSZGET: libc::c_ulong = 0x127b;

impl FileStorage {
    /// Whether the file lives on a memory file system (tmpfs, ramfs).
    pub fn memory_backed(&self) -> bool {
        self.memory_backed
    }

    /// Opens `path`; its size must be a multiple of `sector_size`.
    pub fn open(path: &Path, opts: FileOptions, sector_size: u32) -> Result<Self, Error> {
        let name = path.display().to_string();
        let open = |flags: libc::c_int| {
            let mut o = OpenOptions::new();
            o.read(true).write(!opts.read_only);
            o.custom_flags(flags | if opts.direct { libc::O_DIRECT } else { 0 });
            o.open(path)
        };
        // Reads need not touch the image's access time (it costs a check per read); only the
        // file's owner (or CAP_FOWNER) may ask that, so without the right, open it plainly.
        let file = match open(libc::O_NOATIME) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
            r => r,
        }
        .map_err(|source| Error::Open {
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
        let memory_backed = !block_device && memory_backed(&file);
        Ok(Self {
            file,
            size: std::sync::atomic::AtomicU64::new(size),
            sector_size,
            block_device,
            memory_backed,
            read_only: opts.read_only,
        })
    }
}

/// Whether `file` is on a memory file system (tmpfs or ramfs, by `fstatfs`).
fn memory_backed(file: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one `statfs` through the pointer, valid for it; the fd is open.
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between libcs
    let t = st.f_type as i64;
    r == 0 && (t == TMPFS_MAGIC || t == RAMFS_MAGIC)
}

/// The iovecs of `bufs`, in order.
pub(crate) fn iovecs(bufs: &[VolatileSlice<'_>]) -> Vec<libc::iovec> {
    bufs.iter().map(iovec).collect()
}

/// The iovec of `b`.
pub(crate) fn iovec(b: &VolatileSlice<'_>) -> libc::iovec {
    libc::iovec {
        iov_base: b.as_ptr().cast(),
        iov_len: b.len(),
    }
}

/// Drops the first `n` bytes from `iov[*first..]`, advancing `first` past used-up entries.
fn advance(iov: &mut [libc::iovec], first: &mut usize, mut n: usize) {
    while n > 0 && *first < iov.len() {
        let v = &mut iov[*first];
        if n >= v.iov_len {
            n -= v.iov_len;
            *first += 1;
        } else {
            // SAFETY: n < iov_len, so the advanced pointer stays inside the same buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n).cast() };
            v.iov_len -= n;
            n = 0;
        }
    }
}

impl FileStorage {
    /// A block device's logical or physical block size (`BLKSSZGET`/`BLKPBSZGET`): a power of
    /// two from 512 to 64 KiB, or `None` (a file, or a value that makes no sense).
    fn block_size(&self, request: libc::c_ulong) -> Option<u32> {
        if !self.block_device {
            return None;
        }
        let mut v: libc::c_uint = 0;
        // SAFETY: both ioctls write one unsigned int through the pointer, valid for it.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), request, &mut v as *mut libc::c_uint) };
        (r == 0 && v.is_power_of_two() && (512..=65536).contains(&v)).then_some(v)
    }
}

/// Runs a positioned vectored transfer to completion (short transfers and `EINTR` retried),
/// starting `done` bytes into it (the io_uring engine finishes short transfers with this).
pub(crate) fn transfer(
    fd: i32,
    offset: u64,
    bufs: &[VolatileSlice<'_>],
    write: bool,
    done: usize,
) -> io::Result<()> {
    // Most requests have a few segments: their iovecs fit on the stack.
    const ON_STACK: usize = 16;
    let empty = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    let mut stack = [empty; ON_STACK];
    let mut heap;
    let iov: &mut [libc::iovec] = if bufs.len() <= ON_STACK {
        for (v, b) in stack.iter_mut().zip(bufs) {
            *v = iovec(b);
        }
        &mut stack[..bufs.len()]
    } else {
        heap = iovecs(bufs);
        &mut heap
    };
    // SAFETY: the iovecs point into `bufs`, valid for their lengths while they are borrowed.
    unsafe { transfer_iov(fd, offset, iov, write, done) }
}

/// [`transfer`] on iovecs.
///
/// # Safety
/// Every iovec must describe memory valid for its length (and writable for a read) for the
/// whole call.
pub(crate) unsafe fn transfer_iov(
    fd: i32,
    offset: u64,
    iov: &mut [libc::iovec],
    write: bool,
    mut done: usize,
) -> io::Result<()> {
    let total: usize = iov.iter().map(|v| v.iov_len).sum();
    let mut first = 0usize;
    advance(iov, &mut first, done);
    while done < total {
        let pos = offset
            .checked_add(done as u64)
            .and_then(|p| i64::try_from(p).ok())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let count = (iov.len() - first).min(1024) as libc::c_int;
        // SAFETY: every iovec describes memory valid for its length for this call (the
        // function's contract); the kernel reads or writes only within them. `first <
        // iov.len()` while bytes remain.
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
        let n = n as usize;
        done += n;
        advance(iov, &mut first, n);
    }
    Ok(())
}

/// Discards a range of a file (punch a hole) or a block device (`BLKDISCARD`), synchronously.
pub(crate) fn discard_sync(
    file: &File,
    block_device: bool,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    let (off, l) = match (i64::try_from(offset), i64::try_from(len)) {
        (Ok(o), Ok(l)) => (o, l),
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    let r = if block_device {
        let range = [offset, len];
        // SAFETY: BLKDISCARD reads two u64 (start, length) from the pointer.
        unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARD, range.as_ptr()) }
    } else {
        // SAFETY: plain syscall on an owned fd.
        unsafe {
            libc::fallocate(
                file.as_raw_fd(),
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

impl Storage for FileStorage {
    fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn logical_sector_size(&self) -> u32 {
        self.block_size(BLKSSZGET).unwrap_or(512)
    }

    fn physical_sector_size(&self) -> u32 {
        let logical = self.logical_sector_size();
        self.block_size(BLKPBSZGET)
            .filter(|p| *p >= logical && p % logical == 0)
            .unwrap_or(logical)
    }

    fn refresh_size(&self) -> io::Result<u64> {
        let now = if self.block_device {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for it.
            let r =
                unsafe { libc::ioctl(self.file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            size
        } else {
            self.file.metadata()?.len()
        };
        let now = now - now % u64::from(self.sector_size);
        // Grown or shrunk: requests are checked against it from the next drain on (a read
        // already under way past a shrunk end fails as a short transfer).
        self.size.store(now, std::sync::atomic::Ordering::Relaxed);
        Ok(now)
    }

    fn read_into(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        if bufs.iter().any(|b| !b.is_writable()) {
            return Err(read_only_mapping());
        }
        check_range(self.size(), offset, total_len(bufs))?;
        transfer(self.file.as_raw_fd(), offset, bufs, false, 0)
    }

    fn write_from(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        check_range(self.size(), offset, total_len(bufs))?;
        transfer(self.file.as_raw_fd(), offset, bufs, true, 0)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size(), offset, len)?;
        discard_sync(&self.file, self.block_device, offset, len)
    }

    fn can_discard(&self) -> bool {
        !self.read_only
    }

    /// One `preadv`/`pwritev` at a time.
    fn serial(&self) -> bool {
        true
    }

    fn read_only(&self) -> bool {
        self.read_only
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
