//! `rbee run`: a model in this process, answering one prompt or a conversation.
//!
//! No queen or hive is involved yet: the worker actor runs in-process, which is what the
//! local cluster will do for a single machine.

use std::io::Write;
use std::process::ExitCode;

use clap::Args;
use ractor::ActorRef;
use rbee::actors::worker::actor::{self, STREAM_CAPACITY, WorkerMsg};
use rbee::actors::worker::api::{
    ChatMessage, GenerateRequest, GenerationEvent, Prompt, SamplingParams,
};
use rbee::actors::worker::engine::loader::LoadProgress;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use super::ModelArgs;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// What to ask; without it, an interactive chat (an empty line or end of input ends it).
    prompt: Option<String>,
    #[command(flatten)]
    model: ModelArgs,
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
}

/// One progress line on stderr, rewritten in place.
pub fn print_progress(p: LoadProgress) {
    eprint!("\rloading: {:?} {:>3.0}%   ", p.step, p.fraction * 100.0);
    if p.fraction >= 1.0 {
        eprintln!();
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let path = args.model.path()?;
    let started = actor::start(path, args.model.options(), print_progress).await?;
    let (worker, info) = (started.worker, started.info);
    eprintln!(
        "rbee: {} ({} {}, context {})",
        info.path, info.architecture, info.quantization, info.context_length
    );
    let sampling = SamplingParams {
        temperature: args.temperature,
        seed: args.seed,
        ..SamplingParams::default()
    };
    let request = |prompt| GenerateRequest {
        prompt,
        sampling: sampling.clone(),
        max_tokens: args.max_tokens,
        stop: Vec::new(),
        ignore_eos: false,
        resume: Vec::new(),
    };
    if let Some(text) = &args.prompt {
        let prompt = if args.raw {
            Prompt::Text(text.clone())
        } else {
            Prompt::Chat(vec![user(text)])
        };
        let ok = answer(&worker, request(prompt)).await?.is_some();
        worker.stop(None);
        return Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let mut conversation = Vec::new();
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
        match answer(&worker, request(Prompt::Chat(conversation.clone()))).await? {
            Some(reply) => conversation.push(ChatMessage {
                role: "assistant".into(),
                content: reply,
            }),
            None => {
                conversation.pop();
            }
        }
    }
    worker.stop(None);
    Ok(ExitCode::SUCCESS)
}

fn user(text: &str) -> ChatMessage {
    ChatMessage {
        role: "user".into(),
        content: text.into(),
    }
}

/// Streams one answer to stdout; the statistics go to stderr. `None` when it failed.
async fn answer(
    worker: &ActorRef<WorkerMsg>,
    request: GenerateRequest,
) -> anyhow::Result<Option<String>> {
    let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
    worker.cast(WorkerMsg::Generate(request, tx))?;
    let mut reply = String::new();
    let mut stdout = std::io::stdout();
    while let Some(event) = rx.recv().await {
        match event {
            GenerationEvent::Token { text, .. } | GenerationEvent::Text(text) => {
                reply.push_str(&text);
                stdout.write_all(text.as_bytes())?;
                stdout.flush()?;
            }
            GenerationEvent::Done(s) => {
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
            GenerationEvent::Error(e) => {
                println!();
                eprintln!("rbee: {e}");
                return Ok(None);
            }
        }
    }
    anyhow::bail!("the worker stopped without finishing the answer")
}
