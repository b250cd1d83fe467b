//! vCPU set-up for the 64-bit boot protocol: CPUID, LAPIC, and (for the boot CPU only)
//! long mode with an identity map, flat segments, and registers pointing at the kernel.
//!
//! Secondary vCPUs are left in KVM's reset state; the guest wakes them with INIT/SIPI
//! through the in-kernel LAPIC.

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::arch::layout;
use introspection::VcpuState;

/// Setting up a vCPU for the boot protocol, or reading a parked one's registers: each
/// variant names the KVM ioctl (or the step) that failed.
#[derive(Debug, Error)]
pub enum CpuError {
    #[error("KVM_GET_SUPPORTED_CPUID")]
    GetSupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_CPUID2")]
    SetCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_LAPIC")]
    GetLapic(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_LAPIC")]
    SetLapic(#[source] kvm_ioctls::Error),
    #[error("writing the boot page tables and GDT")]
    BootTables(#[source] GuestMemoryError),
    #[error("KVM_GET_SREGS")]
    GetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_SREGS")]
    SetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_REGS")]
    GetRegs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_REGS")]
    SetRegs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_FPU")]
    SetFpu(#[source] kvm_ioctls::Error),
    #[error("building MSR list")]
    MsrList(#[source] vmm_sys_util::fam::Error),
    #[error("KVM_GET_MSRS")]
    GetMsrs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS")]
    SetMsrs(#[source] kvm_ioctls::Error),
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// GDT as the boot protocol wants it: __BOOT_CS = 0x10, __BOOT_DS = 0x18, TSS at 0x20.
const GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // 0x10: 64-bit code, present, DPL 0
    gdt_entry(0xc093, 0, 0xfffff), // 0x18: data, read/write
    gdt_entry(0x808b, 0, 0xfffff), // 0x20: busy 64-bit TSS
];
const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

fn segment(entry: u64, selector: u16) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// The CPUID table every vCPU gets: what KVM supports, with per-vCPU APIC IDs and the
/// hypervisor bit set.
pub fn base_cpuid(kvm: &Kvm) -> Result<CpuId, CpuError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuError::GetSupportedCpuid)
}

pub fn set_cpuid(vcpu: &VcpuFd, base: &CpuId, index: u8, count: u8) -> Result<(), CpuError> {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
            }
            0xb | 0x1f => e.edx = u32::from(index), // x2APIC ID
            0x8000_001e => e.eax = u32::from(index), // AMD extended APIC ID
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(CpuError::SetCpuid)
}

/// LINT0 delivers ExtINT (the PIC), LINT1 delivers NMI, as firmware would set them up.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), CpuError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(CpuError::GetLapic)?;
    let regs = &mut lapic.regs;
    let mut set = |off: usize, mode: u32| {
        let bytes: [u8; 4] = [
            regs[off] as u8,
            regs[off + 1] as u8,
            regs[off + 2] as u8,
            regs[off + 3] as u8,
        ];
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as _;
        }
    };
    set(APIC_LVT0, MODE_EXTINT);
    set(APIC_LVT1, MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(CpuError::SetLapic)
}

/// Identity map of the first 1 GiB with 2 MiB pages: covers the kernel, zero page and
/// command line, which is all the 64-bit entry needs.
pub fn write_boot_page_tables(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    let write = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(CpuError::BootTables)
    };
    write(PDPT_ADDR_ENTRY, layout::PML4_ADDR)?;
    write(PD_ADDR_ENTRY, layout::PDPT_ADDR)?;
    for i in 0..512u64 {
        let entry = (i << 21) | 0x83; // present, writable, 2 MiB page
        write(entry, layout::PD_ADDR + i * 8)?;
    }
    for (i, e) in GDT.iter().enumerate() {
        write(*e, layout::GDT_ADDR + i as u64 * 8)?;
    }
    Ok(())
}
const PDPT_ADDR_ENTRY: u64 = layout::PDPT_ADDR | 0x3;
const PD_ADDR_ENTRY: u64 = layout::PD_ADDR | 0x3;

/// Put the boot vCPU in long mode at the kernel's 64-bit entry.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: u64) -> Result<(), CpuError> {
    let mut sregs = vcpu.get_sregs().map_err(CpuError::GetSregs)?;
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let code = segment(GDT[2], BOOT_CS);
    let data = segment(GDT[3], BOOT_DS);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(GDT[4], BOOT_TSS);
    sregs.cr3 = layout::PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(CpuError::SetSregs)?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: layout::BOOT_STACK_TOP,
        rbp: layout::BOOT_STACK_TOP,
        rsi: layout::ZERO_PAGE_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(CpuError::SetRegs)?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(CpuError::SetFpu)?;

    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: MISC_ENABLE_FAST_STRING,
        ..Default::default()
    }])
    .map_err(CpuError::MsrList)?;
    vcpu.set_msrs(&msrs).map_err(CpuError::SetMsrs)?;
    Ok(())
}

/// Capture what introspection needs from a parked vCPU.
pub fn capture_state(vcpu: &VcpuFd, index: usize) -> Result<VcpuState, CpuError> {
    let r = vcpu.get_regs().map_err(CpuError::GetRegs)?;
    let s = vcpu.get_sregs().map_err(CpuError::GetSregs)?;
    let mut msrs = Msrs::from_entries(&[
        kvm_msr_entry {
            index: MSR_KERNEL_GS_BASE,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_LSTAR,
            ..Default::default()
        },
    ])
    .map_err(CpuError::MsrList)?;
    let n = vcpu.get_msrs(&mut msrs).map_err(CpuError::GetMsrs)?;
    let msr = |i: usize| {
        if i < n {
            msrs.as_slice()[i].data
        } else {
            0
        }
    };
    Ok(VcpuState {
        index,
        rip: r.rip,
        rsp: r.rsp,
        rbp: r.rbp,
        rflags: r.rflags,
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        cs: s.cs.selector,
        ss: s.ss.selector,
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        efer: s.efer,
        gs_base: s.gs.base,
        kernel_gs_base: msr(0),
        lstar: msr(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let cs = segment(GDT[2], BOOT_CS);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        let ds = segment(GDT[3], BOOT_DS);
        assert_eq!((ds.db, ds.g, ds.type_), (1, 1, 0x3));
        assert_eq!(GDT[2], 0x00af_9b00_0000_ffff);
    }
}
