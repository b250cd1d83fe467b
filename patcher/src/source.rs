//! Debian's source of a guest kernel release: the `linux-source-X.Y` package at the
//! version of the release's own packages (`apt-cache show linux-headers-RELEASE`), for
//! the parts of the tree lpvmm builds from: the kernel's samples/livepatch, which the
//! test suite applies from outside, and the whole tree a diff build compiles in
//! ([`whole_tree`]). Fetched with `apt-get download` (never installed), unpacked once
//! under `~/.cache/lpvmm/source/RELEASE/`; the package itself is not kept.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::build::BuildError;
use crate::kbuild::{run, valid_release};

/// Field `field` of `apt-cache show --no-all-versions PACKAGE`, if it has one.
fn package_field(package: &str, field: &str) -> Result<Option<String>, BuildError> {
    let out = run(
        Command::new("apt-cache").args(["show", "--no-all-versions", package]),
        "apt-cache show",
    )?;
    let key = format!("{field}:");
    Ok(out
        .lines()
        .find_map(|l| l.strip_prefix(key.as_str()))
        .map(|v| v.trim().to_string()))
}

/// The version of the release's packages (`6.1.192-3` for 6.1.0-57-cloud-amd64).
fn package_version(release: &str) -> Result<String, BuildError> {
    package_field(&format!("linux-headers-{release}"), "Version")?
        .ok_or_else(|| BuildError::Kernel(format!("Debian has no linux-headers-{release}")))
}

/// `6.1` of `6.1.0-57-cloud-amd64`, `6.12` of `6.12.118+deb12-cloud-amd64`.
fn series(release: &str) -> Option<String> {
    let mut parts = release.split(['.', '-', '+']);
    Some(format!("{}.{}", parts.next()?, parts.next()?))
}

/// The source version the release was built from: the `Built-Using` of its image
/// package (`linux (= 6.1.192-3)`), which must be its packages' own version (Debian's
/// `linux-source-X.Y` of that version is then the exact source).
fn built_from(release: &str, version: &str) -> Result<(), BuildError> {
    let using =
        package_field(&format!("linux-image-{release}"), "Built-Using")?.unwrap_or_default();
    if !using.contains(&format!("(= {version})")) {
        return Err(BuildError::Kernel(format!(
            "linux-image-{release} was built from '{using}', not from the source version \
             {version} lpvmm would fetch: give its source with --source DIR"
        )));
    }
    Ok(())
}

/// `linux-source-SERIES=VERSION` of `release`, downloaded into a fresh stage directory
/// under `root`; returns (stage, series).
fn download(release: &str, version: &str, root: &Path) -> Result<(PathBuf, String), BuildError> {
    let series = series(release).ok_or_else(|| BuildError::Kernel(release.to_string()))?;
    let io = |e: std::io::Error| BuildError::Io(format!("{}: {e}", root.display()));
    let stage = root.join(format!("stage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(&stage).map_err(io)?;
    let user = run(Command::new("id").arg("-un"), "id -un")?;
    let pkg = format!("linux-source-{series}={version}");
    run(
        Command::new("apt-get")
            .args(["download", "-qq", "-o"])
            .arg(format!("APT::Sandbox::User={}", user.trim()))
            .arg(&pkg)
            .current_dir(&stage),
        &format!("apt-get download {pkg}"),
    )
    .map_err(|e| {
        BuildError::Kernel(format!(
            "{e} (Debian's archive keeps recent versions only: for an older release, give \
             its source with --source DIR)"
        ))
    })?;
    Ok((stage, series))
}

/// Unpack `members` (paths inside the tarball, empty: all) of the downloaded package.
fn unpack(stage: &Path, series: &str, members: &str) -> Result<(), BuildError> {
    // The package holds usr/src/linux-source-X.Y.tar.xz.
    let script = format!(
        "dpkg-deb --fsys-tarfile linux-source-*.deb | tar -xO ./usr/src/linux-source-{series}.tar.xz \
         | tar -xJ {members} && rm linux-source-*.deb"
    );
    run(
        Command::new("sh").arg("-c").arg(&script).current_dir(stage),
        &format!("unpacking linux-source-{series}"),
    )?;
    Ok(())
}

fn source_root(release: &str) -> PathBuf {
    crate::kbuild::cache_root()
        .with_file_name("source")
        .join(release)
}

/// The directory `dir` (e.g. `samples/livepatch`) of the source of `release`, fetched
/// and unpacked the first time.
pub fn source_dir(release: &str, dir: &str) -> Result<PathBuf, BuildError> {
    if !valid_release(release) || dir.split('/').any(|p| p.is_empty() || p == "..") {
        return Err(BuildError::Kernel(format!(
            "bad release or directory: {release} {dir}"
        )));
    }
    let root = source_root(release);
    let want = root.join(dir);
    let ready = root.join(format!(".ready-{}", dir.replace('/', "_")));
    if ready.exists() {
        return Ok(want);
    }
    let io = |e: std::io::Error| BuildError::Io(format!("{}: {e}", root.display()));
    let version = package_version(release)?;
    let (stage, series) = download(release, &version, &root)?;
    unpack(&stage, &series, &format!("linux-source-{series}/{dir}"))?;
    let got = stage.join(format!("linux-source-{series}")).join(dir);
    std::fs::create_dir_all(want.parent().unwrap_or(&root)).map_err(io)?;
    let _ = std::fs::remove_dir_all(&want);
    std::fs::rename(&got, &want).map_err(io)?;
    std::fs::write(&ready, &version).map_err(io)?;
    let _ = std::fs::remove_dir_all(&stage);
    Ok(want)
}

/// The whole source tree of `release` (`~/.cache/lpvmm/source/RELEASE/tree`), fetched
/// and unpacked the first time, after checking that the release was built from it.
pub fn whole_tree(release: &str) -> Result<PathBuf, BuildError> {
    if !valid_release(release) {
        return Err(BuildError::Kernel(format!("bad release: {release}")));
    }
    let root = source_root(release);
    let tree = root.join("tree");
    if root.join(".ready-tree").exists() {
        return Ok(tree);
    }
    let io = |e: std::io::Error| BuildError::Io(format!("{}: {e}", root.display()));
    let version = package_version(release)?;
    built_from(release, &version)?;
    let (stage, series) = download(release, &version, &root)?;
    unpack(&stage, &series, "")?;
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::rename(stage.join(format!("linux-source-{series}")), &tree).map_err(io)?;
    std::fs::write(root.join(".ready-tree"), &version).map_err(io)?;
    let _ = std::fs::remove_dir_all(&stage);
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_of_both_kinds_of_release() {
        assert_eq!(series("6.1.0-57-cloud-amd64").as_deref(), Some("6.1"));
        assert_eq!(
            series("6.12.118+deb12-cloud-amd64").as_deref(),
            Some("6.12")
        );
        assert!(source_dir("6.1;ls", "samples").is_err());
        assert!(source_dir("6.1.0-57-cloud-amd64", "../etc").is_err());
    }
}
