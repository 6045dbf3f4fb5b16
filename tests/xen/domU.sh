# domU of the rig (sourced by /init): answers dom0's commands. dom0 writes "<n> <cmd> [args]" to
# /local/domain/<me>/rig/cmd; we run it and write "<n> ok ..." or "<n> fail <why>" to .../res.
mod drivers/block/xen-blkfront
DOMID=$(xenpv-rig domid)
R=/local/domain/$DOMID/rig
mark "domU rig domid=$DOMID"
sha() { sha256sum "$1" | cut -d' ' -f1; }
# waitdev NAME: wait for /dev/NAME, at most 60 s
waitdev() { i=0; while [ ! -b "/dev/$1" ]; do i=$((i + 1)); [ $i -gt 300 ] && return 1; sleep 0.2; done; }

do_hello() { echo "ok"; }
do_s1_io() {
  waitdev xvda || { echo "fail no /dev/xvda after 60 s"; return; }
  dd if=/dev/urandom of=/tmp/a bs=1M count=16 2>/dev/null
  dd if=/dev/urandom of=/tmp/b bs=1M count=16 2>/dev/null
  # 1 MiB direct writes: Linux blkfront sends them with indirect descriptors
  dd if=/tmp/a of=/dev/xvda bs=1M oflag=direct conv=fsync 2>/dev/null || { echo "fail write 0..16M"; return; }
  dd if=/tmp/b of=/dev/xvda bs=1M seek=32 oflag=direct conv=fsync 2>/dev/null || { echo "fail write 32..48M"; return; }
  blkdiscard -o $((32 << 20)) -l $((8 << 20)) /dev/xvda || { echo "fail blkdiscard"; return; }
  sync
  echo 3 >/proc/sys/vm/drop_caches
  dd if=/dev/xvda of=/tmp/ra bs=1M count=16 iflag=direct 2>/dev/null || { echo "fail read 0..16M"; return; }
  dd if=/dev/xvda of=/tmp/rz bs=1M skip=32 count=8 2>/dev/null || { echo "fail buffered read 32..40M"; return; }
  dd if=/dev/xvda of=/tmp/rb bs=1M skip=40 count=8 iflag=direct 2>/dev/null || { echo "fail read 40..48M"; return; }
  dd if=/tmp/b of=/tmp/b2 bs=1M skip=8 count=8 2>/dev/null
  [ "$(sha /tmp/ra)" = "$(sha /tmp/a)" ] || { echo "fail read back 0..16M differs"; return; }
  [ "$(sha /tmp/rb)" = "$(sha /tmp/b2)" ] || { echo "fail read back 40..48M differs"; return; }
  dd if=/dev/zero of=/tmp/z bs=1M count=8 2>/dev/null
  [ "$(sha /tmp/rz)" = "$(sha /tmp/z)" ] || { echo "fail discarded range reads back non-zero"; return; }
  echo "ok $(sha /tmp/a) $(sha /tmp/b2) queues=$(ls /sys/block/xvda/mq | wc -l)"
  rm -f /tmp/ra /tmp/rb /tmp/rz /tmp/b /tmp/b2 /tmp/z
}
# size DEV SECTORS [MIB]: wait (30 s at most) until the kernel sees DEV with SECTORS sectors (an
# online resize); with MIB, then write 1 MiB of random data there and answer its sha256
do_size() {
  i=0; while [ "$(cat /sys/block/$1/size)" != "$2" ]; do i=$((i + 1)); [ $i -gt 150 ] && { echo "fail /sys/block/$1/size is $(cat /sys/block/$1/size) after 30 s, want $2"; return; }; sleep 0.2; done
  [ -n "$3" ] || { echo ok; return; }
  dd if=/dev/urandom of=/tmp/g bs=1M count=1 2>/dev/null
  dd if=/tmp/g of=/dev/$1 bs=1M seek="$3" oflag=direct conv=fsync 2>/dev/null || { echo "fail write at $3 MiB"; return; }
  echo "ok $(sha /tmp/g)"
  rm -f /tmp/g
}
# ro DEV: the disk is read-only to the kernel, a write to it fails; answers the sha256 of 16 MiB
do_ro() {
  waitdev "$1" || { echo "fail no /dev/$1 after 60 s"; return; }
  [ "$(cat /sys/block/$1/ro)" = 1 ] || { echo "fail /sys/block/$1/ro is $(cat /sys/block/$1/ro), want 1"; return; }
  if dd if=/dev/zero of=/dev/$1 bs=4k count=1 oflag=direct 2>/dev/null; then echo "fail a write to the read-only disk succeeded"; return; fi
  echo "ok $(dd if=/dev/$1 bs=1M count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
}
# s4k DEV: a disk of 4096-byte logical sectors (16 MiB): the kernel takes the sizes up, direct
# I/O of 1 MiB and of one 4 KiB block works; answers the sha256 of the disk as found, then of
# the 1 MiB written at 4 MiB and of the 4 KiB block written at 12 MiB + 4 KiB
do_s4k() {
  waitdev "$1" || { echo "fail no /dev/$1 after 60 s"; return; }
  q=/sys/block/$1/queue
  [ "$(cat $q/logical_block_size)" = 4096 ] || { echo "fail logical_block_size $(cat $q/logical_block_size), want 4096"; return; }
  [ "$(cat $q/physical_block_size)" = 4096 ] || { echo "fail physical_block_size $(cat $q/physical_block_size), want 4096"; return; }
  [ "$(cat /sys/block/$1/size)" = 32768 ] || { echo "fail size $(cat /sys/block/$1/size) sectors of 512 bytes, want 32768"; return; }
  before=$(dd if=/dev/$1 bs=1M count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
  dd if=/dev/urandom of=/tmp/w bs=1M count=1 2>/dev/null
  dd if=/dev/urandom of=/tmp/w4 bs=4k count=1 2>/dev/null
  dd if=/tmp/w of=/dev/$1 bs=1M seek=4 oflag=direct conv=fsync 2>/dev/null || { echo "fail 1 MiB write"; return; }
  dd if=/tmp/w4 of=/dev/$1 bs=4k seek=3073 oflag=direct conv=fsync 2>/dev/null || { echo "fail 4 KiB write"; return; }
  dd if=/dev/$1 of=/tmp/r bs=1M skip=4 count=1 iflag=direct 2>/dev/null || { echo "fail 1 MiB read"; return; }
  [ "$(sha /tmp/r)" = "$(sha /tmp/w)" ] || { echo "fail 1 MiB read back differs"; return; }
  echo "ok $before $(sha /tmp/w) $(sha /tmp/w4)"
  rm -f /tmp/w /tmp/w4 /tmp/r
}
do_gone() {
  i=0; while [ -e "/sys/block/$1" ]; do i=$((i + 1)); [ $i -gt 150 ] && { echo "fail /dev/$1 still there after 30 s"; return; }; sleep 0.2; done
  echo ok
}
do_dev() {
  waitdev "$1" || { echo "fail no /dev/$1 after 60 s"; return; }
  echo "ok $(dd if=/dev/$1 bs=1M count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
}
# background writers: two dd in parallel keep requests in flight while dom0 restarts blkback
do_bg_start() {
  dd if=/dev/urandom of=/tmp/c bs=1M count=16 2>/dev/null
  rm -f /tmp/bg.*
  (dd if=/tmp/c of=/dev/xvda bs=16k count=512 seek=$((16 << 6)) oflag=direct 2>/tmp/bg.err1; echo $? >/tmp/bg.rc1) >/dev/null 2>&1 &
  (dd if=/tmp/c of=/dev/xvda bs=16k skip=512 count=512 seek=$((24 << 6)) oflag=direct 2>/tmp/bg.err2; echo $? >/tmp/bg.rc2) >/dev/null 2>&1 &
  echo ok
}
do_bg_running() {
  if [ -e /tmp/bg.rc1 ] && [ -e /tmp/bg.rc2 ]; then echo "fail both writers already done"; else echo "ok"; fi
}
do_bg_wait() {
  i=0; while [ ! -e /tmp/bg.rc1 ] || [ ! -e /tmp/bg.rc2 ]; do i=$((i + 1)); [ $i -gt 800 ] && { echo "fail writers still running after 160 s"; return; }; sleep 0.2; done
  [ "$(cat /tmp/bg.rc1)$(cat /tmp/bg.rc2)" = 00 ] || { echo "fail dd: $(cat /tmp/bg.err1 /tmp/bg.err2 | tr '\n' ' ')"; return; }
  dd if=/dev/xvda of=/tmp/rc bs=1M skip=16 count=16 iflag=direct 2>/dev/null || { echo "fail read back"; return; }
  [ "$(sha /tmp/rc)" = "$(sha /tmp/c)" ] || { echo "fail data written across the restart reads back wrong"; return; }
  echo "ok 16 MiB in 1024 direct writes of 16 KiB read back intact"
}
do_s2_prep() {
  rmmod xen_blkfront || { echo "fail rmmod xen_blkfront"; return; }
  # what a userspace frontend needs: grant pages to dom0 and bind event channels
  mod drivers/xen/xen-gntalloc
  mod drivers/xen/xen-evtchn
  mod drivers/block/nbd
  echo ok
}
do_s2_io() {
  rm -f /tmp/xvdb.sock
  dev=$1; shift
  xenpv-blkfront --platform xen --domid "$DOMID" --device "$dev" --nbd-socket /tmp/xvdb.sock \
    "$@" >/tmp/blkfront.log 2>&1 &
  echo $! >/tmp/blkfront.pid
  i=0; while [ ! -S /tmp/xvdb.sock ]; do i=$((i + 1)); [ $i -gt 300 ] && { echo "fail xenpv-blkfront did not connect: $(tail -3 /tmp/blkfront.log | tr '\n' ' ')"; return; }; sleep 0.2; done
  nbd-client -u /tmp/xvdb.sock /dev/nbd0 >/tmp/nbd.log 2>&1 || nbd-client -unix /tmp/xvdb.sock /dev/nbd0 >>/tmp/nbd.log 2>&1 ||
    { echo "fail nbd-client: $(tr '\n' ' ' </tmp/nbd.log)"; return; }
  dd if=/dev/urandom of=/tmp/d bs=1M count=16 2>/dev/null
  dd if=/tmp/d of=/dev/nbd0 bs=1M oflag=direct conv=fsync 2>/dev/null || { echo "fail write through nbd0"; return; }
  echo 3 >/proc/sys/vm/drop_caches
  dd if=/dev/nbd0 of=/tmp/rd bs=1M count=16 iflag=direct 2>/dev/null || { echo "fail read through nbd0"; return; }
  [ "$(sha /tmp/rd)" = "$(sha /tmp/d)" ] || {
    echo "domU: blkfront log: $(tail -5 /tmp/blkfront.log)" >/dev/console
    at=$(cmp /tmp/rd /tmp/d 2>/dev/null | sed -n 's/.*char \([0-9]*\).*/\1/p')
    if [ -n "$at" ]; then
      at=$(((at - 1) & ~63))
      echo "domU: read at $at: $(dd if=/tmp/rd bs=1 skip=$at count=96 2>/dev/null | hexdump -C | head -6 | tr '\n' '|')" >/dev/console
      echo "domU: wrote at $at: $(dd if=/tmp/d bs=1 skip=$at count=96 2>/dev/null | hexdump -C | head -6 | tr '\n' '|')" >/dev/console
      dd if=/dev/nbd0 of=/tmp/rd2 bs=1M count=16 iflag=direct 2>/dev/null
      echo "domU: a second read differs in $(cmp -l /tmp/rd2 /tmp/d 2>/dev/null | wc -l) bytes" >/dev/console
    fi
    echo "fail read back through xenpv-blkfront differs ($(cmp /tmp/rd /tmp/d 2>&1 | head -1); $(cmp -l /tmp/rd /tmp/d 2>/dev/null | wc -l) bytes differ) wrote $(sha /tmp/d)"
    return
  }
  # the persistent pool the frontend settled on (its ready line), for dom0 to check
  echo "ok $(sha /tmp/d) pool=$(sed -n 's/.*ready.* pool-pages=\([0-9]*\).*/\1/p' /tmp/blkfront.log | head -1)"
}
# s2-size SECTORS [MIB]: wait (60 s at most) until xenpv-blkfront (of s2-io) logs that the
# backend resized the disk to SECTORS sectors, poking the disk with a read through nbd0 now and
# then (Linux's blkback looks at the size between requests); then a new NBD connection must see
# the new size; with MIB, write 1 MiB of random data there through it and answer its sha256
do_s2_size() {
  i=0; until grep -q " sectors=$1" /tmp/blkfront.log; do
    i=$((i + 1)); [ $i -gt 120 ] && { echo "fail xenpv-blkfront logged no resize to $1 sectors after 60 s: $(tail -2 /tmp/blkfront.log | tr '\n' ' ')"; return; }
    dd if=/dev/nbd0 of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null
    sleep 0.5
  done
  nbd-client -u /tmp/xvdb.sock /dev/nbd1 >/tmp/nbd1.log 2>&1 || nbd-client -unix /tmp/xvdb.sock /dev/nbd1 >>/tmp/nbd1.log 2>&1 ||
    { echo "fail nbd-client (a second connection): $(tr '\n' ' ' </tmp/nbd1.log)"; return; }
  size=$(cat /sys/block/nbd1/size)
  if [ "$size" != "$1" ]; then
    nbd-client -d /dev/nbd1 >/dev/null 2>&1
    echo "fail a new NBD connection sees $size sectors, want $1"
    return
  fi
  if [ -n "$2" ]; then
    dd if=/dev/urandom of=/tmp/g bs=1M count=1 2>/dev/null
    if ! dd if=/tmp/g of=/dev/nbd1 bs=1M seek="$2" oflag=direct conv=fsync 2>/dev/null; then
      nbd-client -d /dev/nbd1 >/dev/null 2>&1
      echo "fail write at $2 MiB through the new NBD connection"
      return
    fi
  fi
  nbd-client -d /dev/nbd1 >/dev/null 2>&1
  if [ -n "$2" ]; then echo "ok $(sha /tmp/g)"; rm -f /tmp/g; else echo ok; fi
}
do_s2_end() {
  nbd-client -d /dev/nbd0 >/dev/null 2>&1
  pid=$(cat /tmp/blkfront.pid)
  kill -TERM "$pid"
  # running until it is gone or a zombie (init, its new parent, reaps it later)
  alive() { [ -e "/proc/$pid/stat" ] && [ "$(cut -d' ' -f3 "/proc/$pid/stat")" != Z ]; }
  i=0; while alive; do i=$((i + 1)); [ $i -gt 50 ] && { echo "domU: blkfront log: $(tail -5 /tmp/blkfront.log)" >/dev/console; kill -KILL "$pid"; echo "fail xenpv-blkfront still running 10 s after SIGTERM"; return; }; sleep 0.2; done
  grep -q "xenpv-blkfront: closed" /tmp/blkfront.log || { echo "fail xenpv-blkfront did not close the device: $(tail -3 /tmp/blkfront.log | tr '\n' ' ')"; return; }
  echo ok
}
do_s3_prep() {
  mod drivers/block/xen-blkfront
  echo ok
}

n=1
while :; do
  line=$(xenpv-rig wait "$R/cmd" "$n " 600) || { mark "domU: no command $n: giving up"; break; }
  set -- ${line#"$n "}
  cmd=$(echo "$1" | tr - _); shift
  echo "domU: command $n: $cmd $* t=$(up)"
  ans=$("do_$cmd" "$@" 2>&1 | tail -1)
  echo "domU: answer $n: $ans t=$(up)"
  xenstore-write "$R/res" "$n $ans"
  n=$((n + 1))
done
