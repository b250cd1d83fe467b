//! The engine over synthetic kernels, with patches built by gcc through `kp build`.

use std::path::PathBuf;

use introspection::kernel::Kernel;
use introspection::synth::{SynthGuest, SynthKernel, SynthKernelSpec};
use introspection::PausedGuest;

use crate::engine::{Engine, Op, PatchState};
use crate::site::FENTRY_NOP;
use crate::KpError;

struct Fixture {
    sk: SynthKernel,
    kernel: Kernel,
    engine: Engine,
}

fn fixture() -> Fixture {
    let sk = SynthKernel::build(SynthKernelSpec::v6_12());
    let kernel = Kernel::attach(&sk.guest).expect("attach");
    Fixture {
        sk,
        kernel,
        engine: Engine::new(),
    }
}

/// Build C source into a .kp with `lpvmm kp build`'s flags (and `extra`).
fn kp(source: &str, extra: &[&str]) -> Vec<u8> {
    try_kp(source, extra).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn kp_build_refuses_what_load_would_refuse() {
    let dir = std::env::temp_dir().join(format!("lpvmm-kpbuild-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (good, bad) = (dir.join("good.c"), dir.join("bad.c"));
    std::fs::write(&good, CMDLINE).unwrap();
    std::fs::write(&bad, "int f(void) { return 0; }\n").unwrap();
    let p = crate::build::build(&good, &dir.join("good.kp"), &[], &[]).unwrap();
    assert_eq!(p.manifest.name, "cmdline");
    assert!(std::fs::read(dir.join("good.kp"))
        .unwrap()
        .starts_with(b"\x7fELF"));
    let e = crate::build::build(&bad, &dir.join("bad.kp"), &[], &[]).unwrap_err();
    assert!(e.to_string().contains("no .lpvmm.manifest"), "{e}");
    assert!(!dir.join("bad.kp").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The compiler's output, not checked (for patches that must be refused at load).
fn try_kp(source: &str, extra: &[&str]) -> Result<Vec<u8>, crate::build::BuildError> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("lpvmm-patcher-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src: PathBuf = dir.join("p.c");
    std::fs::write(&src, source).unwrap();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let r = crate::build::compile(&src, &[], &extra);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

const CMDLINE: &str = r#"
#include <lpvmm/patch.h>
struct seq_file;
extern int seq_printf(struct seq_file *m, const char *fmt, ...);
static int counter;
int new_cmdline_proc_show(struct seq_file *m, void *v)
{
	counter++;
	seq_printf(m, "%s\n", "this has been live patched");
	return 0;
}
LPVMM_PATCH("cmdline");
LPVMM_REPLACE(cmdline_proc_show, new_cmdline_proc_show);
"#;

fn patch_named(name: &str, target: &str) -> Vec<u8> {
    kp(
        &format!(
            "#include <lpvmm/patch.h>\nint nf_{name}(void) {{ return 42; }}\nLPVMM_PATCH(\"{name}\");\nLPVMM_REPLACE({target}, nf_{name});\n"
        ),
        &[],
    )
}

fn site_bytes(f: &Fixture, g: &SynthGuest, func: &str) -> [u8; 5] {
    let m = f.kernel.memory(g);
    m.read_vec(f.sk.function(func), 5)
        .unwrap()
        .try_into()
        .unwrap()
}

fn enable(f: &mut Fixture, g: &mut SynthGuest, name: &str) -> Result<(), String> {
    let plan = f.engine.plan_enable(name).map_err(|e| e.to_string())?;
    let (blockers, _) = f.engine.blockers(g, &f.kernel, &plan).unwrap();
    if !blockers.is_empty() {
        return Err(format!(
            "blocked: {:?}",
            blockers
                .iter()
                .map(|b| (&b.comm, &b.reason))
                .collect::<Vec<_>>()
        ));
    }
    f.engine.apply(g, &plan).map_err(|e| e.to_string())
}

fn disable(f: &mut Fixture, g: &mut SynthGuest, name: &str) -> Result<(), String> {
    let plan = f.engine.plan_disable(name).map_err(|e| e.to_string())?;
    let (blockers, _) = f.engine.blockers(g, &f.kernel, &plan).unwrap();
    if !blockers.is_empty() {
        return Err(format!("blocked: {blockers:?}"));
    }
    f.engine.apply(g, &plan).map_err(|e| e.to_string())
}

#[test]
fn load_links_against_kallsyms_and_enable_disable_restore_exact_bytes() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let text_before = {
        let m = f.kernel.memory(&g);
        let t = f.kernel.addrs.text;
        m.read_vec(t.start, (t.end - t.start) as usize).unwrap()
    };
    let name = f.engine.load(&mut g, &f.kernel, &kp(CMDLINE, &[])).unwrap();
    assert_eq!(name, "cmdline");
    let p = f.engine.patch("cmdline").unwrap().clone();
    assert_eq!(p.state, PatchState::Disabled);
    let func = &p.funcs[0];
    assert!(func.frame_pointer, "kp build keeps frame pointers");
    assert_eq!(
        site_bytes(&f, &g, "cmdline_proc_show"),
        FENTRY_NOP,
        "load alone redirects nothing"
    );
    // The call to seq_printf was relocated to the kernel's seq_printf, through the new
    // mapping of the patch area.
    let m = f.kernel.memory(&g);
    let code = m.read_vec(func.new_addr, func.new_size as usize).unwrap();
    let mut d =
        iced_x86::Decoder::with_ip(64, &code, func.new_addr, iced_x86::DecoderOptions::NONE);
    let targets: Vec<u64> = d.iter().map(|i| i.near_branch_target()).collect();
    assert!(
        targets.contains(&f.sk.function("seq_printf")),
        "{targets:x?}"
    );
    assert!(p
        .imports
        .iter()
        .any(|(n, a)| n == "seq_printf" && *a == f.sk.function("seq_printf")));

    enable(&mut f, &mut g, "cmdline").unwrap();
    let site = site_bytes(&f, &g, "cmdline_proc_show");
    assert_eq!(site[0], 0xe9);
    let rel = i32::from_le_bytes(site[1..5].try_into().unwrap());
    assert_eq!(
        (f.sk.function("cmdline_proc_show") as i64 + 5 + i64::from(rel)) as u64,
        func.new_addr
    );
    disable(&mut f, &mut g, "cmdline").unwrap();
    let m = f.kernel.memory(&g);
    let t = f.kernel.addrs.text;
    assert_eq!(
        m.read_vec(t.start, (t.end - t.start) as usize).unwrap(),
        text_before
    );
    // Enable again after disable, then unload.
    enable(&mut f, &mut g, "cmdline").unwrap();
    disable(&mut f, &mut g, "cmdline").unwrap();
    f.engine.unload(&mut g, "cmdline").unwrap();
    assert!(f.engine.patches().is_empty());
}

#[test]
fn a_task_inside_the_old_function_blocks_and_is_named() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    f.engine
        .load(&mut g, &f.kernel, &patch_named("pipefix", "pipe_read"))
        .unwrap();
    let plan = f.engine.plan_enable("pipefix").unwrap();
    let (blockers, tasks) = f.engine.blockers(&g, &f.kernel, &plan).unwrap();
    assert!(tasks >= 8);
    let mut who: Vec<(i32, &str)> = blockers
        .iter()
        .map(|b| (b.pid, b.reason.as_str()))
        .collect();
    who.sort();
    assert_eq!(
        who,
        [
            (11, "pipe_read is on its stack"),
            (12, "pipe_read is on its stack")
        ]
    );
    assert!(blockers[0]
        .trace
        .frames
        .iter()
        .any(|fr| fr.function.as_deref() == Some("pipe_read")));
}

#[test]
fn versions_stack_and_disable_out_of_order_is_refused() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    f.engine
        .load(&mut g, &f.kernel, &patch_named("a", "meminfo_proc_show"))
        .unwrap();
    f.engine
        .load(&mut g, &f.kernel, &patch_named("b", "meminfo_proc_show"))
        .unwrap();
    enable(&mut f, &mut g, "a").unwrap();
    enable(&mut f, &mut g, "b").unwrap();
    let b_addr = f.engine.patch("b").unwrap().funcs[0].new_addr;
    let a_addr = f.engine.patch("a").unwrap().funcs[0].new_addr;
    let target = |f: &Fixture, g: &SynthGuest| {
        let s = site_bytes(f, g, "meminfo_proc_show");
        (f.sk.function("meminfo_proc_show") as i64
            + 5
            + i64::from(i32::from_le_bytes(s[1..5].try_into().unwrap()))) as u64
    };
    assert_eq!(target(&f, &g), b_addr);
    let e = disable(&mut f, &mut g, "a").unwrap_err();
    assert!(e.contains("newer version from patch 'b'"), "{e}");
    disable(&mut f, &mut g, "b").unwrap();
    assert_eq!(
        target(&f, &g),
        a_addr,
        "disabling the top re-exposes the version below"
    );
    disable(&mut f, &mut g, "a").unwrap();
    assert_eq!(site_bytes(&f, &g, "meminfo_proc_show"), FENTRY_NOP);
}

#[test]
fn dependencies_are_enforced_both_ways() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let dep = kp(
        "#include <lpvmm/patch.h>\nint nf(void) { return 1; }\nLPVMM_PATCH(\"top\");\nLPVMM_DEPENDS(\"base\");\nLPVMM_REPLACE(meminfo_proc_show, nf);\n",
        &[],
    );
    assert!(matches!(
        f.engine.load(&mut g, &f.kernel, &dep),
        Err(KpError::Dependency(_))
    ));
    f.engine
        .load(&mut g, &f.kernel, &patch_named("base", "cmdline_proc_show"))
        .unwrap();
    f.engine.load(&mut g, &f.kernel, &dep).unwrap();
    assert!(enable(&mut f, &mut g, "top")
        .unwrap_err()
        .contains("not enabled"));
    enable(&mut f, &mut g, "base").unwrap();
    enable(&mut f, &mut g, "top").unwrap();
    assert!(disable(&mut f, &mut g, "base")
        .unwrap_err()
        .contains("depends on 'base'"));
    let _ = Op::Enable;
}

/// Every bad input is refused with a message naming the problem, before any byte of
/// guest memory changes.
#[test]
fn bad_patches_are_refused_before_any_guest_byte_changes() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    f.engine.load(&mut g, &f.kernel, &kp(CMDLINE, &[])).unwrap();
    let good = kp(CMDLINE, &[]);
    let mut wrong_machine = good.clone();
    wrong_machine[18] = 0xb7; // e_machine = EM_AARCH64
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not ELF", b"#!/bin/sh\necho hi\n".to_vec(), "not an ELF object"),
        ("truncated", good[..good.len() / 3].to_vec(), ""),
        ("wrong machine", wrong_machine, "wrong machine"),
        (
            "no manifest",
            kp("int f(void) { return 0; }\n", &[]),
            "no .lpvmm.manifest",
        ),
        ("name already loaded", good.clone(), "already loaded"),
        (
            "unknown symbol",
            kp("#include <lpvmm/patch.h>\nextern int no_such_kernel_fn(void);\nint nf(void) { return no_such_kernel_fn(); }\nLPVMM_PATCH(\"u\");\nLPVMM_REPLACE(meminfo_proc_show, nf);\n", &[]),
            "unknown symbol 'no_such_kernel_fn'",
        ),
        (
            "ambiguous static symbol",
            kp("#include <lpvmm/patch.h>\nextern int helper(void);\nint nf(void) { return helper() + 1; }\nLPVMM_PATCH(\"amb\");\nLPVMM_REPLACE(meminfo_proc_show, nf);\n", &[]),
            "ambiguous",
        ),
        (
            "unknown target",
            patch_named("t", "no_such_function"),
            "unknown symbol 'no_such_function'",
        ),
        (
            "unsupported relocation",
            kp("#include <lpvmm/patch.h>\nextern int seq_printf;\nint nf(void) { return seq_printf; }\nLPVMM_PATCH(\"pic\");\nLPVMM_REPLACE(meminfo_proc_show, nf);\n", &["-fpic", "-mcmodel=small"]),
            "R_X86_64_REX_GOTPCRELX",
        ),
        (
            "special section",
            kp("#include <lpvmm/patch.h>\nint nf(void) { asm volatile(\"1: nop\\n.pushsection __ex_table,\\\"a\\\"\\n.long 1b - .\\n.popsection\"); return 0; }\nLPVMM_PATCH(\"ex\");\nLPVMM_REPLACE(meminfo_proc_show, nf);\n", &[]),
            "__ex_table",
        ),
        (
            "target without fentry NOP",
            patch_named("nf", "no_fentry"),
            "not an fentry NOP",
        ),
        (
            "rel32 out of range",
            kp("#include <lpvmm/patch.h>\nextern void far_away(void);\nint nf(void) { far_away(); return 1; }\nLPVMM_PATCH(\"far\");\nLPVMM_SYMBOL(far_away, runqueues, 1);\nLPVMM_REPLACE(meminfo_proc_show, nf);\n", &[]),
            "does not fit in 32 bits",
        ),
        (
            "patch area full",
            kp("#include <lpvmm/patch.h>\nchar big[8 << 20];\nint nf(void) { return big[12345]; }\nLPVMM_PATCH(\"big\");\nLPVMM_REPLACE(meminfo_proc_show, nf);\n", &[]),
            "patch area full",
        ),
        (
            "atomic replace (not yet)",
            kp("#include <lpvmm/patch.h>\nint nf(void) { return 0; }\nLPVMM_PATCH(\"r\");\nLPVMM_ATOMIC_REPLACE();\nLPVMM_REPLACE(meminfo_proc_show, nf);\n", &[]),
            "atomic replace",
        ),
    ];
    for (what, bytes, want) in cases {
        let before = g.ram.clone();
        let e = f
            .engine
            .load(&mut g, &f.kernel, &bytes)
            .expect_err(what)
            .to_string();
        assert!(e.contains(want), "{what}: {e}");
        assert!(g.ram == before, "{what}: guest memory changed");
    }
    assert_eq!(f.engine.patches().len(), 1);
}

/// A fuzz target on the .kp parser: mutated and truncated objects never panic.
#[test]
fn kp_parser_fuzz() {
    let seeds = [kp(CMDLINE, &[]), patch_named("fz", "meminfo_proc_show")];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rng = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut cases = 0u32;
    let mut accepted = 0u32;
    for seed in &seeds {
        for _ in 0..4000 {
            let mut b = seed.clone();
            match rng() % 4 {
                0 => b.truncate((rng() % b.len() as u64) as usize),
                1 => {
                    for _ in 0..1 + rng() % 8 {
                        let i = (rng() % b.len() as u64) as usize;
                        b[i] = rng() as u8;
                    }
                }
                2 => {
                    // ELF header and section header fields: sizes, offsets, counts.
                    let i = (rng() % 64.min(b.len() as u64)) as usize;
                    b[i] = rng() as u8;
                }
                _ => {
                    let i = (rng() % b.len() as u64) as usize & !7;
                    if i + 8 <= b.len() {
                        b[i..i + 8].copy_from_slice(&(rng() >> (rng() % 64)).to_le_bytes());
                    }
                }
            }
            if crate::object::PatchObject::parse(&b).is_ok() {
                accepted += 1;
            }
            cases += 1;
        }
    }
    eprintln!("kp parser fuzz: {cases} cases, {accepted} still parsed");
    assert_eq!(cases, 8000);
}

#[test]
fn guest_memory_errors_do_not_panic() {
    let f = fixture();
    let mut g = f.sk.guest.clone();
    g.patch_area = introspection::PhysRange {
        start: 0x7000_0000,
        size: 4 << 20,
    };
    let mut e = Engine::new();
    let r = e.load(&mut g, &f.kernel, &kp(CMDLINE, &[]));
    assert!(r.is_err());
    assert!(e.patches().is_empty());
    let _ = g.vcpu_count();
}

/// Returns become what the kernel made of its own (`apply_returns`): `ret`, or a jump to
/// the selected thunk.
#[test]
fn return_thunk_jumps_follow_the_kernels_choice() {
    use crate::link::{link, Placement, Returns};
    let obj = crate::object::PatchObject::parse(&kp(CMDLINE, &[])).unwrap();
    let at = Placement {
        code: 0xffff_ffff_a000_0000,
        rodata: 0xffff_ffff_a010_0000,
        data: 0xffff_ffff_a020_0000,
    };
    let resolve = |_: &str| Ok(0xffff_ffff_8100_1000u64);
    let f = obj.function("new_cmdline_proc_show").unwrap();
    let tail = |l: &crate::link::Linked| {
        let end = (f.offset + f.size) as usize;
        l.code.bytes[end - 5..end].to_vec()
    };
    let ret = link(&obj, at, Returns::Ret, &resolve).unwrap();
    assert_eq!(tail(&ret), [0xc3, 0xcc, 0xcc, 0xcc, 0xcc]);
    let thunk = 0xffff_ffff_8200_0000u64;
    let jmp = link(&obj, at, Returns::Jump(thunk), &resolve).unwrap();
    let t = tail(&jmp);
    let site = at.code + f.offset + f.size - 5;
    let rel = i32::from_le_bytes(t[1..5].try_into().unwrap());
    assert_eq!(
        (t[0], (site as i64 + 5 + i64::from(rel)) as u64),
        (0xe9, thunk)
    );
}
