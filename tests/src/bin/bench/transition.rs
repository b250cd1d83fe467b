//! `bench transition [RUNS]`: per-task transitions: completion against the guest's
//! livepatch (with and without a blocker), the pause of each tick next to a bare pause
//! with 100 and 2000 tasks, and the call cost through the trampoline and after.

use std::time::Duration;

use lpvmm_tests::stats::{median, percentile};
use lpvmm_tests::{json, TestHost};

use crate::common::{
    bare_pause_us, initrd_with_livepatch, kp_build, livepatch_completion_ms, livepatch_cpio,
    lpvmm_completion_ms, per_read_us, spawn_tasks, wait_no_transition,
};

/// Per-task transitions: completion against the guest's livepatch, the pause of each
/// tick next to a bare pause, and the call cost through the trampoline and after.
pub fn transition(runs: u32) -> Result<(), String> {
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
