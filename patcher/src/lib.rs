//! lpvmm's patcher: the `.kp` patch format, the linker that places a patch in the
//! guest's patch area, redirection sites, and the patch engine with its consistency
//! model. No KVM here: everything works on an [`introspection::PausedGuest`], so it is
//! tested over synthetic guests.

pub mod area;
pub mod build;
pub mod engine;
pub mod journal;
pub mod link;
pub mod manifest;
pub mod object;
pub mod site;
#[cfg(test)]
mod tests;
pub mod transition;

pub use engine::{Blocker, Engine, Op, Patch, PatchState, Plan};
pub use object::PatchObject;
pub use transition::{Outcome, Transition};

/// Everything that can be wrong with a patch or a patch operation. Each names the file
/// part, symbol or state at fault; none leaves the guest changed.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum KpError {
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
    #[error("a patch named '{0}' is already loaded")]
    AlreadyLoaded(String),
    #[error("no patch named '{0}' is loaded")]
    NoSuchPatch(String),
    #[error("dependency: {0}")]
    Dependency(String),
    #[error("{0}")]
    State(String),
    #[error("guest memory: {0}")]
    Guest(String),
}
