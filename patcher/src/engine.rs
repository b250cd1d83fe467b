//! The patch engine: loaded patches and their lifetime (the kernel livepatch's core.c),
//! the version stacks of redirected functions ([`crate::funcs`]) and the transition in
//! progress ([`crate::transition`], advanced by [`Engine::tick`] in `transition/tick.rs`).
//!
//! The VMM has two entry points, over a [`GuestControl`] it implements (the running
//! guest's memory, and a pause): [`Engine::load_and_enable`] and, once per tick,
//! [`Engine::drive`]. The VMM decides when to pause; the engine decides everything else.
//! Every refusal happens before the first guest byte is written: a load validates the
//! whole patch, resolves every symbol and checks every site first; `begin` checks the
//! request against the patch stack and writes nothing.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use introspection::kernel::Kernel;
use introspection::GuestRam;
use serde::{Deserialize, Serialize};

use crate::area::{self, AreaLayout, Region};
use crate::funcs::FuncChange;
use crate::funcs::{self, FuncStack, FunctionVersions};
use crate::journal::{Journal, PostMortem};
use crate::load::manifest::{CallbackKind, Manifest, SystemState};
use crate::load::object::PatchObject;
use crate::load::{self, Prepared};
use crate::patch::{Import, Patch, PatchState, PatchedFunc};
use crate::space::Area;
use crate::states::{self, Candidate};
use crate::transition::dispatch::{Bank, Geometry};
use crate::transition::{Consistency, Op, Request, Transition};
use crate::{GuestControl, GuestWriter, KpError};

/// Ended transitions kept for status.
const HISTORY: usize = 32;

/// Trampoline banks and the geometry of their task maps, set up at the first
/// per-task transition that needs them.
#[derive(Clone, Debug)]
pub(crate) struct Dispatch {
    pub(crate) geometry: Geometry,
    pub(crate) current_offset: u64,
    pub(crate) banks: Vec<Bank>,
}

/// What a transition is asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    pub patch: String,
    pub op: Op,
    pub consistency: Consistency,
    pub timeout: Option<Duration>,
    /// Unload the patch if the transition does not complete (a load-and-enable).
    pub unload_on_failure: bool,
}

/// How the enable of a load-and-enable runs ([`Engine::load_and_enable`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnableArgs {
    pub consistency: Consistency,
    pub timeout: Option<Duration>,
}

/// A patch [`Engine::load_and_enable`] loaded: its name, the transition that enables it
/// (if asked), and the load's pause as the guest saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    pub name: String,
    pub transition: Option<u64>,
    pub pause: Duration,
}

#[derive(Clone, Debug, Default)]
pub struct Engine {
    pub(crate) area: Option<Area>,
    pub(crate) patches: Vec<Patch>,
    pub(crate) funcs: BTreeMap<u64, FuncStack>,
    pub(crate) dispatch: Option<Dispatch>,
    pub(crate) active: Option<Transition>,
    pub(crate) history: VecDeque<Transition>,
    next_id: u64,
    /// Traces unwound while the guest ran, for the next tick to confirm.
    pub(crate) early: Option<crate::transition::early::EarlyTraces>,
    /// Check each confirmed early trace against a fresh unwind.
    pub(crate) verify_early: bool,
    /// Where the tick in progress spends its time (see [`crate::TickParts`]).
    pub(crate) tick_parts: crate::transition::TickParts,
    /// What the last tick read and no longer needs, freed by [`Engine::release_spent`].
    pub(crate) spent: Spent,
    /// Every byte the engine wrote to the guest (all writes go through it).
    journal: Journal,
    /// Counts changes to the patch area's space (loads, unloads, the dispatch banks):
    /// a [`Prepared`] patch was linked against one.
    pub(crate) generation: u64,
    /// How the guest's module notifier reaches the VMM, and the notifier once installed
    /// (see [`crate::notifier`]).
    pub(crate) doorbell: Option<crate::notifier::Doorbell>,
    pub(crate) notifier: Option<crate::notifier::Notifier>,
    /// The machinery that runs callbacks in the guest, once a patch with callbacks
    /// was loaded (see [`crate::guestcall`]).
    pub(crate) caller: Option<crate::guestcall::GuestCaller>,
    /// Guest-call machineries set aside with a callback lpvmm gave up on (see
    /// [`crate::lost_calls`]).
    pub(crate) set_aside: Vec<crate::guestcall::SetAside>,
    /// Module records of unloaded patches, kept until no guest reader can be inside
    /// them (see [`crate::guest_module`]).
    pub(crate) retired: Vec<crate::guest_module::Retired>,
    /// What the guest's modules coming and going did to patches, newest last.
    pub(crate) module_events: VecDeque<crate::notifier::ModuleEvent>,
    /// Module events whose callbacks are being called in the loading task.
    pub(crate) events: Vec<crate::notifier::EventRun>,
}

/// What a tick read and no longer needs (task lists, stack traces, early traces), kept
/// to be freed once the guest runs again: freeing its thousands of small allocations in
/// the pause cost the guest about 5 ms with 2,000 tasks (tick parts, 2026-12-04).
#[derive(Clone, Debug, Default)]
pub(crate) struct Spent {
    lists: Vec<introspection::tasks::TaskList>,
    checks: Vec<Vec<crate::transition::Check>>,
    early: Vec<crate::transition::early::EarlyTraces>,
}

impl Spent {
    pub(crate) fn keep(
        &mut self,
        list: introspection::tasks::TaskList,
        checks: Vec<crate::transition::Check>,
    ) {
        self.lists.push(list);
        self.checks.push(checks);
    }

    pub(crate) fn keep_early(&mut self, early: Option<crate::transition::early::EarlyTraces>) {
        self.early.extend(early);
    }
}

impl Engine {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn patches(&self) -> &[Patch] {
        &self.patches
    }

    pub fn patch(&self, name: &str) -> Result<&Patch, KpError> {
        self.patches
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| KpError::NoSuchPatch(name.to_string()))
    }

    pub fn area_layout(&self) -> Option<&AreaLayout> {
        self.area.as_ref().map(|a| &a.layout)
    }

    /// Where the guest's shadow-variable table is, once the patch area is mapped.
    pub fn shadow_table(&self) -> Option<u64> {
        self.area
            .as_ref()
            .filter(|a| a.installed)
            .map(|a| a.shadow_table)
    }

    /// The shadow variables the loaded patches tie to a state (`LPVMM_SHADOW`).
    pub fn shadow_ties(&self) -> Vec<crate::load::manifest::ShadowTie> {
        let mut ties: Vec<_> = Vec::new();
        for t in self.patches.iter().flat_map(|p| &p.shadows) {
            if !ties.contains(t) {
                ties.push(t.clone());
            }
        }
        ties
    }

    /// Functions whose site lpvmm owns now.
    pub fn funcs(&self) -> impl Iterator<Item = &FuncStack> {
        self.funcs.values()
    }

    /// Every function a loaded patch names, with its versions in load order and which
    /// one is visible.
    pub fn function_versions(&self) -> Vec<FunctionVersions> {
        funcs::function_versions(&self.patches)
    }

    /// Space in use in the patch area's code, read-only data and data regions, with
    /// each region's size (bytes).
    pub fn area_use(&self) -> Option<AreaUse> {
        let s = &self.area.as_ref()?.space;
        Some(AreaUse {
            code: (s.code.used_bytes(), s.code.region.size()),
            rodata: (s.rodata.used_bytes(), s.rodata.region.size()),
            data: (s.data.used_bytes(), s.data.region.size()),
        })
    }

    /// The transition in progress.
    pub fn active(&self) -> Option<&Transition> {
        self.active.as_ref()
    }

    /// Ended transitions, oldest first.
    pub fn history(&self) -> impl Iterator<Item = &Transition> {
        self.history.iter()
    }

    /// When the next tick is due, on the clock `begin` and `tick` were given (ms).
    pub fn due(&self) -> Option<u64> {
        let t = self.active.as_ref()?;
        Some(if t.request.is_some() { 0 } else { t.next_ms })
    }

    /// Free what the last tick read (call it once the guest runs again; a tick frees
    /// what an earlier one left if this was not called).
    pub fn release_spent(&mut self) {
        self.spent = Spent::default();
    }

    /// The guest-visible pause of the last tick, as the VMM measured it.
    pub fn note_pause(&mut self, pause: Duration) {
        if let Some(t) = self.active.as_mut() {
            t.note_pause(pause);
        } else if let Some(t) = self.history.back_mut() {
            if t.pauses_us.len() < t.ticks as usize {
                t.note_pause(pause);
            }
        }
    }

    fn ensure_idle(&self, what: &str) -> Result<(), KpError> {
        if let Some(t) = &self.active {
            return Err(KpError::State(format!(
                "cannot {what}: a transition of patch '{}' is in progress (lpvmm patch status; \
                 lpvmm patch reverse or force)",
                t.patch
            )));
        }
        self.ensure_no_module_event(what)
    }

    /// The states `p` holds that no other enabled patch holds: those its enable brings
    /// in, or its disable ends.
    fn states_alone(&self, p: &Patch) -> Vec<u64> {
        p.states
            .iter()
            .map(|s| s.id)
            .filter(|id| {
                !self.patches.iter().any(|q| {
                    q.name != p.name
                        && q.state == PatchState::Enabled
                        && q.states.iter().any(|s| s.id == *id)
                })
            })
            .collect()
    }

    /// Refused while a module loads or unloads in the guest with patch callbacks being
    /// called in its task: the patches they belong to must stay as they are (and their
    /// code where it is) until it is done.
    fn ensure_no_module_event(&self, what: &str) -> Result<(), KpError> {
        match self.events.first() {
            Some(_) => Err(KpError::GuestBusy(format!(
                "cannot {what}: a module is loading or unloading in the guest and patch \
                 callbacks run in its task; try again"
            ))),
            None => Ok(()),
        }
    }

    /// Load a patch and, with `enable`, start enabling it: all or nothing. Everything
    /// the enable would refuse is refused before the load writes; the patch is parsed,
    /// resolved and linked while the guest runs, and one pause checks and writes it. A
    /// load-and-enable whose transition does not complete unloads the patch again.
    pub fn load_and_enable(
        &mut self,
        guest: &mut impl GuestControl,
        kernel: &Kernel,
        kp: &[u8],
        enable: Option<EnableArgs>,
        now_ms: u64,
    ) -> Result<Loaded, KpError> {
        let obj = PatchObject::parse(kp)?;
        self.load_and_enable_object(guest, kernel, obj, enable, now_ms)
    }

    /// [`Engine::load_and_enable`] of a parsed patch (a `.kp`, or a livepatch module read
    /// with [`crate::parse_patch`]).
    pub fn load_and_enable_object(
        &mut self,
        guest: &mut impl GuestControl,
        kernel: &Kernel,
        obj: PatchObject,
        enable: Option<EnableArgs>,
        now_ms: u64,
    ) -> Result<Loaded, KpError> {
        if enable.is_some() {
            self.check_enable_of(&obj)?;
        }
        self.check_loadable(&obj)?;
        let mut tries = 0;
        let (name, pause) = loop {
            tries += 1;
            let prepared = guest.running(|ram| {
                load::prepare(
                    self.area.as_ref(),
                    self.generation,
                    ram,
                    kernel,
                    obj.clone(),
                )
            })?;
            guest.make_resident(&prepared.area_writes());
            match guest.paused(|g| self.load_prepared(g, kernel, prepared))? {
                (Err(KpError::GuestBusy(_)), _) if tries < crate::BUSY_TRIES => {
                    std::thread::sleep(crate::BUSY_WAIT)
                }
                (r, pause) => break (r?, pause),
            }
        };
        let transition = match enable {
            Some(args) => Some(self.begin_enable_or_unload(guest, kernel, &name, args, now_ms)?),
            None => None,
        };
        Ok(Loaded {
            name,
            transition,
            pause,
        })
    }

    /// Begin enabling `name`, just loaded by a load-and-enable; if the stack refuses
    /// (checked before the load, so not expected), unload it again so that nothing is
    /// left behind.
    fn begin_enable_or_unload(
        &mut self,
        guest: &mut impl GuestControl,
        kernel: &Kernel,
        name: &str,
        args: EnableArgs,
        now_ms: u64,
    ) -> Result<u64, KpError> {
        let begin = Begin {
            patch: name.to_string(),
            op: Op::Enable,
            consistency: args.consistency,
            timeout: args.timeout,
            unload_on_failure: true,
        };
        let refused = match self.begin(begin, now_ms) {
            Ok(id) => return Ok(id),
            Err(e) => e,
        };
        let unloaded = guest
            .paused(|g| self.unload(g, kernel, name))
            .map_err(KpError::from)
            .and_then(|(r, _)| r);
        Err(match unloaded {
            Ok(()) => refused,
            Err(u) => KpError::State(format!(
                "{refused}; unloading {name} again failed too, so it stays loaded and \
                 disabled: {u}"
            )),
        })
    }

    /// One tick of the transition in progress, if one is due at `now_ms`: unwind the
    /// guest's tasks while it runs, then pause for the tick, which confirms what it
    /// takes of those unwinds. Returns when the next tick is due (ms), or `None` when no
    /// transition is in progress.
    pub fn drive(
        &mut self,
        guest: &mut impl GuestControl,
        kernel: &Kernel,
        now_ms: u64,
    ) -> Result<Option<u64>, KpError> {
        let Some(due) = self.due() else {
            return Ok(None);
        };
        if now_ms < due {
            return Ok(Some(due));
        }
        if self.in_callbacks() {
            return self.drive_calls(guest, kernel, now_ms);
        }
        guest.running(|ram| self.unwind_early(ram, kernel));
        let ticked = guest.paused(|g| self.tick(g, kernel, now_ms));
        if let Ok(((), pause)) = ticked {
            self.note_pause(pause);
        }
        // The guest runs again: free what the tick read.
        self.release_spent();
        ticked?;
        Ok(self.due())
    }

    /// Validate, link and load a patch (disabled), all in one pause: [`Engine::prepare`]
    /// then [`Engine::load_prepared`]. On error nothing was written.
    pub fn load(
        &mut self,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        kp: &[u8],
    ) -> Result<String, KpError> {
        let prepared = self.prepare(guest.reader(), kernel, kp)?;
        self.load_prepared(guest, kernel, prepared)
    }

    /// Parse, resolve and link a patch while the guest runs: everything of a load that
    /// needs only what the guest decided at boot (its symbols, its CPU features, its
    /// return thunk, where the patch area can be mapped) and the engine's own state. What
    /// it read of the guest, [`Engine::load_prepared`] reads again in the pause.
    pub fn prepare(
        &self,
        ram: &dyn GuestRam,
        kernel: &Kernel,
        kp: &[u8],
    ) -> Result<Prepared, KpError> {
        let obj = PatchObject::parse(kp)?;
        self.check_loadable(&obj)?;
        load::prepare(self.area.as_ref(), self.generation, ram, kernel, obj)
    }

    /// The load's pause: check what must be checked against a stopped guest (every
    /// function's site, and that the boot choices the link used still hold), then write
    /// the linked bytes (and, for the first patch, map the area). A patch prepared
    /// before another load or unload is refused: its place in the area may be taken.
    pub fn load_prepared(
        &mut self,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        prepared: Prepared,
    ) -> Result<String, KpError> {
        self.journaled(guest, |engine, guest| {
            engine.load_journaled(guest, kernel, prepared)
        })
    }

    /// Refusals that need only the engine's state: a name already loaded, or a
    /// dependency that is not.
    fn check_loadable(&self, obj: &PatchObject) -> Result<(), KpError> {
        let m = &obj.manifest;
        if self.patches.iter().any(|p| p.name == m.name) {
            return Err(KpError::AlreadyLoaded(m.name.clone()));
        }
        for d in &m.depends {
            self.patch(d).map_err(|_| {
                KpError::Dependency(format!(
                    "{} depends on patch '{d}', which is not loaded",
                    m.name
                ))
            })?;
        }
        Ok(())
    }

    /// What a prepared patch took from the guest and the engine is still so: the patch
    /// area's space, the patch stack, the guest's boot choices.
    fn check_unchanged(
        &self,
        guest: &dyn introspection::PausedGuest,
        kernel: &Kernel,
        obj: &PatchObject,
        generation: u64,
        boot: &load::link::BootChoices,
    ) -> Result<(), KpError> {
        let name = &obj.manifest.name;
        if generation != self.generation {
            return Err(KpError::State(format!(
                "{name}: the patch area changed (a load, an unload or dispatch banks) since it \
                 was linked; load it again"
            )));
        }
        self.check_loadable(obj)?;
        let now = load::link::BootChoices::of_guest(&kernel.memory(guest), kernel, obj)?;
        if now != *boot {
            return Err(KpError::State(format!(
                "{name}: the guest's CPU features or return thunk changed while it was linked; \
                 not loaded"
            )));
        }
        Ok(())
    }

    /// The module notifier a patch with a module part needs, checked in its load's
    /// pause: the doorbell it rings, the guest's chain free, room after the patch.
    fn plan_notifier(
        &self,
        guest: &dyn introspection::PausedGuest,
        kernel: &Kernel,
        area: &Area,
        runs: crate::space::Runs,
    ) -> Result<(crate::notifier::NotifierPlan, crate::notifier::Doorbell), KpError> {
        let bell = self.doorbell.ok_or_else(|| {
            KpError::Unsupported(
                "patching modules needs the VMM's doorbell for the guest's module notifier, \
                 which this engine was not given"
                    .into(),
            )
        })?;
        let plan = crate::notifier::NotifierPlan::of_guest(guest, kernel)?;
        let mut after = area.clone();
        after.space.take(runs);
        crate::notifier::NotifierPlan::fits(&after)?;
        Ok((plan, bell))
    }

    fn load_journaled(
        &mut self,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        prepared: Prepared,
    ) -> Result<String, KpError> {
        let Prepared {
            obj,
            mut area,
            tables,
            runs,
            mut linked,
            orc,
            boot,
            objects,
            generation,
            module_record,
        } = prepared;
        let m = &obj.manifest;
        self.check_unchanged(guest.reader(), kernel, &obj, generation, &boot)?;
        load::objects::check_same(&kernel.memory(guest.reader()), kernel, &m.name, &objects)?;
        let targets = load::targets(&self.funcs, guest.reader(), kernel, &obj, &objects)?;
        let patched = load::patched_objects(targets, &obj, &linked, &objects)?;
        let modular = !m.modules().is_empty();
        let notifier = match (&self.notifier, modular) {
            (None, true) => Some(self.plan_notifier(guest.reader(), kernel, &area, runs)?),
            _ => None,
        };
        let late = modular
            .then(|| load::late_link(&obj, runs, &boot, &linked, &objects))
            .transpose()?;
        let klp_objects = crate::klp::objects_at(&obj, &linked);
        let klp = kernel.layout.patcher.klp.as_ref();
        crate::klp::set_loaded_mods(&mut linked, &klp_objects, &objects.loaded, klp)?;
        let callbacks = load::callbacks(&obj, &linked);
        let needs_caller = !callbacks.is_empty() && self.caller.is_none();
        let module = module_record.is_some();
        check_guest_machinery(guest.reader(), kernel, needs_caller, module)?;
        // Everything checked: write.
        crate::guest_module::free_quiesced(&mut self.retired, guest, kernel, &mut area);
        write_images(guest, kernel, &mut area, tables.as_ref(), &linked, &m.name)?;
        crate::taint::taint_livepatch(guest, kernel);
        area.space.take(runs);
        let guest_module = module_record
            .map(|(gm, bytes)| write_module(guest, kernel, &mut area, gm, &bytes))
            .transpose()?;
        if let Some((plan, bell)) = notifier {
            self.notifier = Some(plan.install(guest, &mut area, bell)?);
        }
        if needs_caller {
            self.caller = Some(crate::guestcall::GuestCaller::install(
                guest, kernel, &mut area,
            )?);
        }
        self.area = Some(area);
        self.generation += 1;
        self.patches.push(Patch {
            name: m.name.clone(),
            state: PatchState::Disabled,
            forced: false,
            objects: patched,
            depends: m.depends.clone(),
            atomic_replace: m.atomic_replace,
            states: m.states.clone(),
            shadows: m.shadows.clone(),
            replaced_by: None,
            runs,
            orc,
            imports: imports_of(linked),
            enables: 0,
            late,
            callbacks,
            klp_objects,
            guest_module,
        });
        Ok(m.name.clone())
    }

    /// Start a transition (written at its first tick). Refused, changing nothing, when
    /// another runs or the patch stack does not allow it.
    pub fn begin(&mut self, b: Begin, now_ms: u64) -> Result<u64, KpError> {
        self.ensure_idle(match b.op {
            Op::Enable => "enable a patch",
            Op::Disable => "disable a patch",
        })?;
        let changes = match b.op {
            Op::Enable => self.plan_enable(&b.patch)?,
            Op::Disable => self.plan_disable(&b.patch)?,
        };
        self.next_id += 1;
        let mut t = Transition::new(
            self.next_id,
            &b.patch,
            b.op,
            b.consistency,
            b.timeout,
            changes,
            now_ms,
        );
        t.unload_on_failure = b.unload_on_failure;
        let first = match b.op {
            Op::Enable => (CallbackKind::PrePatch, CallbackKind::StateSetup),
            Op::Disable => (CallbackKind::PreUnpatch, CallbackKind::StateDisable),
        };
        let p = self.patch(&b.patch)?;
        let states = self.states_alone(p);
        t.calls = crate::transition::calls::Calls::before(p, first, states);
        self.active = Some(t);
        Ok(self.next_id)
    }

    /// Would a load-and-enable of `kp` be refused by the patch stack? Checked before
    /// the load, so that such a request writes nothing.
    pub fn check_load_and_enable(&self, kp: &[u8]) -> Result<(), KpError> {
        self.check_enable_of(&PatchObject::parse(kp)?)
    }

    fn check_enable_of(&self, obj: &PatchObject) -> Result<(), KpError> {
        self.ensure_idle("load and enable a patch")?;
        if self.patch(&obj.manifest.name).is_ok() {
            return Err(KpError::AlreadyLoaded(obj.manifest.name.clone()));
        }
        self.check_enable(&obj.manifest.name, &EnableRules::of_manifest(&obj.manifest))
    }

    /// Dependencies and states of a patch about to be enabled.
    fn check_enable(&self, name: &str, r: &EnableRules) -> Result<(), KpError> {
        for d in r.depends {
            let dep = self.patch(d).map_err(|_| {
                KpError::Dependency(format!(
                    "'{name}' depends on patch '{d}', which is not loaded"
                ))
            })?;
            if dep.state != PatchState::Enabled {
                return Err(KpError::Dependency(format!(
                    "'{name}' depends on '{d}', which is not enabled"
                )));
            }
            if r.atomic_replace {
                return Err(KpError::Dependency(format!(
                    "'{name}' is a cumulative patch (atomic replace) and depends on '{d}', which \
                     it would replace; a cumulative patch carries what it needs instead"
                )));
            }
        }
        states::check_compatible(
            &Candidate {
                name,
                atomic_replace: r.atomic_replace,
                states: r.states,
            },
            &self.patches,
        )
    }

    /// Whether patch `q` is enabled once `name` is: `name` itself, and every patch that
    /// is enabled now unless `name` is a cumulative patch, which replaces them all.
    fn enabled_after_enable<'a>(&'a self, name: &'a str) -> impl Fn(&Patch) -> bool + 'a {
        let replace = self.patch(name).is_ok_and(|p| p.atomic_replace);
        move |q: &Patch| q.name == name || (!replace && q.state == PatchState::Enabled)
    }

    fn plan_enable(&self, name: &str) -> Result<Vec<FuncChange>, KpError> {
        let p = self.patch(name)?;
        match p.state {
            PatchState::Enabled => {
                return Err(KpError::State(format!("patch '{name}' is already enabled")))
            }
            PatchState::Replaced => {
                return Err(KpError::State(format!(
                    "patch '{name}' was replaced by cumulative patch '{}' and cannot be enabled \
                     again (unload it; to go back, load a patch that carries its fix)",
                    p.replaced_by.as_deref().unwrap_or("?")
                )))
            }
            PatchState::Disabled if p.exited() => {
                return Err(KpError::State(format!(
                    "'{name}' is a kernel livepatch module whose exit ran when it was disabled \
                     (as the kernel frees a disabled livepatch): unload it and load it again"
                )))
            }
            PatchState::Disabled => {}
        }
        self.check_enable(name, &EnableRules::of_patch(p))?;
        Ok(funcs::plan(
            &self.patches,
            &self.funcs,
            &self.enabled_after_enable(name),
        ))
    }

    fn plan_disable(&self, name: &str) -> Result<Vec<FuncChange>, KpError> {
        let p = self.patch(name)?;
        match p.state {
            PatchState::Enabled => {}
            PatchState::Replaced => {
                return Err(KpError::State(format!(
                    "patch '{name}' is not enabled: cumulative patch '{}' replaced it",
                    p.replaced_by.as_deref().unwrap_or("?")
                )))
            }
            PatchState::Disabled => {
                return Err(KpError::State(format!("patch '{name}' is not enabled")))
            }
        }
        if let Some(user) = self
            .patches
            .iter()
            .find(|q| q.state == PatchState::Enabled && q.depends.contains(&p.name))
        {
            return Err(KpError::Dependency(format!(
                "patch '{}' depends on '{name}'; disable it first",
                user.name
            )));
        }
        Ok(funcs::plan(&self.patches, &self.funcs, &|q: &Patch| {
            q.name != name && q.state == PatchState::Enabled
        }))
    }

    /// The patch states a completed transition leaves: the patch enabled or disabled;
    /// for a cumulative patch's enable, every other enabled patch, and every disabled one
    /// loaded before it, replaced.
    pub(crate) fn settle(&mut self, name: &str, op: Op) -> Result<(), KpError> {
        let at = self
            .patches
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| KpError::NoSuchPatch(name.to_string()))?;
        let replace = self.patches[at].atomic_replace;
        for (i, q) in self.patches.iter_mut().enumerate() {
            if i == at {
                match op {
                    Op::Enable => {
                        q.state = PatchState::Enabled;
                        q.enables += 1;
                    }
                    Op::Disable => q.state = PatchState::Disabled,
                }
            } else if op == Op::Enable
                && replace
                && (q.state == PatchState::Enabled || (q.state == PatchState::Disabled && i < at))
            {
                q.state = PatchState::Replaced;
                q.replaced_by = Some(name.to_string());
            }
        }
        Ok(())
    }

    /// Ask the transition in progress to turn around or to complete without checks;
    /// done at the next tick (which [`Engine::due`] makes due at once).
    pub fn request(&mut self, r: Request) -> Result<u64, KpError> {
        let verb = match r {
            Request::Reverse => "reverse",
            Request::Force => "force",
        };
        let t = self.active.as_mut().ok_or_else(|| {
            KpError::State(format!("nothing to {verb}: no transition is in progress"))
        })?;
        if let Some(prev) = t.request {
            if prev != r {
                return Err(KpError::State(format!(
                    "transition {} already has a {prev:?} request waiting for its next tick",
                    t.id
                )));
            }
        }
        t.request = Some(r);
        Ok(t.id)
    }

    /// Remove a disabled or replaced patch: its code is overwritten with `int3`, its
    /// data zeroed, and its space is free for the next load.
    pub fn unload(
        &mut self,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        name: &str,
    ) -> Result<(), KpError> {
        self.journaled(guest, |engine, guest| {
            engine.unload_journaled(guest, kernel, name)
        })
    }

    fn unload_journaled(
        &mut self,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        name: &str,
    ) -> Result<(), KpError> {
        self.ensure_no_module_event("unload a patch")?;
        if self.active.as_ref().is_some_and(|t| t.patch == name) {
            return Err(KpError::State(format!(
                "patch '{name}' is in a transition; wait for it to end"
            )));
        }
        let p = self.patch(name)?;
        if p.forced {
            return Err(KpError::State(format!(
                "patch '{name}' was forced: a task may still run its code, so it stays in the \
                 guest for the guest's lifetime (as the kernel keeps a forced livepatch module)"
            )));
        }
        if p.state == PatchState::Enabled {
            return Err(KpError::State(format!(
                "patch '{name}' is enabled; disable it first"
            )));
        }
        if let Some(why) = self.callback_still_running(guest.reader(), name) {
            return Err(KpError::State(format!("patch '{name}': {why}")));
        }
        if let Some(user) = self.patches.iter().find(|q| q.depends.contains(&p.name)) {
            return Err(KpError::Dependency(format!(
                "patch '{}' depends on '{name}'; unload it first",
                user.name
            )));
        }
        let (runs, module) = (p.runs, p.guest_module);
        let area = self
            .area
            .as_mut()
            .ok_or_else(|| KpError::State("no patch area".into()))?;
        if let Some(m) = &module {
            let retired = crate::guest_module::withdraw(guest, kernel, m)?;
            // Records retired before this one, that no reader can be inside any more;
            // this one stays at least until the next load or unload.
            crate::guest_module::free_quiesced(&mut self.retired, guest, kernel, area);
            self.retired.push(retired);
        }
        for (r, fill) in [(runs.code, 0xccu8), (runs.rodata, 0), (runs.data, 0)] {
            if r.size() > 0 {
                guest
                    .write_phys(area.layout.pa(r.start), &vec![fill; r.size() as usize])
                    .map_err(|e| KpError::guest("clearing the patch area", e))?;
            }
        }
        area.space.free(runs);
        self.patches.retain(|q| q.name != name);
        self.generation += 1;
        Ok(())
    }

    /// Run `f` with a writer that journals every write to `guest`: the one way the
    /// engine's public entry points write.
    pub(crate) fn journaled<R>(
        &mut self,
        guest: &mut dyn GuestWriter,
        f: impl FnOnce(&mut Engine, &mut dyn GuestWriter) -> R,
    ) -> R {
        let mut journal = std::mem::take(&mut self.journal);
        let out = f(self, &mut journal.recorder(guest));
        self.journal = journal;
        out
    }

    /// Whether the guest still holds every byte the engine wrote (for a guest that
    /// died: see [`crate::journal`]).
    pub fn post_mortem(&self, ram: &dyn introspection::GuestRam) -> PostMortem {
        let guest_written = self.area.as_ref().map(|a| {
            let data = a.layout.data;
            introspection::PhysRange {
                start: a.layout.pa(data.start),
                size: data.end - data.start,
            }
        });
        self.journal.post_mortem(ram, guest_written)
    }

    /// Test builds only: the next site jump is written one byte wrong, as a bug would.
    #[cfg(feature = "fault-injection")]
    pub fn inject_wrong_site_byte(&mut self) {
        self.journal.inject_wrong_site_byte();
    }

    /// The loaded patch function that contains `ip`, with its patch.
    pub fn function_at(&self, ip: u64) -> Option<(&Patch, &PatchedFunc)> {
        self.patches
            .iter()
            .find_map(|p| p.function_at(ip).map(|f| (p, f)))
    }

    /// Code regions of every trampoline bank.
    pub fn trampoline_code(&self) -> Vec<Region> {
        self.dispatch
            .as_ref()
            .map(|d| d.banks.iter().map(|b| b.code).collect())
            .unwrap_or_default()
    }

    /// The kernel function whose trampoline contains `ip`.
    pub fn trampoline_at(&self, ip: u64) -> Option<&str> {
        self.dispatch
            .as_ref()?
            .banks
            .iter()
            .find_map(|b| b.func_at(ip))
    }

    pub(crate) fn end(&mut self, t: Transition) {
        self.history.push_back(t);
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
    }
}

/// What enabling a patch must respect, from its manifest or its loaded form.
struct EnableRules<'a> {
    depends: &'a [String],
    atomic_replace: bool,
    states: &'a [SystemState],
}

impl<'a> EnableRules<'a> {
    fn of_manifest(m: &'a Manifest) -> Self {
        EnableRules {
            depends: &m.depends,
            atomic_replace: m.atomic_replace,
            states: &m.states,
        }
    }

    fn of_patch(p: &'a Patch) -> Self {
        EnableRules {
            depends: &p.depends,
            atomic_replace: p.atomic_replace,
            states: &p.states,
        }
    }
}

/// Space in use in each region of the patch area, and the region's size (bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AreaUse {
    pub code: (u64, u64),
    pub rodata: (u64, u64),
    pub data: (u64, u64),
}

/// The kernel symbols a linked patch uses: resolved, then pending (address 0).
fn imports_of(linked: load::link::Linked) -> Vec<Import> {
    let pending = linked
        .pending
        .into_iter()
        .map(|name| Import { name, addr: 0 });
    linked
        .imports
        .into_iter()
        .map(|(name, addr)| Import { name, addr })
        .chain(pending)
        .collect()
}

/// A patch's linked images written into the patch area, and for the first patch the
/// area's page tables.
/// What a load's pause checks before it writes lpvmm's machinery in the guest: that
/// the guest-call machinery can be installed, and that the patch's module can be
/// linked (no task holds `module_mutex`).
fn check_guest_machinery(
    guest: &dyn introspection::PausedGuest,
    kernel: &Kernel,
    caller: bool,
    module: bool,
) -> Result<(), KpError> {
    if caller {
        crate::guestcall::GuestCaller::check(guest, kernel)?;
    }
    if module {
        crate::guest_module::check_free(guest, kernel)?;
    }
    Ok(())
}

/// Write a patch's module record and link it into the guest's module lists and tree
/// ([`crate::guest_module`]), in the load's pause, once `module_mutex` was found free.
fn write_module(
    guest: &mut dyn GuestWriter,
    kernel: &Kernel,
    area: &mut Area,
    module: crate::guest_module::GuestModule,
    bytes: &[u8],
) -> Result<crate::guest_module::GuestModule, KpError> {
    guest
        .write_phys(area.layout.pa(module.record.start), bytes)
        .map_err(|e| KpError::guest("writing the patch's module", e))?;
    area.space.data.take(module.record);
    crate::guest_module::publish(guest, kernel, &module)?;
    Ok(module)
}

fn write_images(
    guest: &mut dyn GuestWriter,
    kernel: &Kernel,
    area: &mut Area,
    tables: Option<&area::PageTables>,
    linked: &load::link::Linked,
    name: &str,
) -> Result<(), KpError> {
    if !area.installed {
        let tables = tables.ok_or_else(|| {
            KpError::State(format!(
                "{name}: prepared without the patch area's page tables; load it again"
            ))
        })?;
        area::install(guest, kernel, &area.layout, tables)?;
        guest
            .write_phys(
                area.layout.pa(area.shadow_table),
                &[0; crate::shadow::TABLE_BYTES as usize],
            )
            .map_err(|e| KpError::guest("clearing the shadow-variable table", e))?;
        area.installed = true;
    }
    for img in [&linked.code, &linked.rodata, &linked.data] {
        if !img.bytes.is_empty() {
            guest
                .write_phys(area.layout.pa(img.addr), &img.bytes)
                .map_err(|e| KpError::guest("writing the patch area", e))?;
        }
    }
    Ok(())
}
