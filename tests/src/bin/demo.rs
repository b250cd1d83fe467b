//! The main job, for a person to watch: boot the default guest on lpvmm (on real KVM,
//! nested where needed), use its console, pause it and read its registers, power it off.
//!
//! Run through scripts/demo.sh, which installs and builds everything first.

use std::time::Instant;

use lpvmm_tests::{HostMode, TestHost};

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

fn demo() -> Result<(), String> {
    let series = std::env::args().nth(1).unwrap_or_else(|| "6.1".into());
    say("Starting a host with real KVM");
    let mut host = TestHost::start()?;
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
    let (mut g, ready) = host.boot_guest("demo", &series, 2, "")?;
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

    say("lpvmm bench pause demo --cycles 100   (guest keeps running between pauses)");
    show("host", &g.lpvmm("bench pause {vm} --cycles 100")?.1);

    say("guest# poweroff -f");
    let exit = g.poweroff()?;
    show("host", &exit.stderr);
    println!("    lpvmm exited with code {}", exit.code);
    say("Done. Live patching comes next: see docs/getting-started.md");
    Ok(())
}
