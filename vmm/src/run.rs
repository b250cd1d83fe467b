//! `lpvmm run`: build the VM, serve its console and control socket until it ends.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::control::server::{self, ControlServer};
use crate::devices::console::{Console, RawTerminal};
use crate::devices::StopReason;
use crate::seccomp::ThreadKind;
use crate::session::boot::BootPatches;
use crate::session::Session;
use crate::vstate::vm::{Vm, VmConfig};

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Eventfd the termination signal handler writes to (-1 before it exists).
static TERMINATE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_terminate(_: libc::c_int) {
    let fd = TERMINATE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) on an eventfd is async-signal-safe.
        unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

/// Wakes the loop when the VM must end: a guest event, a stop request or a signal.
struct StopWatcher {
    stop_evt: EventFd,
    terminate: EventFd,
    devices: Arc<crate::devices::Devices>,
}

impl MutEventSubscriber for StopWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.stop_evt, EventSet::IN));
        let _ = ops.add(Events::new(&self.terminate, EventSet::IN));
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        use std::os::unix::io::AsRawFd;
        if events.fd() == self.terminate.as_raw_fd() {
            let _ = self.terminate.read();
            self.devices.request_stop(StopReason::Requested(
                "lpvmm received a termination signal".into(),
            ));
        } else {
            let _ = self.stop_evt.read();
        }
    }
}

/// Run a VM to its end; returns lpvmm's exit code. `patches` (`--patch`) are applied
/// once each boot's kernel is up.
pub fn run(config: VmConfig, patches: &[std::path::PathBuf]) -> Result<i32> {
    one_malloc_arena();
    let name = config.name.clone();
    let seccomp = config.seccomp;
    let boot_patches = BootPatches::from_files(patches)?;
    let socket_path = server::claim_name(&name)?;
    if seccomp {
        crate::seccomp::install_handler(&socket_path)?;
    }
    let drained = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
    let vm = Vm::create(config, drained.try_clone().context("eventfd")?)?;
    let devices = vm.devices.clone();
    let session = Arc::new(Mutex::new(Session::new(vm, boot_patches)));
    crate::session::patching::spawn_driver(&session)?;
    let (listener, _socket_file) = server::bind(&socket_path)?;

    let terminate = terminate_on_signals()?;

    let (vcpus, memory) = {
        let s = session.lock().unwrap_or_else(|e| e.into_inner());
        (s.vm.config.vcpus, s.vm.config.memory)
    };
    eprintln!(
        "lpvmm: VM '{name}' started ({vcpus} vCPU, {} MiB); control socket {}",
        memory >> 20,
        socket_path.display()
    );

    let raw = RawTerminal::enter();
    let interactive = {
        // SAFETY: isatty on fd 0.
        unsafe { libc::isatty(libc::STDIN_FILENO) == 1 }
    };
    let mut em = event_manager(
        Console::new(devices.clone(), drained, interactive),
        ControlServer::new(listener, session.clone()),
        StopWatcher {
            stop_evt: devices.stop_evt.try_clone().context("eventfd")?,
            terminate,
            devices: devices.clone(),
        },
    )?;

    // From here on the main thread only serves: lock it down.
    if seccomp {
        crate::seccomp::install(ThreadKind::Api)?;
    } else {
        crate::seccomp::selftest_without_filter(ThreadKind::Api);
    }
    let reason = loop {
        if let Some(reason) = devices.stop_reason() {
            if !devices.restarts(&reason) {
                break reason;
            }
            if let Err(e) = reboot(&session, &reason) {
                break StopReason::Fatal(e);
            }
            continue;
        }
        if let Err(e) = em.run_with_timeout(1000) {
            break StopReason::Fatal(format!("event loop failed: {e:?}"));
        }
    };

    let post_mortem = {
        let mut s = session.lock().unwrap_or_else(|e| e.into_inner());
        s.vm.shutdown();
        // A dead guest's memory is still here: is every byte lpvmm wrote as it wrote
        // it? (The test harness never takes a death for the platform's without this.)
        reason.guest_died().then(|| s.post_mortem())
    };
    drop(raw);
    TERMINATE_FD.store(-1, Ordering::Relaxed);
    eprintln!("\r\nlpvmm: {}", reason.describe());
    if let Some(verdict) = post_mortem {
        eprintln!("lpvmm: {verdict}");
    }
    Ok(reason.exit_code())
}

/// Every thread allocates from glibc's main arena. A thread's own arena is an mmap'd
/// heap, and when a large free lets glibc shrink one (`shrink_heap`), glibc first reads
/// /proc/sys/vm/overcommit_memory, an `openat` that no thread's seccomp filter allows:
/// the patch driver died so when it dropped a kernel it had attached during a guest's
/// boot. The main arena shrinks with `brk`, and large blocks are `munmap`ped anyway.
/// (It also keeps the VMM's memory smaller: one arena instead of one per thread.)
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called before lpvmm starts any
    // thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// The guest asked for a reboot: start it again in this VM (`Session::reboot`).
fn reboot(session: &Mutex<Session>, why: &StopReason) -> Result<(), String> {
    let mut s = session.lock().unwrap_or_else(|e| e.into_inner());
    let n = s
        .reboot()
        .map_err(|e| format!("cannot restart the guest: {}", crate::error_line(&e)))?;
    let name = s.vm.config.name.clone();
    let again = s.boot.view(n).pending;
    eprintln!(
        "\r\nlpvmm: {}; VM '{name}' starts it again (reboot {n}; {again} patch(es) to apply once its kernel is up)",
        why.describe()
    );
    Ok(())
}

/// An eventfd that SIGTERM, SIGINT and SIGHUP write to: the main loop ends the VM.
fn terminate_on_signals() -> Result<EventFd> {
    let terminate = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
    {
        use std::os::unix::io::AsRawFd;
        TERMINATE_FD.store(terminate.as_raw_fd(), Ordering::Relaxed);
    }
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installing a handler that only writes to an eventfd.
        unsafe { libc::signal(sig, on_terminate as *const () as libc::sighandler_t) };
    }
    Ok(terminate)
}

/// The main thread's event loop: the console, the control socket, and the stop events.
fn event_manager(
    console: Console,
    control: ControlServer,
    stop: StopWatcher,
) -> Result<EventManager<Subscriber>> {
    let mut em: EventManager<Subscriber> =
        EventManager::new().map_err(|e| anyhow::anyhow!("event manager: {e:?}"))?;
    em.add_subscriber(Arc::new(Mutex::new(console)));
    em.add_subscriber(Arc::new(Mutex::new(control)));
    em.add_subscriber(Arc::new(Mutex::new(stop)));
    Ok(em)
}
