//! Large requests at depth with persistent grants: the frontend's persistent pool, with the
//! default options, holds the pages of eight 1 MiB reads at once (256 data pages and an
//! indirect page each), so a workload at queue depth 8 has eight requests on the ring, not as
//! many as a smaller pool would let through while the rest wait for pages.
//!
//! The test plays a backend that offers persistent grants and 256-segment indirect requests and
//! holds every request it takes, answering them all once it holds eight, or once no new request
//! has come for 200 ms (the frontend waits for pages). The load generator reads 1 MiB blocks at
//! queue depth 8; the most requests the backend held at once is what the frontend let through.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use xenpv_blkfront::load::{run, Workload};
use xenpv_blkfront::Options;
use xenpv_evtchn::EventChannel;
use xenpv_ring::blkif::{Blkif, BlkifResponse, OP_INDIRECT, RSP_OKAY};
use xenpv_ring::BackRing;

const DEPTH: usize = 8;

#[test]
fn eight_one_mib_reads_are_in_flight_at_once() {
    let env = env(1 << 20);
    let done = Arc::new(AtomicBool::new(false));
    let stop = done.clone();
    // A 64 MiB disk.
    let keys = [
        ("feature-persistent", "1"),
        ("feature-max-indirect-segments", "256"),
        ("sectors", "131072"),
    ];
    let backend = spawn_scripted_with(&env, &keys, move |s| {
        let mut ring = BackRing::<Blkif, _>::new(&s.map).unwrap();
        let mut held = Vec::new();
        let (mut most, mut answered) = (0usize, 0u64);
        let mut last = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            while let Some(r) = ring.next_request().unwrap() {
                assert_eq!(r.operation, OP_INDIRECT);
                held.push(r);
                last = Instant::now();
            }
            most = most.max(held.len());
            let stalled = last.elapsed() > Duration::from_millis(200);
            if held.len() >= DEPTH || (!held.is_empty() && stalled) {
                for r in held.drain(..) {
                    ring.produce(BlkifResponse::new(r.id, r.operation, RSP_OKAY))
                        .unwrap();
                    answered += 1;
                }
                if ring.push_responses() {
                    s.ev.notify(s.port).unwrap();
                }
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        (most, answered)
    });
    let dev = Arc::new(connect(&env, Options::default()));
    let w: Workload = format!("read 1048576 {DEPTH} 0 0.5").parse().unwrap();
    let r = run(&dev, &w).unwrap();
    done.store(true, Ordering::SeqCst);
    dev.close().unwrap();
    let (most, answered) = backend.join().unwrap();
    eprintln!("{r:?}; the backend held at most {most} requests, answered {answered}");
    assert_eq!(r.errors, 0, "{r:?}");
    assert!(answered >= r.all_ios, "{answered} answered, {r:?}");
    assert_eq!(most, DEPTH, "requests on the ring at once");
}
