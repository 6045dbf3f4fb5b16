//! Helpers shared by blkback's integration tests: heap buffers as volatile slices, and NBD
//! servers (qemu-nbd, nbdkit) run as children.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use xenpv_grant::VolatileSlice;

/// A volatile view of a heap buffer.
pub fn slice(buf: &mut [u8]) -> VolatileSlice<'_> {
    // SAFETY: `buf` is valid for reads and writes of its length for the borrow, and the
    // exclusive borrow keeps any other reference out while the slice lives.
    unsafe { VolatileSlice::new(NonNull::new(buf.as_mut_ptr()).unwrap(), buf.len(), true) }
}

/// A read-only volatile view of a heap buffer.
pub fn ro_slice(buf: &mut [u8]) -> VolatileSlice<'_> {
    // SAFETY: as in `slice`; writes through a read-only view are refused.
    unsafe { VolatileSlice::new(NonNull::new(buf.as_mut_ptr()).unwrap(), buf.len(), false) }
}

/// Fail (not skip) when a tool is missing, naming the Debian package to install.
pub fn need(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: run 'apt-get install {package}' (or scripts/test.sh, which does)"
    );
}

/// A child process killed (by its own handle) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command) -> Proc {
    Proc(
        cmd.stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")),
    )
}

fn wait_for_socket(p: &Path) {
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(p).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} never accepted",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An NBD server on a Unix socket in its own temporary directory.
pub struct NbdServer {
    /// The server process.
    pub proc: Proc,
    /// Its socket.
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl NbdServer {
    /// The `nbd+unix://` URI of the default export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

/// `qemu-nbd --persistent` serving `image` (raw), discards punching holes; `read_only` adds -r.
pub fn qemu_nbd(image: &Path, read_only: bool) -> NbdServer {
    need("qemu-nbd", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s");
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["--persistent", "--shared=8", "-f", "raw", "--discard=unmap"]);
    if read_only {
        cmd.arg("--read-only");
    }
    let proc = spawn(cmd.arg("--socket").arg(&socket).arg(image));
    wait_for_socket(&socket);
    NbdServer {
        proc,
        socket,
        _dir: dir,
    }
}

/// `nbdkit memory SIZE` on a Unix socket.
pub fn nbdkit_memory(size: &str) -> NbdServer {
    need("nbdkit", "nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s");
    let proc = spawn(
        Command::new("nbdkit")
            .args(["--foreground", "--exit-with-parent", "-U"])
            .arg(&socket)
            .args(["memory", size]),
    );
    wait_for_socket(&socket);
    NbdServer {
        proc,
        socket,
        _dir: dir,
    }
}
