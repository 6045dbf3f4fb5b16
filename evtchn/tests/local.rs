//! The local provider end to end: a broker on temporary sockets, clients in this process and in
//! child processes (this test binary re-run with `XENPV_EVTCHN_CHILD` set), and hostile clients.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use xenpv_evtchn::local::{socket_path, wire, Broker, BrokerError, LocalEvtchn, PortStatus};
use xenpv_evtchn::{
    spin_then_wait, DomId, Error, EventChannel, Port, SpinBudget, StopSignal, Woken,
};

const SHORT: Duration = Duration::from_millis(100);
const LONG: Duration = Duration::from_secs(10);

struct Platform {
    root: PathBuf,
    broker: Arc<Broker>,
}

impl Platform {
    fn new(domids: &[DomId], max_ports: u32) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "evtchn-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        let broker = Arc::new(Broker::new(max_ports));
        for &d in domids {
            broker.create_domain(d).unwrap();
            let path = socket_path(&root, d);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let listener = UnixListener::bind(&path).unwrap();
            let b = broker.clone();
            thread::spawn(move || {
                for s in listener.incoming().flatten() {
                    let b = b.clone();
                    thread::spawn(move || {
                        let _ = b.serve(s, d);
                    });
                }
            });
        }
        Platform { root, broker }
    }

    fn sock(&self, d: DomId) -> PathBuf {
        socket_path(&self.root, d)
    }

    fn client(&self, d: DomId) -> LocalEvtchn {
        LocalEvtchn::connect(self.sock(d)).unwrap()
    }

    fn wait_status(&self, d: DomId, p: Port, want: Option<PortStatus>) {
        let start = Instant::now();
        while self.broker.port_status(d, p) != want {
            assert!(
                start.elapsed() < LONG,
                "dom{d} port {p}: {:?}, want {want:?}",
                self.broker.port_status(d, p)
            );
            thread::sleep(Duration::from_millis(2));
        }
    }
}

fn wait_ports(ch: &impl EventChannel, t: Duration) -> Vec<Port> {
    let mut v = Vec::new();
    ch.wait(&mut v, Some(t)).unwrap();
    v
}

fn broker_error(e: Error) -> BrokerError {
    match e {
        Error::Broker { error, .. } => error,
        e => panic!("expected a broker refusal, got {e:?}"),
    }
}

/// Front in dom1 allocates for dom0, back in dom0 binds: (front, back, front port, back port).
fn connected(p: &Platform) -> (LocalEvtchn, LocalEvtchn, Port, Port) {
    let front = p.client(1);
    let back = p.client(0);
    let fp = front.bind_unbound(0).unwrap();
    let bp = back.bind_interdomain(1, fp).unwrap();
    (front, back, fp, bp)
}

#[test]
fn notify_wakes_peer_and_mask_holds_events_until_unmask() {
    let p = Platform::new(&[0, 1], 64);
    let (front, back, fp, bp) = connected(&p);
    assert_eq!(
        p.broker.port_status(1, fp),
        Some(PortStatus::Interdomain {
            remote: 0,
            remote_port: bp
        })
    );
    back.notify(bp).unwrap();
    assert_eq!(wait_ports(&front, LONG), [fp]);
    // Masked now: further events are held, not delivered.
    back.notify(bp).unwrap();
    back.notify(bp).unwrap();
    assert_eq!(wait_ports(&front, SHORT), [] as [Port; 0]);
    front.unmask(fp).unwrap();
    assert_eq!(
        wait_ports(&front, LONG),
        [fp],
        "held event delivered after unmask"
    );
    front.unmask(fp).unwrap();
    assert_eq!(
        wait_ports(&front, SHORT),
        [] as [Port; 0],
        "exactly once per drain"
    );
    // The other direction.
    front.notify(fp).unwrap();
    let mut v = Vec::new();
    assert_eq!(
        spin_then_wait(&back, &mut v, SpinBudget::default(), Some(LONG)).unwrap(),
        Woken::Spinning
    );
    assert_eq!(v, [bp]);
}

#[test]
fn wait_or_stop_reports_events_and_ends_when_stopped() {
    let p = Platform::new(&[0, 1], 64);
    let (front, back, fp, bp) = connected(&p);
    let stop = Arc::new(StopSignal::new().unwrap());
    let mut v = Vec::new();
    assert_eq!(front.wait_or_stop(&mut v, Some(SHORT), &stop).unwrap(), 0);
    back.notify(bp).unwrap();
    assert_eq!(front.wait_or_stop(&mut v, Some(LONG), &stop).unwrap(), 1);
    assert_eq!(v, [fp]);
    front.unmask(fp).unwrap();
    // Blocked with no timeout, it returns once another thread sets the signal.
    let setter = {
        let stop = stop.clone();
        thread::spawn(move || {
            thread::sleep(SHORT);
            stop.set();
        })
    };
    v.clear();
    let t = Instant::now();
    assert_eq!(front.wait_or_stop(&mut v, None, &stop).unwrap(), 0);
    assert!(t.elapsed() >= SHORT, "returned after {:?}", t.elapsed());
    assert!(v.is_empty());
    setter.join().unwrap();
    // Set, it stays set: later waits return at once, events or not.
    assert!(stop.is_set());
    back.notify(bp).unwrap();
    assert_eq!(front.wait_or_stop(&mut v, None, &stop).unwrap(), 0);
}

#[test]
fn unbind_stops_delivery_and_returns_peer_to_unbound() {
    let p = Platform::new(&[0, 1], 64);
    let (front, back, fp, bp) = connected(&p);
    back.unbind(bp).unwrap();
    p.wait_status(1, fp, Some(PortStatus::Unbound { remote: 0 }));
    assert!(matches!(back.notify(bp), Err(Error::NotBound { .. })));
    front.notify(fp).unwrap(); // to nobody, as on Xen
    assert_eq!(wait_ports(&back, SHORT), [] as [Port; 0]);
    front.unbind(fp).unwrap();
    assert_eq!(p.broker.port_status(1, fp), None);
    assert!(matches!(front.unmask(fp), Err(Error::NotBound { .. })));
}

#[test]
fn bind_interdomain_checks_reservation() {
    let p = Platform::new(&[0, 1, 2], 64);
    let front = p.client(1);
    let back = p.client(0);
    let other = p.client(2);
    let fp = front.bind_unbound(0).unwrap();
    assert_eq!(
        broker_error(other.bind_interdomain(1, fp).unwrap_err()),
        BrokerError::NotReserved
    );
    assert_eq!(
        broker_error(back.bind_interdomain(1, fp + 100).unwrap_err()),
        BrokerError::NoSuchPort
    );
    assert_eq!(
        broker_error(back.bind_interdomain(9, fp).unwrap_err()),
        BrokerError::NoSuchDomain
    );
    assert_eq!(
        broker_error(back.bind_interdomain(0x7ff5, fp).unwrap_err()),
        BrokerError::BadDomain
    );
    let bp = back.bind_interdomain(1, fp).unwrap();
    // Already connected: nobody else, not even dom0 again, may bind it.
    assert_eq!(
        broker_error(back.bind_interdomain(1, fp).unwrap_err()),
        BrokerError::NotReserved
    );
    // A port that is itself an interdomain end is not unbound either.
    assert_eq!(
        broker_error(front.bind_interdomain(0, bp).unwrap_err()),
        BrokerError::NotReserved
    );
    // Loopback within one domain works.
    let a = front.bind_unbound(1).unwrap();
    let b = front.bind_interdomain(1, a).unwrap();
    front.notify(b).unwrap();
    assert_eq!(wait_ports(&front, LONG), [a]);
}

#[test]
fn port_table_is_bounded() {
    let p = Platform::new(&[0, 1], 4);
    let c = p.client(1);
    let ports: Vec<Port> = (0..4).map(|_| c.bind_unbound(0).unwrap()).collect();
    assert_eq!(ports, [1, 2, 3, 4]);
    assert_eq!(
        broker_error(c.bind_unbound(0).unwrap_err()),
        BrokerError::TooManyPorts
    );
    c.unbind(2).unwrap();
    assert_eq!(c.bind_unbound(0).unwrap(), 2, "lowest free port is reused");
}

#[test]
fn destroying_a_domain_releases_its_peers() {
    let p = Platform::new(&[0, 1], 64);
    let (front, back, fp, bp) = connected(&p);
    p.broker.destroy_domain(1).unwrap();
    assert_eq!(
        p.broker.port_status(0, bp),
        Some(PortStatus::Unbound { remote: 1 })
    );
    assert_eq!(
        broker_error(front.bind_unbound(0).unwrap_err()),
        BrokerError::NoSuchDomain
    );
    assert_eq!(
        broker_error(back.bind_interdomain(1, fp).unwrap_err()),
        BrokerError::NoSuchDomain
    );
    assert_eq!(p.broker.destroy_domain(1), Err(BrokerError::NoSuchDomain));
    assert_eq!(p.broker.create_domain(0), Err(BrokerError::DomainExists));
}

#[test]
fn spin_then_wait_blocks_and_times_out() {
    let p = Platform::new(&[0, 1], 64);
    let (front, back, fp, bp) = connected(&p);
    let mut v = Vec::new();
    let r = spin_then_wait(&front, &mut v, SpinBudget::Iterations(10), Some(SHORT)).unwrap();
    assert_eq!((r, v.len()), (Woken::TimedOut, 0));
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        back.notify(bp).unwrap();
        back
    });
    let r = spin_then_wait(
        &front,
        &mut v,
        SpinBudget::Duration(Duration::from_micros(10)),
        Some(LONG),
    )
    .unwrap();
    assert_eq!((r, v.as_slice()), (Woken::Blocked, [fp].as_slice()));
    drop(t.join().unwrap());
}

// ---- two processes ----

/// A child process driving one `LocalEvtchn` by commands on stdin, answering `R:...` lines.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    fn spawn(sock: PathBuf) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_role", "--nocapture", "--test-threads=1"])
            .env("XENPV_EVTCHN_CHILD", sock)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Peer {
            child,
            stdin,
            stdout,
        }
    }

    fn cmd(&mut self, c: &str) -> String {
        writeln!(self.stdin, "{c}").unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                self.stdout.read_line(&mut line).unwrap() > 0,
                "child exited during {c:?}"
            );
            // The harness may have printed "test child_role ... " on the same line.
            if let Some((_, r)) = line.trim_end().split_once("R:") {
                return r.to_string();
            }
        }
    }

    fn port(&mut self, c: &str) -> Port {
        let r = self.cmd(c);
        r.strip_prefix("ok ")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{c}: {r}"))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child side of [`Peer`]; a no-op when run as an ordinary test.
#[test]
fn child_role() {
    let Some(sock) = std::env::var_os("XENPV_EVTCHN_CHILD") else {
        return;
    };
    let ch = LocalEvtchn::connect(PathBuf::from(sock)).unwrap();
    // Straight to fd 1: the test harness may capture `std::io::stdout()`.
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/stdout")
        .unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let w: Vec<&str> = line.split_whitespace().collect();
        let n = |i: usize| w.get(i).and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
        let r: Result<String, Error> = match w.first().copied() {
            Some("alloc") => ch.bind_unbound(n(1) as DomId).map(|p| format!("ok {p}")),
            Some("bind") => ch
                .bind_interdomain(n(1) as DomId, n(2))
                .map(|p| format!("ok {p}")),
            Some("notify") => ch.notify(n(1)).map(|()| "ok".into()),
            Some("unbind") => ch.unbind(n(1)).map(|()| "ok".into()),
            Some("unmask") => ch.unmask(n(1)).map(|()| "ok".into()),
            Some("wait") => {
                let mut v = Vec::new();
                ch.wait(&mut v, Some(Duration::from_millis(n(1).into())))
                    .map(|_| format!("ports {v:?}"))
            }
            _ => return,
        };
        let r = r.unwrap_or_else(|e| format!("err {e}"));
        writeln!(out, "R:{r}").unwrap();
    }
}

#[test]
fn two_processes_notify_and_mask() {
    let p = Platform::new(&[0, 1], 64);
    let front = p.client(1);
    let fp = front.bind_unbound(0).unwrap();
    let mut back = Peer::spawn(p.sock(0));
    let bp = back.port(&format!("bind 1 {fp}"));
    assert_eq!(back.cmd(&format!("notify {bp}")), "ok");
    assert_eq!(wait_ports(&front, LONG), [fp]);
    front.notify(fp).unwrap();
    front.notify(fp).unwrap();
    assert_eq!(back.cmd("wait 10000"), format!("ports [{bp}]"));
    front.notify(fp).unwrap(); // while masked
    assert_eq!(back.cmd("wait 50"), "ports []");
    assert_eq!(back.cmd(&format!("unmask {bp}")), "ok");
    assert_eq!(back.cmd("wait 10000"), format!("ports [{bp}]"));
    assert_eq!(back.cmd(&format!("unmask {bp}")), "ok");
    assert_eq!(back.cmd("wait 50"), "ports []");
    // Unbind in the child stops delivery there and frees the front's port for another binder.
    assert_eq!(back.cmd(&format!("unbind {bp}")), "ok");
    front.notify(fp).unwrap();
    assert_eq!(back.cmd("wait 50"), "ports []");
    assert!(back.cmd(&format!("notify {bp}")).starts_with("err port"));
    p.wait_status(1, fp, Some(PortStatus::Unbound { remote: 0 }));
}

#[test]
fn killed_backend_returns_port_and_restarted_one_rebinds() {
    let p = Platform::new(&[0, 1], 64);
    let front = p.client(1);
    let fp = front.bind_unbound(0).unwrap();
    let mut back = Peer::spawn(p.sock(0));
    let bp = back.port(&format!("bind 1 {fp}"));
    assert_eq!(back.cmd(&format!("notify {bp}")), "ok");
    assert_eq!(wait_ports(&front, LONG), [fp]);
    front.unmask(fp).unwrap();
    drop(back); // SIGKILL
    p.wait_status(1, fp, Some(PortStatus::Unbound { remote: 0 }));
    p.wait_status(0, bp, None);
    let mut back2 = Peer::spawn(p.sock(0));
    let bp2 = back2.port(&format!("bind 1 {fp}"));
    assert_eq!(back2.cmd(&format!("notify {bp2}")), "ok");
    assert_eq!(wait_ports(&front, LONG), [fp]);
    front.unmask(fp).unwrap();
    front.notify(fp).unwrap();
    assert_eq!(back2.cmd("wait 10000"), format!("ports [{bp2}]"));
    // The front's process dying likewise leaves the back's port unbound for dom1.
    drop(front);
    p.wait_status(0, bp2, Some(PortStatus::Unbound { remote: 1 }));
    let front2 = p.client(1);
    let fp2 = front2.bind_interdomain(0, bp2).unwrap();
    front2.notify(fp2).unwrap();
    assert_eq!(back2.cmd(&format!("unmask {bp2}")), "ok");
    assert_eq!(back2.cmd("wait 10000"), format!("ports [{bp2}]"));
}

// ---- hostile clients ----

fn raw_call(s: &mut UnixStream, frame: &[u8]) -> (u32, u32) {
    s.write_all(frame).unwrap();
    let mut r = [0u8; wire::REPLY_FRAME];
    s.read_exact(&mut r).unwrap(); // fds, if any, are discarded by read(2)
    let w = |i: usize| u32::from_le_bytes(r[i * 4..i * 4 + 4].try_into().unwrap());
    assert_eq!(w(0), wire::REPLY_BODY);
    (w(1), w(2))
}

#[test]
fn hostile_clients_get_errors_or_disconnection_and_others_carry_on() {
    let p = Platform::new(&[0, 1], 64);
    let (front, back, fp, bp) = connected(&p);
    let mut evil = UnixStream::connect(p.sock(0)).unwrap();
    evil.set_read_timeout(Some(LONG)).unwrap();
    let code = |e: BrokerError| e.code();
    assert_eq!(
        raw_call(&mut evil, &wire::request(99, 1, 2)).0,
        code(BrokerError::UnknownOp)
    );
    assert_eq!(
        raw_call(&mut evil, &wire::request(0, 0, 0)).0,
        code(BrokerError::UnknownOp)
    );
    assert_eq!(
        raw_call(&mut evil, &wire::request(wire::OP_UNBIND, u32::MAX, 0)).0,
        code(BrokerError::NoSuchPort)
    );
    assert_eq!(
        raw_call(&mut evil, &wire::request(wire::OP_UNBIND, bp, 0)).0,
        code(BrokerError::NotOwner)
    );
    assert_eq!(
        raw_call(
            &mut evil,
            &wire::request(wire::OP_ALLOC_UNBOUND, 1 << 20, 0)
        )
        .0,
        code(BrokerError::BadDomain)
    );
    assert_eq!(
        raw_call(
            &mut evil,
            &wire::request(wire::OP_BIND_INTERDOMAIN, 1, u32::MAX)
        )
        .0,
        code(BrokerError::NoSuchPort)
    );
    // Still served after all that.
    let (st, port) = raw_call(&mut evil, &wire::request(wire::OP_ALLOC_UNBOUND, 1, 0));
    assert_eq!(st, 0);
    assert_eq!(
        p.broker.port_status(0, port),
        Some(PortStatus::Unbound { remote: 1 })
    );
    // A huge length: told so, then disconnected; its ports are closed.
    let mut huge = u32::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(&[0xaa; 64]);
    let (st, _) = raw_call(&mut evil, &huge);
    assert_eq!(st, code(BrokerError::BadFrame));
    let mut rest = Vec::new();
    let _ = evil.read_to_end(&mut rest);
    assert!(rest.is_empty());
    p.wait_status(0, port, None);
    // A client that hangs up mid-frame, and one that sends a short length.
    let mut half = UnixStream::connect(p.sock(0)).unwrap();
    half.write_all(&wire::request(wire::OP_ALLOC_UNBOUND, 1, 0)[..7])
        .unwrap();
    drop(half);
    let mut short = UnixStream::connect(p.sock(1)).unwrap();
    let (st, _) = raw_call(&mut short, &[4, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(st, code(BrokerError::BadFrame));
    // The well-behaved pair never noticed.
    back.notify(bp).unwrap();
    assert_eq!(wait_ports(&front, LONG), [fp]);
    assert_eq!(
        p.broker.port_status(0, bp),
        Some(PortStatus::Interdomain {
            remote: 1,
            remote_port: fp
        })
    );
    let c = p.client(0);
    assert!(c.bind_unbound(1).is_ok());
}

#[test]
fn connecting_to_a_missing_broker_names_the_fix() {
    let e = LocalEvtchn::connect("/nonexistent/dom0/evtchn.sock").unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("/nonexistent/dom0/evtchn.sock") && m.contains("xenpv local"),
        "{m}"
    );
}
