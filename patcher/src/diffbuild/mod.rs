//! `lpvmm kp build --diff fix.patch --kernel RELEASE`: a live patch built from a source
//! diff, as kpatch-build and the kernel's klp-build make one, without building the
//! kernel: only the files the diff touches are compiled, before and after, in the
//! release's own source tree with its own config, compiler and kbuild ([`tree`]); the
//! differ ([`differ`]) finds the functions the change reached, and [`emit`] writes them
//! as an ordinary `.kp`, each reference to the rest of the kernel left for `lpvmm patch`
//! to resolve in the running guest. The release's objtool makes the result's unwind
//! table.
//!
//! Refused, each with its reason: a change to a header, an assembly file or any file
//! that is not C; a file the release does not build; a function in init or exit code; a
//! variable the kernel has given another initial value; a struct or union whose layout
//! changes, a global function whose prototype changes ([`layout`]); a static branch or
//! paravirt site the kernel would have to patch.

pub mod differ;
pub mod emit;
pub mod layout;
pub mod objfile;
pub mod tree;
pub mod unidiff;
pub mod why;

use std::path::{Path, PathBuf};

use crate::build::{write_checked, BuildError};
use crate::load::object::PatchObject;
use objfile::ObjFile;

#[derive(Debug, thiserror::Error)]
pub enum DiffBuildError {
    /// The diff itself (its form, or a hunk that does not apply).
    #[error("--diff: {0}")]
    Diff(#[from] unidiff::DiffError),
    /// What a live patch cannot carry, with why.
    #[error("--diff: refused: {0}")]
    Refused(String),
    /// The release's source tree: fetching, preparing.
    #[error("--diff: the release's source: {0}")]
    Source(String),
    /// The compiler or tools differ from the release's.
    #[error("--diff: {0}")]
    Toolchain(String),
    #[error("--diff: building {0} failed:\n{1}")]
    Compile(String, String),
    /// Reading or writing an object.
    #[error("--diff: {0}")]
    Object(String),
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// What a diff build was asked.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub diff: &'a Path,
    pub release: &'a str,
    /// A source tree to build in instead of Debian's `linux-source` of the release.
    pub source: Option<&'a Path>,
    pub output: &'a Path,
    /// The patch's name (default: the diff file's name).
    pub name: Option<&'a str>,
    /// `NAME` → `POS`: the `POS`-th kernel symbol `NAME` (in vmlinux, or in the module
    /// of the file), for a replaced function or a used symbol the kernel has more than
    /// once (`lpvmm sym VM NAME` lists them in order).
    pub sympos: std::collections::BTreeMap<String, u32>,
}

/// What a diff build made: the checked patch and, per file, what changed and why.
#[derive(Debug)]
pub struct Built {
    pub patch: PatchObject,
    pub report: Vec<String>,
}

/// One file of the diff, built both ways and compared.
struct FileResult {
    path: String,
    /// The file whose object this is, where it is not the file's own.
    through: Option<String>,
    after: ObjFile,
    plan: differ::Plan,
    module: Option<String>,
}

pub fn build(req: &Request<'_>) -> Result<Built, DiffBuildError> {
    let text = std::fs::read_to_string(req.diff)
        .map_err(|e| BuildError::Io(format!("reading {}: {e}", req.diff.display())))?;
    let files = unidiff::parse(&text)?;
    for f in &files {
        check_path(&f.path)?;
    }
    let tree = tree::prepare(req.release, req.source)?;
    let mut results = Vec::new();
    for f in &files {
        results.push(build_file(&tree, f)?);
    }
    let mut report = Vec::new();
    for r in &results {
        report.extend(describe(r));
    }
    if results.iter().all(|r| r.plan.carried.is_empty()) {
        return Err(DiffBuildError::Refused(
            "the change leaves every function's code as it is: nothing to patch".into(),
        ));
    }
    let parts: Vec<emit::Part<'_>> = results
        .iter()
        .filter(|r| !r.plan.carried.is_empty())
        .map(|r| emit::Part {
            after: &r.after,
            plan: &r.plan,
            module: r.module.as_deref(),
        })
        .collect();
    let name = patch_name(req)?;
    let meta = emit::Meta {
        name: &name,
        report: &report,
        sympos: &req.sympos,
    };
    let bytes = emit::write(&parts, &meta)?;
    let bytes = with_objtool(&tree, &bytes)?;
    let patch = write_checked(&bytes, req.output)?;
    Ok(Built { patch, report })
}

/// Refuse what a diff build cannot carry by its path alone.
fn check_path(path: &str) -> Result<(), DiffBuildError> {
    let refuse = |why: &str| Err(DiffBuildError::Refused(format!("{path}: {why}")));
    let name = path.rsplit('/').next().unwrap_or(path);
    if path.ends_with(".h") {
        return refuse(
            "a header: every object that includes it may change, and a change to a \
             header is often one to a data layout; move the change into the .c file",
        );
    }
    if path.ends_with(".S") || path.ends_with(".s") {
        return refuse(
            "assembly: its code has no fentry call to redirect and no compiler's \
             function boundaries; a live patch replaces C functions",
        );
    }
    if !path.ends_with(".c") {
        return refuse(&format!(
            "not a C file ({name}): only changes to C code are built into a live patch"
        ));
    }
    for (dir, why) in [
        (
            "/vdso/",
            "vDSO code runs in user space, from pages the kernel mapped at boot",
        ),
        ("arch/x86/boot/", "boot code ran before the kernel started"),
        (
            "arch/x86/realmode/",
            "real-mode code runs outside the kernel",
        ),
        ("arch/x86/purgatory/", "purgatory runs between kernels"),
    ] {
        if path.contains(dir) || path.starts_with(&dir[1..]) {
            return refuse(why);
        }
    }
    Ok(())
}

/// Build one file before and after, compare, plan.
fn build_file(tree: &tree::Tree, f: &unidiff::FileDiff) -> Result<FileResult, DiffBuildError> {
    let original = std::fs::read_to_string(tree.root.join(&f.path)).map_err(|e| {
        DiffBuildError::Refused(format!("{}: not in the release's source ({e})", f.path))
    })?;
    let changed = unidiff::apply(&original, f)?;
    let before = tree.build(&f.path, None)?;
    let after = tree.build(&f.path, Some(&changed))?;
    let b = ObjFile::parse(&before.bytes, &format!("{} (before)", f.path))?;
    let a = ObjFile::parse(&after.bytes, &format!("{} (after)", f.path))?;
    let (debug_b, debug_a) = (
        layout::Debug::load(&before.bytes)?,
        layout::Debug::load(&after.bytes)?,
    );
    layout::check(&debug_b, &debug_a, &f.path)?;
    layout::check_prototypes(&debug_b, &debug_a, &f.path)?;
    let c = differ::correlate(&a, &b);
    differ::check_data(&a, &b, &c).map_err(|e| in_file(&f.path, e))?;
    let mut carried = differ::carried(&a, &b, &c).map_err(|e| in_file(&f.path, e))?;
    explain(&mut carried, &debug_b, f)?;
    let plan = differ::plan(&a, &b, &c, carried).map_err(|e| in_file(&f.path, e))?;
    Ok(FileResult {
        path: f.path.clone(),
        through: after.through.clone(),
        after: a,
        plan,
        module: after.module,
    })
}

/// Say, of each function carried because its code differs, whether the diff changes its
/// source or that of a function it inlines.
fn explain(
    carried: &mut [differ::Carried],
    before: &layout::Debug,
    f: &unidiff::FileDiff,
) -> Result<(), DiffBuildError> {
    let functions = why::functions(before)?;
    let touched = why::touched(&functions, &f.path, &why::changed_lines(f));
    for c in carried
        .iter_mut()
        .filter(|c| c.reason == differ::Reason::Changed)
    {
        // `foo.isra.0` is `foo` in the debug info.
        let name = c.name.split('.').next().unwrap_or(&c.name);
        let inlined: Vec<String> = functions
            .get(name)
            .map(|d| d.inlines.intersection(&touched).cloned().collect())
            .unwrap_or_default();
        if touched.contains(name) {
            c.reason = differ::Reason::SourceChanged;
        } else if !inlined.is_empty() {
            c.reason = differ::Reason::Inlines(inlined);
        }
    }
    Ok(())
}

fn in_file(path: &str, e: DiffBuildError) -> DiffBuildError {
    match e {
        DiffBuildError::Refused(m) => DiffBuildError::Refused(format!("{path}: {m}")),
        other => other,
    }
}

/// The report's lines for one file: `fs/proc/cmdline.c: cmdline_proc_show replaces
/// cmdline_proc_show (its code differs ...)`.
fn describe(r: &FileResult) -> Vec<String> {
    let module = r.module.as_deref().unwrap_or("vmlinux");
    let object = match &r.through {
        Some(t) => format!("{module}, built in {t}"),
        None => module.to_string(),
    };
    if r.plan.carried.is_empty() {
        return vec![format!("{} ({object}): no function's code changed", r.path)];
    }
    r.plan
        .carried
        .iter()
        .map(|f| match &f.replaces {
            Some(old) => format!(
                "{} ({object}): {} replaces {old}: {}",
                r.path,
                emit::new_name(&f.name),
                f.reason
            ),
            None => format!(
                "{} ({object}): {} carried: {}",
                r.path,
                emit::new_name(&f.name),
                f.reason
            ),
        })
        .collect()
}

/// The patch's name: asked for, or the diff file's name without its extension, in the
/// characters a manifest allows.
fn patch_name(req: &Request<'_>) -> Result<String, DiffBuildError> {
    let name = match req.name {
        Some(n) => n.to_string(),
        None => req
            .diff
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "_-.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .take(64)
            .collect(),
    };
    if name.is_empty() {
        return Err(DiffBuildError::Refused(
            "the patch needs a name (--name)".into(),
        ));
    }
    Ok(name)
}

/// The patch object after the release's objtool has made its ORC table and the rest.
fn with_objtool(tree: &tree::Tree, bytes: &[u8]) -> Result<Vec<u8>, DiffBuildError> {
    let work: PathBuf = crate::kbuild::work_dir()?;
    let obj = work.join("lpvmm_diff.o");
    std::fs::write(&obj, bytes).map_err(|e| BuildError::Io(format!("{}: {e}", obj.display())))?;
    let result = tree.objtool(&obj).and_then(|()| {
        std::fs::read(&obj).map_err(|e| BuildError::Io(format!("{}: {e}", obj.display())).into())
    });
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// The report a diff build left in a patch object (`.lpvmm.diff`): what changed and why
/// each function is in it; `None` for a patch not built from a diff.
pub fn report_of(bytes: &[u8]) -> Option<Vec<String>> {
    use object::{Object, ObjectSection};
    let file = object::File::parse(bytes).ok()?;
    let data = file.section_by_name(emit::REPORT)?.data().ok()?;
    Some(
        data.split(|&b| b == 0)
            .filter(|l| !l.is_empty())
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect(),
    )
}

#[cfg(test)]
mod tests;
