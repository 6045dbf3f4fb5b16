//! `xenpv bench disk`: a disk served end to end on the local platform — `xenpv local`,
//! `xenpv-blkback` and `xenpv-blkfront` as separate processes, fio driving the frontend's NBD
//! export — measured against fio on the very same file with the same engine ([`base_engine`]:
//! psync for a file in memory, which blkback copies inline whatever its engine), interleaved
//! (baseline, ours, baseline, ours …, each round in an order rotated by one from the last's),
//! medians reported with their ratios.
//!
//! A second path measures the driver pair without NBD: `xenpv-blkfront --load` (a closed-loop
//! load generator on the blkfront API, in its own process) on a second disk backed by the same
//! file, with the same workloads, interleaved with the others. Like fio, whose reads land in its
//! buffers with no copy, the generator reads in place (`BlkFront::submit_read_in_place`): the
//! data reaches its granted pages and is not copied out.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A program could not be started or failed.
    #[error("{what}: {why}")]
    Step {
        /// What was being done.
        what: String,
        /// Why it failed, and what to do.
        why: String,
    },
}

type Result<T> = std::result::Result<T, Error>;

fn step(what: impl Into<String>, why: impl ToString) -> Error {
    Error::Step {
        what: what.into(),
        why: why.to_string(),
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directories holding the test file (e.g. `/tmp` and `/dev/shm`).
    pub dirs: Vec<PathBuf>,
    /// Test file size in MiB.
    pub size_mib: u64,
    /// Seconds per fio run.
    pub runtime: u64,
    /// Interleaved rounds per workload (medians are reported).
    pub rounds: usize,
    /// Storage engine of blkback and fio (`io_uring` or `psync`).
    pub engine: String,
    /// Where to write the results as JSON.
    pub json: Option<PathBuf>,
    /// Directory holding `xenpv-blkback` and `xenpv-blkfront` (default: next to this program).
    pub bin_dir: Option<PathBuf>,
    /// blkback's polling budget before it sleeps on its event channel (µs); `None` keeps its
    /// default.
    pub back_spin_us: Option<u64>,
    /// blkfront's polling budget, likewise.
    pub front_spin_us: Option<u64>,
    /// Run only the workloads whose name contains this.
    pub only: Option<String>,
    /// Measure only fio on the file and the no-NBD path (no NBD export, no qemu-nbd, no
    /// pinned runs): for quick experiments on the drivers themselves.
    pub direct_only: bool,
    /// Guest memory in 4 KiB pages (sparse memfds) rather than 2 MiB ones.
    pub small_pages: bool,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Per directory.
    pub dirs: Vec<DirResult>,
    /// Whether the guest's memory was in 2 MiB pages (`xenpv local --huge-pages`).
    pub huge_pages: bool,
}

/// One fio workload.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Label.
    pub name: &'static str,
    /// fio `rw`.
    pub rw: &'static str,
    /// Block size in bytes.
    pub bs: u32,
    /// Queue depth.
    pub qd: u32,
}

/// The workloads of the issue: 4 KiB random read QD1 and QD32, 4 KiB random write QD32, 1 MiB
/// sequential read QD8.
pub const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "4k randread QD1",
        rw: "randread",
        bs: 4096,
        qd: 1,
    },
    Workload {
        name: "4k randread QD32",
        rw: "randread",
        bs: 4096,
        qd: 32,
    },
    Workload {
        name: "4k randwrite QD32",
        rw: "randwrite",
        bs: 4096,
        qd: 32,
    },
    Workload {
        name: "1M seqread QD8",
        rw: "read",
        bs: 1 << 20,
        qd: 8,
    },
];

/// What one fio run measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Measure {
    /// I/O operations per second.
    pub iops: f64,
    /// MB/s (10^6 bytes).
    pub mbps: f64,
    /// Median latency of an I/O from its submission to its completion, µs.
    pub p50_us: f64,
    /// 99th percentile of that latency, µs.
    pub p99_us: f64,
    /// Backend CPU seconds per I/O, µs (ours: blkback's; baseline: fio's own).
    pub cpu_us_per_io: f64,
    /// Event-channel notifications per I/O sent by the backend (ours only).
    pub notify_per_io: f64,
}

fn json_num(v: &serde_json::Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for p in path {
        cur = match cur.get(p) {
            Some(c) => c,
            None => return 0.0,
        };
    }
    cur.as_f64().unwrap_or(0.0)
}

/// A percentile of fio's total latency (`lat_ns`, asked for with `--lat_percentiles=1`), µs.
///
/// Not `clat_ns`: for io_uring, fio starts the completion latency after `io_uring_enter` has
/// submitted the I/O, so clat leaves out the submission (about 15 µs on this kind of VM, the
/// virtio kick included), which the load generator's latencies, taken from the call that submits
/// to its completion, count. fio versions without `lat_ns` percentiles fall back to clat.
fn latency(side: &serde_json::Value, pct: &str) -> f64 {
    let lat = json_num(side, &["lat_ns", "percentile", pct]);
    let ns = if lat > 0.0 {
        lat
    } else {
        json_num(side, &["clat_ns", "percentile", pct])
    };
    ns / 1000.0
}

/// Set by SIGTERM, SIGINT or SIGHUP: the bench stops at the next run and unwinds, which stops
/// every process it started and removes its test files (the default action, dying at once,
/// would leave the local platform, the drivers and qemu-nbd running and a test file of
/// `--size-mib` in `/dev/shm`). A second signal, for a bench stuck on its way out, ends it at
/// once (exit status 1), as the default action would have.
static STOP: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> =
    std::sync::OnceLock::new();

fn catch_signals() -> Result<()> {
    let flag = STOP.get_or_init(Default::default);
    for sig in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ] {
        // The shutdown first: it sees the flag as the previous signal left it.
        signal_hook::flag::register_conditional_shutdown(sig, 1, flag.clone())
            .and_then(|_| signal_hook::flag::register(sig, flag.clone()))
            .map_err(|e| step("handling signals", e))?;
    }
    Ok(())
}

/// An error once a signal asked the bench to stop.
fn check_stop() -> Result<()> {
    match STOP.get() {
        Some(f) if f.load(std::sync::atomic::Ordering::SeqCst) => Err(step(
            "xenpv bench",
            "stopped by a signal (the processes it started were stopped, its test files removed)",
        )),
        _ => Ok(()),
    }
}

/// Has the kernel kill `cmd`'s process (SIGKILL) when the bench dies, whichever way: the
/// guards stop every child on the way out, but a second signal ends the bench at once and a
/// crash or SIGKILL skips them. (The bench starts its children from its main thread, which
/// lives as long as it does: the parent-death signal follows the thread that forked.)
fn dies_with_bench(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only makes the prctl
    // system call, which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Runs fio and returns its measure (the job's read or write side, whichever did I/O).
///
/// Its CPU per I/O is that of its job thread (fio's own `usr_cpu` and `sys_cpu`) plus that of
/// the io_uring worker threads (`iou-wrk-*`) the kernel runs for it: where a file cannot be
/// read or written without blocking (tmpfs), io_uring hands every op to a worker, which does
/// the copy that blkback does itself, and fio's own figures leave that out (on tmpfs, fio's
/// process used twice the CPU it reported: 5.5 s against 2.6 s over a 3 s randread QD32).
fn fio(args: &[String]) -> Result<Measure> {
    check_stop()?;
    let mut child = dies_with_bench(&mut Command::new("fio"))
        .args(args)
        .arg("--output-format=json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            step(
                "running fio",
                format!("{e} (install it: apt-get install -y fio)"),
            )
        })?;
    // The workers' CPU, sampled until fio exits (a worker's last sample period is missed: an
    // undercount, which can only make our ratio look worse).
    let mut workers = std::collections::HashMap::new();
    while child
        .try_wait()
        .map_err(|e| step("waiting for fio", e))?
        .is_none()
    {
        io_workers_cpu(child.id(), &mut workers);
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child
        .wait_with_output()
        .map_err(|e| step("reading fio's output", e))?;
    if !out.status.success() {
        return Err(step(
            "fio",
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print warnings before the JSON.
    let start = text
        .find('{')
        .ok_or_else(|| step("fio output", "no JSON"))?;
    let v: serde_json::Value =
        serde_json::from_str(&text[start..]).map_err(|e| step("fio JSON", e))?;
    let job = &v["jobs"][0];
    let side = if json_num(job, &["write", "io_bytes"]) > json_num(job, &["read", "io_bytes"]) {
        "write"
    } else {
        "read"
    };
    let s = &job[side];
    let ios = json_num(s, &["total_ios"]);
    if ios < 1.0 {
        return Err(step("fio", "it completed no I/O"));
    }
    let runtime_s = json_num(job, &["job_runtime"]) / 1000.0;
    let cpu_s = (json_num(job, &["usr_cpu"]) + json_num(job, &["sys_cpu"])) / 100.0 * runtime_s;
    let iops = json_num(s, &["iops"]);
    // The workers ran through the ramp as well: count its I/Os too.
    let worker_ios = (iops * (runtime_s + RAMP_S as f64)).max(1.0);
    let worker_s: f64 = workers.values().sum();
    Ok(Measure {
        iops,
        mbps: json_num(s, &["bw_bytes"]) / 1e6,
        p50_us: latency(s, "50.000000"),
        p99_us: latency(s, "99.000000"),
        cpu_us_per_io: (cpu_s / ios + worker_s / worker_ios) * 1e6,
        notify_per_io: 0.0,
    })
}

/// Records the CPU seconds of each io_uring worker thread of process `pid` so far
/// (`/proc/<pid>/task/<tid>`, threads named `iou-wrk-*`).
fn io_workers_cpu(pid: u32, seen: &mut std::collections::HashMap<String, f64>) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        let dir = t.path();
        let is_worker =
            std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.starts_with("iou-wrk"));
        if is_worker {
            let tid = t.file_name().to_string_lossy().into_owned();
            seen.insert(tid, stat_cpu_seconds(&dir.join("stat")));
        }
    }
}

/// Bytes of I/O buffers fio needs for any of `workloads` (queue depth × block size), with
/// 2 MiB more for its alignment, in whole 2 MiB pages.
fn fio_buffer_bytes(workloads: &[Workload]) -> u64 {
    const HUGE: u64 = 2 << 20;
    let most = workloads
        .iter()
        .map(|w| u64::from(w.qd) * u64::from(w.bs))
        .max()
        .unwrap_or(0);
    (most + HUGE).div_ceil(HUGE) * HUGE
}

/// Warm-up seconds of every run (fio's `ramp_time`, the load generator's ramp).
const RAMP_S: u64 = 1;

fn common_args(w: &Workload, size_mib: u64, runtime: u64) -> Vec<String> {
    vec![
        "--name=xenpv-bench".into(),
        // The job as a thread of fio's one process, not a forked process: the kernel then
        // kills all of it with the bench ([`dies_with_bench`] is not inherited by a fork; a job
        // process whose fio died waits forever). usr_cpu/sys_cpu are the job's either way.
        "--thread".into(),
        format!("--rw={}", w.rw),
        format!("--bs={}", w.bs),
        format!("--iodepth={}", w.qd),
        format!("--size={size_mib}M"),
        "--time_based".into(),
        format!("--runtime={runtime}"),
        format!("--ramp_time={RAMP_S}"),
        "--norandommap".into(),
        "--randrepeat=0".into(),
        // Percentiles of the whole latency, submission included (see `latency`).
        "--lat_percentiles=1".into(),
    ]
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(Path::new(&format!("/proc/{pid}/stat")))
}

/// CPU seconds (user + system) in a process's or a thread's `stat` file.
fn stat_cpu_seconds(path: &Path) -> f64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

/// The backend's notification counter for a device, from its status file.
fn notifications(status: &Path, device: &str) -> f64 {
    crate::status::Status::read(status)
        .ok()
        .and_then(|s| s.device(device).and_then(|e| e.get("notifications")))
        .map_or(0.0, |n| n as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn median_measure(ms: &[Measure]) -> Measure {
    let m = |f: fn(&Measure) -> f64| median(ms.iter().map(f).collect());
    Measure {
        iops: m(|x| x.iops),
        mbps: m(|x| x.mbps),
        p50_us: m(|x| x.p50_us),
        p99_us: m(|x| x.p99_us),
        cpu_us_per_io: m(|x| x.cpu_us_per_io),
        notify_per_io: m(|x| x.notify_per_io),
    }
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` and waits for a stdout line containing `ready` (the rest of stdout is drained
/// on a thread).
fn start(mut cmd: Command, name: &'static str, ready: &str) -> Result<Proc> {
    let mut child = dies_with_bench(&mut cmd)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            step(
                format!("starting {name}"),
                format!("{e} (build it: cargo build --release --workspace)"),
            )
        })?;
    let out = child.stdout.take().ok_or_else(|| step(name, "no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let ready = ready.to_string();
    std::thread::spawn(move || {
        let mut said = false;
        for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
            if !said && line.contains(&ready) {
                let _ = tx.send(());
                said = true;
            }
        }
    });
    let proc_ = Proc(child);
    rx.recv_timeout(Duration::from_secs(30)).map_err(|e| {
        let why = match e {
            std::sync::mpsc::RecvTimeoutError::Timeout => "it did not become ready in 30 s",
            std::sync::mpsc::RecvTimeoutError::Disconnected => "it exited before it was ready",
        };
        step(format!("starting {name}"), why)
    })?;
    Ok(proc_)
}

fn progress(msg: &str) {
    eprintln!("[xenpv bench] {msg}");
}

/// One directory's results: per workload, the baseline and our medians.
#[derive(Debug, Clone)]
pub struct DirResult {
    /// The directory.
    pub dir: PathBuf,
    /// (workload, fio on the file, fio through blkfront→blkback, fio through qemu-nbd); the last
    /// two are zero when `nbd` is false.
    pub rows: Vec<(Workload, Measure, Measure, Measure)>,
    /// Whether the NBD paths were measured (not with `Options::direct_only`).
    pub nbd: bool,
    /// Per workload (same order as `rows`): the load generator on blkfront's API → blkback,
    /// no NBD.
    pub direct: Vec<Direct>,
    /// Whether the directory is a tmpfs (memory) rather than a disk's file system.
    pub tmpfs: bool,
    /// The engine of fio's baseline there ([`base_engine`]).
    pub base_engine: String,
}

/// The engine of fio's baseline in a directory: the engine blkback's I/O there amounts to, as
/// perf-baselines.md asks (engines differ 5x on tmpfs). On a disk, the bench's engine. On a
/// memory file system, psync whatever the bench's engine: blkback copies such a file inline
/// with `preadv`/`pwritev` (its io_uring engine too: io_uring would hand every op to a worker
/// thread, as it does fio's; on this machine fio's io_uring QD1 reads of a tmpfs file took
/// 47 µs at the median, against 1.4 µs with psync).
pub fn base_engine(tmpfs: bool, engine: &str) -> &str {
    if tmpfs {
        "psync"
    } else {
        engine
    }
}

/// One goal of reference/perf-baselines.md §3, as a run measured it.
#[derive(Debug, Clone)]
pub struct Goal {
    /// Its id (`R6` …).
    pub id: &'static str,
    /// What it measures, where, and its limit.
    pub what: String,
    /// The frontend's mode (`hybrid` or `poll`).
    pub mode: &'static str,
    /// The figure (median of the per-round figures) and its range over the rounds.
    pub value: Spread,
    /// Whether the median meets the limit.
    pub met: bool,
}

/// The goals R6–R9 and R14 from the no-NBD tables, for each frontend mode measured: R6 and R7
/// (4 KiB random reads at QD32, on a disk's file system and on tmpfs), R8 (QD1 added median
/// latency), R9 (1 MiB sequential reads at QD8), R14 (the worst backend CPU ratio of the 4 KiB
/// QD32 rows). A goal whose workloads were not run is left out.
pub fn goals(results: &[DirResult]) -> Vec<Goal> {
    let mut out = Vec::new();
    for r in results {
        let place = if r.tmpfs { "tmpfs" } else { "disk" };
        for mode in ["hybrid", "poll"] {
            // Each workload run, with this mode's figures against fio's.
            let runs: Vec<(&Workload, Paired)> = r
                .rows
                .iter()
                .zip(&r.direct)
                .filter_map(|((w, ..), d)| {
                    let p = if mode == "hybrid" {
                        Some(d.vs_base)
                    } else {
                        d.polled_vs_base
                    };
                    Some((w, p?))
                })
                .collect();
            let row = |name: &str| runs.iter().find(|(w, _)| w.name == name).map(|&(_, p)| p);
            let mut goal = |id, what: String, value: Spread, met: bool| {
                out.push(Goal {
                    id,
                    what,
                    mode,
                    value,
                    met,
                })
            };
            let (r6_r7, r9_limit) = if r.tmpfs {
                (("R7", 0.7), 0.7)
            } else {
                (("R6", 0.97), 0.95)
            };
            if let Some(p) = row("4k randread QD32") {
                let (id, limit) = r6_r7;
                goal(
                    id,
                    format!("4k randread QD32 IOPS / fio, {place}, >= {limit}"),
                    p.iops,
                    p.iops.median >= limit,
                );
            }
            if let Some(p) = row("4k randread QD1") {
                goal(
                    "R8",
                    format!("4k randread QD1 added p50, {place}, <= 1 us"),
                    p.added_p50_us,
                    p.added_p50_us.median <= 1.0,
                );
            }
            if let Some(p) = row("1M seqread QD8") {
                goal(
                    "R9",
                    format!("1M seqread QD8 IOPS / fio, {place}, >= {r9_limit}"),
                    p.iops,
                    p.iops.median >= r9_limit,
                );
            }
            let worst = runs
                .iter()
                .filter(|(w, _)| w.bs == 4096 && w.qd == 32)
                .max_by(|a, b| a.1.cpu.median.total_cmp(&b.1.cpu.median));
            if let Some((w, p)) = worst {
                goal(
                    "R14",
                    format!(
                        "backend CPU / fio's, worst 4k QD32 ({}), {place}, <= 1.3",
                        w.rw
                    ),
                    p.cpu,
                    p.cpu.median <= 1.3,
                );
            }
        }
    }
    out
}

/// What the no-NBD path measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Direct {
    /// IOPS, MB/s, latency, blkback's CPU and notifications per I/O.
    pub m: Measure,
    /// CPU of the load generator's process (blkfront's queue threads included) per I/O, µs.
    pub front_cpu_us_per_io: f64,
    /// The same run with the processes pinned (4 KiB random reads only; `None` for the other
    /// workloads and on a one-CPU machine).
    pub placed: Option<Placed>,
    /// The same run with the frontend in poll mode (`xenpv-blkfront --poll`: its queue thread
    /// polls the ring while I/O is in flight); `None` when not measured.
    pub polled: Option<Run>,
    /// The hybrid runs against fio's, round by round.
    pub vs_base: Paired,
    /// The poll-mode runs against fio's, round by round (`None` when not measured).
    pub polled_vs_base: Option<Paired>,
}

/// Ratios of a path to the baseline taken round by round, each run against fio's run of the
/// same round, and their medians: the disk's speed drifts between rounds (fio's own IOPS on
/// /tmp moved from 58k to 79k within minutes), and a pair measured in one round shares its
/// drift, where the ratio of two medians may take them from different rounds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Paired {
    /// IOPS / fio's IOPS.
    pub iops: Spread,
    /// blkback's CPU per I/O / fio's CPU per I/O (R14).
    pub cpu: Spread,
    /// Median latency minus fio's, µs (R8).
    pub added_p50_us: Spread,
}

/// The median of per-round figures, and their least and greatest.
#[derive(Debug, Clone, Copy, Default)]
pub struct Spread {
    /// Median.
    pub median: f64,
    /// Least.
    pub min: f64,
    /// Greatest.
    pub max: f64,
}

impl Spread {
    fn of(v: Vec<f64>) -> Spread {
        if v.is_empty() {
            return Spread::default();
        }
        Spread {
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            median: median(v),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"median": self.median, "min": self.min, "max": self.max})
    }
}

impl Paired {
    /// `runs[i]` against `base[i]`, for the rounds both measured.
    fn of(base: &[Measure], runs: &[Measure]) -> Paired {
        let each = |f: fn(&Measure, &Measure) -> f64| {
            Spread::of(base.iter().zip(runs).map(|(b, x)| f(x, b)).collect())
        };
        Paired {
            iops: each(|x, b| ratio(x.iops, b.iops)),
            cpu: each(|x, b| ratio(x.cpu_us_per_io, b.cpu_us_per_io)),
            added_p50_us: each(|x, b| x.p50_us - b.p50_us),
        }
    }
}

/// A measure of the no-NBD path (one run, or the median of a workload's rounds).
#[derive(Debug, Clone, Copy, Default)]
pub struct Run {
    /// IOPS, MB/s, latency, blkback's CPU and notifications per I/O.
    pub m: Measure,
    /// CPU of the load generator's process per I/O, µs (mostly polling in poll mode).
    pub front_cpu_us_per_io: f64,
}

impl Run {
    /// The medians of `runs`, each figure on its own.
    fn median(runs: &[Run]) -> Run {
        Run {
            m: median_measure(&runs.iter().map(|r| r.m).collect::<Vec<_>>()),
            front_cpu_us_per_io: median(runs.iter().map(|r| r.front_cpu_us_per_io).collect()),
        }
    }
}

/// The no-NBD path with the frontend and the backend pinned (reference/perf-baselines.md: always
/// report front and back on separate vCPUs and on one vCPU).
#[derive(Debug, Clone, Copy, Default)]
pub struct Placed {
    /// blkback on CPU 1, the load generator (blkfront) on CPU 0.
    pub apart: Measure,
    /// Both on CPU 0.
    pub one: Measure,
}

/// What each round of a workload measures, in the order of the first round.
#[derive(Debug, Clone, Copy)]
enum Contender {
    /// fio on the file.
    Base,
    /// fio through the frontend's NBD export and our drivers.
    Nbd,
    /// fio through qemu-nbd on the file.
    QemuNbd,
    /// The load generator, its frontend hybrid.
    Hybrid,
    /// The load generator, its frontend polling.
    Poll,
}

const CONTENDERS: [Contender; 5] = [
    Contender::Base,
    Contender::Nbd,
    Contender::QemuNbd,
    Contender::Hybrid,
    Contender::Poll,
];

/// Whether a workload also runs with the processes pinned: the 4 KiB random reads, whose
/// figures are bound by wake-ups (the larger and the write workloads are bound by the storage).
fn placed(w: &Workload) -> bool {
    w.rw == "randread" && w.bs == 4096
}

/// Pins every thread of process `pid` to `cpus` (taskset's list syntax, e.g. `0` or `0-1`).
fn pin(pid: u32, cpus: &str) -> Result<()> {
    let out = Command::new("taskset")
        .args(["--all-tasks", "--cpu-list", "--pid", cpus, &pid.to_string()])
        .output()
        .map_err(|e| {
            step(
                "running taskset",
                format!("{e} (install it: apt-get install -y util-linux)"),
            )
        })?;
    if !out.status.success() {
        return Err(step(
            format!("pinning process {pid} to CPU {cpus}"),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// `xenpv-blkfront --load`: workloads in on stdin, one JSON line out per workload.
struct LoadGen {
    // Dropped in this order: end of input first (the process closes the disk and exits), then
    // the process handle (SIGTERM, wait).
    stdin: std::process::ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    _proc: Proc,
}

impl LoadGen {
    fn start(mut cmd: Command) -> Result<LoadGen> {
        let mut child = dies_with_bench(&mut cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                step(
                    "starting xenpv-blkfront --load",
                    format!("{e} (build it: cargo build --release --workspace)"),
                )
            })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(step("xenpv-blkfront --load", "no stdin/stdout"));
        };
        let mut g = LoadGen {
            stdin,
            lines: BufReader::new(stdout).lines(),
            _proc: Proc(child),
        };
        // The ready line (the process connects the disk first; it fails rather than hangs).
        match g.lines.next() {
            Some(Ok(l)) if l.contains("ready") => Ok(g),
            other => Err(step(
                "starting xenpv-blkfront --load",
                format!("it did not become ready: {other:?}"),
            )),
        }
    }

    fn run(&mut self, line: &str) -> Result<serde_json::Value> {
        use std::io::Write;
        check_stop()?;
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .map_err(|e| step("xenpv-blkfront --load", e))?;
        let out = match self.lines.next() {
            Some(Ok(l)) => l,
            other => {
                return Err(step(
                    "xenpv-blkfront --load",
                    format!("no result: {other:?}"),
                ))
            }
        };
        let v: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| step("xenpv-blkfront --load output", e))?;
        if let Some(e) = v.get("error") {
            return Err(step("xenpv-blkfront --load", e));
        }
        Ok(v)
    }
}

/// Runs the disk benchmark.
pub fn run_disk(opts: &Options) -> Result<Outcome> {
    catch_signals()?;
    let me = std::env::current_exe().map_err(|e| step("locating xenpv", e))?;
    let bin_dir = opts
        .bin_dir
        .clone()
        .unwrap_or_else(|| me.parent().map(Path::to_path_buf).unwrap_or_default());
    let work = tempfile::Builder::new()
        .prefix("xenpv-bench")
        .tempdir()
        .map_err(|e| step("temporary directory", e))?;
    let root = work.path().join("state");
    progress(&format!(
        "starting the local platform in {}",
        root.display()
    ));
    let local = |huge: bool| {
        let mut c = Command::new(&me);
        c.args(["--state-dir"]).arg(&root).arg("local");
        if huge {
            c.arg("--huge-pages");
        }
        start(c, "xenpv local", "XENSTORED_PATH")
    };
    // A guest's memory in 2 MiB pages, as Xen gives it: a 1 MiB request over consecutive frames
    // reaches the disk as a few segments (and so do fio's buffers: `fio_mem` below).
    let (_platform, huge_pages) = if opts.small_pages {
        (local(false)?, false)
    } else {
        match local(true) {
            Ok(p) => (p, true),
            Err(e) => {
                progress(&format!(
                    "guest memory in 4 KiB pages: 2 MiB ones need CAP_SYS_ADMIN (run as root) ({e})"
                ));
                (local(false)?, false)
            }
        }
    };
    // fio's buffers (the baseline's) in the same kind of memory as the guest's: with 2 MiB
    // pages, a 1 MiB read is one request to the disk for both sides, not one for ours and two
    // for fio's scattered 4 KiB pages. fio maps the file by its /proc path
    // (`--mem=mmapshared:PATH`: MAP_SHARED, no truncation, the file kept).
    let fio_mem = if huge_pages {
        let fd = xenpv_grant::local::huge_page_file(fio_buffer_bytes(&WORKLOADS))
            .map_err(|e| step("fio's buffers in 2 MiB pages", e))?;
        let arg = format!(
            "--mem=mmapshared:/proc/{}/fd/{}",
            std::process::id(),
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        );
        Some((fd, arg))
    } else {
        None
    };
    let mut control =
        xenpv_local::control::Control::connect(&root).map_err(|e| step("local platform", e))?;
    let domid = control
        .create(None, Some("bench"))
        .map_err(|e| step("creating the guest domain", e))?;
    let xs = xenpv_xenstore::Client::connect_local(&root, 0).map_err(|e| step("xenstore", e))?;

    let status = work.path().join("blkback.status");
    let mut back = Command::new(bin_dir.join("xenpv-blkback"));
    back.args(["--platform", "local", "--state-dir"])
        .arg(&root)
        .arg("--status-file")
        .arg(&status);
    back.args(["--engine", &opts.engine]);
    // The baseline reads a disk-backed file with O_DIRECT: so does blkback (the toolstack marks
    // those disks direct-io-safe; tmpfs files are not marked and stay buffered).
    back.arg("--direct-io");
    if let Some(us) = opts.back_spin_us {
        back.args(["--spin-us", &us.to_string()]);
    }
    let blkback = {
        let child = dies_with_bench(&mut back)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                step(
                    "starting xenpv-blkback",
                    format!("{e} (build it: cargo build --release --workspace)"),
                )
            })?;
        Proc(child)
    };

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let all_cpus = format!("0-{}", cpus.saturating_sub(1));
    let mut results = Vec::new();
    for (i, dir) in opts.dirs.iter().enumerate() {
        let file = dir.join(format!("xenpv-bench-{}.img", std::process::id()));
        progress(&format!(
            "writing a {} MiB test file {}",
            opts.size_mib,
            file.display()
        ));
        let _cleanup = Cleanup(file.clone());
        fill(&file, opts.size_mib)?;
        check_stop()?;
        let tmpfs = is_tmpfs(dir);
        let vdev = format!("xvd{}", (b'a' + 2 * i as u8) as char);
        let direct_vdev = format!("xvd{}", (b'b' + 2 * i as u8) as char);
        let spec = format!(
            "vdev={vdev},access=rw{},target={}",
            if tmpfs { "" } else { ",direct-io-safe" },
            file.display()
        );
        let nodes = crate::toolstack::attach_disk(&xs, domid, &spec)
            .map_err(|e| step("attaching the disk", e))?;
        let direct_spec = spec.replace(&format!("vdev={vdev}"), &format!("vdev={direct_vdev}"));
        let direct_nodes = crate::toolstack::attach_disk(&xs, domid, &direct_spec)
            .map_err(|e| step("attaching the second disk (no-NBD path)", e))?;
        let sock = work.path().join(format!("{vdev}.nbd"));
        // xenpv-blkfront on one of the disks, with `tail` (its mode) after the common flags.
        let blkfront_cmd = |device: &str, tail: &[&std::ffi::OsStr]| {
            let mut c = Command::new(bin_dir.join("xenpv-blkfront"));
            c.args(["--platform", "local", "--state-dir"])
                .arg(&root)
                .args(["--domid", &domid.to_string(), "--device", device])
                .args(tail);
            if let Some(us) = opts.front_spin_us {
                c.args(["--spin-us", &us.to_string()]);
            }
            c
        };
        let front = blkfront_cmd(&vdev, &["--nbd-socket".as_ref(), sock.as_os_str()]);
        progress(&format!(
            "connecting blkfront to {vdev} ({})",
            if tmpfs { "tmpfs" } else { "disk" }
        ));
        let blkfront = if opts.direct_only {
            None
        } else {
            Some(start(front, "xenpv-blkfront", "ready")?)
        };
        let gen_cmd = blkfront_cmd(&direct_vdev, &["--load".as_ref()]);
        let mut loadgen = LoadGen::start(gen_cmd)?;
        // A second baseline with the same NBD hop as ours: qemu-nbd serving the same file, so
        // that the cost of our drivers can be told apart from the cost of NBD itself.
        let qsock = work.path().join(format!("{vdev}.qemu-nbd"));
        let _qemu_nbd = if opts.direct_only {
            None
        } else {
            Some(start_qemu_nbd(&file, &qsock, tmpfs, &opts.engine)?)
        };
        let direct = if tmpfs { "--direct=0" } else { "--direct=1" };
        let fio_engine = base_engine(tmpfs, &opts.engine);
        let mut rows = Vec::new();
        let mut directs = Vec::new();
        // blkback's CPU seconds and a device's notifications, before and after a run
        // (after one status-file period, so that the file has caught up)
        let snapshot = |device: &str| (cpu_seconds(blkback.0.id()), notifications(&status, device));
        let since = |before: (f64, f64), device: &str| {
            std::thread::sleep(Duration::from_millis(1100));
            let now = snapshot(device);
            (now.0 - before.0, now.1 - before.1)
        };
        let selected = WORKLOADS.iter().filter(|w| {
            opts.only
                .as_ref()
                .map_or(true, |o| w.name.contains(o.as_str()))
        });
        for &w in selected {
            let (mut base, mut ours, mut nbd) = (Vec::new(), Vec::new(), Vec::new());
            let (mut nonbd, mut polls): (Vec<Run>, Vec<Run>) = (Vec::new(), Vec::new());
            let (mut apart, mut one) = (Vec::new(), Vec::new());
            for round in 0..opts.rounds {
                progress(&format!(
                    "{}: {} round {}/{}",
                    dir.display(),
                    w.name,
                    round + 1,
                    opts.rounds
                ));
                // The driver pair without NBD: the load generator on the second disk.
                // `mode`: the frontend's, for this run (`hybrid` or `poll`).
                let run_direct = |loadgen: &mut LoadGen, mode: &str| -> Result<Run> {
                    let before = snapshot(&direct_nodes.backend_path);
                    let v = loadgen.run(&format!(
                        "{} {} {} {RAMP_S} {} {mode}",
                        w.rw, w.bs, w.qd, opts.runtime
                    ))?;
                    let (cpu, ntf) = since(before, &direct_nodes.backend_path);
                    let num = |k: &str| v.get(k).and_then(|x| x.as_f64()).unwrap_or(0.0);
                    let all = num("all_ios");
                    if all < 1.0 {
                        return Err(step("xenpv-blkfront --load", "it completed no I/O"));
                    }
                    Ok(Run {
                        m: Measure {
                            iops: num("iops"),
                            mbps: num("mbps"),
                            p50_us: num("p50_us"),
                            p99_us: num("p99_us"),
                            cpu_us_per_io: cpu / all * 1e6,
                            notify_per_io: ntf / all,
                        },
                        front_cpu_us_per_io: num("cpu_us_per_io"),
                    })
                };
                // fio through an NBD export on `socket`.
                let nbd_args = |socket: &Path| {
                    let mut a = common_args(&w, opts.size_mib, opts.runtime);
                    a.push("--ioengine=nbd".into());
                    a.push(format!("--uri=nbd+unix:///?socket={}", socket.display()));
                    a
                };
                // Each contender in turn, the order rotated by one every round, so that a disk
                // whose speed drifts within a round (the /tmp disk's swings) favours none.
                for k in 0..CONTENDERS.len() {
                    match CONTENDERS[(k + round) % CONTENDERS.len()] {
                        Contender::Base => {
                            let mut a = common_args(&w, opts.size_mib, opts.runtime);
                            a.push(format!("--filename={}", file.display()));
                            a.push(format!("--ioengine={fio_engine}"));
                            a.push(direct.into());
                            if let Some((_, mem)) = &fio_mem {
                                a.push(mem.clone());
                            }
                            base.push(fio(&a)?);
                        }
                        Contender::Nbd if opts.direct_only => {}
                        Contender::Nbd => {
                            let before = snapshot(&nodes.backend_path);
                            let mut m = fio(&nbd_args(&sock))?;
                            let (cpu, ntf) = since(before, &nodes.backend_path);
                            // blkback's CPU is measured over fio's ramp (1 s) too: count its
                            // I/Os as well.
                            let ios = (m.iops * (opts.runtime + RAMP_S) as f64).max(1.0);
                            m.cpu_us_per_io = cpu / ios * 1e6;
                            m.notify_per_io = ntf / ios;
                            ours.push(m);
                        }
                        Contender::QemuNbd if opts.direct_only => {}
                        Contender::QemuNbd => nbd.push(fio(&nbd_args(&qsock))?),
                        Contender::Hybrid => nonbd.push(run_direct(&mut loadgen, "hybrid")?),
                        Contender::Poll => polls.push(run_direct(&mut loadgen, "poll")?),
                    }
                }
                if cpus >= 2 && placed(&w) && !opts.direct_only {
                    let (back_pid, gen_pid) = (blkback.0.id(), loadgen._proc.0.id());
                    pin(back_pid, "1")?;
                    pin(gen_pid, "0")?;
                    apart.push(run_direct(&mut loadgen, "hybrid")?.m);
                    pin(back_pid, "0")?;
                    one.push(run_direct(&mut loadgen, "hybrid")?.m);
                    pin(back_pid, &all_cpus)?;
                    pin(gen_pid, &all_cpus)?;
                }
            }
            rows.push((
                w,
                median_measure(&base),
                median_measure(&ours),
                median_measure(&nbd),
            ));
            let hybrid = Run::median(&nonbd);
            let measures = |runs: &[Run]| runs.iter().map(|r| r.m).collect::<Vec<_>>();
            directs.push(Direct {
                m: hybrid.m,
                front_cpu_us_per_io: hybrid.front_cpu_us_per_io,
                vs_base: Paired::of(&base, &measures(&nonbd)),
                polled_vs_base: (!polls.is_empty()).then(|| Paired::of(&base, &measures(&polls))),
                placed: (!apart.is_empty()).then(|| Placed {
                    apart: median_measure(&apart),
                    one: median_measure(&one),
                }),
                polled: (!polls.is_empty()).then(|| Run::median(&polls)),
            });
        }
        drop(loadgen);
        drop(blkfront);
        let _ = crate::toolstack::detach(&xs, domid, &direct_vdev, Duration::from_secs(10), true);
        let _ = crate::toolstack::detach(&xs, domid, &vdev, Duration::from_secs(10), true);
        results.push(DirResult {
            dir: dir.clone(),
            rows,
            nbd: !opts.direct_only,
            direct: directs,
            tmpfs,
            base_engine: fio_engine.to_string(),
        });
    }
    drop(blkback);
    let _ = control.destroy(domid);
    Ok(Outcome {
        dirs: results,
        huge_pages,
    })
}

/// qemu-nbd serving `file` on `sock` (as many clients as fio opens), with the same engine and
/// cache mode as the baseline.
fn start_qemu_nbd(file: &Path, sock: &Path, tmpfs: bool, engine: &str) -> Result<Proc> {
    let aio = if engine == "io_uring" {
        "io_uring"
    } else {
        "threads"
    };
    let child = dies_with_bench(&mut Command::new("qemu-nbd"))
        .args(["--persistent", "--shared=0", "-f", "raw", "--aio", aio])
        .arg(if tmpfs {
            "--cache=writeback"
        } else {
            "--cache=none"
        })
        .arg("--socket")
        .arg(sock)
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            step(
                "starting qemu-nbd",
                format!("{e} (install it: apt-get install -y qemu-utils)"),
            )
        })?;
    let p = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if Instant::now() > deadline {
            return Err(step(
                "starting qemu-nbd",
                "its socket did not appear in 10 s",
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(p)
}

struct Cleanup(PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn is_tmpfs(dir: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return false;
    };
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut best: Option<(usize, bool)> = None;
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 3 || !dir.starts_with(f[1]) {
            continue;
        }
        if best.map_or(true, |(len, _)| f[1].len() >= len) {
            best = Some((f[1].len(), f[2] == "tmpfs"));
        }
    }
    best.is_some_and(|(_, t)| t)
}

fn fill(file: &Path, size_mib: u64) -> Result<()> {
    use std::io::Write;
    let mut f =
        std::fs::File::create(file).map_err(|e| step(format!("creating {}", file.display()), e))?;
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..size_mib {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        f.write_all(&block)
            .map_err(|e| step(format!("writing {}", file.display()), e))?;
    }
    f.sync_all()
        .map_err(|e| step(format!("syncing {}", file.display()), e))
}

/// `x / y`, or 0 when there is no `y` to divide by (a path not measured).
fn ratio(x: f64, y: f64) -> f64 {
    if y > 0.0 {
        x / y
    } else {
        0.0
    }
}

/// One table of the no-NBD path: per workload its name, the baseline, the measure, the IOPS
/// of the path compared in the second ratio, the load generator's CPU per I/O, and the path
/// against the baseline round by round (the first ratio, its range over the rounds, `+p50`
/// and `cpu/b` are those). `names`: the measure's column prefix and the two ratios' headings.
fn direct_table(
    title: &str,
    names: [&str; 3],
    rows: &[(&str, &Measure, Measure, f64, f64, Paired)],
) {
    let [m, r1, r2] = names;
    println!();
    println!("{title}");
    println!(
        "{:<18} {:>9} {:>9} {:>6} {:>9} {:>6} {:>9} {:>9} {:>8} {:>9} {:>9} {:>8} {:>6} {:>7} {:>7}",
        "workload",
        "base IOPS",
        format!("{m} IOPS"),
        r1,
        "rounds",
        r2,
        format!("{m} MB/s"),
        "base p50",
        format!("{m} p50"),
        "+p50",
        format!("{m} p99"),
        "cpu/io",
        "cpu/b",
        "fcpu/io",
        "ntf/io"
    );
    for (name, b, x, other, fcpu, paired) in rows {
        println!(
            "{:<18} {:>9.0} {:>9.0} {:>6.2} {:>9} {:>6.2} {:>9.1} {:>8.1}u {:>7.1}u {:>8.1}u {:>8.1}u {:>7.2}u {:>6.2} {:>6.2}u {:>7.3}",
            name,
            b.iops,
            x.iops,
            paired.iops.median,
            format!("{:.2}-{:.2}", paired.iops.min, paired.iops.max),
            ratio(x.iops, *other),
            x.mbps,
            b.p50_us,
            x.p50_us,
            paired.added_p50_us.median,
            x.p99_us,
            x.cpu_us_per_io,
            paired.cpu.median,
            fcpu,
            x.notify_per_io
        );
    }
}

/// What a table's header says of fio's baseline engine where it is not the bench's own.
fn base_note(r: &DirResult, engine: &str) -> String {
    if r.base_engine == engine {
        String::new()
    } else {
        format!(
            ", engine {}: a file in memory, which blkback copies inline whatever its engine",
            r.base_engine
        )
    }
}

/// Prints the results as a table with the ratios against the goals of perf-baselines.md.
pub fn print(results: &[DirResult], engine: &str) {
    for r in results {
        if r.nbd {
            println!();
            println!(
                "{} (engine {engine}; base = fio on the file{}; ours = fio nbd -> xenpv-blkfront -> xenpv-blkback -> file; qnbd = fio nbd -> qemu-nbd -> file)",
                r.dir.display(),
                base_note(r, engine)
            );
            println!(
                "{:<18} {:>9} {:>9} {:>9} {:>6} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>6} {:>7}",
                "workload",
                "base IOPS",
                "ours IOPS",
                "qnbd IOPS",
                "o/base",
                "o/qnbd",
                "base MB/s",
                "ours MB/s",
                "base p50",
                "ours p50",
                "ours p99",
                "cpu/io",
                "cpu/b",
                "ntf/io"
            );
            for (w, b, o, q) in &r.rows {
                println!(
                    "{:<18} {:>9.0} {:>9.0} {:>9.0} {:>6.2} {:>7.2} {:>9.1} {:>9.1} {:>8.1}u {:>8.1}u {:>8.1}u {:>7.2}u {:>6.2} {:>7.3}",
                    w.name,
                    b.iops,
                    o.iops,
                    q.iops,
                    ratio(o.iops, b.iops),
                    ratio(o.iops, q.iops),
                    b.mbps,
                    o.mbps,
                    b.p50_us,
                    o.p50_us,
                    o.p99_us,
                    o.cpu_us_per_io,
                    ratio(o.cpu_us_per_io, b.cpu_us_per_io),
                    o.notify_per_io
                );
            }
        }
        let rows: Vec<_> = r
            .rows
            .iter()
            .zip(&r.direct)
            .map(|((w, b, o, _), d)| (w.name, b, d.m, o.iops, d.front_cpu_us_per_io, d.vs_base))
            .collect();
        direct_table(
            &format!(
                "{} direct, no NBD (dir = xenpv-blkfront --load -> xenpv-blkback -> file, a second disk on the same file; reads in place, not copied out; base = fio on the file{})",
                r.dir.display(),
                base_note(r, engine)
            ),
            ["dir", "d/base", "d/ours"],
            &rows,
        );
        let polled: Vec<_> = r
            .rows
            .iter()
            .zip(&r.direct)
            .filter_map(|((w, b, ..), d)| {
                let (p, paired) = (d.polled?, d.polled_vs_base?);
                Some((w.name, b, p.m, d.m.iops, p.front_cpu_us_per_io, paired))
            })
            .collect();
        if !polled.is_empty() {
            direct_table(
                &format!(
                    "{} direct, no NBD, polling frontend (poll = the same with xenpv-blkfront --poll: it polls the ring while I/O is in flight, as fio's hipri; its CPU is busy meanwhile)",
                    r.dir.display()
                ),
                ["poll", "p/base", "p/dir"],
                &polled,
            );
        }
        if r.direct.iter().any(|d| d.placed.is_some()) {
            println!();
            println!(
                "{} direct, placement (any = as the scheduler places them, the rows above; apart = blkback on CPU 1, blkfront on CPU 0; one = both on CPU 0)",
                r.dir.display()
            );
            println!(
                "{:<18} {:>9} {:>10} {:>9} {:>8} {:>9} {:>8} {:>9} {:>10} {:>9}",
                "workload",
                "any IOPS",
                "apart IOPS",
                "one IOPS",
                "any p50",
                "apart p50",
                "one p50",
                "any cpu/io",
                "apart cpu/io",
                "one cpu/io"
            );
            for ((w, ..), d) in r.rows.iter().zip(&r.direct) {
                let Some(p) = &d.placed else { continue };
                println!(
                    "{:<18} {:>9.0} {:>10.0} {:>9.0} {:>7.1}u {:>8.1}u {:>7.1}u {:>9.2}u {:>11.2}u {:>9.2}u",
                    w.name,
                    d.m.iops,
                    p.apart.iops,
                    p.one.iops,
                    d.m.p50_us,
                    p.apart.p50_us,
                    p.one.p50_us,
                    d.m.cpu_us_per_io,
                    p.apart.cpu_us_per_io,
                    p.one.cpu_us_per_io
                );
            }
        }
    }
    println!(
        "\ncpu/io: xenpv-blkback CPU per I/O; cpu/b: that / fio's CPU per I/O in the baseline (its job thread and io_uring's workers for it; R14);\nntf/io: blkback's notifications to the frontend per I/O; latencies in microseconds,\nfrom submission to completion (fio's lat, not clat, which leaves out io_uring's submission).\nd/base (R6, R7, R9), d/ours: the no-NBD path's IOPS / fio on the file, / fio through NBD and our drivers;\nd/base, +p50 and cpu/b of the no-NBD tables are medians of per-round figures, each run against fio's run of the same round\n(rounds: the least and greatest per-round d/base or p/base); the IOPS, latency and CPU columns are medians of the runs;\n+p50 (R8): its median latency minus fio's; fcpu/io: the load generator's process (blkfront included) CPU per I/O;\np/base, p/dir: the no-NBD path with a polling frontend, IOPS / fio on the file, / the same path with a hybrid one."
    );
}

/// Prints the goals of [`goals`], each with its range over the rounds and whether it is met.
pub fn print_goals(results: &[DirResult]) {
    let goals = goals(results);
    if !goals.is_empty() {
        println!("\ngoals (reference/perf-baselines.md; the median of the rounds, their range in brackets):");
        for g in &goals {
            println!(
                // Three decimals: with two, a median of 0.967 against ">= 0.97" would print as
                // "0.97 NOT MET".
                "  {:<4} {:<6} {:<58} {:>7.3} [{:.3} .. {:.3}]  {}",
                g.id,
                g.mode,
                g.what,
                g.value.median,
                g.value.min,
                g.value.max,
                if g.met { "met" } else { "NOT MET" }
            );
        }
    }
}

/// The results as JSON.
pub fn to_json(results: &[DirResult], engine: &str) -> serde_json::Value {
    let m = |x: &Measure| {
        serde_json::json!({
            "iops": x.iops, "mbps": x.mbps, "p50_us": x.p50_us, "p99_us": x.p99_us,
            "cpu_us_per_io": x.cpu_us_per_io, "notify_per_io": x.notify_per_io,
        })
    };
    // The per-round ratios' medians (the figures above) and ranges.
    let paired = |p: &Paired| {
        serde_json::json!({
            "iops_ratio": p.iops.json(), "added_p50_us": p.added_p50_us.json(),
            "backend_cpu_ratio": p.cpu.json(),
        })
    };
    serde_json::json!({
        "engine": engine,
        "goals": goals(results).iter().map(|g| serde_json::json!({
            "id": g.id, "what": g.what, "frontend": g.mode, "value": g.value.json(), "met": g.met,
        })).collect::<Vec<_>>(),
        "dirs": results.iter().map(|r| serde_json::json!({
            "dir": r.dir.display().to_string(),
            "baseline_engine": r.base_engine,
            "workloads": r.rows.iter().zip(r.direct.iter().map(Some).chain(std::iter::repeat(None))).map(|((w, b, o, q), d)| serde_json::json!({
                "name": w.name, "rw": w.rw, "bs": w.bs, "iodepth": w.qd,
                "baseline": m(b),
                "ours": r.nbd.then(|| m(o)), "qemu_nbd": r.nbd.then(|| m(q)),
                "iops_ratio": r.nbd.then(|| ratio(o.iops, b.iops)),
                "iops_ratio_vs_qemu_nbd": r.nbd.then(|| ratio(o.iops, q.iops)),
                "backend_cpu_ratio": r.nbd.then(|| ratio(o.cpu_us_per_io, b.cpu_us_per_io)),
                "direct": d.map(|d| serde_json::json!({
                    "measure": m(&d.m),
                    "front_cpu_us_per_io": d.front_cpu_us_per_io,
                    "iops_ratio": d.vs_base.iops.median,
                    "added_p50_us": d.vs_base.added_p50_us.median,
                    "backend_cpu_ratio": d.vs_base.cpu.median,
                    "per_round": paired(&d.vs_base),
                    "placement": d.placed.map(|p| serde_json::json!({
                        "apart": m(&p.apart),
                        "one_cpu": m(&p.one),
                    })),
                    "polling_frontend": d.polled.zip(d.polled_vs_base).map(|(p, v)| serde_json::json!({
                        "measure": m(&p.m),
                        "front_cpu_us_per_io": p.front_cpu_us_per_io,
                        "iops_ratio": v.iops.median,
                        "added_p50_us": v.added_p50_us.median,
                        "backend_cpu_ratio": v.cpu.median,
                        "per_round": paired(&v),
                    })),
                })),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_are_read_from_the_no_nbd_rows_of_each_mode() {
        let spread = |median| Spread {
            median,
            min: median - 0.1,
            max: median + 0.1,
        };
        let paired = |iops, cpu, p50| Paired {
            iops: spread(iops),
            cpu: spread(cpu),
            added_p50_us: spread(p50),
        };
        // Per workload of WORKLOADS (QD1, QD32 read, QD32 write, 1M): hybrid, then poll.
        let figures = [
            (paired(1.1, 1.9, -8.0), paired(1.1, 1.8, -7.0)),
            (paired(0.90, 1.2, 50.0), paired(0.98, 1.0, 20.0)),
            (paired(0.95, 1.35, 60.0), paired(0.97, 1.1, 20.0)),
            (paired(0.96, 11.0, 200.0), paired(0.94, 9.0, 250.0)),
        ];
        let result = |tmpfs| DirResult {
            dir: PathBuf::from(if tmpfs { "/dev/shm" } else { "/tmp" }),
            rows: WORKLOADS
                .iter()
                .map(|w| {
                    (
                        *w,
                        Measure::default(),
                        Measure::default(),
                        Measure::default(),
                    )
                })
                .collect(),
            nbd: false,
            direct: figures
                .iter()
                .map(|&(h, p)| Direct {
                    vs_base: h,
                    polled_vs_base: Some(p),
                    ..Direct::default()
                })
                .collect(),
            tmpfs,
            base_engine: base_engine(tmpfs, "io_uring").into(),
        };
        let g = goals(&[result(false), result(true)]);
        let find = |id: &str, mode: &str, place: &str| {
            g.iter()
                .find(|g| g.id == id && g.mode == mode && g.what.contains(place))
                .unwrap_or_else(|| panic!("no {id} {mode} {place} in {g:?}"))
        };
        let r6 = find("R6", "hybrid", "disk");
        assert!(!r6.met && r6.value.median == 0.90 && r6.value.min == 0.90 - 0.1);
        assert!(find("R6", "poll", "disk").met);
        assert!(find("R7", "hybrid", "tmpfs").met);
        assert!(find("R8", "hybrid", "disk").met);
        let r9 = find("R9", "hybrid", "disk");
        assert!(r9.met && r9.value.median == 0.96);
        assert!(!find("R9", "poll", "disk").met);
        assert!(find("R9", "poll", "tmpfs").met);
        // R14 takes the worst 4 KiB QD32 row: randwrite's 1.35 for hybrid, randread's 1.0
        // against randwrite's 1.1 for poll; the 1 MiB and QD1 rows do not count.
        let r14 = find("R14", "hybrid", "disk");
        assert!(!r14.met && r14.value.median == 1.35 && r14.what.contains("randwrite"));
        let r14 = find("R14", "poll", "disk");
        assert!(r14.met && r14.value.median == 1.1);
        assert_eq!(g.len(), 2 * 2 * 4);
        // Without the polling frontend's runs, only the hybrid goals.
        let mut r = result(false);
        r.direct.iter_mut().for_each(|d| d.polled_vs_base = None);
        assert!(goals(&[r]).iter().all(|g| g.mode == "hybrid"));
    }

    #[test]
    fn ratios_are_taken_round_by_round() {
        let m = |iops: f64, cpu: f64, p50: f64| Measure {
            iops,
            cpu_us_per_io: cpu,
            p50_us: p50,
            ..Measure::default()
        };
        // The disk halves its speed in the second round; the path keeps 0.95 of fio in the
        // first two rounds and falls to 0.75 in the third. The ratio of the medians (60 / 80)
        // would take the third round's run against the first round's fio.
        let base = [m(100.0, 6.0, 40.0), m(50.0, 6.0, 80.0), m(80.0, 5.0, 50.0)];
        let runs = [m(95.0, 7.2, 45.0), m(47.5, 6.6, 90.0), m(60.0, 7.5, 52.0)];
        let p = Paired::of(&base, &runs);
        assert!((p.iops.median - 0.95).abs() < 1e-9, "{p:?}");
        assert!((p.iops.min - 0.75).abs() < 1e-9 && (p.iops.max - 0.95).abs() < 1e-9);
        assert!((p.cpu.median - 1.2).abs() < 1e-9, "{p:?}");
        assert!((p.cpu.max - 1.5).abs() < 1e-9);
        assert!((p.added_p50_us.median - 5.0).abs() < 1e-9);
        assert!((p.added_p50_us.min - 2.0).abs() < 1e-9);
        // A round one side did not measure (the bench stopped) pairs nothing.
        let p = Paired::of(&base[..1], &runs);
        assert!((p.iops.median - 0.95).abs() < 1e-9 && p.iops.min == p.iops.max);
        assert_eq!(Paired::of(&[], &runs).iops.median, 0.0);
    }

    #[test]
    fn latency_is_fios_total_and_falls_back_to_clat() {
        let side = serde_json::json!({
            "clat_ns": {"percentile": {"50.000000": 41_000}},
            "lat_ns": {"percentile": {"50.000000": 56_500}},
        });
        assert_eq!(latency(&side, "50.000000"), 56.5);
        let old = serde_json::json!({"clat_ns": {"percentile": {"50.000000": 41_000}}});
        assert_eq!(latency(&old, "50.000000"), 41.0);
        assert_eq!(latency(&old, "99.000000"), 0.0);
    }

    /// The 1 MiB QD8 workload needs 8 MiB of buffers, and fio aligns them within them.
    #[test]
    fn fio_buffers_hold_the_deepest_workload_in_whole_huge_pages() {
        assert_eq!(fio_buffer_bytes(&WORKLOADS), 10 << 20);
        assert_eq!(fio_buffer_bytes(&WORKLOADS[..1]), 4 << 20);
        assert_eq!(fio_buffer_bytes(&[]), 2 << 20);
    }

    /// utime and stime (fields 14 and 15, in ticks of 1/100 s) are found after a thread name
    /// that holds spaces and parentheses.
    #[test]
    fn cpu_seconds_are_read_after_the_thread_name() {
        let dir = tempfile::tempdir().unwrap();
        let stat = dir.path().join("stat");
        std::fs::write(
            &stat,
            "4242 (iou-wrk (x) 1) S 4240 4240 1 0 -1 4194368 0 0 0 0 250 125 0 0 20 0 1 0\n",
        )
        .unwrap();
        assert_eq!(stat_cpu_seconds(&stat), 3.75);
        assert_eq!(stat_cpu_seconds(&dir.path().join("gone")), 0.0);
    }
}
