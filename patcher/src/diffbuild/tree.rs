//! The guest kernel's own source, prepared to build single objects exactly as the
//! release built them: Debian's `linux-source-X.Y` at the release's version (checked
//! against the image's `Built-Using`), the release's `.config` from its headers
//! package (`make olddefconfig` must change nothing), the compiler the release names in
//! `CONFIG_CC_VERSION_TEXT` (its `--version` must print exactly that), `make prepare`.
//! Prepared once per release under `~/.cache/lpvmm/source/RELEASE/tree`; a tree given
//! with `--source DIR` is prepared the same way, in place.
//!
//! One object is built at a time per tree (a lock file): the "after" source is written
//! over the file for its build and the original put back, so that kbuild builds it with
//! the same name, module and flags as the release did.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::DiffBuildError;
use crate::build::JUMP_LABEL_H;
use crate::kbuild::{kernel_tree, run};

/// A prepared tree and how to build in it.
#[derive(Debug, Clone)]
pub struct Tree {
    pub root: PathBuf,
    pub release: String,
    /// The compiler the release was built with (`gcc-12`).
    pub cc: String,
    /// The objtool arguments kbuild gives a module object of this release (without the
    /// object), for the patch object lpvmm writes.
    pub objtool_args: Vec<String>,
}

/// What kbuild built for one source file.
#[derive(Debug, Clone)]
pub struct Built {
    pub bytes: Vec<u8>,
    /// `Some(name)` when the file is part of a module (`-DMODULE`), as `/proc/modules`
    /// spells it.
    pub module: Option<String>,
    /// The file built instead, which includes this one (`kernel/sched/build_policy.c`).
    pub through: Option<String>,
}

const MARKER: &str = ".lpvmm-prepared";
const OBJTOOL_ARGS: &str = ".lpvmm-objtool-args";

fn io(what: &Path) -> impl Fn(std::io::Error) -> DiffBuildError + '_ {
    move |e| DiffBuildError::Source(format!("{}: {e}", what.display()))
}

/// The tree of `release` (from `source`, or Debian's source package), prepared.
pub fn prepare(release: &str, source: Option<&Path>) -> Result<Tree, DiffBuildError> {
    let headers = kernel_tree(release)?;
    let config = std::fs::read_to_string(headers.join(".config")).map_err(io(&headers))?;
    let cc = compiler(&config)?;
    let root = match source {
        Some(dir) => dir.to_path_buf(),
        None => crate::source::whole_tree(release)?,
    };
    let _lock = lock(&root)?;
    recover(&root)?;
    let marker = root.join(MARKER);
    let want = format!("{release}\n{cc}\n");
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(want.as_str()) {
        configure(&root, release, &cc, &config)?;
        let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
        make(&root, release, &cc, &[&format!("-j{jobs}"), "prepare"])?;
        let args = probe_objtool_args(&root, release, &cc)?;
        std::fs::write(root.join(OBJTOOL_ARGS), args.join("\n")).map_err(io(&root))?;
        std::fs::write(&marker, &want).map_err(io(&root))?;
    }
    let args = std::fs::read_to_string(root.join(OBJTOOL_ARGS)).map_err(io(&root))?;
    Ok(Tree {
        root,
        release: release.to_string(),
        cc,
        objtool_args: args.lines().map(str::to_string).collect(),
    })
}

/// The compiler of `CONFIG_CC_VERSION_TEXT`, checked to be the one on this machine.
fn compiler(config: &str) -> Result<String, DiffBuildError> {
    let text = config
        .lines()
        .find_map(|l| l.strip_prefix("CONFIG_CC_VERSION_TEXT="))
        .map(|v| v.trim_matches('"').to_string())
        .ok_or_else(|| DiffBuildError::Source("the release's .config names no compiler".into()))?;
    let cc = text.split(' ').next().unwrap_or_default().to_string();
    let out = Command::new(&cc).arg("--version").output().map_err(|e| {
        let package = cc.rfind("gcc").map_or("gcc", |i| &cc[i..]);
        DiffBuildError::Toolchain(format!(
            "the release was built with '{text}'; this machine cannot run {cc}: {e} \
             (apt-get install {package})"
        ))
    })?;
    let here = String::from_utf8_lossy(&out.stdout);
    let here = here.lines().next().unwrap_or("").trim();
    if here != text {
        return Err(DiffBuildError::Toolchain(format!(
            "the release was built with '{text}', this machine's {cc} is '{here}': a diff \
             build needs the same compiler (its code must equal the running kernel's)"
        )));
    }
    Ok(cc)
}

/// The make variables of every run in the tree.
fn vars(release: &str, cc: &str) -> Vec<String> {
    vec![
        format!("CC={cc}"),
        // Kconfig asks rustc for its version; the release was configured without one.
        "RUSTC=lpvmm-no-rustc".into(),
        format!("KERNELRELEASE={release}"),
    ]
}

fn make(root: &Path, release: &str, cc: &str, args: &[&str]) -> Result<String, DiffBuildError> {
    Ok(run(
        Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(root)
            .args(vars(release, cc))
            .args(args),
        &format!("make {} in {}", args.join(" "), root.display()),
    )?)
}

/// The release's `.config` in the tree; `make olddefconfig` must keep it as it is.
fn configure(root: &Path, release: &str, cc: &str, config: &str) -> Result<(), DiffBuildError> {
    std::fs::write(root.join(".config"), config).map_err(io(root))?;
    make(root, release, cc, &["olddefconfig"])?;
    let now = std::fs::read_to_string(root.join(".config")).map_err(io(root))?;
    let settings = |c: &str| -> std::collections::BTreeSet<String> {
        c.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(str::to_string)
            .collect()
    };
    let (want, got) = (settings(config), settings(&now));
    let differ: Vec<String> = want
        .symmetric_difference(&got)
        .take(6)
        .map(|l| {
            let side = if want.contains(l) { "release" } else { "here" };
            format!("{side}: {l}")
        })
        .collect();
    if !differ.is_empty() {
        return Err(DiffBuildError::Toolchain(format!(
            "the release's .config does not hold in {} with this machine's tools \
             (make olddefconfig changed it; is pahole or another tool the release used \
             missing?): {}",
            root.display(),
            differ.join("; ")
        )));
    }
    Ok(())
}

/// objtool's arguments for a module object: kbuild's own, read from the command it
/// recorded for a one-line external module.
fn probe_objtool_args(root: &Path, release: &str, cc: &str) -> Result<Vec<String>, DiffBuildError> {
    let work = crate::kbuild::work_dir()?;
    std::fs::write(
        work.join("probe.c"),
        "int lpvmm_probe(void) { return 0; }\n",
    )
    .map_err(io(&work))?;
    std::fs::write(work.join("Kbuild"), "obj-m := probe.o\n").map_err(io(&work))?;
    let m = format!("M={}", work.display());
    make(root, release, cc, &[&m, "probe.o"])?;
    let cmd = std::fs::read_to_string(work.join(".probe.o.cmd")).map_err(io(&work))?;
    let _ = std::fs::remove_dir_all(&work);
    objtool_args_of(&cmd).ok_or_else(|| {
        DiffBuildError::Source(format!(
            "kbuild of {release} ran no objtool on a module object: lpvmm cannot make the \
             patch's unwind table"
        ))
    })
}

/// The arguments of the objtool run in a kbuild `.cmd` file, without the object.
fn objtool_args_of(cmd: &str) -> Option<Vec<String>> {
    let line = command_line(cmd)?;
    let at = line.find("objtool/objtool ")? + "objtool/objtool ".len();
    let mut args: Vec<String> = line[at..]
        .split(';')
        .next()?
        .split_whitespace()
        .map(str::to_string)
        .collect();
    args.pop(); // the object
    Some(args)
}

/// Held while a build uses the tree.
struct Lock(#[allow(dead_code)] std::fs::File);

fn lock(root: &Path) -> Result<Lock, DiffBuildError> {
    let f = std::fs::File::create(root.join(".lpvmm-lock")).map_err(io(root))?;
    f.lock().map_err(io(root))?;
    Ok(Lock(f))
}

/// Where the original of a file under change is kept, beside the tree's files: if lpvmm
/// dies before it puts the original back, the next build in the tree does
/// ([`recover`]), so that no later "before" is built from another build's "after".
const ORIGINALS: &str = ".lpvmm-originals";

/// The original text of a file put back when a build ends, however it ends.
struct Restore {
    path: PathBuf,
    kept: PathBuf,
    original: Vec<u8>,
}

impl Restore {
    /// Keep the original of `file` (in `root`), then write `text` over it.
    fn write(
        root: &Path,
        file: &str,
        original: Vec<u8>,
        text: &str,
    ) -> Result<Restore, DiffBuildError> {
        let kept = root.join(ORIGINALS).join(file);
        std::fs::create_dir_all(kept.parent().unwrap_or(root)).map_err(io(root))?;
        std::fs::write(&kept, &original).map_err(io(&kept))?;
        let path = root.join(file);
        let restore = Restore {
            path,
            kept,
            original,
        };
        std::fs::write(&restore.path, text).map_err(io(&restore.path))?;
        Ok(restore)
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        if std::fs::write(&self.path, &self.original).is_ok() {
            let _ = std::fs::remove_file(&self.kept);
        }
    }
}

/// Put back every original an earlier build kept and did not restore (it was killed).
fn recover(root: &Path) -> Result<(), DiffBuildError> {
    let kept = root.join(ORIGINALS);
    let mut todo = vec![kept.clone()];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                todo.push(path);
                continue;
            }
            let rel = path.strip_prefix(&kept).unwrap_or(&path);
            let original = std::fs::read(&path).map_err(io(&path))?;
            std::fs::write(root.join(rel), original).map_err(io(root))?;
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    Ok(())
}

impl Tree {
    /// kbuild's object for `file` (`fs/proc/cmdline.c`), built from `text` when given (the
    /// file's text for this build only), with function and data sections and lpvmm's
    /// `<asm/jump_label.h>` (static branches as key tests, so that neither side of the
    /// diff has a `__jump_table`). A file kbuild builds only as part of another
    /// (`kernel/sched/rt.c`, included by `build_policy.c`) is built through that one.
    pub fn build(&self, file: &str, text: Option<&str>) -> Result<Built, DiffBuildError> {
        let _lock = lock(&self.root)?;
        recover(&self.root)?;
        let original = std::fs::read(self.root.join(file)).map_err(|e| {
            DiffBuildError::Refused(format!("{file}: not in the release's source ({e})"))
        })?;
        let _restore = match text {
            Some(t) => Some(Restore::write(&self.root, file, original, t)?),
            None => None,
        };
        match self.includer(file)? {
            Some(including) => {
                let mut built = self.make_object(&including)?;
                built.through = Some(including);
                Ok(built)
            }
            None => self.make_object(file),
        }
    }

    /// `make DIR/NAME.o` for `DIR/NAME.c`.
    fn make_object(&self, file: &str) -> Result<Built, DiffBuildError> {
        let obj = format!("{}.o", file.trim_end_matches(".c"));
        let _ = std::fs::remove_file(self.root.join(&obj));
        let override_dir = self.override_dir()?;
        let out = Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(&self.root)
            .args(vars(&self.release, &self.cc))
            .arg("KCFLAGS=-ffunction-sections -fdata-sections")
            .arg(format!(
                "NOSTDINC_FLAGS=-nostdinc -I{}",
                override_dir.display()
            ))
            .arg(&obj)
            .output()
            .map_err(|e| DiffBuildError::Source(format!("cannot run make: {e}")))?;
        if !out.status.success() {
            return Err(self.failed(file, &out));
        }
        let bytes = std::fs::read(self.root.join(&obj)).map_err(io(&self.root))?;
        let (dir, base) = obj.rsplit_once('/').unwrap_or(("", &obj));
        let cmd = std::fs::read_to_string(self.root.join(dir).join(format!(".{base}.cmd")))
            .unwrap_or_default();
        Ok(Built {
            bytes,
            module: module_of(&cmd),
            through: None,
        })
    }

    /// The one `.c` file of `file`'s directory that `#include`s it, if the directory's
    /// Makefile does not build `file` as an object of its own.
    fn includer(&self, file: &str) -> Result<Option<String>, DiffBuildError> {
        let (dir, base) = file.rsplit_once('/').unwrap_or(("", file));
        let object = format!("{}.o", base.trim_end_matches(".c"));
        let listed = ["Makefile", "Kbuild"].iter().any(|m| {
            std::fs::read_to_string(self.root.join(dir).join(m)).is_ok_and(|t| {
                t.split(|c: char| c.is_whitespace() || c == '=' || c == '+' || c == ':')
                    .any(|w| w == object)
            })
        });
        if listed {
            return Ok(None);
        }
        let want = format!("#include \"{base}\"");
        let listing = std::fs::read_dir(self.root.join(dir)).map_err(io(&self.root))?;
        let mut found = Vec::new();
        for e in listing.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".c") && name != base {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                if text.lines().any(|l| l.trim() == want) {
                    found.push(format!("{dir}/{name}"));
                }
            }
        }
        Ok(match found.len() {
            1 => found.pop(),
            _ => None,
        })
    }

    fn failed(&self, file: &str, out: &std::process::Output) -> DiffBuildError {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No rule to make target") {
            DiffBuildError::Refused(format!(
                "{file} is not built under {}'s configuration: the running kernel has none \
                 of its code",
                self.release
            ))
        } else {
            DiffBuildError::Compile(
                file.to_string(),
                format!("{}{err}", String::from_utf8_lossy(&out.stdout)),
            )
        }
    }

    /// lpvmm's `<asm/jump_label.h>`, in the tree (written once).
    fn override_dir(&self) -> Result<PathBuf, DiffBuildError> {
        let dir = self.root.join(".lpvmm-override");
        let file = dir.join("asm/jump_label.h");
        if std::fs::read_to_string(&file).ok().as_deref() != Some(JUMP_LABEL_H) {
            std::fs::create_dir_all(dir.join("asm")).map_err(io(&dir))?;
            std::fs::write(&file, JUMP_LABEL_H).map_err(io(&dir))?;
        }
        Ok(dir)
    }

    /// The release's objtool on `obj` (module-style, as kbuild runs it on a module's
    /// object): its ORC, return sites and the rest, made for the patch's code.
    pub fn objtool(&self, obj: &Path) -> Result<(), DiffBuildError> {
        let out = Command::new(self.root.join("tools/objtool/objtool"))
            .args(&self.objtool_args)
            .arg(obj)
            .output()
            .map_err(|e| DiffBuildError::Source(format!("cannot run objtool: {e}")))?;
        if !out.status.success() {
            return Err(DiffBuildError::Compile(
                "objtool on the patch object".into(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        Ok(())
    }
}

/// The command of a kbuild `.cmd` file (`cmd_OBJ := ...`; 6.12: `savedcmd_OBJ := ...`).
fn command_line(cmd: &str) -> Option<&str> {
    cmd.lines()
        .find(|l| l.starts_with("cmd_") || l.starts_with("savedcmd_"))
}

/// The module a kbuild `.cmd` built for (`-DMODULE`, `-DKBUILD_MODNAME='"name"'`).
fn module_of(cmd: &str) -> Option<String> {
    let line = command_line(cmd)?;
    if !line.split_whitespace().any(|w| w == "-DMODULE") {
        return None;
    }
    let at = line.find("-DKBUILD_MODNAME='\"")? + "-DKBUILD_MODNAME='\"".len();
    let name = line[at..].split('"').next()?;
    Some(name.replace('-', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_original_a_killed_build_left_kept_is_put_back_by_the_next() {
        let root = std::env::temp_dir().join(format!("lpvmm-recover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("fs/proc")).unwrap();
        std::fs::write(root.join("fs/proc/x.c"), "original\n").unwrap();
        {
            let r =
                Restore::write(&root, "fs/proc/x.c", b"original\n".to_vec(), "after\n").unwrap();
            assert_eq!(
                std::fs::read_to_string(root.join("fs/proc/x.c")).unwrap(),
                "after\n"
            );
            std::mem::forget(r); // as if lpvmm died here
        }
        assert_eq!(
            std::fs::read_to_string(root.join("fs/proc/x.c")).unwrap(),
            "after\n"
        );
        recover(&root).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("fs/proc/x.c")).unwrap(),
            "original\n"
        );
        assert!(!root.join(ORIGINALS).join("fs/proc/x.c").exists());
        // A build that ends puts the original back itself and keeps nothing.
        drop(Restore::write(&root, "fs/proc/x.c", b"original\n".to_vec(), "after\n").unwrap());
        assert_eq!(
            std::fs::read_to_string(root.join("fs/proc/x.c")).unwrap(),
            "original\n"
        );
        assert!(!root.join(ORIGINALS).join("fs/proc/x.c").exists());
        let _ = std::fs::remove_dir_all(&root);
    }

    /// Lines of `.dummy.o.cmd` and `.cmdline.o.cmd` as Debian's 6.12 and 6.1 kbuild wrote them.
    #[test]
    fn kbuild_commands_are_read_for_objtool_and_the_module() {
        let module = "savedcmd_drivers/net/dummy.o := x86_64-linux-gnu-gcc-12 -Wp,-MMD -nostdinc -DMODULE  -DKBUILD_BASENAME='\"dummy\"' -DKBUILD_MODNAME='\"dummy\"' -D__KBUILD_MODNAME=kmod_dummy -c -o drivers/net/dummy.o drivers/net/dummy.c   ; ./tools/objtool/objtool --hacks=jump_label --hacks=noinstr --ibt --orc --prefix=16  --link  --module drivers/net/dummy.o\n\nsource_drivers/net/dummy.o := drivers/net/dummy.c\n";
        assert_eq!(module_of(module).as_deref(), Some("dummy"));
        assert_eq!(
            objtool_args_of(module).unwrap(),
            [
                "--hacks=jump_label",
                "--hacks=noinstr",
                "--ibt",
                "--orc",
                "--prefix=16",
                "--link",
                "--module"
            ]
        );
        let builtin = "cmd_fs/proc/cmdline.o := gcc-12 -nostdinc -DKBUILD_MODFILE='\"fs/proc/proc\"' -DKBUILD_BASENAME='\"cmdline\"' -DKBUILD_MODNAME='\"proc\"' -c -o fs/proc/cmdline.o fs/proc/cmdline.c   ; ./tools/objtool/objtool --orc --retpoline   fs/proc/cmdline.o\n";
        assert_eq!(module_of(builtin), None);
        assert_eq!(objtool_args_of(builtin).unwrap(), ["--orc", "--retpoline"]);
        assert_eq!(objtool_args_of("cmd_x.o := gcc -c x.c\n"), None);
    }
}
