//! Loading a bzImage, its initrd and command line, and the zero page, following the
//! x86 64-bit boot protocol (Documentation/arch/x86/boot.rst).

use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context, Result};
use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

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

/// What the vCPU needs to start the kernel.
pub struct BootInfo {
    pub entry: u64,
}

/// Validate the kernel file before anything is allocated, so that a wrong path or a file
/// that is not a bzImage gets a plain message.
pub fn check_kernel_file(path: &Path) -> Result<()> {
    let mut f =
        File::open(path).with_context(|| format!("cannot open kernel '{}'", path.display()))?;
    let mut hdr = [0u8; 0x270];
    use std::io::Read;
    f.read_exact(&mut hdr).map_err(|_| {
        anyhow::anyhow!(
            "'{}' is not a bzImage: the file is too short to hold a Linux boot header",
            path.display()
        )
    })?;
    let magic = u32::from_le_bytes(hdr[0x202..0x206].try_into().unwrap());
    let version = u16::from_le_bytes(hdr[0x206..0x208].try_into().unwrap());
    let loadflags = hdr[0x211];
    if magic != KERNEL_HDR_MAGIC {
        bail!(
            "'{}' is not a bzImage: no 'HdrS' boot header magic at offset 0x202 \
             (pass the kernel's bzImage/vmlinuz, not an ELF vmlinux or a compressed archive)",
            path.display()
        );
    }
    if version < 0x020c || loadflags & LOADED_HIGH == 0 {
        bail!(
            "'{}' uses boot protocol {}.{:02}: lpvmm needs a 64-bit bzImage with protocol 2.12 or newer",
            path.display(),
            version >> 8,
            version & 0xff
        );
    }
    Ok(())
}

/// Load kernel, command line and initrd into guest memory and write the zero page.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp_addr: u64,
) -> Result<BootInfo> {
    let mut kernel_file =
        File::open(kernel).with_context(|| format!("cannot open kernel '{}'", kernel.display()))?;
    let loaded = BzImage::load(
        mem,
        None,
        &mut kernel_file,
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .with_context(|| format!("cannot load '{}' as a bzImage", kernel.display()))?;
    let hdr = loaded
        .setup_header
        .context("bzImage loader returned no setup header")?;

    // The kernel decompresses itself to at least 16 MiB and needs init_size bytes there.
    let init_size = u64::from(hdr.init_size);
    let kernel_needs = layout::KERNEL_RUN_ADDR + init_size;
    if layout.low_ram.end() < kernel_needs + (16 << 20) {
        bail!(
            "memory too small for this kernel: it needs {} MiB to decompress and start \
             (init_size {} MiB at 16 MiB) plus room to run; give --memory of at least {} MiB",
            kernel_needs >> 20,
            init_size >> 20,
            (kernel_needs >> 20) + 48
        );
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

    if let Some(initrd) = initrd {
        let (addr, size) = load_initrd(mem, layout, initrd, &params, kernel_needs)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    set_e820(&mut params, layout);

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_ADDR)),
        mem,
    )
    .context("writing the zero page")?;

    Ok(BootInfo {
        entry: loaded.kernel_load.0 + ENTRY_64_OFFSET,
    })
}

/// Write the kernel command line where the zero page will point, refusing one longer
/// than the kernel accepts (`cmdline_max`, from its setup header).
fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, cmdline_max: usize) -> Result<()> {
    let mut cmd = Cmdline::new(layout::CMDLINE_MAX).context("command line buffer")?;
    cmd.insert_str(cmdline)
        .map_err(|e| anyhow::anyhow!("invalid kernel command line '{cmdline}': {e}"))?;
    if cmdline.len() + 1 > cmdline_max {
        bail!(
            "kernel command line is {} bytes; this kernel accepts at most {cmdline_max}",
            cmdline.len()
        );
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), &cmd)
        .context("writing the kernel command line")
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
    path: &Path,
    params: &boot_params,
    kernel_end: u64,
) -> Result<(u64, u64)> {
    // Size first: a huge file is refused without reading it.
    let size = std::fs::metadata(path)
        .with_context(|| format!("cannot read initrd '{}'", path.display()))?
        .len();
    // initrd_addr_max is the highest address the initrd may *end* at (minus one).
    let max_end = (u64::from(params.hdr.initrd_addr_max) + 1).min(layout.low_ram.end());
    let addr = max_end.checked_sub(size).map(|a| a & !0xfff);
    match addr {
        Some(addr) if addr >= kernel_end && size <= u32::MAX as u64 => {
            let data = std::fs::read(path)
                .with_context(|| format!("cannot read initrd '{}'", path.display()))?;
            if data.len() as u64 != size {
                bail!("initrd '{}' changed size while being read", path.display());
            }
            mem.write_slice(&data, GuestAddress(addr))
                .context("writing the initrd")?;
            Ok((addr, size))
        }
        _ => bail!(
            "initrd '{}' ({} MiB) does not fit: with --memory {} MiB only {} MiB are free \
             above the kernel; give more --memory or a smaller initrd",
            path.display(),
            size >> 20,
            layout.low_ram.end() >> 20,
            max_end.saturating_sub(kernel_end) >> 20
        ),
    }
}
