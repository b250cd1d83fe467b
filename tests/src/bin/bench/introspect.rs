//! `bench introspect [RUNS]` and `bench attach [RUNS]`: attach time and its pause
//! against a bare pause; with `introspect`, also the pause of `tasks` and of unwinding
//! every stack with 100 and 2000 extra tasks, against the guest's own /proc walk.

use lpvmm_tests::stats::{median, percentile};
use lpvmm_tests::{json, Guest, TestHost};

use crate::common::spawn_tasks;

/// Attach time, and the guest-visible pause of `lpvmm tasks` and of unwinding every
/// task, with 100 and 2000 extra guest tasks. Side by side: the guest reading every
/// /proc/PID/stack itself (its own cost for the same information).
pub fn introspect(runs: u32) -> Result<(), String> {
    introspect_with(runs, true)
}

/// Only `introspect`'s attach table (attach time, its pause and a bare pause).
pub fn attach_only(runs: u32) -> Result<(), String> {
    introspect_with(runs, false)
}

fn introspect_with(runs: u32, task_pauses: bool) -> Result<(), String> {
    let mut host = TestHost::start()?;
    println!("| kernel | attach median (ms) | VMCOREINFO found (ms) | symbols ready (ms) | BTF ready (ms) | attach pause median (ms) | bare pause median (ms) | attach pause / bare pause | symbols | BTF types | ORC entries |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for series in lpvmm_tests::SERIES {
        let (mut g, _) = host.boot_guest("bench", series, 2, "")?;
        println!("{}", attach_row(&mut g, series, runs)?);
        let extras: &[u32] = if task_pauses { &[100, 2000] } else { &[] };
        for &extra in extras {
            rows.push(task_row(&mut g, series, extra, runs)?);
        }
        g.poweroff()?;
    }
    if !task_pauses {
        return Ok(());
    }
    println!();
    println!("| kernel | tasks | `tasks` pause median (ms) | max (ms) | all-stacks pause median (ms) | max (ms) | per task (µs) | guest's own /proc/*/stack walk (ms) | lpvmm pause / guest walk |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

/// The attach table's row of `series`: RUNS attaches, each with a bare pause after it.
fn attach_row(g: &mut Guest, series: &str, runs: u32) -> Result<String, String> {
    let (mut attach, mut attach_pause, mut bare_pause) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = serde_json::Value::Null;
    for _ in 0..runs {
        let (rc, out) = g.lpvmm("kernel {vm} --reattach --json")?;
        if rc != 0 {
            return Err(out);
        }
        last = json(&out)?;
        attach.push(last["stats"]["attach_us"].as_f64().unwrap_or(f64::NAN) / 1000.0);
        attach_pause.push(last["pause"]["paused_us"].as_f64().unwrap_or(f64::NAN) / 1000.0);
        // A bare pause, interleaved: park every vCPU, copy the registers, resume.
        let (rc, out) = g.lpvmm("regs {vm} --json")?;
        if rc != 0 {
            return Err(out);
        }
        bare_pause.push(json(&out)?["paused_us"].as_f64().unwrap_or(f64::NAN) / 1000.0);
    }
    let (_, note) = g.lpvmm("vmcoreinfo {vm} --json")?;
    let note_at = json(&note)?["phys_addr"]
        .as_u64()
        .ok_or(format!("vmcoreinfo has no phys_addr: {note}"))?;
    eprintln!("{series}: VMCOREINFO text at guest-physical {note_at:#x}");
    let st = &last["stats"];
    let ms = |k: &str| st[k].as_f64().unwrap_or(f64::NAN) / 1000.0;
    eprintln!("{series}: attach runs (ms) {attach:?}, their pauses {attach_pause:?}, bare pauses {bare_pause:?}");
    let (attach_pause, bare_pause) = (median(&attach_pause), median(&bare_pause));
    Ok(format!(
        "| {series} | {:.0} | {:.0} | {:.0} | {:.0} | {attach_pause:.1} | {bare_pause:.1} | {:.2} | {} | {} | {} |",
        median(&attach),
        ms("vmcoreinfo_done_us"),
        ms("kallsyms_done_us"),
        ms("btf_done_us"),
        attach_pause / bare_pause,
        st["symbols"],
        st["btf_types"],
        st["orc_entries"]
    ))
}

/// The task table's row of `series` with `extra` more tasks: RUNS `tasks` and `stack`
/// pauses, and the guest's own walk of every /proc/PID/stack.
fn task_row(g: &mut Guest, series: &str, extra: u32, runs: u32) -> Result<String, String> {
    spawn_tasks(g, extra)?;
    let (mut tasks_us, mut stacks_us) = (Vec::new(), Vec::new());
    let mut count = 0.0;
    for _ in 0..runs {
        let (rc, out) = g.lpvmm("tasks {vm} --json")?;
        if rc != 0 {
            return Err(out);
        }
        let v = json(&out)?;
        count = v["list"]["tasks"].as_array().map(|a| a.len()).unwrap_or(0) as f64;
        tasks_us.push(v["pause"]["paused_us"].as_f64().unwrap_or(f64::NAN));
        let (rc, out) = g.lpvmm("stack {vm} --json")?;
        if rc != 0 {
            return Err(out);
        }
        stacks_us.push(
            json(&out)?["pause"]["paused_us"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
    }
    // The guest's own cost of the same stacks: read every /proc/PID/stack.
    // bash's $EPOCHREALTIME: seconds.microseconds (busybox date has no %N).
    let own = g.run(
        "a=$EPOCHREALTIME; for f in /proc/[0-9]*/task/[0-9]*/stack; do cat $f >/dev/null 2>&1; done; \
         b=$EPOCHREALTIME; echo \"$a $b\"",
    )?;
    let t: Vec<f64> = own
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let own_us = match t[..] {
        [a, b] => (b - a) * 1e6,
        _ => f64::NAN,
    };
    eprintln!("{series} +{extra}: tasks pauses {tasks_us:?} stacks pauses {stacks_us:?} guest /proc walk {own_us} us");
    let row = format!(
        "| {series} | {count:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.4} |",
        median(&tasks_us) / 1000.0,
        percentile(&tasks_us, 0.99) / 1000.0,
        median(&stacks_us) / 1000.0,
        percentile(&stacks_us, 0.99) / 1000.0,
        median(&stacks_us) / count,
        own_us / 1000.0,
        median(&stacks_us) / own_us,
    );
    // busybox-static, the guest's, has killall and no pkill.
    g.run("killall spawn; sleep 1; true")?;
    Ok(row)
}
