#!/usr/bin/env bash
# Builds the rig's boot files from the unpacked packages (fetch.sh) and our release binaries:
#   OUT/xen.elf        the hypervisor (QEMU's multiboot loader wants the plain ELF)
#   OUT/vmlinux        the dom0 kernel as an uncompressed ELF
#   OUT/dom0.cpio.gz   dom0's initramfs: busybox, Xen's toolstack, the kernel modules, our
#                      xenpv-blkback and xenpv, and the domU's kernel and initramfs
# The domU's initramfs holds busybox, its modules, xenpv-blkfront, nbd-client and xenpv-rig.
#   usage: build.sh CACHE_DIR BIN_DIR OUT_DIR
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=$1 BIN=$2 OUT=$3
X=$CACHE/x
KVER=$(cat "$CACHE/kver")
MODS=$X/lib/modules/$KVER/kernel
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$X/usr/lib/x86_64-linux-gnu:$X/lib/x86_64-linux-gnu

# copy FILE to ROOT at its path (without the $X prefix), with the shared libraries it needs
copy_with_libs() {
  local root=$1 f=$2 rel lib
  rel=${f#"$X"}
  mkdir -p "$root/$(dirname "$rel")"
  cp -L "$f" "$root/$rel"
  # ldd fails on static binaries: nothing to copy then
  { ldd "$f" 2>/dev/null || true; } | awk '/=>/ {print $3} /^[[:space:]]*\/.*ld-linux/ {print $1}' |
    grep '^/' | while read -r lib; do
      rel=${lib#"$X"}
      [ -e "$root/$rel" ] && continue
      mkdir -p "$root/$(dirname "$rel")"
      cp -L "$lib" "$root/$rel"
    done
  if { ldd "$f" 2>/dev/null || true; } | grep -q 'not found'; then
    echo "build.sh: $f needs a library this machine lacks:" >&2
    ldd "$f" | grep 'not found' >&2
    exit 1
  fi
}

# root with busybox, /init, the xenstore tools and the given kernel modules
base() {
  local root=$1; shift
  rm -rf "$root"
  mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,run,var,usr/bin,usr/sbin,usr/local/bin}
  cp "$X/bin/busybox" "$root/bin/busybox"
  cp "$HERE/init" "$root/init"
  chmod +x "$root/init"
  for m in "$@"; do
    mkdir -p "$root/lib/modules/$KVER/kernel/$(dirname "$m")"
    cp "$MODS/$m.ko" "$root/lib/modules/$KVER/kernel/$m.ko"
  done
  copy_with_libs "$root" "$X/usr/bin/xenstore"
  for l in "$X"/usr/bin/xenstore-*; do cp -a "$l" "$root/usr/bin/"; done
  copy_with_libs "$root" "$BIN/xenpv-rig"
  mv "$root/$BIN/xenpv-rig" "$root/usr/local/bin/"
}

ours() { # root binary...: our binaries go to /usr/local/bin
  local root=$1 b; shift
  for b in "$@"; do
    copy_with_libs "$root" "$BIN/$b"
    mv "$root/$BIN/$b" "$root/usr/local/bin/"
  done
}

cpio_gz() { (cd "$1" && find . | cpio -o -H newc --owner=0:0 2>/dev/null | gzip -1); }

STAGE=$OUT/stage
# ---- domU
base "$STAGE/domU" drivers/block/xen-blkfront drivers/block/nbd \
  drivers/xen/xen-evtchn drivers/xen/xen-gntalloc
ours "$STAGE/domU" xenpv-blkfront
copy_with_libs "$STAGE/domU" "$X/sbin/nbd-client"
cp "$HERE/domU.sh" "$STAGE/domU/rig-domU.sh"
cpio_gz "$STAGE/domU" >"$OUT/domU.cpio.gz"

# ---- dom0
D=$STAGE/dom0
base "$D" drivers/xen/xen-evtchn drivers/xen/xen-privcmd drivers/xen/xenfs/xenfs \
  drivers/xen/xen-gntdev drivers/xen/xen-gntalloc drivers/block/loop \
  drivers/block/xen-blkback/xen-blkback
ours "$D" xenpv-blkback xenpv
XB=$X/usr/lib/xen-4.17/bin
for b in xl xenstored xenconsoled xen-init-dom0 libxl-save-helper; do copy_with_libs "$D" "$XB/$b"; done
# xl calls pthread_cancel, which dlopen()s libgcc_s: "xl create" aborts without it
mkdir -p "$D/lib/x86_64-linux-gnu"
cp -L /lib/x86_64-linux-gnu/libgcc_s.so.1 "$D/lib/x86_64-linux-gnu/"
mkdir -p "$D/etc/xen" "$D/boot"
touch "$D/etc/xen/xl.conf"
if [ ! -e "$CACHE/vmlinux-$KVER" ]; then
  "$HERE/vmlinux.py" "$X/boot/vmlinuz-$KVER" "$CACHE/vmlinux-$KVER.tmp"
  mv "$CACHE/vmlinux-$KVER.tmp" "$CACHE/vmlinux-$KVER"
fi
# the domU kernel as a gzip'd ELF: libxenguest unpacks gzip far faster than xz under TCG
gzip -1 -c "$CACHE/vmlinux-$KVER" >"$D/boot/vmlinuz-domU"
cp "$OUT/domU.cpio.gz" "$D/boot/initrd-domU.img"
cp "$HERE/domU.cfg" "$D/etc/xen/domU.cfg"
cp "$HERE/dom0.sh" "$D/rig-dom0.sh"
cpio_gz "$D" >"$OUT/dom0.cpio.gz"
ln -sf "$CACHE/vmlinux-$KVER" "$OUT/vmlinux"
zcat "$X/boot/xen-4.17-amd64.gz" >"$OUT/xen.elf"
rm -rf "$STAGE"
echo "build.sh: $(du -h "$OUT/dom0.cpio.gz" | cut -f1) dom0 initramfs, $(du -h "$OUT/domU.cpio.gz" | cut -f1) domU initramfs"
