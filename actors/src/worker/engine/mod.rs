//! The parts of generation that do not depend on a model: turning logits into a token,
//! ending on stop sequences, and emitting text that is always whole UTF-8.

pub mod model;
pub mod sampling;
pub mod stop;
pub mod utf8;
