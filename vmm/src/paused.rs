//! The VMM's implementations of [`GuestRam`] (guest memory as the VMM maps it, readable
//! while the vCPUs run) and [`PausedGuest`] (that memory plus the registers the vCPU
//! threads captured when they parked).

use introspection::{GuestError, GuestRam, PausedGuest, PhysRange, VcpuState};
use patcher::GuestWriter;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::MemoryLayout;

/// Guest RAM and the patch area, read-only. Nothing says the vCPUs are parked: see
/// [`GuestRam`] for what may be read this way.
pub struct RamView<'a> {
    mem: &'a GuestMemoryMmap,
    layout: &'a MemoryLayout,
}

impl<'a> RamView<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, layout: &'a MemoryLayout) -> Self {
        RamView { mem, layout }
    }

    /// Whole range inside one region, else `Unmapped`. Checked before any byte moves so
    /// that a failed write writes nothing.
    fn check(&self, addr: u64, len: usize) -> Result<(), GuestError> {
        let unmapped = GuestError::Unmapped { addr, len };
        if len == 0 {
            return Ok(());
        }
        let last = addr.checked_add(len as u64 - 1).ok_or(unmapped.clone())?;
        let region = self
            .mem
            .find_region(GuestAddress(addr))
            .ok_or(unmapped.clone())?;
        let region_last = region.start_addr().0 + (region.len() - 1);
        if last > region_last {
            return Err(unmapped);
        }
        Ok(())
    }
}

impl GuestRam for RamView<'_> {
    fn read_phys(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        self.check(addr, buf.len())?;
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|e| GuestError::Access(e.to_string()))
    }

    fn patch_area(&self) -> PhysRange {
        PhysRange {
            start: self.layout.patch_area.start,
            size: self.layout.patch_area.size,
        }
    }

    fn ram_ranges(&self) -> Vec<PhysRange> {
        self.layout
            .ram_regions()
            .iter()
            .map(|r| PhysRange {
                start: r.start,
                size: r.size,
            })
            .collect()
    }
}

pub struct PausedVm<'a> {
    ram: RamView<'a>,
    states: Vec<VcpuState>,
}

impl<'a> PausedVm<'a> {
    /// Only constructed from the states a successful pause returned: holding one means
    /// every vCPU is parked.
    pub fn new(mem: &'a GuestMemoryMmap, layout: &'a MemoryLayout, states: Vec<VcpuState>) -> Self {
        PausedVm {
            ram: RamView::new(mem, layout),
            states,
        }
    }

    /// The registers every vCPU parked with.
    pub fn states(&self) -> &[VcpuState] {
        &self.states
    }
}

impl PausedGuest for PausedVm<'_> {
    fn vcpu_count(&self) -> usize {
        self.states.len()
    }

    fn vcpu(&self, index: usize) -> Result<&VcpuState, GuestError> {
        self.states.get(index).ok_or(GuestError::NoSuchVcpu(index))
    }
}

impl GuestRam for PausedVm<'_> {
    fn read_phys(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        self.ram.read_phys(addr, buf)
    }

    fn patch_area(&self) -> PhysRange {
        self.ram.patch_area()
    }

    fn ram_ranges(&self) -> Vec<PhysRange> {
        self.ram.ram_ranges()
    }
}

/// Only the patcher writes to a paused guest.
impl GuestWriter for PausedVm<'_> {
    fn write_phys(&mut self, addr: u64, data: &[u8]) -> Result<(), GuestError> {
        self.ram.check(addr, data.len())?;
        self.ram
            .mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|e| GuestError::Access(e.to_string()))
    }

    fn reader(&self) -> &dyn PausedGuest {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::guest_memory;

    #[test]
    fn reads_and_writes_stay_inside_regions() {
        let layout = MemoryLayout::new(64 << 20, 1 << 20).unwrap();
        let mem = guest_memory(&layout).unwrap();
        let mut g = PausedVm::new(&mem, &layout, vec![VcpuState::default()]);

        g.write_phys(0x1000, b"hello").unwrap();
        let mut b = [0u8; 5];
        g.read_phys(0x1000, &mut b).unwrap();
        assert_eq!(&b, b"hello");

        // The patch area is guest memory the VMM owns.
        let pa = g.patch_area();
        g.write_phys(pa.start, &[0xcc; 16]).unwrap();
        assert_eq!(g.read_u64(pa.start).unwrap(), 0xcccc_cccc_cccc_cccc);

        // Past the end of RAM, across the RAM/hole boundary, or wrapping: refused whole.
        let end = 64 << 20;
        assert!(matches!(
            g.write_phys(end - 2, b"abcd"),
            Err(GuestError::Unmapped { .. })
        ));
        let mut tail = [0u8; 2];
        g.read_phys(end - 2, &mut tail).unwrap();
        assert_eq!(tail, [0, 0], "a refused write must write nothing");
        assert!(g.read_phys(u64::MAX - 1, &mut [0u8; 4]).is_err());
        assert!(g.read_phys(pa.end(), &mut [0u8; 1]).is_err());
        assert_eq!(g.vcpu(1), Err(GuestError::NoSuchVcpu(1)));
    }
}
