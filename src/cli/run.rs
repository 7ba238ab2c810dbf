//! `rbee run`: answers one prompt, or chats, through a cluster: the configured queen if
//! there is one, else a local cluster started in this process (queen, hive and an
//! in-process worker), which fetches the default model on first use.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Args;
use futures::StreamExt;
use rbee::{ChatMessage, Client, Cluster, Event, GenerateRequest, GenerationEvent, SamplingParams};
use tokio::io::AsyncBufReadExt;

use super::connect::Effective;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// What to ask; without it, an interactive chat (an empty line or end of input ends it).
    prompt: Option<String>,
    /// The model: an id in the store, or a GGUF file / safetensors directory (imported
    /// into the local cluster's store).
    #[arg(long, default_value = super::DEFAULT_MODEL_NAME)]
    model: String,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sampler seed (random when absent; printed at the end).
    #[arg(long)]
    seed: Option<u64>,
    /// Continue PROMPT as raw text instead of chatting with the model's template.
    #[arg(long)]
    raw: bool,
    /// A system message that opens the conversation (instead of the template's default).
    #[arg(long)]
    system: Option<String>,
}

pub async fn run(settings: &Effective, args: RunArgs) -> anyhow::Result<ExitCode> {
    if settings.has_queen() {
        let client = settings.client().await?;
        let model = super::ops::ensure_on_cluster(&client, &args.model).await?;
        return converse(&client, &model, &args).await;
    }
    let mut builder = Cluster::local().slots(1);
    let path = std::path::Path::new(&args.model);
    let model = if rbee::actors::hive::cards::card(&args.model).is_some() {
        let store = rbee::actors::hive::store::ModelStore::open(&rbee::actors::paths::data_dir())?;
        super::ops::card_here(&store, &args.model).await?;
        args.model.clone()
    } else if path.exists() {
        let id = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("model")
            .to_lowercase();
        builder = builder.model(&id, path);
        id
    } else {
        args.model.clone()
    };
    eprintln!("rbee: no queen configured; running {model} in this process");
    let cluster = builder.start().await?;
    let outcome = converse(cluster.client(), &model, &args).await;
    cluster.stop().await;
    outcome
}

async fn converse(client: &Client, model: &str, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        seed: args.seed,
        ..SamplingParams::default()
    };
    let request = |prompt| GenerateRequest {
        prompt,
        sampling: sampling.clone(),
        max_tokens: args.max_tokens,
        ..GenerateRequest::text("", 1)
    };
    if let Some(text) = &args.prompt {
        let prompt = if args.raw {
            rbee::actors::worker::api::Prompt::Text(text.clone())
        } else {
            rbee::actors::worker::api::Prompt::Chat(
                system(args).into_iter().chain([user(text)]).collect(),
            )
        };
        let ok = answer(client, model, request(prompt)).await?.is_some();
        return Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let mut conversation: Vec<ChatMessage> = system(args).into_iter().collect();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        eprint!(">>> ");
        let Some(line) = lines.next_line().await? else {
            break;
        };
        if line.trim().is_empty() {
            break;
        }
        conversation.push(user(&line));
        let prompt = rbee::actors::worker::api::Prompt::Chat(conversation.clone());
        match answer(client, model, request(prompt)).await? {
            Some(reply) => conversation.push(ChatMessage {
                role: "assistant".into(),
                content: reply,
            }),
            None => {
                conversation.pop();
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The system message that opens the conversation, if one was given.
fn system(args: &RunArgs) -> Option<ChatMessage> {
    args.system.as_ref().map(|content| ChatMessage {
        role: "system".into(),
        content: content.clone(),
    })
}

fn user(text: &str) -> ChatMessage {
    ChatMessage {
        role: "user".into(),
        content: text.into(),
    }
}

/// Streams one answer to stdout, progress and statistics to stderr. `None` when it failed.
/// Ctrl-C cancels it on the cluster (the stream is dropped) and says so.
async fn answer(
    client: &Client,
    model: &str,
    request: GenerateRequest,
) -> anyhow::Result<Option<String>> {
    let mut events = client.generate(model, request).await?;
    let mut reply = String::new();
    let mut stdout = std::io::stdout();
    let mut loading = false;
    // On a terminal the progress line is rewritten in place; elsewhere each step once.
    let terminal = std::io::stderr().is_terminal();
    let mut last_step = None;
    let mut announced = false;
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = tokio::signal::ctrl_c() => {
                drop(events);
                println!();
                eprintln!("rbee: cancelled; the worker stopped generating");
                return Ok(None);
            }
        };
        let Some(event) = event else {
            anyhow::bail!("the cluster ended the answer without a result");
        };
        match event? {
            // First in the queue is the normal wait for a worker that is starting.
            Event::Queued { position } if position > 1 => {
                eprintln!("rbee: waiting for a worker, position {position}")
            }
            Event::Loading { progress: None, .. } if !announced => {
                eprintln!("rbee: starting a worker for {model}");
                announced = true;
            }
            Event::Loading {
                progress: Some(p), ..
            } => {
                if terminal {
                    eprint!(
                        "\rloading {model}: {:?} {:>3.0}%   ",
                        p.step,
                        p.fraction * 100.0
                    );
                    loading = true;
                } else if last_step != Some(p.step) {
                    eprintln!("loading {model}: {:?}", p.step);
                    last_step = Some(p.step);
                }
            }
            Event::Moved { from, to, .. } => {
                eprintln!("\nrbee: {from} was lost; continuing on {to}")
            }
            Event::Generation(GenerationEvent::Token { text, .. })
            | Event::Generation(GenerationEvent::Text(text)) => {
                if std::mem::take(&mut loading) {
                    eprintln!();
                }
                reply.push_str(&text);
                stdout.write_all(text.as_bytes())?;
                stdout.flush()?;
            }
            Event::Generation(GenerationEvent::Done(s)) => {
                println!();
                eprintln!(
                    "[{:?}: {} prompt + {} tokens, first token {:.0} ms, {:.1} tok/s, seed {}]",
                    s.finish,
                    s.prompt_tokens,
                    s.completion_tokens,
                    s.time_to_first_token_ms,
                    s.decode_tokens_per_s,
                    s.seed
                );
                return Ok(Some(reply));
            }
            Event::Generation(GenerationEvent::Error(e)) => {
                println!();
                eprintln!("rbee: {e}");
                return Ok(None);
            }
            _ => {}
        }
    }
}
