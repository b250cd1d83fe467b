//! Client commands on a running VM as a whole: list, status, pause, resume, stop,
//! registers, memory, VMCOREINFO, and the pause benchmark.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Subcommand;
use serde::Serialize;

use crate::cli::print_json;
use crate::control::client::Client;
use crate::control::rundir;
use crate::proto::{
    PauseResult, ReadPhysResult, RegsResult, Request, ResumeResult, RunState, StatusInfo,
    VmcoreinfoResult,
};

#[derive(Subcommand)]
pub enum Bench {
    /// Pause/resume a running VM repeatedly; report latency percentiles
    Pause {
        vm: String,
        #[arg(long, default_value_t = 1000)]
        cycles: u32,
        #[arg(long)]
        json: bool,
    },
    /// Enable then disable loaded patches repeatedly, odd cycles immediate and even ones
    /// per-task; stop at the first transition that does not end done
    Cycles {
        vm: String,
        /// The loaded patches, comma-separated: enabled in this order, then disabled
        #[arg(long, value_delimiter = ',', required = true)]
        patches: Vec<String>,
        #[arg(long, default_value_t = 100)]
        cycles: u32,
        /// Number of the first cycle (a run in batches keeps the alternation)
        #[arg(long, default_value_t = 0)]
        first: u32,
        /// Per-transition timeout in seconds (as `lpvmm patch --timeout`)
        #[arg(long)]
        timeout: Option<f64>,
        #[arg(long)]
        json: bool,
    },
}

/// The first `vmN` with no live socket.
pub fn default_name(name: Option<String>) -> Result<String> {
    if let Some(n) = name {
        return Ok(n);
    }
    for i in 1..1000 {
        let n = format!("vm{i}");
        if Client::connect(&n).is_err() {
            return Ok(n);
        }
    }
    bail!("no free default VM name; pass --name")
}

pub fn ls(json: bool) -> Result<i32> {
    let dir = rundir::runtime_dir();
    let mut vms = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".sock"))
                    .map(str::to_string)
            })
            .collect();
        names.sort();
        for name in names {
            if let Ok(status) =
                Client::connect(&name).and_then(|mut c| c.call::<StatusInfo>(Request::Status))
            {
                vms.push(status);
            }
        }
    }
    if json {
        return print_json(&vms);
    }
    println!(
        "{:<16} {:>8} {:<8} {:>5} {:>8} {:>10}",
        "NAME", "PID", "STATE", "VCPUS", "MEMORY", "UPTIME"
    );
    for s in vms {
        println!(
            "{:<16} {:>8} {:<8} {:>5} {:>7}M {:>9}s",
            s.name,
            s.pid,
            state_word(&s.state),
            s.vcpus,
            s.memory_bytes >> 20,
            s.uptime_ms / 1000
        );
    }
    Ok(0)
}

fn state_word(s: &RunState) -> &'static str {
    match s {
        RunState::Running => "running",
        RunState::Paused => "paused",
    }
}

pub fn status(vm: &str, json: bool) -> Result<i32> {
    let s: StatusInfo = Client::connect(vm)?.call(Request::Status)?;
    if json {
        return print_json(&s);
    }
    println!("name:        {}", s.name);
    println!("state:       {}", state_word(&s.state));
    println!("pid:         {}", s.pid);
    println!("vcpus:       {}", s.vcpus);
    println!("memory:      {} MiB", s.memory_bytes >> 20);
    println!("kernel:      {}", s.kernel);
    println!("initrd:      {}", s.initrd.as_deref().unwrap_or("-"));
    println!("cmdline:     {}", s.cmdline);
    for d in &s.devices {
        println!("device:      {d}");
    }
    println!("uptime:      {:.1} s", s.uptime_ms as f64 / 1000.0);
    if let Some(us) = s.start_to_first_run_us {
        println!(
            "started in:  {:.1} ms (lpvmm's start to the first KVM_RUN)",
            us as f64 / 1000.0
        );
    }
    println!(
        "patch area:  {:#x}-{:#x} ({} KiB, reserved in the guest's e820 map)",
        s.patch_area_start,
        s.patch_area_start + s.patch_area_size,
        s.patch_area_size >> 10
    );
    match s.last_pause_ns {
        Some(ns) => println!(
            "pauses:      {} (last parked all vCPUs in {} us)",
            s.pauses,
            ns / 1000
        ),
        None => println!("pauses:      0"),
    }
    Ok(0)
}

pub fn pause(vm: &str, json: bool) -> Result<i32> {
    let r: PauseResult = Client::connect(vm)?.call(Request::Pause)?;
    if json {
        return print_json(&r);
    }
    println!(
        "paused {vm}: {} vCPU(s) parked in {} us",
        r.vcpus.len(),
        r.parked_ns / 1000
    );
    Ok(0)
}

pub fn resume(vm: &str, json: bool) -> Result<i32> {
    let r: ResumeResult = Client::connect(vm)?.call(Request::Resume)?;
    if json {
        return print_json(&r);
    }
    println!("resumed {vm} in {} us", r.resumed_ns / 1000);
    Ok(0)
}

pub fn stop(vm: &str) -> Result<i32> {
    let _: serde_json::Value = Client::connect(vm)?.call(Request::Stop)?;
    println!("stopping {vm}");
    Ok(0)
}

pub fn regs(vm: &str, json: bool) -> Result<i32> {
    let r: RegsResult = Client::connect(vm)?.call(Request::Regs)?;
    if json {
        return print_json(&r);
    }
    if r.pause.paused_for_read {
        println!(
            "(VM was paused for the read and resumed: {} us)",
            r.pause.paused_us
        );
    }
    for s in &r.vcpus {
        println!(
            "vcpu{}: cpl {} rip {:#018x} rsp {:#018x} rflags {:#x}",
            s.index,
            s.cpl(),
            s.rip,
            s.rsp,
            s.rflags
        );
        println!(
            "       cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
            s.cr0, s.cr3, s.cr4, s.efer
        );
        println!(
            "       gs_base {:#x} kernel_gs_base {:#x} lstar {:#x}",
            s.gs_base, s.kernel_gs_base, s.lstar
        );
    }
    Ok(0)
}

pub fn read_phys(vm: &str, addr: u64, len: u32, json: bool) -> Result<i32> {
    let r: ReadPhysResult = Client::connect(vm)?.call(Request::ReadPhys { addr, len })?;
    if json {
        return print_json(&r);
    }
    for (i, chunk) in r.hex.as_bytes().chunks(32).enumerate() {
        let line: Vec<&str> = chunk
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap_or("??"))
            .collect();
        println!("{:#014x}: {}", addr + i as u64 * 16, line.join(" "));
    }
    Ok(0)
}

pub fn vmcoreinfo(vm: &str, json: bool) -> Result<i32> {
    let r: VmcoreinfoResult = Client::connect(vm)?.call(Request::Vmcoreinfo)?;
    if json {
        return print_json(&r);
    }
    let i = &r.info;
    println!("release:        {}", i.osrelease);
    println!("kaslr offset:   {:#x}", i.kernel_offset);
    println!("note at:        {:#x} (guest-physical)", r.phys_addr);
    println!(
        "entries:        {} symbols, {} offsets, {} sizes, {} others",
        i.symbols.len(),
        i.offsets.len(),
        i.sizes.len(),
        i.other.len()
    );
    for name in ["_stext", "init_uts_ns", "swapper_pg_dir", "kallsyms_names"] {
        if let Some(a) = i.symbol(name) {
            println!("  {name:<14} {a:#018x}");
        }
    }
    Ok(0)
}

#[derive(Serialize)]
struct Percentiles {
    median_us: f64,
    p99_us: f64,
    max_us: f64,
}

fn percentiles(mut ns: Vec<u64>) -> Percentiles {
    ns.sort_unstable();
    let at = |q: f64| {
        if ns.is_empty() {
            return 0.0;
        }
        let i = ((ns.len() as f64 - 1.0) * q).round() as usize;
        ns[i] as f64 / 1000.0
    };
    Percentiles {
        median_us: at(0.5),
        p99_us: at(0.99),
        max_us: at(1.0),
    }
}

#[derive(Serialize)]
struct PauseBench {
    vm: String,
    vcpus: usize,
    cycles: u32,
    /// Inside the VMM: pause request → all vCPUs parked.
    park: Percentiles,
    /// Inside the VMM: resume request → all vCPUs left the park.
    resume: Percentiles,
    /// Client round trip of a pause request (socket included).
    pause_round_trip: Percentiles,
    resume_round_trip: Percentiles,
}

pub fn bench(what: Bench) -> Result<i32> {
    let (vm, cycles, json) = match what {
        Bench::Pause { vm, cycles, json } => (vm, cycles, json),
        Bench::Cycles {
            vm,
            patches,
            cycles,
            first,
            timeout,
            json,
        } => {
            return crate::cli::cycles::cycles(crate::cli::cycles::CyclesArgs {
                vm,
                patches,
                cycles,
                first,
                timeout_ms: crate::cli::patch::seconds_to_ms(timeout)?,
                json,
            })
        }
    };
    let mut client = Client::connect(&vm)?;
    let (mut park, mut resume, mut prt, mut rrt) = (vec![], vec![], vec![], vec![]);
    let mut vcpus = 0;
    for _ in 0..cycles {
        let t = Instant::now();
        let p: PauseResult = client.call(Request::Pause)?;
        prt.push(t.elapsed().as_nanos() as u64);
        let t = Instant::now();
        let r: ResumeResult = client.call(Request::Resume)?;
        rrt.push(t.elapsed().as_nanos() as u64);
        vcpus = p.vcpus.len();
        park.push(p.parked_ns);
        resume.push(r.resumed_ns);
    }
    let b = PauseBench {
        vm,
        vcpus,
        cycles,
        park: percentiles(park),
        resume: percentiles(resume),
        pause_round_trip: percentiles(prt),
        resume_round_trip: percentiles(rrt),
    };
    if json {
        return print_json(&b);
    }
    println!("{} pause/resume cycles, {} vCPU(s):", b.cycles, b.vcpus);
    for (what, p) in [
        ("park (VMM)", &b.park),
        ("resume (VMM)", &b.resume),
        ("pause round trip", &b.pause_round_trip),
        ("resume round trip", &b.resume_round_trip),
    ] {
        println!(
            "  {what:<18} median {:>9.1} us  p99 {:>9.1} us  max {:>9.1} us",
            p.median_us, p.p99_us, p.max_us
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_order_statistics() {
        let p = percentiles((1..=100).map(|i| i * 1000).collect());
        assert_eq!(p.median_us, 51.0);
        assert_eq!(p.p99_us, 99.0);
        assert_eq!(p.max_us, 100.0);
        assert_eq!(percentiles(vec![]).median_us, 0.0);
    }
}
