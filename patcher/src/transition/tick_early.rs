//! The engine's side of the checks made before the pause ([`crate::transition::early`]
//! says what they are and why they are sound): the early unwind while the guest runs,
//! and, in the tick's pause, the confirmation of what it read.

use introspection::kernel::Kernel;
use introspection::tasks::{Task, TaskList, TaskReader};
use introspection::{GuestRam, PausedGuest, Unconfirmed};

use crate::engine::Engine;
use crate::transition::dispatch::pending;
use crate::transition::early::{same_list, same_trace, EarlyList, EarlyTraces, Stamp};
use crate::transition::{Check, CheckedCode, EarlyCheckCounts};

impl Engine {
    /// Unwind every task of the running guest that is off its CPU, for the next tick to
    /// confirm (see the module's text). Only while a transition is in progress. Fails
    /// quietly: a tick without early traces unwinds everything in its pause.
    pub fn unwind_early(&mut self, ram: &dyn GuestRam, kernel: &Kernel) {
        self.early = None;
        if self.active.is_none() {
            return;
        }
        // The first tick may assemble trampolines: the assembler's first use is costly.
        crate::transition::dispatch::warm_up();
        let running = Unconfirmed(ram);
        let early = self.with_unwinder(&running, kernel, |reader, unwinder| {
            // The stamp first: a fork or exit during the walk must show in the pause.
            let stamp = reader.list_stamp().ok().flatten();
            let list = reader.list().ok()?;
            // A tick that goes on switching checks only the tasks still to move.
            let checked: Vec<&Task> = match self.still_to_move(&list) {
                Some(pending) => pending,
                None => list.tasks.iter().collect(),
            };
            let mut early = EarlyTraces::default();
            for &before in checked.iter().filter(|t| Stamp::of(t).is_some()) {
                let trace = unwinder.trace(before);
                if let Ok(after) = reader.task(before.addr) {
                    early.keep(before, &after, trace);
                }
            }
            drop(checked);
            early.list = stamp.map(|stamp| EarlyList { stamp, list });
            Some(early.ready(self.next_code()))
        });
        self.early = early;
    }

    /// The tasks the next tick will check, if that is not every task: those not yet
    /// moved, in a per-task transition that is switching with no request waiting.
    fn still_to_move<'l>(&self, list: &'l TaskList) -> Option<Vec<&'l Task>> {
        let t = self.active.as_ref()?;
        if t.request.is_some() {
            return None;
        }
        let (_, map) = t.switching().ok()?;
        let g = self.geometry().ok()?;
        Some(pending(map, &g, list, t.target_is_start()))
    }

    /// Turn verification of early traces on or off (off by default): each confirmed
    /// trace is checked against a fresh unwind in the pause, and the result counted.
    pub fn set_verify_early(&mut self, on: bool) {
        self.verify_early = on;
    }

    /// The task list of the paused guest: the early list brought up to date if its stamp
    /// still holds, else walked and read now (see the module's text); counts into
    /// `counts`. With verification on, a confirmed list is checked against a walk in the
    /// same pause.
    pub(crate) fn confirmed_list(
        &mut self,
        reader: &TaskReader,
        counts: &mut EarlyCheckCounts,
    ) -> Result<TaskList, introspection::tasks::TaskError> {
        let early = self.early.as_mut().and_then(|e| e.list.take());
        let Some(early) = early.filter(|l| reader.list_unchanged_since(l.stamp)) else {
            counts.lists_walked += 1;
            return reader.list();
        };
        counts.lists_confirmed += 1;
        let refreshed = reader.refresh(early.list)?;
        counts.tasks_reread += refreshed.reread as u64;
        if self.verify_early && !reader.list().is_ok_and(|l| same_list(&l, &refreshed.list)) {
            counts.list_mismatches += 1;
        }
        Ok(refreshed.list)
    }

    /// Check `tasks` against `code` in the pause: each early trace that the pause
    /// confirms is taken, with its verdict where it was judged against the same code;
    /// the other tasks are unwound and judged now. Counts into `counts`. The early
    /// traces are used up: they serve this tick only.
    pub(crate) fn unwind_checked(
        &mut self,
        guest: &dyn PausedGuest,
        kernel: &Kernel,
        tasks: &[&Task],
        code: &CheckedCode,
        counts: &mut EarlyCheckCounts,
    ) -> Vec<Check> {
        let started = std::time::Instant::now();
        let mut early = self.early.take();
        let judged = early.as_ref().is_some_and(|e| e.judged_for(code));
        let checks = self.with_unwinder(guest, kernel, |_, unwinder| {
            tasks
                .iter()
                .map(|t| match early.as_mut().and_then(|e| e.take_confirmed(t)) {
                    Some(mut check) => {
                        counts.confirmed += 1;
                        if !judged {
                            check.judge(code);
                        }
                        if self.verify_early {
                            let fresh = unwinder.trace(t);
                            if same_trace(&check.trace, &fresh)
                                && code.verdict(&fresh) == check.unsafe_because
                            {
                                counts.verified += 1;
                            } else {
                                counts.mismatches += 1;
                            }
                        }
                        check
                    }
                    None => {
                        counts.unwound += 1;
                        Check::judged(unwinder.trace(t), code)
                    }
                })
                .collect()
        });
        self.tick_parts.checks_us += crate::transition::tick::micros(started.elapsed());
        checks
    }
}
