//! System states (the kernel livepatch's state.c): a patch declares, with
//! `LPVMM_STATE(id, version)`, a change to the system it makes or relies on beyond its
//! functions (a new field's meaning, a changed lock rule). A patch that would run the
//! system at a lower version of a state than an enabled patch established, or a
//! cumulative patch that does not carry a state an enabled patch holds (it would
//! silently drop it), is refused before anything changes.

use crate::load::manifest::SystemState;
use crate::patch::{Patch, PatchState};
use crate::KpError;

/// A patch about to be enabled, as far as states are concerned.
pub struct Candidate<'a> {
    pub name: &'a str,
    pub atomic_replace: bool,
    pub states: &'a [SystemState],
}

/// Refuse `c` if it is incompatible with a state an enabled patch holds.
pub fn check_compatible(c: &Candidate, patches: &[Patch]) -> Result<(), KpError> {
    let enabled = patches
        .iter()
        .filter(|p| p.state == PatchState::Enabled && p.name != c.name);
    for p in enabled {
        for held in &p.states {
            match c.states.iter().find(|s| s.id == held.id) {
                None if c.atomic_replace => {
                    return Err(KpError::IncompatibleState(format!(
                        "cumulative patch '{}' would drop state {} (version {}), which enabled \
                         patch '{}' holds; a cumulative patch must declare every state the \
                         patches it replaces hold (LPVMM_STATE)",
                        c.name, held.id, held.version, p.name
                    )))
                }
                Some(s) if s.version < held.version => {
                    return Err(KpError::IncompatibleState(format!(
                        "patch '{}' would lower state {} from version {} (enabled patch '{}') \
                         to {}",
                        c.name, held.id, held.version, p.name, s.version
                    )))
                }
                _ => {}
            }
        }
    }
    Ok(())
}
