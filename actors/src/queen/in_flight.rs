//! Generations running through the queen under an id their client gave, so that anyone
//! holding the id can cancel one (`rbee cancel ID`, `POST /v1/requests/{id}/cancel`).
//! Bounded by the requests the queen admits: an entry lives as long as its generation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// The running generations by id.
#[derive(Default)]
pub struct InFlight {
    running: Mutex<HashMap<String, oneshot::Sender<()>>>,
}

/// A running generation's entry: removed when dropped (the generation ended).
pub struct Registered {
    id: String,
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
        self.in_flight.lock().remove(&self.id);
    }
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<()>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the generation `id`; refuses an id that names a running one.
    pub fn register(self: &Arc<Self>, id: &str) -> Result<Registered, String> {
        let mut running = self.lock();
        if running.contains_key(id) {
            return Err(format!("a request with id {id:?} is running already"));
        }
        let (tx, rx) = oneshot::channel();
        running.insert(id.to_string(), tx);
        Ok(Registered {
            id: id.to_string(),
            in_flight: self.clone(),
            cancelled: rx,
        })
    }

    /// Cancels the running generation `id`; false if none runs under that id.
    pub fn cancel(&self, id: &str) -> bool {
        self.lock()
            .remove(id)
            .is_some_and(|cancel| cancel.send(()).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_id_is_cancelled_once_and_freed_when_its_generation_ends() {
        let in_flight = Arc::new(InFlight::default());
        let mut first = in_flight.register("a").unwrap();
        assert!(
            in_flight.register("a").is_err(),
            "an id runs once at a time"
        );
        assert!(!in_flight.cancel("b"));
        assert!(in_flight.cancel("a"));
        first.cancelled().await;
        assert!(!in_flight.cancel("a"), "cancelled already");
        drop(first);
        let again = in_flight.register("a").unwrap();
        drop(again);
        assert!(in_flight.lock().is_empty());
    }
}
