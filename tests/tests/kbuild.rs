//! Patches written as kernel code (patcher/examples/kbuild/), built with each guest
//! kernel's own kbuild against Debian's headers for it (`lpvmm kp build --kernel`), on
//! real KVM (native or nested), both kernel series: what the guest prints, lpvmm's
//! unwinding through the new code with objtool's ORC table, refusals of what the guest
//! would have to know about, and the errors of `--kernel` itself. Patches built from
//! source diffs of real upstream fixes (`kp build --diff`) are in [`diff`].

#[path = "kbuild/diff.rs"]
mod diff;

use std::path::{Path, PathBuf};
use std::process::Command;

use lpvmm::proto::{OutcomeView, ShadowResult, StackResult, TransitionView};
use lpvmm_tests::patchtest::{
    self, build_lpvmm, checksum, checksums, ended, held_by, kill, parse, patch_path, sleeper,
    status, verb,
};
use lpvmm_tests::{
    check, host_files_or_exit, images_dir, local_trial, lpvmm_binary, new_splats, repo_root,
    run_group, series_trials, Guest, TestHost, TestResult, SERIES, SPLATS,
};

/// The samples built for each series; the `bad-` ones only compiled (lpvmm refuses them).
const SAMPLES: &[&str] = &[
    "loadavg",
    "current",
    "features",
    "nsleep",
    "spin",
    "getpid",
    "tun",
    "tunlate",
    "tunbroken",
    "tunsleep",
    "ethmtu",
    "callbacks",
    "tuncb",
    "states",
    "shadow",
    "shadowvars",
    "guest-module",
    "tracepoint",
];
/// Samples built a second time with a flag: (sample, built as, flag).
const VARIANTS: &[(&str, &str, &str)] = &[
    ("ethmtu", "ethmtu-vmlinux", "-DLPVMM_VMLINUX_ONLY"),
    (
        "callbacks",
        "callbacks-refused",
        "-DLPVMM_PRE_PATCH_RET=-19",
    ),
    ("tuncb", "tuncb-refused", "-DLPVMM_PRE_PATCH_RET=-19"),
    (
        "callbacks",
        "callbacks-slow",
        "-DLPVMM_PRE_PATCH_SLEEP_MS=13000",
    ),
    ("states", "states-2", "-DLPVMM_N=2"),
    ("states", "states-3", "-DLPVMM_N=3"),
    ("shadow", "shadow-2", "-DLPVMM_N=2"),
    ("callbacks", "callbacks-2", "-DLPVMM_N=2"),
    ("callbacks", "callbacks-3", "-DLPVMM_N=3 -DLPVMM_CUMULATIVE"),
    ("tuncb", "tuncb-busy", "-DLPVMM_BUSY"),
    ("callbacks", "callbacks-hang", "-DLPVMM_PRE_PATCH_HANG"),
    ("callbacks", "callbacks-oops", "-DLPVMM_PRE_PATCH_OOPS"),
];
/// tun's module file in the guest image (the path its module list gives it).
const TUN_KO: &str =
    "/lib/modules/$(uname -r)/$(grep -o '[^ ]*/tun[.]ko' /lib/modules/$(uname -r)/lpvmm-modules)";
/// Guest processes hammering the patched getpid, and the per-task disable/enable cycles
/// they go through (the 10,000-cycle run is `bench endurance`, docs/benchmarks.md).
/// After each transition the test waits until every process has called getpid once
/// more (about a second on the nested test host), and the hammer's load is what the
/// nested platform kills guests under most (docs/testing.md), so 5 cycles keep the test
/// near its old length of 20 unchecked ones.
const HAMMERS: u32 = 128;
const HAMMER_CYCLES: u32 = 5;
/// Where the hammer says what its children ran in each phase.
const HAMMER_FIFO: &str = "/tmp/hphase";
const BAD: &[&str] = &["bad-jump"];
/// The kernel's own samples/livepatch modules, taken from Debian's linux-source of each
/// guest's release (fetched once, never committed), built with `kp build --kernel`:
/// (file in samples/livepatch, built as).
const KLP_SAMPLES: &[(&str, &str)] = &[
    ("livepatch-sample.c", "klp-sample"),
    ("livepatch-callbacks-demo.c", "klp-callbacks-demo"),
    ("livepatch-shadow-fix1.c", "klp-shadow-fix1"),
    ("livepatch-shadow-fix2.c", "klp-shadow-fix2"),
];
/// The samples' target modules, built as ordinary modules of each release and put in
/// the guest as /root/klp/NAME.ko (an archive appended to its initrd).
const KLP_TARGETS: &[&str] = &[
    "livepatch-shadow-mod.c",
    "livepatch-callbacks-mod.c",
    "livepatch-callbacks-busymod.c",
];

/// The guest kernel release of `series` (what `uname -r` prints in it).
fn release(series: &str) -> Result<String, String> {
    let p = images_dir().join(format!("guest-{series}/release"));
    let r = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    let r = r.trim().to_string();
    check!(!r.is_empty(), "{} is empty", p.display());
    Ok(r)
}

fn sample(name: &str) -> PathBuf {
    repo_root().join(format!("patcher/examples/kbuild/{name}.c"))
}

fn kp(series: &str, name: &str) -> String {
    patch_path(&stem(series, name))
}

/// The stem of a sample built for `series`.
fn stem(series: &str, name: &str) -> String {
    format!("kbuild-{series}-{name}")
}

fn apply(g: &mut Guest, series: &str, name: &str) -> TestResult {
    patchtest::apply(g, &stem(series, name)).map(|_| ())
}

/// `lpvmm kp build SRC -o OUT --kernel RELEASE`, with `env` set; returns its exit code
/// and output.
fn kp_build(src: &Path, out: &Path, release: &str, env: &[(&str, &str)]) -> (i32, String) {
    kp_build_with(src, out, release, env, &[])
}

/// [`kp_build`] with `--cflag FLAG` for each of `flags`.
fn kp_build_with(
    src: &Path,
    out: &Path,
    release: &str,
    env: &[(&str, &str)],
    flags: &[&str],
) -> (i32, String) {
    let mut cmd = Command::new(lpvmm_binary());
    cmd.args(["kp", "build"])
        .arg(src)
        .arg("-o")
        .arg(out)
        .args(["--kernel", release]);
    for f in flags {
        cmd.arg(format!("--cflag={f}"));
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    exit_and_output(&mut cmd)
}

/// Run `cmd`: its exit code and its output (stdout, then stderr).
fn exit_and_output(cmd: &mut Command) -> (i32, String) {
    match cmd.output() {
        Ok(o) => (
            o.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (-1, format!("{cmd:?}: {e}")),
    }
}

/// The five fields of /proc/loadavg: three averages, `running/threads`, last pid.
fn loadavg_fields(line: &str) -> Result<(Vec<f64>, u32, u32, i64), String> {
    let f: Vec<&str> = line.split_whitespace().collect();
    check!(f.len() >= 5, "not /proc/loadavg: {line:?}");
    let avg: Vec<f64> = f[..3].iter().filter_map(|x| x.parse().ok()).collect();
    let (run, threads) = f[3].split_once('/').ok_or(format!("field 4 of {line:?}"))?;
    let run: u32 = run.parse().map_err(|_| format!("running in {line:?}"))?;
    let threads: u32 = threads
        .parse()
        .map_err(|_| format!("threads in {line:?}"))?;
    let pid: i64 = f[4].parse().map_err(|_| format!("last pid in {line:?}"))?;
    check!(avg.len() == 3, "averages in {line:?}");
    Ok((avg, run, threads, pid))
}

/// Acceptance 1: the kernel's own loadavg_proc_show, changed and rebuilt.
fn loadavg(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("kbload-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let text_before = checksum(&mut g, "text")?;
    let before = g.text("cat /proc/loadavg")?;
    let (_, _, threads0, pid0) = loadavg_fields(&before)?;
    apply(&mut g, series, "loadavg")?;
    let after = g.text("cat /proc/loadavg")?;
    check!(
        after.ends_with(" lpvmm") && after.split_whitespace().count() == 6,
        "{series}: patched /proc/loadavg: {after:?}"
    );
    let (_, run, threads, pid) = loadavg_fields(&after)?;
    check!(
        run >= 1 && threads.abs_diff(threads0) <= 20 && pid > pid0 && pid < pid0 + 200,
        "{series}: the patched numbers are not the real ones: {before:?} then {after:?}"
    );
    eprintln!("{series}: /proc/loadavg {before:?} -> {after:?}");
    verb(&mut g, "disable", "loadavg")?;
    let back = g.text("cat /proc/loadavg")?;
    check!(
        !back.contains("lpvmm") && loadavg_fields(&back).is_ok(),
        "{series}: after disable: {back:?}"
    );
    check!(
        checksum(&mut g, "text")? == text_before,
        "{series}: kernel text after disable differs from before"
    );
    verb(&mut g, "unload", "loadavg")?;
    g.poweroff().map(|_| ())
}

/// `tunblock` in the background, once the guest shows it asleep in tun's read; its pid.
fn tun_reader(g: &mut Guest) -> Result<i64, String> {
    let pid = g.spawn("tunblock >/tmp/tunblock.out 2>&1 &")?;
    let mut stack = String::new();
    for _ in 0..100 {
        stack = g.run(&format!("cat /proc/{pid}/stack 2>/dev/null; true"))?;
        if stack.contains("tun_do_read") {
            return Ok(pid);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Err(format!("tunblock {pid} never reached tun_do_read: {stack}"))
}

/// The `iff:` line tun prints for the tun file of `pid` (tunblock's, fd 3), read by
/// another process (`grep`).
fn tun_iff(g: &mut Guest, pid: i64) -> Result<String, String> {
    g.text(&format!("grep '^iff:' /proc/{pid}/fdinfo/3"))
}

/// Issue 25, acceptance 3 and the second half of 2: two functions of the tun module,
/// patched while tun is loaded (patcher/examples/kbuild/tun.c). A per-task enable is held
/// by the one task asleep in tun_do_read, alone, while every other task already runs
/// the new code: another process reading the sleeper's fdinfo gets the new line, which
/// names tun's own static tun_do_read (resolved in the module). Reverse returns tun to
/// its code; enabled again, the transition ends when the reader leaves, and a new
/// reader's read fails with the new code's EIO. Disabled: tun's text is byte-identical
/// to before, and tun behaves as before.
fn module_functions_patched(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("kbtun-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let tun_before = checksum(&mut g, "module:tun")?;
    let text_before = checksum(&mut g, "text")?;
    let reader = tun_reader(&mut g)?;
    let original = tun_iff(&mut g, reader)?;
    check!(
        original.starts_with("iff:\tlpvmm"),
        "{series}: tunblock's fdinfo before: {original:?}"
    );
    let file = g.host.file(&kp(series, "tun"));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file} --no-wait"))?;
    check!(rc == 0, "{series}: patch tun: {out}");
    let t = held_by(&mut g, reader)?;
    let reason = t.blockers.first().map_or("", |b| b.reason.as_str());
    check!(
        reason == "tun:tun_do_read is on its stack",
        "{series}: the reader's reason: {reason}"
    );
    let during = tun_iff(&mut g, reader)?;
    check!(
        during == "iff:\tlpvmm tun_do_read [tun]",
        "{series}: fdinfo read by a moved task during the transition: {during:?}"
    );
    // tun's sites dispatch per task, their ftrace records hidden from the guest's ftrace
    // as vmlinux's are.
    let s = status(&mut g)?;
    for f in ["tun:tun_do_read", "tun:tun_chr_show_fdinfo"] {
        let v = patchtest::func_of(&s, f)?;
        check!(
            v.site_now.to_string() == "trampoline" && v.ftrace_hidden,
            "{series}: {f} during the transition: {v:?}"
        );
    }
    let (rc, out) = g.lpvmm("patch reverse {vm}")?;
    check!(
        rc == 0 && out.contains("reversed"),
        "{series}: reverse: {out}"
    );
    check!(
        tun_iff(&mut g, reader)? == original,
        "{series}: fdinfo after reverse"
    );
    check!(
        checksum(&mut g, "module:tun")? == tun_before,
        "{series}: tun's text after reverse differs from before"
    );

    // Reversed, the patch it loaded for the enable is unloaded: patched again, held by
    // the reader until it leaves.
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file} --no-wait"))?;
    check!(rc == 0, "{series}: patch tun again: {out}");
    let t = held_by(&mut g, reader)?;
    kill(&mut g, reader)?;
    let done = ended(&mut g, t.id)?;
    check!(
        done.outcome == OutcomeView::Done,
        "{series}: outcome {done:?}"
    );
    let eio = g.text("tunblock; echo rc=$?")?;
    check!(
        eio.contains("tunblock: read: Input/output error") && eio.ends_with("rc=1"),
        "{series}: a new reader under the patched tun_do_read: {eio:?}"
    );

    verb(&mut g, "disable", "tun")?;
    check!(
        checksum(&mut g, "module:tun")? == tun_before && checksum(&mut g, "text")? == text_before,
        "{series}: tun's or the kernel's text after disable differs from before"
    );
    let reader = tun_reader(&mut g)?;
    check!(
        tun_iff(&mut g, reader)?.starts_with("iff:\tlpvmm"),
        "{series}: fdinfo after disable"
    );
    verb(&mut g, "unload", "tun")?;
    kill(&mut g, reader)?;
    g.poweroff().map(|_| ())
}

/// Whether module `name` is in the guest's /proc/modules.
fn loaded(g: &mut Guest, name: &str) -> Result<bool, String> {
    Ok(g.run(&format!("grep -c '^{name} ' /proc/modules || true"))?
        .trim()
        .ends_with('1'))
}

/// `insmod` tun; its exit status and what it said.
fn insmod_tun(g: &mut Guest) -> Result<(i32, String), String> {
    let out = g.text(&format!("insmod {TUN_KO} 2>&1; echo rc=$?"))?;
    let rc = out
        .rsplit_once("rc=")
        .and_then(|(_, r)| r.trim().parse().ok())
        .ok_or_else(|| format!("insmod tun: {out:?}"))?;
    Ok((rc, out))
}

/// The state of patch `patch`'s part for module `module` in `patch status`.
fn object_state(g: &mut Guest, patch: &str, module: &str) -> Result<String, String> {
    let s = status(g)?;
    let p = patchtest::patch_of(&s, patch)?;
    p.objects
        .iter()
        .find(|o| o.name == module)
        .map(|o| o.state.clone())
        .ok_or_else(|| format!("{patch} has no object {module}: {:?}", p.objects))
}

/// Issue 25, acceptance 4 and 6: patches for a module the guest has not loaded
/// (patcher/examples/kbuild/tunlate.c and tunbroken.c). Loaded while tun is unloaded,
/// the patch says its tun part waits; when the guest loads tun, tun's own init already
/// runs the new tun_device_event (its kernel log says "lpvmm: tun sees lo"), and
/// tun's fdinfo names tun's static tun_do_read, a symbol pending until then. Unloaded
/// and loaded again: patched again. Disabled while tun is unloaded, loaded again:
/// tun's own code. A part that cannot be linked (a symbol tun lacks) makes insmod
/// fail, with lpvmm's line in the kernel log, and changes nothing else.
fn module_loaded_later(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("kblate-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    g.run("rmmod tun")?;
    check!(
        !loaded(&mut g, "tun")?,
        "{series}: tun still loaded after rmmod"
    );
    apply(&mut g, series, "tunlate")?;
    check!(
        object_state(&mut g, "tunlate", "tun")? == "waiting",
        "{series}: tunlate's tun part should wait while tun is not loaded"
    );
    let (_, human) = g.lpvmm("patch status {vm}")?;
    eprintln!("{series}: lpvmm patch status, tun not loaded:\n{human}");
    let sees = "dmesg | grep -c 'lpvmm: tun sees lo' || true";
    for round in 1..=2 {
        let (rc, out) = insmod_tun(&mut g)?;
        check!(rc == 0, "{series}: insmod tun (round {round}): {out}");
        let n = g.text(sees)?;
        check!(
            n == round.to_string(),
            "{series}: round {round}: tun's init should have run the new tun_device_event \
             once per load: {n} lines\n{}",
            g.run("dmesg | tail -20")?
        );
        check!(
            object_state(&mut g, "tunlate", "tun")? == "loaded",
            "{series}: tun part after insmod"
        );
        let reader = tun_reader(&mut g)?;
        let iff = tun_iff(&mut g, reader)?;
        check!(
            iff == "iff:\tlpvmm tun_do_read [tun]",
            "{series}: round {round}: fdinfo of a tun file: {iff:?}"
        );
        kill(&mut g, reader)?;
        g.run("rmmod tun")?;
        check!(
            object_state(&mut g, "tunlate", "tun")? == "waiting",
            "{series}: tun part after rmmod"
        );
    }
    // Disabled while tun is unloaded: tun loads as it is.
    verb(&mut g, "disable", "tunlate")?;
    let (rc, out) = insmod_tun(&mut g)?;
    check!(rc == 0, "{series}: insmod tun after disable: {out}");
    check!(
        g.text(sees)? == "2",
        "{series}: tun's init ran the new code after disable"
    );
    let reader = tun_reader(&mut g)?;
    let iff = tun_iff(&mut g, reader)?;
    check!(
        iff.starts_with("iff:\tlpvmm0"),
        "{series}: fdinfo after disable: {iff:?}"
    );
    kill(&mut g, reader)?;
    verb(&mut g, "unload", "tunlate")?;

    // A part that cannot link refuses tun's load, and only that.
    g.run("rmmod tun")?;
    apply(&mut g, series, "tunbroken")?;
    let (rc, out) = insmod_tun(&mut g)?;
    check!(
        rc != 0,
        "{series}: insmod tun under tunbroken should fail: {out}"
    );
    // (g.run: the lines are the kernel's, which g.text leaves out.)
    let log = g.run("dmesg | grep 'lpvmm: refusing module tun' || true")?;
    check!(
        log.contains("refusing module tun: patch tunbroken:")
            && log.contains("unknown symbol 'lpvmm_no_such_symbol'"),
        "{series}: the guest's log should say why tun was refused: {log:?}"
    );
    check!(
        !loaded(&mut g, "tun")?,
        "{series}: tun loaded although refused"
    );
    let s = status(&mut g)?;
    let e = s.module_events.last().ok_or("no module event")?;
    check!(
        e.module == "tun" && e.action == "coming" && e.refused,
        "{series}: the last module event: {e:?}"
    );
    let (_, human) = g.lpvmm("patch status {vm}")?;
    eprintln!("{series}: lpvmm patch status after the refusal:\n{human}");
    verb(&mut g, "disable", "tunbroken")?;
    verb(&mut g, "unload", "tunbroken")?;
    let (rc, out) = insmod_tun(&mut g)?;
    check!(rc == 0, "{series}: insmod tun with no patch for it: {out}");
    g.poweroff().map(|_| ())
}

/// Issue 25, acceptance 6 (second half): a module goes away while a transition that
/// involves it runs (patcher/examples/kbuild/tunsleep.c: common_nsleep, where a `sleep`
/// holds the per-task transition, and a tun function). `rmmod tun` waits in lpvmm's
/// module notifier, where lpvmm's unwinder names its frame and finds its stack
/// reliable, so it does not hold the transition; once the sleeper leaves and the
/// transition ends, tun's part is let go and rmmod completes: tun is gone, the patch's
/// tun part waits, its vmlinux part is enabled.
fn module_going_during_a_transition(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("kbgoing-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let (sleeper, _) = sleeper(&mut g, 1000, "common_nsleep")?;
    let file = g.host.file(&kp(series, "tunsleep"));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file} --no-wait"))?;
    check!(rc == 0, "{series}: patch tunsleep: {out}");
    let t = held_by(&mut g, sleeper)?;
    let rmmod = g.spawn("rmmod tun &")?;
    let (waiting, waits) = patchtest::guest_stack_naming(&mut g, rmmod, "msleep")?;
    check!(
        waiting && loaded(&mut g, "tun")?,
        "{series}: rmmod should wait in lpvmm's notifier during the transition: {waits}"
    );
    let (rc, stack) = g.lpvmm(&format!("stack {{vm}} {rmmod}"))?;
    check!(
        rc == 0 && stack.contains("lpvmm_module_notifier+") && !stack.contains("UNRELIABLE"),
        "{series}: lpvmm's view of the waiting rmmod:\n{stack}"
    );
    eprintln!("{series}: rmmod waiting in lpvmm's module notifier, as lpvmm sees it:\n{stack}");
    held_by(&mut g, sleeper)?;
    kill(&mut g, sleeper)?;
    let done = ended(&mut g, t.id)?;
    check!(
        done.outcome == OutcomeView::Done,
        "{series}: outcome {done:?}"
    );
    g.run(&format!("wait {rmmod}; true"))?;
    check!(
        !loaded(&mut g, "tun")?,
        "{series}: tun still loaded after rmmod returned"
    );
    check!(
        object_state(&mut g, "tunsleep", "tun")? == "waiting",
        "{series}: tunsleep's tun part after tun went"
    );
    let s = status(&mut g)?;
    let e = s.module_events.last().ok_or("no module event")?;
    check!(
        e.module == "tun" && e.action == "going" && !e.refused,
        "{series}: the last module event: {e:?}"
    );
    verb(&mut g, "disable", "tunsleep")?;
    verb(&mut g, "unload", "tunsleep")?;
    g.poweroff().map(|_| ())
}

/// `insmod` dummy; then dummy0's MTU.
fn insmod_dummy(g: &mut Guest) -> Result<String, String> {
    let ko = "/lib/modules/$(uname -r)/$(grep -o '[^ ]*/dummy[.]ko' /lib/modules/$(uname -r)/lpvmm-modules)";
    g.run(&format!("insmod {ko}"))?;
    g.text("cat /sys/class/net/dummy0/mtu")
}

/// Issue 25, acceptance 5, the seeds' dependency case (patcher/examples/kbuild/ethmtu.c):
/// one patch changes vmlinux's ether_setup to take the MTU from its caller, and
/// dummy's dummy_setup to call it so. Loaded while dummy is not, then the guest loads
/// dummy: its init already runs the new dummy_setup, which calls the new ether_setup
/// correctly (dummy0's MTU is 1400). The negative control, the same vmlinux change
/// without the module part (two patches where the rule says one), lets dummy's own
/// dummy_setup call the new ether_setup the old way: dummy0's MTU is whatever was in
/// the register, not 1400.
fn dependency_in_one_patch(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("kbdep-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    check!(
        g.text("cat /sys/class/net/dummy0/mtu")? == "1500",
        "{series}: dummy0 before"
    );
    g.run("rmmod dummy")?;
    apply(&mut g, series, "ethmtu")?;
    check!(
        object_state(&mut g, "ethmtu", "dummy")? == "waiting",
        "{series}: ethmtu's dummy part should wait"
    );
    let mtu = insmod_dummy(&mut g)?;
    check!(
        mtu == "1400",
        "{series}: dummy's init should have called the new ether_setup the new way: MTU \
         {mtu}\n{}",
        g.run("dmesg | grep 'lpvmm: ether_setup' | tail -5")?
    );
    g.run("rmmod dummy")?;
    verb(&mut g, "disable", "ethmtu")?;
    verb(&mut g, "unload", "ethmtu")?;

    // The negative control: the vmlinux part alone.
    apply(&mut g, series, "ethmtu-vmlinux")?;
    let mtu = insmod_dummy(&mut g)?;
    let said = g.run("dmesg | grep 'lpvmm: ether_setup' | tail -1")?;
    check!(
        mtu != "1400" && said.contains("lpvmm: ether_setup with mtu "),
        "{series}: without its module part, dummy's own dummy_setup should call the new \
         ether_setup the old way (a wrong MTU): MTU {mtu}, {said}"
    );
    eprintln!(
        "{series}: the negative control: dummy0's MTU is {mtu} ({})",
        said.trim()
    );
    g.run("rmmod dummy")?;
    verb(&mut g, "disable", "ethmtu")?;
    verb(&mut g, "unload", "ethmtu")?;
    check!(
        insmod_dummy(&mut g)? == "1500",
        "{series}: dummy0 after both patches went"
    );
    g.poweroff().map(|_| ())
}

/// The lines the callbacks sample wrote to the guest's kernel log, in order (`what ran
/// in COMM`).
fn callback_lines(g: &mut Guest) -> Result<Vec<String>, String> {
    log_lines(g, "lpvmm-callbacks: ", false)
}

/// The rest of each line of the guest's kernel log that contains `prefix`, in order;
/// with `clear`, the log is cleared (the next look sees only newer lines).
fn log_lines(g: &mut Guest, prefix: &str, clear: bool) -> Result<Vec<String>, String> {
    let dmesg = if clear { "dmesg -c" } else { "dmesg" };
    Ok(g.run(&format!("{dmesg} | grep -- '{prefix}' || true"))?
        .lines()
        .filter_map(|l| l.split_once(prefix).map(|(_, r)| r.trim().to_string()))
        .collect())
}

/// Issue 27, callbacks (patcher/examples/kbuild/callbacks.c): enabling runs pre_patch,
/// then the transition, then post_patch; disabling pre_unpatch, the transition,
/// post_unpatch; each in a kworker of the guest (its log names the task), where it may
/// sleep. A pre_patch that returns -19 refuses the enable: `lpvmm patch` says so,
/// nothing is written (kernel text as before, /proc/cmdline the guest's own), the patch
/// loaded for it is gone, and no post_unpatch runs for the object whose pre_patch
/// failed.
fn callbacks_around_transitions(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("kbcb-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let text_before = checksum(&mut g, "text")?;
    let original = g.text("cat /proc/cmdline")?;
    let out = patchtest::apply(&mut g, &stem(series, "callbacks"))?;
    check!(
        out.contains("callback pre_patch lpvmm_cb_pre_patch (vmlinux): returned 0")
            && out.contains("callback post_patch lpvmm_cb_post_patch (vmlinux): returned 0"),
        "{series}: lpvmm patch should report the callbacks: {out}"
    );
    eprintln!("{series}: lpvmm patch callbacks.kp:\n{out}");
    check!(
        g.text("cat /proc/cmdline")? == "lpvmm callbacks",
        "{series}: the patch is not in effect"
    );
    verb(&mut g, "disable", "callbacks")?;
    let lines = callback_lines(&mut g)?;
    let order: Vec<&str> = lines.iter().filter_map(|l| l.split(' ').next()).collect();
    check!(
        order == ["pre_patch", "post_patch", "pre_unpatch", "post_unpatch"],
        "{series}: the callbacks' order in the guest's log: {lines:?}"
    );
    check!(
        lines.iter().all(|l| l.contains("ran in kworker/")),
        "{series}: callbacks should run in kworkers: {lines:?}"
    );
    eprintln!("{series}: the guest's log of the callbacks: {lines:?}");
    verb(&mut g, "unload", "callbacks")?;
    check!(
        checksum(&mut g, "text")? == text_before,
        "{series}: text after disable"
    );

    // A refusing pre_patch.
    let file = g.host.file(&kp(series, "callbacks-refused"));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file}"))?;
    check!(
        rc != 0
            && out.contains("the pre-patch callback lpvmm_cb_pre_patch of vmlinux returned -19"),
        "{series}: a pre_patch returning -19 should refuse the enable: {out}"
    );
    eprintln!("{series}: lpvmm patch callbacks-refused.kp:\n{out}");
    let lines = callback_lines(&mut g)?;
    check!(
        lines.len() == 5 && lines[4].starts_with("pre_patch"),
        "{series}: after the refusal only its pre_patch should have run: {lines:?}"
    );
    check!(
        checksum(&mut g, "text")? == text_before && g.text("cat /proc/cmdline")? == original,
        "{series}: a refused enable changed the guest"
    );
    let s = status(&mut g)?;
    check!(
        s.patches.is_empty(),
        "{series}: the patch loaded for the refused enable is still loaded: {:?}",
        s.patches
    );
    slow_callback(&mut g, series)?;
    several_patches_callbacks(&mut g, series)?;
    g.poweroff().map(|_| ())
}

/// Issue 27, acceptance 4: a pre_patch that hangs (callbacks-hang waits for the hostname
/// lpvmm-release) is given up on at the transition's timeout, reported with its
/// kworker's stack; nothing was written; its patch stays loaded (unload refused, naming
/// the kworker) while callbacks of another patch run; once released it returns and the
/// patch unloads. A pre_patch that oopses (callbacks-oops) is given up on at once: lpvmm
/// reports the guest's new taint `D`, as /proc/sys/kernel/tainted has it, the enable is
/// refused with nothing written, the patch is gone, and callbacks run again after it.
fn callbacks_that_hang_or_oops(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("kblost-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let text_before = checksum(&mut g, "text")?;
    let original = g.text("cat /proc/cmdline")?;
    let file = g.host.file(&kp(series, "callbacks-hang"));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file} --timeout 3"))?;
    check!(
        rc != 0
            && out.contains(
                "the pre_patch callback lpvmm_cb_pre_patch of vmlinux did not return within"
            )
            && out.contains("msleep")
            && out.contains("lpvmm_cb_pre_patch+")
            && out.contains("lpvmm_guest_call+")
            && out.contains("not enabled; the patch stays loaded until the callback returns"),
        "{series}: a hung pre_patch: {out}"
    );
    eprintln!("{series}: lpvmm patch callbacks-hang.kp --timeout 3:\n{out}");
    check!(
        checksum(&mut g, "text")? == text_before && g.text("cat /proc/cmdline")? == original,
        "{series}: a hung pre_patch changed the guest"
    );
    let (rc, out) = g.lpvmm("patch unload {vm} callbacks")?;
    check!(
        rc != 0 && out.contains("is still running in the guest's kworker"),
        "{series}: unload while its callback hangs: {out}"
    );
    several_callbacks_run(&mut g, series)?;
    let host_name = g.text("hostname")?;
    g.run("hostname lpvmm-release; sleep 1")?;
    g.run(&format!("hostname {host_name}"))?;
    verb(&mut g, "unload", "callbacks")?;
    let released = callback_lines_since(&mut g)?;
    check!(
        released.contains(&"pre_patch callbacks".to_string()),
        "{series}: the released pre_patch's line: {released:?}"
    );

    let file = g.host.file(&kp(series, "callbacks-oops"));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file}"))?;
    let guest_taint: u64 = g
        .text("cat /proc/sys/kernel/tainted")?
        .parse()
        .map_err(|e| format!("{e}"))?;
    check!(
        rc != 0
            && out.contains(
                "the pre_patch callback lpvmm_cb_pre_patch of vmlinux died in an oops in its \
                 kworker (the guest's kernel is now tainted D"
            )
            && guest_taint & (1 << 7) != 0,
        "{series}: an oopsing pre_patch (guest taint {guest_taint:#x}): {out}"
    );
    eprintln!("{series}: lpvmm patch callbacks-oops.kp (guest taint {guest_taint:#x}):\n{out}");
    let oops = g.run("dmesg | grep -c -E 'BUG: kernel NULL pointer dereference|Oops' || true")?;
    check!(oops.trim() != "0", "{series}: no oops in the guest's log");
    check!(
        checksum(&mut g, "text")? == text_before && status(&mut g)?.patches.is_empty(),
        "{series}: after the oops, kernel text or the patch list"
    );
    several_callbacks_run(&mut g, series)?;
    g.poweroff().map(|_| ())
}

/// Callbacks still run in the guest: callbacks-2 enabled and disabled, each of its four
/// callbacks returning 0.
fn several_callbacks_run(g: &mut Guest, series: &str) -> TestResult {
    callback_lines_since(g)?;
    patchtest::apply(g, &stem(series, "callbacks-2"))?;
    verb(g, "disable", "callbacks-2")?;
    verb(g, "unload", "callbacks-2")?;
    let lines = callback_lines_since(g)?;
    check!(
        lines
            == [
                "pre_patch callbacks-2",
                "post_patch callbacks-2",
                "pre_unpatch callbacks-2",
                "post_unpatch callbacks-2"
            ],
        "{series}: callbacks-2's callbacks: {lines:?}"
    );
    Ok(())
}

/// The lines the kernel's livepatch-callbacks-demo wrote to the guest's log since the
/// last look (its pr_fmt prefix left out); dmesg is cleared.
fn klp_demo_lines(g: &mut Guest) -> Result<Vec<String>, String> {
    log_lines(g, "livepatch_callbacks_demo: ", true)
}

/// Issue 28, the kernel's samples/livepatch (Debian's source of the guest's release,
/// built with `kp build --kernel` into real .ko files), applied by lpvmm with the guest
/// never loading a livepatch module: livepatch-sample's /proc/cmdline says "this has
/// been live patched" and the patch is named livepatch_sample; nothing of it is in
/// /proc/modules; the guest's taint has K, as after insmod of a livepatch; disabled,
/// the guest's own text is back. livepatch-callbacks-demo's
/// vmlinux callbacks log what the sample documents (`pre_patch_callback: vmlinux`, ...,
/// each given its `struct klp_object`), its two target modules wait; with
/// `pre_patch_ret=-19` (a module parameter, as insmod takes it) the enable is refused
/// after its pre_patch alone; an unknown parameter is refused naming the module's;
/// lpvmm's klp-percpu.ko (per-CPU data) is refused naming `.data..percpu` and the
/// function that needs it, kernel text and patch area unchanged.
/// The guest knows livepatch module `name`, applied by lpvmm, only as the module of
/// lpvmm's making (`lpvmm:NAME` in /proc/modules, used by `lpvmm`, tainted `K`), and
/// never loaded it: nothing in /sys/kernel/livepatch, no /sys/module/NAME.
fn known_only_as_lpvmms(g: &mut Guest, series: &str, name: &str) -> TestResult {
    let seen = g.run(&format!(
        "grep '^lpvmm:{name} ' /proc/modules; ls -A /sys/kernel/livepatch; \
         ls -d /sys/module/{name} 2>/dev/null; true"
    ))?;
    let lines: Vec<&str> = seen.lines().filter(|l| !l.trim().is_empty()).collect();
    check!(
        lines.len() == 1
            && lines[0].contains(" 1 lpvmm, Live ")
            && lines[0].trim_end().ends_with("(K)"),
        "{series}: the guest's view of {name}: {seen}"
    );
    Ok(())
}

fn livepatch_modules_from_outside(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("kbklp-{}", series.replace('.', "_"));
    let mut g = boot_with_klp_targets(host, &name, series)?;
    let text_before = checksum(&mut g, "text")?;
    let original = g.text("cat /proc/cmdline")?;
    // Described as this guest would get it, loading nothing.
    let file = g.host.file(&kp(series, "klp-sample"));
    let (rc, out) = g.lpvmm(&format!("kp inspect --vm {{vm}} {file}"))?;
    check!(
        rc == 0
            && out.contains("patch:     livepatch_sample")
            && out.contains("replaces:  cmdline_proc_show with livepatch_cmdline_proc_show")
            && status(&mut g)?.patches.is_empty(),
        "{series}: kp inspect --vm of livepatch-sample: {out}"
    );
    let out = patchtest::apply(&mut g, &stem(series, "klp-sample"))?;
    check!(
        out.contains("loaded 'livepatch_sample'")
            && g.text("cat /proc/cmdline")? == "this has been live patched",
        "{series}: livepatch-sample: {out}"
    );
    known_only_as_lpvmms(&mut g, series, "livepatch_sample")?;
    // Tainted K, as loading a livepatch module taints the kernel.
    let taint: u64 = g
        .text("cat /proc/sys/kernel/tainted")?
        .parse()
        .map_err(|e| format!("{e}"))?;
    check!(
        taint & (1 << 15) != 0,
        "{series}: the guest's taint {taint:#x} lacks K (TAINT_LIVEPATCH)"
    );
    verb(&mut g, "disable", "livepatch_sample")?;
    verb(&mut g, "unload", "livepatch_sample")?;
    check!(
        g.text("cat /proc/cmdline")? == original && checksum(&mut g, "text")? == text_before,
        "{series}: after livepatch-sample's disable"
    );
    // The same module as klp-convert or kpatch-build would give it: its seq_printf
    // through a `.klp.sym.vmlinux.seq_printf,0` symbol and a `.klp.rela.vmlinux..text`
    // section.
    let out = patchtest::apply(&mut g, &stem(series, "klp-sample-klp-rela"))?;
    check!(
        g.text("cat /proc/cmdline")? == "this has been live patched",
        "{series}: livepatch-sample with livepatch relocations: {out}"
    );
    verb(&mut g, "disable", "livepatch_sample")?;
    verb(&mut g, "unload", "livepatch_sample")?;

    klp_callbacks_demo(&mut g, series)?;
    klp_busy_target(&mut g, series)?;
    let file = g.host.file(&kp(series, "klp-callbacks-demo"));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file} pre_patch_ret=-19"))?;
    let refused = klp_demo_lines(&mut g)?;
    check!(
        rc != 0
            && out.contains("the pre-patch callback pre_patch_callback of vmlinux returned -19")
            && refused == ["pre_patch_callback: vmlinux"],
        "{series}: pre_patch_ret=-19: {out} {refused:?}"
    );
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file} frobnicate=1"))?;
    check!(
        rc != 0 && out.contains("the module has no parameter 'frobnicate' (it has: pre_patch_ret)"),
        "{series}: an unknown parameter: {out}"
    );
    let area_before = checksum(&mut g, "patch-area")?;
    let percpu = g.host.file(&kp(series, "klp-percpu"));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {percpu}"))?;
    check!(
        rc != 0 && out.contains("section .data..percpu (needed by klp_percpu_cmdline_proc_show)"),
        "{series}: a livepatch module with per-CPU data: {out}"
    );
    check!(
        status(&mut g)?.patches.is_empty()
            && checksum(&mut g, "text")? == text_before
            && checksum(&mut g, "patch-area")? == area_before,
        "{series}: refused loads left a patch or changed the text or the patch area"
    );
    g.poweroff().map(|_| ())
}

const COMING: &str = "[MODULE_STATE_COMING] Full formed, running module_init";
const GOING: &str = "[MODULE_STATE_GOING] Going away";
const LIVE: &str = "[MODULE_STATE_LIVE] Normal state";

/// livepatch-callbacks-demo with its target livepatch-callbacks-mod loaded after it
/// (the kernel's test-callbacks.sh "module_coming and module_going notifiers"): the
/// vmlinux object's pre_patch and post_patch at the enable, the module's in insmod
/// (COMING, its `klp_object.mod` the guest's module) and pre_unpatch and post_unpatch in
/// rmmod (GOING), then vmlinux's at the disable; the targets wait meanwhile.
fn klp_callbacks_demo(g: &mut Guest, series: &str) -> TestResult {
    klp_demo_lines(g)?;
    patchtest::apply(g, &stem(series, "klp-callbacks-demo"))?;
    let waiting = [
        object_state(g, "livepatch_callbacks_demo", "livepatch_callbacks_mod")?,
        object_state(g, "livepatch_callbacks_demo", "livepatch_callbacks_busymod")?,
    ];
    g.run("insmod /root/klp/livepatch_callbacks_mod.ko && rmmod livepatch_callbacks_mod")?;
    verb(g, "disable", "livepatch_callbacks_demo")?;
    verb(g, "unload", "livepatch_callbacks_demo")?;
    let lines = klp_demo_lines(g)?;
    let m = "livepatch_callbacks_mod";
    let want = [
        "pre_patch_callback: vmlinux".to_string(),
        "post_patch_callback: vmlinux".into(),
        format!("pre_patch_callback: {m} -> {COMING}"),
        format!("post_patch_callback: {m} -> {COMING}"),
        format!("pre_unpatch_callback: {m} -> {GOING}"),
        format!("post_unpatch_callback: {m} -> {GOING}"),
        "pre_unpatch_callback: vmlinux".into(),
        "post_unpatch_callback: vmlinux".into(),
    ];
    check!(
        lines == want && waiting == ["waiting", "waiting"],
        "{series}: livepatch-callbacks-demo: {lines:#?}, its modules {waiting:?}"
    );
    eprintln!("{series}: livepatch-callbacks-demo's log: {lines:#?}");
    Ok(())
}

/// livepatch-callbacks-demo enabled while livepatch-callbacks-busymod's work function
/// (which the demo replaces) sleeps 6 s in a kworker (`sleep_secs=6`, the sample's
/// busy target): pre_patch runs for vmlinux and busymod (LIVE), the transition waits for
/// the sleeper, then post_patch runs for both. Then test-callbacks.sh's "multiple target
/// modules": livepatch-callbacks-mod loaded and unloaded (its callbacks in insmod and
/// rmmod), and the disable's callbacks for vmlinux and busymod.
fn klp_busy_target(g: &mut Guest, series: &str) -> TestResult {
    g.run("insmod /root/klp/livepatch_callbacks_busymod.ko sleep_secs=6; sleep 1")?;
    klp_demo_lines(g)?;
    let file = g.host.file(&kp(series, "klp-callbacks-demo"));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file}"))?;
    check!(rc == 0, "{series}: the demo over a busy target: {out}");
    let busy = g.run("dmesg | grep -c 'busymod_work_func exit' || true")?;
    let lines = klp_demo_lines(g)?;
    let b = "livepatch_callbacks_busymod";
    let want = [
        "pre_patch_callback: vmlinux".to_string(),
        format!("pre_patch_callback: {b} -> {LIVE}"),
        "post_patch_callback: vmlinux".into(),
        format!("post_patch_callback: {b} -> {LIVE}"),
    ];
    check!(
        lines == want && busy.trim() == "1",
        "{series}: the demo over a busy target: {lines:#?}; {out}"
    );
    eprintln!("{series}: over a busy target:\n{out}");
    g.run("insmod /root/klp/livepatch_callbacks_mod.ko && rmmod livepatch_callbacks_mod")?;
    verb(g, "disable", "livepatch_callbacks_demo")?;
    verb(g, "unload", "livepatch_callbacks_demo")?;
    let lines = klp_demo_lines(g)?;
    let m = "livepatch_callbacks_mod";
    let want = [
        format!("pre_patch_callback: {m} -> {COMING}"),
        format!("post_patch_callback: {m} -> {COMING}"),
        format!("pre_unpatch_callback: {m} -> {GOING}"),
        format!("post_unpatch_callback: {m} -> {GOING}"),
        "pre_unpatch_callback: vmlinux".into(),
        format!("pre_unpatch_callback: {b} -> {LIVE}"),
        "post_unpatch_callback: vmlinux".into(),
        format!("post_unpatch_callback: {b} -> {LIVE}"),
    ];
    check!(
        lines == want,
        "{series}: multiple target modules: {lines:#?}"
    );
    g.run("rmmod livepatch_callbacks_busymod").map(|_| ())
}

/// How many lines of the guest's log contain `what`.
fn log_count(g: &mut Guest, what: &str) -> Result<usize, String> {
    let n = g.text(&format!("dmesg | grep -c -- '{what}' || true"))?;
    n.parse().map_err(|e| format!("{what}: {n:?}: {e}"))
}

/// Wait up to `secs` seconds until the guest's log has a line with each of `what` (the
/// checks that follow say what is missing).
fn wait_for_log(g: &mut Guest, what: &[&str], secs: u32) -> TestResult {
    for _ in 0..secs {
        let mut all = true;
        for w in what {
            all &= log_count(g, w)? >= 1;
        }
        if all {
            break;
        }
        g.run("sleep 1")?;
    }
    Ok(())
}

/// The shadow variables of id `id`: how many, and who allocated them.
fn shadow_group(g: &mut Guest, id: u64) -> Result<(u64, Vec<String>), String> {
    let v = shadow_vars(g)?;
    Ok(v.groups
        .iter()
        .find(|gr| gr.id == id)
        .map_or((0, Vec::new()), |gr| (gr.count, gr.owners.clone())))
}

/// Issue 28, the kernel's shadow-variable samples as livepatch-shadow-mod.c's "Usage"
/// documents them, with lpvmm in place of insmod: the buggy target module (loaded in
/// the guest) leaks; livepatch-shadow-fix1 (applied from outside) records each new
/// dummy's leak in shadow variable 1 and frees it with the dummy ("prevented leak" in
/// the guest's log; dummies from before it "leaked!"); fix2 on top of it adds a check
/// counter in shadow variable 2 (an expiring dummy's "check counter = N" line). `lpvmm shadow` sees both,
/// owned by each fix. Disabling fix2 runs its exit, which frees every variable 2;
/// disabling fix1 runs its exit, which frees the rest, each with its destructor: no
/// shadow variable is left. The guest never loaded fix1 or fix2 as modules.
fn livepatch_shadow_samples(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("kbklpsh-{}", series.replace('.', "_"));
    let mut g = boot_with_klp_targets(host, &name, series)?;
    g.run("insmod /root/klp/livepatch_shadow_mod.ko; sleep 2")?;
    patchtest::apply(&mut g, &stem(series, "klp-shadow-fix1"))?;
    // The module frees a dummy 12 s after making it, in a cleanup every 3 s (the
    // sample's EXPIRE_PERIOD and CLEANUP_PERIOD): the first dummy fix1 made is freed
    // 12 to 15 s after fix1 (a fixed 14 s wait was short now and then).
    let prevented = "livepatch_fix1_dummy_leak_dtor: dummy @";
    wait_for_log(
        &mut g,
        &[prevented, "livepatch_fix1_dummy_free: dummy @"],
        40,
    )?;
    let (n1, owners1) = shadow_group(&mut g, 1)?;
    check!(
        log_count(&mut g, prevented)? >= 1
            && log_count(&mut g, "livepatch_fix1_dummy_free: dummy @")? >= 1
            && n1 >= 1
            && owners1 == ["livepatch_shadow_fix1"],
        "{series}: fix1 in effect: {n1} variables 1 by {owners1:?}"
    );
    patchtest::apply(&mut g, &stem(series, "klp-shadow-fix2"))?;
    wait_for_log(&mut g, &[", check counter = "], 40)?;
    let (n2, owners2) = shadow_group(&mut g, 2)?;
    check!(
        log_count(&mut g, ", check counter = ")? >= 1
            && n2 >= 1
            && owners2 == ["livepatch_shadow_fix2"],
        "{series}: fix2 in effect: {n2} variables 2 by {owners2:?}"
    );
    for fix in ["livepatch_shadow_fix1", "livepatch_shadow_fix2"] {
        known_only_as_lpvmms(&mut g, series, fix)?;
    }
    verb(&mut g, "disable", "livepatch_shadow_fix2")?;
    check!(
        shadow_group(&mut g, 2)?.0 == 0,
        "{series}: fix2's exit left variables 2"
    );
    let before_exit = log_count(&mut g, prevented)?;
    verb(&mut g, "disable", "livepatch_shadow_fix1")?;
    let v = shadow_vars(&mut g)?;
    let after_exit = log_count(&mut g, prevented)?;
    check!(
        v.count == 0 && after_exit > before_exit,
        "{series}: after fix1's exit: {} variables left; prevented-leak lines {before_exit} -> {after_exit}",
        v.count
    );
    eprintln!(
        "{series}: fix1 held {n1} variables, fix2 {n2}; fix1's exit freed {} with its destructor",
        after_exit - before_exit
    );
    for p in ["livepatch_shadow_fix2", "livepatch_shadow_fix1"] {
        verb(&mut g, "unload", p)?;
    }
    g.run("rmmod livepatch_shadow_mod")?;
    g.poweroff().map(|_| ())
}

/// The callbacks sample's log lines since the last look (`KIND ran in COMM for PATCH`,
/// the comm left out); dmesg is cleared.
fn callback_lines_since(g: &mut Guest) -> Result<Vec<String>, String> {
    Ok(log_lines(g, "lpvmm-callbacks: ", true)?
        .iter()
        .filter_map(|r| {
            let (kind, rest) = r.split_once(" ran in ")?;
            let (_, patch) = rest.split_once(" for ")?;
            Some(format!("{kind} {patch}"))
        })
        .collect())
}

/// test-callbacks.sh's "multiple livepatches" and "atomic replace": two patches with
/// callbacks each run their own, the second's disable only its own; a cumulative patch
/// replacing `callbacks` runs only its own callbacks (none of the replaced patch's
/// unpatch ones), and its disable too.
fn several_patches_callbacks(g: &mut Guest, series: &str) -> TestResult {
    callback_lines_since(g)?;
    patchtest::apply(g, &stem(series, "callbacks"))?;
    patchtest::apply(g, &stem(series, "callbacks-2"))?;
    check!(
        g.text("cat /proc/cmdline")? == "lpvmm callbacks-2",
        "{series}: callbacks-2 is not in effect"
    );
    verb(g, "disable", "callbacks-2")?;
    verb(g, "disable", "callbacks")?;
    let two = callback_lines_since(g)?;
    check!(
        two == [
            "pre_patch callbacks",
            "post_patch callbacks",
            "pre_patch callbacks-2",
            "post_patch callbacks-2",
            "pre_unpatch callbacks-2",
            "post_unpatch callbacks-2",
            "pre_unpatch callbacks",
            "post_unpatch callbacks"
        ],
        "{series}: two patches' callbacks: {two:?}"
    );
    verb(g, "unload", "callbacks-2")?;
    verb(g, "enable", "callbacks")?;
    patchtest::apply(g, &stem(series, "callbacks-3"))?;
    check!(
        g.text("cat /proc/cmdline")? == "lpvmm callbacks-3",
        "{series}: callbacks-3 is not in effect"
    );
    verb(g, "disable", "callbacks-3")?;
    let replace = callback_lines_since(g)?;
    check!(
        replace
            == [
                "pre_patch callbacks",
                "post_patch callbacks",
                "pre_patch callbacks-3",
                "post_patch callbacks-3",
                "pre_unpatch callbacks-3",
                "post_unpatch callbacks-3"
            ],
        "{series}: atomic replace's callbacks: {replace:?}"
    );
    eprintln!("{series}: two patches' callbacks {two:?}; atomic replace's {replace:?}");
    verb(g, "unload", "callbacks-3")?;
    verb(g, "unload", "callbacks").map(|_| ())
}

/// A pre_patch that sleeps 13 s: after 10 s `patch status` names it running, with its
/// kworker's stack (asleep in msleep, inside the callback); once it returns, the enable
/// goes on and completes.
fn slow_callback(g: &mut Guest, series: &str) -> TestResult {
    let file = g.host.file(&kp(series, "callbacks-slow"));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file} --no-wait"))?;
    check!(rc == 0, "{series}: patch callbacks-slow: {out}");
    let t0 = std::time::Instant::now();
    let mut note = String::new();
    while t0.elapsed() < std::time::Duration::from_secs(30) {
        let s = status(g)?;
        note = s.active.and_then(|t| t.note).unwrap_or_default();
        if note.contains("its stack") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    check!(
        note.contains("pre_patch callback lpvmm_cb_pre_patch of vmlinux running in the kworker")
            && note.contains("msleep")
            && note.contains("lpvmm_cb_pre_patch+")
            && note.contains("lpvmm_guest_call+")
            && !note.contains("unreliable"),
        "{series}: a slow callback in patch status: {note:?}"
    );
    eprintln!("{series}: a slow callback in patch status: {note}");
    let s = status(g)?;
    let id = s.active.map(|t| t.id).ok_or("no transition")?;
    let done = ended(g, id)?;
    check!(
        done.outcome == OutcomeView::Done,
        "{series}: after the slow callback: {done:?}"
    );
    verb(g, "disable", "callbacks")?;
    verb(g, "unload", "callbacks").map(|_| ())
}

/// The tuncb sample's log lines since the last look (`KIND ran in COMM for MODULE
/// (state S)`); dmesg is cleared.
fn tuncb_lines(g: &mut Guest) -> Result<Vec<String>, String> {
    log_lines(g, "lpvmm-tuncb: ", true)
}

/// Issue 27, callbacks of a module object (patcher/examples/kbuild/tuncb.c), as the
/// kernel's test-callbacks.sh has them: a patch for tun loaded while tun is not runs
/// none; `insmod tun` runs pre_patch and post_patch in insmod, given tun (COMING);
/// `rmmod tun`, pre_unpatch and post_unpatch in rmmod (GOING); with tun loaded, the
/// disable runs pre_unpatch and post_unpatch in a kworker. A pre_patch returning -19
/// refuses tun's load: insmod says No such device, the guest's log says why, tun is not
/// loaded.
fn module_callbacks(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("kbtuncb-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    module_loaded_before(&mut g, series)?;
    g.run("rmmod tun")?;
    tuncb_lines(&mut g)?;
    patchtest::apply(&mut g, &stem(series, "tuncb"))?;
    let none = tuncb_lines(&mut g)?;
    check!(
        none.is_empty(),
        "{series}: callbacks ran for an absent tun: {none:?}"
    );
    let (rc, out) = insmod_tun(&mut g)?;
    check!(rc == 0, "{series}: insmod tun: {out}");
    let coming = tuncb_lines(&mut g)?;
    check!(
        coming
            == [
                "pre_patch ran in insmod for tun (state 1)",
                "post_patch ran in insmod for tun (state 1)"
            ],
        "{series}: insmod tun's callbacks: {coming:?}"
    );
    g.run("rmmod tun")?;
    let going = tuncb_lines(&mut g)?;
    check!(
        going
            == [
                "pre_unpatch ran in rmmod for tun (state 2)",
                "post_unpatch ran in rmmod for tun (state 2)"
            ],
        "{series}: rmmod tun's callbacks: {going:?}"
    );
    let (rc, out) = insmod_tun(&mut g)?;
    check!(rc == 0, "{series}: insmod tun again: {out}");
    tuncb_lines(&mut g)?;
    verb(&mut g, "disable", "tuncb")?;
    let disable = tuncb_lines(&mut g)?;
    check!(
        disable.len() == 2
            && disable[0].starts_with("pre_unpatch ran in kworker/")
            && disable[1].starts_with("post_unpatch ran in kworker/")
            && disable.iter().all(|l| l.ends_with("for tun (state 0)")),
        "{series}: the disable's callbacks: {disable:?}"
    );
    eprintln!("{series}: tuncb's callbacks: {coming:?} {going:?} {disable:?}");
    verb(&mut g, "unload", "tuncb")?;

    g.run("rmmod tun")?;
    patchtest::apply(&mut g, &stem(series, "tuncb-refused"))?;
    let (rc, out) = insmod_tun(&mut g)?;
    check!(
        rc != 0 && out.contains("No such device"),
        "{series}: insmod tun under a pre_patch returning -19: {out}"
    );
    let log = g.run("dmesg | grep -E 'lpvmm-tuncb|lpvmm: refusing' || true")?;
    check!(
        log.contains("pre_patch ran in insmod for tun")
            && log.contains(
                "refusing module tun: patch tuncb: its pre-patch callback \
                            lpvmm_tuncb_pre_patch returned -19"
            )
            && !log.contains("post_patch"),
        "{series}: the refusal in the guest's log: {log}"
    );
    check!(
        !loaded(&mut g, "tun")?,
        "{series}: tun loaded although refused"
    );
    verb(&mut g, "disable", "tuncb")?;
    verb(&mut g, "unload", "tuncb")?;
    busy_target_module(&mut g, series)?;
    g.poweroff().map(|_| ())
}

/// test-callbacks.sh's "target module before livepatch" and "pre-patch callback
/// -ENODEV", with tun loaded: the enable runs tun's pre_patch and post_patch in a
/// kworker, the disable its pre_unpatch and post_unpatch; a pre_patch returning -19
/// refuses the enable, runs nothing else (no post_unpatch for the object whose pre_patch
/// failed) and leaves tun's text as it was.
fn module_loaded_before(g: &mut Guest, series: &str) -> TestResult {
    tuncb_lines(g)?;
    patchtest::apply(g, &stem(series, "tuncb"))?;
    verb(g, "disable", "tuncb")?;
    verb(g, "unload", "tuncb")?;
    let lines = tuncb_lines(g)?;
    let kinds: Vec<&str> = lines.iter().filter_map(|l| l.split(' ').next()).collect();
    check!(
        kinds == ["pre_patch", "post_patch", "pre_unpatch", "post_unpatch"]
            && lines
                .iter()
                .all(|l| l.contains(" ran in kworker/") && l.ends_with("for tun (state 0)")),
        "{series}: tuncb's callbacks with tun loaded first: {lines:?}"
    );
    let tun_before = checksum(g, "module:tun")?;
    let file = g.host.file(&kp(series, "tuncb-refused"));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file}"))?;
    check!(
        rc != 0 && out.contains("the pre-patch callback lpvmm_tuncb_pre_patch of tun returned -19"),
        "{series}: tuncb-refused with tun loaded: {out}"
    );
    let refused = tuncb_lines(g)?;
    check!(
        refused.len() == 1 && refused[0].starts_with("pre_patch ran in kworker/"),
        "{series}: after the refusal only tun's pre_patch should have run: {refused:?}"
    );
    check!(
        checksum(g, "module:tun")? == tun_before && status(g)?.patches.is_empty(),
        "{series}: a refused enable changed tun or left its patch loaded"
    );
    eprintln!("{series}: tun loaded first: {lines:?}; refused: {refused:?}");
    Ok(())
}

/// test-callbacks.sh's "busy target module": a task asleep in tun's read holds the
/// enable of a patch replacing tun_do_read, after tun's pre_patch ran; reversed, the
/// transition runs tun's post_unpatch (and neither post_patch nor pre_unpatch), tun's
/// text is as before, and the patch loaded for the enable is gone.
fn busy_target_module(g: &mut Guest, series: &str) -> TestResult {
    let (rc, out) = insmod_tun(g)?;
    check!(rc == 0, "{series}: insmod tun for the busy case: {out}");
    let tun_before = checksum(g, "module:tun")?;
    let reader = tun_reader(g)?;
    tuncb_lines(g)?;
    let file = g.host.file(&kp(series, "tuncb-busy"));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file} --no-wait"))?;
    check!(rc == 0, "{series}: patch tuncb-busy: {out}");
    let t = held_by(g, reader)?;
    let during = tuncb_lines(g)?;
    let (rc, out) = g.lpvmm("patch reverse {vm}")?;
    check!(
        rc == 0 && out.contains("reversed"),
        "{series}: reverse: {out}"
    );
    let done = ended(g, t.id)?;
    let after = tuncb_lines(g)?;
    kill(g, reader)?;
    check!(
        during.len() == 1
            && during[0].starts_with("pre_patch ran in kworker/")
            && after.len() == 1
            && after[0].starts_with("post_unpatch ran in kworker/")
            && after[0].ends_with("for tun (state 0)"),
        "{series}: a busy target's callbacks: {during:?} then {after:?} ({done:?})"
    );
    check!(
        checksum(g, "module:tun")? == tun_before && status(g)?.patches.is_empty(),
        "{series}: after the reversed enable, tun's text or the patch list"
    );
    eprintln!("{series}: busy target: {during:?} while held, {after:?} once reversed");
    Ok(())
}

/// Issue 27, acceptance 3 (patcher/examples/kbuild/states.c): three cumulative patches
/// holding state 7, each with the state's four callbacks, enabled one after the other,
/// then the last disabled: the guest's log holds setup and enable once (by the first),
/// disable and release once (by the last), and /proc/cmdline follows the chain.
fn state_callbacks_across_a_chain(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("kbstate-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    for (stem_name, patch) in [
        ("states", "states-1"),
        ("states-2", "states-2"),
        ("states-3", "states-3"),
    ] {
        patchtest::apply(&mut g, &stem(series, stem_name))?;
        check!(
            g.text("cat /proc/cmdline")? == patch,
            "{series}: /proc/cmdline under {patch}"
        );
    }
    verb(&mut g, "disable", "states-3")?;
    let log = log_lines(&mut g, "lpvmm-states: ", false)?;
    check!(
        log == [
            "setup of state 7 by states-1",
            "enable of state 7 by states-1",
            "disable of state 7 by states-3",
            "release of state 7 by states-3"
        ],
        "{series}: the state callbacks in the guest's log: {log:?}"
    );
    eprintln!("{series}: state 7's callbacks across the chain: {log:?}");
    for p in ["states-1", "states-2", "states-3"] {
        verb(&mut g, "unload", p)?;
    }
    g.poweroff().map(|_| ())
}

/// `lpvmm shadow VM --json`.
fn shadow_vars(g: &mut Guest) -> Result<ShadowResult, String> {
    patchtest::lpvmm_json(g, "shadow {vm} --json")
}

/// The kernel's test-shadow-vars.sh with lpvmm's runtime (patcher/examples/kbuild/
/// shadowvars.c, whose pre_patch makes test_klp_shadow_vars.c's calls): the guest's log
/// holds what each call returned, in order, every check ok, and no variable is left.
fn shadow_calls(g: &mut Guest, series: &str) -> TestResult {
    patchtest::apply(g, &stem(series, "shadowvars"))?;
    let log = log_lines(g, "lpvmm-shadow-vars: ", false)?;
    eprintln!("{series}: test-shadow-vars with lpvmm's runtime: {log:#?}");
    check!(
        log == SHADOW_VARS_LOG,
        "{series}: the shadow-variable calls in the guest's log: {log:#?}"
    );
    check!(
        shadow_vars(g)?.count == 0,
        "{series}: variables left by shadowvars"
    );
    verb(g, "disable", "shadowvars")?;
    verb(g, "unload", "shadowvars").map(|_| ())
}

/// What shadowvars.c's calls log (test-shadow-vars.sh's expected output, in lpvmm's
/// spelling, with the refusals lpvmm adds).
const SHADOW_VARS_LOG: &[&str] = &[
    "get(obj=PTR1, id=0x1234) = PTR0",
    "nothing there at first: ok",
    "ctor(obj=PTR1, shadow_data=PTR2, ctor_data=PTR3)",
    "alloc(obj=PTR1, id=0x1234, ctor_data=PTR3) = PTR2",
    "ctor(obj=PTR4, shadow_data=PTR5, ctor_data=PTR6)",
    "alloc(obj=PTR4, id=0x1234, ctor_data=PTR6) = PTR5",
    "ctor(obj=PTR1, shadow_data=PTR7, ctor_data=PTR8)",
    "alloc(obj=PTR1, id=0x1235, ctor_data=PTR8) = PTR7",
    "get(obj=PTR1, id=0x1234) = PTR2",
    "get(obj=PTR4, id=0x1234) = PTR5",
    "get(obj=PTR1, id=0x1235) = PTR7",
    "each is found by <obj, id>: ok",
    "each holds its constructor's data: ok",
    "ctor(obj=PTR9, shadow_data=PTR10, ctor_data=PTR11)",
    "get_or_alloc(obj=PTR9, id=0x1234, ctor_data=PTR11) = PTR10",
    "get_or_alloc(obj=PTR9, id=0x1234, ctor_data=PTR3) = PTR10",
    "get_or_alloc returns the one there: ok",
    "alloc(obj=PTR1, id=0x1234, ctor_data=PTR6) = PTR0",
    "alloc refuses a second <obj, id>: ok",
    "ctor(obj=PTR12) refuses: -12",
    "alloc(obj=PTR12, id=0x1234, ctor_data=PTR3) = PTR0",
    "get(obj=PTR12, id=0x1234) = PTR0",
    "a refusing constructor allocates nothing: ok",
    "dtor(obj=PTR1, shadow_data=PTR2, holds PTR3)",
    "get(obj=PTR1, id=0x1234) = PTR0",
    "free: gone: ok",
    "dtor(obj=PTR4, shadow_data=PTR5, holds PTR6)",
    "dtor(obj=PTR9, shadow_data=PTR10, holds PTR11)",
    "get(obj=PTR4, id=0x1234) = PTR0",
    "get(obj=PTR9, id=0x1234) = PTR0",
    "free: the others gone: ok",
    "get(obj=PTR1, id=0x1235) = PTR7",
    "free leaves other ids: ok",
    "dtor(obj=PTR1, shadow_data=PTR7, holds PTR8)",
    "get(obj=PTR1, id=0x1235) = PTR0",
    "free_all: gone: ok",
    "done",
];

/// The count a `shadow-N reads=K` line of the shadow sample says.
fn reads(line: &str, patch: &str) -> Result<u64, String> {
    line.strip_prefix(&format!("{patch} reads="))
        .and_then(|k| k.parse().ok())
        .ok_or_else(|| format!("not a line of {patch}: {line:?}"))
}

/// Issue 27, acceptance 2 (patcher/examples/kbuild/shadow.c): a field added to every
/// task_struct that reads /proc/cmdline (shadow variable 1, tied to state 9). Four
/// guest tasks read it in a loop all along. The shell's own count goes on across the
/// cumulative patch that takes the variables over (3 reads under shadow-1, the 4th
/// under shadow-2), and so do the readers'. `lpvmm shadow` sees exactly the five
/// variables, allocated by shadow-1, tied to state 9, as the guest's log later counts
/// them. The last patch's disable frees every one (the guest's log names each, with its
/// count), and `lpvmm shadow` is back to zero.
fn shadow_variables_handed_over(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("kbshadow-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let original = g.text("cat /proc/cmdline")?;
    shadow_calls(&mut g, series)?;
    patchtest::apply(&mut g, &stem(series, "shadow"))?;
    let mut shell = Vec::new();
    for _ in 0..3 {
        shell.push(reads(
            &g.text("read l </proc/cmdline; echo $l")?,
            "shadow-1",
        )?);
    }
    check!(
        shell == [1, 2, 3],
        "{series}: the shell's counts: {shell:?}"
    );
    g.run(
        "rm -f /tmp/stop; for i in 1 2 3 4; do (while [ ! -e /tmp/stop ]; do \
         read l </proc/cmdline; echo \"$l\" >/tmp/r$i.new; mv /tmp/r$i.new /tmp/r$i; done) & \
         done; sleep 1",
    )?;
    let before = g.text("cat /tmp/r1")?;
    let v = shadow_vars(&mut g)?;
    check!(
        v.count == 5
            && v.vars.len() == 5
            && v.groups.len() == 1
            && v.groups[0].id == 1
            && v.groups[0].state == Some(9)
            && v.groups[0].owners == ["shadow-1"]
            && v.groups[0].bytes == 5 * 8,
        "{series}: lpvmm shadow under shadow-1: {:?}",
        v.groups
    );
    patchtest::apply(&mut g, &stem(series, "shadow-2"))?;
    let next = reads(&g.text("read l </proc/cmdline; echo $l")?, "shadow-2")?;
    check!(
        next == 4,
        "{series}: the shell's 4th read under shadow-2 said {next}"
    );
    g.run("sleep 1")?;
    let after = g.text("cat /tmp/r1")?;
    let (b, a) = (reads(&before, "shadow-1")?, reads(&after, "shadow-2")?);
    check!(a > b, "{series}: a reader's count went from {b} to {a}");
    verb(&mut g, "unload", "shadow-1")?;
    g.run("touch /tmp/stop; wait")?;
    let v = shadow_vars(&mut g)?;
    check!(
        v.count == 5 && v.groups[0].owners == ["shadow-1"],
        "{series}: lpvmm shadow once shadow-1 is gone: {:?}",
        v.groups
    );
    eprintln!(
        "{series}: reader 1 went from {before:?} to {after:?}; lpvmm shadow: {:?}",
        v.groups
    );
    verb(&mut g, "disable", "shadow-2")?;
    let freed = g.run("dmesg | grep -c 'lpvmm-shadow: freed reads=' || true")?;
    check!(
        freed.trim() == "5" && g.text("dmesg | grep -c 'freed reads=4$'")? == "1",
        "{series}: the guest's log should free 5 variables, the shell's with 4 reads: {freed}"
    );
    let v = shadow_vars(&mut g)?;
    check!(
        v.count == 0 && v.vars.is_empty(),
        "{series}: shadow variables left after the last patch: {:?}",
        v.vars
    );
    check!(
        g.text("cat /proc/cmdline")? == original,
        "{series}: /proc/cmdline after the disable"
    );
    verb(&mut g, "unload", "shadow-2")?;
    g.poweroff().map(|_| ())
}

/// What `getpid-hammer -m` saw in one phase: how many of its children made a call
/// wholly inside it, how many of them ran the new getpid, how many the old one.
#[derive(Debug, PartialEq, Eq)]
struct Phase {
    called: u32,
    new: u32,
    old: u32,
}

/// A `getpid-hammer: phase K ...` line.
fn phase_of(line: &str) -> Option<Phase> {
    let field = |key: &str| -> Option<u32> {
        line.split_whitespace()
            .find_map(|t| t.strip_prefix(key))?
            .parse()
            .ok()
    };
    Some(Phase {
        called: field("called=")?,
        new: field("new=")?,
        old: field("old=")?,
    })
}

/// Where the first process that made no call in a phase (`idle=PID`) is, as lpvmm sees it
/// (its stack, and whether it is on a vCPU), and where the vCPUs are, twice 2 s apart: a
/// process that never runs again while the rest do sits on a vCPU that stopped (the
/// nested platform's quirk, docs/testing.md), or in the kernel, which its stack shows.
fn where_idle(g: &mut Guest, line: &str) -> String {
    let idle = line
        .split_whitespace()
        .find_map(|t| t.strip_prefix("idle="))
        .filter(|p| *p != "0")
        .unwrap_or("");
    let mut out = String::new();
    if !idle.is_empty() {
        let (_, stack) = g
            .lpvmm(&format!("stack {{vm}} {idle}"))
            .unwrap_or_else(|e| (-1, e));
        out += &format!("lpvmm stack of the idle process {idle}:\n{stack}\n");
    }
    for n in 1..=2 {
        let (_, regs) = g.lpvmm("regs {vm}").unwrap_or_else(|e| (-1, e));
        out += &format!("lpvmm regs ({n} of 2):\n{regs}\n");
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    out
}

/// Open the hammer's phase `k` (its `k`-th SIGUSR1) and wait for its line: the hammer
/// closes it once every child made a call wholly inside it (guest-images/programs/
/// getpid-hammer.c), and says so through its FIFO, read with the shell's builtins
/// (`kill`, `read`) so that no process starts among the hammers. Returns the counts and
/// the line.
fn hammer_phase(g: &mut Guest, hammer: i64, k: u32) -> Result<(Phase, String), String> {
    let out = g.text(&format!(
        "kill -USR1 {hammer} && read -r l < {HAMMER_FIFO} && echo \"$l\""
    ))?;
    let want = format!("getpid-hammer: phase {k} ");
    let line = out
        .lines()
        .find(|l| l.starts_with(&want))
        .unwrap_or("")
        .to_string();
    let phase = phase_of(&line).ok_or_else(|| format!("phase {k}: the hammer said {out:?}"))?;
    Ok((phase, line))
}

/// The kernel's test-syscall.sh from outside: 128 guest processes call getpid(2) as fast
/// as they can, each checking every result against its pid, while `__x64_sys_getpid`
/// (its own body, built with kbuild) goes through per-task disable/enable cycles.
/// Like the selftest's new function, which records the pids that ran it, lpvmm's says
/// to each caller that asks whether it ran (patcher/examples/kbuild/getpid.c): after
/// the patch is loaded and after every enable, every hammering process runs the new
/// getpid and none the old; before it and after every disable, every one the old and
/// none the new. Every call right, every transition complete with every task moved, no
/// new kernel warning, and the text as before once disabled.
fn getpid_hammered(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("kbpid-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let boot_splats = g.run(SPLATS)?;
    let text_before = checksum(&mut g, "text")?;
    // Niced, so that the shell the test types into still gets the CPU.
    let hammer = g.spawn(&format!(
        "rm -f /tmp/hstop {HAMMER_FIFO}; mkfifo {HAMMER_FIFO}; \
         getpid-hammer -m -f {HAMMER_FIFO} -p {HAMMERS} -n 10 -s /tmp/hstop \
         >/tmp/hammer.log 2>&1 &"
    ))?;
    // 128 forks take a nested guest a while: wait for them (a fixed 2 s was not always
    // enough on a loaded test host), then require all of them.
    let mut running = String::new();
    for _ in 0..60 {
        std::thread::sleep(std::time::Duration::from_secs(1));
        running = g.run("ps | grep -c '[g]etpid-hammer'")?;
        if running.trim().parse::<u32>().unwrap_or(0) > HAMMERS {
            break;
        }
    }
    check!(
        running.trim().parse::<u32>().unwrap_or(0) > HAMMERS,
        "{series}: the hammers are not all running after 60 s: {running}"
    );
    // Which getpid every hammering process runs now, after `after`: all the new one
    // (`patched`) or all the old one.
    let mut phases = 0;
    let mut slowest = 0.0f64;
    let mut expect = |g: &mut Guest, patched: bool, after: &str| -> TestResult {
        phases += 1;
        let (p, line) = hammer_phase(g, hammer, phases)?;
        let want = if patched {
            Phase {
                called: HAMMERS,
                new: HAMMERS,
                old: 0,
            }
        } else {
            Phase {
                called: HAMMERS,
                new: 0,
                old: HAMMERS,
            }
        };
        if p != want {
            let (_, st) = g.lpvmm("patch status {vm}")?;
            return Err(format!(
                "{series}: after {after}, every hammering process should run the {} getpid \
                 and none the {}: {line}\n(called: made a call in the phase; new, old: ran \
                 that version)\n{st}\n{}",
                if patched { "new" } else { "old" },
                if patched { "old" } else { "new" },
                where_idle(g, &line),
            ));
        }
        let ms = line
            .rsplit("ms=")
            .next()
            .and_then(|x| x.trim().parse().ok())
            .unwrap_or(0.0);
        slowest = slowest.max(ms);
        Ok(())
    };
    expect(&mut g, false, "boot, before the patch")?;
    apply(&mut g, series, "getpid")?;
    expect(&mut g, true, "the patch was loaded and enabled")?;
    for cycle in 1..=HAMMER_CYCLES {
        for op in ["disable", "enable"] {
            // Longer than the transition's own timeout, so that a held transition ends
            // with lpvmm's own account of who held it (then reversed), not the harness's.
            let (rc, out) = g.lpvmm_within(
                &format!("patch {op} {{vm}} getpid --timeout 120"),
                std::time::Duration::from_secs(200),
            )?;
            if rc != 0 {
                let (_, st) = g.lpvmm("patch status {vm}")?;
                return Err(format!("{series}: cycle {cycle}: {op}: {out}\n{st}"));
            }
            expect(&mut g, op == "enable", &format!("cycle {cycle}'s {op}"))?;
        }
    }
    let s = status(&mut g)?;
    check!(
        patchtest::site_now(&s, "__x64_sys_getpid") == "jump",
        "{series}: after the cycles getpid is not a direct jump: {:?}",
        s.funcs
    );
    // Each command above succeeded only once its transition was done; status keeps the
    // last 32 of them, and each must say so.
    let history = &s.history;
    let kept: Vec<&TransitionView> = history.iter().filter(|t| t.patch == "getpid").collect();
    check!(
        kept.len() >= (2 * HAMMER_CYCLES as usize + 1).min(32)
            && kept.iter().all(|t| t.outcome == OutcomeView::Done),
        "{series}: the getpid transitions in status: {:?}",
        s.history
    );
    let last = history.last();
    check!(
        last.is_some_and(|t| t.tasks as u64 > u64::from(HAMMERS) && t.pending == 0),
        "{series}: the last transition did not move every task: {last:?}"
    );
    g.run("touch /tmp/hstop; wait")?;
    let log = g.run("cat /tmp/hammer.log")?;
    let summary = log
        .lines()
        .find(|l| l.starts_with("getpid-hammer: OK") || l.starts_with("getpid-hammer: FAIL"))
        .unwrap_or("");
    let newcalls: u64 = summary
        .split_whitespace()
        .find_map(|t| t.strip_prefix("newcalls="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    check!(
        summary.starts_with(&format!("getpid-hammer: OK procs={HAMMERS} ")) && newcalls > 0,
        "{series}: {log}"
    );
    eprintln!(
        "{series}: {} per-task cycles under the hammer, {phases} phases checked (the longest \
         {slowest:.0} ms): {summary}",
        HAMMER_CYCLES,
    );
    let new = new_splats(&mut g, &boot_splats)?;
    check!(
        new.is_empty(),
        "{series}: new kernel warnings:\n{}",
        new.join("\n")
    );
    verb(&mut g, "disable", "getpid")?;
    check!(
        checksum(&mut g, "text")? == text_before,
        "{series}: kernel text after disable differs from before"
    );
    verb(&mut g, "unload", "getpid")?;
    g.poweroff().map(|_| ())
}

/// The guest's tracefs, mounted by [`ftrace_coexists`].
const T: &str = "/sys/kernel/tracing";
/// ftrace's own complaints: a site it did not find as it left it, or gave up on.
const FTRACE_TROUBLE: &str =
    "dmesg | grep -iE 'ftrace (bug|failed|record)|ftrace_verify_code|ftrace faulted' || true";

/// Trace `funcs` (a filter, globs allowed) with the guest's function tracer while
/// `work` runs in the guest; returns the trace.
fn function_trace(g: &mut Guest, filter: &str, work: &str) -> Result<String, String> {
    g.run(&format!(
        "echo '{filter}' > {T}/set_ftrace_filter && echo > {T}/trace && \
         echo function > {T}/current_tracer"
    ))?;
    // Read before the tracer goes: changing the tracer empties the buffer.
    let trace = g.run(work).and_then(|_| g.run(&format!("cat {T}/trace")));
    g.run(&format!(
        "echo nop > {T}/current_tracer; echo > {T}/set_ftrace_filter"
    ))?;
    trace
}

/// Probe each `(event, function)` with a kprobe while `work` runs; returns the trace.
fn kprobe_trace(g: &mut Guest, probes: &[(&str, &str)], work: &str) -> Result<String, String> {
    for (event, func) in probes {
        g.run(&format!("echo 'p:{event} {func}' >> {T}/kprobe_events"))?;
    }
    g.run(&format!(
        "echo > {T}/trace && echo 1 > {T}/events/kprobes/enable"
    ))?;
    let trace = g.run(work).and_then(|_| g.run(&format!("cat {T}/trace")));
    g.run(&format!(
        "echo 0 > {T}/events/kprobes/enable; echo > {T}/kprobe_events"
    ))?;
    trace
}

fn traced(trace: &str, what: &str) -> usize {
    trace
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(what))
        .count()
}

/// The guest's own ftrace and kprobes on a function lpvmm redirected: the guest's
/// tracer cannot take the function (its filter matches nothing there) and traces every
/// other function, a kprobe on it is accepted and never fires while another fires, the
/// patch stays in effect, nothing in dmesg, and so through the ftrace_enabled sysctl
/// turned off and on; lpvmm will not hand the function back while
/// a guest kprobe covers it and says so; after disable the guest traces and probes it.
/// A function the guest traces is refused by lpvmm, naming ftrace.
fn ftrace_coexists(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("kbftr-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let boot_splats = g.run(SPLATS)?;
    g.run(&format!(
        "mount -t tracefs nodev {T} 2>/dev/null; test -w {T}/current_tracer"
    ))?;
    let work = "cat /proc/loadavg /proc/uptime >/dev/null";
    apply(&mut g, series, "loadavg")?;
    let patched = |g: &mut Guest| -> Result<bool, String> {
        Ok(g.text("cat /proc/loadavg")?.ends_with(" lpvmm"))
    };
    check!(patched(&mut g)?, "{series}: the patch is not in effect");
    let s = status(&mut g)?;
    check!(
        patchtest::func_of(&s, "loadavg_proc_show")?.ftrace_hidden,
        "{series}: status does not say the record is hidden: {:?}",
        s.funcs
    );

    // The function tracer: the redirected function alone matches nothing, a glob takes
    // the others, and tracing works for them.
    let (rc, out) = g.run_status(
        &format!("echo loadavg_proc_show > {T}/set_ftrace_filter"),
        std::time::Duration::from_secs(30),
    )?;
    check!(
        rc != 0,
        "{series}: the guest's ftrace took loadavg_proc_show: {out}"
    );
    let trace = function_trace(&mut g, "*_proc_show", work)?;
    check!(
        traced(&trace, "uptime_proc_show") >= 1 && traced(&trace, "loadavg_proc_show") == 0,
        "{series}: function trace of *_proc_show:\n{trace}"
    );
    check!(patched(&mut g)?, "{series}: tracing undid the patch");

    // The ftrace_enabled sysctl (test-ftrace.sh), turned off and on under a running
    // tracer: ftrace rewrites every enabled record both ways and must skip the hidden
    // one. lpvmm registers nothing with ftrace, so, unlike a livepatch, it does not make
    // the sysctl busy; the patch stays in effect and tracing comes back.
    const SYSCTL: &str = "/proc/sys/kernel/ftrace_enabled";
    g.run(&format!(
        "echo '*_proc_show' > {T}/set_ftrace_filter && echo function > {T}/current_tracer"
    ))?;
    let (rc, out) = g.run_status(
        &format!("echo 0 > {SYSCTL} && cat {SYSCTL}"),
        std::time::Duration::from_secs(30),
    )?;
    check!(
        rc == 0 && out.trim() == "0",
        "{series}: ftrace_enabled=0 with the patch on: rc {rc}: {out}"
    );
    check!(
        patched(&mut g)?,
        "{series}: turning ftrace off undid the patch"
    );
    g.run(&format!("echo 1 > {SYSCTL} && echo > {T}/trace"))?;
    g.run(work)?;
    let trace = g.run(&format!("cat {T}/trace"));
    g.run(&format!(
        "echo nop > {T}/current_tracer; echo > {T}/set_ftrace_filter"
    ))?;
    let trace = trace?;
    check!(
        traced(&trace, "uptime_proc_show") >= 1 && traced(&trace, "loadavg_proc_show") == 0,
        "{series}: function trace after ftrace_enabled went 0 and back to 1:\n{trace}"
    );
    check!(
        patched(&mut g)?,
        "{series}: turning ftrace back on undid the patch"
    );

    // kprobes: one on the redirected function is accepted and stays silent.
    let probes = [
        ("lpvmm_la", "loadavg_proc_show"),
        ("lpvmm_up", "uptime_proc_show"),
    ];
    let trace = kprobe_trace(&mut g, &probes, work)?;
    check!(
        traced(&trace, "lpvmm_up:") >= 1 && traced(&trace, "lpvmm_la:") == 0,
        "{series}: kprobe trace:\n{trace}"
    );
    check!(patched(&mut g)?, "{series}: a kprobe undid the patch");

    // A kprobe that stays on the function holds the disable back, named.
    g.run(&format!(
        "echo 'p:lpvmm_la loadavg_proc_show' > {T}/kprobe_events && \
         echo 1 > {T}/events/kprobes/enable"
    ))?;
    let (rc, out) = g.lpvmm("patch disable {vm} loadavg --timeout 8")?;
    check!(
        rc != 0 && out.contains("ftrace user") && out.contains("kprobe"),
        "{series}: disable under a guest kprobe: rc {rc}: {out}"
    );
    check!(
        patched(&mut g)?,
        "{series}: the refused disable undid the patch"
    );
    g.run(&format!(
        "echo 0 > {T}/events/kprobes/enable; echo > {T}/kprobe_events"
    ))?;

    let trouble = g.run(FTRACE_TROUBLE)?;
    let new = new_splats(&mut g, &boot_splats)?;
    check!(
        trouble.trim().is_empty() && new.is_empty(),
        "{series}: the guest's log:\n{trouble}\n{}",
        new.join("\n")
    );

    // Given back: the guest traces and probes the function itself.
    verb(&mut g, "disable", "loadavg")?;
    check!(!patched(&mut g)?, "{series}: still patched after disable");
    let trace = function_trace(&mut g, "loadavg_proc_show", work)?;
    check!(
        traced(&trace, "loadavg_proc_show") >= 1,
        "{series}: after disable, the function trace:\n{trace}"
    );
    let trace = kprobe_trace(&mut g, &probes[..1], work)?;
    check!(
        traced(&trace, "lpvmm_la:") >= 1,
        "{series}: after disable, the kprobe trace:\n{trace}"
    );

    // What the guest traces, lpvmm refuses, naming ftrace, and changes nothing.
    let text = checksum(&mut g, "text")?;
    g.run(&format!(
        "echo loadavg_proc_show > {T}/set_ftrace_filter && echo function > {T}/current_tracer"
    ))?;
    let (rc, out) = g.lpvmm("patch enable {vm} loadavg")?;
    g.run(&format!(
        "echo nop > {T}/current_tracer; echo > {T}/set_ftrace_filter"
    ))?;
    check!(
        rc != 0 && out.contains("ftrace"),
        "{series}: enable of a traced function: rc {rc}: {out}"
    );
    check!(!patched(&mut g)?, "{series}: the refused enable patched");
    check!(
        checksum(&mut g, "text")? == text,
        "{series}: the refused enable changed the text"
    );
    let trouble = g.run(FTRACE_TROUBLE)?;
    let new = new_splats(&mut g, &boot_splats)?;
    check!(
        trouble.trim().is_empty() && new.is_empty(),
        "{series}: the guest's log at the end:\n{trouble}\n{}",
        new.join("\n")
    );
    verb(&mut g, "unload", "loadavg")?;
    g.poweroff().map(|_| ())
}

/// Acceptance 2: `current`, its fields through the real headers, a function the kernel
/// does not export; and alternatives applied for the guest's CPU.
fn current(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("kbcur-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    apply(&mut g, series, "current")?;
    let out = g.run("sh -c 'echo $$; exec cat /proc/cmdline'")?;
    let mut lines = out.lines().map(str::trim);
    let pid = lines.next().unwrap_or("");
    let line = lines.next().unwrap_or("");
    let want = format!("comm=cat pid={pid} tgid={pid} processes=");
    check!(
        !pid.is_empty() && line.starts_with(&want),
        "{series}: /proc/cmdline read by pid {pid}: {line:?} (want {want}N)"
    );
    let n: i64 = line
        .rsplit('=')
        .next()
        .and_then(|x| x.parse().ok())
        .ok_or(format!("{series}: no process count in {line:?}"))?;
    let tasks: i64 = g
        .run("ls /proc/*/task | grep -c '^[0-9]'")?
        .trim()
        .parse()
        .map_err(|e| format!("{series}: counting tasks: {e}"))?;
    check!(
        n > 0 && (n - tasks).abs() <= 20,
        "{series}: nr_processes() says {n}, the guest has about {tasks} tasks"
    );
    eprintln!("{series}: {line}");
    verb(&mut g, "disable", "current")?;

    // Alternatives, linked for the guest's own CPU features: applied exactly where the
    // guest's /proc/cpuinfo has the feature; static_cpu_has() says what it says.
    apply(&mut g, series, "features")?;
    let line = g.text("cat /proc/cmdline")?;
    let flags = g.run("grep -m1 '^flags' /proc/cpuinfo")?;
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    // alt(F) is 1 as compiled, 2 where the replacement was applied.
    let applied = format!(
        "always=2 hypervisor={} la57={}",
        1 + u8::from(has("hypervisor")),
        1 + u8::from(has("la57"))
    );
    let cpu_has = ["hypervisor", "avx2", "xsave", "la57"]
        .iter()
        .map(|f| format!("{f}={}", u8::from(has(f))))
        .collect::<Vec<_>>()
        .join(" ");
    let want = format!("{applied} | {cpu_has}");
    check!(
        line == want,
        "{series}: alternatives for the guest's CPU: the patch says {line:?}, /proc/cpuinfo {want:?}"
    );
    eprintln!("{series}: alternatives in the patch: {line}");
    verb(&mut g, "disable", "features")?;
    g.poweroff().map(|_| ())
}

/// Acceptance 3: a task asleep in, and one interrupted in, kbuild-built code unwind
/// reliably through it with its ORC table; the blocker of a disable agrees.
fn orc(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("kborc-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    apply(&mut g, series, "nsleep")?;
    let s = status(&mut g)?;
    check!(
        s.patches.first().is_some_and(|p| p.orc_entries > 0),
        "{series}: the kbuild-built patch has no ORC entries: {:?}",
        s.patches.first()
    );
    let (pid, guest_stack) = sleeper(&mut g, 1000, "hrtimer_nanosleep")?;
    let (rc, out) = g.lpvmm(&format!("stack {{vm}} {pid} --json"))?;
    check!(rc == 0, "{series}: stack: {out}");
    let traces = parse::<StackResult>(&out)?.traces;
    let trace = traces.first();
    let names: Vec<String> = trace
        .iter()
        .flat_map(|t| &t.frames)
        .filter(|f| !f.sched)
        .filter_map(|f| f.symbol.clone())
        .collect();
    let at = names.iter().position(|n| {
        n.starts_with("lpvmm_kbuild_common_nsleep+") && n.ends_with("[lpvmm:kbuild_nsleep]")
    });
    check!(
        trace.is_some_and(|t| t.reliable)
            && at.is_some_and(|i| i > 0
                && names[i - 1].starts_with("hrtimer_nanosleep+")
                && names.get(i + 1).is_some_and(|n| n.contains("sys_clock_nanosleep"))),
        "{series}: a sleep in kbuild-built common_nsleep:\n{names:#?}\nguest: {guest_stack}\n{trace:?}"
    );
    // The guest's own view, above the new function, is the same.
    let guest: Vec<&str> = guest_stack
        .lines()
        // `[<0>] func+0xoff/0xsize`, not the kernel's warnings on the same console.
        .filter_map(|l| l.trim().strip_prefix("[<")?.split_once("] "))
        .map(|(_, f)| f.trim())
        .take_while(|f| !f.starts_with("0x"))
        .collect();
    let ours: Vec<&str> = names.iter().map(String::as_str).collect();
    check!(
        !guest.is_empty() && ours.len() >= guest.len() && ours[..guest.len()] == guest[..],
        "{series}: frames above the new function:\nlpvmm {ours:#?}\nguest {guest:#?}"
    );
    // Its disable is held by that task, named through the new code.
    let (rc, out) = g.lpvmm("patch disable {vm} kbuild-nsleep --no-wait")?;
    check!(rc == 0, "{series}: disable: {out}");
    let t = held_by(&mut g, pid)?;
    let reason = t.blockers.first().map_or("", |b| b.reason.as_str());
    check!(
        reason.contains("lpvmm_kbuild_common_nsleep [kbuild-nsleep]"),
        "{series}: blockers of the disable: {:?}",
        t.blockers
    );
    let (rc, out) = g.lpvmm("patch reverse {vm}")?;
    check!(rc == 0, "{series}: reverse: {out}");
    g.run(&format!("kill {pid}; wait {pid} 2>/dev/null; true"))?;

    // Interrupted inside the new code: a reader of /proc/version spends most of its time
    // in the spinning version_proc_show.
    apply(&mut g, series, "spin")?;
    let reader = g.spawn("(while :; do read -r x < /proc/version; done) &")?;
    let mut seen = None;
    for _ in 0..60 {
        let (rc, out) = g.lpvmm(&format!("stack {{vm}} {reader} --json"))?;
        check!(rc == 0, "{series}: stack: {out}");
        let trace = parse::<StackResult>(&out)?.traces.into_iter().next();
        let top = trace.as_ref().and_then(|t| t.frames.first());
        let in_spin = top.is_some_and(|top| {
            top.interrupted
                && top
                    .symbol
                    .as_deref()
                    .is_some_and(|s| s.starts_with("lpvmm_spin_version_proc_show+"))
        });
        if in_spin {
            seen = trace;
            break;
        }
    }
    g.run(&format!("kill {reader}; wait {reader} 2>/dev/null; true"))?;
    let trace = seen.ok_or(format!(
        "{series}: in 60 samples the reader was never interrupted inside the spinning function"
    ))?;
    let names: Vec<&str> = trace
        .frames
        .iter()
        .filter_map(|f| f.symbol.as_deref())
        .map(|s| s.split('+').next().unwrap_or(s))
        .collect();
    check!(
        trace.reliable && names.contains(&"seq_read_iter"),
        "{series}: interrupted in kbuild-built code, the trace must be reliable and reach \
         its callers: {names:?}\n{trace:?}"
    );
    eprintln!("{series}: interrupted in the new code: {names:?}");
    verb(&mut g, "disable", "spin")?;
    g.poweroff().map(|_| ())
}

/// Issue 28, acceptance 2: patch code is a module the guest knows. A WARN_ON in it
/// prints a WARNING naming the patch function and the guest goes on; a read through a
/// bad user pointer returns -EFAULT, through the kernel's get_user and through the
/// patch's own exception table; /proc/PID/stack of a task asleep in it names it. The
/// module shows in /proc/modules and /proc/kallsyms, the guest cannot unload it, and
/// lpvmm's unload takes every trace away. A static branch (`__jump_table`) is still
/// refused, naming section and function, changing nothing.
fn guest_module(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("kbgm-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let before = checksums(&mut g)?;
    let file = g.host.file(&kp(series, "bad-jump"));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file}"))?;
    let want = "section __jump_table (needed by lpvmm_jump_cmdline_proc_show)";
    check!(rc != 0 && out.contains(want), "{series}: bad-jump: {out}");
    check!(
        checksums(&mut g)? == before,
        "{series}: refused bad-jump changed the guest"
    );

    apply(&mut g, series, "guest-module")?;
    let read = g.run("cat /proc/cmdline")?;
    check!(
        read.contains("lpvmm-gm get_user=-14 unsafe_get_user=-14"),
        "{series}: reads through a bad user pointer: {read}"
    );
    let modules = g.run("grep '^lpvmm:kbuild_gm ' /proc/modules; true")?;
    check!(
        modules.contains(" 1 lpvmm, Live 0x") && modules.trim_end().ends_with("(K)"),
        "{series}: /proc/modules: {modules}"
    );
    let syms = g.run(
        "grep -c ' t lpvmm_gm_cmdline_proc_show.\\[lpvmm:kbuild_gm\\]' /proc/kallsyms; true",
    )?;
    check!(syms.trim() == "1", "{series}: /proc/kallsyms: {syms}");
    let rmmod = g.run("rmmod lpvmm:kbuild_gm 2>&1; rmmod -f lpvmm:kbuild_gm 2>&1; true")?;
    check!(
        rmmod.matches("Resource temporarily unavailable").count() == 2,
        "{series}: rmmod and rmmod -f of the patch's module: {rmmod}"
    );
    check!(
        g.run("grep -c '^lpvmm:kbuild_gm ' /proc/modules; true")?
            .trim()
            == "1",
        "{series}: the guest unloaded the patch's module: {rmmod}"
    );

    // A WARN_ON in patch code: a WARNING naming it, and the read still completes.
    g.run("dmesg -c >/dev/null")?;
    let warned =
        g.run("sh -c 'printf gmwarn > /proc/self/comm; read -r l < /proc/cmdline; echo \"$l\"'")?;
    let log = g.run("dmesg")?;
    let warning = log.lines().find(|l| l.contains("WARNING:")).unwrap_or("");
    check!(
        warning.contains("lpvmm_gm_cmdline_proc_show+")
            && warning.contains("[lpvmm:kbuild_gm]")
            && warned.contains("lpvmm-gm get_user=-14"),
        "{series}: WARN_ON in patch code:\n{warned}\n{log}"
    );
    check!(
        log.contains("Modules linked in:") && log.contains("lpvmm:kbuild_gm(K"),
        "{series}: the WARNING's module list: {log}"
    );

    // A task asleep in patch code: the guest's own unwinder goes through it.
    let pid = g.spawn("sh -c 'printf gmsleep > /proc/self/comm; read -r l < /proc/cmdline' &")?;
    let (_, stack) = patchtest::guest_stack_naming(&mut g, pid, "msleep")?;
    let frames: Vec<&str> = stack
        .lines()
        .filter_map(|l| l.trim().split_once("] "))
        .map(|(_, f)| f)
        .collect();
    let at = frames
        .iter()
        .position(|f| f.starts_with("lpvmm_gm_cmdline_proc_show+"));
    check!(
        at.is_some_and(|i| frames[i].ends_with("[lpvmm:kbuild_gm]")
            && frames[i + 1..]
                .iter()
                .any(|f| f.starts_with("seq_read_iter+"))),
        "{series}: /proc/{pid}/stack of a task asleep in patch code:\n{stack}"
    );
    g.run(&format!("kill {pid}; wait {pid} 2>/dev/null; true"))?;

    // lpvmm's unload takes it all away.
    verb(&mut g, "disable", "kbuild-gm")?;
    let (rc, out) = g.lpvmm("patch unload {vm} kbuild-gm")?;
    check!(rc == 0, "{series}: unload: {out}");
    let left = g.run("grep -c 'lpvmm:kbuild_gm' /proc/modules /proc/kallsyms; true")?;
    check!(
        left.lines().all(|l| l.ends_with(":0")),
        "{series}: traces of the unloaded patch's module: {left}"
    );
    static_keys_followed(&mut g, series)?;
    // Since the log was cleared: no splat but the patch's own WARNING and its trace.
    let splats = g.run(SPLATS)?;
    check!(
        splats.lines().all(|l| l.contains("Call Trace")
            || (l.contains("WARNING: CPU") && l.contains("lpvmm_gm_cmdline_proc_show"))),
        "{series}: guest warnings other than the patch's own WARN_ON:\n{splats}"
    );
    g.poweroff().map(|_| ())
}

/// A tracepoint in patch code (`tracepoint.c`: a static branch on its key and a static
/// call) follows the guest's switch: its event is in the guest's trace only while the
/// guest has the event enabled.
fn static_keys_followed(g: &mut Guest, series: &str) -> TestResult {
    apply(g, series, "tracepoint")?;
    let ev = format!("{T}/events/printk/console/enable");
    g.run(&format!(
        "mount -t tracefs nodev {T} 2>/dev/null; test -w {ev}"
    ))?;
    let events = |g: &mut Guest, on: u8| -> Result<usize, String> {
        g.run(&format!("echo {on} > {ev}; echo > {T}/trace"))?;
        let read = g.run("cat /proc/cmdline")?;
        check!(
            read.contains("lpvmm-tp"),
            "{series}: the tracepoint patch: {read}"
        );
        let n = g.run(&format!(
            "echo 0 > {ev}; grep -c lpvmm-tp-event {T}/trace; true"
        ))?;
        Ok(n.trim().parse().unwrap_or(0))
    };
    let off = events(g, 0)?;
    let on = events(g, 1)?;
    let off_again = events(g, 0)?;
    check!(
        (off, on, off_again) == (0, 1, 0),
        "{series}: events traced from patch code with the event off, on, off: \
         {off}, {on}, {off_again} (want 0, 1, 0)"
    );
    verb(g, "disable", "kbuild-tp").map(|_| ())
}

/// Acceptance 5: `--kernel` with a release Debian does not have, or without the network
/// for an uncached one, fails clearly; a cached release builds offline.
fn kernel_errors() -> TestResult {
    let tmp = std::env::temp_dir().join(format!("lpvmm-kbuild-test-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let out = tmp.join("x.kp");
    let src = sample("loadavg");
    let (rc, msg) = kp_build(&src, &out, "9.9.9-1-nosuch-amd64", &[]);
    check!(
        rc != 0 && msg.contains("Debian has no package linux-headers-9.9.9-1-nosuch-amd64"),
        "an unknown release: {msg}"
    );
    // No route to the registry: apt reads this file last, so its proxy wins.
    let apt = tmp.join("apt.conf");
    std::fs::write(
        &apt,
        "Acquire::http::Proxy \"http://127.0.0.1:9\";\nAcquire::https::Proxy \"http://127.0.0.1:9\";\nAcquire::Retries \"0\";\n",
    )
    .map_err(|e| e.to_string())?;
    let apt = apt.to_string_lossy().to_string();
    let empty_cache = tmp.join("cache");
    let empty_cache = empty_cache.to_string_lossy().to_string();
    let rel = release("6.1")?;
    let (rc, msg) = kp_build(
        &src,
        &out,
        &rel,
        &[("APT_CONFIG", &apt), ("XDG_CACHE_HOME", &empty_cache)],
    );
    check!(
        rc != 0 && msg.contains("cannot reach Debian's package registry?"),
        "an uncached release without network: {msg}"
    );
    check!(!out.exists(), "a failed build left {}", out.display());
    // The release the suite built before is cached: it builds with the network gone.
    let (rc, msg) = kp_build(&src, &out, &rel, &[("APT_CONFIG", &apt)]);
    check!(
        rc == 0 && msg.contains(&format!("with the kbuild of {rel}")),
        "a cached release offline: {msg}"
    );
    // The build refuses what a load would, at build time already.
    let (rc, msg) = kp_build(&sample("bad-jump"), &out, &rel, &[]);
    check!(
        rc != 0 && msg.contains("__jump_table (needed by lpvmm_jump_cmdline_proc_show)"),
        "kp build of bad-jump: {msg}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

/// The samples' target modules for `rel`, built with its kbuild, stripped of debug
/// information, in a gzip'd cpio at `out/klp-targets.cpio.gz` (as /root/klp/NAME.ko).
fn klp_targets(klp_dir: &Path, rel: &str, out: &Path) -> Result<PathBuf, String> {
    let stage = out.join("klp-targets");
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(stage.join("root/klp")).map_err(|e| e.to_string())?;
    for t in KLP_TARGETS {
        let (bytes, name) = patcher::klp::build::compile_module(&klp_dir.join(t), rel)
            .map_err(|e| format!("kbuild of {t} for {rel}: {e}"))?;
        let ko = stage.join(format!("root/klp/{name}.ko"));
        std::fs::write(&ko, bytes).map_err(|e| e.to_string())?;
        let st = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(&ko)
            .status();
        check!(
            st.is_ok_and(|s| s.success()),
            "objcopy --strip-debug {}",
            ko.display()
        );
    }
    let cpio = out.join("klp-targets.cpio.gz");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . -mindepth 1 -printf '%P\\n' | LC_ALL=C sort | \
             cpio -o -H newc -R 0:0 --quiet | gzip -n > {}",
            stage.display(),
            cpio.display()
        ))
        .status();
    check!(st.is_ok_and(|s| s.success()), "packing {}", cpio.display());
    Ok(cpio)
}

/// Boot a guest of `series` whose initrd also holds the samples' target modules in
/// /root/klp.
fn boot_with_klp_targets<'h>(
    host: &'h mut TestHost,
    name: &str,
    series: &str,
) -> Result<Guest<'h>, String> {
    let initrd = format!("{}/initrd-klp-{series}", host.tmp());
    let (base, targets) = (
        host.image("guest-initrd.cpio.gz"),
        host.file(&kp(series, "klp-targets")),
    );
    host.exec(&format!("cat {base} {targets} > {initrd}"))?;
    Ok(host.boot_guest_initrd(name, series, 2, &initrd, "")?.0)
}

/// Build every sample for both series with the guest's kbuild (the bad ones without
/// lpvmm's checks, as a user's object could arrive).
fn build_patches() -> Result<Vec<(PathBuf, String)>, String> {
    build_lpvmm()?;
    let mut files = Vec::new();
    for series in SERIES {
        let rel = release(series)?;
        let out = repo_root().join(format!("target/lpvmm-test-patches/kbuild/{series}"));
        std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
        for name in SAMPLES {
            let kp_file = out.join(format!("{name}.kp"));
            let (rc, msg) = kp_build(&sample(name), &kp_file, &rel, &[]);
            check!(rc == 0, "kp build {name} --kernel {rel}: {msg}");
            files.push((kp_file, kp(series, name)));
        }
        for (name, as_name, flag) in VARIANTS {
            let kp_file = out.join(format!("{as_name}.kp"));
            let flags: Vec<&str> = flag.split_whitespace().collect();
            let (rc, msg) = kp_build_with(&sample(name), &kp_file, &rel, &[], &flags);
            check!(rc == 0, "kp build {name} {flag} --kernel {rel}: {msg}");
            files.push((kp_file, kp(series, as_name)));
        }
        let klp_dir = patcher::source::source_dir(&rel, "samples/livepatch")
            .map_err(|e| format!("the kernel's samples/livepatch of {rel}: {e}"))?;
        for (file, as_name) in KLP_SAMPLES {
            let kp_file = out.join(format!("{as_name}.ko"));
            let (rc, msg) = kp_build(&klp_dir.join(file), &kp_file, &rel, &[]);
            check!(
                rc == 0 && msg.contains("livepatch module"),
                "kp build {file} --kernel {rel}: {msg}"
            );
            files.push((kp_file, kp(series, as_name)));
        }
        // livepatch-sample in the form klp-convert and kpatch-build give a module.
        let ko = std::fs::read(out.join("klp-sample.ko")).map_err(|e| e.to_string())?;
        let converted = out.join("klp-sample-klp-rela.ko");
        let bytes = lpvmm_tests::klpconvert::klp_convert(&ko, ".text", &["seq_printf"])?;
        std::fs::write(&converted, bytes).map_err(|e| e.to_string())?;
        files.push((converted, kp(series, "klp-sample-klp-rela")));
        files.push((
            klp_targets(&klp_dir, &rel, &out)?,
            kp(series, "klp-targets"),
        ));
        // lpvmm's own livepatch module that it refuses (per-CPU data).
        let kp_file = out.join("klp-percpu.ko");
        let (rc, msg) = kp_build(&sample("klp-percpu"), &kp_file, &rel, &[]);
        check!(rc == 0, "kp build klp-percpu.c --kernel {rel}: {msg}");
        files.push((kp_file, kp(series, "klp-percpu")));
        let diff_out = out.join("diff");
        std::fs::create_dir_all(&diff_out).map_err(|e| e.to_string())?;
        files.extend(diff::build(series, &rel, &diff_out)?);
        for name in BAD {
            let bytes = patcher::kbuild::compile(&sample(name), &rel, &[])
                .map_err(|e| format!("kbuild of {name} for {rel}: {e}"))?;
            let kp_file = out.join(format!("{name}.kp"));
            std::fs::write(&kp_file, bytes).map_err(|e| e.to_string())?;
            files.push((kp_file, kp(series, name)));
        }
    }
    Ok(files)
}

fn main() {
    host_files_or_exit(build_patches());
    let mut trials = series_trials(&[
        ("loadavg_from_kernel_source", loadavg),
        ("current_and_unexported_function", current),
        ("orc_unwinds_kbuild_code", orc),
        ("patch_code_is_a_module_the_guest_knows", guest_module),
        ("getpid_hammered_through_per_task_cycles", getpid_hammered),
        (
            "module_functions_patched_through_tun",
            module_functions_patched,
        ),
        (
            "module_loaded_later_is_patched_at_load",
            module_loaded_later,
        ),
        (
            "module_going_during_a_transition_ends_cleanly",
            module_going_during_a_transition,
        ),
        (
            "dependency_in_one_patch_with_a_module",
            dependency_in_one_patch,
        ),
        ("callbacks_around_transitions", callbacks_around_transitions),
        ("module_callbacks_in_the_loading_task", module_callbacks),
        ("callbacks_that_hang_or_oops", callbacks_that_hang_or_oops),
        (
            "livepatch_modules_applied_from_outside",
            livepatch_modules_from_outside,
        ),
        (
            "livepatch_shadow_samples_fix_the_leak",
            livepatch_shadow_samples,
        ),
        (
            "state_callbacks_run_once_across_a_chain",
            state_callbacks_across_a_chain,
        ),
        (
            "shadow_variables_handed_over_under_load",
            shadow_variables_handed_over,
        ),
        (
            "ftrace_and_kprobes_share_a_redirected_function",
            ftrace_coexists,
        ),
        (
            "upstream_fixes_built_from_diffs_reverted_and_restored",
            diff::fixes_reverted_and_restored,
        ),
    ]);
    trials.push(local_trial("kernel_release_errors", kernel_errors));
    for series in SERIES {
        let tag = series.replace('.', "_");
        trials.push(local_trial(
            format!("diff_build_refusals_{tag}"),
            move || diff::refusals(&release(series)?),
        ));
    }
    run_group(trials)
}
