//! Running a patch's function inside the guest, in process context, with no agent
//! (DESIGN.md §12; research/modules-callbacks-shadow.md §B.1): how callbacks run.
//!
//! Once, in a pause, lpvmm writes into the patch area a cross-CPU call (`struct
//! __call_single_data`), a work item (`struct work_struct`), a mailbox of its own, and
//! two small functions:
//! - `lpvmm_call_ipi`, the call's function: run by the guest's own IPI handler (hardirq),
//!   it only queues the work item on `system_unbound_wq`;
//! - `lpvmm_call_work`, the work item's function: run by a kworker (process context, it
//!   may sleep, as the kernel's livepatch callbacks do), it records its task, calls the
//!   mailbox's function with the mailbox's argument, stores the `int` it returns and
//!   marks the call done.
//!
//! To call `fn(arg)`, in a pause: the mailbox gets `fn`, `arg` and the CPU, and the
//! cross-CPU call is pushed onto that CPU's `call_single_queue` (the guest's own list;
//! a guest CPU racing on it retries its cmpxchg). After the pause the VMM sends that CPU
//! vector 0xfb (`CALL_FUNCTION_SINGLE_VECTOR`): the guest's entry code does every bit of
//! bookkeeping (RCU, irq state, registers), and no register of a running task is ever
//! touched. The engine then reads the mailbox while the guest runs until the call is
//! done. Both functions start with `endbr64` (indirect-call targets on 6.12's IBT).

use iced_x86::code_asm::{
    dword_ptr, eax, edi, qword_ptr, rax, rbp, rdi, rdx, rsi, rsp, CodeAssembler,
};
use serde::{Deserialize, Serialize};

use introspection::kernel::Kernel;
use introspection::layout::GuestCallLayout;
use introspection::{GuestRam, PausedGuest};

use crate::area::Region;
use crate::load::link::Returns;
use crate::space::{Area, Runs, Sizes};
use crate::{GuestWriter, KpError};

/// `CALL_FUNCTION_SINGLE_VECTOR` (arch/x86/include/asm/irq_vectors.h, 6.1 and 6.12).
pub const CALL_FUNCTION_SINGLE_VECTOR: u8 = 0xfb;
/// `CSD_FLAG_LOCK | CSD_TYPE_ASYNC` (include/linux/smp_types.h).
const CSD_LOCKED_ASYNC: u32 = 0x01;
/// The mailbox: lpvmm's own layout, in the patch area's data after the csd and work.
const MB_STATE: u64 = 0;
const MB_RET: u64 = 4;
const MB_FN: u64 = 8;
const MB_ARG: u64 = 16;
const MB_CPU: u64 = 24;
const MB_TASK: u64 = 32;
const MAILBOX: u64 = 64;
/// Where the csd and the work item start in the data run (each cache-line aligned).
const CSD_AT: u64 = 0;
const WORK_AT: u64 = 128;
const MAILBOX_AT: u64 = 256;

/// Where a call is, as its mailbox says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallState {
    /// No call made yet.
    Idle,
    /// Queued on the CPU; its IPI not handled yet, or its work item not started.
    Queued,
    /// Running in the kworker whose task_struct is `task`.
    Running { task: u64 },
    /// Returned `ret`.
    Done { ret: i32 },
}

impl CallState {
    fn of(state: u32, ret: i32, task: u64) -> CallState {
        match state {
            1 => CallState::Queued,
            2 => CallState::Running { task },
            3 => CallState::Done { ret },
            _ => CallState::Idle,
        }
    }
}

/// A call queued in a pause, for the VMM to signal once the guest runs: vector
/// [`CALL_FUNCTION_SINGLE_VECTOR`] to the local APIC `apic_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipi {
    pub apic_id: u32,
}

/// The installed call machinery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestCaller {
    pub runs: Runs,
    /// The two functions' code.
    pub code: Region,
    pub(crate) csd: u64,
    pub(crate) work: u64,
    pub(crate) mailbox: u64,
    pub(crate) ipi_fn: u64,
}

/// A guest-call machinery set aside with a callback lpvmm gave up on (see
/// [`crate::lost_calls`]), and that call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SetAside {
    pub(crate) caller: GuestCaller,
    pub(crate) patch: String,
    pub(crate) func: String,
    /// The kworker died: nothing runs the patch's code there any more.
    pub(crate) died: bool,
}

/// The kernel symbols and offsets the stubs use.
struct StubEnv {
    queue_work_on: u64,
    /// `system_unbound_wq`: its pools are not concurrency-managed, so a callback that
    /// sleeps long, or whose kworker dies in an oops, holds no other work up (a dead
    /// per-CPU kworker leaves its pool counting it as running: 6.1 then never runs
    /// that CPU's system_wq work again; see [`crate::lost_calls`]).
    unbound_wq: u64,
    current: u64,
    indirect_thunk: Option<u64>,
    returns: Returns,
}

fn asm_err(e: iced_x86::IcedError) -> KpError {
    KpError::Area(format!("assembling the guest-call functions: {e}"))
}

/// `lpvmm_call_ipi` at `at`, then `lpvmm_call_work`: the code, and where the second
/// starts.
fn stubs(at: u64, env: &StubEnv, work: u64, mailbox: u64) -> Result<(Vec<u8>, u64), KpError> {
    let mut a = CodeAssembler::new(64).map_err(asm_err)?;
    let mut work_fn = a.create_label();
    // lpvmm_call_ipi(void *info): queue_work_on(mailbox.cpu, system_unbound_wq, &work).
    a.endbr64().map_err(asm_err)?;
    a.mov(edi, dword_ptr(mailbox + MB_CPU)).map_err(asm_err)?;
    a.mov(rsi, qword_ptr(env.unbound_wq)).map_err(asm_err)?;
    a.mov(rdx, work).map_err(asm_err)?;
    a.jmp(env.queue_work_on).map_err(asm_err)?;
    a.int3().map_err(asm_err)?;
    // lpvmm_call_work(struct work_struct *w): the mailbox's call, in a kworker.
    a.set_label(&mut work_fn).map_err(asm_err)?;
    a.endbr64().map_err(asm_err)?;
    a.push(rbp).map_err(asm_err)?;
    a.mov(rbp, rsp).map_err(asm_err)?;
    a.mov(rax, qword_ptr(env.current).gs()).map_err(asm_err)?;
    a.mov(qword_ptr(mailbox + MB_TASK), rax).map_err(asm_err)?;
    a.mov(dword_ptr(mailbox + MB_STATE), 2).map_err(asm_err)?;
    a.mov(rdi, qword_ptr(mailbox + MB_ARG)).map_err(asm_err)?;
    a.mov(rax, qword_ptr(mailbox + MB_FN)).map_err(asm_err)?;
    match env.indirect_thunk {
        Some(thunk) => a.call(thunk).map_err(asm_err)?,
        None => a.call(rax).map_err(asm_err)?,
    }
    a.mov(dword_ptr(mailbox + MB_RET), eax).map_err(asm_err)?;
    a.mov(dword_ptr(mailbox + MB_STATE), 3).map_err(asm_err)?;
    a.pop(rbp).map_err(asm_err)?;
    match env.returns {
        Returns::Jump(thunk) => a.jmp(thunk).map_err(asm_err)?,
        Returns::Ret | Returns::AsSymbol => a.ret().map_err(asm_err)?,
    }
    let r = a
        .assemble_options(
            at,
            iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .map_err(asm_err)?;
    let work_ip = r.label_ip(&work_fn).map_err(asm_err)?;
    Ok((r.inner.code_buffer, work_ip))
}

impl StubEnv {
    fn of_guest(guest: &dyn PausedGuest, kernel: &Kernel) -> Result<Self, KpError> {
        let sym = |n: &str| {
            kernel.symbols.addr(n).ok_or_else(|| {
                KpError::Unsupported(format!("running callbacks needs the kernel symbol {n}"))
            })
        };
        let mem = kernel.memory(guest);
        let returns = Returns::for_stubs(&mem, &kernel.symbols)?;
        Ok(StubEnv {
            queue_work_on: sym("queue_work_on")?,
            unbound_wq: sym("system_unbound_wq")?,
            current: kernel.current_task_offset().ok_or_else(|| {
                KpError::Unsupported("running callbacks needs `current`'s per-CPU offset".into())
            })?,
            indirect_thunk: kernel.symbols.addr("__x86_indirect_thunk_rax"),
            returns,
        })
    }
}

fn layout(kernel: &Kernel) -> Result<&GuestCallLayout, KpError> {
    kernel.layout.patcher.guest_call.as_ref().ok_or_else(|| {
        KpError::Unsupported(
            "this kernel's BTF has no struct __call_single_data or work_struct: lpvmm cannot \
             run callbacks in it"
                .into(),
        )
    })
}

/// The runs the machinery takes: a page of code, a page of data.
const SIZES: Sizes = Sizes {
    code: 4096,
    rodata: 0,
    data: MAILBOX_AT + MAILBOX,
};

impl GuestCaller {
    /// Whether this guest kernel has what the machinery needs (checked before a load
    /// writes anything).
    pub(crate) fn check(guest: &dyn PausedGuest, kernel: &Kernel) -> Result<(), KpError> {
        layout(kernel)?;
        StubEnv::of_guest(guest, kernel)?;
        kernel.symbols.addr("call_single_queue").ok_or_else(|| {
            KpError::Unsupported("running callbacks needs the symbol call_single_queue".into())
        })?;
        Ok(())
    }

    /// Write the machinery into `area` in this pause (its runs taken from it); the
    /// guest's own structures are not touched until a call.
    pub(crate) fn install(
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        area: &mut Area,
    ) -> Result<GuestCaller, KpError> {
        let l = layout(kernel)?;
        let env = StubEnv::of_guest(guest.reader(), kernel)?;
        let runs = area.space.place("the guest-call functions", SIZES)?;
        let (csd, work, mailbox) = (
            runs.data.start + CSD_AT,
            runs.data.start + WORK_AT,
            runs.data.start + MAILBOX_AT,
        );
        let (code, work_fn) = stubs(runs.code.start, &env, work, mailbox)?;
        // INIT_WORK: data 0 (no pool; the kernel looks pool 0 up and finds it idle for
        // this item, which is all the "no pool" value would say), an empty entry, func.
        let mut w = vec![0u8; l.work_size as usize];
        put(&mut w, l.work_entry, &(work + l.work_entry).to_le_bytes());
        put(
            &mut w,
            l.work_entry + 8,
            &(work + l.work_entry).to_le_bytes(),
        );
        put(&mut w, l.work_func, &work_fn.to_le_bytes());
        let write = |g: &mut dyn GuestWriter, va: u64, b: &[u8]| {
            g.write_phys(area.layout.pa(va), b)
                .map_err(|e| KpError::guest("writing the guest-call functions", e))
        };
        write(guest, runs.code.start, &code)?;
        write(guest, work, &w)?;
        area.space.take(runs);
        Ok(GuestCaller {
            code: Region {
                start: runs.code.start,
                end: runs.code.start + code.len() as u64,
            },
            runs,
            csd,
            work,
            mailbox,
            ipi_fn: runs.code.start,
        })
    }

    /// Queue `func(arg)` on guest CPU `cpu`, in this pause: the mailbox written, the
    /// cross-CPU call pushed onto the CPU's queue. Refused, writing nothing, while the
    /// last call has not finished. The VMM sends the returned [`Ipi`] after the pause.
    pub(crate) fn queue(
        &self,
        guest: &mut dyn GuestWriter,
        kernel: &Kernel,
        area: &Area,
        call: (u64, u64),
        cpu: u32,
    ) -> Result<Ipi, KpError> {
        let l = layout(kernel)?;
        let (func, arg) = call;
        let mem = kernel.memory(guest.reader());
        let read32 = |va: u64| {
            mem.u32(va)
                .map_err(|e| KpError::guest("reading the guest-call machinery", e))
        };
        let in_flight = matches!(
            CallState::of(read32(self.mailbox + MB_STATE)?, 0, 0),
            CallState::Queued | CallState::Running { .. }
        );
        if in_flight || read32(self.csd + l.csd_flags)? != 0 {
            return Err(KpError::GuestBusy(
                "a callback is still running in the guest".into(),
            ));
        }
        let base = mem
            .u64(kernel.addrs.per_cpu_offset + 8 * u64::from(cpu))
            .map_err(|e| KpError::guest("reading __per_cpu_offset", e))?;
        let queue_sym = kernel.symbols.addr("call_single_queue").ok_or_else(|| {
            KpError::Unsupported("running callbacks needs the symbol call_single_queue".into())
        })?;
        let head = base.wrapping_add(queue_sym);
        let first = mem
            .u64(head)
            .map_err(|e| KpError::guest("reading call_single_queue", e))?;
        let head_pa = mem
            .translate(head)
            .map_err(|e| KpError::guest("call_single_queue", e))?;
        let apic_id = match kernel.symbols.addr("x86_cpu_to_apicid") {
            Some(s) => u32::from(mem.u16(base.wrapping_add(s)).unwrap_or(cpu as u16)),
            None => cpu,
        };
        drop(mem);
        let mut mb = vec![0u8; MAILBOX as usize];
        put(&mut mb, MB_STATE, &1u32.to_le_bytes());
        put(&mut mb, MB_FN, &func.to_le_bytes());
        put(&mut mb, MB_ARG, &arg.to_le_bytes());
        put(&mut mb, MB_CPU, &cpu.to_le_bytes());
        let mut csd = vec![0u8; l.csd_size as usize];
        put(&mut csd, l.csd_next, &first.to_le_bytes());
        put(&mut csd, l.csd_flags, &CSD_LOCKED_ASYNC.to_le_bytes());
        put(&mut csd, l.csd_func, &self.ipi_fn.to_le_bytes());
        let write = |g: &mut dyn GuestWriter, pa: u64, b: &[u8]| {
            g.write_phys(pa, b)
                .map_err(|e| KpError::guest("queueing a guest call", e))
        };
        write(guest, area.layout.pa(self.mailbox), &mb)?;
        write(guest, area.layout.pa(self.csd), &csd)?;
        // The CPU's queue is the guest's: its next IPI takes the call off it.
        guest
            .write_handed_back(head_pa, &self.csd.to_le_bytes())
            .map_err(|e| KpError::guest("queueing a guest call", e))?;
        Ok(Ipi { apic_id })
    }

    /// Where the last call is, read while the guest runs.
    pub(crate) fn state(&self, ram: &dyn GuestRam, area: &Area) -> Result<CallState, KpError> {
        let mut mb = [0u8; 40];
        ram.read_phys(area.layout.pa(self.mailbox), &mut mb)
            .map_err(|e| KpError::guest("reading the guest-call mailbox", e))?;
        let word = |at: usize| u32::from_le_bytes([mb[at], mb[at + 1], mb[at + 2], mb[at + 3]]);
        let task = u64::from_le_bytes(
            mb[MB_TASK as usize..MB_TASK as usize + 8]
                .try_into()
                .unwrap_or_default(),
        );
        Ok(CallState::of(
            word(MB_STATE as usize),
            word(MB_RET as usize) as i32,
            task,
        ))
    }
}

fn put(buf: &mut [u8], at: u64, v: &[u8]) {
    if let Some(d) = buf.get_mut(at as usize..at as usize + v.len()) {
        d.copy_from_slice(v);
    }
}
