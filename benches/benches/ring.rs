//! Round-trip throughput of the xenpv shared ring against `rtrb` and `crossbeam_queue::ArrayQueue`.
//!
//! `cargo bench -p xenpv-benches --bench ring` runs one criterion group per workload (blkif on 1
//! and 8 pages, netif tx; batched and unbatched), each timing the three transports on two
//! threads, then its own interleaved rounds (xenpv, rtrb, …, xenpv, rtrb, …) and prints two
//! side-by-side tables of the medians: two threads (the benchmark proper, with the R1 verdict:
//! batched xenpv/rtrb >= 1.0) and one thread (the CPU cost of the operations alone, stable on a
//! busy machine). The tables add three variants that explain the differences: our ring without
//! the notify check, rtrb with at most S requests in flight, rtrb whose backend copies each
//! request out whole (see the crate documentation).
//!
//! `XENPV_BENCH_QUICK=1` shrinks every duration and count (about 15 s instead of 90 s). Under
//! `cargo test` (no `--bench` argument) criterion runs each routine once and the tables are
//! skipped.
//!
//! The workloads themselves are in the crate's library (`src/lib.rs`).

use std::time::Duration;

use criterion::{Criterion, Throughput};
use xenpv_benches::{run, slots, Mode, Threads, Transport, Workload};
use xenpv_ring::blkif::Blkif;
use xenpv_ring::netif::NetifTx;
use xenpv_ring::RingProtocol;

/// How long and how much to measure.
struct Settings {
    /// Round trips per criterion iteration (the unit of its throughput).
    batch: u64,
    warm_up: Duration,
    measurement: Duration,
    sample_size: usize,
    /// Rounds of the table loop; each round runs every transport once.
    rounds: usize,
    /// Round trips per run of the table loop.
    table_n: u64,
}

impl Settings {
    fn from_env() -> Self {
        let quick = std::env::var("XENPV_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        if quick {
            Self {
                batch: 1 << 14,
                warm_up: Duration::from_millis(100),
                measurement: Duration::from_millis(300),
                sample_size: 10,
                rounds: 5,
                table_n: 1 << 16,
            }
        } else {
            Self {
                batch: 1 << 16,
                warm_up: Duration::from_millis(500),
                measurement: Duration::from_secs(2),
                sample_size: 10,
                rounds: 15,
                table_n: 1 << 19,
            }
        }
    }
}

/// One workload: a protocol, a ring size and a mode.
struct Case {
    proto: &'static str,
    entry: usize,
    pages: u32,
    slots: usize,
    mode: Mode,
    run: fn(Transport, Mode, u64, Threads) -> Duration,
}

fn runner<P: Workload, const ORDER: u32>(
    transport: Transport,
    mode: Mode,
    n: u64,
    threads: Threads,
) -> Duration {
    run::<P>(transport, mode, ORDER, n, threads)
}

fn case<P: Workload, const ORDER: u32>(mode: Mode) -> Case {
    Case {
        proto: P::NAME,
        entry: <P as RingProtocol>::ENTRY_SIZE,
        pages: 1 << ORDER,
        slots: slots::<P>(ORDER),
        mode,
        run: runner::<P, ORDER>,
    }
}

impl Case {
    /// Criterion group name, e.g. `blkif-32slots-batched`.
    fn id(&self) -> String {
        format!("{}-{}slots-{}", self.proto, self.slots, self.mode.name())
    }

    /// Table label, e.g. `blkif 112B 1p/32 batched`.
    fn label(&self) -> String {
        format!(
            "{} {}B {}p/{} {}",
            self.proto,
            self.entry,
            self.pages,
            self.slots,
            self.mode.name()
        )
    }
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for mode in [Mode::Batched, Mode::Unbatched] {
        cases.push(case::<Blkif, 0>(mode));
        cases.push(case::<Blkif, 3>(mode));
        cases.push(case::<NetifTx, 0>(mode));
    }
    cases
}

fn criterion_groups(c: &mut Criterion, settings: &Settings, cases: &[Case]) {
    for case in cases {
        let mut group = c.benchmark_group(case.id());
        group.throughput(Throughput::Elements(settings.batch));
        for transport in Transport::ALL {
            group.bench_function(transport.name(), |b| {
                b.iter_custom(|iters| {
                    (case.run)(transport, case.mode, iters * settings.batch, Threads::Two)
                });
            });
        }
        group.finish();
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// The transports of the table, in its column order.
const TABLE: [Transport; 6] = [
    Transport::Xenpv,
    Transport::XenpvNoCheck,
    Transport::Rtrb,
    Transport::RtrbBounded,
    Transport::RtrbCopy,
    Transport::ArrayQueue,
];

/// Median rates (M round trips/s) of each transport of [`TABLE`], in interleaved rounds.
fn table_row(settings: &Settings, case: &Case, threads: Threads, n: u64) -> [f64; 6] {
    // One unmeasured run of each to warm caches, the allocator and the CPU frequency.
    for transport in TABLE {
        (case.run)(transport, case.mode, n / 4, threads);
    }
    let mut rates: [Vec<f64>; 6] = Default::default();
    for _ in 0..settings.rounds {
        for (i, transport) in TABLE.into_iter().enumerate() {
            let elapsed = (case.run)(transport, case.mode, n, threads);
            rates[i].push(n as f64 / elapsed.as_secs_f64() / 1e6);
        }
    }
    rates.map(|mut r| median(&mut r))
}

fn print_table(settings: &Settings, cases: &[Case], threads: Threads) {
    let n = match threads {
        Threads::Two => settings.table_n,
        Threads::One => settings.table_n * 4,
    };
    println!();
    match threads {
        Threads::Two => println!(
            "Two threads (frontend + backend, spinning): round trips, M entries/s, median of {} interleaved rounds of {n}",
            settings.rounds
        ),
        Threads::One => println!(
            "One thread (frontend and backend steps in turns: CPU cost only, no cache-line transfers): M entries/s, median of {} rounds of {n}",
            settings.rounds
        ),
    }
    let header = format!(
        "{:<30} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "workload",
        "xenpv",
        "x-nochk",
        "rtrb",
        "rtrb<=S",
        "rtrb+cp",
        "ArrayQ",
        "x/rtrb",
        "xnc/rtrb",
        "x/rtrb+cp"
    );
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    let mut r1 = Vec::new();
    for case in cases {
        let [ours, no_check, rtrb, bounded, copy, array_queue] =
            table_row(settings, case, threads, n);
        let (ratio, ratio_no_check, ratio_copy) = (ours / rtrb, no_check / rtrb, ours / copy);
        println!(
            "{:<30} {ours:>7.2} {no_check:>7.2} {rtrb:>7.2} {bounded:>7.2} {copy:>7.2} {array_queue:>7.2} {ratio:>7.2} {ratio_no_check:>7.2} {ratio_copy:>7.2}",
            case.label(),
        );
        if case.mode == Mode::Batched {
            r1.push((case.label(), ratio));
        }
    }
    if threads == Threads::Two {
        println!();
        for (label, ratio) in r1 {
            let verdict = if ratio >= 1.0 { "met" } else { "NOT met" };
            println!("R1 (batched xenpv/rtrb >= 1.0) {label}: {ratio:.2} {verdict}");
        }
    }
}

fn main() {
    let settings = Settings::from_env();
    // `cargo bench` passes `--bench`; `cargo test --benches` does not (criterion's test mode).
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let cases = cases();
    let mut c = Criterion::default()
        .warm_up_time(settings.warm_up)
        .measurement_time(settings.measurement)
        .sample_size(settings.sample_size)
        .configure_from_args();
    criterion_groups(&mut c, &settings, &cases);
    c.final_summary();
    if bench_mode {
        print_table(&settings, &cases, Threads::Two);
        print_table(&settings, &cases, Threads::One);
        println!();
        println!(
            "xenpv: our ring, publishing with push_requests/push_responses (notify check: a full"
        );
        println!("  fence and a read of the peer's event index per publish), as a driver whose peer may sleep.");
        println!(
            "x-nochk: our ring with push_*_no_check (enough only when the peer never sleeps)."
        );
        println!(
            "rtrb<=S: rtrb with at most S requests in flight, like our ring (two queues of S slots"
        );
        println!("  otherwise allow 2*S).");
        println!("rtrb+cp: rtrb whose backend copies each request out whole, as our ring must (copy-once");
        println!("  reads of shared memory); plain rtrb reads only id and operation in place.");
        println!("ArrayQ: crossbeam ArrayQueue, no batch API (one push/pop at a time).");
        println!("R1 compares xenpv (with the notify check) with plain rtrb.");
    }
}
