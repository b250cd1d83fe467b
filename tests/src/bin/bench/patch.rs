//! `bench patch [CYCLES]`: the guest-visible pauses of enable and disable, the cost of
//! a call of the patched function, and the same fix as the guest's own livepatch.

use std::time::Instant;

use lpvmm_tests::stats::{median, percentile};
use lpvmm_tests::{Guest, TestHost};

use crate::common::{initrd_with_livepatch, kp_build, livepatch_cpio, per_read_us, transition_of};

/// Reads per timed run and timed runs per figure of the call cost (`per_read_us`).
const READS: (u32, u32) = (3000, 5);

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
    let mut pause_rows = Vec::new();
    let mut call_rows = Vec::new();
    for series in lpvmm_tests::SERIES {
        let initrd = initrd_with_livepatch(&mut host, series)?;
        let (mut g, _) = host.boot_guest_initrd("bench", series, 2, &initrd, "")?;
        let (pauses, calls) = one_series(&mut g, series, cycles)?;
        pause_rows.push(pauses);
        call_rows.push(calls);
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

/// The rows of `series` in both tables (pauses, call cost), from its booted guest.
fn one_series(g: &mut Guest, series: &str, cycles: u32) -> Result<(String, String), String> {
    let (n, reps) = READS;
    let fix = g.host.file("/root/cmdline.kp");
    let same = g.host.file("/root/same.kp");

    let unpatched = per_read_us(g, n, reps)?;
    // A patch that changes nothing: the redirection's own cost.
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {same} --json"))?;
    if rc != 0 {
        return Err(out);
    }
    let same_us = per_read_us(g, n, reps)?;
    g.lpvmm("patch disable {vm} cmdline-same")?;
    g.lpvmm("patch unload {vm} cmdline-same")?;

    let fix = lpvmm_fix(g, &fix, cycles)?;
    let (lp_switch_ms, lp_us) = livepatch_fix(g)?;
    let (en, dis) = (&fix.enable_us, &fix.disable_us);
    eprintln!("{series}: enable pauses {en:?} disable pauses {dis:?}");
    let pauses = format!(
        "| {series} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {lp_switch_ms:.0} | {:.2} |",
        median(en),
        percentile(en, 0.99),
        median(dis),
        percentile(dis, 0.99),
        fix.switch_ms,
        fix.switch_ms / lp_switch_ms
    );
    let calls = format!(
        "| {series} | {unpatched:.2} | {same_us:.2} | {:.3} | {:.2} | {lp_us:.2} | {:.3} |",
        same_us / unpatched,
        fix.read_us,
        fix.read_us / lp_us
    );
    Ok((pauses, calls))
}

/// What lpvmm's fix measured.
struct Fix {
    /// Its enable, from the command to switched, timed by the client.
    switch_ms: f64,
    /// µs per read of /proc/cmdline while it is enabled.
    read_us: f64,
    /// The last pause of each enable and disable of the cycles.
    enable_us: Vec<f64>,
    disable_us: Vec<f64>,
}

/// The fix `fix`: enable (timed from the client), read cost, pauses over CYCLES
/// disable/enable cycles; left disabled.
fn lpvmm_fix(g: &mut Guest, fix: &str, cycles: u32) -> Result<Fix, String> {
    let (n, reps) = READS;
    let t0 = Instant::now();
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {fix} --json"))?;
    let switch_ms = t0.elapsed().as_secs_f64() * 1e3;
    if rc != 0 {
        return Err(out);
    }
    transition_of(&out)?;
    let read_us = per_read_us(g, n, reps)?;
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
    Ok(Fix {
        switch_ms,
        read_us,
        enable_us: en,
        disable_us: dis,
    })
}

/// The guest's own livepatch of the same fix: insmod to transition done (ms, measured
/// in the guest) and µs per read while it is enabled; then disabled and removed.
fn livepatch_fix(g: &mut Guest) -> Result<(f64, f64), String> {
    let (n, reps) = READS;
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
    let lp_us = per_read_us(g, n, reps)?;
    g.run(&format!(
        "echo 0 > {sys}/enabled; while [ -d {sys} ]; do sleep 0.1; done; rmmod lpvmm_lp_cmdline"
    ))?;
    Ok((lp_switch_ms, lp_us))
}
