//! The wire format of `evtchn.sock` (little-endian, fixed-size frames).
//!
//! Request: `len: u32` (must be [`REQUEST_BODY`] = 12) then `op: u32, a: u32, b: u32`.
//! Reply: `len: u32` (= 8) then `status: u32` (0, or a [`BrokerError`] code) and `value: u32`
//! (the port for a bind). A successful bind reply carries two fds (`SCM_RIGHTS`): the port's
//! own eventfd (readable by its holder) and the eventfd of the other end (written by `notify`).
//! A request frame of any other length is answered with [`BrokerError::BadFrame`] and the
//! connection is closed, since the stream can no longer be trusted.

/// `a` = remote domid → port.
pub const OP_ALLOC_UNBOUND: u32 = 1;
/// `a` = remote domid, `b` = remote port → port.
pub const OP_BIND_INTERDOMAIN: u32 = 2;
/// `a` = port.
pub const OP_UNBIND: u32 = 3;

/// Bytes of a request body.
pub const REQUEST_BODY: u32 = 12;
/// Bytes of a reply body.
pub const REPLY_BODY: u32 = 8;
/// Bytes of a whole request frame.
pub const REQUEST_FRAME: usize = 16;
/// Bytes of a whole reply frame.
pub const REPLY_FRAME: usize = 12;

/// Why the broker refused a request; also its status code on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[repr(u32)]
pub enum BrokerError {
    /// The domain does not exist (or was destroyed).
    #[error("no such domain (create it first: 'xenpv domain create')")]
    NoSuchDomain = 1,
    /// A domain id out of range.
    #[error("domain id out of range (domain ids are below 0x7ff0)")]
    BadDomain = 2,
    /// No such port in that domain.
    #[error("no such port (use a port returned by a bind)")]
    NoSuchPort = 3,
    /// The remote port exists but is not unbound and reserved for the caller's domain.
    #[error(
        "remote port is not unbound and reserved for this domain (the peer must allocate it \
         for this domain with alloc_unbound, and nobody else may be bound to it)"
    )]
    NotReserved = 4,
    /// The port was bound through another connection.
    #[error("port is bound by another process (only the binder may unbind it)")]
    NotOwner = 5,
    /// The domain's port table is full.
    #[error("port table of the domain is full (unbind unused ports)")]
    TooManyPorts = 6,
    /// Unknown request.
    #[error("unknown request (client and broker versions differ: rebuild or restart)")]
    UnknownOp = 7,
    /// A malformed frame; the broker closes the connection.
    #[error("malformed request frame (connection closed)")]
    BadFrame = 8,
    /// The broker could not create an eventfd or send it.
    #[error("broker out of resources (raise the daemon's RLIMIT_NOFILE)")]
    Resources = 9,
    /// The domain already exists (domain creation only).
    #[error("domain already exists (destroy it first or pick another domid)")]
    DomainExists = 10,
    /// A code this client does not know.
    #[error("unknown broker error code (client and broker versions differ)")]
    Unknown = 0xffff_ffff,
}

impl BrokerError {
    /// Its code on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The error for a wire code (unknown codes map to [`BrokerError::Unknown`]).
    pub fn from_code(code: u32) -> Self {
        use BrokerError::*;
        [
            NoSuchDomain,
            BadDomain,
            NoSuchPort,
            NotReserved,
            NotOwner,
            TooManyPorts,
            UnknownOp,
            BadFrame,
            Resources,
            DomainExists,
        ]
        .into_iter()
        .find(|e| e.code() == code)
        .unwrap_or(Unknown)
    }
}

/// Encodes a request frame.
pub fn request(op: u32, a: u32, b: u32) -> [u8; REQUEST_FRAME] {
    let mut f = [0u8; REQUEST_FRAME];
    for (i, w) in [REQUEST_BODY, op, a, b].into_iter().enumerate() {
        f[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    f
}

/// Encodes a reply frame.
pub fn reply(status: u32, value: u32) -> [u8; REPLY_FRAME] {
    let mut f = [0u8; REPLY_FRAME];
    for (i, w) in [REPLY_BODY, status, value].into_iter().enumerate() {
        f[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    f
}

/// The `i`th little-endian u32 of `b` (0 if out of range).
pub(crate) fn word(b: &[u8], i: usize) -> u32 {
    let s = i.checked_mul(4).and_then(|o| b.get(o..o.checked_add(4)?));
    s.and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for c in 1..=10 {
            assert_eq!(BrokerError::from_code(c).code(), c);
        }
        assert_eq!(BrokerError::from_code(0), BrokerError::Unknown);
        assert_eq!(BrokerError::from_code(77), BrokerError::Unknown);
    }

    #[test]
    fn frames_encode() {
        let r = request(OP_BIND_INTERDOMAIN, 5, 9);
        assert_eq!(
            [word(&r, 0), word(&r, 1), word(&r, 2), word(&r, 3)],
            [12, 2, 5, 9]
        );
        assert_eq!(word(&r, 4), 0);
        let r = reply(0, 3);
        assert_eq!([word(&r, 0), word(&r, 1), word(&r, 2)], [8, 0, 3]);
    }
}
