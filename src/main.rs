//! The `rbee` binary.

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    rbee::actors::panic::install_cheap_hook();
    let args = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rbee: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rbee: {e:#}");
            if e.downcast_ref::<cli::Unreachable>().is_some() {
                ExitCode::from(cli::EXIT_UNREACHABLE)
            } else {
                ExitCode::from(cli::EXIT_FAILED)
            }
        }
    }
}
