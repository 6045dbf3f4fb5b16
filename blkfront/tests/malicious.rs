//! A hostile backend played by the test: it maps the frontend's ring with the local grant
//! provider and writes raw responses. Every bad response must be reported as a protocol error
//! (the device breaks, requests fail) without a crash.

mod common;

use std::time::Duration;

use common::*;
use xenpv_blkfront::{Error, Op, Options};
use xenpv_evtchn::EventChannel;
use xenpv_grant::GrantMemory;
use xenpv_ring::blkif::{Blkif, BlkifResponse, OP_READ, OP_WRITE, RSP_OKAY};
use xenpv_ring::BackRing;
use xenpv_xenstore::{xenbus, XenbusState, XsOps};

enum Evil {
    UnknownId,
    DuplicateId,
    WrongOp,
    BadStatus,
    ImpossibleRspProd,
}

fn run(evil: Evil) {
    let evil_kind = match evil {
        Evil::DuplicateId => 1,
        _ => 0,
    };
    let env = env(1 << 20);
    let backend = spawn_scripted(&env, move |s| {
        let mut ring = BackRing::<Blkif, _>::new(&s.map).unwrap();
        // Wait for both requests.
        let mut reqs = Vec::new();
        while reqs.len() < 2 {
            if let Some(r) = ring.next_request().unwrap() {
                reqs.push(r);
                continue;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let req = reqs[0];
        assert_eq!(req.operation, OP_READ);
        match evil {
            Evil::UnknownId => {
                ring.produce(BlkifResponse::new(999, OP_READ, RSP_OKAY))
                    .unwrap();
            }
            Evil::DuplicateId => {
                // Two responses for the same id (two requests outstanding, so rsp_prod is sane).
                ring.produce(BlkifResponse::new(req.id, OP_READ, RSP_OKAY))
                    .unwrap();
                ring.produce(BlkifResponse::new(req.id, OP_READ, RSP_OKAY))
                    .unwrap();
            }
            Evil::WrongOp => {
                ring.produce(BlkifResponse::new(req.id, OP_WRITE, RSP_OKAY))
                    .unwrap();
            }
            Evil::BadStatus => {
                ring.produce(BlkifResponse::new(req.id, OP_READ, 77))
                    .unwrap();
            }
            Evil::ImpossibleRspProd => {
                // rsp_prod (offset 8 of the shared header) far beyond the requests published.
                s.map.volatile().write_u32(8, 1000).unwrap();
            }
        }
        if !matches!(evil, Evil::ImpossibleRspProd) {
            ring.push_responses_no_check();
        }
        let _ = s.ev.notify(s.port);
    });
    let dev = connect(
        &env,
        Options {
            persistent: false,
            ..Options::default()
        },
    );
    let first = dev.submit_ticket(Op::Read {
        offset: 0,
        len: 4096,
    });
    let second = dev.submit_ticket(Op::Read {
        offset: 4096,
        len: 4096,
    });
    let (r1, r2) = (first.wait(), second.wait());
    if matches!(evil_kind, 1) {
        assert!(r1.is_ok(), "the first answer was valid: {r1:?}");
    } else {
        assert!(matches!(r1, Err(Error::Protocol(_))), "got {r1:?}");
    }
    assert!(matches!(r2, Err(Error::Protocol(_))), "got {r2:?}");
    // The error is reported and the device is down; further requests fail, nothing crashes.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while dev.error().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let err = dev.error().expect("protocol error reported");
    eprintln!("reported: {err}");
    assert!(matches!(err, Error::Protocol(_)));
    assert!(dev.read_at(&mut [0; 512], 0).is_err());
    // The frontend says so in xenstore.
    xenbus::wait_for_peer_state(
        &env.dom0,
        &env.fe,
        |s| s == XenbusState::Closing,
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(env
        .dom0
        .read_opt(&format!("{}/error", env.fe))
        .unwrap()
        .is_some());
    backend.join().unwrap();
    drop(dev);
}

#[test]
fn unknown_id() {
    run(Evil::UnknownId);
}

#[test]
fn duplicate_id() {
    run(Evil::DuplicateId);
}

#[test]
fn wrong_operation() {
    run(Evil::WrongOp);
}

#[test]
fn bad_status() {
    run(Evil::BadStatus);
}

#[test]
fn impossible_rsp_prod() {
    run(Evil::ImpossibleRspProd);
}
