//! The local platform (`docs/local-platform.md`): one daemon that plays hypervisor and xenstored
//! for processes on one Linux host, so that the very same drivers run without Xen.
//!
//! [`Daemon::start`] takes the state directory (see [`state_dir`]), refuses to start when another
//! daemon is alive there, cleans up what a dead one left, creates dom0 and serves, per domain
//! `D`, `ROOT/dom<D>/{xenstore,grant,evtchn}.sock` (the socket is the identity) plus
//! `ROOT/control.sock`, over which [`control::Control`] creates, destroys and lists domains.
//! The brokers themselves live in the primitive crates (`xenpv_xenstore::Server`,
//! `xenpv_grant::local::Broker`, `xenpv_evtchn::local::Broker`); this crate owns the domain
//! registry, the listeners, the threads and the `@introduceDomain`/`@releaseDomain` events.
#![deny(missing_docs)]

pub mod control;
mod daemon;
mod error;
mod sock;

use std::path::{Path, PathBuf};

pub use daemon::{Config, Daemon, DomainInfo, MAX_DOMID};
pub use error::{Error, Result};

/// The state directory: the one given, else `$XENPV_STATE_DIR`, else `$XDG_RUNTIME_DIR/xenpv`,
/// else `/run/xenpv` (docs/local-platform.md). Empty variables count as unset.
pub fn state_dir(given: Option<&Path>) -> PathBuf {
    match given {
        Some(p) => p.to_path_buf(),
        None => xenpv_evtchn::local::state_root(),
    }
}

/// `ROOT/dom<D>`: the directory holding domain `D`'s sockets.
pub fn domain_dir(root: &Path, domid: u32) -> PathBuf {
    root.join(format!("dom{domid}"))
}

/// `ROOT/control.sock`: the daemon's domain-management socket.
pub fn control_path(root: &Path) -> PathBuf {
    root.join("control.sock")
}

/// `ROOT/local.pid`: the running daemon's pid (locked with `flock` while it runs).
pub fn pid_path(root: &Path) -> PathBuf {
    root.join("local.pid")
}

/// `ROOT/dom<D>/xenstore.sock`.
pub fn xenstore_path(root: &Path, domid: u32) -> PathBuf {
    domain_dir(root, domid).join("xenstore.sock")
}

/// `ROOT/dom<D>/grant.sock`.
pub fn grant_path(root: &Path, domid: u32) -> PathBuf {
    domain_dir(root, domid).join("grant.sock")
}

/// `ROOT/dom<D>/evtchn.sock`.
pub fn evtchn_path(root: &Path, domid: u32) -> PathBuf {
    domain_dir(root, domid).join("evtchn.sock")
}
