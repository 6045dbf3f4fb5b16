//! The `xenpv` toolstack: what `xl`/libxl does for PV devices, for real Xen and for the local
//! platform. [`spec`] parses xl's disk and vif specifications; [`layout`] turns a parsed device
//! into exactly libxl's backend and frontend xenstore nodes and permissions.
#![deny(missing_docs)]

pub mod bench;
pub mod layout;
pub mod platform;
pub mod spec;
pub mod status;
pub mod toolstack;
