//! lpvmm: boots Linux guests on KVM and live-patches their kernels from the
//! hypervisor. The VMM is this library; the `lpvmm` binary only parses arguments.
//!
//! - The VM core: [`vm`] (KVM objects, memory, pause and resume), [`vcpu`] (the vCPU
//!   state machine), with platform setup apart ([`boot`], [`cpu`], [`acpi`],
//!   [`devices`], [`pci`], [`layout`], [`host_memory`]); [`paused`] is the paused guest the
//!   introspection and patcher crates read and write.
//! - On top of it, [`session`]: the guest kernel once attached ([`inspect`]) and the
//!   patch engine with its driver ([`patching`]).
//! - The control plane apart: [`control`] (socket server, wire protocol, client) and
//!   the CLI commands ([`cli`], [`cli_inspect`], [`cli_patch`]); [`run`] ties a VM,
//!   its console and its control socket together.

// Every `unsafe` block says why it is sound (a `// SAFETY:` line), checked by clippy.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod acpi;
pub mod boot;
pub mod cli;
pub mod cli_cycles;
pub mod cli_inspect;
pub mod cli_patch;
pub mod console;
pub mod control;
pub mod cpu;
pub mod devices;
pub mod host_memory;
pub mod hostcheck;
pub mod inspect;
pub mod layout;
pub mod patching;
pub mod paused;
pub mod pci;
pub mod run;
pub mod seccomp;
pub mod session;
pub mod vcpu;
pub mod vm;

/// When this process began, as the binary marks it first thing in `main`
/// ([`mark_process_start`]): `status` reports the time from there to the first
/// `KVM_RUN` (how long the VMM takes to start a guest).
static PROCESS_START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Mark now as the start of the process (the first call counts).
pub fn mark_process_start() {
    PROCESS_START.get_or_init(std::time::Instant::now);
}

/// The instant [`mark_process_start`] recorded, if it was called.
pub fn process_start() -> Option<std::time::Instant> {
    PROCESS_START.get().copied()
}

/// The kernel command line `lpvmm run` gives a guest unless told otherwise.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
