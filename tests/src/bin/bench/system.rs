//! `bench system [RUNS] [SERIES]`: the Debian system (guest-images/debian.sh) on lpvmm
//! against QEMU microvm, same image, kernel, initramfs, memory, vCPUs and device kinds
//! (virtio-blk and virtio-net over virtio-mmio described in ACPI; QEMU's net without
//! vhost, as lpvmm's): boot to multi-user, sequential disk write and read, network
//! throughput from the test host to the guest, and the VMM's memory outside guest RAM.
//! RUNS interleaved runs of each VMM per kernel series.

use std::time::{Duration, Instant};

use lpvmm_tests::debian::{self, CMDLINE, GUEST_IP};
use lpvmm_tests::stats::median;
use lpvmm_tests::{Guest, TestHost};

use crate::memory::{lpvmm_memory, rss_outside};

const TAP: &str = "lpvbench0";
/// As tests/system.rs and the demo boot it (lpvmm_tests::debian::boot).
const MEMORY_MIB: u64 = 1024;
/// Sizes of the throughput runs: large enough that a run takes seconds on the nested
/// host, small enough that RUNS of them fit in minutes.
const DISK_MIB: u32 = 64;
const NET_MIB: u32 = 16;
const BOOT_LIMIT: Duration = Duration::from_secs(600);

/// One run's figures.
#[derive(Debug, Clone, Copy)]
struct Run {
    boot_s: f64,
    write_mib_s: f64,
    read_mib_s: f64,
    net_mib_s: f64,
    /// Resident memory of the VMM process outside guest RAM (and lpvmm's patch area).
    vmm_mib: f64,
}

fn lpvmm_cmd(host: &TestHost, series: &str, name: &str) -> String {
    format!(
        "{} run --name {name} --kernel {} --initrd {} --memory {MEMORY_MIB}M --vcpus 2 \
         --cmdline '{CMDLINE}' --disk {} --net {TAP}",
        host.lpvmm(),
        host.guest_kernel(series),
        host.file(&debian::initrd_on_host(series)),
        host.disk(0),
    )
}

fn qemu_cmd(host: &TestHost, series: &str) -> String {
    format!(
        "qemu-system-x86_64-microvm -M microvm,rtc=on -accel kvm -cpu host -m {MEMORY_MIB}M \
         -smp 2 -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
         -kernel {} -initrd {} -append '{CMDLINE}' \
         -drive id=d0,file={},format=raw,if=none -device virtio-blk-device,drive=d0 \
         -netdev tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off \
         -device virtio-net-device,netdev=n0",
        host.guest_kernel(series),
        host.file(&debian::initrd_on_host(series)),
        host.disk(0),
    )
}

/// Seconds `dd` says it took ("... copied, 2.345 s, 57.2 MB/s").
fn dd_seconds(out: &str) -> Result<f64, String> {
    out.lines()
        .filter(|l| l.contains(" copied, "))
        .find_map(|l| {
            l.split(", ")
                .find_map(|p| p.strip_suffix(" s")?.parse().ok())
        })
        .ok_or_else(|| format!("no time in dd's output: {out}"))
}

/// Sequential write (fsynced) and read (page cache dropped) of a file on the disk.
fn disk_mib_s(g: &mut Guest) -> Result<(f64, f64), String> {
    let w = g.run(&format!(
        "dd if=/dev/zero of=/var/tmp/big bs=1M count={DISK_MIB} conv=fsync 2>&1"
    ))?;
    g.run("echo 3 > /proc/sys/vm/drop_caches")?;
    let r = g.run("dd if=/var/tmp/big of=/dev/null bs=1M 2>&1; rm -f /var/tmp/big")?;
    let mib = f64::from(DISK_MIB);
    Ok((mib / dd_seconds(&w)?, mib / dd_seconds(&r)?))
}

/// The test host sends NET_MIB to a listener in the guest: from the host's `nc` starting
/// to the guest's listener having every byte (it counts them).
fn net_mib_s(g: &mut Guest) -> Result<f64, String> {
    let dir = g.host.tmp();
    g.host.exec(&format!(
        "dd if=/dev/urandom of={dir}/net.bin bs=1M count={NET_MIB} 2>/dev/null"
    ))?;
    g.run("rm -f /tmp/net.count; (sleep 600 | busybox nc -l -p 5002 | wc -c > /tmp/net.count &)")?;
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    g.host
        .exec(&format!("nc {GUEST_IP} 5002 < {dir}/net.bin"))?;
    let want = u64::from(NET_MIB) << 20;
    for _ in 0..600 {
        let n = g.text("cat /tmp/net.count 2>/dev/null || echo 0")?;
        if n.trim().parse::<u64>().unwrap_or(0) == want {
            return Ok(f64::from(NET_MIB) / t0.elapsed().as_secs_f64());
        }
        if !n.trim().is_empty() && n.trim() != "0" {
            return Err(format!("the guest received {n} bytes of {want}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err("the guest's listener never finished".into())
}

/// One VMM's run: boot, workloads, memory, then power off.
fn one_run(host: &mut TestHost, name: &str, cmd: &str, lpvmm: bool) -> Result<Run, String> {
    let t0 = Instant::now();
    let mut g = host.start_console_program(name, cmd)?;
    let ready = g.console().wait_line("LPVMM-GUEST-READY", BOOT_LIMIT)?;
    let boot_s = t0.elapsed().as_secs_f64();
    if !ready.contains("system=running") {
        return Err(format!("{name}: not running after boot: {ready}"));
    }
    g.console()
        .wait_str(lpvmm_tests::PROMPT, Duration::from_secs(60))?;
    g.send("\n")?;
    let (write_mib_s, read_mib_s) = disk_mib_s(&mut g)?;
    let net_mib_s = net_mib_s(&mut g)?;
    let vmm_mib = if lpvmm {
        let m = lpvmm_memory(&mut g)?;
        let (ram, area) = (m.ram / 1024, m.patch_area / 1024);
        rss_outside(&mut g, m.pid, &[ram, area, ram + area])?
    } else {
        let pid = g.host.exec("pidof qemu-system-x86_64-microvm")?;
        let pid = pid
            .trim()
            .parse()
            .map_err(|_| format!("no QEMU pid: {pid}"))?;
        rss_outside(&mut g, pid, &[MEMORY_MIB * 1024])?
    };
    g.run("sync")?;
    g.poweroff()?;
    Ok(Run {
        boot_s,
        write_mib_s,
        read_mib_s,
        net_mib_s,
        vmm_mib,
    })
}

fn medians(runs: &[Run]) -> Run {
    let m = |f: fn(&Run) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    Run {
        boot_s: m(|r| r.boot_s),
        write_mib_s: m(|r| r.write_mib_s),
        read_mib_s: m(|r| r.read_mib_s),
        net_mib_s: m(|r| r.net_mib_s),
        vmm_mib: m(|r| r.vmm_mib),
    }
}

pub fn system(runs: u32, series: &[&str]) -> Result<(), String> {
    let files = debian::host_files(series)?;
    let mut host = TestHost::start_with_disks(true, &files, &[debian::disk_image()])?;
    debian::tap_up(&mut host, TAP)?;
    println!("| kernel | figure | lpvmm | QEMU microvm | lpvmm / QEMU |");
    println!("|---|---|---|---|---|");
    for s in series {
        let (lp, qemu) = (lpvmm_cmd(&host, s, "bench"), qemu_cmd(&host, s));
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            ours.push(one_run(&mut host, "bench", &lp, true)?);
            theirs.push(one_run(&mut host, "bench-qemu", &qemu, false)?);
        }
        eprintln!("{s}: lpvmm {ours:?}\n{s}: QEMU {theirs:?}");
        let (l, q) = (medians(&ours), medians(&theirs));
        for (what, a, b) in [
            ("boot to multi-user (s)", l.boot_s, q.boot_s),
            ("disk write, fsynced (MiB/s)", l.write_mib_s, q.write_mib_s),
            (
                "disk read, cache dropped (MiB/s)",
                l.read_mib_s,
                q.read_mib_s,
            ),
            (
                "network, test host to guest (MiB/s)",
                l.net_mib_s,
                q.net_mib_s,
            ),
            ("VMM memory outside guest RAM (MiB)", l.vmm_mib, q.vmm_mib),
        ] {
            println!("| {s} | {what} | {a:.2} | {b:.2} | {:.2} |", a / b);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::dd_seconds;

    #[test]
    fn dd_says_how_long_it_took() {
        let out = "64+0 records in\n64+0 records out\n\
                   67108864 bytes (67 MB, 64 MiB) copied, 3.10417 s, 21.6 MB/s\n";
        assert_eq!(dd_seconds(out), Ok(3.10417));
        assert!(dd_seconds("dd: error writing '/var/tmp/big': No space left").is_err());
    }
}
