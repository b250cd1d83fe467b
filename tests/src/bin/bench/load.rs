//! `bench load [RUNS]`: how long a patch load keeps the guest paused, against a bare
//! pause of the same guest in the same run (issue 23, item 3).
//!
//! A load parses, resolves and links the patch while the guest runs; its pause only
//! checks each function's site against the stopped guest and writes the linked bytes
//! (for the first patch of a VM, it also maps the patch area). Per series, RUNS guests
//! boot; in each:
//! - five bare pauses (`lpvmm regs`: park every vCPU, copy the registers, resume);
//! - the first patch's load (`patch load`, cmdline.kp): the area is mapped in this pause;
//! - a later patch's load (meminfo.kp), five times (unloaded in between);
//! - the enable of the first patch: its first tick's pause (the sites flip there).
//!
//! Printed: medians over every guest, and each against the bare pause.

use lpvmm_tests::stats::median;
use lpvmm_tests::{json, Guest, TestHost};

use crate::common::{bare_pause, kp_build, transition_of};

/// The pause of one `patch load`, in µs.
fn load_pause(g: &mut Guest, kp: &str) -> Result<f64, String> {
    let (rc, out) = g.lpvmm(&format!("patch load {{vm}} {kp} --json"))?;
    if rc != 0 {
        return Err(format!("patch load {kp}: {out}"));
    }
    json(&out)?["pause"]["paused_us"]
        .as_f64()
        .ok_or(format!("patch load {kp}: no pause in {out}"))
}

/// The pause of the first tick of `patch enable NAME`, in µs.
fn enable_first_tick(g: &mut Guest, name: &str) -> Result<f64, String> {
    let (rc, out) = g.lpvmm(&format!("patch enable {{vm}} {name} --json"))?;
    if rc != 0 {
        return Err(format!("patch enable {name}: {out}"));
    }
    let v = transition_of(&out)?;
    v["pauses_us"][0]
        .as_f64()
        .ok_or(format!("patch enable {name}: no pauses in {out}"))
}

#[derive(Default)]
struct Pauses {
    bare: Vec<f64>,
    first: Vec<f64>,
    later: Vec<f64>,
    tick: Vec<f64>,
}

fn one_guest(host: &mut TestHost, series: &str, p: &mut Pauses) -> Result<(), String> {
    let (mut g, _) = host.boot_guest("bench-load", series, 2, "")?;
    let (first, later) = (
        g.host.file("/root/cmdline.kp"),
        g.host.file("/root/meminfo.kp"),
    );
    for _ in 0..5 {
        p.bare.push(bare_pause(&mut g)?);
    }
    p.first.push(load_pause(&mut g, &first)?);
    for _ in 0..5 {
        p.later.push(load_pause(&mut g, &later)?);
        let (rc, out) = g.lpvmm("patch unload {vm} meminfo")?;
        if rc != 0 {
            return Err(format!("patch unload meminfo: {out}"));
        }
        p.bare.push(bare_pause(&mut g)?);
    }
    p.tick.push(enable_first_tick(&mut g, "cmdline")?);
    let patched = g.run("cat /proc/cmdline")?;
    if patched.trim() != "this has been live patched" {
        return Err(format!("the enabled patch did not patch: {patched}"));
    }
    g.poweroff().map(|_| ())
}

pub fn load(runs: u32) -> Result<(), String> {
    let files = vec![
        (kp_build("cmdline")?, "/root/cmdline.kp".to_string()),
        (kp_build("meminfo")?, "/root/meminfo.kp".to_string()),
    ];
    let mut host = TestHost::start_with_files(false, &files)?;
    println!("| kernel | guests | bare pause (µs) | first load's pause (µs) | ratio | later load's pause (µs) | ratio | enable's first tick (µs) | ratio |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for series in lpvmm_tests::SERIES {
        let mut p = Pauses::default();
        for _ in 0..runs {
            one_guest(&mut host, series, &mut p)?;
        }
        eprintln!(
            "{series}: bare {:?} first {:?} later {:?} tick {:?}",
            p.bare, p.first, p.later, p.tick
        );
        let bare = median(&p.bare);
        let (first, later, tick) = (median(&p.first), median(&p.later), median(&p.tick));
        println!(
            "| {series} | {runs} | {bare:.0} | {first:.0} | {:.2} | {later:.0} | {:.2} | {tick:.0} | {:.2} |",
            first / bare,
            later / bare,
            tick / bare
        );
    }
    Ok(())
}
