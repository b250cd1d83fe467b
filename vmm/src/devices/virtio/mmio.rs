//! The virtio-mmio transport (virtio 1.x, §4.2, register layout version 2): a device's
//! register window, its status and feature negotiation, its queues' set-up and its
//! interrupt. Register accesses arrive on vCPU threads; queue notifications arrive on
//! the I/O thread as ioeventfd events ([`MmioTransport::notified`]).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceError, MmioSlot, VirtioDevice};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// "LPVM": the vendor ID a driver may print.
const VENDOR_ID: u32 = 0x4d56_504c;

// Register offsets (virtio 1.x §4.2.2).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// Where the driver writes a queue's index to notify the device.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

// Device status bits (virtio 1.x §2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 64;

/// Interrupt status bits: used buffers, configuration change.
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// VIRTIO_F_VERSION_1: the only way lpvmm's devices talk (no legacy layout).
pub const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_EVENT_IDX: each side says up to where it wants to hear from the other
/// (the driver's `used_event`, the device's `avail_event`), so that a stream of buffers
/// costs a few notifications and interrupts rather than one per buffer. Every nested
/// exit they save is expensive; the transport offers it for every device.
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
/// How many times one notification serves a queue again because the driver made more
/// buffers available meanwhile (a driver that keeps adding is served on its next
/// notification, which the `avail_event` written each round asks it for).
const MAX_ROUNDS: usize = 16;

/// A device's interrupt: the status the driver reads and acknowledges, and the irqfd
/// that raises its IOAPIC pin (edge-triggered, as the DSDT declares it).
pub struct Interrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl Interrupt {
    pub fn new(irq: EventFd) -> Interrupt {
        Interrupt {
            status: AtomicU32::new(0),
            irq,
        }
    }

    fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        if let Err(e) = self.irq.write(1) {
            tracing::warn!("virtio interrupt: {e}");
        }
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }
}

/// One virtio device and its transport state.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    slot: MmioSlot,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    /// Each queue's ioeventfd, for a notification that arrives as an MMIO exit.
    notify: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    /// Why the device serves nothing until reset.
    broken: Option<DeviceError>,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        slot: MmioSlot,
        mem: GuestMemoryMmap,
        notify: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> MmioTransport {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("a power of two no larger than 32768"))
            .collect();
        MmioTransport {
            device,
            slot,
            mem,
            queues,
            notify,
            interrupt,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            broken: None,
        }
    }

    pub fn slot(&self) -> MmioSlot {
        self.slot
    }

    /// For `lpvmm status`: the device, the driver's progress, and whether it broke.
    pub fn describe(&self) -> String {
        let state = match (&self.broken, self.status & STATUS_DRIVER_OK != 0) {
            (Some(e), _) => format!("broken: {e}"),
            (None, true) => "driver ready".to_string(),
            (None, false) => "no driver yet".to_string(),
        };
        format!(
            "{} at {:#x} irq {}: {state}",
            self.device.describe(),
            self.slot.base,
            self.slot.irq
        )
    }

    /// A read of `data.len()` bytes at `offset` in the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            let config = self.device.config();
            for (i, b) in data.iter_mut().enumerate() {
                let at = (offset - REG_CONFIG) as usize + i;
                *b = config.get(at).copied().unwrap_or(0);
            }
            return;
        }
        let value = if data.len() == 4 {
            self.register(offset)
        } else {
            0 // registers are 32-bit wide: other widths read as zero
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn register(&self, offset: u64) -> u32 {
        let features = self.offered_features();
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_select {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(self.queue_select as usize)
    }

    /// A write at `offset` in the window. Writes that are not 32 bits wide, to read-only
    /// registers or out of order (queue set-up after DRIVER_OK) are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            REG_DRIVER_FEATURES => self.set_driver_features(value),
            REG_QUEUE_SEL => self.queue_select = value,
            REG_QUEUE_NOTIFY => self.notify_by_exit(value),
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.set_status(value),
            _ => self.write_queue_register(offset, value),
        }
    }

    fn set_driver_features(&mut self, value: u32) {
        if self.status & STATUS_FEATURES_OK != 0 {
            return;
        }
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ => {}
        }
    }

    /// A notification that KVM did not turn into an ioeventfd event (another access
    /// width): hand it to the I/O thread the same way.
    fn notify_by_exit(&self, queue: u32) {
        if let Some(evt) = self.notify.get(queue as usize) {
            let _ = evt.write(1);
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value | (self.status & STATUS_NEEDS_RESET);
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.offered_features();
            let acceptable =
                self.driver_features & !offered == 0 && self.driver_features & F_VERSION_1 != 0;
            if !acceptable {
                value &= !STATUS_FEATURES_OK; // the driver reads it back and gives up
            }
        }
        if value & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0 {
            if value & STATUS_FEATURES_OK == 0 {
                return;
            }
            let event_idx = self.driver_features & F_RING_EVENT_IDX != 0;
            for q in &mut self.queues {
                q.set_event_idx(event_idx);
            }
            if let Some(i) = self
                .queues
                .iter()
                .position(|q| q.ready() && !q.is_valid(&self.mem))
            {
                self.status = value;
                self.mark_broken(DeviceError::Ring(format!(
                    "queue {i}'s rings are not in guest RAM or are misaligned"
                )));
                return;
            }
        }
        self.status = value;
    }

    /// The device as at power-on: what a driver's reset (status 0) and a guest reboot
    /// leave.
    pub fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.broken = None;
        self.interrupt.ack(u32::MAX);
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        let setting_up =
            self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        let index = self.queue_select as usize;
        let Some(q) = self.queues.get_mut(index).filter(|_| setting_up) else {
            return;
        };
        match offset {
            REG_QUEUE_NUM => {
                let size = u16::try_from(value).unwrap_or(0);
                if size.is_power_of_two() && size <= q.max_size() {
                    q.set_size(size);
                }
            }
            REG_QUEUE_READY => q.set_ready(value == 1),
            REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
            REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
            REG_QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
            REG_QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
            REG_QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    /// The driver made buffers available on queue `index` (its ioeventfd fired).
    pub fn notified(&mut self, index: usize) {
        if self.broken.is_some() || self.status & STATUS_DRIVER_OK == 0 {
            return;
        }
        if !self.queues.get(index).is_some_and(|q| q.ready()) {
            return;
        }
        self.serve(|device, queues, mem| device.process(index, queues, mem));
    }

    /// A backend descriptor of the device is ready (a tap has frames).
    pub fn backend_ready(&mut self) {
        if self.broken.is_some() || self.status & STATUS_DRIVER_OK == 0 {
            return;
        }
        self.serve(|device, queues, mem| device.backend_ready(queues, mem));
    }

    pub fn backend_fds(&self) -> Vec<std::os::unix::io::RawFd> {
        self.device.backend_fds()
    }

    /// What the transport offers: the device's features and its own.
    fn offered_features(&self) -> u64 {
        self.device.features() | F_RING_EVENT_IDX
    }

    /// Run `round` (the device serving a notification or its backend) until it uses no
    /// more buffers or the driver made none available meanwhile, re-arming the driver's
    /// notifications after each round; then interrupt the driver if any queue's
    /// `used_event` (or, without EVENT_IDX, any use at all) asks for it.
    ///
    /// Each round ends with every queue's `avail_event` at the first buffer not yet
    /// taken, so a buffer the driver adds after that notifies the device; one it added
    /// before, unseen, is what the next round takes.
    fn serve(
        &mut self,
        mut round: impl FnMut(
            &mut dyn VirtioDevice,
            &mut [Queue],
            &GuestMemoryMmap,
        ) -> Result<bool, DeviceError>,
    ) {
        let mut used = false;
        for _ in 0..MAX_ROUNDS {
            let added = match round(self.device.as_mut(), &mut self.queues, &self.mem) {
                Ok(added) => added,
                Err(e) => return self.mark_broken(e),
            };
            used |= added;
            let more = match self.rearm_notifications() {
                Ok(more) => more,
                Err(e) => return self.mark_broken(e),
            };
            if !added || !more {
                break;
            }
        }
        if used && self.driver_wants_interrupt() {
            self.interrupt.raise(INT_VRING);
        }
    }

    /// Ask the driver to notify for every buffer it adds from now on (EVENT_IDX: each
    /// ready queue's `avail_event`; else the used ring's flags). Whether any queue has
    /// buffers available that no round has taken yet.
    fn rearm_notifications(&mut self) -> Result<bool, DeviceError> {
        let mut more = false;
        for (i, q) in self
            .queues
            .iter_mut()
            .enumerate()
            .filter(|(_, q)| q.ready())
        {
            more |= q
                .enable_notification(&self.mem)
                .map_err(|e| DeviceError::Ring(format!("queue {i}: {e}")))?;
        }
        Ok(more)
    }

    /// Whether a queue's driver asked to be interrupted for the buffers used since the
    /// last interrupt (always, without EVENT_IDX).
    fn driver_wants_interrupt(&mut self) -> bool {
        let mut wants = false;
        for q in self.queues.iter_mut().filter(|q| q.ready()) {
            // A queue whose ring cannot be read wants its interrupt: the driver learns
            // more from an interrupt than from silence.
            wants |= q.needs_notification(&self.mem).unwrap_or(true);
        }
        wants
    }

    /// The guest gave the device what no correct driver gives: it serves nothing more
    /// until the driver resets it, and says so (DEVICE_NEEDS_RESET and a configuration
    /// interrupt, as virtio 1.x §2.1.2 asks).
    fn mark_broken(&mut self, e: DeviceError) {
        eprintln!(
            "\r\nlpvmm: {} marked broken until the guest resets it: {e}",
            self.device.describe()
        );
        self.status |= STATUS_NEEDS_RESET;
        self.broken = Some(e);
        self.interrupt.raise(INT_CONFIG);
    }

    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    /// A device that counts the notifications it serves, and fails them if asked.
    struct Counting {
        fail: bool,
        served: Arc<AtomicU32>,
    }

    impl VirtioDevice for Counting {
        fn device_type(&self) -> u32 {
            2
        }
        fn features(&self) -> u64 {
            F_VERSION_1 | 1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn config(&self) -> &[u8] {
            &[1, 2, 3, 4]
        }
        fn process(
            &mut self,
            _: usize,
            _: &mut [Queue],
            _: &GuestMemoryMmap,
        ) -> Result<bool, DeviceError> {
            self.served.fetch_add(1, Ordering::AcqRel);
            match self.fail {
                true => Err(DeviceError::Chain("test".into())),
                false => Ok(true),
            }
        }
        fn describe(&self) -> String {
            "counting".into()
        }
    }

    fn transport(fail: bool, ram: u64) -> (MmioTransport, Arc<AtomicU32>) {
        let served = Arc::new(AtomicU32::new(0));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), ram as usize)]).unwrap();
        let dev = Counting {
            fail,
            served: served.clone(),
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let notify = vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()];
        let t = MmioTransport::new(
            Box::new(dev),
            MmioSlot::of(0),
            mem,
            notify,
            Arc::new(Interrupt::new(irq)),
        );
        (t, served)
    }

    fn w(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn r(t: &MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn negotiate(t: &mut MmioTransport, high: u32) {
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, high);
        w(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    fn set_up_queue(t: &mut MmioTransport, desc: u32) {
        w(t, REG_QUEUE_SEL, 0);
        w(t, REG_QUEUE_NUM, 16);
        w(t, REG_QUEUE_DESC_LOW, desc);
        w(t, REG_QUEUE_DRIVER_LOW, 0x2000);
        w(t, REG_QUEUE_DEVICE_LOW, 0x3000);
        w(t, REG_QUEUE_READY, 1);
        w(t, REG_STATUS, 0xf);
    }

    #[test]
    fn identifies_itself_and_accepts_only_offered_features_with_version_1() {
        let (mut t, _) = transport(false, 0x10000);
        assert_eq!(r(&t, REG_MAGIC), MAGIC);
        assert_eq!(r(&t, REG_VERSION), 2);
        assert_eq!(r(&t, REG_DEVICE_ID), 2);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&t, REG_DEVICE_FEATURES), 1);
        assert_eq!(r(&t, REG_CONFIG + 1) & 0xff, 2);
        assert_eq!(
            r(&t, REG_CONFIG + 64),
            0,
            "past the config space reads zero"
        );
        negotiate(&mut t, 0);
        assert_eq!(r(&t, REG_STATUS) & STATUS_FEATURES_OK, 0, "no VERSION_1");
        w(&mut t, REG_STATUS, 0);
        negotiate(&mut t, 1 | 2);
        assert_eq!(
            r(&t, REG_STATUS) & STATUS_FEATURES_OK,
            0,
            "a feature not offered"
        );
        w(&mut t, REG_STATUS, 0);
        negotiate(&mut t, 1);
        assert_ne!(r(&t, REG_STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn queue_set_up_only_between_features_ok_and_driver_ok() {
        let (mut t, served) = transport(false, 0x10000);
        w(&mut t, REG_QUEUE_NUM, 8);
        w(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(r(&t, REG_QUEUE_READY), 0, "before FEATURES_OK");
        negotiate(&mut t, 1);
        set_up_queue(&mut t, 0x1000);
        assert_eq!(r(&t, REG_QUEUE_READY), 1);
        w(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(r(&t, REG_QUEUE_READY), 1, "after DRIVER_OK");
        t.notified(0);
        t.notified(7);
        assert_eq!(served.load(Ordering::Acquire), 1);
        assert_eq!(r(&t, REG_INTERRUPT_STATUS), INT_VRING);
        w(&mut t, REG_INTERRUPT_ACK, INT_VRING);
        assert_eq!(r(&t, REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn a_broken_device_serves_nothing_until_the_driver_resets_it() {
        let (mut t, served) = transport(true, 0x10000);
        negotiate(&mut t, 1);
        set_up_queue(&mut t, 0x1000);
        t.notified(0);
        assert!(t.is_broken());
        assert_ne!(r(&t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        assert_eq!(r(&t, REG_INTERRUPT_STATUS), INT_CONFIG);
        w(&mut t, REG_STATUS, 0xf);
        assert_ne!(
            r(&t, REG_STATUS) & STATUS_NEEDS_RESET,
            0,
            "kept until reset"
        );
        t.notified(0);
        assert_eq!(served.load(Ordering::Acquire), 1);
        w(&mut t, REG_STATUS, 0);
        assert_eq!((r(&t, REG_STATUS), r(&t, REG_INTERRUPT_STATUS)), (0, 0));
        assert!(!t.is_broken());
        negotiate(&mut t, 1);
        set_up_queue(&mut t, 0x1000);
        t.notified(0);
        assert_eq!(served.load(Ordering::Acquire), 2);
    }

    #[test]
    fn with_event_idx_the_device_rearms_notifications_and_interrupts_only_when_asked() {
        use vm_memory::Bytes;
        let (mut t, served) = transport(false, 0x10000);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_ne!(
            r(&t, REG_DEVICE_FEATURES) & (1 << 29),
            0,
            "EVENT_IDX offered"
        );
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        w(&mut t, REG_DRIVER_FEATURES, 1 << 29);
        negotiate(&mut t, 1);
        set_up_queue(&mut t, 0x1000);
        // The driver made 3 buffers available; the device takes none (it only counts),
        // so each round finds them still there, up to the bound.
        t.mem.write_obj(3u16, GuestAddress(0x2002)).unwrap();
        t.mem.write_obj(0xffffu16, GuestAddress(0x3084)).unwrap();
        t.notified(0);
        assert_eq!(served.load(Ordering::Acquire), MAX_ROUNDS as u32);
        let avail_event: u16 = t.mem.read_obj(GuestAddress(0x3000 + 4 + 8 * 16)).unwrap();
        assert_eq!(avail_event, 0, "avail_event: the first buffer not taken");
        assert_eq!(
            r(&t, REG_INTERRUPT_STATUS),
            0,
            "no buffer used: used_event asks for no interrupt"
        );
    }

    #[test]
    fn rings_outside_guest_ram_break_the_device_at_driver_ok() {
        let (mut t, served) = transport(false, 0x10000);
        negotiate(&mut t, 1);
        set_up_queue(&mut t, 0xfff0_0000);
        assert!(t.is_broken());
        assert!(
            t.describe().contains("broken: a queue is not usable"),
            "{}",
            t.describe()
        );
        t.notified(0);
        assert_eq!(served.load(Ordering::Acquire), 0);
    }
}
