//! Bad input sent to a running cluster (real queen, hive and worker processes on
//! 127.0.0.1, the tiny model): each gets a typed error, the cluster serves a good request
//! right after, and the hive's store is what it was. `tests/README.md` lists every case.

mod common;

use std::path::Path;
use std::time::Duration;

use rbee::actors::hive::store::{Entry, ModelId, ModelStore};
use rbee::actors::queen::client::{ClientError, QueenClient};
use rbee::actors::queen::daemon;
use rbee::actors::queen::protocol::{
    ClientRequest, ClientResponse, Placement, QueenErrorKind, QueenProtocol, QueenRequest,
    QueenResponse,
};
use rbee::actors::worker::api::{ErrorKind, GenerateRequest, MAX_PROMPT_BYTES, SamplingParams};
use rbee::actors::worker::engine::tiny::write_tiny_llama;
use rbee::transport::{Endpoint, Role};

use common::daemons::{
    Seen, client, eventually, import, link_config, read_all, start_hive, start_queen, token,
};

fn tiny() -> ModelId {
    ModelId::new("tiny").unwrap()
}

async fn generate(client: &QueenClient, request: GenerateRequest) -> Seen {
    read_all(client.generate(tiny(), request).await.unwrap(), 30).await
}

/// A good request completes: the cluster still serves.
async fn still_serves(client: &QueenClient) {
    let seen = generate(client, GenerateRequest::text("hello", 4)).await;
    assert!(seen.done.is_some(), "{seen:?}");
}

fn refused(seen: &Seen, kind: ErrorKind, says: &str) {
    let error = seen
        .error
        .as_ref()
        .unwrap_or_else(|| panic!("not refused: {seen:?}"));
    assert_eq!(error.kind, kind, "{error:?}");
    assert!(error.message.contains(says), "{error:?}");
    assert!(seen.tokens.is_empty(), "refused before any work: {seen:?}");
}

fn queen_error(result: Result<ClientResponse, ClientError>, kind: QueenErrorKind, says: &str) {
    match result {
        Err(ClientError::Queen(e)) => {
            assert_eq!(e.kind, kind, "{e:?}");
            assert!(e.message.contains(says), "{e:?}");
        }
        other => panic!("expected a {kind:?} error: {other:?}"),
    }
}

fn store_holds_only_tiny(home: &Path) {
    let listed = ModelStore::open(home).unwrap().list().unwrap();
    assert!(
        matches!(listed.as_slice(), [Entry::Ready(m)] if m.id == tiny()),
        "{listed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_typed_error_and_the_cluster_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_llama(&model, 256).unwrap();
    let home = dir.path().join("hive-a");
    import(&home, &model, "tiny");
    let (_queen, addr) = start_queen(dir.path(), 0, &[]);
    let _hive = start_hive(&home, &token(dir.path(), 600), "hive-a").unwrap();
    let client = client(dir.path(), addr).await;
    eventually(20, "hive-a connected", || async {
        matches!(client.call(ClientRequest::ListHives).await, Ok(ClientResponse::Hives(h)) if h.len() == 1)
    })
    .await;
    let spawned = client
        .call(ClientRequest::Spawn(Placement::of(tiny())))
        .await;
    assert!(
        matches!(spawned, Ok(ClientResponse::Worker(_))),
        "{spawned:?}"
    );
    still_serves(&client).await;

    // An oversized prompt.
    let huge = "a".repeat(MAX_PROMPT_BYTES + 1);
    let seen = generate(&client, GenerateRequest::text(huge, 4)).await;
    refused(&seen, ErrorKind::InvalidRequest, "exceeds the limit");
    still_serves(&client).await;

    // max_tokens 0, and more than the context holds.
    let seen = generate(&client, GenerateRequest::text("hi", 0)).await;
    refused(&seen, ErrorKind::InvalidRequest, "max_tokens");
    let seen = generate(&client, GenerateRequest::text("hi", 1 << 40)).await;
    refused(&seen, ErrorKind::ContextExceeded, "context");
    still_serves(&client).await;

    // Temperatures that mean nothing.
    for temperature in [f32::NAN, -1.0, f32::INFINITY] {
        let request = GenerateRequest {
            sampling: SamplingParams {
                temperature,
                ..SamplingParams::default()
            },
            ..GenerateRequest::text("hi", 4)
        };
        let seen = generate(&client, request).await;
        refused(&seen, ErrorKind::InvalidRequest, "temperature");
    }
    still_serves(&client).await;

    // A model no hive has.
    let seen = read_all(
        client
            .generate(
                ModelId::new("nope").unwrap(),
                GenerateRequest::text("hi", 4),
            )
            .await
            .unwrap(),
        30,
    )
    .await;
    let error = seen.error.expect("refused");
    assert!(error.message.contains("nope"), "{error:?}");

    // Model ids that would leave the store: refused where they are made and where they
    // are read (a peer's message with one does not decode).
    for bad in ["a/b", "..", "../etc", "a\0b", ""] {
        assert!(ModelId::new(bad).is_err(), "{bad:?}");
        let json = serde_json::to_string(bad).unwrap();
        assert!(serde_json::from_str::<ModelId>(&json).is_err(), "{bad:?}");
    }

    // A GGUF whose header is cut short: refused, and nothing is left in the store.
    let bytes = std::fs::read(&model).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..40]).unwrap();
    let import = ClientRequest::Import {
        hive: None,
        path: truncated.display().to_string(),
        model: ModelId::new("cut").unwrap(),
    };
    queen_error(
        client.call(import).await,
        QueenErrorKind::Hive,
        "truncated.gguf",
    );
    store_holds_only_tiny(&home);
    // A path from the wire must be absolute: a relative one is refused unread.
    let relative = ClientRequest::Import {
        hive: None,
        path: "models/tiny/tiny.gguf".into(),
        model: ModelId::new("rel").unwrap(),
    };
    queen_error(
        client.call(relative).await,
        QueenErrorKind::Hive,
        "not an absolute path",
    );
    store_holds_only_tiny(&home);
    still_serves(&client).await;

    // A model whose file no longer matches its manifest's checksum: verification says so.
    let verify = || ClientRequest::VerifyModel {
        hive: "hive-a".into(),
        model: tiny(),
    };
    assert!(matches!(
        client.call(verify()).await,
        Ok(ClientResponse::Model(_))
    ));
    let stored = ModelStore::open(&home)
        .unwrap()
        .model_path(&tiny())
        .unwrap();
    let mut changed = std::fs::read(&stored).unwrap();
    let last = changed.len() - 1;
    changed[last] ^= 1;
    // A new file, not the imported one it may be a hard link of.
    std::fs::remove_file(&stored).unwrap();
    std::fs::write(&stored, &changed).unwrap();
    queen_error(client.call(verify()).await, QueenErrorKind::Hive, "sha256");
    still_serves(&client).await;

    // A message of the wrong type for the sender's role: a client asking what only a hive
    // may ask is refused, and its link serves on.
    let identity = daemon::client_identity(&dir.path().join("queen"), "intruder").unwrap();
    let endpoint =
        Endpoint::<QueenProtocol>::client(identity, "127.0.0.1:0".parse().unwrap(), link_config())
            .unwrap();
    let (link, _incoming) = endpoint.connect(addr, &[Role::Queen]).await.unwrap();
    let sign = QueenRequest::SignWorker {
        worker: "w".into(),
        public_key_der: vec![0; 32],
    };
    match link.call(sign, Duration::from_secs(10)).await.unwrap() {
        QueenResponse::Error(e) => assert_eq!(e.kind, QueenErrorKind::Invalid, "{e:?}"),
        other => panic!("expected a refusal: {other:?}"),
    }
    let listed = link
        .call(
            QueenRequest::Client(ClientRequest::ListHives),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert!(matches!(
        listed,
        QueenResponse::Client(ClientResponse::Hives(_))
    ));
    still_serves(&client).await;
}
