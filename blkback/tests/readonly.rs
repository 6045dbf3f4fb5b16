//! A read-only device (`access=ro`: the backend's `mode` is `r`) served by the `xenpv-blkback`
//! process to a frontend played by the test, next to a read-write one for contrast.

#[path = "support/mod.rs"]
mod support;

use std::os::unix::fs::FileExt;

use support::*;
use xenpv_grant::GrantMemory;
use xenpv_ring::blkif::*;
use xenpv_xenstore::XenbusState;

/// The access modes (`O_RDONLY`, `O_RDWR`…) process `pid` holds `path` open with.
fn access_modes(pid: u32, path: &std::path::Path) -> Vec<i32> {
    xenpv_tests::open_flags(Some(pid), path)
        .into_iter()
        .map(|f| f as i32 & libc::O_ACCMODE)
        .collect()
}

/// The read-only device's image is open read-only (the read-write one's for writing), its
/// `info` is `VDISK_READONLY` (4) and it offers no discard; a write, a flush carrying data and
/// a discard are refused (ERROR, ERROR, EOPNOTSUPP) while a read and a pure flush are served;
/// the image never changes and the device stays Connected.
#[test]
fn a_read_only_device_refuses_writes_and_opens_its_image_read_only() {
    let p = Platform::start_with(&[(1, "xvda", "access=ro,"), (2, "xvda", "")]);
    let (ro, rw) = (p.image(1, "xvda"), p.image(2, "xvda"));
    let content: Vec<u8> = (0..DISK_BYTES).map(|i| (i % 251) as u8).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .open(ro)
        .unwrap()
        .write_all_at(&content, 0)
        .unwrap();
    let mut f = p.frontend(1, "xvda", false);
    let g = p.frontend(2, "xvda", false);

    assert_eq!(f.backend_node("mode").as_deref(), Some("r"));
    assert_eq!(f.backend_node("info").as_deref(), Some("4"));
    assert_ne!(f.backend_node("feature-discard").as_deref(), Some("1"));
    assert_eq!(g.backend_node("info").as_deref(), Some("0"));
    assert_eq!(g.backend_node("feature-discard").as_deref(), Some("1"));

    let pid = p.backend.0.id();
    let modes = access_modes(pid, ro);
    assert!(!modes.is_empty(), "blkback has not opened the image");
    assert!(
        modes.iter().all(|&m| m == libc::O_RDONLY),
        "the read-only image is open for writing: {modes:?}"
    );
    assert!(
        access_modes(pid, rw).contains(&libc::O_RDWR),
        "the read-write image is not open for writing"
    );

    f.data.volatile().fill(0, 4096, 0xEE).unwrap();
    f.data.volatile().fill(4096, 4096, 0).unwrap();
    let reqs = [
        f.rw(OP_WRITE, 1, 8, 0),
        // A flush carrying data writes it.
        f.rw(OP_FLUSH_DISKCACHE, 2, 16, 0),
        BlkifRequestDiscard::new(0, 0, 3, 0, 8).to_request(),
        f.rw(OP_READ, 4, 8, 1),
        BlkifRequest::new(OP_FLUSH_DISKCACHE, 0, 5, 0),
    ];
    let mut got = f.roundtrip(&reqs);
    got.sort_unstable();
    assert_eq!(
        got,
        [
            (1, RSP_ERROR),
            (2, RSP_ERROR),
            (3, RSP_EOPNOTSUPP),
            (4, RSP_OKAY),
            (5, RSP_OKAY)
        ]
    );
    let mut page = vec![0u8; 4096];
    f.data.volatile().read(4096, &mut page).unwrap();
    assert!(page[..] == content[8 * 512..8 * 512 + 4096], "the read");
    assert!(std::fs::read(ro).unwrap() == content, "the image changed");
    assert_eq!(f.backend_state(), XenbusState::Connected);
}
