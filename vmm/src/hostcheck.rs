//! Is this host's KVM able to run a stock kernel?
//!
//! A /dev/kvm without hardware virtualization underneath (for example PVM, a software
//! KVM) opens fine and creates VMs, but a stock kernel then crawls through instruction
//! emulation and dies with "KVM internal error". Saying so up front beats a hang.

use kvm_ioctls::{Cap, Kvm};
use thiserror::Error;

const NESTED_HINT: &str = "to use lpvmm on this machine, run it inside the nested test host \
     (QEMU with an emulated AMD SVM CPU): scripts/demo.sh does that, see docs/getting-started.md";

/// Why this host's KVM cannot run lpvmm's guests.
#[derive(Debug, Error)]
pub enum HostCheckError {
    #[error(
        "this machine's /dev/kvm is not backed by hardware virtualization (the CPU shows \
         neither VMX nor SVM): it cannot boot a stock Linux kernel; {hint}",
        hint = NESTED_HINT
    )]
    NoHardwareVirtualization,
    /// The cause is told in the middle of the message, before the hint, so it is not also
    /// the error's source (which a chain would print a second time, after the hint).
    #[error(
        "cannot open /dev/kvm: {0}; lpvmm needs KVM with hardware virtualization; {hint}",
        hint = NESTED_HINT
    )]
    Open(kvm_ioctls::Error),
    #[error("this KVM lacks {0}; lpvmm cannot run here")]
    MissingCapability(&'static str),
}

/// CPUID tells whether the host CPU exposes VMX (Intel) or SVM (AMD).
pub fn host_has_hardware_virtualization() -> bool {
    let l1 = std::arch::x86_64::__cpuid(1);
    let ext = std::arch::x86_64::__cpuid(0x8000_0001);
    let vmx = l1.ecx & (1 << 5) != 0;
    let svm = ext.ecx & (1 << 2) != 0;
    vmx || svm
}

/// Open /dev/kvm, refusing a host without hardware virtualization (unless
/// `LPVMM_ALLOW_SOFTWARE_KVM` is set) or a KVM without what lpvmm uses.
pub fn open_kvm() -> Result<Kvm, HostCheckError> {
    if std::env::var_os("LPVMM_ALLOW_SOFTWARE_KVM").is_none() && !host_has_hardware_virtualization()
    {
        return Err(HostCheckError::NoHardwareVirtualization);
    }
    let kvm = Kvm::new().map_err(HostCheckError::Open)?;
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
            return Err(HostCheckError::MissingCapability(what));
        }
    }
    Ok(kvm)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tests/tests/vmm.rs and docs/getting-started.md quote these words.
    #[test]
    fn messages_keep_their_words() {
        let soft = HostCheckError::NoHardwareVirtualization.to_string();
        assert!(soft.starts_with("this machine's /dev/kvm is not backed by hardware virtualization (the CPU shows neither VMX nor SVM): it cannot boot a stock Linux kernel; to use lpvmm"), "{soft}");
        assert!(soft.contains("nested"), "{soft}");
        let open = HostCheckError::Open(kvm_ioctls::Error::new(libc::ENOENT)).to_string();
        assert!(
            open.starts_with("cannot open /dev/kvm: No such file or directory"),
            "{open}"
        );
    }
}
