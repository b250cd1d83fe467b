//! The I/O thread: the virtio devices' queue notifications (one ioeventfd per queue,
//! signalled by KVM when the guest writes QueueNotify) served by an event-manager
//! loop, under the `io` seccomp filter. Disk I/O never runs on a vCPU thread, so a
//! slow disk stalls the guest's I/O and not its CPUs.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioTransport;
use crate::seccomp::ThreadKind;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A device, the ioeventfds of its queues (in queue order) and its backend's
/// descriptors (a tap's).
pub struct DeviceQueues {
    pub transport: Arc<Mutex<MmioTransport>>,
    pub events: Vec<EventFd>,
    pub backend: Vec<RawFd>,
}

impl MutEventSubscriber for DeviceQueues {
    fn init(&mut self, ops: &mut EventOps) {
        for evt in &self.events {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                tracing::error!("I/O thread cannot watch a queue: {e:?}");
            }
        }
        // Edge-triggered: a backend with data and no guest buffer to take it is not
        // looked at again until the guest adds buffers (its queue's notification).
        for &fd in &self.backend {
            let set = EventSet::IN | EventSet::EDGE_TRIGGERED;
            if let Err(e) = ops.add(Events::new_raw(fd, set)) {
                tracing::error!("I/O thread cannot watch a device's backend: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        let mut transport = self.transport.lock().unwrap_or_else(|e| e.into_inner());
        if self.backend.contains(&fd) {
            transport.backend_ready();
            return;
        }
        let Some(index) = self.events.iter().position(|e| e.as_raw_fd() == fd) else {
            return;
        };
        let _ = self.events[index].read();
        transport.notified(index);
    }
}

/// Ends the loop when written.
struct StopEvent {
    evt: EventFd,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopEvent {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.evt, EventSet::IN));
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stop.store(true, Ordering::Release);
    }
}

/// The running I/O thread; stopped (and joined) by [`IoThread::stop`] or when dropped.
pub struct IoThread {
    stop_evt: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl IoThread {
    /// Start serving `devices`. The event loop is made here (its epoll descriptor
    /// before any filter); the thread locks itself down before serving.
    pub fn start(devices: Vec<DeviceQueues>, seccomp: bool) -> std::io::Result<IoThread> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let mut em: EventManager<Subscriber> = EventManager::new()
            .map_err(|e| std::io::Error::other(format!("event manager: {e:?}")))?;
        for d in devices {
            em.add_subscriber(Arc::new(Mutex::new(d)));
        }
        em.add_subscriber(Arc::new(Mutex::new(StopEvent {
            evt: stop_evt.try_clone()?,
            stop: stop.clone(),
        })));
        let handle = std::thread::Builder::new()
            .name("lpvmm-io".into())
            .spawn(move || serve(em, &stop, seccomp))?;
        Ok(IoThread {
            stop_evt,
            handle: Some(handle),
        })
    }

    pub fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = self.stop_evt.write(1);
            let _ = h.join();
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(mut em: EventManager<Subscriber>, stop: &AtomicBool, seccomp: bool) {
    if seccomp {
        if let Err(e) = crate::seccomp::install(ThreadKind::Io) {
            eprintln!("\r\nlpvmm: the I/O thread serves no device: {e}");
            return;
        }
    } else {
        crate::seccomp::selftest_without_filter(ThreadKind::Io);
    }
    while !stop.load(Ordering::Acquire) {
        if let Err(e) = em.run_with_timeout(1000) {
            eprintln!("\r\nlpvmm: the I/O thread's event loop failed: {e:?}");
            return;
        }
    }
}
