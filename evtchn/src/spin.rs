//! Spin-then-block waiting: poll for fired ports for a bounded budget, then sleep on the fd.

use std::time::{Duration, Instant};

use crate::{EventChannel, Port, Result};

/// How long [`spin_then_wait`] polls before blocking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpinBudget {
    /// Never spin: block at once.
    None,
    /// Poll this many times.
    Iterations(u32),
    /// Poll until this much time has passed.
    Duration(Duration),
}

impl Default for SpinBudget {
    /// 50 µs: about twice the cost of a cross-core wake-up on our machines. Polling costs only
    /// idle CPU time: [`spin_until`] yields to any thread ready to run on the poller's CPU.
    fn default() -> Self {
        SpinBudget::Duration(Duration::from_micros(50))
    }
}

/// Polls `ready` within `budget` and returns whether it became true; `false` at once with
/// [`SpinBudget::None`]. Meant for hybrid polling of shared memory (a ring's producer index,
/// an io_uring completion queue): `ready` should read memory and make no system call, so that
/// a waiter that polls instead of sleeping on its event channel costs its peer nothing: with
/// the peer's event left unarmed while we poll, the peer does not even notify.
pub fn spin_until(budget: SpinBudget, mut ready: impl FnMut() -> bool) -> bool {
    match budget {
        SpinBudget::None => false,
        SpinBudget::Iterations(n) => {
            for _ in 0..n {
                if ready() {
                    return true;
                }
                std::hint::spin_loop();
            }
            false
        }
        SpinBudget::Duration(d) => {
            let start = Instant::now();
            loop {
                // Read the clock once per few polls: it costs more than a poll.
                for _ in 0..16 {
                    if ready() {
                        return true;
                    }
                    std::hint::spin_loop();
                }
                if start.elapsed() >= d {
                    return false;
                }
                // Let a thread that is ready to run on this CPU have it (the application, or
                // the peer when both share a CPU): polling then costs only idle time.
                std::thread::yield_now();
            }
        }
    }
}

/// How [`spin_then_wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// Ports were found while spinning.
    Spinning,
    /// Ports arrived while blocked on the fd.
    Blocked,
    /// Nothing fired before the timeout.
    TimedOut,
}

/// Polls `ch` for fired ports (non-blocking) within `budget`, then blocks for at most `timeout`
/// (`None`: forever; the spin time counts against it). Fired ports are appended to `out`.
pub fn spin_then_wait<E: EventChannel + ?Sized>(
    ch: &E,
    out: &mut Vec<Port>,
    budget: SpinBudget,
    timeout: Option<Duration>,
) -> Result<Woken> {
    let start = Instant::now();
    match budget {
        SpinBudget::None => {}
        SpinBudget::Iterations(n) => {
            for _ in 0..n {
                if ch.pending(out)? > 0 {
                    return Ok(Woken::Spinning);
                }
                std::hint::spin_loop();
            }
        }
        SpinBudget::Duration(d) => loop {
            if ch.pending(out)? > 0 {
                return Ok(Woken::Spinning);
            }
            if start.elapsed() >= d {
                break;
            }
            std::hint::spin_loop();
        },
    }
    let left = timeout.map(|t| t.saturating_sub(start.elapsed()));
    if ch.wait(out, left)? > 0 {
        Ok(Woken::Blocked)
    } else {
        Ok(Woken::TimedOut)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

    #[test]
    fn no_budget_never_polls() {
        let mut polls = 0;
        assert!(!spin_until(SpinBudget::None, || {
            polls += 1;
            true
        }));
        assert_eq!(polls, 0);
    }

    #[test]
    fn iterations_poll_that_many_times() {
        let mut polls = 0;
        assert!(!spin_until(SpinBudget::Iterations(7), || {
            polls += 1;
            false
        }));
        assert_eq!(polls, 7);
        let mut polls = 0;
        assert!(spin_until(SpinBudget::Iterations(7), || {
            polls += 1;
            polls == 3
        }));
        assert_eq!(polls, 3);
    }

    #[test]
    fn duration_gives_up_after_the_budget() {
        let start = Instant::now();
        assert!(!spin_until(
            SpinBudget::Duration(Duration::from_millis(5)),
            || false
        ));
        assert!(start.elapsed() >= Duration::from_millis(5));
    }

    #[test]
    fn duration_sees_a_store_from_another_thread() {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(2));
            f.store(true, Ordering::Release);
        });
        assert!(spin_until(
            SpinBudget::Duration(Duration::from_secs(10)),
            || flag.load(Ordering::Acquire)
        ));
        t.join().unwrap();
    }
}
