//! The Debian system (issue 26): a real guest, Debian bookworm with systemd and udev on a
//! virtio disk and NIC (guest-images/debian.sh), booted once per kernel series and
//! shared by every check of it, as an operator's guest would be: lpvmm's views of it
//! against its own, 50 per-task enable/disable cycles of a patch on its block path
//! while files are written and checked on its disk and a stream to the test host is
//! checked on the wire, then a reboot from inside it that brings the patches back.
//!
//! One test host serves both series; each series boots on its own copy of the image.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use lpvmm_tests::patchtest::{self, patch_path};
use lpvmm_tests::{
    check, debian, host_disks, host_files_or_exit, images_dir, kill_children, lpvmm_binary,
    repo_root, run_group, series_trials, views, Guest, TestHost, TestResult, SPLATS,
};

/// The test host's end of the guest's NIC.
const TAP: &str = "lpvsys0";
/// Enable/disable cycles of the block-path patch under the workloads (acceptance 2).
const CYCLES: u32 = 50;
/// How long a boot of the system may take to reach multi-user on the nested host.
const SYSTEM_BOOT: Duration = Duration::from_secs(600);
/// What `uname -v` says once patcher/examples/uname.c is in effect.
const UNAME_PATCHED: &str = "lpvmm-live-patched";

fn blk_stem(series: &str) -> String {
    format!("blkcomplete-{series}")
}

/// The system, booted: multi-user reached (its console's ready line says what
/// `systemctl is-system-running --wait` said) with the uname patch given by `--patch`.
fn boot_system<'h>(host: &'h mut TestHost, series: &str) -> Result<Guest<'h>, String> {
    let tag = series.replace('.', "_");
    debian::tap_up(host, TAP)?;
    // Each series boots on the host's disk of its own (see main).
    let disk = lpvmm_tests::SERIES
        .iter()
        .position(|s| *s == series)
        .ok_or_else(|| format!("no disk for series {series}"))?;
    let uname = format!("--patch {}", host.file(&patch_path("uname")));
    let t0 = Instant::now();
    let (mut g, ready) = debian::boot(host, &format!("debian-{tag}"), series, (disk, TAP), &uname)?;
    eprintln!(
        "{series}: the Debian system is up after {:.0} s: {ready}",
        t0.elapsed().as_secs_f64()
    );
    if !ready.contains("system=running") {
        let failed = g.run("systemctl --failed --no-legend --plain; true")?;
        return Err(format!(
            "{series}: systemd does not say the system is running: {ready}\nfailed units:\n{failed}"
        ));
    }
    Ok(g)
}

/// Acceptance 1: systemd reports multi-user reached, udev loaded the virtio drivers
/// from the initramfs and the system's own modules, the NIC has its address, the SSH
/// server listens on it, and the `--patch` patch is in effect.
fn multi_user(g: &mut Guest, series: &str) -> TestResult {
    let target = g.text("systemctl is-active multi-user.target")?;
    check!(
        target == "active",
        "{series}: multi-user.target is {target}"
    );
    let modules = g.run("cut -d' ' -f1 /proc/modules")?;
    for m in ["virtio_mmio", "virtio_blk", "virtio_net"] {
        check!(
            modules.lines().any(|l| l.trim() == m),
            "{series}: {m} not loaded:\n{modules}"
        );
    }
    let (rc, out) = g.run_status(
        &format!("busybox ping -c 2 -W 5 {}", debian::HOST_IP),
        Duration::from_secs(60),
    )?;
    check!(
        rc == 0,
        "{series}: the system cannot reach the test host: {out}"
    );
    // A service on the network: the SSH server listens, as systemd started it.
    let sshd = g.text("systemctl is-active ssh.service; ss -Hltn 'sport = :22' | wc -l")?;
    check!(
        sshd.lines().next() == Some("active") && sshd.lines().nth(1).is_some_and(|n| n != "0"),
        "{series}: sshd is not active and listening: {sshd}"
    );
    patchtest::wait_applied_at_boot(g, &[("uname", "applied at boot (--patch")])?;
    check!(
        g.text("uname -v")? == UNAME_PATCHED,
        "{series}: the --patch patch is not in effect"
    );
    let counts = g.text(
        "echo $(ls -d /proc/[0-9]* 2>/dev/null | wc -l) processes, \
         $(ls -d /proc/[0-9]*/task/[0-9]* 2>/dev/null | wc -l) threads, $(systemctl list-units --type=service --state=running --no-legend | wc -l) \
         services running, $(wc -l < /proc/modules) modules",
    )?;
    let took = g.text("systemd-analyze 2>/dev/null | head -1")?;
    eprintln!("{series}: multi-user: {counts}; {took}");
    Ok(())
}

/// Acceptance 1: `lpvmm tasks`, `stack`, `modules` and `sym --all` equal the guest's own
/// views of a running systemd system.
fn views_equal(g: &mut Guest, series: &str) -> TestResult {
    let summary = views::tasks_equal(g, series, 2)?;
    eprintln!("{series}: {summary}");
    let stacks = views::stacks_equal(g, series)?;
    check!(
        stacks.compared >= 50,
        "{series}: only {} sleeping tasks' stacks compared ({} skipped)",
        stacks.compared,
        stacks.skipped
    );
    eprintln!(
        "{series}: lpvmm stack equals /proc/PID/stack for all {} sleeping tasks ({} running \
         or changing, skipped)",
        stacks.compared, stacks.skipped
    );
    let modules = views::modules_equal(g, series)?;
    let n = views::kallsyms_equal(g, series)?;
    eprintln!("{series}: lpvmm modules equals /proc/modules ({modules} modules); sym --all equals /proc/kallsyms ({n} entries)");
    Ok(())
}

/// The disk workload: files of random data written, fsynced, read back from the disk
/// (the page cache dropped) and checked, until /tmp/stop; its tally in /tmp/disk.log.
const DISK_WORKLOAD: &str = "rm -f /tmp/stop; (i=0; bad=0; while [ ! -e /tmp/stop ]; do \
    f=/var/tmp/w$((i % 4)); dd if=/dev/urandom of=$f bs=256k count=4 conv=fsync 2>/dev/null; \
    s=$(sha256sum < $f); echo 1 > /proc/sys/vm/drop_caches; \
    [ \"$(sha256sum < $f)\" = \"$s\" ] || bad=$((bad + 1)); i=$((i + 1)); done; \
    echo \"disk: files=$i bad=$bad\" > /tmp/disk.log) >/dev/null 2>&1 &";
/// The network workload: the same MiB of random data sent to the test host over and
/// over, each send a connection of its own, until /tmp/stop; its tally in /tmp/net.log.
/// busybox's `nc` ends a send only once the listener closed, after writing every byte
/// it received: a send that succeeded is one the host has whole.
fn net_workload() -> String {
    let host_ip = debian::HOST_IP;
    format!(
        "head -c 1048576 /dev/urandom > /dev/shm/s; (n=0; refused=0; while [ ! -e /tmp/stop ]; do \
         if busybox nc {host_ip} 5001 < /dev/shm/s 2>/dev/null; then n=$((n + 1)); \
         else refused=$((refused + 1)); sleep 1; fi; done; \
         echo \"net: sent=$n refused=$refused\" > /tmp/net.log) >/dev/null 2>&1 &"
    )
}

/// The test host's end of the stream: one listener after another, each received
/// stream's sha256 a line of `sums`; the loop's pid in `listener.pid`. A listener's
/// stdin must stay open (busybox nc half-closes the connection when its stdin ends, and
/// the sender stops at the FIN that brings) and must not outlive it (a `sleep |` would
/// hold up the loop until the sleep ends): a FIFO the loop itself holds open for
/// writing gives every listener a stdin that never ends nor reads anything.
fn net_listener(dir: &str) -> String {
    format!(
        "rm -f {dir}/sums {dir}/stop {dir}/fifo; mkfifo {dir}/fifo; \
         (exec 3<>{dir}/fifo; while [ ! -e {dir}/stop ]; do \
         nc -l -p 5001 <&3 > {dir}/got 2>/dev/null; \
         [ -s {dir}/got ] && sha256sum < {dir}/got >> {dir}/sums; done) >/dev/null 2>&1 & \
         echo $! > {dir}/listener.pid"
    )
}

/// A number after `key=` in a workload's tally line.
fn tally(log: &str, key: &str) -> Option<u64> {
    log.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
}

/// Acceptance 2: 50 per-task enable/disable cycles of a patch on vmlinux's block path
/// (patcher/examples/kbuild/blkcomplete.c) while both workloads run: every cycle
/// completes, no file read back differs from what was written, every stream reaches
/// the test host intact, and the guest logs no warning.
fn cycles_under_workloads(g: &mut Guest, series: &str) -> TestResult {
    let boot_splats = g.run(SPLATS)?;
    patchtest::apply(g, &blk_stem(series))?;
    let dir = g.host.tmp();
    g.host.exec(&net_listener(&dir))?;
    g.run(DISK_WORKLOAD)?;
    g.run(&net_workload())?;
    let sent_sum = g.text("sha256sum < /dev/shm/s | cut -d' ' -f1")?;
    let t0 = Instant::now();
    let (rc, out) =
        patchtest::verb_cycles(g, "blkcomplete", ["disable", "enable"], u64::from(CYCLES))?;
    let took = t0.elapsed().as_secs_f64();
    g.run("touch /tmp/stop; wait")?;
    check!(
        rc == 0 && out.contains(&format!("cycles={CYCLES}")),
        "{series}: the enable/disable loop stopped: {out}\n{}",
        g.vmm_stderr()
    );
    let disk = g.text("cat /tmp/disk.log")?;
    let net = g.text("cat /tmp/net.log")?;
    check!(
        tally(&disk, "files=").unwrap_or(0) > 0 && tally(&disk, "bad=") == Some(0),
        "{series}: disk workload: {disk}"
    );
    let sent = tally(&net, "sent=").unwrap_or(0);
    check!(sent > 0, "{series}: nothing sent to the test host: {net}");
    let host_side = g
        .host
        .exec(&format!("ls -l {dir}/got {dir}/sums 2>&1; true"))?;
    let sums = received_sums(g, &dir, sent)?;
    let bad = sums.iter().filter(|s| **s != sent_sum).count();
    check!(
        sums.len() as u64 == sent && bad == 0,
        "{series}: the guest sent {sent} streams of sha256 {sent_sum} ({net}); the host got {} \
         ({bad} differing); {disk}; cycles took {took:.0} s; on the host:\n{host_side}",
        sums.len()
    );
    let patched =
        g.text("dmesg | grep -c 'lpvmm-blk: a request completed on the patched path' || true")?;
    check!(
        patched.parse::<u64>().unwrap_or(0) > 0,
        "{series}: no request ever completed on the patched path"
    );
    let new = lpvmm_tests::new_splats(g, &boot_splats)?;
    check!(
        new.is_empty(),
        "{series}: new kernel warnings:\n{}",
        new.join("\n")
    );
    let s = patchtest::status(g)?;
    let enables = patchtest::patch_of(&s, "blkcomplete")?.enables;
    check!(
        enables == u64::from(CYCLES) + 1,
        "{series}: {enables} enables recorded"
    );
    eprintln!(
        "{series}: {CYCLES} per-task enable/disable cycles of blkcomplete in {took:.0} s under \
         load: {disk}, {net}, all {sent} streams intact on the host, {patched} patched-path \
         log lines"
    );
    Ok(())
}

/// The sha256 of every stream the test host received, once it has `sent` of them (or
/// after a minute), the listener then stopped.
fn received_sums(g: &mut Guest, dir: &str, sent: u64) -> Result<Vec<String>, String> {
    let mut sums = Vec::new();
    for _ in 0..60 {
        let out = g.host.exec(&format!("cat {dir}/sums 2>/dev/null; true"))?;
        sums = out
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        if sums.len() as u64 >= sent {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    // The loop's child (the listener), then the loop sees `stop`.
    g.host.exec(&format!(
        "touch {dir}/stop; {}; true",
        kill_children(&format!("$(cat {dir}/listener.pid)"), "TERM")
    ))?;
    Ok(sums)
}

/// Acceptance 3: `systemctl reboot` inside the system: the VM comes back, to
/// multi-user again, with the `--patch` patch and the one loaded before the reboot in
/// effect (`uname -v`; requests completing on the patched block path), and a file
/// written before the reboot intact.
fn reboot_and_check(g: &mut Guest, series: &str) -> TestResult {
    g.run("head -c 4194304 /dev/urandom > /root/keep && sync")?;
    let sum = g.text("sha256sum < /root/keep")?;
    g.run("dmesg -C")?;
    let t0 = Instant::now();
    g.type_at_prompt("systemctl reboot")?;
    let ready = g.console().wait_line("LPVMM-GUEST-READY", SYSTEM_BOOT)?;
    g.console()
        .wait_str(lpvmm_tests::PROMPT, Duration::from_secs(60))?;
    g.send("\n")?;
    eprintln!(
        "{series}: back after the reboot in {:.0} s: {ready}",
        t0.elapsed().as_secs_f64()
    );
    check!(
        ready.contains("system=running"),
        "{series}: not running after the reboot: {ready}"
    );
    patchtest::wait_applied_at_boot(
        g,
        &[
            ("uname", "applied at boot (--patch"),
            ("blkcomplete", "applied again after reboot 1"),
        ],
    )?;
    check!(
        g.text("uname -v")? == UNAME_PATCHED,
        "{series}: the --patch patch is not in effect after the reboot"
    );
    g.run(
        "dd if=/dev/urandom of=/var/tmp/after bs=256k count=8 conv=fsync 2>/dev/null; \
         echo 1 > /proc/sys/vm/drop_caches; cat /var/tmp/after > /dev/null",
    )?;
    let patched = g.text("dmesg | grep -c 'lpvmm-blk: a request completed' || true")?;
    check!(
        patched.parse::<u64>().unwrap_or(0) > 0,
        "{series}: the block-path patch loaded before the reboot is not in effect after it"
    );
    let after = g.text("sha256sum < /root/keep")?;
    check!(
        after == sum,
        "{series}: /root/keep holds {after} after the reboot, {sum} before"
    );
    let dmesg = g.run("dmesg | grep -E 'WARNING: CPU|BUG:|Oops|cut here' ; true")?;
    let splat = ["WARNING: CPU", "BUG:", "Oops", "cut here"];
    check!(
        !dmesg.lines().any(|l| splat.iter().any(|w| l.contains(w))),
        "{series}: the rebooted system logged:\n{dmesg}"
    );
    let (_, human) = g.lpvmm("patch status {vm}")?;
    check!(
        human.contains("the guest rebooted 1 time(s) in this VM")
            && human.contains("applied again after reboot 1"),
        "{series}: patch status does not tell the reboot:\n{human}"
    );
    let err = g.vmm_stderr();
    check!(
        err.contains(&format!(
            "VM '{}' starts it again (reboot 1; 2 patch(es)",
            g.name
        )),
        "{series}: lpvmm did not say it restarted the guest:\n{err}"
    );
    Ok(())
}

/// The Debian system of one series: every check above on one boot of it.
fn debian_system(host: &mut TestHost, series: &str) -> TestResult {
    let mut g = boot_system(host, series)?;
    multi_user(&mut g, series)?;
    views_equal(&mut g, series)?;
    cycles_under_workloads(&mut g, series)?;
    reboot_and_check(&mut g, series)?;
    g.poweroff()?;
    drop(g);
    host.exec(&format!("ip link del {TAP} 2>/dev/null; true"))?;
    Ok(())
}

/// The patches (uname, and the block-path patch built with each series' kbuild) and
/// the system's initrds, for the test host.
fn host_files() -> Result<Vec<(PathBuf, String)>, String> {
    patchtest::build_lpvmm()?;
    let out = repo_root().join("target/lpvmm-test-patches");
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    let uname = out.join("uname.kp");
    patchtest::kp_build(&repo_root().join("patcher/examples/uname.c"), &uname, &[])?;
    let mut files = vec![(uname, patch_path("uname"))];
    let images = images_dir();
    for series in lpvmm_tests::SERIES {
        let release = std::fs::read_to_string(images.join(format!("guest-{series}/release")))
            .map_err(|e| format!("guest-{series}/release: {e} (run guest-images/build.sh)"))?;
        let kp = out.join(format!("{}.kp", blk_stem(series)));
        patchtest::run_cmd(
            std::process::Command::new(lpvmm_binary())
                .args(["kp", "build"])
                .arg(repo_root().join("patcher/examples/kbuild/blkcomplete.c"))
                .arg("-o")
                .arg(&kp)
                .args(["--kernel", release.trim()]),
        )?;
        files.push((kp, patch_path(&blk_stem(series))));
    }
    files.extend(debian::host_files(&lpvmm_tests::SERIES)?);
    Ok(files)
}

fn main() {
    host_files_or_exit(host_files());
    // One copy of the image per series (each boots, writes and reboots on its own).
    host_disks(lpvmm_tests::SERIES.map(|_| debian::disk_image()).to_vec());
    run_group(series_trials(&[("debian_system", debian_system)]))
}
