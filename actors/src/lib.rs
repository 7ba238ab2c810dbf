//! rbee's actors: the queen, hive and worker, their supervision (see
//! `docs/runtime-semantics.md`), the restart strategy, and the wire protocol between them.

pub mod checksum;
pub mod hive;
pub mod models;
pub mod panic;
pub mod paths;
pub mod private_json;
pub mod protocol;
pub mod queen;
pub mod root;
pub mod size;
pub mod supervisor;
pub mod worker;

pub use supervisor::{Decision, Restart, RestartIntensity, RestartPolicy};
