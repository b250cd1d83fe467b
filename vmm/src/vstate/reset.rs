//! A guest reboot in the same VM: every vCPU and the in-kernel interrupt controllers go
//! back to the state they had before the first boot, as a machine's reset line puts a
//! CPU back in its power-on state.
//!
//! The states are captured once, right after set-up and before the first `KVM_RUN`
//! (registers, special registers, FPU, XCRs, every MSR KVM lets lpvmm read, the local
//! APIC, the multiprocessing state, pending events, debug registers; the PIC, IOAPIC and
//! PIT), and put back at each reboot: the boot vCPU at the kernel's 64-bit entry, the
//! others waiting for the new kernel's INIT/SIPI. Two MSRs are left as they are: the
//! time-stamp counter and its adjust register, which a per-vCPU write would leave out of
//! step between vCPUs (the guest then distrusts its TSC); a kernel does not expect its
//! TSC to restart at a reboot.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_ADJUST: u32 = 0x3b;
/// MSRs per `KVM_GET_MSRS`/`KVM_SET_MSRS` (kvm-bindings holds at most 256).
const MSR_BATCH: usize = 128;
/// The PIC's two chips and the IOAPIC (`KVM_IRQCHIP_PIC_MASTER`, `_SLAVE`, `_IOAPIC`).
const IRQCHIPS: [u32; 3] = [0, 1, 2];

#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("reading vCPU {index}'s boot state ({what})")]
    Capture {
        index: usize,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("putting vCPU {index} back in its boot state ({what})")]
    Restore {
        index: usize,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the interrupt controllers' boot state ({what})")]
    Platform {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// One vCPU as it was before the first boot.
pub struct VcpuBootState {
    index: usize,
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    xcrs: Option<kvm_xcrs>,
    msrs: Vec<kvm_msr_entry>,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
    debugregs: kvm_debugregs,
}

impl VcpuBootState {
    pub fn capture(kvm: &Kvm, fd: &VcpuFd, index: usize) -> Result<Self, ResetError> {
        let e = |what| {
            move |source| ResetError::Capture {
                index,
                what,
                source,
            }
        };
        Ok(VcpuBootState {
            index,
            regs: fd.get_regs().map_err(e("registers"))?,
            sregs: fd.get_sregs().map_err(e("special registers"))?,
            fpu: fd.get_fpu().map_err(e("FPU"))?,
            xcrs: fd.get_xcrs().ok(),
            msrs: readable_msrs(kvm, fd).map_err(e("MSRs"))?,
            lapic: fd.get_lapic().map_err(e("local APIC"))?,
            mp_state: fd.get_mp_state().map_err(e("MP state"))?,
            events: fd.get_vcpu_events().map_err(e("events"))?,
            debugregs: fd.get_debug_regs().map_err(e("debug registers"))?,
        })
    }

    /// Put the vCPU back (on its own thread, parked). Special registers first (they
    /// hold the APIC base), the MP state after the local APIC, as KVM expects.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), ResetError> {
        let index = self.index;
        let e = |what| {
            move |source| ResetError::Restore {
                index,
                what,
                source,
            }
        };
        fd.set_sregs(&self.sregs).map_err(e("special registers"))?;
        fd.set_regs(&self.regs).map_err(e("registers"))?;
        fd.set_fpu(&self.fpu).map_err(e("FPU"))?;
        if let Some(x) = &self.xcrs {
            fd.set_xcrs(x).map_err(e("XCRs"))?;
        }
        set_msrs(fd, &self.msrs).map_err(e("MSRs"))?;
        fd.set_lapic(&self.lapic).map_err(e("local APIC"))?;
        fd.set_mp_state(self.mp_state).map_err(e("MP state"))?;
        fd.set_vcpu_events(&self.events).map_err(e("events"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(e("debug registers"))?;
        Ok(())
    }
}

/// Every MSR KVM lists that this vCPU lets lpvmm read, with its value, read in batches
/// that fit one `KVM_GET_MSRS`. It stops at the first MSR it cannot read: that one is
/// dropped and the rest of the batch read again.
fn readable_msrs(kvm: &Kvm, fd: &VcpuFd) -> Result<Vec<kvm_msr_entry>, kvm_ioctls::Error> {
    let indices: Vec<u32> = kvm
        .get_msr_index_list()?
        .as_slice()
        .iter()
        .copied()
        .filter(|&i| i != MSR_IA32_TSC && i != MSR_IA32_TSC_ADJUST)
        .collect();
    let mut out = Vec::new();
    for chunk in indices.chunks(MSR_BATCH) {
        let mut left: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        while !left.is_empty() {
            let mut msrs = Msrs::from_entries(&left).map_err(|_| errno_inval())?;
            let read = fd.get_msrs(&mut msrs)?;
            out.extend_from_slice(&msrs.as_slice()[..read.min(left.len())]);
            left.drain(..(read + 1).min(left.len()));
        }
    }
    Ok(out)
}

/// Write every captured MSR, in batches; one KVM refuses is skipped and the rest
/// written.
fn set_msrs(fd: &VcpuFd, msrs: &[kvm_msr_entry]) -> Result<(), kvm_ioctls::Error> {
    for chunk in msrs.chunks(MSR_BATCH) {
        let mut left: Vec<kvm_msr_entry> = chunk.to_vec();
        while !left.is_empty() {
            let batch = Msrs::from_entries(&left).map_err(|_| errno_inval())?;
            let written = fd.set_msrs(&batch)?;
            left.drain(..(written + 1).min(left.len()));
        }
    }
    Ok(())
}

fn errno_inval() -> kvm_ioctls::Error {
    kvm_ioctls::Error::new(libc::EINVAL)
}

/// The PIC, IOAPIC and PIT as they were before the first boot.
pub struct PlatformBootState {
    irqchips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
}

impl PlatformBootState {
    pub fn capture(vm: &VmFd) -> Result<Self, ResetError> {
        let e = |what| move |source| ResetError::Platform { what, source };
        let mut irqchips = Vec::new();
        for chip_id in IRQCHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip).map_err(e("reading an irqchip"))?;
            irqchips.push(chip);
        }
        let pit = vm.get_pit2().map_err(e("reading the PIT"))?;
        Ok(PlatformBootState { irqchips, pit })
    }

    pub fn restore(&self, vm: &VmFd) -> Result<(), ResetError> {
        let e = |what| move |source| ResetError::Platform { what, source };
        for chip in &self.irqchips {
            vm.set_irqchip(chip).map_err(e("writing an irqchip"))?;
        }
        vm.set_pit2(&self.pit).map_err(e("writing the PIT"))
    }
}
