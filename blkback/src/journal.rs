//! The per-device journal that lets a restarted backend resume a connected device without the
//! frontend noticing (DESIGN §5 "Restart without the guest noticing").
//!
//! A journal is a file (in a runtime directory that outlives the process, such as
//! `/run/xenpv-blkback`) mapped shared into the process, so every store the process made is in
//! the page cache when it dies, whatever kills it. It holds:
//!
//! * a header, written once before the device goes Connected and never again: what identifies
//!   the connection (frontend domid and path, ring order, per queue the ring grants and the
//!   event-channel port, ABI, the negotiated persistent grants, the advertised indirect
//!   segments, and a random session id that the backend also writes into xenstore);
//! * per queue: the private copy of every request consumed from the ring (the copy-once
//!   buffer, in the native layout, tagged with its ring index and a checksum) in a slot per
//!   ring entry, and the queue's `req_cons`.
//!
//! # Crash safety
//! The queue writes in this order, each a plain store into the mapping:
//! 1. the copies of a chunk of requests, into their slots ([`QueueJournal::record`]);
//! 2. the new `req_cons` ([`QueueJournal::commit`]);
//! 3. only then (I/O, and) the responses into the ring, and publication of `rsp_prod` after
//!    every chunk.
//!
//! Responses are produced in ring order, so the response at ring index `i` answers the request
//! at index `i`. Whatever instant the process dies at, the requests consumed and not answered
//! are exactly those at indexes `[rsp_prod, req_cons)` of the shared ring's `rsp_prod` and the
//! journal's `req_cons`, and every one of them has its copy in its slot:
//! * dead before 2: the journal's `req_cons` does not cover the chunk; its requests are still
//!   in their ring slots (no response was written over them) and the next instance consumes
//!   them from the ring;
//! * dead after 2: the copies are complete (written before `req_cons`); the next instance
//!   executes them again — reads, writes, flushes and discards are idempotent — and answers
//!   them at the shared `rsp_prod`, also those whose responses were written but not published;
//! * a slot is reused only for index `i + RING_SIZE`, which the ring lets us consume only after
//!   the response to `i` was published.
//!
//! The header is written into a temporary file that is then renamed over the journal, so a
//! journal is either the old one or a complete new one. A journal that fails any check (magic,
//! version, checksum, bounds, a slot whose index or checksum is wrong) is refused, and the
//! device falls back to waiting for the frontend to renegotiate. Nothing in a journal is
//! trusted beyond that: recovered requests are validated like any request from the ring.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use xenpv_ring::blkif::{Blkif, BlkifRequest, BlkifX86_32};
use xenpv_ring::{cast, ring_entries, PAGE_SIZE};

/// The first bytes of every journal.
pub const MAGIC: [u8; 8] = *b"XPVBLKJ1";
/// The format version.
pub const VERSION: u32 = 1;
/// Most queues a journal describes.
pub const MAX_QUEUES: usize = 64;
/// Largest ring order (16 pages).
pub const MAX_RING_ORDER: u32 = 4;
/// Longest frontend path kept.
pub const MAX_PATH: usize = 256;

const REFS_PER_QUEUE: usize = 1 << MAX_RING_ORDER;
const HEADER_SIZE: usize = 2 * PAGE_SIZE;
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_FLAGS: usize = 12;
const OFF_SESSION: usize = 16;
const OFF_DOMID: usize = 24;
const OFF_ORDER: usize = 28;
const OFF_QUEUES: usize = 32;
const OFF_ENTRIES: usize = 36;
const OFF_INDIRECT: usize = 40;
const OFF_PATH_LEN: usize = 44;
const OFF_PATH: usize = 48;
const OFF_QDESC: usize = OFF_PATH + MAX_PATH;
/// Per queue: the port, then the ring grants.
const QDESC_SIZE: usize = 4 + 4 * REFS_PER_QUEUE;
const OFF_CHECKSUM: usize = HEADER_SIZE - 8;
const _: () = assert!(OFF_QDESC + MAX_QUEUES * QDESC_SIZE <= OFF_CHECKSUM);

const FLAG_X86_32: u32 = 1;
const FLAG_PERSISTENT: u32 = 2;

/// Queue section: `req_cons` in the first 64 bytes, then one slot per ring entry.
const QUEUE_HEAD: usize = 64;
const REQ_SIZE: usize = std::mem::size_of::<BlkifRequest>();
/// A slot: ring index (u32), 4 zero bytes, checksum (u64), the request.
const SLOT_SIZE: usize = 16 + REQ_SIZE;
const _: () = assert!(SLOT_SIZE == 128);

/// Why a journal could not be written or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be created, read, sized or mapped.
    #[error("journal {path}: {source}")]
    Io {
        /// The journal file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The journal is damaged or from another format: do not resume from it.
    #[error("journal {path} is not usable: {why}")]
    Corrupt {
        /// The journal file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The connection cannot be described by a journal.
    #[error("cannot journal this connection: {0}")]
    Unsupported(String),
}

type Result<T> = std::result::Result<T, Error>;

/// One queue of a connection: its ring grants and the frontend's event-channel port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueIdentity {
    /// The frontend's event-channel port.
    pub port: u32,
    /// The ring's grant references (`1 << order` of them).
    pub refs: Vec<u32>,
}

/// What identifies a connection, and what was negotiated on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Random; also in the backend's `xenpv-session` node, so that a journal left by an older
    /// connection never matches a newer one.
    pub session: u64,
    /// The frontend's domain.
    pub frontend_id: u16,
    /// The frontend's xenstore directory.
    pub frontend: String,
    /// `ring-page-order`.
    pub order: u32,
    /// The `x86_32-abi` protocol (else native).
    pub x86_32: bool,
    /// Persistent grants are in use.
    pub persistent: bool,
    /// `feature-max-indirect-segments` as advertised to this frontend.
    pub max_indirect_segments: u32,
    /// Every queue, in order.
    pub queues: Vec<QueueIdentity>,
}

impl Identity {
    /// Entries of each ring.
    pub fn ring_entries(&self) -> u32 {
        let len = PAGE_SIZE << self.order.min(MAX_RING_ORDER);
        if self.x86_32 {
            ring_entries::<BlkifX86_32>(len)
        } else {
            ring_entries::<Blkif>(len)
        }
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.order > MAX_RING_ORDER {
            return Err(format!("ring order {} > {MAX_RING_ORDER}", self.order));
        }
        if self.queues.is_empty() || self.queues.len() > MAX_QUEUES {
            return Err(format!("{} queues", self.queues.len()));
        }
        if self.frontend.len() > MAX_PATH {
            return Err(format!("frontend path longer than {MAX_PATH} bytes"));
        }
        let pages = 1usize << self.order;
        if self.queues.iter().any(|q| q.refs.len() != pages) {
            return Err(format!("a queue without exactly {pages} ring grants"));
        }
        Ok(())
    }

    fn queue_section(&self) -> usize {
        let bytes = QUEUE_HEAD + self.ring_entries() as usize * SLOT_SIZE;
        bytes.div_ceil(PAGE_SIZE) * PAGE_SIZE
    }

    fn file_size(&self) -> usize {
        HEADER_SIZE + self.queues.len() * self.queue_section()
    }

    fn header(&self) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_SIZE];
        let put =
            |h: &mut [u8], off: usize, v: u32| h[off..off + 4].copy_from_slice(&v.to_le_bytes());
        h[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC);
        put(&mut h, OFF_VERSION, VERSION);
        let flags = if self.x86_32 { FLAG_X86_32 } else { 0 }
            | if self.persistent { FLAG_PERSISTENT } else { 0 };
        put(&mut h, OFF_FLAGS, flags);
        h[OFF_SESSION..OFF_SESSION + 8].copy_from_slice(&self.session.to_le_bytes());
        put(&mut h, OFF_DOMID, u32::from(self.frontend_id));
        put(&mut h, OFF_ORDER, self.order);
        put(&mut h, OFF_QUEUES, self.queues.len() as u32);
        put(&mut h, OFF_ENTRIES, self.ring_entries());
        put(&mut h, OFF_INDIRECT, self.max_indirect_segments);
        put(&mut h, OFF_PATH_LEN, self.frontend.len() as u32);
        h[OFF_PATH..OFF_PATH + self.frontend.len()].copy_from_slice(self.frontend.as_bytes());
        for (i, q) in self.queues.iter().enumerate() {
            let base = OFF_QDESC + i * QDESC_SIZE;
            put(&mut h, base, q.port);
            for (j, r) in q.refs.iter().enumerate() {
                put(&mut h, base + 4 + 4 * j, *r);
            }
        }
        let sum = checksum(&h[..OFF_CHECKSUM]);
        h[OFF_CHECKSUM..].copy_from_slice(&sum.to_le_bytes());
        h
    }

    fn parse(bytes: &[u8]) -> std::result::Result<Identity, String> {
        let h = bytes
            .get(..HEADER_SIZE)
            .ok_or_else(|| format!("{} bytes: shorter than its header", bytes.len()))?;
        if h[OFF_MAGIC..OFF_MAGIC + 8] != MAGIC {
            return Err("not a blkback journal (bad magic)".into());
        }
        let sum = u64::from_le_bytes(h[OFF_CHECKSUM..].try_into().unwrap_or_default());
        if sum != checksum(&h[..OFF_CHECKSUM]) {
            return Err("header checksum mismatch".into());
        }
        let word = |off: usize| u32::from_le_bytes([h[off], h[off + 1], h[off + 2], h[off + 3]]);
        if word(OFF_VERSION) != VERSION {
            return Err(format!(
                "version {} (this daemon reads {VERSION})",
                word(OFF_VERSION)
            ));
        }
        let flags = word(OFF_FLAGS);
        if flags & !(FLAG_X86_32 | FLAG_PERSISTENT) != 0 {
            return Err(format!("unknown flags {flags:#x}"));
        }
        let frontend_id =
            u16::try_from(word(OFF_DOMID)).map_err(|_| "frontend domid out of range")?;
        let order = word(OFF_ORDER);
        if order > MAX_RING_ORDER {
            return Err(format!("ring order {order}"));
        }
        let nq = word(OFF_QUEUES) as usize;
        if nq == 0 || nq > MAX_QUEUES {
            return Err(format!("{nq} queues"));
        }
        let path_len = word(OFF_PATH_LEN) as usize;
        if path_len > MAX_PATH {
            return Err(format!("frontend path of {path_len} bytes"));
        }
        let frontend = std::str::from_utf8(&h[OFF_PATH..OFF_PATH + path_len])
            .map_err(|_| "frontend path is not UTF-8")?
            .to_string();
        let mut queues = Vec::with_capacity(nq);
        for i in 0..nq {
            let base = OFF_QDESC + i * QDESC_SIZE;
            queues.push(QueueIdentity {
                port: word(base),
                refs: (0..1usize << order)
                    .map(|j| word(base + 4 + 4 * j))
                    .collect(),
            });
        }
        let id = Identity {
            session: u64::from_le_bytes(
                h[OFF_SESSION..OFF_SESSION + 8]
                    .try_into()
                    .unwrap_or_default(),
            ),
            frontend_id,
            frontend,
            order,
            x86_32: flags & FLAG_X86_32 != 0,
            persistent: flags & FLAG_PERSISTENT != 0,
            max_indirect_segments: word(OFF_INDIRECT),
            queues,
        };
        if word(OFF_ENTRIES) != id.ring_entries() {
            return Err(format!(
                "{} ring entries (order {order} has {})",
                word(OFF_ENTRIES),
                id.ring_entries()
            ));
        }
        if bytes.len() != id.file_size() {
            return Err(format!(
                "{} bytes, expected {}",
                bytes.len(),
                id.file_size()
            ));
        }
        Ok(id)
    }
}

/// FNV-1a, 64 bits: catches damage, not malice (a journal writer is root anyway).
fn checksum(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn slot_checksum(idx: u32, req: &[u8; REQ_SIZE]) -> u64 {
    let mut buf = [0u8; 4 + REQ_SIZE];
    buf[..4].copy_from_slice(&idx.to_le_bytes());
    buf[4..].copy_from_slice(req);
    checksum(&buf)
}

/// A random session id (std's hasher keys are seeded from the OS's random source).
pub fn new_session() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}

/// The file of the device whose backend directory is `be`, in `dir`.
pub fn path_for(dir: &Path, be: &str) -> PathBuf {
    let mut parts = be.rsplit('/');
    let dev = parts.next().unwrap_or("");
    let dom = parts.next().unwrap_or("");
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect()
    };
    dir.join(format!("vbd-{}-{}.journal", clean(dom), clean(dev)))
}

/// The shared mapping of a journal file.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory of this process (a shared file mapping); every access
// goes through raw-pointer reads and writes at offsets checked against `len`, and each queue
// section is written by one thread only.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &std::fs::File, len: usize, path: &Path) -> Result<Mapping> {
        // SAFETY: mapping a file we opened read-write, `len` bytes (its size, set by the
        // caller), at an address the kernel chooses; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Io {
                path: path.display().to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| Error::Io {
            path: path.display().to_string(),
            source: std::io::Error::other("mmap returned a null mapping"),
        })?;
        Ok(Mapping { ptr, len })
    }

    /// Writes `bytes` (a whole number of 8-byte words) at an 8-aligned `off`, a word at a
    /// time (volatile: the stores happen, in program order with the other journal stores,
    /// even though this process never reads them back). Out-of-range writes are dropped.
    fn write(&self, off: usize, bytes: &[u8]) {
        let in_range = matches!(off.checked_add(bytes.len()), Some(end) if end <= self.len);
        if !in_range || off % 8 != 0 || bytes.len() % 8 != 0 {
            return;
        }
        for (i, w) in bytes.chunks_exact(8).enumerate() {
            let word = u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
            // SAFETY: `off + 8 * i + 8 <= off + bytes.len() <= len`: inside the mapping, which
            // lives as long as `self`; 8-aligned because `off` is and the mapping is
            // page-aligned.
            unsafe {
                self.ptr
                    .as_ptr()
                    .add(off + 8 * i)
                    .cast::<u64>()
                    .write_volatile(word)
            };
        }
    }

    /// Writes a `u32` at a 4-aligned `off` with one store.
    fn write_u32(&self, off: usize, v: u32) {
        let in_range = matches!(off.checked_add(4), Some(end) if end <= self.len);
        if !in_range || off % 4 != 0 {
            return;
        }
        // SAFETY: inside the mapping (checked) and 4-aligned (the mapping is page-aligned).
        unsafe {
            self.ptr
                .as_ptr()
                .add(off)
                .cast::<u32>()
                .write_volatile(v.to_le())
        };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `new`; nothing refers into it once the
        // last owner drops it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A device's journal, open for writing.
pub struct Journal {
    map: Arc<Mapping>,
    path: PathBuf,
    identity: Identity,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("identity", &self.identity)
            .finish()
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Journal {
    /// Creates (or replaces) the journal at `path` for a new connection: a complete header
    /// and empty queues, renamed into place, then mapped.
    pub fn create(path: &Path, identity: &Identity) -> Result<Journal> {
        identity.check().map_err(Error::Unsupported)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            f.write_all(&identity.header()).map_err(io_err(&tmp))?;
            f.set_len(identity.file_size() as u64)
                .map_err(io_err(&tmp))?;
        }
        std::fs::rename(&tmp, path).map_err(io_err(path))?;
        Self::open(path, identity.clone())
    }

    /// Maps the journal at `path`, recovered as [`Recovered`], to go on writing it.
    pub fn reopen(path: &Path, recovered: &Recovered) -> Result<Journal> {
        Self::open(path, recovered.identity.clone())
    }

    fn open(path: &Path, identity: Identity) -> Result<Journal> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        let len = f.metadata().map_err(io_err(path))?.len();
        if len != identity.file_size() as u64 {
            return Err(Error::Corrupt {
                path: path.display().to_string(),
                why: format!("{len} bytes, expected {}", identity.file_size()),
            });
        }
        let map = Arc::new(Mapping::new(&f, identity.file_size(), path)?);
        Ok(Journal {
            map,
            path: path.to_path_buf(),
            identity,
        })
    }

    /// What the journal describes.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The writer of queue `q` (one per queue thread), if the queue exists.
    pub fn queue(&self, q: usize) -> Option<QueueJournal> {
        (q < self.identity.queues.len()).then(|| QueueJournal {
            map: self.map.clone(),
            base: HEADER_SIZE + q * self.identity.queue_section(),
            entries: self.identity.ring_entries(),
        })
    }

    /// Deletes the journal file: the connection ended, nothing is left to resume.
    pub fn remove(path: &Path) {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove the journal {}: {e}", path.display()),
        }
    }

    /// Reads and checks the journal at `path` (a copy in private memory: the file is read once).
    pub fn load(path: &Path) -> Result<Recovered> {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let corrupt = |why: String| Error::Corrupt {
            path: path.display().to_string(),
            why,
        };
        let identity = Identity::parse(&bytes).map_err(corrupt)?;
        let section = identity.queue_section();
        let entries = identity.ring_entries() as usize;
        let mut queues = Vec::with_capacity(identity.queues.len());
        for q in 0..identity.queues.len() {
            let base = HEADER_SIZE + q * section;
            let s = &bytes[base..base + section];
            let req_cons = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            let mut slots = Vec::with_capacity(entries);
            for e in 0..entries {
                let off = QUEUE_HEAD + e * SLOT_SIZE;
                let slot = &s[off..off + SLOT_SIZE];
                let idx = u32::from_le_bytes([slot[0], slot[1], slot[2], slot[3]]);
                let sum = u64::from_le_bytes(slot[8..16].try_into().unwrap_or_default());
                let mut req = [0u8; REQ_SIZE];
                req.copy_from_slice(&slot[16..]);
                slots.push((sum == slot_checksum(idx, &req)).then_some((idx, req)));
            }
            queues.push(RecoveredQueue { req_cons, slots });
        }
        Ok(Recovered { identity, queues })
    }
}

/// The writer of one queue's part of the journal. See the module documentation for the order
/// of writes that makes it crash-safe.
pub struct QueueJournal {
    map: Arc<Mapping>,
    base: usize,
    entries: u32,
}

impl std::fmt::Debug for QueueJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueJournal")
            .field("base", &self.base)
            .field("entries", &self.entries)
            .finish()
    }
}

impl QueueJournal {
    /// Entries of the ring (slots of the journal).
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Keeps the copy of the request consumed at ring index `idx` (native layout). It counts
    /// only once [`commit`](Self::commit) moved `req_cons` past it.
    pub fn record(&mut self, idx: u32, req: &BlkifRequest) {
        let Some(slot) = idx.checked_rem(self.entries) else {
            return;
        };
        let bytes: [u8; REQ_SIZE] = cast(req);
        let mut buf = [0u8; SLOT_SIZE];
        buf[..4].copy_from_slice(&idx.to_le_bytes());
        buf[8..16].copy_from_slice(&slot_checksum(idx, &bytes).to_le_bytes());
        buf[16..].copy_from_slice(&bytes);
        self.map
            .write(self.base + QUEUE_HEAD + slot as usize * SLOT_SIZE, &buf);
    }

    /// Records that every request before ring index `req_cons` was consumed and has its copy
    /// in the journal. Call it before writing any response for those requests into the ring.
    pub fn commit(&mut self, req_cons: u32) {
        // The copies are stored before the index that makes them count.
        fence(Ordering::Release);
        self.map.write_u32(self.base, req_cons);
        fence(Ordering::Release);
    }
}

/// A journal read back at start-up.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// The connection it describes.
    pub identity: Identity,
    /// Per queue.
    pub queues: Vec<RecoveredQueue>,
}

/// One queue of a recovered journal.
#[derive(Debug, Clone)]
pub struct RecoveredQueue {
    /// The saved consumer index.
    pub req_cons: u32,
    /// Per slot: the ring index and request it holds, if its checksum is right.
    slots: Vec<Option<(u32, [u8; REQ_SIZE])>>,
}

impl RecoveredQueue {
    /// The requests consumed and not answered, given the ring's shared `rsp_prod`: the copies
    /// of ring indexes `[rsp_prod, req_cons)`, in ring order. Fails if that is more than a
    /// ring, or if any of them is missing or damaged.
    pub fn pending(&self, rsp_prod: u32) -> std::result::Result<Vec<BlkifRequest>, String> {
        let n = self.req_cons.wrapping_sub(rsp_prod);
        let entries = self.slots.len() as u32;
        if entries == 0 || n > entries {
            return Err(format!(
                "req_cons {} is not within a ring ({entries}) of rsp_prod {rsp_prod}",
                self.req_cons
            ));
        }
        (0..n)
            .map(|k| {
                let idx = rsp_prod.wrapping_add(k);
                match self.slots.get((idx % entries) as usize) {
                    Some(Some((i, req))) if *i == idx => Ok(cast::<[u8; REQ_SIZE], _>(req)),
                    _ => Err(format!("no intact copy of the request at ring index {idx}")),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xenpv_ring::blkif::{BlkifRequestSegment, OP_READ, OP_WRITE};

    fn identity(queues: usize, order: u32) -> Identity {
        Identity {
            session: 0x1234_5678_9abc_def0,
            frontend_id: 7,
            frontend: "/local/domain/7/device/vbd/51712".into(),
            order,
            x86_32: false,
            persistent: true,
            max_indirect_segments: 256,
            queues: (0..queues)
                .map(|q| QueueIdentity {
                    port: 10 + q as u32,
                    refs: (0..1u32 << order).map(|r| 100 * q as u32 + r).collect(),
                })
                .collect(),
        }
    }

    fn req(id: u64) -> BlkifRequest {
        let mut r = BlkifRequest::new(if id % 2 == 0 { OP_READ } else { OP_WRITE }, 0, id, id * 8);
        r.nr_segments = 1;
        r.seg[0] = BlkifRequestSegment::new(id as u32, 0, 7);
        r
    }

    #[test]
    fn a_journal_round_trips_and_keeps_what_a_crash_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(dir.path(), "/local/domain/0/backend/vbd/7/51712");
        assert!(path.ends_with("vbd-7-51712.journal"));
        let id = identity(2, 1);
        let j = Journal::create(&path, &id).unwrap();
        assert_eq!(j.identity().ring_entries(), 64);
        let mut q1 = j.queue(1).unwrap();
        assert!(j.queue(2).is_none());
        // Indexes across the 2^32 wrap: 6 recorded, 5 committed, the 6th is a chunk in
        // progress when the process dies.
        let start = u32::MAX - 2;
        for k in 0..6u32 {
            q1.record(start.wrapping_add(k), &req(u64::from(k)));
        }
        q1.commit(start.wrapping_add(5));
        drop(j);
        let r = Journal::load(&path).unwrap();
        assert_eq!(r.identity, id);
        assert_eq!(r.queues[0].req_cons, 0);
        assert_eq!(r.queues[0].pending(0).unwrap(), []);
        assert_eq!(r.queues[1].req_cons, start.wrapping_add(5));
        // Two were answered and published before the crash: three remain.
        let pending = r.queues[1].pending(start.wrapping_add(2)).unwrap();
        assert_eq!(pending, [req(2), req(3), req(4)]);
        // A rsp_prod behind what was recorded, or more than a ring behind, is refused.
        assert!(r.queues[1].pending(start.wrapping_sub(1)).is_err());
        assert!(r.queues[1].pending(start.wrapping_sub(100)).is_err());
        // Going on writing the same journal after a restart.
        let j = Journal::reopen(&path, &r).unwrap();
        let mut q1 = j.queue(1).unwrap();
        q1.record(start.wrapping_add(5), &req(5));
        q1.commit(start.wrapping_add(6));
        let r = Journal::load(&path).unwrap();
        assert_eq!(
            r.queues[1].pending(start.wrapping_add(4)).unwrap(),
            [req(4), req(5)]
        );
        Journal::remove(&path);
        assert!(Journal::load(&path).is_err());
    }

    #[test]
    fn damaged_journals_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let j = Journal::create(&path, &identity(1, 0)).unwrap();
        let mut q = j.queue(0).unwrap();
        for k in 0..4u32 {
            q.record(k, &req(u64::from(k)));
        }
        q.commit(4);
        drop(j);
        let good = std::fs::read(&path).unwrap();
        let refused = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            matches!(Journal::load(&path), Err(Error::Corrupt { .. }))
        };
        assert!(!refused(&good));
        // Any flipped header byte (the checksum covers it), a truncated or extended file.
        for off in [
            0,
            OFF_VERSION,
            OFF_SESSION + 3,
            OFF_PATH,
            OFF_QDESC,
            OFF_CHECKSUM,
        ] {
            let mut bad = good.clone();
            bad[off] ^= 0x40;
            assert!(refused(&bad), "byte {off} flipped");
        }
        assert!(refused(&good[..good.len() - 1]));
        assert!(refused(&good[..100]));
        let mut longer = good.clone();
        longer.push(0);
        assert!(refused(&longer));
        // A damaged slot inside the window: that queue cannot be resumed.
        let mut bad = good.clone();
        bad[HEADER_SIZE + QUEUE_HEAD + 2 * SLOT_SIZE + 40] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let r = Journal::load(&path).unwrap();
        assert!(r.queues[0].pending(0).is_err());
        assert_eq!(r.queues[0].pending(3).unwrap(), [req(3)]);
        // A header that is consistent (checksum recomputed) but describes the impossible.
        let mut h = identity(1, 0).header();
        h[OFF_ORDER] = 9;
        let sum = checksum(&h[..OFF_CHECKSUM]);
        h[OFF_CHECKSUM..].copy_from_slice(&sum.to_le_bytes());
        let mut bad = good.clone();
        bad[..HEADER_SIZE].copy_from_slice(&h);
        assert!(refused(&bad));
        // Connections a journal cannot describe.
        let mut id = identity(1, 0);
        id.queues[0].refs.push(1);
        assert!(matches!(
            Journal::create(&path, &id),
            Err(Error::Unsupported(_))
        ));
        assert!(Journal::create(&path, &identity(65, 0)).is_err());
    }
}
