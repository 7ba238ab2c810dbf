//! The queen: one cluster from many machines.
//!
//! - [`protocol`]: what hives and clients say on links to the queen.
//! - [`tokens`]: join tokens and the hives that joined.
//! - [`authority`]: the cluster CA: short-lived node certificates, their renewal, rotation.
//! - [`registry`]: hives and workers, placement and the choice of a worker per request.
//! - [`admission`]: the bounded per-model queues.
//! - [`revoked`]: hives removed from the cluster, refused at every handshake.
//! - [`affinity`]: which worker likely holds a request's prompt prefix in its cache.
//! - [`client`]: a client of the queen over the node link.
//! - [`actor`]: the queen actor that owns both and acts on what the links report.
//! - [`route`]: one generation through the queen, with failover, deadline and cancel.
//! - [`in_flight`]: generations running under an id, for cancels.
//! - [`serve`]: the queen's side of its links.
//! - `hive_link`: the supervised proxy of a joined hive's link (a child of the queen actor).
//! - [`daemon`]: a queen with its CA, identity, endpoints and join listener.

pub mod actor;
pub mod admission;
pub mod affinity;
pub mod authority;
pub mod client;
pub mod daemon;
mod hive_link;
pub mod in_flight;
pub mod keys;
pub mod protocol;
pub mod registry;
pub mod revoked;
pub mod route;
pub mod serve;
pub mod tokens;
