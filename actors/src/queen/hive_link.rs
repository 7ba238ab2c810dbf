//! The supervised proxy of a joined hive: a child actor of the queen that serves the
//! hive's link (its events and its calls) and fails when that link is lost, so a lost
//! hive reaches the queen as a supervision event, as a lost worker process reaches its
//! hive.

use ractor::{Actor, ActorProcessingErr, ActorRef};
use rbee_transport::{Link, LinkIncoming, Role};
use tokio::task::JoinHandle;

use super::actor::QueenMsg;
use super::protocol::{HiveReport, QueenProtocol, QueenRequest};
use super::registry::WorkerKey;
use super::serve::{QueenService, invalid, sign};

/// The proxy actor.
pub(super) struct HiveLink;

/// What its link's reader tells it.
pub(super) enum HiveLinkMsg {
    /// The link closed, with its cause.
    Closed(String),
}

/// A hive that connected and reported itself.
pub(super) struct HiveLinkArgs {
    pub(super) id: String,
    pub(super) link: Link<QueenProtocol>,
    /// Which link of the hive this is (a late loss of an earlier one means nothing).
    pub(super) link_id: u64,
    pub(super) report: HiveReport,
    pub(super) incoming: LinkIncoming<QueenProtocol>,
    pub(super) service: QueenService,
}

impl Actor for HiveLink {
    type Msg = HiveLinkMsg;
    type State = JoinHandle<()>;
    type Arguments = HiveLinkArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<HiveLinkMsg>,
        args: HiveLinkArgs,
    ) -> Result<JoinHandle<()>, ActorProcessingErr> {
        let up = QueenMsg::HiveUp {
            id: args.id.clone(),
            link: args.link.clone(),
            link_id: args.link_id,
            report: args.report,
            proxy: myself.get_cell(),
        };
        args.service.queen.cast(up)?;
        Ok(tokio::spawn(read_link(
            args.id,
            args.link,
            args.incoming,
            args.service,
            myself,
        )))
    }

    async fn post_stop(
        &self,
        _: ActorRef<HiveLinkMsg>,
        reader: &mut JoinHandle<()>,
    ) -> Result<(), ActorProcessingErr> {
        reader.abort();
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<HiveLinkMsg>,
        msg: HiveLinkMsg,
        _: &mut JoinHandle<()>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            HiveLinkMsg::Closed(cause) => Err(cause.into()),
        }
    }
}

/// Forwards the hive's events to the queen and answers its calls until the link closes.
async fn read_link(
    id: String,
    link: Link<QueenProtocol>,
    incoming: LinkIncoming<QueenProtocol>,
    service: QueenService,
    proxy: ActorRef<HiveLinkMsg>,
) {
    let forward = |event| {
        let _ = service.queen.cast(QueenMsg::HiveEvent {
            id: id.clone(),
            event,
        });
    };
    let answer_with = |request| {
        let response = match request {
            QueenRequest::SignWorker {
                worker,
                public_key_der,
            } => {
                let worker = WorkerKey {
                    hive: id.clone(),
                    worker,
                };
                sign(
                    &service.authority,
                    &worker.node_id(),
                    Role::Worker,
                    &public_key_der,
                )
            }
            // For the hive this link's certificate names, whatever the request says.
            QueenRequest::Renew { public_key_der } => {
                sign(&service.authority, &id, Role::Hive, &public_key_der)
            }
            _ => invalid("a hive may only ask the queen to sign certificates"),
        };
        async move { response }
    };
    // Hives open no streams to the queen: dropping the sender refuses one.
    let refuse_stream = |_, _| async {};
    incoming.serve(forward, answer_with, refuse_stream).await;
    let cause = link
        .close_cause()
        .map_or_else(|| "link closed".to_string(), |c| c.to_string());
    let _ = proxy.cast(HiveLinkMsg::Closed(cause));
}
