//! Integrity through real clients, and "flush means durable".
//!
//! The matrix: storage engine (psync, io_uring, NBD storage = qemu-nbd serving a raw file) ×
//! persistent grants × indirect descriptors × queues × ring order, compact (every value of every
//! dimension at least once, plus mixed cases). In each case, through the NBD export of the
//! `xenpv-blkfront` binary: fio (nbd engine, QD32, random writes of 4k–64k, crc32c verified
//! inline and again in a separate verify-only pass), then `qemu-img convert -n` of a random file
//! onto the disk and `nbdcopy` back out; sha256 of what was written = of what is read back = of
//! the backing file read directly.
//!
//! Durability: blkback in a child process (this test binary re-executed); writes, a flush, and
//! SIGKILL of the backend the moment the flush is answered; the backing file, read from this
//! process, holds every write. A process kill leaves the page cache alone, so that alone would
//! pass with a flush that does nothing; what makes each test fail then:
//! * buffered files (psync, io_uring; and qemu-nbd's image): `cachestat(2)` of the written range
//!   finds dirty pages once the writes are answered (the check sees them) and none, nor any
//!   under writeback, once the flush is (it reached the disk, not just the page cache). On a
//!   kernel without `cachestat` (before 6.5) that part is skipped, loudly.
//! * NBD storage: besides qemu-nbd, a write-back server of our own ([`WriteBack`]) keeps what is
//!   written in memory, and the image holds none of it, until an `NBD_CMD_FLUSH` (or a FUA
//!   write) applies it; so the image holds the writes only if the flush reached the server.
//!
//! With O_DIRECT the writes bypass the page cache: the tests check that everything acknowledged
//! is in the file, but a missing flush (the device's own write cache) goes unseen there.

mod common;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::*;
use xenpv_blkback::storage::Engine;
use xenpv_blkfront::{Op, Options};
use xenpv_xenstore::XsOps;

const SIZE: usize = 32 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Psync,
    IoUring,
    Nbd,
}

/// One cell of the matrix. `persistent`/`indirect` off are set on the frontend (its flags) or
/// on the backend (not offered), alternately, so both sides' "off" paths run.
#[derive(Debug, Clone, Copy)]
struct Case {
    store: Store,
    persistent: bool,
    indirect: bool,
    /// Turn features off on the backend side (not offered) rather than the frontend's flags.
    off_in_backend: bool,
    queues: u32,
    ring_order: u32,
    /// The guest's memory in 2 MiB pages, the image read and written with O_DIRECT: large
    /// requests reach the disk as a few physically contiguous segments.
    huge_pages: bool,
}

fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Runs `cmd`, which must succeed; its stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fio(uri: &str, extra: &[&str]) -> String {
    run(Command::new("fio")
        .args([
            "--name=integrity",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bssplit=4k/30:8k/15:16k/15:32k/10:64k/30",
            "--iodepth=32",
            "--size=24m",
            "--verify=crc32c",
            // no verify-state file left in the working directory
            "--verify_state_save=0",
            "--verify_fatal=1",
            "--randseed=4242",
        ])
        .args(extra))
}

fn matrix(case: Case) {
    let t0 = Instant::now();
    for (t, p) in [
        ("fio", "fio"),
        ("qemu-img", "qemu-utils"),
        ("nbdcopy", "libnbd-bin"),
    ] {
        need(t, p);
    }
    let backing = if case.store == Store::Nbd {
        Backing::QemuNbd
    } else {
        Backing::File
    };
    let extra = if case.huge_pages {
        "direct-io-safe,"
    } else {
        ""
    };
    let env = env_pages(
        tempfile::tempdir().unwrap(),
        SIZE,
        backing,
        extra,
        case.huge_pages,
    );
    let mut cfg = xenpv_blkback::device::Config {
        engine: if case.store == Store::Psync {
            Engine::Psync
        } else {
            Engine::IoUring
        },
        direct_io: case.huge_pages,
        ..Default::default()
    };
    let mut args: Vec<String> = vec![
        "--queues".into(),
        case.queues.to_string(),
        "--ring-order".into(),
        case.ring_order.to_string(),
    ];
    if !case.persistent {
        if case.off_in_backend {
            cfg.persistent = false;
        } else {
            args.push("--no-persistent".into());
        }
    }
    if !case.indirect {
        if case.off_in_backend {
            cfg.max_indirect_segments = 0;
        } else {
            args.push("--no-indirect".into());
        }
    }
    let _b = start_backend(&env, cfg);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let export = Export::start(&env, &args);
    // What the two sides agreed on is what the case asks for (neither fell back silently).
    let field = |k: &str| -> String {
        export
            .ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k}= in {:?}", export.ready))
            .to_string()
    };
    assert_eq!(field("queues"), case.queues.to_string(), "{case:?}");
    assert_eq!(field("ring-order"), case.ring_order.to_string(), "{case:?}");
    assert_eq!(field("persistent"), case.persistent.to_string(), "{case:?}");
    let segments: u32 = field("max-segments").parse().unwrap();
    if case.indirect {
        assert!(
            segments > 11,
            "{case:?}: indirect requests offered, {segments} segments"
        );
    } else {
        assert_eq!(segments, 11, "{case:?}: no indirect requests");
    }
    let uri = export.uri.clone();
    let dir = tempfile::tempdir().unwrap();

    // (a) fio: random writes at QD32, verified as it goes, then a separate verify-only pass
    // (the same seed replays the same offsets and sizes) reading everything back.
    fio(&uri, &["--do_verify=1"]);
    let out = fio(&uri, &["--verify_only=1"]);
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("READ:") && l.contains("io=24.0MiB")),
        "{case:?}: the verify-only pass did not read everything back:\n{out}"
    );
    // The whole disk through the export = the backing file read directly (flushed first: fio
    // ends with one).
    fio(
        &uri,
        &[
            "--rw=write",
            "--bs=4k",
            "--size=4k",
            "--end_fsync=1",
            "--do_verify=1",
        ],
    );
    let through = dir.path().join("through.raw");
    run(Command::new("nbdcopy").arg(&uri).arg(&through));
    assert_eq!(
        sha256_file(&through),
        sha256_file(&env.img),
        "{case:?}: after fio, the export differs from the backing file"
    );
    let t_fio = t0.elapsed();

    // (b) qemu-img convert -n of a random file onto the disk, nbdcopy back out.
    let src = dir.path().join("src.raw");
    std::fs::write(&src, pattern(0xC0FFEE + u64::from(case.queues), SIZE)).unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw", "-W"])
        .arg(&src)
        .arg(&uri));
    run(Command::new("nbdcopy").arg(&uri).arg(&through));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&uri));
    let want = sha256_file(&src);
    assert_eq!(
        sha256_file(&through),
        want,
        "{case:?}: read back via nbdcopy"
    );
    assert_eq!(sha256_file(&env.img), want, "{case:?}: the backing file");
    export.close();
    eprintln!("{case:?}: ok in {:.1?} (fio {:.1?})", t0.elapsed(), t_fio);
}

const ON: bool = true;
const OFF: bool = false;

#[test]
fn matrix_psync_defaults() {
    matrix(Case {
        store: Store::Psync,
        persistent: ON,
        indirect: ON,
        off_in_backend: false,
        queues: 1,
        ring_order: 0,
        huge_pages: false,
    });
}

#[test]
fn matrix_io_uring_defaults_huge_pages_o_direct() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: huge-page guest memory needs root (a private tmpfs mount)");
        return;
    }
    matrix(Case {
        store: Store::IoUring,
        persistent: ON,
        indirect: ON,
        off_in_backend: false,
        queues: 1,
        ring_order: 0,
        huge_pages: true,
    });
}

#[test]
fn matrix_psync_2q_order2_no_persistent_backend() {
    matrix(Case {
        store: Store::Psync,
        persistent: OFF,
        indirect: ON,
        off_in_backend: true,
        queues: 2,
        ring_order: 2,
        huge_pages: false,
    });
}

#[test]
fn matrix_io_uring_2q_order2_no_persistent_no_indirect() {
    matrix(Case {
        store: Store::IoUring,
        persistent: OFF,
        indirect: OFF,
        off_in_backend: false,
        queues: 2,
        ring_order: 2,
        huge_pages: false,
    });
}

#[test]
fn matrix_io_uring_no_indirect_backend() {
    matrix(Case {
        store: Store::IoUring,
        persistent: ON,
        indirect: OFF,
        off_in_backend: true,
        queues: 1,
        ring_order: 0,
        huge_pages: false,
    });
}

#[test]
fn matrix_nbd_2q() {
    matrix(Case {
        store: Store::Nbd,
        persistent: ON,
        indirect: ON,
        off_in_backend: false,
        queues: 2,
        ring_order: 0,
        huge_pages: false,
    });
}

#[test]
fn matrix_nbd_order2_no_persistent_no_indirect() {
    matrix(Case {
        store: Store::Nbd,
        persistent: OFF,
        indirect: OFF,
        off_in_backend: true,
        queues: 1,
        ring_order: 2,
        huge_pages: false,
    });
}

// ---- flush means durable ----

/// The child: serves the device named in the environment with the engine named there, until
/// killed.
#[test]
#[ignore = "helper run by the durable_* tests"]
fn durable_backend_child() {
    let Ok(root) = std::env::var("INTEGRITY_TEST_ROOT") else {
        return;
    };
    let be = std::env::var("INTEGRITY_TEST_BE").unwrap();
    let engine: Engine = std::env::var("INTEGRITY_TEST_ENGINE")
        .unwrap()
        .parse()
        .unwrap();
    let cfg = xenpv_blkback::device::Config {
        engine,
        direct_io: std::env::var_os("INTEGRITY_TEST_DIRECT").is_some(),
        ..Default::default()
    };
    let p = backend_platform(Path::new(&root));
    if let Err(e) = xenpv_blkback::device::serve(&p, &be, &cfg) {
        eprintln!("backend child: {e}");
    }
}

/// `struct cachestat_range` of `<linux/mman.h>`.
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat` of `<linux/mman.h>`: a file's pages in a range, by page-cache state.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// `__NR_cachestat` (Linux 6.5): 451 on x86_64, and on every other architecture but alpha
/// (syscall numbers are common to all from 424 on); the `libc` crate does not have it for
/// x86_64.
const SYS_CACHESTAT: libc::c_long = 451;

/// `cachestat(2)` of `file`'s pages in `[off, off + len)`; `None` when the kernel does not
/// have the syscall (`ENOSYS`, before 6.5).
fn cachestat(file: &File, off: u64, len: u64) -> Option<Cachestat> {
    let range = CachestatRange { off, len };
    let mut cs = Cachestat::default();
    // SAFETY: cachestat(fd, range, cstat, flags) reads one `struct cachestat_range` from
    // `range` and writes one `struct cachestat` to `cs`: both are live locals with the kernel's
    // layout (`repr(C)`, all u64), borrowed for the call only; `fd` is open as long as `file`
    // is borrowed; flags must be 0.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut cs as *mut Cachestat,
            0u32,
        )
    };
    if r == 0 {
        return Some(cs);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOSYS) {
        return None;
    }
    panic!("cachestat: {e}");
}

/// [`cachestat`] of `img`'s bytes `[0, end)`; on a kernel without it, says loudly that the
/// page-cache checks are skipped.
fn image_cachestat(img: &Path, end: u64) -> Option<Cachestat> {
    let cs = cachestat(&File::open(img).unwrap(), 0, end);
    if cs.is_none() {
        eprintln!(
            "\n!!!!!!!! cachestat(2) is not available on this kernel (ENOSYS; it needs Linux \
             6.5): the page-cache checks of the durability test are SKIPPED, and a flush that \
             stops at the page cache goes unnoticed on buffered files !!!!!!!!\n"
        );
    }
    cs
}

/// An NBD export with a volatile write cache, as a disk with one: what is written stays in
/// memory (reads see it) and reaches the file only with an `NBD_CMD_FLUSH` or a FUA write,
/// which write every cached write to the file, in order, and `fdatasync` it. What was not
/// flushed never reaches the file.
struct WriteBack {
    file: xenpv_nbd::FileExport,
    /// Written and not flushed yet, oldest first.
    cache: Mutex<Vec<(u64, Vec<u8>)>>,
    /// Flushes received (FUA writes included).
    flushes: AtomicU64,
}

impl WriteBack {
    fn open(img: &Path) -> Arc<WriteBack> {
        Arc::new(WriteBack {
            file: xenpv_nbd::FileExport::open(img).unwrap(),
            cache: Mutex::new(Vec::new()),
            flushes: AtomicU64::new(0),
        })
    }

    /// Writes waiting in the cache.
    fn cached(&self) -> usize {
        self.cache.lock().unwrap().len()
    }

    /// Writes the cache to the file and makes it durable; empties the cache once it is.
    fn write_back(&self, cache: &mut Vec<(u64, Vec<u8>)>) -> io::Result<()> {
        use xenpv_nbd::BlockExport;
        self.flushes.fetch_add(1, Ordering::SeqCst);
        for (off, data) in cache.iter() {
            self.file.write_at(data, *off, false)?;
        }
        self.file.flush()?;
        cache.clear();
        Ok(())
    }
}

impl xenpv_nbd::BlockExport for WriteBack {
    fn size(&self) -> u64 {
        self.file.size()
    }

    fn flags(&self) -> xenpv_nbd::ExportFlags {
        self.file.flags()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let cache = self.cache.lock().unwrap();
        self.file.read_at(buf, offset)?;
        let end = offset + buf.len() as u64;
        for (off, data) in cache.iter() {
            let (from, to) = ((*off).max(offset), (off + data.len() as u64).min(end));
            if from < to {
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - off) as usize..(to - off) as usize]);
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let mut cache = self.cache.lock().unwrap();
        cache.push((offset, buf.to_vec()));
        if fua {
            self.write_back(&mut cache)?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.write_back(&mut self.cache.lock().unwrap())
    }
}

/// Where the durable tests' backend keeps the data: blkback's file engines, or blkback's NBD
/// storage in front of qemu-nbd (killed too, right after the backend) or of [`WriteBack`].
#[derive(Debug, Clone, Copy)]
enum DurableStore {
    File { engine: Engine, direct: bool },
    QemuNbd,
    WriteBackNbd,
}

fn durable(store: DurableStore) {
    const DSIZE: usize = 16 << 20;
    let (engine, direct, backing) = match store {
        DurableStore::File { engine, direct } => (engine, direct, Backing::File),
        DurableStore::QemuNbd => (Engine::default(), false, Backing::QemuNbd),
        DurableStore::WriteBackNbd => (Engine::default(), false, Backing::File),
    };
    // Whether the writes go to the image's page cache as they are answered (and a flush must
    // write them back): with O_DIRECT they do not, behind `WriteBack` they stay in its cache.
    let buffered = match store {
        DurableStore::File { direct, .. } => !direct,
        DurableStore::QemuNbd => true,
        DurableStore::WriteBackNbd => false,
    };
    // O_DIRECT needs a filesystem that supports it (tmpfs may not): the target directory.
    // Page-cache states need a filesystem with a disk behind it too.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut env = env_in(
        dir,
        DSIZE,
        backing,
        if direct { "direct-io-safe," } else { "" },
    );
    // The image was just written: on disk before the test starts, so that what is dirty
    // later was written by the backend.
    File::open(&env.img).unwrap().sync_all().unwrap();
    let write_back = match store {
        DurableStore::WriteBackNbd => {
            let wb = WriteBack::open(&env.img);
            let sock = env._dir.path().join("write-back.nbd");
            let server = xenpv_nbd::serve_unix(&sock, wb.clone()).unwrap();
            env.dom0
                .write_str(
                    &format!("{}/params", env.be),
                    &format!("nbd+unix:///?socket={}", sock.display()),
                )
                .unwrap();
            Some((wb, server))
        }
        _ => None,
    };
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "durable_backend_child",
        "--exact",
        "--ignored",
        "--nocapture",
    ])
    .env("INTEGRITY_TEST_ROOT", &env.root)
    .env("INTEGRITY_TEST_BE", &env.be)
    .env("INTEGRITY_TEST_ENGINE", engine.to_string())
    .stdout(Stdio::null());
    if direct {
        cmd.env("INTEGRITY_TEST_DIRECT", "1");
    }
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    let dev = connect(
        &env,
        Options {
            queues: 2,
            ring_order: 1,
            ..Options::default()
        },
    );
    assert!(dev.info().flush, "the backend offers flush");
    if let DurableStore::File { .. } = store {
        let flags = xenpv_tests::open_flags(Some(child.0.id()), &env.img)
            .first()
            .copied()
            .expect("the backend has the image open");
        assert_eq!(
            flags & libc::O_DIRECT as u32 != 0,
            direct,
            "O_DIRECT on the backend's image descriptor (flags {flags:o})"
        );
    }
    // Many writes in flight together (sizes 4k..128k, scattered, both queues), all answered;
    // then the flush, and the backend dies the moment the flush is answered.
    let mut writes = Vec::new();
    let mut off = 0u64;
    for i in 0..160u64 {
        let len = 4096 << (i % 6);
        let data = pattern(9000 + i, len);
        writes.push((off, data.clone()));
        off += len as u64 + 4096 * (i % 3);
        if off as usize + (128 << 10) > DSIZE {
            break;
        }
    }
    let tickets: Vec<_> = writes
        .iter()
        .map(|(offset, data)| {
            dev.submit_ticket(Op::Write {
                offset: *offset,
                data: data.clone(),
            })
        })
        .collect();
    for t in tickets {
        t.wait().expect("write answered");
    }
    // Answered, not flushed yet: not durable yet, and the checks below can see that.
    let end = off;
    let before = if buffered {
        image_cachestat(&env.img, end)
    } else {
        None
    };
    if let Some(cs) = before {
        eprintln!("{store:?}: before the flush: {cs:?}");
        assert!(
            cs.nr_dirty > 0,
            "{store:?}: no dirty page in the image once the writes were answered ({cs:?}): \
             the page-cache check cannot see whether the flush writes them back"
        );
    }
    if let Some((wb, _)) = &write_back {
        assert!(wb.cached() > 0, "the writes reached the NBD server's cache");
        for (offset, data) in &writes {
            assert!(
                read_image(&env.img, *offset, data.len()) != *data,
                "{store:?}: write at {offset}+{} in the image before any flush",
                data.len()
            );
        }
    }
    dev.flush().expect("flush answered");
    child.0.kill().unwrap();
    if let Some(mut nbd) = env.nbd.take() {
        nbd.0.kill().unwrap();
        nbd.0.wait().unwrap();
    }
    child.0.wait().unwrap();
    for (offset, data) in &writes {
        assert!(
            read_image(&env.img, *offset, data.len()) == *data,
            "{store:?}: write at {offset}+{} lost after the flush was answered",
            data.len()
        );
    }
    if let Some((wb, _)) = &write_back {
        assert_eq!(wb.cached(), 0, "the NBD server's cache was written back");
        assert!(wb.flushes.load(Ordering::SeqCst) >= 1);
    }
    if before.is_some() || write_back.is_some() {
        if let Some(cs) = image_cachestat(&env.img, end) {
            eprintln!("{store:?}: after the flush: {cs:?}");
            assert!(
                cs.nr_dirty == 0 && cs.nr_writeback == 0,
                "{store:?}: pages of the image still dirty or under writeback after the flush \
                 was answered ({cs:?}): the flush stopped short of the disk"
            );
        }
    }
    eprintln!("{store:?}: {} writes durable", writes.len());
    drop(dev);
    drop(write_back);
}

#[test]
fn durable_psync() {
    durable(DurableStore::File {
        engine: Engine::Psync,
        direct: false,
    });
}

#[test]
fn durable_io_uring() {
    durable(DurableStore::File {
        engine: Engine::IoUring,
        direct: false,
    });
}

#[test]
fn durable_psync_o_direct() {
    durable(DurableStore::File {
        engine: Engine::Psync,
        direct: true,
    });
}

#[test]
fn durable_io_uring_o_direct() {
    durable(DurableStore::File {
        engine: Engine::IoUring,
        direct: true,
    });
}

#[test]
fn durable_nbd_storage() {
    durable(DurableStore::QemuNbd);
}

#[test]
fn durable_nbd_storage_write_back_server() {
    durable(DurableStore::WriteBackNbd);
}
