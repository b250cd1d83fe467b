//! `bench pause-deaths [CYCLES] [SERIES]` (issue 11, item 4): whether lpvmm's pause
//! kills guests more often than QEMU's own (`stop`/`cont` over QMP), with the same
//! guest, load and test host, in interleaved boots of PAUSE_DEATH_BATCH cycles each,
//! CYCLES per VMM and series.

use std::time::Duration;

use lpvmm_tests::stats::median;
use lpvmm_tests::{json, BootFailure, TestHost};

use crate::common::lpvmm_and_qemu;

/// Pause/resume cycles per guest boot in `pause-deaths`.
const PAUSE_DEATH_BATCH: u32 = 1000;

/// The load both guests run while they are paused and resumed: both vCPUs busy, and the
/// shell reading every task's /proc files (the mix under which nested guests died).
const PAUSE_LOAD: &str = "rm -f /tmp/ls; (while [ ! -e /tmp/ls ]; do :; done) & \
    (while [ ! -e /tmp/ls ]; do :; done) & \
    (while [ ! -e /tmp/ls ]; do cat /proc/[0-9]*/stat >/dev/null 2>&1; done) &";

/// How one boot of `pause-deaths` ended.
enum PauseRound {
    /// The guest answered after every cycle; median pause in µs.
    Survived(f64),
    DiedBooting(String),
    Died(String),
    /// The test host stopped answering or held a VMM it was told to kill: it is
    /// replaced, and the boot counted as the platform's.
    HostLost(String),
}

/// One VMM's side of `pause-deaths` for one series.
#[derive(Default)]
struct PauseTally {
    cycles: u32,
    boots: u32,
    died_booting: u32,
    died: u32,
    host_lost: u32,
    /// Median pause of each boot that survived, µs.
    pause_us: Vec<f64>,
}

/// Issue 11, item 4: CYCLES pause/resume cycles per VMM and series (`only`: that series
/// alone), in interleaved boots.
pub fn pause_deaths(cycles: u32, only: Option<String>) -> Result<(), String> {
    let qmp = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .with_file_name("qmp-cycles");
    let files = [(qmp, "/usr/bin/qmp-cycles".to_string())];
    let mut host = TestHost::start_with_files(true, &files)?;
    let series_list: Vec<&str> = match &only {
        Some(s) => vec![s.as_str()],
        None => lpvmm_tests::SERIES.to_vec(),
    };
    println!("| kernel | VMM | pause/resume cycles | boots | died booting | died paused or after | test host lost | deaths per 10,000 cycles | median pause (us) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for series in series_list {
        let mut tally: [PauseTally; 2] = Default::default();
        while tally.iter().any(|t| t.cycles < cycles) {
            for (i, vmm) in ["lpvmm", "QEMU microvm"].into_iter().enumerate() {
                let n = PAUSE_DEATH_BATCH.min(cycles - tally[i].cycles);
                if n == 0 {
                    continue;
                }
                // Built per boot: a replaced test host has its own paths.
                let (lpvmm, qemu) = lpvmm_and_qemu(&host, "pdeath", series, 2);
                let sock = format!("{}/qmp.sock", host.tmp());
                let (name, cmd) = match i {
                    0 => ("pdeath", lpvmm),
                    _ => (
                        "pdeath-qemu",
                        format!("{qemu} -qmp unix:{sock},server=on,wait=off"),
                    ),
                };
                let t = &mut tally[i];
                t.boots += 1;
                match pause_round(&mut host, name, &cmd, &sock, n)? {
                    PauseRound::Survived(us) => {
                        t.cycles += n;
                        t.pause_us.push(us);
                    }
                    PauseRound::DiedBooting(why) => {
                        t.died_booting += 1;
                        eprintln!("{series}: {vmm}'s guest died booting: {why}");
                    }
                    PauseRound::Died(why) => {
                        // The cycles of a boot that died count: the death is among them.
                        t.cycles += n;
                        t.died += 1;
                        eprintln!("{series}: {vmm}'s guest died under pause/resume: {why}");
                    }
                    PauseRound::HostLost(why) => {
                        t.host_lost += 1;
                        eprintln!(
                            "{series}: WARNING: the test host was lost during {vmm}'s boot: {why}"
                        );
                        host = TestHost::start_with_files(true, &files)?;
                    }
                }
                eprintln!("{series}: {vmm}: {} cycles, {} deaths", t.cycles, t.died);
            }
        }
        for (t, vmm) in tally.iter().zip(["lpvmm", "QEMU microvm"]) {
            println!(
                "| {series} | {vmm} | {} | {} | {} | {} | {} | {:.1} | {:.0} |",
                t.cycles,
                t.boots,
                t.died_booting,
                t.died,
                t.host_lost,
                f64::from(t.died) * 10_000.0 / f64::from(t.cycles.max(1)),
                median(&t.pause_us)
            );
        }
    }
    Ok(())
}

fn pause_round(
    host: &mut TestHost,
    name: &str,
    cmd: &str,
    qmp_sock: &str,
    cycles: u32,
) -> Result<PauseRound, String> {
    let mut g = match host.start_and_wait_ready(name, cmd) {
        Ok((g, _)) => g,
        Err(failure @ BootFailure::Exited { .. }) => {
            return Ok(PauseRound::DiedBooting(failure.report()))
        }
        Err(BootFailure::Other(e)) => return Ok(PauseRound::HostLost(e)),
    };
    let paused = g.run(PAUSE_LOAD).and_then(|_| {
        if name.ends_with("-qemu") {
            let (rc, out) = g.host.exec_status(
                &format!("qmp-cycles {qmp_sock} {cycles}"),
                Duration::from_secs(1800),
            )?;
            let us = out
                .split_whitespace()
                .find_map(|w| w.strip_prefix("median_stop_us=")?.parse().ok());
            match (rc, us) {
                (0, Some(us)) => Ok(us),
                _ => Err(format!("qmp-cycles: {out}")),
            }
        } else {
            let (rc, out) = g.lpvmm(&format!("bench pause {{vm}} --cycles {cycles} --json"))?;
            match (rc, json(&out).ok()) {
                (0, Some(v)) => Ok(v["park"]["median_us"].as_f64().unwrap_or(f64::NAN)),
                _ => Err(format!("lpvmm bench pause: {out}")),
            }
        }
    });
    let answered = paused.and_then(|us| {
        g.run_status("touch /tmp/ls; wait; echo alive", Duration::from_secs(120))
            .and_then(|(rc, out)| match rc == 0 && out.contains("alive") {
                true => Ok(us),
                false => Err(format!("the guest's shell: {out}")),
            })
    });
    let off = answered.and_then(|us| g.poweroff().map(|_| us));
    match off {
        Ok(us) => Ok(PauseRound::Survived(us)),
        Err(e) => match g.wait_exit(Duration::from_secs(10)) {
            Ok(exit) => Ok(PauseRound::Died(format!(
                "{e}; exit {}: {}",
                exit.code, exit.stderr
            ))),
            // The VMM still runs but the guest does not answer: dead too, for the
            // guest's user. Dropping the guest ends the VMM (stop, then kill by pid).
            Err(_) => {
                let console = g.console().drain();
                let tail = console[console.len().saturating_sub(1500)..].to_string();
                Ok(PauseRound::Died(format!("{e}; guest console: {tail}")))
            }
        },
    }
}
