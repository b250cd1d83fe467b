//! `lpvmm kp build --kernel RELEASE`: build a patch the way the guest kernel's own
//! modules were built, with its kbuild against Debian's `linux-headers-RELEASE` (and the
//! `-common` or `-common-FEATURESET` headers and the `linux-kbuild` package it depends
//! on: [`build_dependencies`]). So the object has that kernel's
//! exact flags, config and code generation: retpolines, return thunks, IBT, `-mfentry`,
//! objtool and its ORC table.
//!
//! The packages are fetched with `apt-get download` (never installed) and unpacked under
//! `~/.cache/lpvmm/kbuild/RELEASE` (or `$XDG_CACHE_HOME`), once; later builds for the
//! same release need no network.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::build::{compiled, write_checked, BuildError, JUMP_LABEL_H, PATCH_H, SHADOW_H};
use crate::load::object::PatchObject;

/// A Debian kernel release as `uname -r` prints it (`6.1.0-28-cloud-amd64`): what may be
/// put in a package name.
pub fn valid_release(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 64
        && r.starts_with(|c: char| c.is_ascii_digit())
        && r.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_'))
}

/// Where the unpacked headers of every release are kept.
pub fn cache_root() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        });
    base.join("lpvmm/kbuild")
}

/// The guest kernel's build tree: `usr/src/linux-headers-RELEASE` of the unpacked
/// packages, fetched first if this machine has not got it yet.
pub fn kernel_tree(release: &str) -> Result<PathBuf, BuildError> {
    if !valid_release(release) {
        return Err(BuildError::Kernel(format!(
            "'{release}' is not a kernel release (say what `uname -r` prints in the guest, \
             for example 6.1.0-28-cloud-amd64)"
        )));
    }
    let dir = cache_root().join(release);
    let tree = dir
        .join("root/usr/src")
        .join(format!("linux-headers-{release}"));
    if dir.join("root/ready").exists() && tree.join("Makefile").exists() {
        return Ok(tree);
    }
    fetch(release, &dir)?;
    Ok(tree)
}

pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<String, BuildError> {
    let out = cmd
        .output()
        .map_err(|e| BuildError::Kernel(format!("cannot run {what}: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(BuildError::Kernel(format!(
            "{what} failed: {}",
            err.trim().lines().last().unwrap_or("no message")
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The headers package and the two it needs: `(headers, common, kbuild)`.
fn packages(release: &str) -> Result<[String; 3], BuildError> {
    let headers = format!("linux-headers-{release}");
    let show = Command::new("apt-cache")
        .args(["show", "--no-all-versions", &headers])
        .output()
        .map_err(|e| {
            BuildError::Kernel(format!(
                "cannot run apt-cache: {e} (a Debian host is needed)"
            ))
        })?;
    let text = String::from_utf8_lossy(&show.stdout);
    let depends = text
        .lines()
        .find_map(|l| l.strip_prefix("Depends:"))
        .filter(|_| show.status.success())
        .ok_or_else(|| {
            BuildError::Kernel(format!(
                "Debian has no package {headers}: is '{release}' what `uname -r` prints in the \
                 guest, and a Debian kernel? (apt-get update refreshes the package lists)"
            ))
        })?;
    let [common, kbuild] = build_dependencies(&headers, depends)?;
    Ok([headers, common, kbuild])
}

/// Of the `Depends` field of a flavour's headers package, the two packages its build
/// tree needs: the headers shared by the flavours (`linux-headers-ABI-common`, or
/// `linux-headers-ABI-common-FEATURESET` for a featureset such as `rt`, whose Makefile
/// the flavour's includes) and kbuild (`linux-kbuild-VERSION`, where its `scripts` and
/// `tools` links point). Each dependency may list alternatives (`a | b`: the first that
/// is one of the two is taken), a version constraint (`(= 6.1.192-3)`) or an
/// architecture (`:any`); the rest (`linux-compiler-gcc-12-x86`, `gcc-12`,
/// `linux-base`, `linux-image-...`) is for installing the package and is not fetched.
fn build_dependencies(headers: &str, depends: &str) -> Result<[String; 2], BuildError> {
    let names = depends.split(',').filter_map(|dep| {
        dep.split('|')
            .map(|alt| {
                let name = alt.split(['(', '[', '<']).next().unwrap_or("").trim();
                name.split(':').next().unwrap_or("")
            })
            .find(|n| is_common(n) || n.starts_with("linux-kbuild-"))
    });
    let (mut common, mut kbuild) = (Vec::new(), Vec::new());
    for n in names {
        let list = if is_common(n) {
            &mut common
        } else {
            &mut kbuild
        };
        if !list.contains(&n) {
            list.push(n);
        }
    }
    match (common.as_slice(), kbuild.as_slice()) {
        ([common], [kbuild]) => Ok([common.to_string(), kbuild.to_string()]),
        _ => Err(BuildError::Kernel(format!(
            "{headers} does not depend on exactly one -common headers package \
             (linux-headers-ABI-common[-FEATURESET]) and one linux-kbuild package: \
             Depends: {}",
            depends.trim()
        ))),
    }
}

/// `linux-headers-ABI-common` or `linux-headers-ABI-common-FEATURESET`.
fn is_common(name: &str) -> bool {
    name.strip_prefix("linux-headers-").is_some_and(|rest| {
        rest.ends_with("-common")
            || rest
                .rsplit_once("-common-")
                .is_some_and(|(_, fs)| !fs.is_empty())
    })
}

/// Download and unpack the packages into `dir/root` (a fresh directory renamed into
/// place, so that two builds at once never see half of it).
fn fetch(release: &str, dir: &Path) -> Result<(), BuildError> {
    let pkgs = packages(release)?;
    let io = |e: std::io::Error| BuildError::Io(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let stage = dir.join(format!("stage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&stage);
    let debs = stage.join("debs");
    let root = stage.join("root");
    std::fs::create_dir_all(&debs).map_err(io)?;
    std::fs::create_dir_all(&root).map_err(io)?;
    let user = run(Command::new("id").arg("-un"), "id -un")?;
    let downloaded = run(
        Command::new("apt-get")
            .args(["download", "-qq", "-o"])
            .arg(format!("APT::Sandbox::User={}", user.trim()))
            .args(&pkgs)
            .current_dir(&debs),
        &format!("apt-get download {}", pkgs.join(" ")),
    );
    if let Err(e) = downloaded {
        let _ = std::fs::remove_dir_all(&stage);
        return Err(BuildError::Kernel(format!(
            "{e} (cannot reach Debian's package registry? a release built once before builds \
             offline from {})",
            cache_root().display()
        )));
    }
    for deb in std::fs::read_dir(&debs).map_err(io)? {
        let deb = deb.map_err(io)?.path();
        run(
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
            &format!("dpkg-deb -x {}", deb.display()),
        )?;
    }
    // The flavour's Makefile includes the common one by its installed path; point it at
    // the unpacked copy (relative links, such as scripts/, work as they are).
    let final_root = dir.join("root");
    let makefile = root
        .join("usr/src")
        .join(format!("linux-headers-{release}"))
        .join("Makefile");
    let text = std::fs::read_to_string(&makefile)
        .map_err(|e| BuildError::Kernel(format!("{}: {e}", makefile.display())))?;
    let fixed = text.replace("/usr/src/", &format!("{}/usr/src/", final_root.display()));
    std::fs::write(&makefile, fixed).map_err(io)?;
    std::fs::write(root.join("ready"), release).map_err(io)?;
    let _ = std::fs::remove_dir_all(&debs);
    if std::fs::rename(&root, &final_root).is_err() {
        // Another build put it there first, or a stale copy without `ready` is there.
        if !final_root.join("ready").exists() {
            let _ = std::fs::remove_dir_all(&final_root);
            std::fs::rename(&root, &final_root).map_err(io)?;
        }
    }
    let _ = std::fs::remove_dir_all(&stage);
    Ok(())
}

/// The `Kbuild` lines every lpvmm build has: lpvmm's headers on the include path, and
/// its `override/` before the kernel's own (`NOSTDINC_FLAGS` comes first on the
/// compiler's command line, as out-of-tree backports use it).
pub(crate) const KBUILD_FLAGS: &str =
    "ccflags-y := -I$(src)/include\nNOSTDINC_FLAGS += -I$(src)/override\n";

/// A fresh directory for one kbuild run, with lpvmm's headers in `include/` and its
/// overrides of the kernel's in `override/`.
pub(crate) fn work_dir() -> Result<PathBuf, BuildError> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let work = std::env::temp_dir().join(format!("lpvmm-kbuild-{}-{seq}", std::process::id()));
    let io = |e: std::io::Error| BuildError::Io(format!("{}: {e}", work.display()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("include/lpvmm")).map_err(io)?;
    std::fs::write(work.join("include/lpvmm/patch.h"), PATCH_H).map_err(io)?;
    std::fs::write(work.join("include/lpvmm/shadow.h"), SHADOW_H).map_err(io)?;
    std::fs::create_dir_all(work.join("override/asm")).map_err(io)?;
    std::fs::write(work.join("override/asm/jump_label.h"), JUMP_LABEL_H).map_err(io)?;
    Ok(work)
}

/// `make -C TREE M=WORK ... TARGET` with `extra` as KCFLAGS; `vars` are more make
/// variables.
pub(crate) fn make(
    tree: &Path,
    work: &Path,
    target: &str,
    extra: &[String],
    vars: &[&str],
) -> Result<std::process::Output, BuildError> {
    Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(tree)
        .arg(format!("M={}", work.display()))
        // No BTF for the module (lpvmm reads the kernel's).
        .arg("CONFIG_DEBUG_INFO_BTF_MODULES=")
        .arg(format!("KCFLAGS={}", extra.join(" ")))
        .args(vars)
        .arg(target)
        .output()
        .map_err(|e| BuildError::NoCompiler("make".into(), e))
}

/// Build `source` as the one object of a kbuild module against the headers of `release`, with
/// `lpvmm/patch.h` on the include path and `extra` compiler flags; returns the object's
/// bytes, checked for nothing.
pub fn compile(source: &Path, release: &str, extra: &[String]) -> Result<Vec<u8>, BuildError> {
    let tree = kernel_tree(release)?;
    let work = work_dir()?;
    let io = |e: std::io::Error| BuildError::Io(format!("{}: {e}", work.display()));
    std::fs::copy(source, work.join("lpvmm_patch.c"))
        .map_err(|e| BuildError::Io(format!("reading {}: {e}", source.display())))?;
    std::fs::write(
        work.join("Kbuild"),
        format!("obj-m := lpvmm_patch.o\n{KBUILD_FLAGS}"),
    )
    .map_err(io)?;
    // The object alone, compiled and checked by objtool as the kernel's own modules'
    // objects are; no modpost (lpvmm resolves every symbol, exported or not, from the
    // guest's kallsyms).
    let out = make(&tree, &work, "lpvmm_patch.o", extra, &[])?;
    let result = compiled(
        &out,
        &work.join("lpvmm_patch.o"),
        format!("kbuild of {} for {release}", source.display()),
    );
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Build `source` with the guest kernel's kbuild into `output`, checked as `load` will.
pub fn build(
    source: &Path,
    output: &Path,
    release: &str,
    extra: &[String],
) -> Result<PatchObject, BuildError> {
    write_checked(&compile(source, release, extra)?, output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_are_checked_before_they_reach_apt() {
        assert!(valid_release("6.1.0-28-cloud-amd64"));
        assert!(valid_release("6.12.57+deb13-cloud-amd64"));
        for bad in ["", "-rf", "6.1 0", "6.1;ls", "../x", "cloud-amd64"] {
            assert!(!valid_release(bad), "{bad}");
        }
        assert!(kernel_tree("6.1;ls")
            .unwrap_err()
            .to_string()
            .contains("not a kernel release"));
    }

    /// `Depends` of `apt-cache show --no-all-versions linux-headers-RELEASE`, verbatim
    /// (Debian bookworm and bookworm-backports, 2026-12-06), and the two packages that
    /// are fetched with it.
    fn deps(release: &str, depends: &str) -> [String; 2] {
        build_dependencies(&format!("linux-headers-{release}"), depends)
            .unwrap_or_else(|e| panic!("{release}: {e}"))
    }

    #[test]
    fn the_6_1_flavours_need_the_abis_common_headers_and_kbuild_6_1() {
        let depends = "linux-headers-6.1.0-57-common (= 6.1.192-3), linux-kbuild-6.1 (>= \
                       6.1.192-3), linux-compiler-gcc-12-x86";
        for flavour in ["cloud-amd64", "amd64"] {
            assert_eq!(
                deps(&format!("6.1.0-57-{flavour}"), depends),
                ["linux-headers-6.1.0-57-common", "linux-kbuild-6.1"]
            );
        }
    }

    #[test]
    fn the_6_1_rt_flavour_needs_the_rt_featuresets_common_headers() {
        assert_eq!(
            deps(
                "6.1.0-57-rt-amd64",
                "linux-headers-6.1.0-57-common-rt (= 6.1.192-3), linux-kbuild-6.1 (>= \
                 6.1.192-3), linux-compiler-gcc-12-x86"
            ),
            ["linux-headers-6.1.0-57-common-rt", "linux-kbuild-6.1"]
        );
    }

    #[test]
    fn the_6_12_backports_need_their_versions_common_headers_and_kbuild() {
        assert_eq!(
            deps(
                "6.12.118+deb12-cloud-amd64",
                "linux-base (>= 4.12~), linux-headers-6.12.118+deb12-common (= \
                 6.12.118-1~deb12u1), linux-image-6.12.118+deb12-cloud-amd64 (= \
                 6.12.118-1~deb12u1) | linux-image-6.12.118+deb12-cloud-amd64-unsigned (= \
                 6.12.118-1~deb12u1), linux-kbuild-6.12.118+deb12, gcc-12"
            ),
            [
                "linux-headers-6.12.118+deb12-common",
                "linux-kbuild-6.12.118+deb12"
            ]
        );
        assert_eq!(
            deps(
                "6.12.118+deb12-rt-amd64",
                "linux-base (>= 4.12~), linux-headers-6.12.118+deb12-common-rt (= \
                 6.12.118-1~deb12u1), linux-image-6.12.118+deb12-rt-amd64 (= \
                 6.12.118-1~deb12u1) | linux-image-6.12.118+deb12-rt-amd64-unsigned (= \
                 6.12.118-1~deb12u1), linux-kbuild-6.12.118+deb12, gcc-12"
            ),
            [
                "linux-headers-6.12.118+deb12-common-rt",
                "linux-kbuild-6.12.118+deb12"
            ]
        );
    }

    /// Not a field Debian ships today: every form Debian's policy allows in a binary
    /// package's `Depends` around the two names (alternatives, either first, version
    /// constraints with and without spaces, architecture qualifiers, no space after the
    /// field's colon).
    #[test]
    fn alternatives_versions_and_architectures_are_read_as_debian_writes_them() {
        assert_eq!(
            deps(
                "6.1.0-57-cloud-amd64",
                "linux-compiler-gcc-12-x86|gcc-12, linux-headers-6.1.0-57-common(=6.1.192-3) \
                 | linux-headers-6.1.0-57-common-rt (= 6.1.192-3), make:any | \
                 linux-kbuild-6.1:amd64 (>= 6.1.192-3)"
            ),
            ["linux-headers-6.1.0-57-common", "linux-kbuild-6.1"]
        );
    }

    #[test]
    fn a_headers_package_without_exactly_one_of_each_is_refused_naming_its_depends() {
        for depends in [
            "linux-headers-6.1.0-57-common (= 6.1.192-3), linux-compiler-gcc-12-x86",
            "linux-kbuild-6.1 (>= 6.1.192-3), linux-compiler-gcc-12-x86",
            "linux-headers-6.1.0-57-common, linux-headers-6.1.0-57-common-rt, linux-kbuild-6.1",
            "linux-headers-6.1.0-57-commonplace, linux-headers-6.1.0-57-common-, linux-kbuild-6.1",
            "",
        ] {
            let e = build_dependencies("linux-headers-6.1.0-57-x-amd64", depends)
                .expect_err(depends)
                .to_string();
            assert!(
                e.contains("linux-headers-6.1.0-57-x-amd64 does not depend on exactly one")
                    && e.contains(depends.trim()),
                "{e}"
            );
        }
    }
}
