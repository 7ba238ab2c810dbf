//! Admission: one bounded queue per model of requests waiting for a worker slot.
//!
//! A request that finds no free slot waits here, in arrival order, up to the queue's
//! length and for at most the maximum wait; beyond either it is refused at once with an
//! `Overloaded` error whose retry-after hint comes from how long requests for the model
//! have recently taken. Plain state: the queen actor drives it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::hive::store::ModelId;

/// Limits of the queues.
#[derive(Debug, Clone, Copy)]
pub struct AdmissionLimits {
    /// Requests that may wait per model.
    pub max_queue: usize,
    /// Longest a request may wait.
    pub max_wait: Duration,
}

impl Default for AdmissionLimits {
    /// 64 waiting requests per model, 60 s at most.
    fn default() -> Self {
        AdmissionLimits {
            max_queue: 64,
            max_wait: Duration::from_secs(60),
        }
    }
}

/// A waiting request's ticket.
pub type Ticket = u64;

/// The queues.
pub struct Admission<W> {
    limits: AdmissionLimits,
    queues: HashMap<ModelId, VecDeque<(Ticket, W)>>,
    /// Recent request durations per model (exponentially weighted), for retry hints.
    service_time: HashMap<ModelId, Duration>,
    next_ticket: Ticket,
}

impl<W> Admission<W> {
    /// Empty queues with `limits`.
    pub fn new(limits: AdmissionLimits) -> Self {
        Admission {
            limits,
            queues: HashMap::new(),
            service_time: HashMap::new(),
            next_ticket: 1,
        }
    }

    /// The limits.
    pub fn limits(&self) -> AdmissionLimits {
        self.limits
    }

    /// Requests waiting for `model`.
    pub fn waiting(&self, model: &ModelId) -> usize {
        self.queues.get(model).map_or(0, VecDeque::len)
    }

    /// Requests waiting per model, for models with any.
    pub fn depths(&self) -> Vec<(ModelId, usize)> {
        self.queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(m, q)| (m.clone(), q.len()))
            .collect()
    }

    /// Queues `waiter` for `model`: its ticket and position (1 = next), or `Err` with a
    /// retry-after hint when the queue is full.
    pub fn enqueue(&mut self, model: &ModelId, waiter: W) -> Result<(Ticket, usize), Duration> {
        self.enqueue_with(model, |_| waiter)
    }

    /// [`Admission::enqueue`] of the waiter `make` builds from its ticket, only when there
    /// is room.
    pub fn enqueue_with(
        &mut self,
        model: &ModelId,
        make: impl FnOnce(Ticket) -> W,
    ) -> Result<(Ticket, usize), Duration> {
        let queue = self.queues.entry(model.clone()).or_default();
        if queue.len() >= self.limits.max_queue {
            return Err(self.retry_after(model));
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let queue = self.queues.entry(model.clone()).or_default();
        queue.push_back((ticket, make(ticket)));
        Ok((ticket, queue.len()))
    }

    /// The next waiter for `model`.
    pub fn pop(&mut self, model: &ModelId) -> Option<W> {
        let queue = self.queues.get_mut(model)?;
        let next = queue.pop_front().map(|(_, w)| w);
        if queue.is_empty() {
            self.queues.remove(model);
        }
        next
    }

    /// Takes the waiter with `ticket` out (its wait ran out, or it left).
    pub fn remove(&mut self, ticket: Ticket) -> Option<(ModelId, W)> {
        let (model, queue) = self
            .queues
            .iter_mut()
            .find(|(_, q)| q.iter().any(|(t, _)| *t == ticket))?;
        let model = model.clone();
        let index = queue.iter().position(|(t, _)| *t == ticket)?;
        let (_, waiter) = queue.remove(index)?;
        if queue.is_empty() {
            self.queues.remove(&model);
        }
        Some((model, waiter))
    }

    /// Takes every waiter for `model` out.
    pub fn drain(&mut self, model: &ModelId) -> Vec<W> {
        self.queues
            .remove(model)
            .map(|q| q.into_iter().map(|(_, w)| w).collect())
            .unwrap_or_default()
    }

    /// The waiters for `model` with their positions.
    pub fn positions(&self, model: &ModelId) -> impl Iterator<Item = (usize, &W)> {
        self.queues
            .get(model)
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, (_, w))| (i + 1, w))
    }

    /// Models with waiters.
    pub fn models(&self) -> Vec<ModelId> {
        self.queues.keys().cloned().collect()
    }

    /// Records that a request for `model` took from `started` until now.
    pub fn served(&mut self, model: &ModelId, started: Instant) {
        let took = started.elapsed();
        let average = self.service_time.entry(model.clone()).or_insert(took);
        *average = (*average * 7 + took) / 8;
    }

    /// How long a refused request should wait before trying again: the time the queue
    /// ahead of it needs at the recent pace, at least 100 ms and at most the maximum wait.
    pub fn retry_after(&self, model: &ModelId) -> Duration {
        let per_request = self
            .service_time
            .get(model)
            .copied()
            .unwrap_or(Duration::from_secs(1));
        let ahead = self.waiting(model).max(1) as u32;
        (per_request * ahead).clamp(Duration::from_millis(100), self.limits.max_wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelId {
        ModelId::new("m").unwrap()
    }

    #[test]
    fn a_full_queue_refuses_with_a_hint_and_order_is_kept() {
        let mut admission = Admission::new(AdmissionLimits {
            max_queue: 2,
            max_wait: Duration::from_secs(10),
        });
        let m = model();
        let (first, pos1) = admission.enqueue(&m, "a").unwrap();
        let (_, pos2) = admission.enqueue(&m, "b").unwrap();
        assert_eq!((pos1, pos2), (1, 2));
        let hint = admission.enqueue(&m, "c").unwrap_err();
        assert!(hint >= Duration::from_millis(100) && hint <= Duration::from_secs(10));
        assert_eq!(admission.remove(first).map(|(_, w)| w), Some("a"));
        let positions: Vec<_> = admission.positions(&m).map(|(p, w)| (p, *w)).collect();
        assert_eq!(positions, vec![(1, "b")]);
        assert_eq!(admission.pop(&m), Some("b"));
        assert_eq!(admission.pop(&m), None);
        assert_eq!(admission.waiting(&m), 0);
    }

    #[test]
    fn the_hint_follows_the_recent_pace() {
        let mut admission = Admission::<()>::new(AdmissionLimits::default());
        let m = model();
        let long_ago = Instant::now() - Duration::from_secs(4);
        for _ in 0..20 {
            admission.served(&m, long_ago);
        }
        let hint = admission.retry_after(&m);
        assert!(hint >= Duration::from_secs(3), "{hint:?}");
    }
}
