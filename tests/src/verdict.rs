//! Whose a failure is: the nested platform's (the test may run again) or lpvmm's and the
//! test's own (it fails). The one place that decides, as a `match` over typed evidence,
//! so that the rules can be read and are tested rule by rule (docs/testing.md, "When the
//! harness runs a test again").
//!
//! A retry needs evidence that names the platform *and* clears lpvmm:
//! - a guest death is the platform's only if it is placed (the test host's trace of the
//!   shutdown, or the guest's own oops RIP that lpvmm reports with the panic) outside
//!   lpvmm's patch code, *and* lpvmm's post-mortem says the guest still holds every
//!   byte lpvmm wrote. Natively, or without a trace, a triple fault cannot be placed and
//!   fails the test.
//! - the test host's own failure: its kernel's own fault lines (kernel-format lines, not
//!   a user-space crash it logged), a vCPU it kept in `KVM_RUN` despite lpvmm's kick, a
//!   VMM it could not kill, registers no guest can have, a dead vCPU found at an address
//!   of the host's own KVM code, or a host that no longer answers.
//!
//! Two findings are lpvmm's and veto every retry, whatever else the report holds: a
//! post-mortem mismatch, and a death placed in lpvmm's patch code. So is a kick lpvmm
//! lost.

use crate::hostkvm::{address_in_report, death_places, CodeRange};

/// How lpvmm reports a guest that died of the platform's known faults (its stop line,
/// vmm/src/devices/mod.rs `StopReason::describe`).
const PLATFORM_DEATHS: &[&str] = &[
    "triple fault",
    "guest kernel panic: Fatal exception in interrupt",
];
/// lpvmm's stop lines for a guest that died, whatever of.
const DEATH_LINES: &[&str] = &["lpvmm: guest crashed (", "lpvmm: guest kernel panic:"];
/// How the harness heads each VMM's stderr in a report (`vmm_reports_since_mark`).
pub const VMM_SECTION: &str = "== VMM stderr (";

/// What lpvmm's post-mortem said of the guests that died.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PostMortem {
    /// No VMM in the report says its guest died.
    NoDeath,
    /// Every guest that died holds what lpvmm wrote.
    Clean,
    /// A guest died and its VMM printed no verdict (it crashed, or its stderr is lost).
    Missing,
    /// lpvmm's own fault: the line says which bytes.
    Mismatch(String),
}

/// Where a guest died, as far as the report says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeathPlace {
    Unlocated,
    /// Inside lpvmm's announced patch code: never the platform's.
    InPatchCode(String),
    /// Every located address is outside lpvmm's patch code.
    Outside(String),
}

/// What names the test host itself at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostFault {
    /// lpvmm's words for a vCPU the host kernel kept in `KVM_RUN` after its kick.
    HeldVcpu,
    SurvivedSigkill,
    ImpossibleAtBoot,
    /// The host kernel's own fault lines.
    KernelFault,
    /// A dead or stuck vCPU's RIP lay in the host's KVM code.
    HostCodeAtRip(String),
    /// The host no longer answers.
    Gone,
}

/// Everything the decision looks at, read from a failure's report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evidence {
    /// lpvmm reported one of the platform's known guest deaths.
    pub platform_death: bool,
    pub place: DeathPlace,
    pub post_mortem: PostMortem,
    pub host_fault: Option<HostFault>,
    /// lpvmm said it lost a vCPU's kick.
    pub lost_kick: bool,
}

/// What to do with a failed attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The test fails: why, in a line.
    Fail(String),
    /// The guest died of the platform: run the test again on the same host.
    RetrySameHost(String),
    /// The host failed: run the test again on a new one.
    RetryNewHost(String),
}

impl Decision {
    /// The one-line signature a retry is filed under.
    pub fn signature(&self) -> &str {
        match self {
            Decision::Fail(s) | Decision::RetrySameHost(s) | Decision::RetryNewHost(s) => s,
        }
    }
}

/// The rule, in order: lpvmm's own faults first, then the host's, then guest deaths.
pub fn decide(e: &Evidence) -> Decision {
    if let PostMortem::Mismatch(line) = &e.post_mortem {
        return Decision::Fail(format!(
            "lpvmm's post-mortem found the guest not holding what lpvmm wrote (lpvmm's \
             fault, never retried): {line}"
        ));
    }
    if let DeathPlace::InPatchCode(at) = &e.place {
        return Decision::Fail(format!("{}: {at}", crate::DIED_IN_PATCH_CODE));
    }
    if e.lost_kick {
        return Decision::Fail("lpvmm lost a vCPU's kick (lpvmm's fault, never retried)".into());
    }
    if let Some(fault) = &e.host_fault {
        // Each starts "the test host", as scripts/test.sh's listing expects.
        return Decision::RetryNewHost(match fault {
            HostFault::Gone => "the test host stopped answering".into(),
            HostFault::HostCodeAtRip(at) => format!(
                "the test host ran its guest on its own KVM's state ({}: {at})",
                crate::HOST_CODE_IN_GUEST
            ),
            HostFault::HeldVcpu => {
                "the test host's kernel held a vCPU in KVM_RUN after lpvmm's kick".into()
            }
            HostFault::SurvivedSigkill => {
                "the test host's kernel kept a VMM alive after SIGKILL".into()
            }
            HostFault::ImpossibleAtBoot => {
                "the test host gave a vCPU registers no guest can have".into()
            }
            HostFault::KernelFault => "the test host's kernel failed (its own fault lines)".into(),
        });
    }
    if !e.platform_death {
        return Decision::Fail("the test's own failure".into());
    }
    match (&e.place, &e.post_mortem) {
        (DeathPlace::Outside(at), PostMortem::Clean) => Decision::RetrySameHost(format!(
            "a guest died of a known platform fault at {at}, outside lpvmm's patch code; \
             lpvmm's post-mortem clean"
        )),
        (DeathPlace::Unlocated, _) => Decision::Fail(
            "a guest died and nothing places the death (natively, or without the test \
             host's trace, a triple fault cannot be placed): not retried"
                .into(),
        ),
        (_, pm) => Decision::Fail(format!(
            "a guest died and lpvmm's post-mortem does not clear lpvmm ({pm:?}): not retried"
        )),
    }
}

/// The post-mortem verdicts of every VMM section of `report` (or of `report` itself
/// when it is one VMM's stderr with no sections).
pub fn post_mortem_of(report: &str) -> PostMortem {
    let sections: Vec<&str> = if report.contains(VMM_SECTION) {
        report.split(VMM_SECTION).skip(1).collect()
    } else {
        vec![report]
    };
    let mut verdict = PostMortem::NoDeath;
    for s in sections {
        let died = s.lines().any(|l| DEATH_LINES.iter().any(|d| l.contains(d)));
        let mismatch = s
            .lines()
            .find(|l| l.contains(patcher::POST_MORTEM_MISMATCH));
        let this = match (mismatch, died) {
            (Some(line), _) => return PostMortem::Mismatch(line.trim().to_string()),
            (None, false) => continue,
            (None, true) if s.contains(patcher::POST_MORTEM_CLEAN) => PostMortem::Clean,
            (None, true) => PostMortem::Missing,
        };
        if verdict != PostMortem::Missing {
            verdict = this;
        }
    }
    verdict
}

/// Where the report places a guest's death, against the patch code lpvmm announced.
pub fn place_of(report: &str) -> DeathPlace {
    if let Some(at) = crate::death_in_patch_code(report) {
        return DeathPlace::InPatchCode(at);
    }
    match death_places(report).first() {
        Some(at) => DeathPlace::Outside(at.clone()),
        None => DeathPlace::Unlocated,
    }
}

/// Whether lpvmm reported one of the platform's known guest deaths.
pub fn platform_guest_death(report: &str) -> bool {
    PLATFORM_DEATHS.iter().any(|m| report.contains(m))
}

/// The host fault a report names in lpvmm's or the harness's words, if any
/// (`host_kvm`: where the test host's KVM code lies).
pub fn host_fault_of(report: &str, host_kvm: &[CodeRange]) -> Option<HostFault> {
    if report.contains(lpvmm::vstate::vcpu::HOST_HELD) {
        Some(HostFault::HeldVcpu)
    } else if report.contains(crate::host::SURVIVED_SIGKILL) {
        Some(HostFault::SurvivedSigkill)
    } else if report.contains(crate::host::IMPOSSIBLE_AT_BOOT) {
        Some(HostFault::ImpossibleAtBoot)
    } else if report.contains(crate::host::HOST_KERNEL_FAULT) {
        Some(HostFault::KernelFault)
    } else {
        let rips = crate::hostkvm::dead_vcpu_rips(report).join(" ");
        address_in_report(&rips, host_kvm).map(HostFault::HostCodeAtRip)
    }
}

impl Evidence {
    /// Read a failure's report; `host_answers` whether the test host still answers.
    pub fn of(report: &str, host_answers: bool, host_kvm: &[CodeRange]) -> Evidence {
        let host_fault = match host_answers {
            false => Some(HostFault::Gone),
            true => host_fault_of(report, host_kvm),
        };
        Evidence {
            platform_death: platform_guest_death(report),
            place: place_of(report),
            post_mortem: post_mortem_of(report),
            host_fault,
            lost_kick: report.contains(lpvmm::vstate::vcpu::LPVMM_LOST_KICK),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPPED: &str =
        "lpvmm: patch code mapped in the guest at 0xffffffff94208000-0xffffffff94a04000 (patches and trampolines)";
    const TRIPLE: &str =
        "lpvmm: guest crashed (triple fault on vCPU 0 at rip 0xfff0): lpvmm ends the VM";
    const CLEAN: &str =
        "lpvmm: post-mortem: clean: the guest holds what lpvmm wrote (9 byte(s) ...)";
    const MISMATCH: &str =
        "lpvmm: post-mortem: MISMATCH: 1 run(s) differ ... [pa 0x1004: wrote 00 found 40]";
    const SHUTDOWN_OUT: &str =
        "vcpu0-124 [000] 51.8: kvm_exit: vcpu 0 reason shutdown rip 0xffffffffb3a01a60 info1 0x0";
    const SHUTDOWN_IN: &str =
        "vcpu0-124 [000] 51.8: kvm_exit: vcpu 0 reason shutdown rip 0xffffffff94208031 info1 0x0";
    const PANIC_OUT: &str = "lpvmm: guest kernel panic: Fatal exception in interrupt; the guest's last oops was at RIP: 0010:srso_return_thunk+0x0/0x10";

    fn report(parts: &[&str]) -> String {
        format!("{VMM_SECTION}./g.err):\n{}", parts.join("\n"))
    }

    fn decide_on(parts: &[&str]) -> Decision {
        decide(&Evidence::of(&report(parts), true, &[]))
    }

    #[test]
    fn a_placed_death_with_a_clean_post_mortem_is_the_platforms() {
        for parts in [
            &[MAPPED, TRIPLE, CLEAN, SHUTDOWN_OUT][..],
            &[MAPPED, PANIC_OUT, CLEAN][..],
            // No patch code mapped yet (a death at boot): nothing to be inside.
            &[TRIPLE, CLEAN, SHUTDOWN_OUT][..],
        ] {
            assert!(
                matches!(decide_on(parts), Decision::RetrySameHost(_)),
                "{parts:?}"
            );
        }
    }

    #[test]
    fn a_death_is_retried_only_with_both_the_place_and_the_post_mortem() {
        // Unplaced (natively, or no trace): fails.
        let d = decide_on(&[MAPPED, TRIPLE, CLEAN]);
        assert!(
            matches!(&d, Decision::Fail(w) if w.contains("nothing places")),
            "{d:?}"
        );
        // Placed, but no post-mortem verdict (the VMM's stderr lost its line).
        let d = decide_on(&[MAPPED, TRIPLE, SHUTDOWN_OUT]);
        assert!(
            matches!(&d, Decision::Fail(w) if w.contains("Missing")),
            "{d:?}"
        );
    }

    #[test]
    fn lpvmms_own_faults_veto_every_retry_in_either_order() {
        // A mismatch, or a death in patch code, with every sign of the platform beside
        // it: a placed platform death, and each host fault; in either order in the text.
        let host_faults = [
            format!(
                "vCPU 1: inside KVM_RUN for 5.0 s although kicked ({})",
                lpvmm::vstate::vcpu::HOST_HELD
            ),
            format!("the VMM 'x' {}", crate::host::SURVIVED_SIGKILL),
            format!(
                "{}: vCPU 0 has CR3 0xbfe14000",
                crate::host::IMPOSSIBLE_AT_BOOT
            ),
            format!(
                "{}:\n[ 3.0] Oops: 0000 [#1]",
                crate::host::HOST_KERNEL_FAULT
            ),
        ];
        for fault in host_faults.iter().map(String::as_str).chain([""]) {
            for (lpvmms, why) in [
                (&[TRIPLE, MISMATCH, SHUTDOWN_OUT][..], "post-mortem"),
                (&[TRIPLE, CLEAN, SHUTDOWN_IN][..], crate::DIED_IN_PATCH_CODE),
            ] {
                let mut parts = vec![MAPPED, fault];
                parts.extend_from_slice(lpvmms);
                for order in [parts.clone(), parts.iter().rev().copied().collect()] {
                    let d = decide_on(&order);
                    assert!(
                        matches!(&d, Decision::Fail(w) if w.contains(why)),
                        "{order:?}: {d:?}"
                    );
                }
                // And with the host gone.
                let d = decide(&Evidence::of(&report(&parts), false, &[]));
                assert!(matches!(&d, Decision::Fail(w) if w.contains(why)), "{d:?}");
            }
        }
        let lost = format!(
            "vCPU 0: ... lpvmm lost the kick ({})",
            lpvmm::vstate::vcpu::LPVMM_LOST_KICK
        );
        assert!(matches!(decide_on(&[&lost]), Decision::Fail(w) if w.contains("kick")));
    }

    #[test]
    fn each_host_fault_replaces_the_host() {
        let modules = CodeRange::kvm_modules("kvm_amd 126976 0 - Live 0xffffffffc031f000");
        for (report, host_kvm) in [
            (format!("({})", lpvmm::vstate::vcpu::HOST_HELD), &[][..]),
            (format!("x {}", crate::host::SURVIVED_SIGKILL), &[][..]),
            (format!("{}: y", crate::host::IMPOSSIBLE_AT_BOOT), &[][..]),
            (
                format!(
                    "{}:\n[ 1.0] BUG: soft lockup",
                    crate::host::HOST_KERNEL_FAULT
                ),
                &[][..],
            ),
            (
                "kvm_exit: vcpu 1 reason shutdown rip 0xffffffffc032ddcc info1 0x0".to_string(),
                &modules[..],
            ),
        ] {
            let d = decide(&Evidence::of(&report, true, host_kvm));
            assert!(
                matches!(&d, Decision::RetryNewHost(w) if w.starts_with("the test host")),
                "{report}: {d:?}"
            );
        }
        let gone = decide(&Evidence::of("timed out", false, &[]));
        assert_eq!(
            gone,
            Decision::RetryNewHost("the test host stopped answering".into())
        );
    }

    #[test]
    fn an_address_of_the_hosts_kvm_elsewhere_than_a_vcpus_rip_is_not_the_hosts() {
        let modules = CodeRange::kvm_modules("kvm_amd 126976 0 - Live 0xffffffffc031f000");
        // On a task's stack (the guest's own module area can hold ftrace trampolines
        // and kprobe slots at such addresses), or in any other text: not a vCPU's RIP.
        let stack = "blocked by pid 57 (pairread): [<ffffffffc032ddcc>] 0xffffffffc032ddcc";
        assert_eq!(host_fault_of(stack, &modules), None);
        // Nor a running guest's vCPU (`lpvmm regs`): it may be in its own module area.
        let regs = "vCPU 1 rip 0xffffffffc032ddcc rsp 0xffffc90000967b80";
        assert_eq!(host_fault_of(regs, &modules), None);
        assert_eq!(
            decide(&Evidence::of(stack, true, &modules)),
            Decision::Fail("the test's own failure".into())
        );
    }

    #[test]
    fn any_other_failure_is_the_tests_own() {
        for parts in [
            &["guest: timed out after 15s waiting for READY"][..],
            // A death that is not one of the platform's signatures (a process-context
            // oops made fatal), even placed and clean.
            &["lpvmm: guest kernel panic: Fatal exception; the guest's last oops was at RIP: 0010:memcpy+0x1/0x2", CLEAN][..],
            // A user-space crash of lpvmm in the host's log is no host fault.
            &["[ 9.0] traps: lpvmm[912] general protection fault ip:55d0 sp:7ffd error:0 in lpvmm"][..],
        ] {
            assert_eq!(
                decide_on(parts),
                Decision::Fail("the test's own failure".into()),
                "{parts:?}"
            );
        }
    }

    #[test]
    fn post_mortems_are_read_per_vmm() {
        let two = format!(
            "{VMM_SECTION}./a.err):\n{TRIPLE}\n{CLEAN}\n{VMM_SECTION}./b.err):\nlpvmm: VM 'b' started\n"
        );
        assert_eq!(post_mortem_of(&two), PostMortem::Clean);
        let lost = format!(
            "{VMM_SECTION}./a.err):\n{TRIPLE}\n{CLEAN}\n{VMM_SECTION}./b.err):\n{TRIPLE}\n"
        );
        assert_eq!(post_mortem_of(&lost), PostMortem::Missing);
        let lost_first = format!(
            "{VMM_SECTION}./b.err):\n{TRIPLE}\n{VMM_SECTION}./a.err):\n{TRIPLE}\n{CLEAN}\n"
        );
        assert_eq!(post_mortem_of(&lost_first), PostMortem::Missing);
        assert_eq!(post_mortem_of("lpvmm: VM 'x' started"), PostMortem::NoDeath);
        assert!(matches!(
            post_mortem_of(&format!("{TRIPLE}\n{MISMATCH}")),
            PostMortem::Mismatch(_)
        ));
    }
}
