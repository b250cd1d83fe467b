//! A seccomp filter per thread kind, so that a VMM that guest input has subverted can
//! still do only what a VMM does.
//!
//! `lpvmm run` reads hostile input all the time: the guest's memory (introspection and
//! patching), its port I/O (the devices) and control-socket lines. Each thread installs,
//! once its setup is done, a filter that allows the system calls its steady state makes
//! and nothing else (firecracker's model; the filters are built with rust-vmm's
//! seccompiler):
//!
//! - **vcpu**: `KVM_RUN`, the three register reads of a park and the register write
//!   that answers the module notifier's doorbell (no other ioctl), the
//!   console's writes, futexes, memory management, the kick signal's return;
//! - **api** (the main thread: event loop, console, control socket and every request):
//!   the same base without any KVM ioctl (the VM's descriptor needs none after setup),
//!   plus epoll, accepting and reading connections, the socket options it sets,
//!   terminal modes, signalling vCPU threads, removing its socket file at exit;
//! - **patch-driver** (the thread that drives transitions): the base, signalling vCPU
//!   threads, and one ioctl, `KVM_SIGNAL_MSI` (the interrupt that runs a callback in the
//!   guest, patcher::guestcall).
//!
//! A call outside a thread's filter raises SIGSYS; the handler says which thread made
//! which call and ends lpvmm with [`EXIT_CODE`], so a subverted VMM stops rather than
//! runs. `lpvmm run --no-seccomp` leaves the filters off (for debugging).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// lpvmm's exit code when a thread made a forbidden system call.
pub const EXIT_CODE: i32 = 31;

/// Which filter a thread runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ThreadKind {
    Vcpu = 1,
    Api = 2,
    PatchDriver = 3,
    /// The virtio devices' I/O thread (devices/virtio/iothread.rs).
    Io = 4,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
            ThreadKind::PatchDriver => "patch-driver",
            ThreadKind::Io => "io",
        }
    }

    fn from_u8(v: u8) -> Option<ThreadKind> {
        ALL.into_iter().find(|k| *k as u8 == v)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {kind} seccomp filter: {source}")]
    Build {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the {kind} seccomp filter: {source}")]
    Install {
        kind: &'static str,
        source: seccompiler::Error,
    },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

thread_local! {
    /// The filter this thread installed, for the SIGSYS handler's message.
    static KIND: Cell<u8> = const { Cell::new(0) };
}

/// `KVM_RUN` and the three register reads a park makes (`KVMIO` is KVM's ioctl type).
const KVM_RUN: u64 = 0xAE80;
const KVM_GET_REGS: u64 = 0x8090_AE81;
const KVM_GET_SREGS: u64 = 0x8138_AE83;
const KVM_GET_MSRS: u64 = 0xC008_AE88;
/// Answering the module notifier's doorbell (devices/doorbell.rs).
const KVM_SET_REGS: u64 = 0x4090_AE82;
/// The patch driver's one ioctl, on the VM: the interrupt of a guest call (callbacks).
const KVM_SIGNAL_MSI: u64 = 0x4020_AEA5;

/// `_IOW(KVMIO, nr, size)`, `_IOR(KVMIO, nr, size)`.
const fn kvm_iow(nr: u64, size: usize) -> u64 {
    (1 << 30) | ((size as u64) << 16) | (0xAE << 8) | nr
}
const fn kvm_ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (0xAE << 8) | nr
}

/// What a vCPU thread writes to put its vCPU back in its boot state at a guest reboot
/// (vstate/reset.rs; `KVM_SET_REGS` is above).
const VCPU_RESET: [u64; 8] = [
    kvm_iow(0x84, std::mem::size_of::<kvm_bindings::kvm_sregs>()),
    kvm_iow(0x8d, std::mem::size_of::<kvm_bindings::kvm_fpu>()),
    kvm_iow(0xa7, std::mem::size_of::<kvm_bindings::kvm_xcrs>()),
    kvm_iow(0x89, std::mem::size_of::<kvm_bindings::kvm_msrs>()),
    kvm_iow(0x8f, std::mem::size_of::<kvm_bindings::kvm_lapic_state>()),
    kvm_iow(0x99, std::mem::size_of::<kvm_bindings::kvm_mp_state>()),
    kvm_iow(0xa0, std::mem::size_of::<kvm_bindings::kvm_vcpu_events>()),
    kvm_iow(0xa2, std::mem::size_of::<kvm_bindings::kvm_debugregs>()),
];

/// What the api thread writes to the VM at a guest reboot: the PIC/IOAPIC
/// (`KVM_SET_IRQCHIP`, which is an `_IOR`) and the PIT (`KVM_SET_PIT2`).
const PLATFORM_RESET: [u64; 2] = [
    kvm_ior(0x63, std::mem::size_of::<kvm_bindings::kvm_irqchip>()),
    kvm_iow(0xa0, std::mem::size_of::<kvm_bindings::kvm_pit_state2>()),
];

/// System calls every thread makes in its steady state: memory, futexes, time, logging
/// to stderr (and the console to stdout), signals' return, a panic's abort, exit.
const COMMON: &[i64] = &[
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_futex,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The api thread's calls beyond [`COMMON`].
const API: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_fcntl,
    libc::SYS_unlink,
    // A guest reboot reads the kernel and initrd again from their open files.
    libc::SYS_lseek,
];

/// The I/O thread's calls beyond [`COMMON`]: its event loop, the eventfds it reads,
/// and the disks' positioned reads, writes and flushes. No ioctl, no open.
const IO: &[i64] = &[
    libc::SYS_read,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_epoll_ctl,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
];

/// Every thread kind.
const ALL: [ThreadKind; 4] = [
    ThreadKind::Vcpu,
    ThreadKind::Api,
    ThreadKind::PatchDriver,
    ThreadKind::Io,
];

/// Terminal and file-descriptor ioctls the api thread makes (restoring the console's
/// mode at exit, non-blocking sockets).
const API_IOCTLS: &[u64] = &[
    libc::TCGETS,
    libc::TCSETS,
    libc::TCSETSW,
    libc::TCSETSF,
    libc::TIOCGWINSZ,
    libc::FIONBIO,
];

fn ioctl_request_is(value: u64) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?])
}

/// The rules of `kind`'s filter: syscall number → conditions (none: always allowed).
fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        COMMON.iter().map(|&n| (n, Vec::new())).collect();
    // Rust's std, built with debug assertions, asks fcntl(F_GETFD) whether a descriptor
    // is open before closing it (a thread's kvm_run and eventfds at exit); the api
    // thread's fcntl is unrestricted anyway.
    if kind != ThreadKind::Api {
        rules.insert(
            libc::SYS_fcntl,
            vec![SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::F_GETFD as u64,
            )?])?],
        );
    }
    // After setup, the VM's own descriptor takes one ioctl, from the patch driver: the
    // interrupt of a guest call. vCPU threads touch their vCPUs.
    let vcpu: Vec<u64> = [
        KVM_RUN,
        KVM_GET_REGS,
        KVM_GET_SREGS,
        KVM_GET_MSRS,
        KVM_SET_REGS,
    ]
    .into_iter()
    .chain(VCPU_RESET)
    .collect();
    let api: Vec<u64> = API_IOCTLS.iter().copied().chain(PLATFORM_RESET).collect();
    let ioctls: &[u64] = match kind {
        ThreadKind::Vcpu => &vcpu,
        ThreadKind::Api => {
            rules.extend(API.iter().map(|&n| (n, Vec::new())));
            &api
        }
        ThreadKind::PatchDriver => &[KVM_SIGNAL_MSI],
        ThreadKind::Io => {
            rules.extend(IO.iter().map(|&n| (n, Vec::new())));
            &[]
        }
    };
    if !ioctls.is_empty() {
        let allowed = ioctls
            .iter()
            .map(|&v| ioctl_request_is(v))
            .collect::<Result<_, _>>()?;
        rules.insert(libc::SYS_ioctl, allowed);
    }
    Ok(rules)
}

/// The compiled filter of `kind`.
pub fn program(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build {
        kind: kind.name(),
        source,
    };
    let filter = SeccompFilter::new(
        rules(kind).map_err(build)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    filter.try_into().map_err(build)
}

/// Install `kind`'s filter on the calling thread (for good: filters cannot be removed).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let prog = program(kind)?;
    seccompiler::apply_filter(&prog).map_err(|source| SeccompError::Install {
        kind: kind.name(),
        source,
    })?;
    KIND.with(|k| k.set(kind as u8));
    try_forbidden_if_asked(kind);
    Ok(())
}

/// The self-test the integration suite uses: with `LPVMM_SECCOMP_SELFTEST=KIND` in its
/// environment, the thread of that kind makes one call no filter allows (`socket(2)`)
/// right after installing its filter (and, with `--no-seccomp`, simply makes it).
pub const SELFTEST_ENV: &str = "LPVMM_SECCOMP_SELFTEST";

fn try_forbidden_if_asked(kind: ThreadKind) {
    if std::env::var(SELFTEST_ENV).ok().as_deref() == Some(kind.name()) {
        // SAFETY: socket(2) with constant arguments; the descriptor is closed at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            // SAFETY: closing the descriptor just created.
            unsafe { libc::close(fd) };
        }
        tracing::warn!(
            "seccomp self-test: the {} thread made socket(2)",
            kind.name()
        );
    }
}

/// With the filters off, the self-test's call for `kind` still happens (so a test can
/// tell the filter is what stops it).
pub fn selftest_without_filter(kind: ThreadKind) {
    try_forbidden_if_asked(kind);
}

/// The control socket's path, for the SIGSYS handler to remove (it can neither allocate
/// nor take locks; reading a set `OnceLock` does neither). Set before any filter.
static SOCKET_PATH: OnceLock<CString> = OnceLock::new();

/// Install the process-wide SIGSYS handler that reports a forbidden call, removes the
/// control socket `socket` when the api thread made it, and exits.
pub fn install_handler(socket: &Path) -> Result<(), SeccompError> {
    if let Ok(path) = CString::new(socket.as_os_str().as_bytes()) {
        let _ = SOCKET_PATH.set(path);
    }
    // SAFETY: a zeroed sigaction is valid; the handler only makes async-signal-safe
    // calls (write, _exit).
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// The system call number of a SIGSYS `siginfo_t` (`si_syscall`, after `si_call_addr`,
/// at byte 24 on x86-64).
///
/// # Safety
/// `info` points at the kernel's siginfo for a SIGSYS.
unsafe fn si_syscall(info: *const libc::siginfo_t) -> i32 {
    // SAFETY: the caller passes a valid siginfo_t, which is 128 bytes long.
    unsafe { std::ptr::read_unaligned((info as *const u8).add(24) as *const i32) }
}

/// A small decimal formatter that allocates nothing (for the signal handler).
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// The handler's message, assembled without allocating.
fn report(kind: &str, syscall: i32, out: &mut [u8; 256]) -> usize {
    let mut num = [0u8; 20];
    let parts: [&[u8]; 5] = [
        b"\r\nlpvmm: seccomp: the ",
        kind.as_bytes(),
        b" thread made system call ",
        decimal(syscall.max(0) as u64, &mut num),
        b", which its filter does not allow; lpvmm ends the VM (see docs/running-vms.md, \"A locked-down VMM\")\n",
    ];
    let mut len = 0;
    for p in parts {
        let n = p.len().min(out.len() - len);
        out[len..len + n].copy_from_slice(&p[..n]);
        len += n;
    }
    len
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let kind = KIND.with(|k| ThreadKind::from_u8(k.get()));
    // SAFETY: the kernel hands a SIGSYS handler its siginfo.
    let nr = unsafe { si_syscall(info) };
    let mut msg = [0u8; 256];
    let len = report(
        kind.map(ThreadKind::name).unwrap_or("unknown"),
        nr,
        &mut msg,
    );
    // SAFETY: write(2), unlink(2) and _exit(2) are async-signal-safe; the path was set
    // before any filter existed. Only the api thread's filter allows unlink (a second
    // forbidden call here would kill lpvmm without its exit code): a VM ended from
    // another thread leaves a stale socket, which `lpvmm ls`/`status` report as not
    // running and the next `lpvmm run` of that name clears.
    unsafe {
        libc::write(
            libc::STDERR_FILENO,
            msg.as_ptr() as *const libc::c_void,
            len,
        );
        if kind == Some(ThreadKind::Api) {
            if let Some(path) = SOCKET_PATH.get() {
                libc::unlink(path.as_ptr());
            }
        }
        libc::_exit(EXIT_CODE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_and_keeps_the_calls_apart() {
        for kind in ALL {
            let prog = program(kind).unwrap();
            assert!(!prog.is_empty());
            let r = rules(kind).unwrap();
            assert_eq!(
                r.contains_key(&libc::SYS_ioctl),
                kind != ThreadKind::Io,
                "{kind:?}"
            );
            assert!(!r.contains_key(&libc::SYS_socket), "{kind:?}");
            assert!(!r.contains_key(&libc::SYS_execve), "{kind:?}");
            assert!(!r.contains_key(&libc::SYS_openat), "{kind:?}");
        }
        assert!(rules(ThreadKind::Api)
            .unwrap()
            .contains_key(&libc::SYS_accept4));
        assert!(!rules(ThreadKind::Vcpu)
            .unwrap()
            .contains_key(&libc::SYS_accept4));
        assert!(!rules(ThreadKind::PatchDriver)
            .unwrap()
            .contains_key(&libc::SYS_read));
        let io = rules(ThreadKind::Io).unwrap();
        assert!(io.contains_key(&libc::SYS_pwrite64) && io.contains_key(&libc::SYS_fdatasync));
        assert!(!rules(ThreadKind::Vcpu)
            .unwrap()
            .contains_key(&libc::SYS_pwrite64));
        assert_eq!(rules(ThreadKind::Vcpu).unwrap()[&libc::SYS_ioctl].len(), 13);
        assert_eq!(
            rules(ThreadKind::PatchDriver).unwrap()[&libc::SYS_ioctl].len(),
            1,
            "the patch driver's one ioctl: KVM_SIGNAL_MSI"
        );
    }

    #[test]
    fn the_kvm_request_numbers_are_the_kernels() {
        // _IO(KVMIO, 0x80); _IOR(KVMIO, 0x81, struct kvm_regs) and so on.
        const KVMIO: u64 = 0xAE;
        let ior = |nr: u64, size: usize| (2u64 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr;
        let iowr = |nr: u64, size: usize| (3u64 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr;
        assert_eq!(KVM_RUN, (KVMIO << 8) | 0x80);
        assert_eq!(
            KVM_GET_REGS,
            ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>())
        );
        assert_eq!(
            KVM_GET_SREGS,
            ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>())
        );
        assert_eq!(
            KVM_GET_MSRS,
            iowr(0x88, std::mem::size_of::<kvm_bindings::kvm_msrs>())
        );
        let iow = |nr: u64, size: usize| (1u64 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr;
        assert_eq!(
            KVM_SET_REGS,
            iow(0x82, std::mem::size_of::<kvm_bindings::kvm_regs>())
        );
        assert_eq!(
            KVM_SIGNAL_MSI,
            iow(0xa5, std::mem::size_of::<kvm_bindings::kvm_msi>())
        );
        // KVM_SET_SREGS and KVM_SET_IRQCHIP as kvm-ioctls spells them.
        assert_eq!(VCPU_RESET[0], 0x4138_AE84);
        assert_eq!(PLATFORM_RESET[0], 0x8208_AE63);
    }

    #[test]
    fn the_report_names_thread_and_call_without_allocating() {
        let mut out = [0u8; 256];
        let n = report("vcpu", 41, &mut out);
        let text = std::str::from_utf8(&out[..n]).unwrap();
        assert!(
            text.contains("the vcpu thread made system call 41, which its filter does not allow")
        );
        assert_eq!(decimal(0, &mut [0; 20]), b"0");
        assert_eq!(decimal(u64::MAX, &mut [0; 20]), b"18446744073709551615");
    }
}
