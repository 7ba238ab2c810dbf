//! The `rbee` binary. Its commands arrive with the worker, hive and queen; until then it
//! says so instead of pretending.

use std::process::ExitCode;

const USAGE: &str = "\
rbee — one LLM inference cluster from the GPUs and CPUs of several machines

Built so far: the node link (mutual-TLS QUIC) and the supervision tree, as libraries.
No command is available yet: `rbee run`, `rbee queen`, `rbee hive` and the rest arrive
with the worker, hive and queen.

Options:
  -h, --help       this text
  -V, --version    the version";

fn main() -> ExitCode {
    let arg = std::env::args().nth(1);
    match arg.as_deref() {
        Some("-h" | "--help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some("-V" | "--version") => {
            println!("rbee {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(command) => {
            eprintln!("rbee: `{command}` is not available yet: this build has the node link only.");
            eprintln!("hint: run `rbee --help` to see what is built.");
            ExitCode::from(2)
        }
        None => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
