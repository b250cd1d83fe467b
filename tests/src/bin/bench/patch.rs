//! `bench patch [CYCLES]`: the guest-visible pauses of enable and disable, the cost of
//! a call of the patched function, and the same fix as the guest's own livepatch.

use std::time::Instant;

use lpvmm_tests::stats::{median, percentile};
use lpvmm_tests::TestHost;

use crate::common::{initrd_with_livepatch, kp_build, livepatch_cpio, per_read_us, transition_of};

/// Guest-visible pause of enable and disable; what a call of the patched function costs
/// (a patch that changes nothing, against the unpatched kernel); and the same fix as
/// the guest's own livepatch module, side by side: call cost and time to switch.
pub fn patch(cycles: u32) -> Result<(), String> {
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
