//! The worker's engine: a model loaded with candle, its tokenizer and chat template, and the
//! generation pipeline that turns a request into a stream of events.

pub mod convert;
pub mod embed;
pub mod gguf_check;
pub mod json_schema;
pub mod loader;
pub mod model;
pub mod native;
pub mod pipeline;
pub mod sampling;
pub mod spm;
pub mod stop;
pub mod template;
pub mod tiny;
pub mod tokenizer;
pub mod utf8;
