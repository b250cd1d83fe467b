//! Regenerates the generated part of seeds/ (run from fuzz/: `cargo afl run --bin
//! seeds`): `.kp` patches built with gcc as `lpvmm kp build` does, the synthetic
//! kernel's BTF and a VMCOREINFO note, guest-memory overwrites (some in module memory),
//! request lines, and virtio-blk queues (`seeds virtio-blk` writes only those).

use std::path::Path;

use introspection::synth::{SynthKernel, SynthKernelSpec};
use introspection::GuestRam;

const TWO: &str = r#"
#include <lpvmm/patch.h>
int nf_a(void) { return 42; }
int nf_b(void) { return 7; }
LPVMM_PATCH("two");
LPVMM_DEPENDS("cmdline");
LPVMM_REPLACE(pipe_read, nf_a);
LPVMM_REPLACE(meminfo_proc_show, nf_b);
"#;

const REQUESTS: &[&str] = &[
    r#"{"v":1,"op":"status"}"#,
    r#"{"v":1,"op":"sym","name":"cmdline_proc_show"}"#,
    r#"{"v":1,"op":"sym","addr":18446744071562067968}"#,
    r#"{"v":1,"op":"stack","pids":[1,2]}"#,
    r#"{"v":1,"op":"patch_status"}"#,
    r#"{"v":1,"op":"kernel","reattach":true}"#,
    r#"{"v":2,"op":"status"}"#,
];

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("seeds dir");
    std::fs::write(dir.join(name), bytes).expect("seed");
}

fn main() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    for (name, bytes) in lpvmm_fuzz::virtio_blk_seeds() {
        write(&seeds.join("virtio_blk"), name, &bytes);
    }
    // `seeds virtio-blk`: only those (the others need gcc and the synthetic kernel).
    if std::env::args().nth(1).as_deref() == Some("virtio-blk") {
        return;
    }
    let tmp = std::env::temp_dir().join(format!("lpvmm-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../patcher/examples/cmdline.c");
    let cmdline = std::fs::read_to_string(example).expect("patcher/examples/cmdline.c");
    for (name, src) in [
        ("cmdline.kp", cmdline.as_str()),
        ("two.kp", TWO),
        ("klp.ko", lpvmm_fuzz::KLP_SEED),
    ] {
        let c = tmp.join(format!("{name}.c"));
        std::fs::write(&c, src).expect("source");
        let kp = patcher::build::compile(&c, &[], &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
        write(&seeds.join("kp"), name, &kp);
    }
    let _ = std::fs::remove_dir_all(&tmp);

    let sk = SynthKernel::build(SynthKernelSpec::v6_1());
    let sym = |n: &str| sk.symbols.iter().find(|s| s.name == n).expect(n).addr;
    let (start, stop) = (sym("__start_BTF"), sym("__stop_BTF"));
    let k = introspection::Kernel::attach(&sk.guest).expect("attach");
    let m = k.memory(&sk.guest);
    let mut btf = vec![1u8];
    btf.extend(m.read_vec(start, (stop - start) as usize).expect("BTF"));
    write(&seeds.join("tables"), "btf", &btf);
    let (pa, _) = introspection::vmcoreinfo::find(&sk.guest).expect("vmcoreinfo");
    let mut text = vec![0u8; 4096];
    sk.guest.read_phys(pa, &mut text).expect("the note");
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    let mut raw = vec![0u8];
    raw.extend(&text[..end]);
    write(&seeds.join("tables"), "vmcoreinfo", &raw);

    // Overwrites of 1, 4 and 16 words with values near and far from the old ones.
    let mut state = 0x5eed_u64;
    for n in [1usize, 4, 16] {
        let mut rec = Vec::new();
        for i in 0..n {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let word = (state >> 48) as u16;
            let old = sk
                .guest
                .read_u64(0x10_0000 + 8 * u64::from(word))
                .unwrap_or(0);
            let value = match i % 3 {
                0 => old.wrapping_add(8),
                1 => state,
                _ => 0,
            };
            rec.extend(word.to_le_bytes());
            rec.extend(value.to_le_bytes());
        }
        write(&seeds.join("guest"), &format!("writes-{n}"), &rec);
    }
    // Overwrites in module memory (the module list, struct module, symbol tables).
    write(
        &seeds.join("guest"),
        "modules-12",
        &lpvmm_fuzz::module_seed(12),
    );
    for (i, r) in REQUESTS.iter().enumerate() {
        write(
            &seeds.join("control"),
            &format!("request-{i}"),
            r.as_bytes(),
        );
    }
    println!("seeds written to {}", seeds.display());
}
