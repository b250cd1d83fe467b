use lpvmm_tests::{host_trial, run_group, TestHost, TestResult};
fn explore(h: &mut TestHost, series: &str) -> TestResult {
    let (mut g, _) = h.boot_guest("x", series, 1, "")?;
    let (_, out) = g.lpvmm("sym {vm} --all > /tmp/all.txt; for s in show_val_kb common_nsleep __x64_sys_newuname _copy_to_user init_uts_ns si_meminfo seq_printf hrtimer_nanosleep do_syscall_64 runqueues meminfo_proc_show cmdline_proc_show __x86_return_thunk memcpy; do grep -c \" $s\\$\" /tmp/all.txt | tr '\\n' ' '; echo $s; done; awk '$2==\"t\" {print $3}' /tmp/all.txt | sort | uniq -d | head -30 | tr '\\n' ' '")?;
    eprintln!("{series}:\n{out}");
    let (_, out) = g.lpvmm("disasm {vm} do_syscall_64 | head -5")?;
    eprintln!("{out}");
    g.poweroff().map(|_| ())
}
fn main() {
    run_group(vec![
        host_trial("x61", |h| explore(h, "6.1")),
        host_trial("x612", |h| explore(h, "6.12")),
    ])
}
