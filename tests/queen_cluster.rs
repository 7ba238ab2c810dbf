//! One queen and two hives as real processes on 127.0.0.1 with tiny models: joining with
//! tokens, requests spread over both hives, a worker started on demand.

mod common;

use std::collections::BTreeSet;

use rbee::actors::hive::store::ModelId;
use rbee::actors::queen::protocol::{ClientRequest, ClientResponse, Placement};
use rbee::actors::worker::api::{GenerateRequest, SamplingParams};
use rbee::actors::worker::engine::tiny::write_tiny_llama;
use rbee::transport::{ClusterCa, Endpoint, NodeId, Role};

use common::daemons::{
    client, eventually, import, link_config, read_all, start_hive, start_queen, token, workers,
};

fn greedy(max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        sampling: SamplingParams::greedy(),
        ..GenerateRequest::text("In the", max_tokens)
    }
}

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
    let before = {
        let client = client(dir.path(), link).await;
        eventually(20, "both hives connected", || async {
            matches!(client.call(ClientRequest::ListHives).await, Ok(ClientResponse::Hives(h)) if h.len() == 2)
        })
        .await;
        for hive in ["hive-a", "hive-b"] {
            let placement = Placement {
                hive: Some(hive.into()),
                ..Placement::of(tiny.clone())
            };
            client.call(ClientRequest::Spawn(placement)).await.unwrap();
        }
        incarnations(&client).await
    };
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

/// Each worker's key, pid and restart count, sorted.
async fn incarnations(
    client: &rbee::actors::queen::client::QueenClient,
) -> Vec<(String, Option<u32>, u32)> {
    let mut listed: Vec<_> = workers(client)
        .await
        .into_iter()
        .map(|w| (w.key, w.info.pid, w.info.restarts))
        .collect();
    listed.sort();
    listed
}
