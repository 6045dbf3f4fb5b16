//! How a disk answers a closed loop of 4 KiB random reads, as fio's io_uring engine issues them
//! (wait for completions, then re-submit each with its own `io_uring_enter`): IOPS, how many
//! completions each wait returns, how long each re-submission takes by its place after a burst,
//! and the time from the last submission to the next burst. An optional pause at one place in
//! the refill shows what a relay's delay there costs. docs/bench-disk.md has what it found on
//! our machines.
//!
//! ```sh
//! fio --name=w --filename=/tmp/waves --size=1G --rw=write --bs=1M --direct=1   # a file on disk
//! cargo run --release -p xenpv-blkback --example disk-waves -- /tmp/waves 32 2
//! cargo run --release -p xenpv-blkback --example disk-waves -- /tmp/waves 32 2 1 60  # 60 µs after the 1st
//! ```

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

const BS: usize = 4096;

fn usage() -> ! {
    eprintln!(
        "usage: disk-waves FILE [QD (32)] [SECONDS (2)] [PAUSE_AFTER (after which re-submission, 0 = before the first)] [PAUSE_US]"
    );
    std::process::exit(2)
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    match args.get(i) {
        None => default,
        Some(s) => s.parse().unwrap_or_else(|_| {
            eprintln!("disk-waves: `{s}` is not a number");
            usage()
        }),
    }
}

fn p50(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else { usage() };
    let qd: usize = arg(&args, 1, 32);
    let secs: f64 = arg(&args, 2, 2.0);
    let pause_after: usize = arg(&args, 3, usize::MAX);
    let pause = Duration::from_micros(arg(&args, 4, 0));
    if qd == 0 || qd > 256 {
        eprintln!("disk-waves: QD must be 1..=256");
        usage()
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| {
            eprintln!("disk-waves: cannot open {path} with O_DIRECT: {e}");
            std::process::exit(1)
        });
    let blocks = file.metadata().map(|m| m.len()).unwrap_or(0) / BS as u64;
    if blocks == 0 {
        eprintln!("disk-waves: {path} is smaller than 4 KiB");
        std::process::exit(1)
    }
    let layout = Layout::from_size_align(qd * BS, BS).unwrap_or_else(|_| usage());
    // SAFETY: the layout's size is not zero (qd >= 1).
    let buf = unsafe { alloc_zeroed(layout) };
    if buf.is_null() {
        eprintln!("disk-waves: out of memory");
        std::process::exit(1)
    }
    let mut ring = IoUring::new(2 * qd as u32).unwrap_or_else(|e| {
        eprintln!("disk-waves: io_uring: {e}");
        std::process::exit(1)
    });
    let fd = types::Fd(file.as_raw_fd());
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut submit = |ring: &mut IoUring, slot: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // SAFETY: slot < qd, so the 4 KiB at slot * BS lie inside the allocation.
        let ptr = unsafe { buf.add(slot * BS) };
        let sqe = opcode::Read::new(fd, ptr, BS as u32)
            .offset((rng % blocks) * BS as u64)
            .build()
            .user_data(slot as u64);
        // SAFETY: the buffer lives until after the last completion is reaped (it is freed at
        // the end of main, after the drain below), and each slot has one read in flight.
        while unsafe { ring.submission().push(&sqe) }.is_err() {
            let _ = ring.submit();
        }
        let _ = ring.submit();
    };
    for slot in 0..qd {
        submit(&mut ring, slot);
    }
    let (mut done, mut waits) = (0u64, 0u64);
    let mut sizes = vec![0u64; qd + 1];
    let mut by_place: Vec<Vec<f64>> = vec![Vec::new(); qd];
    let mut after_last = Vec::new();
    let mut last_submit = Instant::now();
    let mut slots = Vec::with_capacity(qd);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        if let Err(e) = ring.submit_and_wait(1) {
            if e.raw_os_error() != Some(libc::EINTR) {
                eprintln!("disk-waves: io_uring_enter: {e}");
                std::process::exit(1)
            }
        }
        let burst = Instant::now();
        slots.clear();
        for c in ring.completion() {
            if c.result() < 0 {
                eprintln!(
                    "disk-waves: read failed: {}",
                    std::io::Error::from_raw_os_error(-c.result())
                );
                std::process::exit(1)
            }
            slots.push(c.user_data() as usize);
        }
        if slots.is_empty() {
            continue;
        }
        waits += 1;
        done += slots.len() as u64;
        sizes[slots.len().min(qd)] += 1;
        let full = slots.len() == qd;
        if full {
            after_last.push(burst.duration_since(last_submit).as_secs_f64() * 1e6);
        }
        let mut prev = burst;
        for (place, &slot) in slots.iter().enumerate() {
            if place == pause_after {
                let until = Instant::now() + pause;
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
            submit(&mut ring, slot);
            let now = Instant::now();
            if full {
                by_place[place].push(now.duration_since(prev).as_secs_f64() * 1e6);
            }
            prev = now;
        }
        if pause_after == slots.len() {
            let until = Instant::now() + pause;
            while Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        last_submit = Instant::now();
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Reap what is still in flight before the buffer goes.
    let mut inflight = qd;
    while inflight > 0 {
        let _ = ring.submit_and_wait(1);
        inflight -= ring.completion().count();
    }
    // SAFETY: allocated above with this layout; no read is in flight any more.
    unsafe { dealloc(buf, layout) };

    println!(
        "QD {qd}: {:.0} IOPS, {:.1} completions per wait",
        done as f64 / elapsed,
        done as f64 / waits.max(1) as f64
    );
    let common: Vec<String> = (1..=qd)
        .filter(|&n| sizes[n] * 100 >= waits.max(1) * 3)
        .map(|n| format!("{n}: {}%", sizes[n] * 100 / waits.max(1)))
        .collect();
    println!(
        "completions per wait (>= 3% of waits): {}",
        common.join(", ")
    );
    let places: Vec<String> = by_place
        .iter_mut()
        .take(8)
        .map(|v| format!("{:.1}", p50(v)))
        .collect();
    println!(
        "after a full burst, p50 µs per re-submission, by place: {} ... last {:.1}",
        places.join(" "),
        p50(&mut by_place[qd - 1])
    );
    println!(
        "last submission -> next full burst: p50 {:.0} µs",
        p50(&mut after_last)
    );
}
