//! Kernel stack traces of guest tasks, unwound with the guest's ORC tables over guest
//! memory: the algorithm of arch/x86/kernel/unwind_orc.c (`unwind_next_frame`), run from
//! outside.
//!
//! A sleeping task starts from the `inactive_task_frame` its `thread.sp` points at; a
//! task running on a vCPU starts from that vCPU's registers (and has no kernel stack at
//! all when the vCPU is in user mode). A trace is *reliable*, in the sense the kernel's
//! livepatch uses (`arch_stack_walk_reliable`), only when the unwind ends where a kernel
//! stack ends (user-mode registers, or an ORC end-of-stack entry) with every step
//! checked: each address in kernel text, each stack read inside a known stack, the stack
//! pointer always moving up. Anything else says why it is unreliable, and a caller must
//! then assume the task could be anywhere.

use serde::{Deserialize, Serialize};

use crate::guest::VcpuState;
use crate::kernel::Kernel;
use crate::orc::{reg, OrcEntry, OrcKind};
use crate::tasks::{Task, TaskReader};

/// MAX_STACK_TRACE_DEPTH of /proc/PID/stack.
pub const MAX_FRAMES: usize = 64;

/// Code the kernel's ORC table does not cover (for example live-patch code): its
/// addresses count as text, with unwind entries of their own.
pub trait ExtraCode {
    /// True if `ip` is in this code.
    fn contains(&self, ip: u64) -> bool;
    /// How to unwind a frame at `ip` (a return address, or an `interrupted` one); `None`
    /// when unknown, which makes the trace unreliable.
    fn unwind_entry(&self, ip: u64, interrupted: bool) -> Option<OrcEntry>;
    /// `name+0xoff/0xsize` for an address in this code (for a return address, the
    /// function is the one containing `ip - 1`, as the kernel's `%pB`).
    fn describe(&self, ip: u64, interrupted: bool) -> Option<String>;
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    pub addr: u64,
    /// `func+0xoff/0xsize` (return addresses are looked up at `addr - 1`, as `%pB`).
    pub symbol: Option<String>,
    /// The function name alone.
    pub function: Option<String>,
    /// The address was interrupted (a register frame), not a return address.
    pub interrupted: bool,
    /// Scheduler or lock code, which /proc/PID/stack leaves out for a sleeping task.
    pub sched: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceStart {
    /// From the switch frame of a task that is not running.
    Saved,
    /// From the registers of the vCPU that runs the task, in kernel mode.
    Vcpu(usize),
    /// Running on this vCPU in user mode: nothing on the kernel stack.
    UserMode(usize),
    /// A task that has exited and switched out for the last time: the kernel freed its
    /// stack (`task->stack` is NULL), so nothing can be on it. The kernel's own
    /// reliable unwinder calls such a stack "reliably empty" (kernel/stacktrace.c,
    /// `stack_trace_save_tsk_reliable`), and its livepatch switches the task at once.
    NoStack,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackTrace {
    pub pid: i32,
    pub tgid: i32,
    pub comm: String,
    pub state: char,
    pub task: u64,
    pub start: TraceStart,
    pub frames: Vec<Frame>,
    pub reliable: bool,
    /// Why the trace is not reliable.
    pub problem: Option<String>,
}

impl StackTrace {
    /// True if any frame's address lies in `[start, end)`.
    pub fn touches(&self, start: u64, end: u64) -> bool {
        self.frames.iter().any(|f| f.addr >= start && f.addr < end)
    }
}

/// Where register values of the current frame come from.
#[derive(Clone, Copy)]
enum Regs<'a> {
    None,
    /// A `pt_regs` (full) or IRET frame (partial) on the stack, at this address.
    Stack {
        addr: u64,
        full: bool,
    },
    /// The vCPU's own registers (the starting frame of a running task).
    Vcpu(&'a VcpuState),
}

struct State<'a> {
    ip: u64,
    sp: u64,
    bp: u64,
    regs: Regs<'a>,
    /// Full registers of the frame before a partial one (ORC reads them through).
    prev_regs: Option<u64>,
    signal: bool,
}

/// Unwinds tasks of one paused guest.
pub struct Unwinder<'r, 'k, 'g> {
    reader: &'r TaskReader<'k, 'g>,
    extra: &'r [&'r dyn ExtraCode],
}

impl<'r, 'k, 'g> Unwinder<'r, 'k, 'g> {
    pub fn new(reader: &'r TaskReader<'k, 'g>, extra: &'r [&'r dyn ExtraCode]) -> Self {
        Unwinder { reader, extra }
    }

    fn kernel(&self) -> &'k Kernel {
        self.reader.kernel
    }

    fn is_text(&self, ip: u64) -> bool {
        self.kernel().is_kernel_text(ip) || self.extra.iter().any(|e| e.contains(ip))
    }

    fn orc_find(&self, ip: u64, interrupted: bool) -> Option<OrcEntry> {
        if self.kernel().is_kernel_text(ip) {
            return self.kernel().orc.find(ip);
        }
        let e = self.extra.iter().find(|e| e.contains(ip))?;
        e.unwind_entry(ip, interrupted)
    }

    fn frame(&self, ip: u64, interrupted: bool) -> Frame {
        let syms = &self.kernel().symbols;
        let located = if interrupted {
            syms.locate(ip)
        } else {
            syms.locate_return(ip)
        };
        let (symbol, function) = if self.kernel().is_kernel_text(ip) {
            match located {
                Some(l) => (Some(l.display()), Some(l.name)),
                None => (None, None),
            }
        } else {
            let d = self.extra.iter().find_map(|e| e.describe(ip, interrupted));
            let f = d
                .as_ref()
                .map(|s| s.split('+').next().unwrap_or(s).to_string());
            (d, f)
        };
        Frame {
            addr: ip,
            symbol,
            function,
            interrupted,
            sched: self.kernel().is_sched_text(ip),
        }
    }

    /// The trace of `task`. `vcpu` is the vCPU it is current on, if any.
    pub fn trace(&self, task: &Task) -> StackTrace {
        let mut out = StackTrace {
            pid: task.pid,
            tgid: task.tgid,
            comm: task.comm.clone(),
            state: task.state,
            task: task.addr,
            start: TraceStart::Saved,
            frames: Vec::new(),
            reliable: false,
            problem: None,
        };
        match self.unwind(task, &mut out) {
            Ok(()) => out.reliable = true,
            Err(why) => out.problem = Some(why),
        }
        out
    }

    /// A task without a stack: reliably empty if it is dead (`exit_state` set: the
    /// kernel frees a stack only after the task's last switch out, `release_task_stack`
    /// from `finish_task_switch`); any other task without one is corrupt.
    fn stackless(&self, task: &Task, out: &mut StackTrace) -> Result<(), String> {
        let k = self.kernel();
        let exit_state = self
            .reader
            .mem
            .u32(task.addr.wrapping_add(k.layout.task.exit_state))
            .map_err(|e| format!("cannot read exit_state: {e}"))?;
        if exit_state == 0 || task.on_cpu || task.vcpu.is_some() {
            return Err("the task has no stack but has not exited".into());
        }
        out.start = TraceStart::NoStack;
        Ok(())
    }

    fn unwind(&self, task: &Task, out: &mut StackTrace) -> Result<(), String> {
        let k = self.kernel();
        let m = &self.reader.mem;
        let stack_base = m
            .u64(task.addr.wrapping_add(k.layout.task.stack))
            .map_err(|e| format!("cannot read task->stack: {e}"))?;
        if stack_base == 0 {
            return self.stackless(task, out);
        }
        let task_stack = (stack_base, stack_base.wrapping_add(k.thread_size));
        let mut stacks = vec![task_stack];

        let guest = self.reader.guest;
        let vcpu_state = match task.vcpu {
            Some(i) => Some(guest.vcpu(i).map_err(|e| e.to_string())?),
            None => None,
        };
        let mut state = match vcpu_state {
            Some(v) if v.cpl() == 3 => {
                out.start = TraceStart::UserMode(task.vcpu.unwrap_or(0));
                return Ok(());
            }
            Some(v) => {
                out.start = TraceStart::Vcpu(task.vcpu.unwrap_or(0));
                // A running task may be on its CPU's IRQ stack.
                if let Some(irq) = self
                    .reader
                    .percpu_base_of(v)
                    .and_then(|b| self.reader.irq_stack(b))
                {
                    stacks.push(irq);
                }
                State {
                    ip: v.rip,
                    sp: v.rsp,
                    bp: v.rbp,
                    regs: Regs::Vcpu(v),
                    prev_regs: None,
                    signal: true,
                }
            }
            None => self.switched_out(task, &stacks)?,
        };

        for _ in 0..MAX_FRAMES {
            // User-mode registers are where a task's kernel stack ends.
            if let Regs::Stack { addr, .. } = state.regs {
                let cs = self.read(addr.wrapping_add(k.layout.regs.cs), &stacks)?;
                if cs & 3 == 3 {
                    return Ok(());
                }
            }
            if !self.is_text(state.ip) {
                return Err(format!("address {:#x} is not kernel text", state.ip));
            }
            out.frames.push(self.frame(state.ip, state.signal));
            match self.step(&mut state, &stacks)? {
                Step::More => {}
                Step::End => return Ok(()),
            }
        }
        Err(format!("more than {MAX_FRAMES} frames"))
    }

    /// Where a task that is off its CPU resumes: the frame `__switch_to_asm` pushed at
    /// its saved stack pointer.
    fn switched_out(&self, task: &Task, stacks: &[(u64, u64)]) -> Result<State<'_>, String> {
        let k = self.kernel();
        let m = &self.reader.mem;
        if task.on_cpu {
            return Err("task is being switched on or off a CPU".into());
        }
        let sp = m
            .u64(task.addr.wrapping_add(k.layout.task.thread_sp))
            .map_err(|e| format!("cannot read thread.sp: {e}"))?;
        let f = &k.layout.switch_frame;
        if !within(stacks, sp, f.size) {
            return Err(format!(
                "saved stack pointer {sp:#x} is outside the task's stack"
            ));
        }
        let ip = m
            .u64(sp.wrapping_add(f.ret_addr))
            .map_err(|e| e.to_string())?;
        Ok(State {
            ip,
            sp: sp.wrapping_add(f.size),
            bp: m.u64(sp.wrapping_add(f.bp)).map_err(|e| e.to_string())?,
            regs: Regs::None,
            prev_regs: None,
            signal: k.addrs.ret_from_fork.contains(&ip),
        })
    }

    fn read(&self, addr: u64, stacks: &[(u64, u64)]) -> Result<u64, String> {
        if !within(stacks, addr, 8) {
            return Err(format!(
                "stack read at {addr:#x} is outside the task's stacks"
            ));
        }
        self.reader.mem.u64(addr).map_err(|e| e.to_string())
    }

    fn reg(&self, state: &State, offset: u64, stacks: &[(u64, u64)]) -> Option<u64> {
        let l = &self.kernel().layout.regs;
        match state.regs {
            Regs::Vcpu(v) => {
                // The vCPU's register file, addressed by pt_regs offsets.
                let pairs = [
                    (l.bp, v.rbp),
                    (l.r10, v.r10),
                    (l.r13, v.r13),
                    (l.di, v.rdi),
                    (l.dx, v.rdx),
                ];
                pairs.iter().find(|(o, _)| *o == offset).map(|(_, v)| *v)
            }
            Regs::Stack { addr, full: true } => self.read(addr.wrapping_add(offset), stacks).ok(),
            Regs::Stack { full: false, .. } => {
                let prev = state.prev_regs?;
                self.read(prev.wrapping_add(offset), stacks).ok()
            }
            Regs::None => None,
        }
    }

    /// One `unwind_next_frame`.
    fn step(&self, state: &mut State, stacks: &[(u64, u64)]) -> Result<Step, String> {
        let lookup = if state.signal {
            state.ip
        } else {
            state.ip.wrapping_sub(1) // arch: the call is the instruction before the return address
        };
        let orc = match self.orc_find(lookup, state.signal) {
            Some(o) => o,
            None => return Err(format!("no unwind information for {lookup:#x}")),
        };
        match orc.kind {
            OrcKind::Undefined => {
                return Err(format!("undefined unwind information at {:#x}", state.ip))
            }
            // Where a stack really ends, its last frame is a return address (a kernel
            // thread's ret_from_fork) or the entry's user registers come first. An
            // *interrupted* address the table marks as an end is code that says nothing
            // of its callers: 6.1's UNWIND_HINT_EMPTY (end bit set) covers the retpoline
            // thunks and entry code, which a task on a vCPU, or one interrupted in the
            // kernel, can be caught in with its callers still on the stack (6.4 split
            // that hint into END_OF_STACK and UNDEFINED for this reason).
            OrcKind::EndOfStack if state.signal => {
                return Err(format!(
                    "interrupted at {:#x}, which the ORC table marks as a stack's end \
                     (an entry or a thunk): its callers cannot be seen",
                    state.ip
                ))
            }
            OrcKind::EndOfStack => return Ok(Step::End),
            _ => {}
        }
        let prev_sp = state.sp;
        let prev_stack = stack_of(stacks, prev_sp);
        let sp = self.previous_sp(state, &orc, stacks)?;
        self.previous_frame(state, orc.kind, sp, stacks)?;
        state.signal = orc.signal;
        self.previous_bp(state, &orc, sp, stacks)?;

        if prev_stack.is_some() && stack_of(stacks, state.sp) == prev_stack && state.sp <= prev_sp {
            return Err(format!(
                "stack going in the wrong direction at {:#x}",
                state.ip
            ));
        }
        Ok(Step::More)
    }

    /// The caller's stack pointer (the frame's CFA), by the entry's sp rule.
    fn previous_sp(
        &self,
        state: &State,
        orc: &OrcEntry,
        stacks: &[(u64, u64)],
    ) -> Result<u64, String> {
        let l = &self.kernel().layout.regs;
        let off = |v: u64| v.wrapping_add(orc.sp_offset as i64 as u64);
        let (mut sp, indirect) = match orc.sp_reg {
            reg::SP => (off(state.sp), false),
            reg::BP => (off(state.bp), false),
            reg::SP_INDIRECT => (state.sp, true),
            reg::BP_INDIRECT => (off(state.bp), true),
            r @ (reg::R10 | reg::R13 | reg::DI | reg::DX) => {
                let o = match r {
                    reg::R10 => l.r10,
                    reg::R13 => l.r13,
                    reg::DI => l.di,
                    _ => l.dx,
                };
                let v = self
                    .reg(state, o, stacks)
                    .ok_or_else(|| format!("register {r} unknown at {:#x}", state.ip))?;
                (v, false)
            }
            r => return Err(format!("unknown ORC sp register {r} at {:#x}", state.ip)),
        };
        if indirect {
            sp = self.read(sp, stacks)?;
            if orc.sp_reg == reg::SP_INDIRECT {
                sp = off(sp);
            }
        }
        Ok(sp)
    }

    /// The caller's ip and sp, by the frame's kind: a call's return address below the
    /// CFA, or a full or partial (IRET) register frame at it.
    fn previous_frame(
        &self,
        state: &mut State,
        kind: OrcKind,
        sp: u64,
        stacks: &[(u64, u64)],
    ) -> Result<(), String> {
        let l = &self.kernel().layout.regs;
        match kind {
            OrcKind::Call => {
                state.ip = self.read(sp.wrapping_sub(8), stacks)?; // arch: return address below the CFA
                state.sp = sp;
                state.regs = Regs::None;
                state.prev_regs = None;
            }
            OrcKind::Regs => {
                if !within(stacks, sp, l.size) {
                    return Err(format!(
                        "register frame at {sp:#x} is outside the task's stacks"
                    ));
                }
                state.ip = self.read(sp.wrapping_add(l.ip), stacks)?;
                state.sp = self.read(sp.wrapping_add(l.sp), stacks)?;
                state.regs = Regs::Stack {
                    addr: sp,
                    full: true,
                };
                state.prev_regs = None;
            }
            OrcKind::RegsPartial => {
                // The hardware IRET frame: pt_regs from `ip` on.
                let base = sp.wrapping_sub(l.ip);
                state.ip = self.read(base.wrapping_add(l.ip), stacks)?;
                state.sp = self.read(base.wrapping_add(l.sp), stacks)?;
                state.prev_regs = match state.regs {
                    Regs::Stack { addr, full: true } => Some(addr),
                    _ => None,
                };
                state.regs = Regs::Stack {
                    addr: base,
                    full: false,
                };
            }
            OrcKind::Undefined | OrcKind::EndOfStack => {
                return Err(format!("no caller frame at {:#x}", state.ip))
            }
        }
        Ok(())
    }

    /// The caller's frame pointer, by the entry's bp rule (`sp`: the CFA).
    fn previous_bp(
        &self,
        state: &mut State,
        orc: &OrcEntry,
        sp: u64,
        stacks: &[(u64, u64)],
    ) -> Result<(), String> {
        let l = &self.kernel().layout.regs;
        match orc.bp_reg {
            reg::UNDEFINED => {
                if let Some(bp) = self.reg(state, l.bp, stacks) {
                    state.bp = bp;
                }
            }
            reg::PREV_SP => {
                state.bp = self.read(sp.wrapping_add(orc.bp_offset as i64 as u64), stacks)?;
            }
            reg::BP => {
                state.bp = self.read(state.bp.wrapping_add(orc.bp_offset as i64 as u64), stacks)?;
            }
            r => return Err(format!("unknown ORC bp register {r} at {:#x}", state.ip)),
        }
        Ok(())
    }
}

enum Step {
    More,
    End,
}

fn within(stacks: &[(u64, u64)], addr: u64, len: u64) -> bool {
    stacks
        .iter()
        .any(|&(lo, hi)| addr >= lo && addr.checked_add(len).is_some_and(|e| e <= hi))
}

fn stack_of(stacks: &[(u64, u64)], addr: u64) -> Option<usize> {
    stacks.iter().position(|&(lo, hi)| addr >= lo && addr < hi)
}
