//! The restart strategy of rbee's supervisors: restart a child that exits, with
//! exponential backoff, until it exits more than `max_restarts` times within `period`;
//! then give up on it (or escalate), as its parent decides.
//!
//! ractor has no restart strategy of its own, and its default `handle_supervisor_evt` stops
//! the parent when any child exits. [`RestartIntensity`] is the bookkeeping a parent
//! embeds: the hive's worker manager (`hive::workers`) is the parent that restarts.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use rbee_transport::Backoff;

/// When a child is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Always, whether it failed or stopped.
    Permanent,
    /// Only when it failed (panicked, returned `Err`, or could not start).
    Transient,
    /// Never.
    Temporary,
}

/// How often children may be restarted before the supervisor gives up.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    /// Restarts of one child allowed within `period`; one more escalates.
    pub max_restarts: u32,
    /// The sliding window in which restarts are counted.
    pub period: Duration,
    /// Delay before the first restart; doubles with each restart within the period.
    pub initial_backoff: Duration,
    /// Longest delay before a restart.
    pub max_backoff: Duration,
}

impl Default for RestartPolicy {
    /// 5 restarts in 10 s, backoff from 100 ms to 5 s.
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 5,
            period: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// What to do about a child that exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start it again after this delay.
    Restart {
        /// The backoff delay.
        after: Duration,
    },
    /// Leave it stopped (its restart kind says so).
    Forget,
    /// Too many restarts within the period: the supervisor must fail.
    Escalate {
        /// Restarts counted within the period.
        restarts: u32,
    },
}

/// Restart bookkeeping per child name: a sliding window of restart times.
#[derive(Debug)]
pub struct RestartIntensity {
    policy: RestartPolicy,
    history: HashMap<String, VecDeque<Instant>>,
}

impl RestartIntensity {
    /// Bookkeeping under `policy`.
    pub fn new(policy: RestartPolicy) -> Self {
        RestartIntensity {
            policy,
            history: HashMap::new(),
        }
    }

    /// Decides about `child`, which exited at `now` (`failed` if it panicked, returned an
    /// error or could not start).
    pub fn on_exit(
        &mut self,
        child: &str,
        failed: bool,
        restart: Restart,
        now: Instant,
    ) -> Decision {
        let wanted = match restart {
            Restart::Permanent => true,
            Restart::Transient => failed,
            Restart::Temporary => false,
        };
        if !wanted {
            self.history.remove(child);
            return Decision::Forget;
        }
        let window = self.history.entry(child.to_string()).or_default();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.policy.period)
        {
            window.pop_front();
        }
        let restarts = window.len() as u32;
        if restarts >= self.policy.max_restarts {
            return Decision::Escalate { restarts };
        }
        window.push_back(now);
        let mut backoff = Backoff::new(self.policy.initial_backoff, self.policy.max_backoff);
        for _ in 0..restarts {
            backoff.next_delay();
        }
        Decision::Restart {
            after: backoff.next_delay(),
        }
    }

    /// Forgets `child` (it was stopped on purpose).
    pub fn forget(&mut self, child: &str) {
        self.history.remove(child);
    }
}

#[cfg(test)]
mod tests;
