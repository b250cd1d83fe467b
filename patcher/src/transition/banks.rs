//! The banks of trampolines a per-task transition dispatches through: placed in the patch
//! area once, one taken for each per-task transition and retired when it ends, free
//! again once no task can be inside it.

use std::collections::BTreeMap;

use introspection::kernel::Kernel;
use introspection::tasks::TaskList;
use introspection::PausedGuest;

use crate::area::Region;
use crate::engine::{Dispatch, Engine};
use crate::funcs::write::site_writes;
use crate::funcs::FuncStack;
use crate::space::Sizes;
use crate::transition::dispatch::{
    self, Bank, BankState, Geometry, Targets, TaskMap, TrampolineEnv, BANKS, BANK_CODE,
    MAX_TRAMPOLINE,
};
use crate::transition::{Blocker, Check, Stage, Transition};
use crate::{GuestWriter, KpError};

impl Engine {
    /// Trampolines, the task map with `blockers` on the starting side, and the sites
    /// jumping to the trampolines. `false`: no bank was free, nothing written.
    pub(crate) fn install_dispatch(
        &mut self,
        t: &mut Transition,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        list: &TaskList,
        blockers: &[Blocker],
    ) -> Result<bool, KpError> {
        self.ensure_dispatch(guest.reader(), kernel)?;
        let Some(bank) = self.free_bank() else {
            return Ok(false);
        };
        let d = self.dispatch()?;
        let g = d.geometry;
        if let Some(x) = list
            .tasks
            .iter()
            .find(|x| g.bit(x.addr).is_none() && x.addr != g.init_task)
        {
            return Err(KpError::State(format!(
                "task {} ({})'s task_struct at {:#x} is outside the direct map, where per-task \
                 dispatch finds tasks; use --consistency immediate",
                x.pid, x.comm, x.addr
            )));
        }
        let mut map = TaskMap::filled(&g, false);
        for b in blockers {
            map.set(&g, b.trace.task, true);
        }
        let b = &d.banks[bank];
        let env = TrampolineEnv {
            current_offset: d.current_offset,
            geometry: g,
            map_va: b.map_va,
            init_slot_va: b.init_slot_va(),
        };
        let Trampolines { code, slots } = assemble_trampolines(&self.funcs, t, &env, b.code)?;
        let sites = site_writes(&self.funcs, &t.changes)?;
        let flags = self.check_sites(guest.reader(), kernel, &sites)?;
        // Order matters only for the guest's view after the resume; it is paused now.
        let layout = self.layout()?;
        write_map(guest, &layout, self.dispatch_bank(bank)?, &g, &mut map)?;
        for (va, bytes) in &code {
            guest
                .write_phys(layout.pa(*va), bytes)
                .map_err(|e| KpError::guest("writing a trampoline", e))?;
        }
        self.write_sites(guest, &sites, flags)?;
        if let Some(b) = self.dispatch.as_mut().and_then(|d| d.banks.get_mut(bank)) {
            b.state = BankState::Live;
            b.slots = slots;
        }
        t.stage = Stage::Switching { bank, map };
        Ok(true)
    }

    pub(crate) fn geometry(&self) -> Result<Geometry, KpError> {
        self.dispatch
            .as_ref()
            .map(|d| d.geometry)
            .ok_or_else(|| KpError::State("per-task dispatch is not set up".into()))
    }

    pub(crate) fn dispatch(&self) -> Result<&Dispatch, KpError> {
        self.dispatch
            .as_ref()
            .ok_or_else(|| KpError::State("per-task dispatch is not set up".into()))
    }

    pub(crate) fn dispatch_bank(&self, i: usize) -> Result<Bank, KpError> {
        self.dispatch()?
            .banks
            .get(i)
            .cloned()
            .ok_or_else(|| KpError::State(format!("no trampoline bank {i}")))
    }

    pub(crate) fn layout(&self) -> Result<crate::area::AreaLayout, KpError> {
        self.area
            .as_ref()
            .map(|a| a.layout.clone())
            .ok_or_else(|| KpError::State("no patch area: no patch is loaded".into()))
    }

    /// A bank no task can be inside: free, or retired with every suspect seen outside.
    pub(crate) fn free_bank(&mut self) -> Option<usize> {
        let d = self.dispatch.as_mut()?;
        let i = d.banks.iter().position(|b| match &b.state {
            BankState::Free => true,
            BankState::Retired { suspects } => suspects.is_empty(),
            BankState::Live => false,
        })?;
        d.banks[i].state = BankState::Free;
        Some(i)
    }

    /// Tasks that are gone, or were unwound reliably outside a retired bank, are no
    /// longer suspected of being inside it.
    pub(crate) fn clear_suspects(&mut self, list: &TaskList, checks: &[Check]) {
        let Some(d) = self.dispatch.as_mut() else {
            return;
        };
        let suspected = |b: &crate::transition::dispatch::Bank| matches!(&b.state, BankState::Retired { suspects } if !suspects.is_empty());
        if !d.banks.iter().any(suspected) {
            return;
        }
        // Sorted addresses, searched: one pass over the traces per bank, not one per
        // suspect (thousands of tasks are suspects of a bank a per-task transition
        // retired), and no hashing in the pause.
        let mut live: Vec<u64> = list.tasks.iter().map(|x| x.addr).collect();
        live.sort_unstable();
        for b in &mut d.banks {
            if let BankState::Retired { suspects } = &mut b.state {
                // A task in no trampoline is in none of this bank's.
                let mut cleared: Vec<u64> = checks
                    .iter()
                    .filter(|c| c.out_of_trampolines)
                    .map(|c| c.task)
                    .collect();
                cleared.sort_unstable();
                suspects
                    .retain(|s| live.binary_search(s).is_ok() && cleared.binary_search(s).is_err());
            }
        }
    }

    /// Trampoline banks and task maps, placed in the patch area once.
    pub(crate) fn ensure_dispatch(
        &mut self,
        guest: &dyn PausedGuest,
        kernel: &Kernel,
    ) -> Result<(), KpError> {
        if self.dispatch.is_some() {
            return Ok(());
        }
        let need = |what: &str| {
            KpError::State(format!(
                "per-task consistency needs {what}, which this guest kernel lacks; use \
                 --consistency immediate"
            ))
        };
        let (base, task_size) = task_granule(guest, kernel)?;
        let current_offset = kernel
            .current_task_offset()
            .ok_or_else(|| need("the per-CPU current_task"))?;
        let ram_top = guest
            .ram_ranges()
            .iter()
            .map(|r| r.end())
            .max()
            .unwrap_or(0);
        let geometry = Geometry::new(base, task_size, ram_top, kernel.addrs.init_task);
        let area = self
            .area
            .as_mut()
            .ok_or_else(|| KpError::State("no patch area".into()))?;
        let per_bank = (geometry.bitmap_bytes() + 8).div_ceil(4096) * 4096;
        let runs = area.space.place(
            "per-task dispatch (trampolines and task maps)",
            Sizes {
                code: BANKS as u64 * BANK_CODE,
                rodata: 0,
                data: BANKS as u64 * per_bank,
            },
        )?;
        // Never freed: a retired bank is reused by later transitions.
        area.space.take(runs);
        // A patch linked before this took its place in the area must be linked again.
        self.generation += 1;
        let (code, data) = (runs.code.start, runs.data.start);
        let banks = (0..BANKS as u64)
            .map(|i| Bank {
                code: Region {
                    start: code + i * BANK_CODE,
                    end: code + (i + 1) * BANK_CODE,
                },
                map_va: data + i * per_bank,
                map_bytes: geometry.bitmap_bytes(),
                state: BankState::Free,
                slots: Vec::new(),
            })
            .collect();
        self.dispatch = Some(Dispatch {
            geometry,
            current_offset,
            banks,
        });
        Ok(())
    }
}

/// Where task_structs can be (the direct map's base) and how far apart they are at least
/// (the task-map granule), from the guest kernel.
fn task_granule(guest: &dyn PausedGuest, kernel: &Kernel) -> Result<(u64, u64), KpError> {
    let need = |what: &str| {
        KpError::State(format!(
            "per-task consistency needs {what}, which this guest kernel lacks; use \
             --consistency immediate"
        ))
    };
    let mem = kernel.memory(guest);
    let pob = kernel
        .symbols
        .addr("page_offset_base")
        .ok_or_else(|| need("the symbol page_offset_base"))?;
    let base = mem
        .u64(pob)
        .map_err(|e| KpError::guest("reading page_offset_base", e))?;
    // task_structs are `arch_task_struct_size` bytes apart at least: on x86 that is
    // sizeof(struct task_struct) with the FPU state resized to what the CPU saves,
    // often smaller than the static size BTF gives. The granule must not exceed
    // either.
    let btf_size = kernel
        .layout
        .patcher
        .task_struct_size
        .ok_or_else(|| need("the size of struct task_struct in BTF"))?;
    let task_size = match kernel.symbols.addr("arch_task_struct_size") {
        Some(a) => {
            let n = u64::from(
                mem.u32(a)
                    .map_err(|e| KpError::guest("reading arch_task_struct_size", e))?,
            );
            if n < 1024 {
                return Err(KpError::GuestState(format!(
                    "arch_task_struct_size is {n}, too small for a task_struct"
                )));
            }
            n.min(btf_size)
        }
        None => btf_size,
    };
    Ok((base, task_size))
}

/// A bank's trampolines, assembled: their code by address, and the function each slot
/// serves.
struct Trampolines {
    code: Vec<(u64, Vec<u8>)>,
    slots: Vec<String>,
}

/// One trampoline per function that moves per task, each in its slot of the bank's
/// code; each change learns its trampoline.
fn assemble_trampolines(
    funcs: &BTreeMap<u64, FuncStack>,
    t: &mut Transition,
    env: &TrampolineEnv,
    bank_code: Region,
) -> Result<Trampolines, KpError> {
    let mut code = Vec::new();
    let mut slots = Vec::new();
    let mut at = bank_code.start;
    for c in t.changes.iter_mut().filter(|c| !c.immediate) {
        let s = &funcs[&c.func];
        let targets = Targets {
            start: s.entry(&c.from),
            target: s.entry(&c.to),
        };
        let bytes = dispatch::trampoline(env, targets, at)?;
        if bytes.len() as u64 > MAX_TRAMPOLINE || at + MAX_TRAMPOLINE > bank_code.end {
            return Err(KpError::State(format!(
                "patch '{}' has more functions than one trampoline bank holds ({}); use \
                 --consistency immediate",
                t.patch,
                BANK_CODE / MAX_TRAMPOLINE
            )));
        }
        c.trampoline = Some(at);
        slots.push(c.name.clone());
        code.push((at, bytes));
        at += MAX_TRAMPOLINE;
    }
    Ok(Trampolines { code, slots })
}

/// Write the map's changed words and init_task's slot.
pub(crate) fn write_map(
    guest: &mut dyn GuestWriter,
    layout: &crate::area::AreaLayout,
    bank: Bank,
    g: &Geometry,
    map: &mut TaskMap,
) -> Result<(), KpError> {
    let (runs, init) = map.take_dirty();
    for run in runs {
        guest
            .write_phys(layout.pa(bank.map_va + run.offset), &run.bytes)
            .map_err(|e| KpError::guest("writing the task map", e))?;
    }
    if init {
        let v = if map.init_on_start { g.init_task } else { 0 };
        guest
            .write_phys(layout.pa(bank.init_slot_va()), &v.to_le_bytes())
            .map_err(|e| KpError::guest("writing the task map", e))?;
    }
    Ok(())
}
