//! The root of a process's supervision tree: it supervises the process's top actor and
//! reports how that actor ended, so the process ends with it — with a non-zero exit and
//! the reason when it failed — instead of running on half-alive.

use ractor::{Actor, ActorProcessingErr, ActorRef, SpawnErr, SupervisionEvent};
use tokio::sync::oneshot;

/// How the top actor ended: `Ok` when it stopped (asked to, or drained), `Err` with the
/// reason when it failed or was killed.
pub type Ended = Result<(), String>;

/// Resolves when the top actor has ended, to how it ended (a root gone without saying
/// counts as a failure).
#[derive(Debug)]
pub struct Ending(oneshot::Receiver<Ended>);

impl std::future::Future for Ending {
    type Output = Ended;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Ended> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|received| received.unwrap_or_else(|_| Err("the supervision root stopped".into())))
    }
}

/// The root actor.
pub struct Root;

impl Actor for Root {
    type Msg = ();
    type State = Option<oneshot::Sender<Ended>>;
    type Arguments = oneshot::Sender<Ended>;

    async fn pre_start(
        &self,
        _: ActorRef<()>,
        ended: oneshot::Sender<Ended>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(Some(ended))
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let ended = match event {
            // ractor hands back the state of an actor that stopped; one that was killed
            // has none.
            SupervisionEvent::ActorTerminated(_, Some(_), _) => Ok(()),
            SupervisionEvent::ActorTerminated(_, None, reason) => {
                Err(reason.unwrap_or_else(|| "killed".into()))
            }
            SupervisionEvent::ActorFailed(_, error) => Err(error.to_string()),
            _ => return Ok(()),
        };
        if let Some(tx) = state.take() {
            let _ = tx.send(ended);
        }
        myself.stop(None);
        Ok(())
    }
}

/// Spawns `handler` as the top actor of a new tree: linked under a [`Root`], whose
/// [`Ending`] tells how it ended.
pub async fn spawn_supervised<A: Actor>(
    handler: A,
    args: A::Arguments,
) -> Result<(ActorRef<A::Msg>, Ending), SpawnErr> {
    let (tx, rx) = oneshot::channel();
    let (root, _) = Actor::spawn(None, Root, tx).await?;
    match Actor::spawn_linked(None, handler, args, root.get_cell()).await {
        Ok((actor, _)) => Ok((actor, Ending(rx))),
        Err(e) => {
            root.stop(None);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Child;

    impl Actor for Child {
        type Msg = bool;
        type State = ();
        type Arguments = ();

        async fn pre_start(&self, _: ActorRef<bool>, _: ()) -> Result<(), ActorProcessingErr> {
            Ok(())
        }

        async fn handle(
            &self,
            myself: ActorRef<bool>,
            fail: bool,
            _: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            if fail {
                return Err("it broke".into());
            }
            myself.stop(None);
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_root_tells_a_failure_with_its_reason_and_a_stop_as_ok() {
        let (child, ending) = spawn_supervised(Child, ()).await.unwrap();
        child.cast(true).unwrap();
        let ended = ending.await;
        assert!(
            ended.as_ref().is_err_and(|e| e.contains("it broke")),
            "{ended:?}"
        );

        let (child, ending) = spawn_supervised(Child, ()).await.unwrap();
        child.cast(false).unwrap();
        assert_eq!(ending.await, Ok(()));
    }
}
