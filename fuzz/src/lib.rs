//! lpvmm's fuzz targets: every input lpvmm takes from outside its own trust, as
//! functions over bytes that must return, without panicking, in bounded time and memory,
//! whatever the bytes are. `src/bin/*.rs` hands each to AFL++ (afl.rs, stable Rust);
//! scripts/fuzz.sh runs them; seeds/ holds their starting corpora (`seeds` regenerates
//! the generated ones).
//!
//! - [`kp`]: a `.kp` patch file, parsed, checked against the patch stack, linked into a
//!   synthetic guest, enabled, disabled and unloaded there; the guest must then hold
//!   what the engine documents (`check_kp`).
//! - [`tables`]: the kernel tables lpvmm decodes from guest memory: BTF (with every
//!   layout and flag lpvmm derives from it) and VMCOREINFO.
//! - [`guest`]: hostile guest memory under a synthetic kernel: words of task structs,
//!   stacks, per-CPU data, ftrace's records and ops, loaded modules (the module list,
//!   each `struct module`, its symbol, export and ORC tables, its users), kallsyms, BTF
//!   and ORC overwritten, then attach, the task list, every stack (through module code
//!   as the patcher unwinds it), the module walk (each module's /proc/modules line,
//!   symbols, names of its addresses, ORC table) and the ftrace walks.
//! - [`control`]: a control-socket request line.
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::collections::HashMap;

use introspection::btf::Btf;
use introspection::ftrace::FtraceLayout;
use introspection::kernel::Kernel;
use introspection::layout::Layout;
use introspection::modules::{ModuleCode, ModuleList};
use introspection::orc::OrcFormat;
use introspection::stack::{ExtraCode, Unwinder};
use introspection::synth::{SynthGuest, SynthKernel, SynthKernelSpec};
use introspection::tasks::{TaskList, TaskReader};
use introspection::{
    GuestError, GuestRam, PausedGuest, PhysRange, Unconfirmed, VcpuState, VmcoreInfo,
};
use patcher::{Begin, Consistency, Engine, GuestWriter, KpError, Op, Patch, PatchState};

/// A synthetic guest that records every write with the bytes it replaced and puts them
/// back when dropped, so that each input starts from the same guest (cheaper than a
/// copy of its RAM per execution). Every write to it goes through [`Recorded::write`]:
/// [`Recorded::changes`] is therefore every byte that differs from the guest before.
struct Recorded<'g> {
    guest: &'g mut SynthGuest,
    undo: Vec<(u64, Vec<u8>)>,
}

impl Recorded<'_> {
    fn write(&mut self, pa: u64, data: &[u8]) -> Result<(), GuestError> {
        let mut old = vec![0u8; data.len()];
        self.guest.read_phys(pa, &mut old)?;
        self.guest.write_phys(pa, data)?;
        self.undo.push((pa, old));
        Ok(())
    }

    /// Every span of guest memory written since the last restore, with its bytes before
    /// the first write and now, in address order (overlapping writes merged). Restores
    /// the guest.
    fn changes(&mut self) -> Vec<Span> {
        let mut spans: Vec<(u64, u64)> = self
            .undo
            .iter()
            .map(|(pa, old)| (*pa, pa + old.len() as u64))
            .collect();
        spans.sort_unstable();
        let mut union: Vec<(u64, u64)> = Vec::new();
        for (s, e) in spans {
            match union.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => union.push((s, e)),
            }
        }
        let ram = |g: &SynthGuest, (s, e): (u64, u64)| g.ram[s as usize..e as usize].to_vec();
        let now: Vec<Vec<u8>> = union.iter().map(|&r| ram(self.guest, r)).collect();
        self.restore();
        union
            .into_iter()
            .zip(now)
            .map(|(r, now)| Span {
                pa: r.0,
                before: ram(self.guest, r),
                now,
            })
            .collect()
    }

    fn restore(&mut self) {
        for (pa, old) in self.undo.drain(..).rev() {
            self.guest.write_phys_raw(pa, &old);
        }
    }
}

/// Guest memory an input wrote: its bytes before and after.
struct Span {
    pa: u64,
    before: Vec<u8>,
    now: Vec<u8>,
}

impl Span {
    /// The little-endian word at `pa` (8-byte aligned), before and now, if the span
    /// holds all of it.
    fn word(&self, pa: u64) -> Option<(u64, u64)> {
        let at = usize::try_from(pa.checked_sub(self.pa)?).ok()?;
        let w = |b: &[u8]| Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?));
        Some((w(&self.before)?, w(&self.now)?))
    }
}

impl Drop for Recorded<'_> {
    fn drop(&mut self) {
        self.restore();
    }
}

impl PausedGuest for Recorded<'_> {
    fn vcpu_count(&self) -> usize {
        self.guest.vcpu_count()
    }
    fn vcpu(&self, index: usize) -> Result<&VcpuState, GuestError> {
        self.guest.vcpu(index)
    }
}

impl GuestRam for Recorded<'_> {
    fn read_phys(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        self.guest.read_phys(addr, buf)
    }
    fn patch_area(&self) -> PhysRange {
        self.guest.patch_area()
    }
    fn ram_ranges(&self) -> Vec<PhysRange> {
        self.guest.ram_ranges()
    }
}

impl GuestWriter for Recorded<'_> {
    fn write_phys(&mut self, addr: u64, data: &[u8]) -> Result<(), GuestError> {
        self.write(addr, data)
    }
    fn reader(&self) -> &dyn PausedGuest {
        self
    }
}

/// The synthetic kernel every guest-side target starts from, and where in it a hostile
/// input may write.
struct Fixture {
    guest: SynthGuest,
    kernel: Kernel,
    /// Guest-physical addresses of the words worth corrupting: first the kernel's
    /// static tables (kallsyms' neighbours, BTF, ORC), then its dynamic state.
    words: Vec<u64>,
    /// How many of `words` are static tables: only writes there need a new attach
    /// (which scans all of RAM for VMCOREINFO, the slow part of an execution).
    static_words: usize,
    /// Which of `words` are module memory (for [`module_seed`]).
    module_words: std::ops::Range<usize>,
    ftrace_sites: Vec<u64>,
    /// The task list read as the patcher's early checks read it (no vCPUs), for the
    /// pause's refresh of it over hostile memory.
    early: TaskList,
    /// The kernel's text as guest-physical ranges `[start, end)`.
    text: Vec<(u64, u64)>,
    /// Each fentry site's ftrace record `flags` word (guest-physical), by site address.
    ftrace_flags: HashMap<u64, u64>,
}

thread_local! {
    static FIXTURE: RefCell<Fixture> = RefCell::new(fixture());
}

/// Build the synthetic kernel before AFL++'s fork server starts, so that no execution
/// pays for it (and none counts as a hang for it).
pub fn init() {
    FIXTURE.with(|f| drop(f.borrow()));
}

fn fixture() -> Fixture {
    let sk = SynthKernel::build(SynthKernelSpec::v6_12());
    let kernel = Kernel::attach(&sk.guest).expect("the synthetic kernel attaches");
    let m = kernel.memory(&sk.guest);
    let range = |a: &str, b: &str| {
        let (s, e) = (
            kernel.symbols.addr(a).unwrap_or(0),
            kernel.symbols.addr(b).unwrap_or(0),
        );
        (s..e.max(s)).step_by(8)
    };
    let mut vas: Vec<u64> = range("__start_BTF", "__stop_BTF")
        .chain(range("__start_orc_unwind_ip", "__stop_orc_unwind"))
        .collect();
    let static_vas = vas.len();
    let l = &kernel.layout.task;
    for &t in sk.task_addrs.iter().chain([&sk.init_task]) {
        vas.extend((0..0x300).step_by(8).map(|o| t + o));
        if let Ok(sp) = m.u64(t + l.thread_sp) {
            vas.extend((0..0x200).step_by(8).map(|o| sp + o));
        }
    }
    vas.extend(
        (0..0x40)
            .step_by(8)
            .map(|o| kernel.addrs.per_cpu_offset + o),
    );
    for n in ["ftrace_pages_start", "ftrace_ops_list", "ftrace_lock"] {
        vas.extend(kernel.symbols.addr(n));
    }
    if let Ok(first) = m.u64(kernel.symbols.addr("ftrace_pages_start").unwrap_or(0)) {
        vas.extend((0..24).step_by(8).map(|o| first + o));
    }
    vas.extend(sk.ftrace.records.values().flat_map(|&f| [f - 8, f]));
    // Each CPU's runqueue (its `curr` and `idle`) and `current`: what a refresh reads.
    let reader = TaskReader::new(&kernel, &sk.guest);
    for base in reader.percpu_bases().unwrap_or_default() {
        let rq = base + kernel.addrs.runqueues;
        vas.extend((0..0x100).step_by(8).map(|o| rq + o));
        vas.extend(kernel.current_task_offset().map(|o| base + o));
    }
    let early = TaskReader::new(&kernel, &Unconfirmed(&sk.guest))
        .list()
        .expect("the synthetic kernel's task list");
    drop(reader);
    let words: Vec<u64> = vas.iter().filter_map(|&va| m.translate(va).ok()).collect();
    let module_pas: Vec<u64> = module_vas(&sk, &kernel)
        .iter()
        .filter_map(|&va| m.translate(va).ok())
        .collect();
    let module_words = words.len()..words.len() + module_pas.len();
    let words = [words, module_pas].concat();
    let static_words = vas[..static_vas]
        .iter()
        .filter(|&&va| m.translate(va).is_ok())
        .count();
    let mut ftrace_sites: Vec<u64> = sk.ftrace.records.keys().copied().collect();
    ftrace_sites.sort();
    let ftrace_flags = sk
        .ftrace
        .records
        .iter()
        .filter_map(|(&site, &flags)| Some((site, m.translate(flags).ok()?)))
        .collect();
    let mut text: Vec<(u64, u64)> = Vec::new();
    let t = kernel.addrs.text;
    let mut va = t.start;
    while va < t.end {
        let next = ((va | 0xfff) + 1).min(t.end);
        let pa = m
            .translate(va)
            .expect("the synthetic kernel's text is mapped");
        match text.last_mut() {
            Some(last) if last.1 == pa => last.1 = pa + (next - va),
            _ => text.push((pa, pa + (next - va))),
        }
        va = next;
    }
    drop(m);
    Fixture {
        guest: sk.guest,
        kernel,
        words,
        static_words,
        module_words,
        ftrace_sites,
        early,
        text,
        ftrace_flags,
    }
}

/// The module memory a hostile guest may change: the `modules` list head, and for each
/// module its `struct module` and symbol tables (its data, up to the end of its type
/// letters), its exports and ORC tables (its read-only data), and the `module_use` of
/// each of its users (in the direct map).
fn module_vas(sk: &SynthKernel, kernel: &Kernel) -> Vec<u64> {
    let m = kernel.memory(&sk.guest);
    let mut vas: Vec<u64> = kernel.symbols.addr("modules").into_iter().collect();
    let Ok(l) = kernel.layout.modules.as_ref() else {
        return vas;
    };
    for md in &sk.modules {
        let data_end = m
            .u64(md.addr + l.kallsyms)
            .and_then(|k| Ok(m.u64(k + l.typetab)? + u64::from(m.u32(k + l.num_symtab)?)))
            .unwrap_or(md.addr + 0x400);
        vas.extend((md.addr..data_end).step_by(8));
        let (_, orc_entries, orcs) = md.orc;
        vas.extend((md.syms..orc_entries + 6 * orcs).step_by(8));
        if let Some([source_list, link, _]) = l.users {
            let head = md.addr + source_list;
            let mut node = m.u64(head).unwrap_or(head);
            for _ in 0..sk.modules.len() {
                if node == head {
                    break;
                }
                vas.extend((0..48).step_by(8).map(|o| node - link + o));
                node = m.u64(node).unwrap_or(head);
            }
        }
    }
    vas
}

/// A `guest` input of `n` overwrites in module memory, each of a word with a value
/// near its own (a seed that starts the fuzzer in module structures).
pub fn module_seed(n: usize) -> Vec<u8> {
    FIXTURE.with(|f| {
        let f = &*f.borrow();
        let span = f.module_words.len().max(1) as u64;
        let mut state = 0x006d_6f64_u64;
        let mut rec = Vec::new();
        for i in 0..n {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let index = f.module_words.start + ((state >> 33) % span) as usize;
            let old = f.guest.read_u64(f.words[index]).unwrap_or(0);
            let value = match i % 4 {
                0 => old.wrapping_add(8),
                1 => old ^ (1 << (state >> 58)),
                2 => 0,
                _ => old.wrapping_sub(0x1000),
            };
            rec.extend((index as u16).to_le_bytes());
            rec.extend(value.to_le_bytes());
        }
        rec
    })
}

/// A `.kp` file: parse, check, and (if it parses) link into the synthetic guest, enable
/// it immediately, disable it again and unload it; then [`check_kp`] compares what the
/// engine left in the guest with what it must leave, and panics if they differ. The
/// guest is restored after each input.
pub fn kp(data: &[u8]) {
    let Ok(obj) = patcher::PatchObject::parse(data) else {
        return;
    };
    let _ = Engine::new().check_load_and_enable(data);
    FIXTURE.with(|f| {
        let f = &mut *f.borrow_mut();
        let mut g = Recorded {
            guest: &mut f.guest,
            undo: Vec::new(),
        };
        let mut e = Engine::new();
        let (loaded, unload) = match e.load(&mut g, &f.kernel, data) {
            Ok(name) => {
                let patch = e.patch(&name).expect("the patch just loaded").clone();
                for (op, at) in [(Op::Enable, 1_000), (Op::Disable, 2_000)] {
                    let begin = Begin {
                        patch: name.clone(),
                        op,
                        consistency: Consistency::Immediate,
                        timeout: None,
                        unload_on_failure: false,
                    };
                    if e.begin(begin, at).is_ok() {
                        e.tick(&mut g, &f.kernel, at);
                    }
                }
                let unload = e.unload(&mut g, &name);
                (Some(patch), unload)
            }
            Err(e) => (None, Err(e)),
        };
        let end = End {
            loaded: loaded.as_ref(),
            unload,
        };
        if let Err(why) = check_kp(f.text.as_slice(), &f.ftrace_flags, &mut g, &e, &end) {
            let name = &obj.manifest.name;
            panic!("kp: patch '{name}' left the guest in the wrong state: {why}");
        }
    });
}

/// How the `kp` target's sequence ended: the patch as loaded (`None`: the load was
/// refused, with `unload` holding why), and what its unload returned.
struct End<'p> {
    loaded: Option<&'p Patch>,
    unload: Result<(), KpError>,
}

/// Page-table entry bits the patch area's mapping uses.
const PTE_P: u64 = 1;
const PTE_RW: u64 = 1 << 1;
const PTE_NX: u64 = 1 << 63;
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;
/// A kernel page-middle entry pointing at a page table: present, writable, accessed,
/// dirty (what Linux writes, and what the area's mapping hooks in).
const PMD_TABLE: u64 = 0x63;

/// The `kp` target's oracle: after load, an immediate enable and disable, and unload,
/// the guest must hold exactly what the engine documents (patcher/src/engine.rs, `load`,
/// `unload`; patcher/src/area.rs), every other byte as before:
///
/// - load refused: no byte changed ("on error nothing was written");
/// - unloaded: the kernel text and the ftrace records as before; the patch's runs in the
///   patch area hold `int3` (code) and zeros (read-only data, data); the rest of the
///   area as before but its first pages, the area's own page tables, which stay (the
///   area is mapped once, never unmapped): every other page of the area mapped onto
///   itself, code read-only and executable, the rest not executable; outside the area,
///   only the kernel's page-middle entries covering it changed, from empty to its page
///   tables;
/// - loaded, unload refused: only while a transition of the patch still runs (an
///   immediate transition waits while a task runs a function it changes, and writes
///   nothing until it completes); then its runs hold its image, and the text is as
///   before except, while it is enabled (its disable waiting), each of its sites, which
///   holds a `jmp` to its new function (that site's ftrace record free to differ). On
///   this guest an enable that completed must be followed by a disable that completes,
///   and a disabled patch with no transition running must unload.
fn check_kp(
    text: &[(u64, u64)],
    ftrace_flags: &HashMap<u64, u64>,
    g: &mut Recorded,
    e: &Engine,
    end: &End,
) -> Result<(), String> {
    let Some(p) = end.loaded else {
        let why = end.unload.as_ref().err().map(|e| e.to_string());
        let spans = g.changes();
        return match first_change(&spans) {
            None => Ok(()),
            Some((pa, b, n)) => Err(format!(
                "the load was refused ({}), yet {pa:#x} changed from {b:#04x} to {n:#04x}",
                why.unwrap_or_default()
            )),
        };
    };
    let layout = e
        .area_layout()
        .ok_or("a patch loaded and no patch area was set up")?
        .clone();
    let area = layout.phys.start..layout.phys.start + layout.phys.size;
    let tables = area.start..area.start + layout.table_pages * 4096;
    let still = e.patch(&p.name).ok().map(|q| q.state);
    let enabled = still == Some(PatchState::Enabled);
    match (&end.unload, still) {
        (Ok(()), None) => {}
        (Ok(()), Some(s)) => return Err(format!("unloaded, yet still listed as {s:?}")),
        (Err(why), None) => return Err(format!("its unload failed ({why}), yet it is gone")),
        (Err(why), Some(s)) => {
            if e.active().is_none() {
                return Err(format!(
                    "its unload was refused ({why}) while it is {s:?} and no transition runs"
                ));
            }
        }
    }
    let ram = &g.guest.ram;
    let runs: Vec<(std::ops::Range<u64>, u8)> =
        [(p.runs.code, 0xcc), (p.runs.rodata, 0), (p.runs.data, 0)]
            .into_iter()
            .filter(|(r, _)| r.size() > 0)
            .map(|(r, fill)| (layout.pa(r.start)..layout.pa(r.start) + r.size(), fill))
            .collect();
    if still.is_none() {
        for (r, fill) in &runs {
            if let Some(i) = ram[r.start as usize..r.end as usize]
                .iter()
                .position(|b| b != fill)
            {
                return Err(format!(
                    "after unload its run at {:#x} holds {:#04x} at {:#x}, not the fill {fill:#04x}",
                    r.start,
                    ram[r.start as usize + i],
                    r.start + i as u64
                ));
            }
        }
    }
    // The area's page tables: each page but the tables' own mapped onto itself, W^X.
    let code = layout.pa(layout.code.start)..layout.pa(layout.code.end);
    for (i, entry) in ram[tables.start as usize..tables.end as usize]
        .chunks_exact(8)
        .enumerate()
    {
        let entry = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
        let page = area.start + i as u64 * 4096;
        let ok = if tables.contains(&page) {
            entry == 0
        } else {
            entry & PTE_P != 0
                && entry & PTE_ADDR == page
                && (entry & PTE_RW == 0 || entry & PTE_NX != 0)
                && code.contains(&page) == (entry & PTE_NX == 0)
        };
        if !ok {
            return Err(format!(
                "the patch area's page-table entry for {page:#x} is {entry:#x}"
            ));
        }
    }
    // While enabled, each site jumps to its new function.
    let mut sites: Vec<(u64, u64)> = Vec::new();
    if enabled {
        for f in p.funcs() {
            let rel = f.new_addr.wrapping_sub(f.site.wrapping_add(5)) as i64;
            let want = i32::try_from(rel)
                .map(|r| [&[0xe9][..], &r.to_le_bytes()].concat())
                .map_err(|_| format!("{} is out of reach of its site", f.new_name))?;
            let at = f.site_pa as usize;
            if ram[at..at + 5] != want[..] {
                return Err(format!(
                    "enabled, yet the site of {} at {:#x} holds {:02x?}, not a jmp to {:#x}",
                    f.old.name,
                    f.site,
                    &ram[at..at + 5],
                    f.new_addr
                ));
            }
            sites.push((f.site_pa, f.site_pa + 5));
            if let Some(&flags) = ftrace_flags.get(&f.site) {
                sites.push((flags, flags + 8));
            }
        }
    }
    let spans = g.changes();
    let mut mapped = Vec::new();
    for s in &spans {
        let mut i = 0;
        while i < s.now.len() {
            let pa = s.pa + i as u64;
            if s.now[i] == s.before[i]
                || area.contains(&pa)
                    && (tables.contains(&pa) || runs.iter().any(|(r, _)| r.contains(&pa)))
                || sites.iter().any(|&(a, b)| (a..b).contains(&pa))
            {
                i += 1;
                continue;
            }
            let (b, n) = (s.before[i], s.now[i]);
            if area.contains(&pa) {
                return Err(format!(
                    "the patch area changed at {pa:#x} ({b:#04x} to {n:#04x}), outside the \
                     patch's runs and the area's page tables"
                ));
            }
            if let Some(&(t, _)) = text.iter().find(|&&(a, z)| (a..z).contains(&pa)) {
                return Err(format!(
                    "the kernel text changed at {pa:#x} (text+{:#x}): {b:#04x} to {n:#04x}",
                    pa - t
                ));
            }
            // The page-middle entries that map the area: empty before, its tables now.
            let word = pa & !7;
            match s.word(word) {
                Some((0, w)) if w & !PTE_ADDR == PMD_TABLE && tables.contains(&(w & PTE_ADDR)) => {
                    mapped.push(w & PTE_ADDR);
                    i = (word + 8 - s.pa) as usize;
                }
                _ => {
                    return Err(format!(
                        "guest memory outside the kernel text and the patch area changed at \
                         {pa:#x}: {b:#04x} to {n:#04x}"
                    ))
                }
            }
        }
    }
    mapped.sort_unstable();
    if !mapped.iter().copied().eq(tables.clone().step_by(4096)) {
        return Err(format!(
            "the kernel's page-middle entries point at {mapped:#x?}, not at each of the patch \
             area's {} page tables once",
            layout.table_pages
        ));
    }
    Ok(())
}

/// The first byte `spans` changed: (address, before, now).
fn first_change(spans: &[Span]) -> Option<(u64, u8, u8)> {
    spans.iter().find_map(|s| {
        let i = s.before.iter().zip(&s.now).position(|(b, n)| b != n)?;
        Some((s.pa + i as u64, s.before[i], s.now[i]))
    })
}

/// Kernel tables as found in guest memory: BTF and what lpvmm derives from it, and
/// VMCOREINFO. The first byte picks which.
pub fn tables(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which & 1 == 0 {
        let _ = VmcoreInfo::parse(rest);
        return;
    }
    let Ok(btf) = Btf::parse(rest) else {
        return;
    };
    let _ = Layout::from_btf(&btf);
    let _ = OrcFormat::from_btf(&btf);
    let _ = btf.enum_of("FTRACE_FL_DISABLED");
    let _ = btf.enumerator("FTRACE_OPS_FL_ENABLED");
    for (s, f) in [
        ("task_struct", "thread.sp"),
        ("ftrace_ops", "func_hash"),
        ("mutex", "rtmutex.owner"),
    ] {
        if let Ok(field) = btf.field(s, f) {
            let _ = btf.size_of(field.type_id);
            let _ = btf.array_len(field.type_id);
        }
    }
    FIXTURE.with(|f| {
        let _ = FtraceLayout::from_kernel(&f.borrow().kernel.symbols, &btf);
    });
}

/// Hostile guest memory: the input is a list of (word, value) overwrites, 10 bytes each
/// (a little-endian u16 picking one of the fixture's words, then the u64 written), at
/// most 64. Then everything lpvmm reads from a paused guest, over the changed memory.
pub fn guest(data: &[u8]) {
    FIXTURE.with(|f| {
        let f = &mut *f.borrow_mut();
        let (words, static_words) = (f.words.clone(), f.static_words);
        let sites = f.ftrace_sites.clone();
        let mut g = Recorded {
            guest: &mut f.guest,
            undo: Vec::new(),
        };
        let mut tables_changed = false;
        for rec in data.chunks_exact(10).take(64) {
            let i = usize::from(u16::from_le_bytes([rec[0], rec[1]])) % words.len();
            tables_changed |= i < static_words;
            let _ = g.write(words[i], &rec[2..10]);
        }
        let attached = tables_changed.then(|| Kernel::attach(&g));
        let k = match &attached {
            Some(Ok(k)) => k,
            _ => &f.kernel,
        };
        let reader = TaskReader::new(k, &g);
        // Modules under whatever layout the (possibly re-attached) kernel has: offsets
        // from a hostile BTF too.
        let modules = ModuleCode::new(k, k.memory(&g));
        let extra: [&dyn ExtraCode; 1] = [&modules];
        if let Ok(list) = reader.list() {
            let u = Unwinder::new(&reader, &extra);
            for t in &list.tasks {
                let _ = u.trace(t);
            }
        }
        module_walk(k, &g, modules.list());
        let _ = reader.refresh(f.early.clone());
        if let Some(ft) = &k.ftrace {
            let m = k.memory(&g);
            let _ = ft.lock_owner(&m);
            for &ip in sites.iter().step_by(5) {
                let _ = ft.record(&m, ip);
                let _ = ft.users(&m, ip);
            }
        }
    });
}

/// What lpvmm reads of each module besides unwinding through it (`lpvmm modules`,
/// `sym`): its /proc/modules line, its symbols and the names of addresses in its text,
/// and its ORC table.
fn module_walk(k: &Kernel, g: &dyn PausedGuest, list: &ModuleList) {
    let m = k.memory(g);
    for md in &list.modules {
        let _ = md.proc_line();
        let _ = md.orc(&m, k);
        if let Ok(s) = md.symbols(&m, k) {
            for a in [
                md.text.start,
                md.text.start.wrapping_add(0x110),
                md.text.end,
            ] {
                let _ = (s.locate(a), s.locate_return(a));
            }
        }
    }
}

/// One control-socket request line, as the server parses it before it touches the VM.
pub fn control(data: &[u8]) {
    if let Ok(r) = serde_json::from_slice::<lpvmm::proto::RequestLine>(data) {
        let _ = serde_json::to_string(&r);
    }
}
