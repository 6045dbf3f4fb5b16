//! Online resize: the backend announces a new capacity while connected (it rewrites `sectors`,
//! then its `state`), and blkfront takes it up without reconnecting.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use xenpv_blkfront::{Error, Op, Options};
use xenpv_xenstore::{XenbusState, XsOps};

const OLD: u64 = 4 << 20;
const NEW: u64 = 8 << 20;

/// Bounds the waits for something the test caused (not a timing assertion: a hang guard).
const PATIENCE: Duration = Duration::from_secs(30);

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Appends `NEW - OLD` bytes of a pattern to the image: our blkback notices and announces it.
fn grow(env: &Env) -> Vec<u8> {
    let tail = pattern(2, (NEW - OLD) as usize);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&env.img)
        .unwrap();
    f.write_all(&tail).unwrap();
    f.sync_all().unwrap();
    tail
}

/// The image grows under a connected device: `size()` follows without a reconnect, I/O in
/// flight meanwhile (a thread keeping 8 writes and then 8 reads in flight in the old range)
/// all succeeds and reads back, and the new space can be read (the bytes appended to the
/// image) and written.
#[test]
fn a_grown_image_grows_the_connected_disk() {
    let env = env(OLD as usize);
    let _b = start_backend(&env, Default::default());
    let dev = Arc::new(connect(&env, Options::default()));
    assert_eq!(dev.size(), OLD);
    match dev.read_at(&mut [0; 512], OLD) {
        Err(Error::OutOfRange { .. }) => {}
        other => panic!("a read past the end before the resize: {other:?}"),
    }

    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let io = {
        let (dev, stop, rounds) = (dev.clone(), stop.clone(), rounds.clone());
        std::thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let at = |i: u64| (round * 8 + i) % 64 * 65536;
                let data = |i: u64| pattern(round << 8 | i, 65536);
                let writes: Vec<_> = (0..8)
                    .map(|i| {
                        dev.submit_ticket(Op::Write {
                            offset: at(i),
                            data: data(i),
                        })
                    })
                    .collect();
                for (i, t) in writes.into_iter().enumerate() {
                    t.wait()
                        .unwrap_or_else(|e| panic!("round {round}: write {i}: {e}"));
                }
                let reads: Vec<_> = (0..8)
                    .map(|i| {
                        dev.submit_ticket(Op::Read {
                            offset: at(i),
                            len: 65536,
                        })
                    })
                    .collect();
                for (i, t) in reads.into_iter().enumerate() {
                    let got = t
                        .wait()
                        .unwrap_or_else(|e| panic!("round {round}: read {i}: {e}"));
                    assert!(got == data(i as u64), "round {round}: read {i} differs");
                }
                round += 1;
                rounds.store(round, Ordering::SeqCst);
            }
        })
    };
    wait_for("I/O before the resize", || {
        rounds.load(Ordering::SeqCst) > 0
    });

    let tail = grow(&env);
    wait_for("blkfront taking up the new size", || dev.size() == NEW);
    let at_resize = rounds.load(Ordering::SeqCst);
    wait_for("I/O after the resize", || {
        rounds.load(Ordering::SeqCst) > at_resize + 1
    });
    stop.store(true, Ordering::SeqCst);
    io.join().expect("I/O across the resize failed");

    assert_eq!(dev.info().sectors, NEW / 512);
    assert!(dev.is_connected());
    assert_eq!(dev.reconnects(), 0, "a resize is not a reconnect");
    assert!(dev.error().is_none(), "{:?}", dev.error());

    // Across the old end: the old contents, then the bytes appended to the image.
    let mut buf = vec![0; 1 << 20];
    dev.read_at(&mut buf, OLD - 65536).unwrap();
    assert!(buf == read_image(&env.img, OLD - 65536, 1 << 20));
    assert!(buf[65536..] == tail[..(1 << 20) - 65536], "appended bytes");
    // Writes in the new space reach the image and read back; up to the new end, not past it.
    let data = pattern(3, 1 << 20);
    dev.write_at(&data, NEW - (1 << 20)).unwrap();
    assert!(read_image(&env.img, NEW - (1 << 20), 1 << 20) == data);
    let mut back = vec![0; 1 << 20];
    dev.read_at(&mut back, NEW - (1 << 20)).unwrap();
    assert!(back == data);
    match dev.read_at(&mut [0; 512], NEW) {
        Err(Error::OutOfRange { size, .. }) => assert_eq!(size, NEW),
        other => panic!("a read past the new end: {other:?}"),
    }
    dev.close().unwrap();
}

/// Through `xenpv-blkfront`'s NBD export: a connection made after the image grew is given the
/// new size and reads and writes the new space; a connection made before keeps its size (NBD
/// cannot tell it) and keeps working.
#[test]
fn nbd_connections_made_after_a_resize_see_the_new_size() {
    let env = env(OLD as usize);
    let _b = start_backend(&env, Default::default());
    let export = Export::start(&env, &[]);
    let before = xenpv_nbd::Client::connect(&export.uri).unwrap();
    assert_eq!(before.size(), OLD);

    let tail = grow(&env);
    let mut after = None;
    wait_for("a new NBD connection with the new size", || {
        let c = xenpv_nbd::Client::connect(&export.uri).unwrap();
        let grown = c.size() == NEW;
        if grown {
            after = Some(c);
        }
        grown
    });
    let after = after.unwrap();
    let mut buf = vec![0; 65536];
    after.read_at(&mut buf, OLD).unwrap();
    assert!(buf[..] == tail[..65536]);
    let data = pattern(4, 65536);
    after.write_at(&data, NEW - 65536).unwrap();
    assert!(read_image(&env.img, NEW - 65536, 65536) == data);
    after.read_at(&mut buf, NEW - 65536).unwrap();
    assert!(buf == data);

    assert_eq!(before.size(), OLD);
    before.read_at(&mut buf, OLD - 65536).unwrap();
    assert!(buf == read_image(&env.img, OLD - 65536, 65536));
    before.disconnect().unwrap();
    after.disconnect().unwrap();
    export.close();
}

/// A backend (played by the test) re-announces Connected with a `sectors` node that is not a
/// number, then with one whose size in bytes overflows 64 bits: both are ignored. Then with a
/// smaller size: the shrink is applied, as Linux's blkfront does, and requests beyond the new
/// end are refused locally. The device stays connected throughout.
#[test]
fn a_hostile_sectors_node_is_ignored_and_a_shrink_is_applied() {
    let env = env(1 << 20);
    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let backend = spawn_scripted(&env, move |s| {
        for sectors in rx {
            s.xs.transaction(|tx| {
                tx.write_str(&format!("{}/sectors", s.be), sectors)?;
                tx.write_str(
                    &format!("{}/state", s.be),
                    &XenbusState::Connected.as_value(),
                )?;
                Ok(())
            })
            .unwrap();
        }
    });
    let dev = connect(&env, Options::default());
    assert_eq!(dev.size(), 1 << 20);

    // The watch events are taken in order: once the last value is seen, the hostile ones
    // before it were looked at.
    for sectors in ["lots", "36028797018963968", "18446744073709551615", "1536"] {
        tx.send(sectors).unwrap();
    }
    wait_for("blkfront taking up the smaller size", || {
        dev.size() == 1536 * 512
    });
    assert!(dev.is_connected());
    assert_eq!(dev.reconnects(), 0);
    assert!(dev.error().is_none(), "{:?}", dev.error());
    match dev.read_at(&mut [0; 512], 1536 * 512) {
        Err(Error::OutOfRange { size, .. }) => assert_eq!(size, 1536 * 512),
        other => panic!("a read past the new end: {other:?}"),
    }
    match dev.write_at(&[0; 4096], 1536 * 512 - 2048) {
        Err(Error::OutOfRange { .. }) => {}
        other => panic!("a write across the new end: {other:?}"),
    }

    drop(tx);
    dev.close().unwrap();
    backend.join().unwrap();
}

/// A connected disk without I/O costs xenstored next to nothing: the control thread reads the
/// backend's state when its watch fires (a resize, a reconnect: the tests above), and otherwise
/// at most every few seconds, not at every round of its loop.
#[test]
fn a_connected_idle_disk_sends_xenstored_next_to_nothing() {
    let env = env(OLD as usize);
    let _b = start_backend(&env, Default::default());
    let dev = connect(&env, Options::default());
    assert_eq!(dev.size(), OLD);
    std::thread::sleep(Duration::from_millis(500));
    // The guest's (domain 1's) requests: blkfront's alone.
    let xenstored = env.daemon.xenstore();
    let before = xenstored.requests_from(1);
    std::thread::sleep(Duration::from_secs(2));
    let sent = xenstored.requests_from(1) - before;
    // At most one recheck (the state, then the size): polling every 100 ms sent about 20.
    assert!(sent <= 4, "{sent} requests in 2 s");
    let mut buf = [0u8; 512];
    dev.read_at(&mut buf, 0).unwrap();
}
