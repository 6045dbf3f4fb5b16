//! What the server exports: the [`BlockExport`] trait (synchronous devices), the
//! [`AsyncBlockExport`] trait (submit/complete devices with deep queues) and the [`Threaded`]
//! adapter from the first to the second. [`MemExport`] and [`FileExport`] are ready-made exports.

use crate::proto::{tflags, Command, Errno, SimpleReply};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

/// What an export can do; turned into the transmission flags the server advertises.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportFlags {
    /// Writes, trims and write-zeroes are refused with `EPERM`.
    pub read_only: bool,
    /// `flush` makes completed writes durable (advertises `SEND_FLUSH`).
    pub flush: bool,
    /// Writes honour the FUA flag (advertises `SEND_FUA`).
    pub fua: bool,
    /// `trim` is meaningful (advertises `SEND_TRIM`).
    pub trim: bool,
    /// `write_zeroes` is offered (advertises `SEND_WRITE_ZEROES`).
    pub write_zeroes: bool,
    /// Several connections see one consistent device (advertises `CAN_MULTI_CONN`).
    pub multi_conn: bool,
    /// The device is rotational (advertises `ROTATIONAL`).
    pub rotational: bool,
}

impl ExportFlags {
    /// A writable export that can do everything.
    pub const fn all() -> ExportFlags {
        ExportFlags {
            read_only: false,
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            multi_conn: true,
            rotational: false,
        }
    }

    /// The transmission flags (`NBD_FLAG_*`) for these capabilities.
    pub fn to_wire(self) -> u16 {
        let mut f = tflags::HAS_FLAGS;
        let mut set = |on: bool, bit: u16| {
            if on {
                f |= bit
            }
        };
        set(self.read_only, tflags::READ_ONLY);
        set(self.flush, tflags::SEND_FLUSH);
        set(self.fua, tflags::SEND_FUA);
        set(self.trim && !self.read_only, tflags::SEND_TRIM);
        set(
            self.write_zeroes && !self.read_only,
            tflags::SEND_WRITE_ZEROES,
        );
        set(self.multi_conn, tflags::CAN_MULTI_CONN);
        set(self.rotational, tflags::ROTATIONAL);
        f
    }
}

/// A synchronous block device the server exports. Every method may be called from several
/// threads at once (the [`Threaded`] adapter runs a pool); requests reaching it are already
/// validated: in range, within the length bound, allowed by [`flags`](BlockExport::flags).
pub trait BlockExport: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Capabilities.
    fn flags(&self) -> ExportFlags;
    /// Fill `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write `buf` at `offset`; with `fua`, durably before returning.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    /// Discard a range (advisory: contents afterwards are unspecified).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let _ = (offset, len, fua);
        Ok(())
    }
    /// Write zeroes to a range; `no_hole` asks that the range stays allocated. The default
    /// writes zero buffers in 1 MiB pieces.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, no_hole: bool) -> io::Result<()> {
        let _ = no_hole;
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.write_at(&zeroes[..n], offset + done, false)?;
            done += n as u64;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }
}

/// One validated request handed to an [`AsyncBlockExport`].
#[derive(Debug)]
pub struct Request {
    /// The command: never [`Command::Disc`].
    pub command: Command,
    /// Byte offset (for `Flush`: whatever the client sent, usually 0).
    pub offset: u64,
    /// Byte length (≤ [`MAX_PAYLOAD`](crate::proto::MAX_PAYLOAD) for reads and writes).
    pub length: u32,
    /// `NBD_CMD_FLAG_FUA`.
    pub fua: bool,
    /// `NBD_CMD_FLAG_NO_HOLE` (write-zeroes only).
    pub no_hole: bool,
    /// The payload of a write (`length` bytes); empty otherwise.
    pub data: Vec<u8>,
}

/// A reply on its way to the connection's writer.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) reply: SimpleReply,
    pub(crate) data: Vec<u8>,
}

/// The obligation to answer one request. Complete it exactly once, from any thread, in any
/// order; dropping it unanswered answers `EIO`, so a lost request never hangs the client.
#[derive(Debug)]
pub struct Completion {
    handle: u64,
    read_len: Option<u32>,
    tx: Option<Sender<Outgoing>>,
}

impl Completion {
    pub(crate) fn new(handle: u64, read_len: Option<u32>, tx: Sender<Outgoing>) -> Completion {
        Completion {
            handle,
            read_len,
            tx: Some(tx),
        }
    }

    /// Answer success for a request that returns no data (anything but a read).
    pub fn ok(self) {
        self.complete(Ok(Vec::new()))
    }

    /// Answer a read with its data (which must be exactly the requested length, else the
    /// client gets `EIO`), or any request with `Ok(vec![])`, or an error.
    pub fn complete(mut self, result: io::Result<Vec<u8>>) {
        let out = match (result, self.read_len) {
            (Ok(data), Some(len)) if data.len() == len as usize => self.reply(0, data),
            (Ok(data), Some(len)) => {
                tracing::error!(
                    handle = self.handle,
                    got = data.len(),
                    want = len,
                    "export completed a read with the wrong length; answering EIO"
                );
                self.reply(Errno::EIO.0, Vec::new())
            }
            (Ok(_), None) => self.reply(0, Vec::new()),
            (Err(e), _) => self.reply(Errno::from_io(&e).0, Vec::new()),
        };
        self.send(out);
    }

    /// Answer an error.
    pub fn fail(self, errno: Errno) {
        let mut me = self;
        let out = me.reply(errno.0, Vec::new());
        me.send(out);
    }

    fn reply(&self, error: u32, data: Vec<u8>) -> Outgoing {
        Outgoing {
            reply: SimpleReply {
                error,
                handle: self.handle,
            },
            data,
        }
    }

    fn send(&mut self, out: Outgoing) {
        if let Some(tx) = self.tx.take() {
            // The connection may be gone already: nothing to answer then.
            let _ = tx.send(out);
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if self.tx.is_some() {
            tracing::warn!(
                handle = self.handle,
                "request dropped without an answer; answering EIO"
            );
            let out = self.reply(Errno::EIO.0, Vec::new());
            self.send(out);
        }
    }
}

/// A device with its own queue: the server submits validated requests and the device completes
/// them whenever it likes, up to the server's in-flight bound per connection
/// ([`ServerConfig::max_in_flight`](crate::server::ServerConfig::max_in_flight)).
pub trait AsyncBlockExport: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Capabilities.
    fn flags(&self) -> ExportFlags;
    /// Start a request; answer it through `done`. Must not block for long.
    fn submit(&self, request: Request, done: Completion);
}

type Job = (Request, Completion);

/// Runs a synchronous [`BlockExport`] on a pool of worker threads, so that a connection keeps
/// many requests in flight (fio at iodepth 32 is not serialised).
pub struct Threaded<E: BlockExport> {
    export: Arc<E>,
    jobs: Mutex<Option<Sender<Job>>>,
    workers: Vec<JoinHandle<()>>,
}

/// The default number of worker threads of [`Threaded`].
pub const DEFAULT_WORKERS: usize = 8;

impl<E: BlockExport> Threaded<E> {
    /// Start `workers` threads (at least one) serving `export`.
    pub fn new(export: Arc<E>, workers: usize) -> io::Result<Threaded<E>> {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::new();
        for i in 0..workers.max(1) {
            let rx = Arc::clone(&rx);
            let export = Arc::clone(&export);
            handles.push(
                std::thread::Builder::new()
                    .name(format!("nbd-io-{i}"))
                    .spawn(move || worker(&*export, &rx))?,
            );
        }
        Ok(Threaded {
            export,
            jobs: Mutex::new(Some(tx)),
            workers: handles,
        })
    }

    /// The wrapped export.
    pub fn inner(&self) -> &Arc<E> {
        &self.export
    }
}

fn worker<E: BlockExport>(export: &E, rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((req, done)) = job else { return };
        run_sync(export, req, done);
    }
}

/// Execute one request on a synchronous export.
pub fn run_sync<E: BlockExport + ?Sized>(export: &E, req: Request, done: Completion) {
    let off = req.offset;
    let len = u64::from(req.length);
    match req.command {
        Command::Read => {
            let mut buf = vec![0u8; req.length as usize];
            done.complete(export.read_at(&mut buf, off).map(|()| buf));
        }
        Command::Write => done.complete(
            export
                .write_at(&req.data, off, req.fua)
                .map(|()| Vec::new()),
        ),
        Command::Flush => done.complete(export.flush().map(|()| Vec::new())),
        Command::Trim => done.complete(export.trim(off, len, req.fua).map(|()| Vec::new())),
        Command::WriteZeroes => done.complete(
            export
                .write_zeroes(off, len, req.fua, req.no_hole)
                .map(|()| Vec::new()),
        ),
        Command::Disc => done.fail(Errno::EINVAL),
    }
}

impl<E: BlockExport> AsyncBlockExport for Threaded<E> {
    fn size(&self) -> u64 {
        self.export.size()
    }

    fn flags(&self) -> ExportFlags {
        self.export.flags()
    }

    fn submit(&self, request: Request, done: Completion) {
        let tx = self.jobs.lock().ok().and_then(|g| g.clone());
        match tx {
            Some(tx) => {
                if let Err(e) = tx.send((request, done)) {
                    let (_, done) = e.0;
                    done.fail(Errno::ESHUTDOWN);
                }
            }
            None => done.fail(Errno::ESHUTDOWN),
        }
    }
}

impl<E: BlockExport> Drop for Threaded<E> {
    fn drop(&mut self) {
        if let Ok(mut g) = self.jobs.lock() {
            g.take();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// An export in memory (a `Vec<u8>` behind a lock); trims and write-zeroes zero the range.
#[derive(Debug)]
pub struct MemExport {
    data: RwLock<Vec<u8>>,
    flags: ExportFlags,
}

impl MemExport {
    /// A zeroed export of `size` bytes with every capability.
    pub fn new(size: usize) -> MemExport {
        MemExport::from_vec(vec![0; size])
    }

    /// An export holding `data`.
    pub fn from_vec(data: Vec<u8>) -> MemExport {
        MemExport {
            data: RwLock::new(data),
            flags: ExportFlags::all(),
        }
    }

    /// Change the advertised capabilities (e.g. read-only).
    pub fn with_flags(mut self, flags: ExportFlags) -> MemExport {
        self.flags = flags;
        self
    }

    /// A copy of the contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().map(|d| d.clone()).unwrap_or_default()
    }

    fn range(&self, off: u64, len: usize, size: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(off).map_err(|_| einval())?;
        let end = start.checked_add(len).ok_or_else(einval)?;
        if end > size {
            return Err(einval());
        }
        Ok(start..end)
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(Errno::EINVAL.0 as i32)
}

fn poisoned() -> io::Error {
    io::Error::other("export lock poisoned")
}

impl BlockExport for MemExport {
    fn size(&self) -> u64 {
        self.data.read().map(|d| d.len() as u64).unwrap_or(0)
    }

    fn flags(&self) -> ExportFlags {
        self.flags
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.data.read().map_err(|_| poisoned())?;
        let r = self.range(offset, buf.len(), d.len())?;
        buf.copy_from_slice(&d[r]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        let mut d = self.data.write().map_err(|_| poisoned())?;
        let r = self.range(offset, buf.len(), d.len())?;
        d[r].copy_from_slice(buf);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.write_zeroes(offset, len, fua, false)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool, _no_hole: bool) -> io::Result<()> {
        let mut d = self.data.write().map_err(|_| poisoned())?;
        let len = usize::try_from(len).map_err(|_| einval())?;
        let r = self.range(offset, len, d.len())?;
        d[r].fill(0);
        Ok(())
    }
}

/// An export backed by a regular file or block device (`pread`/`pwrite`, `fsync` for flush
/// and FUA; trim is a no-op, which NBD allows).
#[derive(Debug)]
pub struct FileExport {
    file: File,
    size: u64,
    flags: ExportFlags,
}

impl FileExport {
    /// Export `file`, whose current length is the export size. Opened read-only files should
    /// be given `read_only`.
    pub fn new(file: File, read_only: bool) -> io::Result<FileExport> {
        let size = file.metadata()?.len();
        let flags = ExportFlags {
            read_only,
            trim: false,
            multi_conn: true,
            ..ExportFlags::all()
        };
        Ok(FileExport { file, size, flags })
    }

    /// Open `path` read-write and export it.
    pub fn open(path: impl AsRef<std::path::Path>) -> io::Result<FileExport> {
        let path = path.as_ref();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot open {} for the NBD export: {e}", path.display()),
                )
            })?;
        FileExport::new(file, false)
    }
}

impl BlockExport for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn flags(&self) -> ExportFlags {
        self.flags
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.file.write_all_at(buf, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}
