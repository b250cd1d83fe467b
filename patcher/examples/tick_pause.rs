//! What a transition's tick costs in the pause with thousands of tasks, apart from
//! parking the vCPUs: the engine's own work, over a synthetic kernel (no VM, no KVM).
//!
//! ```text
//! cargo run --release -p patcher --example tick_pause -- [TASKS] [RUNS]
//! qemu-x86_64 target/release/examples/tick_pause 2000 5   # as under the nested host
//! ```
//!
//! Each run checks every task twice, as `bench ticks` does in a real guest: an
//! immediate enable of a patch no task is inside (one tick checks every task and flips
//! the site), and the first tick of a per-task enable that two tasks hold (every task
//! checked, the trampolines and the task map installed). Both follow an early unwind
//! made "while the guest runs" (nothing changes in between here, as with sleeping
//! tasks). It prints the median of each tick's parts, in µs. Run under `qemu-x86_64`,
//! the same TCG that runs lpvmm inside the nested test host, it shows what the pause
//! costs there per task without booting anything (docs/benchmarks.md).

use std::time::Instant;

use introspection::kernel::Kernel;
use introspection::synth::{SynthGuest, SynthKernel, SynthKernelSpec, SynthTask};
use introspection::{GuestError, GuestRam, PausedGuest, PhysRange, VcpuState};
use patcher::{Begin, Consistency, Engine, GuestWriter, Op, TickParts};

/// A synthetic guest the engine may write.
struct Writable(SynthGuest);

impl GuestRam for Writable {
    fn read_phys(&self, addr: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        self.0.read_phys(addr, buf)
    }
    fn patch_area(&self) -> PhysRange {
        self.0.patch_area()
    }
    fn ram_ranges(&self) -> Vec<PhysRange> {
        self.0.ram_ranges()
    }
}

impl PausedGuest for Writable {
    fn vcpu_count(&self) -> usize {
        self.0.vcpu_count()
    }
    fn vcpu(&self, index: usize) -> Result<&VcpuState, GuestError> {
        self.0.vcpu(index)
    }
}

impl GuestWriter for Writable {
    fn write_phys(&mut self, addr: u64, data: &[u8]) -> Result<(), GuestError> {
        self.0.write_phys(addr, data)
    }
    fn reader(&self) -> &dyn PausedGuest {
        self
    }
}

/// A patch of `target`, built with `kp build`'s flags.
fn patch(name: &str, target: &str) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("lpvmm-tick-pause-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let src = dir.join(format!("{name}.c"));
    std::fs::write(
        &src,
        format!(
            "#include <lpvmm/patch.h>\nint nf_{name}(void) {{ return 42; }}\n\
             LPVMM_PATCH(\"{name}\");\nLPVMM_REPLACE({target}, nf_{name});\n"
        ),
    )
    .expect("patch source");
    let kp = patcher::build::compile(&src, &[], &[]).unwrap_or_else(|e| panic!("gcc: {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    kp
}

/// A 6.1-format kernel with `extra` more processes, each asleep in `wait4`.
fn kernel_with(extra: usize) -> SynthKernel {
    let mut spec = SynthKernelSpec::v6_1();
    let calls = [
        "__schedule",
        "schedule",
        "do_wait",
        "kernel_wait4",
        "do_syscall_64",
        "entry_SYSCALL_64_after_hwframe",
    ];
    for i in 0..extra {
        let pid = 1000 + i as i32;
        spec.tasks
            .push(SynthTask::sleeping(pid, pid, "sleeper", &calls));
    }
    SynthKernel::build(spec)
}

/// Load `kp`, begin its enable, unwind early, tick once: that tick's parts, and the
/// early unwind's time (µs).
fn first_tick(
    g: &mut Writable,
    kernel: &Kernel,
    kp: &[u8],
    consistency: Consistency,
) -> (TickParts, u64) {
    let mut engine = Engine::new();
    let name = engine.load(g, kernel, kp).expect("load");
    engine
        .begin(
            Begin {
                patch: name,
                op: Op::Enable,
                consistency,
                timeout: None,
                unload_on_failure: false,
            },
            0,
        )
        .expect("begin");
    let early = Instant::now();
    engine.unwind_early(&g.0, kernel);
    let early_us = early.elapsed().as_micros() as u64;
    engine.tick(g, kernel, 1);
    let t = engine
        .active()
        .or_else(|| engine.history().last())
        .expect("a transition");
    let parts = *t.tick_parts.first().expect("one tick");
    let c = t.early_checks;
    assert!(
        c.unwound <= 8,
        "the early checks were not taken: {c:?} (a run that measures nothing)"
    );
    (parts, early_us)
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let tasks: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let sk = kernel_with(tasks);
    let kernel = Kernel::attach(&sk.guest).expect("attach");
    let n = introspection::tasks::TaskReader::new(&kernel, &sk.guest)
        .list()
        .expect("task list")
        .tasks
        .len();
    let cases = [
        (
            "immediate enable",
            patch("cmd", "cmdline_proc_show"),
            Consistency::Immediate,
        ),
        (
            "per-task first tick",
            patch("pipefix", "pipe_read"),
            Consistency::PerTask,
        ),
    ];
    println!("{n} tasks, {runs} runs; medians in µs");
    println!("what | list | checks | writes | whole tick | per task | early unwind");
    for (what, kp, consistency) in &cases {
        let mut rows: Vec<(TickParts, u64)> = Vec::new();
        for _ in 0..runs {
            let mut g = Writable(sk.guest.clone());
            rows.push(first_tick(&mut g, &kernel, kp, *consistency));
        }
        let pick = |f: fn(&(TickParts, u64)) -> u64| median(rows.iter().map(f).collect());
        let tick = pick(|r| r.0.tick_us);
        println!(
            "{what} | {} | {} | {} | {tick} | {:.2} | {}",
            pick(|r| r.0.list_us),
            pick(|r| r.0.checks_us),
            pick(|r| r.0.writes_us),
            tick as f64 / n as f64,
            pick(|r| r.1),
        );
    }
}
