#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the integration tests on
# real KVM (natively if this machine's /dev/kvm has VMX/SVM, else inside the nested
# QEMU-TCG test host). Installs what it needs first (scripts/setup.sh).
set -Eeuo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

"$ROOT/scripts/setup.sh"

echo "== cargo fmt --check"
cargo fmt --all --check
cargo fmt --manifest-path fuzz/Cargo.toml --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test (unit and integration)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --no-fail-fast: every test binary runs and reports, even after one has failed.
set +e
cargo test --workspace --all-targets --no-fail-fast 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
# A short coverage-guided run of every fuzz target (the 1,000,000-execution runs are
# `scripts/fuzz.sh`, docs/testing.md).
echo "== fuzz (AFL++, 20000 executions per target)"
"$ROOT/scripts/fuzz.sh" 20000 2>&1 | tee -a "$log"
fuzz_rc=${PIPESTATUS[0]}
((rc)) || rc=$fuzz_rc
set -e
# One closing line for the whole run (cargo prints one per test binary).
# Every test the harness ran again because the nested platform killed its guest or its
# host is counted here and listed, so that no retry hides in a long log.
awk '/^test result:/ { p += $4; f += $6 }
     # Anywhere in a line: libtest may print "test NAME ... " before it. The kernel's
     # own "WARNING: CPU: ..." lines (in a failing test's dmesg) are not retries.
     /WARNING: / && !/WARNING: CPU:/ { w[++n] = substr($0, index($0, "WARNING: ")) }
     END {
       printf "tests: %d passed, %d failed; platform retries and host replacements: %d\n", p, f, n
       for (i = 1; i <= n; i++) print "  " substr(w[i], 1, 300)
     }' "$log"
exit "$rc"
