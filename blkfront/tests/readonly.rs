//! A read-only disk (`access=ro`: the backend's `mode` is `r`) end to end, through our blkback
//! and blkfront on the local platform.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use xenpv_blkfront::{Error, Op, Options};
use xenpv_xenstore::XsOps;

const SIZE: usize = 4 << 20;

/// The access modes (`O_RDONLY`, `O_RDWR`…) this process holds `path` open with: blkback
/// runs on a thread of it.
fn access_modes(path: &std::path::Path) -> Vec<i32> {
    xenpv_tests::open_flags(None, path)
        .into_iter()
        .map(|f| f as i32 & libc::O_ACCMODE)
        .collect()
}

/// blkback opens the image read-only, announces `info` with `VDISK_READONLY` (4) and no
/// discard; blkfront reports the disk read-only and refuses writes and discards itself (none
/// reaches the backend: its counters stay at zero), while reads and flushes work; the NBD
/// export of `xenpv-blkfront` advertises the disk read-only and without TRIM. The image never
/// changes.
#[test]
fn a_read_only_disk_end_to_end() {
    let env = env_with(SIZE, Backing::File, "access=ro,");
    let image = read_image(&env.img, 0, SIZE);
    assert_eq!(
        env.dom0.read_string(&format!("{}/mode", env.be)).unwrap(),
        "r"
    );
    let (_b, stats) = start_backend_with_stats(&env, Default::default());
    let modes = access_modes(&env.img);
    assert!(!modes.is_empty(), "blkback has not opened the image");
    assert!(
        modes.iter().all(|&m| m == libc::O_RDONLY),
        "the image is open for writing: {modes:?}"
    );

    let dev = connect(&env, Options::default());
    let node = |k: &str| {
        env.dom0
            .read_opt(&format!("{}/{k}", env.be))
            .unwrap()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    };
    assert_eq!(node("info").as_deref(), Some("4"), "VDISK_READONLY");
    assert_ne!(node("feature-discard").as_deref(), Some("1"));
    let info = dev.info();
    assert!(dev.read_only() && info.read_only, "{info:?}");
    assert_eq!(info.info & 4, 4, "{info:?}");
    assert!(!info.discard, "{info:?}");

    // Reads work.
    let mut buf = vec![0; SIZE];
    dev.read_at(&mut buf, 0).unwrap();
    assert!(buf == image);

    // Writes and discards are refused here, however they are submitted.
    let refused = |r: xenpv_blkfront::Result<()>, what: &str| match r {
        Err(Error::ReadOnly) => {}
        other => panic!("{what}: {other:?}"),
    };
    refused(dev.write_at(&[1; 4096], 0), "write_at");
    refused(
        dev.submit_ticket(Op::Write {
            offset: 1 << 20,
            data: vec![2; 65536],
        })
        .wait()
        .map(drop),
        "an asynchronous write",
    );
    refused(dev.discard(0, 1 << 20), "discard");
    // A flush writes no data: it reaches the backend, which answers it.
    dev.flush().unwrap();
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::SeqCst);
    assert_eq!(n(&stats.flushes), 1);
    assert_eq!(
        (n(&stats.writes), n(&stats.discards), n(&stats.errors)),
        (0, 0, 0),
        "a write or discard reached the backend"
    );
    assert!(dev.is_connected());
    dev.close().unwrap();

    // The NBD export says so too (the server then refuses writes and trims with EPERM).
    let export = Export::start(&env, &[]);
    let c = xenpv_nbd::Client::connect(&export.uri).unwrap();
    let i = *c.info();
    assert!(
        i.read_only() && !i.can_trim() && !i.can_write_zeroes(),
        "{i:?}"
    );
    let mut head = vec![0; 65536];
    c.read_at(&mut head, 0).unwrap();
    assert!(head[..] == image[..65536]);
    c.flush().unwrap();
    c.disconnect().unwrap();
    export.close();

    assert!(read_image(&env.img, 0, SIZE) == image, "the image changed");
    assert_eq!(n(&stats.errors), 0);
}
