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
