//! The local platform's grants and event channels against the kernel primitives they are built
//! on, each ratio taken against a baseline measured in the same run.
//!
//! `cargo bench -p xenpv-benches --bench platform` runs criterion groups, then its own
//! interleaved rounds (baseline, ours, baseline, ours, …) and prints a table of medians:
//!
//! * **grants** (in-process broker, a frontend domain 1 sharing pages with a backend domain 2):
//!   a [`MapCache`] hit (R5: ≤ 30 ns) against a fresh local map + touch + unmap of one page; that
//!   fresh map against `mmap` + touch + `munmap` of one memfd page; a grant copy of 4 KiB (one
//!   operation per call, and 32 per call) against a hot 4 KiB `memcpy`.
//! * **event channels**: a notify → wake round trip (A notifies B and waits, B waits and notifies
//!   A back), for two threads and for two processes (this binary re-run with
//!   `XENPV_PLATFORM_CHILD` set plays B), with both parties pinned to one CPU and to two CPUs,
//!   blocking and spin-then-block ([`SpinBudget::default`]); the baseline is a raw eventfd
//!   ping-pong (two eventfds) with the same wait mode. Medians and p99 in µs, and ours/eventfd.
//!
//! `XENPV_BENCH_QUICK=1` shrinks every duration and count (about 20 s instead of 2–3 min). Under
//! `cargo test` (no `--bench` argument) criterion runs each routine once and the table is skipped.

use std::hint::black_box;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::Criterion;
use xenpv_evtchn::local::{socket_path, Broker as EvtBroker, LocalEvtchn};
use xenpv_evtchn::{spin_then_wait, EventChannel, Port, SpinBudget};
use xenpv_grant::local::{Broker as GrantBroker, BrokerConfig, LocalGrants, LocalShared};
use xenpv_grant::{
    Access, CopyOp, GrantMap, GrantMemory, GrantRef, GrantShare, MapCache, SharedPages, PAGE_SIZE,
};

// ------------------------------------------------------------------------------------------
// Settings

/// How long and how much to measure.
struct Settings {
    warm_up: Duration,
    measurement: Duration,
    sample_size: usize,
    /// Interleaved rounds of the table.
    rounds: usize,
    /// Operations per table round: cache hits and memcpys (cheap), maps (µs), copies.
    cheap_n: u64,
    map_n: u64,
    copy_n: u64,
    /// Round trips per table round of the event-channel ping-pong.
    rt_n: usize,
}

impl Settings {
    fn from_env() -> Self {
        let quick = std::env::var("XENPV_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        if quick {
            Self {
                warm_up: Duration::from_millis(50),
                measurement: Duration::from_millis(150),
                sample_size: 10,
                rounds: 5,
                cheap_n: 100_000,
                map_n: 500,
                copy_n: 2_000,
                rt_n: 300,
            }
        } else {
            Self {
                warm_up: Duration::from_millis(300),
                measurement: Duration::from_millis(1500),
                sample_size: 10,
                rounds: 9,
                cheap_n: 1_000_000,
                map_n: 3_000,
                copy_n: 20_000,
                rt_n: 2_000,
            }
        }
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.is_empty() {
        f64::NAN
    } else if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

// ------------------------------------------------------------------------------------------
// Grants

const FRONT: u16 = 1;
const BACK: u16 = 2;
/// Pages shared by the frontend (and the cache's capacity).
const PAGES: usize = 64;
/// Operations per batched grant copy.
const BATCH: usize = 32;

fn grant_client(broker: &GrantBroker, domid: u16) -> LocalGrants {
    let (a, s) = UnixStream::pair().expect("socketpair");
    let b = broker.clone();
    thread::spawn(move || b.serve(s, domid));
    LocalGrants::from_stream(a).expect("grant HELLO")
}

/// A frontend sharing [`PAGES`] writable pages with a backend that maps them through a warm
/// [`MapCache`] of the same capacity, plus a one-page memfd for the `mmap` baseline.
struct Grants {
    _broker: GrantBroker,
    _front: LocalGrants,
    back: LocalGrants,
    shared: LocalShared,
    cache: MapCache<LocalGrants>,
    memfd: OwnedFd,
    /// Page-aligned private memory: page 0 is the `memcpy` source, page 2 the destination of
    /// the `memcpy` and of the one-operation copy, pages 4.. the destinations of a batch. (Two
    /// 4 KiB `Vec`s from the allocator sit 4096 + 16 bytes apart here, where 4K aliasing makes
    /// a hot `memcpy` 2.5× slower: not the baseline we want.)
    pages: PageBuf,
}

/// `n` page-aligned pages of private memory.
struct PageBuf {
    buf: Vec<u8>,
    start: usize,
}

impl PageBuf {
    fn new(n: usize) -> Self {
        let buf = vec![0u8; (n + 1) * PAGE_SIZE];
        let start = buf.as_ptr().align_offset(PAGE_SIZE);
        Self { buf, start }
    }

    fn all(&mut self) -> &mut [u8] {
        let s = self.start;
        &mut self.buf[s..]
    }
}

const SRC_PAGE: usize = 0;
const DST_PAGE: usize = 2;
const BATCH_PAGE: usize = 4;

impl Grants {
    fn new() -> Self {
        let broker = GrantBroker::new(BrokerConfig::default());
        broker.create_domain(FRONT).expect("dom1");
        broker.create_domain(BACK).expect("dom2");
        let front = grant_client(&broker, FRONT);
        let back = grant_client(&broker, BACK);
        let shared = front.share(BACK, PAGES, Access::Writable).expect("share");
        for (i, _) in shared.grefs().iter().enumerate() {
            shared
                .volatile()
                .fill(i * PAGE_SIZE, PAGE_SIZE, i as u8)
                .expect("fill");
        }
        let mut cache = MapCache::new(back.clone(), PAGES);
        for &g in shared.grefs() {
            cache.get(FRONT, g, Access::Writable).expect("map");
        }
        // SAFETY: plain syscall with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"xenpv-bench".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on a descriptor we own.
        let r = unsafe { libc::ftruncate(memfd.as_raw_fd(), PAGE_SIZE as libc::off_t) };
        assert_eq!(r, 0, "ftruncate: {}", std::io::Error::last_os_error());
        Self {
            _broker: broker,
            _front: front,
            back,
            shared,
            cache,
            memfd,
            pages: {
                let mut p = PageBuf::new(BATCH_PAGE + BATCH);
                p.all().fill(0x5a);
                p
            },
        }
    }

    fn gref(&self, i: u64) -> GrantRef {
        self.shared.grefs()[(i % PAGES as u64) as usize]
    }

    /// `n` cache hits (lookup, `Arc` clone and drop).
    fn cache_hits(&mut self, n: u64) -> Duration {
        let grefs: Vec<GrantRef> = self.shared.grefs().to_vec();
        let t = Instant::now();
        for i in 0..n {
            let g = grefs[(i % PAGES as u64) as usize];
            let m = self.cache.get(FRONT, g, Access::Writable).expect("hit");
            black_box(&m);
        }
        t.elapsed()
    }

    /// `n` fresh maps of one grant, each touched (one byte written) and unmapped.
    fn fresh_maps(&self, n: u64) -> Duration {
        let t = Instant::now();
        for i in 0..n {
            let m = self
                .back
                .map_domain(FRONT, &[self.gref(i)], Access::Writable)
                .expect("map");
            m.volatile()
                .write(i as usize % PAGE_SIZE, &[1])
                .expect("touch");
            drop(black_box(m));
        }
        t.elapsed()
    }

    /// `n` times `mmap` of the memfd page, one byte written, `munmap`.
    fn mmap_baseline(&self, n: u64) -> Duration {
        let fd = self.memfd.as_raw_fd();
        let t = Instant::now();
        for i in 0..n {
            // SAFETY: a fresh shared mapping of one page of our memfd, written in bounds, then
            // unmapped; nothing else refers to it.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    PAGE_SIZE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED, "mmap");
                std::ptr::write_volatile((p as *mut u8).add(i as usize % PAGE_SIZE), 1);
                libc::munmap(p, PAGE_SIZE);
            }
        }
        t.elapsed()
    }

    /// `n` grant copies of one whole page into a local buffer, one operation per call.
    fn copy_one(&mut self, n: u64) -> Duration {
        let grefs: Vec<GrantRef> = self.shared.grefs().to_vec();
        let dst = &mut self.pages.all()[DST_PAGE * PAGE_SIZE..][..PAGE_SIZE];
        let t = Instant::now();
        for i in 0..n {
            let g = grefs[(i % PAGES as u64) as usize];
            let mut ops = [CopyOp::from_foreign(FRONT, g, 0, dst)];
            self.back.copy(&mut ops).expect("copy");
            debug_assert!(ops[0].status.is_ok());
        }
        black_box(dst);
        t.elapsed()
    }

    /// `n` grant copies of one whole page each, [`BATCH`] operations per call (`n` rounded up to
    /// whole batches; returns the time and the number of operations done).
    fn copy_batched(&mut self, n: u64) -> (Duration, u64) {
        let grefs: Vec<GrantRef> = self.shared.grefs().to_vec();
        let batches = n.div_ceil(BATCH as u64).max(1);
        let bufs = &mut self.pages.all()[BATCH_PAGE * PAGE_SIZE..][..BATCH * PAGE_SIZE];
        let t = Instant::now();
        for b in 0..batches {
            let mut ops: Vec<CopyOp<'_>> = bufs
                .chunks_exact_mut(PAGE_SIZE)
                .enumerate()
                .map(|(j, buf)| {
                    let g = grefs[(b as usize * BATCH + j) % PAGES];
                    CopyOp::from_foreign(FRONT, g, 0, buf)
                })
                .collect();
            self.back.copy(&mut ops).expect("copy");
            debug_assert!(ops.iter().all(|o| o.status.is_ok()));
        }
        black_box(bufs);
        (t.elapsed(), batches * BATCH as u64)
    }

    /// `n` hot `memcpy`s of 4 KiB between two page-aligned private buffers.
    fn memcpy(&mut self, n: u64) -> Duration {
        let (src, dst) = self.pages.all().split_at_mut(DST_PAGE * PAGE_SIZE);
        let src = &mut src[SRC_PAGE * PAGE_SIZE..][..PAGE_SIZE];
        let dst = &mut dst[..PAGE_SIZE];
        let t = Instant::now();
        for i in 0..n {
            src[0] = i as u8;
            black_box(&mut *dst).copy_from_slice(black_box(&*src));
        }
        black_box(dst);
        t.elapsed()
    }
}

/// The grant measurements, each returning nanoseconds per operation for `n` operations.
#[derive(Clone, Copy, PartialEq, Eq)]
enum GrantOp {
    CacheHit,
    FreshMap,
    Mmap,
    CopyOne,
    CopyBatch,
    Memcpy,
}

impl GrantOp {
    const ALL: [GrantOp; 6] = [
        GrantOp::CacheHit,
        GrantOp::FreshMap,
        GrantOp::Mmap,
        GrantOp::CopyOne,
        GrantOp::CopyBatch,
        GrantOp::Memcpy,
    ];

    fn name(self) -> &'static str {
        match self {
            GrantOp::CacheHit => "mapcache-hit",
            GrantOp::FreshMap => "local-map-touch-unmap",
            GrantOp::Mmap => "memfd-mmap-touch-munmap",
            GrantOp::CopyOne => "grant-copy-4k-x1",
            GrantOp::CopyBatch => "grant-copy-4k-x32",
            GrantOp::Memcpy => "memcpy-4k-hot",
        }
    }

    /// Runs about `n` operations; returns the elapsed time and the operations done.
    fn run(self, g: &mut Grants, n: u64) -> (Duration, u64) {
        match self {
            GrantOp::CacheHit => (g.cache_hits(n), n),
            GrantOp::FreshMap => (g.fresh_maps(n), n),
            GrantOp::Mmap => (g.mmap_baseline(n), n),
            GrantOp::CopyOne => (g.copy_one(n), n),
            GrantOp::CopyBatch => g.copy_batched(n),
            GrantOp::Memcpy => (g.memcpy(n), n),
        }
    }

    fn table_n(self, s: &Settings) -> u64 {
        match self {
            GrantOp::CacheHit | GrantOp::Memcpy => s.cheap_n,
            GrantOp::FreshMap | GrantOp::Mmap => s.map_n,
            GrantOp::CopyOne | GrantOp::CopyBatch => s.copy_n,
        }
    }
}

// ------------------------------------------------------------------------------------------
// Event channels

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Impl {
    Eventfd,
    Evtchn,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Wait {
    Block,
    Spin,
}

impl Wait {
    fn name(self) -> &'static str {
        match self {
            Wait::Block => "block",
            Wait::Spin => "spin50us",
        }
    }
    fn budget(self) -> SpinBudget {
        match self {
            Wait::Block => SpinBudget::None,
            Wait::Spin => SpinBudget::default(),
        }
    }
    /// The spin duration of the eventfd baseline: the same as [`SpinBudget::default`].
    fn spin_for(self) -> Option<Duration> {
        match self.budget() {
            SpinBudget::Duration(d) => Some(d),
            SpinBudget::Iterations(_) | SpinBudget::None => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Parties {
    Threads,
    Processes,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cores {
    Same,
    Different,
}

#[derive(Clone, Copy, Debug)]
struct PingCase {
    parties: Parties,
    cores: Cores,
    wait: Wait,
}

impl PingCase {
    fn all() -> Vec<PingCase> {
        let mut v = Vec::new();
        for parties in [Parties::Threads, Parties::Processes] {
            for cores in [Cores::Same, Cores::Different] {
                for wait in [Wait::Block, Wait::Spin] {
                    v.push(PingCase {
                        parties,
                        cores,
                        wait,
                    });
                }
            }
        }
        v
    }

    fn label(&self) -> String {
        format!(
            "{} {} {}",
            match self.parties {
                Parties::Threads => "threads",
                Parties::Processes => "procs",
            },
            match self.cores {
                Cores::Same => "1cpu",
                Cores::Different => "2cpu",
            },
            self.wait.name()
        )
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills a zeroed cpu_set_t of the size given.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) {
    // SAFETY: sched_setaffinity(0) applies to the calling thread; the set is initialised.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(
        r,
        0,
        "sched_setaffinity({cpu}): {}",
        std::io::Error::last_os_error()
    );
}

/// CPUs of party A and party B.
fn cpus_for(cores: Cores) -> Option<(usize, usize)> {
    let cpus = allowed_cpus();
    match cores {
        Cores::Same => Some((cpus[0], cpus[0])),
        Cores::Different => (cpus.len() >= 2).then(|| (cpus[0], cpus[1])),
    }
}

// ---- raw eventfd ----

fn eventfd(wait: Wait) -> OwnedFd {
    // Not close-on-exec: the child process of the two-process runs inherits it.
    let flags = match wait {
        Wait::Block => 0,
        Wait::Spin => libc::EFD_NONBLOCK,
    };
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::eventfd(0, flags) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn efd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a local u64 to an eventfd.
    let r = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    assert_eq!(r, 8, "eventfd write: {}", std::io::Error::last_os_error());
}

/// One read of the eventfd; `false` if it would block (non-blocking mode).
fn efd_read(fd: RawFd) -> bool {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a local u64.
    let r = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    if r == 8 {
        return true;
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => false,
        _ => panic!("eventfd read: {e}"),
    }
}

/// Waits for one event on `fd` in mode `wait`: a blocking read, or non-blocking reads for the
/// spin budget, then `poll` and a read.
fn efd_wait(fd: RawFd, wait: Wait) {
    match wait.spin_for() {
        None => while !efd_read(fd) {},
        Some(budget) => {
            let start = Instant::now();
            loop {
                if efd_read(fd) {
                    return;
                }
                if start.elapsed() >= budget {
                    break;
                }
                std::hint::spin_loop();
            }
            loop {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: polls one valid pollfd.
                unsafe { libc::poll(&mut p, 1, -1) };
                if efd_read(fd) {
                    return;
                }
            }
        }
    }
}

// ---- our event channels ----

/// Waits for `port` with `spin_then_wait`, then unmasks it (the drivers' discipline).
fn evt_recv(ch: &LocalEvtchn, port: Port, budget: SpinBudget, scratch: &mut Vec<Port>) {
    loop {
        scratch.clear();
        spin_then_wait(ch, scratch, budget, None).expect("spin_then_wait");
        if scratch.contains(&port) {
            break;
        }
    }
    ch.unmask(port).expect("unmask");
}

/// An event-channel broker for domains 0 (B) and 1 (A) on sockets in a temporary directory.
struct EvtPlatform {
    root: PathBuf,
    _broker: Arc<EvtBroker>,
}

impl EvtPlatform {
    fn new() -> Self {
        let root =
            std::env::temp_dir().join(format!("xenpv-bench-platform-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let broker = Arc::new(EvtBroker::default());
        for d in [0u16, 1] {
            broker.create_domain(d).expect("create_domain");
            let path = socket_path(&root, d);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("state dir");
            let listener = UnixListener::bind(&path).expect("bind evtchn.sock");
            let b = broker.clone();
            thread::spawn(move || {
                for s in listener.incoming().flatten() {
                    let b = b.clone();
                    thread::spawn(move || {
                        let _ = b.serve(s, d);
                    });
                }
            });
        }
        Self {
            root,
            _broker: broker,
        }
    }

    fn sock(&self, d: u16) -> PathBuf {
        socket_path(&self.root, d)
    }
}

impl Drop for EvtPlatform {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Round trips timed by party A before the measured ones.
const WARM: usize = 50;

/// Party A: `n` measured round trips (after [`WARM`] unmeasured ones); returns each in µs.
fn party_a(n: usize, mut round_trip: impl FnMut()) -> Vec<f64> {
    for _ in 0..WARM {
        round_trip();
    }
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        round_trip();
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat
}

/// Environment of the child (party B) of a two-process run.
const CHILD: &str = "XENPV_PLATFORM_CHILD";

/// Runs one ping-pong of `n` measured round trips; returns the round-trip times in µs
/// (`None` when the case needs two CPUs and there is one).
fn ping_pong(imp: Impl, case: PingCase, n: usize, platform: &EvtPlatform) -> Option<Vec<f64>> {
    let (cpu_a, cpu_b) = cpus_for(case.cores)?;
    let total = n + WARM;
    let wait = case.wait;
    Some(match (imp, case.parties) {
        (Impl::Eventfd, Parties::Threads) => {
            let (ab, ba) = (eventfd(wait), eventfd(wait));
            let (ab_fd, ba_fd) = (ab.as_raw_fd(), ba.as_raw_fd());
            let b = thread::spawn(move || {
                pin(cpu_b);
                for _ in 0..total {
                    efd_wait(ab_fd, wait);
                    efd_signal(ba_fd);
                }
            });
            let a = thread::spawn(move || {
                pin(cpu_a);
                party_a(n, || {
                    efd_signal(ab_fd);
                    efd_wait(ba_fd, wait);
                })
            });
            let lat = a.join().expect("party A");
            b.join().expect("party B");
            drop((ab, ba));
            lat
        }
        (Impl::Evtchn, Parties::Threads) => {
            let front = LocalEvtchn::connect(platform.sock(1)).expect("connect A");
            let back = LocalEvtchn::connect(platform.sock(0)).expect("connect B");
            let fp = front.bind_unbound(0).expect("bind_unbound");
            let bp = back.bind_interdomain(1, fp).expect("bind_interdomain");
            let budget = wait.budget();
            let b = thread::spawn(move || {
                pin(cpu_b);
                let mut v = Vec::new();
                for _ in 0..total {
                    evt_recv(&back, bp, budget, &mut v);
                    back.notify(bp).expect("notify");
                }
            });
            let a = thread::spawn(move || {
                pin(cpu_a);
                let mut v = Vec::new();
                party_a(n, || {
                    front.notify(fp).expect("notify");
                    evt_recv(&front, fp, budget, &mut v);
                })
            });
            let lat = a.join().expect("party A");
            b.join().expect("party B");
            lat
        }
        (_, Parties::Processes) => {
            let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
            cmd.env(CHILD, format!("{imp:?}"))
                .env("XENPV_PLATFORM_N", total.to_string())
                .env("XENPV_PLATFORM_CPU", cpu_b.to_string())
                .env("XENPV_PLATFORM_WAIT", wait.name())
                .stdin(Stdio::null())
                .stdout(Stdio::piped());
            match imp {
                Impl::Eventfd => {
                    let (ab, ba) = (eventfd(wait), eventfd(wait));
                    cmd.env(
                        "XENPV_PLATFORM_FDS",
                        format!("{},{}", ab.as_raw_fd(), ba.as_raw_fd()),
                    );
                    run_child(cmd, move || {
                        pin(cpu_a);
                        let (ab_fd, ba_fd) = (ab.as_raw_fd(), ba.as_raw_fd());
                        party_a(n, || {
                            efd_signal(ab_fd);
                            efd_wait(ba_fd, wait);
                        })
                    })
                }
                Impl::Evtchn => {
                    let front = LocalEvtchn::connect(platform.sock(1)).expect("connect A");
                    let fp = front.bind_unbound(0).expect("bind_unbound");
                    cmd.env("XENPV_PLATFORM_SOCK", platform.sock(0))
                        .env("XENPV_PLATFORM_PORT", fp.to_string());
                    let budget = wait.budget();
                    run_child(cmd, move || {
                        pin(cpu_a);
                        let mut v = Vec::new();
                        party_a(n, || {
                            front.notify(fp).expect("notify");
                            evt_recv(&front, fp, budget, &mut v);
                        })
                    })
                }
            }
        }
    })
}

/// Spawns party B, waits until it says `ready`, runs party A on a new thread, reaps B.
fn run_child(mut cmd: Command, a: impl FnOnce() -> Vec<f64> + Send + 'static) -> Vec<f64> {
    let mut child = cmd.spawn().expect("spawn party B");
    let mut out = BufReader::new(child.stdout.take().expect("child stdout"));
    let mut line = String::new();
    let ready = out.read_line(&mut line).is_ok() && line.trim() == "ready";
    let lat = if ready {
        thread::spawn(a).join().ok()
    } else {
        None
    };
    let Some(lat) = lat else {
        // Party B would wait for us forever.
        let _ = child.kill();
        let _ = child.wait();
        panic!("two-process ping-pong failed (party B ready: {ready})");
    };
    let status = child.wait().expect("wait party B");
    assert!(status.success(), "party B failed: {status}");
    lat
}

fn env_num(name: &str) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing or not a number"))
}

/// Party B of a two-process run (this binary re-run with [`CHILD`] set).
fn child_main(role: &str) {
    let n = env_num("XENPV_PLATFORM_N");
    pin(env_num("XENPV_PLATFORM_CPU"));
    let wait = match std::env::var("XENPV_PLATFORM_WAIT").as_deref() {
        Ok("block") => Wait::Block,
        _ => Wait::Spin,
    };
    let ready = || {
        let mut o = std::io::stdout().lock();
        writeln!(o, "ready").expect("stdout");
        o.flush().expect("stdout");
    };
    match role {
        "Eventfd" => {
            let fds = std::env::var("XENPV_PLATFORM_FDS").expect("XENPV_PLATFORM_FDS");
            let (ab, ba) = fds.split_once(',').expect("two fds");
            let (ab, ba): (RawFd, RawFd) = (ab.parse().expect("fd"), ba.parse().expect("fd"));
            ready();
            for _ in 0..n {
                efd_wait(ab, wait);
                efd_signal(ba);
            }
        }
        "Evtchn" => {
            let sock = std::env::var_os("XENPV_PLATFORM_SOCK").expect("XENPV_PLATFORM_SOCK");
            let back = LocalEvtchn::connect(Path::new(&sock)).expect("connect B");
            let port = env_num("XENPV_PLATFORM_PORT") as Port;
            let bp = back.bind_interdomain(1, port).expect("bind_interdomain");
            ready();
            let budget = wait.budget();
            let mut v = Vec::new();
            for _ in 0..n {
                evt_recv(&back, bp, budget, &mut v);
                back.notify(bp).expect("notify");
            }
        }
        other => panic!("unknown child role {other}"),
    }
}

// ------------------------------------------------------------------------------------------
// Criterion

fn criterion_groups(c: &mut Criterion, grants: &mut Grants, platform: &EvtPlatform) {
    let mut group = c.benchmark_group("grant");
    for op in GrantOp::ALL {
        group.bench_function(op.name(), |b| {
            b.iter_custom(|iters| {
                let (t, done) = op.run(grants, iters.max(1));
                // Batches round up: scale back to `iters` operations.
                t.mul_f64(iters as f64 / done as f64)
            });
        });
    }
    group.finish();

    let mut group = c.benchmark_group("evtchn-roundtrip");
    for case in PingCase::all() {
        if cpus_for(case.cores).is_none() {
            continue;
        }
        for imp in [Impl::Eventfd, Impl::Evtchn] {
            let id = format!(
                "{}/{}",
                match imp {
                    Impl::Eventfd => "eventfd",
                    Impl::Evtchn => "xenpv",
                },
                case.label().replace(' ', "-")
            );
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let lat = ping_pong(imp, case, iters as usize, platform).expect("cpus");
                    Duration::from_secs_f64(lat.iter().sum::<f64>() / 1e6)
                });
            });
        }
    }
    group.finish();
}

// ------------------------------------------------------------------------------------------
// Table

/// ns per operation of each [`GrantOp`], median of interleaved rounds.
fn grant_table(s: &Settings, g: &mut Grants) -> [f64; 6] {
    for op in GrantOp::ALL {
        op.run(g, op.table_n(s) / 4 + 1);
    }
    let mut per: [Vec<f64>; 6] = Default::default();
    for _ in 0..s.rounds {
        for (i, op) in GrantOp::ALL.into_iter().enumerate() {
            let (t, done) = op.run(g, op.table_n(s));
            per[i].push(t.as_nanos() as f64 / done as f64);
        }
    }
    per.map(|mut v| median(&mut v))
}

/// Median over rounds of each round's median and p99 (µs), baseline first.
struct PingRow {
    base: (f64, f64),
    ours: (f64, f64),
}

fn ping_table(s: &Settings, case: PingCase, platform: &EvtPlatform) -> Option<PingRow> {
    let n = s.rt_n;
    let mut acc: [(Vec<f64>, Vec<f64>); 2] = Default::default();
    for _ in 0..s.rounds {
        for (i, imp) in [Impl::Eventfd, Impl::Evtchn].into_iter().enumerate() {
            let mut lat = ping_pong(imp, case, n, platform)?;
            lat.sort_by(f64::total_cmp);
            acc[i].0.push(quantile_sorted(&lat, 0.5));
            acc[i].1.push(quantile_sorted(&lat, 0.99));
        }
    }
    let [mut b, mut o] = acc;
    Some(PingRow {
        base: (median(&mut b.0), median(&mut b.1)),
        ours: (median(&mut o.0), median(&mut o.1)),
    })
}

fn print_table(s: &Settings, g: &mut Grants, platform: &EvtPlatform) {
    println!();
    println!(
        "Grants (local platform, in-process broker): ns per operation, median of {} interleaved rounds",
        s.rounds
    );
    let [hit, fresh, mmap, copy1, copy32, memcpy] = grant_table(s, g);
    let header = format!(
        "{:<44} {:>10} {:>10} {:>8}",
        "ours vs baseline", "ours ns", "base ns", "ratio"
    );
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    let row = |name: &str, ours: f64, base: f64| {
        let ratio = ours / base;
        let ratio = if ratio < 0.01 {
            format!("{ratio:.2e}")
        } else {
            format!("{ratio:.3}")
        };
        println!("{name:<44} {ours:>10.1} {base:>10.1} {ratio:>8}");
    };
    row("MapCache hit vs local map+touch+unmap", hit, fresh);
    row(
        "local map+touch+unmap vs memfd mmap+touch+munmap",
        fresh,
        mmap,
    );
    row(
        "grant copy 4 KiB, 1 op/call vs memcpy 4 KiB hot",
        copy1,
        memcpy,
    );
    row(
        "grant copy 4 KiB, 32 ops/call (per op) vs memcpy",
        copy32,
        memcpy,
    );
    let verdict = if hit <= 30.0 { "met" } else { "NOT met" };
    println!(
        "R5 (MapCache hit <= 30 ns): {hit:.1} ns, {:.5}x a fresh map ({:.0}x cheaper): {verdict}",
        hit / fresh,
        fresh / hit
    );

    println!();
    let cpus = allowed_cpus();
    println!(
        "Event channels: notify -> wake round trip, µs; median over {} interleaved rounds of each round's median and p99 ({} round trips per round); CPUs {:?}",
        s.rounds, s.rt_n, &cpus[..cpus.len().min(2)]
    );
    let header = format!(
        "{:<24} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "case", "efd p50", "efd p99", "xenpv p50", "xenpv p99", "p50 x/e", "p99 x/e"
    );
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    for case in PingCase::all() {
        match ping_table(s, case, platform) {
            Some(r) => println!(
                "{:<24} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8.2} {:>8.2}",
                case.label(),
                r.base.0,
                r.base.1,
                r.ours.0,
                r.ours.1,
                r.ours.0 / r.base.0,
                r.ours.1 / r.base.1
            ),
            None => println!("{:<24} (needs two CPUs: skipped)", case.label()),
        }
    }
    println!();
    println!("local map: GrantMap::map_domain of one grant (broker CHECK round trip, pin, mmap) with one");
    println!(
        "  byte written, then drop (munmap, unpin); MapCache hit: get() of a cached grant (lookup,"
    );
    println!("  Arc clone + drop), 64 grants cycled through a 64-entry cache.");
    println!("grant copy: GrantMap::copy, whole 4 KiB pages from the frontend's grants into private buffers.");
    println!("efd: two raw eventfds (A->B, B->A); block = blocking read(), spin50us = non-blocking reads");
    println!("  for 50 µs, then poll() + read(). xenpv: LocalEvtchn notify, spin_then_wait with");
    println!("  SpinBudget::None / SpinBudget::default() (50 µs), then unmask (epoll re-arm).");
    println!(
        "procs: party B is this binary re-run; 1cpu/2cpu: both parties pinned to one CPU / to two."
    );
}

fn main() {
    if let Ok(role) = std::env::var(CHILD) {
        child_main(&role);
        return;
    }
    let settings = Settings::from_env();
    // `cargo bench` passes `--bench`; `cargo test --benches` does not (criterion's test mode).
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let mut grants = Grants::new();
    let platform = EvtPlatform::new();
    let mut c = Criterion::default()
        .warm_up_time(settings.warm_up)
        .measurement_time(settings.measurement)
        .sample_size(settings.sample_size)
        .configure_from_args();
    criterion_groups(&mut c, &mut grants, &platform);
    c.final_summary();
    if bench_mode {
        print_table(&settings, &mut grants, &platform);
    }
}
