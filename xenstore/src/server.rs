//! A xenstored for the local platform, as a library: the node tree with xenstored's permission
//! rules, watches (including `@introduceDomain` / `@releaseDomain`), transactions and quotas,
//! served over Unix streams where the connection *is* the domain identity.
//!
//! Permission rules (as xenstored): a node's permission list is `[owner+default, entries…]`.
//! Dom0 may do anything; the owner may read, write and change permissions; another domain gets
//! its own entry if listed, else the default. A new node inherits its parent's list, and when an
//! unprivileged domain creates it, the owner becomes that domain. An operation on a missing node
//! answers `EACCES`, not `ENOENT`, when the nearest existing ancestor would not grant the access
//! (nothing leaks about nodes a domain may not see). Watch events are only sent to connections
//! that may read the node.
//!
//! Hostile clients: a payload over 4096 bytes or a broken stream ends that connection; malformed
//! requests get `EINVAL`; quotas bound nodes, watches, transactions and value sizes per domain;
//! every connection's outgoing queue is bounded and a connection that lets it overflow (by not
//! reading its watch events) is disconnected. Other connections carry on.

use crate::wire::{self, Access, Errno, Header, MsgType, Perm, WireError, PAYLOAD_MAX};
use std::collections::{BTreeSet, HashMap};
use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// The special watch fired when a domain is introduced.
pub const INTRODUCE_DOMAIN: &str = "@introduceDomain";
/// The special watch fired when a domain is released.
pub const RELEASE_DOMAIN: &str = "@releaseDomain";

/// Per-domain limits, applied to every domain but dom0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Largest value, in bytes.
    pub max_value: usize,
    /// Nodes a domain may own.
    pub nodes_per_domain: usize,
    /// Watches a domain may hold (over all its connections).
    pub watches_per_domain: usize,
    /// Open transactions a domain may hold (over all its connections).
    pub transactions_per_domain: usize,
    /// Messages (replies and watch events) queued for one connection; a connection that lets it
    /// overflow is disconnected. Applies to dom0 connections too.
    pub queued_messages: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            max_value: PAYLOAD_MAX,
            nodes_per_domain: 1000,
            watches_per_domain: 128,
            transactions_per_domain: 10,
            queued_messages: 256,
        }
    }
}

type Xs<T> = Result<T, Errno>;
type Observed = HashMap<String, Option<u64>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Clone)]
struct Node {
    value: Vec<u8>,
    perms: Vec<Perm>,
    children: BTreeSet<String>,
    gen: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Read,
    Write,
    WriteOwner,
}

/// What a domain may do with a node, following xenstored's `perm_for_conn`.
fn allowed(who: u32, perms: &[Perm], need: Need) -> bool {
    let Some(first) = perms.first() else {
        return who == 0;
    };
    if who == 0 || first.domid == who {
        return true;
    }
    let access = perms[1..]
        .iter()
        .find(|p| p.domid == who)
        .map(|p| p.access)
        .unwrap_or(first.access);
    match need {
        Need::Read => access.read(),
        Need::Write => access.write(),
        Need::WriteOwner => false,
    }
}

fn parent_of(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

fn base_of(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn join(parent: &str, child: &str) -> String {
    if parent == "/" {
        format!("/{child}")
    } else {
        format!("{parent}/{child}")
    }
}

/// `child` is `parent` or below it.
fn is_child(child: &str, parent: &str) -> bool {
    if parent == "/" {
        return child.starts_with('/');
    }
    child == parent
        || (child.starts_with(parent) && child.as_bytes().get(parent.len()) == Some(&b'/'))
}

/// A change to report to watchers.
#[derive(Debug, Clone)]
struct Event {
    path: String,
    /// A removal: watches below `path` fire too.
    recursive: bool,
    /// Permissions of the node (before removal, for a removal), to filter watchers.
    perms: Vec<Perm>,
}

#[derive(Debug, Clone)]
struct Tree {
    nodes: HashMap<String, Node>,
    gen: u64,
    owners: HashMap<u32, usize>,
}

impl Tree {
    fn new() -> Tree {
        let mut t = Tree {
            nodes: HashMap::new(),
            gen: 0,
            owners: HashMap::new(),
        };
        let none0 = vec![Perm::new(0, Access::None)];
        t.put(
            "/",
            Node {
                value: vec![],
                perms: none0.clone(),
                children: BTreeSet::new(),
                gen: 0,
            },
        );
        for p in ["/local", "/local/domain", "/tool"] {
            t.create_unchecked(p, none0.clone());
        }
        t
    }

    fn next_gen(&mut self) -> u64 {
        self.gen += 1;
        self.gen
    }

    fn put(&mut self, path: &str, node: Node) {
        let owner = node.perms.first().map(|p| p.domid).unwrap_or(0);
        if let Some(old) = self.nodes.insert(path.to_string(), node) {
            self.uncount(&old);
        }
        *self.owners.entry(owner).or_default() += 1;
    }

    fn take(&mut self, path: &str) -> Option<Node> {
        let n = self.nodes.remove(path)?;
        self.uncount(&n);
        Some(n)
    }

    fn uncount(&mut self, n: &Node) {
        let owner = n.perms.first().map(|p| p.domid).unwrap_or(0);
        if let Some(c) = self.owners.get_mut(&owner) {
            *c = c.saturating_sub(1);
        }
    }

    fn owned_by(&self, domid: u32) -> usize {
        self.owners.get(&domid).copied().unwrap_or(0)
    }

    /// Creates a node below an existing parent (set-up only).
    fn create_unchecked(&mut self, path: &str, perms: Vec<Perm>) {
        let gen = self.next_gen();
        if let Some(parent) = parent_of(path).and_then(|p| self.nodes.get_mut(p)) {
            parent.children.insert(base_of(path).to_string());
            parent.gen = gen;
        }
        self.put(
            path,
            Node {
                value: vec![],
                perms,
                children: BTreeSet::new(),
                gen,
            },
        );
    }

    fn touch(&self, rec: &mut Option<&mut Observed>, path: &str) {
        if let Some(r) = rec.as_deref_mut() {
            r.entry(path.to_string())
                .or_insert_with(|| self.nodes.get(path).map(|n| n.gen));
        }
    }

    /// The nearest existing ancestor of a missing node.
    fn nearest_existing<'a>(&self, rec: &mut Option<&mut Observed>, path: &'a str) -> &'a str {
        let mut cur = path;
        while let Some(p) = parent_of(cur) {
            self.touch(rec, p);
            if self.nodes.contains_key(p) {
                return p;
            }
            cur = p;
        }
        "/"
    }

    fn get(&self, rec: &mut Option<&mut Observed>, who: u32, path: &str, need: Need) -> Xs<&Node> {
        self.touch(rec, path);
        match self.nodes.get(path) {
            Some(n) if allowed(who, &n.perms, need) => Ok(n),
            Some(_) => Err(Errno::EACCES),
            None => {
                let anc = self.nearest_existing(rec, path);
                let perms = self
                    .nodes
                    .get(anc)
                    .map(|n| n.perms.as_slice())
                    .unwrap_or(&[]);
                if allowed(who, perms, need) {
                    Err(Errno::ENOENT)
                } else {
                    Err(Errno::EACCES)
                }
            }
        }
    }

    /// Creates `path` and its missing parents; the write permission on the nearest existing
    /// ancestor has been checked by the caller (through `get`).
    fn create(
        &mut self,
        rec: &mut Option<&mut Observed>,
        who: u32,
        path: &str,
        value: Vec<u8>,
        q: &Quotas,
    ) -> Xs<Vec<Perm>> {
        let mut missing = vec![path];
        let mut cur = path;
        let anc = loop {
            let Some(p) = parent_of(cur) else {
                return Err(Errno::EINVAL);
            };
            self.touch(rec, p);
            if self.nodes.contains_key(p) {
                break p;
            }
            missing.push(p);
            cur = p;
        };
        if who != 0 && self.owned_by(who) + missing.len() > q.nodes_per_domain {
            return Err(Errno::ENOSPC);
        }
        let mut parent = anc.to_string();
        let mut value = Some(value);
        let mut last_perms = vec![];
        for p in missing.into_iter().rev() {
            self.touch(rec, p);
            let gen = self.next_gen();
            let Some(par) = self.nodes.get_mut(&parent) else {
                return Err(Errno::EIO);
            };
            par.children.insert(base_of(p).to_string());
            par.gen = gen;
            let mut perms = par.perms.clone();
            if who != 0 {
                if let Some(first) = perms.first_mut() {
                    first.domid = who;
                }
            }
            let v = if p == path {
                value.take().unwrap_or_default()
            } else {
                vec![]
            };
            last_perms = perms.clone();
            self.put(
                p,
                Node {
                    value: v,
                    perms,
                    children: BTreeSet::new(),
                    gen,
                },
            );
            parent = p.to_string();
        }
        Ok(last_perms)
    }

    fn write(
        &mut self,
        rec: &mut Option<&mut Observed>,
        who: u32,
        path: &str,
        value: Vec<u8>,
        q: &Quotas,
    ) -> Xs<Event> {
        if who != 0 && value.len() > q.max_value {
            return Err(Errno::E2BIG);
        }
        let perms = match self.get(rec, who, path, Need::Write) {
            Ok(_) => {
                let gen = self.next_gen();
                let Some(n) = self.nodes.get_mut(path) else {
                    return Err(Errno::EIO);
                };
                n.value = value;
                n.gen = gen;
                n.perms.clone()
            }
            Err(Errno::ENOENT) => self.create(rec, who, path, value, q)?,
            Err(e) => return Err(e),
        };
        Ok(Event {
            path: path.into(),
            recursive: false,
            perms,
        })
    }

    fn mkdir(
        &mut self,
        rec: &mut Option<&mut Observed>,
        who: u32,
        path: &str,
        q: &Quotas,
    ) -> Xs<Option<Event>> {
        match self.get(rec, who, path, Need::Write) {
            Ok(_) => Ok(None),
            Err(Errno::ENOENT) => {
                let perms = self.create(rec, who, path, vec![], q)?;
                Ok(Some(Event {
                    path: path.into(),
                    recursive: false,
                    perms,
                }))
            }
            Err(e) => Err(e),
        }
    }

    fn rm(&mut self, rec: &mut Option<&mut Observed>, who: u32, path: &str) -> Xs<Option<Event>> {
        if path == "/" {
            return Err(Errno::EINVAL);
        }
        let perms = match self.get(rec, who, path, Need::Write) {
            Ok(n) => n.perms.clone(),
            Err(Errno::ENOENT) => {
                // As xenstored: removing a missing node whose parent exists succeeds.
                let parent = parent_of(path).unwrap_or("/");
                return if self.nodes.contains_key(parent) {
                    Ok(None)
                } else {
                    Err(Errno::ENOENT)
                };
            }
            Err(e) => return Err(e),
        };
        let mut stack = vec![path.to_string()];
        while let Some(p) = stack.pop() {
            self.touch(rec, &p);
            if let Some(n) = self.take(&p) {
                stack.extend(n.children.iter().map(|c| join(&p, c)));
            }
        }
        let gen = self.next_gen();
        if let Some(parent) = parent_of(path) {
            self.touch(rec, parent);
            if let Some(par) = self.nodes.get_mut(parent) {
                par.children.remove(base_of(path));
                par.gen = gen;
            }
        }
        Ok(Some(Event {
            path: path.into(),
            recursive: true,
            perms,
        }))
    }

    fn set_perms(
        &mut self,
        rec: &mut Option<&mut Observed>,
        who: u32,
        path: &str,
        perms: Vec<Perm>,
        q: &Quotas,
    ) -> Xs<Event> {
        let old = self.get(rec, who, path, Need::WriteOwner)?;
        let old_owner = old.perms.first().map(|p| p.domid);
        let new_owner = perms.first().map(|p| p.domid);
        if who != 0 && old_owner != new_owner {
            return Err(Errno::EPERM);
        }
        if let Some(o) = new_owner {
            if o != 0 && old_owner != new_owner && self.owned_by(o) + 1 > q.nodes_per_domain {
                return Err(Errno::ENOSPC);
            }
        }
        let gen = self.next_gen();
        let Some(mut n) = self.take(path) else {
            return Err(Errno::EIO);
        };
        n.perms = perms.clone();
        n.gen = gen;
        self.put(path, n);
        Ok(Event {
            path: path.into(),
            recursive: false,
            perms,
        })
    }
}

struct Tx {
    tree: Tree,
    observed: Observed,
    events: Vec<Event>,
}

struct WatchReg {
    /// Absolute path or special name.
    path: String,
    token: String,
    relative: bool,
}

struct Conn {
    domid: u32,
    out: SyncSender<Vec<u8>>,
    closer: UnixStream,
    watches: Vec<WatchReg>,
    txs: HashMap<u32, Tx>,
}

struct State {
    tree: Tree,
    conns: HashMap<u64, Conn>,
    introduced: BTreeSet<u32>,
    /// Domains released and not introduced again: their late connections are refused.
    released: BTreeSet<u32>,
    quotas: Quotas,
    next_conn: u64,
    next_tx: u32,
    /// Requests received, per domain.
    requests: HashMap<u32, u64>,
}

impl State {
    fn watches_of(&self, domid: u32) -> usize {
        self.conns
            .values()
            .filter(|c| c.domid == domid)
            .map(|c| c.watches.len())
            .sum()
    }

    fn txs_of(&self, domid: u32) -> usize {
        self.conns
            .values()
            .filter(|c| c.domid == domid)
            .map(|c| c.txs.len())
            .sum()
    }

    /// Queues a message for a connection; one that cannot take it is disconnected.
    fn send(conn: &Conn, msg: Vec<u8>) {
        match conn.out.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                tracing::warn!(
                    domid = conn.domid,
                    "xenstore connection does not read its messages; disconnecting it"
                );
                let _ = conn.closer.shutdown(std::net::Shutdown::Both);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    fn fire(&self, ev: &Event) {
        for conn in self.conns.values() {
            for w in &conn.watches {
                let path = if ev.path.starts_with('@') {
                    if w.path != ev.path || conn.domid != 0 {
                        continue;
                    }
                    ev.path.as_str()
                } else if w.path.starts_with('@') {
                    continue;
                } else if is_child(&ev.path, &w.path) {
                    ev.path.as_str()
                } else if ev.recursive && is_child(&w.path, &ev.path) {
                    w.path.as_str()
                } else {
                    continue;
                };
                if !ev.path.starts_with('@') && !allowed(conn.domid, &ev.perms, Need::Read) {
                    continue;
                }
                let shown = if w.relative {
                    relative_to(conn.domid, path)
                } else {
                    path
                };
                if let Ok(msg) = event_msg(shown, &w.token) {
                    Self::send(conn, msg);
                }
            }
        }
    }
}

fn relative_to(domid: u32, path: &str) -> &str {
    let home = wire::domain_path(domid);
    match path
        .strip_prefix(home.as_str())
        .and_then(|r| r.strip_prefix('/'))
    {
        Some(r) if !r.is_empty() => r,
        _ => path,
    }
}

fn event_msg(path: &str, token: &str) -> Result<Vec<u8>, WireError> {
    wire::encode(
        MsgType::WatchEvent as u32,
        0,
        0,
        &wire::join_strings(&[path, token]),
    )
}

/// Canonical absolute path of a request path from `who` (relative paths are under its home).
fn canon(who: u32, p: &str) -> Xs<String> {
    let abs = if p.starts_with('/') {
        p.to_string()
    } else {
        if p.is_empty() || p.len() > wire::REL_PATH_MAX {
            return Err(Errno::EINVAL);
        }
        format!("{}/{p}", wire::domain_path(who))
    };
    if wire::valid_abs_path(&abs) {
        Ok(abs)
    } else {
        Err(Errno::EINVAL)
    }
}

fn first_arg(payload: &[u8]) -> Xs<&str> {
    wire::split_strings(payload)
        .and_then(|v| v.into_iter().next())
        .ok_or(Errno::EINVAL)
}

fn parse_domid(s: &str) -> Xs<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Errno::EINVAL);
    }
    s.parse().map_err(|_| Errno::EINVAL)
}

const OK: &[u8] = b"OK\0";

/// The xenstore server. Cheap to clone; clones share the store.
#[derive(Clone)]
pub struct Server {
    state: Arc<Mutex<State>>,
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}

impl Server {
    /// A store holding `/`, `/local`, `/local/domain` and `/tool` (dom0-only), default quotas.
    pub fn new() -> Server {
        Self::with_quotas(Quotas::default())
    }

    /// A store with the given quotas.
    pub fn with_quotas(quotas: Quotas) -> Server {
        let mut introduced = BTreeSet::new();
        introduced.insert(0);
        Server {
            state: Arc::new(Mutex::new(State {
                tree: Tree::new(),
                conns: HashMap::new(),
                introduced,
                released: BTreeSet::new(),
                quotas,
                next_conn: 1,
                next_tx: 1,
                requests: HashMap::new(),
            })),
        }
    }

    /// How many requests domain `domid`'s connections have sent (to see what a client costs
    /// xenstored).
    pub fn requests_from(&self, domid: u32) -> u64 {
        lock(&self.state).requests.get(&domid).copied().unwrap_or(0)
    }

    /// Records that domain `domid` exists and fires `@introduceDomain`.
    pub fn introduce_domain(&self, domid: u32) {
        let mut st = lock(&self.state);
        st.introduced.insert(domid);
        st.released.remove(&domid);
        st.fire(&Event {
            path: INTRODUCE_DOMAIN.into(),
            recursive: false,
            perms: vec![],
        });
    }

    /// Records that domain `domid` is gone, disconnects its connections, removes its home
    /// `/local/domain/<domid>` if `remove_nodes`, and fires `@releaseDomain`.
    pub fn release_domain(&self, domid: u32, remove_nodes: bool) {
        self.disconnect_domain(domid);
        let mut st = lock(&self.state);
        st.introduced.remove(&domid);
        st.released.insert(domid);
        // Connections registered since `disconnect_domain` above.
        for c in st.conns.values().filter(|c| c.domid == domid) {
            let _ = c.closer.shutdown(std::net::Shutdown::Both);
        }
        if remove_nodes && domid != 0 {
            if let Ok(Some(ev)) = st.tree.rm(&mut None, 0, &wire::domain_path(domid)) {
                st.fire(&ev);
            }
        }
        st.fire(&Event {
            path: RELEASE_DOMAIN.into(),
            recursive: false,
            perms: vec![],
        });
    }

    /// Shuts down every connection of domain `domid`.
    pub fn disconnect_domain(&self, domid: u32) {
        let st = lock(&self.state);
        for c in st.conns.values().filter(|c| c.domid == domid) {
            let _ = c.closer.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether `domid` is introduced (dom0 always is).
    pub fn is_introduced(&self, domid: u32) -> bool {
        lock(&self.state).introduced.contains(&domid)
    }

    /// Writes a node as dom0 (for the daemon), firing watches.
    pub fn write(&self, path: &str, value: &[u8]) -> Result<(), Errno> {
        let path = canon(0, path)?;
        let mut st = lock(&self.state);
        let q = st.quotas;
        let ev = st.tree.write(&mut None, 0, &path, value.to_vec(), &q)?;
        st.fire(&ev);
        Ok(())
    }

    /// Reads a node as dom0.
    pub fn read(&self, path: &str) -> Result<Vec<u8>, Errno> {
        let path = canon(0, path)?;
        let st = lock(&self.state);
        st.tree
            .get(&mut None, 0, &path, Need::Read)
            .map(|n| n.value.clone())
    }

    /// Creates a node (and parents) as dom0.
    pub fn mkdir(&self, path: &str) -> Result<(), Errno> {
        let path = canon(0, path)?;
        let mut st = lock(&self.state);
        let q = st.quotas;
        if let Some(ev) = st.tree.mkdir(&mut None, 0, &path, &q)? {
            st.fire(&ev);
        }
        Ok(())
    }

    /// Removes a node recursively as dom0.
    pub fn rm(&self, path: &str) -> Result<(), Errno> {
        let path = canon(0, path)?;
        let mut st = lock(&self.state);
        if let Some(ev) = st.tree.rm(&mut None, 0, &path)? {
            st.fire(&ev);
        }
        Ok(())
    }

    /// Sets a node's permissions as dom0.
    pub fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<(), Errno> {
        let path = canon(0, path)?;
        if perms.is_empty() {
            return Err(Errno::EINVAL);
        }
        let mut st = lock(&self.state);
        let q = st.quotas;
        let ev = st.tree.set_perms(&mut None, 0, &path, perms.to_vec(), &q)?;
        st.fire(&ev);
        Ok(())
    }

    /// Binds a listening socket at `path` (replacing a stale one, creating the directory) whose
    /// connections all speak for domain `domid`, and serves it on threads.
    pub fn bind(&self, path: impl AsRef<Path>, domid: u32) -> io::Result<Listener> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if path.exists() {
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot bind xenstore socket {}: {e}", path.display()),
            )
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let server = self.clone();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("xenstore-accept-dom{domid}"))
            .spawn(move || {
                for s in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(s) = s else { continue };
                    let server = server.clone();
                    let spawned = std::thread::Builder::new()
                        .name(format!("xenstore-dom{domid}"))
                        .spawn(move || {
                            if let Err(e) = server.handle_connection(s, domid) {
                                tracing::debug!(domid, "xenstore connection ended: {e}");
                            }
                        });
                    if let Err(e) = spawned {
                        tracing::warn!(domid, "cannot start a xenstore connection thread: {e}");
                    }
                }
            })?;
        Ok(Listener {
            path,
            stop,
            thread: Some(thread),
        })
    }

    /// Serves one connection from domain `domid` until it closes (or misbehaves).
    pub fn handle_connection(&self, stream: UnixStream, domid: u32) -> io::Result<()> {
        let span = tracing::info_span!("xenstore", domid);
        let _enter = span.enter();
        let mut reader = stream.try_clone()?;
        let mut writer = stream.try_clone()?;
        let closer = stream.try_clone()?;
        let cap = lock(&self.state).quotas.queued_messages.max(1);
        let (out, rx) = mpsc::sync_channel::<Vec<u8>>(cap);
        let wthread = std::thread::Builder::new()
            .name(format!("xenstore-out-dom{domid}"))
            .spawn(move || {
                for m in rx {
                    if writer.write_all(&m).is_err() {
                        let _ = writer.shutdown(std::net::Shutdown::Both);
                        break;
                    }
                }
            })?;
        let id = {
            let mut st = lock(&self.state);
            if st.released.contains(&domid) {
                // Accepted just before the domain was destroyed: it no longer exists.
                drop(st);
                tracing::debug!("connection of a released domain refused");
                let _ = stream.shutdown(std::net::Shutdown::Both);
                drop(out);
                let _ = wthread.join();
                return Ok(());
            }
            let id = st.next_conn;
            st.next_conn += 1;
            let conn = Conn {
                domid,
                out: out.clone(),
                closer,
                watches: vec![],
                txs: HashMap::new(),
            };
            st.conns.insert(id, conn);
            id
        };
        tracing::debug!("xenstore connection opened");
        let result = loop {
            match wire::read_message(&mut reader) {
                Ok(None) => break Ok(()),
                Ok(Some((h, payload))) => {
                    let (reply, after) = self.process(id, domid, h, &payload);
                    if out.send(reply).is_err() {
                        break Ok(());
                    }
                    // Watch registration events: bounded like all others.
                    if after
                        .into_iter()
                        .any(|m| matches!(out.try_send(m), Err(TrySendError::Full(_))))
                    {
                        tracing::warn!("xenstore connection queue overflow; disconnecting");
                        break Ok(());
                    }
                }
                Err(WireError::TooLong { len }) => {
                    tracing::warn!(
                        len,
                        "xenstore message longer than 4096 bytes; disconnecting"
                    );
                    break Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("message payload of {len} bytes exceeds 4096"),
                    ));
                }
                Err(WireError::Io(e)) => break Err(e),
            }
        };
        lock(&self.state).conns.remove(&id);
        let _ = stream.shutdown(std::net::Shutdown::Both);
        drop(out);
        let _ = wthread.join();
        tracing::debug!("xenstore connection closed");
        result
    }

    /// Handles one request; returns the reply and messages to queue after it.
    fn process(&self, id: u64, domid: u32, h: Header, payload: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut after = Vec::new();
        let ty = MsgType::from_u32(h.ty);
        let res = {
            let mut st = lock(&self.state);
            *st.requests.entry(domid).or_default() += 1;
            match ty {
                Some(t) => self.dispatch(&mut st, id, domid, t, h.tx_id, payload, &mut after),
                None => Err(Errno::EINVAL),
            }
        };
        let msg = match res {
            Ok(body) => wire::encode(h.ty, h.req_id, h.tx_id, &body),
            Err(e) => {
                tracing::debug!(ty = h.ty, "xenstore request failed: {e}");
                wire::encode(
                    MsgType::Error as u32,
                    h.req_id,
                    h.tx_id,
                    &wire::join_strings(&[e.as_str()]),
                )
            }
        };
        let msg = msg.unwrap_or_else(|_| {
            wire::encode(MsgType::Error as u32, h.req_id, h.tx_id, b"E2BIG\0").unwrap_or_default()
        });
        (msg, after)
    }

    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &self,
        st: &mut State,
        id: u64,
        who: u32,
        ty: MsgType,
        tx_id: u32,
        payload: &[u8],
        after: &mut Vec<Vec<u8>>,
    ) -> Xs<Vec<u8>> {
        let q = st.quotas;
        match ty {
            MsgType::Read | MsgType::Directory | MsgType::GetPerms => {
                let path = canon(who, first_arg(payload)?)?;
                let State { tree, conns, .. } = st;
                let (tree, mut rec) = pick(tree, conns, id, tx_id)?;
                let n = tree.get(&mut rec, who, &path, Need::Read)?;
                let body = match ty {
                    MsgType::Read => n.value.clone(),
                    MsgType::Directory => {
                        wire::join_strings(&n.children.iter().collect::<Vec<_>>())
                    }
                    _ => wire::join_strings(
                        &n.perms.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                    ),
                };
                if body.len() > PAYLOAD_MAX {
                    return Err(Errno::E2BIG);
                }
                Ok(body)
            }
            MsgType::Write | MsgType::Mkdir | MsgType::Rm | MsgType::SetPerms => {
                let ev = {
                    let State { tree, conns, .. } = &mut *st;
                    let (tree, mut rec) = pick(tree, conns, id, tx_id)?;
                    match ty {
                        MsgType::Write => {
                            let nul = payload.iter().position(|&b| b == 0).ok_or(Errno::EINVAL)?;
                            let p =
                                std::str::from_utf8(&payload[..nul]).map_err(|_| Errno::EINVAL)?;
                            let path = canon(who, p)?;
                            Some(tree.write(
                                &mut rec,
                                who,
                                &path,
                                payload[nul + 1..].to_vec(),
                                &q,
                            )?)
                        }
                        MsgType::Mkdir => {
                            let path = canon(who, first_arg(payload)?)?;
                            tree.mkdir(&mut rec, who, &path, &q)?
                        }
                        MsgType::Rm => {
                            let path = canon(who, first_arg(payload)?)?;
                            tree.rm(&mut rec, who, &path)?
                        }
                        _ => {
                            let args = wire::split_strings(payload).ok_or(Errno::EINVAL)?;
                            let (p, perms) = args.split_first().ok_or(Errno::EINVAL)?;
                            let path = canon(who, p)?;
                            let perms = perms
                                .iter()
                                .filter(|s| !s.is_empty())
                                .map(|s| Perm::parse(s).ok_or(Errno::EINVAL))
                                .collect::<Xs<Vec<_>>>()?;
                            if perms.is_empty() {
                                return Err(Errno::EINVAL);
                            }
                            Some(tree.set_perms(&mut rec, who, &path, perms, &q)?)
                        }
                    }
                };
                if let Some(ev) = ev {
                    if tx_id == 0 {
                        st.fire(&ev);
                    } else if let Some(tx) =
                        st.conns.get_mut(&id).and_then(|c| c.txs.get_mut(&tx_id))
                    {
                        tx.events.push(ev);
                    }
                }
                Ok(OK.to_vec())
            }
            MsgType::Watch => {
                let args = wire::split_strings(payload).ok_or(Errno::EINVAL)?;
                let (Some(p), Some(token)) = (args.first(), args.get(1)) else {
                    return Err(Errno::EINVAL);
                };
                let (path, relative) = if p.starts_with('@') {
                    if *p != INTRODUCE_DOMAIN && *p != RELEASE_DOMAIN {
                        return Err(Errno::EINVAL);
                    }
                    (p.to_string(), false)
                } else {
                    (canon(who, p)?, !p.starts_with('/'))
                };
                if who != 0 && st.watches_of(who) >= q.watches_per_domain {
                    return Err(Errno::E2BIG);
                }
                let conn = st.conns.get_mut(&id).ok_or(Errno::EIO)?;
                if conn
                    .watches
                    .iter()
                    .any(|w| w.path == path && w.token == *token)
                {
                    return Err(Errno::EEXIST);
                }
                conn.watches.push(WatchReg {
                    path,
                    token: token.to_string(),
                    relative,
                });
                // The initial event names the path as the client gave it.
                after.push(event_msg(p, token).map_err(|_| Errno::E2BIG)?);
                Ok(OK.to_vec())
            }
            MsgType::Unwatch => {
                let args = wire::split_strings(payload).ok_or(Errno::EINVAL)?;
                let (Some(p), Some(token)) = (args.first(), args.get(1)) else {
                    return Err(Errno::EINVAL);
                };
                let path = if p.starts_with('@') {
                    p.to_string()
                } else {
                    canon(who, p)?
                };
                let conn = st.conns.get_mut(&id).ok_or(Errno::EIO)?;
                let before = conn.watches.len();
                conn.watches
                    .retain(|w| !(w.path == path && w.token == *token));
                if conn.watches.len() == before {
                    return Err(Errno::ENOENT);
                }
                Ok(OK.to_vec())
            }
            MsgType::TransactionStart => {
                if tx_id != 0 {
                    return Err(Errno::EBUSY);
                }
                if who != 0 && st.txs_of(who) >= q.transactions_per_domain {
                    return Err(Errno::ENOSPC);
                }
                let snapshot = st.tree.clone();
                let mut txid = st.next_tx;
                let conn = st.conns.get_mut(&id).ok_or(Errno::EIO)?;
                while txid == 0 || conn.txs.contains_key(&txid) {
                    txid = txid.wrapping_add(1);
                }
                let tx = Tx {
                    tree: snapshot,
                    observed: HashMap::new(),
                    events: vec![],
                };
                conn.txs.insert(txid, tx);
                st.next_tx = txid.wrapping_add(1);
                Ok(wire::join_strings(&[txid.to_string()]))
            }
            MsgType::TransactionEnd => {
                let commit = match first_arg(payload)? {
                    "T" => true,
                    "F" => false,
                    _ => return Err(Errno::EINVAL),
                };
                let conn = st.conns.get_mut(&id).ok_or(Errno::EIO)?;
                let tx = conn.txs.remove(&tx_id).ok_or(Errno::ENOENT)?;
                if commit {
                    commit_tx(st, tx)?;
                }
                Ok(OK.to_vec())
            }
            MsgType::GetDomainPath => {
                let d = parse_domid(first_arg(payload)?)?;
                Ok(wire::join_strings(&[wire::domain_path(d)]))
            }
            MsgType::Introduce | MsgType::Release | MsgType::IsDomainIntroduced => {
                if who != 0 {
                    return Err(Errno::EACCES);
                }
                let d = parse_domid(first_arg(payload)?)?;
                match ty {
                    MsgType::Introduce => {
                        st.introduced.insert(d);
                        st.fire(&Event {
                            path: INTRODUCE_DOMAIN.into(),
                            recursive: false,
                            perms: vec![],
                        });
                        Ok(OK.to_vec())
                    }
                    MsgType::Release => {
                        if d == 0 || !st.introduced.remove(&d) {
                            return Err(Errno::ENOENT);
                        }
                        st.fire(&Event {
                            path: RELEASE_DOMAIN.into(),
                            recursive: false,
                            perms: vec![],
                        });
                        Ok(OK.to_vec())
                    }
                    _ => Ok(if st.introduced.contains(&d) {
                        b"T\0".to_vec()
                    } else {
                        b"F\0".to_vec()
                    }),
                }
            }
            MsgType::ResetWatches => {
                let conn = st.conns.get_mut(&id).ok_or(Errno::EIO)?;
                conn.watches.clear();
                conn.txs.clear();
                Ok(OK.to_vec())
            }
            _ => Err(Errno::EINVAL),
        }
    }
}

/// The tree an operation works on: the live one, or a transaction's snapshot plus its record.
fn pick<'a>(
    tree: &'a mut Tree,
    conns: &'a mut HashMap<u64, Conn>,
    id: u64,
    tx_id: u32,
) -> Xs<(&'a mut Tree, Option<&'a mut Observed>)> {
    if tx_id == 0 {
        return Ok((tree, None));
    }
    let tx = conns
        .get_mut(&id)
        .and_then(|c| c.txs.get_mut(&tx_id))
        .ok_or(Errno::ENOENT)?;
    Ok((&mut tx.tree, Some(&mut tx.observed)))
}

/// Commits a transaction: `EAGAIN` if any node it looked at changed since; else copies the
/// nodes it changed into the live tree and fires its watches.
fn commit_tx(st: &mut State, tx: Tx) -> Xs<()> {
    for (p, seen) in &tx.observed {
        if st.tree.nodes.get(p).map(|n| n.gen) != *seen {
            return Err(Errno::EAGAIN);
        }
    }
    for (p, seen) in &tx.observed {
        let mine = tx.tree.nodes.get(p);
        if mine.map(|n| n.gen) == *seen {
            continue;
        }
        match mine {
            Some(n) => {
                let mut n = n.clone();
                n.gen = st.tree.next_gen();
                st.tree.put(p, n);
            }
            None => {
                st.tree.take(p);
                st.tree.next_gen();
            }
        }
    }
    for ev in &tx.events {
        st.fire(ev);
    }
    Ok(())
}

/// A listening socket served on threads; see [`Server::bind`]. Dropping it stops accepting new
/// connections and removes the socket file (established connections carry on).
#[derive(Debug)]
pub struct Listener {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop. If the socket file is already gone (its directory was
        // removed), the loop cannot be woken: leave the thread parked in accept rather than
        // hang here.
        let woke = UnixStream::connect(&self.path).is_ok();
        if let Some(t) = self.thread.take() {
            if woke {
                let _ = t.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_follow_xenstored() {
        let p = [Perm::new(5, Access::None), Perm::new(7, Access::Read)];
        assert!(allowed(0, &p, Need::WriteOwner));
        assert!(allowed(5, &p, Need::WriteOwner));
        assert!(allowed(7, &p, Need::Read));
        assert!(!allowed(7, &p, Need::Write));
        assert!(!allowed(8, &p, Need::Read));
        assert!(is_child("/a/b", "/a"));
        assert!(is_child("/a", "/a"));
        assert!(!is_child("/ab", "/a"));
        assert!(is_child("/x", "/"));
        assert_eq!(parent_of("/a"), Some("/"));
        assert_eq!(parent_of("/a/b"), Some("/a"));
        assert_eq!(relative_to(3, "/local/domain/3/device/vbd"), "device/vbd");
        assert_eq!(relative_to(3, "/local/domain/30/x"), "/local/domain/30/x");
    }

    #[test]
    fn tree_create_inherits_and_charges_owner() {
        let mut t = Tree::new();
        let q = Quotas::default();
        t.create_unchecked("/local/domain/5", vec![Perm::new(5, Access::None)]);
        t.write(&mut None, 0, "/local/domain/5/a/b", b"x".to_vec(), &q)
            .unwrap();
        assert_eq!(t.nodes["/local/domain/5/a/b"].perms[0].domid, 5);
        assert_eq!(
            t.get(&mut None, 6, "/local/domain/5/a/b", Need::Read)
                .unwrap_err(),
            Errno::EACCES
        );
        assert_eq!(
            t.get(&mut None, 6, "/local/domain/5/zz", Need::Read)
                .unwrap_err(),
            Errno::EACCES
        );
        assert_eq!(
            t.get(&mut None, 5, "/local/domain/5/zz", Need::Read)
                .unwrap_err(),
            Errno::ENOENT
        );
        let before = t.owned_by(5);
        t.rm(&mut None, 5, "/local/domain/5/a").unwrap();
        assert_eq!(t.owned_by(5), before - 2);
    }
}
