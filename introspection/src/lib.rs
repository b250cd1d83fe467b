//! Reading a paused Linux guest.
//!
//! This crate never touches KVM. Everything it knows about a guest comes through
//! [`PausedGuest`]: guest-physical memory and a snapshot of each vCPU's registers taken
//! while that vCPU was parked. The VMM implements the trait over its real guest memory;
//! unit tests implement it over synthetic memory. Keeping that seam small is what lets
//! the introspection and patching logic be tested without a VM, and lets another backend
//! (for example a QEMU VM) be added later without changing them.
//!
//! From the running guest alone (no System.map, no debug package, no offsets written by
//! hand): [`vmcoreinfo`] finds the kernel, [`kallsyms`] decodes its symbol table,
//! [`btf`] and [`layout`] give struct layouts, [`memory`] walks its page tables,
//! [`tasks`] lists tasks, [`modules`] the loaded modules, and [`stack`] unwinds their
//! kernel stacks with [`orc`] (the kernel's and each module's).
#![forbid(unsafe_code)]

pub mod btf;
pub mod disasm;
pub mod ftrace;
mod guest;
pub mod kallsyms;
pub mod kernel;
pub mod layout;
pub mod memory;
pub mod modules;
pub mod orc;
pub mod stack;
#[cfg(any(test, feature = "synthetic"))]
pub mod synth;
pub mod tasks;
#[cfg(test)]
mod tests;
pub mod vmcoreinfo;

pub use guest::{
    each_chunk_len, GuestError, GuestRam, PausedGuest, PhysRange, Unconfirmed, VcpuState,
};
pub use kernel::{AttachError, Kernel};
pub use vmcoreinfo::{VmcoreInfo, VmcoreInfoError};
