//! A hostile backend played by the test: it maps the frontend's ring with the local grant
//! provider and writes raw responses. Every bad response must be reported as a protocol error
//! (the device breaks, requests fail) without a crash. Random rounds (reproducible from a
//! printed seed) mix honest answers in random order with one lie of each kind.

mod common;

use std::time::Duration;

use common::*;
use xenpv_blkfront::{BlkFront, Error, Op, Options};
use xenpv_evtchn::EventChannel;
use xenpv_grant::GrantMemory;
use xenpv_ring::blkif::{Blkif, BlkifResponse, OP_READ, OP_WRITE, RSP_OKAY};
use xenpv_ring::mock::Rng;
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

/// What a hostile backend does once in a round: each is always a protocol error.
#[derive(Debug, Clone, Copy)]
enum Lie {
    /// An id that no request ever had (ours are ring slots).
    UnknownId,
    /// A read answered as a write, or the other way round.
    WrongOp,
    /// A status outside OKAY, ERROR and EOPNOTSUPP.
    BadStatus,
    /// `rsp_prod` more than a ring ahead.
    RspProdJump,
}

/// The byte a read of the 1 MiB disk finds in `sector` (the scripted backend's contents).
fn disk_byte(sector: u64) -> u8 {
    (sector % 251) as u8
}

/// One round, with or without persistent grants: 64 random reads and writes submitted at once
/// (so that some wait for ring slots)
/// against a backend that answers them in random order and batches, fills each read's pages
/// with the disk's contents, fails one request in ten with ERROR, and in `lie` rounds breaks
/// the protocol once after a random number of honest answers. Every operation completes once;
/// a read that succeeds has the disk's contents; a round with a lie ends with the device broken
/// (a protocol error reported, later requests refused), one without keeps it healthy.
fn random_round(rng: &mut Rng, lie: Option<Lie>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use xenpv_blkfront::Ticket;
    use xenpv_grant::local::LocalGrants;
    use xenpv_grant::{Access, GrantMap};
    use xenpv_ring::blkif::RSP_ERROR;

    let env = env(1 << 20);
    let stop = Arc::new(AtomicBool::new(false));
    let (stop2, root) = (stop.clone(), env.root.clone());
    let mut brng = Rng::new(rng.next());
    let lie_after = brng.below(48);
    let persistent = rng.one_in(2);
    let keys: &[(&str, &str)] = if persistent {
        &[("feature-persistent", "1")]
    } else {
        &[]
    };
    let backend = spawn_scripted_with(&env, keys, move |s| {
        let grants = LocalGrants::connect(root.join("dom0/grant.sock")).unwrap();
        let mut ring = BackRing::<Blkif, _>::new(&s.map).unwrap();
        let mut held = Vec::new();
        let (mut answered, mut lied, mut frozen) = (0u64, false, false);
        while !stop2.load(Ordering::SeqCst) {
            if frozen {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            while let Ok(Some(r)) = ring.next_request() {
                held.push(r);
            }
            if held.is_empty() {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            for _ in 0..=brng.below(held.len() as u64) {
                let r = held.swap_remove(brng.below(held.len() as u64) as usize);
                if let (Some(lie), false) = (lie, lied) {
                    if answered >= lie_after {
                        lied = true;
                        let (id, op, status) = match lie {
                            Lie::UnknownId => (1 << 40 | brng.next(), r.operation, RSP_OKAY),
                            Lie::WrongOp => (r.id, r.operation ^ 1, RSP_OKAY),
                            Lie::BadStatus => (r.id, r.operation, 3 + brng.below(1000) as i16),
                            Lie::RspProdJump => {
                                // From now on the index stays where it was put: nothing more
                                // is published.
                                let prod = ring
                                    .rsp_prod_pvt()
                                    .wrapping_add(33 + brng.below(999) as u32);
                                s.map.volatile().write_u32(8, prod).unwrap();
                                frozen = true;
                                break;
                            }
                        };
                        ring.produce(BlkifResponse::new(id, op, status)).unwrap();
                        continue;
                    }
                }
                let status = if brng.one_in(10) { RSP_ERROR } else { RSP_OKAY };
                if r.operation == OP_READ && status == RSP_OKAY {
                    // The disk's contents into each segment's sectors.
                    let mut sector = r.sector_number;
                    for seg in &r.seg[..r.nr_segments as usize] {
                        let m = grants.map(&[(1, seg.gref)], Access::Writable).unwrap();
                        for k in seg.first_sect..=seg.last_sect {
                            let at = usize::from(k) * 512;
                            m.volatile().fill(at, 512, disk_byte(sector)).unwrap();
                            sector += 1;
                        }
                    }
                }
                ring.produce(BlkifResponse::new(r.id, r.operation, status))
                    .unwrap();
                answered += 1;
            }
            if !frozen {
                ring.push_responses_no_check();
            }
            let _ = s.ev.notify(s.port);
        }
        answered
    });
    let dev = connect(
        &env,
        Options {
            persistent,
            ..Options::default()
        },
    );
    assert_eq!(dev.info().persistent, persistent);
    let ops: Vec<(Op, Ticket)> = (0..64)
        .map(|_| {
            let offset = rng.below(2048 - 128) * 512;
            let len = (1 + rng.below(128) as usize) * 512;
            let op = if rng.one_in(2) {
                Op::Read { offset, len }
            } else {
                Op::Write {
                    offset,
                    data: vec![0x5a; len],
                }
            };
            (op.clone(), dev.submit_ticket(op))
        })
        .collect();
    let (mut ok, mut failed, mut protocol) = (0, 0, 0);
    for (op, t) in ops {
        match (t.wait(), op) {
            (Ok(data), Op::Read { offset, len }) => {
                assert_eq!(data.len(), len);
                for (i, b) in data.chunks(512).enumerate() {
                    let want = disk_byte(offset / 512 + i as u64);
                    assert!(
                        b.iter().all(|&x| x == want),
                        "{lie:?}: read at {offset}: sector {i}"
                    );
                }
                ok += 1;
            }
            (Ok(_), _) => ok += 1,
            (Err(Error::Io { .. }), _) => failed += 1,
            (Err(Error::Protocol(_)), _) if lie.is_some() => protocol += 1,
            (Err(e), op) => panic!("{lie:?}: {op:?}: {e}"),
        }
    }
    eprintln!(
        "{lie:?} after {lie_after} (persistent grants: {persistent}): {ok} done, {failed} \
         failed, {protocol} refused"
    );
    match lie {
        None => {
            assert!(dev.error().is_none(), "{:?}", dev.error());
            assert!(ok > 32, "{ok} of 64 done");
            // Still served (the backend fails one request in ten, honestly).
            match dev.write_at(&[1; 512], 0) {
                Ok(()) | Err(Error::Io { .. }) => {}
                Err(e) => panic!("after the round: {e}"),
            }
        }
        Some(_) => {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while dev.error().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(
                matches!(dev.error(), Some(Error::Protocol(_))),
                "{:?}",
                dev.error()
            );
            assert!(dev.read_at(&mut [0; 512], 0).is_err());
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    // A broken device is closing already; a healthy one closes now.
    let _ = dev.close();
    drop(dev);
    backend.join().unwrap();
}

/// Random rounds against a hostile backend, honest ones and ones with each kind of lie; the
/// seed is printed, and `XENPV_ATTACK_SEED` (hex) replaces it ([`Rng::from_env_or`]).
#[test]
fn random_rounds_against_a_lying_backend() {
    let mut rng = Rng::from_env_or(0x5DEE_CE66_D1CE_4E5B);
    eprintln!("seed {:#x}", rng.seed());
    let lies = [
        None,
        Some(Lie::UnknownId),
        Some(Lie::WrongOp),
        Some(Lie::BadStatus),
        Some(Lie::RspProdJump),
    ];
    for round in 0..15 {
        random_round(&mut rng, lies[round % lies.len()]);
    }
}

/// A backend announcing a size whose byte count overflows a u64: the connection is refused
/// with an error naming the node (a size computed from it would wrap, or panic in a debug
/// build), and the frontend does not crash.
#[test]
fn a_size_that_overflows_is_refused() {
    let env = env(1 << 20);
    // 2^55 sectors of 512 bytes is 2^64 bytes.
    let backend = spawn_scripted_with(&env, &[("sectors", "36028797018963968")], |_| ());
    let got = BlkFront::connect(front_platform(&env.root), &env.fe, Options::default());
    match got {
        Err(Error::Node { path, why }) => {
            assert!(path.ends_with("/sectors"), "{path}: {why}");
            assert!(why.contains("overflow"), "{why}");
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(dev) => panic!("connected to a disk of {} bytes", dev.size()),
    }
    // The frontend says why and closes, so that the backend lets go.
    assert_eq!(
        xenbus::read_state(&env.dom0, &env.fe).unwrap(),
        XenbusState::Closing
    );
    let error = env.dom0.read_string(&format!("{}/error", env.fe)).unwrap();
    assert!(error.contains("sectors"), "{error}");
    backend.join().unwrap();
}

/// XSA-396 across a reconnect: a backend that goes away with the ring still mapped, comes back
/// (the frontend reconnects and re-issues its read on a new ring), then writes a forged answer
/// into the old ring page it still holds and scribbles over it. The old page is never used
/// again: the new ring and the read's data page are other pages, the forged answer completes
/// nothing, and the read returns what the backend put in its data page.
#[test]
fn a_backend_writing_to_the_old_ring_after_a_reconnect_changes_nothing() {
    use xenpv_grant::{Access, GrantMap};
    let env = env(1 << 20);
    let (root, fe, be) = (env.root.clone(), env.fe.clone(), env.be.clone());
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answering = answered.clone();
    let backend = std::thread::spawn(move || {
        // A connection's ring: its gref, the ring, and the first request on it.
        fn take(
            s: &Scripted,
        ) -> (
            u32,
            BackRing<Blkif, &xenpv_grant::local::LocalMapping>,
            xenpv_ring::blkif::BlkifRequest,
        ) {
            let gref: u32 =
                s.xs.read_string(&format!("{}/ring-ref", s.fe))
                    .unwrap()
                    .parse()
                    .unwrap();
            let mut ring = BackRing::<Blkif, _>::new(&s.map).unwrap();
            let req = loop {
                if let Some(r) = ring.next_request().unwrap() {
                    break r;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            (gref, ring, req)
        }
        // First connection: take the read, never answer it, and leave with the ring mapped.
        let old = scripted_backend(&root, &fe, &be);
        let (old_gref, mut ring, req) = take(&old);
        xenbus::switch_state(&old.xs, &be, XenbusState::Closed).unwrap();
        // Second connection: the frontend re-issues the read on a new ring.
        let new = scripted_backend(&root, &fe, &be);
        let (new_gref, mut ring2, again) = take(&new);
        assert_eq!(again.operation, OP_READ);
        assert_eq!({ again.sector_number }, { req.sector_number });
        let data_gref = again.seg[0].gref;
        assert_ne!(
            new_gref, old_gref,
            "the old ring page came back as the new ring"
        );
        assert_ne!(
            data_gref, old_gref,
            "the old ring page came back as a data page"
        );
        // The answer's data, then the forgery on the old page: an answer for the read's id,
        // and the rest of the page scribbled over.
        let grants =
            xenpv_grant::local::LocalGrants::connect(root.join("dom0/grant.sock")).unwrap();
        let data = grants.map(&[(1, data_gref)], Access::Writable).unwrap();
        data.volatile().fill(0, 4096, 0x5A).unwrap();
        ring.produce(BlkifResponse::new(again.id, OP_READ, RSP_OKAY))
            .unwrap();
        ring.push_responses_no_check();
        old.map
            .volatile()
            .fill(64 + 16, 4096 - 64 - 16, 0xEE)
            .unwrap();
        let _ = old.ev.notify(old.port);
        let _ = new.ev.notify(new.port);
        // Time for a frontend that still listened to the old ring to take the forgery.
        std::thread::sleep(Duration::from_millis(200));
        // Now the real answer.
        answering.store(true, std::sync::atomic::Ordering::SeqCst);
        ring2
            .produce(BlkifResponse::new(again.id, OP_READ, RSP_OKAY))
            .unwrap();
        ring2.push_responses_no_check();
        new.ev.notify(new.port).unwrap();
        (old, new)
    });
    let dev = connect(&env, Options::default());
    let mut buf = vec![0u8; 4096];
    dev.read_at(&mut buf, 8192).unwrap();
    assert!(
        answered.load(std::sync::atomic::Ordering::SeqCst),
        "the read completed before the new backend answered it: from the forged answer"
    );
    assert!(
        buf.iter().all(|&b| b == 0x5A),
        "the read's data is not the backend's"
    );
    assert!(dev.error().is_none(), "{:?}", dev.error());
    assert_eq!(dev.reconnects(), 1);
    let (_old, _new) = backend.join().unwrap();
    drop(dev);
}
