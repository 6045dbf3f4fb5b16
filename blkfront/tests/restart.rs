//! Backend restart: our blkback runs in a child process (this test binary re-executed), is
//! killed with SIGKILL in the middle of I/O, the toolstack marks it Closed, a new backend starts;
//! the frontend renegotiates, re-issues what was in flight, and every acknowledged write is
//! intact.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use xenpv_blkfront::{Op, Options};
use xenpv_xenstore::{xenbus, XenbusState, XsOps};

/// The child: serves the device named in the environment until killed.
#[test]
#[ignore = "helper run by backend_restart_reissues_in_flight"]
fn backend_child() {
    let Ok(root) = std::env::var("BLKFRONT_TEST_ROOT") else {
        return;
    };
    let be = std::env::var("BLKFRONT_TEST_BE").unwrap();
    let p = backend_platform(std::path::Path::new(&root));
    let _ = xenpv_blkback::device::serve(&p, &be, &Default::default());
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
    // Many writes in flight, then the backend dies.
    let mut tickets = Vec::new();
    for i in 0..200u64 {
        let data = pattern(5000 + i, 65536);
        tickets.push(dev.submit_ticket(Op::Write {
            offset: i * 65536,
            data,
        }));
    }
    std::thread::sleep(Duration::from_millis(2));
    child.kill().unwrap();
    child.wait().unwrap();
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
    for t in tickets {
        t.wait().expect("write completed after the restart");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(dev.reconnects() >= 1 && dev.is_connected()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(dev.reconnects() >= 1);
    assert!(dev.is_connected());
    for i in 0..200u64 {
        let want = pattern(5000 + i, 65536);
        assert_eq!(read_image(&env.img, i * 65536, 65536), want, "block {i}");
        let mut back = vec![0; 65536];
        dev.read_at(&mut back, i * 65536).unwrap();
        assert_eq!(back, want);
    }
    dev.close().unwrap();
}
