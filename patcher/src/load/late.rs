//! What a patch with a module part keeps to be linked again, at the same place, when
//! the guest loads one of its modules ([`crate::coming`]): the object, where it lies,
//! what the guest chose at boot, and each symbol it uses by the object it is in.

use std::sync::Arc;

use crate::load::link::{BootChoices, Placement};
use crate::load::object::PatchObject;

/// What a patch with a module part was linked with, to link it again, at the same
/// place, when the guest loads one of its modules: the symbols of that module, pending
/// until then, then resolve ([`crate::load::link::ImportAt::Pending`]).
#[derive(Clone)]
pub(crate) struct LateLink {
    pub(crate) obj: Arc<PatchObject>,
    pub(crate) at: Placement,
    pub(crate) boot: BootChoices,
    /// The symbols it uses in vmlinux, with their addresses.
    pub(crate) vmlinux: Vec<(String, u64)>,
    /// The symbols it uses in each module, as (symbol, module): resolved in the module
    /// while it is loaded, pending (the trap) while it is not.
    pub(crate) owners: Vec<(String, String)>,
    /// The addresses of those symbols in the modules loaded now.
    pub(crate) current: Vec<(String, u64)>,
}

impl std::fmt::Debug for LateLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LateLink({} at {:#x})",
            self.obj.manifest.name, self.at.code
        )
    }
}

/// Two links of one patch are the same link when they place the same object at the
/// same place.
impl PartialEq for LateLink {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at && self.obj == other.obj
    }
}

impl Eq for LateLink {}
