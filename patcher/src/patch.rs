//! What a loaded patch is: the kernel objects it patches and their functions, the kernel
//! symbols it uses, its unwind table and its state (the kernel livepatch's `klp_patch`
//! → `klp_object` → `klp_func`). Plain data that the engine owns; every other module
//! of the patcher may read it.

use introspection::orc::OrcEntry;
use serde::{Deserialize, Serialize};

use crate::load::manifest::{CallbackKind, KernelSymbol, SystemState};
use crate::space::Runs;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatchState {
    /// Loaded into the patch area; no task runs it.
    Disabled,
    /// Its versions count: each of its functions is visible unless a newer enabled
    /// patch also names it.
    Enabled,
    /// A cumulative patch took over (atomic replace): never enabled again; unload it.
    Replaced,
}

/// One function of a patch: where the old one is and where its replacement is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchedFunc {
    pub old: KernelSymbol,
    pub old_addr: u64,
    pub old_size: u64,
    /// The fentry site (the function's start, or +4 after `endbr64`).
    pub site: u64,
    pub site_pa: u64,
    pub new_name: String,
    pub new_addr: u64,
    pub new_size: u64,
    /// The new function keeps a frame pointer (`push %rbp; mov %rsp,%rbp`), so its call
    /// sites unwind reliably.
    pub frame_pointer: bool,
    /// Flips without per-task consistency.
    #[serde(default)]
    pub immediate: bool,
}

/// One ORC entry of a patch's code: it covers `ip` up to the next entry's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrcAt {
    pub ip: u64,
    pub entry: OrcEntry,
}

/// A kernel symbol the patch uses, resolved in this guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Import {
    pub name: String,
    /// 0 while it is a symbol of a module not loaded yet.
    pub addr: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patch {
    pub name: String,
    pub state: PatchState,
    /// A transition of this patch was forced: a task may still run its code, so the
    /// code stays in the guest.
    pub forced: bool,
    /// The kernel objects it patches, each with its functions: vmlinux today; a module
    /// by name is the module issue's.
    pub objects: Vec<PatchedObject>,
    pub depends: Vec<String>,
    /// A cumulative patch (`LPVMM_ATOMIC_REPLACE`).
    pub atomic_replace: bool,
    /// System states it establishes (`LPVMM_STATE`).
    pub states: Vec<SystemState>,
    /// Shadow variables it ties to one of its states (`LPVMM_SHADOW`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shadows: Vec<crate::load::manifest::ShadowTie>,
    /// For a replaced patch: the cumulative patch that replaced it.
    pub replaced_by: Option<String>,
    /// Where its code and data are in the patch area.
    pub runs: Runs,
    /// objtool's unwind table for its code (kbuild builds), in address order; without
    /// one, tasks unwind through its code by the frame-pointer rule.
    #[serde(default)]
    pub orc: Vec<OrcAt>,
    pub imports: Vec<Import>,
    /// Times this patch was enabled.
    pub enables: u64,
    /// Its callbacks, for the objects they belong to.
    #[serde(default)]
    pub callbacks: Vec<PatchCallback>,
    /// For a livepatch module: each object's `struct klp_object` in the patch area, its
    /// callbacks' argument (see [`crate::klp`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub klp_objects: Vec<KlpObjectAt>,
    /// The module the guest's kernel knows the patch's code as ([`crate::guest_module`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_module: Option<crate::guest_module::GuestModule>,
    /// For a patch with a module part: what linking it again needs when a module it
    /// patches is loaded (lpvmm's own state, not shown).
    #[serde(skip)]
    pub(crate) late: Option<crate::load::late::LateLink>,
}

/// Where a livepatch module's `struct klp_object` for `object` is in the patch area.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KlpObjectAt {
    pub object: ObjectName,
    pub addr: u64,
}

impl Patch {
    /// The argument its callbacks for `object` get: the livepatch module's `struct
    /// klp_object`, else `module` (a module's `struct module`, 0 for vmlinux).
    pub(crate) fn callback_arg(&self, object: &ObjectName, module: u64) -> u64 {
        self.klp_objects
            .iter()
            .find(|k| &k.object == object)
            .map_or(module, |k| k.addr)
    }

    /// A livepatch module whose exit ran, after a disable that followed an enable: it
    /// cannot be enabled again, as the kernel frees a disabled livepatch.
    pub(crate) fn exited(&self) -> bool {
        self.state == PatchState::Disabled
            && self.enables > 0
            && self
                .callbacks
                .iter()
                .any(|c| c.kind == crate::load::manifest::CallbackKind::ModuleExit)
    }

    /// Whether its `kind` callbacks return nothing: a livepatch module's, but pre_patch
    /// (`void (*post_patch)(struct klp_object *)` and the others).
    pub(crate) fn void_callback(&self, kind: crate::load::manifest::CallbackKind) -> bool {
        !self.klp_objects.is_empty() && kind != crate::load::manifest::CallbackKind::PrePatch
    }
}

/// A kernel object a patch patches (`klp_object`): vmlinux or a module, by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectName {
    Vmlinux,
    Module(String),
}

impl std::fmt::Display for ObjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ObjectName::Vmlinux => f.write_str("vmlinux"),
            ObjectName::Module(m) => f.write_str(m),
        }
    }
}

/// Where an object of a patch is in the guest now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectState {
    /// vmlinux, always there.
    #[default]
    Vmlinux,
    /// A loaded module, its `struct module` at `module`: its functions are redirected
    /// as the patch's state says.
    Loaded { module: u64 },
    /// A module the guest has not loaded: its part of the patch is linked and its
    /// functions redirected when the guest loads it, before any of its code runs.
    Waiting,
}

/// A replacement a module object of a patch makes whenever the module is loaded: the
/// patch's side of a [`PatchedFunc`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectFunc {
    pub old: KernelSymbol,
    pub new_name: String,
    pub new_addr: u64,
    pub new_size: u64,
    pub frame_pointer: bool,
    pub immediate: bool,
}

/// One object of a patch and the functions of it the patch replaces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchedObject {
    pub name: ObjectName,
    /// Its functions as found in the guest (none while a module waits to be loaded).
    pub funcs: Vec<PatchedFunc>,
    #[serde(default)]
    pub state: ObjectState,
    /// For a module: what it replaces each time the module is loaded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replaces: Vec<ObjectFunc>,
}

impl PatchedFunc {
    /// `f` of a module, at the kernel function found at `old_addr` (`site` its fentry
    /// site).
    pub(crate) fn of_module(
        f: &ObjectFunc,
        old_addr: u64,
        old_size: u64,
        site: u64,
        site_pa: u64,
    ) -> Self {
        PatchedFunc {
            old: f.old.clone(),
            old_addr,
            old_size,
            site,
            site_pa,
            new_name: f.new_name.clone(),
            new_addr: f.new_addr,
            new_size: f.new_size,
            frame_pointer: f.frame_pointer,
            immediate: f.immediate,
        }
    }
}

impl Patch {
    /// Every function it replaces, object by object.
    pub fn funcs(&self) -> impl Iterator<Item = &PatchedFunc> {
        self.objects.iter().flat_map(|o| o.funcs.iter())
    }

    /// How to unwind at `ip` in its code, from its ORC table.
    pub(crate) fn orc_at(&self, ip: u64) -> Option<OrcEntry> {
        let i = self.orc.partition_point(|o| o.ip <= ip).checked_sub(1)?;
        Some(self.orc[i].entry)
    }

    pub(crate) fn function_at(&self, ip: u64) -> Option<&PatchedFunc> {
        self.funcs()
            .find(|f| ip >= f.new_addr && ip < f.new_addr + f.new_size)
    }

    /// The callback whose code holds `ip`.
    pub(crate) fn callback_at(&self, ip: u64) -> Option<&PatchCallback> {
        self.callbacks
            .iter()
            .find(|c| ip >= c.addr && ip < c.addr + c.size)
    }
}

/// A callback of a patch, linked: its function's address in the patch area.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchCallback {
    pub object: ObjectName,
    pub kind: CallbackKind,
    pub func: String,
    pub addr: u64,
    #[serde(default)]
    pub size: u64,
    /// For a state's callback: the state's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<u64>,
}
