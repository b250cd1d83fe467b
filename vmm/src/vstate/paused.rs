//! The VMM's implementations of [`GuestRam`] (guest memory as the VMM maps it, readable
//! while the vCPUs run) and [`PausedGuest`] (that memory plus the registers the vCPU
//! threads captured when they parked).

use introspection::{GuestError, GuestRam, PausedGuest, PhysRange, VcpuState};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress, VolatileSlice,
};

use crate::arch::layout::MemoryLayout;

/// Guest RAM and the patch area, read-only. Nothing says the vCPUs are parked: see
/// [`GuestRam`] for what may be read this way.
pub struct RamView<'a> {
    mem: &'a GuestMemoryMmap,
    layout: &'a MemoryLayout,
    /// Each region's guest-physical start and its whole mapping, found once: a task list
    /// is tens of thousands of small reads, and looking the region up in `mem` for each
    /// cost more than the copy (34 ns a read before, on the project's machine).
    regions: Vec<(u64, VolatileSlice<'a>)>,
}

impl<'a> RamView<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, layout: &'a MemoryLayout) -> Self {
        let regions = mem
            .iter()
            .filter_map(|r| {
                let len = usize::try_from(r.len()).ok()?;
                let slice = r.get_slice(MemoryRegionAddress(0), len).ok()?;
                Some((r.start_addr().0, slice))
            })
            .collect();
        RamView {
            mem,
            layout,
            regions,
        }
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
        let unmapped = || GuestError::Unmapped {
            addr,
            len: buf.len(),
        };
        let (start, slice) = self
            .regions
            .iter()
            .find(|(start, s)| addr >= *start && addr - start < s.len() as u64)
            .ok_or_else(unmapped)?;
        let from = (addr - start) as usize;
        // The whole range inside the region, or nothing is copied.
        let part = slice.subslice(from, buf.len()).map_err(|_| unmapped())?;
        part.copy_to(buf);
        Ok(())
    }

    /// One region look-up for a run of reads in the same region (a field of every
    /// task is read this way in a pause).
    fn read_each(&self, addrs: &[u64], out: &mut [u8]) -> Result<(), GuestError> {
        let len = introspection::each_chunk_len(addrs, out)?;
        let mut region: Option<&(u64, VolatileSlice)> = None;
        for (&addr, chunk) in addrs.iter().zip(out.chunks_exact_mut(len)) {
            let unmapped = || GuestError::Unmapped { addr, len };
            let holds = |r: &(u64, VolatileSlice)| addr >= r.0 && addr - r.0 < r.1.len() as u64;
            if !region.is_some_and(holds) {
                region = Some(
                    self.regions
                        .iter()
                        .find(|r| holds(r))
                        .ok_or_else(unmapped)?,
                );
            }
            let (start, slice) = region.expect("found above");
            let part = slice
                .subslice((addr - start) as usize, len)
                .map_err(|_| unmapped())?;
            part.copy_to(chunk);
        }
        Ok(())
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

    fn read_each(&self, addrs: &[u64], out: &mut [u8]) -> Result<(), GuestError> {
        self.ram.read_each(addrs, out)
    }

    fn patch_area(&self) -> PhysRange {
        self.ram.patch_area()
    }

    fn ram_ranges(&self) -> Vec<PhysRange> {
        self.ram.ram_ranges()
    }
}

impl PausedVm<'_> {
    /// Write guest-physical memory, all of it or nothing: a write that is not wholly
    /// inside guest RAM or the patch area is refused before a byte is written. Needs the
    /// writing pause ([`crate::vstate::vm::Vm::paused_for_write`]); only the patcher
    /// writes, through the `GuestWriter` the patching glue implements on this.
    pub fn write_phys(&mut self, addr: u64, data: &[u8]) -> Result<(), GuestError> {
        self.ram.check(addr, data.len())?;
        self.ram
            .mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|e| GuestError::Access(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::vm::guest_memory;

    #[test]
    fn reads_and_writes_stay_inside_regions() {
        let layout = MemoryLayout::new(64 << 20, 1 << 20).unwrap();
        let (mem, _host) = guest_memory(&layout).unwrap();
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

        // Many reads in one call: RAM and the patch area in any order, as read_phys
        // reads them; any read outside, or a buffer that does not split evenly, fails.
        let addrs = [0x1000, pa.start, 0x1001, pa.start + 8];
        let mut each = [0u8; 16];
        g.read_each(&addrs, &mut each).unwrap();
        let mut one_by_one = Vec::new();
        for a in addrs {
            let mut b = [0u8; 4];
            g.read_phys(a, &mut b).unwrap();
            one_by_one.extend_from_slice(&b);
        }
        assert_eq!(&each[..], &one_by_one[..]);
        assert!(g.read_each(&[0x1000, end - 2], &mut [0u8; 8]).is_err());
        assert!(g.read_each(&[0x1000, u64::MAX - 1], &mut [0u8; 8]).is_err());
        assert!(g.read_each(&[0x1000, 0x2000], &mut [0u8; 7]).is_err());
        assert!(g.read_each(&[], &mut []).is_ok());
    }
}

/// How long one small read of guest memory takes, as a number to compare across changes
/// (docs/benchmarks.md, "Reading guest memory"), not a timed assertion:
/// `cargo test --release -p lpvmm --lib cost_of_a_read -- --ignored --nocapture`.
#[cfg(test)]
mod read_cost {
    use super::*;
    use crate::vstate::vm::guest_memory;
    use introspection::memory::{KernelMemory, PagingRoot};

    #[test]
    #[ignore = "a measurement: run it in release mode and read what it prints"]
    fn cost_of_a_read() {
        let layout = MemoryLayout::new(64 << 20, 1 << 20).unwrap();
        let (mem, _host) = guest_memory(&layout).unwrap();
        let mut g = PausedVm::new(&mem, &layout, vec![VcpuState::default()]);
        // The direct map's first GiB as one 1 GiB page: a top-level and a level-3 table.
        let va: u64 = 0xffff_8880_0000_0000;
        let (l4, l3) = (0x10000u64, 0x11000u64);
        g.write_phys(l4 + ((va >> 39) & 0x1ff) * 8, &(l3 | 3).to_le_bytes())
            .unwrap();
        g.write_phys(l3 + ((va >> 30) & 0x1ff) * 8, &0x83u64.to_le_bytes())
            .unwrap();
        // Every 64th byte of 32 MiB holds its own address.
        let (first, span) = (0x10_0000u64, 32u64 << 20);
        for a in (first..first + span).step_by(64) {
            g.write_phys(a, &a.to_le_bytes()).unwrap();
        }
        let n = 2_000_000u64;
        let at = |i: u64| first + (i * 64) % span;
        let t = std::time::Instant::now();
        for i in 0..n {
            assert_eq!(g.read_u64(at(i)).unwrap(), at(i));
        }
        let phys = t.elapsed().as_nanos() as f64 / n as f64;
        let km = KernelMemory::new(
            &g,
            PagingRoot {
                table: l4,
                five_level: false,
            },
        );
        let t = std::time::Instant::now();
        for i in 0..n {
            assert_eq!(km.u64(va + at(i)).unwrap(), at(i));
        }
        let virt = t.elapsed().as_nanos() as f64 / n as f64;
        eprintln!(
            "a u64 read: {phys:.1} ns by physical address, {virt:.1} ns by kernel virtual address"
        );
    }
}
