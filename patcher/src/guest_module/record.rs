//! The bytes of a patch's module record: the `struct module` the guest's kernel finds
//! for the patch's code, and what it points to (its symbols, unwind table and exception
//! table), laid out as the guest's kernel lays them out, at the address they will have.
//!
//! The record holds, in order: the patch's `struct module`, a second one that only
//! names its user (`lpvmm`), the `struct module_use` that links the two, the
//! `struct mod_kallsyms`, the symbol table, the ORC table (addresses, then entries),
//! the exception table, the symbol types and the string table.

use introspection::layout::{GuestModuleLayout, ModuleLayout, ModuleMemLayout};

use crate::area::Region;
use crate::load::link::Linked;
use crate::load::object::{ExEntry, PatchObject, EX_ENTRY_BYTES};
use crate::KpError;

/// `MODULE_REF_BASE` (kernel/module/main.c): a module nobody uses has this count.
const MODULE_REF_BASE: u32 = 1;
/// The kernel's TAINT_LIVEPATCH, in the module's own taints (`(K)` in /proc/modules).
const TAINT_LIVEPATCH: u64 = 1 << 15;
/// The name of the module that uses each patch's module.
pub(crate) const HOLDER: &str = "lpvmm";
/// `sizeof(Elf64_Sym)`.
const SYM_BYTES: u64 = 24;
/// `st_info` of a global function, and a section index that is not `SHN_UNDEF`.
const STT_FUNC_GLOBAL: u8 = 0x12;
const SHN_TEXT: u16 = 1;

/// A function of the patch as the guest's symbol table lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Symbol {
    pub(crate) name: String,
    pub(crate) addr: u64,
    pub(crate) size: u64,
}

/// The name of the module the guest knows patch `patch` as: `lpvmm:` and the patch's
/// name, `-` written `_` as rmmod and modprobe spell module names. No module the kernel
/// loads can have it (kbuild's names are C identifiers), so it never stands in a real
/// module's way: the guest refuses a second module of one name.
pub(crate) fn module_name(patch: &str) -> String {
    format!("{MODULE_PREFIX}{}", patch.replace('-', "_"))
}

/// What the name of every patch's module starts with.
pub const MODULE_PREFIX: &str = "lpvmm:";

/// What goes in a record: the module's name ([`module_name`]) and text, its functions, ORC entries
/// (address and raw entry, sorted) and exception table (sorted by instruction).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Contents {
    pub(crate) name: String,
    pub(crate) text: Region,
    pub(crate) symbols: Vec<Symbol>,
    pub(crate) orc: Vec<(u64, Vec<u8>)>,
    pub(crate) extable: Vec<Fixup>,
    /// The patch's `__bug_table`, laid out with its code: address and entries.
    pub(crate) bugs: Option<(u64, u32)>,
}

impl Contents {
    /// The record's contents for `obj`, linked as `linked`.
    pub(crate) fn of(obj: &PatchObject, linked: &Linked, bug_entry: u64) -> Result<Self, KpError> {
        let name = module_name(&obj.manifest.name);
        let text = Region {
            start: linked.code.addr,
            end: linked.code.addr + linked.code.bytes.len() as u64,
        };
        let mut symbols: Vec<Symbol> = obj
            .functions
            .iter()
            .filter_map(|f| {
                let addr = linked.section_addrs.get(f.section)? + f.offset;
                text.contains(addr).then(|| Symbol {
                    name: f.name.clone(),
                    addr,
                    size: f.size,
                })
            })
            .collect();
        symbols.sort_by_key(|s| s.addr);
        let at = |p: crate::load::object::Place| linked.section_addrs[p.section] + p.offset;
        let mut extable: Vec<Fixup> = obj
            .extable
            .iter()
            .map(|e: &ExEntry| Fixup {
                insn: at(e.insn),
                fixup: at(e.fixup),
                data: e.data,
            })
            .collect();
        extable.sort_by_key(|e| e.insn);
        let bugs = bug_table(obj, linked, bug_entry, &name)?;
        Ok(Contents {
            name,
            text,
            symbols,
            orc: linked.orc.clone(),
            extable,
            bugs,
        })
    }
}

/// Where the patch's `__bug_table` was laid out, and its number of entries.
fn bug_table(
    obj: &PatchObject,
    linked: &Linked,
    entry: u64,
    name: &str,
) -> Result<Option<(u64, u32)>, KpError> {
    let Some(i) = obj.sections.iter().position(|s| s.name == "__bug_table") else {
        return Ok(None);
    };
    let size = obj.sections[i].size;
    if entry == 0 || !size.is_multiple_of(entry) {
        return Err(KpError::Unsupported(format!(
            "{name}: its __bug_table is {size} bytes, not whole entries of the guest's \
             struct bug_entry ({entry} bytes): was it built for another kernel?"
        )));
    }
    Ok(Some((linked.section_addrs[i], (size / entry) as u32)))
}

/// An exception table entry at the addresses the link gave it: the instruction that
/// may fault, where the handler sends it, the handler's data word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fixup {
    pub(crate) insn: u64,
    pub(crate) fixup: u64,
    pub(crate) data: i32,
}

/// Where each part of a record is, from its start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Parts {
    pub(crate) holder: u64,
    pub(crate) module_use: u64,
    pub(crate) kallsyms: u64,
    pub(crate) symtab: u64,
    pub(crate) orc_ip: u64,
    pub(crate) orc: u64,
    pub(crate) extable: u64,
    pub(crate) typetab: u64,
    pub(crate) strtab: u64,
    pub(crate) size: u64,
}

fn align8(x: u64) -> u64 {
    x.div_ceil(8) * 8
}

impl Parts {
    pub(crate) fn of(c: &Contents, gm: &GuestModuleLayout, orc_entry: u64) -> Parts {
        let n = c.symbols.len() as u64 + 1;
        let m = c.orc.len() as u64;
        let holder = align8(gm.module_size);
        let module_use = holder + align8(gm.module_size);
        let kallsyms = module_use + align8(gm.use_size);
        let symtab = kallsyms + align8(gm.kallsyms_size);
        let orc_ip = symtab + n * SYM_BYTES;
        let orc = align8(orc_ip + 4 * m);
        let extable = align8(orc + orc_entry * m);
        let typetab = extable + (EX_ENTRY_BYTES as u64) * c.extable.len() as u64;
        let strtab = typetab + n;
        let strings: u64 = 1 + c
            .symbols
            .iter()
            .map(|s| s.name.len() as u64 + 1)
            .sum::<u64>();
        Parts {
            holder,
            module_use,
            kallsyms,
            symtab,
            orc_ip,
            orc,
            extable,
            typetab,
            strtab,
            size: align8(strtab + strings),
        }
    }
}

/// A record being filled: its bytes and the address its first byte will have.
struct Bytes {
    at: u64,
    buf: Vec<u8>,
}

impl Bytes {
    fn put(&mut self, off: u64, v: &[u8]) {
        self.buf[off as usize..off as usize + v.len()].copy_from_slice(v);
    }
    fn u64(&mut self, off: u64, v: u64) {
        self.put(off, &v.to_le_bytes());
    }
    fn u32(&mut self, off: u64, v: u32) {
        self.put(off, &v.to_le_bytes());
    }
    /// A pointer to `target` (an offset in the record).
    fn ptr(&mut self, off: u64, target: u64) {
        self.u64(off, self.at + target);
    }
    /// A `list_head` at `off` whose only other entry is at `other` (itself: empty).
    fn list(&mut self, off: u64, other: u64) {
        self.ptr(off, other);
        self.ptr(off + 8, other);
    }
    /// A self-relative `int` at `off` pointing to address `to`.
    fn rel(&mut self, off: u64, to: u64) {
        self.u32(off, to.wrapping_sub(self.at + off) as u32);
    }
}

/// The record's bytes, to be written at `at`.
pub(crate) fn build(
    c: &Contents,
    at: u64,
    gm: &GuestModuleLayout,
    ml: &ModuleLayout,
    orc_entry: u64,
) -> Result<Vec<u8>, KpError> {
    let (Some(users), Some(refcnt), Some(orc)) = (ml.users, ml.refcnt, ml.orc) else {
        return Err(KpError::Unsupported(
            "the guest kernel has no module unloading or no ORC unwinder".into(),
        ));
    };
    let p = Parts::of(c, gm, orc_entry);
    let mut b = Bytes {
        at,
        buf: vec![0; p.size as usize],
    };
    module_head(&mut b, ml, 0, &c.name)?;
    module_head(&mut b, ml, p.holder, HOLDER)?;
    text_region(&mut b, gm, ml, c.text);
    b.ptr(gm.text_mtn + gm.mtn_mod, 0);
    b.u32(refcnt, MODULE_REF_BASE + 1);
    b.u32(p.holder + refcnt, MODULE_REF_BASE);
    b.u64(gm.taints, TAINT_LIVEPATCH);
    // Used by the holder: one module_use on the patch's source list and the holder's
    // target list (kernel/module/main.c, add_module_usage).
    let [source_list, use_source_list, use_source] = users;
    b.list(source_list, p.module_use + use_source_list);
    b.list(p.module_use + use_source_list, source_list);
    b.list(gm.target_list, gm.target_list);
    b.list(p.holder + source_list, p.holder + source_list);
    b.list(p.holder + gm.target_list, p.module_use + gm.use_target_list);
    b.list(p.module_use + gm.use_target_list, p.holder + gm.target_list);
    b.ptr(p.module_use + use_source, p.holder);
    b.ptr(p.module_use + gm.use_target, 0);
    symbols(&mut b, ml, &p, c);
    unwind_and_fixups(&mut b, gm, orc, &p, c);
    if let Some((table, n)) = c.bugs {
        b.u64(gm.bug_table, table);
        b.u32(gm.num_bugs, n);
    }
    Ok(b.buf)
}

/// A `struct module`'s name and state (live) at `off`.
fn module_head(b: &mut Bytes, ml: &ModuleLayout, off: u64, name: &str) -> Result<(), KpError> {
    if name.len() as u64 >= ml.name_len {
        return Err(KpError::Unsupported(format!(
            "patch name '{name}' is longer than a guest module's name may be ({} bytes)",
            ml.name_len - 1
        )));
    }
    b.put(off + ml.name, name.as_bytes());
    let live = ml.states[0].to_le_bytes();
    b.put(off + ml.state, &live[..ml.state_size.min(8) as usize]);
    Ok(())
}

/// The module's text: all of the patch's code.
fn text_region(b: &mut Bytes, gm: &GuestModuleLayout, ml: &ModuleLayout, text: Region) {
    let size = text.size() as u32;
    match ml.mem {
        ModuleMemLayout::Mem {
            array,
            stride,
            base,
            size: size_at,
            text: t,
            ..
        } => {
            b.u64(array + t * stride + base, text.start);
            b.u32(array + t * stride + size_at, size);
        }
        ModuleMemLayout::Layouts {
            core,
            base,
            size: size_at,
            ..
        } => {
            b.u64(core + base, text.start);
            b.u32(core + size_at, size);
            for &at in &gm.layout_sizes {
                b.u32(at, size);
            }
        }
    }
}

/// The `struct mod_kallsyms` and its tables: one global function symbol per function.
fn symbols(b: &mut Bytes, ml: &ModuleLayout, p: &Parts, c: &Contents) {
    b.ptr(ml.kallsyms, p.kallsyms);
    b.ptr(p.kallsyms + ml.symtab, p.symtab);
    b.u32(p.kallsyms + ml.num_symtab, c.symbols.len() as u32 + 1);
    b.ptr(p.kallsyms + ml.strtab, p.strtab);
    b.ptr(p.kallsyms + ml.typetab, p.typetab);
    let mut name_at = 1u64;
    for (i, s) in c.symbols.iter().enumerate() {
        let sym = p.symtab + (i as u64 + 1) * SYM_BYTES;
        b.u32(sym, name_at as u32);
        b.put(sym + 4, &[STT_FUNC_GLOBAL, 0]);
        b.put(sym + 6, &SHN_TEXT.to_le_bytes());
        b.u64(sym + 8, s.addr);
        b.u64(sym + 16, s.size);
        b.put(p.typetab + i as u64 + 1, b"t");
        b.put(p.strtab + name_at, s.name.as_bytes());
        name_at += s.name.len() as u64 + 1;
    }
}

/// `arch.orc_unwind_ip`/`orc_unwind`/`num_orcs` and `extable`/`num_exentries`: both
/// sorted tables of self-relative addresses, as the kernel sorts a module's.
fn unwind_and_fixups(
    b: &mut Bytes,
    gm: &GuestModuleLayout,
    orc: [u64; 3],
    p: &Parts,
    c: &Contents,
) {
    let [num_orcs, orc_ip, orc_unwind] = orc;
    if !c.orc.is_empty() {
        b.u32(num_orcs, c.orc.len() as u32);
        b.ptr(orc_ip, p.orc_ip);
        b.ptr(orc_unwind, p.orc);
    }
    let mut entry_at = p.orc;
    for (i, (ip, raw)) in c.orc.iter().enumerate() {
        b.rel(p.orc_ip + 4 * i as u64, *ip);
        b.put(entry_at, raw);
        entry_at += raw.len() as u64;
    }
    if !c.extable.is_empty() {
        b.ptr(gm.extable, p.extable);
        b.u32(gm.num_exentries, c.extable.len() as u32);
    }
    for (i, f) in c.extable.iter().enumerate() {
        let e = p.extable + (i * EX_ENTRY_BYTES) as u64;
        b.rel(e, f.insn);
        b.rel(e + 4, f.fixup);
        b.u32(e + 8, f.data as u32);
    }
}
