//! Xenstore for xenpv: a wire client, the xenbus device state machine, and a xenstored for the
//! local platform.
//!
//! * [`Client`] talks the `xs_wire.h` protocol over any byte stream: the dom0 socket
//!   (`/run/xenstored/socket`, `/var/run/xenstored/socket`, or `$XENSTORED_PATH`), the guest
//!   device `/dev/xen/xenbus`, or the local platform's `ROOT/dom<D>/xenstore.sock`. It is
//!   usable from several threads: a reader thread matches replies by `req_id` and routes watch
//!   events to each [`Watch`]'s bounded channel. Node operations are in [`XsOps`], implemented by
//!   the client and by a [`Transaction`]; [`Client::transaction`] retries on `EAGAIN`.
//! * [`xenbus`] is the device state machine shared by the four drivers: [`XenbusState`],
//!   idempotent [`xenbus::switch_state`], [`xenbus::wait_for_peer_state`], and the table of legal
//!   backend transitions.
//! * [`server`] is the xenstored of the local platform: permissions, watches, transactions and
//!   quotas as xenstored has them; one connection per domain identity.
//! * [`wire`] holds the shared wire format.
#![deny(missing_docs)]

mod client;
mod error;
pub mod server;
pub mod wire;
pub mod xenbus;

pub use client::{
    Client, Transaction, Watch, WatchEvent, XsOps, DEFAULT_WATCH_CAPACITY, TRANSACTION_ATTEMPTS,
};
pub use error::{Error, Result};
pub use server::{Listener, Quotas, Server};
pub use wire::{Access, Errno, Perm};
pub use xenbus::XenbusState;
