//! A test group: one test binary whose tests share one test host, run one at a time.

use std::sync::Mutex;
use std::time::Instant;

use libtest_mimic::{Arguments, Failed, Trial};

use crate::{
    address_in_report, death_in_patch_code, platform_guest_death, platform_host_fault, HostMode,
    TestHost, TestResult, DIED_IN_PATCH_CODE, HOST_CODE_IN_GUEST, PLATFORM_ATTEMPTS,
};

/// The group's host, booted by the first test that needs it.
static HOST: Mutex<Option<TestHost>> = Mutex::new(None);
/// Extra files the group's host gets (see [`TestHost::start_with_files`]).
static FILES: Mutex<Vec<(std::path::PathBuf, String)>> = Mutex::new(Vec::new());

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
/// If the test fails and the nested test host no longer answers at all (its QEMU died,
/// or its kernel stopped responding: rare events of the nested TCG platform, see
/// docs/testing.md), or its kernel is shown at fault ([`platform_host_fault`]: a vCPU
/// it kept inside `KVM_RUN` despite lpvmm's kick, a VMM that outlived SIGKILL, a
/// lockup, stall or oops in its own kernel log), the host
/// is replaced by a fresh one and the test runs again, with a loud WARNING; so does a
/// test whose guest died of a known platform fault (on the same host). A test gets at
/// most [`PLATFORM_ATTEMPTS`] runs. Any other failure is the test's own and is never
/// retried. A host left wedged by a test that passed is replaced before the next test,
/// said loudly too, so that one platform fault cannot fail the tests after it.
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
            let why = e.message().unwrap_or("no message");
            eprintln!("FAILED: {label}: {}", crate::tail(why, 4000));
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
    let trace = crate::harness_host_trace();
    let traced = |h: &TestHost| trace.is_some() && h.mode() == HostMode::Nested;
    for attempt in 1..=PLATFORM_ATTEMPTS {
        if slot.is_none() {
            let files = FILES.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let mut host = TestHost::start_with_files(false, &files)?;
            // Evidence only: a host whose trace cannot be set up still runs the tests
            // (a host that no longer answers fails them and is replaced).
            if let (true, Some(what)) = (traced(&host), trace) {
                let _ = host.trace_kvm(what);
            }
            *slot = Some(host);
        }
        let host = slot.as_mut().expect("booted above");
        host.mark_attempt();
        if traced(host) {
            let _ = host.restart_kvm_trace();
        }
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
        // What each VMM of the test said last: whether its guest died, and of what,
        // even where the test's own message only saw a closed socket.
        // And what the test host's own kernel logged about itself, if it failed.
        // And what the test host's own KVM says of it.
        let err = if host.answers() {
            let host_kernel = host.host_kernel_faults_since_mark().unwrap_or_default();
            let err = format!("{err}\n{}\n{host_kernel}", host.vmm_reports_since_mark());
            platform_evidence(host, err, traced(host))
        } else {
            err
        };
        let host_fault = platform_host_fault(&err);
        if !host_fault && host.answers() {
            // A guest that died of the platform's known faults (docs/testing.md: a
            // triple fault, or a panic of the bad-GS kind, "Fatal exception in
            // interrupt") as lpvmm reported it: run the test again.
            // Never one that died executing lpvmm's own code.
            let in_lpvmm = death_in_patch_code(&err);
            if let Some(at) = &in_lpvmm {
                return Err(Failed::from(format!("{err}\n{DIED_IN_PATCH_CODE}: {at}")));
            }
            if attempt < PLATFORM_ATTEMPTS && platform_guest_death(&err) {
                eprintln!(
                    "WARNING: a guest died of a known platform fault during {label} \
                     (attempt {attempt} of {PLATFORM_ATTEMPTS}); running {label} again. \
                     The failure was:\n{err}"
                );
                continue;
            }
            return Err(Failed::from(err));
        }
        // Each starts "the test host", as scripts/test.sh's count of retries expects.
        let what = if err.contains(HOST_CODE_IN_GUEST) {
            "the test host ran its guest on its own KVM's state (see below)"
        } else if host_fault {
            "the test host's kernel failed (see below)"
        } else {
            "the test host stopped answering"
        };
        // Dropping the host kills its QEMU.
        *slot = None;
        if attempt == PLATFORM_ATTEMPTS {
            return Err(Failed::from(format!(
                "{err}\n({what} on attempt {attempt} of {PLATFORM_ATTEMPTS})"
            )));
        }
        eprintln!(
            "WARNING: {what} during {label} (attempt {attempt} of {PLATFORM_ATTEMPTS}); \
             booting a new one and running {label} again. The failure was:\n{err}"
        );
    }
    unreachable!("the loop returns")
}

/// What the nested test host's own KVM says of a failure (tests/src/hostkvm.rs): where a
/// guest that died was (its trace of the shutdown), and whether the guest held an
/// address of the host's KVM code (then the platform ran it with the host's state, and
/// [`HOST_CODE_IN_GUEST`] makes the failure the host's).
fn platform_evidence(host: &mut TestHost, err: String, traced: bool) -> String {
    if host.mode() != HostMode::Nested {
        return err;
    }
    let err = if traced && platform_guest_death(&err) {
        let trace = host.kvm_trace_of_death();
        let memory = host.memory_counters();
        format!("{err}\ntest host's KVM trace:\n{trace}\ntest host's memory: {memory}")
    } else {
        err
    };
    match address_in_report(&err, &host.kvm_modules()) {
        Some(at) => format!("{err}\n{HOST_CODE_IN_GUEST}: {at}"),
        None => err,
    }
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
