//! virtio devices for real guests: disks (`--disk`) and network interfaces (`--net`)
//! the guest's own `virtio_blk` and `virtio_net` drive, over virtio-mmio (virtio 1.x,
//! MMIO version 2).
//!
//! Why virtio-mmio described in ACPI: Debian's cloud kernels build `virtio_mmio` as a
//! module without `VIRTIO_MMIO_CMDLINE_DEVICES`, so `virtio_mmio.device=` on the command
//! line does nothing; the driver finds its devices as ACPI `LNRO0005` objects, which
//! arch/acpi.rs writes into the DSDT (one per device, with its window and interrupt).
//! No PCI bus, BARs or MSI-X tables to emulate.
//!
//! Split of work: a vCPU thread handles the register accesses of a device's window
//! (mmio.rs, set-up and interrupt acknowledgement, rare); the guest's queue
//! notifications never reach a vCPU thread: KVM signals an ioeventfd, and the I/O thread
//! (iothread.rs, its own seccomp filter) pops the requests, does the disk I/O and raises
//! the interrupt through an irqfd. The device model proper (block.rs) sees only guest
//! memory and its queue.
//!
//! Everything the guest controls (descriptor chains, ring indexes, feature bits,
//! register values) is hostile input: bounded, checked, and a device that meets a
//! malformed chain or ring is marked broken (`DEVICE_NEEDS_RESET`) and serves nothing
//! more until the driver resets it; the VMM and the other devices carry on.

pub mod block;
pub mod iothread;
pub mod mmio;
pub mod net;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// Guest-physical base of the first device's register window; each device has
/// [`MMIO_WINDOW`] bytes, one after the other, below the interrupt controllers (the
/// patch area ends before this, arch/layout.rs).
pub const MMIO_BASE: u64 = 0xfe00_0000;
pub const MMIO_WINDOW: u64 = 0x1000;
/// The IOAPIC pin of the first device; the next ones follow. GSIs from 16 are the
/// IOAPIC's alone (no legacy ISA device, no PIC routing).
pub const IRQ_BASE: u32 = 16;
/// Devices a VM can have (IOAPIC pins 16..24).
pub const MAX_DEVICES: usize = 8;

/// Where device `index` sits: its register window and interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub irq: u32,
}

impl MmioSlot {
    pub fn of(index: usize) -> MmioSlot {
        MmioSlot {
            base: MMIO_BASE + index as u64 * MMIO_WINDOW,
            irq: IRQ_BASE + index as u32,
        }
    }

    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < MMIO_WINDOW
    }
}

/// Why a device stopped serving: the guest gave it something no correct driver gives.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DeviceError {
    #[error("a queue is not usable: {0}")]
    Ring(String),
    #[error("a descriptor chain is malformed: {0}")]
    Chain(String),
    #[error("its backend failed: {0}")]
    Backend(String),
}

/// What a device model provides to the transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2: block).
    fn device_type(&self) -> u32;
    /// Every feature bit the device offers.
    fn features(&self) -> u64;
    /// How many queues, and the most descriptors each may have.
    fn queue_max_sizes(&self) -> &[u16];
    /// The device-specific configuration space.
    fn config(&self) -> &[u8];
    /// Serve what the driver made available on queue `index` (of `queues`, every queue
    /// of the device). `Ok(true)`: used buffers were added (the driver must be
    /// interrupted).
    fn process(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError>;
    /// Descriptors besides the queues' notifications that the I/O thread watches for
    /// this device (a tap's), edge-triggered.
    fn backend_fds(&self) -> Vec<std::os::unix::io::RawFd> {
        Vec::new()
    }
    /// One of [`VirtioDevice::backend_fds`] is ready. As `process`.
    fn backend_ready(
        &mut self,
        _queues: &mut [Queue],
        _mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        Ok(false)
    }
    /// A line for `lpvmm status`.
    fn describe(&self) -> String;
}
