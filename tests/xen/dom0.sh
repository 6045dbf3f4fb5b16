# dom0 of the rig (sourced by /init): starts Xen's toolstack, then runs the scenarios against one
# PV domU, which it drives through xenstore (/local/domain/<domU>/rig/{cmd,res}; see domU.sh).
# Every check prints `RIG-PASS <what>` or `RIG-FAIL <what>: <why>`; the host's boot.py decides.
export PATH=$PATH:/usr/lib/xen-4.17/bin
mark dom0-init
for m in xen-evtchn xen-privcmd xenfs/xenfs xen-gntdev xen-gntalloc; do mod drivers/xen/$m; done
mkdir -p /proc/xen && mount -t xenfs xenfs /proc/xen
mkdir -p /var/run/xenstored /var/run/xen /var/lib/xenstored /var/lib/xen /var/log/xen/console
xenstored --pid-file /var/run/xenstored.pid
xen-init-dom0 >/dev/null
xenconsoled --pid-file=/var/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console
mark toolstack-up

fail() { echo "RIG-FAIL $*"; FAILED=1; }
pass() { echo "RIG-PASS $* t=$(up)"; }
sha() { dd if="$1" bs=1M skip="$2" count="$3" 2>/dev/null | sha256sum | cut -d' ' -f1; }
ZERO8=$(dd if=/dev/zero bs=1M count=8 2>/dev/null | sha256sum | cut -d' ' -f1)

ENGINE=io_uring
for a in $(cat /proc/cmdline); do case "$a" in rigengine=*) ENGINE=${a#rigengine=} ;; esac; done
start_blkback() {
  xenpv-blkback --platform xen --domid 0 --engine "$ENGINE" --status-file /run/blkback.status >>/tmp/blkback.log 2>&1 &
  BB=$!
}
SEQ=0
# ask CMD [ARGS]: run CMD in the domU; sets RES to its answer; returns non-zero unless it is `ok`
ask() {
  SEQ=$((SEQ + 1))
  xenstore-write "$R/cmd" "$SEQ $*"
  RES=$(xenpv-rig wait "$R/res" "$SEQ " "${ASK_TIMEOUT:-90}") || RES="$SEQ timeout (no answer to: $*)"
  RES=${RES#"$SEQ "}
  echo "dom0: asked '$*', domU answered '$RES' t=$(up)"
  case "$RES" in ok*) return 0 ;; *) return 1 ;; esac
}
word() { echo "$RES" | cut -d' ' -f"$1"; }

if grep -q rigstress /proc/cmdline; then
  i=0; while [ $i -lt 400 ]; do echo "x $i" | sha256sum | grep -E '^[0-9a-f]+' | cut -c1-4 >/dev/null; i=$((i + 1)); done
  mark "stress done: $(dmesg | grep -c segfault) segfaults"
  mark all-done
  poweroff -f
fi
truncate -s 64M /tmp/s1.img
start_blkback
tail -f /tmp/blkback.log | sed 's/^/[blkback] /' &
if ! xl create /etc/xen/domU.cfg >/tmp/xl.log 2>&1; then
  cat /tmp/xl.log
  fail "xl create"
  mark all-done
  poweroff -f
fi
DOMID=$(xl domid domU)
mark "domU created domid=$DOMID"
R=/local/domain/$DOMID/rig
xenstore-write "$R/cmd" "0 none" "$R/res" "0"
xenstore-chmod -r "$R" "n$DOMID"
(sleep 1; tail -f /var/log/xen/console/guest-domU.log | sed 's/^/[domU] /') &
if ! ASK_TIMEOUT=120 ask hello; then
  fail "domU did not start its rig script: $RES"
  mark all-done
  poweroff -f
fi

BE=/local/domain/0/backend/vbd/$DOMID/51712
BE4K=/local/domain/0/backend/vbd/$DOMID/51808
FE=/local/domain/$DOMID/device/vbd/51712
# ---------------------------------------------------------------- scenario 1
# our blkback, Linux's blkfront
s1() {
  xenpv attach-disk "$DOMID" "target=/tmp/s1.img,vdev=xvda,access=rw" || { fail "s1 attach-disk"; return; }
  ask s1-io || { fail "s1 I/O in the domU: $RES"; return; }
  S1SHA=$(word 2) S1B=$(word 3)
  echo "dom0: frontend negotiated: $(xenstore-ls -f "$FE" | grep -E 'multi-queue|persistent|ring-ref|protocol|event-channel' | tr '\n' ' ')"
  echo "dom0: backend status: $(cat /run/blkback.status)"
  q=$(xenstore-read "$FE/multi-queue-num-queues" 2>/dev/null)
  [ "$q" = 2 ] || fail "s1 multi-queue: frontend asked for ${q:-no} queues, want 2"
  [ "$(xenstore-read "$FE/feature-persistent")" = 1 ] || fail "s1 the frontend did not take persistent grants"
  st=$(cat /run/blkback.status)
  for k in flushes discards indirect; do
    case "$st " in *" $k=0 "*) fail "s1 no $k reached blkback: $st" ;; esac
  done
  case "$st" in *"errors=0 "*) ;; *) fail "s1 blkback counted errors: $st" ;; esac
  # online resize: the image grows under the connected disk, then shrinks back
  truncate -s 96M /tmp/s1.img
  if ask size xvda 196608 80; then
    if [ "$(sha /tmp/s1.img 80 1)" != "$(word 2)" ]; then
      fail "s1 the write past the old end (80 MiB) is not in the image"
    else
      truncate -s 64M /tmp/s1.img
      if ask size xvda 131072; then
        pass "s1 online resize: Linux blkfront saw the disk grow to 96 MiB, wrote past the old end, and saw it shrink back"
      else
        fail "s1 Linux blkfront did not see the disk shrink: $RES"
      fi
    fi
  else
    fail "s1 Linux blkfront did not see the disk grow: $RES"
  fi
  xenpv detach "$DOMID" xvda || fail "s1 detach"
  ask gone xvda || fail "s1 xvda still in the domU after detach: $RES"
  [ "$(sha /tmp/s1.img 0 16)" = "$S1SHA" ] || fail "s1 image (0..16 MiB) differs from what the domU wrote"
  [ "$(sha /tmp/s1.img 32 8)" = "$ZERO8" ] || fail "s1 discarded range (32..40 MiB) is not zero in the image"
  [ "$(sha /tmp/s1.img 40 8)" = "$S1B" ] || fail "s1 image (40..48 MiB) differs from what the domU wrote"
  pass "s1 our blkback, Linux blkfront: 2 queues, persistent grants, indirect, flush, discard; image checked after detach"
}
# our blkback, Linux's blkfront, a read-only disk (access=ro)
s1r() {
  dd if=/dev/urandom of=/tmp/ro.img bs=1M count=16 2>/dev/null
  ro=$(sha /tmp/ro.img 0 16)
  xenpv attach-disk "$DOMID" "target=/tmp/ro.img,vdev=xvdf,access=ro" || { fail "s1r attach-disk"; return; }
  ask ro xvdf || { fail "s1r read-only disk in the domU: $RES"; return; }
  [ "$(word 2)" = "$ro" ] || fail "s1r the read-only disk reads back other data"
  xenpv detach "$DOMID" xvdf || fail "s1r detach"
  ask gone xvdf || fail "s1r xvdf still in the domU after detach: $RES"
  [ "$(sha /tmp/ro.img 0 16)" = "$ro" ] || { fail "s1r the read-only image changed"; return; }
  pass "s1r read-only disk: Linux blkfront sees it read-only, a write fails, reads match, image unchanged"
}
# our blkback, Linux's blkfront, a block device of 4096-byte logical sectors (a loop device)
s1s() {
  [ -e /sys/module/loop ] || mod drivers/block/loop
  dd if=/dev/urandom of=/tmp/s4k.img bs=1M count=16 2>/dev/null
  img=$(sha /tmp/s4k.img 0 16)
  losetup /dev/loop1 /tmp/s4k.img || { fail "s1s losetup"; return; }
  if ! xenpv-rig loop-block-size /dev/loop1 4096; then
    fail "s1s 4096-byte sectors on /dev/loop1"
    losetup -d /dev/loop1
    return
  fi
  xenpv attach-disk "$DOMID" "target=/dev/loop1,vdev=xvdg,access=rw" || { fail "s1s attach-disk"; losetup -d /dev/loop1; return; }
  ok=1
  ask s4k xvdg || { fail "s1s 4096-byte-sector disk in the domU: $RES"; ok=0; }
  echo "dom0: backend announced sector-size=$(xenstore-read "$BE4K/sector-size") physical-sector-size=$(xenstore-read "$BE4K/physical-sector-size") sectors=$(xenstore-read "$BE4K/sectors")"
  before=$(word 2) w1=$(word 3) w4=$(word 4)
  xenpv detach "$DOMID" xvdg || fail "s1s detach"
  ask gone xvdg || fail "s1s xvdg still in the domU after detach: $RES"
  losetup -d /dev/loop1
  [ $ok = 1 ] || return
  [ "$before" = "$img" ] || { fail "s1s the disk read other data than the image holds"; return; }
  [ "$(sha /tmp/s4k.img 4 1)" = "$w1" ] || { fail "s1s the 1 MiB write is not in the image"; return; }
  [ "$(dd if=/tmp/s4k.img bs=4k skip=3073 count=1 2>/dev/null | sha256sum | cut -d' ' -f1)" = "$w4" ] ||
    { fail "s1s the 4 KiB write is not in the image"; return; }
  pass "s1s 4096-byte sectors: Linux blkfront takes up sector-size and physical-sector-size, 1 MiB and 4 KiB direct I/O reach the image"
}
# ---------------------------------------------------------------- scenario 3
# lifecycle: re-attach, then kill and restart blkback under I/O
s3() {
  xenpv attach-disk "$DOMID" "target=/tmp/s1.img,vdev=xvda,access=rw" || { fail "s3 re-attach"; return; }
  ask dev xvda || { fail "s3 xvda did not come back: $RES"; return; }
  [ "$(word 2)" = "$S1SHA" ] || fail "s3 re-attached disk reads back other data"
  pass "s3a detach and re-attach"
  for sig in KILL TERM; do
    ask bg-start || { fail "s3 background I/O: $RES"; return; }
    # the writers must still be running when blkback goes
    ask bg-running || { fail "s3 the writers ended before blkback was stopped: $RES"; return; }
    kill -$sig $BB; wait $BB 2>/dev/null
    echo "dom0: blkback got SIG$sig, status: $(cat /run/blkback.status) t=$(up)"
    start_blkback
    ASK_TIMEOUT=180 ask bg-wait || { fail "s3 I/O across a SIG$sig restart of blkback: $RES"; continue; }
    pass "s3 domU I/O completed across SIG$sig and restart of blkback ($RES)"
  done
  xenpv detach "$DOMID" xvda || fail "s3 detach"
  ask gone xvda || fail "s3 xvda still in the domU after detach: $RES"
}
# ---------------------------------------------------------------- scenario 2
# our blkfront in the domU, Linux's blkback in dom0
# s2_one NAME VDEV DEVID POOL ARGS [again]: one device served by Linux's blkback to
# xenpv-blkfront ARGS, whose persistent pool must be POOL pages per queue (0: none); with
# `again`, the device of the previous call, which that xenpv-blkfront closed (Linux's blkback
# is Closed), is connected again; without, the device is detached at the end unless the next
# call reuses it (S2_KEEP=1).
s2_one() {
  name=$1 vdev=$2 devid=$3 pool=$4 args=$5 again=${6:-}
  [ -n "$again" ] || s2_nodes "$vdev" "$devid"
  if ask s2-io "$vdev" $args; then
    if [ "$(sha /dev/loop0 0 16)" != "$(word 2)" ]; then
      fail "s2 $name: loop device differs from what the domU wrote"
    elif [ "$(word 3)" != "pool=$pool" ]; then
      fail "s2 $name: our blkfront ($args) settled on a persistent pool of $(word 3), not $pool pages"
    else
      pass "s2 $name: our blkfront ($args), Linux blkback: checksums match, pool $pool pages"
    fi
  else
    fail "s2 $name: I/O through xenpv-blkfront ($args): $RES"
    echo "dom0: the loop device holds $(sha /dev/loop0 0 16) (0..16 MiB)"
  fi
  echo "dom0: Linux blkback: $(xenstore-ls -f "$B" | grep -E 'state|feature|queue|order' | tr '\n' ' ')"
  echo "dom0: our frontend: $(xenstore-ls -f "$F" | tr '\n' ' ')"
  # tear down whatever happened: Linux's blkback must be gone before ours serves again
  ask s2-end || fail "s2 $name: stopping xenpv-blkfront: $RES"
  [ -n "${S2_KEEP:-}" ] && return
  xenpv detach "$DOMID" "$vdev" || xenpv detach --force "$DOMID" "$vdev" || fail "s2 $name: detach"
}
# s2_nodes VDEV DEVID: what libxl and its block hotplug script write for a phy disk on
# /dev/loop0 (physical-device in hex); sets B and F to the backend's and frontend's paths
s2_nodes() {
  B=/local/domain/0/backend/vbd/$DOMID/$2
  F=/local/domain/$DOMID/device/vbd/$2
  xenstore-write "$B/frontend" "$F" "$B/frontend-id" "$DOMID" "$B/online" 1 "$B/removable" 0 \
    "$B/bootable" 0 "$B/state" 1 "$B/dev" "$1" "$B/type" phy "$B/mode" w "$B/device-type" disk \
    "$B/params" /dev/loop0 "$B/physical-device" 7:0 "$B/physical-device-path" /dev/loop0 \
    "$F/backend" "$B" "$F/backend-id" 0 "$F/state" 1 "$F/virtual-device" "$2" "$F/device-type" disk
  xenstore-chmod -r "$B" n0 "r$DOMID"
  xenstore-chmod -r "$F" "n$DOMID" r0
}
# online resize with Linux's blkback: the loop device under the connected disk grows to 96 MiB
# (Linux's blkback rewrites `sectors`, then `state`), our blkfront takes the new size up (a new
# NBD connection sees it and writes past the old end), then shrinks back to 64 MiB
s2_resize() {
  s2_nodes xvdh 51824
  ask s2-io xvdh || { fail "s2 resize: I/O through xenpv-blkfront: $RES"; ask s2-end; xenpv detach --force "$DOMID" xvdh; return; }
  truncate -s 96M /tmp/s2.img
  if ! xenpv-rig loop-capacity /dev/loop0; then
    fail "s2 resize: the loop device did not grow"
  elif ! ask s2-size 196608 80; then
    fail "s2 resize: our blkfront did not see Linux's blkback grow the disk: $RES"
  elif [ "$(sha /dev/loop0 80 1)" != "$(word 2)" ]; then
    fail "s2 resize: the write past the old end (80 MiB) is not on the loop device"
  else
    truncate -s 64M /tmp/s2.img
    if ! xenpv-rig loop-capacity /dev/loop0; then
      fail "s2 resize: the loop device did not shrink"
    elif ! ask s2-size 131072; then
      fail "s2 resize: our blkfront did not see Linux's blkback shrink the disk: $RES"
    else
      pass "s2 resize: our blkfront followed Linux's blkback as the disk grew to 96 MiB (a write past the old end reached it) and shrank back"
    fi
  fi
  echo "dom0: Linux blkback: $(xenstore-ls -f "$B" | grep -E 'state|sectors' | tr '\n' ' ')"
  ask s2-end || fail "s2 resize: stopping xenpv-blkfront: $RES"
  xenpv detach "$DOMID" xvdh || xenpv detach --force "$DOMID" xvdh || fail "s2 resize: detach"
}
s2() {
  ask s2-prep || { fail "s2 domU preparation: $RES"; return; }
  [ -e /sys/module/loop ] || mod drivers/block/loop
  mod drivers/block/xen-blkback/xen-blkback
  truncate -s 64M /tmp/s2.img
  losetup /dev/loop0 /tmp/s2.img || fail "s2 losetup"
  # Linux's blkback does not say what it caches: a pool of 960 pages, or less to fit
  # gntalloc's default limit of 1024 grants with two queues of two ring pages (448 each).
  s2_one plain xvdb 51728 0 "--no-persistent --no-indirect"
  s2_one indirect xvdc 51744 0 "--no-persistent"
  s2_one persistent xvdd 51760 960 "--no-indirect"
  S2_KEEP=1 s2_one all xvde 51776 448 "--queues 2 --ring-order 1"
  s2_one again xvde 51776 448 "--queues 2 --ring-order 1" again
  s2_resize
  # the kernel lets its last device go a moment after the nodes are removed
  i=0; until rmmod xen_blkback 2>/dev/null; do
    i=$((i + 1)); [ $i -gt 50 ] && { fail "s2 rmmod xen_blkback: still in use after 10 s"; break; }; sleep 0.2
  done
  losetup -d /dev/loop0
}
FAILED=0
s1
s1r
s1s
# Linux's blkback would claim every vbd in dom0 too: ours stops while it runs
kill $BB; wait $BB 2>/dev/null
s2
ask s3-prep || fail "s3 reloading xen-blkfront in the domU: $RES"
start_blkback
s3
mark "scenarios done failed=$FAILED"
xl destroy domU
mark all-done
