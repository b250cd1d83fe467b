//! Callbacks that do not return. A callback is kernel code running in a guest kworker:
//! lpvmm cannot stop it, only stop waiting for it. It gives up on one that has run
//! longer than its limit (the transition's `--timeout`, else [`CALL_TIMEOUT_MS`]), and
//! at once on one whose kworker died in an oops (the guest's taint gained `D` since
//! the call was queued, and the task is gone or dead). Then:
//!
//! - the guest-call machinery that ran it is set aside (its work item is stuck behind
//!   the hung or dead worker for good) and a fresh one is installed, so that the
//!   callbacks still to come run;
//! - a "before" callback (pre-patch, pre-unpatch, a state's setup or disable) fails its
//!   transition before anything was written: the enable or disable does not happen, and
//!   the "after" callbacks that undo the "before" ones that returned 0 run, as after a
//!   refusal; an "after" callback lost is reported, and the outcome stands (the switch
//!   was complete);
//! - a hung callback's patch stays loaded while the callback runs (its code is on the
//!   kworker's stack): unload is refused until the call returns. A dead kworker runs
//!   nothing, so its patch may go.

use introspection::kernel::Kernel;
use introspection::{GuestRam, Unconfirmed};

use crate::engine::Engine;
use crate::guestcall::{CallState, GuestCaller, SetAside};
use crate::load::manifest::CallbackKind;
use crate::taint::{guest_taint, taint_letters, TAINT_DIE};
use crate::transition::calls::{Call, CallRan};
use crate::transition::{Op, Outcome, Stage, Transition};
use crate::{GuestControl, KpError};

/// How long a callback may run when its transition has no timeout.
pub const CALL_TIMEOUT_MS: u64 = 60_000;
/// Why a call was given up on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Lost {
    Hung { ms: u64, stack: String },
    Died { taint: u64 },
}

impl Lost {
    fn describe(&self) -> String {
        match self {
            Lost::Hung { ms, stack } => {
                format!("did not return within {:.1} s{stack}", *ms as f64 / 1000.0)
            }
            Lost::Died { taint } => format!(
                "died in an oops in its kworker (the guest's kernel is now tainted {}, \
                 {taint:#x}; its log has the oops)",
                taint_letters(*taint)
            ),
        }
    }
}

/// Whether the task at `task` is on the guest's task list and not dead.
fn task_alive(ram: &dyn GuestRam, kernel: &Kernel, task: u64) -> bool {
    let running = Unconfirmed(ram);
    let reader = introspection::tasks::TaskReader::new(kernel, &running);
    match reader.list() {
        Ok(list) => list
            .tasks
            .iter()
            .any(|t| t.addr == task && !matches!(t.state, 'X' | 'Z')),
        Err(_) => true,
    }
}

/// The "before" callbacks: a transition that loses one does not happen.
fn before(kind: CallbackKind) -> bool {
    matches!(
        kind,
        CallbackKind::PrePatch
            | CallbackKind::PreUnpatch
            | CallbackKind::StateSetup
            | CallbackKind::StateDisable
    )
}

impl Engine {
    /// The running call's kworker died in an oops: the guest's taint since the call was
    /// queued gained `D` and the task is gone. Returns the taint.
    pub(crate) fn call_died(
        &self,
        guest: &impl GuestControl,
        kernel: &Kernel,
        taint_at_queue: u64,
        task: u64,
    ) -> Option<u64> {
        guest.running(|ram| {
            let taint = guest_taint(ram, kernel)?;
            let oops = taint & TAINT_DIE != 0 && taint_at_queue & TAINT_DIE == 0;
            (oops && !task_alive(ram, kernel, task)).then_some(taint)
        })
    }

    /// Stop waiting for `call` (queued at `since`): set its machinery aside and install
    /// a fresh one, record it, and fail the transition if it was a "before" callback.
    pub(crate) fn give_up_call(
        &mut self,
        t: &mut Transition,
        (call, since, now_ms): (Call, u64, u64),
        lost: Lost,
        guest: &mut impl GuestControl,
        kernel: &Kernel,
    ) -> Result<(), KpError> {
        self.rearm_caller(guest, kernel, &t.patch, &call, &lost)?;
        let why = lost.describe();
        if before(call.kind) {
            let stays = match lost {
                Lost::Hung { .. } => {
                    "; the patch stays loaded until the callback returns (unload is refused \
                     while it runs)"
                }
                Lost::Died { .. } => "",
            };
            let not = match t.op {
                Op::Enable => "not enabled",
                Op::Disable => "not disabled",
            };
            t.outcome = Outcome::Failed(format!(
                "the {} callback {} of {} {why}: {not}{stays}",
                call.kind.word(),
                call.func,
                call.object
            ));
            t.stage = Stage::Ended;
            t.calls.queue.clear();
            t.calls.unload_after = t.unload_on_failure && matches!(lost, Lost::Died { .. });
        }
        t.note = None;
        t.calls.ran.push(CallRan {
            call,
            ret: 0,
            ms: now_ms.saturating_sub(since),
            gave_up: Some(why),
        });
        Ok(())
    }

    /// Set the guest-call machinery aside and install a fresh one, in one pause.
    fn rearm_caller(
        &mut self,
        guest: &mut impl GuestControl,
        kernel: &Kernel,
        patch: &str,
        call: &Call,
        lost: &Lost,
    ) -> Result<(), KpError> {
        let (Some(old), Some(mut area)) = (self.caller.clone(), self.area.clone()) else {
            return Err(KpError::State(
                "callbacks without the guest-call machinery".into(),
            ));
        };
        let (fresh, _) = guest
            .paused(|g| self.journaled(g, |_, g| GuestCaller::install(g, kernel, &mut area)))
            .map_err(KpError::Pause)?;
        self.caller = Some(fresh?);
        self.area = Some(area);
        self.generation += 1;
        self.set_aside.push(SetAside {
            caller: old,
            patch: patch.to_string(),
            func: call.func.clone(),
            died: matches!(lost, Lost::Died { .. }),
        });
        Ok(())
    }

    /// Why patch `name` cannot be unloaded: one of its callbacks given up on is still
    /// running in the guest.
    pub(crate) fn callback_still_running(&self, ram: &dyn GuestRam, name: &str) -> Option<String> {
        let area = self.area.as_ref()?;
        self.set_aside
            .iter()
            .filter(|s| s.patch == name && !s.died)
            .find_map(|s| match s.caller.state(ram, area) {
                Ok(CallState::Done { .. }) => None,
                Ok(CallState::Running { task }) => Some(format!(
                    "its callback {} is still running in the guest's kworker at task \
                     {task:#x} (lpvmm gave up waiting for it); unload it once it returned",
                    s.func
                )),
                _ => Some(format!(
                    "its callback {} was given up on and has not returned",
                    s.func
                )),
            })
    }
}
