//! Redirection sites: the 5-byte fentry NOP every patchable kernel function starts with
//! (after `endbr64`, or the NOP the kernel seals it with, on IBT kernels), turned into
//! `jmp rel32` to the new function.

use iced_x86::{Code, Decoder, DecoderOptions};

use crate::KpError;

/// `nopl 0x0(%rax,%rax,1)`: what ftrace leaves at an untraced function's entry.
pub const FENTRY_NOP: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// `ENDBR_POISON` (arch/x86/include/asm/ibt.h, `osp nopl (%rax)`): what the kernel
/// seals an `endbr64` with, at boot or module load, in a function nothing calls
/// indirectly (objtool's `.ibt_endbr_seal`).
const ENDBR_SEALED: [u8; 4] = [0x66, 0x0f, 0x1f, 0x00];
pub(crate) const JMP_REL32: u8 = 0xe9;
pub(crate) const CALL_REL32: u8 = 0xe8;

/// Offset of the fentry site from the function's start.
pub fn site_offset(entry: &[u8]) -> u64 {
    if entry.starts_with(&ENDBR64) || entry.starts_with(&ENDBR_SEALED) {
        4
    } else {
        0
    }
}

/// What the 5 bytes at a site are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SiteState {
    /// The fentry NOP: free to redirect.
    Nop,
    /// `jmp rel32` to this target (a redirection, ours if the target is in the area).
    Jump(u64),
}

/// Decode the site with iced-x86 and say what it is, or why it cannot be used.
pub fn inspect(func: &str, site: u64, bytes: &[u8; 5]) -> Result<SiteState, KpError> {
    let mut d = Decoder::with_ip(64, bytes, site, DecoderOptions::NONE);
    let insn = d.decode();
    if insn.len() == 5 && insn.code() == Code::Nop_rm32 && *bytes == FENTRY_NOP {
        return Ok(SiteState::Nop);
    }
    if insn.len() == 5 && bytes[0] == JMP_REL32 {
        return Ok(SiteState::Jump(insn.near_branch_target()));
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x} ")).collect();
    let why = if bytes[0] == CALL_REL32 {
        "a call: ftrace (or a kprobe) is using this function; stop tracing it and retry"
    } else {
        "not an fentry NOP: the function cannot be patched (built without -mfentry, or notrace)"
    };
    Err(KpError::Site(format!(
        "{func} at {site:#x} starts with {}({why})",
        hex
    )))
}

/// `jmp rel32` from `site` to `target`.
pub fn jump(site: u64, target: u64) -> Result<[u8; 5], KpError> {
    let rel = i128::from(target) - i128::from(site) - 5;
    let rel = i32::try_from(rel)
        .map_err(|_| KpError::OutOfRange(format!("jump from {site:#x} to {target:#x}")))?;
    let r = rel.to_le_bytes();
    Ok([JMP_REL32, r[0], r[1], r[2], r[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_nop_jump_and_refuses_the_rest() {
        assert_eq!(inspect("f", 0x1000, &FENTRY_NOP).unwrap(), SiteState::Nop);
        let j = jump(0xffff_ffff_8100_0000, 0xffff_ffff_a000_0000).unwrap();
        assert_eq!(
            inspect("f", 0xffff_ffff_8100_0000, &j).unwrap(),
            SiteState::Jump(0xffff_ffff_a000_0000)
        );
        let traced = [0xe8, 1, 2, 3, 4];
        assert!(inspect("f", 0, &traced)
            .unwrap_err()
            .to_string()
            .contains("ftrace"));
        let plain = [0x55, 0x48, 0x89, 0xe5, 0x90];
        assert!(inspect("f", 0, &plain)
            .unwrap_err()
            .to_string()
            .contains("not an fentry NOP"));
        assert_eq!(site_offset(&[0xf3, 0x0f, 0x1e, 0xfa, 0x0f]), 4);
        assert_eq!(
            site_offset(&[0x66, 0x0f, 0x1f, 0x00, 0x0f]),
            4,
            "a sealed endbr64"
        );
        assert_eq!(site_offset(&FENTRY_NOP), 0);
        assert!(jump(0, 1 << 40).is_err());
    }
}
