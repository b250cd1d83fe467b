//! Disassembly of live guest code with iced-x86, branch targets named from kallsyms.

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};
use serde::{Deserialize, Serialize};

use crate::kallsyms::SymbolTable;

/// Longest function `disasm` shows.
pub const MAX_BYTES: u64 = 64 << 10;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub addr: u64,
    /// `func+0xoff`.
    pub location: String,
    /// The instruction bytes, hex.
    pub bytes: String,
    pub text: String,
}

/// Decode `code`, which the guest runs at `addr`.
pub fn disassemble(code: &[u8], addr: u64, symbols: &SymbolTable) -> Vec<Line> {
    let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut formatter = IntelFormatter::new();
    formatter.options_mut().set_first_operand_char_index(8);
    let mut lines = Vec::new();
    let mut insn = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        let mut text = String::new();
        formatter.format(&insn, &mut text);
        // Name the target of calls and jumps.
        let target = insn.near_branch_target();
        if target != 0 {
            if let Some(l) = symbols.locate(target) {
                text.push_str(&format!(" <{}+{:#x}>", l.name, l.offset));
            }
        }
        let start = (insn.ip() - addr) as usize;
        let bytes = &code[start..start + insn.len()];
        let location = symbols
            .locate(insn.ip())
            .map(|l| format!("{}+{:#x}", l.name, l.offset))
            .unwrap_or_default();
        lines.push(Line {
            addr: insn.ip(),
            location,
            bytes: bytes.iter().map(|b| format!("{b:02x}")).collect(),
            text,
        });
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kallsyms::Symbol;

    #[test]
    fn decodes_fentry_nop_and_names_call_targets() {
        let syms = SymbolTable::new(vec![
            Symbol {
                addr: 0xffff_ffff_8100_0000,
                kind: 'T',
                name: "f".into(),
            },
            Symbol {
                addr: 0xffff_ffff_8100_0100,
                kind: 'T',
                name: "g".into(),
            },
        ]);
        // nopl 0x0(%rax,%rax,1); call g; ret
        let code = [
            0x0f, 0x1f, 0x44, 0x00, 0x00, 0xe8, 0xf6, 0x00, 0x00, 0x00, 0xc3,
        ];
        let lines = disassemble(&code, 0xffff_ffff_8100_0000, &syms);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].bytes, "0f1f440000");
        assert!(lines[0].text.starts_with("nop"), "{}", lines[0].text);
        assert!(
            lines[1].text.contains("call") && lines[1].text.contains('g'),
            "{}",
            lines[1].text
        );
        assert_eq!(lines[2].location, "f+0xa");
    }
}
