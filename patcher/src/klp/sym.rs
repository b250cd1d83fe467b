//! Livepatch symbols and relocation sections (Documentation/livepatch/module-elf-format.rst),
//! as kpatch-build and klp-convert emit them: a symbol the patch uses in the running
//! kernel is named `.klp.sym.OBJ.NAME,POS` (`OBJ` `vmlinux` or a module, `POS` its
//! occurrence among same-named symbols in kallsyms order, 0 for a unique one) and marked
//! `SHN_LIVEPATCH`; the relocations that use it are in `.klp.rela.OBJ.SECTION`, which
//! the kernel applies only once `OBJ` is there.
//!
//! lpvmm reads such a symbol as an import bound to `NAME` in `OBJ` at `POS`, as
//! `LPVMM_SYMBOL` binds one, and the relocation section as any other of its section:
//! one of a module not loaded yet is linked when the module loads, as every import of
//! a module object is.

use crate::load::manifest::{valid_module_name, KernelSymbol, SymbolBinding};
use crate::ParseError;

/// The prefix of a livepatch symbol's name.
pub const PREFIX: &str = ".klp.sym.";
/// The prefix of a livepatch relocation section's name.
pub const RELA_PREFIX: &str = ".klp.rela.";
/// `SHN_LIVEPATCH` (include/uapi/linux/elf.h): a livepatch symbol's section index.
pub const SHN_LIVEPATCH: u16 = 0xff20;

/// The binding of the livepatch symbol `local` (`.klp.sym.OBJ.NAME,POS`); `None` for
/// any other name. A malformed one is refused, naming it.
pub fn binding(local: &str) -> Result<Option<SymbolBinding>, ParseError> {
    let Some(rest) = local.strip_prefix(PREFIX) else {
        return Ok(None);
    };
    let bad = |why: &str| {
        ParseError::Manifest(format!(
            "livepatch symbol '{local}': {why} (the form is .klp.sym.OBJECT.NAME,POSITION)"
        ))
    };
    let (object, named) = rest.split_once('.').ok_or_else(|| bad("no object"))?;
    let (name, pos) = named.rsplit_once(',').ok_or_else(|| bad("no position"))?;
    let pos: u32 = pos
        .parse()
        .map_err(|_| bad("the position is not a number"))?;
    if name.is_empty() || name.contains(',') {
        return Err(bad("no symbol name"));
    }
    let object = match object {
        "vmlinux" => None,
        m if valid_module_name(m) => Some(m.to_string()),
        _ => return Err(bad("the object is neither vmlinux nor a module name")),
    };
    Ok(Some(SymbolBinding {
        local: local.to_string(),
        kernel: KernelSymbol {
            object,
            name: name.to_string(),
            pos: (pos > 0).then_some(pos),
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn livepatch_symbols_become_bindings_and_bad_ones_are_named() {
        let b = binding(".klp.sym.vmlinux.saved_command_line,0")
            .unwrap()
            .unwrap();
        assert_eq!(
            (b.kernel.object, b.kernel.name.as_str(), b.kernel.pos),
            (None, "saved_command_line", None)
        );
        let b = binding(".klp.sym.tun.tun_get_socket,2").unwrap().unwrap();
        assert_eq!(
            (
                b.kernel.object.as_deref(),
                b.kernel.name.as_str(),
                b.kernel.pos
            ),
            (Some("tun"), "tun_get_socket", Some(2))
        );
        assert_eq!(binding("seq_printf").unwrap(), None);
        for bad in [
            ".klp.sym.vmlinux",
            ".klp.sym.vmlinux.x",
            ".klp.sym.vmlinux.x,y",
            ".klp.sym.vmlinux.,0",
            ".klp.sym.no-such!.x,0",
        ] {
            let e = binding(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }
}
