//! Client commands for patching: `patch ...`, `kp build|inspect`, `checksum`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use patcher::{Outcome, Transition};

use crate::cli::print_json;
use crate::control::client::Client;
use crate::control::proto::{
    ChecksumResult, ChecksumTarget, PatchLoadResult, PatchStatusResult, Request, TransitionStarted,
};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct PatchArgs {
    #[command(subcommand)]
    action: Option<PatchAction>,
    /// The VM to patch
    #[arg(required = true)]
    vm: Option<String>,
    /// The patch (.kp, from `lpvmm kp build`)
    #[arg(required = true)]
    file: Option<PathBuf>,
    #[command(flatten)]
    wait: WaitArgs,
}

#[derive(Args, Clone, Copy)]
pub struct WaitArgs {
    /// Give up the transition after this many seconds (the guest is left as it was)
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Return once the transition has started instead of following it
    #[arg(long)]
    no_wait: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum PatchAction {
    /// Loaded patches and their state
    List {
        vm: String,
        #[arg(long)]
        json: bool,
    },
    /// Patches, the transition in progress (with its blocking tasks) and recent ones
    Status {
        vm: String,
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
    /// Remove a disabled patch from the guest
    Unload { vm: String, name: String },
}

#[derive(Subcommand)]
pub enum KpCommand {
    /// Compile a C patch into a .kp
    Build {
        source: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        /// Extra include directory (for example kernel headers)
        #[arg(short = 'I', value_name = "DIR")]
        include: Vec<PathBuf>,
        /// Extra compiler flag (repeatable)
        #[arg(long = "cflag", value_name = "FLAG", allow_hyphen_values = true)]
        cflags: Vec<String>,
    },
    /// Show what a .kp contains and what it needs from the kernel
    Inspect {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// The request line carries the file hex-encoded (see proto::MAX_REQUEST_BYTES).
const MAX_KP_SENT: usize = 4 << 20;

fn timeout_ms(w: &WaitArgs) -> Result<u64> {
    if !(w.timeout > 0.0 && w.timeout <= 3600.0) {
        bail!("--timeout must be between 0 and 3600 seconds");
    }
    Ok((w.timeout * 1000.0) as u64)
}

pub fn patch(args: PatchArgs) -> Result<i32> {
    match args.action {
        Some(PatchAction::List { vm, json }) => list(&vm, json),
        Some(PatchAction::Status { vm, json }) => status(&vm, json),
        Some(PatchAction::Enable { vm, name, wait }) => {
            let t = timeout_ms(&wait)?;
            let r: TransitionStarted = Client::connect(&vm)?.call(Request::PatchEnable {
                name: name.clone(),
                timeout_ms: Some(t),
            })?;
            follow(&vm, &name, r.id, &wait)
        }
        Some(PatchAction::Disable { vm, name, wait }) => {
            let t = timeout_ms(&wait)?;
            let r: TransitionStarted = Client::connect(&vm)?.call(Request::PatchDisable {
                name: name.clone(),
                timeout_ms: Some(t),
            })?;
            follow(&vm, &name, r.id, &wait)
        }
        Some(PatchAction::Unload { vm, name }) => {
            let _: serde_json::Value =
                Client::connect(&vm)?.call(Request::PatchUnload { name: name.clone() })?;
            println!("unloaded '{name}' from {vm}");
            Ok(0)
        }
        None => {
            let (vm, file) = (args.vm.unwrap_or_default(), args.file.unwrap_or_default());
            load(&vm, &file, &args.wait)
        }
    }
}

fn load(vm: &str, file: &Path, wait: &WaitArgs) -> Result<i32> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    if bytes.len() > MAX_KP_SENT {
        bail!(
            "{}: {} bytes; a patch sent to a VM is at most {MAX_KP_SENT}",
            file.display(),
            bytes.len()
        );
    }
    // Refuse a bad file here already, with the same checks the VMM makes.
    patcher::PatchObject::parse(&bytes).with_context(|| format!("{}", file.display()))?;
    let kp_hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let r: PatchLoadResult = Client::connect(vm)?.call(Request::PatchLoad {
        kp_hex,
        enable: true,
        timeout_ms: Some(timeout_ms(wait)?),
    })?;
    if !wait.json {
        println!(
            "loaded '{}' into {vm} (guest paused {} us to link and check it); enabling",
            r.name, r.pause.paused_us
        );
    }
    let id = r
        .transition
        .ok_or_else(|| anyhow!("no transition started"))?;
    follow(vm, &r.name, id, wait)
}

/// Poll until transition `id` ends, printing what changes. Exit code 0 when it completed.
fn follow(vm: &str, name: &str, id: u64, wait: &WaitArgs) -> Result<i32> {
    if wait.no_wait {
        if wait.json {
            return print_json(&serde_json::json!({ "patch": name, "transition": id }));
        }
        println!("transition {id} of '{name}' started; `lpvmm patch status {vm}` follows it");
        return Ok(0);
    }
    let mut client = Client::connect(vm)?;
    let t0 = Instant::now();
    let mut shown = (0u32, String::new());
    loop {
        let s: PatchStatusResult = client.call(Request::PatchStatus)?;
        let ended = s.history.iter().rev().find(|r| r.id == id);
        let current = s.active.as_ref().filter(|r| r.id == id);
        let (t, done) = match (ended, current) {
            (Some(r), _) => (&r.transition, true),
            (None, Some(r)) => (&r.transition, false),
            (None, None) => bail!("transition {id} of '{name}' is no longer known to the VM"),
        };
        if wait.json && done {
            print_json(t)?;
            return Ok(if t.outcome == Outcome::Done { 0 } else { 1 });
        }
        if !wait.json {
            let line = blockers_line(t);
            if t.attempts != shown.0 && !line.is_empty() && line != shown.1 {
                println!("  attempt {}: {line}", t.attempts);
                shown = (t.attempts, line);
            }
        }
        if done {
            return Ok(report(vm, t));
        }
        if t0.elapsed() > Duration::from_millis(t.timeout_ms) + Duration::from_secs(30) {
            bail!("transition {id} did not end within its timeout; see `lpvmm patch status {vm}`");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn blockers_line(t: &Transition) -> String {
    if t.blockers.is_empty() {
        return String::new();
    }
    let who: Vec<String> = t
        .blockers
        .iter()
        .take(3)
        .map(|b| format!("pid {} ({}): {}", b.pid, b.comm, b.reason))
        .collect();
    let more = t.blockers.len().saturating_sub(3);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!("blocked by {}{more}", who.join("; "))
}

fn verb(op: patcher::Op) -> &'static str {
    match op {
        patcher::Op::Enable => "enabled",
        patcher::Op::Disable => "disabled",
    }
}

fn report(vm: &str, t: &Transition) -> i32 {
    let last_pause = t.pauses_us.last().copied().unwrap_or(0);
    match &t.outcome {
        Outcome::Done => {
            println!(
                "{} '{}' in {vm} after {} attempt(s), {:.2} s (the guest was paused {} us for the switch; {} tasks checked)",
                verb(t.op),
                t.patch,
                t.attempts,
                t.elapsed_ms as f64 / 1000.0,
                last_pause,
                t.tasks
            );
            0
        }
        Outcome::TimedOut => {
            println!(
                "gave up: '{}' not {} after {} attempts in {:.1} s; the guest is as it was before.",
                t.patch,
                verb(t.op),
                t.attempts,
                t.elapsed_ms as f64 / 1000.0
            );
            for b in &t.blockers {
                println!("blocked by pid {} ({}): {}", b.pid, b.comm, b.reason);
                for f in &b.trace.frames {
                    println!(
                        "    [<{:016x}>] {}",
                        f.addr,
                        f.symbol.as_deref().unwrap_or("?")
                    );
                }
            }
            1
        }
        Outcome::Failed(why) => {
            println!("'{}' failed: {why}", t.patch);
            1
        }
        Outcome::Pending => 1,
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
        let state = match p.state {
            patcher::PatchState::Enabled => "enabled",
            patcher::PatchState::Disabled => "disabled",
        };
        let funcs: Vec<String> = p.funcs.iter().map(|f| f.old.to_string()).collect();
        println!("{:<24} {:<9} {}", p.name, state, funcs.join(", "));
    }
    Ok(0)
}

fn status(vm: &str, json: bool) -> Result<i32> {
    let s: PatchStatusResult = Client::connect(vm)?.call(Request::PatchStatus)?;
    if json {
        return print_json(&s);
    }
    if let Some(a) = &s.area {
        println!(
            "patch area: guest-physical {:#x}+{:#x} mapped at {:#x} (code {:#x}-{:#x})",
            a.phys.start, a.phys.size, a.va, a.code.start, a.code.end
        );
    }
    for p in &s.patches {
        let state = match p.state {
            patcher::PatchState::Enabled => "enabled",
            patcher::PatchState::Disabled => "disabled",
        };
        println!("patch {} ({state}, enabled {} time(s))", p.name, p.enables);
        for f in &p.funcs {
            println!(
                "  {} {:#x} -> {} {:#x} ({} bytes{})",
                f.old,
                f.old_addr,
                f.new_name,
                f.new_addr,
                f.new_size,
                if f.frame_pointer {
                    ""
                } else {
                    ", no frame pointer: tasks in it block"
                }
            );
        }
        if !p.depends.is_empty() {
            println!("  depends on: {}", p.depends.join(", "));
        }
    }
    match &s.active {
        Some(r) => {
            let t = &r.transition;
            println!(
                "transition {}: {} '{}', attempt {} after {:.1} s (timeout {:.0} s)",
                r.id,
                match t.op {
                    patcher::Op::Enable => "enabling",
                    patcher::Op::Disable => "disabling",
                },
                t.patch,
                t.attempts,
                t.elapsed_ms as f64 / 1000.0,
                t.timeout_ms as f64 / 1000.0
            );
            for b in &t.blockers {
                println!("  blocked by pid {} ({}): {}", b.pid, b.comm, b.reason);
                for f in &b.trace.frames {
                    println!("      {}", f.symbol.as_deref().unwrap_or("?"));
                }
            }
        }
        None => println!("no transition in progress"),
    }
    for r in s.history.iter().rev().take(5) {
        let t = &r.transition;
        println!(
            "  earlier: transition {} {} '{}': {:?} after {} attempt(s)",
            r.id,
            verb(t.op),
            t.patch,
            t.outcome,
            t.attempts
        );
    }
    Ok(0)
}

pub fn kp(cmd: KpCommand) -> Result<i32> {
    match cmd {
        KpCommand::Build {
            source,
            output,
            include,
            cflags,
        } => {
            let p = patcher::build::build(&source, &output, &include, &cflags)?;
            let funcs: Vec<String> = p
                .manifest
                .replacements
                .iter()
                .map(|r| format!("{} -> {}", r.old, r.new))
                .collect();
            println!(
                "built {} ({}): {}",
                output.display(),
                p.manifest.name,
                funcs.join(", ")
            );
            Ok(0)
        }
        KpCommand::Inspect { file, json } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let p = patcher::PatchObject::parse(&bytes)
                .with_context(|| format!("{}", file.display()))?;
            if json {
                return print_json(&p);
            }
            let m = &p.manifest;
            println!("patch:     {}", m.name);
            for r in &m.replacements {
                let size = p.function(&r.new).map(|f| f.size).unwrap_or(0);
                println!("replaces:  {} with {} ({size} bytes)", r.old, r.new);
            }
            for b in &m.bindings {
                println!("binds:     {} to kernel {}", b.local, b.kernel);
            }
            if !m.depends.is_empty() {
                println!("depends:   {}", m.depends.join(", "));
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
            println!("needs:     {}", p.imports.join(", "));
            Ok(0)
        }
    }
}

pub fn checksum(vm: &str, what: &str, json: bool) -> Result<i32> {
    let what = match what {
        "text" => ChecksumTarget::Text,
        "patch-area" => ChecksumTarget::PatchArea,
        other => bail!("checksum of '{other}': say text or patch-area"),
    };
    let r: ChecksumResult = Client::connect(vm)?.call(Request::Checksum { what })?;
    if json {
        return print_json(&r);
    }
    println!("{}  {:#x}+{:#x}", r.sha256, r.start, r.len);
    Ok(0)
}
