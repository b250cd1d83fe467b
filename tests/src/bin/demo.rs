//! The main job, for a person to watch: boot the default guest on lpvmm (on real KVM,
//! nested where needed), use its console, look inside its kernel from outside, build a
//! live patch and apply it (the guest prints the patched text), take it out again, and
//! power the guest off.
//!
//! Run through scripts/demo.sh, which installs and builds everything first.

use std::process::Command;
use std::time::Instant;

use lpvmm_tests::{
    lpvmm_binary, platform_guest_death, repo_root, HostMode, TestHost, PLATFORM_ATTEMPTS,
};

fn say(s: &str) {
    println!("\n\x1b[1;36m==> {s}\x1b[0m");
}

fn show(label: &str, text: &str) {
    for line in text.trim_matches('\n').lines() {
        println!("    {label}| {line}");
    }
}

fn main() {
    if let Err(e) = demo() {
        eprintln!("\ndemo failed: {e}");
        std::process::exit(1);
    }
}

/// What ended a walk-through early, and whether the nested platform did it (a known
/// guest death, or a test host that stopped answering: docs/testing.md, "Known
/// platform quirks"), in which case a new host is worth a new try.
struct Stopped {
    report: String,
    by_platform: bool,
}

/// `lpvmm kp build patcher/examples/cmdline.c`, here, shown as a person would type it.
fn build_patch() -> Result<std::path::PathBuf, String> {
    let out_dir = repo_root().join("target/demo");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let kp = out_dir.join("cmdline.kp");
    let src = repo_root().join("patcher/examples/cmdline.c");
    println!("    $ lpvmm kp build patcher/examples/cmdline.c -o target/demo/cmdline.kp");
    let out = Command::new(lpvmm_binary())
        .args(["kp", "build"])
        .arg(&src)
        .arg("-o")
        .arg(&kp)
        .output()
        .map_err(|e| format!("lpvmm kp build: {e}"))?;
    show("host", &String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(kp)
}

fn demo() -> Result<(), String> {
    let series = std::env::args().nth(1).unwrap_or_else(|| "6.1".into());
    say("Building the live patch: patcher/examples/cmdline.c (replaces cmdline_proc_show)");
    for line in std::fs::read_to_string(repo_root().join("patcher/examples/cmdline.c"))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with(" *") && !l.starts_with("/*"))
    {
        println!("    | {line}");
    }
    let kp = build_patch()?;
    for attempt in 1..=PLATFORM_ATTEMPTS {
        match walk_through(&series, &kp) {
            Ok(()) => return Ok(()),
            Err(s) if s.by_platform && attempt < PLATFORM_ATTEMPTS => eprintln!(
                "\nWARNING: the nested test platform killed the guest or the test host \
                 (attempt {attempt} of {PLATFORM_ATTEMPTS}; docs/testing.md, \"Known platform \
                 quirks\"); starting again on a new test host. What happened:\n{}",
                s.report
            ),
            Err(s) => return Err(s.report),
        }
    }
    unreachable!("the last attempt returns")
}

/// Start a host with real KVM and walk through everything on it.
fn walk_through(series: &str, kp: &std::path::Path) -> Result<(), Stopped> {
    say("Starting a host with real KVM");
    let files = [(kp.to_path_buf(), "/root/cmdline.kp".to_string())];
    let mut host = TestHost::start_with_files(false, &files).map_err(|report| Stopped {
        report,
        by_platform: false,
    })?;
    on_host(&mut host, series).map_err(|report| {
        let by_platform = platform_guest_death(&report) || !host.answers();
        Stopped {
            report,
            by_platform,
        }
    })
}

fn on_host(host: &mut TestHost, series: &str) -> Result<(), String> {
    match host.mode() {
        HostMode::Native => println!("    this machine's /dev/kvm has VMX/SVM: lpvmm runs here directly"),
        HostMode::Nested => println!(
            "    this machine's /dev/kvm has no VMX/SVM under it (it cannot boot a stock kernel),\n    \
             so lpvmm runs inside a QEMU-TCG test host with an emulated AMD SVM CPU and real KVM"
        ),
    }

    say(&format!(
        "lpvmm run: Debian {series} cloud kernel, 2 vCPUs, 512 MiB, busybox initramfs"
    ));
    let t0 = Instant::now();
    let (mut g, ready) = host.boot_guest("demo", series, 2, "")?;
    println!(
        "    guest reached /init in {:.1}s: {ready}",
        t0.elapsed().as_secs_f64()
    );

    say("Typing commands at the guest's serial console");
    for cmd in [
        "uname -a",
        "nproc",
        "cat /proc/cmdline",
        "grep -i reserved /proc/iomem",
    ] {
        println!("    guest# {cmd}");
        show("guest", &g.run(cmd)?);
    }

    say("lpvmm status demo   (the control socket: /run/lpvmm/demo.sock, mode 0600)");
    show("host", &g.lpvmm("status {vm}")?.1);

    say("lpvmm pause demo, then lpvmm regs demo while every vCPU is parked");
    show("host", &g.lpvmm("pause {vm}")?.1);
    show("host", &g.lpvmm("regs {vm}")?.1);
    show("host", &g.lpvmm("resume {vm}")?.1);
    println!("    guest# echo still running");
    show("guest", &g.run("echo still running")?);

    say("Looking inside the guest kernel from outside: lpvmm kernel demo (no profile, no debug info)");
    show("host", &g.lpvmm("kernel {vm}")?.1);
    g.run("sleep 1000 | cat >/dev/null &")?;
    let pid = g.run("pidof cat")?.trim().to_string();
    say(&format!(
        "lpvmm stack demo {pid}   (a cat blocked on an empty pipe; the guest's own view follows)"
    ));
    show("host", &g.lpvmm(&format!("stack {{vm}} {pid}"))?.1);
    println!("    guest# cat /proc/{pid}/stack");
    show("guest", &g.run(&format!("cat /proc/{pid}/stack"))?);
    g.run("kill %1")?;

    say("Live patching: before");
    println!("    guest# cat /proc/cmdline");
    show("guest", &g.run("cat /proc/cmdline")?);
    let kp = g.host.file("/root/cmdline.kp");
    say(&format!(
        "lpvmm patch demo {kp}   (link into the patch area, check every task's stack, flip)"
    ));
    show("host", &g.lpvmm(&format!("patch {{vm}} {kp}"))?.1);
    println!("    guest# cat /proc/cmdline");
    show("guest", &g.run("cat /proc/cmdline")?);
    say("lpvmm patch status demo");
    show("host", &g.lpvmm("patch status {vm}")?.1);
    say("lpvmm patch disable demo cmdline   (the original bytes go back)");
    show("host", &g.lpvmm("patch disable {vm} cmdline")?.1);
    println!("    guest# cat /proc/cmdline");
    show("guest", &g.run("cat /proc/cmdline")?);

    say("guest# poweroff -f");
    let exit = g.poweroff()?;
    show("host", &exit.stderr);
    println!("    lpvmm exited with code {}", exit.code);
    say("Done. More: docs/patching.md (writing patches), docs/introspection.md");
    Ok(())
}
