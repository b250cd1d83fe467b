//! ACPI tables: RSDP → XSDT → FADT (+ DSDT) and MADT.
//!
//! Debian's cloud kernels are built without CONFIG_X86_MPPARSE, so the MADT is the only
//! way they learn about secondary CPUs. The platform is "hardware-reduced" ACPI: no PM1
//! blocks, no SCI; poweroff is a write to the FADT's sleep control register, which
//! the devices' [`SLEEP_CONTROL_PORT`] catches.

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::arch::layout;
use crate::devices::virtio::{MmioSlot, MMIO_WINDOW};
use crate::devices::{S5_SLEEP_TYPE, SERIAL_IRQ, SERIAL_PORT_BASE, SLEEP_CONTROL_PORT};

const OEM_ID: [u8; 6] = *b"LPVMM ";
const OEM_TABLE: [u8; 8] = *b"LPVMMTBL";
const OEM_REVISION: u32 = 1;

/// IAPC_BOOT_ARCH flags: no VGA, no MSI, no CMOS RTC (kvm-clock gives wall time).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// Why the ACPI tables could not be written.
#[derive(Debug, Error)]
pub enum AcpiError {
    #[error("ACPI tables do not fit in their window")]
    TooLarge,
    #[error("writing ACPI tables")]
    Write(#[source] GuestMemoryError),
}

/// Write the tables at [`layout::ACPI_ADDR`]; returns the RSDP address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    virtio: &[MmioSlot],
) -> Result<u64, AcpiError> {
    let mut tables: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut next = layout::ACPI_ADDR + 0x100; // RSDP goes first, at ACPI_ADDR

    let mut place = |bytes: Vec<u8>| -> u64 {
        let addr = next;
        next = (next + bytes.len() as u64 + 15) & !15;
        tables.push((addr, bytes));
        addr
    };

    let dsdt_addr = place(dsdt(virtio));
    let fadt_addr = place(fadt(dsdt_addr));
    let madt_addr = place(madt(vcpus));

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(to_bytes(&xsdt));

    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    tables.push((layout::ACPI_ADDR, to_bytes(&rsdp)));

    for (addr, bytes) in tables {
        if addr + bytes.len() as u64 > layout::ACPI_ADDR + layout::ACPI_MAX {
            return Err(AcpiError::TooLarge);
        }
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(layout::ACPI_ADDR)
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT declares two things:
/// - `\_S5_`: without it Linux offers no ACPI poweroff and a guest `poweroff` would end
///   in "Attempted to kill init".
/// - COM1 as a PNP0501 device with its IRQ. On a hardware-reduced ACPI platform Linux
///   drops the legacy PIC (`acpi_reduced_hw_init`), so ISA IRQ 4 has no mapping unless
///   ACPI names it; without this the 8250 driver never gets its interrupt and nothing
///   from userspace reaches the console (kernel messages still do, they are polled).
///
/// And one `LNRO0005` device per virtio-mmio slot, with its register window and its
/// edge-triggered interrupt: how the cloud kernel's `virtio_mmio` finds its devices.
fn dsdt(virtio: &[MmioSlot]) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, OEM_REVISION);
    let s5 = Name::new(Path::new("_S5_"), &Package::new(vec![&S5_SLEEP_TYPE]));
    sdt.append_slice(&to_bytes(&s5));
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0501"));
    let uid = Name::new(Path::new("_UID"), &0u8);
    let irq = Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let io = IO::new(SERIAL_PORT_BASE, SERIAL_PORT_BASE, 1, 8);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&io, &irq]));
    let com1 = Device::new(Path::new("_SB_.COM1"), vec![&hid, &uid, &crs]);
    sdt.append_slice(&to_bytes(&com1));
    for (i, slot) in virtio.iter().enumerate() {
        sdt.append_slice(&virtio_device(i, slot));
    }
    sdt.as_slice().to_vec()
}

fn virtio_device(index: usize, slot: &MmioSlot) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &"LNRO0005");
    let uid = Name::new(Path::new("_UID"), &(index as u8));
    // Both fit: the windows lie below 4 GiB (devices/virtio/mod.rs).
    let window = Memory32Fixed::new(true, slot.base as u32, MMIO_WINDOW as u32);
    let irq = Interrupt::new(true, true, false, false, slot.irq);
    let crs = Name::new(
        Path::new("_CRS"),
        &ResourceTemplate::new(vec![&window, &irq]),
    );
    let path = format!("_SB_.VR{index:02}");
    to_bytes(&Device::new(Path::new(&path), vec![&hid, &uid, &crs]))
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let sleep_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(SLEEP_CONTROL_PORT),
    );
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.sleep_control_reg = sleep_reg;
    b.sleep_status_reg = sleep_reg;
    b.iapc_boot_arch =
        (IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT).into();
    to_bytes(&b.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_ADDR),
    );
    for id in 0..vcpus {
        // KVM gives vCPU n the APIC ID n.
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(vcpus, layout::IOAPIC_ADDR, 0));
    to_bytes(&madt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn tables_have_valid_checksums_and_lengths() {
        for t in [dsdt(&[MmioSlot::of(0)]), fadt(0x1000), madt(4)] {
            assert!(checksum_ok(&t), "bad checksum for {:?}", &t[..4]);
            let len = u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, t.len());
        }
    }

    #[test]
    fn dsdt_defines_s5_and_com1() {
        let d = dsdt(&[]);
        assert!(d.windows(4).any(|w| w == b"_S5_"));
        assert!(d.windows(4).any(|w| w == b"COM1"));
        // EISA ID "PNP0501" compressed: 0x41d00501 as the AML dword 0x0105d041.
        assert!(d.windows(4).any(|w| w == [0x41, 0xd0, 0x05, 0x01]));
    }

    #[test]
    fn dsdt_names_each_virtio_slot_with_its_window_and_interrupt() {
        assert!(!dsdt(&[]).windows(8).any(|w| w == b"LNRO0005"));
        let d = dsdt(&[MmioSlot::of(0), MmioSlot::of(1)]);
        assert_eq!(d.windows(8).filter(|w| w == b"LNRO0005").count(), 2);
        assert!(d.windows(4).any(|w| w == b"VR01"));
        // Memory32Fixed: descriptor 0x86, length 9, read-write, base, length.
        let mut window = vec![0x86, 9, 0, 1];
        window.extend_from_slice(&(MmioSlot::of(1).base as u32).to_le_bytes());
        window.extend_from_slice(&(MMIO_WINDOW as u32).to_le_bytes());
        assert!(d.windows(window.len()).any(|w| w == window));
        // Extended IRQ: consumer, edge, active high, exclusive; one interrupt, 17.
        let irq = [0x89, 6, 0, 0b0011, 1, 17, 0, 0, 0];
        assert!(d.windows(irq.len()).any(|w| w == irq));
    }

    #[test]
    fn madt_lists_every_cpu_and_the_ioapic() {
        let m = madt(3);
        // header 36 + lapic addr 4 + flags 4, then 3 x 8-byte LAPIC + 12-byte IOAPIC
        assert_eq!(m.len(), 44 + 3 * 8 + 12);
        assert_eq!(m[44], 0); // type: processor local APIC
        assert_eq!(m[44 + 3 * 8], 1); // type: IOAPIC
    }

    #[test]
    fn fadt_points_at_dsdt_and_sleep_port() {
        let f = fadt(0xdead0);
        // X_DSDT at offset 140
        assert_eq!(u64::from_le_bytes(f[140..148].try_into().unwrap()), 0xdead0);
        // SLEEP_CONTROL_REG GAS at offset 244: space id 1 (I/O), address at +4
        assert_eq!(f[244], 1);
        assert_eq!(
            u64::from_le_bytes(f[248..256].try_into().unwrap()),
            u64::from(SLEEP_CONTROL_PORT)
        );
    }
}
