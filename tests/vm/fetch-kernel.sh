#!/usr/bin/env bash
# Fetch Debian's distribution kernel (the one linux-image-amd64 names) for the test VM, unpack it
# under $1 and install its modules so virtme-ng can build the guest's initramfs.
set -euo pipefail
dest=${1:?usage: fetch-kernel.sh DIR}
mkdir -p "$dest"
cd "$dest"
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then apt-get update -qq; pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'); fi
[ -n "$pkg" ] || { echo "fetch-kernel: apt knows no linux-image-amd64 dependency" >&2; exit 1; }
ls ./"$pkg"_*.deb >/dev/null 2>&1 || apt-get download "$pkg"
rm -rf root && mkdir root && dpkg -x ./"$pkg"_*.deb root
ver=$(ls root/lib/modules | head -1)
# A fresh machine may have no /lib/modules at all: cp would then create /lib/modules itself as
# the copy (not /lib/modules/$ver) and depmod would find nothing. Make the parent first.
if [ ! -d "/lib/modules/$ver" ]; then mkdir -p /lib/modules && cp -a "root/lib/modules/$ver" /lib/modules/; fi
depmod "$ver"
ln -sfn "root/boot/vmlinuz-$ver" vmlinuz
echo "$ver" > version
echo "fetch-kernel: $pkg ($ver) ready in $dest"
