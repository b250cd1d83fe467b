#!/usr/bin/env bash
# Install what lpvmm's demo and tests need on a Debian bookworm machine, build lpvmm,
# and build the guest/test-host images (cached in ~/.cache/lpvmm, outside git).
# Idempotent: a second run installs nothing and rebuilds nothing that is current.
set -Eeuo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# qemu-system-x86: the nested test host (when /dev/kvm has no VMX/SVM under it).
# gcc, libc6-dev: static guest test programs. The rest: image building.
PKGS=(qemu-system-x86 gcc libc6-dev cpio kmod binutils xz-utils zstd busybox-static)
missing=()
for p in "${PKGS[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	echo "setup: installing ${missing[*]}"
	SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "setup: building lpvmm"
(cd "$ROOT" && cargo build --workspace --all-targets --quiet)

echo "setup: building guest images"
"$ROOT/guest-images/build.sh"
