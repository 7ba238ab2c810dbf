//! The probes Kubernetes uses: `/health` and `/ready` of a queen (on its HTTP gateway,
//! without an API key even when keys are required) and of a joined hive (`--health`);
//! a hive whose queen is gone is alive but not ready.

mod common;

use std::process::Command;

use common::daemons::{TIMING, eventually, start, start_queen, token};

async fn status(url: &str) -> u16 {
    match reqwest::get(url).await {
        Ok(response) => response.status().as_u16(),
        Err(_) => 0,
    }
}

#[tokio::test]
async fn queen_and_hive_answer_their_probes_and_a_hive_without_its_queen_is_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let (mut queen, _link) = start_queen(dir.path(), 0, &[]);
    let http = queen.ready["ready"]["http"].as_str().unwrap().to_string();
    // With a key, the API is closed to anonymous requests; the probes are not.
    let created = Command::new(env!("CARGO_BIN_EXE_rbee"))
        .args(["queen", "keys", "create", "--name", "ops", "--data"])
        .arg(dir.path().join("queen"))
        .output()
        .unwrap();
    assert!(created.status.success());
    assert_eq!(status(&format!("http://{http}/v1/models")).await, 401);
    assert_eq!(status(&format!("http://{http}/health")).await, 200);
    assert_eq!(status(&format!("http://{http}/ready")).await, 200);

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let probe = format!("127.0.0.1:{port}");
    let token = token(dir.path(), 600);
    let mut args = vec![
        "hive", "serve", "--join", &token, "--name", "h", "--health", &probe,
    ];
    args.extend(TIMING);
    let _hive = start(&dir.path().join("hive"), &args).unwrap();
    let ready = format!("http://{probe}/ready");
    eventually(10, "the hive is ready", || async {
        status(&ready).await == 200
    })
    .await;
    assert_eq!(status(&format!("http://{probe}/health")).await, 200);

    queen.kill();
    eventually(10, "the hive without a queen is not ready", || async {
        status(&ready).await == 503
    })
    .await;
    assert_eq!(
        status(&format!("http://{probe}/health")).await,
        200,
        "it is alive"
    );
}
