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

/// One pass over the tasks of a paused guest.
pub struct TaskReader<'k, 'g> {
    pub kernel: &'k Kernel,
    /// The parked vCPUs (for the tasks on them) and their memory.
    pub guest: &'g dyn PausedGuest,
    pub mem: KernelMemory<'g>,
}

impl<'k, 'g> TaskReader<'k, 'g> {
    pub fn new(kernel: &'k Kernel, guest: &'g dyn PausedGuest) -> Self {
        TaskReader {
            kernel,
            guest,
            mem: kernel.memory(guest),
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
        let m = &self.mem;
        // The switch counts first: a reader that reads a task twice around other reads
        // (the patcher's early checks) relies on a switch in between showing in them.
        let switches = m
            .u64(addr.wrapping_add(l.nvcsw))?
            .wrapping_add(m.u64(addr.wrapping_add(l.nivcsw))?);
        let flags = m.u32(addr.wrapping_add(l.flags))?;
        Ok(Task {
            addr,
            pid: m.u32(addr.wrapping_add(l.pid))? as i32,
            tgid: m.u32(addr.wrapping_add(l.tgid))? as i32,
            comm: m.fixed_str(addr.wrapping_add(l.comm), l.comm_len.clamp(1, 64) as usize)?,
            state: state_letter(
                m.uint(addr.wrapping_add(l.state), l.state_size)?,
                u64::from(m.u32(addr.wrapping_add(l.exit_state))?),
            ),
            kthread: u64::from(flags) & PF_KTHREAD != 0,
            idle: false,
            cpu: m.u32(addr.wrapping_add(l.cpu))?,
            on_cpu: m.u32(addr.wrapping_add(l.on_cpu))? != 0,
            vcpu: None,
            switches,
            saved_sp: m.u64(addr.wrapping_add(l.thread_sp))?,
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

    /// Every task, and what each vCPU runs.
    pub fn list(&self) -> Result<TaskList, TaskError> {
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

        let mut tasks = Vec::with_capacity(addrs.len());
        for a in addrs {
            tasks.push(self.task(a)?);
        }
        // Idle tasks of the other CPUs (CPU 0's is init_task, already listed).
        let bases = self.percpu_bases()?;
        for &base in &bases {
            let idle = self
                .mem
                .u64(base.wrapping_add(k.addrs.runqueues.wrapping_add(l.rq_idle)))?;
            if idle != 0 && seen.insert(idle) {
                tasks.push(self.task(idle)?);
            }
        }
        for t in tasks.iter_mut() {
            t.idle = t.pid == 0;
        }

        let mut vcpus = Vec::new();
        for mut v in self.vcpus(&bases)? {
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
        Ok(TaskList { tasks, vcpus })
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
