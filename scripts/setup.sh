#!/usr/bin/env bash
# Install what lpvmm's demo and tests need on a Debian bookworm machine, build lpvmm,
# and build the guest/test-host images (cached in ~/.cache/lpvmm, outside git).
# Idempotent: a second run installs nothing and rebuilds nothing that is current.
set -Eeuo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# gcc, libc6-dev: static guest test programs; make: kbuild-built patches (`lpvmm kp
# build --kernel`); bison, flex, bc, libelf-dev, libssl-dev, dwarves: preparing a
# release's own source tree for diff builds (`lpvmm kp build --diff`: kconfig, objtool,
# and pahole, whose version the release's .config records). The rest: image building.
# QEMU (the nested test host, when /dev/kvm has no VMX/SVM under it) comes below.
PKGS=(gcc libc6-dev make cpio kmod binutils xz-utils zstd busybox-static
	bison flex bc libelf-dev libssl-dev dwarves)
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
apt_install() {
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
missing=()
for p in "${PKGS[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	echo "setup: installing ${missing[*]}"
	$SUDO apt-get update -qq
	apt_install "${missing[@]}"
fi

# The nested test host needs QEMU 10 or later: under bookworm's QEMU 7.2 the emulated SVM let
# guests triple-fault and the test host's kernel run with a bad GS base under
# pause/resume load (docs/testing.md, "Known platform quirks"). bookworm-backports
# carries QEMU 10.
QEMU_MIN=1:10
qemu_version() { # empty unless installed (a removed package keeps its version)
	dpkg-query -W -f='${Status} ${Version}' qemu-system-x86 2>/dev/null |
		sed -n 's/^install ok installed //p'
}
if ! dpkg --compare-versions "$(qemu_version)" ge "$QEMU_MIN"; then
	. /etc/os-release
	BACKPORTS=/etc/apt/sources.list.d/lpvmm-backports.sources
	if [ "${VERSION_CODENAME:-}" = bookworm ] && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
		echo "setup: adding bookworm-backports ($BACKPORTS)"
		printf '%s\n' "Types: deb" "URIs: http://deb.debian.org/debian" "Suites: bookworm-backports" \
			"Components: main" "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" |
			$SUDO tee "$BACKPORTS" >/dev/null
	fi
	echo "setup: installing qemu-system-x86 >= $QEMU_MIN (now: $(qemu_version || true))"
	$SUDO apt-get update -qq
	if [ "${VERSION_CODENAME:-}" = bookworm ]; then
		apt_install -t bookworm-backports qemu-system-x86
	else
		apt_install qemu-system-x86
	fi
	dpkg --compare-versions "$(qemu_version)" ge "$QEMU_MIN" || {
		echo "setup: qemu-system-x86 $(qemu_version) is older than $QEMU_MIN" >&2
		exit 1
	}
fi

echo "setup: building lpvmm"
(cd "$ROOT" && cargo build --workspace --all-targets --quiet)

echo "setup: building guest images"
"$ROOT/guest-images/build.sh"

echo "setup: building the Debian system image"
"$ROOT/guest-images/debian.sh"
