//! libxl's xenstore layout for PV disks (vbd) and NICs (vif): the nodes `xl block-attach` /
//! `xl network-attach` write (libxl__device_generic_add), with their permissions.

use crate::spec::{DiskSpec, VifSpec};
pub use xenpv_xenstore::{Access, Perm};

/// A domain id.
pub type DomId = u32;

/// The kind of device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A block device (`vbd`).
    Vbd,
    /// A network interface (`vif`).
    Vif,
}

impl Kind {
    /// The xenstore directory name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vbd => "vbd",
            Self::Vif => "vif",
        }
    }
}

/// Every node of one device: the backend and frontend directories, their keys, and their
/// permissions (applied recursively to each directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNodes {
    /// vbd or vif.
    pub kind: Kind,
    /// The device id.
    pub devid: u32,
    /// `/local/domain/<backend>/backend/<kind>/<frontend>/<devid>`.
    pub backend_path: String,
    /// `/local/domain/<frontend>/device/<kind>/<devid>`.
    pub frontend_path: String,
    /// Keys and values under the backend directory.
    pub backend: Vec<(String, String)>,
    /// Keys and values under the frontend directory.
    pub frontend: Vec<(String, String)>,
    /// Backend directory permissions: owned by the backend domain, readable by the frontend.
    pub backend_perms: Vec<Perm>,
    /// Frontend directory permissions: owned by the frontend domain, readable by the backend.
    pub frontend_perms: Vec<Perm>,
}

/// `/local/domain/<b>/backend/<kind>/<f>/<devid>`.
pub fn backend_path(kind: Kind, backend: DomId, frontend: DomId, devid: u32) -> String {
    format!(
        "/local/domain/{backend}/backend/{}/{frontend}/{devid}",
        kind.as_str()
    )
}

/// `/local/domain/<f>/device/<kind>/<devid>`.
pub fn frontend_path(kind: Kind, frontend: DomId, devid: u32) -> String {
    format!("/local/domain/{frontend}/device/{}/{devid}", kind.as_str())
}

fn kv(k: &str, v: impl ToString) -> (String, String) {
    (k.to_string(), v.to_string())
}

fn perms(owner: DomId, reader: DomId) -> Vec<Perm> {
    vec![
        Perm {
            domid: owner,
            access: Access::None,
        },
        Perm {
            domid: reader,
            access: Access::Read,
        },
    ]
}

/// The nodes of a disk for domain `frontend`, served by domain `backend`.
pub fn vbd(spec: &DiskSpec, frontend: DomId, backend: DomId) -> DeviceNodes {
    let devid = spec.vdev.devid;
    let backend_path = backend_path(Kind::Vbd, backend, frontend, devid);
    let frontend_path = frontend_path(Kind::Vbd, frontend, devid);
    let mut be = vec![
        kv("frontend", &frontend_path),
        kv("frontend-id", frontend),
        kv("online", 1),
        kv("removable", 0),
        kv("bootable", 1),
        kv("state", 1),
        kv("dev", &spec.vdev.name),
        kv(
            "type",
            if spec.target.starts_with("/dev/") {
                "phy"
            } else {
                "file"
            },
        ),
        kv("mode", spec.access.mode()),
        kv("device-type", spec.devtype.as_str()),
        kv("params", &spec.target),
        kv("format", spec.format),
    ];
    if let Some(discard) = spec.discard {
        be.push(kv("discard-enable", u8::from(discard)));
    }
    if spec.direct_io_safe {
        be.push(kv("direct-io-safe", 1));
    }
    if let Some(script) = &spec.script {
        be.push(kv("script", script));
    }
    let fe = vec![
        kv("backend", &backend_path),
        kv("backend-id", backend),
        kv("state", 1),
        kv("virtual-device", devid),
        kv("device-type", spec.devtype.as_str()),
        kv("trusted", u8::from(spec.trusted)),
    ];
    DeviceNodes {
        kind: Kind::Vbd,
        devid,
        backend_path,
        frontend_path,
        backend: be,
        frontend: fe,
        backend_perms: perms(backend, frontend),
        frontend_perms: perms(frontend, backend),
    }
}

/// The nodes of a NIC `devid` for domain `frontend`, served by domain `backend`.
pub fn vif(spec: &VifSpec, devid: u32, frontend: DomId, backend: DomId) -> DeviceNodes {
    let backend_path = backend_path(Kind::Vif, backend, frontend, devid);
    let frontend_path = frontend_path(Kind::Vif, frontend, devid);
    let mac = spec.mac.to_string();
    let mut be = vec![
        kv("frontend", &frontend_path),
        kv("frontend-id", frontend),
        kv("online", 1),
        kv("state", 1),
        kv("handle", devid),
        kv("mac", &mac),
        kv("mtu", spec.mtu),
        kv("type", "vif"),
    ];
    for (key, value) in [
        ("bridge", &spec.bridge),
        ("ip", &spec.ip),
        ("script", &spec.script),
        ("vifname", &spec.vifname),
        ("gatewaydev", &spec.gatewaydev),
    ] {
        if let Some(v) = value {
            be.push(kv(key, v));
        }
    }
    if let Some(rate) = spec.rate {
        be.push(kv("rate", format!("{},{}", rate.bytes, rate.usecs)));
    }
    let fe = vec![
        kv("backend", &backend_path),
        kv("backend-id", backend),
        kv("state", 1),
        kv("handle", devid),
        kv("mac", &mac),
        kv("mtu", spec.mtu),
        kv("trusted", 1),
    ];
    DeviceNodes {
        kind: Kind::Vif,
        devid,
        backend_path,
        frontend_path,
        backend: be,
        frontend: fe,
        backend_perms: perms(backend, frontend),
        frontend_perms: perms(frontend, backend),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(kvs: &'a [(String, String)], k: &str) -> Option<&'a str> {
        kvs.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn vbd_matches_libxl() {
        let spec = DiskSpec::parse("vdev=xvda,access=rw,target=/img.raw").unwrap();
        let n = vbd(&spec, 5, 0);
        assert_eq!(n.backend_path, "/local/domain/0/backend/vbd/5/51712");
        assert_eq!(n.frontend_path, "/local/domain/5/device/vbd/51712");
        for (k, v) in [
            ("frontend", "/local/domain/5/device/vbd/51712"),
            ("frontend-id", "5"),
            ("online", "1"),
            ("state", "1"),
            ("dev", "xvda"),
            ("type", "file"),
            ("mode", "w"),
            ("device-type", "disk"),
            ("params", "/img.raw"),
        ] {
            assert_eq!(get(&n.backend, k), Some(v), "backend {k}");
        }
        for (k, v) in [
            ("backend", "/local/domain/0/backend/vbd/5/51712"),
            ("backend-id", "0"),
            ("state", "1"),
            ("virtual-device", "51712"),
            ("device-type", "disk"),
        ] {
            assert_eq!(get(&n.frontend, k), Some(v), "frontend {k}");
        }
        assert_eq!(
            n.backend_perms,
            [Perm::new(0, Access::None), Perm::new(5, Access::Read)]
        );
        assert_eq!(
            n.frontend_perms,
            [Perm::new(5, Access::None), Perm::new(0, Access::Read)]
        );
        let ro = vbd(&DiskSpec::parse("/dev/sdb,xvdb,r").unwrap(), 5, 0);
        assert_eq!(get(&ro.backend, "mode"), Some("r"));
        assert_eq!(get(&ro.backend, "type"), Some("phy"));
    }

    #[test]
    fn vif_matches_libxl() {
        let spec = VifSpec::parse("mac=00:16:3e:00:00:01,bridge=xenbr0,rate=8Mb/s@50ms").unwrap();
        let n = vif(&spec, 0, 7, 0);
        assert_eq!(n.backend_path, "/local/domain/0/backend/vif/7/0");
        assert_eq!(n.frontend_path, "/local/domain/7/device/vif/0");
        assert_eq!(get(&n.backend, "mac"), Some("00:16:3e:00:00:01"));
        assert_eq!(get(&n.frontend, "mac"), Some("00:16:3e:00:00:01"));
        assert_eq!(get(&n.backend, "handle"), Some("0"));
        assert_eq!(get(&n.backend, "bridge"), Some("xenbr0"));
        assert_eq!(get(&n.backend, "rate"), Some("50000,50000"));
        assert_eq!(get(&n.frontend, "backend-id"), Some("0"));
        assert_eq!(get(&n.backend, "ip"), None);
    }
}
