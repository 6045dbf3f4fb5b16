//! The local provider against an in-process broker on a temporary socket: validation failures
//! per operation, deferred revoke, grant copy statuses, data both ways, multi-page rings,
//! hostile inputs, pin accounting across connections and processes (the broker counts pins; a
//! mapper that dies lets go), and tests across two processes.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
        Self::with(BrokerConfig {
            grant_entries: 64,
            frames: 64,
            huge_pages: false,
        })
    }

    fn with(cfg: BrokerConfig) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "xenpv-grant-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let broker = Broker::new(cfg);
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

/// The physical frame number behind each of `pages` pages from `p`, from /proc/self/pagemap
/// (the pages must be present; only root reads frame numbers, others read zeros).
fn pfns(p: *const u8, pages: usize) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap").unwrap();
    (0..pages)
        .map(|i| {
            let mut e = [0u8; 8];
            let vpn = (p as u64 + (i * PAGE_SIZE) as u64) / PAGE_SIZE as u64;
            f.read_exact_at(&mut e, vpn * 8).unwrap();
            u64::from_le_bytes(e) & ((1 << 55) - 1)
        })
        .collect()
}

#[test]
fn huge_page_memory_is_contiguous_allocated_lowest_first_and_zeroed() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: a tmpfs for huge pages, and reading frame numbers, need root");
        return;
    }
    let p = Platform::with(BrokerConfig {
        grant_entries: 64,
        frames: 1024,
        huge_pages: true,
    });
    let (front, back) = (p.client(FRONT), p.client(BACK));
    let a = front.share(BACK, 8, Access::Writable).unwrap();
    let b = front.share(BACK, 8, Access::Writable).unwrap();
    for s in [&a, &b] {
        for i in 0..8 {
            s.volatile().write(i * PAGE_SIZE + 7, b"dirty").unwrap();
        }
    }
    // Freed in an order that a stack of free frames would hand back descending.
    assert_eq!(front.revoke(a).unwrap(), Revoke::Revoked);
    assert_eq!(front.revoke(b).unwrap(), Revoke::Revoked);
    let c = front.share(BACK, 32, Access::Writable).unwrap();
    let mut page = vec![0u8; PAGE_SIZE];
    for i in 0..32 {
        c.volatile().read(i * PAGE_SIZE, &mut page).unwrap();
        assert!(page.iter().all(|&x| x == 0), "page {i} comes back zeroed");
    }
    let front_pfns = pfns(c.volatile().as_ptr(), 32);
    assert!(front_pfns[0] != 0, "frame numbers readable");
    for (i, w) in front_pfns.windows(2).enumerate() {
        assert_eq!(
            w[1],
            w[0] + 1,
            "pages {i} and {} are physically adjacent: {front_pfns:?}",
            i + 1
        );
    }
    let m = back.map_domain(FRONT, c.grefs(), Access::ReadOnly).unwrap();
    let mut x = [0u8; 1];
    for i in 0..32 {
        m.volatile().read(i * PAGE_SIZE, &mut x).unwrap();
    }
    assert_eq!(
        pfns(m.volatile().as_ptr(), 32),
        front_pfns,
        "the backend maps the same memory"
    );
}

#[test]
fn huge_page_file_reopened_by_its_proc_path_is_in_huge_pages() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: a tmpfs for huge pages, and reading frame numbers, need root");
        return;
    }
    use std::os::fd::AsRawFd;
    const LEN: usize = 4 << 20;
    let fd = xenpv_grant::local::huge_page_file(LEN as u64).unwrap();
    // Another process (fio) opens it by this path: so does the test.
    let path = format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    assert_eq!(
        f.metadata().unwrap().len(),
        LEN as u64,
        "allocated to its length"
    );
    // SAFETY: a fresh shared mapping of a file we hold open, unmapped below; nothing else
    // refers to that address range.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let base = p.cast::<u8>();
    for i in 0..LEN / PAGE_SIZE {
        // SAFETY: within the LEN-byte mapping made above.
        unsafe { base.add(i * PAGE_SIZE).write_volatile(1) };
    }
    let pfns = pfns(base, LEN / PAGE_SIZE);
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(p, LEN) };
    assert!(pfns[0] != 0, "frame numbers readable");
    for half in pfns.chunks(512) {
        assert_eq!(half[0] % 512, 0, "a 2 MiB page starts on a 2 MiB boundary");
        for (i, w) in half.windows(2).enumerate() {
            assert_eq!(
                w[1],
                w[0] + 1,
                "4 KiB pages {i} and {} of a 2 MiB page",
                i + 1
            );
        }
    }
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

    // Re-created: the old mapping's unpin must not touch the new domain's table or counts.
    p.broker.create_domain(FRONT).unwrap();
    let front2 = p.client(FRONT);
    let s2 = front2.share(BACK, 1, Access::Writable).unwrap();
    assert_eq!(s2.grefs(), s.grefs(), "the same ref in the new table");
    let m2 = back
        .map_domain(FRONT, s2.grefs(), Access::ReadOnly)
        .unwrap();
    drop(m);
    assert_eq!(p.broker.pins(FRONT, s2.grefs()[0]), (1, 0));
    assert_eq!(
        front2.own_flags(s2.grefs()[0]).unwrap() & GTF_READING,
        GTF_READING
    );
    drop(m2);
    assert_eq!(front2.own_flags(s2.grefs()[0]).unwrap() & GTF_READING, 0);
    std::mem::forget(s);
}

/// `n` pages `front` shares with the backend writable, page `i` starting with the number `i + 1`.
fn numbered_pages(front: &LocalGrants, n: usize) -> <LocalGrants as GrantShare>::Shared {
    let s = front.share(BACK, n, Access::Writable).unwrap();
    for i in 0..n {
        s.volatile().write_u32(i * PAGE_SIZE, i as u32 + 1).unwrap();
    }
    s
}

#[test]
fn mapping_cache_hits_evicts_and_stays_bounded() {
    let p = Platform::new();
    let (front, back) = (p.client(FRONT), p.client(BACK));
    let s = numbered_pages(&front, 10);
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
    let asked = p.broker.requests();
    let held = cache.get(FRONT, g, Access::ReadOnly).unwrap();
    assert_eq!(cache.stats().hits, before + 1);
    assert_eq!(
        p.broker.requests(),
        asked,
        "a cache hit does not ask the broker"
    );
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

#[test]
fn mapping_cache_maps_a_request_through_it_or_leaves_it_whole_when_there_is_no_room() {
    let p = Platform::new();
    let (front, back) = (p.client(FRONT), p.client(BACK));
    let s = numbered_pages(&front, 12);
    let g = s.grefs();
    let mut cache = MapCache::new(back, 6);
    // Room for all: one mapping per page, cached.
    let a = cache
        .get_all(FRONT, g[..4].iter().copied(), Access::ReadOnly)
        .unwrap()
        .expect("room for 4 of 6");
    for (i, m) in a.iter().enumerate() {
        assert_eq!(m.volatile().read_u32(0).unwrap(), i as u32 + 1);
    }
    assert_eq!((cache.len(), cache.stats().misses), (4, 4));
    // 2 hits and 2 misses: room for the misses (2 free slots).
    let b = cache
        .get_all(FRONT, g[2..6].iter().copied(), Access::ReadOnly)
        .unwrap()
        .expect("2 misses, 2 free slots");
    assert_eq!(b[3].volatile().read_u32(0).unwrap(), 6);
    assert_eq!(cache.len(), 6);
    // All six in use: 3 misses have no room. Nothing is mapped, nothing evicted.
    let asked = p.broker.requests();
    assert!(cache
        .get_all(FRONT, g[6..9].iter().copied(), Access::ReadOnly)
        .unwrap()
        .is_none());
    assert_eq!(p.broker.requests(), asked, "nothing mapped");
    assert_eq!(cache.stats().uncached, 3);
    assert!(
        (0..6).all(|i| cache.contains(FRONT, g[i])),
        "nothing evicted"
    );
    // Once `a` is dropped, 2 of its slots are idle (2 and 3 are still held by `b`)...
    drop(a);
    assert!(cache
        .get_all(FRONT, g[6..9].iter().copied(), Access::ReadOnly)
        .unwrap()
        .is_none());
    // ...enough for two misses, which evict them.
    let c = cache
        .get_all(FRONT, g[6..8].iter().copied(), Access::ReadOnly)
        .unwrap()
        .expect("2 idle slots");
    assert_eq!(c[1].volatile().read_u32(0).unwrap(), 8);
    assert!(cache.len() <= 6);
    assert_eq!(cache.stats().evictions, 2);
    drop((b, c));
    cache.clear();
}

/// A request whose pages are all cached is served from the cache alone; one with a miss among
/// hits gets its mappings in the request's order, each grant looked up once.
#[test]
fn mapping_cache_serves_a_request_in_order_around_a_miss_and_all_hits_without_mapping() {
    let p = Platform::new();
    let (front, back) = (p.client(FRONT), p.client(BACK));
    let s = numbered_pages(&front, 4);
    let g = s.grefs();
    let mut cache = MapCache::new(back, 6);
    let first = cache
        .get_all(FRONT, [g[0], g[1]], Access::ReadOnly)
        .unwrap()
        .expect("room");
    // A hit, a miss, a hit.
    let asked = p.broker.requests();
    let mixed = cache
        .get_all(FRONT, [g[0], g[3], g[1]], Access::ReadOnly)
        .unwrap()
        .expect("room for one miss");
    let pages: Vec<u32> = mixed
        .iter()
        .map(|m| m.volatile().read_u32(0).unwrap())
        .collect();
    assert_eq!(pages, [1, 4, 2]);
    assert!(Arc::ptr_eq(&mixed[0], &first[0]) && Arc::ptr_eq(&mixed[2], &first[1]));
    assert_eq!((cache.stats().hits, cache.stats().misses), (2, 3));
    assert_eq!(p.broker.requests(), asked + 1, "one page mapped");
    // All hits: nothing mapped, the same mappings.
    let asked = p.broker.requests();
    let again = cache
        .get_all(FRONT, [g[0], g[3], g[1]], Access::ReadOnly)
        .unwrap()
        .expect("all cached");
    assert!(again.iter().zip(&mixed).all(|(a, b)| Arc::ptr_eq(a, b)));
    assert_eq!((cache.stats().hits, cache.stats().misses), (5, 3));
    assert_eq!(p.broker.requests(), asked, "nothing mapped");
    drop((first, mixed, again));
    cache.clear();
}

/// Caches sharing a budget keep no more mappings together than it allows: a cache that finds it
/// spent serves its misses uncached (or leaves a request whole), evicts among its own, and gets
/// room again when another cache gives mappings back.
#[test]
fn caches_sharing_a_budget_stay_within_it_together() {
    let p = Platform::new();
    let (front, back) = (p.client(FRONT), p.client(BACK));
    let s = numbered_pages(&front, 12);
    let g = s.grefs();
    let budget = MapBudget::new(6);
    let mut one = MapCache::with_budget(&back, 8, budget.clone());
    let mut two = MapCache::with_budget(&back, 8, budget.clone());
    // `one` takes 4 of the 6, each cache could hold 8.
    let a = one
        .get_all(FRONT, g[..4].iter().copied(), Access::ReadOnly)
        .unwrap()
        .expect("room for 4");
    assert_eq!((one.len(), budget.in_use()), (4, 4));
    // `two` finds 2 left: a request of 4 pages has no room and is left whole, untouched.
    let asked = p.broker.requests();
    assert!(two
        .get_all(FRONT, g[4..8].iter().copied(), Access::ReadOnly)
        .unwrap()
        .is_none());
    assert_eq!(p.broker.requests(), asked, "nothing mapped");
    // Single pages: 2 cached, then the budget is spent and the third is served uncached.
    let b: Vec<_> = g[4..7]
        .iter()
        .map(|&r| two.get(FRONT, r, Access::ReadOnly).unwrap())
        .collect();
    assert_eq!(b[2].volatile().read_u32(0).unwrap(), 7);
    assert_eq!((two.len(), budget.in_use()), (2, 6));
    assert_eq!(two.stats().uncached, 4 + 1);
    // With the budget spent, a cache still evicts among its own idle mappings.
    drop(b);
    let c = two.get(FRONT, g[8], Access::ReadOnly).unwrap();
    assert_eq!(c.volatile().read_u32(0).unwrap(), 9);
    assert_eq!((two.len(), budget.in_use()), (2, 6));
    assert!(two.contains(FRONT, g[8]));
    // `one` gives its mappings back (a disconnect): `two` has room again, up to its part (3 of
    // 6), and beyond it as long as one mapping per cache stays left; then it evicts its own.
    drop(a);
    one.forget_domain(FRONT);
    assert_eq!(budget.in_use(), 2);
    let d = two
        .get_all(FRONT, g[9..12].iter().copied(), Access::ReadOnly)
        .unwrap()
        .expect("room again");
    assert_eq!(d[2].volatile().read_u32(0).unwrap(), 12);
    assert_eq!((two.len(), budget.in_use()), (4, 4));
    // Dropping a cache gives back what it held.
    drop((c, d));
    drop(two);
    assert_eq!(budget.in_use(), 0);
    drop(one);
    assert_eq!(budget.in_use(), 0);
    assert_eq!(
        MapBudget::half_of_max_map_count().total(),
        xenpv_grant::max_map_count() / 2
    );
}

/// A spent budget is shared fairly: a cache holding more than its part gives idle mappings
/// back, one per lookup, until a newcomer that asks holds its part; when the newcomer goes, the
/// first grows again.
#[test]
fn a_cache_over_its_part_of_a_spent_budget_gives_way_to_one_below() {
    let p = Platform::new();
    let (front, back) = (p.client(FRONT), p.client(BACK));
    let s = numbered_pages(&front, 24);
    let g = s.grefs();
    let budget = MapBudget::new(8);
    let mut first = MapCache::with_budget(&back, 8, budget.clone());
    assert_eq!((budget.caches(), budget.share()), (1, 8));
    for &r in &g[..8] {
        first.get(FRONT, r, Access::ReadOnly).unwrap();
    }
    assert_eq!((first.len(), budget.in_use()), (8, 8));
    // A second cache: each is entitled to 4. The budget is spent, so its first miss goes
    // uncached, and nothing changes until `first` is used again.
    let mut second = MapCache::with_budget(&back, 8, budget.clone());
    assert_eq!((budget.caches(), budget.share()), (2, 4));
    let m = second.get(FRONT, g[8], Access::ReadOnly).unwrap();
    assert_eq!(m.volatile().read_u32(0).unwrap(), 9);
    assert_eq!((second.len(), second.stats().uncached), (0, 1));
    // Each lookup in `first` (hits, here) gives one mapping back while it is over its part;
    // `second` takes each.
    for (i, &r) in g[9..16].iter().enumerate() {
        first.get(FRONT, g[i % 4], Access::ReadOnly).unwrap();
        second.get(FRONT, r, Access::ReadOnly).unwrap();
        assert!(budget.in_use() <= 8);
    }
    assert_eq!((first.len(), second.len(), budget.in_use()), (4, 4, 8));
    // At its part, `first` gives nothing more, and `second` evicts among its own.
    first.get(FRONT, g[0], Access::ReadOnly).unwrap();
    second.get(FRONT, g[16], Access::ReadOnly).unwrap();
    assert_eq!((first.len(), second.len()), (4, 4));
    assert!(second.contains(FRONT, g[16]));
    assert!(first.contains(FRONT, g[0]));
    // `second` goes: `first` may hold the whole budget again.
    drop(second);
    assert_eq!((budget.caches(), budget.in_use()), (1, 4));
    for &r in &g[17..21] {
        first.get(FRONT, r, Access::ReadOnly).unwrap();
    }
    assert_eq!((first.len(), budget.in_use()), (8, 8));
}

/// A sweep unmaps what nobody used since the sweep before and nobody holds, and gives its share
/// of the budget back; what was used, or is held, stays.
#[test]
fn a_sweep_unmaps_mappings_unused_for_a_period() {
    let p = Platform::new();
    let (front, back) = (p.client(FRONT), p.client(BACK));
    let s = numbered_pages(&front, 4);
    let g = s.grefs();
    let budget = MapBudget::new(8);
    let mut cache = MapCache::with_budget(&back, 8, budget.clone());
    let mapped = |g: GrantRef| front.own_flags(g).unwrap() & (GTF_READING | GTF_WRITING) != 0;
    let held = cache.get(FRONT, g[0], Access::ReadOnly).unwrap();
    for &r in &g[1..4] {
        cache.get(FRONT, r, Access::ReadOnly).unwrap();
    }
    // Everything was used in this period: nothing goes.
    assert_eq!(cache.sweep(), 0);
    assert_eq!(budget.in_use(), 4);
    // Page 1 used again; page 0 unused but held: both stay. Pages 2 and 3 go.
    cache.get(FRONT, g[1], Access::ReadOnly).unwrap();
    assert_eq!(cache.sweep(), 2);
    assert_eq!((cache.len(), budget.in_use()), (2, 2));
    assert!(cache.contains(FRONT, g[0]) && cache.contains(FRONT, g[1]));
    assert!(!mapped(g[2]) && !mapped(g[3]), "unmapped");
    assert!(mapped(g[0]) && mapped(g[1]));
    assert_eq!(held.volatile().read_u32(0).unwrap(), 1);
    // Released and unused for a whole period: the rest go too.
    drop(held);
    assert_eq!(cache.sweep(), 2);
    assert!(cache.is_empty());
    assert_eq!(budget.in_use(), 0);
    assert!(g.iter().all(|&r| !mapped(r)));
    // A sweep of an empty cache does nothing.
    assert_eq!(cache.sweep(), 0);
}

#[test]
fn a_mapping_of_frames_in_any_order_shows_each_grant_at_its_place() {
    let p = Platform::new();
    let (front, back) = (p.client(FRONT), p.client(BACK));
    let s = front.share(BACK, 8, Access::Writable).unwrap();
    for i in 0..8 {
        s.volatile()
            .write_u32(i * PAGE_SIZE + 12, 0x100 + i as u32)
            .unwrap();
    }
    let other = p.client(3);
    let o = other.share(BACK, 2, Access::Writable).unwrap();
    o.volatile().write_u32(12, 0x300).unwrap();
    o.volatile().write_u32(PAGE_SIZE + 12, 0x301).unwrap();
    // Runs of consecutive frames (3,4,5 and 0,1), broken by order, by a lone frame and by
    // another domain's frames (which follow each other in that domain's memory).
    let order = [3usize, 4, 5, 0, 1, 7, 6, 2];
    let mut refs: Vec<_> = order.iter().map(|&i| (FRONT, s.grefs()[i])).collect();
    refs.insert(3, (3, o.grefs()[0]));
    refs.insert(4, (3, o.grefs()[1]));
    let m = back.map(&refs, Access::ReadOnly).unwrap();
    let want: Vec<u32> = order[..3]
        .iter()
        .map(|&i| 0x100 + i as u32)
        .chain([0x300, 0x301])
        .chain(order[3..].iter().map(|&i| 0x100 + i as u32))
        .collect();
    let got: Vec<u32> = (0..refs.len())
        .map(|k| m.volatile().read_u32(k * PAGE_SIZE + 12).unwrap())
        .collect();
    assert_eq!(got, want);
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

/// Polls `cond` until it holds or `secs` pass.
fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn two_connections_pin_one_grant_together() {
    let p = Platform::new();
    let front = p.client(FRONT);
    // Two processes' worth of backend connections of one domain.
    let (b1, b2) = (p.client(BACK), p.client(BACK));
    let s = front.share(BACK, 1, Access::Writable).unwrap();
    let g = s.grefs()[0];
    let m1 = b1.map_domain(FRONT, &[g], Access::Writable).unwrap();
    let m2 = b2.map_domain(FRONT, &[g], Access::ReadOnly).unwrap();
    assert_eq!(p.broker.pins(FRONT, g), (1, 1));
    let both = GTF_READING | GTF_WRITING;
    assert_eq!(front.own_flags(g).unwrap() & both, both);

    assert_eq!(front.revoke(s).unwrap(), Revoke::Deferred { in_use: 1 });
    // The writer goes: GTF_writing is cleared, GTF_reading stays, the revoke stays deferred.
    drop(m1);
    assert_eq!(p.broker.pins(FRONT, g), (1, 0));
    assert_eq!(front.own_flags(g).unwrap() & both, GTF_READING);
    assert_eq!(p.broker.reap(), 1);
    assert!(p.broker.is_allocated(FRONT, g));
    let mut b = [0u8; 1];
    m2.volatile().read(0, &mut b).unwrap();
    // The last one goes: the deferred revoke completes at once, without a reap.
    drop(m2);
    assert_eq!(p.broker.pins(FRONT, g), (0, 0));
    assert!(!p.broker.is_allocated(FRONT, g));
    assert_eq!(front.own_flags(g).unwrap(), 0);
    assert_eq!(p.broker.reap(), 0);

    // The other order, and one connection dropped entirely (its pins go with it).
    let s = front.share(BACK, 1, Access::Writable).unwrap();
    let g = s.grefs()[0];
    let m1 = b1.map_domain(FRONT, &[g], Access::ReadOnly).unwrap();
    let m2 = b2.map_domain(FRONT, &[g], Access::ReadOnly).unwrap();
    assert_eq!(p.broker.pins(FRONT, g), (2, 0));
    assert_eq!(front.revoke(s).unwrap(), Revoke::Deferred { in_use: 1 });
    drop(m2);
    drop(b2);
    assert_eq!(p.broker.reap(), 1);
    assert_eq!(front.own_flags(g).unwrap() & GTF_READING, GTF_READING);
    drop(m1);
    assert_eq!(p.broker.reap(), 0);
    assert_eq!(front.own_flags(g).unwrap(), 0);
}

fn header(op: i32, a: u32, b: u32, n: u32) -> Vec<u8> {
    [op as u32, a, b, n]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect()
}

fn read_words(s: &mut UnixStream, n: usize) -> Vec<u32> {
    let mut b = vec![0u8; 4 * n];
    s.read_exact(&mut b).unwrap();
    b.chunks_exact(4)
        .map(|c| u32::from_ne_bytes(c.try_into().unwrap()))
        .collect()
}

/// The documented wire format, spoken raw; a connection that closes holding pins lets go.
#[test]
fn raw_pin_wire_and_close_unpins() {
    let p = Platform::new();
    let front = p.client(FRONT);
    let s = front.share(BACK, 2, Access::Writable).unwrap();
    let (g0, g1) = (s.grefs()[0], s.grefs()[1]);
    let mut c = UnixStream::connect(LocalGrants::socket_path(&p.dir, BACK)).unwrap();
    let writable = 1u32 << 16;

    // Map mode, all or nothing: the second entry names a domain that does not exist.
    let mut req = header(6, 0, 0, 4);
    for w in [u32::from(FRONT) | writable, g0, 77 | writable, g1] {
        req.extend_from_slice(&w.to_ne_bytes());
    }
    c.write_all(&req).unwrap();
    let h = read_words(&mut c, 4);
    assert_eq!(
        (h[0] as i32, h[1], h[2], h[3]),
        (i32::from(GrantStatus::BadDomain.raw()), 1, 6, 0)
    );
    assert_eq!(p.broker.pins(FRONT, g0), (0, 0));
    assert_eq!(front.own_flags(g0).unwrap() & GTF_WRITING, 0);

    // Map mode, both good: offsets and generation.
    let mut req = header(6, 0, 0, 4);
    for w in [u32::from(FRONT) | writable, g0, u32::from(FRONT), g1] {
        req.extend_from_slice(&w.to_ne_bytes());
    }
    c.write_all(&req).unwrap();
    let h = read_words(&mut c, 4);
    assert_eq!((h[0], h[3]), (0, 6));
    let e = read_words(&mut c, 6);
    let table_bytes = 4096u64; // 64 entries round up to one page
    for (i, &frame_off) in [e[0], e[3]].iter().enumerate() {
        let off = u64::from(frame_off) | u64::from([e[1], e[4]][i]) << 32;
        assert!(off >= table_bytes && (off - table_bytes) % 4096 == 0);
    }
    assert_eq!(e[2], e[5], "one generation");
    assert_eq!(p.broker.pins(FRONT, g0), (0, 1));
    assert_eq!(p.broker.pins(FRONT, g1), (1, 0));

    // Copy mode: per-entry status.
    let mut req = header(6, 1, 0, 4);
    for w in [u32::from(FRONT), 10_000, u32::from(FRONT), g1] {
        req.extend_from_slice(&w.to_ne_bytes());
    }
    c.write_all(&req).unwrap();
    let h = read_words(&mut c, 4);
    assert_eq!((h[0], h[3]), (0, 8));
    let e = read_words(&mut c, 8);
    assert_eq!(e[0] as i32, i32::from(GrantStatus::BadGntref.raw()));
    assert_eq!(e[4], 0);
    assert_eq!(p.broker.pins(FRONT, g1), (2, 0));

    // UNPIN one of the two read pins of g1, and one pin this connection does not hold.
    let mut req = header(7, 0, 0, 6);
    for w in [u32::from(FRONT), g1, e[7], u32::from(FRONT), g0, e[7]] {
        req.extend_from_slice(&w.to_ne_bytes());
    }
    c.write_all(&req).unwrap();
    let h = read_words(&mut c, 4);
    assert_eq!((h[0], h[1], h[2]), (0, 1, 1));
    assert_eq!(p.broker.pins(FRONT, g1), (1, 0));

    // Nonsense is refused, not fatal.
    c.write_all(&header(6, 9, 0, 0)).unwrap();
    let h = read_words(&mut c, 4);
    assert_eq!((h[0] as i32, h[2]), (-1, 7));

    assert_eq!(front.revoke(s).unwrap(), Revoke::Deferred { in_use: 2 });
    drop(c);
    assert!(
        eventually(10, || p.broker.reap() == 0),
        "the revoke completes once the connection closed"
    );
    assert_eq!(p.broker.pins(FRONT, g0), (0, 0));
    assert_eq!(p.broker.pins(FRONT, g1), (0, 0));
    assert_eq!(front.own_flags(g0).unwrap(), 0);
    assert_eq!(front.own_flags(g1).unwrap(), 0);
    assert!(!p.broker.is_allocated(FRONT, g0));
}

const HOLDER_MAPPED: &str = "XENPV-HOLDER-MAPPED";

/// The child half of the holder tests; does nothing unless run as the child. Maps a grant,
/// says so on stdout, and holds it until its stdin closes (or it is killed).
#[test]
fn holder_role() {
    let Ok(sock) = std::env::var("XENPV_GRANT_HOLDER_SOCKET") else {
        return;
    };
    let gref: GrantRef = std::env::var("XENPV_GRANT_HOLDER_GREF")
        .unwrap()
        .parse()
        .unwrap();
    let access = match std::env::var("XENPV_GRANT_HOLDER_ACCESS").unwrap().as_str() {
        "rw" => Access::Writable,
        _ => Access::ReadOnly,
    };
    let back = LocalGrants::connect(sock).unwrap();
    let m = back.map_domain(FRONT, &[gref], access).unwrap();
    let mut b = [0u8; 4];
    m.volatile().read(0, &mut b).unwrap();
    assert_eq!(&b, b"held");
    println!("\n{HOLDER_MAPPED}");
    std::io::stdout().flush().unwrap();
    let mut sink = Vec::new();
    std::io::stdin().read_to_end(&mut sink).unwrap();
    drop(m);
}

/// Starts a child backend process of domain BACK that maps `gref` and holds it.
fn spawn_holder(p: &Platform, gref: GrantRef, access: &str) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["holder_role", "--exact", "--nocapture", "--test-threads=1"])
        .env(
            "XENPV_GRANT_HOLDER_SOCKET",
            LocalGrants::socket_path(&p.dir, BACK),
        )
        .env("XENPV_GRANT_HOLDER_GREF", gref.to_string())
        .env("XENPV_GRANT_HOLDER_ACCESS", access)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            let _ = child.wait();
            panic!("holder child ended before mapping: {seen}");
        }
        if line.contains(HOLDER_MAPPED) {
            break;
        }
        seen.push_str(&line);
    }
    // Keep draining its stdout so that it never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    child
}

#[test]
fn two_processes_pin_one_grant_together() {
    let p = Platform::new();
    let (front, back) = (p.client(FRONT), p.client(BACK));
    let s = front.share(BACK, 1, Access::Writable).unwrap();
    let g = s.grefs()[0];
    s.volatile().write(0, b"held").unwrap();
    let mine = back.map_domain(FRONT, &[g], Access::Writable).unwrap();
    let mut child = spawn_holder(&p, g, "ro");
    assert_eq!(p.broker.pins(FRONT, g), (1, 1));

    assert_eq!(front.revoke(s).unwrap(), Revoke::Deferred { in_use: 1 });
    // This process lets go first: the child still maps the page, so the grant stays in use.
    drop(mine);
    assert_eq!(p.broker.reap(), 1);
    assert_eq!(
        front.own_flags(g).unwrap() & (GTF_READING | GTF_WRITING),
        GTF_READING
    );
    assert!(p.broker.is_allocated(FRONT, g));
    // The child unmaps and exits cleanly: now the revoke completes.
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    assert!(eventually(10, || p.broker.reap() == 0));
    assert_eq!(front.own_flags(g).unwrap(), 0);
    assert!(!p.broker.is_allocated(FRONT, g));
}

#[test]
fn killed_mapper_lets_go_and_deferred_revoke_completes() {
    let p = Platform::new();
    let front = p.client(FRONT);
    let s = front.share(BACK, 1, Access::Writable).unwrap();
    let g = s.grefs()[0];
    s.volatile().write(0, b"held").unwrap();
    let mut child = spawn_holder(&p, g, "rw");
    assert_eq!(p.broker.pins(FRONT, g), (0, 1));
    let both = GTF_READING | GTF_WRITING;
    assert_eq!(front.own_flags(g).unwrap() & both, both);
    assert_eq!(front.revoke(s).unwrap(), Revoke::Deferred { in_use: 1 });
    assert_eq!(p.broker.reap(), 1);

    child.kill().unwrap(); // SIGKILL: no unmap, no unpin from the child
    child.wait().unwrap();
    assert!(
        eventually(10, || p.broker.reap() == 0),
        "the deferred revoke completes after the mapper died"
    );
    assert_eq!(p.broker.pins(FRONT, g), (0, 0));
    assert_eq!(front.own_flags(g).unwrap(), 0);
    assert!(!p.broker.is_allocated(FRONT, g));
    // The ref and frame are reusable, and the frame comes back zeroed.
    let again = front.share(BACK, 56, Access::Writable).unwrap();
    let i = again.grefs().iter().position(|&r| r == g).unwrap();
    assert_eq!(again.volatile().read_u32(i * PAGE_SIZE).unwrap(), 0);
}
