//! The integration-test harness: "a host with real KVM" on which tests run lpvmm.
//!
//! - **Native**: this machine's /dev/kvm is backed by VMX/SVM. Commands run here, with
//!   the freshly built `target/debug/lpvmm`.
//! - **Nested**: otherwise (for example PVM, which cannot boot a stock kernel). A
//!   QEMU-TCG VM with an emulated AMD SVM CPU (the *test host*) boots the Debian cloud
//!   kernel, loads kvm-amd, and runs lpvmm on its real /dev/kvm. Its serial port ttyS0
//!   carries a command shell; ttyS1 carries the guest's console.
//!
//! A test group boots one test host and runs its tests one after another on it.
//! Images come from `guest-images/build.sh` (see guest-images/README.md).

mod console;
pub mod debian;
pub mod fault_injection;
mod group;
mod host;
mod hostkvm;
pub mod klpconvert;
pub mod patchtest;
pub mod retries;
pub mod stats;
pub mod verdict;
pub mod views;

pub use console::{head, tail, Console};
pub use group::{
    host_disks, host_files, host_files_or_exit, host_trial, local_trial, run_group, series_trials,
    SeriesCase,
};
pub use host::{
    kill_children, platform_guest_death, platform_host_fault, BootFailure, Guest, GuestExit,
    GuestSpec, HostMode, TestHost, BOOT_TIMEOUT, CMD_TIMEOUT, EXIT_TIMEOUT, PLATFORM_ATTEMPTS,
    PROMPT,
};
pub use hostkvm::{
    address_in_report, dead_vcpu_rips, death_in_patch_code, death_places, harness_host_trace,
    patch_code_ranges, CodeRange, KvmTrace, DIED_IN_PATCH_CODE, HOST_CODE_IN_GUEST,
};

use std::path::PathBuf;

/// The two kernel series every test runs against.
pub const SERIES: [&str; 2] = ["6.1", "6.12"];

/// Where guest-images/build.sh put its outputs.
pub fn images_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LPVMM_IMAGES") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
        });
    cache.join("lpvmm/images")
}

/// The workspace root (tests/ is one level down).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Whether the lpvmm under test is the release build: `LPVMM_TEST_RELEASE=1` (for
/// benchmarks, so that lpvmm is measured as a user runs it; the suite uses the dev build).
pub fn release_build() -> bool {
    std::env::var_os("LPVMM_TEST_RELEASE").is_some_and(|v| v == "1")
}

/// The lpvmm binary cargo built for this test run.
pub fn lpvmm_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    target
        .join(if release_build() { "release" } else { "debug" })
        .join("lpvmm")
}

pub type TestResult = Result<(), String>;

/// `ensure!`-style check that turns into a test failure message.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// A command's console output without the kernel's own console lines (`[  12.345678]
/// ...`), which the guest prints on the same serial console whenever it warns (a
/// clocksource watchdog on the nested host, for example). Only for output that is not
/// itself kernel log: `dmesg` prints the same prefix.
pub fn without_kernel_lines(out: &str) -> String {
    out.lines()
        .filter(|l| !is_kernel_line(l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether a console line starts with printk's `[seconds.micros]` time stamp.
fn is_kernel_line(line: &str) -> bool {
    kernel_message(line).is_some()
}

/// The message of a kernel log line, after printk's `[seconds.micros]` time stamp (as
/// the console and busybox's `dmesg` print it); `None` for any other line.
pub(crate) fn kernel_message(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (stamp, message) = rest.split_once(']')?;
    let (s, us) = stamp.trim_start().split_once('.')?;
    let stamped = !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_digit())
        && us.len() == 6
        && us.bytes().all(|b| b.is_ascii_digit());
    stamped.then(|| message.trim_start())
}

/// Parse a command's JSON output; on failure, say what the output was.
pub fn json(out: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(out).map_err(|e| format!("{e}: {}", tail(out, 2000)))
}

/// The lines of the guest's [`SPLATS`] now that were not there `at_boot` (its output
/// then): the warnings a test caused.
pub fn new_splats(g: &mut Guest, at_boot: &str) -> Result<Vec<String>, String> {
    let now = g.run(SPLATS)?;
    Ok(now
        .lines()
        .filter(|l| !at_boot.lines().any(|b| b == *l))
        .map(str::to_string)
        .collect())
}

/// Kernel warning splats, oopses and lockup reports in the guest's log (a guest command).
pub const SPLATS: &str =
    "dmesg | grep -E 'WARNING: CPU|Oops|BUG:|Call Trace|soft lockup|hung task|rcu_.*stall' || true";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_console_lines_are_left_out_and_nothing_else() {
        let out = "[   13.105655] clocksource:   'kvm-clock' wd_nsec: 530388352\n\
                   [13.311274] clocksource: 'kvm-clock' (not 'tsc') is current clocksource.\n\
                   \n42 interactive\n[not a stamp] stays\n[ 1.5] stays too";
        assert_eq!(
            without_kernel_lines(out),
            "\n42 interactive\n[not a stamp] stays\n[ 1.5] stays too"
        );
        assert_eq!(
            without_kernel_lines("42 interactive").trim(),
            "42 interactive"
        );
    }
}
