//! A transition: one patch going from one state to the other, task by task (the kernel
//! livepatch's transition.c, driven from outside).
//!
//! The whole transition is one value, [`Transition`], advanced by one engine call per
//! *tick* ([`crate::Engine::tick`]), each made while the guest is paused. The VMM only
//! decides when to pause (at [`crate::Engine::due`]) and measures how long.
//!
//! - **Immediate** consistency: a tick checks every task; if none is in the code it
//!   would leave, every site flips in that tick, else nothing changes and the tick is
//!   retried (backing off) until the timeout.
//! - **Per-task** consistency (the default): the first tick checks every task, moves
//!   every task that is at a safe point, and puts the rest on the *task map* of a
//!   trampoline bank ([`crate::transition::dispatch`]); from then on each site dispatches every
//!   call by the caller's bit. Later ticks check only the tasks still on the starting
//!   version and move each one that is at a safe point. When none is left, every site
//!   becomes a direct jump to its target (no dispatch left).
//! - A function marked immediate flips in the first tick even in a per-task patch.
//! - **Reverse** turns a transition around in one tick: the target becomes the
//!   starting version, tasks that had moved go back as soon as their stacks allow.
//! - **Force** completes it in one tick without checks; the patch is marked forced
//!   and its code is never unloaded.
//!
//! A task is at a safe point when it runs in user mode, or its kernel stack is reliable
//! and holds none of the code it would leave, and it is not inside a trampoline.

use std::time::Duration;

use introspection::stack::{StackTrace, TraceStart};
use serde::{Deserialize, Serialize};

use crate::area::Region;
use crate::funcs::{CodeRange, FuncChange, Version};
use crate::transition::dispatch::TaskMap;
use crate::KpError;

pub mod banks;
pub mod calls;
pub mod dispatch;
pub mod early;
pub mod tick;

/// First retry after this, doubling up to `MAX_BACKOFF`.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(10);
pub const MAX_BACKOFF: Duration = Duration::from_millis(1000);
/// Immediate mode gives up after this unless told otherwise.
pub const DEFAULT_IMMEDIATE_TIMEOUT: Duration = Duration::from_secs(30);
/// Guest-visible pauses kept per transition (for status and benchmarks).
const MAX_PAUSES_KEPT: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Enable,
    Disable,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// Tasks move one by one, each at its own safe point.
    #[default]
    PerTask,
    /// Every task at a safe point in one pause, or nothing changes.
    Immediate,
}

impl std::str::FromStr for Consistency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "per-task" | "per_task" => Ok(Consistency::PerTask),
            "immediate" => Ok(Consistency::Immediate),
            _ => Err(format!("consistency '{s}': say per-task or immediate")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Nothing written yet (no tick has found a way to start).
    Waiting,
    /// Sites dispatch through trampolines; some tasks are still on the starting side.
    Switching,
    Ended,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Still in progress.
    Pending,
    /// Every task runs the target.
    Done,
    /// Completed without checks (`force`); the tasks it skipped are in `skipped`.
    Forced,
    /// Turned around and back where it started.
    Reversed,
    /// Gave up (immediate) or reversed by its timeout (per-task): the guest is as it
    /// was before.
    TimedOut,
    /// Could not go on (the guest or patch area changed underneath): see the message.
    Failed(String),
}

/// What a client asked of the transition in progress; applied at the next tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    Reverse,
    Force,
}

/// A task that is not at a safe point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocker {
    pub pid: i32,
    pub comm: String,
    pub reason: String,
    pub trace: StackTrace,
}

/// Where a transition is, holding what that stage needs: a switching transition always
/// has its trampoline bank and its task map, and nothing else has either.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Nothing written yet (no tick has found a way to start).
    Waiting,
    /// Sites dispatch through the trampolines of `bank`, which read `map` to send each
    /// task to its side; some tasks are still on the starting side.
    Switching {
        bank: usize,
        map: TaskMap,
    },
    Ended,
}

impl Stage {
    pub(crate) fn phase(&self) -> Phase {
        match self {
            Stage::Waiting => Phase::Waiting,
            Stage::Switching { .. } => Phase::Switching,
            Stage::Ended => Phase::Ended,
        }
    }
}

/// One patch going from one state to the other.
#[derive(Clone, Debug)]
pub struct Transition {
    pub id: u64,
    pub patch: String,
    pub op: Op,
    pub consistency: Consistency,
    pub timeout_ms: Option<u64>,
    /// A patch loaded by the same request is unloaded if the transition does not
    /// complete.
    pub unload_on_failure: bool,
    pub changes: Vec<FuncChange>,
    pub(crate) stage: Stage,
    /// Heading back to where it started.
    pub reversed: bool,
    /// Reversed because its timeout passed.
    pub timed_out: bool,
    pub outcome: Outcome,
    /// On the engine's clock (the VMM's), ms.
    pub started_ms: u64,
    pub elapsed_ms: u64,
    pub ticks: u32,
    pub next_ms: u64,
    pub backoff_ms: u64,
    /// Tasks in the guest at the last tick.
    pub tasks: usize,
    /// Of those, not yet on the target.
    pub pending: usize,
    /// Why each pending task could not move at the last tick.
    pub blockers: Vec<Blocker>,
    /// For a forced transition: the tasks moved without a check.
    pub skipped: Vec<Blocker>,
    /// For a transition that timed out: what held each pending task at its last tick
    /// (a per-task transition then turns back, and `blockers` follows the way back).
    pub gave_up_on: Vec<Blocker>,
    /// Guest-visible pause of each tick, µs.
    pub pauses_us: Vec<u64>,
    pub request: Option<Request>,
    /// Something about the last tick a person should know (a retried failure, a wait).
    pub note: Option<String>,
    /// How its task checks were made: confirmed early traces against unwinds in the
    /// pause (patcher/src/transition/early.rs).
    pub early_checks: EarlyCheckCounts,
    /// The engine's part of each tick's pause (as many as `pauses_us`, in order).
    pub tick_parts: Vec<TickParts>,
    /// The patch's callbacks around this transition ([`crate::callbacks`]).
    pub calls: calls::Calls,
}

/// Where the engine's part of one tick's pause went, µs, as the engine measured it. The
/// rest of the tick's pause (`pauses_us`) is the VMM's: parking and resuming the vCPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TickParts {
    /// Reading the task list (every task's fields, each vCPU's current task).
    pub list_us: u64,
    /// Checking tasks: confirming early traces and unwinding the rest.
    pub checks_us: u64,
    /// Checking and writing the guest's code and data: the sites, ftrace's records,
    /// trampolines, the task map.
    #[serde(default)]
    pub writes_us: u64,
    /// The whole tick: the three above, then deciding who moves.
    pub tick_us: u64,
}

/// What a tick that needs a switching transition's bank and task map says when the
/// transition is not switching (a bug of the engine's, retried rather than a panic).
fn not_switching(id: u64, patch: &str) -> KpError {
    KpError::State(format!(
        "transition {id} of {patch} is not switching tasks: no task map"
    ))
}

/// Wait after the `ticks`-th blocked tick: doubling from FIRST_BACKOFF.
pub fn backoff_after(ticks: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << (ticks.clamp(1, 16) - 1))
        .min(MAX_BACKOFF)
}

impl Transition {
    pub fn new(
        id: u64,
        patch: &str,
        op: Op,
        consistency: Consistency,
        timeout: Option<Duration>,
        changes: Vec<FuncChange>,
        now_ms: u64,
    ) -> Self {
        let timeout = match consistency {
            Consistency::Immediate => Some(timeout.unwrap_or(DEFAULT_IMMEDIATE_TIMEOUT)),
            Consistency::PerTask => timeout,
        };
        Transition {
            id,
            patch: patch.to_string(),
            op,
            consistency,
            timeout_ms: timeout.map(|t| t.as_millis() as u64),
            unload_on_failure: false,
            changes,
            stage: Stage::Waiting,
            reversed: false,
            timed_out: false,
            outcome: Outcome::Pending,
            started_ms: now_ms,
            elapsed_ms: 0,
            ticks: 0,
            next_ms: now_ms,
            backoff_ms: 0,
            tasks: 0,
            pending: 0,
            blockers: Vec::new(),
            skipped: Vec::new(),
            gave_up_on: Vec::new(),
            pauses_us: Vec::new(),
            request: None,
            note: None,
            early_checks: Default::default(),
            tick_parts: Vec::new(),
            calls: calls::Calls::default(),
        }
    }

    pub fn phase(&self) -> Phase {
        self.stage.phase()
    }

    /// The bank and task map of a switching transition; an error for one that is not,
    /// which a tick that needs them turns into a retry.
    pub(crate) fn switching(&self) -> Result<(usize, &TaskMap), KpError> {
        match &self.stage {
            Stage::Switching { bank, map } => Ok((*bank, map)),
            _ => Err(not_switching(self.id, &self.patch)),
        }
    }

    pub(crate) fn switching_mut(&mut self) -> Result<(usize, &mut TaskMap), KpError> {
        match &mut self.stage {
            Stage::Switching { bank, map } => Ok((*bank, map)),
            _ => Err(not_switching(self.id, &self.patch)),
        }
    }

    /// The trampoline bank a switching transition dispatches through.
    pub fn bank(&self) -> Option<usize> {
        match &self.stage {
            Stage::Switching { bank, .. } => Some(*bank),
            _ => None,
        }
    }

    /// Its outcome is final and its callbacks, if it has any, all ran.
    pub fn finished(&self) -> bool {
        self.outcome != Outcome::Pending && self.calls.settled()
    }

    /// The version every task runs at the end, for `c`.
    pub fn target<'c>(&self, c: &'c FuncChange) -> &'c Version {
        if self.reversed {
            &c.from
        } else {
            &c.to
        }
    }

    /// Tasks on the starting version are the ones still to move (forward), or the
    /// ones already back (reversed).
    pub fn target_is_start(&self) -> bool {
        self.reversed
    }

    /// Past its timeout at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.timeout_ms
            .is_some_and(|t| now_ms.saturating_sub(self.started_ms) >= t)
    }

    /// Would a blocked tick at `now_ms` be the last one before the timeout?
    pub fn last_chance(&self, now_ms: u64) -> bool {
        let next = backoff_after(self.ticks + 1).as_millis() as u64;
        self.timeout_ms
            .is_some_and(|t| now_ms.saturating_sub(self.started_ms) + next > t)
    }

    /// Record a tick at `now_ms` that left `blockers`; schedules the next one.
    pub(crate) fn record_blocked(&mut self, now_ms: u64, blockers: Vec<Blocker>) {
        self.blockers = blockers;
        let wait = backoff_after(self.ticks).as_millis() as u64;
        self.backoff_ms = wait;
        self.next_ms = now_ms + wait;
    }

    pub(crate) fn note_tick_parts(&mut self, parts: TickParts) {
        if self.tick_parts.len() < MAX_PAUSES_KEPT {
            self.tick_parts.push(parts);
        }
    }

    pub(crate) fn note_pause(&mut self, pause: Duration) {
        if self.pauses_us.len() < MAX_PAUSES_KEPT {
            self.pauses_us.push(pause.as_micros() as u64);
        }
    }
}

/// The code a tick checks every stack against: what a task leaves when it moves, and
/// the trampolines (a task inside one is never moved). The patch driver's early checks
/// judge their traces against the code the next tick will check, so that the tick can
/// take those verdicts as they are when its code is the same.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CheckedCode {
    pub leaving: Vec<CodeRange>,
    pub tramps: Vec<Region>,
}

impl CheckedCode {
    /// Why the task of `trace` may not move, `None` at a safe point.
    pub fn verdict(&self, trace: &StackTrace) -> Option<String> {
        unsafe_because(trace, &self.leaving, &self.tramps)
    }
}

/// One task checked by a tick: its stack, and why it may not move (`None`: it may).
/// A tick's passes over thousands of checks read only the fields here, never the boxed
/// trace (on the nested test host each trace touched in the pause is a miss of the
/// emulated TLB); the trace is read for blockers and for checks made in the pause.
#[derive(Clone, Debug)]
pub(crate) struct Check {
    /// The task's `task_struct` (the trace's own `task`).
    pub task: u64,
    pub trace: Box<StackTrace>,
    pub unsafe_because: Option<String>,
    /// Its stack is reliable and in no trampoline: it is not inside a retired bank.
    pub out_of_trampolines: bool,
}

impl Check {
    /// A check of `trace` not judged yet (see [`Check::judge`]).
    pub fn unjudged(trace: StackTrace) -> Check {
        Check {
            task: trace.task,
            trace: Box::new(trace),
            unsafe_because: None,
            out_of_trampolines: false,
        }
    }

    /// A check of `trace` judged against `code`.
    pub fn judged(trace: StackTrace, code: &CheckedCode) -> Check {
        let mut c = Check::unjudged(trace);
        c.judge(code);
        c
    }

    /// Judge the trace against `code`.
    pub fn judge(&mut self, code: &CheckedCode) {
        self.unsafe_because = code.verdict(&self.trace);
        self.out_of_trampolines = self.trace.reliable
            && !code
                .tramps
                .iter()
                .any(|r| self.trace.touches(r.start, r.end));
    }
}

/// Why `trace` is not at a safe point for leaving `leaving`, or `None` when it is.
pub fn unsafe_because(
    trace: &StackTrace,
    leaving: &[CodeRange],
    dispatch: &[Region],
) -> Option<String> {
    if matches!(trace.start, TraceStart::UserMode(_)) {
        return None;
    }
    if !trace.reliable {
        return Some(format!(
            "its stack is unreliable ({})",
            trace.problem.as_deref().unwrap_or("unknown")
        ));
    }
    if dispatch.iter().any(|r| trace.touches(r.start, r.end)) {
        return Some("it is inside an lpvmm trampoline".into());
    }
    leaving
        .iter()
        .find(|r| trace.touches(r.start, r.end))
        .map(|r| format!("{} is on its stack", r.name))
}

/// How a transition's checks were made, summed over its ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarlyCheckCounts {
    /// Task checks that took an early trace, confirmed in the pause.
    pub confirmed: u64,
    /// Task checks unwound in the pause.
    pub unwound: u64,
    /// With verification on: confirmed traces that a fresh unwind in the pause also gave.
    pub verified: u64,
    /// With verification on: confirmed traces that differed from a fresh unwind (a bug).
    pub mismatches: u64,
    /// Task lists read in the pause at the addresses an early walk found (the list's
    /// stamp confirmed that no task appeared or went away since).
    #[serde(default)]
    pub lists_confirmed: u64,
    /// Task lists walked in the pause (no early walk, or its stamp did not hold).
    #[serde(default)]
    pub lists_walked: u64,
    /// With verification on: confirmed lists that differed from a walk in the same
    /// pause (a bug).
    #[serde(default)]
    pub list_mismatches: u64,
    /// Tasks of confirmed lists that had run since the early read and were read again
    /// in the pause (the others: one read of their switch count).
    #[serde(default)]
    pub tasks_reread: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use introspection::stack::Frame;

    fn trace(start: TraceStart, addrs: &[u64], reliable: bool) -> StackTrace {
        StackTrace {
            pid: 7,
            tgid: 7,
            comm: "t".into(),
            state: 'S',
            task: 0,
            start,
            frames: addrs
                .iter()
                .map(|&a| Frame {
                    addr: a,
                    symbol: None,
                    function: None,
                    interrupted: false,
                    sched: false,
                })
                .collect(),
            reliable,
            problem: (!reliable).then(|| "test".into()),
        }
    }

    #[test]
    fn safe_points() {
        let old = [CodeRange {
            start: 0x1000,
            end: 0x1100,
            name: "f".into(),
        }];
        let tramp = [Region {
            start: 0x9000,
            end: 0x9100,
        }];
        let check = |t: &StackTrace| unsafe_because(t, &old, &tramp);
        assert_eq!(check(&trace(TraceStart::UserMode(0), &[], true)), None);
        assert_eq!(check(&trace(TraceStart::Saved, &[0x2000], true)), None);
        assert_eq!(
            check(&trace(TraceStart::Saved, &[0x2000, 0x1050], true)).unwrap(),
            "f is on its stack"
        );
        assert!(check(&trace(TraceStart::Saved, &[0x2000], false))
            .unwrap()
            .contains("unreliable"));
        assert!(check(&trace(TraceStart::Vcpu(1), &[0x9010], true))
            .unwrap()
            .contains("trampoline"));
    }

    #[test]
    fn backs_off_doubling_up_to_a_second() {
        assert_eq!(backoff_after(1), Duration::from_millis(10));
        assert_eq!(backoff_after(2), Duration::from_millis(20));
        assert_eq!(backoff_after(30), MAX_BACKOFF);
        let mut t = Transition::new(
            1,
            "p",
            Op::Enable,
            Consistency::Immediate,
            Some(Duration::from_millis(100)),
            vec![],
            1000,
        );
        assert!(!t.last_chance(1000));
        t.ticks = 3;
        assert!(t.last_chance(1070));
        assert!(t.expired(1100));
        let p = Transition::new(2, "p", Op::Enable, Consistency::PerTask, None, vec![], 0);
        assert!(
            !p.expired(u64::MAX / 2),
            "per-task waits for ever by default"
        );
    }
}
