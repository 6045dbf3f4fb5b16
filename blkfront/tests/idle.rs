//! An idle disk costs no wake-ups on its data path: once the last response is in, the queue
//! threads of both drivers (ours, in this process) sleep on their event channels and stop
//! signals with no timeout, and a close still ends them at once. One test in this binary, so
//! that the threads it looks at are the only ones of their names in the process.

mod common;

use std::time::{Duration, Instant};

use common::*;
use xenpv_blkfront::Options;

/// The context switches of this process's thread named `name`.
fn thread_switches(name: &str) -> u64 {
    xenpv_tests::thread_switches(None, name).unwrap_or_else(|| panic!("no thread named {name}"))
}

#[test]
fn idle_queue_threads_sleep_until_work_or_close() {
    let env = env(1 << 20);
    let _backend = start_backend(&env, Default::default());
    let dev = connect(&env, Options::default());
    let data = pattern(1, 8192);
    dev.write_at(&data, 4096).unwrap();
    let mut back = vec![0u8; 8192];
    dev.read_at(&mut back, 4096).unwrap();
    assert_eq!(back, data);

    // Past both drivers' spin budgets, then 2 s of nothing.
    std::thread::sleep(Duration::from_millis(200));
    let threads = ["blkfront-q0", "blkback-1-q0"];
    let before = threads.map(thread_switches);
    std::thread::sleep(Duration::from_secs(2));
    for (name, b) in threads.iter().zip(before) {
        let woke = thread_switches(name) - b;
        assert!(woke <= 3, "idle, {name} switched {woke} times in 2 s");
    }

    // Still served after the idle time, and closed promptly.
    dev.read_at(&mut back, 4096).unwrap();
    assert_eq!(back, data);
    let t = Instant::now();
    dev.close().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "close took {:?}",
        t.elapsed()
    );
}
