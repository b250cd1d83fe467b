//! Linking a patch object at its place in the guest: every section gets an address in
//! the region its permissions call for, and every relocation is computed against those
//! addresses and the guest kernel's symbols. Pure: the result is bytes to write.

use std::collections::HashMap;

use introspection::kernel::Kernel;
use introspection::memory::KernelMemory;

use crate::load::alternatives::{self, CpuFeatures};
use crate::load::object::{PatchObject, Reloc, RelocKind, RelocTarget, SectionKind};
use crate::KpError;

/// The symbol gcc's `-mfunction-return=thunk-extern` returns through.
pub const RETURN_THUNK: &str = "__x86_return_thunk";
/// What `-mfentry` calls at every function's entry.
pub const FENTRY: &str = "__fentry__";

/// What `jmp __x86_return_thunk` (every `ret` of a patch) must become in this guest, as
/// the kernel's `apply_returns()` rewrote its own: a jump to the return thunk its
/// mitigation selected (`x86_return_thunk`), or a plain `ret` when it needs none (6.12's
/// default `__x86_return_thunk` only warns: "Unpatched return thunk in use").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Returns {
    /// Resolve the symbol like any other (kernels without `x86_return_thunk`).
    AsSymbol,
    Jump(u64),
    Ret,
}

impl Returns {
    /// What the guest made of its own returns: `x86_return_thunk` holds the selected
    /// thunk, which is the default one when no mitigation needs a thunk.
    pub fn of_guest(
        mem: &introspection::memory::KernelMemory,
        syms: &introspection::kallsyms::SymbolTable,
    ) -> Result<Returns, crate::KpError> {
        match (syms.addr("x86_return_thunk"), syms.addr(RETURN_THUNK)) {
            (Some(var), Some(default)) => {
                let t = mem
                    .u64(var)
                    .map_err(|e| crate::KpError::guest("reading x86_return_thunk", e))?;
                Ok(if t == default {
                    Returns::Ret
                } else {
                    Returns::Jump(t)
                })
            }
            _ => Ok(Returns::AsSymbol),
        }
    }
}

impl Returns {
    /// How code lpvmm assembles itself returns in this guest: as the guest's own code
    /// does, a kernel without `x86_return_thunk` through `__x86_return_thunk` if it has
    /// one, else a plain `ret`.
    pub fn for_stubs(
        mem: &introspection::memory::KernelMemory,
        syms: &introspection::kallsyms::SymbolTable,
    ) -> Result<Returns, crate::KpError> {
        Ok(match Returns::of_guest(mem, syms)? {
            Returns::AsSymbol => match syms.addr(RETURN_THUNK) {
                Some(t) => Returns::Jump(t),
                None => Returns::Ret,
            },
            r => r,
        })
    }
}

/// Where a kernel symbol a patch uses is, as its link finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportAt {
    Addr(u64),
    /// In a module the patch names that is not loaded yet: linked against the patch's
    /// trap ([`TRAP`]) until the module loads and the patch is linked again.
    Pending,
}

/// What ends the code of a patch with a module part: `ud2`, then `int3`s. A symbol of a
/// module not loaded yet points here until the module loads, so that code reaching it
/// early stops with an invalid-opcode oops in lpvmm's code, not somewhere at random.
pub const TRAP: [u8; 16] = [
    0x0f, 0x0b, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc,
];

/// Where a patch's bytes go: the next free address of each region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub code: u64,
    pub rodata: u64,
    pub data: u64,
}

/// One region's image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Image {
    /// Guest virtual address of the first byte.
    pub addr: u64,
    pub bytes: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Linked {
    pub code: Image,
    pub rodata: Image,
    pub data: Image,
    /// Address of each section of the object.
    pub section_addrs: Vec<u64>,
    /// Address of each function the object defines.
    pub functions: HashMap<String, u64>,
    /// Kernel symbols used, with the addresses they resolved to.
    pub imports: Vec<(String, u64)>,
    /// Kernel symbols of modules not loaded yet, linked against [`Linked::trap`].
    pub pending: Vec<String>,
    /// Where the code's [`TRAP`] is (patches with a module part only).
    pub trap: Option<u64>,
    /// objtool's ORC entries, each at its address, in address order (raw, in the guest
    /// kernel's own layout).
    pub orc: Vec<(u64, Vec<u8>)>,
}

/// Rewrite each alternative the guest would use, in the relocated images.
fn apply_alternatives(
    obj: &PatchObject,
    images: &mut [Image; 3],
    section_addrs: &[u64],
    offsets: &[(usize, usize)],
    cpu: Option<&CpuFeatures>,
) -> Result<(), KpError> {
    let Some(alts) = &obj.alternatives else {
        return Ok(());
    };
    let cpu = cpu.ok_or_else(|| {
        KpError::Unsupported("alternatives, without the guest's CPU features".into())
    })?;
    for a in &alts.entries {
        if !alternatives::selected(a, cpu) {
            continue;
        }
        let (ri, ro) = offsets[a.repl.section];
        let (ii, io) = offsets[a.instr.section];
        let repl_at = ro + a.repl.offset as usize;
        let instr_at = io + a.instr.offset as usize;
        let repl = images[ri].bytes[repl_at..repl_at + usize::from(a.repl_len)].to_vec();
        let what = || match crate::load::object::function_at(&obj.functions, a.instr) {
            Some(f) => format!("{}+{:#x}", f.name, a.instr.offset - f.offset),
            None => format!(
                "{}+{:#x}",
                obj.sections[a.instr.section].name, a.instr.offset
            ),
        };
        let bytes = alternatives::rewrite(
            a,
            &repl,
            section_addrs[a.repl.section] + a.repl.offset,
            section_addrs[a.instr.section] + a.instr.offset,
            &what,
        )?;
        images[ii].bytes[instr_at..instr_at + bytes.len()].copy_from_slice(&bytes);
    }
    Ok(())
}

/// Where the code's `%gs:disp32(%rip)` displacements are (section, offset): per-CPU
/// accesses, whose RIP-relative address wraps around to a per-CPU offset.
fn gs_relative_displacements(obj: &PatchObject) -> std::collections::HashSet<(usize, u64)> {
    use iced_x86::{Decoder, DecoderOptions, Register};
    let mut spots = std::collections::HashSet::new();
    for (si, s) in obj.sections.iter().enumerate() {
        if !s.kind.executable() {
            continue;
        }
        let mut d = Decoder::with_ip(64, &s.bytes, 0, DecoderOptions::NONE);
        while d.can_decode() {
            let i = d.decode();
            if i.segment_prefix() == Register::GS && i.is_ip_rel_memory_operand() {
                let c = d.get_constant_offsets(&i);
                if c.has_displacement() {
                    spots.insert((si, i.ip() + c.displacement_offset() as u64));
                }
            }
        }
    }
    spots
}

impl Linked {
    /// Bytes of each region.
    pub fn sizes(&self) -> crate::space::Sizes {
        crate::space::Sizes {
            code: self.code.bytes.len() as u64,
            rodata: self.rodata.bytes.len() as u64,
            data: self.data.bytes.len() as u64,
        }
    }
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Lay out and relocate `obj`. `resolve` says where a kernel symbol the patch imports is
/// (it applies the manifest's symbol bindings). A patch with a module part ends its code
/// with a [`TRAP`], where the symbols of modules not loaded yet point.
/// Alternatives are applied for `cpu`, the guest's CPU features (needed only when the
/// object has alternatives).
pub fn link(
    obj: &PatchObject,
    at: Placement,
    returns: Returns,
    cpu: Option<&CpuFeatures>,
    resolve: &dyn Fn(&str) -> Result<ImportAt, KpError>,
) -> Result<Linked, KpError> {
    let mut layout = lay_out(obj, at);
    let trap = (!obj.manifest.modules().is_empty()).then(|| add_trap(&mut layout.images[0]));
    let mut imports = Vec::new();
    let mut pending = Vec::new();
    let mut resolved: HashMap<&str, u64> = HashMap::new();
    for name in &obj.imports {
        let a = match (resolve(name)?, trap) {
            (ImportAt::Addr(a), _) => {
                imports.push((name.clone(), a));
                a
            }
            (ImportAt::Pending, Some(trap)) => {
                pending.push(name.clone());
                trap
            }
            (ImportAt::Pending, None) => {
                return Err(KpError::Symbol(format!(
                    "'{name}' is in a module the patch does not name"
                )))
            }
        };
        resolved.insert(name.as_str(), a);
    }
    relocate(obj, &mut layout, &resolved, returns)?;

    let Layout {
        mut images,
        section_addrs,
        offsets,
    } = layout;
    let functions = obj
        .functions
        .iter()
        .map(|f| (f.name.clone(), section_addrs[f.section] + f.offset))
        .collect();
    apply_alternatives(obj, &mut images, &section_addrs, &offsets, cpu)?;
    let mut orc: Vec<(u64, Vec<u8>)> = obj
        .orc
        .iter()
        .flat_map(|t| &t.entries)
        .map(|e| (section_addrs[e.section] + e.offset, e.raw.clone()))
        .collect();
    orc.sort_by_key(|(ip, _)| *ip);
    let [code, rodata, data] = images;
    Ok(Linked {
        code,
        rodata,
        data,
        section_addrs,
        functions,
        imports,
        pending,
        trap,
        orc,
    })
}

/// Append the [`TRAP`] to the code image, 16-byte aligned; its address.
fn add_trap(code: &mut Image) -> u64 {
    let off = align_up(code.bytes.len() as u64, 16) as usize;
    code.bytes.resize(off, 0xcc);
    code.bytes.extend_from_slice(&TRAP);
    code.addr + off as u64
}

/// Where each section goes: the three images (code, read-only data, data), and each
/// section's address and place (image, offset) in them.
struct Layout {
    images: [Image; 3],
    section_addrs: Vec<u64>,
    offsets: Vec<(usize, usize)>,
}

/// Lay the sections out in their images, each at its alignment.
fn lay_out(obj: &PatchObject, at: Placement) -> Layout {
    let image = |addr| Image {
        addr,
        bytes: Vec::new(),
    };
    let mut images = [image(at.code), image(at.rodata), image(at.data)];
    let region = |k: SectionKind| match k {
        SectionKind::Code => 0,
        SectionKind::ReadOnly => 1,
        SectionKind::Data | SectionKind::Bss => 2,
    };
    let mut section_addrs = Vec::with_capacity(obj.sections.len());
    let mut offsets = Vec::with_capacity(obj.sections.len());
    for s in &obj.sections {
        let img = &mut images[region(s.kind)];
        let off = align_up(img.bytes.len() as u64, s.align) as usize;
        // Code padding is int3, so a stray jump into it traps.
        let fill = if s.kind == SectionKind::Code { 0xcc } else { 0 };
        img.bytes.resize(off, fill);
        if s.kind == SectionKind::Bss {
            img.bytes.resize(off + s.size as usize, 0);
        } else {
            img.bytes.extend_from_slice(&s.bytes);
        }
        section_addrs.push(img.addr + off as u64);
        offsets.push((region(s.kind), off));
    }
    Layout {
        images,
        section_addrs,
        offsets,
    }
}

/// Apply every relocation of every section to the laid-out images.
fn relocate(
    obj: &PatchObject,
    layout: &mut Layout,
    resolved: &HashMap<&str, u64>,
    returns: Returns,
) -> Result<(), KpError> {
    let per_cpu = gs_relative_displacements(obj);
    for (si, s) in obj.sections.iter().enumerate() {
        let (ri, base_off) = layout.offsets[si];
        for r in &s.relocs {
            let target = match &r.target {
                RelocTarget::Section(i) => layout.section_addrs[*i],
                RelocTarget::Defined {
                    section, offset, ..
                } => layout.section_addrs[*section] + offset,
                RelocTarget::Kernel(n) => *resolved
                    .get(n.as_str())
                    .ok_or_else(|| KpError::Symbol(format!("'{n}' was not resolved")))?,
            };
            let spot = Spot {
                section: &s.name,
                place: layout.section_addrs[si] + r.offset,
                at: base_off + r.offset as usize,
            };
            let bytes = &mut layout.images[ri].bytes;
            if rewrite_as_the_kernel_does(bytes, &spot, r, returns)? {
                continue;
            }
            let what = || match &r.target {
                RelocTarget::Kernel(n) | RelocTarget::Defined { name: n, .. } => n.clone(),
                RelocTarget::Section(i) => obj.sections[*i].name.clone(),
            };
            let gs_relative = per_cpu.contains(&(si, r.offset));
            let value = reloc_bytes(r, target, &spot, gs_relative, &what)?;
            bytes[spot.at..spot.at + value.len()].copy_from_slice(&value);
        }
    }
    Ok(())
}

/// Where one relocation writes: its section's name, its address, its offset in the image.
struct Spot<'a> {
    section: &'a str,
    place: u64,
    at: usize,
}

/// The two kernel symbols whose uses the kernel's module loader rewrites instead of
/// relocating: `call __fentry__` becomes the fentry NOP, and `jmp` to the return thunk
/// becomes what the guest chose at boot ([`Returns`]). True when `r` was one of them and
/// is done.
fn rewrite_as_the_kernel_does(
    bytes: &mut [u8],
    spot: &Spot,
    r: &Reloc,
    returns: Returns,
) -> Result<bool, KpError> {
    let at = spot.at;
    let is_fentry = matches!(&r.target, RelocTarget::Kernel(n) if n == FENTRY);
    if is_fentry && r.kind == RelocKind::Pc32 {
        if at >= 1 && bytes[at - 1] == 0xe8 {
            bytes[at - 1..at + 4].copy_from_slice(&crate::funcs::site::FENTRY_NOP);
            return Ok(true);
        }
        return Err(KpError::Unsupported(format!(
            "{}+{:#x}: a use of {FENTRY} other than `call`",
            spot.section, r.offset
        )));
    }
    let is_thunk = matches!(&r.target, RelocTarget::Kernel(n) if n == RETURN_THUNK);
    if !(is_thunk && returns != Returns::AsSymbol && r.kind == RelocKind::Pc32) {
        return Ok(false);
    }
    let is_jmp = at >= 1 && bytes[at - 1] == 0xe9;
    match (returns, is_jmp) {
        (Returns::Ret, true) => {
            bytes[at - 1..at + 4].copy_from_slice(&[0xc3, 0xcc, 0xcc, 0xcc, 0xcc]);
            Ok(true)
        }
        (Returns::Jump(t), true) => {
            let d = i128::from(t) + i128::from(r.addend) - i128::from(spot.place);
            let d = i32::try_from(d).map_err(|_| {
                KpError::OutOfRange(format!(
                    "{}+{:#x} to the return thunk",
                    spot.section, r.offset
                ))
            })?;
            bytes[at..at + 4].copy_from_slice(&d.to_le_bytes());
            Ok(true)
        }
        _ => Err(KpError::Unsupported(format!(
            "{}+{:#x}: a use of {RETURN_THUNK} other than `jmp` (the kernel only rewrites jumps)",
            spot.section, r.offset
        ))),
    }
}

/// The bytes relocation `r` writes at `spot`, its value range-checked for its width.
/// `gs_relative`: a `%gs:sym(%rip)` access to a per-CPU symbol.
fn reloc_bytes(
    r: &Reloc,
    target: u64,
    spot: &Spot,
    gs_relative: bool,
    what: &dyn Fn() -> String,
) -> Result<Vec<u8>, KpError> {
    let value = target.wrapping_add(r.addend as u64);
    let out_of_range = |v: i128| {
        let sign = if v < 0 { "-" } else { "" };
        KpError::OutOfRange(format!(
            "{}+{:#x} to '{}': {sign}{:#x} does not fit in 32 bits",
            spot.section,
            r.offset,
            what(),
            v.unsigned_abs()
        ))
    };
    Ok(match r.kind {
        RelocKind::Abs64 => value.to_le_bytes().to_vec(),
        RelocKind::Abs32S => {
            let v = value as i64;
            i32::try_from(v)
                .map_err(|_| out_of_range(v.into()))?
                .to_le_bytes()
                .to_vec()
        }
        RelocKind::Abs32 => u32::try_from(value)
            .map_err(|_| out_of_range(value.into()))?
            .to_le_bytes()
            .to_vec(),
        RelocKind::Pc32 if gs_relative => {
            // A small per-CPU offset (as 6.12's `current` is): the CPU computes the
            // address modulo 2^64, so it reaches the symbol from the top 2 GiB.
            let d = value.wrapping_sub(spot.place) as i64;
            i32::try_from(d)
                .map_err(|_| out_of_range(d.into()))?
                .to_le_bytes()
                .to_vec()
        }
        RelocKind::Pc32 => {
            let d = i128::from(target) + i128::from(r.addend) - i128::from(spot.place);
            i32::try_from(d)
                .map_err(|_| out_of_range(d))?
                .to_le_bytes()
                .to_vec()
        }
    })
}

/// What the guest decided at boot that a link depends on: its return thunk, and its CPU
/// features where the patch has alternatives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BootChoices {
    pub(crate) returns: Returns,
    pub(crate) cpu: Option<CpuFeatures>,
}

/// The guest's CPU features, when the patch has alternatives to apply for them (their
/// entry layout checked against the guest's BTF).
fn guest_cpu(
    mem: &introspection::memory::KernelMemory,
    kernel: &Kernel,
    obj: &PatchObject,
) -> Result<Option<CpuFeatures>, KpError> {
    let Some(alts) = &obj.alternatives else {
        return Ok(None);
    };
    if let Some(size) = kernel.layout.patcher.alt_instr_size {
        if size != alts.entry_size as u64 {
            return Err(KpError::Unsupported(format!(
                "{}: its alternatives are {}-byte entries, the guest kernel's {size}: was it \
                 built for another kernel? (lpvmm kp build --kernel)",
                obj.manifest.name, alts.entry_size
            )));
        }
    }
    CpuFeatures::of_guest(mem, kernel).map(Some)
}

impl BootChoices {
    pub(crate) fn of_guest(
        mem: &KernelMemory,
        kernel: &Kernel,
        obj: &PatchObject,
    ) -> Result<Self, KpError> {
        Ok(BootChoices {
            returns: Returns::of_guest(mem, &kernel.symbols)?,
            cpu: guest_cpu(mem, kernel, obj)?,
        })
    }
}
