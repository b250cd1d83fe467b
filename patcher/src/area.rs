//! The patch area: guest-physical memory the VMM reserved (e820 reserved, never used by
//! the guest), mapped into the guest kernel's address space where nothing else is, next
//! to the kernel image so that every patch is within rel32 reach of kernel text.
//!
//! Layout of the area, in pages: the page tables that map it (never mapped themselves),
//! then a code region (read-only, executable), a read-only data region and a writable
//! data region (both not executable). Each page's permissions are fixed when the area
//! is mapped, once, so no mapping ever becomes stricter and no guest TLB ever needs a
//! flush: adding a mapping where none was present needs none, and lpvmm never removes
//! one (an unloaded patch's pages are cleared and left mapped).
//!
//! The mapping is installed in `level2_kernel_pgt`, the page-middle directory of the
//! kernel image mapping, which every address space shares. Linux clears the entries of
//! that range outside `[_text, _end]` at boot (`cleanup_highmap`), and puts nothing
//! there afterwards (modules live above 0xffffffffc0000000).

use introspection::kernel::Kernel;
use introspection::memory::KernelMemory;
use introspection::PhysRange;

use crate::GuestWriter;
use serde::{Deserialize, Serialize};

use crate::KpError;

const PAGE: u64 = 4096;
const PMD_SPAN: u64 = 2 << 20;
/// Entry bits (x86-64 paging).
const P: u64 = 1;
const RW: u64 = 1 << 1;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
const LARGE: u64 = 1 << 7;
const NX: u64 = 1 << 63;
const ADDR: u64 = 0x000f_ffff_ffff_f000;
/// What Linux puts in a kernel page-middle entry that points at a page table.
const TABLE: u64 = P | RW | ACCESSED | DIRTY;
/// Top of the kernel image range (KERNEL_IMAGE_SIZE = 1 GiB above __START_KERNEL_map).
const IMAGE_RANGE_END: u64 = 0xffff_ffff_c000_0000;
const IMAGE_RANGE_START: u64 = 0xffff_ffff_8000_0000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub start: u64,
    pub end: u64,
}

impl Region {
    pub fn contains(&self, a: u64) -> bool {
        a >= self.start && a < self.end
    }
    pub fn size(&self) -> u64 {
        self.end - self.start
    }
}

/// How the area is laid out and where it is mapped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AreaLayout {
    pub phys: PhysRange,
    /// Guest virtual address of `phys.start`; the area is mapped linearly.
    pub va: u64,
    /// Virtual ranges of the three regions.
    pub code: Region,
    pub rodata: Region,
    pub data: Region,
    /// Pages holding the area's own page tables.
    pub table_pages: u64,
}

impl AreaLayout {
    /// Split an area: page tables first, then code (half of the rest), read-only data
    /// and writable data (a quarter each).
    pub fn new(phys: PhysRange, va: u64) -> Result<AreaLayout, KpError> {
        let pages = phys.size / PAGE;
        let table_pages = pages.div_ceil(512);
        if !phys.start.is_multiple_of(PMD_SPAN) || !phys.size.is_multiple_of(PMD_SPAN) || pages < 16
        {
            return Err(KpError::Area(format!(
                "patch area {:#x}+{:#x} must be 2 MiB aligned, a multiple of 2 MiB and at least 2 MiB",
                phys.start, phys.size
            )));
        }
        let usable = pages - table_pages;
        let code_pages = usable / 2;
        let ro_pages = usable / 4;
        let start = va + table_pages * PAGE;
        let code = Region {
            start,
            end: start + code_pages * PAGE,
        };
        let rodata = Region {
            start: code.end,
            end: code.end + ro_pages * PAGE,
        };
        let data = Region {
            start: rodata.end,
            end: va + phys.size,
        };
        Ok(AreaLayout {
            phys,
            va,
            code,
            rodata,
            data,
            table_pages,
        })
    }

    pub fn pa(&self, va: u64) -> u64 {
        self.phys.start + (va - self.va)
    }

    /// Page-table entry flags of the page at `va`.
    fn pte_flags(&self, va: u64) -> Option<u64> {
        if self.code.contains(va) {
            Some(P | ACCESSED)
        } else if self.rodata.contains(va) {
            Some(P | ACCESSED | NX)
        } else if self.data.contains(va) {
            Some(P | RW | ACCESSED | DIRTY | NX)
        } else {
            None
        }
    }

    pub fn is_code(&self, va: u64) -> bool {
        self.code.contains(va)
    }
}

/// Choose where to map an area of `size` bytes: the first 2 MiB-aligned range after the
/// kernel image (one 2 MiB guard page-middle entry in between) whose page-middle entries
/// are all empty, else the same below the image.
pub fn choose_va(mem: &KernelMemory, kernel: &Kernel, size: u64) -> Result<u64, KpError> {
    let sym = |n: &str| {
        kernel
            .symbols
            .addr(n)
            .ok_or_else(|| KpError::Area(format!("kernel symbol {n} not found")))
    };
    let (text, end) = (sym("_text")?, sym("_end")?);
    let after = end.div_ceil(PMD_SPAN) * PMD_SPAN + PMD_SPAN;
    let below =
        (text / PMD_SPAN * PMD_SPAN).wrapping_sub(PMD_SPAN + size.div_ceil(PMD_SPAN) * PMD_SPAN);
    for va in [after, below] {
        if va < IMAGE_RANGE_START || va.checked_add(size).is_none_or(|e| e > IMAGE_RANGE_END) {
            continue;
        }
        if (0..size.div_ceil(PMD_SPAN))
            .all(|i| pmd_slot(mem, va + i * PMD_SPAN).is_ok_and(|(_, e)| e == 0))
        {
            return Ok(va);
        }
    }
    Err(KpError::Area(
        "no free 2 MiB slots next to the kernel image to map the patch area".into(),
    ))
}

/// Guest-physical address and value of the page-middle entry covering `va`.
fn pmd_slot(mem: &KernelMemory, va: u64) -> Result<(u64, u64), KpError> {
    let root = mem.root();
    let guest = mem.guest();
    let levels = if root.five_level { 5 } else { 4 };
    let mut table = root.table & ADDR;
    for level in (3..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let slot = table + ((va >> shift) & 0x1ff) * 8;
        let e = guest
            .read_u64(slot)
            .map_err(|e| KpError::Area(format!("reading page tables: {e}")))?;
        if e & P == 0 || e & LARGE != 0 {
            return Err(KpError::Area(format!(
                "no page-middle directory for {va:#x} (level {level} entry {e:#x})"
            )));
        }
        table = e & ADDR;
    }
    let slot = table + ((va >> 21) & 0x1ff) * 8;
    let e = guest
        .read_u64(slot)
        .map_err(|e| KpError::Area(format!("reading page tables: {e}")))?;
    Ok((slot, e))
}

/// The area's own page tables, one page per 2 MiB of area: built while the guest runs
/// (the area is lpvmm's memory, and no guest entry points at these pages until
/// [`install`] writes the page-middle entries in a pause).
#[derive(Clone, Debug)]
pub struct PageTables {
    /// Each table's guest-physical address and its 4 KiB.
    tables: Vec<(u64, Vec<u8>)>,
}

impl PageTables {
    pub fn of(layout: &AreaLayout) -> PageTables {
        let spans = layout.phys.size / PMD_SPAN;
        let tables = (0..spans)
            .map(|i| {
                let table_pa = layout.phys.start + i * PAGE;
                let mut table = vec![0u8; PAGE as usize];
                for (j, chunk) in table.chunks_exact_mut(8).enumerate() {
                    let va = layout.va + i * PMD_SPAN + j as u64 * PAGE;
                    if let Some(flags) = layout.pte_flags(va) {
                        chunk.copy_from_slice(&(layout.pa(va) | flags).to_le_bytes());
                    }
                }
                (table_pa, table)
            })
            .collect();
        PageTables { tables }
    }

    /// Where the tables go, guest-physical.
    pub fn ranges(&self) -> impl Iterator<Item = introspection::PhysRange> + '_ {
        self.tables.iter().map(|(pa, t)| introspection::PhysRange {
            start: *pa,
            size: t.len() as u64,
        })
    }
}

/// Map the area into the kernel's address space, in a pause: check that every
/// page-middle entry it needs is still empty, then write its page tables and point the
/// entries at them (those entries are the only guest kernel memory the area touches).
pub fn install(
    guest: &mut dyn GuestWriter,
    kernel: &Kernel,
    layout: &AreaLayout,
    tables: &PageTables,
) -> Result<(), KpError> {
    let mut slots = Vec::new();
    {
        let mem = kernel.memory(guest.reader());
        for i in 0..tables.tables.len() as u64 {
            let (slot, e) = pmd_slot(&mem, layout.va + i * PMD_SPAN)?;
            if e != 0 {
                return Err(KpError::Area(format!(
                    "page-middle entry for {:#x} is in use ({e:#x})",
                    layout.va + i * PMD_SPAN
                )));
            }
            slots.push(slot);
        }
    }
    for (slot, (table_pa, table)) in slots.iter().zip(&tables.tables) {
        guest
            .write_phys(*table_pa, table)
            .map_err(|e| KpError::Area(format!("writing the area's page tables: {e}")))?;
        guest
            .write_phys(*slot, &(table_pa | TABLE).to_le_bytes())
            .map_err(|e| KpError::Area(format!("mapping the patch area: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_the_area_and_sets_permissions() {
        let phys = PhysRange {
            start: 0xc000_0000,
            size: 16 << 20,
        };
        let l = AreaLayout::new(phys, 0xffff_ffff_a000_0000).unwrap();
        assert_eq!(l.table_pages, 8);
        assert_eq!(l.code.start, l.va + 8 * PAGE);
        assert_eq!(l.data.end, l.va + (16 << 20));
        assert_eq!(l.pte_flags(l.va), None, "page tables are not mapped");
        assert_eq!(l.pte_flags(l.code.start).unwrap() & (RW | NX), 0);
        assert_eq!(l.pte_flags(l.rodata.start).unwrap() & (RW | NX), NX);
        assert_eq!(l.pte_flags(l.data.start).unwrap() & (RW | NX), RW | NX);
        assert_eq!(l.pa(l.code.start), 0xc000_0000 + 8 * PAGE);
        assert!(AreaLayout::new(
            PhysRange {
                start: 0x1000,
                size: 16 << 20
            },
            0
        )
        .is_err());
    }
}
