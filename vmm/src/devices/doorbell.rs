//! The doorbell of lpvmm's module notifier in the guest (patcher::notifier): an I/O
//! port that the notifier's stub writes when the guest loads or unloads a module.
//!
//! The write is a `KVM_EXIT_IO` on the vCPU thread of the loading task. That thread
//! never waits for the patch engine (which may be busy, and needs every vCPU parked to
//! write): it files the ring and answers "ring again" at once, the stub sleeps 10 ms
//! and rings again, and the patch driver thread handles the ring in a pause of its own
//! and leaves the answer here for the next ring to take. A write to the port that does
//! not carry the VM's token is not lpvmm's stub and is ignored.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use patcher::notifier::{Answer, Ring};

/// The port the stub writes (4 bytes, `out %eax,(%dx)`): unused by the VM's devices.
pub const PORT: u16 = 0x0ec0;
/// Rings waiting for the engine, and answers waiting to be taken; past that a ring is
/// dropped (it is rung again) and the oldest answer forgotten (its ring, if it ever
/// comes, is filed anew): a hostile guest cannot grow either.
const MAX_QUEUED: usize = 256;

/// Rings filed by vCPU threads and the engine's answers to them.
pub struct Doorbell {
    token: u64,
    state: Mutex<State>,
    /// Wakes the patch driver when a ring is filed.
    waker: OnceLock<Arc<Condvar>>,
}

#[derive(Default)]
struct State {
    queued: VecDeque<Ring>,
    /// Answers not yet taken, by (module, event), and their keys oldest first.
    answers: HashMap<(u64, u64), Answer>,
    answered: VecDeque<(u64, u64)>,
}

impl Default for Doorbell {
    fn default() -> Self {
        Self::new()
    }
}

impl Doorbell {
    /// A doorbell with a token of its own: 64 bits from the OS's random source (the
    /// seed of the standard library's hash maps).
    pub fn new() -> Self {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x6c70_766d_6d00_0000);
        Doorbell {
            token: h.finish() | 1,
            state: Mutex::new(State::default()),
            waker: OnceLock::new(),
        }
    }

    pub fn token(&self) -> u64 {
        self.token
    }

    /// Wake `waker` when a ring is filed (the patch driver's condition variable).
    pub fn set_waker(&self, waker: Arc<Condvar>) {
        let _ = self.waker.set(waker);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A vCPU rang: the engine's answer if it has one, else "ring again" (the ring
    /// filed once). `None` for a write without the VM's token.
    pub fn ring(&self, ring: Ring) -> Option<Answer> {
        if ring.token != self.token {
            return None;
        }
        let key = (ring.module, ring.action);
        let mut s = self.state();
        // An answer is for a ring without a result: one with a result is news for the
        // engine, whatever it answered before.
        if ring.result.is_none() {
            if let Some(a) = s.answers.remove(&key) {
                s.answered.retain(|k| *k != key);
                return Some(a);
            }
        }
        // A ring that brings a callback's result replaces one of the same event still
        // queued: the result must reach the engine.
        match s.queued.iter().position(|r| (r.module, r.action) == key) {
            Some(i) if ring.result.is_some() => s.queued[i] = ring,
            Some(_) => {}
            None if s.queued.len() < MAX_QUEUED => s.queued.push_back(ring),
            None => {}
        }
        drop(s);
        // At every ring, not only the first: the driver may have looked just before the
        // ring was filed and gone to sleep; the next ring, 10 ms later, wakes it.
        if let Some(w) = self.waker.get() {
            w.notify_all();
        }
        Some(Answer::RETRY)
    }

    /// The rings waiting for the engine.
    pub fn take(&self) -> Vec<Ring> {
        self.state().queued.drain(..).collect()
    }

    /// The engine's answer to `ring`, for its next ring (a plain "ring again" answer
    /// files nothing: the next ring is filed anew; "call this, then ring again" is kept).
    pub fn answer(&self, ring: Ring, answer: Answer) {
        if answer == Answer::RETRY {
            return;
        }
        let key = (ring.module, ring.action);
        let mut s = self.state();
        if s.answers.insert(key, answer).is_none() {
            s.answered.push_back(key);
        }
        while s.answered.len() > MAX_QUEUED {
            if let Some(old) = s.answered.pop_front() {
                s.answers.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_is_filed_once_answered_once_and_a_stranger_is_ignored() {
        let d = Doorbell::new();
        let ring = Ring {
            rip: 0xffff_ffff_a000_0040,
            token: d.token(),
            module: 0xffff_ffff_c000_1000,
            action: 1,
            result: None,
        };
        assert_eq!(d.ring(Ring { token: 7, ..ring }), None);
        assert_eq!(d.ring(ring), Some(Answer::RETRY));
        assert_eq!(d.ring(ring), Some(Answer::RETRY));
        assert_eq!(d.take(), [ring], "filed once");
        assert!(d.take().is_empty());
        let done = Answer::DONE;
        d.answer(ring, done);
        assert_eq!(d.ring(ring), Some(done));
        assert_eq!(d.ring(ring), Some(Answer::RETRY), "an answer is taken once");
        assert_ne!(Doorbell::new().token(), d.token());
        // A callback's result reaches the engine even past a queued ring, and is never
        // answered with an answer meant for the ring before it.
        d.ring(ring);
        d.answer(ring, Answer::call(0x1000, 7));
        let with = Ring {
            result: Some(-19),
            ..ring
        };
        assert_eq!(d.ring(with), Some(Answer::RETRY));
        assert_eq!(
            d.take(),
            [ring, with]
                .iter()
                .filter(|r| r.result.is_some())
                .copied()
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_guest_cannot_grow_the_queue_or_the_answers() {
        let d = Doorbell::new();
        let ring = |module: u64| Ring {
            rip: 0,
            token: d.token(),
            module,
            action: 1,
            result: None,
        };
        for m in 0..1000 {
            d.ring(ring(m));
        }
        let filed = d.take();
        assert_eq!(filed.len(), MAX_QUEUED);
        for r in &filed {
            d.answer(*r, Answer::DONE);
        }
        for m in 1000..2000 {
            d.answer(ring(m), Answer::DONE);
        }
        let s = d.state();
        assert!(s.answers.len() <= MAX_QUEUED && s.answered.len() == s.answers.len());
    }
}
