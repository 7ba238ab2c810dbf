//! Generations running through the queen under an id their client gave, so that anyone
//! holding the id can cancel them (`rbee cancel ID`, `POST /v1/requests/{id}/cancel`).
//! Several may share an id (the choices of one HTTP request with `n` > 1): a cancel ends
//! them all. Bounded by the requests the queen admits: an entry lives as long as its
//! generation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Each id's running generations, by a number of their own.
type Running = HashMap<String, HashMap<u64, oneshot::Sender<()>>>;

/// The running generations by id.
#[derive(Default)]
pub struct InFlight {
    running: Mutex<Running>,
    next: AtomicU64,
}

/// A running generation's entry: removed when dropped (the generation ended).
pub struct Registered {
    id: String,
    number: u64,
    in_flight: Arc<InFlight>,
    cancelled: oneshot::Receiver<()>,
}

impl Registered {
    /// Completes when the generation is cancelled (never otherwise).
    pub async fn cancelled(&mut self) {
        if (&mut self.cancelled).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut running = self.in_flight.lock();
        if let Some(generations) = running.get_mut(&self.id) {
            generations.remove(&self.number);
            if generations.is_empty() {
                running.remove(&self.id);
            }
        }
    }
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a generation under `id`.
    pub fn register(self: &Arc<Self>, id: &str) -> Registered {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock()
            .entry(id.to_string())
            .or_default()
            .insert(number, tx);
        Registered {
            id: id.to_string(),
            number,
            in_flight: self.clone(),
            cancelled: rx,
        }
    }

    /// Cancels every running generation under `id`; false if none runs under it.
    pub fn cancel(&self, id: &str) -> bool {
        let generations = self.lock().remove(id).unwrap_or_default();
        let mut any = false;
        for (_, cancel) in generations {
            any |= cancel.send(()).is_ok();
        }
        any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cancel_ends_every_generation_of_its_id_and_entries_go_with_them() {
        let in_flight = Arc::new(InFlight::default());
        let mut first = in_flight.register("a");
        let mut second = in_flight.register("a");
        let other = in_flight.register("b");
        assert!(!in_flight.cancel("c"));
        assert!(in_flight.cancel("a"));
        first.cancelled().await;
        second.cancelled().await;
        assert!(!in_flight.cancel("a"), "cancelled already");
        drop((first, second));
        let again = in_flight.register("a");
        drop((again, other));
        assert!(in_flight.lock().is_empty());
    }
}
