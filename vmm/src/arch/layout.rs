//! Guest-physical memory layout.
//!
//! ```text
//! 0x0000_0500  GDT                 0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack top      0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD
//! 0x0002_0000  kernel command line 0x0009_fc00  end of low usable RAM (EBDA above)
//! 0x000e_0000  ACPI tables (RSDP first), inside the legacy BIOS hole
//! 0x0010_0000  bzImage protected-mode code, then usable RAM up to the low RAM end
//! 0xc000_0000  patch area (e820 reserved): the guest never uses it, lpvmm owns it
//! 0xfe00_0000  virtio-mmio register windows, 4 KiB each (devices/virtio/)
//! 0xfec0_0000  IOAPIC, 0xfee0_0000 LAPIC (in-kernel irqchip)
//! 0x1_0000_0000  RAM above 3 GiB continues here
//! ```

use thiserror::Error;

pub const GDT_ADDR: u64 = 0x500;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_ADDR: u64 = 0xe0000;
pub const ACPI_MAX: u64 = 0x20000;
pub const HIMEM_START: u64 = 0x10_0000;

/// Where RAM stops below 4 GiB and the patch area begins.
pub const LOW_RAM_MAX: u64 = 0xc000_0000;
pub const PATCH_AREA_START: u64 = LOW_RAM_MAX;
/// The patch area must end before the virtio devices' windows (and the IOAPIC/LAPIC
/// above them).
pub const PATCH_AREA_MAX: u64 = crate::devices::virtio::MMIO_BASE - PATCH_AREA_START;
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

/// A running kernel is decompressed at 16 MiB (LOAD_PHYSICAL_ADDR of x86-64 kernels),
/// so guest RAM must reach at least that far plus the kernel's `init_size`.
pub const KERNEL_RUN_ADDR: u64 = 0x100_0000;

/// A memory size the user asked for that lpvmm cannot lay out.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("--memory {} MiB is too small: lpvmm needs at least 32 MiB of guest RAM", .0 >> 20)]
    MemoryTooSmall(u64),
    #[error("--memory must be a multiple of 4 KiB (got {0} bytes)")]
    MemoryNotPageMultiple(u64),
    #[error("--patch-area must be a non-zero multiple of 4 KiB")]
    PatchAreaNotPageMultiple,
    #[error(
        "--patch-area {} MiB is too large: at most {} MiB fit below the device windows",
        .0 >> 20,
        PATCH_AREA_MAX >> 20
    )]
    PatchAreaTooLarge(u64),
    #[error("'{0}' is not a size (examples: 512M, 1G, 65536)")]
    NotASize(String),
    #[error("size '{0}' is too large")]
    SizeTooLarge(String),
}

/// One contiguous piece of guest-physical memory backed by host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub size: u64,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// The regions of a VM: RAM below the patch area, the patch area, RAM above 4 GiB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    pub low_ram: Region,
    pub patch_area: Region,
    pub high_ram: Option<Region>,
}

impl MemoryLayout {
    pub fn new(ram_bytes: u64, patch_area_bytes: u64) -> Result<Self, LayoutError> {
        if ram_bytes < 32 << 20 {
            return Err(LayoutError::MemoryTooSmall(ram_bytes));
        }
        if !ram_bytes.is_multiple_of(4096) {
            return Err(LayoutError::MemoryNotPageMultiple(ram_bytes));
        }
        if patch_area_bytes == 0 || !patch_area_bytes.is_multiple_of(4096) {
            return Err(LayoutError::PatchAreaNotPageMultiple);
        }
        if patch_area_bytes > PATCH_AREA_MAX {
            return Err(LayoutError::PatchAreaTooLarge(patch_area_bytes));
        }
        let low = ram_bytes.min(LOW_RAM_MAX);
        let high = ram_bytes - low;
        Ok(MemoryLayout {
            low_ram: Region {
                start: 0,
                size: low,
            },
            patch_area: Region {
                start: PATCH_AREA_START,
                size: patch_area_bytes,
            },
            high_ram: (high > 0).then_some(Region {
                start: HIGH_RAM_START,
                size: high,
            }),
        })
    }

    /// Every region KVM maps, RAM and patch area alike.
    pub fn regions(&self) -> Vec<Region> {
        let mut v = vec![self.low_ram, self.patch_area];
        v.extend(self.high_ram);
        v
    }

    pub fn ram_regions(&self) -> Vec<Region> {
        let mut v = vec![self.low_ram];
        v.extend(self.high_ram);
        v
    }

    /// The e820 map the guest sees: usable RAM (minus the legacy hole below 1 MiB) and
    /// the patch area marked reserved so that the guest never allocates from it.
    pub fn e820(&self) -> Vec<(u64, u64, u32)> {
        let mut map = vec![
            (0, EBDA_START, E820_RAM),
            (HIMEM_START, self.low_ram.end() - HIMEM_START, E820_RAM),
            (self.patch_area.start, self.patch_area.size, E820_RESERVED),
        ];
        if let Some(h) = self.high_ram {
            map.push((h.start, h.size, E820_RAM));
        }
        map
    }
}

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// Parse sizes such as `512M`, `1G`, `64K` or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, LayoutError> {
    let s = s.trim();
    let (digits, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| LayoutError::NotASize(s.to_string()))?;
    n.checked_mul(mult)
        .ok_or_else(|| LayoutError::SizeTooLarge(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn small_vm_has_no_high_ram_and_reserved_patch_area() {
        let l = MemoryLayout::new(512 << 20, 16 << 20).unwrap();
        assert_eq!(l.low_ram.size, 512 << 20);
        assert!(l.high_ram.is_none());
        let e820 = l.e820();
        assert!(e820.contains(&(PATCH_AREA_START, 16 << 20, E820_RESERVED)));
        // No RAM entry overlaps the patch area.
        for (start, size, kind) in e820 {
            if kind == E820_RAM {
                assert!(start + size <= PATCH_AREA_START || start >= l.patch_area.end());
            }
        }
    }

    #[test]
    fn big_vm_splits_around_the_hole() {
        let l = MemoryLayout::new(4 << 30, 2 << 20).unwrap();
        assert_eq!(l.low_ram.size, LOW_RAM_MAX);
        assert_eq!(
            l.high_ram,
            Some(Region {
                start: HIGH_RAM_START,
                size: (4 << 30) - LOW_RAM_MAX
            })
        );
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert_eq!(
            MemoryLayout::new(1 << 20, 16 << 20),
            Err(LayoutError::MemoryTooSmall(1 << 20))
        );
        assert_eq!(
            MemoryLayout::new((512 << 20) + 100, 16 << 20),
            Err(LayoutError::MemoryNotPageMultiple((512 << 20) + 100))
        );
        assert_eq!(
            MemoryLayout::new(1 << 30, 1000),
            Err(LayoutError::PatchAreaNotPageMultiple)
        );
        let too_large = MemoryLayout::new(1 << 30, 2 << 30).unwrap_err();
        assert_eq!(
            too_large.to_string(),
            "--patch-area 2048 MiB is too large: at most 992 MiB fit below the device windows"
        );
        assert_eq!(
            parse_size("lots").unwrap_err().to_string(),
            "'lots' is not a size (examples: 512M, 1G, 65536)"
        );
    }
}
