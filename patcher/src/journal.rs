//! Every byte lpvmm writes to a guest goes through here, so that lpvmm can say at any
//! time, and above all after the guest died, whether the guest's memory still holds
//! what lpvmm wrote: its *post-mortem*.
//!
//! The engine hands its writers a [`Recorder`] wrapped around the paused guest, so no
//! write can bypass the journal. The journal keeps:
//! - outside the patch area (function sites, ftrace record flags, the kernel's
//!   page-middle entries that map the area): each byte lpvmm holds, with what was there
//!   before. A byte written back to its old value is given back and no longer held
//!   (a site restored to its NOP belongs to the guest's ftrace again).
//! - inside the patch area: every page lpvmm wrote, as it wrote it. The guest only ever
//!   writes the area's data region (patch variables, the guest-call mailbox); the page
//!   tables, code and read-only data are lpvmm's alone and mapped read-only.
//! - writes handed straight back to the guest (a guest call pushed onto a CPU's queue of
//!   cross-CPU calls, which the guest changes at its next IPI): counted, not held.
//!
//! [`Journal::post_mortem`] compares both with the guest. A difference is lpvmm's fault
//! (it wrote something other than what it recorded, or wrote where it did not record)
//! or a guest that wrote over lpvmm's bytes; either way the death is not the platform's.

use std::collections::BTreeMap;

use introspection::{GuestError, GuestRam, PausedGuest, PhysRange, VcpuState};

use crate::GuestWriter;

const PAGE: u64 = 4096;

/// A byte outside the patch area that lpvmm holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct HeldByte {
    before: u8,
    wrote: u8,
}

#[derive(Clone, Debug, Default)]
pub struct Journal {
    held: BTreeMap<u64, HeldByte>,
    /// Writes of guest-owned data handed straight back to the guest (a guest call
    /// pushed onto a CPU's queue), not held.
    pub handed_back: u64,
    /// Patch-area pages lpvmm wrote, keyed by guest-physical page address.
    pages: BTreeMap<u64, Box<[u8]>>,
    /// Test builds only: the next site jump is written with one wrong byte (but
    /// recorded as meant), as a bug of lpvmm's would.
    #[cfg(feature = "fault-injection")]
    wrong_site_byte: bool,
}

/// What the post-mortem found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PostMortem {
    /// Bytes outside the patch area compared.
    pub held_bytes: usize,
    /// Patch-area pages compared (the guest-written data region is left out).
    pub area_pages: usize,
    /// Runs of bytes that differ from what lpvmm wrote.
    pub mismatches: Vec<Mismatch>,
    /// Addresses that could not be read.
    pub unreadable: Vec<u64>,
}

/// A run of bytes that differ from what lpvmm wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Guest-physical address of the first differing byte.
    pub pa: u64,
    pub wrote: Vec<u8>,
    pub found: Vec<u8>,
}

/// How the VMM starts its post-mortem line when every byte is as lpvmm wrote it.
pub const POST_MORTEM_CLEAN: &str = "post-mortem: clean";
/// ... and when some are not.
pub const POST_MORTEM_MISMATCH: &str = "post-mortem: MISMATCH";

/// At most this many differing runs are listed (the count says how many there were).
const LISTED: usize = 8;

impl PostMortem {
    pub fn clean(&self) -> bool {
        self.mismatches.is_empty() && self.unreadable.is_empty()
    }
}

impl std::fmt::Display for PostMortem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = format!(
            "{} byte(s) lpvmm holds outside the patch area, {} page(s) of patch-area code, \
             read-only data and page tables",
            self.held_bytes, self.area_pages
        );
        if self.clean() {
            return write!(
                f,
                "{POST_MORTEM_CLEAN}: the guest holds what lpvmm wrote ({what})"
            );
        }
        write!(
            f,
            "{POST_MORTEM_MISMATCH}: {} run(s) differ from what lpvmm wrote, {} unreadable \
             (of {what}):",
            self.mismatches.len(),
            self.unreadable.len()
        )?;
        for m in self.mismatches.iter().take(LISTED) {
            write!(
                f,
                " [pa {:#x}: wrote {} found {}]",
                m.pa,
                hex(&m.wrote),
                hex(&m.found)
            )?;
        }
        for pa in self.unreadable.iter().take(LISTED) {
            write!(f, " [pa {pa:#x}: unreadable]")?;
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Journal {
    /// A writer that journals every write to `guest`.
    pub fn recorder<'a>(&'a mut self, guest: &'a mut dyn GuestWriter) -> Recorder<'a> {
        Recorder {
            guest,
            journal: self,
        }
    }

    /// Test builds only: make the next site jump lpvmm writes wrong by one byte while
    /// the journal records the bytes meant (see the fault-injection test).
    #[cfg(feature = "fault-injection")]
    pub fn inject_wrong_site_byte(&mut self) {
        self.wrong_site_byte = true;
    }

    /// Write `data` at `pa` through `guest` and record it.
    fn write(
        &mut self,
        guest: &mut dyn GuestWriter,
        pa: u64,
        data: &[u8],
    ) -> Result<(), GuestError> {
        if data.is_empty() {
            return Ok(());
        }
        let area = guest.patch_area();
        let end = pa
            .checked_add(data.len() as u64)
            .ok_or(GuestError::Unmapped {
                addr: pa,
                len: data.len(),
            })?;
        if pa >= area.start && end <= area.end() {
            self.read_pages(guest, pa, end)?;
            guest.write_phys(pa, data)?;
            self.note_area_write(pa, data);
            return Ok(());
        }
        let mut before = vec![0u8; data.len()];
        guest.read_phys(pa, &mut before)?;
        guest.write_phys(pa, &self.as_written(data))?;
        for (i, (&b, &w)) in before.iter().zip(data).enumerate() {
            self.hold(pa + i as u64, b, w);
        }
        Ok(())
    }

    /// The bytes that really go to the guest: `data`, unless a fault is injected.
    fn as_written<'d>(&mut self, data: &'d [u8]) -> std::borrow::Cow<'d, [u8]> {
        #[cfg(feature = "fault-injection")]
        if self.wrong_site_byte && data.len() == 5 && data[0] == crate::funcs::site::JMP_REL32 {
            self.wrong_site_byte = false;
            let mut wrong = data.to_vec();
            // The displacement's sign: the jump lands 2 GiB away, in the unused hole
            // below the kernel image or in user space, never in code.
            wrong[4] ^= 0x80;
            return std::borrow::Cow::Owned(wrong);
        }
        std::borrow::Cow::Borrowed(data)
    }

    fn hold(&mut self, pa: u64, before: u8, wrote: u8) {
        let first_before = self.held.get(&pa).map_or(before, |h| h.before);
        if wrote == first_before {
            self.held.remove(&pa);
        } else {
            self.held.insert(
                pa,
                HeldByte {
                    before: first_before,
                    wrote,
                },
            );
        }
    }

    /// Keep a copy of every area page in `pa..end` not kept yet, as the guest has it now.
    fn read_pages(&mut self, guest: &dyn GuestWriter, pa: u64, end: u64) -> Result<(), GuestError> {
        let mut page = pa & !(PAGE - 1);
        while page < end {
            if let std::collections::btree_map::Entry::Vacant(slot) = self.pages.entry(page) {
                let mut copy = vec![0u8; PAGE as usize].into_boxed_slice();
                guest.read_phys(page, &mut copy)?;
                slot.insert(copy);
            }
            page += PAGE;
        }
        Ok(())
    }

    fn note_area_write(&mut self, pa: u64, data: &[u8]) {
        let mut at = pa;
        let mut rest = data;
        while !rest.is_empty() {
            let page = at & !(PAGE - 1);
            let off = (at - page) as usize;
            let n = rest.len().min(PAGE as usize - off);
            if let Some(copy) = self.pages.get_mut(&page) {
                copy[off..off + n].copy_from_slice(&rest[..n]);
            }
            at += n as u64;
            rest = &rest[n..];
        }
    }

    /// Compare every byte lpvmm holds with the guest's memory. `guest_written` is the
    /// part of the patch area the guest itself writes (the patch data region), left out.
    pub fn post_mortem(&self, ram: &dyn GuestRam, guest_written: Option<PhysRange>) -> PostMortem {
        let mut pm = PostMortem {
            held_bytes: self.held.len(),
            ..PostMortem::default()
        };
        for (&pa, h) in &self.held {
            let mut found = [0u8];
            match ram.read_phys(pa, &mut found) {
                Ok(()) if found[0] == h.wrote => {}
                Ok(()) => add_mismatch(&mut pm.mismatches, pa, h.wrote, found[0]),
                Err(_) => pm.unreadable.push(pa),
            }
        }
        let skip = |page: u64| guest_written.is_some_and(|r| r.contains(page));
        let mut found = vec![0u8; PAGE as usize];
        for (&page, wrote) in self.pages.iter().filter(|(p, _)| !skip(**p)) {
            pm.area_pages += 1;
            if ram.read_phys(page, &mut found).is_err() {
                pm.unreadable.push(page);
                continue;
            }
            for (i, (&w, &f)) in wrote.iter().zip(&found).enumerate() {
                if w != f {
                    add_mismatch(&mut pm.mismatches, page + i as u64, w, f);
                }
            }
        }
        pm
    }
}

/// Add one differing byte, extending the last run when it is the next byte.
fn add_mismatch(runs: &mut Vec<Mismatch>, pa: u64, wrote: u8, found: u8) {
    if let Some(last) = runs.last_mut() {
        if last.pa + last.wrote.len() as u64 == pa {
            last.wrote.push(wrote);
            last.found.push(found);
            return;
        }
    }
    runs.push(Mismatch {
        pa,
        wrote: vec![wrote],
        found: vec![found],
    });
}

/// A paused guest whose writes are journaled: what the engine writes through.
pub struct Recorder<'a> {
    guest: &'a mut dyn GuestWriter,
    journal: &'a mut Journal,
}

impl GuestRam for Recorder<'_> {
    fn read_phys(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        self.guest.read_phys(addr, buf)
    }

    fn read_each(&self, addrs: &[u64], out: &mut [u8]) -> Result<(), GuestError> {
        self.guest.read_each(addrs, out)
    }

    fn patch_area(&self) -> PhysRange {
        self.guest.patch_area()
    }

    fn ram_ranges(&self) -> Vec<PhysRange> {
        self.guest.ram_ranges()
    }
}

impl PausedGuest for Recorder<'_> {
    fn vcpu_count(&self) -> usize {
        self.guest.vcpu_count()
    }

    fn vcpu(&self, index: usize) -> Result<&VcpuState, GuestError> {
        self.guest.vcpu(index)
    }
}

impl GuestWriter for Recorder<'_> {
    fn write_phys(&mut self, addr: u64, data: &[u8]) -> Result<(), GuestError> {
        self.journal.write(self.guest, addr, data)
    }

    fn reader(&self) -> &dyn PausedGuest {
        self.guest.reader()
    }

    fn write_handed_back(&mut self, addr: u64, data: &[u8]) -> Result<(), GuestError> {
        self.guest.write_phys(addr, data)?;
        self.journal.handed_back += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flat guest: 1 MiB of RAM, the patch area its upper half.
    struct Flat {
        mem: Vec<u8>,
    }

    const AREA: PhysRange = PhysRange {
        start: 0x8_0000,
        size: 0x8_0000,
    };

    impl GuestRam for Flat {
        fn read_phys(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestError> {
            let a = addr as usize;
            let src = self.mem.get(a..a + buf.len()).ok_or(GuestError::Unmapped {
                addr,
                len: buf.len(),
            })?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn patch_area(&self) -> PhysRange {
            AREA
        }
        fn ram_ranges(&self) -> Vec<PhysRange> {
            vec![PhysRange {
                start: 0,
                size: self.mem.len() as u64,
            }]
        }
    }
    impl PausedGuest for Flat {
        fn vcpu_count(&self) -> usize {
            0
        }
        fn vcpu(&self, index: usize) -> Result<&VcpuState, GuestError> {
            Err(GuestError::NoSuchVcpu(index))
        }
    }
    impl GuestWriter for Flat {
        fn write_phys(&mut self, addr: u64, data: &[u8]) -> Result<(), GuestError> {
            let a = addr as usize;
            let dst = self
                .mem
                .get_mut(a..a + data.len())
                .ok_or(GuestError::Unmapped {
                    addr,
                    len: data.len(),
                })?;
            dst.copy_from_slice(data);
            Ok(())
        }
        fn reader(&self) -> &dyn PausedGuest {
            self
        }
    }

    fn guest() -> Flat {
        let mut mem = vec![0u8; 1 << 20];
        mem[0x1000..0x1005].copy_from_slice(&[0x0f, 0x1f, 0x44, 0x00, 0x00]);
        Flat { mem }
    }

    #[test]
    fn what_lpvmm_wrote_and_still_holds_is_clean() {
        let mut g = guest();
        let mut j = Journal::default();
        let mut r = j.recorder(&mut g);
        r.write_phys(0x1000, &[0xe9, 1, 2, 3, 4]).unwrap();
        r.write_phys(AREA.start + 0x10, &[0xcc; 100]).unwrap();
        let pm = j.post_mortem(&g, None);
        assert!(pm.clean(), "{pm}");
        assert_eq!((pm.held_bytes, pm.area_pages), (5, 1));
        assert!(pm.to_string().starts_with(POST_MORTEM_CLEAN), "{pm}");
    }

    #[test]
    fn a_byte_the_guest_holds_other_than_lpvmm_wrote_is_named() {
        let mut g = guest();
        let mut j = Journal::default();
        j.recorder(&mut g)
            .write_phys(0x1000, &[0xe9, 1, 2, 3, 4])
            .unwrap();
        j.recorder(&mut g)
            .write_phys(AREA.start + 0x2000, &[0x90; 16])
            .unwrap();
        // Outside the area: a site byte; inside: a byte of code, and a page lpvmm
        // never wrote (not lpvmm's to judge).
        g.mem[0x1003] = 0x77;
        g.mem[AREA.start as usize + 0x2005] = 0xcc;
        g.mem[AREA.start as usize + 0x5000] = 0xcc;
        let pm = j.post_mortem(&g, None);
        assert_eq!(
            pm.mismatches,
            vec![
                Mismatch {
                    pa: 0x1003,
                    wrote: vec![3],
                    found: vec![0x77]
                },
                Mismatch {
                    pa: AREA.start + 0x2005,
                    wrote: vec![0x90],
                    found: vec![0xcc]
                },
            ]
        );
        let text = pm.to_string();
        assert!(
            text.starts_with(POST_MORTEM_MISMATCH)
                && text.contains("[pa 0x1003: wrote 03 found 77]"),
            "{text}"
        );
    }

    #[test]
    fn a_site_given_back_is_the_guests_again() {
        let mut g = guest();
        let mut j = Journal::default();
        let nop = [0x0f, 0x1f, 0x44, 0x00, 0x00];
        j.recorder(&mut g)
            .write_phys(0x1000, &[0xe9, 1, 2, 3, 4])
            .unwrap();
        j.recorder(&mut g)
            .write_phys(0x1000, &[0xe9, 9, 2, 3, 4])
            .unwrap();
        j.recorder(&mut g).write_phys(0x1000, &nop).unwrap();
        // The guest's ftrace takes the NOP back: a call now.
        g.mem[0x1000] = 0xe8;
        let pm = j.post_mortem(&g, None);
        assert!(pm.clean(), "{pm}");
        assert_eq!(pm.held_bytes, 0);
    }

    #[test]
    fn the_guest_written_data_region_is_left_out() {
        let mut g = guest();
        let mut j = Journal::default();
        let data = PhysRange {
            start: AREA.start + 0x4000,
            size: 0x4000,
        };
        j.recorder(&mut g).write_phys(data.start, &[0; 64]).unwrap();
        g.mem[data.start as usize] = 1; // a patch variable the guest's patch code set
        assert!(j.post_mortem(&g, Some(data)).clean());
        assert!(!j.post_mortem(&g, None).clean());
    }

    #[test]
    fn writes_that_fail_record_nothing() {
        let mut g = guest();
        let mut j = Journal::default();
        assert!(j
            .recorder(&mut g)
            .write_phys((1 << 20) - 2, &[1, 2, 3, 4])
            .is_err());
        let pm = j.post_mortem(&g, None);
        assert_eq!((pm.held_bytes, pm.area_pages), (0, 0));
    }

    #[cfg(feature = "fault-injection")]
    #[test]
    fn an_injected_wrong_byte_is_found() {
        let mut g = guest();
        let mut j = Journal::default();
        j.inject_wrong_site_byte();
        j.recorder(&mut g)
            .write_phys(0x1000, &[0xe9, 1, 2, 3, 4])
            .unwrap();
        let pm = j.post_mortem(&g, None);
        assert_eq!(pm.mismatches.len(), 1, "{pm}");
        assert_eq!(pm.mismatches[0].pa, 0x1004);
    }
}
