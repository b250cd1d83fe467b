//! The engine over synthetic kernels, with patches built by gcc through `kp build`.

use std::path::PathBuf;

use introspection::kernel::Kernel;
use introspection::synth::{SynthGuest, SynthKernel, SynthKernelSpec};
use introspection::{GuestRam, PausedGuest};

use crate::engine::{Begin, Engine};
use crate::funcs::site::FENTRY_NOP;
use crate::patch::PatchState;
use crate::transition::{Consistency, Op, Outcome, Phase, Request, Transition};
use crate::{GuestWriter, KpError};

impl GuestWriter for SynthGuest {
    fn write_phys(&mut self, addr: u64, data: &[u8]) -> Result<(), introspection::GuestError> {
        SynthGuest::write_phys(self, addr, data)
    }
    fn reader(&self) -> &dyn PausedGuest {
        self
    }
}

/// The doorbell the tests' engines are given.
const BELL: crate::notifier::Doorbell = crate::notifier::Doorbell {
    port: 0x7e0,
    token: 0x5eed_1234_abcd_0042,
};

struct Fixture {
    sk: SynthKernel,
    kernel: Kernel,
    engine: Engine,
    /// The engine's clock, ms.
    now: u64,
}

fn fixture() -> Fixture {
    let sk = SynthKernel::build(SynthKernelSpec::v6_12());
    let kernel = Kernel::attach(&sk.guest).expect("attach");
    let mut engine = Engine::new();
    engine.set_doorbell(BELL);
    Fixture {
        sk,
        kernel,
        engine,
        now: 0,
    }
}

/// Build C source into a .kp with `lpvmm kp build`'s flags (and `extra`).
pub(crate) fn kp(source: &str, extra: &[&str]) -> Vec<u8> {
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

/// Start a transition and tick it (at most `ticks` times, 1 s apart) until it ends or
/// stops being pending; returns it as it stands.
fn run(
    f: &mut Fixture,
    g: &mut SynthGuest,
    name: &str,
    op: Op,
    consistency: Consistency,
    ticks: u32,
) -> Result<Transition, String> {
    f.engine
        .begin(
            Begin {
                patch: name.into(),
                op,
                consistency,
                timeout: None,
                unload_on_failure: false,
            },
            f.now,
        )
        .map_err(|e| e.to_string())?;
    tick(f, g, ticks)
}

/// Tick the transition in progress up to `ticks` times, or until it ends.
fn tick(f: &mut Fixture, g: &mut SynthGuest, ticks: u32) -> Result<Transition, String> {
    for _ in 0..ticks {
        f.now += 1000;
        f.engine.tick(g, &f.kernel, f.now);
        if f.engine.active().is_none() {
            break;
        }
    }
    Ok(match f.engine.active() {
        Some(t) => t.clone(),
        None => f.engine.history().last().cloned().ok_or("no transition")?,
    })
}

fn enable(f: &mut Fixture, g: &mut SynthGuest, name: &str) -> Result<(), String> {
    done(run(f, g, name, Op::Enable, Consistency::Immediate, 1)?)
}

fn disable(f: &mut Fixture, g: &mut SynthGuest, name: &str) -> Result<(), String> {
    done(run(f, g, name, Op::Disable, Consistency::Immediate, 1)?)
}

fn done(t: Transition) -> Result<(), String> {
    match t.outcome {
        Outcome::Done => Ok(()),
        _ => {
            let who: Vec<_> = t.blockers.iter().map(|b| (&b.comm, &b.reason)).collect();
            Err(format!("{:?}: blocked: {who:?}", t.outcome))
        }
    }
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
    let func = &p.funcs().next().unwrap();
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
        .any(|i| i.name == "seq_printf" && i.addr == f.sk.function("seq_printf")));

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
    f.engine.unload(&mut g, &f.kernel, "cmdline").unwrap();
    assert!(f.engine.patches().is_empty());
}

#[test]
fn a_task_inside_the_old_function_blocks_and_is_named() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    f.engine
        .load(&mut g, &f.kernel, &patch_named("pipefix", "pipe_read"))
        .unwrap();
    let t = run(
        &mut f,
        &mut g,
        "pipefix",
        Op::Enable,
        Consistency::Immediate,
        1,
    )
    .unwrap();
    let (blockers, tasks) = (t.blockers.clone(), t.tasks);
    assert_eq!(
        t.outcome,
        Outcome::Pending,
        "immediate: nothing changes while blocked"
    );
    assert_eq!(site_bytes(&f, &g, "pipe_read"), FENTRY_NOP);
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
    // Its timeout passes: the transition gives up, the guest as it was.
    f.engine.request(Request::Reverse).unwrap();
    let t = tick(&mut f, &mut g, 1).unwrap();
    assert_eq!(t.outcome, Outcome::Reversed);
    assert_eq!(site_bytes(&f, &g, "pipe_read"), FENTRY_NOP);
}

/// A replacement of `target` in a patch with `extra` manifest lines.
fn patch_with(name: &str, target: &str, extra: &str) -> Vec<u8> {
    kp(
        &format!(
            "#include <lpvmm/patch.h>\nint nf_{name}(void) {{ return 42; }}\nLPVMM_PATCH(\"{name}\");\nLPVMM_REPLACE({target}, nf_{name});\n{extra}\n"
        ),
        &[],
    )
}

fn new_addr(f: &Fixture, name: &str) -> u64 {
    f.engine
        .patch(name)
        .unwrap()
        .funcs()
        .next()
        .unwrap()
        .new_addr
}

fn state(f: &Fixture, name: &str) -> PatchState {
    f.engine.patch(name).unwrap().state
}

#[test]
fn the_visible_version_is_the_newest_enabled_in_load_order() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    for name in ["a", "b"] {
        f.engine
            .load(&mut g, &f.kernel, &patch_named(name, "meminfo_proc_show"))
            .unwrap();
    }
    f.engine
        .load(
            &mut g,
            &f.kernel,
            &patch_named("other", "cmdline_proc_show"),
        )
        .unwrap();
    let (a, b) = (new_addr(&f, "a"), new_addr(&f, "b"));
    // B (loaded later) first, then A: B stays visible; A's enable moves nothing.
    enable(&mut f, &mut g, "b").unwrap();
    let t = run(&mut f, &mut g, "a", Op::Enable, Consistency::PerTask, 1).unwrap();
    assert_eq!(t.outcome, Outcome::Done);
    assert!(t.changes.is_empty(), "a hidden version changes nothing");
    assert_eq!(site_target(&f, &g, "meminfo_proc_show"), Some(b));
    let v = f.engine.function_versions();
    let meminfo = v.iter().find(|v| v.name == "meminfo_proc_show").unwrap();
    let shown: Vec<(&str, bool)> = meminfo
        .versions
        .iter()
        .map(|v| (v.patch.as_str(), v.visible))
        .collect();
    assert_eq!(shown, [("a", false), ("b", true)]);
    // Disabling the hidden A changes nothing visible; disabling B shows the original.
    let before = g.ram.clone();
    let t = run(&mut f, &mut g, "a", Op::Disable, Consistency::PerTask, 1).unwrap();
    assert!(t.outcome == Outcome::Done && t.changes.is_empty());
    assert!(g.ram == before, "disabling a hidden patch writes nothing");
    disable(&mut f, &mut g, "b").unwrap();
    assert_eq!(site_bytes(&f, &g, "meminfo_proc_show"), FENTRY_NOP);
    // A below B, and B disabled first: A shows again.
    enable(&mut f, &mut g, "a").unwrap();
    enable(&mut f, &mut g, "b").unwrap();
    disable(&mut f, &mut g, "b").unwrap();
    assert_eq!(site_target(&f, &g, "meminfo_proc_show"), Some(a));
    // Independent patches disable in either order.
    enable(&mut f, &mut g, "other").unwrap();
    disable(&mut f, &mut g, "a").unwrap();
    disable(&mut f, &mut g, "other").unwrap();
    enable(&mut f, &mut g, "other").unwrap();
    enable(&mut f, &mut g, "a").unwrap();
    disable(&mut f, &mut g, "other").unwrap();
    disable(&mut f, &mut g, "a").unwrap();
    assert!(f.engine.funcs().next().is_none());
}

#[test]
fn atomic_replace_returns_what_it_does_not_name_to_the_original() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let before = text(&f, &g);
    f.engine
        .load(&mut g, &f.kernel, &patch_named("a", "meminfo_proc_show"))
        .unwrap();
    f.engine
        .load(&mut g, &f.kernel, &patch_named("b", "cmdline_proc_show"))
        .unwrap();
    enable(&mut f, &mut g, "a").unwrap();
    enable(&mut f, &mut g, "b").unwrap();
    let c = patch_with("c", "meminfo_proc_show", "LPVMM_ATOMIC_REPLACE();");
    f.engine.check_load_and_enable(&c).unwrap();
    f.engine.load(&mut g, &f.kernel, &c).unwrap();
    let t = run(&mut f, &mut g, "c", Op::Enable, Consistency::PerTask, 1).unwrap();
    assert_eq!(t.outcome, Outcome::Done);
    let mut moved: Vec<(&str, String)> = t
        .changes
        .iter()
        .map(|c| {
            (
                c.name.as_str(),
                match &c.to {
                    crate::Version::Original => "original".to_string(),
                    crate::Version::Code(n) => n.patch.clone(),
                },
            )
        })
        .collect();
    moved.sort();
    assert_eq!(
        moved,
        [
            ("cmdline_proc_show", "original".to_string()),
            ("meminfo_proc_show", "c".to_string())
        ],
        "one transition: c's version, and a nop for what only b changed"
    );
    assert_eq!(
        site_target(&f, &g, "meminfo_proc_show"),
        Some(new_addr(&f, "c"))
    );
    assert_eq!(site_bytes(&f, &g, "cmdline_proc_show"), FENTRY_NOP);
    assert_eq!(
        (state(&f, "a"), state(&f, "b"), state(&f, "c")),
        (
            PatchState::Replaced,
            PatchState::Replaced,
            PatchState::Enabled
        )
    );
    for name in ["a", "b"] {
        let e = enable(&mut f, &mut g, name).unwrap_err();
        assert!(e.contains("was replaced by cumulative patch 'c'"), "{e}");
        let e = disable(&mut f, &mut g, name).unwrap_err();
        assert!(e.contains("replaced it"), "{e}");
    }
    f.engine.unload(&mut g, &f.kernel, "a").unwrap();
    f.engine.unload(&mut g, &f.kernel, "b").unwrap();
    disable(&mut f, &mut g, "c").unwrap();
    assert_eq!(
        text(&f, &g),
        before,
        "disabling the replace patch restores all"
    );
    f.engine.unload(&mut g, &f.kernel, "c").unwrap();
    assert!(f.engine.patches().is_empty());
}

#[test]
fn atomic_replace_under_per_task_reverses_back_to_the_patches_it_replaced() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    f.engine
        .load(&mut g, &f.kernel, &patch_named("a", "meminfo_proc_show"))
        .unwrap();
    enable(&mut f, &mut g, "a").unwrap();
    let a = new_addr(&f, "a");
    // C names pipe_read, where tasks 11 and 12 sleep: they wait; meminfo gets its nop.
    f.engine
        .load(
            &mut g,
            &f.kernel,
            &patch_with("c", "pipe_read", "LPVMM_ATOMIC_REPLACE();"),
        )
        .unwrap();
    let t = run(&mut f, &mut g, "c", Op::Enable, Consistency::PerTask, 1).unwrap();
    assert_eq!(t.phase(), Phase::Switching);
    let mut who: Vec<i32> = t.blockers.iter().map(|b| b.pid).collect();
    who.sort();
    assert_eq!(who, [11, 12]);
    assert_eq!(t.changes.len(), 2);
    f.engine.request(Request::Reverse).unwrap();
    let t = tick(&mut f, &mut g, 3).unwrap();
    assert_eq!(t.outcome, Outcome::Reversed);
    assert_eq!(site_target(&f, &g, "meminfo_proc_show"), Some(a));
    assert_eq!(site_bytes(&f, &g, "pipe_read"), FENTRY_NOP);
    assert_eq!(
        (state(&f, "a"), state(&f, "c")),
        (PatchState::Enabled, PatchState::Disabled)
    );
}

#[test]
fn states_refuse_a_downgrade_or_a_dropped_state_before_anything_changes() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    f.engine
        .load(
            &mut g,
            &f.kernel,
            &patch_with("a", "meminfo_proc_show", "LPVMM_STATE(7, 2);"),
        )
        .unwrap();
    enable(&mut f, &mut g, "a").unwrap();
    for (name, extra, want) in [
        (
            "lower",
            "LPVMM_ATOMIC_REPLACE();\nLPVMM_STATE(7, 1);",
            "would lower state 7 from version 2",
        ),
        ("drop", "LPVMM_ATOMIC_REPLACE();", "would drop state 7"),
        ("lower2", "LPVMM_STATE(7, 1);", "would lower state 7"),
    ] {
        let kp = patch_with(name, "cmdline_proc_show", extra);
        let e = f.engine.check_load_and_enable(&kp).unwrap_err().to_string();
        assert!(e.contains(want), "{name}: {e}");
        // Loaded anyway (disabled), its enable is refused the same way.
        let before = g.ram.clone();
        f.engine.load(&mut g, &f.kernel, &kp).unwrap();
        let e = enable(&mut f, &mut g, name).unwrap_err();
        assert!(e.contains(want), "{name}: {e}");
        f.engine.unload(&mut g, &f.kernel, name).unwrap();
        assert!(f.engine.active().is_none());
        let _ = before;
    }
    // Keeping or raising the version, or (not cumulative) not naming it, is fine.
    for (name, extra) in [
        ("same", "LPVMM_ATOMIC_REPLACE();\nLPVMM_STATE(7, 2);"),
        ("plain", ""),
    ] {
        let kp = patch_with(name, "cmdline_proc_show", extra);
        f.engine.check_load_and_enable(&kp).unwrap();
    }
}

#[test]
fn a_chain_of_cumulative_patches_reuses_the_space_of_unloaded_ones() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    // Two cumulative patches, each replacing the other in turn: more loads than the
    // area holds without reuse (each takes at least a page of code).
    let kps: Vec<Vec<u8>> = ["c0", "c1"]
        .iter()
        .map(|n| patch_with(n, "meminfo_proc_show", "LPVMM_ATOMIC_REPLACE();"))
        .collect();
    let mut steady = None;
    let mut loads = 2;
    for i in 0.. {
        if i >= loads {
            break;
        }
        let (name, prev) = (format!("c{}", i % 2), format!("c{}", (i + 1) % 2));
        f.engine
            .load(&mut g, &f.kernel, &kps[(i % 2) as usize])
            .unwrap();
        enable(&mut f, &mut g, &name).unwrap();
        assert_eq!(
            site_target(&f, &g, "meminfo_proc_show"),
            Some(new_addr(&f, &name))
        );
        if i > 0 {
            assert_eq!(state(&f, &prev), PatchState::Replaced);
            f.engine.unload(&mut g, &f.kernel, &prev).unwrap();
        }
        let used = f.engine.area_use().unwrap();
        match steady {
            None => {
                steady = Some(used);
                loads = used.code.1 / 4096 + 2;
            }
            Some(s) => assert_eq!(used, s, "after {i} replaces"),
        }
    }
    assert!(loads > 100);
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
            "an exception table in a guest that cannot know the patch as a module",
            kp("#include <lpvmm/patch.h>\nint nf(void) { asm volatile(\"1: nop\\n.pushsection __ex_table,\\\"a\\\"\\n.long 1b - .\\n.long 1b - .\\n.long 0\\n.popsection\"); return 0; }\nLPVMM_PATCH(\"ex\");\nLPVMM_REPLACE(meminfo_proc_show, nf);\n", &[]),
            "ex: its exception or bug table needs the patch to be a module the guest knows",
        ),
        (
            "an exception table that is not whole entries",
            kp("#include <lpvmm/patch.h>\nint nf(void) { asm volatile(\"1: nop\\n.pushsection __ex_table,\\\"a\\\"\\n.long 1b - .\\n.popsection\"); return 0; }\nLPVMM_PATCH(\"ex\");\nLPVMM_REPLACE(meminfo_proc_show, nf);\n", &[]),
            "__ex_table: 4 bytes are not whole entries",
        ),
        (
            "a jump table and a bug table, each named with its function",
            kp("#include <lpvmm/patch.h>\nint nf(void) { asm volatile(\"1: nop\\n.pushsection __jump_table,\\\"a\\\"\\n.long 1b - .\\n.popsection\\n.pushsection __bug_table,\\\"a\\\"\\n.long 1b - .\\n.popsection\"); return 0; }\nLPVMM_PATCH(\"two\");\nLPVMM_REPLACE(meminfo_proc_show, nf);\n", &[]),
            "section __jump_table (needed by nf): static keys",
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
fn a_kp_parses_wherever_its_bytes_lie_in_memory() {
    let bytes = kp(CMDLINE, &[]);
    for shift in 0..8 {
        let mut buf = vec![0u8; shift];
        buf.extend(&bytes);
        let p = crate::PatchObject::parse(&buf[shift..]).unwrap_or_else(|e| panic!("{shift}: {e}"));
        assert_eq!(p.manifest.name, "cmdline");
    }
}

/// What fuzz/ found, kept: each input is refused with an error, never a panic.
#[test]
fn fuzz_findings_are_refused_cleanly() {
    let e = crate::PatchObject::parse(include_bytes!(
        "../../fuzz/regressions/kp/function-value-near-2-64.kp"
    ))
    .unwrap_err();
    assert!(e.to_string().contains("lies outside its section"), "{e}");
    let e = crate::PatchObject::parse(include_bytes!("../../fuzz/regressions/kp/bss-of-1-gib.kp"))
        .unwrap_err();
    assert!(e.to_string().contains("sections take at most"), "{e}");
    // A .data section without contents in the file: the linker wrote a relocation past
    // its empty image (a panic) until the parser compared size and contents.
    let e = crate::PatchObject::parse(include_bytes!(
        "../../fuzz/regressions/kp/nobits-named-data.kp"
    ))
    .unwrap_err();
    assert!(e.to_string().contains("in the file"), "{e}");
}

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
            if crate::load::object::PatchObject::parse(&b).is_ok() {
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
    use crate::load::link::{link, Placement, Returns};
    let obj = crate::load::object::PatchObject::parse(&kp(CMDLINE, &[])).unwrap();
    let at = Placement {
        code: 0xffff_ffff_a000_0000,
        rodata: 0xffff_ffff_a010_0000,
        data: 0xffff_ffff_a020_0000,
    };
    let resolve = |_: &str| Ok(crate::load::link::ImportAt::Addr(0xffff_ffff_8100_1000));
    let f = obj.function("new_cmdline_proc_show").unwrap();
    let tail = |l: &crate::load::link::Linked| {
        let end = (f.offset + f.size) as usize;
        l.code.bytes[end - 5..end].to_vec()
    };
    let ret = link(&obj, at, Returns::Ret, None, &resolve).unwrap();
    assert_eq!(tail(&ret), [0xc3, 0xcc, 0xcc, 0xcc, 0xcc]);
    let thunk = 0xffff_ffff_8200_0000u64;
    let jmp = link(&obj, at, Returns::Jump(thunk), None, &resolve).unwrap();
    let t = tail(&jmp);
    let site = at.code + f.offset + f.size - 5;
    let rel = i32::from_le_bytes(t[1..5].try_into().unwrap());
    assert_eq!(
        (t[0], (site as i64 + 5 + i64::from(rel)) as u64),
        (0xe9, thunk)
    );
}

// --- Per-task consistency over synthetic guests. ---

/// `pipefix` (a patch of `pipe_read`, where tasks 11 and 12 wait) loaded and its per-task
/// enable begun, ticked `ticks` times: the transition then.
fn pipefix_per_task(f: &mut Fixture, g: &mut SynthGuest, ticks: u32) -> Transition {
    f.engine
        .load(g, &f.kernel, &patch_named("pipefix", "pipe_read"))
        .unwrap();
    run(f, g, "pipefix", Op::Enable, Consistency::PerTask, ticks).unwrap()
}

/// The kernel function a site jumps to now.
fn site_target(f: &Fixture, g: &SynthGuest, func: &str) -> Option<u64> {
    let s = site_bytes(f, g, func);
    (s[0] == 0xe9).then(|| {
        (f.sk.function(func) as i64
            + 5
            + i64::from(i32::from_le_bytes(s[1..5].try_into().unwrap()))) as u64
    })
}

/// Make task `pid` leave `from` (as if it had returned from it and called `to`, a
/// function with the same frame size, in its place): every return address into `from`
/// on its stack becomes one into `to`.
fn move_out_of(f: &Fixture, g: &mut SynthGuest, pid: i32, from: &str, to: &str) {
    let k = &f.kernel;
    let list = introspection::tasks::TaskReader::new(k, g).list().unwrap();
    let task = list.by_pid(pid).unwrap().addr;
    let m = k.memory(g);
    let stack = m.u64(task + k.layout.task.stack).unwrap();
    let (old, new) = (f.sk.function(from) + 0x10, f.sk.function(to) + 0x10);
    let mut writes = Vec::new();
    for off in (0..k.thread_size).step_by(8) {
        if m.u64(stack + off).unwrap() == old {
            writes.push(m.translate(stack + off).unwrap());
        }
    }
    drop(m);
    assert!(!writes.is_empty(), "{pid} has no frame in {from}");
    for pa in writes {
        g.write_phys(pa, &new.to_le_bytes()).unwrap();
    }
}

fn text(f: &Fixture, g: &SynthGuest) -> Vec<u8> {
    let t = f.kernel.addrs.text;
    f.kernel
        .memory(g)
        .read_vec(t.start, (t.end - t.start) as usize)
        .unwrap()
}

/// A task asleep in the old code that exits and becomes a zombie (its stack freed,
/// `task->stack` NULL, `exit_state` set) no longer holds the transition: nothing can be
/// on a stack that is gone, as the kernel's own livepatch decides.
#[test]
fn a_zombie_no_longer_holds_a_per_task_transition() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let t = pipefix_per_task(&mut f, &mut g, 1);
    let mut pending: Vec<i32> = t.blockers.iter().map(|b| b.pid).collect();
    pending.sort();
    assert_eq!(pending, [11, 12]);
    move_out_of(&f, &mut g, 11, "pipe_read", "ksys_read");
    let k = &f.kernel;
    let task = introspection::tasks::TaskReader::new(k, &g)
        .list()
        .unwrap()
        .by_pid(12)
        .unwrap()
        .addr;
    let m = k.memory(&g);
    let (stack, exit_state) = (
        m.translate(task + k.layout.task.stack).unwrap(),
        m.translate(task + k.layout.task.exit_state).unwrap(),
    );
    g.write_phys(stack, &0u64.to_le_bytes()).unwrap();
    let t = tick(&mut f, &mut g, 1).unwrap();
    assert_eq!(
        t.blockers.iter().map(|b| b.pid).collect::<Vec<_>>(),
        [12],
        "a task without a stack that has not exited is corrupt: it holds"
    );
    const EXIT_ZOMBIE: u32 = 0x20;
    g.write_phys(exit_state, &EXIT_ZOMBIE.to_le_bytes())
        .unwrap();
    let t = tick(&mut f, &mut g, 1).unwrap();
    assert_eq!(t.outcome, Outcome::Done, "{:?}", t.blockers);
}

#[test]
fn per_task_moves_free_tasks_at_once_and_each_blocked_one_when_its_stack_allows() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let t = pipefix_per_task(&mut f, &mut g, 1);
    let new = f
        .engine
        .patch("pipefix")
        .unwrap()
        .funcs()
        .next()
        .unwrap()
        .new_addr;
    assert_eq!(
        (t.outcome.clone(), t.phase()),
        (Outcome::Pending, Phase::Switching)
    );
    let mut pending: Vec<i32> = t.blockers.iter().map(|b| b.pid).collect();
    pending.sort();
    assert_eq!(pending, [11, 12], "only the tasks asleep in pipe_read wait");
    assert_eq!(t.pending, 2);
    assert!(t.tasks >= 8);
    // The site dispatches through the trampoline, which leaves to the old function
    // past its site, or to the new one.
    let tramp = t.changes[0].trampoline.unwrap();
    assert_eq!(site_target(&f, &g, "pipe_read"), Some(tramp));
    let code = f.kernel.memory(&g).read_vec(tramp, 128).unwrap();
    let exits: Vec<u64> =
        iced_x86::Decoder::with_ip(64, &code, tramp, iced_x86::DecoderOptions::NONE)
            .into_iter()
            .filter(|i| i.code() == iced_x86::Code::Jmp_rel32_64)
            .map(|i| i.near_branch_target())
            .collect();
    assert!(
        exits.contains(&new) && exits.contains(&(f.sk.function("pipe_read") + 5)),
        "{exits:x?}"
    );

    // Task 11 leaves pipe_read: it moves; 12 still waits.
    move_out_of(&f, &mut g, 11, "pipe_read", "ksys_read");
    let t = tick(&mut f, &mut g, 1).unwrap();
    assert_eq!(t.blockers.iter().map(|b| b.pid).collect::<Vec<_>>(), [12]);
    move_out_of(&f, &mut g, 12, "pipe_read", "ksys_read");
    let t = tick(&mut f, &mut g, 1).unwrap();
    assert_eq!(t.outcome, Outcome::Done);
    assert_eq!(
        site_target(&f, &g, "pipe_read"),
        Some(new),
        "after the transition the site jumps straight to the new function"
    );
    assert_eq!(
        f.engine.patch("pipefix").unwrap().state,
        PatchState::Enabled
    );
    let v = f.engine.function_versions();
    assert!(v.len() == 1 && v[0].versions.len() == 1 && v[0].versions[0].visible);
}

/// The post-mortem is clean through a whole per-task transition (sites, ftrace flags,
/// the area's page tables, trampolines, patch code) and after unload, and names a byte
/// of any of them that the guest no longer holds as lpvmm wrote it.
#[test]
fn the_post_mortem_holds_every_byte_the_engine_wrote() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let clean = |f: &Fixture, g: &SynthGuest| {
        let pm = f.engine.post_mortem(g);
        assert!(pm.clean(), "{pm}");
        pm
    };
    assert_eq!(clean(&f, &g).held_bytes, 0, "nothing written yet");
    let t = pipefix_per_task(&mut f, &mut g, 1);
    let enabled = clean(&f, &g);
    // The site and the page-middle entry (bytes equal to what was there are not held).
    assert!(
        enabled.held_bytes > 5 && enabled.area_pages >= 2,
        "{enabled:?}"
    );

    // A byte of the site's jump, then of the trampoline, as something else left them.
    let site_pa = f.engine.funcs().next().unwrap().site_pa;
    let tramp = t.changes[0].trampoline.unwrap();
    let tramp_pa = f.kernel.memory(&g).translate(tramp).unwrap();
    for pa in [site_pa + 2, tramp_pa + 1] {
        let mut was = [0u8];
        g.read_phys(pa, &mut was).unwrap();
        g.write_phys(pa, &[was[0] ^ 0xff]).unwrap();
        let pm = f.engine.post_mortem(&g);
        assert_eq!(pm.mismatches.len(), 1, "{pm}");
        assert_eq!(pm.mismatches[0].pa, pa);
        assert!(pm.to_string().starts_with(crate::POST_MORTEM_MISMATCH));
        g.write_phys(pa, &was).unwrap();
    }
    clean(&f, &g);

    move_out_of(&f, &mut g, 11, "pipe_read", "ksys_read");
    move_out_of(&f, &mut g, 12, "pipe_read", "ksys_read");
    assert_eq!(tick(&mut f, &mut g, 1).unwrap().outcome, Outcome::Done);
    clean(&f, &g);
    disable(&mut f, &mut g, "pipefix").unwrap();
    f.engine.unload(&mut g, &f.kernel, "pipefix").unwrap();
    let pm = clean(&f, &g);
    // The site is the guest's again; the area's mapping stays lpvmm's.
    assert!(
        pm.held_bytes > 0 && pm.held_bytes < enabled.held_bytes,
        "{pm:?}"
    );
}

#[test]
fn reverse_sends_moved_tasks_back_and_restores_the_text() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let before = text(&f, &g);
    let t = pipefix_per_task(&mut f, &mut g, 1);
    assert_eq!(t.phase(), Phase::Switching);
    let tramp = t.changes[0].trampoline.unwrap();

    // The busy task on vCPU 0 (moved at the first tick) is interrupted inside the
    // trampoline: it must stay on the new side until it has left it.
    let saved = g.vcpus[0].clone();
    g.vcpus[0].rip = tramp + 0x10;
    g.vcpus[0].rsp = saved.rsp + 8; // the return address of clear_user's caller
    f.engine.request(Request::Reverse).unwrap();
    assert!(
        f.engine.request(Request::Force).is_err(),
        "one request at a time"
    );
    let t = tick(&mut f, &mut g, 1).unwrap();
    assert!(t.reversed);
    let who: Vec<(i32, &str)> = t
        .blockers
        .iter()
        .map(|b| (b.pid, b.reason.as_str()))
        .collect();
    assert_eq!(who, [(20, "it is inside an lpvmm trampoline")]);
    assert!(t.blockers[0].trace.reliable);
    let top = t.blockers[0].trace.frames[0].symbol.clone();
    assert_eq!(
        top.as_deref(),
        Some("lpvmm_trampoline+0x10/0x80 [pipe_read]")
    );

    g.vcpus[0] = saved;
    let t = tick(&mut f, &mut g, 1).unwrap();
    assert_eq!(t.outcome, Outcome::Reversed);
    assert_eq!(
        text(&f, &g),
        before,
        "kernel text byte-identical after the reverse"
    );
    assert_eq!(
        f.engine.patch("pipefix").unwrap().state,
        PatchState::Disabled
    );
    assert!(f.engine.funcs().next().is_none());
    // Nothing left to reverse or force.
    assert!(f
        .engine
        .request(Request::Reverse)
        .unwrap_err()
        .to_string()
        .contains("no transition"));
    // The same patch enables again later, with a bank no task can be inside.
    move_out_of(&f, &mut g, 11, "pipe_read", "ksys_read");
    move_out_of(&f, &mut g, 12, "pipe_read", "ksys_read");
    let t = run(
        &mut f,
        &mut g,
        "pipefix",
        Op::Enable,
        Consistency::PerTask,
        1,
    )
    .unwrap();
    assert_eq!(t.outcome, Outcome::Done);
}

#[test]
fn force_completes_names_what_it_skipped_and_keeps_the_code() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    pipefix_per_task(&mut f, &mut g, 1);
    f.engine.request(Request::Force).unwrap();
    let t = tick(&mut f, &mut g, 1).unwrap();
    assert_eq!(t.outcome, Outcome::Forced);
    let mut skipped: Vec<i32> = t.skipped.iter().map(|b| b.pid).collect();
    skipped.sort();
    assert_eq!(skipped, [11, 12]);
    let p = f.engine.patch("pipefix").unwrap().clone();
    assert!(p.forced && p.state == PatchState::Enabled);
    assert_eq!(
        site_target(&f, &g, "pipe_read"),
        Some(p.funcs().next().unwrap().new_addr)
    );
    // Disabled, a forced patch still stays.
    move_out_of(&f, &mut g, 11, "pipe_read", "ksys_read");
    move_out_of(&f, &mut g, 12, "pipe_read", "ksys_read");
    done(
        run(
            &mut f,
            &mut g,
            "pipefix",
            Op::Disable,
            Consistency::PerTask,
            1,
        )
        .unwrap(),
    )
    .unwrap();
    let e = f
        .engine
        .unload(&mut g, &f.kernel, "pipefix")
        .unwrap_err()
        .to_string();
    assert!(e.contains("was forced"), "{e}");
}

#[test]
fn an_immediate_function_flips_in_the_first_tick_while_the_rest_waits() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let both = kp(
        "#include <lpvmm/patch.h>\nint nm(void) { return 1; }\nint np(void) { return 2; }\n\
         LPVMM_PATCH(\"mixed\");\nLPVMM_REPLACE_IMMEDIATE(meminfo_proc_show, nm);\nLPVMM_REPLACE(pipe_read, np);\n",
        &[],
    );
    f.engine.load(&mut g, &f.kernel, &both).unwrap();
    let p = f.engine.patch("mixed").unwrap().clone();
    let func = |n: &str| p.funcs().find(|x| x.old.name == n).unwrap().clone();
    assert!(func("meminfo_proc_show").immediate && !func("pipe_read").immediate);
    let t = run(&mut f, &mut g, "mixed", Op::Enable, Consistency::PerTask, 1).unwrap();
    assert_eq!(t.phase(), Phase::Switching);
    let change = |n: &str| t.changes.iter().find(|c| c.name == n).unwrap().clone();
    assert_eq!(
        site_target(&f, &g, "meminfo_proc_show"),
        Some(func("meminfo_proc_show").new_addr)
    );
    assert!(change("meminfo_proc_show").trampoline.is_none());
    assert_eq!(
        site_target(&f, &g, "pipe_read"),
        change("pipe_read").trampoline
    );
    // While it waits, a second transition is refused and nothing changes.
    let before = g.ram.clone();
    let e = f
        .engine
        .begin(
            Begin {
                patch: "mixed".into(),
                op: Op::Disable,
                consistency: Consistency::PerTask,
                timeout: None,
                unload_on_failure: false,
            },
            f.now,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("in progress"), "{e}");
    assert!(f.engine.unload(&mut g, &f.kernel, "mixed").is_err());
    assert!(g.ram == before);
}

#[test]
fn per_task_timeout_reverses_and_unloads_a_patch_loaded_for_it() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let before = text(&f, &g);
    f.engine
        .load(&mut g, &f.kernel, &patch_named("pipefix", "pipe_read"))
        .unwrap();
    f.engine
        .begin(
            Begin {
                patch: "pipefix".into(),
                op: Op::Enable,
                consistency: Consistency::PerTask,
                timeout: Some(std::time::Duration::from_secs(3)),
                unload_on_failure: true,
            },
            f.now,
        )
        .unwrap();
    let t = tick(&mut f, &mut g, 10).unwrap();
    assert_eq!(t.outcome, Outcome::TimedOut);
    assert!(t.timed_out && t.reversed);
    let mut held: Vec<i32> = t.gave_up_on.iter().map(|b| b.pid).collect();
    held.sort();
    assert_eq!(held, [11, 12], "what held it when it gave up is kept");
    assert!(
        f.engine.patches().is_empty(),
        "the patch loaded for it is unloaded"
    );
    assert_eq!(text(&f, &g), before);
}

/// `current` on 6.12 kernels: `mov %gs:const_pcpu_hot(%rip)`, a RIP-relative address
/// of a per-CPU symbol (a small offset), reached modulo 2^64 from the patch area, and
/// `const_pcpu_hot` is what the kernel's linker script makes of `pcpu_hot`.
#[test]
fn rip_relative_per_cpu_access_reaches_the_per_cpu_symbol() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let hot = f
        .kernel
        .addrs
        .pcpu_hot
        .expect("a 6.12 synthetic kernel has pcpu_hot");
    let src = r#"
#include <lpvmm/patch.h>
extern char const_pcpu_hot[];
unsigned long nf(void)
{
	unsigned long v;
	asm volatile("movq %%gs:const_pcpu_hot(%%rip), %0" : "=r"(v));
	return v;
}
LPVMM_PATCH("percpu");
LPVMM_REPLACE(meminfo_proc_show, nf);
"#;
    f.engine.load(&mut g, &f.kernel, &kp(src, &[])).unwrap();
    let func = f
        .engine
        .patch("percpu")
        .unwrap()
        .funcs()
        .next()
        .unwrap()
        .clone();
    let code = f
        .kernel
        .memory(&g)
        .read_vec(func.new_addr, func.new_size as usize)
        .unwrap();
    let mov = iced_x86::Decoder::with_ip(64, &code, func.new_addr, iced_x86::DecoderOptions::NONE)
        .into_iter()
        .find(|i| i.segment_prefix() == iced_x86::Register::GS)
        .expect("the %gs access");
    assert!(mov.is_ip_rel_memory_operand());
    assert_eq!(mov.ip_rel_memory_address(), hot);
}

/// objtool's table in a patch object (here written by hand in asm, as objtool would):
/// relocated to where the code went, decoded with the guest's own ORC layout, and used
/// for the patch's code at any instruction.
#[test]
fn a_patchs_orc_table_unwinds_its_code_at_every_instruction() {
    use introspection::orc::{reg, OrcKind};
    use introspection::stack::ExtraCode;
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    // One entry at the label: sp+8 is the CFA, a call frame (6.4+ numbering: CALL = 2).
    let src = r#"
#include <lpvmm/patch.h>
int nf(void)
{
	asm volatile("nop\n1: nop\n"
		     ".pushsection .orc_unwind_ip,\"a\"\n.long 1b - .\n.popsection\n"
		     ".pushsection .orc_unwind,\"a\"\n.short 8\n.short 0\n.short 0x0205\n.popsection\n");
	return 0;
}
LPVMM_PATCH("orc");
LPVMM_REPLACE(meminfo_proc_show, nf);
"#;
    f.engine.load(&mut g, &f.kernel, &kp(src, &[])).unwrap();
    let p = f.engine.patch("orc").unwrap();
    assert_eq!(p.orc.len(), 1);
    let at = p.orc[0];
    let func = &p.funcs().next().unwrap();
    assert!(
        at.ip > func.new_addr && at.ip < func.new_addr + func.new_size,
        "{at:x?} {func:x?}"
    );
    assert_eq!(
        (at.entry.sp_offset, at.entry.sp_reg, at.entry.kind),
        (8, reg::SP, OrcKind::Call)
    );
    let code = crate::transition::tick::PatchCode(&f.engine);
    assert_eq!(
        code.unwind_entry(at.ip, true),
        Some(at.entry),
        "interrupted"
    );
    assert_eq!(code.unwind_entry(at.ip + 1, false), Some(at.entry));
    assert_eq!(
        code.unwind_entry(at.ip - 1, true),
        None,
        "before the first entry nothing is known"
    );
}

const FTRACE_DISABLED: u64 = 1 << 25;

fn ftrace_flags(f: &Fixture, g: &SynthGuest, func: &str) -> u64 {
    f.sk.ftrace.flags(g, f.sk.function(func))
}

#[test]
fn a_redirected_site_is_hidden_from_the_guests_ftrace_until_no_tracer_covers_it() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let mut ft = f.sk.ftrace.clone();
    let before = text(&f, &g);
    f.engine.load(&mut g, &f.kernel, &kp(CMDLINE, &[])).unwrap();
    assert_eq!(
        ftrace_flags(&f, &g, "cmdline_proc_show"),
        0,
        "load hides nothing"
    );
    enable(&mut f, &mut g, "cmdline").unwrap();
    assert_eq!(ftrace_flags(&f, &g, "cmdline_proc_show"), FTRACE_DISABLED);
    assert_eq!(
        ftrace_flags(&f, &g, "seq_printf"),
        0,
        "other records untouched"
    );

    // The guest traces every function: ftrace counts every record but the hidden one.
    let tracer = ft.add_ops(&mut g, &[], &[]);
    assert_eq!(ftrace_flags(&f, &g, "cmdline_proc_show"), FTRACE_DISABLED);
    assert_eq!(ftrace_flags(&f, &g, "seq_printf"), 1);
    // Giving the site back now would leave ftrace counting 0 for a function its tracer
    // covers: the disable waits, says for what, and changes nothing.
    let jumped = site_bytes(&f, &g, "cmdline_proc_show");
    let t = run(
        &mut f,
        &mut g,
        "cmdline",
        Op::Disable,
        Consistency::Immediate,
        3,
    )
    .unwrap();
    assert_eq!(t.outcome, Outcome::Pending);
    let note = t.note.clone().unwrap_or_default();
    assert!(
        note.contains("ftrace user") && note.contains("cmdline_proc_show"),
        "{note}"
    );
    assert_eq!(site_bytes(&f, &g, "cmdline_proc_show"), jumped);
    assert_eq!(ftrace_flags(&f, &g, "cmdline_proc_show"), FTRACE_DISABLED);

    // The guest stops tracing: the disable completes and ftrace has its record back.
    ft.disable_ops(&mut g, tracer);
    let t = tick(&mut f, &mut g, 2).unwrap();
    assert_eq!(t.outcome, Outcome::Done, "{:?}", t.note);
    assert_eq!(ftrace_flags(&f, &g, "cmdline_proc_show"), 0);
    assert_eq!(site_bytes(&f, &g, "cmdline_proc_show"), FENTRY_NOP);
    assert_eq!(text(&f, &g), before);

    // A tracer of other functions only, or one that excludes this one, does not hold
    // a disable back.
    let others = ft.add_ops(&mut g, &[f.sk.function("seq_printf")], &[]);
    let excluding = ft.add_ops(&mut g, &[], &[f.sk.function("cmdline_proc_show")]);
    enable(&mut f, &mut g, "cmdline").unwrap();
    disable(&mut f, &mut g, "cmdline").unwrap();
    assert_eq!(ftrace_flags(&f, &g, "cmdline_proc_show"), 0);
    ft.disable_ops(&mut g, others);
    ft.disable_ops(&mut g, excluding);
}

#[test]
fn per_task_hides_the_record_from_the_first_trampoline_to_the_last_jump() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let t = pipefix_per_task(&mut f, &mut g, 1);
    assert_eq!(t.phase(), Phase::Switching);
    assert_eq!(
        ftrace_flags(&f, &g, "pipe_read"),
        FTRACE_DISABLED,
        "trampoline on"
    );
    move_out_of(&f, &mut g, 11, "pipe_read", "ksys_read");
    move_out_of(&f, &mut g, 12, "pipe_read", "ksys_read");
    let t = tick(&mut f, &mut g, 1).unwrap();
    assert_eq!(t.outcome, Outcome::Done);
    assert_eq!(
        ftrace_flags(&f, &g, "pipe_read"),
        FTRACE_DISABLED,
        "direct jump"
    );
    let t = run(
        &mut f,
        &mut g,
        "pipefix",
        Op::Disable,
        Consistency::PerTask,
        2,
    )
    .unwrap();
    assert_eq!(t.outcome, Outcome::Done, "{:?}", t.note);
    assert_eq!(ftrace_flags(&f, &g, "pipe_read"), 0);
    assert_eq!(site_bytes(&f, &g, "pipe_read"), FENTRY_NOP);
}

#[test]
fn ftrace_changing_code_or_counting_a_nop_holds_the_site_back() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let ft = f.sk.ftrace.clone();
    f.engine.load(&mut g, &f.kernel, &kp(CMDLINE, &[])).unwrap();
    // A guest task holds ftrace_lock: ftrace may be half way through an update.
    ft.set_lock_owner(&mut g, 0xffff_8880_0200_0000);
    let t = run(
        &mut f,
        &mut g,
        "cmdline",
        Op::Enable,
        Consistency::Immediate,
        2,
    )
    .unwrap();
    assert_eq!(t.outcome, Outcome::Pending);
    assert!(
        t.note.as_deref().unwrap_or("").contains("ftrace_lock"),
        "{:?}",
        t.note
    );
    assert_eq!(site_bytes(&f, &g, "cmdline_proc_show"), FENTRY_NOP);
    assert_eq!(ftrace_flags(&f, &g, "cmdline_proc_show"), 0);
    ft.set_lock_owner(&mut g, 0);
    let t = tick(&mut f, &mut g, 1).unwrap();
    assert_eq!(t.outcome, Outcome::Done);
    disable(&mut f, &mut g, "cmdline").unwrap();

    // ftrace counts a user of a site that holds its NOP: its books are not ours to
    // rewrite; the enable fails, naming why, and writes nothing.
    let site = f.sk.function("cmdline_proc_show");
    ft.set_flags(&mut g, site, 1);
    let t = run(
        &mut f,
        &mut g,
        "cmdline",
        Op::Enable,
        Consistency::Immediate,
        1,
    )
    .unwrap();
    let Outcome::Failed(why) = &t.outcome else {
        panic!("{:?}", t.outcome)
    };
    assert!(why.contains("counts 1 tracer"), "{why}");
    assert_eq!(site_bytes(&f, &g, "cmdline_proc_show"), FENTRY_NOP);
    assert_eq!(ft.flags(&g, site), 1);
}

/// The task `pid` ran: one more context switch in its `nvcsw` (what the kernel counts
/// at every switch out), so an early trace of it is no longer confirmed.
fn count_a_switch(f: &Fixture, g: &mut SynthGuest, pid: i32) {
    let k = &f.kernel;
    let list = introspection::tasks::TaskReader::new(k, g).list().unwrap();
    let task = list.by_pid(pid).unwrap().addr;
    let m = k.memory(g);
    let at = task + k.layout.task.nvcsw;
    let (pa, n) = (m.translate(at).unwrap(), m.u64(at).unwrap());
    drop(m);
    g.write_phys(pa, &(n + 1).to_le_bytes()).unwrap();
}

/// One per-task transition driven in steps, with or without an early unwind before each
/// tick; what each tick decided (blocked pids, outcome) and the counts of its checks.
fn pipefix_in_steps(early: bool) -> (Vec<(Vec<i32>, Outcome)>, crate::EarlyCheckCounts) {
    let mut f = fixture();
    f.engine.set_verify_early(true);
    let mut g = f.sk.guest.clone();
    // Begun, not ticked: each tick below follows its early unwind.
    pipefix_per_task(&mut f, &mut g, 0);
    let mut decided = Vec::new();
    // Between the early unwind and the pause: nothing; task 11 leaves pipe_read (it
    // ran); task 12 leaves it; nothing.
    type Between = fn(&Fixture, &mut SynthGuest);
    let between: [Between; 4] = [
        |_, _| {},
        |f, g| {
            move_out_of(f, g, 11, "pipe_read", "ksys_read");
            count_a_switch(f, g, 11);
        },
        |f, g| {
            move_out_of(f, g, 12, "pipe_read", "ksys_read");
            count_a_switch(f, g, 12);
        },
        |_, _| {},
    ];
    for step in between {
        if early {
            f.engine.unwind_early(&g, &f.kernel);
        }
        step(&f, &mut g);
        let t = tick(&mut f, &mut g, 1).unwrap();
        decided.push((
            t.blockers.iter().map(|b| b.pid).collect(),
            t.outcome.clone(),
        ));
        if t.outcome != Outcome::Pending {
            return (decided, t.early_checks);
        }
    }
    panic!("the transition did not end: {decided:?}");
}

#[test]
fn early_checks_confirmed_in_the_pause_decide_exactly_as_unwinding_in_the_pause() {
    let (with_early, counts) = pipefix_in_steps(true);
    let (without, plain) = pipefix_in_steps(false);
    assert_eq!(with_early, without);
    assert_eq!(
        with_early
            .iter()
            .map(|(b, _)| b.clone())
            .collect::<Vec<_>>(),
        [vec![11, 12], vec![12], vec![]],
        "11 and 12 wait in pipe_read, each moves once it ran out of it"
    );
    assert_eq!(with_early.last().unwrap().1, Outcome::Done);
    // Without early traces everything is unwound in the pause.
    assert_eq!((plain.confirmed, plain.unwound), (0, plain.unwound));
    assert!(plain.unwound > 0);
    // With them, only what ran or is on a vCPU is: the first tick checks every task
    // (two run on vCPUs), the second the two pending ones (11 ran), the third only 12
    // (which ran); every confirmed trace equals a fresh unwind.
    assert_eq!(counts.unwound, 2 + 1 + 1, "{counts:?}");
    assert_eq!(
        counts.confirmed + counts.unwound,
        plain.unwound,
        "{counts:?}"
    );
    assert!(counts.confirmed > counts.unwound, "{counts:?}");
    assert_eq!((counts.verified, counts.mismatches), (counts.confirmed, 0));
}

#[test]
fn an_early_trace_is_used_by_one_tick_only() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    f.engine
        .load(&mut g, &f.kernel, &patch_named("pipefix", "pipe_read"))
        .unwrap();
    // No transition: nothing to unwind early.
    f.engine.unwind_early(&g, &f.kernel);
    let t = run(
        &mut f,
        &mut g,
        "pipefix",
        Op::Enable,
        Consistency::PerTask,
        1,
    )
    .unwrap();
    assert_eq!(t.early_checks.confirmed, 0);
    f.engine.unwind_early(&g, &f.kernel);
    let t = tick(&mut f, &mut g, 1).unwrap();
    assert_eq!((t.early_checks.confirmed, t.blockers.len()), (2, 2));
    // The next tick had no early unwind before it: everything in the pause.
    let t = tick(&mut f, &mut g, 1).unwrap();
    assert_eq!(t.early_checks.confirmed, 2, "{:?}", t.early_checks);
}

/// Write `value` over the `len`-byte kernel variable `name` of the synthetic guest.
fn poke(f: &Fixture, g: &mut SynthGuest, name: &str, value: u64, len: usize) {
    let k = &f.kernel;
    let at = k.symbols.addr(name).unwrap();
    let pa = k.memory(g).translate(at).unwrap();
    g.write_phys(pa, &value.to_le_bytes()[..len]).unwrap();
}

fn peek(f: &Fixture, g: &SynthGuest, name: &str) -> u64 {
    let k = &f.kernel;
    k.memory(g).u64(k.symbols.addr(name).unwrap()).unwrap()
}

/// Take the process `pid` off `init_task.tasks`, as `__unhash_process` does (only the
/// list: the counters are the caller's to change, or not).
fn unlink(f: &Fixture, g: &mut SynthGuest, pid: i32) {
    let k = &f.kernel;
    let list = introspection::tasks::TaskReader::new(k, g).list().unwrap();
    let node = list.by_pid(pid).unwrap().addr + k.layout.task.tasks;
    let m = k.memory(g);
    let next = m.u64(node).unwrap();
    let mut prev = k.addrs.init_task + k.layout.task.tasks;
    while m.u64(prev).unwrap() != node {
        prev = m.u64(prev).unwrap();
    }
    let pa = m.translate(prev).unwrap();
    drop(m);
    g.write_phys(pa, &next.to_le_bytes()).unwrap();
}

#[test]
fn a_task_list_walked_early_is_used_only_while_no_task_appeared_or_went_away() {
    let mut f = fixture();
    f.engine.set_verify_early(true);
    let mut g = f.sk.guest.clone();
    pipefix_per_task(&mut f, &mut g, 0);
    // Each tick below follows an early walk; what happens in between decides whether
    // the pause may take the walk's addresses. 11 and 12 stay in pipe_read throughout.
    let step =
        |f: &mut Fixture, g: &mut SynthGuest, between: &dyn Fn(&Fixture, &mut SynthGuest)| {
            let before = f.engine.active().unwrap().early_checks;
            f.engine.unwind_early(g, &f.kernel);
            between(f, g);
            let t = tick(f, g, 1).unwrap();
            let c = t.early_checks;
            let mut blocked: Vec<i32> = t.blockers.iter().map(|b| b.pid).collect();
            blocked.sort_unstable();
            assert_eq!(blocked, [11, 12]);
            (
                c.lists_confirmed - before.lists_confirmed,
                c.lists_walked - before.lists_walked,
                c.list_mismatches - before.list_mismatches,
            )
        };
    // Nothing forked or exited: the early walk's list, the same as a walk in the pause.
    assert_eq!(step(&mut f, &mut g, &|_, _| {}), (1, 0, 0));
    // A fork: walked in the pause.
    let forks = peek(&f, &g, "total_forks");
    assert_eq!(
        step(&mut f, &mut g, &|f, g| poke(
            f,
            g,
            "total_forks",
            forks + 1,
            8
        )),
        (0, 1, 0)
    );
    // A writer holds tasklist_lock (a fork or exit under way): walked.
    assert_eq!(
        step(&mut f, &mut g, &|f, g| poke(f, g, "tasklist_lock", 0xff, 4)),
        (0, 1, 0)
    );
    poke(&f, &mut g, "tasklist_lock", 0, 4);
    // kthreadd exits (off the list, one thread fewer): walked, and gone from the list.
    let threads = peek(&f, &g, "nr_threads") as u32;
    assert_eq!(
        step(&mut f, &mut g, &|f, g| {
            unlink(f, g, 2);
            poke(f, g, "nr_threads", u64::from(threads - 1), 4);
        }),
        (0, 1, 0)
    );
    let list = introspection::tasks::TaskReader::new(&f.kernel, &g)
        .list()
        .unwrap();
    assert!(list.by_pid(2).is_none());
    // An exit half made when the early walk began (`__unhash_process` has counted one
    // thread fewer and not yet unlinked the task, the writer holds the lock) and
    // finished before the pause: the counters then equal the pause's, but the early
    // walk still found the task. Walked in the pause.
    let threads = peek(&f, &g, "nr_threads") as u32;
    poke(&f, &mut g, "nr_threads", u64::from(threads - 1), 4);
    poke(&f, &mut g, "tasklist_lock", 0xff, 4);
    assert_eq!(
        step(&mut f, &mut g, &|f, g| {
            unlink(f, g, 30);
            poke(f, g, "tasklist_lock", 0, 4);
        }),
        (0, 1, 0)
    );
    // A kernel that unlinked a task without counting it breaks what the stamp relies
    // on: the early list is taken, and verification against a walk in the same pause
    // counts the difference.
    assert_eq!(step(&mut f, &mut g, &|f, g| unlink(f, g, 20)), (1, 0, 1));
}

#[test]
fn a_refreshed_list_is_the_same_list_for_every_check_when_a_sleeper_was_woken_elsewhere() {
    use introspection::tasks::TaskReader;
    let f = fixture();
    let mut g = f.sk.guest.clone();
    let k = &f.kernel;
    let early = TaskReader::new(k, &introspection::Unconfirmed(&g))
        .list()
        .unwrap();
    // Woken onto the other CPU, not yet run: a new state and CPU, nothing else.
    let woken = early.by_pid(12).unwrap().addr;
    let l = &k.layout.task;
    for (off, v) in [(l.state, 0u32), (l.cpu, 1)] {
        let pa = k.memory(&g).translate(woken + off).unwrap();
        g.write_phys(pa, &v.to_le_bytes()).unwrap();
    }
    let reader = TaskReader::new(k, &g);
    let refreshed = reader.refresh(early).unwrap().list;
    let fresh = reader.list().unwrap();
    assert_ne!(
        refreshed, fresh,
        "the woken task's state and CPU are the early read's"
    );
    assert!(crate::transition::early::same_list(&fresh, &refreshed));
    // A task whose switch count moved, or that is on a CPU, is another list.
    let mut ran = refreshed.clone();
    ran.tasks[1].switches += 1;
    assert!(!crate::transition::early::same_list(&fresh, &ran));
    let mut running = refreshed.clone();
    running.tasks[1].on_cpu = !running.tasks[1].on_cpu;
    assert!(!crate::transition::early::same_list(&fresh, &running));
}

/// A patch linked while the guest runs (`prepare`) loads in a later pause as `load` would
/// have loaded it; one prepared before another load changed the area is refused in the
/// pause, writing nothing, and loads once prepared again.
#[test]
fn a_prepared_patch_loads_as_load_would_and_a_stale_one_is_refused() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let a = f
        .engine
        .prepare(&g, &f.kernel, &patch_named("a", "meminfo_proc_show"))
        .unwrap();
    let b = f
        .engine
        .prepare(&g, &f.kernel, &patch_named("b", "cmdline_proc_show"))
        .unwrap();
    assert_eq!((a.name(), b.name()), ("a", "b"));
    f.engine.load_prepared(&mut g, &f.kernel, a).unwrap();

    // b was linked where a now is.
    let before = g.clone();
    let err = f.engine.load_prepared(&mut g, &f.kernel, b).unwrap_err();
    assert!(err.to_string().contains("load it again"), "{err}");
    assert!(g.ram == before.ram, "a refused load wrote to the guest");
    assert_eq!(f.engine.patches().len(), 1);

    let b = f
        .engine
        .prepare(&g, &f.kernel, &patch_named("b", "cmdline_proc_show"))
        .unwrap();
    f.engine.load_prepared(&mut g, &f.kernel, b).unwrap();
    let (pa, pb) = (f.engine.patch("a").unwrap(), f.engine.patch("b").unwrap());
    assert!(pa.runs.code.end <= pb.runs.code.start || pb.runs.code.end <= pa.runs.code.start);

    // The same patch through load, on a fresh engine and guest: the same functions.
    let mut f2 = fixture();
    let mut g2 = f2.sk.guest.clone();
    f2.engine
        .load(&mut g2, &f2.kernel, &patch_named("a", "meminfo_proc_show"))
        .unwrap();
    assert_eq!(
        f2.engine.patch("a").unwrap().objects,
        f.engine.patch("a").unwrap().objects
    );
    enable(&mut f, &mut g, "b").unwrap();
}

/// A patch is objects holding functions (klp_patch → klp_object → klp_func): today every
/// loaded patch has one object, vmlinux, with each function it replaces.
#[test]
fn a_loaded_patch_is_its_objects_functions() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    f.engine
        .load(&mut g, &f.kernel, &patch_named("a", "meminfo_proc_show"))
        .unwrap();
    let p = f.engine.patch("a").unwrap();
    assert_eq!(p.objects.len(), 1);
    assert_eq!(p.objects[0].name, crate::ObjectName::Vmlinux);
    assert_eq!(p.objects[0].name.to_string(), "vmlinux");
    let names: Vec<&str> = p.funcs().map(|x| x.old.name.as_str()).collect();
    assert_eq!(names, ["meminfo_proc_show"]);
    assert_eq!(
        crate::ObjectName::Module("virtio_net".into()).to_string(),
        "virtio_net"
    );
}

/// The synthetic guest as a VMM would drive it: it "runs" between pauses (nothing in it
/// changes by itself), and counts the pauses it was asked for.
struct SynthControl<'g> {
    guest: &'g mut SynthGuest,
    pauses: u32,
    /// The guest-call interrupts sent.
    ipis: Vec<crate::guestcall::Ipi>,
}

impl crate::GuestControl for SynthControl<'_> {
    fn running<R>(&self, f: impl FnOnce(&dyn GuestRam) -> R) -> R {
        f(&*self.guest)
    }

    fn make_resident(&self, _: &[introspection::PhysRange]) {}

    fn paused<R>(
        &mut self,
        f: impl FnOnce(&mut dyn GuestWriter) -> R,
    ) -> Result<(R, std::time::Duration), crate::PauseError> {
        self.pauses += 1;
        Ok((f(&mut *self.guest), std::time::Duration::from_micros(5)))
    }

    fn interrupt(&mut self, ipi: crate::guestcall::Ipi) -> Result<(), crate::PauseError> {
        self.ipis.push(ipi);
        Ok(())
    }
}

/// The VMM's two entry points: a load-and-enable takes one pause and starts the
/// transition; `drive` ticks it, each tick one pause, until it is done and the site
/// jumps to the new code. A load-and-enable the patch stack refuses takes no pause.
#[test]
fn load_and_enable_then_drive_until_done_pausing_once_per_step() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let site_before = site_bytes(&f, &g, "meminfo_proc_show");
    let mut vm = SynthControl {
        guest: &mut g,
        pauses: 0,
        ipis: Vec::new(),
    };
    let args = crate::EnableArgs {
        consistency: Consistency::PerTask,
        timeout: None,
    };
    let kp = patch_named("a", "meminfo_proc_show");
    let loaded = f
        .engine
        .load_and_enable(&mut vm, &f.kernel, &kp, Some(args), f.now)
        .unwrap();
    assert_eq!((loaded.name.as_str(), vm.pauses), ("a", 1));
    let id = loaded.transition.expect("a transition");
    let mut due = Some(f.now);
    while let Some(d) = due {
        assert!(vm.pauses < 10, "the transition never ended");
        f.now = f.now.max(d);
        due = f.engine.drive(&mut vm, &f.kernel, f.now).unwrap();
    }
    let t = f.engine.history().last().unwrap();
    assert_eq!((t.id, t.outcome.clone()), (id, Outcome::Done));
    assert_eq!(t.pauses_us.len() as u32, vm.pauses - 1);
    assert_eq!(f.engine.patch("a").unwrap().state, PatchState::Enabled);
    assert_ne!(site_bytes(&f, &g, "meminfo_proc_show"), site_before);

    // Loaded again by name: refused by the stack before any pause.
    let mut vm = SynthControl {
        guest: &mut g,
        pauses: 0,
        ipis: Vec::new(),
    };
    let err = f
        .engine
        .load_and_enable(&mut vm, &f.kernel, &kp, Some(args), f.now)
        .unwrap_err();
    assert!(matches!(err, KpError::AlreadyLoaded(_)), "{err}");
    assert_eq!(vm.pauses, 0);
}

/// A patch of a module's function says which module has it (lpvmm patches vmlinux
/// functions only, for now), and writes nothing.
#[test]
fn a_module_function_as_the_target_is_refused_naming_its_module() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let before = g.clone();
    let err = f
        .engine
        .load(&mut g, &f.kernel, &patch_named("m", "tunx_do_read"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "tunx_do_read is a function of module tunx, not of vmlinux: name its module \
             (LPVMM_REPLACE_IN(tunx, tunx_do_read, ...))"
        ),
        "{err}"
    );
    assert!(g.ram == before.ram, "a refused load wrote to the guest");
    let err = f
        .engine
        .load(
            &mut g,
            &f.kernel,
            &patch_named("n", "no_such_function_anywhere"),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown symbol"), "{err}");
}

// --- Functions of loaded modules (objects besides vmlinux). ---

/// A patch of the synthetic `tunx` module's read (`tunx_do_read`, where task 30
/// sleeps), whose code uses the module's own data (`tunx_debug`) and a vmlinux function.
const TUNX_READ: &str = r#"
#include <lpvmm/patch.h>
extern int tunx_debug;
extern int seq_printf(void *m, const char *fmt, ...);
int new_tunx_do_read(void *m)
{
	return seq_printf(m, "%d\n", tunx_debug);
}
LPVMM_PATCH("tunfix");
LPVMM_REPLACE_IN(tunx, tunx_do_read, new_tunx_do_read);
"#;

fn module_text(f: &Fixture, g: &SynthGuest, module: &str) -> Vec<u8> {
    let m = f.sk.modules.iter().find(|m| m.name == module).unwrap();
    f.kernel
        .memory(g)
        .read_vec(m.text.start, (m.text.end - m.text.start) as usize)
        .unwrap()
}

#[test]
fn a_module_function_is_patched_as_its_own_object_held_by_its_sleeper_alone() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let before = module_text(&f, &g, "tunx");
    f.engine
        .load(&mut g, &f.kernel, &kp(TUNX_READ, &[]))
        .unwrap();
    let p = f.engine.patch("tunfix").unwrap().clone();
    assert_eq!(
        p.objects
            .iter()
            .map(|o| o.name.to_string())
            .collect::<Vec<_>>(),
        ["tunx"]
    );
    let func = p.funcs().next().unwrap();
    assert_eq!(func.old.to_string(), "tunx:tunx_do_read");
    assert_eq!(func.old_addr, f.sk.function("tunx_do_read"));
    // Its code resolved the module's data in the module, the rest in vmlinux.
    let import = |n: &str| p.imports.iter().find(|i| i.name == n).unwrap().addr;
    let tunx_debug = f.sk.modules[0]
        .symbols
        .iter()
        .find(|s| s.name == "tunx_debug")
        .unwrap()
        .addr;
    assert_eq!(import("tunx_debug"), tunx_debug);
    assert_eq!(import("seq_printf"), f.sk.function("seq_printf"));

    // Per-task: only the task asleep in tunx_do_read waits; it moves when it leaves.
    let t = run(
        &mut f,
        &mut g,
        "tunfix",
        Op::Enable,
        Consistency::PerTask,
        1,
    )
    .unwrap();
    assert_eq!(t.outcome, Outcome::Pending);
    assert_eq!(t.blockers.iter().map(|b| b.pid).collect::<Vec<_>>(), [30]);
    assert_eq!(t.blockers[0].reason, "tunx:tunx_do_read is on its stack");
    move_out_of(&f, &mut g, 30, "tunx_do_read", "tunx_get_socket");
    let t = tick(&mut f, &mut g, 1).unwrap();
    assert_eq!(t.outcome, Outcome::Done);
    assert_eq!(site_target(&f, &g, "tunx_do_read"), Some(func.new_addr));

    // Disabled and unloaded: the module's text is as it was, byte for byte.
    disable(&mut f, &mut g, "tunfix").unwrap();
    f.engine.unload(&mut g, &f.kernel, "tunfix").unwrap();
    assert_eq!(module_text(&f, &g, "tunx"), before);
}

#[test]
fn a_module_part_that_cannot_be_found_is_refused_by_name() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let before = g.clone();
    for (source, want) in [
        (
            TUNX_READ.replace(
                "LPVMM_REPLACE_IN(tunx, tunx_do_read,",
                "LPVMM_REPLACE(pipe_read,",
            ),
            "unknown symbol 'tunx_debug' in vmlinux; module tunx has it",
        ),
        (
            TUNX_READ.replace(
                "LPVMM_REPLACE_IN(tunx, tunx_do_read,",
                "LPVMM_REPLACE_IN(tunx, pipe_read,",
            ),
            "module tunx: unknown symbol 'pipe_read'",
        ),
        (
            TUNX_READ.replace(
                "LPVMM_REPLACE_IN(tunx, tunx_do_read,",
                "LPVMM_REPLACE_IN(tunx, tunx_fops,",
            ),
            "tunx:tunx_fops is not a function of module tunx",
        ),
    ] {
        let e = f
            .engine
            .load(&mut g, &f.kernel, &kp(&source, &[]))
            .unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
        assert!(g.ram == before.ram, "a refused load wrote to the guest");
    }
}

/// Take the module behind the first link of the `modules` list off the list, as its
/// unload does before its memory is freed.
fn unlink_module(f: &Fixture, g: &mut SynthGuest, name: &str) {
    let head = f.kernel.symbols.addr("modules").unwrap();
    let m = f.kernel.memory(g);
    let (mut prev, mut link) = (head, m.u64(head).unwrap());
    let list_off = f.kernel.layout.modules.as_ref().unwrap().list;
    let addr = f.sk.modules.iter().find(|b| b.name == name).unwrap().addr;
    while link != addr + list_off {
        (prev, link) = (link, m.u64(link).unwrap());
    }
    let (pa, next) = (m.translate(prev).unwrap(), m.u64(link).unwrap());
    drop(m);
    g.write_phys(pa, &next.to_le_bytes()).unwrap();
}

#[test]
fn a_site_in_a_module_the_guest_unloaded_is_never_written() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    f.engine
        .load(&mut g, &f.kernel, &kp(TUNX_READ, &[]))
        .unwrap();
    // The reader leaves the module (its file closed), and the module goes.
    move_out_of(&f, &mut g, 30, "tunx_do_read", "ksys_read");
    move_out_of(&f, &mut g, 30, "tunx_chr_read_iter", "ksys_read");
    enable(&mut f, &mut g, "tunfix").unwrap();
    unlink_module(&f, &mut g, "tunx");
    let before = g.ram.clone();
    let e = disable(&mut f, &mut g, "tunfix").unwrap_err();
    assert!(
        e.contains("module tunx was unloaded while tunx:tunx_do_read was patched"),
        "{e}"
    );
    assert!(g.ram == before, "nothing was written");
}

// --- Modules loaded later: the notifier and its doorbell. ---

/// A patch of `dummyx` (the synthetic kernel's second module), whose code uses the
/// module's own data (`dummyx_link_ops`, resolved only when the module is there) and a
/// vmlinux function.
const DUMMYX_STATS: &str = r#"
#include <lpvmm/patch.h>
extern char dummyx_link_ops[];
extern int seq_printf(void *m, const char *fmt, ...);
int new_dummyx_get_stats(void *m)
{
	return seq_printf(m, "%p\n", dummyx_link_ops);
}
LPVMM_PATCH("dumfix");
LPVMM_REPLACE_IN(dummyx, dummyx_get_stats, new_dummyx_get_stats);
"#;

/// Write `value` over `len` bytes at guest virtual `va`.
fn poke_va(f: &Fixture, g: &mut SynthGuest, va: u64, value: u64, len: usize) {
    let pa = f.kernel.memory(g).translate(va).unwrap();
    g.write_phys(pa, &value.to_le_bytes()[..len]).unwrap();
}

/// Put module `name`'s state to `state` (0 live, 1 coming, 2 going, 3 unformed, as
/// the synthetic kernel numbers them).
fn set_module_state(f: &Fixture, g: &mut SynthGuest, name: &str, state: usize) {
    let l = f.kernel.layout.modules.as_ref().unwrap();
    let m = f.sk.modules.iter().find(|m| m.name == name).unwrap().addr;
    poke_va(f, g, m + l.state, l.states[state], l.state_size as usize);
}

/// A ring of the notifier's doorbell for module `name` and event `state` (1 coming, 2
/// going).
fn ring(f: &Fixture, name: &str, state: usize) -> crate::notifier::Ring {
    let l = f.kernel.layout.modules.as_ref().unwrap();
    crate::notifier::Ring {
        rip: f.engine.notifier().unwrap().ring_ip,
        token: BELL.token,
        module: f.sk.modules.iter().find(|m| m.name == name).unwrap().addr,
        action: l.states[state],
        result: None,
    }
}

/// Whether the code of `patch`'s module function refers to `addr` (as a 32-bit
/// sign-extended immediate or displacement, as `-mcmodel=kernel` code does).
fn refers_to(f: &Fixture, g: &SynthGuest, patch: &str, addr: u64) -> bool {
    let p = f.engine.patch(patch).unwrap();
    let o = p.objects.iter().find(|o| !o.replaces.is_empty()).unwrap();
    let nf = &o.replaces[0];
    let code = f
        .kernel
        .memory(g)
        .read_vec(nf.new_addr, nf.new_size as usize)
        .unwrap();
    let want = (addr as u32).to_le_bytes();
    code.windows(4).any(|w| w == want)
}

/// The address of the trap a patch's pending symbols point at: the 16-byte aligned
/// `ud2` after its code.
fn trap_of(f: &Fixture, g: &SynthGuest, patch: &str) -> u64 {
    let p = f.engine.patch(patch).unwrap();
    let code = f
        .kernel
        .memory(g)
        .read_vec(
            p.runs.code.start,
            (p.runs.code.end - p.runs.code.start) as usize,
        )
        .unwrap();
    let at = (0..code.len())
        .step_by(16)
        .find(|&i| code[i..].starts_with(&crate::load::link::TRAP))
        .unwrap();
    p.runs.code.start + at as u64
}

/// A module not loaded when its patch is: the patch loads with its part waiting and the
/// notifier on the guest's chain; the module's COMING links the part (its symbols the
/// patch uses, pending until then) and redirects its function; its GOING gives the site
/// back and points the symbols at the trap again; loaded again, patched again.
#[test]
fn a_module_loaded_later_is_patched_at_coming_and_let_go_at_going() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    unlink_module(&f, &mut g, "dummyx");
    f.engine
        .load(&mut g, &f.kernel, &kp(DUMMYX_STATS, &[]))
        .unwrap();
    let p = f.engine.patch("dumfix").unwrap().clone();
    assert_eq!(p.objects.len(), 1);
    assert_eq!(p.objects[0].state, crate::patch::ObjectState::Waiting);
    assert!(p.objects[0].funcs.is_empty());
    let pending = p
        .imports
        .iter()
        .find(|i| i.name == "dummyx_link_ops")
        .unwrap();
    assert_eq!(pending.addr, 0, "pending until dummyx loads");
    // The notifier heads the chain, its block calling the stub, which rings at ring_ip.
    let n = f.engine.notifier().unwrap().clone();
    assert_eq!(peek(&f, &g, "module_notify_list"), 0, "rwsem.count still 0");
    let head = f.kernel.symbols.addr("module_notify_list").unwrap() + 40;
    assert_eq!(f.kernel.memory(&g).u64(head).unwrap(), n.block);
    assert_eq!(f.kernel.memory(&g).u64(n.block).unwrap(), n.stub.start);
    let stub = f.kernel.memory(&g).read_vec(n.stub.start, 160).unwrap();
    assert_eq!(&stub[..4], &[0xf3, 0x0f, 0x1e, 0xfa], "endbr64 first");
    let out = (n.ring_ip - n.stub.start) as usize;
    assert_eq!(stub[out], 0xef, "out %eax,(%dx) at ring_ip");
    // Its frame: from just after `push %rbp; mov %rsp,%rbp` to its `pop %rbp`. A task
    // interrupted there (ringing: at ring_ip, or just after the `out`) unwinds by the
    // frame pointer; one interrupted at the stub's first instructions does not.
    let framed = (n.framed.start - n.stub.start) as usize;
    assert_eq!(
        &stub[framed - 4..framed],
        &[0x55, 0x48, 0x89, 0xe5],
        "push rbp; mov rbp,rsp"
    );
    assert_eq!(
        stub[(n.framed.end - 1 - n.stub.start) as usize],
        0x5d,
        "pop rbp"
    );
    use introspection::stack::ExtraCode;
    let code = crate::transition::tick::PatchCode(&f.engine);
    for ip in [n.ring_ip, n.ring_ip + 1] {
        assert_eq!(
            code.unwind_entry(ip, true),
            Some(introspection::orc::OrcEntry::FRAME_POINTER),
            "{ip:#x}"
        );
    }
    assert_eq!(code.unwind_entry(n.stub.start, true), None);
    assert_eq!(code.unwind_entry(n.framed.end, true), None, "after pop rbp");
    let trap = trap_of(&f, &g, "dumfix");
    assert!(refers_to(&f, &g, "dumfix", trap));
    // Enabled while dummyx is absent: nothing to move, done at once.
    enable(&mut f, &mut g, "dumfix").unwrap();
    assert_eq!(state(&f, "dumfix"), PatchState::Enabled);

    // The guest loads dummyx: back on the list, COMING.
    let stats = f.sk.function("dummyx_get_stats");
    let link_ops = f.sk.modules[1]
        .symbols
        .iter()
        .find(|s| s.name == "dummyx_link_ops")
        .unwrap()
        .addr;
    relist_newest(&f, &mut g, "dummyx");
    set_module_state(&f, &mut g, "dummyx", 1);
    let before = g.ram.clone();
    let bad = crate::notifier::Ring {
        token: 1,
        ..ring(&f, "dummyx", 1)
    };
    let a = f.engine.module_ring(&mut g, &f.kernel, bad);
    assert!(
        !a.again && a.ret == 0 && g.ram == before,
        "a bad token changes nothing"
    );
    let a = f
        .engine
        .module_ring(&mut g, &f.kernel, ring(&f, "dummyx", 1));
    assert_eq!(
        (a.ret, a.again, a.message),
        (0, false, 0),
        "{:?}",
        f.engine.module_events()
    );
    let func = f
        .engine
        .patch("dumfix")
        .unwrap()
        .funcs()
        .next()
        .unwrap()
        .clone();
    assert_eq!(func.old_addr, stats);
    assert_eq!(site_target(&f, &g, "dummyx_get_stats"), Some(func.new_addr));
    assert!(refers_to(&f, &g, "dumfix", link_ops) && !refers_to(&f, &g, "dumfix", trap));
    let import = |f: &Fixture, n: &str| {
        f.engine
            .patch("dumfix")
            .unwrap()
            .imports
            .iter()
            .find(|i| i.name == n)
            .unwrap()
            .addr
    };
    assert_eq!(import(&f, "dummyx_link_ops"), link_ops);

    // GOING: the site given back, the symbol at the trap again.
    set_module_state(&f, &mut g, "dummyx", 2);
    let a = f
        .engine
        .module_ring(&mut g, &f.kernel, ring(&f, "dummyx", 2));
    assert_eq!((a.ret, a.again), (0, false));
    assert_eq!(site_bytes(&f, &g, "dummyx_get_stats"), FENTRY_NOP);
    assert!(refers_to(&f, &g, "dumfix", trap) && !refers_to(&f, &g, "dumfix", link_ops));
    assert_eq!(import(&f, "dummyx_link_ops"), 0);
    let p = f.engine.patch("dumfix").unwrap();
    assert_eq!(p.objects[0].state, crate::patch::ObjectState::Waiting);

    // Loaded again: patched again. Disabled while loaded: original.
    set_module_state(&f, &mut g, "dummyx", 1);
    f.engine
        .module_ring(&mut g, &f.kernel, ring(&f, "dummyx", 1));
    assert_eq!(site_target(&f, &g, "dummyx_get_stats"), Some(func.new_addr));
    disable(&mut f, &mut g, "dumfix").unwrap();
    assert_eq!(site_bytes(&f, &g, "dummyx_get_stats"), FENTRY_NOP);
    let events: Vec<(String, bool)> = f
        .engine
        .module_events()
        .iter()
        .map(|e| (e.action.clone(), e.refused))
        .collect();
    assert_eq!(events.len(), 3, "{events:?}");
}

/// Put module `name` (the newest, which [`unlink_module`] took off) back at the head
/// of the module list, as its load does (its own link still points at the next one).
fn relist_newest(f: &Fixture, g: &mut SynthGuest, name: &str) {
    let head = f.kernel.symbols.addr("modules").unwrap();
    let l = f.kernel.layout.modules.as_ref().unwrap();
    let m = f.sk.modules.iter().find(|m| m.name == name).unwrap().addr;
    poke_va(f, g, head, m + l.list, 8);
}

/// A module part that cannot be linked refuses the module's load, with a line for the
/// guest's log, and changes nothing (not even another patch's part for the module); a
/// ring during a transition is answered "ring again".
#[test]
fn a_module_part_that_cannot_link_refuses_the_load_and_changes_nothing() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    unlink_module(&f, &mut g, "dummyx");
    f.engine
        .load(&mut g, &f.kernel, &kp(DUMMYX_STATS, &[]))
        .unwrap();
    let broken = DUMMYX_STATS
        .replace("dummyx_link_ops", "no_such_symbol")
        .replace("dumfix", "broken")
        .replace("new_dummyx_get_stats", "other_get_stats")
        .replace("dummyx_get_stats,", "dummyx_xmit,");
    f.engine.load(&mut g, &f.kernel, &kp(&broken, &[])).unwrap();
    enable(&mut f, &mut g, "dumfix").unwrap();
    enable(&mut f, &mut g, "broken").unwrap();
    relist_newest(&f, &mut g, "dummyx");
    set_module_state(&f, &mut g, "dummyx", 1);
    let before = g.ram.clone();

    // A transition in flight (pipefix's, held by the tasks asleep in pipe_read): ring
    // again later.
    let t = pipefix_per_task(&mut f, &mut g, 1);
    assert_eq!(t.outcome, Outcome::Pending);
    let a = f
        .engine
        .module_ring(&mut g, &f.kernel, ring(&f, "dummyx", 1));
    assert!(a.again, "during a transition");
    // Answered without a pause: "ring again" for dummyx, done for tunx (no part).
    let quick = |f: &Fixture, g: &SynthGuest, name: &str| {
        f.engine
            .module_ring_unpaused(g, &f.kernel, ring(f, name, 1))
    };
    assert_eq!(
        quick(&f, &g, "dummyx"),
        Some(crate::notifier::Answer::RETRY)
    );
    assert!(quick(&f, &g, "tunx").is_some_and(|a| !a.again && a.ret == 0));
    f.engine.request(Request::Reverse).unwrap();
    tick(&mut f, &mut g, 1).unwrap();
    assert!(f.engine.active().is_none());
    f.engine.unload(&mut g, &f.kernel, "pipefix").unwrap();
    assert_eq!(quick(&f, &g, "dummyx"), None, "idle: handled in a pause");
    let before_ring = g.ram.clone();

    let a = f
        .engine
        .module_ring(&mut g, &f.kernel, ring(&f, "dummyx", 1));
    assert_eq!(a.ret, crate::notifier::REFUSE_EINVAL);
    assert!(!a.again && a.message != 0);
    let line = f.kernel.memory(&g).read_vec(a.message, 200).unwrap();
    let line =
        String::from_utf8_lossy(&line[..line.iter().position(|&b| b == 0).unwrap()]).into_owned();
    assert!(
        line == "\u{1}3lpvmm: refusing module dummyx: patch broken: symbol: module dummyx: \
                 unknown symbol 'no_such_symbol'\n",
        "{line:?}"
    );
    // Only the message slot changed: no site, no relinked byte.
    let slot = f.kernel.memory(&g).translate(a.message).unwrap() as usize;
    let mut expect = before_ring.clone();
    expect[slot..slot + 256].copy_from_slice(&g.ram[slot..slot + 256]);
    assert!(
        g.ram == expect,
        "a refused COMING wrote more than its message"
    );
    assert_eq!(site_bytes(&f, &g, "dummyx_get_stats"), FENTRY_NOP);
    for p in ["dumfix", "broken"] {
        assert_eq!(
            f.engine.patch(p).unwrap().objects[0].state,
            crate::patch::ObjectState::Waiting
        );
    }
    assert!(f.engine.module_events().back().unwrap().refused);
    let _ = before;
}

/// Atomic replace and force cover module functions as vmlinux's: a cumulative patch
/// that does not name the module function returns it to the original in its one
/// transition; a cumulative patch naming a function of a module not loaded takes it
/// over when the module arrives, the replaced patch's version not.
#[test]
fn atomic_replace_covers_module_functions_loaded_or_not() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let before = module_text(&f, &g, "tunx");
    let a = TUNX_READ
        .replace("tunfix", "a")
        .replace("tunx_do_read,", "tunx_get_socket,");
    f.engine.load(&mut g, &f.kernel, &kp(&a, &[])).unwrap();
    enable(&mut f, &mut g, "a").unwrap();
    assert!(site_target(&f, &g, "tunx_get_socket").is_some());
    let c = patch_with("c", "meminfo_proc_show", "LPVMM_ATOMIC_REPLACE();");
    f.engine.load(&mut g, &f.kernel, &c).unwrap();
    let t = run(&mut f, &mut g, "c", Op::Enable, Consistency::PerTask, 1).unwrap();
    assert_eq!(t.outcome, Outcome::Done);
    let names: Vec<&str> = t.changes.iter().map(|c| c.name.as_str()).collect();
    assert!(names.contains(&"tunx:tunx_get_socket"), "{names:?}");
    assert_eq!(site_bytes(&f, &g, "tunx_get_socket"), FENTRY_NOP);
    assert_eq!(state(&f, "a"), PatchState::Replaced);
    f.engine.unload(&mut g, &f.kernel, "a").unwrap();
    disable(&mut f, &mut g, "c").unwrap();
    f.engine.unload(&mut g, &f.kernel, "c").unwrap();
    assert_eq!(module_text(&f, &g, "tunx"), before);

    // dummyx not loaded: b (older) and cumulative d both name its function; when it
    // arrives, d's version is the one its site gets.
    unlink_module(&f, &mut g, "dummyx");
    let b = DUMMYX_STATS.replace("dumfix", "b");
    let d = DUMMYX_STATS
        .replace("dumfix", "d")
        .replace("new_dummyx_get_stats", "d_get_stats")
        .replace(
            "LPVMM_REPLACE_IN",
            "LPVMM_ATOMIC_REPLACE();\nLPVMM_REPLACE_IN",
        );
    f.engine.load(&mut g, &f.kernel, &kp(&b, &[])).unwrap();
    enable(&mut f, &mut g, "b").unwrap();
    f.engine.load(&mut g, &f.kernel, &kp(&d, &[])).unwrap();
    enable(&mut f, &mut g, "d").unwrap();
    assert_eq!(state(&f, "b"), PatchState::Replaced);
    relist_newest(&f, &mut g, "dummyx");
    set_module_state(&f, &mut g, "dummyx", 1);
    let a = f
        .engine
        .module_ring(&mut g, &f.kernel, ring(&f, "dummyx", 1));
    assert_eq!(
        (a.ret, a.again),
        (0, false),
        "{:?}",
        f.engine.module_events()
    );
    let d_new = f
        .engine
        .patch("d")
        .unwrap()
        .funcs()
        .next()
        .unwrap()
        .new_addr;
    assert_eq!(site_target(&f, &g, "dummyx_get_stats"), Some(d_new));
}

// --- Callbacks: run in the guest through the guest-call machinery. ---

/// A patch of meminfo_proc_show with the four callbacks for vmlinux.
const CALLBACKS: &str = r#"
#include <lpvmm/patch.h>
int new_meminfo(void *m) { return 0; }
int cb_pre(void *mod) { return 0; }
int cb_post(void *mod) { return 0; }
int cb_pre_un(void *mod) { return 0; }
int cb_post_un(void *mod) { return 0; }
LPVMM_PATCH("cb");
LPVMM_REPLACE(meminfo_proc_show, new_meminfo);
LPVMM_PRE_PATCH(cb_pre);
LPVMM_POST_PATCH(cb_post);
LPVMM_PRE_UNPATCH(cb_pre_un);
LPVMM_POST_UNPATCH(cb_post_un);
"#;

/// What the guest does with a guest call queued on CPU 0: its IPI handler takes the
/// call off `call_single_queue` (unlocking it), its kworker runs the mailbox's function,
/// which returns `ret`. Returns the function called.
fn guest_runs_call(f: &Fixture, g: &mut SynthGuest, ret: i32) -> u64 {
    let c = f.engine.caller.clone().expect("the guest-call machinery");
    let k = &f.kernel;
    let l = k.layout.patcher.guest_call.as_ref().unwrap();
    let m = k.memory(g);
    let base = m.u64(k.addrs.per_cpu_offset).unwrap();
    let head = base + k.symbols.addr("call_single_queue").unwrap();
    assert_eq!(m.u64(head).unwrap(), c.csd, "the call heads CPU 0's queue");
    assert_eq!(m.u32(c.csd + l.csd_flags).unwrap(), 1, "locked, async");
    assert_eq!(m.u64(c.csd + l.csd_func).unwrap(), c.ipi_fn);
    let next = m.u64(c.csd + l.csd_next).unwrap();
    let func = m.u64(c.mailbox + 8).unwrap();
    drop(m);
    poke_va(f, g, head, next, 8);
    poke_va(f, g, c.csd + l.csd_flags, 0, 4);
    poke_va(f, g, c.mailbox, 3 | (u64::from(ret as u32) << 32), 8);
    func
}

/// Drive the active transition until it ends, the guest running each call it queues
/// with the return `rets` gives for that function; the functions called, in order.
fn drive_with_calls(f: &mut Fixture, g: &mut SynthGuest, rets: &dyn Fn(u64) -> i32) -> Vec<u64> {
    let mut called = Vec::new();
    for _ in 0..50 {
        if f.engine.active().is_none() {
            break;
        }
        f.now += 1000;
        let mut vm = SynthControl {
            guest: &mut *g,
            pauses: 0,
            ipis: Vec::new(),
        };
        f.engine.drive(&mut vm, &f.kernel, f.now).unwrap();
        let ipis = vm.ipis.len();
        assert!(ipis <= 1);
        if ipis == 1 {
            assert_eq!(vm.ipis[0].apic_id, 0);
            let c = f.engine.caller.clone().unwrap();
            let func = f.kernel.memory(g).u64(c.mailbox + 8).unwrap();
            called.push(guest_runs_call(f, g, rets(func)));
        }
    }
    assert!(f.engine.active().is_none(), "the transition did not end");
    called
}

fn callback_addr(f: &Fixture, patch: &str, func: &str) -> u64 {
    let p = f.engine.patch(patch).unwrap();
    p.callbacks.iter().find(|c| c.func == func).unwrap().addr
}

/// Pre-patch before the enable's first tick, post-patch after it completed;
/// pre-unpatch and post-unpatch around the disable; each queued on CPU 0's
/// call_single_queue with the guest-call machinery, and the transition ends only once
/// they returned.
#[test]
fn callbacks_run_in_the_guest_around_each_transition() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    f.engine
        .load(&mut g, &f.kernel, &kp(CALLBACKS, &[]))
        .unwrap();
    let begin = |op| Begin {
        patch: "cb".into(),
        op,
        consistency: Consistency::PerTask,
        timeout: None,
        unload_on_failure: false,
    };
    f.engine.begin(begin(Op::Enable), f.now).unwrap();
    let called = drive_with_calls(&mut f, &mut g, &|_| 0);
    let names = |f: &Fixture, v: &[u64]| -> Vec<String> {
        let p = f.engine.patch("cb").unwrap();
        v.iter()
            .map(|a| {
                p.callbacks
                    .iter()
                    .find(|c| c.addr == *a)
                    .unwrap()
                    .func
                    .clone()
            })
            .collect()
    };
    assert_eq!(names(&f, &called), ["cb_pre", "cb_post"]);
    let t = f.engine.history().last().unwrap().clone();
    assert_eq!(t.outcome, Outcome::Done);
    assert_eq!(t.calls.ran.len(), 2);
    assert_eq!(state(&f, "cb"), PatchState::Enabled);
    assert_eq!(
        site_target(&f, &g, "meminfo_proc_show"),
        Some(new_addr(&f, "cb"))
    );

    f.engine.begin(begin(Op::Disable), f.now).unwrap();
    let called = drive_with_calls(&mut f, &mut g, &|_| 0);
    assert_eq!(names(&f, &called), ["cb_pre_un", "cb_post_un"]);
    assert_eq!(site_bytes(&f, &g, "meminfo_proc_show"), FENTRY_NOP);
    // The queue heads lpvmm pushed the calls onto were the guest's again at once: the
    // post-mortem holds none of them (the guest took the calls off).
    assert!(f.engine.post_mortem(&g).clean());
}

/// A pre-patch that returns non-zero refuses the enable before anything is written;
/// a patch loaded for that enable is unloaded; post-unpatch does not run for the object
/// whose pre-patch failed.
#[test]
fn a_failing_pre_patch_refuses_the_enable_and_writes_nothing() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let text_before = text(&f, &g);
    let mut vm = SynthControl {
        guest: &mut g,
        pauses: 0,
        ipis: Vec::new(),
    };
    let args = crate::EnableArgs {
        consistency: Consistency::PerTask,
        timeout: None,
    };
    f.engine
        .load_and_enable(&mut vm, &f.kernel, &kp(CALLBACKS, &[]), Some(args), f.now)
        .unwrap();
    let pre = callback_addr(&f, "cb", "cb_pre");
    let called = drive_with_calls(&mut f, &mut g, &|func| if func == pre { -19 } else { 0 });
    assert_eq!(
        called,
        [pre],
        "post-unpatch runs only where pre-patch succeeded"
    );
    let t = f.engine.history().last().unwrap().clone();
    assert_eq!(
        t.outcome,
        Outcome::Failed(
            "the pre-patch callback cb_pre of vmlinux returned -19: not enabled".into()
        )
    );
    assert!(
        f.engine.patch("cb").is_err(),
        "unloaded after its failed enable"
    );
    assert_eq!(text(&f, &g), text_before);
}

/// A module loaded later runs its object's callbacks in the loading task: the answer
/// to its ring asks the notifier's stub to call pre-patch (with the module), its
/// result comes with the next ring, then the part is linked and redirected, then
/// post-patch; a pre-patch's non-zero return refuses the module with that errno, the
/// module's sites untouched. Disabled patches' callbacks do not run.
#[test]
fn a_module_loaded_later_runs_its_callbacks_in_the_loading_task() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    unlink_module(&f, &mut g, "dummyx");
    let src = DUMMYX_STATS.replace(
        "LPVMM_REPLACE_IN(dummyx, dummyx_get_stats, new_dummyx_get_stats);",
        "LPVMM_REPLACE_IN(dummyx, dummyx_get_stats, new_dummyx_get_stats);\n\
         int pre(void *m) { return 0; }\nint post(void *m) { return 0; }\n\
         LPVMM_PRE_PATCH_IN(dummyx, pre);\nLPVMM_POST_PATCH_IN(dummyx, post);",
    );
    f.engine.load(&mut g, &f.kernel, &kp(&src, &[])).unwrap();
    enable(&mut f, &mut g, "dumfix").unwrap();
    relist_newest(&f, &mut g, "dummyx");
    set_module_state(&f, &mut g, "dummyx", 1);
    let module = f.sk.modules[1].addr;
    let (pre, post) = (
        callback_addr(&f, "dumfix", "pre"),
        callback_addr(&f, "dumfix", "post"),
    );
    let ring_with = |f: &Fixture, result| crate::notifier::Ring {
        result,
        ..ring(f, "dummyx", 1)
    };
    let a = f.engine.module_ring(&mut g, &f.kernel, ring_with(&f, None));
    assert_eq!(
        a.call,
        Some((pre, module)),
        "pre-patch first, with the module"
    );
    assert_eq!(site_bytes(&f, &g, "dummyx_get_stats"), FENTRY_NOP);
    let a = f
        .engine
        .module_ring(&mut g, &f.kernel, ring_with(&f, Some(0)));
    assert_eq!(
        a.call,
        Some((post, module)),
        "then post-patch, once redirected"
    );
    assert!(site_target(&f, &g, "dummyx_get_stats").is_some());
    let a = f
        .engine
        .module_ring(&mut g, &f.kernel, ring_with(&f, Some(0)));
    assert_eq!(a, crate::notifier::Answer::DONE);

    // Gone, and loaded again with a pre-patch that says no.
    set_module_state(&f, &mut g, "dummyx", 2);
    let going = crate::notifier::Ring {
        result: None,
        ..ring(&f, "dummyx", 2)
    };
    assert_eq!(
        f.engine.module_ring(&mut g, &f.kernel, going),
        crate::notifier::Answer::DONE
    );
    set_module_state(&f, &mut g, "dummyx", 1);
    let before = g.ram.clone();
    let a = f.engine.module_ring(&mut g, &f.kernel, ring_with(&f, None));
    assert_eq!(a.call, Some((pre, module)));
    let a = f
        .engine
        .module_ring(&mut g, &f.kernel, ring_with(&f, Some(-19)));
    assert_eq!(
        a.ret,
        crate::notifier::REFUSE | 20,
        "notifier_from_errno(-19)"
    );
    assert!(a.message != 0 && a.call.is_none());
    let slot = f.kernel.memory(&g).translate(a.message).unwrap() as usize;
    let mut expect = before.clone();
    expect[slot..slot + 256].copy_from_slice(&g.ram[slot..slot + 256]);
    assert!(
        g.ram == expect,
        "a refused module: only the log line written"
    );
    let e = f.engine.module_events().back().unwrap();
    assert!(
        e.refused
            && e.outcome
                .contains("its pre-patch callback pre returned -19"),
        "{e:?}"
    );
}

/// An enable reversed after its pre-patch ran: post-unpatch runs (not post-patch), as
/// the kernel's `klp_complete_transition` does for a transition turned back.
#[test]
fn a_reversed_enable_runs_post_unpatch() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let src = CALLBACKS.replace("meminfo_proc_show", "pipe_read");
    f.engine.load(&mut g, &f.kernel, &kp(&src, &[])).unwrap();
    f.engine
        .begin(
            Begin {
                patch: "cb".into(),
                op: Op::Enable,
                consistency: Consistency::PerTask,
                timeout: None,
                unload_on_failure: false,
            },
            f.now,
        )
        .unwrap();
    // Pre-patch, then ticks held by the tasks asleep in pipe_read.
    let mut called = Vec::new();
    for _ in 0..4 {
        f.now += 1000;
        let mut vm = SynthControl {
            guest: &mut g,
            pauses: 0,
            ipis: Vec::new(),
        };
        f.engine.drive(&mut vm, &f.kernel, f.now).unwrap();
        if !vm.ipis.is_empty() {
            called.push(guest_runs_call(&f, &mut g, 0));
        }
    }
    assert_eq!(called, [callback_addr(&f, "cb", "cb_pre")]);
    assert_eq!(f.engine.active().unwrap().outcome, Outcome::Pending);
    f.engine.request(Request::Reverse).unwrap();
    let after = drive_with_calls(&mut f, &mut g, &|_| 0);
    assert_eq!(after, [callback_addr(&f, "cb", "cb_post_un")]);
    assert_eq!(
        f.engine.history().last().unwrap().outcome,
        Outcome::Reversed
    );
}

/// A cumulative patch holding state 7 with the four state callbacks.
fn state_patch(name: &str) -> Vec<u8> {
    kp(
        &format!(
            r#"
#include <lpvmm/patch.h>
int new_meminfo(void *m) {{ return 0; }}
int st_setup(unsigned long id) {{ return 0; }}
int st_enable(unsigned long id) {{ return 0; }}
int st_disable(unsigned long id) {{ return 0; }}
int st_release(unsigned long id) {{ return 0; }}
LPVMM_PATCH("{name}");
LPVMM_ATOMIC_REPLACE();
LPVMM_STATE(7, 1);
LPVMM_REPLACE(meminfo_proc_show, new_meminfo);
LPVMM_STATE_SETUP(7, st_setup);
LPVMM_STATE_ENABLE(7, st_enable);
LPVMM_STATE_DISABLE(7, st_disable);
LPVMM_STATE_RELEASE(7, st_release);
"#
        ),
        &[],
    )
}

/// A state's callbacks run once across a chain of three cumulative patches holding it:
/// setup and enable with the first enable, disable and release with the last disable;
/// none when a patch takes the state over.
#[test]
fn state_callbacks_run_once_across_a_chain_of_cumulative_patches() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let mut ran: Vec<(String, String)> = Vec::new();
    let begin = |f: &mut Fixture, name: &str, op| {
        f.engine
            .begin(
                Begin {
                    patch: name.into(),
                    op,
                    consistency: Consistency::Immediate,
                    timeout: None,
                    unload_on_failure: false,
                },
                f.now,
            )
            .unwrap();
    };
    for name in ["s1", "s2", "s3"] {
        f.engine
            .load(&mut g, &f.kernel, &state_patch(name))
            .unwrap();
        begin(&mut f, name, Op::Enable);
        for a in drive_with_calls(&mut f, &mut g, &|_| 0) {
            let p = f
                .engine
                .patches()
                .iter()
                .find(|p| p.callbacks.iter().any(|c| c.addr == a));
            let p = p.unwrap();
            let c = p.callbacks.iter().find(|c| c.addr == a).unwrap();
            ran.push((p.name.clone(), c.func.clone()));
        }
    }
    begin(&mut f, "s3", Op::Disable);
    for a in drive_with_calls(&mut f, &mut g, &|_| 0) {
        let p = f.engine.patch("s3").unwrap();
        let c = p.callbacks.iter().find(|c| c.addr == a).unwrap();
        ran.push(("s3".into(), c.func.clone()));
    }
    let want: Vec<(String, String)> = [
        ("s1", "st_setup"),
        ("s1", "st_enable"),
        ("s3", "st_disable"),
        ("s3", "st_release"),
    ]
    .iter()
    .map(|(p, c)| (p.to_string(), c.to_string()))
    .collect();
    assert_eq!(ran, want);
}

/// Write a shadow variable (struct lpvmm_shadow) at `at`: key, size, owner, next.
fn put_shadow_var(g: &mut SynthGuest, f: &Fixture, at: u64, var: (u64, u64, &str), next: u64) {
    let (obj, id, owner) = var;
    let mut b = vec![0u8; 72];
    b[0..8].copy_from_slice(&next.to_le_bytes());
    b[8..16].copy_from_slice(&obj.to_le_bytes());
    b[16..24].copy_from_slice(&id.to_le_bytes());
    b[24..32].copy_from_slice(&8u64.to_le_bytes());
    b[32..32 + owner.len()].copy_from_slice(owner.as_bytes());
    let pa = f.engine.area_layout().unwrap().pa(at);
    g.write_phys(pa, &b).unwrap();
}

#[test]
fn shadow_variables_are_read_from_the_guests_table_and_a_loop_is_refused() {
    use crate::load::manifest::ShadowTie;
    use crate::shadow::ShadowTable;
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    assert_eq!(
        f.engine.shadow_table(),
        None,
        "no table before the area is mapped"
    );
    f.engine.load(&mut g, &f.kernel, &kp(CMDLINE, &[])).unwrap();
    let table = f
        .engine
        .shadow_table()
        .expect("the table once a patch is loaded");
    let read = |g: &SynthGuest| ShadowTable::read(&f.kernel.memory(g), table);
    assert_eq!(read(&g).unwrap(), ShadowTable::default(), "zeroed: empty");
    // Three variables in two buckets (nodes in the table's own page, past the table).
    let (a, b, c) = (table + 1024, table + 1280, table + 1536);
    put_shadow_var(&mut g, &f, a, (0xffff_8880_0000_1000, 1, "shadow-1"), b);
    put_shadow_var(&mut g, &f, b, (0xffff_8880_0000_2000, 1, "shadow-2"), 0);
    put_shadow_var(&mut g, &f, c, (0xffff_8880_0000_1000, 2, "shadow-2"), 0);
    let pa = f.engine.area_layout().unwrap().pa(table);
    let mut head = Vec::new();
    head.extend_from_slice(&0x3148_534d_4d56_504c_u64.to_le_bytes());
    head.extend_from_slice(&3u64.to_le_bytes());
    head.extend_from_slice(&a.to_le_bytes());
    head.extend_from_slice(&[0; 8 * 4]);
    head.extend_from_slice(&c.to_le_bytes());
    g.write_phys(pa, &head).unwrap();
    let t = read(&g).unwrap();
    assert_eq!((t.count, t.vars.len()), (3, 3));
    let groups = t.groups(&[ShadowTie { id: 1, state: 9 }]);
    assert_eq!(groups.len(), 2);
    assert_eq!(
        (
            groups[0].id,
            groups[0].count,
            groups[0].bytes,
            groups[0].state
        ),
        (1, 2, 16, Some(9))
    );
    assert_eq!(groups[0].owners, ["shadow-1", "shadow-2"]);
    assert_eq!((groups[1].id, groups[1].state), (2, None));
    // A loop the guest made: refused after the bound, not followed forever.
    put_shadow_var(&mut g, &f, b, (0xffff_8880_0000_2000, 1, "shadow-2"), a);
    let e = read(&g).unwrap_err().to_string();
    assert!(e.contains("more than 1048576 variables, or a loop"), "{e}");
    // A table lpvmm does not know, and one in memory that is not there.
    g.write_phys(pa, &7u64.to_le_bytes()).unwrap();
    assert!(read(&g)
        .unwrap_err()
        .to_string()
        .contains("not one lpvmm knows"));
    assert!(ShadowTable::read(&f.kernel.memory(&g), 0xffff_ffff_ffff_f000).is_err());
}

/// A pre-patch that never returns: at the transition's timeout lpvmm gives up on it,
/// the enable fails with nothing written, the guest-call machinery is set aside and a
/// fresh one installed, and the patch cannot be unloaded until the call returns.
#[test]
fn a_hung_pre_patch_fails_the_enable_at_its_timeout_and_pins_its_patch() {
    let mut f = fixture();
    let mut g = f.sk.guest.clone();
    let text_before = text(&f, &g);
    let mut vm = SynthControl {
        guest: &mut g,
        pauses: 0,
        ipis: Vec::new(),
    };
    let args = crate::EnableArgs {
        consistency: Consistency::PerTask,
        timeout: Some(std::time::Duration::from_secs(3)),
    };
    f.engine
        .load_and_enable(&mut vm, &f.kernel, &kp(CALLBACKS, &[]), Some(args), f.now)
        .unwrap();
    f.now += 10;
    f.engine.drive(&mut vm, &f.kernel, f.now).unwrap();
    assert_eq!(vm.ipis.len(), 1, "pre_patch queued");
    // The guest takes the call and its kworker starts it, and it never returns.
    let old = f.engine.caller.clone().unwrap();
    let l = f.kernel.layout.patcher.guest_call.clone().unwrap();
    let head = {
        let m = f.kernel.memory(&g);
        m.u64(f.kernel.addrs.per_cpu_offset).unwrap()
            + f.kernel.symbols.addr("call_single_queue").unwrap()
    };
    poke_va(&f, &mut g, head, 0, 8);
    poke_va(&f, &mut g, old.csd + l.csd_flags, 0, 4);
    poke_va(&f, &mut g, old.mailbox, 2, 4);
    for _ in 0..5 {
        f.now += 1000;
        let mut vm = SynthControl {
            guest: &mut g,
            pauses: 0,
            ipis: Vec::new(),
        };
        f.engine.drive(&mut vm, &f.kernel, f.now).unwrap();
    }
    assert!(f.engine.active().is_none(), "the transition ended");
    let t = f.engine.history().last().unwrap().clone();
    let Outcome::Failed(why) = &t.outcome else {
        panic!("{:?}", t.outcome)
    };
    assert!(
        why.starts_with("the pre_patch callback cb_pre of vmlinux did not return within")
            && why.ends_with("not enabled; the patch stays loaded until the callback returns (unload is refused while it runs)"),
        "{why}"
    );
    assert!(t.calls.ran[0].gave_up.is_some());
    assert_eq!(text(&f, &g), text_before, "nothing written");
    let fresh = f.engine.caller.clone().unwrap();
    assert_ne!(fresh.csd, old.csd, "a fresh machinery");
    assert_eq!(f.engine.set_aside.len(), 1);
    let e = f
        .engine
        .unload(&mut g, &f.kernel, "cb")
        .unwrap_err()
        .to_string();
    assert!(e.contains("its callback cb_pre"), "{e}");
    // It returns at last: the patch may go.
    poke_va(&f, &mut g, old.mailbox, 3, 4);
    f.engine.unload(&mut g, &f.kernel, "cb").unwrap();
}
