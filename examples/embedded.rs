//! A whole rbee cluster inside this program: a queen, a hive and a worker, with the
//! default model (SmolLM2-135M-Instruct, fetched on first use), streaming one answer.
//!
//! `cargo run --example embedded -- "Why is the sky blue?"`

use std::io::Write;

use futures::StreamExt;
use rbee::{ChatMessage, Cluster, Event, GenerateRequest, GenerationEvent};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let question = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "What is the capital of France?".into());
    let cluster = Cluster::local().default_model().start().await?;
    let messages = vec![ChatMessage {
        role: "user".into(),
        content: question,
    }];
    let mut answer = cluster
        .client()
        .generate("smollm2-135m", GenerateRequest::chat(messages, 128))
        .await?;
    while let Some(event) = answer.next().await {
        match event? {
            Event::Loading { .. } => eprint!("."),
            Event::Assigned { worker } => eprintln!("[answered by {worker}]"),
            Event::Generation(GenerationEvent::Token { text, .. })
            | Event::Generation(GenerationEvent::Text(text)) => {
                print!("{text}");
                std::io::stdout().flush()?;
            }
            Event::Generation(GenerationEvent::Done(stats)) => {
                println!();
                eprintln!(
                    "[{} tokens, first after {:.0} ms]",
                    stats.completion_tokens, stats.time_to_first_token_ms
                );
            }
            Event::Generation(GenerationEvent::Error(e)) => return Err(e.into()),
            _ => {}
        }
    }
    cluster.stop().await;
    Ok(())
}
