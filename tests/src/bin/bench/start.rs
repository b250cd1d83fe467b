//! `bench start [RUNS]`: the VMM's start-up, from the lpvmm process's start to its
//! first `KVM_RUN`, as lpvmm measures it.

use lpvmm_tests::stats::{median, min_max};
use lpvmm_tests::{json, TestHost};

/// The VMM's start-up: from the start of the lpvmm process to its first `KVM_RUN`, as
/// lpvmm itself measures it (`lpvmm status`'s `start_to_first_run_us`), RUNS boots per
/// series and vCPU count.
pub fn vmm_start(runs: u32) -> Result<(), String> {
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
