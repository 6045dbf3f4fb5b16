//! Shared pieces of the cross-process integration tests: opening a domain's three platform
//! primitives on the local platform, and a minimal blkif device pair (`seam-frontend`,
//! `seam-backend`) that exercises the whole seam: grants, event channels, xenstore, the xenbus
//! state machine and the ring crate, each side in its own process.
#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use xenpv_evtchn::local::LocalEvtchn;
use xenpv_grant::local::LocalGrants;
use xenpv_xenstore::{xenbus, Client, XenbusState};

/// A domain's connections to the local platform.
pub struct Domain {
    /// The domain id.
    pub domid: u32,
    /// xenstore, with this domain's identity.
    pub xs: Client,
    /// Grant tables.
    pub grants: LocalGrants,
    /// Event channels.
    pub evtchn: LocalEvtchn,
}

/// `ROOT/dom<D>/<name>`.
pub fn socket(root: &Path, domid: u32, name: &str) -> PathBuf {
    root.join(format!("dom{domid}")).join(name)
}

impl Domain {
    /// Connects to the three sockets of domain `domid` under the state directory `root`.
    pub fn open(root: &Path, domid: u32) -> Result<Self, String> {
        let xs = Client::connect_local(root, domid).map_err(|e| format!("xenstore: {e}"))?;
        let grants = LocalGrants::connect(socket(root, domid, "grant.sock"))
            .map_err(|e| format!("grant: {e}"))?;
        let evtchn = LocalEvtchn::connect(socket(root, domid, "evtchn.sock"))
            .map_err(|e| format!("evtchn: {e}"))?;
        Ok(Self {
            domid,
            xs,
            grants,
            evtchn,
        })
    }
}

/// Waits until the state of `dir` satisfies `ok`, or fails after `timeout`.
pub fn wait_state(
    xs: &Client,
    dir: &str,
    timeout: Duration,
    ok: impl Fn(XenbusState) -> bool,
) -> Result<XenbusState, String> {
    xenbus::wait_for_peer_state(xs, dir, ok, timeout)
        .map_err(|e| format!("waiting on {dir}/state: {e}"))
}

/// Reads a decimal value.
pub fn read_u32(xs: &Client, path: &str) -> Result<u32, String> {
    use xenpv_xenstore::XsOps;
    let s = xs.read_string(path).map_err(|e| format!("{path}: {e}"))?;
    s.trim()
        .parse()
        .map_err(|_| format!("{path}: `{s}` is not a number"))
}

/// A deadline helper for loops.
pub fn deadline(d: Duration) -> impl Fn() -> Result<(), String> {
    let end = Instant::now() + d;
    move || {
        if Instant::now() > end {
            Err("timed out".into())
        } else {
            Ok(())
        }
    }
}

/// The `flags` (`open(2)` flags, as `/proc/PID/fdinfo` gives them) of every descriptor of
/// process `pid` (this process with `None`) that is open on `path`. A descriptor closed while
/// the directory is read is skipped.
pub fn open_flags(pid: Option<u32>, path: &Path) -> Vec<u32> {
    let proc = pid.map_or_else(|| "self".to_string(), |p| p.to_string());
    let Ok(path) = path.canonicalize() else {
        return Vec::new();
    };
    let Ok(fds) = std::fs::read_dir(format!("/proc/{proc}/fd")) else {
        return Vec::new();
    };
    let mut flags = Vec::new();
    for fd in fds.flatten() {
        if std::fs::read_link(fd.path()).ok().as_deref() != Some(path.as_path()) {
            continue;
        }
        let name = fd.file_name();
        let Ok(info) =
            std::fs::read_to_string(format!("/proc/{proc}/fdinfo/{}", name.to_string_lossy()))
        else {
            continue;
        };
        if let Some(f) = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        {
            flags.push(f);
        }
    }
    flags
}

/// A loop device over a file (`losetup --sector-size`), detached on drop. Needs root and
/// util-linux.
pub struct Loop(pub String);

impl Loop {
    /// Sets one up over `file` with `sector_size`-byte logical sectors; panics (the test
    /// cannot run) if that fails, saying why.
    pub fn new(file: &Path, sector_size: u32) -> Loop {
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show", "--sector-size", &sector_size.to_string()])
            .arg(file)
            .output()
            .expect("losetup (util-linux) must be installed");
        assert!(
            out.status.success(),
            "cannot create a loop device (run as root with loop devices available): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

/// The context switches so far (voluntary or not) of the thread named `name` (its `comm`) of
/// process `pid` (this process with `None`); `None` if it has no such thread.
pub fn thread_switches(pid: Option<u32>, name: &str) -> Option<u64> {
    let proc = pid.map_or_else(|| "self".to_string(), |p| p.to_string());
    for task in std::fs::read_dir(format!("/proc/{proc}/task"))
        .ok()?
        .flatten()
    {
        let dir = task.path();
        if std::fs::read_to_string(dir.join("comm"))
            .unwrap_or_default()
            .trim()
            != name
        {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).ok()?;
        return Some(
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum(),
        );
    }
    None
}
