//! `bench calls [ROUNDS]`: ns per getpid(2) call in the guest: unpatched, through
//! lpvmm's dispatch, after it (a direct jump), and through the guest's livepatch.

use lpvmm_tests::stats::{median, median_range, min_max};
use lpvmm_tests::TestHost;

use crate::common::{
    held_per_task, initrd_with_livepatch, kbuild_kp, livepatch_cpio, wait_no_transition,
};

/// Nanoseconds per getpid(2) call in one `callcost` run (101 batches of 10,000 calls,
/// every result checked): the median batch, and the fastest, the one that the nested
/// host's preemptions and the guest's interrupts disturbed least.
#[derive(Clone, Copy, Debug)]
struct CallSample {
    median_ns: f64,
    fastest_ns: f64,
}

fn ns_per_call(g: &mut lpvmm_tests::Guest) -> Result<CallSample, String> {
    let out = g.run("callcost -n 10000 -b 101")?;
    let line = out
        .lines()
        .find(|l| l.starts_with("callcost: OK"))
        .ok_or(format!("callcost failed: {out}"))?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .ok_or(format!("callcost printed no {name}: {out}"))
    };
    Ok(CallSample {
        median_ns: field("median_ns=")?,
        fastest_ns: field("min_ns=")?,
    })
}

/// Issue 12's in-guest call cost: ns per getpid(2) call with `__x64_sys_getpid`
/// unpatched; patched by lpvmm to the same body, through its dispatch while a `sleep` in
/// the old common_nsleep holds the per-task transition (getpid-nsleep, kbuild-built);
/// after the transition (a direct jump); and by the guest's own livepatch of the same
/// change (lpvmm_lp_getpid.ko, an ftrace handler). ROUNDS rounds, interleaved.
pub fn calls(rounds: u32) -> Result<(), String> {
    let mut files = Vec::new();
    for series in lpvmm_tests::SERIES {
        files.push((
            kbuild_kp(series, "getpid-nsleep")?,
            format!("/root/getpid-nsleep-{series}.kp"),
        ));
        files.push((
            livepatch_cpio(series)?,
            format!("/root/lp-{series}.cpio.gz"),
        ));
    }
    let mut host = TestHost::start_with_files(false, &files)?;
    let mut rows = Vec::new();
    for series in lpvmm_tests::SERIES {
        let initrd = initrd_with_livepatch(&mut host, series)?;
        let (mut g, _) = host.boot_guest_initrd("bench", series, 2, &initrd, "")?;
        let kp = g.host.file(&format!("/root/getpid-nsleep-{series}.kp"));
        g.lpvmm("kernel {vm}")?;
        let mut c = CallCosts::default();
        for _ in 0..rounds {
            c.unpatched.push(ns_per_call(&mut g)?);
            let (holder, _) = held_per_task(&mut g, &kp)?;
            c.dispatch.push(ns_per_call(&mut g)?);
            g.run(&format!("kill {holder}; wait {holder}; true"))?;
            wait_no_transition(&mut g)?;
            c.direct.push(ns_per_call(&mut g)?);
            for op in ["disable", "unload"] {
                let (rc, out) = g.lpvmm(&format!("patch {op} {{vm}} getpid-nsleep"))?;
                if rc != 0 {
                    return Err(out);
                }
            }
            let sys = "/sys/kernel/livepatch/lpvmm_lp_getpid";
            g.run(&format!(
                "insmod /root/lpvmm_lp_getpid.ko && while [ \"$(cat {sys}/transition)\" = 1 ]; do sleep 0.1; done"
            ))?;
            c.livepatch.push(ns_per_call(&mut g)?);
            g.run(&format!(
                "echo 0 > {sys}/enabled; while [ -d {sys} ]; do sleep 0.1; done; rmmod lpvmm_lp_getpid"
            ))?;
        }
        eprintln!("{series}: {c:?}");
        rows.push(c.line(series, "median batch", |s| s.median_ns));
        rows.push(c.line(series, "fastest batch", |s| s.fastest_ns));
        g.poweroff()?;
    }
    println!("| kernel | statistic of a run | unpatched (ns/call) | lpvmm through dispatch (ns/call) | lpvmm after, direct jump (ns/call) | livepatch (ns/call) | dispatch / unpatched | direct / unpatched | livepatch / unpatched | lpvmm direct / livepatch |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    Ok(())
}

/// `bench calls`: one `callcost` run per case and round.
#[derive(Debug, Default)]
struct CallCosts {
    unpatched: Vec<CallSample>,
    dispatch: Vec<CallSample>,
    direct: Vec<CallSample>,
    livepatch: Vec<CallSample>,
}

impl CallCosts {
    /// The row: each case's median (min–max over rounds), then the ratios of medians
    /// with, in brackets, the range of the same ratio taken round by round.
    fn line(&self, series: &str, what: &str, stat: fn(&CallSample) -> f64) -> String {
        let values = |v: &[CallSample]| v.iter().map(stat).collect::<Vec<f64>>();
        let (unpatched, dispatch, direct, livepatch) = (
            values(&self.unpatched),
            values(&self.dispatch),
            values(&self.direct),
            values(&self.livepatch),
        );
        let ratio = |a: &[f64], b: &[f64]| {
            let per_round: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
            let (lo, hi) = min_max(&per_round);
            format!("{:.3} ({lo:.3}–{hi:.3})", median(a) / median(b))
        };
        format!(
            "| {series} | {what} | {} | {} | {} | {} | {} | {} | {} | {} |",
            median_range(&unpatched, 1),
            median_range(&dispatch, 1),
            median_range(&direct, 1),
            median_range(&livepatch, 1),
            ratio(&dispatch, &unpatched),
            ratio(&direct, &unpatched),
            ratio(&livepatch, &unpatched),
            ratio(&direct, &livepatch),
        )
    }
}
