//! The patch engine: loaded patches, the per-function stack of versions, and the
//! immediate consistency model (every task's stack checked while the guest is paused;
//! all sites of a patch flipped at once or none).
//!
//! Operations take a paused guest; the VMM decides when to pause and how often to
//! retry (see [`crate::transition`]). Every refusal happens before the first guest byte
//! is written: `load` validates the whole patch, resolves every symbol and checks every
//! site first; `plan_*` compute the writes without making them.

use std::collections::BTreeMap;

use iced_x86::{Code, Decoder, DecoderOptions, Register};
use introspection::kernel::Kernel;
use introspection::orc::OrcEntry;
use introspection::stack::{ExtraCode, StackTrace, Unwinder};
use introspection::tasks::TaskReader;
use introspection::PausedGuest;
use serde::{Deserialize, Serialize};

use crate::area::{self, AreaLayout, Region};
use crate::journal::Journal;
use crate::link::{self, Placement};
use crate::manifest::KernelSymbol;
use crate::object::PatchObject;
use crate::site::{self, SiteState};
use crate::KpError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatchState {
    /// Loaded into the patch area; no site points at it.
    Disabled,
    /// Every site of the patch jumps to it.
    Enabled,
}

/// One function of a patch: where the old one is and where its replacement is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchedFunc {
    pub old: KernelSymbol,
    pub old_addr: u64,
    pub old_size: u64,
    /// The fentry site (the function's start, or +4 after `endbr64`).
    pub site: u64,
    pub site_pa: u64,
    pub new_name: String,
    pub new_addr: u64,
    pub new_size: u64,
    /// The new function keeps a frame pointer (`push %rbp; mov %rsp,%rbp`), so its call
    /// sites unwind reliably.
    pub frame_pointer: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patch {
    pub name: String,
    pub state: PatchState,
    pub funcs: Vec<PatchedFunc>,
    pub depends: Vec<String>,
    pub code: Region,
    pub rodata: Region,
    pub data: Region,
    /// Kernel symbols the patch uses and their addresses in this guest.
    pub imports: Vec<(String, u64)>,
    /// Times this patch was enabled.
    pub enables: u64,
}

/// A redirected kernel function: its original entry bytes and the versions stacked on
/// it, oldest first; the site jumps to the last.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Site {
    name: String,
    original: [u8; 5],
    site: u64,
    site_pa: u64,
    /// (patch, new function address, its size)
    versions: Vec<(String, u64, u64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Enable,
    Disable,
}

/// What a transition of one patch will write, and which code no task may be in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub op: Op,
    pub patch: String,
    /// (site, guest-physical address, the 5 bytes to write there)
    pub writes: Vec<(u64, u64, [u8; 5])>,
    /// Code ranges no task may have on its stack: (start, end, function).
    pub ranges: Vec<(u64, u64, String)>,
}

/// A task that keeps a transition from happening now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocker {
    pub pid: i32,
    pub comm: String,
    pub reason: String,
    pub trace: StackTrace,
}

#[derive(Clone, Debug)]
struct Area {
    layout: AreaLayout,
    installed: bool,
    next: Placement,
    journal: Journal,
}

#[derive(Clone, Debug, Default)]
pub struct Engine {
    area: Option<Area>,
    patches: Vec<Patch>,
    sites: BTreeMap<u64, Site>,
}

/// Does the function keep a frame pointer at its call sites: `[endbr64;] push %rbp`
/// first, and `mov %rsp,%rbp` before its first call or jump (gcc schedules the two apart)?
fn has_frame_pointer(code: &[u8], addr: u64) -> bool {
    let mut d = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut insn = d.decode();
    if insn.code() == Code::Endbr64 {
        insn = d.decode();
    }
    if insn.code() != Code::Push_r64 || insn.op0_register() != Register::RBP {
        return false;
    }
    while d.can_decode() {
        let i = d.decode();
        let sets_fp = matches!(i.code(), Code::Mov_rm64_r64 | Code::Mov_r64_rm64)
            && i.op0_register() == Register::RBP
            && i.op1_register() == Register::RSP;
        if sets_fp {
            return true;
        }
        if i.flow_control() != iced_x86::FlowControl::Next {
            return false;
        }
    }
    false
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

    /// Validate, link and load a patch (disabled). On error nothing was written.
    pub fn load(
        &mut self,
        guest: &mut dyn PausedGuest,
        kernel: &Kernel,
        kp: &[u8],
    ) -> Result<String, KpError> {
        let obj = PatchObject::parse(kp)?;
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

        // Kernel symbols: bindings first, then unique names.
        let syms = &kernel.symbols;
        let resolve = |name: &str| -> Result<u64, KpError> {
            let (kname, pos) = match m.bindings.iter().find(|b| b.local == name) {
                Some(b) => (b.kernel.name.as_str(), b.kernel.pos),
                None => (name, None),
            };
            syms.resolve(kname, pos).map(|s| s.addr).map_err(|e| {
                KpError::Symbol(format!(
                    "{e}{}",
                    if matches!(e, introspection::kallsyms::ResolveError::Ambiguous { .. }) {
                        " (bind it with LPVMM_SYMBOL(local, name, pos))"
                    } else {
                        ""
                    }
                ))
            })
        };

        // Every target, checked live.
        let mem = kernel.memory(guest);
        let mut targets = Vec::new();
        for r in &m.replacements {
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
            match site::inspect(&r.old.to_string(), site, &bytes)? {
                SiteState::Nop if !self.sites.contains_key(&sym.addr) => {}
                SiteState::Jump(t)
                    if self
                        .sites
                        .get(&sym.addr)
                        .and_then(|s| s.versions.last())
                        .is_some_and(|v| v.1 == t) => {}
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
            targets.push((r, sym.addr, size, site, site_pa));
        }

        // Where it goes, and the linked bytes.
        let layout = match &self.area {
            Some(a) => a.layout.clone(),
            None => {
                let phys = guest.patch_area();
                let va = area::choose_va(&mem, kernel, phys.size)?;
                AreaLayout::new(phys, va)?
            }
        };
        let next = self.area.as_ref().map(|a| a.next).unwrap_or(Placement {
            code: layout.code.start,
            rodata: layout.rodata.start,
            data: layout.data.start,
        });
        // Returns go where the kernel's own do (see link::Returns).
        let returns = match (syms.addr("x86_return_thunk"), syms.addr(link::RETURN_THUNK)) {
            (Some(var), Some(default)) => {
                let t = mem
                    .u64(var)
                    .map_err(|e| KpError::Guest(format!("reading x86_return_thunk: {e}")))?;
                if t == default {
                    link::Returns::Ret
                } else {
                    link::Returns::Jump(t)
                }
            }
            _ => link::Returns::AsSymbol,
        };
        let linked = link::link(&obj, next, returns, &resolve)?;
        let page = |n: usize| (n as u64).div_ceil(4096) * 4096;
        let after = Placement {
            code: next.code + page(linked.code.bytes.len()),
            rodata: next.rodata + page(linked.rodata.bytes.len()),
            data: next.data + page(linked.data.bytes.len()),
        };
        for (what, start, end, region) in [
            ("code", next.code, after.code, layout.code),
            ("read-only data", next.rodata, after.rodata, layout.rodata),
            ("data", next.data, after.data, layout.data),
        ] {
            if end > region.end {
                return Err(KpError::AreaFull(format!(
                    "{} needs {} KiB more {what} than the {} KiB left (lpvmm run --patch-area sets its size)",
                    m.name,
                    (end - region.end).div_ceil(1024),
                    region.end.saturating_sub(start) / 1024
                )));
            }
        }
        let mut funcs = Vec::new();
        for (r, old_addr, old_size, site_va, site_pa) in targets {
            let f = obj
                .function(&r.new)
                .ok_or_else(|| KpError::Manifest(format!("no function {}", r.new)))?;
            let new_addr = linked.functions[&r.new];
            site::jump(site_va, new_addr)?;
            let off = (new_addr - linked.code.addr) as usize;
            let body = linked
                .code
                .bytes
                .get(off..off + f.size as usize)
                .unwrap_or_default();
            funcs.push(PatchedFunc {
                old: r.old.clone(),
                old_addr,
                old_size,
                site: site_va,
                site_pa,
                new_name: r.new.clone(),
                new_addr,
                new_size: f.size,
                frame_pointer: has_frame_pointer(body, new_addr),
            });
        }
        drop(mem);

        // Everything checked: write.
        let mut area = self.area.clone().unwrap_or(Area {
            layout,
            installed: false,
            next,
            journal: Journal::default(),
        });
        if !area.installed {
            area::install(guest, kernel, &area.layout, &mut area.journal)?;
            area.installed = true;
        }
        for img in [&linked.code, &linked.rodata, &linked.data] {
            if !img.bytes.is_empty() {
                guest
                    .write_phys(area.layout.pa(img.addr), &img.bytes)
                    .map_err(|e| KpError::Guest(format!("writing the patch area: {e}")))?;
            }
        }
        area.next = after;
        self.area = Some(area);
        self.patches.push(Patch {
            name: m.name.clone(),
            state: PatchState::Disabled,
            funcs,
            depends: m.depends.clone(),
            code: Region {
                start: next.code,
                end: after.code,
            },
            rodata: Region {
                start: next.rodata,
                end: after.rodata,
            },
            data: Region {
                start: next.data,
                end: after.data,
            },
            imports: linked.imports,
            enables: 0,
        });
        Ok(m.name.clone())
    }

    /// What enabling `name` will write and which code must be off every stack.
    pub fn plan_enable(&self, name: &str) -> Result<Plan, KpError> {
        let p = self.patch(name)?;
        if p.state == PatchState::Enabled {
            return Err(KpError::State(format!("patch '{name}' is already enabled")));
        }
        for d in &p.depends {
            if self.patch(d)?.state != PatchState::Enabled {
                return Err(KpError::Dependency(format!(
                    "'{name}' depends on '{d}', which is not enabled"
                )));
            }
        }
        let mut plan = Plan {
            op: Op::Enable,
            patch: name.into(),
            writes: Vec::new(),
            ranges: Vec::new(),
        };
        for f in &p.funcs {
            plan.writes
                .push((f.site, f.site_pa, site::jump(f.site, f.new_addr)?));
            plan.ranges
                .push((f.old_addr, f.old_addr + f.old_size, f.old.to_string()));
            // A task in the version now on top must not stay there across the switch.
            if let Some((patch, addr, size)) =
                self.sites.get(&f.old_addr).and_then(|s| s.versions.last())
            {
                plan.ranges
                    .push((*addr, addr + size, format!("{} [{patch}]", f.old)));
            }
        }
        Ok(plan)
    }

    /// What disabling `name` will write: each site back to the version below (or the
    /// original bytes), and the new code no task may be in.
    pub fn plan_disable(&self, name: &str) -> Result<Plan, KpError> {
        let p = self.patch(name)?;
        if p.state != PatchState::Enabled {
            return Err(KpError::State(format!("patch '{name}' is not enabled")));
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
        let mut plan = Plan {
            op: Op::Disable,
            patch: name.into(),
            writes: Vec::new(),
            ranges: Vec::new(),
        };
        for f in &p.funcs {
            let s = self
                .sites
                .get(&f.old_addr)
                .ok_or_else(|| KpError::State(format!("{} has no redirection recorded", f.old)))?;
            match s.versions.last() {
                Some((top, _, _)) if top == name => {}
                Some((top, _, _)) => {
                    return Err(KpError::State(format!(
                        "{} has a newer version from patch '{top}' above '{name}'; disable '{top}' first",
                        f.old
                    )))
                }
                None => return Err(KpError::State(format!("{} is not redirected", f.old))),
            }
            let below = match s.versions.len().checked_sub(2).map(|i| &s.versions[i]) {
                Some((_, addr, _)) => site::jump(f.site, *addr)?,
                None => s.original,
            };
            plan.writes.push((f.site, f.site_pa, below));
            plan.ranges.push((
                f.new_addr,
                f.new_addr + f.new_size,
                format!("{} [{name}]", f.new_name),
            ));
        }
        Ok(plan)
    }

    /// Unwind every task; those in a planned range, or whose stack is unreliable, block.
    pub fn blockers(
        &self,
        guest: &dyn PausedGuest,
        kernel: &Kernel,
        plan: &Plan,
    ) -> Result<(Vec<Blocker>, usize), KpError> {
        let reader = TaskReader::new(kernel, guest);
        let list = reader
            .list()
            .map_err(|e| KpError::Guest(format!("listing tasks: {e}")))?;
        let code = PatchCode(self);
        let extra: [&dyn ExtraCode; 1] = [&code];
        let unwinder = Unwinder::new(&reader, &extra);
        let mut blockers = Vec::new();
        for t in &list.tasks {
            let trace = unwinder.trace(t);
            let reason = if !trace.reliable {
                Some(format!(
                    "its stack is unreliable ({})",
                    trace.problem.as_deref().unwrap_or("unknown")
                ))
            } else {
                plan.ranges.iter().find_map(|(lo, hi, f)| {
                    trace
                        .touches(*lo, *hi)
                        .then(|| format!("{f} is on its stack"))
                })
            };
            if let Some(reason) = reason {
                blockers.push(Blocker {
                    pid: t.pid,
                    comm: t.comm.clone(),
                    reason,
                    trace,
                });
            }
        }
        Ok((blockers, list.tasks.len()))
    }

    /// Make the plan's writes (all sites at once, the guest paused) and record the new
    /// state.
    pub fn apply(&mut self, guest: &mut dyn PausedGuest, plan: &Plan) -> Result<(), KpError> {
        // Re-check each site still holds what the plan assumed (nothing else wrote it).
        let idx = self
            .patches
            .iter()
            .position(|p| p.name == plan.patch)
            .ok_or_else(|| KpError::NoSuchPatch(plan.patch.clone()))?;
        let mut journal = Journal::default();
        for (site, pa, bytes) in &plan.writes {
            if let Err(e) = journal.write(guest, *pa, bytes) {
                journal.undo(guest)?;
                return Err(KpError::Guest(format!("site {site:#x}: {e}")));
            }
        }
        let funcs = self.patches[idx].funcs.clone();
        match plan.op {
            Op::Enable => {
                for (f, w) in funcs.iter().zip(&journal.writes) {
                    let s = self.sites.entry(f.old_addr).or_insert_with(|| Site {
                        name: f.old.to_string(),
                        original: w.before.clone().try_into().unwrap_or(site::FENTRY_NOP),
                        site: f.site,
                        site_pa: f.site_pa,
                        versions: Vec::new(),
                    });
                    s.versions
                        .push((plan.patch.clone(), f.new_addr, f.new_size));
                }
                self.patches[idx].state = PatchState::Enabled;
                self.patches[idx].enables += 1;
            }
            Op::Disable => {
                for f in &funcs {
                    if let Some(s) = self.sites.get_mut(&f.old_addr) {
                        s.versions.pop();
                        if s.versions.is_empty() {
                            self.sites.remove(&f.old_addr);
                        }
                    }
                }
                self.patches[idx].state = PatchState::Disabled;
            }
        }
        Ok(())
    }

    /// Remove a disabled patch: its code is overwritten with `int3` and its data zeroed.
    /// (Its space is not reused: patch area space is bump-allocated.)
    pub fn unload(&mut self, guest: &mut dyn PausedGuest, name: &str) -> Result<(), KpError> {
        let p = self.patch(name)?;
        if p.state != PatchState::Disabled {
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
        let layout = &self
            .area
            .as_ref()
            .ok_or_else(|| KpError::State("no patch area".into()))?
            .layout;
        for (r, fill) in [(p.code, 0xccu8), (p.rodata, 0), (p.data, 0)] {
            if r.size() > 0 {
                guest
                    .write_phys(layout.pa(r.start), &vec![fill; r.size() as usize])
                    .map_err(|e| KpError::Guest(format!("clearing the patch area: {e}")))?;
            }
        }
        self.patches.retain(|q| q.name != name);
        Ok(())
    }

    /// The function of a loaded patch that contains `ip`.
    fn function_at(&self, ip: u64) -> Option<(&Patch, &PatchedFunc)> {
        self.patches.iter().find_map(|p| {
            p.funcs
                .iter()
                .find(|f| ip >= f.new_addr && ip < f.new_addr + f.new_size)
                .map(|f| (p, f))
        })
    }
}

/// Patch code as the unwinder sees it: text, with frame-pointer unwinding at call sites
/// of functions that keep one.
pub struct PatchCode<'e>(pub &'e Engine);

impl ExtraCode for PatchCode<'_> {
    fn contains(&self, ip: u64) -> bool {
        self.0.patches.iter().any(|p| p.code.contains(ip))
    }

    fn unwind_entry(&self, ip: u64, interrupted: bool) -> Option<OrcEntry> {
        // An interrupted address may be in a prologue or epilogue, where the frame
        // pointer is not set up: only return addresses unwind reliably.
        if interrupted {
            return None;
        }
        let (_, f) = self.0.function_at(ip)?;
        f.frame_pointer.then_some(OrcEntry::FRAME_POINTER)
    }

    fn describe(&self, ip: u64, interrupted: bool) -> Option<String> {
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
