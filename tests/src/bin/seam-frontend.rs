//! A minimal blkif frontend for the seam test: `seam-frontend ROOT DOMID DEVID REQUESTS`.
//! Waits for the backend's InitWait, grants a ring page and an unbound event channel to the
//! backend, publishes `ring-ref`, `event-channel` and `protocol`, goes Initialised, waits for
//! Connected, sends REQUESTS requests (batched, notifying as the ring says), checks every
//! response, then closes: Closing, waits for the backend to close, revokes, Closed.

use std::path::PathBuf;
use std::time::Duration;

use xenpv_evtchn::{spin_then_wait, EventChannel, SpinBudget};
use xenpv_grant::{Access, GrantShare, SharedPages};
use xenpv_ring::blkif::{Blkif, BlkifRequest, OP_READ, RSP_OKAY};
use xenpv_ring::FrontRing;
use xenpv_tests::{read_u32, wait_state, Domain};
use xenpv_xenstore::{xenbus, XenbusState, XsOps};

const T: Duration = Duration::from_secs(20);

fn main() {
    if let Err(e) = run() {
        eprintln!("seam-frontend: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let [_, root, domid, devid, requests] = &args[..] else {
        return Err("usage: seam-frontend ROOT DOMID DEVID REQUESTS".into());
    };
    let root = PathBuf::from(root);
    let domid: u32 = domid.parse().map_err(|_| "bad DOMID")?;
    let requests: u64 = requests.parse().map_err(|_| "bad REQUESTS")?;
    let d = Domain::open(&root, domid)?;
    let fe = format!("/local/domain/{domid}/device/vbd/{devid}");
    let be =
        d.xs.read_string(&format!("{fe}/backend"))
            .map_err(|e| e.to_string())?;
    let backend_id = read_u32(&d.xs, &format!("{fe}/backend-id"))?;
    let backend_dom = u16::try_from(backend_id).map_err(|_| "backend-id out of range")?;

    wait_state(&d.xs, &be, T, |s| s == XenbusState::InitWait)?;
    let page = d
        .grants
        .share(backend_dom, 1, Access::Writable)
        .map_err(|e| e.to_string())?;
    let gref = page.grefs()[0];
    let mut ring = FrontRing::<Blkif, _>::init(&page).map_err(|e| e.to_string())?;
    let port = d
        .evtchn
        .bind_unbound(backend_dom)
        .map_err(|e| e.to_string())?;
    d.xs.transaction(|tx| {
        tx.write_str(&format!("{fe}/ring-ref"), &gref.to_string())?;
        tx.write_str(&format!("{fe}/event-channel"), &port.to_string())?;
        tx.write_str(&format!("{fe}/protocol"), "x86_64-abi")?;
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    xenbus::switch_state(&d.xs, &fe, XenbusState::Initialised).map_err(|e| e.to_string())?;
    wait_state(&d.xs, &be, T, |s| s == XenbusState::Connected)?;
    xenbus::switch_state(&d.xs, &fe, XenbusState::Connected).map_err(|e| e.to_string())?;

    let (mut sent, mut done) = (0u64, 0u64);
    let mut ports = Vec::new();
    while done < requests {
        while sent < requests && !ring.is_full() {
            let mut r = BlkifRequest::new(OP_READ, 0, sent, sent * 8);
            r.nr_segments = 0;
            ring.produce(r).map_err(|e| e.to_string())?;
            sent += 1;
        }
        if ring.push_requests() {
            d.evtchn.notify(port).map_err(|e| e.to_string())?;
        }
        loop {
            while let Some(rsp) = ring
                .next_response()
                .map_err(|e| format!("backend broke the ring: {e}"))?
            {
                if rsp.id != done || rsp.status != RSP_OKAY || rsp.operation != OP_READ {
                    return Err(format!(
                        "response {done}: got id {} status {} op {}",
                        { rsp.id },
                        rsp.status,
                        rsp.operation
                    ));
                }
                done += 1;
            }
            if done == sent
                || ring
                    .final_check_for_responses()
                    .map_err(|e| e.to_string())?
            {
                break;
            }
            ports.clear();
            spin_then_wait(&d.evtchn, &mut ports, SpinBudget::default(), Some(T))
                .map_err(|e| e.to_string())?;
            for p in &ports {
                d.evtchn.unmask(*p).map_err(|e| e.to_string())?;
            }
        }
    }
    println!("frontend: {done} responses");

    xenbus::switch_state(&d.xs, &fe, XenbusState::Closing).map_err(|e| e.to_string())?;
    wait_state(&d.xs, &be, T, |s| s == XenbusState::Closed)?;
    d.evtchn.unbind(port).map_err(|e| e.to_string())?;
    let revoke = d.grants.revoke(page).map_err(|e| e.to_string())?;
    println!("frontend: revoke {revoke:?}");
    xenbus::switch_state(&d.xs, &fe, XenbusState::Closed).map_err(|e| e.to_string())?;
    Ok(())
}
