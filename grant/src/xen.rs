//! The Xen provider: `/dev/xen/gntalloc` (front) and `/dev/xen/gntdev` (back).
