//! The daemon: state directory, domain registry, listeners, control socket.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use xenpv_evtchn::local::Broker as EvtchnBroker;
use xenpv_grant::local::{Broker as GrantBroker, BrokerConfig};
use xenpv_xenstore::{Access, Listener, Perm, Server};

use crate::control::{self, Request};
use crate::sock::SockServer;
use crate::{Error, Result};

/// The largest domain id (Xen's `DOMID_FIRST_RESERVED - 1`).
pub const MAX_DOMID: u32 = 0x7fef;

const SOCKETS: [&str; 3] = ["xenstore.sock", "grant.sock", "evtchn.sock"];

/// How to start the daemon.
#[derive(Debug, Clone)]
pub struct Config {
    /// The state directory; `None` picks one as [`crate::state_dir`] does.
    pub state_dir: Option<PathBuf>,
    /// Geometry of every domain's grant memfd.
    pub grant: BrokerConfig,
    /// Event-channel ports per domain.
    pub max_ports: u32,
    /// How often deferred grant revokes are retried.
    pub reap_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: None,
            grant: BrokerConfig::default(),
            max_ports: xenpv_evtchn::local::DEFAULT_MAX_PORTS,
            reap_interval: Duration::from_secs(1),
        }
    }
}

/// A domain as `list` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    /// Its domid.
    pub domid: u32,
    /// Its name (`Domain-0` for dom0).
    pub name: String,
}

/// The sockets of one domain; dropping them stops serving it.
struct Domain {
    name: String,
    // Drop order: the brokers' sockets, then xenstore.
    _grant: SockServer,
    _evtchn: SockServer,
    _xenstore: Listener,
}

struct Inner {
    root: PathBuf,
    xs: Server,
    grant: GrantBroker,
    evtchn: Arc<EvtchnBroker>,
    domains: Mutex<BTreeMap<u32, Domain>>,
}

/// The running local platform. Dropping it (or [`Daemon::shutdown`]) stops every listener and
/// removes the sockets and the pid file.
pub struct Daemon {
    inner: Arc<Inner>,
    control: Option<SockServer>,
    reaper: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    /// `ROOT/local.pid`, `flock`ed while we run.
    pid_file: Option<File>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("root", &self.inner.root)
            .finish_non_exhaustive()
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

fn xs_err(what: String) -> impl FnOnce(xenpv_xenstore::Errno) -> Error {
    move |errno| Error::Xenstore { what, errno }
}

impl Daemon {
    /// Starts the daemon on its state directory: refuses when another daemon is alive there,
    /// removes what a dead one left, creates dom0 and serves the sockets.
    pub fn start(config: Config) -> Result<Daemon> {
        let root = crate::state_dir(config.state_dir.as_deref());
        std::fs::create_dir_all(&root).map_err(io_err("create the state directory", &root))?;
        raise_nofile();
        let pid_file = lock_pid_file(&root)?;
        clean_stale(&root);
        write_pid(&pid_file, &root)?;

        let inner = Arc::new(Inner {
            root: root.clone(),
            xs: Server::new(),
            grant: GrantBroker::new(config.grant),
            evtchn: Arc::new(EvtchnBroker::new(config.max_ports)),
            domains: Mutex::new(BTreeMap::new()),
        });
        let mut daemon = Daemon {
            inner: inner.clone(),
            control: None,
            reaper: None,
            pid_file: Some(pid_file),
        };
        inner.create_dom0()?;
        let ctl = crate::control_path(&root);
        let inner2 = inner.clone();
        daemon.control = Some(
            SockServer::bind(
                &ctl,
                "xenpv-control",
                Arc::new(move |s| inner2.serve_control(s)),
            )
            .map_err(io_err("bind the control socket", &ctl))?,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, grant) = (stop.clone(), inner.grant.clone());
        let interval = config.reap_interval;
        let reaper = std::thread::Builder::new()
            .name("xenpv-reaper".into())
            .spawn(move || {
                while !stop2.load(Ordering::SeqCst) {
                    let waiting = grant.reap();
                    if waiting > 0 {
                        tracing::debug!(waiting, "grant revokes still deferred");
                    }
                    std::thread::park_timeout(interval);
                }
            })
            .map_err(io_err("start the reaper thread for", &root))?;
        daemon.reaper = Some((stop, reaper));
        tracing::info!(root = %root.display(), "local platform ready");
        Ok(daemon)
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The xenstore server (to act as dom0 in-process).
    pub fn xenstore(&self) -> &Server {
        &self.inner.xs
    }

    /// Creates a domain: `domid` or the lowest free one ≥ 1, `name` or `dom<N>`.
    pub fn create_domain(&self, domid: Option<u32>, name: Option<&str>) -> Result<u32> {
        self.inner.create_domain(domid, name)
    }

    /// Destroys a domain.
    pub fn destroy_domain(&self, domid: u32) -> Result<()> {
        self.inner.destroy_domain(domid)
    }

    /// The domains, dom0 included, in domid order.
    pub fn domains(&self) -> Vec<DomainInfo> {
        self.inner.list()
    }

    /// Serves until SIGTERM or SIGINT, then shuts down cleanly. `on_ready` runs once the signal
    /// handlers are installed: announce readiness there, so that a signal sent by whoever waited
    /// for the announcement is never lost to the default action.
    pub fn run_until_signal(self, on_ready: impl FnOnce(&Daemon)) -> Result<()> {
        // signal-hook's self-pipe: the handler only write(2)s a byte, which is
        // async-signal-safe, and we block in read(2) here. No unsafe code of ours.
        let (mut rx, tx) =
            UnixStream::pair().map_err(io_err("create the signal pipe in", self.root()))?;
        let mut ids = Vec::new();
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            let tx = tx
                .try_clone()
                .map_err(io_err("create the signal pipe in", self.root()))?;
            ids.push(
                signal_hook::low_level::pipe::register(sig, tx)
                    .map_err(io_err("install a signal handler for", self.root()))?,
            );
        }
        on_ready(&self);
        let mut b = [0u8; 1];
        loop {
            match rx.read(&mut b) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("wait for a signal in", self.root())(e)),
            }
        }
        tracing::info!("signal received, shutting down");
        for id in ids {
            signal_hook::low_level::unregister(id);
        }
        self.shutdown();
        Ok(())
    }

    /// Stops serving; removes every socket, the domains' (empty) directories and the pid file.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some((stop, t)) = self.reaper.take() {
            stop.store(true, Ordering::SeqCst);
            t.thread().unpark();
            let _ = t.join();
        }
        self.control = None;
        let domains = std::mem::take(&mut *self.inner.lock());
        for (domid, d) in domains {
            drop(d);
            let _ = std::fs::remove_dir(crate::domain_dir(&self.inner.root, domid));
        }
        if let Some(f) = self.pid_file.take() {
            let _ = std::fs::remove_file(crate::pid_path(&self.inner.root));
            drop(f);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u32, Domain>> {
        self.domains.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn create_dom0(&self) -> Result<()> {
        let mut doms = self.lock();
        self.grant.create_domain(0)?;
        self.evtchn.create_domain(0)?;
        self.xs
            .write("/local/domain/0/name", b"Domain-0")
            .map_err(xs_err("write /local/domain/0/name".into()))?;
        self.xs
            .write("/local/domain/0/domid", b"0")
            .map_err(xs_err("write /local/domain/0/domid".into()))?;
        let d = self.serve_domain(0, "Domain-0".into())?;
        doms.insert(0, d);
        Ok(())
    }

    /// Binds domain `domid`'s three sockets.
    fn serve_domain(&self, domid: u32, name: String) -> Result<Domain> {
        let dir = crate::domain_dir(&self.root, domid);
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let gdom = u16::try_from(domid).map_err(|_| Error::BadDomid(domid))?;
        let path = crate::xenstore_path(&self.root, domid);
        let xenstore = self
            .xs
            .bind(&path, domid)
            .map_err(io_err("bind the xenstore socket", &path))?;
        let path = crate::grant_path(&self.root, domid);
        let broker = self.grant.clone();
        let grant = SockServer::bind(
            &path,
            &format!("grant-dom{domid}"),
            Arc::new(move |s| {
                let span = tracing::info_span!("grant", domid);
                let _e = span.enter();
                if let Err(e) = broker.serve(s, gdom) {
                    tracing::debug!("grant connection ended: {e}");
                }
            }),
        )
        .map_err(io_err("bind the grant socket", &path))?;
        let path = crate::evtchn_path(&self.root, domid);
        let broker = self.evtchn.clone();
        let evtchn = SockServer::bind(
            &path,
            &format!("evtchn-dom{domid}"),
            Arc::new(move |s| {
                let span = tracing::info_span!("evtchn", domid);
                let _e = span.enter();
                if let Err(e) = broker.serve(s, gdom) {
                    tracing::debug!("evtchn connection ended: {e}");
                }
            }),
        )
        .map_err(io_err("bind the event-channel socket", &path))?;
        Ok(Domain {
            name,
            _grant: grant,
            _evtchn: evtchn,
            _xenstore: xenstore,
        })
    }

    fn create_domain(&self, domid: Option<u32>, name: Option<&str>) -> Result<u32> {
        let mut doms = self.lock();
        let domid = match domid {
            Some(0) => return Err(Error::Dom0),
            Some(d) if d > MAX_DOMID => return Err(Error::BadDomid(d)),
            Some(d) if doms.contains_key(&d) => return Err(Error::DomainExists(d)),
            Some(d) => d,
            None => (1..=MAX_DOMID)
                .find(|d| !doms.contains_key(d))
                .ok_or(Error::NoFreeDomid)?,
        };
        let name = match name {
            Some(n) => {
                check_name(n)?;
                n.to_owned()
            }
            None => format!("dom{domid}"),
        };
        if let Some((&other, _)) = doms.iter().find(|(_, d)| d.name == name) {
            return Err(Error::NameTaken { name, domid: other });
        }
        let span = tracing::info_span!("domain", domid);
        let _e = span.enter();
        let gdom = u16::try_from(domid).map_err(|_| Error::BadDomid(domid))?;
        self.grant.create_domain(gdom)?;
        if let Err(e) = self.evtchn.create_domain(gdom) {
            let _ = self.grant.destroy_domain(gdom);
            return Err(e.into());
        }
        let made = self
            .write_domain_nodes(domid, &name)
            .and_then(|()| self.serve_domain(domid, name.clone()));
        let d = match made {
            Ok(d) => d,
            Err(e) => {
                let _ = self.evtchn.destroy_domain(gdom);
                let _ = self.grant.destroy_domain(gdom);
                let _ = self.xs.rm(&format!("/local/domain/{domid}"));
                let _ = std::fs::remove_dir(crate::domain_dir(&self.root, domid));
                return Err(e);
            }
        };
        doms.insert(domid, d);
        self.xs.introduce_domain(domid);
        tracing::info!(name, "domain created");
        Ok(domid)
    }

    /// `/local/domain/<N>` owned by N (dom0 reads it), with `name` and `domid` owned by dom0 and
    /// readable by N, as libxl writes them, so that a guest cannot rename itself.
    fn write_domain_nodes(&self, domid: u32, name: &str) -> Result<()> {
        let home = format!("/local/domain/{domid}");
        // A home left by a toolstack for a domain that no longer exists: start afresh (libxl
        // does the same).
        let _ = self.xs.rm(&home);
        self.xs
            .mkdir(&home)
            .map_err(xs_err(format!("create {home}")))?;
        self.xs
            .set_perms(
                &home,
                &[Perm::new(domid, Access::None), Perm::new(0, Access::Read)],
            )
            .map_err(xs_err(format!("set the permissions of {home}")))?;
        for (node, value) in [("name", name.to_owned()), ("domid", domid.to_string())] {
            let p = format!("{home}/{node}");
            self.xs
                .write(&p, value.as_bytes())
                .map_err(xs_err(format!("write {p}")))?;
            self.xs
                .set_perms(
                    &p,
                    &[Perm::new(0, Access::None), Perm::new(domid, Access::Read)],
                )
                .map_err(xs_err(format!("set the permissions of {p}")))?;
        }
        Ok(())
    }

    fn destroy_domain(&self, domid: u32) -> Result<()> {
        if domid == 0 {
            return Err(Error::Dom0);
        }
        let mut doms = self.lock();
        let d = doms.remove(&domid).ok_or(Error::NoSuchDomain(domid))?;
        let span = tracing::info_span!("domain", domid);
        let _e = span.enter();
        // First cut the domain off (sockets gone, connections shut), then drop its state in the
        // brokers, then tell xenstore watchers.
        drop(d);
        if let Ok(g) = u16::try_from(domid) {
            if let Err(e) = self.evtchn.destroy_domain(g) {
                tracing::warn!("event-channel broker: {e}");
            }
            if let Err(e) = self.grant.destroy_domain(g) {
                tracing::warn!("grant broker: {e}");
            }
        }
        self.xs.release_domain(domid, true);
        let dir = crate::domain_dir(&self.root, domid);
        if let Err(e) = std::fs::remove_dir(&dir) {
            tracing::warn!("cannot remove {}: {e}", dir.display());
        }
        tracing::info!("domain destroyed");
        Ok(())
    }

    fn list(&self) -> Vec<DomainInfo> {
        self.lock()
            .iter()
            .map(|(&domid, d)| DomainInfo {
                domid,
                name: d.name.clone(),
            })
            .collect()
    }

    /// One control connection: request lines in, replies out.
    fn serve_control(&self, s: UnixStream) {
        let Ok(mut w) = s.try_clone() else { return };
        let mut r = BufReader::new(s);
        loop {
            let line = match control::read_line(&mut r) {
                Ok(Some(l)) => l,
                Ok(None) => return,
                Err(e) => {
                    let _ = writeln!(w, "err {e}");
                    return;
                }
            };
            let reply = match Request::parse(&line) {
                Ok(req) => self.answer(req),
                Err(e) => {
                    let _ = writeln!(w, "err {e}");
                    return;
                }
            };
            if w.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
    }

    fn answer(&self, req: Request) -> String {
        let r = match req {
            Request::Create { domid, name } => self
                .create_domain(domid, name.as_deref())
                .map(|d| format!("ok {d}\n")),
            Request::Destroy(d) => self.destroy_domain(d).map(|()| "ok\n".to_owned()),
            Request::List => {
                let l = self.list();
                let mut s = format!("ok {}\n", l.len());
                for d in l {
                    s.push_str(&format!("{} {}\n", d.domid, d.name));
                }
                Ok(s)
            }
            Request::Ping => Ok(format!("ok xenpv-local {}\n", std::process::id())),
        };
        r.unwrap_or_else(|e| format!("err {}\n", e.to_string().replace('\n', " ")))
    }
}

fn check_name(n: &str) -> Result<()> {
    let ok = !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '/');
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(n.to_owned()))
    }
}

/// Opens and `flock`s `ROOT/local.pid`; fails when another daemon holds it or answers on the
/// control socket.
fn lock_pid_file(root: &Path) -> Result<File> {
    let path = crate::pid_path(root);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .map_err(io_err("open the pid file", &path))?;
    let read_pid = || {
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
    };
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(Error::AlreadyRunning {
                root: root.to_path_buf(),
                pid: read_pid(),
            });
        }
        return Err(io_err("lock the pid file", &path)(e));
    }
    // We hold the lock, but a daemon that does not lock (or whose pid file was removed) may
    // still be serving the control socket.
    if UnixStream::connect(crate::control_path(root)).is_ok() {
        return Err(Error::AlreadyRunning {
            root: root.to_path_buf(),
            pid: read_pid(),
        });
    }
    Ok(f)
}

fn write_pid(mut f: &File, root: &Path) -> Result<()> {
    let path = crate::pid_path(root);
    f.set_len(0)
        .and_then(|()| writeln!(f, "{}", std::process::id()))
        .map_err(io_err("write the pid file", &path))
}

/// Removes the sockets a dead daemon left: `control.sock` and `dom<N>/*.sock`, and the domain
/// directories when that leaves them empty. Anything else in the state directory stays.
fn clean_stale(root: &Path) {
    let mut removed = 0;
    let mut rm = |p: &Path| {
        if std::fs::remove_file(p).is_ok() {
            removed += 1;
        }
    };
    rm(&crate::control_path(root));
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(n) = name.to_str().and_then(|n| n.strip_prefix("dom")) else {
                continue;
            };
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            for s in SOCKETS {
                rm(&e.path().join(s));
            }
            let _ = std::fs::remove_dir(e.path());
        }
    }
    if removed > 0 {
        tracing::info!(removed, "removed sockets left by a daemon that died");
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit: every event-channel port holds two eventfds
/// and every connection a socket.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass, which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            tracing::warn!(
                "cannot raise RLIMIT_NOFILE from {}: {}",
                lim.rlim_cur,
                std::io::Error::last_os_error()
            );
        } else {
            tracing::debug!("RLIMIT_NOFILE raised to {}", lim.rlim_max);
        }
    }
}
