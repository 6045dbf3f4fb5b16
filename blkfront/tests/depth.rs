//! Large requests at depth with persistent grants: the frontend's persistent pool
//! (`Options::pool_pages`) bounds the bytes in flight. A 1 MiB read takes 257 pages (256 data
//! pages and an indirect page), so the default pool of 960 pages lets three through at a time
//! and the rest wait for a response; a pool of 4096 pages lets a workload at queue depth 8 have
//! all eight on the ring.
//!
//! The test plays a backend that offers persistent grants and 256-segment indirect requests and
//! holds every request it takes, answering them all once it holds eight, or once no new request
//! has come for 500 ms (the frontend waits for pages). The load generator reads 1 MiB blocks at
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
fn the_default_pool_lets_three_one_mib_reads_through() {
    assert_eq!(Options::default().pool_pages, 960);
    assert_eq!(most_in_flight(Options::default()), 3);
}

#[test]
fn a_pool_of_4096_pages_lets_eight_one_mib_reads_through() {
    let opts = Options {
        pool_pages: 4096,
        ..Options::default()
    };
    assert_eq!(most_in_flight(opts), DEPTH);
}

/// The most 1 MiB reads on the ring at once while the load generator reads at depth 8.
fn most_in_flight(opts: Options) -> usize {
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
            let stalled = last.elapsed() > Duration::from_millis(500);
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
    let dev = Arc::new(connect(&env, opts));
    let w: Workload = format!("read 1048576 {DEPTH} 0 0.5").parse().unwrap();
    let r = run(&dev, &w).unwrap();
    done.store(true, Ordering::SeqCst);
    dev.close().unwrap();
    let (most, answered) = backend.join().unwrap();
    eprintln!("{r:?}; the backend held at most {most} requests, answered {answered}");
    assert_eq!(r.errors, 0, "{r:?}");
    assert!(answered >= r.all_ios, "{answered} answered, {r:?}");
    most
}
