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

mod boot;
mod calls;
mod common;
mod completion;
mod deaths;
mod endurance;
mod fork_under_dispatch;
mod guest_diff;
mod host_info;
mod introspect;
mod load;
mod memory;
mod patch;
mod pause;
mod pause_deaths;
mod start;
mod ticks;
mod transition;

fn main() {
    let mut args = std::env::args().skip(1);
    let what = args.next().unwrap_or_default();
    let first = args.next();
    let n: Option<u32> = first.as_deref().and_then(|s| s.parse().ok());
    let result = match what.as_str() {
        "boot" => boot::boot(n.unwrap_or(5)),
        "pause" => pause::vcpu_counts(args.next()).and_then(|v| pause::pause(n.unwrap_or(1000), &v)),
        "introspect" => introspect::introspect(n.unwrap_or(5)),
        "attach" => introspect::attach_only(n.unwrap_or(5)),
        "memory" => memory::vmm_memory(),
        "start" => start::vmm_start(n.unwrap_or(5)),
        "patch" => patch::patch(n.unwrap_or(30)),
        "load" => load::load(n.unwrap_or(3)),
        "deaths" => match args.next().as_deref() {
            None => deaths::deaths(n.unwrap_or(10), deaths::DEATHS_LOAD, &lpvmm_tests::SERIES),
            Some("spawn") => match args.next() {
                None => deaths::deaths(n.unwrap_or(10), deaths::SPAWN_LOAD, &lpvmm_tests::SERIES),
                Some(series) => deaths::deaths(n.unwrap_or(10), deaths::SPAWN_LOAD, &[series.as_str()]),
            },
            Some("hammer") => match args.next() {
                None => deaths::deaths(n.unwrap_or(10), deaths::HAMMER_LOAD, &lpvmm_tests::SERIES),
                Some(series) => deaths::deaths(n.unwrap_or(10), deaths::HAMMER_LOAD, &[series.as_str()]),
            },
            Some(other) => Err(format!(
                "bench deaths: no load named '{other}' (spawn, hammer)"
            )),
        },
        "transition" => transition::transition(n.unwrap_or(5)),
        "fork-under-dispatch" => fork_under_dispatch::fork_under_dispatch(),
        "ticks" => ticks::task_counts(args.next())
            .and_then(|c| ticks::ticks(n.unwrap_or(5), &c, args.next().as_deref())),
        "completion" => common::counts(args.next(), "2000", 0, 10_000, "task count")
            .and_then(|c| completion::completion(n.unwrap_or(5), &c)),
        "calls" => calls::calls(n.unwrap_or(5)),
        "host-info" => host_info::host_info(),
        "guest-diff" => guest_diff::guest_diff(first),
        "endurance" => {
            // `bench endurance [CYCLES] [SERIES] [alone]`: `alone` leaves the peer out.
            let rest: Vec<String> = args.collect();
            let alone = rest.iter().any(|a| a == "alone");
            common::series_or_both(rest.into_iter().find(|a| a != "alone"))
                .and_then(|series| endurance::endurance(n.unwrap_or(10_000), &series, !alone))
        }
        "pause-deaths" => pause_deaths::pause_deaths(n.unwrap_or(10_000), args.next()),
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
