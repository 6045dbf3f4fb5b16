//! The device: negotiation (pv-protocols.md §1.4–1.5), queue threads, the control thread that
//! watches the backend and reconnects, and the public API.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xenpv_evtchn::{EventChannel, HybridPoll, Port, SpinBudget, StopSignal};
use xenpv_grant::{Access, DomId, GrantShare, SharedPages};
use xenpv_ring::blkif::{Blkif, VDISK_READONLY};
use xenpv_ring::FrontRing;
use xenpv_xenstore::xenbus::{self, Changes};
use xenpv_xenstore::{XenbusState, XsOps};

use crate::queue::RingState;
use crate::queue::{
    finish, pool_limit, ring_memory, segments_per_request, Chunk, Features, Finished, Kind, Parent,
    QState, MAX_RING_ORDER,
};
use crate::{Callback, Consume, Error, Op, Options, Platform, Result, Ticket};

const CONNECTED: u8 = 0;
const RECONNECTING: u8 = 1;
const CLOSED: u8 = 2;
const BROKEN: u8 = 3;

thread_local! {
    /// Operations submitted from this thread (by a queue thread: its callbacks' submissions).
    static SUBMITTED_HERE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Responses taken per lock before their callbacks run (see `Dev::run_queue`).
const RESPONSE_BATCH: usize = 2;

/// A queue whose waits for responses last this long on average (a backend whose storage is
/// slow and answers in bursts) yields its CPU between batches of a burst (see `Dev::run_queue`).
const YIELD_AFTER_WAITS: Duration = Duration::from_micros(50);

/// A queue whose waits last this long (a device's time, longer than a backend sharing this CPU
/// takes to serve a burst from memory) yields again every `YIELD_EVERY` batches of a burst,
/// not only after the first (see `Dev::run_queue`).
const YIELD_OFTEN_AFTER_WAITS: Duration = Duration::from_micros(150);

/// A queue whose waits last this long does not poll for responses but sleeps on its event
/// channel at once (see `Dev::run_queue`).
const BLOCK_AFTER_WAITS: Duration = Duration::from_micros(150);

/// The longest a queue thread polls for a response in [`Options::poll`] mode before it sleeps
/// on its event channel.
pub const POLL_LIMIT: Duration = Duration::from_secs(1);

/// See `YIELD_OFTEN_AFTER_WAITS`.
const YIELD_EVERY: u32 = 4;

/// The longest the control thread goes without reading the backend's state while its watch
/// does not fire: a safety net, as a watch event is what says to look.
const RECHECK: Duration = Duration::from_secs(5);

/// What the backend told us about the disk, and what was negotiated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in 512-byte sectors (`sectors`).
    pub sectors: u64,
    /// Logical sector size (`sector-size`).
    pub sector_size: u32,
    /// Physical sector size (`physical-sector-size`).
    pub physical_sector_size: u32,
    /// The `info` bitmap (`VDISK_*`).
    pub info: u32,
    /// `VDISK_READONLY` is set.
    pub read_only: bool,
    /// `feature-flush-cache`.
    pub flush: bool,
    /// `feature-barrier`.
    pub barrier: bool,
    /// `feature-discard`.
    pub discard: bool,
    /// `discard-granularity` (bytes).
    pub discard_granularity: u64,
    /// `discard-alignment` (bytes).
    pub discard_alignment: u64,
    /// Persistent grants in use (both sides offered them).
    pub persistent: bool,
    /// The persistent grants the backend says it keeps mapped per queue
    /// ([`crate::BACKEND_CACHE_NODE`]; `None`: it does not say).
    pub backend_cache: Option<u64>,
    /// The most pages each queue's persistent pool grows to (whole chunks of 64;
    /// [`crate::Options::pool_pages`]), 0 without persistent grants.
    pub pool_pages: usize,
    /// Queues in use.
    pub queues: u32,
    /// Ring page order in use.
    pub ring_order: u32,
    /// Segments per request (11 without indirect descriptors).
    pub max_segments: u32,
}

pub(crate) struct Dev<G: GrantShare, E> {
    p: Platform<G, E>,
    fe: String,
    be: String,
    be_id: DomId,
    handle: u16,
    opts: Options,
    queues: Vec<Mutex<QState<G, E>>>,
    nq: AtomicUsize,
    phase: AtomicU8,
    error: Mutex<Option<Error>>,
    info: Mutex<DiskInfo>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The running queue threads' stop signal (none before the first connection).
    stop: Mutex<Option<Arc<StopSignal>>>,
    rr: AtomicUsize,
    closing: AtomicBool,
    reconnects: AtomicUsize,
    /// [`Options::poll`], as [`BlkFront::set_polling`] last set it.
    polling: AtomicBool,
    /// Times a queue thread slept on its event channel with requests in flight.
    busy_sleeps: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The lock if nobody holds it: for polling, which must not make a thread that submits wait.
fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// Completes the finished chunks of `out`, leaving it empty (its room kept for the next).
fn complete(out: &mut Finished) {
    for (c, r) in out.drain(..) {
        finish(c, r);
    }
}

/// A connected blkif disk. Dropping it closes it.
pub struct BlkFront<G: GrantShare, E> {
    dev: Arc<Dev<G, E>>,
    control: Mutex<Option<JoinHandle<()>>>,
}

impl<G, E> BlkFront<G, E>
where
    G: GrantShare + Send + Sync + 'static,
    G::Shared: SharedPages + Send + Sync + 'static,
    E: EventChannel + 'static,
{
    /// Connects the device whose frontend directory is `device_dir`
    /// (`/local/domain/<me>/device/vbd/<devid>`): waits for the backend's InitWait, publishes
    /// rings, event channels and features, waits for Connected and reads the disk's properties.
    pub fn connect(platform: Platform<G, E>, device_dir: &str, options: Options) -> Result<Self> {
        let xs = &platform.xs;
        let fe = device_dir.trim_end_matches('/').to_string();
        let node = |k: &str, why: &str| Error::Node {
            path: format!("{fe}/{k}"),
            why: why.into(),
        };
        let be = xs
            .read_opt(&format!("{fe}/backend"))?
            .map(|v| String::from_utf8_lossy(&v).trim().to_string())
            .ok_or_else(|| node("backend", "missing (is the disk attached?)"))?;
        let be_id: DomId = xs
            .read_opt(&format!("{fe}/backend-id"))?
            .and_then(|v| String::from_utf8_lossy(&v).trim().parse().ok())
            .ok_or_else(|| node("backend-id", "missing or not a domid"))?;
        let handle = xs
            .read_opt(&format!("{fe}/virtual-device"))?
            .and_then(|v| String::from_utf8_lossy(&v).trim().parse::<u32>().ok())
            .or_else(|| fe.rsplit('/').next().and_then(|d| d.parse().ok()))
            .unwrap_or(0) as u16;
        let nq = options.queues.max(1) as usize;
        let dev = Arc::new(Dev {
            p: platform,
            fe,
            be,
            be_id,
            handle,
            queues: (0..nq).map(|_| Mutex::new(QState::default())).collect(),
            polling: AtomicBool::new(options.poll),
            opts: options,
            nq: AtomicUsize::new(1),
            phase: AtomicU8::new(RECONNECTING),
            error: Mutex::new(None),
            info: Mutex::new(DiskInfo::default()),
            threads: Mutex::new(Vec::new()),
            stop: Mutex::new(None),
            rr: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            reconnects: AtomicUsize::new(0),
            busy_sleeps: AtomicU64::new(0),
        });
        let span = tracing::info_span!("vbd", domid = dev.be_id, dev = %dev.fe);
        let _g = span.enter();
        if let Err(e) = dev.negotiate() {
            // As a kernel frontend's fatal error: say why, and close, so that the backend
            // lets go of what it set up for this attempt instead of waiting for us.
            let xs = &dev.p.xs;
            let _ = xs.write_str(&format!("{}/error", dev.fe), &e.to_string());
            let _ = xenbus::switch_state(xs, &dev.fe, XenbusState::Closing);
            return Err(e);
        }
        let d2 = dev.clone();
        let control = std::thread::Builder::new()
            .name("blkfront-control".into())
            .spawn(move || d2.control())
            .map_err(|e| Error::Thread(e.to_string()))?;
        Ok(Self {
            dev,
            control: Mutex::new(Some(control)),
        })
    }

    /// The disk's properties and the negotiated features.
    pub fn info(&self) -> DiskInfo {
        lock(&self.dev.info).clone()
    }

    /// Size in bytes: the backend's latest announcement (it follows an online resize).
    pub fn size(&self) -> u64 {
        // `capacity()` checked it wherever it was set; saturating all the same.
        lock(&self.dev.info).sectors.saturating_mul(512)
    }

    /// Logical sector size in bytes.
    pub fn sector_size(&self) -> u32 {
        lock(&self.dev.info).sector_size
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        lock(&self.dev.info).read_only
    }

    /// The backend protocol error that broke the device, if any.
    pub fn error(&self) -> Option<Error> {
        lock(&self.dev.error).clone()
    }

    /// Whether the device is connected (not reconnecting, closed or broken).
    pub fn is_connected(&self) -> bool {
        self.dev.phase.load(Ordering::SeqCst) == CONNECTED
    }

    /// How many times the device renegotiated after the backend left Connected.
    pub fn reconnects(&self) -> usize {
        self.dev.reconnects.load(Ordering::SeqCst)
    }

    /// How many requests were issued again after a reconnect: each had been sent to the
    /// backend and was still unanswered when the backend left Connected and its ring was taken
    /// down, and was then put on a ring of a later connection (from its private copy). A
    /// request lost on several connections counts each time it is re-issued; one split into
    /// more ring requests by a connection that allows fewer segments counts per piece.
    pub fn reissued(&self) -> u64 {
        self.dev.queues.iter().map(|q| lock(q).reissued).sum()
    }

    /// Polls for responses while requests are in flight ([`Options::poll`]) or not (hybrid
    /// polling): the queue threads take it up at their next wait.
    pub fn set_polling(&self, poll: bool) {
        self.dev.polling.store(poll, Ordering::Relaxed);
    }

    /// Whether queue threads poll while requests are in flight ([`set_polling`](Self::set_polling)).
    pub fn polling(&self) -> bool {
        self.dev.polling.load(Ordering::Relaxed)
    }

    /// How many times a queue thread slept on its event channel while it had requests in
    /// flight (so that the backend had to notify it). Rare in [`Options::poll`] mode.
    pub fn busy_sleeps(&self) -> u64 {
        self.dev.busy_sleeps.load(Ordering::Relaxed)
    }

    /// The frontend directory.
    pub fn device_dir(&self) -> &str {
        &self.dev.fe
    }

    /// The backend directory.
    pub fn backend_dir(&self) -> &str {
        &self.dev.be
    }

    /// Submits `op`; `done` runs (on a queue thread, or on this one if the operation fails at
    /// once) with the read data or the error.
    pub fn submit(&self, op: Op, done: Callback) {
        self.dev.submit(op, done)
    }

    /// Reads `len` bytes at `offset` without copying them out: `consume` reads each piece in
    /// place, in the granted pages the backend wrote (see [`Consume`]), as its part of the read
    /// is answered; then `done` runs as for [`Op::Read`], with an empty buffer on success. A
    /// client that checks, hashes or forwards the data saves the copy into a buffer of its own
    /// (and the buffer), as a reader with DMA into its own memory does. If `done` reports an
    /// error, some pieces may have been consumed already and are not the disk's content.
    pub fn submit_read_in_place(&self, offset: u64, len: usize, consume: Consume, done: Callback) {
        self.dev
            .submit_with(Op::Read { offset, len }, Some(consume), done)
    }

    /// Submits `op` and returns a [`Ticket`] to wait on.
    pub fn submit_ticket(&self, op: Op) -> Ticket {
        let (t, cb) = Ticket::new();
        self.submit(op, cb);
        t
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let data = self
            .submit_ticket(Op::Read {
                offset,
                len: buf.len(),
            })
            .wait()?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// Writes `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.submit_ticket(Op::Write {
            offset,
            data: buf.to_vec(),
        })
        .wait()
        .map(|_| ())
    }

    /// Commits the backend's volatile cache.
    pub fn flush(&self) -> Result<()> {
        self.submit_ticket(Op::Flush).wait().map(|_| ())
    }

    /// Discards `len` bytes at `offset`.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.submit_ticket(Op::Discard { offset, len })
            .wait()
            .map(|_| ())
    }

    /// Closes the device: waits (bounded) for requests in flight, Closing, waits for the backend
    /// to close, revokes every grant, Closed.
    pub fn close(&self) -> Result<()> {
        let dev = &self.dev;
        if dev.closing.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(t) = lock(&self.control).take() {
            let _ = t.join();
        }
        let deadline = Instant::now() + dev.opts.timeout;
        while dev.phase.load(Ordering::SeqCst) == CONNECTED
            && dev.queues.iter().any(|q| lock(q).outstanding() > 0)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let was = dev.phase.swap(CLOSED, Ordering::SeqCst);
        let xs = &dev.p.xs;
        let mut result = Ok(());
        if was != BROKEN {
            xenbus::switch_state(xs, &dev.fe, XenbusState::Closing)?;
            match xenbus::wait_for_peer_state(
                xs,
                &dev.be,
                |s| {
                    matches!(
                        s,
                        XenbusState::Closing | XenbusState::Closed | XenbusState::Unknown
                    )
                },
                dev.opts.timeout,
            ) {
                // Linux's blkback answers our Closing with Closing and unmaps only once we are
                // Closed; ours goes straight to Closed. Either way we may now tear down: pages the
                // backend still maps are released only when it unmaps them (deferred revoke).
                Ok(_) => {}
                Err(e) => result = Err(e.into()),
            }
        }
        dev.stop_threads();
        dev.teardown(false);
        let _ = xenbus::switch_state(xs, &dev.fe, XenbusState::Closed);
        if was != BROKEN {
            // Linux's blkback reaches Closed after our Closed: wait for it briefly, so that
            // whoever removes the device next finds it closed.
            let _ = xenbus::wait_for_peer_state(
                xs,
                &dev.be,
                |s| matches!(s, XenbusState::Closed | XenbusState::Unknown),
                Duration::from_secs(2),
            );
        }
        tracing::info!(dev = %dev.fe, "closed");
        result
    }
}

impl<G: GrantShare, E> Drop for BlkFront<G, E> {
    fn drop(&mut self) {
        // `close` needs the full bounds; do the minimum here if it was not called.
        if !self.dev.closing.swap(true, Ordering::SeqCst) {
            if let Some(t) = lock(&self.control).take() {
                let _ = t.join();
            }
            self.dev.phase.store(CLOSED, Ordering::SeqCst);
            if let Some(s) = lock(&self.dev.stop).as_ref() {
                s.set();
            }
            for t in lock(&self.dev.threads).drain(..) {
                let _ = t.join();
            }
        }
    }
}

/// The capacity a backend's `sectors` node (`path`) announces, in 512-byte sectors whatever
/// the sector size (pv-protocols.md §1.3): a decimal `u64` whose size in bytes fits in a `u64`.
fn capacity(path: &str, raw: &[u8]) -> Result<u64> {
    let text = String::from_utf8_lossy(raw);
    let text = text.trim();
    let bad = |why: String| Error::Node {
        path: path.into(),
        why,
    };
    let sectors: u64 = text
        .parse()
        .map_err(|_| bad(format!("{text:?} is not a number of sectors")))?;
    match sectors.checked_mul(512) {
        Some(_) => Ok(sectors),
        None => Err(bad(format!(
            "{sectors} sectors of 512 bytes overflow a 64-bit byte count"
        ))),
    }
}

impl<G, E> Dev<G, E>
where
    G: GrantShare + Send + Sync + 'static,
    G::Shared: SharedPages + Send + Sync + 'static,
    E: EventChannel + 'static,
{
    fn submit(&self, op: Op, done: Callback) {
        self.submit_with(op, None, done)
    }

    /// [`submit`](Self::submit); a read with `consume` is read in place (see
    /// [`BlkFront::submit_read_in_place`]). Other operations have no data to consume: only
    /// reads' chunks reach `RingState::collect`, the one caller of `consume`.
    fn submit_with(&self, op: Op, consume: Option<Consume>, done: Callback) {
        SUBMITTED_HERE.set(SUBMITTED_HERE.get().wrapping_add(1));
        let phase = self.phase.load(Ordering::SeqCst);
        if phase == CLOSED || phase == BROKEN || self.closing.load(Ordering::SeqCst) {
            let e = lock(&self.error).clone().unwrap_or(Error::Closed);
            return done(Err(e));
        }
        let info = lock(&self.info).clone();
        let size = info.sectors.saturating_mul(512);
        let ss = u64::from(info.sector_size.max(512));
        let (kind, offset, len, data) = match op {
            Op::Read { offset, len } => (Kind::Read, offset, len as u64, Vec::new()),
            Op::Write { offset, data } => (Kind::Write, offset, data.len() as u64, data),
            Op::Flush => (Kind::Flush, 0, 0, Vec::new()),
            Op::Discard { offset, len } => (Kind::Discard, offset, len, Vec::new()),
        };
        if kind != Kind::Flush {
            if offset % ss != 0 || len % ss != 0 {
                return done(Err(Error::Unaligned {
                    offset,
                    len,
                    sector_size: ss as u32,
                }));
            }
            if offset.checked_add(len).map_or(true, |end| end > size) {
                return done(Err(Error::OutOfRange { offset, len, size }));
            }
            if len == 0 {
                return done(Ok(Vec::new()));
            }
        }
        if info.read_only && matches!(kind, Kind::Write | Kind::Discard) {
            return done(Err(Error::ReadOnly));
        }
        // The protocol wants whole discard units: refused here, with the reason, rather than
        // by the backend with a bare error status.
        if kind == Kind::Discard
            && info.discard
            && crate::export::trim_range(&info, offset, len) != Some((offset, len))
        {
            return done(Err(Error::DiscardUnaligned {
                offset,
                len,
                granularity: info.discard_granularity,
                alignment: info.discard_alignment,
            }));
        }
        let read_len = if kind == Kind::Read { len as usize } else { 0 };
        let chunk = Chunk {
            kind,
            offset,
            len,
            data,
            pos: 0,
            parent: Parent::new(1, read_len, consume, done),
            lost: false,
        };
        let nq = self.nq.load(Ordering::SeqCst).clamp(1, self.queues.len());
        let qi = self.rr.fetch_add(1, Ordering::Relaxed) % nq;
        let mut out = Vec::new();
        {
            let mut q = lock(&self.queues[qi]);
            let phase = self.phase.load(Ordering::SeqCst);
            if phase == CLOSED || phase == BROKEN {
                let e = lock(&self.error).clone().unwrap_or(Error::Closed);
                out.push((chunk, Err(e)));
            } else {
                q.backlog.push_back(chunk);
                if let Err(e) = q.issue(&self.p.grants, &mut out) {
                    tracing::warn!("issuing requests: {e}");
                }
            }
        }
        complete(&mut out);
    }

    fn read_num<T: std::str::FromStr>(&self, path: &str) -> Result<Option<T>> {
        match self.p.xs.read_opt(path)? {
            None => Ok(None),
            Some(v) => {
                let s = String::from_utf8_lossy(&v).trim().to_string();
                s.parse().map(Some).map_err(|_| Error::Node {
                    path: path.into(),
                    why: format!("`{s}` is not a number"),
                })
            }
        }
    }

    /// Online resize (pv-protocols.md §1.5): a connected backend announces a new capacity by
    /// rewriting `sectors` and then its `state` (Connected again), as Linux's blkback and QEMU
    /// do. Called by the control thread when the state node fired while connected: re-reads
    /// `sectors` and applies it to [`DiskInfo`], so that [`BlkFront::size`], the bounds checks
    /// of new requests and the NBD export's new connections use it. Requests in flight are
    /// not touched (they were checked against the size they were submitted under; the backend
    /// answers any that a shrink left beyond the end with an error). A shrink is applied, as
    /// Linux's blkfront does (`set_capacity`), with a warning. A value that is not a sector
    /// count, or whose size in bytes overflows, is ignored with a warning: the backend is not
    /// trusted.
    fn resize(&self, xs: &impl XsOps) {
        let path = format!("{}/sectors", self.be);
        let raw = match xs.read_opt(&path) {
            Ok(Some(raw)) => raw,
            Ok(None) => {
                tracing::warn!(path, "backend re-announced Connected without `sectors`");
                return;
            }
            Err(e) => {
                tracing::warn!(path, "reading the disk size: {e}");
                return;
            }
        };
        let sectors = match capacity(&path, &raw) {
            Ok(sectors) => sectors,
            Err(e) => {
                tracing::warn!("ignoring the backend's new disk size: {e}");
                return;
            }
        };
        let mut info = lock(&self.info);
        let old = info.sectors;
        if sectors == old {
            return;
        }
        info.sectors = sectors;
        drop(info);
        if sectors < old {
            tracing::warn!(
                old_sectors = old,
                sectors,
                "backend shrank the disk: new requests beyond its end are refused"
            );
        } else {
            tracing::info!(old_sectors = old, sectors, "backend grew the disk");
        }
    }

    /// The disk fails for good (the first reason is kept); the control thread then tears it
    /// down and goes Closing.
    fn fail_disk(&self, why: String) {
        let mut err = lock(&self.error);
        if err.is_none() {
            *err = Some(Error::BackendClosed(why));
        }
        drop(err);
        self.phase.store(BROKEN, Ordering::SeqCst);
    }

    /// Whether the toolstack is removing the device: the backend's `state` node is gone (or no
    /// longer readable to us), or its `online` node says 0 (libxl's detach). Then there is
    /// nothing to reconnect to.
    fn removed(&self, xs: &impl XsOps) -> bool {
        let be = &self.be;
        let state = xs.read_opt(&format!("{be}/state"));
        let online = xs.read_opt(&format!("{be}/online"));
        matches!(state, Ok(None) | Err(_))
            || matches!(online, Ok(Some(v)) if v.trim_ascii() == b"0")
    }

    /// Our state back to Initialising, with the nodes of any earlier connection removed (one
    /// transaction), so that no backend connects to stale rings.
    fn reset_nodes(&self) -> Result<()> {
        let fe = &self.fe;
        self.p.xs.transaction(|tx| {
            let keys = match tx.directory(fe) {
                Ok(k) => k,
                Err(e) if e.is_not_found() => return Ok(()),
                Err(e) => return Err(e),
            };
            for k in keys {
                if k.starts_with("ring-ref")
                    || k.starts_with("queue-")
                    || k == "event-channel"
                    || k == "ring-page-order"
                    || k == "multi-queue-num-queues"
                    || k == "error"
                {
                    tx.rm(&format!("{fe}/{k}"))?;
                }
            }
            tx.write_str(
                &format!("{fe}/state"),
                &XenbusState::Initialising.as_value(),
            )?;
            Ok(())
        })?;
        Ok(())
    }

    fn wait_be(&self, what: &str, pred: impl Fn(XenbusState) -> bool) -> Result<XenbusState> {
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            if self.closing.load(Ordering::SeqCst) {
                return Err(Error::Closed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(format!(
                    "backend {} to reach {what}",
                    self.be
                )));
            }
            match xenbus::wait_for_peer_state(
                &self.p.xs,
                &self.be,
                &pred,
                left.min(Duration::from_millis(500)),
            ) {
                Ok(s) => return Ok(s),
                Err(xenpv_xenstore::Error::Timeout { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One full negotiation: Initialising, wait InitWait, rings + event channels + features in
    /// one transaction, Initialised, wait Connected, read the disk, start the queues, Connected.
    fn negotiate(self: &Arc<Self>) -> Result<()> {
        let xs = &self.p.xs;
        let (fe, be) = (&self.fe, &self.be);
        self.reset_nodes()?;
        self.wait_be("InitWait", |s| s == XenbusState::InitWait)?;
        let max_order: u32 = self
            .read_num(&format!("{be}/max-ring-page-order"))?
            .unwrap_or(0);
        let max_queues: u32 = self
            .read_num(&format!("{be}/multi-queue-max-queues"))?
            .unwrap_or(1);
        let max_indirect: u32 = self
            .read_num(&format!("{be}/feature-max-indirect-segments"))?
            .unwrap_or(0);
        let order = self.opts.ring_order.min(max_order).min(MAX_RING_ORDER);
        let nq = (self.opts.queues.max(1))
            .min(max_queues.max(1))
            .min(self.queues.len() as u32);
        let max_segments = segments_per_request(
            self.opts.indirect,
            self.opts.max_indirect_segments,
            max_indirect,
        ) as u32;

        // Rings and event channels.
        #[allow(clippy::type_complexity)]
        let mut rings: Vec<(FrontRing<Blkif, G::Shared>, Arc<E>, Port)> = Vec::new();
        let setup = (|| -> Result<()> {
            for _ in 0..nq {
                let pages = self
                    .p
                    .grants
                    .share(self.be_id, 1 << order, Access::Writable)?;
                let ring = FrontRing::<Blkif, _>::init(pages)?;
                let ev = match (self.p.open_evtchn)() {
                    Ok(ev) => Arc::new(ev),
                    Err(e) => {
                        let _ = self.p.grants.revoke(ring.into_memory());
                        return Err(e.into());
                    }
                };
                let port = match ev.bind_unbound(self.be_id) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = self.p.grants.revoke(ring.into_memory());
                        return Err(e.into());
                    }
                };
                rings.push((ring, ev, port));
            }
            xs.transaction(|tx| {
                if order > 0 {
                    tx.write_str(&format!("{fe}/ring-page-order"), &order.to_string())?;
                }
                if nq > 1 {
                    tx.write_str(&format!("{fe}/multi-queue-num-queues"), &nq.to_string())?;
                }
                for (q, (ring, _, port)) in rings.iter().enumerate() {
                    let dir = if nq > 1 {
                        format!("{fe}/queue-{q}")
                    } else {
                        fe.to_string()
                    };
                    let grefs = ring.memory().grefs();
                    if order == 0 {
                        tx.write_str(&format!("{dir}/ring-ref"), &grefs[0].to_string())?;
                    } else {
                        for (i, g) in grefs.iter().enumerate() {
                            tx.write_str(&format!("{dir}/ring-ref{i}"), &g.to_string())?;
                        }
                    }
                    tx.write_str(&format!("{dir}/event-channel"), &port.to_string())?;
                }
                tx.write_str(&format!("{fe}/protocol"), "x86_64-abi")?;
                if self.opts.persistent {
                    tx.write_str(&format!("{fe}/feature-persistent"), "1")?;
                } else {
                    tx.write_str(&format!("{fe}/feature-persistent"), "0")?;
                }
                Ok(())
            })?;
            xenbus::switch_state(xs, fe, XenbusState::Initialised)?;
            let s = self.wait_be("Connected", |s| {
                matches!(
                    s,
                    XenbusState::Connected | XenbusState::Closing | XenbusState::Closed
                )
            })?;
            if s != XenbusState::Connected {
                return Err(Error::Node {
                    path: format!("{be}/state"),
                    why: format!("backend went {s:?} instead of Connected"),
                });
            }
            Ok(())
        })();
        // The disk, as the backend describes it (its nodes are the peer's: checked here).
        let disk = setup.and_then(|()| {
            let flag = |k: &str| -> Result<bool> {
                Ok(self.read_num::<u64>(&format!("{be}/{k}"))?.unwrap_or(0) != 0)
            };
            // Its size in bytes must fit a u64 (offsets and sizes are byte counts).
            let path = format!("{be}/sectors");
            let sectors = match self.p.xs.read_opt(&path)? {
                Some(raw) => capacity(&path, &raw)?,
                None => {
                    return Err(Error::Node {
                        path,
                        why: "missing".into(),
                    })
                }
            };
            let info_bits: u32 = self.read_num(&format!("{be}/info"))?.unwrap_or(0);
            let persistent = self.opts.persistent && flag("feature-persistent")?;
            // A value that is not a number is as good as none: the pool is bounded anyway.
            let backend_cache: Option<u64> = self
                .read_num(&format!("{be}/{}", crate::BACKEND_CACHE_NODE))
                .ok()
                .flatten();
            let sector_size: u32 = self.read_num(&format!("{be}/sector-size"))?.unwrap_or(512);
            let physical: u32 = self
                .read_num(&format!("{be}/physical-sector-size"))?
                .unwrap_or(sector_size);
            Ok(DiskInfo {
                sectors,
                sector_size: if sector_size.is_power_of_two() && sector_size >= 512 {
                    sector_size
                } else {
                    512
                },
                physical_sector_size: physical,
                info: info_bits,
                read_only: info_bits & VDISK_READONLY != 0,
                flush: flag("feature-flush-cache")?,
                barrier: flag("feature-barrier")?,
                discard: flag("feature-discard")?,
                discard_granularity: self
                    .read_num(&format!("{be}/discard-granularity"))?
                    .unwrap_or(u64::from(sector_size)),
                discard_alignment: self
                    .read_num(&format!("{be}/discard-alignment"))?
                    .unwrap_or(0),
                persistent,
                backend_cache,
                pool_pages: if persistent {
                    pool_limit(
                        self.opts.pool_pages.for_backend(backend_cache),
                        max_segments as usize,
                    )
                } else {
                    0
                },
                queues: nq,
                ring_order: order,
                max_segments,
            })
        });
        let info = match disk {
            Ok(info) => info,
            Err(e) => {
                // Nothing of this attempt stays: its rings' grants and ports go.
                for (ring, ev, port) in rings {
                    let _ = ev.unbind(port);
                    let _ = self.p.grants.revoke(ring.into_memory());
                }
                return Err(e);
            }
        };
        let feat = Features {
            flush: info.flush,
            barrier: info.barrier,
            discard: info.discard,
            persistent: info.persistent,
            max_segments: max_segments as usize,
            handle: self.handle,
            backend: self.be_id,
            pool_pages: info.pool_pages,
        };
        tracing::info!(?info, "backend connected");
        *lock(&self.info) = info;
        self.nq.store(nq as usize, Ordering::SeqCst);

        // Queues: install the rings, move backlogs of queues no longer in use, start threads.
        let stop = Arc::new(StopSignal::new().map_err(|e| Error::Evtchn(e.to_string()))?);
        *lock(&self.stop) = Some(stop.clone());
        let mut moved = Vec::new();
        for q in self.queues.iter().skip(nq as usize) {
            moved.extend(lock(q).backlog.drain(..));
        }
        let mut threads = Vec::new();
        for (qi, (ring, ev, port)) in rings.into_iter().enumerate() {
            {
                let mut q = lock(&self.queues[qi]);
                if qi == 0 {
                    q.backlog.extend(moved.drain(..));
                }
                q.ring = Some(RingState::new(ring, ev.clone(), port, feat));
            }
            let (d, stop) = (self.clone(), stop.clone());
            let t = std::thread::Builder::new()
                .name(format!("blkfront-q{qi}"))
                .spawn(move || d.run_queue(qi, ev, stop))
                .map_err(|e| Error::Thread(e.to_string()))?;
            threads.push(t);
        }
        *lock(&self.threads) = threads;
        self.phase.store(CONNECTED, Ordering::SeqCst);
        for q in &self.queues[..nq as usize] {
            let mut out = Vec::new();
            if let Err(e) = lock(q).issue(&self.p.grants, &mut out) {
                tracing::warn!("issuing requests: {e}");
            }
            complete(&mut out);
        }
        xenbus::switch_state(xs, fe, XenbusState::Connected)?;
        Ok(())
    }

    fn run_queue(self: Arc<Self>, qi: usize, ev: Arc<E>, stop: Arc<StopSignal>) {
        let span = tracing::info_span!("vbd", domid = self.be_id, dev = %self.fe, queue = qi);
        let _g = span.enter();
        let mut ports = Vec::new();
        let q = &self.queues[qi];
        let budget = |polling: bool| {
            if polling {
                SpinBudget::Duration(POLL_LIMIT)
            } else {
                self.opts.spin
            }
        };
        let mut polling = self.polling.load(Ordering::Relaxed);
        let mut poller = HybridPoll::new(budget(polling));
        // Poll mode gave up on a wait (`POLL_LIMIT` without a response): sleep through the
        // next waits too, until a response comes, so that a backend that stopped answering
        // costs no CPU.
        let mut gave_up = false;
        // Finished chunks, completed after each batch: one list for the thread's life.
        let mut out = Vec::new();
        loop {
            if polling != self.polling.load(Ordering::Relaxed) {
                polling = !polling;
                poller = HybridPoll::new(budget(polling));
            }
            // After a wait the poller gave up on: how long it took.
            poller.woken();
            // Responses a few at a time, each few completed (their callbacks may issue more
            // requests) before the next are taken: see `QState::process`. When responses come
            // in bursts after long waits (a disk, not memory), the backend is waiting for these
            // requests to keep its storage busy and may share this CPU: yield between batches,
            // so that it takes them now rather than after the rest of the burst. `xenpv bench`,
            // randread QD32 on /tmp (a virtio disk that answers the whole queue at once): the
            // first request of a refill reached the disk 42 µs after a burst instead of 79, and
            // IOPS went from 0.78-0.86 of fio's to 0.84-0.92 (7 runs each); without the yield,
            // 0.80-0.81. The yield is for the first requests of a refill only: yielding after
            // every batch had the backend take requests two by two, which halved the IOPS on
            // tmpfs with both drivers on one CPU; and only after long waits (on tmpfs, with
            // responses coming one by one, it cost 16%). After the longest waits (a device's),
            // also every 4th batch: otherwise this thread copies out most of a burst while a
            // backend on this CPU cannot submit (44 µs at a stretch in a trace), and the device
            // runs dry. /tmp randread QD32, interleaved: 0.92, 0.86, 0.86 of fio against 0.90,
            // 0.83, 0.87, blkback's CPU per I/O 5.85-6.11 µs against 6.51-6.84 and ours
            // 2.29-2.59 against 3.04-3.09; on tmpfs with both on one CPU 401k and 398k against
            // 397k and 386k (from 100 µs waits on, it cost 7% there).
            let yield_first = poller.expected() >= YIELD_AFTER_WAITS;
            let yield_often = poller.expected() >= YIELD_OFTEN_AFTER_WAITS;
            // Batches whose callbacks submitted since the last yield (`None`: no yield yet).
            let mut since_yield: Option<u32> = None;
            let r = loop {
                let r = {
                    let mut q = lock(q);
                    match q.process(&self.p.grants, &mut out, RESPONSE_BATCH) {
                        Ok(()) => q.issue(&self.p.grants, &mut out),
                        Err(e) => Err(e),
                    }
                };
                for p in ports.drain(..) {
                    let _ = ev.unmask(p);
                }
                let n = out.len();
                if n > 0 {
                    gave_up = false;
                }
                let before = SUBMITTED_HERE.get();
                complete(&mut out);
                if r.is_err() || n < RESPONSE_BATCH {
                    break r;
                }
                // After the first batch whose callbacks issued requests (a closed-loop client
                // on this thread, not an export whose requests come from its connections'
                // threads), and then every `YIELD_EVERY` such batches after the longest waits.
                if yield_first && SUBMITTED_HERE.get() != before {
                    let due = match since_yield {
                        None => true,
                        Some(n) => yield_often && n + 1 >= YIELD_EVERY,
                    };
                    if due {
                        since_yield = Some(0);
                        std::thread::yield_now();
                    } else {
                        since_yield = since_yield.map(|n| n.saturating_add(1));
                    }
                }
            };
            // Hybrid polling: with requests in flight, poll `rsp_prod` with `rsp_event` unarmed
            // (the backend does not notify meanwhile); then arm it and, if still nothing came,
            // sleep on the event channel. After a device's long waits (`BLOCK_AFTER_WAITS`),
            // no polling at all: sleep on the event channel at once, and the backend notifies
            // once per burst. Polling through such waits (a timer doze, then a spin) kept this
            // thread on the backend's CPU, or woke it after the burst had come (a trace: 82% of
            // bursts, by 63 µs at the median). `xenpv bench`, /tmp randread QD32, 9
            // interleaved pairs: 0.86-0.94 of fio (mean 0.90) against 0.79-0.90 (0.84), this
            // thread's CPU per I/O 1.2-1.7 µs against 2.3-3.0, blkback's 6.9 against 6.4 µs
            // (it now wakes this thread); randwrite QD32 0.88-0.96 against 0.84-0.95.
            // Polling only tries the queue's lock: a thread submitting (an NBD connection's)
            // holds it for a while and must not find it taken by the poller and sleep on it.
            // In poll mode ([`Options::poll`]) polling goes on through long waits too; a stop
            // ends it.
            let busy = lock(q).in_flight() > 0;
            let r = r.and_then(|()| {
                // `blocks_beyond` times the wait it answers for: ask it only with a wait ahead.
                let may_poll = busy
                    && if polling {
                        !gave_up
                    } else {
                        !poller.blocks_beyond(BLOCK_AFTER_WAITS)
                    };
                if may_poll {
                    if poller.poll(|| {
                        (polling && stop.is_set())
                            || try_lock(q).is_some_and(|mut q| q.responses_waiting())
                    }) {
                        return Ok(true);
                    }
                    gave_up = polling && !stop.is_set();
                }
                lock(q).final_check()
            });
            let again = match r {
                Ok(again) => again,
                Err(e @ Error::Protocol(_)) => {
                    tracing::error!("{e}: disconnecting");
                    let mut err = lock(&self.error);
                    if err.is_none() {
                        *err = Some(e);
                    }
                    drop(err);
                    self.phase.store(BROKEN, Ordering::SeqCst);
                    return;
                }
                Err(e) => {
                    tracing::warn!("queue: {e}");
                    false
                }
            };
            if stop.is_set() {
                return;
            }
            if again {
                continue;
            }
            if busy {
                self.busy_sleeps.fetch_add(1, Ordering::Relaxed);
            }
            // Until an event or the stop signal: an idle disk's queue thread is not woken.
            if let Err(e) = ev.wait_or_stop(&mut ports, None, &stop) {
                tracing::warn!("event channel: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn stop_threads(&self) {
        if let Some(s) = lock(&self.stop).as_ref() {
            s.set();
        }
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }

    /// Takes every ring down: requests in flight go back to the front of their backlog
    /// (`requeue`) or fail; event channels are unbound; every grant is revoked (a deferred revoke
    /// leaves the page unused for good).
    fn teardown(&self, requeue: bool) {
        let g = &self.p.grants;
        for q in &self.queues {
            let mut out = Vec::new();
            {
                let mut q = lock(q);
                if let Some(rs) = q.ring.take() {
                    let (ev, port) = (rs.evtchn.clone(), rs.port);
                    let (mem, chunks, pages) = ring_memory(rs);
                    let _ = ev.unbind(port);
                    let n = chunks.len();
                    for mut c in chunks.into_iter().rev() {
                        c.lost = true;
                        q.backlog.push_front(c);
                    }
                    if n > 0 {
                        tracing::info!(requests = n, "requests in flight kept for re-issue");
                    }
                    for p in pages {
                        let _ = g.revoke(p.0);
                    }
                    match g.revoke(mem) {
                        Ok(r) => tracing::debug!(?r, "ring revoked"),
                        Err(e) => tracing::warn!("revoking the ring: {e}"),
                    }
                }
                if !requeue {
                    let e = lock(&self.error).clone().unwrap_or(Error::Closed);
                    out.extend(q.backlog.drain(..).map(|c| (c, Err(e.clone()))));
                }
            }
            complete(&mut out);
        }
    }

    /// The control thread: watches the backend's state; reconnects when it leaves Connected;
    /// disconnects on a protocol error.
    fn control(self: Arc<Self>) {
        let span = tracing::info_span!("vbd", domid = self.be_id, dev = %self.fe);
        let _g = span.enter();
        let xs = self.p.xs.clone();
        let watch = match xs.watch_with_capacity(&format!("{}/state", self.be), 16) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!("cannot watch the backend: {e}; polling");
                None
            }
        };
        // The backend's state is read when its watch fires (or every `RECHECK`), not at every
        // round: a connected disk costs xenstored nothing while nothing changes.
        let mut changes = watch.as_ref().map(|w| Changes::new(&[w], RECHECK));
        loop {
            if self.closing.load(Ordering::SeqCst) {
                return;
            }
            // Whether the backend's state node may have been rewritten since the last look:
            // its watch fired, or a recheck is due (or there is no watch to tell).
            let fired = match &mut changes {
                Some(c) => {
                    c.wait(Duration::from_millis(100));
                    c.due()
                }
                None => {
                    std::thread::sleep(Duration::from_millis(100));
                    true
                }
            };
            if self.closing.load(Ordering::SeqCst) {
                return;
            }
            if self.phase.load(Ordering::SeqCst) == BROKEN {
                self.stop_threads();
                self.teardown(false);
                let why = lock(&self.error)
                    .clone()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                let _ = xs.write_str(&format!("{}/error", self.fe), &why);
                let _ = xenbus::switch_state(&xs, &self.fe, XenbusState::Closing);
                return;
            }
            if !fired {
                continue;
            }
            let s = xenbus::read_state(&xs, &self.be).unwrap_or(XenbusState::Unknown);
            if s == XenbusState::Connected {
                // A backend that is Connected again while we are: an online resize.
                if self.phase.load(Ordering::SeqCst) == CONNECTED {
                    self.resize(&xs);
                }
                continue;
            }
            if !self.opts.reconnect {
                // As Linux's xen-blkfront: ignore a backend back at InitWait (or earlier)
                // while connected; a closing backend takes the disk with it.
                if matches!(
                    s,
                    XenbusState::Closing | XenbusState::Closed | XenbusState::Unknown
                ) {
                    tracing::error!(state = ?s, "backend closed the device: the disk fails");
                    self.fail_disk(format!("{s:?}"));
                }
                continue;
            }
            if self.removed(&xs) {
                tracing::error!(state = ?s, "the toolstack removed the device: the disk fails");
                self.fail_disk("device removed".into());
                continue;
            }
            tracing::warn!(state = ?s, "backend left Connected: reconnecting");
            self.phase.store(RECONNECTING, Ordering::SeqCst);
            // Stale nodes first, so that no backend attaches to the old rings.
            if let Err(e) = self.reset_nodes() {
                tracing::warn!("resetting nodes: {e}");
            }
            self.stop_threads();
            self.teardown(true);
            loop {
                if self.closing.load(Ordering::SeqCst) {
                    return;
                }
                match self.negotiate() {
                    Ok(()) => {
                        self.reconnects.fetch_add(1, Ordering::SeqCst);
                        tracing::info!("reconnected");
                        break;
                    }
                    Err(e) if self.removed(&xs) => {
                        tracing::error!("reconnect failed ({e}): the toolstack removed the device");
                        self.fail_disk("device removed".into());
                        break;
                    }
                    Err(e) => {
                        tracing::warn!("reconnect failed: {e}; retrying");
                        self.stop_threads();
                        self.teardown(true);
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::capacity;

    const S: &str = "backend/vbd/1/51712/sectors";

    #[test]
    fn a_sectors_node_must_be_a_count_whose_byte_size_fits() {
        assert_eq!(capacity(S, b"16384").ok(), Some(16384));
        assert_eq!(capacity(S, b" 8\n").ok(), Some(8));
        assert_eq!(capacity(S, b"0").ok(), Some(0));
        // The largest count whose byte size fits, and the first that does not.
        assert_eq!(capacity(S, b"36028797018963967").ok(), Some(u64::MAX / 512));
        assert!(capacity(S, b"36028797018963968").is_err());
        assert!(capacity(S, b"18446744073709551615").is_err());
        assert!(capacity(S, b"18446744073709551616").is_err());
        for bad in [&b""[..], b"-1", b"0x10", b"12 sectors", b"\xff\xfe", b"1e9"] {
            assert!(capacity(S, bad).is_err(), "{bad:?} accepted");
        }
    }
}
