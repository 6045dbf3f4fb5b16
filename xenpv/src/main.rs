//! `xenpv`: the toolstack command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use xenpv::platform::{self, Platform};
use xenpv::toolstack;
use xenpv_xenstore::Client;

#[derive(Parser)]
#[command(
    name = "xenpv",
    version,
    about = "Xen PV drivers in Rust: toolstack verbs for PV disks and NICs"
)]
struct Cli {
    /// xen, local or auto (Xen when /dev/xen/privcmd exists).
    #[arg(long, global = true, default_value = "auto", value_parser = parse_platform)]
    platform: Platform,
    /// The local platform's state directory (default: $XENPV_STATE_DIR, $XDG_RUNTIME_DIR/xenpv, /run/xenpv).
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

fn parse_platform(s: &str) -> Result<Platform, String> {
    Platform::parse(s).ok_or_else(|| format!("unknown platform `{s}` (use xen, local or auto)"))
}

#[derive(Subcommand)]
enum Command {
    /// Give a domain a disk: SPEC is xl's disk syntax, e.g. `target=/img.raw,vdev=xvda,access=rw`.
    AttachDisk { domid: u32, spec: String },
    /// Give a domain a NIC: SPEC is xl's vif syntax, e.g. `mac=00:16:3e:00:00:01,bridge=xenbr0`.
    AttachNic { domid: u32, spec: String },
    /// Remove a device: DEVICE is a vdev (`xvda`), a number, `vbd/N` or `vif/N`.
    Detach {
        domid: u32,
        device: String,
        /// Seconds to wait for the backend to close the device.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        /// Remove the nodes without waiting for the backend.
        #[arg(long)]
        force: bool,
    },
    /// List PV devices and their states, with each disk's statistics from blkback's status file.
    List {
        /// xenpv-blkback's status file (its `--status-file`); by default the packaged
        /// configuration's, /run/xenpv-blkback/status, when it exists.
        #[arg(long)]
        status_file: Option<PathBuf>,
    },
    /// Benchmark a disk served end to end on the local platform against fio on the same file.
    Bench {
        /// What to benchmark (only `disk` so far).
        #[arg(default_value = "disk")]
        what: String,
        /// Directories for the test file.
        #[arg(long, value_delimiter = ',', default_value = "/tmp,/dev/shm")]
        dirs: Vec<PathBuf>,
        /// Test file size in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Seconds per fio run.
        #[arg(long, default_value_t = 4)]
        runtime: u64,
        /// Interleaved rounds per workload (medians are reported).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Engine of fio's baseline and of blkback: io_uring or psync.
        #[arg(long, default_value = "io_uring")]
        engine: String,
        /// Also write the results as JSON here.
        #[arg(long, default_value = "xenpv-bench.json")]
        json: PathBuf,
        /// A short run (256 MiB, 2 s, 3 rounds) to check the set-up.
        #[arg(long)]
        quick: bool,
        /// Polling budget (µs) of blkback and blkfront before sleeping (default: theirs, 50).
        #[arg(long)]
        spin_us: Option<u64>,
        /// blkback's polling budget alone (µs; overrides --spin-us for the backend).
        #[arg(long)]
        back_spin_us: Option<u64>,
        /// blkfront's polling budget alone (µs; overrides --spin-us for the frontend).
        #[arg(long)]
        front_spin_us: Option<u64>,
        /// Run only the workloads whose name contains this (e.g. `QD32`, `randread QD1`).
        #[arg(long)]
        only: Option<String>,
        /// Measure only fio on the file and the no-NBD driver path (no NBD export, no qemu-nbd,
        /// no pinned runs): a quicker run for experiments on the drivers.
        #[arg(long)]
        direct_only: bool,
        /// Guest memory in 4 KiB pages (sparse memfds) instead of 2 MiB pages (which need
        /// root; without it the bench falls back to 4 KiB and says so).
        #[arg(long)]
        small_pages: bool,
    },
    /// Run the local platform (hypervisor + xenstored for processes) until SIGTERM/SIGINT.
    Local {
        /// Stay in the foreground (the only mode; for systemd `Type=simple` and scripts).
        #[arg(long, default_value_t = true)]
        foreground: bool,
        /// Back each domain's memory with 2 MiB pages, as Xen backs a guest's (a private
        /// `huge=always` tmpfs; needs CAP_SYS_ADMIN). Default: sparse memfds of 4 KiB pages.
        #[arg(long)]
        huge_pages: bool,
    },
    /// Create, destroy or list domains of the local platform.
    #[command(subcommand)]
    Domain(DomainCommand),
}

#[derive(Subcommand)]
enum DomainCommand {
    /// Register a domain; prints its domid.
    Create {
        /// The domid (default: the lowest free one, from 1).
        #[arg(long)]
        domid: Option<u32>,
        /// The name (default: dom<N>).
        #[arg(long)]
        name: Option<String>,
    },
    /// Destroy a domain: its xenstore home, sockets, grants and event channels go away.
    Destroy { domid: u32 },
    /// List domains: domid and name.
    List,
}

/// The local platform's verbs refuse to run against Xen.
fn local_only(cli: &Cli, verb: &str, xen_way: &str) -> Result<(), String> {
    match cli.platform {
        Platform::Local => Ok(()),
        Platform::Xen => Err(format!(
            "`xenpv {verb}` is for the local platform; on Xen {xen_way} \
             (or pass --platform local to use the local platform anyway)"
        )),
    }
}

fn run_local(cli: &Cli, huge_pages: bool) -> Result<(), String> {
    local_only(
        cli,
        "local",
        "xenstored and the hypervisor are already there",
    )?;
    let root = platform::state_dir(cli.state_dir.as_deref());
    let mut cfg = xenpv_local::Config {
        state_dir: Some(root.clone()),
        ..Default::default()
    };
    cfg.grant.huge_pages = huge_pages;
    let daemon = xenpv_local::Daemon::start(cfg).map_err(|e| {
        if huge_pages {
            format!("{e} (run as root for --huge-pages, or leave it out)")
        } else {
            e.to_string()
        }
    })?;
    daemon
        .run_until_signal(|d| {
            // Whoever started us may stop reading after the first line: no panic on EPIPE.
            use std::io::Write;
            let xs = xenpv_local::xenstore_path(d.root(), 0);
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "export XENSTORED_PATH={}", xs.display());
            let _ = writeln!(out, "export XENPV_STATE_DIR={}", d.root().display());
            let _ = out.flush();
        })
        .map_err(|e| e.to_string())
}

fn run_domain(cli: &Cli, cmd: &DomainCommand) -> Result<(), String> {
    let xen_way = match cmd {
        DomainCommand::Create { .. } => "use `xl create`",
        DomainCommand::Destroy { .. } => "use `xl destroy`",
        DomainCommand::List => "use `xl list`",
    };
    local_only(cli, "domain", xen_way)?;
    let root = platform::state_dir(cli.state_dir.as_deref());
    let mut c = xenpv_local::control::Control::connect(&root).map_err(|e| e.to_string())?;
    let err = |e: xenpv_local::Error| e.to_string();
    match cmd {
        DomainCommand::Create { domid, name } => {
            println!("{}", c.create(*domid, name.as_deref()).map_err(err)?);
        }
        DomainCommand::Destroy { domid } => c.destroy(*domid).map_err(err)?,
        DomainCommand::List => {
            println!("{:<6} name", "domid");
            for d in c.list().map_err(err)? {
                println!("{:<6} {}", d.domid, d.name);
            }
        }
    }
    Ok(())
}

fn connect(cli: &Cli) -> Result<Client, String> {
    match cli.platform {
        Platform::Xen => Client::open()
            .map_err(|e| format!("cannot reach xenstored: {e} (is xenstored running?)")),
        Platform::Local => {
            let root = platform::state_dir(cli.state_dir.as_deref());
            Client::connect_local(&root, 0).map_err(|e| {
                format!("cannot reach the local platform under {}: {e} (start it with `xenpv local`, or pass --state-dir)", root.display())
            })
        }
    }
}

fn bench(cli: &Cli) -> Result<(), String> {
    let Command::Bench {
        what,
        dirs,
        size_mib,
        runtime,
        rounds,
        engine,
        json,
        quick,
        spin_us,
        back_spin_us,
        front_spin_us,
        only,
        direct_only,
        small_pages,
    } = &cli.command
    else {
        return Ok(());
    };
    if what != "disk" {
        return Err(format!("unknown benchmark `{what}` (only `disk` so far)"));
    }
    if !matches!(engine.as_str(), "io_uring" | "psync") {
        return Err(format!("unknown engine `{engine}` (use io_uring or psync)"));
    }
    let opts = xenpv::bench::Options {
        dirs: dirs.clone(),
        size_mib: if *quick { 256 } else { *size_mib },
        runtime: if *quick { 2 } else { *runtime },
        rounds: if *quick { 3 } else { *rounds },
        engine: engine.clone(),
        json: Some(json.clone()),
        bin_dir: None,
        back_spin_us: back_spin_us.or(*spin_us),
        front_spin_us: front_spin_us.or(*spin_us),
        only: only.clone(),
        direct_only: *direct_only,
        small_pages: *small_pages,
    };
    if let Some(o) = only {
        if !xenpv::bench::WORKLOADS
            .iter()
            .any(|w| w.name.contains(o.as_str()))
        {
            let names: Vec<_> = xenpv::bench::WORKLOADS.iter().map(|w| w.name).collect();
            return Err(format!(
                "--only {o}: no workload's name contains it (the workloads: {})",
                names.join(", ")
            ));
        }
    }
    let run = xenpv::bench::run_disk(&opts).map_err(|e| e.to_string())?;
    let results = run.dirs;
    xenpv::bench::print(&results, engine);
    // The notification mode the figures were measured in (reference/perf-baselines.md asks for it).
    let mode = |us: Option<u64>| match us {
        None => "hybrid, 50 us budget (the default)".to_string(),
        Some(0) => "event-driven (budget 0)".to_string(),
        Some(us) => format!("hybrid, {us} us budget"),
    };
    let (back, front) = (mode(opts.back_spin_us), mode(opts.front_spin_us));
    let polling = if back == front {
        format!("blkback and blkfront {back}")
    } else {
        format!("blkback {back}; blkfront {front}")
    };
    let gated = if opts.back_spin_us == Some(0) && opts.front_spin_us == Some(0) {
        ""
    } else {
        " (no polling while more threads are ready to run than there are CPUs)"
    };
    println!("polling: {polling}{gated}; the polling-frontend tables: blkfront polls while I/O is in flight (--poll, at most 1 s per wait)");
    let pages = if run.huge_pages {
        "2 MiB pages, as Xen allocates a guest's (xenpv local --huge-pages); fio's buffers (base) too (--mem=mmapshared on a file in 2 MiB pages)"
    } else {
        "4 KiB pages (sparse memfds); fio's buffers (base) too (its own, --mem=malloc)"
    };
    println!("guest memory: {pages}");
    xenpv::bench::print_goals(&results);
    let mut report = xenpv::bench::to_json(&results, engine);
    report["polling"] = serde_json::Value::from(polling);
    let pages_kib = serde_json::Value::from(if run.huge_pages { 2048 } else { 4 });
    report["guest_pages_kib"] = pages_kib.clone();
    report["base_buffer_pages_kib"] = pages_kib;
    let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    std::fs::write(json, text).map_err(|e| format!("cannot write {}: {e}", json.display()))?;
    println!("\nresults written to {}", json.display());
    Ok(())
}

fn run(cli: &Cli) -> Result<(), String> {
    match &cli.command {
        Command::Local { huge_pages, .. } => return run_local(cli, *huge_pages),
        Command::Domain(cmd) => return run_domain(cli, cmd),
        Command::Bench { .. } => return bench(cli),
        _ => {}
    }
    let xs = connect(cli)?;
    let err = |e: toolstack::Error| e.to_string();
    match &cli.command {
        Command::AttachDisk { domid, spec } => {
            let n = toolstack::attach_disk(&xs, *domid, spec).map_err(err)?;
            println!("{}", n.frontend_path);
        }
        Command::AttachNic { domid, spec } => {
            let n = toolstack::attach_nic(&xs, *domid, spec).map_err(err)?;
            println!("{}", n.frontend_path);
        }
        Command::Detach {
            domid,
            device,
            timeout,
            force,
        } => {
            toolstack::detach(&xs, *domid, device, Duration::from_secs(*timeout), *force)
                .map_err(err)?;
        }
        Command::List { status_file } => {
            // Statistics are an addition: without a status file the states are still listed.
            let (status, warning) = xenpv::status::for_list(
                status_file.as_deref(),
                std::path::Path::new(xenpv::status::DEFAULT_PATH),
            )
            .map_err(|e| e.to_string())?;
            if let Some(w) = warning {
                eprintln!("xenpv: {w}");
            }
            if let Some(age) = status.as_ref().and_then(|s| s.age) {
                if age > STALE_STATUS {
                    eprintln!(
                        "xenpv: blkback's status file was last written {} s ago (it is rewritten \
                         every second): is xenpv-blkback running? The statistics below are old.",
                        age.as_secs()
                    );
                }
            }
            println!(
                "{:<6} {:<4} {:<10} {:<7} {:<13} {:<13} detail",
                "domid", "kind", "devid", "backend", "be-state", "fe-state"
            );
            for d in toolstack::list(&xs).map_err(err)? {
                println!(
                    "{:<6} {:<4} {:<10} {:<7} {:<13} {:<13} {}",
                    d.domid,
                    d.kind.as_str(),
                    d.devid,
                    d.backend,
                    format!("{:?}", d.backend_state),
                    format!("{:?}", d.frontend_state),
                    d.detail
                );
                let path = xenpv::layout::backend_path(d.kind, d.backend, d.domid, d.devid);
                match status.as_ref().and_then(|s| s.device(&path)) {
                    Some(xenpv::status::Entry::Counters(c)) => {
                        let kv: Vec<String> = c.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        println!("{:<6} {}", "", kv.join(" "));
                    }
                    Some(xenpv::status::Entry::Starting) => {
                        println!("{:<6} (blkback: not connected yet)", "");
                    }
                    None => {}
                }
            }
        }
        // Served above, before connecting to xenstore.
        Command::Local { .. } | Command::Domain(_) | Command::Bench { .. } => {}
    }
    Ok(())
}

/// A status file older than this (the daemon rewrites it every second) is reported as stale.
const STALE_STATUS: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs what it does; the one-shot verbs only what went wrong.
    let level = match cli.command {
        Command::Local { .. } => tracing_subscriber::filter::LevelFilter::INFO,
        _ => tracing_subscriber::filter::LevelFilter::WARN,
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xenpv: {e}");
            ExitCode::FAILURE
        }
    }
}
