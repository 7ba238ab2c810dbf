//! The queen's registry: hives and workers as their links and reports say they are, plus
//! the two choices made from it — where a new worker goes ([`Registry::place`]) and which
//! worker takes a request ([`Registry::pick`]).
//!
//! Plain state, no I/O: the queen actor owns one and feeds it what its links deliver.
//! A worker *incarnation* is one run of it (its pid, or its restart count for in-process
//! workers); when a hive reports another incarnation under the same id, the old one is
//! over and everything that used it is told through its `gone` signal.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

use rbee_transport::Link;
use tokio::sync::watch;

use super::affinity::Affinity;
use super::protocol::{
    HiveReport, HiveState, HiveView, QueenError, QueenErrorKind, QueenProtocol, WorkerView,
};
use crate::hive::capabilities::Capabilities;
use crate::hive::store::{Entry, Manifest, ModelId};
use crate::hive::workers::{IdleTimeout, SpawnRequest, WorkerInfo, WorkerMode, WorkerState};
use crate::worker::actor::Phase;
use crate::worker::remote::RemoteWorker;

/// Requests more than the least busy worker's that a worker may have and still be
/// preferred for holding a request's prompt prefix (a cache hit saves a prefill; a pile-up
/// on one worker costs every stream there).
pub const AFFINITY_SLACK: usize = 2;

/// A worker's cluster-wide name: its hive and the hive's id for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerKey {
    /// The hive's node id.
    pub hive: String,
    /// The hive's id for the worker.
    pub worker: String,
}

impl fmt::Display for WorkerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hive, self.worker)
    }
}

impl WorkerKey {
    /// Reads `<hive>/<worker>`.
    pub fn parse(key: &str) -> Option<Self> {
        let (hive, worker) = key.split_once('/')?;
        Some(WorkerKey {
            hive: hive.to_string(),
            worker: worker.to_string(),
        })
    }

    /// The node id the queen issues the worker's certificate under.
    pub fn node_id(&self) -> String {
        format!("{}.{}", self.hive, self.worker)
    }
}

/// One run of a worker: a process id, or the restart count of an in-process worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incarnation {
    pid: Option<u32>,
    restarts: u32,
}

impl Incarnation {
    fn of(info: &WorkerInfo) -> Self {
        Incarnation {
            pid: info.pid,
            restarts: info.restarts,
        }
    }
}

/// How inference reaches a worker.
#[derive(Clone)]
pub enum Route {
    /// A link from the queen to the worker process.
    Direct(RemoteWorker),
    /// An in-process worker: streams go to its hive's process on the hive's link.
    Hive(Link<QueenProtocol>),
}

struct WorkerEntry {
    info: WorkerInfo,
    /// When `info` was reported (its uptime is as of then).
    reported: std::time::Instant,
    incarnation: Incarnation,
    route: Option<Route>,
    in_flight: usize,
    /// When a request was last routed to it or ended there (or it was listed).
    last_active: Instant,
    /// Set to true when this incarnation ends; leases watch it.
    gone: watch::Sender<bool>,
    /// Prompts it was given, for prefix-aware routing.
    affinity: Affinity,
}

impl WorkerEntry {
    fn new(info: WorkerInfo, hive_link: &Link<QueenProtocol>) -> Self {
        let route = match info.mode {
            WorkerMode::InProcess => Some(Route::Hive(hive_link.clone())),
            WorkerMode::Process => None,
        };
        WorkerEntry {
            incarnation: Incarnation::of(&info),
            reported: std::time::Instant::now(),
            info,
            route,
            in_flight: 0,
            last_active: Instant::now(),
            gone: watch::channel(false).0,
            affinity: Affinity::default(),
        }
    }

    /// Loaded, taking requests, and reachable.
    fn routable(&self) -> bool {
        self.route.is_some() && self.ready()
    }

    fn ready(&self) -> bool {
        matches!(&self.info.state, WorkerState::Running(s) if matches!(s.phase, Phase::Ready | Phase::Busy))
    }

    fn slots(&self) -> usize {
        match &self.info.state {
            WorkerState::Running(s) => s.slots.max(1),
            _ => 0,
        }
    }

    /// Capacity that is on its way: starting, loading, restarting, or not dialed yet.
    fn coming(&self) -> bool {
        match &self.info.state {
            WorkerState::Failed => false,
            WorkerState::Restarting => true,
            WorkerState::Running(s) => {
                matches!(s.phase, Phase::Loading(_)) || (self.ready() && self.route.is_none())
            }
        }
    }

    fn end(&self) {
        self.gone.send_replace(true);
    }
}

struct HiveEntry {
    link: Link<QueenProtocol>,
    /// Which link (a reconnected hive gets a new one; a late loss of the old is ignored).
    link_id: u64,
    capabilities: Capabilities,
    models: Vec<Entry>,
    lost: Option<(String, Instant)>,
    /// The read of its workers the registry last took from its reports.
    workers_read_at: u64,
}

/// A worker the queen should dial: a process worker that runs and has no link yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dial {
    /// The worker.
    pub key: WorkerKey,
    /// Which run of it.
    pub incarnation: Incarnation,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// What [`Registry::acquire`] hands out for one request.
pub struct Acquired {
    /// How to reach the worker.
    pub route: Route,
    /// Which run of it (releases and losses name it).
    pub incarnation: Incarnation,
    /// Becomes true when that run ends.
    pub gone: watch::Receiver<bool>,
}

/// Defaults the queen fills into a placement.
#[derive(Debug, Clone)]
pub struct SpawnDefaults {
    /// Slots of a worker started for a placement without them.
    pub slots: usize,
    /// Mode of a worker started for a placement without one.
    pub mode: WorkerMode,
    /// Idle timeout of workers the queen starts.
    pub idle_timeout: IdleTimeout,
}

/// Where a new worker goes and how the hive is to start it.
pub struct Placed {
    /// The hive.
    pub hive: String,
    /// Its link.
    pub link: Link<QueenProtocol>,
    /// What to ask it.
    pub spawn: SpawnRequest,
}

/// Hives and workers.
#[derive(Default)]
pub struct Registry {
    hives: BTreeMap<String, HiveEntry>,
    workers: BTreeMap<WorkerKey, WorkerEntry>,
}

impl Registry {
    /// A hive connected (or reconnected) with its report; returns the workers to dial.
    pub fn hive_up(
        &mut self,
        id: &str,
        link: Link<QueenProtocol>,
        link_id: u64,
        report: HiveReport,
    ) -> Vec<Dial> {
        let entry = HiveEntry {
            link,
            link_id,
            capabilities: report.capabilities,
            models: report.models,
            lost: None,
            workers_read_at: 0,
        };
        self.hives.insert(id.to_string(), entry);
        self.hive_workers(id, report.read_at, report.workers)
    }

    /// A hive's store changed.
    pub fn hive_models(&mut self, id: &str, models: Vec<Entry>) {
        if let Some(hive) = self.hives.get_mut(id) {
            hive.models = models;
        }
    }

    /// A hive finished pulling `manifest`: in its list until its next store report (which
    /// holds it too).
    pub fn hive_model_ready(&mut self, id: &str, manifest: Manifest) {
        if let Some(hive) = self.hives.get_mut(id) {
            hive.models.retain(|m| *m.id() != manifest.id);
            hive.models.push(Entry::Ready(manifest));
        }
    }

    /// A hive's capabilities were read again.
    pub fn hive_capabilities(&mut self, id: &str, capabilities: Capabilities) {
        if let Some(hive) = self.hives.get_mut(id) {
            hive.capabilities = capabilities;
        }
    }

    /// A hive reported its workers as of its read `read_at`: the registry now holds exactly
    /// these for it. Ended incarnations are signalled; returns the process workers to dial.
    /// A report older than one already taken changes nothing.
    pub fn hive_workers(&mut self, id: &str, read_at: u64, reported: Vec<WorkerInfo>) -> Vec<Dial> {
        match self.hives.get_mut(id) {
            Some(hive) if read_at >= hive.workers_read_at => hive.workers_read_at = read_at,
            _ => return self.dials(),
        }
        let listed: std::collections::BTreeSet<String> =
            reported.iter().map(|w| w.id.clone()).collect();
        self.workers.retain(|key, worker| {
            let keep = key.hive != id || listed.contains(&key.worker);
            if !keep {
                worker.end();
            }
            keep
        });
        for info in reported {
            self.upsert_worker(id, info);
        }
        self.dials()
    }

    /// A hive answered a spawn with this worker; returns the workers to dial. Only a
    /// worker the hive has not reported yet is taken from it: the answer was read when the
    /// spawn began and may arrive after a newer report, which it must not overwrite (the
    /// worker ready) nor undo (the worker already stopped: it would be a ghost).
    pub fn worker_started(&mut self, id: &str, info: WorkerInfo) -> Vec<Dial> {
        let key = WorkerKey {
            hive: id.to_string(),
            worker: info.id.clone(),
        };
        let reported_since = self
            .hives
            .get(id)
            .is_some_and(|h| h.workers_read_at > info.read_at);
        if self.workers.contains_key(&key) || reported_since {
            return self.dials();
        }
        self.upsert_worker(id, info)
    }

    fn upsert_worker(&mut self, id: &str, info: WorkerInfo) -> Vec<Dial> {
        let Some(hive) = self.hives.get(id).filter(|h| h.lost.is_none()) else {
            return Vec::new();
        };
        let link = hive.link.clone();
        let key = WorkerKey {
            hive: id.to_string(),
            worker: info.id.clone(),
        };
        let incarnation = Incarnation::of(&info);
        match self.workers.get_mut(&key) {
            Some(entry) if entry.incarnation == incarnation => {
                entry.info = info;
                entry.reported = std::time::Instant::now();
                if entry.info.mode == WorkerMode::InProcess && !entry.incarnation_over() {
                    // Its route is its hive's link: the current one, even after a report
                    // that took the route away (only a dial restores a process worker's).
                    entry.route = Some(Route::Hive(link.clone()));
                }
                if !entry.ready() {
                    // The hive's idle clock runs only while the worker is ready.
                    entry.last_active = Instant::now();
                }
            }
            _ => {
                if let Some(old) = self
                    .workers
                    .insert(key.clone(), WorkerEntry::new(info, &link))
                {
                    old.end();
                }
            }
        }
        if let Some(entry) = self.workers.get_mut(&key)
            && entry.incarnation_over()
        {
            // A worker that is not running is not served, whatever link it had.
            entry.route = None;
            entry.end();
        }
        self.dials()
    }

    /// The dial `key` needs, if it is listed, runs and has no link.
    pub fn dials_for(&self, key: &WorkerKey) -> Vec<Dial> {
        self.dials().into_iter().filter(|d| &d.key == key).collect()
    }

    fn dials(&self) -> Vec<Dial> {
        self.workers
            .iter()
            .filter(|(_, w)| w.route.is_none() && !w.incarnation_over())
            .filter_map(|(key, w)| {
                Some(Dial {
                    key: key.clone(),
                    incarnation: w.incarnation,
                    addr: w.info.addr?,
                })
            })
            .collect()
    }

    /// The hive's link `link_id` was lost: the hive is marked lost and its workers leave
    /// the registry (they come back when the hive reconnects and reports them).
    pub fn hive_down(&mut self, id: &str, link_id: u64, cause: String) -> bool {
        let Some(hive) = self.hives.get_mut(id).filter(|h| h.link_id == link_id) else {
            return false;
        };
        hive.lost = Some((cause, Instant::now()));
        self.workers.retain(|key, worker| {
            let keep = key.hive != id;
            if !keep {
                worker.end();
            }
            keep
        });
        true
    }

    /// Forgets the hive `id` and its workers; returns its link to close.
    pub fn remove_hive(&mut self, id: &str) -> Option<Link<QueenProtocol>> {
        let hive = self.hives.remove(id)?;
        self.workers.retain(|key, worker| {
            let keep = key.hive != id;
            if !keep {
                worker.end();
            }
            keep
        });
        Some(hive.link)
    }

    /// The queen's link to a worker process is up; false when it is not needed (the
    /// worker left, or another dial of it won: two registry changes can each start one).
    pub fn worker_dialed(&mut self, dial: &Dial, remote: RemoteWorker) -> bool {
        match self.workers.get_mut(&dial.key) {
            Some(w)
                if w.incarnation == dial.incarnation
                    && !w.incarnation_over()
                    && w.route.is_none() =>
            {
                w.route = Some(Route::Direct(remote));
                true
            }
            _ => false,
        }
    }

    /// A worker was lost (its link closed, or a stream on it failed as lost): it takes no
    /// requests until its hive reports it again or it is dialed again. Returns where to
    /// dial it again, if it may still run.
    pub fn worker_lost(&mut self, key: &WorkerKey, incarnation: Incarnation) -> Option<Dial> {
        let w = self
            .workers
            .get_mut(key)
            .filter(|w| w.incarnation == incarnation)?;
        let had_route = w.route.take().is_some();
        w.end();
        // Later leases of a new link must not see this run's signal.
        w.gone = watch::channel(false).0;
        let addr = w
            .info
            .addr
            .filter(|_| had_route && w.info.mode == WorkerMode::Process)?;
        Some(Dial {
            key: key.clone(),
            incarnation,
            addr,
        })
    }

    /// The routable worker of `model` for a request whose prompt has the fingerprints
    /// `prints` ([`super::affinity`]), if any has a free slot: the one given the longest of
    /// those prefixes before (its prefix cache likely holds it), unless it has more than
    /// [`AFFINITY_SLACK`] requests more than the least busy; then the most free slots.
    pub fn pick(&self, model: &ModelId, prints: &[u64]) -> Option<WorkerKey> {
        let free = || {
            self.workers
                .iter()
                .filter(|(_, w)| &w.info.model == model && w.routable() && w.in_flight < w.slots())
        };
        let least = free().map(|(_, w)| w.in_flight).min()?;
        free()
            .max_by_key(|(key, w)| {
                let depth = if w.in_flight <= least + AFFINITY_SLACK {
                    w.affinity.depth(prints)
                } else {
                    0
                };
                (
                    depth,
                    w.slots() - w.in_flight,
                    std::cmp::Reverse(w.in_flight),
                    std::cmp::Reverse((*key).clone()),
                )
            })
            .map(|(key, _)| key.clone())
    }

    /// Takes a slot of `key` for one request whose prompt has the fingerprints `prints`.
    pub fn acquire(&mut self, key: &WorkerKey, prints: &[u64]) -> Option<Acquired> {
        let w = self.workers.get_mut(key).filter(|w| w.routable())?;
        w.in_flight += 1;
        w.affinity.record(prints);
        w.last_active = Instant::now();
        Some(Acquired {
            route: w.route.clone()?,
            incarnation: w.incarnation,
            gone: w.gone.subscribe(),
        })
    }

    /// Gives a slot back.
    pub fn release(&mut self, key: &WorkerKey, incarnation: Incarnation) {
        if let Some(w) = self
            .workers
            .get_mut(key)
            .filter(|w| w.incarnation == incarnation)
        {
            w.in_flight = w.in_flight.saturating_sub(1);
            w.last_active = Instant::now();
        }
    }

    /// Whether a worker of `model` is routable or on its way.
    pub fn has_capacity_for(&self, model: &ModelId) -> bool {
        self.workers
            .values()
            .any(|w| &w.info.model == model && (w.routable() || w.coming()))
    }

    /// Workers of `model` that are loading, with their progress.
    pub fn loading(&self, model: &ModelId) -> Vec<(WorkerKey, Phase)> {
        self.workers
            .iter()
            .filter(|(_, w)| &w.info.model == model)
            .filter_map(|(key, w)| match &w.info.state {
                WorkerState::Running(s) if matches!(s.phase, Phase::Loading(_)) => {
                    Some((key.clone(), s.phase))
                }
                _ => None,
            })
            .collect()
    }

    /// The link of a connected hive.
    pub fn hive_link(&self, id: &str) -> Result<Link<QueenProtocol>, QueenError> {
        self.hives
            .get(id)
            .filter(|h| h.lost.is_none())
            .map(|h| h.link.clone())
            .ok_or_else(|| {
                QueenError::new(QueenErrorKind::NoHive, format!("no connected hive {id}"))
            })
    }

    /// Every connected hive's id and link.
    pub fn connected_hives(&self) -> Vec<(String, Link<QueenProtocol>)> {
        self.hives
            .iter()
            .filter(|(_, h)| h.lost.is_none())
            .map(|(id, h)| (id.clone(), h.link.clone()))
            .collect()
    }

    /// The hives.
    pub fn hive_views(&self) -> Vec<HiveView> {
        self.hives
            .iter()
            .map(|(id, h)| HiveView {
                id: id.clone(),
                addr: h.link.remote_address(),
                state: match &h.lost {
                    None => HiveState::Connected,
                    Some((cause, at)) => HiveState::Lost {
                        cause: cause.clone(),
                        since_secs: at.elapsed().as_secs(),
                    },
                },
                capabilities: h.capabilities.clone(),
                models: h.models.clone(),
                workers: self.workers.keys().filter(|k| &k.hive == id).count(),
            })
            .collect()
    }

    /// The workers.
    pub fn worker_views(&self) -> Vec<WorkerView> {
        self.workers
            .iter()
            .map(|(key, w)| WorkerView {
                key: key.to_string(),
                hive: key.hive.clone(),
                info: WorkerInfo {
                    uptime_secs: w.info.uptime_secs + w.reported.elapsed().as_secs(),
                    ..w.info.clone()
                },
                in_flight: w.in_flight,
                idle_secs: (w.in_flight == 0).then(|| w.last_active.elapsed().as_secs()),
                routable: w.routable(),
                route: match w.info.mode {
                    WorkerMode::Process => "direct".into(),
                    WorkerMode::InProcess => "hive".into(),
                },
            })
            .collect()
    }
}

impl WorkerEntry {
    /// The reported state says this run is over (restarting or failed).
    fn incarnation_over(&self) -> bool {
        !matches!(self.info.state, WorkerState::Running(_))
    }
}

mod placement;

#[cfg(test)]
mod tests;
