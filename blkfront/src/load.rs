//! A closed-loop load generator over the asynchronous API: the driver pair measured with no
//! export (NBD) in between. `xenpv-blkfront --load` runs it for `xenpv bench disk`.
//!
//! `qd` operations are kept in flight: each completion (on a queue thread) records its latency
//! and submits the next operation at once, as fio does at a fixed iodepth. After `ramp`, the
//! counters restart; after `runtime` more, issuing stops and the generator waits for what is
//! still in flight.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use xenpv_evtchn::EventChannel;
use xenpv_grant::{GrantShare, SharedPages};

use crate::{BlkFront, Op};

/// Why a workload could not be run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The workload description is malformed.
    #[error("bad workload `{line}`: {why} (expected `RW BS QD RAMP_S RUNTIME_S [poll|hybrid]`, RW one of randread, randwrite, read, write)")]
    Parse {
        /// The description.
        line: String,
        /// What is wrong.
        why: &'static str,
    },
    /// The disk is smaller than one block of the workload.
    #[error("the disk ({size} bytes) is smaller than one {bs}-byte block")]
    TooSmall {
        /// Disk size.
        size: u64,
        /// Block size.
        bs: usize,
    },
    /// The in-flight operations did not complete after the run.
    #[error("{0} operations still in flight 30 s after the run")]
    Stuck(usize),
}

/// The access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Random block-aligned reads.
    RandRead,
    /// Random block-aligned writes.
    RandWrite,
    /// Sequential reads, wrapping at the end of the disk.
    Read,
    /// Sequential writes, wrapping at the end of the disk.
    Write,
}

/// One workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// The access pattern.
    pub pattern: Pattern,
    /// Bytes per operation (a multiple of the sector size).
    pub bs: usize,
    /// Operations kept in flight.
    pub qd: usize,
    /// Warm-up, not counted.
    pub ramp: Duration,
    /// Measured time.
    pub runtime: Duration,
    /// The device's polling mode for this run ([`BlkFront::set_polling`]; `poll` or `hybrid`
    /// after the other fields), restored afterwards; `None` leaves it as it is.
    pub poll: Option<bool>,
}

impl FromStr for Workload {
    type Err = Error;

    /// `RW BS QD RAMP_S RUNTIME_S [poll|hybrid]`, e.g. `randread 4096 32 1 5` (seconds may be
    /// fractional).
    fn from_str(line: &str) -> Result<Self, Error> {
        let bad = |why| Error::Parse {
            line: line.to_string(),
            why,
        };
        let f: Vec<&str> = line.split_whitespace().collect();
        let (rw, bs, qd, ramp, runtime, poll) = match f.as_slice() {
            [rw, bs, qd, ramp, runtime] => (rw, bs, qd, ramp, runtime, None),
            [rw, bs, qd, ramp, runtime, mode] => (rw, bs, qd, ramp, runtime, Some(*mode)),
            _ => return Err(bad("five or six fields expected")),
        };
        let poll = match poll {
            None => None,
            Some("poll") => Some(true),
            Some("hybrid") => Some(false),
            Some(_) => return Err(bad("the sixth field must be poll or hybrid")),
        };
        let pattern = match *rw {
            "randread" => Pattern::RandRead,
            "randwrite" => Pattern::RandWrite,
            "read" => Pattern::Read,
            "write" => Pattern::Write,
            _ => return Err(bad("unknown RW")),
        };
        let bs: usize = bs.parse().map_err(|_| bad("BS is not a number"))?;
        let qd: usize = qd.parse().map_err(|_| bad("QD is not a number"))?;
        if bs == 0 || bs % 512 != 0 || bs > 64 << 20 {
            return Err(bad("BS must be a multiple of 512, at most 64 MiB"));
        }
        if qd == 0 || qd > 4096 {
            return Err(bad("QD must be 1..=4096"));
        }
        let secs = |s: &str| {
            s.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && (0.0..=3600.0).contains(v))
                .map(Duration::from_secs_f64)
        };
        Ok(Workload {
            pattern,
            bs,
            qd,
            ramp: secs(ramp).ok_or_else(|| bad("RAMP_S must be 0..=3600 seconds"))?,
            runtime: secs(runtime).ok_or_else(|| bad("RUNTIME_S must be 0..=3600 seconds"))?,
            poll,
        })
    }
}

/// What a run measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Report {
    /// Operations completed successfully in the measured time.
    pub ios: u64,
    /// Operations completed successfully in the whole run, warm-up included (to divide CPU
    /// time measured around the whole run by).
    pub all_ios: u64,
    /// Operations that failed (in the whole run).
    pub errors: u64,
    /// Measured seconds.
    pub secs: f64,
    /// Operations per second.
    pub iops: f64,
    /// MB/s (10^6 bytes).
    pub mbps: f64,
    /// Median latency, submit to completion, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// CPU time of this whole process (queue threads included) per operation, µs.
    pub cpu_us_per_io: f64,
    /// Whether the device polled while requests were in flight ([`Options::poll`](crate::Options::poll)).
    pub polling: bool,
    /// Times a queue thread slept on its event channel with requests in flight, in the
    /// measured time ([`BlkFront::busy_sleeps`]), per operation.
    pub busy_sleeps_per_io: f64,
}

impl Report {
    /// One line of JSON.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"ios\":{},\"all_ios\":{},\"errors\":{},\"secs\":{:.6},\"iops\":{:.1},\"mbps\":{:.3},\"p50_us\":{:.3},\"p99_us\":{:.3},\"cpu_us_per_io\":{:.4},\"polling\":{},\"busy_sleeps_per_io\":{:.5}}}",
            self.ios,
            self.all_ios,
            self.errors,
            self.secs,
            self.iops,
            self.mbps,
            self.p50_us,
            self.p99_us,
            self.cpu_us_per_io,
            self.polling,
            self.busy_sleeps_per_io
        )
    }
}

struct State {
    /// Latencies (ns) of the operations completed while measuring.
    lat: Vec<u64>,
    /// Successful completions, warm-up and drain included.
    all: u64,
    errors: u64,
    measuring: bool,
    next_seq: u64,
    rng: u64,
    inflight: usize,
}

struct Ctx<G: GrantShare, E> {
    dev: Arc<BlkFront<G, E>>,
    w: Workload,
    blocks: u64,
    data: Vec<u8>,
    stop: AtomicBool,
    state: Mutex<State>,
    idle: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<G, E> Ctx<G, E>
where
    G: GrantShare + Send + Sync + 'static,
    G::Shared: SharedPages + Send + Sync + 'static,
    E: EventChannel + 'static,
{
    /// The next operation's block offset (bytes).
    fn next_offset(&self, st: &mut State) -> u64 {
        let block = match self.w.pattern {
            Pattern::RandRead | Pattern::RandWrite => {
                // xorshift64*
                st.rng ^= st.rng >> 12;
                st.rng ^= st.rng << 25;
                st.rng ^= st.rng >> 27;
                st.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % self.blocks
            }
            Pattern::Read | Pattern::Write => {
                let b = st.next_seq;
                st.next_seq = (b + 1) % self.blocks;
                b
            }
        };
        block * self.w.bs as u64
    }

    /// Submits one operation; its completion submits the next one unless stopping. Reads are
    /// read in place ([`BlkFront::submit_read_in_place`]) and not copied anywhere: as fio, whose
    /// buffers the device fills, the generator does not look at the data.
    fn issue(self: &Arc<Self>) {
        let offset = self.next_offset(&mut lock(&self.state));
        let me = self.clone();
        let start = Instant::now();
        let done: crate::Callback = Box::new(move |r| {
            let ns = start.elapsed().as_nanos() as u64;
            let again = {
                let mut st = lock(&me.state);
                match r {
                    Ok(_) => {
                        st.all += 1;
                        if st.measuring {
                            st.lat.push(ns);
                        }
                    }
                    Err(_) => st.errors += 1,
                }
                // A failing device stops the run (and no recursion through failing
                // submissions, which complete at once).
                let again = !me.stop.load(Ordering::SeqCst) && st.errors == 0;
                if !again {
                    st.inflight -= 1;
                    me.idle.notify_all();
                }
                again
            };
            if again {
                me.issue();
            }
        });
        match self.w.pattern {
            Pattern::RandRead | Pattern::Read => {
                self.dev
                    .submit_read_in_place(offset, self.w.bs, Box::new(|_, _| {}), done)
            }
            Pattern::RandWrite | Pattern::Write => self.dev.submit(
                Op::Write {
                    offset,
                    data: self.data.clone(),
                },
                done,
            ),
        }
    }
}

/// CPU seconds (user + system) this process has used, from `/proc/self/stat`.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

/// Runs `w` against `dev` and reports what the measured part did.
pub fn run<G, E>(dev: &Arc<BlkFront<G, E>>, w: &Workload) -> Result<Report, Error>
where
    G: GrantShare + Send + Sync + 'static,
    G::Shared: SharedPages + Send + Sync + 'static,
    E: EventChannel + 'static,
{
    let size = dev.size();
    let blocks = size / w.bs as u64;
    if blocks == 0 {
        return Err(Error::TooSmall { size, bs: w.bs });
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
        | 1;
    let data: Vec<u8> = (0..w.bs).map(|i| (i as u8) ^ 0xa5).collect();
    let mode_before = dev.polling();
    if let Some(p) = w.poll {
        dev.set_polling(p);
    }
    let ctx = Arc::new(Ctx {
        dev: dev.clone(),
        w: *w,
        blocks,
        data,
        stop: AtomicBool::new(false),
        state: Mutex::new(State {
            lat: Vec::new(),
            all: 0,
            errors: 0,
            measuring: w.ramp.is_zero(),
            next_seq: 0,
            rng: seed,
            inflight: w.qd,
        }),
        idle: Condvar::new(),
    });
    let mut t0 = Instant::now();
    let mut cpu0 = cpu_seconds();
    let mut sleeps0 = dev.busy_sleeps();
    for _ in 0..w.qd {
        ctx.issue();
    }
    if !w.ramp.is_zero() {
        std::thread::sleep(w.ramp);
        let mut st = lock(&ctx.state);
        st.lat.clear();
        st.measuring = true;
        t0 = Instant::now();
        cpu0 = cpu_seconds();
        sleeps0 = dev.busy_sleeps();
    }
    std::thread::sleep(w.runtime);
    let (mut lat, errors) = {
        let mut st = lock(&ctx.state);
        st.measuring = false;
        (std::mem::take(&mut st.lat), st.errors)
    };
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let sleeps = dev.busy_sleeps().saturating_sub(sleeps0);
    let polling = dev.polling();
    ctx.stop.store(true, Ordering::SeqCst);
    // The measured part is over: the device's own mode again, also for the drain.
    dev.set_polling(mode_before);
    let all_ios = {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut st = lock(&ctx.state);
        while st.inflight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Stuck(st.inflight));
            }
            st = ctx
                .idle
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.all
    };
    lat.sort_unstable();
    let ios = lat.len() as u64;
    let secs = secs.max(1e-9);
    Ok(Report {
        ios,
        all_ios,
        errors,
        secs,
        iops: ios as f64 / secs,
        mbps: (ios * w.bs as u64) as f64 / secs / 1e6,
        p50_us: percentile(&lat, 0.50),
        p99_us: percentile(&lat, 0.99),
        cpu_us_per_io: if ios > 0 { cpu / ios as f64 * 1e6 } else { 0.0 },
        polling,
        busy_sleeps_per_io: if ios > 0 {
            sleeps as f64 / ios as f64
        } else {
            0.0
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workloads() {
        let w: Workload = "randread 4096 32 1 5".parse().unwrap();
        assert_eq!(w.pattern, Pattern::RandRead);
        assert_eq!((w.bs, w.qd), (4096, 32));
        assert_eq!(w.ramp, Duration::from_secs(1));
        assert_eq!(w.runtime, Duration::from_secs(5));
        let w: Workload = "read 1048576 8 0 0.5".parse().unwrap();
        assert_eq!(w.pattern, Pattern::Read);
        assert_eq!(w.runtime, Duration::from_millis(500));
        assert_eq!(w.poll, None);
        let w: Workload = "randread 4096 32 1 5 poll".parse().unwrap();
        assert_eq!(w.poll, Some(true));
        let w: Workload = "randread 4096 32 1 5 hybrid".parse().unwrap();
        assert_eq!(w.poll, Some(false));
        for bad in [
            "",
            "randread 4096 32 1",
            "trim 4096 1 1 1",
            "read 1000 1 1 1",
            "read 4096 0 1 1",
            "read 4096 1 -1 1",
            "read 4096 1 1 nan",
            "read 4096 1 1 1 spin",
            "read 4096 1 1 1 poll x",
        ] {
            assert!(bad.parse::<Workload>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7000], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
