//! What several benchmarks share, kept in one place so that they measure alike: the
//! lpvmm and QEMU command lines of the same guest, the patches and livepatch modules
//! they build, the guest-side steps more than one of them takes (timed reads,
//! per-task transitions and their completion, spawned tasks, bare pauses), and the
//! "ours against theirs, interleaved" loop.

use std::time::{Duration, Instant};

use lpvmm::DEFAULT_CMDLINE;
use lpvmm_tests::stats::median;
use lpvmm_tests::{json, Guest, TestHost};

/// Command lines for the same guest on lpvmm (as NAME) and on QEMU's microvm machine,
/// its closest match to a minimal VMM: same kernel, initrd, memory, vCPUs and command
/// line.
pub fn lpvmm_and_qemu(host: &TestHost, name: &str, series: &str, vcpus: u8) -> (String, String) {
    let kernel = host.guest_kernel(series);
    let initrd = host.image("guest-initrd.cpio.gz");
    let lpvmm = format!(
        "{} run --name {name} --kernel {kernel} --initrd {initrd} --memory 512M --vcpus {vcpus}",
        host.lpvmm()
    );
    (lpvmm, qemu_microvm(host, series, vcpus, &initrd))
}

/// QEMU's microvm command line for the guest of `series` with `initrd`.
pub fn qemu_microvm(host: &TestHost, series: &str, vcpus: u8, initrd: &str) -> String {
    let kernel = host.guest_kernel(series);
    format!(
        "qemu-system-x86_64-microvm -M microvm,rtc=on -accel kvm -cpu host -m 512M -smp {vcpus} \
         -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
         -kernel {kernel} -initrd {initrd} -append '{DEFAULT_CMDLINE}'"
    )
}

/// Whether `bench deaths` records the test host's KVM trace (`LPVMM_BENCH_HOST_TRACE=1`;
/// tests/src/hostkvm.rs says what it holds).
pub fn host_traced() -> bool {
    std::env::var_os("LPVMM_BENCH_HOST_TRACE").is_some()
}

/// The numbers of a comma-separated list (`default` when absent), each in [lo, hi].
pub fn counts<T>(
    list: Option<String>,
    default: &str,
    lo: T,
    hi: T,
    what: &str,
) -> Result<Vec<T>, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    let list = list.unwrap_or_else(|| default.into());
    list.split(',')
        .map(|s| match s.trim().parse::<T>() {
            Ok(n) if n >= lo && n <= hi => Ok(n),
            _ => Err(format!(
                "not a {what} from {lo} to {hi}: '{s}' (in '{list}')"
            )),
        })
        .collect()
}

/// Build a sample patch here with `lpvmm kp build`.
pub fn kp_build(sample: &str) -> Result<std::path::PathBuf, String> {
    let dir = lpvmm_tests::repo_root().join("target/bench");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let out = dir.join(format!("{sample}.kp"));
    let src = lpvmm_tests::repo_root().join(format!("patcher/examples/{sample}.c"));
    let st = std::process::Command::new(lpvmm_tests::lpvmm_binary())
        .args(["kp", "build"])
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err(format!("lpvmm kp build {sample} failed"));
    }
    Ok(out)
}

/// The guest's livepatch module for a series, as an initrd addition.
pub fn livepatch_cpio(series: &str) -> Result<std::path::PathBuf, String> {
    let out = lpvmm_tests::repo_root().join(format!("target/bench/livepatch-{series}.cpio.gz"));
    let st = std::process::Command::new("bash")
        .arg(lpvmm_tests::repo_root().join("guest-images/livepatch-module.sh"))
        .arg(series)
        .arg(&out)
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err(format!("livepatch-module.sh {series} failed"));
    }
    Ok(out)
}

/// `lpvmm kp build --kernel RELEASE` of a kbuild sample for `series`.
pub fn kbuild_kp(series: &str, sample: &str) -> Result<std::path::PathBuf, String> {
    let root = lpvmm_tests::repo_root();
    let release =
        std::fs::read_to_string(lpvmm_tests::images_dir().join(format!("guest-{series}/release")))
            .map_err(|e| e.to_string())?;
    let dir = root.join(format!("target/bench/kbuild-{series}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let out = dir.join(format!("{sample}.kp"));
    let st = std::process::Command::new(lpvmm_tests::lpvmm_binary())
        .args(["kp", "build"])
        .arg(root.join(format!("patcher/examples/kbuild/{sample}.c")))
        .arg("-o")
        .arg(&out)
        .args(["--kernel", release.trim()])
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err(format!(
            "lpvmm kp build {sample} --kernel {} failed",
            release.trim()
        ));
    }
    Ok(out)
}

/// The guest initrd with the livepatch modules of `series` appended (livepatch_cpio,
/// copied to the test host as /root/lp-SERIES.cpio.gz), on the test host.
pub fn initrd_with_livepatch(host: &mut TestHost, series: &str) -> Result<String, String> {
    let initrd = format!("{}/initrd-lp-{series}", host.tmp());
    let (base, lp) = (
        host.image("guest-initrd.cpio.gz"),
        host.file(&format!("/root/lp-{series}.cpio.gz")),
    );
    host.exec(&format!("cat {base} {lp} > {initrd}"))?;
    Ok(initrd)
}

/// Microseconds per read of /proc/cmdline in a bash loop (builtin read: no fork), the
/// median of `reps` runs of `n` reads, measured in the guest.
pub fn per_read_us(g: &mut lpvmm_tests::Guest, n: u32, reps: u32) -> Result<f64, String> {
    let mut v = Vec::new();
    for _ in 0..reps {
        let out = g.run(&format!(
            "a=$EPOCHREALTIME; for ((i=0;i<{n};i++)); do read -r x < /proc/cmdline; done; b=$EPOCHREALTIME; echo \"$a $b\""
        ))?;
        let t: Vec<f64> = out
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if let [a, b] = t[..] {
            v.push((b - a) * 1e6 / f64::from(n));
        }
    }
    Ok(median(&v))
}

pub fn transition_of(out: &str) -> Result<serde_json::Value, String> {
    let v = json(out)?;
    if v["outcome"] != "done" {
        return Err(format!("transition did not complete: {out}"));
    }
    Ok(v)
}

/// Milliseconds from `a=$EPOCHREALTIME` to `b=...` as the guest printed them.
pub fn guest_ms(out: &str) -> Result<f64, String> {
    let t: Vec<f64> = out
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    match t[..] {
        [a, b] => Ok((b - a) * 1e3),
        _ => Err(format!("guest timing: {out}")),
    }
}

/// One lpvmm per-task enable of nsleep-cmdline, from the command to every task
/// switched (client-side), then disable and unload. With `blocker`, a `sleep 5` is
/// inside common_nsleep when it starts.
pub fn lpvmm_completion_ms(
    g: &mut lpvmm_tests::Guest,
    kp: &str,
    name: &str,
    blocker: bool,
) -> Result<f64, String> {
    let holder = sleeper_if(g, blocker)?;
    let t0 = Instant::now();
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {kp} --json"))?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    transition_of(&out)?;
    if rc != 0 {
        return Err(out);
    }
    g.lpvmm(&format!("patch disable {{vm}} {name}"))?;
    g.lpvmm(&format!("patch unload {{vm}} {name}"))?;
    reap(g, holder)?;
    Ok(ms)
}

/// With `blocker`, a `sleep 5` in the guest, left half a second to fall asleep in
/// `common_nsleep`; its pid.
pub fn sleeper_if(g: &mut lpvmm_tests::Guest, blocker: bool) -> Result<Option<i64>, String> {
    if !blocker {
        return Ok(None);
    }
    let pid = g.spawn("sleep 5 &")?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(Some(pid))
}

/// Wait for the sleeper of [`sleeper_if`] to end (only it: other background jobs, such
/// as the `spawn` of `bench completion`, run on).
pub fn reap(g: &mut lpvmm_tests::Guest, holder: Option<i64>) -> Result<(), String> {
    if let Some(pid) = holder {
        g.run(&format!("wait {pid}; true"))?;
    }
    Ok(())
}

/// The same fix as the guest's own livepatch module `module`: insmod until its
/// transition is done (measured in the guest), then disable and rmmod.
pub fn livepatch_completion_ms(
    g: &mut lpvmm_tests::Guest,
    module: &str,
    blocker: bool,
) -> Result<f64, String> {
    let sys = format!("/sys/kernel/livepatch/{module}");
    let holder = sleeper_if(g, blocker)?;
    let out = g.run_status(
        &format!(
            "a=$EPOCHREALTIME; insmod /root/{module}.ko && while [ \"$(cat {sys}/transition)\" = 1 ]; do :; done; b=$EPOCHREALTIME; echo \"$a $b\""
        ),
        Duration::from_secs(120),
    )?;
    let ms = guest_ms(&out.1)?;
    let check = g.run("cat /proc/cmdline")?;
    if check.trim() != "this has been live patched" {
        return Err(format!("the livepatch module did not patch: {check}"));
    }
    g.run(&format!(
        "echo 0 > {sys}/enabled; while [ -d {sys} ]; do sleep 0.1; done; rmmod {module}"
    ))?;
    reap(g, holder)?;
    Ok(ms)
}

/// Start `spawn N` in the guest (N extra processes asleep in `pause()`) and wait until
/// all of them exist; they run on until `kill $(pidof spawn)`.
pub fn spawn_tasks(g: &mut lpvmm_tests::Guest, extra: u32) -> Result<(), String> {
    // A guest's threads-max scales with its RAM: about 4,000 in 512 MiB, so the 5,000-task
    // rows raise it (fork said EAGAIN, and the wait below used to run into its timeout).
    let out = g.run(&format!(
        "echo 16384 > /proc/sys/kernel/threads-max; spawn {extra} >/tmp/spawn.out 2>&1 & p=$!; \
         while ! grep -q spawned /tmp/spawn.out 2>/dev/null; do \
         kill -0 $p 2>/dev/null || {{ echo spawn-failed; cat /tmp/spawn.out; break; }}; sleep 1; done"
    ))?;
    if out.contains("spawn-failed") {
        return Err(format!("spawn {extra} failed in the guest: {out}"));
    }
    Ok(())
}

/// A per-task enable of `kp` held by a `sleep 1000` in the old code: the sleeper's pid
/// and the transition in progress (`active` of `patch status`), which must be switching.
pub fn held_per_task(
    g: &mut lpvmm_tests::Guest,
    kp: &str,
) -> Result<(i64, serde_json::Value), String> {
    let holder = g.spawn("sleep 1000 &")?;
    std::thread::sleep(Duration::from_millis(300));
    let (rc, out) = g.lpvmm(&format!("patch {{vm}} {kp} --no-wait"))?;
    if rc != 0 {
        return Err(out);
    }
    std::thread::sleep(Duration::from_millis(500));
    let (_, st) = g.lpvmm("patch status {vm} --json")?;
    let active = json(&st)?["active"].clone();
    if active["phase"] != "switching" {
        return Err(format!("the per-task transition was not held: {st}"));
    }
    Ok((holder, active))
}

/// Bare pause + resume inside the VMM (µs), as `lpvmm pause` and `resume` report them.
pub fn bare_pause_us(g: &mut lpvmm_tests::Guest) -> Result<f64, String> {
    let (_, p) = g.lpvmm("pause {vm} --json")?;
    let (_, r) = g.lpvmm("resume {vm} --json")?;
    let parked = json(&p)?["parked_ns"].as_f64().unwrap_or(f64::NAN);
    let resumed = json(&r)?["resumed_ns"].as_f64().unwrap_or(f64::NAN);
    Ok((parked + resumed) / 1e3)
}

/// Wait up to 60 s for the transition in progress to end.
pub fn wait_no_transition(g: &mut lpvmm_tests::Guest) -> Result<(), String> {
    let t0 = Instant::now();
    loop {
        let (_, st) = g.lpvmm("patch status {vm} --json")?;
        if json(&st)?["active"].is_null() {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!("the transition did not end: {st}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The kernel series named on the command line, or both when none is.
pub fn series_or_both(arg: Option<String>) -> Result<Vec<&'static str>, String> {
    match arg {
        None => Ok(lpvmm_tests::SERIES.to_vec()),
        Some(a) => lpvmm_tests::SERIES
            .iter()
            .find(|s| **s == a)
            .map(|s| vec![*s])
            .ok_or_else(|| format!("no kernel series '{a}' (one of {:?})", lpvmm_tests::SERIES)),
    }
}

/// RUNS rounds of `ours` then `theirs` on the same `x`, interleaved so that drift in the
/// host affects both alike: each one's results in round order.
pub fn interleaved<X>(
    runs: u32,
    x: &mut X,
    mut ours: impl FnMut(&mut X) -> Result<f64, String>,
    mut theirs: impl FnMut(&mut X) -> Result<f64, String>,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        a.push(ours(x)?);
        b.push(theirs(x)?);
    }
    Ok((a, b))
}

/// RUNS interleaved completions of the same fix: lpvmm's per-task enable of `kp`
/// (`(file, patch name)`, [`lpvmm_completion_ms`]) and the guest's livepatch module
/// `module` ([`livepatch_completion_ms`]), each with a blocker or not.
pub fn completions(
    g: &mut lpvmm_tests::Guest,
    runs: u32,
    (kp, name): (&str, &str),
    module: &str,
    blocker: bool,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    interleaved(
        runs,
        g,
        |g| lpvmm_completion_ms(g, kp, name, blocker),
        |g| livepatch_completion_ms(g, module, blocker),
    )
}

/// One bare pause, in µs.
pub fn bare_pause(g: &mut Guest) -> Result<f64, String> {
    let (rc, out) = g.lpvmm("regs {vm} --json")?;
    if rc != 0 {
        return Err(format!("regs: {out}"));
    }
    json(&out)?["paused_us"]
        .as_f64()
        .ok_or(format!("regs: no pause in {out}"))
}
