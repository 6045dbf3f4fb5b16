//! Our client against servers we did not write: qemu-nbd (qemu-utils) and nbdkit's memory
//! plugin, over Unix sockets and TCP.

mod common;

use common::{free_port, need, spawn, wait_for_port, wait_for_socket, Rng, TempDir};
use std::process::Command;
use xenpv_nbd::Client;

const SIZE: u64 = 64 << 20;

/// Random writes (some FUA, some pipelined through submit/wait), verified against a model
/// by read-back; then flush. Returns the model.
fn exercise(c: &Client, seed: u64) -> Vec<u8> {
    assert_eq!(c.size(), SIZE);
    let mut model = vec![0u8; SIZE as usize];
    c.read_at(&mut model, 0).unwrap();
    let mut rng = Rng::new(seed);
    for round in 0..100 {
        let len = (rng.below(128) as usize + 1) * 512;
        let off = rng.below(SIZE - len as u64) as usize & !511;
        let data = rng.bytes(len);
        if round % 5 == 0 && c.info().can_fua() {
            c.write_at_fua(&data, off as u64).unwrap();
        } else {
            c.write_at(&data, off as u64).unwrap();
        }
        model[off..off + len].copy_from_slice(&data);
    }
    // 48 pipelined 4 KiB writes, then 48 pipelined reads, completions in any order.
    let blocks: Vec<(u64, Vec<u8>)> = (0..48)
        .map(|i| (i * 65536 + 8192, rng.bytes(4096)))
        .collect();
    let hs: Vec<_> = blocks
        .iter()
        .map(|(o, d)| c.submit_write(*o, d, false).unwrap())
        .collect();
    for h in hs {
        c.wait(h).unwrap();
    }
    for (o, d) in &blocks {
        model[*o as usize..*o as usize + 4096].copy_from_slice(d);
    }
    let hs: Vec<_> = blocks
        .iter()
        .map(|(o, _)| c.submit_read(*o, 4096).unwrap())
        .collect();
    for (h, (_, d)) in hs.into_iter().zip(&blocks) {
        assert!(c.wait(h).unwrap() == *d);
    }
    if c.info().can_flush() {
        c.flush().unwrap();
    }
    let mut back = vec![0u8; SIZE as usize];
    c.read_at(&mut back, 0).unwrap();
    assert!(back == model, "read-back differs from the written model");
    model
}

#[test]
fn against_qemu_nbd() {
    need("qemu-nbd", "qemu-utils");
    let dir = TempDir::new("qemu-nbd");
    let sock = dir.path("s");
    let img = dir.path("disk.img");
    std::fs::File::create(&img).unwrap().set_len(SIZE).unwrap();
    let _p = spawn(
        Command::new("qemu-nbd")
            .args(["--persistent", "--shared=4", "-f", "raw", "--socket"])
            .arg(&sock)
            .arg(&img),
    );
    wait_for_socket(&sock);
    let c = Client::connect(&format!("nbd+unix:///?socket={}", sock.display())).unwrap();
    assert!(c.info().can_flush() && c.info().can_fua() && !c.info().read_only());
    let model = exercise(&c, 11);
    if c.info().can_write_zeroes() {
        c.write_zeroes(4 << 20, 1 << 20).unwrap();
    }
    if c.info().can_trim() {
        c.trim(8 << 20, 1 << 20).unwrap();
    }
    c.disconnect().unwrap();
    // The file behind qemu-nbd holds what we wrote (outside the zeroed/trimmed ranges).
    let file = std::fs::read(&img).unwrap();
    assert!(file[..4 << 20] == model[..4 << 20]);
    assert!(file[5 << 20..8 << 20] == model[5 << 20..8 << 20]);
    assert!(file[9 << 20..] == model[9 << 20..]);
    assert!(file[4 << 20..5 << 20].iter().all(|&b| b == 0));
    // A second connection to the persistent server sees the same data.
    let c = Client::connect_unix(&sock, "").unwrap();
    let mut b = vec![0u8; 4096];
    c.read_at(&mut b, 0).unwrap();
    assert!(b[..] == file[..4096]);
}

fn nbdkit_checks(c: &Client) {
    let i = c.info();
    assert!(i.can_flush() && i.can_fua() && i.can_trim() && i.can_write_zeroes());
    exercise(c, 23);
    // nbdkit memory discards trimmed ranges: they read back as zeroes.
    c.trim(1 << 20, 2 << 20).unwrap();
    let mut z = vec![1u8; 2 << 20];
    c.read_at(&mut z, 1 << 20).unwrap();
    assert!(z.iter().all(|&b| b == 0), "trimmed range is not zero");
    c.write_at(&[7u8; 4096], 5 << 20).unwrap();
    c.write_zeroes(5 << 20, 4096).unwrap();
    let mut z = vec![1u8; 4096];
    c.read_at(&mut z, 5 << 20).unwrap();
    assert!(z.iter().all(|&b| b == 0), "zeroed range is not zero");
    // Out-of-range requests are refused locally, naming the problem.
    let e = c.submit_read(SIZE, 1).unwrap_err();
    assert!(e.to_string().contains("beyond the export size"), "{e}");
}

#[test]
fn against_nbdkit_memory_unix() {
    need("nbdkit", "nbdkit");
    let dir = TempDir::new("nbdkit-unix");
    let sock = dir.path("s");
    let _p = spawn(
        Command::new("nbdkit")
            .args(["--foreground", "--exit-with-parent", "-U"])
            .arg(&sock)
            .args(["memory", "64M"]),
    );
    wait_for_socket(&sock);
    let c = Client::connect(&format!("nbd+unix:///?socket={}", sock.display())).unwrap();
    nbdkit_checks(&c);
    c.disconnect().unwrap();
}

#[test]
fn against_nbdkit_memory_tcp() {
    need("nbdkit", "nbdkit");
    let port = free_port();
    let _p = spawn(
        Command::new("nbdkit")
            .args([
                "--foreground",
                "--exit-with-parent",
                "-i",
                "127.0.0.1",
                "-p",
            ])
            .arg(port.to_string())
            .args(["memory", "64M"]),
    );
    wait_for_port(port);
    let c = Client::connect(&format!("nbd://127.0.0.1:{port}/")).unwrap();
    nbdkit_checks(&c);
    // Several threads share one connection.
    let c = std::sync::Arc::new(c);
    let ts: Vec<_> = (0..4u64)
        .map(|t| {
            let c = std::sync::Arc::clone(&c);
            std::thread::spawn(move || {
                let mut rng = Rng::new(100 + t);
                for i in 0..50u64 {
                    let off = (t * 50 + i) * 8192 + (32 << 20);
                    let d = rng.bytes(8192);
                    c.write_at(&d, off).unwrap();
                    let mut b = vec![0u8; 8192];
                    c.read_at(&mut b, off).unwrap();
                    assert!(b == d);
                }
            })
        })
        .collect();
    for t in ts {
        t.join().unwrap();
    }
}

#[test]
fn export_name_fallback_and_errors() {
    need("nbdkit", "nbdkit");
    let dir = TempDir::new("nbdkit-old");
    let sock = dir.path("s");
    // qemu-nbd exporting only "disk" refuses other names in NBD_OPT_GO.
    need("qemu-nbd", "qemu-utils");
    let img = dir.path("d.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let _p = spawn(
        Command::new("qemu-nbd")
            .args(["--persistent", "-x", "disk", "-f", "raw", "--socket"])
            .arg(&sock)
            .arg(&img),
    );
    wait_for_socket(&sock);
    let e = Client::connect_unix(&sock, "nope").unwrap_err();
    assert!(e.to_string().contains("NBD_REP_ERR_UNKNOWN"), "{e}");
    let c = Client::connect_unix(&sock, "disk").unwrap();
    assert_eq!(c.size(), 1 << 20);
    drop(c);
    // Oldstyle nbdkit is recognised and refused with a message saying so.
    let sock2 = dir.path("old");
    let _q = spawn(
        Command::new("nbdkit")
            .args(["--foreground", "--exit-with-parent", "--oldstyle", "-U"])
            .arg(&sock2)
            .args(["memory", "1M"]),
    );
    wait_for_socket(&sock2);
    let e = Client::connect_unix(&sock2, "").unwrap_err();
    assert!(e.to_string().contains("oldstyle"), "{e}");
}
