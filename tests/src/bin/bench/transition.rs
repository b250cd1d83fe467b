//! `bench transition [RUNS]`: per-task transitions: completion against the guest's
//! livepatch (with and without a blocker), the pause of each tick next to a bare pause
//! with 100 and 2000 tasks, and the call cost through the trampoline and after.

use std::time::Duration;

use lpvmm_tests::stats::{median, percentile};
use lpvmm_tests::{json, TestHost};

use lpvmm_tests::Guest;

use crate::common::{
    bare_pause_us, completions, initrd_with_livepatch, kp_build, livepatch_cpio, per_read_us,
    spawn_tasks, wait_no_transition,
};

/// Reads per timed run and timed runs per figure of the call cost (`per_read_us`).
const READS: (u32, u32) = (3000, 5);

/// The tables' rows: completion, ticks, call cost.
#[derive(Default)]
struct Rows {
    done: Vec<String>,
    ticks: Vec<String>,
    calls: Vec<String>,
}

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
    let mut rows = Rows::default();
    for series in lpvmm_tests::SERIES {
        let initrd = initrd_with_livepatch(&mut host, series)?;
        let (mut g, _) = host.boot_guest_initrd("bench", series, 2, &initrd, "")?;
        let kp = g.host.file("/root/nsleep-cmdline.kp");
        rows.done
            .extend(completion_rows(&mut g, series, &kp, runs)?);
        held_rows(&mut g, series, &kp, &mut rows)?;
        g.poweroff()?;
    }
    print_tables(&rows);
    Ok(())
}

/// Completion, interleaved, each against the guest's livepatch module of the same fix.
/// Without a blocker: the cmdline fix. With a `sleep 5` in common_nsleep:
/// nsleep-cmdline (`kp`; guest-images/livepatch/lpvmm_lp_nsleep.c).
fn completion_rows(
    g: &mut Guest,
    series: &str,
    kp: &str,
    runs: u32,
) -> Result<[String; 2], String> {
    let cmdline_kp = g.host.file("/root/cmdline.kp");
    let (ours, theirs) = completions(g, runs, (&cmdline_kp, "cmdline"), "lpvmm_lp_cmdline", false)?;
    eprintln!("{series}: lpvmm {ours:?} livepatch {theirs:?}");
    let (a, b) = (median(&ours), median(&theirs));
    let free = format!(
        "| {series} | none (cmdline fix) | {a:.0} | {b:.0} | {:.3} |",
        a / b
    );
    let (held, lp_held) = completions(g, runs, (kp, "nsleep-cmdline"), "lpvmm_lp_nsleep", true)?;
    eprintln!("{series}: held by sleep 5: lpvmm {held:?} livepatch {lp_held:?}");
    let (a, b) = (median(&held), median(&lp_held));
    let blocked = format!(
        "| {series} | sleep 5 in common_nsleep (nsleep-cmdline) | {a:.0} | {b:.0} | {:.3} |",
        a / b
    );
    Ok([free, blocked])
}

/// Call cost: unpatched, through the trampoline (a sleep holds the transition of `kp`),
/// after (direct jump); and, while it is held, the ticks with 100 and 2000 extra tasks.
fn held_rows(g: &mut Guest, series: &str, kp: &str, rows: &mut Rows) -> Result<(), String> {
    let (n, reps) = READS;
    let unpatched = per_read_us(g, n, reps)?;
    let holder = g.spawn("sleep 1000 &")?;
    std::thread::sleep(Duration::from_millis(500));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {kp} --no-wait"))?;
    if rc != 0 {
        return Err(out);
    }
    std::thread::sleep(Duration::from_secs(1));
    let during = per_read_us(g, n, reps)?;
    let (_, st) = g.lpvmm("patch status {vm} --json")?;
    if json(&st)?["active"]["phase"] != "switching" {
        return Err(format!("the transition was not held: {st}"));
    }
    for extra in [100u32, 2000] {
        rows.ticks.push(tick_row(g, series, kp, extra)?);
    }
    g.run(&format!("kill {holder}; wait {holder}; true"))?;
    wait_no_transition(g)?;
    let after = per_read_us(g, n, reps)?;
    rows.calls.push(format!(
        "| {series} | {unpatched:.2} | {during:.2} | {:.3} | {after:.2} | {:.3} |",
        during / unpatched,
        after / unpatched
    ));
    Ok(())
}

/// Ticks of the held transition of `kp` with `extra` more tasks, next to bare pauses in
/// the same run. Reversed, then started again, so that the backoff starts over.
fn tick_row(g: &mut Guest, series: &str, kp: &str, extra: u32) -> Result<String, String> {
    spawn_tasks(g, extra)?;
    g.lpvmm("patch reverse {vm}")?;
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {kp} --no-wait"))?;
    if rc != 0 {
        return Err(out);
    }
    let mut bare = Vec::new();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(500));
        bare.push(bare_pause_us(g)?);
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
    let row = format!(
        "| {series} | {tasks} | {first:.0} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.2} |",
        median(&ticks),
        percentile(&ticks, 0.99),
        ticks.len(),
        median(&bare),
        percentile(&bare, 0.99),
        median(&ticks) / median(&bare)
    );
    g.run("kill $(pidof spawn); true")?;
    Ok(row)
}

fn print_tables(rows: &Rows) {
    println!("| kernel | blocker | lpvmm per-task: command to every task switched (ms) | livepatch: insmod to transition done (ms) | lpvmm / livepatch |");
    println!("|---|---|---|---|---|");
    for r in &rows.done {
        println!("{r}");
    }
    println!();
    println!("| kernel | tasks | first tick (µs) | later ticks median (µs) | p99 | ticks | bare pause+resume median (µs) | p99 | tick / bare |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows.ticks {
        println!("{r}");
    }
    println!();
    println!("| kernel | unpatched (µs/read) | through the trampoline (µs/read) | ratio | after, direct jump (µs/read) | ratio |");
    println!("|---|---|---|---|---|---|");
    for r in &rows.calls {
        println!("{r}");
    }
}
