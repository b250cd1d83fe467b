//! A running VM as the control socket sees it: the VM core, the guest kernel once
//! attached, and the patch engine. Requests and the patch driver lock one `Session`;
//! the VM core itself knows neither patches nor the protocol.

use std::sync::{Arc, Condvar};
use std::time::Instant;

use introspection::Kernel;

use crate::vm::Vm;

pub struct Session {
    pub vm: Vm,
    /// The guest kernel, once an introspection or patch request has attached to it.
    pub(crate) kernel: Option<Arc<Kernel>>,
    pub(crate) engine: patcher::Engine,
    /// The engine's clock starts here.
    epoch: Instant,
    /// Wakes the patch driver when a transition starts or is asked to change.
    pub(crate) wakeup: Arc<Condvar>,
}

impl Session {
    pub fn new(vm: Vm) -> Self {
        let mut engine = patcher::Engine::new();
        engine.set_verify_early(vm.config.verify_early_checks);
        Session {
            vm,
            kernel: None,
            engine,
            epoch: Instant::now(),
            wakeup: Arc::new(Condvar::new()),
        }
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
