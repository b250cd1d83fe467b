//! Where VM control sockets live, and VM names.

use std::path::PathBuf;

use anyhow::{bail, Result};

/// `$LPVMM_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/lpvmm`, else `/run/lpvmm` for root and
/// `/tmp/lpvmm-UID` for others.
pub fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LPVMM_RUNTIME_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("lpvmm");
    }
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        PathBuf::from("/run/lpvmm")
    } else {
        PathBuf::from(format!("/tmp/lpvmm-{uid}"))
    }
}

pub fn socket_path(name: &str) -> PathBuf {
    runtime_dir().join(format!("{name}.sock"))
}

/// The words after `lpvmm patch` that name a command (cli/patch.rs); a VM may not be
/// named so, so that `lpvmm patch VM FILE` and `lpvmm patch VERB ...` never mix.
pub const PATCH_VERBS: &[&str] = &[
    "list", "status", "load", "enable", "disable", "reverse", "force", "unload", "help",
];

/// Names become file names: keep them short and plain.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!("invalid VM name '{name}': use 1-64 letters, digits, '-', '_' or '.', not starting with '.'");
    }
    if PATCH_VERBS.contains(&name) {
        bail!(
            "invalid VM name '{name}': it is a command of `lpvmm patch` ({}), so \
             `lpvmm patch {name} ...` could not reach the VM",
            PATCH_VERBS.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("vm1").is_ok());
        assert!(validate_name("web-01.prod").is_ok());
        for bad in [
            "",
            "../x",
            "a/b",
            ".hidden",
            "sp ace",
            &"x".repeat(65),
            "status",
            "reverse",
        ] {
            assert!(validate_name(bad).is_err(), "{bad} accepted");
        }
    }
}
