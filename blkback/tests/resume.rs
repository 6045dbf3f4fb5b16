//! Restart without the guest noticing (DESIGN §5): `xenpv-blkback` as a process, a frontend that
//! behaves like Linux's xen-blkfront (it never renegotiates: the raw-ring frontend of
//! `support`), and storage the test can stall (an NBD export in this process whose requests
//! are held at a gate), so that requests are known to be consumed and unanswered when the
//! backend dies.
//!
//! * SIGKILL with requests in flight, whose I/O the dead instance never completed: the new
//!   instance executes them again from its journal and answers them; the data is right and the
//!   device never leaves Connected.
//! * SIGTERM with requests in flight: the daemon answers them, exits leaving the device
//!   Connected, and the next instance goes on serving the same ring.
//! * A damaged journal, one of an older format, or one that does not match the frontend's
//!   rings: the new instance does not attach to the ring (no response, InitWait) and serves the
//!   frontend once it renegotiates.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{Backend, Frontend, T};
use xenpv_evtchn::EventChannel;
use xenpv_grant::{Access, GrantMemory, GrantShare, SharedPages};
use xenpv_nbd::export::run_sync;
use xenpv_nbd::{AsyncBlockExport, BlockExport, Completion, ExportFlags, MemExport, Request};
use xenpv_ring::blkif::*;
use xenpv_xenstore::{xenbus, Client, XenbusState, XsOps};

const DISK: usize = 4 << 20;
/// Offset of `rsp_prod` in the shared ring header.
const RSP_PROD: usize = 8;
/// Writes in flight when the backend dies: a full single-page ring.
const IN_FLIGHT: usize = 32;

/// A memory disk whose requests can be held at a gate.
struct Gated {
    disk: MemExport,
    hold: AtomicBool,
    held: Mutex<Vec<(Request, Completion)>>,
    arrived: AtomicUsize,
}

impl Gated {
    fn new() -> Arc<Gated> {
        Arc::new(Gated {
            disk: MemExport::new(DISK),
            hold: AtomicBool::new(false),
            held: Mutex::new(Vec::new()),
            arrived: AtomicUsize::new(0),
        })
    }

    /// Requests held from now on.
    fn close(&self) {
        self.hold.store(true, Ordering::SeqCst);
    }

    /// Waits until `n` requests are held.
    fn wait_held(&self, n: usize) {
        let deadline = Instant::now() + T;
        loop {
            let held = self.held.lock().unwrap().len();
            if held >= n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "only {held} of {n} requests reached the storage"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Opens the gate: the held requests are carried out (`execute`) or forgotten, as the I/O
    /// of a process killed before it was issued.
    fn open(&self, execute: bool) {
        self.hold.store(false, Ordering::SeqCst);
        let held: Vec<_> = self.held.lock().unwrap().drain(..).collect();
        for (req, done) in held {
            if execute {
                run_sync(&self.disk, req, done);
            }
        }
    }

    fn bytes(&self, offset: usize, len: usize) -> Vec<u8> {
        self.disk.snapshot()[offset..offset + len].to_vec()
    }
}

impl AsyncBlockExport for Gated {
    fn size(&self) -> u64 {
        BlockExport::size(&self.disk)
    }
    fn flags(&self) -> ExportFlags {
        BlockExport::flags(&self.disk)
    }
    fn submit(&self, request: Request, done: Completion) {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        let mut held = self.held.lock().unwrap();
        if self.hold.load(Ordering::SeqCst) {
            held.push((request, done));
        } else {
            drop(held);
            run_sync(&self.disk, request, done);
        }
    }
}

/// The local platform with domain 1, the gated disk attached to it as xvda (over NBD), and
/// `xenpv-blkback` keeping its journals in `journal`.
struct Env {
    root: PathBuf,
    journal: PathBuf,
    disk: Arc<Gated>,
    backend: Option<Backend>,
    _nbd: xenpv_nbd::ServerHandle,
    _daemon: xenpv_local::Daemon,
    _dir: tempfile::TempDir,
}

const BE: &str = "/local/domain/0/backend/vbd/1/51712";

impl Env {
    fn start() -> Env {
        let (dir, root, daemon) = support::local_platform([1]);
        let disk = Gated::new();
        let sock = dir.path().join("disk.nbd");
        let nbd = xenpv_nbd::Server::bind_unix(&sock, disk.clone())
            .unwrap()
            .spawn()
            .unwrap();
        let dom0 = Client::connect_local(&root, 0).unwrap();
        xenpv::toolstack::attach_disk(
            &dom0,
            1,
            &format!("vdev=xvda,target=nbd+unix:///?socket={}", sock.display()),
        )
        .unwrap();
        let mut env = Env {
            journal: dir.path().join("journal"),
            root,
            disk,
            backend: None,
            _nbd: nbd,
            _daemon: daemon,
            _dir: dir,
        };
        env.start_backend();
        env
    }

    fn start_backend(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_xenpv-blkback"))
            .args(["--platform", "local", "--state-dir"])
            .arg(&self.root)
            .arg("--journal-dir")
            .arg(&self.journal)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.backend = Some(Backend(child));
    }

    fn signal(&self, sig: &str) {
        // kill(1) keeps the test free of unsafe code.
        let pid = self.backend.as_ref().unwrap().0.id();
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the backend process to exit and returns whether it exited successfully.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let b = self.backend.as_mut().unwrap();
        let deadline = Instant::now() + T;
        loop {
            if let Some(s) = b.0.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "xenpv-blkback did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn journal_file(&self) -> PathBuf {
        self.journal.join("vbd-1-51712.journal")
    }
}

/// Every value the backend's `state` node takes, seen through a watch, from now on.
struct StateLog {
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StateLog {
    fn start(root: &Path) -> StateLog {
        let xs = Client::connect_local(root, 0).unwrap();
        let watch = xs.watch(&format!("{BE}/state")).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st2.load(Ordering::SeqCst) {
                if watch.next_timeout(Duration::from_millis(50)).is_ok() {
                    let v = xs.read_string(&format!("{BE}/state")).unwrap_or_default();
                    s2.lock().unwrap().push(v);
                }
            }
        });
        StateLog {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops watching; every state seen.
    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        let seen = self.seen.lock().unwrap().clone();
        seen
    }
}

/// `IN_FLIGHT` data pages, each filled with its own pattern, and the writes of them to
/// consecutive 4 KiB blocks from sector 1024.
fn writes(pages: &impl SharedPages, seed: u8) -> Vec<BlkifRequest> {
    let mem = pages.volatile();
    (0..IN_FLIGHT)
        .map(|i| {
            mem.fill(i * 4096, 4096, seed.wrapping_add(i as u8) | 1)
                .unwrap();
            let mut r = BlkifRequest::new(OP_WRITE, 0, 5000 + i as u64, 1024 + 8 * i as u64);
            r.nr_segments = 1;
            r.seg[0] = BlkifRequestSegment::new(pages.grefs()[i], 0, 7);
            r
        })
        .collect()
}

fn check_answers(got: &[BlkifResponse]) {
    let mut ids: Vec<u64> = got.iter().map(|r| r.id).collect();
    ids.sort();
    let want: Vec<u64> = (0..IN_FLIGHT as u64).map(|i| 5000 + i).collect();
    assert_eq!(ids, want, "each write answered once");
    for r in got {
        assert_eq!(r.status, RSP_OKAY, "write {} failed", { r.id });
    }
}

fn check_disk(env: &Env, seed: u8) {
    for i in 0..IN_FLIGHT {
        let block = env.disk.bytes(512 * 1024 + 4096 * i, 4096);
        let want = seed.wrapping_add(i as u8) | 1;
        assert!(
            block.iter().all(|&b| b == want),
            "block {i} holds {:#x}.., not {want:#x}",
            block[0]
        );
    }
}

/// The backend is SIGKILLed (or SIGTERMed: `term`) with a full ring of writes consumed and
/// held at the storage, and started again.
fn restart_with_io_in_flight(term: bool) {
    let mut env = Env::start();
    let mut f = Frontend::connect(&env.root, 1, "xvda", true);
    f.verified_io(0, 0x11);
    let log = StateLog::start(&env.root);
    let pages = f.grants.share(0, IN_FLIGHT, Access::Writable).unwrap();
    let reqs = writes(&pages, 0x40);

    env.disk.close();
    f.submit(&reqs);
    // Every write reached the storage: consumed, journaled, in flight.
    env.disk.wait_held(IN_FLIGHT);
    let rsp_prod_before = f.ring.memory().volatile().read_u32(RSP_PROD).unwrap();
    if term {
        env.signal("TERM");
        // The daemon waits for what it consumed …
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            env.backend.as_mut().unwrap().alive(),
            "xenpv-blkback exited with requests in flight"
        );
        // … and answers it before exiting.
        env.disk.open(true);
        let status = env.wait_exit();
        assert!(status.success(), "{status}");
        check_answers(&f.responses(IN_FLIGHT, T));
    } else {
        env.signal("KILL");
        env.wait_exit();
        // The dead instance's I/O never happens.
        env.disk.open(false);
        assert_eq!(
            f.ring.memory().volatile().read_u32(RSP_PROD).unwrap(),
            rsp_prod_before,
            "nothing was answered before the kill"
        );
    }
    assert!(
        env.journal_file().exists(),
        "the journal outlives the process"
    );
    assert_eq!(f.backend_state(), XenbusState::Connected);

    env.start_backend();
    if !term {
        // The new instance executes the writes again and answers them.
        check_answers(&f.responses(IN_FLIGHT, T));
    }
    check_disk(&env, 0x40);
    // The same ring goes on: more writes in flight at once, then verified I/O.
    let reqs = writes(&pages, 0x80);
    f.submit(&reqs);
    check_answers(&f.responses(IN_FLIGHT, T));
    check_disk(&env, 0x80);
    for i in 0..40u8 {
        f.verified_io(u64::from(i) * 8, i.wrapping_mul(3) | 1);
    }
    let seen = log.finish();
    assert!(
        seen.iter().all(|s| s == "4"),
        "the backend left Connected: {seen:?}"
    );
    assert_eq!(f.backend_state(), XenbusState::Connected);
    assert_eq!(
        xenbus::read_state(&f.xs, &f.fe).unwrap(),
        XenbusState::Connected
    );
}

#[test]
fn sigkill_with_io_in_flight_is_invisible_to_the_frontend() {
    restart_with_io_in_flight(false);
}

#[test]
fn sigterm_with_io_in_flight_is_invisible_to_the_frontend() {
    restart_with_io_in_flight(true);
}

/// The backend dies with writes in flight, its journal is `spoil`ed, and it starts again: it
/// must not attach to the ring (no response comes, it offers the device again at InitWait),
/// and once the frontend renegotiates the device works.
fn no_resume_from(spoil: impl FnOnce(&Env, &Frontend)) {
    let mut env = Env::start();
    let mut f = Frontend::connect(&env.root, 1, "xvda", true);
    f.verified_io(0, 0x22);
    let pages = f.grants.share(0, IN_FLIGHT, Access::Writable).unwrap();
    let reqs = writes(&pages, 0x40);
    env.disk.close();
    f.submit(&reqs[..4]);
    env.disk.wait_held(4);
    env.signal("KILL");
    env.wait_exit();
    env.disk.open(false);
    spoil(&env, &f);

    env.start_backend();
    xenbus::wait_for_peer_state(&f.xs, &f.be, |s| s == XenbusState::InitWait, T).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        f.ring.next_response().unwrap(),
        None,
        "the backend attached to a ring its journal does not describe"
    );
    assert!(
        env.disk.bytes(512 * 1024, 4 * 4096).iter().all(|&b| b == 0),
        "the backend executed requests it could not trust"
    );
    f.reconnect();
    f.verified_io(64, 0x5A);
}

#[test]
fn a_damaged_journal_is_not_resumed() {
    no_resume_from(|env, _| {
        let path = env.journal_file();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[40] ^= 0x01; // the advertised indirect segments: the checksum no longer matches
        std::fs::write(&path, bytes).unwrap();
    });
}

#[test]
fn a_journal_of_other_rings_is_not_resumed() {
    no_resume_from(|_, f| {
        // The frontend's event channel is not the one the journal recorded.
        let port = f.evtchn.bind_unbound(0).unwrap();
        f.xs.write_str(&format!("{}/event-channel", f.fe), &port.to_string())
            .unwrap();
    });
}

#[test]
fn a_missing_journal_is_not_resumed() {
    no_resume_from(|env, _| std::fs::remove_file(env.journal_file()).unwrap());
}

#[test]
fn a_version_1_journal_is_not_resumed() {
    // An older daemon's journal (format 1: answers in ring order, no marks) is refused as a
    // whole, though its header is consistent: its slots cannot say what was answered.
    no_resume_from(|env, _| {
        let path = env.journal_file();
        let mut bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"XPVBLKJ2");
        bytes[..8].copy_from_slice(b"XPVBLKJ1");
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        // FNV-1a 64 of the header's first 8184 bytes, in its last 8.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in &bytes[..8184] {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        bytes[8184..8192].copy_from_slice(&h.to_le_bytes());
        std::fs::write(&path, bytes).unwrap();
    });
}
