//! A livepatch module's description read from an object gcc builds here, with structs
//! laid out as the test's [`KlpLayout`] says (the real kernel's are read from its BTF;
//! the kbuild suite applies the kernel's own samples).

use introspection::layout::KlpLayout;

use crate::load::manifest::CallbackKind;
use crate::PatchObject;

/// The test kernel's layout of the structs: every field 8 bytes, in order.
const LAYOUT: KlpLayout = introspection::synth::KLP_LAYOUT;

const MODULE: &str = r#"
struct klp_func { const char *old_name; void *new_func; unsigned long old_sympos; };
struct klp_object { const char *name; struct klp_func *funcs; void *cb[4]; void *mod; };
struct klp_state { unsigned long id; unsigned long version; };
struct klp_patch { void *mod; struct klp_object *objs; struct klp_state *states; unsigned long replace; };
struct kernel_param { const char *name; void *mod; const void *ops; unsigned long perm; void *arg; };
struct module { char name[64]; };
extern const int param_ops_int;
struct module __this_module __attribute__((section(".gnu.linkonce.this_module")));
static const char info[] __attribute__((section(".modinfo"), used)) =
    "livepatch=Y\0name=test_klp";

static int pre_ret;
static const struct kernel_param __param_pre_ret __attribute__((section("__param"), used)) =
    { "pre_ret", &__this_module, &param_ops_int, 0644, &pre_ret };

int new_meminfo(void *m) { return pre_ret; }
int new_tun_show(void *m, void *f) { return 1; }
int pre(struct klp_object *obj) { return pre_ret; }
void post(struct klp_object *obj) { }

static struct klp_func vmlinux_funcs[] = { { "meminfo_proc_show", new_meminfo, 0 }, { } };
static struct klp_func tun_funcs[] = { { "tun_chr_show_fdinfo", new_tun_show, 2 }, { } };
static struct klp_func none[] = { { } };
static struct klp_object objs[] = {
    { 0, vmlinux_funcs, { pre, post, 0, post } },
    { "tun", tun_funcs },
    { "dummy", none, { 0, post } },
    { }
};
static struct klp_state states[] = { { 7, 2 }, { } };
static struct klp_patch patch = { &__this_module, objs, states, 1 };
int __attribute__((section(".init.text"))) init_module(void) { extern int klp_enable_patch(void *); return klp_enable_patch(&patch); }
"#;

#[test]
fn a_livepatch_modules_klp_patch_becomes_its_manifest() {
    let ko = crate::tests::kp(MODULE, &[]);
    let p = PatchObject::parse_livepatch(&ko, &LAYOUT, &[]).unwrap();
    let m = &p.manifest;
    assert_eq!(m.name, "test_klp");
    let r: Vec<String> = m
        .replacements
        .iter()
        .map(|r| format!("{} -> {}", r.old, r.new))
        .collect();
    assert_eq!(
        r,
        [
            "meminfo_proc_show -> new_meminfo",
            "tun:tun_chr_show_fdinfo,2 -> new_tun_show"
        ]
    );
    let cb: Vec<(Option<&str>, CallbackKind, &str)> = m
        .callbacks
        .iter()
        .map(|c| (c.object.as_deref(), c.kind, c.func.as_str()))
        .collect();
    assert_eq!(
        cb,
        [
            (None, CallbackKind::PrePatch, "pre"),
            (None, CallbackKind::PostPatch, "post"),
            (None, CallbackKind::PostUnpatch, "post"),
            (Some("dummy"), CallbackKind::PostPatch, "post"),
        ]
    );
    assert_eq!(
        m.modules(),
        ["tun", "dummy"],
        "dummy: callbacks and no function"
    );
    assert!(m.atomic_replace);
    assert_eq!((m.states[0].id, m.states[0].version), (7, 2));
    assert!(
        !p.imports.contains(&"klp_enable_patch".to_string()),
        "init is not loaded"
    );
    let objects: Vec<Option<&str>> = p
        .klp
        .as_ref()
        .unwrap()
        .objects
        .iter()
        .map(|o| o.0.as_deref())
        .collect();
    assert_eq!(objects, [None, Some("tun"), Some("dummy")]);
}

#[test]
fn parameters_are_set_in_the_modules_data_and_checked() {
    let ko = crate::tests::kp(MODULE, &[]);
    let p = PatchObject::parse_livepatch(&ko, &LAYOUT, &["pre_ret=-19".into()]).unwrap();
    // pre_ret, zero-filled before, now holds -19 in the module's own data.
    let held = p
        .sections
        .iter()
        .any(|s| s.bytes.windows(4).any(|w| w == (-19i32).to_le_bytes()));
    assert!(held, "pre_ret=-19 written into the module's data");
    for (given, want) in [
        (
            "frobnicate=1",
            "no parameter 'frobnicate' (it has: pre_ret)",
        ),
        ("pre_ret=x", "'x' is not a value of pre_ret"),
        ("pre_ret", "want NAME=VALUE"),
    ] {
        let e = PatchObject::parse_livepatch(&ko, &LAYOUT, &[given.into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{given}: {e}");
    }
}

#[test]
fn an_object_without_klp_patch_or_modinfo_is_refused() {
    let plain = crate::tests::kp(
        "int f(void) { return 0; }\nstatic const char i[] __attribute__((section(\".modinfo\"), used)) = \"livepatch=Y\\0name=x\";\nstruct module { char n[64]; } __this_module __attribute__((section(\".gnu.linkonce.this_module\")));\n",
        &[],
    );
    let e = PatchObject::parse_livepatch(&plain, &LAYOUT, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("no struct klp_patch"), "{e}");
    let none = crate::tests::kp("int f(void) { return 0; }\n", &[]);
    let e = PatchObject::parse_livepatch(&none, &LAYOUT, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("nor a kernel livepatch module"), "{e}");
}

#[test]
fn a_module_calling_the_kernels_shadow_api_is_refused() {
    let src = MODULE.replace(
        "int new_tun_show(void *m, void *f) { return 1; }",
        "extern void *klp_shadow_get(void *o, unsigned long id);\nint new_tun_show(void *m, void *f) { return klp_shadow_get(m, 1) != 0; }",
    );
    let ko = crate::tests::kp(&src, &[]);
    let e = PatchObject::parse_livepatch(&ko, &LAYOUT, &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("calls klp_shadow_get") && e.contains("kp build --kernel"),
        "{e}"
    );
}

#[test]
fn a_module_with_per_cpu_data_is_refused_naming_the_function() {
    let src = MODULE.replace(
        "int new_tun_show(void *m, void *f) { return 1; }",
        "static unsigned long reads __attribute__((section(\".data..percpu\")));\nint new_tun_show(void *m, void *f) { return ++reads; }",
    );
    let ko = crate::tests::kp(&src, &[]);
    let e = PatchObject::parse_livepatch(&ko, &LAYOUT, &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("section .data..percpu (needed by new_tun_show)"),
        "{e}"
    );
}
