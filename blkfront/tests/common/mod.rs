//! The local platform in-process, a disk image attached to domain 1, our blkback on a thread.
#![allow(dead_code)]

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use xenpv_blkfront::{BlkFront, Options, Platform};
use xenpv_evtchn::local::LocalEvtchn;
use xenpv_grant::local::LocalGrants;
use xenpv_xenstore::Client;

pub type Front = BlkFront<LocalGrants, LocalEvtchn>;

pub struct Env {
    pub daemon: xenpv_local::Daemon,
    pub root: PathBuf,
    pub img: PathBuf,
    pub dom0: Client,
    pub fe: String,
    pub be: String,
    /// The `qemu-nbd` serving the image, for [`Backing::QemuNbd`].
    pub nbd: Option<KillOnDrop>,
    pub _dir: tempfile::TempDir,
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn env(size: usize) -> Env {
    env_with(size, Backing::File, "")
}

/// What backs the disk: the image file itself, or the image file served by `qemu-nbd`
/// (the disk's target is then its `nbd+unix://` URI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    File,
    QemuNbd,
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fails (does not skip) when a tool is missing, naming the Debian package.
pub fn need(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "{tool} is not installed: apt-get install {package}");
}

/// `qemu-nbd --persistent` serving the raw file `img` on the Unix socket `socket`.
pub fn qemu_nbd(img: &Path, socket: &Path) -> KillOnDrop {
    need("qemu-nbd", "qemu-utils");
    let child = std::process::Command::new("qemu-nbd")
        .args(["--persistent", "--shared=8", "-f", "raw", "--socket"])
        .arg(socket)
        .arg(img)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-nbd did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    KillOnDrop(child)
}

/// Like [`env`], with the image behind `backing` and `extra` options (`direct-io-safe,`,
/// `access=ro,`…, each followed by a comma) in the disk spec.
pub fn env_with(size: usize, backing: Backing, extra: &str) -> Env {
    let dir = tempfile::tempdir().unwrap();
    env_in(dir, size, backing, extra)
}

/// Like [`env_with`], in the given directory.
pub fn env_in(dir: tempfile::TempDir, size: usize, backing: Backing, extra: &str) -> Env {
    env_pages(dir, size, backing, extra, false)
}

/// Like [`env_in`], with the guest's memory in 2 MiB pages (`huge_pages`; needs root).
pub fn env_pages(
    dir: tempfile::TempDir,
    size: usize,
    backing: Backing,
    extra: &str,
    huge_pages: bool,
) -> Env {
    let root = dir.path().join("xenpv");
    let mut cfg = xenpv_local::Config {
        state_dir: Some(root.clone()),
        ..Default::default()
    };
    cfg.grant.huge_pages = huge_pages;
    let daemon = xenpv_local::Daemon::start(cfg).unwrap();
    assert_eq!(daemon.create_domain(Some(1), Some("guest1")).unwrap(), 1);
    let img = dir.path().join("disk.img");
    std::fs::write(&img, pattern(1, size)).unwrap();
    let dom0 = Client::connect_local(&root, 0).unwrap();
    let (target, nbd) = match backing {
        Backing::File => (img.display().to_string(), None),
        Backing::QemuNbd => {
            let sock = dir.path().join("qemu-nbd.sock");
            let server = qemu_nbd(&img, &sock);
            (
                format!("nbd+unix:///?socket={}", sock.display()),
                Some(server),
            )
        }
    };
    // Read-write unless `extra` says otherwise (`access=ro,`).
    let access = if extra.contains("access=") {
        ""
    } else {
        "access=rw,"
    };
    let nodes = xenpv::toolstack::attach_disk(
        &dom0,
        1,
        &format!("vdev=xvda,{access}{extra}target={target}"),
    )
    .unwrap();
    Env {
        daemon,
        root,
        img,
        dom0,
        fe: nodes.frontend_path,
        be: nodes.backend_path,
        nbd,
        _dir: dir,
    }
}

pub fn backend_platform(root: &Path) -> xenpv_blkback::device::Platform<LocalGrants, LocalEvtchn> {
    let ev = root.join("dom0/evtchn.sock");
    xenpv_blkback::device::Platform {
        xs: Client::connect_local(root, 0).unwrap(),
        grants: Arc::new(LocalGrants::connect(root.join("dom0/grant.sock")).unwrap()),
        open_evtchn: Arc::new(move || LocalEvtchn::connect(&ev)),
    }
}

/// Runs our blkback for the device on a thread (until the device is unplugged).
pub fn start_backend(env: &Env, cfg: xenpv_blkback::device::Config) -> std::thread::JoinHandle<()> {
    let p = backend_platform(&env.root);
    let be = env.be.clone();
    std::thread::spawn(move || {
        if let Err(e) = xenpv_blkback::device::serve(&p, &be, &cfg) {
            eprintln!("backend: {e}");
        }
    })
}

/// [`start_backend`], also returning the device's statistics (its counters of requests
/// answered), once the backend has opened the device.
pub fn start_backend_with_stats(
    env: &Env,
    cfg: xenpv_blkback::device::Config,
) -> (
    std::thread::JoinHandle<()>,
    Arc<xenpv_blkback::queue::Stats>,
) {
    let p = backend_platform(&env.root);
    let be = env.be.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let r = xenpv_blkback::device::serve_with_stats(&p, &be, &cfg, move |s| {
            let _ = tx.send(s);
        });
        if let Err(e) = r {
            eprintln!("backend: {e}");
        }
    });
    let stats = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the backend did not open the device");
    (t, stats)
}

pub fn front_platform(root: &Path) -> Platform<LocalGrants, LocalEvtchn> {
    let ev = root.join("dom1/evtchn.sock");
    Platform {
        xs: Client::connect_local(root, 1).unwrap(),
        grants: Arc::new(LocalGrants::connect(root.join("dom1/grant.sock")).unwrap()),
        open_evtchn: Arc::new(move || LocalEvtchn::connect(&ev)),
    }
}

pub fn connect(env: &Env, opts: Options) -> Front {
    BlkFront::connect(front_platform(&env.root), &env.fe, opts).unwrap()
}

pub fn read_image(img: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(img).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// The `xenpv-blkfront` binary exporting the disk of `env` over NBD; SIGTERM on [`Export::close`]
/// (or SIGKILL on drop).
pub struct Export {
    child: KillOnDrop,
    pub uri: String,
    /// The binary's ready line: the disk and what was negotiated (queues, ring order,
    /// persistent grants, segments per request).
    pub ready: String,
}

impl Export {
    /// Starts the binary with extra `args` (`--queues 2`, `--no-persistent`…) and waits until
    /// it says it is ready.
    pub fn start(env: &Env, args: &[&str]) -> Export {
        use std::io::BufRead;
        let sock = env.root.join("disk.nbd");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_xenpv-blkfront"))
            .args(["--platform", "local", "--state-dir"])
            .arg(&env.root)
            .args(["--domid", "1", "--device", "xvda", "--nbd-socket"])
            .arg(&sock)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.contains("ready"), "xenpv-blkfront: {line:?}");
        eprintln!("{}", line.trim());
        Export {
            child: KillOnDrop(child),
            uri: format!("nbd+unix:///?socket={}", sock.display()),
            ready: line.trim().to_string(),
        }
    }

    /// SIGTERM; the binary must close the device cleanly and exit 0.
    pub fn close(mut self) {
        // SAFETY: kill(2) on our own child's pid, not yet reaped.
        unsafe { libc::kill(self.child.0.id() as i32, libc::SIGTERM) };
        let status = self.child.0.wait().unwrap();
        assert!(status.success(), "xenpv-blkfront exited with {status}");
    }
}

/// A backend played by a test: what it holds once the frontend is connected to it.
pub struct Scripted {
    pub xs: Client,
    pub fe: String,
    pub be: String,
    pub ev: LocalEvtchn,
    /// Our end of the frontend's event channel.
    pub port: xenpv_evtchn::Port,
    /// The frontend's ring page, mapped writable.
    pub map: xenpv_grant::local::LocalMapping,
}

/// Plays dom0's side of the handshake for a 1 MiB disk of 512-byte sectors: InitWait, waits
/// for the frontend's Initialised, maps its one-page ring, binds its event channel, writes the
/// disk's properties and switches to Connected. The caller then reads and writes the ring raw.
pub fn scripted_backend(root: &Path, fe: &str, be: &str) -> Scripted {
    scripted_backend_with(root, fe, be, &[])
}

/// [`scripted_backend`], first writing `keys` (relative to the backend's directory) before
/// InitWait: features the frontend reads (`feature-persistent`,
/// `feature-max-indirect-segments`), or disk properties that replace the 1 MiB disk's.
pub fn scripted_backend_with(root: &Path, fe: &str, be: &str, keys: &[(&str, &str)]) -> Scripted {
    use std::time::Duration;
    use xenpv_evtchn::EventChannel;
    use xenpv_grant::{Access, GrantMap};
    use xenpv_xenstore::{xenbus, XenbusState, XsOps};
    let xs = Client::connect_local(root, 0).unwrap();
    let grants = LocalGrants::connect(root.join("dom0/grant.sock")).unwrap();
    let ev = LocalEvtchn::connect(root.join("dom0/evtchn.sock")).unwrap();
    for (k, v) in keys {
        xs.write_str(&format!("{be}/{k}"), v).unwrap();
    }
    xenbus::switch_state(&xs, be, XenbusState::InitWait).unwrap();
    xenbus::wait_for_peer_state(
        &xs,
        fe,
        |s| s == XenbusState::Initialised,
        Duration::from_secs(10),
    )
    .unwrap();
    let read = |k: &str| -> u32 {
        xs.read_string(&format!("{fe}/{k}"))
            .unwrap()
            .parse()
            .unwrap()
    };
    let (gref, port) = (read("ring-ref"), read("event-channel"));
    let map = grants.map(&[(1, gref)], Access::Writable).unwrap();
    let port = ev.bind_interdomain(1, port).unwrap();
    for (k, v) in [("sectors", "2048"), ("info", "0"), ("sector-size", "512")] {
        if !keys.iter().any(|(key, _)| *key == k) {
            xs.write_str(&format!("{be}/{k}"), v).unwrap();
        }
    }
    xenbus::switch_state(&xs, be, XenbusState::Connected).unwrap();
    Scripted {
        xs,
        fe: fe.to_string(),
        be: be.to_string(),
        ev,
        port,
        map,
    }
}

/// Runs `script` as the backend of `env`'s disk on a thread, after [`scripted_backend`]'s
/// handshake. Afterwards it keeps the ring mapped until the frontend is Closing or Closed (as a
/// hostile peer would), then switches to Closed; the thread returns what `script` returned.
pub fn spawn_scripted<T: Send + 'static>(
    env: &Env,
    script: impl FnOnce(&Scripted) -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    spawn_scripted_with(env, &[], script)
}

/// [`spawn_scripted`] with [`scripted_backend_with`]'s `keys`.
pub fn spawn_scripted_with<T: Send + 'static>(
    env: &Env,
    keys: &[(&'static str, &'static str)],
    script: impl FnOnce(&Scripted) -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    use std::time::Duration;
    use xenpv_xenstore::{xenbus, XenbusState};
    let root = env.root.clone();
    let (fe, be) = (env.fe.clone(), env.be.clone());
    let keys = keys.to_vec();
    std::thread::spawn(move || {
        let s = scripted_backend_with(&root, &fe, &be, &keys);
        let out = script(&s);
        let _ = xenbus::wait_for_peer_state(
            &s.xs,
            &s.fe,
            |st| st == XenbusState::Closing || st == XenbusState::Closed,
            Duration::from_secs(10),
        );
        let _ = xenbus::switch_state(&s.xs, &s.be, XenbusState::Closed);
        out
    })
}
