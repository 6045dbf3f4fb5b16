//! Backend restart: our blkback runs in a child process (this test binary re-executed), is
//! killed with SIGKILL in the middle of I/O, the toolstack marks it Closed, a new backend starts;
//! the frontend renegotiates, re-issues what was in flight, and every acknowledged write is
//! intact. With journals, the new backend resumes the connection instead and the frontend
//! notices nothing.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use xenpv_blkfront::{Op, Options};
use xenpv_nbd::export::run_sync;
use xenpv_nbd::{AsyncBlockExport, BlockExport, Completion, ExportFlags, Request};
use xenpv_xenstore::{xenbus, XenbusState, XsOps};

/// This test binary's `backend_child` (a blkback serving `env`'s device with `journal`) in a
/// process of its own, killed when dropped.
fn spawn_backend(env: &Env, journal: &std::path::Path) -> KillOnDrop {
    KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args(["backend_child", "--exact", "--ignored", "--nocapture"])
            .env("BLKFRONT_TEST_ROOT", &env.root)
            .env("BLKFRONT_TEST_BE", &env.be)
            .env("BLKFRONT_TEST_JOURNAL", journal)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// The child: serves the device named in the environment until killed.
#[test]
#[ignore = "helper run by backend_restart_reissues_in_flight"]
fn backend_child() {
    let Ok(root) = std::env::var("BLKFRONT_TEST_ROOT") else {
        return;
    };
    let be = std::env::var("BLKFRONT_TEST_BE").unwrap();
    let p = backend_platform(std::path::Path::new(&root));
    let cfg = xenpv_blkback::device::Config {
        journal_dir: std::env::var_os("BLKFRONT_TEST_JOURNAL").map(Into::into),
        ..Default::default()
    };
    let _ = xenpv_blkback::device::serve(&p, &be, &cfg);
}

/// With journals, the new backend resumes the connection instead: a frontend that does not
/// renegotiate (as Linux's xen-blkfront) with two queues, two-page rings, persistent grants and
/// indirect requests sees every write in flight complete, and never a reconnect.
#[test]
fn backend_restart_resumes_a_frontend_that_does_not_reconnect() {
    let env = env(16 << 20);
    let journal = env._dir.path().join("journal");
    // The image behind a gate: writes reach it only when the test says so.
    let gate = Gated::new(xenpv_nbd::FileExport::open(&env.img).unwrap());
    let sock = env._dir.path().join("gate.nbd");
    let _server = xenpv_nbd::Server::bind_unix(&sock, gate.clone())
        .unwrap()
        .spawn()
        .unwrap();
    env.dom0
        .write_str(
            &format!("{}/params", env.be),
            &format!("nbd+unix:///?socket={}", sock.display()),
        )
        .unwrap();
    // Dropped first (on a failure too): nothing stays held, so the server can shut down.
    let _open_on_drop = OpenOnDrop(gate.clone());
    let mut child = spawn_backend(&env, &journal);
    let dev = connect(
        &env,
        Options {
            queues: 2,
            ring_order: 1,
            reconnect: false,
            ..Options::default()
        },
    );
    let info = dev.info();
    assert!(info.persistent && info.queues == 2 && info.max_segments > 11);
    gate.close();
    let mut tickets = Vec::new();
    for i in 0..200u64 {
        tickets.push(dev.submit_ticket(Op::Write {
            offset: i * 65536,
            data: pattern(7000 + i, 65536),
        }));
    }
    // Each queue's first chunk of writes consumed and held at the storage (a queue waits for
    // its chunk before it takes more from its ring); the backend dies; their I/O never
    // happens. The new backend executes them again from the journal, and takes the rest from
    // the rings where the journal says the old one stopped.
    gate.wait_held(2);
    // One thread per queue, each holding its queue's chunk.
    let mut queue_threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", child.0.id()))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("blkback-1-q"))
        .collect();
    queue_threads.sort();
    assert_eq!(queue_threads, ["blkback-1-q0", "blkback-1-q1"]);
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    gate.open();
    assert_eq!(
        xenbus::read_state(&env.dom0, &env.be).unwrap(),
        XenbusState::Connected
    );
    let _b = start_backend(
        &env,
        xenpv_blkback::device::Config {
            journal_dir: Some(journal),
            ..Default::default()
        },
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for (i, t) in tickets.into_iter().enumerate() {
        let r = loop {
            if let Some(r) = t.try_wait() {
                break r;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "write {i} never completed: the backend did not resume"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        r.unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
    for i in 0..200u64 {
        let want = pattern(7000 + i, 65536);
        assert_eq!(read_image(&env.img, i * 65536, 65536), want, "block {i}");
        let mut back = vec![0; 65536];
        dev.read_at(&mut back, i * 65536).unwrap();
        assert_eq!(back, want);
    }
    assert_eq!(dev.reconnects(), 0);
    assert!(dev.is_connected());
    assert_eq!(
        xenbus::read_state(&env.dom0, &env.be).unwrap(),
        XenbusState::Connected
    );
    dev.close().unwrap();
}

/// A backend killed at arbitrary instants while it serves from io_uring on a file on disk (a
/// pipelined queue, answering each request as it completes, out of ring order), again and
/// again, each time resumed by a new instance from its journal: a frontend that never
/// renegotiates sees every write and read complete, once (a duplicate response would be a
/// protocol error for it), with the right data.
#[test]
fn backend_killed_at_any_instant_resumes_every_time() {
    const BLOCK: usize = 8192;
    const PER_ROUND: u64 = 96;
    let size = 16 << 20;
    let env = env(size);
    let initial = pattern(1, size);
    let journal = env._dir.path().join("journal");
    let spawn = || spawn_backend(&env, &journal);
    let mut child = spawn();
    let dev = connect(
        &env,
        Options {
            queues: 2,
            ring_order: 0,
            reconnect: false,
            ..Options::default()
        },
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    // Writes of blocks 0..1152 and reads of blocks from 1600 on (the initial pattern), in flight
    // together. Each round, once the backend (a new instance from the second round on) has
    // answered one of the round's requests, it dies after a different delay.
    let mut writes: Vec<(u64, Outcome)> = Vec::new();
    let mut reads: Vec<(u64, Outcome)> = Vec::new();
    for (round, delay_us) in [0u64, 300, 100, 50, 2000, 0, 20, 700, 0, 150, 10, 1000]
        .into_iter()
        .enumerate()
    {
        let first = writes.len();
        for i in 0..PER_ROUND {
            let b = round as u64 * PER_ROUND + i;
            let data = pattern(9000 + b, BLOCK);
            let offset = b * BLOCK as u64;
            writes.push((
                b,
                Outcome::new(dev.submit_ticket(Op::Write { offset, data })),
            ));
            if i % 3 == 0 {
                let r = 1600 + (b * 7) % 400;
                let offset = r * BLOCK as u64;
                let t = dev.submit_ticket(Op::Read { offset, len: BLOCK });
                reads.push((r, Outcome::new(t)));
            }
        }
        while !writes[first..].iter_mut().any(|(_, o)| o.done()) {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the backend answers nothing (frontend error: {:?})",
                dev.error()
            );
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_micros(delay_us));
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        assert_eq!(
            xenbus::read_state(&env.dom0, &env.be).unwrap(),
            XenbusState::Connected
        );
        child = spawn();
    }
    let wait = |o: &mut Outcome, what: &str| {
        while !o.done() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what} never completed: the backend did not resume (frontend error: {:?})",
                dev.error()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        match o.result.take() {
            Some(Ok(data)) => data,
            other => panic!("{what}: {other:?}"),
        }
    };
    for (b, o) in &mut reads {
        let got = wait(o, &format!("read of block {b}"));
        let at = *b as usize * BLOCK;
        assert!(got == initial[at..at + BLOCK], "read of block {b}");
    }
    for (b, o) in &mut writes {
        wait(o, &format!("write of block {b}"));
        let want = pattern(9000 + *b, BLOCK);
        assert!(
            read_image(&env.img, *b * BLOCK as u64, BLOCK) == want,
            "block {b}"
        );
    }
    assert!(dev.error().is_none(), "{:?}", dev.error());
    assert_eq!(dev.reconnects(), 0);
    assert!(dev.is_connected());
    dev.close().unwrap();
    drop(child);
}

/// A ticket and, once it completed, its result.
struct Outcome {
    ticket: xenpv_blkfront::Ticket,
    result: Option<xenpv_blkfront::Result<Vec<u8>>>,
}

impl Outcome {
    fn new(ticket: xenpv_blkfront::Ticket) -> Self {
        Outcome {
            ticket,
            result: None,
        }
    }

    /// Whether it completed (without blocking).
    fn done(&mut self) -> bool {
        if self.result.is_none() {
            self.result = self.ticket.try_wait();
        }
        self.result.is_some()
    }

    /// Waits for its result.
    fn wait(self) -> xenpv_blkfront::Result<Vec<u8>> {
        match self.result {
            Some(r) => r,
            None => self.ticket.wait(),
        }
    }
}

#[test]
fn backend_restart_reissues_in_flight() {
    restart(true);
}

/// The same without any toolstack help: the new backend finds the frontend still Connected to
/// the dead instance, refuses to attach to that ring (it could replay stale requests), offers
/// the device again, and the frontend renegotiates.
#[test]
fn backend_restart_without_the_toolstack() {
    restart(false);
}

fn restart(mark_closed: bool) {
    /// 64 KiB writes, the last `AFTER_FREEZE` of them submitted to the frozen backend.
    const WRITES: u64 = 200;
    const AFTER_FREEZE: u64 = 8;
    let env = env(16 << 20);
    let spawn = || {
        Command::new(std::env::current_exe().unwrap())
            .args(["backend_child", "--exact", "--ignored", "--nocapture"])
            .env("BLKFRONT_TEST_ROOT", &env.root)
            .env("BLKFRONT_TEST_BE", &env.be)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = spawn();
    let dev = connect(
        &env,
        Options {
            queues: 2,
            ring_order: 1,
            ..Options::default()
        },
    );
    // Many writes in flight; once the backend has answered one of them, it is frozen
    // (SIGSTOP: it answers nothing more) and a last few writes are submitted, then it dies.
    // Those last writes can only be answered by a new backend, so requests are certainly in
    // flight unanswered when the rings go: the frontend issues from its backlog whenever a
    // slot is free, so either they are on the ring or the ring is full.
    let mut tickets = Vec::new();
    for i in 0..WRITES {
        if i == WRITES - AFTER_FREEZE {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !tickets.iter_mut().any(|o: &mut Outcome| o.done()) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the backend answers nothing (frontend error: {:?})",
                    dev.error()
                );
                std::thread::yield_now();
            }
            // SAFETY: kill(2) on our own child's pid, not yet reaped.
            assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) }, 0);
        }
        let data = pattern(5000 + i, 65536);
        tickets.push(Outcome::new(dev.submit_ticket(Op::Write {
            offset: i * 65536,
            data,
        })));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(dev.reissued(), 0, "nothing re-issued before a reconnect");
    if mark_closed {
        // The toolstack (systemd) notices and marks the backend Closed.
        env.dom0
            .write_str(&format!("{}/state", env.be), "6")
            .unwrap();
        xenbus::wait_for_peer_state(
            &env.dom0,
            &env.fe,
            |s| s == XenbusState::Initialising,
            Duration::from_secs(10),
        )
        .unwrap();
    }
    // A new backend.
    let _b = start_backend(&env, Default::default());
    for (i, o) in tickets.into_iter().enumerate() {
        o.wait()
            .unwrap_or_else(|e| panic!("write {i} failed after the restart: {e}"));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(dev.reconnects() >= 1 && dev.is_connected()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(dev.reconnects() >= 1);
    assert!(dev.is_connected());
    // The writes the killed backend left unanswered were sent again to the new one.
    let reissued = dev.reissued();
    eprintln!("{reissued} requests re-issued after the restart");
    assert!(
        reissued >= 1,
        "no request was re-issued: nothing was in flight when the backend died"
    );
    for i in 0..WRITES {
        let want = pattern(5000 + i, 65536);
        assert_eq!(read_image(&env.img, i * 65536, 65536), want, "block {i}");
        let mut back = vec![0; 65536];
        dev.read_at(&mut back, i * 65536).unwrap();
        assert_eq!(back, want);
    }
    dev.close().unwrap();
}

/// An export whose requests can be held at a gate (and then forgotten, as the I/O of a killed
/// process that never issued it).
struct Gated<E: BlockExport> {
    disk: E,
    hold: AtomicBool,
    held: Mutex<Vec<(Request, Completion)>>,
}

impl<E: BlockExport> Gated<E> {
    fn new(disk: E) -> Arc<Self> {
        Arc::new(Gated {
            disk,
            hold: AtomicBool::new(false),
            held: Mutex::new(Vec::new()),
        })
    }

    fn close(&self) {
        self.hold.store(true, Ordering::SeqCst);
    }

    fn wait_held(&self, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let held = self.held.lock().unwrap().len();
            if held >= n {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "only {held} of {n} requests reached the storage"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Forgets what is held and lets everything through from now on.
    fn open(&self) {
        self.hold.store(false, Ordering::SeqCst);
        self.held.lock().unwrap().clear();
    }
}

impl<E: BlockExport> AsyncBlockExport for Gated<E> {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn flags(&self) -> ExportFlags {
        self.disk.flags()
    }
    fn submit(&self, request: Request, done: Completion) {
        let mut held = self.held.lock().unwrap();
        if self.hold.load(Ordering::SeqCst) {
            held.push((request, done));
        } else {
            drop(held);
            run_sync(&self.disk, request, done);
        }
    }
}

/// Opens the gate when dropped.
struct OpenOnDrop<E: BlockExport>(Arc<Gated<E>>);

impl<E: BlockExport> Drop for OpenOnDrop<E> {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// The toolstack removing the device (libxl's `online=0`, then the backend's nodes gone) is not
/// a backend restart: the frontend stops, reports the disk gone and goes Closing, instead of
/// trying to reconnect for ever (found by the real-Xen rig, where `xenpv-blkfront` kept
/// retrying after `xl block-detach`-style removal and never exited).
#[test]
fn toolstack_removing_the_device_is_not_a_restart() {
    let env = env(1 << 20);
    let _b = start_backend(&env, Default::default());
    let dev = connect(&env, Options::default());
    dev.write_at(&pattern(1, 4096), 0).unwrap();
    env.dom0
        .write_str(&format!("{}/online", env.be), "0")
        .unwrap();
    env.dom0.rm(&env.be).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dev.error().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        dev.error().is_some(),
        "the frontend did not notice that the device was removed"
    );
    xenbus::wait_for_peer_state(
        &env.dom0,
        &env.fe,
        |s| matches!(s, XenbusState::Closing | XenbusState::Closed),
        Duration::from_secs(10),
    )
    .expect("the frontend closes the removed device");
    assert_eq!(dev.reconnects(), 0);
    let _ = dev.close();
}
