//! Space in the patch area: each of its regions (code, read-only data, data) hands out
//! page-aligned runs, first fit, and takes back the runs of unloaded patches, so that a
//! long life of load, replace and unload (a cumulative patch a week) never fills the
//! area. Only the engine frees: a run is freed when no task can be in it any more (an
//! unloaded patch was disabled or replaced by a completed transition; forced patches
//! and trampoline banks are never freed).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::area::Region;
use crate::KpError;

pub const PAGE: u64 = 4096;

/// One region's runs in use, by start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Space {
    pub region: Region,
    used: BTreeMap<u64, u64>,
}

impl Space {
    pub fn new(region: Region) -> Self {
        Space {
            region,
            used: BTreeMap::new(),
        }
    }

    /// The free gaps between the runs in use, lowest first (possibly empty ones).
    fn gaps(&self) -> Vec<Region> {
        let mut gaps = Vec::with_capacity(self.used.len() + 1);
        let mut at = self.region.start;
        for (&start, &end) in &self.used {
            gaps.push(Region {
                start: at,
                end: start.max(at),
            });
            at = at.max(end);
        }
        gaps.push(Region {
            start: at,
            end: self.region.end.max(at),
        });
        gaps
    }

    /// Where a run of `bytes` (rounded up to pages) would go: the lowest gap it fits.
    pub fn find(&self, bytes: u64) -> Option<Region> {
        let len = bytes.div_ceil(PAGE) * PAGE;
        if len == 0 {
            return Some(Region {
                start: self.region.start,
                end: self.region.start,
            });
        }
        self.gaps()
            .into_iter()
            .find(|g| g.size() >= len)
            .map(|g| Region {
                start: g.start,
                end: g.start + len,
            })
    }

    /// Take a run of `bytes`; an empty run takes nothing.
    pub fn alloc(&mut self, bytes: u64) -> Option<Region> {
        let r = self.find(bytes)?;
        self.take(r);
        Some(r)
    }

    /// Take exactly `r` (it must be what [`Space::find`] gave for its size).
    pub fn take(&mut self, r: Region) {
        if r.size() > 0 {
            self.used.insert(r.start, r.end);
        }
    }

    /// Give back a run [`Space::alloc`] handed out.
    pub fn free(&mut self, r: Region) {
        if self.used.get(&r.start) == Some(&r.end) {
            self.used.remove(&r.start);
        }
    }

    pub fn used_bytes(&self) -> u64 {
        self.used.iter().map(|(s, e)| e - s).sum()
    }

    /// The largest run [`Space::alloc`] could hand out now.
    pub fn largest_free(&self) -> u64 {
        self.gaps().iter().map(Region::size).max().unwrap_or(0)
    }
}

/// The three regions of the patch area, each with its runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AreaSpace {
    pub code: Space,
    pub rodata: Space,
    pub data: Space,
}

/// Runs of one patch (or of the trampoline banks), one per region; empty where it has
/// nothing of that kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runs {
    pub code: Region,
    pub rodata: Region,
    pub data: Region,
}

/// Bytes wanted in each region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub code: u64,
    pub rodata: u64,
    pub data: u64,
}

impl Sizes {
    pub const ZERO: Sizes = Sizes {
        code: 0,
        rodata: 0,
        data: 0,
    };
}

impl AreaSpace {
    pub fn new(code: Region, rodata: Region, data: Region) -> Self {
        AreaSpace {
            code: Space::new(code),
            rodata: Space::new(rodata),
            data: Space::new(data),
        }
    }

    /// Where `who` would go, taking nothing; refused, naming the region, when it does
    /// not fit.
    pub fn place(&self, who: &str, want: Sizes) -> Result<Runs, KpError> {
        let one = |what: &str, s: &Space, bytes: u64| {
            s.find(bytes).ok_or_else(|| {
                KpError::AreaFull(format!(
                    "{who} needs {} KiB of {what}; the largest free run is {} KiB ({} KiB of {} KiB \
                     in use; unload patches, or lpvmm run --patch-area sets the size)",
                    bytes.div_ceil(PAGE) * PAGE / 1024,
                    s.largest_free() / 1024,
                    s.used_bytes() / 1024,
                    s.region.size() / 1024
                ))
            })
        };
        Ok(Runs {
            code: one("code", &self.code, want.code)?,
            rodata: one("read-only data", &self.rodata, want.rodata)?,
            data: one("data", &self.data, want.data)?,
        })
    }

    pub fn take(&mut self, r: Runs) {
        self.code.take(r.code);
        self.rodata.take(r.rodata);
        self.data.take(r.data);
    }

    pub fn free(&mut self, r: Runs) {
        self.code.free(r.code);
        self.rodata.free(r.rodata);
        self.data.free(r.data);
    }
}

/// The patch area as the engine holds it: where it lies, whether it is mapped in the
/// guest yet, and which of its space patches use.
#[derive(Clone, Debug)]
pub(crate) struct Area {
    pub(crate) layout: crate::area::AreaLayout,
    pub(crate) installed: bool,
    pub(crate) space: AreaSpace,
    /// The guest's shadow-variable table ([`crate::shadow`]): the first page of the
    /// data region, zeroed when the area is mapped, never handed to a patch.
    pub(crate) shadow_table: u64,
}

impl Area {
    pub(crate) fn new(layout: crate::area::AreaLayout) -> Area {
        let mut space = AreaSpace::new(layout.code, layout.rodata, layout.data);
        let table = space
            .data
            .alloc(PAGE)
            .map_or(layout.data.start, |r| r.start);
        Area {
            space,
            layout,
            installed: false,
            shadow_table: table,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space(pages: u64) -> Space {
        Space::new(Region {
            start: 0x10000,
            end: 0x10000 + pages * PAGE,
        })
    }

    #[test]
    fn first_fit_reuses_freed_runs_and_refuses_what_does_not_fit() {
        let mut s = space(4);
        let a = s.alloc(1).unwrap();
        let b = s.alloc(PAGE + 1).unwrap();
        assert_eq!((a.start, a.size()), (0x10000, PAGE));
        assert_eq!((b.start, b.size()), (0x11000, 2 * PAGE));
        assert_eq!(s.largest_free(), PAGE);
        assert!(s.alloc(2 * PAGE).is_none(), "only one page is left");
        s.free(a);
        assert_eq!(s.alloc(PAGE).unwrap(), a, "the freed run is reused");
        s.free(b);
        let c = s.alloc(2 * PAGE).unwrap();
        assert_eq!(c, b);
        assert_eq!(s.used_bytes(), 3 * PAGE);
        // An empty run takes nothing; freeing what was never handed out changes nothing.
        assert_eq!(s.alloc(0).unwrap().size(), 0);
        s.free(Region {
            start: 0x10000,
            end: 0x20000,
        });
        assert_eq!(s.used_bytes(), 3 * PAGE);
    }

    #[test]
    fn a_thousand_load_unload_cycles_stay_in_the_first_pages() {
        let mut s = space(8);
        let keep = s.alloc(PAGE).unwrap();
        for _ in 0..1000 {
            let r = s.alloc(3 * PAGE).expect("room after every free");
            assert!(r.end <= s.region.start + 4 * PAGE);
            s.free(r);
        }
        assert_eq!(s.used_bytes(), keep.size());
    }
}
