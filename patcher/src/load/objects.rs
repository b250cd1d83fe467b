//! The modules a patch names (its objects besides vmlinux, livepatch's `klp_object`),
//! found in the guest's module list while the patch is prepared, and found again, the
//! same, in the pause that writes it.
//!
//! A module may be unloaded, and another loaded at the same place, while the guest runs
//! between the two looks. So what prepare saw of each (its `struct module`, its text,
//! its state) is kept and compared in the pause; its symbols, which a live module no
//! longer changes (its init symbols went when its init ended), are read once.

use introspection::kallsyms::ResolveError;
use introspection::kernel::{Kernel, Range};
use introspection::memory::KernelMemory;
use introspection::modules::{Module, ModuleList, ModuleState, ModuleSymbols};

use crate::load::manifest::{KernelSymbol, Manifest};
use crate::KpError;

/// A module a patch names, as prepare saw it.
#[derive(Clone, Debug)]
pub(crate) struct ObjectModule {
    pub(crate) name: String,
    /// Its `struct module`.
    pub(crate) addr: u64,
    /// Its code (core text).
    pub(crate) text: Range,
    pub(crate) symbols: ModuleSymbols,
    /// The patch replaces functions of it (not only binds a symbol of it): the symbols
    /// the patch uses are looked up in it before vmlinux.
    pub(crate) replaced: bool,
}

/// Every module `m` names (in its replacements and its symbol bindings), each once.
fn named_modules(m: &Manifest) -> Vec<&str> {
    let mut out = m.modules();
    for b in m.bindings.iter().filter_map(|b| b.kernel.object.as_deref()) {
        if !out.contains(&b) {
            out.push(b);
        }
    }
    out
}

fn list(mem: &KernelMemory, kernel: &Kernel) -> Result<ModuleList, KpError> {
    ModuleList::read(mem, kernel).map_err(|e| KpError::GuestState(format!("{e}")))
}

/// The modules a patch names, as one look at the guest's module list found them.
#[derive(Clone, Debug, Default)]
pub(crate) struct ObjectModules {
    /// Loaded and live.
    pub(crate) loaded: Vec<ObjectModule>,
    /// Not loaded (or on their way out): their part of the patch is linked and
    /// redirected when the guest loads them.
    pub(crate) absent: Vec<String>,
}

/// The module called `name`: live, absent (`None`; one being unloaded counts as gone),
/// or an error for one loading now, whose notifier pass lpvmm may have missed.
fn find<'l>(l: &'l ModuleList, name: &str) -> Result<Option<&'l Module>, KpError> {
    let Some(m) = l.named(name) else {
        return Ok(None);
    };
    match m.state {
        ModuleState::Live => Ok(Some(m)),
        ModuleState::Going => Ok(None),
        ModuleState::Coming | ModuleState::Unformed => Err(KpError::GuestBusy(format!(
            "module {name} is loading; try again when it has loaded"
        ))),
    }
}

/// The modules the patch names, read while the guest runs (checked again in the pause
/// by [`check_same`]).
pub(crate) fn read(
    mem: &KernelMemory,
    kernel: &Kernel,
    manifest: &Manifest,
) -> Result<ObjectModules, KpError> {
    let names = named_modules(manifest);
    let replaced = manifest.modules();
    if names.is_empty() {
        return Ok(ObjectModules::default());
    }
    let l = list(mem, kernel)?;
    let mut out = ObjectModules::default();
    for name in names {
        let Some(m) = find(&l, name)? else {
            out.absent.push(name.to_string());
            continue;
        };
        let symbols = m
            .symbols(mem, kernel)
            .map_err(|e| KpError::GuestState(format!("module {name}: {e}")))?;
        out.loaded.push(ObjectModule {
            name: name.to_string(),
            addr: m.addr,
            text: m.text,
            symbols,
            replaced: replaced.contains(&name),
        });
    }
    Ok(out)
}

/// In the pause: each module is still the one prepare read, and each absent one still
/// absent (or still unformed: its notifier pass is yet to come).
pub(crate) fn check_same(
    mem: &KernelMemory,
    kernel: &Kernel,
    patch: &str,
    seen: &ObjectModules,
) -> Result<(), KpError> {
    if seen.loaded.is_empty() && seen.absent.is_empty() {
        return Ok(());
    }
    let l = list(mem, kernel)?;
    let changed = |name: &str| {
        KpError::State(format!(
            "{patch}: module {name} was loaded or unloaded while the patch was linked; \
             load the patch again"
        ))
    };
    for o in &seen.loaded {
        match find(&l, &o.name)? {
            Some(m) if m.addr == o.addr && m.text == o.text => {}
            _ => return Err(changed(&o.name)),
        }
    }
    for name in &seen.absent {
        let here = l
            .named(name)
            .is_some_and(|m| !matches!(m.state, ModuleState::Unformed | ModuleState::Going));
        if here {
            return Err(changed(name));
        }
    }
    Ok(())
}

/// The module of `sym`, which the patch must have read.
fn module_of<'o>(objects: &'o [ObjectModule], name: &str) -> Result<&'o ObjectModule, KpError> {
    objects
        .iter()
        .find(|o| o.name == name)
        .ok_or_else(|| KpError::State(format!("module {name} was not read")))
}

/// A function of a module the patch names: its address and size.
pub(crate) fn function(
    objects: &[ObjectModule],
    sym: &KernelSymbol,
    module: &str,
) -> Result<(u64, u64), KpError> {
    let o = module_of(objects, module)?;
    let s = o
        .symbols
        .resolve(&sym.name, sym.pos)
        .map_err(|e| KpError::Symbol(format!("module {module}: {e}")))?;
    let size = o.symbols.locate(s.addr).and_then(|l| l.size).unwrap_or(0);
    if !matches!(s.kind, 't' | 'T') || !o.text.contains(s.addr) || size == 0 {
        return Err(KpError::Symbol(format!(
            "{sym} is not a function of module {module}"
        )));
    }
    Ok((s.addr, size))
}

/// A symbol the patch uses, looked up in its modules in order (livepatch resolves an
/// object's relocations in that object first, then in vmlinux): the module that has it
/// and its address there, if one has. A name two of them have is ambiguous.
pub(crate) fn import<'o>(
    objects: &'o [ObjectModule],
    name: &str,
    pos: Option<u32>,
) -> Result<Option<(&'o str, u64)>, KpError> {
    let mut found: Option<(&str, u64)> = None;
    for o in objects.iter().filter(|o| o.replaced) {
        let addr = match o.symbols.resolve(name, pos) {
            Ok(s) => s.addr,
            Err(ResolveError::Unknown(_)) => continue,
            Err(e) => return Err(KpError::Symbol(format!("module {}: {e}", o.name))),
        };
        if let Some((other, _)) = found {
            return Err(KpError::Symbol(format!(
                "'{name}' is in both module {other} and module {}: bind it with \
                 LPVMM_SYMBOL_IN(local, module, name, pos)",
                o.name
            )));
        }
        found = Some((&o.name, addr));
    }
    Ok(found)
}

/// The symbol `sym` names in module `module` (a binding's).
pub(crate) fn bound(
    objects: &[ObjectModule],
    sym: &KernelSymbol,
    module: &str,
) -> Result<u64, KpError> {
    let o = module_of(objects, module)?;
    o.symbols
        .resolve(&sym.name, sym.pos)
        .map(|s| s.addr)
        .map_err(|e| KpError::Symbol(format!("module {module}: {e}")))
}
