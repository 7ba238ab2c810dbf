//! A spawn's preflight: a worker that would not fit in the memory the hive may give is
//! refused before anything starts.

use std::path::PathBuf;

use super::spec::{HiveError, SpawnRequest};
use crate::hive::store::ModelStore;

/// The model's path and the bytes its worker reserves ([`crate::hive::store::Manifest::worker_memory`]), or
/// why it cannot start: against `budget` less what running workers reserved (or, without
/// a budget, the machine's available memory).
pub(super) fn check(
    store: &ModelStore,
    request: &SpawnRequest,
    budget: Option<u64>,
    reserved: u64,
) -> Result<(PathBuf, u64), HiveError> {
    let manifest = store.get(&request.model)?;
    let path = store.model_path(&request.model)?;
    let slots = request.slots.max(1);
    let needed = manifest.worker_memory(slots);
    let available = match budget {
        Some(budget) => budget.saturating_sub(reserved),
        None => crate::hive::capabilities::probe_memory().map_or(0, |(_, available)| available),
    };
    if needed > available {
        return Err(HiveError::DoesNotFit {
            model: request.model.clone(),
            needed,
            available,
            context: manifest.summary.context_length,
            slots,
        });
    }
    Ok((path, needed))
}
