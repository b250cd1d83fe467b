//! `bench callback [ROUNDS]`: what running a callback in the guest costs (issue 27): the
//! guest's pause to queue it (a cross-CPU call pushed onto CPU 0's queue), against a
//! bare pause of the same guest, and the wall time from queueing it to seeing it
//! return (its IPI, a kworker's wake-up, the callback, lpvmm reading the mailbox every
//! 10 ms). Per series, one guest (2 vCPUs) enables and disables callbacks.kp ROUNDS
//! times: four callbacks a round. There is no peer: the kernel runs its own livepatch
//! callbacks inside the task that enables the patch.
//!
//! Printed: medians of each, and the queueing pause against the bare one.

use lpvmm_tests::stats::median;
use lpvmm_tests::{json, Guest, TestHost};

use crate::common::{bare_pause, kbuild_kp};

/// The callbacks of `lpvmm patch VERB` (or a load-and-enable): their queueing pauses
/// (µs) and round trips (ms).
fn transition(g: &mut Guest, args: &str) -> Result<(Vec<f64>, Vec<f64>), String> {
    let (rc, out) = g.lpvmm(&format!("{args} --json"))?;
    if rc != 0 {
        return Err(format!("lpvmm {args}: {out}"));
    }
    let v = json(&out)?;
    let t = if v["transition"].is_object() {
        &v["transition"]
    } else {
        &v
    };
    let pauses = t["callback_pauses_us"]
        .as_array()
        .ok_or(format!("{args}: no callback pauses in {out}"))?
        .iter()
        .filter_map(|x| x.as_f64())
        .collect::<Vec<_>>();
    let trips = t["callbacks"]
        .as_array()
        .ok_or(format!("{args}: no callbacks in {out}"))?
        .iter()
        .filter_map(|c| c["ms"].as_f64())
        .collect::<Vec<_>>();
    if pauses.len() != 2 || trips.len() != 2 {
        return Err(format!("{args}: want two callbacks: {out}"));
    }
    Ok((pauses, trips))
}

fn one_series(host: &mut TestHost, series: &str, rounds: u32) -> Result<[f64; 3], String> {
    let (mut g, _) = host.boot_guest("bench-callback", series, 2, "")?;
    let file = g.host.file(&format!("/root/callbacks-{series}.kp"));
    let (mut bare, mut pauses, mut trips) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let enable = match round {
            0 => format!("patch {{vm}} {file}"),
            _ => "patch enable {vm} callbacks".to_string(),
        };
        for args in [enable.as_str(), "patch disable {vm} callbacks"] {
            let (p, t) = transition(&mut g, args)?;
            pauses.extend(p);
            trips.extend(t);
            bare.push(bare_pause(&mut g)?);
        }
    }
    eprintln!("{series}: bare {bare:?} queue pauses {pauses:?} round trips {trips:?}");
    g.poweroff()?;
    Ok([median(&bare), median(&pauses), median(&trips)])
}

pub fn callback(rounds: u32) -> Result<(), String> {
    let mut files = Vec::new();
    for series in lpvmm_tests::SERIES {
        files.push((
            kbuild_kp(series, "callbacks")?,
            format!("/root/callbacks-{series}.kp"),
        ));
    }
    let mut host = TestHost::start_with_files(false, &files)?;
    println!(
        "| kernel | callbacks | bare pause (µs) | queueing pause (µs) | ratio | round trip (ms) |"
    );
    println!("|---|---|---|---|---|---|");
    for series in lpvmm_tests::SERIES {
        let [bare, pause, trip] = one_series(&mut host, series, rounds)?;
        println!(
            "| {series} | {} | {bare:.0} | {pause:.0} | {:.2} | {trip:.1} |",
            4 * rounds,
            pause / bare
        );
    }
    Ok(())
}
