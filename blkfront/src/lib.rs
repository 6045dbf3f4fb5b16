//! A userspace Xen block frontend (blkif, pv-protocols.md §1).
//!
//! [`BlkFront::connect`] negotiates with any blkif backend (ours or Linux's): rings in dedicated
//! granted pages (multi-page, multi-queue), one unbound event channel per queue, persistent
//! grants and indirect descriptors when both sides offer them. Data travels through dedicated,
//! zeroed, granted pages (XSA-403): the caller's buffer is copied into a per-queue pool (kept
//! granted with persistent grants) or into pages granted for one request and revoked after its
//! response (a deferred revoke is never reused, XSA-396).
//!
//! * blocking API: [`BlkFront::read_at`], [`write_at`](BlkFront::write_at),
//!   [`flush`](BlkFront::flush), [`discard`](BlkFront::discard);
//! * asynchronous API: [`BlkFront::submit`] with a completion callback, or
//!   [`BlkFront::submit_ticket`] returning a [`Ticket`]; many requests in flight, ids bounded by
//!   the ring (a slab of request slots);
//! * every response is validated (id outstanding, operation, status, `rsp_prod`): a bad one is a
//!   backend protocol error that breaks the device (reported by [`BlkFront::error`]) without
//!   touching a page of the request it named (XSA-405);
//! * when the backend leaves Connected (restart, crash, reconnect), the rings are torn down and
//!   renegotiated, and every request in flight is issued again from its private copy: callers see
//!   a completion only once the backend answered it.
//!
//! [`export::NbdExport`] serves the disk over NBD (the `xenpv-blkfront` binary);
//! [`load::run`] drives it directly with a closed-loop workload (`xenpv-blkfront --load`, the
//! no-NBD path of `xenpv bench disk`).
#![deny(missing_docs)]

mod device;
pub mod export;
pub mod load;
mod queue;
pub mod vdev;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

pub use device::{BlkFront, DiskInfo, POLL_LIMIT};
use xenpv_evtchn::SpinBudget;
use xenpv_ring::blkif::Blkif;
use xenpv_xenstore::Client;

/// Why an operation or the device failed. Cloneable, since one failure may complete many
/// requests.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// xenstore failed.
    #[error("xenstore: {0}")]
    Xenstore(String),
    /// A grant operation failed.
    #[error("grant: {0}")]
    Grant(String),
    /// An event-channel operation failed.
    #[error("event channel: {0}")]
    Evtchn(String),
    /// The ring refused its memory.
    #[error("ring: {0}")]
    Ring(#[from] xenpv_ring::Error),
    /// A node written by the toolstack or the backend is missing or wrong.
    #[error("{path}: {why}")]
    Node {
        /// The node.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The backend broke the protocol (a bad response or ring index): the device is dead.
    #[error("backend protocol error: {0}")]
    Protocol(String),
    /// The backend answered the request with an error status.
    #[error("backend answered {op} with status {status}")]
    Io {
        /// The wire operation.
        op: u8,
        /// `BLKIF_RSP_*`.
        status: i16,
    },
    /// The backend does not offer the operation.
    #[error("{0} is not supported by the backend")]
    NotSupported(&'static str),
    /// The disk is read-only.
    #[error("the disk is read-only")]
    ReadOnly,
    /// The offset or length is not a multiple of the sector size.
    #[error("offset {offset} / length {len} not aligned to the sector size {sector_size}")]
    Unaligned {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// The disk's logical sector size.
        sector_size: u32,
    },
    /// A discard whose range is not made of whole discard units (`discard-granularity`,
    /// offset by `discard-alignment`), which the protocol requires of a frontend.
    #[error(
        "discard {offset}+{len} is not aligned to the backend's discard granularity \
         {granularity} (alignment {alignment})"
    )]
    DiscardUnaligned {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// `discard-granularity`.
        granularity: u64,
        /// `discard-alignment`.
        alignment: u64,
    },
    /// The range is beyond the end of the disk.
    #[error("range {offset}+{len} is beyond the end of the disk ({size} bytes)")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// The device is closed (or closing).
    #[error("the device is closed")]
    Closed,
    /// Waiting for the backend timed out.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(String),
    /// The backend closed the device and [`Options::reconnect`] is off.
    #[error("the backend closed the device ({0}) and reconnecting is disabled")]
    BackendClosed(String),
}

impl From<xenpv_xenstore::Error> for Error {
    fn from(e: xenpv_xenstore::Error) -> Self {
        Error::Xenstore(e.to_string())
    }
}
impl From<xenpv_grant::Error> for Error {
    fn from(e: xenpv_grant::Error) -> Self {
        Error::Grant(e.to_string())
    }
}
impl From<xenpv_evtchn::Error> for Error {
    fn from(e: xenpv_evtchn::Error) -> Self {
        Error::Evtchn(e.to_string())
    }
}

impl Error {
    /// The closest `std::io::Error` (for the NBD export).
    pub fn to_io(&self) -> std::io::Error {
        use std::io::ErrorKind as K;
        let kind = match self {
            Error::ReadOnly => K::PermissionDenied,
            Error::Unaligned { .. } | Error::DiscardUnaligned { .. } | Error::OutOfRange { .. } => {
                K::InvalidInput
            }
            Error::NotSupported(_) => K::Unsupported,
            _ => K::Other,
        };
        std::io::Error::new(kind, self.to_string())
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// What the frontend needs from the platform: xenstore with the guest's identity, grant sharing,
/// and a way to open one event-channel handle per queue (each queue thread waits on its own).
pub struct Platform<G, E> {
    /// xenstore, as the frontend domain.
    pub xs: Client,
    /// Grant sharing (`GrantShare`).
    pub grants: Arc<G>,
    /// Opens an event-channel handle.
    #[allow(clippy::type_complexity)]
    pub open_evtchn: Arc<dyn Fn() -> std::result::Result<E, xenpv_evtchn::Error> + Send + Sync>,
}

impl<G, E> Clone for Platform<G, E> {
    fn clone(&self) -> Self {
        Self {
            xs: self.xs.clone(),
            grants: self.grants.clone(),
            open_evtchn: self.open_evtchn.clone(),
        }
    }
}

pub use xenpv_ring::blkif::BACKEND_CACHE_NODE;

/// The size of a queue's persistent pool ([`Options::pool_pages`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolSize {
    /// As many pages as the backend says it keeps mapped per queue ([`BACKEND_CACHE_NODE`]),
    /// at most this many; [`PoolSize::UNSAID`] from a backend that does not say. A pool larger
    /// than the backend's cache would have the backend map and unmap pages for each request
    /// (on the local platform, 1 MiB reads at half the rate).
    Auto(usize),
    /// This many pages, whatever the backend says.
    Pages(usize),
}

impl PoolSize {
    /// The pool of [`PoolSize::Auto`] for a backend that does not say what it caches: within
    /// Linux's blkback's 1056 persistent grants per queue, and, with a one-page ring, within
    /// gntalloc's default limit of 1024 grants on Xen.
    pub const UNSAID: usize = 960;

    /// The most pages the pool may take, whatever the backend says.
    pub fn most(self) -> usize {
        match self {
            PoolSize::Auto(n) | PoolSize::Pages(n) => n,
        }
    }

    /// The pool for a backend that says it caches `said` mappings per queue (`None`: says
    /// nothing).
    pub fn for_backend(self, said: Option<u64>) -> usize {
        match self {
            PoolSize::Pages(n) => n,
            PoolSize::Auto(n) => {
                let cache = said.map_or(Self::UNSAID, |c| usize::try_from(c).unwrap_or(n));
                n.min(cache)
            }
        }
    }
}

impl Default for PoolSize {
    /// Up to 2112 pages (33 chunks of 64): eight 1 MiB reads (257 pages each) at a time.
    /// `xenpv bench disk`, /tmp, 1 MiB reads at QD8 against xenpv-blkback, 3 interleaved runs
    /// of 5 rounds: 0.95, 0.95, 0.95 of fio's rate (polling frontend 0.96, 0.99, 1.00)
    /// against 0.90, 0.90, 0.92 (0.91, 0.90, 0.91) with 960 pages, and blkback's CPU per read
    /// halved (42 µs against 83): docs/bench-disk.md, R9.
    fn default() -> Self {
        PoolSize::Auto(2112)
    }
}

/// Tunables of one device.
#[derive(Debug, Clone)]
pub struct Options {
    /// Queues (rings) wanted; the backend's `multi-queue-max-queues` caps it.
    pub queues: u32,
    /// `ring-page-order` wanted; the backend's `max-ring-page-order` caps it.
    pub ring_order: u32,
    /// Offer `feature-persistent` (used only if the backend offers it too).
    pub persistent: bool,
    /// Use indirect descriptors when the backend offers them.
    pub indirect: bool,
    /// Upper bound on segments per indirect request.
    pub max_indirect_segments: u32,
    /// Most pages a queue keeps granted with persistent grants (data and indirect pages, granted
    /// 64 at a time as requests need them). It bounds the bytes a queue has in flight: requests
    /// that find no free page wait for a response. By default ([`PoolSize::default`]) what the
    /// backend says it keeps mapped per queue, up to 2112 pages: eight 1 MiB reads at a time,
    /// each 256 data pages and an indirect page, as a client reading at QD8 has them; 960
    /// (three such reads) from a backend that does not say, such as Linux's blkback (which
    /// caches 1056). Never less than the pages of one largest request (with 4096 segments,
    /// 4104), which could otherwise never start. On Xen the pool's pages count against
    /// gntalloc's `limit` (1024 by default, for all of its users together;
    /// [`xenpv_grant::Error::GntallocLimit`] says how to raise it, and
    /// [`most_pages_granted`](Self::most_pages_granted) what a device needs). If the grant
    /// driver refuses to let the pool grow, the pool stays as it is, a warning says so once,
    /// and requests wait for the pages of those in flight; the pool asks the driver again
    /// after a second.
    pub pool_pages: PoolSize,
    /// Hybrid polling budget of a queue thread with requests in flight: it polls the ring this
    /// long before it sleeps on its event channel ([`xenpv_evtchn::HybridPoll`]). When its
    /// waits average 150 µs or more (a device's, not memory's), it does not poll at all but
    /// sleeps on the event channel at once; nor while the machine's CPUs are oversubscribed
    /// ([`xenpv_evtchn::cpu_contended`]). 50 µs by default; [`SpinBudget::None`] is purely
    /// event-driven.
    pub spin: SpinBudget,
    /// Poll for responses while requests are in flight instead of sleeping on the event
    /// channel (as fio's `hipri` and SPDK do): each queue thread with requests in flight polls
    /// the ring, yielding to any thread ready to run on its CPU, until a response comes (at
    /// most [`POLL_LIMIT`] per wait; then it sleeps on its event channel through its waits
    /// until a response comes, so that a backend that stopped answering costs no CPU). The
    /// backend need not notify, and a response is seen as soon as it is published, whatever
    /// the CPU the queue thread is on: the highest IOPS
    /// against a disk that answers in bursts, for a CPU that is busy whenever I/O is
    /// outstanding. It does not poll while the machine's CPUs are oversubscribed
    /// ([`xenpv_evtchn::cpu_contended`]). With nothing in flight it sleeps. `false` by
    /// default (hybrid polling, [`spin`](Self::spin)); [`BlkFront::set_polling`] changes it
    /// while connected.
    pub poll: bool,
    /// How long to wait for each backend state change while negotiating.
    pub timeout: Duration,
    /// Renegotiate when the backend leaves Connected (a restarted backend that could not
    /// resume the connection). `false` behaves as Linux's xen-blkfront: a backend going back
    /// to InitWait while connected is ignored, and a backend closing fails the disk.
    pub reconnect: bool,
}

impl Options {
    /// The most pages a device with these options grants at once, if the backend offers all
    /// they ask for: each queue's ring pages and, with persistent grants, its pool (never less
    /// than one largest request), or else a full ring of the largest requests. On Xen they
    /// count against gntalloc's `limit`.
    pub fn most_pages_granted(&self) -> usize {
        let ring_pages = 1usize << self.ring_order.min(queue::MAX_RING_ORDER);
        let segments =
            queue::segments_per_request(self.indirect, self.max_indirect_segments, u32::MAX);
        let in_flight = if self.persistent {
            queue::pool_limit(self.pool_pages.most(), segments)
        } else {
            let entries = xenpv_ring::ring_entries::<Blkif>(ring_pages * xenpv_ring::PAGE_SIZE);
            entries as usize * queue::request_pages(segments)
        };
        (self.queues.max(1) as usize).saturating_mul(ring_pages + in_flight)
    }

    /// Lowers an automatic pool ([`PoolSize::Auto`]) in whole chunks until
    /// [`most_pages_granted`](Self::most_pages_granted) fits within `limit` (gntalloc's, on
    /// Xen), but not below one largest request; returns the pool's new bound if it lowered it.
    /// An explicit size ([`PoolSize::Pages`]) and a device without persistent grants are left
    /// as they are.
    pub fn fit_pool_within(&mut self, limit: u64) -> Option<usize> {
        let PoolSize::Auto(most) = self.pool_pages else {
            return None;
        };
        if !self.persistent || self.most_pages_granted() as u64 <= limit {
            return None;
        }
        let ring_pages = 1usize << self.ring_order.min(queue::MAX_RING_ORDER);
        let per_queue = usize::try_from(limit / u64::from(self.queues.max(1))).unwrap_or(most);
        let fits = per_queue.saturating_sub(ring_pages) / queue::POOL_CHUNK * queue::POOL_CHUNK;
        let segments =
            queue::segments_per_request(self.indirect, self.max_indirect_segments, u32::MAX);
        let fitted = fits.min(most).max(queue::request_pages(segments));
        self.pool_pages = PoolSize::Auto(fitted);
        Some(queue::pool_limit(fitted, segments))
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            queues: 1,
            ring_order: 0,
            persistent: true,
            indirect: true,
            max_indirect_segments: 256,
            pool_pages: PoolSize::default(),
            spin: SpinBudget::default(),
            poll: false,
            timeout: Duration::from_secs(30),
            reconnect: true,
        }
    }
}

/// One block operation. Offsets and lengths are in bytes and must be multiples of the sector
/// size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at `offset`; completes with the data.
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: usize,
    },
    /// Write `data` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// The data (kept privately until the backend acknowledged it).
        data: Vec<u8>,
    },
    /// Commit the volatile cache (`FLUSH_DISKCACHE`, or `WRITE_BARRIER` if only that is offered).
    Flush,
    /// Discard (trim) `len` bytes at `offset`.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
}

/// A completion callback: the read data (empty for other operations) or the error.
pub type Callback = Box<dyn FnOnce(Result<Vec<u8>>) + Send + 'static>;

/// Reads the data of a read submitted with [`BlkFront::submit_read_in_place`] where the backend
/// put it, in the granted pages, before they are reused: `(position in the read, bytes)`, one
/// call per page or part of a page, in no particular order (the pieces of a large read may be
/// answered out of order), each position once. The bytes are shared with the backend, which may
/// still write them: read them through the [`xenpv_grant::VolatileSlice`], once, as untrusted
/// data. It runs on a queue thread with the queue locked: it must be quick and must not submit
/// to or close the device (that would wait for the lock it runs under).
pub type Consume = Box<dyn FnMut(usize, &xenpv_grant::VolatileSlice<'_>) + Send + 'static>;

/// The handle of one submitted operation.
#[derive(Debug)]
pub struct Ticket {
    rx: mpsc::Receiver<Result<Vec<u8>>>,
}

impl Ticket {
    pub(crate) fn new() -> (Ticket, Callback) {
        let (tx, rx) = mpsc::channel();
        (
            Ticket { rx },
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
    }

    /// Waits for the operation to complete.
    pub fn wait(self) -> Result<Vec<u8>> {
        self.rx.recv().unwrap_or(Err(Error::Closed))
    }

    /// Whether it completed, without blocking (`None`: still in flight).
    pub fn try_wait(&self) -> Option<Result<Vec<u8>>> {
        self.rx.try_recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::Options;

    #[test]
    fn pages_granted_at_once_count_rings_pools_or_full_rings_of_the_largest_requests() {
        // One one-page ring and a pool of up to 2112 pages (33 chunks of 64).
        assert_eq!(Options::default().most_pages_granted(), 1 + 2112);
        // Pools count whole chunks, and hold one largest request: 4096 segments, 8 indirect
        // pages, in 65 chunks; per queue, with 4-page rings.
        let big = Options {
            queues: 2,
            ring_order: 2,
            max_indirect_segments: 4096,
            pool_pages: super::PoolSize::Pages(100),
            ..Options::default()
        };
        assert_eq!(big.most_pages_granted(), 2 * (4 + 65 * 64));
        // Without persistent grants: a full ring (32 entries a page) of the largest requests.
        let own = Options {
            persistent: false,
            ..Options::default()
        };
        assert_eq!(own.most_pages_granted(), 1 + 32 * 257);
        let direct = Options {
            persistent: false,
            indirect: false,
            ring_order: 9,
            ..Options::default()
        };
        assert_eq!(direct.most_pages_granted(), 16 + 512 * 11);
    }

    #[test]
    fn an_automatic_pool_is_what_the_backend_caches_within_its_bound() {
        use super::PoolSize;
        let auto = PoolSize::default();
        assert_eq!(auto.for_backend(Some(2112)), 2112);
        assert_eq!(auto.for_backend(Some(1 << 40)), 2112);
        assert_eq!(auto.for_backend(Some(u64::MAX)), 2112);
        assert_eq!(auto.for_backend(Some(500)), 500);
        assert_eq!(auto.for_backend(None), PoolSize::UNSAID);
        assert_eq!(PoolSize::Auto(300).for_backend(None), 300);
        assert_eq!(PoolSize::Pages(4096).for_backend(Some(100)), 4096);
        assert_eq!(PoolSize::Pages(4096).for_backend(None), 4096);
    }

    #[test]
    fn an_automatic_pool_fits_within_gntallocs_limit() {
        use super::PoolSize;
        // gntalloc's default limit: one one-page ring and 960 pages.
        let mut opts = Options::default();
        assert_eq!(opts.fit_pool_within(1024), Some(960));
        assert_eq!(opts.pool_pages, PoolSize::Auto(960));
        assert_eq!(opts.most_pages_granted(), 961);
        // A limit with room for the whole pool leaves it.
        let mut roomy = Options::default();
        assert_eq!(roomy.fit_pool_within(4096), None);
        assert_eq!(roomy.pool_pages, PoolSize::default());
        // Two queues with 4-page rings share the limit.
        let mut two = Options {
            queues: 2,
            ring_order: 2,
            ..Options::default()
        };
        assert_eq!(two.fit_pool_within(2048), Some(960));
        assert!(two.most_pages_granted() <= 2048);
        // Never below one largest request (257 pages, in 5 chunks), which could otherwise never
        // start; the limit is then still too low, as the caller's warning says.
        let mut tight = Options::default();
        assert_eq!(tight.fit_pool_within(100), Some(320));
        // An explicit size is the user's.
        let mut explicit = Options {
            pool_pages: PoolSize::Pages(4096),
            ..Options::default()
        };
        assert_eq!(explicit.fit_pool_within(1024), None);
        assert_eq!(explicit.pool_pages, PoolSize::Pages(4096));
    }
}
