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
use patcher::{Begin, Consistency, EnableArgs, Op, Request};
use sha2::{Digest, Sha256};

use crate::devices::StopReason;
use crate::proto::PauseCost;
use crate::proto::{
    ChecksumResult, ChecksumTarget, PatchLoadResult, PatchStatusResult, TransitionStarted,
};
use crate::session::Session;
use crate::vstate::paused::PausedVm;
use crate::vstate::vm::Vm;

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

    /// A patch read as [`Session::patch_load`] reads it, against this guest's kernel,
    /// loading nothing: what `kp inspect --vm` describes.
    pub fn kp_inspect(&mut self, kp_hex: &str, params: &[String]) -> Result<patcher::PatchObject> {
        let kp = hex_decode(kp_hex)?;
        let kernel = self.kernel_attached()?;
        Ok(patcher::parse_patch(&kp, &kernel, params)?)
    }

    pub fn patch_load(
        &mut self,
        kp_hex: &str,
        params: &[String],
        enable: bool,
        args: TransitionArgs,
    ) -> Result<PatchLoadResult> {
        let kp = hex_decode(kp_hex)?;
        self.patch_load_bytes(kp, params, enable, args)
    }

    /// [`Session::patch_load`] of a file's bytes (a client's, or one applied at boot).
    pub(crate) fn patch_load_bytes(
        &mut self,
        kp: Vec<u8>,
        params: &[String],
        enable: bool,
        args: TransitionArgs,
    ) -> Result<PatchLoadResult> {
        let timeout = timeout(args.timeout_ms)?;
        let enable = enable.then_some(EnableArgs {
            consistency: args.consistency,
            timeout,
        });
        let kernel = self.kernel_attached()?;
        let obj = patcher::parse_patch(&kp, &kernel, params)?;
        let mapped_before = self.engine.area_layout().is_some();
        let now = self.now_ms();
        let Session { vm, engine, .. } = self;
        let mut guest = Driven::new(vm);
        let loaded = engine.load_and_enable_object(&mut guest, &kernel, obj, enable, now)?;
        let pause = guest.load_pause.unwrap_or_default();
        if let (false, Some(a)) = (mapped_before, self.engine.area_layout()) {
            // Once per VM, on stderr beside a crash report: whether a dead guest was
            // running lpvmm's code (docs/testing.md; the test harness reads it).
            eprintln!(
                "{PATCH_CODE_MAPPED} {:#x}-{:#x} (patches and trampolines)",
                a.code.start, a.code.end
            );
        }
        if loaded.transition.is_some() {
            self.wakeup.notify_all();
        }
        self.boot.loaded(&loaded.name, kp, params);
        Ok(PatchLoadResult {
            name: loaded.name,
            transition: loaded.transition,
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
        let kernel = self.kernel_attached()?;
        let Session { vm, engine, .. } = self;
        // The guest's module_mutex, held while one of its modules loads or unloads,
        // keeps the patch's module where it is for a moment: tried again.
        let mut tries = 0;
        loop {
            tries += 1;
            match vm.paused_for_write(|g| engine.unload(g, &kernel, name))?.0 {
                Err(patcher::KpError::GuestBusy(_)) if tries < patcher::BUSY_TRIES => {
                    std::thread::sleep(patcher::BUSY_WAIT)
                }
                r => break r?,
            }
        }
        self.boot.unloaded(name);
        Ok(serde_json::json!({ "unloaded": name }))
    }

    pub fn patch_status(&self) -> PatchStatusResult {
        let mut s = PatchStatusResult::of(&self.engine);
        s.boot = self.boot.view(self.vm.boots());
        for p in &mut s.patches {
            p.applied_at_boot = self.boot.note(&p.name);
        }
        s
    }

    /// Answer the rings of the guest's module notifier filed since the last look
    /// (devices/doorbell.rs): without a pause where the engine can, else in one pause
    /// per ring. A ring whose pause fails is answered at its next ring.
    pub fn serve_doorbell(&mut self) {
        let rings = self.vm.devices.doorbell.take();
        if rings.is_empty() {
            return;
        }
        let kernel = match self.kernel_attached() {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!("module notifier: {e:#}");
                return;
            }
        };
        for ring in rings {
            let Session { vm, engine, .. } = self;
            let quick = vm.running_ram(|ram| engine.module_ring_unpaused(ram, &kernel, ring));
            let last = engine.module_events().back().cloned();
            let answer = match quick {
                Some(a) => a,
                None => match vm.paused_for_write(|g| engine.module_ring(g, &kernel, ring)) {
                    Ok((a, _)) => {
                        // Once per event, when it ends (a ring that asks the stub to
                        // call a callback ends none).
                        match engine.module_events().back() {
                            Some(e) if Some(e) != last.as_ref() => {
                                eprintln!("lpvmm: module {} {}: {}", e.module, e.action, e.outcome)
                            }
                            _ => {}
                        }
                        a
                    }
                    Err(e) => {
                        tracing::warn!("module notifier: cannot pause: {e}");
                        continue;
                    }
                },
            };
            vm.devices.doorbell.answer(ring, answer);
        }
    }

    /// One tick of the transition in progress, if it is due. Returns when the next is.
    pub fn drive_transition(&mut self) -> Option<Instant> {
        self.engine.due()?;
        let kernel = match self.kernel_attached() {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!("patch driver: {e:#}");
                return Some(Instant::now() + IDLE_WAKEUP);
            }
        };
        let now = self.now_ms();
        let Session { vm, engine, .. } = self;
        let due = engine.drive(&mut Driven::new(vm), &kernel, now);
        match due {
            Ok(due) => due.map(|d| self.instant(d)),
            Err(e) => {
                let e = crate::error_line(&e);
                tracing::warn!("patch driver: cannot tick: {e}");
                self.engine.due().map(|d| self.instant(d))
            }
        }
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
            ChecksumTarget::Module { ref name } => {
                let k = self.kernel_attached()?;
                let (r, pause) = self.vm.paused(|g| -> Result<(u64, Vec<u8>)> {
                    let mem = k.memory(g);
                    let list = introspection::modules::ModuleList::read(&mem, &k)?;
                    let m = list.named(name).ok_or_else(|| {
                        anyhow!("no module named '{name}' is loaded in the guest")
                    })?;
                    let t = m.text;
                    let len = t.end.saturating_sub(t.start);
                    Ok((t.start, mem.read_vec(t.start, len as usize)?))
                })?;
                let (start, bytes) = r?;
                (start, bytes.len() as u64, bytes, pause)
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
        let devices = guard.vm.devices.clone();
        if let Some(reason) = devices.stop_reason() {
            if !devices.restarts(&reason) {
                return;
            }
        }
        guard.serve_doorbell();
        let transition = guard.drive_transition();
        let boot = guard.apply_boot_patches();
        let wait = [transition, boot]
            .into_iter()
            .flatten()
            .min()
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

/// The engine's way to the guest ([`patcher::GuestControl`]): the VM's memory while it
/// runs, and its writing pause. Keeps the first pause's cost, which a load reports.
struct Driven<'v> {
    vm: &'v mut Vm,
    load_pause: Option<PauseCost>,
}

impl<'v> Driven<'v> {
    fn new(vm: &'v mut Vm) -> Self {
        Driven {
            vm,
            load_pause: None,
        }
    }
}

impl patcher::GuestControl for Driven<'_> {
    fn running<R>(&self, f: impl FnOnce(&dyn introspection::GuestRam) -> R) -> R {
        self.vm.running_ram(|ram| f(ram))
    }

    fn make_resident(&self, ranges: &[introspection::PhysRange]) {
        self.vm.make_resident(ranges)
    }

    fn paused<R>(
        &mut self,
        f: impl FnOnce(&mut dyn patcher::GuestWriter) -> R,
    ) -> Result<(R, Duration), patcher::PauseError> {
        let (r, cost) = self
            .vm
            .paused_for_write(|g| f(g))
            .map_err(|e| patcher::PauseError(e.into()))?;
        let pause = Duration::from_micros(cost.paused_us);
        self.load_pause.get_or_insert(cost);
        Ok((r, pause))
    }

    fn interrupt(&mut self, ipi: patcher::guestcall::Ipi) -> Result<(), patcher::PauseError> {
        self.vm
            .signal_msi(ipi.apic_id, patcher::guestcall::CALL_FUNCTION_SINGLE_VECTOR)
            .map_err(|e| patcher::PauseError(e.into()))
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
