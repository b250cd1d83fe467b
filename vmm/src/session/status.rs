//! The patch engine as the wire shows it: `patch status` and its views, built from the
//! engine's state here, in the glue that knows both, so that neither the protocol nor
//! the engine knows the other.

use crate::proto::{
    AreaView, BlockerView, CallbackView, ChangeView, FuncView, ModuleEventView, ObjectView,
    OutcomeView, PatchFuncView, PatchStateView, PatchStatusResult, PatchView, SiteNow, StateView,
    TransitionView, VersionView,
};

/// A patch's state as status shows it: `enabling`/`disabling` while a transition of
/// it runs, else its engine state.
fn state_now(
    active: Option<&patcher::Transition>,
    patch: &str,
    state: patcher::PatchState,
) -> PatchStateView {
    match (active.filter(|t| t.patch == patch), state) {
        (Some(t), _) if t.op == patcher::Op::Enable => PatchStateView::Enabling,
        (Some(_), _) => PatchStateView::Disabling,
        (None, patcher::PatchState::Enabled) => PatchStateView::Enabled,
        (None, patcher::PatchState::Disabled) => PatchStateView::Disabled,
        (None, patcher::PatchState::Replaced) => PatchStateView::Replaced,
    }
}

fn version_name(v: &patcher::Version) -> String {
    match v {
        patcher::Version::Original => "original".into(),
        patcher::Version::Code(c) => format!("{} [{}]", c.name, c.patch),
    }
}

impl BlockerView {
    fn of(b: &patcher::Blocker) -> Self {
        BlockerView {
            pid: b.pid,
            comm: b.comm.clone(),
            reason: b.reason.clone(),
            trace: b.trace.clone(),
        }
    }
}

/// A transition's callbacks: those that returned, then the running one, then the rest.
fn callback_views(c: &patcher::transition::calls::Calls) -> Vec<CallbackView> {
    let view = |call: &patcher::transition::calls::Call, ret, ms| CallbackView {
        kind: call.kind.word().into(),
        object: call.object.clone(),
        func: call.func.clone(),
        ret,
        ms,
        gave_up: None,
    };
    c.ran
        .iter()
        .map(|r| match &r.gave_up {
            Some(why) => CallbackView {
                gave_up: Some(why.clone()),
                ..view(&r.call, None, Some(r.ms))
            },
            None => view(&r.call, Some(r.ret), Some(r.ms)),
        })
        .chain(c.running.iter().map(|(call, _)| view(call, None, None)))
        .chain(c.queue.iter().map(|call| view(call, None, None)))
        .collect()
}

impl TransitionView {
    pub fn of(t: &patcher::Transition) -> Self {
        TransitionView {
            id: t.id,
            patch: t.patch.clone(),
            op: t.op,
            consistency: t.consistency,
            phase: t.phase(),
            reversed: t.reversed,
            timed_out: t.timed_out,
            outcome: OutcomeView::from(&t.outcome),
            failure: match &t.outcome {
                patcher::Outcome::Failed(why) => Some(why.clone()),
                _ => None,
            },
            request: t.request,
            note: t.note.clone(),
            elapsed_ms: t.elapsed_ms,
            timeout_ms: t.timeout_ms,
            ticks: t.ticks,
            backoff_ms: t.backoff_ms,
            tasks: t.tasks,
            moved: t.tasks.saturating_sub(t.pending),
            pending: t.pending,
            blockers: t.blockers.iter().map(BlockerView::of).collect(),
            skipped: t.skipped.iter().map(BlockerView::of).collect(),
            gave_up_on: t.gave_up_on.iter().map(BlockerView::of).collect(),
            functions: t
                .changes
                .iter()
                .map(|c| ChangeView {
                    name: c.name.clone(),
                    from: version_name(&c.from),
                    to: version_name(&c.to),
                    immediate: c.immediate,
                    trampoline: c.trampoline,
                })
                .collect(),
            pauses_us: t.pauses_us.clone(),
            early_checks: t.early_checks,
            tick_parts: t.tick_parts.clone(),
            callbacks: callback_views(&t.calls),
            callback_pauses_us: t.calls.pauses_us.clone(),
        }
    }
}

/// What the site of kernel function `func` holds now: `original`, `jump` (straight to
/// one version) or `trampoline` (a transition dispatches each task).
fn site_now(e: &patcher::Engine, func: u64, trampolines: &[patcher::area::Region]) -> SiteNow {
    let Some(to) = e
        .funcs()
        .find(|s| s.addr == func)
        .and_then(|s| s.jump_target())
    else {
        return SiteNow::Original;
    };
    if trampolines.iter().any(|r| r.contains(to)) {
        SiteNow::Trampoline
    } else {
        SiteNow::Jump
    }
}

impl PatchStatusResult {
    pub fn of(e: &patcher::Engine) -> Self {
        let active = e.active();
        let trampolines = e.trampoline_code();
        PatchStatusResult {
            patches: e
                .patches()
                .iter()
                .map(|p| PatchView::of(p, active))
                .collect(),
            funcs: e
                .function_versions()
                .into_iter()
                .map(|v| FuncView::of(e, v, active, &trampolines))
                .collect(),
            active: active.map(TransitionView::of),
            history: e.history().map(TransitionView::of).collect(),
            area: e.area_layout().map(|a| AreaView::of(a, e.area_use())),
            module_events: e
                .module_events()
                .iter()
                .map(|m| ModuleEventView {
                    module: m.module.clone(),
                    action: m.action.clone(),
                    outcome: m.outcome.clone(),
                    refused: m.refused,
                })
                .collect(),
            boot: Default::default(),
        }
    }
}

impl PatchView {
    fn of(p: &patcher::Patch, active: Option<&patcher::Transition>) -> Self {
        PatchView {
            name: p.name.clone(),
            state: state_now(active, &p.name, p.state),
            forced: p.forced,
            enables: p.enables,
            depends: p.depends.clone(),
            atomic_replace: p.atomic_replace,
            replaced_by: p.replaced_by.clone(),
            orc_entries: p.orc.len(),
            states: p
                .states
                .iter()
                .map(|s| StateView {
                    id: s.id,
                    version: s.version,
                })
                .collect(),
            funcs: p
                .objects
                .iter()
                .flat_map(|o| o.funcs.iter().map(move |f| (o, f)))
                .map(|(o, f)| PatchFuncView {
                    object: o.name.to_string(),
                    old: f.old.to_string(),
                    old_addr: f.old_addr,
                    new_name: f.new_name.clone(),
                    new_addr: f.new_addr,
                    new_size: f.new_size,
                    frame_pointer: f.frame_pointer,
                    immediate: f.immediate,
                })
                .collect(),
            objects: p.objects.iter().map(ObjectView::of).collect(),
            applied_at_boot: None,
        }
    }
}

impl ObjectView {
    fn of(o: &patcher::PatchedObject) -> Self {
        use patcher::patch::ObjectState;
        let (state, module) = match o.state {
            ObjectState::Vmlinux => ("vmlinux", None),
            ObjectState::Loaded { module } => ("loaded", Some(module)),
            ObjectState::Waiting => ("waiting", None),
        };
        ObjectView {
            name: o.name.to_string(),
            state: state.into(),
            module,
            replaces: o.replaces.iter().map(|f| f.old.to_string()).collect(),
        }
    }
}

impl FuncView {
    fn of(
        e: &patcher::Engine,
        v: patcher::FunctionVersions,
        active: Option<&patcher::Transition>,
        trampolines: &[patcher::area::Region],
    ) -> Self {
        FuncView {
            name: v.name,
            addr: v.addr,
            site: v.site,
            visible: v
                .versions
                .iter()
                .find(|x| x.visible)
                .map_or("original".into(), |x| x.patch.clone()),
            versions: v
                .versions
                .into_iter()
                .map(|x| VersionView {
                    state: state_now(active, &x.patch, x.state),
                    patch: x.patch,
                    function: x.function,
                    addr: x.addr,
                    visible: x.visible,
                })
                .collect(),
            site_now: site_now(e, v.addr, trampolines),
            ftrace_hidden: e
                .funcs()
                .any(|s| s.addr == v.addr && s.ftrace_hidden.is_some()),
        }
    }
}

impl AreaView {
    fn of(a: &patcher::area::AreaLayout, u: Option<patcher::engine::AreaUse>) -> Self {
        AreaView {
            phys_start: a.phys.start,
            phys_size: a.phys.size,
            va: a.va,
            code_start: a.code.start,
            code_end: a.code.end,
            code_used: u.map_or(0, |u| u.code.0),
            code_size: a.code.size(),
            rodata_used: u.map_or(0, |u| u.rodata.0),
            rodata_size: a.rodata.size(),
            data_used: u.map_or(0, |u| u.data.0),
            data_size: a.data.size(),
        }
    }
}
