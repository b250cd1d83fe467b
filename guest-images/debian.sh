#!/usr/bin/env bash
# debian.sh: build the Debian system image, a real guest for lpvmm (issue 26): Debian
# bookworm from Debian's packages by mmdebstrap, with systemd, udev, both guest kernels
# of build.sh (6.1 and 6.12, the same packages) with their modules, an initramfs made by
# initramfs-tools inside the image, a root autologin on the serial console and a static
# address on the virtio NIC. Idempotent and cached, keyed by the packages' versions.
#
# Output (in $LPVMM_IMAGES, default ${XDG_CACHE_HOME:-~/.cache}/lpvmm/images):
#   debian/disk.img                   raw ext4 file system (no partition table), root=/dev/vda
#   debian/6.1/{vmlinuz,initrd.img,release}   debian/6.12/{vmlinuz,initrd.img,release}
#   debian/packages.txt               every package in the image and its version
#
# The guest's contract with a harness (see README.md):
#   - root is logged in on ttyS0 (serial getty, autologin); its login shell waits for
#     `systemctl is-system-running --wait` and prints one line
#     "LPVMM-GUEST-READY nproc=<N> release=<uname -r> modules=<number> system=<state>",
#     then prompts "guest# " (the busybox guest's contract, so that one harness drives
#     both)
#   - the first virtio NIC has 192.168.77.2/24 (systemd-networkd), the host end is .1
#   - /proc/kallsyms and /proc/PID/stack show real addresses to root (sysctl.d)
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${XDG_CACHE_HOME:-$HOME/.cache}/lpvmm
IMAGES=${LPVMM_IMAGES:-$CACHE_ROOT/images}
OUT=$IMAGES/debian
SERIES=(6.1 6.12)
# What the system runs beside the essential packages: systemd as init, udev loading
# modules, networkd for the static address, dbus (and so logind), cron and an SSH
# server listening on the network, as a small server has them; busybox for tools.
PACKAGES=(systemd systemd-sysv udev kmod initramfs-tools zstd iproute2 procps busybox
	dbus cron openssh-server)
MIRRORS=(
	"deb http://deb.debian.org/debian bookworm main"
	"deb http://deb.debian.org/debian bookworm-updates main"
	"deb http://deb.debian.org/debian-security bookworm-security main"
)
SIZE=2G # sparse; the system takes about a third of it

die() {
	echo "debian.sh: error: $*" >&2
	exit 1
}
trap 'die "command failed (line $LINENO, exit $?): $BASH_COMMAND"' ERR

[ "$(id -u)" = 0 ] || die "building the Debian image needs root (mmdebstrap's root mode)"
for pair in mmdebstrap:mmdebstrap mke2fs:e2fsprogs; do
	command -v "${pair%%:*}" >/dev/null 2>&1 && continue
	echo "installing ${pair#*:}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pair#*:}" >/dev/null ||
		die "apt-get install ${pair#*:} failed"
done

# The kernels are build.sh's: its guest-SERIES/release names the package.
kernels=()
for s in "${SERIES[@]}"; do
	rel=$(cat "$IMAGES/guest-$s/release" 2>/dev/null) || die "no $IMAGES/guest-$s/release: run build.sh first"
	kernels+=("linux-image-$rel")
done

# The cache key: the candidate version of every package asked for, and this script.
key=$(
	apt-cache policy "${PACKAGES[@]}" "${kernels[@]}" |
		awk '/^[^ ]/ { p = substr($1, 1, length($1) - 1) } /Candidate:/ { print p "=" $2 }'
	cat "${BASH_SOURCE[0]}" "$HERE/debian-customize.sh" | sha256sum | cut -c1-16
)
grep -q '=(none)$' <<<"$key" && die "a package has no candidate version (apt-get update?): $(grep '=(none)$' <<<"$key" | tr '\n' ' ')"
if [ "$(cat "$OUT/key" 2>/dev/null)" = "$key" ] && [ -e "$OUT/disk.img" ]; then
	echo "cached: debian ($(tr '\n' ' ' <"$OUT/key" | cut -c1-120)...)"
	exit 0
fi

mkdir -p "$IMAGES/.work"
WORK=$(mktemp -d "$IMAGES/.work/debian.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
echo "building the Debian system image (mmdebstrap; a few minutes)"
include=$(IFS=,; echo "${PACKAGES[*]},${kernels[*]}")
mmdebstrap --quiet --variant=minbase --include="$include" \
	--dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
	--dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
	--customize-hook="$HERE/debian-customize.sh \"\$1\"" \
	bookworm "$WORK/root" "${MIRRORS[@]}" || die "mmdebstrap failed"

mkdir -p "$WORK/out"
for s in "${SERIES[@]}"; do
	rel=$(cat "$IMAGES/guest-$s/release")
	mkdir -p "$WORK/out/$s"
	cp "$WORK/root/boot/vmlinuz-$rel" "$WORK/out/$s/vmlinuz"
	cp "$WORK/root/boot/initrd.img-$rel" "$WORK/out/$s/initrd.img"
	echo "$rel" >"$WORK/out/$s/release"
done
chroot "$WORK/root" dpkg-query -W -f='${Package} ${Version}\n' >"$WORK/out/packages.txt"
# The file system is made from the directory: no loop device, no mount.
mke2fs -q -t ext4 -L debian -d "$WORK/root" "$WORK/out/disk.img" "$SIZE"
echo "$key" >"$WORK/out/key"
rm -rf "$OUT.old"
[ -e "$OUT" ] && mv "$OUT" "$OUT.old"
mv "$WORK/out" "$OUT"
rm -rf "$OUT.old"
echo "debian image ready: $OUT ($(wc -l <"$OUT/packages.txt") packages, $(du -h "$OUT/disk.img" | cut -f1) used of $SIZE)"
