//! Checks made before the pause (issue 12): most tasks sleep, and a sleeping task's
//! stack does not change until it runs again. So the patch driver unwinds the guest's
//! tasks while the guest runs ([`crate::Engine::unwind_early`]), and the tick that
//! follows, in the pause, takes such a trace instead of unwinding the task again only
//! when it can confirm that the task has not run since:
//!
//! - before and after the early unwind the task was off every CPU (`on_cpu` clear) and
//!   its switch count (`nvcsw + nivcsw`) and saved stack pointer (`thread.sp`) were the
//!   same: it did not run while its stack was read;
//! - in the pause it is still the same task (address and pid), still off every CPU and
//!   not `current` on a vCPU, with the same switch count and saved stack pointer. A task
//!   that ran in between was switched out again (the count grew) or is still running
//!   (on a CPU).
//!
//! Everything else (tasks that ran, tasks on a vCPU, tasks that appeared, reads that
//! failed) is unwound in the pause, as before.
//!
//! The task list itself is walked and read early too. The pause skips the walk when the
//! kernel's fork and exit counters, read before the early walk, are the same in the
//! pause, and no writer held `tasklist_lock` just after either read
//! ([`introspection::tasks::ListStamp`]): then no task appeared or went away. It then brings the early list up to date
//! ([`introspection::tasks::TaskReader::refresh`]): one read of each task's switch count,
//! and the whole task read again only where it ran. Otherwise the pause walks the list
//! and reads every task itself.
//!
//! Each early trace is also judged before the pause against the code the next tick
//! will check (`Engine::next_code`); the tick takes that verdict with the trace when it
//! checks the same code, and judges again otherwise.
//!
//! The early traces and the early list serve one tick only. Nothing read early is
//! trusted on its own: the confirmation reads come from the paused guest.
//!
//! With verification on ([`crate::Engine::set_verify_early`]) every confirmed task is
//! also unwound and judged in the pause and compared with its early trace and verdict,
//! and every refreshed list with a full read of the list; the counts are in the
//! transition's status (`early_checks`), so a test can show that the verdicts agree.

use introspection::stack::StackTrace;
use introspection::tasks::{ListStamp, Task, TaskList, VcpuTask};

use crate::transition::{Check, CheckedCode};

/// What must not change between the early unwind and the pause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    task: u64,
    pid: i32,
    switches: u64,
    saved_sp: u64,
}

impl Stamp {
    /// The stamp of a task that is off every CPU, `None` for one that may be running.
    pub(crate) fn of(t: &Task) -> Option<Stamp> {
        (!t.on_cpu && t.vcpu.is_none()).then_some(Stamp {
            task: t.addr,
            pid: t.pid,
            switches: t.switches,
            saved_sp: t.saved_sp,
        })
    }
}

/// Traces unwound while the guest ran, in the order they were made (the task list's),
/// each with its task's stamp and, where the next tick's code to check was known then,
/// its verdict; and the task list as walked and read then, with the list's stamp from
/// before the walk. The pause takes traces in list order, each found where the last one
/// was taken (a cursor), else by a search of their addresses sorted before the pause: no
/// hashing of guest-chosen addresses in the pause.
#[derive(Clone, Debug, Default)]
pub(crate) struct EarlyTraces {
    stamps: Vec<Stamp>,
    /// Each trace, with its verdict for `judged` (`None` without it).
    checks: Vec<Option<Check>>,
    judged: Option<CheckedCode>,
    /// (task address, index), sorted by address.
    by_addr: Vec<(u64, usize)>,
    /// Where the next trace is likeliest to be: after the last one taken.
    next: usize,
    pub(crate) list: Option<EarlyList>,
}

/// The tasks a walk of the running guest found, as read then, and the task list's stamp
/// read before that walk began.
#[derive(Clone, Debug)]
pub(crate) struct EarlyList {
    pub(crate) stamp: ListStamp,
    pub(crate) list: TaskList,
}

impl EarlyTraces {
    /// Keep `trace`, taken between reads of the task that gave `before` and `after`, if
    /// the two agree (the task did not run while its stack was read). Call
    /// [`EarlyTraces::ready`] once every trace is kept.
    pub(crate) fn keep(&mut self, before: &Task, after: &Task, trace: StackTrace) {
        if let (Some(b), Some(a)) = (Stamp::of(before), Stamp::of(after)) {
            if a == b {
                self.stamps.push(a);
                self.checks.push(Some(Check::unjudged(trace)));
            }
        }
    }

    /// Ready for the pause: each trace judged against `judged` (the code the next tick
    /// will check, if known), and the addresses sorted for searching.
    pub(crate) fn ready(mut self, judged: Option<CheckedCode>) -> Self {
        if let Some(code) = &judged {
            for c in self.checks.iter_mut().flatten() {
                c.judge(code);
            }
        }
        self.judged = judged;
        self.by_addr = self
            .stamps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.task, i))
            .collect();
        self.by_addr.sort_unstable();
        self
    }

    /// Whether the traces were judged against `code`.
    pub(crate) fn judged_for(&self, code: &CheckedCode) -> bool {
        self.judged.as_ref() == Some(code)
    }

    /// Where the trace of the task at `addr` is.
    fn find(&self, addr: u64) -> Option<usize> {
        if self.stamps.get(self.next).is_some_and(|s| s.task == addr) {
            return Some(self.next);
        }
        let i = self.by_addr.binary_search_by_key(&addr, |&(a, _)| a).ok()?;
        Some(self.by_addr[i].1)
    }

    /// The early trace of `task` as the pause sees it, if the task has not run since,
    /// taken out (a trace serves one check: moved, never copied, in the pause), with
    /// its early verdict (meaningless where it was not judged). The trace is not read:
    /// its state letter is the early one's.
    #[inline]
    pub(crate) fn take_confirmed(&mut self, task: &Task) -> Option<Check> {
        let now = Stamp::of(task)?;
        let i = self.find(task.addr)?;
        if self.stamps[i] != now {
            return None;
        }
        let check = self.checks[i].take()?;
        self.next = i + 1;
        Some(check)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.checks.iter().flatten().count()
    }
}

/// Whether two lists of one paused guest are the same for every check: the same tasks
/// in the same order, each with the same identity, switch count and whether it is on a
/// CPU, and the same vCPUs. Not the state letter, the CPU it is queued on, the name and
/// the saved stack pointer, which a task that has not run keeps from an earlier read
/// ([`TaskReader::refresh`]; the unwinder reads the stack pointer from the paused guest).
pub(crate) fn same_list(a: &TaskList, b: &TaskList) -> bool {
    let same_task = |x: &Task, y: &Task| {
        Task {
            state: y.state,
            cpu: y.cpu,
            comm: y.comm.clone(),
            saved_sp: y.saved_sp,
            ..x.clone()
        } == *y
    };
    let same_vcpu = |x: &VcpuTask, y: &VcpuTask| {
        VcpuTask {
            comm: y.comm.clone(),
            ..x.clone()
        } == *y
    };
    a.tasks.len() == b.tasks.len()
        && a.vcpus.len() == b.vcpus.len()
        && a.tasks.iter().zip(&b.tasks).all(|(x, y)| same_task(x, y))
        && a.vcpus.iter().zip(&b.vcpus).all(|(x, y)| same_vcpu(x, y))
}

/// Whether two traces of one task give the same verdict for every patch: the same
/// frames (addresses and whether each is reliable), the same reliability and problem.
pub(crate) fn same_trace(a: &StackTrace, b: &StackTrace) -> bool {
    a.task == b.task
        && a.pid == b.pid
        && a.start == b.start
        && a.reliable == b.reliable
        && a.problem == b.problem
        && a.frames.len() == b.frames.len()
        && a.frames
            .iter()
            .zip(&b.frames)
            .all(|(x, y)| x.addr == y.addr && x.interrupted == y.interrupted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use introspection::stack::TraceStart;

    fn task(switches: u64, on_cpu: bool) -> Task {
        Task {
            addr: 0x1000,
            pid: 7,
            tgid: 7,
            comm: "t".into(),
            state: 'S',
            kthread: false,
            idle: false,
            cpu: 0,
            on_cpu,
            vcpu: None,
            switches,
            saved_sp: 0xffff_c900_0000_3e00,
        }
    }

    fn trace() -> StackTrace {
        StackTrace {
            pid: 7,
            tgid: 7,
            comm: "t".into(),
            state: 'S',
            task: 0x1000,
            start: TraceStart::Saved,
            frames: Vec::new(),
            reliable: true,
            problem: None,
        }
    }

    #[test]
    fn only_a_task_that_did_not_run_keeps_its_early_trace() {
        let asleep = task(40, false);
        let mut kept = EarlyTraces::default();
        kept.keep(&asleep, &asleep, trace());
        let kept = kept.ready(None);
        let confirmed = |t: &Task| kept.clone().take_confirmed(t);
        assert!(confirmed(&asleep).is_some());
        // Woken but not yet run: a new state letter, the same stack.
        let woken = Task {
            state: 'R',
            ..asleep.clone()
        };
        assert!(confirmed(&woken).is_some());
        // Ran and slept again; is running; is current on a vCPU; another task there.
        assert!(confirmed(&task(41, false)).is_none());
        assert!(confirmed(&task(40, true)).is_none());
        let on_vcpu = Task {
            vcpu: Some(0),
            ..asleep.clone()
        };
        assert!(confirmed(&on_vcpu).is_none());
        let moved_sp = Task {
            saved_sp: asleep.saved_sp - 0x40,
            ..asleep.clone()
        };
        assert!(confirmed(&moved_sp).is_none());
        let reused = Task {
            pid: 8,
            ..asleep.clone()
        };
        assert!(confirmed(&reused).is_none());
        // A trace serves one check: taken, it is gone.
        let mut once = kept.clone();
        assert!(once.take_confirmed(&asleep).is_some());
        assert!(once.take_confirmed(&asleep).is_none());
    }

    #[test]
    fn an_early_verdict_serves_only_the_code_it_was_judged_against() {
        let code = |start: u64, name: &str| CheckedCode {
            leaving: vec![crate::funcs::CodeRange {
                start,
                end: start + 0x100,
                name: name.into(),
            }],
            tramps: vec![],
        };
        let (f, g) = (code(0x5000, "f"), code(0x9000, "g"));
        let in_f = StackTrace {
            frames: vec![introspection::stack::Frame {
                addr: 0x5010,
                symbol: None,
                function: None,
                interrupted: false,
                sched: false,
            }],
            ..trace()
        };
        let asleep = task(40, false);
        let early = |judged: Option<CheckedCode>| {
            let mut e = EarlyTraces::default();
            e.keep(&asleep, &asleep, in_f.clone());
            e.ready(judged)
        };
        let judged = early(Some(f.clone()));
        assert!(judged.judged_for(&f) && !judged.judged_for(&g));
        let c = judged.clone().take_confirmed(&asleep).unwrap();
        assert_eq!(c.unsafe_because.as_deref(), Some("f is on its stack"));
        assert!(c.out_of_trampolines && c.task == asleep.addr);
        // Not judged: the trace comes without a verdict, for the pause to make.
        let plain = early(None);
        assert!(!plain.judged_for(&f));
        assert_eq!(
            plain
                .clone()
                .take_confirmed(&asleep)
                .unwrap()
                .unsafe_because,
            None
        );
    }

    #[test]
    fn a_task_that_ran_during_the_early_unwind_is_not_kept() {
        let mut early = EarlyTraces::default();
        early.keep(&task(40, false), &task(41, false), trace());
        early.keep(&task(40, false), &task(40, true), trace());
        early.keep(&task(40, true), &task(40, true), trace());
        assert_eq!(early.len(), 0);
    }
}
