//! ORC unwind tables of the guest kernel (CONFIG_UNWINDER_ORC), read once at attach.
//!
//! `__start_orc_unwind_ip[]` holds one s32 per entry, relative to its own address, sorted
//! by the address it gives; `__start_orc_unwind[]` holds the matching `struct orc_entry`.
//! The entry's bitfield layout changed in 6.4 (a 2-bit type plus an `end` bit became a
//! 3-bit type with UNDEFINED and END_OF_STACK values, plus a `signal` bit), so the
//! layout is read from BTF like every other struct: the presence of `end` tells the two
//! numberings apart (arch/x86/include/asm/orc_types.h in 6.1 and 6.12).

use crate::btf::{Btf, BtfError, Field};
use crate::kallsyms::SymbolTable;
use crate::memory::{KernelMemory, MemError};

/// More ORC entries than any kernel has (6.12 cloud: ~400k).
const MAX_ENTRIES: u64 = 8 << 20;

/// ORC register numbers (ORC_REG_*): an ABI between objtool and the kernel.
pub mod reg {
    pub const UNDEFINED: u8 = 0;
    pub const PREV_SP: u8 = 1;
    pub const DX: u8 = 2;
    pub const DI: u8 = 3;
    pub const BP: u8 = 4;
    pub const SP: u8 = 5;
    pub const R10: u8 = 6;
    pub const R13: u8 = 7;
    pub const BP_INDIRECT: u8 = 8;
    pub const SP_INDIRECT: u8 = 9;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum OrcKind {
    /// No unwind information: unwinding must stop with an error.
    Undefined,
    /// The bottom of a kernel stack (kthread or idle entry).
    EndOfStack,
    /// A normal call frame: return address at CFA - 8.
    Call,
    /// A full `pt_regs` at the CFA.
    Regs,
    /// Only the hardware IRET frame at the CFA.
    RegsPartial,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OrcEntry {
    pub sp_offset: i16,
    pub bp_offset: i16,
    pub sp_reg: u8,
    pub bp_reg: u8,
    pub kind: OrcKind,
    /// The next frame's ip was interrupted, not a return address (look it up as is).
    pub signal: bool,
}

impl OrcEntry {
    /// What the kernel assumes for code it has no ORC for (generated code): a frame
    /// pointer frame. Using it makes a trace unreliable.
    pub const FRAME_POINTER: OrcEntry = OrcEntry {
        sp_offset: 16,
        bp_offset: -16,
        sp_reg: reg::BP,
        bp_reg: reg::PREV_SP,
        kind: OrcKind::Call,
        signal: false,
    };
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum OrcError {
    #[error("kernel has no ORC tables (symbol {0} missing; not built with CONFIG_UNWINDER_ORC?)")]
    Missing(&'static str),
    #[error("ORC tables are corrupt: {0}")]
    Corrupt(String),
    #[error("struct orc_entry layout: {0}")]
    Btf(#[from] BtfError),
    #[error("reading ORC tables: {0}")]
    Mem(#[from] MemError),
}

/// Where each `struct orc_entry` field lives, from BTF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrcFormat {
    pub entry_size: u64,
    sp_offset: Field,
    bp_offset: Field,
    sp_reg: Field,
    bp_reg: Field,
    kind: Field,
    /// Before 6.4: the end-of-stack bit (and types CALL=0, REGS=1, REGS_PARTIAL=2).
    end: Option<Field>,
    /// 6.3+: the signal bit.
    signal: Option<Field>,
}

fn bits(raw: u64, f: &Field) -> u64 {
    let width = if f.bit_size == 0 {
        f.size * 8
    } else {
        u64::from(f.bit_size)
    };
    if width == 0 || width >= 64 || f.bit_offset >= 64 {
        return 0;
    }
    (raw >> f.bit_offset) & ((1 << width) - 1)
}

impl OrcFormat {
    pub fn from_btf(btf: &Btf) -> Result<OrcFormat, BtfError> {
        let f = |name| btf.field("orc_entry", name);
        let end = f("end").ok();
        Ok(OrcFormat {
            entry_size: btf.struct_size("orc_entry")?,
            sp_offset: f("sp_offset")?,
            bp_offset: f("bp_offset")?,
            sp_reg: f("sp_reg")?,
            bp_reg: f("bp_reg")?,
            kind: f("type")?,
            signal: f("signal").ok(),
            end,
        })
    }

    /// True for the pre-6.4 numbering.
    pub fn has_end_bit(&self) -> bool {
        self.end.is_some()
    }

    pub fn decode(&self, raw_bytes: &[u8]) -> OrcEntry {
        let mut b = [0u8; 8];
        let n = raw_bytes.len().min(8);
        b[..n].copy_from_slice(&raw_bytes[..n]);
        let raw = u64::from_le_bytes(b);
        let sp_reg = bits(raw, &self.sp_reg) as u8;
        let ty = bits(raw, &self.kind);
        let (kind, signal) = match &self.end {
            Some(end) => {
                let kind = if sp_reg == reg::UNDEFINED {
                    if bits(raw, end) != 0 {
                        OrcKind::EndOfStack
                    } else {
                        OrcKind::Undefined
                    }
                } else {
                    match ty {
                        0 => OrcKind::Call,
                        1 => OrcKind::Regs,
                        2 => OrcKind::RegsPartial,
                        _ => OrcKind::Undefined,
                    }
                };
                // Before the signal bit existed, register frames were the signal frames.
                let signal = matches!(kind, OrcKind::Regs | OrcKind::RegsPartial);
                (kind, signal)
            }
            None => {
                let kind = match ty {
                    1 => OrcKind::EndOfStack,
                    2 => OrcKind::Call,
                    3 => OrcKind::Regs,
                    4 => OrcKind::RegsPartial,
                    _ => OrcKind::Undefined,
                };
                let signal = self.signal.as_ref().is_some_and(|s| bits(raw, s) != 0);
                (kind, signal)
            }
        };
        OrcEntry {
            sp_offset: bits(raw, &self.sp_offset) as u16 as i16,
            bp_offset: bits(raw, &self.bp_offset) as u16 as i16,
            sp_reg,
            bp_reg: bits(raw, &self.bp_reg) as u8,
            kind,
            signal,
        }
    }
}

/// The kernel image's ORC table, in host memory.
#[derive(Clone, Debug)]
pub struct OrcTable {
    format: OrcFormat,
    /// The lowest address of the table: `ips` are offsets from it.
    base: u64,
    /// Addresses as offsets from `base`, as the kernel sorted them (4 bytes an entry, as
    /// the kernel keeps them, not 8: the image's text spans far less than 4 GiB).
    ips: Vec<u32>,
    entries: Vec<u8>,
}

impl OrcTable {
    pub fn read(
        mem: &KernelMemory,
        symbols: &SymbolTable,
        format: OrcFormat,
    ) -> Result<OrcTable, OrcError> {
        let sym = |n: &'static str| symbols.addr(n).ok_or(OrcError::Missing(n));
        let (ip_start, ip_stop) = (sym("__start_orc_unwind_ip")?, sym("__stop_orc_unwind_ip")?);
        let (u_start, u_stop) = (sym("__start_orc_unwind")?, sym("__stop_orc_unwind")?);
        let count = ip_stop.wrapping_sub(ip_start) / 4;
        let esize = format.entry_size;
        if ip_stop < ip_start || count > MAX_ENTRIES || esize == 0 || esize > 8 {
            return Err(OrcError::Corrupt(format!(
                "{count} entries of {esize} bytes"
            )));
        }
        if u_stop.wrapping_sub(u_start) != count * esize {
            return Err(OrcError::Corrupt(format!(
                "{count} addresses but {} bytes of entries",
                u_stop.wrapping_sub(u_start)
            )));
        }
        Self::read_relative(mem, format, ip_start, u_start, count)
    }

    /// A table as the kernel keeps one for a module (`orc_unwind_ip`, `orc_unwind`,
    /// `num_orcs`): `count` place-relative 32-bit addresses at `ip_start`, and as many
    /// entries at `u_start`.
    pub fn read_relative(
        mem: &KernelMemory,
        format: OrcFormat,
        ip_start: u64,
        u_start: u64,
        count: u64,
    ) -> Result<OrcTable, OrcError> {
        let esize = format.entry_size;
        if count > MAX_ENTRIES || esize == 0 || esize > 8 {
            return Err(OrcError::Corrupt(format!(
                "{count} entries of {esize} bytes"
            )));
        }
        let raw_ips = mem.read_vec(ip_start, (count * 4) as usize)?;
        let absolute: Vec<u64> = raw_ips
            .chunks_exact(4)
            .enumerate()
            .map(|(i, c)| {
                let rel = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                ip_start
                    .wrapping_add(4 * i as u64)
                    .wrapping_add(i64::from(rel) as u64)
            })
            .collect();
        drop(raw_ips);
        let entries = mem.read_vec(u_start, (count * esize) as usize)?;
        Self::from_addresses(format, &absolute, entries)
    }

    /// The table of `entries` (`format.entry_size` bytes each) at the absolute
    /// addresses `ips`, stored as offsets from the lowest.
    fn from_addresses(
        format: OrcFormat,
        ips: &[u64],
        entries: Vec<u8>,
    ) -> Result<OrcTable, OrcError> {
        let base = ips.iter().copied().min().unwrap_or(0);
        let ips = ips
            .iter()
            .map(|&ip| u32::try_from(ip - base))
            .collect::<Result<Vec<u32>, _>>()
            .map_err(|_| OrcError::Corrupt("addresses span more than 4 GiB".into()))?;
        Ok(OrcTable {
            format,
            base,
            ips,
            entries,
        })
    }

    pub fn len(&self) -> usize {
        self.ips.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ips.is_empty()
    }

    pub fn format(&self) -> &OrcFormat {
        &self.format
    }

    /// The entry covering `ip`: the last one at or below it. The caller decides whether
    /// `ip` is kernel text at all.
    pub fn find(&self, ip: u64) -> Option<OrcEntry> {
        let rel = ip.checked_sub(self.base)?;
        let rel = u32::try_from(rel).unwrap_or(u32::MAX);
        let pos = self.ips.partition_point(|&x| x <= rel);
        let i = pos.checked_sub(1)?;
        let size = self.format.entry_size as usize;
        let raw = self.entries.get(i * size..(i + 1) * size)?;
        Some(self.format.decode(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::btf::BtfBuilder;

    fn format(new: bool) -> OrcFormat {
        let mut b = BtfBuilder::new();
        let s16 = b.int("s16", 2);
        let uns = b.int("unsigned int", 4);
        let tail: Vec<(&str, u32, u32, u32)> = if new {
            vec![("type", uns, 40, 3), ("signal", uns, 43, 1)]
        } else {
            vec![("type", uns, 40, 2), ("end", uns, 42, 1)]
        };
        let mut fields = vec![
            ("sp_offset", s16, 0, 0),
            ("bp_offset", s16, 16, 0),
            ("sp_reg", uns, 32, 4),
            ("bp_reg", uns, 36, 4),
        ];
        fields.extend(tail);
        b.bitfields("orc_entry", 6, &fields);
        OrcFormat::from_btf(&Btf::parse(&b.finish()).unwrap()).unwrap()
    }

    fn raw(sp_off: i16, bp_off: i16, sp_reg: u8, bp_reg: u8, high: u8) -> [u8; 6] {
        let s = sp_off.to_le_bytes();
        let b = bp_off.to_le_bytes();
        [s[0], s[1], b[0], b[1], sp_reg | (bp_reg << 4), high]
    }

    #[test]
    fn finds_the_last_entry_at_or_below_an_address_kept_as_offsets() {
        let f = format(true);
        let base = 0xffff_c900_0000_0000u64;
        let entries = [raw(8, 0, reg::SP, 0, 2), raw(16, 0, reg::SP, 0, 2)].concat();
        let t = OrcTable::from_addresses(f.clone(), &[base, base + 0x40], entries).unwrap();
        assert!(t.find(base - 1).is_none(), "below the table");
        assert_eq!(t.find(base).unwrap().sp_offset, 8);
        assert_eq!(t.find(base + 0x3f).unwrap().sp_offset, 8);
        assert_eq!(t.find(base + 0x40).unwrap().sp_offset, 16);
        // Past 4 GiB above the lowest address: still the last entry, not a wrap-around.
        assert_eq!(t.find(base + (5u64 << 30)).unwrap().sp_offset, 16);
        // A hostile table spanning more than 4 GiB is refused.
        let e = OrcTable::from_addresses(f, &[base, base + (5u64 << 30)], vec![0; 12]);
        assert!(matches!(e, Err(OrcError::Corrupt(_))));
    }

    #[test]
    fn decodes_the_6_1_layout() {
        let f = format(false);
        assert!(f.has_end_bit());
        let call = f.decode(&raw(16, -16, reg::SP, reg::PREV_SP, 0));
        assert_eq!(
            (call.kind, call.sp_offset, call.bp_offset, call.signal),
            (OrcKind::Call, 16, -16, false)
        );
        assert_eq!(f.decode(&raw(0, 0, reg::SP, 0, 1)).kind, OrcKind::Regs);
        assert!(f.decode(&raw(0, 0, reg::SP, 0, 2)).signal);
        assert_eq!(f.decode(&raw(0, 0, 0, 0, 1 << 2)).kind, OrcKind::EndOfStack);
        assert_eq!(f.decode(&raw(0, 0, 0, 0, 0)).kind, OrcKind::Undefined);
    }

    #[test]
    fn decodes_the_6_4_plus_layout() {
        let f = format(true);
        assert!(!f.has_end_bit());
        assert_eq!(f.decode(&raw(8, 0, reg::SP, 0, 2)).kind, OrcKind::Call);
        let regs = f.decode(&raw(0, 0, reg::SP, 0, 3 | 1 << 3));
        assert_eq!((regs.kind, regs.signal), (OrcKind::Regs, true));
        assert_eq!(f.decode(&raw(0, 0, 0, 0, 1)).kind, OrcKind::EndOfStack);
        assert_eq!(f.decode(&raw(0, 0, 0, 0, 0)).kind, OrcKind::Undefined);
        assert_eq!(
            f.decode(&raw(0, 0, reg::SP, 0, 4)).kind,
            OrcKind::RegsPartial
        );
    }
}
