//! xl's disk and vif specification strings (`xl-disk-configuration(5)`, `xl-network-
//! configuration(5)`), and virtual device names (`xen-vbd-interface(7)`).

use std::fmt;

/// Why a specification was refused. Each message names the offending part and what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A `key=value` with an unknown key.
    #[error("unknown {kind} parameter `{key}` (accepted: {accepted})")]
    UnknownKey {
        /// `disk` or `vif`.
        kind: &'static str,
        /// The key given.
        key: String,
        /// The keys accepted.
        accepted: &'static str,
    },
    /// A value that does not parse.
    #[error("bad {key} `{value}`: {why}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
        /// What is expected.
        why: &'static str,
    },
    /// A required parameter is missing.
    #[error("the {kind} specification has no {key} (add `{key}=…`)")]
    Missing {
        /// `disk` or `vif`.
        kind: &'static str,
        /// The missing key.
        key: &'static str,
    },
    /// A parameter given twice.
    #[error("{key} given twice in the {kind} specification")]
    Duplicate {
        /// `disk` or `vif`.
        kind: &'static str,
        /// The key.
        key: &'static str,
    },
    /// Too many positional parameters.
    #[error("too many positional parameters in the disk specification: `{0}` (use target=,format=,vdev=,access=)")]
    TooManyPositional(String),
}

/// `Result` with this module's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// A virtual block device name and its xenstore device number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vdev {
    /// The name as given (`xvda`, `xvdb1`, `hdc`, `sda`, `d3p1`, or a number).
    pub name: String,
    /// The `virtual-device` number, which is also the device id in xenstore paths.
    pub devid: u32,
}

fn letters_to_index(s: &str) -> Option<u32> {
    // a..z = 0..25, aa = 26, … (bijective base 26, as xen-vbd-interface(7)).
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| b.is_ascii_lowercase()) {
        return None;
    }
    let mut n: u32 = 0;
    for b in s.bytes() {
        n = n.checked_mul(26)?.checked_add(u32::from(b - b'a') + 1)?;
    }
    Some(n - 1)
}

fn split_digits(s: &str) -> (&str, &str) {
    let i = s.find(|c: char| c.is_ascii_digit()).unwrap_or(s.len());
    s.split_at(i)
}

fn small_number(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 9 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn xvd_number(disk: u32, part: u32) -> Option<u32> {
    if disk < 16 && part < 16 {
        Some((202 << 8) | (disk << 4) | part)
    } else if disk < (1 << 20) && part < 256 {
        Some((1 << 28) | (disk << 8) | part)
    } else {
        None
    }
}

impl Vdev {
    /// Parses a virtual device name into its `virtual-device` number.
    pub fn parse(name: &str) -> Result<Self> {
        let bad = |why| Error::BadValue {
            key: "vdev",
            value: name.to_string(),
            why,
        };
        let devid = if let Some(n) = small_number(name) {
            if n == 0 {
                return Err(bad("0 is not a device number"));
            }
            n
        } else if let Some(rest) = name.strip_prefix("xvd") {
            let (letters, part) = split_digits(rest);
            let disk = letters_to_index(letters)
                .ok_or_else(|| bad("xvd needs disk letters: xvda, xvdb1, xvdaa"))?;
            let part = if part.is_empty() {
                0
            } else {
                small_number(part).ok_or_else(|| bad("bad partition number"))?
            };
            xvd_number(disk, part).ok_or_else(|| bad("disk or partition number too large"))?
        } else if let Some(rest) = name.strip_prefix("hd") {
            let (letters, part) = split_digits(rest);
            let disk = letters_to_index(letters)
                .filter(|d| *d < 4)
                .ok_or_else(|| bad("hd disks are hda..hdd"))?;
            let part = if part.is_empty() {
                0
            } else {
                small_number(part)
                    .filter(|p| *p < 64)
                    .ok_or_else(|| bad("hd partitions are 0..63"))?
            };
            let major = if disk < 2 { 3 } else { 22 };
            (major << 8) | ((disk % 2) << 6) | part
        } else if let Some(rest) = name.strip_prefix("sd") {
            let (letters, part) = split_digits(rest);
            let disk = letters_to_index(letters)
                .filter(|d| *d < 16)
                .ok_or_else(|| bad("sd disks are sda..sdp"))?;
            let part = if part.is_empty() {
                0
            } else {
                small_number(part)
                    .filter(|p| *p < 16)
                    .ok_or_else(|| bad("sd partitions are 0..15"))?
            };
            (8 << 8) | (disk << 4) | part
        } else if let Some(rest) = name.strip_prefix('d') {
            let (disk, part) = match rest.split_once('p') {
                Some((d, p)) => (d, Some(p)),
                None => (rest, None),
            };
            let disk = small_number(disk).ok_or_else(|| bad("d<N>[p<M>] needs numbers"))?;
            let part = match part {
                Some(p) => {
                    small_number(p).ok_or_else(|| bad("d<N>p<M> needs a partition number"))?
                }
                None => 0,
            };
            xvd_number(disk, part).ok_or_else(|| bad("disk or partition number too large"))?
        } else {
            return Err(bad(
                "expected xvdX, hdX, sdX, d<N>[p<M>] or a device number",
            ));
        };
        Ok(Self {
            name: name.to_string(),
            devid,
        })
    }
}

/// Read-only or read-write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `r`/`ro`.
    ReadOnly,
    /// `w`/`rw`.
    ReadWrite,
}

impl Access {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "r" | "ro" => Ok(Self::ReadOnly),
            "w" | "rw" => Ok(Self::ReadWrite),
            _ => Err(Error::BadValue {
                key: "access",
                value: s.into(),
                why: "expected r, ro, w or rw",
            }),
        }
    }

    /// The backend `mode` node value.
    pub fn mode(self) -> &'static str {
        match self {
            Self::ReadOnly => "r",
            Self::ReadWrite => "w",
        }
    }
}

/// Disk image formats xl knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A raw file or block device.
    Raw,
    /// qcow.
    Qcow,
    /// qcow2.
    Qcow2,
    /// VHD.
    Vhd,
    /// QED.
    Qed,
}

impl Format {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "raw" => Self::Raw,
            "qcow" => Self::Qcow,
            "qcow2" => Self::Qcow2,
            "vhd" => Self::Vhd,
            "qed" => Self::Qed,
            _ => return None,
        })
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Raw => "raw",
            Self::Qcow => "qcow",
            Self::Qcow2 => "qcow2",
            Self::Vhd => "vhd",
            Self::Qed => "qed",
        })
    }
}

/// A disk or a CD-ROM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevType {
    /// `disk`.
    Disk,
    /// `cdrom`.
    Cdrom,
}

impl DevType {
    /// The `device-type` node value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disk => "disk",
            Self::Cdrom => "cdrom",
        }
    }
}

/// A parsed xl disk specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// What the backend serves: a path, or e.g. `nbd:unix:/run/x.sock` for network storage.
    pub target: String,
    /// Image format (raw unless given).
    pub format: Format,
    /// Virtual device.
    pub vdev: Vdev,
    /// Access mode (rw unless given).
    pub access: Access,
    /// Disk or CD-ROM.
    pub devtype: DevType,
    /// Backend domain (`backend=`), by id or name; dom0 when absent.
    pub backend: Option<String>,
    /// Hotplug script (`script=`).
    pub script: Option<String>,
    /// `discard` / `no-discard`; absent means the backend's default (on).
    pub discard: Option<bool>,
    /// `direct-io-safe`.
    pub direct_io_safe: bool,
    /// `trusted` / `untrusted` (trusted unless given).
    pub trusted: bool,
}

const DISK_KEYS: &str = "target, format, vdev, access, devtype, backend, backendtype, script, \
                         discard, no-discard, direct-io-safe, trusted, untrusted, cdrom";

impl DiskSpec {
    /// Parses `target=/img.raw,vdev=xvda,access=rw` or the positional forms
    /// `/img.raw,raw,xvda,rw` and `phy:/dev/vg/lv,xvda,w`. `target=` takes the rest of the
    /// string, commas included, as xl does, except that a following `,vdev=` (or another
    /// disk key with a value) ends it.
    pub fn parse(spec: &str) -> Result<Self> {
        let mut target: Option<String> = None;
        let mut format: Option<Format> = None;
        let mut vdev: Option<String> = None;
        let mut access: Option<Access> = None;
        let mut devtype = DevType::Disk;
        let mut backend = None;
        let mut script = None;
        let mut discard = None;
        let mut direct_io_safe = false;
        let mut trusted = true;
        let mut positional: Vec<String> = Vec::new();

        fn set<T>(slot: &mut Option<T>, key: &'static str, v: T) -> Result<()> {
            if slot.is_some() {
                return Err(Error::Duplicate { kind: "disk", key });
            }
            *slot = Some(v);
            Ok(())
        }

        let mut rest = spec.trim();
        while !rest.is_empty() {
            if let Some(t) = rest.strip_prefix("target=") {
                // xl: `target=` takes the rest of the string. We also accept it before other
                // keys (`target=/img.raw,vdev=xvda`): it ends at the first `,key=` naming a
                // disk key, so paths with commas still work.
                let end = [
                    "format=",
                    "vdev=",
                    "access=",
                    "devtype=",
                    "backend=",
                    "backendtype=",
                    "script=",
                ]
                .iter()
                .filter_map(|k| t.find(&format!(",{k}")))
                .min();
                match end {
                    Some(end) => {
                        set(&mut target, "target", t[..end].to_string())?;
                        rest = &t[end + 1..];
                        continue;
                    }
                    None => {
                        set(&mut target, "target", t.to_string())?;
                        break;
                    }
                }
            }
            let (item, tail) = rest.split_once(',').unwrap_or((rest, ""));
            rest = tail.trim_start();
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            match item.split_once('=') {
                Some((key, value)) => match key {
                    "format" => set(
                        &mut format,
                        "format",
                        Format::parse(value).ok_or_else(|| Error::BadValue {
                            key: "format",
                            value: value.into(),
                            why: "expected raw, qcow, qcow2, vhd or qed",
                        })?,
                    )?,
                    "vdev" => set(&mut vdev, "vdev", value.to_string())?,
                    "access" => set(&mut access, "access", Access::parse(value)?)?,
                    "devtype" => {
                        devtype = match value {
                            "disk" => DevType::Disk,
                            "cdrom" => DevType::Cdrom,
                            _ => {
                                return Err(Error::BadValue {
                                    key: "devtype",
                                    value: value.into(),
                                    why: "expected disk or cdrom",
                                })
                            }
                        }
                    }
                    "backend" => backend = Some(value.to_string()),
                    "backendtype" => match value {
                        "phy" | "qdisk" | "tap" | "standalone" => {}
                        _ => {
                            return Err(Error::BadValue {
                                key: "backendtype",
                                value: value.into(),
                                why: "expected phy, qdisk, tap or standalone",
                            })
                        }
                    },
                    "script" => script = Some(value.to_string()),
                    _ => {
                        return Err(Error::UnknownKey {
                            kind: "disk",
                            key: key.into(),
                            accepted: DISK_KEYS,
                        })
                    }
                },
                None => match item {
                    "discard" => discard = Some(true),
                    "no-discard" => discard = Some(false),
                    "direct-io-safe" => direct_io_safe = true,
                    "trusted" => trusted = true,
                    "untrusted" => trusted = false,
                    "cdrom" => devtype = DevType::Cdrom,
                    _ => positional.push(item.to_string()),
                },
            }
        }

        // Positional: target[,format],vdev,access — the format is recognised by name.
        let mut pos = positional.into_iter();
        if let Some(t) = pos.next() {
            set(&mut target, "target", t)?;
        }
        let mut next = pos.next();
        if let Some(f) = next.as_deref().and_then(Format::parse) {
            set(&mut format, "format", f)?;
            next = pos.next();
        }
        if let Some(v) = next {
            set(&mut vdev, "vdev", v)?;
        }
        if let Some(a) = pos.next() {
            set(&mut access, "access", Access::parse(&a)?)?;
        }
        if let Some(extra) = pos.next() {
            return Err(Error::TooManyPositional(extra));
        }

        let mut target = target.filter(|t| !t.is_empty()).ok_or(Error::Missing {
            kind: "disk",
            key: "target",
        })?;
        // Legacy prefixes: phy:, file:, raw:, aio:, tap:aio:, tap2:…, qcow2: …
        for prefix in [
            "tap:aio:",
            "tap2:aio:",
            "tap:",
            "tap2:",
            "phy:",
            "file:",
            "aio:",
        ] {
            if let Some(t) = target.strip_prefix(prefix) {
                target = t.to_string();
                break;
            }
        }
        for f in ["raw", "qcow2", "qcow", "vhd", "qed"] {
            if let Some(t) = target.strip_prefix(f).and_then(|t| t.strip_prefix(':')) {
                set(
                    &mut format,
                    "format",
                    Format::parse(f).unwrap_or(Format::Raw),
                )?;
                target = t.to_string();
                break;
            }
        }
        let vdev = Vdev::parse(&vdev.ok_or(Error::Missing {
            kind: "disk",
            key: "vdev",
        })?)?;
        let access = access.unwrap_or(if devtype == DevType::Cdrom {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        });
        Ok(Self {
            target,
            format: format.unwrap_or(Format::Raw),
            vdev,
            access,
            devtype,
            backend,
            script,
            discard,
            direct_io_safe,
            trusted,
        })
    }
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Parses `xx:xx:xx:xx:xx:xx`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || Error::BadValue {
            key: "mac",
            value: s.into(),
            why: "expected six hex bytes like 00:16:3e:12:34:56",
        };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if out[0] & 1 != 0 {
            return Err(Error::BadValue {
                key: "mac",
                value: s.into(),
                why: "a multicast address cannot name a NIC",
            });
        }
        Ok(Self(out))
    }

    /// A random address in Xen's OUI 00:16:3e, as xl picks when none is given.
    pub fn random() -> Self {
        let mut bytes = [0u8; 3];
        let seeded = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
        if seeded.is_err() {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let mixed = (t as u64 ^ u64::from(std::process::id())).to_le_bytes();
            bytes.copy_from_slice(&mixed[..3]);
        }
        Self([0x00, 0x16, 0x3e, bytes[0] & 0x7f, bytes[1], bytes[2]])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A TX rate limit: `bytes` of credit every `usecs` microseconds (the backend's `rate` node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Bytes per interval.
    pub bytes: u64,
    /// Interval in microseconds.
    pub usecs: u64,
}

impl Rate {
    /// Parses xl's `RATE/s[@INTERVAL]`, e.g. `10Mb/s`, `1GB/s@20ms`: units B (bytes) or b
    /// (bits) with an optional k/K, M or G (powers of 1000); interval in s, ms or us (default
    /// 50 ms).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why| Error::BadValue {
            key: "rate",
            value: s.into(),
            why,
        };
        let (rate, interval) = s.split_once('@').unwrap_or((s, "50ms"));
        let rate = rate
            .strip_suffix("/s")
            .ok_or_else(|| bad("expected a rate per second like 10Mb/s"))?;
        let (num, unit) = split_digits_rev(rate);
        let value: u64 = num
            .parse()
            .map_err(|_| bad("expected a number before the unit"))?;
        let (mult, bits) = match unit {
            "B" => (1, false),
            "b" => (1, true),
            "kB" | "KB" => (1_000, false),
            "kb" | "Kb" => (1_000, true),
            "MB" => (1_000_000, false),
            "Mb" => (1_000_000, true),
            "GB" => (1_000_000_000, false),
            "Gb" => (1_000_000_000, true),
            _ => return Err(bad("unit must be B, b, kB, kb, MB, Mb, GB or Gb")),
        };
        let mut bytes_per_sec = value
            .checked_mul(mult)
            .ok_or_else(|| bad("rate too large"))?;
        if bits {
            bytes_per_sec /= 8;
        }
        let (inum, iunit) = split_digits_rev(interval);
        let ival: u64 = inum
            .parse()
            .map_err(|_| bad("expected an interval like 50ms"))?;
        let usecs = match iunit {
            "s" => ival.checked_mul(1_000_000),
            "ms" => ival.checked_mul(1_000),
            "us" => Some(ival),
            _ => return Err(bad("interval unit must be s, ms or us")),
        }
        .filter(|u| *u > 0 && *u <= u64::from(u32::MAX))
        .ok_or_else(|| bad("interval must be between 1 us and about 71 minutes"))?;
        let bytes = u128::from(bytes_per_sec) * u128::from(usecs) / 1_000_000;
        let bytes = u64::try_from(bytes).map_err(|_| bad("rate too large"))?;
        if bytes == 0 {
            return Err(bad("rate is less than one byte per interval"));
        }
        Ok(Self { bytes, usecs })
    }
}

fn split_digits_rev(s: &str) -> (&str, &str) {
    let i = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    s.split_at(i)
}

/// A parsed xl vif specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VifSpec {
    /// The guest's MAC (random in 00:16:3e when not given).
    pub mac: Mac,
    /// Bridge to attach the backend interface to.
    pub bridge: Option<String>,
    /// IP address(es) for the hotplug script.
    pub ip: Option<String>,
    /// Hotplug script.
    pub script: Option<String>,
    /// Name of the backend interface (default `vif<domid>.<devid>`).
    pub vifname: Option<String>,
    /// Backend domain, by id or name; dom0 when absent.
    pub backend: Option<String>,
    /// TX rate limit.
    pub rate: Option<Rate>,
    /// MTU (1500 when absent).
    pub mtu: u32,
    /// Device id (the next free one when absent).
    pub devid: Option<u32>,
    /// Gateway device for routed setups.
    pub gatewaydev: Option<String>,
}

const VIF_KEYS: &str =
    "mac, bridge, ip, script, vifname, backend, rate, mtu, devid, gatewaydev, type, model";

impl VifSpec {
    /// Parses `mac=00:16:3e:00:00:01,bridge=xenbr0,rate=10Mb/s` (every key optional).
    pub fn parse(spec: &str) -> Result<Self> {
        let mut v = Self {
            mac: Mac([0; 6]),
            bridge: None,
            ip: None,
            script: None,
            vifname: None,
            backend: None,
            rate: None,
            mtu: 1500,
            devid: None,
            gatewaydev: None,
        };
        let mut mac = None;
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = item.split_once('=').ok_or_else(|| Error::BadValue {
                key: "vif parameter",
                value: item.into(),
                why: "expected key=value",
            })?;
            match key {
                "mac" => mac = Some(Mac::parse(value)?),
                "bridge" => v.bridge = Some(value.into()),
                "ip" => v.ip = Some(value.into()),
                "script" => v.script = Some(value.into()),
                "vifname" => v.vifname = Some(value.into()),
                "backend" => v.backend = Some(value.into()),
                "rate" => v.rate = Some(Rate::parse(value)?),
                "mtu" => {
                    v.mtu = value
                        .parse()
                        .ok()
                        .filter(|m| (68..=65535).contains(m))
                        .ok_or_else(|| Error::BadValue {
                            key: "mtu",
                            value: value.into(),
                            why: "expected a number from 68 to 65535",
                        })?
                }
                "devid" => {
                    v.devid = Some(value.parse().map_err(|_| Error::BadValue {
                        key: "devid",
                        value: value.into(),
                        why: "expected a number",
                    })?)
                }
                "gatewaydev" => v.gatewaydev = Some(value.into()),
                "type" => {
                    if value != "vif" {
                        return Err(Error::BadValue {
                            key: "type",
                            value: value.into(),
                            why: "only PV vifs (type=vif) are served",
                        });
                    }
                }
                "model" => {}
                _ => {
                    return Err(Error::UnknownKey {
                        kind: "vif",
                        key: key.into(),
                        accepted: VIF_KEYS,
                    })
                }
            }
        }
        v.mac = mac.unwrap_or_else(Mac::random);
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vdev_numbers() {
        for (name, devid) in [
            ("xvda", 51712),
            ("xvdb", 51728),
            ("xvda1", 51713),
            ("xvdp15", (202 << 8) | (15 << 4) | 15),
            ("xvdq", (1 << 28) | (16 << 8)),
            ("xvdaa", (1 << 28) | (26 << 8)),
            ("d0", 51712),
            ("d0p1", 51713),
            ("d100p3", (1 << 28) | (100 << 8) | 3),
            ("hda", 3 << 8),
            ("hdb1", (3 << 8) | (1 << 6) | 1),
            ("hdc", 22 << 8),
            ("sda", 8 << 8),
            ("sdb2", (8 << 8) | (1 << 4) | 2),
            ("51712", 51712),
        ] {
            assert_eq!(Vdev::parse(name).unwrap().devid, devid, "{name}");
        }
        for bad in [
            "",
            "xvd",
            "hde",
            "sdq",
            "vda",
            "xvdA",
            "d",
            "dxp1",
            "0",
            "xvda99999",
        ] {
            assert!(Vdev::parse(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn disk_specs() {
        let d = DiskSpec::parse("target=/img.raw,vdev=xvda,access=rw").unwrap();
        assert_eq!(
            (d.target.as_str(), d.vdev.devid, d.access),
            ("/img.raw", 51712, Access::ReadWrite)
        );
        let d = DiskSpec::parse("vdev=xvda,access=rw,target=/img,with,commas.raw").unwrap();
        assert_eq!(d.target, "/img,with,commas.raw");
        assert_eq!(d.vdev.devid, 51712);
        assert_eq!(d.access, Access::ReadWrite);
        let d = DiskSpec::parse("/img.qcow2,qcow2,xvdb,ro").unwrap();
        assert_eq!(
            (d.format, d.vdev.devid, d.access),
            (Format::Qcow2, 51728, Access::ReadOnly)
        );
        let d = DiskSpec::parse("phy:/dev/vg/lv,xvdc,w").unwrap();
        assert_eq!(
            (d.target.as_str(), d.format, d.access),
            ("/dev/vg/lv", Format::Raw, Access::ReadWrite)
        );
        let d = DiskSpec::parse("/iso,xvdd,cdrom").unwrap();
        assert_eq!((d.devtype, d.access), (DevType::Cdrom, Access::ReadOnly));
        let d = DiskSpec::parse(
            "format=raw,vdev=xvde,discard,direct-io-safe,untrusted,backend=2,target=/x",
        )
        .unwrap();
        assert_eq!(
            (d.discard, d.direct_io_safe, d.trusted, d.backend.as_deref()),
            (Some(true), true, false, Some("2"))
        );
        assert!(matches!(
            DiskSpec::parse("vdev=xvda,colour=red,target=/x"),
            Err(Error::UnknownKey { .. })
        ));
        assert!(matches!(
            DiskSpec::parse("vdev=xvda,access=rx,target=/x"),
            Err(Error::BadValue { key: "access", .. })
        ));
        assert!(matches!(
            DiskSpec::parse("vdev=xvda"),
            Err(Error::Missing { key: "target", .. })
        ));
        assert!(matches!(
            DiskSpec::parse("/a,raw,xvda,rw,extra"),
            Err(Error::TooManyPositional(_))
        ));
        assert!(matches!(
            DiskSpec::parse("vdev=xvda,vdev=xvdb,target=/x"),
            Err(Error::Duplicate { .. })
        ));
        let msg = DiskSpec::parse("vdev=xvda,colour=red,target=/x")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("colour") && msg.contains("vdev"), "{msg}");
    }

    #[test]
    fn vif_specs() {
        let v = VifSpec::parse("mac=00:16:3e:00:00:01,bridge=xenbr0,rate=10Mb/s,mtu=9000").unwrap();
        assert_eq!(v.mac.to_string(), "00:16:3e:00:00:01");
        assert_eq!(v.bridge.as_deref(), Some("xenbr0"));
        assert_eq!(
            v.rate,
            Some(Rate {
                bytes: 62_500,
                usecs: 50_000
            })
        );
        assert_eq!(v.mtu, 9000);
        let r = VifSpec::parse("").unwrap();
        assert_eq!(&r.mac.0[..3], &[0x00, 0x16, 0x3e]);
        assert_eq!(
            Rate::parse("1GB/s@20ms").unwrap(),
            Rate {
                bytes: 20_000_000,
                usecs: 20_000
            }
        );
        for bad in [
            "mac=00:16:3e:00:00",
            "mac=01:00:5e:00:00:01",
            "rate=10Mb",
            "rate=10Xb/s",
            "mtu=10",
            "bridge",
            "speed=1",
            "type=ioemu",
        ] {
            assert!(VifSpec::parse(bad).is_err(), "{bad} must be refused");
        }
    }
}
