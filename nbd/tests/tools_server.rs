//! Our server driven by real NBD clients: nbdinfo, qemu-img, nbdcopy (libnbd-bin) and fio's
//! `nbd` engine.

mod common;

use common::{fnv, need, run, Rng, TempDir};
use std::process::Command;
use std::sync::Arc;
use xenpv_nbd::{serve_unix, FileExport, MemExport};

const SIZE: usize = 32 << 20;

fn uri(sock: &std::path::Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// Random data with zero stretches (so copiers use write-zeroes/trim paths too).
fn image(seed: u64, size: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut v = rng.bytes(size);
    for chunk in v.chunks_mut(1 << 20).step_by(3) {
        chunk.fill(0);
    }
    v
}

#[test]
fn nbdinfo_reports_size_and_flags() {
    need("nbdinfo", "libnbd-bin");
    let dir = TempDir::new("nbdinfo");
    let sock = dir.path("s");
    let _srv = serve_unix(&sock, Arc::new(MemExport::new(SIZE))).unwrap();
    let out = run(Command::new("nbdinfo").arg("--json").arg(uri(&sock)));
    let compact: String = out.split_whitespace().collect();
    for want in [
        format!("\"export-size\":{SIZE}"),
        "\"is_read_only\":false".into(),
        "\"can_flush\":true".into(),
        "\"can_fua\":true".into(),
        "\"can_trim\":true".into(),
        "\"can_zero\":true".into(),
        "\"can_multi_conn\":true".into(),
    ] {
        assert!(compact.contains(&want), "nbdinfo lacks {want}:\n{out}");
    }
    // nbdinfo --list goes through NBD_OPT_LIST.
    let out = run(Command::new("nbdinfo").arg("--list").arg(uri(&sock)));
    assert!(out.contains(&SIZE.to_string()), "{out}");
}

#[test]
fn qemu_img_convert_and_compare() {
    need("qemu-img", "qemu-utils");
    let dir = TempDir::new("qemu-img");
    let sock = dir.path("s");
    let src = dir.path("src.img");
    let data = image(1, SIZE);
    std::fs::write(&src, &data).unwrap();
    // Start from garbage so that zero regions must really be written.
    let export = Arc::new(MemExport::from_vec(vec![0xa5; SIZE]));
    let _srv = serve_unix(&sock, Arc::clone(&export)).unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(uri(&sock)));
    assert_eq!(
        fnv(&export.snapshot()),
        fnv(&data),
        "export differs from the source"
    );
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(uri(&sock)));
    // And back out of the export into a new file.
    let out = dir.path("out.img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(uri(&sock))
        .arg(&out));
    assert_eq!(fnv(&std::fs::read(&out).unwrap()), fnv(&data));
}

#[test]
fn nbdcopy_in_and_out() {
    need("nbdcopy", "libnbd-bin");
    let dir = TempDir::new("nbdcopy");
    let sock = dir.path("s");
    let src = dir.path("src.img");
    let data = image(2, SIZE);
    std::fs::write(&src, &data).unwrap();
    let export = Arc::new(MemExport::from_vec(vec![0x5a; SIZE]));
    let _srv = serve_unix(&sock, Arc::clone(&export)).unwrap();
    // nbdcopy uses several connections (we offer CAN_MULTI_CONN) and deep queues.
    run(Command::new("nbdcopy").arg(&src).arg(uri(&sock)));
    assert_eq!(
        fnv(&export.snapshot()),
        fnv(&data),
        "export differs from the source"
    );
    let out = dir.path("out.img");
    std::fs::write(&out, b"").unwrap();
    run(Command::new("nbdcopy").arg(uri(&sock)).arg(&out));
    assert_eq!(fnv(&std::fs::read(&out).unwrap()), fnv(&data));
}

#[test]
fn fio_nbd_engine_verifies_at_iodepth_32() {
    need("fio", "fio");
    need("nbdcopy", "libnbd-bin");
    let engines = run(Command::new("fio").arg("--enghelp"));
    assert!(
        engines.split_whitespace().any(|e| e == "nbd"),
        "this fio has no 'nbd' ioengine (Debian's fio package has it):\n{engines}"
    );
    let dir = TempDir::new("fio");
    let sock = dir.path("s");
    let backing = dir.path("disk.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(SIZE as u64)
        .unwrap();
    let _srv = serve_unix(&sock, Arc::new(FileExport::open(&backing).unwrap())).unwrap();
    let out = run(Command::new("fio")
        .args([
            "--name=v",
            "--ioengine=nbd",
            &format!("--uri={}", uri(&sock)),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            &format!("--size={SIZE}"),
            "--verify=crc32c",
            // no verify-state file left in the working directory
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
            "--output-format=terse",
            "--terse-version=3",
        ])
        .env("FIO_DISABLE_TELEMETRY", "1"));
    assert!(
        !out.contains("verify:"),
        "fio reported verify errors:\n{out}"
    );
    // The export, read back through NBD, is byte for byte the backing file fio wrote through us.
    let copy = dir.path("copy.img");
    std::fs::write(&copy, b"").unwrap();
    run(Command::new("nbdcopy").arg(uri(&sock)).arg(&copy));
    let on_disk = std::fs::read(&backing).unwrap();
    assert_eq!(fnv(&std::fs::read(&copy).unwrap()), fnv(&on_disk));
    assert!(on_disk.iter().any(|&b| b != 0), "fio wrote nothing");
}

/// A slow device that records how many requests it serves at once.
struct Slow {
    inner: MemExport,
    now: std::sync::atomic::AtomicUsize,
    max: std::sync::atomic::AtomicUsize,
}

impl Slow {
    fn enter(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        let n = self.now.fetch_add(1, SeqCst) + 1;
        self.max.fetch_max(n, SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(2));
        self.now.fetch_sub(1, SeqCst);
    }
}

impl xenpv_nbd::BlockExport for Slow {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn flags(&self) -> xenpv_nbd::ExportFlags {
        self.inner.flags()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.enter();
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> std::io::Result<()> {
        self.enter();
        self.inner.write_at(buf, offset, fua)
    }
}

#[test]
fn fio_iodepth_32_is_not_serialised() {
    need("fio", "fio");
    let dir = TempDir::new("fio-qd");
    let sock = dir.path("s");
    let slow = Arc::new(Slow {
        inner: MemExport::new(2 << 20),
        now: 0.into(),
        max: 0.into(),
    });
    let _srv = serve_unix(&sock, Arc::clone(&slow)).unwrap();
    run(Command::new("fio")
        .args([
            "--name=qd",
            "--ioengine=nbd",
            &format!("--uri={}", uri(&sock)),
            "--rw=randread",
            "--bs=4k",
            "--iodepth=32",
            "--size=2M",
            "--output-format=terse",
        ])
        .env("FIO_DISABLE_TELEMETRY", "1"));
    let max = slow.max.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        max >= 4,
        "at most {max} requests ran at once: the server serialises fio's iodepth 32"
    );
}
