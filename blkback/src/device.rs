//! One virtual block device: the xenbus state machine of pv-protocols.md §1.5 from the
//! backend's side — features at InitWait, rings and event channels when the frontend is
//! Initialised (or Connected), late features and Connected, serving threads per queue, and
//! Closing/Closed on the frontend's close, a protocol error or the toolstack's unplug.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use xenpv_evtchn::{spin_then_wait, EventChannel, SpinBudget};
use xenpv_grant::{Access, DomId, GrantMap, MapCache};
use xenpv_ring::blkif::{Blkif, BlkifX86_32, VDISK_READONLY};
use xenpv_ring::{BackRing, RingMemory};
use xenpv_xenstore::{xenbus, Client, XenbusState, XsOps};

use crate::queue::{Abi, Queue, Stats};
use crate::request::Limits;
use crate::storage::{open_storage, Engine, Storage, StorageOptions};

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
    /// Persistent mappings kept per queue.
    pub persistent_capacity: usize,
    /// Open images with `O_DIRECT` (when the toolstack says `direct-io-safe`).
    pub direct_io: bool,
    /// How long a queue thread polls before sleeping on its event channel
    /// ([`SpinBudget::auto`] by default).
    pub spin: SpinBudget,
    /// Engine for image files and block devices (NBD URIs in `params` always use NBD).
    pub engine: Engine,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_indirect_segments: 256,
            max_ring_page_order: 4,
            max_queues: 4,
            persistent: true,
            persistent_capacity: 1024,
            direct_io: false,
            spin: SpinBudget::auto(),
            engine: Engine::default(),
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

    // Probe: transport features, then InitWait.
    xs.transaction(|tx| {
        tx.write_str(
            &format!("{be}/feature-max-indirect-segments"),
            &cfg.max_indirect_segments.to_string(),
        )?;
        tx.write_str(
            &format!("{be}/max-ring-page-order"),
            &cfg.max_ring_page_order.to_string(),
        )?;
        tx.write_str(
            &format!("{be}/multi-queue-max-queues"),
            &cfg.max_queues.to_string(),
        )?;
        Ok(())
    })?;
    let watch = xs.watch(&fe)?;
    let be_watch = xs.watch(be)?;
    // A frontend already Connected when we start was connected to a previous backend
    // instance (we were restarted). Its ring holds that instance's state: requests it consumed
    // and responses it may have written without publishing them. Attaching to it at index 0 —
    // or even at `rsp_prod` — could replay stale or half-overwritten requests, so wait for the
    // frontend to renegotiate (it sees us leave Connected) before connecting.
    let mut stale = xenbus::read_state(xs, &fe)? == XenbusState::Connected;
    if stale {
        tracing::info!(
            "frontend still connected to a previous backend: waiting for it to reconnect"
        );
    }
    loop {
        if !xs.exists(be)? {
            return Ok(stats);
        }
        xenbus::switch_state(xs, be, XenbusState::InitWait)?;
        // Wait for the frontend to publish its rings (or to go away).
        let fstate = loop {
            let s = xenbus::read_state(xs, &fe)?;
            if !xs.exists(be)? {
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
            let _ = watch.next_timeout(Duration::from_millis(500));
            while be_watch.events().try_recv().is_ok() {}
        };
        tracing::info!(?fstate, "frontend ready: connecting");
        let logical = storage.logical_sector_size();
        let limits = Limits {
            sectors: storage.size() / 512,
            sector_size: logical,
            read_only,
            flush: true,
            barrier: true,
            discard: discard_enable && storage.can_discard() && !read_only,
            discard_secure: false,
            discard_granularity: logical.max(4096),
            max_indirect_segments: cfg.max_indirect_segments,
        };
        match connect(p, be, &fe, fe_id, cfg, &storage, limits, &stats, &watch) {
            Ok(()) => tracing::info!("disconnected"),
            Err(e) => {
                tracing::warn!("device error: {e}");
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
        loop {
            if !xs.exists(be)? || read(xs, &format!("{be}/online"))?.as_deref() == Some("0") {
                return Ok(stats);
            }
            if matches!(
                xenbus::read_state(xs, &fe)?,
                XenbusState::Initialising | XenbusState::Initialised
            ) {
                break;
            }
            let _ = watch.next_timeout(Duration::from_millis(500));
        }
    }
}

struct Running {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<std::result::Result<(), String>>>,
}

#[allow(clippy::too_many_arguments)]
fn connect<G, E>(
    p: &Platform<G, E>,
    be: &str,
    fe: &str,
    fe_id: DomId,
    cfg: &Config,
    storage: &Arc<dyn Storage>,
    limits: Limits,
    stats: &Arc<Stats>,
    watch: &xenpv_xenstore::Watch,
) -> Result<()>
where
    G: GrantMap + Send + Sync + 'static,
    G::Mapping: Send + Sync + 'static,
    E: EventChannel + 'static,
{
    let xs = &p.xs;
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
    let running = Running {
        stop: Arc::new(AtomicBool::new(false)),
        threads: Vec::new(),
    };
    let mut running = running;
    let result = (|| -> Result<()> {
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
                let gref: u32 = read_num(xs, &key, None)?;
                refs.push((fe_id, gref));
            }
            let port: u32 = read_num(xs, &format!("{dir}/event-channel"), None)?;
            let mapping = p.grants.map(&refs, Access::Writable)?;
            let evtchn = (p.open_evtchn)()?;
            let local = evtchn.bind_interdomain(fe_id, port)?;
            let stop = running.stop.clone();
            let grants = p.grants.clone();
            let (storage, stats, spin, cap) = (
                storage.clone(),
                stats.clone(),
                cfg.spin,
                cfg.persistent_capacity,
            );
            let t = std::thread::Builder::new()
                .name(format!("blkback-{fe_id}-q{q}"))
                .spawn(move || {
                    let maps = MapCache::new(grants, cap);
                    let r = if x86_32 {
                        run_queue::<BlkifX86_32, _, _, _>(
                            mapping, fe_id, maps, persistent, storage, limits, stats, evtchn,
                            local, spin, &stop,
                        )
                    } else {
                        run_queue::<Blkif, _, _, _>(
                            mapping, fe_id, maps, persistent, storage, limits, stats, evtchn,
                            local, spin, &stop,
                        )
                    };
                    stop.store(true, Ordering::SeqCst);
                    r
                })
                .map_err(|e| Error::Config {
                    path: be.into(),
                    why: format!("cannot start a queue thread: {e}"),
                })?;
            running.threads.push(t);
        }
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
                &storage
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
            Ok(())
        })?;
        xenbus::switch_state(xs, be, XenbusState::Connected)?;
        tracing::info!(queues, order, persistent, x86_32, "connected");
        // Serve until the frontend closes, a queue fails, or the device is unplugged.
        let mut announced = limits.sectors;
        loop {
            if running.stop.load(Ordering::SeqCst) {
                break;
            }
            match xenbus::read_state(xs, fe)? {
                XenbusState::Closing
                | XenbusState::Closed
                | XenbusState::Unknown
                | XenbusState::Initialising => break,
                _ => {}
            }
            if !xs.exists(be)? {
                break;
            }
            // Online resize: a grown store is announced as blkback does, by rewriting
            // `sectors` and then `state` so that the frontend's watch fires.
            if let Ok(size) = storage.refresh_size() {
                let sectors = size / 512;
                if sectors > announced {
                    tracing::info!(sectors, "disk grew: announcing the new size");
                    xs.transaction(|tx| {
                        tx.write_str(&format!("{be}/sectors"), &sectors.to_string())?;
                        tx.write_str(&format!("{be}/state"), &XenbusState::Connected.as_value())?;
                        Ok(())
                    })?;
                    announced = sectors;
                }
            }
            let _ = watch.next_timeout(Duration::from_millis(200));
        }
        Ok(())
    })();
    running.stop.store(true, Ordering::SeqCst);
    let _ = xenbus::switch_state(xs, be, XenbusState::Closing);
    let mut failure = None;
    for t in running.threads.drain(..) {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(e),
            Err(_) => failure = Some("a queue thread panicked".into()),
        }
    }
    result?;
    match failure {
        Some(why) => Err(Error::Frontend {
            path: fe.into(),
            why,
        }),
        None => Ok(()),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_queue<P, M, G, E>(
    mapping: M,
    fe_id: DomId,
    maps: MapCache<G>,
    persistent: bool,
    storage: Arc<dyn Storage>,
    limits: Limits,
    stats: Arc<Stats>,
    evtchn: E,
    port: u32,
    spin: SpinBudget,
    stop: &AtomicBool,
) -> std::result::Result<(), String>
where
    P: Abi,
    M: RingMemory,
    G: GrantMap,
    G::Mapping: xenpv_grant::GrantMemory,
    E: EventChannel,
{
    let ring = BackRing::<P, _>::new(&mapping).map_err(|e| e.to_string())?;
    let mut q = Queue::new(ring, fe_id, maps, persistent, storage, limits, stats);
    let mut ports = Vec::new();
    let result = loop {
        match q.service() {
            Ok(true) => {
                if let Err(e) = evtchn.notify(port) {
                    break Err(format!("notify: {e}"));
                }
            }
            Ok(false) => {}
            Err(e) => break Err(format!("ring protocol error: {e}")),
        }
        if stop.load(Ordering::SeqCst) {
            break Ok(());
        }
        ports.clear();
        if let Err(e) = spin_then_wait(&evtchn, &mut ports, spin, Some(Duration::from_millis(100)))
        {
            break Err(format!("event channel: {e}"));
        }
        for &p in &ports {
            // Unmask only after the ring has been drained (next iteration drains it again
            // before sleeping, so an event arriving now is not lost).
            let _ = evtchn.unmask(p);
        }
    };
    q.release_mappings();
    let _ = evtchn.unbind(port);
    result
}
