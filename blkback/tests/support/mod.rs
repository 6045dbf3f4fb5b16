//! Test support: the local platform with `xenpv-blkback` running as a process, disks attached
//! by the toolstack, and frontends played by the test. A [`Frontend`] speaks blkif correctly
//! through its [`FrontRing`], and can also write raw bytes into its ring page and raw values
//! into the shared `req_prod` (to play a hostile guest).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xenpv_evtchn::local::LocalEvtchn;
use xenpv_evtchn::{spin_then_wait, EventChannel, SpinBudget};
use xenpv_grant::local::{LocalGrants, LocalShared};
use xenpv_grant::{Access, GrantMemory, GrantShare, SharedPages};
use xenpv_ring::blkif::*;
use xenpv_ring::FrontRing;
use xenpv_xenstore::{xenbus, Client, XenbusState, XsOps};

/// Generous timeout for anything the backend must do.
pub const T: Duration = Duration::from_secs(30);
/// Size of every test disk.
pub const DISK_BYTES: usize = 1 << 20;
/// Size of every test disk in sectors.
pub const DISK_SECTORS: u64 = (DISK_BYTES / 512) as u64;

/// The backend process, killed on drop.
pub struct Backend(pub Child);
impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Backend {
    /// Seconds of CPU (user + system) the process has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).unwrap();
        // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        ticks as f64 / clock_ticks()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

fn clock_ticks() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(100.0)
}

/// The xenstore device id of `xvdX`.
pub fn devid(vdev: &str) -> u32 {
    let letter = vdev.as_bytes()[3];
    202 * 256 + u32::from(letter - b'a') * 16
}

/// A disk the toolstack attached.
pub struct Disk {
    pub domid: u32,
    pub vdev: String,
    pub image: PathBuf,
}

/// The local platform (domains 1, 2 and 3), `xenpv-blkback` as a process, and attached disks.
pub struct Platform {
    pub backend: Backend,
    pub disks: Vec<Disk>,
    pub root: PathBuf,
    // Dropped after the backend (field order): the platform outlives the process.
    daemon: Option<xenpv_local::Daemon>,
    _dir: tempfile::TempDir,
}

impl Drop for Platform {
    fn drop(&mut self) {
        let _ = self.backend.0.kill();
        let _ = self.backend.0.wait();
        if let Some(d) = self.daemon.take() {
            d.shutdown();
        }
    }
}

/// A local platform with its state in a new temporary directory (`<dir>/xp`, returned as the
/// root) and the domains `domids`, named `g<domid>`.
pub fn local_platform(
    domids: impl IntoIterator<Item = u32>,
) -> (tempfile::TempDir, PathBuf, xenpv_local::Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("xp");
    let daemon = xenpv_local::Daemon::start(xenpv_local::Config {
        state_dir: Some(root.clone()),
        ..Default::default()
    })
    .unwrap();
    for d in domids {
        daemon
            .create_domain(Some(d), Some(&format!("g{d}")))
            .unwrap();
    }
    (dir, root, daemon)
}

impl Platform {
    /// Starts the platform, attaches `disks` (`(domid, vdev)`, each a zeroed 1 MiB image) and
    /// starts `xenpv-blkback`.
    pub fn start(disks: &[(u32, &str)]) -> Platform {
        let disks: Vec<_> = disks.iter().map(|&(d, v)| (d, v, "")).collect();
        Self::start_with(&disks)
    }

    /// [`start`](Self::start), each disk `(domid, vdev, extra)` attached with the `extra`
    /// options (`access=ro,`…, each followed by a comma) in its spec.
    pub fn start_with(disks: &[(u32, &str, &str)]) -> Platform {
        let (dir, root, daemon) = local_platform(1..=3);
        let dom0 = Client::connect_local(&root, 0).unwrap();
        let mut attached = Vec::new();
        for &(domid, vdev, extra) in disks {
            let image = dir.path().join(format!("d{domid}-{vdev}.img"));
            std::fs::write(&image, vec![0u8; DISK_BYTES]).unwrap();
            xenpv::toolstack::attach_disk(
                &dom0,
                domid,
                &format!("vdev={vdev},{extra}target={}", image.display()),
            )
            .unwrap();
            attached.push(Disk {
                domid,
                vdev: vdev.into(),
                image,
            });
        }
        let child = Command::new(env!("CARGO_BIN_EXE_xenpv-blkback"))
            .args(["--platform", "local", "--state-dir"])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Platform {
            backend: Backend(child),
            disks: attached,
            root,
            daemon: Some(daemon),
            _dir: dir,
        }
    }

    /// Connects a frontend to `domid`'s `vdev`.
    pub fn frontend(&self, domid: u32, vdev: &str, persistent: bool) -> Frontend {
        Frontend::connect(&self.root, domid, vdev, persistent)
    }

    /// The image of `domid`'s `vdev`.
    pub fn image(&self, domid: u32, vdev: &str) -> &Path {
        &self
            .disks
            .iter()
            .find(|d| d.domid == domid && d.vdev == vdev)
            .unwrap()
            .image
    }
}

/// A blkif frontend played by the test.
pub struct Frontend {
    pub domid: u32,
    pub xs: Client,
    pub grants: LocalGrants,
    pub evtchn: LocalEvtchn,
    /// Frontend directory.
    pub fe: String,
    /// Backend directory.
    pub be: String,
    pub ring: FrontRing<Blkif, LocalShared>,
    pub port: u32,
    /// Two data pages granted (writable) to dom0.
    pub data: LocalShared,
    persistent: bool,
}

impl Frontend {
    /// Waits for the backend's InitWait and connects a fresh ring.
    pub fn connect(root: &Path, domid: u32, vdev: &str, persistent: bool) -> Frontend {
        let xs = Client::connect_local(root, domid).unwrap();
        let grants = LocalGrants::connect(LocalGrants::socket_path(root, domid as u16)).unwrap();
        let evtchn =
            LocalEvtchn::connect(xenpv_evtchn::local::socket_path(root, domid as u16)).unwrap();
        let id = devid(vdev);
        let fe = format!("/local/domain/{domid}/device/vbd/{id}");
        let be = format!("/local/domain/0/backend/vbd/{domid}/{id}");
        let data = grants.share(0, 2, Access::Writable).unwrap();
        let (ring, port) = Self::publish(&xs, &grants, &evtchn, &fe, &be, persistent);
        Frontend {
            domid,
            xs,
            grants,
            evtchn,
            fe,
            be,
            ring,
            port,
            data,
            persistent,
        }
    }

    fn publish(
        xs: &Client,
        grants: &LocalGrants,
        evtchn: &LocalEvtchn,
        fe: &str,
        be: &str,
        persistent: bool,
    ) -> (FrontRing<Blkif, LocalShared>, u32) {
        xenbus::wait_for_peer_state(xs, be, |s| s == XenbusState::InitWait, T).unwrap();
        let page = grants.share(0, 1, Access::Writable).unwrap();
        let gref = page.grefs()[0];
        let ring = FrontRing::<Blkif, _>::init(page).unwrap();
        let port = evtchn.bind_unbound(0).unwrap();
        xs.write_str(&format!("{fe}/ring-ref"), &gref.to_string())
            .unwrap();
        xs.write_str(&format!("{fe}/event-channel"), &port.to_string())
            .unwrap();
        xs.write_str(&format!("{fe}/protocol"), "x86_64-abi")
            .unwrap();
        xs.write_str(
            &format!("{fe}/feature-persistent"),
            if persistent { "1" } else { "0" },
        )
        .unwrap();
        xenbus::switch_state(xs, fe, XenbusState::Initialised).unwrap();
        xenbus::wait_for_peer_state(xs, be, |s| s == XenbusState::Connected, T).unwrap();
        xenbus::switch_state(xs, fe, XenbusState::Connected).unwrap();
        (ring, port)
    }

    /// The backend's state.
    pub fn backend_state(&self) -> XenbusState {
        xenbus::read_state(&self.xs, &self.be).unwrap()
    }

    /// A backend node, if present.
    pub fn backend_node(&self, key: &str) -> Option<String> {
        self.xs
            .read_opt(&format!("{}/{key}", self.be))
            .unwrap()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// After the backend closed the device: Closed, then Initialising, and a new ring and
    /// event channel once the backend is back at InitWait.
    pub fn reconnect(&mut self) {
        xenbus::switch_state(&self.xs, &self.fe, XenbusState::Closed).unwrap();
        xenbus::wait_for_peer_state(&self.xs, &self.be, |s| s == XenbusState::Closed, T).unwrap();
        let _ = self.evtchn.unbind(self.port);
        xenbus::switch_state(&self.xs, &self.fe, XenbusState::Initialising).unwrap();
        let (ring, port) = Self::publish(
            &self.xs,
            &self.grants,
            &self.evtchn,
            &self.fe,
            &self.be,
            self.persistent,
        );
        let old = std::mem::replace(&mut self.ring, ring);
        self.port = port;
        let _ = self.grants.revoke(old.into_memory());
    }

    /// After the backend closed the device: Closed, then Initialising, and once the backend is
    /// back at InitWait a valid ring and event channel but with `bad` frontend nodes written
    /// over them (`(key, Some(value))`, or `(key, None)` to remove it), then Initialised. The
    /// previous ring stays in place (the caller reconnects properly afterwards).
    pub fn publish_bad(&mut self, bad: &[(&str, Option<&str>)]) {
        xenbus::switch_state(&self.xs, &self.fe, XenbusState::Closed).unwrap();
        xenbus::wait_for_peer_state(&self.xs, &self.be, |s| s == XenbusState::Closed, T).unwrap();
        xenbus::switch_state(&self.xs, &self.fe, XenbusState::Initialising).unwrap();
        xenbus::wait_for_peer_state(&self.xs, &self.be, |s| s == XenbusState::InitWait, T).unwrap();
        for (k, v) in bad {
            let path = format!("{}/{k}", self.fe);
            match v {
                Some(v) => self.xs.write_str(&path, v).unwrap(),
                None => self.xs.rm(&path).unwrap(),
            }
        }
        xenbus::switch_state(&self.xs, &self.fe, XenbusState::Initialised).unwrap();
    }

    /// Removes frontend nodes (ignoring missing ones).
    pub fn remove_nodes(&self, keys: &[&str]) {
        for k in keys {
            let _ = self.xs.rm(&format!("{}/{k}", self.fe));
        }
    }

    /// Notifies the backend.
    pub fn notify(&self) {
        self.evtchn.notify(self.port).unwrap();
    }

    /// Produces `reqs`, pushes them and notifies.
    pub fn submit(&mut self, reqs: &[BlkifRequest]) {
        for r in reqs {
            self.ring.produce(*r).unwrap();
        }
        if self.ring.push_requests() {
            self.notify();
        }
    }

    /// Waits (up to `timeout`) for `n` responses.
    pub fn responses(&mut self, n: usize, timeout: Duration) -> Vec<BlkifResponse> {
        let mut got = Vec::new();
        let deadline = Instant::now() + timeout;
        let mut ports = Vec::new();
        while got.len() < n {
            while let Some(rsp) = self.ring.next_response().unwrap() {
                got.push(rsp);
            }
            if got.len() >= n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {} of {n} responses within {timeout:?}: {got:?}",
                self.be,
                got.len()
            );
            if !self.ring.final_check_for_responses().unwrap() {
                ports.clear();
                spin_then_wait(
                    &self.evtchn,
                    &mut ports,
                    SpinBudget::default(),
                    Some(Duration::from_millis(100)),
                )
                .unwrap();
                for p in &ports {
                    self.evtchn.unmask(*p).unwrap();
                }
            }
        }
        got
    }

    /// Submits `reqs` and returns `(id, status)` of their responses, in order.
    pub fn roundtrip(&mut self, reqs: &[BlkifRequest]) -> Vec<(u64, i16)> {
        self.submit(reqs);
        self.responses(reqs.len(), T)
            .into_iter()
            .map(|r| (r.id, r.status))
            .collect()
    }

    /// A one-segment request on data page `page` (0 or 1).
    pub fn rw(&self, op: u8, id: u64, sector: u64, page: usize) -> BlkifRequest {
        let mut r = BlkifRequest::new(op, 0, id, sector);
        r.nr_segments = 1;
        r.seg[0] = BlkifRequestSegment::new(self.data.grefs()[page], 0, 7);
        r
    }

    /// Writes a page of `pattern` at `sector`, reads it back into the other page, and checks
    /// it: verified I/O through the backend.
    pub fn verified_io(&mut self, sector: u64, pattern: u8) {
        self.data.volatile().fill(0, 4096, pattern).unwrap();
        self.data.volatile().fill(4096, 4096, !pattern).unwrap();
        let w = self.rw(OP_WRITE, u64::from(pattern) << 8 | 1, sector, 0);
        let r = self.rw(OP_READ, u64::from(pattern) << 8 | 2, sector, 1);
        let got = self.roundtrip(&[w]);
        assert_eq!(got, [(w.id, RSP_OKAY)], "{}: write", self.be);
        let got = self.roundtrip(&[r]);
        assert_eq!(got, [(r.id, RSP_OKAY)], "{}: read", self.be);
        let mut page = vec![0u8; 4096];
        self.data.volatile().read(4096, &mut page).unwrap();
        assert!(
            page.iter().all(|&b| b == pattern),
            "{}: read back what was written",
            self.be
        );
    }

    /// Byte offset of ring slot `idx` in the ring page.
    pub fn slot_offset(&self, idx: u32) -> usize {
        64 + (idx % self.ring.size()) as usize * std::mem::size_of::<BlkifRequest>()
    }

    /// Writes raw bytes into the ring page at `offset`.
    pub fn write_raw(&self, offset: usize, bytes: &[u8]) {
        self.ring.memory().volatile().write(offset, bytes).unwrap();
    }

    /// Writes the shared `req_prod` directly.
    pub fn set_req_prod(&self, value: u32) {
        self.ring.memory().volatile().write_u32(0, value).unwrap();
    }

    /// The shared `req_prod`.
    pub fn req_prod(&self) -> u32 {
        self.ring.memory().volatile().read_u32(0).unwrap()
    }
}

/// A healthy frontend doing verified write+read I/O in a loop on its own thread.
pub struct Healthy {
    rounds: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Healthy {
    /// Connects to `domid`'s `vdev` and loops until [`finish`](Self::finish).
    pub fn start(root: &Path, domid: u32, vdev: &str) -> Healthy {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let rounds = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (root, vdev) = (root.to_path_buf(), vdev.to_string());
        let (r2, s2) = (rounds.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut f = Frontend::connect(&root, domid, &vdev, true);
            let mut i: u64 = 0;
            while !s2.load(Ordering::SeqCst) {
                let pattern = (i % 250) as u8 + 1;
                f.verified_io((i * 8) % DISK_SECTORS, pattern);
                i += 1;
                r2.store(i, Ordering::SeqCst);
            }
        });
        let h = Healthy {
            rounds,
            stop,
            thread: Some(thread),
        };
        h.progress(1);
        h
    }

    /// Rounds of verified I/O so far.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until `n` more rounds complete (fails the test if the healthy thread failed or
    /// they do not complete within [`T`]).
    pub fn progress(&self, n: u64) {
        let want = self.rounds() + n;
        let deadline = Instant::now() + T;
        while self.rounds() < want {
            assert!(
                !self.thread.as_ref().unwrap().is_finished(),
                "the healthy frontend failed"
            );
            assert!(
                Instant::now() < deadline,
                "the healthy device made no progress"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops the loop and checks that it never failed.
    pub fn finish(mut self) -> u64 {
        self.progress(1);
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = self.thread.take().unwrap().join() {
            std::panic::resume_unwind(e);
        }
        self.rounds()
    }
}
