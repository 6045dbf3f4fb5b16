//! `xenpv-blkfront`: connects one blkif disk of this guest and exports it as an NBD server on a
//! Unix socket, until SIGTERM/SIGINT (then closes the device cleanly).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use xenpv_blkfront::export::NbdExport;
use xenpv_blkfront::{BlkFront, DiskInfo, Options, Platform, PoolSize};
use xenpv_evtchn::{EventChannel, SpinBudget};
use xenpv_grant::{GrantShare, SharedPages};
use xenpv_xenstore::Client;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PlatformKind {
    Local,
    Xen,
}

/// Connect a Xen virtual disk and export it over NBD on a Unix socket.
#[derive(Debug, Parser)]
#[command(name = "xenpv-blkfront", version)]
struct Args {
    /// The platform: the local one (processes as domains) or real Xen.
    #[arg(long, value_enum, default_value = "local")]
    platform: PlatformKind,
    /// State directory of the local platform (default: $XENPV_STATE_DIR, $XDG_RUNTIME_DIR/xenpv,
    /// /run/xenpv).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// This guest's domain id.
    #[arg(long)]
    domid: u32,
    /// The disk: a device id (51712) or a name (xvda).
    #[arg(long)]
    device: String,
    /// Where to listen for NBD clients.
    #[arg(long, required_unless_present = "load")]
    nbd_socket: Option<PathBuf>,
    /// Instead of exporting the disk, run workloads read from stdin, one per line
    /// (`RW BS QD RAMP_S RUNTIME_S`, e.g. `randread 4096 32 1 5`), answering each with one
    /// line of JSON on stdout (IOPS, latency percentiles, this process's CPU per I/O), until
    /// end of input. The driver pair measured without NBD (`xenpv bench disk` uses it).
    #[arg(long, conflicts_with = "nbd_socket")]
    load: bool,
    /// Queues (rings) to ask for.
    #[arg(long, default_value_t = 1)]
    queues: u32,
    /// Ring page order to ask for.
    #[arg(long, default_value_t = 0)]
    ring_order: u32,
    /// Do not offer persistent grants.
    #[arg(long)]
    no_persistent: bool,
    /// Do not use indirect descriptors.
    #[arg(long)]
    no_indirect: bool,
    /// Most segments per indirect request (as Linux's `xen_blkfront.max_indirect_segments`),
    /// 12 to 4096; the backend's `feature-max-indirect-segments` caps it.
    #[arg(long, default_value_t = Options::default().max_indirect_segments)]
    max_indirect_segments: u32,
    /// Most pages each queue keeps granted with persistent grants, for requests in flight; at
    /// least the pages of one largest request (257 for 256 segments). By default as many as
    /// the backend says it keeps mapped per queue (xenpv-blkback: 2112, its
    /// persistent_capacity), up to 2112; 960 from a backend that does not say (Linux's blkback
    /// caches 1056); on Xen, fewer if gntalloc's limit (/sys/module/xen_gntalloc/parameters/limit,
    /// 1024 by default, for all users together) has no room for them. Given, it is used
    /// whatever the backend caches: a larger pool makes it map pages per request.
    #[arg(long)]
    pool_pages: Option<usize>,
    /// Hybrid polling: how long (µs) a queue thread with requests in flight polls the ring
    /// before sleeping on the event channel (not at all once its waits average 150 µs or
    /// more, nor while more threads are ready to run than there are CPUs); 0 never polls
    /// (default: 50).
    #[arg(long)]
    spin_us: Option<u64>,
    /// Poll for responses while requests are in flight, never sleeping on the event channel
    /// then (at most 1 s per wait): the highest IOPS, for a CPU busy whenever I/O is
    /// outstanding (as fio's hipri). A `--load` workload can also choose per run.
    #[arg(long)]
    poll: bool,
}

fn state_dir(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os("XENPV_STATE_DIR").map(PathBuf::from))
        .or_else(|| std::env::var_os("XDG_RUNTIME_DIR").map(|d| PathBuf::from(d).join("xenpv")))
        .unwrap_or_else(|| PathBuf::from("/run/xenpv"))
}

fn main() {
    tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("xenpv-blkfront: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    let devid = xenpv_blkfront::vdev::devid(&args.device).ok_or_else(|| {
        format!(
            "--device {}: not a device id or a name like xvda",
            args.device
        )
    })?;
    let most = xenpv_ring::blkif::MAX_INDIRECT_SEGMENTS;
    if !(12..=most).contains(&(args.max_indirect_segments as usize)) {
        return Err(format!(
            "--max-indirect-segments {}: must be 12 to {most} (8 indirect pages of 512 \
             segments); --no-indirect turns indirect requests off",
            args.max_indirect_segments
        ));
    }
    if args.pool_pages == Some(0) {
        return Err(
            "--pool-pages 0: the pool needs room for one request at least; \
                    --no-persistent turns persistent grants off"
                .into(),
        );
    }
    let opts = Options {
        max_indirect_segments: args.max_indirect_segments,
        pool_pages: args.pool_pages.map_or(PoolSize::default(), PoolSize::Pages),
        queues: args.queues,
        ring_order: args.ring_order,
        persistent: !args.no_persistent,
        indirect: !args.no_indirect,
        spin: match args.spin_us {
            None => SpinBudget::default(),
            Some(0) => SpinBudget::None,
            Some(us) => SpinBudget::Duration(Duration::from_micros(us)),
        },
        poll: args.poll,
        ..Options::default()
    };
    let dir = format!("/local/domain/{}/device/vbd/{devid}", args.domid);
    match args.platform {
        PlatformKind::Local => {
            use xenpv_evtchn::local::LocalEvtchn;
            use xenpv_grant::local::LocalGrants;
            let root = state_dir(args.state_dir.clone());
            let dom = root.join(format!("dom{}", args.domid));
            let xs = Client::connect_local(&root, args.domid).map_err(|e| {
                format!(
                    "xenstore of domain {} under {}: {e} (is 'xenpv local' running?)",
                    args.domid,
                    root.display()
                )
            })?;
            let grants = LocalGrants::connect(dom.join("grant.sock"))
                .map_err(|e| format!("grant broker: {e}"))?;
            let ev_sock = dom.join("evtchn.sock");
            let p = Platform {
                xs,
                grants: Arc::new(grants),
                open_evtchn: Arc::new(move || LocalEvtchn::connect(&ev_sock)),
            };
            serve(p, &dir, opts, args.nbd_socket.as_deref())
        }
        PlatformKind::Xen => {
            use xenpv_evtchn::xen::XenEvtchn;
            use xenpv_grant::xen::XenGntalloc;
            let xs = Client::open().map_err(|e| format!("xenstore: {e}"))?;
            let grants = XenGntalloc::open().map_err(|e| e.to_string())?;
            let mut opts = opts;
            if let Some(limit) = XenGntalloc::limit() {
                if let Some(pool) = opts.fit_pool_within(limit) {
                    tracing::info!(
                        "persistent pool: at most {pool} pages per queue, to fit gntalloc's limit \
                         of {limit} grants; raising it ({}) lets 1 MiB requests have more in \
                         flight",
                        xenpv_grant::xen::GNTALLOC_LIMIT_PATH
                    );
                }
                if let Some(w) = limit_warning(opts.most_pages_granted(), limit) {
                    tracing::warn!("{w}");
                }
            }
            let p = Platform {
                xs,
                grants: Arc::new(grants),
                open_evtchn: Arc::new(XenEvtchn::open),
            };
            serve(p, &dir, opts, args.nbd_socket.as_deref())
        }
    }
}

/// What to say when an explicit pool (`--pool-pages`, [`PoolSize::Pages`]) of `info.pool_pages`
/// per queue outgrows what the backend keeps mapped: the backend then maps and unmaps pages
/// for each request (on the local platform, 1 MiB reads at half the rate). A backend that does
/// not say is taken to keep Linux's blkback's default, 1056.
fn pool_warning(info: &DiskInfo, size: PoolSize) -> Option<String> {
    const LINUX_BLKBACK: u64 = 1056;
    let PoolSize::Pages(given) = size else {
        return None;
    };
    let cache = info.backend_cache.unwrap_or(LINUX_BLKBACK);
    (info.persistent && info.pool_pages as u64 > cache).then(|| {
        let said = match info.backend_cache {
            Some(c) => format!("the backend keeps {c} mapped per queue"),
            None => format!(
                "the backend does not say how many it keeps mapped per queue (Linux's blkback: \
                 {LINUX_BLKBACK} by default)"
            ),
        };
        format!(
            "--pool-pages {given}: {said}, so it will map pages for each request, which is \
             slower than a pool it caches whole. Leave --pool-pages out to size the pool to the \
             backend's cache, or raise that (xenpv-blkback: persistent_capacity in its \
             configuration)"
        )
    })
}

/// What to say when gntalloc's `limit` (grants held at once by all of its users) is below the
/// `need` pages this device may grant ([`Options::most_pages_granted`]).
fn limit_warning(need: usize, limit: u64) -> Option<String> {
    (need as u64 > limit).then(|| {
        format!(
            "gntalloc's limit ({limit} grants, for all of its users together) is below the {need} \
             pages this device may grant at once (its rings and persistent pools): requests will \
             wait for pages, and one larger than what is left fails. Raise it (echo {need} plus \
             what other users need > {}) or lower --pool-pages or --queues",
            xenpv_grant::xen::GNTALLOC_LIMIT_PATH
        )
    })
}

fn serve<G, E>(
    p: Platform<G, E>,
    dir: &str,
    opts: Options,
    socket: Option<&std::path::Path>,
) -> Result<(), String>
where
    G: GrantShare + Send + Sync + 'static,
    G::Shared: SharedPages + Send + Sync + 'static,
    E: EventChannel + 'static,
{
    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, term.clone()).map_err(|e| e.to_string())?;
    }
    let size = opts.pool_pages;
    let dev = Arc::new(BlkFront::connect(p, dir, opts).map_err(|e| e.to_string())?);
    if let Some(w) = pool_warning(&dev.info(), size) {
        tracing::warn!("{w}");
    }
    let Some(socket) = socket else {
        return load(&dev, dir, &term);
    };
    let _ = std::fs::remove_file(socket);
    let server = xenpv_nbd::Server::bind_unix(socket, Arc::new(NbdExport::new(dev.clone())))
        .map_err(|e| format!("{}: {e}", socket.display()))?
        .spawn()
        .map_err(|e| e.to_string())?;
    let info = dev.info();
    // Not println!: whoever reads the ready line may close the pipe afterwards (a
    // supervisor that only waits for readiness), and println! panics on EPIPE — exit 101
    // after an otherwise clean close.
    use std::io::Write;
    let mut stdout = std::io::stdout();
    let _ = writeln!(
        stdout,
        "xenpv-blkfront: ready {} size={} sector-size={} queues={} ring-order={} persistent={} pool-pages={} max-segments={} nbd=unix:{}",
        dir,
        dev.size(),
        info.sector_size,
        info.queues,
        info.ring_order,
        info.persistent,
        info.pool_pages,
        info.max_segments,
        socket.display()
    );
    let _ = stdout.flush();
    while !term.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
        if dev.error().is_some() {
            break;
        }
    }
    server.shutdown();
    let r = dev.close();
    let _ = writeln!(stdout, "xenpv-blkfront: closed");
    match (dev.error(), r) {
        (Some(e), _) => Err(e.to_string()),
        (None, Err(e)) => Err(e.to_string()),
        _ => Ok(()),
    }
}

/// `--load`: workloads from stdin, one JSON line each on stdout, until stdin ends or `term`
/// (SIGTERM/SIGINT) is set; a workload running then finishes first.
fn load<G, E>(dev: &Arc<BlkFront<G, E>>, dir: &str, term: &AtomicBool) -> Result<(), String>
where
    G: GrantShare + Send + Sync + 'static,
    G::Shared: SharedPages + Send + Sync + 'static,
    E: EventChannel + 'static,
{
    use std::io::{BufRead, Write};
    let mut stdout = std::io::stdout();
    let _ = writeln!(
        stdout,
        "xenpv-blkfront: ready {dir} size={} load: waiting for workloads on stdin",
        dev.size()
    );
    let _ = stdout.flush();
    // stdin is read on a thread of its own so that a signal is noticed while no line comes.
    let (tx, lines) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while !term.load(Ordering::SeqCst) {
        let line = match lines.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => line.map_err(|e| format!("stdin: {e}"))?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if line.trim().is_empty() {
            continue;
        }
        let out = match line
            .parse::<xenpv_blkfront::load::Workload>()
            .and_then(|w| xenpv_blkfront::load::run(dev, &w))
        {
            Ok(r) => r.to_json(),
            Err(e) => format!("{{\"error\":{:?}}}", e.to_string()),
        };
        if writeln!(stdout, "{out}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            break;
        }
        if dev.error().is_some() {
            break;
        }
    }
    let r = dev.close();
    match (dev.error(), r) {
        (Some(e), _) => Err(e.to_string()),
        (None, Err(e)) => Err(e.to_string()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_fit_gntallocs_default_limit_and_more_does_not() {
        let mut opts = Options::default();
        opts.fit_pool_within(1024);
        assert_eq!(opts.most_pages_granted(), 961);
        assert_eq!(limit_warning(opts.most_pages_granted(), 1024), None);
        let two = Options {
            queues: 2,
            pool_pages: PoolSize::Pages(960),
            ..Options::default()
        };
        let w = limit_warning(two.most_pages_granted(), 1024).unwrap();
        assert!(w.contains("1922") && w.contains("/sys/module/xen_gntalloc/parameters/limit"));
    }

    #[test]
    fn an_explicit_pool_larger_than_the_backends_cache_is_warned_about() {
        let info = |pool_pages, backend_cache| DiskInfo {
            persistent: true,
            pool_pages,
            backend_cache,
            ..DiskInfo::default()
        };
        // The automatic pool is sized to the backend's cache: nothing to say.
        assert_eq!(
            pool_warning(&info(2112, Some(1024)), PoolSize::default()),
            None
        );
        assert_eq!(
            pool_warning(&info(2112, Some(2112)), PoolSize::Pages(2112)),
            None
        );
        let w = pool_warning(&info(2112, Some(1024)), PoolSize::Pages(2112)).unwrap();
        assert!(
            w.contains("--pool-pages 2112") && w.contains("keeps 1024"),
            "{w}"
        );
        assert!(w.contains("persistent_capacity"), "{w}");
        // A backend that does not say is taken to keep Linux's 1056.
        assert_eq!(pool_warning(&info(1024, None), PoolSize::Pages(1000)), None);
        let w = pool_warning(&info(2112, None), PoolSize::Pages(2100)).unwrap();
        assert!(w.contains("does not say") && w.contains("1056"), "{w}");
        // Without persistent grants there is no pool to cache.
        let own = DiskInfo {
            persistent: false,
            ..info(2112, Some(64))
        };
        assert_eq!(pool_warning(&own, PoolSize::Pages(2112)), None);
    }
}
