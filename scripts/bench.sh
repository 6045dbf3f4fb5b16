#!/usr/bin/env bash
# The main job: a disk served end to end on the local platform (xenpv local, xenpv-blkback and
# xenpv-blkfront as separate processes, fio through the frontend's NBD export), measured against
# fio on the same file with the same engine. Sets up what it needs on a Debian machine (as root,
# or with sudo). Extra arguments go to `xenpv bench` (e.g. --quick, --dirs /dev/shm).
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# fio (the baseline and the load through NBD) and qemu-nbd (the second baseline)
if ! command -v fio >/dev/null || ! command -v qemu-nbd >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get install -y fio qemu-utils ||
    { as_root apt-get update && as_root apt-get install -y fio qemu-utils; }
fi
if ! command -v cargo >/dev/null; then
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
cargo build --release --workspace --bins
exec target/release/xenpv bench disk "$@"
