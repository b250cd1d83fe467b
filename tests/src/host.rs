//! The test host (native or nested) and guests started on it.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lpvmm::proto::{RegsResult, StatusInfo};

use crate::console::{tail, Console};
use crate::verdict::{decide, Decision, Evidence};
use crate::{images_dir, lpvmm_binary, repo_root};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostMode {
    Native,
    Nested,
}

/// Under nested TCG a guest boot takes tens of seconds; leave room for slow CI.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
pub const CMD_TIMEOUT: Duration = Duration::from_secs(120);
/// The test guests' kernel command line: lpvmm's default with `loglevel=5`, so that the
/// console shows warnings, oopses and panics but not the boot's informational lines.
/// Every console byte is a VM exit, and on the nested test host that halves a boot
/// (22 to 12 s for 6.1, 31 to 15 s for 6.12; docs/testing.md).
pub const GUEST_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 loglevel=5";
/// How long a VMM may take to exit once the guest asked it to.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(120);
/// The guest shell's prompt (guest-images/rootfs/guest-init).
pub const PROMPT: &str = "guest# ";

/// What `lpvmm run` boots for a test: the kernel of a series, an initrd (a path on the
/// host), the kernel command line and any other options.
pub struct GuestSpec<'a> {
    pub series: &'a str,
    pub vcpus: u8,
    pub initrd: &'a str,
    pub cmdline: &'a str,
    pub extra: &'a str,
}

impl<'a> GuestSpec<'a> {
    /// The busybox test guest's: [`GUEST_CMDLINE`].
    pub fn busybox(series: &'a str, vcpus: u8, initrd: &'a str, extra: &'a str) -> Self {
        GuestSpec {
            series,
            vcpus,
            initrd,
            cmdline: GUEST_CMDLINE,
            extra,
        }
    }
}

pub struct TestHost {
    mode: HostMode,
    /// Nested: the QEMU process; its ttyS0 shell and ttyS1 guest console.
    qemu: Option<Child>,
    shell: Option<Console>,
    ttys1: Option<Console>,
    /// Native: the running lpvmm and its console.
    native_guest: Option<(Child, Console, PathBuf)>,
    workdir: PathBuf,
    seq: u64,
    /// Extra files (local path, path on the nested host).
    files: Vec<(PathBuf, String)>,
    /// Disk images the host gets as block devices (see [`TestHost::disk`]).
    disks: Vec<PathBuf>,
    /// Set when a VMM started here could not be ended even by SIGKILL: the host's
    /// kernel holds it, and the group runner replaces the host.
    wedged: Option<String>,
}

/// A command for the nested test host's shell (dash and busybox: no `pkill`) that sends
/// `sig` to every child of the process whose id `pid` expands to, by the `PPid` of each
/// /proc/PID/status.
pub fn kill_children(pid: &str, sig: &str) -> String {
    format!(
        "kill -{sig} $(awk -v pp=\"{pid}\" '/^PPid:/ && $2 == pp {{ split(FILENAME, f, \"/\"); \
         print f[3] }}' /proc/[0-9]*/status 2>/dev/null) 2>/dev/null"
    )
}

/// How many times a boot, or a test, is tried when the platform kills its guest (or,
/// for a test, its whole test host): at the rates measured on 2026-11-24 (a few per
/// hundred boots, docs/testing.md) one retry still left a whole-suite failure likely
/// every few runs; two retries make it rare. Every retry prints a WARNING.
pub const PLATFORM_ATTEMPTS: u32 = 3;

/// The file [`TestHost::mark_attempt`] touches in the host's scratch directory.
const ATTEMPT_MARK: &str = "lpvmm-attempt.mark";

pub use crate::verdict::platform_guest_death;

/// Whether a report names the test host at fault in lpvmm's or the harness's words
/// ([`crate::verdict::HostFault`]; an address of the host's KVM code counts only where
/// the harness named it, with [`crate::HOST_CODE_IN_GUEST`]). The boot watch asks it of
/// `lpvmm regs`, to end a stalled boot at once.
pub fn platform_host_fault(report: &str) -> bool {
    crate::verdict::host_fault_of(report, &[]).is_some()
        || report.contains(crate::HOST_CODE_IN_GUEST)
}

/// How the harness introduces what the nested test host's own kernel logged about
/// itself during a failed attempt ([`TestHost::host_kernel_faults_since_mark`]): a soft
/// or hard lockup, an RCU stall, an oops or BUG. No user-space program can make a
/// healthy kernel do that, so the host is replaced and the test runs again.
pub const HOST_KERNEL_FAULT: &str = "the test host's own kernel reported a fault";

/// How the test host's kernel starts the message of its own failure, right after the
/// log's time stamp (kernel-format lines only: the kernel also logs a user-space crash,
/// `traps: lpvmm[912] general protection fault ip:…`, and `lpvmm[912]: segfault at …`,
/// which are lpvmm's, never the host's).
const HOST_FAULT_STARTS: &[&str] = &[
    "watchdog: BUG: soft lockup",
    "watchdog: Watchdog detected hard LOCKUP",
    "BUG: ",
    "Oops: ",
    "general protection fault",
    "Kernel panic - not syncing",
];

/// The lines of `log` (a `dmesg` with time stamps) that say the kernel itself failed.
pub fn host_fault_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            let msg = crate::kernel_message(l).unwrap_or("");
            HOST_FAULT_STARTS.iter().any(|m| msg.starts_with(m))
                || (msg.starts_with("rcu: INFO: ") && msg.contains("detected stall"))
        })
        .collect()
}

/// How the harness names a boot that stalled with a vCPU holding registers no guest can
/// have: a page-table root outside the guest's RAM. lpvmm writes no vCPU register after
/// setting up the boot, and a booting Linux loads CR3 only with its own page tables, so
/// the value came from the platform (seen 2026-11-24 and 2026-12-02: CR3 just below
/// 3 GiB, inside the *test host's* RAM, in a 512 MiB guest).
pub const IMPOSSIBLE_AT_BOOT: &str = "registers no guest can have";

/// The vCPUs of `regs --json` whose CR3 lies outside `memory` bytes of guest RAM.
fn impossible_cr3(regs: &RegsResult, memory: u64) -> Vec<String> {
    regs.vcpus
        .iter()
        .filter_map(|v| {
            let cr3 = v.cr3 & 0x000f_ffff_ffff_f000;
            (cr3 >= memory).then(|| {
                format!(
                    "vCPU {} has CR3 {cr3:#x}, outside the guest's {} MiB of RAM",
                    v.index,
                    memory >> 20
                )
            })
        })
        .collect()
}

/// How the harness says a VMM process outlived SIGKILL.
pub const SURVIVED_SIGKILL: &str = "survived SIGKILL";

/// A boot whose guest console stays silent this long has its vCPUs asked where they
/// are (`lpvmm regs`), so that a vCPU held by the host kernel fails the boot at once
/// rather than after [`BOOT_TIMEOUT`].
const BOOT_SILENCE: Duration = Duration::from_secs(60);

/// How long a VMM gets to die after SIGKILL (freeing a 512 MiB guest under TCG takes
/// a few seconds).
const KILL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a watched boot did not reach the guest's ready line.
#[derive(Debug)]
pub enum BootFailure {
    /// The VMM exited first: what it printed on stderr, and the guest console's last
    /// output.
    Exited { stderr: String, console: String },
    /// Anything else (a timeout, trouble with the host), with the details.
    Other(String),
}

impl BootFailure {
    pub fn report(&self) -> String {
        match self {
            BootFailure::Exited { stderr, console } => format!(
                "the VMM exited during boot:\n{stderr}\nthe guest console's last output:\n{}",
                tail(console, 1500)
            ),
            BootFailure::Other(e) => e.clone(),
        }
    }
}

/// How an lpvmm run ended.
#[derive(Debug)]
pub struct GuestExit {
    pub code: i32,
    pub stderr: String,
}

fn native_kvm_usable() -> bool {
    if std::env::var_os("LPVMM_TEST_FORCE_NESTED").is_some() {
        return false;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default();
    let hw = flags.split_whitespace().any(|f| f == "vmx" || f == "svm");
    hw && Path::new("/dev/kvm").exists()
}

impl TestHost {
    /// Boot the test host (or use this machine when its KVM can run stock kernels).
    pub fn start() -> Result<TestHost, String> {
        Self::start_with(false)
    }

    /// Like [`TestHost::start`]; `with_qemu` also puts QEMU (microvm build) on the
    /// nested host, for benchmarks that compare with it.
    pub fn start_with(with_qemu: bool) -> Result<TestHost, String> {
        Self::start_with_files(with_qemu, &[])
    }

    /// Like [`TestHost::start_with`], with extra files on the host: each local file is
    /// at the given absolute path there (see [`TestHost::file`]).
    pub fn start_with_files(
        with_qemu: bool,
        files: &[(PathBuf, String)],
    ) -> Result<TestHost, String> {
        Self::start_with_disks(with_qemu, files, &[])
    }

    /// Like [`TestHost::start_with_files`], with disk images: the host sees each as a
    /// block device of its own ([`TestHost::disk`]) whose writes never reach the image
    /// (QEMU's `snapshot=on` nested; a sparse copy in the work directory natively), so
    /// that every host starts from the image as built.
    pub fn start_with_disks(
        with_qemu: bool,
        files: &[(PathBuf, String)],
        disks: &[PathBuf],
    ) -> Result<TestHost, String> {
        let images = images_dir();
        for need in [
            "guest-6.1/vmlinuz",
            "guest-6.12/vmlinuz",
            "guest-initrd.cpio.gz",
        ] {
            if !images.join(need).exists() {
                return Err(format!(
                    "missing {}: build the images first with guest-images/build.sh \
                     (or run scripts/test.sh, which does everything)",
                    images.join(need).display()
                ));
            }
        }
        // The tests crate cannot depend on a binary, so make sure the one under test is
        // current (a no-op when it is).
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let release = crate::release_build().then_some("--release");
        let built = Command::new(cargo)
            .args(["build", "--quiet", "-p", "lpvmm"])
            .args(release)
            .current_dir(repo_root())
            .status()
            .map_err(|e| format!("cargo build -p lpvmm: {e}"))?;
        if !built.success() || !lpvmm_binary().exists() {
            return Err(format!("could not build {}", lpvmm_binary().display()));
        }
        let workdir = std::env::temp_dir().join(format!("lpvmm-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&workdir);
        std::fs::create_dir_all(&workdir).map_err(|e| format!("workdir: {e}"))?;
        let mut host = TestHost {
            mode: if native_kvm_usable() {
                HostMode::Native
            } else {
                HostMode::Nested
            },
            qemu: None,
            shell: None,
            ttys1: None,
            native_guest: None,
            workdir,
            seq: 0,
            files: files.to_vec(),
            disks: disks.to_vec(),
            wedged: None,
        };
        if host.mode == HostMode::Nested {
            host.boot_nested(with_qemu)?;
        } else {
            host.copy_disks()?;
        }
        eprintln!("test host: {:?}", host.mode);
        Ok(host)
    }

    pub fn mode(&self) -> HostMode {
        self.mode
    }

    fn boot_nested(&mut self, with_qemu: bool) -> Result<(), String> {
        let images = images_dir();
        let t0 = Instant::now();
        let payload = self.workdir.join("payload.cpio");
        let mut payload_cmd = Command::new("bash");
        payload_cmd.arg(repo_root().join("guest-images/host-payload.sh"));
        if with_qemu {
            payload_cmd.arg("--qemu");
        }
        let extras: Vec<String> = self
            .files
            .iter()
            .map(|(src, dest)| format!("{}={dest}", src.display()))
            .collect();
        let status = payload_cmd
            .arg(lpvmm_binary())
            .arg(&payload)
            .args(&extras)
            .env("LPVMM_IMAGES", &images)
            .status()
            .map_err(|e| format!("host-payload.sh: {e}"))?;
        if !status.success() {
            return Err(format!("guest-images/host-payload.sh failed: {status}"));
        }
        // The kernel accepts concatenated cpio archives: base system, then payload.
        let initrd = self.workdir.join("host-initrd.cpio");
        let mut out = File::create(&initrd).map_err(|e| e.to_string())?;
        for part in [images.join("host/base.cpio"), payload] {
            let mut f = File::open(&part).map_err(|e| format!("{}: {e}", part.display()))?;
            std::io::copy(&mut f, &mut out).map_err(|e| e.to_string())?;
        }
        drop(out);

        let s0 = self.workdir.join("ttyS0.sock");
        let s1 = self.workdir.join("ttyS1.sock");
        let chardev =
            |id: &str, p: &Path| format!("socket,id={id},path={},server=on,wait=off", p.display());
        let mut cmd = Command::new("qemu-system-x86_64");
        // One vCPU: with two, QEMU's multi-threaded TCG killed about half the guests
        // within two minutes of the hammer load; with one, none of 8 (`bench deaths 4
        // hammer 6.1`, docs/testing.md "The test host has one vCPU").
        let smp = std::env::var("LPVMM_TEST_HOST_SMP").unwrap_or_else(|_| "1".to_string());
        let accel = std::env::var("LPVMM_TEST_HOST_ACCEL")
            .unwrap_or_else(|_| "tcg,thread=multi".to_string());
        cmd.args([
            "-accel",
            &accel,
            "-cpu",
            "EPYC,+svm,+npt",
            "-smp",
            &smp,
            "-m",
            "3G",
        ])
        .args([
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-monitor",
            "none",
        ])
        .arg("-kernel")
        .arg(images.join("host/vmlinuz"))
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            &format!(
                "console=ttyS0 loglevel=1 panic=-1 mitigations=off nokaslr {}",
                std::env::var("LPVMM_TEST_HOST_APPEND").unwrap_or_default()
            ),
        ])
        .args(self.disks.iter().flat_map(|d| {
            let drive = format!(
                "file={},format=raw,if=virtio,snapshot=on,cache=unsafe",
                d.display()
            );
            ["-drive".to_string(), drive]
        }))
        .args(["-chardev", &chardev("s0", &s0), "-serial", "chardev:s0"])
        .args(["-chardev", &chardev("s1", &s1), "-serial", "chardev:s1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(self.workdir.join("qemu.err")).map_err(|e| e.to_string())?);
        // SAFETY: prctl in the child before exec; QEMU dies with the test process.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.qemu = Some(cmd.spawn().map_err(|e| {
            format!("cannot start qemu-system-x86_64 ({e}); scripts/test.sh installs it")
        })?);

        let connect = |p: &Path| -> Result<UnixStream, String> {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(s) = UnixStream::connect(p) {
                    return Ok(s);
                }
                if Instant::now() > deadline {
                    return Err(format!("QEMU never opened {}", p.display()));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        let a = connect(&s0)?;
        let b = connect(&s1)?;
        let shell = Console::new("host", a.try_clone().map_err(|e| e.to_string())?, a);
        self.ttys1 = Some(Console::new(
            "guest",
            b.try_clone().map_err(|e| e.to_string())?,
            b,
        ));
        let ready = shell.wait_for("LPVMM-HOST-READY", BOOT_TIMEOUT, |t| {
            if let Some(i) = t.find("LPVMM-HOST-ERROR") {
                return Some((i, t.len()));
            }
            t.find("LPVMM-HOST-READY").map(|i| (i, i + 16))
        });
        let (_, matched) = ready.map_err(|e| {
            let qerr = std::fs::read_to_string(self.workdir.join("qemu.err")).unwrap_or_default();
            format!("{e}\nqemu stderr: {qerr}")
        })?;
        if matched.starts_with("LPVMM-HOST-ERROR") {
            return Err(format!("test host failed: {matched}"));
        }
        self.shell = Some(shell);
        eprintln!("test host up in {:.1}s", t0.elapsed().as_secs_f64());
        Ok(())
    }

    /// Run a shell command on the host; returns (exit status, stdout+stderr).
    pub fn exec_status(&mut self, cmd: &str, timeout: Duration) -> Result<(i32, String), String> {
        match self.mode {
            HostMode::Native => {
                let out = Command::new("sh")
                    .arg("-c")
                    .arg(format!("{{\n{cmd}\n}} 2>&1"))
                    .env("PATH", native_path())
                    .stdin(Stdio::null())
                    .output()
                    .map_err(|e| format!("sh: {e}"))?;
                Ok((
                    out.status.code().unwrap_or(-1),
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                ))
            }
            HostMode::Nested => {
                self.seq += 1;
                let marker = format!("__LPVMM_DONE_{}_", self.seq);
                let shell = self.shell.as_mut().ok_or("no host shell")?;
                shell.send(&format!(
                    "{{\n{cmd}\n}} </dev/null 2>&1; echo \"{marker}$?__\"\n"
                ))?;
                let waited = shell.wait_for(&format!("end of `{cmd}`"), timeout, |t| {
                    let i = t.find(&marker)?;
                    let rest = &t[i + marker.len()..];
                    let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
                    if digits == 0 || !rest[digits..].starts_with("__") {
                        return None;
                    }
                    Some((i, i + marker.len() + digits + 2))
                });
                let (before, matched) = waited.map_err(|e| format!("{e}{}", self.host_death()))?;
                let code = matched[marker.len()..matched.len() - 2]
                    .parse()
                    .unwrap_or(-1);
                Ok((code, before.replace('\r', "")))
            }
        }
    }

    /// Whether the host still runs commands (always, natively).
    pub fn answers(&mut self) -> bool {
        if self.mode == HostMode::Native {
            return true;
        }
        matches!(
            self.exec_status("true", Duration::from_secs(30)),
            Ok((0, _))
        )
    }

    /// If the nested host is gone, how it ended (QEMU's exit status and stderr).
    fn host_death(&mut self) -> String {
        let Some(q) = self.qemu.as_mut() else {
            return String::new();
        };
        let Ok(Some(status)) = q.try_wait() else {
            return String::new();
        };
        let err = std::fs::read_to_string(self.workdir.join("qemu.err")).unwrap_or_default();
        format!(
            "\nthe test host's QEMU exited ({status}); its stderr:\n{}",
            tail(&err, 3000)
        )
    }

    /// Run a command that must succeed; returns its output.
    pub fn exec(&mut self, cmd: &str) -> Result<String, String> {
        let (code, out) = self.exec_status(cmd, CMD_TIMEOUT)?;
        if code != 0 {
            return Err(format!("`{cmd}` exited {code}:\n{}", tail(&out, 3000)));
        }
        Ok(out)
    }

    /// Path of lpvmm as the host sees it.
    pub fn lpvmm(&self) -> String {
        match self.mode {
            HostMode::Native => lpvmm_binary().display().to_string(),
            HostMode::Nested => "/usr/bin/lpvmm".into(),
        }
    }

    /// Path of an image file (relative to the images dir) as the host sees it.
    pub fn image(&self, rel: &str) -> String {
        match self.mode {
            HostMode::Native => images_dir().join(rel).display().to_string(),
            HostMode::Nested => format!("/images/{rel}"),
        }
    }

    pub fn guest_kernel(&self, series: &str) -> String {
        self.image(&format!("guest-{series}/vmlinuz"))
    }

    /// The `i`th disk given to [`TestHost::start_with_disks`], as the host sees it: a
    /// virtio block device nested (`/dev/vda` first), the work directory's copy natively.
    pub fn disk(&self, i: usize) -> String {
        match self.mode {
            HostMode::Nested => format!("/dev/vd{}", (b'a' + i as u8) as char),
            HostMode::Native => self
                .workdir
                .join(format!("disk{i}.img"))
                .display()
                .to_string(),
        }
    }

    /// Native: each disk image copied (sparse) into the work directory, so that tests
    /// never write to the image as built.
    fn copy_disks(&self) -> Result<(), String> {
        for i in 0..self.disks.len() {
            let status = Command::new("cp")
                .arg("--sparse=always")
                .arg(&self.disks[i])
                .arg(self.disk(i))
                .status()
                .map_err(|e| format!("cp: {e}"))?;
            if !status.success() {
                return Err(format!("cannot copy {}", self.disks[i].display()));
            }
        }
        Ok(())
    }

    /// Where an extra file given to [`TestHost::start_with_files`] is, as the host sees it.
    pub fn file(&self, dest: &str) -> String {
        match self.mode {
            HostMode::Nested => dest.to_string(),
            HostMode::Native => self
                .files
                .iter()
                .find(|(_, d)| d == dest)
                .map(|(src, _)| src.display().to_string())
                .unwrap_or_else(|| dest.to_string()),
        }
    }

    /// Where `lpvmm run --name NAME` puts its control socket on the host: lpvmm's own
    /// rule (natively the harness shares lpvmm's environment; the nested host runs it as
    /// root with no `XDG_RUNTIME_DIR`).
    pub fn socket_path(&self, name: &str) -> String {
        match self.mode {
            HostMode::Native => lpvmm::control::rundir::socket_path(name)
                .display()
                .to_string(),
            HostMode::Nested => format!("/run/lpvmm/{name}.sock"),
        }
    }

    /// Mark the start of a test's attempt for [`TestHost::vmm_reports_since_mark`] and
    /// [`TestHost::host_kernel_faults_since_mark`] (the host's uptime, to compare with
    /// its kernel log's time stamps).
    pub fn mark_attempt(&mut self) {
        let tmp = self.tmp();
        let _ = self.exec(&format!(
            "touch {tmp}/{ATTEMPT_MARK}; cut -d' ' -f1 /proc/uptime > {tmp}/{ATTEMPT_MARK}.uptime"
        ));
    }

    /// What the nested test host's kernel logged since [`TestHost::mark_attempt`] that
    /// says it failed ([`HOST_FAULT_LINES`]), introduced by [`HOST_KERNEL_FAULT`]; `None`
    /// when it logged no such line, when its log cannot be read, and natively (this
    /// machine's kernel is not a test platform to blame).
    pub fn host_kernel_faults_since_mark(&mut self) -> Option<String> {
        if self.mode == HostMode::Native {
            return None;
        }
        let log = self.host_kernel_log_since_mark().ok()?;
        let lines = host_fault_lines(&log);
        (!lines.is_empty())
            .then(|| format!("{HOST_KERNEL_FAULT}:\n{}", tail(&lines.join("\n"), 3000)))
    }

    /// The test host's kernel log from [`TestHost::mark_attempt`] on (nested; natively,
    /// nothing).
    pub fn host_kernel_log_since_mark(&mut self) -> Result<String, String> {
        if self.mode == HostMode::Native {
            return Ok(String::new());
        }
        let tmp = self.tmp();
        // busybox dmesg prints "[  123.456789] text"; keep the lines from the mark on.
        self.exec(&format!(
            "t=$(cat {tmp}/{ATTEMPT_MARK}.uptime) && dmesg | \
             awk -v t=\"$t\" '{{ s = $0; sub(/^\\[ */, \"\", s); if (s + 0 >= t + 0) print }}'"
        ))
    }

    /// The end of the stderr of every VMM that wrote to it since [`TestHost::mark_attempt`]
    /// (a failing test's own message may not say that its VMM died, or of what).
    pub fn vmm_reports_since_mark(&mut self) -> String {
        let tmp = self.tmp();
        // Where the patch code lies, however long the stderr grew after it said so
        // (`death_in_patch_code` reads it).
        let mapped = lpvmm::session::patching::PATCH_CODE_MAPPED;
        // Each VMM's part headed as the harness's verdict reads it.
        let section = crate::verdict::VMM_SECTION;
        self.exec(&format!(
            "cd {tmp} && for f in $(find . -maxdepth 1 -name '*.err' -newer {ATTEMPT_MARK}); do \
             echo \"{section}$f):\"; grep -m1 -F '{mapped}' \"$f\"; tail -c 2000 \"$f\"; echo; done"
        ))
        .unwrap_or_else(|e| format!("(VMM stderr unavailable: {e})"))
    }

    /// A scratch directory on the host.
    pub fn tmp(&self) -> String {
        match self.mode {
            HostMode::Native => self.workdir.display().to_string(),
            HostMode::Nested => "/tmp".into(),
        }
    }

    /// Start `lpvmm run --name NAME ARGS` with its console connected to the harness.
    pub fn start_lpvmm(&mut self, name: &str, args: &str) -> Result<Guest<'_>, String> {
        let cmd = format!("{} run --name {name} {args}", self.lpvmm());
        self.start_console_program(name, &cmd)
    }

    /// Start any VMM command line (lpvmm, or QEMU for comparisons) whose stdin/stdout is
    /// the guest console, known to the harness as NAME.
    pub fn start_console_program(&mut self, name: &str, cmd: &str) -> Result<Guest<'_>, String> {
        self.spawn_console_program(name, cmd)?;
        Ok(self.guest(name))
    }

    fn spawn_console_program(&mut self, name: &str, cmd: &str) -> Result<(), String> {
        let err_file = format!("{}/{name}.err", self.tmp());
        let rc_file = format!("{}/{name}.rc", self.tmp());
        match self.mode {
            HostMode::Nested => {
                if let Some(c) = &self.ttys1 {
                    c.drain();
                }
                let pid_file = format!("{}/{name}.pid", self.tmp());
                self.exec(&format!(
                    "rm -f {rc_file}; ({cmd} </dev/ttyS1 >/dev/ttyS1 \
                     2>{err_file}; echo $? >{rc_file}) >/dev/null 2>&1 & echo $! >{pid_file}"
                ))?;
            }
            HostMode::Native => {
                let mut child = Command::new("sh")
                    .arg("-c")
                    .arg(format!("exec {cmd}"))
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(File::create(&err_file).map_err(|e| e.to_string())?)
                    .spawn()
                    .map_err(|e| format!("lpvmm: {e}"))?;
                let stdin = child.stdin.take().ok_or("no stdin")?;
                let stdout = child.stdout.take().ok_or("no stdout")?;
                let console = Console::new("guest", stdout, stdin);
                self.native_guest = Some((child, console, PathBuf::from(rc_file)));
            }
        }
        Ok(())
    }

    /// Kill the program started as NAME by its process, never by its name (a `pkill
    /// lpvmm` would kill every VM of the user in native mode), and wait for it to be
    /// gone. One that outlives SIGKILL marks the host wedged (see
    /// [`platform_host_fault`]); the error says so.
    fn kill_console_program(&mut self, name: &str) -> Result<(), String> {
        let gone = match self.mode {
            HostMode::Nested => {
                let pid_file = format!("{}/{name}.pid", self.tmp());
                let kill = kill_children(&format!("$(cat {pid_file})"), "KILL");
                matches!(self.wait_for_rc(name, &kill, KILL_TIMEOUT), Ok(Some(_)))
            }
            HostMode::Native => match self.native_guest.as_mut() {
                Some((child, ..)) => {
                    let _ = child.kill();
                    let deadline = Instant::now() + KILL_TIMEOUT;
                    loop {
                        match child.try_wait() {
                            Ok(Some(_)) => break true,
                            Ok(None) if Instant::now() < deadline => {
                                std::thread::sleep(Duration::from_millis(100))
                            }
                            _ => break false,
                        }
                    }
                }
                None => true,
            },
        };
        if gone {
            return Ok(());
        }
        let why = format!(
            "the VMM '{name}' {SURVIVED_SIGKILL} for {KILL_TIMEOUT:?}: the test host's \
             kernel holds it"
        );
        self.wedged = Some(why.clone());
        Err(why)
    }

    /// Stop the program started as NAME (`lpvmm stop`, as a user would), give it
    /// `grace` to exit, then kill it; Ok once it is gone.
    fn end_console_program(&mut self, name: &str, grace: Duration) -> Result<(), String> {
        self.stop_console_program(name);
        let exited = match self.mode {
            HostMode::Nested => matches!(self.wait_for_rc(name, ":", grace), Ok(Some(_))),
            // Natively the stop above already killed the child.
            HostMode::Native => false,
        };
        if exited {
            return Ok(());
        }
        self.kill_console_program(name)
    }

    /// Nested: run `first`, then wait up to `timeout` for the exit status of the program
    /// started as NAME (the shell that started it writes `NAME.rc` once it is gone).
    fn wait_for_rc(
        &mut self,
        name: &str,
        first: &str,
        timeout: Duration,
    ) -> Result<Option<i32>, String> {
        let rc_file = format!("{}/{name}.rc", self.tmp());
        let ticks = timeout.as_secs() * 5;
        let (_, out) = self.exec_status(
            &format!(
                "{first}; i=0; while [ ! -s {rc_file} ] && [ $i -lt {ticks} ]; do sleep 0.2; \
                 i=$((i+1)); done; cat {rc_file} 2>/dev/null"
            ),
            timeout + Duration::from_secs(30),
        )?;
        Ok(out.trim().parse::<i32>().ok())
    }

    /// Why the host cannot be trusted with another test, if a VMM outlived SIGKILL.
    pub fn wedged(&self) -> Option<&str> {
        self.wedged.as_deref()
    }

    /// Stop the program started as NAME: `lpvmm stop` for lpvmm, else (a peer VMM) kill
    /// the children of the shell that started it.
    fn stop_console_program(&mut self, name: &str) {
        match self.mode {
            HostMode::Nested => {
                let pid_file = format!("{}/{name}.pid", self.tmp());
                let _ = self.exec_status(
                    &format!(
                        "{} stop {name} 2>/dev/null || {}",
                        self.lpvmm(),
                        kill_children(&format!("$(cat {pid_file})"), "TERM")
                    ),
                    CMD_TIMEOUT,
                );
            }
            HostMode::Native => {
                if let Some((child, _, _)) = self.native_guest.as_mut() {
                    let _ = child.kill();
                }
            }
        }
    }

    /// Whether the program started as NAME has exited, and its stderr.
    fn exited(&mut self, name: &str) -> Result<Option<String>, String> {
        let done = match self.mode {
            HostMode::Native => match self.native_guest.as_mut() {
                Some((child, _, _)) => child.try_wait().map_err(|e| e.to_string())?.is_some(),
                None => true,
            },
            HostMode::Nested => {
                let rc = format!("{}/{name}.rc", self.tmp());
                !self
                    .exec(&format!("cat {rc} 2>/dev/null || true"))?
                    .trim()
                    .is_empty()
            }
        };
        if !done {
            return Ok(None);
        }
        let err = format!("{}/{name}.err", self.tmp());
        Ok(Some(self.exec(&format!("cat {err} 2>/dev/null || true"))?))
    }

    /// Start a VMM command line (as [`TestHost::start_console_program`]) and wait for
    /// the guest's ready line, failing as soon as the VMM exits. Returns the guest and
    /// the ready line.
    pub fn start_and_wait_ready(
        &mut self,
        name: &str,
        cmd: &str,
    ) -> Result<(Guest<'_>, String), BootFailure> {
        let line = self.spawn_and_wait_ready(name, cmd)?;
        Ok((self.guest(name), line))
    }

    fn guest(&mut self, name: &str) -> Guest<'_> {
        Guest {
            host: self,
            name: name.to_string(),
            seq: 0,
            exited: false,
        }
    }

    fn spawn_and_wait_ready(&mut self, name: &str, cmd: &str) -> Result<String, BootFailure> {
        self.spawn_console_program(name, cmd)
            .map_err(BootFailure::Other)?;
        let t0 = Instant::now();
        let mut heard = (self.guest_console().received(), Instant::now());
        loop {
            let e = match self
                .guest_console()
                .wait_line("LPVMM-GUEST-READY", Duration::from_secs(15))
            {
                Ok(line) => return Ok(line),
                Err(e) => e,
            };
            if let Some(stderr) = self.exited(name).map_err(BootFailure::Other)? {
                let console = self.guest_console().drain();
                return Err(BootFailure::Exited { stderr, console });
            }
            let received = self.guest_console().received();
            if received != heard.0 {
                heard = (received, Instant::now());
            }
            let silent = heard.1.elapsed() > BOOT_SILENCE;
            if !silent && t0.elapsed() <= BOOT_TIMEOUT {
                continue;
            }
            // Where the vCPUs are: a vCPU that no longer runs cannot park, and lpvmm
            // names it and says where it is stuck; one that parks shows its registers.
            let regs = self.vcpu_whereabouts(name);
            if !platform_host_fault(&regs) && t0.elapsed() <= BOOT_TIMEOUT {
                continue;
            }
            let ended = self.end_console_program(name, Duration::from_secs(30));
            let stderr = self.exited(name).ok().flatten().unwrap_or_default();
            return Err(BootFailure::Other(format!(
                "{e}\nVMM stderr:\n{stderr}\nlpvmm regs after {:.0} s ({:.0} s without console \
                 output):\n{}{}",
                t0.elapsed().as_secs_f64(),
                heard.1.elapsed().as_secs_f64(),
                tail(&regs, 3000),
                ended.err().map(|w| format!("\n{w}")).unwrap_or_default(),
            )));
        }
    }

    /// `lpvmm regs NAME`: each vCPU's registers, or which did not park and where; and,
    /// when the registers are ones no guest can have, [`IMPOSSIBLE_AT_BOOT`] with why.
    fn vcpu_whereabouts(&mut self, name: &str) -> String {
        let lpvmm = self.lpvmm();
        let run = |host: &mut TestHost, cmd: String| {
            host.exec_status(&cmd, Duration::from_secs(30))
                .map(|(rc, out)| (rc, out.trim().to_string()))
                .unwrap_or_else(|e| (-1, e))
        };
        let (rc, regs) = run(self, format!("{lpvmm} regs {name} --json 2>&1"));
        let parsed = serde_json::from_str::<RegsResult>(&regs);
        let (Ok(regs_json), 0) = (parsed, rc) else {
            return regs;
        };
        let (_, status) = run(self, format!("{lpvmm} status {name} --json 2>&1"));
        let memory = serde_json::from_str::<StatusInfo>(&status)
            .ok()
            .map(|s| s.memory_bytes);
        let impossible = memory
            .map(|m| impossible_cr3(&regs_json, m))
            .unwrap_or_default();
        if impossible.is_empty() {
            return regs;
        }
        format!(
            "{regs}\n{IMPOSSIBLE_AT_BOOT}: {} (the platform gave them: lpvmm sets no \
             register after the boot setup)",
            impossible.join("; ")
        )
    }

    /// Convenience: boot a guest of a kernel series with the test initramfs and wait
    /// for its ready line. Returns the guest and the ready line.
    pub fn boot_guest(
        &mut self,
        name: &str,
        series: &str,
        vcpus: u8,
        extra: &str,
    ) -> Result<(Guest<'_>, String), String> {
        let vmm = self.lpvmm();
        self.boot_guest_vmm(&vmm, name, series, vcpus, extra)
    }

    /// Like [`TestHost::boot_guest`] with another VMM command (`vmm` in place of the
    /// path of lpvmm, for example with variables set in front).
    pub fn boot_guest_vmm(
        &mut self,
        vmm: &str,
        name: &str,
        series: &str,
        vcpus: u8,
        extra: &str,
    ) -> Result<(Guest<'_>, String), String> {
        let initrd = self.image("guest-initrd.cpio.gz");
        let spec = GuestSpec::busybox(series, vcpus, &initrd, extra);
        self.boot_guest_with(vmm, name, &spec)
    }

    /// Like [`TestHost::boot_guest`] with another initrd (a path on the host).
    pub fn boot_guest_initrd(
        &mut self,
        name: &str,
        series: &str,
        vcpus: u8,
        initrd: &str,
        extra: &str,
    ) -> Result<(Guest<'_>, String), String> {
        let vmm = self.lpvmm();
        self.boot_guest_with(
            &vmm,
            name,
            &GuestSpec::busybox(series, vcpus, initrd, extra),
        )
    }

    /// Like [`TestHost::boot_guest`] for any guest that keeps the test guests' console
    /// contract (its ready line and prompt): the Debian system, say.
    pub fn boot_guest_spec(
        &mut self,
        name: &str,
        spec: &GuestSpec,
    ) -> Result<(Guest<'_>, String), String> {
        let vmm = self.lpvmm();
        self.boot_guest_with(&vmm, name, spec)
    }

    fn boot_guest_with(
        &mut self,
        vmm: &str,
        name: &str,
        spec: &GuestSpec,
    ) -> Result<(Guest<'_>, String), String> {
        // A 2-vCPU guest on the nested TCG test host sometimes dies during boot, before
        // lpvmm did anything but run it (docs/testing.md, "Known platform quirks"): such a
        // boot is repeated, said loudly, where the harness's rule lets it.
        let cmd = self.run_command(vmm, name, spec);
        let booting = Instant::now();
        let mut attempt = 1;
        let line = loop {
            let failure = match self.spawn_and_wait_ready(name, &cmd) {
                Ok(line) => break line,
                Err(failure) => failure,
            };
            // The same rule as a test's retry (crate::verdict), with the same budget.
            let (report, decision) = self.judge_boot_failure(&failure);
            let why = decision.signature().to_string();
            if !matches!(decision, Decision::RetrySameHost(_)) || attempt == PLATFORM_ATTEMPTS {
                return Err(format!("(harness, booting {name}: {why})\n{report}"));
            }
            let file = crate::retries::file_retry(&format!("boot of {name}"), &why, &report)
                .map_err(|no| format!("(harness: {why}; not booted again: {no})\n{report}"))?;
            eprintln!(
                "WARNING: retry: boot of guest {name}: {why} (attempt {attempt} of \
                 {PLATFORM_ATTEMPTS}; booting it again; evidence: {})",
                file.display()
            );
            attempt += 1;
        };
        eprintln!(
            "guest {name} ready after {:.1} s",
            booting.elapsed().as_secs_f64()
        );
        Ok((self.ready_guest(name)?, line))
    }

    /// [`TestHost::boot_guest`] tried once: a guest that dies booting is returned as such
    /// and never booted again, so that a caller that counts deaths (the endurance bench,
    /// as it counts its peer's) sees every one.
    pub fn boot_guest_once(
        &mut self,
        name: &str,
        series: &str,
        vcpus: u8,
        extra: &str,
    ) -> Result<(Guest<'_>, String), BootFailure> {
        let (vmm, initrd) = (self.lpvmm(), self.image("guest-initrd.cpio.gz"));
        let cmd = self.run_command(
            &vmm,
            name,
            &GuestSpec::busybox(series, vcpus, &initrd, extra),
        );
        let line = self.spawn_and_wait_ready(name, &cmd)?;
        Ok((self.ready_guest(name).map_err(BootFailure::Other)?, line))
    }

    /// `VMM run --name NAME ...` for a test guest.
    fn run_command(&self, vmm: &str, name: &str, spec: &GuestSpec) -> String {
        // 512 MiB unless `extra` says otherwise (lpvmm takes each option once).
        let memory = match spec.extra.contains("--memory") {
            true => "",
            false => "--memory 512M",
        };
        format!(
            "{vmm} run --name {name} --kernel {} --initrd {} --vcpus {} {memory} \
             --cmdline '{}' {}",
            self.guest_kernel(spec.series),
            spec.initrd,
            spec.vcpus,
            spec.cmdline,
            spec.extra,
        )
    }

    /// The guest whose ready line was seen, once its shell prompts.
    fn ready_guest(&mut self, name: &str) -> Result<Guest<'_>, String> {
        let guest = self.guest(name);
        // The first prompt can appear before readline has switched the tty to its raw
        // mode, and a line typed across that switch arrives split (seen on 6.12). An
        // empty line absorbs the switch harmlessly.
        guest.console().wait_str(PROMPT, CMD_TIMEOUT)?;
        guest.host.guest_console_send("\n")?;
        Ok(guest)
    }

    /// Start the test host's trace of where guests die (nested, unless
    /// `LPVMM_TEST_HOST_TRACE=0`); evidence only, so a trace that cannot be set up
    /// leaves the host running (a death then cannot be placed, and fails its test).
    pub fn start_death_trace(&mut self) {
        if let Some(what) = self.death_trace() {
            let _ = self.trace_kvm(what);
        }
    }

    /// Empty the death trace and record again (at the start of each attempt).
    pub fn restart_death_trace(&mut self) {
        if self.death_trace().is_some() {
            let _ = self.restart_kvm_trace();
        }
    }

    /// What this host traces of its guests' deaths, if anything.
    fn death_trace(&self) -> Option<crate::KvmTrace> {
        crate::harness_host_trace().filter(|_| self.mode == HostMode::Nested)
    }

    /// A failed attempt's whole report (the failure, every VMM's stderr since the mark
    /// with lpvmm's post-mortem, the host kernel's own fault lines, the guest console's
    /// last output, and for a guest death the test host's trace of it) and what the
    /// harness does about it ([`crate::verdict::decide`]).
    pub fn judge_failure(&mut self, err: String) -> (String, Decision) {
        if !self.answers() {
            let decision = decide(&Evidence::of(&err, false, &[]));
            return (err, decision);
        }
        let host_kernel = self.host_kernel_faults_since_mark().unwrap_or_default();
        let report = format!(
            "{err}\n{}\n{host_kernel}\nthe guest console's last output:\n{}",
            self.vmm_reports_since_mark(),
            self.guest_console_last(3000)
        );
        self.judge_report(report)
    }

    /// [`TestHost::judge_failure`] for a boot that failed.
    fn judge_boot_failure(&mut self, failure: &BootFailure) -> (String, Decision) {
        self.judge_report(failure.report())
    }

    fn judge_report(&mut self, report: String) -> (String, Decision) {
        let report = if self.death_trace().is_some() && platform_guest_death(&report) {
            let trace = self.kvm_trace_of_death();
            let _ = self.restart_kvm_trace();
            let memory = self.memory_counters();
            format!("{report}\ntest host's KVM trace:\n{trace}\ntest host's memory: {memory}")
        } else {
            report
        };
        let kvm = self.kvm_modules();
        let decision = decide(&Evidence::of(&report, true, &kvm));
        (report, decision)
    }

    /// The last `n` bytes of the guest console, if a guest was started (natively there is
    /// none before the first).
    fn guest_console_last(&self, n: usize) -> String {
        let console = match self.mode {
            HostMode::Nested => self.ttys1.as_ref(),
            HostMode::Native => self.native_guest.as_ref().map(|g| &g.1),
        };
        console.map_or_else(|| "(no guest console yet)".into(), |c| c.last(n))
    }

    fn guest_console(&self) -> &Console {
        match self.mode {
            HostMode::Nested => self.ttys1.as_ref().expect("nested host has ttyS1"),
            HostMode::Native => &self.native_guest.as_ref().expect("a guest was started").1,
        }
    }
}

fn native_path() -> String {
    let bin = lpvmm_binary();
    let dir = bin.parent().unwrap_or(Path::new("."));
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some((mut c, _, _)) = self.native_guest.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut q) = self.qemu.take() {
            let _ = q.kill();
            let _ = q.wait();
        }
        let _ = std::fs::remove_dir_all(&self.workdir);
    }
}

/// A guest started by [`TestHost::start_lpvmm`].
pub struct Guest<'h> {
    pub host: &'h mut TestHost,
    pub name: String,
    seq: u64,
    /// Set once lpvmm was seen to exit; a guest dropped before that (a failed test) is
    /// stopped, so that it cannot disturb the next test on the same host.
    exited: bool,
}

impl Drop for Guest<'_> {
    fn drop(&mut self) {
        // A host that no longer answers is replaced by the group runner; don't wait on it.
        if self.exited || !self.host.answers() {
            return;
        }
        let _ = self.lpvmm("stop {vm}");
        if self.wait_exit(Duration::from_secs(60)).is_err() {
            let name = self.name.clone();
            // A VMM that outlives SIGKILL marks the host wedged; the runner sees it.
            let _ = self.host.kill_console_program(&name);
        }
    }
}

impl Guest<'_> {
    pub fn console(&self) -> &Console {
        self.host.guest_console()
    }

    /// Type a command at the guest's shell; returns (exit status, output).
    pub fn run_status(&mut self, cmd: &str, timeout: Duration) -> Result<(i32, String), String> {
        self.seq += 1;
        let template = format!("__G_{}_$?__", self.seq);
        let marker = format!("__G_{}_", self.seq);
        // `cmd &; echo` is a syntax error: after a trailing `&` the marker needs no `;`.
        let sep = if cmd.trim_end().ends_with('&') {
            " "
        } else {
            "; "
        };
        let line = format!("{cmd}{sep}echo {template}\n");
        // Type only at a prompt, as a person would: input typed ahead while bash runs a
        // foreground job sits in the tty's canonical buffer and can be scrambled when
        // readline switches the tty mode back (seen on a guest under full CPU load).
        self.type_line(&line, timeout)?;
        let waited = self
            .console()
            .wait_for(&format!("guest `{cmd}`"), timeout, |t| {
                // The typed line is echoed with "$?" literally; the real marker has digits.
                let mut from = 0;
                while let Some(i) = t[from..].find(&marker).map(|i| i + from) {
                    let rest = &t[i + marker.len()..];
                    let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
                    if digits > 0 && rest[digits..].starts_with("__") {
                        return Some((i, i + marker.len() + digits + 2));
                    }
                    from = i + marker.len();
                }
                None
            });
        let (before, matched) = match waited {
            Ok(found) => found,
            Err(e) => return Err(format!("{e}\n{}", self.silence_report())),
        };
        let code = matched[marker.len()..matched.len() - 2]
            .parse()
            .unwrap_or(-1);
        // Drop the echo of the typed command: everything up to the end of the line that
        // holds the marker. The tty may echo typed-ahead input once and readline again
        // (partly, with carriage returns), so take the last echo and match its prefix.
        let before = before.replace('\r', "");
        let out = match before.rfind(&marker) {
            Some(i) => before[i..].split_once('\n').map(|x| x.1).unwrap_or(""),
            None => &before,
        };
        Ok((code, out.to_string()))
    }

    /// Start a background job at the guest's shell (`cmd` ends with `&`); returns the
    /// pid of its last process (`$!`).
    pub fn spawn(&mut self, cmd: &str) -> Result<i64, String> {
        let out = self.run(&format!("{cmd} echo PID=$!"))?;
        out.lines()
            .find_map(|l| l.trim().strip_prefix("PID=")?.parse().ok())
            .ok_or_else(|| format!("no pid from `{cmd}`: {out}"))
    }

    /// A guest command that must succeed.
    pub fn run(&mut self, cmd: &str) -> Result<String, String> {
        let (code, out) = self.run_status(cmd, CMD_TIMEOUT)?;
        if code != 0 {
            return Err(format!(
                "guest `{cmd}` exited {code}:\n{}",
                tail(&out, 3000)
            ));
        }
        Ok(out)
    }

    /// The text a guest command printed, trimmed, without the kernel's own console
    /// lines that can land amid it (`hrtimer: interrupt took ...` and clocksource
    /// watchdog warnings on the nested host): for output compared with what a patch
    /// makes the guest print. Not for `dmesg`, whose every line has that prefix.
    pub fn text(&mut self, cmd: &str) -> Result<String, String> {
        Ok(crate::without_kernel_lines(&self.run(cmd)?)
            .trim()
            .to_string())
    }

    /// Send raw text to the guest console.
    pub fn send(&mut self, text: &str) -> Result<(), String> {
        self.host.guest_console_send(text)
    }

    /// Wait for the shell prompt, then type one line (for commands that never return,
    /// such as `reboot -f`).
    pub fn type_at_prompt(&mut self, line: &str) -> Result<(), String> {
        self.type_line(&format!("{line}\n"), CMD_TIMEOUT)
    }

    fn type_line(&mut self, text: &str, timeout: Duration) -> Result<(), String> {
        if let Err(e) = self.console().wait_str(PROMPT, timeout) {
            // A shell that never prompts again: say why, as for a command that timed out.
            return Err(format!("{e}\n{}", self.silence_report()));
        }
        self.host.guest_console_send(text)
    }

    /// Why the guest may have stopped answering, for a command that timed out: what the
    /// VMM printed, whether it is running or paused, and where its vCPUs are (`lpvmm
    /// regs`, as for a silent boot: a vCPU the host kernel holds inside `KVM_RUN` is
    /// named so, and one stuck in lpvmm too).
    fn silence_report(&mut self) -> String {
        let stderr = self.vmm_stderr();
        let name = self.name.clone();
        let status = self
            .lpvmm("status {vm}")
            .map(|(rc, out)| format!("lpvmm status (exit {rc}):\n{}", out.trim()))
            .unwrap_or_else(|e| format!("(lpvmm status failed: {e})"));
        let regs = self.host.vcpu_whereabouts(&name);
        // First what the guest is doing: a report is often shown cut after its start.
        let doing = self.guest_doing();
        format!(
            "{doing}\n{stderr}\n{status}\nlpvmm regs:\n{}",
            tail(&regs, 3000)
        )
    }

    /// What a silent guest is doing, as lpvmm sees it: each vCPU's task and the symbol
    /// at its kernel address, and the stack of every task that runs or waits
    /// uninterruptibly (`R`, `D`), at most eight.
    fn guest_doing(&mut self) -> String {
        let (rc, tasks) = match self.lpvmm("tasks {vm}") {
            Ok(r) => r,
            Err(e) => return format!("(lpvmm tasks failed: {e})"),
        };
        if rc != 0 {
            return format!("lpvmm tasks (exit {rc}): {}", tail(&tasks, 1000));
        }
        let mut out = String::from("what the guest is doing (lpvmm tasks, stack, sym):\n");
        let mut busy: Vec<(String, String)> = Vec::new();
        for line in tasks.lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if line.starts_with("vcpu") {
                out += &format!("  {line}\n");
                if let Some(at) = line.split("kernel mode at ").nth(1) {
                    let sym = self.lpvmm(&format!("sym {{vm}} {}", at.trim()));
                    let sym = sym.map(|(_, s)| s).unwrap_or_else(|e| e);
                    out += &format!("    {}\n", sym.trim());
                }
            } else if matches!(cols.get(2), Some(&"R") | Some(&"D"))
                && busy.len() < 8
                && !busy
                    .iter()
                    .any(|(pid, _)| Some(&pid.as_str()) == cols.first())
            {
                busy.push((cols[0].to_string(), line.to_string()));
            }
        }
        for (pid, line) in busy {
            let stack = self.lpvmm(&format!("stack {{vm}} {pid}"));
            let stack = stack.map(|(_, s)| s).unwrap_or_else(|e| e);
            out += &format!("  {line}\n{}\n", tail(stack.trim(), 1500));
        }
        out
    }

    /// What the VMM printed on stderr so far, for failure messages.
    pub fn vmm_stderr(&mut self) -> String {
        let err_file = format!("{}/{}.err", self.host.tmp(), self.name);
        match self.host.exec(&format!("cat {err_file}")) {
            Ok(text) => format!("VMM stderr:\n{text}"),
            Err(e) => format!("(VMM stderr unavailable: {e})"),
        }
    }

    /// `poweroff -f` in the guest; lpvmm must then exit with code 0.
    pub fn poweroff(&mut self) -> Result<GuestExit, String> {
        self.type_at_prompt("poweroff -f")?;
        let exit = self.wait_exit(EXIT_TIMEOUT)?;
        if exit.code != 0 {
            return Err(format!(
                "after poweroff, lpvmm '{}' exited {}: {}",
                self.name, exit.code, exit.stderr
            ));
        }
        Ok(exit)
    }

    /// `lpvmm SUBCOMMAND ... NAME ...` on the host, with `{vm}` replaced by the name.
    pub fn lpvmm(&mut self, args: &str) -> Result<(i32, String), String> {
        self.lpvmm_within(args, CMD_TIMEOUT)
    }

    /// [`Guest::lpvmm`], given `timeout` to finish.
    pub fn lpvmm_within(&mut self, args: &str, timeout: Duration) -> Result<(i32, String), String> {
        let cmd = format!("{} {}", self.host.lpvmm(), args.replace("{vm}", &self.name));
        self.host.exec_status(&cmd, timeout)
    }

    /// Wait for lpvmm to exit; returns its exit code and stderr.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<GuestExit, String> {
        self.exit_within(timeout)?
            .ok_or_else(|| format!("lpvmm '{}' did not exit within {timeout:?}", self.name))
    }

    /// The VMM's exit code and stderr if it exits within `timeout`; `None` if it still
    /// runs then (a guest that lives through the wait). An error says the host failed.
    pub fn exit_within(&mut self, timeout: Duration) -> Result<Option<GuestExit>, String> {
        let err_file = format!("{}/{}.err", self.host.tmp(), self.name);
        let code = match self.host.mode {
            HostMode::Nested => {
                let name = self.name.clone();
                match self.host.wait_for_rc(&name, ":", timeout)? {
                    Some(code) => code,
                    None => return Ok(None),
                }
            }
            HostMode::Native => {
                let (child, _, _) = self.host.native_guest.as_mut().ok_or("no guest")?;
                let deadline = Instant::now() + timeout;
                loop {
                    if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
                        break st.code().unwrap_or(-1);
                    }
                    if Instant::now() > deadline {
                        return Ok(None);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        let stderr = self.host.exec(&format!("cat {err_file}"))?;
        self.exited = true;
        Ok(Some(GuestExit { code, stderr }))
    }
}

impl TestHost {
    fn guest_console_send(&mut self, text: &str) -> Result<(), String> {
        match self.mode {
            HostMode::Nested => self.ttys1.as_mut().ok_or("no ttyS1")?.send(text),
            HostMode::Native => self.native_guest.as_mut().ok_or("no guest")?.1.send(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lpvmm::vstate::vcpu::StuckVcpu;

    #[test]
    fn only_a_vcpu_the_host_kernel_holds_or_an_unkillable_vmm_is_the_hosts_fault() {
        let held = StuckVcpu {
            index: 1,
            in_kvm_run: true,
            waited: Duration::from_secs(5),
            since_before_kick: true,
            lost_kick: false,
        };
        let report = format!("lpvmm: error: vCPU(s) [1] did not park within 5s ({held})");
        assert!(platform_host_fault(&report), "{report}");
        let in_lpvmm = StuckVcpu {
            in_kvm_run: false,
            ..held
        };
        let report = format!("lpvmm: error: vCPU(s) [1] did not park within 5s ({in_lpvmm})");
        assert!(
            !platform_host_fault(&report),
            "a vCPU stuck in lpvmm is lpvmm's: {report}"
        );
        assert!(!platform_host_fault("vCPU(s) [1] did not park within 5s"));
        assert!(platform_host_fault(&format!(
            "the VMM 'x' {SURVIVED_SIGKILL} for 30s"
        )));
        assert!(!platform_host_fault(
            "guest: timed out after 15s waiting for READY"
        ));
        // A guest that held the host's KVM code, as the harness says it.
        let modules = crate::CodeRange::kvm_modules("kvm_amd 126976 0 - Live 0xffffffffc031f000");
        let stack = "blocked by pid 57 (pairread): [<ffffffffc032ddcc>] 0xffffffffc032ddcc";
        let at = crate::address_in_report(stack, &modules).expect("kvm_amd's address");
        assert!(platform_host_fault(&format!(
            "{stack}\n{}: {at}",
            crate::HOST_CODE_IN_GUEST
        )));
        assert!(!platform_host_fault(stack), "only with the harness's words");
    }

    #[test]
    fn only_the_host_kernels_own_failures_in_its_log_blame_the_host() {
        // What the test host's kernel logs in a healthy run (KVM's notes, the nested
        // clock) is no fault; a lockup, stall, oops or BUG is.
        let healthy = "[   12.000001] kvm: Nested Virtualization enabled\n\
                       [   40.500000] kvm [312]: vcpu0, guest rIP: 0xffffffff81000000 \
                       unhandled rdmsr: 0xc0011029\n\
                       [   41.000000] clocksource: timekeeping watchdog on CPU1: Marking \
                       clocksource 'tsc' as unstable";
        assert!(host_fault_lines(healthy).is_empty());
        // A crash of lpvmm itself, as the host's kernel logs it, is lpvmm's.
        let lpvmm_crash = "[  300.100000] traps: lpvmm[912] general protection fault ip:55d0c0 sp:7ffd error:0 in lpvmm[55d0+1000]\n\
                           [  300.100000] lpvmm[913]: segfault at 8 ip 000055d0c0 sp 00007ffd error 4 in lpvmm\n\
                           [  300.200000] potential BUG: in a message";
        assert!(host_fault_lines(lpvmm_crash).is_empty());
        for fault in [
            "[  301.200000] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [lpvmm:vcpu1:912]",
            "[  301.200000] BUG: unable to handle page fault for address: ffff888000000000",
            "[  301.200000] Kernel panic - not syncing: Fatal exception",
            "[  301.200000] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
            "[  301.200000] Oops: 0000 [#1] PREEMPT SMP NOPTI",
            "[  301.200000] general protection fault, probably for non-canonical address",
        ] {
            let log = format!("{healthy}\n{fault}");
            assert_eq!(host_fault_lines(&log), vec![fault]);
            let report = format!("{HOST_KERNEL_FAULT}:\n{fault}");
            assert!(platform_host_fault(&report), "{report}");
        }
    }

    #[test]
    fn a_page_table_root_outside_guest_ram_is_impossible() {
        let mut regs = RegsResult {
            pause: Default::default(),
            vcpus: vec![Default::default(); 3],
        };
        let cr3s = [
            0xbfe1_4000u64,
            0x0f41_0000u64,
            0x1000_0000u64 | 0x8000_0000_0000_0000u64,
        ];
        for (i, (v, cr3)) in regs.vcpus.iter_mut().zip(cr3s).enumerate() {
            (v.index, v.cr3) = (i, cr3);
        }
        let bad = impossible_cr3(&regs, 512 << 20);
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].starts_with("vCPU 0 has CR3 0xbfe14000"), "{bad:?}");
        regs.vcpus.clear();
        assert!(impossible_cr3(&regs, 512 << 20).is_empty());
        let report = format!("{IMPOSSIBLE_AT_BOOT}: {}", bad[0]);
        assert!(platform_host_fault(&report));
    }
}
