//! vCPU threads and the pause protocol.
//!
//! Each vCPU runs `KVM_RUN` on its own thread. To pause, the controller publishes
//! `Want::Pause`, then signals every vCPU thread. The signal handler sets the thread's
//! `kvm_run.immediate_exit`, so the vCPU leaves (or never enters) the guest even if the
//! signal lands just before `KVM_RUN`. The thread sees the request, captures its
//! registers (only the owning thread may call vCPU ioctls cheaply and safely), reports
//! itself parked, and waits. The controller returns once every vCPU has parked.
//!
//! Each thread also records where it is (inside `KVM_RUN`, or in lpvmm), whether
//! `immediate_exit` was set when it last entered, and how many kicks its handler has
//! handled, so that a pause that times out can say whose the stuck vCPU is: a thread
//! that stays inside `KVM_RUN` with its kick pending or `immediate_exit` set is held by
//! the host kernel (a healthy kernel returns within microseconds); one that entered
//! after handling its kick with `immediate_exit` clear lost the kick in lpvmm, and one
//! stuck in lpvmm is lpvmm's.
//!
//! On resume each thread executes CPUID, a serializing instruction, before re-entering
//! the guest: the VMM may have rewritten guest code while it was parked
//! (cross-modifying code, Intel SDM vol. 3 §8.1.3).

use std::cell::Cell;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use thiserror::Error;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::vstate::reset::VcpuBootState;

use crate::arch::cpu::{self, CpuError};
use crate::devices::{doorbell, Devices, StopReason};
use crate::seccomp::{self, ThreadKind};
use introspection::VcpuState;

/// Offset from SIGRTMIN of the signal that kicks a vCPU out of KVM_RUN.
const KICK_SIGNAL_OFFSET: i32 = 0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Want {
    Run = 0,
    Pause = 1,
    Stop = 2,
}

/// Starting the vCPU threads, or pausing and resuming them.
#[derive(Debug, Error)]
pub enum VcpuError {
    #[error("cannot install the vCPU kick signal handler")]
    KickHandler(#[source] vmm_sys_util::errno::Error),
    #[error("cannot start vCPU thread {index}")]
    SpawnThread {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM is stopping")]
    Stopping,
    #[error("the VM is already paused")]
    AlreadyPaused,
    #[error("the VM is not paused")]
    NotPaused,
    #[error("a vCPU thread exited while pausing")]
    ThreadExited,
    /// Some vCPUs did not park in time (the VM was resumed): where each was.
    #[error(
        "vCPU(s) {:?} did not park within {timeout:?} ({}); the VM was resumed",
        .stuck.iter().map(|s| s.index).collect::<Vec<_>>(),
        .stuck.iter().map(StuckVcpu::to_string).collect::<Vec<_>>().join("; ")
    )]
    NotParked {
        timeout: Duration,
        stuck: Vec<StuckVcpu>,
    },
    /// A vCPU parked, but its thread could not read its registers (the error is shared
    /// with the park that met it).
    #[error("vCPU {index} parked but its registers could not be read")]
    Registers {
        index: usize,
        #[source]
        source: Arc<CpuError>,
    },
    #[error("vCPUs did not leave the paused state within {0:?}")]
    NotResumed(Duration),
}

#[derive(Default)]
struct Shared {
    /// Per vCPU: `Some` while parked, holding the registers captured at park time.
    parked: Vec<Option<Result<VcpuState, Arc<CpuError>>>>,
    exited: usize,
}

/// State shared by the controller and the vCPU threads.
pub struct VcpuControl {
    want: AtomicU8,
    shared: Mutex<Shared>,
    changed: Condvar,
    /// Per vCPU: where its thread is.
    whereabouts: Vec<Whereabouts>,
    /// When a vCPU first entered `KVM_RUN`.
    first_run: OnceLock<Instant>,
    /// Per vCPU: put it back in its boot state when it leaves the park (a reboot).
    reset: Vec<AtomicBool>,
}

/// Where one vCPU thread is: inside `KVM_RUN` or in lpvmm, and how many times it has
/// entered `KVM_RUN`. Written only by the vCPU's own thread, twice per exit, so it holds
/// no time: reading the clock is a system call where the host has no TSC clock source
/// (the nested test host reads its HPET), and it made every exit and every pause slower
/// (docs/benchmarks.md, "Pause and resume latency"). A pause that gives up compares it
/// with what it saw at its kick instead.
#[derive(Default)]
struct Whereabouts {
    in_kvm_run: AtomicBool,
    entries: AtomicU64,
    /// Kick signals this thread has handled (counted by the handler itself).
    kicks: AtomicU64,
    /// At the latest entry into `KVM_RUN`: the kicks handled by then, and whether
    /// `immediate_exit` was set.
    kicks_at_entry: AtomicU64,
    armed_at_entry: AtomicBool,
}

/// One vCPU's [`Whereabouts`] as a pause saw them when it kicked.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Seen {
    in_kvm_run: bool,
    entries: u64,
    kicks: u64,
}

/// Where a vCPU that did not park was, as the pause found it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StuckVcpu {
    pub index: usize,
    pub in_kvm_run: bool,
    /// How long the pause waited after its kick.
    pub waited: Duration,
    /// Whether it had not moved (entered or left `KVM_RUN`) since the kick: it has been
    /// where it is for all of `waited`.
    pub since_before_kick: bool,
    /// Inside `KVM_RUN`, entered after its thread had handled this pause's kick and with
    /// `immediate_exit` clear: lpvmm dropped the kick (its bug, never the host's). The
    /// run loop clears `immediate_exit` only right before it looks at what the
    /// controller wants, which the controller publishes before it kicks, so this is not
    /// expected to happen; the pause says so if it ever does.
    pub lost_kick: bool,
}

impl std::fmt::Display for StuckVcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.waited.as_secs_f64();
        let index = self.index;
        if self.lost_kick {
            return write!(
                f,
                "vCPU {index}: inside KVM_RUN, entered {secs:.1} s ago after it had handled its \
                 kick and cleared immediate_exit: lpvmm lost the kick ({LPVMM_LOST_KICK})"
            );
        }
        match (self.in_kvm_run, self.since_before_kick) {
            (true, true) => write!(
                f,
                "vCPU {index}: inside KVM_RUN for {secs:.1} s although kicked ({HOST_HELD})"
            ),
            (true, false) => write!(
                f,
                "vCPU {index}: inside KVM_RUN, entered after its kick {secs:.1} s ago with the \
                 kick pending or immediate_exit set ({HOST_HELD})"
            ),
            (false, true) => write!(
                f,
                "vCPU {index}: in lpvmm (handling an exit) for {secs:.1} s"
            ),
            (false, false) => write!(
                f,
                "vCPU {index}: in lpvmm (handling an exit), after running since its kick {secs:.1} s ago"
            ),
        }
    }
}

/// How a pause names a vCPU that the host kernel keeps inside `KVM_RUN` despite a pending
/// kick (which a healthy kernel honours within microseconds, and which the thread's
/// `immediate_exit` makes it honour even before entry): the test harness recognises it.
pub const HOST_HELD: &str = "the host kernel did not return it to lpvmm";

/// How a pause names a vCPU whose kick lpvmm itself dropped ([`StuckVcpu::lost_kick`]).
pub const LPVMM_LOST_KICK: &str = "a fault of lpvmm's";

impl VcpuControl {
    fn want(&self) -> Want {
        match self.want.load(Ordering::Acquire) {
            0 => Want::Run,
            1 => Want::Pause,
            _ => Want::Stop,
        }
    }

    /// The vCPU thread `index` is about to enter `KVM_RUN` with `immediate_exit` as
    /// `armed` says.
    fn record_entry(&self, index: usize, armed: bool) {
        if let Some(w) = self.whereabouts.get(index) {
            w.kicks_at_entry
                .store(w.kicks.load(Ordering::Acquire), Ordering::Release);
            w.armed_at_entry.store(armed, Ordering::Release);
        }
        self.record(index, true);
    }

    /// The vCPU thread `index` enters (`true`) or leaves `KVM_RUN`.
    fn record(&self, index: usize, in_kvm_run: bool) {
        if let Some(w) = self.whereabouts.get(index) {
            if in_kvm_run {
                w.entries.fetch_add(1, Ordering::Relaxed);
                // Reads the clock once: later calls find it set.
                self.first_run.get_or_init(Instant::now);
            }
            w.in_kvm_run.store(in_kvm_run, Ordering::Release);
        }
    }

    /// Every vCPU's whereabouts now (a pause takes them as it kicks).
    fn seen(&self) -> Vec<Seen> {
        self.whereabouts
            .iter()
            .map(|w| Seen {
                in_kvm_run: w.in_kvm_run.load(Ordering::Acquire),
                entries: w.entries.load(Ordering::Relaxed),
                kicks: w.kicks.load(Ordering::Acquire),
            })
            .collect()
    }

    /// Where vCPU `index` is now, against `at_kick` (what the pause saw as it kicked,
    /// `waited` ago).
    fn stuck(&self, index: usize, at_kick: Seen, waited: Duration) -> StuckVcpu {
        let now = self.seen().get(index).copied().unwrap_or_default();
        let since_before_kick =
            now.in_kvm_run == at_kick.in_kvm_run && now.entries == at_kick.entries;
        let entry = self.whereabouts.get(index);
        let kick_handled_before_entry =
            entry.is_some_and(|w| w.kicks_at_entry.load(Ordering::Acquire) > at_kick.kicks);
        let armed = entry.is_some_and(|w| w.armed_at_entry.load(Ordering::Acquire));
        StuckVcpu {
            index,
            in_kvm_run: now.in_kvm_run,
            waited,
            since_before_kick,
            lost_kick: now.in_kvm_run && !since_before_kick && kick_handled_before_entry && !armed,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A vCPU thread that panicked must not take the controller down with it.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait up to `left` for a vCPU to report a change.
    fn wait<'a>(&self, guard: MutexGuard<'a, Shared>, left: Duration) -> MutexGuard<'a, Shared> {
        self.changed
            .wait_timeout(guard, left)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }
}

thread_local! {
    /// Points at this thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
    /// Points at this thread's [`Whereabouts::kicks`], which the handler counts up.
    static KICKS: Cell<*const AtomicU64> = const { Cell::new(std::ptr::null()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: const-initialised thread locals, a volatile byte store and an
    // atomic add.
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: set by the vCPU thread to a field of its own mapped kvm_run, which
        // outlives the thread's run loop; only this thread's handler runs here.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
    let kicks = KICKS.with(|c| c.get());
    if !kicks.is_null() {
        // SAFETY: set by the vCPU thread to its own `Whereabouts::kicks`, inside the
        // `VcpuControl` its run loop borrows; cleared before that borrow ends.
        unsafe { (*kicks).fetch_add(1, Ordering::AcqRel) };
    }
    fence(Ordering::SeqCst);
}

/// The vCPU threads of one VM.
pub struct Vcpus {
    control: Arc<VcpuControl>,
    threads: Vec<JoinHandle<()>>,
}

/// Outcome of a pause request.
pub struct Paused {
    pub states: Vec<VcpuState>,
    /// Request → every vCPU parked.
    pub latency: Duration,
}

impl Vcpus {
    /// Start one thread per configured vCPU. They run until `stop`.
    pub fn start(
        fds: Vec<VcpuFd>,
        boot_states: Vec<VcpuBootState>,
        devices: Arc<Devices>,
        seccomp: bool,
    ) -> Result<Self, VcpuError> {
        register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, kick_handler)
            .map_err(VcpuError::KickHandler)?;
        let control = Arc::new(VcpuControl {
            want: AtomicU8::new(Want::Run as u8),
            shared: Mutex::new(Shared {
                parked: vec![None; fds.len()],
                exited: 0,
            }),
            changed: Condvar::new(),
            whereabouts: (0..fds.len()).map(|_| Whereabouts::default()).collect(),
            first_run: OnceLock::new(),
            reset: (0..fds.len()).map(|_| AtomicBool::new(false)).collect(),
        });
        let mut threads = Vec::new();
        for (index, (fd, boot)) in fds.into_iter().zip(boot_states).enumerate() {
            let control = control.clone();
            let devices = devices.clone();
            let vcpu = VcpuThread {
                index,
                fd,
                boot,
                seccomp,
            };
            let t = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || run_vcpu(vcpu, &control, &devices))
                .map_err(|source| VcpuError::SpawnThread { index, source })?;
            threads.push(t);
        }
        Ok(Vcpus { control, threads })
    }

    /// When the first vCPU entered `KVM_RUN`, once one has.
    pub fn first_run(&self) -> Option<Instant> {
        self.control.first_run.get().copied()
    }

    pub fn count(&self) -> usize {
        self.threads.len()
    }

    fn kick_all(&self) {
        for t in &self.threads {
            // A thread that already exited cannot be kicked, and needs no kick.
            let _ = t.kill(SIGRTMIN() + KICK_SIGNAL_OFFSET);
        }
    }

    /// Park every vCPU. Returns their registers once all are parked.
    pub fn pause(&self, timeout: Duration) -> Result<Paused, VcpuError> {
        let start = Instant::now();
        match self.control.want() {
            Want::Stop => return Err(VcpuError::Stopping),
            Want::Pause => return Err(VcpuError::AlreadyPaused),
            Want::Run => {}
        }
        self.control
            .want
            .store(Want::Pause as u8, Ordering::Release);
        let at_kick = self.control.seen();
        self.kick_all();
        let mut shared = self.control.lock();
        loop {
            let all_parked = shared.parked.iter().all(Option::is_some);
            if all_parked {
                break;
            }
            if shared.exited > 0 {
                drop(shared);
                self.resume_inner();
                return Err(VcpuError::ThreadExited);
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                let stuck: Vec<StuckVcpu> = shared
                    .parked
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.is_none())
                    .map(|(i, _)| self.control.stuck(i, at_kick[i], start.elapsed()))
                    .collect();
                drop(shared);
                self.resume_inner();
                return Err(VcpuError::NotParked { timeout, stuck });
            }
            shared = self.control.wait(shared, left);
        }
        let latency = start.elapsed();
        let mut states = Vec::with_capacity(shared.parked.len());
        for (i, p) in shared.parked.iter().enumerate() {
            match p {
                Some(Ok(s)) => states.push(s.clone()),
                Some(Err(e)) => {
                    let source = e.clone();
                    drop(shared);
                    self.resume_inner();
                    return Err(VcpuError::Registers { index: i, source });
                }
                None => unreachable!("checked above that every vCPU parked"),
            }
        }
        Ok(Paused { states, latency })
    }

    /// Let every parked vCPU run again. Returns how long until all had left the park.
    pub fn resume(&self, timeout: Duration) -> Result<Duration, VcpuError> {
        if self.control.want() != Want::Pause {
            return Err(VcpuError::NotPaused);
        }
        let start = Instant::now();
        self.resume_inner();
        let mut shared = self.control.lock();
        while shared.parked.iter().any(Option::is_some) {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(VcpuError::NotResumed(timeout));
            }
            shared = self.control.wait(shared, left);
        }
        Ok(start.elapsed())
    }

    /// Have every vCPU, parked now, put itself back in its boot state as it leaves the
    /// park (a guest reboot, vstate/reset.rs).
    pub fn reset_on_resume(&self) {
        for flag in &self.control.reset {
            flag.store(true, Ordering::Release);
        }
    }

    fn resume_inner(&self) {
        let _shared = self.control.lock();
        self.control.want.store(Want::Run as u8, Ordering::Release);
        self.control.changed.notify_all();
    }

    /// Stop every vCPU thread and wait for them.
    pub fn stop(&mut self) {
        {
            let _shared = self.control.lock();
            self.control.want.store(Want::Stop as u8, Ordering::Release);
            self.control.changed.notify_all();
        }
        self.kick_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// This vCPU thread's seccomp filter, before it first enters the guest.
fn lock_down(seccomp: bool) -> Result<(), StopReason> {
    if !seccomp {
        seccomp::selftest_without_filter(ThreadKind::Vcpu);
        return Ok(());
    }
    seccomp::install(ThreadKind::Vcpu).map_err(|e| StopReason::Fatal(e.to_string()))
}

/// What a vCPU thread owns.
struct VcpuThread {
    index: usize,
    fd: VcpuFd,
    /// What a reboot puts back.
    boot: VcpuBootState,
    seccomp: bool,
}

fn run_vcpu(mut vcpu: VcpuThread, control: &VcpuControl, devices: &Devices) {
    let index = vcpu.index;
    let immediate_exit: *mut u8 = &mut vcpu.fd.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
    if let Some(w) = control.whereabouts.get(index) {
        KICKS.with(|c| c.set(&w.kicks));
    }

    let reason = match lock_down(vcpu.seccomp) {
        Err(reason) => Some(reason),
        Ok(()) => run_loop(&mut vcpu, control, devices),
    };

    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    KICKS.with(|c| c.set(std::ptr::null()));
    let mut shared = control.lock();
    shared.exited += 1;
    control.changed.notify_all();
    drop(shared);
    if let Some(reason) = reason {
        devices.request_stop(reason);
    }
}

/// Run the guest until told to stop (`None`) or the VM must end.
fn run_loop(vcpu: &mut VcpuThread, control: &VcpuControl, devices: &Devices) -> Option<StopReason> {
    let (index, fd) = (vcpu.index, &mut vcpu.fd);
    loop {
        match control.want() {
            Want::Run => {}
            Want::Stop => break None,
            Want::Pause => {
                if let Err(reason) = complete_pending_exit(index, fd, control, devices) {
                    break Some(reason);
                }
                if park(index, fd, control) == Want::Stop {
                    break None;
                }
                if control.reset[index].swap(false, Ordering::AcqRel) {
                    if let Err(e) = vcpu.boot.restore(fd) {
                        break Some(StopReason::Fatal(crate::error_line(&e)));
                    }
                }
                serialize_instruction_stream();
                fd.set_kvm_immediate_exit(0);
                continue;
            }
        }
        match run_once(index, fd, control, devices) {
            Step::Continue => {}
            Step::Interrupted => fd.set_kvm_immediate_exit(0),
            // The VM restarts the guest: this vCPU runs no more guest code until the
            // main thread has paused the VM for the reset.
            Step::Stop(reason) if devices.restarts(&reason) => {
                devices.request_stop(reason);
                wait_while_running(control);
            }
            Step::Stop(reason) => break Some(reason),
        }
    }
}

/// Wait until the controller wants something other than running (a pause, a stop).
fn wait_while_running(control: &VcpuControl) {
    let mut shared = control.lock();
    while control.want() == Want::Run {
        shared = control.wait(shared, Duration::from_millis(10));
    }
}

/// Finish the instruction behind the last exit before anything looks at this vCPU.
///
/// After an I/O or MMIO exit the instruction is only complete (registers written back,
/// RIP advanced) once userspace re-enters KVM_RUN; until then the vCPU's state is not
/// consistent, and reading it or parking there corrupted guests (seen as triple faults
/// under pause/resume load). Re-entering with `immediate_exit` set completes pending
/// work and returns EINTR without running any guest instruction. A string I/O
/// instruction may need several rounds, hence the bounded loop.
fn complete_pending_exit(
    index: usize,
    fd: &mut VcpuFd,
    control: &VcpuControl,
    devices: &Devices,
) -> Result<(), StopReason> {
    for _ in 0..MAX_COMPLETION_ROUNDS {
        fd.set_kvm_immediate_exit(1);
        match run_once(index, fd, control, devices) {
            Step::Interrupted => return Ok(()),
            Step::Continue => {}
            Step::Stop(reason) => return Err(reason),
        }
    }
    Err(StopReason::Fatal(format!(
        "vCPU {index}: still exiting after {MAX_COMPLETION_ROUNDS} completion rounds"
    )))
}

const MAX_COMPLETION_ROUNDS: usize = 4096;

/// Park until told to run or stop. Returns what ended the park.
fn park(index: usize, fd: &VcpuFd, control: &VcpuControl) -> Want {
    let state = cpu::capture_state(fd, index).map_err(Arc::new);
    let mut shared = control.lock();
    shared.parked[index] = Some(state);
    control.changed.notify_all();
    while control.want() == Want::Pause {
        shared = control
            .changed
            .wait(shared)
            .unwrap_or_else(|e| e.into_inner());
    }
    shared.parked[index] = None;
    control.changed.notify_all();
    control.want()
}

/// What one KVM_RUN came back with.
enum Step {
    /// An exit was handled; the guest may run on.
    Continue,
    /// KVM_RUN returned EINTR/EAGAIN: a kick (signal or `immediate_exit`), nothing to do.
    Interrupted,
    /// The VM must end.
    Stop(StopReason),
}

fn run_once(index: usize, fd: &mut VcpuFd, control: &VcpuControl, devices: &Devices) -> Step {
    let immediate_exit: *const u8 = &fd.get_kvm_run().immediate_exit;
    // SAFETY: a field of this thread's own mapped kvm_run; the kick handler may store to
    // it at any time, hence the volatile read.
    let armed = unsafe { std::ptr::read_volatile(immediate_exit) } != 0;
    control.record_entry(index, armed);
    let ran = fd.run();
    control.record(index, false);
    if matches!(ran, Ok(VcpuExit::IoOut(p, _)) if p == doorbell::PORT) {
        return ring_doorbell(index, fd, devices);
    }
    match ran {
        // A triple fault needs the vCPU for its report, so it is handled outside
        // `handle_exit`, which only sees the exit.
        Ok(VcpuExit::Shutdown) => Step::Stop(triple_fault(index, fd, devices)),
        Ok(exit) => match handle_exit(index, exit, devices) {
            Some(reason) => Step::Stop(reason),
            None => Step::Continue,
        },
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Interrupted,
        Err(e) => Step::Stop(StopReason::Fatal(format!(
            "vCPU {index}: KVM_RUN failed: {e}"
        ))),
    }
}

/// The module notifier's stub rang (devices/doorbell.rs): read what it carries, write
/// the answer into its registers. Never waits for the engine.
fn ring_doorbell(index: usize, fd: &mut VcpuFd, devices: &Devices) -> Step {
    let mut regs = match fd.get_regs() {
        Ok(r) => r,
        Err(e) => {
            return Step::Stop(StopReason::Fatal(format!(
                "vCPU {index}: reading registers at the doorbell: {e}"
            )))
        }
    };
    let ring = patcher::notifier::Ring {
        rip: regs.rip,
        token: regs.rdi,
        module: regs.rsi,
        action: regs.rcx,
        result: (regs.r9 == 1).then_some(regs.r8 as i64),
    };
    let Some(answer) = devices.doorbell.ring(ring) else {
        return Step::Continue;
    };
    [regs.rax, regs.rdi, regs.rsi] = answer.registers();
    match fd.set_regs(&regs) {
        Ok(()) => Step::Continue,
        Err(e) => Step::Stop(StopReason::Fatal(format!(
            "vCPU {index}: answering the doorbell: {e}"
        ))),
    }
}

/// A triple fault resets the guest: say where, it is the only clue to what went wrong.
fn triple_fault(index: usize, fd: &VcpuFd, devices: &Devices) -> StopReason {
    let at = match cpu::capture_state(fd, index) {
        Ok(s) => format!(
            "triple fault on vCPU {index} at rip {:#x} rsp {:#x} cr3 {:#x} cs {:#x}",
            s.rip, s.rsp, s.cr3, s.cs
        ),
        Err(_) => format!("triple fault on vCPU {index}"),
    };
    devices.guest_triple_fault(&at)
}

/// CPUID is architecturally serializing: after it, this CPU fetches guest code afresh.
fn serialize_instruction_stream() {
    std::arch::x86_64::__cpuid(0);
}

fn handle_exit(index: usize, exit: VcpuExit, devices: &Devices) -> Option<StopReason> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            devices.pio_read(port, data);
            None
        }
        VcpuExit::IoOut(port, data) => devices.pio_write(port, data),
        VcpuExit::MmioRead(addr, data) => {
            devices.mmio_read(addr, data);
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            devices.mmio_write(addr, data);
            None
        }
        VcpuExit::Hlt => None,
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Some(StopReason::Poweroff),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Some(devices.guest_reset("KVM reset event")),
            other => Some(StopReason::Fatal(format!(
                "vCPU {index}: unexpected KVM system event {other}"
            ))),
        },
        VcpuExit::FailEntry(reason, cpu) => Some(StopReason::Fatal(format!(
            "vCPU {index}: KVM could not enter the guest (hardware reason {reason:#x} on host CPU {cpu})"
        ))),
        VcpuExit::InternalError => Some(StopReason::Fatal(format!(
            "vCPU {index}: KVM internal error (often an emulation failure: this /dev/kvm may \
             not be backed by hardware virtualization)"
        ))),
        other => Some(StopReason::Fatal(format!(
            "vCPU {index}: unhandled VM exit {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(vcpus: usize) -> VcpuControl {
        VcpuControl {
            want: AtomicU8::new(Want::Run as u8),
            shared: Mutex::new(Shared::default()),
            changed: Condvar::new(),
            whereabouts: (0..vcpus).map(|_| Whereabouts::default()).collect(),
            first_run: OnceLock::new(),
            reset: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    #[test]
    fn a_vcpu_that_does_not_park_is_named_with_where_it_is() {
        let c = control(3);
        c.record(0, true);
        c.record(0, false);
        c.record(1, true);
        c.record(2, true);
        c.record(2, false);
        let at_kick = c.seen();
        let waited = Duration::from_millis(5000);
        c.record(0, true); // entered again after the kick
        c.record(2, true); // ran after the kick, then came out
        c.record(2, false);

        let entered_after = c.stuck(0, at_kick[0], waited);
        assert!(entered_after.in_kvm_run && !entered_after.since_before_kick);
        let text = entered_after.to_string();
        assert!(
            text.contains(HOST_HELD) && text.contains("entered after its kick 5.0 s ago"),
            "{text}"
        );

        let held = c.stuck(1, at_kick[1], waited);
        assert!(held.in_kvm_run && held.since_before_kick);
        let text = held.to_string();
        assert!(
            text.contains("inside KVM_RUN for 5.0 s although kicked") && text.contains(HOST_HELD),
            "{text}"
        );

        let in_lpvmm = c.stuck(2, at_kick[2], waited);
        assert!(!in_lpvmm.in_kvm_run && !in_lpvmm.since_before_kick);
        let text = in_lpvmm.to_string();
        assert!(
            text.starts_with("vCPU 2: in lpvmm") && !text.contains(HOST_HELD),
            "{text}"
        );

        let c = control(1);
        c.record(0, true);
        c.record(0, false);
        let long_in_lpvmm = c.stuck(0, c.seen()[0], waited);
        assert!(long_in_lpvmm.since_before_kick);
        assert_eq!(
            long_in_lpvmm.to_string(),
            "vCPU 0: in lpvmm (handling an exit) for 5.0 s"
        );
    }

    /// A vCPU that entered `KVM_RUN` after handling its kick is held by the host only if
    /// it entered with `immediate_exit` set; with it clear, lpvmm dropped the kick.
    #[test]
    fn a_kick_lpvmm_dropped_is_lpvmms_never_the_hosts() {
        let waited = Duration::from_millis(5000);
        for armed in [false, true] {
            let c = control(1);
            c.record(0, true);
            c.record(0, false);
            let at_kick = c.seen()[0];
            // The handler ran (the thread left KVM_RUN with EINTR), then the thread went in
            // again.
            c.whereabouts[0].kicks.fetch_add(1, Ordering::AcqRel);
            c.record_entry(0, armed);
            let stuck = c.stuck(0, at_kick, waited);
            let text = stuck.to_string();
            assert_eq!(stuck.lost_kick, !armed, "{text}");
            assert_eq!(text.contains(HOST_HELD), armed, "{text}");
            assert_eq!(text.contains(LPVMM_LOST_KICK), !armed, "{text}");
        }
        // The kick not yet handled when it entered: the signal was pending in KVM_RUN,
        // which a healthy host kernel answers at once.
        let c = control(1);
        let at_kick = c.seen()[0];
        c.record_entry(0, false);
        let stuck = c.stuck(0, at_kick, waited);
        assert!(!stuck.lost_kick && stuck.to_string().contains(HOST_HELD));
    }

    /// The words docs/running-vms.md shows and tests/src/host.rs reads back.
    #[test]
    fn a_pause_that_times_out_names_each_stuck_vcpu() {
        let held = StuckVcpu {
            index: 1,
            in_kvm_run: true,
            waited: Duration::from_millis(5000),
            since_before_kick: true,
            lost_kick: false,
        };
        let e = VcpuError::NotParked {
            timeout: Duration::from_secs(5),
            stuck: vec![held],
        };
        assert_eq!(
            e.to_string(),
            format!(
                "vCPU(s) [1] did not park within 5s (vCPU 1: inside KVM_RUN for 5.0 s although \
                 kicked ({HOST_HELD})); the VM was resumed"
            )
        );
        let e = VcpuError::Registers {
            index: 0,
            source: Arc::new(CpuError::GetRegs(kvm_ioctls::Error::new(libc::EBADF))),
        };
        let cause = std::error::Error::source(&e).map(|c| c.to_string());
        assert_eq!(
            (e.to_string().as_str(), cause.as_deref()),
            (
                "vCPU 0 parked but its registers could not be read",
                Some("KVM_GET_REGS")
            )
        );
    }

    #[test]
    fn the_first_entry_into_kvm_run_is_the_one_remembered() {
        let c = control(2);
        assert!(c.first_run.get().is_none());
        c.record(1, true);
        let first = *c.first_run.get().expect("set by the first entry");
        std::thread::sleep(Duration::from_millis(2));
        c.record(0, true);
        c.record(1, false);
        assert_eq!(c.first_run.get(), Some(&first));
    }
}
