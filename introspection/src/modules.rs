//! The guest's loaded kernel modules, read from the kernel's own module list: each
//! module's name, state, memory, symbols (its `mod_kallsyms`) and ORC table.
//!
//! Modules come and go while the guest runs, so nothing here is read at attach: a
//! [`ModuleList`] is one look at the list (cheap: a few fields per module), and a
//! module's symbols and ORC table are read only when asked for ([`Module::symbols`],
//! [`Module::orc`]). [`ModuleCode`] gives the unwinder module text with its ORC, so that
//! a task sleeping in a module unwinds as the kernel's own reliable unwinder would
//! unwind it, and names its frames `func+0xoff/0xsize [module]` as /proc/PID/stack does.
//!
//! Where the kernel keeps a module's memory changed in 6.4: up to 6.3 `core_layout` and
//! `init_layout` (`struct module_layout`), from 6.4 `mem[MOD_MEM_NUM_TYPES]` (`struct
//! module_memory`). Both are read from BTF ([`ModuleLayout`]). Guest memory is hostile
//! input: every walk is bounded and every count checked before anything is allocated.

use std::cell::OnceCell;

use serde::{Deserialize, Serialize};

use crate::btf::BtfError;
use crate::kallsyms::{Located, ResolveError};
use crate::kernel::{Kernel, Range};
use crate::layout::{ModuleLayout, ModuleMemLayout};
use crate::memory::{KernelMemory, MemError};
use crate::orc::{OrcEntry, OrcError, OrcTable};
use crate::stack::ExtraCode;

/// More modules than a kernel can load (Debian's cloud kernel ships about 1,100).
const MAX_MODULES: usize = 8192;
/// More symbols than any module has (the largest in-tree module has ~30,000).
const MAX_MODULE_SYMBOLS: u64 = 1 << 20;
/// Longest string table read for one module.
const MAX_STRTAB: u64 = 16 << 20;
/// KSYM_NAME_LEN: the longest symbol name the kernel prints.
const KSYM_NAME_LEN: u64 = 512;
/// `sizeof(Elf64_Sym)`: the ELF ABI's, not a kernel layout.
const ELF64_SYM: u64 = 24;
/// `MODULE_REF_BASE`: the reference a module holds on itself from its load.
const MODULE_REF_BASE: i64 = 1;
/// The taints a module can bring and their letters, in the kernel's `taint_flags`
/// order (kernel/panic.c, the entries with `module` true; the same in 6.1 and 6.12).
const MODULE_TAINT_LETTERS: [(u32, char); 9] = [
    (0, 'P'),  // PROPRIETARY_MODULE
    (1, 'F'),  // FORCED_MODULE
    (10, 'C'), // CRAP (staging)
    (12, 'O'), // OOT_MODULE
    (13, 'E'), // UNSIGNED_MODULE
    (15, 'K'), // LIVEPATCH
    (16, 'X'), // AUX
    (17, 'T'), // RANDSTRUCT
    (18, 'N'), // TEST
];
/// Lowest address of the kernel half of the address space.
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// The guest kernel's BTF lacks what the module list needs (a kernel built without
    /// modules, for one).
    #[error("this kernel's modules cannot be read: {0}")]
    Layout(#[from] BtfError),
    #[error("the kernel symbol 'modules' (the module list) is not in kallsyms")]
    NoList,
    #[error("reading the module list: {0}")]
    Mem(#[from] MemError),
    #[error("the module list is corrupt: {0}")]
    Corrupt(String),
    #[error("module {module}: its ORC table: {source}")]
    Orc {
        module: String,
        #[source]
        source: OrcError,
    },
}

/// `enum module_state`, as the guest's BTF numbers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleState {
    Live,
    Coming,
    Going,
    Unformed,
}

impl ModuleState {
    /// The word /proc/modules prints.
    pub fn proc_word(self) -> &'static str {
        match self {
            ModuleState::Live => "Live",
            ModuleState::Coming => "Loading",
            ModuleState::Going => "Unloading",
            ModuleState::Unformed => "Unformed",
        }
    }
}

/// The state `raw` means, as the guest's `enum module_state` numbers it.
fn state_of(l: &ModuleLayout, raw: u64) -> Option<ModuleState> {
    let i = l.states.iter().position(|&s| s == raw)?;
    Some(
        [
            ModuleState::Live,
            ModuleState::Coming,
            ModuleState::Going,
            ModuleState::Unformed,
        ][i],
    )
}

/// One loaded module, as the list showed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Module {
    pub name: String,
    /// Its `struct module`.
    pub addr: u64,
    pub state: ModuleState,
    /// Where /proc/modules says it is: the start of its core text.
    pub base: u64,
    /// What /proc/modules says its size is: all of its memory, init included.
    pub size: u64,
    /// Its code after init, and its init code until init ends.
    pub text: Range,
    pub init_text: Option<Range>,
    /// References held on it (`refcnt` less the one it starts with); `None` without
    /// CONFIG_MODULE_UNLOAD.
    pub refcount: Option<i64>,
    /// The modules that use it (in the kernel's order).
    pub users: Vec<String>,
    /// It has an init but no exit: it can never be unloaded.
    pub permanent: bool,
    /// The TAINT_* bits it brought (0 where the kernel has no `taints`).
    pub taints: u64,
    kallsyms: u64,
    syms: u64,
    num_syms: u64,
    /// `num_orcs`, `orc_unwind_ip`, `orc_unwind`.
    orc: Option<[u64; 3]>,
}

impl Module {
    /// True if `ip` is this module's code (core or init text).
    pub fn contains(&self, ip: u64) -> bool {
        self.text.contains(ip) || self.init_text.is_some_and(|r| r.contains(ip))
    }

    /// The module's line of /proc/modules (kernel/module/procfs.c, `m_show` and
    /// `print_unload_info`, and `module_flags` for a tainting module's flags).
    pub fn proc_line(&self) -> String {
        let mut used: String = self.users.iter().map(|u| format!("{u},")).collect();
        if self.permanent {
            used.push_str("[permanent],");
        }
        if used.is_empty() {
            used.push('-');
        }
        let refs = match self.refcount {
            Some(r) => format!("{r} {used}"),
            None => "- -".to_string(),
        };
        format!(
            "{} {} {refs} {} 0x{:016x}{}",
            self.name,
            self.size,
            self.state.proc_word(),
            self.base,
            self.flags()
        )
    }

    /// What `m_show` appends for a module with taints: ` (` its taint letters in
    /// `taint_flags` order, `-` while going or `+` while coming, `)`. Empty without
    /// taints.
    fn flags(&self) -> String {
        if self.taints == 0 {
            return String::new();
        }
        let mut flags: String = MODULE_TAINT_LETTERS
            .iter()
            .filter(|(bit, _)| self.taints & (1 << bit) != 0)
            .map(|&(_, letter)| letter)
            .collect();
        match self.state {
            ModuleState::Going => flags.push('-'),
            ModuleState::Coming => flags.push('+'),
            _ => {}
        }
        format!(" ({flags})")
    }

    /// Read one `struct module` at `addr`.
    fn read(
        mem: &KernelMemory,
        l: &ModuleLayout,
        addr: u64,
        users_left: &mut usize,
    ) -> Result<Module, ModuleError> {
        let raw_state = mem.uint(addr.wrapping_add(l.state), l.state_size)?;
        let state = state_of(l, raw_state)
            .ok_or_else(|| ModuleError::Corrupt(format!("state {raw_state} at {addr:#x}")))?;
        let name = mem.fixed_str(addr.wrapping_add(l.name), l.name_len.min(256) as usize)?;
        let (text, init_text, size) = read_memory(mem, l, addr)?;
        let refcount = match l.refcnt {
            Some(off) => Some(i64::from(mem.u32(addr.wrapping_add(off))? as i32) - MODULE_REF_BASE),
            None => None,
        };
        let orc = match l.orc {
            Some([n, ip, u]) => Some([
                u64::from(mem.u32(addr.wrapping_add(n))?),
                mem.u64(addr.wrapping_add(ip))?,
                mem.u64(addr.wrapping_add(u))?,
            ]),
            None => None,
        };
        let permanent = match l.exit_fn {
            Some(exit) => {
                mem.u64(addr.wrapping_add(l.init_fn))? != 0
                    && mem.u64(addr.wrapping_add(exit))? == 0
            }
            None => false,
        };
        let taints = match l.taints {
            Some(off) => mem.u64(addr.wrapping_add(off))?,
            None => 0,
        };
        Ok(Module {
            users: users(mem, l, addr, users_left)?,
            permanent,
            taints,
            name,
            addr,
            state,
            base: text.start,
            size,
            text,
            init_text,
            refcount,
            kallsyms: mem.u64(addr.wrapping_add(l.kallsyms))?,
            syms: mem.u64(addr.wrapping_add(l.syms))?,
            num_syms: u64::from(mem.u32(addr.wrapping_add(l.num_syms))?),
            orc,
        })
    }

    /// The module's symbols as its `mod_kallsyms` holds them now (all of them while it
    /// is coming, its core symbols once its init has run), each marked exported as
    /// /proc/kallsyms marks it.
    pub fn symbols(
        &self,
        mem: &KernelMemory,
        kernel: &Kernel,
    ) -> Result<ModuleSymbols, ModuleError> {
        let l = kernel.layout.modules.as_ref().map_err(|e| e.clone())?;
        let corrupt = |m: String| ModuleError::Corrupt(format!("module {}: {m}", self.name));
        let k = self.kallsyms;
        let symtab = mem.u64(k.wrapping_add(l.symtab))?;
        let count = u64::from(mem.u32(k.wrapping_add(l.num_symtab))?);
        let strtab = mem.u64(k.wrapping_add(l.strtab))?;
        let typetab = mem.u64(k.wrapping_add(l.typetab))?;
        if count > MAX_MODULE_SYMBOLS {
            return Err(corrupt(format!("{count} symbols")));
        }
        let raw = mem.read_vec(symtab, (count * ELF64_SYM) as usize)?;
        let types = mem.read_vec(typetab, count as usize)?;
        let entries: Vec<ElfSym> = raw
            .chunks_exact(ELF64_SYM as usize)
            .map(ElfSym::of)
            .collect();
        let strings_len =
            entries.iter().map(|e| u64::from(e.name)).max().unwrap_or(0) + KSYM_NAME_LEN;
        if strings_len > MAX_STRTAB {
            return Err(corrupt(format!(
                "a name {strings_len} bytes into its string table"
            )));
        }
        let strings = read_some(mem, strtab, strings_len as usize)?;
        let exports = self.exports(mem, l)?;
        let symbols = entries
            .iter()
            .zip(&types)
            .map(|(e, &t)| {
                let name = c_str(&strings, e.name as usize);
                let exported = exports.binary_search(&(name.clone(), e.value)).is_ok();
                ModuleSymbol {
                    addr: e.value,
                    kind: char::from(t),
                    name,
                    exported,
                    undefined: e.shndx == 0,
                }
            })
            .collect();
        Ok(ModuleSymbols {
            module: self.name.clone(),
            symbols,
            text: self.text,
            init_text: self.init_text,
        })
    }

    /// The module's exported symbols, (name, address), sorted: what the kernel's
    /// `is_exported` searches.
    fn exports(
        &self,
        mem: &KernelMemory,
        l: &ModuleLayout,
    ) -> Result<Vec<(String, u64)>, ModuleError> {
        if self.num_syms > MAX_MODULE_SYMBOLS || l.ksym_size == 0 {
            return Err(ModuleError::Corrupt(format!(
                "module {}: {} exports",
                self.name, self.num_syms
            )));
        }
        let raw = mem.read_vec(self.syms, (self.num_syms * l.ksym_size) as usize)?;
        let mut out = Vec::with_capacity(self.num_syms as usize);
        for (i, ks) in raw.chunks_exact(l.ksym_size as usize).enumerate() {
            let at = self.syms.wrapping_add(i as u64 * l.ksym_size);
            let ptr = |off: u64| -> Option<u64> {
                let o = off as usize;
                if l.ksym_relative {
                    let rel = i32::from_le_bytes(ks.get(o..o + 4)?.try_into().ok()?);
                    Some(at.wrapping_add(off).wrapping_add(i64::from(rel) as u64))
                } else {
                    Some(u64::from_le_bytes(ks.get(o..o + 8)?.try_into().ok()?))
                }
            };
            let (Some(value), Some(name_at)) = (ptr(l.ksym_value), ptr(l.ksym_name)) else {
                continue;
            };
            let name = read_c_str(mem, name_at);
            out.push((name, value));
        }
        out.sort();
        Ok(out)
    }

    /// The module's ORC table (`None`: it has none, and its frames cannot unwind
    /// reliably).
    pub fn orc(
        &self,
        mem: &KernelMemory,
        kernel: &Kernel,
    ) -> Result<Option<OrcTable>, ModuleError> {
        let Some([count, ips, entries]) = self.orc else {
            return Ok(None);
        };
        if count == 0 || ips == 0 || entries == 0 {
            return Ok(None);
        }
        OrcTable::read_relative(mem, kernel.orc.format().clone(), ips, entries, count)
            .map(Some)
            .map_err(|source| ModuleError::Orc {
                module: self.name.clone(),
                source,
            })
    }
}

/// The names of the modules that use the module at `addr` (its `source_list`), counted
/// against `left`: what the whole list walk may still read (a kernel has at most one
/// use per pair of modules it loaded; a list that claims more is corrupt).
fn users(
    mem: &KernelMemory,
    l: &ModuleLayout,
    addr: u64,
    left: &mut usize,
) -> Result<Vec<String>, ModuleError> {
    let Some([list, link, source]) = l.users else {
        return Ok(Vec::new());
    };
    let head = addr.wrapping_add(list);
    let mut out = Vec::new();
    let mut next = mem.u64(head)?;
    while next != head {
        if *left == 0 || next < KERNEL_HALF {
            return Err(ModuleError::Corrupt(format!(
                "a user link {next:#x} of {addr:#x}"
            )));
        }
        *left -= 1;
        let user = mem.u64(next.wrapping_sub(link).wrapping_add(source))?;
        out.push(mem.fixed_str(user.wrapping_add(l.name), l.name_len.min(256) as usize)?);
        next = mem.u64(next)?;
    }
    Ok(out)
}

/// A module's core text, init text and total size.
fn read_memory(
    mem: &KernelMemory,
    l: &ModuleLayout,
    addr: u64,
) -> Result<(Range, Option<Range>, u64), ModuleError> {
    let range = |base: u64, size: u64| Range {
        start: base,
        end: base.saturating_add(size),
    };
    match &l.mem {
        ModuleMemLayout::Layouts {
            core,
            init,
            data,
            base,
            size,
            text_size,
        } => {
            let part = |at: u64| -> Result<(u64, u64, u64), MemError> {
                Ok((
                    mem.u64(addr.wrapping_add(at).wrapping_add(*base))?,
                    u64::from(mem.u32(addr.wrapping_add(at).wrapping_add(*size))?),
                    u64::from(mem.u32(addr.wrapping_add(at).wrapping_add(*text_size))?),
                ))
            };
            let (core_base, core_size, core_text) = part(*core)?;
            let (init_base, init_size, init_text) = part(*init)?;
            let data_size = match data {
                Some(d) => part(*d)?.1,
                None => 0,
            };
            let init = (init_base != 0 && init_text != 0).then(|| range(init_base, init_text));
            Ok((
                range(core_base, core_text),
                init,
                core_size + init_size + data_size,
            ))
        }
        ModuleMemLayout::Mem {
            array,
            stride,
            base,
            size,
            types,
            text,
            init_text,
        } => {
            if *types > 16 {
                return Err(ModuleError::Corrupt(format!("{types} memory types")));
            }
            let part = |t: u64| -> Result<(u64, u64), MemError> {
                let at = addr
                    .wrapping_add(*array)
                    .wrapping_add(t.wrapping_mul(*stride));
                Ok((
                    mem.u64(at.wrapping_add(*base))?,
                    u64::from(mem.u32(at.wrapping_add(*size))?),
                ))
            };
            let mut total = 0;
            for t in 0..*types {
                total += part(t)?.1;
            }
            let (tb, ts) = part(*text)?;
            let (ib, is) = part(*init_text)?;
            let init = (ib != 0 && is != 0).then(|| range(ib, is));
            Ok((range(tb, ts), init, total))
        }
    }
}

/// One `Elf64_Sym`, the fields kallsyms uses.
struct ElfSym {
    name: u32,
    shndx: u16,
    value: u64,
}

impl ElfSym {
    fn of(b: &[u8]) -> ElfSym {
        let u = |r: std::ops::Range<usize>| b.get(r).unwrap_or_default();
        ElfSym {
            name: u32::from_le_bytes(u(0..4).try_into().unwrap_or_default()),
            shndx: u16::from_le_bytes(u(6..8).try_into().unwrap_or_default()),
            value: u64::from_le_bytes(u(8..16).try_into().unwrap_or_default()),
        }
    }
}

/// Up to `len` bytes at `va`, fewer where the mapping ends (a string table's last
/// names need not be followed by KSYM_NAME_LEN readable bytes).
fn read_some(mem: &KernelMemory, va: u64, len: usize) -> Result<Vec<u8>, MemError> {
    match mem.read_vec(va, len) {
        Ok(v) => Ok(v),
        Err(e) => {
            // Page by page, up to the first page that does not read.
            let mut out = Vec::new();
            let mut at = va;
            while out.len() < len {
                let chunk = (4096 - (at % 4096) as usize).min(len - out.len());
                let Ok(part) = mem.read_vec(at, chunk) else {
                    break;
                };
                out.extend_from_slice(&part);
                match at.checked_add(chunk as u64) {
                    Some(next) => at = next,
                    None => break,
                }
            }
            if out.is_empty() {
                return Err(e);
            }
            Ok(out)
        }
    }
}

/// The NUL-terminated string at `va` (at most KSYM_NAME_LEN bytes; empty if unreadable),
/// read only as far as its memory is mapped.
fn read_c_str(mem: &KernelMemory, va: u64) -> String {
    read_some(mem, va, KSYM_NAME_LEN as usize)
        .map(|b| c_str(&b, 0))
        .unwrap_or_default()
}

/// The NUL-terminated string at `at` in `table` (lossy, at most KSYM_NAME_LEN bytes).
fn c_str(table: &[u8], at: usize) -> String {
    let Some(rest) = table.get(at..) else {
        return String::new();
    };
    let rest = &rest[..rest.len().min(KSYM_NAME_LEN as usize)];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end]).into_owned()
}

/// One symbol of a module's `mod_kallsyms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleSymbol {
    pub addr: u64,
    /// Its type letter as the module's `typetab` holds it (`t`, `d`, ...).
    pub kind: char,
    pub name: String,
    /// In the module's export table: /proc/kallsyms prints its type in upper case.
    pub exported: bool,
    /// `SHN_UNDEF` (only while the module is coming).
    pub undefined: bool,
}

impl ModuleSymbol {
    /// The type letter /proc/kallsyms prints: upper case for an exported symbol.
    pub fn proc_kind(&self) -> char {
        if self.exported {
            self.kind.to_ascii_uppercase()
        } else {
            self.kind.to_ascii_lowercase()
        }
    }
}

/// A module's symbols, in its table's order (the order /proc/kallsyms lists them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleSymbols {
    pub module: String,
    pub symbols: Vec<ModuleSymbol>,
    text: Range,
    init_text: Option<Range>,
}

impl ModuleSymbols {
    /// The symbol at or below `addr` and the distance to the next one, as the kernel's
    /// `find_kallsyms_symbol` picks them: every named, defined symbol counts (mapping
    /// symbols do not), and the last one in the text ends where the text ends.
    pub fn locate(&self, addr: u64) -> Option<Located> {
        let init = self.init_text.filter(|r| r.contains(addr));
        let mut next = init.unwrap_or(self.text).end;
        let mut best: Option<&ModuleSymbol> = None;
        for s in self.symbols.iter().skip(1) {
            if s.undefined || s.name.is_empty() || is_mapping_symbol(&s.name) {
                continue;
            }
            if s.addr <= addr && best.is_none_or(|b| s.addr > b.addr) {
                best = Some(s);
            }
            if s.addr > addr && s.addr < next {
                next = s.addr;
            }
        }
        let b = best.filter(|b| b.addr != 0)?;
        Some(Located {
            name: b.name.clone(),
            symbol_addr: b.addr,
            offset: addr - b.addr,
            size: Some(next.saturating_sub(b.addr)),
        })
    }

    /// As [`ModuleSymbols::locate`] for a return address: the function that contains
    /// `addr - 1`, with the offset of `addr` (the kernel's `%pB`).
    pub fn locate_return(&self, addr: u64) -> Option<Located> {
        let mut l = self.locate(addr.checked_sub(1)?)?;
        l.offset += 1;
        Some(l)
    }

    /// `name` (which must be unique in the module) or `name,sympos` (sympos counts
    /// within the module, as livepatch's does within an object).
    pub fn resolve(&self, name: &str, sympos: Option<u32>) -> Result<&ModuleSymbol, ResolveError> {
        crate::kallsyms::pick(name, sympos, &self.named(name)).copied()
    }

    /// Every symbol called `name` (defined ones), in table order.
    pub fn named(&self, name: &str) -> Vec<&ModuleSymbol> {
        self.symbols
            .iter()
            .filter(|s| s.name == name && !s.undefined)
            .collect()
    }
}

/// The kernel's `is_mapping_symbol` (kernel/module/kallsyms.c): assembler local labels
/// that name no function.
fn is_mapping_symbol(name: &str) -> bool {
    let b = name.as_bytes();
    match b {
        [b'.', b'L', ..] | [b'L', b'0', ..] => true,
        [b'$', c, rest @ ..] => {
            matches!(c, b'a' | b'd' | b't' | b'x') && (rest.is_empty() || rest[0] == b'.')
        }
        _ => false,
    }
}

/// One look at the guest's module list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleList {
    /// In list order (newest first), unformed modules included.
    pub modules: Vec<Module>,
}

impl ModuleList {
    /// Walk the list (`LIST_HEAD(modules)`), at most [`MAX_MODULES`] entries, every
    /// link checked to stay in kernel memory.
    pub fn read(mem: &KernelMemory, kernel: &Kernel) -> Result<ModuleList, ModuleError> {
        let l = kernel.layout.modules.as_ref().map_err(|e| e.clone())?;
        let head = list_head(kernel)?;
        let mut modules = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut users_left = MAX_MODULES;
        let mut next = mem.u64(head)?;
        while next != head {
            if modules.len() >= MAX_MODULES || next < KERNEL_HALF {
                return Err(ModuleError::Corrupt(format!(
                    "link {next:#x} after {} modules",
                    modules.len()
                )));
            }
            if !seen.insert(next) {
                return Err(ModuleError::Corrupt(format!(
                    "link {next:#x} reached twice (a cycle)"
                )));
            }
            let addr = next.wrapping_sub(l.list);
            modules.push(Module::read(mem, l, addr, &mut users_left)?);
            next = mem.u64(next)?;
        }
        Ok(ModuleList { modules })
    }

    /// The module whose code `ip` is in (not one still unformed).
    pub fn containing(&self, ip: u64) -> Option<&Module> {
        self.index_of(ip).map(|i| &self.modules[i])
    }

    fn index_of(&self, ip: u64) -> Option<usize> {
        self.modules
            .iter()
            .position(|m| m.state != ModuleState::Unformed && m.contains(ip))
    }

    /// The module called `name`.
    pub fn named(&self, name: &str) -> Option<&Module> {
        self.modules.iter().find(|m| m.name == name)
    }
}

/// The address of `modules`, the list head (a data symbol: a function of that name would
/// not be it).
fn list_head(kernel: &Kernel) -> Result<u64, ModuleError> {
    kernel
        .symbols
        .named("modules")
        .into_iter()
        .find(|s| !s.is_text())
        .map(|s| s.addr)
        .ok_or(ModuleError::NoList)
}

/// Module code as the unwinder sees it: each module's text, unwound with its own ORC
/// table, its frames named from its own symbols. Nothing is read until an address
/// outside the kernel's own text needs it: then the module list, and the tables of the
/// module that address is in. A stack entirely in the kernel's text (most are) costs
/// nothing.
pub struct ModuleCode<'k, 'g> {
    mem: KernelMemory<'g>,
    kernel: &'k Kernel,
    list: OnceCell<ModuleList>,
    tables: OnceCell<Vec<OnceCell<ModuleTables>>>,
}

struct ModuleTables {
    symbols: Option<ModuleSymbols>,
    orc: Option<OrcTable>,
}

impl<'k, 'g> ModuleCode<'k, 'g> {
    /// The modules of the guest `mem` shows, read when first needed. A list that cannot
    /// be read gives no module code: every address in a module is then unknown text,
    /// and a trace through one is unreliable (never wrongly reliable).
    pub fn new(kernel: &'k Kernel, mem: KernelMemory<'g>) -> Self {
        ModuleCode {
            mem,
            kernel,
            list: OnceCell::new(),
            tables: OnceCell::new(),
        }
    }

    /// The module list, read now if it was not yet.
    pub fn list(&self) -> &ModuleList {
        self.list.get_or_init(|| {
            ModuleList::read(&self.mem, self.kernel).unwrap_or(ModuleList {
                modules: Vec::new(),
            })
        })
    }

    fn tables(&self, ip: u64) -> Option<(&Module, &ModuleTables)> {
        let list = self.list();
        let i = list.index_of(ip)?;
        let m = &list.modules[i];
        let cells = self
            .tables
            .get_or_init(|| list.modules.iter().map(|_| OnceCell::new()).collect());
        let t = cells.get(i)?.get_or_init(|| ModuleTables {
            symbols: m.symbols(&self.mem, self.kernel).ok(),
            orc: m.orc(&self.mem, self.kernel).ok().flatten(),
        });
        Some((m, t))
    }
}

impl ExtraCode for ModuleCode<'_, '_> {
    fn contains(&self, ip: u64) -> bool {
        self.list().containing(ip).is_some()
    }

    fn unwind_entry(&self, ip: u64, _interrupted: bool) -> Option<OrcEntry> {
        self.tables(ip)?.1.orc.as_ref()?.find(ip)
    }

    fn describe(&self, ip: u64, interrupted: bool) -> Option<String> {
        let (m, t) = self.tables(ip)?;
        let symbols = t.symbols.as_ref()?;
        let l = if interrupted {
            symbols.locate(ip)
        } else {
            symbols.locate_return(ip)
        }?;
        Some(format!("{} [{}]", l.display(), m.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_symbols_are_the_kernels() {
        for m in [".L123", "L0", "$x", "$d.1", "$a"] {
            assert!(is_mapping_symbol(m), "{m}");
        }
        for n in ["tun_do_read", "$xy", "L1", "", "$"] {
            assert!(!is_mapping_symbol(n), "{n}");
        }
    }

    #[test]
    fn names_stop_at_nul_and_never_read_past_the_table() {
        let t = b"\0tun\0read\0";
        assert_eq!(c_str(t, 1), "tun");
        assert_eq!(c_str(t, 5), "read");
        assert_eq!(c_str(t, 99), "");
    }
}
