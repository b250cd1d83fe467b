//! Loaded modules in a synthetic kernel, laid out as kernel/module/ lays them out: each
//! module's memory allocated from MODULES_VADDR up (text, then read-only data, then
//! data; a guard page after each allocation, as vmalloc leaves one), its `struct module`
//! (`__this_module`) at the start of its data, its core symbol table (`mod_kallsyms`:
//! `Elf64_Sym`s, string table, type letters) after it, its exports (`__ksymtab`,
//! place-relative `struct kernel_symbol`s sorted by name) and ORC tables (place-relative
//! 32-bit addresses, sorted, then the entries) in its read-only data, and the module on
//! the kernel's `modules` list, newest first, with a `struct module_use` for each module
//! that uses another.
//!
//! The two memory layouts of `struct module`: up to 6.3 `core_layout` and `init_layout`
//! (`struct module_layout`, one allocation each: text, read-only data, data), from 6.4
//! `mem[MOD_MEM_NUM_TYPES]` (`struct module_memory`, one allocation per `enum
//! mod_mem_type`). The spec's `new_orc` (6.4+ formats) picks the second.

use std::collections::HashMap;

use super::btf::BtfBuilder;
use super::image::{frame_size, function_body, link_ring, orc_row, Builder, Kind, FUNC_SIZE};
use super::SynthKernelSpec;
use crate::kernel::Range;
use crate::modules::ModuleState;

/// MODULES_VADDR on x86-64: where module memory is allocated from.
pub const MODULES_VADDR: u64 = 0xffff_ffff_c000_0000;
const PAGE: u64 = 4096;
/// MODULE_NAME_LEN: 64 - sizeof(unsigned long).
pub const MODULE_NAME_LEN: u64 = 56;
/// `sizeof(struct module_layout)` (6.1) and `sizeof(struct module_memory)` (6.4+):
/// base, size(s), and a `struct mod_tree_node`.
const MODULE_LAYOUT: u64 = 80;
const MODULE_MEMORY: u64 = 72;
/// `MOD_MEM_NUM_TYPES`, and the types this builder fills.
const MOD_MEM_TYPES: u64 = 7;
const MOD_TEXT: u64 = 0;
const MOD_DATA: u64 = 1;
const MOD_RODATA: u64 = 2;
const MOD_INIT_TEXT: u64 = 4;
const MODULE_USE: u64 = 48;
/// `sizeof(struct kernel_symbol)` with PREL32 relocations, and of `Elf64_Sym`.
const KSYM: u64 = 12;
const ELF_SYM: u64 = 24;
/// Section indices of the symbols (any but 0, SHN_UNDEF, is a defined symbol).
const SHN_TEXT: u16 = 2;
const SHN_INIT_TEXT: u16 = 3;
const SHN_DATA: u16 = 5;
const SHN_THIS_MODULE: u16 = 6;
/// What the kernel's `refcnt` starts at (MODULE_REF_BASE).
const MODULE_REF_BASE: u32 = 1;

/// One loaded module of a synthetic kernel.
#[derive(Clone, Debug)]
pub struct SynthModule {
    pub name: String,
    /// Its core text in address order, `FUNC_SIZE` bytes each (an fentry NOP, then
    /// `ret`s): name and type letter (`T` a global function, `t` a static one).
    pub functions: Vec<(String, char)>,
    /// Its `__init` text: mapped, and in its symbol table, only while it is coming
    /// (freed once its init has run). `init` points at the first.
    pub init_functions: Vec<String>,
    /// Data objects of 64 bytes: name and type letter (`D` or `d`).
    pub data: Vec<(String, char)>,
    /// Its exports (EXPORT_SYMBOL), each a global one of `functions`.
    pub exports: Vec<String>,
    /// The one of `functions` that `exit` points at. `None`: no exit, which with an
    /// init makes the module permanent.
    pub exit: Option<String>,
    /// The modules it uses (each loaded before it, earlier in the spec).
    pub uses: Vec<String>,
    /// References held on it besides its users' (open files, for one).
    pub holds: u32,
    pub state: ModuleState,
    /// Its `taints` (TAINT_* bits: `1 << 15` is a livepatch's `K`).
    pub taints: u64,
}

impl SynthModule {
    /// A live module with the given core functions and nothing else.
    pub fn new(name: &str, functions: &[(&str, char)]) -> SynthModule {
        SynthModule {
            name: name.into(),
            functions: functions.iter().map(|&(n, k)| (n.into(), k)).collect(),
            init_functions: vec![format!("{name}_init")],
            data: Vec::new(),
            exports: Vec::new(),
            exit: None,
            uses: Vec::new(),
            holds: 0,
            state: ModuleState::Live,
            taints: 0,
        }
    }

    /// The default specs' modules: `tunx` (a tun-like driver a reader task sleeps in,
    /// one open file on it) and `dummyx`, loaded after it and using it, permanent.
    pub fn defaults() -> Vec<SynthModule> {
        let mut tunx = SynthModule::new(
            "tunx",
            &[
                ("tunx_chr_read_iter", 't'),
                ("tunx_do_read", 't'),
                ("tunx_get_socket", 'T'),
                ("tunx_cleanup", 't'),
            ],
        );
        tunx.data = vec![("tunx_fops".into(), 'd'), ("tunx_debug".into(), 'D')];
        tunx.exports = vec!["tunx_get_socket".into()];
        tunx.exit = Some("tunx_cleanup".into());
        tunx.holds = 1;
        let mut dummyx = SynthModule::new(
            "dummyx",
            &[
                ("dummyx_xmit", 't'),
                ("dummyx_setup", 'T'),
                ("dummyx_get_stats", 'T'),
            ],
        );
        dummyx.data = vec![("dummyx_link_ops".into(), 'd')];
        dummyx.exports = vec!["dummyx_setup".into()];
        dummyx.uses = vec!["tunx".into()];
        vec![tunx, dummyx]
    }

    /// Every function name, core and init.
    pub fn function_names(&self) -> impl Iterator<Item = &str> {
        self.functions
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(self.init_functions.iter().map(String::as_str))
    }
}

/// One symbol of a built module's symbol table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthModuleSymbol {
    pub addr: u64,
    /// Its letter in the module's `typetab`.
    pub kind: char,
    pub name: String,
    pub exported: bool,
    /// SHN_UNDEF.
    pub undefined: bool,
}

/// Ground truth of a module as built.
#[derive(Clone, Debug)]
pub struct BuiltModule {
    pub name: String,
    /// Its `struct module` (`__this_module`).
    pub addr: u64,
    /// Its core text (all of its text allocation) and, while it is coming, its init
    /// text.
    pub text: Range,
    pub init_text: Option<Range>,
    /// All of its memory, as /proc/modules counts it.
    pub size: u64,
    /// Its `mod_kallsyms` symbol table in table order, the null symbol first.
    pub symbols: Vec<SynthModuleSymbol>,
    /// Its exports (`syms`), and its ORC table: `orc_unwind_ip`, `orc_unwind`, count.
    pub syms: u64,
    pub orc: (u64, u64, u64),
}

/// Byte offsets of `struct module`'s fields in the synthetic BTF: the 6.4+ struct has
/// its fields after `name` moved by 8 and a longer memory description, so that every
/// offset after it differs between the two specs.
pub(super) struct ModuleFields {
    new: bool,
    size: u64,
    state: u64,
    list: u64,
    name: u64,
    syms: u64,
    crcs: u64,
    num_syms: u64,
    init: u64,
    /// `core_layout` (then `init_layout`), or `mem`.
    mem: u64,
    arch: u64,
    kallsyms: u64,
    core_kallsyms: u64,
    source_list: u64,
    target_list: u64,
    exit: u64,
    refcnt: u64,
    taints: u64,
}

impl ModuleFields {
    pub(super) fn of(new: bool) -> ModuleFields {
        let s = if new { 8 } else { 0 };
        let mem = 0x70 + s;
        let after = mem
            + if new {
                MOD_MEM_TYPES * MODULE_MEMORY
            } else {
                2 * MODULE_LAYOUT
            };
        ModuleFields {
            new,
            state: 0,
            list: 0x08,
            name: 0x18,
            syms: 0x50 + s,
            crcs: 0x58 + s,
            num_syms: 0x60 + s,
            init: 0x68 + s,
            mem,
            arch: after,
            kallsyms: after + 0x18,
            core_kallsyms: after + 0x20,
            source_list: after + 0x40,
            target_list: after + 0x50,
            exit: after + 0x60,
            refcnt: after + 0x68,
            taints: after + 0x70,
            size: after + 0x78,
        }
    }
}

/// Type ids the module types are built from.
pub(super) struct BaseTypes {
    pub int: u32,
    pub uint: u32,
    pub chr: u32,
    pub voidp: u32,
    pub list: u32,
}

/// BTF of `struct module` and what it holds, as pahole writes them.
pub(super) fn module_btf(b: &mut BtfBuilder, t: &BaseTypes, f: &ModuleFields) {
    let bits = |o: u64| (o * 8) as u32;
    let state = b.enumeration(
        "module_state",
        4,
        &[
            ("MODULE_STATE_LIVE", 0),
            ("MODULE_STATE_COMING", 1),
            ("MODULE_STATE_GOING", 2),
            ("MODULE_STATE_UNFORMED", 3),
        ],
    );
    let name = b.array(t.chr, MODULE_NAME_LEN as u32);
    let intp = b.ptr(t.int);
    let kallsyms = b.strukt(
        "mod_kallsyms",
        32,
        &[
            ("symtab", t.voidp, 0),
            ("num_symtab", t.uint, 64),
            ("strtab", t.voidp, 128),
            ("typetab", t.voidp, 192),
        ],
    );
    let arch = b.strukt(
        "mod_arch_specific",
        24,
        &[
            ("num_orcs", t.uint, 0),
            ("orc_unwind_ip", intp, 64),
            ("orc_unwind", t.voidp, 128),
        ],
    );
    b.strukt(
        "kernel_symbol",
        KSYM as u32,
        &[
            ("value_offset", t.int, 0),
            ("name_offset", t.int, 32),
            ("namespace_offset", t.int, 64),
        ],
    );
    b.strukt(
        "module_use",
        MODULE_USE as u32,
        &[
            ("source_list", t.list, 0),
            ("target_list", t.list, 128),
            ("source", t.voidp, 256),
            ("target", t.voidp, 320),
        ],
    );
    let counter = b.strukt("", 4, &[("counter", t.int, 0)]);
    let atomic = b.typedef("atomic_t", counter);
    let mut members = vec![
        ("state", state, bits(f.state)),
        ("list", t.list, bits(f.list)),
        ("name", name, bits(f.name)),
        ("syms", t.voidp, bits(f.syms)),
        ("crcs", t.voidp, bits(f.crcs)),
        ("num_syms", t.uint, bits(f.num_syms)),
        ("init", t.voidp, bits(f.init)),
        ("arch", arch, bits(f.arch)),
        ("kallsyms", t.voidp, bits(f.kallsyms)),
        ("core_kallsyms", kallsyms, bits(f.core_kallsyms)),
        ("source_list", t.list, bits(f.source_list)),
        ("target_list", t.list, bits(f.target_list)),
        ("exit", t.voidp, bits(f.exit)),
        ("refcnt", atomic, bits(f.refcnt)),
        ("taints", t.voidp, bits(f.taints)),
    ];
    if f.new {
        let mem = b.strukt(
            "module_memory",
            MODULE_MEMORY as u32,
            &[("base", t.voidp, 0), ("size", t.uint, 64)],
        );
        let array = b.array(mem, MOD_MEM_TYPES as u32);
        b.enumeration(
            "mod_mem_type",
            4,
            &[
                ("MOD_TEXT", MOD_TEXT),
                ("MOD_DATA", MOD_DATA),
                ("MOD_RODATA", MOD_RODATA),
                ("MOD_RO_AFTER_INIT", 3),
                ("MOD_INIT_TEXT", MOD_INIT_TEXT),
                ("MOD_INIT_DATA", 5),
                ("MOD_INIT_RODATA", 6),
                ("MOD_MEM_NUM_TYPES", MOD_MEM_TYPES),
                ("MOD_INVALID", u64::from(u32::MAX)),
            ],
        );
        members.push(("mem", array, bits(f.mem)));
    } else {
        let layout = b.strukt(
            "module_layout",
            MODULE_LAYOUT as u32,
            &[
                ("base", t.voidp, 0),
                ("size", t.uint, 64),
                ("text_size", t.uint, 96),
                ("ro_size", t.uint, 128),
                ("ro_after_init_size", t.uint, 160),
            ],
        );
        members.push(("core_layout", layout, bits(f.mem)));
        members.push(("init_layout", layout, bits(f.mem + MODULE_LAYOUT)));
    }
    members.sort_by_key(|m| m.2);
    b.strukt("module", f.size as u32, &members);
}

/// Where a symbol of a module is.
#[derive(Clone, Copy)]
enum Place {
    Text(usize),
    InitText(usize),
    Data(usize),
    ThisModule,
    Undefined,
}

struct Sym {
    name: String,
    kind: char,
    place: Place,
}

/// The module's symbol table as its core `mod_kallsyms` holds it, in ELF order (the
/// null symbol, locals, globals): while it is coming also its init and undefined
/// symbols (the whole table), once live only its core ones (`is_core_symbol`).
fn symbol_table(m: &SynthModule) -> Vec<Sym> {
    let coming = m.state == ModuleState::Coming;
    let sym = |name: &str, kind: char, place| Sym {
        name: name.into(),
        kind,
        place,
    };
    let mut all = vec![sym("", 'U', Place::Undefined)];
    for global in [false, true] {
        let mut part = Vec::new();
        for (i, (n, k)) in m.functions.iter().enumerate() {
            part.push(sym(n, *k, Place::Text(i)));
        }
        if coming {
            for (i, n) in m.init_functions.iter().enumerate() {
                part.push(sym(n, 't', Place::InitText(i)));
            }
        }
        for (i, (n, k)) in m.data.iter().enumerate() {
            part.push(sym(n, *k, Place::Data(i)));
        }
        part.push(sym("__this_module", 'D', Place::ThisModule));
        if coming {
            part.push(sym("__fentry__", 'U', Place::Undefined));
        }
        all.extend(
            part.into_iter()
                .filter(|s| s.kind.is_ascii_uppercase() == global),
        );
    }
    all
}

/// Where a module's parts are.
struct Plan {
    text: u64,
    text_len: u64,
    ro: u64,
    ro_len: u64,
    data: u64,
    data_len: u64,
    /// Its init text: allocated at load, freed (unmapped) once init has run.
    init: u64,
    init_len: u64,
    init_mapped: bool,
}

impl Plan {
    /// `(base, size)` of each `mod_mem_type` (6.4+), each allocation's own.
    fn mem(&self) -> [(u64, u64); MOD_MEM_TYPES as usize] {
        let mut mem = [(0, 0); MOD_MEM_TYPES as usize];
        mem[MOD_TEXT as usize] = (self.text, self.text_len);
        mem[MOD_DATA as usize] = (self.data, self.data_len);
        mem[MOD_RODATA as usize] = (self.ro, self.ro_len);
        if self.init_mapped {
            mem[MOD_INIT_TEXT as usize] = (self.init, self.init_len);
        }
        mem
    }

    /// What /proc/modules prints as the size: all of it.
    fn size(&self) -> u64 {
        self.mem().iter().map(|m| m.1).sum()
    }
}

fn pages(len: u64) -> u64 {
    len.div_ceil(PAGE).max(1) * PAGE
}

impl Builder {
    /// A module allocation of `len` bytes at `*va`, backed by pages of the image and
    /// mapped at `*va` (unless `mapped` is false: memory already freed), and the guard
    /// page after it.
    fn module_alloc(&mut self, va: &mut u64, len: u64, mapped: bool) -> u64 {
        let at = *va;
        if mapped {
            let backing = self.img.alloc(len, PAGE);
            let pa = self.pa(backing);
            self.g.map(at, pa, len);
            self.aliases.push((at, len, pa));
        }
        *va += len + PAGE;
        at
    }

    /// Allocate a module's memory as the kernel of the spec's layout does.
    fn plan_module(&mut self, new: bool, va: &mut u64, lens: [u64; 4], coming: bool) -> Plan {
        let [text_len, ro_len, data_len, init_len] = lens.map(pages);
        let (text, ro, data) = if new {
            let text = self.module_alloc(va, text_len, true);
            let data = self.module_alloc(va, data_len, true);
            let ro = self.module_alloc(va, ro_len, true);
            (text, ro, data)
        } else {
            let core = self.module_alloc(va, text_len + ro_len + data_len, true);
            (core, core + text_len, core + text_len + ro_len)
        };
        // No init text: nothing allocated (and `init` NULL).
        let init = match lens[3] {
            0 => 0,
            _ => self.module_alloc(va, init_len, coming),
        };
        Plan {
            text,
            text_len,
            ro,
            ro_len,
            data,
            data_len,
            init,
            init_len: if init == 0 { 0 } else { init_len },
            init_mapped: coming && init != 0,
        }
    }
}

/// Build the spec's modules (after the kernel's text, before its tasks, whose stacks
/// may pass through module code): `functions` gains every module function.
pub(super) fn build_modules(
    b: &mut Builder,
    spec: &SynthKernelSpec,
    functions: &mut HashMap<String, u64>,
) -> Vec<BuiltModule> {
    let f = ModuleFields::of(spec.new_orc);
    let head = b.data("modules", &[0; 16], 8);
    let mut va = MODULES_VADDR;
    let mut built: Vec<BuiltModule> = Vec::new();
    for m in &spec.modules {
        built.push(build_module(b, spec, &f, m, &mut va, functions));
    }
    // LIST_HEAD(modules): `list_add_rcu` at load puts the newest first.
    let nodes: Vec<u64> = built.iter().rev().map(|m| m.addr + f.list).collect();
    link_ring(b, head, &nodes);
    link_users(b, spec, &f, &built);
    built
}

/// `add_module_usage(a, b)` for each module `a` that uses `b`: a `struct module_use`
/// (kmalloc'd: in the direct map) on `b`'s `source_list` and `a`'s `target_list`, each
/// newest first; and `b`'s `refcnt` one higher for each user.
fn link_users(b: &mut Builder, spec: &SynthKernelSpec, f: &ModuleFields, built: &[BuiltModule]) {
    let index = |name: &str| {
        built
            .iter()
            .position(|m| m.name == name)
            .unwrap_or_else(|| panic!("synthetic module '{name}' is used but not loaded"))
    };
    let mut sources: Vec<Vec<u64>> = vec![Vec::new(); built.len()];
    let mut targets: Vec<Vec<u64>> = vec![Vec::new(); built.len()];
    for (a, m) in spec.modules.iter().enumerate() {
        for used in &m.uses {
            let t = index(used);
            let u = b.img.alloc(MODULE_USE, 8);
            b.w64(u + 32, built[a].addr);
            b.w64(u + 40, built[t].addr);
            sources[t].insert(0, u);
            targets[a].insert(0, u + 16);
        }
    }
    for (i, m) in built.iter().enumerate() {
        link_ring(b, m.addr + f.source_list, &sources[i]);
        link_ring(b, m.addr + f.target_list, &targets[i]);
        let refs = MODULE_REF_BASE + sources[i].len() as u32 + spec.modules[i].holds;
        b.w32(m.addr + f.refcnt, refs);
    }
}

fn build_module(
    b: &mut Builder,
    spec: &SynthKernelSpec,
    f: &ModuleFields,
    m: &SynthModule,
    va: &mut u64,
    functions: &mut HashMap<String, u64>,
) -> BuiltModule {
    assert!(
        m.name.len() < MODULE_NAME_LEN as usize,
        "module name {}",
        m.name
    );
    let coming = m.state == ModuleState::Coming;
    let table = symbol_table(m);
    let mut exports: Vec<&String> = m.exports.iter().collect();
    exports.sort();
    let strings_len: u64 = exports.iter().map(|e| e.len() as u64 + 1).sum();
    // Read-only data: __ksymtab, __ksymtab_strings, .orc_unwind_ip, .orc_unwind.
    let orc_rows = m.functions.len() + m.init_functions.len() + 2;
    let ro_orc_ip = (KSYM * exports.len() as u64 + strings_len).next_multiple_of(4);
    let ro_orc_u = ro_orc_ip + 4 * orc_rows as u64;
    let ro_len = ro_orc_u + 6 * orc_rows as u64;
    // Data: __this_module, the data objects, then the core symbol table.
    let data_objects = f.size.next_multiple_of(64);
    let symtab = (data_objects + 64 * m.data.len() as u64).next_multiple_of(8);
    let strtab = symtab + ELF_SYM * table.len() as u64;
    let names_len: u64 = table.iter().map(|s| s.name.len() as u64 + 1).sum();
    let typetab = strtab + names_len;
    let data_len = typetab + table.len() as u64;
    let text_len = FUNC_SIZE * m.functions.len() as u64;
    let init_len = FUNC_SIZE * m.init_functions.len() as u64;
    let p = b.plan_module(f.new, va, [text_len, ro_len, data_len, init_len], coming);

    let addr = p.data;
    let text_at = |i: usize| p.text + FUNC_SIZE * i as u64;
    let init_at = |i: usize| p.init + FUNC_SIZE * i as u64;
    for (i, (n, _)) in m.functions.iter().enumerate() {
        functions.insert(n.clone(), text_at(i));
        b.w(text_at(i), &function_body(n));
    }
    for (i, n) in m.init_functions.iter().enumerate() {
        functions.insert(n.clone(), init_at(i));
        if coming {
            b.w(init_at(i), &function_body(n));
        }
    }
    let orc = write_orc(b, spec, m, &p, (p.ro + ro_orc_ip, p.ro + ro_orc_u));
    let function_at = |name: &str| {
        let i = m.functions.iter().position(|(n, _)| n == name);
        text_at(i.unwrap_or_else(|| panic!("{name} is no function of {}", m.name)))
    };
    let exported: Vec<(&str, u64)> = exports
        .iter()
        .map(|e| (e.as_str(), function_at(e)))
        .collect();
    write_exports(b, p.ro, &exported);

    // The symbol table, with each symbol's address.
    let place = |pl: Place| match pl {
        Place::Text(i) => (text_at(i), SHN_TEXT, 2u8),
        Place::InitText(i) => (init_at(i), SHN_INIT_TEXT, 2),
        Place::Data(i) => (addr + data_objects + 64 * i as u64, SHN_DATA, 1),
        Place::ThisModule => (addr, SHN_THIS_MODULE, 1),
        Place::Undefined => (0, 0, 0),
    };
    let mut symbols = Vec::new();
    let mut name_off = 0u64;
    for (i, s) in table.iter().enumerate() {
        let (value, shndx, stt) = place(s.place);
        let size = match stt {
            2 => FUNC_SIZE,
            1 => 64,
            _ => 0,
        };
        let bind = u8::from(s.kind.is_ascii_uppercase() && i > 0);
        let at = addr + symtab + ELF_SYM * i as u64;
        b.w32(at, name_off as u32);
        b.w(at + 4, &[bind << 4 | stt, 0]);
        b.w(at + 6, &shndx.to_le_bytes());
        b.w64(at + 8, value);
        b.w64(at + 16, size);
        b.w(addr + strtab + name_off, s.name.as_bytes());
        name_off += s.name.len() as u64 + 1;
        b.w(addr + typetab + i as u64, &[s.kind as u8]);
        symbols.push(SynthModuleSymbol {
            addr: value,
            kind: s.kind,
            name: s.name.clone(),
            exported: shndx != 0 && exported.contains(&(s.name.as_str(), value)),
            undefined: shndx == 0,
        });
    }

    // struct module.
    let mut name = [0u8; MODULE_NAME_LEN as usize];
    name[..m.name.len()].copy_from_slice(m.name.as_bytes());
    b.w(addr + f.name, &name);
    let state = match m.state {
        ModuleState::Live => 0,
        ModuleState::Coming => 1,
        ModuleState::Going => 2,
        ModuleState::Unformed => 3,
    };
    b.w32(addr + f.state, state);
    b.w64(addr + f.syms, p.ro);
    b.w32(addr + f.num_syms, exported.len() as u32);
    let init = if m.init_functions.is_empty() {
        0
    } else {
        p.init
    };
    b.w64(addr + f.init, init);
    let exit = m.exit.as_deref().map(function_at).unwrap_or(0);
    b.w64(addr + f.exit, exit);
    b.w64(addr + f.taints, m.taints);
    write_memory(b, f, addr, &p);
    b.w32(addr + f.arch, orc.2 as u32);
    b.w64(addr + f.arch + 8, orc.0);
    b.w64(addr + f.arch + 16, orc.1);
    let k = addr + f.core_kallsyms;
    b.w64(addr + f.kallsyms, k);
    b.w64(k, addr + symtab);
    b.w32(k + 8, table.len() as u32);
    b.w64(k + 16, addr + strtab);
    b.w64(k + 24, addr + typetab);

    BuiltModule {
        name: m.name.clone(),
        addr,
        text: Range {
            start: p.text,
            end: p.text + p.text_len,
        },
        init_text: coming.then_some(Range {
            start: p.init,
            end: p.init + p.init_len,
        }),
        size: p.size(),
        symbols,
        syms: p.ro,
        orc,
    }
}

/// `core_layout` and `init_layout` (6.1), or `mem[]` (6.4+).
fn write_memory(b: &mut Builder, f: &ModuleFields, addr: u64, p: &Plan) {
    if f.new {
        for (t, (base, size)) in p.mem().iter().enumerate() {
            let at = addr + f.mem + MODULE_MEMORY * t as u64;
            b.w64(at, *base);
            b.w32(at + 8, *size as u32);
        }
        return;
    }
    let core_ro = p.text_len + p.ro_len;
    let core = [
        p.text,
        p.text_len + p.ro_len + p.data_len,
        p.text_len,
        core_ro,
        core_ro,
    ];
    let init = if p.init_mapped {
        [p.init, p.init_len, p.init_len, p.init_len, p.init_len]
    } else {
        // do_init_module: the init layout is freed and cleared.
        [0; 5]
    };
    for (at, [base, size, text, ro, ro_after_init]) in
        [(addr + f.mem, core), (addr + f.mem + MODULE_LAYOUT, init)]
    {
        b.w64(at, base);
        for (i, v) in [size, text, ro, ro_after_init].into_iter().enumerate() {
            b.w32(at + 8 + 4 * i as u64, v as u32);
        }
    }
}

/// The module's ORC table (objtool's entries: one per function, and an end-of-section
/// entry after each text section), sorted as `unwind_module_init` sorts it; returns
/// (`orc_unwind_ip`, `orc_unwind`, `num_orcs`).
fn write_orc(
    b: &mut Builder,
    spec: &SynthKernelSpec,
    m: &SynthModule,
    p: &Plan,
    (ip_at, u_at): (u64, u64),
) -> (u64, u64, u64) {
    let mut rows: Vec<(u64, [u8; 6])> = Vec::new();
    for (base, names) in [
        (
            p.text,
            m.functions
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>(),
        ),
        (
            p.init,
            m.init_functions.iter().map(String::as_str).collect(),
        ),
    ] {
        for (i, n) in names.iter().enumerate() {
            let sp = frame_size(n) as i16;
            rows.push((
                base + FUNC_SIZE * i as u64,
                orc_row(spec.new_orc, sp, 5, 0, Kind::Call),
            ));
        }
        let end = base + FUNC_SIZE * names.len() as u64;
        rows.push((end, orc_row(spec.new_orc, 0, 0, 0, Kind::Undefined)));
    }
    rows.sort_by_key(|r| r.0);
    for (i, (ip, row)) in rows.iter().enumerate() {
        let at = ip_at + 4 * i as u64;
        b.w32(at, ip.wrapping_sub(at) as i32 as u32);
        b.w(u_at + 6 * i as u64, row);
    }
    (ip_at, u_at, rows.len() as u64)
}

/// `__ksymtab` (place-relative `struct kernel_symbol`s, sorted by name) at `at`, then
/// `__ksymtab_strings`.
fn write_exports(b: &mut Builder, at: u64, exports: &[(&str, u64)]) {
    let mut name_at = at + KSYM * exports.len() as u64;
    for (i, (name, value)) in exports.iter().enumerate() {
        let ks = at + KSYM * i as u64;
        b.w32(ks, value.wrapping_sub(ks) as i32 as u32);
        b.w32(ks + 4, name_at.wrapping_sub(ks + 4) as i32 as u32);
        b.w32(ks + 8, 0);
        b.w(name_at, name.as_bytes());
        b.w(name_at + name.len() as u64, &[0]);
        name_at += name.len() as u64 + 1;
    }
}
