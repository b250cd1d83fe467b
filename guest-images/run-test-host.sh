#!/usr/bin/env bash
# run-test-host.sh [PAYLOAD.cpio]
#
# Boots the lpvmm test host under QEMU TCG with nested SVM: the Debian 6.1
# cloud kernel (host/vmlinuz) with host/base.cpio, plus PAYLOAD.cpio appended
# if given (see host-payload.sh). ttyS0 (the host's shell, see
# rootfs/host-init) is on stdio; Ctrl-A X quits, Ctrl-A C is QEMU's monitor.
#
# Environment:
#   LPVMM_IMAGES       images dir (default ${XDG_CACHE_HOME:-~/.cache}/lpvmm/images)
#   LPVMM_TTYS1        unix socket path for the host's ttyS1 (QEMU listens
#                      there; connect with e.g. `socat - UNIX-CONNECT:PATH`).
#                      Unset: ttyS1 exists but goes nowhere.
#   LPVMM_HOST_MEM     memory (default 3G)
#   LPVMM_HOST_SMP     vCPUs (default 1: with 2, QEMU's multi-threaded TCG kills guests;
#                      docs/testing.md, "The test host has one vCPU")
#   LPVMM_HOST_APPEND  extra kernel command line (e.g. "kvm_amd.nested=1")
set -Eeuo pipefail

IMAGES=${LPVMM_IMAGES:-${XDG_CACHE_HOME:-$HOME/.cache}/lpvmm/images}

die() {
	echo "run-test-host.sh: error: $*" >&2
	exit 1
}

[ $# -le 1 ] || die "usage: run-test-host.sh [PAYLOAD.cpio]"
kernel=$IMAGES/host/vmlinuz
base=$IMAGES/host/base.cpio
if ! [ -f "$kernel" ] || ! [ -f "$base" ]; then
	die "$kernel or $base missing: run guest-images/build.sh first"
fi

command -v qemu-system-x86_64 >/dev/null ||
	die "qemu-system-x86_64 not found: scripts/setup.sh installs QEMU 10 (bookworm-backports)"

initrd=$base
if [ $# -eq 1 ]; then
	[ -f "$1" ] || die "payload $1 not found"
	# base.cpio + payload in a file that is deleted at once but stays open
	# as fd 3; QEMU reads it through /proc/self/fd/3 (which it inherits
	# across exec). So nothing is left behind, however QEMU ends.
	tmp=$(mktemp "${TMPDIR:-/tmp}/lpvmm-host-initrd.XXXXXX")
	cat "$base" "$1" >"$tmp"
	exec 3<"$tmp"
	rm -f "$tmp"
	initrd=/proc/self/fd/3
fi

if [ -n "${LPVMM_TTYS1:-}" ]; then
	rm -f "$LPVMM_TTYS1"
	ttys1=(-chardev "socket,id=ttys1,path=$LPVMM_TTYS1,server=on,wait=off" -serial chardev:ttys1)
else
	ttys1=(-serial null)
fi

# Host kernel command line: short serial output (quiet; each byte costs time
# under TCG), no KASLR or mitigations (nothing to protect, faster under TCG),
# panic=-1 + -no-reboot: a host panic ends QEMU at once.
append="console=ttyS0 panic=-1 quiet nokaslr mitigations=off ${LPVMM_HOST_APPEND:-}"

# EPYC + svm + npt: QEMU's TCG emulates AMD SVM with nested paging, which
# kvm-amd.ko accepts; check=off silences warnings about EPYC features TCG
# lacks. -nodefaults: no NIC, VGA, floppy... (nothing to probe at boot).
exec qemu-system-x86_64 \
	-accel tcg,thread=multi \
	-cpu EPYC,+svm,+npt,check=off \
	-smp "${LPVMM_HOST_SMP:-1}" -m "${LPVMM_HOST_MEM:-3G}" \
	-nodefaults -no-user-config -display none -no-reboot \
	-serial mon:stdio "${ttys1[@]}" \
	-kernel "$kernel" -initrd "$initrd" -append "$append"
