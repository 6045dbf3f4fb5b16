//! The daemon: watches this domain's `backend/vbd` directory and serves every device that
//! appears there on its own thread, keeps a status file with per-device statistics, and talks
//! to systemd (readiness and watchdog).
//!
//! Stopping the daemon (SIGTERM, SIGINT) does not close its devices: each answers the requests
//! it consumed and the daemon exits, leaving them Connected with their journals, and the next
//! instance resumes them (docs/blkback-restart.md). Devices close only when the toolstack
//! unplugs them or the frontend closes.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xenpv_evtchn::EventChannel;
use xenpv_grant::GrantMap;
use xenpv_xenstore::xenbus::Changes;
use xenpv_xenstore::XsOps;

use crate::device::{self, Config, Platform, RECHECK};
use crate::queue::Stats;

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// xenstore failed.
    #[error("xenstore: {0}")]
    Xenstore(#[from] xenpv_xenstore::Error),
    /// The status file could not be written.
    #[error("cannot write the status file {path}: {source}")]
    Status {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Sends a message to systemd's notification socket, if `$NOTIFY_SOCKET` is set (sd_notify).
pub fn sd_notify(msg: &str) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(msg.as_bytes(), &addr)?;
    } else {
        sock.send_to(msg.as_bytes(), Path::new(&path))?;
    }
    Ok(true)
}

/// The watchdog interval systemd asked for (`$WATCHDOG_USEC`, for this process).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

struct Served {
    thread: JoinHandle<()>,
    stats: Arc<Mutex<Option<Arc<Stats>>>>,
}

fn write_status(path: &Path, devices: &HashMap<String, Served>) -> Result<(), Error> {
    let mut out = String::new();
    let mut keys: Vec<_> = devices.keys().collect();
    keys.sort();
    for k in keys {
        let stats = devices[k].stats.lock().ok().and_then(|s| s.clone());
        let line = match stats {
            Some(s) => {
                let g = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
                format!(
                    "{k} reads={} writes={} flushes={} discards={} sectors_read={} sectors_written={} errors={} ring_full={} notifications={} indirect={} uncached={}\n",
                    g(&s.reads),
                    g(&s.writes),
                    g(&s.flushes),
                    g(&s.discards),
                    g(&s.sectors_read),
                    g(&s.sectors_written),
                    g(&s.errors),
                    g(&s.ring_full),
                    g(&s.notifications),
                    g(&s.indirect),
                    g(&s.uncached)
                )
            }
            None => format!("{k} starting\n"),
        };
        out.push_str(&line);
    }
    let tmp = path.with_extension("tmp");
    let err = |source| Error::Status {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(out.as_bytes()).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(())
}

/// Serves every vbd of backend domain `domid` until `stop` is set. `status` (if any) is
/// rewritten every second with one line of statistics per device.
pub fn run<G, E>(
    p: Platform<G, E>,
    domid: u32,
    cfg: Config,
    status: Option<PathBuf>,
    stop: Arc<AtomicBool>,
) -> Result<(), Error>
where
    G: GrantMap + Send + Sync + 'static,
    G::Mapping: Send + Sync + 'static,
    E: EventChannel + 'static,
{
    let base = format!("/local/domain/{domid}/backend/vbd");
    let watch = p.xs.watch(&base)?;
    let mut devices: HashMap<String, Served> = HashMap::new();
    let watchdog = watchdog_interval();
    let _ = sd_notify("READY=1\nSTATUS=serving vbd devices");
    tracing::info!(domid, "xenpv-blkback ready, watching {base}");
    if cfg.persistent {
        tracing::info!(
            "persistent grants: at most {} mappings per queue, {} for all devices together",
            cfg.persistent_capacity,
            cfg.persistent_budget.total()
        );
    }
    let mut changes = Changes::new(&[&watch], RECHECK);
    let mut last_ping = Instant::now();
    let mut last_status = Instant::now() - Duration::from_secs(10);
    while !stop.load(Ordering::SeqCst) {
        // First, so that a slow round (xenstore, the status file) does not delay it.
        if let Some(w) = watchdog {
            if last_ping.elapsed() >= w / 2 {
                let _ = sd_notify("WATCHDOG=1");
                last_ping = Instant::now();
            }
        }
        // Every device directory: <base>/<frontend domid>/<devid>, read again when the watch
        // fires (or every `RECHECK`): between changes the loop sends xenstored nothing.
        if changes.due() {
            let mut present = Vec::new();
            let fronts = match p.xs.directory(&base) {
                Ok(v) => v,
                Err(e) if e.is_not_found() => Vec::new(),
                Err(e) => return Err(e.into()),
            };
            for f in fronts {
                let devs = match p.xs.directory(&format!("{base}/{f}")) {
                    Ok(v) => v,
                    Err(e) if e.is_not_found() => Vec::new(),
                    Err(e) => return Err(e.into()),
                };
                for d in devs {
                    present.push(format!("{base}/{f}/{d}"));
                }
            }
            devices.retain(|path, s| !s.thread.is_finished() || present.contains(path));
            for path in present {
                if devices.contains_key(&path) {
                    continue;
                }
                // A finished device thread whose directory still exists: its device was
                // unplugged (online=0) and awaits removal; don't serve it again.
                if p.xs.read_opt(&format!("{path}/online"))?.as_deref() == Some(b"0".as_slice()) {
                    continue;
                }
                let stats = Arc::new(Mutex::new(None));
                let (p2, cfg2, path2, stats2, stop2) = (
                    p.clone(),
                    cfg.clone(),
                    path.clone(),
                    stats.clone(),
                    stop.clone(),
                );
                let thread = std::thread::Builder::new()
                    .name(format!(
                        "vbd-{}",
                        path.rsplit('/').take(2).collect::<Vec<_>>().join("-")
                    ))
                    .spawn(move || {
                        match device::serve_until(&p2, &path2, &cfg2, &stop2, |s| {
                            if let Ok(mut slot) = stats2.lock() {
                                *slot = Some(s);
                            }
                        }) {
                            Ok(_) if stop2.load(Ordering::SeqCst) => {}
                            Ok(_) => tracing::info!("{path2}: unplugged"),
                            Err(e) => tracing::warn!("{path2}: {e}"),
                        }
                    });
                match thread {
                    Ok(thread) => {
                        devices.insert(path, Served { thread, stats });
                    }
                    Err(e) => tracing::warn!("cannot start a device thread for {path}: {e}"),
                }
            }
        }
        if let Some(path) = &status {
            if last_status.elapsed() >= Duration::from_secs(1) {
                write_status(path, &devices)?;
                last_status = Instant::now();
            }
        }
        changes.wait(round_wait(watchdog, last_ping.elapsed()));
    }
    // Stopping (SIGTERM, e.g. `systemctl restart`) is not unplugging: every device thread
    // answers the requests its queues consumed and returns, leaving the device Connected and
    // its journal in place, so that the next instance resumes it without the frontend
    // noticing. Devices close only when the toolstack or the frontend closes them.
    let _ = sd_notify("STOPPING=1\nSTATUS=stopping: connected devices stay connected");
    tracing::info!(
        devices = devices.len(),
        "stopping: finishing in-flight requests; devices stay connected"
    );
    let deadline = Instant::now() + STOP_GRACE;
    for (path, served) in devices {
        while !served.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if served.thread.is_finished() {
            let _ = served.thread.join();
        } else {
            // Its storage hangs: exit anyway; the journal holds what it consumed, and the next
            // instance executes it again.
            tracing::warn!(
                "{path}: requests still in flight at exit; the next instance will redo them"
            );
        }
    }
    Ok(())
}

/// How long the run loop waits for a change under `backend/vbd` before its next round (the
/// status file, the device threads); it reads the directory again only on a change or every
/// [`RECHECK`].
const POLL: Duration = Duration::from_millis(250);

/// How long the run loop may wait before its next round: [`POLL`], but never past the moment
/// the next watchdog ping is due (half the `watchdog` interval after the last ping, which was
/// `since_ping` ago). Waiting a whole [`POLL`] regardless spaced the pings at least 250 ms apart
/// however short the interval: with `WATCHDOG_USEC` at or under about 250 ms (200 ms in the
/// daemon test) every ping came later than systemd allows, and systemd would kill the service.
fn round_wait(watchdog: Option<Duration>, since_ping: Duration) -> Duration {
    match watchdog {
        Some(w) => POLL.min((w / 2).saturating_sub(since_ping)),
        None => POLL,
    }
}

/// How long a stopping daemon waits for its devices to answer what they consumed.
pub const STOP_GRACE: Duration = Duration::from_secs(20);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_wakes_in_time_for_every_watchdog_ping() {
        let ms = Duration::from_millis;
        assert_eq!(round_wait(None, ms(0)), POLL);
        assert_eq!(round_wait(None, ms(60_000)), POLL);
        // systemd's 10 s (deploy/): the usual poll, then just the time left until 5 s.
        assert_eq!(round_wait(Some(ms(10_000)), ms(0)), POLL);
        assert_eq!(round_wait(Some(ms(10_000)), ms(4_900)), ms(100));
        // 200 ms (the daemon test's): the loop wakes 100 ms after a ping, not 250 ms.
        assert_eq!(round_wait(Some(ms(200)), ms(0)), ms(100));
        assert_eq!(round_wait(Some(ms(200)), ms(70)), ms(30));
        // A ping already due (a slow round): no waiting.
        assert_eq!(round_wait(Some(ms(200)), ms(150)), ms(0));
    }
}
