//! The test that a fault of lpvmm's is never retried away: a VMM built with the
//! test-only `fault-injection` feature writes one wrong byte of a site jump (while its
//! journal records the bytes meant, as a bug would), a guest process runs that jump, the
//! guest dies, and the harness's own decision must fail it at once, naming lpvmm's
//! post-mortem mismatch, and file no retry.

use std::path::PathBuf;
use std::process::Command;

use crate::patchtest::apply;
use crate::verdict::{decide, DeathPlace, Decision, Evidence};
use crate::{check, lpvmm_binary, repo_root, TestHost, TestResult, EXIT_TIMEOUT};

/// Where the faulty VMM lies on the nested test host.
pub const FAULTY_LPVMM: &str = "/usr/bin/lpvmm-fault-injection";

/// Build lpvmm with the fault-injection feature beside the ordinary build (cargo keeps
/// both; the ordinary `target/debug/lpvmm` is put back) and return it as a host file.
pub fn faulty_lpvmm() -> Result<(PathBuf, String), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = |features: &[&str]| -> TestResult {
        let ok = Command::new(&cargo)
            .args(["build", "--quiet", "-p", "lpvmm"])
            .args(features)
            .current_dir(repo_root())
            .status()
            .map_err(|e| format!("cargo build -p lpvmm {features:?}: {e}"))?;
        check!(ok.success(), "cargo build -p lpvmm {features:?} failed");
        Ok(())
    };
    build(&["--features", "fault-injection"])?;
    let faulty = lpvmm_binary().with_file_name("lpvmm-fault-injection");
    let copied = std::fs::copy(lpvmm_binary(), &faulty).map(|_| ());
    // Whatever happened, the ordinary binary is the one under test again.
    build(&[])?;
    copied.map_err(|e| format!("copying the fault-injection build: {e}"))?;
    let _ = Command::new("strip").arg(&faulty).status();
    Ok((faulty, FAULTY_LPVMM.to_string()))
}

/// The test (run on the group's host, which has [`faulty_lpvmm`] and the `cmdline`
/// sample patch among its files).
pub fn a_fault_of_lpvmms_is_never_retried(host: &mut TestHost) -> TestResult {
    let vmm = format!(
        "env LPVMM_FAULT_INJECTION=wrong-site-byte {}",
        host.file(FAULTY_LPVMM)
    );
    let retries_before = crate::retries::filed_retries();
    let (mut g, _) = host.boot_guest_vmm(&vmm, "faulty", "6.1", 1, "")?;
    // An oops kills the guest (as the platform's faults do), rather than only `cat`.
    g.run("echo 1 > /proc/sys/kernel/panic_on_oops")?;
    apply(&mut g, "cmdline")?;
    g.type_at_prompt("cat /proc/cmdline")?;
    let exit = g.wait_exit(EXIT_TIMEOUT)?;
    drop(g);
    check!(
        exit.code == 2 && exit.stderr.contains("FAULT INJECTION"),
        "the faulty VMM exited {} (want 2, a guest panic): {}",
        exit.code,
        exit.stderr
    );
    check!(
        exit.stderr.contains(patcher::POST_MORTEM_MISMATCH),
        "lpvmm's post-mortem did not find its own wrong byte:\n{}",
        exit.stderr
    );
    // The harness's decision on this death, from everything it reads after a failure.
    let err = format!("the guest died:\n{}", exit.stderr);
    let (report, decision) = host.judge_failure(err);
    check!(
        matches!(&decision, Decision::Fail(why) if why.contains("post-mortem")),
        "the harness decided {decision:?} on lpvmm's own fault:\n{report}"
    );
    // Even were it dressed as the platform's (its signature, placed outside patch code),
    // the mismatch vetoes the retry.
    let mut dressed = Evidence::of(&report, true, &[]);
    dressed.platform_death = true;
    dressed.place = DeathPlace::Outside("0xffffffff81000000".into());
    check!(
        matches!(decide(&dressed), Decision::Fail(why) if why.contains("post-mortem")),
        "a platform-looking death with a post-mortem mismatch was not failed"
    );
    check!(
        crate::retries::filed_retries() == retries_before,
        "a retry was filed for lpvmm's own fault"
    );
    eprintln!("the harness fails it at once: {}", decision.signature());
    Ok(())
}
