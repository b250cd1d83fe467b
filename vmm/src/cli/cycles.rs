//! `lpvmm bench cycles`: enable and disable loaded patches over and over from one client,
//! as `lpvmm patch enable|disable` would, without starting a process per command (on
//! the nested test host a process start costs more than a transition). The endurance
//! benchmark drives its 10,000 cycles with it (docs/benchmarks.md, "Endurance").

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use patcher::Consistency;
use serde::Serialize;

use crate::cli::print_json;
use crate::control::client::Client;
use crate::proto::{OutcomeView, PatchStatusResult, Request, TransitionStarted, TransitionView};

/// First and longest wait between status requests while a transition runs: most end
/// within a tick or two.
const FIRST_POLL: Duration = Duration::from_millis(1);
const MAX_POLL: Duration = Duration::from_millis(20);

/// What `bench cycles` was asked to do.
pub struct CyclesArgs {
    pub vm: String,
    /// Loaded patches: a cycle enables them in this order, then disables them.
    pub patches: Vec<String>,
    pub cycles: u32,
    /// The number of the first cycle: odd cycles are immediate, even ones per-task.
    pub first: u32,
    pub timeout_ms: Option<u64>,
    pub json: bool,
}

/// What the cycles did: how many ended, each transition's time from request to its end
/// (ms, by consistency), and why the run stopped, if it did.
#[derive(Serialize)]
struct CyclesReport {
    vm: String,
    cycles_done: u32,
    transitions: u64,
    per_task_ms: Vec<u64>,
    immediate_ms: Vec<u64>,
    stopped: Option<String>,
}

pub fn cycles(a: CyclesArgs) -> Result<i32> {
    if a.patches.is_empty() {
        bail!("bench cycles needs at least one loaded patch (--patches NAME,...)");
    }
    let mut client = Client::connect(&a.vm)?;
    let mut r = CyclesReport {
        vm: a.vm.clone(),
        cycles_done: 0,
        transitions: 0,
        per_task_ms: Vec::new(),
        immediate_ms: Vec::new(),
        stopped: None,
    };
    'cycles: for i in a.first..a.first.saturating_add(a.cycles) {
        let consistency = match i % 2 {
            1 => Consistency::Immediate,
            _ => Consistency::PerTask,
        };
        for enable in [true, false] {
            for name in &a.patches {
                let t0 = Instant::now();
                let t = transition(&mut client, name, enable, consistency, a.timeout_ms)?;
                if t.outcome != OutcomeView::Done {
                    r.stopped = Some(format!(
                        "cycle {i}: {} {name} ended {}{}",
                        if enable { "enable" } else { "disable" },
                        t.outcome,
                        t.failure.map(|f| format!(": {f}")).unwrap_or_default()
                    ));
                    break 'cycles;
                }
                let ms = t0.elapsed().as_millis() as u64;
                match consistency {
                    Consistency::Immediate => r.immediate_ms.push(ms),
                    Consistency::PerTask => r.per_task_ms.push(ms),
                }
                r.transitions += 1;
            }
        }
        r.cycles_done += 1;
    }
    let failed = r.stopped.is_some();
    if a.json {
        print_json(&r)?;
    } else {
        println!(
            "cycles done: {} ({} transitions); per-task {}; immediate {}",
            r.cycles_done,
            r.transitions,
            summary(&r.per_task_ms),
            summary(&r.immediate_ms)
        );
        if let Some(why) = &r.stopped {
            println!("stopped: {why}");
        }
    }
    Ok(i32::from(failed))
}

/// Start one transition and wait for its end.
fn transition(
    client: &mut Client,
    name: &str,
    enable: bool,
    consistency: Consistency,
    timeout_ms: Option<u64>,
) -> Result<TransitionView> {
    let name = name.to_string();
    let req = match enable {
        true => Request::PatchEnable {
            name,
            timeout_ms,
            consistency,
        },
        false => Request::PatchDisable {
            name,
            timeout_ms,
            consistency,
        },
    };
    let started: TransitionStarted = client.call(req)?;
    let mut poll = FIRST_POLL;
    loop {
        let s: PatchStatusResult = client.call(Request::PatchStatus)?;
        if let Some(t) = s.history.into_iter().rev().find(|t| t.id == started.id) {
            return Ok(t);
        }
        if s.active.as_ref().is_none_or(|t| t.id != started.id) {
            bail!("transition {} is no longer known to the VM", started.id);
        }
        std::thread::sleep(poll);
        poll = (poll * 2).min(MAX_POLL);
    }
}

/// "median N ms, longest M ms", or "none".
fn summary(ms: &[u64]) -> String {
    if ms.is_empty() {
        return "none".into();
    }
    let mut v = ms.to_vec();
    v.sort_unstable();
    format!(
        "median {} ms, longest {} ms",
        v[v.len() / 2],
        v[v.len() - 1]
    )
}
