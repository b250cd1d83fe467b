//! `bench boot [RUNS]`: lpvmm against QEMU microvm, from launch to the guest's /init
//! printing its ready line, RUNS interleaved boots per kernel series.

use std::time::Instant;

use lpvmm_tests::stats::median;
use lpvmm_tests::{TestHost, BOOT_TIMEOUT};

use crate::common::{interleaved, lpvmm_and_qemu};

/// Launch → the guest's /init prints its ready line, then poweroff.
fn time_boot(host: &mut TestHost, name: &str, cmd: &str) -> Result<f64, String> {
    let t0 = Instant::now();
    let mut g = host.start_console_program(name, cmd)?;
    g.console().wait_line("LPVMM-GUEST-READY", BOOT_TIMEOUT)?;
    let secs = t0.elapsed().as_secs_f64();
    g.poweroff()?;
    Ok(secs)
}

pub fn boot(runs: u32) -> Result<(), String> {
    let mut host = TestHost::start_with(true)?;
    println!("| kernel | lpvmm median (s) | QEMU microvm median (s) | lpvmm / QEMU |");
    println!("|---|---|---|---|");
    for series in lpvmm_tests::SERIES {
        let (lpvmm, qemu) = lpvmm_and_qemu(&host, "bench", series, 1);
        let (l, q) = interleaved(
            runs,
            &mut host,
            |h| time_boot(h, "bench", &lpvmm),
            |h| time_boot(h, "bench-qemu", &qemu),
        )?;
        eprintln!("{series}: lpvmm {l:?} qemu {q:?}");
        let (lm, qm) = (median(&l), median(&q));
        println!("| {series} | {lm:.2} | {qm:.2} | {:.2} |", lm / qm);
    }
    Ok(())
}
