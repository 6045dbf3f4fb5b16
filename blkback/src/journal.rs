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
//! * per queue: the queue's `req_cons`, and a pool of one slot per ring entry, each holding the
//!   private copy of a request consumed from the ring (the copy-once buffer, in the native
//!   layout, tagged with its ring index and a checksum) and its *mark*: free, in flight, or
//!   answered at response index `k`.
//!
//! # Why a pool of slots, and marks (format version 2)
//! A queue answers each request as soon as its I/O completes, out of ring order (as Linux's
//! blkback does; frontends match responses by id). The response at ring index `k` then
//! answers *some* request, not the one consumed at `k`, so the unanswered requests are no
//! longer "ring indexes `[rsp_prod, req_cons)`" (format version 1): each slot says itself
//! whether its request was answered, and where. A slot is not tied to a ring index (a request
//! takes any free slot): a slow request keeps its slot while the frontend goes on through the
//! ring, so it never holds back requests a ring further on (with slot = index mod entries it
//! would, and with a frontend that keeps the ring full that is as bad as answering in order).
//!
//! # Crash safety
//! A queue's stores into its section, each a plain or atomic store into the mapping, in this
//! order (the queue never consumes while a response it produced is unpublished, so a slot that
//! becomes free is never needed again):
//! 1. taking a request: into a free slot ([`QueueJournal::record`]) the mark "free" again, the
//!    copy, its ring index and checksum, then the mark "in flight";
//! 2. the new `req_cons`, covering the requests taken ([`QueueJournal::commit`]);
//! 3. only then their I/O; answering one: its response into the ring at `k = rsp_prod_pvt`,
//!    then the mark "answered at `k`" ([`QueueJournal::answered`], one aligned 8-byte store);
//! 4. publication of `rsp_prod` (after every batch of answers, before taking again);
//! 5. the mark "free" on each slot whose response was published ([`QueueJournal::release`]).
//!
//! A restarted backend reads the shared `rsp_prod` `P` and the journal's `req_cons` `C`: the
//! requests consumed and not published are those of the slots in flight with an index before
//! `C`, and of the slots answered at some `k ≥ P` (written, not published); there are exactly
//! `C - P` of them (each published response answers one consumed request), which it checks.
//! Whatever instant the process died at:
//! * during 1, or after 1 and before 2: the slot is still free, or in flight with an index at
//!   or after `C`: not consumed; the request is still in the ring (no response was written over
//!   it: responses are written only at indexes before `req_cons`), and the next instance
//!   consumes it from there;
//! * after 2: the copy is complete (written before `req_cons`); the next instance executes it
//!   again — reads, writes, flushes and discards are idempotent — and answers it, also if its
//!   response was written but not published (answered at `k ≥ P`);
//! * after 4: the slot says "answered at `k`" with `k < P` (or "free", after 5): done.
//!
//! Before serving, the next instance resets every slot ([`QueueJournal::reset`]): those it
//! answers again "in flight", the others "free", so that its own records start from step 1 of
//! a free slot and no stale mark outlives the instance that wrote it. Dying during the reset
//! changes nothing (the reset changes no classification).
//!
//! Indexes are compared with wrapping arithmetic, which needs bounds: a queue never consumes
//! more than [`MAX_AGE`] indexes past its oldest unanswered request (so "in flight, before `C`"
//! and "recorded, at or after `C`" never meet), and a slot answered and not yet free was
//! answered at most a ring of responses before `P` (the last batch).
//!
//! The header is written into a temporary file that is then renamed over the journal, so a
//! journal is either the old one or a complete new one. A journal that fails any check (magic,
//! version, checksum, bounds, a slot whose mark, index or checksum is impossible, a count that
//! does not match the ring) is refused, and the device falls back to waiting for the frontend
//! to renegotiate. Nothing in a journal is trusted beyond that: recovered requests are
//! validated like any request from the ring.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

use xenpv_ring::blkif::{Blkif, BlkifRequest, BlkifX86_32};
use xenpv_ring::{cast, ring_entries, PAGE_SIZE};

/// The first bytes of every journal.
pub const MAGIC: [u8; 8] = *b"XPVBLKJ2";
/// The first bytes of a journal of format version 1 (requests answered in ring order), which
/// this version refuses: its slots say nothing of requests answered out of order.
pub const MAGIC_V1: [u8; 8] = *b"XPVBLKJ1";
/// The format version.
pub const VERSION: u32 = 2;
/// Most ring indexes a queue consumes beyond its oldest unanswered request: for every request
/// consumed and not answered, `req_cons - index ≤ MAX_AGE` (wrapping). Far beyond any ring
/// (512 entries at most), far below 2^32, so that wrapping comparisons of ring indexes in the
/// journal are never ambiguous. A queue whose oldest request is this far behind stops taking
/// requests until it completes.
pub const MAX_AGE: u32 = 1 << 31;
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
/// A slot: the mark (u64), the ring index (u32), the checksum (u32), the request.
const SLOT_SIZE: usize = 16 + REQ_SIZE;
const _: () = assert!(SLOT_SIZE == 128);
const SLOT_MARK: usize = 0;
const SLOT_INDEX: usize = 8;
const SLOT_SUM: usize = 12;
const SLOT_REQ: usize = 16;
const _: () = assert!((QUEUE_HEAD + SLOT_MARK) % 8 == 0 && SLOT_SIZE % 8 == 0);

/// The low 32 bits of a mark: what the slot holds. The high 32 bits are the response index of
/// an answered request, else zero.
const STATE_FREE: u32 = 0;
const STATE_IN_FLIGHT: u32 = 1;
const STATE_ANSWERED: u32 = 2;

fn mark(state: u32, rsp_idx: u32) -> u64 {
    u64::from(state) | u64::from(rsp_idx) << 32
}

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
        if h[OFF_MAGIC..OFF_MAGIC + 8] == MAGIC_V1 {
            return Err(format!(
                "format version 1 (an older xenpv-blkback, answering in ring order); this one \
                 reads version {VERSION} only"
            ));
        }
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

/// The checksum of a slot: FNV-1a 64 taken a little-endian 64-bit word at a time (the ring
/// index as one word, then the request's 14 words), folded to 32 bits. Word-wise because it
/// runs for every request taken (byte-wise it was 5% of a queue thread's CPU on tmpfs).
fn slot_checksum(idx: u32, req: &[u8; REQ_SIZE]) -> u32 {
    const _: () = assert!(REQ_SIZE % 8 == 0);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |w: u64| {
        h ^= w;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    mix(u64::from(idx));
    for w in req.chunks_exact(8) {
        mix(u64::from_le_bytes([
            w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7],
        ]));
    }
    (h ^ (h >> 32)) as u32
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

    /// Stores the `u64` `v` at an 8-aligned `off` with one atomic store, ordered after every
    /// store before it (`Release`). Out-of-range or misaligned stores are dropped.
    fn store_u64(&self, off: usize, v: u64) {
        let in_range = matches!(off.checked_add(8), Some(end) if end <= self.len);
        if !in_range || off % 8 != 0 {
            return;
        }
        // SAFETY: inside the mapping (checked), which lives as long as `self`, and 8-aligned
        // (`off` is, and the mapping is page-aligned): a valid `AtomicU64`. Only this queue's
        // thread writes this word; nothing in this process reads it.
        let word = unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU64>() };
        word.store(v.to_le(), Ordering::Release);
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
            // In bounds: `parse` checked the file's size against the identity.
            let base = HEADER_SIZE + q * section;
            let s = &bytes[base..base + section];
            let req_cons = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            let mut slots = Vec::with_capacity(entries);
            for e in 0..entries {
                let off = QUEUE_HEAD + e * SLOT_SIZE;
                let slot = &s[off..off + SLOT_SIZE];
                let word = |at: usize| {
                    u32::from_le_bytes([slot[at], slot[at + 1], slot[at + 2], slot[at + 3]])
                };
                let mut req = [0u8; REQ_SIZE];
                req.copy_from_slice(&slot[SLOT_REQ..]);
                let idx = word(SLOT_INDEX);
                slots.push(SavedSlot {
                    state: word(SLOT_MARK),
                    rsp_idx: word(SLOT_MARK + 4),
                    idx,
                    intact: word(SLOT_SUM) == slot_checksum(idx, &req),
                    req,
                });
            }
            queues.push(RecoveredQueue { req_cons, slots });
        }
        Ok(Recovered { identity, queues })
    }
}

/// The writer of one queue's part of the journal. See the module documentation for the order
/// of writes that makes it crash-safe. Slots are numbered `0..entries()`; the caller allocates
/// them (a slot is reused only after [`release`](Self::release)).
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

    /// The offset of `slot` in the file, if it exists.
    fn slot(&self, slot: u32) -> Option<usize> {
        (slot < self.entries).then(|| self.base + QUEUE_HEAD + slot as usize * SLOT_SIZE)
    }

    /// Keeps, in the free `slot`, the copy of the request consumed at ring index `idx` (native
    /// layout), marked in flight. It counts only once [`commit`](Self::commit) moved
    /// `req_cons` past `idx`.
    pub fn record(&mut self, slot: u32, idx: u32, req: &BlkifRequest) {
        let Some(off) = self.slot(slot) else {
            return;
        };
        // Free first (it is, unless the caller reuses a slot it never released): the copy is
        // never half-written under a mark that makes it count.
        self.map.store_u64(off + SLOT_MARK, mark(STATE_FREE, 0));
        let bytes: [u8; REQ_SIZE] = cast(req);
        let mut buf = [0u8; SLOT_SIZE - SLOT_INDEX];
        buf[..4].copy_from_slice(&idx.to_le_bytes());
        buf[4..8].copy_from_slice(&slot_checksum(idx, &bytes).to_le_bytes());
        buf[8..].copy_from_slice(&bytes);
        self.map.write(off + SLOT_INDEX, &buf);
        // The copy before the mark that makes it a request in flight.
        fence(Ordering::Release);
        self.map
            .store_u64(off + SLOT_MARK, mark(STATE_IN_FLIGHT, 0));
    }

    /// Records that every request before ring index `req_cons` was consumed and has its copy
    /// in the journal. Call it before any of their I/O, and before writing any response for
    /// them into the ring.
    pub fn commit(&mut self, req_cons: u32) {
        // The copies are stored before the index that makes them count.
        fence(Ordering::Release);
        self.map.write_u32(self.base, req_cons);
        fence(Ordering::Release);
    }

    /// Marks the request of `slot` answered by the response at ring index `rsp_idx`, which the
    /// caller has written into the ring and publishes (`rsp_prod`) only after this.
    pub fn answered(&mut self, slot: u32, rsp_idx: u32) {
        if let Some(off) = self.slot(slot) {
            self.map
                .store_u64(off + SLOT_MARK, mark(STATE_ANSWERED, rsp_idx));
        }
    }

    /// Frees `slot`: the response to its request was published (call it after `rsp_prod`
    /// covers the response).
    pub fn release(&mut self, slot: u32) {
        if let Some(off) = self.slot(slot) {
            self.map.store_u64(off + SLOT_MARK, mark(STATE_FREE, 0));
        }
    }

    /// Starts the queue of a restarted backend: the slots of `pending` (the requests it answers
    /// again, [`RecoveredQueue::pending`]) in flight, every other slot free.
    pub fn reset(&mut self, pending: &[Pending]) {
        for slot in 0..self.entries {
            if let Some(off) = self.slot(slot) {
                let state = if pending.iter().any(|p| p.slot == slot) {
                    STATE_IN_FLIGHT
                } else {
                    STATE_FREE
                };
                self.map.store_u64(off + SLOT_MARK, mark(state, 0));
            }
        }
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

/// A slot of a journal read back.
#[derive(Debug, Clone)]
struct SavedSlot {
    state: u32,
    rsp_idx: u32,
    idx: u32,
    /// The checksum matches the index and the request.
    intact: bool,
    req: [u8; REQ_SIZE],
}

/// One queue of a recovered journal.
#[derive(Debug, Clone)]
pub struct RecoveredQueue {
    /// The saved consumer index.
    pub req_cons: u32,
    slots: Vec<SavedSlot>,
}

/// A request a previous instance consumed and did not answer (or answered without publishing
/// the response), to be executed and answered again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// Its journal slot (kept until the new response is published).
    pub slot: u32,
    /// The ring index it was consumed at.
    pub idx: u32,
    /// The request, native layout, as copied out of the ring (validate it again).
    pub request: BlkifRequest,
}

impl RecoveredQueue {
    /// How many slots are free.
    #[cfg(test)]
    pub(crate) fn free_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.state == STATE_FREE).count()
    }

    /// The requests consumed and not answered, given the ring's shared `rsp_prod`, in the
    /// order they were consumed (ring order: the order a new execution must keep for
    /// overlapping writes). Fails unless the journal is consistent with `rsp_prod`: a slot
    /// with an unknown mark, a damaged copy, an index or a response index out of bounds, a
    /// ring index twice, or not exactly `req_cons - rsp_prod` of them.
    pub fn pending(&self, rsp_prod: u32) -> std::result::Result<Vec<Pending>, String> {
        let req_cons = self.req_cons;
        let unpublished = req_cons.wrapping_sub(rsp_prod);
        let entries = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        if entries == 0 || unpublished > entries {
            return Err(format!(
                "req_cons {req_cons} is not within a ring ({entries}) of rsp_prod {rsp_prod}"
            ));
        }
        // How far before `req_cons` a ring index is: 1..=MAX_AGE for a consumed request.
        let age = |idx: u32| req_cons.wrapping_sub(idx);
        let consumed = |idx: u32| (1..=MAX_AGE).contains(&age(idx));
        let mut pending = Vec::new();
        for (slot, s) in (0u32..).zip(&self.slots) {
            let redo = match s.state {
                STATE_FREE => false,
                STATE_IN_FLIGHT | STATE_ANSWERED if !s.intact => {
                    return Err(format!("slot {slot}: damaged copy (checksum mismatch)"));
                }
                // Consumed (committed): not answered. Recorded at or after `req_cons`: its
                // `req_cons` never made it count, the request is still in the ring.
                STATE_IN_FLIGHT if consumed(s.idx) => true,
                STATE_IN_FLIGHT if s.idx.wrapping_sub(req_cons) < entries => false,
                STATE_IN_FLIGHT => {
                    return Err(format!(
                        "slot {slot}: ring index {} in flight, out of bounds of req_cons \
                         {req_cons}",
                        s.idx
                    ));
                }
                STATE_ANSWERED if !consumed(s.idx) => {
                    return Err(format!(
                        "slot {slot}: ring index {} answered but not consumed (req_cons \
                         {req_cons})",
                        s.idx
                    ));
                }
                // Written at or after `rsp_prod`: not published.
                STATE_ANSWERED if s.rsp_idx.wrapping_sub(rsp_prod) < unpublished => true,
                // Published, in the last batch (not freed yet).
                STATE_ANSWERED if (1..=entries).contains(&rsp_prod.wrapping_sub(s.rsp_idx)) => {
                    false
                }
                STATE_ANSWERED => {
                    return Err(format!(
                        "slot {slot}: answered at {}, out of bounds of rsp_prod {rsp_prod} and \
                         req_cons {req_cons}",
                        s.rsp_idx
                    ));
                }
                other => return Err(format!("slot {slot}: unknown mark {other:#x}")),
            };
            if redo {
                pending.push(Pending {
                    slot,
                    idx: s.idx,
                    request: cast::<[u8; REQ_SIZE], _>(&s.req),
                });
            }
        }
        if pending.len() != unpublished as usize {
            return Err(format!(
                "{} requests consumed and unanswered in the journal, but the ring has {} \
                 (rsp_prod {rsp_prod}, req_cons {req_cons})",
                pending.len(),
                unpublished
            ));
        }
        // Oldest first.
        pending.sort_by_key(|p| std::cmp::Reverse(age(p.idx)));
        if pending.windows(2).any(|w| w[0].idx == w[1].idx) {
            return Err("a ring index in two slots".into());
        }
        Ok(pending)
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

    /// The ring indexes of the requests `pending` returns, in its order.
    fn indexes(q: &RecoveredQueue, rsp_prod: u32) -> Vec<u32> {
        q.pending(rsp_prod)
            .unwrap()
            .iter()
            .map(|p| {
                assert_eq!(p.request, req(u64::from(p.idx)), "the copy of {}", p.idx);
                p.idx
            })
            .collect()
    }

    /// Offset in the file of queue `q`'s slot `slot`, for a journal of `identity(_, 0)`.
    fn slot_offset(id: &Identity, q: usize, slot: u32) -> usize {
        HEADER_SIZE + q * id.queue_section() + QUEUE_HEAD + slot as usize * SLOT_SIZE
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
            let idx = start.wrapping_add(k);
            q1.record(k, idx, &req(u64::from(idx)));
        }
        q1.commit(start.wrapping_add(5));
        // Two answered in order and published (then freed, or not yet).
        q1.answered(0, start);
        q1.answered(1, start.wrapping_add(1));
        q1.release(0);
        drop(j);
        let r = Journal::load(&path).unwrap();
        assert_eq!(r.identity, id);
        assert_eq!(r.queues[0].req_cons, 0);
        assert_eq!(r.queues[0].pending(0).unwrap(), []);
        assert_eq!(r.queues[1].req_cons, start.wrapping_add(5));
        let p = r.queues[1].pending(start.wrapping_add(2)).unwrap();
        assert_eq!(
            p.iter().map(|p| (p.slot, p.idx)).collect::<Vec<_>>(),
            [
                (2, start.wrapping_add(2)),
                (3, start.wrapping_add(3)),
                (4, start.wrapping_add(4))
            ]
        );
        // One response fewer published fits too (the second one then was not): four.
        assert_eq!(r.queues[1].pending(start.wrapping_add(1)).unwrap().len(), 4);
        // rsp_prod anywhere else does not fit the slots (nor more than a ring behind).
        for rsp_prod in [0, 3, 4, 5, 100].map(|d| start.wrapping_add(d)) {
            assert!(r.queues[1].pending(rsp_prod).is_err(), "{rsp_prod}");
        }
        assert!(r.queues[1].pending(start.wrapping_sub(100)).is_err());
        // Going on writing the same journal after a restart: the reset keeps the three in
        // flight and frees the rest; then the restarted instance takes one more.
        let j = Journal::reopen(&path, &r).unwrap();
        let mut q1 = j.queue(1).unwrap();
        q1.reset(&p);
        let r = Journal::load(&path).unwrap();
        assert_eq!(r.queues[1].pending(start.wrapping_add(2)).unwrap(), p);
        assert!(r.queues[1].slots[1].state == STATE_FREE && r.queues[1].slots[5].state == 0);
        let idx = start.wrapping_add(5);
        q1.record(1, idx, &req(u64::from(idx)));
        q1.commit(start.wrapping_add(6));
        let r = Journal::load(&path).unwrap();
        assert_eq!(
            indexes(&r.queues[1], start.wrapping_add(2)),
            [2, 3, 4, 5].map(|d| start.wrapping_add(d))
        );
        Journal::remove(&path);
        assert!(Journal::load(&path).is_err());
    }

    /// Requests answered out of ring order, and a process that dies at each instant between
    /// two journal stores: the next instance finds exactly the requests consumed and not
    /// published.
    #[test]
    fn out_of_order_answers_resume_exactly_what_was_not_published() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let id = identity(1, 0);
        let j = Journal::create(&path, &id).unwrap();
        let mut q = j.queue(0).unwrap();
        let s = u32::MAX - 3; // across the wrap again
        let at = |d: u32| s.wrapping_add(d);
        let pending_at = |rsp_prod: u32| {
            let r = Journal::load(&path).unwrap();
            let got = indexes(&r.queues[0], rsp_prod);
            got.iter().map(|i| i.wrapping_sub(s)).collect::<Vec<_>>()
        };
        // Ring indexes s..s+6 in slots that are not their ring index modulo 32.
        let slots = [5u32, 3, 9, 0, 1, 2];
        for (d, &slot) in (0u32..).zip(&slots) {
            q.record(slot, at(d), &req(u64::from(at(d))));
        }
        q.commit(at(6));
        assert_eq!(pending_at(at(0)), [0, 1, 2, 3, 4, 5]);
        // s+3 completes first, then s+1: answered at response indexes s and s+1.
        q.answered(slots[3], at(0));
        q.answered(slots[1], at(1));
        // Dead between the marks and the publication: all six again.
        assert_eq!(pending_at(at(0)), [0, 1, 2, 3, 4, 5]);
        // Published (rsp_prod = s+2), dead before the slots are freed.
        assert_eq!(pending_at(at(2)), [0, 2, 4, 5]);
        q.release(slots[3]);
        // Dead between the two releases, and after them.
        assert_eq!(pending_at(at(2)), [0, 2, 4, 5]);
        q.release(slots[1]);
        assert_eq!(pending_at(at(2)), [0, 2, 4, 5]);
        // s+5 answered at s+2, not published: still to be done.
        q.answered(slots[5], at(2));
        assert_eq!(pending_at(at(2)), [0, 2, 4, 5]);
        assert_eq!(pending_at(at(3)), [0, 2, 4]);
        q.release(slots[5]);
        // The next record, into a freed slot, before and after its commit.
        q.record(slots[3], at(6), &req(u64::from(at(6))));
        assert_eq!(pending_at(at(3)), [0, 2, 4]);
        q.commit(at(7));
        assert_eq!(pending_at(at(3)), [0, 2, 4, 6]);
        // The oldest (s) answered last, at s+3: then s+2, s+4 and s+6 are left.
        q.answered(slots[0], at(3));
        assert_eq!(pending_at(at(3)), [0, 2, 4, 6]);
        assert_eq!(pending_at(at(4)), [2, 4, 6]);
        // Any other rsp_prod is refused: the count does not match, or answered slots are out
        // of its bounds.
        let r = Journal::load(&path).unwrap();
        for d in [0u32, 1, 2, 5, 6, 7, 8, 40] {
            assert!(r.queues[0].pending(at(d)).is_err(), "rsp_prod s+{d}");
        }
    }

    #[test]
    fn impossible_slots_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let id = identity(1, 0);
        let j = Journal::create(&path, &id).unwrap();
        let mut q = j.queue(0).unwrap();
        for k in 0..4u32 {
            q.record(k, 100 + k, &req(u64::from(100 + k)));
        }
        q.commit(104);
        q.answered(1, 100);
        drop(j);
        let good = std::fs::read(&path).unwrap();
        let pending = |bytes: &[u8], rsp_prod: u32| {
            std::fs::write(&path, bytes).unwrap();
            Journal::load(&path).unwrap().queues[0].pending(rsp_prod)
        };
        assert_eq!(pending(&good, 101).unwrap().len(), 3);
        let with_slot = |slot: u32, f: &dyn Fn(&mut [u8])| {
            let mut bad = good.clone();
            let off = slot_offset(&id, 0, slot);
            f(&mut bad[off..off + SLOT_SIZE]);
            bad
        };
        let put = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        // An unknown mark.
        assert!(pending(&with_slot(2, &|b| put(b, SLOT_MARK, 7)), 101).is_err());
        // A damaged copy of a request in flight; a damaged free slot does not matter.
        assert!(pending(&with_slot(2, &|b| b[SLOT_REQ + 5] ^= 1), 101).is_err());
        assert!(pending(&with_slot(9, &|b| b[SLOT_REQ + 5] ^= 1), 101).is_ok());
        // Answered at a response index beyond what could have been produced.
        assert!(pending(&with_slot(1, &|b| put(b, SLOT_MARK + 4, 104)), 101).is_err());
        // A copy in flight far from req_cons (checksum made right).
        let moved = |idx: u32| {
            with_slot(3, &move |b: &mut [u8]| {
                put(b, SLOT_INDEX, idx);
                let mut r = [0u8; REQ_SIZE];
                r.copy_from_slice(&b[SLOT_REQ..]);
                put(b, SLOT_SUM, slot_checksum(idx, &r));
            })
        };
        assert!(pending(&moved(104 + 40), 101).is_err());
        // The same ring index in two slots (the count would fit).
        assert!(pending(&moved(102), 101).is_err());
        // Recorded and not committed (at or after req_cons): ignored, so one is missing.
        assert!(pending(&moved(104), 101).is_err());
        assert_eq!(pending(&moved(104), 102).unwrap().len(), 2);
        // A queue index no ring has.
        let mut bad = good.clone();
        bad[HEADER_SIZE..HEADER_SIZE + 4].copy_from_slice(&200u32.to_le_bytes());
        assert!(pending(&bad, 101).is_err());
    }

    #[test]
    fn a_version_1_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let id = identity(1, 0);
        drop(Journal::create(&path, &id).unwrap());
        let mut v1 = std::fs::read(&path).unwrap();
        // A consistent version-1 header: its magic, version 1, checksum right.
        v1[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC_V1);
        v1[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&1u32.to_le_bytes());
        let sum = checksum(&v1[..OFF_CHECKSUM]);
        v1[OFF_CHECKSUM..HEADER_SIZE].copy_from_slice(&sum.to_le_bytes());
        std::fs::write(&path, &v1).unwrap();
        match Journal::load(&path) {
            Err(Error::Corrupt { why, .. }) => assert!(why.contains("version 1"), "{why}"),
            other => panic!("a version-1 journal was not refused: {other:?}"),
        }
        // Our magic with another version is refused too.
        let mut v3 = std::fs::read(&path).unwrap();
        v3[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC);
        v3[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&3u32.to_le_bytes());
        let sum = checksum(&v3[..OFF_CHECKSUM]);
        v3[OFF_CHECKSUM..HEADER_SIZE].copy_from_slice(&sum.to_le_bytes());
        std::fs::write(&path, &v3).unwrap();
        assert!(matches!(Journal::load(&path), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn damaged_journals_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let j = Journal::create(&path, &identity(1, 0)).unwrap();
        let mut q = j.queue(0).unwrap();
        for k in 0..4u32 {
            q.record(k, k, &req(u64::from(k)));
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
        // A damaged slot in flight: that queue cannot be resumed, whatever rsp_prod.
        let mut bad = good.clone();
        bad[HEADER_SIZE + QUEUE_HEAD + 2 * SLOT_SIZE + 40] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let r = Journal::load(&path).unwrap();
        assert!(r.queues[0].pending(0).is_err());
        assert!(r.queues[0].pending(3).is_err());
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
