//! The `xenpv-blkfront` binary exports the disk over NBD; nbdinfo, qemu-img and fio
//! (nbd engine, iodepth 32, verify=crc32c) drive it; the result is compared with the image.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;

/// Runs `cmd`; panics with its output unless it succeeds.
fn succeed(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img compare`: the export at `uri` equals the image read directly.
fn assert_same(img: &std::path::Path, uri: &str) {
    succeed(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(img)
            .arg(uri),
    );
}

#[test]
fn nbd_export_with_real_tools() {
    for (tool, package) in [
        ("nbdinfo", "libnbd-bin"),
        ("qemu-img", "qemu-utils"),
        ("fio", "fio"),
    ] {
        need(tool, package);
    }
    let env = env(32 << 20);
    let _b = start_backend(&env, Default::default());
    let sock = env.root.join("disk.nbd");
    let mut child = Command::new(env!("CARGO_BIN_EXE_xenpv-blkfront"))
        .args(["--platform", "local", "--state-dir"])
        .arg(&env.root)
        .args([
            "--domid",
            "1",
            "--device",
            "xvda",
            "--queues",
            "2",
            "--nbd-socket",
        ])
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.contains("ready"), "{line}");
    let uri = format!("nbd+unix:///?socket={}", sock.display());

    let info = Command::new("nbdinfo").arg(&uri).output().unwrap();
    let info_s = String::from_utf8_lossy(&info.stdout);
    assert!(info.status.success(), "{info_s}");
    assert!(info_s.contains(&(32u64 << 20).to_string()), "{info_s}");

    // qemu-img compare: the export equals the image.
    assert_same(&env.img, &uri);

    // fio: random writes at QD32 with crc32c verification.
    succeed(Command::new("fio").args([
        "--name=blkfront",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--size=16m",
        "--verify=crc32c",
        // no verify-state file left in the working directory
        "--verify_state_save=0",
        "--do_verify=1",
    ]));

    // After fio's writes, the export still equals the image read directly.
    assert_same(&env.img, &uri);

    // SIGTERM: clean close.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success());
    let state = xenpv_xenstore::xenbus::read_state(&env.dom0, &env.fe).unwrap();
    assert_eq!(state, xenpv_xenstore::XenbusState::Closed);
}

/// `--max-indirect-segments` and `--pool-pages` reach the device: against a backend offering
/// 4096 segments, fio writes and verifies 16 MiB blocks through a pool set below one of them
/// (it takes the largest request anyway), and the export still equals the image.
#[test]
fn export_with_the_largest_requests_and_a_small_pool() {
    need("qemu-img", "qemu-utils");
    need("fio", "fio");
    let env = env(64 << 20);
    let _b = start_backend(
        &env,
        xenpv_blkback::device::Config {
            max_indirect_segments: 4096,
            ..Default::default()
        },
    );
    let export = Export::start(
        &env,
        &["--max-indirect-segments", "4096", "--pool-pages", "300"],
    );
    succeed(Command::new("fio").args([
        "--name=big",
        "--ioengine=nbd",
        &format!("--uri={}", export.uri),
        "--rw=write",
        "--bs=16m",
        "--iodepth=2",
        "--size=48m",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--do_verify=1",
    ]));
    assert_same(&env.img, &export.uri);
    export.close();
}

/// Bad values of the tunables are refused before anything connects, naming the flag and the
/// fix.
#[test]
fn bad_tunables_are_refused_with_the_fix() {
    for (args, want) in [
        (["--max-indirect-segments", "5000"], "--no-indirect"),
        (["--max-indirect-segments", "0"], "12 to 4096"),
        (["--pool-pages", "0"], "--no-persistent"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_xenpv-blkfront"))
            .args(["--domid", "1", "--device", "xvda", "--load"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(
            err.contains(args[0]) && err.contains(want),
            "{args:?}: {err}"
        );
    }
}
