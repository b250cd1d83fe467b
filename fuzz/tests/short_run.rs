//! The suite's short fuzz run: every fuzz target over its seed corpus, the inputs that
//! once found bugs (regressions/), and a fixed number of mutations of them, in the
//! workspace's ordinary test build. No coverage feedback (that is AFL++'s job, in
//! scripts/fuzz.sh, for the long runs): the mutations are a fixed-seed sequence, so a
//! failure here is the same failure on every machine, and it names the input.

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// One target: its name (the directory under seeds/ and regressions/), the function,
/// and how many mutated inputs this run feeds it (14 s for all four on the project's
/// 2-core machine).
struct Target {
    name: &'static str,
    run: fn(&[u8]),
    mutations: u32,
}

const TARGETS: [Target; 4] = [
    Target {
        name: "kp",
        run: lpvmm_fuzz::kp,
        mutations: 20_000,
    },
    Target {
        name: "tables",
        run: lpvmm_fuzz::tables,
        mutations: 20_000,
    },
    Target {
        name: "guest",
        run: lpvmm_fuzz::guest,
        mutations: 20_000,
    },
    Target {
        name: "control",
        run: lpvmm_fuzz::control,
        mutations: 20_000,
    },
];

/// Largest mutated input: the seeds are a few KiB.
const MAX_INPUT: usize = 64 << 10;

/// xorshift64*: a fixed sequence, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Values that sit on the edges parsers get wrong.
const INTERESTING: [u64; 10] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    u64::MAX,
];

/// One to four havoc steps on a copy of `seed`, splicing from `other`.
fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len());
        match rng.below(6) {
            0 if !v.is_empty() => v[at] ^= 1 << rng.below(8),
            1 if !v.is_empty() => v[at] = rng.next() as u8,
            2 => {
                let value = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let width = [1, 2, 4, 8][rng.below(4)];
                let end = (at + width).min(v.len());
                v[at..end].copy_from_slice(&value[..end - at]);
            }
            3 => {
                let len = rng.below(64).min(v.len() - at);
                v.drain(at..at + len);
            }
            4 => {
                let len = 1 + rng.below(64);
                let fill: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                v.splice(at..at, fill);
            }
            _ if !other.is_empty() => {
                let from = rng.below(other.len());
                let len = (1 + rng.below(256)).min(other.len() - from);
                v.splice(at..at, other[from..from + len].iter().copied());
            }
            _ => {}
        }
    }
    v.truncate(MAX_INPUT);
    v
}

fn corpus(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, bytes)
        })
        .collect()
}

/// Run `input`; a panic fails the test with the input written out for replay.
fn feed(target: &Target, what: &str, input: &[u8]) {
    if panic::catch_unwind(AssertUnwindSafe(|| (target.run)(input))).is_ok() {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-findings");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!("{}-{}", target.name, what.replace('/', "_")));
    let _ = std::fs::write(&file, input);
    panic!(
        "fuzz target {} panicked on {what} ({} bytes, saved as {}; replay it with \
         scripts/fuzz.sh or a unit test)",
        target.name,
        input.len(),
        file.display()
    );
}

#[test]
fn every_target_survives_its_corpus_its_regressions_and_their_mutations() {
    lpvmm_fuzz::init();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for target in &TARGETS {
        let seeds = corpus(&root.join("seeds").join(target.name));
        assert!(
            !seeds.is_empty(),
            "no seeds for fuzz target {}",
            target.name
        );
        let regressions = corpus(&root.join("regressions").join(target.name));
        for (path, bytes) in seeds.iter().chain(&regressions) {
            feed(target, &path.display().to_string(), bytes);
        }
        let inputs: Vec<&[u8]> = seeds
            .iter()
            .chain(&regressions)
            .map(|(_, b)| &b[..])
            .collect();
        let mut rng = Rng(0x6c70_766d_6d00 ^ target.name.len() as u64);
        for n in 0..target.mutations {
            let seed = inputs[rng.below(inputs.len())];
            let other = inputs[rng.below(inputs.len())];
            let input = mutate(&mut rng, seed, other);
            feed(target, &format!("mutation-{n}"), &input);
        }
        eprintln!(
            "fuzz target {}: {} seeds, {} regressions, {} mutations: no panic",
            target.name,
            seeds.len(),
            regressions.len(),
            target.mutations
        );
    }
}
