//! Every task of a paused guest: processes from `init_task.tasks`, their threads from
//! `signal->thread_head`, and each CPU's idle task from its runqueue (idle tasks have
//! pid 0 and are on no list). Which task each vCPU is running comes from the per-CPU
//! `current_task`, the CPU of a vCPU from its GS base.
//!
//! Lists live in guest memory and are hostile: every walk is bounded and detects cycles.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::guest::{PausedGuest, VcpuState};
use crate::kernel::Kernel;
use crate::memory::{KernelMemory, MemError};

/// More tasks than a guest may have for lpvmm (pid_max is 4M, but a walk this long is a
/// corrupted list, and every task costs a pause).
pub const MAX_TASKS: usize = 1 << 17;
/// NR_CPUS of distribution kernels.
const MAX_CPUS: u64 = 8192;
/// PF_KTHREAD (include/linux/sched.h), a flag value, stable since 2.6.
const PF_KTHREAD: u64 = 0x0020_0000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TaskError {
    #[error("task list is corrupt: {0}")]
    Corrupt(String),
    #[error("more than {MAX_TASKS} tasks (or a corrupt list)")]
    TooMany,
    #[error(transparent)]
    Mem(#[from] MemError),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Address of the task_struct.
    pub addr: u64,
    pub pid: i32,
    pub tgid: i32,
    pub comm: String,
    /// The letter `ps` shows: R S D T t X Z P I.
    pub state: char,
    pub kthread: bool,
    /// Per-CPU idle task (pid 0).
    pub idle: bool,
    /// The CPU the task last ran on.
    pub cpu: u32,
    /// `task->on_cpu`: running, or being switched to or from.
    pub on_cpu: bool,
    /// The vCPU on which this task is `current` at the pause.
    pub vcpu: Option<usize>,
    /// How many times the task was switched out (`nvcsw + nivcsw`): a task that ran
    /// since an earlier read shows a higher count.
    #[serde(default)]
    pub switches: u64,
    /// `thread.sp`, the stack pointer saved at its last switch out.
    #[serde(default)]
    pub saved_sp: u64,
}

/// What one vCPU was doing when it parked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuTask {
    pub vcpu: usize,
    /// The guest's CPU number, from the vCPU's GS base.
    pub cpu: Option<u32>,
    /// `current` of that CPU.
    pub task: Option<u64>,
    pub pid: Option<i32>,
    pub comm: Option<String>,
    pub user_mode: bool,
    pub rip: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskList {
    pub tasks: Vec<Task>,
    pub vcpus: Vec<VcpuTask>,
}

impl TaskList {
    pub fn by_pid(&self, pid: i32) -> Option<&Task> {
        self.tasks.iter().find(|t| t.pid == pid && !t.idle)
    }
}

/// What tells whether the task list changed between two looks at it. Every change to
/// the list happens with `tasklist_lock` held for writing, in the same critical section
/// as a change of these counters: `copy_process` links a new task and increments
/// `nr_threads` and `total_forks`, `__unhash_process` unlinks one and decrements
/// `nr_threads` (the one other writer, `de_thread`, puts the exec'ing thread in its
/// leader's place on `init_task.tasks`, which leaves the set of tasks the same). So if a
/// stamp read *before* a walk of the running guest equals one read in a later pause,
/// no fork or exit completed after the walk began and none is under way: the walk's
/// list of task addresses is the pause's. (`total_forks` only grows; `nr_threads` only
/// falls without a fork.)
///
/// A stamp is only taken where no writer holds the lock *after* the counters were read
/// ([`TaskReader::list_stamp`]), in the running guest as in the pause. The critical
/// section writes counters and list in no fixed order (`__unhash_process` decrements
/// `nr_threads` before it unlinks the task), so counters read in the middle of an exit
/// can already be the final ones while the list is not: a walk that followed would
/// still find the exiting task, and a pause after the exit would read the same stamp.
/// A lock seen free after the counters means every section that began before has ended,
/// and its list writes are seen by the walk that follows (x86 orders a CPU's stores,
/// and the unlock is the section's last); a section that begins later changes the
/// counters after they were read, and the pause's stamp differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListStamp {
    pub forks: u64,
    pub threads: u32,
}

/// The writer's byte of a queued rwlock's `cnts` (`_QW_LOCKED`, include/asm-generic/
/// qrwlock.h, the same since 4.x): non-zero while a writer holds the lock. `cnts` is
/// the first word of `rwlock_t` without lock debugging, as distribution kernels build.
const QRW_WRITER_LOCKED: u32 = 0xff;

/// `ps`'s state letter from `__state` and `exit_state` (TASK_* values of
/// include/linux/sched.h, unchanged from 4.14 to 6.12 for these bits).
pub fn state_letter(state: u64, exit_state: u64) -> char {
    const INTERRUPTIBLE: u64 = 0x1;
    const UNINTERRUPTIBLE: u64 = 0x2;
    const STOPPED: u64 = 0x4;
    const TRACED: u64 = 0x8;
    const EXIT_DEAD: u64 = 0x10;
    const EXIT_ZOMBIE: u64 = 0x20;
    const PARKED: u64 = 0x40;
    const NOLOAD: u64 = 0x400;
    if exit_state & EXIT_ZOMBIE != 0 {
        return 'Z';
    }
    if exit_state & EXIT_DEAD != 0 {
        return 'X';
    }
    match state {
        0 => 'R',
        s if s & UNINTERRUPTIBLE != 0 && s & NOLOAD != 0 => 'I',
        s if s & INTERRUPTIBLE != 0 => 'S',
        s if s & UNINTERRUPTIBLE != 0 => 'D',
        s if s & STOPPED != 0 => 'T',
        s if s & TRACED != 0 => 't',
        s if s & PARKED != 0 => 'P',
        _ => '?',
    }
}

/// Fields closer than this share one read of a task_struct.
const SPAN_GAP: u64 = 64;
/// Room for every field [`TaskReader::task`] decodes with the gaps between them (eleven
/// fields of at most 64 bytes each, gaps of at most [`SPAN_GAP`]).
const SPAN_BYTES: usize = 2048;

/// One read of a task_struct: `len` bytes from offset `start`, kept at `at` in the
/// buffer of one task's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    start: u64,
    len: usize,
    at: usize,
}

/// The parts of a task_struct that [`TaskReader::task`] decodes, as few reads as the
/// field offsets allow (each read is a page-table look-up and a copy; a list of
/// thousands of tasks is read in a pause). The span with the switch counts comes first:
/// a reader that reads a task twice around other reads (the patcher's early checks)
/// relies on a switch in between showing in them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TaskSpans(Vec<Span>);

impl TaskSpans {
    fn of(l: &crate::layout::TaskLayout) -> TaskSpans {
        let mut fields = [
            (l.nvcsw, 8),
            (l.nivcsw, 8),
            (l.flags, 4),
            (l.pid, 4),
            (l.tgid, 4),
            (l.comm, l.comm_len.clamp(1, 64)),
            (l.state, l.state_size.clamp(1, 8)),
            (l.exit_state, 4),
            (l.cpu, 4),
            (l.on_cpu, 4),
            (l.thread_sp, 8),
        ];
        fields.sort_unstable();
        let mut spans: Vec<(u64, u64)> = Vec::new();
        for (off, size) in fields {
            match spans.last_mut() {
                Some((start, end)) if off <= end.saturating_add(SPAN_GAP) => {
                    *end = (*end).max(off.saturating_add(size));
                }
                _ => spans.push((off, off.saturating_add(size))),
            }
        }
        // The switch counts' span first.
        if let Some(i) = spans.iter().position(|&(a, b)| (a..b).contains(&l.nvcsw)) {
            spans[..=i].rotate_right(1);
        }
        let mut at = 0;
        TaskSpans(
            spans
                .into_iter()
                .map(|(start, end)| {
                    let len = (end - start) as usize;
                    let s = Span { start, len, at };
                    at += len;
                    s
                })
                .collect(),
        )
    }

    fn total(&self) -> usize {
        self.0.iter().map(|s| s.len).sum()
    }
}

/// One task's fields as read, by task_struct offset.
struct TaskBytes<'s> {
    spans: &'s [Span],
    buf: &'s [u8],
}

impl TaskBytes<'_> {
    fn bytes(&self, off: u64, len: usize) -> &[u8] {
        let s = self
            .spans
            .iter()
            .find(|s| off >= s.start && off + len as u64 <= s.start + s.len as u64)
            .expect("every decoded field lies in a span");
        let from = s.at + (off - s.start) as usize;
        &self.buf[from..from + len]
    }

    fn uint(&self, off: u64, size: u64) -> u64 {
        let mut b = [0u8; 8];
        let n = size.clamp(1, 8) as usize;
        b[..n].copy_from_slice(self.bytes(off, n));
        u64::from_le_bytes(b)
    }

    fn u32(&self, off: u64) -> u32 {
        self.uint(off, 4) as u32
    }

    fn u64(&self, off: u64) -> u64 {
        self.uint(off, 8)
    }

    /// A NUL-terminated string in a fixed array; invalid UTF-8 is replaced.
    fn fixed_str(&self, off: u64, max: u64) -> String {
        let raw = self.bytes(off, max.clamp(1, 64) as usize);
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        String::from_utf8_lossy(&raw[..end]).into_owned()
    }
}

/// One pass over the tasks of a paused guest.
pub struct TaskReader<'k, 'g> {
    pub kernel: &'k Kernel,
    /// The parked vCPUs (for the tasks on them) and their memory.
    pub guest: &'g dyn PausedGuest,
    pub mem: KernelMemory<'g>,
    spans: TaskSpans,
}

impl<'k, 'g> TaskReader<'k, 'g> {
    pub fn new(kernel: &'k Kernel, guest: &'g dyn PausedGuest) -> Self {
        TaskReader {
            kernel,
            guest,
            mem: kernel.memory(guest),
            spans: TaskSpans::of(&kernel.layout.task),
        }
    }

    /// Follow a `list_head` ring from `head` (not included) back to `head`.
    fn walk(
        &self,
        head: u64,
        seen: &mut HashSet<u64>,
        budget: &mut usize,
    ) -> Result<Vec<u64>, TaskError> {
        let next_off = self.kernel.layout.list_next;
        let mut nodes = Vec::new();
        let mut node = self.mem.u64(head.wrapping_add(next_off))?;
        while node != head {
            if !seen.insert(node) {
                return Err(TaskError::Corrupt(format!(
                    "list node {node:#x} reached twice (cycle)"
                )));
            }
            *budget = budget.checked_sub(1).ok_or(TaskError::TooMany)?;
            nodes.push(node);
            node = self.mem.u64(node.wrapping_add(next_off))?;
        }
        Ok(nodes)
    }

    /// Read one task_struct.
    pub fn task(&self, addr: u64) -> Result<Task, TaskError> {
        let l = &self.kernel.layout.task;
        let mut buf = [0u8; SPAN_BYTES];
        let spans = &self.spans.0;
        if self.spans.total() > SPAN_BYTES {
            return Err(TaskError::Corrupt(
                "task_struct fields too far apart".into(),
            ));
        }
        for s in spans {
            self.mem
                .read(addr.wrapping_add(s.start), &mut buf[s.at..s.at + s.len])?;
        }
        let b = TaskBytes { spans, buf: &buf };
        let flags = b.u32(l.flags);
        Ok(Task {
            addr,
            pid: b.u32(l.pid) as i32,
            tgid: b.u32(l.tgid) as i32,
            comm: b.fixed_str(l.comm, l.comm_len),
            state: state_letter(
                b.uint(l.state, l.state_size),
                u64::from(b.u32(l.exit_state)),
            ),
            kthread: u64::from(flags) & PF_KTHREAD != 0,
            idle: false,
            cpu: b.u32(l.cpu),
            on_cpu: b.u32(l.on_cpu) != 0,
            vcpu: None,
            switches: b.u64(l.nvcsw).wrapping_add(b.u64(l.nivcsw)),
            saved_sp: b.u64(l.thread_sp),
        })
    }

    /// Number of CPUs the guest set up, bounded.
    fn cpu_count(&self) -> Result<u64, TaskError> {
        let vcpus = self.guest.vcpu_count() as u64;
        match self.kernel.addrs.nr_cpu_ids {
            Some(a) => {
                let n = u64::from(self.mem.u32(a)?);
                if n == 0 || n > MAX_CPUS {
                    return Err(TaskError::Corrupt(format!("nr_cpu_ids = {n}")));
                }
                Ok(n)
            }
            None => Ok(vcpus.max(1)),
        }
    }

    /// The per-CPU area base of `cpu`.
    pub fn percpu_base(&self, cpu: u64) -> Result<u64, TaskError> {
        Ok(self
            .mem
            .u64(self.kernel.addrs.per_cpu_offset.wrapping_add(8 * cpu))?) // arch: unsigned long __per_cpu_offset[]
    }

    /// Address of the per-CPU `current_task` of the CPU whose area starts at `base`.
    fn current_slot(&self, base: u64) -> u64 {
        base.wrapping_add(self.kernel.current_task_offset().unwrap_or(0))
    }

    /// The IRQ stack of the CPU whose area starts at `base`, as [low, high).
    pub fn irq_stack(&self, base: u64) -> Option<(u64, u64)> {
        let a = &self.kernel.addrs;
        let slot = match (
            a.hardirq_stack_ptr,
            a.pcpu_hot,
            &self.kernel.layout.pcpu_hot,
        ) {
            (_, Some(hot), Some(l)) => base.wrapping_add(hot.wrapping_add(l.hardirq_stack_ptr)),
            (Some(p), _, _) => base.wrapping_add(p),
            _ => return None,
        };
        // hardirq_stack_ptr points at the last word of the stack (irq_init_percpu_irqstack:
        // `va + IRQ_STACK_SIZE - 8`); IRQ_STACK_SIZE equals THREAD_SIZE on x86-64.
        let top = self.mem.u64(slot).ok()?.wrapping_add(8); // arch: the last word of the stack
        Some((top.wrapping_sub(self.kernel.thread_size), top))
    }

    /// Per-CPU area bases of the guest's CPUs.
    pub fn percpu_bases(&self) -> Result<Vec<u64>, TaskError> {
        (0..self.cpu_count()?)
            .map(|c| self.percpu_base(c))
            .collect()
    }

    /// The guest CPU a vCPU runs as, from its GS base. In the kernel GS holds the per-CPU
    /// base and in user mode KERNEL_GS_BASE does (swapgs swaps them); for a few
    /// instructions around kernel entry and exit it is the other way round.
    pub fn cpu_of(bases: &[u64], v: &VcpuState) -> Option<usize> {
        let order = if v.cpl() == 3 {
            [v.kernel_gs_base, v.gs_base]
        } else {
            [v.gs_base, v.kernel_gs_base]
        };
        order
            .iter()
            .find_map(|gs| bases.iter().position(|b| b == gs && *gs != 0))
    }

    /// The per-CPU base of the CPU a vCPU runs as.
    pub fn percpu_base_of(&self, v: &VcpuState) -> Option<u64> {
        let bases = self.percpu_bases().ok()?;
        Self::cpu_of(&bases, v).map(|c| bases[c])
    }

    /// Map each vCPU to its guest CPU and current task.
    pub fn vcpus(&self, bases: &[u64]) -> Result<Vec<VcpuTask>, TaskError> {
        let guest = self.guest;
        let mut out = Vec::new();
        for i in 0..guest.vcpu_count() {
            let Ok(v) = guest.vcpu(i) else { continue };
            let cpu = Self::cpu_of(bases, v);
            let task = match cpu {
                Some(c) => Some(self.mem.u64(self.current_slot(bases[c]))?),
                None => None,
            };
            out.push(VcpuTask {
                vcpu: i,
                cpu: cpu.map(|c| c as u32),
                task,
                pid: None,
                comm: None,
                user_mode: v.cpl() == 3,
                rip: v.rip,
            });
        }
        Ok(out)
    }

    /// The task list's stamp now (see [`ListStamp`]): `None` where it cannot be told, for
    /// a kernel without the counters' symbols, or while a writer holds `tasklist_lock`
    /// (a fork or exit may be half made).
    pub fn list_stamp(&self) -> Result<Option<ListStamp>, TaskError> {
        let a = &self.kernel.addrs;
        let (Some(forks), Some(threads), Some(lock)) =
            (a.total_forks, a.nr_threads, a.tasklist_lock)
        else {
            return Ok(None);
        };
        let stamp = ListStamp {
            forks: self.mem.u64(forks)?, // kernel/fork.c: unsigned long total_forks
            threads: self.mem.u32(threads)?, // kernel/fork.c: int nr_threads
        };
        // The lock word strictly after the counters, and before any read of the list.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if self.mem.u32(lock)? & QRW_WRITER_LOCKED != 0 {
            return Ok(None);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(Some(stamp))
    }

    /// Whether the task list read from a running guest after `then` was taken is the
    /// list of this (paused) guest: its stamp now is `then` (see [`ListStamp`]).
    /// `false` whenever it cannot be told.
    pub fn list_unchanged_since(&self, then: ListStamp) -> bool {
        matches!(self.list_stamp(), Ok(Some(now)) if now == then)
    }

    /// Every task, and what each vCPU runs.
    pub fn list(&self) -> Result<TaskList, TaskError> {
        self.list_of(&self.addresses()?)
    }

    /// The address of every task on the lists, in list order: processes from
    /// `init_task.tasks`, each followed by its threads (idle tasks other than
    /// `init_task` are on no list: [`TaskReader::list_of`] adds them).
    pub fn addresses(&self) -> Result<Vec<u64>, TaskError> {
        let k = self.kernel;
        let l = &k.layout;
        let mut seen = HashSet::new();
        let mut budget = MAX_TASKS;
        let mut addrs = vec![k.addrs.init_task];
        seen.insert(k.addrs.init_task);
        let mut leaders = vec![k.addrs.init_task];
        for node in self.walk(
            k.addrs.init_task.wrapping_add(l.task.tasks),
            &mut HashSet::new(),
            &mut budget,
        )? {
            leaders.push(node.wrapping_sub(l.task.tasks));
        }
        for &leader in &leaders {
            let signal = self.mem.u64(leader.wrapping_add(l.task.signal))?;
            if signal == 0 {
                if seen.insert(leader) {
                    addrs.push(leader);
                }
                continue;
            }
            let head = signal.wrapping_add(l.signal_thread_head);
            let mut members = HashSet::new();
            let threads = self.walk(head, &mut members, &mut budget)?;
            if !threads
                .iter()
                .any(|&n| n.wrapping_sub(l.task.thread_node) == leader)
                && seen.insert(leader)
            {
                addrs.push(leader);
            }
            for node in threads {
                let t = node.wrapping_sub(l.task.thread_node);
                if seen.insert(t) {
                    addrs.push(t);
                }
            }
        }
        Ok(addrs)
    }

    /// The tasks at `addrs` (from [`TaskReader::addresses`], of this guest or of an
    /// earlier look at it that a stamp confirmed), each CPU's idle task, and what each
    /// vCPU runs: every field read now.
    pub fn list_of(&self, addrs: &[u64]) -> Result<TaskList, TaskError> {
        let k = self.kernel;
        let l = &k.layout;
        if addrs.len() > MAX_TASKS {
            return Err(TaskError::TooMany);
        }
        let mut tasks = Vec::with_capacity(addrs.len());
        for &a in addrs {
            tasks.push(self.task(a)?);
        }
        // Idle tasks of the other CPUs (CPU 0's is init_task, already listed).
        let mut listed = addrs.to_vec();
        listed.sort_unstable();
        let mut idles = HashSet::new();
        let bases = self.percpu_bases()?;
        for &base in &bases {
            let idle = self
                .mem
                .u64(base.wrapping_add(k.addrs.runqueues.wrapping_add(l.rq_idle)))?;
            if idle != 0 && listed.binary_search(&idle).is_err() && idles.insert(idle) {
                tasks.push(self.task(idle)?);
            }
        }
        for t in tasks.iter_mut() {
            t.idle = t.pid == 0;
        }
        let vcpus = self.assign_vcpus(&mut tasks, &bases)?;
        Ok(TaskList { tasks, vcpus })
    }

    /// The tasks of `earlier` as they are in this paused guest, and what each vCPU runs.
    /// `earlier` must be a list of this guest, read while it ran, for which
    /// [`TaskReader::list_unchanged_since`] holds with the stamp read before that list's
    /// walk began: the same tasks are alive now.
    ///
    /// A task that has not run since it was read keeps what was read then, and only its
    /// switch count is read now. That is exact: a task that is switched in becomes `curr`
    /// of its CPU's runqueue before it runs, and stays `curr` until the next switch on
    /// that CPU, which adds one to its count. So a task that was off every CPU then, is
    /// `curr` (or `current`) of no CPU now and has the same count has not run in
    /// between: its saved stack pointer, stack and CPU state are the same. Every other
    /// task is read again. Three fields of a task that did not run may still have
    /// changed, and are kept as read then: its state letter (a sleeper woken, not yet
    /// run), its CPU (a woken task is put on a CPU's queue before it runs, and the load
    /// balancer moves tasks that wait) and its name (written through /proc by another
    /// task). Nothing lpvmm decides depends on them.
    pub fn refresh(&self, earlier: TaskList) -> Result<Refreshed, TaskError> {
        let k = self.kernel;
        if earlier.tasks.len() > MAX_TASKS {
            return Err(TaskError::TooMany);
        }
        let bases = self.percpu_bases()?;
        let mut running = Vec::with_capacity(2 * bases.len());
        for &base in &bases {
            running.push(self.mem.u64(self.current_slot(base))?);
            running.push(
                self.mem
                    .u64(base.wrapping_add(k.addrs.runqueues.wrapping_add(k.layout.rq_curr)))?,
            );
        }
        running.sort_unstable();
        let mut tasks = earlier.tasks;
        let now = LivenessFields::of(&k.layout.task).read_all(&self.mem, &tasks)?;
        let mut reread = 0;
        for (t, now) in tasks.iter_mut().zip(now) {
            // `on_cpu` read now as well as early: an early read is several reads of a
            // running guest, so its `on_cpu` may predate a switch to the task whose switch
            // away it shows counted.
            let may_have_run = t.on_cpu
                || now.on_cpu
                || t.vcpu.is_some()
                || running.binary_search(&t.addr).is_ok()
                || now.switches != t.switches;
            if may_have_run {
                *t = self.task(t.addr)?;
                t.idle = t.pid == 0;
                reread += 1;
            }
        }
        let vcpus = self.assign_vcpus(&mut tasks, &bases)?;
        Ok(Refreshed {
            list: TaskList { tasks, vcpus },
            reread,
        })
    }

    /// What each vCPU runs, from the per-CPU areas at `bases`; the task that is current
    /// on a vCPU gets its number.
    fn assign_vcpus(&self, tasks: &mut [Task], bases: &[u64]) -> Result<Vec<VcpuTask>, TaskError> {
        let mut vcpus = Vec::new();
        for mut v in self.vcpus(bases)? {
            if let Some(addr) = v.task {
                match tasks.iter_mut().find(|t| t.addr == addr) {
                    Some(t) => {
                        t.vcpu = Some(v.vcpu);
                        v.pid = Some(t.pid);
                        v.comm = Some(t.comm.clone());
                    }
                    None => {
                        // Current but on no list: a task being created or torn down.
                        if let Ok(t) = self.task(addr) {
                            v.pid = Some(t.pid);
                            v.comm = Some(t.comm);
                        }
                    }
                }
            }
            vcpus.push(v);
        }
        Ok(vcpus)
    }
}

/// A list brought up to date by [`TaskReader::refresh`], and how many of its tasks had
/// to be read again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refreshed {
    pub list: TaskList,
    pub reread: usize,
}

/// What the pause reads of each task of a confirmed list: its switch count, and whether
/// it is on a CPU (being switched to or from, or running).
struct Liveness {
    switches: u64,
    on_cpu: bool,
}

/// Where [`Liveness`] is in a task_struct: the two switch counts (neighbours in every
/// kernel: one read of both) and `on_cpu`.
struct LivenessFields {
    nvcsw: u64,
    nivcsw: u64,
    on_cpu: u64,
}

impl LivenessFields {
    fn of(l: &crate::layout::TaskLayout) -> LivenessFields {
        LivenessFields {
            nvcsw: l.nvcsw,
            nivcsw: l.nivcsw,
            on_cpu: l.on_cpu,
        }
    }

    /// The liveness of each of `tasks`, the counts summed as [`TaskReader::task`] sums
    /// them, each field read for every task in one call ([`KernelMemory::read_each`]).
    fn read_all(&self, mem: &KernelMemory, tasks: &[Task]) -> Result<Vec<Liveness>, MemError> {
        let words = |off: u64, size: usize, n: usize| -> Result<Vec<u64>, MemError> {
            let vas: Vec<u64> = tasks.iter().map(|t| t.addr.wrapping_add(off)).collect();
            let mut raw = vec![0u8; vas.len() * size * n];
            mem.read_each(&vas, size * n, &mut raw)?;
            Ok(raw
                .chunks_exact(size)
                .map(|w| {
                    let mut b = [0u8; 8];
                    b[..size].copy_from_slice(w);
                    u64::from_le_bytes(b)
                })
                .collect())
        };
        let switches: Vec<u64> = if self.nivcsw == self.nvcsw + 8 {
            words(self.nvcsw, 8, 2)?
                .chunks_exact(2)
                .map(|w| w[0].wrapping_add(w[1]))
                .collect()
        } else {
            let (v, iv) = (words(self.nvcsw, 8, 1)?, words(self.nivcsw, 8, 1)?);
            v.iter().zip(&iv).map(|(a, b)| a.wrapping_add(*b)).collect()
        };
        let on_cpu = words(self.on_cpu, 4, 1)?; // int on_cpu
        Ok(switches
            .into_iter()
            .zip(on_cpu)
            .map(|(switches, on_cpu)| Liveness {
                switches,
                on_cpu: on_cpu != 0,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_letters_match_ps() {
        assert_eq!(state_letter(0, 0), 'R');
        assert_eq!(state_letter(1, 0), 'S');
        assert_eq!(state_letter(2, 0), 'D');
        assert_eq!(state_letter(0x402, 0), 'I');
        assert_eq!(state_letter(4, 0), 'T');
        assert_eq!(state_letter(0, 0x20), 'Z');
    }
}
