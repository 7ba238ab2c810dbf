//! The golden-bytes test of the wire protocol (see the module's documentation).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use rbee_transport::codec::encode_frame;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_reflection::{Samples, Tracer, TracerConfig};

use super::PROTOCOL_VERSION;
use super::hive::{HiveItem, HiveOpen, HiveRequest, HiveResponse};
use super::queen::{HiveEvent, QueenItem, QueenOpen, QueenRequest, QueenResponse};
use super::worker::{GenerateRequest, GenerationEvent, WorkerRequest, WorkerResponse};
use crate::hive::capabilities::GpuReport;
use crate::hive::hub::DownloadEvent;
use crate::hive::remote::HiveFailureKind;
use crate::hive::store::Entry;
use crate::hive::workers::{IdleTimeout, WorkerMode, WorkerState};
use crate::queen::protocol::{ClientRequest, ClientResponse, HiveState, QueenErrorKind};
use crate::worker::actor::{Embedded, Phase};
use crate::worker::api::{ErrorKind, GenerationError, Prompt};
use crate::worker::engine::loader::LoadStep;
use crate::worker::engine::model::FinishReason;

/// What `golden.json` records.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Golden {
    version: u32,
    /// Every named struct and enum reachable from the message types, as serde sees it.
    shapes: serde_json::Value,
    /// Per message type, one encoded frame (hex) per traced value: together they take
    /// every variant of every enum.
    frames: BTreeMap<String, Vec<String>>,
}

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/protocol/golden.json")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Trace {
    tracer: Tracer,
    samples: Samples,
    frames: BTreeMap<String, Vec<String>>,
}

impl Trace {
    fn add<T: Serialize + DeserializeOwned>(&mut self, name: &str) {
        let values: Vec<T> = self
            .tracer
            .trace_type::<T>(&self.samples)
            .unwrap_or_else(|e| panic!("tracing {name}: {e}"))
            .1;
        let frames = values
            .iter()
            .map(|v| hex(&encode_frame(v, usize::MAX).expect("encodes")))
            .collect();
        self.frames.insert(name.to_string(), frames);
    }
}

/// `t.add::<T>("T")` for each type, keyed by its name as written.
macro_rules! trace {
    ($t:ident: $($ty:ty),* $(,)?) => {
        $($t.add::<$ty>(stringify!($ty));)*
    };
}

fn current() -> Golden {
    let mut t = Trace {
        // Values that pass the types' own checks (a model id is a non-empty name), and
        // numbers that are not zero, so a field's width shows in the bytes.
        tracer: Tracer::new(
            TracerConfig::default()
                .default_string_value("smollm2-135m".into())
                .default_borrowed_str_value("smollm2-135m")
                .default_u16_value(300)
                .default_u32_value(70_000)
                .default_u64_value(5_000_000_000)
                .default_f32_value(0.5)
                .default_f64_value(0.25)
                .default_bool_value(true),
        ),
        samples: Samples::new(),
        frames: BTreeMap::new(),
    };
    trace!(t:
        // The messages of each link.
        QueenRequest, QueenResponse, HiveEvent, QueenOpen, QueenItem,
        HiveRequest, HiveResponse, HiveOpen, HiveItem,
        WorkerRequest, WorkerResponse, GenerateRequest, GenerationEvent,
        // Enums inside them, each traced to all its variants too.
        ClientRequest, ClientResponse, HiveState, QueenErrorKind, DownloadEvent, Entry,
        GpuReport, IdleTimeout, WorkerMode, WorkerState, ErrorKind, Prompt, FinishReason,
        LoadStep, Phase, Result<Embedded, GenerationError>, SocketAddr, HiveFailureKind,
    );
    let registry = t.tracer.registry().expect("every enum traced completely");
    Golden {
        version: PROTOCOL_VERSION,
        shapes: serde_json::to_value(&registry).expect("a registry is JSON"),
        frames: t.frames,
    }
}

#[test]
fn the_wire_encoding_changes_only_with_the_protocol_version() {
    let now = current();
    if std::env::var_os("RBEE_BLESS").is_some() {
        let text = serde_json::to_string_pretty(&now).expect("JSON");
        std::fs::write(path(), text + "\n").expect("writes golden.json");
        return;
    }
    let text = std::fs::read_to_string(path()).expect("src/protocol/golden.json exists");
    let golden: Golden = serde_json::from_str(&text).expect("golden.json parses");
    assert_eq!(
        golden.version, PROTOCOL_VERSION,
        "PROTOCOL_VERSION is {PROTOCOL_VERSION} but golden.json records {}: regenerate it with RBEE_BLESS=1",
        golden.version
    );
    for (name, shape) in now.shapes.as_object().expect("an object") {
        assert_eq!(
            Some(shape),
            golden.shapes.get(name),
            "the wire shape of {name} changed without a PROTOCOL_VERSION bump: bump it \
             (transport/src/hello.rs) and regenerate golden.json with RBEE_BLESS=1"
        );
    }
    assert_eq!(
        now.shapes, golden.shapes,
        "a type left the protocol without a PROTOCOL_VERSION bump"
    );
    for (name, frames) in &now.frames {
        assert_eq!(
            Some(frames),
            golden.frames.get(name),
            "the encoding of {name} changed without a PROTOCOL_VERSION bump: bump it \
             (transport/src/hello.rs) and regenerate golden.json with RBEE_BLESS=1"
        );
    }
    assert!(
        now.frames.keys().eq(golden.frames.keys()),
        "a message type left the protocol without a PROTOCOL_VERSION bump"
    );
}
