//! Client commands: talk to a running VM's control socket and print for humans or JSON.
//!
//! - [`vm`]: the VM as a whole (list, status, pause, registers, memory);
//! - [`inspect`]: the guest kernel (tasks, stacks, symbols);
//! - [`patch`]: patches (`lpvmm patch`, `lpvmm kp`);
//! - [`cycles`]: enable/disable cycles of a loaded patch.
//!
//! Each prints for a person, or with `--json` the protocol's own result.

use anyhow::Result;
use serde::Serialize;

pub mod cycles;
pub mod inspect;
pub mod patch;
pub mod vm;

/// Print a result as the protocol's JSON, pretty; exit status 0.
pub fn print_json(v: &impl Serialize) -> Result<i32> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(0)
}
