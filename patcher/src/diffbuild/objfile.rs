//! One kbuild object of a diff build, read once into what the differ compares: its
//! sections with their bytes and relocations, its symbols, and for any place in a
//! section the symbol (or string) that place belongs to.

use std::collections::HashMap;

use object::{Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget};

use super::DiffBuildError;

pub const SHF_WRITE: u64 = 0x1;
pub const SHF_EXECINSTR: u64 = 0x4;
pub const SHF_MERGE: u64 = 0x10;
pub const SHF_STRINGS: u64 = 0x20;
pub const SHF_ALLOC: u64 = 0x2;

pub const R_X86_64_PC32: u32 = 2;
pub const R_X86_64_PLT32: u32 = 4;

#[derive(Debug, Clone)]
pub struct Section {
    pub name: String,
    pub bytes: Vec<u8>,
    /// `SHT_NOBITS`: `size` zero bytes, none stored.
    pub nobits: bool,
    pub size: u64,
    pub align: u64,
    pub flags: u64,
    pub relocs: Vec<Reloc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloc {
    pub offset: u64,
    pub r_type: u32,
    /// Index into [`ObjFile::symbols`].
    pub symbol: usize,
    pub addend: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymKind {
    Func,
    Object,
    Section,
    Other,
}

#[derive(Debug, Clone)]
pub struct Symbol {
    pub name: String,
    pub kind: SymKind,
    /// Index into [`ObjFile::sections`]; `None`: undefined (or absolute).
    pub section: Option<usize>,
    pub value: u64,
    pub size: u64,
    pub global: bool,
}

/// Where a relocation leads inside the object: a symbol and the offset from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub section: usize,
    pub offset: u64,
}

#[derive(Debug)]
pub struct ObjFile {
    /// By ELF section index (unallocated ones as empty placeholders).
    pub sections: Vec<Section>,
    /// By ELF symbol index (index 0: the null symbol).
    pub symbols: Vec<Symbol>,
    /// Per section: its named function and object symbols, by value.
    by_section: HashMap<usize, Vec<usize>>,
}

impl ObjFile {
    pub fn parse(bytes: &[u8], what: &str) -> Result<ObjFile, DiffBuildError> {
        let bad = |e: object::Error| DiffBuildError::Object(format!("{what}: {e}"));
        let file = object::File::parse(bytes).map_err(bad)?;
        let count = file.sections().map(|s| s.index().0 + 1).max().unwrap_or(0);
        let mut sections: Vec<Section> = (0..count).map(|_| placeholder()).collect();
        for s in file.sections() {
            sections[s.index().0] = read_section(&s).map_err(bad)?;
        }
        let scount = file.symbols().map(|s| s.index().0 + 1).max().unwrap_or(1);
        let mut symbols: Vec<Symbol> = (0..scount).map(|_| null_symbol()).collect();
        for s in file.symbols() {
            symbols[s.index().0] = read_symbol(&s, &sections);
        }
        let mut by_section: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, s) in symbols.iter().enumerate() {
            if let (Some(sec), SymKind::Func | SymKind::Object) = (s.section, s.kind) {
                by_section.entry(sec).or_default().push(i);
            }
        }
        for list in by_section.values_mut() {
            list.sort_by_key(|&i| symbols[i].value);
        }
        Ok(ObjFile {
            sections,
            symbols,
            by_section,
        })
    }

    /// The place a relocation refers to, for finding what it refers to: a PC-relative
    /// one's addend counts from the end of the 4-byte field (-4 for the field's own
    /// instruction end in the common case), so 4 is added back.
    pub fn target(&self, r: &Reloc) -> Option<Place> {
        let s = &self.symbols[r.symbol];
        let bias = if matches!(r.r_type, R_X86_64_PC32 | R_X86_64_PLT32) {
            4
        } else {
            0
        };
        Some(Place {
            section: s.section?,
            offset: (s.value as i64 + r.addend + bias).max(0) as u64,
        })
    }

    /// The function or object symbol a place lies in (or starts at).
    pub fn symbol_at(&self, p: Place) -> Option<usize> {
        let list = self.by_section.get(&p.section)?;
        list.iter().rev().copied().find(|&i| {
            let s = &self.symbols[i];
            s.value <= p.offset && (p.offset < s.value + s.size.max(1))
        })
    }

    /// The function and object symbols defined in a section.
    pub fn symbols_in(&self, section: usize) -> &[usize] {
        self.by_section
            .get(&section)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The relocations of `section` inside `[from, from + len)`.
    pub fn relocs_in(&self, section: usize, from: u64, len: u64) -> impl Iterator<Item = &Reloc> {
        self.sections[section]
            .relocs
            .iter()
            .filter(move |r| r.offset >= from && r.offset < from + len)
    }

    pub fn is_text(&self, section: usize) -> bool {
        self.sections[section].flags & SHF_EXECINSTR != 0
    }

    pub fn is_strings(&self, section: usize) -> bool {
        let f = self.sections[section].flags;
        f & SHF_MERGE != 0 && f & SHF_STRINGS != 0
    }
}

fn placeholder() -> Section {
    Section {
        name: String::new(),
        bytes: Vec::new(),
        nobits: false,
        size: 0,
        align: 1,
        flags: 0,
        relocs: Vec::new(),
    }
}

fn null_symbol() -> Symbol {
    Symbol {
        name: String::new(),
        kind: SymKind::Other,
        section: None,
        value: 0,
        size: 0,
        global: false,
    }
}

fn read_section(s: &object::Section<'_, '_>) -> Result<Section, object::Error> {
    let flags = match s.flags() {
        object::SectionFlags::Elf { sh_flags } => sh_flags,
        _ => 0,
    };
    let nobits = s.kind() == object::SectionKind::UninitializedData;
    let name = s.name().unwrap_or("").to_string();
    let discard = name.starts_with(".discard.");
    let mut relocs = Vec::new();
    for (offset, r) in s.relocations() {
        let (RelocationTarget::Symbol(sym), RelocationFlags::Elf { r_type }) =
            (r.target(), r.flags())
        else {
            continue;
        };
        relocs.push(Reloc {
            offset,
            r_type,
            symbol: sym.0,
            addend: r.addend(),
        });
    }
    relocs.sort_by_key(|r| r.offset);
    Ok(Section {
        name,
        // Allocated sections and the `.discard.*` annotations objtool reads; not the
        // debug info (read apart, see layout.rs), symbols or relocations.
        bytes: if nobits || (flags & SHF_ALLOC == 0 && !discard) {
            Vec::new()
        } else {
            s.data()?.to_vec()
        },
        nobits,
        size: s.size(),
        align: s.align().max(1),
        flags,
        relocs,
    })
}

fn read_symbol(s: &object::Symbol<'_, '_>, sections: &[Section]) -> Symbol {
    let section = s.section_index().map(|i| i.0);
    let kind = match s.kind() {
        object::SymbolKind::Text => SymKind::Func,
        object::SymbolKind::Data => SymKind::Object,
        object::SymbolKind::Section => SymKind::Section,
        _ => SymKind::Other,
    };
    let name = match kind {
        SymKind::Section => section
            .and_then(|i| sections.get(i))
            .map(|s| s.name.clone())
            .unwrap_or_default(),
        _ => s.name().unwrap_or("").to_string(),
    };
    Symbol {
        name,
        kind,
        section,
        value: s.address(),
        size: s.size(),
        global: s.is_global(),
    }
}
