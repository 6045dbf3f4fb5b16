//! Ring behaviour: wrap-around at 2^32, full and empty rings, the notify decisions of ring.h,
//! final checks, hostile index movements, initialisation, and the entry layouts in place.

use xenpv_ring::blkif::*;
use xenpv_ring::mock::{self, SharedPages, REQ_EVENT, REQ_PROD, RSP_EVENT, RSP_PROD};
use xenpv_ring::netif::{
    Gso, Hash, NetifCtrl, NetifExtraInfo, NetifRx, NetifTx, RxFlags, TxFlags, EXTRA_FLAG_MORE,
    GSO_TYPE_TCPV4,
};
use xenpv_ring::protocol::notify_needed;
use xenpv_ring::{BackRing, Error, FrontRing, RawRingMemory, RingProtocol};

fn req(id: u64) -> BlkifRequest {
    let mut r = BlkifRequest::new(OP_READ, 0x33, id, id * 8);
    r.nr_segments = 1;
    r.seg[0] = BlkifRequestSegment::new(id as u32, 0, 7);
    r
}

fn rsp(r: BlkifRequest) -> BlkifResponse {
    BlkifResponse::new(r.id, r.operation, RSP_OKAY)
}

/// Front and back attached at `start` (the shared header moved there, as after many wraps).
fn pair_at(
    start: u32,
    order: u32,
) -> (
    FrontRing<Blkif, SharedPages>,
    BackRing<Blkif, SharedPages>,
    SharedPages,
) {
    let pages = SharedPages::new(order);
    drop(FrontRing::<Blkif, _>::init(pages.clone()).unwrap());
    for off in [REQ_PROD, RSP_PROD] {
        pages.write_u32(off, start);
    }
    for off in [REQ_EVENT, RSP_EVENT] {
        pages.write_u32(off, start.wrapping_add(1));
    }
    let front = FrontRing::attach(pages.clone(), start).unwrap();
    let back = BackRing::attach(pages.clone(), start).unwrap();
    (front, back, pages)
}

#[test]
fn notify_decisions_of_ring_h() {
    // (old, new, event, notify): notify iff event is in (old, new], wrapping.
    let cases: &[(u32, u32, u32, bool)] = &[
        (0, 1, 1, true),                        // peer waits for the first entry
        (0, 1, 0, false),                       // event already passed
        (0, 1, 2, false),                       // peer wants to hear later
        (0, 5, 3, true),                        // event inside the batch
        (0, 5, 5, true),                        // event at the last entry
        (0, 5, 6, false),                       // event just after the batch
        (5, 5, 5, false),                       // nothing published
        (u32::MAX - 1, 2, u32::MAX, true),      // batch wraps, event before the wrap
        (u32::MAX - 1, 2, 0, true),             // event at the wrap
        (u32::MAX - 1, 2, 2, true),             // event at the end, after the wrap
        (u32::MAX - 1, 2, 3, false),            // after the batch, after the wrap
        (u32::MAX - 1, 2, u32::MAX - 1, false), // event at old: already notified
        (u32::MAX, 0, 0, true),                 // single entry crossing 2^32
        (10, 20, 1_000_000, false),             // event far ahead
        (10, 20, 5, false),                     // event far behind
    ];
    for &(old, new, event, notify) in cases {
        assert_eq!(
            notify_needed(old, new, event),
            notify,
            "old {old} new {new} event {event}"
        );
    }
}

#[test]
fn indexes_wrap_at_2_pow_32() {
    for start in [u32::MAX - 5, u32::MAX - 31, u32::MAX, 0x8000_0000 - 3] {
        let (mut front, mut back, pages) = pair_at(start, 0);
        let mut next_id = 0u64;
        let mut expect = 0u64;
        for round in 0..50 {
            let n = 1 + round % 32;
            for _ in 0..n {
                front.produce(req(next_id)).unwrap();
                next_id += 1;
            }
            let _ = front.push_requests();
            while let Some(r) = back.next_request().unwrap() {
                back.produce(rsp(r)).unwrap();
            }
            let _ = back.push_responses();
            while let Some(r) = front.next_response().unwrap() {
                assert_eq!(r.id, expect);
                assert_eq!(r.status, RSP_OKAY);
                expect += 1;
            }
        }
        assert_eq!(expect, next_id);
        let total = next_id as u32;
        assert_eq!(pages.read_u32(REQ_PROD), start.wrapping_add(total));
        assert_eq!(pages.read_u32(RSP_PROD), start.wrapping_add(total));
        assert_eq!(front.req_prod_pvt(), start.wrapping_add(total));
        assert_eq!(back.req_cons(), start.wrapping_add(total));
    }
}

#[test]
fn full_and_empty() {
    let (mut front, mut back) = mock::pair::<Blkif>(0).unwrap();
    assert_eq!(front.size(), 32);
    assert_eq!(front.free_requests(), 32);
    assert_eq!(
        back.next_request().unwrap(),
        None,
        "an empty ring yields nothing"
    );
    assert_eq!(front.next_response().unwrap(), None);
    for i in 0..32 {
        front.produce(req(i)).unwrap();
    }
    assert!(front.is_full());
    assert_eq!(front.produce(req(99)), Err(Error::Full));
    assert!(
        front.push_requests(),
        "the backend's initial req_event (1) asks for a notification"
    );
    assert_eq!(back.unconsumed_requests().unwrap(), 32);
    assert_eq!(back.produce(rsp(req(0))), Err(Error::NoOutstandingRequest));
    for i in 0..32 {
        let r = back.next_request().unwrap().unwrap();
        assert_eq!(r, req(i), "requests arrive intact and in order");
    }
    assert_eq!(back.next_request().unwrap(), None);
    assert_eq!(back.outstanding(), 32);
    for i in 0..32 {
        back.produce(rsp(req(i))).unwrap();
    }
    assert_eq!(back.produce(rsp(req(0))), Err(Error::NoOutstandingRequest));
    assert!(back.push_responses());
    // The ring is still full for the frontend until it consumes the responses.
    assert!(front.is_full());
    for i in 0..32 {
        assert_eq!(front.next_response().unwrap().unwrap().id, i);
    }
    assert_eq!(front.free_requests(), 32);
    assert_eq!(front.next_response().unwrap(), None);
}

#[test]
fn multi_page_ring_sizes_and_straddling_entries() {
    for (order, entries) in [(0, 32), (1, 64), (2, 128), (3, 256), (4, 512)] {
        let (front, _back) = mock::pair::<Blkif>(order).unwrap();
        assert_eq!(front.size(), entries);
        let (front, _back) = mock::pair::<BlkifX86_32>(order).unwrap();
        assert_eq!(front.size(), entries);
    }
    // x86_32 entries are 108 bytes: in a 2-page ring, entry 37 spans offsets 4060..4168.
    let (mut front, mut back) = mock::pair::<BlkifX86_32>(1).unwrap();
    let first = 64 + 37 * 108;
    assert!(first < 4096 && first + 108 > 4096);
    for i in 0..64u64 {
        let mut r = X86_32Request::from_native(&req(i));
        r.seg[10] = BlkifRequestSegment::new(0xdead_0000 + i as u32, 1, 6);
        front.produce(r).unwrap();
    }
    let _ = front.push_requests();
    for i in 0..64u64 {
        let r = back.next_request().unwrap().unwrap().to_native();
        assert_eq!(r.id, i);
        assert_eq!(
            r.seg[10],
            BlkifRequestSegment::new(0xdead_0000 + i as u32, 1, 6)
        );
        back.produce(X86_32Response::from(rsp(r))).unwrap();
    }
    let _ = back.push_responses();
    for i in 0..64u64 {
        let r = front.next_response().unwrap().unwrap();
        assert_eq!({ r.id }, i);
    }
}

#[test]
fn netif_rings_sizes() {
    assert_eq!(mock::pair::<NetifTx>(0).unwrap().0.size(), 256);
    assert_eq!(mock::pair::<NetifRx>(0).unwrap().0.size(), 256);
    assert_eq!(mock::pair::<NetifCtrl>(0).unwrap().0.size(), 128);
}

#[test]
fn notification_suppression_and_final_check() {
    let (mut front, mut back, pages) = pair_at(100, 0);
    // The backend has not armed req_event beyond 101: the first push notifies, the next ones
    // don't (the backend is known to be awake and will final-check).
    front.produce(req(0)).unwrap();
    assert!(front.push_requests());
    front.produce(req(1)).unwrap();
    assert!(
        !front.push_requests(),
        "no notification while the backend is awake"
    );
    assert!(!front.push_requests(), "pushing nothing never notifies");
    // Backend drains, answers, and final-checks: nothing left, so it arms req_event.
    while let Some(r) = back.next_request().unwrap() {
        back.produce(rsp(r)).unwrap();
    }
    assert!(
        back.push_responses(),
        "the frontend armed rsp_event at init/attach"
    );
    assert!(!back.final_check_for_requests().unwrap());
    assert_eq!(pages.read_u32(REQ_EVENT), back.req_cons().wrapping_add(1));
    // Now the next request must notify.
    front.produce(req(2)).unwrap();
    assert!(front.push_requests());
    // final check finds work published after the consumer looked.
    assert!(back.final_check_for_requests().unwrap());
    // Frontend side.
    let _ = front.next_response().unwrap();
    let _ = front.next_response().unwrap();
    assert!(!front.final_check_for_responses().unwrap());
    assert_eq!(pages.read_u32(RSP_EVENT), front.rsp_cons().wrapping_add(1));
    let r = back.next_request().unwrap().unwrap();
    back.produce(rsp(r)).unwrap();
    assert!(back.push_responses(), "the frontend re-armed rsp_event");
    assert!(front.final_check_for_responses().unwrap());
}

#[test]
fn batching_notifies_once_per_batch() {
    let (mut front, mut back) = mock::pair::<Blkif>(0).unwrap();
    let mut notifications = 0;
    for _ in 0..100 {
        for i in 0..16 {
            front.produce(req(i)).unwrap();
        }
        if front.push_requests() {
            notifications += 1;
        }
        while let Some(r) = back.next_request().unwrap() {
            back.produce(rsp(r)).unwrap();
        }
        let _ = back.push_responses();
        assert!(!back.final_check_for_requests().unwrap());
        while front.next_response().unwrap().is_some() {}
    }
    assert_eq!(
        notifications, 100,
        "one notification per batch of 16, none per entry"
    );
}

#[test]
fn hostile_frontend_req_prod() {
    let (mut front, mut back, pages) = pair_at(7, 0);
    for i in 0..4 {
        front.produce(req(i)).unwrap();
    }
    let _ = front.push_requests();
    for i in 0..4 {
        assert_eq!(back.next_request().unwrap().unwrap().id, i);
    }
    back.produce(rsp(req(0))).unwrap();
    // More than a ring ahead of the responses (rsp_prod_pvt is 8).
    pages.write_u32(REQ_PROD, 8 + 33);
    assert!(matches!(
        back.next_request(),
        Err(Error::RequestOverflow { .. })
    ));
    assert!(matches!(
        back.unconsumed_requests(),
        Err(Error::RequestOverflow { .. })
    ));
    assert!(matches!(
        back.final_check_for_requests(),
        Err(Error::RequestOverflow { .. })
    ));
    // Far in the future (wrapping).
    pages.write_u32(REQ_PROD, 7u32.wrapping_sub(1));
    assert!(matches!(
        back.next_request(),
        Err(Error::RequestOverflow { .. })
    ));
    // Backwards, behind what was consumed (req_cons is 11).
    pages.write_u32(REQ_PROD, 10);
    assert!(matches!(
        back.next_request(),
        Err(Error::RequestOverflow { .. })
    ));
    // Exactly a full ring ahead of the responses is legal; the backend never holds more than 32
    // unanswered requests.
    pages.write_u32(REQ_PROD, 8 + 32);
    let mut n = 0;
    while back.next_request().unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 29);
    assert_eq!(back.outstanding(), 32);
}

#[test]
fn hostile_backend_rsp_prod() {
    let (mut front, mut back, pages) = pair_at(u32::MAX - 1, 0);
    for i in 0..4 {
        front.produce(req(i)).unwrap();
    }
    // Produced but not published: the backend cannot have answered them.
    pages.write_u32(RSP_PROD, (u32::MAX - 1).wrapping_add(1));
    assert!(matches!(
        front.next_response(),
        Err(Error::ResponseOverflow { .. })
    ));
    let _ = front.push_requests();
    // More responses than requests published.
    pages.write_u32(RSP_PROD, (u32::MAX - 1).wrapping_add(5));
    assert!(matches!(
        front.next_response(),
        Err(Error::ResponseOverflow { .. })
    ));
    assert!(matches!(
        front.final_check_for_responses(),
        Err(Error::ResponseOverflow { .. })
    ));
    // Backwards.
    pages.write_u32(RSP_PROD, u32::MAX - 3);
    assert!(matches!(
        front.next_response(),
        Err(Error::ResponseOverflow { .. })
    ));
    // Honest again: two answers.
    pages.write_u32(RSP_PROD, u32::MAX - 1);
    while let Some(r) = back.next_request().unwrap() {
        back.produce(rsp(r)).unwrap();
    }
    let _ = back.push_responses();
    assert_eq!(front.next_response().unwrap().unwrap().id, 0);
}

#[test]
fn peer_rewriting_a_slot_after_publication_is_copied_once() {
    let (mut front, mut back, pages) = pair_at(0, 0);
    front.produce(req(1)).unwrap();
    let _ = front.push_requests();
    let copy = back.next_request().unwrap().unwrap();
    // The frontend rewrites the slot (a double-fetch attack): the copy does not change.
    let mut evil = req(1);
    evil.nr_segments = 200;
    pages.write_slot::<Blkif, _>(0, evil);
    assert_eq!(copy.nr_segments, 1);
    assert_eq!(pages.read_slot::<Blkif, BlkifRequest>(0).nr_segments, 200);
}

#[test]
fn init_zeroes_the_pages_and_arms_events() {
    let pages = SharedPages::new(1);
    pages.write_bytes(0, &[0xAA; 8192]);
    let _front = FrontRing::<Blkif, _>::init(pages.clone()).unwrap();
    assert_eq!(pages.read_u32(REQ_PROD), 0);
    assert_eq!(pages.read_u32(RSP_PROD), 0);
    assert_eq!(pages.read_u32(REQ_EVENT), 1);
    assert_eq!(pages.read_u32(RSP_EVENT), 1);
    let mut rest = vec![0u8; 8192 - 16];
    pages.read_bytes(16, &mut rest);
    assert!(
        rest.iter().all(|&b| b == 0),
        "pvt, padding and entries are zero"
    );
}

#[test]
fn attach_leaves_the_header_alone() {
    let pages = SharedPages::new(0);
    for (off, v) in [
        (REQ_PROD, 41),
        (REQ_EVENT, 42),
        (RSP_PROD, 40),
        (RSP_EVENT, 41),
    ] {
        pages.write_u32(off, v);
    }
    let mut back = BackRing::<Blkif, _>::attach(pages.clone(), 40).unwrap();
    assert_eq!(back.shared_rsp_prod(), 40);
    assert_eq!(pages.read_u32(REQ_EVENT), 42);
    assert_eq!(back.unconsumed_requests().unwrap(), 1);
}

#[test]
fn responses_write_every_byte() {
    // A response slot first filled with 0xFF by the frontend: after the backend writes a
    // response, its 16 bytes are exactly the response, padding included (XSA-216).
    let (mut front, mut back, pages) = pair_at(0, 0);
    let mut r = req(5);
    r.sector_number = u64::MAX;
    r.handle = 0xFFFF;
    front.produce(r).unwrap();
    let _ = front.push_requests();
    let got = back.next_request().unwrap().unwrap();
    pages.write_bytes(64, &[0xFF; 16]);
    back.produce(BlkifResponse::new(got.id, got.operation, RSP_ERROR))
        .unwrap();
    let mut bytes = [0u8; 16];
    pages.read_bytes(64, &mut bytes);
    let mut expect = [0u8; 16];
    expect[0..8].copy_from_slice(&5u64.to_ne_bytes());
    expect[8] = OP_READ;
    expect[10..12].copy_from_slice(&RSP_ERROR.to_ne_bytes());
    assert_eq!(bytes, expect);
}

#[test]
fn bad_memory_is_refused() {
    let pages = SharedPages::new(1);
    let base = xenpv_ring::RingMemory::as_ptr(&pages);
    // SAFETY: the ranges lie inside `pages`, which outlives the rings tried here.
    let odd = unsafe { RawRingMemory::new(base, 3 * 4096 / 2) };
    assert_eq!(
        FrontRing::<Blkif, _>::init(odd).err(),
        Some(Error::BadSize { len: 6144 })
    );
    // SAFETY: as above (4096 bytes from offset 8 stay inside the 8192-byte pages).
    let shifted = unsafe { RawRingMemory::new(base.byte_add(8), 4096) };
    assert!(matches!(
        BackRing::<Blkif, _>::new(shifted),
        Err(Error::Misaligned { .. })
    ));
}

#[test]
fn blkif_layout_conversions() {
    let d = BlkifRequestDiscard::new(DISCARD_SECURE, 3, 77, 1 << 40, 4096);
    let slot = d.to_request();
    assert_eq!(slot.operation, OP_DISCARD);
    assert_eq!(slot.as_discard(), d);
    let mut i = BlkifRequestIndirect::new(OP_WRITE, 600, 3, 78, 9);
    i.indirect_grefs = [1, 2, 3, 4, 5, 6, 7, 8];
    assert_eq!(i.to_request().as_indirect(), i);
    assert_eq!(BlkifRequestIndirect::pages_for(600), 2);
    assert_eq!(BlkifRequestIndirect::pages_for(4096), 8);
    // x86_32 round trips, for every layout.
    for native in [req(3), slot, i.to_request()] {
        assert_eq!(X86_32Request::from_native(&native).to_native(), native);
    }
    let r = BlkifResponse::new(9, OP_WRITE, RSP_EOPNOTSUPP);
    assert_eq!(BlkifResponse::from(X86_32Response::from(r)), r);
    assert_eq!(Operation::from_u8(OP_INDIRECT), Some(Operation::Indirect));
    assert_eq!(Operation::from_u8(7), None);
    for op in 0..=6 {
        assert_eq!(Operation::from_u8(op).unwrap().to_u8(), op);
    }
}

#[test]
fn netif_extra_and_flags() {
    let gso = NetifExtraInfo::gso(
        Gso {
            size: 1448,
            kind: GSO_TYPE_TCPV4,
            features: 0,
        },
        EXTRA_FLAG_MORE,
    );
    let slot = gso.to_tx_slot();
    assert_eq!(slot.as_extra(), gso);
    assert_eq!(slot.as_extra().as_gso().size, 1448);
    assert!(slot.as_extra().has_more());
    let hash = NetifExtraInfo::hash(
        Hash {
            kind: 1,
            algorithm: 1,
            value: [1, 2, 3, 4],
        },
        0,
    );
    assert_eq!(hash.to_rx_slot().as_extra().as_hash().value, [1, 2, 3, 4]);
    // TX and RX checksum bits are swapped.
    assert_eq!(TxFlags::CSUM_BLANK.0, RxFlags::DATA_VALIDATED.0);
    assert_eq!(TxFlags::DATA_VALIDATED.0, RxFlags::CSUM_BLANK.0);
    let f = TxFlags::MORE_DATA | TxFlags::EXTRA_INFO;
    assert!(f.contains(TxFlags::EXTRA_INFO) && !f.contains(TxFlags::CSUM_BLANK));
    assert_eq!(TxFlags(0x30).unknown_bits(), 0x30);
    assert_eq!(<NetifTx as RingProtocol>::ENTRY_SIZE, 12);
}

/// A restarted backend resumes at the shared `rsp_prod` with the `req_cons` its previous
/// instance saved: it answers the consumed requests first, then serves new ones; saved indexes
/// that do not fit the ring are refused. Also across the 2^32 wrap.
#[test]
fn a_restarted_backend_resumes_where_the_previous_one_stopped() {
    for start in [0u32, u32::MAX - 2] {
        let (mut front, mut back, pages) = pair_at(start, 0);
        for id in 0..6 {
            front.produce(req(id)).unwrap();
        }
        let _ = front.push_requests();
        // The old instance consumes 5, answers 2 and publishes them, writes a third response
        // without publishing it, and dies.
        let mut consumed = Vec::new();
        for _ in 0..5 {
            consumed.push(back.next_request().unwrap().unwrap());
        }
        for r in &consumed[..2] {
            back.produce(rsp(*r)).unwrap();
        }
        back.push_responses_no_check();
        back.produce(rsp(consumed[2])).unwrap();
        let saved = back.req_cons();
        drop(back);

        for bad in [
            saved.wrapping_add(2),  // beyond req_prod
            start.wrapping_add(1),  // behind rsp_prod
            saved.wrapping_add(40), // more than a ring
        ] {
            assert!(
                matches!(
                    BackRing::<Blkif, _>::resume(pages.clone(), bad),
                    Err(Error::RequestOverflow { .. })
                ),
                "req_cons {bad} accepted"
            );
        }
        let mut back = BackRing::<Blkif, _>::resume(pages.clone(), saved).unwrap();
        assert_eq!(back.rsp_prod_pvt(), start.wrapping_add(2));
        assert_eq!(back.req_cons(), saved);
        assert_eq!(back.outstanding(), 3);
        // The unanswered three (from the backend's own copies), then the sixth request.
        for r in &consumed[2..] {
            back.produce(rsp(*r)).unwrap();
        }
        assert_eq!(back.next_request().unwrap(), Some(req(5)));
        back.produce(rsp(req(5))).unwrap();
        let _ = back.push_responses();
        let mut ids = Vec::new();
        while let Some(r) = front.next_response().unwrap() {
            ids.push(r.id);
        }
        assert_eq!(ids, [0, 1, 2, 3, 4, 5]);
        // A frontend that moved req_prod more than a ring ahead is refused as well.
        pages.write_u32(REQ_PROD, start.wrapping_add(100));
        assert!(BackRing::<Blkif, _>::resume(pages.clone(), front.req_prod_pvt()).is_err());
    }
}
