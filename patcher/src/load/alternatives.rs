//! Alternative instructions (`.altinstructions`, asm/alternative.h) in a patch: what the
//! guest kernel's `apply_alternatives()` does to a module at load, done by lpvmm at link
//! time with the guest's own CPU features (`boot_cpu_data.x86_capability`, as the guest
//! decided them at boot, its bug bits included). Where the guest would use the
//! replacement, the replacement's instructions are re-encoded at the original place
//! (their relative branches and RIP-relative operands still reach the same targets) and
//! the rest is padded with NOPs; elsewhere the original stays.

use iced_x86::{BlockEncoder, BlockEncoderOptions, Decoder, DecoderOptions, InstructionBlock};
use introspection::kernel::Kernel;
use introspection::memory::KernelMemory;

use crate::load::object::Alternative;
use crate::KpError;

/// `ALT_FLAG_NOT`: use the replacement when the feature is *absent*.
const FLAG_NOT: u16 = 1 << 0;
/// `ALT_FLAG_DIRECT_CALL` (6.10+): the replacement is an indirect call through a
/// paravirt pointer the kernel turns into a direct call.
const FLAG_DIRECT_CALL: u16 = 1 << 1;
/// Words of capability and bug bits read (NCAPINTS + NBUGINTS is about 24 today).
const MAX_WORDS: u64 = 64;

/// The guest's CPU capability and bug bits, as its kernel decided them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuFeatures {
    words: Vec<u32>,
}

impl CpuFeatures {
    pub fn from_words(words: Vec<u32>) -> Self {
        CpuFeatures { words }
    }

    /// `boot_cpu_data.x86_capability`, located with the kernel's BTF.
    pub fn of_guest(mem: &KernelMemory, kernel: &Kernel) -> Result<CpuFeatures, KpError> {
        let need = |what: &str| {
            KpError::Unsupported(format!(
                "alternative instructions need {what} in the guest kernel, to know its CPU \
                 features"
            ))
        };
        let base = kernel
            .symbols
            .addr("boot_cpu_data")
            .ok_or_else(|| need("the symbol boot_cpu_data"))?;
        let field = kernel
            .layout
            .patcher
            .x86_capability
            .ok_or_else(|| need("cpuinfo_x86.x86_capability in BTF"))?;
        let words = (field.size / 4).clamp(1, MAX_WORDS);
        let at = base + field.bit_offset / 8;
        let bytes = mem
            .read_vec(at, (words * 4) as usize)
            .map_err(|e| KpError::guest("reading boot_cpu_data", e))?;
        Ok(CpuFeatures {
            words: bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        })
    }

    pub fn has(&self, feature: u16) -> bool {
        let (word, bit) = (usize::from(feature / 32), feature % 32);
        self.words.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }
}

/// Would the guest use `a`'s replacement?
pub fn selected(a: &Alternative, cpu: &CpuFeatures) -> bool {
    cpu.has(a.feature) != (a.flags & FLAG_NOT != 0)
}

/// The bytes to put at the original instruction, at `instr_addr`: the replacement
/// (`repl`, linked at `repl_addr`) re-encoded there and padded with NOPs.
pub fn rewrite(
    a: &Alternative,
    repl: &[u8],
    repl_addr: u64,
    instr_addr: u64,
    what: &dyn Fn() -> String,
) -> Result<Vec<u8>, KpError> {
    let bad = |why: String| KpError::Unsupported(format!("alternative at {}: {why}", what()));
    if a.flags & FLAG_DIRECT_CALL != 0 {
        return Err(bad(
            "a paravirt direct call, which lpvmm does not resolve".into()
        ));
    }
    let mut instrs = Vec::new();
    let mut d = Decoder::with_ip(64, repl, repl_addr, DecoderOptions::NONE);
    while d.can_decode() {
        let i = d.decode();
        if i.is_invalid() {
            return Err(bad("the replacement does not decode".into()));
        }
        let t = i.near_branch_target();
        if t > repl_addr && t < repl_addr + repl.len() as u64 {
            return Err(bad("the replacement jumps inside itself".into()));
        }
        instrs.push(i);
    }
    let mut bytes = if instrs.is_empty() {
        Vec::new()
    } else {
        BlockEncoder::encode(
            64,
            InstructionBlock::new(&instrs, instr_addr),
            BlockEncoderOptions::NONE,
        )
        .map_err(|e| bad(format!("cannot place the replacement: {e}")))?
        .code_buffer
    };
    if bytes.len() > usize::from(a.instr_len) {
        return Err(bad(format!(
            "the replacement takes {} bytes at its new place, the original {}",
            bytes.len(),
            a.instr_len
        )));
    }
    bytes.resize(usize::from(a.instr_len), 0x90);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::object::Place;

    fn alt(feature: u16, flags: u16, instr_len: u8) -> Alternative {
        Alternative {
            instr: Place {
                section: 0,
                offset: 0,
            },
            repl: Place {
                section: 1,
                offset: 0,
            },
            feature,
            flags,
            instr_len,
            repl_len: 5,
        }
    }

    #[test]
    fn the_guests_features_choose_and_a_call_keeps_its_target() {
        let cpu = CpuFeatures::from_words(vec![0, 1 << 3]);
        assert!(selected(&alt(35, 0, 5), &cpu));
        assert!(!selected(&alt(35, FLAG_NOT, 5), &cpu));
        assert!(selected(&alt(36, FLAG_NOT, 5), &cpu));
        assert!(
            !selected(&alt(9999, 0, 5), &cpu),
            "an unknown bit is absent"
        );
        // call 0x2000, placed at 0x10000, moved to 0x1000 in a 6-byte slot.
        let repl_addr = 0x10000u64;
        let rel = (0x2000i64 - (repl_addr as i64 + 5)) as i32;
        let mut call = vec![0xe8];
        call.extend_from_slice(&rel.to_le_bytes());
        let out = rewrite(&alt(35, 0, 6), &call, repl_addr, 0x1000, &|| "t".into()).unwrap();
        assert_eq!(out.len(), 6);
        assert_eq!(out[0], 0xe8);
        let moved = i32::from_le_bytes(out[1..5].try_into().unwrap());
        assert_eq!(0x1000 + 5 + i64::from(moved), 0x2000);
        assert_eq!(out[5], 0x90);
        // Longer than the original, or a paravirt direct call: refused.
        assert!(rewrite(&alt(35, 0, 4), &call, repl_addr, 0x1000, &|| "t".into()).is_err());
        assert!(rewrite(
            &alt(35, FLAG_DIRECT_CALL, 6),
            &call,
            repl_addr,
            0x1000,
            &|| "t".into()
        )
        .unwrap_err()
        .to_string()
        .contains("paravirt"));
        // An empty replacement is all NOPs.
        assert_eq!(
            rewrite(&alt(35, 0, 3), &[], repl_addr, 0x1000, &|| "t".into()).unwrap(),
            [0x90, 0x90, 0x90]
        );
    }
}
