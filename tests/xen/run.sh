#!/usr/bin/env bash
# The real-Xen rig: boots Xen 4.17 with a Linux dom0 inside QEMU (TCG) and runs Linux's
# blkfront against our blkback, our blkfront against Linux's blkback, and the lifecycle scenario.
# Run as root on Debian 12 (it apt-get installs qemu-system-x86 and cpio if missing).
#   tests/xen/run.sh                     build, fetch (cached), boot, verdict
#   XENPV_RIG_CACHE=DIR                  where packages are kept (default ~/.cache/xenpv-rig)
#   XENPV_RIG_TIMEOUT=SECONDS            whole-boot limit (default 300)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${XENPV_RIG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/xenpv-rig}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET/xen-rig
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need=()
# qemu-system-x86 together with qemu-utils: installed alone, apt may remove a qemu-utils of
# another version, which other tests need
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86 qemu-utils)
command -v cpio >/dev/null || need+=(cpio)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> rig: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get install -y "${need[@]}" >/dev/null ||
    { as_root apt-get update -qq && as_root apt-get install -y "${need[@]}" >/dev/null; }
fi

t0=$(date +%s)
echo "==> rig: building release binaries"
(cd "$ROOT" && cargo build --release --bin xenpv-blkback --bin xenpv-blkfront --bin xenpv --bin xenpv-rig)
echo "==> rig: fetching Xen, Linux and tools (cache: $CACHE)"
"$HERE/fetch.sh" "$CACHE"
echo "==> rig: building the dom0 and domU images"
"$HERE/build.sh" "$CACHE" "$TARGET/release" "$OUT"
t1=$(date +%s)
mkdir -p "$OUT/logs"
LOG=$OUT/logs/rig-$(date +%Y%m%d-%H%M%S).txt
echo "==> rig: booting Xen in QEMU (TCG); set-up took $((t1 - t0)) s"
"$HERE/boot.py" "$OUT" "$LOG" "${XENPV_RIG_TIMEOUT:-300}" "s1 our blkback" "s1 online resize" s1r s1s s3a "s3 domU I/O completed across SIGKILL" \
  "s3 domU I/O completed across SIGTERM" "s2 plain" "s2 indirect" "s2 persistent" "s2 all" "s2 again" "s2 resize"
