//! The suite's short fuzz run: every fuzz target over its seed corpus, the inputs that
//! once found bugs (regressions/), and a fixed number of mutations of them, in the
//! workspace's ordinary test build. No coverage feedback (that is AFL++'s job, in
//! scripts/fuzz.sh, for the long runs): the mutations are a fixed-seed sequence, so a
//! failure here is the same failure on every machine, and it names the input.
//!
//! Each input must return without a panic (a target's oracle panics too), within
//! [`TIME_LIMIT`] and [`MEMORY_LIMIT`]: the bounds scripts/fuzz.sh gives AFL++ (`-t 1000
//! -m 1024`). A failing input is saved in target/fuzz-findings/ and named in the failure.
//! An input past either bound ends the whole test binary at once (a watchdog thread for
//! time, which also catches an input that never returns; the global allocator below for
//! memory, before the allocation that would cross the bound is made), after saving and
//! naming it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The most one input may take. Inputs take well under 10 ms in this (opt-level 1) test
/// build; 1 s is AFL++'s bound in scripts/fuzz.sh, and leaves room for a loaded machine
/// and an unoptimised build.
const TIME_LIMIT: Duration = Duration::from_secs(1);

/// The most heap one input may hold at once, above what was live when it started (the
/// fixture's synthetic guest, built before the first input, is not counted). AFL++'s
/// bound in scripts/fuzz.sh is the same figure as address space.
const MEMORY_LIMIT: usize = 1 << 30;

/// One target: its name (the directory under seeds/ and regressions/), the function,
/// and how many mutated inputs this run feeds it (under 2 s for all four on the
/// project's 2-core machine).
struct Target {
    name: &'static str,
    run: fn(&[u8]),
    mutations: u32,
}

const TARGETS: [Target; 5] = [
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
        name: "virtio_blk",
        run: lpvmm_fuzz::virtio_blk,
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

/// The system allocator, counting the heap in use so that an input holding more than
/// [`MEMORY_LIMIT`] ends the run before it gets the memory.
struct Counting;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap bytes in use (every thread).
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// [`LIVE`] when the current input started, and the most since.
static BASE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread runs an input: its allocations are bounded.
    static ARMED: Cell<bool> = const { Cell::new(false) };
}

impl Counting {
    /// Count `size` more bytes, or end the run if the input in progress would hold more
    /// than the bound.
    fn take(&self, size: usize) {
        let live = LIVE.fetch_add(size, Relaxed).saturating_add(size);
        if ARMED.try_with(Cell::get).unwrap_or(false) {
            let held = live.saturating_sub(BASE.load(Relaxed));
            if held > MEMORY_LIMIT {
                LIVE.fetch_sub(size, Relaxed);
                // Allocating from here on is for the report, not the input.
                ARMED.with(|a| a.set(false));
                end_run(&format!(
                    "would hold {held} bytes of heap (an allocation of {size}), over the \
                     {MEMORY_LIMIT}-byte bound"
                ));
            }
            PEAK.fetch_max(live, Relaxed);
        }
    }
}

// SAFETY: every call goes to the system allocator with the caller's own arguments; the
// counting around it neither allocates nor unwinds (it ends the process instead).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.take(layout.size());
        let p = System.alloc(layout);
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.take(layout.size());
        let p = System.alloc_zeroed(layout);
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old {
            self.take(new_size - old);
        }
        let p = System.realloc(ptr, layout, new_size);
        if p.is_null() {
            if new_size > old {
                LIVE.fetch_sub(new_size - old, Relaxed);
            }
        } else if new_size < old {
            LIVE.fetch_sub(old - new_size, Relaxed);
        }
        p
    }
}

/// The input in progress, for the watchdog and the allocator to name.
struct Current {
    target: &'static str,
    what: String,
    input: Vec<u8>,
    started: Option<Instant>,
}

static CURRENT: Mutex<Current> = Mutex::new(Current {
    target: "",
    what: String::new(),
    input: Vec::new(),
    started: None,
});

/// Save `input` under target/fuzz-findings/ for replay; returns where.
fn save(target: &str, what: &str, input: &[u8]) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.parent().unwrap_or(root).join("target/fuzz-findings");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!("{target}-{}", what.replace('/', "_")));
    let _ = std::fs::write(&file, input);
    file
}

fn finding(target: &str, what: &str, input: &[u8], why: &str) -> String {
    format!(
        "fuzz target {target} {why} on {what} ({} bytes, saved as {}; replay it with \
         scripts/fuzz.sh or a unit test)",
        input.len(),
        save(target, what, input).display()
    )
}

/// Name and save the input in progress, and end the test binary: for an input that
/// cannot be stopped (it runs on) or must not go on (it would take the memory).
fn end_run(why: &str) -> ! {
    let c = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    let msg = finding(c.target, &c.what, &c.input, why);
    // Straight to stderr: the test harness's capture would be lost with the process.
    let _ = writeln!(std::io::stderr(), "\n{msg}");
    std::process::exit(101);
}

/// Ends the run when an input has run for longer than [`TIME_LIMIT`].
fn watchdog() {
    std::thread::spawn(|| loop {
        std::thread::sleep(Duration::from_millis(100));
        let over = CURRENT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .started
            .is_some_and(|s| s.elapsed() > TIME_LIMIT);
        if over {
            end_run(&format!("has run for over {TIME_LIMIT:?} (the bound)"));
        }
    });
}

/// The slowest input and the one that held the most heap, of one target.
#[derive(Default)]
struct Worst {
    time: (Duration, String),
    heap: (usize, String),
}

/// Run `input` within the bounds; a panic or a bound crossed fails the test with the
/// input written out for replay.
fn feed(target: &Target, what: &str, input: &[u8], worst: &mut Worst) {
    {
        let mut c = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        c.target = target.name;
        c.what.clear();
        c.what.push_str(what);
        c.input.clear();
        c.input.extend_from_slice(input);
        c.started = Some(Instant::now());
    }
    let live = LIVE.load(Relaxed);
    BASE.store(live, Relaxed);
    PEAK.store(live, Relaxed);
    ARMED.with(|a| a.set(true));
    let started = Instant::now();
    let ran = panic::catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    ARMED.with(|a| a.set(false));
    let took = started.elapsed();
    let held = PEAK.load(Relaxed).saturating_sub(BASE.load(Relaxed));
    CURRENT.lock().unwrap_or_else(|e| e.into_inner()).started = None;
    if took > worst.time.0 {
        worst.time = (took, what.to_string());
    }
    if held > worst.heap.0 {
        worst.heap = (held, what.to_string());
    }
    let why = if let Err(payload) = ran {
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        format!("panicked ({msg})")
    } else if took > TIME_LIMIT {
        format!("took {took:?}, over the {TIME_LIMIT:?} bound,")
    } else {
        return;
    };
    panic!("{}", finding(target.name, what, input, &why));
}

#[test]
fn every_target_survives_its_corpus_its_regressions_and_their_mutations() {
    lpvmm_fuzz::init();
    watchdog();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for target in &TARGETS {
        let seeds = corpus(&root.join("seeds").join(target.name));
        assert!(
            !seeds.is_empty(),
            "no seeds for fuzz target {}",
            target.name
        );
        let regressions = corpus(&root.join("regressions").join(target.name));
        let started = Instant::now();
        let mut worst = Worst::default();
        for (path, bytes) in seeds.iter().chain(&regressions) {
            let name = path.strip_prefix(root).unwrap_or(path);
            feed(target, &name.display().to_string(), bytes, &mut worst);
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
            feed(target, &format!("mutation-{n}"), &input, &mut worst);
        }
        eprintln!(
            "fuzz target {}: {} seeds, {} regressions, {} mutations in {:.2?}: no finding; \
             slowest {:.2?} ({}), most heap {} KiB ({})",
            target.name,
            seeds.len(),
            regressions.len(),
            target.mutations,
            started.elapsed(),
            worst.time.0,
            worst.time.1,
            worst.heap.0 >> 10,
            worst.heap.1,
        );
    }
}
