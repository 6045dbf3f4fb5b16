//! A helper of the real-Xen rig (`tests/xen/`): one process that waits on xenstore with a watch,
//! instead of a shell loop of `xenstore-read` calls (each process launch costs 0.3–1.5 s in a PV
//! domain under QEMU's TCG).
//!
//! ```text
//! xenpv-rig wait PATH PREFIX SECONDS   wait until PATH's value starts with PREFIX; print it
//! xenpv-rig gone PATH SECONDS          wait until PATH does not exist
//! xenpv-rig domid                      print this domain's id (the `domid` node)
//! xenpv-rig loop-block-size DEV BYTES  set loop device DEV's logical block size (busybox's
//!                                      losetup has no --sector-size)
//! xenpv-rig loop-capacity DEV          loop device DEV takes up its file's new size
//!                                      (`losetup -c`, which busybox's losetup lacks)
//! ```
//! Exit status 0 on success, 1 on a timeout or an error (with the reason on stderr).

use std::process::ExitCode;
use std::time::{Duration, Instant};
use xenpv_xenstore::{Client, XsOps};

fn usage() -> String {
    "usage: xenpv-rig wait PATH PREFIX SECONDS | gone PATH SECONDS | domid | loop-block-size DEV BYTES \
     | loop-capacity DEV"
        .into()
}

/// `LOOP_SET_BLOCK_SIZE` of `<linux/loop.h>`.
const LOOP_SET_BLOCK_SIZE: libc::c_ulong = 0x4C09;

/// `LOOP_SET_CAPACITY` of `<linux/loop.h>`.
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;

/// Runs the loop ioctl `req` (named `what` in errors) with the by-value argument `arg` on the
/// loop device at `dev`.
fn loop_ioctl(dev: &str, req: libc::c_ulong, what: &str, arg: libc::c_ulong) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|e| format!("{dev}: {e}"))?;
    // SAFETY: the loop ioctls used here (LOOP_SET_BLOCK_SIZE, LOOP_SET_CAPACITY) take their
    // argument by value (no pointer); the descriptor is open for the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req, arg) };
    if r < 0 {
        return Err(format!(
            "{dev}: {what} {arg}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Sets the logical block size of the loop device at `dev` to `bytes`.
fn loop_block_size(dev: &str, bytes: &str) -> Result<(), String> {
    let size: libc::c_ulong = bytes
        .parse()
        .map_err(|_| format!("{bytes:?}: not a block size in bytes"))?;
    loop_ioctl(dev, LOOP_SET_BLOCK_SIZE, "LOOP_SET_BLOCK_SIZE", size)
}

fn seconds(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .and_then(|v| Duration::try_from_secs_f64(v).ok())
        .ok_or_else(|| format!("{s:?}: not a number of seconds (0 or more)"))
}

/// Waits until `done(value)` holds for the node at `path` (None: the node does not exist).
fn wait_until(
    xs: &Client,
    path: &str,
    limit: Duration,
    done: impl Fn(Option<&str>) -> bool,
) -> Result<Option<String>, String> {
    let watch = xs.watch(path).map_err(|e| format!("watch {path}: {e}"))?;
    let start = Instant::now();
    loop {
        let v = xs
            .read_opt(path)
            .map_err(|e| format!("read {path}: {e}"))?
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        if done(v.as_deref()) {
            return Ok(v);
        }
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(format!(
                "{path}: still {v:?} after {:.1} s",
                limit.as_secs_f64()
            ));
        }
        // A timeout here only means "read again": the loop checks the deadline.
        let _ = watch.next_timeout(left.min(Duration::from_secs(1)));
    }
}

fn open() -> Result<Client, String> {
    Client::open().map_err(|e| format!("cannot reach xenstore: {e}"))
}

fn run(args: &[String]) -> Result<(), String> {
    match args {
        [cmd, path, prefix, secs] if cmd == "wait" => {
            let limit = seconds(secs)?;
            let v = wait_until(&open()?, path, limit, |v| {
                v.is_some_and(|v| v.starts_with(prefix.as_str()))
            })?;
            println!("{}", v.unwrap_or_default());
            Ok(())
        }
        [cmd, path, secs] if cmd == "gone" => {
            let limit = seconds(secs)?;
            wait_until(&open()?, path, limit, |v| v.is_none()).map(|_| ())
        }
        [cmd] if cmd == "domid" => {
            let v = open()?
                .read_string("domid")
                .map_err(|e| format!("read domid: {e}"))?;
            println!("{}", v.trim());
            Ok(())
        }
        [cmd, dev, bytes] if cmd == "loop-block-size" => loop_block_size(dev, bytes),
        [cmd, dev] if cmd == "loop-capacity" => {
            loop_ioctl(dev, LOOP_SET_CAPACITY, "LOOP_SET_CAPACITY", 0)
        }
        _ => Err(usage()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xenpv-rig: {e}");
            ExitCode::FAILURE
        }
    }
}
