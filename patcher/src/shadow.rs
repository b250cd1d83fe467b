//! Shadow variables, seen from outside (`lpvmm shadow VM`).
//!
//! The runtime is C in each patch (`include/lpvmm/shadow.h`): it allocates with the
//! guest's kmalloc and keeps every variable in one table per guest, which lpvmm reserves
//! in its patch area (the first page of the data region, zeroed when the area is mapped)
//! and links to each patch as `__lpvmm_shadow_table`. One table for all patches is what
//! lets a cumulative patch find the variables the patch it replaces allocated, after
//! that patch's code is gone. This module reads the table: its layout is the header's,
//! version 1. Reads only; the walk is bounded, and a table the guest corrupted is an
//! error, never a loop.

use std::collections::BTreeMap;

use introspection::memory::KernelMemory;
use serde::{Deserialize, Serialize};

use crate::KpError;

/// The symbol a patch's runtime names the table by.
pub const TABLE_SYMBOL: &str = "__lpvmm_shadow_table";
/// Bytes reserved for the table (it uses 532).
pub const TABLE_BYTES: u64 = 4096;
/// `LPVMM_SHADOW_MAGIC`, "LPVMMSH1": the table was used.
const MAGIC: u64 = 0x3148_534d_4d56_504c;
const BUCKETS: u64 = 64;
/// struct lpvmm_shadow_table.
const TABLE_COUNT: u64 = 8;
const TABLE_BUCKETS: u64 = 16;
/// struct lpvmm_shadow.
const VAR_NEXT: u64 = 0;
const VAR_OBJ: u64 = 8;
const VAR_ID: u64 = 16;
const VAR_SIZE: u64 = 24;
const VAR_OWNER: u64 = 32;
const OWNER_BYTES: usize = 32;
/// More variables than this is a table the walk does not trust (a loop).
pub const MAX_VARS: usize = 1 << 20;

/// One shadow variable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowVar {
    /// The object it is attached to (the key, with `id`).
    pub obj: u64,
    pub id: u64,
    /// Bytes of its data.
    pub size: u64,
    /// The patch that allocated it.
    pub owner: String,
}

/// What the guest's table holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowTable {
    /// The table's own count of its variables (equals `vars.len()` unless the guest was
    /// changing it).
    pub count: u64,
    pub vars: Vec<ShadowVar>,
}

/// The variables of one id, summed up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowGroup {
    pub id: u64,
    pub count: u64,
    /// Their data, in bytes, all together.
    pub bytes: u64,
    /// The patches that allocated them, each once, in name order.
    pub owners: Vec<String>,
    /// The state they are tied to, by a loaded patch's `LPVMM_SHADOW`.
    pub state: Option<u64>,
}

fn guest_err(e: introspection::memory::MemError) -> KpError {
    KpError::guest("reading the shadow-variable table", e)
}

impl ShadowTable {
    /// Read the table at `table` (the guest should be paused: patches change it).
    pub fn read(mem: &KernelMemory, table: u64) -> Result<ShadowTable, KpError> {
        let magic = mem.u64(table).map_err(guest_err)?;
        if magic == 0 {
            return Ok(ShadowTable::default());
        }
        if magic != MAGIC {
            return Err(KpError::State(format!(
                "the shadow-variable table at {table:#x} is not one lpvmm knows (magic \
                 {magic:#x})"
            )));
        }
        let count = mem.u64(table + TABLE_COUNT).map_err(guest_err)?;
        let mut vars = Vec::new();
        for b in 0..BUCKETS {
            let mut at = mem.u64(table + TABLE_BUCKETS + 8 * b).map_err(guest_err)?;
            while at != 0 {
                if vars.len() == MAX_VARS {
                    return Err(KpError::State(format!(
                        "the shadow-variable table has more than {MAX_VARS} variables, or a \
                         loop; not read"
                    )));
                }
                vars.push(read_var(mem, at)?);
                at = mem.u64(at + VAR_NEXT).map_err(guest_err)?;
            }
        }
        Ok(ShadowTable { count, vars })
    }

    /// Per id: how many, their bytes, who allocated them; `ties` gives each id's state.
    pub fn groups(&self, ties: &[crate::load::manifest::ShadowTie]) -> Vec<ShadowGroup> {
        let mut by_id: BTreeMap<u64, ShadowGroup> = BTreeMap::new();
        for v in &self.vars {
            let g = by_id.entry(v.id).or_insert_with(|| ShadowGroup {
                id: v.id,
                count: 0,
                bytes: 0,
                owners: Vec::new(),
                state: ties.iter().find(|t| t.id == v.id).map(|t| t.state),
            });
            g.count += 1;
            g.bytes += v.size;
            if !g.owners.contains(&v.owner) {
                g.owners.push(v.owner.clone());
                g.owners.sort();
            }
        }
        by_id.into_values().collect()
    }
}

fn read_var(mem: &KernelMemory, at: u64) -> Result<ShadowVar, KpError> {
    let mut owner = [0u8; OWNER_BYTES];
    mem.read(at + VAR_OWNER, &mut owner).map_err(guest_err)?;
    let len = owner.iter().position(|&b| b == 0).unwrap_or(OWNER_BYTES);
    Ok(ShadowVar {
        obj: mem.u64(at + VAR_OBJ).map_err(guest_err)?,
        id: mem.u64(at + VAR_ID).map_err(guest_err)?,
        size: mem.u64(at + VAR_SIZE).map_err(guest_err)?,
        owner: String::from_utf8_lossy(&owner[..len]).into_owned(),
    })
}
