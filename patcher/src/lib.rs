//! lpvmm's patcher: the `.kp` patch format, the linker that places a patch in the
//! guest's patch area, redirection sites, and the patch engine with its consistency
//! model. No KVM here: everything works on a paused guest (reads through
//! [`introspection::PausedGuest`], writes through [`GuestWriter`]), so it is tested
//! over synthetic guests.
//!
//! The engine reads like the kernel's livepatch: [`engine`] holds patches and their
//! lifetime (core.c) and offers the VMM its two entry points; [`load`] parses, resolves
//! and links a patch (what kernel/module/ does for a livepatch module); [`funcs`] holds
//! the per-function version stacks and is the only writer of sites (patch.c);
//! [`transition`] is the per-task switch (transition.c), with [`transition::dispatch`],
//! what lets lpvmm do from outside what the kernel does with a flag in each task;
//! [`states`] the system states of cumulative patches (state.c); [`notifier`] and
//! [`coming`] follow the guest's modules as they come and go (core.c's
//! `klp_module_coming` and `klp_module_going`).
#![forbid(unsafe_code)]

// The fault-injection switch exists for one integration test; an optimised build that
// a user could run never carries it.
#[cfg(all(feature = "fault-injection", not(debug_assertions)))]
compile_error!("the fault-injection feature is for test builds only, never a release build");

pub mod area;
pub mod build;
pub mod callbacks;
pub mod coming;
pub mod diffbuild;
pub mod engine;
pub mod funcs;
pub mod guest_module;
pub mod guestcall;
pub mod journal;
pub mod kbuild;
pub mod klp;
pub mod load;
pub mod lost_calls;
pub mod notifier;
pub mod patch;
pub mod shadow;
pub mod source;
pub mod space;
pub mod states;
pub mod taint;
#[cfg(test)]
mod tests;
pub mod transition;

use std::time::Duration;

use introspection::{GuestError, GuestRam, PausedGuest, PhysRange};

pub use engine::{Begin, EnableArgs, Engine, Loaded};
pub use funcs::{FuncChange, FuncStack, FunctionVersions, NewCode, Version, VersionEntry};
pub use journal::{PostMortem, POST_MORTEM_CLEAN, POST_MORTEM_MISMATCH};
pub use load::manifest::SystemState;
pub use load::object::PatchObject;
pub use load::Prepared;
pub use patch::{Import, ObjectName, Patch, PatchState, PatchedFunc, PatchedObject};
pub use transition::{
    Blocker, Consistency, EarlyCheckCounts, Op, Outcome, Phase, Request, TickParts, Transition,
};

/// Writing to a paused guest: only the patcher writes, and only through this.
pub trait GuestWriter: PausedGuest {
    /// Write guest-physical memory. Fails whole, writing nothing, if any byte is outside
    /// guest memory.
    fn write_phys(&mut self, addr: u64, data: &[u8]) -> Result<(), GuestError>;

    /// The same guest, read-only.
    fn reader(&self) -> &dyn PausedGuest;

    /// Write guest-owned data that lpvmm changes once and hands straight back to the
    /// guest, which changes it next (the head of one of the guest's own lists, pushed
    /// onto): the journal counts it but holds none of its bytes (a post-mortem would
    /// otherwise take the guest's next change for a fault of lpvmm's).
    fn write_handed_back(&mut self, addr: u64, data: &[u8]) -> Result<(), GuestError> {
        self.write_phys(addr, data)
    }
}

/// What the engine asks of the VMM that runs the guest: its memory while it runs, and a
/// pause in which the engine may write. The VMM decides when to pause; the engine,
/// everything else ([`Engine::load_and_enable`], [`Engine::drive`]).
pub trait GuestControl {
    /// Run `f` on the guest's memory while the guest runs: what it reads may change
    /// under it, so the engine checks again in a pause whatever it takes from it.
    fn running<R>(&self, f: impl FnOnce(&dyn GuestRam) -> R) -> R;

    /// Make these guest-physical ranges of lpvmm's own memory resident in the host, so
    /// that the pause that writes them does not wait for the host to fault them in.
    fn make_resident(&self, ranges: &[PhysRange]);

    /// Pause the guest, run `f` on it, resume it. Returns what `f` returned and the
    /// pause the guest saw.
    fn paused<R>(
        &mut self,
        f: impl FnOnce(&mut dyn GuestWriter) -> R,
    ) -> Result<(R, Duration), PauseError>;

    /// Send a guest CPU the interrupt of a guest call queued in a pause
    /// ([`guestcall`]), once the guest runs again.
    fn interrupt(&mut self, ipi: guestcall::Ipi) -> Result<(), PauseError>;
}

/// The VMM could not pause the guest (its own error is the source).
#[derive(Debug, thiserror::Error)]
#[error("cannot pause the guest")]
pub struct PauseError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

/// What is wrong with a .kp file, found by parsing it alone (load/object.rs,
/// load/manifest.rs): before any symbol is resolved or any guest byte read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("not an ELF object: {0}")]
    NotElf(String),
    #[error("wrong machine: {0}")]
    WrongMachine(String),
    #[error("not a relocatable object (gcc -c output) but {0}")]
    NotRelocatable(String),
    #[error("no .lpvmm.manifest section: declare the patch with LPVMM_PATCH and LPVMM_REPLACE from lpvmm/patch.h")]
    NoManifest,
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("truncated or corrupt object: {0}")]
    Truncated(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// How many times a load or an unload is tried while the guest is busy
/// ([`KpError::GuestBusy`]: a module of its own loading, say), and how long apart.
pub const BUSY_TRIES: u32 = 100;
pub const BUSY_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// Everything that can be wrong with a patch or a patch operation. Each names the file
/// part, symbol or state at fault; none leaves the guest changed.
#[derive(Debug, thiserror::Error)]
pub enum KpError {
    /// The .kp file itself.
    #[error(transparent)]
    Parse(#[from] ParseError),
    // Linking against the guest (load/, area.rs, funcs/site.rs).
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("symbol: {0}")]
    Symbol(String),
    #[error("out of rel32 range: {0}")]
    OutOfRange(String),
    #[error("cannot redirect: {0}")]
    Site(String),
    #[error("patch area: {0}")]
    Area(String),
    #[error("patch area full: {0}")]
    AreaFull(String),
    // The engine: the patch stack and transitions.
    #[error("a patch named '{0}' is already loaded")]
    AlreadyLoaded(String),
    #[error("no patch named '{0}' is loaded")]
    NoSuchPatch(String),
    #[error("dependency: {0}")]
    Dependency(String),
    #[error("incompatible system state: {0}")]
    IncompatibleState(String),
    #[error("{0}")]
    State(String),
    // The guest.
    /// The guest holds something lpvmm cannot work with (a value out of range, a record
    /// gone from under it).
    #[error("guest: {0}")]
    GuestState(String),
    /// The guest is in the middle of something lpvmm must not cut across (its ftrace
    /// updating code, a tracer on a function lpvmm hands back); a transition waits.
    #[error("waiting for the guest: {0}")]
    GuestBusy(String),
    #[error(transparent)]
    Pause(#[from] PauseError),
    /// Reading or writing the guest failed: what lpvmm was doing, and the guest error.
    #[error("{context}: {source}")]
    Guest {
        context: String,
        #[source]
        source: GuestAccess,
    },
}

/// What reading or writing a guest can fail with: its physical or virtual memory, its
/// task list, its ftrace records.
#[derive(Debug, thiserror::Error)]
pub enum GuestAccess {
    #[error(transparent)]
    Phys(#[from] GuestError),
    #[error(transparent)]
    Virt(#[from] introspection::memory::MemError),
    #[error(transparent)]
    Tasks(#[from] introspection::tasks::TaskError),
    #[error(transparent)]
    Ftrace(#[from] introspection::ftrace::FtraceError),
}

impl KpError {
    /// A refusal because of the engine's state (a transition in progress, a patch a
    /// request depends on): the request was fine, the moment or the stack was not.
    pub fn is_refusal(&self) -> bool {
        matches!(self, KpError::State(_) | KpError::Dependency(_))
    }

    pub fn guest(context: impl Into<String>, source: impl Into<GuestAccess>) -> KpError {
        KpError::Guest {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// The patch a file holds, read against the guest's `kernel`: a `.kp`, or a kernel
/// livepatch module (`.ko`), whose `struct klp_patch` is read with the kernel's layout of
/// it and whose parameters are set to `params` (`NAME=VALUE`, as on insmod's command
/// line). A `.kp` takes no parameters.
pub fn parse_patch(
    bytes: &[u8],
    kernel: &introspection::kernel::Kernel,
    params: &[String],
) -> Result<PatchObject, KpError> {
    if klp::livepatch_module_name(bytes).is_none() {
        if let Some(p) = params.first() {
            return Err(KpError::Parse(ParseError::Manifest(format!(
                "'{p}': parameters are for kernel livepatch modules; a .kp has none"
            ))));
        }
        return Ok(PatchObject::parse(bytes)?);
    }
    let layout = kernel.layout.patcher.klp.as_ref().ok_or_else(|| {
        KpError::Unsupported(
            "this guest kernel's BTF has no struct klp_patch (CONFIG_LIVEPATCH): lpvmm reads a \
             livepatch module's description with the kernel's own layout of it"
                .into(),
        )
    })?;
    Ok(PatchObject::parse_livepatch(bytes, layout, params)?)
}
