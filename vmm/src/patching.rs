//! Patch operations on a VM, and the transition driver.
//!
//! The engine lives in the VMM process: a transition outlives the command that started
//! it. Requests validate and start a transition at once; a driver thread then makes its
//! attempts (pause, check every task's stack, flip all sites or none, resume) with the
//! backoff of `patcher::transition` until it completes or times out. Clients poll
//! `patch_status`; a client that dies changes nothing.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use patcher::engine::Plan;
use patcher::transition::DEFAULT_TIMEOUT;
use patcher::{Op, Outcome, Transition};
use sha2::{Digest, Sha256};

use crate::control::proto::{
    ChecksumResult, ChecksumTarget, PatchLoadResult, PatchStatusResult, TransitionRecord,
    TransitionStarted,
};
use crate::vm::Vm;

/// Ended transitions kept for `patch status`.
const HISTORY: usize = 32;
/// Longest transition timeout a request may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// The transition in progress.
pub struct Active {
    id: u64,
    transition: Transition,
    plan: Plan,
    started: Instant,
    next_at: Instant,
    /// A patch loaded by the same request is unloaded again if it cannot be enabled.
    unload_on_failure: bool,
}

#[derive(Default)]
pub struct Patching {
    pub engine: patcher::Engine,
    active: Option<Active>,
    history: VecDeque<TransitionRecord>,
    next_id: u64,
    /// Wakes the driver when a transition starts (it waits on the VM's mutex).
    wakeup: Arc<Condvar>,
}

fn timeout(ms: Option<u64>) -> Result<Duration> {
    let t = ms.map(Duration::from_millis).unwrap_or(DEFAULT_TIMEOUT);
    if t.is_zero() || t > MAX_TIMEOUT {
        bail!(
            "timeout must be between 1 ms and {} s",
            MAX_TIMEOUT.as_secs()
        );
    }
    Ok(t)
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

impl Vm {
    fn start(&mut self, plan: Plan, op: Op, timeout: Duration, unload_on_failure: bool) -> u64 {
        let p = &mut self.patching;
        p.next_id += 1;
        let now = Instant::now();
        p.active = Some(Active {
            id: p.next_id,
            transition: Transition::new(&plan.patch, op, timeout),
            plan,
            started: now,
            next_at: now,
            unload_on_failure,
        });
        p.wakeup.notify_all();
        p.next_id
    }

    fn ensure_idle(&self) -> Result<()> {
        if let Some(a) = &self.patching.active {
            bail!(
                "a transition of patch '{}' is in progress; wait for it (lpvmm patch status)",
                a.transition.patch
            );
        }
        Ok(())
    }

    pub fn patch_load(
        &mut self,
        kp_hex: &str,
        enable: bool,
        timeout_ms: Option<u64>,
    ) -> Result<PatchLoadResult> {
        let timeout = timeout(timeout_ms)?;
        let kp = hex_decode(kp_hex)?;
        if enable {
            self.ensure_idle()?;
        }
        let kernel = self.kernel_attached()?;
        let mut engine = std::mem::take(&mut self.patching.engine);
        let loaded = self.inspect_paused(|g| engine.load(g, &kernel, &kp));
        self.patching.engine = engine;
        let (name, pause) = loaded?;
        let name = name?;
        let transition = if enable {
            let plan = self.patching.engine.plan_enable(&name)?;
            Some(self.start(plan, Op::Enable, timeout, true))
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
        timeout_ms: Option<u64>,
    ) -> Result<TransitionStarted> {
        let timeout = timeout(timeout_ms)?;
        self.ensure_idle()?;
        let plan = match op {
            Op::Enable => self.patching.engine.plan_enable(name)?,
            Op::Disable => self.patching.engine.plan_disable(name)?,
        };
        Ok(TransitionStarted {
            id: self.start(plan, op, timeout, false),
        })
    }

    pub fn patch_unload(&mut self, name: &str) -> Result<serde_json::Value> {
        self.ensure_idle()?;
        self.patching.engine.patch(name)?;
        let mut engine = std::mem::take(&mut self.patching.engine);
        let r = self.paused_for_read(|g| engine.unload(g, name));
        self.patching.engine = engine;
        r?.0?;
        Ok(serde_json::json!({ "unloaded": name }))
    }

    pub fn patch_status(&self) -> PatchStatusResult {
        let p = &self.patching;
        PatchStatusResult {
            patches: p.engine.patches().to_vec(),
            active: p.active.as_ref().map(|a| TransitionRecord {
                id: a.id,
                transition: a.transition.clone(),
            }),
            history: p.history.iter().cloned().collect(),
            area: p.engine.area_layout().cloned(),
        }
    }

    /// One attempt of the active transition, if it is due. Returns when to call again.
    pub fn drive_transition(&mut self) -> Option<Instant> {
        let a = self.patching.active.as_ref()?;
        let now = Instant::now();
        if now < a.next_at {
            return Some(a.next_at);
        }
        let elapsed = now - a.started;
        let last_chance = a.transition.last_chance(elapsed);
        let unload = a.unload_on_failure && a.plan.op == Op::Enable;
        let plan = a.plan.clone();
        let name = plan.patch.clone();
        let kernel = match self.kernel_attached() {
            Ok(k) => k,
            Err(e) => return self.end_transition(Outcome::Failed(format!("{e:#}"))),
        };
        let mut engine = std::mem::take(&mut self.patching.engine);
        let t0 = Instant::now();
        // The whole attempt in one pause: check, then flip every site or none. On the
        // last chance of a patch loaded for this transition, unload it in the same pause.
        let attempt = self.paused_for_read(|g| -> Result<_, patcher::KpError> {
            let (blockers, tasks) = engine.blockers(g, &kernel, &plan)?;
            if blockers.is_empty() {
                engine.apply(g, &plan)?;
            } else if last_chance && unload {
                engine.unload(g, &name)?;
            }
            Ok((blockers, tasks))
        });
        let pause = t0.elapsed();
        self.patching.engine = engine;
        let (blockers, tasks) = match attempt {
            Ok((Ok(r), _)) => r,
            Ok((Err(e), _)) => return self.end_transition(Outcome::Failed(e.to_string())),
            Err(e) => return self.end_transition(Outcome::Failed(format!("{e:#}"))),
        };
        let a = self.patching.active.as_mut()?;
        match a.transition.record(elapsed, pause, tasks, blockers) {
            Some(wait) => {
                a.next_at = Instant::now() + wait;
                Some(a.next_at)
            }
            None => {
                let outcome = a.transition.outcome.clone();
                self.end_transition(outcome)
            }
        }
    }

    fn end_transition(&mut self, outcome: Outcome) -> Option<Instant> {
        if let Some(mut a) = self.patching.active.take() {
            a.transition.outcome = outcome;
            let p = &mut self.patching;
            p.history.push_back(TransitionRecord {
                id: a.id,
                transition: a.transition,
            });
            while p.history.len() > HISTORY {
                p.history.pop_front();
            }
        }
        None
    }

    pub fn checksum(&mut self, what: ChecksumTarget) -> Result<ChecksumResult> {
        let (start, len, bytes, pause) = match what {
            ChecksumTarget::Text => {
                let k = self.kernel_attached()?;
                let t = k.addrs.text;
                let len = t.end - t.start;
                let (bytes, pause) =
                    self.inspect_paused(|g| k.memory(g).read_vec(t.start, len as usize))?;
                (
                    t.start,
                    len,
                    bytes.map_err(|e| anyhow!("reading kernel text: {e}"))?,
                    pause,
                )
            }
            ChecksumTarget::PatchArea => {
                let (r, pause) = self.inspect_paused(|g| {
                    let a = introspection::PausedGuest::patch_area(g);
                    let mut buf = vec![0u8; a.size as usize];
                    introspection::PausedGuest::read_phys(g, a.start, &mut buf).map(|_| (a, buf))
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

/// Drive every VM transition from a thread of its own, so that neither the control
/// socket nor the console waits for one. Between attempts, and while there is nothing
/// to do, it sleeps on a condition variable of the VM's mutex (no polling: an idle VM
/// costs nothing). Ends when the VM stops.
pub fn spawn_driver(vm: &Arc<Mutex<Vm>>) -> Result<()> {
    let wakeup = vm
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .patching
        .wakeup
        .clone();
    let vm: Weak<Mutex<Vm>> = Arc::downgrade(vm);
    std::thread::Builder::new()
        .name("patch-driver".into())
        .spawn(move || loop {
            let Some(vm) = vm.upgrade() else { return };
            let guard = vm.lock().unwrap_or_else(|e| e.into_inner());
            let mut guard = guard;
            if guard.devices.stop_reason().is_some() {
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
        })
        .map(|_| ())
        .map_err(|e| anyhow!("cannot start the patch driver thread: {e}"))
}

/// How often an idle driver looks whether its VM has stopped.
const IDLE_WAKEUP: Duration = Duration::from_secs(1);
