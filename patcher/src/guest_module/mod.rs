//! Patch code the guest knows as a module (DESIGN.md §14). The guest's kernel finds a
//! module's code through its `struct module`: the module address tree
//! (`__module_address`) for its unwind table (ORC, so /proc/PID/stack and oops traces
//! go through patch code), its symbols (oops and WARNING lines name patch functions),
//! its exception table (a fault on a user pointer is fixed up); the bug list for its
//! WARN and BUG entries; the module list for /proc/modules and /proc/kallsyms.
//!
//! So each loaded patch gets a record in the patch area's data region
//! ([`record`]): a `struct module` named as the patch, live, tainted `K`, its text the
//! patch's code, used by a module named `lpvmm` (which is on no list) so that the guest
//! cannot unload it, not even with `rmmod -f` (the kernel refuses a module that another
//! uses before it looks at the force flag). In the load's pause lpvmm links it into the
//! guest's module list, bug list and address tree; at unload it takes it out again.
//! Both only while no task holds `module_mutex`, which every writer of the three holds.
//!
//! The guest reads these lists and the tree without locks (RCU and a latch), so an
//! unloaded patch's record is not cleared at once: a reader in the pause may be inside
//! it. It is kept ([`Retired`]) until every guest CPU has switched tasks since (which a
//! reader with preemption off cannot span) or is halted in its idle loop, then cleared
//! and its space given back.

pub(crate) mod rbtree;
pub(crate) mod record;

use introspection::kernel::Kernel;
use introspection::layout::{GuestModuleLayout, ModuleLayout};
use introspection::PausedGuest;
use serde::{Deserialize, Serialize};

use crate::area::Region;
use crate::{GuestWriter, KpError};
use rbtree::RbLayout;

/// A patch's module as the guest knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestModule {
    /// The record's place in the patch area's data region; the `struct module` is its
    /// start ([`GuestModule::module`]).
    pub record: Region,
    /// Its text: the patch's code.
    pub text: Region,
    /// Whether it has a bug table (and so is on the guest's bug list).
    pub bugs: bool,
}

impl GuestModule {
    /// The `struct module`: the record's first part.
    pub fn module(&self) -> u64 {
        self.record.start
    }
}

/// A withdrawn record, kept until every guest CPU has switched tasks since.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Retired {
    pub(crate) record: Region,
    /// Each CPU's `rq->nr_switches` when it was withdrawn.
    pub(crate) switches: Vec<u64>,
}

/// The layouts a record needs, or why this guest cannot have one.
pub(crate) fn layouts(kernel: &Kernel) -> Result<(&GuestModuleLayout, &ModuleLayout), String> {
    let gm = kernel.layout.patcher.guest_module.as_ref();
    let ml = kernel.layout.modules.as_ref().ok();
    match (gm, ml) {
        (Some(gm), Some(ml)) if ml.users.is_some() && ml.refcnt.is_some() && ml.orc.is_some() => {
            Ok((gm, ml))
        }
        _ => Err(
            "its BTF lacks the module structures lpvmm writes (struct module, \
                  mod_tree_root, module_use), or the kernel has no module unloading or ORC"
                .into(),
        ),
    }
}

/// The guest's globals the record is linked into.
struct Globals {
    modules: u64,
    bug_list: u64,
    tree: u64,
}

impl Globals {
    /// The globals, in a pause in which no task holds `module_mutex`.
    fn of_free_guest(guest: &dyn PausedGuest, kernel: &Kernel) -> Result<Globals, KpError> {
        let sym = |n: &str| {
            kernel.symbols.addr(n).ok_or_else(|| {
                KpError::Unsupported(format!("the patch's module needs the guest's {n}"))
            })
        };
        let mutex = sym("module_mutex")?;
        // `struct mutex` starts with its owner: 0 while nobody holds it.
        let owner = kernel
            .memory(guest)
            .u64(mutex)
            .map_err(|e| KpError::guest("reading module_mutex", e))?;
        if owner != 0 {
            return Err(KpError::GuestBusy(
                "a task holds the guest's module_mutex (a module is loading or unloading)".into(),
            ));
        }
        Ok(Globals {
            modules: sym("modules")?,
            bug_list: sym("module_bug_list")?,
            tree: sym("mod_tree")?,
        })
    }
}

/// Whether the record can be linked in this pause: refused, writing nothing, while a
/// task holds `module_mutex`.
pub(crate) fn check_free(guest: &dyn PausedGuest, kernel: &Kernel) -> Result<(), KpError> {
    Globals::of_free_guest(guest, kernel).map(|_| ())
}

/// The record of a patch linked as `linked`, placed in `area` after its `runs`: the
/// module and its bytes; `None` for a guest whose kernel lpvmm cannot give one, unless
/// the patch needs it (an exception or bug table), which is then refused.
pub(crate) fn plan(
    kernel: &Kernel,
    area: &crate::space::Area,
    runs: crate::space::Runs,
    obj: &crate::load::object::PatchObject,
    linked: &crate::load::link::Linked,
) -> Result<Option<(GuestModule, Vec<u8>)>, KpError> {
    let name = &obj.manifest.name;
    let (gm, ml) = match layouts(kernel) {
        Ok(l) => l,
        Err(why) => {
            let needs =
                obj.sections.iter().any(|s| s.name == "__bug_table") || !obj.extable.is_empty();
            return match needs {
                true => Err(KpError::Unsupported(format!(
                    "{name}: its exception or bug table needs the patch to be a module the guest knows, and this guest kernel cannot have one: {why}"
                ))),
                false => Ok(None),
            };
        }
    };
    if linked.code.bytes.is_empty() {
        return Ok(None);
    }
    let contents = record::Contents::of(obj, linked, gm.bug_entry_size)?;
    let orc_entry = kernel.orc.format().entry_size;
    let size = record::Parts::of(&contents, gm, orc_entry).size;
    let mut after = area.space.clone();
    after.take(runs);
    let at = after.data.find(size).ok_or_else(|| {
        KpError::AreaFull(format!(
            "{name}: no room for its module record ({size} bytes)"
        ))
    })?;
    let bytes = record::build(&contents, at.start, gm, ml, orc_entry)?;
    let module = GuestModule {
        record: at,
        text: contents.text,
        bugs: contents.bugs.is_some(),
    };
    Ok(Some((module, bytes)))
}

/// Writes to the guest's own memory (its lists and tree), by virtual address, handed
/// back: the guest changes them next.
struct GuestWords<'g> {
    guest: &'g mut dyn GuestWriter,
    kernel: &'g Kernel,
}

impl GuestWords<'_> {
    fn read(&self, va: u64) -> Result<u64, KpError> {
        self.kernel
            .memory(self.guest.reader())
            .u64(va)
            .map_err(|e| KpError::guest("reading the guest's module lists", e))
    }
    fn write(&mut self, va: u64, bytes: &[u8]) -> Result<(), KpError> {
        let pa = self
            .kernel
            .memory(self.guest.reader())
            .translate(va)
            .map_err(|e| KpError::guest("the guest's module lists", e))?;
        self.guest
            .write_handed_back(pa, bytes)
            .map_err(|e| KpError::guest("writing the guest's module lists", e))
    }
    fn write_u64(&mut self, va: u64, v: u64) -> Result<(), KpError> {
        self.write(va, &v.to_le_bytes())
    }
    /// `list_add_rcu(entry, head)`.
    fn list_add(&mut self, entry: u64, head: u64) -> Result<(), KpError> {
        let next = self.read(head)?;
        self.write_u64(entry, next)?;
        self.write_u64(entry + 8, head)?;
        self.write_u64(next + 8, entry)?;
        self.write_u64(head, entry)
    }
    /// `list_del_rcu(entry)`, leaving the entry's own links for a reader inside it.
    fn list_del(&mut self, entry: u64) -> Result<(), KpError> {
        let (next, prev) = (self.read(entry)?, self.read(entry + 8)?);
        self.write_u64(prev, next)?;
        self.write_u64(next + 8, prev)
    }
}

/// Link `m` into the guest's module list, bug list and address tree, in a pause; the
/// record is already written. Fails, writing nothing, while `module_mutex` is held.
pub(crate) fn publish(
    guest: &mut dyn GuestWriter,
    kernel: &Kernel,
    m: &GuestModule,
) -> Result<(), KpError> {
    let (gm, ml) = layouts(kernel).map_err(KpError::Unsupported)?;
    let g = Globals::of_free_guest(guest.reader(), kernel)?;
    let mut w = GuestWords { guest, kernel };
    retree(&mut w, gm, g.tree, m, true)?;
    let (min, max) = (g.tree + gm.addr_min, g.tree + gm.addr_max);
    let lo = w.read(min)?.min(m.text.start);
    let hi = w.read(max)?.max(m.text.end - 1);
    w.write_u64(min, lo)?;
    w.write_u64(max, hi)?;
    if m.bugs {
        w.list_add(m.module() + gm.bug_list, g.bug_list)?;
    }
    w.list_add(m.module() + ml.list, g.modules)
}

/// Take `m` out of the guest's lists and tree, in a pause (its record stays as it was
/// for readers inside it: [`Retired`]). Fails, writing nothing, while `module_mutex`
/// is held.
pub(crate) fn withdraw(
    guest: &mut dyn GuestWriter,
    kernel: &Kernel,
    m: &GuestModule,
) -> Result<Retired, KpError> {
    let (gm, ml) = layouts(kernel).map_err(KpError::Unsupported)?;
    let g = Globals::of_free_guest(guest.reader(), kernel)?;
    let switches = cpu_switches(guest.reader(), kernel, gm)?;
    let mut w = GuestWords { guest, kernel };
    w.list_del(m.module() + ml.list)?;
    if m.bugs {
        w.list_del(m.module() + gm.bug_list)?;
    }
    retree(&mut w, gm, g.tree, m, false)?;
    Ok(Retired {
        record: m.record,
        switches,
    })
}

/// Clear and give back, in `area` (the engine's, or the one a load will make it), the
/// records of `retired` no guest reader can be inside any more ([`CpusNow::past`]).
/// The guest's CPUs are read once for all of them.
pub(crate) fn free_quiesced(
    retired: &mut Vec<Retired>,
    guest: &mut dyn GuestWriter,
    kernel: &Kernel,
    area: &mut crate::space::Area,
) {
    if retired.is_empty() {
        return;
    }
    let Some(now) = CpusNow::read(guest.reader(), kernel) else {
        return;
    };
    let (done, kept): (Vec<_>, Vec<_>) = std::mem::take(retired)
        .into_iter()
        .partition(|r| now.past(r));
    *retired = kept;
    for r in done {
        let zeros = vec![0; r.record.size() as usize];
        match guest.write_phys(area.layout.pa(r.record.start), &zeros) {
            Ok(()) => area.space.data.free(r.record),
            Err(_) => retired.push(r),
        }
    }
}

/// Each CPU's `rq->nr_switches`.
fn cpu_switches(
    guest: &dyn PausedGuest,
    kernel: &Kernel,
    gm: &GuestModuleLayout,
) -> Result<Vec<u64>, KpError> {
    let reader = introspection::tasks::TaskReader::new(kernel, guest);
    let bases = reader
        .percpu_bases()
        .map_err(|e| KpError::Unsupported(format!("the guest's per-CPU areas: {e}")))?;
    let rq = kernel.addrs.runqueues + gm.rq_nr_switches;
    let mem = kernel.memory(guest);
    bases
        .iter()
        .map(|b| {
            mem.u64(b.wrapping_add(rq))
                .map_err(|e| KpError::guest("reading rq->nr_switches", e))
        })
        .collect()
}

/// What each guest CPU is doing in this pause: its switch count, and whether it is
/// halted in its idle loop.
struct CpusNow {
    switches: Vec<u64>,
    halted: Vec<bool>,
}

impl CpusNow {
    fn read(guest: &dyn PausedGuest, kernel: &Kernel) -> Option<CpusNow> {
        let (gm, _) = layouts(kernel).ok()?;
        Some(CpusNow {
            switches: cpu_switches(guest, kernel, gm).ok()?,
            halted: halted_cpus(guest, kernel),
        })
    }

    /// Whether no guest reader can be inside `r` any more: every CPU has switched tasks
    /// since it was withdrawn (no reader with preemption off spans a switch), or is
    /// halted in its idle loop now (a reader it was in at the withdrawal has ended; an
    /// idle CPU may switch nothing for a long time).
    fn past(&self, r: &Retired) -> bool {
        self.switches.len() == r.switches.len()
            && self
                .switches
                .iter()
                .zip(&r.switches)
                .enumerate()
                .all(|(cpu, (a, b))| a != b || self.halted.get(cpu) == Some(&true))
    }
}

/// For each guest CPU, whether its vCPU is halted in kernel mode: parked just after a
/// `hlt` (KVM moves a halted vCPU's RIP past the instruction), which the kernel executes
/// only in its idle loop.
fn halted_cpus(guest: &dyn PausedGuest, kernel: &Kernel) -> Vec<bool> {
    const HLT: u8 = 0xf4;
    let reader = introspection::tasks::TaskReader::new(kernel, guest);
    let Ok(bases) = reader.percpu_bases() else {
        return Vec::new();
    };
    let mem = kernel.memory(guest);
    let mut out = vec![false; bases.len()];
    for i in 0..guest.vcpu_count() {
        let Ok(v) = guest.vcpu(i) else { continue };
        let Some(cpu) = introspection::tasks::TaskReader::cpu_of(&bases, v) else {
            continue;
        };
        let after_hlt = mem
            .read_vec(v.rip.wrapping_sub(1), 1)
            .is_ok_and(|b| b == [HLT]);
        out[cpu] = v.cpl() == 0 && after_hlt;
    }
    out
}

/// Both trees of the guest's latched module tree written again with `m`'s text node
/// added (`add`) or dropped ([`rbtree`]), and the latch's sequence moved on by two (as
/// one `latch_tree_insert` or `_erase` does), so that a reader that began before the
/// pause looks again. Everything is read before anything is written.
fn retree(
    w: &mut GuestWords,
    gm: &GuestModuleLayout,
    tree: u64,
    m: &GuestModule,
    add: bool,
) -> Result<(), KpError> {
    let rb = RbLayout {
        parent_color: gm.rb_parent_color,
        right: gm.rb_right,
        left: gm.rb_left,
    };
    let mut plans = Vec::with_capacity(2);
    for idx in 0..2u64 {
        let root_at = tree + gm.tree_roots + 8 * idx;
        // From a node of this tree to its region's base.
        let to_base = (idx * gm.rb_size + gm.mtn_node + gm.region_mtn).wrapping_sub(gm.region_base);
        let ours = m.module() + gm.text_mtn + gm.mtn_node + idx * gm.rb_size;
        let read = |a: u64| w.read(a).ok();
        let nodes = rbtree::in_order(w.read(root_at)?, rb, &read)
            .map_err(|e| KpError::Unsupported(format!("the guest's mod_tree: {e}")))?;
        let mut keyed = Vec::with_capacity(nodes.len() + 1);
        for n in nodes.into_iter().filter(|&n| n != ours) {
            keyed.push((w.read(n.wrapping_sub(to_base))?, n));
        }
        if add {
            keyed.push((m.text.start, ours));
        }
        keyed.sort_unstable();
        let sorted: Vec<u64> = keyed.into_iter().map(|(_, n)| n).collect();
        plans.push((root_at, rbtree::balanced(&sorted)));
    }
    let seq_at = tree + gm.tree_seq;
    let seq = w.read(seq_at)? as u32;
    for (root_at, t) in &plans {
        for l in &t.links {
            w.write_u64(l.node + rb.parent_color, l.parent_color)?;
            w.write_u64(l.node + rb.right, l.right)?;
            w.write_u64(l.node + rb.left, l.left)?;
        }
        w.write_u64(*root_at, t.root)?;
    }
    w.write(seq_at, &seq.wrapping_add(2).to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_past_once_each_cpu_switched_or_is_halted() {
        let r = Retired {
            record: Region {
                start: 0x1000,
                end: 0x2000,
            },
            switches: vec![10, 20],
        };
        let now = |switches: Vec<u64>, halted: Vec<bool>| CpusNow { switches, halted };
        assert!(now(vec![11, 21], vec![false, false]).past(&r));
        assert!(
            !now(vec![11, 20], vec![false, false]).past(&r),
            "CPU 1 may still read it"
        );
        assert!(
            now(vec![11, 20], vec![false, true]).past(&r),
            "CPU 1 idles in hlt"
        );
        assert!(
            !now(vec![11], vec![false]).past(&r),
            "another number of CPUs"
        );
    }
}
