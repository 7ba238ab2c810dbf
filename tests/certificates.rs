//! Short-lived certificates and CA rotation on a cluster of real processes on 127.0.0.1
//! (a queen, two hives, a worker process on each, tiny models): certificates renew over
//! the link before they expire while requests flow, and the renewed ones are what new
//! handshakes use; the CA rotates with a hive joined before and one joined after.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use rbee::actors::hive::store::ModelId;
use rbee::actors::queen::client::QueenClient;
use rbee::actors::worker::engine::tiny::write_tiny_llama;
use rbee::transport::NodeIdentity;

use common::daemons::{
    client, eventually, import, link_config, start_hive, start_queen, token, workers,
};
use common::traffic::{Traffic, a_worker_on_each_hive, connected, greedy};

/// The identity saved in `dir`.
fn saved(dir: &Path) -> NodeIdentity {
    NodeIdentity::load_saved(dir).unwrap()
}

/// The hive's identity directory, and its one worker's.
fn identity_dirs(home: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let workers = home.join("hive").join("workers");
    let worker = std::fs::read_dir(&workers)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir() && p.join("node.crt").exists())
        .expect("a worker identity");
    (home.join("hive").join("identity"), worker)
}

fn cluster_with_tiny_models(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, ModelId) {
    let model_file = dir.join("tiny.gguf");
    write_tiny_llama(&model_file, 512).unwrap();
    let (home_a, home_b) = (dir.join("a"), dir.join("b"));
    import(&home_a, &model_file, "tiny");
    import(&home_b, &model_file, "tiny");
    (home_a, home_b, ModelId::new("tiny").unwrap())
}

/// Generations through a fresh client link until one completes (at most 30 s).
async fn one_generation(client: &QueenClient, model: &ModelId) {
    eventually(30, "a generation completes", || async {
        match client.generate(model.clone(), greedy(8)).await {
            Ok(stream) => common::daemons::read_all(stream, 20).await.done.is_some(),
            Err(_) => false,
        }
    })
    .await;
}

#[tokio::test]
async fn certificates_renew_before_they_expire_without_dropping_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let (home_a, home_b, tiny) = cluster_with_tiny_models(dir.path());
    let lifetime = ["--cert-lifetime", "20s"];
    let (mut queen, link) = start_queen(dir.path(), 0, &lifetime);
    let token = token(dir.path(), 600);
    let _hives = [
        start_hive(&home_a, &token, "hive-a").unwrap(),
        start_hive(&home_b, &token, "hive-b").unwrap(),
    ];
    a_worker_on_each_hive(dir.path(), link, &tiny).await;
    let queen_dir = dir.path().join("queen").join("identity");
    let (hive_dir, worker_dir) = identity_dirs(&home_a);
    let first: Vec<NodeIdentity> = [&queen_dir, &hive_dir, &worker_dir]
        .iter()
        .map(|d| saved(d))
        .collect();

    // Requests flow while every certificate of the cluster is renewed at least once and
    // the first ones expire.
    let traffic = Traffic::start(dir.path(), link, tiny.clone(), 2);
    let latest_expiry = first.iter().map(|i| i.expires_at()).max().unwrap();
    let wait = latest_expiry
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_secs(3)).await;
    traffic.wait_for_more_done(2, "traffic after expiry").await;
    let outcome = traffic.stop().await;
    eprintln!("traffic while renewing: {outcome:?}");
    assert!(outcome.done > 0);
    assert_eq!(
        (outcome.errors, outcome.without_terminal),
        (0, 0),
        "{outcome:?}"
    );
    for (dir, before) in [&queen_dir, &hive_dir, &worker_dir].iter().zip(&first) {
        let now = saved(dir);
        assert!(before.expires_at() < SystemTime::now(), "{}", dir.display());
        assert!(
            now.expires_at() > SystemTime::now(),
            "{} renewed",
            dir.display()
        );
        assert_eq!(now.peer_identity(), before.peer_identity());
    }

    // New handshakes use the renewed certificates: the queen restarts, the hives dial it
    // again, and it dials the workers again (every first certificate has expired).
    queen.kill();
    let (_queen, again) = start_queen(dir.path(), link.port(), &lifetime);
    let client = client(dir.path(), again).await;
    eventually(15, "both hives reconnected", || async {
        connected(&client).await.len() == 2
    })
    .await;
    eventually(20, "the workers are routable again", || async {
        let listed = workers(&client).await;
        listed.len() == 2 && listed.iter().all(|w| w.routable)
    })
    .await;
    one_generation(&client, &tiny).await;
}

/// Runs `rbee queen ca <what>` for the queen with data in `dir`; returns its output.
fn queen_ca(dir: &Path, what: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rbee"))
        .args(["queen", "ca", what, "--data"])
        .arg(dir.join("queen"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "rbee queen ca {what}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The fingerprint `rbee queen ca` printed.
fn fingerprint_in(output: &str) -> String {
    output
        .split_whitespace()
        .find(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .expect("a fingerprint")
        .to_string()
}

#[tokio::test]
async fn the_ca_rotates_with_a_hive_joined_before_and_one_joined_after() {
    let dir = tempfile::tempdir().unwrap();
    let (home_a, home_b, tiny) = cluster_with_tiny_models(dir.path());
    let (mut queen, link) = start_queen(dir.path(), 0, &[]);
    let hive_a = start_hive(&home_a, &token(dir.path(), 600), "hive-a").unwrap();
    let client_a = client(dir.path(), link).await;
    eventually(20, "hive-a connected", || async {
        connected(&client_a).await == ["hive-a"]
    })
    .await;
    let old = saved(&home_a.join("hive").join("identity")).ca_fingerprint();
    // An operator's identity of the old CA alone: refused once it is retired.
    let stale =
        rbee::actors::queen::daemon::client_identity(&dir.path().join("queen"), "stale").unwrap();

    // Rotate while requests flow to a worker on hive-a.
    client_a
        .call(rbee::actors::queen::protocol::ClientRequest::Spawn(
            rbee::actors::queen::protocol::Placement::of(tiny.clone()),
        ))
        .await
        .unwrap();
    let traffic = Traffic::start(dir.path(), link, tiny.clone(), 2);
    traffic
        .wait_for_more_done(2, "traffic before the rotation")
        .await;
    let rotated = queen_ca(dir.path(), "rotate");
    eprintln!("{rotated}");
    assert!(rotated.contains("hive-a: renewed"), "{rotated}");
    let new = fingerprint_in(&rotated);
    assert_ne!(new, old.to_string());
    let hive_identity = saved(&home_a.join("hive").join("identity"));
    assert_eq!(hive_identity.ca_fingerprint().to_string(), new);
    assert_eq!(hive_identity.trusted().len(), 2, "both CAs trusted");

    // A hive joins during the overlap (its token pins the CA the queen presents, the old
    // one); its certificate is of the new CA.
    let hive_b = start_hive(&home_b, &token(dir.path(), 600), "hive-b").unwrap();
    eventually(20, "hive-b connected", || async {
        connected(&client_a).await.len() == 2
    })
    .await;
    let b_identity = saved(&home_b.join("hive").join("identity"));
    assert_eq!(b_identity.ca_fingerprint().to_string(), new);
    client_a
        .call(rbee::actors::queen::protocol::ClientRequest::Spawn(
            rbee::actors::queen::protocol::Placement {
                hive: Some("hive-b".into()),
                ..rbee::actors::queen::protocol::Placement::of(tiny.clone())
            },
        ))
        .await
        .unwrap();
    traffic
        .wait_for_more_done(4, "traffic during the overlap")
        .await;
    let outcome = traffic.stop().await;
    eprintln!("traffic through the rotation: {outcome:?}");
    assert_eq!(
        (outcome.errors, outcome.without_terminal),
        (0, 0),
        "{outcome:?}"
    );

    // Retire the old CA; then every new handshake is under the new one alone.
    let retired = queen_ca(dir.path(), "retire");
    eprintln!("{retired}");
    assert!(
        retired.contains("hive-a: renewed") && retired.contains("hive-b: renewed"),
        "{retired}"
    );
    let queen_identity = saved(&dir.path().join("queen").join("identity"));
    assert_eq!(queen_identity.ca_fingerprint().to_string(), new);
    assert_eq!(queen_identity.trusted().len(), 1);
    queen.kill();
    let (_queen, again) = start_queen(dir.path(), link.port(), &[]);
    let fresh = client(dir.path(), again).await;
    eventually(15, "both hives reconnected under the new CA", || async {
        connected(&fresh).await.len() == 2
    })
    .await;
    eventually(20, "both workers routable", || async {
        let listed = workers(&fresh).await;
        listed.len() == 2 && listed.iter().all(|w| w.routable)
    })
    .await;
    one_generation(&fresh, &tiny).await;
    let refused = QueenClient::connect(stale, again, link_config()).await;
    assert!(refused.is_err(), "an identity of the retired CA is refused");
    drop((hive_a, hive_b));
}
