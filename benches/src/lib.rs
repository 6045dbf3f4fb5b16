//! Round-trip workloads for the ring benchmark (`benches/ring.rs`).
//!
//! Every workload is the same conversation: a frontend (the calling thread) sends `n` numbered
//! requests to a backend thread, which answers each with a response echoing its number; the
//! frontend checks that the responses come back in order. Both sides busy-poll (a spin-loop hint
//! between polls that found nothing; never sleep, yield or wait for an event), and the time is
//! taken on the frontend from the first request to the last response, once the backend thread is
//! running. [`Threads::One`] runs the same steps in turns on one thread instead.
//!
//! The conversation runs over these transports, all with the same number of slots (S):
//!
//! * [`Transport::Xenpv`]: one `xenpv-ring` shared ring ([`FrontRing`] / [`BackRing`] on
//!   [`SharedPages`]); requests and responses share its slots, as in Xen.
//! * [`Transport::Rtrb`]: two `rtrb` SPSC queues (requests, responses), each with the slot count
//!   of the ring.
//! * [`Transport::ArrayQueue`]: two `crossbeam_queue::ArrayQueue`s, likewise.
//! * [`Transport::XenpvNoCheck`]: our ring again, publishing without the notify check.
//! * [`Transport::RtrbBounded`]: rtrb again, but the frontend keeps at most as many requests in
//!   flight as there are slots. Two queues of S slots can hold 2·S requests in flight (S waiting,
//!   S answered), our ring only S (a request's slot is freed only when its response is
//!   consumed); this variant compares the queues at equal depth.
//! * [`Transport::RtrbCopy`]: rtrb again, but the backend copies each request out whole (our ring
//!   always does: entries in shared memory are copied out once, never read in place), where plain
//!   rtrb reads only `id` and `operation` in place through `read_chunk`.
//!
//! The payloads are the wire types themselves (a 112-byte `BlkifRequest` and 16-byte
//! `BlkifResponse`, a 12-byte `NetifTxRequest` and 4-byte `NetifTxResponse`), so the queues move
//! exactly as many bytes per entry as the ring does.
//!
//! [`Mode::Batched`] moves as many entries as fit and publishes them once (our ring: produce …
//! `push_requests`, backend drains what is published, answers all, `push_responses` once; rtrb:
//! `write_chunk_uninit` / `read_chunk`; ArrayQueue, which has no batch API: push until full, pop
//! until empty). [`Mode::Unbatched`] moves one entry per turn and publishes every single entry
//! on both sides (rtrb and ArrayQueue: `push` / `pop`).

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use xenpv_ring::blkif::{
    Blkif, BlkifRequest, BlkifRequestSegment, BlkifResponse, OP_READ, RSP_OKAY,
};
use xenpv_ring::mock::SharedPages;
use xenpv_ring::netif::{NetifTx, NetifTxRequest, NetifTxResponse};
use xenpv_ring::{ring_entries, BackRing, FrontRing, RingProtocol, PAGE_SIZE};

/// A ring protocol with a numbered request, its answer and the check of the answer.
pub trait Workload: RingProtocol<Req: Send, Rsp: Send> + 'static {
    /// Short name for reports.
    const NAME: &'static str;
    /// Request number `seq`.
    fn request(seq: u64) -> Self::Req;
    /// The backend's answer to `req` (echoes its id).
    fn answer(req: &Self::Req) -> Self::Rsp;
    /// Whether `rsp` answers request number `seq`.
    fn answers(rsp: &Self::Rsp, seq: u64) -> bool;
}

impl Workload for Blkif {
    const NAME: &'static str = "blkif";

    #[inline(always)]
    fn request(seq: u64) -> BlkifRequest {
        let mut req = BlkifRequest::new(OP_READ, 0x51, seq, seq.wrapping_mul(8));
        req.nr_segments = 1;
        req.seg[0] = BlkifRequestSegment::new(seq as u32, 0, 7);
        req
    }

    #[inline(always)]
    fn answer(req: &BlkifRequest) -> BlkifResponse {
        BlkifResponse::new(req.id, req.operation, RSP_OKAY)
    }

    #[inline(always)]
    fn answers(rsp: &BlkifResponse, seq: u64) -> bool {
        rsp.id == seq
    }
}

impl Workload for NetifTx {
    const NAME: &'static str = "netif-tx";

    #[inline(always)]
    fn request(seq: u64) -> NetifTxRequest {
        NetifTxRequest {
            gref: seq as u32,
            offset: 0,
            flags: 0,
            id: seq as u16,
            size: 1514,
        }
    }

    #[inline(always)]
    fn answer(req: &NetifTxRequest) -> NetifTxResponse {
        NetifTxResponse {
            id: req.id,
            status: xenpv_ring::netif::RSP_OKAY,
        }
    }

    #[inline(always)]
    fn answers(rsp: &NetifTxResponse, seq: u64) -> bool {
        rsp.id == seq as u16
    }
}

/// How entries are moved and published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// As many entries as fit, published once.
    Batched,
    /// One entry at a time, each published on its own.
    Unbatched,
}

impl Mode {
    /// Name for reports.
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Batched => "batched",
            Mode::Unbatched => "unbatched",
        }
    }
}

/// What carries the requests and responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A `xenpv-ring` shared ring.
    Xenpv,
    /// Our ring publishing with `push_requests_no_check` / `push_responses_no_check`
    /// (`RING_PUSH_*` without the notify check): no full fence and no read of the peer's event
    /// index per publish, which is enough for peers that never sleep (as here) but loses
    /// wake-ups for peers that do; not part of [`Transport::ALL`].
    XenpvNoCheck,
    /// Two `rtrb` ring buffers.
    Rtrb,
    /// Two `rtrb` ring buffers, the frontend keeping at most as many requests in flight as the
    /// ring has slots (as our ring does by construction); not part of [`Transport::ALL`].
    RtrbBounded,
    /// Two `rtrb` ring buffers, the backend copying each request out whole before answering it
    /// (as a backend reading memory shared with an untrusted peer must, and as our ring always
    /// does), instead of reading only the fields it needs in place; not part of
    /// [`Transport::ALL`].
    RtrbCopy,
    /// Two `crossbeam_queue::ArrayQueue`s.
    ArrayQueue,
}

impl Transport {
    /// All of them, ours first.
    pub const ALL: [Transport; 3] = [Transport::Xenpv, Transport::Rtrb, Transport::ArrayQueue];

    /// Name for reports.
    pub const fn name(self) -> &'static str {
        match self {
            Transport::Xenpv => "xenpv",
            Transport::XenpvNoCheck => "xenpv-nocheck",
            Transport::Rtrb => "rtrb",
            Transport::RtrbBounded => "rtrb-bounded",
            Transport::RtrbCopy => "rtrb-copy",
            Transport::ArrayQueue => "ArrayQueue",
        }
    }
}

/// Slots of a ring of `P` in `2^order` pages (and of each queue it is compared with).
pub const fn slots<P: RingProtocol>(order: u32) -> usize {
    ring_entries::<P>(PAGE_SIZE << order) as usize
}

/// Where the backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// On its own thread, concurrently with the frontend (the real benchmark).
    Two,
    /// On the frontend's thread, in turns (frontend step, backend step, …): no cache line moves
    /// between CPUs, so this measures the CPU cost of the queue operations alone, a stable number
    /// on a busy machine.
    One,
}

/// Runs `n` round trips of `P` over `transport` in `mode` with a ring of `2^order` pages, and
/// returns the time from the first request to the last response.
///
/// # Panics
/// If a response is missing, out of order or wrong, or the ring reports a protocol error.
pub fn run<P: Workload>(
    transport: Transport,
    mode: Mode,
    order: u32,
    n: u64,
    threads: Threads,
) -> Duration {
    let slots = slots::<P>(order);
    match transport {
        Transport::Xenpv | Transport::XenpvNoCheck => {
            let pages = SharedPages::new(order);
            let front = FrontRing::<P, _>::init(pages.clone()).expect("front ring");
            let back = BackRing::<P, _>::new(pages).expect("back ring");
            let check = transport == Transport::Xenpv;
            drive(
                XenpvFront { ring: front, check },
                XenpvBack { ring: back, check },
                mode,
                n,
                threads,
            )
        }
        Transport::Rtrb | Transport::RtrbBounded | Transport::RtrbCopy => {
            let (req_tx, req_rx) = rtrb::RingBuffer::<P::Req>::new(slots);
            let (rsp_tx, rsp_rx) = rtrb::RingBuffer::<P::Rsp>::new(slots);
            // Two queues of `slots` hold up to twice as many requests in flight as our ring,
            // whose requests and responses share the slots; `RtrbBounded` allows only `slots`.
            let bounded = transport == Transport::RtrbBounded;
            let max_in_flight = if bounded { slots } else { 2 * slots } as u64;
            let front = RtrbFront {
                req_tx,
                rsp_rx,
                max_in_flight,
            };
            let copy_requests = transport == Transport::RtrbCopy;
            let back = RtrbBack {
                req_rx,
                rsp_tx,
                copy_requests,
            };
            drive::<P, _, _>(front, back, mode, n, threads)
        }
        Transport::ArrayQueue => {
            let reqs = ArrayQueue::<P::Req>::new(slots);
            let rsps = ArrayQueue::<P::Rsp>::new(slots);
            let front = QueueFront {
                reqs: &reqs,
                rsps: &rsps,
            };
            let back = QueueBack {
                reqs: &reqs,
                rsps: &rsps,
            };
            drive::<P, _, _>(front, back, mode, n, threads)
        }
    }
}

/// The frontend half of a transport.
trait Front<P: Workload> {
    /// Sends what it can (up to `tally.to_send()`) and receives what has arrived, in `mode`;
    /// returns whether anything moved.
    fn step(&mut self, mode: Mode, tally: &mut Tally) -> bool;
}

/// The backend half of a transport.
trait Back<P: Workload>: Send {
    /// Answers what has arrived, in `mode`; returns how many requests it answered.
    fn step(&mut self, mode: Mode) -> u64;
}

/// Runs the conversation and times the frontend, from the first request (once the backend
/// thread is running) to the last response.
fn drive<P: Workload, F: Front<P>, B: Back<P>>(
    mut front: F,
    mut back: B,
    mode: Mode,
    n: u64,
    threads: Threads,
) -> Duration {
    let mut tally = Tally::new(n);
    let elapsed = match threads {
        Threads::One => {
            let start = Instant::now();
            while !tally.done() {
                front.step(mode, &mut tally);
                back.step(mode);
            }
            start.elapsed()
        }
        Threads::Two => {
            let ready = AtomicBool::new(false);
            thread::scope(|s| {
                let worker = s.spawn(|| {
                    ready.store(true, Ordering::Release);
                    let mut answered = 0;
                    while answered < n {
                        let k = back.step(mode);
                        answered += k;
                        if k == 0 {
                            spin();
                        }
                    }
                });
                while !ready.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                let start = Instant::now();
                while !tally.done() {
                    if !front.step(mode, &mut tally) {
                        spin();
                    }
                }
                let elapsed = start.elapsed();
                worker.join().expect("backend thread panicked");
                elapsed
            })
        }
    };
    tally.check();
    elapsed
}

/// What an idle side does before polling again: one spin-loop hint. Backing off further (as
/// `crossbeam_utils::Backoff::spin` does, up to 64 hints, ~1.5 µs on this CPU) measurably adds
/// latency to every hand-over of a batch.
#[inline(always)]
fn spin() {
    std::hint::spin_loop();
}

/// Frontend bookkeeping shared by the transports: request numbering and the in-order check.
struct Tally {
    n: u64,
    sent: u64,
    received: u64,
    in_order: bool,
}

impl Tally {
    fn new(n: u64) -> Self {
        Self {
            n,
            sent: 0,
            received: 0,
            in_order: true,
        }
    }

    fn to_send(&self) -> u64 {
        self.n - self.sent
    }

    fn done(&self) -> bool {
        self.received == self.n
    }

    #[inline(always)]
    fn next_request<P: Workload>(&mut self) -> P::Req {
        let req = P::request(self.sent);
        self.sent += 1;
        req
    }

    /// Records a response; cheap (no branch on the hot path), checked at the end.
    #[inline(always)]
    fn receive<P: Workload>(&mut self, rsp: &P::Rsp) {
        self.in_order &= P::answers(rsp, self.received);
        self.received += 1;
    }

    fn check(&self) {
        assert!(self.in_order, "responses out of order or wrong");
        assert_eq!(self.received, self.n, "responses missing");
    }
}

struct XenpvFront<P: Workload> {
    ring: FrontRing<P, SharedPages>,
    /// Publish with the notify check (`push_requests`), or without (`push_requests_no_check`).
    check: bool,
}

impl<P: Workload> XenpvFront<P> {
    #[inline(always)]
    fn publish(&mut self) {
        if self.check {
            // Spinning: the backend never sleeps, so no notification is ever due.
            let _notify = self.ring.push_requests();
        } else {
            self.ring.push_requests_no_check();
        }
    }
}

struct XenpvBack<P: Workload> {
    ring: BackRing<P, SharedPages>,
    /// As for [`XenpvFront`].
    check: bool,
}

impl<P: Workload> XenpvBack<P> {
    #[inline(always)]
    fn publish(&mut self) {
        if self.check {
            let _notify = self.ring.push_responses();
        } else {
            self.ring.push_responses_no_check();
        }
    }
}

impl<P: Workload> Front<P> for XenpvFront<P> {
    #[inline]
    fn step(&mut self, mode: Mode, tally: &mut Tally) -> bool {
        match mode {
            Mode::Batched => {
                let k = u64::from(self.ring.free_requests()).min(tally.to_send());
                for _ in 0..k {
                    self.ring
                        .produce(tally.next_request::<P>())
                        .expect("free slot");
                }
                if k > 0 {
                    self.publish();
                }
                let r = self.ring.unconsumed_responses().expect("rsp_prod");
                for _ in 0..r {
                    let rsp = self
                        .ring
                        .next_response()
                        .expect("response")
                        .expect("published");
                    tally.receive::<P>(&rsp);
                }
                k > 0 || r > 0
            }
            Mode::Unbatched => {
                let mut progress = false;
                if tally.to_send() > 0 && !self.ring.is_full() {
                    self.ring
                        .produce(tally.next_request::<P>())
                        .expect("free slot");
                    self.publish();
                    progress = true;
                }
                if let Some(rsp) = self.ring.next_response().expect("response") {
                    tally.receive::<P>(&rsp);
                    progress = true;
                }
                progress
            }
        }
    }
}

impl<P: Workload> Back<P> for XenpvBack<P> {
    #[inline]
    fn step(&mut self, mode: Mode) -> u64 {
        match mode {
            Mode::Batched => {
                let k = self.ring.unconsumed_requests().expect("req_prod");
                for _ in 0..k {
                    let req = self
                        .ring
                        .next_request()
                        .expect("request")
                        .expect("published");
                    self.ring.produce(P::answer(&req)).expect("response slot");
                }
                if k > 0 {
                    self.publish();
                }
                u64::from(k)
            }
            Mode::Unbatched => match self.ring.next_request().expect("request") {
                Some(req) => {
                    self.ring.produce(P::answer(&req)).expect("response slot");
                    self.publish();
                    1
                }
                None => 0,
            },
        }
    }
}

struct RtrbFront<P: Workload> {
    req_tx: rtrb::Producer<P::Req>,
    rsp_rx: rtrb::Consumer<P::Rsp>,
    /// Most requests in flight (sent, response not yet received).
    max_in_flight: u64,
}

impl<P: Workload> RtrbFront<P> {
    /// Requests we may send now.
    #[inline(always)]
    fn room(&self, tally: &Tally) -> u64 {
        let in_flight = tally.sent - tally.received;
        tally.to_send().min(self.max_in_flight - in_flight)
    }
}

struct RtrbBack<P: Workload> {
    req_rx: rtrb::Consumer<P::Req>,
    rsp_tx: rtrb::Producer<P::Rsp>,
    /// Copy every request out whole before answering it (`RtrbCopy`).
    copy_requests: bool,
}

impl<P: Workload> Front<P> for RtrbFront<P> {
    #[inline]
    fn step(&mut self, mode: Mode, tally: &mut Tally) -> bool {
        match mode {
            Mode::Batched => {
                let k = (self.req_tx.slots() as u64).min(self.room(tally)) as usize;
                if k > 0 {
                    let chunk = self.req_tx.write_chunk_uninit(k).expect("free slots");
                    chunk.fill_from_iter(core::iter::repeat_with(|| tally.next_request::<P>()));
                }
                let r = self.rsp_rx.slots();
                if r > 0 {
                    let chunk = self.rsp_rx.read_chunk(r).expect("published responses");
                    let (a, b) = chunk.as_slices();
                    for rsp in a.iter().chain(b) {
                        tally.receive::<P>(rsp);
                    }
                    chunk.commit_all();
                }
                k > 0 || r > 0
            }
            Mode::Unbatched => {
                let mut progress = false;
                if self.room(tally) > 0 && !self.req_tx.is_full() {
                    let req = tally.next_request::<P>();
                    self.req_tx.push(req).map_err(drop).expect("free slot");
                    progress = true;
                }
                if let Ok(rsp) = self.rsp_rx.pop() {
                    tally.receive::<P>(&rsp);
                    progress = true;
                }
                progress
            }
        }
    }
}

impl<P: Workload> Back<P> for RtrbBack<P> {
    #[inline]
    fn step(&mut self, mode: Mode) -> u64 {
        match mode {
            Mode::Batched => {
                let k = self.req_rx.slots().min(self.rsp_tx.slots());
                if k > 0 {
                    let reqs = self.req_rx.read_chunk(k).expect("published requests");
                    let rsps = self.rsp_tx.write_chunk_uninit(k).expect("response slots");
                    let (a, b) = reqs.as_slices();
                    let copy = self.copy_requests;
                    let answers = a.iter().chain(b).map(|req| {
                        if copy {
                            P::answer(&black_box(*req))
                        } else {
                            P::answer(req)
                        }
                    });
                    let written = rsps.fill_from_iter(answers);
                    debug_assert_eq!(written, k);
                    reqs.commit_all();
                }
                k as u64
            }
            Mode::Unbatched => {
                if self.rsp_tx.is_full() {
                    return 0;
                }
                match self.req_rx.pop() {
                    Ok(req) => {
                        let req = if self.copy_requests {
                            black_box(req)
                        } else {
                            req
                        };
                        self.rsp_tx
                            .push(P::answer(&req))
                            .map_err(drop)
                            .expect("response slot");
                        1
                    }
                    Err(_) => 0,
                }
            }
        }
    }
}

struct QueueFront<'a, P: Workload> {
    reqs: &'a ArrayQueue<P::Req>,
    rsps: &'a ArrayQueue<P::Rsp>,
}

struct QueueBack<'a, P: Workload> {
    reqs: &'a ArrayQueue<P::Req>,
    rsps: &'a ArrayQueue<P::Rsp>,
}

impl<P: Workload> Front<P> for QueueFront<'_, P> {
    #[inline]
    fn step(&mut self, mode: Mode, tally: &mut Tally) -> bool {
        // No batch API: a batch is a loop of single pushes / pops.
        let mut progress = false;
        while tally.to_send() > 0 && !self.reqs.is_full() {
            self.reqs
                .push(tally.next_request::<P>())
                .map_err(drop)
                .expect("free slot");
            progress = true;
            if mode == Mode::Unbatched {
                break;
            }
        }
        while let Some(rsp) = self.rsps.pop() {
            tally.receive::<P>(&rsp);
            progress = true;
            if mode == Mode::Unbatched {
                break;
            }
        }
        progress
    }
}

impl<P: Workload> QueueBack<'_, P> {
    /// Answers one request if one is waiting; the response push cannot fail, as we are the only
    /// producer of responses and checked for room first.
    #[inline(always)]
    fn answer_one(&self) -> bool {
        if self.rsps.is_full() {
            return false;
        }
        match self.reqs.pop() {
            Some(req) => {
                self.rsps
                    .push(P::answer(&req))
                    .map_err(drop)
                    .expect("response slot");
                true
            }
            None => false,
        }
    }
}

impl<P: Workload> Back<P> for QueueBack<'_, P> {
    #[inline]
    fn step(&mut self, mode: Mode) -> u64 {
        let mut k = 0;
        while self.answer_one() {
            k += 1;
            if mode == Mode::Unbatched {
                break;
            }
        }
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all<P: Workload>(order: u32) {
        // More than one lap of the ring, and of the 16-bit netif ids.
        let n = 70_000;
        for transport in [
            Transport::Xenpv,
            Transport::XenpvNoCheck,
            Transport::Rtrb,
            Transport::RtrbBounded,
            Transport::RtrbCopy,
            Transport::ArrayQueue,
        ] {
            for mode in [Mode::Batched, Mode::Unbatched] {
                for threads in [Threads::Two, Threads::One] {
                    run::<P>(transport, mode, order, n, threads);
                }
            }
        }
    }

    #[test]
    fn slot_counts() {
        assert_eq!(slots::<Blkif>(0), 32);
        assert_eq!(slots::<Blkif>(3), 256);
        assert_eq!(slots::<NetifTx>(0), 256);
    }

    /// Blkif whose backend answers with the wrong id.
    enum Liar {}

    impl RingProtocol for Liar {
        type Req = BlkifRequest;
        type Rsp = BlkifResponse;
    }

    impl Workload for Liar {
        const NAME: &'static str = "liar";
        fn request(seq: u64) -> BlkifRequest {
            Blkif::request(seq)
        }
        fn answer(req: &BlkifRequest) -> BlkifResponse {
            BlkifResponse::new(req.id ^ 0x40, req.operation, RSP_OKAY)
        }
        fn answers(rsp: &BlkifResponse, seq: u64) -> bool {
            Blkif::answers(rsp, seq)
        }
    }

    #[test]
    #[should_panic(expected = "responses out of order or wrong")]
    fn wrong_answers_are_caught() {
        run::<Liar>(Transport::Xenpv, Mode::Batched, 0, 1000, Threads::One);
    }

    /// One test, so that the spinning threads of several workloads do not compete for the CPUs.
    #[test]
    fn every_workload_round_trips_in_order() {
        all::<Blkif>(0);
        all::<Blkif>(3);
        all::<NetifTx>(0);
    }
}
