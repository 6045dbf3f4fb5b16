//! Hostile clients: malformed messages, over-quota requests, floods. Each gets an error reply
//! or is disconnected, and the server and other clients carry on.

mod common;

use common::Env;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;
use xenpv_xenstore::wire::{self, Header, MsgType};
use xenpv_xenstore::{Errno, Quotas, XsOps};

fn raw(env: &Env, domid: u32) -> UnixStream {
    let s = UnixStream::connect(env.sock(domid)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn send(s: &mut UnixStream, ty: u32, req_id: u32, payload: &[u8]) {
    let h = Header {
        ty,
        req_id,
        tx_id: 0,
        len: payload.len() as u32,
    };
    s.write_all(&h.to_bytes()).unwrap();
    s.write_all(payload).unwrap();
}

fn recv(s: &mut UnixStream) -> (Header, Vec<u8>) {
    wire::read_message(s)
        .unwrap()
        .expect("a reply, not end of stream")
}

/// The next reply that is not a watch event.
fn reply(s: &mut UnixStream) -> (Header, Vec<u8>) {
    loop {
        let m = recv(s);
        if m.0.ty != MsgType::WatchEvent as u32 {
            return m;
        }
    }
}

fn is_closed(s: &mut UnixStream) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // drain queued messages
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Another client still does I/O.
fn others_carry_on(env: &Env) {
    let c = env.client(0);
    c.write_str("/alive", "yes").unwrap();
    assert_eq!(c.read_string("/alive").unwrap(), "yes");
    let g = env.client(5);
    g.write_str("alive", "yes").unwrap();
    assert_eq!(g.read_string("alive").unwrap(), "yes");
}

#[test]
fn oversized_length_disconnects_that_client_only() {
    let env = Env::new(&[5]);
    let mut s = raw(&env, 5);
    let h = Header {
        ty: MsgType::Write as u32,
        req_id: 1,
        tx_id: 0,
        len: 4097,
    };
    s.write_all(&h.to_bytes()).unwrap();
    let _ = s.write_all(&[b'a'; 100]);
    assert!(
        is_closed(&mut s),
        "a 4097-byte payload must end the connection"
    );
    let mut s = raw(&env, 5);
    let h = Header {
        ty: MsgType::Read as u32,
        req_id: 1,
        tx_id: 0,
        len: u32::MAX,
    };
    s.write_all(&h.to_bytes()).unwrap();
    assert!(is_closed(&mut s));
    others_carry_on(&env);
}

#[test]
fn malformed_requests_get_einval() {
    let env = Env::new(&[5]);
    let mut s = raw(&env, 5);
    let einval = |s: &mut UnixStream, ty: u32, payload: &[u8], req: u32| {
        send(s, ty, req, payload);
        let (h, body) = reply(s);
        assert_eq!(h.req_id, req);
        assert_eq!(h.ty, MsgType::Error as u32, "type {ty} payload {payload:?}");
        assert_eq!(
            Errno::parse(&body),
            Errno::EINVAL,
            "type {ty} payload {payload:?}"
        );
    };
    einval(&mut s, MsgType::Read as u32, b"/local/domain/5", 1); // unterminated
    einval(&mut s, MsgType::Write as u32, b"no-nul-at-all", 2);
    einval(&mut s, MsgType::Read as u32, b"", 3);
    einval(&mut s, MsgType::Read as u32, b"/bad//path\0", 4);
    einval(&mut s, MsgType::Read as u32, b"/bad path\0", 5);
    einval(&mut s, MsgType::Read as u32, b"/\xff\0", 6);
    einval(&mut s, 999, b"x\0", 7); // unknown type
    einval(&mut s, MsgType::Error as u32, b"x\0", 8);
    einval(&mut s, MsgType::Watch as u32, b"/only-path\0", 9);
    einval(&mut s, MsgType::SetPerms as u32, b"data\0q5\0", 10);
    einval(&mut s, MsgType::TransactionEnd as u32, b"X\0", 11);
    einval(&mut s, MsgType::GetDomainPath as u32, b"-1\0", 12);
    let long = format!("/{}\0", "a".repeat(3100));
    einval(&mut s, MsgType::Read as u32, long.as_bytes(), 13);
    // A transaction id that does not exist.
    let h = Header {
        ty: MsgType::Read as u32,
        req_id: 14,
        tx_id: 77,
        len: 2,
    };
    s.write_all(&h.to_bytes()).unwrap();
    s.write_all(b"/\0").unwrap();
    let (h, body) = reply(&mut s);
    assert_eq!(
        (h.ty, Errno::parse(&body)),
        (MsgType::Error as u32, Errno::ENOENT)
    );
    // The connection still works after all that.
    send(&mut s, MsgType::Write as u32, 20, b"ok\0fine");
    let (h, body) = reply(&mut s);
    assert_eq!(
        (h.ty, h.req_id, body.as_slice()),
        (MsgType::Write as u32, 20, &b"OK\0"[..])
    );
    others_carry_on(&env);
}

#[test]
fn quotas_give_errors() {
    let quotas = Quotas {
        nodes_per_domain: 20,
        watches_per_domain: 8,
        transactions_per_domain: 3,
        max_value: 100,
        ..Quotas::default()
    };
    let env = Env::with_quotas(&[5], quotas);
    let g = env.client(5);
    // Value size.
    let e = g.write("big", &[b'x'; 101]).unwrap_err();
    assert_eq!(e.errno(), Some(&Errno::E2BIG), "{e}");
    g.write("fits", &[b'x'; 100]).unwrap();
    // Nodes.
    let mut err = None;
    for i in 0..30 {
        if let Err(e) = g.write_str(&format!("n/{i}"), "x") {
            err = Some(e);
            break;
        }
    }
    assert_eq!(err.expect("node quota").errno(), Some(&Errno::ENOSPC));
    // Removing frees quota.
    g.rm("n").unwrap();
    g.write_str("n/again", "x").unwrap();
    // Transactions.
    let txs: Vec<_> = (0..3).map(|_| g.transaction_start().unwrap()).collect();
    assert_eq!(
        g.transaction_start().unwrap_err().errno(),
        Some(&Errno::ENOSPC)
    );
    drop(txs);
    g.transaction_start().unwrap().abort().unwrap();
    // Watches: a flood is refused beyond the quota; dom0 is not limited.
    let mut s = raw(&env, 5);
    let mut refused = 0;
    for i in 0..50u32 {
        send(
            &mut s,
            MsgType::Watch as u32,
            100 + i,
            format!("w\0tok{i}\0").as_bytes(),
        );
        let (h, body) = reply(&mut s);
        if h.ty == MsgType::Error as u32 {
            assert_eq!(Errno::parse(&body), Errno::E2BIG);
            refused += 1;
        }
    }
    assert_eq!(refused, 50 - 8);
    let d0 = env.client(0);
    let ws: Vec<_> = (0..20)
        .map(|i| d0.watch(&format!("/many/{i}")).unwrap())
        .collect();
    assert_eq!(ws.len(), 20);
    // Dom0 is not held to the node quota either.
    for i in 0..40 {
        d0.write_str(&format!("/dom0/{i}"), "x").unwrap();
    }
    others_carry_on(&env);
}

#[test]
fn a_client_that_never_reads_its_events_is_disconnected() {
    let quotas = Quotas {
        queued_messages: 16,
        ..Quotas::default()
    };
    let env = Env::with_quotas(&[5], quotas);
    let mut s = raw(&env, 5);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    send(&mut s, MsgType::Watch as u32, 1, b"spam\0t\0");
    // Make the socket buffers and the queue fill: the guest never reads.
    let d0 = env.client(0);
    let big = vec![b'v'; 4000];
    for i in 0..2000 {
        d0.write(&format!("/local/domain/5/spam/{}", i % 10), &big)
            .unwrap();
    }
    assert!(
        is_closed(&mut s),
        "a connection that lets its queue overflow is dropped"
    );
    others_carry_on(&env);
}

#[test]
fn dropping_mid_message_is_harmless() {
    let env = Env::new(&[5]);
    for cut in [3usize, 16, 20] {
        let mut s = raw(&env, 5);
        let mut msg = Header {
            ty: MsgType::Write as u32,
            req_id: 1,
            tx_id: 0,
            len: 10,
        }
        .to_bytes()
        .to_vec();
        msg.extend_from_slice(b"abc\0defghi");
        s.write_all(&msg[..cut]).unwrap();
        drop(s);
    }
    // An open transaction and watches of a vanished client are cleaned up.
    {
        let g = env.client(5);
        let _w = g.watch("x").unwrap();
        std::mem::forget(g.transaction_start().unwrap());
    }
    others_carry_on(&env);
}

#[test]
fn a_connection_of_a_released_domain_is_refused() {
    let dir = std::env::temp_dir().join(format!("xenpv-xs-released-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let server = xenpv_xenstore::Server::new();
    server.introduce_domain(5);
    let path = dir.join("dom5.sock");
    let _l = server.bind(&path, 5).unwrap();
    // Accepted around the destroy: the domain is gone by the time the connection registers.
    server.release_domain(5, true);
    let c = xenpv_xenstore::Client::connect_unix(&path).unwrap();
    use xenpv_xenstore::XsOps;
    assert!(
        c.read("/local/domain/5").is_err(),
        "a released domain has no xenstore"
    );
    // Introduced again (a new domain with that id): served.
    server.introduce_domain(5);
    let c = xenpv_xenstore::Client::connect_unix(&path).unwrap();
    assert_eq!(c.get_domain_path(5).unwrap(), "/local/domain/5");
    drop(_l);
    let _ = std::fs::remove_dir_all(&dir);
}
