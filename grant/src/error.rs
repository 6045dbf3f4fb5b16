//! Errors of the grant crate.

use crate::{DomId, GrantRef, GrantStatus};

/// What can go wrong with grants. Every message names the problem and, where there is one, the
/// fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The grant device cannot be opened because this is not a Xen domain.
    #[error(
        "cannot open {path}: not running on Xen (use --platform local or start 'xenpv local')"
    )]
    NotXen {
        /// The device path.
        path: &'static str,
    },
    /// A system call failed.
    #[error("{what} failed: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Mapping one grant of a list failed; nothing of the list stays mapped.
    #[error(
        "cannot map grant {gref} of domain {domid} (entry {index} of the list): {status}: {reason}"
    )]
    Map {
        /// Index of the failing entry in the list.
        index: usize,
        /// Granting domain.
        domid: DomId,
        /// Grant ref.
        gref: GrantRef,
        /// Xen's status for it.
        status: GrantStatus,
        /// What was wrong with it.
        reason: &'static str,
    },
    /// Linux's gntalloc holds as many grants as its `limit` allows, for all of its users
    /// together (1024 by default): a frontend's rings and persistent pages count against it.
    #[error(
        "gntalloc refused {count} more grants: its limit on the grants userspace holds at once \
         is reached (1024 by default, for all its users together); raise it, e.g. \
         `echo 16384 > /sys/module/xen_gntalloc/parameters/limit`"
    )]
    GntallocLimit {
        /// The grants asked for.
        count: usize,
    },
    /// A count is zero or above the limit.
    #[error("{what}: {count} is out of range 1..={max} (split the request)")]
    BadCount {
        /// What was counted.
        what: &'static str,
        /// The count given.
        count: usize,
        /// The maximum accepted.
        max: usize,
    },
    /// An access to a [`VolatileSlice`](crate::VolatileSlice) is out of its bounds.
    #[error("access of {len} bytes at offset {offset} is outside memory of {size} bytes")]
    OutOfBounds {
        /// Offset of the access.
        offset: usize,
        /// Length of the access.
        len: usize,
        /// Size of the memory.
        size: usize,
    },
    /// A write to memory mapped read-only.
    #[error("memory is mapped read-only (map or share it with Access::Writable to write it)")]
    ReadOnly,
    /// The local grant broker refused a request.
    #[error("grant broker refused {what}: {status} (is domain {domid} created with 'xenpv domain create'?)")]
    Broker {
        /// The request.
        what: &'static str,
        /// The domain it was about.
        domid: DomId,
        /// The broker's status.
        status: GrantStatus,
    },
    /// The local grant broker cannot be reached.
    #[error("cannot connect to the grant broker at {path}: {source} (start 'xenpv local', and check --state-dir / XENPV_DOMID)")]
    NoBroker {
        /// The socket path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The local grant broker broke the protocol.
    #[error("grant broker protocol error: {0} (is the broker the same xenpv version?)")]
    Protocol(&'static str),
    /// Sharing pages failed: no free grant refs or frames left.
    #[error("out of grant refs or frames for {count} pages (revoke unused grants, or raise the domain's limits)")]
    NoSpace {
        /// Pages asked for.
        count: usize,
    },
    /// The domain does not exist (local broker registry).
    #[error("domain {0} does not exist (create it first)")]
    NoSuchDomain(DomId),
    /// The domain already exists (local broker registry).
    #[error("domain {0} already exists")]
    DomainExists(DomId),
}

impl Error {
    pub(crate) fn os(what: &'static str) -> Self {
        Error::Os {
            what,
            source: std::io::Error::last_os_error(),
        }
    }
}

/// `Result` with the grant crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
