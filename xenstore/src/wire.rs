//! The xenstore wire format (`xen/io/xs_wire.h`): message header, message types, error strings,
//! and path rules. Shared by the client and the server.

use std::io::{self, Read, Write};

/// Maximum payload of one message (`XENSTORE_PAYLOAD_MAX`). A longer one kills the connection.
pub const PAYLOAD_MAX: usize = 4096;
/// Maximum length of an absolute path (`XENSTORE_ABS_PATH_MAX`).
pub const ABS_PATH_MAX: usize = 3072;
/// Maximum length of a relative path (`XENSTORE_REL_PATH_MAX`).
pub const REL_PATH_MAX: usize = 2048;
/// Size of the message header (`struct xsd_sockmsg`).
pub const HEADER_SIZE: usize = 16;

/// Message types (`enum xsd_sockmsg_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
#[allow(missing_docs)] // the names are those of xs_wire.h
pub enum MsgType {
    Control = 0,
    Directory = 1,
    Read = 2,
    GetPerms = 3,
    Watch = 4,
    Unwatch = 5,
    TransactionStart = 6,
    TransactionEnd = 7,
    Introduce = 8,
    Release = 9,
    GetDomainPath = 10,
    Write = 11,
    Mkdir = 12,
    Rm = 13,
    SetPerms = 14,
    WatchEvent = 15,
    Error = 16,
    IsDomainIntroduced = 17,
    Resume = 18,
    SetTarget = 19,
    ResetWatches = 21,
    DirectoryPart = 22,
}

impl MsgType {
    /// The type for a wire value, if it is one we know.
    pub fn from_u32(v: u32) -> Option<Self> {
        use MsgType::*;
        Some(match v {
            0 => Control,
            1 => Directory,
            2 => Read,
            3 => GetPerms,
            4 => Watch,
            5 => Unwatch,
            6 => TransactionStart,
            7 => TransactionEnd,
            8 => Introduce,
            9 => Release,
            10 => GetDomainPath,
            11 => Write,
            12 => Mkdir,
            13 => Rm,
            14 => SetPerms,
            15 => WatchEvent,
            16 => Error,
            17 => IsDomainIntroduced,
            18 => Resume,
            19 => SetTarget,
            21 => ResetWatches,
            22 => DirectoryPart,
            _ => return None,
        })
    }
}

/// The message header (`struct xsd_sockmsg`), host byte order on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Message type (a [`MsgType`] value; kept raw so unknown types can be answered).
    pub ty: u32,
    /// Request id, echoed in the reply.
    pub req_id: u32,
    /// Transaction id, 0 outside a transaction.
    pub tx_id: u32,
    /// Payload length.
    pub len: u32,
}

impl Header {
    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&self.ty.to_ne_bytes());
        b[4..8].copy_from_slice(&self.req_id.to_ne_bytes());
        b[8..12].copy_from_slice(&self.tx_id.to_ne_bytes());
        b[12..16].copy_from_slice(&self.len.to_ne_bytes());
        b
    }

    /// Decodes a header.
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Self {
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            ty: word(0),
            req_id: word(4),
            tx_id: word(8),
            len: word(12),
        }
    }
}

/// Errors of reading and writing whole messages.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer announced a payload longer than [`PAYLOAD_MAX`].
    #[error("xenstore message payload of {len} bytes exceeds the maximum of {PAYLOAD_MAX}")]
    TooLong {
        /// The announced length.
        len: u32,
    },
    /// The stream failed or closed.
    #[error("xenstore stream: {0}")]
    Io(#[from] io::Error),
}

/// Reads one whole message; `Ok(None)` on a clean end of stream before a header.
pub fn read_message(r: &mut impl Read) -> Result<Option<(Header, Vec<u8>)>, WireError> {
    let mut hb = [0u8; HEADER_SIZE];
    let mut got = 0;
    while got < HEADER_SIZE {
        match r.read(&mut hb[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let h = Header::from_bytes(&hb);
    if h.len as usize > PAYLOAD_MAX {
        return Err(WireError::TooLong { len: h.len });
    }
    let mut payload = vec![0u8; h.len as usize];
    r.read_exact(&mut payload)?;
    Ok(Some((h, payload)))
}

/// Encodes a message (header + payload) into one buffer so that it is written with one call.
pub fn encode(ty: u32, req_id: u32, tx_id: u32, payload: &[u8]) -> Result<Vec<u8>, WireError> {
    if payload.len() > PAYLOAD_MAX {
        return Err(WireError::TooLong {
            len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
        });
    }
    let h = Header {
        ty,
        req_id,
        tx_id,
        len: payload.len() as u32,
    };
    let mut v = Vec::with_capacity(HEADER_SIZE + payload.len());
    v.extend_from_slice(&h.to_bytes());
    v.extend_from_slice(payload);
    Ok(v)
}

/// Writes one message.
pub fn write_message(
    w: &mut impl Write,
    ty: u32,
    req_id: u32,
    tx_id: u32,
    payload: &[u8],
) -> Result<(), WireError> {
    let buf = encode(ty, req_id, tx_id, payload)?;
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// The error names xenstored sends in an `ERROR` reply.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // errno names
pub enum Errno {
    EINVAL,
    EACCES,
    EEXIST,
    EISDIR,
    ENOENT,
    ENOMEM,
    ENOSPC,
    EIO,
    ENOTEMPTY,
    ENOSYS,
    EROFS,
    EBUSY,
    EAGAIN,
    EISCONN,
    E2BIG,
    EPERM,
    /// Quota exceeded (sent by oxenstored).
    EQUOTA,
    /// A name we do not know, kept verbatim.
    Other(String),
}

impl Errno {
    /// The wire name.
    pub fn as_str(&self) -> &str {
        use Errno::*;
        match self {
            EINVAL => "EINVAL",
            EACCES => "EACCES",
            EEXIST => "EEXIST",
            EISDIR => "EISDIR",
            ENOENT => "ENOENT",
            ENOMEM => "ENOMEM",
            ENOSPC => "ENOSPC",
            EIO => "EIO",
            ENOTEMPTY => "ENOTEMPTY",
            ENOSYS => "ENOSYS",
            EROFS => "EROFS",
            EBUSY => "EBUSY",
            EAGAIN => "EAGAIN",
            EISCONN => "EISCONN",
            E2BIG => "E2BIG",
            EPERM => "EPERM",
            EQUOTA => "EQUOTA",
            Other(s) => s,
        }
    }

    /// Parses an `ERROR` payload (`NAME\0`, tolerating a missing NUL).
    pub fn parse(payload: &[u8]) -> Self {
        let name = payload.split(|&b| b == 0).next().unwrap_or_default();
        let name = String::from_utf8_lossy(name);
        use Errno::*;
        match &*name {
            "EINVAL" => EINVAL,
            "EACCES" => EACCES,
            "EEXIST" => EEXIST,
            "EISDIR" => EISDIR,
            "ENOENT" => ENOENT,
            "ENOMEM" => ENOMEM,
            "ENOSPC" => ENOSPC,
            "EIO" => EIO,
            "ENOTEMPTY" => ENOTEMPTY,
            "ENOSYS" => ENOSYS,
            "EROFS" => EROFS,
            "EBUSY" => EBUSY,
            "EAGAIN" => EAGAIN,
            "EISCONN" => EISCONN,
            "E2BIG" => E2BIG,
            "EPERM" => EPERM,
            "EQUOTA" => EQUOTA,
            _ => Other(name.chars().take(64).collect()),
        }
    }

    /// A short human explanation.
    pub fn describe(&self) -> &'static str {
        use Errno::*;
        match self {
            EINVAL => "invalid argument",
            EACCES => "permission denied",
            EEXIST => "already exists",
            EISDIR => "is a directory",
            ENOENT => "no such node",
            ENOMEM => "out of memory",
            ENOSPC => "no space (quota exceeded)",
            EIO => "I/O error",
            ENOTEMPTY => "directory not empty",
            ENOSYS => "operation not supported",
            EROFS => "read-only",
            EBUSY => "busy",
            EAGAIN => "transaction conflict, try again",
            EISCONN => "already connected",
            E2BIG => "too big",
            EPERM => "operation not permitted",
            EQUOTA => "quota exceeded",
            Other(_) => "unknown error",
        }
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.as_str(), self.describe())
    }
}

/// Whether `c` may appear in a node name (`[A-Za-z0-9-/_@]`).
pub fn valid_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'/' | b'_' | b'@')
}

/// Whether `p` is a valid absolute node path: starts with `/`, no `//`, no trailing `/` (except
/// the root), only valid characters, at most [`ABS_PATH_MAX`] bytes.
pub fn valid_abs_path(p: &str) -> bool {
    p.starts_with('/')
        && p.len() <= ABS_PATH_MAX
        && (p == "/" || !p.ends_with('/'))
        && !p.contains("//")
        && p.bytes().all(valid_char)
}

/// The home directory of a domain, `/local/domain/<domid>`.
pub fn domain_path(domid: u32) -> String {
    format!("/local/domain/{domid}")
}

/// Splits a payload into NUL-terminated strings; `None` if the last one is not terminated or a
/// string is not UTF-8.
pub fn split_strings(payload: &[u8]) -> Option<Vec<&str>> {
    let body = payload.strip_suffix(&[0])?;
    if body.is_empty() && payload.len() == 1 {
        return Some(vec![""]);
    }
    body.split(|&b| b == 0)
        .map(|s| std::str::from_utf8(s).ok())
        .collect()
}

/// Joins strings as NUL-terminated strings.
pub fn join_strings<S: AsRef<str>>(items: &[S]) -> Vec<u8> {
    let mut v = Vec::new();
    for s in items {
        v.extend_from_slice(s.as_ref().as_bytes());
        v.push(0);
    }
    v
}

/// One access right of a permission entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// `n`: no access.
    None,
    /// `r`: read.
    Read,
    /// `w`: write.
    Write,
    /// `b`: read and write.
    Both,
}

impl Access {
    /// May read.
    pub fn read(self) -> bool {
        matches!(self, Access::Read | Access::Both)
    }
    /// May write.
    pub fn write(self) -> bool {
        matches!(self, Access::Write | Access::Both)
    }
    fn letter(self) -> char {
        match self {
            Access::None => 'n',
            Access::Read => 'r',
            Access::Write => 'w',
            Access::Both => 'b',
        }
    }
}

/// One permission entry, `<letter><domid>` on the wire. In a node's list, the first entry names
/// the owner and the access of every domain not listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Perm {
    /// The domain.
    pub domid: u32,
    /// Its access.
    pub access: Access,
}

impl Perm {
    /// A permission entry.
    pub fn new(domid: u32, access: Access) -> Self {
        Perm { domid, access }
    }

    /// Parses `r5`, `n0`, …
    pub fn parse(s: &str) -> Option<Self> {
        let mut chars = s.chars();
        let access = match chars.next()? {
            'n' => Access::None,
            'r' => Access::Read,
            'w' => Access::Write,
            'b' => Access::Both,
            _ => return None,
        };
        let rest = chars.as_str();
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let domid = rest.parse::<u32>().ok()?;
        Some(Perm { domid, access })
    }
}

impl std::fmt::Display for Perm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.access.letter(), self.domid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header {
            ty: 2,
            req_id: 7,
            tx_id: 9,
            len: 12,
        };
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
    }

    #[test]
    fn strings_and_paths() {
        assert_eq!(split_strings(b"a\0bc\0"), Some(vec!["a", "bc"]));
        assert_eq!(split_strings(b"a\0bc"), None);
        assert_eq!(split_strings(b""), None);
        assert!(valid_abs_path("/local/domain/0"));
        assert!(valid_abs_path("/"));
        assert!(!valid_abs_path("/a//b"));
        assert!(!valid_abs_path("/a/"));
        assert!(!valid_abs_path("/a b"));
        assert_eq!(Perm::parse("b12"), Some(Perm::new(12, Access::Both)));
        assert_eq!(Perm::parse("x1"), None);
        assert_eq!(Perm::parse("r"), None);
        assert_eq!(Perm::new(3, Access::None).to_string(), "n3");
        assert_eq!(Errno::parse(b"EAGAIN\0"), Errno::EAGAIN);
        assert_eq!(Errno::parse(b"EWHAT\0"), Errno::Other("EWHAT".into()));
    }
}
