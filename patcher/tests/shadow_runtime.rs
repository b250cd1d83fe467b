//! The shadow-variable runtime (include/lpvmm/shadow.h) as a unit: compiled for the host
//! by the system's gcc, with libc standing in for the kernel's allocator
//! (patcher/tests/shadow_hosted.c), and run: the klp_shadow semantics, and eight
//! threads allocating, finding and freeing at once without losing or doubling a
//! variable. The same calls run in a guest in the kbuild suite (shadowvars.c).

use std::path::Path;
use std::process::Command;

#[test]
fn shadow_runtime_semantics_and_concurrency_on_the_host() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("lpvmm-shadow-hosted-{}", std::process::id()));
    let cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "gcc".into()))
        .args(["-std=gnu11", "-O2", "-Wall", "-Werror", "-pthread", "-I"])
        .arg(dir.join("include"))
        .arg("-o")
        .arg(&out)
        .arg(dir.join("tests/shadow_hosted.c"))
        .output()
        .expect("gcc (lpvmm kp build needs it too)");
    assert!(
        cc.status.success(),
        "compiling the runtime for the host: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let run = Command::new(&out).output().expect("run the hosted runtime");
    let _ = std::fs::remove_file(&out);
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && text.contains("all ok"),
        "{text}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    eprintln!("{text}");
}
