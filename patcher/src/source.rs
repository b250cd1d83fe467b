//! Debian's source of a guest kernel release: the `linux-source-X.Y` package at the
//! version of the release's own packages (`apt-cache show linux-headers-RELEASE`), for
//! the parts of the tree lpvmm builds from (today the kernel's samples/livepatch, which
//! the test suite applies from outside). Fetched with `apt-get download` (never
//! installed), unpacked once under `~/.cache/lpvmm/source/RELEASE/`; the whole tarball is
//! not kept.

use std::path::PathBuf;
use std::process::Command;

use crate::build::BuildError;
use crate::kbuild::{run, valid_release};

/// The version of the release's packages (`6.1.192-3` for 6.1.0-57-cloud-amd64).
fn package_version(release: &str) -> Result<String, BuildError> {
    let out = run(
        Command::new("apt-cache").args([
            "show",
            "--no-all-versions",
            &format!("linux-headers-{release}"),
        ]),
        "apt-cache show",
    )?;
    out.lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| BuildError::Kernel(format!("Debian has no linux-headers-{release}")))
}

/// `6.1` of `6.1.0-57-cloud-amd64`, `6.12` of `6.12.118+deb12-cloud-amd64`.
fn series(release: &str) -> Option<String> {
    let mut parts = release.split(['.', '-', '+']);
    Some(format!("{}.{}", parts.next()?, parts.next()?))
}

/// The directory `dir` (e.g. `samples/livepatch`) of the source of `release`, fetched
/// and unpacked the first time.
pub fn source_dir(release: &str, dir: &str) -> Result<PathBuf, BuildError> {
    if !valid_release(release) || dir.split('/').any(|p| p.is_empty() || p == "..") {
        return Err(BuildError::Kernel(format!(
            "bad release or directory: {release} {dir}"
        )));
    }
    let root = crate::kbuild::cache_root()
        .with_file_name("source")
        .join(release);
    let want = root.join(dir);
    let ready = root.join(format!(".ready-{}", dir.replace('/', "_")));
    if ready.exists() {
        return Ok(want);
    }
    let series = series(release).ok_or_else(|| BuildError::Kernel(release.to_string()))?;
    let version = package_version(release)?;
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
    )?;
    // The package holds usr/src/linux-source-X.Y.tar.xz; only `dir` of it is unpacked.
    let script = format!(
        "dpkg-deb --fsys-tarfile linux-source-*.deb | tar -xO ./usr/src/linux-source-{series}.tar.xz \
         | tar -xJ linux-source-{series}/{dir}"
    );
    run(
        Command::new("sh")
            .arg("-c")
            .arg(&script)
            .current_dir(&stage),
        &format!("unpacking {dir} of {pkg}"),
    )?;
    let got = stage.join(format!("linux-source-{series}")).join(dir);
    std::fs::create_dir_all(want.parent().unwrap_or(&root)).map_err(io)?;
    let _ = std::fs::remove_dir_all(&want);
    std::fs::rename(&got, &want).map_err(io)?;
    std::fs::write(&ready, &version).map_err(io)?;
    let _ = std::fs::remove_dir_all(&stage);
    Ok(want)
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
