//! loom: the notify / final-check protocol of `xenpv_ring::protocol` never loses a wake-up and
//! never exposes an entry before it was written, under every interleaving and every weak-memory
//! outcome loom explores.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p xenpv-ring --test loom --release`.
#![cfg(loom)]

use loom::sync::atomic::AtomicBool;
use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use loom::sync::Arc;
use xenpv_ring::protocol::{self, SharedIndex};

/// A shared ring index in loom's memory model, with the fences `protocol` documents.
struct Idx(AtomicU32);

impl SharedIndex for Idx {
    fn load(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
    fn store(&self, value: u32) {
        self.0.store(value, Ordering::Relaxed)
    }
    fn write_barrier() {
        fence(Ordering::Release)
    }
    fn read_barrier() {
        fence(Ordering::Acquire)
    }
    fn full_barrier() {
        fence(Ordering::SeqCst)
    }
}

/// The same, with `xen_mb()` weakened to a release/acquire fence: the protocol is then broken,
/// and the model checker must find the lost wake-up.
struct WeakIdx(AtomicU32);

impl SharedIndex for WeakIdx {
    fn load(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
    fn store(&self, value: u32) {
        self.0.store(value, Ordering::Relaxed)
    }
    fn write_barrier() {
        fence(Ordering::Release)
    }
    fn read_barrier() {
        fence(Ordering::Acquire)
    }
    fn full_barrier() {
        fence(Ordering::AcqRel)
    }
}

/// An event channel: a pending bit the producer sets, and a flag saying the producer has
/// finished. A consumer that must sleep while the producer has finished and nothing is pending
/// would sleep forever: that is a lost wake-up, and the model fails.
struct EventChannel {
    pending: AtomicBool,
    producer_done: AtomicBool,
}

impl EventChannel {
    fn new() -> Self {
        Self {
            pending: AtomicBool::new(false),
            producer_done: AtomicBool::new(false),
        }
    }
    fn notify(&self) {
        // An RMW (not a plain store) like the kernel's test_and_set of the pending bit; loom
        // orders RMWs of one location totally, which is what a real pending bit provides.
        self.pending.swap(true, Ordering::AcqRel);
    }
    fn finish(&self) {
        self.producer_done.store(true, Ordering::Release);
    }
    fn wait(&self) {
        loop {
            if self.pending.swap(false, Ordering::AcqRel) {
                return;
            }
            if self.producer_done.load(Ordering::Acquire) {
                assert!(
                    self.pending.swap(false, Ordering::AcqRel),
                    "lost wake-up: the consumer would sleep forever"
                );
                return;
            }
            loom::thread::yield_now();
        }
    }
}

/// One direction of a ring: producer index, event index, and two data slots.
struct Direction<I> {
    prod: I,
    event: I,
    slots: [AtomicU64; 2],
    evtchn: EventChannel,
}

impl<I: SharedIndex> Direction<I> {
    fn new(make: fn(u32) -> I) -> Self {
        Self {
            prod: make(0),
            event: make(1), // SHARED_RING_INIT: notify at the first entry
            slots: [AtomicU64::new(0), AtomicU64::new(0)],
            evtchn: EventChannel::new(),
        }
    }

    /// Produces entry `i` alone and publishes it, notifying when the protocol says so.
    fn produce(&self, i: u32, value: u64) {
        self.slots[(i % 2) as usize].store(value, Ordering::Relaxed);
        if protocol::publish_and_check_notify(&self.prod, &self.event, i, i + 1) {
            self.evtchn.notify();
        }
    }

    /// Consumes entries `from..total`, sleeping on the event channel whenever the final check
    /// says the ring is empty. Each entry must hold the value its producer wrote before
    /// publishing.
    fn consume(&self, from: u32, total: u32, value: impl Fn(u32) -> u64) {
        let mut cons = from;
        loop {
            let prod = protocol::read_producer(&self.prod);
            while cons != prod && cons != total {
                assert_eq!(
                    self.slots[(cons % 2) as usize].load(Ordering::Relaxed),
                    value(cons)
                );
                cons += 1;
            }
            if cons == total {
                return;
            }
            if protocol::arm_event(&self.prod, &self.event, cons) != cons {
                continue; // work arrived while arming: don't sleep
            }
            self.evtchn.wait();
        }
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(f);
}

fn one_direction<I: SharedIndex + Send + Sync + 'static>(make: fn(u32) -> I) {
    model(move || {
        let ring = Arc::new(Direction::new(make));
        let producer = {
            let ring = ring.clone();
            loom::thread::spawn(move || {
                for i in 0..2 {
                    ring.produce(i, 100 + u64::from(i));
                }
                ring.evtchn.finish();
            })
        };
        ring.consume(0, 2, |i| 100 + u64::from(i));
        producer.join().unwrap();
    });
}

#[test]
fn requests_never_lose_a_wakeup() {
    one_direction(|v| Idx(AtomicU32::new(v)));
}

#[test]
#[should_panic(expected = "lost wake-up")]
fn without_the_full_fence_a_wakeup_is_lost() {
    one_direction(|v| WeakIdx(AtomicU32::new(v)));
}

#[test]
fn request_response_round_trip_never_loses_a_wakeup() {
    model(|| {
        let requests = Arc::new(Direction::new(|v| Idx(AtomicU32::new(v))));
        let responses = Arc::new(Direction::new(|v| Idx(AtomicU32::new(v))));
        let backend = {
            let (requests, responses) = (requests.clone(), responses.clone());
            loom::thread::spawn(move || {
                // Serve one request at a time: consume it, answer it.
                for i in 0..2 {
                    requests.consume(i, i + 1, |i| 10 + u64::from(i));
                    responses.produce(i, 20 + u64::from(i));
                }
                responses.evtchn.finish();
            })
        };
        for i in 0..2 {
            requests.produce(i, 10 + u64::from(i));
        }
        requests.evtchn.finish();
        responses.consume(0, 2, |i| 20 + u64::from(i));
        backend.join().unwrap();
    });
}
