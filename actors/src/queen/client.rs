//! A client of the queen: operations and generations over a node link.

use std::net::SocketAddr;
use std::time::Duration;

use rbee_transport::{Endpoint, Link, LinkConfig, LinkError, NodeIdentity, Role, StreamReceiver};

use super::protocol::{
    ClientRequest, ClientResponse, QueenError, QueenItem, QueenOpen, QueenProtocol, QueenRequest,
    QueenResponse,
};
use crate::hive::store::ModelId;
use crate::worker::api::GenerateRequest;

/// How long an operation may take (a spawn loads a model).
const OPERATION_TIMEOUT: Duration = Duration::from_secs(300);

/// Errors of a client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The link failed or the queen is unreachable.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The queen refused or failed the operation.
    #[error(transparent)]
    Queen(#[from] QueenError),
    /// The queen answered out of protocol.
    #[error("the queen answered out of protocol: {0}")]
    Unexpected(String),
}

/// A link to the queen with a client identity.
pub struct QueenClient {
    link: Link<QueenProtocol>,
    _endpoint: Endpoint<QueenProtocol>,
}

impl QueenClient {
    /// Dials the queen at `addr` as the client `identity`.
    pub async fn connect(
        identity: NodeIdentity,
        addr: SocketAddr,
        config: LinkConfig,
    ) -> Result<Self, LinkError> {
        let endpoint = Endpoint::client(identity, rbee_transport::dial_from(addr), config)?;
        let (link, _incoming) = endpoint.connect(addr, &[Role::Queen]).await?;
        Ok(QueenClient {
            link,
            _endpoint: endpoint,
        })
    }

    /// Runs one operation; a queen error comes back as [`ClientError::Queen`].
    pub async fn call(&self, request: ClientRequest) -> Result<ClientResponse, ClientError> {
        let request = QueenRequest::Client(request);
        match self.link.call(request, OPERATION_TIMEOUT).await? {
            QueenResponse::Client(ClientResponse::Error(e)) | QueenResponse::Error(e) => {
                Err(ClientError::Queen(e))
            }
            QueenResponse::Client(response) => Ok(response),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Starts a generation on whichever worker serves `model`. Dropping the stream cancels
    /// it (the worker stops and its slot is freed).
    pub async fn generate(
        &self,
        model: ModelId,
        request: GenerateRequest,
    ) -> Result<StreamReceiver<QueenItem>, LinkError> {
        self.link
            .open_stream(QueenOpen::Generate { model, request })
            .await
    }

    /// Opens any stream on the queen (pulls).
    pub async fn open(&self, open: QueenOpen) -> Result<StreamReceiver<QueenItem>, LinkError> {
        self.link.open_stream(open).await
    }
}
