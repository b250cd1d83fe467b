//! A kbuild-built livepatch module given the form klp-convert and kpatch-build give one
//! (Documentation/livepatch/module-elf-format.rst): the relocations of a section to
//! some kernel symbols moved into `.klp.rela.vmlinux.SECTION` (`SHF_RELA_LIVEPATCH`),
//! and those symbols renamed `.klp.sym.vmlinux.NAME,0` and marked `SHN_LIVEPATCH`. The
//! kernel's module loader leaves such relocations to livepatch; lpvmm must read them.

use object::build::elf::{Builder, SectionData};
use object::elf;

/// `SHN_LIVEPATCH` and `SHF_RELA_LIVEPATCH` (include/uapi/linux/elf.h).
const SHN_LIVEPATCH: u16 = 0xff20;
const SHF_RELA_LIVEPATCH: u64 = 0x0010_0000;

/// `ko` with the relocations of `section` to each of `symbols` made livepatch ones.
pub fn klp_convert(ko: &[u8], section: &str, symbols: &[&str]) -> Result<Vec<u8>, String> {
    let mut b = Builder::read(ko).map_err(|e| format!("reading the module: {e}"))?;
    let mut ids = Vec::new();
    for sym in b.symbols.iter_mut() {
        let name = String::from_utf8_lossy(&sym.name).into_owned();
        if symbols.contains(&name.as_str()) {
            sym.name = format!(".klp.sym.vmlinux.{name},0").into_bytes().into();
            sym.st_shndx = SHN_LIVEPATCH;
            sym.section = None;
            ids.push(sym.id());
        }
    }
    if ids.len() != symbols.len() {
        return Err(format!("the module does not use all of {symbols:?}"));
    }
    let target = b
        .sections
        .iter()
        .find(|s| &*s.name == section.as_bytes())
        .map(|s| s.id())
        .ok_or_else(|| format!("no section {section}"))?;
    let rela = b
        .sections
        .iter_mut()
        .find(|s| s.sh_type == elf::SHT_RELA && s.sh_info_section == Some(target))
        .ok_or_else(|| format!("no relocations of {section}"))?;
    let symtab = rela.sh_link_section;
    let SectionData::Relocation(relocs) = &mut rela.data else {
        return Err(format!("the relocations of {section} are not relocations"));
    };
    let (moved, kept) = std::mem::take(relocs)
        .into_iter()
        .partition(|r| r.symbol.is_some_and(|id| ids.contains(&id)));
    *relocs = kept;
    let klp = b.sections.add();
    klp.name = format!(".klp.rela.vmlinux.{section}").into_bytes().into();
    klp.sh_type = elf::SHT_RELA;
    klp.sh_flags = u64::from(elf::SHF_ALLOC) | SHF_RELA_LIVEPATCH;
    klp.sh_link_section = symtab;
    klp.sh_info_section = Some(target);
    klp.sh_addralign = 8;
    klp.sh_entsize = 24;
    klp.data = SectionData::Relocation(moved);
    let mut out = Vec::new();
    b.write(&mut out)
        .map_err(|e| format!("writing the module: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::read::elf::{ElfFile64, Sym};
    use object::{Object, ObjectSection, ObjectSymbol};

    /// The fuzz seed's livepatch module: its returns through `__x86_return_thunk` moved
    /// to a livepatch section; `.text` still has all five relocations, two sections'
    /// worth, as a reader that chains relocation sections (object's, lpvmm's) sees them.
    #[test]
    fn converted_relocations_stay_the_sections_under_livepatch_names() {
        let ko = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/seeds/kp/klp.ko"
        ))
        .unwrap();
        let out = klp_convert(&ko, ".text", &["__x86_return_thunk"]).unwrap();
        let f = ElfFile64::<object::Endianness>::parse(&out[..]).unwrap();
        let klp = f.section_by_name(".klp.rela.vmlinux..text").unwrap();
        let flags = match klp.flags() {
            object::SectionFlags::Elf { sh_flags } => sh_flags,
            _ => 0,
        };
        assert_eq!(flags & SHF_RELA_LIVEPATCH, SHF_RELA_LIVEPATCH);
        let text = f.section_by_name(".text").unwrap();
        let names: Vec<String> = text
            .relocations()
            .filter_map(|(_, r)| match r.target() {
                object::RelocationTarget::Symbol(i) => {
                    Some(f.symbol_by_index(i).unwrap().name().unwrap().to_string())
                }
                _ => None,
            })
            .collect();
        assert_eq!(names.len(), 5, "{names:?}");
        let thunk = ".klp.sym.vmlinux.__x86_return_thunk,0";
        assert_eq!(names.iter().filter(|n| *n == thunk).count(), 3, "{names:?}");
        let sym = f.symbols().find(|s| s.name() == Ok(thunk)).unwrap();
        let endian = f.endian();
        assert_eq!(sym.elf_symbol().st_shndx(endian), SHN_LIVEPATCH);
    }
}
