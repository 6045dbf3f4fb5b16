//! The client against our server: node operations, permissions, transactions (conflict and
//! retry), watches on bounded channels, the xenbus state machine between two clients.

mod common;

use common::Env;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;
use xenpv_xenstore::xenbus::{self, Switch};
use xenpv_xenstore::{Access, Errno, Perm, XenbusState, XsOps};

const T: Duration = Duration::from_secs(5);

#[test]
fn node_operations_and_string_helpers() {
    let env = Env::new(&[]);
    let c = env.client(0);
    c.write_str("/test/a/b", "hello").unwrap();
    assert_eq!(c.read_string("/test/a/b").unwrap(), "hello");
    c.write("/test/bin", &[0, 1, 2, 255]).unwrap();
    assert_eq!(c.read("/test/bin").unwrap(), vec![0, 1, 2, 255]);
    c.mkdir("/test/dir/x").unwrap();
    c.mkdir("/test/dir/x").unwrap();
    assert_eq!(c.read("/test/dir/x").unwrap(), b"");
    assert_eq!(c.directory("/test").unwrap(), vec!["a", "bin", "dir"]);
    assert!(c.exists("/test/a").unwrap());
    c.rm("/test/a").unwrap();
    assert!(!c.exists("/test/a/b").unwrap());
    c.rm("/test/a").unwrap(); // missing node, parent exists: fine, as xenstored
    let e = c.rm("/nothere/x").unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let e = c.read("/test/missing").unwrap_err();
    assert!(e.is_not_found());
    assert!(e.to_string().contains("ENOENT"), "{e}");
    assert_eq!(c.get_domain_path(7).unwrap(), "/local/domain/7");
    assert!(c.is_domain_introduced(0).unwrap());
    assert!(!c.is_domain_introduced(42).unwrap());
    assert_eq!(c.read_opt("/test/missing").unwrap(), None);
}

#[test]
fn permissions_are_enforced_per_domain_socket() {
    let env = Env::new(&[5, 6]);
    let d0 = env.client(0);
    let d5 = env.client(5);
    let d6 = env.client(6);
    // Relative paths are under the domain's home; nodes it creates are its own.
    d5.write_str("data/x", "five").unwrap();
    assert_eq!(d0.read_string("/local/domain/5/data/x").unwrap(), "five");
    assert_eq!(
        d5.get_perms("data/x").unwrap(),
        vec![Perm::new(5, Access::None)]
    );
    // Another guest sees nothing, not even whether the node exists.
    let e = d6.read("/local/domain/5/data/x").unwrap_err();
    assert_eq!(e.errno(), Some(&Errno::EACCES), "{e}");
    let e = d6.read("/local/domain/5/nothing").unwrap_err();
    assert_eq!(e.errno(), Some(&Errno::EACCES), "{e}");
    assert_eq!(
        d6.write_str("/local/domain/5/data/y", "x")
            .unwrap_err()
            .errno(),
        Some(&Errno::EACCES)
    );
    // dom0-only nodes.
    d0.write_str("/tool/secret", "s").unwrap();
    assert_eq!(
        d5.read("/tool/secret").unwrap_err().errno(),
        Some(&Errno::EACCES)
    );
    assert_eq!(
        d5.write_str("/tool/x", "s").unwrap_err().errno(),
        Some(&Errno::EACCES)
    );
    // Granting read to dom6 works; dom6 still cannot write or change permissions.
    d5.set_perms(
        "data/x",
        &[Perm::new(5, Access::None), Perm::new(6, Access::Read)],
    )
    .unwrap();
    assert_eq!(d6.read_string("/local/domain/5/data/x").unwrap(), "five");
    assert_eq!(
        d6.write_str("/local/domain/5/data/x", "6")
            .unwrap_err()
            .errno(),
        Some(&Errno::EACCES)
    );
    let e = d6
        .set_perms("/local/domain/5/data/x", &[Perm::new(6, Access::Both)])
        .unwrap_err();
    assert_eq!(e.errno(), Some(&Errno::EACCES));
    // An unprivileged owner cannot give its node away.
    let e = d5
        .set_perms("data/x", &[Perm::new(6, Access::Both)])
        .unwrap_err();
    assert_eq!(e.errno(), Some(&Errno::EPERM));
    // A backend-style node created by dom0 in a guest's home is owned as the parent says.
    d0.write_str("/local/domain/5/device/vbd/768/state", "1")
        .unwrap();
    assert_eq!(d5.read_string("device/vbd/768/state").unwrap(), "1");
    // Only dom0 may introduce domains.
    assert_eq!(
        d5.introduce(9, 0, 0).unwrap_err().errno(),
        Some(&Errno::EACCES)
    );
}

#[test]
fn transactions_conflict_and_retry() {
    let env = Env::new(&[]);
    let a = env.client(0);
    let b = env.client(0);
    a.write_str("/counter", "0").unwrap();
    // A conflicting write between start and commit gives EAGAIN on commit.
    let tx = a.transaction_start().unwrap();
    let v: u32 = tx.read_string("/counter").unwrap().parse().unwrap();
    b.write_str("/counter", "100").unwrap();
    tx.write_str("/counter", &(v + 1).to_string()).unwrap();
    let e = tx.commit().unwrap_err();
    assert!(e.is_again(), "{e}");
    assert_eq!(a.read_string("/counter").unwrap(), "100");
    // A transaction reads its own writes and nothing leaks before commit.
    let tx = a.transaction_start().unwrap();
    tx.write_str("/txnode/x", "1").unwrap();
    assert_eq!(tx.read_string("/txnode/x").unwrap(), "1");
    assert!(!b.exists("/txnode/x").unwrap());
    tx.commit().unwrap();
    assert_eq!(b.read_string("/txnode/x").unwrap(), "1");
    // Abort discards.
    let tx = a.transaction_start().unwrap();
    tx.rm("/txnode").unwrap();
    tx.abort().unwrap();
    assert!(b.exists("/txnode/x").unwrap());

    // Increments from several threads with the retrying closure API: none is lost.
    a.write_str("/counter", "0").unwrap();
    let threads = 4;
    let per = 25;
    let barrier = Arc::new(Barrier::new(threads));
    let hs: Vec<_> = (0..threads)
        .map(|i| {
            let c = if i % 2 == 0 { a.clone() } else { env.client(0) };
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                for _ in 0..per {
                    c.transaction(|tx| {
                        let v: u32 = tx.read_string("/counter")?.parse().unwrap_or(0);
                        tx.write_str("/counter", &(v + 1).to_string())
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(
        a.read_string("/counter").unwrap(),
        (threads * per).to_string()
    );
}

#[test]
fn transaction_closure_error_aborts() {
    let env = Env::new(&[]);
    let c = env.client(0);
    let r: xenpv_xenstore::Result<()> = c.transaction(|tx| {
        tx.write_str("/aborted", "x")?;
        tx.read("/does/not/exist").map(drop)
    });
    assert!(r.unwrap_err().is_not_found());
    assert!(!c.exists("/aborted").unwrap());
}

#[test]
fn watches_fire_with_token_and_are_bounded() {
    let env = Env::new(&[5]);
    let c = env.client(0);
    let w = c.watch("/w").unwrap();
    // Initial event on registration.
    let e = w.next_timeout(T).unwrap();
    assert_eq!(e.path, "/w");
    assert_eq!(e.token, w.token());
    c.write_str("/w/a/b", "1").unwrap();
    assert_eq!(w.next_timeout(T).unwrap().path, "/w/a/b");
    c.write_str("/wx", "1").unwrap(); // not below /w
    c.rm("/w").unwrap();
    assert_eq!(w.next_timeout(T).unwrap().path, "/w");
    assert!(w.next_timeout(Duration::from_millis(200)).is_err());

    // A watch below a removed subtree fires with its own path.
    c.write_str("/r/s/t", "1").unwrap();
    let deep = c.watch("/r/s/t").unwrap();
    deep.next_timeout(T).unwrap();
    c.rm("/r").unwrap();
    assert_eq!(deep.next_timeout(T).unwrap().path, "/r/s/t");

    // A bounded channel: a flood is dropped and counted, the client keeps working.
    let small = c.watch_with_capacity("/flood", 2).unwrap();
    for i in 0..50 {
        c.write_str("/flood", &i.to_string()).unwrap();
    }
    assert_eq!(c.read_string("/flood").unwrap(), "49");
    assert!(
        small.dropped() > 0,
        "events beyond the channel capacity are dropped"
    );
    let got: Vec<_> = small.events().try_iter().collect();
    assert_eq!(got.len(), 2);

    // Guest watches: relative paths, and no events for nodes it cannot read.
    let g = env.client(5);
    let gw = g.watch("device").unwrap();
    assert_eq!(gw.next_timeout(T).unwrap().path, "device");
    c.write_str("/local/domain/5/device/vif/0/state", "1")
        .unwrap();
    assert_eq!(gw.next_timeout(T).unwrap().path, "device/vif/0/state");
    let spy = g.watch("/tool").unwrap();
    spy.next_timeout(T).unwrap();
    c.write_str("/tool/hidden", "1").unwrap();
    assert!(spy.next_timeout(Duration::from_millis(200)).is_err());

    // Dropping a watch unregisters it.
    drop(w);
    c.write_str("/w/again", "1").unwrap();
    assert_eq!(c.read_string("/w/again").unwrap(), "1");
}

#[test]
fn special_watches_fire_on_introduce_and_release() {
    let env = Env::new(&[5]);
    let c = env.client(0);
    let intro = c.watch("@introduceDomain").unwrap();
    let rel = c.watch("@releaseDomain").unwrap();
    assert_eq!(intro.next_timeout(T).unwrap().path, "@introduceDomain");
    assert_eq!(rel.next_timeout(T).unwrap().path, "@releaseDomain");
    env.server.introduce_domain(9);
    assert_eq!(intro.next_timeout(T).unwrap().path, "@introduceDomain");
    assert!(c.is_domain_introduced(9).unwrap());
    let home = c.watch("/local/domain/5").unwrap();
    home.next_timeout(T).unwrap();
    env.server.release_domain(5, true);
    assert_eq!(rel.next_timeout(T).unwrap().path, "@releaseDomain");
    assert_eq!(home.next_timeout(T).unwrap().path, "/local/domain/5");
    assert!(!c.exists("/local/domain/5").unwrap());
    assert!(!c.is_domain_introduced(5).unwrap());
}

#[test]
fn xenbus_switch_and_wait_between_two_clients() {
    let env = Env::new(&[5]);
    let back = env.client(0);
    let front = env.client(5);
    let bdir = "/local/domain/0/backend/vbd/5/768";
    let fdir = "/local/domain/5/device/vbd/768";
    // The toolstack creates both directories with state=1 (front readable by the backend).
    back.write_str(&format!("{bdir}/state"), "1").unwrap();
    back.write_str(&format!("{fdir}/state"), "1").unwrap();
    back.set_perms(
        fdir,
        &[Perm::new(5, Access::None), Perm::new(0, Access::Read)],
    )
    .unwrap();
    back.set_perms(
        bdir,
        &[Perm::new(0, Access::None), Perm::new(5, Access::Read)],
    )
    .unwrap();
    back.set_perms(
        &format!("{bdir}/state"),
        &[Perm::new(0, Access::None), Perm::new(5, Access::Read)],
    )
    .unwrap();

    let fdir2 = fdir.to_string();
    let bdir2 = bdir.to_string();
    let fe = thread::spawn(move || {
        let s = xenbus::wait_for_peer_state(&front, &bdir2, |s| s == XenbusState::InitWait, T)?;
        assert_eq!(s, XenbusState::InitWait);
        xenbus::switch_state(&front, &fdir2, XenbusState::Initialised)?;
        xenbus::wait_for_peer_state(&front, &bdir2, |s| s == XenbusState::Connected, T)?;
        xenbus::switch_state(&front, &fdir2, XenbusState::Connected)
    });
    assert_eq!(
        xenbus::switch_state(&back, bdir, XenbusState::InitWait).unwrap(),
        Switch::Changed
    );
    assert_eq!(
        xenbus::switch_state(&back, bdir, XenbusState::InitWait).unwrap(),
        Switch::Unchanged
    );
    let s = xenbus::wait_for_peer_state(
        &back,
        fdir,
        |s| matches!(s, XenbusState::Initialised | XenbusState::Connected),
        T,
    )
    .unwrap();
    assert_eq!(s, XenbusState::Initialised);
    xenbus::switch_state(&back, bdir, XenbusState::Connected).unwrap();
    assert_eq!(fe.join().unwrap().unwrap(), Switch::Changed);
    assert_eq!(
        xenbus::read_state(&back, fdir).unwrap(),
        XenbusState::Connected
    );

    // Timeout names what it waited for.
    let e = xenbus::wait_for_peer_state(
        &back,
        fdir,
        |s| s == XenbusState::Closed,
        Duration::from_millis(200),
    )
    .unwrap_err();
    assert!(e.to_string().contains("state"), "{e}");

    // The toolstack removed the device: switch_state does not recreate it.
    back.rm(bdir).unwrap();
    assert_eq!(
        xenbus::switch_state(&back, bdir, XenbusState::Closed).unwrap(),
        Switch::Gone
    );
    assert!(!back.exists(bdir).unwrap());
    // A missing state reads as Unknown; garbage is an error naming the path.
    assert_eq!(
        xenbus::read_state(&back, bdir).unwrap(),
        XenbusState::Unknown
    );
    back.write_str(&format!("{fdir}/state"), "banana").unwrap();
    let e = xenbus::read_state(&back, fdir).unwrap_err();
    assert!(e.to_string().contains("device/vbd/768/state"), "{e}");
}

#[test]
fn client_is_shared_between_threads() {
    let env = Env::new(&[]);
    let c = env.client(0);
    let hs: Vec<_> = (0..4)
        .map(|i| {
            let c = c.clone();
            thread::spawn(move || {
                for j in 0..50 {
                    let p = format!("/mt/{i}/{j}");
                    c.write_str(&p, &format!("{i}-{j}")).unwrap();
                    assert_eq!(c.read_string(&p).unwrap(), format!("{i}-{j}"));
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(c.directory("/mt").unwrap().len(), 4);
}

#[test]
fn changes_say_to_read_again_on_an_event_a_dropped_event_or_the_recheck_only() {
    let env = Env::new(&[]);
    let c = env.client(0);
    let a = c.watch("/a").unwrap();
    let b = c.watch_with_capacity("/b", 1).unwrap();
    // The events of registration.
    a.next_timeout(T).unwrap();
    b.next_timeout(T).unwrap();
    let mut changes = xenbus::Changes::new(&[&a, &b], Duration::from_secs(60));
    assert!(changes.due(), "the first time");
    assert!(!changes.due());
    changes.wait(Duration::from_millis(100));
    assert!(!changes.due(), "no event, no recheck yet");
    // An event on the first watch ends the wait; one on another is taken after it.
    c.write_str("/a/x", "1").unwrap();
    changes.wait(T);
    assert!(changes.due());
    c.write_str("/b/y", "1").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    changes.wait(Duration::from_millis(10));
    assert!(changes.due());
    assert!(!changes.due());
    // Events dropped from a full channel: due even with none left to take.
    for i in 0..5 {
        c.write_str("/b/y", &i.to_string()).unwrap();
    }
    assert_eq!(c.read_string("/b/y").unwrap(), "4");
    assert!(b.dropped() > 0);
    assert!(changes.due());
    while b.events().try_recv().is_ok() {}
    assert!(!changes.due());
    // The recheck: due without any event once it has passed.
    let mut quick = xenbus::Changes::new(&[&a], Duration::from_millis(50));
    assert!(quick.due());
    assert!(!quick.due());
    std::thread::sleep(Duration::from_millis(60));
    assert!(quick.due());
    // The connection gone: due at once, and a wait still waits (a loop does not spin).
    env.server.disconnect_domain(0);
    while c.read_string("/a/x").is_ok() {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!quick.due());
    let t = std::time::Instant::now();
    quick.wait(Duration::from_millis(100));
    assert!(
        t.elapsed() >= Duration::from_millis(90),
        "waited {:?}",
        t.elapsed()
    );
    assert!(quick.due());
}
