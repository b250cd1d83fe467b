//! x86-64 platform setup: what the guest finds when it starts (memory layout and e820,
//! boot parameters, CPUID and registers, ACPI tables). Written once, before the first
//! `KVM_RUN`.

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod layout;
