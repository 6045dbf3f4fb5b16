//! The daemon in-process: the state-directory lock, domid allocation and validation, the control
//! protocol (including hostile lines), and cleanup on shutdown.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use xenpv_local::control::Control;
use xenpv_local::{Config, Daemon, Error, MAX_DOMID};

fn start(root: &Path) -> Daemon {
    Daemon::start(Config {
        state_dir: Some(root.to_path_buf()),
        grant: xenpv_grant::local::BrokerConfig {
            grant_entries: 64,
            frames: 64,
            huge_pages: false,
        },
        ..Config::default()
    })
    .unwrap()
}

#[test]
fn one_daemon_per_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path());
    let e = Daemon::start(Config {
        state_dir: Some(dir.path().to_path_buf()),
        ..Config::default()
    })
    .unwrap_err();
    assert!(matches!(e, Error::AlreadyRunning { pid: Some(p), .. } if p == std::process::id()));
    assert!(e.to_string().contains("pass another --state-dir"), "{e}");
    // The refused start did not disturb the running one.
    assert_eq!(
        Control::connect(dir.path()).unwrap().ping().unwrap(),
        std::process::id()
    );
    d.shutdown();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // And the directory is free again.
    start(dir.path());
}

#[test]
fn domids_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path());
    let mut c = Control::connect(dir.path()).unwrap();
    assert_eq!(c.create(None, Some("a")).unwrap(), 1);
    assert_eq!(c.create(Some(3), None).unwrap(), 3);
    assert_eq!(c.create(None, None).unwrap(), 2);
    assert_eq!(c.create(None, None).unwrap(), 4);
    c.destroy(2).unwrap();
    assert_eq!(c.create(None, Some("b")).unwrap(), 2, "lowest free domid");
    let names: Vec<_> = c
        .list()
        .unwrap()
        .into_iter()
        .map(|i| (i.domid, i.name))
        .collect();
    assert_eq!(
        names,
        [
            (0, "Domain-0"),
            (1, "a"),
            (2, "b"),
            (3, "dom3"),
            (4, "dom4")
        ]
        .map(|(d, n)| (d, n.to_owned()))
    );
    for (domid, name, want) in [
        (Some(0), None, "domain 0 belongs to the daemon"),
        (Some(MAX_DOMID + 1), None, "out of range"),
        (Some(1), None, "domain 1 already exists"),
        (None, Some("a"), "already used by domain 1"),
        (None, Some(&"x".repeat(65)[..]), "bad domain name"),
        (None, Some("a\tb"), "bad domain name"),
    ] {
        let e = c.create(domid, name).unwrap_err().to_string();
        assert!(e.contains(want), "{domid:?} {name:?}: {e}");
    }
    assert!(c.destroy(0).unwrap_err().to_string().contains("domain 0"));
    assert!(c
        .destroy(9)
        .unwrap_err()
        .to_string()
        .contains("no domain 9"));
    assert_eq!(d.create_domain(Some(MAX_DOMID), None).unwrap(), MAX_DOMID);
    // In-process and over the socket see the same registry.
    assert_eq!(d.domains().len(), 6);
    assert_eq!(d.xenstore().read("/local/domain/2/name").unwrap(), b"b");
}

#[test]
fn hostile_control_lines_get_an_error_and_a_hangup() {
    let dir = tempfile::tempdir().unwrap();
    let _d = start(dir.path());
    for bad in [
        b"reboot\n".to_vec(),
        b"destroy x\n".to_vec(),
        b"create domid=1 domid\n".to_vec(),
        vec![b'a'; 5000],
        b"\xff\xfe\n".to_vec(),
    ] {
        let mut s = UnixStream::connect(dir.path().join("control.sock")).unwrap();
        let _ = s.write_all(&bad);
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("err "), "{line:?}");
        line.clear();
        assert_eq!(r.read_line(&mut line).unwrap(), 0, "connection closed");
    }
    // The daemon still serves.
    assert_eq!(
        Control::connect(dir.path())
            .unwrap()
            .create(None, None)
            .unwrap(),
        1
    );
}

#[test]
fn destroy_cuts_the_domains_connections() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path());
    let id = d.create_domain(None, Some("g")).unwrap();
    let mut conns: Vec<UnixStream> = ["grant.sock", "evtchn.sock"]
        .iter()
        .map(|s| UnixStream::connect(dir.path().join(format!("dom{id}/{s}"))).unwrap())
        .collect();
    // An established xenstore connection (one round trip: the server has registered it).
    let xs = xenpv_xenstore::Client::connect_local(dir.path(), id).unwrap();
    xenpv_xenstore::XsOps::read(&xs, "/local/domain/1/name").unwrap();
    d.destroy_domain(id).unwrap();
    for c in &mut conns {
        c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut b = [0u8; 1];
        let n = std::io::Read::read(c, &mut b);
        assert!(matches!(n, Ok(0)) || n.is_err(), "{n:?}");
    }
    assert!(xenpv_xenstore::XsOps::read(&xs, "/local/domain/1/name").is_err());
    assert!(!dir.path().join("dom1").exists());
}
