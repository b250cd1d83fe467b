//! Reading a paused Linux guest.
//!
//! This crate never touches KVM. Everything it knows about a guest comes through
//! [`PausedGuest`]: guest-physical memory and a snapshot of each vCPU's registers taken
//! while that vCPU was parked. The VMM implements the trait over its real guest memory;
//! unit tests implement it over synthetic memory. Keeping that seam small is what lets
//! the introspection and patching logic be tested without a VM, and lets another backend
//! (for example a QEMU VM) be added later without changing them.

mod guest;
pub mod vmcoreinfo;

pub use guest::{GuestError, PausedGuest, PhysRange, VcpuState};
pub use vmcoreinfo::{VmcoreInfo, VmcoreInfoError};
