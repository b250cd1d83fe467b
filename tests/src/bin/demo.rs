//! The main job, for a person to watch: boot the default guest, a Debian system with
//! systemd on a virtio disk and NIC (guest-images/debian.sh), on lpvmm (on real KVM,
//! nested where needed), use its console, look inside its kernel from outside, build a
//! live patch and apply it while its services run (the guest prints the patched text),
//! take it out again, and power the guest off.
//!
//! Run through scripts/demo.sh, which installs and builds everything first.

use std::process::Command;
use std::time::Instant;

use lpvmm_tests::{
    debian, lpvmm_binary, platform_guest_death, platform_host_fault, repo_root, HostMode, TestHost,
    PLATFORM_ATTEMPTS,
};

/// The test host's end of the Debian system's NIC.
const TAP: &str = "lpvdemo0";

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

/// `lpvmm kp build patcher/examples/NAME.c`, here, shown as a person would type it.
fn build_patch(name: &str) -> Result<std::path::PathBuf, String> {
    let out_dir = repo_root().join("target/demo");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let kp = out_dir.join(format!("{name}.kp"));
    let src = repo_root().join(format!("patcher/examples/{name}.c"));
    println!("    $ lpvmm kp build patcher/examples/{name}.c -o target/demo/{name}.kp");
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
    let kp = build_patch("cmdline")?;
    say("... and a per-task patch: patcher/examples/nsleep-cmdline.c (common_nsleep and cmdline_proc_show)");
    let kp2 = build_patch("nsleep-cmdline")?;
    for attempt in 1..=PLATFORM_ATTEMPTS {
        match walk_through(&series, &[kp.clone(), kp2.clone()]) {
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
fn walk_through(series: &str, kps: &[std::path::PathBuf]) -> Result<(), Stopped> {
    say("Starting a host with real KVM");
    let mut files: Vec<_> = kps
        .iter()
        .map(|kp| {
            let name = kp.file_name().unwrap_or_default().to_string_lossy();
            (kp.clone(), format!("/root/{name}"))
        })
        .collect();
    let initrd = debian::host_files(&[series]).map_err(|report| Stopped {
        report,
        by_platform: false,
    })?;
    files.extend(initrd);
    // The host works on its own copy of the image (QEMU's snapshot, or a copy natively).
    let disks = [debian::disk_image()];
    let mut host = TestHost::start_with_disks(false, &files, &disks).map_err(|report| Stopped {
        report,
        by_platform: false,
    })?;
    on_host(&mut host, series).map_err(|report| {
        // Only the platform's own evidence (a command that timed out is not).
        let by_platform = platform_guest_death(&report)
            || platform_host_fault(&report)
            || host.wedged().is_some();
        Stopped {
            report,
            by_platform,
        }
    })
}

/// Wait (up to three minutes) until the guest's transition in progress ends.
fn wait_for_transition(g: &mut lpvmm_tests::Guest) -> Result<(), String> {
    let t0 = Instant::now();
    while t0.elapsed() < std::time::Duration::from_secs(180) {
        if lpvmm_tests::patchtest::status(g)?.active.is_none() {
            println!("    done after {:.0} s", t0.elapsed().as_secs_f64());
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    Err("the transition did not end within 180 s".into())
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
        "lpvmm run: Debian bookworm with systemd, {series} cloud kernel, 2 vCPUs, 1 GiB, \
         virtio disk and NIC"
    ));
    debian::tap_up(host, TAP)?;
    println!(
        "    $ lpvmm run --name demo --kernel vmlinuz --initrd initrd.img --cmdline '{}' \
         --memory 1G --vcpus 2 --disk {} --net {TAP}",
        debian::CMDLINE,
        host.disk(0)
    );
    let t0 = Instant::now();
    let (mut g, ready) = debian::boot(host, "demo", series, (0, TAP), "")?;
    println!(
        "    systemd reached multi-user in {:.1}s: {ready}",
        t0.elapsed().as_secs_f64()
    );

    say("Typing commands at the guest's serial console");
    for cmd in [
        "uname -a",
        "systemctl is-system-running",
        "systemctl list-units --type=service --state=running --no-legend --plain | cut -c1-60",
        "df -h / | tail -1",
        "ip -br addr show",
        "cat /proc/cmdline",
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
    say("lpvmm modules demo   (the modules udev loaded, as /proc/modules shows them)");
    show("host", &g.lpvmm("modules {vm}")?.1);
    say("lpvmm tasks demo   (every task of the running system, read from guest memory; the first 25)");
    let (_, tasks) = g.lpvmm("tasks {vm}")?;
    show(
        "host",
        &tasks.lines().take(25).collect::<Vec<_>>().join("\n"),
    );
    println!("    ... {} lines in all", tasks.lines().count());
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

    let kp = g.host.file("/root/nsleep-cmdline.kp");
    say("Per-task consistency: a task asleep in common_nsleep holds back only itself");
    println!("    guest# sleep 8 &");
    g.spawn("sleep 8 &")?;
    std::thread::sleep(std::time::Duration::from_secs(1));
    say(&format!(
        "lpvmm patch demo {kp} --no-wait   (every other task moves at once; a task asleep \
         in the old common_nsleep moves when it wakes)"
    ));
    show("host", &g.lpvmm(&format!("patch {{vm}} {kp} --no-wait"))?.1);
    say("lpvmm patch status demo   (the tasks the transition waits for, and where they sleep)");
    let (_, status) = g.lpvmm("patch status {vm}")?;
    let transition = status.lines().skip_while(|l| !l.starts_with("transition"));
    show("host", &transition.take(12).collect::<Vec<_>>().join("\n"));
    if status.contains("(cron)") {
        // cron sleeps in clock_nanosleep nearly all the time and goes back to sleep
        // right after it wakes: lpvmm, which moves a task only when a tick finds it
        // outside the old code, hardly ever finds it so (docs/consistency.md, "Tasks
        // that sleep in a patched function"). Stopping it ends that task.
        say(
            "cron sleeps in common_nsleep nearly all the time, and lpvmm moves a task only \
             when it finds it outside the old code: stopping cron lets it go",
        );
        println!("    guest# systemctl stop cron");
        show("guest", &g.run("systemctl stop cron")?);
    }
    say("... waiting for the shell's sleep to wake (8 s)");
    wait_for_transition(&mut g)?;
    show("host", &g.lpvmm("patch list {vm}")?.1);
    println!("    guest# cat /proc/cmdline");
    show("guest", &g.run("cat /proc/cmdline")?);
    say(
        "lpvmm disasm demo common_nsleep   (after the transition: a direct jump, no dispatch left)",
    );
    let (_, d) = g.lpvmm("disasm {vm} common_nsleep")?;
    show("host", &d.lines().take(4).collect::<Vec<_>>().join("\n"));
    show("host", &g.lpvmm("patch disable {vm} nsleep-cmdline")?.1);

    say("guest# poweroff -f");
    let exit = g.poweroff()?;
    drop(g);
    host.exec(&format!("ip link del {TAP} 2>/dev/null; true"))?;
    show("host", &exit.stderr);
    println!("    lpvmm exited with code {}", exit.code);
    say("Done. More: docs/patching.md (writing patches), docs/consistency.md, docs/introspection.md");
    Ok(())
}
