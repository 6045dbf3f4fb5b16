//! One queue: its ring, its slab of request slots, its pool of granted data pages and its
//! backlog of requests waiting for a slot. Everything here runs under the queue's lock; the
//! callbacks of finished requests run after the lock is released.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smallvec::SmallVec;
use xenpv_evtchn::{EventChannel, Port};
use xenpv_grant::{Access, DomId, GrantMemory, GrantShare, Revoke, SharedPages, PAGE_SIZE};
use xenpv_ring::blkif::{
    Blkif, BlkifRequest, BlkifRequestDiscard, BlkifRequestIndirect, BlkifRequestSegment,
    MAX_INDIRECT_PAGES_PER_REQUEST, MAX_INDIRECT_SEGMENTS, MAX_SEGMENTS_PER_REQUEST, OP_DISCARD,
    OP_FLUSH_DISKCACHE, OP_INDIRECT, OP_READ, OP_WRITE, OP_WRITE_BARRIER, RSP_EOPNOTSUPP,
    RSP_ERROR, RSP_OKAY, SEGMENTS_PER_INDIRECT_FRAME,
};
use xenpv_ring::FrontRing;

use crate::{Callback, Consume, Error, Result};

/// What a chunk asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Read,
    Write,
    Flush,
    Discard,
}

/// The caller's operation, completed when all its chunks are.
pub(crate) struct Parent {
    remaining: AtomicUsize,
    state: Mutex<ParentState>,
}

struct ParentState {
    /// A read's data: filled in as its chunks are answered (appended in the common in-order
    /// case, so the buffer is never zero-filled first).
    buf: Vec<u8>,
    /// The length `buf` has once every chunk is in.
    read_len: usize,
    /// A read in place: its data goes to this instead of `buf`.
    consume: Option<Consume>,
    err: Option<Error>,
    done: Option<Callback>,
}

impl Parent {
    /// `consume` (reads only) reads the data in place instead of collecting it in a buffer.
    pub(crate) fn new(
        chunks: usize,
        read_len: usize,
        consume: Option<Consume>,
        done: Callback,
    ) -> Arc<Parent> {
        let buf = if consume.is_some() {
            Vec::new()
        } else {
            Vec::with_capacity(read_len)
        };
        Arc::new(Parent {
            remaining: AtomicUsize::new(chunks),
            state: Mutex::new(ParentState {
                buf,
                read_len,
                consume,
                err: None,
                done: Some(done),
            }),
        })
    }
}

/// A piece of an operation that one ring request carries (split further at issue time if the
/// connection allows fewer segments). It owns a private copy of its write data until answered.
pub(crate) struct Chunk {
    pub(crate) kind: Kind,
    /// Byte offset on the disk.
    pub(crate) offset: u64,
    /// Byte length.
    pub(crate) len: u64,
    /// Write data (`len` bytes) or empty.
    pub(crate) data: Vec<u8>,
    /// Where a read's data goes in the parent's buffer.
    pub(crate) pos: usize,
    pub(crate) parent: Arc<Parent>,
    /// It was on a ring that a reconnect took down, unanswered: the next time it is issued
    /// is a re-issue ([`QState::reissued`]).
    pub(crate) lost: bool,
}

impl Chunk {
    /// Splits off the first `bytes` bytes as a new chunk of the same parent (the parent's count
    /// grows by one).
    fn split_front(&mut self, bytes: u64) -> Chunk {
        self.parent.remaining.fetch_add(1, Ordering::SeqCst);
        let rest_data = if self.data.is_empty() {
            Vec::new()
        } else {
            self.data.split_off(bytes as usize)
        };
        let front = Chunk {
            kind: self.kind,
            offset: self.offset,
            len: bytes,
            data: std::mem::replace(&mut self.data, rest_data),
            pos: self.pos,
            parent: self.parent.clone(),
            lost: self.lost,
        };
        self.offset += bytes;
        self.len -= bytes;
        self.pos += bytes as usize;
        front
    }
}

/// Completes a chunk (outside any queue lock).
pub(crate) fn finish(chunk: Chunk, result: Result<Vec<u8>>) {
    let mut st = match chunk.parent.state.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    // A read's data is already in the parent's buffer (`RingState::collect`).
    match result {
        Ok(_) => {}
        Err(e) => {
            if st.err.is_none() {
                st.err = Some(e);
            }
        }
    }
    if chunk.parent.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
        let done = st.done.take();
        let r = match st.err.take() {
            Some(e) => Err(e),
            // Read in place: the data was consumed, there is no buffer.
            None if st.consume.is_some() => Ok(Vec::new()),
            None => {
                // Every chunk put its bytes in place; this only guards the length.
                let n = st.read_len;
                st.buf.resize(n, 0);
                Ok(std::mem::take(&mut st.buf))
            }
        };
        drop(st);
        if let Some(done) = done {
            done(r);
        }
    }
}

/// Features of the current connection that shape requests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Features {
    pub(crate) flush: bool,
    pub(crate) barrier: bool,
    pub(crate) discard: bool,
    pub(crate) persistent: bool,
    /// Segments per request: 11, or the indirect maximum.
    pub(crate) max_segments: usize,
    pub(crate) handle: u16,
    pub(crate) backend: DomId,
    /// The most pages the persistent pool grows to ([`pool_limit`]: whole chunks).
    pub(crate) pool_pages: usize,
}

/// Segments per read or write request: the 11 of a direct request, or with indirect requests
/// (`indirect`, and the backend offers more than 11) the fewest of what we want and what the
/// backend offers, within the protocol's 4096.
pub(crate) fn segments_per_request(indirect: bool, wanted: u32, offered: u32) -> usize {
    if indirect && offered as usize > MAX_SEGMENTS_PER_REQUEST {
        (wanted.min(offered) as usize).clamp(MAX_SEGMENTS_PER_REQUEST, MAX_INDIRECT_SEGMENTS)
    } else {
        MAX_SEGMENTS_PER_REQUEST
    }
}

/// Pages the largest read or write of `max_segments` segments takes: its data pages, and its
/// indirect pages when it has more segments than fit in the request itself.
pub(crate) fn request_pages(max_segments: usize) -> usize {
    if max_segments <= MAX_SEGMENTS_PER_REQUEST {
        max_segments
    } else {
        max_segments + BlkifRequestIndirect::pages_for(max_segments)
    }
}

/// The most pages a queue's persistent pool grows to: `pool_pages` ([`crate::Options`]), but
/// never less than the largest request of `max_segments` takes (it could otherwise never
/// start), in whole chunks.
pub(crate) fn pool_limit(pool_pages: usize, max_segments: usize) -> usize {
    pool_pages
        .max(request_pages(max_segments))
        .next_multiple_of(POOL_CHUNK)
}

/// Granted pages of one request.
enum Pages<S> {
    None,
    /// (chunk, page) pairs in the persistent pool.
    Pool(PoolPages),
    /// Pages granted for this request only.
    Own(S),
}

/// The persistent pool: chunks of [`POOL_CHUNK`] granted pages, and which of them are free.
///
/// A request gets the lowest free pages, in ascending order. The chunks are granted one after
/// the other, so a large request's pages are mostly consecutive frames: where the frames are
/// physically contiguous too (a guest's memory in 2 MiB extents; the local platform's on a
/// huge-page tmpfs), the backend's storage sees a few long segments instead of one per page,
/// and a 1 MiB read stays one request to a disk that takes 254 segments.
struct Pool<S> {
    chunks: Vec<S>,
    /// One bit per page of each chunk, set while the page is free.
    free: Vec<u64>,
    /// Set bits in `free`.
    nfree: usize,
}

pub(crate) const POOL_CHUNK: usize = 64;
/// A request's pages in the persistent pool: held inline up to a direct request's
/// [`MAX_SEGMENTS_PER_REQUEST`]: the page list of a request of up to 44 KiB is not allocated.
type PoolPages = SmallVec<[(u32, u32); MAX_SEGMENTS_PER_REQUEST]>;
/// The largest `ring-page-order` asked for (16 pages, as Linux's blkfront).
pub(crate) const MAX_RING_ORDER: u32 = 4;
const _: () = assert!(POOL_CHUNK == u64::BITS as usize);

impl<S> Pool<S> {
    /// The lowest `n` free pages as (chunk, page), ascending; the caller checked `nfree`.
    fn take(&mut self, n: usize) -> PoolPages {
        let mut v = PoolPages::with_capacity(n);
        for (c, m) in self.free.iter_mut().enumerate() {
            while *m != 0 && v.len() < n {
                v.push((c as u32, m.trailing_zeros()));
                *m &= *m - 1;
            }
            if v.len() == n {
                break;
            }
        }
        self.nfree -= v.len();
        v
    }

    fn put(&mut self, v: PoolPages) {
        for (c, p) in v {
            if let Some(m) = self.free.get_mut(c as usize) {
                if *m & (1 << p) == 0 {
                    *m |= 1 << p;
                    self.nfree += 1;
                }
            }
        }
    }
}

struct Inflight<S> {
    chunk: Chunk,
    seq: u64,
    /// The wire operation, and the one a backend may echo instead (an indirect request's
    /// `indirect_op`, as Linux blkback does).
    op: u8,
    alt_op: u8,
    data: Pages<S>,
    indirect: Pages<S>,
}

/// One connected ring.
pub(crate) struct RingState<G: GrantShare, E> {
    ring: FrontRing<Blkif, G::Shared>,
    pub(crate) evtchn: Arc<E>,
    pub(crate) port: Port,
    slots: Vec<Option<Inflight<G::Shared>>>,
    free_ids: Vec<u32>,
    pool: Pool<G::Shared>,
    /// The pool could not grow (the grant driver refused more grants, as Linux's gntalloc does
    /// past its limit): while requests are in flight, it tries again only from then on.
    pool_retry_at: Option<Instant>,
    /// That refusal was logged (once per ring).
    pool_warned: bool,
    feat: Features,
    seq: u64,
}

/// How long a persistent pool that the grant driver refused to grow waits before it asks
/// again, while requests are in flight: their pages come back to the pool with their
/// responses, so it does not ask at every response. Another process may give grants back
/// meanwhile (gntalloc's limit is shared by all of its users).
const POOL_RETRY: Duration = Duration::from_secs(1);

impl<G: GrantShare, E: EventChannel> RingState<G, E> {
    pub(crate) fn new(
        ring: FrontRing<Blkif, G::Shared>,
        evtchn: Arc<E>,
        port: Port,
        feat: Features,
    ) -> Self {
        let n = ring.size();
        Self {
            ring,
            evtchn,
            port,
            slots: (0..n).map(|_| None).collect(),
            free_ids: (0..n).rev().collect(),
            pool: Pool {
                chunks: Vec::new(),
                free: Vec::new(),
                nfree: 0,
            },
            pool_retry_at: None,
            pool_warned: false,
            feat,
            seq: 0,
        }
    }
}

/// Memory for a ring: the ring's pages are revoked by the device on teardown.
pub(crate) fn ring_memory<G: GrantShare, E>(
    rs: RingState<G, E>,
) -> (G::Shared, Vec<Chunk>, Vec<Pages2<G::Shared>>) {
    let RingState {
        ring, slots, pool, ..
    } = rs;
    let mut inflight: Vec<Inflight<G::Shared>> = slots.into_iter().flatten().collect();
    inflight.sort_by_key(|i| i.seq);
    let mut pages = Vec::new();
    let mut chunks = Vec::new();
    for i in inflight {
        chunks.push(i.chunk);
        for p in [i.data, i.indirect] {
            if let Pages::Own(s) = p {
                pages.push(Pages2(s));
            }
        }
    }
    for c in pool.chunks {
        pages.push(Pages2(c));
    }
    (ring.into_memory(), chunks, pages)
}

/// Granted pages handed back for revocation.
pub(crate) struct Pages2<S>(pub(crate) S);

/// The state behind a queue's lock.
pub(crate) struct QState<G: GrantShare, E> {
    pub(crate) ring: Option<RingState<G, E>>,
    pub(crate) backlog: VecDeque<Chunk>,
    /// Requests put on a ring again after the ring they were in flight on was taken down
    /// unanswered (chunks marked [`Chunk::lost`]).
    pub(crate) reissued: u64,
}

impl<G: GrantShare, E> Default for QState<G, E> {
    fn default() -> Self {
        Self {
            ring: None,
            backlog: VecDeque::new(),
            reissued: 0,
        }
    }
}

/// Finished chunks, to complete once the lock is released.
pub(crate) type Finished = Vec<(Chunk, Result<Vec<u8>>)>;

fn revoke_quiet<G: GrantShare>(g: &G, s: G::Shared) {
    match g.revoke(s) {
        Ok(Revoke::Revoked) => {}
        Ok(Revoke::Deferred { in_use }) => {
            tracing::debug!(
                in_use,
                "data grants still mapped: revoke deferred, pages not reused"
            )
        }
        Err(e) => tracing::warn!("revoking data grants: {e}"),
    }
}

impl<G, E> QState<G, E>
where
    G: GrantShare,
    G::Shared: SharedPages,
    E: EventChannel,
{
    /// Issues as much of the backlog as slots and pages allow, publishes and notifies.
    pub(crate) fn issue(&mut self, g: &G, out: &mut Finished) -> Result<()> {
        let Some(rs) = self.ring.as_mut() else {
            return Ok(());
        };
        let mut produced = false;
        while let Some(mut chunk) = self.backlog.pop_front() {
            // Requests that need no ring slot.
            if chunk.kind == Kind::Flush && !rs.feat.flush && !rs.feat.barrier {
                out.push((chunk, Ok(Vec::new())));
                continue;
            }
            if chunk.kind == Kind::Discard && !rs.feat.discard {
                out.push((chunk, Err(Error::NotSupported("discard"))));
                continue;
            }
            if rs.ring.is_full() || rs.free_ids.is_empty() {
                self.backlog.push_front(chunk);
                break;
            }
            let max_bytes = (rs.feat.max_segments * PAGE_SIZE) as u64;
            if matches!(chunk.kind, Kind::Read | Kind::Write) && chunk.len > max_bytes {
                let front = chunk.split_front(max_bytes);
                self.backlog.push_front(chunk);
                chunk = front;
            }
            let lost = std::mem::take(&mut chunk.lost);
            match rs.start(g, chunk) {
                Ok(()) => {
                    produced = true;
                    if lost {
                        self.reissued += 1;
                    }
                }
                Err((mut chunk, e)) => {
                    chunk.lost = lost;
                    if rs.ring.in_flight() > 0 {
                        // Out of pages or grants for now: retry after the next response.
                        self.backlog.push_front(chunk);
                        break;
                    }
                    out.push((chunk, Err(e)));
                }
            }
        }
        if produced && rs.ring.push_requests() {
            rs.evtchn.notify(rs.port)?;
        }
        Ok(())
    }

    /// Consumes up to `limit` responses (validating each), arming nothing: the backend does
    /// not notify us of more until [`final_check`](Self::final_check), for a caller that polls
    /// in between. A bad response is a protocol error: nothing of the request it names is
    /// touched. A caller that completes what it got before taking more lets the requests its
    /// callbacks issue reach the backend while later responses wait: the backend's storage
    /// gets work again after one response, not after a whole burst.
    pub(crate) fn process(&mut self, g: &G, out: &mut Finished, limit: usize) -> Result<()> {
        let Some(rs) = self.ring.as_mut() else {
            return Ok(());
        };
        while out.len() < limit {
            let Some(rsp) = rs
                .ring
                .next_response()
                .map_err(|e| Error::Protocol(e.to_string()))?
            else {
                break;
            };
            let id = rsp.id;
            let slot = usize::try_from(id)
                .ok()
                .and_then(|i| rs.slots.get_mut(i))
                .ok_or_else(|| Error::Protocol(format!("response with unknown id {id}")))?;
            let Some(inf) = slot.as_ref() else {
                return Err(Error::Protocol(format!(
                    "response for id {id}, which is not outstanding (duplicate?)"
                )));
            };
            if rsp.operation != inf.op && rsp.operation != inf.alt_op {
                return Err(Error::Protocol(format!(
                    "response for id {id} has operation {}, the request was {}",
                    rsp.operation, inf.op
                )));
            }
            let status = rsp.status;
            if !matches!(status, RSP_OKAY | RSP_ERROR | RSP_EOPNOTSUPP) {
                return Err(Error::Protocol(format!(
                    "response for id {id} has unknown status {status}"
                )));
            }
            let inf = slot
                .take()
                .ok_or_else(|| Error::Protocol("slot vanished".into()))?;
            rs.free_ids.push(id as u32);
            let result = if status == RSP_OKAY {
                rs.collect(&inf);
                Ok(Vec::new())
            } else {
                if status == RSP_EOPNOTSUPP {
                    match inf.chunk.kind {
                        Kind::Flush => {
                            rs.feat.flush = false;
                            rs.feat.barrier = false
                        }
                        Kind::Discard => rs.feat.discard = false,
                        _ => {}
                    }
                }
                Err(Error::Io { op: inf.op, status })
            };
            let Inflight {
                chunk,
                data,
                indirect,
                ..
            } = inf;
            rs.release(g, data);
            rs.release(g, indirect);
            out.push((chunk, result));
        }
        Ok(())
    }

    /// Whether responses are waiting: reads the shared `rsp_prod`, arms nothing (for polling).
    /// An impossible index counts, so that the next [`process`](Self::process) reports it.
    pub(crate) fn responses_waiting(&mut self) -> bool {
        self.ring
            .as_mut()
            .is_some_and(|rs| rs.ring.unconsumed_responses().map_or(true, |n| n > 0))
    }

    /// Requests on the ring that have no response yet.
    pub(crate) fn in_flight(&self) -> u32 {
        self.ring.as_ref().map_or(0, |rs| rs.ring.in_flight())
    }

    /// `RING_FINAL_CHECK_FOR_RESPONSES`: re-arms `rsp_event`; whether responses are waiting.
    pub(crate) fn final_check(&mut self) -> Result<bool> {
        match self.ring.as_mut() {
            Some(rs) => rs
                .ring
                .final_check_for_responses()
                .map_err(|e| Error::Protocol(e.to_string())),
            None => Ok(false),
        }
    }

    /// Requests in flight plus waiting.
    pub(crate) fn outstanding(&self) -> usize {
        self.backlog.len()
            + self
                .ring
                .as_ref()
                .map_or(0, |r| r.ring.in_flight() as usize)
    }
}

impl<G, E> RingState<G, E>
where
    G: GrantShare,
    G::Shared: SharedPages,
    E: EventChannel,
{
    fn take_pages(&mut self, g: &G, n: usize, access: Access) -> Result<Pages<G::Shared>> {
        if n == 0 {
            return Ok(Pages::None);
        }
        if !self.feat.persistent {
            return Ok(Pages::Own(g.share(self.feat.backend, n, access)?));
        }
        while self.pool.nfree < n {
            if (self.pool.chunks.len() + 1) * POOL_CHUNK > self.feat.pool_pages {
                return Err(Error::Grant("persistent pool exhausted".into()));
            }
            // Requests in flight give pages back with their responses: after a refusal, wait
            // for those rather than ask the grant driver again at every response. With nothing
            // in flight, always ask: the caller gets the driver's error otherwise.
            let busy = self.ring.in_flight() > 0;
            if busy && self.pool_retry_at.is_some_and(|t| Instant::now() < t) {
                return Err(Error::Grant(format!(
                    "persistent pool held at {} pages by the grant driver",
                    self.pool.chunks.len() * POOL_CHUNK
                )));
            }
            let s = match g.share(self.feat.backend, POOL_CHUNK, Access::Writable) {
                Ok(s) => s,
                Err(e) => {
                    self.pool_retry_at = Instant::now().checked_add(POOL_RETRY);
                    if !self.pool_warned {
                        self.pool_warned = true;
                        tracing::warn!(
                            "the persistent pool cannot grow past {} pages: {e}; requests wait \
                             for pages in use, and one that needs more than the pool fails",
                            self.pool.chunks.len() * POOL_CHUNK
                        );
                    }
                    return Err(e.into());
                }
            };
            self.pool_retry_at = None;
            self.pool.chunks.push(s);
            self.pool.free.push(u64::MAX);
            self.pool.nfree += POOL_CHUNK;
        }
        Ok(Pages::Pool(self.pool.take(n)))
    }

    fn release(&mut self, g: &G, p: Pages<G::Shared>) {
        match p {
            Pages::None => {}
            Pages::Pool(v) => self.pool.put(v),
            Pages::Own(s) => revoke_quiet(g, s),
        }
    }

    fn page_gref(&self, p: &Pages<G::Shared>, i: usize) -> u32 {
        match p {
            Pages::None => 0,
            Pages::Pool(v) => {
                let (c, pg) = v[i];
                self.pool.chunks[c as usize].grefs()[pg as usize]
            }
            Pages::Own(s) => s.grefs()[i],
        }
    }

    fn page_write(&self, p: &Pages<G::Shared>, i: usize, off: usize, buf: &[u8]) -> Result<()> {
        let end = off
            .checked_add(buf.len())
            .ok_or_else(|| Error::Grant(format!("write of {} bytes at {off}", buf.len())))?;
        match self.page_slice(p, i, end)? {
            Some(s) => s.write(off, buf).map_err(Error::from),
            None => Ok(()),
        }
    }

    fn page_append(
        &self,
        p: &Pages<G::Shared>,
        i: usize,
        n: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        match self.page_slice(p, i, n)? {
            Some(s) => s.append_to(0, n, out).map_err(Error::from),
            None => Ok(()),
        }
    }

    /// The first `n` bytes of page `i` of `p`, where they are (`None` without pages).
    fn page_slice<'a>(
        &'a self,
        p: &'a Pages<G::Shared>,
        i: usize,
        n: usize,
    ) -> Result<Option<xenpv_grant::VolatileSlice<'a>>> {
        let r = match p {
            Pages::None => return Ok(None),
            Pages::Pool(v) => {
                let (c, pg) = v[i];
                self.pool.chunks[c as usize]
                    .volatile()
                    .subslice(pg as usize * PAGE_SIZE, n)
            }
            Pages::Own(s) => s.volatile().subslice(i * PAGE_SIZE, n),
        };
        r.map(Some).map_err(Error::from)
    }

    fn page_read(&self, p: &Pages<G::Shared>, i: usize, buf: &mut [u8]) -> Result<()> {
        match self.page_slice(p, i, buf.len())? {
            Some(s) => s.read(0, buf).map_err(Error::from),
            None => Ok(()),
        }
    }

    /// Copies a successful read out of its pages straight into its place in the parent's
    /// buffer: no intermediate buffer (for a 1 MiB read that was a second allocation, its page
    /// faults and a second 1 MiB copy on the queue thread) and, in the usual in-order case, no
    /// zero-filling of the parent's buffer either.
    fn collect(&self, inf: &Inflight<G::Shared>) {
        if inf.chunk.kind != Kind::Read {
            return;
        }
        let mut st = match inf.chunk.parent.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let start = inf.chunk.pos;
        let len = inf.chunk.len as usize;
        let Some(end) = start.checked_add(len).filter(|&e| e <= st.read_len) else {
            return;
        };
        let st = &mut *st;
        if let Some(consume) = st.consume.as_mut() {
            for i in 0..len.div_ceil(PAGE_SIZE) {
                let n = (len - i * PAGE_SIZE).min(PAGE_SIZE);
                match self.page_slice(&inf.data, i, n) {
                    Ok(Some(piece)) => consume(start + i * PAGE_SIZE, &piece),
                    Ok(None) => {}
                    Err(e) => {
                        st.err.get_or_insert(e);
                    }
                }
            }
            return;
        }
        if st.buf.len() < start {
            // An earlier chunk of this read is still in flight: leave room for it.
            st.buf.resize(start, 0);
        }
        if st.buf.len() == start {
            // In order (always, for a read that fits one request): append.
            for i in 0..len.div_ceil(PAGE_SIZE) {
                let n = (len - i * PAGE_SIZE).min(PAGE_SIZE);
                if self.page_append(&inf.data, i, n, &mut st.buf).is_err() {
                    // Nothing was appended (bounds are checked first).
                    let l = st.buf.len();
                    st.buf.resize(l + n, 0);
                }
            }
            return;
        }
        if st.buf.len() < end {
            st.buf.resize(end, 0);
        }
        for (i, piece) in st.buf[start..end].chunks_mut(PAGE_SIZE).enumerate() {
            if self.page_read(&inf.data, i, piece).is_err() {
                piece.fill(0);
            }
        }
    }

    /// Builds and produces the ring request for `chunk`.
    fn start(&mut self, g: &G, chunk: Chunk) -> std::result::Result<(), (Chunk, Error)> {
        let id = match self.free_ids.pop() {
            Some(id) => id,
            None => return Err((chunk, Error::Protocol("no free request id".into()))),
        };
        match self.build(g, &chunk, id) {
            Ok((req, op, alt_op, data, indirect)) => {
                if let Err(e) = self.ring.produce(req) {
                    self.release(g, data);
                    self.release(g, indirect);
                    self.free_ids.push(id);
                    return Err((chunk, e.into()));
                }
                self.seq += 1;
                self.slots[id as usize] = Some(Inflight {
                    chunk,
                    seq: self.seq,
                    op,
                    alt_op,
                    data,
                    indirect,
                });
                Ok(())
            }
            Err(e) => {
                self.free_ids.push(id);
                Err((chunk, e))
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn build(
        &mut self,
        g: &G,
        chunk: &Chunk,
        id: u32,
    ) -> Result<(BlkifRequest, u8, u8, Pages<G::Shared>, Pages<G::Shared>)> {
        let sector = chunk.offset / 512;
        let handle = self.feat.handle;
        let id64 = u64::from(id);
        match chunk.kind {
            Kind::Flush => {
                let op = if self.feat.flush {
                    OP_FLUSH_DISKCACHE
                } else {
                    OP_WRITE_BARRIER
                };
                Ok((
                    BlkifRequest::new(op, handle, id64, 0),
                    op,
                    op,
                    Pages::None,
                    Pages::None,
                ))
            }
            Kind::Discard => {
                let req = BlkifRequestDiscard::new(0, handle, id64, sector, chunk.len / 512);
                Ok((
                    req.to_request(),
                    OP_DISCARD,
                    OP_DISCARD,
                    Pages::None,
                    Pages::None,
                ))
            }
            Kind::Read | Kind::Write => {
                let op = if chunk.kind == Kind::Read {
                    OP_READ
                } else {
                    OP_WRITE
                };
                let len = chunk.len as usize;
                let nseg = len.div_ceil(PAGE_SIZE);
                let access = if op == OP_READ {
                    Access::Writable
                } else {
                    Access::ReadOnly
                };
                let data = self.take_pages(g, nseg, access)?;
                let segs: SmallVec<[BlkifRequestSegment; MAX_SEGMENTS_PER_REQUEST]> = (0..nseg)
                    .map(|i| {
                        let bytes = (len - i * PAGE_SIZE).min(PAGE_SIZE);
                        BlkifRequestSegment::new(
                            self.page_gref(&data, i),
                            0,
                            (bytes / 512).saturating_sub(1) as u8,
                        )
                    })
                    .collect();
                if op == OP_WRITE {
                    for (i, piece) in chunk.data.chunks(PAGE_SIZE).enumerate() {
                        if let Err(e) = self.page_write(&data, i, 0, piece) {
                            self.release(g, data);
                            return Err(e);
                        }
                    }
                }
                if nseg <= MAX_SEGMENTS_PER_REQUEST {
                    let mut req = BlkifRequest::new(op, handle, id64, sector);
                    req.nr_segments = nseg as u8;
                    req.seg[..nseg].copy_from_slice(&segs);
                    return Ok((req, op, op, data, Pages::None));
                }
                let npages = BlkifRequestIndirect::pages_for(nseg);
                if npages > MAX_INDIRECT_PAGES_PER_REQUEST {
                    self.release(g, data);
                    return Err(Error::Protocol("request too large".into()));
                }
                let ind = match self.take_pages(g, npages, Access::ReadOnly) {
                    Ok(p) => p,
                    Err(e) => {
                        self.release(g, data);
                        return Err(e);
                    }
                };
                let mut req = BlkifRequestIndirect::new(op, nseg as u16, handle, id64, sector);
                for (k, group) in segs.chunks(SEGMENTS_PER_INDIRECT_FRAME).enumerate() {
                    let mut bytes = Vec::with_capacity(group.len() * 8);
                    for s in group {
                        bytes.extend_from_slice(&s.gref.to_le_bytes());
                        bytes.extend_from_slice(&[s.first_sect, s.last_sect, 0, 0]);
                    }
                    if let Err(e) = self.page_write(&ind, k, 0, &bytes) {
                        self.release(g, data);
                        self.release(g, ind);
                        return Err(e);
                    }
                    req.indirect_grefs[k] = self.page_gref(&ind, k);
                }
                Ok((req.to_request(), OP_INDIRECT, op, data, ind))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Pool, POOL_CHUNK};

    fn pool(chunks: usize) -> Pool<()> {
        Pool {
            chunks: vec![(); chunks],
            free: vec![u64::MAX; chunks],
            nfree: chunks * POOL_CHUNK,
        }
    }

    fn pages(v: &[(u32, u32)]) -> Vec<u32> {
        v.iter().map(|&(c, p)| c * POOL_CHUNK as u32 + p).collect()
    }

    #[test]
    fn requests_get_the_lowest_free_pages_ascending() {
        let mut p = pool(16);
        // Three 1 MiB reads and their indirect pages, as the load generator issues them.
        let a = p.take(256);
        let ai = p.take(1);
        let b = p.take(256);
        let bi = p.take(1);
        assert_eq!(pages(&a), (0..256).collect::<Vec<_>>());
        assert_eq!(pages(&ai), [256]);
        assert_eq!(pages(&b), (257..513).collect::<Vec<_>>());
        // Completions in any order, pages handed back in any order.
        let mut a_rev = a.clone();
        a_rev.reverse();
        p.put(bi);
        p.put(a_rev);
        p.put(ai);
        assert_eq!(p.nfree, 16 * POOL_CHUNK - 256);
        let c = p.take(256);
        assert_eq!(pages(&c), (0..256).collect::<Vec<_>>(), "one run again");
        // A page handed back twice counts once.
        p.put(b.clone());
        p.put(b);
        assert_eq!(p.nfree, 16 * POOL_CHUNK - 256);
        assert_eq!(pages(&p.take(1)), [256]);
    }
}
