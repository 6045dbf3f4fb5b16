//! Debian's `xenstore-utils` (the C libxenstore tools) against our server, through
//! `XENSTORED_PATH=<socket>` (the variable libxenstore reads for the daemon socket; verified by
//! experiment with xenstore-utils 4.17).

mod common;

use common::Env;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use xenpv_xenstore::XsOps;

fn tool(name: &str) -> String {
    for dir in ["/usr/bin", "/usr/sbin", "/bin"] {
        let p = format!("{dir}/{name}");
        if Path::new(&p).exists() {
            return p;
        }
    }
    panic!("{name} not found: install Debian's xenstore-utils (apt-get install -y xenstore-utils)");
}

fn run(env: &Env, domid: u32, name: &str, args: &[&str]) -> Output {
    Command::new(tool(name))
        .args(args)
        .env("XENSTORED_PATH", env.sock(domid))
        .env_remove("XENSTORE_DOMAIN_INTERFACE")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"))
}

fn ok(env: &Env, domid: u32, name: &str, args: &[&str]) -> String {
    let o = run(env, domid, name, args);
    assert!(
        o.status.success(),
        "{name} {args:?} as dom{domid} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(env: &Env, domid: u32, name: &str, args: &[&str]) -> String {
    let o = run(env, domid, name, args);
    assert!(
        !o.status.success(),
        "{name} {args:?} as dom{domid} should fail"
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn values_round_trip() {
    let env = Env::new(&[]);
    ok(
        &env,
        0,
        "xenstore-write",
        &["/vm/a", "hello world", "/vm/b/c", "2"],
    );
    assert_eq!(ok(&env, 0, "xenstore-read", &["/vm/a"]), "hello world\n");
    assert_eq!(ok(&env, 0, "xenstore-list", &["/vm"]), "a\nb\n");
    ok(&env, 0, "xenstore-exists", &["/vm/b/c"]);
    fails(&env, 0, "xenstore-exists", &["/vm/nope"]);
    let ls = ok(&env, 0, "xenstore-ls", &["/vm"]);
    assert!(ls.contains("a = \"hello world\""), "{ls}");
    assert!(ls.contains("c = \"2\""), "{ls}");
    ok(&env, 0, "xenstore-rm", &["/vm/b"]);
    fails(&env, 0, "xenstore-read", &["/vm/b/c"]);
    // Our client sees what the C tools wrote.
    assert_eq!(env.client(0).read_string("/vm/a").unwrap(), "hello world");
    // xenstore-ls of the whole tree works.
    let all = ok(&env, 0, "xenstore-ls", &["-p"]);
    assert!(all.contains("local = \"\""), "{all}");
}

#[test]
fn a_watch_fires() {
    let env = Env::new(&[]);
    ok(&env, 0, "xenstore-write", &["/watched/x", "0"]);
    let child = Command::new(tool("xenstore-watch"))
        .args(["-n", "2", "/watched"])
        .env("XENSTORED_PATH", env.sock(0))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn xenstore-watch");
    // The first event is the registration event; then our change.
    let c = env.client(0);
    let start = Instant::now();
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output());
    while !waiter.is_finished() && start.elapsed() < Duration::from_secs(10) {
        c.write_str("/watched/x", "1").unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    if !waiter.is_finished() {
        let _ = Command::new("kill").arg(pid.to_string()).status();
        panic!("xenstore-watch did not report 2 events within 10 s");
    }
    let out = waiter.join().unwrap().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<_> = s.lines().collect();
    assert_eq!(lines.len(), 2, "{s}");
    assert_eq!(lines[0], "/watched");
    assert_eq!(lines[1], "/watched/x");
}

#[test]
fn permissions_hold() {
    let env = Env::new(&[5, 6]);
    // Guest 5 writes in its home (relative path), reads it back.
    ok(&env, 5, "xenstore-write", &["data/secret", "five"]);
    assert_eq!(ok(&env, 5, "xenstore-read", &["data/secret"]), "five\n");
    // Guest 6 cannot read or list guest 5's nodes, or dom0-only nodes.
    fails(&env, 6, "xenstore-read", &["/local/domain/5/data/secret"]);
    fails(&env, 6, "xenstore-list", &["/local/domain/5"]);
    fails(
        &env,
        6,
        "xenstore-write",
        &["/local/domain/5/data/x", "evil"],
    );
    ok(&env, 0, "xenstore-write", &["/tool/only-dom0", "x"]);
    fails(&env, 5, "xenstore-read", &["/tool/only-dom0"]);
    fails(&env, 5, "xenstore-ls", &["/tool"]);
    // dom0 can read everything.
    assert_eq!(
        ok(&env, 0, "xenstore-read", &["/local/domain/5/data/secret"]),
        "five\n"
    );
    // chmod by the owner grants guest 6 read access.
    ok(&env, 5, "xenstore-chmod", &["data/secret", "n5", "r6"]);
    assert_eq!(
        ok(&env, 6, "xenstore-read", &["/local/domain/5/data/secret"]),
        "five\n"
    );
    let ls = ok(&env, 0, "xenstore-ls", &["-p", "/local/domain/5/data"]);
    assert!(ls.contains("(n5,r6)"), "{ls}");
    // Guest 6 cannot chmod it.
    fails(
        &env,
        6,
        "xenstore-chmod",
        &["/local/domain/5/data/secret", "b6"],
    );
}
