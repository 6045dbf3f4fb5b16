//! The NBD client: fixed newstyle negotiation (`NBD_OPT_GO`, falling back to
//! `NBD_OPT_EXPORT_NAME`), then pipelined transmission with simple replies matched by handle.
//!
//! [`Client`] is `Sync`: several threads may issue requests at once, and the submit/wait API
//! keeps up to [`Client::max_in_flight`] requests in flight from one thread.
//!
//! Zero-copy: [`Client::submit_read_into`] has the reader thread `readv` a reply's data from the
//! socket straight into the caller's memory, and [`Client::submit_write_from`] `writev`s the
//! request header and the caller's memory in one call. The reader takes a reply's header alone
//! (16 bytes, no read-ahead buffer), so no byte of data passes through a buffer of ours. Both
//! take raw iovecs: the memory may be shared with another domain, which no Rust reference may
//! cover.

use crate::proto::{
    self, be16, be32, be64, client_flags, cmd_flags, handshake, info, opt, rep, tflags, Command,
    Errno, RequestHeader, SimpleReply, IHAVEOPT, MAX_OPTION_LEN, MAX_PAYLOAD, NBD_MAGIC,
    OLDSTYLE_MAGIC, OPT_REPLY_MAGIC, SIMPLE_REPLY_LEN, STRUCTURED_REPLY_MAGIC,
};
use crate::uri::{self, Address, Uri};
use std::collections::{HashMap, VecDeque};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// What can go wrong as an NBD client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URI cannot be used.
    #[error(transparent)]
    Uri(#[from] uri::Error),
    /// The server could not be reached.
    #[error("cannot connect to NBD server {addr}: {source} (is the server running, and is the address right?)")]
    Connect {
        /// The address tried.
        addr: String,
        /// The cause.
        source: io::Error,
    },
    /// The socket failed during negotiation.
    #[error("NBD negotiation failed: {0}")]
    Io(#[from] io::Error),
    /// The server broke the protocol (during negotiation or transmission).
    #[error("NBD server protocol violation: {0}")]
    Protocol(String),
    /// The server speaks only the oldstyle protocol.
    #[error("the NBD server uses oldstyle negotiation, which is not supported (run it with newstyle, e.g. without nbd-server's oldstyle mode)")]
    Oldstyle,
    /// The server refused an option.
    #[error("NBD server refused {option}: {reply}{}", if message.is_empty() { String::new() } else { format!(" ({message})") })]
    OptionRefused {
        /// The option name.
        option: &'static str,
        /// The error reply name.
        reply: &'static str,
        /// The server's message.
        message: String,
    },
    /// The server answered a request with an error.
    #[error("NBD {command} at offset {offset} length {length} failed: {errno}")]
    Request {
        /// The command.
        command: Command,
        /// Its offset.
        offset: u64,
        /// Its length.
        length: u32,
        /// The server's error.
        errno: Errno,
    },
    /// The request cannot be sent (out of range, too long, not offered by the export).
    #[error("invalid NBD request: {0}")]
    Invalid(String),
    /// The connection is gone.
    #[error("NBD connection lost: {0}")]
    Disconnected(String),
}

/// A `Result` with this module's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// What the server told us about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`proto::tflags`); 0 if the server sent none.
    pub flags: u16,
    /// Minimum block size (1 unless the server said otherwise).
    pub min_block: u32,
    /// Preferred block size (4096 unless the server said otherwise).
    pub preferred_block: u32,
    /// Largest read/write payload we send: the server's maximum, capped at 32 MiB.
    pub max_payload: u32,
}

impl ExportInfo {
    fn has(&self, f: u16) -> bool {
        self.flags & f != 0
    }
    /// `NBD_FLAG_READ_ONLY`.
    pub fn read_only(&self) -> bool {
        self.has(tflags::READ_ONLY)
    }
    /// `NBD_FLAG_SEND_FLUSH`.
    pub fn can_flush(&self) -> bool {
        self.has(tflags::SEND_FLUSH)
    }
    /// `NBD_FLAG_SEND_FUA`.
    pub fn can_fua(&self) -> bool {
        self.has(tflags::SEND_FUA)
    }
    /// `NBD_FLAG_SEND_TRIM`.
    pub fn can_trim(&self) -> bool {
        self.has(tflags::SEND_TRIM)
    }
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub fn can_write_zeroes(&self) -> bool {
        self.has(tflags::SEND_WRITE_ZEROES)
    }
    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub fn can_multi_conn(&self) -> bool {
        self.has(tflags::CAN_MULTI_CONN)
    }
}

/// Identifies a submitted request until it is waited for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Handle(u64);

/// The default bound on requests in flight per client.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;

/// A completed request: the data of a read (empty for other commands), or the error.
pub type Outcome = Result<Vec<u8>>;

struct Pending {
    command: Command,
    offset: u64,
    length: u32,
    /// A read's destination ([`Client::submit_read_into`]); `None`: into a new vector.
    into: Option<Iov>,
    /// The reader thread is writing the reply's data into `into`: the request must not be
    /// given up (its memory released by the waiter) until it is done.
    receiving: bool,
}

/// The caller's memory a read goes into, as raw iovecs.
struct Iov(Vec<libc::iovec>);

// SAFETY: an iovec is an address and a length; the caller of `submit_read_into` vouched that
// the memory stays valid, for whichever thread writes it, until the request is waited for.
unsafe impl Send for Iov {}

/// A connected stream (a Unix or TCP socket): read, written, and its fd for `readv`/`writev`.
trait Sock: Read + Write + AsFd + Send {}
impl Sock for UnixStream {}
impl Sock for TcpStream {}

/// What a request carries after its header.
enum Payload<'a> {
    None,
    Bytes(&'a [u8]),
    /// Raw memory (the caller of `submit_write_from` vouched for it).
    Iov(&'a [libc::iovec]),
}

#[derive(Default)]
struct State {
    next: u64,
    pending: HashMap<u64, Pending>,
    done: HashMap<u64, Outcome>,
    dead: Option<String>,
}

struct Inner {
    writer: Mutex<BufWriter<Box<dyn Sock>>>,
    shut: Box<dyn Fn() + Send + Sync>,
    state: Mutex<State>,
    cv: Condvar,
    info: ExportInfo,
    max_in_flight: usize,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kill(&self, why: String) {
        let mut s = self.state();
        if s.dead.is_none() {
            tracing::debug!("NBD client connection closed: {why}");
            s.dead = Some(why);
        }
        drop(s);
        (self.shut)();
        self.cv.notify_all();
    }
}

/// A connected NBD client.
pub struct Client {
    inner: Arc<Inner>,
    reader: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("info", &self.inner.info)
            .finish()
    }
}

impl Client {
    /// Connect to `nbd://host[:port]/export` or `nbd+unix:///export?socket=/path`.
    pub fn connect(uri: &str) -> Result<Client> {
        Client::connect_uri(&Uri::parse(uri)?, DEFAULT_MAX_IN_FLIGHT)
    }

    /// Connect to a parsed URI with a bound on requests in flight.
    pub fn connect_uri(uri: &Uri, max_in_flight: usize) -> Result<Client> {
        match &uri.address {
            Address::Unix(p) => Client::connect_unix_with(p, &uri.export, max_in_flight),
            Address::Tcp { host, port } => {
                Client::connect_tcp_with((host.as_str(), *port), &uri.export, max_in_flight)
            }
        }
    }

    /// Connect over a Unix socket to `export` (`""`: the default export).
    pub fn connect_unix(path: impl AsRef<Path>, export: &str) -> Result<Client> {
        Client::connect_unix_with(path, export, DEFAULT_MAX_IN_FLIGHT)
    }

    fn connect_unix_with(path: impl AsRef<Path>, export: &str, max: usize) -> Result<Client> {
        let path = path.as_ref();
        let s = UnixStream::connect(path).map_err(|source| Error::Connect {
            addr: path.display().to_string(),
            source,
        })?;
        let (r, w, s2) = (s.try_clone()?, s.try_clone()?, s);
        Client::handshake(
            Box::new(r),
            Box::new(w),
            Box::new(move || {
                let _ = s2.shutdown(Shutdown::Both);
            }),
            export,
            max,
        )
    }

    /// Connect over TCP to `export`.
    pub fn connect_tcp(addr: impl std::net::ToSocketAddrs, export: &str) -> Result<Client> {
        Client::connect_tcp_with(addr, export, DEFAULT_MAX_IN_FLIGHT)
    }

    fn connect_tcp_with(
        addr: impl std::net::ToSocketAddrs,
        export: &str,
        max: usize,
    ) -> Result<Client> {
        let addrs: Vec<_> = addr
            .to_socket_addrs()
            .map_err(|source| Error::Connect {
                addr: "(unresolved)".into(),
                source,
            })?
            .collect();
        let s = TcpStream::connect(&addrs[..]).map_err(|source| Error::Connect {
            addr: format!("{addrs:?}"),
            source,
        })?;
        s.set_nodelay(true)?;
        let (r, w, s2) = (s.try_clone()?, s.try_clone()?, s);
        Client::handshake(
            Box::new(r),
            Box::new(w),
            Box::new(move || {
                let _ = s2.shutdown(Shutdown::Both);
            }),
            export,
            max,
        )
    }

    fn handshake(
        r: Box<dyn Sock>,
        w: Box<dyn Sock>,
        shut: Box<dyn Fn() + Send + Sync>,
        export: &str,
        max_in_flight: usize,
    ) -> Result<Client> {
        let mut r = BufReader::new(r);
        let mut w = BufWriter::new(w);
        let info = match negotiate(&mut r, &mut w, export) {
            Ok(i) => i,
            Err(e) => {
                if matches!(e, Error::OptionRefused { .. }) {
                    // Leave politely (the server's ACK is not awaited).
                    let _ = send_option(&mut w, opt::ABORT, &[]);
                }
                shut();
                return Err(e);
            }
        };
        tracing::debug!(?info, "NBD export negotiated");
        // From here on replies are read without read-ahead (their data goes straight to where
        // it belongs); the server sends nothing unasked, so negotiation left nothing buffered.
        if !r.buffer().is_empty() {
            shut();
            return Err(Error::Protocol(
                "the server sent data after negotiation, before any request".into(),
            ));
        }
        let r = r.into_inner();
        let inner = Arc::new(Inner {
            writer: Mutex::new(w),
            shut,
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            info,
            max_in_flight: max_in_flight.max(1),
        });
        let i2 = Arc::clone(&inner);
        let reader = std::thread::Builder::new()
            .name("nbd-client-rx".into())
            .spawn(move || {
                let why = match receive(&i2, r) {
                    Ok(()) => "server closed the connection".to_string(),
                    Err(e) => e.to_string(),
                };
                i2.kill(why);
            })?;
        Ok(Client {
            inner,
            reader: Some(reader),
        })
    }

    /// The export's size, flags and block sizes.
    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.info.size
    }

    /// The bound on requests in flight (submitted and not yet waited for).
    pub fn max_in_flight(&self) -> usize {
        self.inner.max_in_flight
    }

    fn check(&self, command: Command, offset: u64, length: u64, fua: bool) -> Result<()> {
        let i = &self.inner.info;
        let fail = |m: String| Err(Error::Invalid(m));
        if matches!(
            command,
            Command::Write | Command::Trim | Command::WriteZeroes
        ) && i.read_only()
        {
            return fail(format!("{command} on a read-only export"));
        }
        match command {
            Command::Flush if !i.can_flush() => {
                return fail("the export does not offer FLUSH".into())
            }
            Command::Trim if !i.can_trim() => return fail("the export does not offer TRIM".into()),
            Command::WriteZeroes if !i.can_write_zeroes() => {
                return fail(
                    "the export does not offer WRITE_ZEROES (write a zero buffer instead)".into(),
                )
            }
            Command::Read | Command::Write if length > u64::from(i.max_payload) => {
                return fail(format!(
                    "{command} of {length} bytes exceeds the {}-byte payload bound (split it)",
                    i.max_payload
                ))
            }
            _ => {}
        }
        if length > u64::from(u32::MAX) {
            return fail(format!("{command} of {length} bytes exceeds 4 GiB - 1"));
        }
        if fua && !i.can_fua() {
            return fail("the export does not offer FUA (flush instead)".into());
        }
        if command != Command::Flush && !proto::in_range(offset, length, i.size) {
            return fail(format!(
                "{command} at {offset}+{length} is beyond the export size {}",
                i.size
            ));
        }
        Ok(())
    }

    fn submit(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        data: Payload<'_>,
        into: Option<Iov>,
    ) -> Result<Handle> {
        let inner = &*self.inner;
        let handle = {
            let mut s = inner.state();
            loop {
                if let Some(why) = &s.dead {
                    return Err(Error::Disconnected(why.clone()));
                }
                if s.pending.len() + s.done.len() < inner.max_in_flight {
                    break;
                }
                s = inner.cv.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            let h = s.next;
            s.next = s.next.wrapping_add(1);
            s.pending.insert(
                h,
                Pending {
                    command,
                    offset,
                    length,
                    into,
                    receiving: false,
                },
            );
            h
        };
        let hdr = RequestHeader {
            flags,
            typ: command.to_wire(),
            handle,
            offset,
            length,
        };
        let sent = {
            let mut w = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            match data {
                Payload::None => w.write_all(&hdr.encode()).and_then(|()| w.flush()),
                Payload::Bytes(d) => w
                    .write_all(&hdr.encode())
                    .and_then(|()| w.write_all(d))
                    .and_then(|()| w.flush()),
                Payload::Iov(iov) => w.flush().and_then(|()| {
                    let hdr = hdr.encode();
                    let mut all = Vec::with_capacity(iov.len() + 1);
                    all.push(libc::iovec {
                        iov_base: hdr.as_ptr() as *mut libc::c_void,
                        iov_len: hdr.len(),
                    });
                    all.extend_from_slice(iov);
                    // SAFETY: the first iovec is `hdr`, alive here; the caller of
                    // `submit_write_from` vouched for the others, for the length of this call.
                    unsafe { transfer_all(w.get_ref().as_fd(), &mut all, Dir::Write) }
                }),
            }
        };
        if let Err(e) = sent {
            inner.state().pending.remove(&handle);
            inner.kill(format!("sending {command} failed: {e}"));
            return Err(Error::Disconnected(e.to_string()));
        }
        Ok(Handle(handle))
    }

    /// Start a read of `length` bytes at `offset`.
    pub fn submit_read(&self, offset: u64, length: u32) -> Result<Handle> {
        self.check(Command::Read, offset, length.into(), false)?;
        self.submit(Command::Read, 0, offset, length, Payload::None, None)
    }

    /// Start a read at `offset` of as many bytes as `iov` describes, which the reader thread
    /// receives from the socket straight into that memory (no buffer in between). Its outcome
    /// is an empty vector; on an error the memory may hold part of the data.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for writes of its length, and it must stay valid
    /// until [`wait`](Self::wait) or [`wait_any`](Self::wait_any) returned this request's
    /// outcome, or the client was dropped (the client guarantees that nothing is written into
    /// it after either). Meanwhile no Rust reference may cover it.
    pub unsafe fn submit_read_into(&self, offset: u64, iov: &[libc::iovec]) -> Result<Handle> {
        let length = iov_len(iov)?;
        self.check(Command::Read, offset, length.into(), false)?;
        let into = Iov(iov.to_vec());
        self.submit(Command::Read, 0, offset, length, Payload::None, Some(into))
    }

    /// Start a write of `data` at `offset`; with `fua`, durable before its reply.
    pub fn submit_write(&self, offset: u64, data: &[u8], fua: bool) -> Result<Handle> {
        self.check(Command::Write, offset, data.len() as u64, fua)?;
        self.submit(
            Command::Write,
            if fua { cmd_flags::FUA } else { 0 },
            offset,
            data.len() as u32,
            Payload::Bytes(data),
            None,
        )
    }

    /// Start a write at `offset` of the memory `iov` describes, sent with the request header
    /// in one `writev` (no buffer in between); with `fua`, durable before its reply.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for reads of its length until this call returns
    /// (the data is sent before it returns).
    pub unsafe fn submit_write_from(
        &self,
        offset: u64,
        iov: &[libc::iovec],
        fua: bool,
    ) -> Result<Handle> {
        let length = iov_len(iov)?;
        self.check(Command::Write, offset, length.into(), fua)?;
        self.submit(
            Command::Write,
            if fua { cmd_flags::FUA } else { 0 },
            offset,
            length,
            Payload::Iov(iov),
            None,
        )
    }

    /// Start a flush.
    pub fn submit_flush(&self) -> Result<Handle> {
        self.check(Command::Flush, 0, 0, false)?;
        self.submit(Command::Flush, 0, 0, 0, Payload::None, None)
    }

    /// Start a trim of `length` bytes at `offset`.
    pub fn submit_trim(&self, offset: u64, length: u32, fua: bool) -> Result<Handle> {
        self.check(Command::Trim, offset, length.into(), fua)?;
        self.submit(
            Command::Trim,
            if fua { cmd_flags::FUA } else { 0 },
            offset,
            length,
            Payload::None,
            None,
        )
    }

    /// Start writing zeroes to `length` bytes at `offset` (`no_hole`: keep them allocated).
    pub fn submit_write_zeroes(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
    ) -> Result<Handle> {
        self.check(Command::WriteZeroes, offset, length.into(), fua)?;
        let mut f = 0;
        if fua {
            f |= cmd_flags::FUA;
        }
        if no_hole {
            f |= cmd_flags::NO_HOLE;
        }
        self.submit(Command::WriteZeroes, f, offset, length, Payload::None, None)
    }

    /// Wait for one request; returns the data of a read, an empty vector otherwise.
    pub fn wait(&self, handle: Handle) -> Outcome {
        let inner = &*self.inner;
        let mut s = inner.state();
        loop {
            if let Some(r) = s.done.remove(&handle.0) {
                inner.cv.notify_all();
                return r;
            }
            let Some(p) = s.pending.get(&handle.0) else {
                return Err(Error::Invalid(format!("{handle:?} is not in flight")));
            };
            // Given up on only when the reader is not writing into its memory (the reader
            // stops at once: the dead connection's socket is shut down).
            if !p.receiving {
                if let Some(why) = s.dead.clone() {
                    s.pending.remove(&handle.0);
                    return Err(Error::Disconnected(why));
                }
            }
            s = inner.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Wait for whichever request completes first. Meant for one submitting thread: with
    /// several, it may return a completion another thread is waiting for.
    pub fn wait_any(&self) -> Result<(Handle, Outcome)> {
        let inner = &*self.inner;
        let mut s = inner.state();
        loop {
            if let Some(&h) = s.done.keys().next() {
                let r = s.done.remove(&h).unwrap_or_else(|| Ok(Vec::new()));
                inner.cv.notify_all();
                return Ok((Handle(h), r));
            }
            if s.pending.is_empty() {
                return Err(Error::Invalid("no request in flight".into()));
            }
            if let Some(why) = &s.dead {
                let why = why.clone();
                // Not one whose memory the reader is still writing into (see `wait`).
                if let Some(&h) = s.pending.iter().find(|(_, p)| !p.receiving).map(|(h, _)| h) {
                    s.pending.remove(&h);
                    return Ok((Handle(h), Err(Error::Disconnected(why))));
                }
            }
            s = inner.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn window(&self) -> usize {
        (self.inner.max_in_flight / 2).clamp(1, 16)
    }

    /// Read `buf.len()` bytes at `offset` (split and pipelined as needed).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(Command::Read, offset, buf.len() as u64, false)
            .or_else(|e| match e {
                Error::Invalid(_) if proto::in_range(offset, buf.len() as u64, self.size()) => {
                    Ok(())
                }
                e => Err(e),
            })?;
        let max = self.inner.info.max_payload as usize;
        let mut q: VecDeque<(Handle, usize, usize)> = VecDeque::new();
        let mut pos = 0;
        let mut first_err = None;
        while pos < buf.len() || !q.is_empty() {
            if pos < buf.len() && q.len() < self.window() && first_err.is_none() {
                let n = (buf.len() - pos).min(max);
                match self.submit_read(offset + pos as u64, n as u32) {
                    Ok(h) => q.push_back((h, pos, n)),
                    Err(e) => first_err = Some(e),
                }
                pos += n;
                continue;
            }
            let Some((h, at, n)) = q.pop_front() else {
                break;
            };
            match self.wait(h) {
                Ok(d) if d.len() == n => buf[at..at + n].copy_from_slice(&d),
                Ok(_) => first_err = first_err.or(Some(Error::Protocol("short read".into()))),
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn write_inner(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        if !proto::in_range(offset, buf.len() as u64, self.size()) {
            return self.check(Command::Write, offset, buf.len() as u64, fua);
        }
        let max = self.inner.info.max_payload as usize;
        let mut q: VecDeque<Handle> = VecDeque::new();
        let mut first_err = None;
        let mut chunks = buf.chunks(max.max(1)).enumerate();
        loop {
            if q.len() < self.window() && first_err.is_none() {
                if let Some((i, c)) = chunks.next() {
                    match self.submit_write(offset + (i * max) as u64, c, fua) {
                        Ok(h) => q.push_back(h),
                        Err(e) => first_err = Some(e),
                    }
                    continue;
                }
            }
            let Some(h) = q.pop_front() else { break };
            if let Err(e) = self.wait(h) {
                first_err = first_err.or(Some(e));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Write `buf` at `offset` (split and pipelined as needed).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_inner(buf, offset, false)
    }

    /// Write `buf` at `offset` with FUA: durable when this returns.
    pub fn write_at_fua(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_inner(buf, offset, true)
    }

    /// Flush completed writes to stable storage.
    pub fn flush(&self) -> Result<()> {
        let h = self.submit_flush()?;
        self.wait(h).map(drop)
    }

    /// Trim `length` bytes at `offset`.
    pub fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.ranged(Command::Trim, offset, length)
    }

    /// Write zeroes to `length` bytes at `offset` (allowing holes).
    pub fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        self.ranged(Command::WriteZeroes, offset, length)
    }

    fn ranged(&self, command: Command, offset: u64, length: u64) -> Result<()> {
        const STEP: u64 = 1 << 30;
        if !proto::in_range(offset, length, self.size()) {
            return self.check(command, offset, length, false);
        }
        let mut done = 0;
        while done < length {
            let n = (length - done).min(STEP) as u32;
            let h = match command {
                Command::Trim => self.submit_trim(offset + done, n, false)?,
                _ => self.submit_write_zeroes(offset + done, n, false, false)?,
            };
            self.wait(h)?;
            done += u64::from(n);
        }
        Ok(())
    }

    /// Send `NBD_CMD_DISC` after waiting for requests in flight, and close.
    pub fn disconnect(mut self) -> Result<()> {
        self.close()
    }

    fn close(&mut self) -> Result<()> {
        let Some(reader) = self.reader.take() else {
            return Ok(());
        };
        let inner = &*self.inner;
        {
            let mut s = inner.state();
            while !s.pending.is_empty() && s.dead.is_none() {
                s = inner.cv.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        }
        let disc = RequestHeader {
            flags: 0,
            typ: Command::Disc.to_wire(),
            handle: u64::MAX,
            offset: 0,
            length: 0,
        };
        let res = {
            let mut w = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            w.write_all(&disc.encode()).and_then(|()| w.flush())
        };
        inner.kill("disconnected by us".into());
        let _ = reader.join();
        res.map_err(Error::Io)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// The reader thread: match replies to requests until the connection ends.
fn receive(inner: &Inner, mut r: Box<dyn Sock>) -> Result<()> {
    loop {
        let mut hb = [0u8; SIMPLE_REPLY_LEN];
        match r.read_exact(&mut hb) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(Error::Io(e)),
        }
        let reply = match SimpleReply::decode(&hb) {
            Ok(rp) => rp,
            Err(STRUCTURED_REPLY_MAGIC) => {
                return Err(Error::Protocol(
                    "structured reply, which we did not negotiate".into(),
                ))
            }
            Err(m) => return Err(Error::Protocol(format!("bad reply magic {m:#x}"))),
        };
        // The entry stays pending until its outcome is in `done` (one lock), so a waiter
        // never sees it in neither. A read into the caller's memory is marked `receiving`
        // meanwhile, so that no waiter gives it up while its memory is being written.
        let (command, offset, length, into) = {
            let mut s = inner.state();
            let Some(p) = s.pending.get_mut(&reply.handle) else {
                return Err(Error::Protocol(format!(
                    "reply to handle {:#x}, which is not in flight",
                    reply.handle
                )));
            };
            // Taken out of the entry (not copied): only this thread writes into it, and the
            // mark says that it does.
            let into = match p.into.take() {
                Some(iov) if reply.error == 0 => {
                    p.receiving = true;
                    Some(iov)
                }
                _ => None,
            };
            (p.command, p.offset, p.length, into)
        };
        let outcome = if reply.error != 0 {
            Err(Error::Request {
                command,
                offset,
                length,
                errno: Errno(reply.error),
            })
        } else if command == Command::Read {
            match into {
                Some(mut iov) => {
                    // SAFETY: the caller of `submit_read_into` vouched that this memory is
                    // writable until the request's outcome is returned, which cannot happen
                    // while it is marked `receiving`; the iovecs add up to `length`.
                    let got = unsafe { transfer_all(r.as_fd(), &mut iov.0, Dir::Read) };
                    if let Err(e) = got {
                        let mut s = inner.state();
                        if let Some(p) = s.pending.get_mut(&reply.handle) {
                            p.receiving = false;
                        }
                        drop(s);
                        inner.cv.notify_all();
                        return Err(Error::Io(e));
                    }
                    Ok(Vec::new())
                }
                None => {
                    let mut d = vec![0u8; length as usize];
                    if let Err(e) = r.read_exact(&mut d) {
                        return Err(Error::Io(e));
                    }
                    Ok(d)
                }
            }
        } else {
            Ok(Vec::new())
        };
        let mut s = inner.state();
        s.pending.remove(&reply.handle);
        s.done.insert(reply.handle, outcome);
        drop(s);
        inner.cv.notify_all();
    }
}

/// The total length of `iov`, which must fit a request.
fn iov_len(iov: &[libc::iovec]) -> Result<u32> {
    iov.iter()
        .try_fold(0usize, |n, v| n.checked_add(v.iov_len))
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| Error::Invalid("the iovecs add up to more than 4 GiB".into()))
}

#[derive(Clone, Copy)]
enum Dir {
    Read,
    Write,
}

/// Reads into, or writes from, all of the memory `iov` describes (`iov` is consumed).
///
/// # Safety
/// Every iovec must describe memory valid for that access, of its length, for this call.
unsafe fn transfer_all(fd: BorrowedFd<'_>, iov: &mut [libc::iovec], dir: Dir) -> io::Result<()> {
    let mut first = 0;
    loop {
        while iov.get(first).is_some_and(|v| v.iov_len == 0) {
            first += 1;
        }
        let Some(rest) = iov.get(first..).filter(|r| !r.is_empty()) else {
            return Ok(());
        };
        let n = rest.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        let done = match dir {
            // SAFETY: the caller vouched for the memory; `rest` holds at least `n` iovecs.
            Dir::Read => unsafe { libc::readv(fd.as_raw_fd(), rest.as_ptr(), n) },
            // SAFETY: as above.
            Dir::Write => unsafe { libc::writev(fd.as_raw_fd(), rest.as_ptr(), n) },
        };
        if done < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if done == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed in the middle of a request's data",
            ));
        }
        // Skip what was transferred.
        let mut n = done as usize;
        while n > 0 {
            let Some(v) = iov.get_mut(first) else { break };
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: `n` < the iovec's length: still inside the memory it describes.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
}

fn opt_name(o: u32) -> &'static str {
    match o {
        opt::GO => "NBD_OPT_GO",
        opt::INFO => "NBD_OPT_INFO",
        opt::EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        _ => "an option",
    }
}

fn rep_name(r: u32) -> &'static str {
    match r {
        rep::ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        rep::ERR_POLICY => "NBD_REP_ERR_POLICY (the server's policy forbids it)",
        rep::ERR_INVALID => "NBD_REP_ERR_INVALID",
        rep::ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        rep::ERR_TLS_REQD => {
            "NBD_REP_ERR_TLS_REQD (the server requires TLS, which this client lacks)"
        }
        rep::ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN (no such export: check the export name)",
        rep::ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        rep::ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        rep::ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        _ => "an unknown error reply",
    }
}

fn negotiate<R: Read, W: Write>(r: &mut R, w: &mut W, export: &str) -> Result<ExportInfo> {
    let mut b8 = [0u8; 8];
    r.read_exact(&mut b8)?;
    if u64::from_be_bytes(b8) != NBD_MAGIC {
        return Err(Error::Protocol("not an NBD server (no NBDMAGIC)".into()));
    }
    r.read_exact(&mut b8)?;
    match u64::from_be_bytes(b8) {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => return Err(Error::Oldstyle),
        m => return Err(Error::Protocol(format!("unknown negotiation magic {m:#x}"))),
    }
    let mut b2 = [0u8; 2];
    r.read_exact(&mut b2)?;
    let hflags = u16::from_be_bytes(b2);
    let fixed = hflags & handshake::FIXED_NEWSTYLE != 0;
    let no_zeroes = hflags & handshake::NO_ZEROES != 0;
    let mut cflags = 0;
    if fixed {
        cflags |= client_flags::FIXED_NEWSTYLE;
    }
    if no_zeroes {
        cflags |= client_flags::NO_ZEROES;
    }
    w.write_all(&cflags.to_be_bytes())?;
    if export.len() > proto::MAX_NAME_LEN {
        return Err(Error::Invalid("export name longer than 4096 bytes".into()));
    }
    if fixed {
        if let Some(info) = go(r, w, export)? {
            return Ok(info);
        }
        tracing::debug!("server lacks NBD_OPT_GO; falling back to NBD_OPT_EXPORT_NAME");
    }
    send_option(w, opt::EXPORT_NAME, export.as_bytes())?;
    let mut b = [0u8; 10];
    r.read_exact(&mut b).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::OptionRefused {
            option: "NBD_OPT_EXPORT_NAME",
            reply: "connection closed (no such export: check the export name)",
            message: String::new(),
        },
        _ => Error::Io(e),
    })?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        r.read_exact(&mut z)?;
    }
    Ok(export_info(be64(&b[0..8]), be16(&b[8..10]), None))
}

fn export_info(size: u64, flags: u16, block: Option<(u32, u32, u32)>) -> ExportInfo {
    let flags = if flags & tflags::HAS_FLAGS != 0 {
        flags
    } else {
        0
    };
    let (min, pref, max) = block.unwrap_or((1, 4096, MAX_PAYLOAD));
    ExportInfo {
        size,
        flags,
        min_block: min.max(1),
        preferred_block: pref.max(1),
        max_payload: max.clamp(1, MAX_PAYLOAD),
    }
}

fn send_option<W: Write>(w: &mut W, option: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&option.to_be_bytes())?;
    w.write_all(&(data.len() as u32).to_be_bytes())?;
    w.write_all(data)?;
    w.flush()
}

/// `NBD_OPT_GO`; `Ok(None)` if the server does not support it.
fn go<R: Read, W: Write>(r: &mut R, w: &mut W, export: &str) -> Result<Option<ExportInfo>> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    send_option(w, opt::GO, &d)?;
    let mut exp = None;
    let mut block = None;
    for _ in 0..256 {
        let mut h = [0u8; 20];
        r.read_exact(&mut h)?;
        if be64(&h[0..8]) != OPT_REPLY_MAGIC {
            return Err(Error::Protocol("bad option reply magic".into()));
        }
        let option = be32(&h[8..12]);
        let typ = be32(&h[12..16]);
        let len = be32(&h[16..20]);
        if option != opt::GO {
            return Err(Error::Protocol(format!(
                "reply to option {option} while waiting for NBD_OPT_GO"
            )));
        }
        if len > MAX_OPTION_LEN {
            return Err(Error::Protocol(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        match typ {
            rep::ACK => {
                let Some((size, flags)) = exp else {
                    return Err(Error::Protocol(
                        "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into(),
                    ));
                };
                return Ok(Some(export_info(size, flags, block)));
            }
            rep::INFO if data.len() >= 2 => match (be16(&data[0..2]), data.len()) {
                (info::EXPORT, 12) => exp = Some((be64(&data[2..10]), be16(&data[10..12]))),
                (info::BLOCK_SIZE, 14) => {
                    block = Some((be32(&data[2..6]), be32(&data[6..10]), be32(&data[10..14])))
                }
                (info::EXPORT | info::BLOCK_SIZE, n) => {
                    return Err(Error::Protocol(format!("NBD_REP_INFO of bad length {n}")))
                }
                _ => {}
            },
            rep::ERR_UNSUP => return Ok(None),
            t if t & rep::FLAG_ERROR != 0 => {
                return Err(Error::OptionRefused {
                    option: opt_name(option),
                    reply: rep_name(t),
                    message: String::from_utf8_lossy(&data).into_owned(),
                })
            }
            t => {
                return Err(Error::Protocol(format!(
                    "unexpected reply type {t:#x} to NBD_OPT_GO"
                )))
            }
        }
    }
    Err(Error::Protocol("too many replies to NBD_OPT_GO".into()))
}
