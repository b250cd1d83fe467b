//! A fake kernel in a [`SynthGuest`]: the tables a real one has, built the way the real
//! build does (scripts/kallsyms compression, objtool ORC entries, pahole BTF), with tasks
//! whose stacks unwind through made-up functions. Variants cover the 6.1 and 6.12
//! formats (ORC entry layout, `pcpu_hot`, per-CPU symbol encoding, paging levels), and
//! `field_shift` moves every task_struct field to prove layouts come from BTF.

use std::collections::HashMap;

use super::btf::BtfBuilder;
use super::ftrace::SynthFtrace;
use super::image::{
    frame_size, function_body, link_ring, orc_row, Builder, Image, Kind, FUNC_SIZE,
};
use super::modules::{BuiltModule, SynthModule};
use super::SynthGuest;
use crate::guest::VcpuState;
use crate::kallsyms::Symbol;

const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
const IMAGE_PA: u64 = 0x10_0000;
/// The image (which doubles as the direct map) of a kernel with few tasks; each task
/// beyond that takes [`TASK_SPACE`] more (see [`SynthKernelSpec::layout`]).
const IMAGE_SIZE: u64 = 6 << 20;
/// Image space per task: its task_struct, and its stack aligned to THREAD_SIZE.
const TASK_SPACE: u64 = 2 * THREAD_SIZE;
/// Where inside a function its call sites (return addresses) are.
const CALL_SITE: u64 = 0x10;
pub const THREAD_SIZE: u64 = 0x4000;
/// Byte offsets of `struct rq`'s `curr` and `idle` in the synthetic BTF.
const RQ_CURR: u64 = 128;
const RQ_IDLE: u64 = 136;

#[derive(Clone, Debug)]
pub struct SynthTask {
    pub pid: i32,
    pub tgid: i32,
    pub comm: String,
    /// Raw `__state`.
    pub state: u64,
    pub kthread: bool,
    /// Call chain, innermost function first. The outermost decides how the stack ends:
    /// `entry_SYSCALL_64_after_hwframe` (user registers) or `ret_from_fork` (end hint).
    pub calls: Vec<String>,
    /// Current on this vCPU; `user_mode` says whether the vCPU is in user mode.
    pub running_on: Option<usize>,
    pub user_mode: bool,
}

impl SynthTask {
    pub fn sleeping(pid: i32, tgid: i32, comm: &str, calls: &[&str]) -> SynthTask {
        SynthTask {
            pid,
            tgid,
            comm: comm.into(),
            state: 1,
            kthread: calls.last() == Some(&"ret_from_fork"),
            calls: calls.iter().map(|s| s.to_string()).collect(),
            running_on: None,
            user_mode: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SynthKernelSpec {
    pub release: String,
    /// 6.4+ formats: ORC entries (3-bit type, signal bit), and modules' memory in
    /// `struct module`'s `mem[]` (not `core_layout`/`init_layout`).
    pub new_orc: bool,
    /// 6.2+ `struct pcpu_hot`.
    pub pcpu_hot: bool,
    pub five_level: bool,
    pub cpus: usize,
    pub kaslr: u64,
    /// Added to every task_struct field offset (and its size).
    pub field_shift: u32,
    pub tasks: Vec<SynthTask>,
    /// More functions to put in the text, by name (each with an fentry NOP).
    pub functions: Vec<String>,
    /// Loaded modules, in load order (the `modules` list holds them newest first).
    /// Task call chains may name their functions.
    pub modules: Vec<SynthModule>,
}

impl SynthKernelSpec {
    fn base(release: &str, new: bool) -> Self {
        let user = |pid, comm: &str, inner: &[&str]| {
            let mut calls: Vec<&str> = inner.to_vec();
            calls.extend([
                "ksys_read",
                "do_syscall_64",
                "entry_SYSCALL_64_after_hwframe",
            ]);
            SynthTask::sleeping(pid, pid, comm, &calls)
        };
        let mut thread = user(
            12,
            "reader-thr",
            &["__schedule", "schedule", "pipe_read", "vfs_read"],
        );
        thread.tgid = 11;
        SynthKernelSpec {
            release: release.into(),
            new_orc: new,
            pcpu_hot: new,
            five_level: new,
            cpus: 2,
            kaslr: 0x1e00_0000,
            field_shift: 0,
            functions: [
                "cmdline_proc_show",
                "meminfo_proc_show",
                "seq_printf",
                "__x86_return_thunk",
                "__x86_indirect_thunk_rax",
                "memcpy",
                "msleep",
                "_printk",
                "queue_work_on",
                "no_fentry",
            ]
            .map(String::from)
            .to_vec(),
            tasks: vec![
                SynthTask::sleeping(
                    1,
                    1,
                    "init",
                    &[
                        "__schedule",
                        "schedule",
                        "do_wait",
                        "kernel_wait4",
                        "do_syscall_64",
                        "entry_SYSCALL_64_after_hwframe",
                    ],
                ),
                SynthTask::sleeping(
                    2,
                    2,
                    "kthreadd",
                    &["__schedule", "schedule", "kthreadd", "ret_from_fork"],
                ),
                user(
                    11,
                    "reader",
                    &["__schedule", "schedule", "pipe_read", "vfs_read"],
                ),
                thread,
                SynthTask {
                    running_on: Some(0),
                    state: 0,
                    ..user(20, "busy-kernel", &["clear_user", "read_zero", "vfs_read"])
                },
                SynthTask {
                    running_on: Some(1),
                    user_mode: true,
                    state: 0,
                    calls: vec![],
                    ..SynthTask::sleeping(21, 21, "busy-user", &[])
                },
                // Asleep in a module: the tunx module's read.
                user(
                    30,
                    "tunx-reader",
                    &[
                        "__schedule",
                        "schedule",
                        "tunx_do_read",
                        "tunx_chr_read_iter",
                        "vfs_read",
                    ],
                ),
            ],
            modules: SynthModule::defaults(),
        }
    }

    /// Where the image, the patch area and the page tables go: a kernel with a few
    /// tasks has a 6 MiB image, its patch area at 8 MiB and 24 MiB of RAM; one with
    /// thousands of tasks (benchmarks of the per-task checks) a larger image, and
    /// everything after it moved up.
    ///
    /// The larger image is mapped with 2 MiB pages, as a real kernel maps its direct map
    /// (where every task_struct is), so that reading thousands of tasks costs what it
    /// costs there.
    fn layout(&self) -> SynthLayout {
        let extra = (self.tasks.len() as u64).saturating_sub(64) * TASK_SPACE;
        let large_pages = extra > 0;
        let image = (IMAGE_SIZE + extra).next_multiple_of(2 << 20);
        let image_pa = if large_pages { 2 << 20 } else { IMAGE_PA };
        let patch_area = (image_pa + image + (1 << 20)).next_multiple_of(2 << 20);
        SynthLayout {
            image,
            image_pa,
            large_pages,
            patch_area,
            ram: patch_area + PATCH_AREA + (12 << 20),
        }
    }

    /// Formats of Debian's 6.1 kernel.
    pub fn v6_1() -> Self {
        Self::base("6.1.0-synth-amd64", false)
    }

    /// Formats of Debian's 6.12 kernel.
    pub fn v6_12() -> Self {
        Self::base("6.12.0-synth-amd64", true)
    }
}

/// The size of the patch area a synthetic guest reserves.
const PATCH_AREA: u64 = 4 << 20;

/// See [`SynthKernelSpec::layout`].
struct SynthLayout {
    image: u64,
    image_pa: u64,
    large_pages: bool,
    patch_area: u64,
    ram: u64,
}

pub struct SynthKernel {
    pub guest: SynthGuest,
    pub spec: SynthKernelSpec,
    /// Ground truth: the symbol table in kallsyms order.
    pub symbols: Vec<Symbol>,
    pub functions: HashMap<String, u64>,
    /// task_struct address of each spec task, in spec order.
    pub task_addrs: Vec<u64>,
    pub init_task: u64,
    pub ftrace: SynthFtrace,
    /// Ground truth of each spec module, in spec (load) order.
    pub modules: Vec<BuiltModule>,
}

/// Field offsets the synthetic task_struct uses (shifted by `field_shift`).
struct TaskFields {
    size: u64,
    tasks: u64,
    pid: u64,
    tgid: u64,
    comm: u64,
    stack: u64,
    thread_sp: u64,
    state: u64,
    exit_state: u64,
    flags: u64,
    on_cpu: u64,
    cpu: u64,
    signal: u64,
    thread_node: u64,
    nvcsw: u64,
    nivcsw: u64,
}

const PT_REGS: [&str; 21] = [
    "r15", "r14", "r13", "r12", "bp", "bx", "r11", "r10", "r9", "r8", "ax", "cx", "dx", "si", "di",
    "orig_ax", "ip", "cs", "flags", "sp", "ss",
];
const SWITCH_FRAME: [&str; 7] = ["r15", "r14", "r13", "r12", "bx", "bp", "ret_addr"];

fn reg_off(name: &str) -> u64 {
    8 * PT_REGS
        .iter()
        .position(|r| *r == name)
        .expect("pt_regs field") as u64
}

fn build_btf(spec: &SynthKernelSpec, f: &TaskFields) -> Vec<u8> {
    let mut b = BtfBuilder::new();
    let ulong = b.int("long unsigned int", 8);
    let int = b.int("int", 4);
    let uint = b.int("unsigned int", 4);
    let s16 = b.int("short int", 2);
    let chr = b.int("char", 1);
    let voidp = b.ptr(0);
    let list = b.strukt("list_head", 16, &[("next", voidp, 0), ("prev", voidp, 64)]);
    let thread = b.strukt("thread_struct", 16, &[("es", s16, 0), ("sp", ulong, 64)]);
    let tinfo = b.strukt("thread_info", 16, &[("flags", ulong, 0), ("cpu", uint, 96)]);
    let comm = b.array(chr, 16);
    let bits = |o: u64| (o * 8) as u32;
    b.strukt(
        "task_struct",
        f.size as u32,
        &[
            ("thread_info", tinfo, bits(f.cpu - 12)),
            ("__state", uint, bits(f.state)),
            ("stack", voidp, bits(f.stack)),
            ("flags", uint, bits(f.flags)),
            ("on_cpu", int, bits(f.on_cpu)),
            ("tasks", list, bits(f.tasks)),
            ("exit_state", int, bits(f.exit_state)),
            ("pid", int, bits(f.pid)),
            ("tgid", int, bits(f.tgid)),
            ("thread_node", list, bits(f.thread_node)),
            ("nvcsw", ulong, bits(f.nvcsw)),
            ("nivcsw", ulong, bits(f.nivcsw)),
            ("comm", comm, bits(f.comm)),
            ("signal", voidp, bits(f.signal)),
            ("thread", thread, bits(f.thread_sp - 8)),
        ],
    );
    b.strukt(
        "signal_struct",
        64,
        &[("nr_threads", int, 0), ("thread_head", list, 128)],
    );
    let regs: Vec<(&str, u32, u32)> = PT_REGS
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, ulong, 64 * i as u32))
        .collect();
    b.strukt("pt_regs", 8 * 21, &regs);
    let frame: Vec<(&str, u32, u32)> = SWITCH_FRAME
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, ulong, 64 * i as u32))
        .collect();
    b.strukt("inactive_task_frame", 8 * 7, &frame);
    b.strukt(
        "rq",
        256,
        &[
            ("nr_running", uint, 0),
            ("curr", voidp, (RQ_CURR * 8) as u32),
            ("idle", voidp, (RQ_IDLE * 8) as u32),
        ],
    );
    if spec.pcpu_hot {
        let inner = b.strukt(
            "",
            40,
            &[
                ("current_task", voidp, 0),
                ("preempt_count", int, 64),
                ("cpu_number", int, 96),
                ("top_of_stack", ulong, 128),
                ("hardirq_stack_ptr", voidp, 192),
            ],
        );
        let pad = b.array(chr, 64);
        let u = b.union("", 64, &[("", inner, 0), ("pad", pad, 0)]);
        b.strukt("pcpu_hot", 64, &[("", u, 0)]);
    }
    let mut orc = vec![
        ("sp_offset", s16, 0, 0),
        ("bp_offset", s16, 16, 0),
        ("sp_reg", uint, 32, 4),
        ("bp_reg", uint, 36, 4),
    ];
    if spec.new_orc {
        orc.extend([("type", uint, 40, 3), ("signal", uint, 43, 1)]);
    } else {
        orc.extend([("type", uint, 40, 2), ("end", uint, 42, 1)]);
    }
    b.bitfields("orc_entry", 6, &orc);
    // ftrace (include/linux/ftrace.h, kernel/trace/ftrace.c), as synth/ftrace.rs fills it.
    let node = b.strukt(
        "hlist_node",
        16,
        &[("next", voidp, 0), ("pprev", voidp, 64)],
    );
    b.strukt(
        "ftrace_func_entry",
        32,
        &[
            ("hlist", node, 0),
            ("ip", ulong, 128),
            ("direct", ulong, 192),
        ],
    );
    b.strukt(
        "ftrace_hash",
        40,
        &[
            ("size_bits", ulong, 0),
            ("buckets", voidp, 64),
            ("count", ulong, 128),
            ("flags", ulong, 192),
        ],
    );
    b.strukt(
        "ftrace_ops_hash",
        24,
        &[("notrace_hash", voidp, 0), ("filter_hash", voidp, 64)],
    );
    b.strukt(
        "ftrace_ops",
        64,
        &[
            ("func", voidp, 0),
            ("next", voidp, 64),
            ("flags", ulong, 128),
            ("private", voidp, 192),
            ("func_hash", voidp, 256),
        ],
    );
    b.strukt("dyn_ftrace", 16, &[("ip", ulong, 0), ("flags", ulong, 64)]);
    b.strukt(
        "ftrace_page",
        24,
        &[
            ("next", voidp, 0),
            ("records", voidp, 64),
            ("index", int, 128),
            ("order", int, 160),
        ],
    );
    let atomic = b.strukt("", 8, &[("counter", ulong, 0)]);
    let atomic_long = b.typedef("atomic_long_t", atomic);
    b.strukt(
        "mutex",
        32,
        &[("owner", atomic_long, 0), ("wait_lock", uint, 64)],
    );
    // Cross-CPU calls and work items (include/linux/smp_types.h, workqueue.h).
    let llist_node = b.strukt("llist_node", 8, &[("next", voidp, 0)]);
    let csd_node = b.strukt(
        "__call_single_node",
        16,
        &[("llist", llist_node, 0), ("u_flags", uint, 64)],
    );
    b.strukt(
        "__call_single_data",
        32,
        &[
            ("node", csd_node, 0),
            ("func", voidp, 128),
            ("info", voidp, 192),
        ],
    );
    let list_head = b.strukt("", 16, &[("next", voidp, 0), ("prev", voidp, 64)]);
    b.strukt(
        "work_struct",
        32,
        &[
            ("data", atomic_long, 0),
            ("entry", list_head, 64),
            ("func", voidp, 192),
        ],
    );
    // The module notifier chain (include/linux/notifier.h, rwsem.h), 40 + 8 bytes.
    let rwsem = b.strukt(
        "rw_semaphore",
        40,
        &[("count", atomic_long, 0), ("owner", atomic_long, 64)],
    );
    b.strukt(
        "blocking_notifier_head",
        48,
        &[("rwsem", rwsem, 0), ("head", voidp, 320)],
    );
    b.strukt(
        "notifier_block",
        24,
        &[
            ("notifier_call", voidp, 0),
            ("next", voidp, 64),
            ("priority", int, 128),
        ],
    );
    b.enumeration("", 8, &super::ftrace::record_flags(spec.new_orc));
    b.enumeration(
        "",
        4,
        &[("FTRACE_OPS_FL_ENABLED", 1), ("FTRACE_OPS_FL_DYNAMIC", 2)],
    );
    let base = super::modules::BaseTypes {
        int,
        uint,
        chr,
        voidp,
        list,
    };
    super::modules::module_btf(
        &mut b,
        &base,
        &super::modules::ModuleFields::of(spec.new_orc),
    );
    b.finish()
}

/// Compress names like scripts/kallsyms: bytes stand for tokens; single characters
/// stand for themselves, and some unused byte values for common substrings.
fn token_table() -> Vec<Vec<u8>> {
    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for (i, t) in [
        "T__", "t__", "Tsys_", "do_", "_read", "schedule", "task", "Tentry",
    ]
    .iter()
    .enumerate()
    {
        tokens[1 + i] = t.as_bytes().to_vec();
    }
    tokens
}

fn compress(typed_name: &[u8], tokens: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < typed_name.len() {
        let best = (1..9u8)
            .filter(|&t| typed_name[i..].starts_with(&tokens[t as usize]))
            .max_by_key(|&t| tokens[t as usize].len());
        match best {
            Some(t) => {
                out.push(t);
                i += tokens[t as usize].len();
            }
            None => {
                out.push(typed_name[i]);
                i += 1;
            }
        }
    }
    out
}

impl SynthKernel {
    pub fn build(spec: SynthKernelSpec) -> SynthKernel {
        let layout = spec.layout();
        let mut g = SynthGuest::new(layout.ram as usize, spec.five_level);
        let image_va = 0xffff_ffff_8100_0000 + spec.kaslr;
        if layout.large_pages {
            for off in (0..layout.image).step_by(2 << 20) {
                g.map_large(image_va + off, layout.image_pa + off, 2 << 20);
            }
        } else {
            g.map(image_va, layout.image_pa, layout.image);
        }
        let mut b = Builder {
            g,
            img: Image {
                base: image_va,
                next: image_va,
                size: layout.image,
                pa: layout.image_pa,
            },
            symbols: Vec::new(),
            aliases: Vec::new(),
        };

        // --- per-CPU symbols: small absolute addresses, offsets into each CPU's area.
        let percpu_current = 0x100u64;
        let percpu_irqstack = 0x140u64;
        let percpu_runqueues = 0x1000u64;
        let percpu_size = 0x2000u64;
        if spec.pcpu_hot {
            b.sym(percpu_current, 'D', "pcpu_hot");
        } else {
            b.sym(percpu_current, 'D', "current_task");
            b.sym(percpu_irqstack, 'D', "hardirq_stack_ptr");
        }
        b.sym(percpu_runqueues, 'D', "runqueues");
        // kernel/smp.c's per-CPU queue of cross-CPU calls (an empty llist_head).
        b.sym(0x180, 'd', "call_single_queue");

        // --- text: sched text first, then the rest, each function FUNC_SIZE bytes.
        let mut names: Vec<String> = vec!["__schedule".into(), "schedule".into()];
        let mut others: Vec<String> = spec
            .tasks
            .iter()
            .flat_map(|t| t.calls.iter().cloned())
            .chain(
                [
                    "do_idle",
                    "cpu_startup_entry",
                    "ret_from_fork",
                    "helper",
                    "helper",
                ]
                .map(String::from),
            )
            .chain(spec.functions.iter().cloned())
            .filter(|n| !names.contains(n))
            .collect();
        // Functions of modules are module text, not the kernel's.
        let mut seen: std::collections::HashSet<String> = spec
            .modules
            .iter()
            .flat_map(|m| m.function_names().map(String::from))
            .collect();
        others.retain(|n| n == "helper" || seen.insert(n.clone()));
        names.extend(others);
        let text = b.img.alloc(FUNC_SIZE * (names.len() as u64 + 1), 4096);
        b.sym(text, 'T', "_text");
        b.sym(image_va + layout.image, 'B', "_end");
        b.sym(text, 'T', "_stext");
        b.sym(text, 'T', "__sched_text_start");
        let mut functions = HashMap::new();
        for (i, n) in names.iter().enumerate() {
            let a = text + FUNC_SIZE * i as u64;
            let kind = if n == "helper" { 't' } else { 'T' };
            b.sym(a, kind, n);
            functions.entry(n.clone()).or_insert(a);
            b.w(a, &function_body(n));
            if i == 1 {
                b.sym(a + FUNC_SIZE, 'T', "__sched_text_end");
            }
        }
        let etext = text + FUNC_SIZE * names.len() as u64;
        b.sym(etext, 'T', "_etext");
        b.img.next = etext + FUNC_SIZE;
        let sites: Vec<u64> = names
            .iter()
            .enumerate()
            .filter(|(_, n)| *n != "no_fentry")
            .map(|(i, _)| text + FUNC_SIZE * i as u64)
            .collect();
        let ftrace = b.ftrace(&sites);

        // --- ORC: one entry per function, sorted by address, plus a terminator.
        let mut orc_rows: Vec<(u64, [u8; 6])> = Vec::new();
        for (i, n) in names.iter().enumerate() {
            let a = text + FUNC_SIZE * i as u64;
            let row = match n.as_str() {
                "entry_SYSCALL_64_after_hwframe" => orc_row(spec.new_orc, 0, 5, 0, Kind::Regs),
                "ret_from_fork" => orc_row(spec.new_orc, 0, 0, 0, Kind::End),
                _ => orc_row(spec.new_orc, frame_size(n) as i16, 5, 0, Kind::Call),
            };
            orc_rows.push((a, row));
        }
        orc_rows.push((etext, orc_row(spec.new_orc, 0, 0, 0, Kind::Undefined)));
        let orc_ip = b.img.alloc(4 * orc_rows.len() as u64, 4);
        b.sym(orc_ip, 'D', "__start_orc_unwind_ip");
        for (i, (ip, _)) in orc_rows.iter().enumerate() {
            let at = orc_ip + 4 * i as u64;
            b.w32(at, (*ip as i64 - at as i64) as i32 as u32);
        }
        b.sym(
            orc_ip + 4 * orc_rows.len() as u64,
            'D',
            "__stop_orc_unwind_ip",
        );
        let orc_u = b.img.alloc(6 * orc_rows.len() as u64, 2);
        b.sym(orc_u, 'D', "__start_orc_unwind");
        for (i, (_, row)) in orc_rows.iter().enumerate() {
            b.w(orc_u + 6 * i as u64, row);
        }
        b.sym(orc_u + 6 * orc_rows.len() as u64, 'D', "__stop_orc_unwind");

        // --- task_struct layout (shifted) and BTF.
        let s = u64::from(spec.field_shift);
        let f = TaskFields {
            size: 0x300 + s,
            cpu: 0x0c + s,
            state: 0x18 + s,
            stack: 0x20 + s,
            flags: 0x2c + s,
            on_cpu: 0x30 + s,
            tasks: 0x40 + s,
            exit_state: 0x50 + s,
            pid: 0x58 + s,
            tgid: 0x5c + s,
            thread_node: 0x60 + s,
            nvcsw: 0x70 + s,
            nivcsw: 0x78 + s,
            comm: 0x80 + s,
            signal: 0x90 + s,
            thread_sp: 0x100 + s + 8,
        };
        let btf = build_btf(&spec, &f);
        let btf_va = b.data("__start_BTF", &btf, 8);
        b.sym(btf_va + btf.len() as u64, 'D', "__stop_BTF");

        // --- modules (their functions named by task call chains).
        let modules = super::modules::build_modules(&mut b, &spec, &mut functions);

        // --- init_task's stack (gives THREAD_SIZE), tasks, per-CPU areas.
        let (start_name, end_name) = if spec.new_orc {
            ("__start_init_stack", "__end_init_stack")
        } else {
            ("__start_init_task", "__end_init_task")
        };
        let init_stack = b.img.alloc(THREAD_SIZE, THREAD_SIZE);
        b.sym(init_stack, 'D', start_name);
        b.sym(init_stack + THREAD_SIZE, 'D', end_name);
        let init_task = b.img.alloc(f.size, 64);
        b.sym(init_task, 'D', "init_task");
        // The synthetic image doubles as the direct map: task_structs live in it.
        b.data("page_offset_base", &image_va.to_le_bytes(), 8);
        let percpu_offsets = b.img.alloc(8 * spec.cpus as u64, 8);
        b.sym(percpu_offsets, 'D', "__per_cpu_offset");
        b.data("nr_cpu_ids", &(spec.cpus as u32).to_le_bytes(), 4);
        b.data(
            "total_forks",
            &(500 + spec.tasks.len() as u64).to_le_bytes(),
            8,
        );
        b.data(
            "nr_threads",
            &(1 + spec.tasks.len() as u32).to_le_bytes(),
            4,
        );
        b.data("tasklist_lock", &[0; 8], 64);
        // An empty chain: no reader, no writer, no block.
        b.data("module_notify_list", &[0; 48], 64);
        // The workqueue a guest call queues its work on (a pointer to it).
        let wq = b.data("", &[0; 64], 64);
        b.data("system_unbound_wq", &wq.to_le_bytes(), 8);
        let mut cpu_bases = Vec::new();
        for cpu in 0..spec.cpus {
            let area = b.img.alloc(percpu_size, 4096);
            // Real kernels: VA of a per-CPU variable = its (absolute) symbol + offset.
            cpu_bases.push(area);
            b.w64(percpu_offsets + 8 * cpu as u64, area);
            let irq = b.img.alloc(THREAD_SIZE, THREAD_SIZE);
            let slot = if spec.pcpu_hot {
                percpu_current + 24
            } else {
                percpu_irqstack
            };
            b.w64(area + slot, irq + THREAD_SIZE - 8);
        }

        let write_task = |b: &mut Builder,
                          addr: u64,
                          pid: i32,
                          tgid: i32,
                          comm: &str,
                          state: u64,
                          kthread: bool| {
            b.w32(addr + f.pid, pid as u32);
            b.w32(addr + f.tgid, tgid as u32);
            let mut c = [0u8; 16];
            c[..comm.len().min(15)].copy_from_slice(&comm.as_bytes()[..comm.len().min(15)]);
            b.w(addr + f.comm, &c);
            b.w32(addr + f.state, state as u32);
            b.w32(addr + f.flags, if kthread { 0x0020_0000 } else { 0 });
        };

        // init_task (pid 0, CPU 0's idle) and one idle task per other CPU.
        write_task(&mut b, init_task, 0, 0, "swapper/0", 0, true);
        b.w64(init_task + f.stack, init_stack);
        let idle_calls = ["do_idle", "cpu_startup_entry", "ret_from_fork"];
        let mut vcpus = Vec::new();
        let mut idles = vec![init_task];
        for cpu in 1..spec.cpus {
            let t = b.img.alloc(f.size, 64);
            write_task(&mut b, t, 0, 0, &format!("swapper/{cpu}"), 0, true);
            b.w32(t + f.cpu, cpu as u32);
            idles.push(t);
        }
        for (cpu, &t) in idles.iter().enumerate() {
            let stack = if cpu == 0 {
                init_stack
            } else {
                b.img.alloc(THREAD_SIZE, THREAD_SIZE)
            };
            b.w64(t + f.stack, stack);
            let sp = build_stack(&mut b, &functions, stack, &idle_calls);
            b.w64(t + f.thread_sp, sp);
            vcpus.push(idle_vcpu(cpu, cpu_bases[cpu], &functions, sp + 8 * 7));
            b.w64(cpu_bases[cpu] + percpu_runqueues + RQ_IDLE, t);
            // Until a spec task claims the CPU, its idle task is current (and the
            // runqueue's `curr`).
            b.w64(cpu_bases[cpu] + percpu_current, t);
            b.w64(cpu_bases[cpu] + percpu_runqueues + RQ_CURR, t);
        }

        // Spec tasks: leaders on init_task.tasks, threads on their leader's signal list.
        let mut task_addrs = Vec::new();
        let mut signals: HashMap<i32, u64> = HashMap::new();
        let mut leaders = vec![init_task];
        let mut members: HashMap<u64, Vec<u64>> = HashMap::new();
        let init_signal = b.img.alloc(64, 64);
        b.w64(init_task + f.signal, init_signal);
        members.insert(init_signal, vec![init_task]);
        for t in &spec.tasks {
            let addr = b.img.alloc(f.size, 64);
            task_addrs.push(addr);
            write_task(&mut b, addr, t.pid, t.tgid, &t.comm, t.state, t.kthread);
            let stack = b.img.alloc(THREAD_SIZE, THREAD_SIZE);
            b.w64(addr + f.stack, stack);
            let calls: Vec<&str> = t.calls.iter().map(String::as_str).collect();
            let sp = build_stack(&mut b, &functions, stack, &calls);
            let signal = *signals.entry(t.tgid).or_insert_with(|| b.img.alloc(64, 64));
            b.w64(addr + f.signal, signal);
            members.entry(signal).or_default().push(addr);
            if t.pid == t.tgid {
                leaders.push(addr);
            }
            match t.running_on {
                Some(cpu) => {
                    b.w32(addr + f.on_cpu, 1);
                    b.w32(addr + f.cpu, cpu as u32);
                    b.w64(cpu_bases[cpu] + percpu_current, addr);
                    b.w64(cpu_bases[cpu] + percpu_runqueues + RQ_CURR, addr);
                    let v = &mut vcpus[cpu];
                    if t.user_mode {
                        v.cs = 0x33;
                        v.rip = 0x40_1000;
                        v.rsp = 0x7fff_0000;
                        v.gs_base = 0;
                        v.kernel_gs_base = cpu_bases[cpu];
                    } else {
                        // Interrupted in the innermost function.
                        v.rip = functions[&t.calls[0]] + 0x20;
                        v.rsp = sp + 8 * 7;
                        v.gs_base = cpu_bases[cpu];
                    }
                }
                None => b.w64(addr + f.thread_sp, sp),
            }
        }
        link_ring(
            &mut b,
            init_task + f.tasks,
            &leaders
                .iter()
                .skip(1)
                .map(|t| t + f.tasks)
                .collect::<Vec<_>>(),
        );
        for (signal, tasks) in &members {
            let nodes: Vec<u64> = tasks.iter().map(|t| t + f.thread_node).collect();
            link_ring(&mut b, signal + 16, &nodes);
        }

        // --- kallsyms tables, then the symbols that name them.
        // As scripts/kallsyms: among aliases, symbols a linker script provides go last.
        b.symbols.sort_by_key(|s| (s.addr, linker_symbol(&s.name)));
        let tokens = token_table();
        let relative_base = text;
        let mut names_blob = Vec::new();
        let mut offsets = Vec::new();
        let symbols = b.symbols.clone();
        for s in &symbols {
            let mut typed = vec![s.kind as u8];
            typed.extend_from_slice(s.name.as_bytes());
            let c = compress(&typed, &tokens);
            if c.len() > 0x7f {
                names_blob.push(0x80 | (c.len() & 0x7f) as u8);
                names_blob.push((c.len() >> 7) as u8);
            } else {
                names_blob.push(c.len() as u8);
            }
            names_blob.extend_from_slice(&c);
            // Absolute per-CPU mode: per-CPU symbols as themselves, the rest negative.
            let off: i32 = if s.addr < 0x1_0000_0000 {
                s.addr as i32
            } else {
                (relative_base as i64 - 1 - s.addr as i64) as i32
            };
            offsets.push(off);
        }
        let mut token_blob = Vec::new();
        let mut token_index = Vec::new();
        for t in &tokens {
            token_index.extend_from_slice(&(token_blob.len() as u16).to_le_bytes());
            token_blob.extend_from_slice(t);
            token_blob.push(0);
        }
        let k_num = b.data("", &(symbols.len() as u32).to_le_bytes(), 8);
        let k_names = b.data("", &names_blob, 8);
        let k_tt = b.data("", &token_blob, 8);
        let k_ti = b.data("", &token_index, 8);
        let off_bytes: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        let k_off = b.data("", &off_bytes, 8);
        let k_base = b.data("", &relative_base.to_le_bytes(), 8);

        // --- init_top_pgt: one image page mapped onto the real root table.
        let pgd_va = b.img.alloc(4096, 4096);
        let root = b.g.root().table;
        b.g.split_large(pgd_va);
        b.g.map(pgd_va, root, 4096);
        let phys_base = root as i64 - (pgd_va - START_KERNEL_MAP) as i64;
        let note = format!(
            "OSRELEASE={}\nPAGESIZE=4096\nSYMBOL(init_uts_ns)={:x}\nSYMBOL(swapper_pg_dir)={pgd_va:x}\n\
             SYMBOL(kallsyms_names)={k_names:x}\nSYMBOL(kallsyms_num_syms)={k_num:x}\n\
             SYMBOL(kallsyms_token_table)={k_tt:x}\nSYMBOL(kallsyms_token_index)={k_ti:x}\n\
             SYMBOL(kallsyms_offsets)={k_off:x}\nSYMBOL(kallsyms_relative_base)={k_base:x}\n\
             NUMBER(phys_base)={phys_base}\nSYMBOL(init_top_pgt)={pgd_va:x}\n\
             NUMBER(pgtable_l5_enabled)={}\nKERNELOFFSET={:x}\n",
            spec.release,
            init_task,
            u8::from(spec.five_level),
            spec.kaslr
        );
        let note_pa = layout.image_pa + layout.image + 0x1000;
        b.g.write_phys_raw(note_pa, note.as_bytes());
        b.g.vcpus = vcpus;
        // A patch area as lpvmm run reserves one: 2 MiB aligned, outside the image.
        b.g.patch_area = crate::guest::PhysRange {
            start: layout.patch_area,
            size: PATCH_AREA,
        };

        SynthKernel {
            guest: b.g,
            spec,
            symbols,
            functions,
            task_addrs,
            init_task,
            ftrace,
            modules,
        }
    }

    pub fn function(&self, name: &str) -> u64 {
        self.functions[name]
    }
}

impl Builder {
    /// ftrace's records of `sites` (sorted), in two pages as the kernel allocates them,
    /// its ops list (empty: only `ftrace_list_end`), `ftrace_lock`, and space for ops.
    fn ftrace(&mut self, sites: &[u64]) -> SynthFtrace {
        use super::ftrace::{MUTEX, PAGE, RECORD};
        let mut records = HashMap::new();
        let mut next_page = 0;
        let half = sites.len() / 2;
        for part in [&sites[half..], &sites[..half]] {
            let recs = self.img.alloc(RECORD * part.len() as u64, 16);
            for (i, &ip) in part.iter().enumerate() {
                let at = recs + RECORD * i as u64;
                self.w64(at, ip);
                self.w64(at + 8, 0);
                records.insert(ip, at + 8);
            }
            let page = self.img.alloc(PAGE, 8);
            self.w64(page, next_page);
            self.w64(page + 8, recs);
            self.w32(page + 16, part.len() as u32);
            next_page = page;
        }
        self.data("ftrace_pages_start", &next_page.to_le_bytes(), 8);
        let list_end = self.img.alloc(64, 8);
        self.sym(list_end, 'D', "ftrace_list_end");
        let ops_list = self.data("ftrace_ops_list", &list_end.to_le_bytes(), 8);
        let lock = self.img.alloc(MUTEX, 8);
        self.sym(lock, 'D', "ftrace_lock");
        let spare = self.img.alloc(64 << 10, 4096);
        SynthFtrace {
            records,
            ops_list,
            lock,
            spare: (spare, spare + (64 << 10)),
            va_minus_pa: self.img.base - self.img.pa,
            covers: HashMap::new(),
        }
    }
}

fn idle_vcpu(cpu: usize, base: u64, functions: &HashMap<String, u64>, rsp: u64) -> VcpuState {
    VcpuState {
        index: cpu,
        cs: 0x10,
        efer: 0x500,
        rip: functions["do_idle"] + 0x30,
        rsp,
        gs_base: base,
        ..Default::default()
    }
}

/// Lay out the frames of `calls` (innermost first) at the top of a stack; returns the
/// task's saved `thread.sp` (where its inactive_task_frame is).
fn build_stack(
    b: &mut Builder,
    functions: &HashMap<String, u64>,
    stack: u64,
    calls: &[&str],
) -> u64 {
    let top = stack + THREAD_SIZE;
    // The outermost frame's stack pointer.
    let mut sp = match calls.last() {
        Some(&"entry_SYSCALL_64_after_hwframe") => {
            let regs = top - 8 * 21;
            b.w64(regs + reg_off("cs"), 0x33);
            b.w64(regs + reg_off("ip"), 0x40_2000);
            b.w64(regs + reg_off("sp"), 0x7ffe_0000);
            regs
        }
        _ => top - 64,
    };
    // From the outermost caller inwards: a callee's CFA is its caller's sp, and the
    // return address into the caller sits just below it.
    for i in (0..calls.len().saturating_sub(1)).rev() {
        let caller = functions[calls[i + 1]];
        let cfa = sp;
        b.w64(cfa - 8, caller + CALL_SITE);
        sp = cfa - frame_size(calls[i]);
    }
    // The switch frame below the innermost function's frame.
    let frame = sp - 8 * 7;
    if let Some(first) = calls.first() {
        b.w64(frame + 8 * 6, functions[*first] + CALL_SITE);
    }
    frame
}

fn linker_symbol(name: &str) -> bool {
    name.starts_with("__start_")
        || name.starts_with("__stop_")
        || name.starts_with("__end_")
        || matches!(
            name,
            "_text" | "_stext" | "_etext" | "_end" | "__sched_text_start" | "__sched_text_end"
        )
}
