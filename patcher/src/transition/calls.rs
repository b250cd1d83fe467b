//! The callbacks of one transition, as data: which run next, which runs in the guest,
//! which ran and what they returned ([`crate::callbacks`] runs them).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::load::manifest::CallbackKind;
use crate::patch::{ObjectState, Patch};

/// One callback to run: the patch's function, for one object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    pub kind: CallbackKind,
    /// `vmlinux` or the module's name.
    pub object: String,
    pub func: String,
    pub addr: u64,
    /// Its argument: the module's `struct module`, 0 for vmlinux (a livepatch
    /// module's callbacks: the object's `struct klp_object`).
    pub arg: u64,
    /// It returns nothing (a livepatch module's callbacks but pre_patch): what is in
    /// the return register is not its result.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub void: bool,
}

/// A callback that returned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRan {
    pub call: Call,
    pub ret: i32,
    /// From queueing to its return, ms.
    pub ms: u64,
    /// lpvmm stopped waiting for it, and why (`ret` means nothing then; see
    /// [`crate::lost_calls`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gave_up: Option<String>,
}

/// The callbacks of one transition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Calls {
    /// The patch has callbacks: the transition ends only once the "after" ones ran.
    pub any: bool,
    /// To run next, in order.
    pub queue: VecDeque<Call>,
    /// Running in the guest, since (the engine's clock, ms).
    pub running: Option<(Call, u64)>,
    pub ran: Vec<CallRan>,
    /// The "after" callbacks were queued (the outcome is final).
    pub after_queued: bool,
    /// Unload the patch once the callbacks ran (an enable that loaded it failed).
    pub unload_after: bool,
    /// The states the transition brings in (enable) or ends (disable): those no other
    /// enabled patch holds, whose state callbacks it runs.
    #[serde(default)]
    pub states: Vec<u64>,
    /// The guest's pause to queue each callback, µs, in order.
    #[serde(default)]
    pub pauses_us: Vec<u64>,
    /// The guest's taint when the running callback was queued (an oops since is seen).
    #[serde(default)]
    pub taint_at_queue: u64,
}

impl Call {
    /// What it returned, of the value in the return register: 0 for a callback that
    /// returns nothing.
    pub fn returned<T: Default>(&self, raw: T) -> T {
        if self.void {
            T::default()
        } else {
            raw
        }
    }
}

impl Calls {
    /// Nothing runs or waits to run.
    pub fn idle(&self) -> bool {
        self.queue.is_empty() && self.running.is_none()
    }

    /// The transition may end: no callbacks, or the "after" ones all ran.
    pub fn settled(&self) -> bool {
        !self.any || (self.after_queued && self.idle())
    }
}

impl Calls {
    /// The patch's callbacks of `kind` for its objects that are there, in object order.
    pub fn of(p: &Patch, kind: CallbackKind) -> Vec<Call> {
        p.callbacks
            .iter()
            .filter(|c| c.kind == kind)
            .filter_map(|c| {
                let o = p.objects.iter().find(|o| o.name == c.object)?;
                let module = match o.state {
                    ObjectState::Vmlinux => 0,
                    ObjectState::Loaded { module } => module,
                    ObjectState::Waiting => return None,
                };
                let arg = p.callback_arg(&o.name, module);
                Some(Call {
                    kind,
                    object: o.name.to_string(),
                    func: c.func.clone(),
                    addr: c.addr,
                    arg,
                    void: p.void_callback(kind),
                })
            })
            .collect()
    }

    /// The patch's state callbacks of `kind` for `states`, in the order it declares them.
    pub fn of_states(p: &Patch, kind: CallbackKind, states: &[u64]) -> Vec<Call> {
        p.callbacks
            .iter()
            .filter(|c| c.kind == kind)
            .filter_map(|c| {
                let id = c.state.filter(|id| states.contains(id))?;
                Some(Call {
                    kind,
                    object: format!("state {id}"),
                    func: c.func.clone(),
                    addr: c.addr,
                    arg: id,
                    void: false,
                })
            })
            .collect()
    }

    /// A livepatch module's exit function, run after its disable completed.
    pub fn of_exit(p: &Patch) -> Vec<Call> {
        p.callbacks
            .iter()
            .filter(|c| c.kind == CallbackKind::ModuleExit)
            .map(|c| Call {
                kind: c.kind,
                object: p.name.clone(),
                func: c.func.clone(),
                addr: c.addr,
                arg: 0,
                void: true,
            })
            .collect()
    }

    /// A transition's callbacks of `p`: its objects' `kind` ones (pre-patch,
    /// pre-unpatch), then `state_kind` ones of `states` (setup, disable), to run first.
    pub fn before(
        p: &Patch,
        (kind, state_kind): (CallbackKind, CallbackKind),
        states: Vec<u64>,
    ) -> Calls {
        let mut queue: VecDeque<Call> = Calls::of(p, kind).into();
        queue.extend(Calls::of_states(p, state_kind, &states));
        Calls {
            any: !p.callbacks.is_empty(),
            queue,
            states,
            ..Calls::default()
        }
    }
}
