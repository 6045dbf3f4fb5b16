//! NBD wire constants and the fixed-size transmission headers.
//!
//! Numbers follow the NBD protocol specification (`doc/proto.md` of the NetworkBlockDevice
//! project). Everything on the wire is big-endian.

use std::fmt;
use std::io;

/// `NBDMAGIC`: the first 8 bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation magic (server greeting and every client option).
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The oldstyle negotiation magic (not supported by this crate, recognised for errors).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk (only recognised: we never negotiate structured replies).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// The default TCP port of NBD.
pub const DEFAULT_PORT: u16 = 10809;
/// The largest payload (read or write length) this crate sends or accepts: 32 MiB.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The largest option payload a server accepts from a client, and a client from a server.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// The longest export name (the spec requires at least 4096 bytes to be accepted).
pub const MAX_NAME_LEN: usize = 4096;
/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;

/// Handshake flags (server → client, 16 bits).
pub mod handshake {
    /// `NBD_FLAG_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// `NBD_FLAG_NO_ZEROES`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (client → server, 32 bits).
pub mod client_flags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// `NBD_FLAG_C_NO_ZEROES`.
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Transmission flags of an export (16 bits).
pub mod tflags {
    /// `NBD_FLAG_HAS_FLAGS`: always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_ROTATIONAL`.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_FLAG_SEND_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_SEND_DF`.
    pub const SEND_DF: u16 = 1 << 7;
    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_FLAG_SEND_RESIZE`.
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// `NBD_FLAG_SEND_CACHE`.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_FLAG_SEND_FAST_ZERO`.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option numbers (`NBD_OPT_*`).
pub mod opt {
    /// `NBD_OPT_EXPORT_NAME`.
    pub const EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT`.
    pub const ABORT: u32 = 2;
    /// `NBD_OPT_LIST`.
    pub const LIST: u32 = 3;
    /// `NBD_OPT_STARTTLS`.
    pub const STARTTLS: u32 = 5;
    /// `NBD_OPT_INFO`.
    pub const INFO: u32 = 6;
    /// `NBD_OPT_GO`.
    pub const GO: u32 = 7;
    /// `NBD_OPT_STRUCTURED_REPLY`.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// `NBD_OPT_LIST_META_CONTEXT`.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// `NBD_OPT_SET_META_CONTEXT`.
    pub const SET_META_CONTEXT: u32 = 10;
    /// `NBD_OPT_EXTENDED_HEADERS`.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// `NBD_REP_ACK`.
    pub const ACK: u32 = 1;
    /// `NBD_REP_SERVER`.
    pub const SERVER: u32 = 2;
    /// `NBD_REP_INFO`.
    pub const INFO: u32 = 3;
    /// Bit set in every error reply.
    pub const FLAG_ERROR: u32 = 1 << 31;
    /// `NBD_REP_ERR_UNSUP`.
    pub const ERR_UNSUP: u32 = FLAG_ERROR | 1;
    /// `NBD_REP_ERR_POLICY`.
    pub const ERR_POLICY: u32 = FLAG_ERROR | 2;
    /// `NBD_REP_ERR_INVALID`.
    pub const ERR_INVALID: u32 = FLAG_ERROR | 3;
    /// `NBD_REP_ERR_PLATFORM`.
    pub const ERR_PLATFORM: u32 = FLAG_ERROR | 4;
    /// `NBD_REP_ERR_TLS_REQD`.
    pub const ERR_TLS_REQD: u32 = FLAG_ERROR | 5;
    /// `NBD_REP_ERR_UNKNOWN`: no such export.
    pub const ERR_UNKNOWN: u32 = FLAG_ERROR | 6;
    /// `NBD_REP_ERR_SHUTDOWN`.
    pub const ERR_SHUTDOWN: u32 = FLAG_ERROR | 7;
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD`.
    pub const ERR_BLOCK_SIZE_REQD: u32 = FLAG_ERROR | 8;
    /// `NBD_REP_ERR_TOO_BIG`.
    pub const ERR_TOO_BIG: u32 = FLAG_ERROR | 9;
}

/// Information types of `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info {
    /// `NBD_INFO_EXPORT`: size (u64) and transmission flags (u16).
    pub const EXPORT: u16 = 0;
    /// `NBD_INFO_NAME`.
    pub const NAME: u16 = 1;
    /// `NBD_INFO_DESCRIPTION`.
    pub const DESCRIPTION: u16 = 2;
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred, maximum (three u32).
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command flags (`NBD_CMD_FLAG_*`, 16 bits).
pub mod cmd_flags {
    /// `NBD_CMD_FLAG_FUA`: the write is durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_FLAG_NO_HOLE`: `WRITE_ZEROES` must allocate.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_FLAG_DF`.
    pub const DF: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_REQ_ONE`.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `NBD_CMD_FLAG_FAST_ZERO`.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// A transmission command (`NBD_CMD_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ` (0).
    Read,
    /// `NBD_CMD_WRITE` (1).
    Write,
    /// `NBD_CMD_DISC` (2).
    Disc,
    /// `NBD_CMD_FLUSH` (3).
    Flush,
    /// `NBD_CMD_TRIM` (4).
    Trim,
    /// `NBD_CMD_WRITE_ZEROES` (6).
    WriteZeroes,
}

impl Command {
    /// The wire number.
    pub const fn to_wire(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::WriteZeroes => 6,
        }
    }

    /// The command with that wire number, if this crate implements it.
    pub const fn from_wire(n: u16) -> Option<Command> {
        Some(match n {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            6 => Command::WriteZeroes,
            _ => return None,
        })
    }

    /// The flags valid on this command.
    pub const fn allowed_flags(self) -> u16 {
        match self {
            Command::Write | Command::Trim => cmd_flags::FUA,
            Command::WriteZeroes => cmd_flags::FUA | cmd_flags::NO_HOLE,
            Command::Read | Command::Disc | Command::Flush => 0,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Command::Read => "READ",
            Command::Write => "WRITE",
            Command::Disc => "DISC",
            Command::Flush => "FLUSH",
            Command::Trim => "TRIM",
            Command::WriteZeroes => "WRITE_ZEROES",
        })
    }
}

/// An NBD error number as carried in a reply (errno values of Linux, fixed by the spec).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Errno(pub u32);

impl Errno {
    /// `EPERM`: operation not permitted (e.g. a write to a read-only export).
    pub const EPERM: Errno = Errno(1);
    /// `EIO`: input/output error.
    pub const EIO: Errno = Errno(5);
    /// `ENOMEM`: out of memory.
    pub const ENOMEM: Errno = Errno(12);
    /// `EINVAL`: invalid argument (out of range, too long, unknown command or flag).
    pub const EINVAL: Errno = Errno(22);
    /// `ENOSPC`: no space left.
    pub const ENOSPC: Errno = Errno(28);
    /// `EOVERFLOW`: value too large.
    pub const EOVERFLOW: Errno = Errno(75);
    /// `ENOTSUP`: operation not supported.
    pub const ENOTSUP: Errno = Errno(95);
    /// `ESHUTDOWN`: the server is shutting down.
    pub const ESHUTDOWN: Errno = Errno(108);

    /// The NBD error to send for a local I/O error (unknown numbers become `EIO`).
    pub fn from_io(e: &io::Error) -> Errno {
        if let Some(n) = e.raw_os_error() {
            if let Some(known) = Self::known(n as u32) {
                return known;
            }
            return Errno::EIO;
        }
        match e.kind() {
            io::ErrorKind::PermissionDenied => Errno::EPERM,
            io::ErrorKind::InvalidInput => Errno::EINVAL,
            io::ErrorKind::Unsupported => Errno::ENOTSUP,
            io::ErrorKind::OutOfMemory => Errno::ENOMEM,
            _ => Errno::EIO,
        }
    }

    fn known(n: u32) -> Option<Errno> {
        [
            Errno::EPERM,
            Errno::EIO,
            Errno::ENOMEM,
            Errno::EINVAL,
            Errno::ENOSPC,
            Errno::EOVERFLOW,
            Errno::ENOTSUP,
            Errno::ESHUTDOWN,
        ]
        .into_iter()
        .find(|e| e.0 == n)
    }

    /// The symbolic name, or `E?` for a number outside the spec's list.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "EPERM",
            5 => "EIO",
            12 => "ENOMEM",
            22 => "EINVAL",
            28 => "ENOSPC",
            75 => "EOVERFLOW",
            95 => "ENOTSUP",
            108 => "ESHUTDOWN",
            _ => "E?",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

impl From<Errno> for io::Error {
    fn from(e: Errno) -> io::Error {
        io::Error::from_raw_os_error(e.0 as i32)
    }
}

/// A transmission request header (`struct nbd_request`), 28 bytes on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Raw command number (`NBD_CMD_*`), possibly one we do not know.
    pub typ: u16,
    /// The client's handle (cookie), echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl RequestHeader {
    /// Encode with the request magic.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.typ.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decode; `None` if the magic is wrong.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Option<RequestHeader> {
        if be32(&b[0..4]) != REQUEST_MAGIC {
            return None;
        }
        Some(RequestHeader {
            flags: be16(&b[4..6]),
            typ: be16(&b[6..8]),
            handle: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            length: be32(&b[24..28]),
        })
    }
}

/// A simple reply header (`struct nbd_simple_reply`), 16 bytes on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0 for success, else an [`Errno`] number.
    pub error: u32,
    /// The handle of the request answered.
    pub handle: u64,
}

impl SimpleReply {
    /// Encode with the simple-reply magic.
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b
    }

    /// Decode; `Err(magic)` if the magic is not the simple-reply magic.
    pub fn decode(b: &[u8; SIMPLE_REPLY_LEN]) -> Result<SimpleReply, u32> {
        let magic = be32(&b[0..4]);
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(magic);
        }
        Ok(SimpleReply {
            error: be32(&b[4..8]),
            handle: be64(&b[8..16]),
        })
    }
}

/// Check that `offset..offset+length` lies within an export of `size` bytes (overflow-checked).
pub fn in_range(offset: u64, length: u64, size: u64) -> bool {
    offset.checked_add(length).is_some_and(|end| end <= size)
}

pub(crate) fn be16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_be_bytes(a)
}

pub(crate) fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

pub(crate) fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip() {
        let r = RequestHeader {
            flags: cmd_flags::FUA,
            typ: Command::Write.to_wire(),
            handle: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 512,
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(RequestHeader::decode(&b), Some(r));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(RequestHeader::decode(&bad), None);
    }

    #[test]
    fn reply_roundtrip_and_magic() {
        let r = SimpleReply {
            error: 22,
            handle: 7,
        };
        assert_eq!(SimpleReply::decode(&r.encode()), Ok(r));
        let mut b = r.encode();
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(SimpleReply::decode(&b), Err(STRUCTURED_REPLY_MAGIC));
    }

    #[test]
    fn range_is_overflow_checked() {
        assert!(in_range(0, 10, 10));
        assert!(!in_range(1, 10, 10));
        assert!(!in_range(u64::MAX, 2, u64::MAX));
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(
            Errno::from_io(&io::Error::from_raw_os_error(28)),
            Errno::ENOSPC
        );
        assert_eq!(Errno::from_io(&io::Error::from_raw_os_error(2)), Errno::EIO);
        assert_eq!(
            Errno::from_io(&io::Error::from(io::ErrorKind::PermissionDenied)),
            Errno::EPERM
        );
        assert_eq!(Command::from_wire(5), None);
        assert_eq!(Command::from_wire(6), Some(Command::WriteZeroes));
    }
}
