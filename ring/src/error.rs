//! Errors of the ring crate.

/// What can go wrong with a ring: bad memory given at set-up, a full ring, or a peer that moved a
/// shared index impossibly (a protocol error: the caller should disconnect that device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The memory is not a power-of-two number of 4 KiB pages.
    #[error("ring memory of {len} bytes is not a power-of-two number of 4096-byte pages")]
    BadSize {
        /// Length of the memory given.
        len: usize,
    },
    /// The memory does not start on a 64-byte boundary.
    #[error("ring memory at {addr:#x} is not 64-byte aligned (map whole pages)")]
    Misaligned {
        /// Address of the memory given.
        addr: usize,
    },
    /// No free slot: every slot holds a request or an unconsumed response.
    #[error("ring is full")]
    Full,
    /// A response was produced with no consumed request left to answer.
    #[error("no consumed request is waiting for a response")]
    NoOutstandingRequest,
    /// The frontend moved `req_prod` impossibly: more requests than the ring holds beyond the
    /// responses produced, or backwards past what was already consumed.
    #[error(
        "frontend moved req_prod to {req_prod} (req_cons {req_cons}, rsp_prod_pvt {rsp_prod_pvt}, \
         ring size {size})"
    )]
    RequestOverflow {
        /// The shared `req_prod` read from the ring.
        req_prod: u32,
        /// Our private consumer index.
        req_cons: u32,
        /// Our private response producer index.
        rsp_prod_pvt: u32,
        /// Entries in the ring.
        size: u32,
    },
    /// The backend moved `rsp_prod` impossibly: responses beyond the requests published, or
    /// backwards past what was already consumed.
    #[error(
        "backend moved rsp_prod to {rsp_prod} (rsp_cons {rsp_cons}, requests published {req_prod})"
    )]
    ResponseOverflow {
        /// The shared `rsp_prod` read from the ring.
        rsp_prod: u32,
        /// Our private response consumer index.
        rsp_cons: u32,
        /// The request producer index we last published.
        req_prod: u32,
    },
}

/// `Result` with the ring crate's [`Error`].
pub type Result<T> = core::result::Result<T, Error>;
