//! The local provider against an in-process broker on a temporary socket: validation failures
//! per operation, deferred revoke, grant copy statuses, data both ways, multi-page rings,
//! hostile inputs, and one test across two processes.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use xenpv_grant::flags::*;
use xenpv_grant::local::{Broker, BrokerConfig, LocalGrants};
use xenpv_grant::*;
use xenpv_ring::blkif::{Blkif, BlkifRequest, BlkifResponse};
use xenpv_ring::{BackRing, FrontRing};

const FRONT: DomId = 1;
const BACK: DomId = 2;

struct Platform {
    broker: Broker,
    dir: PathBuf,
}

impl Platform {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "xenpv-grant-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let broker = Broker::new(BrokerConfig {
            grant_entries: 64,
            frames: 64,
        });
        let p = Self { broker, dir };
        for d in [0, FRONT, BACK, 3] {
            p.add(d);
        }
        p
    }

    fn add(&self, d: DomId) {
        self.broker.create_domain(d).unwrap();
        let path = LocalGrants::socket_path(&self.dir, d);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let l = UnixListener::bind(&path).unwrap();
        self.broker.spawn_listener(l, d);
    }

    fn client(&self, d: DomId) -> LocalGrants {
        LocalGrants::connect(LocalGrants::socket_path(&self.dir, d)).unwrap()
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn map_status(e: Error) -> (usize, GrantStatus) {
    match e {
        Error::Map { index, status, .. } => (index, status),
        e => panic!("expected a map error, got {e}"),
    }
}

#[test]
fn data_written_by_front_is_seen_by_back_and_back() {
    let p = Platform::new();
    let (front, back) = (p.client(FRONT), p.client(BACK));
    assert_eq!(front.domid(), FRONT);
    let s = front.share(BACK, 1, Access::Writable).unwrap();
    let gref = s.grefs()[0];
    assert!(gref >= FIRST_UNRESERVED_REF);
    assert_eq!(
        s.volatile().read_u32(0).unwrap(),
        0,
        "shared pages are zeroed"
    );
    s.volatile().write(10, b"from front").unwrap();

    let m = back.map_domain(FRONT, &[gref], Access::Writable).unwrap();
    let mut buf = [0u8; 10];
    m.volatile().read(10, &mut buf).unwrap();
    assert_eq!(&buf, b"from front");
    let fl = front.own_flags(gref).unwrap();
    assert_eq!(fl & (GTF_READING | GTF_WRITING), GTF_READING | GTF_WRITING);

    m.volatile().write(2000, b"from back").unwrap();
    let mut buf = [0u8; 9];
    s.volatile().read(2000, &mut buf).unwrap();
    assert_eq!(&buf, b"from back");

    drop(m);
    assert_eq!(
        front.own_flags(gref).unwrap() & (GTF_READING | GTF_WRITING),
        0
    );
    assert_eq!(front.revoke(s).unwrap(), Revoke::Revoked);
    assert_eq!(front.own_flags(gref).unwrap(), 0);
}

#[test]
fn wrong_domid_revoked_and_readonly_fail_per_operation() {
    let p = Platform::new();
    let (front, back, other) = (p.client(FRONT), p.client(BACK), p.client(3));
    let rw = front.share(BACK, 1, Access::Writable).unwrap();
    let ro = front.share(BACK, 1, Access::ReadOnly).unwrap();
    let gone = front.share(BACK, 1, Access::Writable).unwrap();
    let gone_ref = gone.grefs()[0];
    assert_eq!(gone.revoke().unwrap(), Revoke::Revoked);

    // Domain 3 is not the grantee.
    let e = other
        .map_domain(FRONT, rw.grefs(), Access::ReadOnly)
        .unwrap_err();
    assert_eq!(map_status(e), (0, GrantStatus::GeneralError));
    // Revoked grant, second in the list: the first is unmapped again.
    let e = back
        .map_domain(FRONT, &[rw.grefs()[0], gone_ref], Access::ReadOnly)
        .unwrap_err();
    assert_eq!(map_status(e), (1, GrantStatus::GeneralError));
    assert_eq!(front.own_flags(rw.grefs()[0]).unwrap() & GTF_READING, 0);
    // Writable map of a read-only grant; a read-only map of it works, and cannot be written.
    let e = back
        .map_domain(FRONT, ro.grefs(), Access::Writable)
        .unwrap_err();
    assert_eq!(map_status(e), (0, GrantStatus::GeneralError));
    assert!(e_msg(&back, &ro).contains("read-only"));
    let m = back
        .map_domain(FRONT, ro.grefs(), Access::ReadOnly)
        .unwrap();
    assert!(matches!(m.volatile().write(0, b"x"), Err(Error::ReadOnly)));
    // A domain that does not exist.
    let e = back
        .map_domain(77, rw.grefs(), Access::ReadOnly)
        .unwrap_err();
    assert_eq!(map_status(e), (0, GrantStatus::BadDomain));
}

fn e_msg(back: &LocalGrants, ro: &local::LocalShared) -> String {
    back.map_domain(FRONT, ro.grefs(), Access::Writable)
        .unwrap_err()
        .to_string()
}

#[test]
fn revoke_while_mapped_is_deferred_until_unmap() {
    let p = Platform::new();
    let (front, back) = (p.client(FRONT), p.client(BACK));
    let s = front.share(BACK, 2, Access::Writable).unwrap();
    let grefs = s.grefs().to_vec();
    s.volatile().write(0, b"keep").unwrap();
    let m = back
        .map_domain(FRONT, &grefs[..1], Access::ReadOnly)
        .unwrap();
    let m2 = back
        .map_domain(FRONT, &grefs[..1], Access::ReadOnly)
        .unwrap();

    assert_eq!(front.revoke(s).unwrap(), Revoke::Deferred { in_use: 1 });
    // Still granted, still allocated: not reused while mapped.
    assert_ne!(front.own_flags(grefs[0]).unwrap(), 0);
    assert!(p.broker.is_allocated(FRONT, grefs[0]));
    assert!(!p.broker.is_allocated(FRONT, grefs[1]));
    let again = front.share(BACK, 8, Access::Writable).unwrap();
    assert!(!again.grefs().contains(&grefs[0]));
    let mut b = [0u8; 4];
    m.volatile().read(0, &mut b).unwrap();
    assert_eq!(&b, b"keep", "the peer still sees the page, untouched");

    // Two mappings of one grant: the first unmap keeps it in use.
    drop(m);
    assert_eq!(p.broker.reap(), 1);
    drop(m2);
    assert_eq!(p.broker.reap(), 0);
    assert_eq!(front.own_flags(grefs[0]).unwrap(), 0);
    assert!(!p.broker.is_allocated(FRONT, grefs[0]));
    // The frame comes back zeroed.
    drop(again);
    let fresh = front.share(BACK, 16, Access::Writable).unwrap();
    for i in 0..16 {
        assert_eq!(fresh.volatile().read_u32(i * PAGE_SIZE).unwrap(), 0);
    }
}

#[test]
fn grant_copy_reports_per_operation() {
    let p = Platform::new();
    let (front, back) = (p.client(FRONT), p.client(BACK));
    let s = front.share(BACK, 1, Access::Writable).unwrap();
    let ro = front.share(BACK, 1, Access::ReadOnly).unwrap();
    let g = s.grefs()[0];
    s.volatile().write(100, b"copy me").unwrap();

    let mut into = [0u8; 7];
    let mut big = [0u8; 16];
    let mut ops = vec![
        CopyOp::from_foreign(FRONT, g, 100, &mut into),
        CopyOp::to_foreign(b"written", FRONT, g, 200),
        CopyOp::from_foreign(FRONT, g, 4090, &mut big),
        CopyOp::to_foreign(b"nope", FRONT, ro.grefs()[0], 0),
        CopyOp::to_foreign(b"nope", FRONT, 10_000, 0),
        CopyOp::to_foreign(b"nope", 99, g, 0),
        CopyOp::to_foreign(b"", 99, 10_000, 0),
    ];
    back.copy(&mut ops).unwrap();
    let st: Vec<GrantStatus> = ops.iter().map(|o| o.status).collect();
    assert_eq!(
        st,
        [
            GrantStatus::Okay,
            GrantStatus::Okay,
            GrantStatus::BadCopyArg,
            GrantStatus::GeneralError,
            GrantStatus::BadGntref,
            GrantStatus::BadDomain,
            GrantStatus::Okay,
        ]
    );
    drop(ops);
    assert_eq!(&into, b"copy me");
    let mut w = [0u8; 7];
    s.volatile().read(200, &mut w).unwrap();
    assert_eq!(&w, b"written");
    assert_eq!(front.own_flags(g).unwrap() & (GTF_READING | GTF_WRITING), 0);

    // The task's minimal case: one good and one bad op in a batch.
    let mut a = [0u8; 4];
    let mut b = [0u8; 4];
    let mut ops = [
        CopyOp::from_foreign(FRONT, g, 100, &mut a),
        CopyOp::from_foreign(BACK, g, 100, &mut b),
    ];
    back.copy(&mut ops).unwrap();
    assert_eq!(ops[0].status, GrantStatus::Okay);
    assert_ne!(ops[1].status, GrantStatus::Okay);
}

#[test]
fn two_page_ring_through_grants() {
    let p = Platform::new();
    let (front, back) = (p.client(FRONT), p.client(BACK));
    let s = front.share(BACK, 2, Access::Writable).unwrap();
    let mut fr = FrontRing::<Blkif, _>::init(&s).unwrap();
    assert_eq!(fr.size(), 64);

    let m = back.map_domain(FRONT, s.grefs(), Access::Writable).unwrap();
    assert_eq!(m.pages(), 2);
    let mut br = BackRing::<Blkif, _>::new(&m).unwrap();
    // Fill past the first page so that slots in the second page are used.
    for id in 0..40u64 {
        fr.produce(BlkifRequest::new(0, 7, id, id * 8)).unwrap();
    }
    let _notify = fr.push_requests();
    let mut n = 0;
    while let Some(req) = br.next_request().unwrap() {
        assert_eq!(req.id, n);
        br.produce(BlkifResponse::new(req.id, req.operation, 0))
            .unwrap();
        n += 1;
    }
    assert_eq!(n, 40);
    let _notify = br.push_responses();
    let mut got = 0;
    while let Some(rsp) = fr.next_response().unwrap() {
        assert_eq!(rsp.id, got);
        got += 1;
    }
    assert_eq!(got, 40);
    drop(m);
    assert_eq!(s.revoke().unwrap(), Revoke::Revoked);
}

#[test]
fn hostile_inputs_are_errors() {
    let p = Platform::new();
    let (front, back) = (p.client(FRONT), p.client(BACK));
    // Out of the table, reserved-but-empty, and u32::MAX refs.
    for r in [64, 1 << 20, u32::MAX, 0, 7] {
        assert!(back.map_domain(FRONT, &[r], Access::ReadOnly).is_err());
    }
    // Huge and zero counts.
    let many = vec![(FRONT, 8); MAX_PAGES_PER_CALL + 1];
    assert!(matches!(
        back.map(&many, Access::ReadOnly),
        Err(Error::BadCount { .. })
    ));
    assert!(matches!(
        back.map(&[], Access::ReadOnly),
        Err(Error::BadCount { .. })
    ));
    assert!(matches!(
        front.share(BACK, 0, Access::ReadOnly),
        Err(Error::BadCount { .. })
    ));
    assert!(matches!(
        front.share(BACK, usize::MAX, Access::ReadOnly),
        Err(Error::BadCount { .. })
    ));
    // More than the domain has.
    assert!(matches!(
        front.share(BACK, 100, Access::ReadOnly),
        Err(Error::NoSpace { .. })
    ));
    let mut big = vec![0u8; 70_000];
    let mut ops = [CopyOp::from_foreign(FRONT, 8, 0, &mut big)];
    back.copy(&mut ops).unwrap();
    assert_eq!(ops[0].status, GrantStatus::BadCopyArg);
    // A hostile granter: entries naming frames it does not have, or odd flag combinations.
    let s = front.share(BACK, 1, Access::Writable).unwrap();
    let g = s.grefs()[0];
    let v = s.volatile();
    assert!(v.read(PAGE_SIZE - 1, &mut [0u8; 2]).is_err());
    assert!(v.write(usize::MAX, b"x").is_err());
    assert!(v.subslice(1, usize::MAX).is_err());
    for (flags, frame, want) in [
        (GTF_PERMIT_ACCESS, 64, GrantStatus::BadPage),
        (GTF_PERMIT_ACCESS, u32::MAX, GrantStatus::BadPage),
        (GTF_TRANSITIVE, 0, GrantStatus::GeneralError),
        (GTF_ACCEPT_TRANSFER, 0, GrantStatus::GeneralError),
        (
            GTF_PERMIT_ACCESS | GTF_SUB_PAGE,
            0,
            GrantStatus::GeneralError,
        ),
    ] {
        let e = GrantEntryV1 {
            flags,
            domid: BACK,
            frame,
        };
        assert!(front.write_own_entry(g, e));
        let err = back.map_domain(FRONT, &[g], Access::ReadOnly).unwrap_err();
        assert_eq!(map_status(err), (0, want), "flags {flags:#x} frame {frame}");
        let mut b = [0u8; 1];
        let mut ops = [CopyOp::from_foreign(FRONT, g, 0, &mut b)];
        back.copy(&mut ops).unwrap();
        assert_eq!(ops[0].status, want);
        // A failed pin leaves no status bit behind.
        assert_eq!(front.own_flags(g).unwrap() & (GTF_READING | GTF_WRITING), 0);
    }
    assert!(!front.write_own_entry(1 << 30, GrantEntryV1::default()));
}

#[test]
fn destroyed_domain_keeps_mappings_refuses_new_ones() {
    let p = Platform::new();
    let (front, back) = (p.client(FRONT), p.client(BACK));
    let s = front.share(BACK, 1, Access::Writable).unwrap();
    s.volatile().write(0, b"alive").unwrap();
    let m = back.map_domain(FRONT, s.grefs(), Access::ReadOnly).unwrap();
    p.broker.destroy_domain(FRONT).unwrap();
    let mut b = [0u8; 5];
    m.volatile().read(0, &mut b).unwrap();
    assert_eq!(&b, b"alive");
    let e = back
        .map_domain(FRONT, s.grefs(), Access::ReadOnly)
        .unwrap_err();
    assert_eq!(map_status(e), (0, GrantStatus::BadDomain));
}

#[test]
fn mapping_cache_hits_evicts_and_stays_bounded() {
    let p = Platform::new();
    let (front, back) = (p.client(FRONT), p.client(BACK));
    let s = front.share(BACK, 10, Access::Writable).unwrap();
    for (i, _) in s.grefs().iter().enumerate() {
        s.volatile().write_u32(i * PAGE_SIZE, i as u32 + 1).unwrap();
    }
    let mut cache = MapCache::new(back, 4);
    for round in 0..3 {
        for (i, &g) in s.grefs().iter().enumerate() {
            let m = cache.get(FRONT, g, Access::ReadOnly).unwrap();
            assert_eq!(m.volatile().read_u32(0).unwrap(), i as u32 + 1);
            assert!(cache.len() <= 4, "round {round}: {} cached", cache.len());
        }
    }
    let st = cache.stats();
    assert!(st.evictions > 0);
    // Hits: the same grant twice in a row.
    let g = s.grefs()[0];
    cache.get(FRONT, g, Access::ReadOnly).unwrap();
    let before = cache.stats().hits;
    let held = cache.get(FRONT, g, Access::ReadOnly).unwrap();
    assert_eq!(cache.stats().hits, before + 1);
    // Upgrade to writable remaps.
    let w = cache.get(FRONT, g, Access::Writable).unwrap();
    assert!(w.volatile().write(8, b"w").is_ok());
    // Mappings in use are never evicted; when all are in use, misses are served uncached.
    let held: Vec<_> = s.grefs()[..4]
        .iter()
        .map(|&g| cache.get(FRONT, g, Access::ReadOnly).unwrap())
        .chain([held, w])
        .collect();
    let extra = cache.get(FRONT, s.grefs()[9], Access::ReadOnly).unwrap();
    assert!(cache.len() <= 4);
    assert_eq!(extra.volatile().read_u32(0).unwrap(), 10);
    drop(held);
    drop(extra);
    cache.clear();
    assert!(cache.is_empty());
    for &g in s.grefs() {
        assert_eq!(front.own_flags(g).unwrap() & (GTF_READING | GTF_WRITING), 0);
    }
}

/// The child half of `front_and_back_in_two_processes`; does nothing unless run as the child.
#[test]
fn child_role() {
    let Ok(sock) = std::env::var("XENPV_GRANT_CHILD_SOCKET") else {
        return;
    };
    let gref: GrantRef = std::env::var("XENPV_GRANT_CHILD_GREF")
        .unwrap()
        .parse()
        .unwrap();
    let back = LocalGrants::connect(sock).unwrap();
    let m = back.map_domain(FRONT, &[gref], Access::Writable).unwrap();
    let mut b = [0u8; 13];
    m.volatile().read(0, &mut b).unwrap();
    assert_eq!(&b, b"hello, child!");
    m.volatile().write(1000, b"hello, parent").unwrap();
}

#[test]
fn front_and_back_in_two_processes() {
    let p = Platform::new();
    let front = p.client(FRONT);
    let s = front.share(BACK, 1, Access::Writable).unwrap();
    s.volatile().write(0, b"hello, child!").unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["child_role", "--exact", "--nocapture", "--test-threads=1"])
        .env(
            "XENPV_GRANT_CHILD_SOCKET",
            LocalGrants::socket_path(&p.dir, BACK),
        )
        .env("XENPV_GRANT_CHILD_GREF", s.grefs()[0].to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "child failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut b = [0u8; 13];
    s.volatile().read(1000, &mut b).unwrap();
    assert_eq!(&b, b"hello, parent");
    assert_eq!(s.revoke().unwrap(), Revoke::Revoked);
}
