//! ABI probe: compiles `abi/probe.c` against Debian's `libxen-dev` headers (`xen/io/ring.h`,
//! `xen/io/blkif.h`, `xen/io/netif.h`), once for x86_64 and once for i386, runs it, and compares
//! every size, alignment, field offset and constant it prints with the Rust types.

use std::collections::BTreeMap;
use std::mem::{align_of, offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

use xenpv_ring::blkif::*;
use xenpv_ring::netif::*;
use xenpv_ring::{ring_entries, RingProtocol, PAGE_SIZE};

type Table = BTreeMap<String, usize>;

macro_rules! s {
    ($v:ident, $c:literal, $t:ty) => {
        $v.insert(concat!($c, ".size").into(), size_of::<$t>());
        $v.insert(concat!($c, ".align").into(), align_of::<$t>());
    };
}
macro_rules! f {
    ($v:ident, $c:literal, $t:ty, { $($cf:literal => $rf:ident),+ $(,)? }) => {
        $( $v.insert(concat!($c, ".", $cf).into(), offset_of!($t, $rf)); )+
    };
}
macro_rules! entry {
    ($v:ident, $c:literal, $p:ty, $align:expr) => {
        $v.insert(
            concat!($c, ".size").into(),
            <$p as RingProtocol>::ENTRY_SIZE,
        );
        $v.insert(concat!($c, ".align").into(), $align);
    };
}

fn netif_and_constants(v: &mut Table) {
    s!(v, "struct netif_tx_request", NetifTxRequest);
    f!(v, "struct netif_tx_request", NetifTxRequest,
        { "gref" => gref, "offset" => offset, "flags" => flags, "id" => id, "size" => size });
    s!(v, "struct netif_tx_response", NetifTxResponse);
    f!(v, "struct netif_tx_response", NetifTxResponse, { "id" => id, "status" => status });
    s!(v, "struct netif_rx_request", NetifRxRequest);
    f!(v, "struct netif_rx_request", NetifRxRequest, { "id" => id, "gref" => gref });
    s!(v, "struct netif_rx_response", NetifRxResponse);
    f!(v, "struct netif_rx_response", NetifRxResponse,
        { "id" => id, "offset" => offset, "flags" => flags, "status" => status });
    s!(v, "struct netif_extra_info", NetifExtraInfo);
    f!(v, "struct netif_extra_info", NetifExtraInfo, { "type" => kind, "flags" => flags, "u" => u });
    // The union members, at the positions the typed accessors read and write (checked by
    // `extra_info_accessors_use_the_c_offsets` below).
    let u = offset_of!(NetifExtraInfo, u);
    for (k, off) in [
        ("u.gso.size", 0),
        ("u.gso.type", 2),
        ("u.gso.features", 4),
        ("u.mcast.addr", 0),
        ("u.hash.type", 0),
        ("u.hash.algorithm", 1),
        ("u.hash.value", 2),
    ] {
        v.insert(format!("struct netif_extra_info.{k}"), u + off);
    }
    s!(v, "struct xen_netif_ctrl_request", CtrlRequest);
    f!(v, "struct xen_netif_ctrl_request", CtrlRequest, { "id" => id, "type" => kind, "data" => data });
    s!(v, "struct xen_netif_ctrl_response", CtrlResponse);
    f!(v, "struct xen_netif_ctrl_response", CtrlResponse,
        { "id" => id, "type" => kind, "status" => status, "data" => data });
    s!(v, "struct xen_netif_gref", NetifGref);
    f!(v, "struct xen_netif_gref", NetifGref, { "ref" => gref, "flags" => flags, "status" => status });
    entry!(v, "union netif_tx_sring_entry", NetifTx, 4);
    entry!(v, "union netif_rx_sring_entry", NetifRx, 4);
    entry!(v, "union xen_netif_ctrl_sring_entry", NetifCtrl, 4);
    v.insert(
        "netif_tx.ring_size.1".into(),
        ring_entries::<NetifTx>(PAGE_SIZE) as usize,
    );
    v.insert(
        "netif_rx.ring_size.1".into(),
        ring_entries::<NetifRx>(PAGE_SIZE) as usize,
    );
    v.insert(
        "xen_netif_ctrl.ring_size.1".into(),
        ring_entries::<NetifCtrl>(PAGE_SIZE) as usize,
    );

    for (k, val) in [
        ("BLKIF_OP_READ", OP_READ),
        ("BLKIF_OP_WRITE", OP_WRITE),
        ("BLKIF_OP_WRITE_BARRIER", OP_WRITE_BARRIER),
        ("BLKIF_OP_FLUSH_DISKCACHE", OP_FLUSH_DISKCACHE),
        ("BLKIF_OP_RESERVED_1", OP_RESERVED_1),
        ("BLKIF_OP_DISCARD", OP_DISCARD),
        ("BLKIF_OP_INDIRECT", OP_INDIRECT),
    ] {
        v.insert(k.into(), val as usize);
    }
    v.insert(
        "BLKIF_MAX_SEGMENTS_PER_REQUEST".into(),
        MAX_SEGMENTS_PER_REQUEST,
    );
    v.insert(
        "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST".into(),
        MAX_INDIRECT_PAGES_PER_REQUEST,
    );
    for (k, flag) in [
        ("NETTXF_csum_blank", TxFlags::CSUM_BLANK),
        ("NETTXF_data_validated", TxFlags::DATA_VALIDATED),
        ("NETTXF_more_data", TxFlags::MORE_DATA),
        ("NETTXF_extra_info", TxFlags::EXTRA_INFO),
    ] {
        v.insert(k.into(), flag.0 as usize);
    }
    for (k, flag) in [
        ("NETRXF_data_validated", RxFlags::DATA_VALIDATED),
        ("NETRXF_csum_blank", RxFlags::CSUM_BLANK),
        ("NETRXF_more_data", RxFlags::MORE_DATA),
        ("NETRXF_extra_info", RxFlags::EXTRA_INFO),
        ("NETRXF_gso_prefix", RxFlags::GSO_PREFIX),
    ] {
        v.insert(k.into(), flag.0 as usize);
    }
    v.insert("XEN_NETIF_NR_SLOTS_MIN".into(), NR_SLOTS_MIN);
    v.insert("XEN_NETIF_MAX_TX_SIZE".into(), MAX_TX_SIZE as usize);
}

fn sring_header(v: &mut Table) {
    for (k, off) in [
        ("req_prod", 0),
        ("req_event", 4),
        ("rsp_prod", 8),
        ("rsp_event", 12),
        ("pvt", 16),
        ("ring", xenpv_ring::HEADER_SIZE),
    ] {
        v.insert(format!("struct blkif_sring.{k}"), off);
    }
}

fn segment(v: &mut Table) {
    s!(v, "struct blkif_request_segment", BlkifRequestSegment);
    f!(v, "struct blkif_request_segment", BlkifRequestSegment,
        { "gref" => gref, "first_sect" => first_sect, "last_sect" => last_sect });
}

fn expected_x86_64() -> Table {
    let mut v = Table::new();
    segment(&mut v);
    s!(v, "struct blkif_request", BlkifRequest);
    f!(v, "struct blkif_request", BlkifRequest, {
        "operation" => operation, "nr_segments" => nr_segments, "handle" => handle, "id" => id,
        "sector_number" => sector_number, "seg" => seg,
    });
    s!(v, "struct blkif_request_discard", BlkifRequestDiscard);
    f!(v, "struct blkif_request_discard", BlkifRequestDiscard, {
        "operation" => operation, "flag" => flag, "handle" => handle, "id" => id,
        "sector_number" => sector_number, "nr_sectors" => nr_sectors,
    });
    s!(v, "struct blkif_request_indirect", BlkifRequestIndirect);
    f!(v, "struct blkif_request_indirect", BlkifRequestIndirect, {
        "operation" => operation, "indirect_op" => indirect_op, "nr_segments" => nr_segments,
        "id" => id, "sector_number" => sector_number, "handle" => handle,
        "indirect_grefs" => indirect_grefs,
    });
    s!(v, "struct blkif_response", BlkifResponse);
    f!(v, "struct blkif_response", BlkifResponse,
        { "id" => id, "operation" => operation, "status" => status });
    entry!(v, "union blkif_sring_entry", Blkif, 8);
    sring_header(&mut v);
    v.insert(
        "blkif.ring_size.1".into(),
        ring_entries::<Blkif>(PAGE_SIZE) as usize,
    );
    v.insert(
        "blkif.ring_size.16".into(),
        ring_entries::<Blkif>(16 * PAGE_SIZE) as usize,
    );
    netif_and_constants(&mut v);
    v
}

fn expected_x86_32() -> Table {
    let mut v = Table::new();
    segment(&mut v);
    s!(v, "struct blkif_request", X86_32Request);
    f!(v, "struct blkif_request", X86_32Request, {
        "operation" => operation, "nr_segments" => nr_segments, "handle" => handle, "id" => id,
        "sector_number" => sector_number, "seg" => seg,
    });
    s!(v, "struct blkif_request_discard", X86_32RequestDiscard);
    f!(v, "struct blkif_request_discard", X86_32RequestDiscard, {
        "operation" => operation, "flag" => flag, "handle" => handle, "id" => id,
        "sector_number" => sector_number, "nr_sectors" => nr_sectors,
    });
    s!(v, "struct blkif_request_indirect", X86_32RequestIndirect);
    f!(v, "struct blkif_request_indirect", X86_32RequestIndirect, {
        "operation" => operation, "indirect_op" => indirect_op, "nr_segments" => nr_segments,
        "id" => id, "sector_number" => sector_number, "handle" => handle,
        "indirect_grefs" => indirect_grefs,
    });
    s!(v, "struct blkif_response", X86_32Response);
    f!(v, "struct blkif_response", X86_32Response,
        { "id" => id, "operation" => operation, "status" => status });
    entry!(v, "union blkif_sring_entry", BlkifX86_32, 4);
    sring_header(&mut v);
    v.insert(
        "blkif.ring_size.1".into(),
        ring_entries::<BlkifX86_32>(PAGE_SIZE) as usize,
    );
    v.insert(
        "blkif.ring_size.16".into(),
        ring_entries::<BlkifX86_32>(16 * PAGE_SIZE) as usize,
    );
    netif_and_constants(&mut v);
    v
}

fn run_probe(bits: &str) -> Table {
    assert!(
        Path::new("/usr/include/xen/io/ring.h").exists(),
        "the ABI probe needs Xen's public headers: install them with `apt-get install -y libxen-dev`"
    );
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/abi/probe.c");
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("xen-abi-probe-{bits}"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .arg(format!("-m{bits}"))
        .arg("-std=gnu11")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e} (install gcc)"));
    assert!(
        out.status.success(),
        "compiling the ABI probe with -m{bits} failed{}:\n{}",
        if bits == "32" {
            " (for -m32 install gcc-multilib: `apt-get install -y gcc-multilib`)"
        } else {
            ""
        },
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().expect("run the ABI probe");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .expect("probe output is ASCII")
        .lines()
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').expect("`key value` lines");
            (k.to_string(), v.parse().expect("a number"))
        })
        .collect()
}

fn compare(bits: &str, c: Table, rust: Table) {
    let mut mismatches = Vec::new();
    for (k, cv) in &c {
        match rust.get(k) {
            Some(rv) if rv == cv => {}
            Some(rv) => mismatches.push(format!("{k}: C {cv}, Rust {rv}")),
            None => mismatches.push(format!("{k}: C {cv}, not checked on the Rust side")),
        }
    }
    for k in rust.keys().filter(|k| !c.contains_key(*k)) {
        mismatches.push(format!(
            "{k}: checked on the Rust side, not printed by the probe"
        ));
    }
    assert!(
        mismatches.is_empty(),
        "x86_{bits} ABI mismatches:\n{}",
        mismatches.join("\n")
    );
    println!(
        "ABI probe (-m{bits}): {} sizes, alignments, offsets and constants match",
        c.len()
    );
}

#[test]
fn abi_probe_matches_libxen_headers_x86_64() {
    compare("64", run_probe("64"), expected_x86_64());
}

#[test]
fn abi_probe_matches_libxen_headers_x86_32() {
    compare("32", run_probe("32"), expected_x86_32());
}

#[test]
fn extra_info_accessors_use_the_c_offsets() {
    let gso = NetifExtraInfo::gso(
        Gso {
            size: 0x0102,
            kind: 3,
            features: 0x0405,
        },
        1,
    );
    assert_eq!(gso.u[0..2], 0x0102u16.to_ne_bytes());
    assert_eq!(gso.u[2], 3);
    assert_eq!(gso.u[4..6], 0x0405u16.to_ne_bytes());
    let hash = NetifExtraInfo::hash(
        Hash {
            kind: 1,
            algorithm: 2,
            value: [3, 4, 5, 6],
        },
        0,
    );
    assert_eq!(hash.u, [1, 2, 3, 4, 5, 6]);
    assert_eq!(
        NetifExtraInfo::mcast(EXTRA_TYPE_MCAST_ADD, [9; 6], 0).u,
        [9; 6]
    );
}
