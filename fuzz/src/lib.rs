//! lpvmm's fuzz targets: every input lpvmm takes from outside its own trust, as
//! functions over bytes that must return, without panicking, in bounded time and memory,
//! whatever the bytes are. `src/bin/*.rs` hands each to AFL++ (afl.rs, stable Rust);
//! scripts/fuzz.sh runs them; seeds/ holds their starting corpora (`seeds` regenerates
//! the generated ones).
//!
//! - [`kp`]: a `.kp` patch file, parsed, checked against the patch stack, linked into a
//!   synthetic guest and enabled there.
//! - [`tables`]: the kernel tables lpvmm decodes from guest memory: BTF (with every
//!   layout and flag lpvmm derives from it) and VMCOREINFO.
//! - [`guest`]: hostile guest memory under a synthetic kernel: words of task structs,
//!   stacks, per-CPU data, ftrace's records and ops, kallsyms, BTF and ORC overwritten,
//!   then attach, the task list, every stack and the ftrace walks.
//! - [`control`]: a control-socket request line.
#![forbid(unsafe_code)]

use std::cell::RefCell;

use introspection::btf::Btf;
use introspection::ftrace::FtraceLayout;
use introspection::kernel::Kernel;
use introspection::layout::Layout;
use introspection::orc::OrcFormat;
use introspection::stack::Unwinder;
use introspection::synth::{SynthGuest, SynthKernel, SynthKernelSpec};
use introspection::tasks::{TaskList, TaskReader};
use introspection::{
    GuestError, GuestRam, PausedGuest, PhysRange, Unconfirmed, VcpuState, VmcoreInfo,
};
use patcher::{Begin, Consistency, Engine, GuestWriter, Op};

/// A synthetic guest whose writes are undone after each input: cheaper than a copy of
/// its RAM per execution, and each input starts from the same guest.
struct Undoable<'g> {
    guest: &'g mut SynthGuest,
    undo: Vec<(u64, Vec<u8>)>,
}

impl Undoable<'_> {
    fn write(&mut self, pa: u64, data: &[u8]) -> Result<(), GuestError> {
        let mut old = vec![0u8; data.len()];
        self.guest.read_phys(pa, &mut old)?;
        self.guest.write_phys(pa, data)?;
        self.undo.push((pa, old));
        Ok(())
    }
}

impl Drop for Undoable<'_> {
    fn drop(&mut self) {
        for (pa, old) in self.undo.drain(..).rev() {
            self.guest.write_phys_raw(pa, &old);
        }
    }
}

impl PausedGuest for Undoable<'_> {
    fn vcpu_count(&self) -> usize {
        self.guest.vcpu_count()
    }
    fn vcpu(&self, index: usize) -> Result<&VcpuState, GuestError> {
        self.guest.vcpu(index)
    }
}

impl GuestRam for Undoable<'_> {
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

impl GuestWriter for Undoable<'_> {
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
    ftrace_sites: Vec<u64>,
    /// The task list read as the patcher's early checks read it (no vCPUs), for the
    /// pause's refresh of it over hostile memory.
    early: TaskList,
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
    let static_words = vas[..static_vas]
        .iter()
        .filter(|&&va| m.translate(va).is_ok())
        .count();
    let mut ftrace_sites: Vec<u64> = sk.ftrace.records.keys().copied().collect();
    ftrace_sites.sort();
    drop(m);
    Fixture {
        guest: sk.guest,
        kernel,
        words,
        static_words,
        ftrace_sites,
        early,
    }
}

/// A `.kp` file: parse, check, and (if it parses) link into the synthetic guest,
/// enable it immediately and disable it again. Every guest write is undone after.
pub fn kp(data: &[u8]) {
    if patcher::PatchObject::parse(data).is_err() {
        return;
    }
    let _ = Engine::new().check_load_and_enable(data);
    FIXTURE.with(|f| {
        let f = &mut *f.borrow_mut();
        let mut g = Undoable {
            guest: &mut f.guest,
            undo: Vec::new(),
        };
        let mut e = Engine::new();
        let Ok(name) = e.load(&mut g, &f.kernel, data) else {
            return;
        };
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
        let _ = e.unload(&mut g, &name);
    });
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
        let mut g = Undoable {
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
        if let Ok(list) = reader.list() {
            let u = Unwinder::new(&reader, &[]);
            for t in &list.tasks {
                let _ = u.trace(t);
            }
        }
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

/// One control-socket request line, as the server parses it before it touches the VM.
pub fn control(data: &[u8]) {
    if let Ok(r) = serde_json::from_slice::<lpvmm::control::proto::RequestLine>(data) {
        let _ = serde_json::to_string(&r);
    }
}
