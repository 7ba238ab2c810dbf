//! Where a new worker goes: [`Registry::place`].

use super::{HiveEntry, Placed, Registry, SpawnDefaults};
use crate::hive::capabilities::{Capabilities, GpuReport};
use crate::hive::store::{Entry, ModelId};
use crate::hive::workers::SpawnRequest;
use crate::queen::protocol::{Placement, QueenError, QueenErrorKind};
use crate::size::Size;

impl Registry {
    /// Where a worker for `placement` goes: an explicit hive and device are honoured or
    /// refused with the reason; otherwise among connected hives that have the model ready
    /// and room for it, the one with the fewest workers of that model, then the fewest
    /// workers, then the most free memory.
    pub fn place(
        &self,
        placement: &Placement,
        defaults: &SpawnDefaults,
    ) -> Result<Placed, QueenError> {
        let refuse = |message: String| Err(QueenError::new(QueenErrorKind::NoPlacement, message));
        let model = &placement.model;
        let slots = placement.slots.unwrap_or(defaults.slots).max(1);
        let mut reasons = Vec::new();
        // (workers of the model, all workers, most free memory first): lowest wins.
        type Score = (usize, usize, std::cmp::Reverse<u64>);
        let mut best: Option<(String, Score)> = None;
        for (id, hive) in self.hives.iter().filter(|(_, h)| h.lost.is_none()) {
            if placement.hive.as_ref().is_some_and(|wanted| wanted != id) {
                continue;
            }
            match self.fits(id, hive, model, slots, placement.device.as_deref()) {
                Ok(free) => {
                    let of_model = self
                        .workers
                        .iter()
                        .filter(|(k, w)| &k.hive == id && &w.info.model == model)
                        .count();
                    let all = self.workers.keys().filter(|k| &k.hive == id).count();
                    let score = (of_model, all, std::cmp::Reverse(free));
                    if best.as_ref().is_none_or(|(_, s)| score < *s) {
                        best = Some((id.clone(), score));
                    }
                }
                Err(reason) => reasons.push(format!("{id}: {reason}")),
            }
        }
        let Some((hive, _)) = best else {
            if let Some(wanted) = &placement.hive
                && reasons.is_empty()
            {
                return refuse(format!("no connected hive {wanted}"));
            }
            if reasons.is_empty() {
                return refuse(format!("no hive is connected to run {model}"));
            }
            return refuse(format!("no hive can run {model}: {}", reasons.join("; ")));
        };
        let link = self.hives[&hive].link.clone();
        Ok(Placed {
            hive,
            link,
            spawn: SpawnRequest {
                model: model.clone(),
                slots,
                idle_timeout: defaults.idle_timeout,
                mode: placement.mode.unwrap_or(defaults.mode),
            },
        })
    }

    /// Free memory left on `hive` for `model`, or why it does not fit there.
    fn fits(
        &self,
        id: &str,
        hive: &HiveEntry,
        model: &ModelId,
        slots: usize,
        device: Option<&str>,
    ) -> Result<u64, String> {
        let manifest = hive
            .models
            .iter()
            .find_map(|e| match e {
                Entry::Ready(m) if &m.id == model => Some(m),
                _ => None,
            })
            .ok_or_else(|| format!("{model} is not in its store"))?;
        let free = match device {
            None | Some("cpu") => {
                let reserved: u64 = self
                    .workers
                    .iter()
                    .filter(|(k, _)| k.hive == id)
                    .map(|(_, w)| w.info.memory_bytes)
                    .sum();
                hive.capabilities.ram_available.saturating_sub(reserved)
            }
            Some(gpu) => return Err(gpu_refusal(&hive.capabilities, gpu)),
        };
        let needed = manifest.worker_memory(slots);
        if needed > free {
            return Err(format!(
                "{model} needs {} with {slots} slots, {} are free",
                Size(needed),
                Size(free)
            ));
        }
        Ok(free)
    }
}

/// Why a GPU device cannot be used on a hive (this build runs workers on the CPU only).
fn gpu_refusal(capabilities: &Capabilities, device: &str) -> String {
    let index = device
        .strip_prefix("cuda:")
        .and_then(|n| n.parse::<u32>().ok());
    let Some(index) = index else {
        return format!("unknown device {device:?}: use cpu or cuda:N");
    };
    match &capabilities.gpu {
        GpuReport::CpuOnly { reason } => format!("it has no usable GPU ({reason})"),
        GpuReport::Nvidia { gpus, .. } if !gpus.iter().any(|g| g.index == index) => {
            format!("it has no GPU cuda:{index}")
        }
        GpuReport::Nvidia { .. } if !capabilities.backends.iter().any(|b| b == "cuda") => {
            "its rbee was built without the cuda backend".into()
        }
        GpuReport::Nvidia { .. } => format!("workers on cuda:{index} are not supported yet"),
    }
}
