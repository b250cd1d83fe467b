//! Live patching on real KVM (native or nested), both kernel series: what the guest
//! shows before, during and after, and that the guest's kernel text comes back
//! byte-identical.
//!
//! The patches are the samples in patcher/examples, built here with `lpvmm kp build`,
//! plus deliberately bad ones.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lpvmm::proto::OutcomeView;
use lpvmm_tests::patchtest::{
    self, checksum, checksums, in_patch_code, patch_path, run_cmd as run, triple_fault_rip,
    unlocated_death,
};
use lpvmm_tests::{
    check, death_in_patch_code, host_files_or_exit, host_trial, lpvmm_binary, repo_root, run_group,
    series_trials, Guest, TestHost, TestResult, DIED_IN_PATCH_CODE, EXIT_TIMEOUT, SPLATS,
};

const PATCHED: &str = "this has been live patched";

fn text_sum(g: &mut Guest) -> Result<String, String> {
    checksum(g, "text")
}

fn apply(g: &mut Guest, name: &str) -> TestResult {
    let out = patchtest::apply(g, name)?;
    eprintln!("  {}", out.trim().replace('\n', "\n  "));
    Ok(())
}

fn toggle(g: &mut Guest, op: &str, name: &str) -> TestResult {
    patchtest::verb(g, op, name).map(|_| ())
}

/// Acceptance 1 and 5: /proc/cmdline is replaced and restored, and after enable then
/// disable the whole kernel text is byte-identical to before.
fn cmdline(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("cmdline-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let original = g.text("cat /proc/cmdline")?;
    check!(
        original.contains("console=ttyS0"),
        "odd cmdline {original:?}"
    );
    let text_before = text_sum(&mut g)?;

    apply(&mut g, "cmdline")?;
    let now = g.text("cat /proc/cmdline")?;
    check!(
        now.trim() == PATCHED,
        "{series}: patched /proc/cmdline says {now:?}"
    );
    let (_, list) = g.lpvmm("patch list {vm}")?;
    check!(
        list.contains("cmdline") && list.contains("enabled"),
        "patch list: {list}"
    );
    check!(
        text_sum(&mut g)? != text_before,
        "{series}: enabling changed no text"
    );

    toggle(&mut g, "disable", "cmdline")?;
    let back = g.text("cat /proc/cmdline")?;
    check!(
        back.trim() == original,
        "{series}: after disable /proc/cmdline says {back:?}"
    );
    check!(
        text_sum(&mut g)? == text_before,
        "{series}: kernel text differs from before the patch after enable + disable"
    );

    // Enable again from the loaded copy, then back, then unload.
    toggle(&mut g, "enable", "cmdline")?;
    check!(
        g.text("cat /proc/cmdline")? == PATCHED,
        "{series}: re-enable"
    );
    toggle(&mut g, "disable", "cmdline")?;
    check!(
        g.text("cat /proc/cmdline")? == original,
        "{series}: re-disable"
    );
    // The endurance benchmark's driver: cycles from one client, one immediate and one
    // per-task here, each an enable and a disable that end done.
    // The wire contract: raw JSON on purpose. (`bench cycles`' report has no
    // Deserialize in lpvmm: this is its only reader.)
    let (rc, out) = g.lpvmm("bench cycles {vm} --patches cmdline --cycles 2 --json")?;
    let r = lpvmm_tests::json(&out)?;
    let count = |k: &str| r[k].as_array().map(Vec::len);
    check!(
        rc == 0
            && r["cycles_done"].as_u64() == Some(2)
            && r["transitions"].as_u64() == Some(4)
            && (count("per_task_ms"), count("immediate_ms")) == (Some(2), Some(2))
            && r["stopped"].is_null(),
        "{series}: bench cycles: {out}"
    );
    check!(
        g.text("cat /proc/cmdline")? == original,
        "{series}: after bench cycles"
    );
    let (rc, out) = g.lpvmm("bench cycles {vm} --patches nosuch --cycles 1")?;
    check!(
        rc != 0 && out.contains("nosuch"),
        "{series}: bench cycles of a patch that is not loaded: {out}"
    );
    let (rc, out) = g.lpvmm("patch unload {vm} cmdline")?;
    check!(rc == 0, "unload: {out}");
    check!(
        text_sum(&mut g)? == text_before,
        "{series}: text after unload"
    );
    eprintln!(
        "{series}: /proc/cmdline patched and restored; kernel text sha256 back to {text_before}"
    );
    g.poweroff().map(|_| ())
}

/// Acceptance 2 and 3: a string in meminfo_proc_show, a patched syscall (uname), and a
/// patch that calls a static, non-exported kernel function.
fn meminfo_uname_static(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("more-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let text_before = text_sum(&mut g)?;
    let uname_before = g.run("uname -a")?.trim().to_string();
    let release = g.text("uname -r")?;
    check!(
        release.starts_with(&format!("{series}.")),
        "{series}: uname -r says {release:?}"
    );

    apply(&mut g, "meminfo")?;
    let mem = g.text("cat /proc/meminfo")?;
    check!(
        mem.lines()
            .next()
            .is_some_and(|l| l.starts_with("MemTotalLP:") && l.ends_with(" kB")),
        "{series}: /proc/meminfo after the patch:\n{mem}"
    );

    apply(&mut g, "uname")?;
    // `uname -a`: sysname, nodename, release, version, ...: the version is the patch's,
    // the release exactly the kernel's own (not a prefix: 6.1 is one of 6.12).
    let uname = g.text("uname -a")?;
    let fields: Vec<&str> = uname.split_whitespace().collect();
    check!(
        fields.get(3) == Some(&"lpvmm-live-patched") && fields.get(2) == Some(&release.as_str()),
        "{series}: uname -a says {uname:?} (want release {release:?}, version lpvmm-live-patched)"
    );

    apply(&mut g, "static-call")?;
    let version = g.text("cat /proc/version")?;
    let tail: Vec<f64> = version
        .trim()
        .strip_prefix("lpvmm static call, uptime: ")
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    check!(
        tail.len() == 2 && tail[0] > 0.0,
        "{series}: /proc/version through the static uptime_proc_show says {version:?}"
    );

    for p in ["static-call", "uname", "meminfo"] {
        toggle(&mut g, "disable", p)?;
    }
    check!(
        g.text("cat /proc/meminfo")?.starts_with("MemTotal: "),
        "meminfo not restored"
    );
    check!(
        g.run("uname -a")?.trim() == uname_before,
        "uname not restored"
    );
    check!(
        g.text("cat /proc/version")?.starts_with("Linux version"),
        "version not restored"
    );
    check!(
        text_sum(&mut g)? == text_before,
        "{series}: text differs after disabling all"
    );
    g.poweroff().map(|_| ())
}

/// Start `sleep SECS` in the background and wait until the guest itself shows it asleep
/// in `common_nsleep` (/proc/PID/stack): a just-started sleep may still be in exec or
/// startup, and a patch applied then would rightly find nothing in its way.
fn sleep_pid(g: &mut Guest, secs: u32) -> Result<i64, String> {
    let pid = g.spawn(&format!("sleep {secs} &"))?;
    let mut stack = String::new();
    for _ in 0..100 {
        stack = g.run(&format!("cat /proc/{pid}/stack 2>/dev/null; true"))?;
        if stack.contains("common_nsleep") {
            return Ok(pid);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("sleep {pid} never reached common_nsleep: {stack}"))
}

/// Acceptance 4 (immediate consistency): a task sleeping in the function to patch
/// blocks the switch, status names it with its stack, the patch applies once the sleep
/// ends; kept blocked past the timeout, the patch fails and the kernel text is
/// byte-identical to before.
fn blocked_transition(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("blocked-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let text_before = text_sum(&mut g)?;

    // Blocked, then unblocked within the timeout.
    let sleeper = sleep_pid(&mut g, 25)?;
    let file = g.host.file(&patch_path("nsleep"));
    let (rc, out) = g.lpvmm(&format!(
        "patch {{vm}} {file} --consistency immediate --timeout 120 --no-wait"
    ))?;
    check!(rc == 0, "{out}");
    std::thread::sleep(Duration::from_secs(2));
    let status = patchtest::status(&mut g)?;
    let active = &status.active;
    let ours = active
        .iter()
        .flat_map(|a| &a.blockers)
        .find(|b| i64::from(b.pid) == sleeper);
    let ours =
        ours.ok_or_else(|| format!("{series}: status does not name sleep {sleeper}: {active:?}"))?;
    check!(
        ours.reason.contains("common_nsleep"),
        "{series}: reason {:?}",
        ours.reason
    );
    let frames: Vec<&str> = ours
        .trace
        .frames
        .iter()
        .filter_map(|x| x.function.as_deref())
        .collect();
    check!(
        frames.contains(&"common_nsleep") && frames.contains(&"hrtimer_nanosleep"),
        "{series}: blocker stack {frames:?}"
    );
    let (_, human) = g.lpvmm("patch status {vm}")?;
    check!(
        human.contains(&format!("blocked by pid {sleeper}")),
        "{series}: human status does not name the sleeper:\n{human}"
    );
    check!(
        text_sum(&mut g)? == text_before,
        "{series}: text changed while blocked"
    );
    // The sleep ends; the patch applies within the timeout.
    let mut done = None;
    for _ in 0..120 {
        let s = patchtest::status(&mut g)?;
        if let Some(t) = s.history.last() {
            done = Some(t.clone());
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let t = done.ok_or("the transition never ended")?;
    check!(t.outcome == OutcomeView::Done, "{series}: outcome {t:?}");
    eprintln!(
        "{series}: nsleep applied after {} ticks, {} ms (sleep {sleeper} blocked it)",
        t.ticks, t.elapsed_ms
    );
    // The patched common_nsleep is the one that sleeps now: it counts the sleeps it
    // served, and the patch's /proc/version shows the count.
    let served = |g: &mut Guest| -> Result<u64, String> {
        // Its own line: the shell may add a job's `Done` notice.
        let v = g.text("cat /proc/version")?;
        v.lines()
            .find_map(|l| l.strip_prefix("lpvmm nsleep: "))
            .and_then(|r| r.strip_suffix(" sleeps in the new common_nsleep"))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("{series}: /proc/version under the nsleep patch: {v:?}"))
    };
    let before = served(&mut g)?;
    let (code, _) = g.run_status("sleep 1", Duration::from_secs(60))?;
    check!(code == 0, "sleep under the patch exited {code}");
    let after = served(&mut g)?;
    check!(
        after > before,
        "{series}: `sleep 1` did not go through the new common_nsleep (its count went \
         from {before} to {after})"
    );
    eprintln!("{series}: the new common_nsleep served `sleep 1` (count {before} -> {after})");
    toggle(&mut g, "disable", "nsleep")?;
    let version = g.text("cat /proc/version")?;
    check!(
        version.starts_with("Linux version"),
        "{series}: /proc/version after disable: {version:?}"
    );
    let (rc, out) = g.lpvmm("patch unload {vm} nsleep")?;
    check!(rc == 0, "unload: {out}");
    check!(
        text_sum(&mut g)? == text_before,
        "{series}: text after disable"
    );

    // Blocked past the timeout: the patch fails, the text is as before.
    let sleeper = sleep_pid(&mut g, 1000)?;
    let (rc, out) = g.lpvmm(&format!(
        "patch {{vm}} {file} --consistency immediate --timeout 4"
    ))?;
    check!(
        rc != 0,
        "{series}: patch applied although sleep {sleeper} never left: {out}"
    );
    check!(
        out.contains("gave up")
            && out.contains(&format!("blocked by pid {sleeper}"))
            && out.contains("common_nsleep"),
        "{series}: failure report:\n{out}"
    );
    check!(
        text_sum(&mut g)? == text_before,
        "{series}: text changed by a failed patch"
    );
    let (_, list) = g.lpvmm("patch list {vm}")?;
    check!(
        !list.contains("nsleep"),
        "{series}: failed patch still loaded: {list}"
    );
    g.run(&format!("kill {sleeper}"))?;
    g.poweroff().map(|_| ())
}

/// Acceptance 6: bad patches refused with a clear message before any guest byte
/// changes (kernel text and patch area hashes compared).
fn bad_input(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("bad-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 1, "")?;
    // A good patch first, so that the patch area is in use and "already loaded" exists.
    apply(&mut g, "cmdline")?;
    let before = checksums(&mut g)?;
    for (file, want) in BAD {
        let path = g.host.file(&patch_path(file));
        let (rc, out) = g.lpvmm(&format!("patch {{vm}} {path} --timeout 5"))?;
        check!(rc != 0, "{series}: {file} was accepted: {out}");
        check!(
            out.contains(want),
            "{series}: {file}: message {out:?} lacks {want:?}"
        );
        check!(
            checksums(&mut g)? == before,
            "{series}: {file} changed guest memory"
        );
        eprintln!(
            "{series}: {file}: {}",
            out.trim().lines().last().unwrap_or("")
        );
    }
    check!(
        g.text("cat /proc/cmdline")? == PATCHED,
        "good patch disturbed"
    );
    g.poweroff().map(|_| ())
}

/// Acceptance 7: 200 enable/disable cycles while 4 processes read /proc/cmdline; every
/// read is the old or the new text, and the guest logs no warning.
fn under_load(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("load-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let boot_splats = g.run(SPLATS)?;
    let original = g.text("cat /proc/cmdline")?;
    apply(&mut g, "cmdline")?;
    toggle(&mut g, "disable", "cmdline")?;
    g.run(&format!(
        "rm -f /tmp/stop; readcheck -p 4 -f /proc/cmdline -s /tmp/stop '{original}' '{PATCHED}' >/tmp/rc.log 2>&1 &"
    ))?;
    let cycles: u64 = 200;
    let (rc, out) = patchtest::verb_cycles(&mut g, "cmdline", ["enable", "disable"], cycles)?;
    if rc != 0 || !out.contains(&format!("cycles={cycles}")) {
        let why = g.vmm_stderr();
        return Err(format!(
            "{series}: enable/disable loop stopped: {out}\n{why}"
        ));
    }
    g.run("touch /tmp/stop; wait")?;
    let log = g.run("cat /tmp/rc.log")?;
    check!(log.contains("readcheck: OK"), "{series}: bad reads: {log}");
    // Every read was one of the two texts. That the patch came and went with the
    // cycles: both texts were read, and each reader switched between them at least
    // `cycles` times (a reader sees one switch each way for every enable and disable it
    // outlasts by a whole read, and starts and ends on the original: at most
    // 2 × `cycles`; each read takes well under a millisecond, each state lasts tens)
    // and none more than twice per cycle (one that read the old text again while the
    // patch stayed enabled would).
    let (matches, min, max) = readcheck_counts(&log)
        .ok_or_else(|| format!("{series}: no counts in readcheck's line: {log}"))?;
    check!(
        matches.len() == 2 && matches[0] > 0 && matches[1] > 0,
        "{series}: readers did not see both the original and the patched text: {log}"
    );
    check!(
        min >= cycles && max <= 2 * cycles,
        "{series}: each reader should switch between the texts between {cycles} and {} \
         times over {cycles} enable/disable cycles (min=, max=): {log}",
        2 * cycles
    );
    let splats = g.run(SPLATS)?;
    check!(
        splats.trim() == boot_splats.trim(),
        "{series}: new kernel warnings:\n{splats}"
    );
    let s = patchtest::status(&mut g)?;
    let enables = s.patches.first().map_or(0, |p| p.enables);
    check!(
        enables == cycles + 1,
        "{series}: {enables} enables recorded"
    );
    eprintln!(
        "{series}: {cycles} enable/disable cycles under load: {}",
        log.trim()
    );
    g.poweroff().map(|_| ())
}

/// `readcheck`'s counts: the reads of each text (`matches=N1,N2`) and the fewest and
/// the most switches between texts one reader saw (`min=L max=H`).
fn readcheck_counts(log: &str) -> Option<(Vec<u64>, u64, u64)> {
    let line = log.lines().find(|l| l.contains("readcheck: OK"))?;
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|t| t.strip_prefix(key))
            .map(str::to_string)
    };
    let matches = field("matches=")?
        .split(',')
        .map(|n| n.parse().ok())
        .collect::<Option<Vec<u64>>>()?;
    Some((
        matches,
        field("min=")?.parse().ok()?,
        field("max=")?.parse().ok()?,
    ))
}

/// (file, what the refusal must say)
const BAD: &[(&str, &str)] = &[
    ("bad-not-elf", "not an ELF object"),
    ("bad-truncated", "not an ELF object"),
    ("bad-wrong-machine", "wrong machine"),
    ("bad-no-manifest", "no .lpvmm.manifest"),
    (
        "bad-unknown-symbol",
        "unknown symbol 'no_such_kernel_function'",
    ),
    ("bad-ambiguous", "'address_show' is ambiguous"),
    (
        "bad-module-function",
        "tun_get_socket is a function of module tun, not of vmlinux",
    ),
    ("bad-relocation", "relocation R_X86_64_REX_GOTPCRELX"),
    ("bad-special-section", "section __jump_table (needed by nf)"),
    ("bad-no-fentry", "not an fentry NOP"),
    ("bad-out-of-range", "does not fit in 32 bits"),
    ("bad-area-full", "patch area full"),
    ("cmdline", "already loaded"),
];

/// Sources of the bad patches: (name, C source, extra compiler flags).
/// A patch that kills its guest from inside its own code: its `cmdline_proc_show` loads
/// an empty IDT and traps, so the CPU cannot deliver the trap, nor the faults that
/// follow, and triple-faults with its RIP in the patch.
fn crash_in_patch() -> (&'static str, String, Vec<&'static str>) {
    let source = r#"#include <lpvmm/patch.h>
struct seq_file;
static int crash(struct seq_file *m, void *v)
{
	struct { unsigned short limit; unsigned long base; } __attribute__((packed)) none = { 0, 0 };
	asm volatile("lidt %0\n\tint3" : : "m"(none));
	return 0;
}
LPVMM_PATCH("crash-in-patch");
LPVMM_REPLACE(cmdline_proc_show, crash);
"#;
    ("crash-in-patch", source.to_string(), vec![])
}

/// A guest that dies executing lpvmm's code is lpvmm's, and the harness must name it so
/// rather than retry it as the platform's: the VMM says where its patch code lies, the
/// test host's KVM trace says where the guest triple-faulted, and
/// `death_in_patch_code` (what the harness asks before any retry) puts the two together.
fn death_in_patch_code_is_lpvmms(host: &mut TestHost) -> TestResult {
    let (mut g, _) = host.boot_guest("crashpatch", "6.1", 1, "")?;
    apply(&mut g, "crash-in-patch")?;
    g.type_at_prompt("cat /proc/cmdline")?;
    let exit = g.wait_exit(EXIT_TIMEOUT)?;
    drop(g);
    check!(
        exit.code == 3
            && exit
                .stderr
                .contains(lpvmm::session::patching::PATCH_CODE_MAPPED),
        "lpvmm exited {} (want 3, a triple fault, and where the patch code lies): {}",
        exit.code,
        exit.stderr
    );
    // Where it died: the harness's own rule over the test host's trace (nested), else
    // lpvmm's own report where that keeps the vCPU's state (Intel); with neither, an
    // explicit failure unless the user turned the trace off on purpose.
    let at = match host.trace_of_planned_death()? {
        Some(trace) => {
            let report = format!("{}\n{trace}", exit.stderr);
            death_in_patch_code(&report)
                .ok_or_else(|| format!("the death was not placed in the patch code:\n{report}"))?
        }
        None => match triple_fault_rip(&exit.stderr) {
            Some(rip) => in_patch_code(&exit.stderr, rip).ok_or_else(|| {
                format!(
                    "lpvmm's own report puts the triple fault at {rip:#x}, not in its patch \
                     code:\n{}",
                    exit.stderr
                )
            })?,
            None => return unlocated_death(host.mode(), "the death in patch code", &exit.stderr),
        },
    };
    eprintln!("{DIED_IN_PATCH_CODE}: {at}");
    Ok(())
}

fn bad_sources() -> Vec<(&'static str, String, Vec<&'static str>)> {
    let patch = |body: &str, target: &str| {
        format!("#include <lpvmm/patch.h>\n{body}\nLPVMM_PATCH(\"bad\");\nLPVMM_REPLACE({target}, nf);\n")
    };
    vec![
        ("bad-no-manifest", "int nf(void) { return 0; }\n".into(), vec![]),
        (
            "bad-unknown-symbol",
            patch("extern int no_such_kernel_function(void);\nint nf(void) { return no_such_kernel_function(); }", "meminfo_proc_show"),
            vec![],
        ),
        (
            "bad-ambiguous",
            patch("extern int address_show(void);\nint nf(void) { return address_show(); }", "meminfo_proc_show"),
            vec![],
        ),
        (
            "bad-module-function",
            patch("int nf(void) { return 0; }", "tun_get_socket"),
            vec![],
        ),
        (
            "bad-relocation",
            patch("extern int some_int;\nint nf(void) { return some_int; }", "meminfo_proc_show"),
            vec!["-fpic", "-mcmodel=small"],
        ),
        (
            "bad-special-section",
            patch("int nf(void) { asm volatile(\"1: nop\\n.pushsection __jump_table,\\\"aw\\\"\\n.long 1b - .\\n.long 1b - .\\n.quad 0\\n.popsection\"); return 0; }", "meminfo_proc_show"),
            vec![],
        ),
        ("bad-no-fentry", patch("int nf(void) { return 0; }", "do_syscall_64"), vec![]),
        (
            "bad-out-of-range",
            patch("extern void far_away(void);\nLPVMM_SYMBOL(far_away, runqueues, 1);\nint nf(void) { far_away(); return 0; }", "meminfo_proc_show"),
            vec![],
        ),
        (
            "bad-area-full",
            patch("char big[32 << 20];\nint nf(void) { return big[99]; }", "meminfo_proc_show"),
            vec![],
        ),
    ]
}

/// Build every patch the tests use, here, with lpvmm kp build (or bare gcc for the bad
/// ones, which kp build would refuse).
fn build_patches() -> Result<Vec<(PathBuf, String)>, String> {
    let out = repo_root().join("target/lpvmm-test-patches");
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let ok = Command::new(cargo)
        .args(["build", "--quiet", "-p", "lpvmm"])
        .current_dir(repo_root())
        .status()
        .map_err(|e| e.to_string())?;
    check!(ok.success(), "cargo build -p lpvmm failed");
    let mut files = Vec::new();
    let mut add = |name: &str, path: PathBuf| files.push((path, patch_path(name)));
    for sample in ["cmdline", "meminfo", "uname", "static-call", "nsleep"] {
        let kp = out.join(format!("{sample}.kp"));
        let src = repo_root().join(format!("patcher/examples/{sample}.c"));
        run(Command::new(lpvmm_binary())
            .arg("kp")
            .arg("build")
            .arg(&src)
            .arg("-o")
            .arg(&kp))?;
        add(sample, kp);
    }
    for (name, source, flags) in bad_sources().into_iter().chain([crash_in_patch()]) {
        let src = out.join(format!("{name}.c"));
        std::fs::write(&src, source).map_err(|e| e.to_string())?;
        let kp = out.join(format!("{name}.kp"));
        gcc_like_kp_build(&src, &kp, &flags)?;
        add(name, kp);
    }
    let good = std::fs::read(out.join("cmdline.kp")).map_err(|e| e.to_string())?;
    let write = |name: &str, bytes: &[u8]| -> Result<PathBuf, String> {
        let p = out.join(format!("{name}.kp"));
        std::fs::write(&p, bytes).map_err(|e| e.to_string())?;
        Ok(p)
    };
    add(
        "bad-not-elf",
        write("bad-not-elf", b"#!/bin/sh\necho not a patch\n")?,
    );
    add(
        "bad-truncated",
        write("bad-truncated", &good[..good.len() / 2])?,
    );
    let mut arm = good.clone();
    arm[18] = 0xb7; // e_machine: EM_AARCH64
    add("bad-wrong-machine", write("bad-wrong-machine", &arm)?);
    Ok(files)
}

/// gcc with lpvmm kp build's flags but no checks (for patches that must fail at load).
fn gcc_like_kp_build(src: &Path, kp: &Path, extra: &[&str]) -> TestResult {
    let include = std::env::temp_dir().join(format!("lpvmm-test-include-{}", std::process::id()));
    std::fs::create_dir_all(include.join("lpvmm")).map_err(|e| e.to_string())?;
    std::fs::copy(
        repo_root().join("patcher/include/lpvmm/patch.h"),
        include.join("lpvmm/patch.h"),
    )
    .map_err(|e| e.to_string())?;
    run(Command::new("gcc")
        .args([
            "-c",
            "-O2",
            "-mcmodel=kernel",
            "-fno-pic",
            "-mno-red-zone",
            "-ffreestanding",
        ])
        .args([
            "-fno-stack-protector",
            "-fno-common",
            "-fno-asynchronous-unwind-tables",
        ])
        .args(["-fcf-protection=none", "-fno-omit-frame-pointer"])
        .args(extra)
        .arg("-I")
        .arg(&include)
        .arg("-o")
        .arg(kp)
        .arg(src))
}

fn main() {
    // The patches, and lpvmm built with the test-only fault-injection feature.
    host_files_or_exit(build_patches().and_then(|mut files| {
        files.push(lpvmm_tests::fault_injection::faulty_lpvmm()?);
        Ok(files)
    }));
    let mut trials = series_trials(&[
        ("cmdline_patched_and_restored", cmdline),
        ("meminfo_uname_and_static_call", meminfo_uname_static),
        ("blocked_by_a_sleeping_task", blocked_transition),
        ("bad_patches_refused", bad_input),
        ("enable_disable_200_cycles_under_load", under_load),
    ]);
    trials.push(host_trial(
        "a_death_in_patch_code_is_lpvmms_and_named",
        death_in_patch_code_is_lpvmms,
    ));
    trials.push(host_trial(
        "a_fault_of_lpvmms_is_never_retried",
        lpvmm_tests::fault_injection::a_fault_of_lpvmms_is_never_retried,
    ));
    run_group(trials)
}
