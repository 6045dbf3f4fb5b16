//! The xenstore client: one connection over any byte stream, usable from several threads.
//!
//! A reader thread demultiplexes replies by `req_id` and routes `WATCH_EVENT` messages by token
//! to each watch's **bounded** channel (events that do not fit are dropped and counted: an event
//! is a hint to re-read state, XSA-349).

use crate::error::{Error, Result};
use crate::wire::{self, Errno, MsgType, Perm, PAYLOAD_MAX};
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Default capacity of a watch's event channel.
pub const DEFAULT_WATCH_CAPACITY: usize = 64;
/// How many times [`Client::transaction`] retries a conflicting transaction.
pub const TRANSACTION_ATTEMPTS: u32 = 64;

type Reply = std::result::Result<(u32, Vec<u8>), String>;

struct Inner {
    writer: Mutex<Box<dyn Write + Send>>,
    pending: Mutex<HashMap<u32, SyncSender<Reply>>>,
    watches: Mutex<HashMap<String, WatchSlot>>,
    next_req: AtomicU32,
    next_token: AtomicU64,
    dead: Mutex<Option<String>>,
    on_drop: Option<Box<dyn Fn() + Send + Sync>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Wakes the reader thread (blocked in read) so that it exits.
        if let Some(f) = &self.on_drop {
            f();
        }
    }
}

struct WatchSlot {
    tx: SyncSender<WatchEvent>,
    dropped: Arc<AtomicU64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection to xenstore. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

/// One watch event: the path that changed and the token of the watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// The node that changed (relative if the watch was registered with a relative path).
    pub path: String,
    /// The watch token.
    pub token: String,
}

/// A registered watch. Events arrive on [`Watch::events`]; dropping it unregisters the watch.
pub struct Watch {
    client: Client,
    path: String,
    token: String,
    rx: Receiver<WatchEvent>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("path", &self.path)
            .field("token", &self.token)
            .finish()
    }
}

impl Watch {
    /// The channel of events (bounded).
    pub fn events(&self) -> &Receiver<WatchEvent> {
        &self.rx
    }

    /// Waits for the next event, at most `timeout`.
    pub fn next_timeout(&self, timeout: Duration) -> Result<WatchEvent> {
        match self.rx.recv_timeout(timeout) {
            Ok(e) => Ok(e),
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout {
                what: format!("a watch event on {}", self.path),
                timeout,
            }),
            Err(RecvTimeoutError::Disconnected) => {
                Err(Error::Disconnected(self.client.death_reason()))
            }
        }
    }

    /// Events dropped because the channel was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The watched path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The token.
    pub fn token(&self) -> &str {
        &self.token
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        lock(&self.client.inner.watches).remove(&self.token);
        if lock(&self.client.inner.dead).is_none() {
            let payload = wire::join_strings(&[&self.path, &self.token]);
            let _ = self.client.call(MsgType::Unwatch, 0, &payload, &self.path);
        }
    }
}

fn op_name(ty: MsgType) -> &'static str {
    match ty {
        MsgType::Directory => "DIRECTORY",
        MsgType::Read => "READ",
        MsgType::GetPerms => "GET_PERMS",
        MsgType::Watch => "WATCH",
        MsgType::Unwatch => "UNWATCH",
        MsgType::TransactionStart => "TRANSACTION_START",
        MsgType::TransactionEnd => "TRANSACTION_END",
        MsgType::GetDomainPath => "GET_DOMAIN_PATH",
        MsgType::Write => "WRITE",
        MsgType::Mkdir => "MKDIR",
        MsgType::Rm => "RM",
        MsgType::SetPerms => "SET_PERMS",
        MsgType::Introduce => "INTRODUCE",
        MsgType::Release => "RELEASE",
        MsgType::IsDomainIntroduced => "IS_DOMAIN_INTRODUCED",
        MsgType::ResetWatches => "RESET_WATCHES",
        _ => "REQUEST",
    }
}

impl Client {
    /// Opens the default xenstore as libxenstore does: `$XENSTORED_PATH` if set (a socket, or a
    /// device path), else `$XENSTORED_RUNDIR/socket` if that variable is set, else the dom0 socket
    /// `/run/xenstored/socket`, then `/var/run/xenstored/socket`, then the guest device
    /// `/dev/xen/xenbus`.
    pub fn open() -> Result<Client> {
        if let Some(p) = std::env::var_os("XENSTORED_PATH") {
            let p = PathBuf::from(p);
            return Self::open_path(&p);
        }
        let mut last = None;
        if let Some(dir) = std::env::var_os("XENSTORED_RUNDIR") {
            match Self::connect_unix(Path::new(&dir).join("socket")) {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        for p in ["/run/xenstored/socket", "/var/run/xenstored/socket"] {
            match Self::connect_unix(p) {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        if Path::new("/dev/xen/xenbus").exists() {
            return Self::open_device("/dev/xen/xenbus");
        }
        Err(last.unwrap_or_else(|| Error::Disconnected("no xenstore found".into())))
    }

    /// Opens a socket or (if it is not a socket) a device such as `/dev/xen/xenbus`.
    pub fn open_path(path: &Path) -> Result<Client> {
        use std::os::unix::fs::FileTypeExt;
        let is_socket = std::fs::metadata(path)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(true);
        if is_socket {
            Self::connect_unix(path)
        } else {
            Self::open_device(path)
        }
    }

    /// Connects to the local platform's socket of domain `domid` under the state directory
    /// `root`: `ROOT/dom<D>/xenstore.sock`.
    pub fn connect_local(root: &Path, domid: u32) -> Result<Client> {
        Self::connect_unix(root.join(format!("dom{domid}")).join("xenstore.sock"))
    }

    /// Connects to a xenstored Unix socket.
    pub fn connect_unix(path: impl AsRef<Path>) -> Result<Client> {
        let path = path.as_ref();
        let conn_err = |source| Error::Connect {
            path: path.display().to_string(),
            source,
        };
        let s = UnixStream::connect(path).map_err(conn_err)?;
        let r = s.try_clone().map_err(conn_err)?;
        let closer = s.try_clone().map_err(conn_err)?;
        let on_drop = Box::new(move || {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        });
        Ok(Self::build(r, s, Some(on_drop)))
    }

    /// Opens a xenbus device (`/dev/xen/xenbus` in a guest).
    pub fn open_device(path: impl AsRef<Path>) -> Result<Client> {
        let path = path.as_ref();
        let conn_err = |source| Error::Connect {
            path: path.display().to_string(),
            source,
        };
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(conn_err)?;
        let r = f.try_clone().map_err(conn_err)?;
        Ok(Self::from_streams(r, f))
    }

    /// A client over any pair of stream halves (reader, writer) of one connection.
    ///
    /// The reader thread ends when the stream ends; for a [`UnixStream`] use
    /// [`Client::from_unix_stream`], which also shuts the stream down when the last clone of the
    /// client is dropped.
    pub fn from_streams(
        reader: impl Read + Send + 'static,
        writer: impl Write + Send + 'static,
    ) -> Client {
        Self::build(reader, writer, None)
    }

    /// A client over a connected Unix stream.
    pub fn from_unix_stream(s: UnixStream) -> std::io::Result<Client> {
        let r = s.try_clone()?;
        let closer = s.try_clone()?;
        let on_drop = Box::new(move || {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        });
        Ok(Self::build(r, s, Some(on_drop)))
    }

    fn build(
        reader: impl Read + Send + 'static,
        writer: impl Write + Send + 'static,
        on_drop: Option<Box<dyn Fn() + Send + Sync>>,
    ) -> Client {
        let inner = Arc::new(Inner {
            writer: Mutex::new(Box::new(writer)),
            pending: Mutex::new(HashMap::new()),
            watches: Mutex::new(HashMap::new()),
            next_req: AtomicU32::new(1),
            next_token: AtomicU64::new(1),
            dead: Mutex::new(None),
            on_drop,
        });
        let weak = Arc::downgrade(&inner);
        let spawn = std::thread::Builder::new()
            .name("xenstore-reader".into())
            .spawn(move || reader_loop(reader, weak));
        if let Err(e) = spawn {
            *lock(&inner.dead) = Some(format!("cannot start the reader thread: {e}"));
        }
        Client { inner }
    }

    fn death_reason(&self) -> String {
        lock(&self.inner.dead)
            .clone()
            .unwrap_or_else(|| "connection closed".into())
    }

    /// Sends one request and waits for its reply. Returns the reply payload.
    fn call(&self, ty: MsgType, tx: u32, payload: &[u8], what: &str) -> Result<Vec<u8>> {
        let op = op_name(ty);
        if payload.len() > PAYLOAD_MAX {
            return Err(Error::TooLong {
                op,
                path: what.into(),
                len: payload.len(),
            });
        }
        if let Some(reason) = lock(&self.inner.dead).clone() {
            return Err(Error::Disconnected(reason));
        }
        let mut req_id = self.inner.next_req.fetch_add(1, Ordering::Relaxed);
        let (rtx, rrx) = mpsc::sync_channel(1);
        {
            let mut pending = lock(&self.inner.pending);
            while req_id == 0 || pending.contains_key(&req_id) {
                req_id = self.inner.next_req.fetch_add(1, Ordering::Relaxed);
            }
            pending.insert(req_id, rtx);
        }
        let buf = wire::encode(ty as u32, req_id, tx, payload).map_err(|_| Error::TooLong {
            op,
            path: what.into(),
            len: payload.len(),
        })?;
        let written = {
            let mut w = lock(&self.inner.writer);
            w.write_all(&buf).and_then(|_| w.flush())
        };
        if let Err(e) = written {
            lock(&self.inner.pending).remove(&req_id);
            return Err(Error::Disconnected(format!("writing a {op} request: {e}")));
        }
        match rrx.recv() {
            Ok(Ok((rty, body))) => {
                if rty == MsgType::Error as u32 {
                    Err(Error::Xs {
                        op,
                        path: what.into(),
                        errno: Errno::parse(&body),
                    })
                } else if rty != ty as u32 {
                    Err(Error::Protocol {
                        op,
                        what: format!("reply of type {rty}, expected {}", ty as u32),
                    })
                } else {
                    Ok(body)
                }
            }
            Ok(Err(reason)) => Err(Error::Disconnected(reason)),
            Err(_) => Err(Error::Disconnected(self.death_reason())),
        }
    }

    /// Starts a transaction; prefer [`Client::transaction`], which retries on conflicts.
    pub fn transaction_start(&self) -> Result<Transaction<'_>> {
        let r = self.call(MsgType::TransactionStart, 0, b"\0", "")?;
        let s = std::str::from_utf8(r.strip_suffix(&[0]).unwrap_or(&r)).ok();
        let id = s
            .and_then(|s| s.parse::<u32>().ok())
            .ok_or_else(|| Error::Protocol {
                op: "TRANSACTION_START",
                what: format!(
                    "transaction id {:?} is not a number",
                    String::from_utf8_lossy(&r)
                ),
            })?;
        Ok(Transaction {
            client: self,
            id,
            done: false,
        })
    }

    /// Runs `f` in a transaction and commits it; on `EAGAIN` (a conflict, at commit or from an
    /// operation) the whole transaction is run again, up to [`TRANSACTION_ATTEMPTS`] times. If `f`
    /// fails the transaction is aborted and its error returned.
    pub fn transaction<T>(&self, mut f: impl FnMut(&Transaction<'_>) -> Result<T>) -> Result<T> {
        for _ in 0..TRANSACTION_ATTEMPTS {
            let tx = self.transaction_start()?;
            match f(&tx) {
                Ok(v) => match tx.commit() {
                    Ok(()) => return Ok(v),
                    Err(e) if e.is_again() => continue,
                    Err(e) => return Err(e),
                },
                Err(e) if e.is_again() => {
                    let _ = tx.abort();
                    continue;
                }
                Err(e) => {
                    let _ = tx.abort();
                    return Err(e);
                }
            }
        }
        Err(Error::TooManyRetries {
            attempts: TRANSACTION_ATTEMPTS,
        })
    }

    /// Watches `path` (and its descendants); the first event fires at once. The events arrive on a
    /// channel of [`DEFAULT_WATCH_CAPACITY`].
    pub fn watch(&self, path: &str) -> Result<Watch> {
        self.watch_with_capacity(path, DEFAULT_WATCH_CAPACITY)
    }

    /// As [`Client::watch`], with a channel of `capacity` events (at least 1).
    pub fn watch_with_capacity(&self, path: &str, capacity: usize) -> Result<Watch> {
        let token = format!(
            "xenpv-{}",
            self.inner.next_token.fetch_add(1, Ordering::Relaxed)
        );
        let (tx, rx) = mpsc::sync_channel(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        lock(&self.inner.watches).insert(
            token.clone(),
            WatchSlot {
                tx,
                dropped: dropped.clone(),
            },
        );
        let payload = wire::join_strings(&[path, &token]);
        if let Err(e) = self.call(MsgType::Watch, 0, &payload, path) {
            lock(&self.inner.watches).remove(&token);
            return Err(e);
        }
        Ok(Watch {
            client: self.clone(),
            path: path.into(),
            token,
            rx,
            dropped,
        })
    }

    /// The home path of a domain, as xenstored reports it (`/local/domain/<domid>`).
    pub fn get_domain_path(&self, domid: u32) -> Result<String> {
        let arg = domid.to_string();
        let r = self.call(
            MsgType::GetDomainPath,
            0,
            &wire::join_strings(&[&arg]),
            &arg,
        )?;
        string_reply("GET_DOMAIN_PATH", r)
    }

    /// Tells xenstored about a new domain (dom0 only).
    pub fn introduce(&self, domid: u32, gfn: u64, evtchn: u32) -> Result<()> {
        let args = [domid.to_string(), gfn.to_string(), evtchn.to_string()];
        self.call(MsgType::Introduce, 0, &wire::join_strings(&args), &args[0])
            .map(drop)
    }

    /// Tells xenstored a domain is gone (dom0 only).
    pub fn release(&self, domid: u32) -> Result<()> {
        let arg = domid.to_string();
        self.call(MsgType::Release, 0, &wire::join_strings(&[&arg]), &arg)
            .map(drop)
    }

    /// Whether xenstored knows domain `domid`.
    pub fn is_domain_introduced(&self, domid: u32) -> Result<bool> {
        let arg = domid.to_string();
        let r = self.call(
            MsgType::IsDomainIntroduced,
            0,
            &wire::join_strings(&[&arg]),
            &arg,
        )?;
        Ok(r.first() == Some(&b'T'))
    }
}

fn string_reply(op: &'static str, r: Vec<u8>) -> Result<String> {
    let body = r.strip_suffix(&[0]).unwrap_or(&r);
    String::from_utf8(body.to_vec()).map_err(|_| Error::Protocol {
        op,
        what: "reply is not UTF-8".into(),
    })
}

fn reader_loop(mut reader: impl Read, weak: std::sync::Weak<Inner>) {
    let reason = loop {
        let msg = wire::read_message(&mut reader);
        let Some(inner) = weak.upgrade() else { return };
        let (h, body) = match msg {
            Ok(Some(m)) => m,
            Ok(None) => break "xenstored closed the connection".to_string(),
            Err(e) => break e.to_string(),
        };
        if h.ty == MsgType::WatchEvent as u32 {
            let Some(parts) = wire::split_strings(&body) else {
                tracing::warn!("ignoring a malformed xenstore watch event");
                continue;
            };
            let (Some(path), Some(token)) = (parts.first(), parts.get(1)) else {
                tracing::warn!("ignoring a xenstore watch event without a token");
                continue;
            };
            let watches = lock(&inner.watches);
            if let Some(slot) = watches.get(*token) {
                let ev = WatchEvent {
                    path: (*path).into(),
                    token: (*token).into(),
                };
                if let Err(TrySendError::Full(_)) = slot.tx.try_send(ev) {
                    slot.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(token, "watch channel full, event dropped");
                }
            }
            continue;
        }
        let sender = lock(&inner.pending).remove(&h.req_id);
        match sender {
            Some(s) => {
                let _ = s.try_send(Ok((h.ty, body)));
            }
            None => tracing::warn!(req_id = h.req_id, "xenstore reply to no pending request"),
        }
    };
    if let Some(inner) = weak.upgrade() {
        *lock(&inner.dead) = Some(reason.clone());
        for (_, s) in lock(&inner.pending).drain() {
            let _ = s.try_send(Err(reason.clone()));
        }
        lock(&inner.watches).clear();
    }
}

/// A transaction; see [`Client::transaction`]. Dropping it without commit aborts it.
#[derive(Debug)]
pub struct Transaction<'a> {
    client: &'a Client,
    id: u32,
    done: bool,
}

impl Transaction<'_> {
    /// The transaction id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Commits; `EAGAIN` means a conflict and the whole transaction must be redone.
    pub fn commit(mut self) -> Result<()> {
        self.done = true;
        self.client
            .call(MsgType::TransactionEnd, self.id, b"T\0", "commit")
            .map(drop)
    }

    /// Aborts.
    pub fn abort(mut self) -> Result<()> {
        self.done = true;
        self.client
            .call(MsgType::TransactionEnd, self.id, b"F\0", "abort")
            .map(drop)
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self
                .client
                .call(MsgType::TransactionEnd, self.id, b"F\0", "abort");
        }
    }
}

/// Node operations, on a [`Client`] (outside a transaction) or in a [`Transaction`]. Paths are
/// absolute, or relative to the connection's domain home `/local/domain/<domid>`.
pub trait XsOps {
    #[doc(hidden)]
    fn raw(&self, ty: MsgType, payload: &[u8], what: &str) -> Result<Vec<u8>>;

    /// Reads a value.
    fn read(&self, path: &str) -> Result<Vec<u8>> {
        self.raw(MsgType::Read, &wire::join_strings(&[path]), path)
    }

    /// Reads a value as UTF-8 (a trailing NUL, as some writers leave, is dropped).
    fn read_string(&self, path: &str) -> Result<String> {
        let mut v = self.read(path)?;
        if v.last() == Some(&0) {
            v.pop();
        }
        String::from_utf8(v).map_err(|_| Error::NotUtf8 { path: path.into() })
    }

    /// Reads a value, `None` if the node does not exist.
    fn read_opt(&self, path: &str) -> Result<Option<Vec<u8>>> {
        match self.read(path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether the node exists (and is readable).
    fn exists(&self, path: &str) -> Result<bool> {
        Ok(self.read_opt(path)?.is_some())
    }

    /// Writes a value, creating the node and its missing parents.
    fn write(&self, path: &str, value: &[u8]) -> Result<()> {
        let mut p = Vec::with_capacity(path.len() + 1 + value.len());
        p.extend_from_slice(path.as_bytes());
        p.push(0);
        p.extend_from_slice(value);
        self.raw(MsgType::Write, &p, path).map(drop)
    }

    /// Writes a string value.
    fn write_str(&self, path: &str, value: &str) -> Result<()> {
        self.write(path, value.as_bytes())
    }

    /// Creates a node (and parents) with an empty value; no error if it exists.
    fn mkdir(&self, path: &str) -> Result<()> {
        self.raw(MsgType::Mkdir, &wire::join_strings(&[path]), path)
            .map(drop)
    }

    /// Removes a node and everything below it.
    fn rm(&self, path: &str) -> Result<()> {
        self.raw(MsgType::Rm, &wire::join_strings(&[path]), path)
            .map(drop)
    }

    /// The names of a node's children.
    fn directory(&self, path: &str) -> Result<Vec<String>> {
        let r = self.raw(MsgType::Directory, &wire::join_strings(&[path]), path)?;
        if r.is_empty() {
            return Ok(Vec::new());
        }
        let parts = wire::split_strings(&r).ok_or_else(|| Error::Protocol {
            op: "DIRECTORY",
            what: "children not NUL-terminated UTF-8".into(),
        })?;
        Ok(parts
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect())
    }

    /// A node's permissions; the first entry is the owner and the default.
    fn get_perms(&self, path: &str) -> Result<Vec<Perm>> {
        let r = self.raw(MsgType::GetPerms, &wire::join_strings(&[path]), path)?;
        let parts = wire::split_strings(&r).ok_or_else(|| Error::Protocol {
            op: "GET_PERMS",
            what: "permissions not NUL-terminated".into(),
        })?;
        parts
            .into_iter()
            .map(|s| {
                Perm::parse(s).ok_or_else(|| Error::Protocol {
                    op: "GET_PERMS",
                    what: format!("bad permission {s:?}"),
                })
            })
            .collect()
    }

    /// Sets a node's permissions; the first entry is the owner and the default.
    fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<()> {
        let mut items = vec![path.to_string()];
        items.extend(perms.iter().map(|p| p.to_string()));
        self.raw(MsgType::SetPerms, &wire::join_strings(&items), path)
            .map(drop)
    }
}

impl XsOps for Client {
    fn raw(&self, ty: MsgType, payload: &[u8], what: &str) -> Result<Vec<u8>> {
        self.call(ty, 0, payload, what)
    }
}

impl XsOps for Transaction<'_> {
    fn raw(&self, ty: MsgType, payload: &[u8], what: &str) -> Result<Vec<u8>> {
        self.client.call(ty, self.id, payload, what)
    }
}
