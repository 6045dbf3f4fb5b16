//! The NBD (Network Block Device) protocol for xenpv: a pipelined client (blkback's NBD storage
//! engine) and a multi-connection server (blkfront's disk export), sharing one wire module.
//!
//! * [`proto`]: magic numbers, flags, options, commands, error numbers, request/reply headers.
//! * [`server`]: fixed newstyle negotiation (`NBD_OPT_GO`, `INFO`, `EXPORT_NAME`, `LIST`,
//!   `ABORT`; everything else answered `NBD_REP_ERR_UNSUP`), then per connection a reader that
//!   validates every request and a writer that sends simple replies in completion order, with
//!   up to [`ServerConfig::max_in_flight`] requests in flight.
//! * [`export`]: what is exported: a synchronous [`BlockExport`] run by the [`Threaded`] pool,
//!   or an [`AsyncBlockExport`] with its own queue; [`MemExport`] and [`FileExport`].
//! * [`client`]: [`Client`] with a submit/wait API and blocking helpers, over Unix or TCP,
//!   from `nbd://` and `nbd+unix://` URIs ([`uri`]).
//!
//! The peer is hostile: every length and offset it sends is bounded and overflow-checked, a
//! request payload never exceeds [`proto::MAX_PAYLOAD`] (32 MiB), and a peer breaking the
//! protocol loses its own connection only. Structured replies and TLS are not implemented.
#![deny(missing_docs)]

pub mod client;
pub mod export;
pub mod proto;
pub mod server;
pub mod uri;

pub use client::{Client, ExportInfo, Handle};
pub use export::{
    AsyncBlockExport, BlockExport, Completion, ExportFlags, FileExport, MemExport, Request,
    Threaded,
};
pub use proto::{Command, Errno};
pub use server::{serve_unix, Server, ServerConfig, ServerHandle};
pub use uri::Uri;
