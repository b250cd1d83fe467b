//! The per-function stack of versions (the kernel livepatch's `klp_ops` and its
//! `func_stack`): for every redirected kernel function, its original entry bytes and the
//! versions stacked on it, oldest first. Which version a task runs is the transition's
//! business ([`crate::transition`]); when no transition runs, every task runs the
//! top one.

use serde::{Deserialize, Serialize};

use crate::site;
use crate::KpError;

/// One version of a function: the kernel's own code, or a patch's replacement.
/// (Cumulative patches will add a "nop" version: the original, named by a patch.)
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
    /// Oldest first; the last is the one every task runs outside transitions.
    pub versions: Vec<NewCode>,
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
            versions: Vec::new(),
        }
    }

    /// The version tasks run when no transition is in progress.
    pub fn top(&self) -> Version {
        self.versions
            .last()
            .cloned()
            .map_or(Version::Original, Version::Code)
    }

    /// The version below the top.
    pub fn below_top(&self) -> Version {
        self.versions
            .len()
            .checked_sub(2)
            .map_or(Version::Original, |i| {
                Version::Code(self.versions[i].clone())
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
            Version::Code(c) => CodeRange {
                start: c.addr,
                end: c.addr + c.size,
                name: format!("{} [{}]", c.name, c.patch),
            },
        }
    }
}
