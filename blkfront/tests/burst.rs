//! A burst of responses is completed as it is consumed: the callbacks of the first responses
//! run, and the requests they issue reach the ring, before the rest of the burst is taken. A
//! backend whose disk answers a whole queue at once then gets work again after a response or
//! two, not after the frontend has copied out the whole burst.
//!
//! The test plays the backend: it answers 8 reads with one push of 8 responses and looks at the
//! request the first completion's callback issues. Request ids are handed out last-freed
//! first, so that request carries the id of the last response consumed before the callback
//! ran: one of the first responses, not the last of the burst.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::*;
use xenpv_blkfront::{Op, Options};
use xenpv_evtchn::EventChannel;
use xenpv_ring::blkif::{Blkif, BlkifResponse, OP_READ, RSP_OKAY};
use xenpv_ring::BackRing;

const BURST: usize = 8;

#[test]
fn a_burst_of_responses_is_completed_as_it_is_consumed() {
    let env = env(1 << 20);
    let backend = spawn_scripted(&env, |s| {
        let mut ring = BackRing::<Blkif, _>::new(&s.map).unwrap();
        let next = |ring: &mut BackRing<Blkif, _>, want: usize| {
            let mut reqs = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while reqs.len() < want && std::time::Instant::now() < deadline {
                match ring.next_request().unwrap() {
                    Some(r) => reqs.push(r),
                    None => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            reqs
        };
        let reqs = next(&mut ring, BURST);
        assert_eq!(reqs.len(), BURST, "the frontend's reads");
        // The data pages are left as they are: the reads' contents do not matter here.
        for r in &reqs {
            assert_eq!(r.operation, OP_READ);
            ring.produce(BlkifResponse::new(r.id, OP_READ, RSP_OKAY))
                .unwrap();
        }
        ring.push_responses_no_check();
        s.ev.notify(s.port).unwrap();
        let ids: Vec<u64> = reqs.iter().map(|r| r.id).collect();
        let follow = next(&mut ring, 1);
        assert_eq!(follow.len(), 1, "the request of the first callback");
        // Answer it too, so that the frontend closes cleanly.
        ring.produce(BlkifResponse::new(follow[0].id, OP_READ, RSP_OKAY))
            .unwrap();
        ring.push_responses_no_check();
        s.ev.notify(s.port).unwrap();
        (ids, follow[0].id)
    });
    let dev = std::sync::Arc::new(connect(
        &env,
        Options {
            persistent: false,
            ..Options::default()
        },
    ));
    let (tx, rx) = mpsc::channel();
    for i in 0..BURST as u64 {
        let (d, tx) = (dev.clone(), tx.clone());
        dev.submit(
            Op::Read {
                offset: i * 4096,
                len: 4096,
            },
            Box::new(move |r| {
                assert!(r.is_ok(), "read {i}: {r:?}");
                if i == 0 {
                    // The first completion issues one more read, as a closed-loop client does.
                    let tx2 = tx.clone();
                    d.submit(
                        Op::Read {
                            offset: 64 * 4096,
                            len: 4096,
                        },
                        Box::new(move |r| {
                            let _ = tx2.send(r.is_ok());
                        }),
                    );
                }
                let _ = tx.send(r.is_ok());
            }),
        );
    }
    for _ in 0..=BURST {
        assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    }
    let dev = std::sync::Arc::into_inner(dev).expect("callbacks are done");
    dev.close().unwrap();
    let (ids, follow) = backend.join().unwrap();
    let at = ids.iter().position(|&id| id == follow);
    assert!(
        matches!(at, Some(p) if p < BURST / 2),
        "the first callback's request took id {follow} (freed by response {at:?} of {ids:?}): \
         the callback ran only after most of the burst was consumed"
    );
}
