//! The guest kernel's taint (`tainted_mask`, what /proc/sys/kernel/tainted shows): read
//! to see an oops that killed a callback's kworker ([`crate::lost_calls`]), and `K` set
//! when a patch is loaded, as the kernel sets it when a livepatch module is.

use introspection::kernel::Kernel;
use introspection::{GuestRam, Unconfirmed};

/// The kernel's TAINT_DIE: an oops happened.
pub(crate) const TAINT_DIE: u64 = 1 << 7;
/// The kernel's taint letters, bit by bit (kernel/panic.c, `taint_flags`).
const TAINT_LETTERS: &[u8; 19] = b"PFSRMBUDAWCIOELKXTN";

/// The letters /proc/sys/kernel/tainted's bits stand for, as the kernel prints them.
pub fn taint_letters(mask: u64) -> String {
    TAINT_LETTERS
        .iter()
        .enumerate()
        .filter(|(bit, _)| mask & (1 << bit) != 0)
        .map(|(_, &c)| c as char)
        .collect()
}

/// The guest kernel's `tainted_mask`, read while it runs (`None`: no such symbol).
pub(crate) fn guest_taint(ram: &dyn GuestRam, kernel: &Kernel) -> Option<u64> {
    let at = kernel.symbols.addr("tainted_mask")?;
    kernel.memory(&Unconfirmed(ram)).u64(at).ok()
}

/// The kernel's TAINT_LIVEPATCH (`K`).
const TAINT_LIVEPATCH: u64 = 1 << 15;

/// Mark the guest's kernel tainted `K`, as loading a livepatch module does (the kernel
/// never clears a taint): an oops or WARNING of a patched guest then says that its code
/// was changed, and a bug report shows it. In the load's pause; the guest's word, handed
/// back (the guest sets other bits later). A kernel without the symbol is left alone.
pub(crate) fn taint_livepatch(guest: &mut dyn crate::GuestWriter, kernel: &Kernel) {
    let Some(at) = kernel.symbols.addr("tainted_mask") else {
        return;
    };
    let mem = kernel.memory(guest.reader());
    let (Ok(mask), Ok(pa)) = (mem.u64(at), mem.translate(at)) else {
        return;
    };
    drop(mem);
    if mask & TAINT_LIVEPATCH == 0 {
        let _ = guest.write_handed_back(pa, &(mask | TAINT_LIVEPATCH).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taint_letters_are_the_kernels() {
        assert_eq!(taint_letters(0), "");
        assert_eq!(taint_letters(1 << 7), "D");
        assert_eq!(taint_letters((1 << 7) | (1 << 9) | (1 << 15)), "DWK");
        assert_eq!(
            taint_letters(1 << 63),
            "",
            "bits the kernel has no letter for"
        );
    }
}
