//! The kernel's VMCOREINFO note: a page of `KEY=value` lines the kernel writes at boot
//! for crash-dump tools (`crash_save_vmcoreinfo_init`, CONFIG_CRASH_CORE on 6.1,
//! CONFIG_VMCORE_INFO on 6.12). It gives, with no profile, the release, the KASLR slide
//! (`KERNELOFFSET`) and the addresses of key symbols (`SYMBOL(name)=hex`), among them the
//! kallsyms tables. The text is found by scanning guest-physical memory for it.
//!
//! The guest controls every byte here: the text is bounded to one page, must be ASCII,
//! and a candidate is accepted only if it has the keys every x86-64 kernel writes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::guest::{GuestError, GuestRam};

/// The kernel reserves one page for the text (VMCOREINFO_BYTES = PAGE_SIZE).
pub const MAX_TEXT: usize = 4096;
const MARKER: &[u8] = b"OSRELEASE=";
/// Scan granularity; chunks overlap by one text's length so no note is split.
const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmcoreInfoError {
    #[error("no VMCOREINFO note in guest memory (is the guest kernel built with CONFIG_CRASH_CORE / CONFIG_VMCORE_INFO, and booted?)")]
    NotFound,
    #[error("VMCOREINFO text is malformed: {0}")]
    Malformed(String),
    #[error(transparent)]
    Guest(#[from] GuestError),
}

/// The parsed note.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmcoreInfo {
    pub osrelease: String,
    pub page_size: u64,
    /// KASLR slide of the kernel image (`KERNELOFFSET`, hex).
    pub kernel_offset: u64,
    pub symbols: BTreeMap<String, u64>,
    pub offsets: BTreeMap<String, u64>,
    pub sizes: BTreeMap<String, u64>,
    /// Every other line, verbatim.
    pub other: BTreeMap<String, String>,
}

impl VmcoreInfo {
    /// Parse the text up to its first NUL (or `MAX_TEXT` bytes).
    pub fn parse(raw: &[u8]) -> Result<VmcoreInfo, VmcoreInfoError> {
        let bad = |m: String| VmcoreInfoError::Malformed(m);
        let end = raw
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(raw.len())
            .min(MAX_TEXT);
        let text = std::str::from_utf8(&raw[..end]).map_err(|_| bad("not UTF-8".into()))?;
        let mut info = VmcoreInfo::default();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| bad(format!("line without '=': {line:.80}")))?;
            let hex = |v: &str| {
                u64::from_str_radix(v, 16).map_err(|_| bad(format!("{key}: not hex: {v:.40}")))
            };
            let dec = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| bad(format!("{key}: not a number: {v:.40}")))
            };
            if let Some(name) = bracketed(key, "SYMBOL") {
                info.symbols.insert(name.into(), hex(value)?);
            } else if let Some(name) = bracketed(key, "OFFSET") {
                info.offsets.insert(name.into(), dec(value)?);
            } else if let Some(name) = bracketed(key, "SIZE") {
                info.sizes.insert(name.into(), dec(value)?);
            } else {
                match key {
                    "OSRELEASE" => info.osrelease = value.to_string(),
                    "PAGESIZE" => info.page_size = dec(value)?,
                    "KERNELOFFSET" => info.kernel_offset = hex(value)?,
                    _ => {
                        info.other.insert(key.to_string(), value.to_string());
                    }
                }
            }
        }
        if info.osrelease.is_empty()
            || info.page_size == 0
            || !info.symbols.contains_key("swapper_pg_dir")
        {
            return Err(bad(
                "missing OSRELEASE, PAGESIZE or SYMBOL(swapper_pg_dir)".into()
            ));
        }
        if !text.contains("KERNELOFFSET=") {
            return Err(bad("missing KERNELOFFSET (not an x86-64 kernel?)".into()));
        }
        Ok(info)
    }

    pub fn symbol(&self, name: &str) -> Option<u64> {
        self.symbols.get(name).copied()
    }

    /// A `NUMBER(name)=decimal` entry (signed, as the kernel prints it with %ld).
    pub fn number(&self, name: &str) -> Option<i64> {
        self.other.get(&format!("NUMBER({name})"))?.parse().ok()
    }
}

fn bracketed<'a>(key: &'a str, kind: &str) -> Option<&'a str> {
    key.strip_prefix(kind)?.strip_prefix('(')?.strip_suffix(')')
}

/// Where the kernel's two copies of the text start in their pages: the text page
/// (`get_zeroed_page`) at 0, the ELF note (`alloc_pages_exact`) after the note's 12-byte
/// header and its name, "VMCOREINFO" padded to 12 bytes.
const PAGE_OFFSETS: [usize; 2] = [0, 24];
const PAGE: u64 = 4096;

/// Find the note in guest RAM. Returns its guest-physical address and contents.
///
/// The kernel keeps two copies (the text page and the ELF note), each at a fixed place
/// in a page of its own; the first that parses wins. So lpvmm first looks only there:
/// a few bytes of each page, not all of RAM. A kernel that keeps them elsewhere (older
/// ones had the note in a static array) is found by the whole scan that follows.
pub fn find(guest: &dyn GuestRam) -> Result<(u64, VmcoreInfo), VmcoreInfoError> {
    match find_at_page_offsets(guest)? {
        Some(found) => Ok(found),
        None => scan(guest),
    }
}

/// [`find`]'s first pass: one short read per page of RAM.
fn find_at_page_offsets(
    guest: &dyn GuestRam,
) -> Result<Option<(u64, VmcoreInfo)>, VmcoreInfoError> {
    let mut head = [0u8; PAGE_OFFSETS[1] + MARKER.len()];
    let mut text = vec![0u8; MAX_TEXT];
    for range in guest.ram_ranges() {
        let mut page = range.start.next_multiple_of(PAGE);
        while page.saturating_add(head.len() as u64) <= range.end() {
            guest.read_phys(page, &mut head)?;
            for off in PAGE_OFFSETS {
                if &head[off..off + MARKER.len()] != MARKER {
                    continue;
                }
                let at = page + off as u64;
                let len = (range.end() - at).min(MAX_TEXT as u64) as usize;
                guest.read_phys(at, &mut text[..len])?;
                if let Ok(info) = VmcoreInfo::parse(&text[..len]) {
                    return Ok(Some((at, info)));
                }
            }
            page += PAGE;
        }
    }
    Ok(None)
}

/// [`find`]'s second pass: every byte of RAM. Chunks advance by `CHUNK` but are read
/// one page (`MAX_TEXT`) longer, so a candidate starting before `CHUNK` has its whole
/// text in the buffer, and one starting in the overlap is looked at again by the next
/// chunk. Time is bounded by RAM size, memory by one chunk.
fn scan(guest: &dyn GuestRam) -> Result<(u64, VmcoreInfo), VmcoreInfoError> {
    let marker = memchr::memmem::Finder::new(MARKER);
    let mut buf = vec![0u8; CHUNK + MAX_TEXT];
    for range in guest.ram_ranges() {
        let mut at = range.start;
        while at < range.end() {
            let len = ((range.end() - at) as usize).min(buf.len());
            let last_chunk = len < buf.len();
            guest.read_phys(at, &mut buf[..len])?;
            let hay = &buf[..len];
            for i in marker.find_iter(hay) {
                if i >= CHUNK && !last_chunk {
                    break; // the next chunk sees this one whole
                }
                // The text starts with OSRELEASE, so it starts a line.
                let line_start = i == 0 || hay[i - 1] == 0 || hay[i - 1] == b'\n';
                if !line_start {
                    continue;
                }
                if let Ok(info) = VmcoreInfo::parse(&hay[i..len.min(i + MAX_TEXT)]) {
                    return Ok((at + i as u64, info));
                }
            }
            if last_chunk {
                break;
            }
            at += CHUNK as u64;
        }
    }
    Err(VmcoreInfoError::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::PhysRange;

    const SAMPLE: &str = "OSRELEASE=6.1.0-56-cloud-amd64\nBUILD-ID=abcd\nPAGESIZE=4096\n\
        SYMBOL(init_uts_ns)=ffffffffa2e14680\nSYMBOL(swapper_pg_dir)=ffffffffa2e0a000\n\
        SYMBOL(kallsyms_names)=ffffffffa1c8e1a8\nOFFSET(list_head.next)=0\n\
        SIZE(list_head)=16\nNUMBER(phys_base)=-1\nKERNELOFFSET=20e00000\n";

    /// Flat memory from 0, for tests.
    struct Flat(Vec<u8>);

    impl GuestRam for Flat {
        fn read_phys(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestError> {
            let start = usize::try_from(addr)
                .ok()
                .filter(|&a| a + buf.len() <= self.0.len());
            let start = start.ok_or(GuestError::Unmapped {
                addr,
                len: buf.len(),
            })?;
            buf.copy_from_slice(&self.0[start..start + buf.len()]);
            Ok(())
        }
        fn patch_area(&self) -> PhysRange {
            PhysRange::default()
        }
        fn ram_ranges(&self) -> Vec<PhysRange> {
            vec![PhysRange {
                start: 0,
                size: self.0.len() as u64,
            }]
        }
    }

    #[test]
    fn parses_the_kernels_text() {
        let info = VmcoreInfo::parse(format!("{SAMPLE}\0garbage").as_bytes()).unwrap();
        assert_eq!(info.osrelease, "6.1.0-56-cloud-amd64");
        assert_eq!(info.kernel_offset, 0x20e0_0000);
        assert_eq!(info.symbol("init_uts_ns"), Some(0xffff_ffff_a2e1_4680));
        assert_eq!(info.sizes["list_head"], 16);
        assert_eq!(info.other["NUMBER(phys_base)"], "-1");
        assert_eq!(info.number("phys_base"), Some(-1));
        assert_eq!(info.number("nope"), None);
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in [
            "",
            "OSRELEASE=x\n",
            "OSRELEASE=x\nPAGESIZE=4096\nSYMBOL(swapper_pg_dir)=zz\nKERNELOFFSET=0\n",
            "OSRELEASE=x\nPAGESIZE=4096\nSYMBOL(swapper_pg_dir)=1\n",
            "OSRELEASE=x\nno equals sign\n",
        ] {
            assert!(
                VmcoreInfo::parse(bad.as_bytes()).is_err(),
                "accepted {bad:?}"
            );
        }
        assert!(VmcoreInfo::parse(&[0xff, 0xfe, b'=']).is_err());
    }

    #[test]
    fn finds_the_note_across_chunk_boundaries_and_skips_decoys() {
        let mut mem = vec![0u8; 3 * CHUNK];
        // A decoy that is not a line start, and a truncated copy that fails to parse.
        mem[100..100 + 12].copy_from_slice(b"xOSRELEASE=1");
        mem[5000..5000 + 19].copy_from_slice(b"OSRELEASE=only\nPAGE");
        // The real note straddles the first chunk boundary.
        let at = CHUNK - 40;
        mem[at..at + SAMPLE.len()].copy_from_slice(SAMPLE.as_bytes());
        let (addr, info) = find(&Flat(mem)).unwrap();
        assert_eq!(addr, at as u64);
        assert_eq!(info.page_size, 4096);
    }

    #[test]
    fn finds_either_copy_where_the_kernel_puts_it_before_scanning() {
        for off in PAGE_OFFSETS {
            let mut mem = vec![0u8; 3 * CHUNK];
            // An unaligned copy earlier in RAM is passed over by the first pass.
            mem[1000..1000 + SAMPLE.len()].copy_from_slice(SAMPLE.replace("56", "57").as_bytes());
            let at = 2 * CHUNK + 5 * PAGE as usize + off;
            mem[at..at + SAMPLE.len()].copy_from_slice(SAMPLE.as_bytes());
            let (addr, info) = find(&Flat(mem)).unwrap();
            assert_eq!(addr, at as u64);
            assert_eq!(info.osrelease, "6.1.0-56-cloud-amd64");
        }
        // A decoy at a page offset that does not parse: the scan goes on to the real one.
        let mut mem = vec![0u8; 2 * CHUNK];
        mem[PAGE as usize..PAGE as usize + 19].copy_from_slice(b"OSRELEASE=only\nPAGE");
        let at = CHUNK + 24;
        mem[at..at + SAMPLE.len()].copy_from_slice(SAMPLE.as_bytes());
        assert_eq!(find(&Flat(mem)).unwrap().0, at as u64);
    }

    #[test]
    fn random_memory_has_no_note_and_does_not_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mem: Vec<u8> = (0..(CHUNK + 12345))
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Sprinkle markers so the parser sees many hostile candidates.
                if i % 50_000 == 0 {
                    b'O'
                } else {
                    x as u8
                }
            })
            .collect();
        let mut mem = mem;
        for i in (0..mem.len() - 20).step_by(70_001) {
            mem[i..i + 10].copy_from_slice(MARKER);
        }
        assert_eq!(find(&Flat(mem)), Err(VmcoreInfoError::NotFound));
    }
}
