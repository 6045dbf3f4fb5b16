//! The storage engines driven directly with volatile slices over heap buffers: psync and
//! io_uring on an image file, NBD against qemu-nbd and nbdkit's memory plugin. Round trips,
//! batches with many ops in flight, and errors per op (the rest of a batch still succeeds).

mod common;

use std::io::Write;
use std::sync::Arc;

use common::{nbdkit_memory, qemu_nbd, ro_slice, slice};
use xenpv_blkback::storage::{
    nbd_uri, open_storage, Engine, FileOptions, FileStorage, IoUringStorage, Op, Storage,
    StorageOptions,
};
use xenpv_nbd::uri::Address;

const SIZE: u64 = 1 << 20;

fn image(size: u64) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let pattern: Vec<u8> = (0..size).map(|i| (i / 512) as u8 ^ 0x5A).collect();
    f.write_all(&pattern).unwrap();
    f
}

fn open_err(params: &str, opts: &StorageOptions) -> String {
    match open_storage(params, opts) {
        Ok(s) => panic!("{params} opened with {}", s.engine()),
        Err(e) => e.to_string(),
    }
}

fn file_engines(path: &std::path::Path) -> Vec<Arc<dyn Storage>> {
    let psync = FileStorage::open(path, FileOptions::default(), 512).unwrap();
    let uring = IoUringStorage::open(path, FileOptions::default(), 512)
        .expect("io_uring is available on the test machine");
    vec![Arc::new(psync), Arc::new(uring)]
}

/// Write, flush, read back with another split, discard, read zeroes.
fn round_trip(s: &dyn Storage) {
    let e = s.engine();
    let (mut a, mut b) = (vec![1u8; 4096], vec![2u8; 512]);
    s.write_from(4096, &[slice(&mut a), slice(&mut b)]).unwrap();
    s.flush().unwrap();
    let (mut c, mut d) = (vec![0u8; 512], vec![0u8; 4096]);
    s.read_into(4096, &[slice(&mut c), slice(&mut d)]).unwrap();
    assert!(c.iter().all(|&x| x == 1), "{e}");
    assert!(
        d[..3584].iter().all(|&x| x == 1) && d[3584..].iter().all(|&x| x == 2),
        "{e}"
    );
    assert!(s.can_discard(), "{e}");
    let mut w = vec![9u8; 16384];
    s.write_from(65536, &[slice(&mut w)]).unwrap();
    s.discard(65536 + 4096, 8192).unwrap();
    let mut r = vec![1u8; 16384];
    s.read_into(65536, &[slice(&mut r)]).unwrap();
    assert!(r[..4096].iter().all(|&x| x == 9), "{e}: before the range");
    assert!(r[4096..12288].iter().all(|&x| x == 0), "{e}: discarded");
    assert!(r[12288..].iter().all(|&x| x == 9), "{e}: after the range");
}

/// 64 writes in one batch, then 64 reads in one batch (plus a flush batch), all checked.
fn many_in_flight(s: &dyn Storage) {
    let e = s.engine();
    let n = 64usize;
    let mut wbufs: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8 ^ 0xC3; 4096]).collect();
    let ops: Vec<Op<'_>> = wbufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| {
            let (x, y) = b.split_at_mut(1024);
            Op::Write {
                offset: 131072 + i as u64 * 8192,
                bufs: smallvec::smallvec![slice(x), slice(y)],
            }
        })
        .collect();
    for (i, r) in s.submit(&ops).into_iter().enumerate() {
        r.unwrap_or_else(|err| panic!("{e}: write {i}: {err}"));
    }
    drop(ops);
    assert!(s.submit(&[Op::Flush]).into_iter().all(|r| r.is_ok()), "{e}");
    let mut rbufs: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; 4096]).collect();
    let ops: Vec<Op<'_>> = rbufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| Op::Read {
            offset: 131072 + i as u64 * 8192,
            bufs: smallvec::smallvec![slice(b)],
        })
        .collect();
    assert_eq!(ops.len(), n);
    for (i, r) in s.submit(&ops).into_iter().enumerate() {
        r.unwrap_or_else(|err| panic!("{e}: read {i}: {err}"));
    }
    drop(ops);
    for (i, b) in rbufs.iter().enumerate() {
        assert!(b.iter().all(|&x| x == i as u8 ^ 0xC3), "{e}: block {i}");
    }
}

/// Bad ops fail alone; the good ones of the same batch succeed.
fn errors_per_op(s: &dyn Storage) {
    let e = s.engine();
    let size = s.size();
    let (mut w, mut past, mut ro, mut ok) = (
        vec![7u8; 4096],
        vec![0u8; 4096],
        vec![0u8; 512],
        vec![0u8; 4096],
    );
    let ops = vec![
        Op::Write {
            offset: 0,
            bufs: smallvec::smallvec![slice(&mut w)],
        },
        Op::Read {
            offset: size - 512,
            bufs: smallvec::smallvec![slice(&mut past)],
        },
        Op::Read {
            offset: 8192,
            bufs: smallvec::smallvec![ro_slice(&mut ro)],
        },
        Op::Discard {
            offset: size,
            len: 4096,
        },
        Op::Read {
            offset: 12288,
            bufs: smallvec::smallvec![slice(&mut ok)],
        },
        Op::Write {
            offset: u64::MAX - 100,
            bufs: smallvec::smallvec![],
        },
        Op::Flush,
    ];
    let r = s.submit(&ops);
    drop(ops);
    let ok_pattern: Vec<bool> = r.iter().map(|r| r.is_ok()).collect();
    assert_eq!(
        ok_pattern,
        [true, false, false, false, true, false, true],
        "{e}: {r:?}"
    );
    let msg = r[1].as_ref().unwrap_err().to_string();
    assert!(msg.contains("beyond the end"), "{e}: {msg}");
    let mut back = vec![0u8; 4096];
    s.read_into(0, &[slice(&mut back)]).unwrap();
    assert!(back.iter().all(|&x| x == 7), "{e}");
}

#[test]
fn file_engines_round_trip() {
    let img = image(SIZE);
    for s in file_engines(img.path()) {
        round_trip(s.as_ref());
    }
}

#[test]
fn file_engines_many_in_flight() {
    let img = image(SIZE);
    for s in file_engines(img.path()) {
        many_in_flight(s.as_ref());
    }
}

#[test]
fn file_engines_errors_per_op() {
    let img = image(SIZE);
    for s in file_engines(img.path()) {
        errors_per_op(s.as_ref());
        // And a read past the end of the file reads nothing into the buffers' tail silently.
        let mut b = vec![0u8; 4096];
        assert!(s.read_into(SIZE - 512, &[slice(&mut b)]).is_err());
    }
}

/// On tmpfs the io_uring engine copies reads and writes inline (io_uring would punt each to a
/// worker thread): same results, flushes and discards still through the ring.
#[test]
fn file_engines_on_tmpfs() {
    let mut f = tempfile::NamedTempFile::new_in("/dev/shm").expect("/dev/shm (tmpfs) exists");
    let pattern: Vec<u8> = (0..SIZE).map(|i| (i / 512) as u8 ^ 0x5A).collect();
    f.write_all(&pattern).unwrap();
    let uring = IoUringStorage::open(f.path(), FileOptions::default(), 512).unwrap();
    assert!(uring.copies_inline());
    let psync = FileStorage::open(f.path(), FileOptions::default(), 512).unwrap();
    assert!(psync.memory_backed());
    for s in [Arc::new(uring) as Arc<dyn Storage>, Arc::new(psync)] {
        round_trip(s.as_ref());
        many_in_flight(s.as_ref());
        errors_per_op(s.as_ref());
    }
}

#[test]
fn io_uring_serves_queues_concurrently_one_ring_each() {
    let img = image(SIZE);
    let s = Arc::new(IoUringStorage::open(img.path(), FileOptions::default(), 512).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for round in 0..50u64 {
                    let mut bufs: Vec<Vec<u8>> =
                        (0..16).map(|i| vec![(t * 16 + i) as u8; 4096]).collect();
                    let base = t * (SIZE / 4);
                    let ops: Vec<Op<'_>> = bufs
                        .iter_mut()
                        .enumerate()
                        .map(|(i, b)| Op::Write {
                            offset: base + i as u64 * 4096,
                            bufs: smallvec::smallvec![slice(b)],
                        })
                        .collect();
                    assert!(s.submit(&ops).iter().all(|r| r.is_ok()));
                    drop(ops);
                    let mut back: Vec<Vec<u8>> = (0..16).map(|_| vec![0u8; 4096]).collect();
                    let ops: Vec<Op<'_>> = back
                        .iter_mut()
                        .enumerate()
                        .map(|(i, b)| Op::Read {
                            offset: base + i as u64 * 4096,
                            bufs: smallvec::smallvec![slice(b)],
                        })
                        .collect();
                    assert!(s.submit(&ops).iter().all(|r| r.is_ok()));
                    drop(ops);
                    for (i, b) in back.iter().enumerate() {
                        assert!(
                            b.iter().all(|&x| x == (t * 16 + i as u64) as u8),
                            "thread {t} round {round} block {i}"
                        );
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let rings = s.rings_created();
    assert!((1..=4).contains(&rings), "{rings} rings for 4 queues");
}

#[test]
fn io_uring_with_o_direct() {
    let img = image(SIZE);
    let s = IoUringStorage::open(
        img.path(),
        FileOptions {
            read_only: false,
            direct: true,
        },
        512,
    )
    .unwrap();
    // O_DIRECT wants aligned buffers: grant pages are; carve aligned ones out of the heap.
    let mut raw = vec![0u8; 3 * 4096];
    let start = raw.as_ptr().align_offset(4096);
    let (w, r) = raw[start..start + 8192].split_at_mut(4096);
    w.fill(0xEE);
    let r0 = s.submit(&[Op::Write {
        offset: 4096,
        bufs: smallvec::smallvec![slice(w)],
    }]);
    assert!(r0[0].is_ok(), "{r0:?}");
    let r1 = s.submit(&[
        Op::Read {
            offset: 4096,
            bufs: smallvec::smallvec![slice(r)],
        },
        Op::Flush,
    ]);
    assert!(r1.iter().all(|r| r.is_ok()), "{r1:?}");
    assert!(r.iter().all(|&x| x == 0xEE));
}

#[test]
fn open_storage_picks_the_engine_and_strips_prefixes() {
    let img = image(SIZE);
    let p = img.path().display().to_string();
    let psync = StorageOptions {
        engine: Engine::Psync,
        ..Default::default()
    };
    assert_eq!(
        open_storage(&format!("aio:{p}"), &psync).unwrap().engine(),
        "psync"
    );
    let dflt = StorageOptions::default();
    assert_eq!(dflt.engine, Engine::IoUring);
    for spec in [
        p.clone(),
        format!("raw:{p}"),
        format!("tap:aio:{p}"),
        format!("file:{p}"),
    ] {
        let s = open_storage(&spec, &dflt).unwrap();
        assert_eq!((s.engine(), s.size()), ("io_uring", SIZE), "{spec}");
    }
    let ro = StorageOptions {
        read_only: true,
        ..Default::default()
    };
    let s = open_storage(&p, &ro).unwrap();
    assert!(s.read_only() && !s.can_discard());
    let mut b = vec![0u8; 512];
    assert!(s.write_from(0, &[slice(&mut b)]).is_err());

    let e = open_err("qcow2:/var/lib/disk.qcow2", &dflt);
    assert!(e.contains("qemu-nbd"), "{e}");
    let e = open_err("aio:/nonexistent/x.img", &dflt);
    assert!(e.contains("/nonexistent/x.img"), "{e}");
    assert_eq!("psync".parse::<Engine>().unwrap(), Engine::Psync);
    assert_eq!("io_uring".parse::<Engine>().unwrap(), Engine::IoUring);
    assert!("libaio"
        .parse::<Engine>()
        .unwrap_err()
        .to_string()
        .contains("psync or io_uring"));
}

#[test]
fn nbd_params_forms() {
    let u = nbd_uri("nbd:unix:/run/s.sock:exportname=disk")
        .unwrap()
        .unwrap();
    assert_eq!(u.address, Address::Unix("/run/s.sock".into()));
    assert_eq!(u.export, "disk");
    let u = nbd_uri("nbd:localhost:10809").unwrap().unwrap();
    assert_eq!(
        u.address,
        Address::Tcp {
            host: "localhost".into(),
            port: 10809
        }
    );
    let u = nbd_uri("nbd+unix:///e?socket=/x").unwrap().unwrap();
    assert_eq!(
        (u.export.as_str(), u.address),
        ("e", Address::Unix("/x".into()))
    );
    assert!(nbd_uri("nbd://h:99/x").unwrap().is_ok());
    assert!(nbd_uri("nbd:localhost").unwrap().is_err());
    assert!(nbd_uri("/img/nbd:1").is_none());
    let e = open_err(
        "nbd+unix:///?socket=/nonexistent/s",
        &StorageOptions::default(),
    );
    assert!(e.contains("/nonexistent/s"), "{e}");
}

#[test]
fn nbd_against_qemu_nbd() {
    let img = image(SIZE);
    let srv = qemu_nbd(img.path(), false);
    let s = open_storage(&srv.uri(), &StorageOptions::default()).unwrap();
    assert_eq!((s.engine(), s.size(), s.read_only()), ("nbd", SIZE, false));
    // The image's own bytes come through.
    let mut b = vec![0u8; 1024];
    s.read_into(512 * 3, &[slice(&mut b)]).unwrap();
    assert!(b[..512].iter().all(|&x| x == 3 ^ 0x5A) && b[512..].iter().all(|&x| x == 4 ^ 0x5A));
    round_trip(s.as_ref());
    many_in_flight(s.as_ref());
    errors_per_op(s.as_ref());
    // What went through NBD is in the file.
    let file = std::fs::read(img.path()).unwrap();
    assert!(file[131072..135168].iter().all(|&x| x == 0xC3));
    assert!(file[65536 + 4096..65536 + 12288].iter().all(|&x| x == 0));
}

/// The same over TCP (`nbd://127.0.0.1:PORT`, qemu-nbd listening on loopback): the storage
/// blkback opens for a disk whose target is a network NBD server.
#[test]
fn nbd_against_qemu_nbd_over_tcp() {
    common::need("qemu-nbd", "qemu-utils");
    let img = image(SIZE);
    // A port free a moment ago; qemu-nbd takes it (a race with another process is unlikely
    // and fails the test loudly, at the connect below).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new("qemu-nbd")
        .args(["--persistent", "--shared=8", "-f", "raw", "--discard=unmap"])
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .arg(img.path())
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "qemu-nbd never listened on port {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let s = open_storage(
        &format!("nbd://127.0.0.1:{port}"),
        &StorageOptions::default(),
    )
    .unwrap();
    assert_eq!((s.engine(), s.size(), s.read_only()), ("nbd", SIZE, false));
    round_trip(s.as_ref());
    many_in_flight(s.as_ref());
    errors_per_op(s.as_ref());
    drop(s);
    let _ = child.kill();
    let _ = child.wait();
    let file = std::fs::read(img.path()).unwrap();
    assert!(file[131072..135168].iter().all(|&x| x == 0xC3));
}

#[test]
fn nbd_read_only_export() {
    let img = image(SIZE);
    let srv = qemu_nbd(img.path(), true);
    let s = open_storage(&srv.uri(), &StorageOptions::default()).unwrap();
    assert!(s.read_only() && !s.can_discard());
    let mut b = vec![0u8; 512];
    let e = s.write_from(0, &[slice(&mut b)]).unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    s.read_into(0, &[slice(&mut b)]).unwrap();
    assert!(b.iter().all(|&x| x == 0x5A));
}

#[test]
fn nbd_against_nbdkit_memory_discard_reads_zeroes() {
    let srv = nbdkit_memory("64M");
    let s = open_storage(&srv.uri(), &StorageOptions::default()).unwrap();
    assert_eq!(s.size(), 64 << 20);
    round_trip(s.as_ref());
    many_in_flight(s.as_ref());
    errors_per_op(s.as_ref());
    // 3 MiB written (several NBD requests if the payload bound is small), 2 MiB trimmed.
    let mut w = vec![0xABu8; 3 << 20];
    s.write_from(8 << 20, &[slice(&mut w)]).unwrap();
    s.discard(9 << 20, 2 << 20).unwrap();
    let mut r = vec![1u8; 3 << 20];
    s.read_into(8 << 20, &[slice(&mut r)]).unwrap();
    assert!(r[..1 << 20].iter().all(|&x| x == 0xAB));
    assert!(
        r[1 << 20..].iter().all(|&x| x == 0),
        "trimmed range is not zero"
    );
}

/// An io_uring pipeline's doze (hybrid polling's sleep) returns when an op completes, not when
/// its time is up; with nothing in flight it sleeps the time.
#[test]
fn a_pipeline_dozes_until_a_completion() {
    // In the target directory: a disk-backed file system (on tmpfs there is no pipeline).
    let mut f = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    f.write_all(&vec![7u8; 1 << 16]).unwrap();
    let st = IoUringStorage::open(f.path(), FileOptions::default(), 512).unwrap();
    let mut pipe = st
        .pipeline()
        .expect("a disk-backed file gets an io_uring pipeline");
    let t = std::time::Instant::now();
    pipe.doze(std::time::Duration::from_millis(30));
    assert!(t.elapsed() >= std::time::Duration::from_millis(30));
    let mut buf = vec![0u8; 4096];
    let op = Op::Read {
        offset: 8192,
        bufs: smallvec::smallvec![slice(&mut buf)],
    };
    // SAFETY: `buf` outlives the op, whose completion is reaped below before `buf` is read.
    unsafe { pipe.start(1, &op) };
    let t = std::time::Instant::now();
    let mut done = Vec::new();
    while pipe.reap(&mut done) == 0 {
        pipe.doze(std::time::Duration::from_secs(10));
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "the completion did not end the doze"
        );
    }
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].0, 1);
    assert!(done[0].1.is_ok());
    drop(op);
    assert!(buf.iter().all(|&b| b == 7));
    // A completion that needs no I/O (a read past the end, refused at once) is available as
    // soon as the op starts: the doze returns without sleeping.
    let op = Op::Read {
        offset: 1 << 16,
        bufs: smallvec::smallvec![slice(&mut buf)],
    };
    // SAFETY: as above; a refused op never touches `buf`.
    unsafe { pipe.start(2, &op) };
    let t = std::time::Instant::now();
    pipe.doze(std::time::Duration::from_secs(10));
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "the doze slept with a completion available"
    );
    done.clear();
    assert_eq!(pipe.reap(&mut done), 1);
    assert_eq!(done[0].0, 2);
    assert!(done[0].1.is_err());
}

/// Hybrid polling looks for completions with `ready` alone (memory reads, no system call), and
/// when it says one is there, `reap` must return it. The pipeline's ring posts
/// completions as cooperative task work, announced by a flag in the ring before they reach its
/// completion queue: a `reap` that only read the queue would come back empty-handed, and the
/// queue thread would poll on with its requests' answers held until its next system call.
/// O_DIRECT reads of a disk-backed file, 8 at a time, the thread pinned to each CPU in turn: on
/// a CPU other than the disk interrupt's, the completions wait as task work behind the flag.
#[test]
fn a_pipeline_polled_with_ready_alone_reaps_what_it_announces() {
    // The test's thread, pinned to each CPU it may run on in turn.
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: an all-zero cpu_set_t is a valid (empty) set.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most `size` bytes into `allowed`, which has that size.
    assert_eq!(unsafe { libc::sched_getaffinity(0, size, &mut allowed) }, 0);
    let pin = |set: &libc::cpu_set_t| {
        // SAFETY: the kernel reads `size` bytes of `set`, which has that size; pid 0 is the
        // calling thread.
        assert_eq!(unsafe { libc::sched_setaffinity(0, size, set) }, 0);
    };
    for cpu in 0..libc::CPU_SETSIZE as usize {
        // SAFETY: `cpu` is below CPU_SETSIZE, within the set.
        if !unsafe { libc::CPU_ISSET(cpu, &allowed) } {
            continue;
        }
        // SAFETY: as for `allowed`; `cpu` is below CPU_SETSIZE.
        let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe { libc::CPU_SET(cpu, &mut one) };
        pin(&one);
        polled_reads_reap_what_ready_announces();
    }
    pin(&allowed);
}

fn polled_reads_reap_what_ready_announces() {
    const PAGES: usize = 256;
    const BATCH: usize = 8;
    let mut f = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let content: Vec<u8> = (0..PAGES * 4096).map(|i| (i / 4096) as u8).collect();
    f.write_all(&content).unwrap();
    f.as_file().sync_all().unwrap();
    let direct = FileOptions {
        read_only: false,
        direct: true,
    };
    let st = IoUringStorage::open(f.path(), direct, 512).unwrap();
    let mut pipe = st
        .pipeline()
        .expect("a disk-backed file gets an io_uring pipeline");
    // O_DIRECT wants aligned buffers: carve them out of the heap.
    let mut raw = vec![0u8; (BATCH + 1) * 4096];
    let start = raw.as_ptr().align_offset(4096);
    for round in 0..64usize {
        let bufs = &mut raw[start..start + BATCH * 4096];
        bufs.fill(0xFF);
        let pages: Vec<usize> = (0..BATCH).map(|k| (round * 37 + k * 11) % PAGES).collect();
        {
            let ops: Vec<Op<'_>> = bufs
                .chunks_mut(4096)
                .zip(&pages)
                .map(|(b, &p)| Op::Read {
                    offset: (p * 4096) as u64,
                    bufs: smallvec::smallvec![slice(b)],
                })
                .collect();
            for (k, op) in ops.iter().enumerate() {
                // SAFETY: the buffers outlive the ops: every completion is reaped below,
                // before the buffers are read or filled again.
                unsafe { pipe.start(k as u64, op) };
            }
            pipe.submit();
            let mut done = Vec::new();
            // Reaps that found nothing after `ready()` said yes, in a row. A few may: the kernel
            // raises the flag just before it queues the task work, so a reap that comes in
            // between finds nothing to run yet (seen 3 in a row here, the completing vCPU
            // preempted, it seems). A reap that does not run the task work finds nothing until
            // the thread's next system call or timer tick: thousands of polls.
            let mut empty = 0;
            while done.len() < BATCH {
                let t = std::time::Instant::now();
                while !pipe.ready() {
                    assert!(
                        t.elapsed() < std::time::Duration::from_secs(10),
                        "no completion announced in round {round}"
                    );
                    std::hint::spin_loop();
                }
                if pipe.reap(&mut done) > 0 {
                    empty = 0;
                } else {
                    empty += 1;
                    assert!(
                        empty < 1000,
                        "ready() announced completions that reap() did not return (round {round})"
                    );
                }
            }
            let mut tags: Vec<u64> = done.iter().map(|(t, _)| *t).collect();
            tags.sort_unstable();
            assert_eq!(tags, (0..BATCH as u64).collect::<Vec<_>>());
            assert!(done.iter().all(|(_, r)| r.is_ok()), "{done:?}");
        }
        for (b, &p) in bufs.chunks(4096).zip(&pages) {
            assert!(b.iter().all(|&x| x == p as u8), "page {p} read wrong");
        }
    }
}

/// The test's child process, run as `nobody`, opens this image (see below).
const NOATIME_CHILD: &str = "XENPV_TEST_NOATIME_IMAGE";

/// Images are opened `O_NOATIME`, which only their owner (or CAP_FOWNER) may ask: an image
/// owned by someone else must still open, and serve. A child process run as `nobody` (with
/// `setpriv`) opens a root-owned, world-readable image read-only and reads it; without the
/// fallback its open fails with EPERM. Needs root (CI runs as root).
#[test]
fn an_image_owned_by_another_user_opens_without_noatime() {
    if let Some(path) = std::env::var_os(NOATIME_CHILD) {
        // The child: as nobody.
        let s = FileStorage::open(
            std::path::Path::new(&path),
            FileOptions {
                read_only: true,
                direct: false,
            },
            512,
        )
        .expect("open an image owned by another user");
        let mut buf = vec![0u8; 1024];
        s.read_into(512, &[slice(&mut buf)]).expect("read it");
        assert!(buf[..512].iter().all(|&b| b == 1 ^ 0x5A));
        assert!(buf[512..].iter().all(|&b| b == 2 ^ 0x5A));
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: running a child as another user needs root");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let img = dir.path().join("disk.img");
    let pattern: Vec<u8> = (0..8192u64).map(|i| (i / 512) as u8 ^ 0x5A).collect();
    std::fs::write(&img, &pattern).unwrap();
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o644)).unwrap();
    // A copy of this test binary that nobody may run, wherever the checkout is (/root is not
    // open to others).
    let exe = dir.path().join("engines-test");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&exe)
        .args([
            "--exact",
            "an_image_owned_by_another_user_opens_without_noatime",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(NOATIME_CHILD, &img)
        .output()
        .expect("run setpriv (util-linux)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the child failed:\n{text}");
    assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
}
