//! One ring of a device: drain requests, validate them, move data between storage and the
//! frontend's granted pages, answer, and tell the caller whether to notify.
//!
//! Every request consumed holds one of the ring's `RING_SIZE` *slots* (the index of its entry
//! in the journal, [`crate::journal`], and of its state in a pipelined queue) from the moment
//! it is taken until its response is published. A pipelined queue answers each request as
//! soon as its I/O completes, out of ring order (frontends match responses by id; Linux's
//! blkback does the same), so a slow request holds back no other; the queue publishes what it
//! answered before it takes more, so a free slot is there for every request the ring offers.

use std::collections::VecDeque;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use smallvec::SmallVec;
use xenpv_grant::{Access, DomId, GrantMap, GrantMemory, MapCache, Mappings, PAGE_SIZE};
use xenpv_ring::blkif::{
    Blkif, BlkifRequest, BlkifRequestSegment, BlkifResponse, BlkifX86_32, X86_32Request,
    X86_32Response, OP_DISCARD, OP_FLUSH_DISKCACHE, OP_INDIRECT, OP_READ, OP_WRITE,
    OP_WRITE_BARRIER, RSP_ERROR, RSP_OKAY,
};
use xenpv_ring::{BackRing, RingMemory, RingProtocol};

use crate::journal::{Pending, QueueJournal, MAX_AGE};
use crate::request::{indirect_segments, validate, Direction, Limits, Plan, Segments};
use crate::storage::{Bufs, Completion, Op, Pipeline, Storage};

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
    /// Times the frontend had filled every slot of the ring (requests not yet taken and ones
    /// awaiting their answers) when requests were taken: it could send no more until answered.
    pub ring_full: AtomicU64,
    /// Notifications sent to the frontend.
    pub notifications: AtomicU64,
    /// Reads and writes answered OKAY that came with indirect descriptors.
    pub indirect: AtomicU64,
    /// Reads and writes with persistent grants whose pages found no room among the cached
    /// mappings (the queue's capacity or the daemon's budget spent, the rest in use): mapped
    /// for their duration only.
    pub uncached: AtomicU64,
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
    /// The storage's pipeline for this queue, if it has one: requests are then served as a
    /// continuous pipeline ([`Queue::pump`]) instead of in chunks.
    pipe: Option<Box<dyn Pipeline>>,
    /// Requests consumed and not answered yet (pipelined queues), by slot. Each keeps its
    /// mappings until it is answered (after its I/O completed).
    flights: Vec<Option<Flight<G::Mapping>>>,
    /// The slots of `flights` that hold a request, in ring order (the order conflicting
    /// requests are served in): the front is the oldest request not answered.
    order: VecDeque<u32>,
    /// Data pages mapped by the requests of `flights`.
    window_pages: usize,
    /// Slots free, the longest free first. A slot is free once the response to its request is
    /// published.
    free: VecDeque<u32>,
    /// Slots whose requests were answered, their responses not published yet.
    unpublished: Vec<u32>,
    /// Most ring indexes taken past the oldest request not answered ([`MAX_AGE`]).
    max_age: u32,
    completions: Vec<Completion>,
    /// Scratch for `answer_done`: the slots of the requests answered in a round.
    answered: Vec<u32>,
    /// Scratch for `issue`: read and write spans of unfinished steps.
    spans: (Vec<Range>, Vec<Range>),
    /// Scratch for `serve_chunks` (a queue without a pipeline): the chunk being served, its
    /// slots, and their statuses; kept so that serving a chunk allocates nothing.
    chunk: Vec<Prepared<G::Mapping>>,
    chunk_slots: Vec<u32>,
    statuses: Vec<i16>,
}

/// What one round of [`Queue::pump`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pump {
    /// Responses were published and the frontend asked to be notified.
    pub notify: bool,
    /// Something happened (a completion, a request taken): another round may do more.
    pub progressed: bool,
}

impl<P: Abi, M: RingMemory, G: GrantMap> Drop for Queue<P, M, G> {
    fn drop(&mut self) {
        // The storage may still be writing into the pages of requests in flight: keep their
        // mappings until it is done.
        self.wait_all();
    }
}

impl<P: Abi, M: RingMemory, G: GrantMap> Queue<P, M, G> {
    /// Waits for every op the pipeline has in flight (their results are dropped).
    fn wait_all(&mut self) {
        if let Some(pipe) = self.pipe.as_mut() {
            while pipe.in_flight() > 0 {
                self.completions.clear();
                pipe.wait(None, &mut self.completions);
            }
            self.completions.clear();
        }
    }
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
        let pipe = storage.pipeline();
        let slots = ring.size();
        let mut q = Self {
            ring,
            frontend,
            maps,
            persistent,
            storage,
            limits,
            stats,
            journal: None,
            pipe,
            flights: Vec::new(),
            order: VecDeque::new(),
            window_pages: 0,
            free: VecDeque::new(),
            unpublished: Vec::new(),
            max_age: MAX_AGE,
            completions: Vec::new(),
            answered: Vec::new(),
            spans: (Vec::new(), Vec::new()),
            chunk: Vec::new(),
            chunk_slots: Vec::new(),
            statuses: Vec::new(),
        };
        q.set_slots(slots);
        q
    }

    /// `slots` slots, all free (before any request is taken).
    fn set_slots(&mut self, slots: u32) {
        self.free = (0..slots).collect();
        self.flights.clear();
        self.flights.resize_with(slots as usize, || None);
        self.order.clear();
        self.unpublished.clear();
        self.window_pages = 0;
    }

    /// Whether requests are served as a continuous pipeline ([`pump`](Self::pump)): the
    /// storage keeps I/O in flight across calls (io_uring on a file not in memory).
    pub fn pipelined(&self) -> bool {
        self.pipe.is_some()
    }

    /// Requests consumed and not answered yet (pipelined queues).
    pub fn in_flight(&self) -> usize {
        self.order.len()
    }

    /// Keeps the copy of every request consumed in `journal` (and its `req_cons`, and whether
    /// and where each was answered), so that a restarted backend can answer what this one
    /// consumed and did not answer ([`crate::journal`]). Call it before serving.
    pub fn with_journal(mut self, journal: QueueJournal) -> Self {
        // One slot per ring entry in both (the journal describes this ring).
        self.set_slots(self.ring.size().min(journal.entries()));
        self.journal = Some(journal);
        self
    }

    /// Lowers the bound on how far past its oldest unanswered request the queue takes
    /// requests (at most and by default [`MAX_AGE`] ring indexes, which only a request stuck
    /// in the storage for billions of others reaches). For tests of that bound.
    pub fn with_max_age(mut self, max_age: u32) -> Self {
        self.max_age = max_age.clamp(1, MAX_AGE);
        self
    }

    /// Starts serving a ring attached with [`BackRing::resume`]: answers the requests a
    /// previous backend instance consumed and did not answer (`pending`, from its journal,
    /// [`crate::journal::RecoveredQueue::pending`]). First it resets the journal's slots (those
    /// of `pending` in flight, the others free); then each request is executed again (reads,
    /// writes, flushes and discards are idempotent), in the order they were consumed, and its
    /// response produced from the shared `rsp_prod` on. Call it once, before anything else,
    /// also with nothing pending. Returns whether to notify.
    pub fn resume(&mut self, pending: &[Pending]) -> xenpv_ring::Result<bool> {
        self.limits.sectors = self.storage.size() / 512;
        if let Some(j) = &mut self.journal {
            j.reset(pending);
        }
        self.free.retain(|s| !pending.iter().any(|p| p.slot == *s));
        let mut notify = false;
        for part in pending.chunks(MAX_BATCH_REQUESTS) {
            let mut chunk = std::mem::take(&mut self.chunk);
            let mut slots = std::mem::take(&mut self.chunk_slots);
            slots.extend(part.iter().map(|p| p.slot));
            for p in part {
                chunk.push(self.prepare(&p.request));
            }
            let answered = self.answer(&slots, &chunk);
            self.recycle(chunk, slots);
            answered?;
            notify |= self.publish();
        }
        if notify {
            Stats::add(&self.stats.notifications, 1);
        }
        Ok(notify)
    }

    /// Executes a chunk (the requests of `slots`) and answers it, in chunk order.
    fn answer(&mut self, slots: &[u32], chunk: &[Prepared<G::Mapping>]) -> xenpv_ring::Result<()> {
        let mut statuses = std::mem::take(&mut self.statuses);
        statuses.clear();
        self.execute(chunk, &mut statuses);
        let mut r = Ok(());
        for ((&slot, p), &status) in slots.iter().zip(chunk).zip(&statuses) {
            r = self.respond(slot, p.id, p.operation, status);
            if r.is_err() {
                break;
            }
        }
        self.statuses = statuses;
        r
    }

    /// Gives the scratch buffers of a chunk back, emptied: the requests' mappings are released
    /// here (a request without persistent grants unmaps its pages as it is dropped).
    fn recycle(&mut self, mut chunk: Vec<Prepared<G::Mapping>>, mut slots: Vec<u32>) {
        chunk.clear();
        slots.clear();
        self.chunk = chunk;
        self.chunk_slots = slots;
    }

    /// Writes the response to the request of `slot` into the ring, then marks it answered
    /// there in the journal; it is published by the next [`publish`](Self::publish).
    fn respond(
        &mut self,
        slot: u32,
        id: u64,
        operation: u8,
        status: i16,
    ) -> xenpv_ring::Result<()> {
        let at = self
            .ring
            .produce(P::response(BlkifResponse::new(id, operation, status)))?;
        if let Some(j) = &mut self.journal {
            j.answered(slot, at);
        }
        self.unpublished.push(slot);
        Ok(())
    }

    /// Publishes every response produced (`rsp_prod`), then frees their slots, in the journal
    /// too. Returns whether the frontend must be notified.
    fn publish(&mut self) -> bool {
        let notify = self.ring.push_responses();
        for slot in self.unpublished.drain(..) {
            if let Some(j) = &mut self.journal {
                j.release(slot);
            }
            if (slot as usize) < self.flights.len() {
                self.free.push_back(slot);
            }
        }
        notify
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
    /// ([`Storage::submit`]) so that an asynchronous engine has them all in flight at once, or,
    /// to a serial storage ([`Storage::serial`]), op by op in ring order ([`Storage::run`]).
    /// Ops that conflict ([`Op::conflicts`]: overlapping writes, flushes, barriers) go to
    /// separate batches, in ring order, so the outcome is that of serving the requests one by
    /// one. Responses of a chunk are produced in ring order once it completes (each marked
    /// answered in the journal), and published before the next chunk is taken.
    ///
    /// A pipelined queue ([`pipelined`](Self::pipelined)) runs [`pump`](Self::pump) until the
    /// ring is empty and every request is answered, waiting for the storage in between.
    pub fn service(&mut self) -> xenpv_ring::Result<bool> {
        self.serve(true)
    }

    /// [`service`](Self::service), but with `arm` false a queue without a pipeline leaves
    /// `req_event` as it is when the ring is empty (no final check): for a caller that polls
    /// the ring next ([`work_waiting`](Self::work_waiting)) and calls
    /// [`final_check`](Self::final_check) only before it sleeps, so that the frontend does not
    /// notify while we poll.
    pub fn serve(&mut self, arm: bool) -> xenpv_ring::Result<bool> {
        let mut notify = false;
        self.serve_notifying(arm, &mut || notify = true)?;
        Ok(notify)
    }

    /// [`serve`](Self::serve), calling `notify` whenever the frontend must be notified: for a
    /// storage that works serially ([`Storage::serial`]) after each chunk, as soon as its
    /// responses are published, so that a sleeping frontend consumes them while later requests
    /// are served; otherwise once, at the end.
    pub fn serve_notifying(
        &mut self,
        arm: bool,
        notify: &mut dyn FnMut(),
    ) -> xenpv_ring::Result<()> {
        if self.serve_chunks(arm, notify)? {
            Stats::add(&self.stats.notifications, 1);
            notify();
        }
        Ok(())
    }

    /// The body of [`serve_notifying`](Self::serve_notifying): returns whether a notification
    /// is still owed (those it sent early are counted and sent already).
    fn serve_chunks(&mut self, arm: bool, notify: &mut dyn FnMut()) -> xenpv_ring::Result<bool> {
        if self.pipe.is_some() {
            let mut owed = false;
            loop {
                let p = self.pump_round()?;
                owed |= p.notify;
                if p.progressed {
                    continue;
                }
                if self.order.is_empty() {
                    if !self.ring.final_check_for_requests()? {
                        break;
                    }
                } else if !self.final_check()? {
                    self.wait(None);
                }
            }
            return Ok(owed);
        }
        let mut owed = false;
        // The disk may have grown (online resize): check requests against its size now.
        self.limits.sectors = self.storage.size() / 512;
        // A serial storage answers a large chunk only when all of it is done: smaller chunks
        // let the frontend consume (copy, complete, refill) while we serve the rest.
        let (max_pages, early) = if self.storage.serial() {
            (SERIAL_BATCH_PAGES, true)
        } else {
            (MAX_BATCH_PAGES, false)
        };
        loop {
            if self.ring.unconsumed_requests()? == self.ring.size() {
                Stats::add(&self.stats.ring_full, 1);
            }
            loop {
                let mut chunk = std::mem::take(&mut self.chunk);
                let mut slots = std::mem::take(&mut self.chunk_slots);
                let mut pages = 0usize;
                while chunk.len() < MAX_BATCH_REQUESTS && pages < max_pages {
                    match self.take_request() {
                        Ok(Some((slot, _, p))) => {
                            pages += p.pages();
                            slots.push(slot);
                            chunk.push(p);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            self.recycle(chunk, slots);
                            return Err(e);
                        }
                    }
                }
                if chunk.is_empty() {
                    self.recycle(chunk, slots);
                    break;
                }
                // The copies count before any response is written over their ring entries.
                if let Some(j) = &mut self.journal {
                    j.commit(self.ring.req_cons());
                }
                let answered = self.answer(&slots, &chunk);
                self.recycle(chunk, slots);
                answered?;
                // Published after every chunk, before taking more: the slots are free again.
                if self.publish() {
                    if early {
                        Stats::add(&self.stats.notifications, 1);
                        notify();
                    } else {
                        owed = true;
                    }
                }
            }
            let more = if arm {
                self.ring.final_check_for_requests()?
            } else {
                self.ring.unconsumed_requests()? > 0
            };
            if !more {
                break;
            }
        }
        Ok(owed)
    }

    /// Unmaps the persistently mapped grants not used since the previous call and not in use
    /// ([`MapCache::sweep`]); returns how many. The queue's loop calls it every half
    /// [`Config::persistent_timeout`](crate::device::Config::persistent_timeout).
    pub fn sweep_mappings(&mut self) -> usize {
        self.maps.sweep()
    }

    /// Grants mapped persistently now.
    pub fn cached_mappings(&self) -> usize {
        self.maps.len()
    }

    /// Unmaps every persistently mapped grant (on disconnect). Requests still in flight are
    /// waited for and dropped unanswered (the device is going away).
    pub fn release_mappings(&mut self) {
        self.wait_all();
        let slots = self.flights.len() as u32;
        self.set_slots(slots);
        self.maps.clear();
    }

    /// One round of the pipeline: collects the I/O completed so far, answers every request now
    /// complete (whatever its place in the ring: out of order) and publishes their responses
    /// with one notify decision, then takes new requests from the ring (journalled first) and
    /// starts every step whose conflicts allow it (see [`service`](Self::service) for the
    /// ordering rules). Never blocks. A queue without a pipeline serves with
    /// [`service`](Self::service) instead.
    ///
    /// Responses are marked in the journal before they are published, and published before
    /// more requests are taken, as the journal needs ([`crate::journal`]).
    pub fn pump(&mut self) -> xenpv_ring::Result<Pump> {
        let out = self.pump_round()?;
        if out.notify {
            Stats::add(&self.stats.notifications, 1);
        }
        Ok(out)
    }

    /// [`pump`](Self::pump) without counting the notification.
    fn pump_round(&mut self) -> xenpv_ring::Result<Pump> {
        let mut out = Pump::default();
        let Some(pipe) = self.pipe.as_mut() else {
            return Ok(out);
        };
        self.limits.sectors = self.storage.size() / 512;
        if pipe.reap(&mut self.completions) > 0 {
            out.progressed = true;
            self.complete();
        }
        if self.answer_done()? {
            out.notify = self.publish();
        }
        if self.take()? > 0 {
            out.progressed = true;
        }
        self.issue();
        if let Some(pipe) = self.pipe.as_mut() {
            pipe.submit();
        }
        Ok(out)
    }

    /// Whether there is work for the next round: requests on the ring that may be taken now, or
    /// I/O completed. Reads shared memory only (the ring's `req_prod`, the storage's completion
    /// queue) and arms nothing: for polling between rounds. An impossible `req_prod` counts as
    /// work, so that the next round reports it.
    pub fn work_waiting(&mut self) -> bool {
        let requests = self.ring.unconsumed_requests().map_or(true, |n| n > 0);
        (requests && self.has_room()) || self.pipe.as_mut().is_some_and(|p| p.ready())
    }

    /// Whether more requests may be taken now and the ring has some: when `false`, `req_event`
    /// is armed (the frontend notifies at its next request) or the queue is full (a completion
    /// comes first). Call before [`wait`](Self::wait).
    pub fn final_check(&mut self) -> xenpv_ring::Result<bool> {
        if !self.has_room() {
            return Ok(false);
        }
        self.ring.final_check_for_requests()
    }

    /// Whether the frontend cannot send another request before one is answered: every slot of
    /// the ring holds a request consumed and not answered. A wait with I/O in flight is then a
    /// wait for the storage alone, which blocking on its completions serves as fast as polling.
    pub fn ring_exhausted(&self) -> bool {
        self.ring.req_cons().wrapping_sub(self.ring.rsp_prod_pvt()) >= self.ring.size()
    }

    /// Blocks until some I/O completes or, with `wake` (the event channel's fd), the frontend
    /// sent an event; the completions are handled at the next [`pump`](Self::pump). Returns
    /// whether `wake` fired. Returns at once without a pipeline or with nothing to wait for.
    pub fn wait(&mut self, wake: Option<BorrowedFd<'_>>) -> bool {
        let Some(pipe) = self.pipe.as_mut() else {
            return false;
        };
        let before = self.completions.len();
        let woke = pipe.wait(wake, &mut self.completions);
        if self.completions.len() > before {
            self.complete();
        }
        woke
    }

    /// Blocks until the storage completes an op or `d` has passed ([`Pipeline::doze`]); sleeps
    /// for `d` without a pipeline. For hybrid polling ([`xenpv_evtchn::HybridPoll::poll_on`]).
    pub fn doze(&mut self, d: std::time::Duration) {
        match self.pipe.as_mut() {
            Some(pipe) => pipe.doze(d),
            None => xenpv_evtchn::precise_sleep(d),
        }
    }

    /// Stops taking requests and answers every one consumed (waiting for their I/O); returns
    /// whether to notify. For a daemon that stops.
    pub fn finish(&mut self) -> xenpv_ring::Result<bool> {
        let mut notify = false;
        while !self.order.is_empty() {
            if let Some(pipe) = self.pipe.as_mut() {
                pipe.reap(&mut self.completions);
            }
            self.complete();
            if self.answer_done()? {
                notify |= self.publish();
            }
            self.issue();
            if self.order.is_empty() {
                break;
            }
            if !self.order.iter().any(|&s| self.flight_done(s)) {
                self.wait(None);
            }
        }
        if notify {
            Stats::add(&self.stats.notifications, 1);
        }
        Ok(notify)
    }

    /// Whether another request may be taken: a slot is free, the mapped pages are within
    /// bounds, and the next ring index is less than `max_age` past the oldest request not
    /// answered.
    fn has_room(&self) -> bool {
        let young = match self.order.front().and_then(|&s| self.flight(s)) {
            Some(oldest) => self.ring.req_cons().wrapping_sub(oldest.idx) < self.max_age,
            None => true,
        };
        !self.free.is_empty() && self.window_pages < MAX_INFLIGHT_PAGES && young
    }

    fn flight(&self, slot: u32) -> Option<&Flight<G::Mapping>> {
        self.flights.get(slot as usize).and_then(Option::as_ref)
    }

    fn flight_done(&self, slot: u32) -> bool {
        self.flight(slot).is_some_and(Flight::done)
    }

    /// Applies the completions collected in `self.completions` to their requests.
    fn complete(&mut self) {
        for (tag, result) in self.completions.drain(..) {
            // Tags are ours ([`tag`]), not the frontend's: a slot and the ring index of the
            // request it held when the op started.
            let (slot, idx) = untag(tag);
            let Some(Some(f)) = self.flights.get_mut(slot as usize) else {
                continue;
            };
            if f.idx != idx || !f.running {
                continue;
            }
            f.running = false;
            if let Err(e) = result {
                f.failure.get_or_insert(Failure::Io(e));
            }
        }
    }

    /// Answers every complete request, wherever it is in the ring (in ring order among
    /// themselves), and frees its mappings. Returns whether any response was produced.
    fn answer_done(&mut self) -> xenpv_ring::Result<bool> {
        let mut done = std::mem::take(&mut self.answered);
        done.clear();
        done.extend(self.order.iter().copied().filter(|&s| self.flight_done(s)));
        if done.is_empty() {
            self.answered = done;
            return Ok(false);
        }
        let flights = &self.flights;
        self.order.retain(|&s| {
            !flights
                .get(s as usize)
                .and_then(Option::as_ref)
                .is_some_and(Flight::done)
        });
        for &slot in &done {
            let Some(f) = self.flights.get_mut(slot as usize).and_then(Option::take) else {
                continue;
            };
            self.window_pages = self.window_pages.saturating_sub(f.p.pages());
            let status = self.status(&f.p, f.failure.as_ref());
            self.respond(slot, f.p.id, f.p.operation, status)?;
        }
        self.answered = done;
        Ok(true)
    }

    /// Takes requests from the ring while there is room: each is copied once, recorded in the
    /// journal, validated and mapped; `req_cons` is committed to the journal before any of
    /// their I/O starts. Returns how many were taken.
    fn take(&mut self) -> xenpv_ring::Result<usize> {
        let mut n = 0;
        // The frontend filled every slot: those it sent now and those still awaiting their
        // answers (`check_req_prod` bounds the sum by the ring's size). Counted only when
        // requests can be taken now: a queue out of room (its page window used up) is called
        // again every round while the same requests wait, and would count them each time.
        if self.has_room() {
            let unconsumed = self.ring.unconsumed_requests()?;
            let unanswered = self.ring.req_cons().wrapping_sub(self.ring.rsp_prod_pvt());
            if unconsumed > 0 && unanswered.saturating_add(unconsumed) >= self.ring.size() {
                Stats::add(&self.stats.ring_full, 1);
            }
        }
        while self.has_room() {
            let Some((slot, idx, p)) = self.take_request()? else {
                break;
            };
            self.window_pages = self.window_pages.saturating_add(p.pages());
            if let Some(entry) = self.flights.get_mut(slot as usize) {
                *entry = Some(Flight {
                    idx,
                    p,
                    next: 0,
                    running: false,
                    failure: None,
                });
                self.order.push_back(slot);
            }
            n += 1;
        }
        if n > 0 {
            if let Some(j) = &mut self.journal {
                j.commit(self.ring.req_cons());
            }
        }
        Ok(n)
    }

    /// Starts, in ring order, the next step of every request not answered that has none in
    /// flight, unless it conflicts with a step not yet finished of an earlier request: the
    /// outcome is that of serving the requests one by one.
    fn issue(&mut self) {
        let Some(pipe) = self.pipe.as_mut() else {
            return;
        };
        // Spans of the unfinished steps of the requests scanned so far (buffers reused).
        let (reads, writes) = &mut self.spans;
        reads.clear();
        writes.clear();
        for &slot in &self.order {
            let Some(Some(f)) = self.flights.get_mut(slot as usize) else {
                continue;
            };
            if f.done() {
                continue;
            }
            if !f.running && pipe.in_flight() < pipe.capacity() {
                if let Some(step) = f.p.steps.get(f.next) {
                    if step.span().clear_of(reads, writes) {
                        match step.op() {
                            Ok(op) => {
                                // SAFETY: the op's buffers are the mappings `step` owns; the
                                // step stays in `flights` (and its mappings alive) until its
                                // completion was returned: a request is answered and dropped
                                // only when `done`, i.e. not running, and `release_mappings`
                                // and `Drop` wait for every op in flight first.
                                unsafe { pipe.start(tag(slot, f.idx), &op) };
                                // Handed to the kernel at once, not with the rest of the round:
                                // the device starts on it while we prepare the next. A virtio
                                // disk that completes what it was given as one batch otherwise
                                // idles while a whole round is prepared; `xenpv bench` measured
                                // randread QD32 at 1.01x fio streamed, 0.78x batched.
                                pipe.submit();
                                f.running = true;
                                f.next += 1;
                            }
                            Err(e) => {
                                f.failure = Some(e);
                                continue;
                            }
                        }
                    }
                }
            }
            let from = if f.running {
                f.next.saturating_sub(1)
            } else {
                f.next
            };
            for step in f.p.steps.iter().skip(from) {
                match step.span() {
                    Span::All => return,
                    Span::Read(r) => reads.push(r),
                    Span::Write(w) => writes.push(w),
                }
            }
        }
    }

    /// Takes the next request off the ring into a free slot: copied once, journaled (before
    /// any of its I/O starts), validated and mapped. Also returns its slot and ring index.
    /// `None` if the ring has no request, or no slot is free.
    fn take_request(&mut self) -> std::result::Result<Taken<G::Mapping>, xenpv_ring::Error> {
        let Some(&slot) = self.free.front() else {
            return Ok(None);
        };
        let idx = self.ring.req_cons();
        let Some(req) = self.ring.next_request()? else {
            return Ok(None);
        };
        self.free.pop_front();
        let native = P::to_native(&req);
        if let Some(j) = &mut self.journal {
            j.record(slot, idx, &native);
        }
        Ok(Some((slot, idx, self.prepare(&native))))
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
            steps: SmallVec::new(),
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
                // With persistent grants, through the cache; but a request whose pages the
                // cache has no room for (a frontend whose grants in flight outnumber the
                // cache's capacity) is mapped whole, in one call, as without them: one page
                // at a time, uncached, a 1 MiB read took 257 broker round trips (77 IOPS
                // against 2.8k).
                let cached = if self.persistent {
                    let grefs = segments.iter().map(|s| s.gref);
                    self.maps.get_all(self.frontend, grefs, access)?
                } else {
                    None
                };
                let pages = match cached {
                    Some(maps) => Pages::Persistent(maps),
                    None => {
                        if self.persistent {
                            Stats::add(&self.stats.uncached, 1);
                        }
                        let refs: Vec<_> =
                            segments.iter().map(|s| (self.frontend, s.gref)).collect();
                        Pages::Whole(self.maps.grants().map(&refs, access)?)
                    }
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

    /// Runs the steps of a chunk of prepared requests in batches and appends each request's
    /// status to `statuses`, counting statistics.
    fn execute(&self, chunk: &[Prepared<G::Mapping>], statuses: &mut Vec<i16>) {
        let storage = self.storage.as_ref();
        if storage.serial() {
            // Op after op in ring order, each done before the next starts: what batches of
            // non-conflicting ops amount to, without building them (or allocating).
            for p in chunk {
                let mut failure = None;
                if p.outcome.is_ok() {
                    for step in &p.steps {
                        let r = step
                            .op()
                            .and_then(|op| storage.run(&op).map_err(Failure::Io));
                        if let Err(e) = r {
                            failure = Some(e);
                            break;
                        }
                    }
                }
                statuses.push(self.status(p, failure.as_ref()));
            }
            return;
        }
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
        statuses.extend(
            chunk
                .iter()
                .zip(&failed)
                .map(|(p, f)| self.status(p, f.as_ref())),
        );
    }

    /// The response status of `p` given its first failure, counted in the statistics.
    fn status(&self, p: &Prepared<G::Mapping>, failure: Option<&Failure>) -> i16 {
        let status = match (p.outcome, failure) {
            (Err(status), _) => status,
            (Ok(()), Some(e)) => {
                tracing::debug!(id = p.id, op = p.operation, "request failed: {e}");
                RSP_ERROR
            }
            (Ok(()), None) => RSP_OKAY,
        };
        self.count(p, status);
        status
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
/// The same for a serial storage ([`Storage::serial`]): 256 KiB, a few tens of microseconds
/// of copying, after which the responses are published.
pub const SERIAL_BATCH_PAGES: usize = 64;
/// Grant pages mapped by the requests in flight of a pipelined queue, at most (it stops taking
/// requests past this): 16 MiB, sixteen 1 MiB requests.
pub const MAX_INFLIGHT_PAGES: usize = 4096;

/// A request of a pipelined queue, consumed and not answered yet.
struct Flight<M> {
    /// Its ring index (part of the tag of its I/O).
    idx: u32,
    p: Prepared<M>,
    /// The next step to start.
    next: usize,
    /// Step `next - 1` is in flight.
    running: bool,
    failure: Option<Failure>,
}

impl<M> Flight<M> {
    /// Nothing in flight and nothing more to do: ready to be answered.
    fn done(&self) -> bool {
        !self.running
            && (self.p.outcome.is_err()
                || self.failure.is_some()
                || self.next >= self.p.steps.len())
    }
}

/// A byte range on the disk, `(start, end)`.
type Range = (u64, u64);

/// The byte range a step touches, for ordering ([`Op::conflicts`]).
#[derive(Debug, Clone, Copy)]
enum Span {
    /// A flush: orders against everything.
    All,
    Read((u64, u64)),
    /// A write or a discard.
    Write((u64, u64)),
}

impl Span {
    /// Whether a step with this span may run alongside unfinished steps of earlier requests
    /// touching `reads` and `writes` (no flush among them).
    fn clear_of(self, reads: &[(u64, u64)], writes: &[(u64, u64)]) -> bool {
        let overlaps = |&(a0, a1): &(u64, u64), (b0, b1): (u64, u64)| a0 < b1 && b0 < a1;
        match self {
            Span::All => reads.is_empty() && writes.is_empty(),
            Span::Read(r) => !writes.iter().any(|w| overlaps(w, r)),
            Span::Write(w) => {
                !writes.iter().any(|x| overlaps(x, w)) && !reads.iter().any(|x| overlaps(x, w))
            }
        }
    }
}

/// The data pages of one transfer, mapped.
enum Pages<M> {
    /// One persistent mapping per segment.
    Persistent(Mappings<M>),
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
        segments: Segments,
        pages: Pages<M>,
    },
}

impl<M> Step<M> {
    fn span(&self) -> Span {
        match self {
            Step::Flush => Span::All,
            Step::Discard { offset, len } => Span::Write((*offset, offset.saturating_add(*len))),
            Step::Transfer {
                dir,
                offset,
                segments,
                ..
            } => {
                let len: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
                let r = (*offset, offset.saturating_add(len));
                match dir {
                    Direction::Read => Span::Read(r),
                    Direction::Write => Span::Write(r),
                }
            }
        }
    }
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
                let mut bufs = Bufs::with_capacity(segments.len());
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

/// A request taken off the ring, with its slot and ring index (`None`: none taken).
type Taken<M> = Option<(u32, u32, Prepared<M>)>;

/// The tag of a pipeline op of the request in `slot`, consumed at ring index `idx`.
fn tag(slot: u32, idx: u32) -> u64 {
    u64::from(idx) << 32 | u64::from(slot)
}

/// The slot and ring index of a [`tag`].
fn untag(tag: u64) -> (u32, u32) {
    (tag as u32, (tag >> 32) as u32)
}

/// A request validated and mapped, waiting for its I/O.
struct Prepared<M> {
    id: u64,
    operation: u8,
    /// It came as `BLKIF_OP_INDIRECT` (`operation` is then its `indirect_op`).
    indirect: bool,
    /// `Err(status)`: refused or failed before any I/O.
    outcome: Result<(), i16>,
    /// Its storage steps, in order: one for most requests (inline), up to three (a barrier).
    steps: SmallVec<[Step<M>; 1]>,
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

#[cfg(test)]
mod tests {
    //! The journal stores of a queue, watched between two of them: the points a process can
    //! die at inside one round of [`Queue::pump`].

    use super::*;
    use crate::journal::{Identity, Journal, QueueIdentity};
    use xenpv_grant::local::LocalMapping;
    use xenpv_grant::{CopyOp, GrantRef};
    use xenpv_ring::blkif::RSP_EOPNOTSUPP;
    use xenpv_ring::mock::SharedPages;
    use xenpv_ring::FrontRing;

    /// No grant can be mapped (the requests of these tests map none).
    struct NoGrants;

    impl GrantMap for NoGrants {
        type Mapping = LocalMapping;
        fn map(&self, _: &[(DomId, GrantRef)], _: Access) -> xenpv_grant::Result<LocalMapping> {
            Err(xenpv_grant::Error::Os {
                what: "map",
                source: io::Error::other("no grants in this test"),
            })
        }
        fn copy(&self, _: &mut [CopyOp<'_>]) -> xenpv_grant::Result<()> {
            Err(xenpv_grant::Error::Os {
                what: "copy",
                source: io::Error::other("no grants in this test"),
            })
        }
    }

    /// A disk of nothing (the requests of these tests reach none).
    struct NoDisk;

    impl Storage for NoDisk {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_into(&self, _: u64, _: &[xenpv_grant::VolatileSlice<'_>]) -> io::Result<()> {
            Err(io::Error::other("no disk"))
        }
        fn write_from(&self, _: u64, _: &[xenpv_grant::VolatileSlice<'_>]) -> io::Result<()> {
            Err(io::Error::other("no disk"))
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn can_discard(&self) -> bool {
            false
        }
    }

    fn limits() -> Limits {
        Limits {
            sectors: 2048,
            sector_size: 512,
            read_only: false,
            flush: true,
            barrier: true,
            discard: false,
            discard_secure: false,
            discard_granularity: 4096,
            max_indirect_segments: 0,
        }
    }

    fn identity() -> Identity {
        Identity {
            session: 1,
            frontend_id: 1,
            frontend: "/local/domain/1/device/vbd/51712".into(),
            order: 0,
            x86_32: false,
            persistent: false,
            max_indirect_segments: 0,
            queues: vec![QueueIdentity {
                port: 1,
                refs: vec![8],
            }],
        }
    }

    fn queue(
        back: BackRing<Blkif, SharedPages>,
        journal: &Journal,
    ) -> Queue<Blkif, SharedPages, NoGrants> {
        Queue::new(
            back,
            1,
            MapCache::new(NoGrants, 4),
            false,
            Arc::new(NoDisk),
            limits(),
            Arc::new(Stats::default()),
        )
        .with_journal(journal.queue(0).unwrap())
    }

    /// A request the queue answers without I/O (an operation it does not know).
    fn unknown(id: u64) -> BlkifRequest {
        BlkifRequest::new(9, 0, id, 0)
    }

    /// Answered out of order, then published, then freed: the journal read back at each step
    /// (with the shared `rsp_prod` of that moment) names exactly the requests a restarted
    /// backend must answer again.
    #[test]
    fn every_store_of_a_round_leaves_a_journal_that_resumes_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let journal = Journal::create(&path, &identity()).unwrap();
        let pages = SharedPages::new(0);
        let mut front = FrontRing::<Blkif, _>::init(pages.clone()).unwrap();
        let mut q = queue(BackRing::new(pages.clone()).unwrap(), &journal);
        for i in 0..3 {
            front.produce(unknown(100 + i)).unwrap();
        }
        let _ = front.push_requests();
        // Ring index → id of the requests a restarted backend would answer again.
        let pending = |rsp_prod: u32| -> Vec<(u32, u64)> {
            let r = Journal::load(&path).unwrap();
            let p = r.queues[0].pending(rsp_prod).unwrap();
            p.iter().map(|p| (p.idx, p.request.id)).collect()
        };
        let free = || Journal::load(&path).unwrap().queues[0].free_slots();
        assert_eq!(q.take().unwrap(), 3);
        assert_eq!(pending(0), [(0, 100), (1, 101), (2, 102)]);
        // The first one is still "in flight": the two after it are answered first.
        let first = q.order[0] as usize;
        q.flights[first].as_mut().unwrap().running = true;
        assert!(q.answer_done().unwrap());
        // Dead between the marks and the publication.
        assert_eq!(pending(0), [(0, 100), (1, 101), (2, 102)]);
        assert_eq!(q.ring.rsp_prod_pvt(), 2);
        // Published, not freed yet; then freed.
        let _ = q.ring.push_responses();
        assert_eq!(pending(2), [(0, 100)]);
        assert_eq!(free(), 29);
        let _ = q.publish();
        assert_eq!(pending(2), [(0, 100)]);
        assert_eq!((q.free.len(), free()), (31, 31));
        // The first one answered last, at response index 2: marked, then published.
        q.flights[first].as_mut().unwrap().running = false;
        assert!(q.answer_done().unwrap());
        assert_eq!(pending(2), [(0, 100)]);
        let _ = q.ring.push_responses();
        assert_eq!(pending(3), []);
        let _ = q.publish();
        assert_eq!(pending(3), []);
        assert_eq!((q.free.len(), free()), (32, 32));
        let mut got = Vec::new();
        while let Some(rsp) = front.next_response().unwrap() {
            got.push((rsp.id, rsp.status));
        }
        assert_eq!(
            got,
            [
                (101, RSP_EOPNOTSUPP),
                (102, RSP_EOPNOTSUPP),
                (100, RSP_EOPNOTSUPP)
            ]
        );
    }

    /// The ring is exhausted exactly while every one of its slots holds a request taken and
    /// not answered: the frontend can then send nothing before a response.
    #[test]
    fn the_ring_is_exhausted_while_every_slot_awaits_its_answer() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::create(&dir.path().join("j"), &identity()).unwrap();
        let pages = SharedPages::new(0);
        let mut front = FrontRing::<Blkif, _>::init(pages.clone()).unwrap();
        let mut q = queue(BackRing::new(pages.clone()).unwrap(), &journal);
        assert!(!q.ring_exhausted());
        for i in 0..31 {
            front.produce(unknown(i)).unwrap();
        }
        let _ = front.push_requests();
        assert_eq!(q.take().unwrap(), 31);
        assert!(
            !q.ring_exhausted(),
            "one slot is still free to the frontend"
        );
        front.produce(unknown(31)).unwrap();
        let _ = front.push_requests();
        assert_eq!(q.take().unwrap(), 1);
        assert!(q.ring_exhausted());
        // One request still "in flight", the others answered: room for 31 more.
        let first = q.order[0] as usize;
        q.flights[first].as_mut().unwrap().running = true;
        assert!(q.answer_done().unwrap());
        assert!(!q.ring_exhausted());
    }

    /// A resumed queue first clears what the dead instance left in its slots besides the
    /// requests it answers again (a record its `req_cons` never covered, a slot answered and
    /// published but not freed), so that its own records never meet them.
    #[test]
    fn resume_clears_what_the_dead_instance_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let journal = Journal::create(&path, &identity()).unwrap();
        let pages = SharedPages::new(0);
        let mut front = FrontRing::<Blkif, _>::init(pages.clone()).unwrap();
        for i in 0..4 {
            front.produce(unknown(100 + i)).unwrap();
        }
        let _ = front.push_requests();
        // The dead instance: ring indexes 0..3 consumed into slots 0..3; 1 answered at
        // response index 0 and published, its slot not freed yet; index 3 recorded into slot
        // 5, not committed.
        let mut dead = journal.queue(0).unwrap();
        for i in 0..3u32 {
            dead.record(i, i, &unknown(100 + u64::from(i)));
        }
        dead.commit(3);
        dead.answered(1, 0);
        pages.write_slot::<Blkif, _>(0, BlkifResponse::new(101, 9, RSP_EOPNOTSUPP));
        pages.write_u32(xenpv_ring::mock::RSP_PROD, 1);
        dead.record(5, 3, &unknown(103));
        drop(dead);
        let r = Journal::load(&path).unwrap();
        let pending = r.queues[0].pending(1).unwrap();
        let ids: Vec<u64> = pending.iter().map(|p| p.request.id).collect();
        assert_eq!(ids, [100, 102]);
        assert_eq!(r.queues[0].free_slots(), 28);

        let back = BackRing::<Blkif, _>::resume(pages.clone(), r.queues[0].req_cons).unwrap();
        let mut q = queue(back, &journal);
        q.resume(&pending).unwrap();
        let r = Journal::load(&path).unwrap();
        assert_eq!(r.queues[0].pending(3).unwrap(), []);
        assert_eq!(r.queues[0].free_slots(), 32, "every slot free");
        // The new instance takes ring index 3 again, into a slot of its own.
        assert_eq!(q.take().unwrap(), 1);
        let r = Journal::load(&path).unwrap();
        let p = r.queues[0].pending(3).unwrap();
        assert_eq!(
            p.iter().map(|p| (p.idx, p.request.id)).collect::<Vec<_>>(),
            [(3, 103)]
        );
        let mut got = Vec::new();
        while let Some(rsp) = front.next_response().unwrap() {
            got.push(rsp.id);
        }
        // 101's response was published by the dead instance; 100 and 102 by the new one.
        assert_eq!(got, [101, 100, 102]);
    }
}
