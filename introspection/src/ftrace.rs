//! The guest's own ftrace bookkeeping, read so that lpvmm can share function entries
//! with the guest's function tracer and kprobes.
//!
//! Every function lpvmm redirects starts with the 5-byte NOP that ftrace owns. ftrace
//! keeps one `struct dyn_ftrace` per such site (pages of sorted records from
//! `ftrace_pages_start`) and turns the NOP into a call whenever an enabled
//! `struct ftrace_ops` on `ftrace_ops_list` covers it; the low bits of the record's
//! `flags` count those ops. A site lpvmm has made a jump must be hidden from ftrace
//! the way the kernel hides a record that is not ready to be touched
//! (`FTRACE_FL_DISABLED`: every ftrace loop that updates code or reference counts skips
//! such a record), and given back only while no enabled ops covers it, so that the
//! count ftrace finds (0) matches the NOP it finds.
//!
//! This module only reads. Every offset and flag comes from the guest's BTF; every
//! pointer is guest data, so each walk is bounded and a bad value is an error.

use crate::btf::{Btf, BtfError};
use crate::kallsyms::SymbolTable;
use crate::memory::{KernelMemory, MemError};

/// More ftrace pages, records in one page, ops or hash buckets than any kernel has.
const MAX_PAGES: usize = 1 << 16;
const MAX_RECORDS_PER_PAGE: u64 = 1 << 22;
const MAX_OPS: usize = 4096;
const MAX_HASH_BITS: u64 = 16;
/// `struct mutex.owner`: the low bits are flags (MUTEX_FLAGS), the rest the owner.
const MUTEX_FLAG_BITS: u64 = 0x7;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum FtraceError {
    #[error("the guest's ftrace: {0}")]
    Btf(#[from] BtfError),
    #[error("the guest's ftrace: BTF has no enum constant {0}")]
    NoConstant(&'static str),
    #[error("the guest's ftrace: kernel symbol '{0}' not found")]
    NoSymbol(&'static str),
    #[error("the guest's ftrace: reading {what}: {source}")]
    Mem {
        what: &'static str,
        #[source]
        source: MemError,
    },
    #[error("the guest's ftrace: {0}")]
    Corrupt(String),
}

/// A field's offset and size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Scalar {
    offset: u64,
    size: u64,
}

/// Where ftrace keeps its records and ops in this kernel, and what its flags mean.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FtraceLayout {
    pages_start: u64,
    ops_list: u64,
    list_end: u64,
    lock: u64,
    mutex_owner: u64,
    page_next: u64,
    page_records: u64,
    page_index: Scalar,
    record_size: u64,
    record_ip: u64,
    record_flags: u64,
    ops_next: u64,
    ops_flags: Scalar,
    ops_func: u64,
    ops_func_hash: u64,
    filter_hash: u64,
    notrace_hash: u64,
    hash_bits: Scalar,
    hash_buckets: u64,
    hash_count: Scalar,
    entry_ip: u64,
    entry_hlist: u64,
    node_next: u64,
    /// `FTRACE_FL_DISABLED`.
    pub disabled: u64,
    /// The reference count's bits: those below the lowest `FTRACE_FL_*` flag.
    pub ref_mask: u64,
    ops_enabled: u64,
}

/// One `struct dyn_ftrace`: where its `flags` are, and their value when read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FtraceRecord {
    pub ip: u64,
    pub flags_va: u64,
    pub flags: u64,
}

/// An enabled `ftrace_ops` whose filter covers a function: a user of its site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FtraceUser {
    pub ops: u64,
    /// The ops' callback (`function_trace_call`, `kprobe_ftrace_handler`, ...).
    pub func: u64,
}

/// What an ftrace hash says about one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HashHas {
    /// No entries: as a filter, every function; as notrace, none.
    Empty,
    Contains,
    Lacks,
}

impl FtraceLayout {
    /// `None` if the kernel has no dynamic ftrace (no `ftrace_pages_start`).
    pub fn from_kernel(symbols: &SymbolTable, btf: &Btf) -> Result<Option<Self>, FtraceError> {
        let Some(pages_start) = symbols.addr("ftrace_pages_start") else {
            return Ok(None);
        };
        let sym = |n: &'static str| symbols.addr(n).ok_or(FtraceError::NoSymbol(n));
        let off = |s: &str, f: &str| btf.field(s, f).map(|f| f.offset());
        let scalar = |s: &str, f: &str| {
            btf.field(s, f).map(|f| Scalar {
                offset: f.offset(),
                size: f.size,
            })
        };
        let constant = |n: &'static str| btf.enumerator(n).ok_or(FtraceError::NoConstant(n));
        // One look-up of the record flags' enum (each scans all of BTF's enumerators).
        let record_flags = btf
            .enum_of("FTRACE_FL_DISABLED")
            .ok_or(FtraceError::NoConstant("FTRACE_FL_DISABLED"))?;
        let flag = |n: &str| record_flags.iter().find(|(f, _)| f == n).map(|(_, v)| *v);
        let disabled =
            flag("FTRACE_FL_DISABLED").ok_or(FtraceError::NoConstant("FTRACE_FL_DISABLED"))?;
        let lowest_flag = record_flags
            .iter()
            .filter(|(n, v)| n.starts_with("FTRACE_FL_") && *v != 0)
            .map(|(_, v)| *v)
            .min()
            .unwrap_or(disabled);
        let mutex_owner = off("mutex", "owner").or_else(|_| off("mutex", "rtmutex.owner"))?;
        Ok(Some(FtraceLayout {
            pages_start,
            ops_list: sym("ftrace_ops_list")?,
            list_end: sym("ftrace_list_end")?,
            lock: sym("ftrace_lock")?,
            mutex_owner,
            page_next: off("ftrace_page", "next")?,
            page_records: off("ftrace_page", "records")?,
            page_index: scalar("ftrace_page", "index")?,
            record_size: btf.struct_size("dyn_ftrace")?,
            record_ip: off("dyn_ftrace", "ip")?,
            record_flags: off("dyn_ftrace", "flags")?,
            ops_next: off("ftrace_ops", "next")?,
            ops_flags: scalar("ftrace_ops", "flags")?,
            ops_func: off("ftrace_ops", "func")?,
            ops_func_hash: off("ftrace_ops", "func_hash")?,
            filter_hash: off("ftrace_ops_hash", "filter_hash")?,
            notrace_hash: off("ftrace_ops_hash", "notrace_hash")?,
            hash_bits: scalar("ftrace_hash", "size_bits")?,
            hash_buckets: off("ftrace_hash", "buckets")?,
            hash_count: scalar("ftrace_hash", "count")?,
            entry_ip: off("ftrace_func_entry", "ip")?,
            entry_hlist: off("ftrace_func_entry", "hlist")?,
            node_next: off("hlist_node", "next")?,
            disabled,
            ref_mask: lowest_flag.saturating_sub(1),
            ops_enabled: constant("FTRACE_OPS_FL_ENABLED")?,
        }))
    }

    /// How many ftrace ops the record counts as using its site.
    pub fn refs(&self, r: &FtraceRecord) -> u64 {
        r.flags & self.ref_mask
    }

    pub fn is_disabled(&self, r: &FtraceRecord) -> bool {
        r.flags & self.disabled != 0
    }

    /// The task holding `ftrace_lock` (ftrace is changing code or counts), or `None`.
    pub fn lock_owner(&self, mem: &KernelMemory) -> Result<Option<u64>, FtraceError> {
        let owner = mem
            .u64(self.lock.wrapping_add(self.mutex_owner))
            .map_err(mem_err("ftrace_lock"))?;
        Ok(Some(owner & !MUTEX_FLAG_BITS).filter(|&o| o != 0))
    }

    /// The record of the fentry site at `ip`, if ftrace has one.
    pub fn record(&self, mem: &KernelMemory, ip: u64) -> Result<Option<FtraceRecord>, FtraceError> {
        let mut page = mem
            .u64(self.pages_start)
            .map_err(mem_err("ftrace_pages_start"))?;
        for _ in 0..MAX_PAGES {
            if page == 0 {
                return Ok(None);
            }
            let read = |off: u64, size: u64| {
                mem.uint(page.wrapping_add(off), size)
                    .map_err(mem_err("an ftrace page"))
            };
            let records = read(self.page_records, 8)?;
            let index = read(self.page_index.offset, self.page_index.size)?;
            if index > MAX_RECORDS_PER_PAGE {
                return Err(FtraceError::Corrupt(format!(
                    "ftrace page at {page:#x} claims {index} records"
                )));
            }
            if let Some(r) = self.search_page(mem, records, index, ip)? {
                return Ok(Some(r));
            }
            page = read(self.page_next, 8)?;
        }
        Err(FtraceError::Corrupt(format!(
            "more than {MAX_PAGES} ftrace pages (a loop?)"
        )))
    }

    /// The address of record `i` of a page whose records start at `records`.
    fn record_at(&self, records: u64, i: u64) -> u64 {
        records.wrapping_add(i.wrapping_mul(self.record_size))
    }

    /// Binary search of one page's sorted records, as the kernel's `lookup_rec` does.
    fn search_page(
        &self,
        mem: &KernelMemory,
        records: u64,
        index: u64,
        ip: u64,
    ) -> Result<Option<FtraceRecord>, FtraceError> {
        let rec_ip = |i: u64| {
            mem.u64(self.record_at(records, i).wrapping_add(self.record_ip))
                .map_err(mem_err("an ftrace record"))
        };
        if index == 0 || ip < rec_ip(0)? || ip > rec_ip(index - 1)? {
            return Ok(None);
        }
        let (mut lo, mut hi) = (0, index);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let at = rec_ip(mid)?;
            if at == ip {
                let flags_va = self.record_at(records, mid).wrapping_add(self.record_flags);
                let flags = mem.u64(flags_va).map_err(mem_err("an ftrace record"))?;
                return Ok(Some(FtraceRecord {
                    ip,
                    flags_va,
                    flags,
                }));
            }
            if at < ip {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(None)
    }

    /// Every enabled ftrace ops that covers `ip`, as the kernel's `ops_references_ip`
    /// decides: its filter is empty or holds `ip`, and its notrace hash does not.
    pub fn users(&self, mem: &KernelMemory, ip: u64) -> Result<Vec<FtraceUser>, FtraceError> {
        let mut users = Vec::new();
        let mut ops = mem.u64(self.ops_list).map_err(mem_err("ftrace_ops_list"))?;
        for _ in 0..MAX_OPS {
            if ops == self.list_end || ops == 0 {
                return Ok(users);
            }
            let flags = mem
                .uint(ops.wrapping_add(self.ops_flags.offset), self.ops_flags.size)
                .map_err(mem_err("an ftrace_ops"))?;
            if flags & self.ops_enabled != 0 && self.covers(mem, ops, ip)? {
                let func = mem
                    .u64(ops.wrapping_add(self.ops_func))
                    .map_err(mem_err("an ftrace_ops"))?;
                users.push(FtraceUser { ops, func });
            }
            ops = mem
                .u64(ops.wrapping_add(self.ops_next))
                .map_err(mem_err("an ftrace_ops"))?;
        }
        Err(FtraceError::Corrupt(format!(
            "more than {MAX_OPS} ftrace_ops on ftrace_ops_list (a loop?)"
        )))
    }

    fn covers(&self, mem: &KernelMemory, ops: u64, ip: u64) -> Result<bool, FtraceError> {
        let hashes = mem
            .u64(ops.wrapping_add(self.ops_func_hash))
            .map_err(mem_err("an ftrace_ops"))?;
        if hashes == 0 {
            return Ok(true);
        }
        let hash = |off: u64| {
            mem.u64(hashes.wrapping_add(off))
                .map_err(mem_err("an ftrace_ops_hash"))
        };
        let filter = self.lookup(mem, hash(self.filter_hash)?, ip)?;
        let notrace = self.lookup(mem, hash(self.notrace_hash)?, ip)?;
        Ok(filter != HashHas::Lacks && notrace != HashHas::Contains)
    }

    /// Whether `struct ftrace_hash` at `hash` holds `ip`. Every bucket is walked (the
    /// kernel's hash function is not relied on), each chain bounded by the count.
    fn lookup(&self, mem: &KernelMemory, hash: u64, ip: u64) -> Result<HashHas, FtraceError> {
        if hash == 0 {
            return Ok(HashHas::Empty);
        }
        let read = |off: u64, size: u64| {
            mem.uint(hash.wrapping_add(off), size)
                .map_err(mem_err("an ftrace_hash"))
        };
        let count = read(self.hash_count.offset, self.hash_count.size)?;
        if count == 0 {
            return Ok(HashHas::Empty);
        }
        let bits = read(self.hash_bits.offset, self.hash_bits.size)?;
        if bits > MAX_HASH_BITS || count > 1 << 24 {
            return Err(FtraceError::Corrupt(format!(
                "ftrace_hash at {hash:#x}: {bits} size bits, {count} entries"
            )));
        }
        let buckets = read(self.hash_buckets, 8)?;
        let heads = mem
            .read_vec(buckets, 8 << bits)
            .map_err(mem_err("ftrace_hash buckets"))?;
        let mut seen = 0u64;
        for head in heads.chunks_exact(8) {
            let mut node = u64::from_le_bytes(head.try_into().expect("8 bytes"));
            while node != 0 {
                seen += 1;
                if seen > count {
                    return Err(FtraceError::Corrupt(format!(
                        "ftrace_hash at {hash:#x} has more entries than its count {count}"
                    )));
                }
                let entry = node.wrapping_sub(self.entry_hlist);
                let at = mem
                    .u64(entry.wrapping_add(self.entry_ip))
                    .map_err(mem_err("an ftrace_func_entry"))?;
                if at == ip {
                    return Ok(HashHas::Contains);
                }
                node = mem
                    .u64(node.wrapping_add(self.node_next))
                    .map_err(mem_err("an ftrace_func_entry"))?;
            }
        }
        Ok(HashHas::Lacks)
    }
}

fn mem_err(what: &'static str) -> impl Fn(MemError) -> FtraceError {
    move |source| FtraceError::Mem { what, source }
}
