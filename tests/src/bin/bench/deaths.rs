//! `bench deaths [RUNS] [spawn|hammer [SERIES]]`: guests the nested platform kills,
//! lpvmm against QEMU microvm side by side (same guests, same load); with
//! `LPVMM_BENCH_HOST_TRACE=1` the test host's KVM trace of each death.

use std::time::Duration;

use lpvmm_tests::{BootFailure, KvmTrace, TestHost};

use crate::common::{host_traced, lpvmm_and_qemu};

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

/// The load of `bench deaths RUNS LOAD`, when one is named.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Load {
    /// 2,000 processes forked at once (SPAWN_LOAD)
    Spawn,
    /// The endurance run's readers and getpid hammers, no patch (HAMMER_LOAD)
    Hammer,
}

/// The guest's shell commands of `load` ([`DEATHS_LOAD`] when none is named).
pub fn script(load: Option<Load>) -> &'static str {
    match load {
        None => DEATHS_LOAD,
        Some(Load::Spawn) => SPAWN_LOAD,
        Some(Load::Hammer) => HAMMER_LOAD,
    }
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
pub fn deaths(runs: u32, load: &str, series_list: &[&str]) -> Result<(), String> {
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
