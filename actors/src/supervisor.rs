//! One-for-one supervision over ractor: restart a child that exits, with exponential backoff,
//! until it exits more than `max_restarts` times within `period`; then escalate by failing,
//! so the supervisor's own parent decides.
//!
//! ractor has no restart strategy of its own, and its default `handle_supervisor_evt` stops
//! the parent when any child exits. [`RestartIntensity`] is the bookkeeping any parent can
//! embed; [`Supervisor`] is a ready parent actor built on it for children described by
//! [`ChildSpec`]s.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use rbee_transport::Backoff;
use tokio::sync::mpsc;

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

/// Starts a child linked to the supervisor cell it is given, returning the child's cell.
pub type StartFn = Arc<
    dyn Fn(ActorCell) -> BoxFuture<'static, Result<ActorCell, ActorProcessingErr>> + Send + Sync,
>;

/// A child the [`Supervisor`] keeps running.
#[derive(Clone)]
pub struct ChildSpec {
    /// Unique among the supervisor's children.
    pub name: String,
    /// When to restart it.
    pub restart: Restart,
    /// How to start it (called again for each restart).
    pub start: StartFn,
}

impl fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildSpec")
            .field("name", &self.name)
            .field("restart", &self.restart)
            .finish_non_exhaustive()
    }
}

impl ChildSpec {
    /// A child started by `start`, an async function of the supervisor's cell.
    pub fn new<F>(name: impl Into<String>, restart: Restart, start: F) -> Self
    where
        F: Fn(ActorCell) -> BoxFuture<'static, Result<ActorCell, ActorProcessingErr>>
            + Send
            + Sync
            + 'static,
    {
        ChildSpec {
            name: name.into(),
            restart,
            start: Arc::new(start),
        }
    }

    /// A child that is an actor built afresh by `make` for each start.
    pub fn actor<A, F>(name: impl Into<String>, restart: Restart, make: F) -> Self
    where
        A: Actor,
        F: Fn() -> (A, A::Arguments) + Send + Sync + 'static,
    {
        let make = Arc::new(make);
        ChildSpec::new(name, restart, move |supervisor| {
            let make = make.clone();
            Box::pin(async move {
                let (actor, args) = make();
                let (child, _) = Actor::spawn_linked(None, actor, args, supervisor).await?;
                Ok(child.get_cell())
            })
        })
    }
}

/// What happened to a supervised child, for observers (logs, registries, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildEvent {
    /// The child is running.
    Started {
        /// Its name.
        child: String,
    },
    /// The child failed (panic, `Err`, failed start) with this error.
    Failed {
        /// Its name.
        child: String,
        /// The error, as text.
        error: String,
    },
    /// The child stopped normally.
    Stopped {
        /// Its name.
        child: String,
    },
    /// The child will be started again.
    Restarting {
        /// Its name.
        child: String,
        /// After this delay.
        after: Duration,
    },
    /// Restart intensity exceeded: the supervisor fails.
    Escalated {
        /// The child that exceeded it.
        child: String,
        /// Restarts counted within the period.
        restarts: u32,
    },
}

/// The error a supervisor fails with when a child exceeds the restart intensity.
#[derive(Debug, Clone, thiserror::Error)]
#[error("child {child} exceeded {restarts} restarts within the period; last error: {last_error}")]
pub struct Escalated {
    /// The child.
    pub child: String,
    /// Restarts counted.
    pub restarts: u32,
    /// Its last error.
    pub last_error: String,
}

/// What a supervised child looks like from outside.
#[derive(Debug, Clone)]
pub struct ChildInfo {
    /// Its name.
    pub name: String,
    /// Its actor while it runs.
    pub actor: Option<ActorCell>,
    /// Restarts so far.
    pub restarts: u32,
    /// The last error it failed with.
    pub last_error: Option<String>,
}

/// Messages to a [`Supervisor`].
pub enum SupervisorMsg {
    /// Adds and starts a child; replies with its cell, or the start error as text.
    StartChild(ChildSpec, RpcReplyPort<Result<ActorCell, String>>),
    /// Stops a child for good (no restart); replies whether it existed.
    StopChild(String, RpcReplyPort<bool>),
    /// Lists the children.
    Children(RpcReplyPort<Vec<ChildInfo>>),
    /// A backoff delay elapsed (sent by the supervisor to itself).
    #[doc(hidden)]
    RestartDue(String),
}

/// How a [`Supervisor`] starts.
pub struct SupervisorArgs {
    /// Restart limits.
    pub policy: RestartPolicy,
    /// Children started in order before the supervisor runs.
    pub children: Vec<ChildSpec>,
    /// Gets a copy of every [`ChildEvent`]; events are dropped if it is full.
    pub observer: Option<mpsc::Sender<ChildEvent>>,
}

/// A one-for-one supervisor actor.
pub struct Supervisor;

struct Child {
    spec: ChildSpec,
    cell: Option<ActorCell>,
    restarts: u32,
    last_error: Option<String>,
}

/// A [`Supervisor`]'s state.
pub struct SupervisorState {
    intensity: RestartIntensity,
    children: HashMap<String, Child>,
    running: HashMap<ActorId, String>,
    observer: Option<mpsc::Sender<ChildEvent>>,
}

fn notify(observer: &Option<mpsc::Sender<ChildEvent>>, event: ChildEvent) {
    if let Some(observer) = observer {
        let _ = observer.try_send(event);
    }
}

impl SupervisorState {
    async fn start(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        name: &str,
    ) -> Result<ActorCell, String> {
        let Some(child) = self.children.get_mut(name) else {
            return Err(format!("no child named {name}"));
        };
        match (child.spec.start)(myself.get_cell()).await {
            Ok(cell) => {
                child.cell = Some(cell.clone());
                self.running.insert(cell.get_id(), name.to_string());
                notify(
                    &self.observer,
                    ChildEvent::Started {
                        child: name.to_string(),
                    },
                );
                Ok(cell)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Applies the restart policy to a child that exited; `Err` escalates.
    fn on_exit(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        name: &str,
        error: Option<String>,
    ) -> Result<(), Escalated> {
        let Some(child) = self.children.get_mut(name) else {
            return Ok(());
        };
        child.cell = None;
        let failed = error.is_some();
        if let Some(e) = error {
            child.last_error = Some(e.clone());
            notify(
                &self.observer,
                ChildEvent::Failed {
                    child: name.to_string(),
                    error: e,
                },
            );
        } else {
            notify(
                &self.observer,
                ChildEvent::Stopped {
                    child: name.to_string(),
                },
            );
        }
        let restart = child.spec.restart;
        match self
            .intensity
            .on_exit(name, failed, restart, Instant::now())
        {
            Decision::Restart { after } => {
                child.restarts += 1;
                notify(
                    &self.observer,
                    ChildEvent::Restarting {
                        child: name.to_string(),
                        after,
                    },
                );
                let name = name.to_string();
                myself.send_after(after, move || SupervisorMsg::RestartDue(name));
                Ok(())
            }
            Decision::Forget => {
                self.children.remove(name);
                Ok(())
            }
            Decision::Escalate { restarts } => {
                let last_error = child.last_error.clone().unwrap_or_default();
                notify(
                    &self.observer,
                    ChildEvent::Escalated {
                        child: name.to_string(),
                        restarts,
                    },
                );
                Err(Escalated {
                    child: name.to_string(),
                    restarts,
                    last_error,
                })
            }
        }
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut state = SupervisorState {
            intensity: RestartIntensity::new(args.policy),
            children: HashMap::new(),
            running: HashMap::new(),
            observer: args.observer,
        };
        for spec in args.children {
            let name = spec.name.clone();
            state.children.insert(
                name.clone(),
                Child {
                    spec,
                    cell: None,
                    restarts: 0,
                    last_error: None,
                },
            );
            state.start(&myself, &name).await?;
        }
        Ok(state)
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        _: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Children may hold GPUs or streams: let their post_stop run.
        myself
            .stop_children_and_wait(
                Some("supervisor stopping".into()),
                Some(Duration::from_secs(10)),
            )
            .await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::StartChild(spec, reply) => {
                let name = spec.name.clone();
                if state.children.contains_key(&name) {
                    let _ = reply.send(Err(format!("a child named {name} exists already")));
                    return Ok(());
                }
                state.children.insert(
                    name.clone(),
                    Child {
                        spec,
                        cell: None,
                        restarts: 0,
                        last_error: None,
                    },
                );
                let result = state.start(&myself, &name).await;
                if result.is_err() {
                    state.children.remove(&name);
                }
                let _ = reply.send(result);
            }
            SupervisorMsg::StopChild(name, reply) => {
                let existed = match state.children.remove(&name) {
                    Some(child) => {
                        state.intensity.forget(&name);
                        if let Some(cell) = child.cell {
                            state.running.remove(&cell.get_id());
                            let _ = cell
                                .stop_and_wait(Some("stopped by supervisor".into()), None)
                                .await;
                        }
                        true
                    }
                    None => false,
                };
                let _ = reply.send(existed);
            }
            SupervisorMsg::Children(reply) => {
                let mut list: Vec<ChildInfo> = state
                    .children
                    .iter()
                    .map(|(name, c)| ChildInfo {
                        name: name.clone(),
                        actor: c.cell.clone(),
                        restarts: c.restarts,
                        last_error: c.last_error.clone(),
                    })
                    .collect();
                list.sort_by(|a, b| a.name.cmp(&b.name));
                let _ = reply.send(list);
            }
            SupervisorMsg::RestartDue(name) => {
                let waiting = state.children.get(&name).is_some_and(|c| c.cell.is_none());
                if waiting && let Err(e) = state.start(&myself, &name).await {
                    state.on_exit(&myself, &name, Some(format!("restart failed: {e}")))?;
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, error) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string())),
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            _ => return Ok(()),
        };
        let Some(name) = state.running.remove(&cell.get_id()) else {
            return Ok(());
        };
        if let Err(escalated) = state.on_exit(&myself, &name, error) {
            myself
                .stop_children_and_wait(
                    Some("supervisor escalating".into()),
                    Some(Duration::from_secs(10)),
                )
                .await;
            return Err(Box::new(escalated));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::call_t;

    #[test]
    fn intensity_allows_max_restarts_within_the_period_then_escalates() {
        let policy = RestartPolicy {
            max_restarts: 3,
            period: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        let mut r = RestartIntensity::new(policy);
        let t0 = Instant::now();
        for i in 0..3 {
            match r.on_exit("w", true, Restart::Permanent, t0 + Duration::from_secs(i)) {
                Decision::Restart { after } => {
                    let ceiling = Duration::from_millis(100 << i);
                    assert!(after <= ceiling && after >= ceiling / 2, "{after:?}");
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            r.on_exit("w", true, Restart::Permanent, t0 + Duration::from_secs(3)),
            Decision::Escalate { restarts: 3 }
        );
        // Once old restarts leave the window, restarting is allowed again.
        assert!(matches!(
            r.on_exit("w", true, Restart::Permanent, t0 + Duration::from_secs(12)),
            Decision::Restart { .. }
        ));
    }

    #[test]
    fn restart_kinds() {
        let mut r = RestartIntensity::new(RestartPolicy::default());
        let now = Instant::now();
        assert_eq!(
            r.on_exit("a", false, Restart::Transient, now),
            Decision::Forget
        );
        assert!(matches!(
            r.on_exit("a", true, Restart::Transient, now),
            Decision::Restart { .. }
        ));
        assert_eq!(
            r.on_exit("b", true, Restart::Temporary, now),
            Decision::Forget
        );
        assert!(matches!(
            r.on_exit("c", false, Restart::Permanent, now),
            Decision::Restart { .. }
        ));
    }

    /// A child that fails when told to.
    struct Fragile;
    impl Actor for Fragile {
        type Msg = ();
        type State = ();
        type Arguments = ();
        async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
            Ok(())
        }
        async fn handle(
            &self,
            _: ActorRef<()>,
            _: (),
            _: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            Err("boom".into())
        }
    }

    /// A parent of the supervisor that reports what it is told about it.
    struct Parent(mpsc::Sender<String>);
    impl Actor for Parent {
        type Msg = ();
        type State = ();
        type Arguments = ();
        async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
            Ok(())
        }
        async fn handle_supervisor_evt(
            &self,
            _: ActorRef<()>,
            e: SupervisionEvent,
            _: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            if let SupervisionEvent::ActorFailed(_, err) = e {
                let _ = self.0.send(err.to_string()).await;
            }
            Ok(())
        }
    }

    async fn next_event(rx: &mut mpsc::Receiver<ChildEvent>) -> ChildEvent {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no supervision event within 5 s")
            .expect("observer closed")
    }

    #[tokio::test]
    async fn restarts_a_failing_child_then_escalates_past_the_intensity() {
        let (parent_tx, mut parent_rx) = mpsc::channel(4);
        let (parent, _) = Actor::spawn(None, Parent(parent_tx), ()).await.unwrap();
        let (events_tx, mut events) = mpsc::channel(64);
        let args = SupervisorArgs {
            policy: RestartPolicy {
                max_restarts: 2,
                period: Duration::from_secs(30),
                initial_backoff: Duration::from_millis(5),
                max_backoff: Duration::from_millis(20),
            },
            children: vec![ChildSpec::actor("fragile", Restart::Permanent, || {
                (Fragile, ())
            })],
            observer: Some(events_tx),
        };
        let (sup, _) = Actor::spawn_linked(None, Supervisor, args, parent.get_cell())
            .await
            .unwrap();
        assert!(matches!(
            next_event(&mut events).await,
            ChildEvent::Started { .. }
        ));

        for round in 1..=2 {
            let children = call_t!(sup, SupervisorMsg::Children, 1000).unwrap();
            let first = children[0].actor.clone().expect("child running");
            first.send_message(()).unwrap();
            assert!(
                matches!(next_event(&mut events).await, ChildEvent::Failed { error, .. } if error.contains("boom"))
            );
            assert!(matches!(
                next_event(&mut events).await,
                ChildEvent::Restarting { .. }
            ));
            assert!(matches!(
                next_event(&mut events).await,
                ChildEvent::Started { .. }
            ));
            let children = call_t!(sup, SupervisorMsg::Children, 1000).unwrap();
            assert_eq!(children[0].restarts, round);
            assert_ne!(
                children[0].actor.as_ref().unwrap().get_id(),
                first.get_id(),
                "a new actor"
            );
        }

        // The third failure within the period exceeds max_restarts = 2.
        let children = call_t!(sup, SupervisorMsg::Children, 1000).unwrap();
        children[0].actor.clone().unwrap().send_message(()).unwrap();
        assert!(matches!(
            next_event(&mut events).await,
            ChildEvent::Failed { .. }
        ));
        assert_eq!(
            next_event(&mut events).await,
            ChildEvent::Escalated {
                child: "fragile".into(),
                restarts: 2
            }
        );
        let escalation = tokio::time::timeout(Duration::from_secs(5), parent_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            escalation.contains("fragile exceeded 2 restarts"),
            "{escalation}"
        );
        assert!(escalation.contains("boom"), "{escalation}");
        parent.stop(None);
    }

    #[tokio::test]
    async fn a_stopped_child_is_not_restarted() {
        let (events_tx, mut events) = mpsc::channel(64);
        let args = SupervisorArgs {
            policy: RestartPolicy::default(),
            children: vec![],
            observer: Some(events_tx),
        };
        let (sup, _) = Actor::spawn(None, Supervisor, args).await.unwrap();
        let spec = ChildSpec::actor("w", Restart::Permanent, || (Fragile, ()));
        call_t!(sup, SupervisorMsg::StartChild, 1000, spec)
            .unwrap()
            .unwrap();
        assert!(matches!(
            next_event(&mut events).await,
            ChildEvent::Started { .. }
        ));
        assert!(call_t!(sup, SupervisorMsg::StopChild, 1000, "w".into()).unwrap());
        assert!(
            call_t!(sup, SupervisorMsg::Children, 1000)
                .unwrap()
                .is_empty()
        );
        assert!(!call_t!(sup, SupervisorMsg::StopChild, 1000, "w".into()).unwrap());
        // Nothing further happens to it.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), events.recv())
                .await
                .is_err()
        );
        sup.stop(None);
    }
}
