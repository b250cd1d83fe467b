//! The "paused guest" seam between the VMM and everything that reads or patches a guest.

use serde::{Deserialize, Serialize};

/// Registers of one vCPU, captured by the VMM while that vCPU was parked.
///
/// Only what introspection and patching need: the general registers to start an unwind,
/// the control registers to walk page tables, and the MSRs that locate per-CPU data
/// (GS bases) and the syscall entry (LSTAR).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: usize,
    pub rip: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub rflags: u64,
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub cs: u16,
    pub ss: u16,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// The active GS base (the kernel's per-CPU base while in kernel mode).
    pub gs_base: u64,
    /// MSR_KERNEL_GS_BASE: the base `swapgs` would switch to.
    pub kernel_gs_base: u64,
    /// MSR_LSTAR: the 64-bit syscall entry point.
    pub lstar: u64,
}

impl VcpuState {
    /// Current privilege level, from the low bits of CS.
    pub fn cpl(&self) -> u8 {
        (self.cs & 3) as u8
    }

    /// True when the vCPU runs in 64-bit long mode with paging (EFER.LMA).
    pub fn long_mode(&self) -> bool {
        self.efer & (1 << 10) != 0
    }

    /// The page-table root: CR3 without the PCID bits (low 12) and without the
    /// PTI/user-copy marker bits above the physical address.
    pub fn page_table_root(&self) -> u64 {
        self.cr3 & 0x000f_ffff_ffff_f000
    }

    /// CR4.LA57: five-level paging.
    pub fn five_level_paging(&self) -> bool {
        self.cr4 & (1 << 12) != 0
    }
}

/// A half-open range of guest-physical addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhysRange {
    pub start: u64,
    pub size: u64,
}

impl PhysRange {
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.size)
    }

    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end()
    }
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuestError {
    #[error("guest-physical range {addr:#x}+{len:#x} is not backed by guest memory")]
    Unmapped { addr: u64, len: usize },
    #[error("no vCPU {0}")]
    NoSuchVcpu(usize),
    #[error("guest memory access failed: {0}")]
    Access(String),
}

/// Guest-physical memory, read-only. The guest may be running while it is read, so two
/// reads can see different contents: on its own this is only for data the guest kernel
/// never changes once booted (VMCOREINFO, kallsyms, BTF, ORC). Everything else is read
/// through a [`PausedGuest`].
///
/// Implementations must never panic on any address or length: guest-supplied pointers
/// end up here, so a bad one is an [`GuestError`], not a crash.
pub trait GuestRam {
    /// Read guest-physical memory. Fails whole if any byte is outside guest memory.
    fn read_phys(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestError>;

    /// The guest-physical range the VMM reserved for patches (e820-reserved, never used
    /// by the guest kernel).
    fn patch_area(&self) -> PhysRange;

    /// All guest RAM ranges the guest kernel may use, in ascending order.
    fn ram_ranges(&self) -> Vec<PhysRange>;

    /// Read a little-endian u64 at a guest-physical address.
    fn read_u64(&self, addr: u64) -> Result<u64, GuestError> {
        let mut b = [0u8; 8];
        self.read_phys(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Many small reads in one call: `out` holds one chunk of `out.len() / addrs.len()`
    /// bytes per address, read at that address, in order (a pause reads one field of
    /// every task this way). Fails whole if any read would; an `out` that does not split
    /// into equal chunks is an error too. Implementations may do it faster than this
    /// loop of [`GuestRam::read_phys`].
    fn read_each(&self, addrs: &[u64], out: &mut [u8]) -> Result<(), GuestError> {
        let len = each_chunk_len(addrs, out)?;
        for (&a, chunk) in addrs.iter().zip(out.chunks_exact_mut(len)) {
            self.read_phys(a, chunk)?;
        }
        Ok(())
    }
}

/// The chunk length of a [`GuestRam::read_each`]: `out` split evenly, at least a byte.
pub fn each_chunk_len(addrs: &[u64], out: &[u8]) -> Result<usize, GuestError> {
    match (addrs.len(), out.len()) {
        (0, 0) => Ok(1),
        (n, len) if n > 0 && len > 0 && len % n == 0 => Ok(len / n),
        (n, len) => Err(GuestError::Access(format!(
            "{len} bytes do not split into {n} equal reads"
        ))),
    }
}

/// A guest whose vCPUs are all parked: nothing changes under the reader. Read-only:
/// whatever writes to a guest (the patcher) does so through a trait of its own.
pub trait PausedGuest: GuestRam {
    /// Number of vCPUs (every one of them is parked).
    fn vcpu_count(&self) -> usize;

    /// Registers of vCPU `index` as captured when it parked.
    fn vcpu(&self, index: usize) -> Result<&VcpuState, GuestError>;
}

/// A *running* guest read through the [`PausedGuest`] interface, with no vCPU states,
/// so that the task and stack readers can be used on it. Two reads through it may see
/// the guest at different moments, and a task it finds may be running: nothing read this
/// way may be relied on until a pause confirms it. Its one user is the patcher's early
/// checks, which do (patcher/src/transition/early.rs).
pub struct Unconfirmed<'a>(pub &'a dyn GuestRam);

impl GuestRam for Unconfirmed<'_> {
    fn read_phys(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        self.0.read_phys(addr, buf)
    }
    fn read_each(&self, addrs: &[u64], out: &mut [u8]) -> Result<(), GuestError> {
        self.0.read_each(addrs, out)
    }
    fn patch_area(&self) -> PhysRange {
        self.0.patch_area()
    }
    fn ram_ranges(&self) -> Vec<PhysRange> {
        self.0.ram_ranges()
    }
}

impl PausedGuest for Unconfirmed<'_> {
    fn vcpu_count(&self) -> usize {
        0
    }
    fn vcpu(&self, index: usize) -> Result<&VcpuState, GuestError> {
        Err(GuestError::NoSuchVcpu(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cr3_root_strips_pcid_and_high_bits() {
        let s = VcpuState {
            cr3: 0x8000_0000_1234_5abc,
            ..Default::default()
        };
        assert_eq!(s.page_table_root(), 0x1234_5000);
    }

    #[test]
    fn cpl_and_modes() {
        let s = VcpuState {
            cs: 0x33,
            efer: 0x500,
            cr4: 1 << 12,
            ..Default::default()
        };
        assert_eq!(s.cpl(), 3);
        assert!(s.long_mode());
        assert!(s.five_level_paging());
    }

    #[test]
    fn phys_range_bounds_do_not_overflow() {
        let r = PhysRange {
            start: u64::MAX - 1,
            size: 10,
        };
        assert_eq!(r.end(), u64::MAX);
        assert!(r.contains(u64::MAX - 1));
        assert!(!r.contains(0));
    }
}
