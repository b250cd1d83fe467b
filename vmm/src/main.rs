//! The `lpvmm` binary: command-line parsing only; everything else is the library.

use lpvmm::arch::layout;
use lpvmm::cli::{self, inspect as cli_inspect, patch as cli_patch};
use lpvmm::vstate::vm;
use lpvmm::{run, DEFAULT_CMDLINE};

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lpvmm",
    version,
    about = "Boot Linux guests on KVM and live-patch their kernels from the hypervisor"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest. The serial console is on stdin/stdout (Ctrl-A x ends the VM).
    Run {
        /// The guest kernel (bzImage, e.g. /boot/vmlinuz-*)
        #[arg(long)]
        kernel: PathBuf,
        /// An initramfs (cpio, optionally compressed as the kernel supports)
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// The kernel command line
        #[arg(long, default_value = DEFAULT_CMDLINE)]
        cmdline: String,
        /// Guest RAM, e.g. 512M or 2G
        #[arg(long, default_value = "512M", value_parser = parse_size)]
        memory: u64,
        /// Number of vCPUs
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// VM name for the control socket (default: the first free vmN)
        #[arg(long)]
        name: Option<String>,
        /// Size of the guest-physical patch area (e820 reserved, owned by lpvmm)
        #[arg(long, default_value = "16M", value_parser = parse_size)]
        patch_area: u64,
        /// Run without the per-thread seccomp filters (for debugging lpvmm itself)
        #[arg(long)]
        no_seccomp: bool,
        /// Check every task check a transition confirms from an unwind made while the
        /// guest ran against a fresh unwind in the pause, counted in `patch status`
        /// (costs pause time; for tests)
        #[arg(long)]
        verify_early_checks: bool,
        /// A virtio disk: a raw image file or block device, FILE or FILE,ro (repeat for
        /// more; the guest's vda, vdb, ... in order)
        #[arg(long = "disk", value_name = "FILE[,ro]")]
        disks: Vec<lpvmm::devices::virtio::block::DiskSpec>,
        /// A virtio network interface on an existing tap, TAP or TAP,mac=MAC (repeat for
        /// more; the guest's eth0, eth1, ... in order)
        #[arg(long = "net", value_name = "TAP[,mac=MAC]")]
        nets: Vec<lpvmm::devices::virtio::net::NetSpec>,
        /// A patch (.kp or livepatch .ko) to apply once each boot's kernel is up (repeat
        /// for more, applied in order)
        #[arg(long = "patch", value_name = "FILE")]
        patches: Vec<PathBuf>,
        /// End the VM when the guest reboots, instead of starting it again
        #[arg(long)]
        no_reboot: bool,
    },
    /// List running VMs
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show a VM's state
    Status {
        vm: String,
        #[arg(long)]
        json: bool,
    },
    /// Park every vCPU of a VM; returns once all are parked
    Pause {
        vm: String,
        #[arg(long)]
        json: bool,
    },
    /// Let a paused VM run again
    Resume {
        vm: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop a VM (lpvmm run exits with code 0)
    Stop { vm: String },
    /// Show every vCPU's registers (a running VM is paused just for the read)
    Regs {
        vm: String,
        #[arg(long)]
        json: bool,
    },
    /// Dump guest-physical memory of a paused VM
    ReadPhys {
        vm: String,
        /// Guest-physical address (0x... or decimal)
        #[arg(value_parser = parse_u64)]
        addr: u64,
        /// Number of bytes (at most 65536)
        len: u32,
        #[arg(long)]
        json: bool,
    },
    /// The guest kernel's VMCOREINFO: release, KASLR offset, symbol addresses
    Vmcoreinfo {
        vm: String,
        #[arg(long)]
        json: bool,
    },
    /// Attach to the guest kernel and show what lpvmm read from it
    Kernel {
        vm: String,
        /// Read everything again (for measuring the attach)
        #[arg(long)]
        reattach: bool,
        #[arg(long)]
        json: bool,
    },
    /// Look up a kernel symbol by NAME, MODULE:NAME or 0xADDRESS (or dump all, module
    /// symbols included, as /proc/kallsyms)
    Sym {
        vm: String,
        target: Option<String>,
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// List the guest's tasks (processes, threads, kthreads, idle) and each vCPU's current
    Tasks {
        vm: String,
        #[arg(long)]
        json: bool,
    },
    /// The guest's loaded kernel modules, as /proc/modules lists them
    Modules {
        vm: String,
        #[arg(long)]
        json: bool,
    },
    /// The shadow variables patches allocated in the guest: per id, or each one (--all)
    Shadow {
        vm: String,
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Kernel stack of a guest task (every task without PID; 0 = the idle tasks)
    Stack {
        vm: String,
        pid: Option<i32>,
        #[arg(long)]
        json: bool,
    },
    /// Disassemble a kernel function from live guest memory (NAME or NAME,SYMPOS)
    Disasm {
        vm: String,
        symbol: String,
        #[arg(long)]
        json: bool,
    },
    /// Live-patch a VM: `patch VM FILE.kp` loads and enables; list|status|enable|disable|unload
    Patch(cli_patch::PatchArgs),
    /// Build or inspect .kp patch files
    Kp {
        #[command(subcommand)]
        cmd: cli_patch::KpCommand,
    },
    /// SHA-256 of the guest's kernel text or of the patch area (`text` or `patch-area`)
    Checksum {
        vm: String,
        what: String,
        #[arg(long)]
        json: bool,
    },
    /// Measurements (see docs/benchmarks.md)
    Bench {
        #[command(subcommand)]
        what: cli::vm::Bench,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    layout::parse_size(s).map_err(|e| e.to_string())
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("'{s}' is not a number"))
}

fn main() -> ExitCode {
    lpvmm::mark_process_start();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LPVMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let result = match args.command {
        Command::Run {
            kernel,
            initrd,
            cmdline,
            memory,
            vcpus,
            name,
            patch_area,
            no_seccomp,
            verify_early_checks,
            disks,
            nets,
            patches,
            no_reboot,
        } => cli::vm::default_name(name).and_then(|name| {
            let config = vm::VmConfig {
                name,
                kernel,
                initrd,
                cmdline,
                memory,
                vcpus,
                patch_area,
                seccomp: !no_seccomp,
                verify_early_checks,
                disks,
                nets,
                reboot: !no_reboot,
            };
            run::run(config, &patches)
        }),
        Command::Ls { json } => cli::vm::ls(json),
        Command::Status { vm, json } => cli::vm::status(&vm, json),
        Command::Pause { vm, json } => cli::vm::pause(&vm, json),
        Command::Resume { vm, json } => cli::vm::resume(&vm, json),
        Command::Stop { vm } => cli::vm::stop(&vm),
        Command::Regs { vm, json } => cli::vm::regs(&vm, json),
        Command::ReadPhys {
            vm,
            addr,
            len,
            json,
        } => cli::vm::read_phys(&vm, addr, len, json),
        Command::Vmcoreinfo { vm, json } => cli::vm::vmcoreinfo(&vm, json),
        Command::Kernel { vm, reattach, json } => cli_inspect::kernel(&vm, reattach, json),
        Command::Sym {
            vm,
            target,
            all,
            json,
        } => cli_inspect::sym(&vm, target, all, json),
        Command::Tasks { vm, json } => cli_inspect::tasks(&vm, json),
        Command::Modules { vm, json } => cli_inspect::modules(&vm, json),
        Command::Shadow { vm, all, json } => cli_inspect::shadow(&vm, all, json),
        Command::Stack { vm, pid, json } => cli_inspect::stack(&vm, pid, json),
        Command::Disasm { vm, symbol, json } => cli_inspect::disasm(&vm, &symbol, json),
        Command::Patch(args) => cli_patch::patch(args),
        Command::Kp { cmd } => cli_patch::kp(cmd),
        Command::Checksum { vm, what, json } => cli_patch::checksum(&vm, &what, json),
        Command::Bench { what } => cli::vm::bench(what),
    };
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("lpvmm: error: {}", lpvmm::error_line(e.as_ref()));
            ExitCode::from(1)
        }
    }
}
