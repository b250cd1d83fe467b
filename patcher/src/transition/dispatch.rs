//! Per-task dispatch: how a redirected function sends each task to *its* version while
//! a per-task transition runs.
//!
//! Each affected site jumps to a small trampoline in the patch area. The trampoline
//! reads `current` from the per-CPU area (`%gs`) and tests one bit of the *task map*,
//! a bitmap with one bit per task_struct-sized granule of the kernel's direct map: set
//! means "this task still runs the version the transition started from", clear means
//! "the target version" (the roles swap when the transition is reversed, see
//! [`TaskMap`]). init_task lives in the kernel image, not the direct map; one slot
//! beside the bitmap holds its address while it runs the starting version.
//!
//! Why a bitmap of granules rather than a table of pending tasks: the decision is a
//! single `bt` of a bit that only depends on the task's own address, so a task
//! interrupted anywhere in the trampoline holds no state that depends on the map's
//! layout; lpvmm can change any bit in any pause. Two task_structs never start in the
//! same granule (a granule is at most the distance between two task_structs: BTF's
//! `sizeof(struct task_struct)` or the kernel's `arch_task_struct_size`, whichever is
//! smaller; on x86 the second is often smaller, the FPU state being sized at boot), so
//! each live task has a bit of its own; and a bit moves only when every task on it may. A freed task_struct reused by a new task keeps its
//! bit: the new task starts on the version its predecessor had, consistently, until a
//! tick moves it. Bits of granules where no task lives are set to the target at every
//! tick, so tasks born during the transition run the target from their first
//! instruction (their stacks are new and hold no old frame).
//!
//! The trampoline writes only r10, r11 and flags (dead at a function's entry under the
//! x86-64 kernel ABI, and not arguments) and never touches the stack: a task
//! interrupted inside it unwinds exactly like a task at the function's entry.

use iced_x86::code_asm::{qword_ptr, r10, r11, CodeAssembler};
use serde::{Deserialize, Serialize};

use crate::area::Region;
use introspection::tasks::{Task, TaskList};

use crate::KpError;

/// Trampoline banks: a bank's trampolines stay untouched while any task may still be
/// inside one of them (a task interrupted there and not yet rescheduled).
pub const BANKS: usize = 4;
/// Code bytes per bank.
pub const BANK_CODE: u64 = 16 << 10;
/// Bytes per trampoline slot (a power of two; a trampoline is about 70 bytes).
pub const MAX_TRAMPOLINE: u64 = 128;
/// The direct map granule is at least this (cache-line) size.
const MIN_GRANULE_SHIFT: u32 = 6;

/// Where task_structs can be and how they map to bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    /// Start of the direct map (`page_offset_base`).
    pub base: u64,
    /// log2 of the granule: the largest power of two not above the task_struct size.
    pub shift: u32,
    /// Bits in the map: the direct map up to the top of guest RAM.
    pub bits: u64,
    /// init_task, the one task_struct outside the direct map.
    pub init_task: u64,
}

impl Geometry {
    pub fn new(base: u64, task_struct_size: u64, ram_top: u64, init_task: u64) -> Self {
        let shift = (63 - task_struct_size.max(1).leading_zeros()).max(MIN_GRANULE_SHIFT);
        Geometry {
            base,
            shift,
            bits: ram_top.div_ceil(1 << shift),
            init_task,
        }
    }

    /// The bit of the task_struct at `task`, or `None` outside the direct map.
    pub fn bit(&self, task: u64) -> Option<u64> {
        let b = task.wrapping_sub(self.base) >> self.shift;
        (b < self.bits).then_some(b)
    }

    pub fn bitmap_bytes(&self) -> u64 {
        self.bits.div_ceil(64) * 8
    }
}

/// The guest-visible task map and lpvmm's copy of it (the copy is the truth lpvmm
/// writes; the guest only reads).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskMap {
    pub words: Vec<u64>,
    /// init_task runs the starting version.
    pub init_on_start: bool,
    /// Words changed since the last [`TaskMap::take_dirty`].
    #[serde(skip)]
    dirty: Vec<bool>,
    #[serde(skip)]
    init_dirty: bool,
}

impl TaskMap {
    /// Every bit `on_start`.
    pub fn filled(geometry: &Geometry, on_start: bool) -> Self {
        let n = geometry.bitmap_bytes() as usize / 8;
        TaskMap {
            words: vec![if on_start { u64::MAX } else { 0 }; n],
            init_on_start: on_start,
            dirty: vec![true; n],
            init_dirty: true,
        }
    }

    /// Does the task at `task` run the starting version?
    pub fn on_start(&self, g: &Geometry, task: u64) -> bool {
        match g.bit(task) {
            Some(b) => self.words[(b / 64) as usize] >> (b % 64) & 1 == 1,
            None => task == g.init_task && self.init_on_start,
        }
    }

    /// Put the task at `task` on the starting version (`true`) or the target.
    /// Returns false for a task outside the map other than init_task.
    pub fn set(&mut self, g: &Geometry, task: u64, on_start: bool) -> bool {
        match g.bit(task) {
            Some(b) => {
                let (w, m) = ((b / 64) as usize, 1u64 << (b % 64));
                let new = if on_start {
                    self.words[w] | m
                } else {
                    self.words[w] & !m
                };
                if new != self.words[w] {
                    self.words[w] = new;
                    self.dirty[w] = true;
                }
                true
            }
            None if task == g.init_task => {
                if self.init_on_start != on_start {
                    self.init_on_start = on_start;
                    self.init_dirty = true;
                }
                true
            }
            None => false,
        }
    }

    /// Set every bit that is not `on_start` and belongs to no task in `live` (whose
    /// bits the caller decides) to `on_start`.
    pub fn reset_unowned(&mut self, g: &Geometry, live: &[u64], on_start: bool) {
        let fill = if on_start { u64::MAX } else { 0 };
        let mut owned = vec![0u64; self.words.len()];
        for &t in live {
            if let Some(b) = g.bit(t) {
                owned[(b / 64) as usize] |= 1 << (b % 64);
            }
        }
        for (i, w) in self.words.iter_mut().enumerate() {
            let new = (*w & owned[i]) | (fill & !owned[i]);
            if new != *w {
                *w = new;
                self.dirty[i] = true;
            }
        }
    }

    /// Changed words, as runs of neighbours (one guest write each: a new map is one
    /// run, not a write per word), and whether init_task's slot changed.
    pub fn take_dirty(&mut self) -> (Vec<DirtyRun>, bool) {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < self.dirty.len() {
            if !self.dirty[i] {
                i += 1;
                continue;
            }
            let end = self.dirty[i..]
                .iter()
                .position(|d| !d)
                .map_or(self.dirty.len(), |n| i + n);
            self.dirty[i..end].fill(false);
            let mut bytes = Vec::with_capacity((end - i) * 8);
            for w in &self.words[i..end] {
                bytes.extend_from_slice(&w.to_le_bytes());
            }
            runs.push(DirtyRun {
                offset: i as u64 * 8,
                bytes,
            });
            i = end;
        }
        (runs, std::mem::take(&mut self.init_dirty))
    }
}

/// Changed words of a [`TaskMap`] next to each other: where they start (bytes into the
/// bitmap) and their bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyRun {
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// One bank: trampoline code and the task map its trampolines read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bank {
    pub code: Region,
    /// The bitmap, then init_task's slot (8 bytes).
    pub map_va: u64,
    pub map_bytes: u64,
    pub state: BankState,
    /// The function each trampoline of the bank serves, by slot.
    pub slots: Vec<String>,
}

impl Bank {
    pub fn init_slot_va(&self) -> u64 {
        self.map_va + self.map_bytes
    }

    /// The function served by the trampoline at `ip`.
    pub fn func_at(&self, ip: u64) -> Option<&str> {
        if !self.code.contains(ip) {
            return None;
        }
        let slot = ((ip - self.code.start) / MAX_TRAMPOLINE) as usize;
        self.slots.get(slot).map(String::as_str)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BankState {
    Free,
    /// Sites jump into it.
    Live,
    /// No site jumps into it any more; these tasks (task_struct addresses) existed
    /// when it was left and have not been seen outside it since.
    Retired {
        suspects: Vec<u64>,
    },
}

/// What one trampoline chooses between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Targets {
    /// Where tasks on the starting version go.
    pub start: u64,
    /// Where every other task goes.
    pub target: u64,
}

/// How a trampoline finds `current` and the task map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrampolineEnv {
    /// Offset of `current_task` in the per-CPU area (`%gs`-relative).
    pub current_offset: u64,
    pub geometry: Geometry,
    pub map_va: u64,
    pub init_slot_va: u64,
}

fn asm_err(e: iced_x86::IcedError) -> KpError {
    KpError::Area(format!("assembling a trampoline: {e}"))
}

/// Assemble the trampoline placed at `at`.
pub fn trampoline(env: &TrampolineEnv, t: Targets, at: u64) -> Result<Vec<u8>, KpError> {
    let disp = |v: u64, what: &str| -> Result<u64, KpError> {
        // Absolute [disp32] addressing sign-extends: the address must be in the top or
        // bottom 2 GiB (the patch area is in the top 2 GiB; per-CPU offsets are small).
        let s = v as i64;
        if s < i64::from(i32::MIN) || s > i64::from(i32::MAX) {
            return Err(KpError::Area(format!(
                "{what} {v:#x} is not reachable with a 32-bit displacement"
            )));
        }
        Ok(v)
    };
    let g = &env.geometry;
    let bits = i32::try_from(g.bits)
        .map_err(|_| KpError::Area(format!("task map of {} bits is too large", g.bits)))?;
    let mut a = CodeAssembler::new(64).map_err(asm_err)?;
    let mut outside = a.create_label();
    let mut start = a.create_label();
    let current = disp(env.current_offset, "current_task's per-CPU offset")?;
    a.mov(r11, qword_ptr(current).gs()).map_err(asm_err)?;
    a.mov(r10, g.base.wrapping_neg()).map_err(asm_err)?;
    a.add(r10, r11).map_err(asm_err)?;
    a.shr(r10, g.shift).map_err(asm_err)?;
    a.cmp(r10, bits).map_err(asm_err)?;
    a.jae(outside).map_err(asm_err)?;
    a.bt(qword_ptr(disp(env.map_va, "the task map")?), r10)
        .map_err(asm_err)?;
    a.jb(start).map_err(asm_err)?;
    a.jmp(t.target).map_err(asm_err)?;
    a.set_label(&mut outside).map_err(asm_err)?;
    a.cmp(qword_ptr(disp(env.init_slot_va, "init_task's slot")?), r11)
        .map_err(asm_err)?;
    a.je(start).map_err(asm_err)?;
    a.jmp(t.target).map_err(asm_err)?;
    a.set_label(&mut start).map_err(asm_err)?;
    a.jmp(t.start).map_err(asm_err)?;
    a.assemble(at).map_err(asm_err)
}

/// Assemble one trampoline and throw it away, once per process. The assembler builds
/// its encoding tables on first use, about as much work as checking a few thousand
/// tasks, and that first use must not fall inside a transition's first pause: the patch
/// driver calls this before it (see [`crate::Engine::unwind_early`]).
pub fn warm_up() {
    static WARM: std::sync::Once = std::sync::Once::new();
    WARM.call_once(|| {
        let _ = warm_up_code();
    });
}

/// The trampoline [`warm_up`] assembles: any addresses in reach of a 32-bit
/// displacement will do.
fn warm_up_code() -> Result<Vec<u8>, KpError> {
    let map_va = 0xffff_ffff_a040_0000;
    let geometry = Geometry::new(0xffff_8880_0000_0000, 9600, 512 << 20, map_va);
    let env = TrampolineEnv {
        current_offset: 0x2_0000,
        geometry,
        map_va,
        init_slot_va: map_va + geometry.bitmap_bytes(),
    };
    let targets = Targets {
        start: 0xffff_ffff_8100_0005,
        target: 0xffff_ffff_a000_8000,
    };
    trampoline(&env, targets, 0xffff_ffff_a000_1000)
}

/// Tasks not yet on the target side of the map.
pub(crate) fn pending<'l>(
    map: &TaskMap,
    g: &Geometry,
    list: &'l TaskList,
    target_start: bool,
) -> Vec<&'l Task> {
    list.tasks
        .iter()
        .filter(|x| map.on_start(g, x.addr) != target_start)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{
        Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic,
        OpAccess, OpKind, Register,
    };

    const AT: u64 = 0xffff_ffff_a000_1000;
    const START: u64 = 0xffff_ffff_8123_4005;
    const TARGET: u64 = 0xffff_ffff_a000_8000;
    const MAP: u64 = 0xffff_ffff_a040_0000;

    fn env() -> TrampolineEnv {
        let geometry = Geometry::new(
            0xffff_8880_0000_0000,
            9600,
            512 << 20,
            0xffff_ffff_8260_0000,
        );
        TrampolineEnv {
            current_offset: 0x21440,
            geometry,
            map_va: MAP,
            init_slot_va: MAP + geometry.bitmap_bytes(),
        }
    }

    fn decode(code: &[u8]) -> Vec<Instruction> {
        Decoder::with_ip(64, code, AT, DecoderOptions::NONE)
            .into_iter()
            .collect()
    }

    /// Run the trampoline's instructions for a task: which target it leaves through.
    /// Only the instructions a trampoline may contain are understood.
    fn run(code: &[u8], current: u64, map: &TaskMap, init_slot: u64) -> u64 {
        let e = env();
        let insns = decode(code);
        let (mut x10, mut x11, mut cf, mut zf) = (0u64, 0u64, false, false);
        let mut ip = AT;
        for _ in 0..32 {
            let i = insns
                .iter()
                .find(|i| i.ip() == ip)
                .expect("ip on an instruction");
            ip = i.next_ip();
            match i.code() {
                Code::Mov_r64_rm64 => {
                    assert_eq!(i.segment_prefix(), Register::GS);
                    assert_eq!(i.memory_displacement64(), e.current_offset);
                    x11 = current;
                }
                Code::Mov_r64_imm64 => x10 = i.immediate64(),
                Code::Add_r64_rm64 | Code::Add_rm64_r64 => x10 = x10.wrapping_add(x11),
                Code::Shr_rm64_imm8 => x10 >>= i.immediate8(),
                Code::Cmp_rm64_imm32 => {
                    let imm = i.immediate32to64() as u64;
                    cf = x10 < imm;
                    zf = x10 == imm;
                }
                Code::Cmp_rm64_r64 => {
                    assert_eq!(i.memory_displacement64(), e.init_slot_va);
                    cf = init_slot < x11;
                    zf = init_slot == x11;
                }
                Code::Bt_rm64_r64 => {
                    assert_eq!(i.memory_displacement64(), e.map_va);
                    cf = map.words[(x10 / 64) as usize] >> (x10 % 64) & 1 == 1;
                }
                Code::Jae_rel8_64 | Code::Jae_rel32_64 if !cf => ip = i.near_branch_target(),
                Code::Jb_rel8_64 | Code::Jb_rel32_64 if cf => ip = i.near_branch_target(),
                Code::Je_rel8_64 | Code::Je_rel32_64 if zf => ip = i.near_branch_target(),
                Code::Jae_rel8_64
                | Code::Jae_rel32_64
                | Code::Jb_rel8_64
                | Code::Jb_rel32_64
                | Code::Je_rel8_64
                | Code::Je_rel32_64 => {}
                Code::Jmp_rel32_64 | Code::Jmp_rel8_64 => {
                    let t = i.near_branch_target();
                    if t < AT || t >= AT + code.len() as u64 {
                        return t;
                    }
                    ip = t;
                }
                c => panic!("unexpected instruction {c:?} in a trampoline"),
            }
        }
        panic!("trampoline did not leave in 32 steps")
    }

    #[test]
    fn the_warm_up_assembles_a_whole_trampoline() {
        // Failing before the encoder ran would leave its first use to a pause.
        let code = warm_up_code().unwrap();
        assert_eq!(
            decode(&code).last().map(|i| i.mnemonic()),
            Some(Mnemonic::Jmp)
        );
    }

    #[test]
    fn trampoline_writes_only_r10_r11_flags_and_never_the_stack() {
        let code = trampoline(
            &env(),
            Targets {
                start: START,
                target: TARGET,
            },
            AT,
        )
        .unwrap();
        let mut info = InstructionInfoFactory::new();
        let mut exits = Vec::new();
        for i in decode(&code) {
            assert_ne!(i.code(), Code::INVALID);
            let inf = info.info(&i);
            for r in inf.used_registers() {
                let written = matches!(
                    r.access(),
                    OpAccess::Write
                        | OpAccess::ReadWrite
                        | OpAccess::CondWrite
                        | OpAccess::ReadCondWrite
                );
                if written {
                    assert!(
                        matches!(r.register(), Register::R10 | Register::R11 | Register::RIP),
                        "{i} writes {:?}",
                        r.register()
                    );
                }
                assert!(
                    !matches!(r.register(), Register::RSP | Register::ESP | Register::SP),
                    "{i} touches the stack pointer"
                );
            }
            assert!(!i.is_stack_instruction(), "{i} uses the stack");
            for m in inf.used_memory() {
                assert!(matches!(m.access(), OpAccess::Read), "{i} writes memory");
            }
            if i.flow_control() == FlowControl::UnconditionalBranch {
                assert_eq!(i.op0_kind(), OpKind::NearBranch64);
                let t = i.near_branch_target();
                if !(AT..AT + code.len() as u64).contains(&t) {
                    exits.push(t);
                }
            }
            assert!(
                matches!(
                    i.flow_control(),
                    FlowControl::Next
                        | FlowControl::UnconditionalBranch
                        | FlowControl::ConditionalBranch
                ),
                "{i}: no calls, returns or indirect branches"
            );
        }
        exits.sort();
        exits.dedup();
        assert_eq!(exits, [START, TARGET]);
    }

    #[test]
    fn trampoline_sends_each_task_where_the_map_says() {
        let e = env();
        let g = e.geometry;
        let code = trampoline(
            &e,
            Targets {
                start: START,
                target: TARGET,
            },
            AT,
        )
        .unwrap();
        let mut map = TaskMap::filled(&g, false);
        let a = g.base + 0x1234_0000;
        let b = a + 9600; // the next task_struct of the slab
        assert_ne!(
            g.bit(a),
            g.bit(b),
            "neighbouring task_structs have bits of their own"
        );
        map.set(&g, a, true);
        assert_eq!(run(&code, a, &map, 0), START);
        assert_eq!(run(&code, b, &map, 0), TARGET);
        // init_task: by its slot.
        assert_eq!(run(&code, g.init_task, &map, 0), TARGET);
        assert_eq!(run(&code, g.init_task, &map, g.init_task), START);
        // Below the direct map or above RAM: never a bit read out of bounds.
        assert_eq!(run(&code, g.base - 64, &map, 0), TARGET);
        assert_eq!(run(&code, g.base + (1 << 40), &map, 0), TARGET);
    }

    #[test]
    fn map_tracks_recycled_new_and_reversed_tasks() {
        let g = env().geometry;
        let mut map = TaskMap::filled(&g, false);
        let (a, b) = (g.base + 0x10_0000, g.base + 0x20_0000);
        map.set(&g, a, true);
        map.set(&g, b, true);
        let _ = map.take_dirty();
        // b exits; a task born in a free granule runs the target; b's granule is
        // reset at the next tick because nobody lives there.
        let born = g.base + 0x30_0000;
        map.reset_unowned(&g, &[a, born], false);
        assert!(map.on_start(&g, a), "a live pending task keeps its bit");
        assert!(!map.on_start(&g, b) && !map.on_start(&g, born));
        // A task_struct reused before the tick keeps its predecessor's bit (pending
        // from birth), until a tick moves it.
        map.set(&g, b, true);
        map.reset_unowned(&g, &[a, b], false);
        assert!(map.on_start(&g, b));
        // Reverse: every unowned bit goes to the starting version (the new target);
        // tasks that had moved keep theirs until their stacks allow the way back.
        map.set(&g, a, false);
        map.reset_unowned(&g, &[a], true);
        assert!(!map.on_start(&g, a) && map.on_start(&g, born) && map.on_start(&g, b));
        let (dirty, _) = map.take_dirty();
        assert!(!dirty.is_empty());
        assert!(map.take_dirty().0.is_empty());
        // A new map is written whole, in one run; changes apart are runs apart.
        let mut map = TaskMap::filled(&g, true);
        let (runs, init) = map.take_dirty();
        assert!(init);
        assert_eq!(runs.len(), 1);
        assert_eq!(
            (runs[0].offset, runs[0].bytes.len() as u64),
            (0, g.bitmap_bytes())
        );
        assert!(runs[0].bytes.iter().all(|&b| b == 0xff));
        let (x, y) = (g.base + 0x10_0000, g.base + 0x1000_0000);
        map.set(&g, x, false);
        map.set(&g, y, false);
        let (runs, _) = map.take_dirty();
        let at = |t: u64| g.bit(t).unwrap() / 64 * 8;
        let runs: Vec<(u64, usize)> = runs.iter().map(|r| (r.offset, r.bytes.len())).collect();
        assert_eq!(runs, [(at(x), 8), (at(y), 8)]);
        // Outside the direct map only init_task has a place.
        assert!(map.set(&g, g.init_task, true));
        assert!(map.on_start(&g, g.init_task));
        assert!(!map.set(&g, 0xffff_c900_0000_0000, true));
    }
}
