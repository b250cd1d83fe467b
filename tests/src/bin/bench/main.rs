//! Benchmarks for `lpvmm run` (see docs/benchmarks.md for figures and how to read them).
//!
//!   cargo run -p lpvmm-tests --bin bench -- boot [RUNS]    lpvmm vs QEMU microvm, boot to /init
//!   cargo run -p lpvmm-tests --bin bench -- pause [CYCLES] [VCPUS]  pause/resume latency with
//!                                                      1, 2, 4 and 8 vCPUs (or VCPUS, e.g. 1,2)
//!   cargo run -p lpvmm-tests --bin bench -- introspect [RUNS] attach time; pause of `tasks`
//!                                                      and of all stacks, 100 / 2000 tasks
//!   cargo run -p lpvmm-tests --bin bench -- attach [RUNS]  attach time and its pause against
//!                                                      a bare pause (introspect's first table)
//!   cargo run -p lpvmm-tests --bin bench -- memory  the VMM's resident memory outside guest
//!                                                      RAM, before and after attach
//!   cargo run -p lpvmm-tests --bin bench -- patch [CYCLES]  enable/disable pauses; call cost
//!                                                      and switch time vs the guest's livepatch
//!   cargo run -p lpvmm-tests --bin bench -- load [RUNS]  a patch load's pause (first patch,
//!                                                      later patch) and the enable's first
//!                                                      tick against a bare pause (load.rs)
//!   cargo run -p lpvmm-tests --bin bench -- deaths [RUNS] [spawn [SERIES]]  guests the platform
//!                                                      kills: lpvmm vs QEMU microvm, same guests,
//!                                                      same load (LPVMM_BENCH_HOST_TRACE=1: the
//!                                                      test host's KVM trace of each death)
//!   cargo run -p lpvmm-tests --bin bench -- transition [RUNS]  per-task transitions: completion
//!                                                      vs the guest's livepatch (with and without
//!                                                      a 5 s blocker), pause per tick with 100 and
//!                                                      2000 tasks vs a bare pause, call cost
//!                                                      through the trampoline and after
//!   cargo run -p lpvmm-tests --bin bench -- completion [RUNS] [TASKS]  per-task transition
//!                                                      completion vs the guest's livepatch
//!                                                      with 2000 (or TASKS, e.g. 100,2000)
//!                                                      extra tasks
//!   cargo run -p lpvmm-tests --bin bench -- calls [ROUNDS]  ns per getpid(2) call in the
//!                                                      guest: unpatched, through lpvmm's
//!                                                      dispatch, after (direct jump), and
//!                                                      the guest's livepatch, interleaved
//!   cargo run -p lpvmm-tests --bin bench -- ticks [RUNS] [TASKS]  the pause of an immediate
//!                                                      enable and of a per-task enable's first
//!                                                      tick with 100, 2000 (or TASKS, e.g.
//!                                                      100,2000,5000) extra tasks, against a
//!                                                      bare pause; how many checks were early
//!   cargo run -p lpvmm-tests --bin bench -- endurance [CYCLES] [SERIES] [alone]  enable/disable
//!                                                      cycles (default 10,000), per-task and
//!                                                      immediate in turn, under 4 readers and
//!                                                      128 getpid hammers that check every
//!                                                      result, both series unless one is
//!                                                      named; interleaved with the same load
//!                                                      on the guest's livepatch under QEMU
//!                                                      for as long (`alone`: without it)
//!   cargo run -p lpvmm-tests --bin bench -- pause-deaths [CYCLES]  guests that die under
//!                                                      pause/resume: lpvmm's pause against
//!                                                      QEMU's QMP stop/cont, CYCLES each
//!                                                      (default 10,000), same load, interleaved
//!   cargo run -p lpvmm-tests --bin bench -- guest-diff [SERIES]  what lpvmm's and QEMU's
//!                                                      guests see: CPU flags, KVM features
//!
//! Both run on the same host with real KVM (nested where needed), side by side, and
//! report medians and ratios: absolute times on nested TCG say little.

mod endurance;
mod load;

use std::time::{Duration, Instant};

use lpvmm_tests::stats::{median, median_range, min_max, percentile};
use lpvmm_tests::{json, BootFailure, KvmTrace, TestHost, BOOT_TIMEOUT};

const CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

fn main() {
    let mut args = std::env::args().skip(1);
    let what = args.next().unwrap_or_default();
    let n: Option<u32> = args.next().and_then(|s| s.parse().ok());
    let result = match what.as_str() {
        "boot" => boot(n.unwrap_or(5)),
        "pause" => vcpu_counts(args.next()).and_then(|v| pause(n.unwrap_or(1000), &v)),
        "introspect" => introspect(n.unwrap_or(5)),
        "attach" => attach_only(n.unwrap_or(5)),
        "memory" => vmm_memory(),
        "start" => vmm_start(n.unwrap_or(5)),
        "patch" => patch(n.unwrap_or(30)),
        "load" => load::load(n.unwrap_or(3)),
        "deaths" => match args.next().as_deref() {
            None => deaths(n.unwrap_or(10), DEATHS_LOAD, &lpvmm_tests::SERIES),
            Some("spawn") => match args.next() {
                None => deaths(n.unwrap_or(10), SPAWN_LOAD, &lpvmm_tests::SERIES),
                Some(series) => deaths(n.unwrap_or(10), SPAWN_LOAD, &[series.as_str()]),
            },
            Some("hammer") => match args.next() {
                None => deaths(n.unwrap_or(10), HAMMER_LOAD, &lpvmm_tests::SERIES),
                Some(series) => deaths(n.unwrap_or(10), HAMMER_LOAD, &[series.as_str()]),
            },
            Some(other) => Err(format!(
                "bench deaths: no load named '{other}' (spawn, hammer)"
            )),
        },
        "transition" => transition(n.unwrap_or(5)),
        "fork-under-dispatch" => fork_under_dispatch(),
        "ticks" => task_counts(args.next())
            .and_then(|c| ticks(n.unwrap_or(5), &c, args.next().as_deref())),
        "completion" => counts(args.next(), "2000", 0, 10_000, "task count")
            .and_then(|c| completion(n.unwrap_or(5), &c)),
        "calls" => calls(n.unwrap_or(5)),
        "host-info" => host_info(),
        "guest-diff" => guest_diff(),
        "endurance" => {
            // `bench endurance [CYCLES] [SERIES] [alone]`: `alone` leaves the peer out.
            let rest: Vec<String> = args.collect();
            let alone = rest.iter().any(|a| a == "alone");
            series_or_both(rest.into_iter().find(|a| a != "alone"))
                .and_then(|series| endurance::endurance(n.unwrap_or(10_000), &series, !alone))
        }
        "pause-deaths" => pause_deaths(n.unwrap_or(10_000)),
        _ => Err(
            "usage: bench boot [RUNS] | bench pause [CYCLES] [VCPUS,...] | bench introspect [RUNS] | bench attach [RUNS] | bench memory | bench start [RUNS] | bench patch [CYCLES] | bench load [RUNS] | bench deaths [RUNS] [spawn|hammer [SERIES]] | bench transition [RUNS] | bench endurance [CYCLES] [SERIES] [alone] | bench pause-deaths [CYCLES] | bench ticks [RUNS] [TASKS,...] [MEMORY] | bench completion [RUNS] [TASKS,...] | bench calls [ROUNDS] | bench host-info | bench guest-diff [SERIES]"
                .into(),
        ),
    };
    if let Err(e) = result {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}

/// Launch → the guest's /init prints its ready line, then poweroff.
fn time_boot(host: &mut TestHost, name: &str, cmd: &str) -> Result<f64, String> {
    let t0 = Instant::now();
    let mut g = host.start_console_program(name, cmd)?;
    g.console().wait_line("LPVMM-GUEST-READY", BOOT_TIMEOUT)?;
    let secs = t0.elapsed().as_secs_f64();
    g.poweroff()?;
    Ok(secs)
}

/// Command lines for the same guest on lpvmm (as NAME) and on QEMU's microvm machine,
/// its closest match to a minimal VMM: same kernel, initrd, memory, vCPUs and command
/// line.
fn lpvmm_and_qemu(host: &TestHost, name: &str, series: &str, vcpus: u8) -> (String, String) {
    let kernel = host.guest_kernel(series);
    let initrd = host.image("guest-initrd.cpio.gz");
    let lpvmm = format!(
        "{} run --name {name} --kernel {kernel} --initrd {initrd} --memory 512M --vcpus {vcpus}",
        host.lpvmm()
    );
    (lpvmm, qemu_microvm(host, series, vcpus, &initrd))
}

/// QEMU's microvm command line for the guest of `series` with `initrd`.
fn qemu_microvm(host: &TestHost, series: &str, vcpus: u8, initrd: &str) -> String {
    let kernel = host.guest_kernel(series);
    format!(
        "qemu-system-x86_64-microvm -M microvm,rtc=on -accel kvm -cpu host -m 512M -smp {vcpus} \
         -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
         -kernel {kernel} -initrd {initrd} -append '{CMDLINE}'"
    )
}

fn boot(runs: u32) -> Result<(), String> {
    let mut host = TestHost::start_with(true)?;
    println!("| kernel | lpvmm median (s) | QEMU microvm median (s) | lpvmm / QEMU |");
    println!("|---|---|---|---|");
    for series in lpvmm_tests::SERIES {
        let (lpvmm, qemu) = lpvmm_and_qemu(&host, "bench", series, 1);
        let (mut l, mut q) = (vec![], vec![]);
        for _ in 0..runs {
            // Interleaved, so that drift in the host affects both alike.
            l.push(time_boot(&mut host, "bench", &lpvmm)?);
            q.push(time_boot(&mut host, "bench-qemu", &qemu)?);
        }
        eprintln!("{series}: lpvmm {l:?} qemu {q:?}");
        let (lm, qm) = (median(&l), median(&q));
        println!("| {series} | {lm:.2} | {qm:.2} | {:.2} |", lm / qm);
    }
    Ok(())
}

/// How one boot-load-poweroff round ended.
enum Round {
    Survived,
    DiedBooting(String),
    DiedUnderLoad(String),
    /// The test host itself stopped answering: it is replaced, and the round counted
    /// apart (the platform's, whichever VMM it ran).
    HostLost(String),
}

/// The same work for both VMMs: two busy loops on the two vCPUs while the shell reads
/// every task's /proc files three times (what the guests were doing when most deaths
/// were seen), then a poweroff. lpvmm only runs the guest: no pause, no read.
const DEATHS_LOAD: &str = "(while :; do :; done) & a=$!; (while :; do :; done) & b=$!; \
    for i in 1 2 3; do cat /proc/[0-9]*/stat /proc/[0-9]*/task/*/comm >/dev/null 2>&1; done; \
    kill $a $b; wait";

/// The load of `bench deaths RUNS hammer`: the endurance run's load without its patches
/// (4 `readcheck` readers of /proc/cmdline and 128 `getpid-hammer` processes, for two
/// minutes), under which lpvmm's guests died within a few hundred cycles on 2026-12-06:
/// whether QEMU's guest dies of the load alone.
const HAMMER_LOAD: &str = "rm -f /tmp/stop; c=$(cat /proc/cmdline);     readcheck -p 4 -f /proc/cmdline -s /tmp/stop \"$c\" \"$c\" >/tmp/rc.log 2>&1 &     getpid-hammer -p 128 -n 10 -s /tmp/stop >/tmp/hammer.log 2>&1 &     sleep 120; touch /tmp/stop; wait; cat /tmp/rc.log /tmp/hammer.log";

/// The load of `bench deaths RUNS spawn`: what `bench ticks` does before its 2,000-task
/// rows (2,000 processes forked at once, each asleep in pause(), then killed), where the
/// guests of the nested host died most often on 2026-12-04.
const SPAWN_LOAD: &str = "spawn 2000 >/tmp/spawn.out & \
    while ! grep -q spawned /tmp/spawn.out 2>/dev/null; do sleep 1; done; \
    kill $(pidof spawn); wait; true";

/// Whether `bench deaths` records the test host's KVM trace (`LPVMM_BENCH_HOST_TRACE=1`;
/// tests/src/hostkvm.rs says what it holds).
fn host_traced() -> bool {
    std::env::var_os("LPVMM_BENCH_HOST_TRACE").is_some()
}

fn boot_load_poweroff(
    host: &mut TestHost,
    name: &str,
    cmd: &str,
    load: &str,
) -> Result<Round, String> {
    let traced = host_traced();
    if traced {
        host.restart_kvm_trace()?;
        eprintln!("{name}: test host before: {}", host.memory_counters());
    }
    let mut g = match host.start_and_wait_ready(name, cmd) {
        Ok((g, _)) => g,
        Err(failure @ BootFailure::Exited { .. }) => {
            return Ok(Round::DiedBooting(failure.report()))
        }
        Err(BootFailure::Other(e)) => return Ok(Round::HostLost(e)),
    };
    if traced {
        // Where the kernel's text lies in this boot (KASLR), to place a traced rip.
        let text = g
            .text("grep -m1 ' _text$' /proc/kallsyms")
            .unwrap_or_default();
        eprintln!("{name}: {text}");
    }
    let loaded = g.run_status(load, Duration::from_secs(180));
    if traced {
        eprintln!(
            "{name}: test host after the load: {}",
            g.host.memory_counters()
        );
    }
    let off = loaded.and_then(|_| g.poweroff().map(|_| ()));
    match off {
        Ok(()) => Ok(Round::Survived),
        // Did the VMM end (the guest died), the guest stop answering, or the test host?
        Err(e) => match g.wait_exit(Duration::from_secs(10)) {
            Ok(exit) => Ok(Round::DiedUnderLoad(format!(
                "{e}; exit {}: {}",
                exit.code, exit.stderr
            ))),
            Err(_) => match g.host.exec("echo host-alive") {
                Ok(out) if out.contains("host-alive") => {
                    Ok(Round::DiedUnderLoad(format!("{e} (the VMM runs on)")))
                }
                _ => Ok(Round::HostLost(e)),
            },
        },
    }
}

/// Guests the nested platform kills, lpvmm against QEMU side by side: RUNS rounds per
/// kernel series, each booting a 2-vCPU guest on lpvmm and then on QEMU's microvm
/// (same kernel, initrd, memory, vCPUs, command line), running [`DEATHS_LOAD`] and
/// powering off. If lpvmm's guests die much more often than QEMU's, the deaths are
/// lpvmm's; if alike, the platform's.
fn deaths(runs: u32, load: &str, series_list: &[&str]) -> Result<(), String> {
    let mut host = TestHost::start_with(true)?;
    let traced = host_traced();
    if traced {
        host.trace_kvm(KvmTrace::Everything)?;
        eprintln!(
            "test host: {}",
            host.exec(
                "uname -r; cat /sys/kernel/mm/transparent_hugepage/enabled \
                 /sys/kernel/mm/transparent_hugepage/defrag; grep MemTotal /proc/meminfo"
            )?
        );
    }
    println!("| kernel | VMM | rounds | died booting | died under load | test host lost |");
    println!("|---|---|---|---|---|---|");
    for &series in series_list {
        let mut tally = [[0u32; 3]; 2];
        for round in 1..=runs {
            // Interleaved, so that drift in the host affects both alike.
            for (i, vmm) in ["lpvmm", "QEMU microvm"].into_iter().enumerate() {
                // Built per boot: a replaced test host has its own paths.
                let (lpvmm, qemu) = lpvmm_and_qemu(&host, "deaths", series, 2);
                let (name, cmd) = match i {
                    0 => ("deaths", lpvmm),
                    _ => ("deaths-qemu", qemu),
                };
                let (k, what, why) = match boot_load_poweroff(&mut host, name, &cmd, load)? {
                    Round::Survived => continue,
                    Round::DiedBooting(why) => (0, "guest died booting", why),
                    Round::DiedUnderLoad(why) => (1, "guest died under load", why),
                    Round::HostLost(why) => (2, "test host was lost", why),
                };
                tally[i][k] += 1;
                eprintln!("{series} round {round}: {vmm}'s {what}: {why}");
                if traced && k != 2 {
                    eprintln!("test host trace:\n{}", host.kvm_trace_of_death());
                }
                if k == 2 {
                    host = TestHost::start_with(true)?;
                    if traced {
                        host.trace_kvm(KvmTrace::Everything)?;
                    }
                }
            }
        }
        for (t, vmm) in tally.iter().zip(["lpvmm", "QEMU microvm"]) {
            println!(
                "| {series} | {vmm} | {runs} | {} | {} | {} |",
                t[0], t[1], t[2]
            );
        }
    }
    Ok(())
}

/// What each VMM's guest sees of its platform, side by side: the CPU flags, and the
/// lines of its boot log about KVM's paravirtual features, clocks, APICs and ACPI (for
/// the guests lpvmm loses while they fork and QEMU does not: benchmarks.md, "Guests
/// lost while forking"). `bench guest-diff [SERIES]`, 6.1 by default.
fn guest_diff() -> Result<(), String> {
    let mut host = TestHost::start_with(true)?;
    let series = std::env::args()
        .nth(2)
        .unwrap_or_else(|| lpvmm_tests::SERIES[0].to_string());
    let (lpvmm, qemu) = lpvmm_and_qemu(&host, "gdiff", &series, 2);
    let mut flags = Vec::new();
    for (vmm, name, cmd) in [
        ("lpvmm", "gdiff", lpvmm),
        ("QEMU microvm", "gdiff-qemu", qemu),
    ] {
        let (mut g, _) = host
            .start_and_wait_ready(name, &cmd)
            .map_err(|f| format!("{vmm}: {}", f.report()))?;
        let f = g.text("grep -m1 '^flags' /proc/cpuinfo")?;
        // Without the timestamps, so that the lines are not taken for console noise.
        let log = g.text(
            "dmesg | grep -iE 'kvm|clocksource|tsc|apic|tlb|pv|hpet|acpi|smpboot|fpu|spectre|mds|retbleed|srso|8259|extint|spurious|overflow|trap|segfault|#nm' | cut -c16-; \
             cat /proc/interrupts",
        )?;
        println!("## {vmm} ({series})\n\n```\n{log}\n```\n");
        flags.push(
            f.split_whitespace()
                .skip(2)
                .map(String::from)
                .collect::<std::collections::BTreeSet<String>>(),
        );
        g.poweroff()?;
    }
    let only = |a: usize, b: usize| {
        flags[a]
            .difference(&flags[b])
            .cloned()
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("CPU flags only lpvmm's guest has: {}", only(0, 1));
    println!("CPU flags only QEMU's guest has: {}", only(1, 0));
    Ok(())
}

/// What the test host is, for the "machine" of a figure: its kernel, CPUs, clock source.
fn host_info() -> Result<(), String> {
    let mut host = TestHost::start()?;
    let out = host.exec(
        "uname -r; nproc; grep -m1 'model name' /proc/cpuinfo; \
         cat /sys/devices/system/clocksource/clocksource0/current_clocksource \
             /sys/devices/system/clocksource/clocksource0/available_clocksource",
    )?;
    println!("{out}");
    Ok(())
}

/// The vCPU counts of a comma-separated list (`1,2,4,8` when absent).
fn vcpu_counts(list: Option<String>) -> Result<Vec<u8>, String> {
    counts(list, "1,2,4,8", 1, 32, "vCPU count")
}

/// The numbers of a comma-separated list (`default` when absent), each in [lo, hi].
fn counts<T>(
    list: Option<String>,
    default: &str,
    lo: T,
    hi: T,
    what: &str,
) -> Result<Vec<T>, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    let list = list.unwrap_or_else(|| default.into());
    list.split(',')
        .map(|s| match s.trim().parse::<T>() {
            Ok(n) if n >= lo && n <= hi => Ok(n),
            _ => Err(format!(
                "not a {what} from {lo} to {hi}: '{s}' (in '{list}')"
            )),
        })
        .collect()
}

/// Pause/resume latency for each vCPU count, the guest running two busy loops, with
/// lpvmm's seccomp filters on (the default) and off, side by side. More vCPUs than the
/// test host's 2 CPUs are overcommitted: parking then waits for vCPU threads the host
/// has not scheduled, which is part of what the figure shows.
fn pause(cycles: u32, vcpu_counts: &[u8]) -> Result<(), String> {
    let mut host = TestHost::start()?;
    println!("| vCPUs | seccomp | park median (us) | park p99 (us) | resume median (us) | resume p99 (us) | pause round trip median (us) |");
    println!("|---|---|---|---|---|---|---|");
    for &vcpus in vcpu_counts {
        for (seccomp, extra) in [("on", ""), ("off", "--no-seccomp")] {
            // A guest that dies is a row of its own: the other rows still count.
            let v = match pause_one(&mut host, vcpus, extra, cycles) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("{vcpus} vCPUs, seccomp {seccomp}: {e}");
                    let why = e.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
                    println!("| {vcpus} | {seccomp} | guest died: {why} |");
                    if !host.answers() {
                        eprintln!("the test host stopped answering: starting another");
                        host = TestHost::start()?;
                    }
                    continue;
                }
            };
            let f = |k: &str, q: &str| v[k][q].as_f64().unwrap_or(f64::NAN);
            println!(
                "| {vcpus} | {seccomp} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                f("park", "median_us"),
                f("park", "p99_us"),
                f("resume", "median_us"),
                f("resume", "p99_us"),
                f("pause_round_trip", "median_us"),
            );
        }
    }
    Ok(())
}

/// One guest of `vcpus` (`extra`: more `lpvmm run` arguments), two busy loops in it,
/// `lpvmm bench pause` over `cycles`: its JSON.
fn pause_one(
    host: &mut TestHost,
    vcpus: u8,
    extra: &str,
    cycles: u32,
) -> Result<serde_json::Value, String> {
    let (mut g, _) = host.boot_guest("bench", "6.1", vcpus, extra)?;
    // A busy guest: parking must interrupt running vCPUs, not just idle ones.
    g.run("(while :; do :; done) & (while :; do :; done) &")?;
    let (rc, out) = g.lpvmm(&format!("bench pause {{vm}} --cycles {cycles} --json"))?;
    if rc != 0 {
        let tmp = g.host.tmp();
        let log = g
            .host
            .exec(&format!("sleep 2; cat {tmp}/bench.err"))
            .unwrap_or_default();
        let console = g.console().drain();
        let tail = &console[console.len().saturating_sub(3000)..];
        return Err(format!(
            "{out}\nlpvmm stderr:\n{log}\nguest console:\n{tail}"
        ));
    }
    let v = json(&out)?;
    g.poweroff()?;
    Ok(v)
}

/// Attach time, and the guest-visible pause of `lpvmm tasks` and of unwinding every
/// task, with 100 and 2000 extra guest tasks. Side by side: the guest reading every
/// /proc/PID/stack itself (its own cost for the same information).
fn introspect(runs: u32) -> Result<(), String> {
    introspect_with(runs, true)
}

/// Only `introspect`'s attach table (attach time, its pause and a bare pause).
fn attach_only(runs: u32) -> Result<(), String> {
    introspect_with(runs, false)
}

fn introspect_with(runs: u32, task_pauses: bool) -> Result<(), String> {
    let mut host = TestHost::start()?;
    println!("| kernel | attach median (ms) | VMCOREINFO found (ms) | symbols ready (ms) | BTF ready (ms) | attach pause median (ms) | bare pause median (ms) | attach pause / bare pause | symbols | BTF types | ORC entries |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for series in lpvmm_tests::SERIES {
        let (mut g, _) = host.boot_guest("bench", series, 2, "")?;
        let (mut attach, mut attach_pause, mut bare_pause) = (Vec::new(), Vec::new(), Vec::new());
        let mut last = serde_json::Value::Null;
        for _ in 0..runs {
            let (rc, out) = g.lpvmm("kernel {vm} --reattach --json")?;
            if rc != 0 {
                return Err(out);
            }
            last = json(&out)?;
            attach.push(last["stats"]["attach_us"].as_f64().unwrap_or(f64::NAN) / 1000.0);
            attach_pause.push(last["pause"]["paused_us"].as_f64().unwrap_or(f64::NAN) / 1000.0);
            // A bare pause, interleaved: park every vCPU, copy the registers, resume.
            let (rc, out) = g.lpvmm("regs {vm} --json")?;
            if rc != 0 {
                return Err(out);
            }
            bare_pause.push(json(&out)?["paused_us"].as_f64().unwrap_or(f64::NAN) / 1000.0);
        }
        let (_, note) = g.lpvmm("vmcoreinfo {vm} --json")?;
        let note_at = json(&note)?["phys_addr"]
            .as_u64()
            .ok_or(format!("vmcoreinfo has no phys_addr: {note}"))?;
        eprintln!("{series}: VMCOREINFO text at guest-physical {note_at:#x}");
        let st = &last["stats"];
        let ms = |k: &str| st[k].as_f64().unwrap_or(f64::NAN) / 1000.0;
        eprintln!("{series}: attach runs (ms) {attach:?}, their pauses {attach_pause:?}, bare pauses {bare_pause:?}");
        let (attach_pause, bare_pause) = (median(&attach_pause), median(&bare_pause));
        println!(
            "| {series} | {:.0} | {:.0} | {:.0} | {:.0} | {attach_pause:.1} | {bare_pause:.1} | {:.2} | {} | {} | {} |",
            median(&attach),
            ms("vmcoreinfo_done_us"),
            ms("kallsyms_done_us"),
            ms("btf_done_us"),
            attach_pause / bare_pause,
            st["symbols"],
            st["btf_types"],
            st["orc_entries"]
        );
        let extras: &[u32] = if task_pauses { &[100, 2000] } else { &[] };
        for &extra in extras {
            spawn_tasks(&mut g, extra)?;
            let (mut tasks_us, mut stacks_us) = (Vec::new(), Vec::new());
            let mut count = 0.0;
            for _ in 0..runs {
                let (rc, out) = g.lpvmm("tasks {vm} --json")?;
                if rc != 0 {
                    return Err(out);
                }
                let v = json(&out)?;
                count = v["list"]["tasks"].as_array().map(|a| a.len()).unwrap_or(0) as f64;
                tasks_us.push(v["pause"]["paused_us"].as_f64().unwrap_or(f64::NAN));
                let (rc, out) = g.lpvmm("stack {vm} --json")?;
                if rc != 0 {
                    return Err(out);
                }
                stacks_us.push(
                    json(&out)?["pause"]["paused_us"]
                        .as_f64()
                        .unwrap_or(f64::NAN),
                );
            }
            // The guest's own cost of the same stacks: read every /proc/PID/stack.
            // bash's $EPOCHREALTIME: seconds.microseconds (busybox date has no %N).
            let own = g.run(
                "a=$EPOCHREALTIME; for f in /proc/[0-9]*/task/[0-9]*/stack; do cat $f >/dev/null 2>&1; done; \
                 b=$EPOCHREALTIME; echo \"$a $b\"",
            )?;
            let t: Vec<f64> = own
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            let own_us = match t[..] {
                [a, b] => (b - a) * 1e6,
                _ => f64::NAN,
            };
            eprintln!("{series} +{extra}: tasks pauses {tasks_us:?} stacks pauses {stacks_us:?} guest /proc walk {own_us} us");
            rows.push(format!(
                "| {series} | {count:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.4} |",
                median(&tasks_us) / 1000.0,
                percentile(&tasks_us, 0.99) / 1000.0,
                median(&stacks_us) / 1000.0,
                percentile(&stacks_us, 0.99) / 1000.0,
                median(&stacks_us) / count,
                own_us / 1000.0,
                median(&stacks_us) / own_us,
            ));
            g.run("pkill spawn; sleep 1; true")?;
        }
        g.poweroff()?;
    }
    if !task_pauses {
        return Ok(());
    }
    println!();
    println!("| kernel | tasks | `tasks` pause median (ms) | max (ms) | all-stacks pause median (ms) | max (ms) | per task (µs) | guest's own /proc/*/stack walk (ms) | lpvmm pause / guest walk |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

/// The VMM's start-up: from the start of the lpvmm process to its first `KVM_RUN`, as
/// lpvmm itself measures it (`lpvmm status`'s `start_to_first_run_us`), RUNS boots per
/// series and vCPU count.
fn vmm_start(runs: u32) -> Result<(), String> {
    let mut host = TestHost::start()?;
    println!("| kernel | vCPUs | lpvmm start to first KVM_RUN, median (ms) | min–max (ms) |");
    println!("|---|---|---|---|");
    for series in lpvmm_tests::SERIES {
        for vcpus in [1u8, 2] {
            let mut ms = Vec::new();
            for _ in 0..runs {
                let (mut g, _) = host.boot_guest("bench", series, vcpus, "")?;
                let (_, status) = g.lpvmm("status {vm} --json")?;
                let us = json(&status)?["start_to_first_run_us"]
                    .as_u64()
                    .ok_or(format!("status without start_to_first_run_us: {status}"))?;
                ms.push(us as f64 / 1000.0);
                g.poweroff()?;
            }
            eprintln!("{series}, {vcpus} vCPU: {ms:?} ms");
            let (lo, hi) = min_max(&ms);
            println!(
                "| {series} | {vcpus} | {:.1} | {lo:.1}–{hi:.1} |",
                median(&ms)
            );
        }
    }
    Ok(())
}

/// The VMM's own memory, as a user would measure it: the resident set of the lpvmm
/// process from /proc/PID/smaps, leaving out the mappings of guest RAM and of the patch
/// area (guest memory, whatever the VMM), before the first attach and after it.
fn vmm_memory() -> Result<(), String> {
    let mut host = TestHost::start()?;
    println!("| kernel | guest RAM (MiB) | VMM RSS outside guest memory, before attach (MiB) | after attach (MiB) | attach adds (MiB) |");
    println!("|---|---|---|---|---|");
    for series in lpvmm_tests::SERIES {
        let (mut g, _) = host.boot_guest("bench", series, 2, "")?;
        let (_, status) = g.lpvmm("status {vm} --json")?;
        let st = json(&status)?;
        let field = |k: &str| st[k].as_u64().ok_or(format!("status has no {k}: {status}"));
        let (pid, ram, area) = (
            field("pid")?,
            field("memory_bytes")?,
            field("patch_area_size")?,
        );
        let outside = |g: &mut lpvmm_tests::Guest| -> Result<f64, String> {
            // Size precedes Rss in each mapping's block; the kernel may merge the RAM
            // and patch-area mappings into one.
            let out = g.host.exec(&format!(
                "awk -v ram={} -v area={} '/^Size:/ {{ size = $2 }} /^Rss:/ {{ if (size != ram && size != area && size != ram + area) rss += $2; n++ }} END {{ if (n) print rss; else print \"none\" }}' /proc/{pid}/smaps",
                ram / 1024,
                area / 1024
            ))?;
            out.trim()
                .parse::<f64>()
                .map(|kib| kib / 1024.0)
                .map_err(|_| format!("no Rss lines in /proc/{pid}/smaps: {out}"))
        };
        let before = outside(&mut g)?;
        eprintln!(
            "{series}, before attach:\n{}",
            largest_mappings(&mut g, pid)?
        );
        let (rc, out) = g.lpvmm("kernel {vm}")?;
        if rc != 0 {
            return Err(out);
        }
        let after = outside(&mut g)?;
        eprintln!(
            "{series}, after attach:\n{}",
            largest_mappings(&mut g, pid)?
        );
        println!(
            "| {series} | {} | {before:.1} | {after:.1} | {:.1} |",
            ram >> 20,
            after - before
        );
        g.poweroff()?;
    }
    Ok(())
}

/// The ten mappings of process `pid` with the most resident memory: KiB, size and name
/// (what the RSS outside guest memory is made of).
fn largest_mappings(g: &mut lpvmm_tests::Guest, pid: u64) -> Result<String, String> {
    g.host.exec(&format!(
        "awk '/^[0-9a-f]+-[0-9a-f]+ / {{ name = ($6 == \"\") ? \"[anon]\" : $6 }} \
         /^Size:/ {{ size = $2 }} /^Rss:/ {{ if ($2 > 0) print $2, size, name }}' \
         /proc/{pid}/smaps | sort -rn | head -10"
    ))
}

/// Build a sample patch here with `lpvmm kp build`.
fn kp_build(sample: &str) -> Result<std::path::PathBuf, String> {
    let dir = lpvmm_tests::repo_root().join("target/bench");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let out = dir.join(format!("{sample}.kp"));
    let src = lpvmm_tests::repo_root().join(format!("patcher/examples/{sample}.c"));
    let st = std::process::Command::new(lpvmm_tests::lpvmm_binary())
        .args(["kp", "build"])
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err(format!("lpvmm kp build {sample} failed"));
    }
    Ok(out)
}

/// The guest's livepatch module for a series, as an initrd addition.
fn livepatch_cpio(series: &str) -> Result<std::path::PathBuf, String> {
    let out = lpvmm_tests::repo_root().join(format!("target/bench/livepatch-{series}.cpio.gz"));
    let st = std::process::Command::new("bash")
        .arg(lpvmm_tests::repo_root().join("guest-images/livepatch-module.sh"))
        .arg(series)
        .arg(&out)
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err(format!("livepatch-module.sh {series} failed"));
    }
    Ok(out)
}

/// Microseconds per read of /proc/cmdline in a bash loop (builtin read: no fork), the
/// median of `reps` runs of `n` reads, measured in the guest.
fn per_read_us(g: &mut lpvmm_tests::Guest, n: u32, reps: u32) -> Result<f64, String> {
    let mut v = Vec::new();
    for _ in 0..reps {
        let out = g.run(&format!(
            "a=$EPOCHREALTIME; for ((i=0;i<{n};i++)); do read -r x < /proc/cmdline; done; b=$EPOCHREALTIME; echo \"$a $b\""
        ))?;
        let t: Vec<f64> = out
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if let [a, b] = t[..] {
            v.push((b - a) * 1e6 / f64::from(n));
        }
    }
    Ok(median(&v))
}

fn transition_of(out: &str) -> Result<serde_json::Value, String> {
    let v = json(out)?;
    if v["outcome"] != "done" {
        return Err(format!("transition did not complete: {out}"));
    }
    Ok(v)
}

/// Guest-visible pause of enable and disable; what a call of the patched function costs
/// (a patch that changes nothing, against the unpatched kernel); and the same fix as
/// the guest's own livepatch module, side by side: call cost and time to switch.
fn patch(cycles: u32) -> Result<(), String> {
    let fix = kp_build("cmdline")?;
    let same = kp_build("cmdline-same")?;
    let mut files = vec![
        (fix, "/root/cmdline.kp".to_string()),
        (same, "/root/same.kp".to_string()),
    ];
    for series in lpvmm_tests::SERIES {
        files.push((
            livepatch_cpio(series)?,
            format!("/root/lp-{series}.cpio.gz"),
        ));
    }
    let mut host = TestHost::start_with_files(false, &files)?;
    let (n, reps) = (3000, 5);
    let mut pause_rows = Vec::new();
    let mut call_rows = Vec::new();
    for series in lpvmm_tests::SERIES {
        let initrd = initrd_with_livepatch(&mut host, series)?;
        let (mut g, _) = host.boot_guest_initrd("bench", series, 2, &initrd, "")?;
        let fix = g.host.file("/root/cmdline.kp");
        let same = g.host.file("/root/same.kp");

        let unpatched = per_read_us(&mut g, n, reps)?;
        // A patch that changes nothing: the redirection's own cost.
        let (rc, out) = g.lpvmm(&format!("patch {{vm}} {same} --json"))?;
        if rc != 0 {
            return Err(out);
        }
        let same_us = per_read_us(&mut g, n, reps)?;
        g.lpvmm("patch disable {vm} cmdline-same")?;
        g.lpvmm("patch unload {vm} cmdline-same")?;

        // The fix: enable (timed from the client), read cost, pauses over many cycles.
        let t0 = Instant::now();
        let (rc, out) = g.lpvmm(&format!("patch {{vm}} {fix} --json"))?;
        let lpvmm_switch_ms = t0.elapsed().as_secs_f64() * 1e3;
        if rc != 0 {
            return Err(out);
        }
        transition_of(&out)?;
        let fix_us = per_read_us(&mut g, n, reps)?;
        let (mut en, mut dis) = (Vec::new(), Vec::new());
        for _ in 0..cycles {
            for (op, into) in [("disable", &mut dis), ("enable", &mut en)] {
                let (rc, out) = g.lpvmm(&format!("patch {op} {{vm}} cmdline --json"))?;
                if rc != 0 {
                    return Err(out);
                }
                let t = transition_of(&out)?;
                into.push(
                    t["pauses_us"]
                        .as_array()
                        .and_then(|a| a.last())
                        .and_then(|x| x.as_f64())
                        .unwrap_or(f64::NAN),
                );
            }
        }
        g.lpvmm("patch disable {vm} cmdline")?;

        // The guest's own livepatch of the same fix.
        let sys = "/sys/kernel/livepatch/lpvmm_lp_cmdline";
        let out = g.run(&format!(
            "a=$EPOCHREALTIME; insmod /root/lpvmm_lp_cmdline.ko && while [ \"$(cat {sys}/transition)\" = 1 ]; do :; done; b=$EPOCHREALTIME; echo \"$a $b\""
        ))?;
        let t: Vec<f64> = out
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        let lp_switch_ms = match t[..] {
            [a, b] => (b - a) * 1e3,
            _ => return Err(format!("livepatch load: {out}")),
        };
        let check = g.run("cat /proc/cmdline")?;
        if check.trim() != "this has been live patched" {
            return Err(format!("the livepatch module did not patch: {check}"));
        }
        let lp_us = per_read_us(&mut g, n, reps)?;
        g.run(&format!("echo 0 > {sys}/enabled; while [ -d {sys} ]; do sleep 0.1; done; rmmod lpvmm_lp_cmdline"))?;
        eprintln!("{series}: enable pauses {en:?} disable pauses {dis:?}");
        pause_rows.push(format!(
            "| {series} | {:.0} | {:.0} | {:.0} | {:.0} | {lpvmm_switch_ms:.0} | {lp_switch_ms:.0} | {:.2} |",
            median(&en),
            percentile(&en, 0.99),
            median(&dis),
            percentile(&dis, 0.99),
            lpvmm_switch_ms / lp_switch_ms
        ));
        call_rows.push(format!(
            "| {series} | {unpatched:.2} | {same_us:.2} | {:.3} | {fix_us:.2} | {lp_us:.2} | {:.3} |",
            same_us / unpatched,
            fix_us / lp_us
        ));
        g.poweroff()?;
    }
    println!("| kernel | enable pause median (µs) | p99 | disable pause median (µs) | p99 | lpvmm patch: command to switched (ms) | livepatch: insmod to transition done (ms) | lpvmm / livepatch |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in pause_rows {
        println!("{r}");
    }
    println!();
    println!("| kernel | unpatched (µs/read) | lpvmm, identical function (µs/read) | ratio | lpvmm, the fix (µs/read) | livepatch, the fix (µs/read) | lpvmm / livepatch |");
    println!("|---|---|---|---|---|---|---|");
    for r in call_rows {
        println!("{r}");
    }
    Ok(())
}

/// Milliseconds from `a=$EPOCHREALTIME` to `b=...` as the guest printed them.
fn guest_ms(out: &str) -> Result<f64, String> {
    let t: Vec<f64> = out
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    match t[..] {
        [a, b] => Ok((b - a) * 1e3),
        _ => Err(format!("guest timing: {out}")),
    }
}

/// One lpvmm per-task enable of nsleep-cmdline, from the command to every task
/// switched (client-side), then disable and unload. With `blocker`, a `sleep 5` is
/// inside common_nsleep when it starts.
fn lpvmm_completion_ms(
    g: &mut lpvmm_tests::Guest,
    kp: &str,
    name: &str,
    blocker: bool,
) -> Result<f64, String> {
    let holder = sleeper_if(g, blocker)?;
    let t0 = Instant::now();
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {kp} --json"))?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    transition_of(&out)?;
    if rc != 0 {
        return Err(out);
    }
    g.lpvmm(&format!("patch disable {{vm}} {name}"))?;
    g.lpvmm(&format!("patch unload {{vm}} {name}"))?;
    reap(g, holder)?;
    Ok(ms)
}

/// With `blocker`, a `sleep 5` in the guest, left half a second to fall asleep in
/// `common_nsleep`; its pid.
fn sleeper_if(g: &mut lpvmm_tests::Guest, blocker: bool) -> Result<Option<i64>, String> {
    if !blocker {
        return Ok(None);
    }
    let pid = g.spawn("sleep 5 &")?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(Some(pid))
}

/// Wait for the sleeper of [`sleeper_if`] to end (only it: other background jobs, such
/// as the `spawn` of `bench completion`, run on).
fn reap(g: &mut lpvmm_tests::Guest, holder: Option<i64>) -> Result<(), String> {
    if let Some(pid) = holder {
        g.run(&format!("wait {pid}; true"))?;
    }
    Ok(())
}

/// The same fix as the guest's own livepatch module `module`: insmod until its
/// transition is done (measured in the guest), then disable and rmmod.
fn livepatch_completion_ms(
    g: &mut lpvmm_tests::Guest,
    module: &str,
    blocker: bool,
) -> Result<f64, String> {
    let sys = format!("/sys/kernel/livepatch/{module}");
    let holder = sleeper_if(g, blocker)?;
    let out = g.run_status(
        &format!(
            "a=$EPOCHREALTIME; insmod /root/{module}.ko && while [ \"$(cat {sys}/transition)\" = 1 ]; do :; done; b=$EPOCHREALTIME; echo \"$a $b\""
        ),
        Duration::from_secs(120),
    )?;
    let ms = guest_ms(&out.1)?;
    let check = g.run("cat /proc/cmdline")?;
    if check.trim() != "this has been live patched" {
        return Err(format!("the livepatch module did not patch: {check}"));
    }
    g.run(&format!(
        "echo 0 > {sys}/enabled; while [ -d {sys} ]; do sleep 0.1; done; rmmod {module}"
    ))?;
    reap(g, holder)?;
    Ok(ms)
}

/// Start `spawn N` in the guest (N extra processes asleep in `pause()`) and wait until
/// all of them exist; they run on until `kill $(pidof spawn)`.
fn spawn_tasks(g: &mut lpvmm_tests::Guest, extra: u32) -> Result<(), String> {
    // A guest's threads-max scales with its RAM: about 4,000 in 512 MiB, so the 5,000-task
    // rows raise it (fork said EAGAIN, and the wait below used to run into its timeout).
    let out = g.run(&format!(
        "echo 16384 > /proc/sys/kernel/threads-max; spawn {extra} >/tmp/spawn.out 2>&1 & p=$!; \
         while ! grep -q spawned /tmp/spawn.out 2>/dev/null; do \
         kill -0 $p 2>/dev/null || {{ echo spawn-failed; cat /tmp/spawn.out; break; }}; sleep 1; done"
    ))?;
    if out.contains("spawn-failed") {
        return Err(format!("spawn {extra} failed in the guest: {out}"));
    }
    Ok(())
}

/// A per-task enable of `kp` held by a `sleep 1000` in the old code: the sleeper's pid
/// and the transition in progress (`active` of `patch status`), which must be switching.
fn held_per_task(g: &mut lpvmm_tests::Guest, kp: &str) -> Result<(i64, serde_json::Value), String> {
    let holder = g.spawn("sleep 1000 &")?;
    std::thread::sleep(Duration::from_millis(300));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {kp} --no-wait"))?;
    if rc != 0 {
        return Err(out);
    }
    std::thread::sleep(Duration::from_millis(500));
    let (_, st) = g.lpvmm("patch status {vm} --json")?;
    let active = json(&st)?["active"].clone();
    if active["phase"] != "switching" {
        return Err(format!("the per-task transition was not held: {st}"));
    }
    Ok((holder, active))
}

/// Bare pause + resume inside the VMM (µs), as `lpvmm pause` and `resume` report them.
fn bare_pause_us(g: &mut lpvmm_tests::Guest) -> Result<f64, String> {
    let (_, p) = g.lpvmm("pause {vm} --json")?;
    let (_, r) = g.lpvmm("resume {vm} --json")?;
    let parked = json(&p)?["parked_ns"].as_f64().unwrap_or(f64::NAN);
    let resumed = json(&r)?["resumed_ns"].as_f64().unwrap_or(f64::NAN);
    Ok((parked + resumed) / 1e3)
}

/// Extra task counts from a comma-separated list (`100,2000` when absent).
fn task_counts(list: Option<String>) -> Result<Vec<u32>, String> {
    counts(list, "100,2000", 1, 10_000, "task count")
}

/// The guest-visible pause of checking every task, against a bare pause in the same
/// guest, with `extra` more sleeping processes (`spawn`): RUNS immediate enables of the
/// cmdline fix (one tick checks every task and flips), and RUNS first ticks of a
/// per-task enable of nsleep-cmdline (every task checked; a `sleep` in the patched
/// function holds the rest), each followed by a bare pause (`pause` + `resume`). The
/// guests have `memory` (`lpvmm run --memory`; 512 MiB by default): 6.12 needs 1G for
/// 5,000 more processes.
fn ticks(runs: u32, extra_counts: &[u32], memory: Option<&str>) -> Result<(), String> {
    let memory = memory.map(|m| format!("--memory {m}")).unwrap_or_default();
    let files = vec![
        (
            kp_build("nsleep-cmdline")?,
            "/root/nsleep-cmdline.kp".to_string(),
        ),
        (kp_build("cmdline")?, "/root/cmdline.kp".to_string()),
    ];
    let mut host = TestHost::start_with_files(false, &files)?;
    println!("| kernel | tasks | what | pause median (µs) | min–max (µs) | of it: task list / checks / writes / whole tick, medians (µs) | bare pause median (µs) | pause / bare | checks taken early / all | lists walked early / all | tasks read again in the pause |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for series in lpvmm_tests::SERIES {
        let (mut g, _) = host.boot_guest("bench", series, 2, &memory)?;
        let immediate = g.host.file("/root/cmdline.kp");
        let per_task = g.host.file("/root/nsleep-cmdline.kp");
        for &extra in extra_counts {
            spawn_tasks(&mut g, extra)?;
            let mut rows = [
                TickRow::new("immediate enable"),
                TickRow::new("per-task first tick"),
            ];
            for _ in 0..runs {
                let v = transition_of(
                    &g.lpvmm(&format!(
                        "patch {{vm}} {immediate} --consistency immediate --json"
                    ))?
                    .1,
                )?;
                rows[0].add(&v, bare_pause_us(&mut g)?)?;
                g.lpvmm("patch disable {vm} cmdline --consistency immediate")?;
                g.lpvmm("patch unload {vm} cmdline")?;

                let (holder, active) = held_per_task(&mut g, &per_task)?;
                rows[1].add(&active, bare_pause_us(&mut g)?)?;
                g.run(&format!("kill {holder}; wait {holder}; true"))?;
                wait_no_transition(&mut g)?;
                g.lpvmm("patch disable {vm} nsleep-cmdline")?;
                g.lpvmm("patch unload {vm} nsleep-cmdline")?;
            }
            for r in &rows {
                eprintln!(
                    "{series} +{extra}: {}: {:?} bare {:?}",
                    r.what, r.pauses, r.bare
                );
                println!("{}", r.line(series));
            }
            g.run("kill $(pidof spawn); true")?;
        }
        g.poweroff()?;
    }
    Ok(())
}

/// One row of `bench ticks`: the first tick's pause of each run, the bare pause after
/// it, the tasks and how their checks were made.
struct TickRow {
    what: &'static str,
    tasks: u64,
    pauses: Vec<f64>,
    /// The engine's parts of the first tick (`tick_parts[0]`): list, checks, writes,
    /// whole tick.
    parts: [Vec<f64>; 4],
    bare: Vec<f64>,
    early: u64,
    checks: u64,
    lists_early: u64,
    lists: u64,
    /// Tasks of early lists read again in the pause (they had run); `None` from an
    /// lpvmm that read every task again.
    reread: Option<u64>,
}

impl TickRow {
    fn new(what: &'static str) -> Self {
        TickRow {
            what,
            tasks: 0,
            pauses: Vec::new(),
            parts: Default::default(),
            bare: Vec::new(),
            early: 0,
            checks: 0,
            lists_early: 0,
            lists: 0,
            reread: None,
        }
    }

    /// Take a transition's first tick (`v`: its status JSON) and the bare pause after it.
    fn add(&mut self, v: &serde_json::Value, bare_us: f64) -> Result<(), String> {
        let first = v["pauses_us"][0]
            .as_f64()
            .ok_or(format!("a transition without its first pause: {v}"))?;
        // An lpvmm from before early checks has no counts (compared with this one).
        let c = &v["early_checks"];
        if !c.is_null() {
            let n = |k: &str| c[k].as_u64().ok_or(format!("no early_checks.{k}: {v}"));
            self.early += n("confirmed")?;
            self.checks += n("confirmed")? + n("unwound")?;
            self.lists_early += n("lists_confirmed")?;
            self.lists += n("lists_confirmed")? + n("lists_walked")?;
            if let Some(r) = c["tasks_reread"].as_u64() {
                self.reread = Some(self.reread.unwrap_or(0) + r);
            }
        }
        // An lpvmm from before tick parts has none (compared with this one).
        let parts = &v["tick_parts"][0];
        if !parts.is_null() {
            let names = ["list_us", "checks_us", "writes_us", "tick_us"];
            for (i, k) in names.iter().enumerate() {
                let us = parts[k].as_f64().ok_or(format!("no tick_parts.{k}: {v}"))?;
                self.parts[i].push(us);
            }
        }
        self.tasks = v["tasks"].as_u64().unwrap_or(0);
        self.pauses.push(first);
        self.bare.push(bare_us);
        Ok(())
    }

    fn line(&self, series: &str) -> String {
        let (lo, hi) = min_max(&self.pauses);
        let (p, b) = (median(&self.pauses), median(&self.bare));
        let parts = match self.parts[0].is_empty() {
            true => "–".to_string(),
            false => self
                .parts
                .iter()
                .map(|v| format!("{:.0}", median(v)))
                .collect::<Vec<_>>()
                .join(" / "),
        };
        let reread = self.reread.map_or("–".to_string(), |r| r.to_string());
        format!(
            "| {series} | {} | {} | {p:.0} | {lo:.0}–{hi:.0} | {parts} | {b:.0} | {:.1} | {} / {} | {} / {} | {reread} |",
            self.tasks,
            self.what,
            p / b,
            self.early,
            self.checks,
            self.lists_early,
            self.lists
        )
    }
}

/// Wait up to 60 s for the transition in progress to end.
fn wait_no_transition(g: &mut lpvmm_tests::Guest) -> Result<(), String> {
    let t0 = Instant::now();
    loop {
        let (_, st) = g.lpvmm("patch status {vm} --json")?;
        if json(&st)?["active"].is_null() {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!("the transition did not end: {st}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Per-task transitions: completion against the guest's livepatch, the pause of each
/// tick next to a bare pause, and the call cost through the trampoline and after.
fn transition(runs: u32) -> Result<(), String> {
    let kp = kp_build("nsleep-cmdline")?;
    let mut files = vec![
        (kp, "/root/nsleep-cmdline.kp".to_string()),
        (kp_build("cmdline")?, "/root/cmdline.kp".to_string()),
    ];
    for series in lpvmm_tests::SERIES {
        files.push((
            livepatch_cpio(series)?,
            format!("/root/lp-{series}.cpio.gz"),
        ));
    }
    let mut host = TestHost::start_with_files(false, &files)?;
    let (n, reps) = (3000, 5);
    let (mut done_rows, mut tick_rows, mut call_rows) = (Vec::new(), Vec::new(), Vec::new());
    for series in lpvmm_tests::SERIES {
        let initrd = initrd_with_livepatch(&mut host, series)?;
        let (mut g, _) = host.boot_guest_initrd("bench", series, 2, &initrd, "")?;
        let kp = g.host.file("/root/nsleep-cmdline.kp");

        // Completion, interleaved, each against the guest's livepatch module of the same
        // fix. Without a blocker: the cmdline fix. With a `sleep 5` in common_nsleep:
        // nsleep-cmdline (guest-images/livepatch/lpvmm_lp_nsleep.c).
        let cmdline_kp = g.host.file("/root/cmdline.kp");
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            ours.push(lpvmm_completion_ms(&mut g, &cmdline_kp, "cmdline", false)?);
            theirs.push(livepatch_completion_ms(&mut g, "lpvmm_lp_cmdline", false)?);
        }
        eprintln!("{series}: lpvmm {ours:?} livepatch {theirs:?}");
        let (a, b) = (median(&ours), median(&theirs));
        done_rows.push(format!(
            "| {series} | none (cmdline fix) | {a:.0} | {b:.0} | {:.3} |",
            a / b
        ));
        let (mut held, mut lp_held) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            held.push(lpvmm_completion_ms(&mut g, &kp, "nsleep-cmdline", true)?);
            lp_held.push(livepatch_completion_ms(&mut g, "lpvmm_lp_nsleep", true)?);
        }
        eprintln!("{series}: held by sleep 5: lpvmm {held:?} livepatch {lp_held:?}");
        let (a, b) = (median(&held), median(&lp_held));
        done_rows.push(format!(
            "| {series} | sleep 5 in common_nsleep (nsleep-cmdline) | {a:.0} | {b:.0} | {:.3} |",
            a / b
        ));

        // Call cost: unpatched, through the trampoline (a sleep holds the transition),
        // after (direct jump).
        let unpatched = per_read_us(&mut g, n, reps)?;
        let holder = g.spawn("sleep 1000 &")?;
        std::thread::sleep(Duration::from_millis(500));
        let (rc, out) = g.lpvmm(&format!("patch {{vm}} {kp} --no-wait"))?;
        if rc != 0 {
            return Err(out);
        }
        std::thread::sleep(Duration::from_secs(1));
        let during = per_read_us(&mut g, n, reps)?;
        let (_, st) = g.lpvmm("patch status {vm} --json")?;
        if json(&st)?["active"]["phase"] != "switching" {
            return Err(format!("the transition was not held: {st}"));
        }

        // Ticks of the held transition with 100 and 2000 extra tasks, next to bare
        // pauses in the same run. Reverse, then start again for each task count so that
        // the backoff starts over.
        for extra in [100u32, 2000] {
            spawn_tasks(&mut g, extra)?;
            g.lpvmm("patch reverse {vm}")?;
            let (rc, out) = g.lpvmm(&format!("patch {{vm}} {kp} --no-wait"))?;
            if rc != 0 {
                return Err(out);
            }
            let mut bare = Vec::new();
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(500));
                bare.push(bare_pause_us(&mut g)?);
            }
            let (_, st) = g.lpvmm("patch status {vm} --json")?;
            let a = json(&st)?["active"].clone();
            let tasks = a["tasks"].as_u64().unwrap_or(0);
            // The first tick unwinds every task; later ones only those still pending.
            let ticks: Vec<f64> = a["pauses_us"]
                .as_array()
                .map(|p| p.iter().skip(1).filter_map(|x| x.as_f64()).collect())
                .unwrap_or_default();
            let first = a["pauses_us"][0].as_f64().unwrap_or(f64::NAN);
            tick_rows.push(format!(
                "| {series} | {tasks} | {first:.0} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.2} |",
                median(&ticks),
                percentile(&ticks, 0.99),
                ticks.len(),
                median(&bare),
                percentile(&bare, 0.99),
                median(&ticks) / median(&bare)
            ));
            g.run("kill $(pidof spawn); true")?;
        }
        g.run(&format!("kill {holder}; wait {holder}; true"))?;
        wait_no_transition(&mut g)?;
        let after = per_read_us(&mut g, n, reps)?;
        call_rows.push(format!(
            "| {series} | {unpatched:.2} | {during:.2} | {:.3} | {after:.2} | {:.3} |",
            during / unpatched,
            after / unpatched
        ));
        g.poweroff()?;
    }
    println!("| kernel | blocker | lpvmm per-task: command to every task switched (ms) | livepatch: insmod to transition done (ms) | lpvmm / livepatch |");
    println!("|---|---|---|---|---|");
    for r in done_rows {
        println!("{r}");
    }
    println!();
    println!("| kernel | tasks | first tick (µs) | later ticks median (µs) | p99 | ticks | bare pause+resume median (µs) | p99 | tick / bare |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in tick_rows {
        println!("{r}");
    }
    println!();
    println!("| kernel | unpatched (µs/read) | through the trampoline (µs/read) | ratio | after, direct jump (µs/read) | ratio |");
    println!("|---|---|---|---|---|---|");
    for r in call_rows {
        println!("{r}");
    }
    Ok(())
}

/// The guest initrd with the livepatch modules of `series` appended (livepatch_cpio,
/// copied to the test host as /root/lp-SERIES.cpio.gz), on the test host.
fn initrd_with_livepatch(host: &mut TestHost, series: &str) -> Result<String, String> {
    let initrd = format!("{}/initrd-lp-{series}", host.tmp());
    let (base, lp) = (
        host.image("guest-initrd.cpio.gz"),
        host.file(&format!("/root/lp-{series}.cpio.gz")),
    );
    host.exec(&format!("cat {base} {lp} > {initrd}"))?;
    Ok(initrd)
}

/// Per-task transition completion against the guest's livepatch with `extra` more
/// sleeping processes: RUNS interleaved runs of lpvmm's per-task enable of the cmdline
/// fix (command to every task switched) and of `insmod lpvmm_lp_cmdline.ko` (until its
/// transition reads 0), nothing holding either.
fn completion(runs: u32, extra_counts: &[u32]) -> Result<(), String> {
    let mut files = vec![(kp_build("cmdline")?, "/root/cmdline.kp".to_string())];
    for series in lpvmm_tests::SERIES {
        files.push((
            livepatch_cpio(series)?,
            format!("/root/lp-{series}.cpio.gz"),
        ));
    }
    let mut host = TestHost::start_with_files(false, &files)?;
    println!("| kernel | tasks | lpvmm per-task: command to every task switched, median (min–max) (ms) | livepatch: insmod to transition done, median (min–max) (ms) | lpvmm / livepatch |");
    println!("|---|---|---|---|---|");
    for series in lpvmm_tests::SERIES {
        let initrd = initrd_with_livepatch(&mut host, series)?;
        let (mut g, _) = host.boot_guest_initrd("bench", series, 2, &initrd, "")?;
        let kp = g.host.file("/root/cmdline.kp");
        // Attach first, so that no run pays for it.
        g.lpvmm("kernel {vm}")?;
        for &extra in extra_counts {
            spawn_tasks(&mut g, extra)?;
            let tasks = g.run("ls -d /proc/[0-9]* | wc -l")?.trim().to_string();
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                ours.push(lpvmm_completion_ms(&mut g, &kp, "cmdline", false)?);
                theirs.push(livepatch_completion_ms(&mut g, "lpvmm_lp_cmdline", false)?);
            }
            eprintln!("{series} {tasks} tasks: lpvmm {ours:?} livepatch {theirs:?}");
            println!(
                "| {series} | {tasks} | {} | {} | {:.3} |",
                median_range(&ours, 0),
                median_range(&theirs, 0),
                median(&ours) / median(&theirs)
            );
            g.run("kill $(pidof spawn); true")?;
        }
        g.poweroff()?;
    }
    Ok(())
}

/// Nanoseconds per getpid(2) call in one `callcost` run (101 batches of 10,000 calls,
/// every result checked): the median batch, and the fastest, the one that the nested
/// host's preemptions and the guest's interrupts disturbed least.
#[derive(Clone, Copy, Debug)]
struct CallSample {
    median_ns: f64,
    fastest_ns: f64,
}

fn ns_per_call(g: &mut lpvmm_tests::Guest) -> Result<CallSample, String> {
    let out = g.run("callcost -n 10000 -b 101")?;
    let line = out
        .lines()
        .find(|l| l.starts_with("callcost: OK"))
        .ok_or(format!("callcost failed: {out}"))?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .ok_or(format!("callcost printed no {name}: {out}"))
    };
    Ok(CallSample {
        median_ns: field("median_ns=")?,
        fastest_ns: field("min_ns=")?,
    })
}

/// Issue 12's in-guest call cost: ns per getpid(2) call with `__x64_sys_getpid`
/// unpatched; patched by lpvmm to the same body, through its dispatch while a `sleep` in
/// the old common_nsleep holds the per-task transition (getpid-nsleep, kbuild-built);
/// after the transition (a direct jump); and by the guest's own livepatch of the same
/// change (lpvmm_lp_getpid.ko, an ftrace handler). ROUNDS rounds, interleaved.
fn calls(rounds: u32) -> Result<(), String> {
    let mut files = Vec::new();
    for series in lpvmm_tests::SERIES {
        files.push((
            kbuild_kp(series, "getpid-nsleep")?,
            format!("/root/getpid-nsleep-{series}.kp"),
        ));
        files.push((
            livepatch_cpio(series)?,
            format!("/root/lp-{series}.cpio.gz"),
        ));
    }
    let mut host = TestHost::start_with_files(false, &files)?;
    let mut rows = Vec::new();
    for series in lpvmm_tests::SERIES {
        let initrd = initrd_with_livepatch(&mut host, series)?;
        let (mut g, _) = host.boot_guest_initrd("bench", series, 2, &initrd, "")?;
        let kp = g.host.file(&format!("/root/getpid-nsleep-{series}.kp"));
        g.lpvmm("kernel {vm}")?;
        let mut c = CallCosts::default();
        for _ in 0..rounds {
            c.unpatched.push(ns_per_call(&mut g)?);
            let (holder, _) = held_per_task(&mut g, &kp)?;
            c.dispatch.push(ns_per_call(&mut g)?);
            g.run(&format!("kill {holder}; wait {holder}; true"))?;
            wait_no_transition(&mut g)?;
            c.direct.push(ns_per_call(&mut g)?);
            for op in ["disable", "unload"] {
                let (rc, out) = g.lpvmm(&format!("patch {op} {{vm}} getpid-nsleep"))?;
                if rc != 0 {
                    return Err(out);
                }
            }
            let sys = "/sys/kernel/livepatch/lpvmm_lp_getpid";
            g.run(&format!(
                "insmod /root/lpvmm_lp_getpid.ko && while [ \"$(cat {sys}/transition)\" = 1 ]; do sleep 0.1; done"
            ))?;
            c.livepatch.push(ns_per_call(&mut g)?);
            g.run(&format!(
                "echo 0 > {sys}/enabled; while [ -d {sys} ]; do sleep 0.1; done; rmmod lpvmm_lp_getpid"
            ))?;
        }
        eprintln!("{series}: {c:?}");
        rows.push(c.line(series, "median batch", |s| s.median_ns));
        rows.push(c.line(series, "fastest batch", |s| s.fastest_ns));
        g.poweroff()?;
    }
    println!("| kernel | statistic of a run | unpatched (ns/call) | lpvmm through dispatch (ns/call) | lpvmm after, direct jump (ns/call) | livepatch (ns/call) | dispatch / unpatched | direct / unpatched | livepatch / unpatched | lpvmm direct / livepatch |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    Ok(())
}

/// `bench calls`: one `callcost` run per case and round.
#[derive(Debug, Default)]
struct CallCosts {
    unpatched: Vec<CallSample>,
    dispatch: Vec<CallSample>,
    direct: Vec<CallSample>,
    livepatch: Vec<CallSample>,
}

impl CallCosts {
    /// The row: each case's median (min–max over rounds), then the ratios of medians
    /// with, in brackets, the range of the same ratio taken round by round.
    fn line(&self, series: &str, what: &str, stat: fn(&CallSample) -> f64) -> String {
        let values = |v: &[CallSample]| v.iter().map(stat).collect::<Vec<f64>>();
        let (unpatched, dispatch, direct, livepatch) = (
            values(&self.unpatched),
            values(&self.dispatch),
            values(&self.direct),
            values(&self.livepatch),
        );
        let ratio = |a: &[f64], b: &[f64]| {
            let per_round: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
            let (lo, hi) = min_max(&per_round);
            format!("{:.3} ({lo:.3}–{hi:.3})", median(a) / median(b))
        };
        format!(
            "| {series} | {what} | {} | {} | {} | {} | {} | {} | {} | {} |",
            median_range(&unpatched, 1),
            median_range(&dispatch, 1),
            median_range(&direct, 1),
            median_range(&livepatch, 1),
            ratio(&dispatch, &unpatched),
            ratio(&direct, &unpatched),
            ratio(&livepatch, &unpatched),
            ratio(&direct, &livepatch),
        )
    }
}

/// Does a guest survive `spawn 2000` while a per-task transition is held (trampolines
/// live, ticks running), and without one (pauses only)? `bench fork-under-dispatch`.
fn fork_under_dispatch() -> Result<(), String> {
    let kp = kp_build("nsleep-cmdline")?;
    let files = vec![(kp, "/root/nsleep-cmdline.kp".to_string())];
    let mut host = TestHost::start_with_files(false, &files)?;
    for held in [false, true] {
        let (mut g, _) = host.boot_guest(&format!("fork{}", u8::from(held)), "6.1", 2, "")?;
        let kp = g.host.file("/root/nsleep-cmdline.kp");
        let holder = g.spawn("sleep 1000 &")?;
        std::thread::sleep(Duration::from_millis(500));
        if held {
            let (rc, out) = g.lpvmm(&format!("patch {{vm}} {kp} --no-wait"))?;
            if rc != 0 {
                return Err(out);
            }
        }
        let r = g.run("spawn 2000 >/tmp/spawn.out & while ! grep -q spawned /tmp/spawn.out 2>/dev/null; do sleep 1; done; echo spawned-ok");
        let (_, st) = g.lpvmm("patch status {vm}")?;
        println!(
            "held={held}: {:?}\n{}",
            r.as_ref().map(|s| s.trim().to_string()),
            st.lines().take(12).collect::<Vec<_>>().join("\n")
        );
        if r.is_err() {
            println!("VMM stderr: {}", g.vmm_stderr());
            continue;
        }
        g.run(&format!("kill $(pidof spawn) {holder}; wait; true"))?;
        g.poweroff()?;
    }
    Ok(())
}

/// `lpvmm kp build --kernel RELEASE` of a kbuild sample for `series`.
fn kbuild_kp(series: &str, sample: &str) -> Result<std::path::PathBuf, String> {
    let root = lpvmm_tests::repo_root();
    let release =
        std::fs::read_to_string(lpvmm_tests::images_dir().join(format!("guest-{series}/release")))
            .map_err(|e| e.to_string())?;
    let dir = root.join(format!("target/bench/kbuild-{series}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let out = dir.join(format!("{sample}.kp"));
    let st = std::process::Command::new(lpvmm_tests::lpvmm_binary())
        .args(["kp", "build"])
        .arg(root.join(format!("patcher/examples/kbuild/{sample}.c")))
        .arg("-o")
        .arg(&out)
        .args(["--kernel", release.trim()])
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err(format!(
            "lpvmm kp build {sample} --kernel {} failed",
            release.trim()
        ));
    }
    Ok(out)
}

/// The kernel series named on the command line, or both when none is.
fn series_or_both(arg: Option<String>) -> Result<Vec<&'static str>, String> {
    match arg {
        None => Ok(lpvmm_tests::SERIES.to_vec()),
        Some(a) => lpvmm_tests::SERIES
            .iter()
            .find(|s| **s == a)
            .map(|s| vec![*s])
            .ok_or_else(|| format!("no kernel series '{a}' (one of {:?})", lpvmm_tests::SERIES)),
    }
}

/// Pause/resume cycles per guest boot in `pause-deaths`.
const PAUSE_DEATH_BATCH: u32 = 1000;

/// The load both guests run while they are paused and resumed: both vCPUs busy, and the
/// shell reading every task's /proc files (the mix under which nested guests died).
const PAUSE_LOAD: &str = "rm -f /tmp/ls; (while [ ! -e /tmp/ls ]; do :; done) & \
    (while [ ! -e /tmp/ls ]; do :; done) & \
    (while [ ! -e /tmp/ls ]; do cat /proc/[0-9]*/stat >/dev/null 2>&1; done) &";

/// How one boot of `pause-deaths` ended.
enum PauseRound {
    /// The guest answered after every cycle; median pause in µs.
    Survived(f64),
    DiedBooting(String),
    Died(String),
    /// The test host stopped answering or held a VMM it was told to kill: it is
    /// replaced, and the boot counted as the platform's.
    HostLost(String),
}

/// Issue 11, item 4: whether lpvmm's pause kills guests more often than QEMU's own
/// (`stop`/`cont` over QMP), with the same guest, load and test host, in interleaved
/// boots of PAUSE_DEATH_BATCH cycles each, CYCLES per VMM and series.
/// One VMM's side of `pause-deaths` for one series.
#[derive(Default)]
struct PauseTally {
    cycles: u32,
    boots: u32,
    died_booting: u32,
    died: u32,
    host_lost: u32,
    /// Median pause of each boot that survived, µs.
    pause_us: Vec<f64>,
}

fn pause_deaths(cycles: u32) -> Result<(), String> {
    let qmp = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .with_file_name("qmp-cycles");
    let files = [(qmp, "/usr/bin/qmp-cycles".to_string())];
    let mut host = TestHost::start_with_files(true, &files)?;
    // `bench pause-deaths CYCLES SERIES` runs one series.
    let only = std::env::args().nth(3);
    let series_list: Vec<&str> = match &only {
        Some(s) => vec![s.as_str()],
        None => lpvmm_tests::SERIES.to_vec(),
    };
    println!("| kernel | VMM | pause/resume cycles | boots | died booting | died paused or after | test host lost | deaths per 10,000 cycles | median pause (us) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for series in series_list {
        let mut tally: [PauseTally; 2] = Default::default();
        while tally.iter().any(|t| t.cycles < cycles) {
            for (i, vmm) in ["lpvmm", "QEMU microvm"].into_iter().enumerate() {
                let n = PAUSE_DEATH_BATCH.min(cycles - tally[i].cycles);
                if n == 0 {
                    continue;
                }
                // Built per boot: a replaced test host has its own paths.
                let (lpvmm, qemu) = lpvmm_and_qemu(&host, "pdeath", series, 2);
                let sock = format!("{}/qmp.sock", host.tmp());
                let (name, cmd) = match i {
                    0 => ("pdeath", lpvmm),
                    _ => (
                        "pdeath-qemu",
                        format!("{qemu} -qmp unix:{sock},server=on,wait=off"),
                    ),
                };
                let t = &mut tally[i];
                t.boots += 1;
                match pause_round(&mut host, name, &cmd, &sock, n)? {
                    PauseRound::Survived(us) => {
                        t.cycles += n;
                        t.pause_us.push(us);
                    }
                    PauseRound::DiedBooting(why) => {
                        t.died_booting += 1;
                        eprintln!("{series}: {vmm}'s guest died booting: {why}");
                    }
                    PauseRound::Died(why) => {
                        // The cycles of a boot that died count: the death is among them.
                        t.cycles += n;
                        t.died += 1;
                        eprintln!("{series}: {vmm}'s guest died under pause/resume: {why}");
                    }
                    PauseRound::HostLost(why) => {
                        t.host_lost += 1;
                        eprintln!(
                            "{series}: WARNING: the test host was lost during {vmm}'s boot: {why}"
                        );
                        host = TestHost::start_with_files(true, &files)?;
                    }
                }
                eprintln!("{series}: {vmm}: {} cycles, {} deaths", t.cycles, t.died);
            }
        }
        for (t, vmm) in tally.iter().zip(["lpvmm", "QEMU microvm"]) {
            println!(
                "| {series} | {vmm} | {} | {} | {} | {} | {} | {:.1} | {:.0} |",
                t.cycles,
                t.boots,
                t.died_booting,
                t.died,
                t.host_lost,
                f64::from(t.died) * 10_000.0 / f64::from(t.cycles.max(1)),
                median(&t.pause_us)
            );
        }
    }
    Ok(())
}

fn pause_round(
    host: &mut TestHost,
    name: &str,
    cmd: &str,
    qmp_sock: &str,
    cycles: u32,
) -> Result<PauseRound, String> {
    let mut g = match host.start_and_wait_ready(name, cmd) {
        Ok((g, _)) => g,
        Err(failure @ BootFailure::Exited { .. }) => {
            return Ok(PauseRound::DiedBooting(failure.report()))
        }
        Err(BootFailure::Other(e)) => return Ok(PauseRound::HostLost(e)),
    };
    let paused = g.run(PAUSE_LOAD).and_then(|_| {
        if name.ends_with("-qemu") {
            let (rc, out) = g.host.exec_status(
                &format!("qmp-cycles {qmp_sock} {cycles}"),
                Duration::from_secs(1800),
            )?;
            let us = out
                .split_whitespace()
                .find_map(|w| w.strip_prefix("median_stop_us=")?.parse().ok());
            match (rc, us) {
                (0, Some(us)) => Ok(us),
                _ => Err(format!("qmp-cycles: {out}")),
            }
        } else {
            let (rc, out) = g.lpvmm(&format!("bench pause {{vm}} --cycles {cycles} --json"))?;
            match (rc, json(&out).ok()) {
                (0, Some(v)) => Ok(v["park"]["median_us"].as_f64().unwrap_or(f64::NAN)),
                _ => Err(format!("lpvmm bench pause: {out}")),
            }
        }
    });
    let answered = paused.and_then(|us| {
        g.run_status("touch /tmp/ls; wait; echo alive", Duration::from_secs(120))
            .and_then(|(rc, out)| match rc == 0 && out.contains("alive") {
                true => Ok(us),
                false => Err(format!("the guest's shell: {out}")),
            })
    });
    let off = answered.and_then(|us| g.poweroff().map(|_| us));
    match off {
        Ok(us) => Ok(PauseRound::Survived(us)),
        Err(e) => match g.wait_exit(Duration::from_secs(10)) {
            Ok(exit) => Ok(PauseRound::Died(format!(
                "{e}; exit {}: {}",
                exit.code, exit.stderr
            ))),
            // The VMM still runs but the guest does not answer: dead too, for the
            // guest's user. Dropping the guest ends the VMM (stop, then kill by pid).
            Err(_) => {
                let console = g.console().drain();
                let tail = console[console.len().saturating_sub(1500)..].to_string();
                Ok(PauseRound::Died(format!("{e}; guest console: {tail}")))
            }
        },
    }
}
