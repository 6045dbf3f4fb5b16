//! `xenpv local` and `xenpv domain` as processes: the daemon on a temporary state directory,
//! Debian's `xenstore-ls` against it, domains created and destroyed over `control.sock` with
//! their xenstore identity, grant and event-channel sockets, a second daemon refused, clean
//! SIGTERM shutdown, and stale files of a SIGKILLed daemon cleaned at the next start.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use xenpv_evtchn::local::LocalEvtchn;
use xenpv_evtchn::EventChannel;
use xenpv_grant::local::LocalGrants;
use xenpv_grant::{Access, GrantMap, GrantMemory, GrantShare, SharedPages};
use xenpv_xenstore::{Client, Errno, XsOps};

const T: Duration = Duration::from_secs(10);

/// A running `xenpv local`; SIGKILLed on drop if still running.
struct Local {
    child: Child,
    root: PathBuf,
}

impl Local {
    fn start(root: &Path) -> Local {
        let mut child = Command::new(env!("CARGO_BIN_EXE_xenpv"))
            .args(["--platform", "local", "--state-dir"])
            .arg(root)
            .arg("local")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The first line is printed once every socket is ready.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let want = format!(
            "export XENSTORED_PATH={}",
            root.join("dom0/xenstore.sock").display()
        );
        assert_eq!(line.trim_end(), want, "xenpv local did not get ready");
        Local {
            child,
            root: root.to_path_buf(),
        }
    }

    fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid; no memory involved.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Waits at most `T` for the daemon to exit.
    fn wait(&mut self) -> std::process::ExitStatus {
        let end = std::time::Instant::now() + T;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(std::time::Instant::now() < end, "daemon did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn xenpv(&self, args: &[&str]) -> Output {
        xenpv(&self.root, args)
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn xenpv(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xenpv"))
        .args(["--platform", "local", "--state-dir"])
        .arg(root)
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "xenpv failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn failed(out: Output) -> String {
    assert!(!out.status.success(), "xenpv should have failed");
    String::from_utf8(out.stderr).unwrap()
}

fn errno(r: xenpv_xenstore::Result<impl std::fmt::Debug>) -> Errno {
    match r {
        Err(xenpv_xenstore::Error::Xs { errno, .. }) => errno,
        other => panic!("expected a xenstore error, got {other:?}"),
    }
}

const SOCKETS: [&str; 3] = ["xenstore.sock", "grant.sock", "evtchn.sock"];

#[test]
fn domains_come_and_go_with_their_identity_grants_and_event_channels() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut local = Local::start(root);
    for s in SOCKETS {
        assert!(root.join("dom0").join(s).exists(), "dom0/{s}");
    }

    // Debian's xenstore-ls, through XENSTORED_PATH.
    let out = Command::new("xenstore-ls")
        .env("XENSTORED_PATH", root.join("dom0/xenstore.sock"))
        .output()
        .expect("xenstore-ls missing: apt-get install xenstore-utils");
    let ls = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "xenstore-ls: {out:?}");
    assert!(ls.contains("name = \"Domain-0\""), "{ls}");

    let dom0 = Client::connect_local(root, 0).unwrap();
    let intro = dom0.watch("@introduceDomain").unwrap();
    let release = dom0.watch("@releaseDomain").unwrap();
    // Registering a watch fires it once.
    intro.next_timeout(T).unwrap();
    release.next_timeout(T).unwrap();

    assert_eq!(
        ok(local.xenpv(&["domain", "create", "--name", "g1"])).trim(),
        "1"
    );
    assert_eq!(intro.next_timeout(T).unwrap().path, "@introduceDomain");
    for s in SOCKETS {
        assert!(root.join("dom1").join(s).exists(), "dom1/{s}");
    }
    assert_eq!(dom0.read_string("/local/domain/1/name").unwrap(), "g1");
    assert_eq!(dom0.read_string("/local/domain/1/domid").unwrap(), "1");
    assert_eq!(ok(local.xenpv(&["domain", "create"])).trim(), "2");
    let list = ok(local.xenpv(&["domain", "list"]));
    assert!(list.contains("0      Domain-0"), "{list}");
    assert!(list.contains("1      g1"), "{list}");
    assert!(list.contains("2      dom2"), "{list}");
    let e = failed(local.xenpv(&["domain", "create", "--name", "g1"]));
    assert!(e.contains("already used by domain 1"), "{e}");
    let e = failed(local.xenpv(&["domain", "create", "--domid", "2"]));
    assert!(e.contains("domain 2 already exists"), "{e}");
    let e = failed(local.xenpv(&["domain", "create", "--name", "a/b"]));
    assert!(e.contains("bad domain name"), "{e}");

    // The guest's xenstore socket speaks for domain 1.
    let g1 = Client::connect_local(root, 1).unwrap();
    g1.write("/local/domain/1/data/hello", b"world").unwrap();
    assert_eq!(
        dom0.read_string("/local/domain/1/data/hello").unwrap(),
        "world"
    );
    assert_eq!(errno(g1.read("/local/domain/2/name")), Errno::EACCES);
    assert_eq!(
        errno(g1.write("/local/domain/1/name", b"evil")),
        Errno::EACCES
    );
    assert_eq!(g1.read_string("/local/domain/1/name").unwrap(), "g1");

    // Grants: domain 1 shares a page with dom0, dom0 maps it.
    let front = LocalGrants::connect(root.join("dom1/grant.sock")).unwrap();
    let back = LocalGrants::connect(root.join("dom0/grant.sock")).unwrap();
    assert_eq!(front.domid(), 1);
    let shared = front.share(0, 1, Access::Writable).unwrap();
    shared.volatile().write(0, b"from g1").unwrap();
    let m = back
        .map_domain(1, shared.grefs(), Access::Writable)
        .unwrap();
    let mut buf = [0u8; 7];
    m.volatile().read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"from g1");
    drop(m);

    // Event channels: domain 1 offers a port to dom0, dom0 binds it and notifies.
    let e1 = LocalEvtchn::connect(root.join("dom1/evtchn.sock")).unwrap();
    let e0 = LocalEvtchn::connect(root.join("dom0/evtchn.sock")).unwrap();
    let p1 = e1.bind_unbound(0).unwrap();
    let p0 = e0.bind_interdomain(1, p1).unwrap();
    e0.notify(p0).unwrap();
    let mut ports = Vec::new();
    e1.wait(&mut ports, Some(T)).unwrap();
    assert_eq!(ports, vec![p1]);

    // Destroy: @releaseDomain, home and sockets gone, the guest cut off.
    ok(local.xenpv(&["domain", "destroy", "1"]));
    assert_eq!(release.next_timeout(T).unwrap().path, "@releaseDomain");
    assert_eq!(errno(dom0.read("/local/domain/1")), Errno::ENOENT);
    assert!(!root.join("dom1").exists());
    assert!(g1.read("/local/domain/1/data/hello").is_err());
    assert!(back
        .map_domain(1, shared.grefs(), Access::Writable)
        .is_err());
    drop((shared, front, e1));
    let e = failed(local.xenpv(&["domain", "destroy", "1"]));
    assert!(e.contains("no domain 1"), "{e}");
    let e = failed(local.xenpv(&["domain", "destroy", "0"]));
    assert!(e.contains("domain 0 belongs to the daemon"), "{e}");
    assert!(ok(local.xenpv(&["domain", "list"])).contains("2      dom2"));

    // A second daemon on the same directory refuses.
    let e = failed(local.xenpv(&["local"]));
    assert!(
        e.contains(&format!("pid {}", local.child.id())) && e.contains("already running"),
        "{e}"
    );

    // SIGTERM: exit 0, nothing left behind.
    drop((dom0, intro, release, g1, back, e0));
    local.signal(libc::SIGTERM);
    let st = local.wait();
    assert!(st.success(), "daemon exit status {st:?}");
    let left: Vec<_> = std::fs::read_dir(root).unwrap().flatten().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_killed_daemon_leaves_stale_files_that_the_next_start_cleans() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut local = Local::start(root);
    assert_eq!(
        ok(local.xenpv(&["domain", "create", "--domid", "5"])).trim(),
        "5"
    );
    // Something of a backend's own in the state directory must survive the cleaning.
    std::fs::write(root.join("dom5/keep.state"), b"x").unwrap();
    local.signal(libc::SIGKILL);
    local.wait();
    assert!(root.join("local.pid").exists());
    assert!(root.join("control.sock").exists());
    assert!(root.join("dom5/xenstore.sock").exists());
    let e = failed(xenpv(root, &["domain", "list"]));
    assert!(e.contains("start it with `xenpv local`"), "{e}");

    let local = Local::start(root);
    assert!(!root.join("dom5/xenstore.sock").exists());
    assert!(root.join("dom5/keep.state").exists());
    let list = ok(local.xenpv(&["domain", "list"]));
    assert!(!list.contains("dom5"), "{list}");
    assert_eq!(ok(local.xenpv(&["domain", "create"])).trim(), "1");
}

#[test]
fn domain_verbs_name_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let e = failed(xenpv(dir.path(), &["domain", "create"]));
    assert!(
        e.contains("no local platform at") && e.contains("start it with `xenpv local`"),
        "{e}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_xenpv"))
        .args(["--platform", "xen", "domain", "destroy", "3"])
        .output()
        .unwrap();
    let e = failed(out);
    assert!(e.contains("use `xl destroy`"), "{e}");
    let out = Command::new(env!("CARGO_BIN_EXE_xenpv"))
        .args(["--platform", "xen", "local"])
        .output()
        .unwrap();
    assert!(failed(out).contains("is for the local platform"));
}

/// `xenpv bench --only` with a name no workload has is refused before anything starts, with
/// the workloads' names.
#[test]
fn bench_only_names_the_workloads() {
    let out = Command::new(env!("CARGO_BIN_EXE_xenpv"))
        .args(["bench", "disk", "--only", "8k randread"])
        .output()
        .unwrap();
    let e = failed(out);
    assert!(
        e.contains("--only 8k randread") && e.contains("4k randread QD1, 4k randread QD32"),
        "{e}"
    );
}

/// The directory of `xenpv`, where `cargo test --workspace` also builds the drivers' binaries.
fn driver_bins() -> &'static Path {
    let bins = Path::new(env!("CARGO_BIN_EXE_xenpv")).parent().unwrap();
    for b in ["xenpv-blkback", "xenpv-blkfront"] {
        assert!(
            bins.join(b).exists(),
            "{b} is not built next to xenpv: run `cargo test --workspace`"
        );
    }
    bins
}

/// The processes whose parent is `pid` (from `/proc/*/stat`).
fn children_of(pid: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces, so split after the last ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let ppid: Option<u32> = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(pid) {
            kids.extend(e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()));
        }
    }
    kids
}

/// A running `xenpv bench` (16 MiB in `dir`, 4 KiB random reads at QD1 with `runtime`-second
/// runs) once it has reported its first round: the child, its stderr lines still to come, and
/// its child processes (the local platform, the drivers, qemu-nbd, fio). Needs the workspace's
/// binaries next to `xenpv`, as `cargo test --workspace` builds them.
fn bench_at_first_round(
    dir: &Path,
    runtime: &str,
) -> (Child, std::sync::mpsc::Receiver<String>, Vec<u32>) {
    let exe = Path::new(env!("CARGO_BIN_EXE_xenpv"));
    driver_bins();
    // Its work directory (the local platform's state, sockets, status file) goes under `dir`
    // too: a bench ended at once by a second signal cannot remove it, and the test's
    // temporary directory then takes it away.
    let mut bench = Command::new(exe)
        .env("TMPDIR", dir)
        .args(["bench", "disk", "--dirs"])
        .arg(dir)
        .args(["--size-mib", "16", "--runtime", runtime, "--rounds", "50"])
        .args(["--only", "randread QD1", "--json"])
        .arg(dir.join("out.json"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = BufReader::new(bench.stderr.take().unwrap());
    std::thread::spawn(move || {
        for l in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut seen = Vec::new();
    loop {
        let l = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("the bench never reached its first round: {seen:?}"));
        let first = l.contains("round 1/50");
        seen.push(l);
        if first {
            break;
        }
    }
    let kids = children_of(bench.id());
    assert!(kids.len() >= 3, "the bench's processes: {kids:?}");
    (bench, rx, kids)
}

fn sigterm(pid: u32) {
    // SAFETY: kill(2) with a pid and a signal number; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
}

/// The processes among `kids`, or whose command line names something in `dir`, still alive
/// after waiting up to `limit` for them to go.
fn outliving(dir: &Path, kids: &[u32], limit: Duration) -> Vec<u32> {
    let dir = dir.to_string_lossy().into_owned();
    let deadline = std::time::Instant::now() + limit;
    loop {
        let mut left = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            // A zombie has an empty command line: gone, as far as this is concerned.
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if cmdline.is_empty() {
                continue;
            }
            if kids.contains(&pid) || String::from_utf8_lossy(&cmdline).contains(&dir) {
                left.push(pid);
            }
        }
        if left.is_empty() || std::time::Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for `bench` to exit, at most `limit`.
fn exit_within(bench: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(s) = bench.try_wait().unwrap() {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the bench did not stop within {limit:?} of the signal"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM to `xenpv bench` alone stops it at its next run: it exits with an error that says
/// so, every process it started (the local platform, the drivers, qemu-nbd) is stopped and its
/// test file is removed. (The default action would have left them all behind.)
#[test]
fn bench_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let (mut bench, rx, kids) = bench_at_first_round(dir.path(), "1");
    sigterm(bench.id());
    let status = exit_within(&mut bench, Duration::from_secs(60));
    assert!(!status.success());
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("stopped by a signal")),
        "{rest:?}"
    );
    for k in kids {
        assert!(
            !Path::new(&format!("/proc/{k}")).exists(),
            "process {k} the bench started outlived it"
        );
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().ends_with(".img"))
        .collect();
    assert!(left.is_empty(), "test files left behind: {left:?}");
}

/// A second signal ends a bench at once, without waiting for its current run (10 s here) to
/// end: for a bench stuck on its way out. (Its processes are then the caller's to stop, as
/// with the default action; the test stops them.)
#[test]
fn a_second_signal_ends_the_bench_at_once() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let (mut bench, rx, kids) = bench_at_first_round(dir.path(), "10");
    sigterm(bench.id());
    // Apart, or the kernel may merge the two into one pending signal.
    std::thread::sleep(Duration::from_millis(200));
    sigterm(bench.id());
    let status = exit_within(&mut bench, Duration::from_secs(3));
    // Nothing it started outlives it: the kernel kills its children with it (the fio run of
    // the moment included, which the guards had no time to stop).
    let left = outliving(dir.path(), &kids, Duration::from_secs(3));
    for &k in &left {
        // SAFETY: as in `sigterm`; a pid that has gone by now is answered with ESRCH.
        unsafe { libc::kill(k as i32, libc::SIGKILL) };
    }
    assert!(left.is_empty(), "processes outlived the bench: {left:?}");
    assert_eq!(status.code(), Some(1));
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        !rest.iter().any(|l| l.contains("stopped by a signal")),
        "the bench stopped the slow way: {rest:?}"
    );
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `xenpv list` shows each disk's statistics from blkback's status file: a disk served by
/// xenpv-blkback to xenpv-blkfront (both as processes, the load generator writing, then reading),
/// and the error that names the fix when the file is not there; then SIGTERM stops the load
/// generator while it waits for a workload.
#[test]
fn list_shows_the_disks_statistics_from_blkbacks_status_file() {
    let bins = driver_bins();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("state");
    std::fs::create_dir(&root).unwrap();
    let local = Local::start(&root);
    assert_eq!(ok(local.xenpv(&["domain", "create"])).trim(), "1");
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let spec = format!("target={},vdev=xvda,access=rw", image.display());
    ok(local.xenpv(&["attach-disk", "1", &spec]));
    let status = dir.path().join("blkback.status");
    let _back = Killed(
        Command::new(bins.join("xenpv-blkback"))
            .args(["--platform", "local", "--state-dir"])
            .arg(&root)
            .arg("--status-file")
            .arg(&status)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // 4 KiB random writes then reads, at QD4 for half a second each, without ramp.
    let mut front = Killed(
        Command::new(bins.join("xenpv-blkfront"))
            .args(["--platform", "local", "--state-dir"])
            .arg(&root)
            .args(["--domid", "1", "--device", "xvda", "--load"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Its stdin stays open until the end: at its end the frontend closes the disk.
    let mut stdin = front.0.stdin.take().unwrap();
    std::io::Write::write_all(
        &mut stdin,
        b"randwrite 4096 4 0 0.5\nrandread 4096 4 0 0.5\n",
    )
    .unwrap();
    // A line saying it is ready, then one line of JSON per workload.
    let mut out = BufReader::new(front.0.stdout.take().unwrap()).lines();
    let mut results = Vec::new();
    while results.len() < 2 {
        match out.next() {
            Some(Ok(l)) if l.starts_with('{') => {
                assert!(l.contains("\"errors\":0"), "{l}");
                results.push(l);
            }
            Some(Ok(_)) => {}
            _ => panic!("the load generator stopped after {results:?}"),
        }
    }

    // The daemon rewrites its status file every second.
    let be = "/local/domain/0/backend/vbd/1/51712";
    let end = std::time::Instant::now() + T;
    let counters = loop {
        let s = xenpv::status::Status::read(&status).ok();
        let e = s.as_ref().and_then(|s| s.device(be)).cloned();
        if let Some(e) = e.filter(|e| e.get("reads").unwrap_or(0) > 0) {
            break e;
        }
        assert!(std::time::Instant::now() < end, "no reads in {status:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let (reads, writes) = (counters.get("reads"), counters.get("writes"));
    assert!(writes.unwrap_or(0) > 0, "{counters:?}");

    let list = ok(local.xenpv(&["list", "--status-file", status.to_str().unwrap()]));
    let mut lines = list
        .lines()
        .skip_while(|l| !l.starts_with("1      vbd  51712"));
    let row = lines
        .next()
        .unwrap_or_else(|| panic!("no row for xvda: {list}"));
    assert!(row.contains("Connected"), "{list}");
    let stats = lines.next().unwrap_or_default();
    // At least what we read (the file may have been rewritten since, with more).
    let shown = |k: &str| -> u64 {
        stats
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k}= under the row: {list}"))
    };
    assert!(shown("reads") >= reads.unwrap(), "{list}");
    assert!(shown("writes") >= writes.unwrap(), "{list}");
    assert!(stats.contains("errors=0"), "{list}");

    let e = failed(local.xenpv(&["list", "--status-file", "/nonexistent/status"]));
    assert!(
        e.contains("/nonexistent/status") && e.contains("xenpv-blkback running with --status-file"),
        "{e}"
    );

    // SIGTERM with stdin still open: the load generator closes the disk and exits cleanly.
    let pid = front.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let end = std::time::Instant::now() + T;
    let exit = loop {
        if let Some(s) = front.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < end,
            "xenpv-blkfront --load ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
    drop(stdin);
}
