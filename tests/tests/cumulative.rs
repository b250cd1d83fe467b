//! Cumulative patches on real KVM (native or nested), both kernel series: versions in
//! load order, atomic replace with nop versions, system states, a replace under
//! per-task consistency and its reverse, and a chain of cumulative patches under
//! readers that check every read. What counts is what the guest prints.
//!
//! Every patch is built here from patcher/examples/cumulative.c.in with `lpvmm kp
//! build`, with the -D flags [`PATCHES`] gives.

use std::path::PathBuf;
use std::time::Duration;

use lpvmm::proto::{OutcomeView, PatchStatusResult};
use lpvmm_tests::patchtest::{
    apply, build_lpvmm, checksum, checksums, cmdline, dispatched_history, ended, func_of,
    guest_report, held_by, kill, kp_build, patch_of, patch_path, sleeper, status, verb, Readers,
};
use lpvmm_tests::{
    check, host_files_or_exit, repo_root, run_group, series_trials, Guest, TestHost, TestResult,
};

/// Cumulative patches in the replace chain.
const CHAIN: u32 = 50;

/// Patches of the tests: name and the template's -D flags (NAME is added).
const PATCHES: &[(&str, &[&str])] = &[
    // Versions in load order.
    ("va", &["-DCMDLINE=\"version A\""]),
    ("vb", &["-DCMDLINE=\"version B\""]),
    ("vb-dep", &["-DCMDLINE=\"version B\"", "-DDEPENDS=\"va\""]),
    ("vother", &["-DVERSION=\"independent\""]),
    // Atomic replace.
    ("ra", &["-DCMDLINE=\"cumulative A\""]),
    ("rb", &["-DVERSION=\"cumulative B\""]),
    ("rc", &["-DCMDLINE=\"cumulative C\"", "-DREPLACE"]),
    // States.
    (
        "s2",
        &["-DCMDLINE=\"state 2\"", "-DSTATE_ID=1", "-DSTATE_VERSION=2"],
    ),
    (
        "s-lower",
        &[
            "-DCMDLINE=\"state 1\"",
            "-DSTATE_ID=1",
            "-DSTATE_VERSION=1",
            "-DREPLACE",
        ],
    ),
    ("s-drop", &["-DCMDLINE=\"no state\"", "-DREPLACE"]),
    (
        "s3",
        &[
            "-DCMDLINE=\"state 3\"",
            "-DSTATE_ID=1",
            "-DSTATE_VERSION=3",
            "-DREPLACE",
        ],
    ),
    // A replace under per-task consistency.
    ("pa", &["-DCMDLINE=\"per-task A\"", "-DNSLEEP"]),
    ("pb", &["-DVERSION=\"per-task B\""]),
    ("pc", &["-DCMDLINE=\"per-task C\"", "-DREPLACE"]),
];

fn version(g: &mut Guest) -> Result<String, String> {
    g.text("cat /proc/version")
}

/// `lpvmm patch VERB {vm} NAME`, which must be refused with `want` in its message.
fn refused(g: &mut Guest, cmd: &str, want: &str) -> TestResult {
    let (rc, out) = g.lpvmm(cmd)?;
    check!(
        rc != 0 && out.contains(want),
        "`{cmd}` should be refused with '{want}': rc {rc}: {out}"
    );
    eprintln!("refused as it should be: {}", out.trim());
    Ok(())
}

fn load(g: &mut Guest, name: &str) -> TestResult {
    let file = g.host.file(&patch_path(name));
    let (rc, out) = g.lpvmm(&format!("patch load {{vm}} {file}"))?;
    check!(rc == 0, "patch load {name}: {out}");
    Ok(())
}

/// The state of patch `name` in status, as the wire's word (`enabled`, `replaced`, ...).
fn state_of(s: &PatchStatusResult, name: &str) -> Result<String, String> {
    Ok(patch_of(s, name)?.state.to_string())
}

/// The versions of `func` in status, as `patch:state` in load order, with `*` on the
/// visible one.
fn versions(s: &PatchStatusResult, func: &str) -> Result<Vec<String>, String> {
    let f = func_of(s, func)?;
    Ok(f.versions
        .iter()
        .map(|v| {
            format!(
                "{}:{}{}",
                v.patch,
                v.state,
                if v.visible { "*" } else { "" }
            )
        })
        .collect())
}

/// Acceptance 1: versions in load order, dependencies, independent patches.
fn versions_in_load_order(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("cumver-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let original = cmdline(&mut g)?;
    let original_version = version(&mut g)?;
    load(&mut g, "va")?;
    load(&mut g, "vb")?;
    verb(&mut g, "enable", "vb")?;
    verb(&mut g, "enable", "va")?;
    check!(
        cmdline(&mut g)? == "version B",
        "{series}: enabling the older A hid the newer B"
    );
    let s = status(&mut g)?;
    let v = versions(&s, "cmdline_proc_show")?;
    check!(
        v == ["va:enabled", "vb:enabled*"] && func_of(&s, "cmdline_proc_show")?.visible == "vb",
        "{series}: versions {v:?}"
    );
    let (_, human) = g.lpvmm("patch status {vm}")?;
    eprintln!("{series}: two versions, B visible:\n{human}");
    check!(
        human.contains("[va, enabled] < lpvmm_cum_cmdline_proc_show [vb, enabled]*"),
        "{series}: status shows the versions in load order:\n{human}"
    );
    let text = checksum(&mut g, "text")?;
    verb(&mut g, "disable", "va")?;
    check!(
        cmdline(&mut g)? == "version B" && checksum(&mut g, "text")? == text,
        "{series}: disabling the hidden A changed something"
    );
    verb(&mut g, "disable", "vb")?;
    check!(
        cmdline(&mut g)? == original,
        "{series}: with neither enabled"
    );

    // A dependency holds the disable, naming the dependent.
    verb(&mut g, "unload", "vb")?;
    verb(&mut g, "enable", "va")?;
    apply(&mut g, "vb-dep")?;
    refused(
        &mut g,
        "patch disable {vm} va",
        "patch 'vb-dep' depends on 'va'",
    )?;
    let after = cmdline(&mut g)?;
    check!(
        after == "version B",
        "{series}: after the refusal /proc/cmdline says {after:?}"
    );
    verb(&mut g, "disable", "vb-dep")?;
    check!(cmdline(&mut g)? == "version A", "{series}: A below");

    // Independent patches disable in either order.
    apply(&mut g, "vother")?;
    check!(
        version(&mut g)? == "independent",
        "{series}: /proc/version patched"
    );
    verb(&mut g, "disable", "va")?;
    check!(
        cmdline(&mut g)? == original && version(&mut g)? == "independent",
        "{series}: A off first"
    );
    verb(&mut g, "disable", "vother")?;
    verb(&mut g, "enable", "va")?;
    verb(&mut g, "enable", "vother")?;
    verb(&mut g, "disable", "vother")?;
    check!(
        cmdline(&mut g)? == "version A" && version(&mut g)? == original_version,
        "{series}: the other off first"
    );
    verb(&mut g, "disable", "va")?;
    check!(cmdline(&mut g)? == original, "{series}: all off: cmdline");
    g.poweroff().map(|_| ())
}

/// Acceptance 2 and 4: atomic replace with a nop version; states.
fn atomic_replace_and_states(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("cumrep-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let original = cmdline(&mut g)?;
    let original_version = version(&mut g)?;
    let text_before = checksum(&mut g, "text")?;
    apply(&mut g, "ra")?;
    apply(&mut g, "rb")?;
    check!(
        cmdline(&mut g)? == "cumulative A" && version(&mut g)? == "cumulative B",
        "{series}: A and B"
    );
    apply(&mut g, "rc")?;
    check!(cmdline(&mut g)? == "cumulative C", "{series}: C's cmdline");
    check!(
        version(&mut g)? == original_version,
        "{series}: /proc/version should be the original after C (a nop version)"
    );
    let s = status(&mut g)?;
    for p in ["ra", "rb"] {
        check!(
            state_of(&s, p)? == "replaced" && patch_of(&s, p)?.replaced_by.as_deref() == Some("rc"),
            "{series}: {p}: {:?}",
            patch_of(&s, p)?
        );
    }
    let last = s.history.last();
    let moved: Vec<String> = last
        .iter()
        .flat_map(|t| &t.functions)
        .map(|c| format!("{}->{:?}", c.name, c.to))
        .collect();
    check!(
        last.is_some_and(|t| t.patch == "rc" && t.outcome == OutcomeView::Done) && moved.len() == 2,
        "{series}: one transition moves both functions: {last:?}"
    );
    let v = versions(&s, "version_proc_show")?;
    check!(
        v == ["rb:replaced"] && func_of(&s, "version_proc_show")?.visible == "original",
        "{series}: version_proc_show versions {v:?}"
    );
    let (_, human) = g.lpvmm("patch status {vm}")?;
    eprintln!("{series}: after the cumulative patch:\n{human}");
    for p in ["ra", "rb"] {
        refused(
            &mut g,
            &format!("patch enable {{vm}} {p}"),
            "was replaced by cumulative patch 'rc'",
        )?;
        verb(&mut g, "unload", p)?;
    }
    verb(&mut g, "disable", "rc")?;
    check!(
        cmdline(&mut g)? == original && version(&mut g)? == original_version,
        "{series}: disabling C restores the original text everywhere"
    );
    check!(
        checksum(&mut g, "text")? == text_before,
        "{series}: kernel text after disabling C differs from before A"
    );
    verb(&mut g, "unload", "rc")?;

    // States: a replace that lowers or drops a state is refused, changing nothing.
    apply(&mut g, "s2")?;
    let before = checksums(&mut g)?;
    for (p, want) in [
        ("s-lower", "would lower state 1 from version 2"),
        ("s-drop", "would drop state 1 (version 2)"),
    ] {
        let file = g.host.file(&patch_path(p));
        refused(&mut g, &format!("patch {{vm}} {file}"), want)?;
        check!(
            checksums(&mut g)? == before,
            "{series}: refused {p} changed kernel text or the patch area"
        );
        let s = status(&mut g)?;
        check!(
            patch_of(&s, p).is_err(),
            "{series}: refused {p} stays loaded"
        );
    }
    check!(cmdline(&mut g)? == "state 2", "{series}: s2 stays");
    let s = status(&mut g)?;
    check!(
        patch_of(&s, "s2")?
            .states
            .iter()
            .map(|x| (x.id, x.version))
            .eq([(1, 2)]),
        "{series}: s2 states: {:?}",
        patch_of(&s, "s2")?
    );
    // Raising it is fine.
    apply(&mut g, "s3")?;
    check!(cmdline(&mut g)? == "state 3", "{series}: s3");
    g.poweroff().map(|_| ())
}

/// Acceptance 3: a task asleep in a function of A holds C's transition for itself only;
/// reversing C brings A and B back.
fn replace_per_task_and_reverse(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("cumpt-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let original_version = version(&mut g)?;
    check!(
        original_version.starts_with("Linux version"),
        "{series}: /proc/version before the patches: {original_version:?}"
    );
    apply(&mut g, "pa")?;
    apply(&mut g, "pb")?;
    let (pid, _) = sleeper(&mut g, 1000, "hrtimer_nanosleep")?;
    let file = g.host.file(&patch_path("pc"));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file} --no-wait"))?;
    check!(rc == 0, "{series}: pc: {out}");
    let t = held_by(&mut g, pid)?;
    let reason = t.blockers.first().map_or("", |b| b.reason.as_str());
    check!(
        reason.contains("lpvmm_cum_common_nsleep [pa]"),
        "{series}: reason {reason}"
    );
    check!(
        cmdline(&mut g)? == "per-task C",
        "{series}: a new process during C's transition"
    );
    let (_, human) = g.lpvmm("patch status {vm}")?;
    eprintln!("{series}: cumulative pc held by a sleep in pa's code:\n{human}");
    let during = version(&mut g)?;
    check!(
        during == original_version,
        "{series}: a new process during C's transition runs C's nop for /proc/version, so \
         reads the kernel's own: {during:?}, want {original_version:?}"
    );
    let (rc, out) = g.lpvmm("patch reverse {vm}")?;
    check!(rc == 0, "{series}: reverse: {out}");
    let r = ended(&mut g, t.id)?;
    check!(r.outcome == OutcomeView::Reversed, "{series}: {r:?}");
    check!(
        cmdline(&mut g)? == "per-task A" && version(&mut g)? == "per-task B",
        "{series}: after the reverse, A and B are back"
    );
    let s = status(&mut g)?;
    check!(
        state_of(&s, "pa")? == "enabled" && state_of(&s, "pb")? == "enabled",
        "{series}: {:?}",
        s.patches
    );
    check!(
        patch_of(&s, "pc").is_err(),
        "{series}: a reversed load-and-enable unloads"
    );
    kill(&mut g, pid)?;
    g.poweroff().map(|_| ())
}

/// Acceptance 5: CHAIN cumulative patches in a row, each replacing the one before
/// (which is then unloaded), while four readers check every read and a sleep loop
/// holds most transitions: zero violations, and the patch area does not fill.
fn replace_chain(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("cumchain-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let readers = Readers::start(&mut g)?;
    let lp = g.host.lpvmm();
    let c1 = g.host.file(&patch_path("chain-1"));
    let dir = c1.trim_end_matches("chain-1.kp").to_string();
    let step = |g: &mut Guest, from: u32, to: u32| -> TestResult {
        let (rc, out) = g.host.exec_status(
            &format!(
                "i={from}; while [ $i -le {to} ]; do {lp} patch {name} {dir}chain-$i.kp --timeout 120 >/tmp/chain.out 2>&1 || break; \
                 if [ $i -gt 1 ]; then {lp} patch unload {name} chain-$((i-1)) >/dev/null || break; fi; \
                 i=$((i+1)); done; echo reached=$((i-1)); tail -5 /tmp/chain.out"
            ),
            Duration::from_secs(1800),
        )?;
        if rc != 0 || !out.contains(&format!("reached={to}")) {
            let why = g.vmm_stderr();
            let (_, st) = g.lpvmm("patch status {vm}")?;
            let guest = guest_report(g);
            return Err(format!(
                "{series}: the chain stopped: {out}\n{st}\n{why}\n{guest}"
            ));
        }
        Ok(())
    };
    let area_use = |s: &PatchStatusResult| -> Result<[u64; 3], String> {
        let a = s
            .area
            .as_ref()
            .ok_or_else(|| "status without its area".to_string())?;
        Ok([a.code_used, a.rodata_used, a.data_used])
    };
    // The space in use once one patch replaced another and the trampoline banks exist
    // (set up by the first transition that had to dispatch tasks).
    step(&mut g, 1, 2)?;
    // Where the kernel and the patch area lie in this boot, to place a guest RIP that
    // the test host's KVM trace (LPVMM_TEST_HOST_TRACE=1) reports for a death.
    let text = g.text("grep -w _stext /proc/kallsyms")?;
    let area = status(&mut g)?.area.map_or(0, |a| a.va);
    eprintln!("{series}: kernel {} ; patch area at {area:#x}", text.trim());
    let mut at = 2;
    let early = loop {
        let s = status(&mut g)?;
        let dispatched = s.history.iter().any(|t| t.ticks > 1);
        if dispatched {
            break area_use(&s)?;
        }
        check!(
            at < 10,
            "{series}: no transition of the first {at} dispatched a task: {:?}",
            s.history
        );
        at += 1;
        step(&mut g, at, at)?;
    };
    step(&mut g, at + 1, CHAIN)?;
    let log = readers
        .stop(&mut g, CHAIN)
        .map_err(|e| format!("{series}: {e}"))?;
    let s = status(&mut g)?;
    let loaded: Vec<&str> = s.patches.iter().map(|p| p.name.as_str()).collect();
    check!(
        loaded == [format!("chain-{CHAIN}")],
        "{series}: only the last patch stays loaded: {loaded:?}"
    );
    let late = area_use(&s)?;
    check!(
        late == early,
        "{series}: patch area use grew along the chain: {early:?} after {at}, {late:?} after {CHAIN}"
    );
    let (multi, of) = dispatched_history(&s).map_err(|e| format!("{series}: {e}"))?;
    eprintln!(
        "{series}: {CHAIN} cumulative patches in a row under 4 readers: {log}; area use \
         {late:?} bytes (code, rodata, data) after {at} and after {CHAIN}; of the last {of}, \
         {multi} needed more than one tick"
    );
    g.poweroff().map(|_| ())
}

/// Build every patch of the tests from the template.
fn build_patches() -> Result<Vec<(PathBuf, String)>, String> {
    let out = repo_root().join("target/lpvmm-test-patches/cumulative");
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    build_lpvmm()?;
    let template = repo_root().join("patcher/examples/cumulative.c.in");
    let mut files = Vec::new();
    let mut build = |name: &str, flags: Vec<String>| -> TestResult {
        let src = out.join(format!("{name}.c"));
        let kp = out.join(format!("{name}.kp"));
        std::fs::copy(&template, &src).map_err(|e| e.to_string())?;
        let mut all = vec![format!("-DNAME=\"{name}\"")];
        all.extend(flags);
        kp_build(&src, &kp, &all)?;
        files.push((kp, patch_path(name)));
        Ok(())
    };
    for (name, flags) in PATCHES {
        build(name, flags.iter().map(|f| f.to_string()).collect())?;
    }
    for n in 1..=CHAIN {
        build(
            &format!("chain-{n}"),
            vec![
                format!("-DCMDLINE=\"lpvmm cmdline gen {n}\""),
                format!("-DVERSION=\"lpvmm version gen {n}\""),
                "-DNSLEEP".into(),
                "-DREPLACE".into(),
            ],
        )?;
    }
    Ok(files)
}

fn main() {
    host_files_or_exit(build_patches());
    run_group(series_trials(&[
        ("versions_in_load_order", versions_in_load_order),
        ("atomic_replace_and_states", atomic_replace_and_states),
        ("replace_per_task_and_reverse", replace_per_task_and_reverse),
        ("replace_chain_50_under_readers", replace_chain),
    ]))
}
