//! `bench pause [CYCLES] [VCPUS,...]`: pause/resume latency with 1, 2, 4 and 8 vCPUs
//! (or the counts named), seccomp on and off.

use lpvmm_tests::{json, TestHost};

use crate::common::counts;

/// The vCPU counts of a comma-separated list (`1,2,4,8` when absent).
pub fn vcpu_counts(list: Option<String>) -> Result<Vec<u8>, String> {
    counts(list, "1,2,4,8", 1, 32, "vCPU count")
}

/// Pause/resume latency for each vCPU count, the guest running two busy loops, with
/// lpvmm's seccomp filters on (the default) and off, side by side. More vCPUs than the
/// test host's 2 CPUs are overcommitted: parking then waits for vCPU threads the host
/// has not scheduled, which is part of what the figure shows.
pub fn pause(cycles: u32, vcpu_counts: &[u8]) -> Result<(), String> {
    let mut host = TestHost::start()?;
    println!("| vCPUs | seccomp | park median (us) | park p99 (us) | resume median (us) | resume p99 (us) | pause round trip median (us) |");
    println!("|---|---|---|---|---|---|---|");
    for &vcpus in vcpu_counts {
        for (seccomp, extra) in [("on", ""), ("off", "--no-seccomp")] {
            // A guest that dies is a row of its own: the other rows still count.
            let v = match pause_one(&mut host, vcpus, extra, cycles) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("{vcpus} vCPUs, seccomp {seccomp}: {e}");
                    let why = e.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
                    println!("| {vcpus} | {seccomp} | guest died: {why} |");
                    if !host.answers() {
                        eprintln!("the test host stopped answering: starting another");
                        host = TestHost::start()?;
                    }
                    continue;
                }
            };
            let f = |k: &str, q: &str| v[k][q].as_f64().unwrap_or(f64::NAN);
            println!(
                "| {vcpus} | {seccomp} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                f("park", "median_us"),
                f("park", "p99_us"),
                f("resume", "median_us"),
                f("resume", "p99_us"),
                f("pause_round_trip", "median_us"),
            );
        }
    }
    Ok(())
}

/// One guest of `vcpus` (`extra`: more `lpvmm run` arguments), two busy loops in it,
/// `lpvmm bench pause` over `cycles`: its JSON.
fn pause_one(
    host: &mut TestHost,
    vcpus: u8,
    extra: &str,
    cycles: u32,
) -> Result<serde_json::Value, String> {
    let (mut g, _) = host.boot_guest("bench", "6.1", vcpus, extra)?;
    // A busy guest: parking must interrupt running vCPUs, not just idle ones.
    g.run("(while :; do :; done) & (while :; do :; done) &")?;
    let (rc, out) = g.lpvmm(&format!("bench pause {{vm}} --cycles {cycles} --json"))?;
    if rc != 0 {
        let tmp = g.host.tmp();
        let log = g
            .host
            .exec(&format!("sleep 2; cat {tmp}/bench.err"))
            .unwrap_or_default();
        let console = g.console().drain();
        let tail = &console[console.len().saturating_sub(3000)..];
        return Err(format!(
            "{out}\nlpvmm stderr:\n{log}\nguest console:\n{tail}"
        ));
    }
    let v = json(&out)?;
    g.poweroff()?;
    Ok(v)
}
