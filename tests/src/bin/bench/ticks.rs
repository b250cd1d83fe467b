//! `bench ticks [RUNS] [TASKS,...] [MEMORY]`: the pause of an immediate enable and of a
//! per-task enable's first tick with extra tasks, against a bare pause; how many checks
//! were taken early.

use lpvmm_tests::stats::{median, min_max};
use lpvmm_tests::TestHost;

use crate::common::{
    bare_pause_us, counts, held_per_task, kp_build, spawn_tasks, transition_of, wait_no_transition,
};

/// Extra task counts from a comma-separated list (`100,2000` when absent).
pub fn task_counts(list: Option<String>) -> Result<Vec<u32>, String> {
    counts(list, "100,2000", 1, 10_000, "task count")
}

/// The guest-visible pause of checking every task, against a bare pause in the same
/// guest, with `extra` more sleeping processes (`spawn`): RUNS immediate enables of the
/// cmdline fix (one tick checks every task and flips), and RUNS first ticks of a
/// per-task enable of nsleep-cmdline (every task checked; a `sleep` in the patched
/// function holds the rest), each followed by a bare pause (`pause` + `resume`). The
/// guests have `memory` (`lpvmm run --memory`; 512 MiB by default): 6.12 needs 1G for
/// 5,000 more processes.
pub fn ticks(runs: u32, extra_counts: &[u32], memory: Option<&str>) -> Result<(), String> {
    let memory = memory.map(|m| format!("--memory {m}")).unwrap_or_default();
    let files = vec![
        (
            kp_build("nsleep-cmdline")?,
            "/root/nsleep-cmdline.kp".to_string(),
        ),
        (kp_build("cmdline")?, "/root/cmdline.kp".to_string()),
    ];
    let mut host = TestHost::start_with_files(false, &files)?;
    println!("| kernel | tasks | what | pause median (µs) | min–max (µs) | of it: task list / checks / writes / whole tick, medians (µs) | bare pause median (µs) | pause / bare | checks taken early / all | lists walked early / all | tasks read again in the pause |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for series in lpvmm_tests::SERIES {
        let (mut g, _) = host.boot_guest("bench", series, 2, &memory)?;
        let immediate = g.host.file("/root/cmdline.kp");
        let per_task = g.host.file("/root/nsleep-cmdline.kp");
        for &extra in extra_counts {
            spawn_tasks(&mut g, extra)?;
            let mut rows = [
                TickRow::new("immediate enable"),
                TickRow::new("per-task first tick"),
            ];
            for _ in 0..runs {
                let v = transition_of(
                    &g.lpvmm(&format!(
                        "patch {{vm}} {immediate} --consistency immediate --json"
                    ))?
                    .1,
                )?;
                rows[0].add(&v, bare_pause_us(&mut g)?)?;
                g.lpvmm("patch disable {vm} cmdline --consistency immediate")?;
                g.lpvmm("patch unload {vm} cmdline")?;

                let (holder, active) = held_per_task(&mut g, &per_task)?;
                rows[1].add(&active, bare_pause_us(&mut g)?)?;
                g.run(&format!("kill {holder}; wait {holder}; true"))?;
                wait_no_transition(&mut g)?;
                g.lpvmm("patch disable {vm} nsleep-cmdline")?;
                g.lpvmm("patch unload {vm} nsleep-cmdline")?;
            }
            for r in &rows {
                eprintln!(
                    "{series} +{extra}: {}: {:?} bare {:?}",
                    r.what, r.pauses, r.bare
                );
                println!("{}", r.line(series));
            }
            g.run("kill $(pidof spawn); true")?;
        }
        g.poweroff()?;
    }
    Ok(())
}

/// One row of `bench ticks`: the first tick's pause of each run, the bare pause after
/// it, the tasks and how their checks were made.
struct TickRow {
    what: &'static str,
    tasks: u64,
    pauses: Vec<f64>,
    /// The engine's parts of the first tick (`tick_parts[0]`): list, checks, writes,
    /// whole tick.
    parts: [Vec<f64>; 4],
    bare: Vec<f64>,
    early: u64,
    checks: u64,
    lists_early: u64,
    lists: u64,
    /// Tasks of early lists read again in the pause (they had run); `None` from an
    /// lpvmm that read every task again.
    reread: Option<u64>,
}

impl TickRow {
    fn new(what: &'static str) -> Self {
        TickRow {
            what,
            tasks: 0,
            pauses: Vec::new(),
            parts: Default::default(),
            bare: Vec::new(),
            early: 0,
            checks: 0,
            lists_early: 0,
            lists: 0,
            reread: None,
        }
    }

    /// Take a transition's first tick (`v`: its status JSON) and the bare pause after it.
    fn add(&mut self, v: &serde_json::Value, bare_us: f64) -> Result<(), String> {
        let first = v["pauses_us"][0]
            .as_f64()
            .ok_or(format!("a transition without its first pause: {v}"))?;
        // An lpvmm from before early checks has no counts (compared with this one).
        let c = &v["early_checks"];
        if !c.is_null() {
            let n = |k: &str| c[k].as_u64().ok_or(format!("no early_checks.{k}: {v}"));
            self.early += n("confirmed")?;
            self.checks += n("confirmed")? + n("unwound")?;
            self.lists_early += n("lists_confirmed")?;
            self.lists += n("lists_confirmed")? + n("lists_walked")?;
            if let Some(r) = c["tasks_reread"].as_u64() {
                self.reread = Some(self.reread.unwrap_or(0) + r);
            }
        }
        // An lpvmm from before tick parts has none (compared with this one).
        let parts = &v["tick_parts"][0];
        if !parts.is_null() {
            let names = ["list_us", "checks_us", "writes_us", "tick_us"];
            for (i, k) in names.iter().enumerate() {
                let us = parts[k].as_f64().ok_or(format!("no tick_parts.{k}: {v}"))?;
                self.parts[i].push(us);
            }
        }
        self.tasks = v["tasks"].as_u64().unwrap_or(0);
        self.pauses.push(first);
        self.bare.push(bare_us);
        Ok(())
    }

    fn line(&self, series: &str) -> String {
        let (lo, hi) = min_max(&self.pauses);
        let (p, b) = (median(&self.pauses), median(&self.bare));
        let parts = match self.parts[0].is_empty() {
            true => "–".to_string(),
            false => self
                .parts
                .iter()
                .map(|v| format!("{:.0}", median(v)))
                .collect::<Vec<_>>()
                .join(" / "),
        };
        let reread = self.reread.map_or("–".to_string(), |r| r.to_string());
        format!(
            "| {series} | {} | {} | {p:.0} | {lo:.0}–{hi:.0} | {parts} | {b:.0} | {:.1} | {} / {} | {} / {} | {reread} |",
            self.tasks,
            self.what,
            p / b,
            self.early,
            self.checks,
            self.lists_early,
            self.lists
        )
    }
}
