//! A minimal blkif backend for the seam test: `seam-backend ROOT DOMID FRONTEND DEVID`.
//! Goes InitWait, waits for the frontend to publish its ring, maps the ring grant, binds the
//! event channel, goes Connected, answers every request OKAY, and closes when the frontend does.

use std::path::PathBuf;
use std::time::Duration;

use xenpv_evtchn::{spin_then_wait, EventChannel, SpinBudget};
use xenpv_grant::{Access, GrantMap};
use xenpv_ring::blkif::{Blkif, BlkifResponse, RSP_OKAY};
use xenpv_ring::BackRing;
use xenpv_tests::{read_u32, wait_state, Domain};
use xenpv_xenstore::{xenbus, XenbusState};

const T: Duration = Duration::from_secs(20);

fn main() {
    if let Err(e) = run() {
        eprintln!("seam-backend: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let [_, root, domid, frontend, devid] = &args[..] else {
        return Err("usage: seam-backend ROOT DOMID FRONTEND DEVID".into());
    };
    let root = PathBuf::from(root);
    let domid: u32 = domid.parse().map_err(|_| "bad DOMID")?;
    let frontend: u32 = frontend.parse().map_err(|_| "bad FRONTEND")?;
    let front_dom = u16::try_from(frontend).map_err(|_| "FRONTEND out of range")?;
    let d = Domain::open(&root, domid)?;
    let be = format!("/local/domain/{domid}/backend/vbd/{frontend}/{devid}");
    let fe = format!("/local/domain/{frontend}/device/vbd/{devid}");

    xenbus::switch_state(&d.xs, &be, XenbusState::InitWait).map_err(|e| e.to_string())?;
    wait_state(&d.xs, &fe, T, |s| {
        matches!(s, XenbusState::Initialised | XenbusState::Connected)
    })?;
    let gref = read_u32(&d.xs, &format!("{fe}/ring-ref"))?;
    let remote_port = read_u32(&d.xs, &format!("{fe}/event-channel"))?;
    let mapping = d
        .grants
        .map(&[(front_dom, gref)], Access::Writable)
        .map_err(|e| e.to_string())?;
    let mut ring = BackRing::<Blkif, _>::new(&mapping).map_err(|e| e.to_string())?;
    let port = d
        .evtchn
        .bind_interdomain(front_dom, remote_port)
        .map_err(|e| e.to_string())?;
    xenbus::switch_state(&d.xs, &be, XenbusState::Connected).map_err(|e| e.to_string())?;

    let mut answered = 0u64;
    let mut ports = Vec::new();
    loop {
        while let Some(req) = ring
            .next_request()
            .map_err(|e| format!("frontend broke the ring: {e}"))?
        {
            ring.produce(BlkifResponse::new(req.id, req.operation, RSP_OKAY))
                .map_err(|e| e.to_string())?;
            answered += 1;
        }
        if ring.push_responses() {
            d.evtchn.notify(port).map_err(|e| e.to_string())?;
        }
        if ring.final_check_for_requests().map_err(|e| e.to_string())? {
            continue;
        }
        ports.clear();
        spin_then_wait(
            &d.evtchn,
            &mut ports,
            SpinBudget::default(),
            Some(Duration::from_millis(20)),
        )
        .map_err(|e| e.to_string())?;
        for p in &ports {
            d.evtchn.unmask(*p).map_err(|e| e.to_string())?;
        }
        if ports.is_empty()
            && xenbus::read_state(&d.xs, &fe).map_err(|e| e.to_string())? == XenbusState::Closing
        {
            break;
        }
    }
    println!("backend: {answered} answered");
    xenbus::switch_state(&d.xs, &be, XenbusState::Closing).map_err(|e| e.to_string())?;
    drop(mapping);
    d.evtchn.unbind(port).map_err(|e| e.to_string())?;
    xenbus::switch_state(&d.xs, &be, XenbusState::Closed).map_err(|e| e.to_string())?;
    wait_state(&d.xs, &fe, T, |s| s == XenbusState::Closed)?;
    Ok(())
}
