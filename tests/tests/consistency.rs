//! Per-task consistency on real KVM (native or nested), both kernel series: a task
//! asleep in a patched function holds back only itself, transitions reverse and force,
//! a function marked immediate flips at once, and guest processes that read two patched
//! files in a loop never see a mix of versions.
//!
//! The patches are samples of patcher/examples (built here with `lpvmm kp build`), and
//! `gen-N`, built from patcher/examples/gen.c.in.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use lpvmm_tests::{
    check, host_files, host_trial, json, lpvmm_binary, repo_root, run_group, Guest, TestHost,
    TestResult, SERIES, SPLATS,
};
use serde_json::Value;

const PATCHED: &str = "this has been live patched";
/// Transitions of the consistency-under-load test.
const GENERATIONS: u32 = 100;

fn patch_path(name: &str) -> String {
    format!("/root/patches/{name}.kp")
}

fn checksum(g: &mut Guest, what: &str) -> Result<String, String> {
    let (rc, out) = g.lpvmm(&format!("checksum {{vm}} {what} --json"))?;
    check!(rc == 0, "checksum {what}: {out}");
    let sum = json(&out)?["sha256"].as_str().unwrap_or("").to_string();
    check!(sum.len() == 64, "checksum {what} without a sha256: {out}");
    Ok(sum)
}

fn status(g: &mut Guest) -> Result<Value, String> {
    let (rc, out) = g.lpvmm("patch status {vm} --json")?;
    check!(rc == 0, "patch status: {out}");
    json(&out)
}

/// `sleep SECS` in the background, once the guest shows it asleep in `func`
/// (/proc/PID/stack); returns its pid and that stack.
fn sleeper(g: &mut Guest, secs: u32, func: &str) -> Result<(i64, String), String> {
    let pid = g.spawn(&format!("sleep {secs} &"))?;
    let mut stack = String::new();
    for _ in 0..100 {
        stack = g.run(&format!("cat /proc/{pid}/stack 2>/dev/null; true"))?;
        if stack.contains(func) {
            return Ok((pid, stack));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("sleep {pid} never reached {func}: {stack}"))
}

/// The transition in progress once it has had its first tick.
fn switching(g: &mut Guest) -> Result<Value, String> {
    let t0 = Instant::now();
    loop {
        let s = status(g)?;
        let a = &s["active"];
        if a["phase"] == "switching" {
            return Ok(a.clone());
        }
        check!(
            !a.is_null() || t0.elapsed() < Duration::from_secs(1),
            "no transition in progress: {s}"
        );
        check!(
            t0.elapsed() < Duration::from_secs(60),
            "the transition never started switching: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Wait for transition `id` to end; returns it.
fn ended(g: &mut Guest, id: u64) -> Result<Value, String> {
    for _ in 0..300 {
        let s = status(g)?;
        if let Some(t) = s["history"]
            .as_array()
            .and_then(|h| h.iter().find(|t| t["id"] == id))
        {
            return Ok(t.clone());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!("transition {id} never ended"))
}

fn pids(list: &Value) -> Vec<i64> {
    list.as_array()
        .map(|l| l.iter().filter_map(|b| b["pid"].as_i64()).collect())
        .unwrap_or_default()
}

/// What the site of `func` holds now (`original`, `jump`, `trampoline`).
fn site_now(s: &Value, func: &str) -> String {
    s["funcs"]
        .as_array()
        .and_then(|f| f.iter().find(|x| x["name"] == func))
        .and_then(|x| x["site_now"].as_str())
        .unwrap_or("original")
        .to_string()
}

fn cmdline(g: &mut Guest) -> Result<String, String> {
    Ok(g.run("cat /proc/cmdline")?.trim().to_string())
}

/// Kill a background job and reap it (so that the shell prints nothing about it later).
fn kill(g: &mut Guest, pid: i64) -> TestResult {
    g.run(&format!("kill {pid}; wait {pid} 2>/dev/null; true"))?;
    Ok(())
}

/// Start the two-function patch per-task while `sleep` holds common_nsleep, and wait
/// for its first tick.
fn held_transition(g: &mut Guest, patch: &str) -> Result<(i64, Value), String> {
    let (pid, _) = sleeper(g, 1000, "common_nsleep")?;
    let file = g.host.file(&patch_path(patch));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file} --no-wait"))?;
    check!(rc == 0, "patch {patch}: {out}");
    Ok((pid, switching(g)?))
}

/// Acceptance 1 and 6: per-task beats immediate; every site ends as a direct jump; a
/// task asleep in the new function unwinds through it, named with its patch.
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

    // Per-task: only the sleeper waits; a new process sees the new text.
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file} --no-wait"))?;
    check!(rc == 0, "{series}: per-task: {out}");
    let t = switching(&mut g)?;
    check!(
        pids(&t["blockers"]) == [old_sleeper],
        "{series}: blockers should be the sleeper alone: {}",
        t["blockers"]
    );
    let reason = t["blockers"][0]["reason"].as_str().unwrap_or("");
    check!(
        reason.contains("common_nsleep"),
        "{series}: reason {reason}"
    );
    check!(
        t["pending"] == 1 && t["moved"].as_u64() == t["tasks"].as_u64().map(|n| n - 1),
        "{series}: every other task moved: {t}"
    );
    let during = cmdline(&mut g)?;
    if during != PATCHED {
        let s = status(&mut g)?;
        return Err(format!(
            "{series}: a new cat during the transition says {during:?}\nactive {}",
            s["active"]
        ));
    }
    let s = status(&mut g)?;
    for f in ["common_nsleep", "cmdline_proc_show"] {
        check!(
            site_now(&s, f) == "trampoline",
            "{series}: {f} during: {}\nactive {}\nhistory {}",
            s["funcs"],
            s["active"],
            s["history"]
        );
    }
    let (_, human) = g.lpvmm("patch status {vm}")?;
    check!(
        human.contains(&format!("blocked by pid {old_sleeper}")) && human.contains("tasks moved"),
        "{series}: human status:\n{human}"
    );
    eprintln!("{series}: lpvmm patch status during the transition:\n{human}");

    // The sleeper goes: the transition completes, every site a direct jump.
    kill(&mut g, old_sleeper)?;
    let done = ended(&mut g, t["id"].as_u64().unwrap_or(0))?;
    check!(done["outcome"] == "done", "{series}: outcome {done}");
    let s = status(&mut g)?;
    let news: Vec<(String, u64)> = s["patches"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "nsleep-cmdline"))
        .and_then(|p| p["funcs"].as_array())
        .map(|f| {
            f.iter()
                .map(|x| {
                    (
                        x["old"].as_str().unwrap_or("").to_string(),
                        x["new_addr"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    check!(
        news.len() == 2,
        "{series}: patch functions: {}",
        s["patches"]
    );
    for (func, new_addr) in &news {
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
            "{series}: {func} after: {}",
            s["funcs"]
        );
    }
    let now = cmdline(&mut g)?;
    check!(now == PATCHED, "{series}: after the transition: {now:?}");

    // A task asleep in the new common_nsleep: lpvmm names the frame with its patch; the
    // frames above it are what the guest shows now (the guest's own unwinder stops at
    // code it does not know), and all of them are what the guest showed for a sleep in
    // the old function, with the old function replaced by the new.
    let (pid, now_stack) = sleeper(&mut g, 1000, "hrtimer_nanosleep")?;
    let (rc, out) = g.lpvmm(&format!("stack {{vm}} {pid} --json"))?;
    check!(rc == 0, "stack: {out}");
    let st = json(&out)?;
    let trace = &st["traces"][0];
    check!(trace["reliable"] == true, "{series}: unreliable: {trace}");
    let ours: Vec<String> = trace["frames"]
        .as_array()
        .map(|f| {
            f.iter()
                .filter(|x| x["sched"] != true)
                .filter_map(|x| x["symbol"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let guest_lines = |s: &str| -> Vec<String> {
        s.lines()
            .filter_map(|l| l.split_once("] ").map(|(_, f)| f.trim().to_string()))
            .collect()
    };
    let old = guest_lines(&old_stack);
    let now = guest_lines(&now_stack);
    let expect: Vec<String> = old
        .iter()
        .map(|l| {
            if l.starts_with("common_nsleep+") {
                "lpvmm_common_nsleep [nsleep-cmdline]".to_string()
            } else {
                l.clone()
            }
        })
        .collect();
    let shown: Vec<String> = ours
        .iter()
        .map(|l| {
            if l.starts_with("lpvmm_common_nsleep+") && l.ends_with(" [nsleep-cmdline]") {
                "lpvmm_common_nsleep [nsleep-cmdline]".to_string()
            } else {
                l.clone()
            }
        })
        .collect();
    check!(
        shown == expect,
        "{series}: lpvmm's stack of a sleep in the new code:\n{ours:#?}\nguest's for the old code:\n{old:#?}"
    );
    let above = now.iter().take_while(|l| !l.starts_with("0x")).count();
    check!(
        above > 0 && ours.len() >= above && ours[..above] == now[..above],
        "{series}: frames above the new function differ from the guest's now:\n{ours:#?}\n{now:#?}"
    );
    let (_, human) = g.lpvmm(&format!("stack {{vm}} {pid}"))?;
    check!(
        human.contains("[nsleep-cmdline]")
            && human.contains("reliable")
            && !human.contains("UNRELIABLE"),
        "{series}: stack:\n{human}"
    );
    kill(&mut g, pid)?;
    eprintln!(
        "{series}: per-task: sleep {old_sleeper} held only itself; {} ticks",
        done["ticks"]
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
    let r = ended(&mut g, t["id"].as_u64().unwrap_or(0))?;
    check!(r["outcome"] == "reversed", "{series}: {r}");
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
    let t = switching(&mut g)?;
    check!(
        pids(&t["blockers"]) == [pid],
        "{series}: disable blockers {}",
        t["blockers"]
    );
    let reason = t["blockers"][0]["reason"].as_str().unwrap_or("");
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
        s["patches"][0]["state"] == "enabled"
            && s["history"]
                .as_array()
                .and_then(|h| h.last())
                .map(|t| t["outcome"] == "reversed")
                == Some(true),
        "{series}: after reversing the disable: {}",
        s["patches"]
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
    let p = &s["patches"][0];
    check!(
        p["forced"] == true && p["state"] == "enabled",
        "{series}: {p}"
    );
    let last = s["history"]
        .as_array()
        .and_then(|h| h.last())
        .cloned()
        .unwrap_or_default();
    check!(
        last["outcome"] == "forced" && pids(&last["skipped"]).contains(&pid),
        "{series}: {last}"
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
    check!(pids(&t["blockers"]) == [pid], "{series}: {}", t["blockers"]);
    // Immediate sites are written only by the tick that starts the dispatch: a direct
    // jump while the other function still dispatches means it flipped in that tick.
    let change = |f: &str| {
        t["functions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == f))
            .cloned()
            .unwrap_or_default()
    };
    check!(
        change("cmdline_proc_show")["immediate"] == true
            && change("cmdline_proc_show")["trampoline"].is_null()
            && change("common_nsleep")["trampoline"].is_u64(),
        "{series}: changes {}",
        t["functions"]
    );
    let s = status(&mut g)?;
    check!(
        site_now(&s, "cmdline_proc_show") == "jump"
            && site_now(&s, "common_nsleep") == "trampoline",
        "{series}: sites after the first tick: {}",
        s["funcs"]
    );
    check!(cmdline(&mut g)? == PATCHED, "{series}: cmdline");
    kill(&mut g, pid)?;
    let done = ended(&mut g, t["id"].as_u64().unwrap_or(0))?;
    check!(done["outcome"] == "done", "{series}: {done}");
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
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let boot_splats = g.run(SPLATS)?;
    // A sleep loop: most transitions start with a `sleep` inside common_nsleep, so
    // every other task (the readers among them) is dispatched by the trampolines until
    // the sleep ends.
    g.run("(while [ ! -e /tmp/stop ]; do sleep 0.2; done) >/dev/null 2>&1 &")?;
    g.run(
        "rm -f /tmp/stop; oc=$(cat /proc/cmdline); ov=$(cat /proc/version); \
         pairread -G -p 4 -s /tmp/stop -a /proc/cmdline -b /proc/version \"$oc\" \"$ov\" \
         'lpvmm cmdline gen ' 'lpvmm version gen ' >/tmp/pr.log 2>&1 &",
    )?;
    let lp = g.host.lpvmm();
    let dir = g.host.file(&patch_path("gen-1"));
    let dir = dir.trim_end_matches("gen-1.kp");
    let (rc, out) = g.host.exec_status(
        &format!(
            "i=1; while [ $i -le {GENERATIONS} ]; do {lp} patch {name} {dir}gen-$i.kp >/dev/null || break; \
             i=$((i+1)); done; echo generations=$((i-1))"
        ),
        Duration::from_secs(1800),
    )?;
    if rc != 0 || !out.contains(&format!("generations={GENERATIONS}")) {
        let why = g.vmm_stderr();
        let (_, st) = g.lpvmm("patch status {vm}")?;
        return Err(format!("{series}: transitions stopped: {out}\n{st}\n{why}"));
    }
    g.run("touch /tmp/stop; wait")?;
    let log = g.run("cat /tmp/pr.log")?;
    check!(
        log.contains("pairread: OK") && log.contains(&format!("max_gen={GENERATIONS}")),
        "{series}: readers saw a mix of versions: {log}"
    );
    let s = status(&mut g)?;
    let history = s["history"].as_array().cloned().unwrap_or_default();
    check!(
        history.iter().all(|t| t["outcome"] == "done"),
        "{series}: a transition did not complete"
    );
    let multi = history
        .iter()
        .filter(|t| t["ticks"].as_u64() > Some(1))
        .count();
    check!(
        multi * 4 >= history.len(),
        "{series}: only {multi} of {} transitions dispatched tasks by trampoline; the test \
         would not exercise per-task dispatch",
        history.len()
    );
    let splats = g.run(SPLATS)?;
    check!(
        splats.trim() == boot_splats.trim(),
        "{series}: new kernel warnings:\n{splats}"
    );
    eprintln!(
        "{series}: {GENERATIONS} per-task transitions under 4 readers: {}; of the last {}, {multi} \
         needed more than one tick (tasks dispatched by trampoline)",
        log.trim(),
        history.len()
    );
    g.poweroff().map(|_| ())
}

fn run(cmd: &mut Command) -> TestResult {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    check!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Build the samples and the generations with `lpvmm kp build`.
fn build_patches() -> Result<Vec<(PathBuf, String)>, String> {
    let out = repo_root().join("target/lpvmm-test-patches/consistency");
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo)
        .args(["build", "--quiet", "-p", "lpvmm"])
        .current_dir(repo_root()))?;
    let examples = repo_root().join("patcher/examples");
    let mut files = Vec::new();
    for sample in ["cmdline", "nsleep-cmdline", "immediate-cmdline"] {
        let kp = out.join(format!("{sample}.kp"));
        run(Command::new(lpvmm_binary())
            .args(["kp", "build"])
            .arg(examples.join(format!("{sample}.c")))
            .arg("-o")
            .arg(&kp))?;
        files.push((kp, patch_path(sample)));
    }
    let template = examples.join("gen.c.in");
    for n in 1..=GENERATIONS {
        let kp = out.join(format!("gen-{n}.kp"));
        let src = out.join(format!("gen-{n}.c"));
        std::fs::copy(&template, &src).map_err(|e| e.to_string())?;
        run(Command::new(lpvmm_binary())
            .args(["kp", "build"])
            .arg(&src)
            .arg("-o")
            .arg(&kp)
            .arg(format!("--cflag=-DGEN={n}"))
            .arg(format!("--cflag=-DGENSTR=\"{n}\"")))?;
        files.push((kp, patch_path(&format!("gen-{n}"))));
    }
    Ok(files)
}

fn main() {
    match build_patches() {
        Ok(files) => host_files(files),
        Err(e) => {
            eprintln!("cannot build the test patches: {e}");
            std::process::exit(1);
        }
    }
    type Case = fn(&mut TestHost, &str) -> TestResult;
    let cases: [(&str, Case); 6] = [
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
    ];
    let mut tests = Vec::new();
    for (name, case) in cases {
        for series in SERIES {
            let tag = series.replace('.', "_");
            tests.push(host_trial(format!("{name}_{tag}"), move |h| {
                case(h, series)
            }));
        }
    }
    run_group(tests)
}
