//! One ring of a device: drain requests, validate them, move data between storage and the
//! frontend's granted pages, answer, and tell the caller whether to notify.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use xenpv_grant::{Access, DomId, GrantMap, GrantMemory, MapCache, PAGE_SIZE};
use xenpv_ring::blkif::{
    Blkif, BlkifRequest, BlkifRequestSegment, BlkifResponse, BlkifX86_32, X86_32Request,
    X86_32Response, OP_DISCARD, OP_FLUSH_DISKCACHE, OP_INDIRECT, OP_READ, OP_WRITE,
    OP_WRITE_BARRIER, RSP_ERROR, RSP_OKAY,
};
use xenpv_ring::{BackRing, RingMemory, RingProtocol};

use crate::journal::QueueJournal;
use crate::request::{indirect_segments, validate, Direction, Limits, Plan, Segment};
use crate::storage::{Op, Storage};

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
    /// Reads and writes answered OKAY that came with indirect descriptors.
    pub indirect: AtomicU64,
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
    journal: Option<QueueJournal>,
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
            journal: None,
        }
    }

    /// Keeps the copy of every request consumed in `journal` (and its `req_cons`), so that a
    /// restarted backend can answer what this one consumed and did not answer
    /// ([`crate::journal`]).
    pub fn with_journal(mut self, journal: QueueJournal) -> Self {
        self.journal = Some(journal);
        self
    }

    /// Answers the requests a previous backend instance consumed and did not answer (`pending`,
    /// native layout, in ring order, from its journal), on a ring attached with
    /// [`BackRing::resume`]: each is executed again (reads, writes, flushes and discards are
    /// idempotent) and its response produced at the shared `rsp_prod`. Their copies stay in the
    /// journal until the responses are published. Returns whether to notify.
    pub fn resume(&mut self, pending: &[BlkifRequest]) -> xenpv_ring::Result<bool> {
        self.limits.sectors = self.storage.size() / 512;
        let mut notify = false;
        for part in pending.chunks(MAX_BATCH_REQUESTS) {
            let chunk: Vec<_> = part.iter().map(|r| self.prepare(r)).collect();
            self.answer(&chunk)?;
            notify |= self.ring.push_responses();
        }
        if notify {
            Stats::add(&self.stats.notifications, 1);
        }
        Ok(notify)
    }

    fn answer(&mut self, chunk: &[Prepared<G::Mapping>]) -> xenpv_ring::Result<()> {
        let statuses = self.execute(chunk);
        for (p, status) in chunk.iter().zip(statuses) {
            self.ring
                .produce(P::response(BlkifResponse::new(p.id, p.operation, status)))?;
        }
        Ok(())
    }

    /// The ring.
    pub fn ring(&self) -> &BackRing<P, M> {
        &self.ring
    }

    /// Serves every request the frontend has published, then re-arms `req_event` (final
    /// check). Returns whether the frontend must be notified. An error is a protocol error of
    /// the frontend (an impossible ring index): stop serving this device.
    ///
    /// Requests are taken in chunks (at most [`MAX_BATCH_REQUESTS`] requests or
    /// [`MAX_BATCH_PAGES`] mapped pages); the transfers of a chunk go to the storage as batches
    /// ([`Storage::submit`]) so that an asynchronous engine has them all in flight at once.
    /// Ops that conflict ([`Op::conflicts`]: overlapping writes, flushes, barriers) go to
    /// separate batches, in ring order, so the outcome is that of serving the requests one by
    /// one. Responses of a chunk are produced in ring order once it completes, and published
    /// before the next chunk is taken (the journal relies on both).
    pub fn service(&mut self) -> xenpv_ring::Result<bool> {
        let mut notify = false;
        // The disk may have grown (online resize): check requests against its size now.
        self.limits.sectors = self.storage.size() / 512;
        loop {
            if self.ring.unconsumed_requests()? == self.ring.size() {
                Stats::add(&self.stats.ring_full, 1);
            }
            loop {
                let mut chunk: Vec<Prepared<G::Mapping>> = Vec::new();
                let mut pages = 0usize;
                while chunk.len() < MAX_BATCH_REQUESTS && pages < MAX_BATCH_PAGES {
                    let idx = self.ring.req_cons();
                    let Some(req) = self.ring.next_request()? else {
                        break;
                    };
                    let native = P::to_native(&req);
                    if let Some(j) = &mut self.journal {
                        j.record(idx, &native);
                    }
                    let p = self.prepare(&native);
                    pages += p.pages();
                    chunk.push(p);
                }
                if chunk.is_empty() {
                    break;
                }
                // The copies count before any response is written over their slots.
                if let Some(j) = &mut self.journal {
                    j.commit(self.ring.req_cons());
                }
                self.answer(&chunk)?;
                // Published after every chunk, so that the ring never lets us consume more
                // than a ring beyond the published responses: a journal slot is reused only
                // once the response to its request is visible to the frontend.
                notify |= self.ring.push_responses();
            }
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

    /// Validates a request and maps its data (resolving indirect segments): everything up to
    /// the I/O itself. Failures become the request's status.
    fn prepare(&mut self, req: &BlkifRequest) -> Prepared<G::Mapping> {
        // An indirect request is answered with its inner operation (`indirect_op`): Linux's
        // blkfront compares the response's operation with that and fails the disk otherwise.
        let operation = match req.operation {
            OP_INDIRECT => req.as_indirect().indirect_op,
            op => op,
        };
        let mut p = Prepared {
            id: req.id,
            operation,
            indirect: req.operation == OP_INDIRECT,
            outcome: Ok(()),
            steps: Vec::new(),
            sectors: 0,
        };
        let plan = match validate(req, &self.limits) {
            Err(refusal) => {
                tracing::debug!(
                    id = req.id,
                    op = req.operation,
                    "request refused: {refusal}"
                );
                p.outcome = Err(refusal.status());
                return p;
            }
            Ok(plan) => plan,
        };
        if let Err(e) = self.plan_steps(plan, &mut p) {
            tracing::debug!(id = req.id, op = req.operation, "request failed: {e}");
            p.outcome = Err(RSP_ERROR);
            p.steps.clear();
        }
        p
    }

    fn plan_steps(&mut self, plan: Plan, p: &mut Prepared<G::Mapping>) -> Result<(), Failure> {
        match plan {
            Plan::Flush { .. } => p.steps.push(Step::Flush),
            Plan::Discard { offset, len, .. } => p.steps.push(Step::Discard { offset, len }),
            Plan::Indirect {
                dir,
                offset,
                nr_segments,
                pages,
            } => {
                let seg_size = std::mem::size_of::<BlkifRequestSegment>();
                let mut segs = Vec::with_capacity(usize::from(nr_segments));
                if self.persistent {
                    // With persistent grants the frontend keeps its indirect pages granted
                    // (Linux's blkfront does too): map them through the cache like data pages,
                    // instead of a map and an unmap (a broker round trip each on the local
                    // platform, an ioctl pair and a TLB flush on Xen) per request.
                    let per_page = PAGE_SIZE / seg_size;
                    for (k, &g) in pages.iter().enumerate() {
                        let first = k * per_page;
                        let n = usize::from(nr_segments).saturating_sub(first).min(per_page);
                        if n == 0 {
                            break;
                        }
                        let page = self.maps.get(self.frontend, g, Access::ReadOnly)?;
                        let mem = page.volatile();
                        for i in 0..n {
                            // Copied out once; `i * 8` stays inside the page (i < 512).
                            segs.push(mem.read_obj::<BlkifRequestSegment>(i * seg_size)?);
                        }
                    }
                } else {
                    let refs: Vec<_> = pages.iter().map(|&g| (self.frontend, g)).collect();
                    let mapping = self.maps.grants().map(&refs, Access::ReadOnly)?;
                    let mem = mapping.volatile();
                    for i in 0..usize::from(nr_segments) {
                        // Copied out once; `i * 8` stays inside the mapped pages (nr_segments
                        // ≤ 512 per page, checked by `validate`).
                        segs.push(mem.read_obj::<BlkifRequestSegment>(i * seg_size)?);
                    }
                }
                let plan = indirect_segments(dir, offset, &segs, &self.limits)
                    .map_err(|r| io::Error::new(io::ErrorKind::InvalidInput, r.to_string()))?;
                return self.plan_steps(plan, p);
            }
            Plan::Transfer {
                dir,
                offset,
                segments,
                flush_before,
                barrier,
            } => {
                if flush_before || barrier {
                    p.steps.push(Step::Flush);
                }
                // A read from disk writes into the guest's pages: map them writable.
                let access = match dir {
                    Direction::Read => Access::Writable,
                    Direction::Write => Access::ReadOnly,
                };
                let pages = if self.persistent {
                    let mut maps = Vec::with_capacity(segments.len());
                    for s in &segments {
                        maps.push(self.maps.get(self.frontend, s.gref, access)?);
                    }
                    Pages::Persistent(maps)
                } else {
                    let refs: Vec<_> = segments.iter().map(|s| (self.frontend, s.gref)).collect();
                    Pages::Whole(self.maps.grants().map(&refs, access)?)
                };
                p.sectors = segments.iter().map(|s| u64::from(s.len)).sum::<u64>() / 512;
                p.steps.push(Step::Transfer {
                    dir,
                    offset,
                    segments,
                    pages,
                });
                if barrier {
                    p.steps.push(Step::Flush);
                }
            }
        }
        Ok(())
    }

    /// Runs the steps of a chunk of prepared requests in batches and returns each request's
    /// status, counting statistics.
    fn execute(&self, chunk: &[Prepared<G::Mapping>]) -> Vec<i16> {
        let storage = self.storage.as_ref();
        let mut failed: Vec<Option<Failure>> = chunk.iter().map(|_| None).collect();
        let mut batch: Vec<Op<'_>> = Vec::new();
        let mut owners: Vec<usize> = Vec::new();
        let run =
            |batch: &mut Vec<Op<'_>>, owners: &mut Vec<usize>, failed: &mut [Option<Failure>]| {
                if batch.is_empty() {
                    return;
                }
                for (r, owner) in storage.submit(batch).into_iter().zip(owners.iter()) {
                    if let Err(e) = r {
                        failed[*owner].get_or_insert(Failure::Io(e));
                    }
                }
                batch.clear();
                owners.clear();
            };
        for (i, p) in chunk.iter().enumerate() {
            if p.outcome.is_err() {
                continue;
            }
            for step in &p.steps {
                let op = match step.op() {
                    Ok(op) => op,
                    Err(e) => {
                        failed[i].get_or_insert(e);
                        break;
                    }
                };
                // A request's steps run in order; conflicting ops of different requests too.
                if owners.contains(&i) || batch.iter().any(|b| b.conflicts(&op)) {
                    run(&mut batch, &mut owners, &mut failed);
                }
                if failed[i].is_some() {
                    break;
                }
                batch.push(op);
                owners.push(i);
            }
        }
        run(&mut batch, &mut owners, &mut failed);

        chunk
            .iter()
            .zip(failed)
            .map(|(p, f)| {
                let status = match (p.outcome, f) {
                    (Err(status), _) => status,
                    (Ok(()), Some(e)) => {
                        tracing::debug!(id = p.id, op = p.operation, "request failed: {e}");
                        RSP_ERROR
                    }
                    (Ok(()), None) => RSP_OKAY,
                };
                self.count(p, status);
                status
            })
            .collect()
    }

    fn count(&self, p: &Prepared<G::Mapping>, status: i16) {
        if status != RSP_OKAY {
            Stats::add(&self.stats.errors, 1);
            return;
        }
        match p.operation {
            OP_READ => Stats::add(&self.stats.reads, 1),
            OP_WRITE => Stats::add(&self.stats.writes, 1),
            OP_FLUSH_DISKCACHE | OP_WRITE_BARRIER => Stats::add(&self.stats.flushes, 1),
            OP_DISCARD => Stats::add(&self.stats.discards, 1),
            _ => {}
        }
        if p.indirect {
            Stats::add(&self.stats.indirect, 1);
        }
        for step in &p.steps {
            if let Step::Transfer { dir, .. } = step {
                match dir {
                    Direction::Read => Stats::add(&self.stats.sectors_read, p.sectors),
                    Direction::Write => Stats::add(&self.stats.sectors_written, p.sectors),
                }
            }
        }
    }
}

/// Requests taken from the ring per chunk (their transfers may all be in flight together).
pub const MAX_BATCH_REQUESTS: usize = 64;
/// Grant pages mapped per chunk, at most (a chunk stops taking requests past this).
pub const MAX_BATCH_PAGES: usize = 2048;

/// The data pages of one transfer, mapped.
enum Pages<M> {
    /// One persistent mapping per segment.
    Persistent(Vec<Arc<M>>),
    /// One contiguous mapping of every segment's page, unmapped when the request completes.
    Whole(M),
}

/// One storage step of a request.
enum Step<M> {
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    Transfer {
        dir: Direction,
        offset: u64,
        segments: Vec<Segment>,
        pages: Pages<M>,
    },
}

impl<M: GrantMemory> Step<M> {
    fn op(&self) -> Result<Op<'_>, Failure> {
        Ok(match self {
            Step::Flush => Op::Flush,
            Step::Discard { offset, len } => Op::Discard {
                offset: *offset,
                len: *len,
            },
            Step::Transfer {
                dir,
                offset,
                segments,
                pages,
            } => {
                let mut bufs = Vec::with_capacity(segments.len());
                match pages {
                    Pages::Persistent(maps) => {
                        for (m, s) in maps.iter().zip(segments) {
                            bufs.push(
                                m.volatile()
                                    .subslice(usize::from(s.offset), usize::from(s.len))?,
                            );
                        }
                    }
                    Pages::Whole(m) => {
                        let mem = m.volatile();
                        for (i, s) in segments.iter().enumerate() {
                            bufs.push(mem.subslice(
                                i * PAGE_SIZE + usize::from(s.offset),
                                usize::from(s.len),
                            )?);
                        }
                    }
                }
                match dir {
                    Direction::Read => Op::Read {
                        offset: *offset,
                        bufs,
                    },
                    Direction::Write => Op::Write {
                        offset: *offset,
                        bufs,
                    },
                }
            }
        })
    }
}

/// A request validated and mapped, waiting for its I/O.
struct Prepared<M> {
    id: u64,
    operation: u8,
    /// It came as `BLKIF_OP_INDIRECT` (`operation` is then its `indirect_op`).
    indirect: bool,
    /// `Err(status)`: refused or failed before any I/O.
    outcome: Result<(), i16>,
    steps: Vec<Step<M>>,
    sectors: u64,
}

impl<M> Prepared<M> {
    fn pages(&self) -> usize {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Transfer { segments, .. } => segments.len(),
                _ => 0,
            })
            .sum()
    }
}
