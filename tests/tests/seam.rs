//! The whole seam, two processes: a frontend (domain 1) grants a ring page and publishes
//! `ring-ref` and `event-channel` in xenstore; a backend (dom0) maps it, binds the event
//! channel and answers requests through the ring crate; the xenbus state machine takes both to
//! Connected and back to Closed. The platform (xenstored, grant and event-channel brokers) runs
//! in this test process on a temporary state directory, with the socket layout of
//! docs/local-platform.md.

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use xenpv_tests::socket;
use xenpv_xenstore::{Access, Client, Listener, Perm, Server, XenbusState, XsOps};

struct Platform {
    _xs_listeners: Vec<Listener>,
    grants: xenpv_grant::local::Broker,
    root: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn platform(domains: &[u32]) -> Platform {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let xs = Server::new();
    let grants = xenpv_grant::local::Broker::new(Default::default());
    let evtchn = std::sync::Arc::new(xenpv_evtchn::local::Broker::new(64));
    let mut listeners = Vec::new();
    for &d in domains {
        std::fs::create_dir_all(root.join(format!("dom{d}"))).unwrap();
        listeners.push(xs.bind(socket(&root, d, "xenstore.sock"), d).unwrap());
        let dom = d as u16;
        grants.create_domain(dom).unwrap();
        grants.spawn_listener(
            UnixListener::bind(socket(&root, d, "grant.sock")).unwrap(),
            dom,
        );
        evtchn.create_domain(dom).unwrap();
        let l = UnixListener::bind(socket(&root, d, "evtchn.sock")).unwrap();
        let broker = evtchn.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(conn) = conn else { break };
                let b = broker.clone();
                std::thread::spawn(move || b.serve(conn, dom));
            }
        });
        if d != 0 {
            let home = format!("/local/domain/{d}");
            xs.mkdir(&home).unwrap();
            xs.set_perms(
                &home,
                &[Perm::new(d, Access::None), Perm::new(0, Access::Read)],
            )
            .unwrap();
            xs.introduce_domain(d);
        }
    }
    Platform {
        _xs_listeners: listeners,
        grants,
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

fn run_pair(p: &Platform, root: &Path, requests: u64) {
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
    let gref: u32 = dom0
        .read_string(&format!("{fe}/ring-ref"))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        !p.grants.is_allocated(1, gref),
        "the ring grant was released"
    );
}

#[test]
fn frontend_and_backend_processes_connect_serve_and_close() {
    let p = platform(&[0, 1]);
    let dom0 = Client::connect_local(&p.root, 0).unwrap();
    xenpv::toolstack::attach_disk(&dom0, 1, "vdev=xvda,target=/dev/null").unwrap();
    run_pair(&p, &p.root, 1000);

    // Reconnect: the frontend comes back (Initialising) and a new backend process serves it.
    let fe = "/local/domain/1/device/vbd/51712";
    let be = "/local/domain/0/backend/vbd/1/51712";
    dom0.write_str(&format!("{fe}/state"), "1").unwrap();
    dom0.write_str(&format!("{be}/state"), "1").unwrap();
    run_pair(&p, &p.root, 100);

    // The toolstack detaches the closed device without waiting.
    xenpv::toolstack::detach(&dom0, 1, "xvda", Duration::from_secs(2), false).unwrap();
    assert!(!dom0.exists(fe).unwrap() && !dom0.exists(be).unwrap());
}
