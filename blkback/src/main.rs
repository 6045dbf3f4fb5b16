//! `xenpv-blkback`: the userspace block backend daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use xenpv_blkback::daemon;
use xenpv_blkback::device::{Config, Platform};
use xenpv_evtchn::SpinBudget;

#[derive(Parser)]
#[command(
    name = "xenpv-blkback",
    version,
    about = "Userspace Xen block backend: serves blkif frontends"
)]
struct Args {
    /// xen, local or auto (Xen when /dev/xen/privcmd exists).
    #[arg(long, default_value = "auto")]
    platform: String,
    /// The local platform's state directory (default: $XENPV_STATE_DIR, $XDG_RUNTIME_DIR/xenpv, /run/xenpv).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The domain this backend runs in.
    #[arg(long, default_value_t = 0)]
    domid: u32,
    /// A TOML configuration file (see deploy/blkback.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Rewrite per-device statistics into this file every second.
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// Poll for this many microseconds before sleeping on an event channel (overrides the file;
    /// no polling while more threads are ready to run than there are CPUs).
    #[arg(long)]
    spin_us: Option<u64>,
    /// Most queues a frontend may use (overrides the file).
    #[arg(long)]
    max_queues: Option<u32>,
    /// Do not offer persistent grants.
    #[arg(long)]
    no_persistent: bool,
    /// Open images with O_DIRECT where the toolstack says direct-io-safe.
    #[arg(long)]
    direct_io: bool,
    /// Storage engine for files and block devices: io_uring or psync (a backend's
    /// `xenpv-engine` node overrides it per device).
    #[arg(long)]
    engine: Option<String>,
    /// Where connected devices keep their journals, so that a restarted daemon resumes them
    /// without the guests noticing (default: $RUNTIME_DIRECTORY under systemd, else
    /// /run/xenpv-blkback on Xen and STATE_DIR/blkback-dom<DOMID> on the local platform).
    #[arg(long)]
    journal_dir: Option<PathBuf>,
    /// Keep no journals: a restarted daemon waits for each frontend to renegotiate.
    #[arg(long)]
    no_resume: bool,
}

/// The configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    max_queues: Option<u32>,
    max_ring_page_order: Option<u32>,
    max_indirect_segments: Option<u32>,
    persistent: Option<bool>,
    persistent_capacity: Option<usize>,
    persistent_budget: Option<usize>,
    persistent_timeout_s: Option<u64>,
    direct_io: Option<bool>,
    spin_us: Option<u64>,
    status_file: Option<PathBuf>,
    engine: Option<String>,
    journal_dir: Option<PathBuf>,
    resume: Option<bool>,
}

fn config(args: &Args) -> Result<(Config, Option<PathBuf>), String> {
    let file: File = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            toml::from_str(&text)
                .map_err(|e| format!("bad configuration {}: {e}", path.display()))?
        }
        None => File::default(),
    };
    let mut c = Config::default();
    if let Some(v) = file.max_queues {
        c.max_queues = v;
    }
    if let Some(v) = file.max_ring_page_order {
        if v > 4 {
            return Err(format!(
                "max_ring_page_order = {v}: at most 4 (16 pages), as Linux"
            ));
        }
        c.max_ring_page_order = v;
    }
    if let Some(v) = file.max_indirect_segments {
        let most = xenpv_ring::blkif::MAX_INDIRECT_SEGMENTS;
        if v as usize > most {
            return Err(format!(
                "max_indirect_segments = {v}: at most {most} (8 pages of 512)"
            ));
        }
        c.max_indirect_segments = v;
    }
    if let Some(v) = file.persistent {
        c.persistent = v;
    }
    if let Some(v) = file.persistent_capacity {
        c.persistent_capacity = v;
    }
    if let Some(v) = file.persistent_budget {
        let most = xenpv_grant::max_map_count();
        if v == 0 {
            return Err(
                "persistent_budget = 0: at least 1 (to offer no persistent grants, set persistent = false)"
                    .into(),
            );
        }
        if v >= most {
            return Err(format!(
                "persistent_budget = {v}: vm.max_map_count is {most}, and mappings would fail before the budget is spent; raise it first (sysctl -w vm.max_map_count=N) or choose less than {most}"
            ));
        }
        c.persistent_budget = xenpv_grant::MapBudget::new(v);
    }
    if let Some(v) = file.persistent_timeout_s {
        c.persistent_timeout = Duration::from_secs(v);
    }
    if let Some(v) = file.direct_io {
        c.direct_io = v;
    }
    let spin = args.spin_us.or(file.spin_us);
    if let Some(us) = spin {
        c.spin = if us == 0 {
            SpinBudget::None
        } else {
            SpinBudget::Duration(Duration::from_micros(us))
        };
    }
    if let Some(q) = args.max_queues {
        c.max_queues = q;
    }
    if c.max_queues == 0 || c.max_queues > 64 {
        return Err(format!("max_queues = {}: choose 1..=64", c.max_queues));
    }
    if args.no_persistent {
        c.persistent = false;
    }
    if args.direct_io {
        c.direct_io = true;
    }
    if let Some(e) = args.engine.as_ref().or(file.engine.as_ref()) {
        c.engine = e.parse().map_err(|err| format!("engine `{e}`: {err}"))?;
    }
    c.journal_dir = args.journal_dir.clone().or(file.journal_dir);
    if args.no_resume || file.resume == Some(false) {
        c.journal_dir = None;
    } else if c.journal_dir.is_none() {
        // Decided with the platform (see `journal_default`).
        c.journal_dir = Some(PathBuf::new());
    }
    Ok((c, args.status_file.clone().or(file.status_file)))
}

/// The journal directory when none is configured: systemd's `RuntimeDirectory=` (kept across
/// restarts with `RuntimeDirectoryPreserve=yes`), else `fallback`.
fn journal_default(cfg: &mut Config, fallback: impl FnOnce() -> PathBuf) {
    if cfg
        .journal_dir
        .as_ref()
        .is_some_and(|d| d.as_os_str().is_empty())
    {
        let systemd = std::env::var_os("RUNTIME_DIRECTORY")
            .and_then(|v| std::env::split_paths(&v).next())
            .filter(|p| !p.as_os_str().is_empty());
        cfg.journal_dir = Some(systemd.unwrap_or_else(fallback));
    }
}

fn run(args: Args) -> Result<(), String> {
    let (mut cfg, status) = config(&args)?;
    let dom16 = u16::try_from(args.domid)
        .ok()
        .filter(|d| *d < 0x7ff0)
        .ok_or_else(|| format!("--domid {}: not a domain id (0..=32751)", args.domid))?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| format!("cannot install a signal handler: {e}"))?;
    }
    let xen = match args.platform.as_str() {
        "xen" => true,
        "local" => false,
        "auto" => std::path::Path::new("/dev/xen/privcmd").exists(),
        other => {
            return Err(format!(
                "unknown platform `{other}` (use xen, local or auto)"
            ))
        }
    };
    if xen {
        journal_default(&mut cfg, || PathBuf::from("/run/xenpv-blkback"));
        let xs =
            xenpv_xenstore::Client::open().map_err(|e| format!("cannot reach xenstored: {e}"))?;
        let grants = Arc::new(xenpv_grant::xen::XenGntdev::open().map_err(|e| e.to_string())?);
        let p = Platform {
            xs,
            grants,
            open_evtchn: Arc::new(xenpv_evtchn::xen::XenEvtchn::open),
        };
        daemon::run(p, args.domid, cfg, status, stop).map_err(|e| e.to_string())
    } else {
        let root = args
            .state_dir
            .clone()
            .unwrap_or_else(xenpv_evtchn::local::state_root);
        journal_default(&mut cfg, || root.join(format!("blkback-dom{}", args.domid)));
        let hint = |e: &dyn std::fmt::Display| {
            format!(
                "{e} (is the local platform running at {}? start it with `xenpv local`)",
                root.display()
            )
        };
        let xs = xenpv_xenstore::Client::connect_local(&root, args.domid).map_err(|e| hint(&e))?;
        let grants = Arc::new(
            xenpv_grant::local::LocalGrants::connect(xenpv_grant::local::LocalGrants::socket_path(
                &root, dom16,
            ))
            .map_err(|e| hint(&e))?,
        );
        let evtchn_path = xenpv_evtchn::local::socket_path(&root, dom16);
        let p = Platform {
            xs,
            grants,
            open_evtchn: Arc::new(move || xenpv_evtchn::local::LocalEvtchn::connect(&evtchn_path)),
        };
        daemon::run(p, args.domid, cfg, status, stop).map_err(|e| e.to_string())
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xenpv-blkback: {e}");
            ExitCode::FAILURE
        }
    }
}
