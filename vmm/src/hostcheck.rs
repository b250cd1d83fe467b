//! Is this host's KVM able to run a stock kernel?
//!
//! A /dev/kvm without hardware virtualization underneath (for example PVM, a software
//! KVM) opens fine and creates VMs, but a stock kernel then crawls through instruction
//! emulation and dies with "KVM internal error". Saying so up front beats a hang.

use anyhow::{anyhow, bail, Result};
use kvm_ioctls::{Cap, Kvm};

const NESTED_HINT: &str = "to use lpvmm on this machine, run it inside the nested test host \
     (QEMU with an emulated AMD SVM CPU): scripts/demo.sh does that, see docs/getting-started.md";

/// CPUID tells whether the host CPU exposes VMX (Intel) or SVM (AMD).
pub fn host_has_hardware_virtualization() -> bool {
    let l1 = std::arch::x86_64::__cpuid(1);
    let ext = std::arch::x86_64::__cpuid(0x8000_0001);
    let vmx = l1.ecx & (1 << 5) != 0;
    let svm = ext.ecx & (1 << 2) != 0;
    vmx || svm
}

pub fn open_kvm() -> Result<Kvm> {
    if std::env::var_os("LPVMM_ALLOW_SOFTWARE_KVM").is_none() && !host_has_hardware_virtualization()
    {
        bail!(
            "this machine's /dev/kvm is not backed by hardware virtualization (the CPU shows \
             neither VMX nor SVM): it cannot boot a stock Linux kernel; {NESTED_HINT}"
        );
    }
    let kvm = Kvm::new().map_err(|e| {
        anyhow!("cannot open /dev/kvm: {e}; lpvmm needs KVM with hardware virtualization; {NESTED_HINT}")
    })?;
    for (cap, what) in [
        (Cap::Irqchip, "an in-kernel interrupt controller"),
        (Cap::UserMemory, "user memory regions"),
        (
            Cap::ImmediateExit,
            "KVM_RUN immediate_exit (needed to pause vCPUs)",
        ),
        (Cap::Irqfd, "irqfd"),
        (Cap::Pit2, "the in-kernel PIT"),
    ] {
        if !kvm.check_extension(cap) {
            bail!("this KVM lacks {what}; lpvmm cannot run here");
        }
    }
    Ok(kvm)
}
