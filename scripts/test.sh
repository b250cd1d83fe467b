#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the integration tests on
# real KVM (natively if this machine's /dev/kvm has VMX/SVM, else inside the nested
# QEMU-TCG test host). Installs what it needs first (scripts/setup.sh).
set -Eeuo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# Each phase's heading says how long the run has taken so far (the suite must stay
# well inside CI's limit; docs/testing.md keeps the figures).
phase() { echo "== $1 (at $((SECONDS / 60)) min $((SECONDS % 60)) s)"; }

"$ROOT/scripts/setup.sh"

phase "cargo fmt --check"
cargo fmt --all --check
phase "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
phase "cargo test (unit and integration)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --no-fail-fast: every test binary runs and reports, even after one has failed. The
# short fuzz run is one of them (fuzz/tests/short_run.rs; the long runs: scripts/fuzz.sh).
set +e
cargo test --workspace --all-targets --no-fail-fast 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
phase "done"
# One closing line for the whole run (cargo prints one per test binary).
# Every test the harness ran again because the nested platform killed its guest or its
# host is counted here and listed, so that no retry hides in a long log.
awk '/^test result:/ { p += $4; f += $6 }
     # Anywhere in a line: libtest may print "test NAME ... " before it. Only the
     # retry lines of the harness count (tests/src/group.rs, host.rs): the console of a
     # guest in a failure text has WARNING lines of its own (the kernel "WARNING: CPU:
     # ...", its SRSO notice), which are not retries. No apostrophes in this program.
     /WARNING: (a guest died of|the test host|guest [^ ]+ died during boot|[^ ]+ passed but left the test host)/ {
       w[++n] = substr($0, index($0, "WARNING: "))
     }
     END {
       printf "tests: %d passed, %d failed; platform retries and host replacements: %d\n", p, f, n
       for (i = 1; i <= n; i++) print "  " substr(w[i], 1, 300)
     }' "$log"
# Where the time went: the integration tests that took longest (each prints a TIME line).
{ grep -o 'TIME: [^ ]* [0-9]* s' "$log" || true; } | sort -k3,3nr | awk '
  { total += $3; if (NR <= 10) top[NR] = "  " $2 " " $3 " s" }
  END { printf "integration tests: %d s in all; the slowest:\n", total; for (i = 1; i <= 10 && i <= NR; i++) print top[i] }'
exit "$rc"
