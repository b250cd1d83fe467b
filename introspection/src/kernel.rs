//! A guest kernel, attached: everything read once from its memory that stays valid for
//! its lifetime (symbols, BTF layouts, ORC tables, where its page tables are), built
//! from nothing but the running guest.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::btf::{Btf, BtfError};
use crate::ftrace::{FtraceError, FtraceLayout};
use crate::guest::{GuestRam, PausedGuest, VcpuState};
use crate::kallsyms::{KallsymsError, SymbolTable};
use crate::layout::{Layout, LayoutError};
use crate::memory::{KernelMemory, MemError, PagingRoot};
use crate::orc::{OrcError, OrcFormat, OrcTable};
use crate::vmcoreinfo::{self, VmcoreInfo, VmcoreInfoError};

/// `__START_KERNEL_map`: where x86-64 links the kernel image; `__pa_symbol(x)` is
/// `x - START_KERNEL_MAP + phys_base`. An architectural constant, not a layout.
const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// BTF of a distribution kernel is ~6 MiB; far more is corruption.
const MAX_BTF: u64 = 64 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttachError {
    #[error(transparent)]
    Vmcoreinfo(#[from] VmcoreInfoError),
    #[error("cannot find the kernel's page tables: {0}")]
    PageTables(String),
    #[error(transparent)]
    Kallsyms(#[from] KallsymsError),
    #[error("kernel symbol '{0}' not found in kallsyms")]
    MissingSymbol(&'static str),
    #[error("kernel BTF: {0}")]
    Btf(#[from] BtfError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Orc(#[from] OrcError),
    #[error("reading kernel memory: {0}")]
    Mem(#[from] MemError),
    #[error(transparent)]
    Ftrace(#[from] FtraceError),
    #[error("implausible kernel value: {0}")]
    Implausible(String),
}

/// Half-open address range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub fn contains(&self, a: u64) -> bool {
        a >= self.start && a < self.end
    }
}

/// Addresses of the kernel globals lpvmm reads, from kallsyms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelAddrs {
    pub text: Range,
    pub init_text: Option<Range>,
    /// `__sched` and `__lockfunc` code: the kernel hides these frames in
    /// /proc/PID/stack of a sleeping task (`in_sched_functions`).
    pub sched_text: Range,
    pub lock_text: Option<Range>,
    pub init_task: u64,
    pub per_cpu_offset: u64,
    pub runqueues: u64,
    /// 6.1: the per-CPU `current_task`; 6.2+: inside `pcpu_hot`.
    pub current_task: Option<u64>,
    pub pcpu_hot: Option<u64>,
    pub hardirq_stack_ptr: Option<u64>,
    pub nr_cpu_ids: Option<u64>,
    /// `total_forks`, `nr_threads` and `tasklist_lock` (kernel/fork.c): what tells that
    /// the task list did not change between two looks at it (see
    /// [`crate::tasks::ListStamp`]).
    pub total_forks: Option<u64>,
    pub nr_threads: Option<u64>,
    pub tasklist_lock: Option<u64>,
    /// Where a new task first runs (`ret_from_fork`, `ret_from_fork_asm` in 6.7+).
    pub ret_from_fork: Vec<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttachStats {
    pub release: String,
    pub kaslr_offset: u64,
    pub symbols: usize,
    pub btf_types: usize,
    pub btf_bytes: u64,
    pub orc_entries: usize,
    pub orc_has_end_bit: bool,
    pub thread_size: u64,
    pub five_level_paging: bool,
    /// Wall time of the whole attach (its reads need no pause, so the guest runs
    /// through them unless it was already paused), and when each step was done, from
    /// its start: VMCOREINFO found (in guest RAM), symbol table decoded, BTF parsed and
    /// layouts resolved.
    pub attach_us: u64,
    pub vmcoreinfo_done_us: u64,
    pub kallsyms_done_us: u64,
    pub btf_done_us: u64,
}

pub struct Kernel {
    pub info: VmcoreInfo,
    pub root: PagingRoot,
    pub symbols: SymbolTable,
    /// Everything lpvmm uses from BTF (the parsed types are dropped after attach).
    pub layout: Layout,
    pub orc: OrcTable,
    pub addrs: KernelAddrs,
    /// THREAD_SIZE, measured from the initial task's stack in the image.
    pub thread_size: u64,
    /// Where the guest's ftrace keeps its records (`None`: no dynamic ftrace).
    pub ftrace: Option<FtraceLayout>,
    pub stats: AttachStats,
}

impl Kernel {
    /// Read everything static about a paused guest's kernel.
    pub fn attach(guest: &dyn PausedGuest) -> Result<Kernel, AttachError> {
        let vcpus: Vec<VcpuState> = (0..guest.vcpu_count())
            .filter_map(|i| guest.vcpu(i).ok().cloned())
            .collect();
        Self::attach_static(guest, &vcpus)
    }

    /// Read everything static about the guest kernel; the guest may run meanwhile. Only
    /// what the kernel never changes once it has booted is read: VMCOREINFO, the
    /// page-table entries that map the kernel image, kallsyms, BTF and ORC. `vcpus`:
    /// registers from a pause, for the page tables' root when VMCOREINFO does not give
    /// it.
    pub fn attach_static(ram: &dyn GuestRam, vcpus: &[VcpuState]) -> Result<Kernel, AttachError> {
        let started = Instant::now();
        let (_, info) = vmcoreinfo::find(ram)?;
        let root = find_root(ram, &info, vcpus)?;
        let vmcoreinfo_us = duration_us(started.elapsed());
        let mem = KernelMemory::new(ram, root);
        let symbols = SymbolTable::read(&mem, &info)?;
        let kallsyms_us = duration_us(started.elapsed());
        let need = |n: &'static str| symbols.addr(n).ok_or(AttachError::MissingSymbol(n));
        let range = |a: &'static str, b: &'static str| -> Result<Range, AttachError> {
            Ok(Range {
                start: need(a)?,
                end: need(b)?,
            })
        };

        let btf_range = range("__start_BTF", "__stop_BTF")?;
        let btf_len = btf_range.end.wrapping_sub(btf_range.start);
        if btf_range.end < btf_range.start || btf_len > MAX_BTF {
            return Err(AttachError::Implausible(format!("BTF of {btf_len} bytes")));
        }
        let btf = Btf::parse(&mem.read_vec(btf_range.start, btf_len as usize)?)?;
        let layout = Layout::from_btf(&btf)?;
        let btf_us = duration_us(started.elapsed());
        let orc = OrcTable::read(&mem, &symbols, OrcFormat::from_btf(&btf)?)?;
        let ftrace = FtraceLayout::from_kernel(&symbols, &btf)?;

        let addrs = KernelAddrs::of(&symbols)?;
        if addrs.current_task.is_none() && (addrs.pcpu_hot.is_none() || layout.pcpu_hot.is_none()) {
            return Err(AttachError::MissingSymbol("current_task"));
        }
        let thread_size = thread_size(&symbols)?;

        let stats = AttachStats {
            release: info.osrelease.clone(),
            kaslr_offset: info.kernel_offset,
            symbols: symbols.len(),
            btf_types: btf.type_count(),
            btf_bytes: btf_len,
            orc_entries: orc.len(),
            orc_has_end_bit: orc.format().has_end_bit(),
            thread_size,
            five_level_paging: root.five_level,
            attach_us: 0,
            vmcoreinfo_done_us: vmcoreinfo_us,
            kallsyms_done_us: kallsyms_us,
            btf_done_us: btf_us,
        };
        let mut kernel = Kernel {
            info,
            root,
            symbols,
            layout,
            orc,
            addrs,
            thread_size,
            ftrace,
            stats,
        };
        kernel.stats.attach_us = duration_us(started.elapsed());
        Ok(kernel)
    }

    /// Kernel virtual memory of the (paused) guest.
    pub fn memory<'g>(&self, guest: &'g dyn PausedGuest) -> KernelMemory<'g> {
        KernelMemory::new(guest, self.root)
    }

    /// Addresses the kernel runs code at: its text (and init text while it exists).
    pub fn is_kernel_text(&self, addr: u64) -> bool {
        self.addrs.text.contains(addr) || self.addrs.init_text.is_some_and(|r| r.contains(addr))
    }

    /// Offset of the running task's pointer (`current_task`, or `pcpu_hot.current_task`
    /// from 6.2) in each CPU's per-CPU area: `%gs`-relative in kernel mode.
    pub fn current_task_offset(&self) -> Option<u64> {
        let a = &self.addrs;
        match (a.current_task, a.pcpu_hot, &self.layout.pcpu_hot) {
            (_, Some(hot), Some(l)) => Some(hot.wrapping_add(l.current_task)),
            (Some(ct), _, _) => Some(ct),
            _ => None,
        }
    }

    /// Code the kernel leaves out of /proc/PID/stack of a sleeping task.
    pub fn is_sched_text(&self, addr: u64) -> bool {
        self.addrs.sched_text.contains(addr)
            || self.addrs.lock_text.is_some_and(|r| r.contains(addr))
    }
}

pub(crate) fn duration_us(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

/// A range between two kernel symbols, if both exist.
fn optional_range(symbols: &SymbolTable, a: &str, b: &str) -> Option<Range> {
    Some(Range {
        start: symbols.addr(a)?,
        end: symbols.addr(b)?,
    })
}

/// THREAD_SIZE, from the init task's stack (its symbols' names changed in 6.2).
fn thread_size(symbols: &SymbolTable) -> Result<u64, AttachError> {
    let thread_size = optional_range(symbols, "__start_init_task", "__end_init_task")
        .or_else(|| optional_range(symbols, "__start_init_stack", "__end_init_stack"))
        .map(|r| r.end.wrapping_sub(r.start))
        .ok_or(AttachError::MissingSymbol("__end_init_task"))?;
    if !thread_size.is_power_of_two() || !(4096..=1 << 20).contains(&thread_size) {
        return Err(AttachError::Implausible(format!(
            "THREAD_SIZE {thread_size:#x}"
        )));
    }
    Ok(thread_size)
}

impl KernelAddrs {
    /// The addresses introspection needs, from the guest's symbols.
    fn of(symbols: &SymbolTable) -> Result<KernelAddrs, AttachError> {
        let need = |n: &'static str| symbols.addr(n).ok_or(AttachError::MissingSymbol(n));
        let range = |a: &'static str, b: &'static str| -> Result<Range, AttachError> {
            Ok(Range {
                start: need(a)?,
                end: need(b)?,
            })
        };
        Ok(KernelAddrs {
            text: range("_stext", "_etext")?,
            init_text: optional_range(symbols, "_sinittext", "_einittext"),
            sched_text: range("__sched_text_start", "__sched_text_end")?,
            lock_text: optional_range(symbols, "__lock_text_start", "__lock_text_end"),
            init_task: need("init_task")?,
            per_cpu_offset: need("__per_cpu_offset")?,
            runqueues: need("runqueues")?,
            current_task: symbols.addr("current_task"),
            pcpu_hot: symbols.addr("pcpu_hot"),
            hardirq_stack_ptr: symbols.addr("hardirq_stack_ptr"),
            nr_cpu_ids: symbols.addr("nr_cpu_ids"),
            total_forks: symbols.addr("total_forks"),
            nr_threads: symbols.addr("nr_threads"),
            tasklist_lock: symbols.addr("tasklist_lock"),
            ret_from_fork: ["ret_from_fork", "ret_from_fork_asm"]
                .iter()
                .filter_map(|n| symbols.addr(n))
                .collect(),
        })
    }
}

/// The kernel's master page table, `init_top_pgt`, whose kernel half every address space
/// shares. Its physical address comes from VMCOREINFO (`phys_base`); it is accepted only
/// if translating its own virtual address through it lands on itself. Failing that (a
/// note without `phys_base`), each vCPU's CR3 is tried: with PTI, CR3 in user mode points
/// at the user half of an 8 KiB pair, so the kernel half is one page below.
fn find_root(
    guest: &dyn GuestRam,
    info: &VmcoreInfo,
    vcpus: &[VcpuState],
) -> Result<PagingRoot, AttachError> {
    let pgd_va = info
        .symbol("init_top_pgt")
        .or_else(|| info.symbol("swapper_pg_dir"))
        .ok_or_else(|| AttachError::PageTables("VMCOREINFO has no SYMBOL(init_top_pgt)".into()))?;
    let five_level = match info.number("pgtable_l5_enabled") {
        Some(n) => n == 1,
        None => vcpus.iter().any(|v| v.five_level_paging()),
    };
    let self_maps = |table: u64| {
        let root = PagingRoot { table, five_level };
        crate::memory::translate(guest, root, pgd_va).ok() == Some(table)
    };
    if let Some(phys_base) = info.number("phys_base") {
        let table = pgd_va
            .wrapping_sub(START_KERNEL_MAP)
            .wrapping_add(phys_base as u64);
        if self_maps(table) {
            return Ok(PagingRoot { table, five_level });
        }
    }
    for v in vcpus {
        let cr3 = v.page_table_root();
        for candidate in [cr3, cr3 & !0x1fff] {
            let root = PagingRoot {
                table: candidate,
                five_level,
            };
            if let Ok(pa) = crate::memory::translate(guest, root, pgd_va) {
                if self_maps(pa) {
                    return Ok(PagingRoot {
                        table: pa,
                        five_level,
                    });
                }
            }
        }
    }
    Err(AttachError::PageTables(format!(
        "neither phys_base nor any vCPU's CR3 maps init_top_pgt ({pgd_va:#x}) onto itself"
    )))
}
