#!/usr/bin/env bash
# Coverage-guided fuzzing of lpvmm's untrusted inputs with AFL++ (afl.rs, stable Rust).
#
#   scripts/fuzz.sh [EXECS] [TARGET...]
#
# Runs each TARGET (default: kp tables guest control; see fuzz/src/lib.rs) from its seed
# corpus in fuzz/seeds/ until AFL++ has executed it EXECS times (default 1000000), then
# prints one line per target from AFL++'s own counters and fails if any target crashed,
# hung (over 1 s for one input) or exceeded its memory limit (1 GiB of address space).
# Findings stay in target/afl/TARGET/. Installs cargo-afl (and builds AFL++) on first
# use. (The suite's short run is fuzz/tests/short_run.rs, without AFL++.)
set -Eeuo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EXECS=${1:-1000000}
shift || true
TARGETS=("$@")
((${#TARGETS[@]})) || TARGETS=(kp tables guest control virtio_blk)

if ! cargo afl --version >/dev/null 2>&1; then
	echo "fuzz: installing cargo-afl"
	cargo install cargo-afl --locked --quiet
fi
# AFL++ itself, built once per cargo-afl version (cached under ~/.local/share/afl.rs).
cargo afl config --build >/dev/null 2>&1 || true

cd "$ROOT"
echo "fuzz: building the targets"
# The `fuzz` profile (Cargo.toml): optimised, with overflow checks and debug assertions.
cargo afl build --profile fuzz -p lpvmm-fuzz --features afl --bins --quiet
# A CI machine: no core-dump helper to wait for, no CPU frequency scaling to check,
# no UI; each run stops by itself after EXECS executions.
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
failed=0
for t in "${TARGETS[@]}"; do
	out="target/afl/$t"
	rm -rf "$out"
	mkdir -p "$out"
	start=$(date +%s)
	if ! cargo afl fuzz -i "fuzz/seeds/$t" -o "$out" -E "$EXECS" -t 1000 -m 1024 -c - \
		"target/fuzz/$t" >"$out/fuzz.log" 2>&1; then
		echo "fuzz: $t: afl-fuzz failed:"
		tail -20 "$out/fuzz.log"
		failed=1
		continue
	fi
	stats="$out/default/fuzzer_stats"
	get() { sed -n "s/^$1 *: *//p" "$stats"; }
	execs=$(get execs_done) crashes=$(get saved_crashes) hangs=$(get saved_hangs)
	echo "fuzz: $t: $execs executions in $(($(date +%s) - start)) s, corpus $(get corpus_count), edges $(get edges_found)/$(get total_edges), crashes $crashes, hangs $hangs"
	if [ "$crashes" != 0 ] || [ "$hangs" != 0 ] || [ "$execs" -lt "$EXECS" ]; then
		echo "fuzz: $t: FAILED (findings in $out/default/crashes and hangs)"
		failed=1
	fi
done
exit "$failed"
