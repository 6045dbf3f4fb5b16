#!/usr/bin/env bash
# deploy/xenpv-blkback.service under a real systemd: the unit as shipped (the binary installed
# where it says, every hardening line in force) plus one drop-in that points the daemon at the
# local platform, in a systemd-nspawn container booted from an overlay of this machine's root
# (this machine's PID 1 is not systemd). The local platform, the frontend (`xenpv-blkfront`,
# exported over NBD) and fio run outside the container and reach the daemon through a directory
# bound into it. Checks:
#   * Type=notify: the unit becomes active (READY=1 reached systemd), and the daemon runs with
#     no new privileges, a seccomp filter and only the two capabilities the unit names;
#   * WatchdogSec: systemd records watchdog pings, and the daemon is not restarted for want of
#     them;
#   * the sandbox does not get in the way: a disk is served (fio writes and verifies it);
#   * `systemctl restart`, and a SIGKILL that Restart=on-failure answers, in the middle of
#     writes: the writes complete and verify, the frontend never sees the device leave
#     Connected (the journals in RuntimeDirectory, kept by RuntimeDirectoryPreserve);
#   * `systemctl stop` ends the daemon cleanly.
# Run as root on Debian 12 (it apt-get installs systemd-container, fio and libnbd-bin if missing).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
B=$TARGET/release
# Not under /tmp, /var/tmp (PrivateTmp), /root or /home (ProtectHome): the service must see it.
S=/var/lib/xenpv-systemd-test
W=$TARGET/systemd-test
UNIT=xenpv-blkback.service

[ "$(id -u)" = 0 ] || { echo "tests/systemd/run.sh: run as root (it mounts and boots a container)" >&2; exit 1; }
need=()
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v fio >/dev/null || need+=(fio)
[ -x /lib/systemd/systemd ] || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> systemd test: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y "${need[@]}" >/dev/null || { apt-get update -qq && apt-get install -y "${need[@]}" >/dev/null; }
fi
echo "==> systemd test: building release binaries"
(cd "$ROOT" && cargo build --release --bin xenpv-blkback --bin xenpv-blkfront --bin xenpv)

PIDS=()
NSPAWN=
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  if [ -n "$NSPAWN" ]; then
    kill "$NSPAWN" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$NSPAWN" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$NSPAWN" 2>/dev/null
  fi
  wait 2>/dev/null
  mountpoint -q "$W/root" && umount "$W/root"
  mountpoint -q "$W/layers" && umount "$W/layers"
  rm -rf "$S"
}
trap cleanup EXIT
cleanup
FAILS=0
fail() { echo "FAIL: $*"; FAILS=$((FAILS + 1)); }
# ok SINCE MSG: print "ok: MSG" if no check failed since FAILS was SINCE
ok() { [ "$FAILS" != "$1" ] || echo "ok: $2"; }
die() {
  echo "FAIL: $*"
  echo "--- the unit's journal in the container"
  ct journalctl -u "$UNIT" --no-pager 2>/dev/null | tail -40
  echo "--- the frontend's log"
  tail -20 "$S/blkfront.log" 2>/dev/null
  echo "--- the container's console"
  tail -20 "$W/console.log" 2>/dev/null
  echo "==> systemd test FAILED"
  exit 1
}

# The local platform and a guest domain, outside the container.
rm -rf "$S" "$W"
mkdir -p "$S" "$W/layers" "$W/root"
"$B/xenpv" --state-dir "$S" local >"$S/local.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do grep -q XENSTORED_PATH "$S/local.log" && break; sleep 0.1; done
grep -q XENSTORED_PATH "$S/local.log" || die "the local platform did not start: $(cat "$S/local.log")"
D=$("$B/xenpv" --state-dir "$S" domain create --name guest) || die "xenpv domain create"
truncate -s 64M "$S/disk.img"

# The container: this machine's root, writes going to a tmpfs; the unit installed as its
# header says, and a drop-in for the local platform and a short watchdog.
mount -t tmpfs tmpfs "$W/layers"
mkdir -p "$W/layers/upper" "$W/layers/work"
mount -t overlay overlay -o "lowerdir=/,upperdir=$W/layers/upper,workdir=$W/layers/work" "$W/root"
R=$W/root
install -D -m 0755 "$B/xenpv-blkback" "$R/usr/local/sbin/xenpv-blkback"
install -D -m 0644 "$ROOT/deploy/$UNIT" "$R/etc/systemd/system/$UNIT"
mkdir -p "$R/etc/systemd/system/$UNIT.d"
cat >"$R/etc/systemd/system/$UNIT.d/local.conf" <<EOF
[Service]
ExecStart=
ExecStart=/usr/local/sbin/xenpv-blkback --platform local --state-dir $S --status-file /run/xenpv-blkback/status --engine io_uring
ReadWritePaths=$S
WatchdogSec=2
EOF
cat >"$R/etc/systemd/system/xenpv-test.target" <<EOF
[Unit]
Description=xenpv systemd test
Wants=$UNIT
After=$UNIT
EOF
echo "==> systemd test: booting systemd in a container"
# CAP_IPC_LOCK is not among the capabilities nspawn gives a container; the unit keeps it.
systemd-nspawn -D "$R" --register=no --keep-unit --bind="$S" --capability=CAP_IPC_LOCK --boot -- systemd.unit=xenpv-test.target \
  </dev/null >"$W/console.log" 2>&1 &
NSPAWN=$!
LEADER=
for _ in $(seq 100); do
  LEADER=$(pgrep -P "$NSPAWN" | head -1) && [ -n "$LEADER" ] && break
  sleep 0.1
done
[ -n "$LEADER" ] || die "systemd-nspawn started no container"
# ct CMD...: run CMD in the container (its mounts and PID namespace: systemctl reaches its PID 1)
ct() { nsenter -t "$LEADER" -m -p -- "$@"; }
prop() { ct systemctl show -p "$1" --value "$UNIT"; }

# Type=notify: active only once READY=1 came.
state=
for _ in $(seq 300); do
  state=$(prop ActiveState 2>/dev/null) || state=
  case "$state" in active | failed) break ;; esac
  sleep 0.1
done
[ "$state" = active ] || die "$UNIT is '$state' 30 s after boot, not active (READY=1 never reached systemd?)"
echo "ok: $UNIT active (Type=notify: READY=1 reached systemd)"
f=$FAILS
pid=$(prop MainPID) || die "no MainPID for $UNIT"
st=$(ct cat "/proc/$pid/status") || die "cannot read the daemon's /proc/$pid/status in the container"
grep -q '^NoNewPrivs:[[:space:]]*1$' <<<"$st" || fail "the daemon runs without NoNewPrivs"
grep -q '^Seccomp:[[:space:]]*2$' <<<"$st" || fail "the daemon runs without a seccomp filter"
# CAP_DAC_OVERRIDE (1) and CAP_IPC_LOCK (14)
grep -q '^CapBnd:[[:space:]]*0000000000004002$' <<<"$st" ||
  fail "the daemon's capability bounding set is $(grep CapBnd <<<"$st" | cut -f2), want 4002 (CAP_DAC_OVERRIDE, CAP_IPC_LOCK)"
ok "$f" "the daemon runs sandboxed (NoNewPrivs, seccomp, CapBnd 0x4002)"

# A disk served by the daemon in the container to a frontend outside it.
"$B/xenpv" --state-dir "$S" attach-disk "$D" "vdev=xvda,access=rw,target=$S/disk.img" >/dev/null ||
  die "xenpv attach-disk"
"$B/xenpv-blkfront" --platform local --state-dir "$S" --domid "$D" --device xvda --nbd-socket "$S/nbd.sock" \
  >"$S/blkfront.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 300); do [ -S "$S/nbd.sock" ] && break; sleep 0.1; done
[ -S "$S/nbd.sock" ] || die "xenpv-blkfront did not connect to the daemon in the container"
URI="nbd+unix:///?socket=$S/nbd.sock"
echo "ok: xvda connected through the daemon in the container"

# fio through the NBD export: sequential 16 KiB writes paced over about 2 s, then a read-back
# that checks every block's crc32c.
fio_job() { # NAME OFFSET
  fio --name="$1" --ioengine=nbd --uri="$URI" --rw=write --bs=16k --offset="$2" --size=16M \
    --rate_iops=500 --verify=crc32c --verify_fatal=1 --iodepth=4 --output="$S/fio-$1.log" >/dev/null 2>&1
}
fio_job plain 0 || die "fio through the served disk: $(tail -5 "$S/fio-plain.log")"
echo "ok: 16 MiB written and verified through the served disk"

# WatchdogSec=2: pings recorded, no restart for want of them.
f=$FAILS
w1=$(prop WatchdogTimestampMonotonic) || w1=0
sleep 3
w2=$(prop WatchdogTimestampMonotonic) || w2=0
[ "$w1" -gt 0 ] && [ "$w2" -gt "$w1" ] || fail "systemd recorded no new watchdog ping in 3 s ($w1, then $w2)"
[ "$(prop NRestarts)" = 0 ] || fail "$UNIT was restarted $(prop NRestarts) times (the watchdog?)"
[ "$(prop ActiveState)" = active ] || fail "$UNIT is $(prop ActiveState) after 3 s of watchdog"
ok "$f" "watchdog pings reach systemd ($w1 -> $w2 us)"

# The frontend logs it whenever the backend leaves Connected (and then reconnects).
left() { grep -c "backend left Connected" "$S/blkfront.log" || true; }
# systemctl restart in the middle of writes
fio_job restart 16M &
FIO=$!
sleep 1
f=$FAILS
ct systemctl restart "$UNIT" || fail "systemctl restart $UNIT"
[ "$(prop ActiveState)" = active ] || fail "$UNIT is $(prop ActiveState) after systemctl restart"
wait $FIO || die "fio across systemctl restart: $(tail -5 "$S/fio-restart.log")"
ok "$f" "writes across systemctl restart completed and verified"
# SIGKILL in the middle of writes: Restart=on-failure starts it again
f=$FAILS
fio_job kill 32M &
FIO=$!
sleep 1
ct systemctl kill -s KILL "$UNIT" || fail "systemctl kill -s KILL $UNIT"
for _ in $(seq 100); do
  [ "$(prop NRestarts)" = 1 ] && [ "$(prop ActiveState)" = active ] && break
  sleep 0.1
done
[ "$(prop NRestarts)" = 1 ] || fail "$UNIT: NRestarts $(prop NRestarts) after a SIGKILL, want 1 (Restart=on-failure)"
wait $FIO || die "fio across SIGKILL and restart: $(tail -5 "$S/fio-kill.log")"
ok "$f" "writes across a SIGKILL and Restart=on-failure completed and verified"
[ "$(left)" = 0 ] || fail "the frontend saw the backend leave Connected $(left) times: the restarts were not invisible"
ct test -d /run/xenpv-blkback || fail "RuntimeDirectory /run/xenpv-blkback is gone"
ok "$f" "the frontend never saw the device leave Connected"

# systemctl stop: a clean exit
f=$FAILS
ct systemctl stop "$UNIT" || fail "systemctl stop $UNIT"
[ "$(prop ActiveState)" = inactive ] || fail "$UNIT is $(prop ActiveState) after systemctl stop"
[ "$(prop Result)" = success ] || fail "$UNIT stopped with result $(prop Result)"
ok "$f" "systemctl stop: $(prop ActiveState), result $(prop Result)"

[ "$FAILS" = 0 ] || die "$FAILS checks failed (above)"
echo "==> systemd test PASSED"
