//! Errors of the event-channel crate.

use std::io;
use std::path::PathBuf;

use crate::local::BrokerError;
use crate::{DomId, Port};

/// What can go wrong with an event channel. Every message names the problem and the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/xen/evtchn` does not exist: this is not a Xen domain.
    #[error(
        "cannot open {}: not running on Xen (use --platform local or start 'xenpv local')",
        path.display()
    )]
    NotXen {
        /// The device path tried.
        path: PathBuf,
    },
    /// The device exists but could not be opened.
    #[error(
        "cannot open {}: {source} (load the xen-evtchn module and run as root or with access \
         to the device)",
        path.display()
    )]
    Open {
        /// The device path tried.
        path: PathBuf,
        /// The error of `open(2)`.
        source: io::Error,
    },
    /// An ioctl on `/dev/xen/evtchn` failed.
    #[error("/dev/xen/evtchn {op} failed: {source} (check the domain id and port)")]
    Ioctl {
        /// The ioctl (`BIND_INTERDOMAIN`, …).
        op: &'static str,
        /// The error it returned.
        source: io::Error,
    },
    /// The kernel's per-fd queue of fired ports overflowed; events were lost.
    #[error("event-channel queue overflowed (call reset() and re-check every ring)")]
    Overflow,
    /// A system call failed.
    #[error("event channel: {op} failed: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The local broker's socket could not be reached.
    #[error(
        "cannot connect to the event-channel broker at {}: {source} (start 'xenpv local' and \
         check --state-dir / --domain)",
        path.display()
    )]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The error of `connect(2)`.
        source: io::Error,
    },
    /// The broker refused a request.
    #[error("event-channel broker refused {op}: {error}")]
    Broker {
        /// The request (`alloc_unbound`, …).
        op: &'static str,
        /// Why.
        error: BrokerError,
    },
    /// The broker sent something this client does not understand, or went away mid-request.
    #[error(
        "event-channel broker protocol error: {0} (restart 'xenpv local'; versions must match)"
    )]
    Protocol(String),
    /// The port is not bound through this channel.
    #[error("port {port} is not bound through this event channel (bind it first)")]
    NotBound {
        /// The port.
        port: Port,
    },
    /// A domain id that cannot be used.
    #[error("domain id {domid} is not valid here (use a domain id below 0x7ff0)")]
    BadDomain {
        /// The domain id.
        domid: DomId,
    },
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(op: &'static str, source: io::Error) -> Self {
        Error::Io { op, source }
    }
}
