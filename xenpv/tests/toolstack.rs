//! The toolstack verbs against our xenstored on a temporary local-platform state directory:
//! exactly libxl's nodes and permissions, detach through the backend's state machine, and clear
//! errors for bad specifications.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use xenpv_xenstore::{Access, Client, Listener, Perm, Server, XenbusState, XsOps};

// Fields drop in order: the listeners before the directory holding their sockets.
struct Platform {
    _listeners: Vec<Listener>,
    server: Server,
    root: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn platform(domains: &[u32]) -> Platform {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let server = Server::new();
    let mut listeners = Vec::new();
    for &d in std::iter::once(&0).chain(domains) {
        std::fs::create_dir_all(root.join(format!("dom{d}"))).unwrap();
        listeners.push(
            server
                .bind(root.join(format!("dom{d}/xenstore.sock")), d)
                .unwrap(),
        );
        if d != 0 {
            let path = format!("/local/domain/{d}");
            server.mkdir(&path).unwrap();
            server
                .set_perms(
                    &path,
                    &[Perm::new(d, Access::None), Perm::new(0, Access::Read)],
                )
                .unwrap();
            server
                .write(&format!("{path}/name"), format!("guest{d}").as_bytes())
                .unwrap();
        }
    }
    Platform {
        _dir: dir,
        root,
        server,
        _listeners: listeners,
    }
}

fn xenpv(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xenpv"))
        .arg("--platform")
        .arg("local")
        .arg("--state-dir")
        .arg(root)
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "xenpv failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn failed(out: Output) -> String {
    assert!(!out.status.success(), "xenpv should have failed");
    String::from_utf8(out.stderr).unwrap()
}

fn read(c: &Client, p: &str) -> String {
    c.read_string(p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

#[test]
fn attach_disk_writes_libxls_nodes_and_permissions() {
    let p = platform(&[5, 6]);
    let out = ok(xenpv(
        &p.root,
        &["attach-disk", "5", "target=/img.raw,vdev=xvda,access=rw"],
    ));
    assert_eq!(out.trim(), "/local/domain/5/device/vbd/51712");
    let dom0 = Client::connect_local(&p.root, 0).unwrap();
    let be = "/local/domain/0/backend/vbd/5/51712";
    let fe = "/local/domain/5/device/vbd/51712";
    for (k, v) in [
        ("frontend", fe),
        ("frontend-id", "5"),
        ("online", "1"),
        ("state", "1"),
        ("dev", "xvda"),
        ("mode", "w"),
        ("params", "/img.raw"),
        ("device-type", "disk"),
    ] {
        assert_eq!(read(&dom0, &format!("{be}/{k}")), v, "{k}");
    }
    for (k, v) in [
        ("backend", be),
        ("backend-id", "0"),
        ("state", "1"),
        ("virtual-device", "51712"),
    ] {
        assert_eq!(read(&dom0, &format!("{fe}/{k}")), v, "{k}");
    }
    assert_eq!(
        dom0.get_perms(be).unwrap(),
        [Perm::new(0, Access::None), Perm::new(5, Access::Read)]
    );
    assert_eq!(
        dom0.get_perms(fe).unwrap(),
        [Perm::new(5, Access::None), Perm::new(0, Access::Read)]
    );
    assert_eq!(
        dom0.get_perms(&format!("{fe}/state")).unwrap()[0],
        Perm::new(5, Access::None)
    );

    // The guest reads both directories and writes its own state; another guest sees nothing.
    let guest = Client::connect_local(&p.root, 5).unwrap();
    assert_eq!(read(&guest, &format!("{be}/params")), "/img.raw");
    guest.write_str(&format!("{fe}/state"), "3").unwrap();
    assert!(
        guest.write_str(&format!("{be}/state"), "4").is_err(),
        "the guest must not write the backend dir"
    );
    let other = Client::connect_local(&p.root, 6).unwrap();
    assert!(other.read(&format!("{be}/params")).is_err());
    assert!(other.read(&format!("{fe}/state")).is_err());

    // Twice: refused, naming the device.
    let err = failed(xenpv(
        &p.root,
        &["attach-disk", "5", "vdev=xvda,target=/other.raw"],
    ));
    assert!(
        err.contains("already exists") && err.contains("51712"),
        "{err}"
    );
}

#[test]
fn attach_nic_and_list() {
    let p = platform(&[7]);
    ok(xenpv(
        &p.root,
        &["attach-nic", "7", "mac=00:16:3e:00:00:01,bridge=xenbr0"],
    ));
    let out = ok(xenpv(
        &p.root,
        &["attach-nic", "7", "mac=00:16:3e:00:00:02"],
    ));
    assert_eq!(
        out.trim(),
        "/local/domain/7/device/vif/1",
        "the next free devid"
    );
    ok(xenpv(
        &p.root,
        &["attach-disk", "7", "/img.qcow2,qcow2,xvdb,ro"],
    ));
    let dom0 = Client::connect_local(&p.root, 0).unwrap();
    assert_eq!(
        read(&dom0, "/local/domain/0/backend/vif/7/0/mac"),
        "00:16:3e:00:00:01"
    );
    assert_eq!(
        read(&dom0, "/local/domain/7/device/vif/0/mac"),
        "00:16:3e:00:00:01"
    );
    assert_eq!(
        read(&dom0, "/local/domain/0/backend/vif/7/0/bridge"),
        "xenbr0"
    );
    assert_eq!(read(&dom0, "/local/domain/0/backend/vbd/7/51728/mode"), "r");
    let list = ok(xenpv(&p.root, &["list"]));
    assert!(
        list.contains("vif") && list.contains("00:16:3e:00:00:02"),
        "{list}"
    );
    assert!(
        list.contains("51728") && list.contains("/img.qcow2"),
        "{list}"
    );
}

#[test]
fn detach_goes_through_the_backend() {
    let p = platform(&[5]);
    ok(xenpv(
        &p.root,
        &["attach-disk", "5", "vdev=xvdb,target=/b.raw"],
    ));
    let be = "/local/domain/0/backend/vbd/5/51728";
    // A backend that closes the device when asked.
    let backend = Client::connect_local(&p.root, 0).unwrap();
    let watch = backend.watch(&format!("{be}/state")).unwrap();
    let t = std::thread::spawn(move || loop {
        let _ = watch.next_timeout(Duration::from_secs(5));
        if let Ok(state) = xenpv_xenstore::xenbus::read_state(&backend, be) {
            if state == XenbusState::Closing {
                assert_eq!(read(&backend, &format!("{be}/online")), "0");
                backend.write_str(&format!("{be}/state"), "6").unwrap();
                return;
            }
        }
    });
    ok(xenpv(&p.root, &["detach", "5", "xvdb"]));
    t.join().unwrap();
    let dom0 = Client::connect_local(&p.root, 0).unwrap();
    assert!(!dom0.exists(be).unwrap());
    assert!(!dom0.exists("/local/domain/5/device/vbd/51728").unwrap());
    assert!(
        p.server.read("/local/domain/5/name").is_ok(),
        "the domain itself stays"
    );
}

#[test]
fn detach_without_a_backend_times_out_unless_forced() {
    let p = platform(&[5]);
    ok(xenpv(
        &p.root,
        &["attach-nic", "5", "mac=00:16:3e:00:00:09"],
    ));
    let err = failed(xenpv(&p.root, &["detach", "5", "vif/0", "--timeout", "1"]));
    assert!(err.contains("--force"), "{err}");
    ok(xenpv(&p.root, &["detach", "5", "vif/0", "--force"]));
    let dom0 = Client::connect_local(&p.root, 0).unwrap();
    assert!(!dom0.exists("/local/domain/0/backend/vif/5/0").unwrap());
    let err = failed(xenpv(&p.root, &["detach", "5", "vif/0"]));
    assert!(err.contains("no device vif/0"), "{err}");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let p = platform(&[5]);
    for (args, needle) in [
        (
            vec!["attach-disk", "5", "vdev=xvda,colour=red,target=/x"],
            "unknown disk parameter `colour`",
        ),
        (vec!["attach-disk", "5", "vdev=vda,target=/x"], "xvdX"),
        (vec!["attach-disk", "5", "vdev=xvda"], "no target"),
        (
            vec!["attach-disk", "9", "vdev=xvda,target=/x"],
            "domain 9 does not exist",
        ),
        (vec!["attach-nic", "5", "mac=zz:16:3e:00:00:01"], "bad mac"),
        (vec!["attach-nic", "5", "rate=fast"], "bad rate"),
        (
            vec!["attach-disk", "5", "vdev=xvda,backend=nosuch,target=/x"],
            "backend domain `nosuch` not found",
        ),
    ] {
        let err = failed(xenpv(&p.root, &args));
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let missing = tempfile::tempdir().unwrap();
    let err = failed(xenpv(missing.path(), &["list"]));
    assert!(err.contains("xenpv local"), "{err}");
}
