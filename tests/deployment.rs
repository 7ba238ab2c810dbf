//! What a deployment (Kubernetes, or any machine where the queen listens on all
//! addresses) relies on: the probes `/health` and `/ready` of a queen (on its HTTP
//! gateway, without an API key even when keys are required) and of a joined hive
//! (`--health`), a hive whose queen is gone being alive but not ready; and a queen on
//! 0.0.0.0 handing out tokens only with the address hives reach it at.

mod common;

use std::process::Command;

use common::daemons::{TIMING, client, eventually, start, start_queen, start_queen_on, token};

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

#[tokio::test]
async fn a_queen_on_all_addresses_gives_tokens_with_the_advertised_one_and_hives_join_there() {
    let dir = tempfile::tempdir().unwrap();
    let (_queen, link) = start_queen_on(dir.path(), "0.0.0.0", 0, &[]);
    assert!(link.ip().is_unspecified());
    let token = |advertise: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_rbee"))
            .args(["queen", "token", "--data"])
            .arg(dir.path().join("queen"))
            .args(advertise)
            .output()
            .unwrap()
    };
    let refused = token(&[]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--advertise"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let made = token(&["--advertise", "127.0.0.1"]);
    assert!(made.status.success());
    let token = String::from_utf8(made.stdout).unwrap().trim().to_string();
    let mut args = vec!["hive", "serve", "--join", &token, "--name", "pod"];
    args.extend(TIMING);
    let hive = start(&dir.path().join("hive"), &args).unwrap();
    // The queen's link (0.0.0.0 in its join answer) is dialed where its join endpoint was.
    assert!(
        hive.ready["ready"]["queen"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{}",
        hive.ready
    );
    let local = std::net::SocketAddr::new([127, 0, 0, 1].into(), link.port());
    let client = client(dir.path(), local).await;
    eventually(10, "the hive is connected", || async {
        matches!(
            client.call(rbee::actors::queen::protocol::ClientRequest::ListHives).await,
            Ok(rbee::actors::queen::protocol::ClientResponse::Hives(h)) if h.len() == 1
        )
    })
    .await;
}

#[tokio::test]
async fn a_hive_stopped_gracefully_is_gone_at_the_queen_at_once_not_at_its_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    // Slow loss detection: a silent hive would count as lost only after 30 s.
    let slow = ["--keep-alive-ms", "5000", "--idle-timeout-ms", "30000"];
    let data = dir.path().join("queen");
    let mut args = vec!["queen", "serve", "--data", data.to_str().unwrap()];
    args.extend([
        "--listen",
        "127.0.0.1:0",
        "--join-listen",
        "127.0.0.1:0",
        "--no-http",
    ]);
    args.extend(slow);
    let queen = start(dir.path(), &args).unwrap();
    let link: std::net::SocketAddr = queen.ready["ready"]["link"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let token = token(dir.path(), 600);
    let mut args = vec!["hive", "serve", "--join", &token, "--name", "h"];
    args.extend(slow);
    let mut hive = start(&dir.path().join("hive"), &args).unwrap();
    let client = client(dir.path(), link).await;
    let state = || async {
        match client
            .call(rbee::actors::queen::protocol::ClientRequest::ListHives)
            .await
        {
            Ok(rbee::actors::queen::protocol::ClientResponse::Hives(h)) => h
                .first()
                .map(|h| h.state == rbee::actors::queen::protocol::HiveState::Connected),
            _ => None,
        }
    };
    eventually(10, "the hive is connected", || async {
        state().await == Some(true)
    })
    .await;
    common::daemons::signal(hive.pid(), libc::SIGINT);
    let _ = hive.child.wait();
    eventually(3, "the queen sees the stopped hive gone", || async {
        state().await == Some(false)
    })
    .await;
}
