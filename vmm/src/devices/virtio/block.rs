//! virtio-blk (virtio 1.x §5.2): a raw image file or a block device as the guest's
//! disk, `--disk FILE[,ro]`.
//!
//! Requests are served in order on the I/O thread with positioned reads and writes on
//! the file; a flush request is `fdatasync(2)` (the device offers VIRTIO_BLK_F_FLUSH,
//! so the guest runs a write-back cache and flushes on its own fsync). Data lands in
//! the host's page cache before the request completes, so a VMM killed with SIGKILL
//! loses nothing the guest was told was written; a host crash loses what no flush
//! covered, as on a disk with a volatile cache.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::F_VERSION_1;
use super::{DeviceError, VirtioDevice};

const DEVICE_TYPE: u32 = 2;
const QUEUE_SIZE: u16 = 256;
const SECTOR: u64 = 512;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// The request header the driver puts first: type, reserved, sector.
const HEADER_LEN: u32 = 16;
/// The serial number a GET_ID request reads (at most 20 bytes, not NUL-terminated).
const ID_LEN: usize = 20;
/// Host memory one copy between guest RAM and the file uses at most, however long a
/// descriptor the guest gives.
const CHUNK: usize = 256 << 10;

/// `--disk FILE[,ro]` as given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
}

/// A `--disk` that lpvmm cannot use, found before the guest boots.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("--disk '{0}': unknown option '{1}' (expected FILE or FILE,ro)")]
    Option(String, String),
    #[error("--disk '{0}': no file named")]
    NoPath(String),
    #[error("--disk {path}: cannot open it {mode}: {source}{hint}")]
    Open {
        path: String,
        mode: &'static str,
        hint: &'static str,
        source: std::io::Error,
    },
    #[error("--disk {path}: cannot find its size: {source}")]
    Size {
        path: String,
        source: std::io::Error,
    },
    #[error("--disk {path}: is {size} bytes, not a whole number of 512-byte sectors")]
    NotSectors { path: String, size: u64 },
    #[error("--disk {path}: another process uses it (lpvmm takes it {mode}: {source})")]
    Locked {
        path: String,
        mode: &'static str,
        source: std::io::Error,
    },
    #[error("at most {0} disks")]
    TooMany(usize),
}

impl std::str::FromStr for DiskSpec {
    type Err = DiskError;

    fn from_str(s: &str) -> Result<DiskSpec, DiskError> {
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(DiskError::NoPath(s.to_string()));
        }
        let mut read_only = false;
        for opt in parts {
            match opt {
                "ro" => read_only = true,
                "rw" => read_only = false,
                other => return Err(DiskError::Option(s.to_string(), other.to_string())),
            }
        }
        Ok(DiskSpec {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

/// An opened disk: the file, locked against other writers, and its size.
pub struct Disk {
    file: File,
    spec: DiskSpec,
    sectors: u64,
}

impl Disk {
    /// Open and lock `spec`'s file, as the guest will use it.
    pub fn open(spec: &DiskSpec) -> Result<Disk, DiskError> {
        let path = spec.path.display().to_string();
        let (mode, hint) = if spec.read_only {
            ("read-only", "")
        } else {
            ("read-write", " (to give it read-only: --disk FILE,ro)")
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!spec.read_only)
            .open(&spec.path)
            .map_err(|source| DiskError::Open {
                path: path.clone(),
                mode,
                hint: if source.kind() == std::io::ErrorKind::NotFound {
                    ""
                } else {
                    hint
                },
                source,
            })?;
        lock(&file, spec.read_only).map_err(|source| DiskError::Locked {
            path: path.clone(),
            mode: if spec.read_only {
                "shared"
            } else {
                "exclusively"
            },
            source,
        })?;
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| DiskError::Size {
                path: path.clone(),
                source,
            })?;
        if !size.is_multiple_of(SECTOR) {
            return Err(DiskError::NotSectors { path, size });
        }
        Ok(Disk {
            file,
            spec: spec.clone(),
            sectors: size / SECTOR,
        })
    }

    pub fn path(&self) -> &Path {
        &self.spec.path
    }
}

/// flock(2): shared for a read-only disk, exclusive otherwise, never waiting (as QEMU
/// locks its images): two VMs writing one disk would corrupt it.
fn lock(file: &File, shared: bool) -> std::io::Result<()> {
    let op = if shared { libc::LOCK_SH } else { libc::LOCK_EX };
    // SAFETY: flock on a descriptor this function's caller owns.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The block device model.
pub struct Block {
    disk: Disk,
    name: String,
    config: [u8; 16],
    id: [u8; ID_LEN],
    buf: Vec<u8>,
}

/// One parsed request: what to do, where on the disk, the guest buffers, and where the
/// status byte goes.
struct Request {
    kind: u32,
    sector: u64,
    data: Vec<Segment>,
    status: GuestAddress,
}

#[derive(Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

impl Block {
    /// `name` is how lpvmm names the disk (`vda`...: the guest's name for the n-th disk).
    pub fn new(disk: Disk, name: String) -> Block {
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&disk.sectors.to_le_bytes());
        // seg_max: the most data descriptors in one request (the queue holds header and
        // status besides).
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        let mut id = [0u8; ID_LEN];
        let serial = format!("lpvmm-{name}");
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Block {
            disk,
            name,
            config,
            id,
            buf: Vec::new(),
        }
    }

    /// Serve one chain: returns the bytes written into the guest's buffers.
    fn serve(&mut self, req: &Request, mem: &GuestMemoryMmap) -> u32 {
        let (status, written) = match req.kind {
            T_IN => self.transfer(req, mem, true),
            T_OUT if self.disk.spec.read_only => (S_IOERR, 0),
            T_OUT => self.transfer(req, mem, false),
            T_FLUSH => match self.disk.file.sync_data() {
                Ok(()) => (S_OK, 0),
                Err(_) => (S_IOERR, 0),
            },
            T_GET_ID => self.get_id(req, mem),
            _ => (S_UNSUPP, 0),
        };
        match mem.write_obj(status, req.status) {
            Ok(()) => written + 1,
            Err(_) => written,
        }
    }

    /// Disk ↔ guest copy for IN (`to_guest`) and OUT requests, in [`CHUNK`]s.
    fn transfer(&mut self, req: &Request, mem: &GuestMemoryMmap, to_guest: bool) -> (u8, u32) {
        let total: u64 = req.data.iter().map(|s| u64::from(s.len)).sum();
        let in_range = req
            .sector
            .checked_mul(SECTOR)
            .and_then(|start| start.checked_add(total))
            .is_some_and(|end| end <= self.disk.sectors * SECTOR);
        if !in_range || !total.is_multiple_of(SECTOR) {
            return (S_IOERR, 0);
        }
        let mut offset = req.sector * SECTOR;
        let mut written = 0u32;
        for seg in &req.data {
            let mut done = 0u32;
            while done < seg.len {
                let n = (seg.len - done).min(CHUNK as u32);
                let at = GuestAddress(seg.addr.0 + u64::from(done));
                self.buf.resize(n as usize, 0);
                let ok = if to_guest {
                    self.disk.file.read_exact_at(&mut self.buf, offset).is_ok()
                        && mem.write_slice(&self.buf, at).is_ok()
                } else {
                    mem.read_slice(&mut self.buf, at).is_ok()
                        && self.disk.file.write_all_at(&self.buf, offset).is_ok()
                };
                if !ok {
                    return (S_IOERR, written);
                }
                done += n;
                offset += u64::from(n);
                if to_guest {
                    written += n;
                }
            }
        }
        (S_OK, written)
    }

    fn get_id(&self, req: &Request, mem: &GuestMemoryMmap) -> (u8, u32) {
        let Some(seg) = req.data.first() else {
            return (S_IOERR, 0);
        };
        let n = (seg.len as usize).min(ID_LEN);
        match mem.write_slice(&self.id[..n], seg.addr) {
            Ok(()) => (S_OK, n as u32),
            Err(_) => (S_IOERR, 0),
        }
    }
}

/// Read a chain as a block request. The chain itself is bounded by virtio-queue (at
/// most the queue's size of descriptors, 4 GiB in all); what it must hold is checked
/// here: a readable header of 16 bytes first, a writable status byte last, and between
/// them data buffers all writable (IN, GET_ID) or all readable (OUT).
fn parse<I>(mut descriptors: I, mem: &GuestMemoryMmap) -> Result<Request, DeviceError>
where
    I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let bad = |why: &str| DeviceError::Chain(why.to_string());
    let head = descriptors.next().ok_or_else(|| bad("no descriptor"))?;
    if head.is_write_only() || head.len() < HEADER_LEN {
        return Err(bad("the header is not a readable 16-byte buffer"));
    }
    let kind: u32 = mem
        .read_obj(head.addr())
        .map_err(|_| bad("the header is outside guest RAM"))?;
    let sector: u64 = mem
        .read_obj(GuestAddress(head.addr().0 + 8))
        .map_err(|_| bad("the header is outside guest RAM"))?;
    let rest: Vec<(Segment, bool)> = descriptors
        .map(|d| {
            let seg = Segment {
                addr: d.addr(),
                len: d.len(),
            };
            (seg, d.is_write_only())
        })
        .collect();
    let ((status, writable), data) = rest
        .split_last()
        .ok_or_else(|| bad("no status descriptor"))?;
    if !writable || status.len < 1 {
        return Err(bad("the last descriptor is not a writable status byte"));
    }
    let device_writes = matches!(kind, T_IN | T_GET_ID);
    if matches!(kind, T_IN | T_OUT | T_GET_ID) && data.iter().any(|(_, w)| *w != device_writes) {
        return Err(bad(if device_writes {
            "a read request has a data buffer the device may not write"
        } else {
            "a write request has a data buffer the device may not read"
        }));
    }
    Ok(Request {
        kind,
        sector,
        data: data.iter().map(|(s, _)| *s).collect(),
        status: status.addr,
    })
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        let ro = if self.disk.spec.read_only { F_RO } else { 0 };
        F_VERSION_1 | F_SEG_MAX | F_FLUSH | ro
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn process(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        let Some(queue) = queues.get_mut(index) else {
            return Ok(false);
        };
        let chains: Vec<_> = queue
            .iter(mem)
            .map_err(|e| DeviceError::Ring(e.to_string()))?
            .collect();
        let mut used = false;
        for chain in chains {
            let head = chain.head_index();
            let req = parse(chain, mem)?;
            let len = self.serve(&req, mem);
            queue
                .add_used(mem, head, len)
                .map_err(|e| DeviceError::Ring(e.to_string()))?;
            used = true;
        }
        Ok(used)
    }

    fn describe(&self) -> String {
        let mode = if self.disk.spec.read_only { "ro" } else { "rw" };
        format!(
            "virtio-blk {} ({}, {mode}, {} MiB)",
            self.name,
            self.disk.path().display(),
            (self.disk.sectors * SECTOR) >> 20
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as D, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    /// A descriptor chain as (address, length, flags) triples.
    type Chain = Vec<(u64, u32, u16)>;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x11_0000;
    const STATUS: u64 = 0x20_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    /// A disk of `sectors` sectors whose bytes are their offset modulo 251.
    fn disk(name: &str, sectors: u64, read_only: bool) -> (Block, PathBuf) {
        let path = std::env::temp_dir().join(format!("lpvmm-blk-{}-{name}", std::process::id()));
        let bytes: Vec<u8> = (0..sectors * SECTOR).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, bytes).unwrap();
        let spec = DiskSpec {
            path: path.clone(),
            read_only,
        };
        (Block::new(Disk::open(&spec).unwrap(), "vda".into()), path)
    }

    fn header(m: &GuestMemoryMmap, kind: u32, sector: u64) {
        m.write_obj(kind, GuestAddress(HDR)).unwrap();
        m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Run one chain of (addr, len, flags) through the device.
    fn run(
        b: &mut Block,
        m: &GuestMemoryMmap,
        chain: &[(u64, u32, u16)],
    ) -> Result<u32, DeviceError> {
        let vq = MockSplitQueue::new(m, 16);
        let descs: Vec<RawDescriptor> = chain
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                RawDescriptor::from(D::new(addr, len, flags, i as u16 + 1))
            })
            .collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let q: Queue = vq.create_queue().unwrap();
        assert!(b.process(0, &mut [q], m)?);
        Ok(vq.used().ring().ref_at(0).unwrap().load().len())
    }

    fn request(data: (u64, u32, u16)) -> Vec<(u64, u32, u16)> {
        vec![
            (HDR, 16, NEXT),
            (data.0, data.1, data.2 | NEXT),
            (STATUS, 1, WRITE),
        ]
    }

    fn status(m: &GuestMemoryMmap) -> u8 {
        m.read_obj(GuestAddress(STATUS)).unwrap()
    }

    #[test]
    fn a_read_copies_the_sectors_into_the_guest_buffer() {
        let m = mem();
        let (mut b, path) = disk("read", 8, false);
        header(&m, T_IN, 2);
        let used = run(&mut b, &m, &request((DATA, 1024, WRITE))).unwrap();
        assert_eq!((status(&m), used), (S_OK, 1025));
        let mut got = vec![0u8; 1024];
        m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        let want: Vec<u8> = (1024..2048u64).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, want);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_write_lands_in_the_file_and_a_read_only_disk_refuses_it() {
        let m = mem();
        m.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        let (mut b, path) = disk("write", 4, false);
        header(&m, T_OUT, 3);
        run(&mut b, &m, &request((DATA, 512, 0))).unwrap();
        assert_eq!(status(&m), S_OK);
        let file = std::fs::read(&path).unwrap();
        assert_eq!(&file[1536..2048], &[0xab; 512][..]);
        assert_eq!(file[1535], (1535 % 251) as u8);

        let (mut ro, ro_path) = disk("write-ro", 4, true);
        assert_ne!(ro.features() & F_RO, 0);
        header(&m, T_OUT, 3);
        run(&mut ro, &m, &request((DATA, 512, 0))).unwrap();
        assert_eq!(status(&m), S_IOERR);
        assert_eq!(std::fs::read(&ro_path).unwrap()[1536], (1536 % 251) as u8);
        std::fs::remove_file(path).unwrap();
        std::fs::remove_file(ro_path).unwrap();
    }

    #[test]
    fn requests_past_the_end_fail_with_ioerr_and_change_nothing() {
        let m = mem();
        let (mut b, path) = disk("range", 4, false);
        let before = std::fs::read(&path).unwrap();
        for (sector, len) in [(4, 512), (3, 1024), (u64::MAX / 256, 512), (0, 0xffff_fe00)] {
            header(&m, T_OUT, sector);
            run(&mut b, &m, &request((DATA, len, 0))).unwrap();
            assert_eq!(status(&m), S_IOERR, "sector {sector} len {len}");
        }
        // Not a whole sector.
        header(&m, T_IN, 0);
        run(&mut b, &m, &request((DATA, 100, WRITE))).unwrap();
        assert_eq!(status(&m), S_IOERR);
        assert_eq!(std::fs::read(&path).unwrap(), before);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn flush_get_id_and_unknown_types() {
        let m = mem();
        let (mut b, path) = disk("flush", 1, false);
        header(&m, T_FLUSH, 0);
        let used = run(&mut b, &m, &[(HDR, 16, NEXT), (STATUS, 1, WRITE)]).unwrap();
        assert_eq!((status(&m), used), (S_OK, 1));
        header(&m, T_GET_ID, 0);
        run(&mut b, &m, &request((DATA, 20, WRITE))).unwrap();
        let mut id = [0u8; 9];
        m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!((status(&m), &id), (S_OK, b"lpvmm-vda"));
        header(&m, 99, 0);
        run(&mut b, &m, &[(HDR, 16, NEXT), (STATUS, 1, WRITE)]).unwrap();
        assert_eq!(status(&m), S_UNSUPP);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn malformed_chains_break_the_device() {
        let m = mem();
        let (mut b, path) = disk("malformed", 4, false);
        let cases: [(&str, Chain); 5] = [
            ("no status", vec![(HDR, 16, 0)]),
            ("short header", vec![(HDR, 8, NEXT), (STATUS, 1, WRITE)]),
            (
                "writable header",
                vec![(HDR, 16, WRITE | NEXT), (STATUS, 1, WRITE)],
            ),
            ("read-only status", vec![(HDR, 16, NEXT), (STATUS, 1, 0)]),
            ("read into a readable buffer", request((DATA, 512, 0))),
        ];
        for (what, chain) in cases {
            header(&m, T_IN, 0);
            let e = run(&mut b, &m, &chain).expect_err(what);
            assert!(matches!(e, DeviceError::Chain(_)), "{what}: {e:?}");
        }
        // A header outside guest RAM.
        let e = run(&mut b, &m, &[(0x4f_0000, 16, NEXT), (STATUS, 1, WRITE)]).unwrap_err();
        assert!(e.to_string().contains("outside guest RAM"), "{e}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn disk_specs_and_their_errors() {
        let spec: DiskSpec = "/x/disk.img,ro".parse().unwrap();
        assert_eq!(
            (spec.path.to_str(), spec.read_only),
            (Some("/x/disk.img"), true)
        );
        assert!(!"/x/d".parse::<DiskSpec>().unwrap().read_only);
        let e = "/x/d,cache=none".parse::<DiskSpec>().unwrap_err();
        assert!(e.to_string().contains("unknown option 'cache=none'"), "{e}");
        assert!(",ro".parse::<DiskSpec>().is_err());

        let missing = Disk::open(&"/nonexistent/disk.img".parse().unwrap())
            .err()
            .unwrap();
        assert!(
            missing.to_string().contains("/nonexistent/disk.img"),
            "{missing}"
        );
        let path = std::env::temp_dir().join(format!("lpvmm-blk-{}-odd", std::process::id()));
        std::fs::write(&path, [0u8; 700]).unwrap();
        let spec = DiskSpec {
            path: path.clone(),
            read_only: false,
        };
        let e = Disk::open(&spec).err().unwrap();
        assert!(e.to_string().contains("700 bytes"), "{e}");
        std::fs::write(&path, [0u8; 1024]).unwrap();
        let held = Disk::open(&spec).unwrap();
        let e = Disk::open(&spec).err().unwrap();
        assert!(e.to_string().contains("another process uses it"), "{e}");
        drop(held);
        std::fs::remove_file(path).unwrap();
    }
}
