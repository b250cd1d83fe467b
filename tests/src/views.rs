//! lpvmm's view of a running guest checked against the guest's own: its symbol table
//! against /proc/kallsyms, its task list against /proc, its stacks against
//! /proc/PID/stack. Shared by the introspection tests (the busybox guest) and the
//! Debian system's (tests/system.rs), so that both hold lpvmm to the same rules.

use std::collections::{BTreeMap, BTreeSet};

use lpvmm::proto::StackResult;

use crate::{check, json, patchtest, Guest};

/// Count, hash and per-chunk hashes of a command's output lines, computed where the
/// command runs: under nested TCG megabytes of console text are slow, so only a small
/// region that differs is ever printed.
const CHUNK_LINES: usize = 4096;
const SHOW_LINES: usize = 48;

fn digest_cmd(producer: &str, dir: &str, chunk: usize) -> String {
    format!(
        "rm -rf {dir}; mkdir -p {dir}; {producer} > {dir}/all; wc -l < {dir}/all; \
         sha256sum < {dir}/all; cd {dir} && \
         awk -v n={chunk} '{{ print > sprintf(\"part_%05d\", int((NR - 1) / n)) }}' all && \
         for f in part_*; do sha256sum < $f; done; cd /"
    )
}

fn nonempty_lines(t: &str) -> Vec<String> {
    t.lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Index of the first differing per-chunk hash (the first two lines are count and hash).
fn first_differing_chunk(a: &[String], b: &[String]) -> usize {
    (2..a.len().max(b.len()))
        .find(|&i| a.get(i) != b.get(i))
        .map(|i| i - 2)
        .unwrap_or(0)
}

/// The guest's symbols as lpvmm must show them: BPF programs and ftrace trampolines
/// ("[bpf]", "[__builtin__...]") are not the kernel's nor a module's symbols; module
/// lines ("[tun]") are compared too.
const GUEST_KALLSYMS: &str = "grep -v -F -e '[bpf]' -e '[__builtin' /proc/kallsyms";

/// `lpvmm sym --all` equals the guest's /proc/kallsyms, every entry, its modules'
/// included. Returns the number of entries; an error shows the first lines that differ.
pub fn kallsyms_equal(g: &mut Guest, series: &str) -> Result<u64, String> {
    let guest = nonempty_lines(&g.run(&digest_cmd(GUEST_KALLSYMS, "/tmp/ks", CHUNK_LINES))?);
    let module_lines = g.run("grep -c -F '[' /proc/kallsyms || true")?;
    let tmp = g.host.tmp();
    let (rc, out) = g.lpvmm(&format!("sym {{vm}} --all > {tmp}/ours.all"))?;
    check!(rc == 0, "lpvmm sym --all failed: {out}");
    let ours_cmd = format!("cat {tmp}/ours.all");
    let ours = nonempty_lines(&g.host.exec(&digest_cmd(
        &ours_cmd,
        &format!("{tmp}/ks"),
        CHUNK_LINES,
    ))?);
    eprintln!(
        "{series}: /proc/kallsyms has {} kernel and module entries ({} lines name a module or bpf), lpvmm {}",
        guest.first().map(String::as_str).unwrap_or("?"),
        module_lines.trim(),
        ours.first().map(String::as_str).unwrap_or("?")
    );
    if guest == ours {
        let n = guest
            .first()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        check!(n > 10_000, "suspiciously few symbols: {guest:?}");
        check!(
            module_lines.trim().parse::<u64>().unwrap_or(0) > 0,
            "{series}: no module lines in /proc/kallsyms: {module_lines}"
        );
        return Ok(n);
    }
    Err(kallsyms_difference(g, series, &guest, &ours, &ours_cmd)?)
}

/// Where two symbol tables differ: a few lines from both sides.
fn kallsyms_difference(
    g: &mut Guest,
    series: &str,
    guest: &[String],
    ours: &[String],
    ours_cmd: &str,
) -> Result<String, String> {
    let tmp = g.host.tmp();
    let chunk = first_differing_chunk(guest, ours);
    let window = |producer: &str, dir: &str| {
        let from = chunk * CHUNK_LINES + 1;
        let sub = format!("{producer} | sed -n '{from},{}p'", from + CHUNK_LINES - 1);
        digest_cmd(&sub, dir, SHOW_LINES)
    };
    let g2 = nonempty_lines(&g.run(&window(GUEST_KALLSYMS, "/tmp/ks2"))?);
    let o2 = nonempty_lines(&g.host.exec(&window(ours_cmd, &format!("{tmp}/ks2")))?);
    let sub = first_differing_chunk(&g2, &o2);
    let show = format!(
        "sed -n '{},{}p'",
        sub * SHOW_LINES + 1,
        (sub + 1) * SHOW_LINES
    );
    let theirs_region = g.run(&format!("{show} /tmp/ks2/all"))?;
    let ours_region = g.host.exec(&format!("{show} {tmp}/ks2/all"))?;
    Ok(format!(
        "{series}: symbol tables differ: guest {} entries (sha256 {}), lpvmm {} (sha256 {}).\n\
         Lines {}.. of chunk {chunk}:\nguest:\n{theirs_region}\nlpvmm:\n{ours_region}",
        guest.first().map(String::as_str).unwrap_or("?"),
        guest.get(1).map(String::as_str).unwrap_or("?"),
        ours.first().map(String::as_str).unwrap_or("?"),
        ours.get(1).map(String::as_str).unwrap_or("?"),
        sub * SHOW_LINES + 1
    ))
}

/// `lpvmm modules` equals the guest's /proc/modules line for line. Returns how many
/// modules are loaded.
pub fn modules_equal(g: &mut Guest, series: &str) -> Result<usize, String> {
    let theirs = g.run("cat /proc/modules")?;
    let (rc, ours) = g.lpvmm("modules {vm}")?;
    check!(rc == 0, "{series}: lpvmm modules failed: {ours}");
    check!(
        nonempty_lines(&ours) == nonempty_lines(&theirs),
        "{series}: lpvmm modules:\n{ours}\n/proc/modules:\n{theirs}"
    );
    Ok(nonempty_lines(&theirs).len())
}

/// The guest's own view of its tasks: "tid tgid comm" per thread.
const GUEST_TASKS: &str = "for p in /proc/[0-9]*; do for t in $p/task/[0-9]*; do \
    read -r c < $t/comm 2>/dev/null && echo \"${t##*/} ${p##*/} $c\"; done; done";

/// A task as both sides name it: (tid, tgid, comm).
type TaskId = (i64, i64, String);

fn task_set(out: &str) -> BTreeSet<TaskId> {
    out.lines()
        .filter_map(|l| {
            let mut f = l.trim().splitn(3, ' ');
            Some((
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
                f.next()?.to_string(),
            ))
        })
        .collect()
}

/// lpvmm shows task->comm, at most 15 bytes. /proc/PID/comm shows a kthread's full
/// name where it was cut (`get_kthread_comm`) and a workqueue worker's last work
/// (`wq_worker_comm`, "-desc"/"+desc"): the same name, decorated.
fn same_name(ours: &str, theirs: &str) -> bool {
    ours == theirs
        || (theirs.starts_with(ours)
            && (ours.len() == 15 || matches!(theirs[ours.len()..].chars().next(), Some('-' | '+'))))
}

fn same_task(a: &TaskId, b: &TaskId) -> bool {
    a.0 == b.0 && a.1 == b.1 && same_name(&a.2, &b.2)
}

/// `lpvmm tasks` equals the guest's view (every task the guest shows before and after
/// lpvmm's walk, and nothing the guest never showed), with one idle task and one
/// current task per vCPU. Returns a one-line summary.
pub fn tasks_equal(g: &mut Guest, series: &str, vcpus: u64) -> Result<String, String> {
    let before = task_set(&g.run(GUEST_TASKS)?);
    // The wire contract: raw JSON on purpose. `tasks --json` as its words are.
    let (rc, out) = g.lpvmm("tasks {vm} --json")?;
    check!(rc == 0, "lpvmm tasks failed: {out}");
    let after = task_set(&g.run(GUEST_TASKS)?);
    let v = json(&out)?;
    let tasks = v["list"]["tasks"].as_array().ok_or("no tasks")?;
    let ours: BTreeSet<TaskId> = tasks
        .iter()
        .filter(|t| !t["idle"].as_bool().unwrap_or(false))
        .map(|t| {
            (
                t["pid"].as_i64().unwrap_or(-1),
                t["tgid"].as_i64().unwrap_or(-1),
                t["comm"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let stable: Vec<_> = before.intersection(&after).collect();
    let missing: Vec<_> = stable
        .iter()
        .filter(|t| !ours.iter().any(|o| same_task(o, t)))
        .collect();
    check!(
        missing.is_empty(),
        "{series}: tasks the guest shows before and after but lpvmm does not: {missing:?}\nlpvmm: {ours:?}"
    );
    let union: BTreeSet<_> = before.union(&after).cloned().collect();
    let unexplained: Vec<_> = ours
        .iter()
        .filter(|o| !union.iter().any(|t| same_task(o, t)))
        .collect();
    check!(
        unexplained.is_empty(),
        "{series}: lpvmm lists tasks the guest never showed: {unexplained:?}"
    );
    let idle = tasks
        .iter()
        .filter(|t| t["idle"].as_bool() == Some(true))
        .count() as u64;
    check!(
        idle == vcpus,
        "{series}: {idle} idle tasks for {vcpus} vCPUs"
    );
    let on_vcpus = vcpu_tasks(&v["list"]["vcpus"], &ours, series, vcpus)?;
    Ok(format!(
        "{} tasks match the guest ({} stable, {idle} idle); vCPUs: {on_vcpus}",
        ours.len(),
        stable.len(),
    ))
}

/// Each vCPU's current task is a known one (or idle), and the vCPUs are CPUs 0..n.
fn vcpu_tasks(
    vcpus: &serde_json::Value,
    ours: &BTreeSet<TaskId>,
    series: &str,
    n: u64,
) -> Result<String, String> {
    let vcpus = vcpus.as_array().ok_or("no vcpus")?;
    check!(
        vcpus.len() as u64 == n,
        "{series}: {} vCPUs reported",
        vcpus.len()
    );
    let mut cpus = Vec::new();
    for vc in vcpus {
        let pid = vc["pid"]
            .as_i64()
            .ok_or_else(|| format!("vCPU without a current task: {vc}"))?;
        let known = pid == 0 || ours.iter().any(|t| t.0 == pid);
        check!(
            known,
            "{series}: vCPU current pid {pid} is not in the task list: {vc}"
        );
        cpus.push(
            vc["cpu"]
                .as_u64()
                .ok_or_else(|| format!("vCPU without a CPU: {vc}"))?,
        );
    }
    cpus.sort();
    check!(
        cpus == (0..n).collect::<Vec<_>>(),
        "{series}: vCPUs map to CPUs {cpus:?}"
    );
    Ok(vcpus
        .iter()
        .map(|v| format!("cpu{} pid {} {}", v["cpu"], v["pid"], v["comm"]))
        .collect::<Vec<_>>()
        .join(", "))
}

/// Every thread's /proc stack, as "== TID SCHEDSTAT" and then the stack's lines, with
/// shell builtins only (no process per thread, nothing to disturb what it reads).
/// SCHEDSTAT (/proc/TID/schedstat: time on a CPU, time waiting, times run) changes
/// whenever the thread runs.
const GUEST_STACKS: &str = "for t in /proc/[0-9]*/task/[0-9]*; do s=; \
    read -r s 2>/dev/null < $t/schedstat; echo \"== ${t##*/} $s\"; \
    while read -r l; do echo \"${l#\\[<0>\\] }\"; done 2>/dev/null < $t/stack; done";

/// A thread as the guest showed it: whether it ran since (its schedstat) and its stack.
#[derive(Debug, PartialEq, Eq, Default)]
struct GuestStack {
    schedstat: String,
    frames: Vec<String>,
}

/// Each thread's [`GuestStack`], by thread id.
fn guest_stacks(out: &str) -> BTreeMap<i64, GuestStack> {
    let mut stacks = BTreeMap::new();
    let mut current: Option<(i64, GuestStack)> = None;
    for line in out.lines().map(str::trim) {
        if let Some(header) = line.strip_prefix("== ") {
            stacks.extend(current.take());
            let (tid, schedstat) = header.split_once(' ').unwrap_or((header, ""));
            current = tid.parse().ok().map(|t| {
                let schedstat = schedstat.trim().to_string();
                (
                    t,
                    GuestStack {
                        schedstat,
                        frames: Vec::new(),
                    },
                )
            });
        } else if let (Some((_, s)), false) = (current.as_mut(), line.is_empty()) {
            s.frames.push(line.to_string());
        }
    }
    stacks.extend(current);
    stacks
}

/// What the comparison of every task's stack found.
#[derive(Debug)]
pub struct StacksCompared {
    /// Tasks that did not run while the views were taken: compared.
    pub compared: usize,
    /// Tasks that ran meanwhile (the console's shell among them), that came or went,
    /// or that are running in lpvmm's view: not compared.
    pub skipped: usize,
}

/// `lpvmm stack` (every task at once) equals /proc/PID/stack for every task that did
/// not run while it was taken: the guest's view is taken before and after lpvmm's, and
/// a task whose stack and schedstat are the same in both slept through lpvmm's.
pub fn stacks_equal(g: &mut Guest, series: &str) -> Result<StacksCompared, String> {
    let before = guest_stacks(&g.run(GUEST_STACKS)?);
    let ours: StackResult = patchtest::lpvmm_json(g, "stack {vm} --json")?;
    let after = guest_stacks(&g.run(GUEST_STACKS)?);
    let mut result = StacksCompared {
        compared: 0,
        skipped: 0,
    };
    let mut wrong = Vec::new();
    for trace in &ours.traces {
        let tid = i64::from(trace.pid);
        let slept = match (before.get(&tid), after.get(&tid)) {
            (Some(b), Some(a)) if a == b && !b.schedstat.is_empty() => Some(b),
            _ => None,
        };
        let Some(theirs) = slept.filter(|_| trace.state != 'R' && trace.pid != 0) else {
            result.skipped += 1;
            continue;
        };
        let frames: Vec<String> = trace
            .frames
            .iter()
            .filter(|f| !f.sched)
            .map(|f| f.symbol.clone().unwrap_or_else(|| format!("{:#x}", f.addr)))
            .collect();
        if !trace.reliable || frames != theirs.frames {
            wrong.push(format!(
                "{} {} ({}, reliable {}): lpvmm {frames:?}\n  /proc {:?}",
                trace.pid, trace.comm, trace.state, trace.reliable, theirs.frames
            ));
        }
        result.compared += 1;
    }
    check!(
        wrong.is_empty(),
        "{series}: {} of {} sleeping tasks' stacks differ from /proc/PID/stack:\n{}",
        wrong.len(),
        result.compared,
        wrong.join("\n")
    );
    Ok(result)
}
