//! The pieces every synthetic image is built with: a bump allocator over the image, a
//! builder that writes guest memory and collects kallsyms, and the function bodies,
//! ORC rows and list rings both the kernel (kernel.rs) and its modules (modules.rs) use.

use super::SynthGuest;
use crate::kallsyms::Symbol;

pub(super) const FUNC_SIZE: u64 = 0x100;
/// Bump allocator over the image's virtual range.
pub(super) struct Image {
    pub(super) base: u64,
    pub(super) next: u64,
    pub(super) size: u64,
    /// Where the image starts in guest-physical memory.
    pub(super) pa: u64,
}
impl Image {
    pub(super) fn alloc(&mut self, size: u64, align: u64) -> u64 {
        self.next = (self.next + align - 1) & !(align - 1);
        let at = self.next;
        self.next += size.max(1);
        assert!(self.next - self.base < self.size, "synthetic image full");
        at
    }
}
pub(super) struct Builder {
    pub(super) g: SynthGuest,
    pub(super) img: Image,
    pub(super) symbols: Vec<Symbol>,
    /// Memory mapped outside the image (modules'): `(va, len, pa)`, each backed by
    /// image pages.
    pub(super) aliases: Vec<(u64, u64, u64)>,
}
impl Builder {
    pub(super) fn pa(&self, va: u64) -> u64 {
        for &(start, len, pa) in &self.aliases {
            if va >= start && va - start < len {
                return pa + (va - start);
            }
        }
        self.img.pa + (va - self.img.base)
    }
    pub(super) fn w(&mut self, va: u64, data: &[u8]) {
        let pa = self.pa(va);
        self.g.write_phys_raw(pa, data);
    }
    pub(super) fn w64(&mut self, va: u64, v: u64) {
        self.w(va, &v.to_le_bytes());
    }
    pub(super) fn w32(&mut self, va: u64, v: u32) {
        self.w(va, &v.to_le_bytes());
    }
    pub(super) fn sym(&mut self, addr: u64, kind: char, name: &str) {
        self.symbols.push(Symbol {
            addr,
            kind,
            name: name.into(),
        });
    }
    pub(super) fn data(&mut self, name: &str, bytes: &[u8], align: u64) -> u64 {
        let a = self.img.alloc(bytes.len() as u64, align);
        self.w(a, bytes);
        if !name.is_empty() {
            self.sym(a, 'D', name);
        }
        a
    }
}
#[derive(Clone, Copy)]
pub(super) enum Kind {
    Undefined,
    End,
    Call,
    Regs,
}
pub(super) fn orc_row(
    new_orc: bool,
    sp_offset: i16,
    sp_reg: u8,
    bp_reg: u8,
    kind: Kind,
) -> [u8; 6] {
    let s = sp_offset.to_le_bytes();
    let (sp_reg, high) = match (new_orc, kind) {
        (true, Kind::Undefined) => (0, 0),
        (true, Kind::End) => (0, 1),
        (true, Kind::Call) => (sp_reg, 2),
        (true, Kind::Regs) => (sp_reg, 3 | 1 << 3),
        (false, Kind::Undefined) => (0, 0),
        (false, Kind::End) => (0, 1 << 2),
        (false, Kind::Call) => (sp_reg, 0),
        (false, Kind::Regs) => (sp_reg, 1),
    };
    [s[0], s[1], 0, 0, sp_reg | (bp_reg << 4), high]
}
/// A function's frame size (its ORC entry's sp offset): 8 (the return address only)
/// to 24 bytes, by its name.
pub(super) fn frame_size(name: &str) -> u64 {
    8 + 8 * (name.len() as u64 % 3)
}
/// Every function: a fentry NOP, then `ret` padding (for disassembly tests);
/// `no_fentry` starts with `push %rbp` instead.
pub(super) fn function_body(name: &str) -> Vec<u8> {
    let mut body = vec![0xc3u8; FUNC_SIZE as usize];
    if name == "no_fentry" {
        body[..4].copy_from_slice(&[0x55, 0x48, 0x89, 0xe5]);
    } else {
        body[..5].copy_from_slice(&[0x0f, 0x1f, 0x44, 0x00, 0x00]);
    }
    body
}
pub(super) fn link_ring(b: &mut Builder, head: u64, nodes: &[u64]) {
    let all: Vec<u64> = std::iter::once(head).chain(nodes.iter().copied()).collect();
    for (i, &n) in all.iter().enumerate() {
        let next = all[(i + 1) % all.len()];
        let prev = all[(i + all.len() - 1) % all.len()];
        b.w64(n, next);
        b.w64(n + 8, prev);
    }
}
