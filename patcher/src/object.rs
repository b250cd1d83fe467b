//! Reading a `.kp` file: an ELF64 x86-64 relocatable object (what `gcc -c` makes) with a
//! manifest section. Everything here is validation of untrusted input: the result holds
//! only what the linker can lay out and relocate safely, or an error that names the
//! section, symbol or relocation that cannot be honoured.

use object::elf;
use object::{
    Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget, SectionFlags,
    SectionKind as ObjKind, SymbolKind, SymbolSection,
};
use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;
use crate::KpError;

pub const MANIFEST_SECTION: &str = ".lpvmm.manifest";
/// No patch is this big; a larger file or section is refused before it is read.
pub const MAX_KP_BYTES: usize = 16 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SectionKind {
    /// Executable: mapped read-only and executable.
    Code,
    /// Read-only data: mapped read-only, not executable.
    ReadOnly,
    /// Writable data: mapped read-write, not executable.
    Data,
    /// Zero-filled writable data.
    Bss,
}

impl SectionKind {
    pub fn executable(self) -> bool {
        self == SectionKind::Code
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelocKind {
    /// R_X86_64_64: the absolute 64-bit address.
    Abs64,
    /// R_X86_64_32S: the absolute address as a sign-extended 32-bit value.
    Abs32S,
    /// R_X86_64_32: the absolute address as a zero-extended 32-bit value.
    Abs32,
    /// R_X86_64_PC32 / PLT32: a 32-bit displacement from the patched location.
    Pc32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelocTarget {
    /// The start of a laid-out section of the patch (index into `sections`).
    Section(usize),
    /// A symbol defined in the patch: section index and offset in it.
    Defined {
        section: usize,
        offset: u64,
        name: String,
    },
    /// A symbol the kernel must provide.
    Kernel(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloc {
    pub offset: u64,
    pub kind: RelocKind,
    pub target: RelocTarget,
    pub addend: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    pub name: String,
    pub kind: SectionKind,
    pub align: u64,
    pub size: u64,
    /// Contents (empty for bss).
    pub bytes: Vec<u8>,
    pub relocs: Vec<Reloc>,
}

/// A function the patch defines.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Function {
    pub name: String,
    pub section: usize,
    pub offset: u64,
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchObject {
    pub manifest: Manifest,
    pub sections: Vec<Section>,
    pub functions: Vec<Function>,
    /// Kernel symbols the patch refers to, sorted.
    pub imports: Vec<String>,
}

/// Sections that make the kernel do something with the code (fix up faults, patch
/// instructions at boot, trace calls): loading them without telling the kernel would be
/// silently wrong, so a patch that has them is refused, with what to do instead.
fn special_section_advice(name: &str) -> Option<&'static str> {
    Some(match name {
        "__ex_table" => "an exception table (code that may fault on user memory, e.g. inline get_user/copy_to_user): call the kernel's out-of-line helpers such as _copy_to_user instead",
        ".altinstructions" | ".altinstr_replacement" | ".altinstr_aux" => "alternative instructions the kernel patches at boot (asm/alternative.h)",
        "__jump_table" => "static keys / jump labels (static_branch_*), which the kernel patches at run time",
        ".static_call_sites" | ".static_call.text" => "static calls, which the kernel patches at run time",
        "__bug_table" => "BUG()/WARN() entries the kernel's trap handler looks up",
        "__mcount_loc" | "__patchable_function_entries" => "ftrace call sites (built with -pg/-mfentry; lpvmm kp build does not use them)",
        ".smp_locks" => "SMP lock prefixes the kernel rewrites",
        ".parainstructions" => "paravirt call sites the kernel patches",
        ".retpoline_sites" | ".return_sites" | ".call_sites" | ".ibt_endbr_seal" => "objtool call-site tables the kernel patches at boot",
        ".data..percpu" => "per-CPU variables, which need the kernel's per-CPU allocator",
        _ if name.starts_with(".init") || name.starts_with(".exit") => "init/exit code, which never runs in a live patch",
        _ if name.starts_with(".tdata") || name.starts_with(".tbss") => "thread-local storage, which the kernel does not have",
        _ => return None,
    })
}

fn classify(name: &str, flags: u64, kind: ObjKind) -> Result<Option<SectionKind>, KpError> {
    let alloc = flags & u64::from(elf::SHF_ALLOC) != 0;
    let exec = flags & u64::from(elf::SHF_EXECINSTR) != 0;
    if !alloc || name.starts_with(".lpvmm.") || name == ".eh_frame" || name.starts_with(".note") {
        return Ok(None);
    }
    if let Some(why) = special_section_advice(name) {
        return Err(KpError::Unsupported(format!(
            "section {name}: {why}; the guest kernel would have to know about it"
        )));
    }
    let k = if name == ".text" || name.starts_with(".text.") {
        SectionKind::Code
    } else if exec {
        return Err(KpError::Unsupported(format!(
            "section {name} is executable but not .text*"
        )));
    } else if name.starts_with(".rodata") {
        SectionKind::ReadOnly
    } else if name.starts_with(".data") {
        SectionKind::Data
    } else if name.starts_with(".bss") || kind == ObjKind::UninitializedData {
        SectionKind::Bss
    } else {
        return Err(KpError::Unsupported(format!(
            "section {name}: unknown allocated section; lpvmm lays out only .text*, .rodata*, .data* and .bss*"
        )));
    };
    Ok(Some(k))
}

fn reloc_kind(r_type: u32) -> Option<RelocKind> {
    Some(match r_type {
        elf::R_X86_64_64 => RelocKind::Abs64,
        elf::R_X86_64_32S => RelocKind::Abs32S,
        elf::R_X86_64_32 => RelocKind::Abs32,
        elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 => RelocKind::Pc32,
        _ => return None,
    })
}

fn reloc_name(r_type: u32) -> String {
    match r_type {
        elf::R_X86_64_GOTPCREL => "R_X86_64_GOTPCREL".into(),
        elf::R_X86_64_GOTPCRELX => "R_X86_64_GOTPCRELX".into(),
        elf::R_X86_64_REX_GOTPCRELX => "R_X86_64_REX_GOTPCRELX".into(),
        elf::R_X86_64_PC64 => "R_X86_64_PC64".into(),
        elf::R_X86_64_TPOFF32 => "R_X86_64_TPOFF32".into(),
        other => format!("type {other}"),
    }
}

impl PatchObject {
    pub fn parse(data: &[u8]) -> Result<PatchObject, KpError> {
        if data.len() > MAX_KP_BYTES {
            return Err(KpError::NotElf(format!(
                "{} bytes; a .kp is at most {MAX_KP_BYTES}",
                data.len()
            )));
        }
        if data.len() < 4 || &data[..4] != b"\x7fELF" {
            return Err(KpError::NotElf("no ELF magic".into()));
        }
        let file = object::File::parse(data).map_err(|e| KpError::NotElf(e.to_string()))?;
        if !file.is_64() || !file.is_little_endian() {
            return Err(KpError::WrongMachine(
                "not a 64-bit little-endian object".into(),
            ));
        }
        if file.architecture() != object::Architecture::X86_64 {
            return Err(KpError::WrongMachine(format!(
                "built for {:?}, the guest is x86-64",
                file.architecture()
            )));
        }
        if file.kind() != object::ObjectKind::Relocatable {
            return Err(KpError::NotRelocatable(format!("{:?}", file.kind())));
        }

        let manifest_data = file
            .section_by_name(MANIFEST_SECTION)
            .ok_or(KpError::NoManifest)?
            .data()
            .map_err(|e| KpError::Truncated(format!("{MANIFEST_SECTION}: {e}")))?;
        let manifest = Manifest::parse(manifest_data)?;

        // Sections to lay out, with a map from ELF section index to ours.
        let mut sections = Vec::new();
        let mut index_of = std::collections::HashMap::new();
        for s in file.sections() {
            let name = s.name().unwrap_or("").to_string();
            let flags = match s.flags() {
                SectionFlags::Elf { sh_flags } => sh_flags,
                _ => 0,
            };
            let Some(kind) = classify(&name, flags, s.kind())? else {
                continue;
            };
            // Contents are bounded by the file; zero-filled data only by a sanity limit
            // (the patch area, much smaller, refuses it with a clearer message).
            let limit = if kind == SectionKind::Bss {
                1 << 30
            } else {
                MAX_KP_BYTES as u64
            };
            if s.size() > limit {
                return Err(KpError::Truncated(format!(
                    "section {name} claims {} bytes",
                    s.size()
                )));
            }
            let bytes = if kind == SectionKind::Bss {
                Vec::new()
            } else {
                s.data()
                    .map_err(|e| KpError::Truncated(format!("section {name}: {e}")))?
                    .to_vec()
            };
            let align = s.align().max(1);
            if !align.is_power_of_two() || align > 4096 {
                return Err(KpError::Unsupported(format!(
                    "section {name}: alignment {align}"
                )));
            }
            index_of.insert(s.index(), sections.len());
            sections.push(Section {
                name,
                kind,
                align,
                size: s.size(),
                bytes,
                relocs: Vec::new(),
            });
        }

        let mut imports = std::collections::BTreeSet::new();
        let mut functions = Vec::new();
        for sym in file.symbols() {
            let name = sym.name().unwrap_or("").to_string();
            if sym.section() == SymbolSection::Common {
                return Err(KpError::Unsupported(format!(
                    "common symbol {name} (build with -fno-common, as lpvmm kp build does)"
                )));
            }
            if sym.kind() == SymbolKind::Text {
                if let SymbolSection::Section(i) = sym.section() {
                    if let Some(&section) = index_of.get(&i) {
                        functions.push(Function {
                            name,
                            section,
                            offset: sym.address(),
                            size: sym.size(),
                        });
                    }
                }
            }
        }

        for s in file.sections() {
            let Some(&ours) = index_of.get(&s.index()) else {
                continue;
            };
            let sname = sections[ours].name.clone();
            for (offset, r) in s.relocations() {
                let RelocationFlags::Elf { r_type } = r.flags() else {
                    return Err(KpError::Unsupported(format!(
                        "{sname}+{offset:#x}: non-ELF relocation"
                    )));
                };
                let target = match r.target() {
                    RelocationTarget::Symbol(si) => {
                        let sym = file
                            .symbol_by_index(si)
                            .map_err(|e| KpError::Truncated(format!("relocation symbol: {e}")))?;
                        let name = sym.name().unwrap_or("").to_string();
                        match sym.section() {
                            SymbolSection::Undefined => {
                                imports.insert(name.clone());
                                RelocTarget::Kernel(name)
                            }
                            SymbolSection::Section(i) => match index_of.get(&i) {
                                Some(&section) if sym.kind() == SymbolKind::Section => {
                                    RelocTarget::Section(section)
                                }
                                Some(&section) => RelocTarget::Defined {
                                    section,
                                    offset: sym.address(),
                                    name,
                                },
                                None => {
                                    return Err(KpError::Unsupported(format!(
                                        "{sname}+{offset:#x} refers to '{name}' in a section lpvmm does not load"
                                    )))
                                }
                            },
                            other => {
                                return Err(KpError::Unsupported(format!(
                                    "{sname}+{offset:#x} refers to '{name}' ({other:?})"
                                )))
                            }
                        }
                    }
                    RelocationTarget::Section(i) => match index_of.get(&i) {
                        Some(&section) => RelocTarget::Section(section),
                        None => {
                            return Err(KpError::Unsupported(format!(
                                "{sname}+{offset:#x} refers to a section lpvmm does not load"
                            )))
                        }
                    },
                    _ => {
                        return Err(KpError::Unsupported(format!(
                            "{sname}+{offset:#x}: relocation without a target"
                        )))
                    }
                };
                let what = match &target {
                    RelocTarget::Kernel(n) | RelocTarget::Defined { name: n, .. } => n.clone(),
                    RelocTarget::Section(i) => sections[*i].name.clone(),
                };
                let kind = reloc_kind(r_type).ok_or_else(|| {
                    KpError::Unsupported(format!(
                        "relocation {} against '{what}' at {sname}+{offset:#x} (build with -mcmodel=kernel -fno-pic, as lpvmm kp build does)",
                        reloc_name(r_type)
                    ))
                })?;
                let width = if kind == RelocKind::Abs64 { 8 } else { 4 };
                if sections[ours].kind == SectionKind::Bss
                    || offset
                        .checked_add(width)
                        .is_none_or(|e| e > sections[ours].size)
                {
                    return Err(KpError::Truncated(format!(
                        "relocation at {sname}+{offset:#x} is outside the section"
                    )));
                }
                sections[ours].relocs.push(Reloc {
                    offset,
                    kind,
                    target,
                    addend: r.addend(),
                });
            }
        }

        for r in &manifest.replacements {
            let f = functions.iter().find(|f| f.name == r.new).ok_or_else(|| {
                KpError::Manifest(format!(
                    "{} is to be replaced by '{}', which the object does not define as a function",
                    r.old, r.new
                ))
            })?;
            if !sections[f.section].kind.executable() || f.size == 0 {
                return Err(KpError::Manifest(format!("'{}' is not code", r.new)));
            }
        }
        for b in &manifest.bindings {
            if !imports.contains(&b.local) {
                return Err(KpError::Manifest(format!(
                    "symbol binding for '{}', which the patch does not use",
                    b.local
                )));
            }
        }

        Ok(PatchObject {
            manifest,
            sections,
            functions,
            imports: imports.into_iter().collect(),
        })
    }

    pub fn function(&self, name: &str) -> Option<&Function> {
        self.functions.iter().find(|f| f.name == name)
    }
}
