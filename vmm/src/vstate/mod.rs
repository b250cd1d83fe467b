//! VM state: the KVM objects and what they hold, apart from how the platform is set up
//! (`arch`) and from what the guest sees as devices (`devices`).
//!
//! - [`vm`]: the VM (memory, vCPU threads, pause and resume);
//! - [`vcpu`]: one vCPU thread's state machine;
//! - [`paused`]: the guest while every vCPU is parked, as the introspection and
//!   patcher crates read and write it;
//! - [`host_memory`]: how guest RAM is backed on the host.

pub mod host_memory;
pub mod paused;
pub mod reset;
pub mod vcpu;
pub mod vm;
