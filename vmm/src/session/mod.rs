//! A running VM as the control socket sees it: the VM core, the guest kernel once
//! attached, and the patch engine. Requests and the patch driver lock one `Session`;
//! the VM core itself knows neither patches nor the socket.
//!
//! - [`inspect`]: read-only requests (kernel, tasks, stacks, symbols);
//! - [`patching`]: the patch engine's driver (load, unload, ticks);
//! - [`status`]: the engine's state as `patch status` shows it.

pub mod boot;
pub mod inspect;
pub mod patching;
pub mod status;

use std::sync::{Arc, Condvar};
use std::time::Instant;

use introspection::Kernel;

use crate::vstate::vm::Vm;

pub struct Session {
    pub vm: Vm,
    /// The guest kernel, once an introspection or patch request has attached to it.
    pub(crate) kernel: Option<Arc<Kernel>>,
    pub(crate) engine: patcher::Engine,
    /// The engine's clock starts here.
    epoch: Instant,
    /// Wakes the patch driver when a transition starts or is asked to change.
    pub(crate) wakeup: Arc<Condvar>,
    /// Patches applied at each boot: `--patch` files, and those loaded before a reboot.
    pub(crate) boot: boot::BootPatches,
}

impl Session {
    pub fn new(vm: Vm, boot: boot::BootPatches) -> Self {
        let engine = new_engine(&vm);
        let wakeup = Arc::new(Condvar::new());
        vm.devices.doorbell.set_waker(wakeup.clone());
        Session {
            vm,
            kernel: None,
            engine,
            epoch: Instant::now(),
            wakeup,
            boot,
        }
    }

    /// The guest asked for a reboot and the VM restarts it (`Vm::reboot`): the new
    /// kernel is another one (its own KASLR offset, none of lpvmm's code), so the
    /// attached kernel and the engine's state go, and the patches loaded now are
    /// applied again once the new kernel is up ([`boot`]). Returns the reboot's number.
    pub fn reboot(&mut self) -> Result<u64, crate::vstate::vm::VmError> {
        let states: Vec<(String, crate::proto::PatchStateView)> = self
            .patch_status()
            .patches
            .into_iter()
            .map(|p| (p.name, p.state))
            .collect();
        self.vm.reboot()?;
        let reboots = self.vm.boots();
        self.kernel = None;
        self.engine = new_engine(&self.vm);
        self.boot.rebooted(reboots, &states);
        self.wakeup.notify_all();
        Ok(reboots)
    }

    /// Whether the guest still holds every byte the engine wrote (for a guest that
    /// died; the vCPUs must be stopped or paused).
    pub fn post_mortem(&self) -> patcher::PostMortem {
        self.vm.running_ram(|ram| self.engine.post_mortem(ram))
    }

    /// The engine's clock, in ms.
    pub(crate) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The instant `ms` on the engine's clock stands for.
    pub(crate) fn instant(&self, ms: u64) -> Instant {
        self.epoch + std::time::Duration::from_millis(ms)
    }
}

/// The patch engine of a boot of `vm`'s guest.
fn new_engine(vm: &Vm) -> patcher::Engine {
    let mut engine = patcher::Engine::new();
    engine.set_verify_early(vm.config.verify_early_checks);
    engine.set_doorbell(patcher::notifier::Doorbell {
        port: crate::devices::doorbell::PORT,
        token: vm.devices.doorbell.token(),
    });
    inject_fault(&mut engine);
    engine
}

/// Test builds only (the `fault-injection` feature, which release builds refuse):
/// `LPVMM_FAULT_INJECTION=wrong-site-byte` makes the first site jump lpvmm writes wrong
/// by one byte while its journal records the bytes meant, as a bug of lpvmm's would
/// (tests/tests/patching.rs: such a death must never be retried as the platform's).
#[cfg(feature = "fault-injection")]
fn inject_fault(engine: &mut patcher::Engine) {
    if std::env::var("LPVMM_FAULT_INJECTION").as_deref() == Ok("wrong-site-byte") {
        eprintln!("lpvmm: FAULT INJECTION: the first site jump will be written one byte wrong");
        engine.inject_wrong_site_byte();
    }
}

#[cfg(not(feature = "fault-injection"))]
fn inject_fault(_: &mut patcher::Engine) {}
