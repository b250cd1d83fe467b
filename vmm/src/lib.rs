//! lpvmm: boots Linux guests on KVM and live-patches their kernels from the
//! hypervisor. The VMM is this library; the `lpvmm` binary only parses arguments.
//!
//! Its parts, each a folder, in the order a request meets them (docs/architecture.md
//! draws them):
//! - [`cli`]: the client commands, which talk to a running VM's control socket;
//! - [`control`]: the socket server and the client;
//! - [`proto`]: the wire protocol, every request and answer (a leaf: it uses no other
//!   part);
//! - [`session`]: a running VM with its attached guest kernel and patch engine, and
//!   the requests' glue ([`session::inspect`], [`session::patching`]);
//! - [`vstate`]: the VM core (KVM objects, memory, vCPU threads, pause and resume);
//! - [`arch`]: platform setup (layout, boot parameters, CPU, ACPI tables);
//! - [`devices`]: the guest's devices (serial console, reset, poweroff, PCI host bridge).
//!
//! [`run`] is the composition root (a VM, its console and its control socket);
//! [`seccomp`] and [`hostcheck`] confine the process and check the host.

// Every `unsafe` block says why it is sound (a `// SAFETY:` line), checked by clippy.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod arch;
pub mod cli;
pub mod control;
pub mod devices;
pub mod hostcheck;
pub mod proto;
pub mod run;
pub mod seccomp;
pub mod session;
pub mod vstate;

/// When this process began, as the binary marks it first thing in `main`
/// ([`mark_process_start`]): `status` reports the time from there to the first
/// `KVM_RUN` (how long the VMM takes to start a guest).
static PROCESS_START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Mark now as the start of the process (the first call counts).
pub fn mark_process_start() {
    PROCESS_START.get_or_init(std::time::Instant::now);
}

/// The instant [`mark_process_start`] recorded, if it was called.
pub fn process_start() -> Option<std::time::Instant> {
    PROCESS_START.get().copied()
}

/// The kernel command line `lpvmm run` gives a guest unless told otherwise.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// An error and its causes on one line, as `{:#}` writes them, less each cause whose
/// text the line already holds: errors that keep their cause as a `source` and also say
/// it in their message (so that their own text is whole) print it once.
pub fn error_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_line_says_each_cause_once() {
        let guest = introspection::GuestError::Unmapped {
            addr: 0x1000,
            len: 8,
        };
        let e = patcher::KpError::guest("reading the site of f", guest);
        let line = super::error_line(&e);
        assert_eq!(line.matches("0x1000").count(), 1, "{line}");
        assert!(line.starts_with("reading the site of f: "), "{line}");
        let io = std::io::Error::other("disk gone");
        let wrapped = anyhow::Error::new(io).context("saving");
        assert_eq!(super::error_line(wrapped.as_ref()), "saving: disk gone");
    }
}
