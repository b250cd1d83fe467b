//! `bench modload [ROUNDS]`: what lpvmm's module notifier costs the guest's module loads
//! and unloads (issue 25). Per series, one guest (2 vCPUs) times ROUNDS `insmod tun;
//! rmmod tun` pairs inside itself (the kernel's clock from /proc/timer_list's `now at N
//! nsecs` around the loop, busybox's `date` having no %N: no console round trip in the
//! figure) in three phases, back to back:
//! - **none**: no patch with a module part yet, so no notifier on the guest's chain (the
//!   guest's own cost);
//! - **other**: a patch with a part for another module (ethmtu.c, dummy) loaded, not
//!   enabled: the notifier rings for tun and the VMM answers without a pause;
//! - **tun**: tunlate.c (two tun functions) loaded and enabled: each load links tun's
//!   part and redirects its functions in a pause, each unload gives the sites back in
//!   another.
//!
//! Printed: the mean pair per phase, and each against `none`.

use lpvmm_tests::{Guest, TestHost};

use crate::common::kbuild_kp;

/// tun's module file, as the guest image's module list gives it.
const TUN_KO: &str =
    "/lib/modules/$(uname -r)/$(grep -o '[^ ]*/tun[.]ko' /lib/modules/$(uname -r)/lpvmm-modules)";

/// The mean `insmod tun; rmmod tun` pair of `rounds`, in ms (tun unloaded before and
/// after).
fn pairs(g: &mut Guest, rounds: u32) -> Result<f64, String> {
    let out = g.text(&format!(
        "ko={TUN_KO}; now() {{ grep -m1 'now at' /proc/timer_list | tr -dc 0-9; }}; \
         s=$(now); i=0; while [ $i -lt {rounds} ]; do \
         insmod $ko && rmmod tun || break; i=$((i+1)); done; e=$(now); \
         echo \"pairs=$i ns=$((e-s))\""
    ))?;
    let field = |k: &str| -> Option<u64> {
        out.split_whitespace()
            .find_map(|t| t.strip_prefix(k))?
            .parse()
            .ok()
    };
    match (field("pairs="), field("ns=")) {
        (Some(n), Some(ns)) if n == u64::from(rounds) && ns > 0 => {
            Ok(ns as f64 / f64::from(rounds) / 1e6)
        }
        _ => Err(format!("insmod/rmmod loop: {out:?}")),
    }
}

fn lpvmm_ok(g: &mut Guest, args: &str) -> Result<(), String> {
    let (rc, out) = g.lpvmm(args)?;
    match rc {
        0 => Ok(()),
        _ => Err(format!("lpvmm {args}: {out}")),
    }
}

/// The three phases' mean pairs, in ms, in one guest of `series`.
fn phases(host: &mut TestHost, series: &str, rounds: u32) -> Result<[f64; 3], String> {
    let (mut g, _) = host.boot_guest("bench-modload", series, 2, "")?;
    g.run("rmmod tun")?;
    let none = pairs(&mut g, rounds)?;
    let other = g.host.file(&format!("/root/ethmtu-{series}.kp"));
    lpvmm_ok(&mut g, &format!("patch load {{vm}} {other}"))?;
    let ring = pairs(&mut g, rounds)?;
    let tun = g.host.file(&format!("/root/tunlate-{series}.kp"));
    lpvmm_ok(&mut g, &format!("patch {{vm}} {tun}"))?;
    let patched = pairs(&mut g, rounds)?;
    let sees = g.text("dmesg | grep -c 'lpvmm: tun sees lo' || true")?;
    if sees != rounds.to_string() {
        return Err(format!(
            "{series}: tun's init ran the new code {sees} times in {rounds} loads"
        ));
    }
    g.poweroff()?;
    Ok([none, ring, patched])
}

pub fn modload(rounds: u32) -> Result<(), String> {
    let mut files = Vec::new();
    for series in lpvmm_tests::SERIES {
        for sample in ["ethmtu", "tunlate"] {
            files.push((
                kbuild_kp(series, sample)?,
                format!("/root/{sample}-{series}.kp"),
            ));
        }
    }
    let mut host = TestHost::start_with_files(false, &files)?;
    println!("| kernel | pairs | none (ms) | other module's patch (ms) | ratio | tun's patch (ms) | ratio |");
    println!("|---|---|---|---|---|---|---|");
    for series in lpvmm_tests::SERIES {
        let [none, other, tun] = phases(&mut host, series, rounds)?;
        println!(
            "| {series} | {rounds} | {none:.1} | {other:.1} | {:.2} | {tun:.1} | {:.2} |",
            other / none,
            tun / none
        );
    }
    Ok(())
}
