//! Per-task consistency on real KVM (native or nested), both kernel series: a task
//! asleep in a patched function holds back only itself, transitions reverse and force,
//! a function marked immediate flips at once, and guest processes that read two patched
//! files in a loop never see a mix of versions.
//!
//! The patches are samples of patcher/examples (built here with `lpvmm kp build`), and
//! `gen-N`, built from patcher/examples/gen.c.in.

use std::path::PathBuf;
use std::time::Duration;

use lpvmm::proto::{OutcomeView, PatchStateView, PatchStatusResult, StackResult, TransitionView};
use lpvmm_tests::patchtest::{
    build_lpvmm, checksum, cmdline, dispatched_history, early_checks, ended, held_by, kill,
    kp_build, parse, patch_path, pids, site_now, sleeper, status, status_json, Readers,
};
use lpvmm_tests::{
    check, host_files_or_exit, json, repo_root, run_group, series_trials, Guest, TestHost,
    TestResult,
};

const PATCHED: &str = "this has been live patched";
/// Transitions of the consistency-under-load test.
const GENERATIONS: u32 = 100;

/// Start the two-function patch per-task while `sleep` holds common_nsleep, and wait
/// for its first tick.
fn held_transition(g: &mut Guest, patch: &str) -> Result<(i64, TransitionView), String> {
    let (pid, _) = sleeper(g, 1000, "common_nsleep")?;
    let file = g.host.file(&patch_path(patch));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file} --no-wait"))?;
    check!(rc == 0, "patch {patch}: {out}");
    Ok((pid, held_by(g, pid)?))
}

/// A child that has exited and that its parent (a `cat` of a FIFO nobody writes, asleep
/// in `open`, not in the patched `common_nsleep`; it never waits) leaves a zombie: the
/// kernel has freed its stack.
struct Zombie {
    parent: i64,
    child: i64,
}

fn zombie_child(g: &mut Guest) -> Result<Zombie, String> {
    let parent =
        g.spawn("mkfifo /tmp/zombie-fifo; sh -c 'sleep 0.1 & exec cat /tmp/zombie-fifo' &")?;
    for _ in 0..50 {
        let ps = g.run("ps -o pid,ppid,stat")?;
        let child = ps.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[1] == parent.to_string() && f[2].starts_with('Z'))
                .then(|| f[0].parse().ok())
                .flatten()
        });
        if let Some(child) = child {
            return Ok(Zombie { parent, child });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("no zombie child of {parent}"))
}

/// Acceptance 1 and 6: per-task beats immediate; every site ends as a direct jump; a
/// task asleep in the new function unwinds through it, named with its patch. A zombie
/// (its stack freed) holds nothing, and lpvmm shows its stack empty, as the guest does.
fn sleeper_holds_only_itself(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("pertask-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let text_before = checksum(&mut g, "text")?;
    let original = cmdline(&mut g)?;
    let file = g.host.file(&patch_path("nsleep-cmdline"));

    // Immediate: blocked, gives up, changes nothing.
    let (old_sleeper, old_stack) = sleeper(&mut g, 1000, "common_nsleep")?;
    let (rc, out) = g.lpvmm(&format!(
        "patch {{vm}} {file} --consistency immediate --timeout 3"
    ))?;
    check!(
        rc != 0 && out.contains("gave up"),
        "{series}: immediate: {out}"
    );
    check!(
        out.contains(&format!("blocked by pid {old_sleeper}")),
        "{series}: {out}"
    );
    check!(
        checksum(&mut g, "text")? == text_before,
        "{series}: immediate changed text"
    );
    check!(
        cmdline(&mut g)? == original,
        "{series}: immediate changed /proc/cmdline"
    );

    // A zombie nobody reaps: its stack is gone, so it holds nothing (as in the kernel's
    // livepatch), and lpvmm sees the same empty stack the guest shows.
    let zombie = zombie_child(&mut g)?;
    // A process asleep in module code (the tun module's read): its stack unwinds through
    // the module with the module's ORC, reliably, so it does not hold a patch of
    // functions it is not in (issue 25).
    let tun_reader = g.spawn("tunblock >/dev/null &")?;

    // Per-task: only the sleeper waits (not the tun reader); a new process sees the new
    // text.
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file} --no-wait"))?;
    check!(rc == 0, "{series}: per-task: {out}");
    let t = held_by(&mut g, old_sleeper)?;
    let reason = t.blockers.first().map_or("", |b| b.reason.as_str());
    check!(
        reason.contains("common_nsleep"),
        "{series}: reason {reason}"
    );
    // All but one moved (both counts are there: the type has them).
    check!(
        t.pending == 1 && t.tasks > 1 && t.moved == t.tasks - 1,
        "{series}: every other task moved: {t:?}"
    );
    let during = cmdline(&mut g)?;
    if during != PATCHED {
        let s = status(&mut g)?;
        return Err(format!(
            "{series}: a new cat during the transition says {during:?}\nactive {:?}",
            s.active
        ));
    }
    let s = status(&mut g)?;
    for f in ["common_nsleep", "cmdline_proc_show"] {
        check!(
            site_now(&s, f) == "trampoline",
            "{series}: {f} during: {:?}\nactive {:?}\nhistory {:?}",
            s.funcs,
            s.active,
            s.history
        );
    }
    let (_, human) = g.lpvmm("patch status {vm}")?;
    check!(
        human.contains(&format!("blocked by pid {old_sleeper}")) && human.contains("tasks moved"),
        "{series}: human status:\n{human}"
    );
    eprintln!("{series}: lpvmm patch status during the transition:\n{human}");

    // The wire contract: raw JSON on purpose. `stack --json`'s words for a task with no
    // stack (`"start": "no_stack"`).
    let (rc, out) = g.lpvmm(&format!("stack {{vm}} {} --json", zombie.child))?;
    let z = &json(&out)?["traces"][0];
    check!(
        rc == 0
            && z["reliable"] == true
            && z["start"] == "no_stack"
            && z["frames"].as_array().is_some_and(|f| f.is_empty()),
        "{series}: the zombie's stack as lpvmm sees it: {out}"
    );
    let guest_view = g.run(&format!("cat /proc/{}/stack; echo end", zombie.child))?;
    check!(
        guest_view.trim() == "end",
        "{series}: the guest shows the zombie's stack as {guest_view:?}"
    );
    check!(
        g.run(&format!("ps -o pid,stat | grep -w {}", zombie.child))?
            .contains('Z'),
        "{series}: the zombie was reaped during the transition"
    );
    kill(&mut g, zombie.parent)?;
    check!(
        !t.blockers.iter().any(|b| i64::from(b.pid) == tun_reader),
        "{series}: the tun reader held the transition: {:?}",
        t.blockers
    );
    kill(&mut g, tun_reader)?;

    // The sleeper goes: the transition completes, every site a direct jump.
    kill(&mut g, old_sleeper)?;
    let done = ended(&mut g, t.id)?;
    check!(
        done.outcome == OutcomeView::Done,
        "{series}: outcome {done:?}"
    );
    let s = status(&mut g)?;
    let news: Vec<(String, u64)> = s
        .patches
        .iter()
        .find(|p| p.name == "nsleep-cmdline")
        .map(|p| {
            p.funcs
                .iter()
                .map(|x| (x.old.clone(), x.new_addr))
                .collect()
        })
        .unwrap_or_default();
    check!(
        news.len() == 2,
        "{series}: patch functions: {:?}",
        s.patches
    );
    for (func, new_addr) in &news {
        // The wire contract: raw JSON on purpose. `disasm --json`'s redirect and lines.
        let (rc, out) = g.lpvmm(&format!("disasm {{vm}} {func} --json"))?;
        check!(rc == 0, "disasm {func}: {out}");
        let d = json(&out)?;
        let site = d["redirect"]["site"].as_u64().unwrap_or(0);
        let addr = d["addr"].as_u64().unwrap_or(u64::MAX);
        let first = d["lines"]
            .as_array()
            .and_then(|l| l.iter().find(|x| x["addr"].as_u64() == Some(site)))
            .cloned()
            .unwrap_or_default();
        let bytes = first["bytes"].as_str().unwrap_or("");
        let rel = u32::from_str_radix(bytes.get(2..10).unwrap_or(""), 16)
            .map(|r| (r.swap_bytes() as i32) as i64)
            .unwrap_or(0);
        let target = (site as i64 + 5 + rel) as u64;
        check!(
            bytes.starts_with("e9")
                && d["redirect"]["target"].as_u64() == Some(*new_addr)
                && target == *new_addr
                && (site == addr || site == addr + 4),
            "{series}: {func} does not jump straight to {new_addr:#x}: {first} {}",
            d["redirect"]
        );
        check!(
            site_now(&s, func) == "jump",
            "{series}: {func} after: {:?}",
            s.funcs
        );
    }
    let now = cmdline(&mut g)?;
    check!(now == PATCHED, "{series}: after the transition: {now:?}");

    // A task asleep in the new common_nsleep: lpvmm names the frame as the guest does,
    // with the module the guest knows the patch as (issue 28); its whole trace is what
    // the guest shows now, and what the guest showed for a sleep in the old function,
    // with the old function replaced by the new.
    let (pid, now_stack) = sleeper(&mut g, 1000, "hrtimer_nanosleep")?;
    let (rc, out) = g.lpvmm(&format!("stack {{vm}} {pid} --json"))?;
    check!(rc == 0, "stack: {out}");
    let traces = parse::<StackResult>(&out)?.traces;
    let trace = traces.first();
    check!(
        trace.is_some_and(|t| t.reliable),
        "{series}: unreliable: {trace:?}"
    );
    let ours: Vec<String> = trace
        .iter()
        .flat_map(|t| &t.frames)
        .filter(|x| !x.sched)
        .filter_map(|x| x.symbol.clone())
        .collect();
    // /proc/PID/stack's lines are `[<0>] func+0xoff/0xsize`; the kernel's own warnings
    // share the console (`[  12.345678] clocksource: ...`) and are left out.
    let guest_lines = |s: &str| -> Vec<String> {
        s.lines()
            .filter_map(|l| l.trim().strip_prefix("[<")?.split_once("] "))
            .map(|(_, f)| f.trim().to_string())
            .collect()
    };
    let old = guest_lines(&old_stack);
    let now = guest_lines(&now_stack);
    let expect: Vec<String> = old
        .iter()
        .map(|l| {
            if l.starts_with("common_nsleep+") {
                "lpvmm_common_nsleep [lpvmm:nsleep_cmdline]".to_string()
            } else {
                l.clone()
            }
        })
        .collect();
    let shown: Vec<String> = ours
        .iter()
        .map(|l| {
            if l.starts_with("lpvmm_common_nsleep+") && l.ends_with(" [lpvmm:nsleep_cmdline]") {
                "lpvmm_common_nsleep [lpvmm:nsleep_cmdline]".to_string()
            } else {
                l.clone()
            }
        })
        .collect();
    check!(
        shown == expect,
        "{series}: lpvmm's stack of a sleep in the new code:\n{ours:#?}\nguest's for the old code:\n{old:#?}"
    );
    check!(
        ours == now,
        "{series}: lpvmm's stack differs from the guest's now:\n{ours:#?}\n{now:#?}"
    );
    let (_, human) = g.lpvmm(&format!("stack {{vm}} {pid}"))?;
    check!(
        human.contains("[lpvmm:nsleep_cmdline]")
            && human.contains("reliable")
            && !human.contains("UNRELIABLE"),
        "{series}: stack:\n{human}"
    );
    kill(&mut g, pid)?;
    eprintln!(
        "{series}: per-task: sleep {old_sleeper} held only itself; {} ticks",
        done.ticks
    );
    g.poweroff().map(|_| ())
}

/// Acceptance 3: reverse of a held enable, and of a disable held in the new code.
fn reverse(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("reverse-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let text_before = checksum(&mut g, "text")?;
    let original = cmdline(&mut g)?;

    let (pid, t) = held_transition(&mut g, "nsleep-cmdline")?;
    check!(
        cmdline(&mut g)? == PATCHED,
        "{series}: new process during the enable"
    );
    let (rc, out) = g.lpvmm("patch reverse {vm}")?;
    check!(
        rc == 0 && out.contains("reversed"),
        "{series}: reverse: {out}"
    );
    let r = ended(&mut g, t.id)?;
    check!(r.outcome == OutcomeView::Reversed, "{series}: {r:?}");
    check!(
        checksum(&mut g, "text")? == text_before,
        "{series}: text after reverse"
    );
    check!(
        cmdline(&mut g)? == original,
        "{series}: cmdline after reverse"
    );
    let (_, list) = g.lpvmm("patch list {vm}")?;
    check!(
        !list.contains("nsleep-cmdline"),
        "{series}: a reversed load stays loaded: {list}"
    );
    kill(&mut g, pid)?;

    // Enabled; a sleep in the new code holds the disable; reversing keeps it enabled.
    let file = g.host.file(&patch_path("nsleep-cmdline"));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file}"))?;
    check!(rc == 0, "{series}: enable: {out}");
    let (pid, _) = sleeper(&mut g, 1000, "hrtimer_nanosleep")?;
    let (rc, out) = g.lpvmm("patch disable {vm} nsleep-cmdline --no-wait")?;
    check!(rc == 0, "{series}: disable: {out}");
    let t = held_by(&mut g, pid)?;
    let reason = t.blockers.first().map_or("", |b| b.reason.as_str());
    check!(
        reason.contains("lpvmm_common_nsleep [nsleep-cmdline]"),
        "{series}: reason {reason}"
    );
    check!(
        cmdline(&mut g)? == original,
        "{series}: new process during the disable"
    );
    let (rc, out) = g.lpvmm("patch reverse {vm}")?;
    check!(rc == 0, "{series}: reverse of disable: {out}");
    let s = status(&mut g)?;
    check!(
        s.patches
            .first()
            .is_some_and(|p| p.state == PatchStateView::Enabled)
            && s.history
                .last()
                .is_some_and(|t| t.outcome == OutcomeView::Reversed),
        "{series}: after reversing the disable: {:?}",
        s.patches
    );
    check!(
        cmdline(&mut g)? == PATCHED,
        "{series}: new process after the reverse"
    );
    kill(&mut g, pid)?;
    let (rc, out) = g.lpvmm("patch disable {vm} nsleep-cmdline")?;
    check!(rc == 0, "{series}: disable: {out}");
    let (rc, out) = g.lpvmm("patch unload {vm} nsleep-cmdline")?;
    check!(rc == 0, "{series}: unload: {out}");
    check!(
        checksum(&mut g, "text")? == text_before,
        "{series}: text at the end"
    );
    g.poweroff().map(|_| ())
}

/// Acceptance 4: force.
fn force(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("force-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let (pid, _) = held_transition(&mut g, "nsleep-cmdline")?;
    let (rc, out) = g.lpvmm("patch force {vm}")?;
    check!(
        rc == 0 && out.contains("forced") && out.contains(&format!("pid {pid} (sleep)")),
        "{series}: force: {out}"
    );
    eprintln!("{series}: lpvmm patch force:\n{out}");
    let s = status(&mut g)?;
    let p = s.patches.first();
    check!(
        p.is_some_and(|p| p.forced && p.state == PatchStateView::Enabled),
        "{series}: {p:?}"
    );
    let last = s.history.last();
    check!(
        last.is_some_and(|t| t.outcome == OutcomeView::Forced && pids(&t.skipped).contains(&pid)),
        "{series}: {last:?}"
    );
    for f in ["common_nsleep", "cmdline_proc_show"] {
        check!(site_now(&s, f) == "jump", "{series}: {f} after force");
    }
    check!(cmdline(&mut g)? == PATCHED, "{series}: after force");
    let (rc, out) = g.lpvmm("patch unload {vm} nsleep-cmdline")?;
    check!(
        rc != 0 && out.contains("was forced"),
        "{series}: unload of forced: {out}"
    );
    kill(&mut g, pid)?;
    let (rc, out) = g.lpvmm("patch disable {vm} nsleep-cmdline")?;
    check!(rc == 0, "{series}: disable of forced: {out}");
    let (rc, out) = g.lpvmm("patch unload {vm} nsleep-cmdline")?;
    check!(
        rc != 0 && out.contains("was forced"),
        "{series}: unload of a disabled forced patch: {out}"
    );
    let (_, list) = g.lpvmm("patch list {vm}")?;
    check!(list.contains("(forced)"), "{series}: list: {list}");
    g.poweroff().map(|_| ())
}

/// Acceptance 5: a function marked immediate flips in the first tick.
fn immediate_function(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("immfn-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let (pid, t) = held_transition(&mut g, "immediate-cmdline")?;
    // Immediate sites are written only by the tick that starts the dispatch: a direct
    // jump while the other function still dispatches means it flipped in that tick.
    let change = |f: &str| t.functions.iter().find(|c| c.name == f);
    check!(
        change("cmdline_proc_show").is_some_and(|c| c.immediate && c.trampoline.is_none())
            && change("common_nsleep").is_some_and(|c| c.trampoline.is_some()),
        "{series}: changes {:?}",
        t.functions
    );
    let s = status(&mut g)?;
    check!(
        site_now(&s, "cmdline_proc_show") == "jump"
            && site_now(&s, "common_nsleep") == "trampoline",
        "{series}: sites after the first tick: {:?}",
        s.funcs
    );
    check!(cmdline(&mut g)? == PATCHED, "{series}: cmdline");
    kill(&mut g, pid)?;
    let done = ended(&mut g, t.id)?;
    check!(done.outcome == OutcomeView::Done, "{series}: {done:?}");
    g.poweroff().map(|_| ())
}

/// Acceptance 7: bad requests are refused clearly and change nothing.
fn bad_requests(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("badreq-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 1, "")?;
    for verb in ["reverse", "force"] {
        let (rc, out) = g.lpvmm(&format!("patch {verb} {{vm}}"))?;
        check!(
            rc != 0 && out.contains("no transition is in progress"),
            "{series}: {verb} with nothing: {out}"
        );
    }
    let cmdline_kp = g.host.file(&patch_path("cmdline"));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {cmdline_kp}"))?;
    check!(rc == 0, "{series}: cmdline: {out}");
    let (rc, out) = g.lpvmm("patch unload {vm} cmdline")?;
    check!(
        rc != 0 && out.contains("disable it first"),
        "{series}: unload enabled: {out}"
    );

    let (pid, _) = held_transition(&mut g, "nsleep-cmdline")?;
    let before = (checksum(&mut g, "text")?, checksum(&mut g, "patch-area")?);
    let refused = [
        ("patch disable {vm} cmdline".to_string(), "in progress"),
        ("patch enable {vm} cmdline".to_string(), "in progress"),
        (format!("patch {{vm}} {cmdline_kp}"), "in progress"),
        (
            "patch unload {vm} nsleep-cmdline".to_string(),
            "in a transition",
        ),
    ];
    for (cmd, want) in &refused {
        let (rc, out) = g.lpvmm(cmd)?;
        check!(rc != 0 && out.contains(want), "{series}: `{cmd}`: {out}");
    }
    check!(
        (checksum(&mut g, "text")?, checksum(&mut g, "patch-area")?) == before,
        "{series}: a refused request changed guest memory"
    );
    let (rc, out) = g.lpvmm("patch reverse {vm}")?;
    check!(rc == 0, "{series}: reverse: {out}");
    kill(&mut g, pid)?;

    // A verb is never a VM, and no VM may be named like one.
    let (rc, out) = g.lpvmm("patch frobnicate {vm}")?;
    check!(
        rc != 0 && out.contains("no VM named 'frobnicate'") && out.contains("reverse"),
        "{series}: unknown verb: {out}"
    );
    let lp = g.host.lpvmm();
    let kernel = g.host.guest_kernel(series);
    let (rc, out) = g.host.exec_status(
        &format!("{lp} run --name status --kernel {kernel} 2>&1"),
        Duration::from_secs(60),
    )?;
    check!(
        rc != 0 && out.contains("invalid VM name 'status'"),
        "{series}: run --name status: {out}"
    );
    g.poweroff().map(|_| ())
}

/// Acceptance 2: two functions patched together (with a third, common_nsleep, that a
/// guest sleep loop holds), GENERATIONS per-task transitions (each enables the next
/// generation on top), while four guest processes read both files in turn: no process
/// may ever see an older generation after a newer one, in either file.
fn consistency_under_load(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("consist-{}", series.replace('.', "_"));
    // Every task check confirmed from an unwind made while the guest ran is also
    // unwound in the pause and compared (issue 12: checks outside the pause).
    let (mut g, _) = host.boot_guest(&name, series, 2, "--verify-early-checks")?;
    let readers = Readers::start(&mut g)?;
    let lp = g.host.lpvmm();
    let dir = g.host.file(&patch_path("gen-1"));
    let dir = dir.trim_end_matches("gen-1.kp");
    let (rc, out) = g.host.exec_status(
        &format!(
            "i=1; while [ $i -le {GENERATIONS} ]; do \
             {lp} patch {name} {dir}gen-$i.kp --timeout 120 >/tmp/{name}-patch.out 2>&1 || {{ cat /tmp/{name}-patch.out; break; }}; \
             i=$((i+1)); done; echo generations=$((i-1))"
        ),
        Duration::from_secs(1800),
    )?;
    if rc != 0 || !out.contains(&format!("generations={GENERATIONS}")) {
        let why = g.vmm_stderr();
        let (_, st) = g.lpvmm("patch status {vm}")?;
        return Err(format!("{series}: transitions stopped: {out}\n{st}\n{why}"));
    }
    let log = readers
        .stop(&mut g, GENERATIONS)
        .map_err(|e| format!("{series}: {e}"))?;
    // The wire contract: raw JSON on purpose. `patch status --json` as its words are
    // (early_checks must tell a missing count from a zero); the typed read of the same
    // output below it must agree.
    let raw = status_json(&mut g)?;
    let st: PatchStatusResult =
        serde_json::from_value(raw.clone()).map_err(|e| format!("{series}: {e}"))?;
    let (multi, of) = dispatched_history(&st).map_err(|e| format!("{series}: {e}"))?;
    let early = early_checks(&raw).map_err(|e| format!("{series}: {e}"))?;
    eprintln!(
        "{series}: {GENERATIONS} per-task transitions under 4 readers: {log}; of the last {of}, \
         {multi} needed more than one tick (tasks dispatched by trampoline); their task checks: \
         {early:?}"
    );
    check!(
        early.mismatches == 0 && early.verified == early.confirmed,
        "{series}: a task check confirmed from an early unwind differed from the unwind in \
         the pause: {early:?}"
    );
    // Task lists from an early walk, taken where the fork and exit counters held: each
    // equal to a walk in the same pause, and some taken, or that compared nothing.
    check!(
        early.list_mismatches == 0 && early.lists_confirmed > 0,
        "{series}: task lists from early walks: {} taken, {} walked in the pause, {} \
         differed from a walk in the same pause",
        early.lists_confirmed,
        early.lists_walked,
        early.list_mismatches
    );
    // Most tasks sleep through a tick: most checks must come from early unwinds, or
    // the comparison above compared nothing.
    check!(
        early.confirmed > early.unwound,
        "{series}: only {} of {} task checks were confirmed early traces",
        early.confirmed,
        early.confirmed + early.unwound
    );
    g.poweroff().map(|_| ())
}

/// Build the samples and the generations with `lpvmm kp build`.
fn build_patches() -> Result<Vec<(PathBuf, String)>, String> {
    let out = repo_root().join("target/lpvmm-test-patches/consistency");
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    build_lpvmm()?;
    let examples = repo_root().join("patcher/examples");
    let mut files = Vec::new();
    for sample in ["cmdline", "nsleep-cmdline", "immediate-cmdline"] {
        let kp = out.join(format!("{sample}.kp"));
        kp_build(&examples.join(format!("{sample}.c")), &kp, &[])?;
        files.push((kp, patch_path(sample)));
    }
    let template = examples.join("gen.c.in");
    for n in 1..=GENERATIONS {
        let kp = out.join(format!("gen-{n}.kp"));
        let src = out.join(format!("gen-{n}.c"));
        std::fs::copy(&template, &src).map_err(|e| e.to_string())?;
        kp_build(
            &src,
            &kp,
            &[format!("-DGEN={n}"), format!("-DGENSTR=\"{n}\"")],
        )?;
        files.push((kp, patch_path(&format!("gen-{n}"))));
    }
    Ok(files)
}

fn main() {
    host_files_or_exit(build_patches());
    run_group(series_trials(&[
        (
            "per_task_sleeper_holds_only_itself",
            sleeper_holds_only_itself,
        ),
        ("reverse_enable_and_disable", reverse),
        ("force_marks_the_patch_forced", force),
        (
            "immediate_function_flips_in_the_first_tick",
            immediate_function,
        ),
        ("bad_transition_requests_refused", bad_requests),
        (
            "consistency_under_load_100_transitions",
            consistency_under_load,
        ),
    ]))
}
