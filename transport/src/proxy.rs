//! A local ractor actor per connected peer, through which local actors talk to the peer.
//!
//! The proxy watches its link: when the connection closes for any reason (graceful close,
//! reset, idle timeout), it stops with a [`PeerLost`] error naming the peer and the cause,
//! so its supervisor receives `SupervisionEvent::ActorFailed` like for any crashed child.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::error::{CloseCause, LinkError};
use crate::identity::PeerIdentity;
use crate::link::{Link, Protocol, StreamReceiver};

/// What a proxy does for local actors.
pub enum ProxyMsg<P: Protocol> {
    /// Forward a call; the reply port gets the peer's response.
    Call {
        /// The request.
        request: P::Request,
        /// How long to wait for the response.
        timeout: Duration,
        /// Where the response goes.
        reply: RpcReplyPort<Result<P::Response, LinkError>>,
    },
    /// Forward a one-way event (in order with other casts through this proxy).
    Cast(P::Event),
    /// Open a stream on the peer.
    OpenStream {
        /// What to ask the peer for.
        open: P::Open,
        /// Where the stream's receiver goes.
        reply: RpcReplyPort<Result<StreamReceiver<P::Item>, LinkError>>,
    },
    /// A handle to the link itself, for callers on a hot path.
    Link(RpcReplyPort<Link<P>>),
    /// The link closed (sent by the proxy's own watcher).
    #[doc(hidden)]
    LinkClosed(CloseCause),
}

/// The error a proxy fails with when its link is lost.
#[derive(Debug, Clone, thiserror::Error)]
#[error("link to {peer} lost: {cause}")]
pub struct PeerLost {
    /// Who was on the other end.
    pub peer: PeerIdentity,
    /// Why the link closed.
    pub cause: CloseCause,
}

/// The proxy actor; spawn it with an established [`Link`] as its argument.
pub struct PeerProxy<P: Protocol>(std::marker::PhantomData<fn() -> P>);

impl<P: Protocol> Default for PeerProxy<P> {
    fn default() -> Self {
        PeerProxy(std::marker::PhantomData)
    }
}

/// A proxy's state.
pub struct ProxyState<P: Protocol> {
    link: Link<P>,
    watcher: tokio::task::JoinHandle<()>,
}

impl<P: Protocol> Actor for PeerProxy<P> {
    type Msg = ProxyMsg<P>;
    type State = ProxyState<P>;
    type Arguments = Link<P>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        link: Link<P>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let closed = link.closed();
        let watcher = tokio::spawn(async move {
            let cause = closed.await;
            let _ = myself.cast(ProxyMsg::LinkClosed(cause));
        });
        Ok(ProxyState { link, watcher })
    }

    async fn post_stop(
        &self,
        _: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.watcher.abort();
        // The proxy owns the relationship with the peer: stopping it ends the link.
        state.link.close("proxy stopped");
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ProxyMsg::Call {
                request,
                timeout,
                reply,
            } => {
                // Calls run beside the proxy so a slow peer answer never blocks the mailbox.
                let link = state.link.clone();
                tokio::spawn(async move {
                    let _ = reply.send(link.call(request, timeout).await);
                });
            }
            ProxyMsg::Cast(event) => {
                if let Err(e) = state.link.cast(event).await {
                    tracing::debug!(peer = %state.link.peer(), error = %e, "cast not sent");
                }
            }
            ProxyMsg::OpenStream { open, reply } => {
                let link = state.link.clone();
                tokio::spawn(async move {
                    let _ = reply.send(link.open_stream(open).await);
                });
            }
            ProxyMsg::Link(reply) => {
                let _ = reply.send(state.link.clone());
            }
            ProxyMsg::LinkClosed(cause) => {
                return Err(Box::new(PeerLost {
                    peer: state.link.peer().clone(),
                    cause,
                }));
            }
        }
        Ok(())
    }
}
