//! `bench completion [RUNS] [TASKS,...]`: per-task transition completion against the
//! guest's livepatch with extra sleeping tasks, nothing holding either.

use lpvmm_tests::stats::{median, median_range};
use lpvmm_tests::TestHost;

use crate::common::{completions, initrd_with_livepatch, kp_build, livepatch_cpio, spawn_tasks};

/// Per-task transition completion against the guest's livepatch with `extra` more
/// sleeping processes: RUNS interleaved runs of lpvmm's per-task enable of the cmdline
/// fix (command to every task switched) and of `insmod lpvmm_lp_cmdline.ko` (until its
/// transition reads 0), nothing holding either.
pub fn completion(runs: u32, extra_counts: &[u32]) -> Result<(), String> {
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
            let (ours, theirs) =
                completions(&mut g, runs, (&kp, "cmdline"), "lpvmm_lp_cmdline", false)?;
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
