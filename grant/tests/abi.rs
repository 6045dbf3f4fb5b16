//! ABI probe: compiles `abi/probe.c` against Debian's `linux-libc-dev` headers
//! (`xen/gntdev.h`, `xen/gntalloc.h`), runs it, and compares every size, field offset and ioctl
//! number it prints with the Rust transcription in `xenpv_grant::xen::abi`. Also checks that the
//! Xen provider, off Xen, fails with the error that points at the local platform.

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

use xenpv_grant::xen::abi::*;
use xenpv_grant::xen::{XenGntalloc, XenGntdev};

type Table = BTreeMap<String, usize>;

fn expected() -> Table {
    let mut v = Table::new();
    let mut put = |k: &str, x: usize| {
        v.insert(k.to_string(), x);
    };
    put("ioctl_gntdev_grant_ref.size", size_of::<GntdevGrantRef>());
    put(
        "ioctl_gntdev_grant_ref.domid",
        offset_of!(GntdevGrantRef, domid),
    );
    put(
        "ioctl_gntdev_grant_ref.ref",
        offset_of!(GntdevGrantRef, gref),
    );
    put(
        "ioctl_gntdev_map_grant_ref.size",
        size_of::<GntdevMapGrantRef>(),
    );
    put(
        "ioctl_gntdev_map_grant_ref.count",
        offset_of!(GntdevMapGrantRef, count),
    );
    put(
        "ioctl_gntdev_map_grant_ref.pad",
        offset_of!(GntdevMapGrantRef, pad),
    );
    put(
        "ioctl_gntdev_map_grant_ref.index",
        offset_of!(GntdevMapGrantRef, index),
    );
    put(
        "ioctl_gntdev_map_grant_ref.refs",
        offset_of!(GntdevMapGrantRef, refs),
    );
    put(
        "ioctl_gntdev_unmap_grant_ref.size",
        size_of::<GntdevUnmapGrantRef>(),
    );
    put(
        "ioctl_gntdev_unmap_grant_ref.index",
        offset_of!(GntdevUnmapGrantRef, index),
    );
    put(
        "ioctl_gntdev_unmap_grant_ref.count",
        offset_of!(GntdevUnmapGrantRef, count),
    );
    put(
        "ioctl_gntdev_set_max_grants.size",
        size_of::<GntdevSetMaxGrants>(),
    );
    put("ioctl_gntdev_unmap_notify.size", size_of::<UnmapNotify>());
    put(
        "ioctl_gntdev_unmap_notify.index",
        offset_of!(UnmapNotify, index),
    );
    put(
        "ioctl_gntdev_unmap_notify.action",
        offset_of!(UnmapNotify, action),
    );
    put(
        "ioctl_gntdev_unmap_notify.event_channel_port",
        offset_of!(UnmapNotify, event_channel_port),
    );
    put(
        "gntdev_grant_copy_segment.size",
        size_of::<GntdevGrantCopySegment>(),
    );
    put(
        "gntdev_grant_copy_segment.source",
        offset_of!(GntdevGrantCopySegment, source),
    );
    put(
        "gntdev_grant_copy_segment.source.foreign.ref",
        offset_of!(GntdevCopyForeign, gref),
    );
    put(
        "gntdev_grant_copy_segment.source.foreign.offset",
        offset_of!(GntdevCopyForeign, offset),
    );
    put(
        "gntdev_grant_copy_segment.source.foreign.domid",
        offset_of!(GntdevCopyForeign, domid),
    );
    put(
        "gntdev_grant_copy_segment.dest",
        offset_of!(GntdevGrantCopySegment, dest),
    );
    put(
        "gntdev_grant_copy_segment.len",
        offset_of!(GntdevGrantCopySegment, len),
    );
    put(
        "gntdev_grant_copy_segment.flags",
        offset_of!(GntdevGrantCopySegment, flags),
    );
    put(
        "gntdev_grant_copy_segment.status",
        offset_of!(GntdevGrantCopySegment, status),
    );
    put("ioctl_gntdev_grant_copy.size", size_of::<GntdevGrantCopy>());
    put(
        "ioctl_gntdev_grant_copy.count",
        offset_of!(GntdevGrantCopy, count),
    );
    put(
        "ioctl_gntdev_grant_copy.segments",
        offset_of!(GntdevGrantCopy, segments),
    );
    put(
        "ioctl_gntalloc_alloc_gref.size",
        size_of::<GntallocAllocGref>(),
    );
    put(
        "ioctl_gntalloc_alloc_gref.domid",
        offset_of!(GntallocAllocGref, domid),
    );
    put(
        "ioctl_gntalloc_alloc_gref.flags",
        offset_of!(GntallocAllocGref, flags),
    );
    put(
        "ioctl_gntalloc_alloc_gref.count",
        offset_of!(GntallocAllocGref, count),
    );
    put(
        "ioctl_gntalloc_alloc_gref.index",
        offset_of!(GntallocAllocGref, index),
    );
    put(
        "ioctl_gntalloc_alloc_gref.gref_ids",
        offset_of!(GntallocAllocGref, gref_ids),
    );
    put(
        "ioctl_gntalloc_dealloc_gref.size",
        size_of::<GntallocDeallocGref>(),
    );
    put(
        "ioctl_gntalloc_dealloc_gref.index",
        offset_of!(GntallocDeallocGref, index),
    );
    put(
        "ioctl_gntalloc_dealloc_gref.count",
        offset_of!(GntallocDeallocGref, count),
    );
    put("ioctl_gntalloc_unmap_notify.size", size_of::<UnmapNotify>());
    put(
        "ioctl_gntalloc_unmap_notify.action",
        offset_of!(UnmapNotify, action),
    );
    for (k, c) in [
        ("IOCTL_GNTDEV_MAP_GRANT_REF", IOCTL_GNTDEV_MAP_GRANT_REF),
        ("IOCTL_GNTDEV_UNMAP_GRANT_REF", IOCTL_GNTDEV_UNMAP_GRANT_REF),
        ("IOCTL_GNTDEV_SET_MAX_GRANTS", IOCTL_GNTDEV_SET_MAX_GRANTS),
        (
            "IOCTL_GNTDEV_SET_UNMAP_NOTIFY",
            IOCTL_GNTDEV_SET_UNMAP_NOTIFY,
        ),
        ("IOCTL_GNTDEV_GRANT_COPY", IOCTL_GNTDEV_GRANT_COPY),
        ("IOCTL_GNTALLOC_ALLOC_GREF", IOCTL_GNTALLOC_ALLOC_GREF),
        ("IOCTL_GNTALLOC_DEALLOC_GREF", IOCTL_GNTALLOC_DEALLOC_GREF),
        (
            "IOCTL_GNTALLOC_SET_UNMAP_NOTIFY",
            IOCTL_GNTALLOC_SET_UNMAP_NOTIFY,
        ),
        ("UNMAP_NOTIFY_CLEAR_BYTE", UNMAP_NOTIFY_CLEAR_BYTE),
        ("UNMAP_NOTIFY_SEND_EVENT", UNMAP_NOTIFY_SEND_EVENT),
        ("GNTALLOC_FLAG_WRITABLE", u32::from(GNTALLOC_FLAG_WRITABLE)),
    ] {
        put(k, c as usize);
    }
    v
}

fn run_probe() -> Table {
    assert!(
        Path::new("/usr/include/xen/gntdev.h").exists(),
        "the ABI probe needs Linux's Xen uapi headers: `apt-get install -y linux-libc-dev`"
    );
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/abi/probe.c");
    let exe = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gntdev-abi-probe");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=gnu11", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e} (install gcc)"));
    assert!(
        out.status.success(),
        "compiling the gntdev ABI probe failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().expect("run the ABI probe");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

#[test]
fn gntdev_and_gntalloc_match_the_c_headers() {
    let c = run_probe();
    let rust = expected();
    assert_eq!(
        c.len(),
        rust.len(),
        "the probe and the Rust table list different keys"
    );
    let diff: Vec<String> = rust
        .iter()
        .filter(|(k, v)| c.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: rust {v}, C {:?}", c.get(k)))
        .collect();
    assert!(diff.is_empty(), "ABI mismatches:\n{}", diff.join("\n"));
}

#[test]
fn off_xen_the_error_points_at_the_local_platform() {
    if Path::new("/dev/xen/gntdev").exists() {
        return; // running on Xen: nothing to check here
    }
    let e = XenGntdev::open().unwrap_err().to_string();
    assert_eq!(
        e,
        "cannot open /dev/xen/gntdev: not running on Xen (use --platform local or start \
         'xenpv local')"
    );
    let e = XenGntalloc::open().unwrap_err().to_string();
    assert!(
        e.starts_with("cannot open /dev/xen/gntalloc: not running on Xen"),
        "{e}"
    );
}
