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
/// `$XDG_RUNTIME_DIR/xenpv`, else `/run/xenpv` (docs/local-platform.md).
pub fn state_dir(given: Option<&Path>) -> PathBuf {
    if let Some(p) = given {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("XENPV_STATE_DIR") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(p).join("xenpv");
    }
    PathBuf::from("/run/xenpv")
}
