//! Live patches built from source diffs (`lpvmm kp build --diff`) of real upstream fixes
//! (tests/data/upstream-fixes/, with where each comes from), applied to a running guest
//! of each release. The guest kernels already have the fixes, so each fix is shown from
//! both sides: its revert, built in the release's own source, makes the running kernel
//! buggy (a reproducer in the guest prints FIXED, then BUGGY); the fix itself, built in a
//! copy of that source with the fix taken out (the kernel as it was before the fix),
//! applied on top, makes it fixed again (FIXED); each disable goes back a step.
//! And the refusals: a header, an assembly file, a struct whose layout changes.

use std::path::{Path, PathBuf};
use std::process::Command;

use lpvmm_tests::patchtest::{self, checksum, verb};
use lpvmm_tests::{check, lpvmm_binary, new_splats, repo_root, TestHost, TestResult, SPLATS};

/// One upstream fix: its directory in tests/data/upstream-fixes, what `kp build --diff`
/// must print of what it carries and why (each a part of one of its lines), and the
/// guest command whose last line says FIXED or BUGGY.
pub struct Fix {
    pub dir: &'static str,
    pub carries: &'static [&'static str],
    pub repro: &'static str,
}

/// `sched_rr_timeslice_ms` read back after a write of -1 (a reset to the default): the
/// default (100 ms with the Debian configs' HZ=250) when fixed, -1 when not. The value
/// before is put back.
const RR_TIMESLICE: &str = "f=/proc/sys/kernel/sched_rr_timeslice_ms; old=$(cat $f); \
    echo -1 > $f; v=$(cat $f); echo $old > $f; echo \"# read back $v\"; \
    if [ \"$v\" = -1 ]; then echo BUGGY; elif [ \"$v\" -gt 0 ]; then echo FIXED; \
    else echo ERROR; fi";

pub const FIXES: &[Fix] = &[
    Fix {
        dir: "tun-negative-ifindex",
        carries: &["drivers/net/tun.c (tun): __tun_chr_ioctl replaces __tun_chr_ioctl: the diff changes its source"],
        repro: "tunifindex",
    },
    Fix {
        dir: "fcntl-getown-dead-owner",
        // f_getown_ex() is inlined into do_fcntl() on both sides; f_getown() only where
        // it is the smaller one (without the fix).
        carries: &[
            "fs/fcntl.c (vmlinux): do_fcntl replaces do_fcntl: it inlines ",
            "f_getown_ex, whose source the diff changes",
            "fs/fcntl.c (vmlinux): f_getown replaces f_getown: the diff changes its source",
        ],
        repro: "getown",
    },
    Fix {
        dir: "sched-rr-timeslice-reset",
        carries: &["kernel/sched/rt.c (vmlinux, built in kernel/sched/build_policy.c): sched_rr_handler replaces sched_rr_handler: the diff changes its source"],
        repro: RR_TIMESLICE,
    },
];

/// The patch name of a fix's revert.
pub fn revert_name(fix: &Fix) -> String {
    format!("revert-{}", fix.dir)
}

/// The patch name of a fix built against the source without it.
pub fn fix_name(fix: &Fix) -> String {
    format!("fix-{}", fix.dir)
}

/// A unified diff with its sides swapped: what undoes it.
pub fn reversed(diff: &str) -> String {
    let mut out = String::new();
    for l in diff.lines() {
        let line = if let Some(rest) = l.strip_prefix("@@ -") {
            // "@@ -OLD +NEW @@ tail" -> "@@ -NEW +OLD @@ tail"
            let (ranges, tail) = rest.split_once(" @@").unwrap_or((rest, ""));
            let (old, new) = ranges.split_once(" +").unwrap_or((ranges, ""));
            format!("@@ -{new} +{old} @@{tail}")
        } else if l.starts_with("---") || l.starts_with("+++") {
            l.to_string()
        } else if let Some(rest) = l.strip_prefix('-') {
            format!("+{rest}")
        } else if let Some(rest) = l.strip_prefix('+') {
            format!("-{rest}")
        } else {
            l.to_string()
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// `lpvmm kp build --diff DIFF --kernel RELEASE -o OUT [ARGS]`: its exit code and output.
pub fn kp_build_diff(diff: &Path, out: &Path, release: &str, args: &[&str]) -> (i32, String) {
    super::exit_and_output(
        Command::new(lpvmm_binary())
            .args(["kp", "build", "--diff"])
            .arg(diff)
            .args(["--kernel", release, "-o"])
            .arg(out)
            .args(args),
    )
}

/// The fix's diff for `series`.
fn fix_diff(fix: &Fix, series: &str) -> Result<String, String> {
    let src = repo_root().join(format!(
        "tests/data/upstream-fixes/{}/{series}.patch",
        fix.dir
    ));
    std::fs::read_to_string(&src).map_err(|e| format!("{}: {e}", src.display()))
}

/// `kp build --diff` of `diff` (written to `out/FILE`) as patch `name`, in the release's
/// source or in `source`; it must say `carries`. The patch file and its host name.
fn build_one(
    series: &str,
    release: &str,
    out: &Path,
    (file, diff): (&str, &str),
    (name, source): (&str, Option<&Path>),
    carries: &[&str],
) -> Result<(PathBuf, String), String> {
    let diff_file = out.join(format!("{file}.patch"));
    std::fs::write(&diff_file, diff).map_err(|e| e.to_string())?;
    let kp_file = out.join(format!("diff-{name}.kp"));
    let mut args = vec!["--name", name];
    let source_arg;
    if let Some(dir) = source {
        source_arg = dir.to_string_lossy().into_owned();
        args.extend(["--source", &source_arg]);
    }
    let (rc, msg) = kp_build_diff(&diff_file, &kp_file, release, &args);
    check!(
        rc == 0,
        "kp build --diff {} --kernel {release}: {msg}",
        diff_file.display()
    );
    for line in carries {
        check!(
            msg.lines().any(|l| l.contains(line)),
            "kp build --diff {file} for {release} does not say \"{line}\":\n{msg}"
        );
    }
    Ok((kp_file, super::kp(series, &format!("diff-{name}"))))
}

/// Each fix's revert, built in the release's source, and each fix, built in a copy of
/// it with every fix taken out, for `series` into `out`: (file, host name) of each patch.
pub fn build(series: &str, release: &str, out: &Path) -> Result<Vec<(PathBuf, String)>, String> {
    let mut files = Vec::new();
    for fix in FIXES {
        let revert = reversed(&fix_diff(fix, series)?);
        let file = format!("{}.revert", fix.dir);
        files.push(build_one(
            series,
            release,
            out,
            (&file, &revert),
            (&revert_name(fix), None),
            fix.carries,
        )?);
    }
    // The kernel as it was before the fixes: a copy of the prepared tree (its objtool and
    // generated headers with it), each fixed file put back as it was.
    let before = out.join("source-before-fixes");
    let _ = std::fs::remove_dir_all(&before);
    let st = Command::new("cp")
        .arg("-a")
        .arg(tree(release))
        .arg(&before)
        .status();
    check!(
        st.is_ok_and(|s| s.success()),
        "copying {} to {}",
        tree(release).display(),
        before.display()
    );
    for fix in FIXES {
        take_out(&before, &fix_diff(fix, series)?)?;
    }
    for fix in FIXES {
        let file = format!("{}.fix", fix.dir);
        let fixed = fix_diff(fix, series)?;
        files.push(build_one(
            series,
            release,
            out,
            (&file, &fixed),
            (&fix_name(fix), Some(&before)),
            fix.carries,
        )?);
    }
    let _ = std::fs::remove_dir_all(&before);
    Ok(files)
}

/// Undo `diff` in the tree at `root`: each hunk's new lines replaced by its old ones,
/// found exactly once.
fn take_out(root: &Path, diff: &str) -> Result<(), String> {
    let path = diff
        .lines()
        .find_map(|l| l.strip_prefix("+++ b/"))
        .ok_or("no +++ line in the diff")?;
    let file = root.join(path);
    let mut text =
        std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    for hunk in diff.split("\n@@").skip(1) {
        let (mut old, mut new) = (String::new(), String::new());
        for l in hunk.lines().skip(1) {
            let (side, rest) = l.split_at(l.len().min(1));
            match side {
                "-" => old.push_str(&format!("{rest}\n")),
                "+" => new.push_str(&format!("{rest}\n")),
                _ => {
                    old.push_str(&format!("{rest}\n"));
                    new.push_str(&format!("{rest}\n"));
                }
            }
        }
        check!(
            text.matches(&new).count() == 1,
            "{path}: a hunk of the fix is not in the release's source once"
        );
        text = text.replacen(&new, &old, 1);
    }
    std::fs::write(&file, text).map_err(|e| e.to_string())
}

/// The FIXED/BUGGY verdict of a reproducer (its last line), with its whole output.
fn verdict(g: &mut lpvmm_tests::Guest, fix: &Fix) -> Result<(String, String), String> {
    let out = g.text(&format!("{{ {}; }} 2>&1 || true", fix.repro))?;
    let last = out.lines().last().unwrap_or("").trim().to_string();
    Ok((last, out))
}

/// `lpvmm patch` of a fix's patch, then the reproducer, which must say `want`.
fn step(
    g: &mut lpvmm_tests::Guest,
    series: &str,
    fix: &Fix,
    what: (&str, &str),
    want: &str,
) -> TestResult {
    let (verb_, name) = what;
    match verb_ {
        "apply" => {
            patchtest::apply(g, &super::stem(series, &format!("diff-{name}")))?;
        }
        v => {
            verb(g, v, name)?;
        }
    }
    let (v, out) = verdict(g, fix)?;
    check!(
        v == want,
        "{series} {}: after {verb_} {name}: want {want}: {out}",
        fix.dir
    );
    Ok(())
}

/// Each fix: FIXED; its revert applied: BUGGY; the fix, built against the source without
/// it, applied on top: FIXED; each disabled in turn: BUGGY, FIXED. The kernel's text as
/// it was once all are unloaded, and no warning in the guest's log.
pub fn fixes_reverted_and_restored(host: &mut TestHost, series: &str) -> TestResult {
    let name = format!("kbdiff-{}", series.replace('.', "_"));
    let (mut g, _) = host.boot_guest(&name, series, 2, "")?;
    let boot_splats = g.run(SPLATS)?;
    let text = checksum(&mut g, "text")?;
    for fix in FIXES {
        let (v, out) = verdict(&mut g, fix)?;
        check!(
            v == "FIXED",
            "{series} {}: before any patch: {out}",
            fix.dir
        );
        let (revert, fixed) = (revert_name(fix), fix_name(fix));
        step(&mut g, series, fix, ("apply", &revert), "BUGGY")?;
        step(&mut g, series, fix, ("apply", &fixed), "FIXED")?;
        step(&mut g, series, fix, ("disable", &fixed), "BUGGY")?;
        step(&mut g, series, fix, ("disable", &revert), "FIXED")?;
        eprintln!(
            "{series}: {}: FIXED; revert: BUGGY; fix: FIXED; disabled in turn: BUGGY, FIXED",
            fix.dir
        );
        verb(&mut g, "unload", &fixed)?;
        verb(&mut g, "unload", &revert)?;
    }
    check!(
        checksum(&mut g, "text")? == text,
        "{series}: the kernel's text differs after every patch was unloaded"
    );
    let new = new_splats(&mut g, &boot_splats)?;
    check!(
        new.is_empty(),
        "{series}: the guest's log has new warnings: {new:?}"
    );
    g.poweroff().map(|_| ())
}

/// The source tree of `release` that the builds above prepared (Debian's linux-source).
fn tree(release: &str) -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
        });
    cache.join(format!("lpvmm/source/{release}/tree"))
}

/// A diff that adds a member at the top of `struct NAME {` in `file` of the tree.
fn struct_member_diff(root: &Path, file: &str, name: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(root.join(file)).map_err(|e| format!("{file}: {e}"))?;
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| *l == format!("struct {name} {{"))
        .ok_or_else(|| format!("no `struct {name} {{` in {file}"))?;
    Ok(format!(
        "--- a/{file}\n+++ b/{file}\n@@ -{n},2 +{n},3 @@\n {}\n+\tint lpvmm_added;\n {}\n",
        lines[at],
        lines[at + 1],
        n = at + 1
    ))
}

/// What a diff build refuses, each named, and nothing written: a header, an assembly
/// file, a struct whose layout changes (`struct eventfd_ctx`, defined in fs/eventfd.c),
/// a change that leaves every function's code alike, a diff that does not apply.
pub fn refusals(release: &str) -> TestResult {
    let tmp = std::env::temp_dir().join(format!("lpvmm-diff-refusals-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let out = tmp.join("x.kp");
    let layout = struct_member_diff(&tree(release), "fs/eventfd.c", "eventfd_ctx")?;
    let comment = "--- a/fs/fcntl.c\n+++ b/fs/fcntl.c\n@@ -1,2 +1,3 @@\n+/* lpvmm: a comment changes no code */\n // SPDX-License-Identifier: GPL-2.0\n /*\n";
    let cases: [(&str, String, &str); 5] = [
        (
            "header",
            "--- a/include/linux/fcntl.h\n+++ b/include/linux/fcntl.h\n@@ -1,1 +1,2 @@\n /* SPDX-License-Identifier: GPL-2.0 */\n+/* x */\n".into(),
            "refused: include/linux/fcntl.h: a header",
        ),
        (
            "assembly",
            "--- a/arch/x86/lib/memmove_64.S\n+++ b/arch/x86/lib/memmove_64.S\n@@ -1,1 +1,2 @@\n /* SPDX-License-Identifier: GPL-2.0-only */\n+/* x */\n".into(),
            "refused: arch/x86/lib/memmove_64.S: assembly",
        ),
        (
            "layout",
            layout,
            "fs/eventfd.c: the change lays out struct eventfd_ctx differently (member kref at 0 → 4)",
        ),
        ("alike", comment.into(), "the change leaves every function's code as it is"),
        (
            "stale",
            "--- a/fs/fcntl.c\n+++ b/fs/fcntl.c\n@@ -10,2 +10,2 @@\n-no such line in fcntl.c\n+x\n another\n".into(),
            "fs/fcntl.c: the hunk at line 10 does not apply",
        ),
    ];
    for (what, diff, want) in cases {
        let file = tmp.join(format!("{what}.patch"));
        std::fs::write(&file, diff).map_err(|e| e.to_string())?;
        let (rc, msg) = kp_build_diff(&file, &out, release, &[]);
        check!(
            rc != 0 && msg.contains(want),
            "{release}: the {what} diff: want \"{want}\", got: {msg}"
        );
        check!(
            !out.exists(),
            "{release}: the refused {what} diff left {}",
            out.display()
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
