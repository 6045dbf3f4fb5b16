//! `xenpv-blkback` as a process on the local platform: systemd readiness and watchdog through a
//! `NOTIFY_SOCKET` this test creates, a frontend (played here) connecting and doing I/O that
//! reaches the image, the status file (and a daemon-wide budget of persistent mappings), the
//! error for a missing platform, and a clean SIGTERM.

use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use xenpv_evtchn::local::LocalEvtchn;
use xenpv_evtchn::{spin_then_wait, EventChannel, SpinBudget};
use xenpv_grant::local::LocalGrants;
use xenpv_grant::{Access, GrantMemory, GrantShare, SharedPages};
use xenpv_ring::blkif::*;
use xenpv_ring::{FrontRing, RingMemory, RingProtocol};
use xenpv_xenstore::{xenbus, Client, XenbusState, XsOps};

mod support;

use support::Backend;

const T: Duration = Duration::from_secs(20);

/// Waits until `n` responses have arrived on `ring` (final check, then spin-then-block on the
/// event channel and unmask), and returns them in arrival order.
fn responses<P: RingProtocol, M: RingMemory>(
    ring: &mut FrontRing<P, M>,
    evtchn: &LocalEvtchn,
    n: usize,
) -> Vec<P::Rsp> {
    let deadline = Instant::now() + T;
    let mut got = Vec::new();
    let mut ports = Vec::new();
    loop {
        while let Some(rsp) = ring.next_response().unwrap() {
            got.push(rsp);
        }
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} responses",
            got.len()
        );
        if !ring.final_check_for_responses().unwrap() {
            ports.clear();
            spin_then_wait(
                evtchn,
                &mut ports,
                SpinBudget::default(),
                Some(Duration::from_millis(200)),
            )
            .unwrap();
            for p in &ports {
                evtchn.unmask(*p).unwrap();
            }
        }
    }
}

/// systemd's side of `NOTIFY_SOCKET`: a thread reads every message the daemon sends, as PID 1
/// does, and hands them to the test in order.
///
/// The socket must be drained: a datagram socket nobody reads holds 10 messages
/// (`net.unix.max_dgram_qlen`), and then the daemon's next sd_notify blocks, and its main loop
/// with it (no status file, no SIGTERM). With pings every 100 ms that is one second in.
struct Systemd {
    rx: mpsc::Receiver<String>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Systemd {
    fn listen(path: &std::path::Path) -> Systemd {
        let sock = UnixDatagram::bind(path).unwrap();
        // Only so that the thread sees `stop`.
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while !stop2.load(Ordering::Relaxed) {
                match sock.recv(&mut buf) {
                    Ok(n) => {
                        let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
                    }
                    // Nothing yet; or EINTR, which recv(2) on a socket with a read timeout
                    // returns (never restarted) when this process is stopped and continued
                    // (signal(7)).
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                        ) => {}
                    Err(e) => panic!("NOTIFY_SOCKET: {e}"),
                }
            }
        });
        Systemd {
            rx,
            stop,
            thread: Some(thread),
        }
    }

    /// The next message, waiting at most [`T`].
    fn next(&self) -> String {
        self.rx
            .recv_timeout(T)
            .unwrap_or_else(|e| panic!("no message on NOTIFY_SOCKET within {T:?} ({e})"))
    }

    /// Forgets the messages received so far.
    fn forget(&self) {
        while self.rx.try_recv().is_ok() {}
    }

    /// Waits (at most [`T`]) for a message equal to `msg` or starting with `msg` and a newline.
    fn wait_for(&self, msg: &str) {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(m) if m == msg || m.starts_with(&format!("{msg}\n")) => return,
                Ok(_) => {}
                Err(e) => panic!("no {msg} on NOTIFY_SOCKET within {T:?} ({e})"),
            }
        }
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn daemon_serves_a_frontend_and_talks_to_systemd() {
    serve_and_talk_to_systemd("io_uring");
}

/// The same with the psync engine, whose queues run the serial loop rather than the pipeline.
#[test]
fn daemon_serves_a_frontend_with_the_psync_engine() {
    serve_and_talk_to_systemd("psync");
}

/// xenpv-blkback with `engine` for its images: readiness and watchdog, a frontend's I/O
/// reaching the image, the status file, the budget and timeout of persistent mappings, online
/// resize and a clean SIGTERM.
fn serve_and_talk_to_systemd(engine: &str) {
    let (mut setup, (sd, status)) = setup_with(|dir, cmd| {
        let notify = dir.join("notify.sock");
        let sd = Systemd::listen(&notify);
        let status = dir.join("status");
        // A budget of one persistent mapping for the whole daemon, unmapped after a second
        // unused (both checked below).
        let config = dir.join("blkback.toml");
        std::fs::write(&config, "persistent_budget = 1\npersistent_timeout_s = 1\n").unwrap();
        cmd.arg("--status-file")
            .arg(&status)
            .arg("--config")
            .arg(&config)
            .args(["--engine", engine])
            .env("NOTIFY_SOCKET", &notify)
            .env("WATCHDOG_USEC", "200000");
        (sd, status)
    });
    let (root, image) = (setup.root.clone(), setup.image.clone());
    let backend = &mut setup.backend;
    let ready = sd.next();
    assert!(ready.contains("READY=1"), "{ready:?}");
    assert_eq!(sd.next(), "WATCHDOG=1");

    // The frontend (domain 1).
    let xs = Client::connect_local(&root, 1).unwrap();
    let grants = LocalGrants::connect(LocalGrants::socket_path(&root, 1)).unwrap();
    let evtchn = LocalEvtchn::connect(xenpv_evtchn::local::socket_path(&root, 1)).unwrap();
    let fe = "/local/domain/1/device/vbd/51712";
    let be = "/local/domain/0/backend/vbd/1/51712";
    xenbus::wait_for_peer_state(&xs, be, |s| s == XenbusState::InitWait, T).unwrap();
    assert_eq!(
        xs.read_string(&format!("{be}/feature-max-indirect-segments"))
            .unwrap(),
        "256"
    );
    let ring_page = grants.share(0, 1, Access::Writable).unwrap();
    let data = grants.share(0, 2, Access::Writable).unwrap();
    let mut ring = FrontRing::<Blkif, _>::init(&ring_page).unwrap();
    let port = evtchn.bind_unbound(0).unwrap();
    xs.write_str(&format!("{fe}/ring-ref"), &ring_page.grefs()[0].to_string())
        .unwrap();
    xs.write_str(&format!("{fe}/event-channel"), &port.to_string())
        .unwrap();
    xs.write_str(&format!("{fe}/protocol"), "x86_64-abi")
        .unwrap();
    xs.write_str(&format!("{fe}/feature-persistent"), "1")
        .unwrap();
    xenbus::switch_state(&xs, fe, XenbusState::Initialised).unwrap();
    xenbus::wait_for_peer_state(&xs, be, |s| s == XenbusState::Connected, T).unwrap();
    assert_eq!(xs.read_string(&format!("{be}/sectors")).unwrap(), "2048");
    assert_eq!(
        xs.read_string(&format!("{be}/feature-flush-cache"))
            .unwrap(),
        "1"
    );
    xenbus::switch_state(&xs, fe, XenbusState::Connected).unwrap();

    data.volatile().fill(0, 4096, 0x5A).unwrap();
    let mut w = BlkifRequest::new(OP_WRITE, 0, 1, 8);
    w.nr_segments = 1;
    w.seg[0] = BlkifRequestSegment::new(data.grefs()[0], 0, 7);
    ring.produce(w).unwrap();
    ring.produce(BlkifRequest::new(OP_FLUSH_DISKCACHE, 0, 2, 0))
        .unwrap();
    let mut r = BlkifRequest::new(OP_READ, 0, 3, 8);
    r.nr_segments = 1;
    r.seg[0] = BlkifRequestSegment::new(data.grefs()[1], 0, 7);
    ring.produce(r).unwrap();
    if ring.push_requests() {
        evtchn.notify(port).unwrap();
    }
    let got: Vec<_> = responses(&mut ring, &evtchn, 3)
        .iter()
        .map(|r| (r.id, r.status))
        .collect();
    assert_eq!(got, [(1, RSP_OKAY), (2, RSP_OKAY), (3, RSP_OKAY)]);
    // A read of both pages finds the budget spent, whichever page holds the one mapping (the
    // first read found it in use by the write when both were in flight, or took it over): it
    // is mapped whole, uncached. With the default budget nothing would be.
    let mut r2 = BlkifRequest::new(OP_READ, 0, 5, 8);
    r2.nr_segments = 2;
    r2.seg[0] = BlkifRequestSegment::new(data.grefs()[0], 0, 7);
    r2.seg[1] = BlkifRequestSegment::new(data.grefs()[1], 0, 7);
    ring.produce(r2).unwrap();
    if ring.push_requests() {
        evtchn.notify(port).unwrap();
    }
    assert_eq!(responses(&mut ring, &evtchn, 1)[0].status, RSP_OKAY);
    // The frontend's grant entries show which pages the backend has mapped.
    let mapped = |g| {
        let busy = xenpv_grant::flags::GTF_READING | xenpv_grant::flags::GTF_WRITING;
        grants.own_flags(g).unwrap() & busy != 0
    };
    assert!(
        data.grefs().iter().any(|&g| mapped(g)),
        "a grant mapped persistently"
    );
    let img = std::fs::read(&image).unwrap();
    assert!(
        img[4096..8192].iter().all(|&b| b == 0x5A),
        "the write reached the image"
    );
    let mut page = vec![0u8; 4096];
    data.volatile().read(0, &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0x5A), "the read came back");
    data.volatile().read(4096, &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0), "the read came back");

    // The status file counts the I/O, and the requests that found the budget spent (the last
    // read, perhaps the first).
    let deadline = Instant::now() + T;
    loop {
        let s = std::fs::read_to_string(&status).unwrap_or_default();
        let uncached = s
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("uncached="))
            .and_then(|v| v.parse::<u64>().ok());
        if s.contains("writes=1")
            && s.contains("reads=2")
            && s.contains("flushes=1")
            && matches!(uncached, Some(1 | 2))
        {
            assert!(s.starts_with(be), "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "status file: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Left unused, the persistent mapping is unmapped after 0.5-1 s.
    let deadline = Instant::now() + Duration::from_secs(5);
    while data.grefs().iter().any(|&g| mapped(g)) {
        assert!(
            Instant::now() < deadline,
            "a persistent mapping outlived its timeout"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Online resize: the image grows, the backend announces the new size, and the new
    // sectors can be read.
    let mut past = BlkifRequest::new(OP_READ, 0, 4, 3000);
    past.nr_segments = 1;
    past.seg[0] = BlkifRequestSegment::new(data.grefs()[1], 0, 7);
    let mut roundtrip = |req: BlkifRequest| -> i16 {
        ring.produce(req).unwrap();
        if ring.push_requests() {
            evtchn.notify(port).unwrap();
        }
        responses(&mut ring, &evtchn, 1)[0].status
    };
    assert_eq!(
        roundtrip(past),
        RSP_ERROR,
        "sector 3000 is past the 2048-sector disk"
    );
    // The image takes `bytes`; the backend must announce it as `sectors`.
    let resize = |bytes: u64| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        let want = (bytes / 512).to_string();
        let deadline = Instant::now() + T;
        while xs.read_string(&format!("{be}/sectors")).unwrap() != want {
            assert!(Instant::now() < deadline, "{want} sectors not announced");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    resize(2 << 20);
    assert_eq!(xenbus::read_state(&xs, be).unwrap(), XenbusState::Connected);
    past.id = 5;
    assert_eq!(
        roundtrip(past),
        RSP_OKAY,
        "the grown disk serves its new sectors"
    );
    // And shrinks: announced too (as Linux's blkback does), and the lost sectors are refused.
    resize(1 << 20);
    assert_eq!(xenbus::read_state(&xs, be).unwrap(), XenbusState::Connected);
    past.id = 6;
    assert_eq!(
        roundtrip(past),
        RSP_ERROR,
        "sector 3000 is past the disk again"
    );

    // Close: the backend follows to Closed.
    xenbus::switch_state(&xs, fe, XenbusState::Closing).unwrap();
    xenbus::wait_for_peer_state(&xs, be, |s| s == XenbusState::Closed, T).unwrap();
    xenbus::switch_state(&xs, fe, XenbusState::Closed).unwrap();
    let _ = evtchn.unbind(port);
    grants.revoke(ring_page).unwrap();

    // The daemon still pings after all that (its main loop is alive).
    sd.forget();
    sd.wait_for("WATCHDOG=1");

    // SIGTERM: a clean exit.
    // kill(1) keeps the test free of unsafe code.
    Command::new("kill")
        .arg("-TERM")
        .arg(backend.0.id().to_string())
        .status()
        .unwrap();
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(s) = backend.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "xenpv-blkback did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    sd.wait_for("STOPPING=1");
}

#[test]
fn missing_platform_and_bad_arguments_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xenpv-blkback"))
        .args(["--platform", "local", "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("xenpv local"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_xenpv-blkback"))
        .args(["--platform", "vmware"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown platform `vmware`"));
    let cfg = dir.path().join("b.toml");
    std::fs::write(&cfg, "max_queues = 0\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xenpv-blkback"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("max_queues = 0"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A budget of persistent mappings the process could never map gets the fix in the error.
    let most = xenpv_grant::max_map_count();
    for (text, wanted) in [
        ("persistent_budget = 0\n".to_string(), "persistent = false"),
        (
            format!("persistent_budget = {most}\n"),
            "sysctl -w vm.max_map_count",
        ),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_xenpv-blkback"))
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(wanted), "{err}");
    }
    std::fs::write(&cfg, "colour = 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xenpv-blkback"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("colour"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_example_configuration_parses() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/blkback.toml");
    let dir = tempfile::tempdir().unwrap();
    // It parses, and fails only later, at the missing platform.
    let out = Command::new(env!("CARGO_BIN_EXE_xenpv-blkback"))
        .args(["--platform", "local", "--config", cfg, "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("xenpv local") && !err.contains("bad configuration"),
        "{err}"
    );
}

/// The packaged unit (deploy/xenpv-blkback.service), pointed at the binary under test: systemd
/// accepts it (`systemd-analyze verify`: every directive known, the binary there), its
/// hardening keeps the exposure `systemd-analyze security` computes at 3.0 or under (2.4 now;
/// the unit as first written scored 4.5), and it keeps what the daemon needs to run: notify
/// with a watchdog, the three Xen devices, no capability it does not use.
#[test]
fn the_systemd_unit_verifies_and_stays_hardened() {
    let analyze = "systemd-analyze";
    if Command::new(analyze).arg("--version").output().is_err() {
        panic!("{analyze} is missing: apt-get install systemd (scripts/test.sh does)");
    }
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/xenpv-blkback.service"
    ))
    .unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=10",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "DevicePolicy=closed",
        "DeviceAllow=/dev/xen/gntdev rw",
        "DeviceAllow=/dev/xen/evtchn rw",
        "DeviceAllow=/dev/xen/xenbus rw",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line:?}");
    }
    let caps = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("a capability bounding set");
    assert!(!caps.contains("CAP_SYS_ADMIN"), "{caps}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("xenpv-blkback.service");
    let unit = unit.replace(
        "/usr/local/sbin/xenpv-blkback",
        env!("CARGO_BIN_EXE_xenpv-blkback"),
    );
    std::fs::write(&path, unit).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(analyze)
        .args(["security", "--offline=yes", "--threshold=30", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exposure above 3.0: {}{}",
        text.lines().last().unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The local platform (in this process) with guest domain 1, a zeroed 1 MiB image attached to
/// it as xvda, and `xenpv-blkback` serving it as a child process.
struct Setup {
    root: std::path::PathBuf,
    image: std::path::PathBuf,
    backend: Backend,
    _daemon: xenpv_local::Daemon,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    setup_with(|_, _| ()).0
}

/// [`setup`], letting `configure` add arguments and environment to the daemon's command line
/// (it gets the test's temporary directory).
fn setup_with<R>(configure: impl FnOnce(&std::path::Path, &mut Command) -> R) -> (Setup, R) {
    let (dir, root, daemon) = support::local_platform([1]);
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let dom0 = Client::connect_local(&root, 0).unwrap();
    xenpv::toolstack::attach_disk(&dom0, 1, &format!("vdev=xvda,target={}", image.display()))
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xenpv-blkback"));
    cmd.args(["--platform", "local", "--state-dir"])
        .arg(&root)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let extra = configure(dir.path(), &mut cmd);
    let backend = Backend(cmd.spawn().unwrap());
    let setup = Setup {
        root,
        image,
        backend,
        _daemon: daemon,
        _dir: dir,
    };
    (setup, extra)
}

#[test]
fn a_frontend_that_closes_before_connecting_can_start_again() {
    let Setup { root, .. } = &setup();
    let xs = Client::connect_local(root, 1).unwrap();
    let fe = "/local/domain/1/device/vbd/51712";
    let be = "/local/domain/0/backend/vbd/1/51712";
    xenbus::wait_for_peer_state(&xs, be, |s| s == XenbusState::InitWait, T).unwrap();
    // The frontend gives up before publishing a ring: the backend follows it to Closed …
    xenbus::switch_state(&xs, fe, XenbusState::Closing).unwrap();
    xenbus::wait_for_peer_state(&xs, be, |s| s == XenbusState::Closed, T).unwrap();
    // … and offers the device again when the frontend starts over.
    xenbus::switch_state(&xs, fe, XenbusState::Initialising).unwrap();
    xenbus::wait_for_peer_state(&xs, be, |s| s == XenbusState::InitWait, T).unwrap();
}

#[test]
fn an_x86_32_abi_frontend_is_served() {
    let Setup { root, image, .. } = &setup();
    let xs = Client::connect_local(root, 1).unwrap();
    let grants = LocalGrants::connect(LocalGrants::socket_path(root, 1)).unwrap();
    let evtchn = LocalEvtchn::connect(xenpv_evtchn::local::socket_path(root, 1)).unwrap();
    let fe = "/local/domain/1/device/vbd/51712";
    let be = "/local/domain/0/backend/vbd/1/51712";
    xenbus::wait_for_peer_state(&xs, be, |s| s == XenbusState::InitWait, T).unwrap();
    // A two-page ring: 108-byte entries straddle the page boundary.
    let ring_pages = grants.share(0, 2, Access::Writable).unwrap();
    let data = grants.share(0, 2, Access::Writable).unwrap();
    let mut ring = FrontRing::<BlkifX86_32, _>::init(&ring_pages).unwrap();
    let port = evtchn.bind_unbound(0).unwrap();
    xs.write_str(&format!("{fe}/ring-page-order"), "1").unwrap();
    for (i, g) in ring_pages.grefs().iter().enumerate() {
        xs.write_str(&format!("{fe}/ring-ref{i}"), &g.to_string())
            .unwrap();
    }
    xs.write_str(&format!("{fe}/event-channel"), &port.to_string())
        .unwrap();
    xs.write_str(&format!("{fe}/protocol"), "x86_32-abi")
        .unwrap();
    xenbus::switch_state(&xs, fe, XenbusState::Initialised).unwrap();
    xenbus::wait_for_peer_state(&xs, be, |s| s == XenbusState::Connected, T).unwrap();
    xenbus::switch_state(&xs, fe, XenbusState::Connected).unwrap();

    data.volatile().fill(0, 4096, 0x32).unwrap();
    let mut expect = Vec::new();
    // 40 requests: more than one lap of the 64-slot ring is not needed, but slot 37 (the one
    // that straddles the pages) must be crossed.
    for i in 0..40u64 {
        let op = if i % 2 == 0 { OP_WRITE } else { OP_READ };
        let mut r = BlkifRequest::new(op, 0, 100 + i, 8 * (i / 2));
        r.nr_segments = 1;
        r.seg[0] = BlkifRequestSegment::new(data.grefs()[(i % 2) as usize], 0, 7);
        ring.produce(X86_32Request::from_native(&r)).unwrap();
        expect.push((100 + i, op));
    }
    if ring.push_requests() {
        evtchn.notify(port).unwrap();
    }
    let mut got = Vec::new();
    for rsp in responses(&mut ring, &evtchn, expect.len()) {
        let rsp = BlkifResponse::from(rsp);
        assert_eq!(rsp.status, RSP_OKAY, "request {}", { rsp.id });
        got.push((rsp.id, rsp.operation));
    }
    got.sort();
    assert_eq!(got, expect);
    let img = std::fs::read(image).unwrap();
    assert!(
        img[..20 * 4096].iter().all(|&b| b == 0x32),
        "every write reached the image"
    );

    // The layouts that differ in the 32-bit ABI: an indirect write (16 pages, each its own
    // pattern) and a discard inside it, translated and served like native ones.
    let pages = grants.share(0, 17, Access::Writable).unwrap();
    let mem = pages.volatile();
    for i in 0..16usize {
        mem.fill((i + 1) * 4096, 4096, 0x40 + i as u8).unwrap();
        let seg = BlkifRequestSegment::new(pages.grefs()[i + 1], 0, 7);
        mem.write_obj(i * 8, seg).unwrap();
    }
    let mut ir = BlkifRequestIndirect::new(OP_WRITE, 16, 0, 300, 1024);
    ir.indirect_grefs[0] = pages.grefs()[0];
    // One request in the 32-bit layout, and its answer in the native one.
    let mut one = |req: BlkifRequest| {
        ring.produce(X86_32Request::from_native(&req)).unwrap();
        if ring.push_requests() {
            evtchn.notify(port).unwrap();
        }
        let rsp = BlkifResponse::from(responses(&mut ring, &evtchn, 1)[0]);
        (rsp.id, rsp.operation, rsp.status)
    };
    assert_eq!(one(ir.to_request()), (300, OP_WRITE, RSP_OKAY));
    // Pages 2 and 3 of the write (sectors 1040..1056) discarded.
    let d = BlkifRequestDiscard::new(0, 0, 301, 1040, 16);
    assert_eq!(one(d.to_request()), (301, OP_DISCARD, RSP_OKAY));
    let img = std::fs::read(image).unwrap();
    for i in 0..16usize {
        let page = &img[1024 * 512 + i * 4096..][..4096];
        let want = if i == 2 || i == 3 { 0 } else { 0x40 + i as u8 };
        assert!(
            page.iter().all(|&b| b == want),
            "page {i} of the indirect write"
        );
    }
}

/// Between changes an idle device costs xenstored next to nothing: the daemon and its device
/// threads read the nodes they follow when a watch fires (and every few seconds as a safety
/// net), not at every round. Both waiting for a frontend (a guest without PV drivers never
/// comes) and connected without I/O. A change is still followed at once.
#[test]
fn an_idle_device_sends_xenstored_next_to_nothing_and_still_follows_changes() {
    let s = setup();
    let xenstored = s._daemon.xenstore();
    let xs = Client::connect_local(&s.root, 1).unwrap();
    let fe = "/local/domain/1/device/vbd/51712";
    let be = "/local/domain/0/backend/vbd/1/51712";
    xenbus::wait_for_peer_state(&xs, be, |s| s == XenbusState::InitWait, T).unwrap();
    // dom0's requests over 2 s, once the reads that follow its own last writes are done: the
    // daemon's loop and the device thread, nothing else of dom0's is connected. Each reads
    // again at most once per 5 s without a change (up to 7 requests together); polling every
    // round sent 41.
    let idle = || {
        std::thread::sleep(Duration::from_millis(500));
        let before = xenstored.requests_from(0);
        std::thread::sleep(Duration::from_secs(2));
        xenstored.requests_from(0) - before
    };
    let waiting = idle();
    assert!(
        waiting <= 10,
        "{waiting} requests in 2 s waiting for the frontend"
    );

    let grants = LocalGrants::connect(LocalGrants::socket_path(&s.root, 1)).unwrap();
    let evtchn = LocalEvtchn::connect(xenpv_evtchn::local::socket_path(&s.root, 1)).unwrap();
    let ring_page = grants.share(0, 1, Access::Writable).unwrap();
    let _ring = FrontRing::<Blkif, _>::init(&ring_page).unwrap();
    let port = evtchn.bind_unbound(0).unwrap();
    xs.write_str(&format!("{fe}/ring-ref"), &ring_page.grefs()[0].to_string())
        .unwrap();
    xs.write_str(&format!("{fe}/event-channel"), &port.to_string())
        .unwrap();
    xenbus::switch_state(&xs, fe, XenbusState::Initialised).unwrap();
    xenbus::wait_for_peer_state(&xs, be, |s| s == XenbusState::Connected, T).unwrap();
    xenbus::switch_state(&xs, fe, XenbusState::Connected).unwrap();
    // The queue thread sleeps on the event channel and the queues' stop signal alone: no
    // timeout wakes it while the device is idle (it woke every 100 ms to look at a stop flag).
    let pid = s.backend.0.id();
    let queue = "blkback-1-q0";
    let before = xenpv_tests::thread_switches(Some(pid), queue)
        .expect("the connected device's queue thread");
    let connected = idle();
    assert!(connected <= 10, "{connected} requests in 2 s connected");
    let woke = xenpv_tests::thread_switches(Some(pid), queue).unwrap() - before;
    assert!(
        woke <= 3,
        "the idle queue thread switched {woke} times in 2.5 s"
    );

    // The frontend closes: followed through the watch, well before the 5 s safety net.
    let t = std::time::Instant::now();
    xenbus::switch_state(&xs, fe, XenbusState::Closing).unwrap();
    xenbus::wait_for_peer_state(&xs, be, |s| s == XenbusState::Closed, T).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "closing followed after {:?}",
        t.elapsed()
    );
}
