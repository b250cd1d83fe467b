//! The patch engine: loaded patches and their lifetime (the kernel livepatch's core.c),
//! the version stacks of redirected functions ([`crate::funcs`]) and the transition in
//! progress ([`crate::transition`], advanced by [`Engine::tick`] in `ticks.rs`).
//!
//! The VMM decides when to pause and calls the engine with the paused guest; the
//! engine decides everything else. Every refusal happens before the first guest byte
//! is written: `load` validates the whole patch, resolves every symbol and checks every
//! site first; `begin` checks the request against the patch stack and writes nothing.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use iced_x86::{Code, Decoder, DecoderOptions, Register};
use introspection::kernel::Kernel;
use introspection::memory::KernelMemory;
use introspection::{GuestRam, PausedGuest};
use serde::{Deserialize, Serialize};

use crate::alternatives::CpuFeatures;
use crate::area::{self, AreaLayout, PageTables, Region};
use crate::dispatch::{Bank, Geometry};
use crate::funcs::FuncChange;
use crate::funcs::{self, FuncStack, FunctionVersions};
use crate::journal::{Journal, PostMortem};
use crate::link::{self, Placement};
use crate::manifest::{Manifest, SystemState};
use crate::object::PatchObject;
use crate::patch::{Import, ObjectName, OrcAt, Patch, PatchState, PatchedFunc, PatchedObject};
use crate::site::{self, SiteState};
use crate::space::{AreaSpace, Runs, Sizes};
use crate::states::{self, Candidate};
use crate::transition::{Consistency, Op, Request, Transition};
use crate::{GuestWriter, KpError};

/// Ended transitions kept for status.
const HISTORY: usize = 32;

#[derive(Clone, Debug)]
pub(crate) struct Area {
    pub(crate) layout: AreaLayout,
    pub(crate) installed: bool,
    pub(crate) space: AreaSpace,
}

impl Area {
    fn new(layout: AreaLayout) -> Area {
        Area {
            space: AreaSpace::new(layout.code, layout.rodata, layout.data),
            layout,
            installed: false,
        }
    }
}

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
    pub(crate) early: Option<crate::early::EarlyTraces>,
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
}

/// What a tick read and no longer needs (task lists, stack traces, early traces), kept
/// to be freed once the guest runs again: freeing its thousands of small allocations in
/// the pause cost the guest about 5 ms with 2,000 tasks (tick parts, 2026-12-04).
#[derive(Clone, Debug, Default)]
pub(crate) struct Spent {
    lists: Vec<introspection::tasks::TaskList>,
    checks: Vec<Vec<crate::transition::Check>>,
    early: Vec<crate::early::EarlyTraces>,
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

    pub(crate) fn keep_early(&mut self, early: Option<crate::early::EarlyTraces>) {
        self.early.extend(early);
    }
}

/// Does the function keep a frame pointer at its call sites: `push %rbp` and then
/// `mov %rsp,%rbp` before its first call or jump (gcc schedules other instructions in
/// between, and may put some that do not touch the stack before the push)?
fn has_frame_pointer(code: &[u8], addr: u64) -> bool {
    use iced_x86::InstructionInfoFactory;
    let mut info = InstructionInfoFactory::new();
    let touches_frame = |i: &iced_x86::Instruction, info: &mut InstructionInfoFactory| {
        i.is_stack_instruction()
            || info.info(i).used_registers().iter().any(|r| {
                matches!(
                    r.register(),
                    Register::RSP | Register::RBP | Register::ESP | Register::EBP
                )
            })
    };
    let mut d = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut pushed = false;
    while d.can_decode() {
        let i = d.decode();
        if i.flow_control() != iced_x86::FlowControl::Next {
            return false;
        }
        if !pushed {
            if i.code() == Code::Push_r64 && i.op0_register() == Register::RBP {
                pushed = true;
            } else if i.code() != Code::Endbr64 && touches_frame(&i, &mut info) {
                return false;
            }
            continue;
        }
        let sets_fp = matches!(i.code(), Code::Mov_rm64_r64 | Code::Mov_r64_rm64)
            && i.op0_register() == Register::RBP
            && i.op1_register() == Register::RSP;
        if sets_fp {
            return true;
        }
        if touches_frame(&i, &mut info) {
            return false;
        }
    }
    false
}

#[cfg(test)]
#[test]
fn frame_pointer_prologues_as_gcc_schedules_them() {
    // movabs $0x225c17d03,%r8; push %rbp; mov (%rdx),%rcx; mov %rsp,%rbp; call
    let scheduled = [
        0x49, 0xb8, 0x03, 0x7d, 0xc1, 0x25, 0x02, 0, 0, 0, 0x55, 0x48, 0x8b, 0x0a, 0x48, 0x89,
        0xe5, 0xe8, 0, 0, 0, 0,
    ];
    assert!(has_frame_pointer(&scheduled, 0x1000));
    // push %rbp; mov %rsp,%rbp
    assert!(has_frame_pointer(&[0x55, 0x48, 0x89, 0xe5, 0xc3], 0x1000));
    // sub $8,%rsp before the push: the frame-pointer rule would be wrong.
    assert!(!has_frame_pointer(
        &[0x48, 0x83, 0xec, 0x08, 0x55, 0x48, 0x89, 0xe5],
        0x1000
    ));
    // A call before the frame is set up.
    assert!(!has_frame_pointer(
        &[0x55, 0xe8, 0, 0, 0, 0, 0x48, 0x89, 0xe5],
        0x1000
    ));
    // No frame pointer at all.
    assert!(!has_frame_pointer(&[0x48, 0x89, 0xf8, 0xc3], 0x1000));
}

/// A kernel function a patch replaces, checked live.
struct Target<'m> {
    replacement: &'m crate::manifest::Replacement,
    addr: u64,
    size: u64,
    site: u64,
    site_pa: u64,
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

    /// The guest-visible pause of the last tick, as the VMM measured it.
    /// Free what the last tick read (call it once the guest runs again; a tick frees
    /// what an earlier one left if this was not called).
    pub fn release_spent(&mut self) {
        self.spent = Spent::default();
    }

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
        match &self.active {
            Some(t) => Err(KpError::State(format!(
                "cannot {what}: a transition of patch '{}' is in progress (lpvmm patch status; \
                 lpvmm patch reverse or force)",
                t.patch
            ))),
            None => Ok(()),
        }
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
        let mem = KernelMemory::new(ram, kernel.root);
        let area = match &self.area {
            Some(a) => a.clone(),
            None => {
                let phys = ram.patch_area();
                let va = area::choose_va(&mem, kernel, phys.size)?;
                Area::new(AreaLayout::new(phys, va)?)
            }
        };
        let boot = BootChoices::of_guest(&mem, kernel, &obj)?;
        let (runs, linked) = link_into(&area, &boot, kernel, &obj)?;
        let orc = decode_orc(kernel, &obj.manifest.name, &obj, &linked)?;
        let tables = (!area.installed).then(|| PageTables::of(&area.layout));
        Ok(Prepared {
            obj,
            area,
            tables,
            runs,
            linked,
            orc,
            boot,
            generation: self.generation,
        })
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
            linked,
            orc,
            boot,
            generation,
        } = prepared;
        let m = &obj.manifest;
        if generation != self.generation {
            return Err(KpError::State(format!(
                "{}: the patch area changed (a load, an unload or dispatch banks) since it was linked; load it again",
                m.name
            )));
        }
        self.check_loadable(&obj)?;
        let now = BootChoices::of_guest(&kernel.memory(guest.reader()), kernel, &obj)?;
        if now != boot {
            return Err(KpError::State(format!(
                "{}: the guest's CPU features or return thunk changed while it was linked; \
                 not loaded",
                m.name
            )));
        }
        let targets = self.targets(guest.reader(), kernel, &obj)?;
        let funcs = patched_funcs(targets, &obj, &linked)?;

        // Everything checked: write.
        if !area.installed {
            let tables = tables.as_ref().ok_or_else(|| {
                KpError::State(format!(
                    "{}: prepared without the patch area's page tables; load it again",
                    m.name
                ))
            })?;
            area::install(guest, kernel, &area.layout, tables)?;
            area.installed = true;
        }
        for img in [&linked.code, &linked.rodata, &linked.data] {
            if !img.bytes.is_empty() {
                guest
                    .write_phys(area.layout.pa(img.addr), &img.bytes)
                    .map_err(|e| KpError::guest("writing the patch area", e))?;
            }
        }
        area.space.take(runs);
        self.area = Some(area);
        self.generation += 1;
        self.patches.push(Patch {
            name: m.name.clone(),
            state: PatchState::Disabled,
            forced: false,
            objects: vec![PatchedObject {
                name: ObjectName::Vmlinux,
                funcs,
            }],
            depends: m.depends.clone(),
            atomic_replace: m.atomic_replace,
            states: m.states.clone(),
            replaced_by: None,
            runs,
            orc,
            imports: linked
                .imports
                .into_iter()
                .map(|(name, addr)| Import { name, addr })
                .collect(),
            enables: 0,
        });
        Ok(m.name.clone())
    }

    /// Every function the patch replaces, checked live: a kernel function whose site is
    /// the fentry NOP, or lpvmm's own jump to the version on top.
    fn targets<'o>(
        &self,
        guest: &dyn PausedGuest,
        kernel: &Kernel,
        obj: &'o PatchObject,
    ) -> Result<Vec<Target<'o>>, KpError> {
        let syms = &kernel.symbols;
        let mem = kernel.memory(guest);
        let mut targets = Vec::new();
        for r in &obj.manifest.replacements {
            let sym = syms
                .resolve(&r.old.name, r.old.pos)
                .map_err(|e| KpError::Symbol(e.to_string()))?;
            if !sym.is_text() || !kernel.is_kernel_text(sym.addr) {
                return Err(KpError::Symbol(format!(
                    "{} is not a kernel function",
                    r.old
                )));
            }
            let size = syms.size_at(sym.addr).unwrap_or(0);
            let entry = mem
                .read_vec(sym.addr, 9)
                .map_err(|e| KpError::Guest(format!("reading {}: {e}", r.old)))?;
            let site = sym.addr + site::site_offset(&entry);
            let at = (site - sym.addr) as usize;
            let bytes: [u8; 5] = entry[at..at + 5].try_into().unwrap_or_default();
            let ours = self.funcs.get(&sym.addr);
            match site::inspect(&r.old.to_string(), site, &bytes)? {
                SiteState::Nop if ours.is_none() => {}
                _ if ours.is_some_and(|s| s.live == bytes) => {}
                _ => {
                    return Err(KpError::Site(format!(
                        "{} at {site:#x} was changed by something other than lpvmm",
                        r.old
                    )))
                }
            }
            let site_pa = mem
                .translate(site)
                .map_err(|e| KpError::Guest(format!("{}: {e}", r.old)))?;
            targets.push(Target {
                replacement: r,
                addr: sym.addr,
                size,
                site,
                site_pa,
            });
        }
        Ok(targets)
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
        self.active = Some(t);
        Ok(self.next_id)
    }

    /// Would a load-and-enable of `kp` be refused by the patch stack? Checked before
    /// the load, so that such a request writes nothing.
    pub fn check_load_and_enable(&self, kp: &[u8]) -> Result<(), KpError> {
        self.ensure_idle("load and enable a patch")?;
        let obj = PatchObject::parse(kp)?;
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
    pub fn unload(&mut self, guest: &mut dyn GuestWriter, name: &str) -> Result<(), KpError> {
        self.journaled(guest, |engine, guest| engine.unload_journaled(guest, name))
    }

    fn unload_journaled(&mut self, guest: &mut dyn GuestWriter, name: &str) -> Result<(), KpError> {
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
        if let Some(user) = self.patches.iter().find(|q| q.depends.contains(&p.name)) {
            return Err(KpError::Dependency(format!(
                "patch '{}' depends on '{name}'; unload it first",
                user.name
            )));
        }
        let runs = p.runs;
        let area = self
            .area
            .as_mut()
            .ok_or_else(|| KpError::State("no patch area".into()))?;
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

/// Link `obj` where the area's first free runs of its size are: linked once to learn
/// its size, then at its place. Takes nothing from the area.
/// A patch parsed, resolved and linked while the guest ran ([`Engine::prepare`]), to be
/// checked and written in a pause ([`Engine::load_prepared`]).
#[derive(Debug)]
pub struct Prepared {
    obj: PatchObject,
    /// The patch area as it will be once loaded (chosen now for the first patch).
    area: Area,
    /// For the first patch: the area's page tables, written in the pause.
    tables: Option<PageTables>,
    runs: Runs,
    linked: link::Linked,
    orc: Vec<OrcAt>,
    /// What the link took from the guest, checked again in the pause.
    boot: BootChoices,
    /// The engine's [`Engine::generation`] it was linked against.
    generation: u64,
}

impl Prepared {
    pub fn name(&self) -> &str {
        &self.obj.manifest.name
    }

    /// The guest-physical ranges of the patch area its load will write (its images, and
    /// for the first patch the area's page tables): lpvmm's own memory, which the VMM
    /// may make resident before the pause so that the pause does not fault it in.
    pub fn area_writes(&self) -> Vec<introspection::PhysRange> {
        let layout = &self.area.layout;
        let images = [&self.linked.code, &self.linked.rodata, &self.linked.data];
        let mut ranges: Vec<introspection::PhysRange> = images
            .iter()
            .filter(|img| !img.bytes.is_empty())
            .map(|img| introspection::PhysRange {
                start: layout.pa(img.addr),
                size: img.bytes.len() as u64,
            })
            .collect();
        if let Some(t) = &self.tables {
            ranges.extend(t.ranges());
        }
        ranges
    }
}

/// What the guest decided at boot that a link depends on: its return thunk, and its CPU
/// features where the patch has alternatives.
#[derive(Clone, Debug, PartialEq, Eq)]
struct BootChoices {
    returns: link::Returns,
    cpu: Option<CpuFeatures>,
}

impl BootChoices {
    fn of_guest(mem: &KernelMemory, kernel: &Kernel, obj: &PatchObject) -> Result<Self, KpError> {
        Ok(BootChoices {
            returns: link::Returns::of_guest(mem, &kernel.symbols)?,
            cpu: guest_cpu(mem, kernel, obj)?,
        })
    }
}

fn link_into(
    area: &Area,
    boot: &BootChoices,
    kernel: &Kernel,
    obj: &PatchObject,
) -> Result<(Runs, link::Linked), KpError> {
    let name = &obj.manifest.name;
    let (returns, cpu) = (boot.returns, &boot.cpu);
    let resolve = |sym: &str| resolve_import(kernel, obj, sym);
    let at = |r: &Runs| Placement {
        code: r.code.start,
        rodata: r.rodata.start,
        data: r.data.start,
    };
    let start = at(&area.space.place(name, Sizes::ZERO)?);
    let sized = link::link(obj, start, returns, cpu.as_ref(), &resolve)?;
    let runs = area.space.place(name, sized.sizes())?;
    let linked = link::link(obj, at(&runs), returns, cpu.as_ref(), &resolve)?;
    if linked.sizes() != sized.sizes() {
        return Err(KpError::State(format!(
            "{name}: its size changed with its address; not loaded"
        )));
    }
    Ok((runs, linked))
}

/// The guest's CPU features, when the patch has alternatives to apply for them (their
/// entry layout checked against the guest's BTF).
fn guest_cpu(
    mem: &introspection::memory::KernelMemory,
    kernel: &Kernel,
    obj: &PatchObject,
) -> Result<Option<CpuFeatures>, KpError> {
    let Some(alts) = &obj.alternatives else {
        return Ok(None);
    };
    if let Some(size) = kernel.layout.patcher.alt_instr_size {
        if size != alts.entry_size as u64 {
            return Err(KpError::Unsupported(format!(
                "{}: its alternatives are {}-byte entries, the guest kernel's {size}: was it \
                 built for another kernel? (lpvmm kp build --kernel)",
                obj.manifest.name, alts.entry_size
            )));
        }
    }
    CpuFeatures::of_guest(mem, kernel).map(Some)
}

/// Each function the patch replaces, with where its new version was linked.
fn patched_funcs(
    targets: Vec<Target>,
    obj: &PatchObject,
    linked: &link::Linked,
) -> Result<Vec<PatchedFunc>, KpError> {
    let mut funcs = Vec::new();
    for t in targets {
        let r = t.replacement;
        let f = obj
            .function(&r.new)
            .ok_or_else(|| KpError::Manifest(format!("no function {}", r.new)))?;
        let new_addr = linked.functions[&r.new];
        site::jump(t.site, new_addr)?;
        let off = (new_addr - linked.code.addr) as usize;
        let body = linked
            .code
            .bytes
            .get(off..off + f.size as usize)
            .unwrap_or_default();
        funcs.push(PatchedFunc {
            old: r.old.clone(),
            old_addr: t.addr,
            old_size: t.size,
            site: t.site,
            site_pa: t.site_pa,
            new_name: r.new.clone(),
            new_addr,
            new_size: f.size,
            frame_pointer: has_frame_pointer(body, new_addr),
            immediate: r.immediate,
        });
    }
    Ok(funcs)
}

/// The patch's ORC entries decoded with the guest kernel's own layout.
fn decode_orc(
    kernel: &Kernel,
    name: &str,
    obj: &PatchObject,
    linked: &link::Linked,
) -> Result<Vec<OrcAt>, KpError> {
    let Some(t) = &obj.orc else {
        return Ok(Vec::new());
    };
    let format = kernel.orc.format();
    if t.entry_size as u64 != format.entry_size {
        return Err(KpError::Unsupported(format!(
            "{name}: its ORC entries are {} bytes, the guest kernel's {}: was it built for \
             another kernel? (lpvmm kp build --kernel RELEASE, as `uname -r` in the guest says)",
            t.entry_size, format.entry_size
        )));
    }
    Ok(linked
        .orc
        .iter()
        .map(|(ip, raw)| OrcAt {
            ip: *ip,
            entry: format.decode(raw),
        })
        .collect())
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

/// A kernel symbol a patch uses: its binding first, then the unique name.
fn resolve_import(kernel: &Kernel, obj: &PatchObject, name: &str) -> Result<u64, KpError> {
    let m = &obj.manifest;
    let (kname, pos) = match m.bindings.iter().find(|b| b.local == name) {
        Some(b) => (b.kernel.name.as_str(), b.kernel.pos),
        None => (name, None),
    };
    // Names the kernel's linker script gives another symbol, which kallsyms does not
    // list (arch/x86/kernel/vmlinux.lds.S: `PROVIDE(const_pcpu_hot = pcpu_hot)`, what
    // `current` reads on 6.x kernels with compiler segment support).
    let kname = match kname {
        "const_pcpu_hot" if kernel.symbols.addr("const_pcpu_hot").is_none() => "pcpu_hot",
        other => other,
    };
    kernel
        .symbols
        .resolve(kname, pos)
        .map(|s| s.addr)
        .map_err(|e| {
            KpError::Symbol(format!(
                "{e}{}",
                if matches!(e, introspection::kallsyms::ResolveError::Ambiguous { .. }) {
                    " (bind it with LPVMM_SYMBOL(local, name, pos))"
                } else {
                    ""
                }
            ))
        })
}
