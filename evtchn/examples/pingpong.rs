//! Notify → wake round-trip latency on the local platform, two threads: blocking wait versus
//! spin-then-block. Prints the median and p99 of each. `cargo run --release -p xenpv-evtchn
//! --example pingpong [ROUNDS]`.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use xenpv_evtchn::local::{Broker, LocalEvtchn};
use xenpv_evtchn::{spin_then_wait, EventChannel, Port, Result, SpinBudget};

fn client(broker: &Arc<Broker>, domid: u16) -> Result<LocalEvtchn> {
    let (a, b) = UnixStream::pair().map_err(|e| xenpv_evtchn::Error::Io {
        op: "socketpair",
        source: e,
    })?;
    let broker = broker.clone();
    thread::spawn(move || broker.serve(b, domid));
    LocalEvtchn::from_stream(a)
}

/// Waits for `port`, then unmasks it.
fn recv(ch: &LocalEvtchn, port: Port, budget: SpinBudget) -> Result<()> {
    let mut v = Vec::new();
    while !v.contains(&port) {
        v.clear();
        spin_then_wait(ch, &mut v, budget, None)?;
    }
    ch.unmask(port)
}

fn run(rounds: usize, budget: SpinBudget) -> Result<Vec<Duration>> {
    let broker = Arc::new(Broker::default());
    for d in [0, 1] {
        broker
            .create_domain(d)
            .map_err(|error| xenpv_evtchn::Error::Broker {
                op: "create_domain",
                error,
            })?;
    }
    let front = client(&broker, 1)?;
    let back = client(&broker, 0)?;
    let fp = front.bind_unbound(0)?;
    let bp = back.bind_interdomain(1, fp)?;
    let echo = thread::spawn(move || -> Result<()> {
        for _ in 0..rounds {
            recv(&back, bp, budget)?;
            back.notify(bp)?;
        }
        Ok(())
    });
    let mut lat = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        front.notify(fp)?;
        recv(&front, fp, budget)?;
        lat.push(t.elapsed());
    }
    echo.join().expect("echo thread")?;
    lat.sort();
    Ok(lat)
}

fn main() -> Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000)
        .max(1);
    for (name, budget) in [
        ("blocking", SpinBudget::None),
        (
            "spin 50us then block",
            SpinBudget::Duration(Duration::from_micros(50)),
        ),
    ] {
        let lat = run(rounds, budget)?;
        let pick = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
        println!(
            "{name:>22}: {rounds} round trips, median {:?}, p99 {:?}",
            pick(0.5),
            pick(0.99)
        );
    }
    Ok(())
}
