//! `lpvmm kp build --kernel RELEASE foo.c` of a kernel livepatch module's source (one
//! that includes <linux/livepatch.h>): built as the guest kernel's own modules are,
//! into `foo.ko` (`make M=...  modules`: objtool, modpost and the module's
//! `struct module`, whose name is the patch's), with lpvmm's shadow-variable runtime
//! linked in, so that the module's `klp_shadow_*` calls have lpvmm's answer and not
//! the guest livepatch core's. modpost only warns about symbols no module exports
//! (lpvmm resolves them from the guest's kallsyms).

use std::path::Path;

use crate::build::{compiled, BuildError};
use crate::kbuild::{kernel_tree, make, work_dir};

/// The runtime's one file: lpvmm/shadow.h's functions under the kernel's names.
fn runtime_source(module: &str) -> String {
    let mut c = String::from(
        "// lpvmm's shadow-variable runtime, under the kernel livepatch's names.\n\
         #include <lpvmm/shadow.h>\n",
    );
    for n in [
        "ctor_t",
        "dtor_t",
        "get",
        "alloc",
        "get_or_alloc",
        "free",
        "free_all",
    ] {
        c += &format!("#undef klp_shadow_{n}\n");
    }
    c += &format!(
        "static const char *__lpvmm_patch_name(void) {{ return \"{module}\"; }}\n\
         void *klp_shadow_get(void *obj, unsigned long id)\n\
         {{ return lpvmm_shadow_get(obj, id); }}\n\
         void *klp_shadow_alloc(void *obj, unsigned long id, size_t size, gfp_t gfp,\n\
         \t\t       lpvmm_shadow_ctor_t ctor, void *data)\n\
         {{ return lpvmm_shadow_alloc(obj, id, size, gfp, ctor, data); }}\n\
         void *klp_shadow_get_or_alloc(void *obj, unsigned long id, size_t size, gfp_t gfp,\n\
         \t\t\t      lpvmm_shadow_ctor_t ctor, void *data)\n\
         {{ return lpvmm_shadow_get_or_alloc(obj, id, size, gfp, ctor, data); }}\n\
         void klp_shadow_free(void *obj, unsigned long id, lpvmm_shadow_dtor_t dtor)\n\
         {{ lpvmm_shadow_free(obj, id, dtor); }}\n\
         void klp_shadow_free_all(unsigned long id, lpvmm_shadow_dtor_t dtor)\n\
         {{ lpvmm_shadow_free_all(id, dtor); }}\n"
    );
    c
}

/// Whether `source` is a livepatch module's: it includes <linux/livepatch.h>.
pub fn is_livepatch_source(source: &Path) -> bool {
    std::fs::read_to_string(source).is_ok_and(|s| s.contains("<linux/livepatch.h>"))
}

/// The module name kbuild gives `source` (`livepatch-sample.c`: `livepatch_sample`).
pub fn module_name(source: &Path) -> Result<String, BuildError> {
    let stem = source
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        })
        .ok_or_else(|| {
            BuildError::Io(format!(
                "{}: a module's file name is letters, digits, '-' and '_'",
                source.display()
            ))
        })?;
    Ok(stem.replace('-', "_"))
}

/// Build the livepatch module `source` for `release`: the `.ko`'s bytes and its name.
pub fn compile(
    source: &Path,
    release: &str,
    extra: &[String],
) -> Result<(Vec<u8>, String), BuildError> {
    build_module(source, release, extra, true)
}

/// Build `source` as an ordinary module of `release` (a livepatch's target, for a
/// guest to load), as kbuild would: the `.ko`'s bytes and its name.
pub fn compile_module(source: &Path, release: &str) -> Result<(Vec<u8>, String), BuildError> {
    build_module(source, release, &[], false)
}

fn build_module(
    source: &Path,
    release: &str,
    extra: &[String],
    runtime: bool,
) -> Result<(Vec<u8>, String), BuildError> {
    let tree = kernel_tree(release)?;
    let name = module_name(source)?;
    let work = work_dir()?;
    let io = |e: std::io::Error| BuildError::Io(format!("{}: {e}", work.display()));
    std::fs::copy(source, work.join(format!("{name}_main.c")))
        .map_err(|e| BuildError::Io(format!("reading {}: {e}", source.display())))?;
    let mut objs = format!("{name}_main.o");
    if runtime {
        std::fs::write(work.join("lpvmm_klp_shadow.c"), runtime_source(&name)).map_err(io)?;
        objs += " lpvmm_klp_shadow.o";
    }
    std::fs::write(
        work.join("Kbuild"),
        format!(
            "obj-m := {name}.o\n{name}-y := {objs}\n{}",
            crate::kbuild::KBUILD_FLAGS
        ),
    )
    .map_err(io)?;
    let out = make(&tree, &work, "modules", extra, &["KBUILD_MODPOST_WARN=1"])?;
    let result = compiled(
        &out,
        &work.join(format!("{name}.ko")),
        format!(
            "kbuild of the livepatch module {} for {release}",
            source.display()
        ),
    );
    let _ = std::fs::remove_dir_all(&work);
    Ok((result?, name))
}
