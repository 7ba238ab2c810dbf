use rbee_transport::{ClusterCa, Endpoint, LinkConfig, NodeId, Role};

use super::*;
use crate::worker::actor::WorkerStatus;

/// A real link from a hive to a queen on 127.0.0.1 (the registry only holds it).
async fn hive_link() -> (Link<QueenProtocol>, Endpoint<QueenProtocol>) {
    let ca = ClusterCa::generate("t").unwrap();
    let issue = |id: &str, role| ca.issue(&NodeId::new(id).unwrap(), role).unwrap();
    let loopback = "127.0.0.1:0".parse().unwrap();
    let queen = Endpoint::<QueenProtocol>::bind(
        issue("queen", Role::Queen),
        loopback,
        LinkConfig::default(),
    )
    .unwrap();
    let hive =
        Endpoint::<QueenProtocol>::client(issue("h", Role::Hive), loopback, LinkConfig::default())
            .unwrap();
    let (link, _incoming) = hive
        .connect(queen.local_addr().unwrap(), &[Role::Queen])
        .await
        .unwrap();
    (link, queen)
}

fn worker(id: &str, read_at: u64) -> WorkerInfo {
    WorkerInfo {
        id: id.into(),
        model: ModelId::new("tiny").unwrap(),
        mode: WorkerMode::InProcess,
        pid: None,
        addr: None,
        device: "cpu".into(),
        state: WorkerState::Running(WorkerStatus {
            phase: Phase::Ready,
            model: None,
            slots: 1,
            kv: None,
            active: 0,
            requests: 0,
            generated_tokens: 0,
            last_finish: None,
        }),
        memory_bytes: 0,
        uptime_secs: 0,
        idle_timeout: IdleTimeout::Never,
        restarts: 0,
        last_error: None,
        read_at,
    }
}

/// A registry with the hive `h` connected (its first report read at 1), and the
/// queen's end of its link, to keep alive.
async fn with_hive_h() -> (Registry, Endpoint<QueenProtocol>) {
    let (link, queen) = hive_link().await;
    let mut registry = Registry::default();
    let report = HiveReport {
        capabilities: crate::hive::capabilities::probe(None, std::path::Path::new(".")),
        models: Vec::new(),
        workers: Vec::new(),
        read_at: 1,
    };
    registry.hive_up("h", link, 1, report);
    (registry, queen)
}

fn listed(registry: &Registry) -> Vec<String> {
    registry.worker_views().into_iter().map(|w| w.key).collect()
}

#[tokio::test]
async fn a_spawn_answer_older_than_a_report_does_not_bring_back_a_stopped_worker() {
    let (mut registry, _queen) = with_hive_h().await;

    // The spawn's answer was read at 2; the worker was stopped and the hive's report
    // read at 3 (without it) arrived first.
    registry.hive_workers("h", 3, Vec::new());
    registry.worker_started("h", worker("tiny-1", 2));
    assert!(
        listed(&registry).is_empty(),
        "a ghost: {:?}",
        listed(&registry)
    );

    // An answer newer than every report is taken; a stale report changes nothing.
    registry.worker_started("h", worker("tiny-2", 4));
    assert_eq!(listed(&registry), ["h/tiny-2"]);
    registry.hive_workers("h", 2, Vec::new());
    assert_eq!(listed(&registry), ["h/tiny-2"]);
    // The next report is the truth.
    registry.hive_workers("h", 5, Vec::new());
    assert!(listed(&registry).is_empty());
}
#[tokio::test]
async fn a_request_goes_to_the_worker_given_its_prefix_unless_that_one_is_much_busier() {
    let (mut registry, _queen) = with_hive_h().await;
    let roomy = |id: &str| {
        let mut w = worker(id, 2);
        if let WorkerState::Running(s) = &mut w.state {
            s.slots = 16;
        }
        w
    };
    registry.worker_started("h", roomy("tiny-1"));
    registry.worker_started("h", roomy("tiny-2"));
    let model = ModelId::new("tiny").unwrap();
    let key = |id: &str| WorkerKey {
        hive: "h".into(),
        worker: id.into(),
    };
    let first_turn = [11, 12];
    let second_turn = [11, 12, 13, 14];
    // Without a known prefix the least busy wins; tiny-1 gets the first turn.
    registry.acquire(&key("tiny-1"), &first_turn).unwrap();
    // The second turn follows its prefix although tiny-1 is the busier one.
    assert_eq!(registry.pick(&model, &second_turn), Some(key("tiny-1")));
    // A stranger goes to the least busy.
    assert_eq!(registry.pick(&model, &[99]), Some(key("tiny-2")));
    // Beyond the slack, load wins over the prefix.
    for _ in 0..AFFINITY_SLACK {
        registry.acquire(&key("tiny-1"), &[]).unwrap();
    }
    assert_eq!(registry.pick(&model, &second_turn), Some(key("tiny-2")));
}

#[tokio::test]
async fn a_worker_reported_unreachable_once_takes_requests_again_when_it_answers() {
    let (mut registry, _queen) = with_hive_h().await;
    registry.worker_started("h", worker("tiny-1", 2));
    let key = WorkerKey {
        hive: "h".into(),
        worker: "tiny-1".into(),
    };
    let model = ModelId::new("tiny").unwrap();
    let a = registry.acquire(&key, &[]).unwrap();
    assert_eq!(registry.pick(&model, &[]), None, "its one slot is taken");
    // One report without its status (a hive that could not ask it in time), then it
    // answers again: the same run.
    let mut silent = worker("tiny-1", 3);
    silent.state = WorkerState::Restarting;
    registry.hive_workers("h", 3, vec![silent]);
    registry.hive_workers("h", 4, vec![worker("tiny-1", 4)]);
    registry.release(&key, a.incarnation);
    assert!(registry.has_capacity_for(&model));
    assert_eq!(registry.pick(&model, &[]), Some(key));
}
