//! Who sees which version of a redirected function (the kernel livepatch's patch.c).
//!
//! A function's versions are the loaded patches that name it, in *load* order; the
//! visible one is the newest *enabled* one, or the kernel's original when none is. So
//! re-enabling an older patch never hides a newer one, a patch hidden under a newer one
//! for a function changes nothing there, and a cumulative patch that replaces the
//! others leaves the functions it does not name with the original (upstream's "nop"
//! version). A transition is planned as the difference between the visible versions
//! before and after it (`plan`); while it runs, which version each task sees is the
//! transition's business ([`crate::transition`]).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::patch::{Patch, PatchState, PatchedFunc};
use crate::KpError;

pub mod ftrace;
pub mod site;
pub mod write;

/// One function a transition moves: from the version every task ran to the one every
/// task will run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FuncChange {
    /// The kernel function (its address keys the function's version stack).
    pub func: u64,
    pub name: String,
    /// What every task ran when the transition started.
    pub from: Version,
    /// What every task runs when it completes.
    pub to: Version,
    /// Flips at once, without per-task consistency.
    pub immediate: bool,
    /// The trampoline its site jumps to while tasks are on both versions.
    pub trampoline: Option<u64>,
}

/// One version of a function: the kernel's own code, or a patch's replacement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Version {
    Original,
    Code(NewCode),
}

/// A patch's replacement function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewCode {
    pub patch: String,
    pub name: String,
    pub addr: u64,
    pub size: u64,
}

/// Code no task may be in when it leaves a version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeRange {
    pub start: u64,
    pub end: u64,
    /// How status names it: `func` or `func [patch]`.
    pub name: String,
}

impl CodeRange {
    /// A patch's new function, named `func [patch]`.
    pub fn of(c: &NewCode) -> CodeRange {
        CodeRange {
            start: c.addr,
            end: c.addr + c.size,
            name: format!("{} [{}]", c.name, c.patch),
        }
    }
}

/// A redirected kernel function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FuncStack {
    /// The kernel function, as the patch named it (`name` or `name,pos`).
    pub name: String,
    pub addr: u64,
    pub size: u64,
    /// The fentry site (the function's start, or +4 after `endbr64`).
    pub site: u64,
    pub site_pa: u64,
    pub original: [u8; 5],
    /// What lpvmm last wrote at the site (checked before every write).
    pub live: [u8; 5],
    /// The `flags` of the site's ftrace record, while lpvmm hides it from the guest's
    /// ftrace (see [`crate::funcs::ftrace`]).
    #[serde(default)]
    pub ftrace_hidden: Option<u64>,
    /// The module the function is in; `None` for vmlinux. Checked to be loaded, with
    /// the function in its text, before every write of the site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

impl FuncStack {
    pub fn new(name: String, addr: u64, size: u64, site: u64, site_pa: u64) -> Self {
        FuncStack {
            name,
            addr,
            size,
            site,
            site_pa,
            original: site::FENTRY_NOP,
            live: site::FENTRY_NOP,
            ftrace_hidden: None,
            module: None,
        }
    }

    /// The site record of a function a patch names, not yet redirected.
    pub(crate) fn of(f: &PatchedFunc) -> FuncStack {
        FuncStack {
            module: f.old.object.clone(),
            ..FuncStack::new(f.old.to_string(), f.old_addr, f.old_size, f.site, f.site_pa)
        }
    }

    /// Where the site's jump goes now (`None` while it holds the original bytes).
    pub fn jump_target(&self) -> Option<u64> {
        (self.live != self.original).then(|| {
            let rel = i32::from_le_bytes([self.live[1], self.live[2], self.live[3], self.live[4]]);
            (self.site as i64 + 5 + i64::from(rel)) as u64
        })
    }

    /// Where a jump must go to run `v`: the new function, or the original past its
    /// fentry site (which may itself be redirected).
    pub fn entry(&self, v: &Version) -> u64 {
        match v {
            Version::Original => self.site + 5,
            Version::Code(c) => c.addr,
        }
    }

    /// The site's bytes when every task runs `v`.
    pub fn site_bytes(&self, v: &Version) -> Result<[u8; 5], KpError> {
        match v {
            Version::Original => Ok(self.original),
            Version::Code(c) => site::jump(self.site, c.addr),
        }
    }

    /// The code of `v`.
    pub fn code(&self, v: &Version) -> CodeRange {
        match v {
            Version::Original => CodeRange {
                start: self.addr,
                end: self.addr + self.size,
                name: self.name.clone(),
            },
            Version::Code(c) => CodeRange::of(c),
        }
    }
}

/// One patch's version of a function, as status shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionEntry {
    pub patch: String,
    pub function: String,
    pub addr: u64,
    pub state: PatchState,
    /// The one tasks run when no transition moves this function.
    pub visible: bool,
}

/// Every version of a kernel function that a loaded patch names, in load order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionVersions {
    pub name: String,
    pub addr: u64,
    /// Its fentry site.
    pub site: u64,
    /// At most one is `visible`; none is when tasks run the kernel's own code.
    pub versions: Vec<VersionEntry>,
}

impl Patch {
    /// This patch's version of kernel function `func`.
    pub fn version_of(&self, func: u64) -> Option<NewCode> {
        self.funcs().find(|f| f.old_addr == func).map(|f| NewCode {
            patch: self.name.clone(),
            name: f.new_name.clone(),
            addr: f.new_addr,
            size: f.new_size,
        })
    }

    fn immediate_for(&self, func: u64) -> bool {
        self.funcs().any(|f| f.old_addr == func && f.immediate)
    }
}

/// The first loaded patch's record of kernel function `func` (every patch naming it
/// resolved the same function, site and size).
pub(crate) fn named(patches: &[Patch], func: u64) -> Option<&PatchedFunc> {
    patches
        .iter()
        .flat_map(|p| p.funcs())
        .find(|f| f.old_addr == func)
}

/// Which patches count as enabled, now or in a state a transition would leave.
pub(crate) type Enabled<'a> = &'a dyn Fn(&Patch) -> bool;

/// The version of `func` tasks run when the patches `enabled` says are enabled: the
/// newest of them in load order (`patches` is in load order) that names it.
pub(crate) fn visible(patches: &[Patch], func: u64, enabled: Enabled) -> Version {
    patches
        .iter()
        .rev()
        .filter(|p| enabled(p))
        .find_map(|p| p.version_of(func))
        .map_or(Version::Original, Version::Code)
}

pub(crate) fn is_enabled(p: &Patch) -> bool {
    p.state == PatchState::Enabled
}

/// The functions whose visible version differs between now and `after`, each with
/// both versions: exactly what a transition to `after` must move.
pub(crate) fn plan(
    patches: &[Patch],
    stacks: &BTreeMap<u64, FuncStack>,
    after: Enabled,
) -> Vec<FuncChange> {
    let funcs: BTreeSet<u64> = stacks
        .keys()
        .copied()
        .chain(patches.iter().flat_map(|p| p.funcs().map(|f| f.old_addr)))
        .collect();
    let mut changes = Vec::new();
    for func in funcs {
        let from = visible(patches, func, &is_enabled);
        let to = visible(patches, func, after);
        if from == to {
            continue;
        }
        // The flag of the patch whose code the function gets, or leaves.
        let immediate = match (&to, &from) {
            (Version::Code(c), _) | (Version::Original, Version::Code(c)) => patches
                .iter()
                .any(|p| p.name == c.patch && p.immediate_for(func)),
            (Version::Original, Version::Original) => false,
        };
        let name = named(patches, func)
            .map(|f| f.old.to_string())
            .or_else(|| stacks.get(&func).map(|s| s.name.clone()))
            .unwrap_or_else(|| format!("{func:#x}"));
        changes.push(FuncChange {
            func,
            name,
            from,
            to,
            immediate,
            trampoline: None,
        });
    }
    changes
}

/// Every function a loaded patch names, with its versions in load order.
pub(crate) fn function_versions(patches: &[Patch]) -> Vec<FunctionVersions> {
    let mut by_func: BTreeMap<u64, FunctionVersions> = BTreeMap::new();
    for p in patches {
        for f in p.funcs() {
            let e = by_func
                .entry(f.old_addr)
                .or_insert_with(|| FunctionVersions {
                    name: f.old.to_string(),
                    addr: f.old_addr,
                    site: f.site,
                    versions: Vec::new(),
                });
            e.versions.push(VersionEntry {
                patch: p.name.clone(),
                function: f.new_name.clone(),
                addr: f.new_addr,
                state: p.state,
                visible: false,
            });
        }
    }
    for fv in by_func.values_mut() {
        if let Version::Code(c) = visible(patches, fv.addr, &is_enabled) {
            if let Some(v) = fv.versions.iter_mut().find(|v| v.patch == c.patch) {
                v.visible = true;
            }
        }
    }
    by_func.into_values().collect()
}
