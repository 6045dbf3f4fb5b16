//! Errors of the xenstore client and the xenbus state machine.

use crate::wire::Errno;
use std::io;

/// What can go wrong talking to xenstore.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// xenstored answered a request with an error.
    #[error("xenstore {op} {path}: {errno}")]
    Xs {
        /// The request type, e.g. `READ`.
        op: &'static str,
        /// The path (or argument) of the request.
        path: String,
        /// The error name xenstored sent.
        errno: Errno,
    },
    /// Opening the xenstore connection failed.
    #[error("cannot connect to xenstore at {path}: {source} (is xenstored, or 'xenpv local', running? set XENSTORED_PATH to choose the socket)")]
    Connect {
        /// The socket or device tried.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// The connection failed or was closed by xenstored.
    #[error("xenstore connection lost: {0}")]
    Disconnected(String),
    /// A request payload would exceed the 4096-byte limit.
    #[error(
        "xenstore {op} request for {path} is {len} bytes, more than the 4096-byte payload limit"
    )]
    TooLong {
        /// The request type.
        op: &'static str,
        /// The path.
        path: String,
        /// The payload length.
        len: usize,
    },
    /// xenstored sent a reply we cannot parse.
    #[error("malformed xenstore reply to {op}: {what}")]
    Protocol {
        /// The request type.
        op: &'static str,
        /// What was wrong.
        what: String,
    },
    /// A value was not UTF-8 where a string was expected.
    #[error("xenstore value at {path} is not UTF-8")]
    NotUtf8 {
        /// The path.
        path: String,
    },
    /// Waiting for a state or a watch event took too long.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What we were waiting for.
        what: String,
        /// How long we waited.
        timeout: std::time::Duration,
    },
    /// A transaction kept conflicting.
    #[error("xenstore transaction still conflicting (EAGAIN) after {attempts} attempts")]
    TooManyRetries {
        /// Attempts made.
        attempts: u32,
    },
    /// A xenstore value is not a valid xenbus state.
    #[error("{path} holds {value:?}, which is not a xenbus state (0..=8)")]
    BadState {
        /// The state node.
        path: String,
        /// Its value.
        value: String,
    },
    /// No legal path between two xenbus states.
    #[error("no legal xenbus transition from {from:?} to {to:?}")]
    IllegalTransition {
        /// Current state.
        from: crate::xenbus::XenbusState,
        /// Wanted state.
        to: crate::xenbus::XenbusState,
    },
}

impl Error {
    /// The xenstore error name, if xenstored answered with one.
    pub fn errno(&self) -> Option<&Errno> {
        match self {
            Error::Xs { errno, .. } => Some(errno),
            _ => None,
        }
    }

    /// Whether this is `ENOENT` (no such node).
    pub fn is_not_found(&self) -> bool {
        self.errno() == Some(&Errno::ENOENT)
    }

    /// Whether this is `EAGAIN` (a transaction conflict).
    pub fn is_again(&self) -> bool {
        self.errno() == Some(&Errno::EAGAIN)
    }
}

/// Result of the client and xenbus functions.
pub type Result<T> = std::result::Result<T, Error>;
