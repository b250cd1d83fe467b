//! The engine's side of a transition: one [`Engine::tick`] per pause, which looks at
//! the guest's tasks and writes the sites, trampolines and task map (see
//! [`crate::transition`] for the model), and the unwinds made for it while the guest
//! runs ([`Engine::unwind_early`]), which the tick confirms in its pause.

use std::time::{Duration, Instant};

use introspection::kernel::Kernel;
use introspection::modules::ModuleCode;
use introspection::orc::{reg, OrcEntry, OrcKind};
use introspection::stack::{ExtraCode, StackTrace, Unwinder};
use introspection::tasks::{Task, TaskList, TaskReader};
use introspection::PausedGuest;

use introspection::{GuestRam, Unconfirmed};

use crate::engine::Engine;
use crate::funcs::{CodeRange, FuncStack, Version};
use crate::transition::banks::write_map;
use crate::transition::dispatch::{pending, BankState, Geometry, TaskMap, MAX_TRAMPOLINE};
use crate::transition::early::{same_list, same_trace, EarlyList, EarlyTraces, Stamp};
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
        self.queue_after_calls(&mut t);
        if t.finished() && t.calls.unload_after {
            // No callback left to run its code: the patch loaded for it goes now.
            if let Err(e) = self.unload(guest, kernel, &t.patch) {
                t.note = Some(format!("could not unload {}: {e}", t.patch));
            }
        }
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
                self.unload_failed(t, guest, kernel)?;
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
            self.unload_failed(t, guest, kernel)?;
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
        if t.reversed && !forced {
            self.unload_failed(t, guest, kernel)?;
        }
        Ok(())
    }

    /// A patch loaded for an enable that did not complete is unloaded: now, or, when
    /// it has callbacks, once its post-unpatch callbacks ran (they are its code).
    fn unload_failed(
        &mut self,
        t: &mut Transition,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
    ) -> Result<(), KpError> {
        if !t.unload_on_failure {
            return Ok(());
        }
        if t.calls.any {
            t.calls.unload_after = true;
            return Ok(());
        }
        self.unload(guest, kernel, &t.patch)
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
            .map_err(|e| KpError::guest("listing tasks", e));
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
    /// code and trampolines, and the guest's modules as they are now (each module's
    /// tables read when a stack first passes through it).
    pub(crate) fn with_unwinder<R>(
        &self,
        guest: &dyn PausedGuest,
        kernel: &Kernel,
        f: impl FnOnce(&TaskReader, &Unwinder) -> R,
    ) -> R {
        let reader = TaskReader::new(kernel, guest);
        let code = PatchCode(self);
        let modules = ModuleCode::new(kernel, kernel.memory(guest));
        let extra: [&dyn ExtraCode; 2] = [&code, &modules];
        f(&reader, &Unwinder::new(&reader, &extra))
    }
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

/// Patch code and trampolines as the unwinder sees them.
pub struct PatchCode<'e>(pub &'e Engine);

impl PatchCode<'_> {
    fn in_trampolines(&self, ip: u64) -> bool {
        self.0.trampoline_code().iter().any(|r| r.contains(ip))
    }

    /// The module notifier's stub ([`crate::notifier`]), where a loading task waits.
    fn in_notifier(&self, ip: u64) -> bool {
        self.0
            .notifier
            .as_ref()
            .is_some_and(|n| n.stub.contains(ip))
    }

    /// The guest-call functions ([`crate::guestcall`]), where a kworker runs a callback.
    fn in_guest_call(&self, ip: u64) -> bool {
        self.guest_call_at(ip).is_some()
    }

    /// The guest-call machinery whose functions hold `ip`: the one in use, or one set
    /// aside with a callback that did not return.
    fn guest_call_at(&self, ip: u64) -> Option<&crate::guestcall::GuestCaller> {
        let set_aside = self.0.set_aside.iter().map(|s| &s.caller);
        self.0
            .caller
            .iter()
            .chain(set_aside)
            .find(|c| c.code.contains(ip))
    }
}

impl ExtraCode for PatchCode<'_> {
    fn contains(&self, ip: u64) -> bool {
        self.0.patches.iter().any(|p| p.runs.code.contains(ip))
            || self.in_trampolines(ip)
            || self.in_notifier(ip)
            || self.in_guest_call(ip)
    }

    fn unwind_entry(&self, ip: u64, interrupted: bool) -> Option<OrcEntry> {
        if self.in_trampolines(ip) {
            return Some(AT_ENTRY);
        }
        // The stubs call (msleep, printk) only with their frame set up: a return address
        // in one unwinds by the frame pointer. An interrupted address may be in a
        // prologue, except where the notifier's stub has its frame (a task ringing its
        // doorbell is caught there).
        if self.in_notifier(ip) {
            let framed = self
                .0
                .notifier
                .as_ref()
                .is_some_and(|n| n.framed.contains(&ip));
            return (!interrupted || framed).then_some(OrcEntry::FRAME_POINTER);
        }
        if self.in_guest_call(ip) {
            return (!interrupted).then_some(OrcEntry::FRAME_POINTER);
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
        if let Some(n) = self.0.notifier.as_ref().filter(|_| self.in_notifier(ip)) {
            return Some(format!(
                "lpvmm_module_notifier+{:#x}/{:#x}",
                ip - n.stub.start,
                n.stub.end - n.stub.start
            ));
        }
        if let Some(c) = self.guest_call_at(ip) {
            return Some(format!(
                "lpvmm_guest_call+{:#x}/{:#x}",
                ip - c.code.start,
                c.code.end - c.code.start
            ));
        }
        let at = if interrupted { ip } else { ip.wrapping_sub(1) };
        // Code of a patch the guest knows as a module is named as the guest names it,
        // from that module's symbols (the module code that comes next in the unwinder's
        // list): `func+0xoff/0xsize [module]`, the module's name spelled with `_`.
        if self
            .0
            .patches
            .iter()
            .any(|p| p.guest_module.is_some_and(|m| m.text.contains(at)))
        {
            return None;
        }
        let callback = self
            .0
            .patches
            .iter()
            .find_map(|p| p.callback_at(at).map(|c| (p, c)));
        if let Some((p, c)) = callback {
            return Some(format!(
                "{}+{:#x}/{:#x} [{}]",
                c.func,
                ip - c.addr,
                c.size,
                p.name
            ));
        }
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

/// The checks made before the pause ([`crate::transition::early`] says what they are and
/// why they are sound): the early unwind while the guest runs, and, in the tick's
/// pause, the confirmation of what it read.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Dispatch;
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
