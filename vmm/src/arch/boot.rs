//! Loading a bzImage, its initrd and command line, and the zero page, following the
//! x86 64-bit boot protocol (Documentation/arch/x86/boot.rst).

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::arch::layout::{self, MemoryLayout};

/// `type_of_loader = 0xff`: "undefined" loader. Without a loader type the kernel ignores
/// the initrd fields.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Offset of the 64-bit entry point from the start of the protected-mode code.
const ENTRY_64_OFFSET: u64 = 0x200;
/// loadflags bit 0: the kernel is a bzImage loaded high.
const LOADED_HIGH: u8 = 1;

/// Why a kernel, its initrd or its command line cannot be loaded.
#[derive(Debug, Error)]
pub enum BootError {
    #[error("cannot open kernel '{}'", .path.display())]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "'{}' is not a bzImage: the file is too short to hold a Linux boot header",
        .0.display()
    )]
    KernelTooShort(PathBuf),
    #[error(
        "'{}' is not a bzImage: no 'HdrS' boot header magic at offset 0x202 (pass the \
         kernel's bzImage/vmlinuz, not an ELF vmlinux or a compressed archive)",
        .0.display()
    )]
    NoBootHeader(PathBuf),
    #[error(
        "'{}' uses boot protocol {}.{:02}: lpvmm needs a 64-bit bzImage with protocol 2.12 \
         or newer",
        .path.display(),
        .version >> 8,
        .version & 0xff
    )]
    OldBootProtocol { path: PathBuf, version: u16 },
    #[error("cannot load '{}' as a bzImage", .path.display())]
    LoadKernel {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("bzImage loader returned no setup header")]
    NoSetupHeader,
    /// The kernel needs `needs` bytes of RAM to decompress (`init_size` of them at
    /// 16 MiB).
    #[error(
        "memory too small for this kernel: it needs {} MiB to decompress and start \
         (init_size {} MiB at 16 MiB) plus room to run; give --memory of at least {} MiB",
        .needs >> 20,
        .init_size >> 20,
        (.needs >> 20) + 48
    )]
    MemoryTooSmall { needs: u64, init_size: u64 },
    #[error("command line buffer")]
    CmdlineBuffer(#[source] linux_loader::cmdline::Error),
    #[error("invalid kernel command line '{cmdline}'")]
    InvalidCmdline {
        cmdline: String,
        #[source]
        source: linux_loader::cmdline::Error,
    },
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("writing the kernel command line")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    #[error("writing the zero page")]
    ZeroPage(#[source] linux_loader::configurator::Error),
    #[error("cannot read initrd '{}'", .path.display())]
    ReadInitrd {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("initrd '{}' changed size while being read", .0.display())]
    InitrdChanged(PathBuf),
    #[error("writing the initrd")]
    WriteInitrd(#[source] GuestMemoryError),
    /// `size` bytes of initrd where `free` bytes are left above the kernel, in a VM of
    /// `memory` bytes below the patch area.
    #[error(
        "initrd '{}' ({} MiB) does not fit: with --memory {} MiB only {} MiB are free \
         above the kernel; give more --memory or a smaller initrd",
        .path.display(),
        .size >> 20,
        .memory >> 20,
        .free >> 20
    )]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        memory: u64,
        free: u64,
    },
}

/// What the vCPU needs to start the kernel.
pub struct BootInfo {
    pub entry: u64,
}

/// Validate the kernel file before anything is allocated, so that a wrong path or a file
/// that is not a bzImage gets a plain message.
pub fn check_kernel_file(path: &Path) -> Result<(), BootError> {
    let mut f = open_kernel(path)?;
    let mut hdr = [0u8; 0x270];
    use std::io::Read;
    f.read_exact(&mut hdr)
        .map_err(|_| BootError::KernelTooShort(path.to_path_buf()))?;
    let magic = u32::from_le_bytes(hdr[0x202..0x206].try_into().unwrap());
    let version = u16::from_le_bytes(hdr[0x206..0x208].try_into().unwrap());
    let loadflags = hdr[0x211];
    if magic != KERNEL_HDR_MAGIC {
        return Err(BootError::NoBootHeader(path.to_path_buf()));
    }
    if version < 0x020c || loadflags & LOADED_HIGH == 0 {
        return Err(BootError::OldBootProtocol {
            path: path.to_path_buf(),
            version,
        });
    }
    Ok(())
}

fn open_kernel(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    })
}

/// Check that the initrd can be read before anything is allocated.
pub fn check_initrd_file(path: &Path) -> Result<(), BootError> {
    initrd_size(path).map(|_| ())
}

fn initrd_size(path: &Path) -> Result<u64, BootError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|source| BootError::ReadInitrd {
            path: path.to_path_buf(),
            source,
        })
}

/// The kernel and the initrd, opened once before the VM starts: a guest reboot loads
/// them again from these descriptors (by then the main thread's seccomp filter lets it
/// open nothing). The initrd's size is the one checked at the start.
pub struct BootFiles {
    kernel: File,
    kernel_path: PathBuf,
    initrd: Option<InitrdFile>,
}

struct InitrdFile {
    file: File,
    path: PathBuf,
    size: u64,
}

impl BootFiles {
    pub fn open(kernel: &Path, initrd: Option<&Path>) -> Result<BootFiles, BootError> {
        check_kernel_file(kernel)?;
        let initrd = match initrd {
            None => None,
            Some(path) => {
                let size = initrd_size(path)?;
                let file = File::open(path).map_err(|source| BootError::ReadInitrd {
                    path: path.to_path_buf(),
                    source,
                })?;
                Some(InitrdFile {
                    file,
                    path: path.to_path_buf(),
                    size,
                })
            }
        };
        Ok(BootFiles {
            kernel: open_kernel(kernel)?,
            kernel_path: kernel.to_path_buf(),
            initrd,
        })
    }
}

/// Load kernel, command line and initrd into guest memory and write the zero page.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    files: &mut BootFiles,
    cmdline: &str,
    rsdp_addr: u64,
) -> Result<BootInfo, BootError> {
    let kernel = files.kernel_path.clone();
    files
        .kernel
        .seek(SeekFrom::Start(0))
        .map_err(|source| BootError::OpenKernel {
            path: kernel.clone(),
            source,
        })?;
    let loaded = BzImage::load(
        mem,
        None,
        &mut files.kernel,
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .map_err(|source| BootError::LoadKernel {
        path: kernel.clone(),
        source,
    })?;
    let hdr = loaded.setup_header.ok_or(BootError::NoSetupHeader)?;

    // The kernel decompresses itself to at least 16 MiB and needs init_size bytes there.
    let init_size = u64::from(hdr.init_size);
    let kernel_needs = layout::KERNEL_RUN_ADDR + init_size;
    if layout.low_ram.end() < kernel_needs + (16 << 20) {
        return Err(BootError::MemoryTooSmall {
            needs: kernel_needs,
            init_size,
        });
    }

    write_cmdline(mem, cmdline, { hdr.cmdline_size } as usize)?;

    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    if params.hdr.kernel_alignment < KERNEL_MIN_ALIGNMENT {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.acpi_rsdp_addr = rsdp_addr;

    if let Some(initrd) = &mut files.initrd {
        let (addr, size) = load_initrd(mem, layout, initrd, &params, kernel_needs)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    set_e820(&mut params, layout);

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(BootError::ZeroPage)?;

    Ok(BootInfo {
        entry: loaded.kernel_load.0 + ENTRY_64_OFFSET,
    })
}

/// Write the kernel command line where the zero page will point, refusing one longer
/// than the kernel accepts (`cmdline_max`, from its setup header).
fn write_cmdline(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    cmdline_max: usize,
) -> Result<(), BootError> {
    let mut cmd = Cmdline::new(layout::CMDLINE_MAX).map_err(BootError::CmdlineBuffer)?;
    cmd.insert_str(cmdline)
        .map_err(|source| BootError::InvalidCmdline {
            cmdline: cmdline.to_string(),
            source,
        })?;
    if cmdline.len() + 1 > cmdline_max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: cmdline_max,
        });
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), &cmd)
        .map_err(BootError::WriteCmdline)
}

/// The memory map the kernel reads from the zero page.
fn set_e820(params: &mut boot_params, layout: &MemoryLayout) {
    let e820 = layout.e820();
    for (i, (addr, size, kind)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = e820.len() as u8;
}

/// Place the initrd as high in low RAM as the kernel allows, page aligned, clear of the
/// region the kernel decompresses into.
fn load_initrd(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    initrd: &mut InitrdFile,
    params: &boot_params,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let size = initrd.size;
    // initrd_addr_max is the highest address the initrd may *end* at (minus one).
    let max_end = (u64::from(params.hdr.initrd_addr_max) + 1).min(layout.low_ram.end());
    let addr = max_end.checked_sub(size).map(|a| a & !0xfff);
    match addr {
        Some(addr) if addr >= kernel_end && size <= u32::MAX as u64 => {
            let path = initrd.path.clone();
            initrd
                .file
                .seek(SeekFrom::Start(0))
                .map_err(|source| BootError::ReadInitrd {
                    path: path.clone(),
                    source,
                })?;
            // Straight from the file into guest memory; a file that shrank since its
            // size was checked leaves the read short.
            mem.read_exact_volatile_from(GuestAddress(addr), &mut initrd.file, size as usize)
                .map_err(|_| BootError::InitrdChanged(path))?;
            Ok((addr, size))
        }
        _ => Err(BootError::InitrdTooLarge {
            path: initrd.path.clone(),
            size,
            memory: layout.low_ram.end(),
            free: max_end.saturating_sub(kernel_end),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tests/tests/vmm.rs (`bad_input`) looks for these words.
    #[test]
    fn a_bad_kernel_file_is_named_with_what_is_wrong() {
        let dir = std::env::temp_dir().join(format!("lpvmm-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("no-such-bzImage");
        let e = check_kernel_file(&missing).unwrap_err();
        assert!(matches!(e, BootError::OpenKernel { .. }), "{e:?}");
        assert!(e.to_string().starts_with("cannot open kernel '"), "{e}");
        assert!(std::error::Error::source(&e).is_some());

        let short = dir.join("short");
        std::fs::write(&short, b"MZ").unwrap();
        let e = check_kernel_file(&short).unwrap_err();
        assert!(e.to_string().contains("is not a bzImage"), "{e}");

        let no_magic = dir.join("no-magic");
        std::fs::write(&no_magic, [0u8; 0x1000]).unwrap();
        let e = check_kernel_file(&no_magic).unwrap_err();
        assert!(matches!(e, BootError::NoBootHeader(_)), "{e:?}");
        assert!(e.to_string().contains("is not a bzImage"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();

        let small = BootError::MemoryTooSmall {
            needs: 40 << 20,
            init_size: 24 << 20,
        };
        assert_eq!(
            small.to_string(),
            "memory too small for this kernel: it needs 40 MiB to decompress and start \
             (init_size 24 MiB at 16 MiB) plus room to run; give --memory of at least 88 MiB"
        );
        let big = BootError::InitrdTooLarge {
            path: "/tmp/huge.img".into(),
            size: 400 << 20,
            memory: 256 << 20,
            free: 200 << 20,
        };
        assert_eq!(
            big.to_string(),
            "initrd '/tmp/huge.img' (400 MiB) does not fit: with --memory 256 MiB only 200 MiB \
             are free above the kernel; give more --memory or a smaller initrd"
        );
    }
}
