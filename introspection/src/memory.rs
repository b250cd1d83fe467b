//! Kernel virtual memory of a paused guest: x86-64 page-table walks (4 and 5 levels,
//! 2 MiB and 1 GiB pages) over guest-physical memory, and bounded reads on top.
//!
//! The walk starts from the kernel's own master page table (`init_top_pgt`), whose
//! kernel half every process shares, so one root serves every kernel address: the image,
//! the direct map, vmalloc'd stacks and per-CPU areas. Every entry read comes from guest
//! memory and is hostile: a non-present entry, a table outside RAM or a non-canonical
//! address is a [`MemError`], never a panic.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use crate::guest::{GuestError, GuestRam};

const PAGE: u64 = 4096;
const PRESENT: u64 = 1;
const LARGE: u64 = 1 << 7;
/// Physical address bits 12..51 of a page-table entry (the NX bit and the bits an OS
/// may use for itself are above them).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Most bytes one bounded read may ask for; larger guest-controlled lengths are refused.
pub const MAX_READ: usize = 64 << 20;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemError {
    #[error("kernel address {0:#x} is not canonical")]
    NonCanonical(u64),
    #[error("kernel address {va:#x} is not mapped (no present entry at level {level})")]
    NotMapped { va: u64, level: u8 },
    #[error("read of {len} bytes at {va:#x} is larger than the {MAX_READ}-byte limit")]
    TooLarge { va: u64, len: usize },
    #[error("kernel address {va:#x}: {source}")]
    Guest { va: u64, source: GuestError },
}

/// Where the kernel's page tables are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagingRoot {
    /// Guest-physical address of the top-level table.
    pub table: u64,
    /// CR4.LA57: five levels instead of four.
    pub five_level: bool,
}

/// Translate one virtual address. Returns the guest-physical address.
pub fn translate(guest: &dyn GuestRam, root: PagingRoot, va: u64) -> Result<u64, MemError> {
    walk(guest, root, va).map(|m| m.pa)
}

/// Where a walk ended: the physical address, and the size of the page that maps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Walked {
    pa: u64,
    page_size: u64,
}

fn walk(guest: &dyn GuestRam, root: PagingRoot, va: u64) -> Result<Walked, MemError> {
    let levels: u8 = if root.five_level { 5 } else { 4 };
    let top_bit = 12 + 9 * u32::from(levels) - 1;
    // Canonical: every bit above the top translated bit equals it.
    let upper = (va as i64) >> top_bit;
    if upper != 0 && upper != -1 {
        return Err(MemError::NonCanonical(va));
    }
    let mut table = root.table & ADDR_MASK;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * u32::from(level - 1);
        let index = (va >> shift) & 0x1ff;
        let entry = guest
            .read_u64(table + index * 8)
            .map_err(|source| MemError::Guest { va, source })?;
        if entry & PRESENT == 0 {
            return Err(MemError::NotMapped { va, level });
        }
        // Levels 2 and 3 may map 2 MiB / 1 GiB pages directly.
        if (level == 2 || level == 3) && entry & LARGE != 0 {
            let size = 1u64 << shift;
            return Ok(Walked {
                pa: (entry & ADDR_MASK & !(size - 1)) | (va & (size - 1)),
                page_size: size,
            });
        }
        table = entry & ADDR_MASK;
    }
    Ok(Walked {
        pa: table | (va & (PAGE - 1)),
        page_size: PAGE,
    })
}

/// A 2 MiB or 1 GiB page a walk found: `[va, va + size)` maps to `[pa, pa + size)`.
#[derive(Clone, Copy, Debug, Default)]
struct LargePage {
    va: u64,
    pa: u64,
    size: u64,
}

/// 1 GiB pages remembered by one view: the direct map (where every task_struct is) of a
/// guest with a few GiB is a few of them, so most reads need neither a walk nor a
/// look-up in the 4 KiB cache.
const LARGE_PAGES: usize = 4;
/// 2 MiB pages remembered by one view, each in the slot its address picks: a smaller
/// guest's direct map is hundreds of 2 MiB pages (256 in 512 MiB), and a pause that
/// reads every task_struct must walk each only once.
const MID_SLOTS: usize = 512;
const MID_PAGE: u64 = 2 << 20;

/// The slot of [`KernelMemory`]'s 2 MiB page cache that `va` uses.
fn mid_slot(va: u64) -> usize {
    ((va / MID_PAGE) % MID_SLOTS as u64) as usize
}

/// Kernel virtual memory of one paused guest, with a translation cache that lives as long
/// as this view (page tables can change whenever the guest runs, so a view never outlives
/// one pause). Attach reads the kernel's static tables this way while the guest runs:
/// their mappings do not change once it has booted.
pub struct KernelMemory<'g> {
    guest: &'g dyn GuestRam,
    root: PagingRoot,
    pages: RefCell<HashMap<u64, u64>>,
    /// The page last translated and its physical page (most reads follow one in the same
    /// page: the fields of one task_struct, the words of one stack). `NO_PAGE` at first.
    last: Cell<(u64, u64)>,
    /// The last [`LARGE_PAGES`] 1 GiB pages found, replaced in turn (size 0: none yet).
    large: [Cell<LargePage>; LARGE_PAGES],
    next_large: Cell<usize>,
    /// 2 MiB pages found, slot `(va / 2 MiB) % MID_SLOTS` (size 0: none yet).
    mid: RefCell<Vec<LargePage>>,
}

/// No 4 KiB page starts here: the `last` of a view that has translated nothing.
const NO_PAGE: u64 = 1;

impl<'g> KernelMemory<'g> {
    pub fn new(guest: &'g dyn GuestRam, root: PagingRoot) -> Self {
        KernelMemory {
            guest,
            root,
            pages: RefCell::new(HashMap::new()),
            last: Cell::new((NO_PAGE, 0)),
            large: Default::default(),
            next_large: Cell::new(0),
            mid: RefCell::new(Vec::new()),
        }
    }

    pub fn guest(&self) -> &'g dyn GuestRam {
        self.guest
    }

    pub fn root(&self) -> PagingRoot {
        self.root
    }

    /// Guest-physical address of a kernel virtual address.
    pub fn translate(&self, va: u64) -> Result<u64, MemError> {
        let page = va & !(PAGE - 1);
        let (last, last_pa) = self.last.get();
        if last == page {
            return Ok(last_pa | (va & (PAGE - 1)));
        }
        if let Some(pa) = self.in_large_pages(va) {
            return Ok(pa);
        }
        self.translate_missed(va)
    }

    /// `va` through the large pages this view found, if one holds it.
    fn in_large_pages(&self, va: u64) -> Option<u64> {
        let hit = |l: LargePage| (va.wrapping_sub(l.va) < l.size).then(|| l.pa + (va - l.va));
        if let Some(&l) = self.mid.borrow().get(mid_slot(va)) {
            if let Some(pa) = hit(l) {
                return Some(pa);
            }
        }
        self.large.iter().find_map(|l| hit(l.get()))
    }

    /// [`KernelMemory::translate`] past the large pages: the 4 KiB cache, else a walk,
    /// whose page is remembered. Kept out of line: the hits stay short.
    #[inline(never)]
    fn translate_missed(&self, va: u64) -> Result<u64, MemError> {
        let page = va & !(PAGE - 1);
        if let Some(&pa) = self.pages.borrow().get(&page) {
            self.last.set((page, pa));
            return Ok(pa | (va & (PAGE - 1)));
        }
        let walked = walk(self.guest, self.root, page)?;
        let pa = walked.pa;
        if walked.page_size > PAGE {
            let size = walked.page_size;
            let found = LargePage {
                va: page & !(size - 1),
                pa: pa & !(size - 1),
                size,
            };
            if size == MID_PAGE {
                let mut mid = self.mid.borrow_mut();
                if mid.is_empty() {
                    mid.resize(MID_SLOTS, LargePage::default());
                }
                mid[mid_slot(va)] = found;
            } else {
                let i = self.next_large.get();
                self.large[i].set(found);
                self.next_large.set((i + 1) % LARGE_PAGES);
            }
            return Ok(pa | (va & (PAGE - 1)));
        }
        self.last.set((page, pa));
        // Bounded: a walk over hostile lists must not grow the cache without limit.
        let mut pages = self.pages.borrow_mut();
        if pages.len() > 1 << 20 {
            pages.clear();
        }
        pages.insert(page, pa);
        Ok(pa | (va & (PAGE - 1)))
    }

    /// Read `buf.len()` bytes at `va`, page by page (virtually contiguous memory need not
    /// be physically contiguous).
    pub fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), MemError> {
        if buf.len() > MAX_READ {
            return Err(MemError::TooLarge { va, len: buf.len() });
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = va.wrapping_add(done as u64);
            let in_page = (PAGE - (at & (PAGE - 1))) as usize;
            let n = in_page.min(buf.len() - done);
            let pa = self.translate(at)?;
            self.guest
                .read_phys(pa, &mut buf[done..done + n])
                .map_err(|source| MemError::Guest { va: at, source })?;
            done += n;
        }
        Ok(())
    }

    /// Read `len` bytes at each of `vas` into `out` (`vas.len() * len` bytes), in one
    /// call down to guest memory: a pause reads one field of thousands of tasks this
    /// way, and the per-read path (translation cache, trait calls, region look-up) would
    /// cost more than the bytes. A read that crosses into a page not physically next to
    /// its first is made on its own.
    pub fn read_each(&self, vas: &[u64], len: usize, out: &mut [u8]) -> Result<(), MemError> {
        let first = vas.first().copied().unwrap_or(0);
        if len > MAX_READ {
            return Err(MemError::TooLarge { va: first, len });
        }
        if len == 0 || Some(out.len()) != vas.len().checked_mul(len) {
            return Err(MemError::Guest {
                va: first,
                source: GuestError::Access(format!(
                    "{} bytes are not {} reads of {len}",
                    out.len(),
                    vas.len()
                )),
            });
        }
        let mut pas = Vec::with_capacity(vas.len());
        let mut apart = Vec::new();
        for (i, &va) in vas.iter().enumerate() {
            let pa = self.translate(va)?;
            let end = va.wrapping_add(len as u64 - 1);
            if (va ^ end) & !(PAGE - 1) != 0
                && self.translate(end)? != pa.wrapping_add(len as u64 - 1)
            {
                apart.push(i);
            }
            pas.push(pa);
        }
        if self.guest.read_each(&pas, out).is_err() {
            // Find the read that failed, and say which.
            for (&va, chunk) in vas.iter().zip(out.chunks_exact_mut(len)) {
                self.read(va, chunk)?;
            }
        }
        for i in apart {
            self.read(vas[i], &mut out[i * len..(i + 1) * len])?;
        }
        Ok(())
    }

    /// Read `len` bytes into a new vector; `len` is checked against [`MAX_READ`] before
    /// anything is allocated.
    pub fn read_vec(&self, va: u64, len: usize) -> Result<Vec<u8>, MemError> {
        if len > MAX_READ {
            return Err(MemError::TooLarge { va, len });
        }
        let mut v = vec![0u8; len];
        self.read(va, &mut v)?;
        Ok(v)
    }

    pub fn u64(&self, va: u64) -> Result<u64, MemError> {
        let mut b = [0u8; 8];
        self.read(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn u32(&self, va: u64) -> Result<u32, MemError> {
        let mut b = [0u8; 4];
        self.read(va, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn u16(&self, va: u64) -> Result<u16, MemError> {
        let mut b = [0u8; 2];
        self.read(va, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// An unsigned integer of 1, 2, 4 or 8 bytes (sizes as BTF gives them).
    pub fn uint(&self, va: u64, size: u64) -> Result<u64, MemError> {
        let mut b = [0u8; 8];
        let n = size.clamp(1, 8) as usize;
        self.read(va, &mut b[..n])?;
        Ok(u64::from_le_bytes(b))
    }

    /// A NUL-terminated string of at most `max` bytes stored in a fixed array (like
    /// `task_struct.comm`); invalid UTF-8 is replaced, never trusted.
    pub fn fixed_str(&self, va: u64, max: usize) -> Result<String, MemError> {
        let raw = self.read_vec(va, max)?;
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        Ok(String::from_utf8_lossy(&raw[..end]).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::SynthGuest;

    #[test]
    fn walks_4k_2m_and_1g_pages_in_4_and_5_levels() {
        for five_level in [false, true] {
            let mut g = SynthGuest::new(64 << 20, five_level);
            let va4k = 0xffff_c900_0001_2000;
            let va2m = 0xffff_ffff_8200_0000;
            let va1g = 0xffff_8880_0000_0000;
            g.map(va4k, 0x30_0000, 4096);
            g.map_large(va2m, 0x40_0000, 2 << 20);
            g.map_large(va1g, 0, 1 << 30);
            let root = g.root();
            assert_eq!(translate(&g, root, va4k + 0x123).unwrap(), 0x30_0123);
            assert_eq!(
                translate(&g, root, va2m + 0x1f_fff8).unwrap(),
                0x40_0000 + 0x1f_fff8
            );
            assert_eq!(translate(&g, root, va1g + 0x2a_0000).unwrap(), 0x2a_0000);
            assert!(matches!(
                translate(&g, root, va4k + 4096),
                Err(MemError::NotMapped { level: 1, .. })
            ));
            assert!(matches!(
                translate(&g, root, 0x0100_0000_0000_0000),
                Err(MemError::NonCanonical(_))
            ));
        }
    }

    #[test]
    fn a_view_translates_as_a_walk_does_through_its_caches() {
        let mut g = SynthGuest::new(64 << 20, false);
        let va4k = 0xffff_c900_0001_2000;
        let va2m = 0xffff_ffff_8200_0000;
        let va1g = 0xffff_8880_0000_0000;
        g.map(va4k, 0x30_0000, 2 * 4096);
        g.map_large(va2m, 0x40_0000, 2 << 20);
        g.map_large(va1g, 0, 1 << 30);
        let m = KernelMemory::new(&g, g.root());
        // Alternating between more large pages than the view remembers, and 4 KiB ones.
        let addrs = [
            va1g + 0x2a_0123,
            va2m + 0x1f_fff8,
            va4k + 8,
            va1g + (1 << 30) - 8,
            va2m,
            va4k + 4096 + 16,
            va1g,
        ];
        for _ in 0..3 {
            for &va in &addrs {
                assert_eq!(m.translate(va), translate(&g, g.root(), va), "{va:#x}");
            }
        }
        // Just past each mapping: not mapped, however warm the caches are.
        assert!(m.translate(va2m + (2 << 20)).is_err());
        assert!(m.translate(va4k + 2 * 4096).is_err());
    }

    #[test]
    fn a_view_walks_each_2m_page_of_a_direct_map_once() {
        // 64 MiB of 2 MiB pages (32 of them, more than the 1 GiB cache holds), read in
        // an order that visits every page many times, as a pause reads task_structs.
        let mut g = SynthGuest::new(80 << 20, false);
        let base = 0xffff_8880_0000_0000;
        for i in 0..32u64 {
            g.map_large(base + i * MID_PAGE, i * MID_PAGE, MID_PAGE);
        }
        let m = KernelMemory::new(&g, g.root());
        let counted = Counted {
            inner: &g,
            reads: Cell::new(0),
        };
        let m2 = KernelMemory::new(&counted, g.root());
        for round in 0..4u64 {
            for i in 0..32u64 {
                let va = base + ((i * 7) % 32) * MID_PAGE + round * 0x1_2340;
                assert_eq!(m.translate(va), translate(&g, g.root(), va));
                m2.translate(va).unwrap();
            }
        }
        // Three table reads for each 2 MiB page's one walk (PML4, PDPT, PD), no more.
        assert_eq!(counted.reads.get(), 32 * 3);
    }

    /// A guest that counts the reads made of it.
    struct Counted<'g> {
        inner: &'g SynthGuest,
        reads: Cell<usize>,
    }

    impl GuestRam for Counted<'_> {
        fn read_phys(&self, addr: u64, buf: &mut [u8]) -> Result<(), crate::GuestError> {
            self.reads.set(self.reads.get() + 1);
            self.inner.read_phys(addr, buf)
        }
        fn patch_area(&self) -> crate::PhysRange {
            self.inner.patch_area()
        }
        fn ram_ranges(&self) -> Vec<crate::PhysRange> {
            self.inner.ram_ranges()
        }
    }

    #[test]
    fn many_reads_in_one_call_equal_reads_one_by_one() {
        let mut g = SynthGuest::new(16 << 20, false);
        let va = 0xffff_c900_0000_0000;
        g.map(va, 0x20_0000, 4096);
        // The next virtual page is not the next physical one.
        g.map(va + 4096, 0x10_0000, 4096);
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        g.write_phys_raw(0x20_0000, &pattern);
        g.write_phys_raw(0x10_0000, &pattern.iter().map(|b| !b).collect::<Vec<u8>>());
        let m = KernelMemory::new(&g, g.root());
        // One read crosses into the page that lies apart.
        let vas = [va + 8, va + 4090, va + 4096 + 16, va + 8];
        let mut each = [0u8; 4 * 12];
        m.read_each(&vas, 12, &mut each).unwrap();
        let one_by_one: Vec<u8> = vas
            .iter()
            .flat_map(|&v| m.read_vec(v, 12).unwrap())
            .collect();
        assert_eq!(each.to_vec(), one_by_one);
        // An unmapped address fails as a read of it would; so does a wrong buffer.
        assert!(matches!(
            m.read_each(&[va, va + 2 * 4096], 8, &mut [0u8; 16]),
            Err(MemError::NotMapped { .. })
        ));
        assert!(m.read_each(&[va], 8, &mut [0u8; 9]).is_err());
        assert!(m.read_each(&[va], 0, &mut []).is_err());
    }

    #[test]
    fn reads_cross_pages_that_are_not_physically_contiguous() {
        let mut g = SynthGuest::new(16 << 20, false);
        let va = 0xffff_c900_0000_0000;
        g.map(va, 0x20_0000, 4096);
        g.map(va + 4096, 0x10_0000, 4096);
        g.write_phys_raw(0x20_0ffc, &[1, 2, 3, 4]);
        g.write_phys_raw(0x10_0000, &[5, 6, 7, 8]);
        let m = KernelMemory::new(&g, g.root());
        assert_eq!(m.u64(va + 0xffc).unwrap(), 0x0807_0605_0403_0201);
        assert!(matches!(
            m.read_vec(va, MAX_READ + 1),
            Err(MemError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_table_pointing_outside_ram_is_an_error() {
        let mut g = SynthGuest::new(8 << 20, false);
        let va = 0xffff_c900_0000_0000;
        g.map(va, 0x10_0000, 4096);
        // Corrupt the top-level entry to point far outside RAM.
        let top = g.root().table + ((va >> 39) & 0x1ff) * 8;
        g.write_phys_raw(top, &(0x7fff_0000_0000u64 | 3).to_le_bytes());
        assert!(matches!(
            translate(&g, g.root(), va),
            Err(MemError::Guest { .. })
        ));
    }
}
