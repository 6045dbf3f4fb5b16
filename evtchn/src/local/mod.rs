//! The local platform's event channels (`docs/local-platform.md`, "Event channels").
//!
//! * [`LocalEvtchn`]: the client drivers use, over `ROOT/dom<D>/evtchn.sock`.
//! * [`Broker`]: the server-side state machine that `xenpv local` runs, one per host.
//! * [`wire`]: the socket's frame format.

mod broker;
mod client;
pub mod wire;

use std::path::{Path, PathBuf};

pub use broker::{Broker, PortStatus, DEFAULT_MAX_PORTS};
pub use client::LocalEvtchn;
pub use wire::BrokerError;

use crate::DomId;

/// The state root: `$XENPV_STATE_DIR`, else `$XDG_RUNTIME_DIR/xenpv`, else `/run/xenpv`
/// (a `--state-dir` option, when given, takes precedence and is the caller's business).
pub fn state_root() -> PathBuf {
    if let Some(d) = std::env::var_os("XENPV_STATE_DIR").filter(|d| !d.is_empty()) {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return Path::new(&d).join("xenpv");
    }
    PathBuf::from("/run/xenpv")
}

/// `ROOT/dom<D>/evtchn.sock`.
pub fn socket_path(root: &Path, domid: DomId) -> PathBuf {
    root.join(format!("dom{domid}")).join("evtchn.sock")
}
