//! Our client against our server, pipelining, out-of-order completion, and hostile clients.

mod common;

use common::{Rng, TempDir};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use xenpv_nbd::client::Error as ClientError;
use xenpv_nbd::proto::{self, Errno, RequestHeader, SimpleReply};
use xenpv_nbd::{
    serve_unix, AsyncBlockExport, BlockExport, Client, Completion, ExportFlags, MemExport, Request,
    Server, ServerConfig, Threaded,
};

const SIZE: usize = 16 << 20;

#[test]
fn random_io_from_several_threads_matches_the_export() {
    let dir = TempDir::new("loop");
    let sock = dir.path("s");
    let export = Arc::new(MemExport::new(SIZE));
    let _srv = serve_unix(&sock, Arc::clone(&export)).unwrap();
    let client =
        Arc::new(Client::connect(&format!("nbd+unix:///?socket={}", sock.display())).unwrap());
    assert_eq!(client.size(), SIZE as u64);
    let i = client.info();
    assert!(i.can_flush() && i.can_fua() && i.can_trim() && i.can_write_zeroes());
    assert!(i.can_multi_conn() && !i.read_only());
    // Each thread owns a disjoint quarter so the model is exact.
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let c = Arc::clone(&client);
            std::thread::spawn(move || {
                let base = t * (SIZE as u64 / 4);
                let mut model = vec![0u8; SIZE / 4];
                let mut rng = Rng::new(t + 1);
                for _ in 0..200 {
                    let len = (rng.below(64) as usize + 1) * 512;
                    let off = rng.below((SIZE / 4 - len) as u64) as usize;
                    let data = rng.bytes(len);
                    if rng.below(4) == 0 {
                        c.write_at_fua(&data, base + off as u64).unwrap();
                    } else {
                        c.write_at(&data, base + off as u64).unwrap();
                    }
                    model[off..off + len].copy_from_slice(&data);
                    let mut back = vec![0u8; len];
                    c.read_at(&mut back, base + off as u64).unwrap();
                    assert_eq!(back, data);
                }
                c.flush().unwrap();
                let mut all = vec![0u8; SIZE / 4];
                c.read_at(&mut all, base).unwrap();
                assert!(all == model, "thread {t}: read-back differs from the model");
                (base, model)
            })
        })
        .collect();
    let snap_parts: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let snap = export.snapshot();
    for (base, model) in snap_parts {
        assert!(snap[base as usize..base as usize + SIZE / 4] == model[..]);
    }
    // trim and write-zeroes on MemExport zero the range.
    client.trim(4096, 8192).unwrap();
    client.write_zeroes(1 << 20, 1 << 20).unwrap();
    let mut z = vec![1u8; 8192];
    client.read_at(&mut z, 4096).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    let snap = export.snapshot();
    assert!(snap[1 << 20..2 << 20].iter().all(|&b| b == 0));
    // A large read is split at the payload bound and pipelined.
    let mut big = vec![0u8; SIZE];
    client.read_at(&mut big, 0).unwrap();
    assert!(big == export.snapshot());
}

#[test]
fn submit_and_wait_any_keep_many_in_flight() {
    let dir = TempDir::new("pipe");
    let sock = dir.path("s");
    let export = Arc::new(MemExport::new(1 << 20));
    let _srv = serve_unix(&sock, Arc::clone(&export)).unwrap();
    let c = Client::connect_unix(&sock, "").unwrap();
    let mut rng = Rng::new(9);
    let blocks: Vec<Vec<u8>> = (0..256).map(|_| rng.bytes(4096)).collect();
    let mut inflight = std::collections::HashMap::new();
    for (i, b) in blocks.iter().enumerate() {
        while inflight.len() >= 32 {
            let (h, r) = c.wait_any().unwrap();
            r.unwrap();
            inflight.remove(&h).unwrap();
        }
        inflight.insert(c.submit_write(i as u64 * 4096, b, false).unwrap(), i);
    }
    while !inflight.is_empty() {
        let (h, r) = c.wait_any().unwrap();
        r.unwrap();
        inflight.remove(&h);
    }
    let hs: Vec<_> = (0..256u64)
        .map(|i| c.submit_read(i * 4096, 4096).unwrap())
        .take(32)
        .collect();
    for (i, h) in hs.into_iter().enumerate().rev() {
        assert_eq!(c.wait(h).unwrap(), blocks[i]);
    }
    // Out-of-range is refused locally with a message that says why.
    let e = c.submit_read(1 << 20, 1).unwrap_err();
    assert!(e.to_string().contains("beyond the export size"), "{e}");
    c.disconnect().unwrap();
}

/// Completes nothing until `batch` requests are queued, then completes them newest first:
/// proves the server keeps requests in flight and matches replies by handle.
struct Batching {
    inner: MemExport,
    batch: usize,
    queue: Mutex<Vec<(Request, Completion)>>,
}

impl AsyncBlockExport for Batching {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn flags(&self) -> ExportFlags {
        self.inner.flags()
    }
    fn submit(&self, request: Request, done: Completion) {
        let mut q = self.queue.lock().unwrap();
        q.push((request, done));
        if q.len() == self.batch {
            for (r, d) in q.drain(..).rev() {
                xenpv_nbd::export::run_sync(&self.inner, r, d);
            }
        }
    }
}

#[test]
fn async_export_completes_out_of_order() {
    let dir = TempDir::new("async");
    let sock = dir.path("s");
    let export = Arc::new(Batching {
        inner: MemExport::from_vec((0..65536u32).map(|i| (i / 4096) as u8).collect()),
        batch: 16,
        queue: Mutex::new(Vec::new()),
    });
    let _srv = Server::bind_unix(&sock, export).unwrap().spawn().unwrap();
    let c = Client::connect_unix(&sock, "").unwrap();
    let hs: Vec<_> = (0..16u64)
        .map(|i| c.submit_read(i * 4096, 4096).unwrap())
        .collect();
    for (i, h) in hs.into_iter().enumerate() {
        let d = c.wait(h).unwrap();
        assert!(d.iter().all(|&b| b == i as u8));
    }
}

#[test]
fn tcp_server_and_uri() {
    let export = Arc::new(MemExport::new(1 << 20));
    let srv = Server::bind_tcp(
        "127.0.0.1:0",
        Arc::new(Threaded::new(Arc::clone(&export), 2).unwrap()),
    )
    .unwrap()
    .with_config(ServerConfig {
        export_name: Some("disk".into()),
        ..ServerConfig::default()
    })
    .spawn()
    .unwrap();
    let port = srv.local_addr().unwrap().port();
    let c = Client::connect(&format!("nbd://127.0.0.1:{port}/disk")).unwrap();
    c.write_at(b"hello", 100).unwrap();
    assert_eq!(&export.snapshot()[100..105], b"hello");
    // Default export "" is the same disk; another name is refused by name.
    Client::connect(&format!("nbd://127.0.0.1:{port}")).unwrap();
    let e = Client::connect(&format!("nbd://127.0.0.1:{port}/other")).unwrap_err();
    assert!(e.to_string().contains("no such export"), "{e}");
    drop(c);
    srv.shutdown();
}

#[test]
fn read_only_export() {
    let dir = TempDir::new("ro");
    let sock = dir.path("s");
    let export = Arc::new(MemExport::new(65536).with_flags(ExportFlags {
        read_only: true,
        ..ExportFlags::default()
    }));
    let _srv = serve_unix(&sock, export).unwrap();
    let c = Client::connect_unix(&sock, "").unwrap();
    assert!(c.info().read_only() && !c.info().can_trim() && !c.info().can_flush());
    assert!(matches!(c.write_at(b"x", 0), Err(ClientError::Invalid(_))));
    // A raw write is answered EPERM by the server.
    let mut raw = Raw::connect(&sock);
    raw.request(1, 0, 7, 0, 4, b"abcd");
    assert_eq!(raw.reply(), (7, Errno::EPERM.0));
}

/// A hand-driven client for hostile input.
struct Raw(UnixStream);

impl Raw {
    fn connect(sock: &std::path::Path) -> Raw {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[0..8], &proto::NBD_MAGIC.to_be_bytes());
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut raw = Raw(s);
        let mut go = 0u32.to_be_bytes().to_vec();
        go.extend_from_slice(&0u16.to_be_bytes());
        raw.option(proto::opt::GO, &go);
        loop {
            let (_, typ, _) = raw.opt_reply();
            if typ == proto::rep::ACK {
                return raw;
            }
            assert_eq!(typ, proto::rep::INFO);
        }
    }
    fn option(&mut self, o: u32, data: &[u8]) {
        let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.0.write_all(&b).unwrap();
    }
    fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.0.read_exact(&mut d).unwrap();
        (
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            d,
        )
    }
    fn request(
        &mut self,
        typ: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        length: u32,
        data: &[u8],
    ) {
        let h = RequestHeader {
            flags,
            typ,
            handle,
            offset,
            length,
        };
        let mut b = h.encode().to_vec();
        b.extend_from_slice(data);
        self.0.write_all(&b).unwrap();
    }
    fn reply(&mut self) -> (u64, u32) {
        let mut b = [0u8; 16];
        self.0.read_exact(&mut b).unwrap();
        let r = SimpleReply::decode(&b).unwrap();
        (r.handle, r.error)
    }
    /// True if the server closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

/// A well-behaved second client still gets correct I/O.
fn still_serving(sock: &std::path::Path, tag: u8) {
    let c = Client::connect_unix(sock, "").unwrap();
    c.write_at(&[tag; 512], 512).unwrap();
    let mut b = [0u8; 512];
    c.read_at(&mut b, 512).unwrap();
    assert_eq!(b, [tag; 512]);
}

#[test]
fn hostile_requests_get_errors_or_lose_only_their_connection() {
    let dir = TempDir::new("hostile");
    let sock = dir.path("s");
    let export = Arc::new(MemExport::new(1 << 20).with_flags(ExportFlags {
        trim: false,
        ..ExportFlags::all()
    }));
    let srv = serve_unix(&sock, Arc::clone(&export)).unwrap();
    let good = Client::connect_unix(&sock, "").unwrap();

    // Errors that keep the connection in sync: EINVAL / ENOSPC replies, then valid I/O works.
    let mut raw = Raw::connect(&sock);
    raw.request(0, 0, 1, 0, 64 << 20, &[]); // read longer than 32 MiB
    assert_eq!(raw.reply(), (1, Errno::EINVAL.0));
    raw.request(0, 0, 2, 1 << 20, 1, &[]); // read past the end
    assert_eq!(raw.reply(), (2, Errno::EINVAL.0));
    raw.request(0, 0, 3, u64::MAX - 1, 4096, &[]); // offset + length overflows
    assert_eq!(raw.reply(), (3, Errno::EINVAL.0));
    raw.request(1, 0, 4, (1 << 20) - 2, 4, b"wxyz"); // write past the end: payload consumed
    assert_eq!(raw.reply(), (4, Errno::ENOSPC.0));
    raw.request(99, 0, 5, 0, 0, &[]); // unknown command
    assert_eq!(raw.reply(), (5, Errno::EINVAL.0));
    raw.request(4, 0, 6, 0, 512, &[]); // trim, not offered
    assert_eq!(raw.reply(), (6, Errno::EINVAL.0));
    raw.request(0, 0x8000, 7, 0, 512, &[]); // unknown flag
    assert_eq!(raw.reply(), (7, Errno::EINVAL.0));
    raw.request(1, 0, 8, 0, 4, b"good");
    assert_eq!(raw.reply(), (8, 0));
    raw.request(0, 0, 9, 0, 4, &[]);
    assert_eq!(raw.reply(), (9, 0));
    let mut d = [0u8; 4];
    raw.0.read_exact(&mut d).unwrap();
    assert_eq!(&d, b"good");
    assert_eq!(&export.snapshot()[(1 << 20) - 2..], &[0, 0]);

    // Bad request magic: that client is disconnected.
    let mut bad = Raw::connect(&sock);
    bad.0.write_all(&[0xffu8; 28]).unwrap();
    assert!(bad.closed());
    still_serving(&sock, 1);

    // A write longer than the bound cannot be skipped: disconnect.
    let mut big = Raw::connect(&sock);
    big.request(1, 0, 1, 0, 64 << 20, &[]);
    assert!(big.closed());
    still_serving(&sock, 2);

    // Truncated request, then hang-up.
    let mut t = Raw::connect(&sock);
    t.0.write_all(
        &RequestHeader {
            flags: 0,
            typ: 1,
            handle: 1,
            offset: 0,
            length: 4096,
        }
        .encode()[..10],
    )
    .unwrap();
    drop(t);
    let mut t = Raw::connect(&sock);
    t.request(1, 0, 1, 0, 4096, &[1u8; 100]); // payload cut short
    drop(t);
    still_serving(&sock, 3);

    // The first raw client and the good client still work.
    raw.request(0, 0, 10, 512, 512, &[]);
    assert_eq!(raw.reply(), (10, 0));
    let mut b = [0u8; 512];
    good.read_at(&mut b, 512).unwrap();
    assert_eq!(b, [3u8; 512]);
    drop(good);
    srv.shutdown();
    assert!(!sock.exists(), "shutdown removes the socket file");
}

#[test]
fn hostile_negotiation() {
    let dir = TempDir::new("neg");
    let sock = dir.path("s");
    let _srv = Server::bind_unix(
        &sock,
        Arc::new(Threaded::new(Arc::new(MemExport::new(4096)), 1).unwrap()),
    )
    .unwrap()
    .with_config(ServerConfig {
        export_name: Some("disk".into()),
        ..ServerConfig::default()
    })
    .spawn()
    .unwrap();
    let handshake = || {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        s.write_all(&3u32.to_be_bytes()).unwrap();
        Raw(s)
    };
    // Unsupported options are refused politely; LIST names the export; INFO with a bad name
    // says unknown; malformed GO data is invalid.
    let mut r = handshake();
    r.option(proto::opt::STRUCTURED_REPLY, &[]);
    assert_eq!(r.opt_reply().1, proto::rep::ERR_UNSUP);
    r.option(proto::opt::STARTTLS, &[]);
    assert_eq!(r.opt_reply().1, proto::rep::ERR_UNSUP);
    r.option(proto::opt::LIST, &[]);
    let (_, t, d) = r.opt_reply();
    assert_eq!((t, &d[4..]), (proto::rep::SERVER, &b"disk"[..]));
    assert_eq!(r.opt_reply().1, proto::rep::ACK);
    let mut info = 4u32.to_be_bytes().to_vec();
    info.extend_from_slice(b"nope");
    info.extend_from_slice(&0u16.to_be_bytes());
    r.option(proto::opt::INFO, &info);
    assert_eq!(r.opt_reply().1, proto::rep::ERR_UNKNOWN);
    r.option(proto::opt::GO, &[0xff, 0xff, 0xff, 0xff, 0, 0]);
    assert_eq!(r.opt_reply().1, proto::rep::ERR_INVALID);
    r.option(proto::opt::ABORT, &[]);
    assert_eq!(r.opt_reply().1, proto::rep::ACK);
    assert!(r.closed());
    // Bad option magic and oversized options: disconnect.
    let mut r = handshake();
    r.0.write_all(&[0u8; 16]).unwrap();
    assert!(r.closed());
    let mut r = handshake();
    let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&proto::opt::GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    r.0.write_all(&b).unwrap();
    assert!(r.closed());
    // Still serving.
    let c = Client::connect_unix(&sock, "disk").unwrap();
    assert_eq!(c.size(), 4096);
}

/// A fake old server: no NBD_OPT_GO (answers ERR_UNSUP), no NO_ZEROES, then one READ reply;
/// then a reply to a handle never sent.
/// A fake server's side of negotiation: fixed newstyle, every option refused but
/// `NBD_OPT_EXPORT_NAME`, which gets an 8 KiB export with `flags`. Returns the export's name.
fn fake_negotiation(s: &mut UnixStream, flags: u16) -> Vec<u8> {
    s.write_all(&proto::NBD_MAGIC.to_be_bytes()).unwrap();
    s.write_all(&proto::IHAVEOPT.to_be_bytes()).unwrap();
    s.write_all(&proto::handshake::FIXED_NEWSTYLE.to_be_bytes())
        .unwrap();
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf).unwrap();
    assert_eq!(u32::from_be_bytes(cf), 1, "no NO_ZEROES when not offered");
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        let o = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d).unwrap();
        if o == proto::opt::EXPORT_NAME {
            s.write_all(&8192u64.to_be_bytes()).unwrap();
            s.write_all(&(proto::tflags::HAS_FLAGS | flags).to_be_bytes())
                .unwrap();
            s.write_all(&[0u8; 124]).unwrap();
            return d;
        }
        let mut r = proto::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&o.to_be_bytes());
        r.extend_from_slice(&proto::rep::ERR_UNSUP.to_be_bytes());
        r.extend_from_slice(&0u32.to_be_bytes());
        s.write_all(&r).unwrap();
    }
}

#[test]
fn export_name_fallback_and_hostile_server() {
    let dir = TempDir::new("fake");
    let sock = dir.path("s");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let name = fake_negotiation(&mut s, proto::tflags::READ_ONLY);
        assert_eq!(name, b"old");
        let mut q = [0u8; proto::REQUEST_LEN];
        s.read_exact(&mut q).unwrap();
        let req = RequestHeader::decode(&q).unwrap();
        assert_eq!((req.typ, req.offset, req.length), (0, 4096, 16));
        s.write_all(
            &SimpleReply {
                error: 0,
                handle: req.handle,
            }
            .encode(),
        )
        .unwrap();
        s.write_all(&[9u8; 16]).unwrap();
        s.read_exact(&mut q).unwrap();
        // Hostile: answer a handle that is not in flight.
        s.write_all(
            &SimpleReply {
                error: 0,
                handle: 0xdead_beef,
            }
            .encode(),
        )
        .unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let c = Client::connect_unix(&sock, "old").unwrap();
    assert_eq!(c.size(), 8192);
    assert!(c.info().read_only());
    let mut b = [0u8; 16];
    c.read_at(&mut b, 4096).unwrap();
    assert_eq!(b, [9u8; 16]);
    let e = c.read_at(&mut b, 0).unwrap_err();
    assert!(
        matches!(e, ClientError::Disconnected(ref m) if m.contains("not in flight")),
        "{e}"
    );
    drop(c);
    server.join().unwrap();
}

/// After `NBD_CMD_DISC` the server ends the connection at once, while it keeps serving others:
/// the kernel's nbd driver (`nbd-client -d`) waits for that before it lets the device go.
#[test]
fn disconnect_request_closes_the_connection() {
    let dir = TempDir::new("disc");
    let sock = dir.path("s");
    let export = Arc::new(MemExport::new(1 << 20));
    let srv = serve_unix(&sock, export).unwrap();
    let mut raw = Raw::connect(&sock);
    raw.request(proto::Command::Disc.to_wire(), 0, 1, 0, 0, b"");
    let mut b = [0u8; 1];
    // EOF, not the 10 s read timeout
    assert_eq!(
        raw.0.read(&mut b).map_err(|e| e.kind()),
        Ok(0),
        "the server did not close the connection after NBD_CMD_DISC"
    );
    still_serving(&sock, 9);
    drop(srv);
}

fn iov(b: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: b.as_mut_ptr().cast(),
        iov_len: b.len(),
    }
}

/// `submit_write_from` and `submit_read_into` move data between the socket and the caller's
/// scattered memory (uneven and empty pieces), many requests in flight at once.
#[test]
fn reads_and_writes_go_straight_between_the_socket_and_the_callers_memory() {
    let dir = TempDir::new("iov");
    let sock = dir.path("s");
    let export = Arc::new(MemExport::new(SIZE));
    let _srv = serve_unix(&sock, Arc::clone(&export)).unwrap();
    let client = Client::connect_unix(&sock, "").unwrap();
    let mut rng = Rng::new(7);
    let mut a = rng.bytes(512);
    let mut b = rng.bytes(1536);
    let mut c = rng.bytes(2048);
    let out = [iov(&mut a), iov(&mut []), iov(&mut b), iov(&mut c)];
    // SAFETY: the buffers outlive the call, which sends them before it returns.
    let h = unsafe { client.submit_write_from(8192, &out, false) }.unwrap();
    assert!(client.wait(h).unwrap().is_empty());
    let written = [a.clone(), b.clone(), c.clone()].concat();
    assert_eq!(&export.snapshot()[8192..8192 + 4096], &written[..]);

    // Read it back into differently cut buffers; and 32 reads in flight, each into its own.
    let (mut x, mut y) = (vec![0u8; 1000], vec![0u8; 3096]);
    let into = [iov(&mut x), iov(&mut []), iov(&mut y)];
    // SAFETY: the buffers live, untouched, until the request is waited for below.
    let h = unsafe { client.submit_read_into(8192, &into) }.unwrap();
    assert!(client.wait(h).unwrap().is_empty());
    assert_eq!([x, y].concat(), written);
    let mut bufs: Vec<Vec<u8>> = (0..32).map(|_| vec![0u8; 4096]).collect();
    let handles: Vec<_> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, buf)| {
            // SAFETY: as above: each buffer is left alone until all are waited for.
            unsafe { client.submit_read_into(i as u64 * 4096, &[iov(buf)]) }.unwrap()
        })
        .collect();
    for h in handles {
        assert!(client.wait(h).unwrap().is_empty());
    }
    assert!(bufs.concat() == export.snapshot()[..32 * 4096]);

    // Beyond the export, or beyond what one request may carry: refused before sending.
    let mut big = vec![0u8; 64];
    // SAFETY: refused without touching the buffer.
    let e = unsafe { client.submit_read_into(SIZE as u64 - 32, &[iov(&mut big)]) }.unwrap_err();
    assert!(matches!(e, ClientError::Invalid(_)), "{e}");
    let mut huge = vec![0u8; proto::MAX_PAYLOAD as usize + 512];
    // SAFETY: as above.
    let e = unsafe { client.submit_read_into(0, &[iov(&mut huge)]) }.unwrap_err();
    assert!(matches!(e, ClientError::Invalid(_)), "{e}");
    // The connection still works.
    let mut z = vec![0u8; 4096];
    client.read_at(&mut z, 8192).unwrap();
    assert_eq!(z, written);
}

/// A server that dies in the middle of a read's data: the read gets an error once the reader
/// has stopped writing into the caller's memory, and nothing hangs.
#[test]
fn a_connection_lost_in_the_middle_of_a_read_into_memory_fails_it() {
    let dir = TempDir::new("half");
    let sock = dir.path("s");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        fake_negotiation(&mut s, 0);
        let mut q = [0u8; proto::REQUEST_LEN];
        s.read_exact(&mut q).unwrap();
        let req = RequestHeader::decode(&q).unwrap();
        assert_eq!((req.typ, req.offset, req.length), (0, 0, 4096));
        let hdr = SimpleReply {
            error: 0,
            handle: req.handle,
        };
        s.write_all(&hdr.encode()).unwrap();
        s.write_all(&[5u8; 1000]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // Gone, 3096 bytes short.
    });
    let c = Client::connect_unix(&sock, "x").unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: the buffer is left alone until the request is waited for.
    let h = unsafe { c.submit_read_into(0, &[iov(&mut buf)]) }.unwrap();
    let e = c.wait(h).unwrap_err();
    assert!(matches!(e, ClientError::Disconnected(_)), "{e}");
    assert!(buf[..1000].iter().all(|&b| b == 5));
    assert!(buf[1000..].iter().all(|&b| b == 0));
    server.join().unwrap();
}
