//! End-to-end tests over synthetic kernels of both formats: attach, symbols, tasks and
//! stacks, layouts that move with BTF, and hostile memory.

use std::time::{Duration, Instant};

use crate::guest::PausedGuest;
use crate::kernel::Kernel;
use crate::modules::{ModuleCode, ModuleError, ModuleList, ModuleState};
use crate::stack::{ExtraCode, StackTrace, TraceStart, Unwinder};
use crate::synth::modules::SynthModuleSymbol;
use crate::synth::{SynthGuest, SynthKernel, SynthKernelSpec, SynthModule, SynthTask};
use crate::tasks::TaskReader;

fn both() -> [SynthKernel; 2] {
    [
        SynthKernel::build(SynthKernelSpec::v6_1()),
        SynthKernel::build(SynthKernelSpec::v6_12()),
    ]
}

/// Every task's trace, unwound as the patcher unwinds it: through module code too.
fn traces(k: &Kernel, guest: &dyn PausedGuest) -> Vec<StackTrace> {
    let reader = TaskReader::new(k, guest);
    let list = reader.list().expect("task list");
    let modules = ModuleCode::new(k, k.memory(guest));
    let extra: [&dyn ExtraCode; 1] = [&modules];
    let unwinder = Unwinder::new(&reader, &extra);
    list.tasks.iter().map(|t| unwinder.trace(t)).collect()
}

fn functions(t: &StackTrace) -> Vec<&str> {
    t.frames
        .iter()
        .map(|f| f.function.as_deref().unwrap_or("?"))
        .collect()
}

#[test]
fn attach_decodes_every_symbol_of_both_formats() {
    for sk in both() {
        let k = Kernel::attach(&sk.guest).expect("attach");
        assert_eq!(
            k.symbols.symbols().collect::<Vec<_>>(),
            sk.symbols,
            "{}",
            sk.spec.release
        );
        assert_eq!(k.info.osrelease, sk.spec.release);
        assert_eq!(k.stats.orc_has_end_bit, !sk.spec.new_orc);
        assert_eq!(k.thread_size, crate::synth::kernel::THREAD_SIZE);
        assert_eq!(k.root.five_level, sk.spec.five_level);
        // Per-CPU symbols keep their small absolute values.
        let percpu = if sk.spec.pcpu_hot {
            "pcpu_hot"
        } else {
            "current_task"
        };
        assert_eq!(k.symbols.addr(percpu), Some(0x100));
    }
}

/// Attach reads nothing the guest changes while it runs: from RAM alone, with no
/// registers, it finds the same kernel, and scribbling over every task and its stack
/// (what a running guest changes all the time) changes nothing it reads.
#[test]
fn attach_reads_only_what_the_running_guest_never_changes() {
    for mut sk in both() {
        let paused = Kernel::attach(&sk.guest).expect("attach");
        let mut scribbled = 0;
        let tasks: Vec<u64> = sk
            .task_addrs
            .iter()
            .copied()
            .chain([sk.init_task])
            .collect();
        for task in tasks {
            let stack = paused
                .memory(&sk.guest)
                .u64(task + paused.layout.task.stack);
            let pages = [Some(task), stack.ok()]
                .into_iter()
                .flatten()
                .filter_map(|va| paused.memory(&sk.guest).translate(va).ok())
                .collect::<Vec<_>>();
            for pa in pages {
                sk.guest.write_phys_raw(pa, &[0xa5; 512]);
                scribbled += 1;
            }
        }
        assert!(scribbled >= 2 * sk.task_addrs.len(), "{scribbled}");
        let running = Kernel::attach_static(&sk.guest, &[]).expect("attach from RAM alone");
        assert!(running.symbols.symbols().eq(paused.symbols.symbols()));
        assert_eq!(running.layout, paused.layout);
        assert_eq!(running.addrs, paused.addrs);
        assert_eq!(running.root, paused.root);
        assert_eq!(running.orc.len(), paused.orc.len());
        assert_eq!(running.thread_size, paused.thread_size);
    }
}

#[test]
fn tasks_threads_idle_tasks_and_current_per_vcpu() {
    for sk in both() {
        let k = Kernel::attach(&sk.guest).unwrap();
        let list = TaskReader::new(&k, &sk.guest).list().unwrap();
        let mut got: Vec<(i32, i32, &str)> = list
            .tasks
            .iter()
            .map(|t| (t.pid, t.tgid, t.comm.as_str()))
            .collect();
        got.sort();
        let mut want: Vec<(i32, i32, &str)> = sk
            .spec
            .tasks
            .iter()
            .map(|t| (t.pid, t.tgid, t.comm.as_str()))
            .chain([(0, 0, "swapper/0"), (0, 0, "swapper/1")])
            .collect();
        want.sort();
        assert_eq!(got, want, "{}", sk.spec.release);
        let idle: Vec<&str> = list
            .tasks
            .iter()
            .filter(|t| t.idle)
            .map(|t| t.comm.as_str())
            .collect();
        assert_eq!(idle, ["swapper/0", "swapper/1"]);
        assert!(list.by_pid(2).unwrap().kthread);
        assert_eq!(list.by_pid(11).unwrap().state, 'S');
        let cur: Vec<(Option<u32>, Option<i32>, bool)> = list
            .vcpus
            .iter()
            .map(|v| (v.cpu, v.pid, v.user_mode))
            .collect();
        assert_eq!(cur, [(Some(0), Some(20), false), (Some(1), Some(21), true)]);
    }
}

#[test]
fn stacks_unwind_like_proc_pid_stack_and_are_reliable() {
    for sk in both() {
        let k = Kernel::attach(&sk.guest).unwrap();
        let all = traces(&k, &sk.guest);
        let by = |pid| all.iter().find(|t| t.pid == pid).unwrap();

        let reader = by(11);
        assert!(reader.reliable, "{:?}", reader.problem);
        assert_eq!(reader.start, TraceStart::Saved);
        assert_eq!(
            functions(reader),
            [
                "__schedule",
                "schedule",
                "pipe_read",
                "vfs_read",
                "ksys_read",
                "do_syscall_64",
                "entry_SYSCALL_64_after_hwframe"
            ]
        );
        let sched: Vec<bool> = reader.frames.iter().map(|f| f.sched).collect();
        assert_eq!(&sched[..3], [true, true, false]);
        // %pB style: return addresses at the call site, function size to the next symbol.
        assert_eq!(
            reader.frames[2].symbol.as_deref(),
            Some("pipe_read+0x10/0x100")
        );
        assert!(reader.touches(sk.function("pipe_read"), sk.function("pipe_read") + 0x100));

        let kthread = by(2);
        assert!(kthread.reliable, "{:?}", kthread.problem);
        assert_eq!(functions(kthread).last(), Some(&"ret_from_fork"));

        let busy_kernel = by(20);
        assert_eq!(busy_kernel.start, TraceStart::Vcpu(0));
        assert!(busy_kernel.reliable, "{:?}", busy_kernel.problem);
        assert_eq!(functions(busy_kernel)[..2], ["clear_user", "read_zero"]);
        assert!(busy_kernel.frames[0].interrupted);
        assert_eq!(
            busy_kernel.frames[0].symbol.as_deref(),
            Some("clear_user+0x20/0x100")
        );

        let busy_user = by(21);
        assert_eq!(busy_user.start, TraceStart::UserMode(1));
        assert!(busy_user.reliable && busy_user.frames.is_empty());

        for idle in all.iter().filter(|t| t.pid == 0) {
            assert!(idle.reliable, "{}: {:?}", idle.comm, idle.problem);
            assert_eq!(functions(idle)[0], "do_idle");
        }
    }
}

#[test]
fn layouts_come_from_btf_and_move_with_it() {
    // The same tasks with every task_struct field moved: the same answers.
    let mut spec = SynthKernelSpec::v6_12();
    spec.field_shift = 0x48;
    let moved = SynthKernel::build(spec);
    let k = Kernel::attach(&moved.guest).unwrap();
    let list = TaskReader::new(&k, &moved.guest).list().unwrap();
    assert_eq!(list.by_pid(11).unwrap().comm, "reader");
    assert!(traces(&k, &moved.guest).iter().all(|t| t.reliable));

    // Memory laid out one way, BTF saying another: lpvmm follows BTF, so the answers move.
    let plain = SynthKernel::build(SynthKernelSpec::v6_12());
    let mut lying = Kernel::attach(&plain.guest).unwrap();
    let moved_layout = Kernel::attach(&moved.guest).unwrap().layout;
    assert_ne!(lying.layout.task.pid, moved_layout.task.pid);
    lying.layout = moved_layout;
    let outcome = TaskReader::new(&lying, &plain.guest).list();
    let same = outcome
        .as_ref()
        .map(|l| l.by_pid(11).map(|t| t.comm.clone()) == Some("reader".into()))
        .unwrap_or(false);
    assert!(!same, "results did not move with the layout");
}

/// A task that exited and switched out for the last time has no stack (the kernel
/// freed it and set `task->stack` to NULL): its trace is reliably empty, as the kernel's
/// own reliable unwinder says, while a task with no stack that has not exited is
/// corrupt.
#[test]
fn an_exited_task_without_a_stack_is_reliably_empty() {
    let sk = SynthKernel::build(SynthKernelSpec::v6_1());
    let k = Kernel::attach(&sk.guest).unwrap();
    let l = &k.layout;
    let m = k.memory(&sk.guest);
    let reader_task = sk.task_addrs[2];
    let mut g = sk.guest.clone();
    let stack = m.translate(reader_task + l.task.stack).unwrap();
    g.write_phys(stack, &0u64.to_le_bytes()).unwrap();
    let t = traces(&k, &g).into_iter().find(|t| t.pid == 11).unwrap();
    assert!(!t.reliable, "{t:?}");
    assert!(t.problem.unwrap().contains("no stack but has not exited"));

    const EXIT_ZOMBIE: u32 = 0x20;
    let exit_state = m.translate(reader_task + l.task.exit_state).unwrap();
    g.write_phys(exit_state, &EXIT_ZOMBIE.to_le_bytes())
        .unwrap();
    let t = traces(&k, &g).into_iter().find(|t| t.pid == 11).unwrap();
    assert!(t.reliable && t.problem.is_none(), "{t:?}");
    assert_eq!(
        (t.start, t.frames.len(), t.state),
        (TraceStart::NoStack, 0, 'Z')
    );
}

#[test]
fn corrupt_lists_and_stacks_are_typed_errors() {
    let sk = SynthKernel::build(SynthKernelSpec::v6_1());
    let k = Kernel::attach(&sk.guest).unwrap();
    let l = &k.layout;

    // A cycle: the second leader's `next` points back to the first.
    let mut g = sk.guest.clone();
    let first = sk.task_addrs[0] + l.task.tasks;
    let second = sk.task_addrs[1] + l.task.tasks;
    let m = k.memory(&sk.guest);
    let pa = m.translate(second).unwrap();
    g.write_phys(pa, &first.to_le_bytes()).unwrap();
    let err = TaskReader::new(&k, &g).list().unwrap_err();
    assert!(err.to_string().contains("cycle"), "{err}");

    // A saved stack pointer outside the task's stack: unreliable, with the reason.
    let mut g = sk.guest.clone();
    let reader_task = sk.task_addrs[2];
    let pa = m.translate(reader_task + l.task.thread_sp).unwrap();
    g.write_phys(pa, &0xffff_ffff_ffff_0000u64.to_le_bytes())
        .unwrap();
    let t = traces(&k, &g).into_iter().find(|t| t.pid == 11).unwrap();
    assert!(!t.reliable);
    assert!(t.problem.unwrap().contains("outside the task's stack"));

    // A return address into data: unreliable.
    let mut g = sk.guest.clone();
    let pa = m.translate(reader_task + l.task.thread_sp).unwrap();
    let sp = g.read_u64_raw(pa);
    let ret = m.translate(sp + l.switch_frame.ret_addr).unwrap();
    g.write_phys(ret, &k.addrs.init_task.to_le_bytes()).unwrap();
    let t = traces(&k, &g).into_iter().find(|t| t.pid == 11).unwrap();
    assert!(!t.reliable);
    assert!(t.problem.unwrap().contains("not kernel text"));
}

/// Deterministic xorshift: the fuzz loops below must be reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Values a hostile guest would plant: pointers near real objects, into nowhere,
/// huge lengths, self-references.
fn hostile_word(rng: &mut Rng, near: u64) -> u64 {
    match rng.below(6) {
        0 => rng.next(),
        1 => near.wrapping_add(rng.below(0x4000)).wrapping_sub(0x2000),
        2 => u64::MAX - rng.below(16),
        3 => 0,
        4 => 0xffff_8000_0000_0000 | rng.next() >> 17,
        _ => near,
    }
}

/// Hostile memory: thousands of mutated images and register files go through attach,
/// task listing and unwinding of every task. Nothing may panic, and every case must end
/// quickly (walks are bounded, never sized by guest data).
#[test]
fn hostile_memory_never_panics_and_stays_bounded() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut cases = 0u32;
    let mut slowest = Duration::ZERO;
    for sk in both() {
        let k = Kernel::attach(&sk.guest).unwrap();
        let image_start = k.symbols.addr("_stext").unwrap();
        let m = k.memory(&sk.guest);
        // Dynamic state: tasks, lists, stacks, per-CPU data, registers.
        for _ in 0..1500 {
            let mut g = sk.guest.clone();
            for _ in 0..1 + rng.below(8) {
                let target = match rng.below(4) {
                    0 => {
                        sk.task_addrs[rng.below(sk.task_addrs.len() as u64) as usize]
                            + rng.below(0x300)
                    }
                    1 => k.addrs.init_task + rng.below(0x300),
                    // Somewhere in a stack: near the saved sp of a task.
                    2 => {
                        let t = sk.task_addrs[rng.below(sk.task_addrs.len() as u64) as usize];
                        m.u64(t + k.layout.task.thread_sp).unwrap_or(t) + rng.below(0x100)
                    }
                    _ => k.addrs.per_cpu_offset + rng.below(0x40),
                } & !7;
                if let Ok(pa) = m.translate(target) {
                    let near = g.read_u64_raw(pa);
                    let _ = g.write_phys(pa, &hostile_word(&mut rng, near).to_le_bytes());
                }
            }
            if rng.below(4) == 0 {
                let v = rng.below(g.vcpus.len() as u64) as usize;
                g.vcpus[v].rsp = hostile_word(&mut rng, g.vcpus[v].rsp);
                g.vcpus[v].rip = hostile_word(&mut rng, g.vcpus[v].rip);
                g.vcpus[v].gs_base = hostile_word(&mut rng, g.vcpus[v].gs_base);
            }
            let t0 = Instant::now();
            let reader = TaskReader::new(&k, &g);
            if let Ok(list) = reader.list() {
                let u = Unwinder::new(&reader, &[]);
                for t in &list.tasks {
                    let tr = u.trace(t);
                    assert!(tr.frames.len() <= crate::stack::MAX_FRAMES);
                }
            }
            slowest = slowest.max(t0.elapsed());
            cases += 1;
        }
        // Static tables: kallsyms, BTF, ORC, VMCOREINFO, page tables.
        let regions = [
            (image_start, 0x30_0000u64),
            (k.symbols.addr("__start_BTF").unwrap(), 0x800),
        ];
        for _ in 0..150 {
            let mut g = sk.guest.clone();
            for _ in 0..1 + rng.below(16) {
                let (start, len) = regions[rng.below(2) as usize];
                let va = start + rng.below(len);
                if let Ok(pa) = m.translate(va) {
                    let near = g.read_u64_raw(pa & !7);
                    let _ = g.write_phys(pa & !7, &hostile_word(&mut rng, near).to_le_bytes());
                }
            }
            if rng.below(8) == 0 {
                // Page tables themselves.
                let at = (g.tables_start() + rng.below(g.ram.len() as u64 - g.tables_start())) & !7;
                let near = g.read_u64_raw(at);
                g.write_phys_raw(at, &hostile_word(&mut rng, near).to_le_bytes());
            }
            let t0 = Instant::now();
            if let Ok(k2) = Kernel::attach(&g) {
                let reader = TaskReader::new(&k2, &g);
                if let Ok(list) = reader.list() {
                    let u = Unwinder::new(&reader, &[]);
                    for t in &list.tasks {
                        u.trace(t);
                    }
                }
            }
            slowest = slowest.max(t0.elapsed());
            cases += 1;
        }
    }
    eprintln!("hostile memory: {cases} cases, slowest {slowest:?}");
    assert!(cases >= 3000);
    assert!(slowest < Duration::from_secs(5), "a case took {slowest:?}");
}

/// Acceptance: no struct offset is a literal in the code that reads kernel structures.
/// Every number added to a guest address there must be an architectural constant, and
/// say so with an `// arch:` comment on its line; struct offsets come from BTF.
#[test]
fn no_struct_offset_is_written_by_hand() {
    let sources = [
        ("tasks.rs", include_str!("tasks.rs")),
        ("stack.rs", include_str!("stack.rs")),
        ("kernel.rs", include_str!("kernel.rs")),
        ("layout.rs", include_str!("layout.rs")),
        ("memory.rs", include_str!("memory.rs")),
        ("ftrace.rs", include_str!("ftrace.rs")),
    ];
    let mut offenders = Vec::new();
    for (file, text) in sources {
        let code = text.split("#[cfg(test)]").next().unwrap_or(text);
        for (n, line) in code.lines().enumerate() {
            let (stmt, comment) = line.split_once("//").unwrap_or((line, ""));
            let literal_after = |pat: &str| {
                stmt.match_indices(pat).any(|(i, _)| {
                    stmt[i + pat.len()..]
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_digit())
                })
            };
            let arithmetic = literal_after("wrapping_add(")
                || literal_after("wrapping_sub(")
                || literal_after("checked_add(")
                || ((stmt.contains("addr") || stmt.contains("base") || stmt.contains("task"))
                    && (literal_after(" + ") || literal_after(" - ")));
            if arithmetic && !comment.trim_start().starts_with("arch:") {
                offenders.push(format!("{file}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "offsets written by hand:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn ftrace_records_users_and_lock_read_as_the_kernel_keeps_them() {
    for mut sk in both() {
        let k = Kernel::attach(&sk.guest).expect("attach");
        let ft = k.ftrace.as_ref().expect("the synthetic kernel has ftrace");
        assert_eq!(ft.disabled, 1 << 25);
        // 6.1's lowest record flag is bit 23, 6.12's bit 19: the count's bits differ.
        let want_mask = if sk.spec.new_orc {
            (1 << 19) - 1
        } else {
            (1 << 23) - 1
        };
        assert_eq!(ft.ref_mask, want_mask, "{}", sk.spec.release);
        let mut g = sk.guest.clone();
        let (a, b) = (sk.function("cmdline_proc_show"), sk.function("pipe_read"));
        // Every site is found, in whichever page it is; others are not.
        for (&ip, &flags_va) in &sk.ftrace.records {
            let r = ft.record(&k.memory(&g), ip).unwrap().expect("a record");
            assert_eq!((r.ip, r.flags_va, r.flags), (ip, flags_va, 0));
        }
        assert_eq!(ft.record(&k.memory(&g), a + 1).unwrap(), None);
        assert_eq!(
            ft.record(&k.memory(&g), sk.function("no_fentry")).unwrap(),
            None
        );
        assert_eq!(ft.lock_owner(&k.memory(&g)).unwrap(), None);
        sk.ftrace.set_lock_owner(&mut g, 0xffff_8880_0123_4500 | 1);
        assert_eq!(
            ft.lock_owner(&k.memory(&g)).unwrap(),
            Some(0xffff_8880_0123_4500)
        );
        sk.ftrace.set_lock_owner(&mut g, 0);

        // Who covers a function: an empty filter covers all, notrace excludes, a filter
        // names; a disabled ops covers nothing.
        assert!(ft.users(&k.memory(&g), a).unwrap().is_empty());
        let only_b = sk.ftrace.add_ops(&mut g, &[b], &[]);
        let all_but_a = sk.ftrace.add_ops(&mut g, &[], &[a]);
        let users = |g: &crate::synth::SynthGuest, ip| -> Vec<u64> {
            let mut v: Vec<u64> = ft
                .users(&k.memory(g), ip)
                .unwrap()
                .iter()
                .map(|u| u.ops)
                .collect();
            v.sort();
            v
        };
        assert_eq!(users(&g, a), Vec::<u64>::new());
        let mut both_ops = vec![only_b, all_but_a];
        both_ops.sort();
        assert_eq!(users(&g, b), both_ops);
        let everything = sk.ftrace.add_ops(&mut g, &[], &[]);
        assert_eq!(users(&g, a), vec![everything]);
        let r = ft.record(&k.memory(&g), b).unwrap().unwrap();
        assert_eq!(ft.refs(&r), 3, "the synthetic guest counts as ftrace does");
        sk.ftrace.disable_ops(&mut g, everything);
        assert_eq!(users(&g, a), Vec::<u64>::new());
    }
}

#[test]
fn corrupt_ftrace_lists_are_errors_not_loops() {
    let sk = SynthKernel::build(SynthKernelSpec::v6_12());
    let k = Kernel::attach(&sk.guest).expect("attach");
    let ft = k.ftrace.as_ref().unwrap();
    let a = sk.function("cmdline_proc_show");
    let mut g = sk.guest.clone();
    // ftrace_ops_list pointing at itself: an ops whose next is itself.
    let list = k.symbols.addr("ftrace_ops_list").unwrap();
    let pa = k.memory(&g).translate(list).unwrap();
    g.write_phys_raw(pa, &(list - 8).to_le_bytes());
    assert!(ft.users(&k.memory(&g), a).is_err());
    // A page list that loops.
    let mut g = sk.guest.clone();
    let start = k.symbols.addr("ftrace_pages_start").unwrap();
    let m = k.memory(&g);
    let first = m.u64(start).unwrap();
    let second = m.u64(first).unwrap();
    let pa = m.translate(second).unwrap();
    g.write_phys_raw(pa, &first.to_le_bytes());
    assert!(ft.record(&k.memory(&g), a + 3).is_err());
}

#[test]
fn hostile_ftrace_memory_is_bounded_and_never_panics() {
    let mut rng = Rng(0x5eed_f7ac_e000_0001);
    for sk in both() {
        let k = Kernel::attach(&sk.guest).unwrap();
        let ft = k.ftrace.as_ref().unwrap();
        let m = k.memory(&sk.guest);
        let mut sites: Vec<u64> = sk.ftrace.records.keys().copied().collect();
        sites.sort();
        // What ftrace's walks read: the page list, records, ops list, a hash.
        let mut g = sk.guest.clone();
        let mut ftc = sk.ftrace.clone();
        ftc.add_ops(&mut g, &sites[..3], &sites[3..5]);
        let start = k.symbols.addr("ftrace_pages_start").unwrap();
        let first_page = m.u64(start).unwrap();
        let targets = [
            start,
            first_page,
            m.u64(first_page + 8).unwrap(),
            k.symbols.addr("ftrace_ops_list").unwrap(),
            m.u64(k.symbols.addr("ftrace_ops_list").unwrap()).unwrap(),
        ];
        let mg = k.memory(&g);
        let (base, hashes) = (g.clone(), mg.u64(targets[4] + 32).unwrap());
        drop(mg);
        let mut slowest = Duration::ZERO;
        for _ in 0..400 {
            let mut h = base.clone();
            for _ in 0..1 + rng.below(4) {
                let at = match rng.below(3) {
                    0 => targets[rng.below(targets.len() as u64) as usize] + 8 * rng.below(4),
                    1 => hashes + 8 * rng.below(3),
                    _ => targets[2] + 8 * rng.below(2 * sites.len() as u64),
                };
                if let Ok(pa) = m.translate(at) {
                    let near = h.read_u64_raw(pa);
                    h.write_phys_raw(pa, &hostile_word(&mut rng, near).to_le_bytes());
                }
            }
            let t0 = Instant::now();
            let mh = k.memory(&h);
            for &ip in sites.iter().step_by(3) {
                let _ = ft.record(&mh, ip);
                let _ = ft.users(&mh, ip);
            }
            let _ = ft.lock_owner(&mh);
            slowest = slowest.max(t0.elapsed());
        }
        assert!(slowest < Duration::from_secs(2), "a case took {slowest:?}");
    }
}

#[test]
fn a_refreshed_list_reads_again_exactly_the_tasks_that_may_have_run() {
    for sk in both() {
        let k = Kernel::attach(&sk.guest).unwrap();
        let mut g = sk.guest.clone();
        // Read while the guest "runs": no vCPU states, as the patcher's early walk.
        let early = TaskReader::new(&k, &crate::guest::Unconfirmed(&g))
            .list()
            .unwrap();
        let task = |pid: i32| early.by_pid(pid).unwrap().addr;
        let poke = |g: &mut crate::synth::SynthGuest, va: u64, bytes: &[u8]| {
            let pa = k.memory(g).translate(va).unwrap();
            g.write_phys_raw(pa, bytes);
        };
        let l = &k.layout.task;
        let (ran, woken, switched_to, renamed) = (task(11), task(12), task(1), task(2));
        // 11 ran and was switched out again: a higher count, another saved stack pointer.
        let switches = early.by_pid(11).unwrap().switches;
        poke(&mut g, ran + l.nvcsw, &(switches + 1).to_le_bytes());
        let sp = early.by_pid(11).unwrap().saved_sp;
        poke(&mut g, ran + l.thread_sp, &(sp - 0x40).to_le_bytes());
        // 12 was woken onto CPU 1 and has not run yet; kthreadd was renamed through /proc.
        poke(&mut g, woken + l.state, &0u32.to_le_bytes());
        poke(&mut g, woken + l.cpu, &1u32.to_le_bytes());
        poke(&mut g, renamed + l.comm, b"renamed\0");
        // CPU 1's scheduler has picked init (`rq->curr`), not yet switched to it.
        let reader = TaskReader::new(&k, &g);
        let rq1 = reader.percpu_base(1).unwrap() + k.addrs.runqueues + k.layout.rq_curr;
        drop(reader);
        poke(&mut g, rq1, &switched_to.to_le_bytes());

        let reader = TaskReader::new(&k, &g);
        let refreshed = reader.refresh(early.clone()).unwrap();
        let fresh = reader.list().unwrap();
        // Read again: 11 (its count), init (`curr` of CPU 1), and the two tasks that
        // were on their CPUs when the early list was read (20, 21). No other.
        assert_eq!(refreshed.reread, 4, "{}", sk.spec.release);
        // Everything a check decides by is what a walk in the pause reads...
        let decisive = |t: &crate::tasks::Task| {
            (
                t.addr, t.pid, t.tgid, t.switches, t.saved_sp, t.on_cpu, t.vcpu, t.idle, t.kthread,
            )
        };
        let got: Vec<_> = refreshed.list.tasks.iter().map(decisive).collect();
        let want: Vec<_> = fresh.tasks.iter().map(decisive).collect();
        assert_eq!(got, want, "{}", sk.spec.release);
        assert_eq!(refreshed.list.vcpus, fresh.vcpus);
        // ...and what a task that did not run keeps from then is its state letter, its
        // CPU and its name.
        let state = |l: &crate::tasks::TaskList, pid| l.by_pid(pid).unwrap().state;
        assert_eq!((state(&refreshed.list, 12), state(&fresh, 12)), ('S', 'R'));
        let cpu = |l: &crate::tasks::TaskList| l.by_pid(12).unwrap().cpu;
        assert_eq!((cpu(&refreshed.list), cpu(&fresh)), (0, 1));
        let comm = |l: &crate::tasks::TaskList| l.by_pid(2).unwrap().comm.clone();
        assert_eq!(
            (comm(&refreshed.list), comm(&fresh)),
            ("kthreadd".into(), "renamed".into())
        );
        assert_eq!(state(&refreshed.list, 11), state(&fresh, 11));

        // An early read is several reads of a running guest: kthreadd read off its CPU,
        // now on one with the same count (its `on_cpu` read before a switch to it, its
        // count after the switch away began). It is read again.
        let mut g = sk.guest.clone();
        poke(&mut g, renamed + l.on_cpu, &1u32.to_le_bytes());
        let reader = TaskReader::new(&k, &g);
        let refreshed = reader.refresh(early.clone()).unwrap();
        assert_eq!(refreshed.reread, 3, "{}", sk.spec.release);
        assert!(refreshed.list.by_pid(2).unwrap().on_cpu);
        assert_eq!(refreshed.list, reader.list().unwrap());
    }
}

// --- Modules: the synthetic kernels load `tunx` and then `dummyx` (which uses it); a
// reader task (pid 30) sleeps in tunx's read.

/// Write `bytes` at kernel virtual address `va` of `g`.
fn poke(k: &Kernel, g: &mut SynthGuest, va: u64, bytes: &[u8]) {
    let pa = k.memory(&*g).translate(va).expect("mapped");
    g.write_phys(pa, bytes).expect("in RAM");
}

/// Module names and symbols as the tests compare them.
fn names(list: &ModuleList) -> Vec<&str> {
    list.modules.iter().map(|m| m.name.as_str()).collect()
}

/// The trace of `pid`, with module code or without.
fn trace_of(k: &Kernel, g: &SynthGuest, pid: i32, with_modules: bool) -> StackTrace {
    let reader = TaskReader::new(k, g);
    let list = reader.list().expect("task list");
    let modules = ModuleCode::new(k, k.memory(g));
    let extra: [&dyn ExtraCode; 1] = [&modules];
    let extra: &[&dyn ExtraCode] = if with_modules { &extra } else { &[] };
    Unwinder::new(&reader, extra).trace(list.by_pid(pid).expect("the task"))
}

fn symbols_of(t: &StackTrace) -> Vec<&str> {
    t.frames
        .iter()
        .map(|f| f.symbol.as_deref().unwrap_or("?"))
        .collect()
}

/// /proc/modules of both layouts: newest first; the size is all of a module's memory
/// (6.1: `core_layout.size + init_layout.size`, 6.12: every `mem[].size`), the base its
/// text; references less the one it starts with; users; `[permanent]` for an init
/// without an exit.
#[test]
fn the_module_list_reads_as_proc_modules_shows_it() {
    for sk in both() {
        let k = Kernel::attach(&sk.guest).unwrap();
        let list = ModuleList::read(&k.memory(&sk.guest), &k).expect("the module list");
        assert_eq!(names(&list), ["dummyx", "tunx"], "newest first");
        let lines: Vec<String> = list.modules.iter().map(|m| m.proc_line()).collect();
        // Three pages each (text, read-only data, data); 6.1 allocates them at once,
        // 6.12 one allocation per memory type, each with a guard page after it (and the
        // init text, freed, between the modules).
        let dummyx_base = if sk.spec.new_orc { 0x8000 } else { 0x6000 };
        assert_eq!(
            lines,
            [
                format!("dummyx 12288 0 [permanent], Live 0xffffffffc000{dummyx_base:04x}"),
                "tunx 12288 2 dummyx, Live 0xffffffffc0000000".to_string()
            ],
            "{}",
            sk.spec.release
        );
        for (m, built) in list.modules.iter().zip(sk.modules.iter().rev()) {
            assert_eq!(
                (&m.name, m.addr, m.state),
                (&built.name, built.addr, ModuleState::Live)
            );
            assert_eq!(
                (m.base, m.size, m.text, m.init_text),
                (built.text.start, built.size, built.text, None)
            );
            assert_eq!(m.text.end - m.text.start, 0x1000);
        }
        let tunx = list.named("tunx").unwrap();
        assert_eq!(tunx.refcount, Some(2), "one user and one open file");
        assert_eq!(
            (tunx.users.as_slice(), tunx.permanent),
            (&["dummyx".to_string()][..], false)
        );
        let dummyx = list.named("dummyx").unwrap();
        assert_eq!(dummyx.refcount, Some(0));
        assert!(dummyx.users.is_empty() && dummyx.permanent);
        // Code is in its own module: not in the kernel's text, a guard page, the other.
        let in_module = |ip: u64| list.containing(ip).map(|m| m.name.as_str());
        assert_eq!(in_module(sk.function("tunx_do_read") + 5), Some("tunx"));
        assert_eq!(in_module(sk.function("dummyx_xmit")), Some("dummyx"));
        assert_eq!(in_module(tunx.text.end), None);
        assert_eq!(in_module(sk.function("pipe_read")), None);
        assert!(!k.is_kernel_text(sk.function("tunx_do_read")));
    }
}

/// A module still loading: its init text is counted (6.1 `init_layout`, 6.12
/// `mem[MOD_INIT_TEXT]`), its symbols are the whole table (init and undefined ones
/// too), its init code is named and unwound (modprobe waiting in it).
#[test]
fn a_loading_module_counts_its_init_text_and_a_task_in_it_unwinds() {
    for spec in [SynthKernelSpec::v6_1(), SynthKernelSpec::v6_12()] {
        let mut spec = spec;
        let mut loadx = SynthModule::new("loadx", &[("loadx_probe", 'T'), ("loadx_remove", 't')]);
        loadx.init_functions = vec!["loadx_init".into(), "loadx_wait_init".into()];
        loadx.exit = Some("loadx_remove".into());
        loadx.uses = vec!["dummyx".into()];
        loadx.state = ModuleState::Coming;
        // Out of tree, a livepatch, and a kernel-wide taint no module letter shows (WARN).
        loadx.taints = (1 << 12) | (1 << 15) | (1 << 9);
        spec.modules.push(loadx);
        spec.tasks.push(SynthTask::sleeping(
            40,
            40,
            "modprobe",
            &[
                "__schedule",
                "schedule",
                "loadx_wait_init",
                "loadx_init",
                "do_one_initcall",
                "do_init_module",
                "load_module",
                "do_syscall_64",
                "entry_SYSCALL_64_after_hwframe",
            ],
        ));
        let sk = SynthKernel::build(spec);
        let k = Kernel::attach(&sk.guest).unwrap();
        let mem = k.memory(&sk.guest);
        let list = ModuleList::read(&mem, &k).unwrap();
        assert_eq!(names(&list), ["loadx", "dummyx", "tunx"]);
        let built = &sk.modules[2];
        let m = list.named("loadx").unwrap();
        let init = built.init_text.expect("init text while coming");
        assert_eq!(m.state, ModuleState::Coming);
        assert_eq!(
            (m.init_text, m.size),
            (Some(init), 16384),
            "{}",
            sk.spec.release
        );
        assert_eq!(m.size, built.size);
        assert_eq!(
            m.proc_line(),
            format!("loadx 16384 0 - Loading 0x{:016x} (OK+)", built.text.start)
        );
        let dummyx = list.named("dummyx").unwrap();
        assert!(dummyx
            .proc_line()
            .starts_with("dummyx 12288 1 loadx,[permanent], Live "));
        assert_eq!(
            list.containing(init.start + 0x120).map(|m| &m.name[..]),
            Some("loadx")
        );

        let syms = m.symbols(&mem, &k).unwrap();
        let table: Vec<(char, &str, bool)> = syms
            .symbols
            .iter()
            .map(|s| (s.proc_kind(), s.name.as_str(), s.undefined))
            .collect();
        assert_eq!(
            table,
            [
                ('u', "", true),
                ('t', "loadx_remove", false),
                ('t', "loadx_init", false),
                ('t', "loadx_wait_init", false),
                ('t', "loadx_probe", false),
                ('d', "__this_module", false),
                ('u', "__fentry__", true),
            ]
        );
        // In init text, the last symbol ends where the init text ends.
        let at = syms.locate(init.start + 0x123).map(|l| l.display());
        assert_eq!(at.as_deref(), Some("loadx_wait_init+0x23/0xf00"));

        let t = trace_of(&k, &sk.guest, 40, true);
        assert!(t.reliable, "{:?}", t.problem);
        assert_eq!(
            symbols_of(&t)[2..5],
            [
                "loadx_wait_init+0x10/0xf00 [loadx]",
                "loadx_init+0x10/0x100 [loadx]",
                "do_one_initcall+0x10/0x100"
            ]
        );
    }
}

/// `Module::symbols` is the module's `mod_kallsyms` in table order (ELF order: locals
/// then globals, not address order), and /proc/kallsyms's letter is upper case exactly
/// for the symbols the module exports (a global that is not exported prints lower
/// case, as `__this_module` does).
#[test]
fn module_symbols_are_its_table_in_order_upper_case_exactly_when_exported() {
    for sk in both() {
        let k = Kernel::attach(&sk.guest).unwrap();
        let mem = k.memory(&sk.guest);
        k.layout.modules.as_ref().expect("module layout from BTF");
        let list = ModuleList::read(&mem, &k).unwrap();
        for built in &sk.modules {
            let syms = list.named(&built.name).unwrap().symbols(&mem, &k).unwrap();
            assert_eq!(syms.module, built.name);
            let got: Vec<SynthModuleSymbol> = syms
                .symbols
                .iter()
                .map(|s| SynthModuleSymbol {
                    addr: s.addr,
                    kind: s.kind,
                    name: s.name.clone(),
                    exported: s.exported,
                    undefined: s.undefined,
                })
                .collect();
            assert_eq!(got, built.symbols, "{} {}", sk.spec.release, built.name);
            for s in &syms.symbols {
                assert_eq!(s.proc_kind().is_ascii_uppercase(), s.exported, "{}", s.name);
            }
        }
        let tunx = list.named("tunx").unwrap().symbols(&mem, &k).unwrap();
        let table: Vec<(char, &str)> = tunx
            .symbols
            .iter()
            .map(|s| (s.proc_kind(), s.name.as_str()))
            .collect();
        assert_eq!(
            table,
            [
                ('u', ""),
                ('t', "tunx_chr_read_iter"),
                ('t', "tunx_do_read"),
                ('t', "tunx_cleanup"),
                ('d', "tunx_fops"),
                ('T', "tunx_get_socket"),
                ('d', "tunx_debug"),
                ('d', "__this_module"),
            ]
        );
        assert_eq!(
            tunx.symbols[6].kind, 'D',
            "global in its typetab, not exported"
        );
        let named = tunx.named("tunx_do_read");
        assert_eq!(named.len(), 1);
        assert_eq!(named[0].addr, sk.function("tunx_do_read"));
    }
}

/// `locate` names an address as the kernel's `find_kallsyms_symbol` does: the nearest
/// symbol at or below it, its size the distance to the next symbol, or to the end of
/// the module's text for the last one; `locate_return` looks up `addr - 1` (`%pB`).
#[test]
fn module_addresses_are_named_as_find_kallsyms_symbol_names_them() {
    for sk in both() {
        let k = Kernel::attach(&sk.guest).unwrap();
        let mem = k.memory(&sk.guest);
        let list = ModuleList::read(&mem, &k).unwrap();
        let syms = |name| list.named(name).unwrap().symbols(&mem, &k).unwrap();
        let (tunx, dummyx) = (syms("tunx"), syms("dummyx"));
        let text = sk.modules[0].text.start;
        let at = |s: &crate::modules::ModuleSymbols, a| s.locate(a).map(|l| l.display());
        let ret = |s: &crate::modules::ModuleSymbols, a| s.locate_return(a).map(|l| l.display());
        assert_eq!(
            at(&tunx, text).as_deref(),
            Some("tunx_chr_read_iter+0x0/0x100")
        );
        assert_eq!(
            at(&tunx, text + 0x1ff).as_deref(),
            Some("tunx_do_read+0xff/0x100")
        );
        assert_eq!(
            at(&tunx, text + 0x200).as_deref(),
            Some("tunx_get_socket+0x0/0x100")
        );
        // The last function: to the end of the text (its st_size says 0x100).
        assert_eq!(
            at(&tunx, text + 0x342).as_deref(),
            Some("tunx_cleanup+0x42/0xd00")
        );
        // A return address at a function's end is its function's, not the next one's.
        assert_eq!(
            ret(&tunx, text + 0x200).as_deref(),
            Some("tunx_do_read+0x100/0x100")
        );
        assert_eq!(
            ret(&tunx, text + 0x110).as_deref(),
            Some("tunx_do_read+0x10/0x100")
        );
        assert_eq!(at(&tunx, text - 1), None, "below every symbol");
        assert_eq!(ret(&tunx, 0), None);
        let last = sk.function("dummyx_get_stats");
        assert_eq!(
            at(&dummyx, last + 8).as_deref(),
            Some("dummyx_get_stats+0x8/0xe00")
        );
        let l = tunx.locate(text + 0x123).unwrap();
        assert_eq!(
            (l.symbol_addr, l.offset, l.size),
            (text + 0x100, 0x23, Some(0x100))
        );
    }
}

/// A task asleep in a module unwinds reliably through it with the module's own ORC,
/// its frames named `func+0xoff/0xsize [module]` as /proc/PID/stack names them; without
/// module code the same stack is unreliable (module text is not kernel text).
#[test]
fn a_task_asleep_in_a_module_unwinds_reliably_only_with_module_code() {
    for sk in both() {
        let k = Kernel::attach(&sk.guest).unwrap();
        let t = trace_of(&k, &sk.guest, 30, true);
        assert!(t.reliable, "{}: {:?}", sk.spec.release, t.problem);
        assert_eq!(t.start, TraceStart::Saved);
        assert_eq!(
            functions(&t),
            [
                "__schedule",
                "schedule",
                "tunx_do_read",
                "tunx_chr_read_iter",
                "vfs_read",
                "ksys_read",
                "do_syscall_64",
                "entry_SYSCALL_64_after_hwframe"
            ]
        );
        assert_eq!(
            symbols_of(&t)[1..5],
            [
                "schedule+0x10/0x100",
                "tunx_do_read+0x10/0x100 [tunx]",
                "tunx_chr_read_iter+0x10/0x100 [tunx]",
                "vfs_read+0x10/0x100"
            ]
        );
        let read = sk.function("tunx_do_read");
        assert!(t.touches(read, read + 0x100));
        assert!(!t.frames[2].sched && !t.frames[2].interrupted);

        let bare = trace_of(&k, &sk.guest, 30, false);
        assert!(!bare.reliable);
        let why = bare.problem.clone().unwrap();
        assert!(why.contains("not kernel text"), "{why}");
        assert!(why.contains(&format!("{:#x}", read + 0x10)), "{why}");
        assert_eq!(functions(&bare), ["__schedule", "schedule"]);
    }
}

/// The same spec builds the same guest, byte for byte (modules included).
#[test]
fn synthetic_kernels_build_the_same_every_time() {
    for (a, b) in both().into_iter().zip(both()) {
        assert!(a.guest.ram == b.guest.ram, "{}", a.spec.release);
        assert_eq!(a.symbols, b.symbols);
        assert_eq!(a.guest.vcpus, b.guest.vcpus);
    }
}

/// Runs `f` and fails if it took more than a second: a walk over hostile module memory
/// must stay bounded.
fn quickly<R>(what: &str, f: impl FnOnce() -> R) -> R {
    let t0 = Instant::now();
    let r = f();
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "{what} took {:?}",
        t0.elapsed()
    );
    r
}

/// A module list corrupted into a cycle or a bogus link, and tables with absurd
/// counts: an error, or an unreliable trace, quickly; never a panic or a hang.
#[test]
fn corrupt_module_lists_and_tables_are_errors_or_unreliable_never_hangs() {
    for sk in both() {
        let k = Kernel::attach(&sk.guest).unwrap();
        let l = k.layout.modules.as_ref().unwrap().clone();
        let (tunx, dummyx) = (&sk.modules[0], &sk.modules[1]);
        let read =
            |g: &SynthGuest| quickly("the module list", || ModuleList::read(&k.memory(g), &k));
        let corrupt = |e: ModuleError, want: &str| {
            assert!(matches!(e, ModuleError::Corrupt(_)), "{e:?}");
            assert!(e.to_string().contains(want), "{e}");
        };
        let unreliable_in_tunx = |g: &SynthGuest| {
            let t = quickly("the trace", || trace_of(&k, g, 30, true));
            assert!(!t.reliable, "{t:?}");
            t.problem.unwrap()
        };

        // A cycle that never comes back to the head: after tunx, dummyx again.
        let mut g = sk.guest.clone();
        poke(
            &k,
            &mut g,
            tunx.addr + l.list,
            &(dummyx.addr + l.list).to_le_bytes(),
        );
        corrupt(read(&g).unwrap_err(), "reached twice (a cycle)");
        // No module list: module text is unknown text, never wrongly reliable.
        assert!(unreliable_in_tunx(&g).contains("not kernel text"));

        // A link out of kernel memory, and one into nothing.
        for bogus in [0x1234u64, 0xffff_8000_dead_0000] {
            let mut g = sk.guest.clone();
            poke(&k, &mut g, dummyx.addr + l.list, &bogus.to_le_bytes());
            let err = read(&g).unwrap_err();
            assert!(
                matches!(err, ModuleError::Corrupt(_) | ModuleError::Mem(_)),
                "{err}"
            );
            assert!(unreliable_in_tunx(&g).contains("not kernel text"));
        }

        // A users list that loops (a module_use whose next is itself).
        let mut g = sk.guest.clone();
        let [source_list, ..] = l.users.unwrap();
        let node = k.memory(&g).u64(tunx.addr + source_list).unwrap();
        poke(&k, &mut g, node, &node.to_le_bytes());
        corrupt(read(&g).unwrap_err(), "a user link");

        // num_symtab 2^31: the symbols are an error; the stack, unwound by ORC, still
        // unwinds reliably, its module frames unnamed.
        let mut g = sk.guest.clone();
        let kallsyms = k.memory(&g).u64(tunx.addr + l.kallsyms).unwrap();
        poke(
            &k,
            &mut g,
            kallsyms + l.num_symtab,
            &(1u32 << 31).to_le_bytes(),
        );
        let list = read(&g).unwrap();
        let m = list.named("tunx").unwrap();
        corrupt(
            m.symbols(&k.memory(&g), &k).unwrap_err(),
            "2147483648 symbols",
        );
        let t = trace_of(&k, &g, 30, true);
        assert!(t.reliable, "{:?}", t.problem);
        assert_eq!(
            (t.frames[2].symbol.as_deref(), t.frames[4].symbol.as_deref()),
            (None, Some("vfs_read+0x10/0x100"))
        );

        // A huge num_syms (exports): over the bound, corrupt; at it (12 MiB of
        // `kernel_symbol`s), a read that fails where the module's memory ends.
        for n in [u32::MAX, 1 << 20] {
            let mut g = sk.guest.clone();
            poke(&k, &mut g, tunx.addr + l.num_syms, &n.to_le_bytes());
            let list = read(&g).unwrap();
            let m = list.named("tunx").unwrap();
            let err = quickly("the symbols", || m.symbols(&k.memory(&g), &k)).unwrap_err();
            match n {
                u32::MAX => corrupt(err, "4294967295 exports"),
                _ => assert!(matches!(err, ModuleError::Mem(_)), "{err}"),
            }
        }

        // ORC: too many entries, or none: the trace cannot go through the module.
        let [num_orcs, ..] = l.orc.unwrap();
        for n in [u32::MAX, 0] {
            let mut g = sk.guest.clone();
            poke(&k, &mut g, tunx.addr + num_orcs, &n.to_le_bytes());
            let m = read(&g).unwrap().named("tunx").unwrap().clone();
            if n != 0 {
                assert!(matches!(
                    m.orc(&k.memory(&g), &k),
                    Err(ModuleError::Orc { .. })
                ));
            }
            assert!(unreliable_in_tunx(&g).contains("no unwind information"));
        }
    }
}

/// The words of module memory a hostile guest may change: the list head, each
/// `struct module`, its symbol tables and the rest of its data, its exports and ORC
/// tables, and the `module_use`s. Except (a known bug, reported: modules.rs `users`
/// adds a user link and a `module_use.source` unchecked, and panics on overflow) the
/// words those two are read from, which [`hostile_module_memory_never_panics_and_stays_bounded`]
/// leaves alone until that is fixed.
fn module_words(sk: &SynthKernel, k: &Kernel) -> (Vec<u64>, Vec<u64>) {
    let m = k.memory(&sk.guest);
    let l = k.layout.modules.as_ref().unwrap();
    let [source_list, link, source] = l.users.unwrap();
    let mut words = vec![k.symbols.addr("modules").unwrap()];
    let mut users = Vec::new();
    for built in &sk.modules {
        let data_end = (built.addr | 0xfff) + 1;
        words.extend((built.addr..data_end).step_by(8));
        words.extend((built.syms..built.syms + 0x100).step_by(8));
        let (ips, entries, count) = built.orc;
        words.extend((ips..entries + 6 * count).step_by(8));
        let head = built.addr + source_list;
        let mut node = m.u64(head).unwrap();
        users.push(head);
        while node != head {
            words.extend((0..48).step_by(8).map(|o| node - link + o));
            users.push(node - link + source);
            node = m.u64(node).unwrap();
        }
    }
    words.sort_unstable();
    words.dedup();
    (words, users)
}

/// Hostile module memory: words of the module list, `struct module`s, their symbol,
/// export and ORC tables overwritten, then everything read from modules: the list, each
/// module's symbols (and names of addresses), ORC table and /proc/modules line, and
/// every task unwound through module code. Nothing may panic; every case ends quickly.
#[test]
fn hostile_module_memory_never_panics_and_stays_bounded() {
    let mut rng = Rng(0x5eed_30d0_1e00_0001);
    let mut slowest = Duration::ZERO;
    let mut cases = 0;
    for sk in both() {
        let k = Kernel::attach(&sk.guest).unwrap();
        let (words, users) = module_words(&sk, &k);
        let mut g = sk.guest.clone();
        for _ in 0..700 {
            let mut undo = Vec::new();
            for _ in 0..1 + rng.below(6) {
                let va = words[rng.below(words.len() as u64) as usize];
                let pa = k.memory(&g).translate(va).unwrap();
                let near = g.read_u64_raw(pa);
                let mut value = hostile_word(&mut rng, near);
                if users.contains(&va) && value > u64::MAX - 0x40 {
                    value = near; // The known overflow (see module_words).
                }
                undo.push((pa, near));
                g.write_phys_raw(pa, &value.to_le_bytes());
            }
            let t0 = Instant::now();
            let mem = k.memory(&g);
            if let Ok(list) = ModuleList::read(&mem, &k) {
                for m in &list.modules {
                    let _ = m.proc_line();
                    let _ = m.orc(&mem, &k);
                    if let Ok(s) = m.symbols(&mem, &k) {
                        for a in [m.text.start, m.text.start.wrapping_add(0x110), m.text.end] {
                            let _ = (s.locate(a), s.locate_return(a));
                        }
                    }
                }
            }
            let reader = TaskReader::new(&k, &g);
            let code = ModuleCode::new(&k, k.memory(&g));
            let extra: [&dyn ExtraCode; 1] = [&code];
            let u = Unwinder::new(&reader, &extra);
            for t in &reader.list().unwrap().tasks {
                assert!(u.trace(t).frames.len() <= crate::stack::MAX_FRAMES);
            }
            slowest = slowest.max(t0.elapsed());
            cases += 1;
            for (pa, old) in undo.into_iter().rev() {
                g.write_phys_raw(pa, &old.to_le_bytes());
            }
        }
    }
    eprintln!("hostile module memory: {cases} cases, slowest {slowest:?}");
    assert!(slowest < Duration::from_secs(1), "a case took {slowest:?}");
}

// --- Bugs the synthetic modules found in modules.rs, each as the input that showed
// it (all fixed: each test fails on the code before the fix).

/// modules.rs `users`: `next.wrapping_sub(link) + source` with a guest-supplied user
/// link within 32 bytes of 2^64 overflows (a panic where overflow is checked: tests,
/// the fuzz profile) instead of an error.
#[test]

fn a_user_link_near_the_top_of_the_address_space_is_an_error() {
    for sk in both() {
        let k = Kernel::attach(&sk.guest).unwrap();
        let l = k.layout.modules.as_ref().unwrap();
        let mut g = sk.guest.clone();
        let head = sk.modules[0].addr + l.users.unwrap()[0];
        poke(&k, &mut g, head, &(u64::MAX - 7).to_le_bytes());
        assert!(ModuleList::read(&k.memory(&g), &k).is_err());
    }
}

/// modules.rs `users`: `user + l.name` with a guest-supplied `module_use.source` of
/// u64::MAX overflows.
#[test]

fn a_module_use_source_of_all_ones_is_an_error() {
    for sk in both() {
        let k = Kernel::attach(&sk.guest).unwrap();
        let l = k.layout.modules.as_ref().unwrap();
        let [source_list, link, source] = l.users.unwrap();
        let mut g = sk.guest.clone();
        let node = k.memory(&g).u64(sk.modules[0].addr + source_list).unwrap();
        poke(&k, &mut g, node - link + source, &u64::MAX.to_le_bytes());
        assert!(ModuleList::read(&k.memory(&g), &k).is_err());
    }
}

/// modules.rs `exports`: each export's name is read as 512 bytes (`fixed_str(name_at,
/// KSYM_NAME_LEN)`), which fails for a name within 512 bytes of the end of its
/// allocation when unmapped memory follows (6.4+: read-only data is an allocation of its
/// own, a guard page after it); the name then reads as "" and the export is not found:
/// /proc/kallsyms says `T tunx_get_socket`, lpvmm `t`. The string table's names are
/// read with `read_some` for exactly this reason; the export names are not.
#[test]

fn an_export_named_at_the_end_of_read_only_data_is_still_exported() {
    let sk = SynthKernel::build(SynthKernelSpec::v6_12());
    let k = Kernel::attach(&sk.guest).unwrap();
    let tunx = &sk.modules[0];
    let mut g = sk.guest.clone();
    // Its one export's name moved to the last bytes of its read-only data's page.
    let name = b"tunx_get_socket\0";
    let at = (tunx.syms | 0xfff) + 1 - name.len() as u64;
    poke(&k, &mut g, at, name);
    let name_offset = at.wrapping_sub(tunx.syms + 4) as i32; // kernel_symbol.name_offset
    poke(&k, &mut g, tunx.syms + 4, &name_offset.to_le_bytes());
    let list = ModuleList::read(&k.memory(&g), &k).unwrap();
    let syms = list
        .named("tunx")
        .unwrap()
        .symbols(&k.memory(&g), &k)
        .unwrap();
    assert_eq!(syms.named("tunx_get_socket")[0].proc_kind(), 'T');
}

/// modules.rs `read_some`: `at += chunk` overflows for a string table in the last page
/// of the address space (the guest's page tables are its own: it may map that page).
#[test]

fn a_string_table_in_the_top_page_is_read_or_an_error() {
    let sk = SynthKernel::build(SynthKernelSpec::v6_1());
    let k = Kernel::attach(&sk.guest).unwrap();
    let l = k.layout.modules.as_ref().unwrap();
    let mut g = sk.guest.clone();
    g.map(0xffff_ffff_ffff_f000, g.patch_area.start, 4096);
    let kallsyms = k.memory(&g).u64(sk.modules[0].addr + l.kallsyms).unwrap();
    poke(
        &k,
        &mut g,
        kallsyms + l.strtab,
        &0xffff_ffff_ffff_fff0u64.to_le_bytes(),
    );
    let list = ModuleList::read(&k.memory(&g), &k).unwrap();
    let _ = list.named("tunx").unwrap().symbols(&k.memory(&g), &k);
}

/// modules.rs `ModuleList::read`: the list walk (up to 8192 modules) and each module's
/// users walk (up to 8192 users) multiply. One module linked to itself, with 2000 users
/// that all lead back to it, is read 8192 times with all its users: seconds, and
/// 8192 x 2000 user names held (with 8191 users: ~15 s here). A module seen twice (a
/// cycle), or a bound on users over the whole walk, would end it at once.
#[test]

fn a_self_linked_module_with_many_users_is_an_error_quickly() {
    let sk = SynthKernel::build(SynthKernelSpec::v6_1());
    let k = Kernel::attach(&sk.guest).unwrap();
    let l = k.layout.modules.as_ref().unwrap();
    let [source_list, link, source] = l.users.unwrap();
    let (tunx, dummyx) = (&sk.modules[0], &sk.modules[1]);
    let mut g = sk.guest.clone();
    // 2000 module_use nodes (in memory mapped for them), each a use by dummyx.
    let n = 2000u64;
    let (base, pa) = (0xffff_ffff_c100_0000u64, g.patch_area.start);
    g.map(base, pa, (48 * n).next_multiple_of(4096));
    let head = tunx.addr + source_list;
    for i in 0..n {
        let next = if i + 1 == n {
            head
        } else {
            base + 48 * (i + 1)
        };
        g.write_phys_raw(pa + 48 * i, &next.to_le_bytes());
        g.write_phys_raw(pa + 48 * i + source - link, &dummyx.addr.to_le_bytes());
    }
    poke(&k, &mut g, head, &base.to_le_bytes());
    poke(
        &k,
        &mut g,
        tunx.addr + l.list,
        &(tunx.addr + l.list).to_le_bytes(),
    );
    let r = quickly("the module list", || ModuleList::read(&k.memory(&g), &k));
    assert!(r.is_err());
}

/// modules.rs `read_memory`: `addr + array + t * stride` (6.4+) and `addr + at + base`
/// (6.1) add offsets from the guest's BTF unchecked: a BTF whose `struct module_memory`
/// is 4 GiB (or whose `core_layout` and `module_layout.base` offsets are each near
/// 512 MiB) overflows past 2^64 for a module at 0xffffffffc0000000. Found by the fuzz
/// target `guest` (overwrites of two BTF words, then the module walk over the kernel
/// attached again); here the layout such a BTF gives, directly.
#[test]

fn module_layouts_from_hostile_btf_are_errors() {
    use crate::layout::ModuleMemLayout;
    for sk in both() {
        let mut k = Kernel::attach(&sk.guest).unwrap();
        match &mut k.layout.modules.as_mut().unwrap().mem {
            ModuleMemLayout::Mem { stride, .. } => *stride = u64::from(u32::MAX),
            ModuleMemLayout::Layouts { core, base, .. } => {
                (*core, *base) = (0x1fff_ffff, 0x1fff_ffff);
            }
        }
        assert!(ModuleList::read(&k.memory(&sk.guest), &k).is_err());
    }
}

/// A task caught on a vCPU at an address the ORC table marks as a stack's end (6.1's
/// retpoline thunks carry such a hint) has callers the table does not describe: its
/// trace is unreliable, never a reliable one-frame stack (found by the integration
/// suite: `dd` caught at `__x86_indirect_thunk_array+0x0` on 6.1, 2026-12-07).
#[test]
fn a_task_interrupted_where_the_orc_table_says_end_is_unreliable() {
    for sk in both() {
        let k = Kernel::attach(&sk.guest).unwrap();
        let mut g = sk.guest.clone();
        let busy = trace_of(&k, &g, 20, true);
        assert!(busy.reliable, "{busy:?}");
        // The same task, interrupted in ret_from_fork (an end-of-stack entry).
        g.vcpus[0].rip = sk.function("ret_from_fork") + 0x20;
        let t = trace_of(&k, &g, 20, true);
        assert!(!t.reliable, "{t:?}");
        let why = t.problem.unwrap_or_default();
        assert!(why.contains("marks as a stack's end"), "{why}");
    }
}
