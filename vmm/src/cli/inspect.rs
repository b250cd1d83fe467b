//! Client commands for introspection: `kernel`, `sym`, `tasks`, `stack`, `disasm`.

use std::io::Write;

use anyhow::{bail, Result};
use introspection::stack::{StackTrace, TraceStart};

use crate::cli::print_json;
use crate::control::client::Client;
use crate::proto::{
    DisasmResult, KernelResult, ModulesResult, PauseCost, Request, ShadowResult, StackResult,
    SymQuery, SymResult, TasksResult,
};

fn pause_note(p: &PauseCost) -> String {
    if p.paused_for_read {
        format!("(guest paused {} us for the read)", p.paused_us)
    } else {
        "(no pause needed)".into()
    }
}

pub fn kernel(vm: &str, reattach: bool, json: bool) -> Result<i32> {
    let r: KernelResult = Client::connect(vm)?.call(Request::Kernel { reattach })?;
    if json {
        return print_json(&r);
    }
    let s = &r.stats;
    println!("release:       {}", s.release);
    println!("kaslr offset:  {:#x}", s.kaslr_offset);
    println!("symbols:       {} (kallsyms)", s.symbols);
    println!(
        "btf:           {} types, {} KiB",
        s.btf_types,
        s.btf_bytes >> 10
    );
    println!(
        "orc:           {} entries ({} layout)",
        s.orc_entries,
        if s.orc_has_end_bit { "pre-6.4" } else { "6.4+" }
    );
    println!("thread size:   {} KiB", s.thread_size >> 10);
    println!(
        "paging:        {} levels",
        if s.five_level_paging { 5 } else { 4 }
    );
    if r.attached_now {
        println!(
            "attached now in {} ms {}: VMCOREINFO at {} ms, symbols at {} ms, BTF at {} ms",
            s.attach_us / 1000,
            pause_note(&r.pause),
            s.vmcoreinfo_done_us / 1000,
            s.kallsyms_done_us / 1000,
            s.btf_done_us / 1000
        );
    } else {
        println!("attached earlier (took {} ms)", s.attach_us / 1000);
    }
    Ok(0)
}

/// `0x...` is an address; anything else a symbol name.
pub fn sym(vm: &str, target: Option<String>, all: bool, json: bool) -> Result<i32> {
    let query = match (target, all) {
        (None, true) => SymQuery::All,
        (Some(t), false) => match t.strip_prefix("0x") {
            Some(hex) => SymQuery::Addr {
                addr: u64::from_str_radix(hex, 16)
                    .map_err(|_| anyhow::anyhow!("'{t}' is not a hex address"))?,
            },
            None => SymQuery::Name { name: t },
        },
        _ => bail!("give a symbol name or 0xADDRESS, or --all"),
    };
    let r: SymResult = Client::connect(vm)?.call(Request::Sym { query })?;
    if json {
        return print_json(&r);
    }
    for p in &r.patch {
        println!(
            "{:016x} t {} [{}] ({} bytes, replaces {})",
            p.addr, p.name, p.patch, p.size, p.replaces
        );
    }
    if let Some(l) = &r.located {
        match &r.module {
            Some(m) => println!("{:#018x} {} [{m}]", l.symbol_addr + l.offset, l.display()),
            None => println!("{:#018x} {}", l.symbol_addr + l.offset, l.display()),
        }
        return Ok(0);
    }
    // The /proc/kallsyms format (symbols without a name are not shown there either).
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let many = r.symbols.len() > 1 && !all;
    for (i, s) in r.symbols.iter().filter(|s| !s.name.is_empty()).enumerate() {
        if many {
            writeln!(
                out,
                "{:016x} {} {} (sympos {})",
                s.addr,
                s.kind,
                s.name,
                i + 1
            )?;
        } else {
            writeln!(out, "{:016x} {} {}", s.addr, s.kind, s.name)?;
        }
    }
    for s in &r.module_symbols {
        writeln!(out, "{:016x} {} {}\t[{}]", s.addr, s.kind, s.name, s.module)?;
    }
    out.flush()?;
    Ok(0)
}

/// The guest's modules, one /proc/modules line each (`--json`: every field).
pub fn modules(vm: &str, json: bool) -> Result<i32> {
    let r: ModulesResult = Client::connect(vm)?.call(Request::Modules)?;
    if json {
        return print_json(&r);
    }
    for m in &r.modules {
        println!("{}", m.proc_line());
    }
    Ok(0)
}

/// The guest's shadow variables: one line per id, or per variable with `all`.
pub fn shadow(vm: &str, all: bool, json: bool) -> Result<i32> {
    let r: ShadowResult = Client::connect(vm)?.call(Request::Shadow)?;
    if json {
        return print_json(&r);
    }
    if r.table.is_none() {
        println!("no shadow variables (no patch loaded yet)");
        return Ok(0);
    }
    if all {
        println!("{:<18} {:>8} {:>8} OWNER", "OBJECT", "ID", "SIZE");
        for v in &r.vars {
            println!("{:#018x} {:>8} {:>8} {}", v.obj, v.id, v.size, v.owner);
        }
    } else {
        println!(
            "{:>8} {:>8} {:>10} {:>6} OWNERS",
            "ID", "COUNT", "BYTES", "STATE"
        );
        for g in &r.groups {
            let state = g.state.map_or("-".to_string(), |s| s.to_string());
            let owners = g.owners.join(", ");
            println!(
                "{:>8} {:>8} {:>10} {:>6} {owners}",
                g.id, g.count, g.bytes, state
            );
        }
    }
    println!("{} shadow variables", r.count);
    Ok(0)
}

pub fn tasks(vm: &str, json: bool) -> Result<i32> {
    let r: TasksResult = Client::connect(vm)?.call(Request::Tasks)?;
    if json {
        return print_json(&r);
    }
    println!(
        "{:>7} {:>7} S {:>4} {:<7} {:<7} COMM",
        "PID", "TGID", "CPU", "ON-CPU", "KIND"
    );
    for t in &r.list.tasks {
        let on = match (t.vcpu, t.on_cpu) {
            (Some(v), _) => format!("vcpu{v}"),
            (None, true) => "switch".into(),
            _ => String::new(),
        };
        let kind = if t.idle {
            "idle"
        } else if t.kthread {
            "kthread"
        } else {
            "user"
        };
        println!(
            "{:>7} {:>7} {} {:>4} {:<7} {:<7} {}",
            t.pid, t.tgid, t.state, t.cpu, on, kind, t.comm
        );
    }
    for v in &r.list.vcpus {
        let who = match (&v.pid, &v.comm) {
            (Some(p), Some(c)) => format!("pid {p} ({c})"),
            _ => "unknown task".into(),
        };
        let cpu = v.cpu.map(|c| format!("cpu {c}")).unwrap_or("cpu ?".into());
        let mode = if v.user_mode { "user" } else { "kernel" };
        println!("vcpu{}: {cpu}, {who}, {mode} mode at {:#x}", v.vcpu, v.rip);
    }
    println!("{} tasks {}", r.list.tasks.len(), pause_note(&r.pause));
    Ok(0)
}

fn print_trace(t: &StackTrace) {
    let from = match &t.start {
        TraceStart::Saved => "saved switch frame".to_string(),
        TraceStart::Vcpu(v) => format!("running on vcpu{v}, from its registers"),
        TraceStart::UserMode(v) => format!("running on vcpu{v} in user mode"),
        TraceStart::NoStack => "exited: its stack is freed, nothing on it".to_string(),
    };
    let verdict = match (&t.reliable, &t.problem) {
        (true, _) => "reliable".to_string(),
        (false, Some(p)) => format!("UNRELIABLE: {p}"),
        (false, None) => "UNRELIABLE".to_string(),
    };
    println!(
        "pid {} tgid {} ({}) state {}, {from}: {verdict}",
        t.pid, t.tgid, t.comm, t.state
    );
    if t.frames.is_empty() && t.reliable {
        println!("  (no kernel frames)");
    }
    for f in &t.frames {
        let mut notes = Vec::new();
        if f.interrupted {
            notes.push("interrupted");
        }
        if f.sched {
            notes.push("sched");
        }
        let notes = if notes.is_empty() {
            String::new()
        } else {
            format!("  [{}]", notes.join(", "))
        };
        println!(
            "  [<{:016x}>] {}{notes}",
            f.addr,
            f.symbol.as_deref().unwrap_or("?")
        );
    }
}

pub fn stack(vm: &str, pid: Option<i32>, json: bool) -> Result<i32> {
    let r: StackResult = Client::connect(vm)?.call(Request::Stack { pid })?;
    if json {
        return print_json(&r);
    }
    for t in &r.traces {
        print_trace(t);
    }
    if pid.is_none() {
        let reliable = r.traces.iter().filter(|t| t.reliable).count();
        println!(
            "{} tasks, {reliable} reliable {}",
            r.traces.len(),
            pause_note(&r.pause)
        );
    }
    Ok(0)
}

/// `name` or `name,N` (the N-th symbol of that name, as livepatch's sympos).
pub fn parse_sympos(target: &str) -> Result<(String, Option<u32>)> {
    match target.rsplit_once(',') {
        Some((name, pos)) => {
            let pos: u32 = pos
                .parse()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| anyhow::anyhow!("'{target}': sympos must be a number from 1"))?;
            Ok((name.to_string(), Some(pos)))
        }
        None => Ok((target.to_string(), None)),
    }
}

pub fn disasm(vm: &str, target: &str, json: bool) -> Result<i32> {
    let (symbol, sympos) = parse_sympos(target)?;
    let r: DisasmResult = Client::connect(vm)?.call(Request::Disasm { symbol, sympos })?;
    if json {
        return print_json(&r);
    }
    println!(
        "{} at {:#x}, {} bytes (live guest memory):",
        r.symbol, r.addr, r.size
    );
    if let Some(d) = &r.redirect {
        println!(
            "  redirected by lpvmm: the site at {:#x} jumps to {:#x}, {}",
            d.site, d.target, d.to
        );
        println!(
            "  versions in load order: original, {}",
            d.versions.join(", ")
        );
    }
    for l in &r.lines {
        println!(
            "  {:#018x} <{}>  {:<22} {}",
            l.addr, l.location, l.bytes, l.text
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sympos_syntax() {
        assert_eq!(parse_sympos("foo").unwrap(), ("foo".into(), None));
        assert_eq!(parse_sympos("foo,2").unwrap(), ("foo".into(), Some(2)));
        assert!(parse_sympos("foo,0").is_err());
        assert!(parse_sympos("foo,x").is_err());
    }
}
