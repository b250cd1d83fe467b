//! The differ on small C files compiled by gcc with the flags that matter (function and
//! data sections, fentry calls, kernel code model, debug info): what it carries, what it
//! leaves to the kernel, what it refuses, and that the object it writes is a patch.

use super::differ::{self, Reason};
use super::objfile::ObjFile;
use super::{emit, layout, DiffBuildError};

fn compile(src: &str) -> Vec<u8> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("lpvmm-differ-{}-{seq}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let c = dir.join("x.c");
    std::fs::write(&c, src).unwrap();
    let out = std::process::Command::new(std::env::var("CC").unwrap_or_else(|_| "gcc".into()))
        .args(crate::build::CFLAGS)
        .args([
            "-pg",
            "-mfentry",
            "-ffunction-sections",
            "-fdata-sections",
            "-g",
        ])
        .arg("-o")
        .arg(dir.join("x.o"))
        .arg(&c)
        .output()
        .expect("gcc");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(dir.join("x.o")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

struct Diffed {
    after: ObjFile,
    plan: differ::Plan,
}

fn diff_objects(before: &str, after: &str) -> Diffed {
    diff(before, after).expect("diff")
}

fn diff(before: &str, after: &str) -> Result<Diffed, DiffBuildError> {
    let (b, a) = (compile(before), compile(after));
    let (debug_b, debug_a) = (layout::Debug::load(&b)?, layout::Debug::load(&a)?);
    layout::check(&debug_b, &debug_a, "x.c")?;
    layout::check_prototypes(&debug_b, &debug_a, "x.c")?;
    let (b, a) = (ObjFile::parse(&b, "before")?, ObjFile::parse(&a, "after")?);
    let c = differ::correlate(&a, &b);
    differ::check_data(&a, &b, &c)?;
    let carried = differ::carried(&a, &b, &c)?;
    let plan = differ::plan(&a, &b, &c, carried)?;
    Ok(Diffed { after: a, plan })
}

impl Diffed {
    /// (name, replaces, reason) of each carried function, by name.
    fn carried(&self) -> Vec<(String, Option<String>, Reason)> {
        let mut v: Vec<_> = self
            .plan
            .carried
            .iter()
            .map(|f| (f.name.clone(), f.replaces.clone(), f.reason.clone()))
            .collect();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    }

    /// The kernel names the patch refers to.
    fn external(&self) -> Vec<String> {
        let mut v: Vec<String> = self.plan.external.values().cloned().collect();
        v.sort();
        v.dedup();
        v
    }
}

const BASE: &str = r#"
extern int printk(const char *fmt, ...);
static int hits;
int __attribute__((noinline)) shown(int x)
{
	static int count;
	count++;
	hits++;
	printk("shown %d\n", x);
	return x + count;
}
int __attribute__((noinline)) other(int x)
{
	static int count;
	count += x;
	printk("other %d\n", count);
	return count;
}
int caller(int x) { return shown(x) + 1; }
"#;

#[test]
fn only_the_changed_function_is_carried_and_the_rest_is_the_kernels() {
    let after = BASE.replace("return x + count;", "return x + count + 1;");
    let d = diff(BASE, &after).unwrap();
    assert_eq!(
        d.carried(),
        [("shown".into(), Some("shown".into()), Reason::Changed)]
    );
    // Its statics are the running kernel's, by the release's names; printk too is
    // left undefined (not in `external`, which lists the object's own symbols).
    let ext = d.external();
    assert!(ext.iter().any(|n| n.starts_with("count.")), "{ext:?}");
    assert!(ext.contains(&"hits".to_string()), "{ext:?}");
}

#[test]
fn a_new_string_above_and_renumbered_statics_change_no_other_function() {
    // A new function with its own string and static before the others: strings move
    // and `count.N` numbers shift, yet only the new function and its user are carried.
    let after = BASE
        .replace(
            "int __attribute__((noinline)) shown(int x)",
            "static int __attribute__((noinline)) extra(int x)\n{\n\tstatic int count;\n\tprintk(\"extra\\n\");\n\treturn x + ++count;\n}\nint __attribute__((noinline)) shown(int x)",
        )
        .replace("return x + count;", "return extra(x) + count;");
    let d = diff(BASE, &after).unwrap();
    let names: Vec<(String, Reason)> = d.carried().into_iter().map(|(n, _, r)| (n, r)).collect();
    assert_eq!(
        names,
        [
            ("extra".into(), Reason::New),
            ("shown".into(), Reason::Changed)
        ]
    );
    // shown's static is the kernel's (`count.N`, the release's number), extra's is new.
    let shown_count = d
        .external()
        .into_iter()
        .filter(|n| n.starts_with("count."))
        .count();
    assert_eq!(shown_count, 1);
}

#[test]
fn a_change_inlined_into_a_caller_carries_the_caller() {
    let before = r#"
extern int printk(const char *fmt, ...);
static inline int limit(int x) { return x > 10 ? 10 : x; }
int __attribute__((noinline)) clamp_show(int x) { printk("%d\n", limit(x)); return 0; }
int unrelated(int x) { return x * 3; }
"#;
    let after = before.replace("x > 10 ? 10 : x", "x > 20 ? 20 : x");
    let d = diff(before, &after).unwrap();
    assert_eq!(
        d.carried(),
        [(
            "clamp_show".into(),
            Some("clamp_show".into()),
            Reason::Changed
        )]
    );
}

#[test]
fn a_changed_initial_value_is_refused() {
    let after = BASE.replace("static int hits;", "static int hits = 5;");
    let e = diff(BASE, &after).err().expect("refused").to_string();
    assert!(
        e.contains("gives hits") && e.contains("initial value"),
        "{e}"
    );
}

#[test]
fn a_struct_layout_change_is_refused_naming_the_member() {
    let before = r#"
struct box { int a; int b; };
int __attribute__((noinline)) get(struct box *p) { return p->b; }
"#;
    let after = before.replace("int a; int b;", "int a; long extra; int b;");
    let e = diff(before, &after).err().expect("refused").to_string();
    assert!(e.contains("struct box") && e.contains("size 8 → 24"), "{e}");
    // The same size, members swapped: the first member that moved is named.
    let after = before.replace("int a; int b;", "int b; int a;");
    let e = diff(before, &after).err().expect("refused").to_string();
    assert!(
        e.contains("struct box differently (member a at 0 → 4)"),
        "{e}"
    );
}

#[test]
fn a_change_that_leaves_the_code_alike_carries_nothing() {
    let after = BASE.replace("int caller(int x)", "/* a comment */\nint caller(int x)");
    let d = diff(BASE, &after).unwrap();
    assert!(d.carried().is_empty(), "{:?}", d.carried());
}

#[test]
fn the_patch_object_names_what_it_replaces_and_parses_as_a_patch() {
    let after = BASE.replace("return x + count;", "return x + count + 1;");
    let d = diff(BASE, &after).unwrap();
    let part = emit::Part {
        after: &d.after,
        plan: &d.plan,
        module: Some("tun"),
    };
    let report = ["x.c (tun): shown replaces shown".to_string()];
    let none = Default::default();
    let meta = emit::Meta {
        name: "fix",
        report: &report,
        sympos: &none,
    };
    let bytes = emit::write(&[part], &meta).unwrap();
    let p = crate::load::object::PatchObject::parse(&bytes).unwrap();
    assert_eq!(p.manifest.name, "fix");
    let r: Vec<String> = p
        .manifest
        .replacements
        .iter()
        .map(|r| format!("{} -> {}", r.old, r.new))
        .collect();
    assert_eq!(r, ["tun:shown -> shown"]);
    assert_eq!(
        super::report_of(&bytes),
        Some(vec!["x.c (tun): shown replaces shown".to_string()])
    );
}

#[test]
fn paths_a_diff_build_cannot_carry_are_refused_with_why() {
    for (path, why) in [
        ("include/linux/sched.h", "a header"),
        ("arch/x86/entry/entry_64.S", "assembly"),
        ("fs/proc/Makefile", "not a C file"),
        ("arch/x86/entry/vdso/vma.c", "vDSO"),
        ("arch/x86/boot/main.c", "boot code"),
    ] {
        let e = super::check_path(path).unwrap_err().to_string();
        assert!(e.contains(path) && e.contains(why), "{e}");
    }
    assert!(super::check_path("fs/proc/cmdline.c").is_ok());
}

#[test]
fn a_caller_is_said_to_inline_the_function_whose_source_changed() {
    let before = "extern int printk(const char *fmt, ...);\nstatic inline int limit(int x)\n{\n\treturn x > 10 ? 10 : x;\n}\nint __attribute__((noinline)) clamp_show(int x)\n{\n\tprintk(\"%d\\n\", limit(x));\n\treturn 0;\n}\n";
    let diff = "--- a/x.c\n+++ b/x.c\n@@ -4 +4 @@\n-\treturn x > 10 ? 10 : x;\n+\treturn x > 20 ? 20 : x;\n";
    let f = &super::unidiff::parse(diff).unwrap()[0];
    let after = super::unidiff::apply(before, f).unwrap();
    let d = diff_objects(before, &after);
    let mut carried = d.plan.carried.clone();
    super::explain(
        &mut carried,
        &layout::Debug::load(&compile(before)).unwrap(),
        f,
    )
    .unwrap();
    let reasons: Vec<String> = carried
        .iter()
        .map(|c| format!("{}: {}", c.name, c.reason))
        .collect();
    assert_eq!(
        reasons,
        ["clamp_show: it inlines limit, whose source the diff changes"]
    );
}

#[test]
fn a_global_functions_new_prototype_is_refused_a_static_ones_is_not() {
    let before = "long __attribute__((noinline)) area(int w, int h) { return (long)w * h; }\nstatic int __attribute__((noinline)) twice(int x) { return 2 * x; }\nint user(int x) { return twice(x); }\n";
    let after = before.replace("area(int w, int h)", "area(long w, int h)");
    let e = diff(before, &after).err().expect("refused").to_string();
    assert!(
        e.contains(
            "makes global function area `long int(long int, int)`, it was `long int(int, int)`"
        ),
        "{e}"
    );
    // A static function's callers are all in the file: they change with it.
    let after = before
        .replace(
            "twice(int x) { return 2 * x; }",
            "twice(long x) { return 2 * x; }",
        )
        .replace("return twice(x);", "return twice((long)x + 1);");
    let d = diff(before, &after).unwrap();
    let names: Vec<String> = d.carried().into_iter().map(|(n, _, _)| n).collect();
    assert!(names.contains(&"user".to_string()), "{names:?}");
}

#[test]
fn positions_given_for_names_the_kernel_has_twice_reach_the_manifest() {
    let after = BASE.replace("return x + count;", "return x + count + 1;");
    let d = diff(BASE, &after).unwrap();
    let part = || emit::Part {
        after: &d.after,
        plan: &d.plan,
        module: None,
    };
    let sympos: std::collections::BTreeMap<String, u32> =
        [("shown".to_string(), 2), ("hits".to_string(), 3)].into();
    let meta = emit::Meta {
        name: "fix",
        report: &[],
        sympos: &sympos,
    };
    let p =
        crate::load::object::PatchObject::parse(&emit::write(&[part()], &meta).unwrap()).unwrap();
    let r = &p.manifest.replacements[0];
    assert_eq!((r.old.name.as_str(), r.old.pos), ("shown", Some(2)));
    let b: Vec<String> = p
        .manifest
        .bindings
        .iter()
        .map(|b| format!("{} {}", b.local, b.kernel))
        .collect();
    assert_eq!(b, ["__lpvmm_pos_hits hits,3"]);
    // A position for a name the patch does not use is an error, not ignored.
    let sympos = [("nosuch".to_string(), 1)].into();
    let meta = emit::Meta {
        name: "fix",
        report: &[],
        sympos: &sympos,
    };
    let e = emit::write(&[part()], &meta).unwrap_err().to_string();
    assert!(
        e.contains("--sympos nosuch: the patch neither replaces nor uses"),
        "{e}"
    );
}

#[test]
fn a_clone_gcc_made_is_replaced_under_the_releases_clone_name() {
    // gcc specializes `scale` for the constant k = 3 both callers pass: `scale.constprop.0`.
    let before = r#"
extern int printk(const char *fmt, ...);
static int __attribute__((noinline)) scale(int x, int k) { printk("scale\n"); return x * k + 1; }
int one(int x) { return scale(x, 3); }
int two(int x) { return scale(x + 1, 3); }
"#;
    let after = before.replace("return x * k + 1;", "return x * k + 2;");
    let d = diff(before, &after).unwrap();
    let carried = d.carried();
    assert_eq!(carried.len(), 1, "{carried:?}");
    let (name, replaces, _) = &carried[0];
    assert!(name.starts_with("scale.constprop."), "{carried:?}");
    assert_eq!(replaces.as_deref(), Some(name.as_str()));
    assert!(emit::new_name(name).starts_with("scale_constprop_"));
}
