//! One ring of a device: drain requests, validate them, move data between storage and the
//! frontend's granted pages, answer, and tell the caller whether to notify.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use xenpv_grant::{Access, DomId, GrantMap, GrantMemory, MapCache, VolatileSlice, PAGE_SIZE};
use xenpv_ring::blkif::{
    Blkif, BlkifRequest, BlkifRequestSegment, BlkifResponse, BlkifX86_32, X86_32Request,
    X86_32Response, OP_DISCARD, OP_FLUSH_DISKCACHE, OP_READ, OP_WRITE, OP_WRITE_BARRIER, RSP_ERROR,
    RSP_OKAY,
};
use xenpv_ring::{BackRing, RingMemory, RingProtocol};

use crate::request::{indirect_segments, validate, Direction, Limits, Plan, Segment};
use crate::storage::Storage;

/// A blkif ABI the backend serves: how its slots translate to the native layout.
pub trait Abi: RingProtocol {
    /// The request in the native layout.
    fn to_native(req: &Self::Req) -> BlkifRequest;
    /// The response in this ABI's layout.
    fn response(rsp: BlkifResponse) -> Self::Rsp;
}

impl Abi for Blkif {
    fn to_native(req: &BlkifRequest) -> BlkifRequest {
        *req
    }
    fn response(rsp: BlkifResponse) -> BlkifResponse {
        rsp
    }
}

impl Abi for BlkifX86_32 {
    fn to_native(req: &X86_32Request) -> BlkifRequest {
        req.to_native()
    }
    fn response(rsp: BlkifResponse) -> X86_32Response {
        X86_32Response::from(rsp)
    }
}

/// Per-device counters, shared by its queues and read by the status reporting.
#[derive(Debug, Default)]
pub struct Stats {
    /// Read requests answered OKAY.
    pub reads: AtomicU64,
    /// Write requests answered OKAY.
    pub writes: AtomicU64,
    /// Flushes and barriers answered OKAY.
    pub flushes: AtomicU64,
    /// Discards answered OKAY.
    pub discards: AtomicU64,
    /// 512-byte sectors read.
    pub sectors_read: AtomicU64,
    /// 512-byte sectors written.
    pub sectors_written: AtomicU64,
    /// Requests answered with an error (refused or failed).
    pub errors: AtomicU64,
    /// Times the ring held a full ring's worth of requests when drained.
    pub ring_full: AtomicU64,
    /// Notifications sent to the frontend.
    pub notifications: AtomicU64,
}

impl Stats {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Why a request failed after validation (answered `BLKIF_RSP_ERROR`).
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Grant(#[from] xenpv_grant::Error),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One ring of a device.
pub struct Queue<P: Abi, M: RingMemory, G: GrantMap> {
    ring: BackRing<P, M>,
    frontend: DomId,
    maps: MapCache<G>,
    persistent: bool,
    storage: Arc<dyn Storage>,
    limits: Limits,
    stats: Arc<Stats>,
}

impl<P: Abi, M: RingMemory, G: GrantMap> Queue<P, M, G>
where
    G::Mapping: GrantMemory,
{
    /// A queue serving `ring` for domain `frontend`. With `persistent`, data grants stay
    /// mapped in `maps` (`feature-persistent`); otherwise each request maps and unmaps them.
    pub fn new(
        ring: BackRing<P, M>,
        frontend: DomId,
        maps: MapCache<G>,
        persistent: bool,
        storage: Arc<dyn Storage>,
        limits: Limits,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            ring,
            frontend,
            maps,
            persistent,
            storage,
            limits,
            stats,
        }
    }

    /// The ring.
    pub fn ring(&self) -> &BackRing<P, M> {
        &self.ring
    }

    /// Serves every request the frontend has published, then re-arms `req_event` (final
    /// check). Returns whether the frontend must be notified. An error is a protocol error of
    /// the frontend (an impossible ring index): stop serving this device.
    pub fn service(&mut self) -> xenpv_ring::Result<bool> {
        let mut notify = false;
        loop {
            if self.ring.unconsumed_requests()? == self.ring.size() {
                Stats::add(&self.stats.ring_full, 1);
            }
            while let Some(req) = self.ring.next_request()? {
                let native = P::to_native(&req);
                let status = self.execute(&native);
                self.ring.produce(P::response(BlkifResponse::new(
                    native.id,
                    native.operation,
                    status,
                )))?;
            }
            notify |= self.ring.push_responses();
            if !self.ring.final_check_for_requests()? {
                break;
            }
        }
        if notify {
            Stats::add(&self.stats.notifications, 1);
        }
        Ok(notify)
    }

    /// Unmaps every persistently mapped grant (on disconnect).
    pub fn release_mappings(&mut self) {
        self.maps.clear();
    }

    fn execute(&mut self, req: &BlkifRequest) -> i16 {
        let result = match validate(req, &self.limits) {
            Err(refusal) => {
                tracing::debug!(
                    id = req.id,
                    op = req.operation,
                    "request refused: {refusal}"
                );
                Stats::add(&self.stats.errors, 1);
                return refusal.status();
            }
            Ok(plan) => self.run(plan),
        };
        match result {
            Ok(()) => {
                match req.operation {
                    OP_READ => Stats::add(&self.stats.reads, 1),
                    OP_WRITE => Stats::add(&self.stats.writes, 1),
                    OP_FLUSH_DISKCACHE | OP_WRITE_BARRIER => Stats::add(&self.stats.flushes, 1),
                    OP_DISCARD => Stats::add(&self.stats.discards, 1),
                    _ => {}
                }
                RSP_OKAY
            }
            Err(e) => {
                tracing::debug!(id = req.id, op = req.operation, "request failed: {e}");
                Stats::add(&self.stats.errors, 1);
                RSP_ERROR
            }
        }
    }

    fn run(&mut self, plan: Plan) -> Result<(), Failure> {
        match plan {
            Plan::Flush { .. } => Ok(self.storage.flush()?),
            Plan::Discard { offset, len, .. } => Ok(self.storage.discard(offset, len)?),
            Plan::Indirect {
                dir,
                offset,
                nr_segments,
                pages,
            } => {
                let refs: Vec<_> = pages.iter().map(|&g| (self.frontend, g)).collect();
                let mapping = self.maps.grants().map(&refs, Access::ReadOnly)?;
                let mem = mapping.volatile();
                let seg_size = std::mem::size_of::<BlkifRequestSegment>();
                let mut segs = Vec::with_capacity(usize::from(nr_segments));
                for i in 0..usize::from(nr_segments) {
                    // Copied out once; `i * 8` stays inside the mapped pages (nr_segments ≤
                    // 512 per page, checked by `validate`).
                    segs.push(mem.read_obj::<BlkifRequestSegment>(i * seg_size)?);
                }
                drop(mapping);
                let plan = indirect_segments(dir, offset, &segs, &self.limits)
                    .map_err(|r| io::Error::new(io::ErrorKind::InvalidInput, r.to_string()))?;
                self.run(plan)
            }
            Plan::Transfer {
                dir,
                offset,
                segments,
                flush_before,
                barrier,
            } => {
                if flush_before || barrier {
                    self.storage.flush()?;
                }
                self.transfer(dir, offset, &segments)?;
                if barrier {
                    self.storage.flush()?;
                }
                Ok(())
            }
        }
    }

    fn transfer(
        &mut self,
        dir: Direction,
        offset: u64,
        segments: &[Segment],
    ) -> Result<(), Failure> {
        // A read from disk writes into the guest's pages: map them writable.
        let access = match dir {
            Direction::Read => Access::Writable,
            Direction::Write => Access::ReadOnly,
        };
        let bytes: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
        let io = |bufs: &[VolatileSlice<'_>], storage: &dyn Storage| match dir {
            Direction::Read => storage.read_into(offset, bufs),
            Direction::Write => storage.write_from(offset, bufs),
        };
        if self.persistent {
            let mut maps = Vec::with_capacity(segments.len());
            for s in segments {
                maps.push(self.maps.get(self.frontend, s.gref, access)?);
            }
            let mut bufs = Vec::with_capacity(segments.len());
            for (m, s) in maps.iter().zip(segments) {
                bufs.push(
                    m.volatile()
                        .subslice(usize::from(s.offset), usize::from(s.len))?,
                );
            }
            io(&bufs, self.storage.as_ref())?;
        } else {
            let refs: Vec<_> = segments.iter().map(|s| (self.frontend, s.gref)).collect();
            let mapping = self.maps.grants().map(&refs, access)?;
            let mem = mapping.volatile();
            let mut bufs = Vec::with_capacity(segments.len());
            for (i, s) in segments.iter().enumerate() {
                bufs.push(mem.subslice(i * PAGE_SIZE + usize::from(s.offset), usize::from(s.len))?);
            }
            io(&bufs, self.storage.as_ref())?;
        }
        let sectors = bytes / 512;
        match dir {
            Direction::Read => Stats::add(&self.stats.sectors_read, sectors),
            Direction::Write => Stats::add(&self.stats.sectors_written, sectors),
        }
        Ok(())
    }
}
