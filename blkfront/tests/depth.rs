//! Large requests at depth with persistent grants: the frontend's persistent pool
//! (`Options::pool_pages`) bounds the bytes in flight. A 1 MiB read takes 257 pages (256 data
//! pages and an indirect page). By default the pool is what the backend says it keeps mapped
//! per queue (`xenpv-max-persistent-grants`), up to 2112 pages, which lets a workload at queue
//! depth 8 have all eight on the ring; from a backend that does not say, 960 pages, which let
//! three through at a time while the rest wait for a response.
//!
//! The test plays a backend that offers persistent grants and 256-segment indirect requests and
//! holds every request it takes, answering them all once it holds eight, or once no new request
//! has come for 500 ms (the frontend waits for pages). The load generator reads 1 MiB blocks at
//! queue depth 8; the most requests the backend held at once is what the frontend let through.
//!
//! The last tests give the frontend a grant driver that refuses grants past a limit, as
//! Linux's gntalloc does, and run it against our blkback.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use xenpv_blkfront::load::{run, Workload};
use xenpv_blkfront::{BlkFront, Options, Platform, PoolSize};
use xenpv_evtchn::local::LocalEvtchn;
use xenpv_evtchn::EventChannel;
use xenpv_grant::local::LocalGrants;
use xenpv_grant::{Access, DomId, GrantShare, Revoke, SharedPages};
use xenpv_ring::blkif::{Blkif, BlkifResponse, OP_INDIRECT, RSP_OKAY};
use xenpv_ring::BackRing;

const DEPTH: usize = 8;

#[test]
fn a_backend_that_does_not_say_what_it_caches_gets_three_one_mib_reads_at_a_time() {
    assert_eq!(PoolSize::UNSAID, 960);
    assert_eq!(most_in_flight(Options::default(), None), (3, 960));
}

#[test]
fn a_backend_that_caches_2112_mappings_gets_eight_one_mib_reads_at_a_time() {
    assert_eq!(Options::default().pool_pages, PoolSize::Auto(2112));
    assert_eq!(
        most_in_flight(Options::default(), Some("2112")),
        (DEPTH, 2112)
    );
}

#[test]
fn the_pool_stays_within_what_the_backend_caches_and_its_own_bound() {
    // 1024 pages hold three reads of 257 pages, not four.
    assert_eq!(most_in_flight(Options::default(), Some("1024")), (3, 1024));
    // A backend that claims more than the bound does not get more; nor does a bad number.
    assert_eq!(
        most_in_flight(Options::default(), Some("99999999999")),
        (DEPTH, 2112)
    );
    assert_eq!(most_in_flight(Options::default(), Some("lots")), (3, 960));
    let small = Options {
        pool_pages: PoolSize::Auto(600),
        ..Options::default()
    };
    assert_eq!(most_in_flight(small, Some("2112")), (2, 640));
}

#[test]
fn an_explicit_pool_of_4096_pages_lets_eight_one_mib_reads_through_whatever_the_backend_says() {
    let opts = Options {
        pool_pages: PoolSize::Pages(4096),
        ..Options::default()
    };
    assert_eq!(most_in_flight(opts, None), (DEPTH, 4096));
}

/// The most 1 MiB reads on the ring at once while the load generator reads at depth 8, against
/// a backend that says it caches `cache` mappings per queue (`None`: says nothing), and the
/// pool the frontend settled on.
fn most_in_flight(opts: Options, cache: Option<&'static str>) -> (usize, usize) {
    let env = env(1 << 20);
    let done = Arc::new(AtomicBool::new(false));
    let stop = done.clone();
    // A 64 MiB disk.
    let mut keys = vec![
        ("feature-persistent", "1"),
        ("feature-max-indirect-segments", "256"),
        ("sectors", "131072"),
    ];
    keys.extend(cache.map(|c| ("xenpv-max-persistent-grants", c)));
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
    let pool = dev.info().pool_pages;
    let w: Workload = format!("read 1048576 {DEPTH} 0 0.5").parse().unwrap();
    let r = run(&dev, &w).unwrap();
    done.store(true, Ordering::SeqCst);
    dev.close().unwrap();
    let (most, answered) = backend.join().unwrap();
    eprintln!("{r:?}; the backend held at most {most} requests, answered {answered}");
    assert_eq!(r.errors, 0, "{r:?}");
    assert!(answered >= r.all_ios, "{answered} answered, {r:?}");
    (most, pool)
}

/// Grants as Linux's gntalloc gives them: refused past a limit on the pages held at once
/// (`Error::GntallocLimit`, its ENOSPC). Counts the refusals.
struct Limited {
    inner: LocalGrants,
    limit: usize,
    held: AtomicUsize,
    refused: AtomicUsize,
}

impl GrantShare for Limited {
    type Shared = <LocalGrants as GrantShare>::Shared;

    fn share(
        &self,
        domid: DomId,
        count: usize,
        access: Access,
    ) -> xenpv_grant::Result<Self::Shared> {
        if self.held.load(Ordering::SeqCst) + count > self.limit {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(xenpv_grant::Error::GntallocLimit { count });
        }
        let s = self.inner.share(domid, count, access)?;
        self.held.fetch_add(count, Ordering::SeqCst);
        Ok(s)
    }

    fn revoke(&self, shared: Self::Shared) -> xenpv_grant::Result<Revoke> {
        self.held.fetch_sub(shared.grefs().len(), Ordering::SeqCst);
        self.inner.revoke(shared)
    }
}

/// Our blkback serving the disk of `env`, and a frontend whose grant driver holds at most
/// `limit` pages (its one-page ring included).
fn limited(env: &Env, limit: usize) -> (Arc<BlkFront<Limited, LocalEvtchn>>, Arc<Limited>) {
    let p = front_platform(&env.root);
    let grants = Arc::new(Limited {
        inner: LocalGrants::connect(env.root.join("dom1/grant.sock")).unwrap(),
        limit,
        held: AtomicUsize::new(0),
        refused: AtomicUsize::new(0),
    });
    let platform = Platform {
        xs: p.xs,
        grants: grants.clone(),
        open_evtchn: p.open_evtchn,
    };
    let dev = BlkFront::connect(platform, &env.fe, Options::default()).unwrap();
    let info = dev.info();
    assert!(info.persistent);
    // Our blkback says it keeps 2112 mappings per queue, and the pool may grow to that.
    assert_eq!(info.backend_cache, Some(2112), "{info:?}");
    assert_eq!(info.pool_pages, 2112, "{info:?}");
    (Arc::new(dev), grants)
}

/// The grant driver lets the pool grow to 320 pages of the 2112 it may take: one 1 MiB read at a
/// time. Reads at depth 8 still all succeed, each waiting for the pages of the one in flight,
/// and the pool asks the driver again at most once a second, not at every response.
#[test]
fn a_pool_the_grant_driver_holds_back_serves_at_depth_without_asking_at_every_response() {
    const SIZE: usize = 8 << 20;
    let env = env(SIZE);
    let _b = start_backend(&env, Default::default());
    let (dev, grants) = limited(&env, 1 + 5 * 64);
    let start = Instant::now();
    let w: Workload = format!("read 1048576 {DEPTH} 0 0.5").parse().unwrap();
    let r = run(&dev, &w).unwrap();
    eprintln!("{r:?}");
    assert_eq!(r.errors, 0, "{r:?}");
    assert!(r.all_ios >= 20, "{r:?}");
    let mut buf = vec![0; 3 << 20];
    dev.read_at(&mut buf, 1 << 20).unwrap();
    assert!(buf == read_image(&env.img, 1 << 20, 3 << 20), "3 MiB read");
    let secs = start.elapsed().as_secs() as usize;
    let refused = grants.refused.load(Ordering::SeqCst);
    assert!(
        (1..=secs + 1).contains(&refused),
        "{refused} refusals in {secs} s for {} reads",
        r.all_ios
    );
    dev.close().unwrap();
}

/// A pool the driver holds below one request's pages (256 < 257 for a 1 MiB read) fails that
/// request with the driver's error, which says how to raise its limit; smaller ones still work.
#[test]
fn a_request_larger_than_the_grant_drivers_limit_fails_with_the_fix() {
    let env = env(4 << 20);
    let _b = start_backend(&env, Default::default());
    let (dev, _) = limited(&env, 1 + 4 * 64);
    let mut buf = vec![0; 1 << 20];
    let e = dev.read_at(&mut buf, 0).unwrap_err().to_string();
    assert!(e.contains("xen_gntalloc/parameters/limit"), "{e}");
    let mut small = vec![0; 64 << 10];
    dev.read_at(&mut small, 4096).unwrap();
    assert!(small == read_image(&env.img, 4096, 64 << 10));
    dev.close().unwrap();
}
