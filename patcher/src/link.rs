//! Linking a patch object at its place in the guest: every section gets an address in
//! the region its permissions call for, and every relocation is computed against those
//! addresses and the guest kernel's symbols. Pure: the result is bytes to write.

use std::collections::HashMap;

use crate::alternatives::{self, CpuFeatures};
use crate::object::{PatchObject, RelocKind, RelocTarget, SectionKind};
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
                    .map_err(|e| crate::KpError::Guest(format!("reading x86_return_thunk: {e}")))?;
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
        let what = || match crate::object::function_at(&obj.functions, a.instr) {
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

/// Lay out and relocate `obj`. `resolve` gives the address of a kernel symbol the patch
/// imports (it applies the manifest's symbol bindings).
/// Alternatives are applied for `cpu`, the guest's CPU features (needed only when the
/// object has alternatives).
pub fn link(
    obj: &PatchObject,
    at: Placement,
    returns: Returns,
    cpu: Option<&CpuFeatures>,
    resolve: &dyn Fn(&str) -> Result<u64, KpError>,
) -> Result<Linked, KpError> {
    let mut images = [
        Image {
            addr: at.code,
            bytes: Vec::new(),
        },
        Image {
            addr: at.rodata,
            bytes: Vec::new(),
        },
        Image {
            addr: at.data,
            bytes: Vec::new(),
        },
    ];
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

    let mut imports = Vec::new();
    let mut resolved: HashMap<&str, u64> = HashMap::new();
    for name in &obj.imports {
        let a = resolve(name)?;
        resolved.insert(name.as_str(), a);
        imports.push((name.clone(), a));
    }

    let per_cpu = gs_relative_displacements(obj);
    for (si, s) in obj.sections.iter().enumerate() {
        let (ri, base_off) = offsets[si];
        for r in &s.relocs {
            let target = match &r.target {
                RelocTarget::Section(i) => section_addrs[*i],
                RelocTarget::Defined {
                    section, offset, ..
                } => section_addrs[*section] + offset,
                RelocTarget::Kernel(n) => *resolved
                    .get(n.as_str())
                    .ok_or_else(|| KpError::Symbol(format!("'{n}' was not resolved")))?,
            };
            let place = section_addrs[si] + r.offset;
            let at = base_off + r.offset as usize;
            // The kernel turns a module's `call __fentry__` into the fentry NOP at load.
            let is_fentry = matches!(&r.target, RelocTarget::Kernel(n) if n == FENTRY);
            if is_fentry && r.kind == RelocKind::Pc32 {
                let bytes = &mut images[ri].bytes;
                if at >= 1 && bytes[at - 1] == 0xe8 {
                    bytes[at - 1..at + 4].copy_from_slice(&crate::site::FENTRY_NOP);
                    continue;
                }
                return Err(KpError::Unsupported(format!(
                    "{}+{:#x}: a use of {FENTRY} other than `call`",
                    s.name, r.offset
                )));
            }
            let is_thunk = matches!(&r.target, RelocTarget::Kernel(n) if n == RETURN_THUNK);
            if is_thunk && returns != Returns::AsSymbol && r.kind == RelocKind::Pc32 {
                let bytes = &mut images[ri].bytes;
                let is_jmp = at >= 1 && bytes[at - 1] == 0xe9;
                match (returns, is_jmp) {
                    (Returns::Ret, true) => {
                        bytes[at - 1..at + 4].copy_from_slice(&[0xc3, 0xcc, 0xcc, 0xcc, 0xcc]);
                        continue;
                    }
                    (Returns::Jump(t), true) => {
                        let d = i128::from(t) + i128::from(r.addend) - i128::from(place);
                        let d = i32::try_from(d).map_err(|_| {
                            KpError::OutOfRange(format!("{}+{:#x} to the return thunk", s.name, r.offset))
                        })?;
                        bytes[at..at + 4].copy_from_slice(&d.to_le_bytes());
                        continue;
                    }
                    _ => {
                        return Err(KpError::Unsupported(format!(
                            "{}+{:#x}: a use of {RETURN_THUNK} other than `jmp` (the kernel only rewrites jumps)",
                            s.name, r.offset
                        )))
                    }
                }
            }
            let value = target.wrapping_add(r.addend as u64);
            let what = || match &r.target {
                RelocTarget::Kernel(n) | RelocTarget::Defined { name: n, .. } => n.clone(),
                RelocTarget::Section(i) => obj.sections[*i].name.clone(),
            };
            let out_of_range = |v: i128| {
                let sign = if v < 0 { "-" } else { "" };
                KpError::OutOfRange(format!(
                    "{}+{:#x} to '{}': {sign}{:#x} does not fit in 32 bits",
                    s.name,
                    r.offset,
                    what(),
                    v.unsigned_abs()
                ))
            };
            let bytes: Vec<u8> = match r.kind {
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
                RelocKind::Pc32 if per_cpu.contains(&(si, r.offset)) => {
                    // A `%gs:sym(%rip)` access to a per-CPU symbol (a small offset, as
                    // 6.12's `current` is): the CPU computes the address modulo 2^64,
                    // so it reaches the symbol from the top 2 GiB.
                    let d = target.wrapping_add(r.addend as u64).wrapping_sub(place) as i64;
                    i32::try_from(d)
                        .map_err(|_| out_of_range(d.into()))?
                        .to_le_bytes()
                        .to_vec()
                }
                RelocKind::Pc32 => {
                    let d = i128::from(target) + i128::from(r.addend) - i128::from(place);
                    i32::try_from(d)
                        .map_err(|_| out_of_range(d))?
                        .to_le_bytes()
                        .to_vec()
                }
            };
            images[ri].bytes[at..at + bytes.len()].copy_from_slice(&bytes);
        }
    }

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
        orc,
    })
}
