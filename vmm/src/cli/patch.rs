//! Client commands for patching: `patch ...`, `kp build|inspect`, `checksum`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use patcher::Consistency;

use crate::cli::print_json;
use crate::control::client::Client;
use crate::control::rundir::PATCH_VERBS;
use crate::proto::{
    AreaView, BlockerView, ChecksumResult, ChecksumTarget, FuncView, OutcomeView, PatchLoadResult,
    PatchStatusResult, PatchView, Request, TransitionStarted, TransitionView,
};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct PatchArgs {
    #[command(subcommand)]
    action: Option<PatchAction>,
    /// The VM to patch
    #[arg(required = true)]
    vm: Option<String>,
    /// The patch (.kp, from `lpvmm kp build`), or a kernel livepatch module (.ko)
    #[arg(required = true)]
    file: Option<PathBuf>,
    /// A livepatch module's parameters, NAME=VALUE, as insmod takes them
    params: Vec<String>,
    #[command(flatten)]
    wait: WaitArgs,
}

#[derive(Args, Clone, Copy)]
pub struct WaitArgs {
    /// per-task (default: tasks switch one by one, each at a safe point) or immediate
    /// (every task at once in one pause, or nothing changes)
    #[arg(long, default_value = "per-task", value_parser = parse_consistency)]
    consistency: Consistency,
    /// Give up after this many seconds: immediate leaves the guest as it was (default
    /// 30), per-task reverses the transition (default: no timeout); a callback that
    /// runs longer is given up on (default 60)
    #[arg(long)]
    timeout: Option<f64>,
    /// Return once the transition has started instead of following it
    #[arg(long)]
    no_wait: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone, Copy)]
pub struct FollowArgs {
    /// Return at once instead of following the transition to its end
    #[arg(long)]
    no_wait: bool,
    #[arg(long)]
    json: bool,
}

fn parse_consistency(s: &str) -> Result<Consistency, String> {
    s.parse()
}

#[derive(Subcommand)]
pub enum PatchAction {
    /// Loaded patches and their state
    List {
        vm: String,
        #[arg(long)]
        json: bool,
    },
    /// Patches, redirected functions, the transition in progress (with its blocking
    /// tasks) and recent ones
    Status {
        vm: String,
        #[arg(long)]
        json: bool,
    },
    /// Load a patch without enabling it (enable it later with `enable`)
    Load {
        vm: String,
        file: PathBuf,
        /// A livepatch module's parameters, NAME=VALUE
        params: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Enable a loaded, disabled patch
    Enable {
        vm: String,
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Disable an enabled patch (restoring the exact original bytes)
    Disable {
        vm: String,
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Turn the transition in progress around: every task goes back to where it started
    Reverse {
        vm: String,
        #[command(flatten)]
        wait: FollowArgs,
    },
    /// Complete the transition in progress without checks (the patch is marked forced
    /// and its code stays in the guest)
    Force {
        vm: String,
        #[command(flatten)]
        wait: FollowArgs,
    },
    /// Remove a disabled patch from the guest
    Unload { vm: String, name: String },
}

#[derive(Subcommand)]
pub enum KpCommand {
    /// Compile a C patch into a .kp, or build one from a source diff (--diff)
    Build {
        /// The patch's C source (not with --diff)
        #[arg(
            value_name = "SOURCE",
            required_unless_present = "diff",
            conflicts_with = "diff"
        )]
        file: Option<PathBuf>,
        #[arg(short, long)]
        output: PathBuf,
        /// Build from a source diff of the guest kernel (a unified diff, as `git diff`
        /// writes it): the functions it changes, compiled in the release's own source tree
        /// with its config and compiler (needs --kernel or --vm)
        #[arg(long, value_name = "FILE", conflicts_with_all = ["include", "cflags"])]
        diff: Option<PathBuf>,
        /// With --diff: build in this kernel source tree (prepared in place) instead of
        /// Debian's linux-source package of the release
        #[arg(long = "source", value_name = "DIR", requires = "diff")]
        source_tree: Option<PathBuf>,
        /// With --diff: the patch's name (default: the diff file's name)
        #[arg(long, value_name = "NAME", requires = "diff")]
        name: Option<String>,
        /// With --diff: the POS-th kernel symbol NAME (in kallsyms order, from 1; in the
        /// module for a module's file), for a name the kernel has more than once
        /// (repeatable; `lpvmm sym VM NAME` lists them)
        #[arg(long, value_name = "NAME=POS", requires = "diff")]
        sympos: Vec<String>,
        /// Extra include directory (for example kernel headers)
        #[arg(short = 'I', value_name = "DIR")]
        include: Vec<PathBuf>,
        /// Extra compiler flag (repeatable)
        #[arg(long = "cflag", value_name = "FLAG", allow_hyphen_values = true)]
        cflags: Vec<String>,
        /// Build with this guest kernel's own kbuild and headers (RELEASE as `uname -r`
        /// prints it in the guest; Debian's packages are fetched once and cached)
        #[arg(long, value_name = "RELEASE", conflicts_with_all = ["vm", "include"])]
        kernel: Option<String>,
        /// The same, with the release of a running VM's kernel
        #[arg(long, value_name = "VM", conflicts_with = "include")]
        vm: Option<String>,
    },
    /// Show what a .kp or a livepatch module contains and what it needs from the kernel
    Inspect {
        file: PathBuf,
        /// A livepatch module's parameters, NAME=VALUE (with --vm)
        params: Vec<String>,
        /// Read it with this VM's kernel layouts, as a load would (needed for a
        /// livepatch module, whose struct klp_patch is laid out as that kernel's)
        #[arg(long, value_name = "VM")]
        vm: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

/// The request line carries the file hex-encoded (see proto::MAX_REQUEST_BYTES).
const MAX_KP_SENT: usize = 4 << 20;

fn timeout_ms(w: &WaitArgs) -> Result<Option<u64>> {
    seconds_to_ms(w.timeout)
}

/// A `--timeout` in seconds, as the control protocol's milliseconds.
pub fn seconds_to_ms(timeout: Option<f64>) -> Result<Option<u64>> {
    match timeout {
        None => Ok(None),
        Some(t) if t > 0.0 && t <= 24.0 * 3600.0 => Ok(Some((t * 1000.0) as u64)),
        Some(_) => bail!("--timeout must be between 0 and 86400 seconds"),
    }
}

pub fn patch(args: PatchArgs) -> Result<i32> {
    match args.action {
        Some(PatchAction::List { vm, json }) => list(&vm, json),
        Some(PatchAction::Load {
            vm,
            file,
            params,
            json,
        }) => load_only(&vm, &file, params, json),
        Some(PatchAction::Status { vm, json }) => status(&vm, json),
        Some(PatchAction::Enable { vm, name, wait }) => {
            let r: TransitionStarted = Client::connect(&vm)?.call(Request::PatchEnable {
                name: name.clone(),
                timeout_ms: timeout_ms(&wait)?,
                consistency: wait.consistency,
            })?;
            follow(&vm, r.id, wait.no_wait, wait.json, Expect::Done)
        }
        Some(PatchAction::Disable { vm, name, wait }) => {
            let r: TransitionStarted = Client::connect(&vm)?.call(Request::PatchDisable {
                name: name.clone(),
                timeout_ms: timeout_ms(&wait)?,
                consistency: wait.consistency,
            })?;
            follow(&vm, r.id, wait.no_wait, wait.json, Expect::Done)
        }
        Some(PatchAction::Reverse { vm, wait }) => {
            let r: TransitionStarted = Client::connect(&vm)?.call(Request::PatchReverse)?;
            if !wait.json {
                println!("reversing transition {} in {vm}", r.id);
            }
            follow(&vm, r.id, wait.no_wait, wait.json, Expect::Reversed)
        }
        Some(PatchAction::Force { vm, wait }) => {
            let r: TransitionStarted = Client::connect(&vm)?.call(Request::PatchForce)?;
            follow(&vm, r.id, wait.no_wait, wait.json, Expect::Forced)
        }
        Some(PatchAction::Unload { vm, name }) => {
            let _: serde_json::Value =
                Client::connect(&vm)?.call(Request::PatchUnload { name: name.clone() })?;
            println!("unloaded '{name}' from {vm}");
            Ok(0)
        }
        None => {
            let (vm, file) = (args.vm.unwrap_or_default(), args.file.unwrap_or_default());
            load(&vm, &file, args.params, &args.wait)
        }
    }
}

/// The file as a load request carries it, checked here already with the same checks
/// the VMM makes.
fn read_kp(vm: &str, file: &Path) -> Result<String> {
    // `lpvmm patch frobnicate vm1` is a mistyped command, not a VM called frobnicate.
    if !crate::control::rundir::socket_path(vm).exists() {
        bail!(
            "no VM named '{vm}' is running (lpvmm ls lists them); the patch commands are \
             `lpvmm patch VM FILE.kp` and `lpvmm patch {} ...`",
            PATCH_VERBS[..PATCH_VERBS.len() - 1].join("|")
        );
    }
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    if bytes.len() > MAX_KP_SENT {
        bail!(
            "{}: {} bytes; a patch sent to a VM is at most {MAX_KP_SENT}",
            file.display(),
            bytes.len()
        );
    }
    // A livepatch module is read against the guest's kernel, by the VMM.
    if patcher::klp::livepatch_module_name(&bytes).is_none() {
        patcher::PatchObject::parse(&bytes).with_context(|| format!("{}", file.display()))?;
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn load_only(vm: &str, file: &Path, params: Vec<String>, json: bool) -> Result<i32> {
    let kp_hex = read_kp(vm, file)?;
    let r: PatchLoadResult = Client::connect(vm)?.call(Request::PatchLoad {
        kp_hex,
        params,
        enable: false,
        timeout_ms: None,
        consistency: Consistency::PerTask,
    })?;
    if json {
        return print_json(&r);
    }
    println!(
        "loaded '{}' into {vm}, disabled (guest paused {} us to check and write it); \
         lpvmm patch enable {vm} {} enables it",
        r.name, r.pause.paused_us, r.name
    );
    Ok(0)
}

fn load(vm: &str, file: &Path, params: Vec<String>, wait: &WaitArgs) -> Result<i32> {
    let kp_hex = read_kp(vm, file)?;
    let r: PatchLoadResult = Client::connect(vm)?.call(Request::PatchLoad {
        kp_hex,
        params,
        enable: true,
        timeout_ms: timeout_ms(wait)?,
        consistency: wait.consistency,
    })?;
    if !wait.json {
        println!(
            "loaded '{}' into {vm} (guest paused {} us to check and write it); enabling ({})",
            r.name,
            r.pause.paused_us,
            match wait.consistency {
                Consistency::PerTask => "per-task consistency",
                Consistency::Immediate => "immediate consistency",
            }
        );
    }
    let id = r
        .transition
        .ok_or_else(|| anyhow!("no transition started"))?;
    follow(vm, id, wait.no_wait, wait.json, Expect::Done)
}

/// The outcome that makes the command succeed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Done,
    Reversed,
    Forced,
}

/// Poll until transition `id` ends, showing its progress. Exit code 0 when it ended
/// as expected.
fn follow(vm: &str, id: u64, no_wait: bool, json: bool, expect: Expect) -> Result<i32> {
    if no_wait {
        if json {
            return print_json(&serde_json::json!({ "transition": id }));
        }
        println!("transition {id} in progress; `lpvmm patch status {vm}` follows it");
        return Ok(0);
    }
    let mut client = Client::connect(vm)?;
    let mut progress = Progress::new(vm);
    let mut poll = FIRST_POLL;
    loop {
        let s: PatchStatusResult = client.call(Request::PatchStatus)?;
        let ended = s.history.iter().rev().find(|t| t.id == id);
        let current = s.active.as_ref().filter(|t| t.id == id);
        let (t, done) = match (ended, current) {
            (Some(t), _) => (t, true),
            (None, Some(t)) => (t, false),
            (None, None) => bail!("transition {id} is no longer known to the VM"),
        };
        if done {
            progress.clear();
            if json {
                print_json(t)?;
            } else {
                report(vm, t);
            }
            let ok = matches!(
                (expect, t.outcome),
                (Expect::Done, OutcomeView::Done | OutcomeView::Forced)
                    | (Expect::Reversed, OutcomeView::Reversed)
                    | (Expect::Forced, OutcomeView::Forced)
            );
            return Ok(if ok { 0 } else { 1 });
        }
        if !json {
            progress.show(t);
        }
        std::thread::sleep(poll);
        poll = (poll * 2).min(MAX_POLL);
    }
}

/// How soon `follow` asks again after its first look: most transitions end within a tick
/// or two (tens of milliseconds), and a client that always slept 100 ms made every one of
/// them look that long. The interval doubles up to [`MAX_POLL`], so a long transition
/// costs the VM ten status requests a second at most.
const FIRST_POLL: Duration = Duration::from_millis(5);
const MAX_POLL: Duration = Duration::from_millis(100);

/// The live progress line (rewritten in place on a terminal), and each new set of
/// blocking tasks with their stacks.
struct Progress {
    vm: String,
    tty: bool,
    line: String,
    blockers: Vec<i32>,
    hinted: bool,
}

impl Progress {
    fn new(vm: &str) -> Self {
        Progress {
            vm: vm.to_string(),
            // A live line only for a person's terminal (not a serial console or a log).
            tty: std::io::stdout().is_terminal()
                && std::env::var("TERM").is_ok_and(|t| !t.is_empty() && t != "dumb"),
            line: String::new(),
            blockers: Vec::new(),
            hinted: false,
        }
    }

    fn show(&mut self, t: &TransitionView) {
        let pids: Vec<i32> = t.blockers.iter().map(|b| b.pid).collect();
        if pids != self.blockers && !t.blockers.is_empty() {
            self.clear();
            println!(
                "  waiting for {} task(s) not at a safe point:",
                t.blockers.len()
            );
            for b in t.blockers.iter().take(8) {
                print_blocker(b, "    ", "");
            }
            if t.blockers.len() > 8 {
                println!(
                    "    ... and {} more (lpvmm patch status)",
                    t.blockers.len() - 8
                );
            }
            if !self.hinted && t.consistency == Consistency::PerTask {
                println!(
                    "  (the transition goes on in the VM if this command ends; \
                     `lpvmm patch reverse {0}` backs out, `lpvmm patch force {0}` completes it without checks)",
                    self.vm
                );
                self.hinted = true;
            }
        }
        self.blockers = pids;
        // On a terminal the line is rewritten at every tick; in a log, a line is
        // written when the number of tasks moved changes.
        let line = progress_line(t);
        let key = if self.tty {
            line.clone()
        } else {
            format!("{} {} {:?}", t.moved, t.tasks, t.note)
        };
        if key != self.line {
            if self.tty {
                print!("\r\x1b[K{line}");
                let _ = std::io::stdout().flush();
            } else if t.ticks > 0 {
                println!("{line}");
            }
            self.line = key;
        }
    }

    fn clear(&mut self) {
        if self.tty && !self.line.is_empty() {
            print!("\r\x1b[K");
            let _ = std::io::stdout().flush();
            self.line.clear();
        }
    }
}

fn progress_line(t: &TransitionView) -> String {
    format!(
        "  {} {} '{}': {}/{} tasks moved, tick {}, {:.1} s{}",
        if t.reversed { "reversing" } else { "" },
        op_word(t.op, false),
        t.patch,
        t.moved,
        t.tasks,
        t.ticks,
        t.elapsed_ms as f64 / 1000.0,
        t.note
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default()
    )
    .replace("   ", "  ")
}

/// `lead` starts the task's line; its stack is indented by `indent`.
fn print_blocker(b: &BlockerView, indent: &str, lead: &str) {
    println!("{indent}{lead}pid {} ({}): {}", b.pid, b.comm, b.reason);
    for f in &b.trace.frames {
        println!(
            "{indent}    [<{:016x}>] {}",
            f.addr,
            f.symbol.as_deref().unwrap_or("?")
        );
    }
}

fn op_word(op: patcher::Op, done: bool) -> &'static str {
    match (op, done) {
        (patcher::Op::Enable, false) => "enabling",
        (patcher::Op::Disable, false) => "disabling",
        (patcher::Op::Enable, true) => "enabled",
        (patcher::Op::Disable, true) => "disabled",
    }
}

fn pause_summary(t: &TransitionView) -> String {
    let mut p = t.pauses_us.clone();
    p.sort_unstable();
    let c = &t.early_checks;
    let checks = match c.confirmed + c.unwound {
        0 => String::new(),
        all => format!(
            "; {} of {all} task checks unwound before the pause",
            c.confirmed
        ),
    };
    let lists = match c.lists_confirmed + c.lists_walked {
        0 => String::new(),
        all => format!(
            ", {} of {all} task lists walked before it ({} tasks read again in the pause: \
             they had run)",
            c.lists_confirmed, c.tasks_reread
        ),
    };
    let checks = checks + &lists;
    match p.len() {
        0 => String::new(),
        n => format!(
            "; {} tick(s), guest paused {} us median, {} us longest{checks}",
            t.ticks,
            p[n / 2],
            p[n - 1]
        ),
    }
}

fn report(vm: &str, t: &TransitionView) {
    let secs = t.elapsed_ms as f64 / 1000.0;
    let took = if t.elapsed_ms < 10_000 {
        format!("{} ms", t.elapsed_ms)
    } else {
        format!("{secs:.1} s")
    };
    match t.outcome {
        OutcomeView::Done => println!(
            "{} '{}' in {vm} after {took}: {} ({} tasks){}",
            op_word(t.op, true),
            t.patch,
            match t.op {
                patcher::Op::Enable => "every task runs it",
                patcher::Op::Disable => "no task runs it any more",
            },
            t.tasks,
            pause_summary(t)
        ),
        OutcomeView::Forced => {
            println!(
                "forced: '{}' {} in {vm} without checks; {} task(s) skipped:",
                t.patch,
                op_word(t.op, true),
                t.skipped.len()
            );
            for b in &t.skipped {
                print_blocker(b, "  ", "");
            }
            println!(
                "patch '{}' is marked forced: its code stays in the guest (unload is refused)",
                t.patch
            );
        }
        OutcomeView::Reversed => println!(
            "reversed: '{}' is back where it started in {vm} after {took} (every task runs \
             what it ran before){}",
            t.patch,
            pause_summary(t)
        ),
        OutcomeView::TimedOut => {
            println!(
                "gave up: '{}' not {} after {} tick(s) in {secs:.1} s; the guest is as it was before.",
                t.patch,
                op_word(t.op, true),
                t.ticks
            );
            for b in &t.gave_up_on {
                print_blocker(b, "", "blocked by ");
            }
        }
        _ => println!(
            "'{}' failed: {}",
            t.patch,
            t.failure.as_deref().unwrap_or("unknown")
        ),
    }
    print_callbacks(t, "  ");
}

/// A transition's callbacks, one per line.
fn print_callbacks(t: &TransitionView, indent: &str) {
    for c in &t.callbacks {
        let how = match (c.ret, c.ms, &c.gave_up) {
            (_, Some(ms), Some(why)) => format!("given up on after {ms} ms: it {why}"),
            (Some(ret), Some(ms), None) => format!("returned {ret} after {ms} ms"),
            _ => "not returned yet".into(),
        };
        println!(
            "{indent}callback {} {} ({}): {how}",
            c.kind, c.func, c.object
        );
    }
}

fn list(vm: &str, json: bool) -> Result<i32> {
    let s: PatchStatusResult = Client::connect(vm)?.call(Request::PatchStatus)?;
    if json {
        return print_json(&s.patches);
    }
    if s.patches.is_empty() {
        println!("no patches loaded in {vm}");
    }
    for p in &s.patches {
        // A module not loaded: its functions, marked as waiting for it.
        let waiting = p
            .objects
            .iter()
            .filter(|o| o.state == "waiting")
            .flat_map(|o| o.replaces.iter().map(|f| format!("{f} (not loaded)")));
        let funcs: Vec<String> = p
            .funcs
            .iter()
            .map(|f| f.old.clone())
            .chain(waiting)
            .collect();
        let mut state = p.state.to_string();
        if let Some(by) = &p.replaced_by {
            state = format!("{state} by {by}");
        }
        if p.forced {
            state.push_str(" (forced)");
        }
        println!("{:<24} {:<18} {}", p.name, state, funcs.join(", "));
    }
    Ok(0)
}

fn status(vm: &str, json: bool) -> Result<i32> {
    let s: PatchStatusResult = Client::connect(vm)?.call(Request::PatchStatus)?;
    if json {
        return print_json(&s);
    }
    if let Some(a) = &s.area {
        print_area(a);
    }
    print_boot(&s.boot);
    for p in &s.patches {
        print_patch(p);
    }
    for f in &s.funcs {
        print_function(f);
    }
    if !s.funcs.is_empty() {
        println!("  (versions in load order; * is the one tasks run outside transitions)");
    }
    print_transitions(&s);
    if !s.module_events.is_empty() {
        println!("modules that came or went while a patch had a part for them (newest last):");
    }
    for e in &s.module_events {
        println!(
            "  {} {}: {}{}",
            e.module,
            e.action,
            if e.refused { "REFUSED: " } else { "" },
            e.outcome
        );
    }
    Ok(0)
}

fn print_area(a: &AreaView) {
    println!(
        "patch area: guest-physical {:#x}+{:#x} mapped at {:#x} (code {:#x}-{:#x}); in use: \
         code {} of {} KiB, read-only data {} of {} KiB, data {} of {} KiB",
        a.phys_start,
        a.phys_size,
        a.va,
        a.code_start,
        a.code_end,
        a.code_used / 1024,
        a.code_size / 1024,
        a.rodata_used / 1024,
        a.rodata_size / 1024,
        a.data_used / 1024,
        a.data_size / 1024
    );
}

/// The guest's reboots and what lpvmm applied at its boots (nothing to say before a
/// first reboot without `--patch`).
fn print_boot(b: &crate::proto::BootView) {
    if b.reboots == 0 && b.log.is_empty() && b.pending == 0 {
        return;
    }
    println!(
        "boots: the guest rebooted {} time(s) in this VM; {} patch(es) still to apply once \
         this boot's kernel is up",
        b.reboots, b.pending
    );
    for line in &b.log {
        println!("  {line}");
    }
}

/// A patch, its functions, dependencies, unwind table and states.
fn print_patch(p: &PatchView) {
    println!(
        "patch {} ({}{}{}{}, enabled {} time(s){})",
        p.name,
        p.state,
        p.replaced_by
            .as_ref()
            .map(|b| format!(" by {b}"))
            .unwrap_or_default(),
        if p.atomic_replace { ", cumulative" } else { "" },
        if p.forced { ", forced" } else { "" },
        p.enables,
        p.applied_at_boot
            .as_ref()
            .map(|a| format!("; {a}"))
            .unwrap_or_default()
    );
    for o in p.objects.iter().filter(|o| o.state != "vmlinux") {
        match o.module {
            Some(m) => println!("  module {}: loaded (struct module at {m:#x})", o.name),
            None => println!(
                "  module {}: not loaded; {} patched when the guest loads it",
                o.name,
                o.replaces.join(", ")
            ),
        }
    }
    for f in &p.funcs {
        println!(
            // A module's functions as MODULE:FUNCTION.
            "  {} {:#x} -> {} {:#x} ({} bytes{}{})",
            f.old,
            f.old_addr,
            f.new_name,
            f.new_addr,
            f.new_size,
            if f.immediate { ", immediate" } else { "" },
            if f.frame_pointer || p.orc_entries > 0 {
                ""
            } else {
                ", no frame pointer: tasks in it block"
            }
        );
    }
    if !p.depends.is_empty() {
        println!("  depends on: {}", p.depends.join(", "));
    }
    if p.orc_entries > 0 {
        println!(
            "  unwound with its ORC table ({} entries, from objtool)",
            p.orc_entries
        );
    }
    for st in &p.states {
        println!("  state {} version {}", st.id, st.version);
    }
}

/// A redirected function's stack of versions.
fn print_function(f: &FuncView) {
    let mark = |visible: bool| if visible { "*" } else { "" };
    let versions: Vec<String> =
        std::iter::once(format!("original{}", mark(f.visible == "original")))
            .chain(f.versions.iter().map(|v| {
                format!(
                    "{} [{}, {}]{}",
                    v.function,
                    v.patch,
                    v.state,
                    mark(v.visible)
                )
            }))
            .collect();
    println!(
        "function {}: {} (site: {}{})",
        f.name,
        versions.join(" < "),
        f.site_now,
        if f.ftrace_hidden {
            "; hidden from the guest's ftrace"
        } else {
            ""
        }
    );
}

/// The transition in progress, and the last five.
fn print_transitions(s: &PatchStatusResult) {
    match &s.active {
        Some(t) => {
            println!(
                "transition {}: {}{} '{}' ({}), {}/{} tasks moved, tick {} after {:.1} s{}",
                t.id,
                op_word(t.op, false),
                if t.reversed { ", reversed" } else { "" },
                t.patch,
                match t.consistency {
                    Consistency::PerTask => "per-task",
                    Consistency::Immediate => "immediate",
                },
                t.moved,
                t.tasks,
                t.ticks,
                t.elapsed_ms as f64 / 1000.0,
                t.timeout_ms
                    .map(|ms| format!(" (timeout {:.0} s)", ms as f64 / 1000.0))
                    .unwrap_or_default()
            );
            if let Some(n) = &t.note {
                println!("  note: {n}");
            }
            print_callbacks(t, "  ");
            for b in &t.blockers {
                print_blocker(b, "  ", "blocked by ");
            }
        }
        None => println!("no transition in progress"),
    }
    for t in s.history.iter().rev().take(5) {
        println!(
            "  earlier: transition {} {} '{}': {} after {} tick(s), {:.2} s",
            t.id,
            op_word(t.op, false),
            t.patch,
            t.outcome,
            t.ticks,
            t.elapsed_ms as f64 / 1000.0
        );
        for b in &t.gave_up_on {
            print_blocker(b, "    ", "gave up on ");
        }
    }
}

pub fn kp(cmd: KpCommand) -> Result<i32> {
    match cmd {
        KpCommand::Build {
            file,
            output,
            diff: Some(diff),
            source_tree,
            name,
            sympos,
            kernel,
            vm,
            ..
        } => {
            let _ = file;
            let req = patcher::diffbuild::Request {
                diff: &diff,
                release: &release_of(kernel, vm)?,
                source: source_tree.as_deref(),
                output: &output,
                name: name.as_deref(),
                sympos: positions(&sympos)?,
            };
            kp_build_diff(&req)
        }
        KpCommand::Build {
            file,
            output,
            include,
            cflags,
            kernel,
            vm,
            ..
        } => {
            let source = file.context("a C source file, or --diff FILE")?;
            kp_build(&source, &output, &include, &cflags, kernel, vm)
        }
        KpCommand::Inspect {
            file,
            params,
            vm,
            json,
        } => kp_inspect(&file, params, vm.as_deref(), json),
    }
}

/// `lpvmm kp build`: with the guest kernel's own kbuild when a release (or a VM) is
/// named, else with the system's gcc and lpvmm's header.
fn kp_build(
    source: &Path,
    output: &Path,
    include: &[PathBuf],
    cflags: &[String],
    kernel: Option<String>,
    vm: Option<String>,
) -> Result<i32> {
    let release = match (kernel, vm) {
        (Some(r), _) => Some(r),
        (None, Some(vm)) => Some(guest_release(&vm)?),
        (None, None) => None,
    };
    if patcher::klp::build::is_livepatch_source(source) {
        return kp_build_livepatch(source, output, release.as_deref(), cflags);
    }
    let p = match &release {
        Some(r) => patcher::kbuild::build(source, output, r, cflags)?,
        None => patcher::build::build(source, output, include, cflags)?,
    };
    println!(
        "built {} ({}){}: {}",
        output.display(),
        p.manifest.name,
        release
            .map(|r| format!(" with the kbuild of {r}"))
            .unwrap_or_default(),
        replaced(&p)
    );
    Ok(0)
}

/// The release `--kernel` names, or that of `--vm`'s guest.
fn release_of(kernel: Option<String>, vm: Option<String>) -> Result<String> {
    match (kernel, vm) {
        (Some(r), _) => Ok(r),
        (None, Some(vm)) => guest_release(&vm),
        (None, None) => bail!(
            "--diff needs the guest kernel's release: --kernel RELEASE (as `uname -r` prints \
             it in the guest) or --vm VM"
        ),
    }
}

/// `--sympos NAME=POS` values.
fn positions(args: &[String]) -> Result<std::collections::BTreeMap<String, u32>> {
    let mut out = std::collections::BTreeMap::new();
    for a in args {
        let (name, pos) = a
            .split_once('=')
            .with_context(|| format!("--sympos {a}: want NAME=POS"))?;
        let pos: u32 = pos
            .parse()
            .ok()
            .filter(|&p| p > 0)
            .with_context(|| format!("--sympos {a}: POS is a number from 1"))?;
        if out.insert(name.to_string(), pos).is_some() {
            bail!("--sympos {name} is given twice");
        }
    }
    Ok(out)
}

/// `lpvmm kp build --diff`: a patch from a source diff of the guest kernel, built in the
/// release's own source tree.
fn kp_build_diff(req: &patcher::diffbuild::Request<'_>) -> Result<i32> {
    let built = patcher::diffbuild::build(req)?;
    for line in &built.report {
        println!("{line}");
    }
    println!(
        "built {} ({}) from {} with the source and kbuild of {}: {}",
        req.output.display(),
        built.patch.manifest.name,
        req.diff.display(),
        req.release,
        replaced(&built.patch)
    );
    Ok(0)
}

/// `old -> new, ...` of a patch's replacements, as `kp build` says them.
fn replaced(p: &patcher::PatchObject) -> String {
    let funcs: Vec<String> = p
        .manifest
        .replacements
        .iter()
        .map(|r| format!("{} -> {}", r.old, r.new))
        .collect();
    funcs.join(", ")
}

/// `kp build --kernel` of a kernel livepatch module's source: a `.ko` as kbuild makes
/// it, with lpvmm's shadow-variable runtime (read against the guest's kernel when it
/// is applied).
fn kp_build_livepatch(
    source: &Path,
    output: &Path,
    release: Option<&str>,
    cflags: &[String],
) -> Result<i32> {
    let Some(release) = release else {
        bail!(
            "{} is a kernel livepatch module's source (it includes <linux/livepatch.h>): \
             build it with --kernel RELEASE (or --vm VM), as the guest's own modules are built",
            source.display()
        );
    };
    let (bytes, name) = patcher::klp::build::compile(source, release, cflags)?;
    std::fs::write(output, &bytes).with_context(|| format!("writing {}", output.display()))?;
    println!(
        "built {} (livepatch module {name}) with the kbuild of {release}; lpvmm reads its \
         struct klp_patch when it applies it",
        output.display()
    );
    Ok(0)
}

/// `lpvmm kp inspect`: what a .kp holds and what it needs from the kernel.
fn kp_inspect(file: &Path, params: Vec<String>, vm: Option<&str>, json: bool) -> Result<i32> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let p = match (patcher::klp::livepatch_module_name(&bytes), vm) {
        (_, Some(vm)) => {
            let kp_hex = read_kp(vm, file)?;
            let p: patcher::PatchObject =
                Client::connect(vm)?.call(Request::KpInspect { kp_hex, params })?;
            p
        }
        (Some(name), None) => {
            if json {
                return print_json(&serde_json::json!({ "livepatch_module": name }));
            }
            println!(
                "livepatch module {name}: lpvmm reads its struct klp_patch (objects, functions, \
                 callbacks, states, parameters) with a guest kernel's own layout of it: \
                 lpvmm kp inspect --vm VM {} [PARAM=VALUE...] describes it as that guest would \
                 get it, lpvmm patch VM {} [PARAM=VALUE...] applies it",
                file.display(),
                file.display()
            );
            return Ok(0);
        }
        (None, None) => {
            if !params.is_empty() {
                bail!(
                    "parameters are a livepatch module's; {} is a .kp",
                    file.display()
                );
            }
            patcher::PatchObject::parse(&bytes).with_context(|| format!("{}", file.display()))?
        }
    };
    let diff = patcher::diffbuild::report_of(&bytes);
    if json {
        let mut v = serde_json::to_value(&p)?;
        if let (Some(lines), Some(o)) = (&diff, v.as_object_mut()) {
            o.insert("diff_build".into(), serde_json::json!(lines));
        }
        return print_json(&v);
    }
    describe_patch(&p);
    for line in diff.iter().flatten() {
        println!("from diff: {line}");
    }
    Ok(0)
}

/// What `kp inspect` prints of a patch.
fn describe_patch(p: &patcher::PatchObject) {
    let m = &p.manifest;
    println!("patch:     {}", m.name);
    for r in &m.replacements {
        let size = p.function(&r.new).map(|f| f.size).unwrap_or(0);
        println!(
            "replaces:  {} with {} ({size} bytes{})",
            r.old,
            r.new,
            if r.immediate { ", immediate" } else { "" }
        );
    }
    for b in &m.bindings {
        println!("binds:     {} to kernel {}", b.local, b.kernel);
    }
    for t in &m.shadows {
        println!(
            "shadow:    variable {} lives as long as state {} (lpvmm frees them all once it ends)",
            t.id, t.state
        );
    }
    for c in m
        .callbacks
        .iter()
        .filter(|c| c.kind != patcher::load::manifest::CallbackKind::ShadowFree)
    {
        let of = match (c.state, &c.object) {
            (Some(id), _) => format!("state {id}"),
            (None, Some(m)) => m.clone(),
            (None, None) => "vmlinux".into(),
        };
        println!("callback:  {} {} ({of})", c.kind.word(), c.func);
    }
    if !m.depends.is_empty() {
        println!("depends:   {}", m.depends.join(", "));
    }
    if m.atomic_replace {
        println!("cumulative: replaces every other patch when enabled (atomic replace)");
    }
    for st in &m.states {
        println!("state:     {} version {}", st.id, st.version);
    }
    if let Some(orc) = &p.orc {
        println!(
            "unwind:    {} ORC entries (objtool): tasks unwind through it at any instruction",
            orc.entries.len()
        );
    }
    for s in &p.sections {
        println!(
            "section:   {:<20} {:?}, {} bytes, {} relocations",
            s.name,
            s.kind,
            s.size,
            s.relocs.len()
        );
    }
    if !p.extable.is_empty() {
        println!(
            "faults:    {} exception table entries, given to the guest with the patch's module",
            p.extable.len()
        );
    }
    println!("needs:     {}", p.imports.join(", "));
}

/// The release of a running VM's kernel, as introspection reads it.
fn guest_release(vm: &str) -> Result<String> {
    let k: crate::proto::KernelResult =
        Client::connect(vm)?.call(Request::Kernel { reattach: false })?;
    Ok(k.stats.release)
}

pub fn checksum(vm: &str, what: &str, json: bool) -> Result<i32> {
    let what = match what {
        "text" => ChecksumTarget::Text,
        "patch-area" => ChecksumTarget::PatchArea,
        other => match other.strip_prefix("module:") {
            Some(name) if !name.is_empty() => ChecksumTarget::Module { name: name.into() },
            _ => bail!("checksum of '{other}': say text, patch-area or module:NAME"),
        },
    };
    let r: ChecksumResult = Client::connect(vm)?.call(Request::Checksum { what })?;
    if json {
        return print_json(&r);
    }
    println!("{}  {:#x}+{:#x}", r.sha256, r.start, r.len);
    Ok(0)
}
