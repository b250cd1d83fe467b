//! Reading a `.kp` file: an ELF64 x86-64 relocatable object (what `gcc -c` makes) with a
//! manifest section. Everything here is validation of untrusted input: the result holds
//! only what the linker can lay out and relocate safely, or an error that names the
//! section, symbol or relocation that cannot be honoured.

use std::collections::{BTreeSet, HashMap};

use object::elf;
use object::{
    Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget, SectionFlags,
    SectionKind as ObjKind, SymbolKind, SymbolSection,
};
use serde::{Deserialize, Serialize};

use crate::load::manifest::Manifest;
use crate::ParseError;

pub const MANIFEST_SECTION: &str = ".lpvmm.manifest";
/// No patch is this big; a larger file or section is refused before it is read.
pub const MAX_KP_BYTES: usize = 16 << 20;
/// Most bytes all of a patch's sections may take once laid out (zero-filled ones too).
pub const MAX_LAID_OUT: u64 = 64 << 20;

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

/// The section a module's `struct module` (`__this_module`) is in.
pub const THIS_MODULE_SECTION: &str = ".gnu.linkonce.this_module";

/// What lpvmm keeps of a kernel livepatch module beyond its manifest (see
/// [`crate::klp`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KlpParts {
    /// Each object's `struct klp_object`: its name (`None`: vmlinux) and place.
    pub objects: Vec<(Option<String>, Place)>,
    /// The parameters given, as `NAME=VALUE`.
    pub params: Vec<String>,
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
    /// objtool's unwind table, when the object has one (kbuild builds).
    pub orc: Option<OrcTables>,
    /// `.altinstructions`, applied at link time for the guest's CPU.
    #[serde(default)]
    pub alternatives: Option<Alternatives>,
    /// `__ex_table`: where code may fault and where it goes on, for the guest's
    /// exception table of the patch ([`crate::guest_module`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extable: Vec<ExEntry>,
    /// For a kernel livepatch module: where its `struct klp_object`s are, and the
    /// parameters it was given (see [`crate::klp`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub klp: Option<KlpParts>,
}

/// The object's alternatives, in table order (the kernel applies them in that order: a
/// later one may replace what an earlier one put).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alternatives {
    /// Bytes per `struct alt_instr` (12 or 14; checked against the guest's at load).
    pub entry_size: usize,
    pub entries: Vec<Alternative>,
}

/// One `struct alt_instr` of the object: the original instruction, its replacement, the
/// feature that selects it, flags (`ALT_FLAG_*`, 0 in the older layout) and lengths.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alternative {
    pub instr: Place,
    pub repl: Place,
    /// `X86_FEATURE_*` or `X86_BUG_*`: word * 32 + bit of `x86_capability`.
    pub feature: u16,
    pub flags: u16,
    pub instr_len: u8,
    pub repl_len: u8,
}

/// One `struct exception_table_entry` (arch/x86/include/asm/extable.h, the same in
/// 6.1 and 6.12): the instruction that may fault, where the fault handler sends it, and
/// the handler's type and register bits (`data`, copied as it is).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExEntry {
    pub insn: Place,
    pub fixup: Place,
    pub data: i32,
}

/// Bytes of an x86 `struct exception_table_entry` (`int insn, fixup, data`).
pub const EX_ENTRY_BYTES: usize = 12;

/// `__ex_table`: each entry's two PC32 relocations (the faulting instruction and the
/// fixup), both in code lpvmm lays out, and its data word. An entry for code lpvmm
/// does not load (a livepatch module's init) is dropped.
fn read_extable(
    file: &object::File,
    index_of: &HashMap<object::SectionIndex, usize>,
    sections: &[Section],
) -> Result<Vec<ExEntry>, ParseError> {
    let Some(sec) = file.section_by_name("__ex_table") else {
        return Ok(Vec::new());
    };
    let bad = |m: String| ParseError::Truncated(format!("__ex_table: {m}"));
    let data = sec.data().map_err(|e| bad(e.to_string()))?;
    let n = data.len() / EX_ENTRY_BYTES;
    if !data.len().is_multiple_of(EX_ENTRY_BYTES) || n > MAX_ORC {
        return Err(bad(format!("{} bytes are not whole entries", data.len())));
    }
    let mut places: Vec<[Option<Place>; 2]> = vec![[None, None]; n];
    for (offset, r) in sec.relocations() {
        let (i, field) = (
            (offset as usize) / EX_ENTRY_BYTES,
            (offset as usize) % EX_ENTRY_BYTES,
        );
        if i >= n || (field != 0 && field != 4) {
            return Err(bad(format!("relocation at {offset:#x}")));
        }
        places[i][field / 4] = reloc_place(file, &r, index_of);
    }
    let in_code =
        |p: Place| sections[p.section].kind.executable() && p.offset < sections[p.section].size;
    let mut entries = Vec::with_capacity(n);
    for (i, p) in places.into_iter().enumerate() {
        let e = &data[i * EX_ENTRY_BYTES..(i + 1) * EX_ENTRY_BYTES];
        let (insn, fixup) = match p {
            [None, _] => continue,
            [Some(insn), Some(fixup)] if in_code(insn) && in_code(fixup) => (insn, fixup),
            _ => {
                return Err(bad(format!(
                    "entry {i}: its instruction or fixup is not in loaded code"
                )))
            }
        };
        entries.push(ExEntry {
            insn,
            fixup,
            data: i32::from_le_bytes([e[8], e[9], e[10], e[11]]),
        });
    }
    Ok(entries)
}

/// The function of `functions` that contains `p`.
pub fn function_at(functions: &[Function], p: Place) -> Option<&Function> {
    functions
        .iter()
        .find(|f| f.section == p.section && p.offset >= f.offset && p.offset < f.offset + f.size)
}

/// A place in a laid-out section of the patch object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Place {
    /// Index into the object's `sections`.
    pub section: usize,
    pub offset: u64,
}

/// Where a relocation points: a place in a laid-out section.
fn reloc_place(
    file: &object::File,
    r: &object::Relocation,
    index_of: &std::collections::HashMap<object::SectionIndex, usize>,
) -> Option<Place> {
    let (s, base) = match r.target() {
        RelocationTarget::Section(s) => (s, 0),
        RelocationTarget::Symbol(si) => {
            let sym = file.symbol_by_index(si).ok()?;
            match sym.section() {
                SymbolSection::Section(s) => (s, sym.address()),
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(Place {
        section: *index_of.get(&s)?,
        offset: base.wrapping_add(r.addend() as u64),
    })
}

/// `.altinstructions`: each entry's two PC32 relocations (to the original instruction and
/// to its replacement) and its feature, flags and lengths, all checked to lie in code
/// lpvmm lays out. Two layouts of `struct alt_instr` exist (both packed): 12 bytes
/// (`u16 cpuid; u8 instrlen; u8 replacementlen`, up to 6.1) and 14 bytes (`u32 ft_flags`
/// with flags above bit 16, later); which one is the stride between the entries'
/// relocations.
fn read_alternatives(
    file: &object::File,
    index_of: &std::collections::HashMap<object::SectionIndex, usize>,
    sections: &[Section],
) -> Result<Option<Alternatives>, ParseError> {
    let Some(sec) = file.section_by_name(".altinstructions") else {
        return Ok(None);
    };
    let bad = |m: String| ParseError::Truncated(format!(".altinstructions: {m}"));
    let data = sec.data().map_err(|e| bad(e.to_string()))?;
    let relocs: Vec<(u64, object::Relocation)> = sec.relocations().collect();
    let n = relocs.len() / 2;
    let stride = data.len().checked_div(n).unwrap_or(0);
    if n == 0
        || n > MAX_ORC
        || !relocs.len().is_multiple_of(2)
        || stride * n != data.len()
        || !(stride == 12 || stride == 14)
    {
        return Err(bad(format!(
            "{} bytes with {} relocations is neither layout of struct alt_instr",
            data.len(),
            relocs.len()
        )));
    }
    let mut places: Vec<[Option<Place>; 2]> = vec![[None, None]; n];
    for (offset, r) in &relocs {
        let (i, field) = ((*offset as usize) / stride, (*offset as usize) % stride);
        if i >= n || (field != 0 && field != 4) {
            return Err(bad(format!("relocation at {offset:#x}")));
        }
        places[i][field / 4] = reloc_place(file, r, index_of);
    }
    let mut entries = Vec::with_capacity(n);
    for (i, p) in places.into_iter().enumerate() {
        let e = &data[i * stride..(i + 1) * stride];
        let (instr, repl) = match p {
            // For code lpvmm does not load (a livepatch module's init): dropped.
            [None, _] => continue,
            [Some(instr), Some(repl)] => (instr, repl),
            [Some(_), None] => {
                return Err(bad(format!(
                    "entry {i}: its replacement is not in loaded code"
                )))
            }
        };
        let (feature, flags, lens) = if stride == 14 {
            let ft = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
            (ft as u16, (ft >> 16) as u16, (e[12], e[13]))
        } else {
            (u16::from_le_bytes([e[8], e[9]]), 0, (e[10], e[11]))
        };
        let a = Alternative {
            instr,
            repl,
            feature,
            flags,
            instr_len: lens.0,
            repl_len: lens.1,
        };
        check_alternative(sections, &a)
            .map_err(|what| bad(format!("entry {i}: its {what} is not inside code")))?;
        entries.push(a);
    }
    Ok(Some(Alternatives {
        entry_size: stride,
        entries,
    }))
}

/// Both places of an alternative lie in laid-out code; else which one does not.
fn check_alternative(sections: &[Section], a: &Alternative) -> Result<(), &'static str> {
    for (what, at, len) in [
        ("instruction", a.instr, a.instr_len),
        ("replacement", a.repl, a.repl_len),
    ] {
        let s = &sections[at.section];
        if !s.kind.executable()
            || at
                .offset
                .checked_add(u64::from(len))
                .is_none_or(|end| end > s.size)
        {
            return Err(what);
        }
    }
    Ok(())
}

/// objtool's ORC table of the object: one raw `struct orc_entry` per address, the
/// address as a place in a laid-out section. Entries are decoded with the guest's own
/// layout at load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrcTables {
    pub entry_size: usize,
    pub entries: Vec<OrcSpot>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrcSpot {
    /// Section (index into `sections`) and offset the entry starts at.
    pub section: usize,
    pub offset: u64,
    pub raw: Vec<u8>,
}

/// At most this many ORC entries (a bound on hostile input; a patch has a few hundred).
const MAX_ORC: usize = 1 << 20;

impl OrcTables {
    fn read(
        file: &object::File,
        index_of: &std::collections::HashMap<object::SectionIndex, usize>,
    ) -> Result<Option<OrcTables>, ParseError> {
        let (Some(ips), Some(unwind)) = (
            file.section_by_name(".orc_unwind_ip"),
            file.section_by_name(".orc_unwind"),
        ) else {
            return Ok(None);
        };
        let bad = |m: String| ParseError::Truncated(format!("ORC table: {m}"));
        let n = (ips.size() / 4) as usize;
        if n == 0 || n > MAX_ORC || ips.size() % 4 != 0 || unwind.size() % n as u64 != 0 {
            return Err(bad(format!(
                "{} addresses for {} bytes of entries",
                ips.size() / 4,
                unwind.size()
            )));
        }
        let entry_size = (unwind.size() / n as u64) as usize;
        if !(6..=8).contains(&entry_size) {
            return Err(bad(format!("entries of {entry_size} bytes")));
        }
        let data = unwind.data().map_err(|e| bad(e.to_string()))?;
        let mut at: Vec<Option<Place>> = vec![None; n];
        for (offset, r) in ips.relocations() {
            let i = (offset / 4) as usize;
            if offset % 4 != 0 || i >= n {
                return Err(bad(format!("relocation at {offset:#x}")));
            }
            // The entry's address is S + A (a PC32 relocation, read back from its place).
            at[i] = reloc_place(file, &r, index_of);
        }
        let mut entries = Vec::with_capacity(n);
        for (i, spot) in at.into_iter().enumerate() {
            // An entry for code lpvmm does not load (init code, say) is dropped.
            let Some(Place { section, offset }) = spot else {
                continue;
            };
            let raw = data
                .get(i * entry_size..(i + 1) * entry_size)
                .ok_or_else(|| bad("entry past the end".into()))?
                .to_vec();
            entries.push(OrcSpot {
                section,
                offset,
                raw,
            });
        }
        Ok(Some(OrcTables {
            entry_size,
            entries,
        }))
    }
}

/// The functions a section's relocations point into (for example the functions whose
/// faulting instructions an `__ex_table` lists).
fn users_of(
    file: &object::File,
    index: object::SectionIndex,
    index_of: &std::collections::HashMap<object::SectionIndex, usize>,
    functions: &[Function],
) -> Vec<String> {
    let Ok(sec) = file.section_by_index(index) else {
        return Vec::new();
    };
    let mut users = std::collections::BTreeSet::new();
    for (_, r) in sec.relocations() {
        let f = reloc_place(file, &r, index_of).and_then(|p| function_at(functions, p));
        if let Some(f) = f {
            users.insert(f.name.clone());
        }
    }
    // And the functions whose code refers into it (per-CPU variables, say).
    for code in file
        .sections()
        .filter(|s| index_of.contains_key(&s.index()))
    {
        for (offset, r) in code.relocations() {
            if reloc_section(file, &r) != Some(index) {
                continue;
            }
            let at = Place {
                section: index_of[&code.index()],
                offset,
            };
            if let Some(f) = function_at(functions, at) {
                users.insert(f.name.clone());
            }
        }
    }
    users.into_iter().collect()
}

/// The ELF section a relocation's target lies in.
fn reloc_section(file: &object::File, r: &object::Relocation) -> Option<object::SectionIndex> {
    match r.target() {
        RelocationTarget::Section(s) => Some(s),
        RelocationTarget::Symbol(si) => match file.symbol_by_index(si).ok()?.section() {
            SymbolSection::Section(s) => Some(s),
            _ => None,
        },
        _ => None,
    }
}

/// Sections that make the kernel do something with the code (fix up faults, patch
/// instructions at run time): loading them without telling the kernel would be silently
/// wrong, so a patch that has them is refused, naming the functions that need them, with
/// what to do instead.
fn special_section_advice(name: &str) -> Option<&'static str> {
    Some(match name {
        "__jump_table" => {
            "static keys / jump labels (static_branch_*, tracepoints), which the kernel patches \
             at run time: `lpvmm kp build --kernel` builds them as tests of their key instead"
        }
        ".static_call.text" => {
            "static call trampolines the patch defines, which the kernel patches at run time"
        }
        ".parainstructions" => "paravirt call sites the kernel patches",
        ".data..percpu" => "per-CPU variables, which need the kernel's per-CPU allocator",
        _ if name.starts_with(".init") || name.starts_with(".exit") => {
            "init/exit code, which never runs in a live patch"
        }
        _ if name.starts_with(".tdata") || name.starts_with(".tbss") => {
            "thread-local storage, which the kernel does not have"
        }
        _ => return None,
    })
}

/// Sections kbuild and objtool emit that lpvmm handles itself, or that leave the code
/// correct as it was compiled, in this guest:
/// - `__mcount_loc`, `__patchable_function_entries`: ftrace call sites; the linker turns
///   every `call __fentry__` into the 5-byte NOP, as the kernel does at module load;
/// - `.return_sites`: `jmp __x86_return_thunk` sites, rewritten by the linker to the
///   guest's own choice (see [`crate::load::link::Returns`]);
/// - `.retpoline_sites`: calls through the guest's `__x86_indirect_thunk_*`, which the
///   guest itself patched for its mitigation mode, so calling them is what it chose;
/// - `.call_sites`: call-depth accounting sites, only patched in `retbleed=stuff` mode;
/// - `.ibt_endbr_seal`: ENDBR instructions the kernel would seal; left as they are;
/// - `.smp_locks`: LOCK prefixes a uniprocessor kernel would drop; kept (always correct);
/// - `.orc_unwind`, `.orc_unwind_ip`, `.orc_header`: objtool's unwind table, read
///   separately ([`OrcTables`]);
/// - `.altinstructions`: alternatives, read separately and applied at link time for the
///   guest's CPU ([`crate::load::alternatives`]); their `.altinstr_replacement` (and
///   `.altinstr_aux`) code is laid out as code;
/// - `__ex_table`: the exception table, read separately ([`ExEntry`]) and given to the
///   guest, sorted, with the patch's module ([`crate::guest_module`]);
/// - `.static_call_sites`: calls through a static call's trampoline (`__SCT__*`), which
///   the kernel would turn into direct calls; left calling the trampoline, which the
///   kernel keeps pointing at the call's current target;
/// - `.modinfo`, `__versions`, `.gnu.linkonce.this_module`, `.comment`, `.discard.*`:
///   module bookkeeping;
/// - `.klp.rela.*`: livepatch relocation sections, read with the section they apply to
///   (each is one of its relocation sections; [`crate::klp::sym`]).
fn handled_elsewhere(name: &str) -> bool {
    matches!(
        name,
        "__mcount_loc"
            | "__patchable_function_entries"
            | ".return_sites"
            | ".retpoline_sites"
            | ".call_sites"
            | ".ibt_endbr_seal"
            | ".smp_locks"
            | ".orc_unwind"
            | ".orc_unwind_ip"
            | ".orc_header"
            | ".altinstructions"
            | "__ex_table"
            | ".static_call_sites"
            | ".modinfo"
            | "__versions"
            | ".gnu.linkonce.this_module"
            | ".comment"
    ) || name.starts_with(".discard")
        || name.starts_with(crate::klp::sym::RELA_PREFIX)
}

/// Why a section is refused, or how it is laid out (`None`: not loaded).
enum Class {
    Load(SectionKind),
    Skip,
    Refuse(&'static str),
}

/// What kind of object is laid out: a `.kp`, or a kernel livepatch module, whose init
/// and exit code, parameters and `struct module` lpvmm handles itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flavour {
    Kp,
    Livepatch,
}

/// Sections of a livepatch module lpvmm does not load: init code and data (its init
/// only enables the patch, which lpvmm does; see [`crate::klp`]), exit data (the exit
/// code is loaded: lpvmm runs it after the last disable), and the parameters' table
/// (read apart).
fn livepatch_skips(name: &str) -> bool {
    name.starts_with(".init")
        || (name.starts_with(".exit") && name != ".exit.text")
        || name == "__param"
}

fn classify(name: &str, flags: u64, kind: ObjKind, flavour: Flavour) -> Result<Class, ParseError> {
    let alloc = flags & u64::from(elf::SHF_ALLOC) != 0;
    let exec = flags & u64::from(elf::SHF_EXECINSTR) != 0;
    if flavour == Flavour::Livepatch {
        if livepatch_skips(name) {
            return Ok(Class::Skip);
        }
        // The module's own `struct module`, zero-filled: `THIS_MODULE` must point
        // somewhere (klp_patch.mod), and nothing in the guest reads it.
        if name == THIS_MODULE_SECTION {
            return Ok(Class::Load(SectionKind::Bss));
        }
    }
    if let Some(why) = special_section_advice(name) {
        return Ok(Class::Refuse(why));
    }
    if !alloc
        || name.starts_with(".lpvmm.")
        || name == ".eh_frame"
        || name.starts_with(".note")
        || handled_elsewhere(name)
    {
        return Ok(Class::Skip);
    }
    let k = if name == ".text"
        || name.starts_with(".text.")
        || name == ".altinstr_replacement"
        || name == ".altinstr_aux"
    {
        SectionKind::Code
    } else if exec {
        return Err(ParseError::Unsupported(format!(
            "section {name} is executable but not .text*"
        )));
    } else if name.starts_with(".rodata") {
        SectionKind::ReadOnly
    } else if name.starts_with(".data") {
        SectionKind::Data
    } else if name == "__bug_table" {
        // The guest's trap handler finds it through the patch's module, and marks a
        // WARN_ONCE done in it: writable.
        SectionKind::Data
    } else if name.starts_with(".bss") || kind == ObjKind::UninitializedData {
        SectionKind::Bss
    } else {
        return Err(ParseError::Unsupported(format!(
            "section {name}: unknown allocated section; lpvmm lays out only .text*, .rodata*, .data* and .bss*"
        )));
    };
    Ok(Class::Load(k))
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

/// The sections a patch lays out, and those it must refuse.
struct Laid {
    sections: Vec<Section>,
    /// ELF section index to ours.
    index_of: HashMap<object::SectionIndex, usize>,
    /// Sections refused (ELF index, name, why), refused once the functions that need
    /// them are known.
    refused: Vec<(object::SectionIndex, String, &'static str)>,
}

/// Classify every section: laid out (with its contents, bounded), skipped, or refused.
fn lay_out_sections(file: &object::File, flavour: Flavour) -> Result<Laid, ParseError> {
    // Sections to lay out, with a map from ELF section index to ours; sections that
    // must be refused, refused once the functions that need them are known.
    let mut sections = Vec::new();
    let mut index_of = HashMap::new();
    let mut refused = Vec::new();
    let mut laid_out = 0u64;
    for s in file.sections() {
        let name = s.name().unwrap_or("").to_string();
        let flags = match s.flags() {
            SectionFlags::Elf { sh_flags } => sh_flags,
            _ => 0,
        };
        let kind = match classify(&name, flags, s.kind(), flavour)? {
            Class::Load(k) => k,
            Class::Skip => continue,
            Class::Refuse(why) => {
                refused.push((s.index(), name, why));
                continue;
            }
        };
        // Contents are bounded by the file; zero-filled data, which the linker lays
        // out in memory too, by the same limit for all sections together (found by
        // fuzzing: a 1 GiB .bss made the linker allocate it).
        // (The patch area, smaller, refuses most large patches with a clearer message.)
        laid_out = laid_out.saturating_add(s.size());
        if laid_out > MAX_LAID_OUT {
            return Err(ParseError::Truncated(format!(
                "section {name} claims {} bytes: a patch's sections take at most \
                 {MAX_LAID_OUT} bytes together",
                s.size()
            )));
        }
        let bytes = if kind == SectionKind::Bss {
            Vec::new()
        } else {
            s.data()
                .map_err(|e| ParseError::Truncated(format!("section {name}: {e}")))?
                .to_vec()
        };
        // A section with no contents in the file (SHT_NOBITS) under a .text, .rodata
        // or .data name would be laid out shorter than the places it claims (found
        // by fuzzing: a relocation written past its empty image).
        if kind != SectionKind::Bss && bytes.len() as u64 != s.size() {
            return Err(ParseError::Truncated(format!(
                "section {name}: {} bytes by its header, {} in the file",
                s.size(),
                bytes.len()
            )));
        }
        let align = s.align().max(1);
        if !align.is_power_of_two() || align > 4096 {
            return Err(ParseError::Unsupported(format!(
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
    Ok(Laid {
        sections,
        index_of,
        refused,
    })
}

/// The object's functions (its text symbols in sections it lays out); a common symbol
/// is refused.
fn functions_of(
    file: &object::File,
    index_of: &HashMap<object::SectionIndex, usize>,
) -> Result<Vec<Function>, ParseError> {
    let mut functions = Vec::new();
    for sym in file.symbols() {
        let name = sym.name().unwrap_or("").to_string();
        if sym.section() == SymbolSection::Common {
            return Err(ParseError::Unsupported(format!(
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
    Ok(functions)
}

/// The error for refused sections: one line per reason (an alternative has two
/// sections, say), each with the sections and the functions that need them.
fn refusal(
    file: &object::File,
    refused: &[(object::SectionIndex, String, &'static str)],
    index_of: &HashMap<object::SectionIndex, usize>,
    functions: &[Function],
) -> ParseError {
    // One line per reason (an alternative has two sections, say), each with
    // the sections and the functions that need them.
    let mut each: Vec<String> = Vec::new();
    let mut reasons: Vec<&str> = refused.iter().map(|r| r.2).collect();
    reasons.dedup();
    for why in reasons {
        let of: Vec<_> = refused.iter().filter(|r| r.2 == why).collect();
        let names: Vec<&str> = of.iter().map(|r| r.1.as_str()).collect();
        let mut users: Vec<String> = of
            .iter()
            .flat_map(|r| users_of(file, r.0, index_of, functions))
            .collect();
        users.sort();
        users.dedup();
        let by = if users.is_empty() {
            String::new()
        } else {
            format!(" (needed by {})", users.join(", "))
        };
        let word = if names.len() == 1 {
            "section"
        } else {
            "sections"
        };
        each.push(format!("{word} {}{by}: {why}", names.join(", ")));
    }
    ParseError::Unsupported(format!(
        "{}; the guest kernel would have to know about {}",
        each.join("; "),
        if each.len() == 1 { "it" } else { "them" }
    ))
}

/// What one relocation at `sname+offset` points to: a kernel symbol (added to
/// `imports`), or a place in a section the patch lays out.
fn reloc_target(
    file: &object::File,
    r: &object::Relocation,
    index_of: &HashMap<object::SectionIndex, usize>,
    imports: &mut BTreeSet<String>,
    sname: &str,
    offset: u64,
) -> Result<RelocTarget, ParseError> {
    Ok(match r.target() {
        RelocationTarget::Symbol(si) => {
            let sym = file
                .symbol_by_index(si)
                .map_err(|e| ParseError::Truncated(format!("relocation symbol: {e}")))?;
            let name = sym.name().unwrap_or("").to_string();
            match sym.section() {
                // A livepatch symbol (`SHN_LIVEPATCH`): bound by its name (crate::klp::sym).
                _ if name.starts_with(crate::klp::sym::PREFIX) => {
                    imports.insert(name.clone());
                    RelocTarget::Kernel(name)
                }
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
                        return Err(ParseError::Unsupported(format!(
                        "{sname}+{offset:#x} refers to '{name}' in a section lpvmm does not load"
                    )))
                    }
                },
                other => {
                    return Err(ParseError::Unsupported(format!(
                        "{sname}+{offset:#x} refers to '{name}' ({other:?})"
                    )))
                }
            }
        }
        RelocationTarget::Section(i) => match index_of.get(&i) {
            Some(&section) => RelocTarget::Section(section),
            None => {
                return Err(ParseError::Unsupported(format!(
                    "{sname}+{offset:#x} refers to a section lpvmm does not load"
                )))
            }
        },
        _ => {
            return Err(ParseError::Unsupported(format!(
                "{sname}+{offset:#x}: relocation without a target"
            )))
        }
    })
}

/// Every relocation of the laid-out sections, checked and attached to its section; the
/// kernel symbols they use.
fn read_relocations(
    file: &object::File,
    index_of: &HashMap<object::SectionIndex, usize>,
    sections: &mut [Section],
) -> Result<BTreeSet<String>, ParseError> {
    let mut imports = BTreeSet::new();
    for s in file.sections() {
        let Some(&ours) = index_of.get(&s.index()) else {
            continue;
        };
        let sname = sections[ours].name.clone();
        if sname == THIS_MODULE_SECTION {
            // Its init and exit pointers: left zero (lpvmm runs neither).
            continue;
        }
        for (offset, r) in s.relocations() {
            let RelocationFlags::Elf { r_type } = r.flags() else {
                return Err(ParseError::Unsupported(format!(
                    "{sname}+{offset:#x}: non-ELF relocation"
                )));
            };
            let target = reloc_target(file, &r, index_of, &mut imports, &sname, offset)?;
            let what = match &target {
                RelocTarget::Kernel(n) | RelocTarget::Defined { name: n, .. } => n.clone(),
                RelocTarget::Section(i) => sections[*i].name.clone(),
            };
            let kind = reloc_kind(r_type).ok_or_else(|| {
                ParseError::Unsupported(format!(
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
                return Err(ParseError::Truncated(format!(
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
    Ok(imports)
}

/// The manifest against the object: every replacement is a function of the object,
/// every symbol binding is for a symbol the patch uses.
fn check_manifest(
    manifest: &Manifest,
    functions: &[Function],
    sections: &[Section],
    imports: &BTreeSet<String>,
) -> Result<(), ParseError> {
    for r in &manifest.replacements {
        let f = functions.iter().find(|f| f.name == r.new).ok_or_else(|| {
            ParseError::Manifest(format!(
                "{} is to be replaced by '{}', which the object does not define as a function",
                r.old, r.new
            ))
        })?;
        if !sections[f.section].kind.executable() || f.size == 0 {
            return Err(ParseError::Manifest(format!("'{}' is not code", r.new)));
        }
    }
    for c in &manifest.callbacks {
        let f = functions.iter().find(|f| f.name == c.func).ok_or_else(|| {
            ParseError::Manifest(format!(
                "{} callback '{}' is not a function the object defines",
                c.kind.word(),
                c.func
            ))
        })?;
        if !sections[f.section].kind.executable() || f.size == 0 {
            return Err(ParseError::Manifest(format!("'{}' is not code", c.func)));
        }
    }
    for b in &manifest.bindings {
        if !imports.contains(&b.local) {
            return Err(ParseError::Manifest(format!(
                "symbol binding for '{}', which the patch does not use",
                b.local
            )));
        }
    }
    Ok(())
}

/// `data` copied to an 8-byte aligned place: the buffer, and where the copy starts in it.
pub(crate) fn aligned_copy(data: &[u8]) -> (Vec<u8>, usize) {
    let mut buf = vec![0u8; data.len() + 7];
    let at = buf.as_ptr().align_offset(8);
    buf[at..at + data.len()].copy_from_slice(data);
    (buf, at)
}

impl PatchObject {
    pub fn parse(data: &[u8]) -> Result<PatchObject, ParseError> {
        let copy;
        let data = match data.as_ptr().align_offset(8) {
            0 => data,
            _ => {
                copy = aligned_copy(data);
                &copy.0[copy.1..]
            }
        };
        let file = open_elf(data)?;
        let manifest_data = file
            .section_by_name(MANIFEST_SECTION)
            .ok_or(ParseError::NoManifest)?
            .data()
            .map_err(|e| ParseError::Truncated(format!("{MANIFEST_SECTION}: {e}")))?;
        let manifest = Manifest::parse(manifest_data)?;

        Body::read(&file, Flavour::Kp)?.into_object(manifest, None)
    }
}

/// What an object holds besides its description (manifest or `klp_patch`): its laid-out
/// sections with their relocations, functions, ORC and alternatives, and the kernel
/// symbols it uses; a section it must refuse refuses it.
pub(crate) struct Body {
    pub(crate) sections: Vec<Section>,
    pub(crate) index_of: HashMap<object::SectionIndex, usize>,
    pub(crate) functions: Vec<Function>,
    pub(crate) orc: Option<OrcTables>,
    pub(crate) alternatives: Option<Alternatives>,
    pub(crate) extable: Vec<ExEntry>,
    pub(crate) imports: BTreeSet<String>,
}

impl Body {
    pub(crate) fn read(file: &object::File, flavour: Flavour) -> Result<Body, ParseError> {
        let Laid {
            mut sections,
            index_of,
            refused,
        } = lay_out_sections(file, flavour)?;
        let functions = functions_of(file, &index_of)?;
        if !refused.is_empty() {
            return Err(refusal(file, &refused, &index_of, &functions));
        }
        let orc = OrcTables::read(file, &index_of)?;
        let alternatives = read_alternatives(file, &index_of, &sections)?;
        let extable = read_extable(file, &index_of, &sections)?;
        let imports = read_relocations(file, &index_of, &mut sections)?;
        Ok(Body {
            sections,
            index_of,
            functions,
            orc,
            alternatives,
            extable,
            imports,
        })
    }

    /// The patch this body and `manifest` make, checked: every function the manifest
    /// names is the object's code, every place lies in its section.
    pub(crate) fn into_object(
        self,
        manifest: Manifest,
        klp: Option<KlpParts>,
    ) -> Result<PatchObject, ParseError> {
        let mut manifest = manifest;
        for local in &self.imports {
            let bound = manifest.bindings.iter().any(|b| &b.local == local);
            if let Some(b) = crate::klp::sym::binding(local)?.filter(|_| !bound) {
                manifest.bindings.push(b);
            }
        }
        check_manifest(&manifest, &self.functions, &self.sections, &self.imports)?;
        let obj = PatchObject {
            manifest,
            sections: self.sections,
            functions: self.functions,
            imports: self.imports.into_iter().collect(),
            orc: self.orc,
            alternatives: self.alternatives,
            extable: self.extable,
            klp,
        };
        obj.check_places()?;
        Ok(obj)
    }
}

/// `data` as a relocatable x86-64 ELF object (`data` 8-byte aligned), bounded.
pub(crate) fn open_elf(data: &[u8]) -> Result<object::File<'_>, ParseError> {
    if data.len() > MAX_KP_BYTES {
        return Err(ParseError::NotElf(format!(
            "{} bytes; a .kp is at most {MAX_KP_BYTES}",
            data.len()
        )));
    }
    if data.len() < 4 || &data[..4] != b"\x7fELF" {
        return Err(ParseError::NotElf("no ELF magic".into()));
    }
    let file = object::File::parse(data).map_err(|e| ParseError::NotElf(e.to_string()))?;
    if !file.is_64() || !file.is_little_endian() {
        return Err(ParseError::WrongMachine(
            "not a 64-bit little-endian object".into(),
        ));
    }
    if file.architecture() != object::Architecture::X86_64 {
        return Err(ParseError::WrongMachine(format!(
            "built for {:?}, the guest is x86-64",
            file.architecture()
        )));
    }
    if file.kind() != object::ObjectKind::Relocatable {
        return Err(ParseError::NotRelocatable(format!("{:?}", file.kind())));
    }
    Ok(file)
}

impl PatchObject {
    /// Every place the object names lies in its section. Symbol values, sizes and
    /// addends are the object's to choose; checked once here, the linker may add them
    /// to where it lays the sections (found by fuzzing: a function's value near 2^64).
    pub(crate) fn check_places(&self) -> Result<(), ParseError> {
        let inside = |section: usize, offset: u64, len: u64, what: &dyn Fn() -> String| {
            let s = self.sections.get(section);
            match (s, offset.checked_add(len)) {
                (Some(s), Some(end)) if end <= s.size => Ok(()),
                _ => Err(ParseError::Truncated(format!(
                    "{} at {offset:#x}+{len:#x} lies outside its section {}",
                    what(),
                    s.map_or("(none)".into(), |s| format!(
                        "{} ({:#x} bytes)",
                        s.name, s.size
                    ))
                ))),
            }
        };
        for f in &self.functions {
            inside(f.section, f.offset, f.size, &|| {
                format!("function {}", f.name)
            })?;
        }
        for r in self.sections.iter().flat_map(|s| &s.relocs) {
            if let RelocTarget::Defined {
                section,
                offset,
                name,
            } = &r.target
            {
                inside(*section, *offset, 0, &|| format!("symbol {name}"))?;
            }
        }
        for e in self.orc.iter().flat_map(|t| &t.entries) {
            inside(e.section, e.offset, 0, &|| "an ORC entry".into())?;
        }
        for a in self.alternatives.iter().flat_map(|t| &t.entries) {
            inside(a.instr.section, a.instr.offset, a.instr_len.into(), &|| {
                "an alternative's instruction".into()
            })?;
            inside(a.repl.section, a.repl.offset, a.repl_len.into(), &|| {
                "an alternative's replacement".into()
            })?;
        }
        Ok(())
    }

    pub fn function(&self, name: &str) -> Option<&Function> {
        self.functions.iter().find(|f| f.name == name)
    }
}
