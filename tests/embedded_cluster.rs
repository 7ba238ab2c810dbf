//! The embedding API: a local cluster in this process with a tiny model.

use futures::StreamExt;
use rbee::actors::worker::engine::tiny::write_tiny_llama;
use rbee::{Cluster, Event, GenerateRequest, GenerationEvent, SamplingParams};

/// A local cluster in `dir` with a tiny model imported as `tiny`.
async fn tiny_cluster(dir: &std::path::Path) -> Cluster {
    let model = dir.join("tiny.gguf");
    write_tiny_llama(&model, 512).unwrap();
    Cluster::local()
        .data_dir(dir.join("data"))
        .model("tiny", &model)
        .start()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_local_cluster_starts_a_worker_on_demand_and_streams() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = tiny_cluster(dir.path()).await;
    let client = cluster.client();
    assert_eq!(client.hives().await.unwrap().len(), 1);
    let request = GenerateRequest {
        sampling: SamplingParams::greedy(),
        ..GenerateRequest::text("In the", 12)
    };
    let mut events = client.generate("tiny", request.clone()).await.unwrap();
    let (mut tokens, mut done, mut assigned) = (0, None, None);
    while let Some(event) = events.next().await {
        match event.unwrap() {
            Event::Assigned { worker } => assigned = Some(worker),
            Event::Generation(GenerationEvent::Token { .. }) => tokens += 1,
            Event::Generation(GenerationEvent::Done(stats)) => done = Some(stats),
            Event::Generation(GenerationEvent::Error(e)) => panic!("{e}"),
            _ => {}
        }
    }
    assert_eq!(tokens, 12);
    assert_eq!(done.unwrap().completion_tokens, 12);
    assert!(assigned.unwrap().starts_with("local/tiny-"));
    let workers = client.workers().await.unwrap();
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].route, "hive");

    // The same request again gives the same greedy text, collected.
    let (text, stats) = client
        .generate("tiny", request)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(stats.completion_tokens, 12);
    assert!(!text.is_empty());

    let unknown = client
        .generate("nothing-here", GenerateRequest::text("x", 1))
        .await
        .unwrap();
    assert!(unknown.text().await.is_err());
    cluster.stop().await;
}

#[tokio::test]
async fn workers_spawned_and_stopped_in_turn_are_each_routable() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = tiny_cluster(dir.path()).await;
    let client = cluster.client();
    for _ in 0..4 {
        let view = client
            .spawn(rbee::Placement::of(rbee::ModelId::new("tiny").unwrap()))
            .await
            .unwrap();
        assert!(view.routable, "{view:?}");
        client.stop(&view.key).await.unwrap();
    }
    cluster.stop().await;
}
