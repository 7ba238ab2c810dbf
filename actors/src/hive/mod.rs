//! The hive: what one machine holds and can run.
//!
//! - [`store`], [`hub`], [`cards`]: the model store and its sources (Hugging Face hub,
//!   Python packages, local import), with [`local_hub`] as a hub stand-in on loopback.
//! - [`capabilities`]: GPUs, CPU, memory, disk, built backends.
//! - [`workers`], [`process`]: the supervised workers, in-process or child processes.
//! - [`remote`]: the hive's operations over the node link (what the `rbee hive` daemon
//!   serves), [`uplink`] (a joined hive's link to its queen), [`renewal`] (its certificates
//!   and its workers', renewed over that link), [`daemon`] (all of it as one unit).

pub mod capabilities;
pub mod cards;
pub mod daemon;
pub mod hub;
pub mod local_hub;
pub mod process;
pub mod remote;
pub mod renewal;
pub mod store;
pub mod uplink;
pub mod workers;
