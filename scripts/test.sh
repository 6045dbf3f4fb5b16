#!/usr/bin/env bash
# The test command: sets up what the tests need on a Debian machine (as root, or with sudo),
# then runs formatting, lints and every test. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages: Xen's public headers and a 32-bit C toolchain for the ABI probe; xenstore-utils
# (the C xenstore tools) to drive our xenstored in xenstore/tests/xenstore_utils.rs; qemu-utils,
# nbdkit, libnbd-bin and fio as real NBD peers for nbd/tests/ and blkback/tests/ (NBD engine);
# systemd for systemd-analyze, which checks deploy/'s unit (blkback/tests/daemon.rs), and
# systemd-container to run that unit under a real systemd (tests/systemd/run.sh).
packages=(libxen-dev gcc-multilib pkg-config xenstore-utils qemu-utils nbdkit libnbd-bin fio qemu-system-x86 cpio systemd systemd-container)
missing_packages() {
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
}
missing_packages
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get install -y "${missing[@]}" || { as_root apt-get update && as_root apt-get install -y "${missing[@]}"; } || true
  # apt may have made room for one package by removing another: a machine whose qemu-utils came
  # from elsewhere (a backport) cannot keep it beside the release's qemu-system-x86, and apt
  # either refuses or removes qemu-utils. Either way, install what is still missing with
  # qemu-utils at qemu-system-x86's version; anything else still missing stays a failure.
  missing_packages
  if [ ${#missing[@]} -gt 0 ]; then
    v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    step "installing ${missing[*]} (qemu-utils and qemu-system-x86 at the same version, $v)"
    others=()
    for p in "${missing[@]}"; do [[ $p == qemu-utils || $p == qemu-system-x86 ]] || others+=("$p"); done
    as_root apt-get install -y --allow-downgrades "${others[@]}" "qemu-utils=$v" "qemu-system-x86=$v"
    missing_packages
    [ ${#missing[@]} -eq 0 ] || { echo "could not install: ${missing[*]}" >&2; exit 1; }
  fi
fi

if ! command -v cargo >/dev/null; then
  step "installing the Rust toolchain (rustup)"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test --workspace (unit, proptest, ABI probe against libxen-dev)"
cargo test --workspace

step "the main job, smoke run: xenpv bench disk (one workload, one round, 64 MiB in /tmp and /dev/shm)"
# It fails if any process does not start, any run completes no I/O, or a pinning fails.
target/debug/xenpv bench disk --dirs /tmp,/dev/shm --size-mib 64 --runtime 1 --rounds 1 \
  --only "randread QD1" --json target/bench-smoke.json
grep -q '"one_cpu"' target/bench-smoke.json || { echo "bench JSON lacks the placement runs" >&2; exit 1; }
grep -q '"polling_frontend": {' target/bench-smoke.json || { echo "bench JSON lacks the polling-frontend runs" >&2; exit 1; }
grep -q '"per_round": {' target/bench-smoke.json || { echo "bench JSON lacks the per-round ratios" >&2; exit 1; }
grep -q '"id": "R8"' target/bench-smoke.json || { echo "bench JSON lacks the goals" >&2; exit 1; }
# fio's baseline on tmpfs is psync, the engine blkback's copies there amount to.
[ "$(grep -c '"baseline_engine": "io_uring"' target/bench-smoke.json)" = 1 ] &&
  [ "$(grep -c '"baseline_engine": "psync"' target/bench-smoke.json)" = 1 ] ||
  { echo "bench JSON: fio's baseline engines are not io_uring on /tmp and psync on /dev/shm" >&2; exit 1; }
if [ "$(id -u)" = 0 ]; then
  # As root the guest's memory and fio's buffers are in 2 MiB pages (fio mapped the file).
  grep -q '"base_buffer_pages_kib": 2048' target/bench-smoke.json ||
    { echo "bench JSON: fio's buffers are not in 2 MiB pages though running as root" >&2; exit 1; }
fi

step "xenpv-ring builds for a bare-metal target (no_std, no allocation)"
if ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-none; then
  timeout 120 rustup target add x86_64-unknown-none >/dev/null 2>&1 || true
fi
if rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-none; then
  cargo build -p xenpv-ring --target x86_64-unknown-none
else
  echo "SKIPPED: rustup could not fetch the x86_64-unknown-none target"
fi

step "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features

step "loom: the notify / final-check protocol (RUSTFLAGS=--cfg loom)"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p xenpv-ring --test loom --release

step "Miri: the ring crate's unsafe core"
if ! cargo +nightly miri --version >/dev/null 2>&1; then
  timeout 300 rustup component add --toolchain nightly miri rust-src >/dev/null 2>&1 || true
fi
if cargo +nightly miri --version >/dev/null 2>&1; then
  cargo +nightly miri test -p xenpv-ring --test ring
elif [ -n "${XENPV_REQUIRE_MIRI:-}" ]; then
  echo "Miri is required (XENPV_REQUIRE_MIRI) but 'cargo +nightly miri' is unavailable" >&2
  exit 1
else
  echo "SKIPPED Miri: no nightly toolchain with the miri component here, and rustup could not"
  echo "fetch one. Where rustup can reach static.rust-lang.org, run:"
  echo "  rustup component add --toolchain nightly miri rust-src"
  echo "  cargo +nightly miri test -p xenpv-ring --test ring"
fi

step "deploy/'s systemd unit under a real systemd, in a container (tests/systemd/run.sh, about 15 s)"
if [ "$(id -u)" = 0 ]; then
  tests/systemd/run.sh
else
  as_root env PATH="$PATH" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}" tests/systemd/run.sh
fi

step "real Xen: Xen 4.17 + Linux dom0/domU in QEMU (tests/xen/run.sh, about 3 minutes)"
if [ -n "${XENPV_SKIP_RIG:-}" ]; then
  echo "SKIPPED the real-Xen rig because XENPV_SKIP_RIG is set (${XENPV_SKIP_RIG}): Linux's"
  echo "blkfront/blkback against ours were NOT tested. Unset it to run tests/xen/run.sh."
else
  tests/xen/run.sh
fi

step "all tests passed"
