#!/usr/bin/env bash
# check.sh: smoke tests of the images built by build.sh, under QEMU TCG (no
# KVM needed on this machine). Prints timings; exits non-zero on any failure.
#
#   check.sh guest [SERIES...]        boot guest-SERIES/vmlinuz (default: 6.1 6.12)
#                                     with guest-initrd.cpio.gz directly under TCG:
#                                     READY line, modules, shell, job control,
#                                     a task asleep in tun, workload; then a boot
#                                     with lpvmm.modules=0 (no module loaded)
#   check.sh host [BINARY]            boot the test host (run-test-host.sh) with a
#                                     payload made from BINARY (default /bin/true):
#                                     /dev/kvm, kvm_amd, the payload, ttyS1 pass-through
#   check.sh nested LPVMM [SERIES]    test host, then `lpvmm run` of a guest on its
#                                     /dev/kvm with the guest console on ttyS1
#
# LPVMM_VERBOSE=1 echoes every console line.
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
IMAGES=${LPVMM_IMAGES:-${XDG_CACHE_HOME:-$HOME/.cache}/lpvmm/images}
export LPVMM_IMAGES=$IMAGES

TMP=$(mktemp -d "${TMPDIR:-/tmp}/lpvmm-check.XXXXXX")
VM_PID=
S1_PID=
cleanup() {
	[ -n "${S1_PID:-}" ] && kill "${S1_PID:-}" 2>/dev/null
	[ -n "${VM_PID:-}" ] && kill "${VM_PID:-}" 2>/dev/null
	rm -rf "$TMP"
}
trap cleanup EXIT

us() { echo "${EPOCHREALTIME/./}"; }
T0=$(us)
ts() { local d=$(($(us) - T0)); printf '%d.%01d' $((d / 1000000)) $((d / 100000 % 10)); }
log() { echo "[$(ts)s] $*"; }
fail() {
	echo "[$(ts)s] FAIL: $*" >&2
	exit 1
}

# --- driving a console ------------------------------------------------------------------------

start_vm() { # COMMAND...: console on the coprocess' stdin/stdout
	coproc VM { exec "$@" 2>&1; }
	VM_IN=${VM[1]} VM_OUT=${VM[0]}
	T0=$(us)
}

# expect_line FD REGEX TIMEOUT: read lines until one matches (BASH_REMATCH set)
expect_line() {
	local fd=$1 re=$2 deadline=$((SECONDS + $3)) line
	while :; do
		local left=$((deadline - SECONDS))
		((left > 0)) || fail "timeout waiting for /$re/"
		IFS= read -r -t "$left" -u "$fd" line || fail "console closed or timed out waiting for /$re/"
		line=${line//$'\r'/}
		[ -n "${LPVMM_VERBOSE:-}" ] && echo "    | $line"
		case "$line" in
		*"Kernel panic"* | *LPVMM-HOST-ERROR*) fail "console: $line" ;;
		esac
		[[ $line =~ $re ]] && return 0
	done
}
expect() { expect_line "$VM_OUT" "$@"; }

# sh_run CMD [TIMEOUT]: run CMD in the console shell; sets OUT and RC. The
# marker's "$?" is expanded by the shell, so an echoed command line (the
# guest's tty echoes) never matches it.
N=0
sh_run() {
	local cmd=$1 line deadline=$((SECONDS + ${2:-60}))
	N=$((N + 1))
	OUT=
	local sep=';'
	[[ $cmd == *'&' ]] && sep=''   # "cmd &; echo" is a syntax error
	printf '%s%s echo "__LPVMM_DONE_%d_$?__"\n' "$cmd" "$sep" "$N" >&"$VM_IN"
	while :; do
		local left=$((deadline - SECONDS))
		((left > 0)) || fail "timeout running: $cmd"
		IFS= read -r -t "$left" -u "$VM_OUT" line || fail "console closed running: $cmd"
		line=${line//$'\r'/}
		[ -n "${LPVMM_VERBOSE:-}" ] && echo "    | $line"
		if [[ $line =~ ^(.*)__LPVMM_DONE_${N}_([0-9]+)__ ]]; then
			OUT+=${BASH_REMATCH[1]}   # output not ending in a newline
			RC=${BASH_REMATCH[2]}
			return 0
		fi
		[[ $line == *"__LPVMM_DONE_${N}_\$?__"* ]] && continue   # echo of the command
		OUT+=$line$'\n'
	done
}
# must CMD [TIMEOUT]: sh_run, fail unless exit status 0
must() {
	sh_run "$@"
	[ "$RC" = 0 ] || fail "'$1' exited $RC: $OUT"
}

wait_vm_exit() { # TIMEOUT
	local i
	for ((i = 0; i < $1 * 10; i++)); do
		kill -0 "${VM_PID:-}" 2>/dev/null || { VM_PID=; return 0; }
		sleep 0.1
	done
	fail "QEMU did not exit"
}

# --- guest: direct boot under TCG -----------------------------------------------------------------

boot_guest() { # SERIES [EXTRA-KERNEL-ARGS]
	start_vm qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 2 -m 1G \
		-nodefaults -no-user-config -display none -no-reboot -serial stdio \
		-kernel "$IMAGES/guest-$1/vmlinuz" -initrd "$IMAGES/guest-initrd.cpio.gz" \
		-append "console=ttyS0 ${2:-}"
}

# the modules guest-init loads for RELEASE: names from the initrd's list, in order
guest_modules() { # RELEASE
	zcat "$IMAGES/guest-initrd.cpio.gz" |
		(cd "$TMP" && cpio -i --quiet --to-stdout "lib/modules/$1/lpvmm-modules") |
		awk '{ n = $1; sub(/.*\//, "", n); sub(/\.ko$/, "", n); gsub(/-/, "_", n); print n }'
}

check_guest() { # SERIES
	local s=$1 rel want line failed=
	rel=$(cat "$IMAGES/guest-$s/release")
	mapfile -t want < <(guest_modules "$rel")
	((${#want[@]})) || fail "no lib/modules/$rel/lpvmm-modules in guest-initrd.cpio.gz"
	log "guest $s ($rel): booting under plain QEMU TCG"
	boot_guest "$s"
	# (a module that fails to load says "guest: insmod NAME failed" before READY)
	while :; do
		expect '^(guest: insmod .* failed|LPVMM-GUEST-READY .*)$' 300
		line=${BASH_REMATCH[0]}
		[[ $line == guest:* ]] || break
		failed+="${line#guest: insmod } "
	done
	log "guest $s: $line"
	[[ $line =~ ^LPVMM-GUEST-READY\ nproc=([0-9]+)\ release=([^ ]+)\ modules=([0-9]+)$ ]] ||
		fail "READY line not as guest-init's contract says"
	[ "${BASH_REMATCH[1]}" = 2 ] || fail "nproc ${BASH_REMATCH[1]}, want 2"
	[ "${BASH_REMATCH[2]}" = "$rel" ] || fail "release ${BASH_REMATCH[2]}, want $rel"
	[ -z "$failed" ] || fail "insmod failed: $failed"
	[ "${BASH_REMATCH[3]}" = "${#want[@]}" ] || fail "modules=${BASH_REMATCH[3]}, want ${#want[@]} (${want[*]})"

	# as a harness would: no echo of the commands, no prompt in the output
	sh_run "stty -echo; PS1=''"
	must "tty"
	[ "$OUT" = $'/dev/ttyS0\n' ] || fail "shell's tty is '$OUT', want /dev/ttyS0 (cttyhack)"
	must "cat /proc/sys/kernel/kptr_restrict /proc/sys/kernel/dmesg_restrict | tr '\n' ' '"
	[ "$OUT" = '0 0 ' ] || fail "kptr_restrict/dmesg_restrict: $OUT"
	must "grep -m1 ' T _text\$' /proc/kallsyms"
	[[ $OUT != 0000000000000000* ]] || fail "/proc/kallsyms shows no addresses: $OUT"
	# job control: a background job, listed and killed by job number
	must "sleep 60 & jobs"
	[[ $OUT == *"[1]"*Running*"sleep 60"* ]] || fail "no job control: $OUT"
	must "kill %1"
	# the shell must survive a background job ending while it waits for input
	# (echo off), and a syntax error
	must "sleep 1 &"
	sleep 3
	printf 'if then\n' >&"$VM_IN"   # a syntax error (no marker: the line never runs)
	must "echo alive"
	[[ $OUT == *alive* ]] || fail "shell did not survive: $OUT"
	log "guest $s: tty, sysctls, kallsyms, job control, shell robustness ok"

	# modules: every one listed is live, in module space, and none tainted the
	# kernel (the decompressed .ko keeps Debian's signature)
	must "cut -d' ' -f1 /proc/modules | sort | tr '\n' ' '"
	[ "$OUT" = "$(printf '%s\n' "${want[@]}" | sort | tr '\n' ' ')" ] ||
		fail "/proc/modules has '$OUT', want '${want[*]}'"
	must "cat /proc/sys/kernel/tainted"
	[ "$OUT" = $'0\n' ] || fail "kernel tainted: $OUT"
	log "guest $s: /proc/modules: ${want[*]} (untainted)"
	# a task asleep in module code: tunblock's read() sleeps in tun
	must "tunblock >/tmp/tb 2>&1 &"
	sleep 2
	must "cat /tmp/tb; cat /proc/\$(sed -n 's/.* pid=//p' /tmp/tb)/stack"
	# (OUT may start with the shell's notice of an earlier job's end)
	[[ $OUT == *"tunblock: lpvmm0 pid="* ]] || fail "tunblock: $OUT"
	[[ $OUT == *"tun_do_read+"*"[tun]"* ]] || fail "tunblock's stack has no tun_do_read [tun] frame: $OUT"
	log "guest $s: $(grep '^tunblock:' <<<"$OUT"), its stack:"
	grep '^\[<' <<<"$OUT" | sed 's/^/        /'
	must "kill \$(sed -n 's/.* pid=//p' /tmp/tb)"

	local t
	t=$(us)
	# (OUT may start with the shell's "[1]+ Terminated sleep 60" notice)
	sh_run "workload -s 5" 300
	if [ "$RC" != 0 ] || [[ $OUT != *"workload: OK rounds="* ]]; then
		fail "workload -s 5: rc=$RC $OUT"
	fi
	OUT=$(grep '^workload:' <<<"$OUT")
	log "guest $s: $OUT (took $((($(us) - t) / 1000)) ms)"
	sh_run "workload -s 0 -f" 120
	if [ "$RC" != 1 ] || [[ $OUT != *"workload: FAIL "* ]]; then
		fail "workload -f did not fail: rc=$RC $OUT"
	fi
	OUT=$(grep '^workload:' <<<"$OUT")
	log "guest $s: injected fault caught: $OUT"

	printf 'poweroff -f\n' >&"$VM_IN"
	wait_vm_exit 60
	log "guest $s: powered off"

	# lpvmm.modules=0: same READY line, nothing loaded
	boot_guest "$s" lpvmm.modules=0
	expect '^LPVMM-GUEST-READY .*$' 300
	log "guest $s: lpvmm.modules=0: ${BASH_REMATCH[0]}"
	[[ ${BASH_REMATCH[0]} == *" modules=0" ]] || fail "lpvmm.modules=0 loaded modules"
	sh_run "stty -echo; PS1=''"
	must "wc -l </proc/modules"
	[ "$OUT" = $'0\n' ] || fail "lpvmm.modules=0: /proc/modules has $OUT lines"
	printf 'poweroff -f\n' >&"$VM_IN"
	wait_vm_exit 60
	log "guest $s: lpvmm.modules=0 ok, powered off"
}

# --- test host ----------------------------------------------------------------------------------------

start_host() { # BINARY
	local bin=$1
	"$HERE/host-payload.sh" "$bin" "$TMP/payload.cpio" >/dev/null
	export LPVMM_TTYS1=$TMP/ttys1.sock
	log "host: booting (payload: $bin)"
	start_vm "$HERE/run-test-host.sh" "$TMP/payload.cpio"
	expect '^LPVMM-HOST-READY$' 300
	log "host: LPVMM-HOST-READY"
	# connect to ttyS1 (QEMU listens once it is up, which it is by now),
	# through two fifos (bash keeps one coprocess at a time)
	mkfifo "$TMP/s1.in" "$TMP/s1.out"
	socat - "UNIX-CONNECT:$LPVMM_TTYS1" <"$TMP/s1.in" >"$TMP/s1.out" &
	S1_PID=$!
	exec {S1_IN}>"$TMP/s1.in" {S1_OUT}<"$TMP/s1.out"
}

check_host() { # BINARY
	start_host "$1"
	must "ls -l /dev/kvm"
	log "host: ${OUT%$'\n'}"
	[[ $OUT == c* ]] || fail "/dev/kvm is not a character device"
	must "cut -d' ' -f1 /proc/modules | tr '\n' ' '"
	log "host: modules loaded: ${OUT%$'\n'}"
	must "dmesg | grep -i -e kvm -e svm"
	log "host: dmesg:"
	printf '%s' "$OUT" | sed 's/^/        /'
	must "cat /sys/module/kvm_amd/parameters/npt /sys/module/kvm_amd/parameters/nested | tr '\n' ' '"
	log "host: kvm_amd npt nested = ${OUT%$'\n'}"
	must "/usr/bin/lpvmm --help >/dev/null 2>&1 || /usr/bin/lpvmm; echo \$?"
	log "host: payload binary runs (dynamic libs ok), exit ${OUT%$'\n'}"
	must "ls /images /images/guest-6.1 | tr '\n' ' '"
	log "host: /images: ${OUT%$'\n'}"
	must "sleep 1 &"
	sleep 3
	printf 'if then\n' >&"$VM_IN"   # a syntax error (no marker: the line never runs)
	must "echo alive"
	[[ $OUT == *alive* ]] || fail "host shell did not survive a background job / syntax error: $OUT"
	log "host: shell survives a finished background job and a syntax error"

	# ttyS1 pass-through, both directions, byte-exact (no CR added)
	must "printf 'ping\n' >/dev/ttyS1"
	local line
	IFS= read -r -t 20 -u "$S1_OUT" line || fail "nothing from ttyS1"
	[ "$line" = ping ] || fail "ttyS1 gave '$(printf %q "$line")', want 'ping'"
	must "head -c 5 </dev/ttyS1 >/tmp/in &"
	sleep 1
	printf 'pong\n' >&"$S1_IN"
	sleep 1
	must "od -c /tmp/in | head -1"
	[[ $OUT == *"p   o   n   g  \\n"* ]] || fail "ttyS1 input: $OUT"
	log "host: ttyS1 pass-through ok (both directions)"

	must "free -m | sed -n 2p"
	log "host: memory: ${OUT%$'\n'}"
	printf 'poweroff -f\n' >&"$VM_IN"
	wait_vm_exit 60
	log "host: powered off"
}

check_nested() { # LPVMM SERIES
	local s=${2:-6.1}
	start_host "$1"
	log "nested: lpvmm run guest-$s on the host's /dev/kvm (console on ttyS1)"
	must "lpvmm run --kernel /images/guest-$s/vmlinuz --initrd /images/guest-initrd.cpio.gz --memory 512M --vcpus 2 </dev/ttyS1 >/dev/ttyS1 2>&1 &"
	local t
	t=$(us)
	expect_line "$S1_OUT" '^LPVMM-GUEST-READY (.*)$' 300
	log "nested: ${BASH_REMATCH[0]} ($((($(us) - t) / 1000)) ms after lpvmm run)"
	printf 'workload -s 5; echo "__RC_$?__"\n' >&"$S1_IN"
	expect_line "$S1_OUT" '^workload: (OK|FAIL).*' 600
	log "nested: ${BASH_REMATCH[0]}"
	printf 'poweroff -f\n' >&"$VM_IN"
	wait_vm_exit 60
}

command -v qemu-system-x86_64 >/dev/null || fail "qemu-system-x86_64 missing (scripts/setup.sh installs it)"
mode=${1:-}
shift || true
case "$mode" in
guest)
	[ $# -gt 0 ] || set -- 6.1 6.12
	for s in "$@"; do check_guest "$s"; done
	;;
host)
	command -v socat >/dev/null || fail "socat missing"
	check_host "${1:-/bin/true}"
	;;
nested)
	[ $# -ge 1 ] || fail "usage: check.sh nested LPVMM_BINARY [SERIES]"
	command -v socat >/dev/null || fail "socat missing"
	check_nested "$@"
	;;
*)
	echo "usage: check.sh guest [SERIES...] | host [BINARY] | nested LPVMM [SERIES]" >&2
	exit 2
	;;
esac
echo "check.sh: all ok"
