//! When to try a blocked transition again, and when to give up: the immediate
//! consistency model's retry policy, kept apart from the clock and the pausing, which the
//! VMM owns.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::{Blocker, Op};

/// First retry after this, doubling up to `MAX_BACKOFF`.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(10);
pub const MAX_BACKOFF: Duration = Duration::from_millis(1000);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Still trying.
    Pending,
    /// Every site flipped in this attempt.
    Done,
    /// Gave up: the guest is as it was before the transition.
    TimedOut,
    /// Could not be attempted (the patch or guest changed underneath).
    Failed(String),
}

/// Wait after the `attempts`-th blocked attempt: doubling from FIRST_BACKOFF.
fn backoff_after(attempts: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << (attempts.clamp(1, 16) - 1))
        .min(MAX_BACKOFF)
}

/// One patch going from one state to the other.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Transition {
    pub patch: String,
    pub op: Op,
    pub timeout_ms: u64,
    /// Time since the transition started, at the last attempt.
    pub elapsed_ms: u64,
    pub attempts: u32,
    pub backoff_ms: u64,
    pub outcome: Outcome,
    /// Tasks that blocked the last attempt.
    pub blockers: Vec<Blocker>,
    /// Tasks looked at in the last attempt.
    pub tasks: usize,
    /// Guest-visible pause of each attempt, µs.
    pub pauses_us: Vec<u64>,
}

impl Transition {
    pub fn new(patch: &str, op: Op, timeout: Duration) -> Self {
        Transition {
            patch: patch.to_string(),
            op,
            timeout_ms: timeout.as_millis() as u64,
            elapsed_ms: 0,
            attempts: 0,
            backoff_ms: 0,
            outcome: Outcome::Pending,
            blockers: Vec::new(),
            tasks: 0,
            pauses_us: Vec::new(),
        }
    }

    /// Record an attempt made `elapsed` after the start; returns how long to wait before
    /// the next one (`None` once the transition has ended).
    pub fn record(
        &mut self,
        elapsed: Duration,
        pause: Duration,
        tasks: usize,
        blockers: Vec<Blocker>,
    ) -> Option<Duration> {
        self.attempts += 1;
        self.elapsed_ms = elapsed.as_millis() as u64;
        self.pauses_us.push(pause.as_micros() as u64);
        self.tasks = tasks;
        if blockers.is_empty() {
            self.blockers.clear();
            self.outcome = Outcome::Done;
            return None;
        }
        self.blockers = blockers;
        let backoff = backoff_after(self.attempts);
        if elapsed + backoff > Duration::from_millis(self.timeout_ms) {
            self.outcome = Outcome::TimedOut;
            return None;
        }
        self.backoff_ms = backoff.as_millis() as u64;
        Some(backoff)
    }

    /// Whether an attempt made `elapsed` after the start would be the last if blocked
    /// (so that it can clean up in the same pause).
    pub fn last_chance(&self, elapsed: Duration) -> bool {
        elapsed + backoff_after(self.attempts + 1) > Duration::from_millis(self.timeout_ms)
    }

    pub fn finished(&self) -> bool {
        self.outcome != Outcome::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use introspection::stack::{StackTrace, TraceStart};

    fn blocker() -> Blocker {
        Blocker {
            pid: 7,
            comm: "cat".into(),
            reason: "f is on its stack".into(),
            trace: StackTrace {
                pid: 7,
                tgid: 7,
                comm: "cat".into(),
                state: 'S',
                task: 0,
                start: TraceStart::Saved,
                frames: vec![],
                reliable: true,
                problem: None,
            },
        }
    }

    #[test]
    fn backs_off_doubling_and_times_out() {
        let mut t = Transition::new("p", Op::Enable, Duration::from_millis(100));
        let ms = Duration::from_millis;
        assert!(!t.last_chance(ms(0)));
        assert_eq!(t.record(ms(0), ms(1), 5, vec![blocker()]), Some(ms(10)));
        assert_eq!(t.record(ms(10), ms(1), 5, vec![blocker()]), Some(ms(20)));
        assert_eq!(t.record(ms(30), ms(1), 5, vec![blocker()]), Some(ms(40)));
        assert!(t.last_chance(ms(70)));
        assert_eq!(t.record(ms(70), ms(1), 5, vec![blocker()]), None);
        assert_eq!(t.outcome, Outcome::TimedOut);
        assert_eq!(t.blockers.len(), 1);
        let mut ok = Transition::new("p", Op::Disable, ms(100));
        assert_eq!(ok.record(ms(0), ms(1), 5, vec![]), None);
        assert_eq!(ok.outcome, Outcome::Done);
        assert_eq!(ok.pauses_us, [1000]);
    }
}
