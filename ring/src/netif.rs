//! netif: the network device protocol (`io/netif.h`). Identical on every ABI.
//!
//! The TX ring carries [`NetifTxRequest`]s (12-byte slots, 256 per page), the RX ring
//! [`NetifRxRequest`]s and [`NetifRxResponse`]s (8-byte slots, 256 per page), the control ring
//! [`CtrlRequest`]s and [`CtrlResponse`]s (16-byte slots, 128 per page). [`NetifExtraInfo`]
//! overlays a TX request slot or an RX response slot.
//!
//! **The checksum bits differ between TX and RX** (`csum_blank` is bit 0 on TX and bit 1 on RX):
//! [`TxFlags`] and [`RxFlags`] are separate types so that they cannot be mixed up.

use crate::pod::{cast, widen, wire_layout};
use crate::ring::RingProtocol;
use crate::GrantRef;

/// Slots a backend must accept per packet without negotiation (the historical `MAX_SKB_FRAGS`).
pub const NR_SLOTS_MIN: usize = 18;
/// Largest packet on the TX ring (`size` is 16 bits).
pub const MAX_TX_SIZE: u32 = 0xFFFF;
/// Largest `xdp-headroom` (Linux).
pub const MAX_XDP_HEADROOM: u32 = 0x7FFF;

/// TX/RX response status: packet dropped.
pub const RSP_DROPPED: i16 = -2;
/// TX/RX response status: error.
pub const RSP_ERROR: i16 = -1;
/// TX response status: success.
pub const RSP_OKAY: i16 = 0;
/// TX response status of an extra-info slot (no response of its own).
pub const RSP_NULL: i16 = 1;

/// Extra info type: none (invalid).
pub const EXTRA_TYPE_NONE: u8 = 0;
/// Extra info type: GSO.
pub const EXTRA_TYPE_GSO: u8 = 1;
/// Extra info type: add a multicast address.
pub const EXTRA_TYPE_MCAST_ADD: u8 = 2;
/// Extra info type: remove a multicast address.
pub const EXTRA_TYPE_MCAST_DEL: u8 = 3;
/// Extra info type: hash value.
pub const EXTRA_TYPE_HASH: u8 = 4;
/// First invalid extra info type.
pub const EXTRA_TYPE_MAX: u8 = 5;
/// Extra info flag: another extra info slot follows.
pub const EXTRA_FLAG_MORE: u8 = 1 << 0;

/// GSO type: none.
pub const GSO_TYPE_NONE: u8 = 0;
/// GSO type: TCP over IPv4.
pub const GSO_TYPE_TCPV4: u8 = 1;
/// GSO type: TCP over IPv6.
pub const GSO_TYPE_TCPV6: u8 = 2;

/// Hash type bit: IPv4 addresses.
pub const HASH_TYPE_IPV4: u32 = 1 << 0;
/// Hash type bit: IPv4 addresses and TCP ports.
pub const HASH_TYPE_IPV4_TCP: u32 = 1 << 1;
/// Hash type bit: IPv6 addresses.
pub const HASH_TYPE_IPV6: u32 = 1 << 2;
/// Hash type bit: IPv6 addresses and TCP ports.
pub const HASH_TYPE_IPV6_TCP: u32 = 1 << 3;
/// Hash algorithm: none.
pub const HASH_ALGORITHM_NONE: u32 = 0;
/// Hash algorithm: Toeplitz.
pub const HASH_ALGORITHM_TOEPLITZ: u32 = 1;

/// Control message: invalid.
pub const CTRL_TYPE_INVALID: u16 = 0;
/// Control message: get the supported hash types.
pub const CTRL_TYPE_GET_HASH_FLAGS: u16 = 1;
/// Control message: set the hash types.
pub const CTRL_TYPE_SET_HASH_FLAGS: u16 = 2;
/// Control message: set the hash key (gref, length).
pub const CTRL_TYPE_SET_HASH_KEY: u16 = 3;
/// Control message: get the maximum mapping table size.
pub const CTRL_TYPE_GET_HASH_MAPPING_SIZE: u16 = 4;
/// Control message: set the mapping table size.
pub const CTRL_TYPE_SET_HASH_MAPPING_SIZE: u16 = 5;
/// Control message: set mapping table entries (gref, count, offset).
pub const CTRL_TYPE_SET_HASH_MAPPING: u16 = 6;
/// Control message: set the hash algorithm.
pub const CTRL_TYPE_SET_HASH_ALGORITHM: u16 = 7;
/// Control message: staging grants, get the mapping size.
pub const CTRL_TYPE_GET_GREF_MAPPING_SIZE: u16 = 8;
/// Control message: staging grants, add mappings.
pub const CTRL_TYPE_ADD_GREF_MAPPING: u16 = 9;
/// Control message: staging grants, remove mappings.
pub const CTRL_TYPE_DEL_GREF_MAPPING: u16 = 10;

/// Control status: success.
pub const CTRL_STATUS_SUCCESS: u32 = 0;
/// Control status: not supported.
pub const CTRL_STATUS_NOT_SUPPORTED: u32 = 1;
/// Control status: invalid parameter.
pub const CTRL_STATUS_INVALID_PARAMETER: u32 = 2;
/// Control status: buffer overflow.
pub const CTRL_STATUS_BUFFER_OVERFLOW: u32 = 3;

/// Staging grant flag: read-only.
pub const CTRLF_GREF_READONLY: u16 = 1 << 0;

macro_rules! flag_set {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $flag:ident = $bit:expr),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub u16);
        impl $name {
            $( $(#[$fm])* pub const $flag: Self = Self(1 << $bit); )+
            /// No flag.
            pub const fn empty() -> Self {
                Self(0)
            }
            /// Whether every flag of `other` is set.
            pub const fn contains(self, other: Self) -> bool {
                self.0 & other.0 == other.0
            }
            /// Bits that are not a known flag.
            pub const fn unknown_bits(self) -> u16 {
                self.0 & !(0 $( | (1 << $bit) )+)
            }
        }
        impl core::ops::BitOr for $name {
            type Output = Self;
            fn bitor(self, rhs: Self) -> Self {
                Self(self.0 | rhs.0)
            }
        }
        impl core::ops::BitOrAssign for $name {
            fn bitor_assign(&mut self, rhs: Self) {
                self.0 |= rhs.0
            }
        }
    };
}

flag_set!(
    /// `NETTXF_*`: flags of a TX request.
    TxFlags {
        /// The protocol checksum field is blank (checksum offload).
        CSUM_BLANK = 0,
        /// The data has been validated against its protocol checksum.
        DATA_VALIDATED = 1,
        /// The packet continues in the next slot.
        MORE_DATA = 2,
        /// Extra info slots follow.
        EXTRA_INFO = 3,
    }
);

flag_set!(
    /// `NETRXF_*`: flags of an RX response. Note the swapped checksum bits against [`TxFlags`].
    RxFlags {
        /// The data has been validated against its protocol checksum.
        DATA_VALIDATED = 0,
        /// The protocol checksum field is blank.
        CSUM_BLANK = 1,
        /// The packet continues in the next slot.
        MORE_DATA = 2,
        /// An extra info slot follows.
        EXTRA_INFO = 3,
        /// GSO prefix (deprecated).
        GSO_PREFIX = 4,
    }
);

/// `struct netif_tx_request`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetifTxRequest {
    /// Grant of the page holding the data.
    pub gref: GrantRef,
    /// Offset of the data in the page.
    pub offset: u16,
    /// [`TxFlags`] bits.
    pub flags: u16,
    /// Echoed in the response.
    pub id: u16,
    /// Total packet size in the first slot of a packet, the fragment size in the others.
    pub size: u16,
}
wire_layout!(NetifTxRequest, size 12, align 4, {
    gref @ 0, offset @ 4, flags @ 6, id @ 8, size @ 10,
});

impl NetifTxRequest {
    /// The flags.
    pub const fn tx_flags(&self) -> TxFlags {
        TxFlags(self.flags)
    }

    /// This slot read as extra info (meaningful after a slot with [`TxFlags::EXTRA_INFO`]).
    pub fn as_extra(&self) -> NetifExtraInfo {
        cast(self)
    }
}

/// `struct netif_tx_response` (4 bytes in a 12-byte slot).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetifTxResponse {
    /// The request's `id`.
    pub id: u16,
    /// `RSP_*`.
    pub status: i16,
}
wire_layout!(NetifTxResponse, size 4, align 2, { id @ 0, status @ 2 });

/// `struct netif_rx_request`: a page posted by the frontend for received data.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetifRxRequest {
    /// Echoed in the response.
    pub id: u16,
    _pad: u16,
    /// Grant of a writable page.
    pub gref: GrantRef,
}
wire_layout!(NetifRxRequest, size 8, align 4, { id @ 0, _pad @ 2, gref @ 4 });

impl NetifRxRequest {
    /// A request posting the page `gref`.
    pub const fn new(id: u16, gref: GrantRef) -> Self {
        Self { id, _pad: 0, gref }
    }
}

/// `struct netif_rx_response`: one fragment of a received packet.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetifRxResponse {
    /// The request's `id`.
    pub id: u16,
    /// Offset of the data in the page.
    pub offset: u16,
    /// [`RxFlags`] bits.
    pub flags: u16,
    /// Fragment size in bytes (≥ 0), or an `RSP_*` error (< 0).
    pub status: i16,
}
wire_layout!(NetifRxResponse, size 8, align 2, { id @ 0, offset @ 2, flags @ 4, status @ 6 });

impl NetifRxResponse {
    /// The flags.
    pub const fn rx_flags(&self) -> RxFlags {
        RxFlags(self.flags)
    }

    /// This slot read as extra info (meaningful after a response with [`RxFlags::EXTRA_INFO`]).
    pub fn as_extra(&self) -> NetifExtraInfo {
        cast(self)
    }
}

/// `struct netif_extra_info`: GSO, multicast or hash information in a TX request slot or an RX
/// response slot. The C union is kept as its 6 raw bytes, read and written through the typed
/// accessors.
#[repr(C, align(2))]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetifExtraInfo {
    /// `EXTRA_TYPE_*`.
    pub kind: u8,
    /// `EXTRA_FLAG_*`.
    pub flags: u8,
    /// The union `u`.
    pub u: [u8; 6],
}
wire_layout!(NetifExtraInfo, size 8, align 2, { kind @ 0, flags @ 1, u @ 2 });

/// The `gso` member of the extra info union.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Gso {
    /// Maximum segment size.
    pub size: u16,
    /// `GSO_TYPE_*`.
    pub kind: u8,
    /// GSO features (none defined).
    pub features: u16,
}

/// The `hash` member of the extra info union.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Hash {
    /// `HASH_TYPE_*` bit number.
    pub kind: u8,
    /// `HASH_ALGORITHM_*`.
    pub algorithm: u8,
    /// The hash value (least significant byte first).
    pub value: [u8; 4],
}

impl NetifExtraInfo {
    /// GSO extra info.
    pub fn gso(gso: Gso, flags: u8) -> Self {
        let s = gso.size.to_ne_bytes();
        let f = gso.features.to_ne_bytes();
        Self {
            kind: EXTRA_TYPE_GSO,
            flags,
            u: [s[0], s[1], gso.kind, 0, f[0], f[1]],
        }
    }

    /// Multicast add/remove extra info (`kind` is `EXTRA_TYPE_MCAST_ADD` or `_DEL`).
    pub fn mcast(kind: u8, addr: [u8; 6], flags: u8) -> Self {
        Self {
            kind,
            flags,
            u: addr,
        }
    }

    /// Hash extra info.
    pub fn hash(hash: Hash, flags: u8) -> Self {
        let v = hash.value;
        Self {
            kind: EXTRA_TYPE_HASH,
            flags,
            u: [hash.kind, hash.algorithm, v[0], v[1], v[2], v[3]],
        }
    }

    /// The union read as `gso`.
    pub fn as_gso(&self) -> Gso {
        let u = self.u;
        Gso {
            size: u16::from_ne_bytes([u[0], u[1]]),
            kind: u[2],
            features: u16::from_ne_bytes([u[4], u[5]]),
        }
    }

    /// The union read as `mcast.addr`.
    pub fn as_mcast(&self) -> [u8; 6] {
        self.u
    }

    /// The union read as `hash`.
    pub fn as_hash(&self) -> Hash {
        let u = self.u;
        Hash {
            kind: u[0],
            algorithm: u[1],
            value: [u[2], u[3], u[4], u[5]],
        }
    }

    /// Whether another extra info slot follows.
    pub const fn has_more(&self) -> bool {
        self.flags & EXTRA_FLAG_MORE != 0
    }

    /// The TX request slot holding this extra info (the 4 trailing bytes zeroed).
    pub fn to_tx_slot(&self) -> NetifTxRequest {
        widen(self)
    }

    /// The RX response slot holding this extra info.
    pub fn to_rx_slot(&self) -> NetifRxResponse {
        cast(self)
    }
}

/// `struct xen_netif_ctrl_request`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CtrlRequest {
    /// Echoed in the response.
    pub id: u16,
    /// `CTRL_TYPE_*`.
    pub kind: u16,
    /// Arguments.
    pub data: [u32; 3],
}
wire_layout!(CtrlRequest, size 16, align 4, { id @ 0, kind @ 2, data @ 4 });

/// `struct xen_netif_ctrl_response`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CtrlResponse {
    /// The request's `id`.
    pub id: u16,
    /// The request's `kind`.
    pub kind: u16,
    /// `CTRL_STATUS_*`.
    pub status: u32,
    /// Result value.
    pub data: u32,
}
wire_layout!(CtrlResponse, size 12, align 4, { id @ 0, kind @ 2, status @ 4, data @ 8 });

/// `struct xen_netif_gref`: an entry of a staging-grant list.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetifGref {
    /// The grant.
    pub gref: GrantRef,
    /// `CTRLF_GREF_*`.
    pub flags: u16,
    /// Status written by the backend.
    pub status: u16,
}
wire_layout!(NetifGref, size 8, align 4, { gref @ 0, flags @ 4, status @ 6 });

/// The TX ring (frontend → backend packets): 12-byte slots, 256 per page.
#[derive(Debug, Clone, Copy)]
pub enum NetifTx {}
impl RingProtocol for NetifTx {
    type Req = NetifTxRequest;
    type Rsp = NetifTxResponse;
}

/// The RX ring (backend → frontend packets): 8-byte slots, 256 per page.
#[derive(Debug, Clone, Copy)]
pub enum NetifRx {}
impl RingProtocol for NetifRx {
    type Req = NetifRxRequest;
    type Rsp = NetifRxResponse;
}

/// The control ring (hash configuration, staging grants): 16-byte slots, 128 per page.
#[derive(Debug, Clone, Copy)]
pub enum NetifCtrl {}
impl RingProtocol for NetifCtrl {
    type Req = CtrlRequest;
    type Rsp = CtrlResponse;
}

const _: () = {
    use crate::ring::{ring_entries, PAGE_SIZE};
    assert!(<NetifTx as RingProtocol>::ENTRY_SIZE == 12);
    assert!(<NetifRx as RingProtocol>::ENTRY_SIZE == 8);
    assert!(<NetifCtrl as RingProtocol>::ENTRY_SIZE == 16);
    assert!(ring_entries::<NetifTx>(PAGE_SIZE) == 256);
    assert!(ring_entries::<NetifRx>(PAGE_SIZE) == 256);
    assert!(ring_entries::<NetifCtrl>(PAGE_SIZE) == 128);
};
