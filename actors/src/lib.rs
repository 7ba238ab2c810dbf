//! rbee's supervision tree. This crate holds the restart strategy every parent uses;
//! the queen, hive and worker actors build on it.

pub mod checksum;
pub mod hive;
pub mod models;
pub mod panic;
pub mod paths;
pub mod private_json;
pub mod protocol;
pub mod queen;
pub mod size;
pub mod supervisor;
pub mod worker;

pub use supervisor::{
    ChildEvent, ChildInfo, ChildSpec, Decision, Escalated, Restart, RestartIntensity,
    RestartPolicy, Supervisor, SupervisorArgs, SupervisorMsg,
};
