//! Host memory for a guest: one private anonymous mapping per region of the layout, each
//! starting on a 2 MiB boundary.
//!
//! KVM maps a memory slot with 2 MiB pages only where the slot's guest-physical and
//! host-virtual addresses agree modulo 2 MiB; a slot whose addresses do not gets 4 KiB
//! pages throughout, whatever backs it (`kvm_alloc_memslot_metadata` marks every large
//! page of such a slot disallowed). `mmap` returns a 4 KiB-aligned address for a large
//! anonymous area on the kernels lpvmm runs on (Linux aligns such mappings itself only
//! from 6.7), so until this module a VM never got 2 MiB pages, however it advised the
//! host (`MADV_HUGEPAGE`). QEMU aligns its RAM blocks for the same reason. Every region
//! of [`crate::arch::layout::MemoryLayout`] starts on a 2 MiB boundary of guest-physical
//! memory, so aligning the host start of each is enough.
//!
//! vm-memory maps memory itself only where the kernel chooses, so the mapping is made
//! here and handed to it as a raw pointer: vm-memory then never unmaps it, and
//! [`HostMapping`] does when dropped. Its owner must drop it after every user of the
//! memory: the guest memory built on it and the KVM memory slots that point at it.

use std::io;

use thiserror::Error;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// The huge page size of x86-64 that KVM maps guests with, and the alignment of each
/// mapping.
pub const HUGE_PAGE: usize = 2 << 20;

const PAGE: usize = 4096;
const PROT: i32 = libc::PROT_READ | libc::PROT_WRITE;
const FLAGS: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

#[derive(Debug, Error)]
pub enum HostMemoryError {
    #[error("a guest memory region of {0} bytes is not a non-zero multiple of 4 KiB")]
    Size(usize),
    #[error("cannot map {} MiB of host memory for the guest", .size >> 20)]
    Map { size: usize, source: io::Error },
    #[error("vm-memory refused the mapping at {addr:#x}")]
    Region {
        addr: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest memory region at {0:#x} is out of range")]
    OutOfRange(u64),
    #[error("guest memory regions")]
    Collection(#[from] vm_memory::GuestRegionCollectionError),
}

/// `len` bytes of private anonymous memory that this process mapped, unmapped on drop.
#[derive(Debug)]
pub struct HostMapping {
    addr: usize,
    len: usize,
}

impl HostMapping {
    /// Map `len` bytes (a multiple of 4 KiB) starting on a 2 MiB boundary: map 2 MiB
    /// more than asked, then unmap the slack before and after the aligned part.
    pub fn aligned(len: usize) -> Result<HostMapping, HostMemoryError> {
        if len == 0 || !len.is_multiple_of(PAGE) {
            return Err(HostMemoryError::Size(len));
        }
        let padded = len
            .checked_add(HUGE_PAGE)
            .ok_or(HostMemoryError::Size(len))?;
        // SAFETY: a new anonymous mapping at an address of the kernel's choosing, so it
        // overlaps nothing this process uses.
        let raw = unsafe { libc::mmap(std::ptr::null_mut(), padded, PROT, FLAGS, -1, 0) };
        if raw == libc::MAP_FAILED {
            return Err(HostMemoryError::Map {
                size: len,
                source: io::Error::last_os_error(),
            });
        }
        let start = raw as usize;
        let addr = start.next_multiple_of(HUGE_PAGE);
        unmap(start, addr - start);
        unmap(addr + len, start + padded - (addr + len));
        Ok(HostMapping { addr, len })
    }

    pub fn addr(&self) -> usize {
        self.addr
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        unmap(self.addr, self.len);
    }
}

/// Unmap `len` bytes at `addr` (page-aligned), a range of a mapping made by
/// [`HostMapping::aligned`] that nothing uses (the slack around it, or all of it once its
/// owner drops it).
fn unmap(addr: usize, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: the range lies inside a mapping this module made, and no reference into it
    // outlives this call: slack was never handed out, and a whole mapping is unmapped only
    // when its `HostMapping`, which its users must not outlive, is dropped.
    let rc = unsafe { libc::munmap(addr as *mut libc::c_void, len) };
    if rc != 0 {
        tracing::warn!(
            "munmap of guest memory at {addr:#x} ({len} bytes): {}",
            io::Error::last_os_error()
        );
    }
}

/// Guest memory over `ranges` (guest-physical start and size, sorted, 2 MiB-aligned
/// starts), each range in its own aligned [`HostMapping`]. The caller keeps the mappings
/// and drops them only after the memory and every KVM memory slot made from it.
pub fn guest_memory(
    ranges: &[(GuestAddress, usize)],
) -> Result<(GuestMemoryMmap, Vec<HostMapping>), HostMemoryError> {
    let mut mappings = Vec::new();
    let mut regions = Vec::new();
    for &(start, size) in ranges {
        let mapping = HostMapping::aligned(size)?;
        // SAFETY: `mapping` is `size` bytes of readable, writable memory that stays mapped
        // until the caller drops it, after the memory built here.
        let region = unsafe {
            MmapRegionBuilder::new(size)
                .with_raw_mmap_pointer(mapping.addr() as *mut u8)
                .with_mmap_prot(PROT)
                .with_mmap_flags(FLAGS)
                .build()
        }
        .map_err(|source| HostMemoryError::Region {
            addr: start.0,
            source,
        })?;
        regions
            .push(GuestRegionMmap::new(region, start).ok_or(HostMemoryError::OutOfRange(start.0))?);
        mappings.push(mapping);
    }
    Ok((GuestMemoryMmap::from_regions(regions)?, mappings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn mappings_start_on_a_huge_page_and_hold_what_is_written() {
        let ranges = [
            (GuestAddress(0), 64 << 20),
            (GuestAddress(0xc000_0000), 16 << 20),
            (GuestAddress(0x1_0000_0000), 4 << 20),
        ];
        let (mem, mappings) = guest_memory(&ranges).unwrap();
        assert_eq!(mappings.len(), 3);
        for (region, &(start, size)) in mem.iter().zip(&ranges) {
            assert_eq!(region.start_addr(), start);
            assert_eq!(region.len(), size as u64);
            let host = mem.get_host_address(start).unwrap() as usize;
            assert_eq!(
                host % HUGE_PAGE,
                0,
                "region at {start:?} starts at {host:#x}"
            );
        }
        for &(start, size) in &ranges {
            let last = GuestAddress(start.0 + size as u64 - 8);
            mem.write_obj(0x1122_3344_5566_7788u64, last).unwrap();
            assert_eq!(mem.read_obj::<u64>(last).unwrap(), 0x1122_3344_5566_7788);
        }
        drop(mem);
        drop(mappings);
    }

    #[test]
    fn sizes_that_are_not_whole_pages_are_refused() {
        assert!(matches!(
            HostMapping::aligned(0),
            Err(HostMemoryError::Size(0))
        ));
        assert!(matches!(
            HostMapping::aligned(PAGE + 1),
            Err(HostMemoryError::Size(_))
        ));
        assert!(matches!(
            HostMapping::aligned(usize::MAX - PAGE + 1),
            Err(HostMemoryError::Size(_))
        ));
    }
}
