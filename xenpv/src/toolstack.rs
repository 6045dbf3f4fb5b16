//! The toolstack verbs: attach, detach and list PV devices by writing and removing libxl's
//! xenstore nodes, on real Xen (the dom0 xenstored) or on the local platform (its dom0 socket).

use std::time::{Duration, Instant};

use xenpv_xenstore::{xenbus, Client, XenbusState, XsOps};

use crate::layout::{self, DeviceNodes, DomId, Kind};
use crate::spec::{DiskSpec, Vdev, VifSpec};

/// Why a toolstack verb failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad specification.
    #[error(transparent)]
    Spec(#[from] crate::spec::Error),
    /// xenstore refused or failed.
    #[error(transparent)]
    Xenstore(#[from] xenpv_xenstore::Error),
    /// The device is already there.
    #[error("{kind} {devid} of domain {domid} already exists at {path} (detach it first)")]
    Exists {
        /// vbd or vif.
        kind: &'static str,
        /// Device id.
        devid: u32,
        /// Frontend domain.
        domid: DomId,
        /// The node found.
        path: String,
    },
    /// The device is not there.
    #[error("domain {domid} has no device {device} (see `xenpv list`)")]
    NoDevice {
        /// Frontend domain.
        domid: DomId,
        /// The device asked for.
        device: String,
    },
    /// The domain does not exist.
    #[error("domain {0} does not exist (no /local/domain/{0}; create it first)")]
    NoDomain(DomId),
    /// No backend domain of that name.
    #[error("backend domain `{0}` not found (give a domid or the name in /local/domain/*/name)")]
    NoBackendDomain(String),
    /// The backend did not close the device in time.
    #[error("the backend of {path} did not reach Closed within {secs} s (is the backend daemon running? use --force to remove the nodes anyway)")]
    DetachTimeout {
        /// The backend directory.
        path: String,
        /// The timeout.
        secs: u64,
    },
}

/// `Result` with this module's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

fn resolve_backend(xs: &Client, backend: Option<&str>) -> Result<DomId> {
    let Some(name) = backend else { return Ok(0) };
    if let Ok(id) = name.parse::<DomId>() {
        return Ok(id);
    }
    for dom in xs.directory("/local/domain")? {
        if let Ok(Some(n)) = xs.read_opt(&format!("/local/domain/{dom}/name")) {
            if n == name.as_bytes() {
                if let Ok(id) = dom.parse() {
                    return Ok(id);
                }
            }
        }
    }
    Err(Error::NoBackendDomain(name.to_string()))
}

fn check_domain(xs: &Client, domid: DomId) -> Result<()> {
    if xs.exists(&format!("/local/domain/{domid}"))? {
        Ok(())
    } else {
        Err(Error::NoDomain(domid))
    }
}

/// Writes every node of `nodes` in one transaction: each directory first with its permissions
/// (so that its keys inherit them), then the keys; refuses if the frontend directory exists.
pub fn write_nodes(xs: &Client, nodes: &DeviceNodes, frontend: DomId) -> Result<()> {
    let kind = nodes.kind.as_str();
    xs.transaction(|tx| {
        if tx.exists(&nodes.frontend_path)? || tx.exists(&nodes.backend_path)? {
            return Ok(Err(Error::Exists {
                kind,
                devid: nodes.devid,
                domid: frontend,
                path: nodes.frontend_path.clone(),
            }));
        }
        for (dir, perms, keys) in [
            (&nodes.backend_path, &nodes.backend_perms, &nodes.backend),
            (&nodes.frontend_path, &nodes.frontend_perms, &nodes.frontend),
        ] {
            tx.mkdir(dir)?;
            tx.set_perms(dir, perms)?;
            for (k, v) in keys {
                tx.write_str(&format!("{dir}/{k}"), v)?;
            }
        }
        Ok(Ok(()))
    })?
}

/// `xl block-attach`: gives domain `domid` the disk `spec`.
pub fn attach_disk(xs: &Client, domid: DomId, spec: &str) -> Result<DeviceNodes> {
    let spec = DiskSpec::parse(spec)?;
    check_domain(xs, domid)?;
    let backend = resolve_backend(xs, spec.backend.as_deref())?;
    let nodes = layout::vbd(&spec, domid, backend);
    write_nodes(xs, &nodes, domid)?;
    Ok(nodes)
}

/// `xl network-attach`: gives domain `domid` the NIC `spec` (device id: the one given, else the
/// lowest free).
pub fn attach_nic(xs: &Client, domid: DomId, spec: &str) -> Result<DeviceNodes> {
    let spec = VifSpec::parse(spec)?;
    check_domain(xs, domid)?;
    let backend = resolve_backend(xs, spec.backend.as_deref())?;
    let devid = match spec.devid {
        Some(d) => d,
        None => {
            let used: Vec<u32> = match xs.directory(&format!("/local/domain/{domid}/device/vif")) {
                Ok(v) => v.iter().filter_map(|d| d.parse().ok()).collect(),
                Err(e) if e.is_not_found() => Vec::new(),
                Err(e) => return Err(e.into()),
            };
            (0..).find(|d| !used.contains(d)).unwrap_or(0)
        }
    };
    let nodes = layout::vif(&spec, devid, domid, backend);
    write_nodes(xs, &nodes, domid)?;
    Ok(nodes)
}

/// Finds a device of domain `domid` by name: `xvda`, `51712`, `vbd/51712`, `vif/0`.
pub fn find_device(xs: &Client, domid: DomId, device: &str) -> Result<(Kind, u32, String)> {
    let none = || Error::NoDevice {
        domid,
        device: device.to_string(),
    };
    let (kind, devid) = if let Some(n) = device.strip_prefix("vif/") {
        (Kind::Vif, n.parse().map_err(|_| none())?)
    } else if let Some(n) = device.strip_prefix("vbd/") {
        (Kind::Vbd, n.parse().map_err(|_| none())?)
    } else {
        (Kind::Vbd, Vdev::parse(device).map_err(|_| none())?.devid)
    };
    let fe = layout::frontend_path(kind, domid, devid);
    let backend = match xs.read_opt(&format!("{fe}/backend"))? {
        Some(b) => String::from_utf8_lossy(&b).into_owned(),
        None => return Err(none()),
    };
    Ok((kind, devid, backend))
}

/// `xl block-detach` / `network-detach`: asks the backend to close (`online=0`, state
/// Closing), waits until it reaches Closed (or its directory is gone), then removes both
/// directories. With `force`, removes them without waiting.
pub fn detach(
    xs: &Client,
    domid: DomId,
    device: &str,
    timeout: Duration,
    force: bool,
) -> Result<()> {
    let (kind, devid, be) = find_device(xs, domid, device)?;
    let fe = layout::frontend_path(kind, domid, devid);
    if !force && xs.exists(&be)? {
        let watch = xs.watch(&format!("{be}/state"))?;
        xs.transaction(|tx| {
            if tx.exists(&be)? {
                tx.write_str(&format!("{be}/online"), "0")?;
                // A backend that already closed the device stays Closed.
                if xenbus::read_state(tx, &be)? != XenbusState::Closed {
                    tx.write_str(&format!("{be}/state"), &XenbusState::Closing.as_value())?;
                }
            }
            Ok(())
        })?;
        let deadline = Instant::now() + timeout;
        loop {
            match xenbus::read_state(xs, &be)? {
                XenbusState::Closed | XenbusState::Unknown => break,
                _ => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::DetachTimeout {
                    path: be,
                    secs: timeout.as_secs(),
                });
            }
            let _ = watch.next_timeout(left);
        }
    }
    xs.transaction(|tx| {
        for dir in [&fe, &be] {
            match tx.rm(dir) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })?;
    Ok(())
}

/// One attached device, as `xenpv list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Frontend domain.
    pub domid: DomId,
    /// Backend domain.
    pub backend: DomId,
    /// vbd or vif.
    pub kind: Kind,
    /// Device id.
    pub devid: u32,
    /// Backend state.
    pub backend_state: XenbusState,
    /// Frontend state.
    pub frontend_state: XenbusState,
    /// `dev`+`params` for a disk, `mac`+`bridge` for a NIC.
    pub detail: String,
}

/// Every vbd and vif served by any domain's backend directory.
pub fn list(xs: &Client) -> Result<Vec<DeviceInfo>> {
    let mut out = Vec::new();
    let dir = |p: &str| -> Result<Vec<String>> {
        match xs.directory(p) {
            Ok(v) => Ok(v),
            Err(e) if e.is_not_found() => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    };
    let read = |p: String| {
        xs.read_opt(&p)
            .ok()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    };
    for bdom in dir("/local/domain")? {
        let Ok(backend) = bdom.parse::<DomId>() else {
            continue;
        };
        for kind in [Kind::Vbd, Kind::Vif] {
            let base = format!("/local/domain/{backend}/backend/{}", kind.as_str());
            for fdom in dir(&base)? {
                let Ok(domid) = fdom.parse::<DomId>() else {
                    continue;
                };
                for dev in dir(&format!("{base}/{fdom}"))? {
                    let Ok(devid) = dev.parse::<u32>() else {
                        continue;
                    };
                    let be = format!("{base}/{fdom}/{dev}");
                    let fe = layout::frontend_path(kind, domid, devid);
                    let detail = match kind {
                        Kind::Vbd => format!(
                            "{} {} {}",
                            read(format!("{be}/dev")),
                            read(format!("{be}/mode")),
                            read(format!("{be}/params"))
                        ),
                        Kind::Vif => format!(
                            "{} {}",
                            read(format!("{be}/mac")),
                            read(format!("{be}/bridge"))
                        ),
                    };
                    out.push(DeviceInfo {
                        domid,
                        backend,
                        kind,
                        devid,
                        backend_state: xenbus::read_state(xs, &be)?,
                        frontend_state: xenbus::read_state(xs, &fe)?,
                        detail: detail.trim().to_string(),
                    });
                }
            }
        }
    }
    out.sort_by_key(|d| (d.domid, d.kind.as_str(), d.devid));
    Ok(out)
}
