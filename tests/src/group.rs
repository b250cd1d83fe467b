//! A test group: one test binary whose tests share one test host, run one at a time.

use std::sync::Mutex;
use std::time::Instant;

use libtest_mimic::{Arguments, Failed, Trial};

use crate::verdict::Decision;
use crate::{TestHost, TestResult, PLATFORM_ATTEMPTS};

/// The group's host, booted by the first test that needs it.
static HOST: Mutex<Option<TestHost>> = Mutex::new(None);
/// Extra files the group's host gets (see [`TestHost::start_with_files`]).
static FILES: Mutex<Vec<(std::path::PathBuf, String)>> = Mutex::new(Vec::new());

/// Disk images the group's host gets (see [`TestHost::start_with_disks`]).
static DISKS: Mutex<Vec<std::path::PathBuf>> = Mutex::new(Vec::new());

/// Give the group's host these disk images (call before [`run_group`]).
pub fn host_disks(disks: Vec<std::path::PathBuf>) {
    *DISKS.lock().unwrap_or_else(|e| e.into_inner()) = disks;
}

/// Give the group's host these files (call before [`run_group`]).
pub fn host_files(files: Vec<(std::path::PathBuf, String)>) {
    *FILES.lock().unwrap_or_else(|e| e.into_inner()) = files;
}

/// A test case run once per kernel series.
pub type SeriesCase = fn(&mut TestHost, &str) -> TestResult;

/// One trial per case and series, named `CASE_6_1`, `CASE_6_12`.
pub fn series_trials(cases: &[(&str, SeriesCase)]) -> Vec<Trial> {
    let mut trials = Vec::new();
    for &(name, case) in cases {
        for series in crate::SERIES {
            let tag = series.replace('.', "_");
            trials.push(host_trial(format!("{name}_{tag}"), move |h| {
                case(h, series)
            }));
        }
    }
    trials
}

/// Give the group's host the files a build step made, or end the test binary saying
/// why they could not be built.
pub fn host_files_or_exit(built: Result<Vec<(std::path::PathBuf, String)>, String>) {
    match built {
        Ok(files) => host_files(files),
        Err(e) => {
            eprintln!("cannot build the test patches: {e}");
            std::process::exit(1);
        }
    }
}

/// A test that runs on the group's shared host.
///
/// A failed attempt is judged by [`crate::verdict::decide`] (docs/testing.md, "When the
/// harness runs a test again"): run again on the same host when a guest died of the
/// platform (placed outside lpvmm's patch code, and lpvmm's post-mortem clean), on a new
/// host when the test host itself failed; any other failure is the test's own and is
/// never retried. A test gets at most [`PLATFORM_ATTEMPTS`] runs, and the whole run
/// [`crate::retries::RETRY_BUDGET`] retries, each filed with its evidence and said with
/// a loud WARNING. A host left wedged by a test that passed is replaced before the next
/// test, said loudly too, so that one platform fault cannot fail the tests after it.
pub fn host_trial(
    name: impl Into<String>,
    f: impl Fn(&mut TestHost) -> TestResult + Send + 'static,
) -> Trial {
    let name = name.into();
    let label = name.clone();
    Trial::test(name, move || {
        let started = Instant::now();
        let outcome = run_on_host(&label, &f);
        if let Err(e) = &outcome {
            // Next to the test's own output, not only in libtest's summary at the end of
            // the binary (a CI log shown in part keeps the reason).
            // Its head: the failure and the harness's verdict (the evidence follows).
            let why = e.message().unwrap_or("no message");
            eprintln!("FAILED: {label}: {}", crate::head(why, 4000));
        }
        // scripts/test.sh lists the slowest tests from these lines.
        eprintln!("TIME: {label} {} s", started.elapsed().as_secs());
        outcome
    })
}

/// [`host_trial`]'s body: run `f` on the group's host, replacing the host and running
/// again where the platform is to blame.
fn run_on_host(label: &str, f: &dyn Fn(&mut TestHost) -> TestResult) -> Result<(), Failed> {
    let mut slot = HOST.lock().unwrap_or_else(|e| e.into_inner());
    for attempt in 1..=PLATFORM_ATTEMPTS {
        if slot.is_none() {
            let files = FILES.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let disks = DISKS.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let mut host = TestHost::start_with_disks(false, &files, &disks)?;
            host.start_death_trace();
            *slot = Some(host);
        }
        let host = slot.as_mut().expect("booted above");
        host.mark_attempt();
        host.restart_death_trace();
        let outcome = f(host);
        let wedged = host.wedged().map(str::to_string);
        let err = match (outcome, wedged) {
            (Ok(()), None) => return Ok(()),
            (Ok(()), Some(why)) => {
                eprintln!(
                    "WARNING: {label} passed but left the test host unusable ({why}); \
                     the next test gets a new host"
                );
                *slot = None;
                return Ok(());
            }
            (Err(e), None) => e,
            (Err(e), Some(why)) => format!("{e}\n{why}"),
        };
        let (report, decision) = host.judge_failure(err);
        let why = decision.signature().to_string();
        let new_host = match decision {
            Decision::Fail(_) => return Err(Failed::from(format!("(harness: {why})\n{report}"))),
            Decision::RetrySameHost(_) => false,
            Decision::RetryNewHost(_) => true,
        };
        if new_host {
            // Dropping the host kills its QEMU.
            *slot = None;
        }
        if attempt == PLATFORM_ATTEMPTS {
            return Err(Failed::from(format!(
                "(harness: {why}, on attempt {attempt} of {PLATFORM_ATTEMPTS})\n{report}"
            )));
        }
        match crate::retries::file_retry(label, &why, &report) {
            Err(no) => {
                return Err(Failed::from(format!(
                    "(harness: {why}; not run again: {no})\n{report}"
                )))
            }
            Ok(file) => eprintln!(
                "WARNING: retry: {label}: {why} (attempt {attempt} of {PLATFORM_ATTEMPTS}; \
                 running it again on {} host; evidence: {})",
                if new_host { "a new" } else { "the same" },
                file.display()
            ),
        }
    }
    unreachable!("the loop returns")
}

/// A test that needs no host (it runs on this machine).
pub fn local_trial(
    name: impl Into<String>,
    f: impl FnOnce() -> TestResult + Send + 'static,
) -> Trial {
    Trial::test(name, move || f().map_err(Failed::from))
}

/// Run the group's tests one after another (they share the host and its serial
/// consoles), shut the host down, and exit with libtest's status.
pub fn run_group(trials: Vec<Trial>) -> ! {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let conclusion = libtest_mimic::run(&args, trials);
    drop(HOST.lock().unwrap_or_else(|e| e.into_inner()).take());
    conclusion.exit()
}
