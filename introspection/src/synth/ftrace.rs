//! The guest's ftrace in a synthetic kernel: one `dyn_ftrace` record per fentry site
//! in two sorted pages, `ftrace_ops_list` ending at `ftrace_list_end`, `ftrace_lock`,
//! and what a guest does with them (turn a tracer on or off, hold the lock), laid out
//! as the BTF of [`super::kernel`] says.

use std::collections::HashMap;

use super::SynthGuest;
use crate::guest::GuestRam;

/// Struct sizes and offsets of the synthetic BTF (see `build_btf`).
pub(crate) const RECORD: u64 = 16;
pub(crate) const PAGE: u64 = 24;
const OPS: u64 = 64;
const OPS_NEXT: u64 = 8;
const OPS_FLAGS: u64 = 16;
const OPS_FUNC_HASH: u64 = 32;
const HASH: u64 = 40;
const ENTRY: u64 = 32;
const BUCKETS: u64 = 4;
pub(crate) const MUTEX: u64 = 32;
const OPS_FL_ENABLED: u64 = 1;
pub(crate) const FL_DISABLED: u64 = 1 << 25;

/// `FTRACE_FL_*` as each series defines them (the lowest bounds the reference count).
pub(crate) fn record_flags(v6_12: bool) -> Vec<(&'static str, u64)> {
    let mut f = vec![
        ("FTRACE_FL_ENABLED", 1 << 31),
        ("FTRACE_FL_REGS", 1 << 30),
        ("FTRACE_FL_REGS_EN", 1 << 29),
        ("FTRACE_FL_TRAMP", 1 << 28),
        ("FTRACE_FL_TRAMP_EN", 1 << 27),
        ("FTRACE_FL_IPMODIFY", 1 << 26),
        ("FTRACE_FL_DISABLED", FL_DISABLED),
        ("FTRACE_FL_DIRECT", 1 << 24),
        ("FTRACE_FL_DIRECT_EN", 1 << 23),
    ];
    if v6_12 {
        f.extend([
            ("FTRACE_FL_CALL_OPS", 1 << 22),
            ("FTRACE_FL_CALL_OPS_EN", 1 << 21),
            ("FTRACE_FL_TOUCHED", 1 << 20),
            ("FTRACE_FL_MODIFIED", 1 << 19),
        ]);
    }
    f
}

/// A synthetic guest's ftrace state, and the guest-side actions on it.
#[derive(Clone, Debug)]
pub struct SynthFtrace {
    /// The VA of each record's `flags`, by site.
    pub records: HashMap<u64, u64>,
    pub(crate) ops_list: u64,
    pub(crate) lock: u64,
    /// Free image space for ops and hashes: next VA, end.
    pub(crate) spare: (u64, u64),
    /// Image VA minus PA.
    pub(crate) va_minus_pa: u64,
    /// What each enabled ops added covers: (filter, notrace).
    pub(crate) covers: HashMap<u64, (Vec<u64>, Vec<u64>)>,
}

impl SynthFtrace {
    fn pa(&self, va: u64) -> u64 {
        va - self.va_minus_pa
    }

    fn w64(&self, g: &mut SynthGuest, va: u64, v: u64) {
        g.write_phys_raw(self.pa(va), &v.to_le_bytes());
    }

    fn r64(&self, g: &SynthGuest, va: u64) -> u64 {
        let mut b = [0u8; 8];
        g.read_phys(self.pa(va), &mut b).expect("image memory");
        u64::from_le_bytes(b)
    }

    fn alloc(&mut self, size: u64) -> u64 {
        let at = self.spare.0;
        self.spare.0 += size.next_multiple_of(8);
        assert!(self.spare.0 <= self.spare.1, "synthetic ftrace space full");
        at
    }

    /// The `flags` of the record of the site at `ip`.
    pub fn flags(&self, g: &SynthGuest, ip: u64) -> u64 {
        self.r64(g, self.records[&ip])
    }

    pub fn set_flags(&self, g: &mut SynthGuest, ip: u64, flags: u64) {
        self.w64(g, self.records[&ip], flags)
    }

    /// `ftrace_lock.owner` (0: free).
    pub fn set_lock_owner(&self, g: &mut SynthGuest, owner: u64) {
        self.w64(g, self.lock, owner)
    }

    /// Put an enabled ops at the head of `ftrace_ops_list`, with a filter hash of
    /// `filter` (empty: every function) and a notrace hash of `notrace`, and count it in
    /// the records it covers that ftrace may touch, as `ftrace_startup` does.
    pub fn add_ops(&mut self, g: &mut SynthGuest, filter: &[u64], notrace: &[u64]) -> u64 {
        let ops = self.alloc(OPS);
        let hashes = self.alloc(24);
        let filter_hash = self.hash(g, filter);
        let notrace_hash = self.hash(g, notrace);
        self.w64(g, hashes, notrace_hash);
        self.w64(g, hashes + 8, filter_hash);
        self.w64(g, ops, 0xffff_ffff_8100_0000); // func: any address
        self.w64(g, ops + OPS_NEXT, self.r64(g, self.ops_list));
        self.w64(g, ops + OPS_FLAGS, OPS_FL_ENABLED);
        self.w64(g, ops + OPS_FUNC_HASH, hashes);
        self.w64(g, self.ops_list, ops);
        self.count(g, filter, notrace, 1);
        self.covers.insert(ops, (filter.to_vec(), notrace.to_vec()));
        ops
    }

    /// Turn an ops off and uncount it, as `ftrace_shutdown` does (it stays on the list
    /// until it is freed).
    pub fn disable_ops(&mut self, g: &mut SynthGuest, ops: u64) {
        self.w64(g, ops + OPS_FLAGS, 0);
        let (filter, notrace) = self.covers.remove(&ops).expect("an enabled ops");
        self.count(g, &filter, &notrace, u64::MAX);
    }

    /// Add `delta` (wrapping: -1 is u64::MAX) to the count of every record the hashes
    /// cover, skipping disabled records, as `__ftrace_hash_rec_update` does.
    fn count(&self, g: &mut SynthGuest, filter: &[u64], notrace: &[u64], delta: u64) {
        for (&ip, &flags_va) in &self.records {
            let covered = (filter.is_empty() || filter.contains(&ip)) && !notrace.contains(&ip);
            let flags = self.r64(g, flags_va);
            if covered && flags & FL_DISABLED == 0 {
                self.w64(g, flags_va, flags.wrapping_add(delta));
            }
        }
    }

    fn hash(&mut self, g: &mut SynthGuest, ips: &[u64]) -> u64 {
        let hash = self.alloc(HASH);
        let buckets = self.alloc(8 * BUCKETS);
        for b in 0..BUCKETS {
            self.w64(g, buckets + 8 * b, 0);
        }
        for &ip in ips {
            let e = self.alloc(ENTRY);
            let head = buckets + 8 * (ip % BUCKETS);
            self.w64(g, e, self.r64(g, head)); // hlist.next
            self.w64(g, e + 16, ip);
            self.w64(g, head, e);
        }
        self.w64(g, hash, BUCKETS.trailing_zeros().into());
        self.w64(g, hash + 8, buckets);
        self.w64(g, hash + 16, ips.len() as u64);
        hash
    }
}
