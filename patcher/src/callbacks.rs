//! A patch's callbacks around its transitions (the kernel livepatch's `klp_callbacks`,
//! core.c and transition.c): pre-patch before an enable's first tick, post-patch once it
//! completed; pre-unpatch before a disable, post-unpatch once it completed; and after an
//! enable that was refused, reversed or timed out, post-unpatch for the objects whose
//! pre-patch ran. A pre-patch that returns non-zero refuses the enable before anything
//! is written. Only the transition's own patch's callbacks run (on atomic replace, the
//! cumulative patch's alone), each for an object that is there (vmlinux, a loaded
//! module).
//!
//! Each callback runs in the guest ([`crate::guestcall`]): queued in a short pause, then
//! followed while the guest runs. The transition waits for it: its first tick comes
//! after the last "before" callback returned, and it ends (leaves `patch status`'s
//! active place) after the last "after" one. A patch loaded for its enable is unloaded,
//! when the enable fails, only after its post-unpatch callbacks ran.

use introspection::kernel::Kernel;

use crate::engine::Engine;
use crate::guestcall::CallState;
use crate::load::manifest::CallbackKind;
use crate::lost_calls::{Lost, CALL_TIMEOUT_MS};
use crate::patch::Patch;
use crate::transition::calls::{Call, CallRan, Calls};
use crate::transition::{Op, Outcome, Transition};
use crate::{GuestControl, KpError};

/// How often a running callback is looked at, ms.
const POLL_MS: u64 = 10;
/// A callback running longer than this is reported with its kworker's stack (it cannot
/// be cancelled: the transition waits for it, as the kernel's waits for its own).
const SLOW_CALL_MS: u64 = 10_000;

/// The "after" callbacks for how `t` ended.
fn after(p: &Patch, t: &Transition) -> Vec<Call> {
    let completed = matches!(t.outcome, Outcome::Done | Outcome::Forced);
    let states = &t.calls.states;
    let ok = |kind: CallbackKind| -> Vec<String> {
        t.calls
            .ran
            .iter()
            .filter(|r| r.call.kind == kind && r.ret == 0 && r.gave_up.is_none())
            .map(|r| r.call.object.clone())
            .collect()
    };
    let only = |calls: Vec<Call>, ok: &[String]| -> Vec<Call> {
        calls
            .into_iter()
            .filter(|c| ok.contains(&c.object))
            .collect()
    };
    let (objects, state_calls) = match (t.op, completed) {
        (Op::Enable, true) => (
            Calls::of(p, CallbackKind::PostPatch),
            Calls::of_states(p, CallbackKind::StateEnable, states),
        ),
        // Back to where it started: undo what the "before" callbacks that succeeded did,
        // and free what its states' shadow variables it allocated.
        (Op::Enable, false) => (
            only(
                Calls::of(p, CallbackKind::PostUnpatch),
                &ok(CallbackKind::PrePatch),
            ),
            only(
                Calls::of_states(p, CallbackKind::StateRelease, states),
                &ok(CallbackKind::StateSetup),
            )
            .into_iter()
            .chain(Calls::of_states(p, CallbackKind::ShadowFree, states))
            .collect(),
        ),
        (Op::Disable, true) => (
            Calls::of(p, CallbackKind::PostUnpatch),
            Calls::of_states(p, CallbackKind::StateRelease, states)
                .into_iter()
                .chain(Calls::of_states(p, CallbackKind::ShadowFree, states))
                .chain(Calls::of_exit(p))
                .collect(),
        ),
        (Op::Disable, false) => (
            Calls::of(p, CallbackKind::PostPatch),
            only(
                Calls::of_states(p, CallbackKind::StateEnable, states),
                &ok(CallbackKind::StateDisable),
            ),
        ),
    };
    objects.into_iter().chain(state_calls).collect()
}

impl Engine {
    /// Whether the active transition is running its callbacks rather than ticking: its
    /// "before" callbacks (no tick yet), or its "after" ones (its outcome is final).
    pub(crate) fn in_callbacks(&self) -> bool {
        self.active.as_ref().is_some_and(|t| {
            let c = &t.calls;
            c.any && ((t.ticks == 0 && !c.idle()) || t.outcome != Outcome::Pending)
        })
    }

    /// Once `t`'s outcome is final, its "after" callbacks (none: it may end now).
    pub(crate) fn queue_after_calls(&self, t: &mut Transition) {
        if t.outcome == Outcome::Pending || t.calls.after_queued || !t.calls.any {
            return;
        }
        if let Ok(p) = self.patch(&t.patch) {
            t.calls.queue = after(p, t).into();
        }
        t.calls.after_queued = true;
    }

    /// One step of the active transition's callbacks: look at the running one, or
    /// queue the next (one short pause), or, once all ran, end the transition. Returns
    /// when to come back.
    pub(crate) fn drive_calls(
        &mut self,
        guest: &mut impl GuestControl,
        kernel: &Kernel,
        now_ms: u64,
    ) -> Result<Option<u64>, KpError> {
        let Some(mut t) = self.active.take() else {
            return Ok(None);
        };
        let r = self.step_calls(&mut t, guest, kernel, now_ms);
        if t.outcome != Outcome::Pending && t.calls.settled() {
            let unload = t.calls.unload_after.then(|| t.patch.clone());
            self.end(t);
            if let Some(name) = unload {
                guest
                    .paused(|g| self.unload(g, kernel, &name))
                    .map_err(KpError::Pause)?
                    .0?;
            }
            return r.map(|_| self.due());
        }
        if let Err(e) = &r {
            t.note = Some(format!("callbacks: {e}; trying again"));
        }
        t.next_ms = now_ms + POLL_MS;
        self.active = Some(t);
        Ok(self.due())
    }

    fn step_calls(
        &mut self,
        t: &mut Transition,
        guest: &mut impl GuestControl,
        kernel: &Kernel,
        now_ms: u64,
    ) -> Result<(), KpError> {
        if t.calls.running.is_some() {
            return self.look_at_call(t, guest, kernel, now_ms);
        }
        self.queue_after_calls(t);
        let Some(call) = t.calls.queue.pop_front() else {
            return Ok(());
        };
        match self.queue_call(guest, kernel, &call) {
            Ok(pause_us) => {
                t.calls.running = Some((call, now_ms));
                t.calls.pauses_us.push(pause_us);
                t.calls.taint_at_queue = guest
                    .running(|ram| crate::taint::guest_taint(ram, kernel))
                    .unwrap_or(0);
                Ok(())
            }
            Err(e) => {
                t.calls.queue.push_front(call);
                Err(e)
            }
        }
    }

    /// Queue `call` on guest CPU 0 in a pause, then interrupt that CPU.
    fn queue_call(
        &mut self,
        guest: &mut impl GuestControl,
        kernel: &Kernel,
        call: &Call,
    ) -> Result<u64, KpError> {
        let (Some(caller), Some(area)) = (self.caller.clone(), self.area.clone()) else {
            return Err(KpError::State(
                "callbacks without the guest-call machinery".into(),
            ));
        };
        let (ipi, pause) = guest
            .paused(|g| {
                self.journaled(g, |_, g| {
                    caller.queue(g, kernel, &area, (call.addr, call.arg), 0)
                })
            })
            .map_err(KpError::Pause)?;
        guest.interrupt(ipi?).map_err(KpError::Pause)?;
        Ok(u64::try_from(pause.as_micros()).unwrap_or(u64::MAX))
    }

    /// The stack of the kworker running a slow callback, unwound while the guest runs:
    /// `; its stack: f1 < f2 < ...` (innermost first), or why it could not be read.
    fn kworker_stack(&self, guest: &mut impl GuestControl, kernel: &Kernel, task: u64) -> String {
        let trace = guest.running(|ram| {
            let running = introspection::Unconfirmed(ram);
            self.with_unwinder(&running, kernel, |reader, unwinder| {
                reader.task(task).ok().map(|t| unwinder.trace(&t))
            })
        });
        match trace {
            Some(tr) => {
                let frames: Vec<String> = tr
                    .frames
                    .iter()
                    .take(12)
                    .map(|f| f.symbol.clone().unwrap_or_else(|| format!("{:#x}", f.addr)))
                    .collect();
                let unreliable = match &tr.problem {
                    Some(why) => format!(" (unreliable: {why})"),
                    None => String::new(),
                };
                format!(
                    "; its stack (pid {}): {}{unreliable}",
                    tr.pid,
                    frames.join(" < ")
                )
            }
            None => "; its stack could not be read".into(),
        }
    }

    /// How the running callback is doing: returned (and what that means for the
    /// transition), or still running (a note says for how long, and where).
    fn look_at_call(
        &mut self,
        t: &mut Transition,
        guest: &mut impl GuestControl,
        kernel: &Kernel,
        now_ms: u64,
    ) -> Result<(), KpError> {
        let (Some(caller), Some(area)) = (&self.caller, &self.area) else {
            return Err(KpError::State(
                "callbacks without the guest-call machinery".into(),
            ));
        };
        let state = guest.running(|ram| caller.state(ram, area))?;
        let Some((call, since)) = t.calls.running.take() else {
            return Ok(());
        };
        let ret = match state {
            CallState::Done { ret } => call.returned(ret),
            other => {
                let ms = now_ms.saturating_sub(since);
                if let Some(lost) = self.lost(t, other, ms, guest, kernel) {
                    return self.give_up_call(t, (call, since, now_ms), lost, guest, kernel);
                }
                let mut note = running_note(&call, other, ms);
                if let (CallState::Running { task }, true) = (other, ms >= SLOW_CALL_MS) {
                    note += &self.kworker_stack(guest, kernel, task);
                }
                t.note = Some(note);
                t.calls.running = Some((call, since));
                return Ok(());
            }
        };
        t.note = None;
        let refused =
            matches!(call.kind, CallbackKind::PrePatch | CallbackKind::StateSetup) && ret != 0;
        if refused {
            let which = match call.kind {
                CallbackKind::StateSetup => "state setup",
                _ => "pre-patch",
            };
            t.outcome = Outcome::Failed(format!(
                "the {which} callback {} of {} returned {ret}: not enabled",
                call.func, call.object
            ));
            t.stage = crate::transition::Stage::Ended;
            t.calls.queue.clear();
            t.calls.unload_after = t.unload_on_failure;
        }
        t.calls.ran.push(CallRan {
            call,
            ret,
            ms: now_ms.saturating_sub(since),
            gave_up: None,
        });
        Ok(())
    }

    /// Whether to give up on the running call, `ms` after it was queued: its kworker
    /// died in an oops, or it ran past its limit (the transition's timeout, else
    /// [`CALL_TIMEOUT_MS`]).
    fn lost(
        &self,
        t: &Transition,
        state: CallState,
        ms: u64,
        guest: &mut impl GuestControl,
        kernel: &Kernel,
    ) -> Option<Lost> {
        if let CallState::Running { task } = state {
            if let Some(taint) = self.call_died(guest, kernel, t.calls.taint_at_queue, task) {
                return Some(Lost::Died { taint });
            }
        }
        if ms < t.timeout_ms.unwrap_or(CALL_TIMEOUT_MS) {
            return None;
        }
        let stack = match state {
            CallState::Running { task } => self.kworker_stack(guest, kernel, task),
            _ => "; it never started".into(),
        };
        Some(Lost::Hung { ms, stack })
    }
}

/// What `patch status` says of a callback still running.
fn running_note(call: &Call, state: CallState, ms: u64) -> String {
    let where_ = match state {
        CallState::Running { task } => format!("running in the kworker at task {task:#x}"),
        _ => "queued, not started yet".into(),
    };
    format!(
        "{} callback {} of {} {where_} for {:.1} s",
        call.kind.word(),
        call.func,
        call.object,
        ms as f64 / 1000.0
    )
}
