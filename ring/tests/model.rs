//! proptest: random produce / publish / consume / respond / final-check schedules on both ends
//! of a ring, at random starting indexes (many near 2^32), checked step by step against a
//! simple counting model of ring.h.

use proptest::prelude::*;
use xenpv_ring::blkif::{Blkif, BlkifRequest, BlkifResponse, OP_WRITE, RSP_OKAY};
use xenpv_ring::mock::{SharedPages, REQ_EVENT, REQ_PROD, RSP_EVENT, RSP_PROD};
use xenpv_ring::protocol::notify_needed;
use xenpv_ring::{BackRing, Error, FrontRing};

#[derive(Debug, Clone)]
enum Op {
    FrontProduce(u32),
    FrontPush,
    FrontConsume(u32),
    FrontFinalCheck,
    BackConsume(u32),
    BackRespond(u32),
    BackPush,
    BackFinalCheck,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..40u32).prop_map(Op::FrontProduce),
        Just(Op::FrontPush),
        (0..40u32).prop_map(Op::FrontConsume),
        Just(Op::FrontFinalCheck),
        (0..40u32).prop_map(Op::BackConsume),
        (0..40u32).prop_map(Op::BackRespond),
        Just(Op::BackPush),
        Just(Op::BackFinalCheck),
    ]
}

fn start() -> impl Strategy<Value = u32> {
    prop_oneof![
        any::<u32>(),
        (0..200u32).prop_map(|d| u32::MAX - d),
        Just(0u32)
    ]
}

/// Counts since `start`: the model of every index.
#[derive(Default)]
struct Model {
    produced: u32,
    published: u32,
    consumed: u32,
    responded: u32,
    rsp_published: u32,
    front_consumed: u32,
    req_event: u32,
    rsp_event: u32,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    #[test]
    fn ring_follows_the_model(start in start(), order in 0..3u32, ops in prop::collection::vec(op(), 1..200)) {
        let pages = SharedPages::new(order);
        drop(FrontRing::<Blkif, _>::init(pages.clone()).unwrap());
        pages.write_u32(REQ_PROD, start);
        pages.write_u32(RSP_PROD, start);
        pages.write_u32(REQ_EVENT, start.wrapping_add(1));
        pages.write_u32(RSP_EVENT, start.wrapping_add(1));
        let mut front = FrontRing::<Blkif, _>::attach(pages.clone(), start).unwrap();
        let mut back = BackRing::<Blkif, _>::attach(pages.clone(), start).unwrap();
        let size = front.size();
        let mut m = Model { req_event: 1, rsp_event: 1, ..Model::default() };
        let at = |n: u32| start.wrapping_add(n);

        for op in ops {
            match op {
                Op::FrontProduce(n) => {
                    for _ in 0..n {
                        let id = u64::from(m.produced);
                        let result = front.produce(BlkifRequest::new(OP_WRITE, 1, id, id));
                        if m.produced - m.front_consumed < size {
                            prop_assert_eq!(result, Ok(at(m.produced)));
                            m.produced += 1;
                        } else {
                            prop_assert_eq!(result, Err(Error::Full));
                        }
                    }
                }
                Op::FrontPush => {
                    let expect = m.published != m.produced
                        && notify_needed(at(m.published), at(m.produced), at(m.req_event));
                    prop_assert_eq!(front.push_requests(), expect);
                    m.published = m.produced;
                    prop_assert_eq!(pages.read_u32(REQ_PROD), at(m.published));
                }
                Op::BackConsume(n) => {
                    for _ in 0..n {
                        let got = back.next_request().unwrap();
                        if m.consumed < m.published {
                            prop_assert_eq!(got.map(|r| r.id), Some(u64::from(m.consumed)));
                            m.consumed += 1;
                        } else {
                            prop_assert_eq!(got, None);
                        }
                    }
                }
                Op::BackRespond(n) => {
                    for _ in 0..n {
                        let rsp = BlkifResponse::new(u64::from(m.responded), OP_WRITE, RSP_OKAY);
                        let result = back.produce(rsp);
                        if m.responded < m.consumed {
                            prop_assert_eq!(result, Ok(at(m.responded)));
                            m.responded += 1;
                        } else {
                            prop_assert_eq!(result, Err(Error::NoOutstandingRequest));
                        }
                    }
                }
                Op::BackPush => {
                    let expect = m.rsp_published != m.responded
                        && notify_needed(at(m.rsp_published), at(m.responded), at(m.rsp_event));
                    prop_assert_eq!(back.push_responses(), expect);
                    m.rsp_published = m.responded;
                }
                Op::FrontConsume(n) => {
                    for _ in 0..n {
                        let got = front.next_response().unwrap();
                        if m.front_consumed < m.rsp_published {
                            prop_assert_eq!(got.map(|r| r.id), Some(u64::from(m.front_consumed)));
                            m.front_consumed += 1;
                        } else {
                            prop_assert_eq!(got, None);
                        }
                    }
                }
                Op::BackFinalCheck => {
                    let pending = m.published > m.consumed;
                    prop_assert_eq!(back.final_check_for_requests(), Ok(pending));
                    if !pending {
                        m.req_event = m.consumed + 1;
                    }
                    prop_assert_eq!(pages.read_u32(REQ_EVENT), at(m.req_event));
                }
                Op::FrontFinalCheck => {
                    let pending = m.rsp_published > m.front_consumed;
                    prop_assert_eq!(front.final_check_for_responses(), Ok(pending));
                    if !pending {
                        m.rsp_event = m.front_consumed + 1;
                    }
                    prop_assert_eq!(pages.read_u32(RSP_EVENT), at(m.rsp_event));
                }
            }
            prop_assert_eq!(front.free_requests(), size - (m.produced - m.front_consumed));
            prop_assert_eq!(back.outstanding(), m.consumed - m.responded);
            prop_assert_eq!(back.unconsumed_requests(), Ok(m.published - m.consumed));
            prop_assert_eq!(front.unconsumed_responses(), Ok(m.rsp_published - m.front_consumed));
        }
    }
}
