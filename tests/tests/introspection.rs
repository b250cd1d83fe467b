//! Introspection of a running guest, checked against the guest's own view.
//!
//! One test host serves every test here, one test at a time.

use lpvmm::proto::DisasmResult;
use lpvmm_tests::patchtest::parse;
use lpvmm_tests::{check, host_trial, json, run_group, series_trials, views, TestHost, TestResult};

/// Where x86-64 kernels link `_text` before KASLR moves them.
const LINK_TEXT: u64 = 0xffff_ffff_8100_0000;

/// VMCOREINFO found in guest memory agrees with the guest: its release is `uname -r`,
/// its KASLR offset moves `_text` to where /proc/kallsyms has it, and its symbol
/// addresses are the ones in /proc/kallsyms.
fn vmcoreinfo_matches_guest(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("vmci-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 1, "")?;
    // The wire contract: raw JSON on purpose. `vmcoreinfo --json` as its words are.
    let (rc, out) = g.lpvmm("vmcoreinfo {vm} --json")?;
    check!(rc == 0, "vmcoreinfo failed: {out}");
    let v = json(&out)?;
    let info = &v["info"];

    let release = g.run("uname -r")?;
    check!(
        info["osrelease"].as_str() == Some(release.trim()),
        "OSRELEASE {} != uname -r {release:?}",
        info["osrelease"]
    );

    // Every SYMBOL() entry that /proc/kallsyms also lists must have the same address.
    // swapper_pg_dir is a #define for init_top_pgt, which is the name kallsyms shows.
    let symbols = info["symbols"].as_object().ok_or("no symbols")?;
    let kallsyms_name = |n: &str| {
        if n == "swapper_pg_dir" {
            "init_top_pgt".to_string()
        } else {
            n.to_string()
        }
    };
    let mut names: Vec<String> = symbols.keys().map(|n| kallsyms_name(n)).collect();
    names.push("_text".into());
    let pattern = names.join("|");
    let kallsyms = g.run(&format!("grep -E ' ({pattern})$' /proc/kallsyms"))?;
    let mut matched = 0;
    for line in kallsyms.lines() {
        let mut f = line.split_whitespace();
        let (Some(addr), Some(_), Some(sym)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let addr = u64::from_str_radix(addr, 16).map_err(|e| format!("{line}: {e}"))?;
        check!(
            addr != 0,
            "kallsyms shows zero addresses (kptr_restrict?): {line}"
        );
        if sym == "_text" {
            let offset = info["kernel_offset"].as_u64().unwrap_or(u64::MAX);
            check!(
                LINK_TEXT.wrapping_add(offset) == addr,
                "KERNELOFFSET {offset:#x} puts _text at {:#x}, guest has {addr:#x}",
                LINK_TEXT.wrapping_add(offset)
            );
            continue;
        }
        if sym == "mem_section" {
            // SPARSEMEM_EXTREME: VMCOREINFO carries the pointer's value, not its address.
            continue;
        }
        let ours = symbols
            .iter()
            .find(|(n, _)| kallsyms_name(n) == sym)
            .and_then(|(_, v)| v.as_u64());
        check!(
            ours == Some(addr),
            "SYMBOL({sym}) {ours:x?} != guest {addr:#x}"
        );
        matched += 1;
    }
    eprintln!(
        "{series}: {matched} of {} VMCOREINFO symbols checked against /proc/kallsyms",
        symbols.len()
    );
    check!(
        matched >= 5,
        "only {matched} VMCOREINFO symbols found in /proc/kallsyms:\n{kallsyms}"
    );
    let (_, status) = g.lpvmm("status {vm} --json")?;
    check!(
        status.contains("\"state\": \"running\""),
        "VM left paused: {status}"
    );
    g.poweroff()?;
    Ok(())
}

/// Acceptance 1: lpvmm's symbol table equals the guest's /proc/kallsyms, every entry,
/// the modules' included (the guest loads real modules of its own kernel package at
/// boot); `lpvmm modules` equals /proc/modules; a module symbol resolves by
/// `module:name` to the guest's address.
fn symbols_equal_proc_kallsyms(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("ksyms-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let (rc, out) = g.lpvmm("kernel {vm}")?;
    check!(rc == 0, "lpvmm kernel failed: {out}");
    eprintln!("{series}: {}", out.trim());

    let modules = modules_equal_proc_modules(&mut g, series)?;
    let n = views::kallsyms_equal(&mut g, series)?;
    eprintln!("{series}: all {n} entries equal, {modules} modules");
    g.poweroff().map(|_| ())
}

/// `lpvmm modules` equals the guest's /proc/modules line for line (with at least the
/// modules the guest image loads), and `sym tun:tun_get_socket` gives the address
/// /proc/kallsyms has for it. Returns how many modules are loaded.
fn modules_equal_proc_modules(g: &mut lpvmm_tests::Guest, series: &str) -> Result<usize, String> {
    let n = views::modules_equal(g, series)?;
    let tun_lines = g.run("grep -c -F '[tun]' /proc/kallsyms || true")?;
    check!(
        n >= 5 && tun_lines.trim().parse::<u32>().unwrap_or(0) > 10,
        "{series}: too few modules loaded ({n}), or no tun lines in /proc/kallsyms: {tun_lines}"
    );
    let line = g.run("grep -E ' tun_get_socket.\\[tun\\]' /proc/kallsyms")?;
    let addr = line.split_whitespace().next().ok_or("no tun_get_socket")?;
    let (rc, out) = g.lpvmm("sym {vm} tun:tun_get_socket")?;
    check!(
        rc == 0 && out.contains(addr) && out.contains("[tun]"),
        "{series}: sym tun:tun_get_socket: {out} (guest: {line})"
    );
    // Names as a patch spells them: in the module, with a position counted in it.
    let (rc, out) = g.lpvmm("sym {vm} tun:tun_get_socket,1")?;
    check!(
        rc == 0 && out.contains(addr),
        "{series}: sym tun:tun_get_socket,1: {out}"
    );
    let (rc, out) = g.lpvmm("sym {vm} tun:tun_get_socket,2")?;
    check!(
        rc != 0 && out.contains("no kernel symbol named 'tun:tun_get_socket,2'"),
        "{series}: sym tun:tun_get_socket,2 (tun has one): {out}"
    );
    let (rc, out) = g.lpvmm(&format!("sym {{vm}} 0x{addr}"))?;
    check!(
        rc == 0 && out.contains("tun_get_socket+0x0/") && out.contains("[tun]"),
        "{series}: sym by a module address: {out}"
    );
    eprintln!(
        "{series}: {n} modules, lpvmm modules equals /proc/modules; lpvmm sym 0x{addr}: {}",
        out.trim()
    );
    Ok(n)
}

/// Acceptance 2: `lpvmm tasks` equals the guest's view, and both vCPUs' current tasks
/// are identified.
fn tasks_equal_guest_view(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("tasks-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    // Some threads and a busy process, so that there is more than init and kthreads.
    g.run("(sleep 600 & sleep 600 & while :; do :; done) >/dev/null 2>&1 &")?;
    let summary = views::tasks_equal(&mut g, series, 2)?;
    eprintln!("{series}: {summary}");
    g.poweroff().map(|_| ())
}

fn stack_of(g: &mut lpvmm_tests::Guest, pid: i64) -> Result<serde_json::Value, String> {
    let (rc, out) = g.lpvmm(&format!("stack {{vm}} {pid} --json"))?;
    check!(rc == 0, "lpvmm stack {pid} failed: {out}");
    let v = json(&out)?;
    Ok(v["traces"][0].clone())
}

fn symbols_of(trace: &serde_json::Value, skip_sched: bool) -> Vec<String> {
    trace["frames"]
        .as_array()
        .map(|fs| {
            fs.iter()
                .filter(|f| !(skip_sched && f["sched"].as_bool() == Some(true)))
                .map(|f| f["symbol"].as_str().unwrap_or("?").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Acceptance 3: blocked tasks unwind exactly as /proc/PID/stack shows them, reliably;
/// busy tasks in user mode and in the kernel are reported as such.
fn stacks_match_proc_pid_stack(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("stack-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let pipe_reader = g.spawn("sleep 1000 | cat >/dev/null &")?;
    let sleeper = g.spawn("sleep 1000 &")?;
    let waiter = g.spawn("(sleep 1000; true) &")?;
    let user_busy = g.spawn("(while :; do :; done) &")?;
    let kernel_busy =
        g.spawn("dd if=/dev/zero of=/dev/null bs=4M count=100000000 2>/dev/null &")?;
    // Asleep in the tun module's read: a stack through module code.
    let tun_reader = g.spawn("tunblock >/dev/null &")?;
    std::thread::sleep(std::time::Duration::from_secs(2));

    for (what, pid, expect) in [
        ("pipe reader", pipe_reader, "pipe_read"),
        ("nanosleep", sleeper, "nanosleep"),
        ("wait", waiter, "wait"),
        ("tun module reader", tun_reader, "tun_do_read"),
    ] {
        let proc_stack = g.run(&format!("cat /proc/{pid}/stack"))?;
        let theirs: Vec<String> = proc_stack
            .lines()
            .filter_map(|l| l.trim().strip_prefix("[<0>] ").map(str::to_string))
            .collect();
        let trace = stack_of(&mut g, pid)?;
        let ours = symbols_of(&trace, true);
        check!(
            trace["reliable"].as_bool() == Some(true),
            "{series} {what} (pid {pid}): trace not reliable: {trace}"
        );
        check!(
            ours == theirs,
            "{series} {what} (pid {pid}): lpvmm {ours:?}\n/proc/{pid}/stack {theirs:?}"
        );
        check!(
            ours.iter().any(|s| s.contains(expect)),
            "{series} {what}: no {expect} frame in {ours:?}"
        );
        eprintln!(
            "{series} {what}: {} frames equal /proc/{pid}/stack: {}",
            ours.len(),
            ours.join(" < ")
        );
    }

    // Busy tasks: sample until each is caught in the act.
    let (mut user_seen, mut kernel_seen) = (false, false);
    for _ in 0..30 {
        if !user_seen {
            let t = stack_of(&mut g, user_busy)?;
            check!(t["state"] == "R", "{series} user loop not running: {t}");
            user_seen = t["start"].get("user_mode").is_some();
            if user_seen {
                check!(
                    t["reliable"].as_bool() == Some(true),
                    "{series} user loop in user mode: {t}"
                );
            } else if t["reliable"].as_bool() != Some(true) {
                // Caught in the kernel (a timer interrupt, say) at an instruction the
                // kernel marks as having no unwind information (a retpoline thunk),
                // where its own unwinder stops too: the trace must say why.
                check!(
                    t["problem"].as_str().is_some_and(|p| !p.is_empty()),
                    "{series} user loop: unreliable without a reason: {t}"
                );
                eprintln!("{series} user loop caught in the kernel: {}", t["problem"]);
            }
        }
        if !kernel_seen {
            let t = stack_of(&mut g, kernel_busy)?;
            let frames = symbols_of(&t, false);
            if t["start"].get("vcpu").is_some() && t["reliable"].as_bool() == Some(true) {
                // Every reliable trace of dd caught in the kernel runs down to its
                // system call's entry, whatever it was doing (a timer interrupt
                // on its way out of a system call, say).
                check!(
                    frames.iter().any(|f| f.starts_with("do_syscall_64"))
                        && frames
                            .last()
                            .is_some_and(|f| f.starts_with("entry_SYSCALL_64")),
                    "{series} dd in the kernel: unexpected frames {frames:?}"
                );
                // dd spends its kernel time in read(2) from /dev/zero and in write(2)
                // to /dev/null; sample until one of them is the one caught.
                let syscall_path = ["ksys_read", "vfs_read", "ksys_write", "vfs_write"];
                if !frames
                    .iter()
                    .any(|f| syscall_path.iter().any(|s| f.starts_with(s)))
                {
                    eprintln!(
                        "{series} dd caught in the kernel outside read and write: {}",
                        frames.join(" < ")
                    );
                    continue;
                }
                eprintln!(
                    "{series} dd on a vCPU in the kernel: {}",
                    frames.join(" < ")
                );
                kernel_seen = true;
            }
        }
        if user_seen && kernel_seen {
            break;
        }
    }
    check!(
        user_seen,
        "{series}: never saw the busy loop running in user mode"
    );
    check!(
        kernel_seen,
        "{series}: never saw dd in read or write on a vCPU with a reliable trace"
    );

    // Every task at once: the unwinder copes with whatever the guest is doing.
    let (rc, all) = g.lpvmm("stack {vm}")?;
    check!(rc == 0, "lpvmm stack (all) failed: {all}");
    eprintln!("{series}: {}", all.lines().last().unwrap_or(""));
    g.run(&format!(
        "kill {user_busy} {kernel_busy} {pipe_reader} {sleeper} {waiter} {tun_reader} 2>/dev/null; true"
    ))?;
    g.poweroff().map(|_| ())
}

/// `sym` by name and address and `disasm` agree with the guest, for a kernel function
/// and a module's; a module's text checksums the same twice.
fn sym_and_disasm_agree_with_guest(host: &mut TestHost) -> TestResult {
    let (mut g, _) = host.boot_guest("disasm", "6.12", 1, "")?;
    let line = g.run("grep ' cmdline_proc_show$' /proc/kallsyms")?;
    let addr = line
        .split_whitespace()
        .next()
        .ok_or("no cmdline_proc_show")?;
    let (rc, out) = g.lpvmm("sym {vm} cmdline_proc_show")?;
    check!(
        rc == 0 && out.contains(addr),
        "sym by name: {out} (guest: {line})"
    );
    let (rc, out) = g.lpvmm(&format!("sym {{vm}} 0x{addr}"))?;
    check!(
        rc == 0 && out.contains("cmdline_proc_show+0x0/"),
        "sym by address: {out}"
    );
    let (rc, out) = g.lpvmm("disasm {vm} cmdline_proc_show --json")?;
    check!(rc == 0, "disasm: {out}");
    let v: DisasmResult = parse(&out)?;
    let nop_at = |i: usize| v.lines.get(i).is_some_and(|l| l.bytes == "0f1f440000");
    // ftrace's 5-byte NOP at the entry (after endbr64 on IBT kernels).
    check!(
        nop_at(0) || nop_at(1),
        "no fentry NOP at the start of cmdline_proc_show: {:?}",
        v.lines
    );
    // A module's function, from the module's own symbols, read live.
    let line = g.run("grep -E ' tun_get_socket.\\[tun\\]' /proc/kallsyms")?;
    let tun_addr = line.split_whitespace().next().ok_or("no tun_get_socket")?;
    let (rc, out) = g.lpvmm("disasm {vm} tun:tun_get_socket --json")?;
    check!(rc == 0, "disasm tun:tun_get_socket: {out}");
    let v: DisasmResult = parse(&out)?;
    let nop_at = |i: usize| v.lines.get(i).is_some_and(|l| l.bytes == "0f1f440000");
    check!(
        format!("{:016x}", v.addr) == tun_addr && (nop_at(0) || nop_at(1)),
        "disasm tun:tun_get_socket at {:#x} (guest: {line}): {:?}",
        v.addr,
        v.lines
    );
    let (rc, out) = g.lpvmm("checksum {vm} module:tun")?;
    let (rc2, out2) = g.lpvmm("checksum {vm} module:tun")?;
    check!(
        rc == 0 && rc2 == 0 && out == out2 && out.len() > 64,
        "checksum module:tun: {out} / {out2}"
    );
    let (rc, out) = g.lpvmm("sym {vm} no_such_symbol_anywhere")?;
    check!(
        rc != 0 && out.contains("no kernel symbol named"),
        "unknown symbol: {out}"
    );
    g.poweroff().map(|_| ())
}

fn main() {
    let mut tests = series_trials(&[
        ("vmcoreinfo_matches_guest", vmcoreinfo_matches_guest),
        ("symbols_equal_proc_kallsyms", symbols_equal_proc_kallsyms),
        ("tasks_equal_guest_view", tasks_equal_guest_view),
        ("stacks_match_proc_pid_stack", stacks_match_proc_pid_stack),
    ]);
    tests.push(host_trial(
        "sym_and_disasm_agree_with_guest",
        sym_and_disasm_agree_with_guest,
    ));
    run_group(tests)
}
