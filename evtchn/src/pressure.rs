//! Whether this machine's CPUs are oversubscribed: more threads ready to run than CPUs to run
//! them, on average over the last few milliseconds (the running count of `/proc/loadavg`, read
//! at most every millisecond). Polling pays only while it uses time a CPU would otherwise idle
//! away; when threads wait for CPUs, a poller takes their time (the client's, the peer's) to
//! save a wake-up.
//!
//! A poller's own CPU is not the only one that matters: a poller holding one CPU while the
//! threads with work queue up on the other is never preempted, yet slows them all. Hence a
//! machine-wide figure, and a count rather than the kernel's CPU pressure ("some" in
//! `/proc/pressure/cpu`): that one also rises when two threads that could run on two CPUs
//! share one for a moment while the other idles, which a poller that yields handles well.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How often the count is read while pollers ask.
const SAMPLE: Duration = Duration::from_millis(1);
/// The weight of a new reading in the average (1/8: about the last 8 readings).
const SHIFT: u32 = 3;
/// Fixed-point scale of the average.
const ONE: u64 = 256;

/// The average count of runnable threads, from successive readings, and the decision.
#[derive(Debug, Clone)]
pub(crate) struct Gauge {
    cpus: u64,
    /// Average runnable threads, times [`ONE`]; `None` before the first reading.
    avg: Option<u64>,
    next: Option<Instant>,
}

impl Gauge {
    pub(crate) const fn new(cpus: u64) -> Self {
        Self {
            cpus,
            avg: None,
            next: None,
        }
    }

    /// Whether a reading is due at `now`.
    pub(crate) fn due(&self, now: Instant) -> bool {
        self.next.map_or(true, |t| now >= t)
    }

    /// Takes a reading of the runnable threads at `now`; returns whether the CPUs are
    /// oversubscribed.
    ///
    /// Each reading weighs as much as the readings it stands for: one taken a [`SAMPLE`] after
    /// the last weighs 1/8, one taken after a gap (pollers asked nothing meanwhile) weighs one
    /// eighth per `SAMPLE` of the gap, up to the whole average after `8 * SAMPLE`. Old
    /// readings so fade with time, not with the number of readings: a sparse asker (a poller
    /// whose waits are long) is not held to a count taken long ago.
    pub(crate) fn sample(&mut self, now: Instant, runnable: u64) -> bool {
        let x = runnable.saturating_mul(ONE);
        let parts = 1u64 << SHIFT;
        let k = match self.next {
            // Readings' worth since the last one (which was `SAMPLE` before `next`).
            Some(next) => {
                let since = now.saturating_duration_since(next) + SAMPLE;
                let n = since.as_nanos() / SAMPLE.as_nanos().max(1);
                u64::try_from(n).unwrap_or(parts).clamp(1, parts)
            }
            None => parts,
        };
        self.avg = Some(match self.avg {
            None => x,
            Some(a) => {
                (a - (a >> SHIFT).saturating_mul(k)).saturating_add((x >> SHIFT).saturating_mul(k))
            }
        });
        self.next = Some(now + SAMPLE);
        self.contended()
    }

    /// Oversubscribed: on average at least half a thread more ready to run than CPUs. The
    /// thread asking counts (it runs). `xenpv bench` on 2 vCPUs, 0.5 s means: fio alone 2.0,
    /// both drivers polling without NBD 2.0 (on tmpfs; 1.0 on a disk), and also when both are
    /// pinned to one CPU; fio, the NBD export and both drivers 2.9-3.3 polling, 2.8-3.2 not.
    pub(crate) fn contended(&self) -> bool {
        self.avg
            .is_some_and(|a| a >= self.cpus.saturating_mul(ONE).saturating_add(ONE / 2))
    }
}

/// The running count ("4" of "0.52 0.58 0.59 4/1203 28454") from the text of `/proc/loadavg`.
pub(crate) fn parse_runnable(text: &str) -> Option<u64> {
    let field = text.split_whitespace().nth(3)?;
    field.split('/').next()?.parse().ok()
}

struct Sampler {
    /// `None`: the file cannot be read: never contended.
    file: Option<File>,
    gauge: Gauge,
}

static SAMPLER: Mutex<Option<Sampler>> = Mutex::new(None);
/// The last decision, read without the lock between readings.
static CONTENDED: AtomicBool = AtomicBool::new(false);
/// When the next reading is due, in ns since [`EPOCH`]: until then callers take the lock-free
/// path (every poll of every queue thread asks).
static DUE_NS: AtomicU64 = AtomicU64::new(0);
static EPOCH: OnceLock<Instant> = OnceLock::new();

#[cfg(test)]
thread_local! {
    /// Unit tests of pollers set the answer for their own thread, so that they do not depend
    /// on what else this machine runs meanwhile.
    pub(crate) static FORCE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

fn read_runnable(file: &File) -> Option<u64> {
    let mut buf = [0u8; 128];
    let n = file.read_at(&mut buf, 0).ok()?;
    parse_runnable(std::str::from_utf8(buf.get(..n)?).ok()?)
}

/// Whether more threads have lately been ready to run than this machine has CPUs (see the
/// module docs), so that polling should give way to sleeping. Cheap: two atomic loads and a
/// clock read; a read of `/proc/loadavg` (about a microsecond) every millisecond at most, by
/// one caller. If the file cannot be read, always `false`.
pub fn cpu_contended() -> bool {
    contended_at(Instant::now())
}

/// [`cpu_contended`] for a caller that has just read the clock.
pub(crate) fn contended_at(now: Instant) -> bool {
    #[cfg(test)]
    if let Some(forced) = FORCE.with(std::cell::Cell::get) {
        return forced;
    }
    let epoch = *EPOCH.get_or_init(Instant::now);
    let ns = |t: Instant| u64::try_from(t.saturating_duration_since(epoch).as_nanos()).ok();
    if ns(now).map_or(true, |n| n < DUE_NS.load(Ordering::Relaxed)) {
        return CONTENDED.load(Ordering::Relaxed);
    }
    let mut guard = match SAMPLER.try_lock() {
        Ok(g) => g,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => return CONTENDED.load(Ordering::Relaxed),
    };
    let s = guard.get_or_insert_with(|| Sampler {
        file: File::open("/proc/loadavg").ok(),
        gauge: Gauge::new(crate::sys::online_cpus().unwrap_or(1)),
    });
    if !s.gauge.due(now) {
        // Another caller took the reading since this one looked.
        return s.gauge.contended();
    }
    let reading = s.file.as_ref().and_then(read_runnable);
    let (contended, due) = match reading {
        Some(n) => (
            s.gauge.sample(now, n),
            s.gauge.next.and_then(ns).unwrap_or(u64::MAX),
        ),
        // No such file, or it stopped making sense: never contended, never asked again.
        None => {
            s.file = None;
            (false, u64::MAX)
        }
    };
    CONTENDED.store(contended, Ordering::Relaxed);
    DUE_NS.store(due, Ordering::Relaxed);
    contended
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_running_count() {
        assert_eq!(parse_runnable("0.52 0.58 0.59 4/1203 28454\n"), Some(4));
        assert_eq!(parse_runnable("1.18 1.52 1.51 1/80 28454"), Some(1));
        assert_eq!(parse_runnable("0.52 0.58 0.59"), None);
        assert_eq!(parse_runnable("0.52 0.58 0.59 x/3 1"), None);
        assert_eq!(parse_runnable(""), None);
    }

    #[test]
    fn contended_when_on_average_more_threads_are_runnable_than_cpus() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut g = Gauge::new(2);
        assert!(g.due(t0));
        assert!(!g.contended());
        // As many runnable threads as CPUs (two pollers, say): not contended.
        assert!(!g.sample(t0, 2));
        assert!(!g.due(t0 + ms(1) / 2));
        assert!(g.due(t0 + SAMPLE));
        let mut t = t0;
        for _ in 0..50 {
            t += SAMPLE;
            assert!(!g.sample(t, 2));
        }
        // Three or more, steadily: contended within a few readings, not at the first.
        t += SAMPLE;
        assert!(!g.sample(t, 3));
        let mut readings = 1;
        while !g.sample(t, 3) {
            t += SAMPLE;
            readings += 1;
            assert!(
                readings < 20,
                "not contended after {readings} readings of 3"
            );
        }
        assert!(readings > 2, "{readings}");
        for _ in 0..30 {
            t += SAMPLE;
            assert!(g.sample(t, 3));
        }
        // A moment of 2 does not end it; steadily 1 again does.
        assert!(g.sample(t + SAMPLE, 2));
        let mut readings = 0;
        while g.sample(t, 1) {
            readings += 1;
            assert!(readings < 40);
        }
        // After a gap, the new reading counts for the readings it stands for: 3 after 8 ms
        // without one is contention at once, 1 after as long ends it at once.
        t += ms(8);
        assert!(g.sample(t, 3));
        t += ms(20);
        assert!(!g.sample(t, 1));
        // Half a window's gap moves it half way: 1 and 3 in equal parts.
        t += SAMPLE;
        assert!(!g.sample(t, 1));
        t += ms(4);
        assert!(!g.sample(t, 3));
        t += ms(8);
        assert!(g.sample(t, 3));
        // Huge counts saturate rather than overflow.
        let mut g = Gauge::new(1);
        assert!(g.sample(t0, u64::MAX));
        assert!(g.sample(t0 + SAMPLE, u64::MAX));
        let mut g = Gauge::new(u64::MAX);
        assert!(!g.sample(t0, 2));
    }

    #[test]
    fn threads_waiting_for_cpus_show_as_contention() {
        // Twice as many busy threads as this machine has CPUs: at every moment some wait.
        let cpus = crate::sys::online_cpus().unwrap_or(1);
        let n = usize::try_from(cpus * 2).unwrap_or(4);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let busy: Vec<_> = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = false;
        while !seen && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
            seen = cpu_contended();
        }
        stop.store(true, Ordering::Relaxed);
        for t in busy {
            let _ = t.join();
        }
        assert!(
            seen,
            "{n} busy threads on {cpus} CPUs for 5 s, and no contention seen"
        );
    }
}
