//! `bench endurance`: issue 11's 10,000 enable/disable cycles under load, and beside them
//! the same load on the guest's own livepatch under QEMU (the peer), in the same test host,
//! interleaved, for as long as lpvmm's guests were loaded: a guest death that the run
//! shows on lpvmm but not on the peer is lpvmm's to find (docs/benchmarks.md, "Endurance").
//!
//! Each lpvmm guest runs a segment of [`ENDURANCE_SEGMENT`] cycles in batches of
//! [`ENDURANCE_BATCH`]; after each batch the readers and hammers stop and report, so a
//! guest that dies later keeps what it checked. Then a QEMU guest with the livepatch
//! modules runs the same readers and hammers while its shell loads, enables, disables and
//! unloads the same two fixes (`lpvmm_lp_cmdline`, `lpvmm_lp_getpid`) as fast as the
//! kernel's transitions allow, checked every [`PEER_SLICE`], until it has been loaded as
//! long as the lpvmm guest was.

use std::time::{Duration, Instant};

use lpvmm_tests::stats::median;
use lpvmm_tests::{json, BootFailure, HostMode, KvmTrace, TestHost};

use crate::common::{
    host_traced, initrd_with_livepatch, kbuild_kp, kp_build, livepatch_cpio, qemu_microvm,
};

/// Enable/disable cycles per batch: one shell loop on the test host, then the guest is
/// checked (alive, readers and hammers still running) before the next.
const ENDURANCE_BATCH: u32 = 250;

/// Issue 11's endurance run: CYCLES enable/disable cycles of two patches (`cmdline`,
/// read by 4 `readcheck` processes that check every read, and a kbuild-built
/// `__x64_sys_getpid`, called by 128 `getpid-hammer` processes that check every result),
/// per-task and immediate in turn. Reports cycles done, bad reads and results, new
/// kernel warnings and the guests that died, per series; with `peer`, the same load on
/// the guest's own livepatch under QEMU, and both VMMs' deaths per hour under load.
pub fn endurance(cycles: u32, serieses: &[&'static str], peer: bool) -> Result<(), String> {
    let mut files = vec![(kp_build("cmdline")?, "/root/cmdline.kp".to_string())];
    for &series in serieses {
        files.push((
            kbuild_kp(series, "getpid")?,
            format!("/root/getpid-{series}.kp"),
        ));
        if peer {
            files.push((
                livepatch_cpio(series)?,
                format!("/root/lp-{series}.cpio.gz"),
            ));
        }
    }
    let spec = HostSpec { peer, files };
    let mut host = spec.start()?;
    let traced = host.mode() == HostMode::Nested;
    println!("| kernel | cycles | per-task / immediate | transition median, per-task / immediate (ms) | guests (deaths) | cycles checked | bad reads | bad getpid results | new kernel warnings | stopped early | minutes |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut side_by_side = Vec::new();
    for &series in serieses {
        if traced {
            host.restart_kvm_trace()?;
        }
        let run = endurance_series(&mut host, &spec, series, cycles)?;
        println!("{}", run.row);
        side_by_side.extend(run.side_by_side);
    }
    if peer {
        println!();
        println!("| kernel | VMM and patcher | minutes under load | guests | deaths | test hosts lost | deaths per hour under load | enable/disable cycles (checked) | per-task transition median (ms) | bad reads | bad getpid results | new kernel warnings | stopped |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for row in side_by_side {
            println!("{row}");
        }
    }
    Ok(())
}

/// What the run's test host holds: QEMU too when the peer runs, and the patches and
/// livepatch modules. A test host that stops answering is replaced by a new one.
struct HostSpec {
    peer: bool,
    files: Vec<(std::path::PathBuf, String)>,
}

impl HostSpec {
    /// Start a test host, tracing where its guests die (tests/src/hostkvm.rs): shutdown
    /// exits always, every exit with LPVMM_BENCH_HOST_TRACE=1.
    fn start(&self) -> Result<TestHost, String> {
        let mut host = TestHost::start_with_files(self.peer, &self.files)?;
        if host.mode() == HostMode::Nested {
            host.trace_kvm(if host_traced() {
                KvmTrace::Everything
            } else {
                KvmTrace::Deaths
            })?;
        }
        Ok(host)
    }

    /// What became of a guest's life once it ended, and of its test host: a host that no
    /// longer answers turns the life's end (or the error it ended with) into
    /// [`LifeEnd::HostLost`] and is replaced. Any other error ends the run.
    fn after_life(&self, host: &mut TestHost, life: Result<Life, String>) -> Result<Life, String> {
        if host.answers() {
            return life;
        }
        let mut life = match life {
            Ok(life) => life,
            Err(e) => Life::ended_early(LifeEnd::Died(e)),
        };
        let why = match &life.end {
            LifeEnd::Died(why) | LifeEnd::Stopped(why) | LifeEnd::HostLost(why) => why.clone(),
            LifeEnd::Finished { .. } => "after its guest finished".to_string(),
        };
        eprintln!("WARNING: the test host stopped answering; starting a new one");
        life.end = LifeEnd::HostLost(why);
        *host = self.start()?;
        Ok(life)
    }
}

/// Cycles per lpvmm guest when the peer runs: after them the peer's guest runs as long,
/// so that both VMMs' guests meet the same test host at about the same time.
const ENDURANCE_SEGMENT: u32 = 1000;

/// Guests one endurance series may use: the run goes on after a guest dies of anything
/// but lpvmm's code, on a new guest, up to this many (a platform that kills every guest
/// at once must not loop forever).
const ENDURANCE_GUESTS: usize = 20;

/// The time an endurance series may take (`LPVMM_BENCH_MINUTES`; none by default):
/// past it, the guest running finishes its batch, its readers and hammers are checked,
/// and the row says how far the run got.
fn endurance_deadline(started: Instant) -> Option<Instant> {
    let minutes: u64 = std::env::var("LPVMM_BENCH_MINUTES").ok()?.parse().ok()?;
    Some(started + Duration::from_secs(minutes * 60))
}

fn past(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| Instant::now() >= d)
}

/// How one guest of an endurance run ended.
enum LifeEnd {
    /// It ran its share of the cycles; the kernel warnings it logged that it had not at
    /// boot.
    Finished { warnings: usize },
    /// The guest died (its VMM ended, or it stopped answering) somewhere other than
    /// lpvmm's patch code, with what says where: the run goes on with a new guest, and
    /// the reads and calls of the batch it died in go unchecked.
    Died(String),
    /// A transition did not end `done`, or the guest died in lpvmm's patch code: the
    /// run stops.
    Stopped(String),
    /// The test host itself stopped answering (its kernel panicked, or it hung): a new
    /// one is started and the run goes on; not a guest death of either VMM.
    HostLost(String),
}

/// One guest of an endurance run: the cycles it ran, those whose reads and calls its
/// readers and hammers checked (each batch is checked before the next), what they
/// found wrong, how long it ran under load, and how it ended.
struct Life {
    cycles: u32,
    checked: u32,
    /// Batches (lpvmm) or slices (the peer) whose readers and hammers reported.
    checks: u32,
    bad: Vec<String>,
    loaded: Duration,
    end: LifeEnd,
}

impl Life {
    /// A guest that ended before its load started.
    fn ended_early(end: LifeEnd) -> Life {
        Life {
            cycles: 0,
            checked: 0,
            checks: 0,
            bad: Vec::new(),
            loaded: Duration::ZERO,
            end,
        }
    }
}

/// Each transition's time from request to its end, by consistency (ms).
#[derive(Default)]
struct TransitionTimes {
    per_task: Vec<f64>,
    immediate: Vec<f64>,
}

/// What one series of the run printed: its row, and with the peer the two rows of the
/// side-by-side table (lpvmm's, the peer's).
struct SeriesRun {
    row: String,
    side_by_side: Vec<String>,
}

fn endurance_series(
    host: &mut TestHost,
    spec: &HostSpec,
    series: &str,
    cycles: u32,
) -> Result<SeriesRun, String> {
    let peer = spec.peer;
    let started = Instant::now();
    let mut times = TransitionTimes::default();
    let (mut lives, mut peer_lives): (Vec<Life>, Vec<Life>) = (Vec::new(), Vec::new());
    // The peer's transitions (the kernel's livepatch is per-task).
    let mut peer_ms = Vec::new();
    let mut done = 0;
    let deadline = endurance_deadline(started);
    while done < cycles && lives.len() < ENDURANCE_GUESTS && !past(deadline) {
        let end = match peer {
            true => cycles.min(done + ENDURANCE_SEGMENT),
            false => cycles,
        };
        let life = endurance_life(
            host,
            series,
            lives.len() + 1,
            done..end,
            deadline,
            &mut times,
        );
        let life = spec.after_life(host, life)?;
        done += life.cycles;
        report_end(series, "lpvmm", lives.len() + 1, &life, done);
        let (stop, loaded) = (matches!(life.end, LifeEnd::Stopped(_)), life.loaded);
        lives.push(life);
        if stop {
            break;
        }
        if peer {
            peer_segment(host, spec, series, loaded, &mut peer_lives, &mut peer_ms)?;
        }
        eprintln!(
            "{series}: so far: {}",
            endurance_row(series, done, cycles, &lives, &times, started)
        );
    }
    let side_by_side = match peer {
        true => vec![
            side_by_side_row(series, "lpvmm", &lives, &times.per_task),
            side_by_side_row(
                series,
                "the guest's livepatch on QEMU microvm",
                &peer_lives,
                &peer_ms,
            ),
        ],
        false => Vec::new(),
    };
    Ok(SeriesRun {
        row: endurance_row(series, done, cycles, &lives, &times, started),
        side_by_side,
    })
}

/// Say how a guest that did not finish its share ended (`done`: the run's cycles so far).
fn report_end(series: &str, vmm: &str, nth: usize, life: &Life, done: u32) {
    match &life.end {
        LifeEnd::Died(why) => eprintln!(
            "{series}: {vmm}'s guest {nth} died after {} of its cycles (cycle {done} of the run): {why}",
            life.cycles
        ),
        LifeEnd::Stopped(why) => {
            eprintln!("{series}: {vmm}'s guest {nth} stopped the run: {why}")
        }
        LifeEnd::HostLost(why) => eprintln!(
            "{series}: the test host was lost during {vmm}'s guest {nth} (after {} of its cycles): {why}",
            life.cycles
        ),
        LifeEnd::Finished { .. } => {}
    }
}

/// One VMM's row of the side-by-side table: its guests' time under load, deaths and
/// their rate, the cycles they checked, the median of its per-task transitions
/// (`transition_ms`), and what the checks found.
fn side_by_side_row(series: &str, vmm: &str, lives: &[Life], transition_ms: &[f64]) -> String {
    let minutes: f64 = lives.iter().map(|l| l.loaded.as_secs_f64()).sum::<f64>() / 60.0;
    let deaths = count(lives, |e| matches!(e, LifeEnd::Died(_)));
    let hosts_lost = count(lives, |e| matches!(e, LifeEnd::HostLost(_)));
    let cycles: u32 = lives.iter().map(|l| l.cycles).sum();
    let checked: u32 = lives.iter().map(|l| l.checked).sum();
    let stopped = lives.iter().any(|l| matches!(l.end, LifeEnd::Stopped(_)));
    format!(
        "| {series} | {vmm} | {minutes:.0} | {} | {deaths} | {hosts_lost} | {:.1} | {cycles} ({checked}) | {} | {} | {} | {} | {} |",
        lives.len(),
        deaths as f64 * 60.0 / minutes.max(1.0 / 60.0),
        match transition_ms.is_empty() {
            true => "–".to_string(),
            false => format!("{:.0}", median(transition_ms)),
        },
        verdict(lives, "readcheck"),
        verdict(lives, "getpid-hammer"),
        warnings(lives),
        if stopped { "yes (see stderr)" } else { "no" }
    )
}

/// What the checks of `lives` found wrong with `tool`'s reads or calls: "0" for nothing,
/// "?" when no batch was checked at all (nothing to vouch for).
fn verdict(lives: &[Life], tool: &str) -> String {
    let checked: u32 = lives.iter().map(|l| l.checks).sum();
    let found: Vec<&str> = lives
        .iter()
        .flat_map(|l| l.bad.iter().map(String::as_str))
        .filter(|b| b.starts_with(tool))
        .collect();
    match (checked, found.is_empty()) {
        (0, _) => "?".to_string(),
        (_, true) => "0".to_string(),
        (_, false) => found.join("; "),
    }
}

/// How many of `lives` ended as `ended` says.
fn count(lives: &[Life], ended: fn(&LifeEnd) -> bool) -> usize {
    lives.iter().filter(|l| ended(&l.end)).count()
}

/// Kernel warnings, oopses and lockups that guests which finished logged after boot.
fn warnings(lives: &[Life]) -> usize {
    lives
        .iter()
        .map(|l| match l.end {
            LifeEnd::Finished { warnings } => warnings,
            _ => 0,
        })
        .sum()
}

/// The table row of one series: the verdicts of the guests that lived to check them.
fn endurance_row(
    series: &str,
    done: u32,
    cycles: u32,
    lives: &[Life],
    times: &TransitionTimes,
    started: Instant,
) -> String {
    let checked: u32 = lives.iter().map(|l| l.checked).sum();
    let deaths = count(lives, |e| matches!(e, LifeEnd::Died(_)));
    let deaths = match count(lives, |e| matches!(e, LifeEnd::HostLost(_))) {
        0 => deaths.to_string(),
        lost => format!("{deaths}; {lost} test host lost"),
    };
    let stopped = match () {
        _ if lives.iter().any(|l| matches!(l.end, LifeEnd::Stopped(_))) => "stopped (see stderr)",
        _ if done >= cycles => "no",
        _ if lives.len() >= ENDURANCE_GUESTS => "out of guests",
        _ if past(endurance_deadline(started)) => "at LPVMM_BENCH_MINUTES",
        _ => "(running)",
    };
    let med = |v: &[f64]| match v.is_empty() {
        true => "–".to_string(),
        false => format!("{:.0}", median(v)),
    };
    format!(
        "| {series} | {done} | {} / {} | {} / {} | {} ({deaths}) | {checked} | {} | {} | {} | {} | {:.0} |",
        done.div_ceil(2),
        done / 2,
        med(&times.per_task),
        med(&times.immediate),
        lives.len(),
        verdict(lives, "readcheck"),
        verdict(lives, "getpid-hammer"),
        warnings(lives),
        stopped,
        started.elapsed().as_secs_f64() / 60.0
    )
}

/// Make lpvmm's guest ready: note its boot's kernel warnings, load both patches (to learn
/// the patched text), disable them and start the load. Returns the warnings and the load.
fn lpvmm_guest_ready(g: &mut lpvmm_tests::Guest, series: &str) -> Result<(String, String), String> {
    let boot_splats = g.run(lpvmm_tests::SPLATS)?;
    let original = g.text("cat /proc/cmdline")?;
    for kp in [
        "/root/cmdline.kp".to_string(),
        format!("/root/getpid-{series}.kp"),
    ] {
        let file = g.host.file(&kp);
        let (rc, out) = g.lpvmm(&format!("patch {{vm}} {file}"))?;
        if rc != 0 {
            return Err(format!("{series}: lpvmm patch {kp}: {out}"));
        }
    }
    let patched = g.text("cat /proc/cmdline")?;
    // Where the kernel lies in this boot, to place a traced RIP (the VMM says where the
    // patch code lies).
    let stext = g.text("grep -w _stext /proc/kallsyms")?;
    eprintln!("{series}: kernel {}", stext.trim());
    for p in ["cmdline", "getpid"] {
        g.lpvmm(&format!("patch disable {{vm}} {p}"))?;
    }
    let load = load(&original, &patched);
    g.run(&load)?;
    Ok((boot_splats, load))
}

/// Boot guest number `nth`, load both patches, start the load and run the cycles of
/// `range` until their end, the guest's death or a failed transition.
fn endurance_life(
    host: &mut TestHost,
    series: &str,
    nth: usize,
    range: std::ops::Range<u32>,
    deadline: Option<Instant>,
    times: &mut TransitionTimes,
) -> Result<Life, String> {
    let (first, cycles) = (range.start, range.end);
    // A name per guest: one that died may leave its VMM's socket behind.
    let name = format!("endure-{}-{nth}", series.replace('.', "_"));
    // Booted once, as the peer's guests are: a guest that dies booting is a death, counted
    // the same way in both arms (the suite's harness would boot it again).
    let mut g = match host.boot_guest_once(&name, series, 2, "") {
        Ok((g, _)) => g,
        Err(failure @ BootFailure::Exited { .. }) => {
            let why = format!("died booting: {}", failure.report());
            return Ok(Life::ended_early(LifeEnd::Died(why)));
        }
        Err(BootFailure::Other(e)) => return Err(e),
    };
    // A guest that dies while it is made ready is a death like any other.
    let (boot_splats, load) = match lpvmm_guest_ready(&mut g, series) {
        Ok(ready) => ready,
        Err(e) => return Ok(Life::ended_early(why_cycles_stopped(&mut g, &e))),
    };
    let lp = g.host.lpvmm();
    let started = Instant::now();
    let mut done = first;
    let (mut checked, mut checks, mut bad) = (0, 0, Vec::new());
    while done < cycles && !past(deadline) {
        let (before, batch) = (done, ENDURANCE_BATCH.min(cycles - done));
        // Odd cycles immediate, even ones per-task (the default), driven over the control
        // socket by one client (a process per command cost more than the transition).
        let (rc, out) = g.host.exec_status(
            &format!(
                "{lp} bench cycles {name} --patches cmdline,getpid --cycles {batch} \
                 --first {before} --timeout 120 --json"
            ),
            Duration::from_secs(3600),
        )?;
        let report = json(&out);
        let ran = report
            .as_ref()
            .ok()
            .and_then(|r| r["cycles_done"].as_u64())
            .unwrap_or(0) as u32;
        done = before + ran;
        if let Ok(r) = &report {
            let ms = |k: &str| -> Vec<f64> {
                r[k].as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
                    .unwrap_or_default()
            };
            times.per_task.extend(ms("per_task_ms"));
            times.immediate.extend(ms("immediate_ms"));
        }
        // The batch's reads and calls are checked before the next (a guest that dies
        // later keeps them), and a guest that dies while checked is a death like any
        // other.
        let verdicts = match (rc, ran) {
            (0, r) if r == batch => check_batch(&mut g, &load),
            _ => Err(out),
        };
        match verdicts {
            Ok(found) => {
                checked += ran;
                checks += 1;
                bad.extend(found);
            }
            Err(e) => {
                let end = why_cycles_stopped(&mut g, &e);
                return Ok(Life {
                    cycles: done - first,
                    checked,
                    checks,
                    bad,
                    loaded: started.elapsed(),
                    end,
                });
            }
        }
        eprintln!(
            "{series}: {done}/{cycles} cycles ({checked} checked by this guest), this guest {:.1} min",
            started.elapsed().as_secs_f64() / 60.0
        );
    }
    let loaded = started.elapsed();
    let end = match finish_life(&mut g, series, &boot_splats) {
        Ok(end) => end,
        Err(e) => why_cycles_stopped(&mut g, &e),
    };
    Ok(Life {
        cycles: done - first,
        checked,
        checks,
        bad,
        loaded,
        end,
    })
}

/// The readers and hammers of both VMMs' guests, started in the background: 4 readers of
/// /proc/cmdline that accept only `original` or `patched`, and 128 processes calling
/// getpid(2) and checking each result. Each stops at /tmp/stop and then prints its
/// verdict to its log; the shell keeps their pids in `$LOAD`.
fn load(original: &str, patched: &str) -> String {
    format!(
        "rm -f /tmp/stop; readcheck -p 4 -f /proc/cmdline -s /tmp/stop '{original}' '{patched}' \
         >/tmp/rc.log 2>&1 & LOAD=$!; getpid-hammer -p 128 -n 10 -s /tmp/stop >/tmp/hammer.log 2>&1 & \
         LOAD=\"$LOAD $!\""
    )
}

/// The programs of [`load`], each with the log that holds its verdict.
const LOAD_TOOLS: [(&str, &str); 2] = [
    ("readcheck", "/tmp/rc.log"),
    ("getpid-hammer", "/tmp/hammer.log"),
];

/// Stop the guest's readers and hammers, read their verdicts on the batch that just ran
/// (each prints `TOOL: OK` only if every read or call was right), and start them again
/// (`load`): what was wrong, if anything.
fn check_batch(g: &mut lpvmm_tests::Guest, load: &str) -> Result<Vec<String>, String> {
    let logs: Vec<&str> = LOAD_TOOLS.iter().map(|(_, log)| *log).collect();
    let out = g.run(&format!(
        "touch /tmp/stop; wait $LOAD; cat {}; {load}",
        logs.join(" ")
    ))?;
    Ok(LOAD_TOOLS
        .iter()
        .map(|(tool, _)| *tool)
        .filter(|tool| !out.contains(&format!("{tool}: OK")))
        .map(|tool| {
            let said = out
                .lines()
                .find(|l| l.starts_with(tool))
                .unwrap_or("no verdict");
            format!("{tool}: {said}")
        })
        .collect())
}

/// Stop the guest's readers and hammers (their last batch was checked) and the peer's
/// cycles, read the kernel warnings new since boot, and power the guest off.
fn finish_life(
    g: &mut lpvmm_tests::Guest,
    series: &str,
    boot_splats: &str,
) -> Result<LifeEnd, String> {
    g.run("touch /tmp/stop /tmp/peer.stop; wait")?;
    let new = lpvmm_tests::new_splats(g, boot_splats)?;
    for w in &new {
        eprintln!("{series}: new kernel warning: {w}");
    }
    g.poweroff()?;
    Ok(LifeEnd::Finished {
        warnings: new.len(),
    })
}

/// Why `bench cycles` ended early: the guest died (where, as far as the VMM, the test
/// host's KVM trace and the guest's console say), or a transition failed. A death in
/// lpvmm's patch code stops the run as lpvmm's.
fn why_cycles_stopped(g: &mut lpvmm_tests::Guest, out: &str) -> LifeEnd {
    let exit = g.wait_exit(Duration::from_secs(10));
    let stderr = g.vmm_stderr();
    let answers = exit.is_err() && g.run_status("true", Duration::from_secs(30)).is_ok();
    if answers {
        return LifeEnd::Stopped(format!("{out}\n{stderr}"));
    }
    let trace = match g.host.mode() {
        HostMode::Nested => format!("\ntest host's KVM trace:\n{}", g.host.kvm_trace_of_death()),
        HostMode::Native => String::new(),
    };
    if g.host.mode() == HostMode::Nested {
        let _ = g.host.restart_kvm_trace();
    }
    let console = g.console().drain();
    let evidence = format!(
        "{out}\n{stderr}{trace}\nthe guest console's last output:\n{}",
        lpvmm_tests::tail(&console, 6000)
    );
    // Where it died, as the harness reads it (the VMM announced the patch code's range
    // on its stderr): a death in lpvmm's code ends the run.
    match lpvmm_tests::death_in_patch_code(&evidence) {
        Some(at) => LifeEnd::Stopped(format!(
            "{}: {at}: {evidence}",
            lpvmm_tests::DIED_IN_PATCH_CODE
        )),
        None => LifeEnd::Died(evidence),
    }
}

/// What the peer's guests print for /proc/cmdline while `lpvmm_lp_cmdline` is enabled.
const LIVEPATCHED: &str = "this has been live patched";

/// How often the peer's readers and hammers are stopped and checked, and its cycles
/// counted.
const PEER_SLICE: Duration = Duration::from_secs(60);

/// Peer guests one segment may use: the platform may kill several in a row.
const PEER_GUESTS_PER_SEGMENT: usize = 3;

/// The peer's cycles, in the background of the guest's shell, until /tmp/peer.stop: load
/// and enable both livepatch modules, each waiting for its transition to end, then
/// disable them in turn, wait for each transition and unload the module once the
/// kernel lets go of it. The loop runs on while the readers and hammers stop to be
/// checked (a transition of the kernel's livepatch can outlast a check). After each
/// whole cycle it writes the count to /tmp/peer.n; each transition's time, from the
/// `insmod` or `echo 0 > enabled` to its end, goes to /tmp/peer.ms (ms); a failed step
/// to /tmp/peer.fail. It runs at nice -20: among 132 busy programs on 2 vCPUs a shell
/// at the default priority waits long for each `cat`, while lpvmm's cycles are driven
/// from outside the guest.
fn peer_cycles() -> String {
    "(renice -n -20 -p $BASHPID >/dev/null; lp=/sys/kernel/livepatch; n=0; \
     fail() { echo \"peer-cycles: $1 failed after $n cycles\" >/tmp/peer.fail; exit 1; }; \
     step() { a=$EPOCHREALTIME; eval \"$1\" || fail \"$1\"; \
       while [ -e $lp/$2/transition ] && [ \"$(cat $lp/$2/transition)\" = 1 ]; do \
         [ -e /tmp/peer.stop ] && exit 0; sleep 0.01; done; \
       b=$EPOCHREALTIME; echo $(( (${b/./} - ${a/./}) / 1000 )) >>/tmp/peer.ms; }; \
     while [ ! -e /tmp/peer.stop ]; do \
       for m in lpvmm_lp_cmdline lpvmm_lp_getpid; do step \"insmod /root/$m.ko\" $m; done; \
       for m in lpvmm_lp_getpid lpvmm_lp_cmdline; do \
         step \"echo 0 > $lp/$m/enabled\" $m; \
         until rmmod $m 2>/dev/null; do [ -e /tmp/peer.stop ] && exit 0; sleep 0.01; done; \
       done; n=$((n + 1)); echo \"cycles $n\" >/tmp/peer.n; \
     done) >/tmp/peer.log 2>&1 &"
        .to_string()
}

/// The guest command that reads the peer's progress since it was last read: its whole
/// cycles so far, a failed step, and the times of the transitions that ended since.
const PEER_PROGRESS: &str = "cat /tmp/peer.n /tmp/peer.fail 2>/dev/null; \
    mv /tmp/peer.ms /tmp/peer.ms.read 2>/dev/null && sed 's/^/ms /' /tmp/peer.ms.read; true";

/// What [`PEER_PROGRESS`] printed.
#[derive(Debug, Default, PartialEq)]
struct PeerProgress {
    /// Whole cycles since the guest booted.
    cycles: u32,
    failed: Option<String>,
    transition_ms: Vec<f64>,
}

impl PeerProgress {
    fn parse(out: &str) -> PeerProgress {
        let mut p = PeerProgress::default();
        for line in out.lines().map(str::trim) {
            if let Some(n) = line.strip_prefix("cycles ") {
                p.cycles = n.parse().unwrap_or(p.cycles);
            } else if let Some(ms) = line.strip_prefix("ms ") {
                p.transition_ms.extend(ms.parse::<f64>().ok());
            } else if line.starts_with("peer-cycles:") {
                p.failed = Some(line.to_string());
            }
        }
        p
    }
}

/// Run the peer's guests under the load for `exposure` (how long lpvmm's guest of this
/// segment was loaded), booting another when one dies; their transitions' times go to
/// `transition_ms`.
fn peer_segment(
    host: &mut TestHost,
    spec: &HostSpec,
    series: &str,
    exposure: Duration,
    lives: &mut Vec<Life>,
    transition_ms: &mut Vec<f64>,
) -> Result<(), String> {
    let mut left = exposure;
    for _ in 0..PEER_GUESTS_PER_SEGMENT {
        if left.is_zero() {
            break;
        }
        let nth = lives.len() + 1;
        let life = peer_life(host, series, nth, left, transition_ms);
        let life = spec.after_life(host, life)?;
        let total: u32 = lives.iter().map(|l| l.cycles).sum::<u32>() + life.cycles;
        report_end(series, "the peer", nth, &life, total);
        left = left.saturating_sub(life.loaded);
        let stop = !matches!(life.end, LifeEnd::Died(_) | LifeEnd::HostLost(_));
        lives.push(life);
        if stop {
            break;
        }
    }
    Ok(())
}

/// Boot peer guest number `nth` (QEMU microvm, the livepatch modules in its initrd),
/// check that its livepatch patches, and run the load and the cycles for `exposure`.
fn peer_life(
    host: &mut TestHost,
    series: &str,
    nth: usize,
    exposure: Duration,
    transition_ms: &mut Vec<f64>,
) -> Result<Life, String> {
    let initrd = initrd_with_livepatch(host, series)?;
    let cmd = qemu_microvm(host, series, 2, &initrd);
    let name = format!("endure-peer-{}-{nth}", series.replace('.', "_"));
    let mut g = match host.start_and_wait_ready(&name, &cmd) {
        Ok((g, _)) => g,
        Err(failure @ BootFailure::Exited { .. }) => {
            let why = format!("died booting: {}", failure.report());
            return Ok(Life::ended_early(LifeEnd::Died(why)));
        }
        Err(BootFailure::Other(e)) => return Err(e),
    };
    let (boot_splats, load) = match peer_guest_ready(&mut g, series) {
        Ok(ready) => ready,
        Err(e) => return Ok(Life::ended_early(why_cycles_stopped(&mut g, &e))),
    };
    let mut life = Life::ended_early(LifeEnd::Finished { warnings: 0 });
    life.end = match peer_slices(&mut g, &load, exposure, &mut life, transition_ms) {
        Ok(()) => match finish_life(&mut g, series, &boot_splats) {
            Ok(end) => end,
            Err(e) => why_cycles_stopped(&mut g, &e),
        },
        Err(PeerStop::Died(e)) => why_cycles_stopped(&mut g, &e),
        Err(PeerStop::LivepatchFailed(why)) => {
            let _ = finish_life(&mut g, series, &boot_splats);
            LifeEnd::Stopped(format!("the guest's livepatch: {why}"))
        }
    };
    Ok(life)
}

/// Make the peer's guest ready: note its boot's kernel warnings, check that its livepatch
/// patches (`lpvmm_lp_cmdline` loaded, read, unloaded), and start the load and the
/// cycles. Returns the warnings and the load.
fn peer_guest_ready(g: &mut lpvmm_tests::Guest, series: &str) -> Result<(String, String), String> {
    let boot_splats = g.run(lpvmm_tests::SPLATS)?;
    let original = g.text("cat /proc/cmdline")?;
    let sys = "/sys/kernel/livepatch/lpvmm_lp_cmdline";
    let patched = g.text(&format!(
        "insmod /root/lpvmm_lp_cmdline.ko && \
         while [ \"$(cat {sys}/transition)\" = 1 ]; do sleep 0.1; done; cat /proc/cmdline"
    ))?;
    if patched != LIVEPATCHED {
        return Err(format!(
            "{series}: the guest's livepatch did not patch: {patched}"
        ));
    }
    g.run(&format!(
        "echo 0 > {sys}/enabled; while [ -d {sys} ]; do sleep 0.1; done; \
         until rmmod lpvmm_lp_cmdline; do sleep 0.1; done"
    ))?;
    let load = load(&original, LIVEPATCHED);
    g.run(&format!("rm -f /tmp/peer.*; {load}; {}", peer_cycles()))?;
    Ok((boot_splats, load))
}

/// Why the peer's guest stopped before its time under load was up.
enum PeerStop {
    /// The guest did not answer (or its VMM ended): what was being done.
    Died(String),
    /// The guest's livepatch failed a step (its loop said which).
    LivepatchFailed(String),
}

/// Let the peer's load and cycles run in slices of [`PEER_SLICE`] until `life` has been
/// loaded for `exposure`, checking after each slice the readers' and hammers' verdicts
/// and the cycles into `life` (transition times into `transition_ms`).
fn peer_slices(
    g: &mut lpvmm_tests::Guest,
    load: &str,
    exposure: Duration,
    life: &mut Life,
    transition_ms: &mut Vec<f64>,
) -> Result<(), PeerStop> {
    while life.loaded < exposure {
        let slice = PEER_SLICE
            .min(exposure - life.loaded)
            .max(Duration::from_secs(1));
        let t0 = Instant::now();
        // The slice passes on the test host, which sees at once a VMM that ends (a
        // guest that dies); one that hangs fails the check after it.
        match g.exit_within(slice) {
            Ok(None) => {}
            Ok(Some(exit)) => {
                life.loaded += t0.elapsed();
                let why = format!("QEMU exited {}: {}", exit.code, exit.stderr);
                return Err(PeerStop::Died(why));
            }
            Err(e) => return Err(PeerStop::Died(e)),
        }
        let found = check_batch(g, load);
        // Under load until the readers and hammers were stopped, or until it died.
        life.loaded += t0.elapsed();
        let found = found.map_err(PeerStop::Died)?;
        let progress = g.run(PEER_PROGRESS).map_err(PeerStop::Died)?;
        let progress = PeerProgress::parse(&progress);
        life.cycles = progress.cycles;
        life.checked = progress.cycles;
        life.checks += 1;
        life.bad.extend(found);
        transition_ms.extend(progress.transition_ms);
        if let Some(why) = progress.failed {
            return Err(PeerStop::LivepatchFailed(why));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peers_progress_is_read_from_what_its_files_hold() {
        let out = "cycles 12\nms 4521\nms 3980\n";
        let p = PeerProgress::parse(out);
        assert_eq!(p.cycles, 12);
        assert_eq!(p.transition_ms, vec![4521.0, 3980.0]);
        assert_eq!(p.failed, None);
        let failed =
            PeerProgress::parse("cycles 3\npeer-cycles: insmod /root/x.ko failed after 3 cycles\n");
        assert_eq!(failed.cycles, 3);
        assert!(failed.failed.unwrap().contains("insmod"));
        // No count yet: no whole cycle.
        assert_eq!(PeerProgress::parse("").cycles, 0);
    }
}
