//! `bench fork-under-dispatch`: whether a guest survives `spawn 2000` with a per-task
//! transition held (trampolines live, ticks running), and without one.

use std::time::Duration;

use lpvmm_tests::TestHost;

use crate::common::kp_build;

/// Does a guest survive `spawn 2000` while a per-task transition is held (trampolines
/// live, ticks running), and without one (pauses only)? `bench fork-under-dispatch`.
pub fn fork_under_dispatch() -> Result<(), String> {
    let kp = kp_build("nsleep-cmdline")?;
    let files = vec![(kp, "/root/nsleep-cmdline.kp".to_string())];
    let mut host = TestHost::start_with_files(false, &files)?;
    for held in [false, true] {
        let (mut g, _) = host.boot_guest(&format!("fork{}", u8::from(held)), "6.1", 2, "")?;
        let kp = g.host.file("/root/nsleep-cmdline.kp");
        let holder = g.spawn("sleep 1000 &")?;
        std::thread::sleep(Duration::from_millis(500));
        if held {
            let (rc, out) = g.lpvmm(&format!("patch {{vm}} {kp} --no-wait"))?;
            if rc != 0 {
                return Err(out);
            }
        }
        let r = g.run("spawn 2000 >/tmp/spawn.out & while ! grep -q spawned /tmp/spawn.out 2>/dev/null; do sleep 1; done; echo spawned-ok");
        let (_, st) = g.lpvmm("patch status {vm}")?;
        println!(
            "held={held}: {:?}\n{}",
            r.as_ref().map(|s| s.trim().to_string()),
            st.lines().take(12).collect::<Vec<_>>().join("\n")
        );
        if r.is_err() {
            println!("VMM stderr: {}", g.vmm_stderr());
            continue;
        }
        g.run(&format!("kill $(pidof spawn) {holder}; wait; true"))?;
        g.poweroff()?;
    }
    Ok(())
}
