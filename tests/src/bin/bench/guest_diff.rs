//! `bench guest-diff [SERIES]`: what lpvmm's and QEMU's guests see of their platform
//! (CPU flags, KVM features in the boot log), side by side.

use lpvmm_tests::TestHost;

use crate::common::lpvmm_and_qemu;

/// What each VMM's guest sees of its platform, side by side: the CPU flags, and the
/// lines of its boot log about KVM's paravirtual features, clocks, APICs and ACPI (for
/// the guests lpvmm loses while they fork and QEMU does not: benchmarks.md, "Guests
/// lost while forking"). `bench guest-diff [SERIES]`, 6.1 by default.
pub fn guest_diff(series: Option<String>) -> Result<(), String> {
    let mut host = TestHost::start_with(true)?;
    let series = series.unwrap_or_else(|| lpvmm_tests::SERIES[0].to_string());
    let (lpvmm, qemu) = lpvmm_and_qemu(&host, "gdiff", &series, 2);
    let mut flags = Vec::new();
    for (vmm, name, cmd) in [
        ("lpvmm", "gdiff", lpvmm),
        ("QEMU microvm", "gdiff-qemu", qemu),
    ] {
        let (mut g, _) = host
            .start_and_wait_ready(name, &cmd)
            .map_err(|f| format!("{vmm}: {}", f.report()))?;
        let f = g.text("grep -m1 '^flags' /proc/cpuinfo")?;
        // Without the timestamps, so that the lines are not taken for console noise.
        let log = g.text(
            "dmesg | grep -iE 'kvm|clocksource|tsc|apic|tlb|pv|hpet|acpi|smpboot|fpu|spectre|mds|retbleed|srso|8259|extint|spurious|overflow|trap|segfault|#nm' | cut -c16-; \
             cat /proc/interrupts",
        )?;
        println!("## {vmm} ({series})\n\n```\n{log}\n```\n");
        flags.push(
            f.split_whitespace()
                .skip(2)
                .map(String::from)
                .collect::<std::collections::BTreeSet<String>>(),
        );
        g.poweroff()?;
    }
    let only = |a: usize, b: usize| {
        flags[a]
            .difference(&flags[b])
            .cloned()
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("CPU flags only lpvmm's guest has: {}", only(0, 1));
    println!("CPU flags only QEMU's guest has: {}", only(1, 0));
    Ok(())
}
