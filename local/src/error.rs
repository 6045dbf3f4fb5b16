//! Errors of the local platform.

use std::path::PathBuf;

/// What can go wrong starting or driving the local platform. Every message names the problem and
/// the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another daemon is alive on this state directory.
    #[error(
        "another `xenpv local`{} is already running at {}: stop it first, or pass another --state-dir",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        root.display()
    )]
    AlreadyRunning {
        /// The state directory.
        root: PathBuf,
        /// The other daemon's pid, when its pid file says.
        pid: Option<u32>,
    },
    /// No daemon answers on this state directory.
    #[error("no local platform at {}: start it with `xenpv local` (or pass --state-dir): {source}", root.display())]
    NotRunning {
        /// The state directory.
        root: PathBuf,
        /// Why connecting failed.
        #[source]
        source: std::io::Error,
    },
    /// A file-system or socket operation failed.
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A domain id that is taken.
    #[error(
        "domain {0} already exists (pick another --domid, or leave it out for the next free one)"
    )]
    DomainExists(u32),
    /// A domain id that does not exist.
    #[error("no domain {0} (see `xenpv domain list`)")]
    NoSuchDomain(u32),
    /// dom0 is the daemon's own.
    #[error("domain 0 belongs to the daemon: it is created at start and destroyed at exit")]
    Dom0,
    /// A domain id out of range.
    #[error("domain id {0} out of range (use 1..={max})", max = crate::MAX_DOMID)]
    BadDomid(u32),
    /// Every domain id is taken.
    #[error("no free domain id left (destroy a domain first)")]
    NoFreeDomid,
    /// A name that is taken.
    #[error("domain name {name:?} is already used by domain {domid} (pick another --name)")]
    NameTaken {
        /// The name.
        name: String,
        /// The domain that has it.
        domid: u32,
    },
    /// A name the daemon does not accept.
    #[error("bad domain name {0:?}: use 1 to 64 printable characters without spaces or '/'")]
    BadName(String),
    /// The grant broker refused.
    #[error("grant broker: {0}")]
    Grant(#[from] xenpv_grant::Error),
    /// The event-channel broker refused.
    #[error("event-channel broker: {0}")]
    Evtchn(#[from] xenpv_evtchn::local::BrokerError),
    /// The xenstore server refused.
    #[error("xenstore: {what}: {errno}")]
    Xenstore {
        /// What was being done.
        what: String,
        /// Its error.
        errno: xenpv_xenstore::Errno,
    },
    /// The daemon answered a control request with an error.
    #[error("{0}")]
    Remote(String),
    /// The control socket spoke something we do not understand.
    #[error("control protocol: {0} (are `xenpv` and the running `xenpv local` the same version?)")]
    Protocol(String),
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
