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
        let outside = |g: &mut lpvmm_tests::Guest| -> Result<f64, String> {
            // Size precedes Rss in each mapping's block; the kernel may merge the RAM
            // and patch-area mappings into one.
            let out = g.host.exec(&format!(
                "awk -v ram={} -v area={} '/^Size:/ {{ size = $2 }} /^Rss:/ {{ if (size != ram && size != area && size != ram + area) rss += $2; n++ }} END {{ if (n) print rss; else print \"none\" }}' /proc/{pid}/smaps",
                ram / 1024,
                area / 1024
            ))?;
            out.trim()
                .parse::<f64>()
                .map(|kib| kib / 1024.0)
                .map_err(|_| format!("no Rss lines in /proc/{pid}/smaps: {out}"))
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
