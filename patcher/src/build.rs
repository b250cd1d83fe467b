//! `lpvmm kp build`: compile one C file into a `.kp` with the flags a live patch needs,
//! then check the result the way `load` will (everything but the guest's symbols).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::load::object::PatchObject;
use crate::KpError;

/// The author's header, shipped inside lpvmm so that an installed binary can build.
pub const PATCH_H: &str = include_str!("../include/lpvmm/patch.h");
/// Shadow variables (`lpvmm/shadow.h`): for builds with the guest's kbuild only.
pub const SHADOW_H: &str = include_str!("../include/lpvmm/shadow.h");
/// Found before the kernel's own `<asm/jump_label.h>` in builds with the guest's kbuild:
/// static branches as tests of their key (see the header).
pub const JUMP_LABEL_H: &str = include_str!("../include/kbuild-override/asm/jump_label.h");

/// Code generation for kernel context, as the kernel's own Makefile sets it for x86-64
/// where it matters to a patch:
/// - `-mcmodel=kernel -fno-pic`: code in the top 2 GiB, absolute and PC-relative
///   relocations only;
/// - `-mno-red-zone -mgeneral-regs-only`: interrupts use the stack, no FPU/SIMD state;
/// - `-ffreestanding -fno-stack-protector -fno-common`: no libc, no canary, no commons;
/// - retpolines and return thunks (`-mindirect-branch=thunk-extern`,
///   `-mfunction-return=thunk-extern`) resolved to the guest's own thunks;
/// - `-fno-omit-frame-pointer`: lpvmm unwinds patch code through its frame pointer;
/// - no unwind tables, no jump tables, no CET notes: sections lpvmm would not use.
pub const CFLAGS: &[&str] = &[
    "-c",
    "-O2",
    "-std=gnu11",
    "-Wall",
    "-nostdinc",
    "-mcmodel=kernel",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-ffreestanding",
    "-fno-stack-protector",
    "-fno-common",
    "-fno-strict-aliasing",
    "-fno-delete-null-pointer-checks",
    "-fno-omit-frame-pointer",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-jump-tables",
    "-fcf-protection=none",
    "-mindirect-branch=thunk-extern",
    "-mindirect-branch-register",
    "-mfunction-return=thunk-extern",
    "-falign-functions=16",
];

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot run {0}: {1} (install it: apt-get install gcc make)")]
    NoCompiler(String, std::io::Error),
    #[error("{0} failed:\n{1}")]
    Compile(String, String),
    #[error("{0}")]
    Io(String),
    /// The guest kernel's build tree for `--kernel` (packages, network, release).
    #[error("--kernel: {0}")]
    Kernel(String),
    /// (Not a `#[source]`: the message already has it, and a chain would say it twice.)
    #[error("the built object is not a loadable patch: {0}")]
    Invalid(KpError),
}

impl From<KpError> for BuildError {
    fn from(e: KpError) -> Self {
        BuildError::Invalid(e)
    }
}

impl From<crate::ParseError> for BuildError {
    fn from(e: crate::ParseError) -> Self {
        BuildError::Invalid(e.into())
    }
}

/// Compile `source` to `output` and check that the result is a loadable patch.
/// `includes` are extra `-I` directories (for example kernel headers); `extra` are extra
/// compiler flags, after lpvmm's.
pub fn build(
    source: &Path,
    output: &Path,
    includes: &[PathBuf],
    extra: &[String],
) -> Result<PatchObject, BuildError> {
    write_checked(&compile(source, includes, extra)?, output)
}

/// Check `bytes` as `load` will (everything but the guest's symbols) and write them to
/// `output`; nothing is written for an object that would be refused.
pub fn write_checked(bytes: &[u8], output: &Path) -> Result<PatchObject, BuildError> {
    let parsed = PatchObject::parse(bytes)?;
    std::fs::write(output, bytes)
        .map_err(|e| BuildError::Io(format!("writing {}: {e}", output.display())))?;
    Ok(parsed)
}

/// The object a compiler run left at `obj`, or its failure (`what`, with its output).
pub(crate) fn compiled(
    out: &std::process::Output,
    obj: &Path,
    what: String,
) -> Result<Vec<u8>, BuildError> {
    if out.status.success() {
        std::fs::read(obj).map_err(|e| BuildError::Io(format!("reading {}: {e}", obj.display())))
    } else {
        Err(BuildError::Compile(
            what,
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }
}

/// Run the compiler; returns the object's bytes, checked for nothing.
pub fn compile(
    source: &Path,
    includes: &[PathBuf],
    extra: &[String],
) -> Result<Vec<u8>, BuildError> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "gcc".into());
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = std::env::temp_dir().join(format!("lpvmm-kp-{}-{seq}", std::process::id()));
    let header_dir = tmp.join("include");
    std::fs::create_dir_all(header_dir.join("lpvmm"))
        .and_then(|_| std::fs::write(header_dir.join("lpvmm/patch.h"), PATCH_H))
        .map_err(|e| BuildError::Io(format!("writing lpvmm/patch.h to {}: {e}", tmp.display())))?;
    // The compiler's own freestanding headers (stddef.h, stdint.h, stdarg.h), not libc's.
    let gcc_include = Command::new(&cc)
        .arg("-print-file-name=include")
        .output()
        .map_err(|e| BuildError::NoCompiler(cc.clone(), e))?;
    let gcc_include = String::from_utf8_lossy(&gcc_include.stdout)
        .trim()
        .to_string();
    let obj = tmp.join("out.o");
    let mut cmd = Command::new(&cc);
    cmd.args(CFLAGS)
        .arg("-isystem")
        .arg(&gcc_include)
        .arg("-I")
        .arg(&header_dir);
    for i in includes {
        cmd.arg("-I").arg(i);
    }
    cmd.args(extra).arg("-o").arg(&obj).arg(source);
    let out = cmd
        .output()
        .map_err(|e| BuildError::NoCompiler(cc.clone(), e))?;
    let result = compiled(&out, &obj, format!("{cc} {}", source.display()));
    let _ = std::fs::remove_dir_all(&tmp);
    result
}
