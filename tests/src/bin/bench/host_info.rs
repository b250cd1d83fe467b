//! `bench host-info`: the test host's kernel, CPUs and clock source, for the "machine"
//! line of a figure.

use lpvmm_tests::TestHost;

/// What the test host is, for the "machine" of a figure: its kernel, CPUs, clock source.
pub fn host_info() -> Result<(), String> {
    let mut host = TestHost::start()?;
    let out = host.exec(
        "uname -r; nproc; grep -m1 'model name' /proc/cpuinfo; \
         cat /sys/devices/system/clocksource/clocksource0/current_clocksource \
             /sys/devices/system/clocksource/clocksource0/available_clocksource",
    )?;
    println!("{out}");
    Ok(())
}
