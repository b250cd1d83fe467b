//! `bench diff-build`: what `lpvmm kp build --diff` costs on this machine, for a
//! one-function change (fs/proc/cmdline.c's `cmdline_proc_show`): preparing a release
//! the first time (headers and source downloaded into an empty cache, unpacked, `make
//! prepare`), then the build with the release prepared, against its peer: kbuild
//! compiling the same file twice (before and after), which a diff build cannot avoid.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use lpvmm_tests::{images_dir, lpvmm_binary};

/// The one-function change: a word more in /proc/cmdline.
const DIFF: &str = "--- a/fs/proc/cmdline.c\n+++ b/fs/proc/cmdline.c\n@@ -9,3 +9,3 @@\n \tseq_puts(m, saved_command_line);\n-\tseq_putc(m, '\\n');\n+\tseq_puts(m, \" lpvmm-diff\\n\");\n \treturn 0;\n";

fn release(series: &str) -> Result<String, String> {
    let p = images_dir().join(format!("guest-{series}/release"));
    Ok(std::fs::read_to_string(&p)
        .map_err(|e| format!("{}: {e} (build the images first)", p.display()))?
        .trim()
        .to_string())
}

/// One `kp build --diff`, timed; `cache` replaces `$XDG_CACHE_HOME` when given.
fn build(diff: &Path, out: &Path, release: &str, cache: Option<&Path>) -> Result<f64, String> {
    let mut cmd = Command::new(lpvmm_binary());
    cmd.args(["kp", "build", "--diff"])
        .arg(diff)
        .args(["--kernel", release, "-o"])
        .arg(out);
    if let Some(c) = cache {
        cmd.env("XDG_CACHE_HOME", c);
    }
    let t = Instant::now();
    let o = cmd.output().map_err(|e| e.to_string())?;
    let s = t.elapsed().as_secs_f64();
    if !o.status.success() {
        return Err(format!(
            "kp build --diff: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(s)
}

/// kbuild compiling fs/proc/cmdline.o once in the prepared tree, as the diff build does.
fn compile(tree: &Path, release: &str) -> Result<f64, String> {
    let _ = std::fs::remove_file(tree.join("fs/proc/cmdline.o"));
    let cc = std::fs::read_to_string(tree.join(".config"))
        .map_err(|e| e.to_string())?
        .lines()
        .find_map(|l| l.strip_prefix("CONFIG_CC_VERSION_TEXT=\""))
        .and_then(|v| v.split(' ').next())
        .unwrap_or("gcc")
        .to_string();
    let t = Instant::now();
    let st = Command::new("make")
        .args(["-s", "-C"])
        .arg(tree)
        .arg(format!("CC={cc}"))
        .arg("RUSTC=lpvmm-no-rustc")
        .arg(format!("KERNELRELEASE={release}"))
        .arg("KCFLAGS=-ffunction-sections -fdata-sections")
        .arg("fs/proc/cmdline.o")
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err("make fs/proc/cmdline.o failed".into());
    }
    Ok(t.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn diff_build(runs: u32, series: &str) -> Result<(), String> {
    let rel = release(series)?;
    let tmp = std::env::temp_dir().join(format!("lpvmm-bench-diff-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let diff = tmp.join("cmdline.patch");
    std::fs::write(&diff, DIFF).map_err(|e| e.to_string())?;
    let out = tmp.join("out.kp");
    // Cold: an empty cache, so the headers and the source are fetched and prepared.
    let cold_cache = tmp.join("cache");
    let cold = build(&diff, &out, &rel, Some(&cold_cache))?;
    let tree: PathBuf = cold_cache.join(format!("lpvmm/source/{rel}/tree"));
    let mut warm = Vec::new();
    let mut peer = Vec::new();
    for _ in 0..runs.max(1) {
        warm.push(build(&diff, &out, &rel, Some(&cold_cache))?);
        peer.push(compile(&tree, &rel)?);
    }
    let (w, p) = (median(warm), median(peer));
    println!("release {rel}, {runs} runs, medians:");
    println!("  first build, release not prepared (fetch, unpack, prepare, build): {cold:.1} s");
    println!("  of which preparing the release, about: {:.1} s", cold - w);
    println!("  diff build of a one-function change, release prepared: {w:.2} s");
    println!(
        "  peer, kbuild compiling the file once: {p:.2} s; diff build / (2 x compile) = {:.2}",
        w / (2.0 * p)
    );
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
