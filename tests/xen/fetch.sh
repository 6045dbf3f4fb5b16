#!/usr/bin/env bash
# Fetches (apt-get download, no install) the Xen hypervisor, the Linux kernel for dom0 and domU,
# busybox, the Xen tools and their libraries, and unpacks them into $CACHE/x. Cached: a second run
# with the same package versions downloads nothing.
#   usage: fetch.sh CACHE_DIR
set -euo pipefail
CACHE=${1:?usage: fetch.sh CACHE_DIR}
mkdir -p "$CACHE/debs"
chmod 777 "$CACHE/debs" # apt-get download runs as the _apt user

# Debian bumps the kernel ABI (6.1.0-NN); take the one linux-image-amd64 points at today.
kernel_pkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
KPKG=$(kernel_pkg)
if [ -z "$KPKG" ]; then
  apt-get update -qq
  KPKG=$(kernel_pkg)
fi
[ -n "$KPKG" ] || { echo "fetch.sh: cannot resolve linux-image-amd64's kernel package (apt-cache depends linux-image-amd64)" >&2; exit 1; }

pkgs=("$KPKG" busybox-static nbd-client libnl-3-200 libnl-genl-3-200
  xen-hypervisor-4.17-amd64 xen-utils-4.17 xen-utils-common xenstore-utils libyajl2
  libxenmisc4.17 libxenstore4 libxengnttab1 libxenevtchn1 libxentoollog1 libxencall1
  libxenforeignmemory1 libxendevicemodel1 libxentoolcore1 libxenhypfs1)

# The versions apt would fetch today; the cache is valid when it was made from exactly these.
want=$(apt-cache show --no-all-versions "${pkgs[@]}" 2>/dev/null | awk '/^Package:/ {p=$2} /^Version:/ {print p "=" $2}' | sort)
if [ "$want" != "$(cat "$CACHE/stamp" 2>/dev/null)" ] || [ ! -e "$CACHE/x/.unpacked" ]; then
  echo "fetch.sh: downloading ${#pkgs[@]} packages (kernel $KPKG)"
  (cd "$CACHE/debs" && rm -f ./*.deb && { apt-get download "${pkgs[@]}" >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get download "${pkgs[@]}" >/dev/null; }; })
  rm -rf "$CACHE/x"
  echo "$want" >"$CACHE/stamp"
fi
if [ ! -e "$CACHE/x/.unpacked" ]; then
  rm -rf "$CACHE/x" && mkdir -p "$CACHE/x"
  for d in "$CACHE"/debs/*.deb; do dpkg -x "$d" "$CACHE/x"; done
  touch "$CACHE/x/.unpacked"
fi
KVER=${KPKG#linux-image-}
echo "$KVER" >"$CACHE/kver"
echo "fetch.sh: packages in $CACHE/x (kernel $KVER)"
