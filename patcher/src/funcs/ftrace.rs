//! Sharing fentry sites with the guest's own ftrace.
//!
//! The 5-byte NOP lpvmm turns into a jump belongs to ftrace, which turns it into a call
//! whenever the guest traces the function (function tracer, kprobes, the guest's own
//! livepatch) and checks first that it still finds its NOP. So when a site leaves the
//! NOP, lpvmm marks the site's ftrace record `FTRACE_FL_DISABLED`, the kernel's own "do
//! not touch this record" flag: a `set_ftrace_filter` naming the function matches
//! nothing, a tracer of every function passes it by, and no ftrace update reaches the
//! site. When the site is the NOP again, lpvmm clears the flag, but only while no
//! enabled ftrace ops covers the function: ftrace then counts 0 users and finds the NOP,
//! as if nothing had happened. Until then the site keeps its jump and the transition
//! waits, saying which of the guest's tracers it waits for.
//!
//! Reads go through [`introspection::ftrace`]; the only write is the record's `flags`.

use introspection::ftrace::{FtraceLayout, FtraceRecord, FtraceUser};
use introspection::memory::KernelMemory;
use introspection::{Kernel, PausedGuest};

use crate::funcs::FuncStack;
use crate::KpError;

/// What a site write does to the site's ftrace record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SiteMove {
    /// The NOP becomes a jump: hide the record from ftrace.
    Claim,
    /// The jump becomes the NOP again: give the record back.
    Release,
}

impl SiteMove {
    /// How writing `bytes` at the site of `s` moves it, if it crosses the NOP.
    pub(crate) fn of(s: &FuncStack, bytes: &[u8; 5]) -> Option<SiteMove> {
        match (s.live == s.original, *bytes == s.original) {
            (true, false) => Some(SiteMove::Claim),
            (false, true) => Some(SiteMove::Release),
            _ => None,
        }
    }
}

/// One write of a record's flags, and what the site's [`FuncStack::ftrace_hidden`]
/// becomes with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FlagWrite {
    pub func: u64,
    pub flags_pa: u64,
    pub flags: u64,
    pub hidden: Option<u64>,
    pub release: bool,
}

/// Decide every flag write for these site moves, or why none may be made now. Writes
/// nothing: the caller writes all of them with the sites, or none.
pub(crate) fn plan(
    kernel: &Kernel,
    guest: &dyn PausedGuest,
    moves: &[(&FuncStack, SiteMove)],
) -> Result<Vec<FlagWrite>, KpError> {
    let Some(ft) = kernel.ftrace.as_ref() else {
        return Ok(Vec::new());
    };
    let moves: Vec<_> = moves
        .iter()
        .filter(|(s, m)| *m == SiteMove::Claim || s.ftrace_hidden.is_some())
        .collect();
    if moves.is_empty() {
        return Ok(Vec::new());
    }
    let mem = kernel.memory(guest);
    if let Some(owner) = ft.lock_owner(&mem).map_err(ftrace_err)? {
        return Err(KpError::GuestBusy(format!(
            "the guest's ftrace is changing code (the task at {owner:#x} holds ftrace_lock)"
        )));
    }
    let mut writes = Vec::new();
    for (s, m) in moves {
        let rec = ft.record(&mem, s.site).map_err(ftrace_err)?;
        let w = match m {
            SiteMove::Claim => claim(ft, s, rec)?,
            SiteMove::Release => release(kernel, ft, &mem, s, rec)?,
        };
        if let Some((rec, flags)) = w {
            writes.push(FlagWrite {
                func: s.addr,
                flags_pa: mem
                    .translate(rec.flags_va)
                    .map_err(|e| KpError::guest(format!("the ftrace record of {}", s.name), e))?,
                flags,
                hidden: (*m == SiteMove::Claim).then_some(rec.flags_va),
                release: *m == SiteMove::Release,
            });
        }
    }
    Ok(writes)
}

fn claim(
    ft: &FtraceLayout,
    s: &FuncStack,
    rec: Option<FtraceRecord>,
) -> Result<Option<(FtraceRecord, u64)>, KpError> {
    // No record: ftrace does not manage this site. Disabled already: the kernel keeps
    // ftrace away from it itself, and lpvmm must not give it back later.
    let Some(rec) = rec.filter(|r| !ft.is_disabled(r)) else {
        return Ok(None);
    };
    if ft.refs(&rec) != 0 {
        return Err(KpError::Site(format!(
            "{}: the guest's ftrace counts {} tracer(s) on it although its entry is a NOP \
             (ftrace may have failed earlier in this boot; see the guest's dmesg)",
            s.name,
            ft.refs(&rec)
        )));
    }
    Ok(Some((rec, rec.flags | ft.disabled)))
}

fn release(
    kernel: &Kernel,
    ft: &FtraceLayout,
    mem: &KernelMemory,
    s: &FuncStack,
    rec: Option<FtraceRecord>,
) -> Result<Option<(FtraceRecord, u64)>, KpError> {
    let rec = rec
        .filter(|r| Some(r.flags_va) == s.ftrace_hidden)
        .ok_or_else(|| {
            KpError::GuestState(format!(
                "the ftrace record lpvmm hid for {} at {:#x} is gone",
                s.name, s.site
            ))
        })?;
    let users = ft.users(mem, s.site).map_err(ftrace_err)?;
    if !users.is_empty() {
        return Err(KpError::GuestBusy(format!(
            "{} enabled ftrace user(s) in the guest cover {} ({}); lpvmm gives the \
             function back to ftrace only when none does: stop them in the guest (for \
             example `echo nop > current_tracer`, or disable the kprobe) and lpvmm goes on",
            users.len(),
            s.name,
            describe(kernel, &users)
        )));
    }
    // Someone else cleared the flag: nothing of ours to undo.
    Ok(ft
        .is_disabled(&rec)
        .then_some((rec, rec.flags & !ft.disabled)))
}

/// `function_trace_call (ops 0x...)`, one per user.
fn describe(kernel: &Kernel, users: &[FtraceUser]) -> String {
    users
        .iter()
        .map(|u| {
            let func = kernel
                .symbols
                .locate(u.func)
                .map_or_else(|| format!("{:#x}", u.func), |l| l.name);
            format!("{func}, ops at {:#x}", u.ops)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn ftrace_err(e: introspection::ftrace::FtraceError) -> KpError {
    KpError::guest("the guest's ftrace records", e)
}
