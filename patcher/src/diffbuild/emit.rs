//! The patch object a diff build writes: an ordinary `.kp` (ELF relocatable, manifest in
//! `.lpvmm.manifest`) holding the plan's sections from the "after" object, the kept
//! entries of its tables, and every other reference as an undefined symbol named as the
//! running kernel names it, which `lpvmm patch` resolves from the guest's kallsyms (in
//! the module for a module's file). What changed and why is in `.lpvmm.diff`, read by
//! `kp inspect`; sections named `.lpvmm.*` are never loaded.

use std::collections::BTreeMap;

use object::write::{Object, Relocation, SectionId, Symbol, SymbolId, SymbolSection};
use object::{
    Architecture, BinaryFormat, Endianness, RelocationFlags, SectionKind, SymbolFlags, SymbolKind,
    SymbolScope,
};

use super::differ::{Plan, TableCut};
use super::objfile::{ObjFile, Reloc, SymKind, SHF_EXECINSTR, SHF_MERGE, SHF_STRINGS, SHF_WRITE};
use super::DiffBuildError;

/// The section of the manifest's `key=value` strings.
pub const MANIFEST: &str = ".lpvmm.manifest";
/// The section of the diff build's report: one line per carried function.
pub const REPORT: &str = ".lpvmm.diff";

/// One object's share of the patch: the "after" object, its plan, and the module it is
/// part of (`None`: vmlinux).
pub struct Part<'a> {
    pub after: &'a ObjFile,
    pub plan: &'a Plan,
    pub module: Option<&'a str>,
}

struct Writer<'a> {
    out: Object<'a>,
    /// Kernel name → its undefined symbol.
    undefined: BTreeMap<String, SymbolId>,
    /// Positions the author gave for kernel names the kernel has more than once.
    sympos: &'a BTreeMap<String, u32>,
    /// The module of the part being written (`None`: vmlinux).
    module: Option<&'a str>,
    /// `symbol=` bindings of the names in `sympos` the patch uses.
    bindings: Vec<String>,
}

/// What one part's sections and symbols became in the patch object.
struct Copied<'a> {
    after: &'a ObjFile,
    /// "after" section → its copy.
    sections: BTreeMap<usize, SectionId>,
    /// "after" symbol → its copy (defined in a copied section).
    defined: BTreeMap<usize, SymbolId>,
}

/// What the patch object is: its name, the report's lines, and the positions (`POS`-th
/// of that name in the kernel's, or its module's, symbol order) of names the kernel has
/// more than once.
pub struct Meta<'a> {
    pub name: &'a str,
    pub report: &'a [String],
    pub sympos: &'a BTreeMap<String, u32>,
}

/// The patch object of `parts`.
pub fn write<'a>(parts: &[Part<'a>], meta: &Meta<'a>) -> Result<Vec<u8>, DiffBuildError> {
    let mut w = Writer {
        out: Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little),
        undefined: BTreeMap::new(),
        sympos: meta.sympos,
        module: None,
        bindings: Vec::new(),
    };
    let mut manifest = vec!["lpvmm=1".to_string(), format!("name={}", meta.name)];
    for p in parts {
        w.module = p.module;
        let mut c = Copied {
            after: p.after,
            sections: BTreeMap::new(),
            defined: BTreeMap::new(),
        };
        for &x in &p.plan.sections {
            w.copy_section(&mut c, x, None);
        }
        for t in &p.plan.tables {
            w.copy_section(&mut c, t.section, Some(t));
        }
        w.define_symbols(&mut c, p.plan);
        for &x in &p.plan.sections {
            w.relocate(&c, x, p.plan, None)?;
        }
        for t in &p.plan.tables {
            w.relocate(&c, t.section, p.plan, Some(t))?;
        }
        manifest.extend(replacements(p.plan, p.module, meta.sympos));
    }
    for n in meta.sympos.keys() {
        let replaced = parts
            .iter()
            .flat_map(|p| &p.plan.carried)
            .any(|f| f.replaces.as_ref() == Some(n));
        if !replaced && !w.undefined.contains_key(n) {
            return Err(DiffBuildError::Refused(format!(
                "--sympos {n}: the patch neither replaces nor uses a kernel symbol of that name"
            )));
        }
    }
    manifest.append(&mut w.bindings);
    w.note(MANIFEST, &manifest);
    w.note(REPORT, meta.report);
    w.out
        .write()
        .map_err(|e| DiffBuildError::Object(format!("writing the patch object: {e}")))
}

/// A `replace=` for each carried function that replaces one (`,POS` where given).
fn replacements(plan: &Plan, module: Option<&str>, sympos: &BTreeMap<String, u32>) -> Vec<String> {
    let mut m = Vec::new();
    for f in &plan.carried {
        if let Some(old) = &f.replaces {
            let module = module.map(|m| format!("{m}:")).unwrap_or_default();
            let pos = sympos.get(old).map(|p| format!(",{p}")).unwrap_or_default();
            m.push(format!("replace={module}{old}{pos}:{}", new_name(&f.name)));
        }
    }
    m
}

/// The name a carried function has in the patch: its own where that is a C identifier
/// (`cmdline_proc_show`), dots written `_` where it is a clone (`foo.isra.0` →
/// `foo_isra_0`): a manifest names functions by identifiers.
pub fn new_name(name: &str) -> String {
    name.replace('.', "_")
}

impl Writer<'_> {
    fn copy_section(&mut self, c: &mut Copied<'_>, x: usize, cut: Option<&TableCut>) {
        let s = &c.after.sections[x];
        let kind = if s.flags & SHF_EXECINSTR != 0 {
            SectionKind::Text
        } else if s.nobits {
            SectionKind::UninitializedData
        } else if s.flags & SHF_WRITE != 0 {
            SectionKind::Data
        } else {
            SectionKind::ReadOnlyData
        };
        let id = self
            .out
            .add_section(Vec::new(), s.name.as_bytes().to_vec(), kind);
        // The patch's copy is not merged with others.
        self.out.section_mut(id).flags = object::SectionFlags::Elf {
            sh_flags: s.flags & !(SHF_MERGE | SHF_STRINGS),
        };
        if s.nobits {
            self.out.append_section_bss(id, s.size, s.align);
        } else {
            let bytes: Vec<u8> = match cut {
                Some(t) => t
                    .entries
                    .iter()
                    .flat_map(|&e| {
                        let at = (e * t.entry_size) as usize;
                        s.bytes
                            .get(at..at + t.entry_size as usize)
                            .unwrap_or_default()
                            .to_vec()
                    })
                    .collect(),
                None => s.bytes.clone(),
            };
            self.out.append_section_data(id, &bytes, s.align);
        }
        c.sections.insert(x, id);
    }

    /// Every function and variable of a copied section (not of a table), local, under
    /// its patch name.
    fn define_symbols(&mut self, c: &mut Copied<'_>, plan: &Plan) {
        for (&x, &id) in &c.sections {
            if plan.tables.iter().any(|t| t.section == x) {
                continue;
            }
            for &i in c.after.symbols_in(x) {
                let s = &c.after.symbols[i];
                let sym = self.out.add_symbol(Symbol {
                    name: new_name(&s.name).into_bytes(),
                    value: s.value,
                    size: s.size,
                    kind: if s.kind == SymKind::Func {
                        SymbolKind::Text
                    } else {
                        SymbolKind::Data
                    },
                    scope: SymbolScope::Compilation,
                    weak: false,
                    section: SymbolSection::Section(id),
                    flags: SymbolFlags::None,
                });
                c.defined.insert(i, sym);
            }
        }
    }

    /// The undefined symbol of kernel name `name`; a name with a position given is
    /// another local name, bound to the `POS`-th `name` in the part's object.
    fn undefined(&mut self, name: &str) -> SymbolId {
        if let Some(&id) = self.undefined.get(name) {
            return id;
        }
        let local = match self.sympos.get(name) {
            Some(pos) => {
                let local = format!("__lpvmm_pos_{}", new_name(name));
                let object = self.module.map(|m| format!("{m}:")).unwrap_or_default();
                self.bindings
                    .push(format!("symbol={local}:{object}{name},{pos}"));
                local
            }
            None => name.to_string(),
        };
        let id = self.out.add_symbol(Symbol {
            name: local.into_bytes(),
            value: 0,
            size: 0,
            kind: SymbolKind::Unknown,
            scope: SymbolScope::Dynamic,
            weak: false,
            section: SymbolSection::Undefined,
            flags: SymbolFlags::None,
        });
        self.undefined.insert(name.to_string(), id);
        id
    }

    /// The relocations of a copied section (of a table, those of its kept entries, at
    /// their new offsets), each to a copy or to the kernel's symbol.
    fn relocate(
        &mut self,
        c: &Copied<'_>,
        x: usize,
        plan: &Plan,
        cut: Option<&TableCut>,
    ) -> Result<(), DiffBuildError> {
        let id = c.sections[&x];
        for r in &c.after.sections[x].relocs {
            let offset = match cut {
                Some(t) => match t.entries.iter().position(|&e| e == r.offset / t.entry_size) {
                    Some(k) => k as u64 * t.entry_size + r.offset % t.entry_size,
                    None => continue,
                },
                None => r.offset,
            };
            let (symbol, addend) = self.target_of(c, r, plan)?;
            let relocation = Relocation {
                offset,
                symbol,
                addend,
                flags: RelocationFlags::Elf { r_type: r.r_type },
            };
            self.out.add_relocation(id, relocation).map_err(|e| {
                DiffBuildError::Object(format!("relocation in {}: {e}", c.after.sections[x].name))
            })?;
        }
        Ok(())
    }

    /// Where a relocation of "after" points in the patch object: a copied section, a
    /// copied symbol, or the kernel's symbol (the addend moved to count from it).
    fn target_of(
        &mut self,
        c: &Copied<'_>,
        r: &Reloc,
        plan: &Plan,
    ) -> Result<(SymbolId, i64), DiffBuildError> {
        let s = &c.after.symbols[r.symbol];
        let Some(place) = c.after.target(r) else {
            return Ok((self.undefined(&s.name), r.addend));
        };
        if let Some(&id) = c.sections.get(&place.section) {
            return Ok(match c.defined.get(&r.symbol) {
                Some(&sym) => (sym, r.addend),
                None => (self.out.section_symbol(id), r.addend + s.value as i64),
            });
        }
        let sym = match s.kind {
            SymKind::Section => c.after.symbol_at(place),
            _ => Some(r.symbol),
        };
        let Some((i, name)) = sym.and_then(|i| plan.external.get(&i).map(|n| (i, n))) else {
            return Err(DiffBuildError::Object(format!(
                "a relocation to {}+{:#x} reaches nothing the plan has",
                c.after.sections[place.section].name, place.offset
            )));
        };
        let from = c.after.symbols[i].value as i64;
        Ok((self.undefined(name), r.addend + s.value as i64 - from))
    }

    /// A never-loaded section of NUL-terminated strings.
    fn note(&mut self, name: &str, lines: &[String]) {
        let id = self
            .out
            .add_section(Vec::new(), name.as_bytes().to_vec(), SectionKind::Other);
        let mut bytes = Vec::new();
        for l in lines {
            bytes.extend_from_slice(l.as_bytes());
            bytes.push(0);
        }
        self.out.append_section_data(id, &bytes, 1);
    }
}
