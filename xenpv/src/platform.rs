//! Which platform the toolstack drives, and where the local platform keeps its sockets.

use std::path::{Path, PathBuf};

/// Real Xen or the local platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// A Xen dom0: `/dev/xen/*` and the dom0 xenstored.
    Xen,
    /// The local platform started by `xenpv local`.
    Local,
}

impl Platform {
    /// `xen`, `local`, or `auto` (Xen when `/dev/xen/privcmd` exists, else local).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "xen" => Some(Self::Xen),
            "local" => Some(Self::Local),
            "auto" => Some(Self::detect()),
            _ => None,
        }
    }

    /// Xen when `/dev/xen/privcmd` exists, else the local platform.
    pub fn detect() -> Self {
        if Path::new("/dev/xen/privcmd").exists() {
            Self::Xen
        } else {
            Self::Local
        }
    }
}

/// The local platform's state directory: the one given, else `$XENPV_STATE_DIR`, else
/// `$XDG_RUNTIME_DIR/xenpv`, else `/run/xenpv` (docs/local-platform.md; the daemon's
/// [`xenpv_local::state_dir`]).
pub fn state_dir(given: Option<&Path>) -> PathBuf {
    xenpv_local::state_dir(given)
}
