//! Introspection of a running guest, checked against the guest's own view.
//!
//! One test host serves every test here, one test at a time.

use lpvmm_tests::{check, host_trial, run_group, TestHost, TestResult, SERIES};

/// Where x86-64 kernels link `_text` before KASLR moves them.
const LINK_TEXT: u64 = 0xffff_ffff_8100_0000;

/// VMCOREINFO found in guest memory agrees with the guest: its release is `uname -r`,
/// its KASLR offset moves `_text` to where /proc/kallsyms has it, and its symbol
/// addresses are the ones in /proc/kallsyms.
fn vmcoreinfo_matches_guest(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("vmci-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 1, "")?;
    let (rc, out) = g.lpvmm("vmcoreinfo {vm} --json")?;
    check!(rc == 0, "vmcoreinfo failed: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
    let info = &v["info"];

    let release = g.run("uname -r")?;
    check!(
        info["osrelease"].as_str() == Some(release.trim()),
        "OSRELEASE {} != uname -r {release:?}",
        info["osrelease"]
    );

    // Every SYMBOL() entry that /proc/kallsyms also lists must have the same address.
    // swapper_pg_dir is a #define for init_top_pgt, which is the name kallsyms shows.
    let symbols = info["symbols"].as_object().ok_or("no symbols")?;
    let kallsyms_name = |n: &str| {
        if n == "swapper_pg_dir" {
            "init_top_pgt".to_string()
        } else {
            n.to_string()
        }
    };
    let mut names: Vec<String> = symbols.keys().map(|n| kallsyms_name(n)).collect();
    names.push("_text".into());
    let pattern = names.join("|");
    let kallsyms = g.run(&format!("grep -E ' ({pattern})$' /proc/kallsyms"))?;
    let mut matched = 0;
    for line in kallsyms.lines() {
        let mut f = line.split_whitespace();
        let (Some(addr), Some(_), Some(sym)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let addr = u64::from_str_radix(addr, 16).map_err(|e| format!("{line}: {e}"))?;
        check!(
            addr != 0,
            "kallsyms shows zero addresses (kptr_restrict?): {line}"
        );
        if sym == "_text" {
            let offset = info["kernel_offset"].as_u64().unwrap_or(u64::MAX);
            check!(
                LINK_TEXT.wrapping_add(offset) == addr,
                "KERNELOFFSET {offset:#x} puts _text at {:#x}, guest has {addr:#x}",
                LINK_TEXT.wrapping_add(offset)
            );
            continue;
        }
        if sym == "mem_section" {
            // SPARSEMEM_EXTREME: VMCOREINFO carries the pointer's value, not its address.
            continue;
        }
        let ours = symbols
            .iter()
            .find(|(n, _)| kallsyms_name(n) == sym)
            .and_then(|(_, v)| v.as_u64());
        check!(
            ours == Some(addr),
            "SYMBOL({sym}) {ours:x?} != guest {addr:#x}"
        );
        matched += 1;
    }
    eprintln!(
        "{series}: {matched} of {} VMCOREINFO symbols checked against /proc/kallsyms",
        symbols.len()
    );
    check!(
        matched >= 5,
        "only {matched} VMCOREINFO symbols found in /proc/kallsyms:\n{kallsyms}"
    );
    let (_, status) = g.lpvmm("status {vm} --json")?;
    check!(
        status.contains("\"state\": \"running\""),
        "VM left paused: {status}"
    );
    g.poweroff()?;
    Ok(())
}

fn main() {
    let tests = SERIES
        .iter()
        .map(|&series| {
            let tag = series.replace('.', "_");
            host_trial(format!("vmcoreinfo_matches_guest_{tag}"), move |h| {
                vmcoreinfo_matches_guest(h, series)
            })
        })
        .collect();
    run_group(tests)
}
