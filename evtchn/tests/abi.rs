//! ABI probe: compiles `abi/probe.c` against the system headers (linux-libc-dev's
//! `<xen/evtchn.h>`, libxen-dev's `<xen/xen.h>`), runs it, and compares every ioctl number and
//! argument layout it prints with the Rust definitions of the Xen provider.

use std::collections::BTreeMap;
use std::mem::{align_of, offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

use xenpv_evtchn::xen::*;
use xenpv_evtchn::{DomId, Port, DOMID_SELF};

type Table = BTreeMap<String, usize>;

macro_rules! s {
    ($v:ident, $c:literal, $t:ty) => {
        $v.insert(concat!($c, ".size").into(), size_of::<$t>());
        $v.insert(concat!($c, ".align").into(), align_of::<$t>());
    };
}
macro_rules! f {
    ($v:ident, $c:literal, $t:ty, { $($cf:literal => $rf:ident),+ $(,)? }) => {
        $( $v.insert(concat!($c, ".", $cf).into(), offset_of!($t, $rf)); )+
    };
}

fn expected() -> Table {
    let mut v = Table::new();
    s!(v, "struct ioctl_evtchn_bind_virq", BindVirq);
    f!(v, "struct ioctl_evtchn_bind_virq", BindVirq, { "virq" => virq });
    s!(v, "struct ioctl_evtchn_bind_interdomain", BindInterdomain);
    f!(v, "struct ioctl_evtchn_bind_interdomain", BindInterdomain,
        { "remote_domain" => remote_domain, "remote_port" => remote_port });
    s!(v, "struct ioctl_evtchn_bind_unbound_port", BindUnboundPort);
    f!(v, "struct ioctl_evtchn_bind_unbound_port", BindUnboundPort,
        { "remote_domain" => remote_domain });
    s!(v, "struct ioctl_evtchn_unbind", PortArg);
    f!(v, "struct ioctl_evtchn_unbind", PortArg, { "port" => port });
    s!(v, "struct ioctl_evtchn_notify", PortArg);
    f!(v, "struct ioctl_evtchn_notify", PortArg, { "port" => port });
    s!(v, "struct ioctl_evtchn_restrict_domid", RestrictDomid);
    f!(v, "struct ioctl_evtchn_restrict_domid", RestrictDomid, { "domid" => domid });
    for (k, n) in [
        ("IOCTL_EVTCHN_BIND_VIRQ", IOCTL_BIND_VIRQ),
        ("IOCTL_EVTCHN_BIND_INTERDOMAIN", IOCTL_BIND_INTERDOMAIN),
        ("IOCTL_EVTCHN_BIND_UNBOUND_PORT", IOCTL_BIND_UNBOUND_PORT),
        ("IOCTL_EVTCHN_UNBIND", IOCTL_UNBIND),
        ("IOCTL_EVTCHN_NOTIFY", IOCTL_NOTIFY),
        ("IOCTL_EVTCHN_RESET", IOCTL_RESET),
        ("IOCTL_EVTCHN_RESTRICT_DOMID", IOCTL_RESTRICT_DOMID),
    ] {
        v.insert(k.into(), n as usize);
    }
    v.insert("DOMID_SELF".into(), DOMID_SELF as usize);
    v.insert("evtchn_port_t.size".into(), size_of::<Port>());
    v.insert("domid_t.size".into(), size_of::<DomId>());
    v
}

fn run_probe() -> Table {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/abi");
    let src = dir.join("probe.c");
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let exe = out_dir.join("evtchn-abi-probe");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .arg("-std=gnu11")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e} (install gcc)"));
    assert!(
        out.status.success(),
        "compiling the evtchn ABI probe failed (install linux-libc-dev and libxen-dev):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().expect("run the ABI probe");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .expect("probe output is ASCII")
        .lines()
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').expect("`key value` lines");
            (k.to_string(), v.parse().expect("a number"))
        })
        .collect()
}

#[test]
fn abi_probe_matches_linux_evtchn_header() {
    let c = run_probe();
    let rust = expected();
    let mut mismatches = Vec::new();
    for (k, cv) in &c {
        match rust.get(k) {
            Some(rv) if rv == cv => {}
            Some(rv) => mismatches.push(format!("{k}: C {cv}, Rust {rv}")),
            None => mismatches.push(format!("{k}: C {cv}, not checked on the Rust side")),
        }
    }
    for k in rust.keys().filter(|k| !c.contains_key(*k)) {
        mismatches.push(format!(
            "{k}: checked on the Rust side, not printed by the probe"
        ));
    }
    assert!(
        mismatches.is_empty(),
        "ABI mismatches:\n{}",
        mismatches.join("\n")
    );
    println!("evtchn ABI probe: {} values match", c.len());
}
