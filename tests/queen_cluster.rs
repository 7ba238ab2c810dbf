//! One queen and two hives as real processes on 127.0.0.1 with tiny models: joining with
//! tokens, requests spread over both hives, a worker started on demand, the queen crashed
//! or stopped gracefully (and upgraded) while the hives and their workers run on.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use rbee::actors::hive::store::ModelId;
use rbee::actors::queen::protocol::{ClientRequest, ClientResponse, Placement};
use rbee::actors::worker::engine::tiny::write_tiny_llama;
use rbee::transport::{ClusterCa, Endpoint, NodeId, Role};

use common::daemons::{
    Daemon, client, eventually, import, link_config, processes_under, read_all, signal, start_hive,
    start_queen, start_queen_program, token, workers,
};
use common::traffic::{Traffic, a_worker_on_each_hive, connected, greedy, incarnations};

#[tokio::test]
async fn joining_needs_a_live_token_and_the_cluster_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (_queen, link) = start_queen(dir.path(), 0, &[]);
    let valid = token(dir.path(), 3600);

    let hive = start_hive(&dir.path().join("a"), &valid, "hive-a").expect("a valid token joins");
    assert_eq!(hive.ready.pointer("/ready/id").unwrap(), "hive-a");

    // The same token again, but with another secret.
    let mut parts: Vec<String> = valid.split('.').map(str::to_string).collect();
    parts[2] = "0".repeat(32);
    let wrong = parts.join(".");
    let refused = start_hive(&dir.path().join("b"), &wrong, "hive-b")
        .err()
        .unwrap();
    assert!(
        refused.to_string().contains("unknown join token"),
        "{refused}"
    );

    let short = token(dir.path(), 1);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let refused = start_hive(&dir.path().join("c"), &short, "hive-c")
        .err()
        .unwrap();
    assert!(refused.to_string().contains("expired"), "{refused}");

    // A second hive cannot take a name that joined.
    let refused = start_hive(&dir.path().join("d"), &valid, "hive-a")
        .err()
        .unwrap();
    assert!(refused.to_string().contains("joined already"), "{refused}");

    // A hive with a certificate from another CA is refused on the node link.
    let other = ClusterCa::generate("other").unwrap();
    let stranger = other
        .issue(&NodeId::new("hive-x").unwrap(), Role::Hive)
        .unwrap();
    let endpoint = Endpoint::<rbee::actors::queen::protocol::QueenProtocol>::client(
        stranger,
        "127.0.0.1:0".parse().unwrap(),
        link_config(),
    )
    .unwrap();
    assert!(endpoint.connect(link, &[Role::Queen]).await.is_err());

    // The joined hive is in the registry.
    let client = client(dir.path(), link).await;
    eventually(10, "hive-a listed", || async {
        matches!(client.call(ClientRequest::ListHives).await, Ok(ClientResponse::Hives(h)) if h.len() == 1)
    })
    .await;
}

#[tokio::test]
async fn requests_spread_over_both_hives_and_a_missing_worker_is_started() {
    let dir = tempfile::tempdir().unwrap();
    let model_file = dir.path().join("tiny.gguf");
    write_tiny_llama(&model_file, 512).unwrap();
    let (home_a, home_b) = (dir.path().join("a"), dir.path().join("b"));
    import(&home_a, &model_file, "tiny");
    import(&home_b, &model_file, "tiny");
    import(&home_b, &model_file, "solo");
    let (_queen, link) = start_queen(dir.path(), 0, &["--slots", "2"]);
    let token = token(dir.path(), 600);
    let _a = start_hive(&home_a, &token, "hive-a").unwrap();
    let _b = start_hive(&home_b, &token, "hive-b").unwrap();
    let client = client(dir.path(), link).await;
    eventually(20, "both hives connected", || async {
        matches!(client.call(ClientRequest::ListHives).await, Ok(ClientResponse::Hives(h)) if h.len() == 2)
    })
    .await;

    let tiny = ModelId::new("tiny").unwrap();
    for hive in ["hive-a", "hive-b"] {
        let placement = Placement {
            hive: Some(hive.into()),
            ..Placement::of(tiny.clone())
        };
        match client.call(ClientRequest::Spawn(placement)).await.unwrap() {
            ClientResponse::Worker(view) => {
                assert_eq!(view.hive, hive);
                assert!(view.routable && view.route == "direct", "{view:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    // An explicit placement that cannot be honoured says why.
    let nowhere = Placement {
        hive: Some("hive-a".into()),
        device: Some("cuda:0".into()),
        ..Placement::of(tiny.clone())
    };
    let refused = client
        .call(ClientRequest::Spawn(nowhere))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("GPU"), "{refused}");

    let client = std::sync::Arc::new(client);
    let mut runs = Vec::new();
    for _ in 0..20 {
        let (client, tiny) = (client.clone(), tiny.clone());
        runs.push(tokio::spawn(async move {
            read_all(client.generate(tiny, greedy(32)).await.unwrap(), 60).await
        }));
    }
    let mut hives = BTreeSet::new();
    for run in runs {
        let seen = run.await.unwrap();
        let stats = seen.done.as_ref().unwrap_or_else(|| panic!("{seen:?}"));
        assert_eq!(stats.completion_tokens, 32);
        assert_eq!(seen.tokens.len(), 32);
        hives.insert(seen.assigned[0].split('/').next().unwrap().to_string());
    }
    assert_eq!(hives.len(), 2, "all requests went to {hives:?}");

    // No worker serves `solo`: one is placed (only hive-b has it) and started.
    let solo = ModelId::new("solo").unwrap();
    let seen = read_all(client.generate(solo.clone(), greedy(8)).await.unwrap(), 120).await;
    assert!(seen.done.is_some(), "{seen:?}");
    assert!(seen.loading > 0, "no loading news: {seen:?}");
    assert!(seen.assigned[0].starts_with("hive-b/solo-"), "{seen:?}");
    let listed = workers(&client).await;
    assert_eq!(listed.iter().filter(|w| w.info.model == solo).count(), 1);
    assert!(listed.iter().all(|w| w.in_flight == 0), "{listed:?}");
}

#[tokio::test]
async fn a_restarted_queen_adopts_the_running_workers() {
    let dir = tempfile::tempdir().unwrap();
    let model_file = dir.path().join("tiny.gguf");
    write_tiny_llama(&model_file, 512).unwrap();
    let (home_a, home_b) = (dir.path().join("a"), dir.path().join("b"));
    import(&home_a, &model_file, "tiny");
    import(&home_b, &model_file, "tiny");
    let (mut queen, link) = start_queen(dir.path(), 0, &[]);
    let token = token(dir.path(), 600);
    let _a = start_hive(&home_a, &token, "hive-a").unwrap();
    let _b = start_hive(&home_b, &token, "hive-b").unwrap();
    let tiny = ModelId::new("tiny").unwrap();
    let before = a_worker_on_each_hive(dir.path(), link, &tiny).await;
    assert_eq!(before.len(), 2);

    // A crash of the queen, then the same queen (data directory, address) again.
    queen.kill();
    let (_queen, again) = start_queen(dir.path(), link.port(), &[]);
    assert_eq!(again, link);
    let client = client(dir.path(), link).await;
    eventually(20, "the workers are back and routable", || async {
        let listed = workers(&client).await;
        listed.len() == 2 && listed.iter().all(|w| w.routable)
    })
    .await;
    assert_eq!(
        incarnations(&client).await,
        before,
        "the same workers, none restarted"
    );
    let seen = read_all(client.generate(tiny, greedy(8)).await.unwrap(), 60).await;
    assert!(seen.done.is_some(), "{seen:?}");
}

/// How long the queen stays away in the graceful-restart test (`RBEE_TEST_QUEEN_AWAY_SECS`
/// to try a longer outage by hand).
fn queen_away() -> Duration {
    let secs = std::env::var("RBEE_TEST_QUEEN_AWAY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    Duration::from_secs(secs)
}

#[tokio::test]
async fn a_queen_stopped_gracefully_and_started_again_keeps_every_hive_and_worker() {
    let dir = tempfile::tempdir().unwrap();
    let model_file = dir.path().join("tiny.gguf");
    write_tiny_llama(&model_file, 512).unwrap();
    let (home_a, home_b) = (dir.path().join("a"), dir.path().join("b"));
    import(&home_a, &model_file, "tiny");
    import(&home_b, &model_file, "tiny");
    let (mut queen, link) = start_queen(dir.path(), 0, &[]);
    let token = token(dir.path(), 600);
    let mut hives = [
        start_hive(&home_a, &token, "hive-a").unwrap(),
        start_hive(&home_b, &token, "hive-b").unwrap(),
    ];
    let tiny = ModelId::new("tiny").unwrap();
    let before = a_worker_on_each_hive(dir.path(), link, &tiny).await;
    assert_eq!(before.len(), 2);
    assert!(before.iter().all(|(_, pid, _)| pid.is_some()), "{before:?}");

    let traffic = Traffic::start(dir.path(), link, tiny.clone(), 2);
    traffic
        .wait_for_more_done(4, "traffic before the first stop")
        .await;

    // 1. SIGTERM, as systemd or Kubernetes stop a service; 2. SIGINT (`rbee queen stop`),
    // then a copy of the binary, as an upgrade installs one.
    let upgraded = dir.path().join("rbee-upgraded");
    std::fs::copy(env!("CARGO_BIN_EXE_rbee"), &upgraded).unwrap();
    for (stop, program) in [
        (libc::SIGTERM, env!("CARGO_BIN_EXE_rbee").as_ref()),
        (libc::SIGINT, upgraded.as_path()),
    ] {
        stop_gracefully(&mut queen, stop);
        tokio::time::sleep(queen_away()).await;
        for hive in &mut hives {
            assert!(
                hive.child.try_wait().unwrap().is_none(),
                "a hive exited while its queen was away"
            );
        }
        let started = Instant::now();
        let (again, addr) = start_queen_program(
            Command::new(program),
            dir.path(),
            "127.0.0.1",
            link.port(),
            &[],
        );
        assert_eq!(addr, link);
        queen = again;
        let client = client(dir.path(), link).await;
        eventually(15, "both hives reconnected", || async {
            connected(&client).await.len() == 2
        })
        .await;
        eprintln!(
            "both hives back {:?} after the queen started (away {:?}, signal {stop})",
            started.elapsed(),
            queen_away()
        );
        eventually(20, "the workers are back and routable", || async {
            let listed = workers(&client).await;
            listed.len() == 2 && listed.iter().all(|w| w.routable)
        })
        .await;
        assert_eq!(
            incarnations(&client).await,
            before,
            "the same worker processes, none restarted"
        );
        traffic
            .wait_for_more_done(4, "traffic after the restart")
            .await;
    }
    let outcome = traffic.stop().await;
    eprintln!("traffic: {outcome:?}");
    assert_eq!(outcome.without_terminal, 0, "{outcome:?}");

    // Nothing orphaned: the hives run, and of the processes naming the test's directory
    // (the queen's data, the workers' identities) there are the queen and the two workers.
    for hive in &mut hives {
        assert!(hive.child.try_wait().unwrap().is_none());
    }
    let mut expected: Vec<u32> = before.iter().filter_map(|(_, pid, _)| *pid).collect();
    expected.push(queen.pid());
    expected.sort();
    let mut running = processes_under(dir.path());
    running.sort();
    assert_eq!(running, expected);
}

/// Signals the queen and waits (at most 15 s) until it has exited on its own, cleanly.
fn stop_gracefully(queen: &mut Daemon, stop: i32) {
    signal(queen.pid(), stop);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = queen.child.try_wait().unwrap() {
            assert!(
                status.success(),
                "the queen's exit after signal {stop}: {status}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the queen did not stop on signal {stop}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn a_removed_hive_is_refused_at_its_next_handshake_even_after_a_queen_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (home_a, home_b) = (dir.path().join("a"), dir.path().join("b"));
    let (mut queen, link) = start_queen(dir.path(), 0, &[]);
    let token = token(dir.path(), 600);
    let mut hive_a = start_hive(&home_a, &token, "hive-a").unwrap();
    let _b = start_hive(&home_b, &token, "hive-b").unwrap();
    let client = client(dir.path(), link).await;
    eventually(20, "both hives connected", || async {
        connected(&client).await.len() == 2
    })
    .await;
    let unknown = client
        .call(ClientRequest::RemoveHive("never-joined".into()))
        .await;
    assert!(unknown.is_err(), "{unknown:?}");
    client
        .call(ClientRequest::RemoveHive("hive-a".into()))
        .await
        .unwrap();
    eventually(10, "hive-a gone", || async {
        connected(&client).await == ["hive-b"]
    })
    .await;
    // It redials (≤ 5 s between dials) and is refused each time for good.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(connected(&client).await, ["hive-b"]);
    assert!(
        hive_a.child.try_wait().unwrap().is_none(),
        "the hive serves on"
    );

    // The revocation is on disk: a restarted queen refuses it too, when the hive (which
    // gave up dialing) is started again with its certificate.
    queen.kill();
    hive_a.kill();
    let (_queen, again) = start_queen(dir.path(), link.port(), &[]);
    let _a = start_hive(&home_a, &token, "hive-a").unwrap();
    let client = common::daemons::client(dir.path(), again).await;
    eventually(20, "hive-b back", || async {
        connected(&client).await == ["hive-b"]
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(connected(&client).await, ["hive-b"]);
}

#[tokio::test]
async fn a_queen_whose_actor_dies_ends_its_daemon_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut program = Command::new(env!("CARGO_BIN_EXE_rbee"));
    program.env("RBEE_TEST_KILL_QUEEN_ACTOR_MS", "300");
    let (mut queen, _) = start_queen_program(program, dir.path(), "127.0.0.1", 0, &[]);
    let ready = Instant::now();
    let status = loop {
        if let Some(status) = queen.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            ready.elapsed() < Duration::from_secs(10),
            "the daemon outlived its queen actor"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let after_kill = ready.elapsed().saturating_sub(Duration::from_millis(300));
    assert!(!status.success(), "{status}");
    assert!(
        after_kill < Duration::from_secs(1),
        "ended {after_kill:?} after its actor"
    );
}

/// Whether process `pid` exists (and is not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat.rsplit(") ").next().unwrap_or("").starts_with('Z'))
}

#[tokio::test]
async fn a_worker_whose_hive_is_gone_for_good_stops_itself_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let model_file = dir.path().join("tiny.gguf");
    write_tiny_llama(&model_file, 512).unwrap();
    let home = dir.path().join("a");
    import(&home, &model_file, "tiny");
    let (_queen, link) = start_queen(dir.path(), 0, &[]);
    let token = token(dir.path(), 600);
    let grace = 4;
    let start_hive = || {
        let mut args = vec!["hive", "serve", "--join", &token, "--name", "hive-a"];
        let grace = grace.to_string();
        args.extend(["--worker-orphan-grace-secs", &grace]);
        args.extend(common::daemons::TIMING);
        common::daemons::start_command(Command::new(env!("CARGO_BIN_EXE_rbee")), &home, &args)
            .unwrap()
    };
    let mut hive = start_hive();
    let client = client(dir.path(), link).await;
    eventually(20, "hive-a connected", || async {
        connected(&client).await == ["hive-a"]
    })
    .await;
    let tiny = ModelId::new("tiny").unwrap();
    client
        .call(ClientRequest::Spawn(Placement::of(tiny.clone())))
        .await
        .unwrap();
    let pid = workers(&client).await[0]
        .info
        .pid
        .expect("a worker process");

    // A hive restarted within the grace period adopts the worker, which serves on.
    hive.kill();
    let mut again = start_hive();
    tokio::time::sleep(Duration::from_secs(grace + 3)).await;
    assert!(alive(pid), "the adopted worker stopped");
    let seen = read_all(client.generate(tiny, greedy(8)).await.unwrap(), 30).await;
    assert!(seen.done.is_some(), "{seen:?}");

    // A hive gone for good (SIGKILL of the hive alone): the worker stops itself once the
    // grace period has passed.
    again.kill();
    let gone = Instant::now();
    eventually(grace + 15, "the orphaned worker stopped", || async {
        !alive(pid)
    })
    .await;
    eprintln!(
        "the orphaned worker stopped {:?} after its hive",
        gone.elapsed()
    );
    assert!(gone.elapsed() >= Duration::from_secs(grace - 1));
}
