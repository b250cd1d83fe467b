//! Synthetic guests for unit tests of introspection and patching: flat guest RAM, page
//! tables built by hand, and (in [`kernel`]) a small fake kernel laid out in it with the
//! same tables a real one has (VMCOREINFO, kallsyms, BTF, ORC, tasks and stacks).
//!
//! Compiled for this crate's tests and, with the `synthetic` feature, for other crates'
//! tests. Never used with a real guest.

pub mod btf;
pub mod ftrace;
mod image;
pub mod kernel;
pub mod modules;

use crate::guest::{GuestError, GuestRam, PausedGuest, PhysRange, VcpuState};
use crate::memory::PagingRoot;

pub use ftrace::SynthFtrace;
pub use kernel::{SynthKernel, SynthKernelSpec, SynthTask};
pub use modules::{BuiltModule, SynthModule};

/// The layout of the kernel livepatch's structs (`klp_patch`, `klp_object`, `klp_func`,
/// `klp_state`, `kernel_param`) in tests that build livepatch modules with gcc (patcher's
/// unit tests, the fuzzer's seed): every field 8 bytes, in declaration order.
pub const KLP_LAYOUT: crate::layout::KlpLayout = crate::layout::KlpLayout {
    patch_mod: 0,
    patch_objs: 8,
    patch_states: 16,
    patch_replace: 24,
    object_size: 56,
    object_name: 0,
    object_funcs: 8,
    object_callbacks: [16, 24, 32, 40],
    object_mod: 48,
    func_size: 24,
    func_old_name: 0,
    func_new_func: 8,
    func_old_sympos: 16,
    state_size: 16,
    state_id: 0,
    state_version: 8,
    param_size: 40,
    param_name: 0,
    param_ops: 16,
    param_arg: 32,
    module_size: 64,
};

const PRESENT_RW: u64 = 0x3;
const LARGE: u64 = 1 << 7;

/// Flat RAM from guest-physical 0, a page-table allocator growing down from the top of
/// RAM, and vCPU register snapshots.
#[derive(Clone)]
pub struct SynthGuest {
    pub ram: Vec<u8>,
    pub vcpus: Vec<VcpuState>,
    pub patch_area: PhysRange,
    root: u64,
    five_level: bool,
    next_table: u64,
}

impl SynthGuest {
    pub fn new(ram_size: usize, five_level: bool) -> Self {
        let mut g = SynthGuest {
            ram: vec![0; ram_size],
            vcpus: Vec::new(),
            patch_area: PhysRange::default(),
            root: 0,
            five_level,
            next_table: ram_size as u64,
        };
        g.root = g.alloc_table();
        g
    }

    pub fn root(&self) -> PagingRoot {
        PagingRoot {
            table: self.root,
            five_level: self.five_level,
        }
    }

    /// Lowest physical address used by page tables so far (data must stay below).
    pub fn tables_start(&self) -> u64 {
        self.next_table
    }

    fn alloc_table(&mut self) -> u64 {
        self.next_table -= 4096;
        let t = self.next_table;
        self.ram[t as usize..t as usize + 4096].fill(0);
        t
    }

    fn entry_addr(&mut self, va: u64, stop_level: u8) -> u64 {
        let levels: u8 = if self.five_level { 5 } else { 4 };
        let mut table = self.root;
        for level in ((stop_level + 1)..=levels).rev() {
            let shift = 12 + 9 * u32::from(level - 1);
            let slot = table + ((va >> shift) & 0x1ff) * 8;
            let entry = self.read_u64_raw(slot);
            table = if entry & 1 == 0 {
                let t = self.alloc_table();
                self.write_phys_raw(slot, &(t | PRESENT_RW).to_le_bytes());
                t
            } else {
                entry & 0x000f_ffff_ffff_f000
            };
        }
        let shift = 12 + 9 * u32::from(stop_level - 1);
        table + ((va >> shift) & 0x1ff) * 8
    }

    /// Map `len` bytes (rounded up to 4 KiB pages) of `va` to `pa`.
    pub fn map(&mut self, va: u64, pa: u64, len: u64) {
        let mut off = 0;
        while off < len {
            let slot = self.entry_addr(va + off, 1);
            self.write_phys_raw(slot, &((pa + off) | PRESENT_RW).to_le_bytes());
            off += 4096;
        }
    }

    /// Map the 2 MiB page that holds `va` with 512 4 KiB pages instead, the same
    /// memory (so that one of them can then be mapped elsewhere); nothing if it is not
    /// a 2 MiB page.
    pub fn split_large(&mut self, va: u64) {
        let slot = self.entry_addr(va, 2);
        let entry = self.read_u64_raw(slot);
        if entry & LARGE == 0 {
            return;
        }
        let pa = entry & 0x000f_ffff_ffe0_0000;
        let table = self.alloc_table();
        for i in 0..512u64 {
            let pte = (pa + i * 4096) | PRESENT_RW;
            self.write_phys_raw(table + 8 * i, &pte.to_le_bytes());
        }
        self.write_phys_raw(slot, &(table | PRESENT_RW).to_le_bytes());
    }

    /// Map one 2 MiB or 1 GiB page.
    pub fn map_large(&mut self, va: u64, pa: u64, size: u64) {
        let level = if size == 1 << 30 { 3 } else { 2 };
        let slot = self.entry_addr(va, level);
        self.write_phys_raw(slot, &(pa | PRESENT_RW | LARGE).to_le_bytes());
    }

    /// Write guest-physical memory, checked like a real guest's.
    pub fn write_phys(&mut self, addr: u64, data: &[u8]) -> Result<(), GuestError> {
        let start = usize::try_from(addr)
            .ok()
            .filter(|&a| {
                a.checked_add(data.len())
                    .is_some_and(|e| e <= self.ram.len())
            })
            .ok_or(GuestError::Unmapped {
                addr,
                len: data.len(),
            })?;
        self.ram[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }

    pub fn write_phys_raw(&mut self, pa: u64, data: &[u8]) {
        self.ram[pa as usize..pa as usize + data.len()].copy_from_slice(data);
    }

    pub fn read_u64_raw(&self, pa: u64) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.ram[pa as usize..pa as usize + 8]);
        u64::from_le_bytes(b)
    }
}

impl PausedGuest for SynthGuest {
    fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    fn vcpu(&self, index: usize) -> Result<&VcpuState, GuestError> {
        self.vcpus.get(index).ok_or(GuestError::NoSuchVcpu(index))
    }
}

impl GuestRam for SynthGuest {
    fn read_phys(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        let start = usize::try_from(addr)
            .ok()
            .filter(|&a| {
                a.checked_add(buf.len())
                    .is_some_and(|e| e <= self.ram.len())
            })
            .ok_or(GuestError::Unmapped {
                addr,
                len: buf.len(),
            })?;
        buf.copy_from_slice(&self.ram[start..start + buf.len()]);
        Ok(())
    }

    fn patch_area(&self) -> PhysRange {
        self.patch_area
    }

    fn ram_ranges(&self) -> Vec<PhysRange> {
        vec![PhysRange {
            start: 0,
            size: self.ram.len() as u64,
        }]
    }
}
