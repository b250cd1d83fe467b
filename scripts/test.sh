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
phase "shape (scripts/check-imports.sh, scripts/check-function-length.sh)"
scripts/check-imports.sh patcher vmm introspection
scripts/check-function-length.sh
phase "cargo test (unit and integration)"
log=$(mktemp)
# Every retry the harness makes files its evidence here, one file each; the run gets
# 3 retries in all (tests/src/retries.rs, docs/testing.md).
export LPVMM_TEST_LOG_DIR="$ROOT/target/test-logs/run-$(date +%Y%m%d-%H%M%S)-$$"
mkdir -p "$LPVMM_TEST_LOG_DIR"
trap 'rm -f "$log"' EXIT
# --no-fail-fast: every test binary runs and reports, even after one has failed. The
# short fuzz run is one of them (fuzz/tests/short_run.rs; the long runs: scripts/fuzz.sh).
set +e
cargo test --workspace --all-targets --no-fail-fast 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
phase "done"
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
# Every retry, with its signature and evidence file; more than the budget fails the run.
budget=3
retries=("$LPVMM_TEST_LOG_DIR"/retry-*.txt)
[ -e "${retries[0]}" ] || retries=()
echo "platform retries: ${#retries[@]} of at most $budget (evidence: $LPVMM_TEST_LOG_DIR)"
for f in "${retries[@]}"; do
	test=$(sed -n 's/^test: //p' "$f" | head -n 1)
	sig=$(sed -n 's/^signature: //p' "$f" | head -n 1)
	echo "  $test: ${sig:0:200} ($f)"
done
# Hosts replaced after a test that passed but left them unusable (not retries).
{ grep -o 'WARNING: [^ ]* passed but left the test host unusable.*' "$log" || true; } | sed 's/^/  /'
if ((${#retries[@]} > budget)); then
	echo "FAILED: ${#retries[@]} platform retries in one run, more than the budget of $budget" >&2
	rc=1
fi
# Where the time went: the integration tests that took longest (each prints a TIME line).
{ grep -o 'TIME: [^ ]* [0-9]* s' "$log" || true; } | sort -k3,3nr | awk '
  { total += $3; if (NR <= 10) top[NR] = "  " $2 " " $3 " s" }
  END { printf "integration tests: %d s in all; the slowest:\n", total; for (i = 1; i <= 10 && i <= NR; i++) print top[i] }'
exit "$rc"
