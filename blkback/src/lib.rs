//! The blkif backend: request validation, storage engines, device lifecycle.
//!
//! [`request`] turns a request copied out of the ring into a validated I/O plan, or into the
//! error response a hostile or buggy frontend deserves; nothing a frontend writes can make it
//! panic or reach outside the disk.
#![deny(missing_docs)]

pub mod daemon;
pub mod device;
pub mod journal;
pub mod queue;
pub mod request;
pub mod storage;
