//! Patch requests on a VM, and the patch driver.
//!
//! The engine lives in the VMM process: a transition outlives the command that started
//! it. Requests validate and start (or change) a transition at once; the driver thread
//! then pauses the guest whenever the engine says a tick is due, lets the engine do the
//! tick, and resumes. The engine decides everything about the transition; the driver
//! only decides when to pause. Clients poll `patch_status`; a client that dies changes
//! nothing.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use patcher::{Begin, Consistency, Op, Request};
use sha2::{Digest, Sha256};

use crate::control::proto::{
    ChecksumResult, ChecksumTarget, PatchLoadResult, PatchStatusResult, TransitionStarted,
};
use crate::devices::StopReason;
use crate::session::Session;
use crate::vstate::paused::PausedVm;

/// How the VMM says, on stderr, where the patch code lies in the guest once it first
/// maps the patch area (followed by `START-END`): a guest that dies executing there dies
/// in lpvmm's code, which the test harness never takes for the platform's.
pub const PATCH_CODE_MAPPED: &str = "lpvmm: patch code mapped in the guest at";

/// Longest transition timeout a request may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// How often an idle driver looks whether its VM has stopped.
const IDLE_WAKEUP: Duration = Duration::from_secs(1);

fn timeout(ms: Option<u64>) -> Result<Option<Duration>> {
    let Some(ms) = ms else { return Ok(None) };
    let t = Duration::from_millis(ms);
    if t.is_zero() || t > MAX_TIMEOUT {
        bail!(
            "timeout must be between 1 ms and {} h",
            MAX_TIMEOUT.as_secs() / 3600
        );
    }
    Ok(Some(t))
}

fn hex_decode(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        bail!("kp_hex has an odd number of digits");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(s.get(i..i + 2).unwrap_or("x"), 16)
                .map_err(|_| anyhow!("kp_hex is not hex at offset {i}"))
        })
        .collect()
}

/// How a client asked for a transition.
#[derive(Clone, Copy, Debug)]
pub struct TransitionArgs {
    pub consistency: Consistency,
    pub timeout_ms: Option<u64>,
}

impl Session {
    fn begin(&mut self, name: &str, op: Op, args: TransitionArgs, unload: bool) -> Result<u64> {
        let now = self.now_ms();
        let id = self.engine.begin(
            Begin {
                patch: name.to_string(),
                op,
                consistency: args.consistency,
                timeout: timeout(args.timeout_ms)?,
                unload_on_failure: unload,
            },
            now,
        )?;
        self.wakeup.notify_all();
        Ok(id)
    }

    pub fn patch_load(
        &mut self,
        kp_hex: &str,
        enable: bool,
        args: TransitionArgs,
    ) -> Result<PatchLoadResult> {
        timeout(args.timeout_ms)?;
        let kp = hex_decode(kp_hex)?;
        if enable {
            // Everything the enable would refuse is refused before the load writes.
            self.engine.check_load_and_enable(&kp)?;
        }
        let kernel = self.kernel_attached()?;
        let mapped_before = self.engine.area_layout().is_some();
        let Session { vm, engine, .. } = self;
        // Parse, resolve and link while the guest runs; the pause checks and writes.
        let prepared = vm.running_ram(|ram| engine.prepare(ram, &kernel, &kp))?;
        vm.make_resident(&prepared.area_writes());
        let (name, pause) = vm.paused_for_write(|g| engine.load_prepared(g, &kernel, prepared))?;
        let name = name?;
        if let (false, Some(a)) = (mapped_before, self.engine.area_layout()) {
            // Once per VM, on stderr beside a crash report: whether a dead guest was
            // running lpvmm's code (docs/testing.md; the test harness reads it).
            eprintln!(
                "{PATCH_CODE_MAPPED} {:#x}-{:#x} (patches and trampolines)",
                a.code.start, a.code.end
            );
        }
        let transition = if enable {
            match self.begin(&name, Op::Enable, args, true) {
                Ok(id) => Some(id),
                Err(e) => {
                    // Checked above, so not expected; leave nothing behind regardless.
                    let Session { vm, engine, .. } = self;
                    let undone = vm
                        .paused_for_write(|g| engine.unload(g, &name))
                        .map_err(anyhow::Error::from)
                        .and_then(|(r, _)| r.map_err(anyhow::Error::from));
                    if let Err(u) = undone {
                        tracing::warn!("cannot unload {name} after a refused enable: {u:#}");
                    }
                    return Err(e);
                }
            }
        } else {
            None
        };
        Ok(PatchLoadResult {
            name,
            transition,
            pause,
        })
    }

    pub fn patch_transition(
        &mut self,
        name: &str,
        op: Op,
        args: TransitionArgs,
    ) -> Result<TransitionStarted> {
        Ok(TransitionStarted {
            id: self.begin(name, op, args, false)?,
        })
    }

    /// Reverse or force the transition in progress (done at the next tick, at once).
    pub fn patch_request(&mut self, r: Request) -> Result<TransitionStarted> {
        let id = self.engine.request(r)?;
        self.wakeup.notify_all();
        Ok(TransitionStarted { id })
    }

    pub fn patch_unload(&mut self, name: &str) -> Result<serde_json::Value> {
        self.engine.patch(name)?;
        let Session { vm, engine, .. } = self;
        vm.paused_for_write(|g| engine.unload(g, name))?.0?;
        Ok(serde_json::json!({ "unloaded": name }))
    }

    pub fn patch_status(&self) -> PatchStatusResult {
        PatchStatusResult::of(&self.engine)
    }

    /// One tick of the transition in progress, if it is due. Returns when the next is.
    pub fn drive_transition(&mut self) -> Option<Instant> {
        let due = self.engine.due()?;
        let now = self.now_ms();
        if now < due {
            return Some(self.instant(due));
        }
        let kernel = match self.kernel_attached() {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!("patch driver: {e:#}");
                return Some(Instant::now() + IDLE_WAKEUP);
            }
        };
        let Session { vm, engine, .. } = self;
        // Unwind while the guest runs; the tick confirms in its pause what it takes.
        vm.running_ram(|ram| engine.unwind_early(ram, &kernel));
        match vm.paused_for_write(|g| engine.tick(g, &kernel, now)) {
            Ok(((), cost)) => self
                .engine
                .note_pause(Duration::from_micros(cost.paused_us)),
            Err(e) => tracing::warn!("patch driver: cannot pause for a tick: {e:#}"),
        }
        // The guest runs again: free what the tick read.
        self.engine.release_spent();
        self.engine.due().map(|d| self.instant(d))
    }

    pub fn checksum(&mut self, what: ChecksumTarget) -> Result<ChecksumResult> {
        let (start, len, bytes, pause) = match what {
            ChecksumTarget::Text => {
                let k = self.kernel_attached()?;
                let t = k.addrs.text;
                let len = t.end - t.start;
                let (bytes, pause) = self
                    .vm
                    .paused(|g| k.memory(g).read_vec(t.start, len as usize))?;
                (
                    t.start,
                    len,
                    bytes.map_err(|e| anyhow!("reading kernel text: {e}"))?,
                    pause,
                )
            }
            ChecksumTarget::PatchArea => {
                let (r, pause) = self.vm.paused(|g| {
                    let a = introspection::GuestRam::patch_area(g);
                    let mut buf = vec![0u8; a.size as usize];
                    introspection::GuestRam::read_phys(g, a.start, &mut buf).map(|_| (a, buf))
                })?;
                let (a, buf) = r?;
                (a.start, a.size, buf, pause)
            }
        };
        let sha256 = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(ChecksumResult {
            what,
            start,
            len,
            sha256,
            pause,
        })
    }
}

/// Drive every transition of a VM from a thread of its own, so that neither the control
/// socket nor the console waits for one. Between ticks, and while there is nothing to
/// do, it sleeps on a condition variable of the session's mutex (no polling: an idle VM
/// costs nothing). Ends when the VM stops.
pub fn spawn_driver(session: &Arc<Mutex<Session>>) -> Result<()> {
    let wakeup = session
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .wakeup
        .clone();
    let seccomp = session
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .vm
        .config
        .seccomp;
    let session: Weak<Mutex<Session>> = Arc::downgrade(session);
    std::thread::Builder::new()
        .name("patch-driver".into())
        .spawn(move || {
            if let Err(e) = lock_down(seccomp) {
                if let Some(s) = session.upgrade() {
                    let s = s.lock().unwrap_or_else(|e| e.into_inner());
                    s.vm.devices.request_stop(StopReason::Fatal(e.to_string()));
                }
                return;
            }
            drive(session, wakeup)
        })
        .map(|_| ())
        .map_err(|e| anyhow!("cannot start the patch driver thread: {e}"))
}

/// The patch driver's seccomp filter, before it touches the guest.
fn lock_down(seccomp: bool) -> Result<(), crate::seccomp::SeccompError> {
    use crate::seccomp::{self, ThreadKind};
    if !seccomp {
        seccomp::selftest_without_filter(ThreadKind::PatchDriver);
        return Ok(());
    }
    seccomp::install(ThreadKind::PatchDriver)
}

/// Drive transitions until the VM ends.
fn drive(session: Weak<Mutex<Session>>, wakeup: Arc<std::sync::Condvar>) {
    loop {
        let Some(session) = session.upgrade() else {
            return;
        };
        let mut guard = session.lock().unwrap_or_else(|e| e.into_inner());
        if guard.vm.devices.stop_reason().is_some() {
            return;
        }
        let wait = guard
            .drive_transition()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(IDLE_WAKEUP)
            .max(Duration::from_millis(1));
        let guard = wakeup
            .wait_timeout(guard, wait)
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
        drop(guard);
    }
}

/// The patcher's view of a paused guest it may write: the VM core offers the write
/// ([`PausedVm::write_phys`], under [`crate::vstate::vm::Vm::paused_for_write`]) and
/// knows nothing of the patcher; this glue is where the two meet.
impl patcher::GuestWriter for PausedVm<'_> {
    fn write_phys(&mut self, addr: u64, data: &[u8]) -> Result<(), introspection::GuestError> {
        PausedVm::write_phys(self, addr, data)
    }

    fn reader(&self) -> &dyn introspection::PausedGuest {
        self
    }
}
