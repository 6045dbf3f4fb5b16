//! Poll mode (`Options::poll`, `BlkFront::set_polling`): a queue thread with requests in flight
//! polls the ring instead of sleeping on its event channel, so it sees responses the backend
//! publishes without notifying; in hybrid mode the same waits are slept through.
//!
//! The test plays a backend that notifies late: it answers each read a few milliseconds after
//! taking it (longer than hybrid polling's budget), publishes the response without looking at
//! `rsp_event`, and sends the event only `LATE` afterwards (a queue thread asleep has nothing
//! else to wake it); meanwhile it waits for the next read. The load generator keeps one read in flight (each
//! completion issues the next on the queue thread, so the thread has a request in flight
//! whenever it waits), first in hybrid mode, then in poll mode (the workload's sixth field), and
//! reports how often a queue thread slept with a request in flight. Polling does not happen
//! while the machine's CPUs are oversubscribed, so the poll-mode bound leaves room for some
//! waits slept through.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use xenpv_blkfront::load::{run, Workload};
use xenpv_blkfront::Options;
use xenpv_evtchn::EventChannel;
use xenpv_ring::blkif::{Blkif, BlkifResponse, OP_READ, RSP_OKAY};
use xenpv_ring::BackRing;

/// How long the backend holds each read before it answers.
const HOLD: Duration = Duration::from_millis(3);

/// How long after publishing a response the backend notifies.
const LATE: Duration = Duration::from_millis(20);

#[test]
fn poll_mode_sees_responses_published_without_a_notification() {
    let env = env(1 << 20);
    let done = Arc::new(AtomicBool::new(false));
    let stop = done.clone();
    let backend = spawn_scripted(&env, move |s| {
        let mut ring = BackRing::<Blkif, _>::new(&s.map).unwrap();
        let mut answered = 0u64;
        let mut notify_at = None;
        while !stop.load(Ordering::SeqCst) {
            if notify_at.is_some_and(|t| Instant::now() >= t) {
                s.ev.notify(s.port).unwrap();
                notify_at = None;
            }
            let Some(r) = ring.next_request().unwrap() else {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            };
            assert_eq!(r.operation, OP_READ);
            std::thread::sleep(HOLD);
            ring.produce(BlkifResponse::new(r.id, OP_READ, RSP_OKAY))
                .unwrap();
            // Published, notified only `LATE` after.
            ring.push_responses_no_check();
            notify_at = Some(Instant::now() + LATE);
            answered += 1;
        }
        answered
    });
    let dev = Arc::new(connect(
        &env,
        Options {
            persistent: false,
            ..Options::default()
        },
    ));
    assert!(!dev.polling());
    let hybrid: Workload = "randread 4096 1 0 0.4 hybrid".parse().unwrap();
    let h = run(&dev, &hybrid).unwrap();
    let polled: Workload = "randread 4096 1 0 0.4 poll".parse().unwrap();
    let p = run(&dev, &polled).unwrap();
    eprintln!("hybrid: {h:?}\npoll: {p:?}");
    // The mode is the device's again after each run.
    assert!(!dev.polling());
    dev.set_polling(true);
    assert!(dev.polling());
    dev.set_polling(false);
    done.store(true, Ordering::SeqCst);
    dev.close().unwrap();
    let answered = backend.join().unwrap();
    assert!(answered >= h.all_ios + p.all_ios, "{answered} answered");
    assert_eq!((h.errors, p.errors), (0, 0));
    assert!(!h.polling && p.polling);
    // Hybrid polling gives up after its 50 µs budget: every wait is slept through (and ends
    // with the late notification).
    assert!(h.ios > 0, "{h:?}");
    assert!(h.busy_sleeps_per_io >= 0.9, "hybrid mode: {h:?}");
    // Polling sees each response as it is published.
    assert!(p.busy_sleeps_per_io < 0.5, "poll mode: {p:?}");
}
