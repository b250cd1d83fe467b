#!/usr/bin/env bash
# The main job: boot the default guest (Debian 6.1 cloud kernel, 2 vCPUs) on lpvmm and
# show what happens, on real KVM (through the nested test host where this machine's
# /dev/kvm cannot run a stock kernel). Installs what it needs first.
set -Eeuo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
"$ROOT/scripts/setup.sh"
exec cargo run --quiet -p lpvmm-tests --bin demo -- "$@"
