//! FLUSH, FUA and TRIM through `xenpv-blkfront`'s NBD export, driven by our NBD client; our
//! blkback's counters show what reached the backend, the image what happened to the data.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use common::*;
use xenpv_nbd::Client;

const MIB: u64 = 1 << 20;

fn count(c: &AtomicU64) -> u64 {
    c.load(Ordering::SeqCst)
}

/// One NBD_CMD_TRIM, with or without FUA; it must succeed.
fn trim(c: &Client, offset: u64, len: u32, fua: bool) {
    let h = c.submit_trim(offset, len, fua).unwrap();
    c.wait(h)
        .unwrap_or_else(|e| panic!("TRIM {offset}+{len} (fua {fua}): {e}"));
}

/// `len` bytes at `offset` read through the export, checked against the image.
fn read(c: &Client, env: &Env, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xaa; len];
    c.read_at(&mut buf, offset).unwrap();
    assert!(
        buf == read_image(&env.img, offset, len),
        "{offset}+{len}: the export and the image differ"
    );
    buf
}

/// A write or trim with FUA is followed by exactly one flush reaching the backend before it
/// is answered; without FUA there is none; FLUSH is one. Trimmed ranges read back as zeros (our
/// blkback punches holes in the image). A trim that is not aligned to the discard granularity
/// (4 KiB here), nor even to sectors, discards the whole units inside its range, leaves the
/// rest as it was and succeeds; one with no whole unit inside discards nothing and succeeds.
#[test]
fn flush_fua_and_trim_through_the_export() {
    let env = env(8 << 20);
    let (_b, stats) = start_backend_with_stats(&env, Default::default());
    let export = Export::start(&env, &[]);
    let c = Client::connect(&export.uri).unwrap();
    let info = *c.info();
    assert!(
        info.can_flush() && info.can_fua() && info.can_trim() && !info.read_only(),
        "{info:?}"
    );
    // Not advertised: the server refuses it before the export sees it.
    assert!(!info.can_write_zeroes(), "{info:?}");
    let flushes = || count(&stats.flushes);
    let discards = || count(&stats.discards);
    let (f, d) = (flushes(), discards());

    // Writes: without FUA no flush; with FUA one, and the data is in the image.
    c.write_at(&pattern(10, 65536), 0).unwrap();
    assert_eq!(flushes(), f, "a write without FUA flushed");
    let data = pattern(11, 65536);
    c.write_at_fua(&data, 65536).unwrap();
    assert_eq!(flushes(), f + 1, "a write with FUA");
    assert!(read(&c, &env, 65536, 65536) == data);
    c.flush().unwrap();
    assert_eq!(flushes(), f + 2, "FLUSH");

    // Aligned trims: the range reads zero; FUA adds a flush.
    assert!(read(&c, &env, MIB, MIB as usize).iter().any(|&b| b != 0));
    trim(&c, MIB, MIB as u32, false);
    assert_eq!((discards(), flushes()), (d + 1, f + 2), "TRIM");
    assert!(read(&c, &env, MIB, MIB as usize).iter().all(|&b| b == 0));
    trim(&c, 3 * MIB, MIB as u32, true);
    assert_eq!((discards(), flushes()), (d + 2, f + 3), "TRIM with FUA");
    assert!(read(&c, &env, 3 * MIB, MIB as usize)
        .iter()
        .all(|&b| b == 0));

    // Unaligned: from 100 bytes into the second 4 KiB unit of 5 MiB, for five units; the
    // units 2 to 5 are inside (bytes 8192..24576 of the 32 KiB looked at).
    let base = 5 * MIB;
    let before = read(&c, &env, base, 32768);
    trim(&c, base + 4096 + 100, 5 * 4096, false);
    assert_eq!((discards(), flushes()), (d + 3, f + 3), "unaligned TRIM");
    let after = read(&c, &env, base, 32768);
    assert!(
        after[..8192] == before[..8192],
        "head before the first whole unit"
    );
    assert!(after[8192..24576].iter().all(|&b| b == 0), "whole units");
    assert!(
        after[24576..] == before[24576..],
        "tail after the last whole unit"
    );

    // No whole unit inside, with FUA: nothing discarded, still flushed, success.
    let before = read(&c, &env, 6 * MIB, 8192);
    trim(&c, 6 * MIB + 512, 2048, true);
    assert_eq!(
        (discards(), flushes()),
        (d + 3, f + 4),
        "TRIM with FUA of less than a unit"
    );
    assert!(read(&c, &env, 6 * MIB, 8192) == before);

    c.disconnect().unwrap();
    export.close();
}
