//! One VM: KVM objects, guest memory, devices and vCPU threads, pause and resume. The
//! VM core knows neither patches nor the control socket (what it answers, `status` or a
//! pause's cost, are [`crate::proto`]'s types): the [`crate::session`] builds on it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::acpi::{self, AcpiError};
use crate::arch::boot::{self, BootError, BootFiles};
use crate::arch::cpu::{self, CpuError};
use crate::arch::layout::{LayoutError, MemoryLayout};
use crate::devices::virtio::block::{Block, Disk, DiskError, DiskSpec};
use crate::devices::virtio::iothread::{DeviceQueues, IoThread};
use crate::devices::virtio::mmio::{Interrupt, MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::net::{Net, NetError, NetSpec, Tap};
use crate::devices::virtio::{MmioSlot, VirtioDevice, MAX_DEVICES};
use crate::devices::{Devices, SERIAL_IRQ};
use crate::hostcheck::{self, HostCheckError};
use crate::proto::{
    PauseCost, PauseResult, ReadPhysResult, RegsResult, ResumeResult, RunState, StatusInfo,
    VmcoreinfoResult, MAX_READ_PHYS,
};
use crate::vstate::host_memory::{self, HostMapping, HostMemoryError};
use crate::vstate::paused::{PausedVm, RamView};
use crate::vstate::reset::{PlatformBootState, ResetError, VcpuBootState};
use crate::vstate::vcpu::{VcpuError, Vcpus};
use introspection::vmcoreinfo::VmcoreInfoError;
use introspection::{GuestError, GuestRam, PhysRange, VcpuState};

/// How long a pause may take before it is abandoned and the VM resumed.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Building a VM, or a request on a running one. The platform's own errors (boot, layout,
/// host, ACPI, CPU, vCPU threads) pass through with their words; the KVM ioctls of the VM
/// itself are named here.
#[derive(Debug, Error)]
pub enum VmError {
    #[error("--vcpus must be between 1 and 32 (got {0})")]
    VcpuCount(u8),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    HostCheck(#[from] HostCheckError),
    #[error("KVM_CREATE_VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_IDENTITY_MAP_ADDR")]
    SetIdentityMapAddress(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP")]
    CreateIrqChip(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2")]
    CreatePit(#[source] kvm_ioctls::Error),
    #[error("KVM_SIGNAL_MSI")]
    SignalMsi(#[source] kvm_ioctls::Error),
    #[error("cannot allocate {mib} MiB of guest memory")]
    GuestMemory {
        mib: u64,
        #[source]
        source: HostMemoryError,
    },
    #[error("guest memory host address")]
    HostAddress(#[source] GuestMemoryError),
    #[error("KVM_SET_USER_MEMORY_REGION")]
    SetUserMemoryRegion(#[source] kvm_ioctls::Error),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error(transparent)]
    Cpu(#[from] CpuError),
    #[error("eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("KVM_IRQFD for the serial port")]
    SerialIrqfd(#[source] kvm_ioctls::Error),
    #[error("devices")]
    Devices(#[source] std::io::Error),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("KVM_IRQFD for virtio device {index}")]
    VirtioIrqfd {
        index: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_IOEVENTFD for virtio device {index}")]
    VirtioIoeventfd {
        index: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the I/O thread")]
    IoThread(#[source] std::io::Error),
    #[error(transparent)]
    Reset(#[from] ResetError),
    #[error("KVM_CREATE_VCPU {id}")]
    CreateVcpu {
        id: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("VM '{0}' is already paused")]
    AlreadyPaused(String),
    #[error("VM '{0}' is not paused")]
    NotPaused(String),
    #[error("VM '{0}' must be paused to read its memory")]
    ReadWhileRunning(String),
    #[error("read_phys: at most {max} bytes per request (asked {0})", max = MAX_READ_PHYS)]
    ReadTooLong(u32),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error(transparent)]
    Vmcoreinfo(#[from] VmcoreInfoError),
}

#[derive(Clone, Debug)]
pub struct VmConfig {
    pub name: String,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory: u64,
    pub vcpus: u8,
    pub patch_area: u64,
    /// Each thread runs under its seccomp filter (`--no-seccomp` turns them off).
    pub seccomp: bool,
    /// The patch engine checks each early trace it confirms against a fresh unwind
    /// (`--verify-early-checks`).
    pub verify_early_checks: bool,
    /// `--disk`: virtio-blk devices, in order (the guest's vda, vdb, ...).
    pub disks: Vec<DiskSpec>,
    /// `--net`: virtio-net devices on existing taps, in order (eth0, ...).
    pub nets: Vec<NetSpec>,
    /// A guest reboot restarts the guest in this VM (`--no-reboot` ends the VM instead).
    pub reboot: bool,
}

pub struct Vm {
    pub config: VmConfig,
    started: Instant,
    /// When [`Vm::create`] began (the start-up measure of a program that did not mark its
    /// own start).
    created: Instant,
    layout: MemoryLayout,
    mem: GuestMemoryMmap,
    vcpus: Vcpus,
    pub devices: Arc<Devices>,
    /// Serves the virtio devices' queues (none without devices).
    io: Option<IoThread>,
    /// Kernel and initrd, for each boot.
    boot_files: BootFiles,
    /// The interrupt controllers before the first boot (a reboot puts them back).
    platform_boot: PlatformBootState,
    /// Reboots so far: this is the guest's boot number `boots` (0: the first).
    boots: u64,
    /// Registers from the current pause; `Some` exactly while paused.
    paused_states: Option<Vec<VcpuState>>,
    pauses: u64,
    last_pause: Option<Duration>,
    // Dropped last: vCPU threads and memory slots belong to these.
    vm_fd: VmFd,
    _kvm: Kvm,
    /// The host memory under `mem` and the memory slots: unmapped after both are gone.
    _host_memory: Vec<HostMapping>,
}

/// Host memory for every region of the layout (RAM and patch area), 2 MiB-aligned
/// ([`crate::vstate::host_memory`]), with the mappings under it, which must be dropped last.
pub fn guest_memory(layout: &MemoryLayout) -> Result<(GuestMemoryMmap, Vec<HostMapping>), VmError> {
    let ranges: Vec<(GuestAddress, usize)> = layout
        .regions()
        .iter()
        .map(|r| (GuestAddress(r.start), r.size as usize))
        .collect();
    let (mem, mappings) =
        host_memory::guest_memory(&ranges).map_err(|source| VmError::GuestMemory {
            mib: layout.regions().iter().map(|r| r.size).sum::<u64>() >> 20,
            source,
        })?;
    for r in mem.iter() {
        advise_huge_pages(r.as_ptr(), r.len() as usize);
    }
    Ok((mem, mappings))
}

/// Ask the host kernel to back guest memory with transparent huge pages where it can
/// (`MADV_HUGEPAGE`; with THP set to `madvise`, Debian's default, nothing else does), as
/// QEMU does for guest RAM. KVM then maps the guest with 2 MiB pages: fewer nested page
/// faults and smaller host page tables. A host without THP refuses, and the guest runs on
/// 4 KiB pages as before.
fn advise_huge_pages(addr: *mut u8, len: usize) {
    // SAFETY: `addr..addr + len` is one whole mapping of guest memory that this process
    // made and keeps; MADV_HUGEPAGE changes how the kernel backs it, never its contents.
    let rc = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        tracing::debug!(
            "madvise(MADV_HUGEPAGE) on guest memory: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Vm {
    /// Build the VM and start its vCPUs. Every check on user input happens before the
    /// first vCPU runs; an error leaves nothing behind.
    pub fn create(config: VmConfig, drained: EventFd) -> Result<Vm, VmError> {
        let created = Instant::now();
        if config.vcpus == 0 || config.vcpus > 32 {
            return Err(VmError::VcpuCount(config.vcpus));
        }
        let mut boot_files = BootFiles::open(&config.kernel, config.initrd.as_deref())?;
        let layout = MemoryLayout::new(config.memory, config.patch_area)?;
        let disks = open_disks(&config.disks)?;
        let taps = open_taps(&config.nets, disks.len())?;
        let models = virtio_models(disks, taps);

        let kvm = hostcheck::open_kvm()?;
        let vm_fd = create_vm_fd(&kvm)?;
        let (mem, host_memory) = guest_memory(&layout)?;
        register_memory(&vm_fd, &mem)?;

        let boot = write_boot(&mem, &layout, &mut boot_files, &config, models.len())?;

        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        vm_fd
            .register_irqfd(&irq, SERIAL_IRQ)
            .map_err(VmError::SerialIrqfd)?;
        let queues = virtio_devices(&vm_fd, &mem, models)?;
        let transports = queues.iter().map(|d| d.transport.clone()).collect();
        let devices = Arc::new(Devices::new(irq, drained, transports).map_err(VmError::Devices)?);
        let io = match queues.is_empty() {
            true => None,
            false => Some(IoThread::start(queues, config.seccomp).map_err(VmError::IoThread)?),
        };

        devices.set_restart(config.reboot);

        let fds = create_vcpu_fds(&kvm, &vm_fd, config.vcpus, boot.entry)?;
        let boot_states = fds
            .iter()
            .enumerate()
            .map(|(i, fd)| VcpuBootState::capture(&kvm, fd, i))
            .collect::<Result<Vec<_>, _>>()?;
        let platform_boot = PlatformBootState::capture(&vm_fd)?;
        let vcpus = Vcpus::start(fds, boot_states, devices.clone(), config.seccomp)?;

        Ok(Vm {
            config,
            started: Instant::now(),
            created,
            layout,
            mem,
            vcpus,
            devices,
            io,
            boot_files,
            platform_boot,
            boots: 0,
            paused_states: None,
            pauses: 0,
            last_pause: None,
            vm_fd,
            _kvm: kvm,
            _host_memory: host_memory,
        })
    }

    pub fn status(&self) -> StatusInfo {
        StatusInfo {
            name: self.config.name.clone(),
            pid: std::process::id(),
            state: if self.paused_states.is_some() {
                RunState::Paused
            } else {
                RunState::Running
            },
            vcpus: self.vcpus.count(),
            memory_bytes: self.config.memory,
            kernel: self.config.kernel.display().to_string(),
            initrd: self.config.initrd.as_ref().map(|p| p.display().to_string()),
            cmdline: self.config.cmdline.clone(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            patch_area_start: self.layout.patch_area.start,
            patch_area_size: self.layout.patch_area.size,
            pauses: self.pauses,
            last_pause_ns: self.last_pause.map(|d| d.as_nanos() as u64),
            start_to_first_run_us: self.start_to_first_run().map(|d| d.as_micros() as u64),
            devices: self.devices.describe_virtio(),
        }
    }

    /// How long the VMM took from its start to the first `KVM_RUN` (see [`StatusInfo`]).
    pub fn start_to_first_run(&self) -> Option<Duration> {
        let start = crate::process_start().unwrap_or(self.created);
        self.vcpus.first_run()?.checked_duration_since(start)
    }

    pub fn is_paused(&self) -> bool {
        self.paused_states.is_some()
    }

    pub fn pause(&mut self) -> Result<PauseResult, VmError> {
        if self.paused_states.is_some() {
            return Err(VmError::AlreadyPaused(self.config.name.clone()));
        }
        let paused = self.vcpus.pause(PAUSE_TIMEOUT)?;
        self.pauses += 1;
        self.last_pause = Some(paused.latency);
        self.paused_states = Some(paused.states.clone());
        Ok(PauseResult {
            parked_ns: paused.latency.as_nanos() as u64,
            vcpus: paused.states,
        })
    }

    pub fn resume(&mut self) -> Result<ResumeResult, VmError> {
        if self.paused_states.is_none() {
            return Err(VmError::NotPaused(self.config.name.clone()));
        }
        let took = self.vcpus.resume(PAUSE_TIMEOUT)?;
        self.paused_states = None;
        Ok(ResumeResult {
            resumed_ns: took.as_nanos() as u64,
        })
    }

    /// Registers of every vCPU; a running VM is paused only for the read.
    pub fn regs(&mut self) -> Result<RegsResult, VmError> {
        let (vcpus, pause) = self.paused(|g| g.states().to_vec())?;
        Ok(RegsResult { pause, vcpus })
    }

    /// Run `f` on the paused guest, to read it. A running VM is paused just for it and
    /// resumed after, even when `f` fails; the cost says whether that pause was needed
    /// and how long the guest saw it (pause request to the end of the resume).
    pub fn paused<R>(&mut self, f: impl FnOnce(&PausedVm) -> R) -> Result<(R, PauseCost), VmError> {
        self.paused_for_write(|g| f(g))
    }

    /// [`Vm::paused`] for the one caller that writes: the patcher, through the
    /// patching glue.
    pub fn paused_for_write<R>(
        &mut self,
        f: impl FnOnce(&mut PausedVm) -> R,
    ) -> Result<(R, PauseCost), VmError> {
        let t0 = Instant::now();
        let was_paused = self.is_paused();
        if !was_paused {
            self.pause()?;
        }
        let states = self
            .paused_states
            .clone()
            .ok_or_else(|| VmError::NotPaused(self.config.name.clone()))?;
        let out = f(&mut PausedVm::new(&self.mem, &self.layout, states));
        if !was_paused {
            self.resume()?;
        }
        Ok((
            out,
            PauseCost {
                paused_for_read: !was_paused,
                paused_us: if was_paused {
                    0
                } else {
                    t0.elapsed().as_micros() as u64
                },
            },
        ))
    }

    /// Guest-physical memory of a VM the user paused (never pauses by itself: what a
    /// person reads this way must not change under them between two reads).
    pub fn read_phys(&mut self, addr: u64, len: u32) -> Result<ReadPhysResult, VmError> {
        if !self.is_paused() {
            return Err(VmError::ReadWhileRunning(self.config.name.clone()));
        }
        if len > MAX_READ_PHYS {
            return Err(VmError::ReadTooLong(len));
        }
        let mut buf = vec![0u8; len as usize];
        self.paused(|g| g.read_phys(addr, &mut buf))?.0?;
        let hex = buf.iter().map(|b| format!("{b:02x}")).collect();
        Ok(ReadPhysResult { addr, hex })
    }

    /// Run `f` on guest RAM without pausing the guest (a paused one stays paused). Only
    /// for what the guest kernel never changes once booted ([`GuestRam`]), or for reads
    /// whose results a later pause confirms before anything relies on them (the patch
    /// engine's early checks); everything else is read through [`Vm::paused`].
    /// Make the host memory under these guest-physical ranges resident and writable
    /// now (`MADV_POPULATE_WRITE`), without changing a byte: for lpvmm's own patch area
    /// before a pause that will write it, so that the pause does not wait on the host
    /// kernel to fault pages in (a 2 MiB huge page zeroed on first touch, under THP).
    /// Only ranges inside the patch area; best effort (older hosts refuse the advice,
    /// and the pause then faults the pages in as before).
    /// Send `vector` to the guest CPU whose local APIC is `apic_id`, as an MSI would
    /// (fixed delivery, physical destination): how the patcher's guest calls reach a
    /// guest CPU (patcher::guestcall).
    pub fn signal_msi(&self, apic_id: u32, vector: u8) -> Result<(), VmError> {
        let msi = kvm_bindings::kvm_msi {
            address_lo: 0xfee0_0000 | ((apic_id & 0xff) << 12),
            address_hi: 0,
            data: u32::from(vector),
            ..Default::default()
        };
        self.vm_fd
            .signal_msi(msi)
            .map(|_| ())
            .map_err(VmError::SignalMsi)
    }

    pub fn make_resident(&self, ranges: &[PhysRange]) {
        let area = self.layout.patch_area;
        for r in ranges {
            let inside = r.start >= area.start
                && r.start.checked_add(r.size).is_some_and(|e| e <= area.end());
            if !inside || r.size == 0 {
                continue;
            }
            let Ok(host) = self.mem.get_host_address(GuestAddress(r.start)) else {
                continue;
            };
            // Whole 4 KiB pages around the range.
            let start = (host as usize) & !0xfff;
            let end = (host as usize + r.size as usize + 0xfff) & !0xfff;
            // SAFETY: `start..end` lies inside the patch area's host mapping, which this
            // VM owns; MADV_POPULATE_WRITE faults its pages in and never changes
            // their contents.
            let rc = unsafe {
                libc::madvise(
                    start as *mut libc::c_void,
                    end - start,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if rc != 0 {
                tracing::debug!(
                    "madvise(MADV_POPULATE_WRITE) on the patch area: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }

    pub fn running_ram<R>(&self, f: impl FnOnce(&RamView) -> R) -> R {
        f(&RamView::new(&self.mem, &self.layout))
    }

    /// Find the guest's VMCOREINFO. The kernel writes it once while booting, so the
    /// scan needs no pause.
    pub fn vmcoreinfo(&self) -> Result<VmcoreinfoResult, VmError> {
        let (phys_addr, info) = self.running_ram(|r| introspection::vmcoreinfo::find(r))?;
        Ok(VmcoreinfoResult { phys_addr, info })
    }

    /// Stop the vCPU threads (a paused VM too).
    /// How many times the guest has rebooted in this VM.
    pub fn boots(&self) -> u64 {
        self.boots
    }

    /// The guest asked for a reboot: start it again in this VM, as a machine's reset
    /// does. Every vCPU and the interrupt controllers go back to their boot state
    /// (vstate/reset.rs), guest RAM and the patch area are zeroed (the new kernel must
    /// not meet the old one's data, nor lpvmm the old kernel's VMCOREINFO), the kernel,
    /// initrd, boot parameters and ACPI tables are written again, the devices are reset;
    /// disks, console, name and socket stay.
    pub fn reboot(&mut self) -> Result<(), VmError> {
        if self.paused_states.is_none() {
            self.pause()?;
        }
        self.zero_memory();
        let disks = self.devices.virtio.len();
        write_boot(
            &self.mem,
            &self.layout,
            &mut self.boot_files,
            &self.config,
            disks,
        )?;
        self.devices.reset_for_reboot();
        self.platform_boot.restore(&self.vm_fd)?;
        self.vcpus.reset_on_resume();
        self.resume()?;
        self.boots += 1;
        self.started = Instant::now();
        Ok(())
    }

    /// Every region of guest memory reads zero again and its host memory is freed
    /// (`MADV_DONTNEED` on private anonymous memory).
    fn zero_memory(&self) {
        for r in self.mem.iter() {
            // SAFETY: `r` is one whole mapping of guest memory this process made and
            // keeps; the vCPUs are parked, and MADV_DONTNEED only zero-fills it.
            let rc =
                unsafe { libc::madvise(r.as_ptr().cast(), r.len() as usize, libc::MADV_DONTNEED) };
            if rc != 0 {
                // Not fatal: the new boot overwrites what it uses.
                tracing::warn!("zeroing guest memory: {}", std::io::Error::last_os_error());
            }
        }
    }

    pub fn shutdown(&mut self) {
        self.vcpus.stop();
        if let Some(io) = &mut self.io {
            io.stop();
        }
    }
}

/// What the guest finds at each boot: ACPI tables (with the virtio slots), the kernel,
/// its initrd, command line and zero page, and the boot page tables.
fn write_boot(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    files: &mut BootFiles,
    config: &VmConfig,
    virtio_devices: usize,
) -> Result<boot::BootInfo, VmError> {
    let slots: Vec<MmioSlot> = (0..virtio_devices).map(MmioSlot::of).collect();
    let rsdp = acpi::write_tables(mem, config.vcpus, &slots)?;
    let boot = boot::load_linux(mem, layout, files, &config.cmdline, rsdp)?;
    cpu::write_boot_page_tables(mem)?;
    Ok(boot)
}

/// Open every `--disk` before anything else is made: a disk lpvmm cannot use is the
/// user's error, reported before KVM is touched.
fn open_disks(specs: &[DiskSpec]) -> Result<Vec<Disk>, VmError> {
    if specs.len() > MAX_DEVICES {
        return Err(DiskError::TooMany(MAX_DEVICES).into());
    }
    Ok(specs.iter().map(Disk::open).collect::<Result<_, _>>()?)
}

/// Attach to every `--net` tap, as early (the disks and taps share the device slots).
fn open_taps(specs: &[NetSpec], disks: usize) -> Result<Vec<Tap>, VmError> {
    if disks + specs.len() > MAX_DEVICES {
        return Err(NetError::TooMany(MAX_DEVICES - disks).into());
    }
    Ok(specs.iter().map(Tap::open).collect::<Result<_, _>>()?)
}

/// The guest's virtio devices: each disk as virtio-blk (vda, vdb, ...), then each tap
/// as virtio-net (eth0, ...), in that order of slots.
fn virtio_models(disks: Vec<Disk>, taps: Vec<Tap>) -> Vec<Box<dyn VirtioDevice>> {
    let disks = disks.into_iter().enumerate().map(|(i, d)| {
        let name = format!("vd{}", (b'a' + i as u8) as char);
        Box::new(Block::new(d, name)) as Box<dyn VirtioDevice>
    });
    let nets = taps
        .into_iter()
        .enumerate()
        .map(|(i, t)| Box::new(Net::new(t, format!("eth{i}"))) as Box<dyn VirtioDevice>);
    disks.chain(nets).collect()
}

/// Each device on virtio-mmio: its interrupt through an irqfd, each queue's
/// notifications through an ioeventfd on QueueNotify (matched on the queue's index),
/// for the I/O thread.
fn virtio_devices(
    vm_fd: &VmFd,
    mem: &GuestMemoryMmap,
    models: Vec<Box<dyn VirtioDevice>>,
) -> Result<Vec<DeviceQueues>, VmError> {
    let mut out = Vec::new();
    for (index, model) in models.into_iter().enumerate() {
        let slot = MmioSlot::of(index);
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        vm_fd
            .register_irqfd(&irq, slot.irq)
            .map_err(|source| VmError::VirtioIrqfd { index, source })?;
        let address = kvm_ioctls::IoEventAddress::Mmio(slot.base + REG_QUEUE_NOTIFY);
        let mut events = Vec::new();
        for queue in 0..model.queue_max_sizes().len() {
            let notify = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
            vm_fd
                .register_ioevent(&notify, &address, queue as u32)
                .map_err(|source| VmError::VirtioIoeventfd { index, source })?;
            events.push(notify);
        }
        let clones = events
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<_, _>>()
            .map_err(VmError::EventFd)?;
        let transport = MmioTransport::new(
            model,
            slot,
            mem.clone(),
            clones,
            Arc::new(Interrupt::new(irq)),
        );
        out.push(DeviceQueues {
            backend: transport.backend_fds(),
            transport: Arc::new(std::sync::Mutex::new(transport)),
            events,
        });
    }
    Ok(out)
}

/// The VM file descriptor with the x86 platform pieces KVM keeps in the kernel: the TSS
/// and identity-map pages, the interrupt controllers and the PIT.
fn create_vm_fd(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm_fd = kvm.create_vm().map_err(VmError::CreateVm)?;
    vm_fd
        .set_tss_address(TSS_ADDR)
        .map_err(VmError::SetTssAddress)?;
    vm_fd
        .set_identity_map_address(IDENTITY_MAP_ADDR)
        .map_err(VmError::SetIdentityMapAddress)?;
    vm_fd.create_irq_chip().map_err(VmError::CreateIrqChip)?;
    vm_fd
        .create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(VmError::CreatePit)?;
    Ok(vm_fd)
}

/// Give every region of guest memory to KVM, one slot each.
fn register_memory(vm_fd: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(VmError::HostAddress)?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the mapping belongs to `mem`, which the Vm keeps alive longer than
        // the VM file descriptor uses it.
        unsafe { vm_fd.set_user_memory_region(r) }.map_err(VmError::SetUserMemoryRegion)?;
    }
    Ok(())
}

/// The vCPUs, each with its CPUID and LINT pins; the first set up to enter the kernel.
fn create_vcpu_fds(kvm: &Kvm, vm_fd: &VmFd, count: u8, entry: u64) -> Result<Vec<VcpuFd>, VmError> {
    let base_cpuid = cpu::base_cpuid(kvm)?;
    let mut fds = Vec::new();
    for id in 0..count {
        let fd = vm_fd
            .create_vcpu(u64::from(id))
            .map_err(|source| VmError::CreateVcpu { id, source })?;
        cpu::set_cpuid(&fd, &base_cpuid, id, count)?;
        cpu::set_lint(&fd)?;
        if id == 0 {
            cpu::setup_boot_vcpu(&fd, entry)?;
        }
        fds.push(fd);
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error and every source, joined as anyhow's `{:#}` joins them: with nothing left
    /// out (unlike `lpvmm::error_line`), so that a cause a layer also says shows twice.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut text = e.to_string();
        let mut next = e.source();
        while let Some(cause) = next {
            text = format!("{text}: {cause}");
            next = cause.source();
        }
        text
    }

    /// Each layer says its part once: a cause is a source, never also in the message.
    #[test]
    fn errors_chain_their_causes_once() {
        let e = VmError::GuestMemory {
            mib: 64,
            source: HostMemoryError::Map {
                size: 64 << 20,
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            },
        };
        assert_eq!(
            chain(&e),
            "cannot allocate 64 MiB of guest memory: cannot map 64 MiB of host memory for the \
             guest: Cannot allocate memory (os error 12)"
        );
        let e = VmError::from(crate::vstate::vcpu::VcpuError::AlreadyPaused);
        assert_eq!(chain(&e), "the VM is already paused");
        let e = VmError::CreateVcpu {
            id: 3,
            source: kvm_ioctls::Error::new(libc::EINVAL),
        };
        assert_eq!(
            chain(&e),
            "KVM_CREATE_VCPU 3: Invalid argument (os error 22)"
        );
    }

    /// The mapping of each region of guest memory carries the huge-page advice (`hg` in
    /// its smaps VmFlags), where the host kernel has THP at all.
    #[test]
    fn guest_memory_is_advised_to_use_huge_pages() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
            eprintln!("no THP on this host: nothing to check");
            return;
        }
        let layout = MemoryLayout::new(64 << 20, 2 << 20).unwrap();
        let (mem, _host) = guest_memory(&layout).unwrap();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        for r in mem.iter() {
            let start = format!("{:x}-", r.as_ptr() as usize);
            // A mapping's block of smaps ends with its VmFlags line.
            let block = smaps
                .lines()
                .skip_while(|l| !l.starts_with(&start))
                .find(|l| l.starts_with("VmFlags:"))
                .unwrap_or_else(|| panic!("no mapping at {start} in smaps"));
            assert!(
                block.split_whitespace().any(|f| f == "hg"),
                "region at {start}: {block}"
            );
        }
    }
}
