//! The kernel's own symbol table (kallsyms), decoded from guest memory.
//!
//! VMCOREINFO gives the addresses of the tables (`SYMBOL(kallsyms_names)` and friends,
//! kernel/vmcore_info.c). The format, from kernel/kallsyms.c and scripts/kallsyms.c,
//! is the same in 6.1 and 6.12 for what a full decode needs:
//! - `kallsyms_names`: per symbol, a length (one byte; two when the high bit is set,
//!   "big" symbols) then that many token numbers. Expanding the tokens through
//!   `kallsyms_token_table` / `kallsyms_token_index` gives the type letter followed by
//!   the name.
//! - `kallsyms_offsets[]` (s32) and `kallsyms_relative_base`: with absolute per-CPU
//!   symbols (x86-64 SMP), a non-negative offset is the absolute value and a negative
//!   one means `relative_base - 1 - offset`; otherwise every offset is unsigned and
//!   relative. Which mode a kernel uses is not in VMCOREINFO; it is told apart by the
//!   data itself: only the absolute mode has negative offsets (kernel text lies far
//!   above the base, so the relative mode never needs the sign bit).
//! - Old kernels without CONFIG_KALLSYMS_BASE_RELATIVE have `kallsyms_addresses[]`.
//!
//! `kallsyms_seqs_of_names` (6.2+) only speeds up name lookups in the kernel; a full
//! decode does not need it.

use serde::{Deserialize, Serialize};

use crate::memory::{KernelMemory, MemError};
use crate::vmcoreinfo::VmcoreInfo;

/// More symbols than any kernel has (6.12 cloud: ~150k); a larger count is corruption.
pub const MAX_SYMBOLS: u32 = 4 << 20;
/// KSYM_NAME_LEN in 6.1+.
const MAX_NAME: usize = 512;
const NAMES_CHUNK: usize = 256 << 10;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum KallsymsError {
    #[error("VMCOREINFO has no SYMBOL({0}) (kernel without CONFIG_KALLSYMS, or older than 6.0?)")]
    MissingTable(&'static str),
    #[error("kallsyms table is corrupt: {0}")]
    Corrupt(String),
    #[error("reading kallsyms: {0}")]
    Mem(#[from] MemError),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Symbol {
    pub addr: u64,
    /// The type letter /proc/kallsyms shows (`T`, `t`, `D`, `A`, ...).
    pub kind: char,
    pub name: String,
}

impl Symbol {
    pub fn is_text(&self) -> bool {
        matches!(self.kind, 'T' | 't' | 'W' | 'w')
    }
}

/// Why a name did not resolve to one address.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("unknown symbol '{0}'")]
    Unknown(String),
    #[error("symbol '{name}' is ambiguous: {count} symbols have that name; say which with '{name},N' (N from 1 to {count}, in kallsyms order)")]
    Ambiguous { name: String, count: usize },
    #[error("symbol '{name},{pos}' does not exist: only {count} symbol(s) have that name")]
    NoSuchPosition {
        name: String,
        pos: u32,
        count: usize,
    },
}

/// Livepatch's `sympos` rule over the symbols called `name` (`all`, in table order): the
/// only one when `sympos` is absent (or 0), else the pos-th, from 1. The kernel's own
/// table and a module's both resolve by it.
pub fn pick<'a, T>(name: &str, sympos: Option<u32>, all: &'a [T]) -> Result<&'a T, ResolveError> {
    match (sympos, all.len()) {
        (_, 0) => Err(ResolveError::Unknown(name.to_string())),
        (None | Some(0), 1) => Ok(&all[0]),
        (None | Some(0), count) => Err(ResolveError::Ambiguous {
            name: name.to_string(),
            count,
        }),
        (Some(pos), count) => all
            .get(pos as usize - 1)
            .ok_or(ResolveError::NoSuchPosition {
                name: name.to_string(),
                pos,
                count,
            }),
    }
}

/// An address resolved to the symbol that contains it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Located {
    pub name: String,
    pub symbol_addr: u64,
    pub offset: u64,
    /// Distance to the next symbol with a higher address (what the kernel calls the size).
    pub size: Option<u64>,
}

impl Located {
    /// `name+0xoff/0xsize`, as the kernel's `%pS` prints.
    pub fn display(&self) -> String {
        match self.size {
            Some(size) => format!("{}+{:#x}/{:#x}", self.name, self.offset, size),
            None => format!("{}+{:#x}", self.name, self.offset),
        }
    }
}

/// One symbol as the table stores it: its name is a range of the table's one string
/// (16 bytes a symbol, where a `Symbol` with its own heap name takes about 70).
#[derive(Clone, Copy, Debug)]
struct Entry {
    addr: u64,
    name_at: u32,
    name_len: u16,
    kind: u8,
}

#[derive(Clone, Debug, Default)]
pub struct SymbolTable {
    /// In kallsyms order (by address, aliases in the order the kernel lists them).
    entries: Vec<Entry>,
    /// Every name, one after the other.
    names: String,
    /// Indices into `entries`, stably sorted by address.
    by_addr: Vec<u32>,
    /// The symbols of each name, in kallsyms order.
    by_name: NameIndex,
}

/// Which symbols have a name: a hash table of the first index of each name (open
/// addressing, 4 bytes a slot, at most two thirds full) and, per symbol, the next one of
/// the same name. Built in one pass: sorting 150,000 names (6.12) was most of decoding
/// kallsyms, and a map keyed by a copy of every name doubled the table's memory. The
/// hash is seeded per process, so names from guest memory cannot be chosen to collide;
/// a name many symbols share is one slot and a chain.
#[derive(Clone, Debug, Default)]
struct NameIndex {
    slots: Vec<u32>,
    /// Per symbol: the next symbol with its name, or [`NONE`].
    next: Vec<u32>,
    hasher: std::hash::RandomState,
}

/// No symbol: an empty slot, the end of a chain.
const NONE: u32 = u32::MAX;

impl NameIndex {
    /// The index of symbols `0..n`, where `name(i)` is the name of symbol `i`.
    fn build<'n>(n: usize, name: impl Fn(u32) -> &'n str) -> NameIndex {
        let hasher = std::hash::RandomState::new();
        let mut slots = vec![NONE; (n + n / 2).max(1).next_power_of_two()];
        let mut next = vec![NONE; n];
        // The last symbol of each slot's chain, while building.
        let mut last = vec![NONE; slots.len()];
        let mask = slots.len() - 1;
        for i in 0..n as u32 {
            let key = name(i);
            let mut at = std::hash::BuildHasher::hash_one(&hasher, key) as usize & mask;
            loop {
                match slots[at] {
                    NONE => {
                        (slots[at], last[at]) = (i, i);
                        break;
                    }
                    s if name(s) == key => {
                        next[last[at] as usize] = i;
                        last[at] = i;
                        break;
                    }
                    _ => at = (at + 1) & mask,
                }
            }
        }
        NameIndex {
            slots,
            next,
            hasher,
        }
    }

    /// The symbols named `key`, in kallsyms order.
    fn find<'n>(&self, key: &str, name: impl Fn(u32) -> &'n str) -> Vec<u32> {
        if self.slots.is_empty() {
            return Vec::new();
        }
        let mask = self.slots.len() - 1;
        let mut at = std::hash::BuildHasher::hash_one(&self.hasher, key) as usize & mask;
        // A slot is always empty (at most two thirds are full): the probe ends.
        let first = loop {
            match self.slots[at] {
                NONE => return Vec::new(),
                s if name(s) == key => break s,
                _ => at = (at + 1) & mask,
            }
        };
        let mut out = vec![first];
        let mut i = first;
        while let Some(&n) = self.next.get(i as usize).filter(|&&n| n != NONE) {
            out.push(n);
            i = n;
        }
        out
    }
}

impl SymbolTable {
    /// A table of `symbols`, in kallsyms order. Names longer than [`MAX_NAME`] are cut
    /// there (the kernel's own limit), type letters outside ASCII become `?`.
    pub fn new(symbols: Vec<Symbol>) -> Self {
        let mut b = TableBuilder::with_capacity(symbols.len());
        for s in &symbols {
            let kind = u8::try_from(s.kind)
                .ok()
                .filter(u8::is_ascii)
                .unwrap_or(b'?');
            b.push(s.addr, kind, s.name.as_bytes());
        }
        b.finish()
    }

    fn entry(&self, i: u32) -> &Entry {
        &self.entries[i as usize]
    }

    fn name_of(&self, e: &Entry) -> &str {
        let at = e.name_at as usize;
        &self.names[at..at + usize::from(e.name_len)]
    }

    fn symbol(&self, e: &Entry) -> Symbol {
        Symbol {
            addr: e.addr,
            kind: char::from(e.kind),
            name: self.name_of(e).to_string(),
        }
    }

    /// Decode the guest's kallsyms tables.
    pub fn read(mem: &KernelMemory, info: &VmcoreInfo) -> Result<SymbolTable, KallsymsError> {
        let table = |name: &'static str| info.symbol(name).ok_or(KallsymsError::MissingTable(name));
        let corrupt = |m: String| KallsymsError::Corrupt(m);

        let count = mem.u32(table("kallsyms_num_syms")?)?;
        if count == 0 || count > MAX_SYMBOLS {
            return Err(corrupt(format!("kallsyms_num_syms = {count}")));
        }
        let n = count as usize;
        let tokens = read_tokens(
            mem,
            table("kallsyms_token_table")?,
            table("kallsyms_token_index")?,
        )?;
        let addresses = read_addresses(mem, info, n)?;

        let mut names = NameStream::new(mem, table("kallsyms_names")?);
        let mut symbols = TableBuilder::with_capacity(n);
        let mut expanded = Vec::with_capacity(MAX_NAME);
        for (i, &addr) in addresses.iter().enumerate() {
            let mut len = usize::from(names.byte()?);
            if len & 0x80 != 0 {
                len = (len & 0x7f) | (usize::from(names.byte()?) << 7);
            }
            if len == 0 {
                return Err(corrupt(format!("symbol {i} has an empty name")));
            }
            expanded.clear();
            for _ in 0..len {
                let token = &tokens[usize::from(names.byte()?)];
                expanded.extend_from_slice(token);
                if expanded.len() > MAX_NAME + 1 {
                    return Err(corrupt(format!("symbol {i}: name longer than {MAX_NAME}")));
                }
            }
            let (&kind, name) = expanded
                .split_first()
                .ok_or_else(|| corrupt(format!("symbol {i} expands to nothing")))?;
            symbols.push(addr, kind, name);
        }
        Ok(symbols.finish())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every symbol, in kallsyms order (each one built as it is asked for).
    pub fn symbols(&self) -> impl ExactSizeIterator<Item = Symbol> + '_ {
        self.entries.iter().map(|e| self.symbol(e))
    }

    /// All symbols with this name, in kallsyms order.
    pub fn named(&self, name: &str) -> Vec<Symbol> {
        self.named_indices(name)
            .iter()
            .map(|&i| self.symbol(self.entry(i)))
            .collect()
    }

    /// The first symbol with this name (for the kernel's own well-known globals).
    pub fn addr(&self, name: &str) -> Option<u64> {
        self.named_indices(name)
            .first()
            .map(|&i| self.entry(i).addr)
    }

    /// The indices of `name`'s symbols, in kallsyms order.
    fn named_indices(&self, name: &str) -> Vec<u32> {
        self.by_name.find(name, |i| self.name_of(self.entry(i)))
    }

    /// Resolve `name` (must be unique) or `name,pos` (the pos-th symbol of that name,
    /// from 1, in kallsyms order: livepatch's `sympos`).
    pub fn resolve(&self, name: &str, sympos: Option<u32>) -> Result<Symbol, ResolveError> {
        let all = self.named_indices(name);
        pick(name, sympos, &all).map(|i| self.symbol(self.entry(*i)))
    }

    /// The symbol containing `addr`: the last one at or below it (the first of several
    /// aliases, as the kernel picks), with the distance to the next higher symbol.
    pub fn locate(&self, addr: u64) -> Option<Located> {
        let addr_of = |i: &u32| self.entry(*i).addr;
        let pos = self.by_addr.partition_point(|i| addr_of(i) <= addr);
        if pos == 0 {
            return None;
        }
        let start = addr_of(&self.by_addr[pos - 1]);
        let first = self.by_addr.partition_point(|i| addr_of(i) < start);
        let size = self.by_addr.get(pos).map(|i| addr_of(i) - start);
        Some(Located {
            name: self.name_of(self.entry(self.by_addr[first])).to_string(),
            symbol_addr: start,
            offset: addr - start,
            size,
        })
    }

    /// Like [`SymbolTable::locate`] for a return address, as the kernel's `%pB`: the
    /// call is the instruction before `addr`, so look up `addr - 1` (a call at the very
    /// end of a function must not name the next one) and report the offset of `addr`.
    pub fn locate_return(&self, addr: u64) -> Option<Located> {
        let mut l = self.locate(addr.checked_sub(1)?)?;
        l.offset += 1;
        Some(l)
    }

    /// Size of the function starting at `addr` (distance to the next higher symbol).
    pub fn size_at(&self, addr: u64) -> Option<u64> {
        let l = self.locate(addr)?;
        (l.offset == 0).then_some(l.size).flatten()
    }
}

/// Collects symbols into a [`SymbolTable`], names into its one string.
struct TableBuilder {
    entries: Vec<Entry>,
    names: String,
}

impl TableBuilder {
    fn with_capacity(n: usize) -> Self {
        TableBuilder {
            entries: Vec::with_capacity(n),
            names: String::new(),
        }
    }

    /// Add a symbol; invalid UTF-8 in its name is replaced, a name is cut at
    /// [`MAX_NAME`] bytes (at a character boundary).
    fn push(&mut self, addr: u64, kind: u8, name: &[u8]) {
        let name = String::from_utf8_lossy(name);
        let mut len = name.len().min(MAX_NAME);
        while !name.is_char_boundary(len) {
            len -= 1;
        }
        // At most MAX_SYMBOLS names of at most MAX_NAME bytes: 2 GiB, within u32.
        self.entries.push(Entry {
            addr,
            name_at: self.names.len() as u32,
            name_len: len as u16,
            kind,
        });
        self.names.push_str(&name[..len]);
    }

    fn finish(mut self) -> SymbolTable {
        self.names.shrink_to_fit();
        let entries = self.entries;
        let name = |i: u32| {
            let e = &entries[i as usize];
            &self.names[e.name_at as usize..e.name_at as usize + usize::from(e.name_len)]
        };
        let mut by_addr: Vec<u32> = (0..entries.len() as u32).collect();
        by_addr.sort_by_key(|&i| entries[i as usize].addr);
        let by_name = NameIndex::build(entries.len(), name);
        SymbolTable {
            entries,
            names: self.names,
            by_addr,
            by_name,
        }
    }
}

fn read_tokens(mem: &KernelMemory, table: u64, index: u64) -> Result<Vec<Vec<u8>>, KallsymsError> {
    let raw_index = mem.read_vec(index, 256 * 2)?;
    let starts: Vec<usize> = raw_index
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])))
        .collect();
    let last = starts.iter().copied().max().unwrap_or(0);
    // Tokens are short strings; read past the last start far enough for it to end.
    let raw = mem.read_vec(table, last + 256)?;
    starts
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let end = raw[s..].iter().position(|&b| b == 0).ok_or_else(|| {
                KallsymsError::Corrupt(format!("token {i} at offset {s} is not terminated"))
            })?;
            Ok(raw[s..s + end].to_vec())
        })
        .collect()
}

fn read_addresses(
    mem: &KernelMemory,
    info: &VmcoreInfo,
    n: usize,
) -> Result<Vec<u64>, KallsymsError> {
    if let (Some(offsets), Some(base)) = (
        info.symbol("kallsyms_offsets"),
        info.symbol("kallsyms_relative_base"),
    ) {
        let base = mem.u64(base)?;
        let raw = mem.read_vec(offsets, n * 4)?;
        let offsets: Vec<i32> = raw
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        return Ok(addresses_from_offsets(base, &offsets));
    }
    let addrs = info
        .symbol("kallsyms_addresses")
        .ok_or(KallsymsError::MissingTable("kallsyms_offsets"))?;
    let raw = mem.read_vec(addrs, n * 8)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect())
}

/// `kallsyms_sym_address()` for every entry, the per-CPU mode told apart by the data.
fn addresses_from_offsets(base: u64, offsets: &[i32]) -> Vec<u64> {
    let absolute_percpu = offsets.iter().any(|&o| o < 0);
    offsets
        .iter()
        .map(|&o| match (absolute_percpu, o >= 0) {
            (false, _) => base.wrapping_add(u64::from(o as u32)),
            (true, true) => o as u64,
            (true, false) => base.wrapping_sub(1).wrapping_sub(i64::from(o) as u64),
        })
        .collect()
}

/// Sequential reader of `kallsyms_names`, whose length is only known by decoding it:
/// reads chunk by chunk, and never more than the decode consumes plus one chunk.
struct NameStream<'a, 'g> {
    mem: &'a KernelMemory<'g>,
    next_va: u64,
    buf: Vec<u8>,
    at: usize,
}

impl<'a, 'g> NameStream<'a, 'g> {
    fn new(mem: &'a KernelMemory<'g>, va: u64) -> Self {
        NameStream {
            mem,
            next_va: va,
            buf: Vec::new(),
            at: 0,
        }
    }

    fn byte(&mut self) -> Result<u8, KallsymsError> {
        if self.at == self.buf.len() {
            // The table may end close to the end of a mapping: fall back to one page.
            let va = self.next_va;
            let until_page_end = (4096 - (va & 4095)) as usize;
            self.buf = match self.mem.read_vec(va, NAMES_CHUNK) {
                Ok(b) => b,
                Err(_) => self.mem.read_vec(va, until_page_end)?,
            };
            self.next_va = self.next_va.wrapping_add(self.buf.len() as u64);
            self.at = 0;
        }
        let b = self.buf[self.at];
        self.at += 1;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> SymbolTable {
        let s = |addr, kind, name: &str| Symbol {
            addr,
            kind,
            name: name.into(),
        };
        SymbolTable::new(vec![
            s(0x1000, 'T', "_stext"),
            s(0x1000, 'T', "first_func"),
            s(0x1040, 't', "helper"),
            s(0x1080, 'T', "second"),
            s(0x10c0, 't', "helper"),
            s(0x2000, 'T', "_etext"),
        ])
    }

    #[test]
    fn locate_picks_first_alias_and_next_higher_symbol_for_size() {
        let t = table();
        let l = t.locate(0x1010).unwrap();
        assert_eq!(
            (l.name.as_str(), l.offset, l.size),
            ("_stext", 0x10, Some(0x40))
        );
        assert_eq!(t.locate(0x1085).unwrap().display(), "second+0x5/0x40");
        assert_eq!(t.locate(0xfff), None);
        // A return address right after a call at the end of `helper` names `helper`.
        assert_eq!(
            t.locate_return(0x1080).unwrap().display(),
            "helper+0x40/0x40"
        );
        assert_eq!(t.size_at(0x1080), Some(0x40));
        assert_eq!(t.size_at(0x1081), None);
    }

    #[test]
    fn stores_16_bytes_a_symbol_and_gives_back_what_it_was_given() {
        assert_eq!(std::mem::size_of::<Entry>(), 16);
        let long = "x".repeat(MAX_NAME + 10);
        let t = SymbolTable::new(vec![
            Symbol {
                addr: 0x10,
                kind: 'T',
                name: "a".into(),
            },
            Symbol {
                addr: 0x20,
                kind: 'é',
                name: long,
            },
        ]);
        let all: Vec<Symbol> = t.symbols().collect();
        assert_eq!(
            all[0],
            Symbol {
                addr: 0x10,
                kind: 'T',
                name: "a".into()
            }
        );
        assert_eq!((all[1].kind, all[1].name.len()), ('?', MAX_NAME));
        assert_eq!(t.addr(&"x".repeat(MAX_NAME)), Some(0x20));
    }

    #[test]
    fn a_name_shared_by_many_symbols_is_one_chain_in_kallsyms_order() {
        // As a hostile guest could name every symbol: building stays one pass.
        let n = 200_000u64;
        let t = SymbolTable::new(
            (0..n)
                .map(|i| Symbol {
                    addr: 0x1000 + i,
                    kind: 't',
                    name: if i % 1000 == 7 {
                        "other".into()
                    } else {
                        "same".into()
                    },
                })
                .collect(),
        );
        let same = t.named("same");
        assert_eq!(same.len() as u64, n - n / 1000);
        assert!(
            same.windows(2).all(|w| w[0].addr < w[1].addr),
            "kallsyms order"
        );
        assert_eq!(t.resolve("other", Some(3)).unwrap().addr, 0x1000 + 2007);
        assert!(t.named("absent").is_empty());
        assert!(SymbolTable::default().named("same").is_empty());
        assert_eq!(SymbolTable::new(Vec::new()).addr("same"), None);
    }

    #[test]
    fn offsets_decode_in_both_per_cpu_modes() {
        let base = 0xffff_ffff_8000_0000;
        // Absolute per-CPU: a per-CPU symbol at 0x1000, text at base and base + 0x10.
        let abs = addresses_from_offsets(base, &[0x1000, -1, -0x11]);
        assert_eq!(abs, vec![0x1000, base, base + 0x10]);
        // Relative only: every offset unsigned from the base.
        let rel = addresses_from_offsets(base, &[0, 0x10, 0x7fff_0000]);
        assert_eq!(rel, vec![base, base + 0x10, base + 0x7fff_0000]);
    }

    #[test]
    fn resolve_follows_livepatch_sympos_rules() {
        let t = table();
        assert_eq!(t.resolve("second", None).unwrap().addr, 0x1080);
        assert!(matches!(
            t.resolve("helper", None),
            Err(ResolveError::Ambiguous { count: 2, .. })
        ));
        assert_eq!(t.resolve("helper", Some(2)).unwrap().addr, 0x10c0);
        assert!(matches!(
            t.resolve("helper", Some(3)),
            Err(ResolveError::NoSuchPosition { .. })
        ));
        assert!(matches!(
            t.resolve("nope", None),
            Err(ResolveError::Unknown(_))
        ));
    }
}
