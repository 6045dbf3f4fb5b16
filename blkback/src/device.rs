//! One virtual block device: the xenbus state machine of pv-protocols.md §1.5 from the
//! backend's side — features at InitWait, rings and event channels when the frontend is
//! Initialised (or Connected), late features and Connected, serving threads per queue, and
//! Closing/Closed on the frontend's close, a protocol error or the toolstack's unplug.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xenpv_evtchn::{EventChannel, HybridPoll, SpinBudget, StopSignal};
use xenpv_grant::{Access, DomId, GrantMap, MapBudget, MapCache};
use xenpv_ring::blkif::{Blkif, BlkifX86_32, VDISK_READONLY};
use xenpv_ring::{BackRing, RingMemory};
use xenpv_xenstore::xenbus::{self, Changes};
use xenpv_xenstore::{Client, XenbusState, XsOps};

use crate::journal::{self, Identity, Journal, QueueIdentity, QueueJournal, Recovered};
use crate::queue::{Abi, Queue, Stats};
use crate::request::Limits;
use crate::storage::{open_storage, Engine, Storage, StorageOptions};

/// The longest a device thread or the daemon's loop goes without reading the xenstore nodes it
/// follows while no watch fires: a safety net, as a watch event is what says to look.
pub(crate) const RECHECK: Duration = Duration::from_secs(5);

/// Tunables of the daemon.
#[derive(Debug, Clone)]
pub struct Config {
    /// `feature-max-indirect-segments` to offer (0: no indirect requests).
    pub max_indirect_segments: u32,
    /// `max-ring-page-order` to offer.
    pub max_ring_page_order: u32,
    /// `multi-queue-max-queues` to offer.
    pub max_queues: u32,
    /// Offer `feature-persistent`.
    pub persistent: bool,
    /// Persistent mappings kept per queue (beyond it, one not used lately is unmapped; a
    /// request whose pages find no room, all the cached ones being in use, is mapped whole for
    /// its duration, as without persistent grants). Written to xenstore for the frontend
    /// (`xenpv-max-persistent-grants`), which sizes its pool to it: xenpv-blkfront's pool grows
    /// to 2112 pages at most. 2112 by default (eight 1 MiB requests at a time, each 256 data
    /// pages and an indirect page); Linux's blkback keeps 1056.
    pub persistent_capacity: usize,
    /// Persistent mappings kept by all the devices and queues of the daemon together (clones of
    /// a `Config` share it). Every cached mapping is a memory mapping of the process, and Linux
    /// allows a process `vm.max_map_count` of them (65530 by default): 8 guests with 4 queues
    /// of 2112 would reach it, and then maps fail. A queue that finds the budget spent serves
    /// its requests as when its own cache is full; a queue holding more than an equal part of
    /// it (the budget divided by the queues connected) then gives idle mappings back as it
    /// works, for those below their part ([`MapBudget`]). By default half of
    /// `vm.max_map_count`.
    pub persistent_budget: MapBudget,
    /// A persistent mapping unused this long (give or take half of it) is unmapped, as Linux's
    /// blkback does after `pgrant_timeout` (60 s): an idle guest then keeps no share of the
    /// budget. Checked while a queue is idle. Zero: never.
    pub persistent_timeout: Duration,
    /// Open images with `O_DIRECT` (when the toolstack says `direct-io-safe`).
    pub direct_io: bool,
    /// Hybrid polling budget of a queue thread: it polls the ring (and its completions) this
    /// long before it sleeps on its event channel, after sleeping through most of a wait that
    /// usually lasts longer ([`xenpv_evtchn::HybridPoll`]); it does not poll while the
    /// machine's CPUs are oversubscribed ([`xenpv_evtchn::cpu_contended`]). 50 µs by default
    /// ([`SpinBudget::default`]); [`SpinBudget::None`] is purely event-driven.
    pub spin: SpinBudget,
    /// Engine for image files and block devices (NBD URIs in `params` always use NBD).
    pub engine: Engine,
    /// Where each connected device keeps its journal ([`crate::journal`]), so that a restarted
    /// daemon resumes it without the frontend noticing. `None`: no journal; a restarted
    /// daemon waits for the frontend to renegotiate.
    pub journal_dir: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_indirect_segments: 256,
            max_ring_page_order: 4,
            max_queues: 4,
            persistent: true,
            persistent_capacity: 2112,
            persistent_budget: MapBudget::half_of_max_map_count(),
            persistent_timeout: Duration::from_secs(60),
            direct_io: false,
            spin: SpinBudget::default(),
            engine: Engine::default(),
            journal_dir: None,
        }
    }
}

/// Why a device could not be served.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// xenstore failed.
    #[error("xenstore: {0}")]
    Xenstore(#[from] xenpv_xenstore::Error),
    /// The toolstack's nodes are missing or wrong.
    #[error("bad backend node {path}: {why}")]
    Config {
        /// The node.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The frontend's nodes are wrong (a protocol error of that frontend).
    #[error("frontend {path}: {why}")]
    Frontend {
        /// The node.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The storage could not be opened.
    #[error(transparent)]
    Storage(#[from] crate::storage::Error),
    /// A grant operation failed.
    #[error("grant: {0}")]
    Grant(#[from] xenpv_grant::Error),
    /// An event-channel operation failed.
    #[error("event channel: {0}")]
    Evtchn(#[from] xenpv_evtchn::Error),
    /// The ring memory was refused.
    #[error("ring: {0}")]
    Ring(#[from] xenpv_ring::Error),
    /// A connection left by the previous instance could not be taken over.
    #[error("cannot resume the connection: {why}")]
    Resume {
        /// Why.
        why: String,
    },
}

type Result<T> = std::result::Result<T, Error>;

/// What a device needs from the platform: xenstore, grant mapping, and a way to open one
/// event-channel handle per queue (each queue thread waits on its own).
pub struct Platform<G, E> {
    /// xenstore with the backend domain's identity.
    pub xs: Client,
    /// Grant mapping.
    pub grants: Arc<G>,
    /// Opens an event-channel handle.
    pub open_evtchn: Arc<dyn Fn() -> std::result::Result<E, xenpv_evtchn::Error> + Send + Sync>,
}

impl<G, E> Clone for Platform<G, E> {
    fn clone(&self) -> Self {
        Self {
            xs: self.xs.clone(),
            grants: self.grants.clone(),
            open_evtchn: self.open_evtchn.clone(),
        }
    }
}

fn read(xs: &Client, path: &str) -> Result<Option<String>> {
    Ok(xs
        .read_opt(path)?
        .map(|v| String::from_utf8_lossy(&v).into_owned()))
}

fn read_num<T: std::str::FromStr>(xs: &Client, path: &str, default: Option<T>) -> Result<T> {
    match read(xs, path)? {
        Some(s) => s.trim().parse().map_err(|_| Error::Frontend {
            path: path.into(),
            why: format!("`{s}` is not a number"),
        }),
        None => default.ok_or_else(|| Error::Frontend {
            path: path.into(),
            why: "missing".into(),
        }),
    }
}
/// Serves the device whose backend directory is `be` until the toolstack unplugs it (the
/// directory disappears, or `online` is 0 when the frontend has closed). Returns the device's
/// statistics.
pub fn serve<G, E>(p: &Platform<G, E>, be: &str, cfg: &Config) -> Result<Arc<Stats>>
where
    G: GrantMap + Send + Sync + 'static,
    G::Mapping: Send + Sync + 'static,
    E: EventChannel + 'static,
{
    serve_with_stats(p, be, cfg, |_| {})
}

/// [`serve`], handing the device's statistics to `on_stats` as soon as the device is open.
pub fn serve_with_stats<G, E>(
    p: &Platform<G, E>,
    be: &str,
    cfg: &Config,
    on_stats: impl FnOnce(Arc<Stats>),
) -> Result<Arc<Stats>>
where
    G: GrantMap + Send + Sync + 'static,
    G::Mapping: Send + Sync + 'static,
    E: EventChannel + 'static,
{
    serve_until(p, be, cfg, &AtomicBool::new(false), on_stats)
}

/// Whether a connection ended, or the daemon is shutting down with it still connected.
enum Outcome {
    /// The frontend closed, or the device was unplugged: the device leaves Connected.
    Disconnected,
    /// The daemon stops: the device stays Connected (and its journal stays) for the next
    /// instance to resume.
    Shutdown,
}

/// [`serve_with_stats`] until the device is unplugged or `shutdown` is set. On shutdown the
/// queues finish the requests they consumed, answer them and stop; the device's xenstore state
/// is left as it is (Connected stays Connected), and its journal (with [`Config::journal_dir`])
/// stays for the next instance, which resumes the device instead of renegotiating.
pub fn serve_until<G, E>(
    p: &Platform<G, E>,
    be: &str,
    cfg: &Config,
    shutdown: &AtomicBool,
    on_stats: impl FnOnce(Arc<Stats>),
) -> Result<Arc<Stats>>
where
    G: GrantMap + Send + Sync + 'static,
    G::Mapping: Send + Sync + 'static,
    E: EventChannel + 'static,
{
    let xs = &p.xs;
    let bad = |k: &str, why: &str| Error::Config {
        path: format!("{be}/{k}"),
        why: why.into(),
    };
    let fe = read(xs, &format!("{be}/frontend"))?.ok_or_else(|| bad("frontend", "missing"))?;
    let fe_id: DomId = read(xs, &format!("{be}/frontend-id"))?
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| bad("frontend-id", "missing or not a domid"))?;
    let params = read(xs, &format!("{be}/params"))?
        .ok_or_else(|| bad("params", "missing: the image path"))?;
    let read_only = read(xs, &format!("{be}/mode"))?.as_deref() == Some("r");
    let direct =
        cfg.direct_io && read(xs, &format!("{be}/direct-io-safe"))?.as_deref() == Some("1");
    let discard_enable = read(xs, &format!("{be}/discard-enable"))?.as_deref() != Some("0");
    // The engine is per backend (engines differ 5x on tmpfs): the daemon's default, or the
    // toolstack's choice in the backend's `xenpv-engine` node.
    let engine = match read(xs, &format!("{be}/xenpv-engine"))? {
        Some(e) => e
            .parse()
            .map_err(|e: crate::storage::Error| bad("xenpv-engine", &e.to_string()))?,
        None => cfg.engine,
    };
    let storage: Arc<dyn Storage> = open_storage(
        &params,
        &StorageOptions {
            engine,
            read_only,
            direct,
            sector_size: 512,
        },
    )?;
    // A read-only NBD export makes the disk read-only whatever the mode node says.
    let read_only = read_only || storage.read_only();
    let stats = Arc::new(Stats::default());
    on_stats(stats.clone());
    let span = tracing::info_span!(
        "vbd",
        domid = fe_id,
        dev = be.rsplit('/').next().unwrap_or("")
    );
    let _g = span.enter();
    tracing::info!(engine = storage.engine(), "serving {}", params.trim());
    let journal_path = cfg.journal_dir.as_ref().map(|d| journal::path_for(d, be));
    let limits = || {
        let logical = storage.logical_sector_size();
        Limits {
            sectors: storage.size() / 512,
            sector_size: logical,
            read_only,
            flush: true,
            barrier: true,
            discard: discard_enable && storage.can_discard() && !read_only,
            discard_secure: false,
            discard_granularity: logical.max(4096),
            max_indirect_segments: cfg.max_indirect_segments,
        }
    };
    let watch = xs.watch(&fe)?;
    let be_watch = xs.watch(be)?;
    let dev = Dev {
        p,
        be,
        fe: &fe,
        fe_id,
        cfg,
        storage: &storage,
        stats: &stats,
        watch: &watch,
        be_watch: &be_watch,
        shutdown,
        journal: journal_path.as_deref(),
    };

    // Both sides Connected when we start: a previous instance of the daemon served this
    // device. Resume it if its journal matches the connection; otherwise its ring holds that
    // instance's state (requests it consumed, responses it may have written without publishing
    // them), and attaching to it at index 0 — or even at `rsp_prod` — could replay stale or
    // half-overwritten requests: refuse it and wait for the frontend to renegotiate (it sees us
    // leave Connected).
    // Probe: transport features, then InitWait (below). Not when resuming: the frontend
    // negotiated with what the previous instance wrote.
    let probe = || {
        xs.transaction(|tx| {
            // Without indirect requests the key is not there at all (blkif.h): a "0" is not
            // what frontends look for, and a value left by an earlier configuration must go.
            let indirect = format!("{be}/feature-max-indirect-segments");
            if cfg.max_indirect_segments > 0 {
                tx.write_str(&indirect, &cfg.max_indirect_segments.to_string())?;
            } else {
                match tx.rm(&indirect) {
                    Err(e) if !e.is_not_found() => return Err(e),
                    _ => {}
                }
            }
            tx.write_str(
                &format!("{be}/max-ring-page-order"),
                &cfg.max_ring_page_order.to_string(),
            )?;
            tx.write_str(
                &format!("{be}/multi-queue-max-queues"),
                &cfg.max_queues.to_string(),
            )?;
            Ok(())
        })
    };
    let mut probed = false;
    let mut resumed = None;
    let mut stale = false;
    if frontend_state(xs, &fe)? == XenbusState::Connected {
        stale = true;
        if xenbus::read_state(xs, be)? == XenbusState::Connected {
            match dev.recover() {
                Ok(r) => {
                    resumed = Some(r);
                    stale = false;
                }
                Err(why) => {
                    tracing::warn!("cannot resume the connection: {why}");
                    dev.forget();
                }
            }
        }
    }
    if stale {
        tracing::info!(
            "frontend still connected to a previous backend: waiting for it to reconnect"
        );
    }
    loop {
        let outcome = if let Some(r) = resumed.take() {
            let mut limits = limits();
            limits.max_indirect_segments = r.identity.max_indirect_segments;
            dev.connect(limits, Some(r))
        } else {
            if !xs.exists(be)? {
                dev.forget();
                return Ok(stats);
            }
            if !probed {
                probe()?;
                probed = true;
            }
            xenbus::switch_state(xs, be, XenbusState::InitWait)?;
            // Wait for the frontend to publish its rings (or to go away).
            // Read again when a watch fires (or every `RECHECK`): a frontend that never comes
            // (a guest without PV drivers) costs xenstored nothing.
            let mut changes = Changes::new(&[&watch, &be_watch], RECHECK);
            let fstate = loop {
                if shutdown.load(Ordering::SeqCst) {
                    return Ok(stats);
                }
                if changes.due() {
                    let s = frontend_state(xs, &fe)?;
                    if !xs.exists(be)? {
                        dev.forget();
                        return Ok(stats);
                    }
                    if s != XenbusState::Connected {
                        stale = false;
                    }
                    match s {
                        XenbusState::Connected if stale => {}
                        XenbusState::Initialised | XenbusState::Connected => break s,
                        XenbusState::Closing | XenbusState::Closed | XenbusState::Unknown => {
                            if read(xs, &format!("{be}/online"))?.as_deref() == Some("0") {
                                let _ = xenbus::switch_state(xs, be, XenbusState::Closed);
                                dev.forget();
                                return Ok(stats);
                            }
                            if matches!(s, XenbusState::Closing | XenbusState::Closed) {
                                // Follow the frontend to Closed (as Linux blkback does).
                                let _ = xenbus::switch_state(xs, be, XenbusState::Closed);
                            }
                        }
                        XenbusState::Initialising => {
                            // The frontend (re)starts: offer the device again ("prepare for
                            // reconnect"), also after following it to Closed.
                            xenbus::switch_state(xs, be, XenbusState::InitWait)?;
                        }
                        _ => {}
                    }
                }
                changes.wait(Duration::from_millis(500));
            };
            tracing::info!(?fstate, "frontend ready: connecting");
            dev.connect(limits(), None)
        };
        match outcome {
            Ok(Outcome::Shutdown) => {
                tracing::info!("daemon stopping: the device stays connected");
                return Ok(stats);
            }
            Ok(Outcome::Disconnected) => {
                tracing::info!("disconnected");
                dev.forget();
            }
            Err(Error::Resume { why }) => {
                // Nothing was attached: fall back to waiting for the frontend to renegotiate.
                tracing::warn!("cannot resume the connection: {why}");
                dev.forget();
                stale = true;
                continue;
            }
            Err(e) => {
                tracing::warn!("device error: {e}");
                dev.forget();
                let _ = xs.write_str(&format!("{be}/error"), &e.to_string());
                let _ = xenbus::switch_state(xs, be, XenbusState::Closing);
                // Wait for the frontend to close before offering a reconnect.
                let _ = xenbus::wait_for_peer_state(
                    xs,
                    &fe,
                    |s| {
                        matches!(
                            s,
                            XenbusState::Closing
                                | XenbusState::Closed
                                | XenbusState::Initialising
                                | XenbusState::Unknown
                        )
                    },
                    Duration::from_secs(30),
                );
            }
        }
        let _ = xenbus::switch_state(xs, be, XenbusState::Closed);
        // Reconnect when the frontend comes back (Initialising), unless unplugged.
        let mut changes = Changes::new(&[&watch, &be_watch], RECHECK);
        loop {
            if shutdown.load(Ordering::SeqCst) {
                return Ok(stats);
            }
            if changes.due() {
                if !xs.exists(be)? || read(xs, &format!("{be}/online"))?.as_deref() == Some("0") {
                    return Ok(stats);
                }
                if matches!(
                    frontend_state(xs, &fe)?,
                    XenbusState::Initialising | XenbusState::Initialised
                ) {
                    break;
                }
            }
            changes.wait(Duration::from_millis(500));
        }
    }
}

/// The frontend's state. Its node is the frontend's to write: a value that is no state at all
/// reads as [`XenbusState::Unknown`] (as Linux's `xenbus_read_driver_state` reads it), so that
/// a connected device disconnects and waits for the frontend to start over (`Initialising`),
/// instead of its thread ending on the error and the device never being served again.
fn frontend_state(xs: &Client, fe: &str) -> Result<XenbusState> {
    match xenbus::read_state(xs, fe) {
        Err(xenpv_xenstore::Error::BadState { value, path }) => {
            tracing::warn!(
                path,
                value,
                "the frontend's state is no xenbus state: read as Unknown"
            );
            Ok(XenbusState::Unknown)
        }
        r => Ok(r?),
    }
}

/// One device being served: what `connect` needs.
struct Dev<'a, G, E> {
    p: &'a Platform<G, E>,
    be: &'a str,
    fe: &'a str,
    fe_id: DomId,
    cfg: &'a Config,
    storage: &'a Arc<dyn Storage>,
    stats: &'a Arc<Stats>,
    watch: &'a xenpv_xenstore::Watch,
    /// The backend directory's watch (the toolstack unplugging or removing the device).
    be_watch: &'a xenpv_xenstore::Watch,
    shutdown: &'a AtomicBool,
    journal: Option<&'a Path>,
}

/// The frontend's connection nodes, as read and checked against what we offer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FrontendRings {
    order: u32,
    x86_32: bool,
    persistent: bool,
    queues: Vec<QueueIdentity>,
}

struct Running {
    stop: Arc<StopSignal>,
    threads: Vec<std::thread::JoinHandle<std::result::Result<(), String>>>,
}

/// Where a queue thread starts: a fresh ring at index 0, or a resumed one.
enum Start {
    Fresh,
    Resume {
        /// The shared `rsp_prod` seen when the journal was checked.
        rsp_prod: u32,
        /// The saved consumer index.
        req_cons: u32,
        /// The requests to answer first.
        pending: Vec<journal::Pending>,
    },
}

/// A queue's ring and event channel, set up before any queue thread starts.
struct QueueSetup<M, E> {
    mapping: M,
    evtchn: E,
    local: u32,
    start: Start,
}

impl<G, E> Dev<'_, G, E>
where
    G: GrantMap + Send + Sync + 'static,
    G::Mapping: Send + Sync + 'static,
    E: EventChannel + 'static,
{
    /// Deletes the device's journal: it is not connected any more.
    fn forget(&self) {
        if let Some(path) = self.journal {
            Journal::remove(path);
        }
    }

    /// The journal of a previous instance, if it describes the connection both sides still
    /// have (same frontend, rings, event channels, ABI and session); why not otherwise.
    fn recover(&self) -> std::result::Result<Recovered, String> {
        let path = self.journal.ok_or("no journal directory is configured")?;
        let r = Journal::load(path).map_err(|e| e.to_string())?;
        let id = &r.identity;
        if id.frontend != self.fe || id.frontend_id != self.fe_id {
            return Err(format!(
                "the journal is for frontend {} of domain {}",
                id.frontend, id.frontend_id
            ));
        }
        let session =
            read(&self.p.xs, &format!("{}/xenpv-session", self.be)).map_err(|e| e.to_string())?;
        if session.as_deref().map(str::trim) != Some(format!("{:016x}", id.session).as_str()) {
            return Err(format!(
                "the journal's session {:016x} is not the connection's ({session:?})",
                id.session
            ));
        }
        let mut cfg = self.cfg.clone();
        cfg.max_ring_page_order = journal::MAX_RING_ORDER;
        cfg.max_queues = journal::MAX_QUEUES as u32;
        cfg.persistent = id.persistent;
        let now = read_frontend(&self.p.xs, self.fe, &cfg).map_err(|e| e.to_string())?;
        let then = FrontendRings {
            order: id.order,
            x86_32: id.x86_32,
            persistent: id.persistent,
            queues: id.queues.clone(),
        };
        if now != then {
            return Err(format!(
                "the frontend's rings changed: journal {then:?}, xenstore {now:?}"
            ));
        }
        Ok(r)
    }

    /// Connects the rings the frontend published (`resume`: none, a new connection; or the
    /// journal of the previous instance, whose connection is taken over), serves them until
    /// the frontend closes, a queue fails, the device is unplugged or the daemon shuts down.
    fn connect(&self, limits: Limits, resume: Option<Recovered>) -> Result<Outcome> {
        let xs = &self.p.xs;
        let (be, fe, fe_id, cfg) = (self.be, self.fe, self.fe_id, self.cfg);
        let resuming = resume.is_some();
        let rings = match &resume {
            Some(r) => FrontendRings {
                order: r.identity.order,
                x86_32: r.identity.x86_32,
                persistent: r.identity.persistent,
                queues: r.identity.queues.clone(),
            },
            None => read_frontend(xs, fe, cfg)?,
        };
        let (order, x86_32, persistent) = (rings.order, rings.x86_32, rings.persistent);
        let queues = rings.queues.len();

        // Every queue's ring and event channel first, so that a journal that does not fit
        // the rings leaves nothing half-resumed.
        let mut setups = Vec::with_capacity(queues);
        for (q, qi) in rings.queues.iter().enumerate() {
            let refs: Vec<_> = qi.refs.iter().map(|&g| (fe_id, g)).collect();
            let mapping = self.p.grants.map(&refs, Access::Writable)?;
            let start = match &resume {
                None => Start::Fresh,
                Some(r) => {
                    let saved = r.queues.get(q).ok_or_else(|| Error::Resume {
                        why: format!("the journal has no queue {q}"),
                    })?;
                    let (rsp_prod, req_cons) = if x86_32 {
                        resume_indexes::<BlkifX86_32, _>(&mapping, saved.req_cons)
                    } else {
                        resume_indexes::<Blkif, _>(&mapping, saved.req_cons)
                    }?;
                    let pending = saved
                        .pending(rsp_prod)
                        .map_err(|why| Error::Resume { why })?;
                    Start::Resume {
                        rsp_prod,
                        req_cons,
                        pending,
                    }
                }
            };
            let evtchn = (self.p.open_evtchn)()?;
            let local = if resuming {
                bind_again(&evtchn, fe_id, qi.port)?
            } else {
                evtchn.bind_interdomain(fe_id, qi.port)?
            };
            setups.push(QueueSetup {
                mapping,
                evtchn,
                local,
                start,
            });
        }

        // The journal: taken over, or a new one (a session id ties it to this connection).
        let (journal, session) = match (&resume, self.journal) {
            (Some(r), Some(path)) => (
                Some(Journal::reopen(path, r).map_err(|e| Error::Resume { why: e.to_string() })?),
                r.identity.session,
            ),
            (None, Some(path)) => {
                let id = Identity {
                    session: journal::new_session(),
                    frontend_id: fe_id,
                    frontend: fe.to_string(),
                    order,
                    x86_32,
                    persistent,
                    max_indirect_segments: limits.max_indirect_segments,
                    queues: rings.queues.clone(),
                };
                match Journal::create(path, &id) {
                    Ok(j) => (Some(j), id.session),
                    Err(e) => {
                        tracing::warn!("no journal, a restart will renegotiate: {e}");
                        Journal::remove(path);
                        (None, id.session)
                    }
                }
            }
            (_, None) => (None, journal::new_session()),
        };

        let mut running = Running {
            stop: Arc::new(StopSignal::new().map_err(|e| Error::Config {
                path: be.into(),
                why: format!("cannot make the queues' stop signal: {e}"),
            })?),
            threads: Vec::new(),
        };
        let result = (|| -> Result<Outcome> {
            for (q, s) in setups.into_iter().enumerate() {
                let stop = running.stop.clone();
                let grants = self.p.grants.clone();
                let qj = journal.as_ref().and_then(|j| j.queue(q));
                let (storage, stats, spin, cap, budget, timeout) = (
                    self.storage.clone(),
                    self.stats.clone(),
                    cfg.spin,
                    cfg.persistent_capacity,
                    cfg.persistent_budget.clone(),
                    cfg.persistent_timeout,
                );
                let t = std::thread::Builder::new()
                    .name(format!("blkback-{fe_id}-q{q}"))
                    .spawn(move || {
                        let maps = MapCache::with_budget(grants, cap, budget);
                        let io = QueueIo {
                            fe_id,
                            maps,
                            persistent,
                            storage,
                            limits,
                            stats,
                            journal: qj,
                            spin,
                            sweep: Sweep::new(timeout),
                        };
                        let r = if x86_32 {
                            run_queue::<BlkifX86_32, _, _, _>(s, io, &stop)
                        } else {
                            run_queue::<Blkif, _, _, _>(s, io, &stop)
                        };
                        stop.set();
                        r
                    })
                    .map_err(|e| Error::Config {
                        path: be.into(),
                        why: format!("cannot start a queue thread: {e}"),
                    })?;
                running.threads.push(t);
            }
            let announced = if resuming {
                tracing::info!(queues, order, persistent, x86_32, "resumed");
                read(xs, &format!("{be}/sectors"))?
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(limits.sectors)
            } else {
                self.announce(&limits, session)?;
                xenbus::switch_state(xs, be, XenbusState::Connected)?;
                tracing::info!(queues, order, persistent, x86_32, "connected");
                limits.sectors
            };
            self.supervise(&running, announced)
        })();
        running.stop.set();
        if !matches!(result, Ok(Outcome::Shutdown)) {
            let _ = xenbus::switch_state(xs, be, XenbusState::Closing);
        }
        let mut failure = None;
        for t in running.threads.drain(..) {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = Some(e),
                Err(_) => failure = Some("a queue thread panicked".into()),
            }
        }
        let outcome = result?;
        match failure {
            Some(why) => Err(Error::Frontend {
                path: fe.into(),
                why,
            }),
            None => Ok(outcome),
        }
    }

    /// The late features and the device's properties, in one transaction (before Connected).
    fn announce(&self, limits: &Limits, session: u64) -> Result<()> {
        let (xs, be, cfg) = (&self.p.xs, self.be, self.cfg);
        let info = if limits.read_only { VDISK_READONLY } else { 0 };
        xs.transaction(|tx| {
            // A reconnect recovers the device from an earlier protocol error: the `error` node
            // written then describes the old connection, not this one.
            match tx.rm(&format!("{be}/error")) {
                Err(e) if !e.is_not_found() => return Err(e),
                _ => {}
            }
            tx.write_str(&format!("{be}/sectors"), &limits.sectors.to_string())?;
            tx.write_str(&format!("{be}/info"), &info.to_string())?;
            // `sectors` stays in 512-byte units whatever the sector size (blkif.h, Linux).
            tx.write_str(
                &format!("{be}/sector-size"),
                &limits.sector_size.to_string(),
            )?;
            tx.write_str(
                &format!("{be}/physical-sector-size"),
                &self
                    .storage
                    .physical_sector_size()
                    .max(limits.sector_size)
                    .to_string(),
            )?;
            tx.write_str(&format!("{be}/feature-flush-cache"), "1")?;
            tx.write_str(&format!("{be}/feature-barrier"), "1")?;
            tx.write_str(
                &format!("{be}/feature-discard"),
                if limits.discard { "1" } else { "0" },
            )?;
            if limits.discard {
                tx.write_str(
                    &format!("{be}/discard-granularity"),
                    &limits.discard_granularity.to_string(),
                )?;
                tx.write_str(&format!("{be}/discard-alignment"), "0")?;
                tx.write_str(&format!("{be}/discard-secure"), "0")?;
            }
            tx.write_str(
                &format!("{be}/feature-persistent"),
                if cfg.persistent { "1" } else { "0" },
            )?;
            // How many of a queue's persistent grants stay mapped, so that our frontend's pool
            // does not outgrow them (its pages would then be mapped for each request).
            if cfg.persistent {
                tx.write_str(
                    &format!("{be}/{}", xenpv_ring::blkif::BACKEND_CACHE_NODE),
                    &cfg.persistent_capacity.to_string(),
                )?;
            }
            // Ties the journal to this connection (a restarted daemon resumes only a
            // connection whose session matches its journal's).
            tx.write_str(&format!("{be}/xenpv-session"), &format!("{session:016x}"))?;
            Ok(())
        })?;
        Ok(())
    }

    /// Serves until the frontend closes, a queue fails, the device is unplugged or the daemon
    /// shuts down; announces online growth of the disk.
    fn supervise(&self, running: &Running, mut announced: u64) -> Result<Outcome> {
        let (xs, be, fe) = (&self.p.xs, self.be, self.fe);
        // The nodes are read when a watch fires (and every `RECHECK`); the flags and the
        // store's size at every round.
        let mut changes = Changes::new(&[self.watch, self.be_watch], RECHECK);
        loop {
            if self.shutdown.load(Ordering::SeqCst) {
                return Ok(Outcome::Shutdown);
            }
            if running.stop.is_set() {
                return Ok(Outcome::Disconnected);
            }
            if changes.due() {
                match frontend_state(xs, fe)? {
                    XenbusState::Closing
                    | XenbusState::Closed
                    | XenbusState::Unknown
                    | XenbusState::Initialising => return Ok(Outcome::Disconnected),
                    _ => {}
                }
                if !xs.exists(be)? {
                    return Ok(Outcome::Disconnected);
                }
            }
            // Online resize: a store that grew or shrank is announced as Linux's blkback
            // does, by rewriting `sectors` and then `state` so that the frontend's watch
            // fires. Requests are checked against the store's size at each drain: sectors a
            // shrink took away are refused from then on.
            if let Ok(size) = self.storage.refresh_size() {
                let sectors = size / 512;
                if sectors != announced {
                    tracing::info!(
                        sectors,
                        previous = announced,
                        "disk resized: announcing the new size"
                    );
                    xs.transaction(|tx| {
                        tx.write_str(&format!("{be}/sectors"), &sectors.to_string())?;
                        tx.write_str(&format!("{be}/state"), &XenbusState::Connected.as_value())?;
                        Ok(())
                    })?;
                    announced = sectors;
                }
            }
            changes.wait(Duration::from_millis(200));
        }
    }
}

/// Reads the frontend's ring nodes and checks them against what `cfg` offers.
fn read_frontend(xs: &Client, fe: &str, cfg: &Config) -> Result<FrontendRings> {
    let ferr = |k: &str, why: String| Error::Frontend {
        path: format!("{fe}/{k}"),
        why,
    };
    let order: u32 = read_num(xs, &format!("{fe}/ring-page-order"), Some(0))?;
    if order > cfg.max_ring_page_order {
        return Err(ferr(
            "ring-page-order",
            format!(
                "{order} exceeds our max-ring-page-order {}",
                cfg.max_ring_page_order
            ),
        ));
    }
    let queues: u32 = read_num(xs, &format!("{fe}/multi-queue-num-queues"), Some(1))?;
    if queues == 0 || queues > cfg.max_queues {
        return Err(ferr(
            "multi-queue-num-queues",
            format!("{queues} is not in 1..={}", cfg.max_queues),
        ));
    }
    let protocol = read(xs, &format!("{fe}/protocol"))?.unwrap_or_else(|| "x86_64-abi".into());
    let x86_32 = match protocol.trim() {
        "x86_64-abi" | "arm-abi" | "native" => false,
        "x86_32-abi" => true,
        other => return Err(ferr("protocol", format!("unknown ABI `{other}`"))),
    };
    let persistent =
        cfg.persistent && read(xs, &format!("{fe}/feature-persistent"))?.as_deref() == Some("1");
    let mut qs = Vec::with_capacity(queues as usize);
    for q in 0..queues {
        let dir = if queues == 1 {
            fe.to_string()
        } else {
            format!("{fe}/queue-{q}")
        };
        let pages = 1u32 << order;
        let mut refs = Vec::with_capacity(pages as usize);
        for i in 0..pages {
            let key = if order == 0 {
                format!("{dir}/ring-ref")
            } else {
                format!("{dir}/ring-ref{i}")
            };
            refs.push(read_num(xs, &key, None)?);
        }
        let port: u32 = read_num(xs, &format!("{dir}/event-channel"), None)?;
        qs.push(QueueIdentity { port, refs });
    }
    Ok(FrontendRings {
        order,
        x86_32,
        persistent,
        queues: qs,
    })
}

/// The shared `rsp_prod` of a connected ring and the saved `req_cons`, if they fit together
/// ([`BackRing::resume`]).
fn resume_indexes<P: Abi, M: RingMemory>(mapping: M, req_cons: u32) -> Result<(u32, u32)> {
    let ring = BackRing::<P, _>::resume(mapping, req_cons).map_err(|e| Error::Resume {
        why: format!("the saved ring index does not fit the ring: {e}"),
    })?;
    Ok((ring.rsp_prod_pvt(), ring.req_cons()))
}

/// Binds the frontend's port again after a restart. The previous instance's binding goes away
/// when that process's handle is closed (on Xen by the kernel at its exit, on the local platform
/// by the broker when its connection drops), which may be a moment after it died: retry a while.
fn bind_again<E: EventChannel>(evtchn: &E, fe_id: DomId, port: u32) -> Result<u32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match evtchn.bind_interdomain(fe_id, port) {
            Ok(local) => return Ok(local),
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(Error::Resume {
                    why: format!("cannot bind the frontend's port {port} again: {e}"),
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// What a queue thread serves with.
struct QueueIo<G: GrantMap> {
    fe_id: DomId,
    maps: MapCache<G>,
    persistent: bool,
    storage: Arc<dyn Storage>,
    limits: Limits,
    stats: Arc<Stats>,
    journal: Option<QueueJournal>,
    spin: SpinBudget,
    sweep: Sweep,
}

/// When an idle queue next unmaps the persistent mappings left unused
/// ([`Queue::sweep_mappings`]): every half [`Config::persistent_timeout`].
struct Sweep {
    every: Option<Duration>,
    last: Instant,
}

impl Sweep {
    fn new(timeout: Duration) -> Self {
        Self {
            every: (!timeout.is_zero()).then(|| timeout / 2),
            last: Instant::now(),
        }
    }

    /// Sweeps `q` if a period has passed since the last sweep.
    fn run<P: Abi, M: RingMemory, G: GrantMap>(&mut self, q: &mut Queue<P, M, G>) {
        if let Some(every) = self.every {
            if self.last.elapsed() >= every {
                let n = q.sweep_mappings();
                if n > 0 {
                    tracing::debug!("unmapped {n} persistent grants left unused");
                }
                self.last = Instant::now();
            }
        }
    }

    /// How long `q` may sleep before its next sweep is due: no limit while it caches nothing
    /// (or sweeps are off), so that an idle queue thread is not woken for nothing.
    fn due_in<P: Abi, M: RingMemory, G: GrantMap>(&self, q: &Queue<P, M, G>) -> Option<Duration> {
        let every = self.every?;
        (q.cached_mappings() > 0).then(|| every.saturating_sub(self.last.elapsed()))
    }
}

fn run_queue<P, M, G, E>(
    setup: QueueSetup<M, E>,
    io: QueueIo<G>,
    stop: &StopSignal,
) -> std::result::Result<(), String>
where
    P: Abi,
    M: RingMemory,
    G: GrantMap,
    G::Mapping: xenpv_grant::GrantMemory,
    E: EventChannel,
{
    let QueueSetup {
        mapping,
        evtchn,
        local: port,
        start,
    } = setup;
    let (ring, pending) = match start {
        Start::Fresh => (
            BackRing::<P, _>::new(&mapping).map_err(|e| e.to_string())?,
            None,
        ),
        Start::Resume {
            rsp_prod,
            req_cons,
            pending,
        } => {
            let ring = BackRing::<P, _>::resume(&mapping, req_cons).map_err(|e| e.to_string())?;
            if ring.rsp_prod_pvt() != rsp_prod {
                return Err(format!(
                    "the frontend moved rsp_prod from {rsp_prod} to {} while we resumed",
                    ring.rsp_prod_pvt()
                ));
            }
            (ring, Some(pending))
        }
    };
    let mut q = Queue::new(
        ring,
        io.fe_id,
        io.maps,
        io.persistent,
        io.storage,
        io.limits,
        io.stats,
    );
    if let Some(j) = io.journal {
        q = q.with_journal(j);
    }
    let mut ports = Vec::new();
    let result = (|| {
        if let Some(pending) = pending {
            if !pending.is_empty() {
                tracing::info!(
                    requests = pending.len(),
                    "answering what the previous instance left unanswered"
                );
            }
            // Also with nothing pending: it resets the journal's slots.
            q.resume(&pending)
                .map_err(|e| format!("ring protocol error: {e}"))?;
            // Whatever the notify decision, and also with nothing pending: the previous
            // instance may have died between publishing responses and notifying, and the
            // frontend may sleep on them (a frontend with no timeout on its event channel, as
            // Linux's blkfront and ours, would sleep for good).
            evtchn.notify(port).map_err(|e| format!("notify: {e}"))?;
        }
        let mut sweep = io.sweep;
        if q.pipelined() {
            return pipeline_loop(&mut q, &evtchn, port, io.spin, &mut sweep, stop);
        }
        let protocol = |e: xenpv_ring::Error| format!("ring protocol error: {e}");
        let mut poller = HybridPoll::new(io.spin);
        loop {
            poller.woken();
            let mut failed = None;
            q.serve_notifying(false, &mut || {
                if let Err(e) = evtchn.notify(port) {
                    failed = Some(format!("notify: {e}"));
                }
            })
            .map_err(protocol)?;
            if let Some(e) = failed {
                return Err(e);
            }
            if stop.is_set() {
                return Ok(());
            }
            // Hybrid polling: poll the ring with `req_event` unarmed (the frontend does not
            // notify meanwhile), then arm it and sleep.
            if poller.poll(|| q.work_waiting()) || q.final_check().map_err(protocol)? {
                continue;
            }
            sweep.run(&mut q);
            ports.clear();
            evtchn
                .wait_or_stop(&mut ports, sweep.due_in(&q), stop)
                .map_err(|e| format!("event channel: {e}"))?;
            for &p in &ports {
                // Unmask only after the ring has been drained (next iteration drains it again
                // before sleeping, so an event arriving now is not lost).
                let _ = evtchn.unmask(p);
            }
        }
    })();
    q.release_mappings();
    let _ = evtchn.unbind(port);
    result
}

/// How long before the expected end of a wait for I/O a pipelined queue stops dozing on the
/// storage's completions and polls: a completion that comes earlier ends the doze anyway, so a
/// short lead costs no latency, only less polling. `xenpv bench`, /tmp randread QD32 with no
/// NBD (2 rounds each, interleaved): 15 µs gave 78k and 71k IOPS at 7.5 and 6.8 µs of blkback
/// CPU per I/O; the whole 50 µs budget 63k and 62k at 9.0 and 8.4 µs.
const DOZE_LEAD: Duration = Duration::from_micros(15);

/// The loop of a pipelined queue ([`Queue::pump`]): requests are taken while others are in
/// flight, and answered as their I/O completes. Between rounds it polls the ring and the
/// storage's completions for the spin budget; then, with requests in flight, it sleeps on the
/// event channel and the completions together ([`Queue::wait`]), with none on the event channel.
/// When every slot of the ring holds a request not answered ([`Queue::ring_exhausted`]), only
/// the storage can end the wait: it sleeps at once, as fio does on its completions. `xenpv
/// bench`, /tmp randread QD32 (3 interleaved pairs): blkback's CPU per I/O 7.06, 7.45, 6.72 µs
/// polling, 6.26, 6.43, 6.15 µs asleep, at 0.94, 0.86, 0.98 against 0.93, 0.86, 0.92 of fio.
fn pipeline_loop<P, M, G, E>(
    q: &mut Queue<P, M, G>,
    evtchn: &E,
    port: u32,
    spin: SpinBudget,
    sweep: &mut Sweep,
    stop: &StopSignal,
) -> std::result::Result<(), String>
where
    P: Abi,
    M: RingMemory,
    G: GrantMap,
    G::Mapping: xenpv_grant::GrantMemory,
    E: EventChannel,
{
    let protocol = |e: xenpv_ring::Error| format!("ring protocol error: {e}");
    let notify = || evtchn.notify(port).map_err(|e| format!("notify: {e}"));
    let mut ports = Vec::new();
    // Waits with I/O in flight (for completions, mostly) and without (for requests) last
    // differently: one poller each.
    let (mut busy, mut idle) = (
        HybridPoll::with_lead(spin, DOZE_LEAD),
        HybridPoll::new(spin),
    );
    loop {
        busy.woken();
        idle.woken();
        if stop.is_set() {
            // Answer what was consumed, take nothing more.
            if q.finish().map_err(protocol)? {
                notify()?;
            }
            return Ok(());
        }
        let p = q.pump().map_err(protocol)?;
        if p.notify {
            notify()?;
        }
        // Hybrid polling: poll the ring and the storage's completions with `req_event` unarmed
        // (the frontend does not notify meanwhile), then arm it and sleep on both.
        // With I/O in flight, the first part of a long wait is spent blocked on the storage's
        // completions (with a timeout), so that one coming early wakes the thread at once.
        let found = p.progressed
            || if q.in_flight() > 0 && q.ring_exhausted() {
                // Only the storage can end this wait: block on it at once.
                false
            } else if q.in_flight() > 0 {
                busy.poll_on(q, |q| q.work_waiting(), |q, d| q.doze(d))
            } else {
                idle.poll(|| q.work_waiting())
            };
        if found || q.final_check().map_err(protocol)? {
            continue;
        }
        ports.clear();
        if q.in_flight() > 0 {
            if q.wait(Some(evtchn.as_fd())) {
                evtchn
                    .pending(&mut ports)
                    .map_err(|e| format!("event channel: {e}"))?;
            }
        } else {
            sweep.run(q);
            evtchn
                .wait_or_stop(&mut ports, sweep.due_in(q), stop)
                .map_err(|e| format!("event channel: {e}"))?;
        }
        for &p in &ports {
            // Unmasked before the ring is drained again (the next round does that before any
            // sleep, and `final_check` re-arms `req_event`), so no event is lost.
            let _ = evtchn.unmask(p);
        }
    }
}
