//! End-to-end tests over synthetic kernels of both formats: attach, symbols, tasks and
//! stacks, layouts that move with BTF, and hostile memory.

use std::time::{Duration, Instant};

use crate::guest::PausedGuest;
use crate::kernel::Kernel;
use crate::stack::{StackTrace, TraceStart, Unwinder};
use crate::synth::{SynthKernel, SynthKernelSpec};
use crate::tasks::TaskReader;

fn both() -> [SynthKernel; 2] {
    [
        SynthKernel::build(SynthKernelSpec::v6_1()),
        SynthKernel::build(SynthKernelSpec::v6_12()),
    ]
}

fn traces(k: &Kernel, guest: &dyn PausedGuest) -> Vec<StackTrace> {
    let reader = TaskReader::new(k, guest);
    let list = reader.list().expect("task list");
    let unwinder = Unwinder::new(&reader, &[]);
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
