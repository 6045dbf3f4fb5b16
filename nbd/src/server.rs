//! The NBD server: fixed newstyle negotiation, then a reader thread that validates and submits
//! requests and a writer thread that sends replies in completion order, per connection.

use crate::export::{AsyncBlockExport, BlockExport, Completion, Outgoing, Request, Threaded};
use crate::proto::{
    self, be16, be32, be64, client_flags, cmd_flags, handshake, info, opt, rep, Command, Errno,
    RequestHeader, IHAVEOPT, MAX_NAME_LEN, MAX_OPTION_LEN, MAX_PAYLOAD, NBD_MAGIC, OPT_REPLY_MAGIC,
    REQUEST_LEN,
};
use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// What can go wrong running a server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listening socket could not be created.
    #[error("cannot listen on {addr}: {source} (is another server using it? remove a stale socket file or pick another address)")]
    Bind {
        /// The socket path or address.
        addr: String,
        /// The cause.
        source: io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start an NBD server thread: {0}")]
    Thread(io::Error),
}

/// A `Result` with this module's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The export's name. `None` (the default) accepts any name a client asks for; `Some(n)`
    /// accepts `n` and the default export `""` and refuses others with `NBD_REP_ERR_UNKNOWN`.
    pub export_name: Option<String>,
    /// Requests in flight per connection; the reader stops reading when this many are
    /// unanswered. Default 128.
    pub max_in_flight: usize,
    /// Preferred block size announced with `NBD_INFO_BLOCK_SIZE`. Default 4096.
    pub preferred_block_size: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            export_name: None,
            max_in_flight: 128,
            preferred_block_size: 4096,
        }
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener, SocketAddr),
}

/// One accepted connection, Unix or TCP.
trait Conn: Read + Write + Send + Sized + 'static {
    fn clone_conn(&self) -> io::Result<Self>;
    fn shut(&self);
}

impl Conn for UnixStream {
    fn clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shut(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl Conn for TcpStream {
    fn clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shut(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

/// A bound, not yet running server.
pub struct Server {
    listener: Listener,
    export: Arc<dyn AsyncBlockExport>,
    config: Arc<ServerConfig>,
    shared: Arc<Shared>,
}

/// How to close an open connection, and its thread.
type ConnEntry = (Box<dyn Fn() + Send>, Option<JoinHandle<()>>);

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, ConnEntry>>,
}

/// Export a synchronous device on a Unix socket, run by a [`Threaded`] pool, in the background.
pub fn serve_unix<E: BlockExport>(path: impl AsRef<Path>, export: Arc<E>) -> Result<ServerHandle> {
    let threaded = Threaded::new(export, crate::export::DEFAULT_WORKERS).map_err(Error::Thread)?;
    Server::bind_unix(path, Arc::new(threaded))?.spawn()
}

impl Server {
    /// Listen on a Unix socket. A stale socket file nobody listens on is replaced.
    pub fn bind_unix(path: impl AsRef<Path>, export: Arc<dyn AsyncBlockExport>) -> Result<Server> {
        let path = path.as_ref().to_path_buf();
        let bind_err = |source| Error::Bind {
            addr: path.display().to_string(),
            source,
        };
        if path.exists() && UnixStream::connect(&path).is_err() {
            std::fs::remove_file(&path).map_err(bind_err)?;
        }
        let l = UnixListener::bind(&path).map_err(bind_err)?;
        Ok(Server::new(Listener::Unix(l, path), export))
    }

    /// Listen on a TCP address (port 0 picks a free port; see [`Server::local_addr`]).
    pub fn bind_tcp(addr: &str, export: Arc<dyn AsyncBlockExport>) -> Result<Server> {
        let bind_err = |source| Error::Bind {
            addr: addr.to_string(),
            source,
        };
        let l = TcpListener::bind(addr).map_err(bind_err)?;
        let a = l.local_addr().map_err(bind_err)?;
        Ok(Server::new(Listener::Tcp(l, a), export))
    }

    fn new(listener: Listener, export: Arc<dyn AsyncBlockExport>) -> Server {
        Server {
            listener,
            export,
            config: Arc::new(ServerConfig::default()),
            shared: Arc::new(Shared::default()),
        }
    }

    /// Replace the settings.
    pub fn with_config(mut self, config: ServerConfig) -> Server {
        self.config = Arc::new(config);
        self
    }

    /// The TCP address listened on, if TCP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.listener {
            Listener::Tcp(_, a) => Some(*a),
            Listener::Unix(..) => None,
        }
    }

    /// Accept connections until [`ServerHandle::shutdown`] (forever, if called directly); each
    /// connection gets its own threads, and a failing connection never stops the others.
    pub fn run(self) {
        loop {
            let accepted = match &self.listener {
                Listener::Unix(l, _) => l.accept().map(|(s, _)| self.start(s)),
                Listener::Tcp(l, _) => l.accept().map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    self.start(s)
                }),
            };
            if self.shared.stop.load(Ordering::SeqCst) {
                return;
            }
            if let Err(e) = accepted {
                tracing::warn!("NBD accept failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }

    fn start<S: Conn>(&self, stream: S) {
        if self.shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let shut: Box<dyn Fn() + Send> = match stream.clone_conn() {
            Ok(s) => Box::new(move || s.shut()),
            Err(e) => {
                tracing::warn!("NBD connection {id}: cannot clone the socket: {e}");
                return;
            }
        };
        let export = Arc::clone(&self.export);
        let config = Arc::clone(&self.config);
        let shared = Arc::clone(&self.shared);
        let mut conns = match self.shared.conns.lock() {
            Ok(c) => c,
            Err(_) => return,
        };
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                tracing::debug!("NBD connection {id}: open");
                if let Err(e) = connection(stream, &*export, &config) {
                    tracing::info!("NBD connection {id}: closed: {e}");
                } else {
                    tracing::debug!("NBD connection {id}: closed");
                }
                if let Ok(mut c) = shared.conns.lock() {
                    c.remove(&id);
                }
            });
        match spawned {
            Ok(h) => {
                conns.insert(id, (shut, Some(h)));
            }
            Err(e) => tracing::warn!("NBD connection {id}: cannot start its thread: {e}"),
        }
    }

    /// Run in a background thread.
    pub fn spawn(self) -> Result<ServerHandle> {
        let shared = Arc::clone(&self.shared);
        let wake = match &self.listener {
            Listener::Unix(_, p) => Wake::Unix(p.clone()),
            Listener::Tcp(_, a) => Wake::Tcp(*a),
        };
        let thread = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || self.run())
            .map_err(Error::Thread)?;
        Ok(ServerHandle {
            shared,
            wake,
            thread: Some(thread),
        })
    }
}

enum Wake {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// A server running in the background; [`shutdown`](ServerHandle::shutdown) (or drop) stops
/// accepting, disconnects every client and removes the Unix socket file.
pub struct ServerHandle {
    shared: Arc<Shared>,
    wake: Wake,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// The Unix socket path, if any.
    pub fn socket_path(&self) -> Option<&Path> {
        match &self.wake {
            Wake::Unix(p) => Some(p),
            Wake::Tcp(_) => None,
        }
    }

    /// The TCP address, if any.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.wake {
            Wake::Tcp(a) => Some(*a),
            Wake::Unix(_) => None,
        }
    }

    /// Number of connections currently open.
    pub fn connections(&self) -> usize {
        self.shared.conns.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// Stop: no new connections, close the open ones, wait for their threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        match &self.wake {
            Wake::Unix(p) => {
                let _ = UnixStream::connect(p);
            }
            Wake::Tcp(a) => {
                let _ = TcpStream::connect(a);
            }
        }
        let _ = thread.join();
        let handles: Vec<JoinHandle<()>> = match self.shared.conns.lock() {
            Ok(mut c) => c
                .values_mut()
                .filter_map(|(shut, h)| {
                    shut();
                    h.take()
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        for h in handles {
            let _ = h.join();
        }
        if let Wake::Unix(p) = &self.wake {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Why a connection ended other than by a clean `NBD_CMD_DISC` or EOF.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The socket failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol; the connection is dropped, the server goes on.
    #[error("client protocol violation: {0}")]
    Protocol(String),
}

fn violation<T>(what: impl Into<String>) -> std::result::Result<T, ConnError> {
    Err(ConnError::Protocol(what.into()))
}

/// Serve one connection: negotiate, then transmit until the client leaves.
fn connection<S: Conn>(
    stream: S,
    export: &dyn AsyncBlockExport,
    config: &ServerConfig,
) -> std::result::Result<(), ConnError> {
    let shut = stream.clone_conn()?;
    let mut w = BufWriter::new(stream.clone_conn()?);
    let mut r = BufReader::new(stream);
    let result = match negotiate(&mut r, &mut w, export, config)? {
        None => Ok(()),
        Some(()) => {
            let w = w.into_inner().map_err(|e| e.into_error())?;
            transmission(r, w, export, config)
        }
    };
    shut.shut();
    result
}

fn opt_reply<W: Write>(w: &mut W, option: u32, typ: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&OPT_REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&option.to_be_bytes())?;
    w.write_all(&typ.to_be_bytes())?;
    w.write_all(&(data.len() as u32).to_be_bytes())?;
    w.write_all(data)
}

fn name_ok(config: &ServerConfig, name: &[u8]) -> bool {
    match &config.export_name {
        None => true,
        Some(n) => name.is_empty() || name == n.as_bytes(),
    }
}

/// The fixed newstyle handshake. `Ok(Some(()))`: go to transmission; `Ok(None)`: the client
/// aborted.
fn negotiate<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    export: &dyn AsyncBlockExport,
    config: &ServerConfig,
) -> std::result::Result<Option<()>, ConnError> {
    w.write_all(&NBD_MAGIC.to_be_bytes())?;
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&(handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES).to_be_bytes())?;
    w.flush()?;
    let mut b4 = [0u8; 4];
    r.read_exact(&mut b4)?;
    let cflags = u32::from_be_bytes(b4);
    if cflags & !(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES) != 0 {
        return violation(format!("unknown client flags {cflags:#x}"));
    }
    let fixed = cflags & client_flags::FIXED_NEWSTYLE != 0;
    let no_zeroes = cflags & client_flags::NO_ZEROES != 0;
    let size = export.size();
    let tflags = export.flags().to_wire();
    // Bound the negotiation: a client cannot keep us here forever.
    for _ in 0..1024 {
        let mut h = [0u8; 16];
        r.read_exact(&mut h)?;
        if be64(&h[0..8]) != IHAVEOPT {
            return violation("bad option magic");
        }
        let option = be32(&h[8..12]);
        let len = be32(&h[12..16]);
        if len > MAX_OPTION_LEN {
            return violation(format!(
                "option {option} of {len} bytes exceeds {MAX_OPTION_LEN}"
            ));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        tracing::trace!(option, len, "NBD option");
        if !fixed && option != opt::EXPORT_NAME {
            return violation(format!("option {option} from a non-fixed-newstyle client"));
        }
        match option {
            opt::EXPORT_NAME => {
                if !name_ok(config, &data) {
                    return violation(format!(
                        "unknown export {:?}",
                        String::from_utf8_lossy(&data)
                    ));
                }
                w.write_all(&size.to_be_bytes())?;
                w.write_all(&tflags.to_be_bytes())?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124])?;
                }
                w.flush()?;
                return Ok(Some(()));
            }
            opt::ABORT => {
                let _ = opt_reply(w, option, rep::ACK, &[]).and_then(|()| w.flush());
                return Ok(None);
            }
            opt::LIST => {
                if !data.is_empty() {
                    opt_reply(w, option, rep::ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                } else {
                    let name = config.export_name.as_deref().unwrap_or("");
                    let mut d = (name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    opt_reply(w, option, rep::SERVER, &d)?;
                    opt_reply(w, option, rep::ACK, &[])?;
                }
            }
            opt::INFO | opt::GO => match parse_info_request(&data) {
                Err(why) => opt_reply(w, option, rep::ERR_INVALID, why.as_bytes())?,
                Ok((name, _)) if !name_ok(config, name) => {
                    opt_reply(w, option, rep::ERR_UNKNOWN, b"no such export")?
                }
                Ok((_, requests)) => {
                    let mut d = info::EXPORT.to_be_bytes().to_vec();
                    d.extend_from_slice(&size.to_be_bytes());
                    d.extend_from_slice(&tflags.to_be_bytes());
                    opt_reply(w, option, rep::INFO, &d)?;
                    if requests.contains(&info::BLOCK_SIZE) {
                        let mut d = info::BLOCK_SIZE.to_be_bytes().to_vec();
                        d.extend_from_slice(&1u32.to_be_bytes());
                        d.extend_from_slice(&config.preferred_block_size.to_be_bytes());
                        d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                        opt_reply(w, option, rep::INFO, &d)?;
                    }
                    opt_reply(w, option, rep::ACK, &[])?;
                    if option == opt::GO {
                        w.flush()?;
                        return Ok(Some(()));
                    }
                }
            },
            _ => opt_reply(w, option, rep::ERR_UNSUP, b"option not supported")?,
        }
        w.flush()?;
    }
    violation("more than 1024 options")
}

/// Parse `NBD_OPT_INFO`/`GO` data: name and the information types requested.
fn parse_info_request(data: &[u8]) -> std::result::Result<(&[u8], Vec<u16>), &'static str> {
    if data.len() < 6 {
        return Err("NBD_OPT_GO/INFO data shorter than 6 bytes");
    }
    let nlen = be32(&data[0..4]) as usize;
    if nlen > MAX_NAME_LEN || nlen > data.len() - 6 {
        return Err("export name length out of bounds");
    }
    let name = &data[4..4 + nlen];
    let rest = &data[4 + nlen..];
    let n = be16(&rest[0..2]) as usize;
    let reqs = &rest[2..];
    if reqs.len() != n * 2 {
        return Err("information request count does not match the option length");
    }
    Ok((name, reqs.chunks_exact(2).map(be16).collect()))
}

fn transmission<R: Read, S: Conn>(
    mut r: R,
    w: S,
    export: &dyn AsyncBlockExport,
    config: &ServerConfig,
) -> std::result::Result<(), ConnError> {
    let (reply_tx, reply_rx) = channel::<Outgoing>();
    let (slot_tx, slot_rx) = sync_channel::<()>(config.max_in_flight.max(1));
    let shut = w.clone_conn()?;
    let writer = std::thread::Builder::new()
        .name("nbd-reply".into())
        .spawn(move || writer(w, reply_rx, slot_rx))?;
    let size = export.size();
    let flags = export.flags();
    let mut result = Ok(());
    loop {
        let mut hb = [0u8; REQUEST_LEN];
        match r.read_exact(&mut hb) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => {
                result = Err(e.into());
                break;
            }
        }
        let Some(h) = RequestHeader::decode(&hb) else {
            result = violation("bad request magic");
            break;
        };
        // One slot per request, freed when its reply is written: bounds what we hold.
        if slot_tx.send(()).is_err() {
            break;
        }
        let done = |read_len| Completion::new(h.handle, read_len, reply_tx.clone());
        let Some(cmd) = Command::from_wire(h.typ) else {
            tracing::debug!(typ = h.typ, "unknown NBD command");
            done(None).fail(Errno::EINVAL);
            continue;
        };
        let mut data = Vec::new();
        if cmd == Command::Write {
            if h.length > MAX_PAYLOAD {
                result = violation(format!(
                    "write of {} bytes exceeds the {MAX_PAYLOAD}-byte bound",
                    h.length
                ));
                break;
            }
            data = vec![0u8; h.length as usize];
            if let Err(e) = r.read_exact(&mut data) {
                result = Err(e.into());
                break;
            }
        }
        if cmd == Command::Disc {
            break;
        }
        match validate(&h, cmd, size, flags) {
            Err(errno) => {
                tracing::debug!(%cmd, offset = h.offset, length = h.length, %errno, "request refused");
                done(None).fail(errno);
            }
            Ok(()) => {
                let read_len = (cmd == Command::Read).then_some(h.length);
                export.submit(
                    Request {
                        command: cmd,
                        offset: h.offset,
                        length: h.length,
                        fua: h.flags & cmd_flags::FUA != 0,
                        no_hole: h.flags & cmd_flags::NO_HOLE != 0,
                        data,
                    },
                    done(read_len),
                );
            }
        }
    }
    // Outstanding requests are answered before the connection closes (NBD_CMD_DISC semantics);
    // on a protocol violation the socket is shut at once.
    if result.is_err() {
        shut.shut();
    }
    drop(reply_tx);
    drop(slot_tx);
    let _ = writer.join();
    result
}

fn validate(
    h: &RequestHeader,
    cmd: Command,
    size: u64,
    flags: crate::export::ExportFlags,
) -> std::result::Result<(), Errno> {
    if h.flags & !cmd.allowed_flags() != 0 {
        return Err(Errno::EINVAL);
    }
    if h.flags & cmd_flags::FUA != 0 && !flags.fua {
        return Err(Errno::EINVAL);
    }
    let writes = matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes);
    if writes && flags.read_only {
        return Err(Errno::EPERM);
    }
    match cmd {
        Command::Read if h.length > MAX_PAYLOAD => return Err(Errno::EINVAL),
        Command::Flush if !flags.flush => return Err(Errno::EINVAL),
        Command::Flush => return Ok(()),
        Command::Trim if !flags.trim => return Err(Errno::EINVAL),
        Command::WriteZeroes if !flags.write_zeroes => return Err(Errno::EINVAL),
        _ => {}
    }
    if !proto::in_range(h.offset, u64::from(h.length), size) {
        // The spec asks for ENOSPC on writes past the end, EINVAL otherwise.
        return Err(match cmd {
            Command::Write | Command::WriteZeroes => Errno::ENOSPC,
            _ => Errno::EINVAL,
        });
    }
    Ok(())
}

fn writer<S: Write>(w: S, replies: Receiver<Outgoing>, slots: Receiver<()>) {
    let mut w = BufWriter::with_capacity(256 << 10, w);
    let mut failed = false;
    let mut next = replies.recv().ok();
    while let Some(out) = next {
        if !failed {
            let res = w.write_all(&out.reply.encode()).and_then(|()| {
                if out.reply.error == 0 {
                    w.write_all(&out.data)
                } else {
                    Ok(())
                }
            });
            if let Err(e) = res {
                tracing::debug!("NBD reply not sent: {e}");
                failed = true;
            }
        }
        let _ = slots.try_recv();
        next = match replies.try_recv() {
            Ok(o) => Some(o),
            Err(TryRecvError::Empty) => {
                if !failed && w.flush().is_err() {
                    failed = true;
                }
                replies.recv().ok()
            }
            Err(TryRecvError::Disconnected) => None,
        };
    }
    let _ = w.flush();
}
