//! Round trips through our blkback on the local platform, checked against the image file.

mod common;

use common::*;
use xenpv_blkfront::{Op, Options};
use xenpv_xenstore::XsOps;

const SIZE: usize = 8 << 20;

fn round_trip(opts: Options, backend: xenpv_blkback::device::Config) {
    let env = env(SIZE);
    let _b = start_backend(&env, backend.clone());
    let dev = connect(&env, opts.clone());
    let info = dev.info();
    // A backend without indirect requests does not write the key at all (blkif.h).
    let indirect = env
        .dom0
        .read_opt(&format!("{}/feature-max-indirect-segments", env.be))
        .unwrap();
    match backend.max_indirect_segments {
        0 => assert_eq!(indirect, None),
        n => assert_eq!(indirect, Some(n.to_string().into_bytes())),
    }
    assert_eq!(dev.size(), SIZE as u64);
    assert_eq!(dev.sector_size(), 512);
    assert!(!dev.read_only());
    eprintln!("negotiated: {info:?}");

    // Reads of the initial contents, of various sizes (direct, indirect, split).
    for (off, len) in [
        (0u64, 512usize),
        (4096, 4096),
        (512, 45056),
        (1 << 20, 1 << 20),
        (3 << 20, 3 << 20),
    ] {
        let mut buf = vec![0; len];
        dev.read_at(&mut buf, off).unwrap();
        assert_eq!(buf, read_image(&env.img, off, len), "read {off}+{len}");
    }
    // Writes, then check the image directly and read back.
    for (i, (off, len)) in [
        (0u64, 512usize),
        (8192, 4096),
        (1536, 50000 / 512 * 512),
        (2 << 20, 2 << 20),
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern(100 + i as u64, len);
        dev.write_at(&data, off).unwrap();
        assert_eq!(
            read_image(&env.img, off, len),
            data,
            "image after write {off}+{len}"
        );
        let mut back = vec![0; len];
        dev.read_at(&mut back, off).unwrap();
        assert_eq!(back, data);
    }
    dev.flush().unwrap();
    if info.discard {
        // Not whole 4 KiB discard units (our blkback's granularity): refused locally.
        assert_eq!(info.discard_granularity, 4096);
        for (offset, len) in [(512u64, 4096u64), (4096, 512), (0, 6144)] {
            let got = dev.discard(offset, len);
            assert!(
                matches!(got, Err(xenpv_blkfront::Error::DiscardUnaligned { .. })),
                "{offset}+{len}: {got:?}"
            );
        }
        dev.discard(4 << 20, 1 << 20).unwrap();
        let mut buf = vec![1; 1 << 20];
        dev.read_at(&mut buf, 4 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "discarded range reads zero");
        assert_eq!(read_image(&env.img, 4 << 20, 1 << 20), buf);
    }
    // Reads in place: every piece seen once, where the backend put it, the same bytes as the
    // image (the written pattern, the discarded zeros, the initial contents), across pages,
    // requests (a 3 MiB read is several) and both kinds of pages (pooled persistent ones,
    // per-request grants).
    for (off, len) in [
        (0u64, 512usize),
        (8192, 4096),
        (1536, 50000 / 512 * 512),
        (2 << 20, 3 << 20),
    ] {
        assert_eq!(
            read_in_place(&dev, off, len).unwrap(),
            read_image(&env.img, off, len),
            "read in place {off}+{len}"
        );
    }
    // A refused one never calls its consumer.
    assert!(read_in_place(&dev, SIZE as u64, 512).is_err());
    // Bad requests are refused locally.
    assert!(dev.read_at(&mut [0; 100], 0).is_err());
    assert!(dev.read_at(&mut [0; 512], SIZE as u64).is_err());
    dev.close().unwrap();
    assert!(dev.read_at(&mut [0; 512], 0).is_err());
    let state = xenpv_xenstore::xenbus::read_state(&env.dom0, &env.fe).unwrap();
    assert_eq!(state, xenpv_xenstore::XenbusState::Closed);
}

/// Reads `len` bytes at `off` with [`Front::submit_read_in_place`], putting each piece in its
/// place in a buffer; panics if a piece comes twice, is misplaced, or if the read succeeds with
/// a piece missing.
fn read_in_place(dev: &Front, off: u64, len: usize) -> xenpv_blkfront::Result<Vec<u8>> {
    use std::sync::{Arc, Mutex};
    // The buffer and which bytes were filled.
    let got = Arc::new(Mutex::new((vec![0u8; len], vec![false; len])));
    let g = got.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    dev.submit_read_in_place(
        off,
        len,
        Box::new(move |at, piece| {
            let (buf, seen) = &mut *g.lock().unwrap();
            let end = at + piece.len();
            assert!(
                end <= len,
                "piece {at}+{} past the read's {len}",
                piece.len()
            );
            assert!(seen[at..end].iter().all(|&s| !s), "piece at {at} twice");
            seen[at..end].fill(true);
            piece.read(0, &mut buf[at..end]).unwrap();
        }),
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    let r = rx.recv().unwrap();
    let (buf, seen) = std::mem::take(&mut *got.lock().unwrap());
    match r {
        Ok(v) => {
            assert!(v.is_empty(), "a read in place hands back no buffer");
            assert!(seen.iter().all(|&s| s), "a piece of {off}+{len} never came");
            Ok(buf)
        }
        Err(e) => {
            assert!(seen.iter().all(|&s| !s), "a refused read consumed data");
            Err(e)
        }
    }
}

#[test]
fn defaults_persistent_indirect() {
    round_trip(Options::default(), Default::default());
}

#[test]
fn no_persistent_no_indirect() {
    round_trip(
        Options {
            persistent: false,
            indirect: false,
            ..Options::default()
        },
        Default::default(),
    );
}

#[test]
fn no_persistent_indirect_two_queues_order_two() {
    round_trip(
        Options {
            persistent: false,
            queues: 2,
            ring_order: 2,
            ..Options::default()
        },
        Default::default(),
    );
}

#[test]
fn persistent_two_queues_order_two_backend_without_indirect() {
    round_trip(
        Options {
            queues: 2,
            ring_order: 2,
            ..Options::default()
        },
        xenpv_blkback::device::Config {
            max_indirect_segments: 0,
            ..Default::default()
        },
    );
}

#[test]
fn deep_queue_64_in_flight() {
    let env = env(SIZE);
    let _b = start_backend(&env, Default::default());
    let dev = connect(
        &env,
        Options {
            queues: 2,
            ring_order: 1,
            ..Options::default()
        },
    );
    let mut tickets = Vec::new();
    for i in 0..64u64 {
        let data = pattern(1000 + i, 8192);
        tickets.push((
            i,
            dev.submit_ticket(Op::Write {
                offset: i * 65536,
                data,
            }),
        ));
    }
    for (_, t) in tickets.drain(..) {
        t.wait().unwrap();
    }
    for i in 0..64u64 {
        tickets.push((
            i,
            dev.submit_ticket(Op::Read {
                offset: i * 65536,
                len: 8192,
            }),
        ));
    }
    for (i, t) in tickets {
        let data = t.wait().unwrap();
        assert_eq!(data, pattern(1000 + i, 8192));
        assert_eq!(read_image(&env.img, i * 65536, 8192), data);
    }
    dev.close().unwrap();
}

/// The load generator of `xenpv-blkfront --load` (the bench's no-NBD path): random writes at
/// QD4 land whole blocks of its pattern in the image and nowhere else; sequential 1 MiB reads
/// at QD2 (indirect requests) complete without errors; latencies and rates are consistent.
#[test]
fn load_generator_drives_the_device() {
    use xenpv_blkfront::load::{run, Workload};
    let env = env(SIZE);
    let before = read_image(&env.img, 0, SIZE);
    let _b = start_backend(&env, Default::default());
    let dev = std::sync::Arc::new(connect(&env, Options::default()));

    let w: Workload = "randwrite 4096 4 0.1 0.4".parse().unwrap();
    let r = run(&dev, &w).unwrap();
    eprintln!("randwrite: {r:?}");
    assert_eq!(r.errors, 0);
    assert!(r.ios > 0 && r.iops > 0.0 && r.all_ios >= r.ios, "{r:?}");
    assert!(r.p50_us > 0.0 && r.p50_us <= r.p99_us, "{r:?}");
    assert!((r.mbps - r.iops * 4096.0 / 1e6).abs() < 1e-6 * r.mbps.max(1.0));
    let written: Vec<u8> = (0..4096).map(|i| (i as u8) ^ 0xa5).collect();
    let after = read_image(&env.img, 0, SIZE);
    let mut changed = 0;
    for (b, (new, old)) in after.chunks(4096).zip(before.chunks(4096)).enumerate() {
        if new != old {
            assert_eq!(
                new,
                &written[..],
                "block {b} holds neither its data nor the pattern"
            );
            changed += 1;
        }
    }
    assert!(changed > 0, "no block was written");

    let w: Workload = "read 1048576 2 0 0.3".parse().unwrap();
    let r = run(&dev, &w).unwrap();
    eprintln!("read: {r:?}");
    assert_eq!(r.errors, 0);
    assert!(r.ios > 0 && r.p50_us <= r.p99_us, "{r:?}");
    dev.close().unwrap();
    // A closed device fails the first operation: the run stops and says so.
    let r = run(&dev, &"randread 4096 2 0 0.1".parse().unwrap()).unwrap();
    assert_eq!((r.ios, r.errors), (0, 2));
}

/// A backend offering the most segments the protocol allows (4096, in 8 indirect pages) and a
/// frontend asking for them. With persistent grants one request then needs more pages (4104)
/// than the frontend's pool holds by default (1024): the pool takes the largest request instead
/// of failing it. Without them, the frontend shares and the backend maps 4096 data pages in one
/// call each.
fn largest_requests(persistent: bool) {
    const BIG: usize = 16 << 20;
    let env = env(BIG + (1 << 20));
    let _b = start_backend(
        &env,
        xenpv_blkback::device::Config {
            max_indirect_segments: 4096,
            ..Default::default()
        },
    );
    let opts = Options {
        max_indirect_segments: 4096,
        persistent,
        ..Options::default()
    };
    assert!(opts.pool_pages.most() < 4104);
    let dev = connect(&env, opts);
    let info = dev.info();
    assert_eq!(info.persistent, persistent, "{info:?}");
    assert_eq!(info.max_segments, 4096, "{info:?}");
    let data = pattern(7, BIG);
    dev.write_at(&data, 4096).unwrap();
    assert!(read_image(&env.img, 4096, BIG) == data, "16 MiB write");
    let mut back = vec![0; BIG];
    dev.read_at(&mut back, 4096).unwrap();
    assert!(back == data, "16 MiB read back differs");
    assert!(read_in_place(&dev, 4096, BIG).unwrap() == data);
    dev.close().unwrap();
}

#[test]
fn the_largest_requests_with_persistent_grants_outgrow_the_pool() {
    largest_requests(true);
}

#[test]
fn the_largest_requests_without_persistent_grants_map_in_one_call() {
    largest_requests(false);
}

/// A disk of 4096-byte logical and physical sectors end to end: blkback reads them from the
/// block device and announces them (`sector-size`, `physical-sector-size`), blkfront takes
/// them up, does aligned I/O and refuses I/O that is not aligned to 4096 bytes; `sectors`
/// stays in 512-byte units.
#[test]
fn a_disk_of_4096_byte_sectors() {
    let env = env(SIZE);
    let lo = xenpv_tests::Loop::new(&env.img, 4096);
    env.dom0
        .write_str(&format!("{}/params", env.be), &lo.0)
        .unwrap();
    let _b = start_backend(&env, Default::default());
    let dev = connect(&env, Options::default());
    let node = |k: &str| {
        String::from_utf8(
            env.dom0
                .read_opt(&format!("{}/{k}", env.be))
                .unwrap()
                .unwrap_or_default(),
        )
        .unwrap()
    };
    assert_eq!(node("sector-size"), "4096");
    assert_eq!(node("physical-sector-size"), "4096");
    assert_eq!(node("sectors"), (SIZE / 512).to_string());
    let info = dev.info();
    assert_eq!(dev.sector_size(), 4096);
    assert_eq!(info.physical_sector_size, 4096);
    assert_eq!(dev.size(), SIZE as u64);
    let data = pattern(4096, 3 * 4096);
    dev.write_at(&data, 5 * 4096).unwrap();
    dev.flush().unwrap();
    let mut back = vec![0; data.len()];
    dev.read_at(&mut back, 5 * 4096).unwrap();
    assert_eq!(back, data);
    assert_eq!(read_image(&env.img, 5 * 4096, data.len()), data);
    for (offset, len) in [(512u64, 4096usize), (0, 512), (4096, 6144)] {
        let got = dev.read_at(&mut vec![0; len], offset);
        assert!(
            matches!(got, Err(xenpv_blkfront::Error::Unaligned { .. })),
            "{offset}+{len}: {got:?}"
        );
    }
}
