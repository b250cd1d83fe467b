//! Wire format, version 1: one JSON object per line each way.
//!
//! Request:  `{"v":1,"op":"pause"}`
//! Response: `{"v":1,"ok":true,"result":{...}}` or
//!           `{"v":1,"ok":false,"error":{"kind":"bad_state","message":"..."}}`

use introspection::disasm::Line;
use introspection::kallsyms::{Located, Symbol};
use introspection::kernel::AttachStats;
use introspection::stack::StackTrace;
use introspection::tasks::TaskList;
pub use patcher::Consistency;
use serde::{Deserialize, Serialize};

use introspection::vmcoreinfo::VmcoreInfo;
use introspection::VcpuState;

/// Largest guest-physical read one `read_phys` request may ask for.
pub const MAX_READ_PHYS: u32 = 64 * 1024;

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line the server reads; anything longer is refused. A patch load
/// carries the .kp file hex-encoded, so this bounds a .kp at 4 MiB.
pub const MAX_REQUEST_BYTES: usize = 8 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Pause,
    Resume,
    Stop,
    /// Registers of every vCPU. A running VM is paused just for the read.
    Regs,
    /// Read guest-physical memory (the VM must be paused).
    ReadPhys {
        addr: u64,
        len: u32,
    },
    /// Find and parse the guest kernel's VMCOREINFO note (pauses a running VM for the scan).
    Vmcoreinfo,
    /// Attach to the guest kernel (symbols, BTF, ORC) if not yet done, or again with
    /// `reattach`; reports what was read and how long it took.
    Kernel {
        #[serde(default)]
        reattach: bool,
    },
    /// Look up kernel symbols.
    Sym {
        query: SymQuery,
    },
    /// Every task of the guest, and what each vCPU runs.
    Tasks,
    /// The guest's loaded modules, as /proc/modules lists them.
    Modules,
    /// The shadow variables patches allocated in the guest.
    Shadow,
    /// Kernel stack traces: one task, or every task when `pid` is absent.
    Stack {
        #[serde(default)]
        pid: Option<i32>,
    },
    /// Disassemble a kernel function from live guest memory.
    Disasm {
        symbol: String,
        #[serde(default)]
        sympos: Option<u32>,
    },
    /// Load a patch (the .kp file, hex) and, with `enable`, start enabling it.
    PatchLoad {
        kp_hex: String,
        /// A livepatch module's parameters (`NAME=VALUE`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        params: Vec<String>,
        #[serde(default)]
        enable: bool,
        #[serde(default)]
        timeout_ms: Option<u64>,
        #[serde(default)]
        consistency: Consistency,
    },
    /// Read a patch (the file, hex) with the guest kernel's layouts, as a load would,
    /// and describe it; loads nothing. For a livepatch module, whose `struct klp_patch`
    /// is laid out as the guest's kernel lays it out.
    KpInspect {
        kp_hex: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        params: Vec<String>,
    },
    /// Start enabling or disabling a loaded patch.
    PatchEnable {
        name: String,
        #[serde(default)]
        timeout_ms: Option<u64>,
        #[serde(default)]
        consistency: Consistency,
    },
    PatchDisable {
        name: String,
        #[serde(default)]
        timeout_ms: Option<u64>,
        #[serde(default)]
        consistency: Consistency,
    },
    /// Turn the transition in progress around.
    PatchReverse,
    /// Complete the transition in progress without checks.
    PatchForce,
    /// Remove a disabled patch.
    PatchUnload {
        name: String,
    },
    /// Loaded patches, the transition in progress and recent ones.
    PatchStatus,
    /// SHA-256 of guest memory lpvmm may change: the kernel text, a module's text or the
    /// patch area.
    Checksum {
        what: ChecksumTarget,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChecksumTarget {
    /// `_stext`..`_etext` of the guest kernel.
    Text,
    /// The whole patch area (guest-physical).
    PatchArea,
    /// A loaded module's core text.
    Module { name: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum SymQuery {
    /// Every symbol of this name, in kallsyms order.
    Name { name: String },
    /// The symbol containing this address.
    Addr { addr: u64 },
    /// The whole table, in kallsyms order.
    All,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RequestLine {
    pub v: u32,
    #[serde(flatten)]
    pub request: Request,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request could not be parsed or has the wrong version.
    BadRequest,
    /// The request does not fit the VM's state (resume while running, ...).
    BadState,
    /// The VMM tried and failed.
    Failed,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ResponseLine {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl ResponseLine {
    pub fn ok(result: impl Serialize) -> Self {
        ResponseLine {
            v: PROTOCOL_VERSION,
            ok: true,
            result: Some(serde_json::to_value(result).unwrap_or(serde_json::Value::Null)),
            error: None,
        }
    }

    pub fn err(kind: ErrorKind, message: impl Into<String>) -> Self {
        ResponseLine {
            v: PROTOCOL_VERSION,
            ok: false,
            result: None,
            error: Some(ErrorBody {
                kind,
                message: message.into(),
            }),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KernelResult {
    /// True when this request attached (the first introspection request does).
    pub attached_now: bool,
    pub stats: AttachStats,
    pub pause: PauseCost,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SymResult {
    pub symbols: Vec<Symbol>,
    /// For an address query: where it is.
    pub located: Option<Located>,
    /// Functions of loaded patches that match.
    #[serde(default)]
    pub patch: Vec<PatchSymbol>,
    /// Module symbols that match (every one for `--all`), in /proc/kallsyms order.
    #[serde(default)]
    pub module_symbols: Vec<ModuleSymbolLine>,
    /// For an address in a module's code: the module.
    #[serde(default)]
    pub module: Option<String>,
}

/// A module's symbol as /proc/kallsyms lists it: `ADDR KIND NAME\t[MODULE]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleSymbolLine {
    pub module: String,
    pub addr: u64,
    /// The type letter /proc/kallsyms prints (upper case: exported by the module).
    pub kind: char,
    pub name: String,
}

/// The guest's modules, in the kernel's list order (newest first), as /proc/modules.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModulesResult {
    pub modules: Vec<introspection::modules::Module>,
    pub pause: PauseCost,
}

/// The guest's shadow variables: per id, and each one.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShadowResult {
    /// Where the table is (none before the first patch is loaded).
    pub table: Option<u64>,
    /// The table's own count.
    pub count: u64,
    pub groups: Vec<patcher::shadow::ShadowGroup>,
    pub vars: Vec<patcher::shadow::ShadowVar>,
    pub pause: PauseCost,
}

/// A function of a loaded patch.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PatchSymbol {
    pub patch: String,
    pub name: String,
    pub addr: u64,
    pub size: u64,
    /// The kernel function it replaces.
    pub replaces: String,
}

/// Where a redirected function's site jumps.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Redirect {
    pub site: u64,
    pub target: u64,
    /// The target in words.
    pub to: String,
    /// Every loaded patch's version of the function, in load order, each with its
    /// patch's state or `visible`.
    pub versions: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TasksResult {
    pub list: TaskList,
    pub pause: PauseCost,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StackResult {
    pub traces: Vec<StackTrace>,
    pub pause: PauseCost,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DisasmResult {
    /// Set when lpvmm redirected the function.
    pub redirect: Option<Redirect>,
    pub symbol: String,
    pub addr: u64,
    pub size: u64,
    pub lines: Vec<Line>,
    pub pause: PauseCost,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PatchLoadResult {
    pub name: String,
    /// The enable transition started, if one was asked for.
    pub transition: Option<u64>,
    pub pause: PauseCost,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransitionStarted {
    pub id: u64,
}

/// `patch status`: every patch, every redirected function, the transition in progress
/// and recent ones. The protocol's own view of the engine, not the engine's structs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PatchStatusResult {
    /// In load order.
    pub patches: Vec<PatchView>,
    /// Every kernel function a loaded patch names, with its versions in load order.
    pub funcs: Vec<FuncView>,
    pub active: Option<TransitionView>,
    /// Ended transitions, newest last.
    pub history: Vec<TransitionView>,
    /// Where the patch area is mapped in the guest, once it is.
    pub area: Option<AreaView>,
    /// What the guest's modules coming and going did to patches, newest last.
    #[serde(default)]
    pub module_events: Vec<ModuleEventView>,
    /// The guest's reboots in this VM and the patches applied at its boots.
    #[serde(default)]
    pub boot: BootView,
}

/// Patches applied when a boot's kernel came up (`lpvmm run --patch`, and those loaded
/// before a reboot).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BootView {
    /// How many times the guest rebooted in this VM.
    pub reboots: u64,
    /// Patches still to apply at this boot (waiting for its kernel).
    pub pending: usize,
    /// What applying them did, one line each, oldest first.
    pub log: Vec<String>,
}

/// A module the guest loaded (`coming`) or unloaded (`going`) while a patch had a part
/// for it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModuleEventView {
    pub module: String,
    pub action: String,
    pub outcome: String,
    /// lpvmm refused the module's load (the guest's insmod failed).
    pub refused: bool,
}

/// One object of a patch: vmlinux, or a module with whether the guest has it loaded.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ObjectView {
    pub name: String,
    /// `vmlinux`, `loaded` (its functions are the patch's to redirect) or `waiting`
    /// (not loaded: patched when the guest loads it).
    pub state: String,
    /// For a loaded module: its `struct module`.
    pub module: Option<u64>,
    /// For a module: the functions it replaces whenever it is loaded.
    pub replaces: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PatchView {
    pub name: String,
    /// `enabled`, `disabled`, `replaced` (by a cumulative patch), or `enabling`,
    /// `disabling` (a transition of it is in progress).
    pub state: PatchStateView,
    /// A transition of it was forced: its code stays in the guest.
    pub forced: bool,
    pub enables: u64,
    pub depends: Vec<String>,
    /// A cumulative patch (atomic replace).
    pub atomic_replace: bool,
    /// The cumulative patch that replaced it.
    pub replaced_by: Option<String>,
    /// System states it establishes.
    pub states: Vec<StateView>,
    /// Entries of objtool's unwind table for its code (kbuild builds; 0: tasks unwind
    /// through it by its frame pointer).
    pub orc_entries: usize,
    pub funcs: Vec<PatchFuncView>,
    #[serde(default)]
    pub objects: Vec<ObjectView>,
    /// How it came to be loaded at this boot, when lpvmm applied it there: `applied at
    /// boot (--patch FILE)` or `applied again after reboot N`.
    #[serde(default)]
    pub applied_at_boot: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StateView {
    pub id: u64,
    pub version: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PatchFuncView {
    /// The kernel object the function is in: `vmlinux`, or a module's name.
    #[serde(default = "vmlinux")]
    pub object: String,
    pub old: String,
    pub old_addr: u64,
    pub new_name: String,
    pub new_addr: u64,
    pub new_size: u64,
    pub frame_pointer: bool,
    pub immediate: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FuncView {
    pub name: String,
    pub addr: u64,
    pub site: u64,
    /// In load order.
    pub versions: Vec<VersionView>,
    /// What tasks run when no transition moves it: a patch's name, or `original`.
    pub visible: String,
    /// What the site holds now: `original`, `jump` (straight to the top version) or
    /// `trampoline` (a transition dispatches each task).
    pub site_now: SiteNow,
    /// lpvmm hides the function's ftrace record from the guest's ftrace while it owns
    /// the site (docs/patching.md, "The guest's ftrace and kprobes").
    #[serde(default)]
    pub ftrace_hidden: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VersionView {
    pub patch: String,
    pub function: String,
    pub addr: u64,
    /// The patch's state, as in [`PatchView::state`].
    pub state: PatchStateView,
    pub visible: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AreaView {
    pub phys_start: u64,
    pub phys_size: u64,
    pub va: u64,
    pub code_start: u64,
    pub code_end: u64,
    /// Bytes in use by patches and trampolines, and each region's size.
    pub code_used: u64,
    pub code_size: u64,
    pub rodata_used: u64,
    pub rodata_size: u64,
    pub data_used: u64,
    pub data_size: u64,
}
/// A patch's state as status shows it: its own state, or the transition moving it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatchStateView {
    Enabling,
    Disabling,
    Enabled,
    Disabled,
    Replaced,
}

/// What a function's site holds now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteNow {
    /// The kernel's own bytes.
    Original,
    /// A jump straight to one version.
    Jump,
    /// A jump to a trampoline: a transition dispatches each task.
    Trampoline,
}

/// How a transition ended, or that it has not (`failure` says why one failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeView {
    Pending,
    Done,
    Forced,
    Reversed,
    TimedOut,
    Failed,
}

impl From<&patcher::Outcome> for OutcomeView {
    fn from(o: &patcher::Outcome) -> Self {
        match o {
            patcher::Outcome::Pending => OutcomeView::Pending,
            patcher::Outcome::Done => OutcomeView::Done,
            patcher::Outcome::Forced => OutcomeView::Forced,
            patcher::Outcome::Reversed => OutcomeView::Reversed,
            patcher::Outcome::TimedOut => OutcomeView::TimedOut,
            patcher::Outcome::Failed(_) => OutcomeView::Failed,
        }
    }
}

/// The wire's word for each of these (`enabled`, `timed_out`, ...), for people too.
macro_rules! wire_word {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&snake(self))
            }
        }
    )*};
}
wire_word!(PatchStateView, SiteNow, OutcomeView);

fn vmlinux() -> String {
    "vmlinux".into()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransitionView {
    pub id: u64,
    pub patch: String,
    /// `enable` or `disable`, as asked.
    pub op: patcher::Op,
    pub consistency: Consistency,
    /// `waiting` (nothing written yet), `switching`, `ended`.
    pub phase: patcher::Phase,
    /// Heading back to where it started.
    pub reversed: bool,
    /// Reversed because its timeout passed.
    pub timed_out: bool,
    /// `pending`, `done`, `forced`, `reversed`, `timed_out`, `failed`.
    pub outcome: OutcomeView,
    pub failure: Option<String>,
    /// A request (reverse, force) waiting for the next tick.
    pub request: Option<patcher::Request>,
    pub note: Option<String>,
    pub elapsed_ms: u64,
    pub timeout_ms: Option<u64>,
    pub ticks: u32,
    pub backoff_ms: u64,
    /// Tasks at the last tick, and how many of them run the target.
    pub tasks: usize,
    pub moved: usize,
    pub pending: usize,
    pub blockers: Vec<BlockerView>,
    /// For a forced transition: the tasks it moved without a check.
    pub skipped: Vec<BlockerView>,
    /// For a transition that timed out: what held each pending task at its last tick.
    #[serde(default)]
    pub gave_up_on: Vec<BlockerView>,
    pub functions: Vec<ChangeView>,
    /// Guest-visible pause of each tick, µs.
    pub pauses_us: Vec<u64>,
    /// How the task checks were made: confirmed early traces against unwinds in the
    /// pause (docs/consistency.md, "Checks made before the pause").
    #[serde(default)]
    pub early_checks: patcher::EarlyCheckCounts,
    /// The engine's part of each tick's pause: reading the task list, checking tasks,
    /// the whole tick (µs; the rest of `pauses_us` is parking and resuming vCPUs).
    #[serde(default)]
    pub tick_parts: Vec<patcher::TickParts>,
    /// The patch's callbacks around it: those that returned (with `ret`), then the one
    /// running and those still to run (`ret` none).
    #[serde(default)]
    pub callbacks: Vec<CallbackView>,
    /// The guest's pause to queue each callback, µs.
    #[serde(default)]
    pub callback_pauses_us: Vec<u64>,
}

/// One callback of a transition.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CallbackView {
    /// `pre_patch`, `post_patch`, `pre_unpatch` or `post_unpatch`.
    pub kind: String,
    /// `vmlinux` or a module's name.
    pub object: String,
    pub func: String,
    pub ret: Option<i32>,
    /// From its queueing to its return, ms.
    pub ms: Option<u64>,
    /// lpvmm stopped waiting for it (it hung, or its kworker died), and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gave_up: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChangeView {
    pub name: String,
    pub from: String,
    pub to: String,
    pub immediate: bool,
    pub trampoline: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlockerView {
    pub pid: i32,
    pub comm: String,
    pub reason: String,
    pub trace: StackTrace,
}

/// The word a unit enum variant is on the wire (`timed_out`).
fn snake<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChecksumResult {
    pub what: ChecksumTarget,
    pub start: u64,
    pub len: u64,
    pub sha256: String,
    pub pause: PauseCost,
}

// What the VM core answers (vstate/vm.rs builds them).

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusInfo {
    pub name: String,
    pub pid: u32,
    pub state: RunState,
    pub vcpus: usize,
    pub memory_bytes: u64,
    pub kernel: String,
    pub initrd: Option<String>,
    pub cmdline: String,
    pub uptime_ms: u64,
    pub patch_area_start: u64,
    pub patch_area_size: u64,
    pub pauses: u64,
    pub last_pause_ns: Option<u64>,
    /// From the start of the lpvmm process (or, in a program that did not mark it, the
    /// creation of this VM) to the first vCPU's first `KVM_RUN`: the VMM's start-up.
    #[serde(default)]
    pub start_to_first_run_us: Option<u64>,
    /// Each virtio device: kind, name, backing file, window, interrupt, and whether its
    /// driver is ready or the device is broken.
    #[serde(default)]
    pub devices: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PauseResult {
    /// Request received → every vCPU parked, measured inside the VMM.
    pub parked_ns: u64,
    pub vcpus: Vec<VcpuState>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResumeResult {
    /// Resume request → every vCPU has left the park, measured inside the VMM.
    pub resumed_ns: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegsResult {
    /// Whether lpvmm paused a running VM for this read, and how long the guest saw it:
    /// a bare pause, the yardstick for every other request's pause.
    #[serde(flatten)]
    pub pause: PauseCost,
    pub vcpus: Vec<VcpuState>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReadPhysResult {
    pub addr: u64,
    /// Lower-case hex, two digits per byte.
    pub hex: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmcoreinfoResult {
    /// Guest-physical address of the note's text.
    pub phys_addr: u64,
    pub info: VmcoreInfo,
}

/// How long a request kept the guest paused.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PauseCost {
    /// True when the VM was running and lpvmm paused it just for this request.
    pub paused_for_read: bool,
    /// Pause request to resume done, inside the VMM (0 when no pause was needed).
    pub paused_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Phase, outcome, a patch's state and a site's content are enums in Rust and the
    /// same words on the wire (and in the CLI's text) as when they were strings.
    #[test]
    fn wire_words_are_the_documented_words() {
        let word = |v: serde_json::Value| v.as_str().map(str::to_string);
        assert_eq!(
            word(serde_json::to_value(OutcomeView::TimedOut).unwrap()),
            Some("timed_out".into())
        );
        assert_eq!(OutcomeView::TimedOut.to_string(), "timed_out");
        assert_eq!(
            OutcomeView::from(&patcher::Outcome::Failed("x".into())),
            OutcomeView::Failed
        );
        assert_eq!(PatchStateView::Enabling.to_string(), "enabling");
        assert_eq!(PatchStateView::Replaced.to_string(), "replaced");
        assert_eq!(SiteNow::Trampoline.to_string(), "trampoline");
        assert_eq!(
            word(serde_json::to_value(patcher::Phase::Switching).unwrap()),
            Some("switching".into())
        );
        let back: OutcomeView = serde_json::from_str("\"done\"").unwrap();
        assert_eq!(back, OutcomeView::Done);
    }

    #[test]
    fn requests_round_trip_and_unknown_ops_are_rejected() {
        let line = r#"{"v":1,"op":"read_phys","addr":4096,"len":8}"#;
        let r: RequestLine = serde_json::from_str(line).unwrap();
        assert_eq!(r.request, Request::ReadPhys { addr: 4096, len: 8 });
        let out = serde_json::to_string(&RequestLine {
            v: 1,
            request: Request::Pause,
        })
        .unwrap();
        assert_eq!(out, r#"{"v":1,"op":"pause"}"#);
        assert!(serde_json::from_str::<RequestLine>(r#"{"v":1,"op":"format_disk"}"#).is_err());
        assert!(serde_json::from_str::<RequestLine>(r#"{"v":1}"#).is_err());
        let sym = r#"{"v":1,"op":"sym","query":{"by":"name","name":"init_task"}}"#;
        let r: RequestLine = serde_json::from_str(sym).unwrap();
        assert_eq!(
            r.request,
            Request::Sym {
                query: SymQuery::Name {
                    name: "init_task".into()
                }
            }
        );
        let r: RequestLine = serde_json::from_str(r#"{"v":1,"op":"stack"}"#).unwrap();
        assert_eq!(r.request, Request::Stack { pid: None });
    }
}
