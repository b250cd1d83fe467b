//! The guest's modules coming and going, as patches see them (the kernel livepatch's
//! `klp_module_coming` and `klp_module_going`). The doorbell of lpvmm's module notifier
//! ([`crate::notifier`]) brings each event here, in a pause:
//!
//! - **COMING** (the module's text final, its ftrace records enabled, none of its code
//!   run yet): every loaded patch with a part for that module is linked again at its
//!   place with the module's symbols (those the patch uses from the module were pending
//!   until now), its functions are found in the module, and each one whose visible
//!   version is a patch's gets its jump. All of it or none: a patch whose module part
//!   cannot be linked (a symbol the module lacks, a site ftrace holds) refuses the
//!   module's load, with a line in the guest's kernel log, and changes nothing.
//! - **GOING** (before the module's memory is freed): its sites get their original
//!   bytes back (and their ftrace records), its functions are forgotten, its pending
//!   symbols point at the patch's trap again. lpvmm never writes to the module's memory
//!   after this.
//!
//! While a transition runs, an event for a module a patch has a part for is answered
//! "ring again" until the transition ends: the loading task waits in the notifier (which
//! unwinds reliably), and the module's functions never join a transition half-way.

use std::collections::VecDeque;

use introspection::kernel::Kernel;
use introspection::modules::{Module, ModuleList, ModuleState, ModuleSymbols};

use crate::engine::Engine;
use crate::funcs::site::{self, SiteState};
use crate::funcs::{self as versions, Version};
use crate::load::late::LateLink;
use crate::load::link::{self, ImportAt};
use crate::load::manifest::CallbackKind;
use crate::notifier::ModuleEvent;
use crate::notifier::{Answer, EventRun, Ring, NOTIFY_DONE, REFUSE};
use crate::patch::{ObjectName, ObjectState, PatchedFunc};
use crate::transition::calls::Call;
use crate::{GuestWriter, KpError};

/// Events kept for `patch status`.
const KEPT_EVENTS: usize = 32;

/// Which of the two events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Coming,
    Going,
}

/// Site writes checked and ready: each function's new site bytes, and the ftrace
/// record writes around them.
struct SiteWrites {
    sites: Vec<(u64, [u8; 5])>,
    flags: Vec<crate::funcs::ftrace::FlagWrite>,
}

/// One patch's part for an arriving module, checked and ready to write.
struct Arrival {
    patch: usize,
    object: usize,
    funcs: Vec<PatchedFunc>,
    /// Patch-area bytes that change (guest-physical address, bytes).
    relinked: Vec<(u64, Vec<u8>)>,
    /// The module's symbols the patch uses, where they are.
    resolved: Vec<(String, u64)>,
}

impl Engine {
    /// Set how the guest's module notifier reaches the VMM (before any patch with a
    /// module part is loaded).
    pub fn set_doorbell(&mut self, bell: crate::notifier::Doorbell) {
        self.doorbell = Some(bell);
    }

    /// The installed module notifier, if any.
    pub fn notifier(&self) -> Option<&crate::notifier::Notifier> {
        self.notifier.as_ref()
    }

    /// What the guest's modules coming and going did, oldest first.
    pub fn module_events(&self) -> &VecDeque<ModuleEvent> {
        &self.module_events
    }

    /// Handle one ring of the module notifier's doorbell, in a pause. Every field of
    /// the ring is checked (the token, the `out` it came from, the module on the guest's
    /// list in a state that fits the event); a ring that fails a check is answered
    /// NOTIFY_DONE and changes nothing.
    pub fn module_ring(
        &mut self,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        ring: Ring,
    ) -> Answer {
        self.journaled(guest, |engine, guest| {
            engine.ring_journaled(guest, kernel, ring)
        })
    }

    /// The answer to a ring that needs no pause, read from the running guest: a ring
    /// that is not the notifier's, or for a module no patch has a part for, is done; one
    /// for a module a patch has a part for waits while a transition runs. `None`: the
    /// ring needs [`Engine::module_ring`] in a pause.
    pub fn module_ring_unpaused(
        &self,
        ram: &dyn introspection::GuestRam,
        kernel: &Kernel,
        ring: Ring,
    ) -> Option<Answer> {
        let done = Some(Answer::DONE);
        if !self.rung_by_notifier(ring) {
            return done;
        }
        let l = kernel.layout.modules.as_ref().ok()?;
        let mem = introspection::memory::KernelMemory::new(ram, kernel.root);
        let name = mem
            .fixed_str(
                ring.module.wrapping_add(l.name),
                l.name_len.min(256) as usize,
            )
            .ok()?;
        if !self.has_part(&name) {
            return done;
        }
        self.active.is_some().then_some(Answer::RETRY)
    }

    /// Whether `ring` carries the VM's token and came from the notifier's `out`.
    fn rung_by_notifier(&self, ring: Ring) -> bool {
        match (&self.notifier, self.doorbell) {
            (Some(n), Some(bell)) => ring.token == bell.token && n.rang_here(ring.rip),
            _ => false,
        }
    }

    /// Whether a loaded patch has a part for module `name`.
    fn has_part(&self, name: &str) -> bool {
        let name = ObjectName::Module(name.to_string());
        self.patches
            .iter()
            .any(|p| p.objects.iter().any(|o| o.name == name))
    }

    fn ring_journaled(
        &mut self,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        ring: Ring,
    ) -> Answer {
        if !self.rung_by_notifier(ring) {
            return Answer::DONE;
        }
        let Some((module, action)) = self.ring_module(guest, kernel, ring) else {
            return Answer::DONE;
        };
        if !self.has_part(&module.name) {
            return Answer::DONE;
        }
        let key = (ring.module, ring.action);
        let run = match self.events.iter().position(|r| r.key == key) {
            Some(i) => self.events.swap_remove(i),
            // A new event waits for the transition in progress to end.
            None if self.active.is_some() => return Answer::RETRY,
            None => {
                // A livepatch module's object learns its module before its callbacks.
                if action == Action::Coming {
                    self.set_klp_mod(guest, kernel, &module.name, module.addr);
                }
                self.event_run(key, &module, action)
            }
        };
        self.event_step(guest, kernel, &module, action, run, ring.result)
    }

    /// A module event, with the callbacks the enabled patches have for the module: the
    /// "before" ones (pre-patch, pre-unpatch) and the "after" ones.
    fn event_run(&self, key: (u64, u64), module: &Module, action: Action) -> EventRun {
        let (before, after) = match action {
            Action::Coming => (CallbackKind::PrePatch, CallbackKind::PostPatch),
            Action::Going => (CallbackKind::PreUnpatch, CallbackKind::PostUnpatch),
        };
        EventRun {
            key,
            before: self.module_calls(module, before, None),
            after: self.module_calls(module, after, None),
            calling: None,
            pre_ok: Vec::new(),
            worked: false,
            refusal: None,
            outcome: String::new(),
        }
    }

    /// The `kind` callbacks for `module` of the enabled patches (of those in `only`,
    /// if given), each with the patch's name.
    fn module_calls(
        &self,
        module: &Module,
        kind: CallbackKind,
        only: Option<&[String]>,
    ) -> VecDeque<(String, Call)> {
        let object = ObjectName::Module(module.name.clone());
        self.patches
            .iter()
            .filter(|p| p.state == crate::patch::PatchState::Enabled)
            .filter(|p| only.is_none_or(|o| o.contains(&p.name)))
            .flat_map(|p| {
                p.callbacks
                    .iter()
                    .filter(|c| c.kind == kind && c.object == object)
                    .map(|c| {
                        let call = Call {
                            kind,
                            object: module.name.clone(),
                            func: c.func.clone(),
                            addr: c.addr,
                            arg: p.callback_arg(&object, module.addr),
                            void: p.void_callback(kind),
                        };
                        (p.name.clone(), call)
                    })
            })
            .collect()
    }

    /// One step of a module event: take the result of the callback the stub called,
    /// then call the next one, or do the event's own work, or finish.
    fn event_step(
        &mut self,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        module: &Module,
        action: Action,
        mut run: EventRun,
        result: Option<i64>,
    ) -> Answer {
        match (run.calling.take(), result) {
            (Some((patch, call)), Some(ret)) => self.called(module, &mut run, patch, call, ret),
            // Rung without the result: the stub has not called it yet; ask again.
            (Some(pending), None) => return self.call_in_loader(run, pending),
            (None, _) => {}
        }
        if let Some(next) = run.before.pop_front() {
            return self.call_in_loader(run, next);
        }
        if !run.worked {
            run.worked = true;
            let worked = match action {
                Action::Coming => self.coming(guest, kernel, module),
                Action::Going => self.going(guest, kernel, module),
            };
            match worked {
                Ok(did) => run.outcome += &format!("{did}; "),
                Err(e) => self.refuse(module, &mut run, e.to_string(), -22),
            }
        }
        if let Some(next) = run.after.pop_front() {
            return self.call_in_loader(run, next);
        }
        self.finish_event(guest, kernel, module, action, run)
    }

    /// Ask the stub to call `next` in the loading task; the run waits for its result.
    fn call_in_loader(&mut self, mut run: EventRun, next: (String, Call)) -> Answer {
        let answer = Answer::call(next.1.addr, next.1.arg);
        run.calling = Some(next);
        self.events.push(run);
        answer
    }

    /// A callback returned `ret`: a pre-patch's non-zero return refuses the module
    /// (post-unpatch then runs for the patches whose pre-patch succeeded).
    fn called(&mut self, module: &Module, run: &mut EventRun, patch: String, call: Call, ret: i64) {
        let ret = call.returned(ret);
        run.outcome += &format!("{} {} returned {ret}; ", call.kind.word(), call.func);
        if call.kind != CallbackKind::PrePatch {
            return;
        }
        if ret == 0 {
            run.pre_ok.push(patch);
            return;
        }
        let why = format!(
            "patch {patch}: its pre-patch callback {} returned {ret}",
            call.func
        );
        run.worked = true;
        self.refuse(module, run, why, ret);
    }

    /// The module's load is refused: no more pre-patch callbacks, post-unpatch for the
    /// patches whose pre-patch succeeded, then the refusal.
    fn refuse(&self, module: &Module, run: &mut EventRun, why: String, errno: i64) {
        run.before.clear();
        run.after = self.module_calls(module, CallbackKind::PostUnpatch, Some(&run.pre_ok));
        run.refusal = Some((why, errno));
    }

    /// The event's answer, and its line in `patch status`.
    fn finish_event(
        &mut self,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        module: &Module,
        action: Action,
        run: EventRun,
    ) -> Answer {
        let (outcome, answer) = match run.refusal {
            Some((why, errno)) => {
                let text = format!("refusing module {}: {why}", module.name);
                let message = self.log_message(guest, &text);
                // An errno the kernel knows (a callback's other return: EINVAL).
                let errno = if (-4095..0).contains(&errno) {
                    errno
                } else {
                    -22
                };
                let answer = Answer {
                    ret: REFUSE | (1 - errno) as u64,
                    message,
                    ..Answer::DONE
                };
                (format!("{why}; {}", run.outcome), answer)
            }
            None => (run.outcome, Answer::DONE),
        };
        let refused = answer.ret != NOTIFY_DONE;
        if refused || action == Action::Going {
            self.set_klp_mod(guest, kernel, &module.name, 0);
        }
        self.note_event(ModuleEvent {
            module: module.name.clone(),
            action: match action {
                Action::Coming => "coming",
                Action::Going => "going",
            }
            .into(),
            outcome: outcome.trim_end_matches("; ").to_string(),
            refused,
        });
        answer
    }

    /// Point the livepatch modules' `klp_object.mod` for module `name` at `module` (its
    /// `struct module`; 0 once it goes), as the kernel does before the object's
    /// callbacks. Patch-area memory, lpvmm's own: a write that fails leaves the field
    /// as it was, and the callbacks see that.
    fn set_klp_mod(&self, guest: &mut dyn GuestWriter, kernel: &Kernel, name: &str, module: u64) {
        let (Some(klp), Some(area)) = (kernel.layout.patcher.klp.as_ref(), &self.area) else {
            return;
        };
        let object = ObjectName::Module(name.to_string());
        for k in self.patches.iter().flat_map(|p| &p.klp_objects) {
            if k.object == object {
                let pa = area.layout.pa(k.addr + klp.object_mod);
                let _ = guest.write_phys(pa, &module.to_le_bytes());
            }
        }
    }

    /// The module a ring names, if it is on the guest's list in a state that fits the
    /// event (GOING also comes while a module is still COMING, when its load fails).
    fn ring_module(
        &self,
        guest: &dyn GuestWriter,
        kernel: &Kernel,
        ring: Ring,
    ) -> Option<(Module, Action)> {
        let states = &kernel.layout.modules.as_ref().ok()?.states;
        let mem = kernel.memory(guest.reader());
        let list = ModuleList::read(&mem, kernel).ok()?;
        let m = list.modules.into_iter().find(|m| m.addr == ring.module)?;
        let action = match ring.action {
            a if a == states[1] && m.state == ModuleState::Coming => Action::Coming,
            a if a == states[2] && matches!(m.state, ModuleState::Going | ModuleState::Coming) => {
                Action::Going
            }
            _ => return None,
        };
        Some((m, action))
    }

    fn log_message(&mut self, guest: &mut dyn GuestWriter, text: &str) -> u64 {
        let (Some(n), Some(area)) = (self.notifier.as_mut(), self.area.as_ref()) else {
            return 0;
        };
        n.message(guest, area, text).unwrap_or(0)
    }

    fn note_event(&mut self, e: ModuleEvent) {
        self.module_events.push_back(e);
        while self.module_events.len() > KEPT_EVENTS {
            self.module_events.pop_front();
        }
    }

    /// COMING: link and redirect every patch's part for `module`, or refuse it whole.
    fn coming(
        &mut self,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        module: &Module,
    ) -> Result<String, KpError> {
        let mem = kernel.memory(guest.reader());
        let symbols = module
            .symbols(&mem, kernel)
            .map_err(|e| KpError::GuestState(format!("module {}: {e}", module.name)))?;
        drop(mem);
        let mut arrivals = Vec::new();
        for (pi, p) in self.patches.iter().enumerate() {
            let Some(oi) = p
                .objects
                .iter()
                .position(|o| o.name == ObjectName::Module(module.name.clone()))
            else {
                continue;
            };
            let arrival = self
                .arrival(guest, kernel, module, &symbols, pi, oi)
                .map_err(|e| KpError::State(format!("patch {}: {e}", p.name)))?;
            arrivals.push(arrival);
        }
        self.arrive(guest, kernel, module, arrivals)
    }

    /// One patch's part for `module`, checked: its functions found, its pending symbols
    /// resolved, the patch linked again. Writes nothing.
    fn arrival(
        &self,
        guest: &dyn GuestWriter,
        kernel: &Kernel,
        module: &Module,
        symbols: &ModuleSymbols,
        pi: usize,
        oi: usize,
    ) -> Result<Arrival, KpError> {
        let p = &self.patches[pi];
        let mem = kernel.memory(guest.reader());
        let mut funcs = Vec::new();
        for f in &p.objects[oi].replaces {
            let s = symbols
                .resolve(&f.old.name, f.old.pos)
                .map_err(|e| KpError::Symbol(format!("module {}: {e}", module.name)))?;
            let size = symbols.locate(s.addr).and_then(|l| l.size).unwrap_or(0);
            if !matches!(s.kind, 't' | 'T') || !module.text.contains(s.addr) || size == 0 {
                return Err(KpError::Symbol(format!(
                    "{} is not a function of module {} (an __init function cannot be patched)",
                    f.old, module.name
                )));
            }
            let entry = mem
                .read_vec(s.addr, 9)
                .map_err(|e| KpError::guest(format!("reading {}", f.old), e))?;
            let site = s.addr + site::site_offset(&entry);
            let at = (site - s.addr) as usize;
            let bytes: [u8; 5] = entry[at..at + 5].try_into().unwrap_or_default();
            if site::inspect(&f.old.to_string(), site, &bytes)? != SiteState::Nop {
                return Err(KpError::Site(format!(
                    "{} at {site:#x} is not the fentry NOP",
                    f.old
                )));
            }
            let site_pa = mem
                .translate(site)
                .map_err(|e| KpError::guest(f.old.to_string(), e))?;
            site::jump(site, f.new_addr)?;
            funcs.push(PatchedFunc::of_module(f, s.addr, size, site, site_pa));
        }
        let (relinked, resolved) = match &p.late {
            Some(late) => (
                self.relink(late, &module.name, Some(symbols))?,
                module_imports(late, &module.name, symbols)?,
            ),
            None => (Vec::new(), Vec::new()),
        };
        Ok(Arrival {
            patch: pi,
            object: oi,
            funcs,
            relinked,
            resolved,
        })
    }

    /// The patch-area bytes that change when `late`'s patch is linked with `module`'s
    /// symbols (`Some`) instead of its trap, or back (`None`).
    fn relink(
        &self,
        late: &LateLink,
        module: &str,
        symbols: Option<&ModuleSymbols>,
    ) -> Result<Vec<(u64, Vec<u8>)>, KpError> {
        let Some(area) = &self.area else {
            return Ok(Vec::new());
        };
        let m = &late.obj.manifest;
        for (name, _) in &late.vmlinux {
            let unbound = !m.bindings.iter().any(|b| &b.local == name);
            if let (Some(syms), true) = (symbols, unbound) {
                if !syms.named(name).is_empty() {
                    return Err(KpError::Symbol(format!(
                        "module {module} has its own '{name}', which the patch (loaded while \
                         {module} was not) resolved in vmlinux: bind it with LPVMM_SYMBOL or \
                         LPVMM_SYMBOL_IN"
                    )));
                }
            }
        }
        let (returns, cpu) = (late.boot.returns, late.boot.cpu.as_ref());
        let linked = |side: Side| {
            link::link(&late.obj, late.at, returns, cpu, &|n| {
                late_import(late, module, side, n)
            })
        };
        let (from, to) = match symbols {
            Some(syms) => (linked(Side::Gone)?, linked(Side::Arrived(syms))?),
            None => (linked(Side::Now)?, linked(Side::Gone)?),
        };
        let mut writes = Vec::new();
        for (a, b) in [
            (&from.code, &to.code),
            (&from.rodata, &to.rodata),
            (&from.data, &to.data),
        ] {
            for (at, bytes) in differing(&a.bytes, &b.bytes) {
                writes.push((area.layout.pa(b.addr + at as u64), bytes));
            }
        }
        Ok(writes)
    }

    /// Write every checked arrival: each function's jump where its visible version is
    /// a patch's (its site and ftrace record checked first, writing nothing if one
    /// fails), and the relinked bytes.
    fn arrive(
        &mut self,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        module: &Module,
        arrivals: Vec<Arrival>,
    ) -> Result<String, KpError> {
        for a in &arrivals {
            let o = &mut self.patches[a.patch].objects[a.object];
            o.funcs = a.funcs.clone();
            o.state = ObjectState::Loaded {
                module: module.addr,
            };
        }
        let SiteWrites { sites, flags } = match self.plan_arrived(guest, kernel, &arrivals) {
            Ok(planned) => planned,
            Err(e) => {
                self.forget_arrivals(&arrivals);
                return Err(e);
            }
        };
        let mut did = Vec::new();
        for a in arrivals {
            for (pa, bytes) in &a.relinked {
                guest
                    .write_phys(*pa, bytes)
                    .map_err(|e| KpError::guest("writing the patch area", e))?;
            }
            let p = &mut self.patches[a.patch];
            set_module_imports(p, &module.name, &a.resolved);
            did.push(p.name.clone());
        }
        self.write_sites(guest, &sites, flags)?;
        Ok(format!(
            "linked patch(es) {} for it; {} function(s) redirected",
            did.join(", "),
            sites.len()
        ))
    }

    /// The jumps of the arrived functions whose visible version is a patch's, with the
    /// ftrace record writes around them, checked; nothing written.
    fn plan_arrived(
        &mut self,
        guest: &dyn GuestWriter,
        kernel: &Kernel,
        arrivals: &[Arrival],
    ) -> Result<SiteWrites, KpError> {
        let mut writes = Vec::new();
        for f in arrivals.iter().flat_map(|a| &a.funcs) {
            if let Version::Code(c) =
                versions::visible(&self.patches, f.old_addr, &versions::is_enabled)
            {
                if !writes.iter().any(|(func, _)| *func == f.old_addr) {
                    writes.push((f.old_addr, site::jump(f.site, c.addr)?));
                }
            }
        }
        for (func, _) in &writes {
            self.ensure_stack(*func)?;
        }
        let flags = self.check_sites(guest.reader(), kernel, &writes)?;
        Ok(SiteWrites {
            sites: writes,
            flags,
        })
    }

    /// Undo [`Engine::arrive`]'s bookkeeping for arrivals it could not write.
    fn forget_arrivals(&mut self, arrivals: &[Arrival]) {
        for a in arrivals {
            let o = &mut self.patches[a.patch].objects[a.object];
            o.funcs.clear();
            o.state = ObjectState::Waiting;
        }
        self.drop_unused_stacks();
    }

    /// GOING: every site in `module` gets its original bytes back, its functions are
    /// forgotten and its pending symbols point at the trap again.
    fn going(
        &mut self,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        module: &Module,
    ) -> Result<String, KpError> {
        let name = ObjectName::Module(module.name.clone());
        let mut writes = Vec::new();
        let mut relinks = Vec::new();
        for p in &self.patches {
            for o in p.objects.iter().filter(|o| o.name == name) {
                if o.state
                    != (ObjectState::Loaded {
                        module: module.addr,
                    })
                {
                    continue;
                }
                for f in &o.funcs {
                    if let Some(s) = self.funcs.get(&f.old_addr) {
                        if s.live != s.original && !writes.iter().any(|(a, _)| *a == f.old_addr) {
                            writes.push((f.old_addr, s.original));
                        }
                    }
                }
                if let Some(late) = &p.late {
                    relinks.extend(self.relink(late, &module.name, None)?);
                }
            }
        }
        let flags = self.check_sites(guest.reader(), kernel, &writes)?;
        self.write_sites(guest, &writes, flags)?;
        for (pa, bytes) in relinks {
            guest
                .write_phys(pa, &bytes)
                .map_err(|e| KpError::guest("writing the patch area", e))?;
        }
        for p in &mut self.patches {
            let mut had = false;
            for o in p.objects.iter_mut().filter(|o| o.name == name) {
                had |= o.state
                    == (ObjectState::Loaded {
                        module: module.addr,
                    });
                o.funcs.clear();
                o.state = ObjectState::Waiting;
            }
            if had {
                set_module_imports(p, &module.name, &[]);
            }
        }
        self.drop_unused_stacks();
        Ok(format!("{} site(s) given back", writes.len()))
    }
}

/// Where a symbol `late`'s patch uses is, with `module`'s symbols (`with`) or without:
/// in vmlinux, in `module`, in another module of the patch loaded now, or pending (the
/// patch's trap).
fn late_import(late: &LateLink, module: &str, side: Side, name: &str) -> Result<ImportAt, KpError> {
    if let Some((_, a)) = late.vmlinux.iter().find(|(n, _)| n == name) {
        return Ok(ImportAt::Addr(*a));
    }
    let owner = late
        .owners
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, m)| m.as_str());
    let current = || match late.current.iter().find(|(n, _)| n == name) {
        Some((_, a)) => ImportAt::Addr(*a),
        None => ImportAt::Pending,
    };
    match side {
        Side::Arrived(syms) if owner == Some(module) => {
            pending_in(&late.obj.manifest, syms, module, name).map(ImportAt::Addr)
        }
        Side::Gone if owner == Some(module) => Ok(ImportAt::Pending),
        _ => Ok(current()),
    }
}

/// Which link of a patch: `module`'s symbols where they are now, or as the arriving
/// module has them, or gone (the trap).
#[derive(Clone, Copy)]
enum Side<'s> {
    Now,
    Arrived(&'s ModuleSymbols),
    Gone,
}

/// A pending symbol of `manifest`'s, resolved in the arriving `module`: by its binding,
/// or by name.
fn pending_in(
    manifest: &crate::load::manifest::Manifest,
    symbols: &ModuleSymbols,
    module: &str,
    name: &str,
) -> Result<u64, KpError> {
    let (kname, pos) = match manifest.bindings.iter().find(|b| b.local == name) {
        Some(b) => (b.kernel.name.as_str(), b.kernel.pos),
        None => (name, None),
    };
    let used_as = match kname == name {
        true => String::new(),
        false => format!(" (the patch's '{name}')"),
    };
    symbols
        .resolve(kname, pos)
        .map(|s| s.addr)
        .map_err(|e| KpError::Symbol(format!("module {module}: {e}{used_as}")))
}

/// The symbols `late`'s patch uses in `module`, where the arriving module has them.
fn module_imports(
    late: &LateLink,
    module: &str,
    symbols: &ModuleSymbols,
) -> Result<Vec<(String, u64)>, KpError> {
    late.owners
        .iter()
        .filter(|(_, m)| m == module)
        .map(|(n, _)| {
            Ok((
                n.clone(),
                pending_in(&late.obj.manifest, symbols, module, n)?,
            ))
        })
        .collect()
}

/// Record where the symbols `p` uses in `module` are now (`resolved`; empty: gone).
fn set_module_imports(p: &mut crate::patch::Patch, module: &str, resolved: &[(String, u64)]) {
    let Some(late) = p.late.as_mut() else {
        return;
    };
    let owned: Vec<String> = late
        .owners
        .iter()
        .filter(|(_, m)| m == module)
        .map(|(n, _)| n.clone())
        .collect();
    late.current.retain(|(n, _)| !owned.contains(n));
    late.current.extend(resolved.iter().cloned());
    for i in p.imports.iter_mut().filter(|i| owned.contains(&i.name)) {
        i.addr = resolved
            .iter()
            .find(|(n, _)| n == &i.name)
            .map_or(0, |(_, a)| *a);
    }
}

/// The runs where `to` differs from `from` (same length: one object linked at one
/// place), each with `to`'s bytes.
fn differing(from: &[u8], to: &[u8]) -> Vec<(usize, Vec<u8>)> {
    let mut out: Vec<(usize, Vec<u8>)> = Vec::new();
    for (i, (a, b)) in from.iter().zip(to).enumerate() {
        if a == b {
            continue;
        }
        match out.last_mut() {
            Some((at, run)) if *at + run.len() == i => run.push(*b),
            _ => out.push((i, vec![*b])),
        }
    }
    out
}
