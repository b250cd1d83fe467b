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
use introspection::{VcpuState, VmcoreInfo};
use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line the server reads; anything longer is refused. A patch load
/// carries the .kp file hex-encoded, so this bounds a .kp at 4 MiB.
pub const MAX_REQUEST_BYTES: usize = 8 << 20;
/// Largest guest-physical read one `read_phys` request may ask for.
pub const MAX_READ_PHYS: u32 = 64 * 1024;

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
        #[serde(default)]
        enable: bool,
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Start enabling or disabling a loaded patch.
    PatchEnable {
        name: String,
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    PatchDisable {
        name: String,
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Remove a disabled patch.
    PatchUnload {
        name: String,
    },
    /// Loaded patches, the transition in progress and recent ones.
    PatchStatus,
    /// SHA-256 of guest memory lpvmm may change: the kernel text or the patch area.
    Checksum {
        what: ChecksumTarget,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChecksumTarget {
    /// `_stext`..`_etext` of the guest kernel.
    Text,
    /// The whole patch area (guest-physical).
    PatchArea,
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
    /// True when the VM was running and lpvmm paused it just for this read.
    pub paused_for_read: bool,
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
    /// True when the VM was running and lpvmm paused it just for the scan.
    pub paused_for_read: bool,
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

/// A transition with the id it was started under.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransitionRecord {
    pub id: u64,
    #[serde(flatten)]
    pub transition: patcher::Transition,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransitionStarted {
    pub id: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PatchStatusResult {
    pub patches: Vec<patcher::Patch>,
    pub active: Option<TransitionRecord>,
    /// Ended transitions, newest last.
    pub history: Vec<TransitionRecord>,
    /// Where the patch area is mapped in the guest, once it is.
    pub area: Option<patcher::area::AreaLayout>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChecksumResult {
    pub what: ChecksumTarget,
    pub start: u64,
    pub len: u64,
    pub sha256: String,
    pub pause: PauseCost,
}

#[cfg(test)]
mod tests {
    use super::*;

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
