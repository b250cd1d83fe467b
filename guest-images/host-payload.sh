#!/usr/bin/env bash
# host-payload.sh [--qemu] LPVMM_BINARY OUT.cpio [SRC=/DEST ...]
#
# Builds the payload archive that is appended to host/base.cpio (the kernel
# unpacks concatenated initramfs archives in order): an uncompressed newc cpio
# holding
#   /usr/bin/lpvmm                      stripped copy of LPVMM_BINARY
#   the shared libraries it needs       (from ldd, at their usual paths)
#   /images/guest-6.1/{vmlinuz,release}
#   /images/guest-6.12/{vmlinuz,release}
#   /images/guest-initrd.cpio.gz
#   any extra SRC=/DEST files given     (e.g. patches: fix.kp=/root/fix.kp;
#                                       an executable ELF brings its libraries)
#   with --qemu: this machine's qemu-system-x86_64-microvm (KVM-only build,
#     ~8 MB + ~3 MB of libraries beyond glibc) and its two firmware files, for
#     comparisons with QEMU on the test host's /dev/kvm, e.g.
#       qemu-system-x86_64-microvm -M microvm -accel kvm -cpu host -smp 2 -m 512M \
#         -nodefaults -no-user-config -display none -no-reboot -serial stdio \
#         -kernel /images/guest-6.1/vmlinuz -initrd /images/guest-initrd.cpio.gz \
#         -append console=ttyS0
# from the images built by build.sh ($LPVMM_IMAGES, default
# ${XDG_CACHE_HOME:-~/.cache}/lpvmm/images). Takes a second or two.
set -Eeuo pipefail

IMAGES=${LPVMM_IMAGES:-${XDG_CACHE_HOME:-$HOME/.cache}/lpvmm/images}

die() {
	echo "host-payload.sh: error: $*" >&2
	exit 1
}
trap 'die "command failed (line $LINENO, exit $?): $BASH_COMMAND"' ERR

with_qemu=0
if [ "${1:-}" = --qemu ]; then
	with_qemu=1
	shift
fi
[ $# -ge 2 ] || die "usage: host-payload.sh [--qemu] LPVMM_BINARY OUT.cpio [SRC=/DEST ...]"
bin=$1 out=$2
shift 2
if ((with_qemu)); then
	# paths as the Debian build expects them (its firmware search path is compiled in:
	# QEMU 7.2 ships bios-microvm.bin in /usr/share/qemu, QEMU 10 takes seabios's)
	[ -x /usr/bin/qemu-system-x86_64-microvm ] || die "--qemu: /usr/bin/qemu-system-x86_64-microvm missing (scripts/setup.sh installs it)"
	for fw in /usr/share/qemu/bios-microvm.bin /usr/share/seabios/bios-microvm.bin ""; do
		[ -z "$fw" ] && die "--qemu: bios-microvm.bin missing (apt-get install seabios)"
		[ -f "$fw" ] && break
	done
	set -- "$@" /usr/bin/qemu-system-x86_64-microvm=/usr/bin/qemu-system-x86_64-microvm \
		"$fw=$fw" /usr/share/qemu/linuxboot_dma.bin=/usr/share/qemu/linuxboot_dma.bin
fi
if ! [ -f "$bin" ] || ! [ -x "$bin" ]; then
	die "$bin is not an executable file"
fi
for t in cpio:cpio strip:binutils ldd:libc-bin; do
	command -v "${t%%:*}" >/dev/null || die "${t%%:*} not found (apt-get install ${t#*:})"
done

IMAGE_FILES=(guest-6.1/vmlinuz guest-6.1/release guest-6.12/vmlinuz guest-6.12/release
	guest-initrd.cpio.gz)
for f in "${IMAGE_FILES[@]}"; do
	[ -f "$IMAGES/$f" ] || die "$IMAGES/$f missing: run guest-images/build.sh first"
done

stage=$(mktemp -d "${TMPDIR:-/tmp}/lpvmm-payload.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# Large files go in as symlinks to the originals; cpio --dereference stores
# their contents, so nothing big is copied twice.
add() { # SRC /DEST
	mkdir -p "$stage$(dirname "$2")"
	ln -sf "$(realpath "$1")" "$stage$2"
}

mkdir -p "$stage/usr/bin"
cp "$bin" "$stage/usr/bin/lpvmm"
chmod 0755 "$stage/usr/bin/lpvmm"
strip "$stage/usr/bin/lpvmm" 2>/dev/null || echo "host-payload.sh: warning: cannot strip $bin" >&2

# Shared libraries, from ldd's three line shapes:
#   libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)
#   /lib64/ld-linux-x86-64.so.2 (0x...)
#   linux-vdso.so.1 (0x...)                       (in the kernel: skipped)
# A static binary makes ldd fail with "not a dynamic executable": no libraries.
add_libs() { # BINARY
	local deps a b c _ lib
	if ! deps=$(ldd "$1" 2>&1); then
		grep -q 'not a dynamic executable\|statically linked' <<<"$deps" && return 0
		die "ldd $1 failed: $deps"
	fi
	while read -r a b c _; do
		if [ "$b" = "=>" ]; then
			[ "$c" = "not" ] && die "$1 needs $a, which ldd cannot find"
			lib=$c
		elif [[ $a == /* ]]; then
			lib=$a
		else
			continue
		fi
		add "$lib" "$lib"
	done <<<"$deps"
}
add_libs "$bin"

for f in "${IMAGE_FILES[@]}"; do
	add "$IMAGES/$f" "/images/$f"
done

for extra in "$@"; do
	[[ $extra == *=/* ]] || die "extra file '$extra' is not SRC=/DEST"
	src=${extra%%=*} dest=${extra#*=}
	[ -f "$src" ] || die "extra file $src not found"
	add "$src" "$dest"
	# an executable ELF brings its shared libraries along
	if [ -x "$src" ] && [ "$(head -c 4 "$src")" = $'\177ELF' ]; then
		add_libs "$src"
	fi
done

mkdir -p "$(dirname "$out")"
(cd "$stage" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
	cpio -o -H newc -R 0:0 --dereference --reproducible --quiet) >"$out.tmp"
mv "$out.tmp" "$out"
echo "payload: $out ($(($(stat -c %s "$out") / 1024 / 1024)) MiB)"
