//! The queen's reach to workers: spawning one on its placed hive, dialing a worker
//! process directly (requests go straight to workers), and hearing when that link closes.

use super::*;

impl QueenState {
    pub(super) fn dial_all(&self, myself: &ActorRef<QueenMsg>, dials: Vec<Dial>) {
        for dial in dials {
            let (myself, endpoint) = (myself.clone(), self.args.workers.clone());
            tokio::spawn(async move {
                let result = dial_worker(&endpoint, &dial).await;
                let _ = myself.cast(QueenMsg::WorkerDialed(dial, result));
            });
        }
    }
}

/// Asks the placed hive to start the worker and records it; returns the hive's answer.
pub async fn spawn_on_hive(
    queen: &ActorRef<QueenMsg>,
    placed: Placed,
) -> Result<WorkerInfo, QueenError> {
    let request = QueenRequest::Hive(HiveRequest::Spawn(placed.spawn));
    let answer = placed.link.call(request, SPAWN_TIMEOUT).await;
    let info = match answer {
        Ok(QueenResponse::Hive(HiveResponse::Worker(info))) => *info,
        Ok(QueenResponse::Hive(HiveResponse::Error(e))) => return Err(QueenError::from_hive(e)),
        Ok(other) => {
            return Err(QueenError::new(
                QueenErrorKind::Hive,
                format!("the hive answered out of protocol: {other:?}"),
            ));
        }
        Err(e) => return Err(QueenError::new(QueenErrorKind::HiveLost, e.to_string())),
    };
    let _ = queen.cast(QueenMsg::WorkerStarted {
        hive: placed.hive,
        info: info.clone(),
    });
    Ok(info)
}

/// Dials a worker process and checks it is the one its hive named.
async fn dial_worker(
    endpoint: &Endpoint<WorkerProtocol>,
    dial: &Dial,
) -> Result<RemoteWorker, String> {
    let (link, _incoming) = endpoint
        .connect(dial.addr, &[Role::Worker])
        .await
        .map_err(|e| e.to_string())?;
    let expected = dial.key.node_id();
    if link.peer().node_id.as_str() != expected {
        link.close("not the worker its hive named");
        return Err(format!(
            "the worker at {} is {}, not {expected}",
            dial.addr,
            link.peer().node_id
        ));
    }
    Ok(RemoteWorker::new(link))
}

/// Reports the loss of the queen's link to a worker.
pub(super) fn watch_worker_link(queen: &ActorRef<QueenMsg>, dial: &Dial, remote: &RemoteWorker) {
    let closed = remote.link().closed();
    let (queen, key, incarnation) = (queen.clone(), dial.key.clone(), dial.incarnation);
    tokio::spawn(async move {
        let cause = closed.await;
        let _ = queen.cast(QueenMsg::WorkerLost {
            key,
            incarnation,
            reason: format!("link closed: {cause}"),
        });
    });
}
