//! The engine's side of a transition: one [`Engine::tick`] per pause, which looks at
//! the guest's tasks and writes the sites, trampolines and task map (see
//! [`crate::transition`] for the model).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use introspection::kernel::Kernel;
use introspection::orc::{reg, OrcEntry, OrcKind};
use introspection::stack::{ExtraCode, StackTrace, Unwinder};
use introspection::tasks::{Task, TaskList, TaskReader};
use introspection::PausedGuest;

use crate::area::Region;
use crate::dispatch::{
    self, Bank, BankState, Geometry, Targets, TaskMap, TrampolineEnv, BANKS, BANK_CODE,
    MAX_TRAMPOLINE,
};
use crate::engine::{Dispatch, Engine};
use crate::ftrace::{self, FlagWrite, SiteMove};
use crate::funcs::{CodeRange, FuncChange, FuncStack, Version};
use crate::space::Sizes;
use crate::transition::{
    Blocker, Check, CheckedCode, Consistency, Outcome, Request, Stage, TickParts, Transition,
};
use crate::{EarlyCheckCounts, GuestWriter, KpError};

/// How the unwinder sees code that is not the kernel's: a trampoline, at any of its
/// instructions, is a function's entry (the return address on top of the stack).
const AT_ENTRY: OrcEntry = OrcEntry {
    sp_offset: 8,
    bp_offset: 0,
    sp_reg: reg::SP,
    bp_reg: reg::UNDEFINED,
    kind: OrcKind::Call,
    signal: false,
};

impl Engine {
    /// One tick of the transition in progress, with the guest paused. Never leaves the
    /// guest half-written: a tick that cannot go on changes nothing and is retried (or,
    /// before anything was written, ends the transition as failed).
    pub fn tick(&mut self, guest: &mut dyn GuestWriter, kernel: &Kernel, now_ms: u64) {
        self.journaled(guest, |engine, guest| {
            engine.tick_journaled(guest, kernel, now_ms)
        });
    }

    fn tick_journaled(&mut self, guest: &mut dyn GuestWriter, kernel: &Kernel, now_ms: u64) {
        let Some(mut t) = self.active.take() else {
            return;
        };
        t.ticks += 1;
        t.elapsed_ms = now_ms.saturating_sub(t.started_ms);
        t.note = None;
        // Left by a caller that did not release it after the last pause.
        self.release_spent();
        let started = Instant::now();
        self.tick_parts = TickParts::default();
        let stepped = self.step(&mut t, guest, kernel, now_ms);
        self.tick_parts.tick_us = micros(started.elapsed());
        t.note_tick_parts(self.tick_parts);
        if let Err(e) = stepped {
            // A busy guest is waited for, at the first tick too, up to the deadline.
            let wait = matches!(e, KpError::GuestBusy(_)) && !t.last_chance(now_ms);
            if t.stage == Stage::Waiting && !wait {
                t.outcome = Outcome::Failed(e.to_string());
                t.stage = Stage::Ended;
            } else {
                t.note = Some(format!("tick {} failed, will retry: {e}", t.ticks));
                let kept = std::mem::take(&mut t.blockers);
                t.record_blocked(now_ms, kept);
            }
        }
        // Early traces serve one tick: the guest runs on after it.
        let early = self.early.take();
        self.spent.keep_early(early);
        if t.finished() {
            self.end(t);
        } else {
            self.active = Some(t);
        }
    }

    fn step(
        &mut self,
        t: &mut Transition,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        now_ms: u64,
    ) -> Result<(), KpError> {
        // A request stays until a tick carries it out (a tick can fail, for example on a
        // task list caught half-updated, and is then tried again).
        match t.request {
            Some(Request::Force) => {
                self.force(t, guest, kernel)?;
                t.request = None;
                return Ok(());
            }
            Some(Request::Reverse) => {
                t.request = None;
                let before = t.reversed;
                let r = self.reverse(t, guest, kernel, now_ms);
                // Failed before turning: ask again at the next tick.
                if r.is_err() && t.reversed == before {
                    t.request = Some(Request::Reverse);
                }
                return r;
            }
            None => {}
        }
        if t.consistency == Consistency::PerTask && !t.reversed && t.expired(now_ms) {
            t.timed_out = true;
            t.gave_up_on = t.blockers.clone();
            return self.reverse(t, guest, kernel, now_ms);
        }
        match t.stage {
            Stage::Waiting => self.start(t, guest, kernel, now_ms),
            Stage::Switching { .. } => self.advance(t, guest, kernel, now_ms),
            Stage::Ended => Ok(()),
        }
    }

    /// The first tick (or a retry of it): check every task; flip what can flip.
    fn start(
        &mut self,
        t: &mut Transition,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        now_ms: u64,
    ) -> Result<(), KpError> {
        let list = self.list_tasks(guest.reader(), kernel, &mut t.early_checks)?;
        let all: Vec<&Task> = list.tasks.iter().collect();
        let code = self.start_code(t);
        let checks = self.unwind_checked(guest.reader(), kernel, &all, &code, &mut t.early_checks);
        drop(all);
        let decided = self.start_with(t, guest, kernel, &list, &checks, now_ms);
        self.spent.keep(list, checks);
        decided
    }

    /// [`Engine::start`] once every task is checked.
    fn start_with(
        &mut self,
        t: &mut Transition,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        list: &TaskList,
        checks: &[Check],
        now_ms: u64,
    ) -> Result<(), KpError> {
        self.clear_suspects(list, checks);
        let blockers = blockers_of(checks);
        t.tasks = list.tasks.len();
        t.pending = blockers.len();
        for c in &t.changes {
            self.ensure_stack(c.func)?;
        }
        if blockers.is_empty() {
            return self.complete(t, guest, kernel, list, false);
        }
        if t.consistency == Consistency::Immediate {
            if t.last_chance(now_ms) {
                t.gave_up_on = blockers.clone();
                t.blockers = blockers;
                t.outcome = Outcome::TimedOut;
                t.stage = Stage::Ended;
                self.drop_unused_stacks();
                if t.unload_on_failure {
                    self.unload(guest, &t.patch)?;
                }
            } else {
                t.record_blocked(now_ms, blockers);
            }
            return Ok(());
        }
        self.start_dispatch(t, guest, kernel, list, blockers, now_ms)
    }

    /// Per-task: trampolines on, every blocked task on the starting version.
    fn start_dispatch(
        &mut self,
        t: &mut Transition,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        list: &TaskList,
        blockers: Vec<Blocker>,
        now_ms: u64,
    ) -> Result<(), KpError> {
        let started = Instant::now();
        let r = self.install_dispatch(t, guest, kernel, list, &blockers);
        self.tick_parts.writes_us += micros(started.elapsed());
        if !r? {
            t.note = Some(
                "every trampoline bank may still have a task inside it (from earlier \
                 transitions); waiting for those tasks to run"
                    .into(),
            );
        }
        t.record_blocked(now_ms, blockers);
        Ok(())
    }

    /// Trampolines, the task map with `blockers` on the starting side, and the sites
    /// jumping to the trampolines. `false`: no bank was free, nothing written.
    fn install_dispatch(
        &mut self,
        t: &mut Transition,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        list: &TaskList,
        blockers: &[Blocker],
    ) -> Result<bool, KpError> {
        self.ensure_dispatch(guest.reader(), kernel)?;
        let Some(bank) = self.free_bank() else {
            return Ok(false);
        };
        let d = self.dispatch()?;
        let g = d.geometry;
        if let Some(x) = list
            .tasks
            .iter()
            .find(|x| g.bit(x.addr).is_none() && x.addr != g.init_task)
        {
            return Err(KpError::State(format!(
                "task {} ({})'s task_struct at {:#x} is outside the direct map, where per-task \
                 dispatch finds tasks; use --consistency immediate",
                x.pid, x.comm, x.addr
            )));
        }
        let mut map = TaskMap::filled(&g, false);
        for b in blockers {
            map.set(&g, b.trace.task, true);
        }
        let b = &d.banks[bank];
        let env = TrampolineEnv {
            current_offset: d.current_offset,
            geometry: g,
            map_va: b.map_va,
            init_slot_va: b.init_slot_va(),
        };
        let Trampolines { code, slots } = assemble_trampolines(&self.funcs, t, &env, b.code)?;
        let sites = site_writes(&self.funcs, &t.changes)?;
        let flags = self.check_sites(guest.reader(), kernel, &sites)?;
        // Order matters only for the guest's view after the resume; it is paused now.
        let layout = self.layout()?;
        write_map(guest, &layout, self.dispatch_bank(bank)?, &g, &mut map)?;
        for (va, bytes) in &code {
            guest
                .write_phys(layout.pa(*va), bytes)
                .map_err(|e| KpError::guest("writing a trampoline", e))?;
        }
        self.write_sites(guest, &sites, flags)?;
        if let Some(b) = self.dispatch.as_mut().and_then(|d| d.banks.get_mut(bank)) {
            b.state = BankState::Live;
            b.slots = slots;
        }
        t.stage = Stage::Switching { bank, map };
        Ok(true)
    }

    /// A later tick: move every pending task that is at a safe point.
    fn advance(
        &mut self,
        t: &mut Transition,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        now_ms: u64,
    ) -> Result<(), KpError> {
        let list = self.list_tasks(guest.reader(), kernel, &mut t.early_checks)?;
        let g = self.geometry()?;
        let target_start = t.target_is_start();
        let (_, map) = t.switching()?;
        let pending = pending(map, &g, &list, target_start);
        let code = self.far_side_code(t);
        let checks =
            self.unwind_checked(guest.reader(), kernel, &pending, &code, &mut t.early_checks);
        drop(pending);
        self.clear_suspects(&list, &checks);
        let blockers = self.move_safe(t.switching_mut()?.1, &g, &list, &checks, target_start);
        let advanced = self.finish_tick(t, guest, kernel, &list, blockers, now_ms);
        self.spent.keep(list, checks);
        advanced
    }

    /// Turn the transition around: the starting version becomes the target.
    fn reverse(
        &mut self,
        t: &mut Transition,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        now_ms: u64,
    ) -> Result<(), KpError> {
        if t.stage == Stage::Waiting {
            // Nothing was written: it ends where it started.
            t.reversed = !t.reversed;
            t.blockers.clear();
            t.outcome = if t.timed_out {
                Outcome::TimedOut
            } else {
                Outcome::Reversed
            };
            t.stage = Stage::Ended;
            self.drop_unused_stacks();
            if t.unload_on_failure {
                self.unload(guest, &t.patch)?;
            }
            return Ok(());
        }
        let list = self.list_tasks(guest.reader(), kernel, &mut t.early_checks)?;
        let g = self.geometry()?;
        t.switching()?;
        t.reversed = !t.reversed;
        // Every task is checked against what it leaves if it is on the far side now.
        let code = self.far_side_code(t);
        let all: Vec<&Task> = list.tasks.iter().collect();
        let checks = self.unwind_checked(guest.reader(), kernel, &all, &code, &mut t.early_checks);
        drop(all);
        self.clear_suspects(&list, &checks);
        let target_start = t.target_is_start();
        let (_, map) = t.switching()?;
        // Only tasks on the far side have to move; they leave what they run now.
        let far: Vec<Check> = checks
            .into_iter()
            .filter(|c| map.on_start(&g, c.task) != target_start)
            .collect();
        let blockers = self.move_safe(t.switching_mut()?.1, &g, &list, &far, target_start);
        let immediate: Vec<(u64, [u8; 5])> = t
            .changes
            .iter()
            .filter(|c| c.immediate)
            .map(|c| Ok((c.func, self.funcs[&c.func].site_bytes(t.target(c))?)))
            .collect::<Result<_, KpError>>()?;
        let flags = self.check_sites(guest.reader(), kernel, &immediate)?;
        self.write_sites(guest, &immediate, flags)?;
        let reversed = self.finish_tick(t, guest, kernel, &list, blockers, now_ms);
        self.spent.keep(list, far);
        reversed
    }

    /// Complete without checks, naming the tasks it skipped.
    fn force(
        &mut self,
        t: &mut Transition,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
    ) -> Result<(), KpError> {
        let list = self.list_tasks(guest.reader(), kernel, &mut t.early_checks)?;
        let skipped = match (&t.stage, self.geometry()) {
            (Stage::Switching { map, .. }, Ok(g)) => {
                let pending = pending(map, &g, &list, t.target_is_start());
                let code = self.far_side_code(t);
                blockers_of(&self.unwind_checked(
                    guest.reader(),
                    kernel,
                    &pending,
                    &code,
                    &mut t.early_checks,
                ))
            }
            _ => {
                let all: Vec<&Task> = list.tasks.iter().collect();
                let code = CheckedCode {
                    leaving: self.leaving(t, |c| &c.from, true),
                    tramps: self.trampoline_code(),
                };
                blockers_of(&self.unwind_checked(
                    guest.reader(),
                    kernel,
                    &all,
                    &code,
                    &mut t.early_checks,
                ))
            }
        };
        for c in &t.changes {
            self.ensure_stack(c.func)?;
        }
        if let (Stage::Switching { map, .. }, Ok(g)) = (&mut t.stage, self.geometry()) {
            // Tasks still inside a trampoline take the target too.
            map.reset_unowned(&g, &[], t.reversed);
        }
        t.skipped = skipped;
        self.complete(t, guest, kernel, &list, true)
    }

    /// Move each checked task that is at a safe point to the target; the others are
    /// returned as blockers. A bit moves only when every live task on it is safe (two
    /// task_structs never share a granule, but the map does not rely on it).
    fn move_safe(
        &self,
        map: &mut TaskMap,
        g: &Geometry,
        list: &TaskList,
        checks: &[Check],
        target_start: bool,
    ) -> Vec<Blocker> {
        let mut blockers = Vec::new();
        let mut held: Vec<u64> = Vec::new();
        let mut safe = Vec::new();
        for c in checks {
            match &c.unsafe_because {
                Some(reason) => {
                    held.extend(g.bit(c.task));
                    blockers.push(blocker(&c.trace, reason.clone()));
                }
                None => safe.push(c),
            }
        }
        // A task sharing its bit with one that was not checked (not pending) or not
        // safe stays. Sorted addresses, searched: no hashing of guest addresses.
        let mut checked: Vec<u64> = checks.iter().map(|c| c.task).collect();
        checked.sort_unstable();
        for x in &list.tasks {
            if checked.binary_search(&x.addr).is_err() && map.on_start(g, x.addr) != target_start {
                held.extend(g.bit(x.addr));
            }
        }
        held.sort_unstable();
        for c in safe {
            let reason = if g
                .bit(c.task)
                .is_some_and(|b| held.binary_search(&b).is_ok())
            {
                Some("its task_struct shares a task-map granule with a task that must wait".into())
            } else if !map.set(g, c.task, target_start) {
                Some("its task_struct is outside the direct map".to_string())
            } else {
                None
            };
            if let Some(reason) = reason {
                blockers.push(blocker(&c.trace, reason));
            }
        }
        blockers
    }

    /// After the moves of a tick: unowned bits to the target, the map written, and the
    /// transition completed when nobody is left.
    fn finish_tick(
        &mut self,
        t: &mut Transition,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        list: &TaskList,
        blockers: Vec<Blocker>,
        now_ms: u64,
    ) -> Result<(), KpError> {
        let g = self.geometry()?;
        let live: Vec<u64> = list.tasks.iter().map(|x| x.addr).collect();
        let target_start = t.target_is_start();
        let layout = self.layout()?;
        let (bank, map) = t.switching_mut()?;
        map.reset_unowned(&g, &live, target_start);
        let started = Instant::now();
        write_map(guest, &layout, self.dispatch_bank(bank)?, &g, map)?;
        self.tick_parts.writes_us += micros(started.elapsed());
        t.tasks = list.tasks.len();
        t.pending = blockers.len();
        if blockers.is_empty() {
            return self.complete(t, guest, kernel, list, false);
        }
        t.record_blocked(now_ms, blockers);
        Ok(())
    }

    /// Every task runs the target: sites become direct jumps (or the original bytes),
    /// the version stacks and the patch's state follow, the bank is retired.
    fn complete(
        &mut self,
        t: &mut Transition,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        list: &TaskList,
        forced: bool,
    ) -> Result<(), KpError> {
        let writes: Vec<(u64, [u8; 5])> = t
            .changes
            .iter()
            .map(|c| Ok((c.func, self.funcs[&c.func].site_bytes(t.target(c))?)))
            .collect::<Result<_, KpError>>()?;
        let started = Instant::now();
        let flags = self.check_sites(guest.reader(), kernel, &writes)?;
        self.write_sites(guest, &writes, flags)?;
        self.tick_parts.writes_us += micros(started.elapsed());
        let bank = t
            .bank()
            .and_then(|i| self.dispatch.as_mut()?.banks.get_mut(i));
        if let Some(b) = bank {
            b.state = BankState::Retired {
                suspects: list.tasks.iter().map(|x| x.addr).collect(),
            };
        }
        if !t.reversed {
            self.settle(&t.patch, t.op)?;
        }
        if forced {
            // A task it skipped may be in any code of the transition, of whichever patch
            // (as upstream marks every patch forced): none of it is ever unloaded.
            let owners: Vec<String> = t
                .changes
                .iter()
                .flat_map(|c| [&c.from, &c.to])
                .filter_map(|v| match v {
                    Version::Code(c) => Some(c.patch.clone()),
                    Version::Original => None,
                })
                .chain([t.patch.clone()])
                .collect();
            for p in self.patches.iter_mut().filter(|p| owners.contains(&p.name)) {
                p.forced = true;
            }
        }
        self.drop_unused_stacks();
        t.outcome = match (forced, t.reversed, t.timed_out) {
            (true, ..) => Outcome::Forced,
            (false, false, _) => Outcome::Done,
            (false, true, false) => Outcome::Reversed,
            (false, true, true) => Outcome::TimedOut,
        };
        t.stage = Stage::Ended;
        t.pending = 0;
        t.blockers.clear();
        if t.reversed && !forced && t.unload_on_failure {
            self.unload(guest, &t.patch)?;
        }
        Ok(())
    }

    /// The code a task leaves, for each function that moves per task (`all`: every
    /// function, for immediate consistency).
    fn leaving<'t>(
        &self,
        t: &'t Transition,
        side: impl Fn(&'t crate::funcs::FuncChange) -> &'t Version,
        all: bool,
    ) -> Vec<CodeRange> {
        t.changes
            .iter()
            .filter(|c| all || !c.immediate)
            .map(|c| match self.funcs.get(&c.func) {
                Some(s) => s.code(side(c)),
                None => self.original_code(c.func, side(c)),
            })
            .collect()
    }

    /// What a task not yet on the target side leaves when it moves: the starting
    /// versions going forward, the target ones once reversed.
    fn leaving_far_side(&self, t: &Transition) -> Vec<CodeRange> {
        let reversed = t.target_is_start();
        self.leaving(t, |c| if reversed { &c.to } else { &c.from }, false)
    }

    /// The code of `v` for a function that has no stack yet (the first enable).
    fn original_code(&self, func: u64, v: &Version) -> CodeRange {
        match (crate::funcs::named(&self.patches, func), v) {
            (Some(f), _) => FuncStack::of(f).code(v),
            (None, Version::Code(c)) => CodeRange::of(c),
            (None, Version::Original) => CodeRange {
                start: func,
                end: func + 1,
                name: format!("{func:#x}"),
            },
        }
    }

    /// What the first tick checks every task against: the starting versions of the
    /// functions that move per task (every function, for immediate consistency).
    pub(crate) fn start_code(&self, t: &Transition) -> CheckedCode {
        CheckedCode {
            leaving: self.leaving(t, |c| &c.from, t.consistency == Consistency::Immediate),
            tramps: self.trampoline_code(),
        }
    }

    /// What a later tick checks the tasks not yet moved against.
    pub(crate) fn far_side_code(&self, t: &Transition) -> CheckedCode {
        CheckedCode {
            leaving: self.leaving_far_side(t),
            tramps: self.trampoline_code(),
        }
    }

    /// What the next tick of the transition in progress will check stacks against,
    /// if that is known before it (no request waiting to change it).
    pub(crate) fn next_code(&self) -> Option<CheckedCode> {
        let t = self.active.as_ref()?;
        if t.request.is_some() {
            return None;
        }
        match t.stage {
            Stage::Waiting => Some(self.start_code(t)),
            Stage::Switching { .. } => Some(self.far_side_code(t)),
            Stage::Ended => None,
        }
    }

    /// Every task of the paused guest, timed into the tick's parts; how the list was
    /// read is counted into `counts`.
    fn list_tasks(
        &mut self,
        guest: &dyn PausedGuest,
        kernel: &Kernel,
        counts: &mut EarlyCheckCounts,
    ) -> Result<TaskList, KpError> {
        let started = Instant::now();
        let list = self
            .confirmed_list(&TaskReader::new(kernel, guest), counts)
            .map_err(|e| KpError::Guest(format!("listing tasks: {e}")));
        self.tick_parts.list_us += micros(started.elapsed());
        list
    }

    /// Unwind `tasks`, with patch code and trampolines known to the unwinder.
    pub fn unwind(
        &self,
        guest: &dyn PausedGuest,
        kernel: &Kernel,
        tasks: &[&Task],
    ) -> Vec<StackTrace> {
        self.with_unwinder(guest, kernel, |_, unwinder| {
            tasks.iter().map(|x| unwinder.trace(x)).collect()
        })
    }

    /// Run `f` with a task reader of `guest` and an unwinder over it that knows patch
    /// code and trampolines.
    pub(crate) fn with_unwinder<R>(
        &self,
        guest: &dyn PausedGuest,
        kernel: &Kernel,
        f: impl FnOnce(&TaskReader, &Unwinder) -> R,
    ) -> R {
        let reader = TaskReader::new(kernel, guest);
        let code = PatchCode(self);
        let extra: [&dyn ExtraCode; 1] = [&code];
        f(&reader, &Unwinder::new(&reader, &extra))
    }

    /// A kernel function's site record, created at its first redirection.
    fn ensure_stack(&mut self, func: u64) -> Result<(), KpError> {
        if self.funcs.contains_key(&func) {
            return Ok(());
        }
        let f = crate::funcs::named(&self.patches, func)
            .ok_or_else(|| KpError::State(format!("no loaded patch names {func:#x}")))?;
        self.funcs.insert(func, FuncStack::of(f));
        Ok(())
    }

    /// Site records of functions whose site is the original again.
    fn drop_unused_stacks(&mut self) {
        self.funcs.retain(|_, s| s.live != s.original);
    }

    /// Every site still holds what lpvmm last wrote there (nothing else changed it), and
    /// the guest's ftrace lets go of or takes back the sites that cross the NOP: the
    /// record writes to make with the sites (see [`crate::ftrace`]).
    fn check_sites(
        &self,
        guest: &dyn PausedGuest,
        kernel: &Kernel,
        writes: &[(u64, [u8; 5])],
    ) -> Result<Vec<FlagWrite>, KpError> {
        for (func, _) in writes {
            let s = &self.funcs[func];
            let mut now = [0u8; 5];
            guest
                .read_phys(s.site_pa, &mut now)
                .map_err(|e| KpError::guest(&format!("reading the site of {}", s.name), e))?;
            if now != s.live {
                // The guest's ftrace may have taken a site lpvmm had left as the NOP.
                return Err(match crate::site::inspect(&s.name, s.site, &now) {
                    Err(why) if now[0] == crate::site::CALL_REL32 => why,
                    _ => KpError::Site(format!(
                        "{} at {:#x} was changed by something other than lpvmm",
                        s.name, s.site
                    )),
                });
            }
        }
        let moves: Vec<(&FuncStack, SiteMove)> = writes
            .iter()
            .filter_map(|(func, bytes)| {
                let s = &self.funcs[func];
                SiteMove::of(s, bytes).map(|m| (s, m))
            })
            .collect();
        ftrace::plan(kernel, guest, &moves)
    }

    /// The sites, with the ftrace record writes [`Engine::check_sites`] planned for them:
    /// records hidden before their site leaves the NOP, given back after it returns.
    fn write_sites(
        &mut self,
        guest: &mut dyn GuestWriter,
        writes: &[(u64, [u8; 5])],
        flags: Vec<FlagWrite>,
    ) -> Result<(), KpError> {
        let (releases, claims): (Vec<_>, Vec<_>) = flags.into_iter().partition(|f| f.release);
        self.write_flags(guest, claims)?;
        for (func, bytes) in writes {
            let s = self.funcs.get_mut(func).ok_or_else(|| no_stack(*func))?;
            if s.live != *bytes {
                guest
                    .write_phys(s.site_pa, bytes)
                    .map_err(|e| KpError::guest(&format!("writing the site of {}", s.name), e))?;
                s.live = *bytes;
            }
        }
        self.write_flags(guest, releases)
    }

    fn write_flags(
        &mut self,
        guest: &mut dyn GuestWriter,
        flags: Vec<FlagWrite>,
    ) -> Result<(), KpError> {
        for f in flags {
            let s = self
                .funcs
                .get_mut(&f.func)
                .ok_or_else(|| no_stack(f.func))?;
            guest
                .write_phys(f.flags_pa, &f.flags.to_le_bytes())
                .map_err(|e| KpError::guest(&format!("the ftrace record of {}", s.name), e))?;
            s.ftrace_hidden = f.hidden;
        }
        Ok(())
    }

    pub(crate) fn geometry(&self) -> Result<Geometry, KpError> {
        self.dispatch
            .as_ref()
            .map(|d| d.geometry)
            .ok_or_else(|| KpError::State("per-task dispatch is not set up".into()))
    }

    fn dispatch(&self) -> Result<&Dispatch, KpError> {
        self.dispatch
            .as_ref()
            .ok_or_else(|| KpError::State("per-task dispatch is not set up".into()))
    }

    fn dispatch_bank(&self, i: usize) -> Result<Bank, KpError> {
        self.dispatch()?
            .banks
            .get(i)
            .cloned()
            .ok_or_else(|| KpError::State(format!("no trampoline bank {i}")))
    }

    fn layout(&self) -> Result<crate::area::AreaLayout, KpError> {
        self.area
            .as_ref()
            .map(|a| a.layout.clone())
            .ok_or_else(|| KpError::State("no patch area: no patch is loaded".into()))
    }

    /// A bank no task can be inside: free, or retired with every suspect seen outside.
    fn free_bank(&mut self) -> Option<usize> {
        let d = self.dispatch.as_mut()?;
        let i = d.banks.iter().position(|b| match &b.state {
            BankState::Free => true,
            BankState::Retired { suspects } => suspects.is_empty(),
            BankState::Live => false,
        })?;
        d.banks[i].state = BankState::Free;
        Some(i)
    }

    /// Tasks that are gone, or were unwound reliably outside a retired bank, are no
    /// longer suspected of being inside it.
    fn clear_suspects(&mut self, list: &TaskList, checks: &[Check]) {
        let Some(d) = self.dispatch.as_mut() else {
            return;
        };
        let suspected = |b: &crate::dispatch::Bank| matches!(&b.state, BankState::Retired { suspects } if !suspects.is_empty());
        if !d.banks.iter().any(suspected) {
            return;
        }
        // Sorted addresses, searched: one pass over the traces per bank, not one per
        // suspect (thousands of tasks are suspects of a bank a per-task transition
        // retired), and no hashing in the pause.
        let mut live: Vec<u64> = list.tasks.iter().map(|x| x.addr).collect();
        live.sort_unstable();
        for b in &mut d.banks {
            if let BankState::Retired { suspects } = &mut b.state {
                // A task in no trampoline is in none of this bank's.
                let mut cleared: Vec<u64> = checks
                    .iter()
                    .filter(|c| c.out_of_trampolines)
                    .map(|c| c.task)
                    .collect();
                cleared.sort_unstable();
                suspects
                    .retain(|s| live.binary_search(s).is_ok() && cleared.binary_search(s).is_err());
            }
        }
    }

    /// Trampoline banks and task maps, placed in the patch area once.
    fn ensure_dispatch(&mut self, guest: &dyn PausedGuest, kernel: &Kernel) -> Result<(), KpError> {
        if self.dispatch.is_some() {
            return Ok(());
        }
        let need = |what: &str| {
            KpError::State(format!(
                "per-task consistency needs {what}, which this guest kernel lacks; use \
                 --consistency immediate"
            ))
        };
        let (base, task_size) = task_granule(guest, kernel)?;
        let current_offset = kernel
            .current_task_offset()
            .ok_or_else(|| need("the per-CPU current_task"))?;
        let ram_top = guest
            .ram_ranges()
            .iter()
            .map(|r| r.end())
            .max()
            .unwrap_or(0);
        let geometry = Geometry::new(base, task_size, ram_top, kernel.addrs.init_task);
        let area = self
            .area
            .as_mut()
            .ok_or_else(|| KpError::State("no patch area".into()))?;
        let per_bank = (geometry.bitmap_bytes() + 8).div_ceil(4096) * 4096;
        let runs = area.space.place(
            "per-task dispatch (trampolines and task maps)",
            Sizes {
                code: BANKS as u64 * BANK_CODE,
                rodata: 0,
                data: BANKS as u64 * per_bank,
            },
        )?;
        // Never freed: a retired bank is reused by later transitions.
        area.space.take(runs);
        // A patch linked before this took its place in the area must be linked again.
        self.generation += 1;
        let (code, data) = (runs.code.start, runs.data.start);
        let banks = (0..BANKS as u64)
            .map(|i| Bank {
                code: Region {
                    start: code + i * BANK_CODE,
                    end: code + (i + 1) * BANK_CODE,
                },
                map_va: data + i * per_bank,
                map_bytes: geometry.bitmap_bytes(),
                state: BankState::Free,
                slots: Vec::new(),
            })
            .collect();
        self.dispatch = Some(Dispatch {
            geometry,
            current_offset,
            banks,
        });
        Ok(())
    }
}

/// A site write for a function the engine keeps no version stack of: a bug of the
/// engine's, refused as an error rather than a panic in the pause.
fn no_stack(func: u64) -> KpError {
    KpError::State(format!("no version stack for the function at {func:#x}"))
}

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The tasks of `checks` that may not move, each with why.
fn blockers_of(checks: &[Check]) -> Vec<Blocker> {
    checks
        .iter()
        .filter_map(|c| Some(blocker(&c.trace, c.unsafe_because.clone()?)))
        .collect()
}

fn blocker(tr: &StackTrace, reason: String) -> Blocker {
    Blocker {
        pid: tr.pid,
        comm: tr.comm.clone(),
        reason,
        trace: tr.clone(),
    }
}

/// Tasks not yet on the target side of the map.
pub(crate) fn pending<'l>(
    map: &TaskMap,
    g: &Geometry,
    list: &'l TaskList,
    target_start: bool,
) -> Vec<&'l Task> {
    list.tasks
        .iter()
        .filter(|x| map.on_start(g, x.addr) != target_start)
        .collect()
}

/// Write the map's changed words and init_task's slot.
fn write_map(
    guest: &mut dyn GuestWriter,
    layout: &crate::area::AreaLayout,
    bank: Bank,
    g: &Geometry,
    map: &mut TaskMap,
) -> Result<(), KpError> {
    let (runs, init) = map.take_dirty();
    for run in runs {
        guest
            .write_phys(layout.pa(bank.map_va + run.offset), &run.bytes)
            .map_err(|e| KpError::guest("writing the task map", e))?;
    }
    if init {
        let v = if map.init_on_start { g.init_task } else { 0 };
        guest
            .write_phys(layout.pa(bank.init_slot_va()), &v.to_le_bytes())
            .map_err(|e| KpError::guest("writing the task map", e))?;
    }
    Ok(())
}

/// Patch code and trampolines as the unwinder sees them.
pub struct PatchCode<'e>(pub &'e Engine);

impl PatchCode<'_> {
    fn in_trampolines(&self, ip: u64) -> bool {
        self.0.trampoline_code().iter().any(|r| r.contains(ip))
    }
}

impl ExtraCode for PatchCode<'_> {
    fn contains(&self, ip: u64) -> bool {
        self.0.patches.iter().any(|p| p.runs.code.contains(ip)) || self.in_trampolines(ip)
    }

    fn unwind_entry(&self, ip: u64, interrupted: bool) -> Option<OrcEntry> {
        if self.in_trampolines(ip) {
            return Some(AT_ENTRY);
        }
        // With objtool's table (kbuild builds), every instruction unwinds as the
        // kernel's own code does.
        if let Some(p) = self.0.patches.iter().find(|p| p.runs.code.contains(ip)) {
            if !p.orc.is_empty() {
                return p.orc_at(ip);
            }
        }
        // Otherwise: an interrupted address may be in a prologue or epilogue, where the
        // frame pointer is not set up, so only return addresses unwind reliably.
        if interrupted {
            return None;
        }
        let (_, f) = self.0.function_at(ip)?;
        f.frame_pointer.then_some(OrcEntry::FRAME_POINTER)
    }

    fn describe(&self, ip: u64, interrupted: bool) -> Option<String> {
        if self.in_trampolines(ip) {
            let func = self.0.trampoline_at(ip).unwrap_or("?");
            let start = ip & !(MAX_TRAMPOLINE - 1);
            return Some(format!(
                "lpvmm_trampoline+{:#x}/{MAX_TRAMPOLINE:#x} [{func}]",
                ip - start
            ));
        }
        let at = if interrupted { ip } else { ip.wrapping_sub(1) };
        let (p, f) = self.0.function_at(at)?;
        Some(format!(
            "{}+{:#x}/{:#x} [{}]",
            f.new_name,
            ip - f.new_addr,
            f.new_size,
            p.name
        ))
    }
}

/// Where task_structs can be (the direct map's base) and how far apart they are at least
/// (the task-map granule), from the guest kernel.
fn task_granule(guest: &dyn PausedGuest, kernel: &Kernel) -> Result<(u64, u64), KpError> {
    let need = |what: &str| {
        KpError::State(format!(
            "per-task consistency needs {what}, which this guest kernel lacks; use \
             --consistency immediate"
        ))
    };
    let mem = kernel.memory(guest);
    let pob = kernel
        .symbols
        .addr("page_offset_base")
        .ok_or_else(|| need("the symbol page_offset_base"))?;
    let base = mem
        .u64(pob)
        .map_err(|e| KpError::Guest(format!("reading page_offset_base: {e}")))?;
    // task_structs are `arch_task_struct_size` bytes apart at least: on x86 that is
    // sizeof(struct task_struct) with the FPU state resized to what the CPU saves,
    // often smaller than the static size BTF gives. The granule must not exceed
    // either.
    let btf_size = kernel
        .layout
        .patcher
        .task_struct_size
        .ok_or_else(|| need("the size of struct task_struct in BTF"))?;
    let task_size = match kernel.symbols.addr("arch_task_struct_size") {
        Some(a) => {
            let n = u64::from(
                mem.u32(a)
                    .map_err(|e| KpError::Guest(format!("reading arch_task_struct_size: {e}")))?,
            );
            if n < 1024 {
                return Err(KpError::Guest(format!(
                    "arch_task_struct_size is {n}, too small for a task_struct"
                )));
            }
            n.min(btf_size)
        }
        None => btf_size,
    };
    Ok((base, task_size))
}

/// A bank's trampolines, assembled: their code by address, and the function each slot
/// serves.
struct Trampolines {
    code: Vec<(u64, Vec<u8>)>,
    slots: Vec<String>,
}

/// One trampoline per function that moves per task, each in its slot of the bank's
/// code; each change learns its trampoline.
fn assemble_trampolines(
    funcs: &BTreeMap<u64, FuncStack>,
    t: &mut Transition,
    env: &TrampolineEnv,
    bank_code: Region,
) -> Result<Trampolines, KpError> {
    let mut code = Vec::new();
    let mut slots = Vec::new();
    let mut at = bank_code.start;
    for c in t.changes.iter_mut().filter(|c| !c.immediate) {
        let s = &funcs[&c.func];
        let targets = Targets {
            start: s.entry(&c.from),
            target: s.entry(&c.to),
        };
        let bytes = dispatch::trampoline(env, targets, at)?;
        if bytes.len() as u64 > MAX_TRAMPOLINE || at + MAX_TRAMPOLINE > bank_code.end {
            return Err(KpError::State(format!(
                "patch '{}' has more functions than one trampoline bank holds ({}); use \
                 --consistency immediate",
                t.patch,
                BANK_CODE / MAX_TRAMPOLINE
            )));
        }
        c.trampoline = Some(at);
        slots.push(c.name.clone());
        code.push((at, bytes));
        at += MAX_TRAMPOLINE;
    }
    Ok(Trampolines { code, slots })
}

/// What each function's site holds while its tasks move: a jump to its trampoline, or
/// (immediate functions) the version they move to.
fn site_writes(
    funcs: &BTreeMap<u64, FuncStack>,
    changes: &[FuncChange],
) -> Result<Vec<(u64, [u8; 5])>, KpError> {
    changes
        .iter()
        .map(|c| {
            let s = &funcs[&c.func];
            Ok((
                c.func,
                match c.trampoline {
                    Some(tr) => crate::site::jump(s.site, tr)?,
                    None => s.site_bytes(&c.to)?,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transition::{Consistency, Op, Transition};
    use introspection::stack::TraceStart;

    fn task(addr: u64, pid: i32) -> Task {
        Task {
            addr,
            pid,
            tgid: pid,
            comm: format!("t{pid}"),
            state: 'S',
            kthread: false,
            idle: false,
            cpu: 0,
            on_cpu: false,
            vcpu: None,
            switches: 0,
            saved_sp: 0,
        }
    }

    fn trace(t: &Task, start: TraceStart) -> StackTrace {
        StackTrace {
            pid: t.pid,
            tgid: t.tgid,
            comm: t.comm.clone(),
            state: 'S',
            task: t.addr,
            start,
            frames: vec![],
            reliable: false,
            problem: Some("test: unknown".into()),
        }
    }

    #[test]
    fn a_safe_task_never_moves_a_granule_an_unsafe_one_shares() {
        let base = 0xffff_8880_0000_0000;
        // A granule (8 KiB) that two 6 KiB task_structs start in.
        let g = Geometry::new(base, 8192, 1 << 30, 0xffff_ffff_8260_0000);
        let (a, b, c) = (
            task(base + 0x10000, 1),
            task(base + 0x11800, 2),
            task(base + 0x40000, 3),
        );
        assert_eq!(g.bit(a.addr), g.bit(b.addr));
        let mut e = Engine::default();
        e.dispatch = Some(Dispatch {
            geometry: g,
            current_offset: 0,
            banks: vec![],
        });
        let mut t = Transition::new(1, "p", Op::Enable, Consistency::PerTask, None, vec![], 0);
        let mut map = TaskMap::filled(&g, false);
        for x in [&a, &b, &c] {
            map.set(&g, x.addr, true);
        }
        t.stage = Stage::Switching { bank: 0, map };
        let list = TaskList {
            tasks: vec![a.clone(), b.clone(), c.clone()],
            vcpus: vec![],
        };
        let code = CheckedCode {
            leaving: vec![],
            tramps: vec![],
        };
        let checks: Vec<Check> = [
            trace(&a, TraceStart::UserMode(0)),
            trace(&b, TraceStart::Saved),
            trace(&c, TraceStart::UserMode(1)),
        ]
        .into_iter()
        .map(|trace| Check::judged(trace, &code))
        .collect();
        let blockers = e.move_safe(t.switching_mut().unwrap().1, &g, &list, &checks, false);
        let mut who: Vec<(i32, &str)> = blockers
            .iter()
            .map(|x| (x.pid, x.reason.as_str()))
            .collect();
        who.sort();
        assert_eq!(who[0].0, 1);
        assert!(who[0].1.contains("shares a task-map granule"));
        assert_eq!(who[1].0, 2);
        let map = t.switching().unwrap().1;
        assert!(map.on_start(&g, a.addr) && map.on_start(&g, b.addr));
        assert!(
            !map.on_start(&g, c.addr),
            "a task with a granule of its own moves"
        );
    }
}
