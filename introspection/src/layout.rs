//! Every struct offset lpvmm uses, read from the guest's BTF once at attach. Nothing
//! asks BTF anything later: what the patcher needs (a few sizes and one field) is read
//! here too, so attach can drop the parsed types (several MiB) once it is done.
//!
//! Nothing here is a number written by hand: a field that moves between kernel versions
//! (or builds) moves in BTF, and the readers follow. Where a field was renamed across
//! versions, both names are tried, newest first.

use crate::btf::{Btf, BtfError, Field};

/// Offsets in `struct task_struct` (and what it embeds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskLayout {
    pub tasks: u64,
    pub pid: u64,
    pub tgid: u64,
    pub comm: u64,
    pub comm_len: u64,
    pub stack: u64,
    pub thread_sp: u64,
    /// `__state` (5.14+) or `state`; its size in bytes.
    pub state: u64,
    pub state_size: u64,
    pub exit_state: u64,
    pub flags: u64,
    pub on_cpu: u64,
    /// `nvcsw` and `nivcsw`: the task's voluntary and involuntary context switches.
    pub nvcsw: u64,
    pub nivcsw: u64,
    /// `thread_info.cpu` (THREAD_INFO_IN_TASK) or `cpu`.
    pub cpu: u64,
    pub signal: u64,
    pub thread_node: u64,
}

/// Offsets in `struct pt_regs`: what the unwinder reads from a register frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegsLayout {
    pub size: u64,
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    pub cs: u64,
    pub r10: u64,
    pub r13: u64,
    pub di: u64,
    pub dx: u64,
}

/// `struct inactive_task_frame`: what `__switch_to_asm` leaves at a sleeping task's
/// `thread.sp`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwitchFrameLayout {
    pub size: u64,
    pub bp: u64,
    pub ret_addr: u64,
}

/// 6.2+ keeps the hottest per-CPU variables in one `struct pcpu_hot`; 6.1 has them as
/// separate per-CPU symbols.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcpuHotLayout {
    pub current_task: u64,
    pub hardirq_stack_ptr: u64,
}

/// What the patcher asks of BTF, each `None` where this kernel's BTF lacks it (the
/// patcher then says what it needed, when it needs it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatcherTypes {
    /// `sizeof(struct task_struct)`: the upper bound of the dispatch granule.
    pub task_struct_size: Option<u64>,
    /// `cpuinfo_x86.x86_capability`: the CPU feature words alternatives test.
    pub x86_capability: Option<Field>,
    /// `sizeof(struct alt_instr)`: checked against a patch's `.altinstructions`.
    pub alt_instr_size: Option<u64>,
    /// `struct blocking_notifier_head` and `struct notifier_block`: for the notifier
    /// lpvmm puts on the guest's module notifier chain.
    pub notifier: Option<NotifierLayout>,
    /// `struct __call_single_data` and `struct work_struct`: for running patch code in
    /// the guest (callbacks).
    pub guest_call: Option<GuestCallLayout>,
    /// The kernel livepatch's structures (CONFIG_LIVEPATCH): for reading a livepatch
    /// module's `struct klp_patch`.
    pub klp: Option<KlpLayout>,
    /// What lpvmm writes to make a patch a module the guest knows.
    pub guest_module: Option<GuestModuleLayout>,
}

/// The rest of `struct module`, `struct module_use`, `struct mod_kallsyms`, the module
/// address tree (`struct mod_tree_root` and its nodes, `struct rb_node`) and
/// `rq.nr_switches`: what lpvmm writes to make a loaded patch a module the guest's
/// kernel knows (kernel/module/, include/linux/rbtree_latch.h), beside what
/// [`ModuleLayout`] reads. Offsets in `struct module` unless said otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestModuleLayout {
    pub module_size: u64,
    pub target_list: u64,
    pub taints: u64,
    pub extable: u64,
    pub num_exentries: u64,
    pub bug_table: u64,
    pub num_bugs: u64,
    pub bug_list: u64,
    /// The text region's tree node (`mem[MOD_TEXT].mtn`, or `core_layout.mtn`).
    pub text_mtn: u64,
    /// 6.1's `core_layout.text_size`, `.ro_size`, `.ro_after_init_size` (the text is
    /// all of the layout); none with `mem[]`.
    pub layout_sizes: Vec<u64>,
    /// In the region (`module_memory` or `module_layout`): `mtn`, and `base`.
    pub region_mtn: u64,
    pub region_base: u64,
    /// `struct mod_tree_node`: `mod`, `node` (a `latch_tree_node`: two `rb_node`s).
    pub mtn_mod: u64,
    pub mtn_node: u64,
    /// `struct rb_node`: its size, `__rb_parent_color`, `rb_right`, `rb_left`.
    pub rb_size: u64,
    pub rb_parent_color: u64,
    pub rb_right: u64,
    pub rb_left: u64,
    /// `struct mod_tree_root`: `root.seq` (the latch's sequence), `root.tree`,
    /// `addr_min`, `addr_max`.
    pub tree_seq: u64,
    pub tree_roots: u64,
    pub addr_min: u64,
    pub addr_max: u64,
    /// `struct module_use`: size, `target_list`, `target`.
    pub use_size: u64,
    pub use_target_list: u64,
    pub use_target: u64,
    pub kallsyms_size: u64,
    /// `sizeof(struct bug_entry)`.
    pub bug_entry_size: u64,
    /// `rq.nr_switches`.
    pub rq_nr_switches: u64,
}

impl GuestModuleLayout {
    fn from_btf(btf: &Btf) -> Result<Self, BtfError> {
        let m = |f: &str| btf.field("module", f).map(|f| f.offset());
        let off = |s: &str, f: &str| btf.field(s, f).map(|f| f.offset());
        let (text_mtn, layout_sizes, region) = match btf.field("module", "mem") {
            Ok(mem) => {
                let text = btf
                    .enumerator("MOD_TEXT")
                    .ok_or_else(|| BtfError::NoStruct("enum mod_mem_type (MOD_TEXT)".into()))?;
                let stride = btf.struct_size("module_memory")?;
                let mtn = off("module_memory", "mtn")?;
                (
                    mem.offset() + text * stride + mtn,
                    Vec::new(),
                    "module_memory",
                )
            }
            Err(_) => {
                let core = m("core_layout")?;
                let l = |f: &str| off("module_layout", f).map(|o| core + o);
                let sizes = vec![l("text_size")?, l("ro_size")?, l("ro_after_init_size")?];
                (l("mtn")?, sizes, "module_layout")
            }
        };
        Ok(GuestModuleLayout {
            module_size: btf.struct_size("module")?,
            target_list: m("target_list")?,
            taints: m("taints")?,
            extable: m("extable")?,
            num_exentries: m("num_exentries")?,
            bug_table: m("bug_table")?,
            num_bugs: m("num_bugs")?,
            bug_list: m("bug_list")?,
            text_mtn,
            layout_sizes,
            region_mtn: off(region, "mtn")?,
            region_base: off(region, "base")?,
            mtn_mod: off("mod_tree_node", "mod")?,
            mtn_node: off("mod_tree_node", "node")?,
            rb_size: btf.struct_size("rb_node")?,
            rb_parent_color: off("rb_node", "__rb_parent_color")?,
            rb_right: off("rb_node", "rb_right")?,
            rb_left: off("rb_node", "rb_left")?,
            tree_seq: off("mod_tree_root", "root.seq")?,
            tree_roots: off("mod_tree_root", "root.tree")?,
            addr_min: off("mod_tree_root", "addr_min")?,
            addr_max: off("mod_tree_root", "addr_max")?,
            use_size: btf.struct_size("module_use")?,
            use_target_list: off("module_use", "target_list")?,
            use_target: off("module_use", "target")?,
            kallsyms_size: btf.struct_size("mod_kallsyms")?,
            bug_entry_size: btf.struct_size("bug_entry")?,
            rq_nr_switches: off("rq", "nr_switches")?,
        })
    }
}

/// `struct klp_patch`, `klp_object`, `klp_func`, `klp_state` (include/linux/livepatch.h),
/// `struct kernel_param` (moduleparam.h) and `sizeof(struct module)`: what lpvmm reads
/// of a livepatch module's static description, laid out as this kernel compiled it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KlpLayout {
    pub patch_mod: u64,
    pub patch_objs: u64,
    pub patch_states: u64,
    pub patch_replace: u64,
    pub object_size: u64,
    pub object_name: u64,
    pub object_funcs: u64,
    /// `callbacks.pre_patch`, `.post_patch`, `.pre_unpatch`, `.post_unpatch`.
    pub object_callbacks: [u64; 4],
    pub object_mod: u64,
    pub func_size: u64,
    pub func_old_name: u64,
    pub func_new_func: u64,
    pub func_old_sympos: u64,
    pub state_size: u64,
    pub state_id: u64,
    pub state_version: u64,
    pub param_size: u64,
    pub param_name: u64,
    pub param_ops: u64,
    pub param_arg: u64,
    pub module_size: u64,
}

impl KlpLayout {
    fn from_btf(btf: &Btf) -> Result<Self, BtfError> {
        let off = |s: &str, f: &str| btf.field(s, f).map(|f| f.offset());
        let cb = |f: &str| off("klp_object", &format!("callbacks.{f}"));
        Ok(KlpLayout {
            patch_mod: off("klp_patch", "mod")?,
            patch_objs: off("klp_patch", "objs")?,
            patch_states: off("klp_patch", "states")?,
            patch_replace: off("klp_patch", "replace")?,
            object_size: btf.struct_size("klp_object")?,
            object_name: off("klp_object", "name")?,
            object_funcs: off("klp_object", "funcs")?,
            object_callbacks: [
                cb("pre_patch")?,
                cb("post_patch")?,
                cb("pre_unpatch")?,
                cb("post_unpatch")?,
            ],
            object_mod: off("klp_object", "mod")?,
            func_size: btf.struct_size("klp_func")?,
            func_old_name: off("klp_func", "old_name")?,
            func_new_func: off("klp_func", "new_func")?,
            func_old_sympos: off("klp_func", "old_sympos")?,
            state_size: btf.struct_size("klp_state")?,
            state_id: off("klp_state", "id")?,
            state_version: off("klp_state", "version")?,
            param_size: btf.struct_size("kernel_param")?,
            param_name: off("kernel_param", "name")?,
            param_ops: off("kernel_param", "ops")?,
            param_arg: off("kernel_param", "arg")?,
            module_size: btf.struct_size("module")?,
        })
    }
}

/// A cross-CPU call and a work item (include/linux/smp_types.h, smp.h, workqueue.h):
/// what lpvmm queues to run a function in a guest kworker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestCallLayout {
    /// `sizeof(struct __call_single_data)`, its `node.llist.next`, `node.u_flags`,
    /// `func` and `info`.
    pub csd_size: u64,
    pub csd_next: u64,
    pub csd_flags: u64,
    pub csd_func: u64,
    pub csd_info: u64,
    /// `sizeof(struct work_struct)`, its `data`, `entry` (a list_head) and `func`.
    pub work_size: u64,
    pub work_data: u64,
    pub work_entry: u64,
    pub work_func: u64,
}

impl GuestCallLayout {
    fn from_btf(btf: &Btf) -> Result<Self, BtfError> {
        let csd = |f: &str| btf.field("__call_single_data", f).map(|f| f.offset());
        let work = |f: &str| btf.field("work_struct", f).map(|f| f.offset());
        Ok(GuestCallLayout {
            csd_size: btf.struct_size("__call_single_data")?,
            csd_next: csd("node.llist.next")?,
            csd_flags: csd("node.u_flags")?,
            csd_func: csd("func")?,
            csd_info: csd("info")?,
            work_size: btf.struct_size("work_struct")?,
            work_data: work("data")?,
            work_entry: work("entry")?,
            work_func: work("func")?,
        })
    }
}

/// A blocking notifier chain's head and one of its blocks (include/linux/notifier.h).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotifierLayout {
    /// `blocking_notifier_head.rwsem.count`: 0 while no reader or writer holds the
    /// chain.
    pub head_rwsem_count: u64,
    /// `blocking_notifier_head.head`: the first block.
    pub head_first: u64,
    /// `sizeof(struct notifier_block)` and its `notifier_call`, `next` and `priority`.
    pub block_size: u64,
    pub block_call: u64,
    pub block_next: u64,
    pub block_priority: u64,
}

impl NotifierLayout {
    fn from_btf(btf: &Btf) -> Result<Self, BtfError> {
        let block = |f: &str| btf.field("notifier_block", f).map(|f| f.offset());
        Ok(NotifierLayout {
            head_rwsem_count: btf.field("blocking_notifier_head", "rwsem.count")?.offset(),
            head_first: btf.field("blocking_notifier_head", "head")?.offset(),
            block_size: btf.struct_size("notifier_block")?,
            block_call: block("notifier_call")?,
            block_next: block("next")?,
            block_priority: block("priority")?,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub task: TaskLayout,
    pub signal_thread_head: u64,
    pub list_next: u64,
    pub regs: RegsLayout,
    pub switch_frame: SwitchFrameLayout,
    /// `struct rq.idle`: each CPU's idle task (not on the task list).
    pub rq_idle: u64,
    /// `struct rq.curr`: the task each CPU's scheduler last switched to (running, or
    /// being switched to), set before that task runs.
    pub rq_curr: u64,
    pub pcpu_hot: Option<PcpuHotLayout>,
    pub patcher: PatcherTypes,
    /// `struct module` and what the module list needs; an error for a kernel whose
    /// BTF lacks it (one built without modules), said when modules are asked for.
    pub modules: Result<ModuleLayout, BtfError>,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("reading struct layouts from the guest's BTF: {0}")]
pub struct LayoutError(#[from] pub BtfError);

fn first(btf: &Btf, strukt: &str, paths: &[&str]) -> Result<Field, BtfError> {
    let mut err = None;
    for p in paths {
        match btf.field(strukt, p) {
            Ok(f) => return Ok(f),
            Err(e) => err = Some(e),
        }
    }
    Err(err.unwrap_or_else(|| BtfError::NoStruct(strukt.into())))
}

impl Layout {
    pub fn from_btf(btf: &Btf) -> Result<Layout, LayoutError> {
        let task = |p: &str| btf.field("task_struct", p).map(|f| f.offset());
        let comm = btf.field("task_struct", "comm")?;
        let state = first(btf, "task_struct", &["__state", "state"])?;
        let regs = |p: &str| btf.field("pt_regs", p).map(|f| f.offset());
        let frame = |p: &str| btf.field("inactive_task_frame", p).map(|f| f.offset());
        let pcpu_hot = if btf.has_field("pcpu_hot", "current_task") {
            Some(PcpuHotLayout {
                current_task: btf.field("pcpu_hot", "current_task")?.offset(),
                hardirq_stack_ptr: btf.field("pcpu_hot", "hardirq_stack_ptr")?.offset(),
            })
        } else {
            None
        };
        Ok(Layout {
            task: TaskLayout {
                tasks: task("tasks")?,
                pid: task("pid")?,
                tgid: task("tgid")?,
                comm: comm.offset(),
                comm_len: btf.array_len(comm.type_id).unwrap_or(comm.size),
                stack: task("stack")?,
                thread_sp: task("thread.sp")?,
                state: state.offset(),
                state_size: state.size,
                exit_state: task("exit_state")?,
                flags: task("flags")?,
                on_cpu: task("on_cpu")?,
                nvcsw: task("nvcsw")?,
                nivcsw: task("nivcsw")?,
                cpu: first(btf, "task_struct", &["thread_info.cpu", "cpu"])?.offset(),
                signal: task("signal")?,
                thread_node: task("thread_node")?,
            },
            signal_thread_head: btf.field("signal_struct", "thread_head")?.offset(),
            list_next: btf.field("list_head", "next")?.offset(),
            regs: RegsLayout {
                size: btf.struct_size("pt_regs")?,
                ip: regs("ip")?,
                sp: regs("sp")?,
                bp: regs("bp")?,
                cs: regs("cs")?,
                r10: regs("r10")?,
                r13: regs("r13")?,
                di: regs("di")?,
                dx: regs("dx")?,
            },
            switch_frame: SwitchFrameLayout {
                size: btf.struct_size("inactive_task_frame")?,
                bp: frame("bp")?,
                ret_addr: frame("ret_addr")?,
            },
            rq_idle: btf.field("rq", "idle")?.offset(),
            rq_curr: btf.field("rq", "curr")?.offset(),
            pcpu_hot,
            patcher: PatcherTypes {
                task_struct_size: btf.struct_size("task_struct").ok(),
                x86_capability: btf.field("cpuinfo_x86", "x86_capability").ok(),
                alt_instr_size: btf.struct_size("alt_instr").ok(),
                notifier: NotifierLayout::from_btf(btf).ok(),
                guest_call: GuestCallLayout::from_btf(btf).ok(),
                klp: KlpLayout::from_btf(btf).ok(),
                guest_module: GuestModuleLayout::from_btf(btf).ok(),
            },
            modules: ModuleLayout::from_btf(btf),
        })
    }
}

/// Where a module keeps its memory: up to 6.3 two `struct module_layout`s, from 6.4 an
/// array of `struct module_memory`, one per `enum mod_mem_type`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModuleMemLayout {
    Layouts {
        core: u64,
        init: u64,
        /// `CONFIG_ARCH_WANTS_MODULES_DATA_IN_VMALLOC`: data apart from text.
        data: Option<u64>,
        base: u64,
        size: u64,
        text_size: u64,
    },
    Mem {
        array: u64,
        stride: u64,
        base: u64,
        size: u64,
        /// `MOD_MEM_NUM_TYPES`.
        types: u64,
        text: u64,
        init_text: u64,
    },
}

/// Every offset the module readers use, from the guest's BTF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleLayout {
    pub list: u64,
    pub name: u64,
    pub name_len: u64,
    pub state: u64,
    pub state_size: u64,
    pub mem: ModuleMemLayout,
    /// `struct module.kallsyms` and `struct mod_kallsyms`'s fields.
    pub kallsyms: u64,
    pub symtab: u64,
    pub num_symtab: u64,
    pub strtab: u64,
    pub typetab: u64,
    /// The module's exports (`syms`, `num_syms`), and `struct kernel_symbol`:
    /// place-relative `value_offset`/`name_offset` (PREL32) or absolute `value`/`name`.
    pub syms: u64,
    pub num_syms: u64,
    pub ksym_size: u64,
    pub ksym_value: u64,
    pub ksym_name: u64,
    pub ksym_relative: bool,
    /// `refcnt` (with CONFIG_MODULE_UNLOAD).
    pub refcnt: Option<u64>,
    /// `taints`: the TAINT_* bits a module brought (`(OE)`, `(K)` in /proc/modules).
    pub taints: Option<u64>,
    /// Who uses the module (with CONFIG_MODULE_UNLOAD): `source_list`, and in
    /// `struct module_use` the link and the user.
    pub users: Option<[u64; 3]>,
    /// `init` and `exit`: a module with an init but no exit can never be unloaded.
    pub init_fn: u64,
    pub exit_fn: Option<u64>,
    /// `arch.num_orcs`, `arch.orc_unwind_ip`, `arch.orc_unwind` (x86 with ORC).
    pub orc: Option<[u64; 3]>,
    /// The values of `enum module_state`.
    pub states: [u64; 4],
}

impl ModuleLayout {
    pub fn from_btf(btf: &Btf) -> Result<ModuleLayout, BtfError> {
        let f = |p: &str| btf.field("module", p).map(|f| f.offset());
        let name = btf.field("module", "name")?;
        let state = btf.field("module", "state")?;
        let kallsyms = |p: &str| btf.field("mod_kallsyms", p).map(|f| f.offset());
        let relative = btf.has_field("kernel_symbol", "value_offset");
        let ksym = |new: &str, old: &str| {
            btf.field("kernel_symbol", if relative { new } else { old })
                .map(|f| f.offset())
        };
        let state_of = |n: &str| {
            btf.enumerator(n)
                .ok_or_else(|| BtfError::NoStruct(format!("enum module_state ({n})")))
        };
        let orc = match (
            f("arch.num_orcs"),
            f("arch.orc_unwind_ip"),
            f("arch.orc_unwind"),
        ) {
            (Ok(n), Ok(ip), Ok(u)) => Some([n, ip, u]),
            _ => None,
        };
        Ok(ModuleLayout {
            list: f("list")?,
            name: name.offset(),
            name_len: btf.array_len(name.type_id).unwrap_or(name.size),
            state: state.offset(),
            state_size: state.size,
            mem: mem_layout(btf)?,
            kallsyms: f("kallsyms")?,
            symtab: kallsyms("symtab")?,
            num_symtab: kallsyms("num_symtab")?,
            strtab: kallsyms("strtab")?,
            typetab: kallsyms("typetab")?,
            syms: f("syms")?,
            num_syms: f("num_syms")?,
            ksym_size: btf.struct_size("kernel_symbol")?,
            ksym_value: ksym("value_offset", "value")?,
            ksym_name: ksym("name_offset", "name")?,
            ksym_relative: relative,
            refcnt: f("refcnt").ok(),
            taints: f("taints").ok(),
            users: match (
                f("source_list"),
                btf.field("module_use", "source_list"),
                btf.field("module_use", "source"),
            ) {
                (Ok(a), Ok(b), Ok(c)) => Some([a, b.offset(), c.offset()]),
                _ => None,
            },
            init_fn: f("init")?,
            exit_fn: f("exit").ok(),
            orc,
            states: [
                state_of("MODULE_STATE_LIVE")?,
                state_of("MODULE_STATE_COMING")?,
                state_of("MODULE_STATE_GOING")?,
                state_of("MODULE_STATE_UNFORMED")?,
            ],
        })
    }
}

fn mem_layout(btf: &Btf) -> Result<ModuleMemLayout, BtfError> {
    if let Ok(mem) = btf.field("module", "mem") {
        let types = btf.array_len(mem.type_id).unwrap_or(0);
        let need = |n: &str| {
            btf.enumerator(n)
                .ok_or_else(|| BtfError::NoStruct(format!("enum mod_mem_type ({n})")))
        };
        return Ok(ModuleMemLayout::Mem {
            array: mem.offset(),
            stride: btf.struct_size("module_memory")?,
            base: btf.field("module_memory", "base")?.offset(),
            size: btf.field("module_memory", "size")?.offset(),
            types,
            text: need("MOD_TEXT")?,
            init_text: need("MOD_INIT_TEXT")?,
        });
    }
    let l = |p: &str| btf.field("module_layout", p).map(|f| f.offset());
    Ok(ModuleMemLayout::Layouts {
        core: btf.field("module", "core_layout")?.offset(),
        init: btf.field("module", "init_layout")?.offset(),
        data: btf.field("module", "data_layout").ok().map(|f| f.offset()),
        base: l("base")?,
        size: l("size")?,
        text_size: l("text_size")?,
    })
}
