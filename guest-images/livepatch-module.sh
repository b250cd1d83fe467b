#!/usr/bin/env bash
# livepatch-module.sh SERIES OUT.cpio.gz
#
# Builds the livepatch kernel modules in guest-images/livepatch/ (lpvmm_lp_cmdline.c,
# lpvmm_lp_nsleep.c, lpvmm_lp_getpid.c) for the guest kernel of SERIES (6.1 or 6.12, as built by build.sh),
# against that kernel's Debian linux-headers package (fetched with apt-get download,
# never installed), and writes a gzip'd cpio with each module in /root/ (for example
# /root/lpvmm_lp_cmdline.ko). Appended to the guest initrd (the kernel unpacks concatenated
# archives), it puts the modules in the guest for the side-by-side benchmark
# (tests/src/bin/bench/ patch, transition and calls; bench/endurance.rs, its peer). Cached by kernel release and source hash.
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${XDG_CACHE_HOME:-$HOME/.cache}/lpvmm
IMAGES=${LPVMM_IMAGES:-$CACHE_ROOT/images}
die() { echo "livepatch-module.sh: error: $*" >&2; exit 1; }
[ $# -eq 2 ] || die "usage: livepatch-module.sh SERIES OUT.cpio.gz"
series=$1 out=$2
rel=$(cat "$IMAGES/guest-$series/release" 2>/dev/null) || die "no guest-$series image: run guest-images/build.sh"

work=$CACHE_ROOT/livepatch/$rel
mkdir -p "$work"
# One build per release at a time (the benchmark and a person may run this together).
exec 9>"$work/lock"
flock 9
mods="lpvmm_lp_cmdline lpvmm_lp_nsleep lpvmm_lp_getpid"
src_hash=$(cat "$HERE"/livepatch/* | sha256sum | cut -c1-16)
built=1
for m in $mods; do [ -f "$work/$m.ko" ] || built=; done
if [ "$(cat "$work/stamp" 2>/dev/null)" != "$src_hash" ] || [ -z "$built" ]; then
	headers=linux-headers-$rel
	deps=$(apt-cache show --no-all-versions "$headers" 2>/dev/null | sed -n 's/^Depends: //p') ||
		die "apt-cache show $headers failed"
	[ -n "$deps" ] || die "no package $headers (apt-get update?)"
	common=$(tr ',' '\n' <<<"$deps" | sed 's/^ *//' | grep -o '^linux-headers-[^ ]*-common' | head -1)
	kbuild=$(tr ',' '\n' <<<"$deps" | sed 's/^ *//' | grep -o '^linux-kbuild-[^ ]*' | head -1)
	[ -n "$common" ] && [ -n "$kbuild" ] || die "cannot find the common headers and kbuild packages in: $deps"
	rm -rf "$work/debs" "$work/root"
	mkdir -p "$work/debs" "$work/root"
	(cd "$work/debs" && apt-get download -qq -o APT::Sandbox::User="$(id -un)" "$headers" "$common" "$kbuild") ||
		die "apt-get download $headers $common $kbuild failed"
	for d in "$work"/debs/*.deb; do dpkg-deb -x "$d" "$work/root"; done
	kdir=$work/root/usr/src/$headers
	[ -d "$kdir" ] || die "$kdir missing after unpacking"
	build=$work/build
	rm -rf "$build"
	cp -r "$HERE/livepatch" "$build"
	# The flavour's Makefile includes the common one by its installed path; point it at
	# the unpacked copy (relative symlinks, such as scripts/, work as they are).
	sed -i "s|/usr/src/|$work/root/usr/src/|g" "$kdir/Makefile"
	# No BTF for the module: it would need pahole, and the benchmark does not use it.
	make -s -C "$kdir" M="$build" CONFIG_DEBUG_INFO_BTF_MODULES= modules >"$work/build.log" 2>&1 ||
		{ tail -30 "$work/build.log" >&2; die "module build failed (log: $work/build.log)"; }
	for m in $mods; do cp "$build/$m.ko" "$work/"; done
	echo "$src_hash" >"$work/stamp"
fi
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/root"
for m in $mods; do cp "$work/$m.ko" "$stage/root/"; done
(cd "$stage" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
	cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9 -n >"$out"
echo "livepatch modules for $rel: $out"
