//! The whole seam, two processes: a frontend (domain 1) grants a ring page and publishes
//! `ring-ref` and `event-channel` in xenstore; a backend (dom0) maps it, binds the event
//! channel and answers requests through the ring crate; the xenbus state machine takes both to
//! Connected and back to Closed. The local platform daemon (`xenpv-local`) runs in this test
//! process on a temporary state directory.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use xenpv_xenstore::{Client, XenbusState, XsOps};

struct Platform {
    daemon: xenpv_local::Daemon,
    root: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// The local platform daemon (in this process) with domain 1.
fn platform() -> Platform {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("xenpv");
    let daemon = xenpv_local::Daemon::start(xenpv_local::Config {
        state_dir: Some(root.clone()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(daemon.create_domain(Some(1), Some("guest1")).unwrap(), 1);
    Platform {
        daemon,
        root,
        _dir: dir,
    }
}

fn spawn(bin: &str, args: &[&str]) -> std::process::Child {
    Command::new(bin)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: std::process::Child, name: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut child = child;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn run_pair(root: &Path, requests: u64) {
    let root_s = root.to_str().unwrap();
    let n = requests.to_string();
    let back = spawn(
        env!("CARGO_BIN_EXE_seam-backend"),
        &[root_s, "0", "1", "51712"],
    );
    let front = spawn(
        env!("CARGO_BIN_EXE_seam-frontend"),
        &[root_s, "1", "51712", &n],
    );
    let f = finish(front, "seam-frontend");
    let b = finish(back, "seam-backend");
    assert!(
        f.contains(&format!("frontend: {requests} responses")),
        "{f}"
    );
    assert!(
        f.contains("frontend: revoke Revoked"),
        "the backend unmapped before the revoke: {f}"
    );
    assert!(b.contains(&format!("backend: {requests} answered")), "{b}");
    let dom0 = Client::connect_local(root, 0).unwrap();
    let be = "/local/domain/0/backend/vbd/1/51712";
    let fe = "/local/domain/1/device/vbd/51712";
    assert_eq!(
        xenpv_xenstore::xenbus::read_state(&dom0, be).unwrap(),
        XenbusState::Closed
    );
    assert_eq!(
        xenpv_xenstore::xenbus::read_state(&dom0, fe).unwrap(),
        XenbusState::Closed
    );
}

#[test]
fn frontend_and_backend_processes_connect_serve_and_close() {
    let p = platform();
    let dom0 = Client::connect_local(&p.root, 0).unwrap();
    xenpv::toolstack::attach_disk(&dom0, 1, "vdev=xvda,target=/dev/null").unwrap();
    run_pair(&p.root, 1000);

    // Reconnect: the frontend comes back (Initialising) and a new backend process serves it.
    let fe = "/local/domain/1/device/vbd/51712";
    let be = "/local/domain/0/backend/vbd/1/51712";
    dom0.write_str(&format!("{fe}/state"), "1").unwrap();
    dom0.write_str(&format!("{be}/state"), "1").unwrap();
    run_pair(&p.root, 100);

    // The toolstack detaches the closed device without waiting.
    xenpv::toolstack::detach(&dom0, 1, "xvda", Duration::from_secs(2), false).unwrap();
    assert!(!dom0.exists(fe).unwrap() && !dom0.exists(be).unwrap());
    p.daemon.destroy_domain(1).unwrap();
}
