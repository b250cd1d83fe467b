//! The guest's legacy devices on port I/O, and how the guest asks the VM to end.
//!
//! Devices: the 16550 serial port at 0x3f8 (IRQ 4), the i8042's reset line (0x64,
//! command 0xfe: `reboot=k`), the ACPI sleep control register (poweroff), and a PCI
//! config space with only a host bridge (see pci.rs), and the doorbell of lpvmm's
//! module notifier (see doorbell.rs; its port is handled on the vCPU thread, which
//! needs the registers). Everything
//! else on the port bus reads as all-ones, as an empty ISA bus would. On the MMIO bus:
//! the virtio devices' register windows (see virtio/), and nothing else (all-ones).

pub mod console;
pub mod doorbell;
pub mod pci;
pub mod virtio;

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use pci::PciConfig;

pub const SERIAL_PORT_BASE: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
/// I/O port of the hardware-reduced sleep control register (as cloud-hypervisor uses), which the
/// FADT names (arch/acpi.rs).
pub const SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// Bits the guest writes to the sleep control register: SLP_EN and the sleep type.
pub const SLEEP_ENABLE: u8 = 1 << 5;
pub const SLEEP_TYPE_SHIFT: u8 = 2;
pub const SLEEP_TYPE_MASK: u8 = 0x7 << SLEEP_TYPE_SHIFT;
/// The sleep type we advertise for S5 in the DSDT's `_S5_` package.
pub const S5_SLEEP_TYPE: u8 = 5;
const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_RESET_CMD: u8 = 0xfe;
/// Port 0x80 is the POST/delay port the kernel writes to for I/O delays.
const POST_PORT: u16 = 0x80;

/// Why the VM ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest powered off (ACPI S5).
    Poweroff,
    /// The guest rebooted (how: keyboard controller, KVM reset event). The VM starts it
    /// again, unless `lpvmm run --no-reboot`, where the VM ends here.
    Reboot(String),
    /// A vCPU triple-faulted (where, as far as KVM still knows it): the guest crashed,
    /// unless it was told to reboot that way (`reboot=t`, which lpvmm's default command
    /// line does not use). A crash, so not a success of `lpvmm run`.
    TripleFault(String),
    /// The guest kernel panicked (its panic line was seen on the console before reset).
    Panic(String),
    /// Stopped through the control socket or a signal.
    Requested(String),
    /// The VMM or KVM failed.
    Fatal(String),
}

impl StopReason {
    /// Whether the guest died (crashed or panicked), rather than ended or was ended.
    pub fn guest_died(&self) -> bool {
        matches!(self, StopReason::Panic(_) | StopReason::TripleFault(_))
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::Poweroff | StopReason::Reboot(_) | StopReason::Requested(_) => 0,
            StopReason::Panic(_) => 2,
            StopReason::TripleFault(_) => 3,
            StopReason::Fatal(_) => 1,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            StopReason::Poweroff => "guest powered off".into(),
            StopReason::Reboot(how) => format!("guest requested a reboot ({how})"),
            StopReason::Panic(msg) => format!("guest kernel panic: {msg}"),
            StopReason::TripleFault(at) => format!("guest crashed ({at}): lpvmm ends the VM"),
            StopReason::Requested(why) => format!("VM stopped: {why}"),
            StopReason::Fatal(msg) => format!("VM failed: {msg}"),
        }
    }
}

/// Raises the serial IRQ through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the console loop that the guest drained the serial input FIFO.
pub struct InputDrained(pub EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

const PANIC_MARKER: &str = "Kernel panic - not syncing: ";
/// How an oops or warning names where the CPU was (kernel code segment 0x10).
const RIP_MARKER: &str = "RIP: 0010:";
const LINE_MAX: usize = 512;
/// How a panic's report introduces where the guest's last oops was (the test harness
/// reads it as where the guest died).
pub const LAST_OOPS_AT: &str = "the guest's last oops was at";

/// Console output: passes bytes to stdout and remembers a kernel panic line, with the
/// last oops's `RIP:` line before it (where the guest was when it died: evidence of
/// whose the death is, docs/testing.md).
pub struct ConsoleOut {
    line: Vec<u8>,
    last_rip: Option<String>,
    panic: Arc<Mutex<Option<String>>>,
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.line);
                if let Some(pos) = line.find(RIP_MARKER) {
                    self.last_rip = Some(line[pos..].trim().to_string());
                }
                if let Some(pos) = line.find(PANIC_MARKER) {
                    let mut msg = line[pos + PANIC_MARKER.len()..].trim().to_string();
                    if let Some(rip) = &self.last_rip {
                        msg = format!("{msg}; {LAST_OOPS_AT} {rip}");
                    }
                    *self.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg);
                }
                self.line.clear();
            } else if self.line.len() < LINE_MAX {
                self.line.push(b);
            }
        }
        let mut out = io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

pub type GuestSerial = Serial<IrqTrigger, InputDrained, ConsoleOut>;

/// Devices plus the VM's stop request, shared by all vCPU threads and the main loop.
pub struct Devices {
    pub serial: Mutex<GuestSerial>,
    pci: Mutex<PciConfig>,
    panic: Arc<Mutex<Option<String>>>,
    stop: Mutex<Option<StopReason>>,
    /// Written when a stop is requested, to wake the main loop.
    pub stop_evt: EventFd,
    pub doorbell: doorbell::Doorbell,
    /// The virtio devices, each in its MMIO window.
    pub virtio: Vec<Arc<Mutex<virtio::mmio::MmioTransport>>>,
    /// A guest reboot restarts the guest in this VM (`lpvmm run` without `--no-reboot`).
    restart: std::sync::atomic::AtomicBool,
}

impl Devices {
    pub fn new(
        irq: EventFd,
        drained: EventFd,
        virtio: Vec<Arc<Mutex<virtio::mmio::MmioTransport>>>,
    ) -> io::Result<Self> {
        let panic = Arc::new(Mutex::new(None));
        let out = ConsoleOut {
            line: Vec::new(),
            last_rip: None,
            panic: panic.clone(),
        };
        Ok(Devices {
            serial: Mutex::new(Serial::with_events(
                IrqTrigger(irq),
                InputDrained(drained),
                out,
            )),
            pci: Mutex::new(PciConfig::default()),
            panic,
            stop: Mutex::new(None),
            stop_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            doorbell: doorbell::Doorbell::new(),
            virtio,
            restart: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Record why the VM ends (the first reason wins) and wake the main loop.
    pub fn request_stop(&self, reason: StopReason) {
        let mut stop = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        if stop.is_none() {
            *stop = Some(reason);
        }
        let _ = self.stop_evt.write(1);
    }

    /// Whether a guest reboot restarts the guest instead of ending the VM.
    pub fn set_restart(&self, on: bool) {
        self.restart.store(on, std::sync::atomic::Ordering::Release);
    }

    /// Whether `reason` restarts the guest in this VM rather than ending it: a reboot
    /// the guest asked for (never a panic's or a crash's reset), unless `--no-reboot`.
    pub fn restarts(&self, reason: &StopReason) -> bool {
        matches!(reason, StopReason::Reboot(_))
            && self.restart.load(std::sync::atomic::Ordering::Acquire)
    }

    /// For the guest's next boot in this VM (vCPUs parked): no stop pending, no panic
    /// seen, every virtio device reset as at power-on, no module-notifier ring left.
    pub fn reset_for_reboot(&self) {
        *self.stop.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.panic.lock().unwrap_or_else(|e| e.into_inner()) = None;
        for t in &self.virtio {
            t.lock().unwrap_or_else(|e| e.into_inner()).reset();
        }
        drop(self.doorbell.take());
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A reset is a panic if the kernel printed its panic line first, else a reboot;
    /// `how` says what reset the guest.
    pub fn guest_reset(&self, how: &str) -> StopReason {
        self.panic_or(|| StopReason::Reboot(how.to_string()))
    }

    /// A triple fault is a panic's reset if the kernel printed its panic line first
    /// (`panic=N` with `reboot=t`), else a crash of its own; `at` says where.
    pub fn guest_triple_fault(&self, at: &str) -> StopReason {
        self.panic_or(|| StopReason::TripleFault(at.to_string()))
    }

    fn panic_or(&self, otherwise: impl FnOnce() -> StopReason) -> StopReason {
        match self.panic.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            Some(msg) => StopReason::Panic(msg),
            None => otherwise(),
        }
    }

    fn serial(&self) -> std::sync::MutexGuard<'_, GuestSerial> {
        self.serial.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pci(&self) -> std::sync::MutexGuard<'_, PciConfig> {
        self.pci.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The virtio device whose window holds `addr`, and the offset in it.
    fn virtio_at(&self, addr: u64) -> Option<(&Mutex<virtio::mmio::MmioTransport>, u64)> {
        let index = addr.checked_sub(virtio::MMIO_BASE)? / virtio::MMIO_WINDOW;
        let t = self.virtio.get(usize::try_from(index).ok()?)?;
        Some((t, addr - virtio::MmioSlot::of(index as usize).base))
    }

    /// A line per virtio device, for `lpvmm status`.
    pub fn describe_virtio(&self) -> Vec<String> {
        self.virtio
            .iter()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).describe())
            .collect()
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.virtio_at(addr) {
            Some((t, offset)) => t
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(offset, data),
            // Nothing is mapped there: reads see all-ones, like an empty bus.
            None => data.fill(0xff),
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((t, offset)) = self.virtio_at(addr) {
            t.lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(offset, data);
        }
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            // Only the config ports take the PCI lock: the serial port is the hot path.
            p if pci::PORTS.contains(&p) => {
                if !self.pci().read(port, data) {
                    data.fill(0xff);
                }
            }
            SERIAL_PORT_BASE..=0x3ff if data.len() == 1 => {
                data[0] = self.serial().read((port - SERIAL_PORT_BASE) as u8);
            }
            // i8042 status: "input buffer empty", so a keyboard-controller reset is
            // issued at once instead of after a long busy-wait.
            I8042_COMMAND_PORT => data.fill(0),
            SLEEP_CONTROL_PORT => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    /// Returns a stop reason when the write asks the VM to end.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<StopReason> {
        match port {
            p if pci::PORTS.contains(&p) => {
                self.pci().write(port, data);
                None
            }
            SERIAL_PORT_BASE..=0x3ff if data.len() == 1 => {
                if let Err(e) = self
                    .serial()
                    .write((port - SERIAL_PORT_BASE) as u8, data[0])
                {
                    tracing::debug!("serial write failed: {e:?}");
                }
                None
            }
            I8042_COMMAND_PORT if data.first() == Some(&I8042_RESET_CMD) => {
                Some(self.guest_reset("keyboard controller reset"))
            }
            SLEEP_CONTROL_PORT => {
                let v = data.first().copied().unwrap_or(0);
                let sleep_type = (v & SLEEP_TYPE_MASK) >> SLEEP_TYPE_SHIFT;
                (v & SLEEP_ENABLE != 0 && sleep_type == S5_SLEEP_TYPE)
                    .then_some(StopReason::Poweroff)
            }
            POST_PORT => None,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> Devices {
        Devices::new(
            EventFd::new(0).unwrap(),
            EventFd::new(0).unwrap(),
            Vec::new(),
        )
        .unwrap()
    }

    #[test]
    fn acpi_s5_write_is_poweroff_other_sleep_states_are_not() {
        let d = devices();
        let s5 = SLEEP_ENABLE | (S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT);
        assert_eq!(
            d.pio_write(SLEEP_CONTROL_PORT, &[s5]),
            Some(StopReason::Poweroff)
        );
        assert_eq!(d.pio_write(SLEEP_CONTROL_PORT, &[3 << 2 | 0x20]), None);
        assert_eq!(d.pio_write(SLEEP_CONTROL_PORT, &[5 << 2]), None);
    }

    #[test]
    fn reset_after_panic_line_is_a_panic() {
        let d = devices();
        assert_eq!(
            d.pio_write(0x64, &[0xfe]),
            Some(StopReason::Reboot("keyboard controller reset".into()))
        );
        d.serial()
            .writer_mut()
            .write_all(b"[ 1.0] Kernel panic - not syncing: VFS: oops\r\n")
            .unwrap();
        assert_eq!(
            d.pio_write(0x64, &[0xfe]),
            Some(StopReason::Panic("VFS: oops".into()))
        );
    }

    #[test]
    fn a_panic_says_where_the_last_oops_was() {
        let d = devices();
        d.serial()
            .writer_mut()
            .write_all(
                b"[ 1.0] RIP: 0010:memcpy+0x12/0x20\r\n[ 1.1] Code: 48 89\r\n\
                  [ 1.2] RIP: 0010:0xffffffff94208031\r\n[ 1.3] RSP: 0018:ffffc900\r\n\
                  [ 1.4] Kernel panic - not syncing: Fatal exception in interrupt\r\n",
            )
            .unwrap();
        let StopReason::Panic(msg) = d.guest_triple_fault("triple fault on vCPU 0") else {
            panic!("not a panic");
        };
        assert_eq!(
            msg,
            "Fatal exception in interrupt; the guest's last oops was at RIP: 0010:0xffffffff94208031"
        );
    }

    #[test]
    fn triple_fault_is_a_crash_unless_a_panic_came_first() {
        let d = devices();
        let crash = d.guest_triple_fault("triple fault on vCPU 1 at rip 0xfff0");
        assert_eq!(
            crash,
            StopReason::TripleFault("triple fault on vCPU 1 at rip 0xfff0".into())
        );
        assert_ne!(crash.exit_code(), 0);
        assert!(crash.describe().contains("triple fault on vCPU 1"));
        d.serial()
            .writer_mut()
            .write_all(b"[ 1.0] Kernel panic - not syncing: Fatal exception\r\n")
            .unwrap();
        assert_eq!(
            d.guest_triple_fault("triple fault on vCPU 0"),
            StopReason::Panic("Fatal exception".into())
        );
    }

    #[test]
    fn unknown_ports_read_all_ones() {
        let d = devices();
        let mut b = [0u8; 2];
        d.pio_read(0x1234, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }

    #[test]
    fn first_stop_reason_wins() {
        let d = devices();
        d.request_stop(StopReason::Poweroff);
        d.request_stop(StopReason::Fatal("later".into()));
        assert_eq!(d.stop_reason(), Some(StopReason::Poweroff));
    }
}
