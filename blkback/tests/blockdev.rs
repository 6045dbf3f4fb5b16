//! A real block device (a loop device with 4096-byte logical sectors over a temporary file):
//! its size, logical and physical sector sizes are read from the kernel, and I/O and
//! `BLKDISCARD` work through both engines.

mod common;

use common::slice;
use xenpv_blkback::storage::{FileOptions, FileStorage, IoUringStorage, Storage};

#[test]
fn loop_device_with_4k_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("lo.img");
    std::fs::write(&img, vec![0x11u8; 16 << 20]).unwrap();
    let dev = xenpv_tests::Loop::new(&img, 4096);
    let path = std::path::Path::new(&dev.0);
    let engines: Vec<Box<dyn Storage>> = vec![
        Box::new(FileStorage::open(path, FileOptions::default(), 512).unwrap()),
        Box::new(IoUringStorage::open(path, FileOptions::default(), 512).unwrap()),
    ];
    for s in engines {
        assert_eq!(s.size(), 16 << 20, "{}", s.engine());
        assert_eq!(s.logical_sector_size(), 4096, "{}", s.engine());
        assert_eq!(s.physical_sector_size(), 4096, "{}", s.engine());
        let mut w = vec![0xA5u8; 8192];
        s.write_from(4096, &[slice(&mut w)]).unwrap();
        s.flush().unwrap();
        let mut r = vec![0u8; 8192];
        s.read_into(4096, &[slice(&mut r)]).unwrap();
        assert_eq!(r, w);
        assert!(s.can_discard());
        s.discard(4096, 4096).unwrap();
        s.read_into(4096, &[slice(&mut r)]).unwrap();
        assert!(
            r[..4096].iter().all(|&b| b == 0),
            "{}: BLKDISCARD on a loop device zeroes",
            s.engine()
        );
        assert!(r[4096..].iter().all(|&b| b == 0xA5));
    }
}
