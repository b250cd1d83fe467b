//! The nested test host's own KVM, as evidence of whose a guest's death is.
//!
//! lpvmm runs its guests on the test host's KVM, itself running on an emulated SVM CPU
//! (QEMU's TCG). When a guest dies, two records there say whether lpvmm or that
//! platform killed it:
//!
//! - **Its code addresses.** The test host's KVM modules lie at fixed addresses (the
//!   test host boots with `nokaslr`). A guest vCPU found at such an address (its RIP:
//!   the trace's shutdown exit, `lpvmm regs`, lpvmm's triple-fault line) ran with the
//!   test host's own state: seen on 2026-12-06, vCPU 1 at `__svm_vcpu_run+0x9c` of the
//!   test host's kvm_amd. No VMM can give its guest the host kernel's registers. Only a
//!   dead vCPU's RIP counts ([`dead_vcpu_rips`]): the guest's own module area (ftrace trampolines,
//!   kprobe slots) can overlap the host's KVM range, so an address on a task's stack
//!   says nothing of the host.
//! - **Its trace.** On AMD a triple fault resets the vCPU before its VMM sees it (its
//!   registers then read the reset vector: `shutdown_interception` in
//!   arch/x86/kvm/svm/svm.c), so lpvmm cannot say where a dead guest was. The test
//!   host's `kvm_exit` event of that shutdown can: it carries the guest's RIP and the
//!   event being delivered, and `kvm_inj_exception` each exception KVM injected. The
//!   harness records those two by default (every other exit is filtered out), every
//!   exit with `LPVMM_TEST_HOST_TRACE=1` (the last few thousand per CPU fit; a test
//!   then takes about half again as long), nothing with `LPVMM_TEST_HOST_TRACE=0`;
//!   `bench deaths` records every exit with `LPVMM_BENCH_HOST_TRACE=1`.
//!
//! Natively there is no test host: this machine's kernel is not ours to trace or blame.

use crate::{HostMode, TestHost};

const TRACEFS: &str = "/sys/kernel/debug/tracing";

/// SVM's exit code for a shutdown (a triple fault), as `kvm_exit` records it.
const SVM_EXIT_SHUTDOWN: u32 = 0x7f;

/// How the harness says a vCPU's RIP lay in the test host's KVM code
/// ([`crate::verdict::HostFault::HostCodeAtRip`]).
pub const HOST_CODE_IN_GUEST: &str = "the guest held an address of the test host's own KVM code";

/// What the harness traces on its nested test hosts: [`KvmTrace::Deaths`] unless
/// `LPVMM_TEST_HOST_TRACE` says `0` (nothing) or `1` (everything).
pub fn harness_host_trace() -> Option<KvmTrace> {
    match std::env::var("LPVMM_TEST_HOST_TRACE").as_deref() {
        Ok("0") => None,
        Ok("1") => Some(KvmTrace::Everything),
        _ => Some(KvmTrace::Deaths),
    }
}

/// Which KVM events the test host records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmTrace {
    /// Shutdown exits and injected exceptions only: where a guest died.
    Deaths,
    /// Every exit too: what the guest did before.
    Everything,
}

/// Code that lies at known addresses: a KVM module of the test host's kernel, or
/// lpvmm's patch code in a guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeRange {
    pub name: String,
    pub start: u64,
    pub size: u64,
}

impl CodeRange {
    /// The KVM modules of a `/proc/modules` listing, each line like
    /// `kvm_amd 126976 0 - Live 0xffffffffc031f000`. Lines that are not KVM's, or
    /// show no address (an unprivileged reader sees zeros), are left out.
    pub fn kvm_modules(proc_modules: &str) -> Vec<CodeRange> {
        proc_modules
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let name = *f.first()?;
                if !matches!(name, "kvm" | "kvm_amd" | "kvm_intel") {
                    return None;
                }
                let size = f.get(1)?.parse().ok()?;
                let start = u64::from_str_radix(f.get(5)?.strip_prefix("0x")?, 16).ok()?;
                (start != 0 && size != 0).then(|| CodeRange {
                    name: name.to_string(),
                    start,
                    size,
                })
            })
            .collect()
    }

    fn offset_of(&self, addr: u64) -> Option<u64> {
        let off = addr.checked_sub(self.start)?;
        (off < self.size).then_some(off)
    }
}

/// The first kernel address in `report` that lies in one of `ranges`, as
/// `0x… (kvm_amd+0x…)`. Addresses are read as 16 hex digits (with or without `0x`, as
/// stacks and registers print them) or as the decimal numbers of `lpvmm regs --json`.
pub fn address_in_report(report: &str, ranges: &[CodeRange]) -> Option<String> {
    report
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter_map(address)
        .find_map(|a| {
            ranges.iter().find_map(|m| {
                m.offset_of(a)
                    .map(|off| format!("{a:#x} ({}+{off:#x})", m.name))
            })
        })
}

/// How the harness says a guest died executing lpvmm's patch code
/// ([`death_in_patch_code`]): never retried.
pub const DIED_IN_PATCH_CODE: &str = "the guest died executing lpvmm's patch code";

/// Whether a guest death's report places the death in lpvmm's patch code: where the
/// test host's trace says the shutdown happened (`reason shutdown rip 0x…`) or the
/// guest's oops says it was (`RIP: 0010:0x…`, the form for code outside the kernel's
/// symbols), inside a range the VMM announced (`PATCH_CODE_MAPPED START-END`). Other
/// addresses of patch code in a report (a blocked task's stack, `patch status`) say
/// nothing of where a guest died and are not read.
pub fn death_in_patch_code(report: &str) -> Option<String> {
    let ranges = patch_code_ranges(report);
    let where_died: String = report
        .lines()
        .filter_map(|l| {
            l.split("reason shutdown rip ")
                .nth(1)
                .or_else(|| l.split("RIP: 0010:").nth(1))
                .and_then(|r| r.split_whitespace().next())
        })
        .collect::<Vec<_>>()
        .join(" ");
    address_in_report(&where_died, &ranges)
}

/// Where a report places a guest's death: the test host's trace of its shutdown
/// (`reason shutdown rip 0x…`) and the oops lpvmm saw on the guest's console before the
/// panic (`the guest's last oops was at RIP: 0010:…`, an address or `function+off/size`).
/// Other addresses and oopses in a report (a warning earlier in the run, a task's
/// stack) say nothing of where the guest died and are not read.
pub fn death_places(report: &str) -> Vec<String> {
    let oops = format!("{} RIP: 0010:", lpvmm::devices::LAST_OOPS_AT);
    report
        .lines()
        .filter_map(|l| {
            l.split("reason shutdown rip ")
                .nth(1)
                .or_else(|| l.split(oops.as_str()).nth(1))
                .and_then(|r| r.split_whitespace().next())
                .map(str::to_string)
        })
        .collect()
}

/// Where a dead vCPU was, as a report gives it: the test host's trace of the shutdown
/// exit (`reason shutdown rip 0x…`) and lpvmm's own triple-fault line (`triple fault on
/// vCPU N at rip 0x…`). The one place an address of the test host's KVM code names the
/// host: a running guest's vCPU (`lpvmm regs`), a task's stack or other output may hold
/// an address of the guest's own module area, which can overlap the host's KVM range.
pub fn dead_vcpu_rips(report: &str) -> Vec<String> {
    report
        .lines()
        .filter_map(|l| {
            let rest = l.split("reason shutdown rip ").nth(1).or_else(|| {
                l.split("triple fault on vCPU ")
                    .nth(1)
                    .and_then(|r| r.split(" at rip ").nth(1))
            })?;
            rest.split_whitespace()
                .next()
                .map(|t| t.trim_end_matches([',', ')']).to_string())
        })
        .collect()
}

/// The patch code the VMM announced it mapped in the guest (`PATCH_CODE_MAPPED
/// START-END`, in its stderr or a report quoting it).
pub fn patch_code_ranges(report: &str) -> Vec<CodeRange> {
    report
        .lines()
        .filter_map(|l| l.split(lpvmm::session::patching::PATCH_CODE_MAPPED).nth(1))
        .filter_map(|rest| {
            let (a, b) = rest.split_whitespace().next()?.split_once('-')?;
            let hex = |x: &str| u64::from_str_radix(x.strip_prefix("0x")?, 16).ok();
            let (start, end) = (hex(a)?, hex(b)?);
            (end > start).then(|| CodeRange {
                name: "lpvmm's patch code".into(),
                start,
                size: end - start,
            })
        })
        .collect()
}

/// A token of a report read as a kernel address, if it is one.
fn address(token: &str) -> Option<u64> {
    let hex = token.strip_prefix("0x").unwrap_or(token);
    let value = if hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        u64::from_str_radix(hex, 16).ok()?
    } else if token.len() == 20 && token.bytes().all(|b| b.is_ascii_digit()) {
        token.parse().ok()?
    } else {
        return None;
    };
    // The kernel half of the address space.
    (value >= 0xffff_8000_0000_0000).then_some(value)
}

impl TestHost {
    /// The test host's KVM modules and where their code lies (none natively, or when
    /// the host cannot say).
    pub fn kvm_modules(&mut self) -> Vec<CodeRange> {
        if self.mode() == HostMode::Native {
            return Vec::new();
        }
        self.exec("grep -E '^kvm(_amd|_intel)? ' /proc/modules")
            .map(|m| CodeRange::kvm_modules(&m))
            .unwrap_or_default()
    }

    /// Set up the test host's trace of KVM into a ring buffer of 1 MiB per CPU (off
    /// until [`TestHost::restart_kvm_trace`]).
    pub fn trace_kvm(&mut self, what: KvmTrace) -> Result<(), String> {
        if self.mode() == HostMode::Native {
            return Err("the KVM trace is taken on the nested test host only".into());
        }
        let filter = match what {
            KvmTrace::Deaths => format!("exit_reason == {SVM_EXIT_SHUTDOWN}"),
            KvmTrace::Everything => "0".to_string(),
        };
        self.exec(&format!(
            "cd {TRACEFS} && echo 0 > tracing_on && echo 1024 > buffer_size_kb && \
             echo '{filter}' > events/kvm/kvm_exit/filter && \
             echo 1 > events/kvm/kvm_exit/enable && echo 1 > events/kvm/kvm_inj_exception/enable && \
             echo {} > events/kvm/kvm_userspace_exit/enable",
            u8::from(what == KvmTrace::Everything)
        ))
        .map(|_| ())
    }

    /// Empty the trace and start recording.
    pub fn restart_kvm_trace(&mut self) -> Result<(), String> {
        self.exec(&format!(
            "cd {TRACEFS} && echo > trace && echo 1 > tracing_on"
        ))
        .map(|_| ())
    }

    /// Stop the trace and say what it holds of a death: its shutdown exits and injected
    /// exceptions, and each vCPU's last exits (one busy vCPU would crowd out the other's
    /// in a single list). Never an error: what cannot be read says so.
    pub fn kvm_trace_of_death(&mut self) -> String {
        self.exec(&format!(
            "cd {TRACEFS} && echo 0 > tracing_on && echo \"events traced: $(grep -vc '^#' trace)\" && \
             grep -E 'shutdown|kvm_inj_exception' trace | tail -n 20; \
             for v in $(grep -o 'kvm_exit: vcpu [0-9]*' trace | sort -u | cut -d' ' -f3); do \
             echo \"-- last exits of vCPU $v:\"; grep \"kvm_exit: vcpu $v \" trace | tail -n 30; done"
        ))
        .unwrap_or_else(|e| format!("(no host trace: {e})"))
    }

    /// For a test that kills its guest on purpose: the trace of that death, with the
    /// trace restarted for the rest of the attempt; `None` where none is kept (natively,
    /// or with `LPVMM_TEST_HOST_TRACE=0`).
    pub fn trace_of_planned_death(&mut self) -> Result<Option<String>, String> {
        if self.mode() == HostMode::Native || harness_host_trace().is_none() {
            eprintln!("no test host trace here (native, or LPVMM_TEST_HOST_TRACE=0)");
            return Ok(None);
        }
        let trace = self.kvm_trace_of_death();
        self.restart_kvm_trace()?;
        Ok(Some(trace))
    }

    /// How the test host's kernel has been moving and backing memory (page migrations,
    /// compaction, transparent huge pages): whether the guests ran on 2 MiB pages (their
    /// deaths under 4 KiB nested pages: docs/testing.md, "Known platform quirks").
    pub fn memory_counters(&mut self) -> String {
        self.exec(
            "grep -E '^(pgmigrate_success|compact_stall|thp_fault_alloc|thp_fault_fallback|thp_collapse_alloc|thp_split_pmd) ' \
             /proc/vmstat | tr '\\n' ' '; grep AnonHugePages /proc/meminfo",
        )
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("(unavailable: {e})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODULES: &str = "kvm_amd 126976 0 - Live 0xffffffffc031f000\n\
        kvm 1146880 1 kvm_amd, Live 0xffffffffc0206000\n\
        irqbypass 16384 1 kvm, Live 0xffffffffc0201000\n";

    #[test]
    fn kvm_modules_are_read_from_proc_modules() {
        let m = CodeRange::kvm_modules(MODULES);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].name, "kvm_amd");
        assert_eq!((m[0].start, m[0].size), (0xffff_ffff_c031_f000, 126_976));
        // An unprivileged reader's zeros say nothing.
        assert!(CodeRange::kvm_modules("kvm_amd 126976 0 - Live 0x0000000000000000").is_empty());
        assert!(CodeRange::kvm_modules("").is_empty());
    }

    #[test]
    fn a_guest_holding_the_hosts_kvm_code_is_named_with_where() {
        let m = CodeRange::kvm_modules(MODULES);
        // As a blocked task's stack prints it (CI, 020614f), as `lpvmm regs` prints a
        // RIP in hex, and as `regs --json` prints it in decimal (2026-12-06).
        for report in [
            "      [<ffffffffc032ddcc>] 0xffffffffc032ddcc",
            "rip 0xffffffffc032ddcc rsp 0xffffc90000967b80",
            "\"rip\": 18446744072639143372,",
        ] {
            assert_eq!(
                address_in_report(report, &m).as_deref(),
                Some("0xffffffffc032ddcc (kvm_amd+0xedcc)"),
                "{report}"
            );
        }
    }

    #[test]
    fn a_death_is_placed_in_patch_code_only_by_where_the_guest_died() {
        let mapped = format!(
            "{} 0xffffffff94208000-0xffffffff94a04000 (patches and trampolines)",
            lpvmm::session::patching::PATCH_CODE_MAPPED
        );
        let shutdown = "vcpu0-124 [000] 51.8: kvm_exit: vcpu 0 reason shutdown rip             0xffffffff94208031 info1 0x0 info2 0x0 intr_info 0x80000b0e error_code 0x10";
        let oops = "[   63.2] RIP: 0010:0xffffffff94208031";
        for died in [shutdown, oops] {
            assert_eq!(
                death_in_patch_code(&format!("{mapped}\n{died}")).as_deref(),
                Some("0xffffffff94208031 (lpvmm's patch code+0x31)"),
                "{died}"
            );
        }
        // Outside the range (srso_return_thunk, 2026-12-06), without the VMM's line, or
        // patch code only on a stack or in `patch status`: not a death in patch code.
        let elsewhere = shutdown.replace("0xffffffff94208031", "0xffffffffb3a01a60");
        let stack = "[<ffffffff94208031>] lpvmm_getpid+0x31\n  getpid 0xffffffff94208000";
        for report in [
            format!("{mapped}\n{elsewhere}"),
            shutdown.to_string(),
            format!("{mapped}\n{stack}\n{elsewhere}"),
        ] {
            assert_eq!(death_in_patch_code(&report), None, "{report}");
        }
    }

    #[test]
    fn only_a_dead_vcpus_rip_is_read_as_where_it_was() {
        let report = "vCPU 1 rip 0xffffffffc032ddcc rsp 0xffffc90000967b80\n\
            {\"index\": 0, \"rip\": 18446744072639143372, \"rsp\": 1}\n\
            lpvmm: guest crashed (triple fault on vCPU 0 at rip 0xfff0 rsp 0x0 cr3 0x0): lpvmm ends the VM\n\
            kvm_exit: vcpu 0 reason shutdown rip 0xffffffffb3a01a60 info1 0x0\n\
            [<ffffffffc032ddcc>] RIP: 0010:0xffffffffc032ddcc";
        assert_eq!(dead_vcpu_rips(report), ["0xfff0", "0xffffffffb3a01a60"]);
    }

    #[test]
    fn a_death_is_placed_by_the_trace_or_the_oops_before_the_panic_only() {
        let report = format!(
            "[ 3.0] WARNING: CPU: 0 ...\n[ 3.0] RIP: 0010:memcpy+0x1/0x2\n\
             kvm_exit: vcpu 0 reason shutdown rip 0xffffffffb3a01a60 info1 0x0\n\
             lpvmm: guest kernel panic: Fatal exception in interrupt; {} RIP: 0010:srso_return_thunk+0x0/0x10",
            lpvmm::devices::LAST_OOPS_AT
        );
        assert_eq!(
            death_places(&report),
            ["0xffffffffb3a01a60", "srso_return_thunk+0x0/0x10"]
        );
        assert!(death_places("[ 3.0] RIP: 0010:memcpy+0x1/0x2").is_empty());
    }

    #[test]
    fn guest_addresses_and_other_numbers_are_not_the_hosts() {
        let m = CodeRange::kvm_modules(MODULES);
        for report in [
            // The guest's own kernel and patch area (below module space).
            "[<ffffffffb5810e3d>] __schedule+0x34d/0xa00 lpvmm_cum_common_nsleep 0xffffffffb7a0806a",
            // Just past kvm_amd's end, and just before kvm's start.
            "0xffffffffc033e000 0xffffffffc0205fff",
            // Short hex, user addresses, a 20-digit number below the kernel half.
            "rip 0xfff0 cr3 0x0 0x00007ffd12345678 12345678901234567890",
        ] {
            assert_eq!(address_in_report(report, &m), None, "{report}");
        }
        // Without the modules (natively) nothing is the host's.
        assert_eq!(address_in_report("0xffffffffc032ddcc", &[]), None);
    }
}
