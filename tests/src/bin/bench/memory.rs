//! `bench memory`: the VMM's resident memory outside guest RAM and the patch area,
//! before and after the first attach.

use lpvmm_tests::{json, TestHost};

/// The lpvmm process of a guest and the guest memory it maps, from `lpvmm status`.
pub struct LpvmmMemory {
    pub pid: u64,
    /// Guest RAM and the patch area, in bytes.
    pub ram: u64,
    pub patch_area: u64,
}

pub fn lpvmm_memory(g: &mut lpvmm_tests::Guest) -> Result<LpvmmMemory, String> {
    let (_, status) = g.lpvmm("status {vm} --json")?;
    let st = json(&status)?;
    let field = |k: &str| st[k].as_u64().ok_or(format!("status has no {k}: {status}"));
    Ok(LpvmmMemory {
        pid: field("pid")?,
        ram: field("memory_bytes")?,
        patch_area: field("patch_area_size")?,
    })
}

/// The resident memory of process `pid` on the host, in MiB, leaving out its mappings
/// of exactly `skip_kib` KiB each (guest memory, whatever the VMM). Size precedes Rss
/// in each mapping's block of /proc/PID/smaps.
pub fn rss_outside(g: &mut lpvmm_tests::Guest, pid: u64, skip_kib: &[u64]) -> Result<f64, String> {
    let skip: Vec<String> = skip_kib.iter().map(|k| k.to_string()).collect();
    let out = g.host.exec(&format!(
        "awk -v skip='{}' 'BEGIN {{ k = split(skip, s, \" \"); for (i = 1; i <= k; i++) g[s[i]] = 1 }} \
         /^Size:/ {{ size = $2 }} /^Rss:/ {{ if (!(size in g)) rss += $2; n++ }} \
         END {{ if (n) print rss + 0; else print \"none\" }}' /proc/{pid}/smaps",
        skip.join(" ")
    ))?;
    out.trim()
        .parse::<f64>()
        .map(|kib| kib / 1024.0)
        .map_err(|_| format!("no Rss lines in /proc/{pid}/smaps: {out}"))
}

/// The VMM's own memory, as a user would measure it: the resident set of the lpvmm
/// process from /proc/PID/smaps, leaving out the mappings of guest RAM and of the patch
/// area (guest memory, whatever the VMM), before the first attach and after it.
pub fn vmm_memory() -> Result<(), String> {
    let mut host = TestHost::start()?;
    println!("| kernel | guest RAM (MiB) | VMM RSS outside guest memory, before attach (MiB) | after attach (MiB) | attach adds (MiB) |");
    println!("|---|---|---|---|---|");
    for series in lpvmm_tests::SERIES {
        let (mut g, _) = host.boot_guest("bench", series, 2, "")?;
        let LpvmmMemory {
            pid,
            ram,
            patch_area: area,
        } = lpvmm_memory(&mut g)?;
        let outside = |g: &mut lpvmm_tests::Guest| {
            // The kernel may merge the RAM and patch-area mappings into one.
            rss_outside(g, pid, &[ram / 1024, area / 1024, (ram + area) / 1024])
        };
        let before = outside(&mut g)?;
        eprintln!(
            "{series}, before attach:\n{}",
            largest_mappings(&mut g, pid)?
        );
        let (rc, out) = g.lpvmm("kernel {vm}")?;
        if rc != 0 {
            return Err(out);
        }
        let after = outside(&mut g)?;
        eprintln!(
            "{series}, after attach:\n{}",
            largest_mappings(&mut g, pid)?
        );
        println!(
            "| {series} | {} | {before:.1} | {after:.1} | {:.1} |",
            ram >> 20,
            after - before
        );
        g.poweroff()?;
    }
    Ok(())
}

/// The ten mappings of process `pid` with the most resident memory: KiB, size and name
/// (what the RSS outside guest memory is made of).
fn largest_mappings(g: &mut lpvmm_tests::Guest, pid: u64) -> Result<String, String> {
    g.host.exec(&format!(
        "awk '/^[0-9a-f]+-[0-9a-f]+ / {{ name = ($6 == \"\") ? \"[anon]\" : $6 }} \
         /^Size:/ {{ size = $2 }} /^Rss:/ {{ if ($2 > 0) print $2, size, name }}' \
         /proc/{pid}/smaps | sort -rn | head -10"
    ))
}
