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
    /// List PV devices and their states.
    List,
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

fn run(cli: &Cli) -> Result<(), String> {
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
        Command::List => {
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
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xenpv: {e}");
            ExitCode::FAILURE
        }
    }
}
