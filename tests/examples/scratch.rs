use lpvmm_tests::TestHost;
fn main() {
    let mut h = TestHost::start_with(false).unwrap();
    let (mut g, _) = h.boot_guest("sc", "6.1", 1, "").unwrap();
    let st = g.text("grep -w _stext /proc/kallsyms").unwrap();
    let st = u64::from_str_radix(st.split_whitespace().next().unwrap(), 16).unwrap();
    for off in [0xe01a60u64, 0x9c3643, 0x9c365c, 0x606f9, 0x9c2967, 0x6c2255] {
        let r = st + off;
        let out = g.text(&format!("awk '$1 <= \"{r:016x}\" && ($2 == \"T\" || $2 == \"t\")' /proc/kallsyms | sort | tail -1")).unwrap();
        println!("{off:#x} ({r:#x}): {}", out.trim());
    }
}
