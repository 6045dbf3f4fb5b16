//! The Xen provider: Linux's `/dev/xen/evtchn` (libxenevtchn's job, without the library).
//!
//! Each bind is an ioctl returning the local port; `read(2)` returns the fired ports as `u32`s,
//! each masked until its number is `write(2)`n back; `poll` reports readability.
//! The ioctl numbers and argument structs mirror Linux's `include/uapi/xen/evtchn.h`
//! (checked against `/usr/include/xen/evtchn.h` by `tests/abi.rs`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sys::poll_readable;
use crate::{timeout_ms, DomId, Error, EventChannel, Port, Result};

/// The device path.
pub const DEVICE: &str = "/dev/xen/evtchn";

/// `_IOC(_IOC_NONE, 'E', nr, size)` as Linux's generic `ioctl.h` computes it.
const fn ioc_none(nr: u32, size: usize) -> u32 {
    ((size as u32) << 16) | ((b'E' as u32) << 8) | nr
}

/// `struct ioctl_evtchn_bind_virq`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct BindVirq {
    /// The virtual IRQ.
    pub virq: u32,
}
/// `struct ioctl_evtchn_bind_interdomain`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct BindInterdomain {
    /// The remote domain.
    pub remote_domain: u32,
    /// Its port.
    pub remote_port: u32,
}
/// `struct ioctl_evtchn_bind_unbound_port`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct BindUnboundPort {
    /// The domain allowed to bind.
    pub remote_domain: u32,
}
/// `struct ioctl_evtchn_unbind` and `struct ioctl_evtchn_notify`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PortArg {
    /// The local port.
    pub port: u32,
}
/// `struct ioctl_evtchn_restrict_domid`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct RestrictDomid {
    /// The only domain that may be bound from now on.
    pub domid: u16,
}

/// `IOCTL_EVTCHN_BIND_VIRQ`.
pub const IOCTL_BIND_VIRQ: u32 = ioc_none(0, std::mem::size_of::<BindVirq>());
/// `IOCTL_EVTCHN_BIND_INTERDOMAIN`.
pub const IOCTL_BIND_INTERDOMAIN: u32 = ioc_none(1, std::mem::size_of::<BindInterdomain>());
/// `IOCTL_EVTCHN_BIND_UNBOUND_PORT`.
pub const IOCTL_BIND_UNBOUND_PORT: u32 = ioc_none(2, std::mem::size_of::<BindUnboundPort>());
/// `IOCTL_EVTCHN_UNBIND`.
pub const IOCTL_UNBIND: u32 = ioc_none(3, std::mem::size_of::<PortArg>());
/// `IOCTL_EVTCHN_NOTIFY`.
pub const IOCTL_NOTIFY: u32 = ioc_none(4, std::mem::size_of::<PortArg>());
/// `IOCTL_EVTCHN_RESET`.
pub const IOCTL_RESET: u32 = ioc_none(5, 0);
/// `IOCTL_EVTCHN_RESTRICT_DOMID`.
pub const IOCTL_RESTRICT_DOMID: u32 = ioc_none(6, std::mem::size_of::<RestrictDomid>());

/// Most ports read in one `read(2)`.
const READ_BATCH: usize = 64;

/// An open `/dev/xen/evtchn`: one set of bindings, closed (all ports unbound) on drop.
#[derive(Debug)]
pub struct XenEvtchn {
    fd: OwnedFd,
}

impl XenEvtchn {
    /// Opens [`DEVICE`].
    pub fn open() -> Result<Self> {
        Self::open_path(Path::new(DEVICE))
    }

    /// Opens the device at `path` (non-blocking, close-on-exec).
    pub fn open_path(path: &Path) -> Result<Self> {
        let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::Open {
            path: path.into(),
            source: io::ErrorKind::InvalidInput.into(),
        })?;
        // SAFETY: `c` is a NUL-terminated path that lives across the call.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if fd < 0 {
            let source = io::Error::last_os_error();
            let path: PathBuf = path.into();
            return Err(if source.kind() == io::ErrorKind::NotFound {
                Error::NotXen { path }
            } else {
                Error::Open { path, source }
            });
        }
        // SAFETY: `fd` was just returned by open and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(XenEvtchn { fd })
    }

    fn ioctl<T>(&self, op: &'static str, req: u32, arg: Option<&mut T>) -> Result<u32> {
        let p = arg.map_or(std::ptr::null_mut(), |a| a as *mut T);
        // SAFETY: `req` encodes the size of `T`, and `p` is null or a live, exclusive `T` that
        // the driver reads (and may write) during the call.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, p) };
        u32::try_from(r).map_err(|_| Error::Ioctl {
            op,
            source: io::Error::last_os_error(),
        })
    }

    /// Binds a virtual IRQ (`IOCTL_EVTCHN_BIND_VIRQ`); returns the local port.
    pub fn bind_virq(&self, virq: u32) -> Result<Port> {
        self.ioctl("BIND_VIRQ", IOCTL_BIND_VIRQ, Some(&mut BindVirq { virq }))
    }

    /// Unbinds every port and clears the overflow condition (`IOCTL_EVTCHN_RESET`).
    pub fn reset(&self) -> Result<()> {
        self.ioctl::<()>("RESET", IOCTL_RESET, None).map(drop)
    }

    /// From now on only `domid` can be bound through this fd (`IOCTL_EVTCHN_RESTRICT_DOMID`).
    pub fn restrict_domid(&self, domid: DomId) -> Result<()> {
        self.ioctl(
            "RESTRICT_DOMID",
            IOCTL_RESTRICT_DOMID,
            Some(&mut RestrictDomid { domid }),
        )
        .map(drop)
    }

    fn read_ports(&self, out: &mut Vec<Port>) -> Result<usize> {
        let mut buf = [0u32; READ_BATCH];
        loop {
            // SAFETY: reads at most size_of_val(buf) bytes into the live array.
            let r = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    std::mem::size_of_val(&buf),
                )
            };
            let Ok(n) = usize::try_from(r) else {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => Ok(0),
                    Some(libc::EFBIG) => Err(Error::Overflow),
                    _ => Err(Error::io("read /dev/xen/evtchn", e)),
                };
            };
            let count = (n / 4).min(READ_BATCH);
            out.extend_from_slice(&buf[..count]);
            return Ok(count);
        }
    }
}

impl EventChannel for XenEvtchn {
    fn bind_unbound(&self, remote: DomId) -> Result<Port> {
        let mut a = BindUnboundPort {
            remote_domain: remote.into(),
        };
        self.ioctl("BIND_UNBOUND_PORT", IOCTL_BIND_UNBOUND_PORT, Some(&mut a))
    }

    fn bind_interdomain(&self, remote: DomId, remote_port: Port) -> Result<Port> {
        let mut a = BindInterdomain {
            remote_domain: remote.into(),
            remote_port,
        };
        self.ioctl("BIND_INTERDOMAIN", IOCTL_BIND_INTERDOMAIN, Some(&mut a))
    }

    fn notify(&self, port: Port) -> Result<()> {
        self.ioctl("NOTIFY", IOCTL_NOTIFY, Some(&mut PortArg { port }))
            .map(drop)
    }

    fn unbind(&self, port: Port) -> Result<()> {
        self.ioctl("UNBIND", IOCTL_UNBIND, Some(&mut PortArg { port }))
            .map(drop)
    }

    fn pending(&self, out: &mut Vec<Port>) -> Result<usize> {
        self.read_ports(out)
    }

    fn wait(&self, out: &mut Vec<Port>, timeout: Option<Duration>) -> Result<usize> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            let n = self.read_ports(out)?;
            if n > 0 {
                return Ok(n);
            }
            let left = match (timeout, deadline) {
                (None, _) => None,
                (Some(_), Some(d)) => Some(d.saturating_duration_since(Instant::now())),
                (Some(_), None) => None,
            };
            if left == Some(Duration::ZERO) {
                return Ok(0);
            }
            poll_readable(self.fd.as_fd(), timeout_ms(left))
                .map_err(|e| Error::io("poll /dev/xen/evtchn", e))?;
        }
    }

    fn unmask(&self, port: Port) -> Result<()> {
        let b = port.to_ne_bytes();
        loop {
            // SAFETY: writes 4 bytes from a live array.
            let r = unsafe { libc::write(self.fd.as_raw_fd(), b.as_ptr().cast(), 4) };
            if r >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(Error::io("unmask (write /dev/xen/evtchn)", e));
            }
        }
    }
}

impl AsFd for XenEvtchn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for XenEvtchn {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_reference_table() {
        assert_eq!(IOCTL_BIND_VIRQ, 0x0004_4500);
        assert_eq!(IOCTL_BIND_INTERDOMAIN, 0x0008_4501);
        assert_eq!(IOCTL_BIND_UNBOUND_PORT, 0x0004_4502);
        assert_eq!(IOCTL_UNBIND, 0x0004_4503);
        assert_eq!(IOCTL_NOTIFY, 0x0004_4504);
        assert_eq!(IOCTL_RESET, 0x0000_4505);
        assert_eq!(IOCTL_RESTRICT_DOMID, 0x0002_4506);
    }

    #[test]
    fn opening_without_xen_names_the_fix() {
        let e = XenEvtchn::open_path(Path::new("/nonexistent/xen/evtchn")).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::NotXen { .. }), "{e:?}");
        assert!(msg.contains("not running on Xen"), "{msg}");
        assert!(msg.contains("--platform local"), "{msg}");
        if !Path::new(DEVICE).exists() {
            let e = XenEvtchn::open().unwrap_err();
            assert!(e
                .to_string()
                .starts_with("cannot open /dev/xen/evtchn: not running on Xen"));
        }
    }
}
