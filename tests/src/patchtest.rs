//! Helpers the patch tests share: the guest's view (files it prints), lpvmm's view
//! (`patch status`, checksums), sleepers held in a kernel function, and building
//! patches with `lpvmm kp build`. Each helper fails when the value it reads is missing
//! (a checksum without its sha256, a transition that never shows), never passes on it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lpvmm::proto::{
    BlockerView, FuncView, OutcomeView, PatchStatusResult, PatchView, TransitionView,
};
use patcher::Phase;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    address_in_report, check, json, lpvmm_binary, patch_code_ranges, repo_root, tail, Guest,
    HostMode, TestResult, SPLATS,
};

/// What an `lpvmm ... --json` printed, read as the protocol's type for it
/// (`lpvmm::proto`): a field the test reads is then one the type has.
pub fn parse<T: DeserializeOwned>(out: &str) -> Result<T, String> {
    serde_json::from_str(out).map_err(|e| format!("{e}: {}", tail(out, 2000)))
}

/// `lpvmm ARGS` (`--json` among them), which must succeed, read as `T` ([`parse`]).
pub fn lpvmm_json<T: DeserializeOwned>(g: &mut Guest, args: &str) -> Result<T, String> {
    let (rc, out) = g.lpvmm(args)?;
    check!(rc == 0, "lpvmm {args}: {out}");
    parse(&out).map_err(|e| format!("lpvmm {args}: {e}"))
}

/// Where the test host keeps a patch the tests built.
pub fn patch_path(name: &str) -> String {
    format!("/root/patches/{name}.kp")
}

/// SHA-256 of the guest's kernel text (`text`) or of the patch area (`patch-area`), as
/// lpvmm reads them.
pub fn checksum(g: &mut Guest, what: &str) -> Result<String, String> {
    let (rc, out) = g.lpvmm(&format!("checksum {{vm}} {what} --json"))?;
    check!(rc == 0, "checksum {what}: {out}");
    sha256_in(&out).map_err(|e| format!("checksum {what}: {e}"))
}

/// The `sha256` of `lpvmm checksum --json` output: 64 hex digits, or an error (never an
/// empty string that would compare equal to another missing one).
pub fn sha256_in(out: &str) -> Result<String, String> {
    // The wire contract: raw JSON on purpose. Every test's checksums come through here,
    // and the unit test below feeds it what a ChecksumResult serializes to.
    let sum = json(out)?["sha256"].as_str().unwrap_or("").to_string();
    check!(
        sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit()),
        "no sha256 in: {out}"
    );
    Ok(sum)
}

/// `lpvmm patch {vm} FILE` of the patch the tests built as `stem` ([`patch_path`]),
/// which must load and enable; returns what it printed.
pub fn apply(g: &mut Guest, stem: &str) -> Result<String, String> {
    let file = g.host.file(&patch_path(stem));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file}"))?;
    check!(rc == 0, "lpvmm patch {stem} failed:\n{out}");
    Ok(out)
}

/// `lpvmm patch VERB {vm} NAME`, which must succeed; returns what it printed.
pub fn verb(g: &mut Guest, verb: &str, name: &str) -> Result<String, String> {
    let (rc, out) = g.lpvmm(&format!("patch {verb} {{vm}} {name}"))?;
    check!(rc == 0, "lpvmm patch {verb} {name} failed:\n{out}");
    Ok(out)
}

/// `lpvmm patch FIRST` then `patch SECOND` of the loaded patch `name` in `g`, `cycles`
/// times, in one shell loop on the host (no harness round trip per command), stopping at
/// the first command that fails; its exit status and `cycles=N`, the cycles completed.
pub fn verb_cycles(
    g: &mut Guest,
    name: &str,
    [first, second]: [&str; 2],
    cycles: u64,
) -> Result<(i32, String), String> {
    let (lp, vm) = (g.host.lpvmm(), g.name.clone());
    g.host.exec_status(
        &format!(
            "i=0; while [ $i -lt {cycles} ]; do {lp} patch {first} {vm} {name} >/dev/null || break; \
             {lp} patch {second} {vm} {name} >/dev/null || break; i=$((i+1)); done; echo cycles=$i"
        ),
        Duration::from_secs(1800),
    )
}

/// Kernel text and patch area checksums.
pub fn checksums(g: &mut Guest) -> Result<(String, String), String> {
    Ok((checksum(g, "text")?, checksum(g, "patch-area")?))
}

/// `lpvmm patch status --json`, which must succeed.
pub fn status(g: &mut Guest) -> Result<PatchStatusResult, String> {
    lpvmm_json(g, "patch status {vm} --json")
}

/// `lpvmm patch status --json` as raw JSON, for the test that holds the wire to its
/// words; the others read [`status`].
pub fn status_json(g: &mut Guest) -> Result<Value, String> {
    let (rc, out) = g.lpvmm("patch status {vm} --json")?;
    check!(rc == 0, "patch status: {out}");
    let s = json(&out)?;
    check!(
        s["patches"].is_array(),
        "patch status without patches: {out}"
    );
    Ok(s)
}

/// A loaded patch in `patch status`, which must be there.
pub fn patch_of<'s>(s: &'s PatchStatusResult, name: &str) -> Result<&'s PatchView, String> {
    s.patches
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| format!("patch {name} is not in status: {:?}", s.patches))
}

/// Wait until each of `want` (patch name, words of its `applied_at_boot`) is enabled and
/// was applied at this boot as said.
pub fn wait_applied_at_boot(g: &mut Guest, want: &[(&str, &str)]) -> TestResult {
    let mut last = None;
    for _ in 0..120 {
        let s = status(g)?;
        let done = want.iter().all(|(name, note)| {
            s.patches.iter().any(|p| {
                p.name == *name
                    && p.state == lpvmm::proto::PatchStateView::Enabled
                    && p.applied_at_boot
                        .as_deref()
                        .is_some_and(|a| a.contains(note))
            })
        });
        if done && s.active.is_none() {
            return Ok(());
        }
        last = Some(s);
        std::thread::sleep(Duration::from_secs(1));
    }
    let s = last.map(|s| {
        format!(
            "{:?} {:?}",
            s.patches
                .iter()
                .map(|p| (&p.name, p.state, &p.applied_at_boot))
                .collect::<Vec<_>>(),
            s.boot
        )
    });
    Err(format!(
        "patches {want:?} not applied at boot within 120 s: {s:?}"
    ))
}

/// `sleep SECS` in the background, once the guest shows it asleep in `func`
/// (/proc/PID/stack); returns its pid and that stack.
pub fn sleeper(g: &mut Guest, secs: u32, func: &str) -> Result<(i64, String), String> {
    let pid = g.spawn(&format!("sleep {secs} &"))?;
    match guest_stack_naming(g, pid, func)? {
        (true, stack) => Ok((pid, stack)),
        (false, stack) => Err(format!("sleep {pid} never reached {func}: {stack}")),
    }
}

/// The guest's own `/proc/PID/stack` of `pid`, read every 100 ms for up to 10 s until
/// it names `func`: whether it did, and the last one read.
pub fn guest_stack_naming(g: &mut Guest, pid: i64, func: &str) -> Result<(bool, String), String> {
    let mut stack = String::new();
    for _ in 0..100 {
        stack = g.run(&format!("cat /proc/{pid}/stack 2>/dev/null; true"))?;
        if stack.contains(func) {
            return Ok((true, stack));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((false, stack))
}

/// The transition in progress once it has had its first tick.
pub fn switching(g: &mut Guest) -> Result<TransitionView, String> {
    let t0 = Instant::now();
    loop {
        let s = status(g)?;
        if let Some(a) = s.active.as_ref().filter(|a| a.phase == Phase::Switching) {
            return Ok(a.clone());
        }
        check!(
            s.active.is_some() || t0.elapsed() < Duration::from_secs(1),
            "no transition in progress: {s:?}"
        );
        check!(
            t0.elapsed() < Duration::from_secs(60),
            "the transition never started switching: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The transition in progress once `pid` alone holds it. A task caught running on a
/// vCPU at an instant its stack cannot be trusted (an idle task inside a retpoline
/// thunk, say) blocks one tick and is checked again at the next, as the kernel's
/// livepatch retries a task running on another CPU; such a blocker is waited out for
/// at most ten seconds. Any other blocker, a task asleep where the patch cannot let
/// it go, is an error at once.
pub fn held_by(g: &mut Guest, pid: i64) -> Result<TransitionView, String> {
    let t0 = Instant::now();
    loop {
        let t = switching(g)?;
        let blockers = &t.blockers;
        if pids(blockers) == [pid] {
            return Ok(t);
        }
        let asleep: Vec<&BlockerView> = blockers
            .iter()
            .filter(|b| i64::from(b.pid) != pid && !on_a_vcpu(b))
            .collect();
        check!(
            asleep.is_empty() && blockers.iter().any(|b| i64::from(b.pid) == pid),
            "the transition should be held by {pid} alone: {:?}",
            t.blockers
        );
        check!(
            t0.elapsed() < Duration::from_secs(10),
            "a running task still blocks beside {pid} after 10 s: {:?}",
            t.blockers
        );
        eprintln!(
            "a running task blocks for now beside {pid}: {:?}",
            t.blockers
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether the blocker's stack starts on a vCPU (`TraceStart::Vcpu`: it was running).
/// Read through the wire's words (`{"vcpu": N}`): the tests crate does not depend on
/// introspection, whose type that is.
fn on_a_vcpu(b: &BlockerView) -> bool {
    serde_json::to_value(&b.trace.start).is_ok_and(|v| !v["vcpu"].is_null())
}

/// Wait for transition `id` to end (at most two minutes); returns it. If it does not
/// end, the error says what held it: `patch status` as a person reads it, and the
/// VMM's stderr.
pub fn ended(g: &mut Guest, id: u64) -> Result<TransitionView, String> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(120) {
        let s = status(g)?;
        if let Some(t) = s.history.iter().find(|t| t.id == id) {
            return Ok(t.clone());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, human) = g.lpvmm("patch status {vm}")?;
    Err(format!(
        "transition {id} did not end within 120 s:\n{human}\nVMM stderr:\n{}\n{}",
        g.vmm_stderr(),
        guest_report(g)
    ))
}

/// What the guest says of itself after a failure, for its message: its kernel's
/// complaints (with their context) and its processes; or, if it no longer answers, why
/// (the VMM's state and where each vCPU is: a vCPU the test host holds is named so).
pub fn guest_report(g: &mut Guest) -> String {
    let cmd =
        "dmesg | grep -E -A14 'WARNING: CPU|Oops|BUG:|RIP:|soft lockup|hung task|rcu_.*stall' \
               | tail -80; ps -o pid,ppid,stat,comm";
    match g.run_status(cmd, Duration::from_secs(30)) {
        Ok((_, out)) => format!("the guest's kernel log (complaints) and processes:\n{out}"),
        Err(e) => format!("the guest did not answer: {e}"),
    }
}

/// The pids of a list of blockers.
pub fn pids(list: &[BlockerView]) -> Vec<i64> {
    list.iter().map(|b| i64::from(b.pid)).collect()
}

/// A function in `patch status`'s `funcs`, which must be there.
pub fn func_of<'s>(s: &'s PatchStatusResult, func: &str) -> Result<&'s FuncView, String> {
    s.funcs
        .iter()
        .find(|x| x.name == func)
        .ok_or_else(|| format!("{func} is not in status: {:?}", s.funcs))
}

/// What the site of `func` holds now (`original`, `jump`, `trampoline`: the wire's
/// word); a function no loaded patch names is `original`.
pub fn site_now(s: &PatchStatusResult, func: &str) -> String {
    match func_of(s, func) {
        Ok(f) => f.site_now.to_string(),
        Err(_) => "original".to_string(),
    }
}

/// The guest's /proc/cmdline.
pub fn cmdline(g: &mut Guest) -> Result<String, String> {
    g.text("cat /proc/cmdline")
}

/// Kill a background job and reap it (so that the shell prints nothing about it later).
pub fn kill(g: &mut Guest, pid: i64) -> TestResult {
    g.run(&format!("kill {pid}; wait {pid} 2>/dev/null; true"))?;
    Ok(())
}

/// Where lpvmm's own report of a guest's triple fault (`triple fault on vCPU N at rip
/// 0x…`, in its stderr) puts the vCPU, when that says anything: a kernel-half address.
/// On AMD, KVM resets a vCPU after its shutdown before lpvmm can read it (`rip 0xfff0`,
/// the reset vector: `shutdown_interception` in arch/x86/kvm/svm/svm.c), which says
/// nothing and gives `None`; Intel's KVM keeps the state of the fault.
pub fn triple_fault_rip(stderr: &str) -> Option<u64> {
    stderr
        .lines()
        .filter(|l| l.contains("triple fault on vCPU"))
        .find_map(|l| {
            let hex = l.split(" at rip 0x").nth(1)?.split_whitespace().next()?;
            u64::from_str_radix(hex, 16).ok()
        })
        .filter(|&rip| rip >= 0xffff_8000_0000_0000)
}

/// `rip` as an offset into the patch code of [`patch_code_ranges`], if it lies there.
pub fn in_patch_code(stderr: &str, rip: u64) -> Option<String> {
    address_in_report(&format!("{rip:#018x}"), &patch_code_ranges(stderr))
}

/// The end of a test that killed its guest on purpose and has nothing that says where
/// the guest died: no test host trace (natively there is no test host; nested, the user
/// turned it off) and lpvmm's own report shows the reset vector (AMD). Where the user
/// set `LPVMM_TEST_HOST_TRACE=0` on purpose, the location check is skipped, loudly;
/// otherwise this is a failure, never a silent pass.
pub fn unlocated_death(mode: HostMode, what: &str, stderr: &str) -> TestResult {
    let skip = std::env::var("LPVMM_TEST_HOST_TRACE").as_deref() == Ok("0");
    unlocated(mode, what, stderr, skip)
}

/// [`unlocated_death`], with whether the user turned the trace off on purpose.
fn unlocated(mode: HostMode, what: &str, stderr: &str, skip: bool) -> TestResult {
    let why = match mode {
        HostMode::Native => "natively there is no test host, so no KVM trace of the guest's death",
        HostMode::Nested => "the test host kept no KVM trace",
    };
    let lpvmm_said = stderr
        .lines()
        .find(|l| l.contains("triple fault on vCPU"))
        .unwrap_or("(no triple fault line)")
        .trim();
    if skip {
        eprintln!(
            "LOCATION NOT CHECKED: {what}: LPVMM_TEST_HOST_TRACE=0 was set, {why}, and lpvmm's \
             own report does not say where ({lpvmm_said}); the exit code and lpvmm's message \
             were checked, where the guest died was not"
        );
        return Ok(());
    }
    Err(format!(
        "{what} cannot be located: {why}, and lpvmm's own report does not say where \
         ({lpvmm_said}: on AMD, KVM resets a vCPU after a triple fault before lpvmm reads \
         it). Run the test nested (LPVMM_TEST_FORCE_NESTED=1) for the test host's trace, \
         or set LPVMM_TEST_HOST_TRACE=0 to skip the location check on purpose"
    ))
}

/// Run a host command; fail with its output unless it succeeds.
pub fn run_cmd(cmd: &mut Command) -> TestResult {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    check!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Build the lpvmm binary the tests run.
pub fn build_lpvmm() -> TestResult {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run_cmd(
        Command::new(cargo)
            .args(["build", "--quiet", "-p", "lpvmm"])
            .current_dir(repo_root()),
    )
}

/// `lpvmm kp build SRC -o KP` with extra compiler flags.
pub fn kp_build(src: &Path, kp: &Path, cflags: &[String]) -> TestResult {
    let mut cmd = Command::new(lpvmm_binary());
    cmd.args(["kp", "build"]).arg(src).arg("-o").arg(kp);
    for f in cflags {
        cmd.arg(format!("--cflag={f}"));
    }
    run_cmd(&mut cmd)
}

/// A guest workload for transitions under load: a `sleep 0.2` loop (so that most
/// transitions of a patch that also replaces `common_nsleep` start with a sleep inside
/// it, and every other task is dispatched by the trampolines until it ends) and four
/// `pairread -G` readers of /proc/cmdline and /proc/version, which check that no process
/// ever sees an older generation (`lpvmm cmdline gen N`, `lpvmm version gen N`) after a
/// newer one. Stop it with [`Readers::stop`].
pub struct Readers {
    boot_splats: String,
}

impl Readers {
    pub fn start(g: &mut Guest) -> Result<Readers, String> {
        let boot_splats = g.run(SPLATS)?;
        g.run("(while [ ! -e /tmp/stop ]; do sleep 0.2; done) >/dev/null 2>&1 &")?;
        g.run(
            "rm -f /tmp/stop; oc=$(cat /proc/cmdline); ov=$(cat /proc/version); \
             pairread -G -p 4 -s /tmp/stop -a /proc/cmdline -b /proc/version \"$oc\" \"$ov\" \
             'lpvmm cmdline gen ' 'lpvmm version gen ' >/tmp/pr.log 2>&1 &",
        )?;
        Ok(Readers { boot_splats })
    }

    /// Stop the workload; fails unless the readers saw no violation and no bad read and
    /// reached generation `last`, and the guest logged no new kernel warning. Returns
    /// the readers' summary line.
    pub fn stop(self, g: &mut Guest, last: u32) -> Result<String, String> {
        g.run("touch /tmp/stop; wait")?;
        let log = g.run("cat /tmp/pr.log")?;
        check!(
            log.contains("pairread: OK") && log.contains(&format!("max_gen={last}")),
            "readers saw a mix of versions (or not generation {last}): {log}"
        );
        let splats = g.run(SPLATS)?;
        check!(
            splats.trim() == self.boot_splats.trim(),
            "new kernel warnings:\n{splats}"
        );
        Ok(log.trim().to_string())
    }
}

/// Every transition in `patch status`'s history completed, and at least a quarter of
/// them needed more than one tick (so the run exercised per-task dispatch). Returns how
/// many did, of how many.
pub fn dispatched_history(s: &PatchStatusResult) -> Result<(usize, usize), String> {
    let history = &s.history;
    check!(
        !history.is_empty() && history.iter().all(|t| t.outcome == OutcomeView::Done),
        "a transition did not complete: {:?}",
        s.history
    );
    let multi = history.iter().filter(|t| t.ticks > 1).count();
    check!(
        multi * 4 >= history.len(),
        "only {multi} of {} transitions dispatched tasks by trampoline; the run would not \
         exercise per-task dispatch",
        history.len()
    );
    Ok((multi, history.len()))
}

/// How the task checks of the transitions in a status's history were made, summed
/// (`early_checks` of each: patcher/src/transition/early.rs).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EarlyChecks {
    pub confirmed: u64,
    pub unwound: u64,
    pub verified: u64,
    pub mismatches: u64,
    pub lists_confirmed: u64,
    pub lists_walked: u64,
    pub list_mismatches: u64,
}

/// The [`EarlyChecks`] of a status's history ([`status_json`]); an error when a
/// transition lacks them. Raw JSON: the protocol's type gives absent counts as zeros
/// (`#[serde(default)]`, for an older lpvmm), which this must tell from real zeros.
pub fn early_checks(s: &Value) -> Result<EarlyChecks, String> {
    let history = s["history"]
        .as_array()
        .ok_or_else(|| format!("status without history: {s}"))?;
    check!(!history.is_empty(), "no transition in the history: {s}");
    let mut sum = EarlyChecks::default();
    for t in history {
        let c = &t["early_checks"];
        let n = |k: &str| {
            c[k].as_u64()
                .ok_or_else(|| format!("transition {} without early_checks.{k}: {t}", t["id"]))
        };
        sum.confirmed += n("confirmed")?;
        sum.unwound += n("unwound")?;
        sum.verified += n("verified")?;
        sum.mismatches += n("mismatches")?;
        sum.lists_confirmed += n("lists_confirmed")?;
        sum.lists_walked += n("lists_walked")?;
        sum.list_mismatches += n("list_mismatches")?;
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_of_lpvmm_output_fail_when_the_value_is_missing() {
        let with = |sha256: &str| {
            serde_json::to_string(&lpvmm::proto::ChecksumResult {
                what: lpvmm::proto::ChecksumTarget::Text,
                start: 0,
                len: 1,
                sha256: sha256.to_string(),
                pause: Default::default(),
            })
            .unwrap()
        };
        let sum = "a".repeat(64);
        assert_eq!(sha256_in(&with(&sum)).unwrap(), sum);
        for bad in [
            "{}".to_string(),
            with(""),
            with("xyz"),
            with(&"a".repeat(63)),
            with(&"g".repeat(64)),
            with(&sum).replace(&format!("\"{sum}\""), "null"),
            "not json".to_string(),
        ] {
            assert!(sha256_in(&bad).is_err(), "{bad}");
        }
        let s: PatchStatusResult = serde_json::from_value(serde_json::json!({
            "patches": [{"name": "a", "state": "enabled", "forced": false, "enables": 1,
                "depends": [], "atomic_replace": false, "states": [], "orc_entries": 0,
                "funcs": []}],
            "funcs": [{"name": "f", "addr": 1, "site": 1, "versions": [], "visible": "a",
                "site_now": "jump"}],
            "active": null,
            "history": [],
            "area": null,
        }))
        .unwrap();
        assert!(patch_of(&s, "a").is_ok());
        assert!(patch_of(&s, "b").is_err(), "a missing patch is an error");
        assert!(func_of(&s, "g").is_err());
        assert_eq!(site_now(&s, "f"), "jump");
        assert_eq!(site_now(&s, "g"), "original");
        let no_site = r#"{"patches": [], "funcs": [{"name": "f", "addr": 1, "site": 1,
            "versions": [], "visible": "a"}], "active": null, "history": [], "area": null}"#;
        assert!(
            parse::<PatchStatusResult>(no_site).is_err(),
            "never a value that could pass"
        );
        assert!(pids(&[]).is_empty());
        let counts = serde_json::json!({"confirmed": 5, "unwound": 2, "verified": 5, "mismatches": 0,
                "lists_confirmed": 3, "lists_walked": 1, "list_mismatches": 0});
        let ok = serde_json::json!({"history": [{"id": 1, "early_checks": counts}, {"id": 2, "early_checks": counts}]});
        assert_eq!(
            early_checks(&ok).unwrap(),
            EarlyChecks {
                confirmed: 10,
                unwound: 4,
                verified: 10,
                mismatches: 0,
                lists_confirmed: 6,
                lists_walked: 2,
                list_mismatches: 0,
            }
        );
        let partial = serde_json::json!({"history": [{"id": 1, "early_checks": {"confirmed": 5}}]});
        assert!(
            early_checks(&partial).is_err(),
            "a missing count is an error"
        );
        assert!(early_checks(&serde_json::json!({"history": [{"id": 1}]})).is_err());
        assert!(early_checks(&serde_json::json!({"history": []})).is_err());
    }

    #[test]
    fn a_triple_fault_is_placed_only_by_a_kernel_address() {
        let mapped = lpvmm::session::patching::PATCH_CODE_MAPPED;
        let stderr = format!(
            "{mapped} 0xffffffffc0000000-0xffffffffc0010000 (patches and trampolines)\n\
             lpvmm: guest crashed (triple fault on vCPU 0 at rip 0xffffffffc000001a rsp 0x1 \
             cr3 0x2 cs 0x10): lpvmm ends the VM"
        );
        assert_eq!(triple_fault_rip(&stderr), Some(0xffff_ffff_c000_001a));
        assert!(in_patch_code(&stderr, 0xffff_ffff_c000_001a)
            .is_some_and(|at| at.contains("lpvmm's patch code+0x1a")));
        assert_eq!(in_patch_code(&stderr, 0xffff_ffff_8100_0000), None);
        // The reset vector (AMD) and a report without a place say nothing.
        let reset =
            "guest crashed (triple fault on vCPU 1 at rip 0xfff0 rsp 0x0 cr3 0x0 cs 0xf000)";
        assert_eq!(triple_fault_rip(reset), None);
        assert_eq!(
            triple_fault_rip("guest crashed (triple fault on vCPU 0)"),
            None
        );
        assert_eq!(triple_fault_rip(""), None);
        assert!(patch_code_ranges("no announcement").is_empty());
        // Nothing to place it by: a failure that says why, unless skipped on purpose.
        let native = unlocated(HostMode::Native, "the triple fault", reset, false);
        assert!(
            native.is_err_and(|e| e.contains("natively there is no test host")
                && e.contains("rip 0xfff0")
                && e.contains("LPVMM_TEST_HOST_TRACE=0"))
        );
        assert!(unlocated(HostMode::Nested, "the triple fault", reset, false).is_err());
        assert!(unlocated(HostMode::Native, "the triple fault", reset, true).is_ok());
        assert!(unlocated(HostMode::Nested, "the triple fault", reset, true).is_ok());
    }
}
