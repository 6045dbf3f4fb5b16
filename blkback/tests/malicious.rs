//! A malicious frontend against the `xenpv-blkback` process (DESIGN.md §6, pv-protocols.md
//! §1.6 and §6). Two devices are attached: domain 1's xvda is the attacker's, domain 2's xvda
//! belongs to a healthy frontend that keeps doing verified write+read I/O during and after every
//! attack. Each attack either gets an error response (with the request's id and operation) or
//! disconnects the attacked device alone (an `error` node and Closing), after which the attacker
//! can reconnect and do valid I/O again. Besides the attacks one by one, thousands of random
//! requests and forty random ring setups (reproducible from a printed seed) get the same
//! treatment.

#[path = "support/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use xenpv_grant::{Access, GrantMemory, GrantShare, SharedPages};
use xenpv_ring::blkif::*;
use xenpv_ring::cast;
use xenpv_ring::mock::Rng;
use xenpv_xenstore::XenbusState;

/// Submits `bad` together with a valid read, and checks that `bad` is answered `want` (with its
/// id and operation) and the valid read OKAY; then that the healthy device kept going.
fn refused(f: &mut Frontend, healthy: &Healthy, what: &str, bad: BlkifRequest, want: i16) {
    let good = f.rw(OP_READ, 0x600d, 0, 1);
    f.submit(&[bad, good]);
    let got = f.responses(2, T);
    // As Linux's blkback: an indirect request is answered with its inner operation.
    let op = match bad.operation {
        OP_INDIRECT => bad.as_indirect().indirect_op,
        op => op,
    };
    assert_eq!(
        (got[0].id, got[0].operation, got[0].status),
        (bad.id, op, want),
        "{what}: {bad:?}"
    );
    assert_eq!((got[1].id, got[1].status), (0x600d, RSP_OKAY), "{what}");
    healthy.progress(2);
}

/// Every per-request attack: ERROR for a malformed request, EOPNOTSUPP for an operation the
/// backend does not serve; the device stays Connected and no refused write reaches the disk.
/// With `persistent`, the attacker negotiates `feature-persistent` (grants stay mapped).
fn request_attacks(persistent: bool) {
    let p = Platform::start(&[(1, "xvda"), (2, "xvda")]);
    let healthy = Healthy::start(&p.root, 2, "xvda");
    let mut f = p.frontend(1, "xvda", persistent);
    f.verified_io(0, 0x11);
    let max_indirect: u16 = f
        .backend_node("feature-max-indirect-segments")
        .unwrap()
        .parse()
        .unwrap();
    assert!(max_indirect > 0);
    let discard = f.backend_node("feature-discard").as_deref() == Some("1");
    // Every bad write below targets the second half of the disk, which must stay zero.
    let high = DISK_SECTORS / 2;
    f.data.volatile().fill(0, 8192, 0xEE).unwrap();

    // nr_segments 0 on a read and a write.
    for op in [OP_READ, OP_WRITE] {
        let r = BlkifRequest::new(op, 0, 100 + u64::from(op), high);
        refused(&mut f, &healthy, "nr_segments 0", r, RSP_ERROR);
    }
    // nr_segments 12 and 255 (the slot has room for 11).
    for n in [12u8, 255] {
        for op in [OP_READ, OP_WRITE] {
            let mut r = f.rw(op, 200 + u64::from(n), high, 0);
            r.nr_segments = n;
            for s in r.seg.iter_mut() {
                *s = BlkifRequestSegment::new(f.data.grefs()[0], 0, 7);
            }
            refused(&mut f, &healthy, "too many segments", r, RSP_ERROR);
        }
    }
    // first_sect > last_sect; last_sect > 7.
    for (i, (first, last)) in [(3u8, 2u8), (7, 0), (0, 8), (0, 255), (8, 8)]
        .into_iter()
        .enumerate()
    {
        for op in [OP_READ, OP_WRITE] {
            let mut r = f.rw(op, 300 + i as u64, high, 0);
            r.seg[0] = BlkifRequestSegment::new(f.data.grefs()[0], first, last);
            refused(&mut f, &healthy, "bad sectors", r, RSP_ERROR);
        }
    }
    // A bad segment after good ones.
    let mut r = f.rw(OP_WRITE, 320, high, 0);
    r.nr_segments = 3;
    r.seg[1] = BlkifRequestSegment::new(f.data.grefs()[1], 0, 7);
    r.seg[2] = BlkifRequestSegment::new(f.data.grefs()[1], 6, 5);
    refused(&mut f, &healthy, "bad third segment", r, RSP_ERROR);
    // Past the end of the disk, and sector numbers that overflow.
    for (i, sector) in [
        DISK_SECTORS - 7,
        DISK_SECTORS,
        DISK_SECTORS + 1,
        u64::MAX / 512,
        u64::MAX / 512 + 1,
        u64::MAX - 7,
        u64::MAX,
    ]
    .into_iter()
    .enumerate()
    {
        for op in [OP_READ, OP_WRITE, OP_WRITE_BARRIER, OP_FLUSH_DISKCACHE] {
            let r = f.rw(op, 400 + i as u64, sector, 0);
            refused(&mut f, &healthy, "past the end", r, RSP_ERROR);
        }
    }

    // Indirect requests. A page of segments for the valid ones and for bad contents.
    let ind = f.grants.share(0, 1, Access::Writable).unwrap();
    let put_segs = |segs: &[BlkifRequestSegment]| {
        for (i, s) in segs.iter().enumerate() {
            let bytes: [u8; 8] = cast(s);
            ind.volatile().write(i * 8, &bytes).unwrap();
        }
    };
    let indirect = |op: u8, n: u16, id: u64, sector: u64, pages: &[u32]| {
        let mut r = BlkifRequestIndirect::new(op, n, 0, id, sector);
        r.indirect_grefs[..pages.len()].copy_from_slice(pages);
        r.to_request()
    };
    let g = f.data.grefs().to_vec();
    let ig = ind.grefs()[0];
    // Control: a valid indirect write then read of two pages.
    put_segs(&[
        BlkifRequestSegment::new(g[0], 0, 7),
        BlkifRequestSegment::new(g[1], 0, 7),
    ]);
    let got = f.roundtrip(&[indirect(OP_WRITE, 2, 500, 16, &[ig])]);
    assert_eq!(got, [(500, RSP_OKAY)]);
    let got = f.roundtrip(&[indirect(OP_READ, 2, 501, 16, &[ig])]);
    assert_eq!(got, [(501, RSP_OKAY)]);
    let n_above = max_indirect + 1;
    for (i, (op, n)) in [
        // More segments than feature-max-indirect-segments.
        (OP_READ, n_above),
        (OP_WRITE, n_above),
        // More than 8 indirect pages' worth.
        (OP_READ, 8 * 512 + 1),
        (OP_WRITE, u16::MAX),
        // No segments.
        (OP_READ, 0),
        (OP_WRITE, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let r = indirect(op, n, 510 + i as u64, high, &[ig; 8]);
        refused(&mut f, &healthy, "indirect segment count", r, RSP_ERROR);
    }
    // indirect_op neither read nor write (including indirect itself).
    for (i, op) in [
        OP_WRITE_BARRIER,
        OP_FLUSH_DISKCACHE,
        OP_RESERVED_1,
        OP_DISCARD,
        OP_INDIRECT,
        7,
        200,
    ]
    .into_iter()
    .enumerate()
    {
        let r = indirect(op, 2, 530 + i as u64, high, &[ig]);
        refused(&mut f, &healthy, "indirect_op", r, RSP_ERROR);
    }
    // A never-granted indirect page.
    for op in [OP_READ, OP_WRITE] {
        let r = indirect(op, 2, 540 + u64::from(op), high, &[0xdead_beef]);
        refused(&mut f, &healthy, "bad indirect gref", r, RSP_ERROR);
    }
    // Bad segments inside the indirect page: sectors, a never-granted data page, past the end.
    let bad_contents: [(&str, Vec<BlkifRequestSegment>, u64); 4] = [
        (
            "indirect first_sect > last_sect",
            vec![
                BlkifRequestSegment::new(g[0], 0, 7),
                BlkifRequestSegment::new(g[1], 5, 4),
            ],
            high,
        ),
        (
            "indirect last_sect > 7",
            vec![
                BlkifRequestSegment::new(g[0], 0, 7),
                BlkifRequestSegment::new(g[1], 0, 9),
            ],
            high,
        ),
        (
            "indirect never-granted data",
            vec![
                BlkifRequestSegment::new(g[0], 0, 7),
                BlkifRequestSegment::new(0x00ba_d000, 0, 7),
            ],
            high,
        ),
        (
            "indirect past the end",
            vec![
                BlkifRequestSegment::new(g[0], 0, 7),
                BlkifRequestSegment::new(g[1], 0, 7),
            ],
            DISK_SECTORS - 8,
        ),
    ];
    for (i, (what, segs, sector)) in bad_contents.into_iter().enumerate() {
        put_segs(&segs);
        for op in [OP_READ, OP_WRITE] {
            let r = indirect(op, 2, 550 + 2 * i as u64 + u64::from(op), sector, &[ig]);
            refused(&mut f, &healthy, what, r, RSP_ERROR);
        }
    }

    // A never-granted data gref, and the gref of a page just revoked.
    let gone = f.grants.share(0, 1, Access::Writable).unwrap();
    let gone_ref = gone.grefs()[0];
    f.grants.revoke(gone).unwrap();
    for (i, gref) in [0xdead_beef, 0, gone_ref].into_iter().enumerate() {
        for op in [OP_READ, OP_WRITE] {
            let mut r = f.rw(op, 600 + 2 * i as u64 + u64::from(op), high, 0);
            r.seg[0] = BlkifRequestSegment::new(gref, 0, 7);
            refused(&mut f, &healthy, "bad gref", r, RSP_ERROR);
        }
    }
    // A good and a bad segment: the good one's mapping must be undone.
    let mut r = f.rw(OP_WRITE, 620, high, 0);
    r.nr_segments = 2;
    r.seg[1] = BlkifRequestSegment::new(0xdead_beef, 0, 7);
    refused(&mut f, &healthy, "good then bad gref", r, RSP_ERROR);

    // A page granted to domain 3 instead of dom0.
    let elsewhere = f.grants.share(3, 1, Access::Writable).unwrap();
    elsewhere.volatile().fill(0, 4096, 0xEE).unwrap();
    for op in [OP_READ, OP_WRITE] {
        let mut r = f.rw(op, 700 + u64::from(op), high, 0);
        r.seg[0] = BlkifRequestSegment::new(elsewhere.grefs()[0], 0, 7);
        refused(&mut f, &healthy, "granted to domain 3", r, RSP_ERROR);
    }

    // A read-only grant: writing FROM it is fine, reading INTO it is refused (in both orders,
    // so that a persistent read-only mapping is never reused for a read).
    let ro = f.grants.share(0, 1, Access::ReadOnly).unwrap();
    ro.volatile().fill(0, 4096, 0x77).unwrap();
    let mut ro_read = f.rw(OP_READ, 800, 0, 0);
    ro_read.seg[0] = BlkifRequestSegment::new(ro.grefs()[0], 0, 7);
    refused(
        &mut f,
        &healthy,
        "read into a read-only grant",
        ro_read,
        RSP_ERROR,
    );
    let mut ro_write = f.rw(OP_WRITE, 801, 8, 0);
    ro_write.seg[0] = BlkifRequestSegment::new(ro.grefs()[0], 0, 7);
    assert_eq!(f.roundtrip(&[ro_write]), [(801, RSP_OKAY)]);
    ro_read.id = 802;
    refused(
        &mut f,
        &healthy,
        "read into a read-only grant",
        ro_read,
        RSP_ERROR,
    );
    let mut page = vec![0u8; 4096];
    ro.volatile().read(0, &mut page).unwrap();
    assert!(
        page.iter().all(|&b| b == 0x77),
        "the read-only page changed"
    );
    // Same, as an indirect read.
    put_segs(&[BlkifRequestSegment::new(ro.grefs()[0], 0, 7)]);
    let r = indirect(OP_READ, 1, 803, 0, &[ig]);
    refused(
        &mut f,
        &healthy,
        "indirect read into a read-only grant",
        r,
        RSP_ERROR,
    );

    // Discard past the end (and wrapping).
    let want = if discard { RSP_ERROR } else { RSP_EOPNOTSUPP };
    for (i, (sector, n)) in [
        (DISK_SECTORS - 8, 16),
        (DISK_SECTORS, 8),
        (0, u64::MAX),
        (u64::MAX - 7, 8),
        (8, u64::MAX / 512 + 1),
    ]
    .into_iter()
    .enumerate()
    {
        let r = BlkifRequestDiscard::new(0, 0, 900 + i as u64, sector, n).to_request();
        refused(&mut f, &healthy, "discard past the end", r, want);
    }

    // Unknown operations.
    for op in [OP_RESERVED_1, 7, 8, 200, 255] {
        let r = f.rw(op, 1000 + u64::from(op), high, 0);
        refused(&mut f, &healthy, "unknown operation", r, RSP_EOPNOTSUPP);
    }

    // Raw garbage slots, written byte by byte into the ring page.
    for (i, fill) in [0xFFu8, 0xA5, 0x5A].into_iter().enumerate() {
        let idx = f.ring.req_prod_pvt();
        assert_eq!(f.req_prod(), idx);
        let mut slot = [fill; 112];
        slot[8..16].copy_from_slice(&(1100 + i as u64).to_ne_bytes());
        // Let the ring account for the slot, then replace what `produce` wrote with the raw
        // bytes before publishing it.
        f.ring.produce(BlkifRequest::default()).unwrap();
        f.write_raw(f.slot_offset(idx), &slot);
        f.ring.push_requests_no_check();
        f.notify();
        let got = f.responses(1, T);
        assert_eq!(got[0].id, 1100 + i as u64);
        assert!(
            got[0].status == RSP_ERROR || got[0].status == RSP_EOPNOTSUPP,
            "garbage slot {fill:#x}: {:?}",
            got[0]
        );
        healthy.progress(1);
    }

    // A whole ring of bad requests at once, then valid I/O.
    let n = f.ring.size() as usize;
    let flood: Vec<_> = (0..n as u64)
        .map(|i| {
            let mut r = f.rw(OP_WRITE, 2000 + i, high, 0);
            r.seg[0].last_sect = 8 + i as u8;
            r
        })
        .collect();
    let got = f.roundtrip(&flood);
    assert_eq!(
        got,
        (0..n as u64)
            .map(|i| (2000 + i, RSP_ERROR))
            .collect::<Vec<_>>()
    );

    // The attacker's device still works, was never disconnected, and no bad write landed.
    f.verified_io(24, 0x22);
    assert_eq!(f.backend_state(), XenbusState::Connected);
    assert_eq!(f.backend_node("error"), None);
    let img = std::fs::read(p.image(1, "xvda")).unwrap();
    let half = (high * 512) as usize;
    assert!(
        img[half..].iter().all(|&b| b == 0),
        "a refused write reached the disk"
    );
    assert!(img[..4096].iter().all(|&b| b == 0x11));
    assert!(img[4096..8192].iter().all(|&b| b == 0x77));
    let rounds = healthy.finish();
    assert!(rounds > 100, "{rounds}");
    let mut p = p;
    assert!(p.backend.alive(), "xenpv-blkback died");
}

#[test]
fn request_attacks_are_refused_per_request() {
    request_attacks(false);
}

#[test]
fn request_attacks_are_refused_per_request_with_persistent_grants() {
    request_attacks(true);
}

/// Waits until the backend has disconnected the device for a protocol error.
fn disconnected(f: &Frontend) -> String {
    let deadline = Instant::now() + T;
    loop {
        let state = f.backend_state();
        if let (XenbusState::Closing | XenbusState::Closed, Some(e)) =
            (state, f.backend_node("error"))
        {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "the device was not disconnected: {state:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ring_overflow_disconnects_the_device_alone_and_it_reconnects() {
    let mut p = Platform::start(&[(1, "xvda"), (2, "xvda")]);
    let healthy = Healthy::start(&p.root, 2, "xvda");
    let mut f = p.frontend(1, "xvda", false);
    f.verified_io(0, 0x31);
    let size = f.ring.size();
    // req_prod beyond the ring, by one slot, by 1000, and "behind" the consumer (wrapped).
    for (round, jump) in [size + 1, 1000 + size, u32::MAX - 3]
        .into_iter()
        .enumerate()
    {
        let start = f.req_prod();
        f.set_req_prod(start.wrapping_add(jump));
        f.notify();
        let e = disconnected(&f);
        assert!(e.contains("ring"), "error node: {e}");
        healthy.progress(3);
        // The frontend recovers with a reconnect and a new ring.
        f.reconnect();
        assert_eq!(f.backend_state(), XenbusState::Connected);
        assert_eq!(
            f.backend_node("error"),
            None,
            "a stale error after reconnect"
        );
        f.verified_io(8 * round as u64, 0x40 + round as u8);
        healthy.progress(2);
    }
    // Overflow with requests in flight: they are never answered, the device closes.
    let r = f.rw(OP_READ, 1, 0, 1);
    f.ring.produce(r).unwrap();
    f.ring.push_requests_no_check();
    f.set_req_prod(f.req_prod().wrapping_add(size + 5));
    f.notify();
    disconnected(&f);
    f.reconnect();
    f.verified_io(64, 0x66);
    healthy.finish();
    assert!(p.backend.alive());
}

#[test]
fn event_flood_without_requests_neither_stalls_nor_spins() {
    let mut p = Platform::start(&[(1, "xvda"), (1, "xvdb")]);
    let healthy = Healthy::start(&p.root, 1, "xvdb");
    let mut f = p.frontend(1, "xvda", false);
    f.verified_io(0, 0x51);
    let before = healthy.rounds();
    for i in 0..20_000u32 {
        f.notify();
        if i % 2000 == 0 {
            // The healthy device is served in the middle of the flood.
            healthy.progress(1);
        }
    }
    healthy.progress(5);
    assert!(healthy.rounds() > before);
    // The attacked device itself still works and was not disconnected.
    f.verified_io(8, 0x52);
    assert_eq!(f.backend_state(), XenbusState::Connected);
    assert_eq!(f.backend_node("error"), None);
    healthy.finish();
    // Idle afterwards: the backend does not spin.
    std::thread::sleep(Duration::from_millis(300));
    let t0 = p.backend.cpu_seconds();
    std::thread::sleep(Duration::from_secs(1));
    let used = p.backend.cpu_seconds() - t0;
    assert!(used < 0.5, "xenpv-blkback used {used} s of CPU in 1 s idle");
    assert!(p.backend.alive());
}

#[test]
fn bad_ring_setup_disconnects_the_device_alone() {
    let mut p = Platform::start(&[(1, "xvda"), (2, "xvda")]);
    let healthy = Healthy::start(&p.root, 2, "xvda");
    let mut f = p.frontend(1, "xvda", false);
    f.verified_io(0, 0x71);
    let cases: [&[(&str, Option<&str>)]; 9] = [
        &[("ring-ref", Some("3735928559"))],
        &[("ring-ref", Some("banana"))],
        &[("ring-ref", None)],
        &[("event-channel", Some("4000"))],
        &[("event-channel", Some("-1"))],
        &[("ring-page-order", Some("20"))],
        &[("multi-queue-num-queues", Some("0"))],
        &[("multi-queue-num-queues", Some("4294967295"))],
        &[("protocol", Some("pdp11-abi"))],
    ];
    for (i, bad) in cases.into_iter().enumerate() {
        f.publish_bad(bad);
        let e = disconnected(&f);
        assert!(!e.is_empty(), "{bad:?}");
        healthy.progress(2);
        f.remove_nodes(&["ring-page-order", "multi-queue-num-queues"]);
        f.reconnect();
        assert_eq!(
            f.backend_node("error"),
            None,
            "a stale error after reconnect"
        );
        f.verified_io(8 * i as u64, 0x80 + i as u8);
    }
    healthy.finish();
    assert!(p.backend.alive());
}

#[test]
fn xenbus_state_flapping_leaves_other_devices_alone() {
    use xenpv_xenstore::xenbus;
    let mut p = Platform::start(&[(1, "xvda"), (2, "xvda")]);
    let healthy = Healthy::start(&p.root, 2, "xvda");
    let mut f = p.frontend(1, "xvda", false);
    f.verified_io(0, 0x91);
    // XSA-349/350: the frontend flips its state as fast as it can.
    let states = [
        XenbusState::Initialised,
        XenbusState::Closing,
        XenbusState::Connected,
        XenbusState::Initialising,
        XenbusState::Closed,
        XenbusState::Unknown,
    ];
    for i in 0..600 {
        xenbus::switch_state(&f.xs, &f.fe, states[i % states.len()]).unwrap();
        if i % 100 == 0 {
            healthy.progress(1);
        }
    }
    healthy.progress(3);
    // Closing always brings the backend to Closed; then a normal reconnect works.
    xenbus::switch_state(&f.xs, &f.fe, XenbusState::Closing).unwrap();
    xenbus::wait_for_peer_state(&f.xs, &f.be, |s| s == XenbusState::Closed, T).unwrap();
    f.reconnect();
    f.verified_io(8, 0x92);
    healthy.finish();
    assert!(p.backend.alive());
}

/// A frontend state node holding no state at all ("banana", "9", bytes that are no number)
/// disconnects that device, connected or not, and the device is served again once the
/// frontend starts over; another device keeps serving throughout. (Its thread had ended on the
/// error: the device was never served again, and one still at InitWait stayed there.)
#[test]
fn garbage_in_the_frontend_state_disconnects_the_device_until_it_starts_over() {
    use xenpv_xenstore::{xenbus, XsOps};
    let mut p = Platform::start(&[(1, "xvda"), (2, "xvda")]);
    let healthy = Healthy::start(&p.root, 2, "xvda");
    let mut f = p.frontend(1, "xvda", false);
    f.verified_io(0, 0x93);
    for (i, garbage) in ["banana", "9", "\u{1}\u{ff}", ""].into_iter().enumerate() {
        // Connected: the device disconnects.
        f.xs.write_str(&format!("{}/state", f.fe), garbage).unwrap();
        xenbus::wait_for_peer_state(&f.xs, &f.be, |s| s == XenbusState::Closed, T)
            .unwrap_or_else(|e| panic!("{garbage:?} while connected: {e}"));
        healthy.progress(1);
        // Starting over brings the backend to InitWait; garbage then leaves it waiting (and
        // serving nothing), and a real start after it connects.
        xenbus::switch_state(&f.xs, &f.fe, XenbusState::Initialising).unwrap();
        xenbus::wait_for_peer_state(&f.xs, &f.be, |s| s == XenbusState::InitWait, T).unwrap();
        f.xs.write_str(&format!("{}/state", f.fe), garbage).unwrap();
        healthy.progress(1);
        f.reconnect();
        f.verified_io(8 * i as u64, 0xa0 + i as u8);
    }
    healthy.finish();
    assert!(p.backend.alive());
}

/// A random request. Half are well formed (known grants, whole sector ranges within a page,
/// sectors on the disk) and most of those are served; the others have random segment counts,
/// sector ranges, sectors and grants, and one in ten is random bytes. `grefs` are grants the
/// backend may map: the attacker's two data pages, then its indirect page, whose segments the
/// caller writes. `id` is written over whatever the request holds, so that answers can be
/// matched.
fn random_request(rng: &mut Rng, grefs: &[u32; 3], id: u64) -> [u8; 112] {
    let valid = rng.one_in(2);
    let gref = |rng: &mut Rng| {
        if !valid && rng.one_in(8) {
            rng.next() as u32
        } else {
            grefs[rng.below(2) as usize]
        }
    };
    let sector = |rng: &mut Rng, sectors: u64| {
        if valid {
            rng.below(DISK_SECTORS.saturating_sub(sectors).max(1))
        } else if rng.one_in(4) {
            rng.next() >> rng.below(64)
        } else {
            rng.below(DISK_SECTORS + 16)
        }
    };
    let op = match rng.below(10) {
        0..=2 => OP_READ,
        3..=4 => OP_WRITE,
        5 => OP_DISCARD,
        6 => OP_INDIRECT,
        7 => [OP_WRITE_BARRIER, OP_FLUSH_DISKCACHE, OP_RESERVED_1][rng.below(3) as usize],
        _ => rng.next() as u8,
    };
    let mut bytes: [u8; 112] = match op {
        OP_DISCARD => {
            let n = if valid {
                1 + rng.below(64)
            } else {
                rng.below(64) << rng.below(16)
            };
            let r = BlkifRequestDiscard::new(rng.below(2) as u8, 0, id, sector(rng, n), n);
            cast(&r.to_request())
        }
        OP_INDIRECT => {
            let (inner, n, pages) = if valid {
                // At most the backend's default maximum, 256 segments (1 MiB, the disk).
                let n = 1 + rng.below(256);
                ([OP_READ, OP_WRITE][rng.below(2) as usize], n as u16, 1)
            } else {
                let inner = [OP_READ, OP_WRITE, OP_DISCARD, rng.next() as u8];
                let n = if rng.one_in(4) {
                    rng.next() as u16
                } else {
                    rng.below(600) as u16
                };
                (inner[rng.below(4) as usize], n, rng.below(9) as usize)
            };
            let mut r = BlkifRequestIndirect::new(inner, n, 0, id, sector(rng, u64::from(n) * 8));
            for g in r.indirect_grefs.iter_mut().take(pages) {
                *g = if valid || rng.one_in(2) {
                    grefs[2]
                } else {
                    gref(rng)
                };
            }
            cast(&r.to_request())
        }
        _ => {
            let n = if valid {
                1 + rng.below(11)
            } else if rng.one_in(4) {
                rng.next() as u8 as u64
            } else {
                rng.below(13)
            };
            let mut r = BlkifRequest::new(op, 0, id, sector(rng, n * 8));
            r.nr_segments = n as u8;
            for s in &mut r.seg {
                let (first, last) = if valid || !rng.one_in(3) {
                    let first = rng.below(8);
                    (first, first + rng.below(8 - first))
                } else {
                    (rng.below(16), rng.below(16))
                };
                *s = BlkifRequestSegment::new(gref(rng), first as u8, last as u8);
            }
            cast(&r)
        }
    };
    if !valid && rng.one_in(5) {
        bytes.iter_mut().for_each(|b| *b = rng.next() as u8);
    }
    bytes[8..16].copy_from_slice(&id.to_le_bytes());
    bytes
}

/// Thousands of random requests in random batches, with a random indirect page. Each is
/// answered once, with its id, its operation (or an indirect request's inner one) and a valid
/// status, or the device is disconnected and reconnects. The daemon and the healthy device
/// keep going throughout. The seed is printed; `XENPV_ATTACK_SEED` (hex) replaces it.
fn random_attacks(persistent: bool, seed: u64) {
    let mut p = Platform::start(&[(1, "xvda"), (2, "xvda")]);
    let healthy = Healthy::start(&p.root, 2, "xvda");
    let mut f = p.frontend(1, "xvda", persistent);
    f.verified_io(0, 0x21);
    let ind = f.grants.share(0, 1, Access::Writable).unwrap();
    let grefs = [f.data.grefs()[0], f.data.grefs()[1], ind.grefs()[0]];
    let mut rng = Rng::from_env_or(seed);
    let seed = rng.seed();
    let (mut sent, mut disconnects) = (0u64, 0u32);
    // Answers by status: OKAY, ERROR, EOPNOTSUPP.
    let mut answers = [0u64; 3];
    let mut id = 0u64;
    for batch in 0..400u32 {
        // The indirect page: whole pages of the data grants, or (one batch in three) some
        // segments on the indirect page itself, on unknown grants or with bad sector ranges.
        let bad = rng.one_in(3);
        let mut page = vec![0u8; 4096];
        for s in page.chunks_mut(8) {
            let (g, first, last) = if bad && rng.one_in(16) {
                let g = [grefs[2], rng.next() as u32][rng.below(2) as usize];
                (g, rng.below(16) as u8, rng.below(16) as u8)
            } else {
                (grefs[rng.below(2) as usize], 0, 7)
            };
            let seg = BlkifRequestSegment::new(g, first, last);
            s.copy_from_slice(&cast::<_, [u8; 8]>(&seg));
        }
        ind.volatile().write(0, &page).unwrap();
        let n = 1 + rng.below(8).min(u64::from(f.ring.free_requests()) - 1);
        let mut want = std::collections::HashMap::new();
        for _ in 0..n {
            id += 1;
            let bytes = random_request(&mut rng, &grefs, id);
            let slot = f.ring.produce(BlkifRequest::default()).unwrap();
            f.write_raw(f.slot_offset(slot), &bytes);
            want.insert(id, (bytes[0], bytes[1]));
        }
        sent += n;
        if rng.one_in(40) {
            // Now and then, a producer index beyond the ring: that disconnects the device.
            f.ring.push_requests_no_check();
            let size = f.ring.size();
            f.set_req_prod(
                f.req_prod()
                    .wrapping_add(size + 1 + rng.below(1 << 20) as u32),
            );
            f.notify();
        } else if f.ring.push_requests() {
            f.notify();
        }
        // Every answer, or a disconnect.
        let deadline = Instant::now() + T;
        let mut broken = false;
        while !want.is_empty() {
            match f.ring.next_response().unwrap() {
                Some(r) => {
                    let (op, inner) = want.remove(&r.id).unwrap_or_else(|| {
                        panic!("batch {batch}: an answer to no request in flight: {r:?}")
                    });
                    assert!(
                        r.operation == op || (op == OP_INDIRECT && r.operation == inner),
                        "batch {batch}: answered as operation {} for {op}/{inner}",
                        r.operation
                    );
                    let Some(k) = [RSP_OKAY, RSP_ERROR, RSP_EOPNOTSUPP]
                        .iter()
                        .position(|&s| s == r.status)
                    else {
                        panic!("batch {batch}: status {}", r.status);
                    };
                    answers[k] += 1;
                }
                None => {
                    if f.backend_node("error").is_some() {
                        broken = true;
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "batch {batch}: {} requests neither answered nor refused",
                        want.len()
                    );
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
        if broken {
            disconnected(&f);
            disconnects += 1;
            f.reconnect();
            f.verified_io(8, 0x22);
        }
        if batch % 50 == 0 {
            healthy.progress(1);
        }
    }
    let answered: u64 = answers.iter().sum();
    eprintln!(
        "seed {seed:#x}: {sent} requests; answered OKAY {}, ERROR {}, EOPNOTSUPP {}; \
         {disconnects} disconnects",
        answers[0], answers[1], answers[2]
    );
    // The mix reaches every outcome: the generator is not all noise.
    assert!(answers.iter().all(|&n| n > 20), "{answers:?} of {sent}");
    assert!(
        answered > sent / 2 && disconnects > 0,
        "{answered} of {sent}"
    );
    f.verified_io(16, 0x23);
    assert_eq!(f.backend_state(), XenbusState::Connected);
    healthy.finish();
    assert!(p.backend.alive());
}

#[test]
fn random_requests_are_answered_or_disconnect_the_device_alone() {
    random_attacks(false, 0x9E37_79B9_7F4A_7C15);
}

#[test]
fn random_requests_with_persistent_grants_are_answered_or_disconnect_the_device_alone() {
    random_attacks(true, 0xD1B5_4A32_D192_ED03);
}

/// Random frontend nodes at connection time, one to four at once (ring refs, event channels,
/// protocols, ring orders, queue counts and queue directories, features; numbers, garbage,
/// removals), over the ring the frontend had. Each setup either connects (it happened to be
/// valid) or disconnects the device alone with an `error` node; the frontend then reconnects
/// properly and does verified I/O, while a healthy device keeps serving. The seed is printed;
/// `XENPV_ATTACK_SEED` (hex) replaces it.
#[test]
fn random_ring_setups_connect_or_disconnect_the_device_alone() {
    let mut p = Platform::start(&[(1, "xvda"), (2, "xvda")]);
    let healthy = Healthy::start(&p.root, 2, "xvda");
    let mut f = p.frontend(1, "xvda", false);
    f.verified_io(0, 0xA1);
    let mut rng = Rng::from_env_or(0xB5AD_4ECE_DA1C_E2A9);
    eprintln!("seed {:#x}", rng.seed());
    let keys = [
        "ring-ref",
        "ring-ref0",
        "ring-ref1",
        "event-channel",
        "protocol",
        "ring-page-order",
        "multi-queue-num-queues",
        "queue-0/ring-ref",
        "queue-0/event-channel",
        "queue-1/ring-ref",
        "queue-1/event-channel",
        "feature-persistent",
    ];
    let (mut connected, mut refused) = (0, 0);
    for round in 0..40u8 {
        let mut bad: Vec<(&str, Option<String>)> = Vec::new();
        for _ in 0..=rng.below(4) {
            let key = keys[rng.below(keys.len() as u64) as usize];
            if bad.iter().any(|(k, _)| *k == key) {
                continue;
            }
            // Removal, of the nodes a frontend always writes.
            let present = [
                "ring-ref",
                "event-channel",
                "protocol",
                "feature-persistent",
            ];
            let value = match rng.below(8) {
                0 if present.contains(&key) => None,
                0 => Some(String::new()),
                1 => Some("banana".to_string()),
                2 => Some(String::new()),
                3 => Some((rng.next() as u32).to_string()),
                4 => Some(format!("-{}", rng.below(1 << 40))),
                5 if key == "protocol" => Some(
                    ["x86_64-abi", "x86_32-abi", "pdp11-abi"][rng.below(3) as usize].to_string(),
                ),
                _ => {
                    let top = if rng.one_in(2) { 5 } else { 1 << 33 };
                    Some(rng.below(top).to_string())
                }
            };
            bad.push((key, value));
        }
        let as_refs: Vec<(&str, Option<&str>)> =
            bad.iter().map(|(k, v)| (*k, v.as_deref())).collect();
        f.publish_bad(&as_refs);
        // Connected, or disconnected with an error: nothing else, and not for ever.
        let deadline = Instant::now() + T;
        loop {
            let state = f.backend_state();
            if state == XenbusState::Connected {
                connected += 1;
                break;
            }
            if matches!(state, XenbusState::Closing | XenbusState::Closed)
                && f.backend_node("error").is_some()
            {
                refused += 1;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: {bad:?} left the device {state:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        f.remove_nodes(&keys[1..3]);
        f.remove_nodes(&keys[5..]);
        f.reconnect();
        assert_eq!(
            f.backend_node("error"),
            None,
            "round {round}: a stale error"
        );
        f.verified_io(8 * u64::from(round), round.wrapping_mul(7) | 1);
        if round % 8 == 0 {
            healthy.progress(1);
        }
    }
    eprintln!("{connected} setups connected, {refused} refused");
    assert!(refused > 10, "{refused} refused");
    healthy.finish();
    assert!(p.backend.alive());
}

/// Every mapping of the frontend's pages is released when its device disconnects, whether
/// the frontend closes it or a protocol error does (XSA-371: a frontend that reconnects again
/// and again must not pile up mappings; XSA-396: its pages must be free to end): revoking
/// the data and ring pages afterwards ends them at once. While connected, a page the backend
/// keeps mapped as a persistent grant cannot be ended: the check sees mappings.
#[test]
fn every_mapping_is_released_when_the_device_disconnects() {
    use xenpv_grant::Revoke;
    let mut p = Platform::start(&[(1, "xvda")]);
    for protocol_error in [false, true] {
        let mut f = p.frontend(1, "xvda", true);
        f.verified_io(0, 0x71);
        // A third page, used once: blkback keeps it mapped (persistent grants), so ending it
        // now is deferred.
        let extra = f.grants.share(0, 1, Access::Writable).unwrap();
        let mut r = BlkifRequest::new(OP_READ, 0, 77, 8);
        r.nr_segments = 1;
        r.seg[0] = BlkifRequestSegment::new(extra.grefs()[0], 0, 7);
        assert_eq!(f.roundtrip(&[r]), [(77, RSP_OKAY)]);
        assert_eq!(
            f.grants.revoke(extra).unwrap(),
            Revoke::Deferred { in_use: 1 },
            "a persistently mapped page cannot be ended while connected"
        );
        if protocol_error {
            f.set_req_prod(f.req_prod().wrapping_add(f.ring.size() + 1));
            f.notify();
            disconnected(&f);
        }
        xenpv_xenstore::xenbus::switch_state(&f.xs, &f.fe, XenbusState::Closed).unwrap();
        xenpv_xenstore::xenbus::wait_for_peer_state(&f.xs, &f.be, |s| s == XenbusState::Closed, T)
            .unwrap();
        let spare = f.grants.share(0, 1, Access::Writable).unwrap();
        let data = std::mem::replace(&mut f.data, spare);
        assert_eq!(
            f.grants.revoke(data).unwrap(),
            Revoke::Revoked,
            "data pages still mapped after the disconnect (protocol error: {protocol_error})"
        );
        let Frontend { ring, grants, .. } = f;
        assert_eq!(
            grants.revoke(ring.into_memory()).unwrap(),
            Revoke::Revoked,
            "the ring still mapped after the disconnect (protocol error: {protocol_error})"
        );
        // Back to where a new frontend starts.
        let xs = xenpv_xenstore::Client::connect_local(&p.root, 1).unwrap();
        let fe = format!("/local/domain/1/device/vbd/{}", devid("xvda"));
        xenpv_xenstore::xenbus::switch_state(&xs, &fe, XenbusState::Initialising).unwrap();
    }
    assert!(p.backend.alive());
}
