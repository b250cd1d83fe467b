//! The load pipeline (the kernel's kernel/module/ for a livepatch module): a .kp parsed
//! once, its symbols resolved against the guest kernel, linked at its place in the patch
//! area, and the functions it replaces found and checked. `prepare` does all of it
//! while the guest runs; the engine writes the result in a pause ([`crate::Engine`]'s
//! `load_prepared`), after checking again what a running guest could have changed.

use std::collections::BTreeMap;

use iced_x86::{Code, Decoder, DecoderOptions, Register};
use introspection::kernel::Kernel;
use introspection::memory::KernelMemory;
use introspection::{GuestRam, PausedGuest};

use crate::area::{self, AreaLayout, PageTables};
use crate::funcs::site::{self, SiteState};
use crate::funcs::FuncStack;
use crate::load::link::{ImportAt, Placement};
use crate::load::object::PatchObject;
use crate::load::objects::{ObjectModule, ObjectModules};
use crate::patch::{ObjectFunc, ObjectName, ObjectState, OrcAt, PatchedFunc, PatchedObject};
use crate::space::{Area, Runs, Sizes};
use crate::{KpError, ParseError};

pub mod alternatives;
pub(crate) mod late;
pub mod link;
pub mod manifest;
pub mod object;
pub(crate) mod objects;

/// Parse-free half of [`crate::Engine::prepare`]: resolve and link `obj` against the
/// guest while it runs, into `area` (the engine's, or a new one chosen now for the first
/// patch). `generation` is the engine's, for the pause to see whether the area changed.
pub(crate) fn prepare(
    area: Option<&Area>,
    generation: u64,
    ram: &dyn GuestRam,
    kernel: &Kernel,
    obj: PatchObject,
) -> Result<Prepared, KpError> {
    // The module notifier's and the guest-call functions are assembled in the load's
    // pause: the assembler's first use (its tables) comes here, before it.
    let m = &obj.manifest;
    if !m.modules().is_empty() || !m.callbacks.is_empty() {
        crate::transition::dispatch::warm_up();
    }
    let mem = KernelMemory::new(ram, kernel.root);
    let area = match area {
        Some(a) => a.clone(),
        None => {
            let phys = ram.patch_area();
            let va = area::choose_va(&mem, kernel, phys.size)?;
            Area::new(AreaLayout::new(phys, va)?)
        }
    };
    let boot = link::BootChoices::of_guest(&mem, kernel, &obj)?;
    let objects = objects::read(&mem, kernel, &obj.manifest)?;
    let (runs, linked) = link_into(&area, &boot, &mem, kernel, &objects, &obj)?;
    let orc = decode_orc(kernel, &obj.manifest.name, &obj, &linked)?;
    let module_record = crate::guest_module::plan(kernel, &area, runs, &obj, &linked)?;
    let tables = (!area.installed).then(|| PageTables::of(&area.layout));
    Ok(Prepared {
        obj,
        area,
        tables,
        runs,
        linked,
        orc,
        boot,
        objects,
        generation,
        module_record,
    })
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
pub(crate) struct Target<'m> {
    pub(crate) replacement: &'m crate::load::manifest::Replacement,
    addr: u64,
    size: u64,
    site: u64,
    site_pa: u64,
}

/// The loaded module that has a symbol `name`, if one has: the hint for a name that
/// vmlinux does not have. Read only on that error path.
fn module_having(mem: &KernelMemory, kernel: &Kernel, name: &str) -> Option<String> {
    let in_module = |m: &introspection::modules::Module| {
        let symbols = m.symbols(mem, kernel).ok()?;
        (!symbols.named(name).is_empty()).then(|| m.name.clone())
    };
    introspection::modules::ModuleList::read(mem, kernel)
        .ok()
        .and_then(|l| l.modules.iter().find_map(in_module))
}

/// Why a patch cannot replace `name`, which vmlinux does not have: the kernel's own
/// answer, or, when a loaded module has a function of that name, how to name it in
/// that module.
fn not_in_vmlinux(
    mem: &KernelMemory,
    kernel: &Kernel,
    name: &str,
    e: introspection::kallsyms::ResolveError,
) -> KpError {
    match module_having(mem, kernel, name) {
        Some(m) => KpError::Symbol(format!(
            "{name} is a function of module {m}, not of vmlinux: name its module \
             (LPVMM_REPLACE_IN({m}, {name}, ...))"
        )),
        None => KpError::Symbol(e.to_string()),
    }
}

/// Where a replaced function is: its address and size, in vmlinux or in its module.
fn locate_target(
    mem: &KernelMemory,
    kernel: &Kernel,
    objects: &[ObjectModule],
    old: &crate::load::manifest::KernelSymbol,
) -> Result<(u64, u64), KpError> {
    if let Some(module) = &old.object {
        return objects::function(objects, old, module);
    }
    let syms = &kernel.symbols;
    let sym = syms
        .resolve(&old.name, old.pos)
        .map_err(|e| not_in_vmlinux(mem, kernel, &old.name, e))?;
    if !sym.is_text() || !kernel.is_kernel_text(sym.addr) {
        return Err(KpError::Symbol(format!("{old} is not a kernel function")));
    }
    Ok((sym.addr, syms.size_at(sym.addr).unwrap_or(0)))
}

/// Every function the patch replaces, checked live: a kernel function (of vmlinux or of
/// one of `objects`, the modules checked in this pause to be the ones the patch was
/// linked against) whose site is the fentry NOP, or lpvmm's own jump to the version on
/// top.
pub(crate) fn targets<'o>(
    funcs: &BTreeMap<u64, FuncStack>,
    guest: &dyn PausedGuest,
    kernel: &Kernel,
    obj: &'o PatchObject,
    objects: &ObjectModules,
) -> Result<Vec<Target<'o>>, KpError> {
    let mem = kernel.memory(guest);
    let mut targets = Vec::new();
    for r in &obj.manifest.replacements {
        if r.old
            .object
            .as_ref()
            .is_some_and(|m| objects.absent.contains(m))
        {
            continue;
        }
        let (addr, size) = locate_target(&mem, kernel, &objects.loaded, &r.old)?;
        let entry = mem
            .read_vec(addr, 9)
            .map_err(|e| KpError::guest(format!("reading {}", r.old), e))?;
        let site = addr + site::site_offset(&entry);
        let at = (site - addr) as usize;
        let bytes: [u8; 5] = entry[at..at + 5].try_into().unwrap_or_default();
        let ours = funcs.get(&addr);
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
            .map_err(|e| KpError::guest(r.old.to_string(), e))?;
        targets.push(Target {
            replacement: r,
            addr,
            size,
            site,
            site_pa,
        });
    }
    Ok(targets)
}

/// A patch parsed, resolved and linked while the guest ran ([`crate::Engine::prepare`]), to be
/// checked and written in a pause ([`crate::Engine::load_prepared`]).
#[derive(Debug)]
pub struct Prepared {
    pub(crate) obj: PatchObject,
    /// The patch area as it will be once loaded (chosen now for the first patch).
    pub(crate) area: Area,
    /// For the first patch: the area's page tables, written in the pause.
    pub(crate) tables: Option<PageTables>,
    pub(crate) runs: Runs,
    pub(crate) linked: link::Linked,
    pub(crate) orc: Vec<OrcAt>,
    /// What the link took from the guest, checked again in the pause.
    pub(crate) boot: link::BootChoices,
    /// The modules it patches or names, as the link saw them (checked again too).
    pub(crate) objects: ObjectModules,
    /// The engine's [`Engine::generation`] it was linked against.
    pub(crate) generation: u64,
    /// The module the guest will know its code as, and the record's bytes.
    pub(crate) module_record: Option<(crate::guest_module::GuestModule, Vec<u8>)>,
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
        if let Some((m, bytes)) = &self.module_record {
            ranges.push(introspection::PhysRange {
                start: layout.pa(m.record.start),
                size: bytes.len() as u64,
            });
        }
        ranges
    }
}

/// Link `obj` where the area's first free runs of its size are: linked once to learn
/// its size, then at its place. Takes nothing from the area.
fn link_into(
    area: &Area,
    boot: &link::BootChoices,
    mem: &KernelMemory,
    kernel: &Kernel,
    objects: &ObjectModules,
    obj: &PatchObject,
) -> Result<(Runs, link::Linked), KpError> {
    let name = &obj.manifest.name;
    let (returns, cpu) = (boot.returns, &boot.cpu);
    let resolve = |sym: &str| match sym {
        crate::shadow::TABLE_SYMBOL => Ok(ImportAt::Addr(area.shadow_table)),
        _ => resolve_import(mem, kernel, objects, obj, sym),
    };
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

/// The patch's side of each function it replaces: where its new version was linked.
fn object_funcs(obj: &PatchObject, linked: &link::Linked) -> Result<Vec<ObjectFunc>, KpError> {
    let mut out = Vec::new();
    for r in &obj.manifest.replacements {
        let f = obj
            .function(&r.new)
            .ok_or_else(|| ParseError::Manifest(format!("no function {}", r.new)))?;
        let new_addr = linked.functions[&r.new];
        let off = (new_addr - linked.code.addr) as usize;
        let body = linked
            .code
            .bytes
            .get(off..off + f.size as usize)
            .unwrap_or_default();
        out.push(ObjectFunc {
            old: r.old.clone(),
            new_name: r.new.clone(),
            new_addr,
            new_size: f.size,
            frame_pointer: has_frame_pointer(body, new_addr),
            immediate: r.immediate,
        });
    }
    Ok(out)
}

/// The objects of the patch, each with the functions it replaces: vmlinux first, then
/// each module in the order the patch first names it, loaded (at the targets found in
/// this pause) or waiting.
pub(crate) fn patched_objects(
    targets: Vec<Target>,
    obj: &PatchObject,
    linked: &link::Linked,
    modules: &ObjectModules,
) -> Result<Vec<PatchedObject>, KpError> {
    let news = object_funcs(obj, linked)?;
    let mut objects: Vec<PatchedObject> = Vec::new();
    for (f, r) in news.iter().zip(&obj.manifest.replacements) {
        let name = r
            .old
            .object
            .clone()
            .map_or(ObjectName::Vmlinux, ObjectName::Module);
        let state = match &r.old.object {
            None => ObjectState::Vmlinux,
            Some(m) => match modules.loaded.iter().find(|o| &o.name == m) {
                Some(o) => ObjectState::Loaded { module: o.addr },
                None => ObjectState::Waiting,
            },
        };
        let at = match objects.iter().position(|o| o.name == name) {
            Some(i) => i,
            None => {
                objects.push(PatchedObject {
                    name: name.clone(),
                    funcs: Vec::new(),
                    state,
                    replaces: Vec::new(),
                });
                objects.len() - 1
            }
        };
        let o = &mut objects[at];
        if name != ObjectName::Vmlinux {
            o.replaces.push(f.clone());
        }
        if let Some(t) = targets.iter().find(|t| std::ptr::eq(t.replacement, r)) {
            site::jump(t.site, f.new_addr)?;
            o.funcs
                .push(PatchedFunc::of_module(f, t.addr, t.size, t.site, t.site_pa));
        }
    }
    // Objects with callbacks and no function (a livepatch module's may have them).
    let object_callbacks =
        obj.manifest.callbacks.iter().filter(|c| {
            c.state.is_none() && c.kind != crate::load::manifest::CallbackKind::ModuleExit
        });
    for c in object_callbacks {
        let name = c
            .object
            .clone()
            .map_or(ObjectName::Vmlinux, ObjectName::Module);
        if objects.iter().any(|o| o.name == name) {
            continue;
        }
        let state = match &c.object {
            None => ObjectState::Vmlinux,
            Some(m) => match modules.loaded.iter().find(|o| &o.name == m) {
                Some(o) => ObjectState::Loaded { module: o.addr },
                None => ObjectState::Waiting,
            },
        };
        objects.push(PatchedObject {
            name,
            funcs: Vec::new(),
            state,
            replaces: Vec::new(),
        });
    }
    objects.sort_by_key(|o| o.name != ObjectName::Vmlinux);
    Ok(objects)
}

/// The patch's callbacks, each at the address its function was linked at.
pub(crate) fn callbacks(
    obj: &PatchObject,
    linked: &link::Linked,
) -> Vec<crate::patch::PatchCallback> {
    obj.manifest
        .callbacks
        .iter()
        .filter_map(|c| {
            Some(crate::patch::PatchCallback {
                object: c
                    .object
                    .clone()
                    .map_or(ObjectName::Vmlinux, ObjectName::Module),
                kind: c.kind,
                func: c.func.clone(),
                addr: *linked.functions.get(&c.func)?,
                size: obj.function(&c.func)?.size,
                state: c.state,
            })
        })
        .collect()
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

/// The module not loaded yet that a symbol the patch uses will be resolved in when it
/// loads: the module its binding names, or else the one module the patch replaces
/// functions of that is not loaded (with several, a binding must say which).
pub(crate) fn pending_module<'m>(
    manifest: &'m crate::load::manifest::Manifest,
    absent: &[String],
    name: &str,
) -> Result<Option<&'m str>, KpError> {
    if let Some(b) = manifest.bindings.iter().find(|b| b.local == name) {
        return Ok(b
            .kernel
            .object
            .as_deref()
            .filter(|m| absent.iter().any(|a| a == m)));
    }
    let waiting: Vec<&str> = manifest
        .modules()
        .into_iter()
        .filter(|m| absent.iter().any(|a| a == m))
        .collect();
    match waiting[..] {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        _ => Err(KpError::Symbol(format!(
            "'{name}' is in neither vmlinux nor a loaded module, and modules {} are not \
             loaded: say which has it with LPVMM_SYMBOL_IN(local, module, name, pos)",
            waiting.join(", ")
        ))),
    }
}

/// What linking a patch with a module part again needs ([`late::LateLink`]):
/// each symbol it uses sorted by the object it is in.
pub(crate) fn late_link(
    obj: &PatchObject,
    runs: Runs,
    boot: &link::BootChoices,
    linked: &link::Linked,
    objects: &ObjectModules,
) -> Result<late::LateLink, KpError> {
    let m = &obj.manifest;
    let mut late = late::LateLink {
        obj: std::sync::Arc::new(obj.clone()),
        at: Placement {
            code: runs.code.start,
            rodata: runs.rodata.start,
            data: runs.data.start,
        },
        boot: boot.clone(),
        vmlinux: Vec::new(),
        owners: Vec::new(),
        current: Vec::new(),
    };
    for (name, addr) in &linked.imports {
        match import_owner(objects, m, name, false)? {
            Some(module) => {
                late.owners.push((name.clone(), module));
                late.current.push((name.clone(), *addr));
            }
            None => late.vmlinux.push((name.clone(), *addr)),
        }
    }
    for name in &linked.pending {
        if let Some(module) = import_owner(objects, m, name, true)? {
            late.owners.push((name.clone(), module));
        }
    }
    Ok(late)
}

/// The module a symbol the patch uses is in (`None`: vmlinux), as [`resolve_import`]
/// found it: the module its binding names, or the loaded module that has it, or the one
/// not loaded yet it is pending on.
pub(crate) fn import_owner(
    objects: &ObjectModules,
    manifest: &crate::load::manifest::Manifest,
    name: &str,
    pending: bool,
) -> Result<Option<String>, KpError> {
    if pending {
        return Ok(pending_module(manifest, &objects.absent, name)?.map(str::to_string));
    }
    if let Some(b) = manifest.bindings.iter().find(|b| b.local == name) {
        return Ok(b.kernel.object.clone());
    }
    Ok(objects::import(&objects.loaded, name, None)?.map(|(m, _)| m.to_string()))
}

/// A kernel symbol a patch uses: its binding first (in vmlinux or the module it names);
/// else the name in the loaded modules the patch replaces functions of, then in vmlinux.
/// A symbol of a module not loaded yet ([`pending_module`]) is pending.
fn resolve_import(
    mem: &KernelMemory,
    kernel: &Kernel,
    objects: &ObjectModules,
    obj: &PatchObject,
    name: &str,
) -> Result<ImportAt, KpError> {
    let m = &obj.manifest;
    let binding = m.bindings.iter().find(|b| b.local == name);
    if let Some(b) = binding {
        if let Some(module) = &b.kernel.object {
            if pending_module(m, &objects.absent, name)?.is_some() {
                return Ok(ImportAt::Pending);
            }
            return objects::bound(&objects.loaded, &b.kernel, module).map(ImportAt::Addr);
        }
    } else if let Some((_, addr)) = objects::import(&objects.loaded, name, None)? {
        return Ok(ImportAt::Addr(addr));
    }
    match vmlinux_import(mem, kernel, binding, name) {
        Ok(addr) => Ok(ImportAt::Addr(addr)),
        Err(e) if binding.is_none() => match pending_module(m, &objects.absent, name)? {
            Some(_) => Ok(ImportAt::Pending),
            None => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// A symbol the patch uses, in vmlinux (by its binding, if it has one).
fn vmlinux_import(
    mem: &KernelMemory,
    kernel: &Kernel,
    binding: Option<&crate::load::manifest::SymbolBinding>,
    name: &str,
) -> Result<u64, KpError> {
    let (kname, pos) = match binding {
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
            use introspection::kallsyms::ResolveError;
            let hint = match &e {
                ResolveError::Ambiguous { .. } => {
                    " (bind it with LPVMM_SYMBOL(local, name, pos))".to_string()
                }
                ResolveError::Unknown(_) => match module_having(mem, kernel, kname) {
                    Some(m) => format!(
                        " in vmlinux; module {m} has it (a patch uses a module's symbols \
                         when it replaces a function of that module, LPVMM_REPLACE_IN, or \
                         binds the symbol, LPVMM_SYMBOL_IN)"
                    ),
                    None => String::new(),
                },
                ResolveError::NoSuchPosition { .. } => String::new(),
            };
            KpError::Symbol(format!("{e}{hint}"))
        })
}
