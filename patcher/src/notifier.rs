//! lpvmm's notifier on the guest's module notifier chain, and the doorbell it rings: how
//! a patch for a module reaches that module when the guest loads it later, and lets go
//! of it when the guest unloads it (the kernel livepatch's `klp_module_coming` and
//! `klp_module_going`, driven from outside; DESIGN.md §11).
//!
//! The notifier is a `struct notifier_block` in the patch area's data, its function a
//! stub in the patch area's code, put at the head of `module_notify_list` (priority
//! INT_MAX: before every other notifier, so before anything of the module runs) in a
//! pause in which the chain's rwsem is free, since a robust notifier pass must not see
//! the chain change. The kernel calls it, in the loading (or unloading) task, once the
//! module's text is final and its ftrace records are enabled and before its parameters
//! are parsed or its init runs (COMING), and again before its memory is freed (GOING).
//!
//! The stub rings the doorbell, an `out` to an I/O port of the VMM (a `KVM_EXIT_IO` on
//! that vCPU's thread): `rdi` the VM's token, `rsi` the `struct module`, `rcx` the
//! event. The VMM never holds the vCPU waiting: it answers at once, in `rax` what the
//! notifier returns, in `rdi` 1 to ring again after `msleep(10)` (the engine has not
//! handled the event yet) or 0, and in `rsi` a message for the guest's kernel log or 0.
//! The stub keeps a frame pointer, so a task asleep in it unwinds reliably (a per-task
//! transition need not wait for a module load it holds up).

use iced_x86::code_asm::{
    dx, eax, edi, edx, r12, r13, r13d, r14, r14d, r8, r9, rax, rbp, rbx, rcx, rdi, rdx, rsi, rsp,
    CodeAssembler, CodeLabel,
};
use iced_x86::IcedError;

use introspection::kernel::Kernel;
use introspection::layout::NotifierLayout;
use introspection::PausedGuest;
use serde::{Deserialize, Serialize};

use crate::load::link::Returns;
use crate::space::{Area, Runs, Sizes};
use crate::{GuestWriter, KpError};

/// `NOTIFY_STOP_MASK`: `notifier_from_errno(err)` is `REFUSE | (NOTIFY_OK - err)`, which
/// the module loader turns back into `err`.
pub const REFUSE: u64 = 0x8000;
/// `notifier_from_errno(-EINVAL)`.
pub const REFUSE_EINVAL: u64 = REFUSE | (1 + 22);
/// `NOTIFY_DONE`.
pub const NOTIFY_DONE: u64 = 0;
/// Messages the engine can have in flight to the guest's log at once (module loads run
/// in parallel); each is at most [`SLOT`] bytes.
const SLOTS: u64 = 8;
const SLOT: u64 = 256;
/// Where the slots start in the notifier's data (after the notifier_block).
const SLOTS_AT: u64 = 64;
/// How long the stub sleeps before it rings again, in ms.
const RETRY_MS: i32 = 10;

/// What a module's coming or going did, for `patch status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleEvent {
    pub module: String,
    /// `coming` or `going`.
    pub action: String,
    /// What lpvmm did: the patches it linked and the functions it redirected, or why it
    /// refused the module's load.
    pub outcome: String,
    pub refused: bool,
}

/// A module event in progress: the enabled patches' callbacks for the module, called
/// one at a time by the notifier's stub in the loading task, around the event's own
/// work (linking and redirecting, or giving the sites back).
#[derive(Clone, Debug)]
pub(crate) struct EventRun {
    /// The ring's (`struct module`, event).
    pub(crate) key: (u64, u64),
    pub(crate) before: std::collections::VecDeque<(String, crate::transition::calls::Call)>,
    pub(crate) after: std::collections::VecDeque<(String, crate::transition::calls::Call)>,
    /// The callback the stub was asked to call, whose result the next ring brings.
    pub(crate) calling: Option<(String, crate::transition::calls::Call)>,
    /// Patches whose pre-patch callback for the module returned 0.
    pub(crate) pre_ok: Vec<String>,
    /// The event's own work is done (or will not be).
    pub(crate) worked: bool,
    /// Why the module's load is refused, and the errno its insmod gets.
    pub(crate) refusal: Option<(String, i64)>,
    pub(crate) outcome: String,
}

/// The VMM's doorbell: the I/O port and the per-VM token the stub rings with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Doorbell {
    pub port: u16,
    pub token: u64,
}

/// One ring of the doorbell, as the vCPU's registers carried it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ring {
    /// The address of the `out` that rang.
    pub rip: u64,
    pub token: u64,
    /// The `struct module`.
    pub module: u64,
    /// The notifier's `action`: the module's new state.
    pub action: u64,
    /// What the function the last answer asked the stub to call returned, when this
    /// ring reports it.
    pub result: Option<i64>,
}

/// The doorbell's answer: the registers the stub reads after its `out`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// What the notifier returns (`rax`).
    pub ret: u64,
    /// Sleep and ring again (`rdi`).
    pub again: bool,
    /// A NUL-terminated `printk` format in the patch area, or 0 (`rsi`).
    pub message: u64,
    /// Call this function with this argument in the loading task, then ring again with
    /// what it returned (`rdi` = 2, `rax`, `rsi`).
    pub call: Option<(u64, u64)>,
}

impl Answer {
    /// Handled (or nothing to do): the notifier returns NOTIFY_DONE.
    pub const DONE: Answer = Answer {
        ret: NOTIFY_DONE,
        again: false,
        message: 0,
        call: None,
    };

    /// Not handled yet: sleep and ring again.
    pub const RETRY: Answer = Answer {
        ret: 0,
        again: true,
        message: 0,
        call: None,
    };

    /// Call `func(arg)` in the loading task and ring again with its return.
    pub fn call(func: u64, arg: u64) -> Answer {
        Answer {
            call: Some((func, arg)),
            ..Answer::RETRY
        }
    }

    /// The registers the stub reads after its `out`: `rax`, `rdi`, `rsi`.
    pub fn registers(&self) -> [u64; 3] {
        match self.call {
            Some((func, arg)) => [func, 2, arg],
            None => [self.ret, u64::from(self.again), self.message],
        }
    }
}

/// The installed notifier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notifier {
    pub runs: Runs,
    /// The stub's code, and the address of its `out`.
    pub stub: crate::area::Region,
    pub ring_ip: u64,
    /// Where in the stub `rbp` is its frame pointer (from just after `mov rbp, rsp` to
    /// its `pop rbp`, that one included): a task interrupted there, as one ringing the
    /// doorbell is, unwinds by it.
    pub framed: std::ops::Range<u64>,
    /// The `struct notifier_block`.
    pub block: u64,
    /// The message slot to use next.
    next_slot: u64,
}

/// The stub, assembled at `at`; with where its `out` is. After each ring, `rdi` says
/// what next: 0 return `rax` (printing `rsi` first if not 0), 1 sleep and ring again,
/// 2 call `rax(rsi)` here, in the loading task, and ring again with what it returned
/// (`r8`, with `r9` = 1).
/// The assembled stub: its bytes, its `out`, and where it has its frame.
struct Stub {
    code: Vec<u8>,
    ring_ip: u64,
    framed: std::ops::Range<u64>,
}

fn stub(
    at: u64,
    bell: Doorbell,
    coming: u64,
    going: u64,
    calls: &StubCalls,
) -> Result<Stub, KpError> {
    let e = |e: iced_x86::IcedError| KpError::Area(format!("assembling the module notifier: {e}"));
    let mut a = CodeAssembler::new(64).map_err(e)?;
    let mut l = StubLabels {
        ring: a.create_label(),
        again: a.create_label(),
        out: a.create_label(),
        call: a.create_label(),
        quiet: a.create_label(),
        done: a.create_label(),
        framed: a.create_label(),
        unframe: a.create_label(),
    };
    a.endbr64().map_err(e)?;
    a.cmp(rsi, coming as i32).map_err(e)?;
    a.je(l.ring).map_err(e)?;
    a.cmp(rsi, going as i32).map_err(e)?;
    a.je(l.ring).map_err(e)?;
    a.xor(eax, eax).map_err(e)?;
    ret(&mut a, calls.returns).map_err(e)?;
    ring_loop(&mut a, &mut l, bell).map_err(e)?;
    after_ring(&mut a, &mut l, calls).map_err(e)?;
    let r = a
        .assemble_options(
            at,
            iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .map_err(e)?;
    let ring_ip = r.label_ip(&l.out).map_err(e)?;
    let framed = r.label_ip(&l.framed).map_err(e)?..r.label_ip(&l.unframe).map_err(e)? + 1;
    Ok(Stub {
        code: r.inner.code_buffer,
        ring_ip,
        framed,
    })
}

struct StubLabels {
    ring: CodeLabel,
    again: CodeLabel,
    out: CodeLabel,
    call: CodeLabel,
    quiet: CodeLabel,
    done: CodeLabel,
    /// Just after `mov rbp, rsp`; at `pop rbp`.
    framed: CodeLabel,
    unframe: CodeLabel,
}

/// The frame (five callee-saved registers: the stack stays 16-byte aligned at its
/// calls), then the ring: token, module, event, the last call's result.
fn ring_loop(a: &mut CodeAssembler, l: &mut StubLabels, bell: Doorbell) -> Result<(), IcedError> {
    a.set_label(&mut l.ring)?;
    a.push(rbp)?;
    a.mov(rbp, rsp)?;
    a.set_label(&mut l.framed)?;
    a.push(rbx)?;
    a.push(r12)?;
    a.push(r13)?;
    a.push(r14)?;
    a.mov(rbx, rdx)?;
    a.mov(r12, rsi)?;
    a.xor(r13d, r13d)?;
    a.xor(r14d, r14d)?;
    a.set_label(&mut l.again)?;
    a.mov(rdi, bell.token)?;
    a.mov(rsi, rbx)?;
    a.mov(rcx, r12)?;
    a.mov(r8, r13)?;
    a.mov(r9, r14)?;
    a.xor(eax, eax)?;
    a.mov(edx, u32::from(bell.port))?;
    a.set_label(&mut l.out)?;
    a.out(dx, eax)?;
    a.xor(r14d, r14d)?;
    a.cmp(edi, 2)?;
    a.je(l.call)
}

/// What the answer says: call and ring again, print and return, or sleep and ring.
fn after_ring(
    a: &mut CodeAssembler,
    l: &mut StubLabels,
    calls: &StubCalls,
) -> Result<(), IcedError> {
    a.test(rsi, rsi)?;
    a.je(l.quiet)?;
    a.push(rax)?;
    a.push(rdi)?;
    a.mov(rdi, rsi)?;
    a.xor(eax, eax)?;
    a.call(calls.printk)?;
    a.pop(rdi)?;
    a.pop(rax)?;
    a.set_label(&mut l.quiet)?;
    a.test(edi, edi)?;
    a.je(l.done)?;
    a.mov(edi, RETRY_MS)?;
    a.call(calls.msleep)?;
    a.jmp(l.again)?;
    a.set_label(&mut l.call)?;
    a.mov(rdi, rsi)?;
    match calls.indirect_thunk {
        Some(thunk) => a.call(thunk)?,
        None => a.call(rax)?,
    }
    a.movsxd(r13, eax)?;
    a.mov(r14d, 1)?;
    a.jmp(l.again)?;
    a.set_label(&mut l.done)?;
    a.pop(r14)?;
    a.pop(r13)?;
    a.pop(r12)?;
    a.pop(rbx)?;
    a.set_label(&mut l.unframe)?;
    a.pop(rbp)?;
    ret(a, calls.returns)
}

/// `ret`, as the guest returns: through its return thunk when it uses one.
fn ret(a: &mut CodeAssembler, returns: Returns) -> Result<(), iced_x86::IcedError> {
    match returns {
        Returns::Jump(thunk) => a.jmp(thunk),
        Returns::Ret | Returns::AsSymbol => a.ret(),
    }
}

/// The kernel functions the stub calls, and how it returns.
struct StubCalls {
    printk: u64,
    msleep: u64,
    /// `__x86_indirect_thunk_rax`, for the callback calls (a plain `call *%rax` where
    /// the kernel has none).
    indirect_thunk: Option<u64>,
    returns: Returns,
}

impl StubCalls {
    fn of_guest(guest: &dyn PausedGuest, kernel: &Kernel) -> Result<Self, KpError> {
        let sym = |n: &str| {
            kernel
                .symbols
                .resolve(n, None)
                .map(|s| s.addr)
                .map_err(|e| KpError::Unsupported(format!("the module notifier needs {n}: {e}")))
        };
        let mem = kernel.memory(guest);
        let returns = Returns::for_stubs(&mem, &kernel.symbols)?;
        Ok(StubCalls {
            printk: sym("_printk").or_else(|_| sym("printk"))?,
            msleep: sym("msleep")?,
            indirect_thunk: kernel.symbols.addr("__x86_indirect_thunk_rax"),
            returns,
        })
    }
}

/// What installing the notifier needs of the guest kernel.
fn layout(kernel: &Kernel) -> Result<(&NotifierLayout, u64, [u64; 2]), KpError> {
    let l = kernel.layout.patcher.notifier.as_ref().ok_or_else(|| {
        KpError::Unsupported(
            "this kernel's BTF has no struct blocking_notifier_head or notifier_block: \
             lpvmm cannot follow its modules"
                .into(),
        )
    })?;
    let head = kernel
        .symbols
        .named("module_notify_list")
        .into_iter()
        .find(|s| !s.is_text())
        .map(|s| s.addr)
        .ok_or_else(|| {
            KpError::Unsupported("the kernel symbol module_notify_list is not in kallsyms".into())
        })?;
    let m = kernel
        .layout
        .modules
        .as_ref()
        .map_err(|e| KpError::Unsupported(format!("{e}")))?;
    // ModuleLayout::states is [live, coming, going, unformed].
    Ok((l, head, [m.states[1], m.states[2]]))
}

/// Everything installing the notifier takes from the guest, checked in the pause before
/// anything is written: [`NotifierPlan::install`] then only writes.
pub(crate) struct NotifierPlan {
    calls: StubCalls,
    layout: NotifierLayout,
    head_pa: u64,
    first: u64,
    coming: u64,
    going: u64,
}

/// The notifier's runs in the patch area: its code, and its block with the message
/// slots.
const SIZES: Sizes = Sizes {
    code: 4096,
    rodata: 0,
    data: SLOTS_AT + SLOTS * SLOT,
};

impl NotifierPlan {
    /// Refused while the guest's module notifier chain is in use, or where the kernel
    /// lacks what the notifier needs.
    pub(crate) fn of_guest(guest: &dyn PausedGuest, kernel: &Kernel) -> Result<Self, KpError> {
        let (l, head, [coming, going]) = layout(kernel)?;
        let calls = StubCalls::of_guest(guest, kernel)?;
        let mem = kernel.memory(guest);
        let read = |at: u64| {
            mem.u64(at)
                .map_err(|e| KpError::guest("reading module_notify_list", e))
        };
        if read(head + l.head_rwsem_count)? != 0 {
            return Err(KpError::GuestBusy(
                "the guest's module notifier chain is in use (a module is loading or \
                 unloading)"
                    .into(),
            ));
        }
        Ok(NotifierPlan {
            first: read(head + l.head_first)?,
            head_pa: mem
                .translate(head + l.head_first)
                .map_err(|e| KpError::guest("module_notify_list", e))?,
            calls,
            layout: l.clone(),
            coming,
            going,
        })
    }

    /// Whether `area` has room for the notifier.
    pub(crate) fn fits(area: &Area) -> Result<(), KpError> {
        area.space.place("the module notifier", SIZES).map(|_| ())
    }

    /// Put the notifier on the chain: its runs taken from `area`, its stub and block
    /// written, the chain's head pointed at its block.
    pub(crate) fn install(
        self,
        guest: &mut dyn GuestWriter,
        area: &mut Area,
        bell: Doorbell,
    ) -> Result<Notifier, KpError> {
        let l = &self.layout;
        let runs = area.space.place("the module notifier", SIZES)?;
        let Stub {
            code,
            ring_ip,
            framed,
        } = stub(runs.code.start, bell, self.coming, self.going, &self.calls)?;
        let block = runs.data.start;
        let mut nb = vec![0u8; l.block_size as usize];
        let mut put = |at: u64, v: &[u8]| {
            if let Some(d) = nb.get_mut(at as usize..at as usize + v.len()) {
                d.copy_from_slice(v);
            }
        };
        put(l.block_call, &runs.code.start.to_le_bytes());
        put(l.block_next, &self.first.to_le_bytes());
        put(l.block_priority, &i32::MAX.to_le_bytes());
        let write = |g: &mut dyn GuestWriter, pa: u64, b: &[u8]| {
            g.write_phys(pa, b)
                .map_err(|e| KpError::guest("writing the module notifier", e))
        };
        write(guest, area.layout.pa(runs.code.start), &code)?;
        write(guest, area.layout.pa(block), &nb)?;
        write(guest, self.head_pa, &block.to_le_bytes())?;
        area.space.take(runs);
        Ok(Notifier {
            stub: crate::area::Region {
                start: runs.code.start,
                end: runs.code.start + code.len() as u64,
            },
            runs,
            ring_ip,
            framed,
            block,
            next_slot: 0,
        })
    }
}

impl Notifier {
    /// Is `rip` the stub's `out` (KVM reports the exit at the instruction; after it,
    /// should a KVM complete the instruction first)?
    pub fn rang_here(&self, rip: u64) -> bool {
        rip == self.ring_ip || rip == self.ring_ip + 1
    }

    /// Write `text` for the guest's kernel log (as `printk("\0013lpvmm: TEXT\n")`, a
    /// `KERN_ERR` line) into the next message slot; its address.
    pub(crate) fn message(
        &mut self,
        guest: &mut dyn GuestWriter,
        area: &Area,
        text: &str,
    ) -> Result<u64, KpError> {
        let slot = self.runs.data.start + SLOTS_AT + (self.next_slot % SLOTS) * SLOT;
        self.next_slot += 1;
        let mut line = b"\x013lpvmm: ".to_vec();
        line.extend(text.replace('%', "%%").bytes().filter(|&b| b != 0));
        line.truncate(SLOT as usize - 2);
        line.extend_from_slice(b"\n\0");
        guest
            .write_phys(area.layout.pa(slot), &line)
            .map_err(|e| KpError::guest("writing a message for the guest's log", e))?;
        Ok(slot)
    }
}
