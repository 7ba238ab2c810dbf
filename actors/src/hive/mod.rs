//! The hive: what one machine holds and can run.
//!
//! Built so far: the model store ([`store`]: manifests, atomic writes, partial models
//! visible as such, local import and Python-package sources) and the machine's
//! capabilities ([`capabilities`]). Hugging Face downloads, worker supervision and the
//! `rbee hive` daemon are not built yet.

pub mod capabilities;
pub mod cards;
pub mod hub;
pub mod local_hub;
pub mod process;
pub mod store;
pub mod workers;
